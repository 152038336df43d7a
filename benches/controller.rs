//! Controller benchmark (BENCHMARKS.md): N Agents (default 1,000, `AGENTRY_BENCH_AGENTS`) applied
//! -> all Ready on the local control plane, against the floor: a plain client creating the same
//! children directly (per agent the same identity Secret with a pre-made certificate and token,
//! ServiceAccount, Service and Deployment, built by the same functions the controller uses), 32
//! agents in flight on both sides, waiting for the same readiness (the Deployment Available).
//! The two alternate over `AGENTRY_BENCH_ROUNDS` rounds (default 2 up to 2,000 Agents, else 1;
//! with one round Agentry goes first, on the colder control plane).
//!
//! Also reported: the controller's peak RSS (and per Agent, over a no-op controller's), the
//! apiserver's requests per Agent by verb on each side (deltas of `apiserver_request_total`
//! from the apiserver's own `/metrics`; `controller-requests.json` has them by resource), and
//! two diagnostic rows: a no-op kube-rs controller that only patches status, and plain
//! Deployments alone.
//!
//! `AGENTRY_BENCH_DIAGNOSTICS=0` skips the two diagnostics; `AGENTRY_BENCH_FIRST=plain` has the
//! plain client go first in even rounds; `AGENTRY_BENCH_PLAIN_OWNED=1` has it create each Agent
//! and own the children by it; `AGENTRY_BENCH_TIMELINE=1` records each agent's way to Ready on
//! both sides (`timeline/`; opt-in, its watches add load);
//! `AGENTRY_BENCH_CONTROLLER_ARGS="--flag value"` adds controller flags and
//! `AGENTRY_BENCH_CONTROLLER_WRAPPER="heaptrack -o /tmp/agentry"` runs the controller under a
//! profiler. Each side prints its time, CPU and requests as soon as measured.
//!
//! Needs KUBECONFIG pointing at `hack/local-cluster` (`make bench` starts it).
//! Run as `controller --baseline-controller <ns>` it is the no-op controller itself.

mod report;
mod timeline;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{Controller, WatchStreamExt, controller::Action, watcher};
use kube::{Api, Client, ResourceExt};
use report::Row;

use agentry::crd::Agent;

/// Agents (or plain agents) in flight at once, on every side: the controller's --concurrency.
const IN_FLIGHT: usize = 32;

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    if let Some(i) = args.iter().position(|a| a == "--baseline-controller") {
        rt.block_on(baseline_controller(args[i + 1].clone()));
        return;
    }
    // `cargo bench` passes --bench; `cargo test --benches` does not, and must not need a cluster.
    if args.iter().any(|a| a == "--bench") {
        rt.block_on(run());
    }
}

/// The baseline: watch Agents, patch `status.phase` and a Ready condition, nothing else.
async fn baseline_controller(ns: String) {
    let client = Client::try_default().await.unwrap();
    let api: Api<Agent> = Api::namespaced(client.clone(), &ns);
    Controller::new(api.clone(), watcher::Config::default())
        .run(
            move |agent: Arc<Agent>, api: Arc<Api<Agent>>| async move {
                let status = serde_json::json!({
                    "apiVersion": "agentry.dev/v1alpha1", "kind": "Agent",
                    "status": {"phase": "Ready", "observedGeneration": agent.metadata.generation,
                        "conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "message": "noop",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
                });
                api.patch_status(&agent.name_any(), &PatchParams::apply("noop").force(), &Patch::Apply(&status))
                    .await?;
                Ok::<_, kube::Error>(Action::await_change())
            },
            |_, _, _| Action::requeue(Duration::from_secs(1)),
            Arc::new(api),
        )
        .for_each(|_| async {})
        .await;
}

fn peak_rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0.0)
}

/// CPU seconds (user + system) a process has used so far; 0 when it is gone.
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = 100.0; // USER_HZ on Linux
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after_name = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            let utime: f64 = after_name.get(11)?.parse().ok()?;
            let stime: f64 = after_name.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .unwrap_or(0.0)
}

/// The control plane's processes on this machine (by command name).
const CONTROL_PLANE: [&str; 5] = [
    "kube-apiserver",
    "etcd",
    "kube-controller",
    "kube-scheduler",
    "kwok",
];

/// CPU seconds each control-plane process (by command name) has used so far.
fn control_plane_cpu() -> [f64; CONTROL_PLANE.len()] {
    let mut cpu = [0.0; CONTROL_PLANE.len()];
    for pid in std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    {
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        if let Some(i) = CONTROL_PLANE
            .iter()
            .position(|n| comm.trim().starts_with(n))
        {
            cpu[i] += cpu_seconds(pid);
        }
    }
    cpu
}

/// The control plane's CPU since `before`: the total, then each process's.
fn control_plane_cpu_since(before: [f64; CONTROL_PLANE.len()]) -> String {
    let now = control_plane_cpu();
    let each: Vec<String> = CONTROL_PLANE
        .iter()
        .zip(now.iter().zip(before))
        .map(|(name, (now, before))| format!("{name} {:.1}", now - before))
        .collect();
    let total: f64 = now.iter().sum::<f64>() - before.iter().sum::<f64>();
    format!("{total:.1} s ({})", each.join(", "))
}

async fn fresh_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
    api.create(&PostParams::default(), &ns).await.unwrap();
}

/// Follows `api` with one watch (not by listing, so measuring adds no load of its own) until
/// `n` objects are `ready`; returns when the last one became ready.
async fn until_all_ready<K>(
    events: &mut futures::stream::BoxStream<'static, Result<K, watcher::Error>>,
    n: usize,
    start: Instant,
    ready: impl Fn(&K) -> bool,
) -> f64
where
    K: kube::Resource,
{
    let mut done = std::collections::HashSet::new();
    let deadline = Duration::from_secs(7200);
    while done.len() < n {
        let next =
            tokio::time::timeout(deadline.saturating_sub(start.elapsed()), events.try_next()).await;
        let obj = match next {
            Ok(Ok(Some(o))) => o,
            Ok(Ok(None)) => panic!("the watch ended"),
            Ok(Err(e)) => {
                eprintln!("watch error (retrying): {e}");
                continue;
            }
            Err(_) => panic!("only {}/{n} ready after {deadline:?}", done.len()),
        };
        if ready(&obj) {
            done.insert(obj.name_any());
        } else {
            done.remove(&obj.name_any());
        }
    }
    start.elapsed().as_secs_f64()
}

fn bench_agent(i: usize) -> Agent {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "agentry.dev/v1alpha1", "kind": "Agent",
        "metadata": {"name": format!("agent-{i:05}")},
        "spec": {"capabilities": ["bench"], "permissions": ["memory:read"],
                 "template": {"image": "ghcr.io/example/bench:1"}, "resources": {"memory": "64Mi"}}
    }))
    .unwrap()
}

fn agent_ready(agent: &Agent) -> bool {
    agent.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

fn deployment_available(d: &k8s_openapi::api::apps::v1::Deployment) -> bool {
    d.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
        >= 1
}

/// Creates `n` Agents (IN_FLIGHT at once) and waits until all are Ready; returns seconds.
async fn apply_and_wait(client: &Client, ns: &str, n: usize) -> f64 {
    let api: Api<Agent> = Api::namespaced(client.clone(), ns);
    let mut events = watcher::watcher(api.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let start = Instant::now();
    let creator = tokio::spawn(async move {
        futures::stream::iter(0..n)
            .map(|i| {
                let api = api.clone();
                async move {
                    api.create(&PostParams::default(), &bench_agent(i))
                        .await
                        .map(|_| ())
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await
    });
    let secs = until_all_ready(&mut events, n, start, agent_ready).await;
    creator.await.unwrap().unwrap();
    secs
}

/// What the plain client creates for agent `i`: the controller's own children for the same
/// Agent (same builders), with a certificate and token made before the clock starts.
struct PlainChildren {
    secret: k8s_openapi::api::core::v1::Secret,
    account: k8s_openapi::api::core::v1::ServiceAccount,
    service: k8s_openapi::api::core::v1::Service,
    deployment: k8s_openapi::api::apps::v1::Deployment,
}

fn plain_children(ns: &str, n: usize) -> Vec<PlainChildren> {
    use agentry::controller::agent::credentials::{identity_secret, secret_name};
    use agentry::identity::ca::{CertificateAuthority, LeafRequest, service_dns_names};
    use agentry::workload::{self, MemoryPlan, Workload};
    let ca = CertificateAuthority::generate("bench CA", Duration::from_secs(86400)).unwrap();
    let ledger = agentry::identity::store::Ledger::in_memory().unwrap();
    let key = agentry::identity::jwt::SigningKey::generate(0).unwrap();
    let issuer = agentry::identity::jwt::TokenIssuer::new(
        "https://agentry.bench.svc".into(),
        "agentry".into(),
        vec![key],
    )
    .unwrap();
    (0..n)
        .map(|i| {
            let mut agent = bench_agent(i);
            agent.metadata.namespace = Some(ns.into());
            let name = agent.name_any();
            let leaf = ca
                .issue(
                    &ledger,
                    &LeafRequest {
                        agent_uid: format!("plain-{i}"),
                        agent_created: 0,
                        namespace: ns.into(),
                        name: name.clone(),
                        trust_domain: "cluster.local".into(),
                        dns_names: service_dns_names(ns, &name),
                        ttl: Duration::from_secs(86400),
                    },
                )
                .unwrap();
            let (token, _) = issuer
                .mint(
                    &format!("spiffe://cluster.local/ns/{ns}/agent/{name}"),
                    "memory:read",
                    Duration::from_secs(3600),
                    &leaf.cert_der,
                    jsonwebtoken::get_current_timestamp(),
                )
                .unwrap();
            let spec = agent.spec.validate().unwrap();
            let plan = MemoryPlan::new(spec.memory_bytes, 0);
            let secret_name = secret_name(&agent);
            let deployment = match workload::workload(&agent, &spec, &plan, &secret_name, None) {
                Workload::Deployment(d) => *d,
                Workload::StatefulSet(_) => unreachable!("bench agents keep no state"),
            };
            PlainChildren {
                secret: identity_secret(
                    &agent,
                    &secret_name,
                    &leaf.cert_pem,
                    &leaf.key_pem,
                    ca.cert_pem(),
                    &token,
                    None,
                ),
                account: workload::service_account(&agent),
                service: workload::service(&agent, false),
                deployment,
            }
        })
        .collect()
}

/// The floor: a plain client creates each agent's children (IN_FLIGHT agents at once, each
/// agent's four in the controller's order) and waits until every Deployment is Available.
async fn plain_client(client: &Client, ns: &str, children: Vec<PlainChildren>) -> f64 {
    use k8s_openapi::api::apps::v1::Deployment;
    let n = children.len();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let mut events = watcher::watcher(deployments.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let start = Instant::now();
    let creator = {
        let client = client.clone();
        let ns = ns.to_string();
        tokio::spawn(async move {
            // AGENTRY_BENCH_PLAIN_APPLY=1: server-side apply instead of create, as the
            // controller does (to see what apply itself costs the control plane).
            let apply = std::env::var("AGENTRY_BENCH_PLAIN_APPLY").is_ok_and(|v| v == "1");
            // AGENTRY_BENCH_PLAIN_OWNED=1: the plain client first creates the Agent itself and
            // owns the children by it, as the controller does (to see what the Agent object and
            // the ownerReferences cost the control plane, without a controller).
            let owned = std::env::var("AGENTRY_BENCH_PLAIN_OWNED").is_ok_and(|v| v == "1");
            futures::stream::iter(children.into_iter().enumerate())
                .map(move |(i, mut c)| {
                    let (client, ns) = (client.clone(), ns.clone());
                    async move {
                        if owned {
                            use kube::Resource;
                            let agents: Api<Agent> = Api::namespaced(client.clone(), &ns);
                            let agent = agents
                                .create(&PostParams::default(), &bench_agent(i))
                                .await?;
                            let owner = agent.controller_owner_ref(&()).map(|o| vec![o]);
                            c.secret.metadata.owner_references = owner.clone();
                            c.account.metadata.owner_references = owner.clone();
                            c.service.metadata.owner_references = owner.clone();
                            c.deployment.metadata.owner_references = owner;
                        }
                        create_or_apply(&client, &ns, &c.secret, apply).await?;
                        create_or_apply(&client, &ns, &c.account, apply).await?;
                        create_or_apply(&client, &ns, &c.service, apply).await?;
                        create_or_apply(&client, &ns, &c.deployment, apply).await
                    }
                })
                .buffer_unordered(IN_FLIGHT)
                .try_collect::<Vec<_>>()
                .await
        })
    };
    let secs = until_all_ready(&mut events, n, start, deployment_available).await;
    creator.await.unwrap().unwrap();
    secs
}

async fn create_or_apply<K>(client: &Client, ns: &str, obj: &K, apply: bool) -> kube::Result<()>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    if apply {
        let mut value = serde_json::to_value(obj).unwrap();
        value["apiVersion"] = K::api_version(&()).into();
        value["kind"] = K::kind(&()).into();
        let pp = PatchParams::apply("agentry").force();
        api.patch(&obj.name_any(), &pp, &Patch::Apply(&value))
            .await?;
    } else {
        api.create(&PostParams::default(), obj).await?;
    }
    Ok(())
}

/// Creates `n` plain Deployments shaped like an agent's and waits until all are Available.
async fn deployments_available(client: &Client, ns: &str, n: usize) -> f64 {
    use k8s_openapi::api::apps::v1::Deployment;
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let mut events = watcher::watcher(api.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let start = Instant::now();
    let creator = tokio::spawn(async move {
        futures::stream::iter(0..n)
            .map(|i| {
                let api = api.clone();
                async move {
                    let d: Deployment = serde_json::from_value(serde_json::json!({
                        "metadata": {"name": format!("plain-{i:05}")},
                        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": format!("plain-{i:05}")}},
                            "template": {"metadata": {"labels": {"app": format!("plain-{i:05}")}},
                                "spec": {"containers": [{"name": "agent", "image": "ghcr.io/example/bench:1",
                                    "resources": {"limits": {"memory": "64Mi"}, "requests": {"memory": "64Mi"}}}]}}}
                    }))
                    .unwrap();
                    api.create(&PostParams::default(), &d).await.map(|_| ())
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await
    });
    let secs = until_all_ready(&mut events, n, start, deployment_available).await;
    creator.await.unwrap().unwrap();
    secs
}

async fn delete_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let _ = api.delete(name, &DeleteParams::background()).await;
    let start = Instant::now();
    while api.get_opt(name).await.ok().flatten().is_some()
        && start.elapsed() < Duration::from_secs(1800)
    {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The controller's process: `pid`, or under a wrapper (a profiler), the descendant of `pid`
/// running the agentry binary.
fn controller_pid(pid: u32) -> u32 {
    let binary = std::fs::canonicalize(env!("CARGO_BIN_EXE_agentry")).ok();
    let mut queue = vec![pid];
    while let Some(p) = queue.pop() {
        if std::fs::read_link(format!("/proc/{p}/exe")).ok() == binary {
            return p;
        }
        let children = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children"));
        queue.extend(
            children
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
    }
    pid
}

fn spawn(cmd: &str, args: &[&str], log: &str) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// `apiserver_request_total` summed by (verb, resource/subresource), from the apiserver's own
/// `/metrics`. It counts every client (the controller-manager, the scheduler and kwok too), so
/// only differences between the two sides over the same work say something.
type Requests = BTreeMap<(String, String), f64>;

async fn apiserver_requests(client: &Client) -> Requests {
    let text = client
        .request_text(http::Request::get("/metrics").body(Vec::new()).unwrap())
        .await
        .expect("reading the apiserver's /metrics");
    let mut out = Requests::new();
    for line in text.lines() {
        let Some((name, rest)) = line.split_once('{') else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split("\",")
                .filter_map(|kv| kv.split_once("=\""))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        if let Some(key) = series_key(name, label) {
            *out.entry(key).or_default() += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    out
}

/// The key a line of the apiserver's `/metrics` adds to, by its series: request counts under
/// their (verb, resource), the apiserver's seconds on them under `SECONDS <verb>`, and the
/// flow-control queue wait under `QUEUED` (`QUEUED_N`: how many waited) and the priority level.
fn series_key(name: &str, label: impl Fn(&str) -> String) -> Option<(String, String)> {
    let request = || {
        let resource = match label("subresource").as_str() {
            "" => label("resource"),
            sub => format!("{}/{sub}", label("resource")),
        };
        (label("verb"), resource)
    };
    match name {
        "apiserver_request_total" => Some(request()),
        "apiserver_request_duration_seconds_sum" => {
            let (verb, resource) = request();
            Some((format!("SECONDS {verb}"), resource))
        }
        "apiserver_flowcontrol_request_wait_duration_seconds_sum" => {
            Some(("QUEUED".into(), label("priority_level")))
        }
        "apiserver_flowcontrol_request_wait_duration_seconds_count" => {
            Some(("QUEUED_N".into(), label("priority_level")))
        }
        _ => None,
    }
}

/// Requests per agent made while `f` ran, by (verb, resource); with them the apiserver's
/// seconds on them and its flow-control queueing, per agent too (see `print_requests`).
async fn requests_during<F: std::future::Future>(
    client: &Client,
    n: usize,
    f: F,
) -> (F::Output, Requests) {
    let before = apiserver_requests(client).await;
    let out = f.await;
    let after = apiserver_requests(client).await;
    let per_agent = after
        .into_iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(&k).copied().unwrap_or(0.0);
            (d > 0.0).then(|| (k, d / n as f64))
        })
        .collect();
    (out, per_agent)
}

const VERBS: [(&str, &str); 8] = [
    ("APPLY", "requests_per_agent_APPLY"),
    ("POST", "requests_per_agent_POST"),
    ("PATCH", "requests_per_agent_PATCH"),
    ("PUT", "requests_per_agent_PUT"),
    ("DELETE", "requests_per_agent_DELETE"),
    ("GET", "requests_per_agent_GET"),
    ("LIST", "requests_per_agent_LIST"),
    ("WATCH", "requests_per_agent_WATCH"),
];

fn by_verb(r: &Requests, verb: &str) -> f64 {
    r.iter()
        .filter(|((v, _), _)| v == verb)
        .map(|(_, x)| x)
        .sum()
}

fn writes(r: &Requests) -> f64 {
    ["APPLY", "POST", "PATCH", "PUT", "DELETE"]
        .iter()
        .map(|v| by_verb(r, v))
        .sum()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// A CA rotation over `n` Ready Agents: `agentry ca rotate`, then (one overlap later) every
/// certificate re-issued by the new CA. Returns the seconds from the command to the last
/// re-issued Agent, the seconds from the first re-issue to the last (the burst itself), and
/// how many times an Agent was seen not Ready meanwhile.
async fn rotate_and_wait(client: &Client, ns: &str, n: usize) -> Rotation {
    let api: Api<Agent> = Api::namespaced(client.clone(), ns);
    let serial = |a: &Agent| {
        a.status
            .as_ref()
            .and_then(|s| s.identity.as_ref())
            .map(|i| i.serial.clone())
            .unwrap_or_default()
    };
    let before: BTreeMap<String, String> = api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|a| (a.name_any(), serial(a)))
        .collect();
    let mut events = watcher::watcher(api.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args(["ca", "rotate", "--namespace", ns])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (first, not_ready) = (std::cell::Cell::new(None), std::cell::Cell::new(0));
    let total = until_all_ready(&mut events, n, start, |agent: &Agent| {
        if !agent_ready(agent) {
            not_ready.set(not_ready.get() + 1);
        }
        let reissued = before
            .get(&agent.name_any())
            .is_some_and(|s| *s != serial(agent));
        if reissued && first.get().is_none() {
            first.set(Some(start.elapsed().as_secs_f64()));
        }
        reissued
    })
    .await;
    Rotation {
        total,
        burst: total - first.get().unwrap_or(0.0),
        not_ready: not_ready.get(),
    }
}

struct Rotation {
    total: f64,
    burst: f64,
    not_ready: usize,
}

/// How the bench runs the controller during a CA rotation: a short overlap (the default is 1h).
const ROTATION_OVERLAP: &str = "10s";

/// One controller run: a fresh namespace and data directory, N Agents to Ready (and, when
/// `rotate`, a CA rotation over them). Returns the seconds, the controller's peak RSS (KiB),
/// the requests per agent and the rotation; cleans up after.
async fn agentry_run(
    client: &Client,
    ns: &str,
    n: usize,
    log: &str,
    rotate: bool,
) -> (f64, f64, Requests, Option<(Rotation, Requests)>) {
    let data = tempfile::tempdir().unwrap();
    fresh_namespace(client, ns).await;
    // More controller flags, for experiments (AGENTRY_BENCH_CONTROLLER_ARGS="--flag value").
    let extra: Vec<String> = std::env::var("AGENTRY_BENCH_CONTROLLER_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    // A profiler to run the controller under (AGENTRY_BENCH_CONTROLLER_WRAPPER="heaptrack -o
    // /tmp/agentry"): its RSS and CPU are then read from the controller under it.
    let wrapper: Vec<String> = std::env::var("AGENTRY_BENCH_CONTROLLER_WRAPPER")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    let (program, mut args) = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut args = rest.to_vec();
            args.push(env!("CARGO_BIN_EXE_agentry").to_string());
            (program.clone(), args)
        }
        None => (env!("CARGO_BIN_EXE_agentry").to_string(), Vec::new()),
    };
    args.extend(
        [
            "controller",
            "--watch-namespace",
            ns,
            "--namespace",
            ns,
            "--ops-addr",
            "127.0.0.1:0",
            "--data-dir",
            data.path().to_str().unwrap(),
            "--ca-rotation-overlap",
            ROTATION_OVERLAP,
            "--maintenance-interval",
            "1s",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain(extra),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut ours = spawn(&program, &args, log);
    let timeline = optional_timeline(client, ns).await;
    let plane_before = control_plane_cpu();
    let clock = Instant::now();
    let (secs, requests) = requests_during(client, n, apply_and_wait(client, ns, n)).await;
    let pid = controller_pid(ours.id());
    let rss = peak_rss_kib(pid);
    finish_timeline(timeline, clock, "Agentry", log);
    // Printed at once: at 10,000 Agents the rotation and the deletion below take long.
    println!(
        "  Agentry: {n} Agents Ready in {secs:.1} s; controller CPU {:.1} s, peak RSS {:.1} MiB, control plane CPU {}",
        cpu_seconds(pid),
        rss / 1024.0,
        control_plane_cpu_since(plane_before)
    );
    print_requests("Agentry", &requests);
    let rotation = match rotate {
        true => Some(requests_during(client, n, rotate_and_wait(client, ns, n)).await),
        false => None,
    };
    // Printed before the deletion, which at 10,000 Agents takes long too.
    if let Some((r, req)) = &rotation {
        println!(
            "  CA rotation: all {n} re-issued {:.1} s after `agentry ca rotate` (overlap {ROTATION_OVERLAP}), the re-issue itself {:.1} s; {} not-Ready observations; {:.2} writes per agent",
            r.total,
            r.burst,
            r.not_ready,
            writes(req)
        );
    }
    // Clean up while the controller runs, so finalizers are released.
    delete_namespace(client, ns).await;
    if pid != ours.id() {
        // Under a wrapper: stop the controller itself, and let the wrapper finish its output.
        let _ = Command::new("kill").arg(pid.to_string()).status();
    } else {
        let _ = ours.kill();
    }
    let _ = ours.wait();
    (secs, rss, requests, rotation)
}

/// The plain client's run; `log` names where its timeline goes (it has no process to log).
async fn plain_run(client: &Client, ns: &str, n: usize, log: &str) -> (f64, Requests) {
    fresh_namespace(client, ns).await;
    let children = plain_children(ns, n);
    let timeline = optional_timeline(client, ns).await;
    let plane_before = control_plane_cpu();
    let clock = Instant::now();
    let out = requests_during(client, n, plain_client(client, ns, children)).await;
    finish_timeline(timeline, clock, "plain client", log);
    println!(
        "  plain client: {n} agents' children Available in {:.1} s; control plane CPU {}",
        out.0,
        control_plane_cpu_since(plane_before)
    );
    print_requests("plain client", &out.1);
    delete_namespace(client, ns).await;
    out
}

/// A per-agent timeline of the run, when `AGENTRY_BENCH_TIMELINE=1`.
async fn optional_timeline(client: &Client, ns: &str) -> Option<timeline::Timeline> {
    match timeline::enabled() {
        true => Some(timeline::Timeline::start(client, ns).await),
        false => None,
    }
}

/// Prints the timeline and writes it next to `log` (its `.log` replaced by `-timeline.json`).
fn finish_timeline(t: Option<timeline::Timeline>, clock: Instant, side: &str, log: &str) {
    let Some(t) = t else { return };
    let summary = t.finish(clock);
    timeline::print(side, &summary);
    let path = format!("{}-timeline.json", log.trim_end_matches(".log"));
    std::fs::write(&path, serde_json::to_string_pretty(&summary).unwrap()).unwrap();
}

fn print_requests(side: &str, r: &Requests) {
    println!(
        "apiserver requests per agent, {side} (all clients; writes total {:.2}; mean ms in the apiserver):",
        writes(r)
    );
    for ((verb, resource), x) in r.iter().filter(|((v, _), x)| **x >= 0.01 && is_verb(v)) {
        let seconds = r.get(&(format!("SECONDS {verb}"), resource.clone()));
        let ms = seconds.map_or(String::new(), |s| format!("{:>8.1}", s / x * 1000.0));
        println!("  {verb:<7} {resource:<40} {x:>8.2} {ms}");
    }
    for (level, x) in r
        .iter()
        .filter(|((v, _), _)| v == "QUEUED")
        .map(|((_, l), x)| (l, x))
    {
        let waited = r
            .get(&("QUEUED_N".to_string(), level.clone()))
            .copied()
            .unwrap_or(0.0);
        println!(
            "  flow control, priority level {level}: {waited:.2} requests per agent, {:.1} ms waiting each",
            x / waited.max(f64::MIN_POSITIVE) * 1000.0
        );
    }
}

/// The request counts of `Requests` (not its seconds or queue waits).
fn is_verb(v: &str) -> bool {
    !v.starts_with("SECONDS ") && !v.starts_with("QUEUED")
}

fn requests_json(r: &Requests) -> serde_json::Value {
    serde_json::Value::Object(
        r.iter()
            .filter(|((v, _), x)| **x >= 0.005 && is_verb(v))
            .map(|((verb, resource), x)| {
                (
                    format!("{verb} {resource}"),
                    serde_json::json!((x * 100.0).round() / 100.0),
                )
            })
            .collect(),
    )
}

/// The two diagnostics' figures.
struct Diagnostics {
    noop_secs: f64,
    noop_rss_kib: f64,
    deployments_secs: f64,
}

/// A no-op controller (status patches only; also the RSS baseline) over `n` Agents, then `n`
/// plain Deployments alone (scheduler, controller-manager and kwok at work).
async fn diagnostics(client: &Client, tag: &str, out_dir: &str, n: usize) -> Diagnostics {
    let base_ns = format!("bench-noop-{tag}");
    fresh_namespace(client, &base_ns).await;
    let me = std::env::current_exe().unwrap();
    let mut base = spawn(
        me.to_str().unwrap(),
        &["--baseline-controller", &base_ns],
        &format!("{out_dir}/controller-baseline.log"),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let noop_secs = apply_and_wait(client, &base_ns, n).await;
    let noop_rss_kib = peak_rss_kib(base.id());
    let _ = base.kill();
    let _ = base.wait();
    delete_namespace(client, &base_ns).await;

    let deploy_ns = format!("bench-deploy-{tag}");
    fresh_namespace(client, &deploy_ns).await;
    let deployments_secs = deployments_available(client, &deploy_ns, n).await;
    delete_namespace(client, &deploy_ns).await;
    Diagnostics {
        noop_secs,
        noop_rss_kib,
        deployments_secs,
    }
}

async fn run() {
    let n: usize = std::env::var("AGENTRY_BENCH_AGENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let rounds: usize = std::env::var("AGENTRY_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if n <= 2000 { 2 } else { 1 });
    let client = Client::try_default()
        .await
        .expect("KUBECONFIG must point at the local cluster (make bench)");
    agentry_install(&client).await;
    let tag = format!("{:06x}", rand::random::<u32>() & 0xffffff);
    let out_dir = std::env::var("AGENTRY_BENCH_OUT").unwrap_or_else(|_| "target/bench".into());
    std::fs::create_dir_all(&out_dir).unwrap();
    let started = Instant::now();

    // AGENTRY_BENCH_DIAGNOSTICS=0 skips the two diagnostics (at 10,000 Agents they add ~15 min).
    let diagnostics = match std::env::var("AGENTRY_BENCH_DIAGNOSTICS").as_deref() {
        Ok("0") => None,
        _ => Some(diagnostics(&client, &tag, &out_dir, n).await),
    };
    // AGENTRY_BENCH_FIRST=plain: the plain client goes first in even rounds (default Agentry).
    let plain_first = std::env::var("AGENTRY_BENCH_FIRST").is_ok_and(|v| v == "plain");

    // The main comparison, alternating who goes first.
    let (mut ours, mut plain, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ours_req, mut plain_req) = (Requests::new(), Requests::new());
    let mut rotation = None;
    for round in 0..rounds {
        let agentry_first = (round % 2 == 0) != plain_first;
        for agentry_side in [agentry_first, !agentry_first] {
            if agentry_side {
                let ns = format!("bench-agentry-{tag}-{round}");
                let log = format!("{out_dir}/controller-agentry-{round}.log");
                let last = round + 1 == rounds;
                let (secs, peak, req, rotated) = agentry_run(&client, &ns, n, &log, last).await;
                println!("round {round}: Agentry {n} Agents Ready in {secs:.1} s");
                if rotated.is_some() {
                    rotation = rotated;
                }
                ours.push(secs);
                rss.push(peak);
                ours_req = req;
            } else {
                let ns = format!("bench-plain-{tag}-{round}");
                let log = format!("{out_dir}/plain-client-{round}.log");
                let (secs, req) = plain_run(&client, &ns, n, &log).await;
                println!(
                    "round {round}: plain client, {n} agents' children Available in {secs:.1} s"
                );
                plain.push(secs);
                plain_req = req;
            }
        }
    }
    print_requests("Agentry (last round)", &ours_req);
    print_requests("plain client (last round)", &plain_req);
    std::fs::write(
        format!("{out_dir}/controller-requests.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "agents": n,
            "note": "apiserver_request_total deltas per agent over the run to Ready, all clients, last round",
            "agentry": requests_json(&ours_req),
            "plain_client": requests_json(&plain_req),
        }))
        .unwrap(),
    )
    .unwrap();

    let (ours_secs, plain_secs) = (mean(&ours), mean(&plain));
    let peak = rss.iter().copied().fold(0.0, f64::max);
    let mut rows = vec![Row {
        name: "agents_ready_vs_plain_client",
        ours: ours_secs,
        baseline: plain_secs,
        unit: "s",
        ratio: ours_secs / plain_secs,
        baseline_is: "a plain client creating the same Secret (pre-made cert), ServiceAccount, Service, Deployment per agent, 32 in flight, to Available; mean of alternating rounds",
        target: "<= 1.25",
        extra: vec![
            ("agents", n as f64),
            ("rounds", rounds as f64),
            ("ours_agents_per_s", n as f64 / ours_secs),
            ("plain_agents_per_s", n as f64 / plain_secs),
            ("ours_writes_per_agent", writes(&ours_req)),
            ("plain_writes_per_agent", writes(&plain_req)),
            ("bench_minutes", started.elapsed().as_secs_f64() / 60.0),
        ],
    }];
    // Without the no-op controller, peak RSS stands alone (no baseline, no "over noop").
    let base_rss = diagnostics.as_ref().map_or(f64::NAN, |d| d.noop_rss_kib);
    if let Some(d) = &diagnostics {
        rows.push(Row {
            name: "agents_ready_vs_noop",
            ours: ours_secs,
            baseline: d.noop_secs,
            unit: "s",
            ratio: ours_secs / d.noop_secs,
            baseline_is: "no-op kube-rs controller patching status only, same Agents (diagnostic)",
            target: "(diagnostic)",
            extra: vec![],
        });
        rows.push(Row {
            name: "agents_ready_vs_plain_deployments",
            ours: ours_secs,
            baseline: d.deployments_secs,
            unit: "s",
            ratio: ours_secs / d.deployments_secs,
            baseline_is: "the same number of plain Deployments alone, created directly, to Available (diagnostic)",
            target: "(diagnostic)",
            extra: vec![],
        });
    }
    rows.push(Row {
        name: "peak_rss",
        ours: peak / 1024.0,
        baseline: base_rss / 1024.0,
        unit: "MiB",
        ratio: peak / base_rss,
        baseline_is: "the no-op controller process over the same Agents",
        target: "<= 150 MiB at 10,000",
        extra: vec![
            ("ours_kib_per_agent", peak / n as f64),
            ("ours_kib_per_agent_over_noop", (peak - base_rss) / n as f64),
        ],
    });
    if let Some((r, req)) = &rotation {
        rows.push(Row {
            name: "ca_rotation_reissue",
            ours: r.burst,
            baseline: ours_secs,
            unit: "s",
            ratio: r.burst / ours_secs,
            baseline_is: "the same Agents' first issuance and rollout to Ready (this run)",
            target: "(bounded by --kube-api-qps; no Agent without a valid certificate)",
            extra: vec![
                ("seconds_from_rotate_command", r.total),
                ("not_ready_observations", r.not_ready as f64),
                ("writes_per_agent", writes(req)),
                ("reissued_per_s", n as f64 / r.burst.max(0.001)),
            ],
        });
    }
    for (verb, name) in VERBS {
        let (o, p) = (by_verb(&ours_req, verb), by_verb(&plain_req, verb));
        if o > 0.0 || p > 0.0 {
            rows.push(Row {
                name,
                ours: o,
                baseline: p,
                unit: "requests/agent",
                ratio: if p > 0.0 { o / p } else { f64::INFINITY },
                baseline_is: "the plain client's run (all clients of the apiserver, per agent)",
                target: "(diagnostic)",
                extra: vec![],
            });
        }
    }
    report::write("controller", &rows);
}

/// The CRDs and policy, as `make demo` installs them.
async fn agentry_install(client: &Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in agentry::crd::all() {
        crds.patch(
            &crd.name_any(),
            &PatchParams::apply("agentry-install").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
}
