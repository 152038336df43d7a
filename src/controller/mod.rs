//! The controller process: leader election on a Lease, the Agent reconciler, the ops endpoint and
//! graceful shutdown. One file per reconciler; this file wires them together.

pub mod agent;
pub mod conditions;
pub mod identity;
pub mod workload;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use futures::TryStreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Namespace, Secret, Service, ServiceAccount};
use kube::api::{ApiResource, DynamicObject, PartialObjectMeta, TypeMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, controller::Action, watcher};
use kube::{Api, Client, core::DeserializeGuard};
use kube_lease_manager::LeaseManagerBuilder;
use tokio_util::sync::CancellationToken;

use crate::api::ops;
use crate::crd::Agent;
use crate::identity::authority::{Authority, AuthorityConfig};
use crate::telemetry::{ErrorLabels, Metrics};

/// The field manager for every server-side apply, and the Event reporter name.
pub const MANAGER: &str = "agentry";
/// The finalizer that guards state kept outside Kubernetes (CA ledger, Redis users, S3 objects).
pub const FINALIZER: &str = "agentry.dev/cleanup";

/// How the controller process is run (from `agentry controller` flags).
#[derive(Clone, Debug)]
pub struct Config {
    /// Reconcile Agents only in this namespace (sharding, tests); all namespaces when None.
    pub watch_namespace: Option<String>,
    /// Reconcile only Agents matching this label selector (sharding, tests).
    pub agent_selector: Option<String>,
    /// The controller's own namespace: its Lease, CA Secret and published ConfigMaps.
    pub namespace: String,
    pub lease_name: String,
    pub lease_duration: Duration,
    /// This replica's name in the Lease.
    pub replica: String,
    pub ops_addr: SocketAddr,
    /// Where the SQLite ledger lives.
    pub data_dir: PathBuf,
    /// How often the leader checks signing-key age, CA rotation steps and the CRL.
    pub maintenance_interval: Duration,
    /// Agents reconciled at once (0: unbounded).
    pub concurrency: u16,
    /// The CA, ledger, token keys and what they publish.
    pub authority: AuthorityConfig,
}

/// Watch caches of the objects the controller creates for Agents, and of the namespaces'
/// permission policies.
pub struct ChildStores {
    /// Namespaces as metadata, trimmed to the permission-policy annotation.
    pub namespaces: NamespaceStore,
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
    applied: std::sync::Mutex<HashMap<String, Applied>>,
    /// Consecutive transient failures per object, for exponential backoff.
    failures: std::sync::Mutex<HashMap<String, u32>>,
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
            applied: Default::default(),
            failures: Default::default(),
        }
    }

    /// Records one more failure of `key` and returns the delay before the next try:
    /// 1s doubling to 5 minutes, with ±20% jitter so a fleet of failures does not retry in lockstep.
    fn next_backoff(&self, key: &str) -> Duration {
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

    fn clear_backoff(&self, key: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(key);
    }
}

/// Whether an object belongs to the Agent with `uid` (an owner reference to it). Objects that
/// do not are never applied over, deleted or read as the Agent's.
pub(crate) fn owned_by(meta: &kube::api::ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

/// The delay after `attempt` consecutive failures; `jitter` in [0, 1) spreads it by ±20%.
pub fn backoff_delay(attempt: u32, jitter: f64) -> Duration {
    let base = 1.0_f64 * 2f64.powi(attempt.saturating_sub(1).min(16) as i32);
    let capped = base.min(300.0);
    Duration::from_secs_f64(capped * (0.8 + 0.4 * jitter.clamp(0.0, 1.0)))
}

/// Errors of one reconcile. Each says what failed; `is_permanent` decides between a condition that
/// waits for a spec change and a retry with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("object has no namespace")]
    MissingNamespace,
    #[error("identity: {0}")]
    Identity(String),
    #[error("certificate ledger: {0}")]
    Ledger(#[from] crate::identity::store::StoreError),
    #[error(transparent)]
    Authority(#[from] crate::identity::authority::AuthorityError),
    #[error(
        "{kind} {name} already exists and was not created by this Agent; it is left untouched: \
         rename the Agent, or delete the {kind} if it is no longer needed"
    )]
    NameConflict { kind: String, name: String },
}

impl Error {
    pub fn identity(e: impl std::fmt::Display) -> Self {
        Error::Identity(e.to_string())
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.kind(),
                _ => "finalizer",
            },
            Error::MissingNamespace => "missing_namespace",
            Error::Identity(_) => "identity",
            Error::Ledger(_) => "ledger",
            Error::Authority(_) => "authority",
            Error::NameConflict { .. } => "name_conflict",
        }
    }

    /// True when retrying cannot help until someone changes the object (the apiserver refused what
    /// we built as invalid, or the request was malformed).
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Kube(kube::Error::Api(status)) => status.code == 400 || status.code == 422,
            Error::Kube(_) => false,
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.is_permanent(),
                _ => false,
            },
            Error::MissingNamespace => true,
            // A conflicting object may be deleted at any time, and that deletion does not
            // trigger this Agent: retry with backoff.
            Error::Identity(_)
            | Error::Ledger(_)
            | Error::Authority(_)
            | Error::NameConflict { .. } => false,
        }
    }
}

fn error_policy(guard: Arc<DeserializeGuard<Agent>>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = guard_key(&guard);
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels { kind: error.kind() })
        .inc();
    if error.is_permanent() {
        tracing::warn!(agent = %key, error = %error, "permanent error; waiting for a change to the Agent");
        return Action::await_change();
    }
    let delay = ctx.next_backoff(&key);
    tracing::warn!(agent = %key, error = %error, retry_in = ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

fn guard_key(guard: &DeserializeGuard<Agent>) -> String {
    let meta = match &guard.0 {
        Ok(a) => &a.metadata,
        Err(invalid) => &invalid.metadata,
    };
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs the controller until SIGTERM (exit 0) or until leadership is lost (error: the process
/// exits and restarts as a standby, so two replicas never write at once).
pub async fn run(config: Config) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (set KUBECONFIG or run in a pod)")?;
    let metrics = Arc::new(Metrics::default());
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutdown signal received");
            shutdown.cancel();
        });
    }

    let ready = Arc::new(AtomicBool::new(false));
    let (ops_addr, ops_task) = ops::serve(
        config.ops_addr,
        ops::OpsState {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
        shutdown.clone(),
    )
    .await
    .with_context(|| format!("binding the ops endpoint on {}", config.ops_addr))?;
    tracing::info!(addr = %ops_addr, "serving /metrics, /healthz and /readyz");

    let lease_secs = config.lease_duration.as_secs().max(2);
    let manager = LeaseManagerBuilder::new(client.clone(), &config.lease_name)
        .with_namespace(&config.namespace)
        .with_identity(&config.replica)
        .with_duration(lease_secs)
        .with_grace((lease_secs / 3).max(1))
        .with_field_manager(format!("{MANAGER}-lease-{}", config.replica))
        .build()
        .await
        .with_context(|| {
            format!(
                "preparing leader election on Lease {}/{} (does namespace {} exist?)",
                config.namespace, config.lease_name, config.namespace
            )
        })?;
    let (mut leading, lease_task) = manager.watch().await;
    ready.store(true, Ordering::Relaxed);
    tracing::info!(replica = %config.replica, lease = %config.lease_name, "waiting to become leader");

    // Wait for leadership or shutdown.
    let became_leader = tokio::select! {
        _ = shutdown.cancelled() => false,
        r = leading.wait_for(|l| *l) => r.is_ok(),
    };
    if !became_leader {
        drop(leading);
        let _ = lease_task.await;
        let _ = ops_task.await;
        return Ok(());
    }
    tracing::info!(replica = %config.replica, "became leader; starting reconcilers");
    metrics.leader.set(1);

    // Stop the controller on shutdown or on loss of leadership.
    let stop = CancellationToken::new();
    let lost_leadership = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let shutdown = shutdown.clone();
        let lost = lost_leadership.clone();
        let mut leading = leading.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {},
                _ = leading.wait_for(|l| !*l) => {
                    tracing::error!("lost the leader lease; stopping reconcilers");
                    lost.store(true, Ordering::SeqCst);
                },
            }
            stop.cancel();
        });
    }

    // Only the leader touches the CA, the ledger and the signing keys.
    let authority = tokio::select! {
        a = Authority::bootstrap(&client, config.authority.clone()) => a,
        _ = stop.cancelled() => {
            drop(leading);
            let _ = lease_task.await;
            shutdown.cancel();
            let _ = ops_task.await;
            return Ok(());
        }
    };
    let (authority, trust_changed) = match authority {
        Ok((a, changed)) => (Arc::new(a), changed),
        Err(e) => {
            shutdown.cancel();
            drop(leading);
            let _ = lease_task.await;
            let _ = ops_task.await;
            return Err(anyhow::Error::new(e).context("starting the identity authority"));
        }
    };
    tracing::info!(
        ca = %authority.ca().fingerprint(),
        kid = %authority.tokens().active_key().kid,
        "identity authority ready"
    );
    let maintenance = tokio::spawn(maintain_authority(
        client.clone(),
        authority.clone(),
        config.maintenance_interval,
        stop.clone(),
    ));

    let ns = &config.watch_namespace;
    // The caches keep what the reconcile reads (metadata versions, rollout status), not the pod
    // templates: a fleet's worth of full Deployments would be most of our memory.
    let (deployments, deployment_events) = child_watch::<Deployment>(&client, ns, |d| {
        if let Some(spec) = d.spec.as_mut() {
            spec.template = Default::default();
        }
    });
    let (statefulsets, statefulset_events) = child_watch::<StatefulSet>(&client, ns, |s| {
        if let Some(spec) = s.spec.as_mut() {
            spec.template = Default::default();
            spec.volume_claim_templates = None;
        }
    });
    let (services, service_events) = child_watch::<Service>(&client, ns, |_| {});
    let (service_accounts, service_account_events) =
        child_watch::<ServiceAccount>(&client, ns, |_| {});
    let (namespaces, namespace_events) = namespace_watch(&client, ns);
    let stores = ChildStores {
        namespaces,
        deployments,
        statefulsets,
        services,
        service_accounts,
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        config.clone(),
        authority,
        stores,
    ));
    let children = [
        deployment_events,
        statefulset_events,
        service_events,
        service_account_events,
    ];
    run_agent_controller(ctx, children, namespace_events, trust_changed, stop.clone()).await;
    maintenance.abort();

    metrics.leader.set(0);
    shutdown.cancel();
    // Dropping the receiver makes the lease task release the Lease, so a standby takes over at once.
    drop(leading);
    let _ = lease_task.await;
    let _ = ops_task.await;
    if lost_leadership.load(Ordering::SeqCst) {
        anyhow::bail!("lost the leader lease; exiting so this replica restarts as a standby");
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Every `interval`: rotates the token signing key when due, takes the next CA rotation step,
/// and re-signs the CRL.
async fn maintain_authority(
    client: Client,
    authority: Arc<Authority>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_secs(1)));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                if let Err(e) = authority.maintain(&client).await {
                    tracing::warn!(error = %e, "identity upkeep failed; retrying at the next interval");
                }
            }
        }
    }
}

/// Only what we manage: never list every Secret (or Deployment) in the cluster.
fn managed() -> watcher::Config {
    watcher::Config::default().labels("app.kubernetes.io/managed-by=agentry")
}

fn scoped<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn dynamic_type<K: kube::Resource<DynamicType = ()>>() -> ApiResource {
    ApiResource::erase::<K>(&())
}

/// A watch cache of one child kind, and its stream of changes (as metadata, for the owner
/// lookup) that triggers reconciles of the owning Agent.
fn child_watch<K>(
    client: &Client,
    ns: &Option<String>,
    trim: fn(&mut K),
) -> (
    Store<K>,
    BoxStream<'static, Result<PartialObjectMeta<DynamicObject>, watcher::Error>>,
)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher::watcher(scoped::<K>(client, ns), managed())
        .default_backoff()
        .modify(move |obj: &mut K| {
            obj.meta_mut().managed_fields = None;
            obj.meta_mut().annotations = None;
            trim(obj);
        })
        .reflect(writer)
        .touched_objects()
        .map_ok(|obj: K| PartialObjectMeta::<DynamicObject> {
            types: Some(TypeMeta {
                api_version: K::api_version(&()).into(),
                kind: K::kind(&()).into(),
            }),
            metadata: obj.meta().clone(),
            _phantom: Default::default(),
        })
        .boxed();
    (store, stream)
}

type NamespaceStore = Store<PartialObjectMeta<Namespace>>;
type NamespaceEvents = BoxStream<'static, Result<PartialObjectMeta<Namespace>, watcher::Error>>;

/// A watch cache of the namespaces whose Agents we reconcile, trimmed to the permission-policy
/// annotation, and its stream of policy changes.
fn namespace_watch(client: &Client, ns: &Option<String>) -> (NamespaceStore, NamespaceEvents) {
    use crate::identity::scopes::ALLOWED_PERMISSIONS_ANNOTATION;
    use kube::runtime::predicates;
    // One namespace: a field selector, so RBAC can limit the controller to that name.
    let config = match ns {
        Some(ns) => watcher::Config::default().fields(&format!("metadata.name={ns}")),
        None => watcher::Config::default(),
    };
    let (store, writer) = reflector::store();
    let namespaces: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
    let stream = watcher::watcher(namespaces, config)
        .default_backoff()
        .modify(|m: &mut PartialObjectMeta<Namespace>| {
            let policy = m
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ALLOWED_PERMISSIONS_ANNOTATION).cloned());
            m.metadata.managed_fields = None;
            m.metadata.labels = None;
            m.metadata.annotations =
                policy.map(|p| [(ALLOWED_PERMISSIONS_ANNOTATION.to_string(), p)].into());
        })
        .reflect(writer)
        .touched_objects()
        .predicate_filter(predicates::annotations, Default::default())
        .boxed();
    (store, stream)
}

/// The Agent controller: watches Agents (guarded, so one undecodable object cannot stop the
/// stream) and the children it owns, until `stop` fires.
async fn run_agent_controller(
    ctx: Arc<Context>,
    children: [BoxStream<'static, Result<PartialObjectMeta<DynamicObject>, watcher::Error>>; 4],
    namespace_events: NamespaceEvents,
    trust_changed: futures::channel::mpsc::UnboundedReceiver<()>,
    stop: CancellationToken,
) {
    let client = ctx.client.clone();
    let agents: Api<DeserializeGuard<Agent>> = scoped(&client, &ctx.config.watch_namespace);
    let secrets: Api<Secret> = scoped(&client, &ctx.config.watch_namespace);
    let [deployments, statefulsets, services, service_accounts] = children;
    // Agents as the reconcile needs them: without managedFields, which nothing here reads.
    let (reader, writer) = reflector::store();
    let mut agent_watch = watcher::Config::default().any_semantic();
    if let Some(selector) = &ctx.config.agent_selector {
        agent_watch = agent_watch.labels(selector);
    }
    let agent_events = watcher::watcher(agents, agent_watch)
        .default_backoff()
        .modify(|guard: &mut DeserializeGuard<Agent>| match &mut guard.0 {
            Ok(agent) => agent.metadata.managed_fields = None,
            Err(invalid) => invalid.metadata.managed_fields = None,
        })
        .reflect(writer)
        .applied_objects();
    // A namespace's permission policy changed: reconcile the Agents in it. The cache must be
    // filled before the first reconcile reads it.
    let (policy_changed, policy_triggers) = futures::channel::mpsc::unbounded();
    let agents_by_namespace = reader.clone();
    let namespace_task = tokio::spawn(namespace_events.for_each(move |event| {
        match event {
            Ok(ns) => {
                let name = ns.metadata.name.unwrap_or_default();
                for agent in agents_by_namespace.state() {
                    if guard_namespace(&agent) == Some(name.as_str()) {
                        let _ = policy_changed.unbounded_send(ObjectRef::from_obj(agent.as_ref()));
                    }
                }
            }
            // Until namespaces can be read, no Agent is reconciled: say why.
            Err(e) => tracing::warn!(
                error = %e,
                "watching namespaces (for their permission policy) failed; the controller needs get, list and watch on namespaces"
            ),
        }
        futures::future::ready(())
    }));
    tokio::select! {
        _ = ctx.stores.namespaces.wait_until_ready() => {},
        _ = stop.cancelled() => { namespace_task.abort(); return; }
    }
    Controller::for_stream(agent_events, reader)
        .reconcile_on(policy_triggers)
        .with_config(
            kube::runtime::controller::Config::default().concurrency(ctx.config.concurrency),
        )
        .owns(secrets, managed())
        .owns_stream_with(deployments, dynamic_type::<Deployment>())
        .owns_stream_with(statefulsets, dynamic_type::<StatefulSet>())
        .owns_stream_with(services, dynamic_type::<Service>())
        .owns_stream_with(service_accounts, dynamic_type::<ServiceAccount>())
        // A new trust bundle, CA or signing key concerns every Agent.
        .reconcile_all_on(trust_changed)
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(agent::reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(agent = %obj, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile loop error"),
            }
        })
        .await;
    namespace_task.abort();
}

fn guard_namespace(guard: &DeserializeGuard<Agent>) -> Option<&str> {
    match &guard.0 {
        Ok(a) => a.metadata.namespace.as_deref(),
        Err(invalid) => invalid.metadata.namespace.as_deref(),
    }
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

    #[test]
    fn api_validation_errors_are_permanent_others_transient() {
        let api = |code| {
            Error::Kube(kube::Error::Api(
                kube::core::Status::failure("x", "Invalid")
                    .with_code(code)
                    .boxed(),
            ))
        };
        assert!(api(422).is_permanent());
        assert!(!api(409).is_permanent());
        assert!(!api(500).is_permanent());
        assert!(!api(429).is_permanent());
    }
}
