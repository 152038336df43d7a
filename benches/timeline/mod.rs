//! Per-agent timeline of a bench run (`AGENTRY_BENCH_TIMELINE=1`): when each agent's objects
//! were first seen, and when each became ready, from watches on the run's namespace (one per
//! kind, keyed by the `agentry.dev/agent` label, Agents by name). Both sides of the comparison
//! go through the same stages from the identity Secret on; Agentry's side adds the Agent at the
//! start and its Ready at the end. The report says where along the way the time goes: when a
//! share of agents had passed each stage, and how long each stage took after the one before.
//!
//! Watch events arrive a little after the write they report; both sides pay the same delay.
//! The watches add load of their own (four to five more watchers of busy kinds), which is why
//! this is opt-in and not part of the main figures.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

use agentry::crd::Agent;
use agentry::keys::AGENT_LABEL;

// The same readiness the bench waits for on each side.
use super::{agent_ready, deployment_available};

/// The stages, in the order an agent passes them.
pub const STAGES: [&str; 9] = [
    "agent created",
    "secret created",
    "deployment created",
    "replicaset created",
    "pod created",
    "pod scheduled",
    "pod ready",
    "deployment available",
    "agent ready",
];

/// (agent, stage index) -> the first time seen.
type Seen = Arc<Mutex<BTreeMap<(String, usize), Instant>>>;

pub struct Timeline {
    seen: Seen,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Whether the bench records timelines (`AGENTRY_BENCH_TIMELINE=1`).
pub fn enabled() -> bool {
    std::env::var("AGENTRY_BENCH_TIMELINE").is_ok_and(|v| v == "1")
}

/// A stage (its index in `STAGES`) and whether an object shows it reached.
type Stage<K> = (usize, fn(&K) -> bool);

/// Follows `api`, recording for each object's agent the first time each `(stage, predicate)`
/// held.
fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    key: fn(&K) -> Option<String>,
    stages: Vec<Stage<K>>,
    seen: Seen,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    tokio::spawn(async move {
        let mut events = watcher::watcher(api, config).applied_objects().boxed();
        loop {
            let obj = match events.try_next().await {
                Ok(Some(o)) => o,
                Ok(None) => return,
                Err(e) => {
                    eprintln!("timeline watch error: {e}");
                    continue;
                }
            };
            let Some(agent) = key(&obj) else { continue };
            let now = Instant::now();
            let mut seen = seen.lock().unwrap();
            for (stage, holds) in &stages {
                if holds(&obj) {
                    seen.entry((agent.clone(), *stage)).or_insert(now);
                }
            }
        }
    })
}

fn by_label<K: kube::Resource>(obj: &K) -> Option<String> {
    obj.labels().get(AGENT_LABEL).cloned()
}

fn always<K>(_: &K) -> bool {
    true
}

fn pod_scheduled(p: &Pod) -> bool {
    p.spec.as_ref().is_some_and(|s| s.node_name.is_some())
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

impl Timeline {
    /// Starts the watches on `ns` and waits a moment for them to be established (the
    /// namespace is new: nothing is missed before that).
    pub async fn start(client: &Client, ns: &str) -> Self {
        let seen = Seen::default();
        let labelled = || watcher::Config::default().labels(AGENT_LABEL);
        let tasks = vec![
            follow(
                Api::<Agent>::namespaced(client.clone(), ns),
                watcher::Config::default(),
                |a: &Agent| Some(a.name_any()),
                vec![(0, always), (8, agent_ready)],
                seen.clone(),
            ),
            follow(
                Api::<Secret>::namespaced(client.clone(), ns),
                labelled(),
                by_label,
                vec![(1, always)],
                seen.clone(),
            ),
            follow(
                Api::<Deployment>::namespaced(client.clone(), ns),
                labelled(),
                by_label,
                vec![(2, always), (7, deployment_available)],
                seen.clone(),
            ),
            follow(
                Api::<ReplicaSet>::namespaced(client.clone(), ns),
                labelled(),
                by_label,
                vec![(3, always)],
                seen.clone(),
            ),
            follow(
                Api::<Pod>::namespaced(client.clone(), ns),
                labelled(),
                by_label,
                vec![(4, always), (5, pod_scheduled), (6, pod_ready)],
                seen.clone(),
            ),
        ];
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        Timeline { seen, tasks }
    }

    /// Stops the watches and summarises: per stage, how many agents reached it, when 50%, 90%
    /// and all of them had, and the time from the stage before (median, p90, max).
    /// Times are from `start`, the run's clock.
    pub fn finish(self, start: Instant) -> serde_json::Value {
        for t in &self.tasks {
            t.abort();
        }
        let seen = self.seen.lock().unwrap();
        let mut per_agent: BTreeMap<&str, [Option<f64>; STAGES.len()]> = BTreeMap::new();
        for ((agent, stage), t) in seen.iter() {
            let secs = t.saturating_duration_since(start).as_secs_f64();
            per_agent.entry(agent).or_insert([None; STAGES.len()])[*stage] = Some(secs);
        }
        let mut stages = Vec::new();
        for (i, name) in STAGES.iter().enumerate() {
            let mut at: Vec<f64> = per_agent.values().filter_map(|s| s[i]).collect();
            if at.is_empty() {
                continue;
            }
            // From the latest earlier stage this agent has (the plain client has no Agent).
            let mut after: Vec<f64> = per_agent
                .values()
                .filter_map(|s| {
                    let t = s[i]?;
                    let before = s[..i].iter().rev().find_map(|x| *x)?;
                    Some(t - before)
                })
                .collect();
            stages.push(serde_json::json!({
                "stage": name,
                "agents": at.len(),
                "at_p50_s": round(quantile(&mut at, 0.5)),
                "at_p90_s": round(quantile(&mut at, 0.9)),
                "at_max_s": round(quantile(&mut at, 1.0)),
                "after_previous_p50_s": round(quantile(&mut after, 0.5)),
                "after_previous_p90_s": round(quantile(&mut after, 0.9)),
                "after_previous_max_s": round(quantile(&mut after, 1.0)),
            }));
        }
        serde_json::Value::Array(stages)
    }
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn round(x: f64) -> serde_json::Value {
    if x.is_finite() {
        serde_json::json!((x * 100.0).round() / 100.0)
    } else {
        serde_json::Value::Null
    }
}

/// Prints a timeline summary as a table.
pub fn print(side: &str, timeline: &serde_json::Value) {
    println!(
        "  timeline, {side} (s from start: p50 / p90 / all; after the stage before: p50 / p90 / max):"
    );
    for s in timeline.as_array().into_iter().flatten() {
        let f = |k: &str| s[k].as_f64().map_or("-".into(), |x| format!("{x:.2}"));
        println!(
            "    {:<22} {:>5} agents  at {:>7} {:>7} {:>7}   after {:>6} {:>6} {:>6}",
            s["stage"].as_str().unwrap_or(""),
            s["agents"],
            f("at_p50_s"),
            f("at_p90_s"),
            f("at_max_s"),
            f("after_previous_p50_s"),
            f("after_previous_p90_s"),
            f("after_previous_max_s"),
        );
    }
}
