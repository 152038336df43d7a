//! The examples under examples/ are real: every Kubernetes object in them is validated by the
//! apiserver with a server-side dry-run (the project's CRDs and admission policy installed
//! first), the GitOps base and overlays render with `kubectl kustomize` and their output passes
//! the same dry-run and does what the overlays say, and `examples/agents/full.yaml` sets every
//! field of the Agent CRD's spec. Argo CD and Flux objects are checked structurally (their CRDs
//! are not installed here): the fields those controllers require, parsed with serde, and the
//! paths and source they point at.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::discovery::{ApiCapabilities, Scope, pinned_kind};
use kube::{Api, Client, CustomResourceExt};
use serde::Deserialize;
use serde_json::Value;

use agentry::crd::Agent;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
/// YAML under examples/ that is no Kubernetes object, and what checks it instead.
const NOT_OBJECTS: [(&str, &str); 1] = [(
    "gitops/argocd/health_test.yaml",
    "Argo CD health-check cases: tests/kstatus.rs",
)];
/// Kinds the apiserver here does not serve, checked structurally below (group, kind).
const STRUCTURAL: [(&str, &str); 4] = [
    ("argoproj.io", "Application"),
    ("source.toolkit.fluxcd.io", "GitRepository"),
    ("kustomize.toolkit.fluxcd.io", "Kustomization"),
    // kustomize's own file: rendered by `kubectl kustomize` below.
    ("kustomize.config.k8s.io", "Kustomization"),
];
const OVERLAYS: [&str; 3] = ["gitops/base", "gitops/overlays/dev", "gitops/overlays/prod"];

/// Every .yaml/.yml file under examples/, relative to it, sorted.
fn yaml_files() -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(Path::new(EXAMPLES), &mut files);
    let mut rel: Vec<String> = files
        .iter()
        .map(|p| {
            p.strip_prefix(EXAMPLES)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    rel.sort();
    rel
}

fn parse_docs(text: &str, what: &str) -> Vec<Value> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("{what}: not valid YAML: {e}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn read_docs(rel: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(Path::new(EXAMPLES).join(rel)).unwrap();
    parse_docs(&text, &format!("examples/{rel}"))
}

/// (group, version, kind) of an object; None when it has no apiVersion/kind.
fn gvk_of(doc: &Value) -> Option<GroupVersionKind> {
    let api_version = doc.get("apiVersion")?.as_str()?;
    let kind = doc.get("kind")?.as_str()?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    Some(GroupVersionKind::gvk(group, version, kind))
}

/// `kubectl kustomize` of a directory under examples/, as objects.
fn kustomize(rel: &str) -> Vec<Value> {
    let out = Command::new(tool_dir().join("kubectl"))
        .args(["kustomize", &format!("{EXAMPLES}/{rel}")])
        .output()
        .expect("running kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize examples/{rel}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_docs(
        &String::from_utf8(out.stdout).unwrap(),
        &format!("kustomize {rel}"),
    )
}

/// The apiserver's verdict on one object: a server-side apply with dry-run. Namespaced objects
/// go into the test's namespace (the examples' own namespaces need not exist); nothing is
/// stored. Err names the object and what the apiserver said.
async fn dry_run(
    client: &Client,
    ns: &str,
    what: &str,
    doc: &Value,
    resolved: &(ApiResource, ApiCapabilities),
) -> Result<(), String> {
    let (ar, caps) = resolved;
    let mut obj: DynamicObject = serde_json::from_value(doc.clone())
        .map_err(|e| format!("{what}: not a Kubernetes object: {e}"))?;
    let name = obj
        .metadata
        .name
        .clone()
        .ok_or_else(|| format!("{what}: metadata.name is missing"))?;
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => {
            obj.metadata.namespace = Some(ns.to_string());
            Api::namespaced_with(client.clone(), ns, ar)
        }
        Scope::Cluster => Api::all_with(client.clone(), ar),
    };
    let params = PatchParams::apply("agentry-examples").force().dry_run();
    api.patch(&name, &params, &Patch::Apply(&obj))
        .await
        .map(|_| ())
        .map_err(|e| format!("{what}: {} {name}: the apiserver refused it: {e}", ar.kind))
}

/// Dry-runs every object of `docs`; the kinds it could not resolve go to `unserved`.
async fn dry_run_all(
    client: &Client,
    ns: &str,
    what: &str,
    docs: &[Value],
    unserved: &mut Vec<(String, Value)>,
    failures: &mut Vec<String>,
) -> usize {
    let mut checked = 0;
    for doc in docs {
        let Some(gvk) = gvk_of(doc) else {
            failures.push(format!("{what}: a document without apiVersion/kind"));
            continue;
        };
        match pinned_kind(client, &gvk).await {
            Ok(resolved) => {
                checked += 1;
                if let Err(e) = dry_run(client, ns, what, doc, &resolved).await {
                    failures.push(e);
                }
            }
            Err(_) => unserved.push((what.to_string(), doc.clone())),
        }
    }
    checked
}

#[tokio::test]
async fn every_example_object_passes_a_server_side_dry_run() {
    let (client, ns) = setup("examples").await;
    let (mut failures, mut unserved) = (Vec::new(), Vec::new());
    let mut checked = 0;
    for rel in yaml_files() {
        if rel.starts_with("python/") {
            continue;
        }
        if NOT_OBJECTS.iter().any(|(p, _)| *p == rel) {
            continue;
        }
        let what = format!("examples/{rel}");
        checked += dry_run_all(
            &client,
            &ns.name,
            &what,
            &read_docs(&rel),
            &mut unserved,
            &mut failures,
        )
        .await;
    }
    for (what, doc) in &unserved {
        let gvk = gvk_of(doc).unwrap();
        if !STRUCTURAL.contains(&(gvk.group.as_str(), gvk.kind.as_str())) {
            failures.push(format!(
                "{what}: {}/{} {} is not served by the apiserver and has no structural check: \
                 add one to tests/examples.rs (STRUCTURAL) or install its CRD",
                gvk.group, gvk.version, gvk.kind
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The Agents, BackupLocation, AgentBackup, AgentRestore, Namespace, ConfigMap, testdata.
    assert!(checked >= 15, "only {checked} objects were dry-run");
    // A refused object is reported: the check can fail.
    let mut bad = read_docs("agents/minimal.yaml").remove(0);
    bad["spec"]["resources"] = serde_json::json!({"memory": "1Gi"});
    let resolved = pinned_kind(&client, &gvk_of(&bad).unwrap()).await.unwrap();
    let err = dry_run(&client, &ns.name, "bad", &bad, &resolved)
        .await
        .expect_err("a 1Gi Agent must be refused");
    assert!(err.contains("512Mi"), "{err}");
}

/// The backup examples: a BackupLocation, an on-demand AgentBackup and an AgentRestore, each
/// of the current schema.
#[test]
fn backup_examples_are_present_and_current() {
    let kinds: BTreeSet<String> = [
        "backup/location.yaml",
        "backup/backup-now.yaml",
        "backup/restore.yaml",
    ]
    .iter()
    .flat_map(|f| read_docs(f))
    .map(|d| d["kind"].as_str().unwrap().to_string())
    .collect();
    let want: BTreeSet<String> = ["BackupLocation", "AgentBackup", "AgentRestore"]
        .map(String::from)
        .into();
    assert_eq!(kinds, want);
    // Current: each parses as the controller's own types (unknown fields would be dropped by
    // the apiserver's pruning; serde here refuses missing required ones).
    let location = &read_docs("backup/location.yaml")[0];
    serde_json::from_value::<agentry::crd::BackupLocation>(location.clone())
        .expect("examples/backup/location.yaml is a BackupLocation of the current schema");
    serde_json::from_value::<agentry::crd::AgentBackup>(
        read_docs("backup/backup-now.yaml").remove(0),
    )
    .expect("examples/backup/backup-now.yaml is an AgentBackup of the current schema");
    serde_json::from_value::<agentry::crd::AgentRestore>(
        read_docs("backup/restore.yaml").remove(0),
    )
    .expect("examples/backup/restore.yaml is an AgentRestore of the current schema");
}

/// Agents by name in rendered objects, and the Namespace objects' names.
fn agents_of(docs: &[Value]) -> BTreeMap<String, Value> {
    docs.iter()
        .filter(|d| d["kind"] == "Agent")
        .map(|d| {
            (
                d["metadata"]["name"].as_str().unwrap().to_string(),
                d.clone(),
            )
        })
        .collect()
}

/// Every Agent's permissions are allowed by its namespace's annotation (else it would be
/// Stalled with PermissionDenied), and every Agent is in the Namespace the docs create.
fn check_namespaces(what: &str, docs: &[Value]) {
    let namespaces: BTreeMap<&str, &str> = docs
        .iter()
        .filter(|d| d["kind"] == "Namespace")
        .map(|d| {
            let allowed = d["metadata"]["annotations"]["agentry.dev/allowed-permissions"]
                .as_str()
                .unwrap_or("backup:write, memory:read");
            (d["metadata"]["name"].as_str().unwrap(), allowed)
        })
        .collect();
    for (name, agent) in agents_of(docs) {
        let ns = agent["metadata"]["namespace"].as_str().unwrap_or_default();
        let allowed = namespaces.get(ns).unwrap_or_else(|| {
            panic!("{what}: Agent {name} is in {ns:?}, which {what} does not create")
        });
        let allowed: BTreeSet<&str> = allowed.split(',').map(str::trim).collect();
        for p in agent["spec"]["permissions"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let p = p.as_str().unwrap();
            assert!(
                allowed.contains(p) || allowed.contains("*"),
                "{what}: Agent {name} asks for {p}, which namespace {ns} does not allow"
            );
        }
    }
}

fn memory(agent: &Value) -> &str {
    agent["spec"]["resources"]["memory"]
        .as_str()
        .unwrap_or("512Mi")
}

#[tokio::test]
async fn gitops_base_and_overlays_render_and_pass_a_server_side_dry_run() {
    let (client, ns) = setup("examples-kustomize").await;
    let mut rendered = BTreeMap::new();
    let mut failures = Vec::new();
    for dir in OVERLAYS {
        let docs = kustomize(dir);
        check_namespaces(dir, &docs);
        let mut unserved = Vec::new();
        let what = format!("kubectl kustomize examples/{dir}");
        dry_run_all(
            &client,
            &ns.name,
            &what,
            &docs,
            &mut unserved,
            &mut failures,
        )
        .await;
        assert!(unserved.is_empty(), "{what}: unserved kinds {unserved:?}");
        rendered.insert(dir, docs);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let base = agents_of(&rendered["gitops/base"]);
    let dev = agents_of(&rendered["gitops/overlays/dev"]);
    let prod = agents_of(&rendered["gitops/overlays/prod"]);
    // dev: fewer agents, no backup permissions, small and short-lived.
    assert!(
        dev.len() < base.len(),
        "dev has {} agents, base {}",
        dev.len(),
        base.len()
    );
    for (name, a) in &dev {
        assert_eq!(a["metadata"]["namespace"], "agents-dev", "dev {name}");
        assert_eq!(memory(a), "128Mi", "dev {name}");
        let perms = a["spec"]["permissions"].to_string();
        assert!(!perms.contains("backup:"), "dev {name} keeps {perms}");
    }
    // prod: every agent of the base, at the 512Mi cap, a longer certificate, backups.
    assert_eq!(
        prod.keys().collect::<Vec<_>>(),
        base.keys().collect::<Vec<_>>()
    );
    for (name, a) in &prod {
        assert_eq!(a["metadata"]["namespace"], "agents-prod", "prod {name}");
        assert_eq!(memory(a), "512Mi", "prod {name}");
        assert_eq!(
            a["spec"]["identity"]["certificateTTL"], "72h",
            "prod {name}"
        );
    }
    assert!(prod["summarizer"]["spec"]["backup"]["schedule"].is_string());
    assert!(base["summarizer"]["spec"]["backup"].is_null());
}

/// The paths of every property under a schema (`a.b`, `a[].b` for array items, `a{}.b` for
/// map values).
fn schema_paths(schema: &Value, prefix: &str, out: &mut Vec<String>) {
    for (key, sub) in schema["properties"].as_object().into_iter().flatten() {
        let path = format!("{prefix}{key}");
        out.push(path.clone());
        schema_paths(sub, &format!("{path}."), out);
        schema_paths(&sub["items"], &format!("{path}[]."), out);
        schema_paths(&sub["additionalProperties"], &format!("{path}{{}}."), out);
    }
}

/// Whether `path` (as from `schema_paths`) is set in `doc`: for arrays and maps, in some item.
fn is_set(doc: &Value, path: &str) -> bool {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (path, None),
    };
    let (key, nested) = if let Some(k) = head.strip_suffix("[]") {
        (k, "[]")
    } else if let Some(k) = head.strip_suffix("{}") {
        (k, "{}")
    } else {
        (head, "")
    };
    let Some(value) = doc.get(key).filter(|v| !v.is_null()) else {
        return false;
    };
    let Some(rest) = rest else { return true };
    match nested {
        "[]" => value
            .as_array()
            .into_iter()
            .flatten()
            .any(|v| is_set(v, rest)),
        "{}" => value
            .as_object()
            .into_iter()
            .flatten()
            .any(|(_, v)| is_set(v, rest)),
        _ => is_set(value, rest),
    }
}

/// The spec paths of the Agent CRD that `doc`'s spec does not set.
fn missing_spec_paths(doc: &Value) -> Vec<String> {
    let crd = serde_json::to_value(Agent::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut paths = Vec::new();
    schema_paths(spec, "", &mut paths);
    assert!(paths.len() > 50, "the walk found only {paths:?}");
    paths.retain(|p| !is_set(&doc["spec"], p));
    paths
}

#[test]
fn full_agent_example_sets_every_spec_field_of_the_crd() {
    let full = read_docs("agents/full.yaml").remove(0);
    let missing = missing_spec_paths(&full);
    assert!(
        missing.is_empty(),
        "examples/agents/full.yaml does not set these spec fields of the Agent CRD; add each, \
         with a comment (what it does, default, limits): {missing:#?}"
    );
    // The walk sees nested, array and leaf fields: removing some is reported.
    let mut cut = full.clone();
    cut["spec"]["card"]["skills"][0]
        .as_object_mut()
        .unwrap()
        .remove("examples");
    for env in cut["spec"]["template"]["env"].as_array_mut().unwrap() {
        if let Some(from) = env["valueFrom"].as_object_mut() {
            from.remove("fileKeyRef");
        }
    }
    cut["spec"].as_object_mut().unwrap().remove("state");
    let missing = missing_spec_paths(&cut);
    for want in [
        "card.skills[].examples",
        "template.env[].valueFrom.fileKeyRef.volumeName",
        "state.mountPath",
    ] {
        assert!(
            missing.iter().any(|m| m == want),
            "{want} not in {missing:?}"
        );
    }
    // It is also a valid Agent of the current types, and minimal.yaml is the smallest one.
    serde_json::from_value::<Agent>(full).expect("full.yaml parses as an Agent");
    let minimal = read_docs("agents/minimal.yaml").remove(0);
    let spec_keys: Vec<&String> = minimal["spec"].as_object().unwrap().keys().collect();
    assert_eq!(spec_keys, ["template"]);
    assert_eq!(minimal["spec"]["template"].as_object().unwrap().len(), 1);
}

#[test]
fn every_top_level_spec_field_of_full_yaml_is_commented() {
    let text = std::fs::read_to_string(format!("{EXAMPLES}/agents/full.yaml")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| *l == "spec:").unwrap();
    let mut fields = 0;
    for (i, line) in lines.iter().enumerate().skip(start + 1) {
        let Some(field) = line
            .strip_prefix("  ")
            .filter(|l| !l.starts_with([' ', '#']))
        else {
            continue;
        };
        fields += 1;
        let above = lines[..i]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap();
        assert!(
            above.trim_start().starts_with('#'),
            "examples/agents/full.yaml: `{field}` has no comment above it"
        );
    }
    let crd = serde_json::to_value(Agent::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let want = spec["properties"].as_object().unwrap().len();
    assert_eq!(
        fields, want,
        "top-level spec fields in full.yaml vs the CRD"
    );
}

// ---------------------------------------------------------------- Argo CD and Flux, structurally

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    name: String,
    namespace: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Application {
    api_version: String,
    metadata: Meta,
    spec: ApplicationSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApplicationSpec {
    project: String,
    source: ApplicationSource,
    destination: ApplicationDestination,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApplicationSource {
    #[serde(rename = "repoURL")]
    repo_url: String,
    path: String,
    target_revision: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApplicationDestination {
    server: Option<String>,
    name: Option<String>,
    namespace: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GitRepository {
    api_version: String,
    metadata: Meta,
    spec: GitRepositorySpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GitRepositorySpec {
    interval: String,
    url: String,
    #[serde(rename = "ref")]
    reference: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FluxKustomization {
    api_version: String,
    metadata: Meta,
    spec: FluxKustomizationSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FluxKustomizationSpec {
    interval: String,
    path: String,
    prune: bool,
    wait: Option<bool>,
    source_ref: SourceRef,
}

#[derive(Deserialize)]
struct SourceRef {
    kind: String,
    name: String,
    namespace: Option<String>,
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, doc: &Value) -> T {
    serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{what}: a required field is missing or wrong: {e}"))
}

/// A Go duration as Flux takes it (`5m`, `1h30m`).
fn assert_duration(what: &str, d: &str) {
    let re = regex::Regex::new(r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$").unwrap();
    assert!(re.is_match(d), "{what}: {d:?} is not a duration such as 5m");
}

/// The repository path an Argo CD / Flux object deploys: an overlay that renders, whose
/// objects go to `namespace` (when given).
fn assert_deployable(what: &str, path: &str, namespace: Option<&str>) {
    let rel = path.trim_start_matches("./");
    let dir = Path::new(ROOT).join(rel);
    assert!(
        dir.join("kustomization.yaml").is_file(),
        "{what}: path {path} has no kustomization.yaml"
    );
    let rel = rel
        .strip_prefix("examples/")
        .expect("a path under examples/");
    let docs = kustomize(rel);
    if let Some(ns) = namespace {
        for (name, a) in agents_of(&docs) {
            assert_eq!(a["metadata"]["namespace"], ns, "{what}: Agent {name}");
        }
    }
}

#[test]
fn argocd_application_points_at_the_prod_overlay() {
    let what = "examples/gitops/argocd/application.yaml";
    let docs = read_docs("gitops/argocd/application.yaml");
    assert_eq!(docs.len(), 1);
    let app: Application = parse(what, &docs[0]);
    assert_eq!(app.api_version, "argoproj.io/v1alpha1");
    assert_eq!(app.metadata.namespace, "argocd");
    assert!(!app.metadata.name.is_empty() && !app.spec.project.is_empty());
    assert!(
        app.spec.source.repo_url.starts_with("https://"),
        "{what}: repoURL"
    );
    assert!(!app.spec.source.target_revision.is_empty());
    let d = &app.spec.destination;
    assert!(
        d.server.is_some() != d.name.is_some(),
        "{what}: destination needs server or name"
    );
    assert_eq!(app.spec.source.path, "examples/gitops/overlays/prod");
    assert_deployable(what, &app.spec.source.path, Some(&d.namespace));
    // The README tells how to install the health check this Application relies on.
    let readme = std::fs::read_to_string(format!("{EXAMPLES}/gitops/README.md")).unwrap();
    for needle in [
        "argocd/application.yaml",
        "argocd-cm-patch.yaml",
        "flux/kustomization.yaml",
    ] {
        assert!(
            readme.contains(needle),
            "examples/gitops/README.md does not mention {needle}"
        );
    }
}

#[test]
fn flux_kustomization_waits_for_the_prod_overlay_from_its_git_repository() {
    let what = "examples/gitops/flux/kustomization.yaml";
    let docs = read_docs("gitops/flux/kustomization.yaml");
    let by_kind = |k: &str| {
        docs.iter()
            .filter(|d| d["kind"] == k)
            .cloned()
            .collect::<Vec<_>>()
    };
    let repos: Vec<GitRepository> = by_kind("GitRepository")
        .iter()
        .map(|d| parse(what, d))
        .collect();
    let kss: Vec<FluxKustomization> = by_kind("Kustomization")
        .iter()
        .map(|d| parse(what, d))
        .collect();
    assert_eq!((repos.len(), kss.len(), docs.len()), (1, 1, 2), "{what}");
    let (repo, ks) = (&repos[0], &kss[0]);
    assert_eq!(repo.api_version, "source.toolkit.fluxcd.io/v1");
    assert_eq!(ks.api_version, "kustomize.toolkit.fluxcd.io/v1");
    assert!(repo.spec.url.starts_with("https://"), "{what}: url");
    assert!(
        ["branch", "tag", "semver", "commit"]
            .iter()
            .any(|k| repo.spec.reference.contains_key(*k)),
        "{what}: ref needs branch, tag, semver or commit"
    );
    assert_duration(what, &repo.spec.interval);
    assert_duration(what, &ks.spec.interval);
    assert_eq!(ks.spec.wait, Some(true), "{what}: wait: true");
    assert!(ks.spec.prune);
    let source = &ks.spec.source_ref;
    assert_eq!(
        (source.kind.as_str(), source.name.as_str()),
        ("GitRepository", repo.metadata.name.as_str())
    );
    let source_ns = source
        .namespace
        .as_deref()
        .unwrap_or(&ks.metadata.namespace);
    assert_eq!(
        source_ns, repo.metadata.namespace,
        "{what}: sourceRef namespace"
    );
    assert_deployable(what, &ks.spec.path, None);
}
