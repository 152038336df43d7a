//! The Grafana dashboard (charts/agentry/dashboards/agentry.json) and the alert rules
//! (charts/agentry/alerts/agentry-rules.yaml) query only metrics the controller really exports:
//! a controller runs against the local control plane, Redis and the S3 stores, reconciles
//! Agents, relays messages, completes a backup and hits a name conflict, so its labelled series
//! exist; its /metrics is then the reference. The chart renders both as a ConfigMap and a
//! PrometheusRule, and the rule file has the structure Prometheus requires.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::redis::{self as r, Mode};
use common::s3::stores;
use common::*;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use regex::Regex;
use serde_json::{Value, json};

use agentry::backup::store::StoreConfig;
use agentry::crd::{AgentBackup, BackupLocation, BackupPhase};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/agentry");
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/charts/agentry/dashboards/agentry.json"
);
const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/charts/agentry/alerts/agentry-rules.yaml"
);
const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md");

// ---------------------------------------------------------------- PromQL metric names

/// Words of PromQL that are not metric names (operators and modifiers; functions and
/// aggregations are recognised by the `(` after them).
const KEYWORDS: [&str; 13] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];

/// The metric names a PromQL expression selects. String literals, label matchers (`{...}`),
/// ranges and subqueries (`[...]`, with Grafana's `$__rate_interval`), and the label lists of
/// by/without/on/ignoring/group_left/group_right go first; of what is left, an identifier
/// followed by `(` is a function or aggregation, a keyword is a keyword, a number starts with a
/// digit, and every other identifier is a metric name.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let strings = Regex::new(r#""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`"#).unwrap();
    let matchers = Regex::new(r"\{[^}]*\}").unwrap();
    let ranges = Regex::new(r"\[[^\]]*\]").unwrap();
    let label_lists =
        Regex::new(r"(?i)\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)").unwrap();
    let s = strings.replace_all(expr, " ");
    let s = matchers.replace_all(&s, " ");
    let s = ranges.replace_all(&s, " ");
    let s = label_lists.replace_all(&s, " ");
    let token = Regex::new(r"[A-Za-z0-9_:.$]+").unwrap();
    let ident = Regex::new(r"^[A-Za-z_:][A-Za-z0-9_:]*$").unwrap();
    let mut names = BTreeSet::new();
    for m in token.find_iter(&s) {
        let t = m.as_str();
        let call = s[m.end()..].trim_start().starts_with('(');
        if ident.is_match(t) && !call && !KEYWORDS.contains(&t.to_lowercase().as_str()) {
            names.insert(t.to_string());
        }
    }
    names
}

/// The sample names of an exposition (`x_total`, `x_bucket`, `x_sum`, `x_count`, gauges).
fn exported_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect()
}

/// `where: name` for every name `exprs` use that `exported` lacks.
fn unknown_names(exprs: &[(String, String)], exported: &BTreeSet<String>) -> Vec<String> {
    let mut unknown = Vec::new();
    for (place, expr) in exprs {
        for name in metric_names(expr) {
            if !exported.contains(&name) {
                unknown.push(format!("{place}: {name} (in `{expr}`)"));
            }
        }
    }
    unknown
}

fn dashboard() -> Value {
    serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap())
        .expect("charts/agentry/dashboards/agentry.json is JSON")
}

/// Every panel, rows' nested panels included, except the rows themselves.
fn panels(dashboard: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        if p["type"] == "row" {
            out.extend(p["panels"].as_array().into_iter().flatten().cloned());
        } else {
            out.push(p.clone());
        }
    }
    out
}

/// (panel title, expression) of every dashboard query.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dashboard) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default().to_string();
            out.push((format!("panel {:?}", p["title"].as_str().unwrap()), expr));
        }
    }
    out
}

fn rules() -> Value {
    let text = std::fs::read_to_string(RULES).unwrap();
    serde_saphyr::from_str(&text).expect("charts/agentry/alerts/agentry-rules.yaml is YAML")
}

fn all_rules(rules: &Value) -> Vec<Value> {
    rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// (alert name, expression) of every rule.
fn rule_exprs(rules: &Value) -> Vec<(String, String)> {
    all_rules(rules)
        .iter()
        .map(|r| {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap_or("?");
            let expr = r["expr"].as_str().unwrap_or_default().to_string();
            (format!("alert {name}"), expr)
        })
        .collect()
}

#[test]
fn promql_metric_names_are_found_and_functions_keywords_labels_are_not() {
    let cases: [(&str, &[&str]); 9] = [
        (
            "sum by (kind) (rate(agentry_reconcile_errors_total[5m])) > 0.05",
            &["agentry_reconcile_errors_total"],
        ),
        (
            "histogram_quantile(0.99, sum by (le) (rate(a_seconds_bucket[$__rate_interval])))",
            &["a_seconds_bucket"],
        ),
        (
            "(a_seconds < 14 * 86400) and on (instance) (agentry_leader == 1)",
            &["a_seconds", "agentry_leader"],
        ),
        (
            "time() - last_timestamp_seconds",
            &["last_timestamp_seconds"],
        ),
        (
            r#"count(b{phase=~"Failed|x{y}", store!="a b"}) by (location)"#,
            &["b"],
        ),
        ("absent(up)", &["up"]),
        ("rate(foo:bar[5m] offset 1h) > bool 1e3", &["foo:bar"]),
        (
            "sum without (instance) (x) / ignoring(code) group_left (team) y unless z",
            &["x", "y", "z"],
        ),
        (
            r#"label_replace(m, "dst", "$1", "src", "(.*)") or vector(0)"#,
            &["m"],
        ),
    ];
    for (expr, want) in cases {
        let got: Vec<String> = metric_names(expr).into_iter().collect();
        assert_eq!(got, want.to_vec(), "{expr}");
    }
}

#[test]
fn the_checker_reports_names_the_exposition_lacks() {
    let exposition = "# TYPE agentry_leader gauge\nagentry_leader 1\n\
        agentry_relay_lag_seconds_bucket{le=\"0.1\"} 3\nagentry_relay_lag_seconds_sum 0.2\n\
        agentry_reconcile_total{result=\"ok\"} 4\n# EOF\n";
    let exported = exported_names(exposition);
    let exprs = [
        (
            "ok".to_string(),
            "sum(rate(agentry_reconcile_total[5m]))".to_string(),
        ),
        (
            "bucket".to_string(),
            "histogram_quantile(0.9, rate(agentry_relay_lag_seconds_bucket[5m]))".to_string(),
        ),
        ("typo".to_string(), "agentry_leadr == 0".to_string()),
        (
            "base name".to_string(),
            "agentry_relay_lag_seconds > 1".to_string(),
        ),
        (
            "no suffix".to_string(),
            "rate(agentry_reconcile[5m])".to_string(),
        ),
    ];
    let unknown = unknown_names(&exprs, &exported);
    assert_eq!(unknown.len(), 3, "{unknown:#?}");
    for (i, place) in ["typo", "base name", "no suffix"].iter().enumerate() {
        assert!(unknown[i].starts_with(place), "{unknown:#?}");
    }
}

// ---------------------------------------------------------------- against a real controller

const KEEPER: &str = "keeper";

/// The S3 credentials Secrets and a BackupLocation (only this test's controller manages it).
async fn backup_location(client: &Client, ns: &str) -> String {
    let (primary, secondary) = stores();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let store = |cfg: &StoreConfig, secret: &str, mode: &str| {
        json!({"endpoint": cfg.endpoint, "region": cfg.region, "bucket": cfg.bucket,
            "prefix": format!("{ns}/"), "forcePathStyle": true, "checksumMode": mode,
            "credentials": {"name": secret}})
    };
    for (name, cfg) in [("obs-primary", &primary), ("obs-secondary", &secondary)] {
        let secret: Secret = serde_json::from_value(json!({"metadata": {"name": name},
            "stringData": {"accessKeyId": cfg.access_key, "secretAccessKey": cfg.secret_key}}))
        .unwrap();
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
    let location = format!("loc-{ns}");
    let bl: BackupLocation = serde_json::from_value(json!({
        "apiVersion": "agentry.dev/v1alpha1", "kind": "BackupLocation",
        "metadata": {"name": location, "labels": {LOCATION_LABEL: ns}},
        "spec": {"primary": store(&primary, "obs-primary", "WhenSupported"),
                 "secondary": store(&secondary, "obs-secondary", "WhenRequired")},
    }))
    .unwrap();
    Api::<BackupLocation>::all(client.clone())
        .create(&PostParams::default(), &bl)
        .await
        .unwrap();
    location
}

/// A Service named like an Agent that did not create it: that Agent's reconcile fails with
/// NameConflict, so `agentry_reconcile_errors_total{kind}` has a series.
async fn name_conflict(client: &Client, ns: &str) {
    let theirs: Service = serde_json::from_value(json!({"metadata": {"name": "clash"},
        "spec": {"ports": [{"port": 80}]}}))
    .unwrap();
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &theirs)
        .await
        .unwrap();
    create_agent(client, ns, agent_manifest("clash", json!({})))
        .await
        .unwrap();
}

/// An AgentBackup of `keeper`, taken by `agentry sidecar` run locally over the Agent's
/// identity files (pods do not run here), waited for until Completed.
async fn complete_a_backup(client: &Client, c: &ControllerProcess, ns: &str, dir: &Path) {
    let identity = dir.join("identity");
    std::fs::create_dir_all(&identity).unwrap();
    r::write_identity(client, ns, KEEPER, &identity).await;
    let mut sidecar = Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args(["sidecar", "--api", &c.api_url(), "--identity-dir"])
        .arg(&identity)
        .args([
            "--id",
            &format!("{ns}/{KEEPER}"),
            "--poll",
            "1s",
            "--backup-poll",
            "1s",
        ])
        .args([
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--scratch-dir",
        ])
        .arg(dir)
        .stdout(std::fs::File::create(dir.join("sidecar.log")).unwrap())
        .stderr(std::fs::File::create(dir.join("sidecar.err")).unwrap())
        .spawn()
        .unwrap();
    let backup: AgentBackup = serde_json::from_value(json!({
        "apiVersion": "agentry.dev/v1alpha1", "kind": "AgentBackup",
        "metadata": {"name": "first"}, "spec": {"agent": KEEPER}}))
    .unwrap();
    let api: Api<AgentBackup> = Api::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), &backup).await.unwrap();
    let mut phase = None;
    for _ in 0..240 {
        phase = api.get("first").await.ok().and_then(|b| b.status?.phase);
        if matches!(phase, Some(BackupPhase::Completed | BackupPhase::Failed)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = sidecar.kill();
    let _ = sidecar.wait();
    let err = std::fs::read_to_string(dir.join("sidecar.err")).unwrap_or_default();
    assert_eq!(
        phase,
        Some(BackupPhase::Completed),
        "sidecar:\n{err}\n{}",
        c.logs()
    );
}

/// One message delivered and one refused (a dead letter), through the controller's relay.
async fn relay_two_messages(client: &Client, c: &ControllerProcess, ns: &str) {
    let mut alice = r::mailbox(client, ns, "alice", "obs").await;
    alice.send(&format!("{ns}/bob"), "t", "hi").await.unwrap();
    alice.send(&format!("{ns}/nobody"), "t", "x").await.unwrap();
    eventually(
        Duration::from_secs(60),
        "the relay to count 2 messages",
        || async {
            c.metric("agentry_relay_messages_total")
                .await
                .unwrap_or(0.0)
                >= 2.0
        },
    )
    .await;
}

async fn scrape(c: &ControllerProcess) -> String {
    reqwest::get(format!("http://127.0.0.1:{}/metrics", c.ops_port))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A controller with messaging and backups, Agents that use both, one that cannot be
/// reconciled; returns its /metrics once every labelled family has a series.
async fn busy_controller_metrics() -> String {
    let (client, ns) = setup("observability").await;
    let n = ns.name.as_str();
    Api::<Namespace>::all(client.clone())
        .patch(
            n,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
            "agentry.dev/allowed-permissions": "backup:write backup:read memory:read"}}})),
        )
        .await
        .unwrap();
    let location = backup_location(&client, n).await;
    let mut opts = ControllerOptions::new(n);
    opts.extra_args = Mode::Standalone.controller_args();
    opts.extra_args
        .extend(["--backup-interval", "1s", "--backup-location-check", "2s"].map(String::from));
    let env = r::env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let c = ControllerProcess::start_with_env(opts, &env);
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(state.path().join("data")).unwrap();
    std::fs::write(state.path().join("data/memory.json"), "{}").unwrap();
    let keeper = json!({"spec": {"permissions": ["backup:write", "backup:read"],
        "backup": {"schedule": "@yearly", "paths": [state.path().join("data")], "location": location}}});
    create_agent(&client, n, agent_manifest(KEEPER, keeper))
        .await
        .unwrap();
    for name in ["alice", "bob"] {
        create_agent(&client, n, agent_manifest(name, r::messaging(json!({}))))
            .await
            .unwrap();
    }
    name_conflict(&client, n).await;
    wait_agent(
        &client,
        n,
        KEEPER,
        Duration::from_secs(90),
        "identity",
        identity_issued,
    )
    .await;
    // The relay reads an outbox once the Agent's messaging is provisioned.
    for name in ["alice", "bob"] {
        wait_agent(
            &client,
            n,
            name,
            Duration::from_secs(90),
            "MessagingReady",
            |a| condition(a, "MessagingReady").is_some_and(|c| c.status == "True"),
        )
        .await;
    }
    wait_api(&c).await;
    relay_two_messages(&client, &c, n).await;
    complete_a_backup(&client, &c, n, state.path()).await;
    let want = [
        "agentry_backup_last_success_timestamp_seconds{",
        "agentry_reconcile_errors_total{",
        "agentry_backup_store_available{",
        "agentry_agent_backups{",
        "agentry_api_requests_total{",
    ];
    eventually(
        Duration::from_secs(60),
        "every labelled family to have a series",
        || async {
            let text = scrape(&c).await;
            want.iter().all(|w| text.contains(w))
        },
    )
    .await;
    let text = scrape(&c).await;
    let _ = Api::<BackupLocation>::all(client)
        .delete(&location, &DeleteParams::default())
        .await;
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_metric_the_dashboard_and_the_alerts_use_is_exported_by_the_controller() {
    let exposition = busy_controller_metrics().await;
    let exported = exported_names(&exposition);
    let mut exprs = dashboard_exprs(&dashboard());
    exprs.extend(rule_exprs(&rules()));
    let used: BTreeSet<String> = exprs.iter().flat_map(|(_, e)| metric_names(e)).collect();
    assert!(used.len() >= 15, "only {used:?}");
    let unknown = unknown_names(&exprs, &exported);
    assert!(
        unknown.is_empty(),
        "queries use metrics the controller does not export:\n{}\nexported: {exported:#?}",
        unknown.join("\n")
    );
    // The same check fails on a name the controller lacks.
    let typo = [(
        "typo".to_string(),
        "rate(agentry_certificate_issued_total[5m])".to_string(),
    )];
    assert_eq!(unknown_names(&typo, &exported).len(), 1);
    // docs/metrics.md lists every agentry metric the controller exports.
    let docs = std::fs::read_to_string(DOCS).unwrap();
    for line in exposition
        .lines()
        .filter(|l| l.starts_with("# TYPE agentry_"))
    {
        let name = line.split(' ').nth(2).unwrap();
        assert!(
            docs.contains(name),
            "docs/metrics.md does not describe {name}"
        );
    }
}

// ---------------------------------------------------------------- the chart and the rule file

fn helm_template(extra: &[&str]) -> Vec<Value> {
    let mut args = vec![
        "template",
        "agentry",
        CHART,
        "--namespace",
        "agentry-system",
    ];
    args.extend(extra);
    let out = Command::new(tool_dir().join("helm"))
        .args(&args)
        .output()
        .expect("running helm");
    assert!(
        out.status.success(),
        "helm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_saphyr::from_multiple(&String::from_utf8(out.stdout).unwrap())
        .expect("helm template renders YAML");
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind)
}

#[tokio::test]
async fn the_chart_renders_the_dashboard_configmap_and_the_prometheus_rule() {
    let off = helm_template(&[]);
    assert!(
        find(&off, "PrometheusRule").is_none(),
        "prometheusRule is off by default"
    );
    assert!(
        !off.iter()
            .any(|d| d["metadata"]["name"] == "agentry-grafana-dashboard"),
        "grafanaDashboard is off by default"
    );
    let on = helm_template(&[
        "--set",
        "grafanaDashboard.enabled=true",
        "--set-string",
        "grafanaDashboard.labels.grafana_dashboard=1",
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "prometheusRule.labels.release=monitoring",
    ]);
    let cm = on
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "agentry-grafana-dashboard")
        .expect("the dashboard ConfigMap");
    assert_eq!(
        cm["metadata"]["labels"]["grafana_dashboard"], "1",
        "a string label"
    );
    let rendered: Value = serde_json::from_str(cm["data"]["agentry.json"].as_str().unwrap())
        .expect("the ConfigMap's agentry.json is JSON");
    assert_eq!(
        rendered,
        dashboard(),
        "the ConfigMap carries dashboards/agentry.json as it is"
    );
    check_dashboard(&rendered);
    // The apiserver takes the ConfigMap as rendered.
    let (client, ns) = setup("observability-chart").await;
    let mut cm: ConfigMap = serde_json::from_value(cm.clone()).unwrap();
    cm.metadata.namespace = Some(ns.name.clone());
    Api::<ConfigMap>::namespaced(client, &ns.name)
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &cm,
        )
        .await
        .expect("the apiserver accepts the dashboard ConfigMap");
    let rule = find(&on, "PrometheusRule").expect("the PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["metadata"]["labels"]["release"], "monitoring");
    assert_eq!(
        rule["spec"],
        rules(),
        "the PrometheusRule carries alerts/agentry-rules.yaml"
    );
}

/// Grafana's model: a prometheus `datasource` variable every panel and query uses, and a
/// query in every panel.
fn check_dashboard(d: &Value) {
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a `datasource` variable of type datasource (prometheus)"
    );
    let all = panels(d);
    assert!(all.len() >= 12, "{} panels", all.len());
    let mut ids = BTreeSet::new();
    for p in &all {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(p["id"].as_i64().unwrap()),
            "panel ids are unique ({title})"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title}");
        let targets = p["targets"].as_array().filter(|t| !t.is_empty());
        let targets = targets.unwrap_or_else(|| panic!("panel {title} has no query"));
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "panel {title}: an empty query");
            assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {title}");
        }
    }
    for topic in [
        "phase",
        "expir",
        "issu",
        "token",
        "reconcile error",
        "backup age",
        "failure",
        "message rate",
        "dead letter",
        "relay lag",
    ] {
        assert!(
            all.iter()
                .any(|p| p["title"].as_str().unwrap().to_lowercase().contains(topic)),
            "no panel about {topic}"
        );
    }
}

#[test]
fn the_rule_file_has_the_structure_prometheus_requires() {
    let rules = rules();
    let duration = Regex::new(r"^([0-9]+(ms|s|m|h|d|w|y))+$").unwrap();
    let alert_name = Regex::new(r"^[A-Z][A-Za-z0-9]+$").unwrap();
    let mut groups = BTreeSet::new();
    let mut alerts = BTreeSet::new();
    for g in rules["groups"].as_array().expect("groups: a list") {
        let name = g["name"].as_str().expect("every group has a name");
        assert!(groups.insert(name), "group {name} twice");
        for r in g["rules"].as_array().expect("rules: a list") {
            let alert = r["alert"].as_str().expect("every rule is an alert");
            assert!(alert_name.is_match(alert), "{alert}: CamelCase");
            assert!(alerts.insert(alert), "alert {alert} twice");
            let fields: BTreeSet<&str> =
                r.as_object().unwrap().keys().map(String::as_str).collect();
            let known = BTreeSet::from([
                "alert",
                "expr",
                "for",
                "keep_firing_for",
                "labels",
                "annotations",
            ]);
            assert!(
                fields.is_subset(&known),
                "{alert}: unknown fields {fields:?}"
            );
            assert!(
                !metric_names(r["expr"].as_str().unwrap_or_default()).is_empty(),
                "{alert}: expr"
            );
            if let Some(f) = r.get("for") {
                assert!(
                    duration.is_match(f.as_str().unwrap_or_default()),
                    "{alert}: for {f}"
                );
            }
            let severity = r["labels"]["severity"].as_str().unwrap_or_default();
            assert!(
                ["critical", "warning", "info"].contains(&severity),
                "{alert}: severity"
            );
            for a in ["summary", "description"] {
                assert!(r["annotations"][a].is_string(), "{alert}: annotations.{a}");
            }
        }
    }
    assert!(alerts.len() >= 10, "{alerts:?}");
    for required in [
        "AgentryCertificateExpiringSoon",
        "AgentryBackupTooOld",
        "AgentryBackupStoreUnavailable",
        "AgentryRelayLagHigh",
        "AgentryReconcileErrors",
        "AgentryControllerDown",
        "AgentryNoLeader",
    ] {
        assert!(alerts.contains(required), "no {required}");
    }
    // docs/metrics.md says what to do for each.
    let docs = std::fs::read_to_string(DOCS).unwrap();
    for alert in &alerts {
        assert!(
            docs.contains(alert),
            "docs/metrics.md does not explain {alert}"
        );
    }
}
