//! The controller process: leader election on a Lease, the identity authority, the watches and
//! the Agent controller, with one shutdown path (SIGTERM, or loss of the Lease).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use futures::TryStreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ApiResource, DynamicObject, PartialObjectMeta, TypeMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, controller::Action, watcher};
use kube::{Api, Client, core::DeserializeGuard};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::agent::{self, events, report::Note};
use super::context::{Cached, Echoes, LiveIndex};
use super::watched::Watched;
use super::{ChildStores, Config, Context, Error, hash_of};
use crate::api::ops;
use crate::crd::Agent;
use crate::identity::authority::Authority;
use crate::keys::{
    ALLOWED_PERMISSIONS_ANNOTATION, DISCOVERABLE_FROM_ANNOTATION, MANAGED_BY, MANAGER, reasons,
};
use crate::telemetry::{ErrorLabels, Metrics};
use crate::workload::Observed;

/// The client for everything but leader election: at most `rate.burst` requests at once,
/// then `rate.qps` per second on average (tower's window limiter: `burst` requests per
/// `burst / qps` seconds).
fn rate_limited(config: kube::Config, rate: Option<super::ApiRate>) -> anyhow::Result<Client> {
    let builder = kube::client::ClientBuilder::try_from(config)
        .context("connecting to the Kubernetes API (set KUBECONFIG or run in a pod)")?;
    Ok(match rate {
        None => builder.build(),
        Some(r) => builder
            .with_layer(&tower::limit::RateLimitLayer::new(
                u64::from(r.burst),
                Duration::from_secs_f64(f64::from(r.burst) / r.qps),
            ))
            .build(),
    })
}

/// Why the controller stopped leading.
enum Stopped {
    Shutdown,
    LostLease,
}

/// The longest each last step of a shutdown (the Lease release, the ops endpoint) may take.
const SHUTDOWN_STEP: Duration = Duration::from_secs(5);

/// Waits for one last step of a shutdown, at most [`SHUTDOWN_STEP`]; says so when it is cut.
async fn shutdown_step<T>(what: &str, task: tokio::task::JoinHandle<T>) {
    if tokio::time::timeout(SHUTDOWN_STEP, task).await.is_err() {
        tracing::warn!(
            step = what,
            timeout_s = SHUTDOWN_STEP.as_secs(),
            "shutdown step not done in time; exiting without it"
        );
    }
}

/// Runs the controller until SIGTERM (exit 0) or until leadership is lost (error: the process
/// exits and restarts as a standby, so two replicas never write at once).
pub async fn run(config: Config) -> anyhow::Result<()> {
    let kube_config = kube::Config::infer()
        .await
        .context("connecting to the Kubernetes API (set KUBECONFIG or run in a pod)")?;
    // Leader election on a connection of its own, never behind the rate limit.
    let lease_client = Client::try_from(kube_config.clone())
        .context("connecting to the Kubernetes API (set KUBECONFIG or run in a pod)")?;
    let client = rate_limited(kube_config, config.api_rate)?;
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
    let api_role = Arc::new(std::sync::atomic::AtomicU8::new(if config.api.is_some() {
        ops::ApiRole::Standby
    } else {
        ops::ApiRole::Off
    } as u8));
    let state = ops::OpsState {
        metrics: metrics.clone(),
        ready: ready.clone(),
        api: api_role.clone(),
    };
    let (ops_addr, ops_task) = ops::serve(config.ops_addr, state, shutdown.clone())
        .await
        .with_context(|| format!("binding the ops endpoint on {}", config.ops_addr))?;
    tracing::info!(addr = %ops_addr, "serving /metrics, /healthz and /readyz");
    let lease_secs = config.lease_duration.as_secs().max(2);
    let manager = LeaseManagerBuilder::new(lease_client, &config.lease_name)
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
    let (leading, lease_task) = manager.watch().await;
    ready.store(true, Ordering::Relaxed);
    tracing::info!(replica = %config.replica, lease = %config.lease_name, "waiting to become leader");

    let outcome = lead(
        client,
        config,
        metrics.clone(),
        leading,
        shutdown.clone(),
        api_role,
    )
    .await;

    // The one shutdown path. `lead` dropped its receiver, so the lease task releases the Lease
    // and a standby takes over at once.
    metrics.leader.set(0);
    shutdown.cancel();
    // Bounded, and said when cut: an exit never waits long on the apiserver.
    shutdown_step("releasing the leader Lease", lease_task).await;
    shutdown_step("stopping the ops endpoint", ops_task).await;
    match outcome? {
        Stopped::Shutdown => {
            tracing::info!("stopped cleanly");
            Ok(())
        }
        Stopped::LostLease => {
            anyhow::bail!("lost the leader lease; exiting so this replica restarts as a standby")
        }
    }
}

/// Waits for the Lease, then runs the authority and the reconcilers until shutdown or until the
/// Lease is lost. Only the leader touches the CA, the ledger and the signing keys.
async fn lead(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    mut leading: watch::Receiver<bool>,
    shutdown: CancellationToken,
    api_role: Arc<std::sync::atomic::AtomicU8>,
) -> anyhow::Result<Stopped> {
    let became_leader = tokio::select! {
        _ = shutdown.cancelled() => false,
        r = leading.wait_for(|l| *l) => r.is_ok(),
    };
    if !became_leader {
        return Ok(Stopped::Shutdown);
    }
    tracing::info!(replica = %config.replica, "became leader; starting reconcilers");
    metrics.leader.set(1);
    let stop = CancellationToken::new();
    let lost = Arc::new(AtomicBool::new(false));
    {
        let (stop, shutdown, lost) = (stop.clone(), shutdown.clone(), lost.clone());
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
    let stopped = || {
        if lost.load(Ordering::SeqCst) {
            Stopped::LostLease
        } else {
            Stopped::Shutdown
        }
    };
    let _replicator = tokio::select! {
        r = prepare_ledger(&config.ha, &config.authority.data_dir) => r?,
        _ = stop.cancelled() => return Ok(stopped()),
    };
    let bootstrap = tokio::select! {
        a = Authority::bootstrap_with(
            &client,
            config.authority.clone(),
            config.ha.adopt_published_crl,
        ) => a,
        _ = stop.cancelled() => return Ok(stopped()),
    };
    let (authority, trust_changed) = bootstrap.context("starting the identity authority")?;
    let authority = Arc::new(authority);
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
    let result = reconcile_agents(
        client,
        config,
        metrics,
        authority,
        trust_changed,
        stop.clone(),
        api_role.clone(),
    )
    .await;
    api_role.store(ops::ApiRole::Standby as u8, Ordering::Relaxed);
    stop.cancel();
    maintenance.abort();
    result?;
    Ok(stopped())
}

/// Runs the leadership hooks before the ledger is opened (docs/ha.md): `on_lead_exec` to
/// completion (e.g. restore the newest replica), then spawns `while_leading_exec` (e.g.
/// `litestream replicate`), killed when the returned handle drops (leadership ends).
async fn prepare_ledger(
    ha: &super::HaConfig,
    data_dir: &std::path::Path,
) -> anyhow::Result<Option<tokio::process::Child>> {
    let sh = |cmd: &str| {
        let mut c = tokio::process::Command::new("sh");
        c.arg("-c")
            .arg(cmd)
            .env("AGENTRY_DATA_DIR", data_dir)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        c
    };
    if let Some(cmd) = &ha.on_lead_exec {
        let started = std::time::Instant::now();
        let status = sh(cmd)
            .status()
            .await
            .with_context(|| format!("running --on-lead-exec `{cmd}`"))?;
        anyhow::ensure!(
            status.success(),
            "--on-lead-exec `{cmd}` failed ({status}); not leading with a ledger that may be stale"
        );
        tracing::info!(command = %cmd, elapsed_ms = started.elapsed().as_millis() as u64, "on-lead command done");
    }
    let Some(cmd) = &ha.while_leading_exec else {
        return Ok(None);
    };
    let child = sh(cmd)
        .spawn()
        .with_context(|| format!("starting --while-leading-exec `{cmd}`"))?;
    tracing::info!(command = %cmd, pid = child.id(), "while-leading command started");
    Ok(Some(child))
}

/// Builds the watch caches and runs the Agent controller until `stop`.
async fn reconcile_agents(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    authority: Arc<Authority>,
    trust_changed: futures::channel::mpsc::UnboundedReceiver<()>,
    stop: CancellationToken,
    api_role: Arc<std::sync::atomic::AtomicU8>,
) -> anyhow::Result<()> {
    let ns = &config.watch_namespace;
    // The caches keep what a pass reads (see `Observed`): metadata versions and owners, the
    // rollout counts; not the pod templates, which would be most of our memory.
    let (deployments, deployment_events) =
        child_watch::<Deployment>(&client, ns, Child::workload());
    let (statefulsets, statefulset_events) =
        child_watch::<StatefulSet>(&client, ns, Child::workload());
    let (services, service_events) = child_watch::<Service>(&client, ns, Child::every_change());
    let (service_accounts, service_account_events) =
        child_watch::<ServiceAccount>(&client, ns, Child::every_change());
    let (secrets, secret_events) = secret_watch(&client, ns);
    let (namespaces, namespace_events) = namespace_watch(&client, ns);
    let stores = ChildStores {
        namespaces,
        deployments,
        statefulsets,
        services,
        service_accounts,
        secrets,
    };
    // Agents as the reconcile (and the API and the relay) need them.
    let (agents, writer) = reflector::store();
    count_agent_phases(&metrics, agents.clone());
    let messaging = match config.messaging.clone() {
        Some(m) => {
            let started = crate::controller::messaging::Messaging::start(
                m,
                agents.clone(),
                &authority.config.trust_domain,
                &config.replica,
                metrics.relay.clone(),
            )
            .await
            .context("connecting to Redis (--redis-url)")?;
            started.spawn_relay(stop.clone());
            tracing::info!(urls = ?started.config.target.urls, cluster = started.config.target.cluster, "messaging: relay started");
            Some(started)
        }
        None => None,
    };
    let ctx = Arc::new(
        Context::new(client, metrics, config, authority, stores).with_messaging(messaging),
    );
    let children = [
        deployment_events,
        statefulset_events,
        service_events,
        service_account_events,
        secret_events,
    ];
    let backups = match ctx.config.backup.clone() {
        Some(config) => Some(start_backups(&ctx, config, agents.clone(), stop.clone())?),
        None => None,
    };
    let api = match ctx.config.api.clone() {
        Some(api) if api_allowed(&ctx) => {
            Some(start_api(&ctx, api, agents.clone(), backups, stop.clone(), api_role).await?)
        }
        _ => None,
    };
    run_agent_controller(
        ctx,
        (agents, writer),
        children,
        namespace_events,
        trust_changed,
        stop,
    )
    .await;
    if let Some(api) = api {
        // In-flight API requests get a bounded grace period.
        let _ = tokio::time::timeout(Duration::from_secs(5), api).await;
    }
    Ok(())
}

/// A ledger behind the published CRL would answer revocation lookups wrongly and issue the
/// API's own certificate: no API until it is restored (see `identity::guard`).
fn api_allowed(ctx: &Context) -> bool {
    let allowed = ctx.authority.ledger_health().is_ok();
    if !allowed && ctx.config.api.is_some() {
        tracing::error!("not serving the agent API: the ledger is behind the published CRL");
    }
    allowed
}

/// Starts the agent API once the Agent cache is filled (its answers come from it), and keeps
/// its certificate renewed. The listener is bound at once, so a port in use fails the leader.
/// Opens the backup catalog, starts the backup watches and the backup manager; returns what
/// the API's backup routes use.
fn start_backups(
    ctx: &Arc<Context>,
    config: super::backups::BackupConfig,
    agents: Store<DeserializeGuard<Agent>>,
    stop: CancellationToken,
) -> anyhow::Result<Arc<crate::api::backups::BackupService>> {
    use crate::backup::{catalog::Catalog, engine::Engine};
    let data_dir = &ctx.config.authority.data_dir;
    let catalog = Catalog::open(data_dir).with_context(|| {
        format!(
            "opening the backup catalog under {} (is the data volume writable?)",
            data_dir.display()
        )
    })?;
    let changed = Arc::new(tokio::sync::Notify::new());
    let caches = super::backups::watch(
        &ctx.client,
        &ctx.config.watch_namespace,
        config.location_selector.as_deref(),
        changed.clone(),
        stop.clone(),
    );
    let service = Arc::new(crate::api::backups::BackupService::new(
        Engine::new(Arc::new(catalog)),
        ctx.client.clone(),
        ctx.config.namespace.clone(),
        caches,
    ));
    let manager = Arc::new(super::backups::Manager::new(
        service.clone(),
        agents,
        config,
    ));
    tokio::spawn(manager.run(changed, stop));
    super::backups::count_backups(&ctx.metrics, service.clone());
    Ok(service)
}

/// `agentry_agents{phase}`, counted from the Agent cache at each scrape.
fn count_agent_phases(metrics: &Metrics, agents: Store<DeserializeGuard<Agent>>) {
    metrics.on_scrape(move |m| {
        m.set_agent_phases(agents.state().iter().map(|guard| {
            match &guard.0 {
                Ok(agent) => agent
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .map_or_else(|| "Pending".to_string(), |p| p.to_string()),
                Err(_) => "Invalid".to_string(),
            }
        }))
    });
}

async fn start_api(
    ctx: &Arc<Context>,
    api: super::ApiConfig,
    agents: Store<DeserializeGuard<Agent>>,
    backups: Option<Arc<crate::api::backups::BackupService>>,
    stop: CancellationToken,
    role: Arc<std::sync::atomic::AtomicU8>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use crate::api::{cluster, server, state};
    let state = state::ApiState::new(
        ctx.authority.clone(),
        agents.clone(),
        ctx.stores.namespaces.clone(),
        Arc::new(cluster::KubeRegistrar(ctx.client.clone())),
        Arc::new(cluster::KubeTokenReviewer(ctx.client.clone())),
        state::ApiSettings {
            public_url: api.public_url.clone(),
            csr_audience: api.csr_audience.clone(),
        },
    )
    .with_metrics(ctx.metrics.clone());
    let state = Arc::new(match backups {
        Some(b) => state.with_backups(b),
        None => state,
    });
    let listener = tokio::net::TcpListener::bind(api.addr)
        .await
        .with_context(|| format!("binding the agent API on {}", api.addr))?;
    let authority = ctx.authority.clone();
    Ok(tokio::spawn(async move {
        // Polled again and again: the store's readiness wakes only its last waiter, and the
        // controller waits on it too.
        loop {
            tokio::select! {
                ready = tokio::time::timeout(Duration::from_millis(200), agents.wait_until_ready()) => match ready {
                    Ok(Ok(())) => break,
                    // The controller stopped before the cache filled.
                    Ok(Err(_)) => return,
                    Err(_) => {},
                },
                _ = stop.cancelled() => return,
            }
        }
        // The API's certificate; while the CA cannot issue (e.g. it expired and awaits
        // `agentry ca rotate`) the controller runs on without the API and keeps trying.
        let identity = loop {
            let issued = tokio::select! {
                issued = server::ServerIdentity::issue(&authority, api.sans.clone()) => issued,
                _ = stop.cancelled() => return,
            };
            match issued {
                Ok(identity) => break identity,
                Err(e) => {
                    tracing::error!(error = %e, "issuing the agent API's certificate failed; the API is not served until it succeeds (retrying every 10s)")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(10)) => {},
                _ = stop.cancelled() => return,
            }
        };
        let tls = match server::tls_config(identity.clone()) {
            Ok(tls) => tls,
            Err(e) => {
                tracing::error!(error = %e, "the agent API's TLS configuration failed");
                return;
            }
        };
        let (addr, task) =
            match server::serve_on(listener, server::router(state), tls, stop.clone()) {
                Ok(served) => served,
                Err(e) => {
                    tracing::error!(error = %e, "the agent API failed to start");
                    return;
                }
            };
        role.store(ops::ApiRole::Serving as u8, Ordering::Relaxed);
        tracing::info!(%addr, url = %api.public_url, "serving the agent API (mTLS)");
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => match identity.renew_if_due(&authority).await {
                    Ok(true) => tracing::info!("renewed the agent API's certificate"),
                    Ok(false) => {},
                    Err(e) => tracing::warn!(error = %e, "renewing the agent API's certificate failed; retrying"),
                },
            }
        }
        role.store(ops::ApiRole::Standby as u8, Ordering::Relaxed);
        let _ = task.await;
    }))
}

/// Permanent errors wait for a change to the Agent; others retry with backoff. Either way the
/// Agent gets a Warning Event, so `kubectl describe agent` says what is wrong.
fn error_policy(guard: Arc<DeserializeGuard<Agent>>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = guard_key(&guard);
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ErrorLabels { kind: error.kind() })
        .inc();
    let reference = events::reference(guard_meta(&guard));
    let note = Note::warning(reasons::RECONCILE_FAILED, "Reconcile", error.to_string());
    let recorder = ctx.recorder.clone();
    tokio::spawn(async move { events::publish_on(&recorder, &reference, &note).await });
    if error.is_permanent() {
        tracing::warn!(agent = %key, error = %error, "permanent error; waiting for a change to the Agent");
        return Action::await_change();
    }
    let delay = ctx.next_backoff(&key);
    tracing::warn!(agent = %key, error = %error, retry_in = ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

/// An Agent's metadata, whether or not it decodes.
/// What on an Agent asks for a pass: its spec (generation), its annotations (a revocation
/// request) and its deletion. Not its status, which only this controller writes (each status
/// write would otherwise cost one more pass), nor its labels and finalizers, which a pass puts
/// on itself before going on (`agent::metadata`); one removed by hand is back at the next
/// resync.
fn agent_trigger(guard: &DeserializeGuard<Agent>) -> Option<u64> {
    let m = guard_meta(guard);
    // The uid too: an Agent deleted and created again under its name is a new object.
    Some(hash_of((
        &m.uid,
        m.generation,
        &m.annotations,
        m.deletion_timestamp.is_some(),
    )))
}

fn guard_meta(guard: &DeserializeGuard<Agent>) -> &kube::api::ObjectMeta {
    match &guard.0 {
        Ok(a) => &a.metadata,
        Err(invalid) => &invalid.metadata,
    }
}

fn guard_key(guard: &DeserializeGuard<Agent>) -> String {
    let meta = guard_meta(guard);
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
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

/// Every `interval`: rotates the token signing key when due, takes the next CA rotation step,
/// and re-signs the CRL.
async fn maintain_authority(
    client: Client,
    authority: Arc<Authority>,
    interval: Duration,
    stop: CancellationToken,
) {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: None,
        },
    );
    let ca_secret = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Secret".into()),
        namespace: Some(authority.config.namespace.clone()),
        name: Some(authority.config.ca_secret.clone()),
        ..Default::default()
    };
    let mut tick = tokio::time::interval(interval.max(Duration::from_secs(1)));
    tick.tick().await;
    loop {
        // What the CA set dropped (an expired next or previous CA), once each, on the CA Secret.
        for note in authority.take_ca_notes() {
            let note = Note::warning(reasons::CA_DROPPED, "Rotate", note);
            events::publish_on(&recorder, &ca_secret, &note).await;
        }
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
    watcher::Config::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1))
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

/// Which changes of one child kind reconcile the owning Agent.
struct Child<K: kube::Resource<DynamicType = ()>> {
    /// The part of the object a reconcile acts on: a change elsewhere (a Deployment's status
    /// ticking through counts it does not read) triggers nothing. Deletions always trigger.
    trigger: fn(&Observed<K>) -> u64,
}

impl<K: kube::Resource<DynamicType = ()>> Child<K> {
    /// Deployments and StatefulSets: whether it is rolled out (what the Agent's status says of
    /// it), not each step of the rollout.
    fn workload() -> Self {
        Self {
            trigger: |o| hash_of((o.metadata.generation, o.live().rolled_out())),
        }
    }

    /// Objects a pass reads nothing from but their metadata (ServiceAccounts, Services): any
    /// change may be tampering to repair.
    fn every_change() -> Self {
        Self {
            trigger: |o| hash_of(o.metadata.resource_version.as_deref()),
        }
    }
}

/// A watch cache of one child kind, and its stream of changes (as metadata, for the owner
/// lookup) that triggers reconciles of the owning Agent.
fn child_watch<K>(
    client: &Client,
    ns: &Option<String>,
    child: Child<K>,
) -> (
    Cached<K>,
    BoxStream<'static, Result<PartialObjectMeta<DynamicObject>, watcher::Error>>,
)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()> + 'static,
{
    let live = LiveIndex::default();
    let mut writer = live.writer();
    let echoes = Echoes::new(child.trigger);
    let news = echoes.clone();
    let stream = watcher::watcher(scoped::<Observed<K>>(client, ns), managed())
        .default_backoff()
        .map_ok(move |event| {
            writer.apply(&event);
            let changed = news_of(&news, event, |o: &Observed<K>| o);
            futures::stream::iter(changed.map(Ok))
        })
        .try_flatten()
        .map_ok(|obj: Observed<K>| trigger_of::<K>(obj.metadata))
        .boxed();
    (Cached { live, echoes }, stream)
}

/// The object of a watch event if it is news to the controller (see [`Echoes`]): a version
/// that differs in what a pass acts on from the last one seen or written. Deletions always are.
fn news_of<K, T>(echoes: &Echoes<T>, event: watcher::Event<K>, part: fn(&K) -> &T) -> Option<K>
where
    K: kube::Resource,
{
    match event {
        watcher::Event::Apply(o) | watcher::Event::InitApply(o) => echoes
            .is_news(o.meta().uid.as_deref(), part(&o))
            .then_some(o),
        watcher::Event::Delete(o) => {
            echoes.forget(o.meta().uid.as_deref());
            Some(o)
        }
        watcher::Event::Init | watcher::Event::InitDone => None,
    }
}

/// The identity Secrets' changes that trigger their Agent: metadata only (their keys never
/// pass through the controller's memory unless a pass reads one), and not the echoes of the
/// controller's own writes.
fn secret_watch(
    client: &Client,
    ns: &Option<String>,
) -> (
    Echoes<ObjectMeta>,
    BoxStream<'static, Result<PartialObjectMeta<DynamicObject>, watcher::Error>>,
) {
    let echoes = Echoes::new(|m: &ObjectMeta| hash_of(m.resource_version.as_deref()));
    let news = echoes.clone();
    let secrets: Api<PartialObjectMeta<Secret>> = scoped(client, ns);
    let stream = watcher::watcher(secrets, managed())
        .default_backoff()
        .map_ok(move |event| {
            let changed = news_of(&news, event, |o: &PartialObjectMeta<Secret>| &o.metadata);
            futures::stream::iter(changed.map(Ok))
        })
        .try_flatten()
        .map_ok(|m: PartialObjectMeta<Secret>| trigger_of::<Secret>(m.metadata))
        .boxed();
    (echoes, stream)
}

/// A changed child of kind K as the controller's trigger streams carry it: its metadata, for
/// the lookup of the owning Agent.
fn trigger_of<K: kube::Resource<DynamicType = ()>>(
    metadata: ObjectMeta,
) -> PartialObjectMeta<DynamicObject> {
    PartialObjectMeta {
        types: Some(TypeMeta {
            api_version: K::api_version(&()).into(),
            kind: K::kind(&()).into(),
        }),
        metadata,
        _phantom: Default::default(),
    }
}

type NamespaceStore = Store<PartialObjectMeta<Namespace>>;
type NamespaceEvents = BoxStream<'static, Result<PartialObjectMeta<Namespace>, watcher::Error>>;

/// A watch cache of the namespaces whose Agents we reconcile, trimmed to the permission-policy
/// annotation, and its stream of policy changes.
fn namespace_watch(client: &Client, ns: &Option<String>) -> (NamespaceStore, NamespaceEvents) {
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
            // Only the policies: what scopes its Agents may hold, and who may discover them.
            let kept: std::collections::BTreeMap<String, String> = m
                .metadata
                .annotations
                .take()
                .unwrap_or_default()
                .into_iter()
                .filter(|(k, _)| {
                    k == ALLOWED_PERMISSIONS_ANNOTATION || k == DISCOVERABLE_FROM_ANNOTATION
                })
                .collect();
            m.metadata.managed_fields = None;
            m.metadata.labels = None;
            m.metadata.annotations = (!kept.is_empty()).then_some(kept);
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
    (reader, writer): (
        Store<DeserializeGuard<Agent>>,
        reflector::store::Writer<DeserializeGuard<Agent>>,
    ),
    children: [BoxStream<'static, Result<PartialObjectMeta<DynamicObject>, watcher::Error>>; 5],
    namespace_events: NamespaceEvents,
    trust_changed: futures::channel::mpsc::UnboundedReceiver<()>,
    stop: CancellationToken,
) {
    let client = ctx.client.clone();
    let agents: Api<Watched> = scoped(&client, &ctx.config.watch_namespace);
    let [
        deployments,
        statefulsets,
        services,
        service_accounts,
        secrets,
    ] = children;
    // Agents as the reconcile needs them: without managedFields and kubectl's copy of the last
    // applied manifest, which nothing here reads, and decoded without allocating them (see
    // `Watched`: a fleet's worth of both, and of their decoding, would be a large part of our
    // memory).
    let mut agent_watch = watcher::Config::default().any_semantic();
    if let Some(selector) = &ctx.config.agent_selector {
        agent_watch = agent_watch.labels(selector);
    }
    let agent_events = watcher::watcher(agents, agent_watch)
        .default_backoff()
        .map_ok(Watched::into_guard)
        .reflect(writer)
        .applied_objects()
        .predicate_filter(agent_trigger, Default::default());
    // A namespace's permission policy changed: reconcile the Agents in it. The cache must be
    // filled before the first reconcile reads it.
    let (policy_changed, policy_triggers) = futures::channel::mpsc::unbounded();
    let agents_by_namespace = reader.clone();
    let namespace_task = tokio::spawn(namespace_events.for_each(move |event| {
        match event {
            Ok(ns) => {
                let name = ns.metadata.name.unwrap_or_default();
                for agent in agents_by_namespace.state() {
                    if guard_meta(&agent).namespace.as_deref() == Some(name.as_str()) {
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
            kube::runtime::controller::Config::default()
                .concurrency(ctx.config.concurrency)
                .debounce(ctx.config.debounce),
        )
        .owns_stream_with(secrets, dynamic_type::<Secret>())
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
