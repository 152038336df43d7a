//! Controller benchmark (BENCHMARKS.md): N Agents (default 1,000) applied -> all Ready on the local
//! control plane, against a no-op kube-rs controller that only patches status on the same kind of
//! objects, in the same run. Reports the time ratio and the peak RSS of both processes.
//!
//! Needs KUBECONFIG pointing at `hack/local-cluster` (`make bench` starts it).
//! Run as `controller --baseline-controller <ns>` it is the baseline controller itself.

mod report;

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

async fn fresh_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
    api.create(&PostParams::default(), &ns).await.unwrap();
}

/// Creates `n` Agents (32 in flight) and waits until all are Ready; returns seconds. Readiness
/// is followed with one watch (not by listing), so measuring adds no load of its own.
async fn apply_and_wait(client: &Client, ns: &str, n: usize) -> f64 {
    let api: Api<Agent> = Api::namespaced(client.clone(), ns);
    let mut events = watcher::watcher(api.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let start = Instant::now();
    let creator = {
        let api = api.clone();
        tokio::spawn(async move {
            futures::stream::iter(0..n)
                .map(|i| {
                    let api = api.clone();
                    async move {
                        let agent: Agent = serde_json::from_value(serde_json::json!({
                            "apiVersion": "agentry.dev/v1alpha1", "kind": "Agent",
                            "metadata": {"name": format!("agent-{i:04}")},
                            "spec": {"capabilities": ["bench"], "permissions": ["memory:read"],
                                     "template": {"image": "ghcr.io/example/bench:1"}, "resources": {"memory": "64Mi"}}
                        }))
                        .unwrap();
                        api.create(&PostParams::default(), &agent).await.map(|_| ())
                    }
                })
                .buffer_unordered(32)
                .try_collect::<Vec<_>>()
                .await
        })
    };
    let mut ready = std::collections::HashSet::new();
    let deadline = Duration::from_secs(1800);
    while ready.len() < n {
        let next =
            tokio::time::timeout(deadline.saturating_sub(start.elapsed()), events.try_next()).await;
        let agent = match next {
            Ok(Ok(Some(a))) => a,
            Ok(Ok(None)) => panic!("the watch ended"),
            Ok(Err(e)) => {
                eprintln!("watch error (retrying): {e}");
                continue;
            }
            Err(_) => panic!("only {}/{n} Agents Ready after {deadline:?}", ready.len()),
        };
        let is_ready = agent.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if is_ready {
            ready.insert(agent.name_any());
        } else {
            ready.remove(&agent.name_any());
        }
    }
    let secs = start.elapsed().as_secs_f64();
    creator.await.unwrap().unwrap();
    secs
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
                        "metadata": {"name": format!("plain-{i:04}")},
                        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": format!("plain-{i:04}")}},
                            "template": {"metadata": {"labels": {"app": format!("plain-{i:04}")}},
                                "spec": {"containers": [{"name": "agent", "image": "ghcr.io/example/bench:1",
                                    "resources": {"limits": {"memory": "64Mi"}, "requests": {"memory": "64Mi"}}}]}}}
                    }))
                    .unwrap();
                    api.create(&PostParams::default(), &d).await.map(|_| ())
                }
            })
            .buffer_unordered(32)
            .try_collect::<Vec<_>>()
            .await
    });
    let mut available = std::collections::HashSet::new();
    while available.len() < n {
        match tokio::time::timeout(Duration::from_secs(1800), events.try_next()).await {
            Ok(Ok(Some(d))) => {
                if d.status
                    .as_ref()
                    .and_then(|s| s.available_replicas)
                    .unwrap_or(0)
                    >= 1
                {
                    available.insert(d.name_any());
                }
            }
            Ok(Err(e)) => eprintln!("watch error (retrying): {e}"),
            _ => panic!("only {}/{n} Deployments Available", available.len()),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    creator.await.unwrap().unwrap();
    secs
}

async fn delete_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let _ = api.delete(name, &DeleteParams::background()).await;
    let start = Instant::now();
    while api.get_opt(name).await.ok().flatten().is_some()
        && start.elapsed() < Duration::from_secs(600)
    {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
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

async fn run() {
    let n: usize = std::env::var("AGENTRY_BENCH_AGENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let client = Client::try_default()
        .await
        .expect("KUBECONFIG must point at the local cluster (make bench)");
    agentry_install(&client).await;
    let tag = format!("{:06x}", rand::random::<u32>() & 0xffffff);
    let data = tempfile::tempdir().unwrap();
    let out_dir = std::env::var("AGENTRY_BENCH_OUT").unwrap_or_else(|_| "target/bench".into());
    std::fs::create_dir_all(&out_dir).unwrap();

    // Baseline first, then ours, each in a namespace of its own.
    let base_ns = format!("bench-noop-{tag}");
    fresh_namespace(&client, &base_ns).await;
    let me = std::env::current_exe().unwrap();
    let mut base = spawn(
        me.to_str().unwrap(),
        &["--baseline-controller", &base_ns],
        &format!("{out_dir}/controller-baseline.log"),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base_secs = apply_and_wait(&client, &base_ns, n).await;
    let base_rss = peak_rss_kib(base.id());
    let _ = base.kill();
    let _ = base.wait();
    delete_namespace(&client, &base_ns).await;

    // The floor the control plane sets: the same number of plain Deployments, created directly,
    // to Available (scheduler, controller-manager and kwok doing their part, no Agentry at all).
    let floor_ns = format!("bench-deploy-{tag}");
    fresh_namespace(&client, &floor_ns).await;
    let floor_secs = deployments_available(&client, &floor_ns, n).await;
    delete_namespace(&client, &floor_ns).await;

    let ours_ns = format!("bench-agentry-{tag}");
    fresh_namespace(&client, &ours_ns).await;
    let mut ours = spawn(
        env!("CARGO_BIN_EXE_agentry"),
        &[
            "controller",
            "--watch-namespace",
            &ours_ns,
            "--namespace",
            &ours_ns,
            "--ops-addr",
            "127.0.0.1:0",
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
        &format!("{out_dir}/controller-agentry.log"),
    );
    let ours_secs = apply_and_wait(&client, &ours_ns, n).await;
    let ours_rss = peak_rss_kib(ours.id());
    // Clean up while the controller runs, so finalizers are released.
    delete_namespace(&client, &ours_ns).await;
    let _ = ours.kill();
    let _ = ours.wait();

    let rows = vec![
        Row {
            name: "agents_ready_time",
            ours: ours_secs,
            baseline: base_secs,
            unit: "s",
            ratio: ours_secs / base_secs,
            baseline_is: "no-op kube-rs controller patching status only, same objects",
            target: "<= 2.0",
            extra: vec![
                ("agents", n as f64),
                ("ours_agents_per_s", n as f64 / ours_secs),
            ],
        },
        Row {
            name: "agents_ready_vs_plain_deployments",
            ours: ours_secs,
            baseline: floor_secs,
            unit: "s",
            ratio: ours_secs / floor_secs,
            baseline_is: "the same number of plain Deployments created directly, to Available",
            target: "(diagnostic)",
            extra: vec![],
        },
        Row {
            name: "peak_rss",
            ours: ours_rss / 1024.0,
            baseline: base_rss / 1024.0,
            unit: "MiB",
            ratio: ours_rss / base_rss,
            baseline_is: "the same no-op controller process",
            target: "<= 2.0",
            extra: vec![],
        },
    ];
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
