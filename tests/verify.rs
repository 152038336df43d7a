//! `agentry verify` against a healthy installation and against the same one broken in four
//! ways. The installation is real: the local apiserver, the controller binary (run as a local
//! process: pods do not run on kwok's nodes), its agent API, `redis-server` (hack/redis) and
//! both S3 servers (hack/s3-stores). The verify process is the real binary too.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use agentry::backup::store::StoreConfig;
use agentry::crd::BackupLocation;

/// Runs `agentry verify -o json` with these flags: (exit code, report).
fn verify(ns: &str, extra: &[String]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args(["verify", "--namespace", ns, "--output", "json"])
        .args([
            "--backup-location-selector",
            &format!("{LOCATION_LABEL}={ns}"),
        ])
        .args(extra)
        .env("AGENTRY_REDIS_PASSWORD", common::redis::password())
        .output()
        .expect("running agentry verify");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

/// name -> (status, detail, fix) of each check.
fn checks(report: &Value) -> Vec<(String, String, String, String)> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (s("name"), s("status"), s("detail"), s("fix"))
        })
        .collect()
}

fn status_of(report: &Value, name: &str) -> String {
    checks(report)
        .into_iter()
        .find(|c| c.0 == name)
        .map(|c| c.1)
        .unwrap_or_else(|| panic!("no check {name:?} in {report:#}"))
}

async fn create_location(
    client: &kube::Client,
    ns: &str,
    primary: &StoreConfig,
    secondary: &StoreConfig,
) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for (name, cfg) in [("verify-primary", primary), ("verify-secondary", secondary)] {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": name},
            "stringData": {"accessKeyId": cfg.access_key, "secretAccessKey": cfg.secret_key},
        }))
        .unwrap();
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
    let store = |cfg: &StoreConfig, secret: &str, mode: &str| {
        json!({"endpoint": cfg.endpoint, "region": cfg.region, "bucket": cfg.bucket,
               "prefix": format!("{ns}/"), "forcePathStyle": true, "checksumMode": mode,
               "credentials": {"name": secret}})
    };
    let bl: BackupLocation = serde_json::from_value(json!({
        "apiVersion": "agentry.dev/v1alpha1", "kind": "BackupLocation",
        "metadata": {"name": format!("verify-{ns}"), "labels": {LOCATION_LABEL: ns}},
        "spec": {"primary": store(primary, "verify-primary", "WhenSupported"),
                 "secondary": store(secondary, "verify-secondary", "WhenRequired")},
    }))
    .unwrap();
    Api::<BackupLocation>::all(client.clone())
        .create(&PostParams::default(), &bl)
        .await
        .unwrap();
}

/// Healthy: every check passes (the Deployment and Litestream checks are skipped, and say
/// why), exit 0. Then broken, one thing at a time as an operator would meet them: a wrong
/// secondary store secret, a wrong Redis password, an API address nothing answers on, and the
/// controller stopped. Each fails its own check with a fix, the rest stay ok, exit 1; the text
/// report says NOT healthy.
#[tokio::test(flavor = "multi_thread")]
async fn verify_reports_a_healthy_installation_and_names_what_is_broken() {
    let (client, ns) = setup("verify").await;
    let mut opts = ControllerOptions::new(&ns.name);
    opts.extra_args = common::redis::Mode::Standalone.controller_args();
    opts.extra_args
        .extend(["--backup-location-check", "2s"].map(String::from));
    let env = common::redis::env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut controller = ControllerProcess::start_with_env(opts, &env);
    let (primary, secondary) = common::s3::stores();
    create_location(&client, &ns.name, &primary, &secondary).await;
    create_and_wait(
        &client,
        &ns.name,
        "checked",
        Duration::from_secs(60),
        "identity issued",
        identity_issued,
    )
    .await;
    wait_api(&controller).await;
    let identity = tempfile::tempdir().unwrap();
    common::redis::write_identity(&client, &ns.name, "checked", identity.path()).await;
    let redis = common::redis::standalone_url();
    let flags = |api: &str| -> Vec<String> {
        vec![
            "--api-url".into(),
            api.into(),
            "--identity-dir".into(),
            identity.path().display().to_string(),
            "--redis-url".into(),
            redis.clone(),
        ]
    };
    let location = format!("verify-{}", ns.name);

    let (code, report) = verify(&ns.name, &flags(&controller.api_url()));
    assert_eq!(code, 0, "{report:#}\n{}", controller.logs());
    assert_eq!(report["healthy"], true);
    for (name, status, detail, _) in checks(&report) {
        let expected = if name == "controller deployment" || name == "litestream" {
            "skipped"
        } else {
            "ok"
        };
        assert_eq!(status, expected, "{name}: {detail}");
    }
    let names: Vec<String> = checks(&report).into_iter().map(|c| c.0).collect();
    for want in [
        "crd Agent",
        "crd BackupLocation",
        "controller leader",
        "ca",
        "crl",
        "api",
        "redis",
        &format!("location {location} primary"),
        &format!("location {location} secondary"),
    ] {
        assert!(names.iter().any(|n| n == want), "no {want} in {names:?}");
    }
    let api_detail = checks(&report)
        .into_iter()
        .find(|c| c.0 == "api")
        .unwrap()
        .2;
    assert!(
        api_detail.contains(&format!("mTLS + JWT call as {}/checked", ns.name)),
        "{api_detail}"
    );

    // Broken store credentials: the secondary's secret key is wrong.
    Api::<Secret>::namespaced(client.clone(), &ns.name)
        .patch(
            "verify-secondary",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"secretAccessKey": "not-the-key"}})),
        )
        .await
        .unwrap();
    // A wrong Redis password, and an API address where nothing listens.
    let wrong = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(wrong.path(), "not-the-password\n").unwrap();
    let mut broken = flags(&format!("https://127.0.0.1:{}", free_port()));
    broken.extend([
        "--redis-password-file".into(),
        wrong.path().display().to_string(),
    ]);
    let (code, report) = verify(&ns.name, &broken);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["healthy"], false);
    for name in ["api", "redis", &format!("location {location} secondary")] {
        assert_eq!(status_of(&report, name), "fail", "{name}: {report:#}");
    }
    for name in [
        "controller leader",
        "ca",
        "crl",
        &format!("location {location} primary"),
    ] {
        assert_eq!(status_of(&report, name), "ok", "{name}: {report:#}");
    }
    for (name, status, _, fix) in checks(&report) {
        if status == "fail" {
            assert!(!fix.is_empty(), "{name} fails without a fix: {report:#}");
        }
    }

    // The controller stops: its Lease is released (or expires), so nobody leads.
    controller.terminate();
    let mut last = Value::Null;
    for _ in 0..30 {
        let (code, report) = verify(&ns.name, &[]);
        if code == 1 && status_of(&report, "controller leader") == "fail" {
            last = report;
            break;
        }
        last = report;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(status_of(&last, "controller leader"), "fail", "{last:#}");
    assert_eq!(status_of(&last, "api"), "skipped", "{last:#}");

    // The text report, as people read it.
    let text = Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args(["verify", "--namespace", &ns.name])
        .args([
            "--backup-location-selector",
            &format!("{LOCATION_LABEL}={}", ns.name),
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&text.stdout);
    assert_eq!(text.status.code(), Some(1), "{out}");
    assert!(out.contains("[FAIL] controller leader"), "{out}");
    assert!(out.contains("fix: "), "{out}");
    assert!(out.contains("NOT healthy"), "{out}");
}

/// Bad flags are refused before anything is checked: exit 2, naming the flag.
#[test]
fn bad_verify_flags_are_refused_with_the_flag_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args(["verify", "--redis-url", "http://example:6379"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--redis-url"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args(["verify", "--litestream-config", "/nonexistent.yml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--litestream-metrics-url"), "{err}");
}
