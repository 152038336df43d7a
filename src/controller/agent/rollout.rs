//! The rollout step of the Agent pipeline: server-side apply the objects `crate::workload`
//! builds (never over an object the Agent did not create) and report readiness from the
//! rollout. The Agent's own discovery labels are put on by `metadata`.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Service;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::report::Report;
use crate::controller::context::Cached;
use crate::controller::error::refused_as_invalid;
use crate::controller::{Applied, Context, NameConflict, content_hash};
use crate::crd::{Agent, ValidatedSpec};
use crate::keys::conditions::WORKLOAD_READY;
use crate::keys::{MANAGER, reasons};
use crate::workload::{self, Live, MemoryPlan, Observed, Workload};

/// What failed while applying an Agent's workload.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    NameConflict(#[from] NameConflict),
    #[error("the Agent has no uid or namespace yet")]
    NotStored,
}

impl WorkloadError {
    /// Retrying cannot help until something changes (the apiserver refused what we built).
    pub fn is_permanent(&self) -> bool {
        matches!(self, WorkloadError::Kube(e) if refused_as_invalid(e))
    }

    /// The condition this failure leaves on the Agent (with the apiserver's message).
    pub fn report(&self) -> Report {
        let message = format!("could not apply the workload: {self}");
        match self {
            WorkloadError::NameConflict(_) => {
                Report::stalled(Some(WORKLOAD_READY), reasons::NAME_CONFLICT, message)
            }
            _ => Report::pending(WORKLOAD_READY, reasons::APPLY_FAILED, message),
        }
    }
}

/// How to tell that a live object changed since we applied it.
#[derive(Clone, Copy)]
enum Track {
    /// Spec edits bump `metadata.generation` (apps/v1); status updates do not.
    Generation,
    /// Any change moves `metadata.resourceVersion` (objects without a status).
    ResourceVersion,
}

/// Server-side applies `obj` unless the watch cache shows it exactly as we last applied it
/// (same desired content, untouched since). A no-op apply still costs the apiserver a full
/// managed-fields merge, and reconciles are frequent: skipping them keeps fleets cheap.
async fn apply<K>(
    ctx: &Context,
    cache: &Cached<K>,
    ns: &str,
    obj: &K,
    track: Track,
    uid: &str,
) -> Result<Live, WorkloadError>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + std::fmt::Debug
        + 'static,
{
    let name = obj.name_any();
    let kind = K::kind(&());
    let desired = content_hash(obj);
    // Read and applied as `Observed`: the answers decode to what a pass reads.
    let api: Api<Observed<K>> = Api::namespaced(ctx.client.clone(), ns);
    // Never adopt: an object of this name that the Agent did not create stays untouched. The
    // cache holds only objects labelled as ours; anything else needs one read to be sure. That
    // read also stands in for the cache when the cache has not yet seen an object a pass just
    // created (so it is not applied a second time).
    let live = match cache.live.get(ns, &name) {
        Some(cached) => Some(cached),
        None => api.get_opt(&name).await?.map(|o| o.live()),
    };
    if live.is_some_and(|l| !l.owned_by(uid)) {
        return Err(NameConflict::new(&K::kind(&()), &name).into());
    }
    if let Some(live) = live {
        let unchanged = ctx.applied(&kind, ns, &name).is_some_and(|a| {
            a.hash == desired
                && match track {
                    Track::Generation => a.generation.is_some() && live.generation == a.generation,
                    Track::ResourceVersion => {
                        a.resource_version.is_some() && live.resource_version == a.resource_version
                    }
                }
        });
        if unchanged {
            return Ok(live);
        }
    }
    // force: these objects are ours; a hand edit of a field we set is reverted.
    let applied = api
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?;
    cache.echoes.wrote(applied.meta().uid.as_deref(), &applied);
    let live = applied.live();
    ctx.record_applied(
        &kind,
        ns,
        &name,
        Applied {
            hash: desired,
            generation: live.generation,
            resource_version: live.resource_version,
        },
    );
    Ok(live)
}

/// Deletes the Agent's own Service when it is addressed the other way (a cluster IP where a
/// headless one is wanted, or the reverse: `--agent-service-cluster-ip` changed), so the apply
/// that follows creates it anew; a cluster IP cannot be added or removed in place.
async fn replace_if_other_addressing(
    ctx: &Context,
    ns: &str,
    name: &str,
    uid: &str,
) -> Result<(), WorkloadError> {
    let cache = &ctx.stores.services;
    let want_headless = !ctx.config.service_cluster_ip;
    let other = cache
        .live
        .get(ns, name)
        .and_then(|live| live.headless)
        .is_some_and(|headless| headless != want_headless);
    if other {
        tracing::info!(service = %format!("{ns}/{name}"), headless = want_headless, "replacing the Agent's Service: its cluster IP setting changed");
        delete_if_owned::<Service>(ctx, cache, ns, name, uid).await?;
    }
    Ok(())
}

/// Deletes the Agent's own `name` of kind K if the cache holds it (a 404 is success); an object
/// of that name the Agent does not own is left alone.
async fn delete_if_owned<K>(
    ctx: &Context,
    cache: &Cached<K>,
    ns: &str,
    name: &str,
    uid: &str,
) -> Result<(), WorkloadError>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + 'static,
{
    let owned = cache
        .live
        .get(ns, name)
        .is_some_and(|live| live.owned_by(uid));
    if !owned {
        return Ok(());
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub async fn step(
    agent: &Agent,
    spec: &ValidatedSpec,
    plan: &MemoryPlan,
    identity_secret: &str,
    ctx: &Context,
) -> Result<Report, WorkloadError> {
    let (ns, uid) = agent
        .namespace()
        .zip(agent.uid())
        .ok_or(WorkloadError::NotStored)?;
    let stores = &ctx.stores;
    let track = Track::ResourceVersion;
    let sa = workload::service_account(agent);
    apply(ctx, &stores.service_accounts, &ns, &sa, track, &uid).await?;
    let service = workload::service(agent, ctx.config.service_cluster_ip);
    replace_if_other_addressing(ctx, &ns, &service.name_any(), &uid).await?;
    apply(ctx, &stores.services, &ns, &service, track, &uid).await?;
    let name = agent.name_any();
    let (ready, message) = match workload::workload(
        agent,
        spec,
        plan,
        identity_secret,
        ctx.config.sidecar.as_ref(),
    ) {
        Workload::Deployment(d) => {
            // Switching from persistent state back: the StatefulSet goes.
            delete_if_owned::<StatefulSet>(ctx, &stores.statefulsets, &ns, &name, &uid).await?;
            let applied = apply(
                ctx,
                &stores.deployments,
                &ns,
                d.as_ref(),
                Track::Generation,
                &uid,
            )
            .await?;
            applied.rollout("Deployment")
        }
        Workload::StatefulSet(s) => {
            delete_if_owned::<Deployment>(ctx, &stores.deployments, &ns, &name, &uid).await?;
            let applied = apply(
                ctx,
                &stores.statefulsets,
                &ns,
                s.as_ref(),
                Track::Generation,
                &uid,
            )
            .await?;
            applied.rollout("StatefulSet")
        }
    };
    Ok(if ready {
        Report::ok(WORKLOAD_READY, reasons::AVAILABLE, message)
    } else {
        Report::pending(WORKLOAD_READY, reasons::ROLLING_OUT, message)
    })
}
