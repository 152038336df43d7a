//! `agentry verify`: checks an installation end to end and says what to fix. Each check reads
//! what a user would look at (the CRDs, the leader Lease, the published trust bundle and CRL,
//! the agent API, Redis, the backup stores, Litestream's replica) and never changes anything.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde::Serialize;

use crate::backup::location;
use crate::backup::store::{S3Store, StoreConfig};
use crate::crd::BackupLocation;

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
    /// Not checked: what it needs was not given (the detail says which flag).
    Skipped,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    /// What to do about a warning or a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn new(name: impl Into<String>, status: Status, detail: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            status,
            detail: detail.into(),
            fix: None,
        }
    }
    fn ok(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(name, Status::Ok, detail)
    }
    fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(name, Status::Fail, detail).with_fix(fix)
    }
    fn warn(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(name, Status::Warn, detail).with_fix(fix)
    }
    fn skipped(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(name, Status::Skipped, detail)
    }
    fn with_fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub namespace: String,
    pub healthy: bool,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn new(namespace: &str, checks: Vec<Check>) -> Self {
        let healthy = checks.iter().all(|c| c.status != Status::Fail);
        Report {
            namespace: namespace.to_string(),
            healthy,
            checks,
        }
    }

    /// The report for a terminal: one line per check, then its fix, then a summary.
    pub fn render_text(&self) -> String {
        let mut out = format!("Agentry installation in namespace {}\n", self.namespace);
        for c in &self.checks {
            let mark = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
                Status::Skipped => "skip",
            };
            out.push_str(&format!("[{mark}] {:<22} {}\n", c.name, c.detail));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("       {:<22} fix: {fix}\n", ""));
            }
        }
        let count = |s: Status| self.checks.iter().filter(|c| c.status == s).count();
        out.push_str(&format!(
            "{}: {} ok, {} warning(s), {} failure(s), {} skipped\n",
            if self.healthy {
                "healthy"
            } else {
                "NOT healthy"
            },
            count(Status::Ok),
            count(Status::Warn),
            count(Status::Fail),
            count(Status::Skipped)
        ));
        out
    }
}

/// Where to look, and what counts as too close.
#[derive(Clone, Debug)]
pub struct Options {
    /// The controller's namespace (its Lease, CA ConfigMaps, credentials Secrets).
    pub namespace: String,
    pub lease_name: String,
    pub ca_configmap: String,
    pub jwks_configmap: String,
    /// The controller's Deployment (checked when it exists; an out-of-cluster controller has none).
    pub deployment: String,
    /// A CA expiring within this is a warning.
    pub ca_expiry_warning: Duration,
    /// The agent API, e.g. https://agentry-api.agentry-system.svc:8443 (or a port-forward).
    pub api_url: Option<String>,
    /// An agent's identity files (tls.crt, tls.key, token) to call the API over mTLS as it.
    pub identity_dir: Option<PathBuf>,
    pub redis: Option<crate::messaging::conn::Target>,
    pub litestream: Option<Litestream>,
    /// Only the BackupLocations this controller manages (its --backup-location-selector).
    pub location_selector: Option<String>,
}

/// Litestream's replica of the ledger and catalog: its config file (the one `litestream
/// replicate` runs with) and its metrics endpoint (`addr:` in that file).
#[derive(Clone, Debug)]
pub struct Litestream {
    pub config: PathBuf,
    pub metrics_url: String,
    /// A replica this many seconds behind the database (with transactions not yet replicated)
    /// is a failure.
    pub max_lag: Duration,
}

/// Runs every check, in the order a person would debug an installation.
pub async fn run(client: &Client, opts: &Options) -> Report {
    let mut checks = crds(client).await;
    checks.extend(controller(client, opts).await);
    let bundle = match trust(client, opts).await {
        Ok((bundle, found)) => {
            checks.extend(found);
            Some(bundle)
        }
        Err(check) => {
            checks.push(check);
            None
        }
    };
    checks.push(api(client, opts, bundle.as_deref()).await);
    checks.push(redis(opts).await);
    checks.extend(stores(client, opts).await);
    checks.extend(litestream(opts).await);
    Report::new(&opts.namespace, checks)
}

/// Every CRD this binary knows is installed, established, and serves and stores its version.
async fn crds(client: &Client) -> Vec<Check> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut out = Vec::new();
    for want in crate::crd::all() {
        let name = want.name_any();
        let check = format!("crd {}", want.spec.names.kind);
        let version = want
            .spec
            .versions
            .iter()
            .find(|v| v.storage)
            .map(|v| v.name.clone())
            .unwrap_or_default();
        let fix = "kubectl apply --server-side -f crds/ (or helm upgrade, which does not update CRDs: apply them first)";
        let have = match api.get_opt(&name).await {
            Ok(Some(c)) => c,
            Ok(None) => {
                out.push(Check::fail(check, format!("{name} is not installed"), fix));
                continue;
            }
            Err(e) => {
                out.push(Check::fail(
                    check,
                    format!("reading {name}: {e}"),
                    "check your kubeconfig and that you may read CustomResourceDefinitions",
                ));
                continue;
            }
        };
        let established = have
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
        let served = have
            .spec
            .versions
            .iter()
            .any(|v| v.name == version && v.served && v.storage);
        let same_schema = have
            .spec
            .versions
            .iter()
            .find(|v| v.name == version)
            .map(|v| &v.schema)
            == want
                .spec
                .versions
                .iter()
                .find(|v| v.name == version)
                .map(|v| &v.schema);
        out.push(if !established {
            Check::fail(
                check,
                format!("{name} is not Established"),
                "kubectl describe crd ".to_string() + &name,
            )
        } else if !served {
            Check::fail(
                check,
                format!("{name} does not serve and store {version}"),
                fix,
            )
        } else if !same_schema {
            Check::warn(
                check,
                format!("{name} {version}: its schema differs from this agentry binary's"),
                format!("the CRDs and the controller are from different releases; {fix}"),
            )
        } else {
            Check::ok(check, format!("{name} {version}, established"))
        });
    }
    out
}

/// The leader Lease is held and fresh; the Deployment (when there is one) is available.
async fn controller(client: &Client, opts: &Options) -> Vec<Check> {
    let ns = &opts.namespace;
    let lease = Api::<Lease>::namespaced(client.clone(), ns)
        .get_opt(&opts.lease_name)
        .await;
    let leader = match lease {
        Ok(Some(l)) => leader_check(&l, &opts.lease_name, ns),
        Ok(None) => Check::fail(
            "controller leader",
            format!(
                "no Lease {ns}/{} (the controller never started here)",
                opts.lease_name
            ),
            format!(
                "kubectl -n {ns} get deploy,pods; kubectl -n {ns} logs deploy/{}",
                opts.deployment
            ),
        ),
        Err(e) => Check::fail(
            "controller leader",
            format!("reading Lease {ns}/{}: {e}", opts.lease_name),
            format!("check --namespace (is the controller installed in {ns}?)"),
        ),
    };
    let deployment = match Api::<Deployment>::namespaced(client.clone(), ns)
        .get_opt(&opts.deployment)
        .await
    {
        Ok(Some(d)) => {
            let status = d.status.unwrap_or_default();
            let ready = status.ready_replicas.unwrap_or(0);
            if ready >= 1 {
                Check::ok(
                    "controller deployment",
                    format!("{} ready replica(s)", ready),
                )
            } else {
                Check::fail(
                    "controller deployment",
                    format!("Deployment {ns}/{} has no ready replica", opts.deployment),
                    format!(
                        "kubectl -n {ns} describe deploy/{0}; kubectl -n {ns} logs deploy/{0}",
                        opts.deployment
                    ),
                )
            }
        }
        Ok(None) => Check::skipped(
            "controller deployment",
            format!(
                "no Deployment {ns}/{} (a controller run outside the cluster?)",
                opts.deployment
            ),
        ),
        Err(e) => Check::fail(
            "controller deployment",
            e.to_string(),
            "check your kubeconfig",
        ),
    };
    vec![leader, deployment]
}

fn leader_check(lease: &Lease, name: &str, ns: &str) -> Check {
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.filter(|h| !h.is_empty());
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    let renewed = spec.renew_time.map(|t| t.0.as_second());
    let now = jiff::Timestamp::now().as_second();
    match (holder, renewed) {
        (Some(h), Some(r)) if now - r <= duration => Check::ok(
            "controller leader",
            format!("{h} leads (Lease renewed {}s ago)", (now - r).max(0)),
        ),
        (Some(h), Some(r)) => Check::fail(
            "controller leader",
            format!(
                "{h} last renewed Lease {ns}/{name} {}s ago (duration {duration}s): no live leader",
                now - r
            ),
            format!(
                "the controller is down or cannot reach the apiserver: kubectl -n {ns} get pods; check its logs"
            ),
        ),
        _ => Check::fail(
            "controller leader",
            format!("Lease {ns}/{name} has no holder"),
            format!("no replica is leading: kubectl -n {ns} get pods; check their logs"),
        ),
    }
}

/// The published trust bundle (valid, not near expiry) and CRL (current, from a bundle CA).
/// Returns the bundle for the API check.
async fn trust(client: &Client, opts: &Options) -> Result<(String, Vec<Check>), Check> {
    let ns = &opts.namespace;
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(&opts.ca_configmap)
        .await
        .map_err(|e| Check::fail("ca", e.to_string(), "check your kubeconfig"))?
        .ok_or_else(|| {
            Check::fail(
                "ca",
                format!(
                    "no ConfigMap {ns}/{} (the CA is published by the leader)",
                    opts.ca_configmap
                ),
                "start the controller; see the controller leader check",
            )
        })?;
    let data = cm.data.unwrap_or_default();
    let bundle = data.get("ca.crt").cloned().unwrap_or_default();
    let crl = data.get("crl.pem").cloned().unwrap_or_default();
    let now = jiff::Timestamp::now().as_second();
    let cas = bundle_facts(&bundle);
    let ca = match cas.iter().max_by_key(|c| c.not_after) {
        None => Check::fail(
            "ca",
            "ca.crt holds no certificate",
            "restart the controller; it republishes the bundle",
        ),
        Some(c) if c.not_after <= now => Check::fail(
            "ca",
            format!(
                "every CA in the bundle has expired ({} expired {})",
                c.subject,
                when(c.not_after)
            ),
            "run `agentry ca rotate` (docs/ca-rotation.md)",
        ),
        Some(c) if c.not_after - now < opts.ca_expiry_warning.as_secs() as i64 => Check::warn(
            "ca",
            format!(
                "{} expires {} ({} days)",
                c.subject,
                when(c.not_after),
                (c.not_after - now) / 86_400
            ),
            "rotate it before it expires: `agentry ca rotate` (docs/ca-rotation.md)",
        ),
        Some(c) => Check::ok(
            "ca",
            format!(
                "{} CA(s) in the bundle; {} expires {}",
                cas.len(),
                c.subject,
                when(c.not_after)
            ),
        ),
    };
    let crl_check = crl_check(&crl, &cas, now);
    Ok((bundle, vec![ca, crl_check]))
}

struct CaFacts {
    subject: String,
    not_after: i64,
}

fn bundle_facts(pem: &str) -> Vec<CaFacts> {
    crate::identity::ca::pem_to_ders(pem)
        .iter()
        .filter_map(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
            Some(CaFacts {
                subject: cert.subject().to_string(),
                not_after: cert.validity().not_after.timestamp(),
            })
        })
        .collect()
}

fn crl_check(pem: &str, cas: &[CaFacts], now: i64) -> Check {
    let crls: Vec<_> = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .filter(|p| p.label == "X509 CRL")
        .collect();
    let fix = "the leader re-signs the CRL daily and on every revocation: check the controller is leading and its logs";
    if crls.is_empty() {
        return Check::fail("crl", "crl.pem holds no CRL", fix);
    }
    let mut revoked = 0;
    for p in &crls {
        let Ok((_, crl)) = x509_parser::parse_x509_crl(&p.contents) else {
            return Check::fail("crl", "crl.pem does not parse", fix);
        };
        let issuer = crl.issuer().to_string();
        if !cas.iter().any(|c| c.subject == issuer) {
            return Check::fail(
                "crl",
                format!("a CRL is issued by {issuer}, which is not in the bundle"),
                fix,
            );
        }
        if crl.next_update().is_some_and(|t| t.timestamp() < now) {
            return Check::fail(
                "crl",
                format!("the CRL of {issuer} is stale (nextUpdate passed)"),
                fix,
            );
        }
        revoked += crl.iter_revoked_certificates().count();
    }
    let numbers = crate::identity::authority::crl_numbers(pem);
    Check::ok(
        "crl",
        format!(
            "{} CRL(s), number {}, {revoked} revoked serial(s), current",
            crls.len(),
            numbers.iter().max().copied().unwrap_or(0)
        ),
    )
}

fn when(ts: i64) -> String {
    jiff::Timestamp::from_second(ts).map_or_else(|_| ts.to_string(), |t| t.to_string())
}

/// The agent API answers over TLS with a certificate from the bundle; its JWKS matches the
/// published one; with --identity-dir, an mTLS + JWT call as that agent succeeds.
async fn api(client: &Client, opts: &Options, bundle: Option<&str>) -> Check {
    let Some(url) = opts.api_url.as_deref() else {
        return Check::skipped(
            "api",
            "pass --api-url (e.g. through kubectl port-forward svc/agentry-api 8443)",
        );
    };
    let Some(bundle) = bundle else {
        return Check::fail(
            "api",
            "no trust bundle to check the API's certificate with",
            "see the ca check",
        );
    };
    match api_call(client, opts, url, bundle).await {
        Ok(detail) => Check::ok("api", detail),
        Err((detail, fix)) => Check::fail("api", detail, fix),
    }
}

/// A failed API check: what happened, and the fix.
type ApiFailure = (String, String);

async fn api_call(
    client: &Client,
    opts: &Options,
    url: &str,
    bundle: &str,
) -> Result<String, ApiFailure> {
    let base = url.trim_end_matches('/');
    let identity = match &opts.identity_dir {
        Some(dir) => Some(read_identity(dir)?),
        None => None,
    };
    let http = api_client(bundle, identity.as_ref())?;
    let unreachable = |e: reqwest::Error| {
        (
            format!("{base}: {}", crate::telemetry::error_chain(&e)),
            "check --api-url, the agentry-api Service and that the leader serves the API (api.enabled)".to_string(),
        )
    };
    let jwks: serde_json::Value = http
        .get(format!("{base}/.well-known/jwks.json"))
        .send()
        .await
        .map_err(unreachable)?
        .json()
        .await
        .map_err(unreachable)?;
    let served = key_ids(&jwks);
    let published = Api::<ConfigMap>::namespaced(client.clone(), &opts.namespace)
        .get_opt(&opts.jwks_configmap)
        .await
        .ok()
        .flatten()
        .and_then(|cm| cm.data?.get("jwks.json").cloned())
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
    if let Some(p) = published.as_ref().map(key_ids)
        && p != served
    {
        return Err((
            format!(
                "the API serves key ids {served:?}, the {} ConfigMap publishes {p:?}",
                opts.jwks_configmap
            ),
            "two controllers serve different keys? check that one release owns this namespace"
                .into(),
        ));
    }
    let mut detail = format!(
        "{base} answers over TLS (server certificate from the bundle); JWKS with {} key(s)",
        served.len()
    );
    if let Some((cert, _, token)) = identity {
        let (ns, name) = agent_of(&cert)?;
        let status = http
            .get(format!("{base}/v1/agents/{ns}/{name}"))
            .bearer_auth(token.trim())
            .send()
            .await
            .map_err(unreachable)?
            .status();
        if !status.is_success() {
            return Err((
                format!("GET /v1/agents/{ns}/{name} with mTLS + JWT answered {status}"),
                "the identity may be stale or revoked: re-read the agent's Secret; see kubectl describe agent".into(),
            ));
        }
        detail.push_str(&format!("; mTLS + JWT call as {ns}/{name}: {status}"));
    }
    Ok(detail)
}

/// An HTTPS client that trusts only the bundle, presenting the agent's certificate if given.
fn api_client(
    bundle: &str,
    identity: Option<&(String, String, String)>,
) -> Result<reqwest::Client, ApiFailure> {
    let roots = reqwest::Certificate::from_pem_bundle(bundle.as_bytes()).map_err(|e| {
        (
            format!("the bundle does not parse: {e}"),
            "see the ca check".to_string(),
        )
    })?;
    let mut builder = reqwest::Client::builder()
        .tls_certs_only(roots)
        .https_only(true)
        .timeout(Duration::from_secs(10));
    if let Some((cert, key, _)) = identity {
        let id = reqwest::Identity::from_pem(format!("{cert}\n{key}").as_bytes()).map_err(|e| {
            (
                format!("--identity-dir: {e}"),
                "point it at a mounted identity Secret".into(),
            )
        })?;
        builder = builder.identity(id);
    }
    builder.build().map_err(|e| (e.to_string(), String::new()))
}

/// The sorted key ids of a JWKS.
fn key_ids(jwks: &serde_json::Value) -> Vec<String> {
    let mut ids: Vec<String> = jwks["keys"]
        .as_array()
        .map(|ks| {
            ks.iter()
                .filter_map(|k| k["kid"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// (namespace, name) from an agent certificate's SPIFFE ID.
fn agent_of(cert: &str) -> Result<(String, String), ApiFailure> {
    let bad = |what: &str| (format!("--identity-dir: {what}"), String::new());
    crate::identity::ca::leaf_facts(cert)
        .ok_or_else(|| bad("tls.crt does not parse"))?
        .uris
        .iter()
        .find_map(|u| u.rsplit_once("/ns/"))
        .and_then(|(_, rest)| rest.split_once("/agent/"))
        .map(|(n, a)| (n.to_string(), a.to_string()))
        .ok_or_else(|| bad("the certificate has no agent SPIFFE ID"))
}

fn read_identity(dir: &std::path::Path) -> Result<(String, String, String), (String, String)> {
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f)).map_err(|e| {
            (
                format!("--identity-dir: {}: {e}", dir.join(f).display()),
                "point it at a directory holding tls.crt, tls.key and token (an Agent's identity Secret)".to_string(),
            )
        })
    };
    Ok((read("tls.crt")?, read("tls.key")?, read("token")?))
}

/// Redis answers as the controller's user, and that user may manage ACLs.
async fn redis(opts: &Options) -> Check {
    let Some(target) = &opts.redis else {
        return Check::skipped(
            "redis",
            "pass --redis-url (and --redis-password-file) to check messaging",
        );
    };
    let fix =
        "check --redis-url, the controller's Redis user and password (messaging.passwordSecret)";
    let mut conn = match tokio::time::timeout(Duration::from_secs(10), target.connect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Check::fail("redis", format!("{}: {e}", target.urls.join(",")), fix),
        Err(_) => {
            return Check::fail(
                "redis",
                format!("{}: no answer in 10s", target.urls.join(",")),
                fix,
            );
        }
    };
    let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
    if let Err(e) = pong {
        return Check::fail("redis", format!("PING: {e}"), fix);
    }
    let users: redis::RedisResult<Vec<String>> =
        redis::cmd("ACL").arg("USERS").query_async(&mut conn).await;
    match users {
        Ok(users) => {
            let agents = users.iter().filter(|u| u.starts_with("agent:")).count();
            Check::ok(
                "redis",
                format!("{} answers; {agents} agent user(s)", target.urls.join(",")),
            )
        }
        Err(e) => Check::fail(
            "redis",
            format!("ACL USERS: {e}"),
            "the controller's Redis user must be allowed ACL commands (see docs/messaging.md)",
        ),
    }
}

/// Both stores of every BackupLocation: reachable with their credentials.
async fn stores(client: &Client, opts: &Options) -> Vec<Check> {
    let mut params = ListParams::default();
    if let Some(selector) = &opts.location_selector {
        params = params.labels(selector);
    }
    let locations = match Api::<BackupLocation>::all(client.clone())
        .list(&params)
        .await
    {
        Ok(l) => l.items,
        Err(e) => {
            return vec![Check::fail(
                "backup stores",
                e.to_string(),
                "are the CRDs installed?",
            )];
        }
    };
    if locations.is_empty() {
        return vec![Check::skipped(
            "backup stores",
            "no BackupLocation (backups are off)",
        )];
    }
    let mut out = Vec::new();
    for loc in &locations {
        let name = loc.name_any();
        match location::stores(client, &opts.namespace, loc).await {
            Err(e) => out.push(Check::fail(
                format!("location {name}"),
                format!("{}: {}", e.field, e.message),
                format!("fix the BackupLocation or its Secret in {}", opts.namespace),
            )),
            Ok(s) => {
                for (role, store) in [("primary", &s.primary), ("secondary", &s.secondary)] {
                    let status = location::check_store(store).await;
                    let check = format!("location {name} {role}");
                    out.push(if status.available {
                        Check::ok(
                            check,
                            format!(
                                "reachable; versioning {}",
                                status.versioning.unwrap_or_default()
                            ),
                        )
                    } else {
                        Check::fail(
                            check,
                            status.message,
                            "check the endpoint, bucket and the credentials Secret",
                        )
                    });
                }
            }
        }
    }
    out
}

/// The Litestream config this check needs: each database and its S3 replica.
#[derive(serde::Deserialize)]
struct LitestreamConfig {
    dbs: Vec<LitestreamDb>,
}

#[derive(serde::Deserialize)]
struct LitestreamDb {
    path: String,
    replica: LitestreamReplica,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
struct LitestreamReplica {
    bucket: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    endpoint: String,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    force_path_style: bool,
    #[serde(default)]
    access_key_id: Option<String>,
    #[serde(default)]
    secret_access_key: Option<String>,
}

/// Each replicated database: the replica holds the transaction Litestream last saw locally,
/// or the newest replicated file is younger than `max_lag`.
async fn litestream(opts: &Options) -> Vec<Check> {
    let Some(ls) = &opts.litestream else {
        return vec![Check::skipped(
            "litestream",
            "pass --litestream-config and --litestream-metrics-url to check the ledger's replica",
        )];
    };
    let config = match std::fs::read_to_string(&ls.config)
        .map_err(|e| e.to_string())
        .and_then(|s| {
            serde_saphyr::from_str::<LitestreamConfig>(&expand_env(&s)).map_err(|e| e.to_string())
        }) {
        Ok(c) => c,
        Err(e) => {
            return vec![Check::fail(
                "litestream",
                format!("--litestream-config {}: {e}", ls.config.display()),
                "give the file `litestream replicate -config` runs with (dbs: [{path, replica: {type: s3, ...}}])",
            )];
        }
    };
    let txids = match litestream_txids(&ls.metrics_url).await {
        Ok(t) => t,
        Err(e) => {
            return vec![Check::fail(
                "litestream",
                format!("{}: {e}", ls.metrics_url),
                "is litestream replicate running with `addr:` set? (its sidecar, see docs/ha.md)",
            )];
        }
    };
    let mut out = Vec::new();
    for db in &config.dbs {
        out.push(replica_check(db, txids.get(&db.path).copied(), ls.max_lag).await);
    }
    out
}

/// `${VAR}` references in a Litestream config, expanded as Litestream does.
fn expand_env(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        match rest[start + 2..].find('}') {
            Some(end) => {
                let var = &rest[start + 2..start + 2 + end];
                out.push_str(&std::env::var(var).unwrap_or_default());
                rest = &rest[start + 3 + end..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// `litestream_txid{db="<path>"}` from Litestream's metrics: the newest local transaction.
async fn litestream_txids(url: &str) -> Result<BTreeMap<String, u64>, String> {
    let body = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?
        .get(url)
        .send()
        .await
        .map_err(|e| crate::telemetry::error_chain(&e))?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    Ok(parse_txids(&body))
}

fn parse_txids(metrics: &str) -> BTreeMap<String, u64> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("litestream_txid{"))
        .filter_map(|l| {
            let (labels, value) = l.rsplit_once("} ")?;
            let db = labels
                .split(',')
                .find_map(|kv| kv.strip_prefix("db=\""))?
                .trim_end_matches('"');
            Some((db.to_string(), value.trim().parse::<f64>().ok()? as u64))
        })
        .collect()
}

/// The highest transaction in a replica's LTX files (`<path>/<level>/<min>-<max>.ltx`, hex),
/// and the newest file's age in seconds.
fn newest_replicated(listed: &[crate::backup::store::Listed], now: i64) -> Option<(u64, i64)> {
    listed
        .iter()
        .filter_map(|o| {
            let file = o.key.rsplit('/').next()?.strip_suffix(".ltx")?;
            let (_, max) = file.split_once('-')?;
            Some((u64::from_str_radix(max, 16).ok()?, o.last_modified))
        })
        .fold(None, |acc: Option<(u64, i64)>, (tx, modified)| {
            let (best, newest) = acc.unwrap_or((0, i64::MIN));
            Some((best.max(tx), newest.max(modified)))
        })
        .map(|(tx, newest)| (tx, (now - newest).max(0)))
}

/// The first of these environment variables that is set (Litestream's own names first).
fn env_any(names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| std::env::var(n).ok())
}

/// The S3 store a Litestream replica is written to (credentials from the config, else
/// Litestream's or the AWS SDK's environment variables).
fn replica_store(r: &LitestreamReplica) -> StoreConfig {
    StoreConfig {
        endpoint: if r.endpoint.is_empty() {
            format!(
                "https://s3.{}.amazonaws.com",
                r.region.as_deref().unwrap_or("us-east-1")
            )
        } else {
            r.endpoint.clone()
        },
        region: r.region.clone().unwrap_or_else(|| "us-east-1".into()),
        bucket: r.bucket.clone(),
        prefix: String::new(),
        access_key: r
            .access_key_id
            .clone()
            .or_else(|| env_any(&["LITESTREAM_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"]))
            .unwrap_or_default(),
        secret_key: r
            .secret_access_key
            .clone()
            .or_else(|| env_any(&["LITESTREAM_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"]))
            .unwrap_or_default(),
        force_path_style: r.force_path_style,
        checksum_mode: crate::backup::store::ChecksumMode::WhenRequired,
        options: Default::default(),
    }
}

async fn replica_check(db: &LitestreamDb, local: Option<u64>, max_lag: Duration) -> Check {
    let name = format!(
        "litestream {}",
        std::path::Path::new(&db.path)
            .file_name()
            .map_or(db.path.clone(), |f| f.to_string_lossy().into_owned())
    );
    let r = &db.replica;
    let cfg = replica_store(r);
    // Litestream 0.5 writes `<path>/<level, 4 digits>/<min>-<max>.ltx` (level 9: snapshots).
    let prefix = format!("{}/", r.path.trim_matches('/'));
    let listed = match S3Store::new(&cfg)
        .list(prefix.trim_start_matches('/'))
        .await
    {
        Ok(l) => l,
        Err(e) => {
            return Check::fail(
                name,
                format!("listing the replica: {e}"),
                "check the replica's bucket, endpoint and credentials",
            );
        }
    };
    let now = jiff::Timestamp::now().as_second();
    let Some((replicated, age)) = newest_replicated(&listed, now) else {
        return Check::fail(
            name,
            format!("no replica under s3://{}/{prefix}", r.bucket),
            "is litestream replicate running? (see docs/ha.md)",
        );
    };
    let Some(local) = local else {
        return Check::fail(
            name,
            format!(
                "Litestream's metrics have no litestream_txid for {}",
                db.path
            ),
            "is this database in the config litestream runs with?",
        );
    };
    let behind = local.saturating_sub(replicated);
    if behind == 0 {
        Check::ok(
            name,
            format!("replica at transaction {replicated}, in sync (last upload {age}s ago)"),
        )
    } else if age as u64 > max_lag.as_secs() {
        Check::fail(
            name,
            format!(
                "replica {behind} transaction(s) behind, last upload {age}s ago (limit {}s)",
                max_lag.as_secs()
            ),
            "check litestream's logs and the store (litestream_sync_error_count)",
        )
    } else {
        Check::ok(
            name,
            format!("{behind} transaction(s) in flight; last upload {age}s ago"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_with_a_failure_is_not_healthy_and_says_the_fix() {
        let r = Report::new(
            "agentry-system",
            vec![
                Check::ok("ca", "fine"),
                Check::fail("redis", "refused", "check the password"),
                Check::skipped("api", "pass --api-url"),
            ],
        );
        assert!(!r.healthy);
        let text = r.render_text();
        assert!(text.contains("[FAIL] redis"), "{text}");
        assert!(text.contains("fix: check the password"), "{text}");
        assert!(
            text.contains("NOT healthy: 1 ok, 0 warning(s), 1 failure(s), 1 skipped"),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["checks"][1]["status"], "fail");
        assert!(json["checks"][0].get("fix").is_none());
        assert!(Report::new("x", vec![Check::warn("ca", "soon", "rotate")]).healthy);
    }

    #[test]
    fn litestream_txids_and_replica_positions_are_read() {
        let metrics = "# HELP litestream_txid x\nlitestream_txid{db=\"/data/ledger/ledger.db\"} 42\nlitestream_txid{db=\"/data/catalog.db\"} 7\nlitestream_db_size{db=\"/data/catalog.db\"} 9\n";
        let t = parse_txids(metrics);
        assert_eq!(t.get("/data/ledger/ledger.db"), Some(&42));
        assert_eq!(t.get("/data/catalog.db"), Some(&7));
        assert_eq!(t.len(), 2);
        let listed = |key: &str, at: i64| crate::backup::store::Listed {
            key: key.into(),
            size: 1,
            last_modified: at,
        };
        let files = [
            listed(
                "agentry/ledger/0000/0000000000000001-0000000000000029.ltx",
                100,
            ),
            listed(
                "agentry/ledger/0000/000000000000002a-000000000000002a.ltx",
                150,
            ),
            listed(
                "agentry/ledger/0009/0000000000000001-0000000000000020.ltx",
                160,
            ),
            listed("agentry/ledger/0000/README", 170),
        ];
        assert_eq!(newest_replicated(&files, 200), Some((42, 40)));
        assert_eq!(newest_replicated(&files[3..], 200), None);
    }

    #[test]
    fn env_references_expand_like_litestream() {
        // SAFETY-free: a variable only this test reads.
        let key = "AGENTRY_VERIFY_TEST_VAR";
        assert_eq!(expand_env("a: ${AGENTRY_VERIFY_TEST_UNSET}\n"), "a: \n");
        assert_eq!(expand_env("b: ${unterminated"), "b: ${unterminated");
        assert_eq!(expand_env(&format!("plain {key}")), format!("plain {key}"));
    }
}
