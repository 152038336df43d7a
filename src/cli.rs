//! The command line: every subcommand's flags (one doc string each, shown by `--help`), and
//! what the `ca` subcommands print.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use agentry::identity::rotation::CaSet;
use agentry::telemetry::LogFormat;

#[derive(Parser)]
#[command(
    name = "agentry",
    version,
    about = "Identities, right-sized workloads and discovery for AI agents on Kubernetes"
)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "AGENTRY_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the controller: reconcilers, CA and token issuer, with leader election.
    Controller(Box<ControllerArgs>),
    /// Print the CustomResourceDefinitions and the admission policy as YAML (what `crds/` holds).
    Crd(CrdArgs),
    /// Inspect or rotate the CA.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Print the agent API's OpenAPI 3.1 document (what openapi/agentry-api.json holds).
    Openapi,
    /// Register an agent with the API once (`POST /v1/agents/register`) and print the answer.
    Register(RegisterArgs),
    /// Run beside an agent: register at start and whenever the mounted identity changes, keep
    /// a fresh token, and serve the agent on localhost (/token, /status, /card, /agents, and
    /// /v1/messages when spec.messaging is enabled).
    Sidecar(SidecarArgs),
    /// Backups: ls, create, restore (through the cluster); verify, scrub, reindex, purge
    /// (against the catalog and the stores, where the controller's data directory is).
    #[command(subcommand)]
    Backup(crate::cli_backup::BackupCommand),
    /// Send a message from this agent's outbox (spec.messaging): prints its id.
    Send(crate::cli_messaging::SendArgs),
    /// Receive this agent's messages as JSON lines (acknowledged once printed, or once
    /// --exec succeeds); --dead lists the dead-letter stream.
    Recv(crate::cli_messaging::RecvArgs),
    /// Check an installation end to end (CRDs, leader, CA and CRL, API over mTLS, Redis, backup
    /// stores, Litestream's replica) and print what to fix; exit 1 if any check fails.
    Verify(crate::cli_verify::VerifyArgs),
}

/// Where an agent's credentials are.
#[derive(Args, Clone)]
pub struct CredentialArgs {
    /// The agent API, e.g. https://agentry-api.agentry-system.svc:8443.
    #[arg(long, env = "AGENTRY_API_URL")]
    pub api: String,
    /// The mounted identity Secret (tls.crt, tls.key, ca.crt, token).
    #[arg(long, env = "AGENTRY_IDENTITY_DIR", conflicts_with_all = ["cert", "key", "cacert"])]
    pub identity_dir: Option<PathBuf>,
    /// The client certificate (PEM), instead of --identity-dir.
    #[arg(long, requires_all = ["key", "cacert"])]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The CA bundle to trust the API with (PEM).
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// The agent's token (default: the identity dir's `token`, else one from POST /v1/token).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The agent, as namespace/name.
    #[arg(long, env = "AGENTRY_AGENT_ID")]
    pub id: String,
    /// The capabilities to register (comma-separated; a subset of the Agent's spec.capabilities).
    #[arg(long, value_delimiter = ',')]
    pub capabilities: Vec<String>,
    /// Backup preferences as JSON, e.g. '{"schedule":"0 */6 * * *","paths":["/data"]}'.
    #[arg(long)]
    pub backup_prefs: Option<String>,
}

impl CredentialArgs {
    pub fn files(&self) -> Result<agentry::sidecar::IdentityFiles, String> {
        let mut files = match (&self.identity_dir, &self.cert, &self.key, &self.cacert) {
            (Some(dir), ..) => agentry::sidecar::IdentityFiles::in_dir(dir),
            (None, Some(cert), Some(key), Some(ca)) => agentry::sidecar::IdentityFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
                token: None,
            },
            _ => return Err("give --identity-dir, or --cert, --key and --cacert".into()),
        };
        if let Some(t) = &self.token_file {
            files.token = Some(t.clone());
        }
        Ok(files)
    }

    pub fn backup_prefs(&self) -> Result<Option<serde_json::Value>, String> {
        self.backup_prefs
            .as_deref()
            .map(|s| {
                serde_json::from_str(s).map_err(|e| format!("--backup-prefs is not JSON: {e}"))
            })
            .transpose()
    }
}

#[derive(Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub creds: CredentialArgs,
}

#[derive(Args)]
pub struct SidecarArgs {
    #[command(flatten)]
    pub creds: CredentialArgs,
    /// Where the agent reaches the sidecar (localhost only).
    #[arg(long, default_value = "127.0.0.1:8181", env = "AGENTRY_SIDECAR_ADDR")]
    pub listen: SocketAddr,
    /// How often the identity files are checked for rotation.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub poll: Duration,
    /// How often the API is asked for backup and restore work (AgentBackups waiting for data,
    /// AgentRestores ready to apply). 0s: never.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub backup_poll: Duration,
    /// The largest message body sent through /v1/messages (the controller's
    /// --message-body-limit).
    #[arg(long, default_value = "64Ki", value_parser = parse_body_limit)]
    pub message_body_limit: usize,
    /// Where a restore's archive is staged (an unnamed file) and verified before it is written.
    #[arg(long, default_value = "/tmp", env = "AGENTRY_SCRATCH_DIR")]
    pub scratch_dir: std::path::PathBuf,
    /// Read and restore `spec.backup.paths` below this directory instead of at their absolute
    /// paths: for running the sidecar outside the agent's pod (the local demo). The archive's
    /// entries then carry this prefix too, so restore such backups with the same --path-root.
    #[arg(long)]
    pub path_root: Option<std::path::PathBuf>,
}

/// `agentry register`: exit 0 with the answer on stdout; 2 when the API refuses (its error on
/// stderr); 1 on local problems.
pub fn run_register(args: RegisterArgs) -> ExitCode {
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        let creds = &args.creds;
        let prepared = creds.files().and_then(|f| f.load()).and_then(|loaded| {
            let client = agentry::sidecar::ApiClient::new(&creds.api, &loaded)?;
            Ok((loaded, client, creds.backup_prefs()?))
        });
        let (loaded, client, prefs) = match prepared {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let token = match loaded.token {
            Some(t) => Ok(t),
            None => client
                .token()
                .await
                .map(|v| v["token"].as_str().unwrap_or_default().to_string()),
        };
        let request = agentry::sidecar::register_request(&creds.id, &creds.capabilities, prefs);
        let answer = match token {
            Ok(t) => client.register(&t, &request).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(v) => {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(agentry::sidecar::ClientError::Refused { status, body }) => {
                eprintln!("error: the API refused ({status}): {body}");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// `agentry sidecar`: runs until SIGTERM.
pub fn run_sidecar(args: SidecarArgs) -> ExitCode {
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        let creds = args.creds;
        let (files, prefs) = match creds.files().and_then(|f| Ok((f, creds.backup_prefs()?))) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: binding {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        let state = std::sync::Arc::new(tokio::sync::RwLock::new(Default::default()));
        let stop = tokio_util::sync::CancellationToken::new();
        let mut app = agentry::sidecar::local_router(state.clone(), creds.api.clone(), creds.id.clone());
        // Messaging on localhost, when the identity directory is mounted (redis.json appears
        // there once spec.messaging is enabled; until then the routes answer 503).
        if let Some(dir) = &creds.identity_dir {
            let consumer = std::env::var("POD_NAME").unwrap_or_else(|_| creds.id.replace('/', "."));
            app = app.merge(agentry::sidecar::messages::router(dir.clone(), consumer, args.message_body_limit));
        }
        let sidecar = agentry::sidecar::Sidecar {
            api: creds.api,
            files,
            id: creds.id,
            capabilities: creds.capabilities,
            backup_prefs: prefs,
            poll: args.poll,
            backup_poll: args.backup_poll,
            scratch_dir: args.scratch_dir,
            path_root: args.path_root,
        };
        tracing::info!(addr = %args.listen, "sidecar serving /token, /status, /card, /agents and /v1/messages on localhost");
        let worker = tokio::spawn(sidecar.run(state, stop.clone()));
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(agentry::controller::runtime::shutdown_signal())
            .await;
        stop.cancel();
        let _ = worker.await;
        match served {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

#[derive(Args)]
pub struct CrdArgs {
    /// What to print: everything (for `kubectl apply`), or the Helm chart's two files.
    #[arg(long, value_enum, default_value = "all")]
    pub only: CrdPart,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum CrdPart {
    /// CRDs and the admission policy.
    All,
    /// The CRDs (charts/agentry/crds/).
    Crds,
    /// The admission policy as a chart template (charts/agentry/templates/admission-policy.yaml).
    ChartPolicy,
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// Start a CA rotation: prepare a new CA, activate it after the overlap, re-issue every
    /// certificate, retire the old CA. The running leader carries out each step. When the
    /// signing CA has already expired, the leader replaces it at once (the recovery).
    Rotate(CaArgs),
    /// Show the rotation phase and the CAs in play.
    Status(CaArgs),
}

#[derive(Args)]
pub struct CaArgs {
    /// The controller's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "agentry-system")]
    namespace: String,
    /// The CA Secret.
    #[arg(long, default_value = "agentry-ca")]
    ca_secret: String,
}

/// A multi-threaded tokio runtime, or None after saying why on stderr.
pub fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new()
        .map_err(|e| eprintln!("error: starting the async runtime failed: {e}"))
        .ok()
}

pub fn run_ca(command: CaCommand) -> ExitCode {
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let result = runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| format!("connecting to the Kubernetes API (set KUBECONFIG): {e}"))?;
        match command {
            CaCommand::Rotate(a) => {
                agentry::identity::rotation::request(&client, &a.namespace, &a.ca_secret)
                    .await
                    .map_err(|e| {
                        format!(
                            "requesting the rotation on Secret {}/{}: {e}",
                            a.namespace, a.ca_secret
                        )
                    })
            }
            CaCommand::Status(a) => {
                let (set, dropped) =
                    agentry::identity::rotation::load(&client, &a.namespace, &a.ca_secret).await?;
                Ok(render_ca_status(
                    &set,
                    &dropped,
                    time::OffsetDateTime::now_utc().unix_timestamp(),
                ))
            }
        }
    });
    match result {
        Ok(line) => {
            println!("{}", line.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Args)]
pub struct ControllerArgs {
    /// Reconcile Agents in this namespace only (default: all namespaces).
    #[arg(long, env = "AGENTRY_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Reconcile only Agents whose labels match this selector (e.g. `shard=a`), for sharding a
    /// fleet across controllers; every Agent when unset.
    #[arg(long, env = "AGENTRY_AGENT_SELECTOR")]
    agent_selector: Option<String>,
    /// The controller's own namespace, holding its Lease, CA Secret and published ConfigMaps.
    #[arg(long, env = "POD_NAMESPACE", default_value = "agentry-system")]
    namespace: String,
    /// Name of the coordination.k8s.io Lease used for leader election.
    #[arg(long, default_value = "agentry-controller")]
    lease_name: String,
    /// How long the leader's Lease lasts without renewal (a standby takes over after this).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// This replica's identity in the Lease (default: hostname-pid).
    #[arg(long, env = "POD_NAME")]
    replica: Option<String>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1:9464", env = "AGENTRY_OPS_ADDR")]
    ops_addr: SocketAddr,
    /// Data directory (e.g. a PersistentVolume's root; never chmod-ed): the SQLite ledger lives
    /// in its `ledger/` subdirectory (created 0700; files 0600).
    #[arg(long, default_value = "/var/lib/agentry", env = "AGENTRY_DATA_DIR")]
    data_dir: PathBuf,
    /// SPIFFE trust domain of agent identities.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Secret (in --namespace) holding the CA as tls.crt/tls.key. Created when missing; create it
    /// first to bring your own CA (for example one issued by cert-manager).
    #[arg(long, default_value = "agentry-ca")]
    ca_secret: String,
    /// Lifetime of a CA the controller creates.
    #[arg(long, default_value = "87600h", value_parser = parse_duration)]
    ca_validity: Duration,
    /// Secret (in --namespace) holding the token signing keys.
    #[arg(long, default_value = "agentry-token-signing")]
    signing_secret: String,
    /// Replace the token signing key when it is older than this (the old key stays published 24h).
    #[arg(long, default_value = "720h", value_parser = parse_duration)]
    signing_key_rotation: Duration,
    /// How long a new token signing key is published in the JWKS before it signs (verifiers
    /// with a cached JWKS learn it first); the next key is generated this long before rotation.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    jwks_propagation: Duration,
    /// How long each CA rotation step (prepare -> activate -> retire) waits for consumers to
    /// pick up the new trust bundle.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    ca_rotation_overlap: Duration,
    /// How often the leader checks signing-key age, CA rotation steps and the CRL.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    maintenance_interval: Duration,
    /// The longest a healthy Agent waits for its next full pass (renewals come back at their
    /// own times). A pass over a healthy Agent writes nothing.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    resync_interval: Duration,
    /// How many Agents are reconciled at once (0: no limit).
    #[arg(long, default_value_t = 32)]
    concurrency: u16,
    /// Give each Agent's Service a cluster IP (a virtual IP through kube-proxy). Off by
    /// default: Agent Services are headless, `<agent>.<namespace>.svc` resolves to the Agent's
    /// pod, and no cluster IP is allocated (the apiserver allocates them one at a time, and a
    /// fleet can outgrow the service range). A cluster IP cannot be added or removed in place:
    /// changing this replaces each existing Agent's Service once.
    #[arg(long)]
    agent_service_cluster_ip: bool,
    /// Gather an Agent's triggers for this long before its pass (each new one restarts the
    /// wait): the events of a rollout (children created, the Deployment observed, updated,
    /// available) then cost one pass instead of one each. 0 turns it off.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    reconcile_debounce: Duration,
    /// Requests per second the controller sends the apiserver, on average (0: no client-side
    /// limit). Bounds bursts such as a CA rotation re-issuing every Agent. Leader election has
    /// its own unlimited connection, so a throttled controller never loses its Lease. An Agent
    /// takes ~13 requests to Ready: the default lets ~37 Agents a second through, above what
    /// the control plane itself takes in the benchmark (docs/scale.md).
    #[arg(long, default_value_t = 500.0)]
    kube_api_qps: f64,
    /// Requests the controller may send at once above --kube-api-qps before waiting.
    #[arg(long, default_value_t = 1000)]
    kube_api_burst: u32,
    /// The `iss` of agent tokens (default: https://agentry.<namespace>.svc).
    #[arg(long)]
    token_issuer: Option<String>,
    /// The `aud` of agent tokens.
    #[arg(long, default_value = "agentry")]
    token_audience: String,
    /// Run this shell command after acquiring the leader Lease and before opening the ledger
    /// (e.g. restore the newest Litestream replica; $AGENTRY_DATA_DIR is set). A failure stops
    /// the replica leading. See docs/ha.md.
    #[arg(long, env = "AGENTRY_ON_LEAD_EXEC")]
    on_lead_exec: Option<String>,
    /// Run this shell command while leading (started after --on-lead-exec, killed when
    /// leadership ends), e.g. `litestream replicate`: only the leader replicates. See docs/ha.md.
    #[arg(long, env = "AGENTRY_WHILE_LEADING_EXEC")]
    while_leading_exec: Option<String>,
    /// Recovery from a ledger behind the published CRL (condition reason LedgerBehindCRL):
    /// apply the revocations of the published CRL, verified against the CA, to the ledger and
    /// resume. Only when the ledger cannot be restored from its replica; see docs/ha.md.
    #[arg(long)]
    adopt_published_crl: bool,
    /// Testing only: divide every certificate and token lifetime by N, to watch renewals quickly.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    ttl_divisor: u32,
    /// Address of the agent API (HTTPS, mTLS; served by the leader only). Empty: no API.
    #[arg(long, default_value = "0.0.0.0:8443", env = "AGENTRY_API_ADDR")]
    api_addr: String,
    /// The URL agents reach the API at; card URLs are built on it
    /// (default: https://<api-service>.<namespace>.svc:8443).
    #[arg(long, env = "AGENTRY_API_URL")]
    api_url: Option<String>,
    /// The API's Service name: its DNS names go on the API's certificate.
    #[arg(long, default_value = "agentry-api")]
    api_service: String,
    /// More names or IP addresses for the API's certificate (repeatable), e.g. 127.0.0.1 for a
    /// port-forward.
    #[arg(long = "api-san")]
    api_sans: Vec<String>,
    /// The audience a ServiceAccount token must carry for CSR bootstrap
    /// (`POST /v1/agents/{ns}/{name}/csr`).
    #[arg(long, default_value = "agentry")]
    csr_audience: String,
    /// The image of the `agentry sidecar` container added to every agent pod (registers the
    /// agent, keeps its token fresh, serves it on localhost). Empty: no sidecar. Ignored
    /// without the API.
    #[arg(long, env = "AGENTRY_SIDECAR_IMAGE", default_value = concat!("ghcr.io/agentry-dev/agentry:", env!("CARGO_PKG_VERSION")))]
    sidecar_image: String,
    /// How often the backup manager runs when nothing changes (schedules, retries, retention;
    /// changes to backup resources trigger it at once). Backups need the API.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    backup_interval: Duration,
    /// How often BackupLocations are re-validated.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    backup_location_check: Duration,
    /// A New AgentBackup whose data has not arrived within this fails.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    backup_pickup_timeout: Duration,
    /// The first retry of a failed copy to the secondary store (then doubling, up to 10m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    backup_retry_base: Duration,
    /// Manage only BackupLocations matching this label selector (sharding, tests).
    #[arg(long)]
    backup_location_selector: Option<String>,
    #[command(flatten)]
    redis: RedisArgs,
    /// The Redis URL(s) agents are given in their identity Secret (`redis.json`), when they
    /// reach Redis at another address than the controller (default: --redis-url).
    #[arg(long, value_delimiter = ',')]
    redis_agent_url: Vec<String>,
    /// Connections in the controller's Redis pool (each multiplexed); the relay adds one per
    /// shard for its blocking reads.
    #[arg(long, default_value_t = agentry::messaging::conn::DEFAULT_POOL_SIZE as u16, value_parser = clap::value_parser!(u16).range(1..=256))]
    redis_pool_size: u16,
    /// Outbox shards: the relay reads each shard's outboxes with one blocking read.
    #[arg(long, default_value_t = agentry::messaging::DEFAULT_SHARDS, value_parser = clap::value_parser!(u16).range(1..=1024))]
    relay_shards: u16,
    /// The largest message body the relay delivers (bigger ones are refused with a notice to
    /// the sender).
    #[arg(long, default_value = "64Ki", value_parser = parse_body_limit)]
    message_body_limit: usize,
}

/// How the controller reaches Redis (`agentry controller`, and `agentry verify` to check it).
#[derive(Args, Debug, Clone)]
pub struct RedisArgs {
    /// Redis for agent messaging, as redis://host:port or rediss://host:port (TLS); with
    /// --redis-cluster, comma-separated seed nodes of a Redis Cluster. Unset: no messaging
    /// (Agents with spec.messaging report MessagingReady Unknown, NotConfigured), and
    /// `agentry verify` skips its Redis check.
    #[arg(long, value_delimiter = ',')]
    redis_url: Vec<String>,
    /// The --redis-url nodes are a Redis Cluster.
    #[arg(long)]
    redis_cluster: bool,
    /// The controller's Redis user: it creates agents' ACL users, streams and groups, and relays
    /// messages (needs `+@all ~* &*`, or at least ACL, stream commands and DEL on `agentry:*`).
    #[arg(long, default_value = "default")]
    redis_username: String,
    /// A file holding that user's password (e.g. a mounted Secret). The environment variable
    /// AGENTRY_REDIS_PASSWORD is read when this is unset.
    #[arg(long)]
    redis_password_file: Option<PathBuf>,
}

impl RedisArgs {
    /// The connection these flags describe; None without a URL.
    pub fn target(&self) -> Result<Option<agentry::messaging::conn::Target>, String> {
        let urls: Vec<String> = self
            .redis_url
            .iter()
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Ok(None);
        }
        let password = match &self.redis_password_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("--redis-password-file {}: {e}", path.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            ),
            None => std::env::var("AGENTRY_REDIS_PASSWORD").ok(),
        };
        let target = agentry::messaging::conn::Target {
            urls,
            cluster: self.redis_cluster,
            username: Some(self.redis_username.clone()),
            password,
        };
        target.validate()?;
        Ok(Some(target))
    }
}

fn parse_body_limit(s: &str) -> Result<usize, String> {
    let bytes = agentry::crd::units::parse_memory(s)?;
    if bytes == 0 || bytes > 64 * 1024 * 1024 {
        return Err("give a size from 1 to 64Mi, e.g. 64Ki".into());
    }
    Ok(bytes as usize)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    agentry::crd::units::parse_duration(s)
}

/// `agentry ca status`: the rotation phase and the CAs in play.
pub fn render_ca_status(set: &CaSet, dropped: &[String], now: i64) -> String {
    let expired = set.active.is_expired_at(now);
    let mut out = format!(
        "phase: {}\nsigning CA: sha256:{} ({} {})\n",
        set.phase.render().unwrap_or_else(|| "idle".into()),
        set.active.fingerprint(),
        if expired { "EXPIRED at" } else { "expires" },
        set.active.not_after()
    );
    if expired {
        out.push_str("the signing CA has expired: nothing can be issued; run `agentry ca rotate` to replace it at once\n");
    }
    for note in dropped {
        out.push_str(&format!("{note}\n"));
    }
    if let Some(n) = &set.next {
        out.push_str(&format!(
            "next CA (trusted, not yet signing): sha256:{}\n",
            n.fingerprint()
        ));
    }
    if let Some(p) = &set.previous {
        out.push_str(&format!(
            "previous CA (trusted until retired): sha256:{}\n",
            p.fingerprint()
        ));
    }
    out
}

impl ControllerArgs {
    fn messaging(&self) -> Result<Option<agentry::controller::messaging::MessagingConfig>, String> {
        let Some(target) = self.redis.target()? else {
            return Ok(None);
        };
        let urls = target.urls.clone();
        let agent_urls = if self.redis_agent_url.is_empty() {
            urls
        } else {
            self.redis_agent_url.clone()
        };
        Ok(Some(agentry::controller::messaging::MessagingConfig {
            target,
            agent_urls,
            pool_size: usize::from(self.redis_pool_size),
            shards: self.relay_shards,
            body_limit: self.message_body_limit,
        }))
    }

    /// The agent API's settings; None with `--api-addr ""`.
    fn api(&self) -> Result<Option<agentry::controller::ApiConfig>, String> {
        match self.api_addr.trim() {
            "" => Ok(None),
            addr => addr
                .parse::<SocketAddr>()
                .map(|addr| {
                    Some(agentry::controller::ApiConfig {
                        addr,
                        public_url: self.api_url.clone().unwrap_or_else(|| {
                            format!("https://{}.{}.svc:8443", self.api_service, self.namespace)
                        }),
                        sans: agentry::api::server::dns_names(
                            &self.namespace,
                            &self.api_service,
                            &self.api_sans,
                        ),
                        csr_audience: self.csr_audience.clone(),
                    })
                })
                .map_err(|e| format!("--api-addr {addr:?}: {e}; give host:port such as 0.0.0.0:8443, or \"\" for no API")),
        }
    }

    /// The controller's configuration from its flags.
    pub fn into_config(self) -> Result<agentry::controller::Config, String> {
        let messaging = self.messaging()?;
        let api = self.api()?;
        let replica = self.replica.unwrap_or_else(|| {
            let host = hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "agentry".into());
            format!("{host}-{}", std::process::id())
        });
        let sidecar = api
            .as_ref()
            .filter(|_| !self.sidecar_image.trim().is_empty())
            .map(|api| agentry::workload::SidecarSpec {
                image: self.sidecar_image.clone(),
                api_url: api.public_url.clone(),
            });
        let backup = api
            .as_ref()
            .map(|_| agentry::controller::backups::BackupConfig {
                interval: self.backup_interval,
                validate_every: self.backup_location_check,
                pickup_timeout: self.backup_pickup_timeout,
                retry_base: self.backup_retry_base,
                location_selector: self.backup_location_selector.filter(|s| !s.is_empty()),
            });
        Ok(agentry::controller::Config {
            messaging,
            backup,
            api,
            sidecar,
            watch_namespace: self.watch_namespace.filter(|n| !n.is_empty()),
            agent_selector: self.agent_selector.filter(|s| !s.is_empty()),
            namespace: self.namespace.clone(),
            lease_name: self.lease_name,
            lease_duration: self.lease_duration,
            replica,
            ops_addr: self.ops_addr,
            authority: agentry::identity::authority::AuthorityConfig {
                token_issuer: self
                    .token_issuer
                    .unwrap_or_else(|| format!("https://agentry.{}.svc", self.namespace)),
                namespace: self.namespace,
                ca_secret: self.ca_secret,
                signing_secret: self.signing_secret,
                ca_configmap: agentry::keys::CA_CONFIGMAP.into(),
                jwks_configmap: agentry::keys::JWKS_CONFIGMAP.into(),
                trust_domain: self.trust_domain,
                token_audience: self.token_audience,
                ca_validity: self.ca_validity,
                signing_key_rotation: self.signing_key_rotation,
                jwks_propagation: self.jwks_propagation,
                ca_rotation_overlap: self.ca_rotation_overlap,
                data_dir: self.data_dir,
                ttl_divisor: self.ttl_divisor,
            },
            maintenance_interval: self.maintenance_interval,
            resync: self.resync_interval.max(Duration::from_secs(1)),
            concurrency: self.concurrency,
            service_cluster_ip: self.agent_service_cluster_ip,
            debounce: self.reconcile_debounce,
            api_rate: (self.kube_api_qps > 0.0).then_some(agentry::controller::ApiRate {
                qps: self.kube_api_qps,
                burst: self.kube_api_burst.max(1),
            }),
            ha: agentry::controller::HaConfig {
                on_lead_exec: self.on_lead_exec.filter(|c| !c.trim().is_empty()),
                while_leading_exec: self.while_leading_exec.filter(|c| !c.trim().is_empty()),
                adopt_published_crl: self.adopt_published_crl,
            },
        })
    }
}
