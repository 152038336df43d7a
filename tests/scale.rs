//! Zero writes at rest: once N healthy Agents are Ready, full passes over all of them write
//! nothing to the apiserver and nothing to the ledger. Bounded bursts: a fleet created at once
//! is written at the client-side rate limit (`--kube-api-qps`, `--kube-api-burst`), no faster.
//!
//! Counted independently of the controller: the local apiserver writes an audit log of every
//! write (create, update, patch, delete) by members of `system:serviceaccounts:agentry-audited`
//! (`hack/local-cluster`), and the controller runs with the token of a ServiceAccount in that
//! namespace. The ledger is watched on disk (its database and WAL files).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use agentry::crd::Agent;

/// The namespace whose ServiceAccounts' writes the local apiserver audits.
const AUDITED: &str = "agentry-audited";

fn audit_log() -> PathBuf {
    let kubeconfig = std::env::var("KUBECONFIG").expect("KUBECONFIG");
    let log = Path::new(&kubeconfig).with_file_name("audit.log");
    assert!(
        log.exists(),
        "{} is missing: this cluster predates audit logging; restart it with \
         `hack/local-cluster down && hack/local-cluster up`",
        log.display()
    );
    log
}

/// The controller identity of one test whose writes the apiserver audits: a cluster-admin
/// ServiceAccount in the audited namespace, named after the test's namespace.
struct Audited {
    sa: String,
    /// Its user name in the audit log.
    user: String,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

impl Audited {
    async fn new(client: &kube::Client, ns: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sa = format!("controller-{ns}");
        let kubeconfig = audited_kubeconfig(client, &sa, dir.path()).await;
        Self {
            user: format!("system:serviceaccount:{AUDITED}:{sa}"),
            sa,
            kubeconfig,
            _dir: dir,
        }
    }

    /// Drops its cluster-admin binding.
    async fn release(self, client: &kube::Client) {
        let _ = Api::<ClusterRoleBinding>::all(client.clone())
            .delete(&self.sa, &Default::default())
            .await;
    }
}

/// A kubeconfig for a cluster-admin ServiceAccount `sa` in the audited namespace: the same
/// server and CA as $KUBECONFIG, authenticated by a bound token.
async fn audited_kubeconfig(client: &kube::Client, sa: &str, dir: &Path) -> PathBuf {
    let apply = PatchParams::apply("agentry-e2e").force();
    Api::<Namespace>::all(client.clone())
        .patch(
            AUDITED,
            &apply,
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": AUDITED}}),
            ),
        )
        .await
        .unwrap();
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), AUDITED);
    sas.patch(
        sa,
        &apply,
        &Patch::Apply(
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa}}),
        ),
    )
    .await
    .unwrap();
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(
            sa,
            &apply,
            &Patch::Apply(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": sa},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": AUDITED}],
            })),
        )
        .await
        .unwrap();
    let request = k8s_openapi::api::authentication::v1::TokenRequest {
        spec: k8s_openapi::api::authentication::v1::TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer: k8s_openapi::api::authentication::v1::TokenRequest = sas
        .create_subresource("token", sa, &PostParams::default(), &request)
        .await
        .unwrap();
    let token = answer.status.unwrap().token;
    let path = std::env::var("KUBECONFIG").unwrap();
    let mut config = kube::config::Kubeconfig::read_from(&path).unwrap();
    for named in &mut config.auth_infos {
        named.auth_info = Some(kube::config::AuthInfo {
            token: Some(token.clone().into()),
            ..Default::default()
        });
    }
    let out = dir.join("audited.kubeconfig");
    std::fs::write(&out, serde_json::to_string(&config).unwrap()).unwrap();
    out
}

/// The completed requests of `user` audited after byte `from` of the log.
fn audit_events_since(log: &Path, from: u64, user: &str) -> Vec<Value> {
    let text = std::fs::read(log).unwrap();
    let text = String::from_utf8_lossy(&text[(from as usize).min(text.len())..]).into_owned();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["user"]["username"] == user && e["stage"] == "ResponseComplete")
        .collect()
}

/// Audit events by `user` after byte `from` of the log: (verb, resource, namespace/name).
fn writes_since(log: &Path, from: u64, user: &str) -> Vec<(String, String, String)> {
    audit_events_since(log, from, user)
        .into_iter()
        .map(|e| {
            let o = &e["objectRef"];
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (
                s(&e["verb"]),
                format!(
                    "{}{}",
                    s(&o["resource"]),
                    o["subresource"]
                        .as_str()
                        .map(|x| format!("/{x}"))
                        .unwrap_or_default()
                ),
                format!("{}/{}", s(&o["namespace"]), s(&o["name"])),
            )
        })
        .collect()
}

/// When each write by `user` after byte `from` was received (seconds since the epoch), Lease
/// renewals left out.
fn write_times_since(log: &Path, from: u64, user: &str) -> Vec<f64> {
    let mut times: Vec<f64> = audit_events_since(log, from, user)
        .into_iter()
        .filter(|e| e["objectRef"]["resource"] != "leases")
        .filter_map(|e| {
            let at = e["requestReceivedTimestamp"].as_str()?;
            let t: jiff::Timestamp = at.parse().ok()?;
            Some(t.as_microsecond() as f64 / 1e6)
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times
}

/// Size and modification time of each of the ledger's files (database, WAL).
fn ledger_state(data_dir: &Path) -> Vec<(String, u64, SystemTime)> {
    let dir = data_dir.join("ledger");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("ledger.db"))
        .filter(|e| !e.file_name().to_string_lossy().ends_with("-shm"))
        .map(|e| {
            let m = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                m.len(),
                m.modified().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Creates `n` Agents named `<prefix><i>`, `in_flight` at once, each asking 10m CPU (a small
/// share of kwok-node-0, hack/local-cluster).
async fn create_small_agents(
    client: &kube::Client,
    ns: &str,
    prefix: &str,
    n: usize,
    in_flight: usize,
) {
    futures::stream::iter(0..n)
        .map(|i| async move {
            let small = json!({"spec": {"resources": {"cpu": "10m"}}});
            create_agent(
                client,
                ns,
                agent_manifest(&format!("{prefix}{i:05}"), small),
            )
            .await
            .unwrap()
        })
        .buffer_unordered(in_flight)
        .collect::<Vec<_>>()
        .await;
}

/// Waits (up to 10 minutes) until `n` Agents in `ns` are Ready.
async fn wait_all_ready(client: &kube::Client, ns: &str, n: usize, what: &str) {
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns);
    eventually(Duration::from_secs(600), what, || async {
        agents.list(&ListParams::default()).await.is_ok_and(|l| {
            l.items
                .iter()
                .filter(|a| condition(a, "Ready").is_some_and(|c| c.status == "True"))
                .count()
                == n
        })
    })
    .await;
}

/// The controller's writes on the way from created to Ready, per Agent: its finalizer and
/// labels in one apply (not a finalizer patch and then a label apply), each child applied once
/// (the watch events of our own writes trigger no pass that would apply again), and the
/// status at most three times (Provisioning, Ready, and one spare for a pass that raced a
/// rollout step). The exact counts are printed.
fn assert_writes_to_ready(writes: &[(String, String, String)], ns: &str, n: usize) {
    let mut per: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
    // The Agents' own objects (named after them: a00000...), not the CA's or the Lease.
    let agents_own = format!("{ns}/a0");
    for (_, resource, object) in writes {
        if resource == "events" || !object.starts_with(&agents_own) {
            continue;
        }
        *per.entry(resource.as_str())
            .or_default()
            .entry(object.as_str())
            .or_default() += 1;
    }
    let total = |r: &str| per.get(r).map_or(0, |m| m.values().sum::<usize>());
    eprintln!(
        "writes to Ready for {n} Agents: {:?}",
        per.keys().map(|r| (r, total(r))).collect::<Vec<_>>()
    );
    for resource in [
        "agents",
        "secrets",
        "serviceaccounts",
        "services",
        "deployments",
    ] {
        let each = per.get(resource).cloned().unwrap_or_default();
        assert_eq!(
            each.len(),
            n,
            "{resource}: written for {} of {n} Agents",
            each.len()
        );
        let over: Vec<_> = each.iter().filter(|(_, c)| **c != 1).collect();
        assert!(
            over.is_empty(),
            "{resource}: not written exactly once on the way to Ready: {:?}",
            &over[..over.len().min(10)]
        );
    }
    let status = per.get("agents/status").cloned().unwrap_or_default();
    let most = status.values().copied().max().unwrap_or(0);
    assert!(
        status.len() == n && most <= 3,
        "status writes: {} Agents, at most {most} each",
        status.len()
    );
}

fn agents_at_rest() -> usize {
    std::env::var("AGENTRY_REST_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// N = 200 Agents (AGENTRY_REST_AGENTS to change) reach Ready; then, over three full resync
/// periods (`--resync-interval 4s`: every Agent is reconciled again, checked on the reconcile
/// counter), the controller's ServiceAccount makes 0 writes (its leader Lease renewals aside)
/// and the ledger's files do not change.
#[tokio::test(flavor = "multi_thread")]
async fn healthy_agents_at_rest_cost_no_writes() {
    let n = agents_at_rest();
    let (client, ns) = setup("rest").await;
    let log = audit_log();
    let audited = Audited::new(&client, &ns.name).await;
    let user = audited.user.clone();
    let mut opts = ControllerOptions::new(&ns.name);
    opts.kubeconfig = Some(&audited.kubeconfig);
    opts.extra_args = ["--resync-interval", "4s", "--concurrency", "32"]
        .map(String::from)
        .to_vec();
    let controller = ControllerProcess::start(opts);

    let created_from = std::fs::metadata(&log).unwrap().len();
    create_small_agents(&client, &ns.name, "a", n, 16).await;
    wait_all_ready(&client, &ns.name, n, &format!("{n} Agents Ready")).await;

    // Settled: no write by the controller (other than its Lease) for 5 s.
    let quiet = |from: u64| {
        writes_since(&log, from, &user)
            .into_iter()
            .filter(|w| w.1 != "leases")
            .collect::<Vec<_>>()
    };
    let mut from = std::fs::metadata(&log).unwrap().len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let writes = quiet(from);
        if writes.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the controller never settled; still writing: {:?}",
            &writes[..writes.len().min(20)]
        );
        from = std::fs::metadata(&log).unwrap().len();
    }

    assert_writes_to_ready(&writes_since(&log, created_from, &user), &ns.name, n);

    // At rest: three resync periods.
    let from = std::fs::metadata(&log).unwrap().len();
    let ledger_before = ledger_state(&controller.data_dir());
    let reconciles_before = controller.metric("agentry_reconcile_total").await.unwrap();
    tokio::time::sleep(Duration::from_secs(13)).await;
    let reconciles =
        controller.metric("agentry_reconcile_total").await.unwrap() - reconciles_before;
    let writes = quiet(from);
    let lease_writes = writes_since(&log, from, &user).len() - writes.len();
    assert!(
        reconciles >= 2.0 * n as f64,
        "only {reconciles} reconciles in three resync periods of {n} Agents: the window proves nothing"
    );
    assert!(
        writes.is_empty(),
        "{} writes at rest over {reconciles} reconciles, e.g. {:?}",
        writes.len(),
        &writes[..writes.len().min(20)]
    );
    assert!(
        lease_writes > 0,
        "no Lease renewal audited: is the audit log being written?"
    );
    assert_eq!(
        ledger_state(&controller.data_dir()),
        ledger_before,
        "the ledger was written at rest"
    );
    eprintln!(
        "{n} Agents at rest: {reconciles} reconciles, 0 writes, {lease_writes} Lease renewals, ledger unchanged"
    );
    audited.release(&client).await;
}

/// A burst held to the limit: 30 Agents created at once, with `--kube-api-qps 10
/// --kube-api-burst 10`. Counted in the apiserver's audit log (writes only; reads share the
/// same limit): no second holds more than two windows' worth (20), and the writes are spread
/// over at least the time the rate allows. Every Agent still becomes Ready, and the Lease
/// (on its own, unthrottled connection) keeps being renewed.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_agents_is_written_at_the_client_side_rate_limit() {
    const N: usize = 30;
    const QPS: f64 = 10.0;
    const BURST: usize = 10;
    let (client, ns) = setup("burst").await;
    let log = audit_log();
    let audited = Audited::new(&client, &ns.name).await;
    let user = audited.user.clone();
    let from = std::fs::metadata(&log).unwrap().len();
    let mut opts = ControllerOptions::new(&ns.name);
    opts.kubeconfig = Some(&audited.kubeconfig);
    opts.extra_args = ["--kube-api-qps", "10", "--kube-api-burst", "10"]
        .map(String::from)
        .to_vec();
    let _controller = ControllerProcess::start(opts);
    create_small_agents(&client, &ns.name, "b", N, N).await;
    wait_all_ready(
        &client,
        &ns.name,
        N,
        &format!("{N} Agents Ready at 10 requests/s"),
    )
    .await;
    let times = write_times_since(&log, from, &user);
    let lease_writes = writes_since(&log, from, &user)
        .iter()
        .filter(|w| w.1 == "leases")
        .count();
    assert!(
        times.len() >= 5 * N,
        "only {} writes audited for {N} Agents",
        times.len()
    );
    let busiest = times
        .iter()
        .enumerate()
        .map(|(i, t)| times[i..].iter().take_while(|u| **u < t + 1.0).count())
        .max()
        .unwrap_or(0);
    let spread = times.last().unwrap() - times.first().unwrap();
    let least = (times.len() - BURST) as f64 / QPS;
    eprintln!(
        "{} writes over {spread:.1} s (at least {least:.1} s at {QPS}/s), busiest second {busiest}, {lease_writes} Lease renewals",
        times.len()
    );
    assert!(
        busiest <= 2 * BURST,
        "{busiest} writes within one second: the limit of {QPS}/s (bursts of {BURST}) was not kept"
    );
    assert!(
        spread >= least * 0.9,
        "{} writes in {spread:.1} s: faster than {QPS}/s",
        times.len()
    );
    assert!(
        lease_writes > 0,
        "the Lease was not renewed during the burst"
    );
    audited.release(&client).await;
}
