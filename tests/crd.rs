//! The Agent CRD on the real apiserver: it installs, valid specs are accepted with defaults, and
//! invalid specs are refused by the apiserver itself with a message naming the field.

mod common;

use common::*;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use serde_json::json;

use agentry::crd::Agent;

#[tokio::test]
async fn crd_installs_and_is_established() {
    let client = client().await;
    ensure_crds(&client).await;
    let crd = Api::<CustomResourceDefinition>::all(client.clone())
        .get("agents.agentry.dev")
        .await
        .unwrap();
    let status = crd.status.unwrap();
    let established = status
        .conditions
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "Established")
        .unwrap();
    assert_eq!(established.status, "True");
    assert_eq!(
        status.accepted_names.unwrap().short_names,
        Some(vec!["ag".to_string()])
    );
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    assert!(version.subresources.as_ref().unwrap().status.is_some());
    let columns: Vec<_> = version
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        [
            "Phase",
            "Capabilities",
            "Memory",
            "Cert-Expiry",
            "Last-Backup",
            "Age"
        ]
    );
}

#[tokio::test]
async fn valid_agent_is_accepted_with_defaults() {
    let (client, ns) = setup("crd-valid").await;
    // Only the required field: everything else defaults.
    let minimal = json!({
        "apiVersion": "agentry.dev/v1alpha1", "kind": "Agent",
        "metadata": {"name": "minimal"},
        "spec": {"template": {"image": "ghcr.io/example/echo:1"}}
    });
    let created = create_agent(&client, &ns.name, minimal).await.unwrap();
    assert_eq!(created.spec.resources.memory, "512Mi");
    assert_eq!(created.spec.identity.token_ttl, "1h");
    assert_eq!(created.spec.identity.certificate_ttl, "24h");
    assert_eq!(created.spec.template.port, 8080);

    let full = agent_manifest(
        "full",
        json!({"spec": {
            "capabilities": ["summarize", "translate"],
            "permissions": ["backup:write", "backup:read", "memory:read", "memory:write",
                            "messages:send", "messages:read", "agents:discover"],
            "identity": {"certificateTTL": "2160h", "tokenTTL": "5m"},
            "resources": {"memory": "512Mi", "cpu": "1"},
            "backup": {"schedule": "0 */6 * * *", "paths": ["/var/lib/agent"],
                       "retention": {"keepLast": 5, "keepDaily": 7}},
            "messaging": {"enabled": true, "maxLen": 10000},
            "state": {"persistent": true, "size": "2Gi"}
        }}),
    );
    let created = create_agent(&client, &ns.name, full).await.unwrap();
    assert_eq!(created.spec.capabilities, ["summarize", "translate"]);
    assert_eq!(created.spec.backup.unwrap().location, "default");
    for schedule in [
        "@daily",
        "*/15 * * * MON-FRI",
        "0 0 1 JAN,JUL *",
        "5 4 * * 0",
    ] {
        let name = format!("sched-{:x}", rand::random::<u16>());
        let m = agent_manifest(
            &name,
            json!({"spec": {"backup": {"schedule": schedule, "paths": ["/data"]}}}),
        );
        create_agent(&client, &ns.name, m)
            .await
            .unwrap_or_else(|e| panic!("schedule {schedule:?} refused: {e}"));
    }
    let listed = Api::<Agent>::namespaced(client.clone(), &ns.name)
        .list(&Default::default())
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 6);
}

/// Each case: (what, spec overrides, the field path the apiserver's message must name).
fn invalid_cases() -> Vec<(&'static str, serde_json::Value, &'static str)> {
    let caps33: Vec<String> = (0..33).map(|i| format!("cap{i}")).collect();
    vec![
        (
            "memory above the cap",
            json!({"resources": {"memory": "1Gi"}}),
            "spec.resources.memory",
        ),
        (
            "memory just above the cap",
            json!({"resources": {"memory": "513Mi"}}),
            "spec.resources.memory",
        ),
        (
            "memory in decimal units above the cap",
            json!({"resources": {"memory": "600M"}}),
            "spec.resources.memory",
        ),
        (
            "memory not a quantity",
            json!({"resources": {"memory": "lots"}}),
            "spec.resources.memory",
        ),
        (
            "memory below the minimum",
            json!({"resources": {"memory": "1Mi"}}),
            "spec.resources.memory",
        ),
        (
            "cpu not a quantity",
            json!({"resources": {"cpu": "fast"}}),
            "spec.resources.cpu",
        ),
        (
            "capability with upper case",
            json!({"capabilities": ["Summarize"]}),
            "spec.capabilities",
        ),
        (
            "capability with underscore",
            json!({"capabilities": ["bad_name"]}),
            "spec.capabilities",
        ),
        (
            "33 capabilities",
            json!({"capabilities": caps33}),
            "spec.capabilities",
        ),
        (
            "duplicate capabilities",
            json!({"capabilities": ["a", "a"]}),
            "spec.capabilities",
        ),
        (
            "unknown permission",
            json!({"permissions": ["root:all"]}),
            "spec.permissions",
        ),
        (
            "token TTL too short",
            json!({"identity": {"tokenTTL": "1m"}}),
            "spec.identity.tokenTTL",
        ),
        (
            "token TTL too long",
            json!({"identity": {"tokenTTL": "48h"}}),
            "spec.identity.tokenTTL",
        ),
        (
            "token TTL not a duration",
            json!({"identity": {"tokenTTL": "forever"}}),
            "spec.identity.tokenTTL",
        ),
        (
            "token TTL in days",
            json!({"identity": {"tokenTTL": "1d"}}),
            "spec.identity.tokenTTL",
        ),
        (
            "certificate TTL too short",
            json!({"identity": {"certificateTTL": "30m"}}),
            "spec.identity.certificateTTL",
        ),
        (
            "certificate TTL above 90 days",
            json!({"identity": {"certificateTTL": "2161h"}}),
            "spec.identity.certificateTTL",
        ),
        (
            "cron in words",
            json!({"backup": {"schedule": "every day", "paths": ["/data"]}}),
            "spec.backup.schedule",
        ),
        (
            "cron minute 61",
            json!({"backup": {"schedule": "61 * * * *", "paths": ["/data"]}}),
            "spec.backup.schedule",
        ),
        (
            "cron with four fields",
            json!({"backup": {"schedule": "* * * *", "paths": ["/data"]}}),
            "spec.backup.schedule",
        ),
        (
            "cron hour 24",
            json!({"backup": {"schedule": "0 24 * * *", "paths": ["/data"]}}),
            "spec.backup.schedule",
        ),
        (
            "relative backup path",
            json!({"backup": {"schedule": "@daily", "paths": ["data"]}}),
            "spec.backup.paths",
        ),
        (
            "backup path escaping",
            json!({"backup": {"schedule": "@daily", "paths": ["/data/../etc"]}}),
            "spec.backup.paths",
        ),
        (
            "no backup paths",
            json!({"backup": {"schedule": "@daily", "paths": []}}),
            "spec.backup.paths",
        ),
        (
            "keepLast zero",
            json!({"backup": {"schedule": "@daily", "paths": ["/d"], "retention": {"keepLast": 0}}}),
            "spec.backup.retention.keepLast",
        ),
        (
            "messaging maxLen zero",
            json!({"messaging": {"maxLen": 0}}),
            "spec.messaging.maxLen",
        ),
        (
            "empty image",
            json!({"template": {"image": ""}}),
            "spec.template.image",
        ),
        (
            "image with spaces",
            json!({"template": {"image": "a b"}}),
            "spec.template.image",
        ),
        (
            "missing image",
            json!({"template": {"image": null, "command": ["x"]}}),
            "spec.template.image",
        ),
        (
            "port out of range",
            json!({"template": {"port": 70000}}),
            "spec.template.port",
        ),
        (
            "state size not a quantity",
            json!({"state": {"persistent": true, "size": "big"}}),
            "spec.state.size",
        ),
        (
            "memory 512.1Mi",
            json!({"resources": {"memory": "512.1Mi"}}),
            "spec.resources.memory",
        ),
        (
            "memory 6e8",
            json!({"resources": {"memory": "6e8"}}),
            "spec.resources.memory",
        ),
        (
            "memory a byte and a half above the cap",
            json!({"resources": {"memory": "536870913.5"}}),
            "spec.resources.memory",
        ),
        (
            "memory half a byte below the minimum",
            json!({"resources": {"memory": "16777215.5"}}),
            "spec.resources.memory",
        ),
        (
            "cpu above 1000 cores",
            json!({"resources": {"cpu": "1001"}}),
            "spec.resources.cpu",
        ),
        (
            "cpu 1e30",
            json!({"resources": {"cpu": "1e30"}}),
            "spec.resources.cpu",
        ),
        (
            "command item of 4097 characters",
            json!({"template": {"image": "i", "command": ["x".repeat(4097)]}}),
            "spec.template.command",
        ),
        (
            "args item of 4097 characters",
            json!({"template": {"image": "i", "args": ["a", "x".repeat(4097)]}}),
            "spec.template.args",
        ),
        (
            "env name of 257 characters",
            json!({"template": {"image": "i", "env": [{"name": "X".repeat(257), "value": "v"}]}}),
            "spec.template.env",
        ),
        (
            "env value of 32769 characters",
            json!({"template": {"image": "i", "env": [{"name": "X", "value": "v".repeat(32769)}]}}),
            "spec.template.env",
        ),
        (
            "env secret name of 254 characters",
            json!({"template": {"image": "i", "env": [{"name": "X",
                "valueFrom": {"secretKeyRef": {"name": "s".repeat(254), "key": "k"}}}]}}),
            "spec.template.env",
        ),
        (
            "env reading another Agent's identity",
            json!({"template": {"image": "i", "env": [{"name": "A", "value": "b"}, {"name": "T",
                "valueFrom": {"secretKeyRef": {"name": "victim-identity", "key": "token"}}}]}}),
            "spec.template.env",
        ),
        (
            "env reading a bare -identity Secret",
            json!({"template": {"image": "i", "env": [{"name": "T",
                "valueFrom": {"secretKeyRef": {"name": "-identity", "key": "tls.key"}}}]}}),
            "spec.template.env",
        ),
    ]
}

/// Families of bad values, to take the corpus past the 100 of RELIABILITY.md.
fn generated_invalid_cases() -> Vec<(String, serde_json::Value, &'static str)> {
    let mut out = Vec::new();
    let mut family = |field: &'static str,
                      values: Vec<serde_json::Value>,
                      wrap: &dyn Fn(serde_json::Value) -> serde_json::Value| {
        for v in values {
            out.push((format!("{field} = {v}"), wrap(v), field));
        }
    };
    family(
        "spec.resources.memory",
        [
            "513Mi",
            "600Mi",
            "700Mi",
            "4Gi",
            "2Gi",
            "1G",
            "537000000",
            "0.6Gi",
            "100Gi",
            "1Ti",
            "9999Mi",
            "12XB",
            "-5Mi",
            "Mi",
            "1.2.3Mi",
            "1 Mi",
            "15Mi",
            "1000",
            "1k",
        ]
        .map(|v| json!(v))
        .to_vec(),
        &|v| json!({"resources": {"memory": v}}),
    );
    family(
        "spec.capabilities",
        [
            "-lead",
            "trail-",
            "dot.ted",
            "sp ace",
            &"x".repeat(64),
            "ümlaut",
            "",
            "a/b",
            "CAPS",
        ]
        .map(|v| json!([v]))
        .to_vec(),
        &|v| json!({"capabilities": v}),
    );
    family(
        "spec.permissions",
        ["backup:delete", "BACKUP:WRITE", "memory", "*", ""]
            .map(|v| json!([v]))
            .to_vec(),
        &|v| json!({"permissions": v}),
    );
    family(
        "spec.identity.tokenTTL",
        ["4m59s", "24h1s", "25h", "0s", "-1h", "1w", "5"]
            .map(|v| json!(v))
            .to_vec(),
        &|v| json!({"identity": {"tokenTTL": v}}),
    );
    family(
        "spec.identity.certificateTTL",
        ["59m", "10000h", "1y", "abc", "0h"]
            .map(|v| json!(v))
            .to_vec(),
        &|v| json!({"identity": {"certificateTTL": v}}),
    );
    family(
        "spec.backup.schedule",
        [
            "0 0 32 * *",
            "0 0 * 13 *",
            "0 0 * * 8",
            "@sometimes",
            "* * * * * *",
            "0 0 0 * *",
            "*/x * * * *",
            "",
        ]
        .map(|v| json!(v))
        .to_vec(),
        &|v| json!({"backup": {"schedule": v, "paths": ["/data"]}}),
    );
    family(
        "spec.backup.paths",
        ["./x", "../x", "/a/../b", ""].map(|v| json!([v])).to_vec(),
        &|v| json!({"backup": {"schedule": "@daily", "paths": v}}),
    );
    family(
        "spec.backup.retention.keepLast",
        vec![json!(-1), json!(1001)],
        &|v| json!({"backup": {"schedule": "@daily", "paths": ["/d"], "retention": {"keepLast": v}}}),
    );
    family(
        "spec.backup.retention.keepDaily",
        vec![json!(-1), json!(3651)],
        &|v| json!({"backup": {"schedule": "@daily", "paths": ["/d"], "retention": {"keepDaily": v}}}),
    );
    family(
        "spec.messaging.maxLen",
        vec![json!(-5), json!(10_000_001)],
        &|v| json!({"messaging": {"maxLen": v}}),
    );
    family(
        "spec.template.port",
        vec![json!(0), json!(-1), json!(65536)],
        &|v| json!({"template": {"port": v}}),
    );
    family(
        "spec.state.size",
        vec![json!("-1Gi"), json!("0"), json!("1 Gi")],
        &|v| json!({"state": {"persistent": true, "size": v}}),
    );
    family(
        "spec.state.mountPath",
        vec![json!("relative/path")],
        &|v| json!({"state": {"persistent": true, "mountPath": v}}),
    );
    out
}

#[tokio::test]
async fn invalid_specs_are_refused_by_the_apiserver_naming_the_field() {
    let (client, ns) = setup("crd-invalid").await;
    let api = kube::Api::<kube::api::DynamicObject>::namespaced_with(
        client.clone(),
        &ns.name,
        &kube::api::ApiResource::erase::<Agent>(&()),
    );
    let cases: Vec<(String, serde_json::Value, &str)> = invalid_cases()
        .into_iter()
        .map(|(what, v, field)| (what.to_string(), v, field))
        .chain(generated_invalid_cases())
        .collect();
    assert!(cases.len() >= 100, "{} cases", cases.len());
    let mut failures = Vec::new();
    for (i, (what, overrides, field)) in cases.iter().enumerate() {
        let manifest = agent_manifest(&format!("bad-{i}"), json!({ "spec": overrides }));
        // Raw JSON: some of these would not even deserialize into our Rust types.
        let obj: kube::api::DynamicObject = serde_json::from_value(manifest).unwrap();
        match api.create(&Default::default(), &obj).await {
            Ok(_) => failures.push(format!("{what}: accepted")),
            Err(kube::Error::Api(status)) => {
                if status.code != 422 || !status.message.contains(field) {
                    failures.push(format!(
                        "{what}: expected 422 naming {field}, got {}: {}",
                        status.code, status.message
                    ));
                }
            }
            Err(e) => failures.push(format!("{what}: unexpected error {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // Nothing was stored.
    let stored = kube::Api::<Agent>::namespaced(client.clone(), &ns.name)
        .list(&Default::default())
        .await
        .unwrap();
    assert_eq!(stored.items.len(), 0);
}

#[tokio::test]
async fn names_that_cannot_name_a_service_are_refused() {
    let (client, ns) = setup("crd-names").await;
    let api = kube::Api::<kube::api::DynamicObject>::namespaced_with(
        client.clone(),
        &ns.name,
        &kube::api::ApiResource::erase::<Agent>(&()),
    );
    let long = "a".repeat(64);
    let mut failures = Vec::new();
    for name in ["1abc", "a.b", long.as_str(), "9", "agent.team-a"] {
        let obj: kube::api::DynamicObject =
            serde_json::from_value(agent_manifest(name, json!({}))).unwrap();
        match api.create(&Default::default(), &obj).await {
            Ok(_) => failures.push(format!("{name}: accepted")),
            Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains("metadata.name") => {
                // Agentry's rule, not only the apiserver's own name check.
                assert!(s.message.contains("DNS-1035"), "{name}: {}", s.message);
                assert!(agentry::crd::validate_name(name).is_err(), "{name}");
            }
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for name in ["a", "summarizer-2", &"b".repeat(63)] {
        create_agent(&client, &ns.name, agent_manifest(name, json!({})))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(agentry::crd::validate_name(name), Ok(()));
    }
}

#[tokio::test]
async fn an_agent_may_read_its_own_identity_through_env() {
    let (client, ns) = setup("crd-own-identity").await;
    let m = agent_manifest(
        "own",
        json!({"spec": {"template": {"image": "i", "env": [{"name": "T",
            "valueFrom": {"secretKeyRef": {"name": "own-identity", "key": "token"}}}]}}}),
    );
    let created = create_agent(&client, &ns.name, m).await.unwrap();
    assert_eq!(
        agentry::crd::validate_env_refs("own", &created.spec),
        Ok(())
    );
    assert!(agentry::crd::validate_env_refs("other", &created.spec).is_err());
}

/// The apiserver (CEL `quantity()`) and the controller (`units::parse_quantity`) agree on the cap,
/// whichever way the quantity is written.
#[tokio::test]
async fn the_apiserver_and_the_controller_agree_on_memory() {
    let (client, ns) = setup("crd-quantity").await;
    let cases = [
        ("536870912", true),
        ("5e8", true),
        ("5E8", true),
        ("0.5Gi", true),
        ("+256Mi", true),
        ("524288Ki", true),
        ("1E8", true),
        ("536870911.5", true),
        ("16777216", true),
        ("512.1Mi", false),
        ("6e8", false),
        ("536870912.001", false),
        ("16777215.5", false),
        ("-256Mi", false),
        ("1e30", false),
        ("0.5e-3", false),
        ("Mi", false),
        ("Pi", false),
        (".", false),
    ];
    let mut failures = Vec::new();
    for (i, (memory, accepted)) in cases.into_iter().enumerate() {
        let manifest = agent_manifest(
            &format!("q{i}"),
            json!({"spec": {"resources": {"memory": memory}}}),
        );
        let spec: agentry::crd::AgentSpec =
            serde_json::from_value(manifest["spec"].clone()).unwrap();
        let controller = spec.validate().is_ok();
        let apiserver = create_agent(&client, &ns.name, manifest).await.is_ok();
        if apiserver != accepted || controller != accepted {
            failures.push(format!(
                "{memory}: want accepted={accepted}, apiserver {apiserver}, controller {controller}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn memory_cannot_be_raised_above_the_cap_by_an_update() {
    let (client, ns) = setup("crd-update").await;
    create_agent(&client, &ns.name, agent_manifest("a", json!({})))
        .await
        .unwrap();
    let api = Api::<Agent>::namespaced(client.clone(), &ns.name);
    let err = api
        .patch(
            "a",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"resources": {"memory": "2Gi"}}})),
        )
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 422);
            assert!(s.message.contains("spec.resources.memory"), "{}", s.message);
            assert!(s.message.contains("512Mi"), "{}", s.message);
        }
        e => panic!("unexpected {e}"),
    }
    assert_eq!(api.get("a").await.unwrap().spec.resources.memory, "384Mi");
}
