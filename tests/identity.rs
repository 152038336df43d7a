//! Identity end to end: certificates checked by openssl, tokens by PyJWT against the published
//! JWKS, renewal with short lifetimes, revocation onto the CRL, and crash safety of issuance.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use agentry::crd::Agent;
use agentry::identity::ca::leaf_facts;
use agentry::identity::store::{CertState, Ledger};

async fn secret_data(client: &Client, ns: &str, name: &str) -> Option<SecretData> {
    let s = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .ok()??;
    let data = s.data?;
    let get = |k: &str| String::from_utf8(data.get(k)?.0.clone()).ok();
    Some((
        get("tls.crt")?,
        get("tls.key")?,
        get("ca.crt")?,
        get("token")?,
    ))
}

async fn configmap(client: &Client, ns: &str, name: &str, key: &str) -> String {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap()
        .data
        .unwrap()
        .remove(key)
        .unwrap()
}

type SecretData = (String, String, String, String);

/// Polls the identity Secret until `pick` differs from `old`; returns the new value.
async fn wait_secret_change(
    client: &Client,
    ns: &str,
    name: &str,
    pick: impl Fn(&SecretData) -> String,
    old: &str,
    timeout: Duration,
) -> String {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(d) = secret_data(client, ns, name).await {
            let v = pick(&d);
            if v != old {
                return v;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{ns}/{name} did not change within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn write(dir: &Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p.to_str().unwrap().to_string()
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The Python with PyJWT: `make test` sets AGENTRY_PYTHON to a venv it creates.
fn python() -> String {
    std::env::var("AGENTRY_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[tokio::test]
async fn certificate_and_token_verify_with_openssl_and_pyjwt() {
    let (client, ns) = setup("id-verify").await;
    let controller = ControllerProcess::start(ControllerOptions::new(&ns.name));
    let agent = create_and_wait(
        &client,
        &ns.name,
        "summarizer",
        Duration::from_secs(30),
        "identity issued",
        identity_issued,
    )
    .await;

    let (crt, key, ca, token) = secret_data(&client, &ns.name, "summarizer-identity")
        .await
        .expect("identity Secret");
    let dir = tempfile::tempdir().unwrap();
    let crt_path = write(dir.path(), "tls.crt", &crt);
    let ca_path = write(dir.path(), "ca.crt", &ca);

    // openssl: chains to the CA, with exactly the extensions we chose.
    let (ok, out) = run("openssl", &["verify", "-CAfile", &ca_path, &crt_path]);
    assert!(ok, "openssl verify failed: {out}");
    let (ok, out) = run(
        "openssl",
        &[
            "verify",
            "-purpose",
            "sslclient",
            "-CAfile",
            &ca_path,
            &crt_path,
        ],
    );
    assert!(ok, "not valid for client auth: {out}");
    let (ok, text) = run("openssl", &["x509", "-in", &crt_path, "-noout", "-text"]);
    assert!(ok);
    let spiffe = format!("spiffe://cluster.local/ns/{}/agent/summarizer", ns.name);
    let sans = text
        .split("Subject Alternative Name:")
        .nth(1)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(
        sans,
        format!(
            "URI:{spiffe}, DNS:summarizer.{0}.svc, DNS:summarizer.{0}.svc.cluster.local",
            ns.name
        )
    );
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(
        text.contains("TLS Web Client Authentication, TLS Web Server Authentication"),
        "{text}"
    );
    let ku = text
        .split("X509v3 Key Usage:")
        .nth(1)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(ku, "Digital Signature");
    assert!(
        text.contains("X509v3 Authority Key Identifier")
            && text.contains("X509v3 Subject Key Identifier")
    );
    assert!(
        text.contains("ASN1 OID: prime256v1"),
        "P-256 key expected: {text}"
    );
    let facts = leaf_facts(&crt).unwrap();
    assert_eq!(
        facts.not_after - facts.not_before,
        24 * 3600 + 300,
        "24h + 5m backdate"
    );
    assert!(facts.serial.len() >= 16, "serial has at least 64 bits");
    assert!(key.contains("BEGIN PRIVATE KEY"));

    // PyJWT: the token verifies against the published JWKS and is bound to the certificate.
    let jwks = configmap(&client, &ns.name, "agentry-jwks", "jwks.json").await;
    let jwks_path = write(dir.path(), "jwks.json", &jwks);
    let token_path = write(dir.path(), "token", &token);
    let issuer = format!("https://agentry.{}.svc", ns.name);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/verify_jwt.py");
    let (ok, out) = run(
        &python(),
        &[
            script,
            &jwks_path,
            &token_path,
            &crt_path,
            &issuer,
            "agentry",
        ],
    );
    assert!(ok, "PyJWT rejected the token: {out}");
    let claims: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(claims["sub"], spiffe);
    assert_eq!(claims["scope"], "backup:write memory:read");
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        3600
    );
    // ... and PyJWT refuses it for another audience, or with another certificate.
    let (ok, _) = run(
        &python(),
        &[
            script,
            &jwks_path,
            &token_path,
            &crt_path,
            &issuer,
            "someone-else",
        ],
    );
    assert!(!ok);
    let other = write(dir.path(), "other.crt", &ca);
    let (ok, _) = run(
        &python(),
        &[script, &jwks_path, &token_path, &other, &issuer, "agentry"],
    );
    assert!(!ok);

    // Status tells where things are, and holds no secret material.
    let status = agent.status.as_ref().unwrap();
    let identity = status.identity.as_ref().unwrap();
    assert_eq!(identity.spiffe_id, spiffe);
    assert_eq!(identity.serial, facts.serial);
    assert_eq!(identity.secret_name, "summarizer-identity");
    assert!(identity.renewal_time.is_some() && identity.token_expires_at.is_some());
    let status_json = serde_json::to_string(status).unwrap();
    assert!(!status_json.contains("PRIVATE KEY") && !status_json.contains(&token));

    // The CA bundle is published, and the ledger has the serial, active, 0600.
    assert_eq!(
        configmap(&client, &ns.name, "agentry-ca", "ca.crt").await,
        ca
    );
    let ledger_path =
        agentry::identity::store::ledger_dir(&controller.data_dir()).join("ledger.db");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&ledger_path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let ledger = Ledger::open(&controller.data_dir()).unwrap();
    let row = ledger
        .get(&facts.serial)
        .unwrap()
        .expect("serial in ledger");
    assert_eq!(row.state, CertState::Active);
    assert_eq!(row.spiffe_id, spiffe);

    // No key material or tokens in the logs.
    let logs = controller.logs();
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(
        !logs.contains("PRIVATE KEY")
            && !logs.contains(&key_body[..40])
            && !logs.contains(&token[..60])
    );
    assert!(logs.contains(&facts.serial), "issuance is logged by serial");
}

#[tokio::test]
async fn short_lifetimes_renew_before_expiry() {
    let (client, ns) = setup("id-renew").await;
    // 1h/120 = 30s certificates (renewed at 20s), 20m/120 = 10s tokens (refreshed at 8s: two
    // seconds of margin, which holds on a loaded two-core machine).
    let mut opts = ControllerOptions::new(&ns.name);
    opts.extra_args = vec!["--ttl-divisor".into(), "120".into()];
    let controller = ControllerProcess::start(opts);
    let m = agent_manifest(
        "fast",
        json!({"spec": {"identity": {"certificateTTL": "1h", "tokenTTL": "20m"}}}),
    );
    create_agent(&client, &ns.name, m).await.unwrap();
    wait_agent(
        &client,
        &ns.name,
        "fast",
        Duration::from_secs(30),
        "identity issued",
        identity_issued,
    )
    .await;
    let (crt0, _, _, token0) = secret_data(&client, &ns.name, "fast-identity")
        .await
        .unwrap();
    let facts0 = leaf_facts(&crt0).unwrap();
    let token_exp0 = agentry::identity::jwt::peek_claims(&token0).unwrap().exp as i64;

    // The token is replaced before it expires.
    let token1 = wait_secret_change(
        &client,
        &ns.name,
        "fast-identity",
        |d| d.3.clone(),
        &token0,
        Duration::from_secs(25),
    )
    .await;
    assert_ne!(token1, token0);
    // Minted before the old one expired (judged by the new token's own iat, not by when this
    // test happened to look).
    let iat1 = agentry::identity::jwt::peek_claims(&token1).unwrap().iat as i64;
    assert!(iat1 < token_exp0, "token refreshed only after it expired");

    // The certificate is replaced before it expires, and the old one is superseded in the ledger.
    let crt1 = wait_secret_change(
        &client,
        &ns.name,
        "fast-identity",
        |d| d.0.clone(),
        &crt0,
        Duration::from_secs(40),
    )
    .await;
    let issued1 = leaf_facts(&crt1).unwrap().not_before + 300; // notBefore is backdated 5 minutes
    assert!(
        issued1 < facts0.not_after,
        "certificate renewed only after it expired"
    );
    let facts1 = leaf_facts(&crt1).unwrap();
    assert_ne!(facts1.serial, facts0.serial);
    let ledger = Ledger::open(&controller.data_dir()).unwrap();
    assert_eq!(
        ledger.get(&facts0.serial).unwrap().unwrap().state,
        CertState::Superseded
    );
    assert_eq!(
        ledger.get(&facts1.serial).unwrap().unwrap().state,
        CertState::Active
    );
    // Status follows.
    wait_agent(
        &client,
        &ns.name,
        "fast",
        Duration::from_secs(10),
        "status shows the new serial",
        |a| {
            a.status
                .as_ref()
                .and_then(|s| s.identity.as_ref())
                .is_some_and(|i| i.serial == facts1.serial)
        },
    )
    .await;
}

/// The controller refuses a CRL too large for its ConfigMap itself (nothing half-written; see
/// `authority::tests::a_crl_too_large_for_its_configmap_is_not_half_published`). Its limit must
/// be the apiserver's: a ConfigMap of exactly that many bytes is stored, one byte more refused.
#[tokio::test]
async fn the_configmap_limit_the_crl_is_held_to_is_the_apiservers() {
    use agentry::identity::authority::CONFIGMAP_MAX_BYTES;
    let (client, ns) = setup("id-cm-limit").await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let sized = |name: &str, bytes: usize| -> ConfigMap {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            // The trust bundle and the CRL, as the controller publishes them.
            "data": {"ca.crt": "c".repeat(1000), "crl.pem": "x".repeat(bytes - 1000)}
        }))
        .unwrap()
    };
    api.create(&Default::default(), &sized("fits", CONFIGMAP_MAX_BYTES))
        .await
        .expect("a ConfigMap of exactly the limit is stored");
    let refused = api
        .create(
            &Default::default(),
            &sized("too-big", CONFIGMAP_MAX_BYTES + 1),
        )
        .await
        .expect_err("one byte over the limit is refused");
    assert!(
        matches!(&refused, kube::Error::Api(e) if e.code == 422),
        "refused as invalid: {refused}"
    );
}

/// A controller over a fresh namespace, and its Agent "victim" once its identity is issued:
/// the certificate's serial.
async fn issued_victim(prefix: &str) -> (Client, TestNamespace, ControllerProcess, String) {
    let (client, ns) = setup(prefix).await;
    let controller = ControllerProcess::start(ControllerOptions::new(&ns.name));
    let agent = create_and_wait(
        &client,
        &ns.name,
        "victim",
        Duration::from_secs(30),
        "identity issued",
        identity_issued,
    )
    .await;
    let serial = agent.status.unwrap().identity.unwrap().serial;
    (client, ns, controller, serial)
}

#[tokio::test]
async fn revocation_by_annotation_and_by_deletion_lands_on_the_crl() {
    let (client, ns, _controller, first) = issued_victim("id-revoke").await;

    // Annotate: the certificate is revoked, a new one issued, the annotation cleared.
    let api: Api<Agent> = Api::namespaced(client.clone(), &ns.name);
    api.patch(
        "victim",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"metadata": {"annotations": {"agentry.dev/revoke": "keyCompromise"}}}),
        ),
    )
    .await
    .unwrap();
    let agent = wait_agent(
        &client,
        &ns.name,
        "victim",
        Duration::from_secs(30),
        "re-issued after revocation",
        |a| {
            a.status
                .as_ref()
                .and_then(|s| s.identity.as_ref())
                .is_some_and(|i| i.serial != first)
                && !a
                    .metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|m| m.contains_key("agentry.dev/revoke"))
        },
    )
    .await;
    let second = agent.status.unwrap().identity.unwrap().serial;
    let crl = configmap(&client, &ns.name, "agentry-ca", "crl.pem").await;
    let listed = crl_serials(&crl);
    assert!(
        listed.contains(&first) && !listed.contains(&second),
        "CRL: {listed:?}"
    );

    // openssl with CRL checking refuses the revoked certificate... (the Secret now holds the
    // new one, so rebuild the old one's check from the CRL's own view: the serial is listed)
    let (crt, _, ca, _) = secret_data(&client, &ns.name, "victim-identity")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = run(
        "openssl",
        &[
            "verify",
            "-crl_check",
            "-CAfile",
            &write(dir.path(), "ca.crt", &ca),
            "-CRLfile",
            &write(dir.path(), "crl.pem", &crl),
            &write(dir.path(), "tls.crt", &crt),
        ],
    );
    assert!(ok, "the new certificate must pass a CRL check: {out}");

    // Delete: the current certificate joins the CRL within one reconcile.
    api.delete("victim", &DeleteParams::default())
        .await
        .unwrap();
    eventually_ok(Duration::from_secs(30), "agent gone", || async {
        Ok::<bool, kube::Error>(api.get_opt("victim").await?.is_none())
    })
    .await;
    let crl = configmap(&client, &ns.name, "agentry-ca", "crl.pem").await;
    assert!(crl_serials(&crl).contains(&second));
    let (ok, out) = run(
        "openssl",
        &[
            "verify",
            "-crl_check",
            "-CAfile",
            &write(dir.path(), "ca.crt", &ca),
            "-CRLfile",
            &write(dir.path(), "crl2.pem", &crl),
            &write(dir.path(), "tls.crt", &crt),
        ],
    );
    assert!(
        !ok && out.contains("revoked"),
        "a deleted agent's certificate must fail a CRL check: {out}"
    );
}

/// A deletion whose CRL cannot be published keeps the Agent's finalizer until a CRL listing
/// its certificate is: the retry, which finds nothing left to revoke (the revocation was
/// committed on the failed try), still publishes. Before, it took the finalizer off and the
/// revocation stayed off the CRL until the daily re-signing. The publish is refused by an
/// admission policy on the CA ConfigMap, as in a namespace being deleted.
#[tokio::test]
async fn a_deletion_waits_until_its_revocation_is_published() {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    let (client, ns, _controller, serial) = issued_victim("id-unpublished").await;

    // Every write of this namespace's CA ConfigMap refused.
    let name = format!("{}-freeze-ca", ns.name);
    let policy: ValidatingAdmissionPolicy = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [""], "apiVersions": ["v1"],
                "operations": ["CREATE", "UPDATE"], "resources": ["configmaps"]
            }]},
            "matchConditions": [{"name": "the-ca", "expression": "request.name == 'agentry-ca'"}],
            "validations": [{"expression": "false", "message": "frozen by the test"}]
        }
    }))
    .unwrap();
    let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name}}}
        }
    }))
    .unwrap();
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());
    policies.create(&Default::default(), &policy).await.unwrap();
    bindings
        .create(&Default::default(), &binding)
        .await
        .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    eventually_ok(Duration::from_secs(30), "the policy enforced", || async {
        let probe = json!({"metadata": {"labels": {"probe": "x"}}});
        let params = PatchParams {
            dry_run: true,
            ..Default::default()
        };
        // Refused by the policy (the ConfigMap exists: the controller published at start).
        Ok::<bool, kube::Error>(matches!(
            cms.patch("agentry-ca", &params, &Patch::Merge(&probe)).await,
            Err(kube::Error::Api(e)) if e.message.contains("frozen by the test")
        ))
    })
    .await;

    let api: Api<Agent> = Api::namespaced(client.clone(), &ns.name);
    api.delete("victim", &DeleteParams::default())
        .await
        .unwrap();
    // Three retries at the controller's backoff (1, 2, 4 s): the Agent stays, unpublished.
    for _ in 0..16 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            api.get_opt("victim").await.unwrap().is_some(),
            "the finalizer came off while the revocation was unpublished"
        );
    }
    let crl = configmap(&client, &ns.name, "agentry-ca", "crl.pem").await;
    assert!(
        !crl_serials(&crl).contains(&serial),
        "nothing could be published"
    );

    // Writes allowed again: the next retry publishes, then lets the Agent go.
    bindings
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    policies
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    eventually_ok(Duration::from_secs(60), "agent gone", || async {
        Ok::<bool, kube::Error>(api.get_opt("victim").await?.is_none())
    })
    .await;
    let crl = configmap(&client, &ns.name, "agentry-ca", "crl.pem").await;
    assert!(
        crl_serials(&crl).contains(&serial),
        "the deleted Agent's certificate is on the CRL"
    );
}

/// SIGKILL the controller again and again while it issues, and once (by a failpoint) exactly
/// between a ledger commit and the Secret write: no Secret may ever hold a certificate the ledger
/// lacks, no serial repeats, the certificate committed just before the crash survives in the
/// ledger (WAL recovery), and the issued-but-never-delivered ones are superseded, never active.
#[tokio::test]
async fn killing_the_controller_during_issuance_never_orphans_a_certificate() {
    let (client, ns) = setup("id-kill").await;
    let data = tempfile::tempdir().unwrap();
    let agents = 200; // RELIABILITY.md: 200 Agents
    for i in 0..agents {
        create_agent(
            &client,
            &ns.name,
            agent_manifest(&format!("a{i}"), json!({})),
        )
        .await
        .unwrap();
    }
    let options = |extra: Vec<String>| {
        let mut opts = ControllerOptions::new(&ns.name);
        opts.data_dir = Some(data.path());
        opts.lease_duration = "2s";
        // Same replica name each round: it resumes its own lease at once instead of waiting it out.
        opts.replica = "crashy";
        opts.extra_args = extra;
        opts
    };
    // The failpoint: abort right after the 20th commit, before that certificate is written.
    let mut crash = ControllerProcess::start_with_env(
        options(vec![]),
        &[("AGENTRY_TEST_ABORT_AFTER_COMMITS", "20")],
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while crash.child.try_wait().unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failpoint never fired:\n{}",
            crash.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = crash.logs();
    let committed = log
        .lines()
        .find_map(|l| l.strip_prefix("failpoint: aborting after committing serial "))
        .unwrap_or_else(|| panic!("no failpoint line in:\n{log}"))
        .trim()
        .to_string();
    drop(crash);
    for round in 0..5u64 {
        let mut c = ControllerProcess::start(options(vec![]));
        // Kill at a different point each round, from mid-bootstrap to mid-fleet.
        tokio::time::sleep(Duration::from_millis(300 + 450 * round)).await;
        c.kill();
    }
    // Let a final controller finish the fleet.
    let _c = ControllerProcess::start(options(vec![]));
    for i in 0..agents {
        wait_agent(
            &client,
            &ns.name,
            &format!("a{i}"),
            Duration::from_secs(180),
            "identity issued",
            identity_issued,
        )
        .await;
    }
    let ledger = Ledger::open(data.path()).unwrap();
    assert_eq!(
        ledger.durability().unwrap(),
        ("wal".to_string(), 2),
        "the ledger must run WAL with synchronous=FULL"
    );
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns.name)
        .list(&kube::api::ListParams::default().labels("agentry.dev/agent"))
        .await
        .unwrap();
    assert_eq!(secrets.items.len(), agents);
    let mut serials = HashSet::new();
    for s in &secrets.items {
        let crt = String::from_utf8(s.data.as_ref().unwrap()["tls.crt"].0.clone()).unwrap();
        let serial = leaf_facts(&crt).unwrap().serial;
        let row = ledger.get(&serial).unwrap();
        assert!(
            row.is_some_and(|r| r.state == CertState::Active),
            "Secret {:?} holds certificate {serial} that the ledger lacks or does not list as active",
            s.metadata.name
        );
        assert!(serials.insert(serial), "duplicate serial");
    }
    // The certificate committed just before the abort survived the crash (the WAL the killed
    // process left was recovered), was never delivered, and is not active.
    let row = ledger.get(&committed).unwrap().unwrap_or_else(|| {
        panic!("serial {committed}, committed before the crash, is not in the ledger")
    });
    assert!(
        !serials.contains(&committed),
        "an aborted delivery reached a Secret"
    );
    assert_eq!(row.state, CertState::Superseded);
    // Every other issued-but-undelivered certificate is superseded too: none is active.
    assert!(
        ledger.count().unwrap() > agents,
        "at least the failpoint's certificate was never delivered"
    );
}

/// `agentry ca rotate`: prepare (both CAs trusted) -> activate (new CA signs, leaves re-issued)
/// -> retire (old CA gone), with every agent's Secret following along.
#[tokio::test]
async fn ca_rotation_prepares_activates_reissues_and_retires() {
    let (client, ns) = setup("id-rotate").await;
    let mut opts = ControllerOptions::new(&ns.name);
    opts.extra_args = [
        "--ca-rotation-overlap",
        "3s",
        "--maintenance-interval",
        "1s",
    ]
    .map(String::from)
    .to_vec();
    let _controller = ControllerProcess::start(opts);
    for name in ["r1", "r2"] {
        create_agent(&client, &ns.name, agent_manifest(name, json!({})))
            .await
            .unwrap();
    }
    for name in ["r1", "r2"] {
        wait_agent(
            &client,
            &ns.name,
            name,
            Duration::from_secs(30),
            "identity issued",
            identity_issued,
        )
        .await;
    }
    let (crt_old, _, bundle_old, _) = secret_data(&client, &ns.name, "r1-identity").await.unwrap();
    assert_eq!(bundle_old.matches("BEGIN CERTIFICATE").count(), 1);
    let old_ca_der = agentry::identity::ca::pem_to_der(&bundle_old).unwrap();

    let rotate = Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args(["ca", "rotate", "--namespace", &ns.name])
        .output()
        .unwrap();
    assert!(
        rotate.status.success(),
        "{}",
        String::from_utf8_lossy(&rotate.stderr)
    );
    assert!(String::from_utf8_lossy(&rotate.stdout).contains("rotation requested"));

    // Prepared: agents trust both CAs while the old one still signs.
    let bundle2 = wait_secret_change(
        &client,
        &ns.name,
        "r1-identity",
        |d| d.2.clone(),
        &bundle_old,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        bundle2.matches("BEGIN CERTIFICATE").count(),
        2,
        "bundle during the overlap"
    );
    // Activated: r1 gets a certificate from the new CA, verifiable with the bundle.
    let crt_new = wait_secret_change(
        &client,
        &ns.name,
        "r1-identity",
        |d| d.0.clone(),
        &crt_old,
        Duration::from_secs(30),
    )
    .await;
    let facts_old = leaf_facts(&crt_old).unwrap();
    let facts_new = leaf_facts(&crt_new).unwrap();
    assert_ne!(
        facts_new.authority_key_id, facts_old.authority_key_id,
        "re-issued by the new CA"
    );
    // Retired: the bundle shrinks to the new CA alone, in the agents' Secrets and the ConfigMap.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, _, b, _) = secret_data(&client, &ns.name, "r2-identity").await.unwrap();
        if b.matches("BEGIN CERTIFICATE").count() == 1
            && agentry::identity::ca::pem_to_der(&b).unwrap() != old_ca_der
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "old CA not retired; bundle now:\n{b}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (crt, _, bundle, token) = secret_data(&client, &ns.name, "r2-identity").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = run(
        "openssl",
        &[
            "verify",
            "-CAfile",
            &write(dir.path(), "ca.crt", &bundle),
            &write(dir.path(), "tls.crt", &crt),
        ],
    );
    assert!(ok, "r2's certificate must chain to the new CA: {out}");
    let (ok, _) = run(
        "openssl",
        &[
            "verify",
            "-CAfile",
            &write(dir.path(), "old.crt", &bundle_old),
            &write(dir.path(), "tls2.crt", &crt),
        ],
    );
    assert!(!ok, "the new certificate must not chain to the retired CA");
    assert_eq!(
        configmap(&client, &ns.name, "agentry-ca", "ca.crt").await,
        bundle
    );
    // Tokens are re-bound to the new certificate.
    let claims = agentry::identity::jwt::peek_claims(&token).unwrap();
    let der = agentry::identity::ca::pem_to_der(&crt).unwrap();
    assert_eq!(
        claims.cnf.unwrap().x5t_s256,
        agentry::identity::jwt::thumbprint(&der)
    );
    let status = Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args(["ca", "status", "--namespace", &ns.name])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("phase: idle"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
}
