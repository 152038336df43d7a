//! The Helm chart: it lints and renders, its RBAC is exactly what is committed in
//! tests/fixtures/rbac-*.yaml, it is enough for the controller and no more. The controller runs
//! here impersonating the chart's ServiceAccount, so every API call it makes is checked against
//! the chart's Roles by the real apiserver.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use agentry::crd::Agent;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/agentry");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
/// Set to write the rendered RBAC into tests/fixtures/ after an intended change.
const UPDATE_ENV: &str = "AGENTRY_UPDATE_FIXTURES";

fn helm(args: &[&str]) -> String {
    let out = Command::new(tool_dir().join("helm"))
        .args(args)
        .output()
        .expect("running helm");
    assert!(
        out.status.success(),
        "helm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `--set` arguments for a mode: cluster-wide (None) or one watched namespace.
fn mode_args(watch: Option<&str>) -> Vec<String> {
    match watch {
        Some(ns) => vec!["--set".into(), format!("watchNamespaces={{{ns}}}")],
        None => vec![],
    }
}

/// `helm template` of the chart, as parsed manifests.
fn render(namespace: &str, watch: Option<&str>, extra: &[&str]) -> Vec<Value> {
    let mode = mode_args(watch);
    let mut args = vec!["template", "agentry", CHART, "--namespace", namespace];
    args.extend(mode.iter().map(String::as_str));
    args.extend(extra);
    let rendered = helm(&args);
    let docs: Vec<Value> = serde_saphyr::from_multiple(&rendered).unwrap();
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn strings(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn list(v: &[String]) -> String {
    format!(
        "[{}]",
        v.iter().map(|s| quoted(s)).collect::<Vec<_>>().join(", ")
    )
}

/// One rule as a canonical line: kind, name, namespace (namespaced kinds only), then the rule's
/// sorted apiGroups, resources, resourceNames (when any) and verbs. `entry` holds those keys, as a
/// fixture does, or the role's metadata merged with one of its rules, as rendered.
fn rule_line(entry: &Value) -> String {
    let mut line = format!(
        "{{kind: {}, name: {}",
        entry["kind"].as_str().unwrap_or_default(),
        quoted(entry["name"].as_str().unwrap_or_default())
    );
    if let Some(ns) = entry["namespace"].as_str() {
        line += &format!(", namespace: {}", quoted(ns));
    }
    line += &format!(
        ", apiGroups: {}, resources: {}",
        list(&strings(&entry["apiGroups"])),
        list(&strings(&entry["resources"]))
    );
    let names = strings(&entry["resourceNames"]);
    if !names.is_empty() {
        line += &format!(", resourceNames: {}", list(&names));
    }
    line += &format!(", verbs: {}}}", list(&strings(&entry["verbs"])));
    line
}

/// One binding as a canonical line: who gets which role where.
fn binding_line(entry: &Value) -> String {
    let mut line = format!(
        "{{kind: {}, name: {}",
        entry["kind"].as_str().unwrap_or_default(),
        quoted(entry["name"].as_str().unwrap_or_default())
    );
    if let Some(ns) = entry["namespace"].as_str() {
        line += &format!(", namespace: {}", quoted(ns));
    }
    line += &format!(
        ", roleRef: {}, subjects: {}}}",
        quoted(entry["roleRef"].as_str().unwrap_or_default()),
        list(&strings(&entry["subjects"]))
    );
    line
}

/// Every Role/ClusterRole rule and every binding of the rendered chart, as sorted canonical lines.
fn rbac_of(docs: &[Value]) -> (Vec<String>, Vec<String>) {
    let mut rules = Vec::new();
    let mut bindings = Vec::new();
    for doc in docs {
        let meta = &doc["metadata"];
        let mut entry = json!({"kind": kind(doc), "name": meta["name"]});
        if let Some(ns) = meta["namespace"].as_str() {
            entry["namespace"] = json!(ns);
        }
        match kind(doc) {
            "Role" | "ClusterRole" => {
                for rule in doc["rules"].as_array().into_iter().flatten() {
                    let mut e = entry.clone();
                    for k in ["apiGroups", "resources", "resourceNames", "verbs"] {
                        e[k] = rule[k].clone();
                    }
                    assert!(
                        rule.get("nonResourceURLs").is_none(),
                        "nonResourceURLs in {entry}"
                    );
                    rules.push(rule_line(&e));
                }
            }
            "RoleBinding" | "ClusterRoleBinding" => {
                let r = &doc["roleRef"];
                entry["roleRef"] = json!(format!(
                    "{}/{}",
                    r["kind"].as_str().unwrap_or_default(),
                    r["name"].as_str().unwrap_or_default()
                ));
                entry["subjects"] = doc["subjects"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        json!(format!(
                            "{} {}/{}",
                            s["kind"].as_str().unwrap_or_default(),
                            s["namespace"].as_str().unwrap_or_default(),
                            s["name"].as_str().unwrap_or_default()
                        ))
                    })
                    .collect();
                bindings.push(binding_line(&entry));
            }
            _ => {}
        }
    }
    rules.sort();
    bindings.sort();
    (rules, bindings)
}

fn fixture_text(title: &str, command: &str, rules: &[String], bindings: &[String]) -> String {
    let mut text = format!(
        "# The chart's RBAC, {title}: `{command}`.\n\
         # tests/chart.rs (rendered_rbac_equals_the_committed_expectation) compares every rendered\n\
         # rule and binding with this file. After an intended change, review the diff it prints, then:\n\
         #   {UPDATE_ENV}=1 cargo test --test chart rendered_rbac\n\
         rules:\n"
    );
    for r in rules {
        text += &format!("  - {r}\n");
    }
    text += "bindings:\n";
    for b in bindings {
        text += &format!("  - {b}\n");
    }
    text
}

/// Compares the rendered RBAC with a committed fixture (semantically: both are normalised to
/// canonical lines); prints a diff and how to update on a mismatch.
fn check_fixture(file: &str, title: &str, command: &str, docs: &[Value]) -> Result<(), String> {
    let (rules, bindings) = rbac_of(docs);
    let path = Path::new(FIXTURES).join(file);
    if std::env::var_os(UPDATE_ENV).is_some() {
        std::fs::create_dir_all(FIXTURES).unwrap();
        std::fs::write(&path, fixture_text(title, command, &rules, &bindings)).unwrap();
        eprintln!("wrote {}", path.display());
        return Ok(());
    }
    let committed =
        std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let fixture: Value = serde_saphyr::from_str(&committed)
        .map_err(|e| format!("parsing {}: {e}", path.display()))?;
    let lines = |key: &str, f: fn(&Value) -> String| -> Vec<String> {
        let mut v: Vec<String> = fixture[key]
            .as_array()
            .into_iter()
            .flatten()
            .map(f)
            .collect();
        v.sort();
        v
    };
    let expected_rules = lines("rules", rule_line);
    let expected_bindings = lines("bindings", binding_line);
    if expected_rules == rules && expected_bindings == bindings {
        return Ok(());
    }
    let mut diff = String::new();
    for (what, want, got) in [
        ("rules", &expected_rules, &rules),
        ("bindings", &expected_bindings, &bindings),
    ] {
        let want_set: BTreeSet<_> = want.iter().collect();
        let got_set: BTreeSet<_> = got.iter().collect();
        for l in want_set.difference(&got_set) {
            diff += &format!("- {what}: {l}\n");
        }
        for l in got_set.difference(&want_set) {
            diff += &format!("+ {what}: {l}\n");
        }
    }
    Err(format!(
        "the rendered RBAC ({title}) differs from {} (- committed, + rendered):\n{diff}\
         If the change is intended, update the fixture with\n  {UPDATE_ENV}=1 cargo test --test chart rendered_rbac\n\
         and commit it with the chart change.",
        path.display()
    ))
}

/// Every rule of every Role and ClusterRole, as (role kind/name, rule).
fn rules_of(docs: &[Value]) -> Vec<(String, Value)> {
    docs.iter()
        .filter(|d| matches!(kind(d), "Role" | "ClusterRole"))
        .flat_map(|d| {
            let who = format!("{}/{}", kind(d), d["metadata"]["name"].as_str().unwrap());
            d["rules"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |r| (who.clone(), r))
        })
        .collect()
}

fn assert_no_wildcards(docs: &[Value]) {
    for (who, rule) in rules_of(docs) {
        for k in ["apiGroups", "resources", "resourceNames", "verbs"] {
            assert!(
                !strings(&rule[k]).iter().any(|s| s.contains('*')),
                "wildcard in {who}: {rule}"
            );
        }
    }
}

/// The one documented cluster-wide permission of namespaced mode: read the watched Namespaces.
fn assert_namespaced_mode_has_only_the_namespace_reader(
    docs: &[Value],
    release_ns: &str,
    watched: &str,
) {
    let locations = format!("agentry-{release_ns}-backuplocations");
    let reader = format!("agentry-{release_ns}-namespaces");
    let reviewer = format!("agentry-{release_ns}-tokenreviews");
    let cluster_roles: Vec<&Value> = docs.iter().filter(|d| kind(d) == "ClusterRole").collect();
    let mut names: Vec<&str> = cluster_roles
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [locations.as_str(), reader.as_str(), reviewer.as_str()],
        "namespaced mode: the only ClusterRoles may be BackupLocations (read, status), the read-only namespaces one and TokenReview"
    );
    for role in &cluster_roles {
        let name = role["metadata"]["name"].as_str().unwrap();
        for rule in role["rules"].as_array().unwrap() {
            if name == locations {
                // Cluster-scoped, admin-written: read them, write their status, nothing else.
                assert_eq!(strings(&rule["apiGroups"]), ["agentry.dev"], "{rule}");
                let resources = strings(&rule["resources"]);
                let verbs = strings(&rule["verbs"]);
                assert!(
                    (resources == ["backuplocations"] && verbs == ["get", "list", "watch"])
                        || (resources == ["backuplocations/status"] && verbs == ["patch"]),
                    "{rule}"
                );
            } else if name == reader {
                assert_eq!(strings(&rule["apiGroups"]), [""], "{rule}");
                assert_eq!(strings(&rule["resources"]), ["namespaces"], "{rule}");
                assert_eq!(strings(&rule["resourceNames"]), [watched], "{rule}");
                assert_eq!(strings(&rule["verbs"]), ["get", "list", "watch"], "{rule}");
            } else {
                // CSR bootstrap asks the apiserver who a ServiceAccount token belongs to.
                assert_eq!(
                    strings(&rule["apiGroups"]),
                    ["authentication.k8s.io"],
                    "{rule}"
                );
                assert_eq!(strings(&rule["resources"]), ["tokenreviews"], "{rule}");
                assert_eq!(strings(&rule["verbs"]), ["create"], "{rule}");
                assert!(rule.get("resourceNames").is_none(), "{rule}");
            }
        }
    }
    let mut bindings: Vec<String> = docs
        .iter()
        .filter(|d| kind(d) == "ClusterRoleBinding")
        .map(|d| d["roleRef"]["name"].as_str().unwrap().to_string())
        .collect();
    bindings.sort();
    assert_eq!(
        bindings,
        [locations, reader, reviewer],
        "namespaced mode: ClusterRoleBindings"
    );
    for d in docs {
        if matches!(kind(d), "Role" | "RoleBinding") {
            let ns = d["metadata"]["namespace"].as_str().unwrap();
            assert!(
                ns == release_ns || ns == watched,
                "namespaced mode: {} in {ns}",
                kind(d)
            );
        }
    }
}

/// Renders the chart in each mode and compares its RBAC with tests/fixtures/rbac-*.yaml. Needs
/// helm only (no cluster).
#[test]
fn rendered_rbac_equals_the_committed_expectation() {
    helm(&["lint", CHART]);
    helm(&["lint", CHART, "--set", "watchNamespaces={team-a}"]);
    let cluster = render("agentry-system", None, &[]);
    let namespaced = render("agentry-system", Some("team-a"), &[]);
    assert_no_wildcards(&cluster);
    assert_no_wildcards(&namespaced);
    assert_namespaced_mode_has_only_the_namespace_reader(&namespaced, "agentry-system", "team-a");
    // Cluster-wide mode reads Namespaces, and only reads them.
    let ns_rules: Vec<(String, Value)> = rules_of(&cluster)
        .into_iter()
        .filter(|(_, r)| strings(&r["resources"]).contains(&"namespaces".to_string()))
        .collect();
    assert!(
        !ns_rules.is_empty(),
        "cluster-wide mode: no rule on namespaces"
    );
    for (who, r) in &ns_rules {
        assert_eq!(strings(&r["verbs"]), ["get", "list", "watch"], "{who}: {r}");
    }
    let results = [
        check_fixture(
            "rbac-cluster.yaml",
            "cluster-wide mode",
            "helm template agentry charts/agentry -n agentry-system",
            &cluster,
        ),
        check_fixture(
            "rbac-namespaced.yaml",
            "namespaced mode",
            "helm template agentry charts/agentry -n agentry-system --set watchNamespaces={team-a}",
            &namespaced,
        ),
    ];
    let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    assert!(errors.is_empty(), "{}", errors.join("\n\n"));
}

/// NOTES (printed after install) say what the mode can reach, and warn about cluster-wide mode.
#[test]
fn notes_say_what_each_mode_reaches() {
    let notes = |watch: Option<&str>| {
        let mode = mode_args(watch);
        let mut args = vec![
            "install",
            "agentry",
            CHART,
            "--namespace",
            "agentry-system",
            "--dry-run=client",
            // The dry run still checks the cluster for objects another owner holds.
            "--skip-crds",
            "--set",
            "admissionPolicy.enabled=false",
        ];
        args.extend(mode.iter().map(String::as_str));
        let out = helm(&args);
        out.split_once("NOTES:")
            .map(|(_, n)| n.to_string())
            .unwrap_or_else(|| panic!("no NOTES in `helm install --dry-run`:\n{out}"))
    };
    let cluster = notes(None);
    assert!(
        cluster.contains("WARNING: cluster-wide mode")
            && cluster.contains("every Secret in the cluster")
            && cluster.contains("watchNamespaces"),
        "cluster-wide NOTES must warn and point to watchNamespaces:\n{cluster}"
    );
    // What to do next: the controller, an Agent, why it is (not) Ready, the docs.
    for next in [
        "logs deployment/agentry",
        "kubectl apply -f - <<EOF",
        "describe agent hello",
        "docs/install.md",
    ] {
        assert!(cluster.contains(next), "NOTES without {next:?}:\n{cluster}");
    }
    let namespaced = notes(Some("team-a"));
    assert!(
        !namespaced.contains("WARNING") && namespaced.contains("Agents in team-a only"),
        "namespaced NOTES:\n{namespaced}"
    );
}

/// Deletes the test's cluster-scoped RBAC objects when dropped (namespaces take the rest).
struct ClusterScoped {
    objects: Vec<(kube::discovery::ApiResource, String)>,
}

impl Drop for ClusterScoped {
    fn drop(&mut self) {
        let objects = std::mem::take(&mut self.objects);
        // A client of its own, on a runtime of its own: the test's runtime is blocked here.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Runtime::new() else {
                return;
            };
            rt.block_on(async {
                let Ok(client) = Client::try_default().await else {
                    return;
                };
                for (ar, name) in objects {
                    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
                    let _ = api.delete(&name, &DeleteParams::background()).await;
                }
            });
        })
        .join();
    }
}

/// The controller as the chart runs it: its own namespace and one watched namespace (distinct
/// here, so the two Roles cannot stand in for each other), JSON logs, fast key and CA rotation.
struct Controller {
    child: Child,
    log: PathBuf,
    ops_port: u16,
    _dir: tempfile::TempDir,
}

impl Controller {
    fn start(kubeconfig: &Path, namespace: &str, watched: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ops_port = free_port();
        let log = dir.path().join("controller.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_agentry"))
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,agentry=debug")
            .args(["controller", "--namespace", namespace])
            .args(["--watch-namespace", watched])
            .args(["--replica", "replica-a", "--lease-duration", "4s"])
            .args(["--ops-addr", &format!("127.0.0.1:{ops_port}")])
            .args(["--api-addr", &format!("127.0.0.1:{}", common::free_port())])
            .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
            .args(["--log-format", "json"])
            .args(["--maintenance-interval", "1s"])
            .args(["--signing-key-rotation", "3s"])
            .args(["--ca-rotation-overlap", "1s"])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("starting the agentry binary");
        Self {
            child,
            log,
            ops_port,
            _dir: dir,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Log records (JSON lines) whose fields carry a refusal by the apiserver: reason Forbidden
    /// or HTTP status 403 in an error. Only the fields are looked at: timestamps and ids are not.
    fn forbidden(&self) -> Vec<String> {
        fn texts(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::String(s) => out.push(s.clone()),
                Value::Array(a) => a.iter().for_each(|x| texts(x, out)),
                Value::Object(o) => o.values().for_each(|x| texts(x, out)),
                _ => {}
            }
        }
        self.logs()
            .lines()
            .filter(|line| {
                let Ok(record) = serde_json::from_str::<Value>(line) else {
                    return false;
                };
                let mut fields = Vec::new();
                texts(&record["fields"], &mut fields);
                fields.iter().any(|f| {
                    let f = f.to_lowercase();
                    f.contains("forbidden") || f.contains("code: 403") || f.contains("\"code\":403")
                })
            })
            .map(str::to_string)
            .collect()
    }

    /// (reconciles, reconcile errors of every kind) from /metrics; None while it is not up.
    async fn reconcile_counts(&self) -> Option<(f64, f64)> {
        let body = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.ops_port))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let (mut ok, mut errors) = (0.0, 0.0);
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value: f64 = value.parse().unwrap_or(0.0);
            match series.split('{').next() {
                Some("agentry_reconcile_total") => ok += value,
                Some("agentry_reconcile_errors_total") => errors += value,
                _ => {}
            }
        }
        Some((ok, errors))
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status_code<T>(r: Result<T, kube::Error>) -> Option<u16> {
    match r {
        Ok(_) => Some(200),
        Err(kube::Error::Api(s)) => Some(s.code),
        Err(_) => None,
    }
}

/// Applies the rendered ServiceAccount and RBAC objects where they belong (server-side apply);
/// cluster-scoped ones are deleted when the returned guard drops.
async fn apply_rbac(client: &Client, docs: &[Value]) -> (Vec<String>, ClusterScoped) {
    let mut applied = Vec::new();
    let mut guard = ClusterScoped { objects: vec![] };
    for doc in docs {
        let kind = kind(doc).to_string();
        if ![
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "ClusterRole",
            "ClusterRoleBinding",
        ]
        .contains(&kind.as_str())
        {
            continue;
        }
        let obj: DynamicObject = serde_json::from_value(doc.clone()).unwrap();
        let api_version = &obj.types.as_ref().unwrap().api_version;
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = kube::api::GroupVersionKind::gvk(group, version, &kind);
        let (ar, _) = kube::discovery::pinned_kind(client, &gvk).await.unwrap();
        let name = obj.name_any();
        let api: Api<DynamicObject> = match obj.namespace() {
            Some(ns) => Api::namespaced_with(client.clone(), &ns, &ar),
            None => {
                guard.objects.push((ar.clone(), name.clone()));
                Api::all_with(client.clone(), &ar)
            }
        };
        api.patch(
            &name,
            &PatchParams::apply("agentry-e2e").force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap_or_else(|e| panic!("applying {kind} {name}: {e}"));
        applied.push(format!(
            "{kind} {}/{name}",
            obj.namespace().unwrap_or_default()
        ));
    }
    (applied, guard)
}

#[tokio::test]
async fn chart_rbac_is_sufficient_and_least_privilege() {
    // The release namespace and the watched one are distinct, so neither Role can stand in for
    // the other.
    let (client, home_ns) = setup("chart-rbac").await;
    let watched_ns = TestNamespace::new(&client, "chart-team").await;
    let (home, watched) = (home_ns.name.clone(), watched_ns.name.clone());
    let docs = render(
        &home,
        Some(&watched),
        &["--set", "admissionPolicy.enabled=false"],
    );
    assert_no_wildcards(&docs);
    assert_namespaced_mode_has_only_the_namespace_reader(&docs, &home, &watched);
    let (applied, _cluster_scoped) = apply_rbac(&client, &docs).await;
    let reader = format!("ClusterRole /agentry-{home}-namespaces");
    assert!(
        applied.contains(&format!("ServiceAccount {home}/agentry"))
            && applied.contains(&format!("Role {home}/agentry-self"))
            && applied.contains(&format!("Role {watched}/agentry-agents"))
            && applied.contains(&reader),
        "{applied:?}"
    );

    // The controller, as the chart's ServiceAccount.
    let sa = format!("system:serviceaccount:{home}:agentry");
    let groups = [
        "system:serviceaccounts",
        &format!("system:serviceaccounts:{home}"),
        "system:authenticated",
    ];
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = impersonating_kubeconfig(dir.path(), &sa, &groups);
    let controller = Controller::start(&kubeconfig, &home, &watched);
    create_agent(&client, &watched, agent_manifest("rbac", json!({})))
        .await
        .unwrap();
    let ready = |a: &Agent| condition(a, "Ready").is_some_and(|c| c.status == "True");
    let agent = wait_agent(
        &client,
        &watched,
        "rbac",
        Duration::from_secs(60),
        "Ready under the chart's RBAC",
        ready,
    )
    .await;
    assert!(
        condition(&agent, "CertificateIssued").is_some_and(|c| c.status == "True"),
        "{}",
        controller.logs()
    );

    // What the controller wrote, each through one of the chart's rules.
    let in_watched = |what: &str, found: bool| {
        assert!(found, "{what} missing in {watched}:\n{}", controller.logs())
    };
    let secrets_w: Api<Secret> = Api::namespaced(client.clone(), &watched);
    in_watched(
        "Secret rbac-identity",
        secrets_w.get_opt("rbac-identity").await.unwrap().is_some(),
    );
    in_watched(
        "Deployment rbac",
        Api::<Deployment>::namespaced(client.clone(), &watched)
            .get_opt("rbac")
            .await
            .unwrap()
            .is_some(),
    );
    in_watched(
        "Service rbac",
        Api::<Service>::namespaced(client.clone(), &watched)
            .get_opt("rbac")
            .await
            .unwrap()
            .is_some(),
    );
    in_watched(
        "ServiceAccount rbac",
        Api::<ServiceAccount>::namespaced(client.clone(), &watched)
            .get_opt("rbac")
            .await
            .unwrap()
            .is_some(),
    );
    in_watched(
        "discovery labels on the Agent",
        agent.labels().contains_key("agentry.dev/agent"),
    );
    in_watched("the cleanup finalizer", has_finalizer(&agent));
    let events: Api<Event> = Api::namespaced(client.clone(), &watched);
    let agent_events = || async {
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("rbac"))
            .count()
    };
    in_watched("an Event about the Agent", agent_events().await > 0);

    let lease = Api::<Lease>::namespaced(client.clone(), &home)
        .get("agentry-controller")
        .await
        .unwrap();
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("replica-a")
    );
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &home);
    for cm in ["agentry-ca", "agentry-jwks"] {
        assert!(
            configmaps.get_opt(cm).await.unwrap().is_some(),
            "ConfigMap {cm}"
        );
    }

    // Rotation rewrites the controller's own Secrets (update): the signing key every 3s, and the
    // CA once a rotation is requested (as `agentry ca rotate` does, with the admin's identity).
    let secrets_h: Api<Secret> = Api::namespaced(client.clone(), &home);
    let keys = || async {
        secrets_h
            .get("agentry-token-signing")
            .await
            .map(|s| s.data.map(|d| d.len()).unwrap_or(0))
            .unwrap_or(0)
    };
    eventually(Duration::from_secs(30), "a second signing key", || async {
        keys().await >= 2
    })
    .await;
    let ca_cert = |s: Secret| s.data.and_then(|d| d.get("tls.crt").cloned());
    let first_ca = ca_cert(secrets_h.get("agentry-ca").await.unwrap());
    agentry::identity::rotation::request(&client, &home, "agentry-ca")
        .await
        .unwrap();
    eventually_ok(
        Duration::from_secs(60),
        "the CA rotation to activate a new CA",
        || async {
            Ok::<bool, kube::Error>({
                let s = secrets_h.get("agentry-ca").await?;
                let requested = s
                    .annotations()
                    .contains_key(agentry::identity::rotation::ROTATE_ANNOTATION);
                !requested && ca_cert(s) != first_ca
            })
        },
    )
    .await;
    wait_agent(
        &client,
        &watched,
        "rbac",
        Duration::from_secs(60),
        "Ready again after the CA rotation",
        ready,
    )
    .await;

    // Persistent state: the Deployment goes (delete), a StatefulSet comes (create).
    let agents: Api<Agent> = Api::namespaced(client.clone(), &watched);
    let persistent = json!({"spec": {"state": {"persistent": true, "size": "1Gi"}}});
    agents
        .patch("rbac", &PatchParams::default(), &Patch::Merge(&persistent))
        .await
        .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &watched);
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &watched);
    eventually_ok(
        Duration::from_secs(60),
        "a StatefulSet to replace the Deployment",
        || async {
            Ok::<bool, kube::Error>({
                statefulsets.get_opt("rbac").await?.is_some()
                    && deployments.get_opt("rbac").await?.is_none()
            })
        },
    )
    .await;

    // Deletion: revocation, an Event, and the finalizer removed.
    agents
        .delete("rbac", &DeleteParams::default())
        .await
        .unwrap();
    eventually_ok(
        Duration::from_secs(30),
        "the Agent to be deleted",
        || async { Ok::<bool, kube::Error>(agents.get_opt("rbac").await?.is_none()) },
    )
    .await;

    // No call was refused: none of the reconciles failed, and no log record carries a 403.
    let (reconciles, errors) = controller
        .reconcile_counts()
        .await
        .expect("the controller's /metrics endpoint");
    assert!(reconciles > 0.0, "no reconcile counted");
    assert_eq!(
        errors,
        0.0,
        "reconcile errors under the chart's RBAC:\n{}",
        controller.logs()
    );
    let forbidden = controller.forbidden();
    assert!(
        forbidden.is_empty(),
        "calls refused under the chart's RBAC:\n{}",
        forbidden.join("\n")
    );

    // ... and no more. The same identity, directly.
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let limited = Client::try_from(config).unwrap();
    let secrets = |ns: &str| Api::<Secret>::namespaced(limited.clone(), ns);
    let mut refused = vec![
        (
            "list Secrets in kube-system",
            status_code(secrets("kube-system").list(&Default::default()).await),
        ),
        (
            "list Secrets cluster-wide",
            status_code(
                Api::<Secret>::all(limited.clone())
                    .list(&Default::default())
                    .await,
            ),
        ),
        (
            "get a Secret in default",
            status_code(secrets("default").get("anything").await),
        ),
        // In its own namespace it may create Secrets, but read only the two it owns, by name: a
        // 404 here would mean the read was allowed.
        (
            "get another Secret in its own namespace",
            status_code(secrets(&home).get("not-ours").await),
        ),
        (
            "update another Secret in its own namespace",
            status_code(
                secrets(&home)
                    .replace("not-ours", &PostParams::default(), &Secret::default())
                    .await,
            ),
        ),
        (
            "apply another ConfigMap in its own namespace",
            status_code(
                Api::<ConfigMap>::namespaced(limited.clone(), &home)
                    .patch(
                        "not-ours",
                        &PatchParams::apply("agentry-e2e"),
                        &Patch::Apply(&json!({"apiVersion": "v1", "kind": "ConfigMap"})),
                    )
                    .await,
            ),
        ),
        (
            "list Agents in its own namespace",
            status_code(
                Api::<Agent>::namespaced(limited.clone(), &home)
                    .list(&Default::default())
                    .await,
            ),
        ),
        (
            "list Deployments in default",
            status_code(
                Api::<Deployment>::namespaced(limited.clone(), "default")
                    .list(&Default::default())
                    .await,
            ),
        ),
    ];
    // Namespaces: the watched one only, read-only.
    let namespaces: Api<Namespace> = Api::all(limited.clone());
    let by_name = ListParams::default().fields(&format!("metadata.name={watched}"));
    refused.push((
        "list every Namespace",
        status_code(namespaces.list(&Default::default()).await),
    ));
    refused.push((
        "get Namespace kube-system",
        status_code(namespaces.get("kube-system").await),
    ));
    refused.push((
        "label the watched Namespace",
        status_code(
            namespaces
                .patch(
                    &watched,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"metadata": {"labels": {"x": "y"}}})),
                )
                .await,
        ),
    ));
    let not_refused: Vec<String> = refused
        .iter()
        .filter(|(_, code)| *code != Some(403))
        .map(|(what, code)| format!("{what}: {code:?}, want 403"))
        .collect();
    assert!(not_refused.is_empty(), "{}", not_refused.join("\n"));
    assert_eq!(status_code(namespaces.get(&watched).await), Some(200));
    assert_eq!(status_code(namespaces.list(&by_name).await), Some(200));
    let watch_by_name = kube::api::WatchParams::default()
        .fields(&format!("metadata.name={watched}"))
        .timeout(5);
    let mut watch = namespaces
        .watch(&watch_by_name, "0")
        .await
        .expect("watching the watched Namespace by name")
        .boxed();
    assert!(
        matches!(
            tokio::time::timeout(Duration::from_secs(10), watch.next()).await,
            Ok(Some(Ok(_)))
        ),
        "no event from the Namespace watch"
    );
    let watch_all = kube::api::WatchParams::default().timeout(5);
    assert_eq!(
        status_code(namespaces.watch(&watch_all, "0").await.map(|_| ())),
        Some(403),
        "watch every Namespace"
    );
}

/// `helm template` that must fail: its stderr.
fn helm_refuses(args: &[&str]) -> String {
    let out = Command::new(tool_dir().join("helm"))
        .args(args)
        .output()
        .expect("running helm");
    assert!(
        !out.status.success(),
        "helm {args:?} accepted what it should refuse"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Bad values and what helm's schema error must say about them (the field's path).
fn bad_values() -> &'static [(&'static [&'static str], &'static str)] {
    &[
        (
            &["--set", "logFormat=xml"],
            "at '/logFormat': value must be one of 'json', 'text'",
        ),
        (&["--set", "replicas=0"], "at '/replicas'"),
        (
            &["--set", "watchNamespaces={a,b}"],
            "at '/watchNamespaces': maxItems",
        ),
        (
            &["--set", "watchNamespaces={Team_A}"],
            "at '/watchNamespaces/0'",
        ),
        (
            &["--set", "replica=2"],
            "additional properties 'replica' not allowed",
        ),
        (
            &["--set", "api.prot=8443"],
            "additional properties 'prot' not allowed",
        ),
        (&["--set-string", "leaseDuration=15"], "at '/leaseDuration'"),
        (
            &["--set", "identity.signingKeyRotation=30d"],
            "at '/identity/signingKeyRotation'",
        ),
        (&["--set", "persistence.size=1GB"], "at '/persistence/size'"),
        (
            &["--set", "api.service.type=External"],
            "at '/api/service/type'",
        ),
        (&["--set", "api.port=70000"], "at '/api/port'"),
        (
            &["--set", "image.pullPolicy=Sometimes"],
            "at '/image/pullPolicy'",
        ),
        (
            &["--set", "messaging.redisURL=localhost:6379"],
            "at '/messaging/redisURL'",
        ),
        (&["--set", "concurrency=many"], "at '/concurrency'"),
        (
            &["--set", "serviceMonitor.labels.release=1"],
            "at '/serviceMonitor/labels/release'",
        ),
        (
            &["--set", "litestream.syncInterval=often"],
            "at '/litestream/syncInterval'",
        ),
        (
            &["--set", "litestream.enabled=true"],
            "at '/litestream/bucket'",
        ),
    ]
}

/// The chart lints clean (--strict: warnings fail too) in each shape, and values.schema.json
/// refuses bad values before anything renders, naming the field: types, enums, patterns
/// (durations, quantities, URLs), bounds, and a typo'd key anywhere. Needs helm only.
#[test]
fn chart_lints_and_its_schema_names_the_bad_field() {
    for extra in [
        &[][..],
        &["--set", "watchNamespaces={team-a}"],
        &["--set", "replicas=2"],
        &[
            "--set",
            "networkPolicy.enabled=true,serviceMonitor.enabled=true,api.enabled=false",
        ],
    ] {
        let mut args = vec!["lint", "--strict", CHART];
        args.extend(extra);
        helm(&args);
    }
    let cases = bad_values();
    let mut wrong = Vec::new();
    for (set, field) in cases {
        let mut args = vec!["template", "agentry", CHART];
        args.extend(*set);
        let err = helm_refuses(&args);
        if !(err.contains("don't meet the specifications of the schema") && err.contains(field)) {
            wrong.push(format!("{set:?}: want {field:?} in:\n{err}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // What the schema lets through renders.
    render(
        "agentry-system",
        None,
        &[
            "--set",
            "leaseDuration=1m30s,persistence.size=10Gi,messaging.redisURL=rediss://redis:6380",
            "--set",
            "messaging.passwordSecret.name=redis,messaging.bodyLimit=1Mi",
            "--set",
            "litestream.enabled=true,litestream.bucket=ledger,litestream.credentialsSecret.name=s3",
            "--set-string",
            "grafanaDashboard.labels.grafana_dashboard=1",
        ],
    );
}

/// Two releases in two namespaces (the same release name, as `helm install agentry` twice
/// would) share no cluster-scoped object, and every object carries the release's labels (what
/// `helm uninstall` leaves can be listed by them). Needs helm only.
#[test]
fn two_releases_share_no_cluster_scoped_name() {
    let everything = [
        "--set",
        "networkPolicy.enabled=true,serviceMonitor.enabled=true",
    ];
    for (a_watch, b_watch) in [(None, None), (Some("team-a"), Some("team-b"))] {
        let a = render("team-a-agentry", a_watch, &everything);
        let b = render("team-b-agentry", b_watch, &everything);
        let cluster_scoped = |docs: &[Value]| -> BTreeSet<String> {
            docs.iter()
                .filter(|d| d["metadata"]["namespace"].is_null())
                .map(|d| format!("{} {}", kind(d), d["metadata"]["name"].as_str().unwrap()))
                .collect()
        };
        let (in_a, in_b) = (cluster_scoped(&a), cluster_scoped(&b));
        assert!(
            in_a.iter()
                .any(|k| k.starts_with("ValidatingAdmissionPolicy "))
                && in_a.iter().any(|k| k.starts_with("ClusterRole ")),
            "{in_a:?}"
        );
        let shared: Vec<_> = in_a.intersection(&in_b).collect();
        assert!(shared.is_empty(), "both releases would own {shared:?}");
        for doc in &a {
            let labels = &doc["metadata"]["labels"];
            assert!(
                labels["app.kubernetes.io/instance"] == "agentry"
                    && labels["app.kubernetes.io/managed-by"] == "Helm",
                "{} {} lacks the release labels",
                kind(doc),
                doc["metadata"]["name"]
            );
        }
    }
}

/// The PodDisruptionBudget never blocks a drain of the leader's node (values.yaml explains
/// each case): with the API on only the leader is Ready, so the budget must allow every pod to
/// go; without it every replica is Ready and one must stay. Needs helm only.
#[test]
fn disruption_budget_fits_leader_election() {
    let pdb = |extra: &[&str]| -> Value {
        let docs = render("agentry-system", None, extra);
        let found = docs.into_iter().find(|d| kind(d) == "PodDisruptionBudget");
        found.expect("a PodDisruptionBudget")["spec"].clone()
    };
    for (extra, key, value) in [
        (&[][..], "maxUnavailable", 1),
        (&["--set", "replicas=3"], "maxUnavailable", 3),
        (
            &["--set", "replicas=3,api.enabled=false"],
            "minAvailable",
            1,
        ),
        (&["--set", "api.enabled=false"], "maxUnavailable", 1),
    ] {
        let spec = pdb(extra);
        assert_eq!(spec[key], value, "{extra:?}: {spec}");
        assert_eq!(spec["unhealthyPodEvictionPolicy"], "AlwaysAllow", "{spec}");
    }
    let docs = render(
        "agentry-system",
        None,
        &["--set", "podDisruptionBudget.enabled=false"],
    );
    assert!(!docs.iter().any(|d| kind(d) == "PodDisruptionBudget"));
}

/// Runs a tool from hack/'s bin dir (kubectl, helm) against the local cluster, `stdin` fed in;
/// (success, stdout, stderr).
fn tool(name: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(tool_dir().join(name))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {name}: {e}"));
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every object `helm template` renders, checked by the local apiserver (`kubectl apply
/// --dry-run=server --validate=strict`: schemas, unknown fields, admission) in the shapes people
/// install: defaults, one watched namespace, HA, and with the NetworkPolicy. The
/// ServiceMonitor, Grafana dashboard and PrometheusRule stay off: their CRDs (Prometheus
/// Operator) are not on this cluster.
#[tokio::test]
async fn rendered_manifests_pass_server_side_dry_run() {
    let (client, home) = setup("chart-dry").await;
    let watched = TestNamespace::new(&client, "chart-dry-team").await;
    let watch = format!("watchNamespaces={{{}}}", watched.name);
    let peers = "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.team=monitoring";
    let shapes: [(&str, Vec<&str>); 4] = [
        ("defaults", vec![]),
        ("namespaced", vec!["--set", &watch]),
        ("HA", vec!["--set", "replicas=2"]),
        (
            "network policy",
            vec!["--set", "networkPolicy.enabled=true", "--set", peers],
        ),
    ];
    for (shape, extra) in shapes {
        let mut args = vec!["template", "agentry", CHART, "--namespace", &home.name];
        args.extend(&extra);
        let rendered = helm(&args);
        let objects = serde_saphyr::from_multiple::<Value>(&rendered)
            .unwrap()
            .into_iter()
            .filter(|d| !d.is_null())
            .count();
        let (ok, out, err) = tool(
            "kubectl",
            &["apply", "--dry-run=server", "--validate=strict", "-f", "-"],
            Some(&rendered),
        );
        assert!(
            ok,
            "{shape}: the apiserver refused the chart:\n{err}\n{out}"
        );
        assert_eq!(
            out.matches("(server dry run)").count(),
            objects,
            "{shape}: every rendered object checked:\n{out}"
        );
    }
}

/// A kubeconfig for the current cluster that authenticates with `token` alone.
fn token_kubeconfig(dir: &Path, token: &str) -> PathBuf {
    let path = std::env::var("KUBECONFIG").expect("KUBECONFIG");
    let config = kube::config::Kubeconfig::read_from(&path).unwrap();
    let mut config = serde_json::to_value(&config).unwrap();
    for user in config["users"].as_array_mut().unwrap() {
        user["user"] = json!({"token": token});
    }
    let out = dir.join("token.kubeconfig");
    std::fs::write(&out, config.to_string()).unwrap();
    out
}

/// A PersistentVolume bound in advance to the release's agentry-data claim (the local cluster
/// has no provisioner), deleted when the guard drops.
async fn volume_for(client: &Client, namespace: &str) -> ClusterScoped {
    use k8s_openapi::api::core::v1::PersistentVolume;
    let name = format!("{namespace}-data");
    let pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "claimRef": {"namespace": namespace, "name": "agentry-data"},
            "hostPath": {"path": format!("/tmp/{name}")}
        }
    }))
    .unwrap();
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &pv)
        .await
        .unwrap();
    let ar = kube::discovery::ApiResource::erase::<PersistentVolume>(&());
    ClusterScoped {
        objects: vec![(ar, name)],
    }
}

/// The Agent of the install notes' step 2 (the heredoc), as printed.
fn notes_agent(notes: &str) -> String {
    let (_, rest) = notes
        .split_once("kubectl apply -f - <<EOF\n")
        .unwrap_or_else(|| panic!("no Agent to apply in the NOTES:\n{notes}"));
    let (manifest, _) = rest.split_once("\n  EOF").unwrap();
    manifest
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// (kind, name) of every object of the given kinds in a namespace (or cluster-wide, `None`),
/// optionally selected by label.
fn listed(kinds: &str, namespace: Option<&str>, selector: Option<&str>) -> BTreeSet<String> {
    let mut args = vec!["get", kinds, "-o", "name"];
    if let Some(ns) = namespace {
        args.extend(["-n", ns]);
    }
    if let Some(s) = selector {
        args.extend(["-l", s]);
    }
    let (ok, out, err) = tool("kubectl", &args, None);
    assert!(ok, "kubectl {args:?}: {err}");
    out.lines().map(str::to_string).collect()
}

/// What the chart names in the release namespace, and the kinds to look for leftovers of.
const RELEASE_KINDS: &str = "deployments,replicasets,pods,services,serviceaccounts,roles,rolebindings,\
     poddisruptionbudgets,networkpolicies,persistentvolumeclaims,secrets,configmaps,leases";
const CLUSTER_KINDS: &str = "clusterroles,clusterrolebindings,validatingadmissionpolicies,\
     validatingadmissionpolicybindings";

/// `helm install` into the local control plane, the way docs/install.md says, with one watched
/// namespace; then the controller reconciles the notes' Agent to Ready; `helm upgrade` changes
/// the Deployment; `helm uninstall` leaves only what docs/install.md says stays.
///
/// The Deployment's pod does not really run here (kwok marks it Running), so the controller
/// binary runs as a local process authenticated with a token of the chart's ServiceAccount
/// (`kubectl create token`, the TokenRequest API): every call it makes is authorised by the
/// installed release's RBAC, as in the pod.
#[tokio::test]
async fn helm_install_upgrade_uninstall() {
    let (client, home) = setup("chart-e2e").await;
    let watched = TestNamespace::new(&client, "chart-e2e-team").await;
    let (ns, team) = (home.name.as_str(), watched.name.as_str());
    let release = format!("agentry-{}", ns.rsplit('-').next().unwrap());
    let _volume = volume_for(&client, ns).await;
    let notes = install_and_check(&client, &release, ns, team).await;

    // The controller, as the chart's ServiceAccount, and the Agent of the notes.
    let (ok, token, err) = tool(
        "kubectl",
        &["create", "token", "agentry", "-n", ns, "--duration", "1h"],
        None,
    );
    assert!(ok, "kubectl create token: {err}");
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = token_kubeconfig(dir.path(), token.trim());
    let controller = Controller::start(&kubeconfig, ns, team);
    let (ok, out, err) = tool("kubectl", &["apply", "-f", "-"], Some(&notes_agent(&notes)));
    assert!(ok, "applying the notes' Agent: {err}\n{out}");
    let ready = |a: &Agent| condition(a, "Ready").is_some_and(|c| c.status == "True");
    wait_agent(
        &client,
        team,
        "hello",
        Duration::from_secs(60),
        "Ready under the installed release",
        ready,
    )
    .await;
    let (ok, described, _) = tool("kubectl", &["-n", team, "describe", "agent", "hello"], None);
    assert!(ok && described.contains("CertificateIssued"), "{described}");

    upgrade_changes_the_deployment(&client, &release, ns).await;

    // Uninstall as docs/install.md says: Agents first (their finalizers need the controller).
    let (ok, _, err) = tool(
        "kubectl",
        &[
            "delete",
            "agents",
            "--all",
            "-n",
            team,
            "--wait",
            "--timeout=60s",
        ],
        None,
    );
    assert!(ok, "deleting the Agent: {err}\n{}", controller.logs());
    let forbidden = controller.forbidden();
    assert!(
        forbidden.is_empty(),
        "refused under the release's RBAC:\n{}",
        forbidden.join("\n")
    );
    drop(controller);
    let (ok, out, err) = tool("helm", &["uninstall", &release, "-n", ns, "--wait"], None);
    assert!(ok, "helm uninstall: {err}\n{out}");
    uninstall_leaves_what_is_documented(&release, ns, team);
    let pvcs: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(client.clone(), ns);
    pvcs.delete("agentry-data", &DeleteParams::default())
        .await
        .unwrap();
}

/// `helm install --wait` of one watched namespace: the chart's objects are there, labelled with
/// the release, and the disruption controller lets a drain take the single replica. The notes.
async fn install_and_check(client: &Client, release: &str, ns: &str, team: &str) -> String {
    let watch = format!("watchNamespaces={{{team}}}");
    let (ok, notes, err) = tool(
        "helm",
        &[
            "install",
            release,
            CHART,
            "-n",
            ns,
            "--set",
            &watch,
            "--wait",
            "--timeout",
            "2m",
        ],
        None,
    );
    assert!(ok, "helm install: {err}\n{notes}");
    let chart_objects = listed(
        RELEASE_KINDS,
        Some(ns),
        Some(&format!("app.kubernetes.io/instance={release}")),
    );
    for expected in [
        "deployment.apps/agentry",
        "service/agentry-api",
        "service/agentry-metrics",
        "serviceaccount/agentry",
        "role.rbac.authorization.k8s.io/agentry-self",
        "poddisruptionbudget.policy/agentry",
        "persistentvolumeclaim/agentry-data",
    ] {
        assert!(
            chart_objects.contains(expected),
            "{expected} missing: {chart_objects:?}"
        );
    }
    let cluster_objects = listed(
        CLUSTER_KINDS,
        None,
        Some(&format!("app.kubernetes.io/instance={release}")),
    );
    assert!(
        cluster_objects
            .iter()
            .any(|o| o.ends_with(&format!("/agentry-{ns}-agent-pod-memory"))),
        "{cluster_objects:?}"
    );
    // The single replica may be evicted by a drain: the disruption controller agrees.
    let pdbs: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        ns,
        &kube::discovery::ApiResource::erase::<k8s_openapi::api::policy::v1::PodDisruptionBudget>(
            &(),
        ),
    );
    eventually_ok(
        Duration::from_secs(30),
        "the PodDisruptionBudget to allow a disruption",
        || async {
            Ok::<bool, kube::Error>(
                pdbs.get("agentry").await?.data["status"]["disruptionsAllowed"] == 1,
            )
        },
    )
    .await;
    notes
}

/// `helm upgrade --reuse-values` with another concurrency: the Deployment's args follow.
async fn upgrade_changes_the_deployment(client: &Client, release: &str, ns: &str) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let before = deployments.get("agentry").await.unwrap();
    // Helm leaves CRDs alone on upgrade: docs/install.md applies them first. A dry run here:
    // other tests share the cluster's CRDs (the command is checked, the CRDs stay as they are).
    let crds = format!("{CHART}/crds/");
    let (ok, out, err) = tool(
        "kubectl",
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--dry-run=server",
            "-f",
            &crds,
        ],
        None,
    );
    assert!(ok, "applying the chart's CRDs: {err}\n{out}");
    let (ok, out, err) = tool(
        "helm",
        &[
            "upgrade",
            release,
            CHART,
            "-n",
            ns,
            "--reuse-values",
            "--set",
            "concurrency=7",
            "--wait",
            "--timeout",
            "2m",
        ],
        None,
    );
    assert!(ok, "helm upgrade: {err}\n{out}");
    let after = deployments.get("agentry").await.unwrap();
    let args = |d: &Deployment| {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .args
            .clone()
            .unwrap_or_default()
    };
    assert!(
        args(&before).contains(&"--concurrency=32".to_string()),
        "{:?}",
        args(&before)
    );
    assert!(
        args(&after).contains(&"--concurrency=7".to_string()),
        "{:?}",
        args(&after)
    );
    assert!(after.metadata.generation > before.metadata.generation);
    // --reuse-values kept the mode.
    assert!(
        args(&after)
            .iter()
            .any(|a| a.starts_with("--watch-namespace=")),
        "{:?}",
        args(&after)
    );
}

/// After `helm uninstall`: no cluster-scoped object of the release; in the release namespace
/// only the kept volume and what the controller created at run time (the CA and signing-key
/// Secrets, the trust bundle and JWKS ConfigMaps, its Lease); nothing of the release in the
/// watched namespace.
fn uninstall_leaves_what_is_documented(release: &str, ns: &str, team: &str) {
    let selector = format!("app.kubernetes.io/instance={release}");
    let cluster = listed(CLUSTER_KINDS, None, Some(&selector));
    assert!(cluster.is_empty(), "left cluster-wide: {cluster:?}");
    let by_name = listed(CLUSTER_KINDS, None, None);
    let ours: Vec<_> = by_name
        .iter()
        .filter(|o| o.contains(&format!("agentry-{ns}")))
        .collect();
    assert!(ours.is_empty(), "left cluster-wide: {ours:?}");
    let labelled = listed(RELEASE_KINDS, Some(ns), Some(&selector));
    assert_eq!(
        labelled,
        BTreeSet::from(["persistentvolumeclaim/agentry-data".to_string()]),
        "the release's objects left in {ns}"
    );
    let left: BTreeSet<String> = listed(RELEASE_KINDS, Some(ns), None);
    let documented: BTreeSet<String> = [
        "persistentvolumeclaim/agentry-data",
        "secret/agentry-ca",
        "secret/agentry-token-signing",
        "configmap/agentry-ca",
        "configmap/agentry-jwks",
        "lease.coordination.k8s.io/agentry-controller",
        // Kubernetes' own, in every namespace.
        "configmap/kube-root-ca.crt",
        "serviceaccount/default",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(left, documented, "left in the release namespace {ns}");
    let in_team = listed("roles,rolebindings", Some(team), None);
    assert!(in_team.is_empty(), "left in {team}: {in_team:?}");
}
