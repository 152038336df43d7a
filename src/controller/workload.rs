//! The workload step of the Agent reconcile: server-side apply the objects `crate::workload`
//! builds, put the discovery labels on the Agent, and report readiness from the rollout.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Context, Error, MANAGER};
use crate::crd::{Agent, ValidatedSpec};
use crate::workload::{self, CAPABILITY_PREFIX, MemoryPlan, Workload};

pub struct WorkloadOutcome {
    pub ready: bool,
    pub message: String,
}

async fn apply<K>(ctx: &Context, ns: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    // force: these objects are ours; a hand edit of a field we set is reverted.
    Ok(api
        .patch(
            &obj.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?)
}

/// Deletes `name` of kind K if it exists (a 404 is success).
async fn delete_if_present<K>(ctx: &Context, ns: &str, name: &str) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub async fn reconcile(
    agent: &Agent,
    spec: &ValidatedSpec,
    plan: &MemoryPlan,
    identity_secret: &str,
    ctx: &Context,
) -> Result<WorkloadOutcome, Error> {
    let ns = agent.namespace().ok_or(Error::MissingNamespace)?;
    label_agent(agent, ctx, &ns).await?;
    apply(ctx, &ns, &workload::service_account(agent)).await?;
    apply(ctx, &ns, &workload::service(agent)).await?;
    let (ready, message) = match workload::workload(agent, spec, plan, identity_secret) {
        Workload::Deployment(d) => {
            delete_if_present::<StatefulSet>(ctx, &ns, &agent.name_any()).await?;
            let applied: Deployment = apply(ctx, &ns, d.as_ref()).await?;
            workload::deployment_ready(&applied)
        }
        Workload::StatefulSet(s) => {
            delete_if_present::<Deployment>(ctx, &ns, &agent.name_any()).await?;
            let applied: StatefulSet = apply(ctx, &ns, s.as_ref()).await?;
            workload::statefulset_ready(&applied)
        }
    };
    Ok(WorkloadOutcome { ready, message })
}

/// Puts `agentry.dev/agent` and one `capability.agentry.dev/<c>` label per capability on the
/// Agent (server-side apply: labels for dropped capabilities disappear with our ownership).
async fn label_agent(agent: &Agent, ctx: &Context, ns: &str) -> Result<(), Error> {
    let want = workload::discovery_labels(agent);
    let have = agent.labels();
    let stale = have
        .keys()
        .any(|k| k.starts_with(CAPABILITY_PREFIX) && !want.contains_key(k));
    if !stale && want.iter().all(|(k, v)| have.get(k) == Some(v)) {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": Agent::api_version(&()),
        "kind": Agent::kind(&()),
        "metadata": {"name": agent.name_any(), "labels": want},
    });
    let api: Api<Agent> = Api::namespaced(ctx.client.clone(), ns);
    api.patch(
        &agent.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}
