//! End-to-end CA lifecycle hardening (issue 8): concurrent revocations publish CRLs in order
//! through the real ConfigMap, and an expired signing CA neither stops the controller nor is
//! replaced without being asked.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use common::*;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use agentry::crd::Agent;
use agentry::identity::authority::{CRL_PUBLISH_DELAY_ENV, crl_numbers};
use agentry::identity::ca::{CertificateAuthority, leaf_facts, pem_to_ders};

fn serial(a: &Agent) -> Option<String> {
    Some(a.status.as_ref()?.identity.as_ref()?.serial.clone())
}

async fn crl_pem(client: &Client, ns: &str) -> String {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt("agentry-ca")
        .await
        .ok()
        .flatten()
        .and_then(|cm| cm.data?.remove("crl.pem"))
        .unwrap_or_default()
}

/// Eight Agents revoked at once, with a delay between signing and publishing widening any
/// race: the CRL numbers seen in the ConfigMap never go down, and the final CRL lists every
/// revoked serial.
#[tokio::test]
async fn concurrent_revocations_publish_crls_in_order() {
    let (client, ns) = setup("ca-crl").await;
    // The child inherits it (this test binary's other test tolerates the delay too).
    unsafe { std::env::set_var(CRL_PUBLISH_DELAY_ENV, "300") };
    let _controller = ControllerProcess::start(ControllerOptions::new(&ns.name));
    let names: Vec<String> = (0..8).map(|i| format!("c{i}")).collect();
    for name in &names {
        create_agent(&client, &ns.name, agent_manifest(name, json!({})))
            .await
            .unwrap();
    }
    let mut first = Vec::new();
    for name in &names {
        let a = wait_agent(
            &client,
            &ns.name,
            name,
            Duration::from_secs(60),
            "identity issued",
            identity_issued,
        )
        .await;
        first.push(serial(&a).unwrap());
    }

    // Watch the published CRL numbers while the revocations land.
    let stop = tokio_util::sync::CancellationToken::new();
    let seen = {
        let (client, ns, stop) = (client.clone(), ns.name.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen: Vec<u64> = Vec::new();
            while !stop.is_cancelled() {
                if let Some(n) = crl_numbers(&crl_pem(&client, &ns).await).into_iter().max()
                    && seen.last() != Some(&n)
                {
                    seen.push(n);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        })
    };
    let api: Api<Agent> = Api::namespaced(client.clone(), &ns.name);
    let patch =
        Patch::Merge(json!({"metadata": {"annotations": {"agentry.dev/revoke": "keyCompromise"}}}));
    let params = PatchParams::default();
    let results =
        futures::future::join_all(names.iter().map(|name| api.patch(name, &params, &patch))).await;
    for r in results {
        r.unwrap();
    }
    let want: HashSet<String> = first.iter().cloned().collect();
    eventually(
        Duration::from_secs(60),
        "every revoked serial on the published CRL",
        || {
            let (client, ns, want) = (client.clone(), ns.name.clone(), want.clone());
            async move { want.is_subset(&crl_serials(&crl_pem(&client, &ns).await)) }
        },
    )
    .await;
    // Let any publish still in flight land, then check the order.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let seen = seen.await.unwrap();
    eprintln!("CRL numbers seen: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "published CRL numbers went backwards: {seen:?}"
    );
    assert!(want.is_subset(&crl_serials(&crl_pem(&client, &ns.name).await)));
}

/// A CA Secret whose signing CA has expired: the controller still starts and serves, says so
/// (metric, log), issues nothing, and `agentry ca rotate` replaces the CA at once.
#[tokio::test]
async fn an_expired_signing_ca_does_not_stop_the_controller_and_rotate_replaces_it() {
    let (client, ns) = setup("ca-expired").await;
    let now = time::OffsetDateTime::now_utc();
    let expired = CertificateAuthority::generate_valid(
        "agentry CA (cluster.local)",
        now - Duration::from_secs(7200),
        now - Duration::from_secs(60),
    )
    .unwrap();
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("agentry-ca".into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [
                ("tls.crt", expired.cert_pem()),
                ("tls.key", expired.key_pem()),
                ("ca.crt", expired.cert_pem()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect(),
        ),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), &ns.name)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let mut opts = ControllerOptions::new(&ns.name);
    opts.extra_args = ["--maintenance-interval", "1s"].map(String::from).to_vec();
    let controller = ControllerProcess::start(opts);
    eventually(Duration::from_secs(30), "agentry_ca_expired = 1", || {
        let c = &controller;
        async move { c.metric("agentry_ca_expired").await == Some(1.0) }
    })
    .await;
    create_agent(&client, &ns.name, agent_manifest("stuck", json!({})))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let agent = Api::<Agent>::namespaced(client.clone(), &ns.name)
        .get("stuck")
        .await
        .unwrap();
    assert!(
        !identity_issued(&agent),
        "an expired CA issued a certificate"
    );
    let logs = controller.logs();
    assert!(
        logs.contains("expired") && logs.contains("agentry ca rotate"),
        "the expiry and its recovery are logged: {logs}"
    );

    let rotate = Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args(["ca", "rotate", "--namespace", &ns.name])
        .output()
        .unwrap();
    assert!(
        rotate.status.success(),
        "{}",
        String::from_utf8_lossy(&rotate.stderr)
    );
    wait_agent(
        &client,
        &ns.name,
        "stuck",
        Duration::from_secs(60),
        "identity issued by the replacement CA",
        identity_issued,
    )
    .await;
    assert_eq!(controller.metric("agentry_ca_expired").await, Some(0.0));
    let s = Api::<Secret>::namespaced(client.clone(), &ns.name)
        .get("stuck-identity")
        .await
        .unwrap();
    let data = s.data.unwrap();
    let get = |k: &str| String::from_utf8(data[k].0.clone()).unwrap();
    let bundle = pem_to_ders(&get("ca.crt"));
    assert_eq!(bundle.len(), 1, "only the replacement CA is trusted");
    assert_ne!(bundle[0], expired.cert_der());
    let ca_data = Api::<Secret>::namespaced(client.clone(), &ns.name)
        .get("agentry-ca")
        .await
        .unwrap()
        .data
        .unwrap();
    let ca_get = |k: &str| String::from_utf8(ca_data[k].0.clone()).unwrap();
    let new_ca = CertificateAuthority::load(&ca_get("tls.crt"), &ca_get("tls.key")).unwrap();
    assert!(ca_get("tls.crt").contains(new_ca.cert_pem().trim()));
    assert_eq!(
        leaf_facts(&get("tls.crt"))
            .unwrap()
            .authority_key_id
            .as_deref(),
        new_ca.subject_key_id()
    );
}
