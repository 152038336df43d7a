//! The Agent's status as GitOps tools read it: kstatus (sigs.k8s.io/cli-utils, which Flux and
//! `kubectl wait`-style tooling use) through `agentry-kstatus`, and the Argo CD health check in
//! examples/gitops/argocd through `agentry-lua-health` (both built by hack/build-binaries).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::{Api, ResourceExt};
use serde::Deserialize;
use serde_json::json;

use agentry::crd::Agent;

const ARGOCD_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gitops/argocd");

/// `{"status": ..., "message": ...}` as both tools print it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
struct Verdict {
    status: String,
    message: String,
}

/// A tool from hack/tools, built by hack/build-binaries into the bin dir.
fn tool(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let path = DIR.get_or_init(tool_dir).join(name);
    assert!(
        path.is_file(),
        "{} is missing: run hack/build-binaries",
        path.display()
    );
    path
}

fn run_with_stdin(command: &mut Command, stdin: &[u8]) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn verdict(what: &str, out: Output) -> Verdict {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what} printed {:?}: {e}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// kstatus' reading of the Agent: the Agent's JSON piped into `agentry-kstatus`.
fn kstatus(agent: &Agent) -> Verdict {
    let json = serde_json::to_vec(agent).unwrap();
    verdict(
        "agentry-kstatus",
        run_with_stdin(&mut Command::new(tool("agentry-kstatus")), &json),
    )
}

/// Argo CD's reading of the Agent: examples/gitops/argocd/agent-health.lua on its JSON.
fn argocd_health(agent: &Agent) -> Verdict {
    let json = serde_json::to_vec(agent).unwrap();
    let script = Path::new(ARGOCD_DIR).join("agent-health.lua");
    verdict(
        "agentry-lua-health",
        run_with_stdin(
            Command::new(tool("agentry-lua-health"))
                .arg("--script")
                .arg(script),
            &json,
        ),
    )
}

/// Whether the installed CRD defaults `status.observedGeneration` (to -1), which makes a
/// brand-new Agent InProgress before the controller has seen it. Without that default, kstatus
/// reads an Agent with no status at all as Current.
fn crd_defaults_observed_generation() -> bool {
    agentry::crd::all().iter().any(|crd| {
        let crd = serde_json::to_value(crd).unwrap();
        crd["spec"]["names"]["kind"] == "Agent"
            && crd["spec"]["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|v| {
                    !v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
                        ["observedGeneration"]["default"]
                        .is_null()
                })
    })
}

/// One observation of the Agent: when, its kstatus, its Argo CD health, and the object.
struct Seen {
    at: Duration,
    kstatus: Verdict,
    argocd: Verdict,
    agent: Agent,
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.agent.status.as_ref();
        write!(
            f,
            "{:>6.2}s rv={} gen={:?} observed={:?} phase={:?} kstatus={}({:?}) argocd={}({:?})",
            self.at.as_secs_f64(),
            self.agent.resource_version().unwrap_or_default(),
            self.agent.metadata.generation,
            s.and_then(|s| s.observed_generation),
            s.and_then(|s| s.phase),
            self.kstatus.status,
            self.kstatus.message,
            self.argocd.status,
            self.argocd.message,
        )
    }
}

/// Creates `manifest` and records every version of the Agent from its creation (a watch opened
/// before the create, so no intermediate status is missed) until `done` holds or `timeout`.
async fn create_and_record(
    client: &kube::Client,
    ns: &str,
    manifest: serde_json::Value,
    timeout: Duration,
    done: impl Fn(&[Seen]) -> bool,
) -> Vec<Seen> {
    let name = manifest["metadata"]["name"].as_str().unwrap().to_string();
    let api: Api<Agent> = Api::namespaced(client.clone(), ns);
    let selector = format!("metadata.name={name}");
    let rv = api
        .list(&ListParams::default().fields(&selector))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut events = api
        .watch(&WatchParams::default().fields(&selector).timeout(120), &rv)
        .await
        .unwrap()
        .boxed();
    let start = Instant::now();
    let observe = |agent: Agent| Seen {
        at: start.elapsed(),
        kstatus: kstatus(&agent),
        argocd: argocd_health(&agent),
        agent,
    };
    let created = create_agent(client, ns, manifest)
        .await
        .unwrap_or_else(|e| panic!("creating agent {ns}/{name}: {e}"));
    let mut seen = vec![observe(created)];
    let deadline = tokio::time::Instant::now() + timeout;
    while !done(&seen) {
        let event = match tokio::time::timeout_at(deadline, events.next()).await {
            Err(_) => break,
            Ok(None) => panic!("the watch on {ns}/{name} ended early; seen: {seen:#?}"),
            Ok(Some(event)) => event.unwrap(),
        };
        match event {
            WatchEvent::Added(agent) | WatchEvent::Modified(agent) => seen.push(observe(agent)),
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected watch event on {ns}/{name}: {other:?}; seen: {seen:#?}"),
        }
    }
    seen
}

fn first(seen: &[Seen], status: &str) -> Option<usize> {
    seen.iter().position(|s| s.kstatus.status == status)
}

/// An Agent the controller has not finished with must never look done to kstatus. Without the
/// CRD's observedGeneration default (-1), kstatus cannot tell a status-less new Agent from a
/// finished one (no observedGeneration, no conditions: "Resource is current"), so only that gap
/// is tolerated then; once the CRD defaults it, none is.
fn assert_not_current_before(seen: &[Seen], end: usize) {
    let strict = crd_defaults_observed_generation();
    for s in &seen[..end] {
        assert!(
            s.kstatus.status != "Current" || (!strict && s.agent.status.is_none()),
            "kstatus saw {s:?} before the controller was done (CRD defaults observedGeneration: \
             {strict}); seen: {seen:#?}"
        );
    }
}

#[tokio::test]
async fn good_agent_goes_in_progress_then_current() {
    let (client, ns) = setup("kstatus-good").await;
    let _controller = ControllerProcess::start(ControllerOptions::new(&ns.name));
    let seen = create_and_record(
        &client,
        &ns.name,
        agent_manifest("researcher", json!({})),
        Duration::from_secs(60),
        |seen| {
            first(seen, "InProgress")
                .is_some_and(|i| seen[i..].iter().any(|s| s.kstatus.status == "Current"))
        },
    )
    .await;
    let in_progress =
        first(&seen, "InProgress").unwrap_or_else(|| panic!("never InProgress; seen: {seen:#?}"));
    let current = seen[in_progress..]
        .iter()
        .position(|s| s.kstatus.status == "Current")
        .map(|i| i + in_progress)
        .unwrap_or_else(|| panic!("not Current within 60s of creation; seen: {seen:#?}"));

    // Nothing but InProgress from the first InProgress to Current, and nothing that looks done
    // before it.
    assert_not_current_before(&seen, in_progress);
    for s in &seen[in_progress..current] {
        assert_eq!(s.kstatus.status, "InProgress", "seen: {seen:#?}");
    }

    // Argo CD agrees on every version: Progressing until kstatus is Current, then Healthy.
    for s in &seen[..current] {
        assert_eq!(s.argocd.status, "Progressing", "{s:?}; seen: {seen:#?}");
    }
    let done = &seen[current];
    assert_eq!(done.argocd.status, "Healthy", "seen: {seen:#?}");
    let ready = condition(&done.agent, "Ready").unwrap();
    assert_eq!(ready.status, "True");
    assert_eq!(done.argocd.message, ready.message);
    assert_eq!(
        done.agent.status.as_ref().unwrap().observed_generation,
        done.agent.metadata.generation
    );
    eprintln!("researcher, every version from creation:\n{seen:#?}");
}

#[tokio::test]
async fn refused_permission_is_failed() {
    let (client, ns) = setup("kstatus-refused").await;
    let _controller = ControllerProcess::start(ControllerOptions::new(&ns.name));
    // The namespace has no agentry.dev/allowed-permissions annotation: only backup:write and
    // memory:read are allowed.
    let seen = create_and_record(
        &client,
        &ns.name,
        agent_manifest(
            "sender",
            json!({"spec": {"permissions": ["messages:send"]}}),
        ),
        Duration::from_secs(60),
        |seen| first(seen, "Failed").is_some(),
    )
    .await;
    let failed =
        first(&seen, "Failed").unwrap_or_else(|| panic!("not Failed within 60s; seen: {seen:#?}"));
    assert_not_current_before(&seen, failed);
    let s = &seen[failed];
    let stalled = condition(&s.agent, "Stalled").expect("Stalled condition");
    assert_eq!(stalled.status, "True");
    assert_eq!(stalled.reason, "PermissionDenied");
    assert!(
        stalled.message.contains("messages:send"),
        "{}",
        stalled.message
    );
    assert_eq!(s.kstatus.message, stalled.message);
    assert_eq!(
        s.argocd,
        Verdict {
            status: "Degraded".into(),
            message: stalled.message.clone()
        }
    );

    // It stays Failed: nothing changes until the Agent or its namespace does.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let agent = Api::<Agent>::namespaced(client.clone(), &ns.name)
        .get("sender")
        .await
        .unwrap();
    assert_eq!(kstatus(&agent).status, "Failed");
    assert_eq!(argocd_health(&agent).status, "Degraded");
    eprintln!("sender, every version from creation:\n{seen:#?}");
}

#[test]
fn argocd_health_check_cases_pass() {
    let tests = Path::new(ARGOCD_DIR).join("health_test.yaml");
    let out = Command::new(tool("agentry-lua-health"))
        .arg("--tests")
        .arg(&tests)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every testdata/*.yaml is a case, and every case ran.
    let listed = std::fs::read_to_string(&tests).unwrap();
    let files: Vec<String> = std::fs::read_dir(Path::new(ARGOCD_DIR).join("testdata"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    for file in &files {
        assert!(
            listed.contains(&format!("inputPath: testdata/{file}")),
            "testdata/{file} is not in health_test.yaml"
        );
    }
    let n = files.len();
    assert!(n >= 5, "{files:?}");
    assert!(stdout.contains(&format!("{n}/{n} cases pass")), "{stdout}");
}

#[test]
fn argocd_health_check_cases_agree_with_kstatus() {
    // The same objects through kstatus: Healthy <-> Current, Degraded <-> Failed, and
    // Progressing <-> InProgress except a status-less Agent (see the CRD default above).
    let expected = [
        ("healthy.yaml", "Current"),
        ("progressing-new.yaml", "InProgress"),
        // kstatus' gap that the CRD's observedGeneration default closes; Argo CD says Progressing.
        ("progressing-no-status.yaml", "Current"),
        ("progressing-rollout.yaml", "InProgress"),
        ("degraded-stalled.yaml", "Failed"),
        ("generation-behind.yaml", "InProgress"),
    ];
    for (file, want) in expected {
        let yaml = std::fs::read(Path::new(ARGOCD_DIR).join("testdata").join(file)).unwrap();
        let got = verdict(
            "agentry-kstatus",
            run_with_stdin(&mut Command::new(tool("agentry-kstatus")), &yaml),
        );
        assert_eq!(got.status, want, "{file}: {got:?}");
    }
}

#[test]
fn argocd_cm_patch_carries_the_tested_script() {
    let patch =
        std::fs::read_to_string(Path::new(ARGOCD_DIR).join("argocd-cm-patch.yaml")).unwrap();
    let patch: serde_json::Value = serde_saphyr::from_str(&patch).unwrap();
    assert_eq!(patch["kind"], "ConfigMap");
    assert_eq!(patch["metadata"]["name"], "argocd-cm");
    let script = std::fs::read_to_string(Path::new(ARGOCD_DIR).join("agent-health.lua")).unwrap();
    assert_eq!(
        patch["data"]["resource.customizations.health.agentry.dev_Agent"]
            .as_str()
            .expect("the health check key"),
        script,
        "argocd-cm-patch.yaml's script differs from agent-health.lua"
    );
}
