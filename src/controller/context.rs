//! What every reconcile shares: the client, the Event recorder, metrics, the identity
//! authority, the watch caches, the applied-object cache and the per-Agent backoff.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use kube::api::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};

use super::Config;
use crate::crd::{Agent, AgentStatus};
use crate::identity::authority::Authority;
use crate::keys::MANAGER;
use crate::telemetry::Metrics;

/// Watch caches of the objects the controller creates for Agents, and of the namespaces'
/// permission policies.
pub struct ChildStores {
    /// Namespaces as metadata, trimmed to the permission-policy annotation.
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub deployments: Store<Deployment>,
    pub statefulsets: Store<StatefulSet>,
    pub services: Store<Service>,
    pub service_accounts: Store<ServiceAccount>,
}

/// What we last applied to a child: the desired content's hash and the object's version after.
#[derive(Clone, Debug)]
pub struct Applied {
    pub hash: u64,
    pub generation: Option<i64>,
    pub resource_version: Option<String>,
}

/// Shared state handed to every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub config: Config,
    pub authority: Arc<Authority>,
    pub stores: ChildStores,
    /// Redis messaging (None: the controller runs without `--redis-url`).
    pub messaging: Option<Arc<super::messaging::Messaging>>,
    applied: std::sync::Mutex<HashMap<String, Applied>>,
    /// Consecutive transient failures per object, for exponential backoff.
    failures: std::sync::Mutex<HashMap<String, u32>>,
    /// Per Agent uid: the resourceVersion a pass saw when it wrote the status, and a hash of
    /// what it wrote. Until the watch cache shows a newer Agent, a pass that computes the same
    /// status skips the write instead of repeating it.
    statuses: std::sync::Mutex<HashMap<String, (String, u64)>>,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        config: Config,
        authority: Arc<Authority>,
        stores: ChildStores,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: Some(config.replica.clone()),
            },
        );
        Self {
            client,
            recorder,
            metrics,
            config,
            authority,
            stores,
            messaging: None,
            applied: Default::default(),
            failures: Default::default(),
            statuses: Default::default(),
        }
    }

    pub fn with_messaging(mut self, messaging: Option<Arc<super::messaging::Messaging>>) -> Self {
        self.messaging = messaging;
        self
    }

    /// Records one more failure of `key` and returns the delay before the next try:
    /// 1s doubling to 5 minutes, with ±20% jitter so a fleet of failures does not retry in lockstep.
    pub(crate) fn next_backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        backoff_delay(*n, rand::random::<f64>())
    }

    pub(crate) fn applied(&self, key: &str) -> Option<Applied> {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    pub(crate) fn record_applied(&self, key: String, applied: Applied) {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, applied);
    }

    /// The status a pass over `agent` (as cached) just wrote.
    pub(crate) fn status_written(&self, agent: &Agent, status: &AgentStatus) {
        let (Some(uid), Some(rv)) = (agent.uid(), agent.resource_version()) else {
            return;
        };
        self.statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid, (rv, super::content_hash(status)));
    }

    /// Whether `status` is what a pass wrote over this very version of the Agent: the write
    /// is on its way to the watch cache, and writing it again would only cost a request. Once
    /// the cache shows any newer version, the cached status is compared as usual (so a status
    /// someone else changed is still put back).
    pub(crate) fn status_in_flight(&self, agent: &Agent, status: &AgentStatus) -> bool {
        let (Some(uid), Some(rv)) = (agent.uid(), agent.resource_version()) else {
            return false;
        };
        self.statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&uid)
            .is_some_and(|(seen, hash)| *seen == rv && *hash == super::content_hash(status))
    }

    /// Drops what the applied-object cache knows of an Agent's children (on deletion), so a
    /// fleet that comes and goes does not grow it forever.
    pub(crate) fn forget_applied(&self, namespace: &str, name: &str) {
        let suffix = format!("/{namespace}/{name}");
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|key, _| !key.ends_with(&suffix));
    }

    /// Forgets an Agent's last status write (on deletion).
    pub(crate) fn forget_status(&self, uid: &str) {
        self.statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
    }

    pub(crate) fn clear_backoff(&self, key: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(key);
    }
}

/// The delay after `attempt` consecutive failures; `jitter` in [0, 1) spreads it by ±20%.
pub fn backoff_delay(attempt: u32, jitter: f64) -> Duration {
    let base = 1.0_f64 * 2f64.powi(attempt.saturating_sub(1).min(16) as i32);
    let capped = base.min(300.0);
    Duration::from_secs_f64(capped * (0.8 + 0.4 * jitter.clamp(0.0, 1.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        assert_eq!(backoff_delay(1, 0.5), Duration::from_secs(1));
        assert_eq!(backoff_delay(2, 0.5), Duration::from_secs(2));
        assert_eq!(backoff_delay(4, 0.5), Duration::from_secs(8));
        assert_eq!(backoff_delay(30, 0.5), Duration::from_secs(300));
        assert_eq!(backoff_delay(30, 0.0), Duration::from_secs(240));
        assert_eq!(backoff_delay(30, 1.0), Duration::from_secs(360));
    }
}
