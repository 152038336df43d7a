//! End-to-end harness: the real local control plane (`hack/local-cluster up`, reached through
//! KUBECONFIG), one namespace per test, and controller processes run from the built binary.
#![allow(dead_code)]

pub mod redis;
pub mod s3;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use agentry::crd::Agent;

pub const E2E_LABEL: &str = "agentry.dev/e2e";
/// On a test's BackupLocation: the test namespace whose controller manages it.
pub const LOCATION_LABEL: &str = "agentry.dev/e2e-namespace";

/// A client for the local control plane. Fails loudly when there is none: these tests must run.
pub async fn client() -> Client {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "KUBECONFIG is not set: run the end-to-end tests with `make test` (it starts hack/local-cluster)"
    );
    Client::try_default()
        .await
        .expect("cannot reach the local control plane: is `hack/local-cluster up` running?")
}

/// Installs (server-side apply) the CRDs from the Rust types and waits until they are Established.
pub async fn ensure_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in agentry::crd::all() {
        let name = crd.name_any();
        crds.patch(
            &name,
            &PatchParams::apply("agentry-install").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .unwrap_or_else(|_| panic!("CRD {name} not Established within 30s"))
        .unwrap();
    }
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    let policy = agentry::workload::policy::memory_policy();
    Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .patch(
            &policy.name_any(),
            &PatchParams::apply("agentry-install").force(),
            &Patch::Apply(&policy),
        )
        .await
        .expect("applying the memory admission policy");
    let binding = agentry::workload::policy::memory_policy_binding();
    Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .patch(
            &binding.name_any(),
            &PatchParams::apply("agentry-install").force(),
            &Patch::Apply(&binding),
        )
        .await
        .expect("applying the memory admission policy binding");
}

/// The usual start of a test: a client, the CRDs installed, and a fresh namespace.
pub async fn setup(prefix: &str) -> (Client, TestNamespace) {
    let client = client().await;
    ensure_crds(&client).await;
    let ns = TestNamespace::new(&client, prefix).await;
    (client, ns)
}

/// A namespace that exists for one test and is deleted when dropped.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub async fn new(client: &Client, prefix: &str) -> Self {
        let name = format!("{prefix}-{:08x}", rand::random::<u32>());
        let ns = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(E2E_LABEL.to_string(), "true".to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        Self { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Drop cannot be async; kubectl-free cleanup on a throwaway runtime in its own thread.
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Runtime::new() else {
                return;
            };
            rt.block_on(async {
                if let Ok(client) = Client::try_default().await {
                    let _ = Api::<Namespace>::all(client.clone())
                        .delete(&name, &DeleteParams::background())
                        .await;
                    // The test's controller is gone by now: release its finalizers so the
                    // namespace does not linger on a shared cluster.
                    let agents: Api<Agent> = Api::namespaced(client, &name);
                    if let Ok(list) = agents.list_metadata(&Default::default()).await {
                        for a in list.items {
                            let patch = json!({"metadata": {"finalizers": null}});
                            let _ = agents
                                .patch(
                                    &a.name_any(),
                                    &PatchParams::default(),
                                    &Patch::Merge(&patch),
                                )
                                .await;
                        }
                    }
                }
            });
        })
        .join();
    }
}

/// A free loopback port (bound then released; good enough for tests).
pub fn free_port() -> u16 {
    // Below the kernel's ephemeral range (32768-60999 by default): a port handed out by
    // `bind(:0)` is in that range, and any outgoing connection (a controller's to the
    // apiserver, Redis, S3) may take it before the process meant to listen there binds it.
    // Ports are never handed out twice by one test process.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = rand::random_range(20_000..32_000);
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}

/// The agentry binary the controller processes run: cargo's, or `AGENTRY_TEST_BIN` (a copy of
/// it, when several checkouts share one CARGO_TARGET_DIR and overwrite each other's binary).
pub fn agentry_bin() -> PathBuf {
    std::env::var_os("AGENTRY_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_agentry")))
}

/// An `agentry controller` process scoped to one namespace, killed when dropped.
pub struct ControllerProcess {
    pub child: Child,
    pub ops_port: u16,
    /// The agent API's port (HTTPS on 127.0.0.1; its certificate names 127.0.0.1).
    pub api_port: u16,
    pub log: PathBuf,
    pub replica: String,
    data_dir: PathBuf,
    _data: tempfile::TempDir,
}

pub struct ControllerOptions<'a> {
    pub namespace: &'a str,
    pub replica: &'a str,
    pub lease_duration: &'a str,
    /// Where the ledger lives; a fresh temporary directory when None.
    pub data_dir: Option<&'a Path>,
    /// Another kubeconfig (e.g. one that impersonates the chart's ServiceAccount).
    pub kubeconfig: Option<&'a Path>,
    pub extra_args: Vec<String>,
    /// Watch every namespace (the default mode of `agentry controller`) instead of `namespace`
    /// only; pair it with `--agent-selector` in `extra_args` so it leaves other tests alone.
    pub cluster_wide: bool,
}

impl<'a> ControllerOptions<'a> {
    pub fn new(namespace: &'a str) -> Self {
        Self {
            namespace,
            replica: "replica-a",
            lease_duration: "4s",
            data_dir: None,
            kubeconfig: None,
            extra_args: vec![],
            cluster_wide: false,
        }
    }
}

impl ControllerProcess {
    pub fn start(opts: ControllerOptions<'_>) -> Self {
        Self::start_with_env(opts, &[])
    }

    /// Starts the controller with extra environment variables (test failpoints).
    pub fn start_with_env(opts: ControllerOptions<'_>, env: &[(&str, &str)]) -> Self {
        let data = tempfile::tempdir().unwrap();
        let ops_port = free_port();
        let api_port = free_port();
        let log = data.path().join("controller.log");
        let data_dir = opts
            .data_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| data.path().join("data"));
        let log_file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(agentry_bin());
        if let Some(k) = opts.kubeconfig {
            command.env("KUBECONFIG", k);
        }
        command.envs(env.iter().copied());
        command.arg("controller");
        if !opts.cluster_wide {
            command.args(["--watch-namespace", opts.namespace]);
        }
        let child = command
            .args([
                "--namespace",
                opts.namespace,
                "--lease-name",
                "agentry-controller",
                "--lease-duration",
                opts.lease_duration,
                "--replica",
                opts.replica,
                "--ops-addr",
                &format!("127.0.0.1:{ops_port}"),
                "--data-dir",
                data_dir.to_str().unwrap(),
            ])
            .args(if opts.extra_args.iter().any(|a| a == "--api-addr") {
                vec![]
            } else {
                vec![
                    "--api-addr".to_string(),
                    format!("127.0.0.1:{api_port}"),
                    "--api-san".to_string(),
                    "127.0.0.1".to_string(),
                    "--api-url".to_string(),
                    format!("https://127.0.0.1:{api_port}"),
                ]
            })
            .args(&opts.extra_args)
            // BackupLocations are cluster-scoped: each test's controller manages only its own.
            .args(
                if opts
                    .extra_args
                    .iter()
                    .any(|a| a == "--backup-location-selector")
                {
                    vec![]
                } else {
                    vec![
                        "--backup-location-selector".to_string(),
                        format!("{LOCATION_LABEL}={}", opts.namespace),
                    ]
                },
            )
            .env("RUST_LOG", "info,agentry=debug")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("starting the agentry binary");
        CONTROLLER_LOGS.with(|logs| logs.borrow_mut().push(log.clone()));
        Self {
            child,
            ops_port,
            api_port,
            log,
            replica: opts.replica.to_string(),
            data_dir,
            _data: data,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone()
    }

    /// `https://127.0.0.1:<api port>`.
    pub fn api_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    /// `/readyz` on the ops port: (status, body); None while it is not up.
    pub async fn readyz(&self) -> Option<(u16, String)> {
        let r = reqwest::get(format!("http://127.0.0.1:{}/readyz", self.ops_port))
            .await
            .ok()?;
        let status = r.status().as_u16();
        Some((status, r.text().await.ok()?))
    }

    /// The controller's log so far (for assertion messages).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Reads one unlabelled-or-summed metric from /metrics; None while the endpoint is not up.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let body = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.ops_port))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let mut total = None;
        for line in body.lines() {
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            if metric == name {
                *total.get_or_insert(0.0) += value.parse::<f64>().ok()?;
            }
        }
        total
    }

    /// SIGKILL: no graceful release of the lease.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for exit, at most the 30 s a pod gets by default
    /// (`terminationGracePeriodSeconds`) before the kubelet kills it; returns the exit status
    /// code, None if it had to be killed. (The controller's own bounded steps add up to less:
    /// the API's grace, the Lease release and the ops endpoint, 5 s each at most.)
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..300 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill();
        None
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.kill();
        CONTROLLER_LOGS.with(|logs| logs.borrow_mut().retain(|p| p != &self.log));
    }
}

/// A minimal valid Agent manifest; tests override fields with `merge`.
pub fn agent_manifest(name: &str, overrides: serde_json::Value) -> serde_json::Value {
    let mut base = json!({
        "apiVersion": "agentry.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": {
            "capabilities": ["summarize"],
            "permissions": ["backup:write", "memory:read"],
            "template": {"image": "ghcr.io/example/summarizer:1.4"},
            "resources": {"memory": "384Mi", "cpu": "250m"}
        }
    });
    merge(&mut base, overrides);
    base
}

/// JSON merge patch semantics (RFC 7386): null deletes, objects merge, anything else replaces.
pub fn merge(base: &mut serde_json::Value, patch: serde_json::Value) {
    match (base, patch) {
        (serde_json::Value::Object(b), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(&k);
                } else {
                    merge(b.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        (b, p) => *b = p,
    }
}

/// Creates an Agent from a manifest.
pub async fn create_agent(
    client: &Client,
    ns: &str,
    manifest: serde_json::Value,
) -> Result<Agent, kube::Error> {
    let agent: Agent = serde_json::from_value(manifest).expect("manifest decodes as an Agent");
    Api::<Agent>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &agent)
        .await
}

/// Creates the Agent `name` from the default manifest and waits for `check` (see `wait_agent`).
pub async fn create_and_wait(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
    what: &str,
    check: impl Fn(&Agent) -> bool,
) -> Agent {
    create_agent(client, ns, agent_manifest(name, serde_json::json!({})))
        .await
        .unwrap_or_else(|e| panic!("creating agent {ns}/{name}: {e}"));
    wait_agent(client, ns, name, timeout, what, check).await
}

/// Waits until `check` holds for the named Agent, or panics after `timeout` with the last state.
pub async fn wait_agent(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
    what: &str,
    check: impl Fn(&Agent) -> bool,
) -> Agent {
    let api: Api<Agent> = Api::namespaced(client.clone(), ns);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Ok(Some(agent)) = api.get_opt(name).await {
            if check(&agent) {
                return agent;
            }
            last = Some(agent);
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "agent {ns}/{name}: {what} did not happen within {timeout:?}; last seen: {}{}",
                serde_json::to_string_pretty(&last).unwrap(),
                controller_logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `check` returns true, polling every 200ms, or panics after `timeout` (with the
/// logs of this test's controllers).
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_ok(timeout, what, || {
        let fut = check();
        async move { Ok::<bool, std::convert::Infallible>(fut.await) }
    })
    .await
}

/// Like `eventually`, for checks that call the API: an error is retried like a `false` (the
/// apiserver may blip under load), and the last one is shown if time runs out.
pub async fn eventually_ok<F, Fut, E>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, E>>,
    E: std::fmt::Display,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => last_error = Some(e.to_string()),
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "{what} did not happen within {timeout:?}{}{}",
                last_error
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default(),
                controller_logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

thread_local! {
    /// The logs of the controllers this test (its thread) started, for failure messages.
    static CONTROLLER_LOGS: std::cell::RefCell<Vec<PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The last lines of every controller log of the running test.
pub fn controller_logs() -> String {
    CONTROLLER_LOGS.with(|logs| {
        logs.borrow()
            .iter()
            .map(|path| {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                format!(
                    "\n--- controller log {} (last 40 lines) ---\n{tail}",
                    path.display()
                )
            })
            .collect()
    })
}

/// The condition of `type_` on an Agent, if any.
pub fn condition<'a>(
    agent: &'a Agent,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    agent
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

pub fn has_finalizer(agent: &Agent) -> bool {
    agent
        .finalizers()
        .iter()
        .any(|f| f == "agentry.dev/cleanup")
}

/// The API group/version string of Agents, for raw requests.
pub fn agent_api_version() -> String {
    Agent::api_version(&()).into_owned()
}

/// The directory of the Kubernetes binaries built by hack/ (kubectl, helm).
pub fn tool_dir() -> PathBuf {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/hack/build-binaries"))
        .arg("--print-dir")
        .output()
        .expect("running hack/build-binaries --print-dir");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .unwrap_or_default(),
    )
}

/// A copy of the current kubeconfig whose user impersonates `user` (and its groups).
pub fn impersonating_kubeconfig(dir: &Path, user: &str, groups: &[&str]) -> PathBuf {
    let path = std::env::var("KUBECONFIG").expect("KUBECONFIG");
    let mut config = kube::config::Kubeconfig::read_from(&path).unwrap();
    for named in &mut config.auth_infos {
        if let Some(a) = named.auth_info.as_mut() {
            a.impersonate = Some(user.to_string());
            a.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
        }
    }
    let out = dir.join("impersonating.kubeconfig");
    std::fs::write(&out, serde_json::to_string(&config).unwrap()).unwrap();
    out
}

/// Identity issued: the certificate and the token conditions are True.
pub fn identity_issued(a: &Agent) -> bool {
    condition(a, "CertificateIssued").is_some_and(|c| c.status == "True")
        && condition(a, "TokenIssued").is_some_and(|c| c.status == "True")
}

/// Every serial listed by the CRLs in `pem` (one per CA during a rotation), lowercase hex.
pub fn crl_serials(pem: &str) -> std::collections::HashSet<String> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .filter(|p| p.label == "X509 CRL")
        .flat_map(|p| {
            let (_, crl) = x509_parser::parse_x509_crl(&p.contents).unwrap();
            crl.iter_revoked_certificates()
                .map(|r| agentry::identity::ca::hex(r.raw_serial()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// What an agent holds: its identity Secret's files.
#[derive(Clone, Debug)]
pub struct AgentFiles {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    pub token: String,
}

/// Reads an Agent's `<name>-identity` Secret (as the pod would mount it).
pub async fn agent_files(client: &Client, ns: &str, name: &str) -> AgentFiles {
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client.clone(), ns);
    let s = secrets.get(&format!("{name}-identity")).await.unwrap();
    let data = s.data.unwrap_or_default();
    let get =
        |k: &str| String::from_utf8(data.get(k).map(|b| b.0.clone()).unwrap_or_default()).unwrap();
    AgentFiles {
        cert_pem: get("tls.crt"),
        key_pem: get("tls.key"),
        ca_pem: get("ca.crt"),
        token: get("token"),
    }
}

/// An HTTPS client for the agent API trusting only `ca_pem`, presenting `identity` (PEM
/// certificate + key) when given.
pub fn api_client(ca_pem: &str, identity: Option<(&str, &str)>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(20));
    if let Some((cert, key)) = identity {
        builder = builder
            .identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

/// The API's trust bundle: what the `agentry-ca` ConfigMap publishes.
pub async fn api_ca(client: &Client, controller_ns: &str) -> String {
    let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(client.clone(), controller_ns);
    cms.get("agentry-ca")
        .await
        .unwrap()
        .data
        .unwrap_or_default()
        .get("ca.crt")
        .cloned()
        .unwrap_or_default()
}

/// Waits until the controller's `/readyz` says it serves the API.
pub async fn wait_api(c: &ControllerProcess) {
    eventually(
        Duration::from_secs(60),
        "the agent API to be served",
        || async { matches!(c.readyz().await, Some((200, body)) if body.contains("serving")) },
    )
    .await;
}
