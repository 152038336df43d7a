//! The first step of every pass over a live Agent: our finalizer and the discovery labels, in
//! one server-side apply (skipped when both are already there).
//!
//! One write instead of two (a finalizer patch, then a label apply), and the pass goes on with
//! the Agent the apiserver returned instead of ending and waiting for the finalizer to come
//! back through the watch: the finalizer is stored before anything outside Kubernetes is
//! created, which is all kube's finalizer helper needs (it then sees it and runs the apply).

use std::sync::Arc;

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};

use crate::controller::watched::Watched;
use crate::controller::{Context, OwnWrite};
use crate::crd::Agent;
use crate::keys::{CAPABILITY_PREFIX, FINALIZER, MANAGER};
use crate::workload;

/// Whether the Agent lacks our finalizer or carries discovery labels other than the ones
/// its capabilities call for.
pub fn needs_apply(agent: &Agent) -> bool {
    if !agent.finalizers().iter().any(|f| f == FINALIZER) {
        return true;
    }
    let want = workload::discovery_labels(agent);
    let have = agent.labels();
    let stale = have
        .keys()
        .any(|k| k.starts_with(CAPABILITY_PREFIX) && !want.contains_key(k));
    stale || !want.iter().all(|(k, v)| have.get(k) == Some(v))
}

/// The apply body: everything we own in the Agent's metadata. The finalizer must be in every
/// apply, or server-side apply would remove it as a field we stopped setting.
pub fn desired(agent: &Agent) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": Agent::api_version(&()),
        "kind": Agent::kind(&()),
        "metadata": {
            "name": agent.name_any(),
            "finalizers": [FINALIZER],
            "labels": workload::discovery_labels(agent),
        },
    })
}

/// Puts the finalizer and the labels on a live (not deleting) Agent. Returns the Agent to
/// reconcile (the apiserver's answer when it wrote, else the one it was given), or None when
/// the watch cache has not caught up with this very write yet: the pass is then better run
/// again shortly over the newer Agent than over a stale one.
pub async fn ensure(
    agent: Arc<Agent>,
    api: &Api<Watched>,
    ctx: &Context,
) -> Result<Option<Arc<Agent>>, kube::Error> {
    if agent.meta().deletion_timestamp.is_some() || !needs_apply(&agent) {
        return Ok(Some(agent));
    }
    let body = desired(&agent);
    if ctx.in_flight(OwnWrite::Metadata, &agent, &body) {
        return Ok(None);
    }
    let patched = api
        .patch(
            &agent.name_any(),
            // force: labels of dropped capabilities are ours to remove, whoever touched them.
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    ctx.wrote(OwnWrite::Metadata, &agent, &body);
    // The answer as the watch cache would hold it (without managedFields).
    match patched.0.0 {
        Ok(patched) => Ok(Some(Arc::new(patched))),
        Err(invalid) => Err(kube::Error::SerdeError(serde::de::Error::custom(
            invalid.error,
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::AgentSpec;

    fn agent(capabilities: &[&str]) -> Agent {
        let spec: AgentSpec = serde_json::from_value(serde_json::json!({
            "capabilities": capabilities,
            "template": {"image": "img:1"},
        }))
        .unwrap();
        let mut a = Agent::new("a", spec);
        a.metadata.namespace = Some("ns".into());
        a
    }

    #[test]
    fn an_agent_without_the_finalizer_or_with_stale_labels_needs_the_apply() {
        let mut a = agent(&["search"]);
        assert!(needs_apply(&a), "no finalizer, no labels");
        a.metadata.finalizers = Some(vec![FINALIZER.into()]);
        assert!(needs_apply(&a), "finalizer, no labels");
        a.metadata.labels = Some(workload::discovery_labels(&a));
        assert!(!needs_apply(&a), "both there");
        a.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(format!("{CAPABILITY_PREFIX}dropped"), String::new());
        assert!(
            needs_apply(&a),
            "a dropped capability's label is still there"
        );
        a.metadata.labels = Some(workload::discovery_labels(&a));
        a.metadata.finalizers = Some(vec!["other.example/f".into()]);
        assert!(needs_apply(&a), "someone else's finalizer only");
    }

    #[test]
    fn every_apply_carries_the_finalizer_and_the_capability_labels() {
        let a = agent(&["search", "code"]);
        let body = desired(&a);
        assert_eq!(
            body["metadata"]["finalizers"],
            serde_json::json!([FINALIZER])
        );
        let labels = body["metadata"]["labels"].as_object().unwrap();
        assert!(labels.contains_key(&format!("{CAPABILITY_PREFIX}search")));
        assert!(labels.contains_key(&format!("{CAPABILITY_PREFIX}code")));
        assert_eq!(labels[crate::keys::AGENT_LABEL], "a");
    }
}
