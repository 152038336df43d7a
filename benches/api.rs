//! Agent API benchmarks (BENCHMARKS.md, area `api`), in process, no cluster:
//! - `POST /v1/agents/register` over mTLS through our real server (`api::server`: router,
//!   rustls config, `serve`), 64 client connections, against the same server stack (same
//!   `serve`, same TLS config, same client certificates, same request) answering a static body
//!   on one route. Requests/s, p50/p99 latency, and the server's CPU time per request.
//! - Discovery by capability over 10,000 cached Agents: `agents::discover_in` directly
//!   (queries/s and latency), and `GET /v1/agents?capability=...` over the same 64 connections.
//!
//! The setup is production's minus the cluster: an `Authority` over a fresh CA and one signing
//! key, the ledger on disk (WAL, synchronous=FULL), an Agent watch cache filled through its
//! reflector `Writer`, a registrar that writes nothing (a repeat registration writes nothing in
//! production either) and a TokenReview that refuses. Each of the 64 connections is its own
//! agent (its own certificate, ledger row and token), so the chain-check cache, the ledger and
//! the Agent cache are looked up per agent as they would be.
//!
//! The server and the client share the machine: they run on two tokio runtimes (2 workers each,
//! threads named `api-server` / `api-client`) so the server's own CPU time can be read per
//! thread from /proc and reported per request beside the throughput. Client connections are
//! HTTP/1.1 keep-alive (`http1_only`), so each client task is exactly one TLS connection.
//!
//! `AGENTRY_BENCH_API_PROFILE=1` runs only our register side (no report), for a profiler.

mod report;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentry::api::auth::{self, PeerCertificate};
use agentry::api::state::{ApiSettings, ApiState, Registrar, TokenReviewer};
use agentry::api::{agents, server};
use agentry::crd::{Agent, RegistrationStatus};
use agentry::identity::authority::{Authority, AuthorityConfig};
use agentry::identity::ca::{CertificateAuthority, LeafRequest, service_dns_names};
use agentry::identity::jwt::{SigningKey, TokenIssuer};
use agentry::identity::rotation::CaSet;
use agentry::identity::store::Ledger;
use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, header};
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::PartialObjectMeta;
use kube::core::DeserializeGuard;
use kube::runtime::{reflector, watcher};
use report::Row;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Client connections (one agent each).
const CONNECTIONS: usize = 64;
/// Agents in the watch cache.
const AGENTS: usize = 10_000;
/// Every agent offers `summarize` and one of this many other capabilities (`cap-<i % N>`), so
/// a query for `cap-7` matches AGENTS / N of them.
const SELECTIVE_CAPS: usize = 100;
const NAMESPACE: &str = "bench";
const TRUST_DOMAIN: &str = "cluster.local";

/// Counts registrations that would have been written (the first of each agent).
#[derive(Default)]
struct CountingRegistrar(AtomicU64);

impl Registrar for CountingRegistrar {
    fn record<'a>(
        &'a self,
        _namespace: &'a str,
        _name: &'a str,
        _registration: &'a RegistrationStatus,
    ) -> BoxFuture<'a, Result<(), String>> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Box::pin(async { Ok(()) })
    }
}

struct RefusingReviewer;

impl TokenReviewer for RefusingReviewer {
    fn review<'a>(
        &'a self,
        _token: &'a str,
        _audience: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, String>> {
        Box::pin(async { Ok(None) })
    }
}

/// One benchmark agent's credentials.
struct Credentials {
    name: String,
    cert_pem: String,
    key_pem: String,
    token: String,
}

fn agent_name(i: usize) -> String {
    format!("agent-{i}")
}

fn agent_uid(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012}")
}

/// A Ready Agent as the controller leaves it (identity issued, resources assigned).
fn agent(i: usize, serial: &str) -> Agent {
    let name = agent_name(i);
    serde_json::from_value(json!({
        "apiVersion": "agentry.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {
            "name": name, "namespace": NAMESPACE, "uid": agent_uid(i),
            "generation": 1, "resourceVersion": (1000 + i).to_string(),
        },
        "spec": {
            "capabilities": ["summarize", format!("cap-{}", i % SELECTIVE_CAPS)],
            "permissions": ["agents:discover"],
            "template": {"image": "ghcr.io/example/summarizer:1.4"},
            "resources": {"memory": "384Mi", "cpu": "250m"}
        },
        "status": {
            "phase": "Ready",
            "observedGeneration": 1,
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "AllReady", "message": "ready",
                "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1
            }],
            "identity": {
                "spiffeID": agentry::identity::ca::spiffe_id(TRUST_DOMAIN, NAMESPACE, &name),
                "serial": serial,
                "notAfter": "2026-12-31T00:00:00Z",
                "tokenExpiresAt": "2026-12-31T00:00:00Z",
                "secretName": format!("{name}-identity"),
            },
            "assignedResources": {"memory": "384Mi", "cpu": "250m"},
            "endpoint": format!("http://{name}.{NAMESPACE}.svc:8080"),
        }
    }))
    .expect("a valid Agent")
}

struct Fixture {
    _dir: tempfile::TempDir,
    authority: Arc<Authority>,
    state: Arc<ApiState>,
    registrar: Arc<CountingRegistrar>,
    creds: Vec<Credentials>,
    ca_pem: String,
    ours: std::net::SocketAddr,
    baseline: std::net::SocketAddr,
    _writers: (
        reflector::store::Writer<DeserializeGuard<Agent>>,
        reflector::store::Writer<PartialObjectMeta<Namespace>>,
    ),
    _changed: futures::channel::mpsc::UnboundedReceiver<()>,
}

/// Builds the authority, caches and both servers. Runs on the server runtime (the servers'
/// tasks are spawned there).
async fn fixture(cancel: CancellationToken) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = AuthorityConfig {
        namespace: "agentry-system".into(),
        ca_secret: "agentry-ca".into(),
        signing_secret: "agentry-token-signing".into(),
        ca_configmap: "agentry-ca".into(),
        jwks_configmap: "agentry-jwks".into(),
        trust_domain: TRUST_DOMAIN.into(),
        token_issuer: "https://agentry.agentry-system.svc".into(),
        token_audience: "agentry".into(),
        ca_validity: Duration::from_secs(30 * 86400),
        signing_key_rotation: Duration::from_secs(30 * 86400),
        jwks_propagation: Duration::from_secs(600),
        ca_rotation_overlap: Duration::from_secs(3600),
        data_dir: dir.path().to_path_buf(),
        ttl_divisor: 1,
    };
    let ledger = Arc::new(Ledger::open(dir.path()).unwrap());
    let ca = CertificateAuthority::generate("agentry bench CA", config.ca_validity).unwrap();
    let tokens = TokenIssuer::new(
        config.token_issuer.clone(),
        config.token_audience.clone(),
        vec![SigningKey::generate(0).unwrap()],
    )
    .unwrap();
    let (authority, changed) = Authority::standalone(config, CaSet::single(ca), tokens, ledger);
    let authority = Arc::new(authority);
    let ca_pem = authority.bundle();

    // The benchmark agents' certificates (in the ledger) and tokens.
    let signer = authority.ca();
    let issuer = authority.tokens();
    let now = jsonwebtoken::get_current_timestamp();
    let mut creds = Vec::new();
    let mut serials = Vec::new();
    for i in 0..CONNECTIONS {
        let name = agent_name(i);
        let leaf = signer
            .issue(
                &authority.ledger,
                &LeafRequest {
                    agent_uid: agent_uid(i),
                    agent_created: now as i64,
                    namespace: NAMESPACE.into(),
                    name: name.clone(),
                    trust_domain: TRUST_DOMAIN.into(),
                    dns_names: service_dns_names(NAMESPACE, &name),
                    ttl: Duration::from_secs(86400),
                },
            )
            .unwrap();
        let (token, _) = issuer
            .mint(
                &leaf.record.spiffe_id,
                "agents:discover",
                Duration::from_secs(3600),
                &leaf.cert_der,
                now,
            )
            .unwrap();
        serials.push(leaf.record.serial.clone());
        creds.push(Credentials {
            name,
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
            token,
        });
    }

    // The Agent watch cache, filled as a watcher's initial list fills it.
    let (agents_store, mut agents_writer) = reflector::store::<DeserializeGuard<Agent>>();
    agents_writer.apply_watcher_event(&watcher::Event::Init);
    for i in 0..AGENTS {
        let serial = serials
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("{i:032x}"));
        agents_writer.apply_watcher_event(&watcher::Event::InitApply(DeserializeGuard(Ok(agent(
            i, &serial,
        )))));
    }
    agents_writer.apply_watcher_event(&watcher::Event::InitDone);
    assert_eq!(agents_store.len(), AGENTS);
    let (namespaces, mut ns_writer) = reflector::store::<PartialObjectMeta<Namespace>>();
    ns_writer.apply_watcher_event(&watcher::Event::Init);
    // The namespace allows agents:discover (as a cluster operator would annotate it), so the
    // discovery callers' tokens are honoured.
    let mut bench_ns = PartialObjectMeta::<Namespace>::default();
    bench_ns.metadata.name = Some("bench".into());
    bench_ns.metadata.annotations = Some(
        [(
            agentry::keys::ALLOWED_PERMISSIONS_ANNOTATION.to_string(),
            "*".to_string(),
        )]
        .into(),
    );
    ns_writer.apply_watcher_event(&watcher::Event::InitApply(bench_ns));
    ns_writer.apply_watcher_event(&watcher::Event::InitDone);

    let registrar = Arc::new(CountingRegistrar::default());
    let state = Arc::new(ApiState::new(
        authority.clone(),
        agents_store,
        namespaces,
        registrar.clone(),
        Arc::new(RefusingReviewer),
        ApiSettings {
            public_url: "https://agentry-api.agentry-system.svc:8443".into(),
            csr_audience: "agentry".into(),
        },
    ));

    let identity = server::ServerIdentity::issue(&authority, vec!["127.0.0.1".into()])
        .await
        .unwrap();
    let tls = server::tls_config(identity).unwrap();
    let local = "127.0.0.1:0".parse().unwrap();
    let (ours, _) = server::serve(
        local,
        server::router(state.clone()),
        tls.clone(),
        cancel.clone(),
    )
    .await
    .unwrap();
    // The baseline reads the request body (as register does) and answers a static body.
    let static_app = axum::Router::new().route(
        "/static",
        axum::routing::post(|_body: Bytes| async {
            (
                [(header::CONTENT_TYPE, "application/json")],
                "{\"ok\":true}",
            )
        }),
    );
    let (baseline, _) = server::serve(local, static_app, tls, cancel).await.unwrap();

    Fixture {
        _dir: dir,
        authority,
        state,
        registrar,
        creds,
        ca_pem,
        ours,
        baseline,
        _writers: (agents_writer, ns_writer),
        _changed: changed,
    }
}

/// One HTTP/1.1 keep-alive connection presenting `c`'s certificate.
fn client(ca_pem: &str, c: &Credentials) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap()])
        .identity(
            reqwest::Identity::from_pem(format!("{}{}", c.cert_pem, c.key_pem).as_bytes()).unwrap(),
        )
        .http1_only()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// What each client task sends, again and again.
#[derive(Clone)]
struct Plan {
    client: reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: String,
    body: Option<Bytes>,
}

impl Plan {
    async fn once(&self) -> Duration {
        let start = Instant::now();
        let mut req = self
            .client
            .request(self.method.clone(), &self.url)
            .bearer_auth(&self.token);
        if let Some(body) = &self.body {
            req = req
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.clone());
        }
        let response = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} {}: {e:?}", self.method, self.url));
        let status = response.status();
        let body = response.bytes().await.unwrap();
        let took = start.elapsed();
        assert!(
            status == reqwest::StatusCode::OK,
            "{} {}: {status} {}; a benchmark of refusals would be meaningless",
            self.method,
            self.url,
            String::from_utf8_lossy(&body)
        );
        std::hint::black_box(body);
        took
    }
}

/// Nanoseconds of CPU the threads whose name starts with `prefix` have used
/// (/proc/self/task/*/schedstat; 0 where /proc is not there).
fn thread_cpu_ns(prefix: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .filter_map(|t| {
            std::fs::read_to_string(t.path().join("schedstat"))
                .ok()?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

const SERVER_THREADS: &str = "api-server";
/// Set: run only our register side for `AGENTRY_BENCH_SECONDS`, write no report.
const PROFILE_ENV: &str = "AGENTRY_BENCH_API_PROFILE";

/// What one side measured.
#[derive(Default)]
struct Measured {
    requests: u64,
    elapsed: Duration,
    server_cpu_ns: u64,
    latencies_ns: Vec<u64>,
}

impl Measured {
    fn per_sec(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn percentile_ms(&mut self, p: f64) -> f64 {
        self.latencies_ns.sort_unstable();
        percentile(&self.latencies_ns, p) / 1e6
    }
    fn server_cpu_us_per_request(&self) -> f64 {
        self.server_cpu_ns as f64 / 1e3 / self.requests as f64
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

/// Every plan in its own task, requests back to back for `slice`; adds to `into` when given.
async fn run_slice(plans: &[Plan], slice: Duration, into: Option<&mut Measured>) {
    let cpu_before = thread_cpu_ns(SERVER_THREADS);
    let start = Instant::now();
    let deadline = start + slice;
    let tasks: Vec<_> = plans
        .iter()
        .cloned()
        .map(|plan| {
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(4096);
                while Instant::now() < deadline {
                    latencies.push(plan.once().await.as_nanos() as u64);
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    let cpu = thread_cpu_ns(SERVER_THREADS).saturating_sub(cpu_before);
    if let Some(m) = into {
        m.requests += all.len() as u64;
        m.elapsed += elapsed;
        m.server_cpu_ns += cpu;
        m.latencies_ns.extend(all);
    }
}

/// Alternating slices of `ours` and `baseline` (so noise hits both alike), `total` each, after
/// a `warmup` of each.
async fn compare(
    ours: &[Plan],
    baseline: &[Plan],
    warmup: Duration,
    total: Duration,
) -> (Measured, Measured) {
    // The first request of every connection asserts 200 (`Plan::once` asserts every one).
    run_slice(baseline, warmup, None).await;
    run_slice(ours, warmup, None).await;
    let rounds = 4;
    let slice = total / rounds;
    let (mut m_ours, mut m_base) = (Measured::default(), Measured::default());
    for _ in 0..rounds {
        run_slice(baseline, slice, Some(&mut m_base)).await;
        run_slice(ours, slice, Some(&mut m_ours)).await;
    }
    (m_ours, m_base)
}

async fn measure(plans: &[Plan], warmup: Duration, total: Duration) -> Measured {
    run_slice(plans, warmup, None).await;
    let mut m = Measured::default();
    run_slice(plans, total, Some(&mut m)).await;
    m
}

/// Calls `f` back to back for `total` on this thread; returns calls/s and sorted latencies (ns).
fn time_calls(total: Duration, mut f: impl FnMut()) -> (f64, Vec<u64>) {
    let warm = Instant::now();
    while warm.elapsed() < total / 8 {
        f();
    }
    let mut latencies = Vec::new();
    let start = Instant::now();
    while start.elapsed() < total {
        let t = Instant::now();
        f();
        latencies.push(t.elapsed().as_nanos() as u64);
    }
    let rate = latencies.len() as f64 / start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    (rate, latencies)
}

fn runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

fn main() {
    let seconds: f64 = std::env::var("AGENTRY_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4.0);
    let total = Duration::from_secs_f64(seconds);
    let warmup = Duration::from_secs(1);
    let server_rt = runtime(SERVER_THREADS);
    let client_rt = runtime("api-client");
    let cancel = CancellationToken::new();
    let fx = server_rt.block_on(fixture(cancel.clone()));
    let mut rows = Vec::new();

    // Register vs a static body, same server stack, 64 connections each.
    let clients: Vec<reqwest::Client> = fx.creds.iter().map(|c| client(&fx.ca_pem, c)).collect();
    let plan = |i: usize, method: reqwest::Method, url: String, body: Option<Bytes>| Plan {
        client: clients[i].clone(),
        method,
        url,
        token: fx.creds[i].token.clone(),
        body,
    };
    let register_body = |i: usize| {
        Some(Bytes::from(
            json!({"id": format!("{NAMESPACE}/{}", fx.creds[i].name), "capabilities": ["summarize"]})
                .to_string(),
        ))
    };
    let ours: Vec<Plan> = (0..CONNECTIONS)
        .map(|i| {
            plan(
                i,
                reqwest::Method::POST,
                format!("https://{}/v1/agents/register", fx.ours),
                register_body(i),
            )
        })
        .collect();
    // Separate clients, so the baseline's connections are its own (same certificates).
    let base_clients: Vec<reqwest::Client> =
        fx.creds.iter().map(|c| client(&fx.ca_pem, c)).collect();
    let baseline: Vec<Plan> = (0..CONNECTIONS)
        .map(|i| Plan {
            client: base_clients[i].clone(),
            ..plan(
                i,
                reqwest::Method::POST,
                format!("https://{}/static", fx.baseline),
                register_body(i),
            )
        })
        .collect();
    if std::env::var_os(PROFILE_ENV).is_some() {
        // Our register side alone, for a profiler (e.g. `perf record`, then `perf report
        // --comm api-server`).
        let m = client_rt.block_on(measure(&ours, warmup, total));
        println!(
            "register alone: {:.0} req/s, {:.1} us server CPU per request",
            m.per_sec(),
            m.server_cpu_us_per_request()
        );
        return;
    }
    let (mut m_ours, mut m_base) = client_rt.block_on(compare(&ours, &baseline, warmup, total));
    let (rate_ours, rate_base) = (m_ours.per_sec(), m_base.per_sec());
    rows.push(Row {
        name: "register_mtls_64conn",
        ours: rate_ours,
        baseline: rate_base,
        unit: "req/s",
        ratio: rate_ours / rate_base,
        baseline_is: "the same server::serve, TLS config, client certs and request; reads the body, answers a static one",
        target: ">= 0.5",
        extra: vec![
            ("connections", CONNECTIONS as f64),
            ("p50_ms", m_ours.percentile_ms(50.0)),
            ("p99_ms", m_ours.percentile_ms(99.0)),
            ("baseline_p50_ms", m_base.percentile_ms(50.0)),
            ("baseline_p99_ms", m_base.percentile_ms(99.0)),
            ("server_cpu_us_per_req", m_ours.server_cpu_us_per_request()),
            (
                "baseline_server_cpu_us_per_req",
                m_base.server_cpu_us_per_request(),
            ),
            (
                "registrar_writes",
                fx.registrar.0.load(Ordering::Relaxed) as f64,
            ),
        ],
    });

    // Discovery over the cache, in process.
    let selective = vec!["cap-7".to_string()];
    let found = agents::discover_in(&fx.state, NAMESPACE, &selective).len();
    assert_eq!(found, AGENTS / SELECTIVE_CAPS);
    let (rate, lat) = time_calls(total, || {
        std::hint::black_box(agents::discover_in(&fx.state, NAMESPACE, &selective));
    });
    rows.push(Row {
        name: "discover_in_10k_selective",
        ours: rate,
        baseline: f64::NAN,
        unit: "queries/s",
        ratio: f64::NAN,
        baseline_is: "none; agents::discover_in, one thread, 100 of 10,000 cached Agents match",
        target: "reported",
        extra: vec![
            ("agents", AGENTS as f64),
            ("matches", found as f64),
            ("p50_us", percentile(&lat, 50.0) / 1e3),
            ("p99_us", percentile(&lat, 99.0) / 1e3),
        ],
    });
    let broad = vec!["summarize".to_string()];
    let found = agents::discover_in(&fx.state, NAMESPACE, &broad).len();
    let (rate, lat) = time_calls(total, || {
        std::hint::black_box(agents::discover_in(&fx.state, NAMESPACE, &broad));
    });
    rows.push(Row {
        name: "discover_in_10k_broad",
        ours: rate,
        baseline: f64::NAN,
        unit: "queries/s",
        ratio: f64::NAN,
        baseline_is: "none; agents::discover_in, one thread, all 10,000 match, answer capped",
        target: "reported",
        extra: vec![
            ("agents", AGENTS as f64),
            ("answered", found as f64),
            ("p50_us", percentile(&lat, 50.0) / 1e3),
            ("p99_us", percentile(&lat, 99.0) / 1e3),
        ],
    });

    // Discovery over HTTP, the same 64 connections (tokens carry agents:discover).
    let discover: Vec<Plan> = (0..CONNECTIONS)
        .map(|i| {
            plan(
                i,
                reqwest::Method::GET,
                format!("https://{}/v1/agents?capability=cap-7", fx.ours),
                None,
            )
        })
        .collect();
    let mut m = client_rt.block_on(measure(&discover, warmup, total));
    rows.push(Row {
        name: "discover_http_10k_selective",
        ours: m.per_sec(),
        baseline: f64::NAN,
        unit: "req/s",
        ratio: f64::NAN,
        baseline_is: "none; GET /v1/agents?capability=cap-7 (100 matches), mTLS, 64 connections",
        target: "reported",
        extra: vec![
            ("connections", CONNECTIONS as f64),
            ("p50_ms", m.percentile_ms(50.0)),
            ("p99_ms", m.percentile_ms(99.0)),
            ("server_cpu_us_per_req", m.server_cpu_us_per_request()),
        ],
    });

    // Where register's time goes: the authentication alone (certificate chain check through
    // its cache, ledger row and token revocation reads on the blocking pool, ES256 verify),
    // 64 tasks on the server runtime, no HTTP.
    let auth_inputs: Vec<(PeerCertificate, HeaderMap)> = fx
        .creds
        .iter()
        .map(|c| {
            let der = agentry::identity::ca::pem_to_der(&c.cert_pem).unwrap();
            let mut headers = HeaderMap::new();
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {}", c.token)).unwrap(),
            );
            (PeerCertificate(Some(Arc::from(der))), headers)
        })
        .collect();
    let auth_inputs = Arc::new(auth_inputs);
    let (rate, lat, auth_cpu_us) = server_rt.block_on(async {
        let run = |slice: Duration| {
            let deadline = Instant::now() + slice;
            let tasks: Vec<_> = (0..CONNECTIONS)
                .map(|i| {
                    let (state, inputs) = (fx.state.clone(), auth_inputs.clone());
                    tokio::spawn(async move {
                        let (peer, headers) = &inputs[i];
                        let mut lat = Vec::new();
                        while Instant::now() < deadline {
                            let t = Instant::now();
                            let caller = auth::caller(&state, peer, headers, None).await;
                            assert!(caller.is_ok(), "auth::caller refused a benchmark agent");
                            lat.push(t.elapsed().as_nanos() as u64);
                        }
                        lat
                    })
                })
                .collect();
            async move {
                let start = Instant::now();
                let mut all = Vec::new();
                for t in tasks {
                    all.extend(t.await.unwrap());
                }
                (all.len() as f64 / start.elapsed().as_secs_f64(), all)
            }
        };
        run(warmup).await;
        let cpu_before = thread_cpu_ns(SERVER_THREADS);
        let (rate, mut lat) = run(total / 2).await;
        let cpu_ns = thread_cpu_ns(SERVER_THREADS).saturating_sub(cpu_before);
        lat.sort_unstable();
        let cpu_us = cpu_ns as f64 / 1e3 / lat.len() as f64;
        (rate, lat, cpu_us)
    });
    let verify_us = {
        let tokens = fx.authority.tokens();
        let c = &fx.creds[0];
        let der = agentry::identity::ca::pem_to_der(&c.cert_pem).unwrap();
        time_calls(total / 4, || {
            std::hint::black_box(tokens.verifier().verify(&c.token, &der).unwrap());
        })
        .0
        .recip()
            * 1e6
    };
    rows.push(Row {
        name: "auth_caller_only",
        ours: rate,
        baseline: f64::NAN,
        unit: "ops/s",
        ratio: f64::NAN,
        baseline_is: "(diagnostic) auth::caller alone, 64 tasks on the server runtime, no HTTP",
        target: "(diagnostic)",
        extra: vec![
            ("p50_us", percentile(&lat, 50.0) / 1e3),
            ("p99_us", percentile(&lat, 99.0) / 1e3),
            ("server_cpu_us_per_op", auth_cpu_us),
            ("jwt_verify_us_one_thread", verify_us),
        ],
    });

    cancel.cancel();
    report::write("api", &rows);
}
