//! What every reconcile shares: the client, the Event recorder, metrics, the identity
//! authority, the watch caches, the applied-object cache and the per-Agent backoff.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PartialObjectMeta;
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};

use super::Config;
use crate::crd::Agent;
use crate::identity::authority::Authority;
use crate::keys::MANAGER;
use crate::telemetry::Metrics;
use crate::workload::{Live, Observed};

/// Watch caches of the objects the controller creates for Agents, and of the namespaces'
/// permission policies.
pub struct ChildStores {
    /// Namespaces as metadata, trimmed to the permission-policy annotation.
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub deployments: Cached<Deployment>,
    pub statefulsets: Cached<StatefulSet>,
    pub services: Cached<Service>,
    pub service_accounts: Cached<ServiceAccount>,
    /// Identity Secrets are not cached (their keys stay out of the controller's memory); only
    /// the versions of them that are news.
    pub secrets: Echoes<ObjectMeta>,
}

/// A child kind's watch cache (what a pass reads of each object, as [`Live`]), and which of
/// its versions are news to the controller.
pub struct Cached<K: Resource<DynamicType = ()> + 'static> {
    pub live: LiveIndex,
    pub echoes: Echoes<Observed<K>>,
}

/// The watch cache of one child kind: per object (`namespace/name`), its [`Live`] form. A
/// reflector's store would keep each object with a key of four strings (~1.2 KiB a child as
/// [`Observed`]); this keeps ~100 bytes, for the 30,000–40,000 children of 10,000 Agents.
#[derive(Clone, Default)]
pub struct LiveIndex {
    objects: Arc<std::sync::RwLock<HashMap<Box<str>, Live>>>,
}

impl LiveIndex {
    fn key(namespace: &str, name: &str) -> Box<str> {
        format!("{namespace}/{name}").into_boxed_str()
    }

    /// The cached `namespace`/`name`, if the watch has seen it.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Live> {
        let objects = self.objects.read().unwrap_or_else(|p| p.into_inner());
        objects.get(&Self::key(namespace, name)).copied()
    }

    /// What keeps the index in step with the watch (its only writer).
    pub fn writer(&self) -> LiveWriter {
        LiveWriter {
            index: self.clone(),
            relist: None,
        }
    }
}

/// Applies watch events to a [`LiveIndex`] as kube's reflector does to its store: a relist
/// (after the watch is lost) is gathered apart and then replaces the whole index, so objects
/// deleted while the watch was down leave it.
pub struct LiveWriter {
    index: LiveIndex,
    relist: Option<HashMap<Box<str>, Live>>,
}

impl LiveWriter {
    pub fn apply<K>(&mut self, event: &kube::runtime::watcher::Event<Observed<K>>) {
        use kube::runtime::watcher::Event;
        let key = |o: &Observed<K>| {
            let m = &o.metadata;
            LiveIndex::key(
                m.namespace.as_deref().unwrap_or(""),
                m.name.as_deref().unwrap_or(""),
            )
        };
        let write = || {
            self.index
                .objects
                .write()
                .unwrap_or_else(|p| p.into_inner())
        };
        match event {
            Event::Apply(o) => {
                write().insert(key(o), o.live());
            }
            Event::Delete(o) => {
                write().remove(&key(o));
            }
            Event::Init => self.relist = Some(HashMap::new()),
            Event::InitApply(o) => {
                self.relist.get_or_insert_default().insert(key(o), o.live());
            }
            Event::InitDone => {
                let relisted = self.relist.take().unwrap_or_default();
                *write() = relisted;
            }
        }
    }
}

/// Which versions of one kind of child should trigger a pass of the owning Agent: per object
/// (its uid, hashed), the trigger value (the part a pass acts on) of the last version the
/// controller saw or wrote itself. The watch event of our own write then triggers nothing; a
/// change by anyone else (or a step of a rollout that matters) still does.
pub struct Echoes<K> {
    seen: Arc<std::sync::Mutex<HashMap<u64, u64>>>,
    trigger: fn(&K) -> u64,
}

impl<K> Clone for Echoes<K> {
    fn clone(&self) -> Self {
        Self {
            seen: self.seen.clone(),
            trigger: self.trigger,
        }
    }
}

impl<K> Echoes<K> {
    pub fn new(trigger: fn(&K) -> u64) -> Self {
        Self {
            seen: Default::default(),
            trigger,
        }
    }

    /// Whether this version of the object (with uid `uid`) differs, in what a pass acts on,
    /// from the last one seen or written; remembers it.
    pub fn is_news(&self, uid: Option<&str>, obj: &K) -> bool {
        let value = (self.trigger)(obj);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.insert(super::hash_of(uid), value) != Some(value)
    }

    /// The object is gone.
    pub fn forget(&self, uid: Option<&str>) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.remove(&super::hash_of(uid));
    }

    /// The controller just wrote this version (the apiserver's answer): its watch event is
    /// not news.
    pub fn wrote(&self, uid: Option<&str>, obj: &K) {
        let _ = self.is_news(uid, obj);
    }
}

/// What we last applied to a child: the desired content's hash and the object's version after
/// (its resourceVersion hashed: 32 bytes an entry, three or four entries an Agent).
#[derive(Clone, Debug)]
pub struct Applied {
    pub hash: u64,
    pub generation: Option<i64>,
    pub resource_version: Option<u64>,
}

impl Applied {
    /// The applied-object cache's form of a resourceVersion.
    pub fn version(resource_version: Option<&str>) -> Option<u64> {
        resource_version.map(super::hash_of)
    }
}

/// The kinds of child in the applied-object cache (what `forget_applied` drops).
const APPLIED_KINDS: [&str; 4] = ["ServiceAccount", "Service", "Deployment", "StatefulSet"];

fn applied_key(kind: &str, namespace: &str, name: &str) -> u64 {
    super::hash_of((kind, namespace, name))
}

/// The writes a pass makes to the Agent itself, remembered until the watch cache shows them.
#[derive(Clone, Copy, Hash)]
pub enum OwnWrite {
    /// The status (server-side apply on the status subresource).
    Status,
    /// The finalizer and discovery labels (`agent::metadata`).
    Metadata,
}

/// Shared state handed to every reconcile.
pub struct Context {
    pub client: Client,
    /// Folds repeats of an Event into one Event's series; kube keeps every Event it published
    /// for 6 minutes to do so. See [`Context::recorder_for`].
    pub recorder: Recorder,
    reporter: Reporter,
    pub metrics: Arc<Metrics>,
    pub config: Config,
    pub authority: Arc<Authority>,
    pub stores: ChildStores,
    /// Redis messaging (None: the controller runs without `--redis-url`).
    pub messaging: Option<Arc<super::messaging::Messaging>>,
    applied: std::sync::Mutex<HashMap<u64, Applied>>,
    /// Consecutive transient failures per object, for exponential backoff.
    failures: std::sync::Mutex<HashMap<String, u32>>,
    /// Per Agent uid and kind of write (hashed): the resourceVersion a pass saw when it wrote
    /// to the Agent, and a hash of what it wrote (hashes: 24 bytes an entry at 10,000 Agents).
    /// Until the watch cache shows a newer Agent, a pass that computes the same write skips
    /// it instead of repeating it.
    own_writes: std::sync::Mutex<HashMap<u64, (u64, u64)>>,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        config: Config,
        authority: Arc<Authority>,
        stores: ChildStores,
    ) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: Some(config.replica.clone()),
        };
        let recorder = Recorder::new(client.clone(), reporter.clone());
        Self {
            client,
            recorder,
            reporter,
            metrics,
            config,
            authority,
            stores,
            messaging: None,
            applied: Default::default(),
            failures: Default::default(),
            own_writes: Default::default(),
        }
    }

    /// The recorder for an Event of `type_`: Warnings (which repeat while a problem lasts) go
    /// through the shared one, which folds repeats; one-off Normal Events (a certificate
    /// issued, revoked, an Agent cleaned up) through a fresh one, so a fleet's worth of them
    /// is not held in memory for 6 minutes (a few KiB each, for 10,000 Agents created at once).
    pub(crate) fn recorder_for(&self, type_: EventType) -> Recorder {
        match type_ {
            EventType::Warning => self.recorder.clone(),
            EventType::Normal => Recorder::new(self.client.clone(), self.reporter.clone()),
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

    /// What we last applied to the child `kind` `namespace`/`name`.
    pub(crate) fn applied(&self, kind: &str, namespace: &str, name: &str) -> Option<Applied> {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&applied_key(kind, namespace, name))
            .cloned()
    }

    pub(crate) fn record_applied(&self, kind: &str, namespace: &str, name: &str, a: Applied) {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(applied_key(kind, namespace, name), a);
    }

    /// Records that a pass over `agent` (as cached) just wrote `what` with content `written`.
    pub(crate) fn wrote<T: serde::Serialize>(&self, what: OwnWrite, agent: &Agent, written: &T) {
        let (Some(uid), Some(rv)) = (agent.uid(), agent.resource_version()) else {
            return;
        };
        self.own_writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                super::hash_of((&uid, what)),
                (super::hash_of(&rv), super::content_hash(written)),
            );
    }

    /// Whether `desired` is what a pass wrote over this very version of the Agent: the write
    /// is on its way to the watch cache, and writing it again would only cost a request. Once
    /// the cache shows any newer version, the cached Agent is compared as usual (so what
    /// someone else changed is still put back).
    pub(crate) fn in_flight<T: serde::Serialize>(
        &self,
        what: OwnWrite,
        agent: &Agent,
        desired: &T,
    ) -> bool {
        let (Some(uid), Some(rv)) = (agent.uid(), agent.resource_version()) else {
            return false;
        };
        self.own_writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&super::hash_of((&uid, what)))
            .is_some_and(|&(seen, hash)| {
                seen == super::hash_of(&rv) && hash == super::content_hash(desired)
            })
    }

    /// Drops what the applied-object cache knows of an Agent's children (on deletion), so a
    /// fleet that comes and goes does not grow it forever.
    pub(crate) fn forget_applied(&self, namespace: &str, name: &str) {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        for kind in APPLIED_KINDS {
            applied.remove(&applied_key(kind, namespace, name));
        }
    }

    /// Forgets an Agent's last own writes (on deletion).
    pub(crate) fn forget_writes(&self, uid: &str) {
        let mut writes = self.own_writes.lock().unwrap_or_else(|p| p.into_inner());
        for what in [OwnWrite::Status, OwnWrite::Metadata] {
            writes.remove(&super::hash_of((uid, what)));
        }
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

    /// The index follows the watch as a reflector's store does: applies and deletes one by
    /// one, and a relist replaces it whole (what was deleted while the watch was down goes).
    #[test]
    fn the_live_index_follows_the_watch_and_relists() {
        use k8s_openapi::api::core::v1::Service;
        use kube::runtime::watcher::Event;
        let service = |name: &str, rv: &str| -> Observed<Service> {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv}
            }))
            .unwrap()
        };
        let index = LiveIndex::default();
        let mut writer = index.writer();
        let version = |name: &str| index.get("ns", name).and_then(|l| l.resource_version);
        writer.apply(&Event::Apply(service("a", "1")));
        writer.apply(&Event::Apply(service("b", "2")));
        writer.apply(&Event::Apply(service("a", "3")));
        assert_eq!(version("a"), Some(super::super::hash_of("3")));
        assert!(index.get("other", "a").is_none());
        writer.apply(&Event::Delete(service("b", "4")));
        assert!(index.get("ns", "b").is_none());
        // A relist: until it is done the old view stands; then only what was listed is left.
        writer.apply(&Event::Apply(service("c", "5")));
        writer.apply::<Service>(&Event::Init);
        writer.apply(&Event::InitApply(service("a", "6")));
        assert_eq!(version("a"), Some(super::super::hash_of("3")));
        writer.apply::<Service>(&Event::InitDone);
        assert_eq!(version("a"), Some(super::super::hash_of("6")));
        assert!(index.get("ns", "c").is_none());
    }

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
