//! Attacks from a tenant who may write Agents and Secrets in their own namespace (issue 8):
//! each test tries one against the real controller on the local control plane.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServicePort, ServiceSpec};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use agentry::crd::Agent;
use agentry::identity::store::{CertState, Ledger};

fn serial_of(a: &Agent) -> String {
    a.status
        .as_ref()
        .and_then(|s| s.identity.as_ref())
        .map(|i| i.serial.clone())
        .unwrap_or_default()
}

async fn secret_key(client: &Client, ns: &str, name: &str, key: &str) -> Option<String> {
    let s = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .ok()??;
    String::from_utf8(s.data?.get(key)?.0.clone()).ok()
}

/// Writes keys into a Secret as a tenant would (a merge patch by another field manager).
async fn tenant_writes(client: &Client, ns: &str, name: &str, data: &[(&str, &str)]) {
    let data: serde_json::Map<String, serde_json::Value> = data
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                json!(base64::engine::general_purpose::STANDARD.encode(v)),
            )
        })
        .collect();
    Api::<Secret>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"data": data})),
        )
        .await
        .unwrap_or_else(|e| panic!("tenant write to {ns}/{name}: {e}"));
}

async fn annotate(client: &Client, ns: &str, name: &str, key: &str, value: &str) {
    Api::<Agent>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {key: value}}})),
        )
        .await
        .unwrap_or_else(|e| panic!("annotating {ns}/{name}: {e}"));
}

/// The serials on the CRLs the controller publishes in `ns`.
async fn published_crl_serials(client: &Client, ns: &str) -> HashSet<String> {
    let crl = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get("agentry-ca")
        .await
        .unwrap()
        .data
        .unwrap()
        .remove("crl.pem")
        .unwrap();
    crl_serials(&crl)
}

/// A self-signed certificate carrying `serial` (hex): anyone can make one.
fn forged_certificate(serial: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["victim.example".into()]).unwrap();
    let bytes: Vec<u8> = (0..serial.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&serial[i..i + 2], 16).unwrap())
        .collect();
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&bytes));
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn shard_label(shard: &str) -> serde_json::Value {
    json!({"metadata": {"labels": {"agentry.dev/e2e-shard": shard}}})
}

/// Agents A and B in two namespaces, one controller (cluster-wide, sharded to this test). The
/// tenant of A plants a self-signed certificate carrying B's serial in A's Secret and asks for
/// A's certificate to be revoked: B's certificate stays active and off the CRL, and A's
/// Secret gets a fresh certificate of its own.
#[tokio::test]
async fn a_planted_certificate_with_another_agents_serial_revokes_nothing() {
    let (client, home) = setup("harden-home").await;
    let tenant_a = TestNamespace::new(&client, "harden-a").await;
    let tenant_b = TestNamespace::new(&client, "harden-b").await;
    let shard = home.name.clone();
    let data = tempfile::tempdir().unwrap();
    let start = || {
        let mut opts = ControllerOptions::new(&home.name);
        opts.cluster_wide = true;
        opts.data_dir = Some(data.path());
        opts.extra_args = vec![
            "--agent-selector".into(),
            format!("agentry.dev/e2e-shard={shard}"),
        ];
        ControllerProcess::start(opts)
    };
    let mut controller = start();
    for (ns, name) in [(&tenant_a.name, "attacker"), (&tenant_b.name, "victim")] {
        create_agent(&client, ns, agent_manifest(name, shard_label(&shard)))
            .await
            .unwrap();
    }
    let wait = |ns: String, name: &'static str| {
        let client = client.clone();
        async move {
            wait_agent(
                &client,
                &ns,
                name,
                Duration::from_secs(60),
                "identity issued",
                identity_issued,
            )
            .await
        }
    };
    let victim = wait(tenant_b.name.clone(), "victim").await;
    let attacker = wait(tenant_a.name.clone(), "attacker").await;
    let victim_serial = serial_of(&victim);
    let attacker_serial = serial_of(&attacker);
    let victim_cert = secret_key(&client, &tenant_b.name, "victim-identity", "tls.crt")
        .await
        .unwrap();

    // The attack: B's serial in a self-signed certificate, in A's own Secret, then revoke A.
    // Both land while the controller is down, so its first look sees them together.
    assert_eq!(controller.terminate(), Some(0), "{}", controller.logs());
    let (cert, key) = forged_certificate(&victim_serial);
    tenant_writes(
        &client,
        &tenant_a.name,
        "attacker-identity",
        &[("tls.crt", &cert), ("tls.key", &key)],
    )
    .await;
    annotate(
        &client,
        &tenant_a.name,
        "attacker",
        "agentry.dev/revoke",
        "superseded",
    )
    .await;
    let controller = start();
    let after = wait_agent(
        &client,
        &tenant_a.name,
        "attacker",
        Duration::from_secs(60),
        "revocation handled and a new certificate issued",
        |a| {
            serial_of(a) != attacker_serial
                && serial_of(a) != victim_serial
                && !a
                    .metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|m| m.contains_key("agentry.dev/revoke"))
        },
    )
    .await;

    let ledger = Ledger::open(&controller.data_dir()).unwrap();
    let row = ledger
        .get(&victim_serial)
        .unwrap()
        .expect("victim in ledger");
    assert_eq!(
        row.state,
        CertState::Active,
        "the victim's certificate must stay active; controller log:\n{}",
        controller.logs()
    );
    let crl = published_crl_serials(&client, &home.name).await;
    assert!(!crl.contains(&victim_serial), "victim revoked: {crl:?}");
    // What A really had is revoked; the forged certificate was not kept.
    assert!(crl.contains(&attacker_serial), "CRL: {crl:?}");
    let planted = secret_key(&client, &tenant_a.name, "attacker-identity", "tls.crt")
        .await
        .unwrap();
    assert_ne!(planted, cert, "the forged certificate must be replaced");
    assert_eq!(
        agentry::identity::ca::leaf_facts(&planted).unwrap().serial,
        serial_of(&after)
    );
    // One request, one new certificate: a cached copy of the Agent that still shows the
    // (already cleared) request must not revoke and re-issue a second time.
    let attackers: i64 = rusqlite::Connection::open(controller.data_dir().join("ledger/ledger.db"))
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM certificates WHERE namespace = ?1",
            [&tenant_a.name],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        attackers,
        2,
        "the attacker's first certificate and exactly one re-issue; controller log:\n{}",
        controller.logs()
    );
    // B is untouched.
    assert_eq!(
        secret_key(&client, &tenant_b.name, "victim-identity", "tls.crt")
            .await
            .unwrap(),
        victim_cert
    );
    assert_eq!(
        serial_of(
            &Api::<Agent>::namespaced(client.clone(), &tenant_b.name)
                .get("victim")
                .await
                .unwrap()
        ),
        victim_serial
    );
}

/// A tenant copies its own token with `exp < iat` (signature unchanged), then absurd and
/// garbage values, into its Secret: the controller never panics, replaces the token with a
/// valid one, and goes on reconciling other Agents.
#[tokio::test]
async fn hostile_tokens_in_the_secret_never_panic_the_controller() {
    let (client, ns) = setup("harden-token").await;
    let mut controller = ControllerProcess::start(ControllerOptions::new(&ns.name));
    create_and_wait(
        &client,
        &ns.name,
        "tenant",
        Duration::from_secs(60),
        "identity issued",
        identity_issued,
    )
    .await;
    let token = secret_key(&client, &ns.name, "tenant-identity", "token")
        .await
        .unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    let iat = claims["iat"].as_u64().unwrap();
    let with = |claims: &serde_json::Value| {
        format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap()),
            parts[2]
        )
    };
    claims["exp"] = json!(iat - 100);
    let exp_before_iat = with(&claims);
    claims["iat"] = json!(u64::MAX);
    claims["exp"] = json!(0);
    let absurd = with(&claims);
    claims["exp"] = json!(-5);
    let negative = with(&claims);
    for hostile in [
        exp_before_iat.as_str(),
        absurd.as_str(),
        negative.as_str(),
        "garbage",
        "a.b.c",
        "",
    ] {
        tenant_writes(&client, &ns.name, "tenant-identity", &[("token", hostile)]).await;
        // Nudge a reconcile (the Secret watch also triggers one).
        annotate(
            &client,
            &ns.name,
            "tenant",
            "e2e/nudge",
            &rand::random::<u32>().to_string(),
        )
        .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let replaced = loop {
            let t = secret_key(&client, &ns.name, "tenant-identity", "token").await;
            if let Some(t) = t.filter(|t| t != hostile && t.split('.').count() == 3) {
                break t;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "token {hostile:?} not replaced within 30s; log:\n{}",
                controller.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(
            controller.child.try_wait().unwrap().is_none(),
            "the controller exited after token {hostile:?}; log:\n{}",
            controller.logs()
        );
        let claims = agentry::identity::jwt::peek_claims(&replaced).unwrap();
        assert!(claims.exp > claims.iat, "a fresh, sane token");
    }
    // Still reconciling everyone else.
    create_and_wait(
        &client,
        &ns.name,
        "bystander",
        Duration::from_secs(60),
        "identity issued",
        identity_issued,
    )
    .await;
    assert!(controller.child.try_wait().unwrap().is_none());
    assert!(
        !controller.logs().contains("panicked"),
        "{}",
        controller.logs()
    );
}

fn name_conflict(a: &Agent, type_: &str, object: &str) -> bool {
    condition(a, type_).is_some_and(|c| {
        c.status == "False" && c.reason == "NameConflict" && c.message.contains(object)
    }) && condition(a, "Ready").is_some_and(|c| c.status == "False")
}

/// Objects that exist before an Agent of the same name are never taken over: the Agent says
/// NameConflict, the object keeps its content, and nothing is issued for it. Once the
/// conflicting object is gone, the Agent proceeds.
#[tokio::test]
async fn an_agent_takes_over_nothing_it_did_not_create() {
    let (client, ns) = setup("harden-adopt").await;
    let controller = ControllerProcess::start(ControllerOptions::new(&ns.name));
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    let theirs = Service {
        metadata: ObjectMeta {
            name: Some("foo".into()),
            labels: Some([("app".to_string(), "theirs".to_string())].into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some([("app".to_string(), "theirs".to_string())].into()),
            ports: Some(vec![ServicePort {
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let before = services
        .create(&PostParams::default(), &theirs)
        .await
        .unwrap();
    create_agent(&client, &ns.name, agent_manifest("foo", json!({})))
        .await
        .unwrap();
    let agent = wait_agent(
        &client,
        &ns.name,
        "foo",
        Duration::from_secs(60),
        "WorkloadReady=False NameConflict naming Service foo",
        |a| name_conflict(a, "WorkloadReady", "Service foo"),
    )
    .await;
    assert_ne!(
        agent.status.unwrap().phase,
        Some(agentry::crd::Phase::Ready)
    );
    let after = services.get("foo").await.unwrap();
    assert_eq!(
        after.metadata.resource_version, before.metadata.resource_version,
        "the Service was modified"
    );
    assert!(after.metadata.owner_references.is_none());

    // A Secret named like the identity Secret: nothing is issued at all.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("bar-identity".into()),
            ..Default::default()
        },
        data: Some([("password".to_string(), ByteString(b"hunter2".to_vec()))].into()),
        ..Default::default()
    };
    let secret_before = secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let bar = create_agent(&client, &ns.name, agent_manifest("bar", json!({})))
        .await
        .unwrap();
    wait_agent(
        &client,
        &ns.name,
        "bar",
        Duration::from_secs(60),
        "CertificateIssued=False NameConflict naming Secret bar-identity",
        |a| name_conflict(a, "CertificateIssued", "Secret bar-identity"),
    )
    .await;
    let secret_after = secrets.get("bar-identity").await.unwrap();
    assert_eq!(
        secret_after.metadata.resource_version,
        secret_before.metadata.resource_version
    );
    assert_eq!(secret_after.data, secret.data);
    let ledger = Ledger::open(&controller.data_dir()).unwrap();
    let key = agentry::identity::store::AgentKey::of(&bar.metadata).unwrap();
    assert_eq!(
        ledger
            .revoke_agent_serials(
                &key,
                agentry::identity::store::RevocationReason::Unspecified,
                0
            )
            .unwrap(),
        Vec::<String>::new(),
        "a certificate was issued for an Agent whose Secret name is taken"
    );

    // The conflict resolved, the Agent proceeds.
    services.delete("foo", &Default::default()).await.unwrap();
    wait_agent(
        &client,
        &ns.name,
        "foo",
        Duration::from_secs(90),
        "Ready after the conflicting Service is gone",
        |a| condition(a, "Ready").is_some_and(|c| c.status == "True"),
    )
    .await;
}

/// `keyCompromise` revokes every unexpired certificate the Agent had, superseded ones too.
#[tokio::test]
async fn key_compromise_revokes_superseded_certificates_too() {
    let (client, ns) = setup("harden-keycomp").await;
    let _controller = ControllerProcess::start(ControllerOptions::new(&ns.name));
    let first = create_and_wait(
        &client,
        &ns.name,
        "leaky",
        Duration::from_secs(60),
        "identity issued",
        identity_issued,
    )
    .await;
    let first = serial_of(&first);
    // A TTL change re-issues: the first certificate is superseded, still valid.
    Api::<Agent>::namespaced(client.clone(), &ns.name)
        .patch(
            "leaky",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"identity": {"certificateTTL": "25h"}}})),
        )
        .await
        .unwrap();
    let second = wait_agent(
        &client,
        &ns.name,
        "leaky",
        Duration::from_secs(60),
        "re-issued",
        |a| !serial_of(a).is_empty() && serial_of(a) != first,
    )
    .await;
    let second = serial_of(&second);
    annotate(
        &client,
        &ns.name,
        "leaky",
        "agentry.dev/revoke",
        "keyCompromise",
    )
    .await;
    let third = wait_agent(
        &client,
        &ns.name,
        "leaky",
        Duration::from_secs(60),
        "re-issued after keyCompromise",
        |a| serial_of(a) != second && serial_of(a) != first && !serial_of(a).is_empty(),
    )
    .await;
    let third = serial_of(&third);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let crl = loop {
        let crl = published_crl_serials(&client, &ns.name).await;
        if crl.contains(&first) && crl.contains(&second) {
            break crl;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "superseded {first} and active {second} must both be on the CRL: {crl:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!crl.contains(&third), "the new certificate is valid");
}

/// A namespace's policy decides which permissions its Agents may hold: without the annotation
/// only backup:write and memory:read; a refused scope is Ready=False PermissionDenied with
/// nothing issued, and widening the policy lets the Agent proceed.
#[tokio::test]
async fn permissions_outside_the_namespace_policy_are_refused() {
    let (client, ns) = setup("harden-scope").await;
    let _controller = ControllerProcess::start(ControllerOptions::new(&ns.name));
    create_agent(
        &client,
        &ns.name,
        agent_manifest(
            "greedy",
            json!({"spec": {"permissions": ["memory:read", "messages:send"]}}),
        ),
    )
    .await
    .unwrap();
    let agent = wait_agent(
        &client,
        &ns.name,
        "greedy",
        Duration::from_secs(60),
        "Ready=False PermissionDenied",
        |a| {
            condition(a, "Ready").is_some_and(|c| {
                c.status == "False"
                    && c.reason == "PermissionDenied"
                    && c.message.contains("messages:send")
            })
        },
    )
    .await;
    assert!(agent.status.unwrap().identity.is_none());
    assert!(
        secret_key(&client, &ns.name, "greedy-identity", "token")
            .await
            .is_none(),
        "nothing may be issued for refused permissions"
    );
    // The cluster operator widens the namespace's policy: the Agent proceeds by itself.
    Api::<Namespace>::all(client.clone())
        .patch(
            &ns.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                "agentry.dev/allowed-permissions": "memory:read, messages:send"
            }}})),
        )
        .await
        .unwrap();
    let agent = wait_agent(
        &client,
        &ns.name,
        "greedy",
        Duration::from_secs(60),
        "identity issued once the policy allows it",
        identity_issued,
    )
    .await;
    let token = secret_key(&client, &ns.name, "greedy-identity", "token")
        .await
        .unwrap();
    let claims = agentry::identity::jwt::peek_claims(&token).unwrap();
    assert_eq!(claims.scope, "memory:read messages:send");
    assert!(agent.status.unwrap().identity.is_some());
}
