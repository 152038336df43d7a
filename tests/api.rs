//! The agent API end to end, over real TLS against the controller on the local control plane:
//! registration with the right certificate and token, and a 401/403 that changes nothing for
//! every wrong one; tokens, own records, discovery, A2A cards (checked by the A2A Python SDK),
//! CSR bootstrap through TokenReview, the public trust endpoints, bad input, and failover.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use agentry::crd::Agent;
use agentry::identity::jwt::{Claims, SigningKey, TokenIssuer, peek_claims};
use agentry::identity::store::Ledger;

const CONTROLLER_NS_NOTE: &str = "the test namespace doubles as the controller's namespace";

fn register_body(ns: &str, name: &str, caps: &[&str]) -> Value {
    json!({
        "id": format!("{ns}/{name}"),
        "capabilities": caps,
        "backup_prefs": {"schedule": "0 */6 * * *", "paths": ["/data"], "retention": {"keepLast": 3}}
    })
}

async fn post_json(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let mut req = http.post(url).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e:?}"));
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn agent_with(name: &str, caps: &[&str], perms: &[&str]) -> Value {
    agent_manifest(
        name,
        json!({"spec": {"capabilities": caps, "permissions": perms}}),
    )
}

async fn registration(client: &Client, ns: &str, name: &str) -> Option<Value> {
    let a = Api::<Agent>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap();
    a.status
        .and_then(|s| s.registration)
        .map(|r| serde_json::to_value(r).unwrap())
}

/// A token with the real signing key but chosen claims (expired, another audience...).
async fn forge(client: &Client, ns: &str, claims: &Claims) -> String {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get("agentry-token-signing")
        .await
        .unwrap();
    let data = secret.data.unwrap();
    let pem = data
        .iter()
        .find(|(k, _)| k.ends_with(".pem"))
        .map(|(_, v)| String::from_utf8(v.0.clone()).unwrap())
        .unwrap();
    let key = SigningKey::from_pem(&pem, 0).unwrap();
    TokenIssuer::new(claims.iss.clone(), claims.aud.clone(), vec![key])
        .unwrap()
        .sign(claims)
        .unwrap()
}

/// A certificate and key from a CA that is not ours, for the same SPIFFE ID.
fn foreign_identity(spiffe: &str) -> (String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Agentry CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(spiffe.try_into().unwrap())];
    let _ = ca;
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// An expired leaf signed by OUR CA key (read from the CA Secret, as an attacker with a stolen
/// old certificate would hold one).
async fn expired_identity(client: &Client, ns: &str, spiffe: &str) -> (String, String) {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get("agentry-ca")
        .await
        .unwrap();
    let data = secret.data.unwrap();
    let text = |k: &str| String::from_utf8(data[k].0.clone()).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&text("tls.key")).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&text("tls.crt"), ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(spiffe.try_into().unwrap())];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(3);
    params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn assert_refused(what: &str, status: u16, body: &Value, codes: &[u16]) {
    assert!(
        codes.contains(&status),
        "{what}: expected one of {codes:?}, got {status} {body}"
    );
    assert!(
        body["error"].is_string() && body["message"].is_string(),
        "{what}: the error is JSON {{error, field, message}}: {body}"
    );
}

#[tokio::test]
async fn registration_succeeds_only_with_the_agents_own_certificate_and_token() {
    let (client, ns) = setup("api-reg").await;
    let ns = ns.name.clone();
    let controller = ControllerProcess::start(ControllerOptions::new(&ns));
    for (name, caps) in [
        ("alpha", vec!["summarize", "translate"]),
        ("beta", vec!["search"]),
    ] {
        create_agent(
            &client,
            &ns,
            agent_with(name, &caps, &["backup:write", "memory:read"]),
        )
        .await
        .unwrap();
    }
    for name in ["alpha", "beta"] {
        wait_agent(
            &client,
            &ns,
            name,
            Duration::from_secs(90),
            "identity",
            identity_issued,
        )
        .await;
    }
    wait_api(&controller).await;
    let ca = api_ca(&client, &ns).await;
    let a = agent_files(&client, &ns, "alpha").await;
    let b = agent_files(&client, &ns, "beta").await;
    let api = controller.api_url();
    let register = format!("{api}/v1/agents/register");
    let http_a = api_client(&ca, Some((&a.cert_pem, &a.key_pem)));

    // Success, over HTTP/2.
    let r = http_a
        .post(&register)
        .bearer_auth(&a.token)
        .header("user-agent", "agentry-test/1.0")
        .json(&register_body(&ns, "alpha", &["summarize"]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN negotiates h2");
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["id"], format!("{ns}/alpha"));
    assert_eq!(
        answer["spiffe_id"],
        format!("spiffe://cluster.local/ns/{ns}/agent/alpha")
    );
    assert_eq!(answer["assigned_resources"]["max_memory"], "512Mi");
    assert_eq!(answer["assigned_resources"]["memory"], "384Mi");
    assert!(answer["token"]["expires_at"].is_string(), "{answer}");
    assert_eq!(
        answer["agent_card_url"],
        format!("{api}/a2a/{ns}/alpha/.well-known/agent-card.json")
    );
    let agent = wait_agent(
        &client,
        &ns,
        "alpha",
        Duration::from_secs(30),
        "Registered",
        |a| condition(a, "Registered").is_some_and(|c| c.status == "True"),
    )
    .await;
    let reg = agent.status.as_ref().unwrap().registration.clone().unwrap();
    assert_eq!(reg.capabilities, vec!["summarize".to_string()]);
    assert_eq!(reg.client_version.as_deref(), Some("agentry-test/1.0"));
    assert_eq!(reg.registered_at, answer["registered_at"].as_str().unwrap());

    // Repeating it is harmless: the same answer and no status write.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = Api::<Agent>::namespaced(client.clone(), &ns)
        .get("alpha")
        .await
        .unwrap();
    for _ in 0..5 {
        let again = http_a
            .post(&register)
            .bearer_auth(&a.token)
            .header("user-agent", "agentry-test/1.0")
            .json(&register_body(&ns, "alpha", &["summarize"]))
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 200);
        assert_eq!(again.json::<Value>().await.unwrap(), answer);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = Api::<Agent>::namespaced(client.clone(), &ns)
        .get("alpha")
        .await
        .unwrap();
    assert_eq!(
        before.metadata.resource_version, after.metadata.resource_version,
        "a repeated registration writes nothing"
    );
    assert!(
        controller.metric("agentry_api_requests_total").await >= Some(6.0),
        "API requests are counted on /metrics"
    );

    // Every wrong credential or claim: 401/403, and nothing changes.
    let spiffe_a = format!("spiffe://cluster.local/ns/{ns}/agent/alpha");
    let no_cert = api_client(&ca, None);
    let (s, body) = post_json(
        &no_cert,
        &register,
        Some(&a.token),
        &register_body(&ns, "alpha", &[]),
    )
    .await;
    assert_refused("no client certificate", s, &body, &[401]);
    assert_eq!(body["field"], "client_certificate");

    let (fc, fk) = foreign_identity(&spiffe_a);
    let foreign = api_client(&ca, Some((&fc, &fk)));
    let (s, body) = post_json(
        &foreign,
        &register,
        Some(&a.token),
        &register_body(&ns, "alpha", &[]),
    )
    .await;
    assert_refused("a certificate from another CA", s, &body, &[401]);

    let (ec, ek) = expired_identity(&client, &ns, &spiffe_a).await;
    let expired = api_client(&ca, Some((&ec, &ek)));
    let (s, body) = post_json(
        &expired,
        &register,
        Some(&a.token),
        &register_body(&ns, "alpha", &[]),
    )
    .await;
    assert_refused("an expired certificate", s, &body, &[401]);
    assert!(
        body["message"].as_str().unwrap().contains("expired"),
        "{body}"
    );

    let mut claims = peek_claims(&a.token).unwrap();
    let now = jsonwebtoken::get_current_timestamp();
    claims.iat = now - 7200;
    claims.nbf = now - 7200;
    claims.exp = now - 3600;
    let old = forge(&client, &ns, &claims).await;
    let (s, body) = post_json(
        &http_a,
        &register,
        Some(&old),
        &register_body(&ns, "alpha", &[]),
    )
    .await;
    assert_refused("an expired token", s, &body, &[401]);

    let mut claims = peek_claims(&a.token).unwrap();
    claims.aud = "someone-else".into();
    let other_aud = forge(&client, &ns, &claims).await;
    let (s, body) = post_json(
        &http_a,
        &register,
        Some(&other_aud),
        &register_body(&ns, "alpha", &[]),
    )
    .await;
    assert_refused("a token for another audience", s, &body, &[401]);

    let (s, body) = post_json(&http_a, &register, None, &register_body(&ns, "alpha", &[])).await;
    assert_refused("no token", s, &body, &[401]);

    let (s, body) = post_json(
        &http_a,
        &register,
        Some(&a.token),
        &register_body(&ns, "beta", &[]),
    )
    .await;
    assert_refused("the id of another agent", s, &body, &[403]);
    assert_eq!(body["field"], "id");

    let (s, body) = post_json(
        &http_a,
        &register,
        Some(&a.token),
        &register_body(&ns, "alpha", &["search"]),
    )
    .await;
    assert_refused("undeclared capabilities", s, &body, &[403]);
    assert_eq!(body["field"], "capabilities");
    assert!(
        body["message"].as_str().unwrap().contains("\"search\""),
        "{body}"
    );

    let discover = format!("{api}/v1/agents?capability=search");
    let r = http_a
        .get(&discover)
        .bearer_auth(&a.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a token without agents:discover");
    assert_eq!(r.json::<Value>().await.unwrap()["field"], "scope");

    let r = http_a
        .get(format!("{api}/v1/agents/{ns}/beta"))
        .bearer_auth(&a.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "another agent's record");
    let own: Value = http_a
        .get(format!("{api}/v1/agents/{ns}/alpha"))
        .bearer_auth(&a.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        own["registered_capabilities"],
        json!(["summarize"]),
        "{own}"
    );

    // 1,000 replays of beta's token over alpha's connection: all refused (cnf binding).
    let refused = futures::stream::iter(0..1000)
        .map(|_| {
            let (http, url, token, body) = (
                http_a.clone(),
                register.clone(),
                b.token.clone(),
                register_body(&ns, "beta", &[]),
            );
            async move { post_json(&http, &url, Some(&token), &body).await }
        })
        .buffer_unordered(32)
        .filter(|(s, body)| futures::future::ready(*s == 401 && body["field"] == "authorization"))
        .count()
        .await;
    assert_eq!(refused, 1000, "every replayed token is refused");
    assert_eq!(
        registration(&client, &ns, "beta").await,
        None,
        "beta never registered"
    );
    let now_reg = registration(&client, &ns, "alpha").await.unwrap();
    assert_eq!(
        now_reg["capabilities"],
        json!(["summarize"]),
        "alpha's registration unchanged"
    );

    // A fresh token from /v1/token (mTLS only), with the Agent's scopes whatever is asked.
    let r = http_a.post(format!("{api}/v1/token")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let minted: Value = r.json().await.unwrap();
    assert_eq!(minted["scope"], "backup:write memory:read");
    let (s, _) = post_json(
        &http_a,
        &register,
        minted["token"].as_str(),
        &register_body(&ns, "alpha", &["summarize"]),
    )
    .await;
    assert_eq!(s, 200, "the minted token works");
    let (s, body) = post_json(
        &http_a,
        &format!("{api}/v1/token"),
        None,
        &json!({"scope": "agents:discover"}),
    )
    .await;
    assert_refused("asking /v1/token for scopes", s, &body, &[400]);
    assert_eq!(body["field"], "scope");
    let r = no_cert
        .post(format!("{api}/v1/token"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // The example client registers with the files the pod would mount.
    let dir = tempfile::tempdir().unwrap();
    for (file, content) in [
        ("tls.crt", &a.cert_pem),
        ("tls.key", &a.key_pem),
        ("ca.crt", &ca),
        ("token", &a.token),
    ] {
        std::fs::write(dir.path().join(file), content).unwrap();
    }
    let out =
        std::process::Command::new(std::env::var("AGENTRY_PYTHON").unwrap_or("python3".into()))
            .args([
                "examples/python/register.py",
                "--api",
                &api,
                "--identity-dir",
            ])
            .arg(dir.path())
            .args([
                "--id",
                &format!("{ns}/alpha"),
                "--capabilities",
                "summarize,translate",
            ])
            .output()
            .unwrap();
    assert!(
        out.status.success(),
        "register.py: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(printed["memory"], "384Mi");
    assert_eq!(printed["max_memory"], "512Mi");

    // Revocation takes effect at once: the revoked certificate's still-unexpired token stops.
    let before_serial = agent
        .status
        .as_ref()
        .unwrap()
        .identity
        .as_ref()
        .unwrap()
        .serial
        .clone();
    Api::<Agent>::namespaced(client.clone(), &ns)
        .patch(
            "alpha",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"agentry.dev/revoke": "keyCompromise"}}}),
            ),
        )
        .await
        .unwrap();
    let ledger = Ledger::open(&controller.data_dir()).unwrap();
    eventually(
        Duration::from_secs(30),
        "the ledger to revoke alpha's certificate",
        || async {
            ledger
                .get(&before_serial)
                .unwrap()
                .is_some_and(|r| r.state == agentry::identity::store::CertState::Revoked)
        },
    )
    .await;
    let (s, body) = post_json(
        &http_a,
        &register,
        Some(&a.token),
        &register_body(&ns, "alpha", &[]),
    )
    .await;
    assert_refused(
        "a revoked certificate right after revocation",
        s,
        &body,
        &[401],
    );
    assert!(
        body["message"].as_str().unwrap().contains("revoked"),
        "{body}"
    );
    let _ = CONTROLLER_NS_NOTE;
}

#[tokio::test]
async fn bad_input_gets_a_json_error_and_changes_nothing() {
    let (client, ns) = setup("api-bad").await;
    let ns = ns.name.clone();
    let controller = ControllerProcess::start(ControllerOptions::new(&ns));
    create_and_wait(
        &client,
        &ns,
        "gamma",
        Duration::from_secs(90),
        "identity",
        identity_issued,
    )
    .await;
    wait_api(&controller).await;
    let ca = api_ca(&client, &ns).await;
    let g = agent_files(&client, &ns, "gamma").await;
    let api = controller.api_url();
    let http = api_client(&ca, Some((&g.cert_pem, &g.key_pem)));
    let register = format!("{api}/v1/agents/register");
    let send = |body: Vec<u8>, ct: &'static str| {
        let (http, url, token) = (http.clone(), register.clone(), g.token.clone());
        async move {
            let r = http
                .post(url)
                .bearer_auth(token)
                .header("content-type", ct)
                .body(body)
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (s, b) = send(b"{\"id\": ".to_vec(), "application/json").await;
    assert_refused("malformed JSON", s, &b, &[400]);
    let (s, b) = send(
        br#"{"id":"x/gamma","extra":true}"#.to_vec(),
        "application/json",
    )
    .await;
    assert_refused("an unknown field", s, &b, &[400]);
    assert_eq!(b["field"], "extra");
    let (s, b) = send(
        serde_json::to_vec(&json!({"id": format!("{ns}/gamma"), "backup_prefs": {"schedule": "every tuesday", "paths": ["/d"]}})).unwrap(),
        "application/json",
    )
    .await;
    assert_refused("a bad cron", s, &b, &[400]);
    assert_eq!(b["field"], "backup_prefs.schedule");
    let (s, b) = send(
        serde_json::to_vec(&json!({"id": format!("{ns}/gamma"), "backup_prefs": {"schedule": "@daily", "paths": ["relative"]}})).unwrap(),
        "application/json",
    )
    .await;
    assert_refused("a relative backup path", s, &b, &[400]);
    assert_eq!(b["field"], "backup_prefs.paths");
    let (s, b) = send(vec![b' '; 70 * 1024], "application/json").await;
    assert_refused("a body over 64 KiB", s, &b, &[413]);
    let (s, b) = send(br#"{"id":"x"}"#.to_vec(), "text/plain").await;
    assert_refused("the wrong content type", s, &b, &[415]);
    let r = http.get(&register).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "method_not_allowed"
    );
    let r = http.get(format!("{api}/v1/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .post(&register)
        .bearer_auth(&g.token)
        .header("x-padding", "a".repeat(20 * 1024))
        .json(&register_body(&ns, "gamma", &[]))
        .send()
        .await;
    // HTTP/2 (what this client negotiates) refuses a header list over 16 KiB at the protocol
    // level; over HTTP/1.1 it is a 431.
    match r {
        Ok(r) => assert_eq!(r.status(), 431, "oversized headers"),
        Err(e) => assert!(
            format!("{e:?}").to_lowercase().contains("h2") || e.is_request(),
            "oversized headers: {e:?}"
        ),
    }
    let http1 = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca.as_bytes()).unwrap())
        .identity(
            reqwest::Identity::from_pem(format!("{}{}", g.cert_pem, g.key_pem).as_bytes()).unwrap(),
        )
        .http1_only()
        .build()
        .unwrap();
    let r = http1
        .post(&register)
        .bearer_auth(&g.token)
        .header("x-padding", "a".repeat(20 * 1024))
        .json(&register_body(&ns, "gamma", &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431, "oversized headers over HTTP/1.1");
    assert_eq!(
        registration(&client, &ns, "gamma").await,
        None,
        "nothing was registered"
    );

    // A client that keeps changing its registration is rate-limited: 5 writes a minute.
    let mut codes = Vec::new();
    for i in 0..8 {
        let r = http
            .post(&register)
            .bearer_auth(&g.token)
            .header("user-agent", format!("flapping/{i}"))
            .json(&register_body(&ns, "gamma", &["summarize"]))
            .send()
            .await
            .unwrap();
        codes.push(r.status().as_u16());
    }
    assert_eq!(
        codes,
        [200, 200, 200, 200, 200, 429, 429, 429],
        "rate limit"
    );
    eventually(
        Duration::from_secs(10),
        "the last accepted registration stored",
        || {
            let (client, ns) = (client.clone(), ns.clone());
            async move {
                registration(&client, &ns, "gamma")
                    .await
                    .is_some_and(|r| r["clientVersion"] == "flapping/4")
            }
        },
    )
    .await;

    // A slow client (headers never finished) is cut off by the header timeout (10 s).
    let tls = {
        let mut roots = rustls::RootCertStore::empty();
        for der in agentry::identity::ca::pem_to_ders(&ca) {
            roots.add(der.into()).unwrap();
        }
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth()
    };
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", controller.api_port))
        .await
        .unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"POST /v1/agents/register HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(25), stream.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "the server must close a connection whose headers never finish"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "not before the header timeout"
    );

    // The unauthenticated trust endpoints, with caching headers.
    let anon = api_client(&ca, None);
    let r = anon.get(format!("{api}/v1/ca.crt")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert!(
        r.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("max-age")
    );
    assert_eq!(r.text().await.unwrap(), ca);
    let r = anon
        .get(format!("{api}/v1/ca.crt"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let r = anon.get(format!("{api}/v1/crl")).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "application/pkix-crl");
    let der = r.bytes().await.unwrap();
    assert!(x509_parser::parse_x509_crl(&der).is_ok(), "the CRL is DER");
    let jwks: Value = anon
        .get(format!("{api}/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kid = jsonwebtoken::decode_header(&g.token).unwrap().kid.unwrap();
    assert!(
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["kid"] == kid),
        "{jwks}"
    );
    let openapi: Value = anon
        .get(format!("{api}/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(openapi["openapi"].as_str().unwrap().starts_with("3.1"));
}

async fn allow_discovery(client: &Client, ns: &str, discoverable_from: Option<&str>) {
    let mut annotations =
        json!({"agentry.dev/allowed-permissions": "agents:discover backup:write memory:read"});
    if let Some(from) = discoverable_from {
        annotations["agentry.dev/discoverable-from"] = json!(from);
    }
    Api::<Namespace>::all(client.clone())
        .patch(
            ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": annotations}})),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn discovery_and_signed_cards_follow_the_namespace_policy() {
    let (client, home) = setup("api-disc").await;
    let (_, away) = setup("api-away").await;
    let (home, away) = (home.name.clone(), away.name.clone());
    allow_discovery(&client, &home, None).await;
    // One controller for both namespaces, selecting this test's Agents only.
    let mut opts = ControllerOptions::new(&home);
    opts.cluster_wide = true;
    let selector = format!("test={home}");
    opts.extra_args = vec!["--agent-selector".into(), selector];
    let controller = ControllerProcess::start(opts);
    let labelled = |name: &str, caps: &[&str], perms: &[&str]| {
        let mut m = agent_with(name, caps, perms);
        merge(
            &mut m,
            json!({"metadata": {"labels": {"test": home.clone()}}}),
        );
        m
    };
    create_agent(
        &client,
        &home,
        labelled("finder", &["search"], &["agents:discover"]),
    )
    .await
    .unwrap();
    let mut summ = labelled("summ", &["summarize"], &["memory:read"]);
    merge(
        &mut summ,
        json!({"spec": {"card": {"description": "Summarises long documents", "skills": [
            {"id": "summarize-text", "name": "Summarize text", "description": "Short summaries", "tags": ["nlp"], "examples": ["summarize this"]}
        ]}}}),
    );
    create_agent(&client, &home, summ).await.unwrap();
    create_agent(
        &client,
        &home,
        labelled("both", &["summarize", "translate"], &["memory:read"]),
    )
    .await
    .unwrap();
    create_agent(
        &client,
        &away,
        labelled("remote", &["summarize"], &["memory:read"]),
    )
    .await
    .unwrap();
    for (ns, name) in [
        (&home, "finder"),
        (&home, "summ"),
        (&home, "both"),
        (&away, "remote"),
    ] {
        wait_agent(&client, ns, name, Duration::from_secs(120), "Ready", |a| {
            condition(a, "Ready").is_some_and(|c| c.status == "True")
        })
        .await;
    }
    wait_api(&controller).await;
    let ca = api_ca(&client, &home).await;
    let f = agent_files(&client, &home, "finder").await;
    let http = api_client(&ca, Some((&f.cert_pem, &f.key_pem)));
    let api = controller.api_url();
    let ids = |v: Value| -> Vec<String> {
        v["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_str().unwrap().to_string())
            .collect()
    };
    let query = |q: &'static str| {
        let (http, url, token) = (
            http.clone(),
            format!("{api}/v1/agents?{q}"),
            f.token.clone(),
        );
        async move {
            let r = http.get(url).bearer_auth(token).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    assert_eq!(
        ids(query("capability=summarize").await),
        vec![format!("{home}/both"), format!("{home}/summ")]
    );
    assert_eq!(
        ids(query("capability=summarize&capability=translate").await),
        vec![format!("{home}/both")]
    );
    let summ_entry = query("capability=summarize").await["agents"][1].clone();
    assert_eq!(
        summ_entry["spiffe_id"],
        format!("spiffe://cluster.local/ns/{home}/agent/summ")
    );
    assert!(
        summ_entry["endpoint"]
            .as_str()
            .unwrap()
            .starts_with(&format!("summ.{home}.svc")),
        "{summ_entry}"
    );
    let r = http
        .get(format!("{api}/v1/agents?capability=Bad_Cap"))
        .bearer_auth(&f.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Another namespace's agents and cards stay hidden until it lists this namespace.
    let card_path = |ns: &str, name: &str| format!("/a2a/{ns}/{name}/.well-known/agent-card.json");
    let r = http
        .get(format!("{api}{}", card_path(&away, "remote")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    allow_discovery(&client, &away, Some(&home)).await;
    eventually(
        Duration::from_secs(30),
        "the away namespace to become discoverable",
        || {
            let q = query("capability=summarize");
            let expected = format!("{away}/remote");
            async move { ids(q.await).contains(&expected) }
        },
    )
    .await;
    let r = http
        .get(format!("{api}{}", card_path(&away, "remote")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The card validates with the A2A SDK and its signature with the published key.
    let dir = tempfile::tempdir().unwrap();
    let write = |n: &str, c: &str| {
        let p = dir.path().join(n);
        std::fs::write(&p, c).unwrap();
        p.display().to_string()
    };
    let jwks = api_client(&ca, None)
        .get(format!("{api}/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (cacert, cert, key, jwks) = (
        write("ca.crt", &ca),
        write("tls.crt", &f.cert_pem),
        write("tls.key", &f.key_pem),
        write("jwks.json", &jwks),
    );
    let python = std::env::var("AGENTRY_PYTHON").unwrap_or("python3".into());
    let check = |path: String, extra: &[&str]| {
        std::process::Command::new(&python)
            .args([
                "tests/python/check_agent_card.py",
                "--base-url",
                &api,
                "--card-path",
                &path,
                "--cacert",
                &cacert,
                "--cert",
                &cert,
                "--key",
                &key,
                "--jwks",
                &jwks,
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = check(
        card_path(&home, "summ"),
        &["--expect-name", "summ", "--expect-skill-tag", "summarize"],
    );
    assert!(
        out.status.success(),
        "A2A card check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let card: Value = http
        .get(format!("{api}{}", card_path(&home, "summ")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(card["skills"][0]["id"], "summarize-text");
    assert_eq!(card["description"], "Summarises long documents");
    let summ = Api::<Agent>::namespaced(client.clone(), &home)
        .get("summ")
        .await
        .unwrap();
    assert_eq!(
        summ.status.unwrap().agent_card_url.as_deref(),
        Some(format!("{api}{}", card_path(&home, "summ")).as_str()),
        "status links the card"
    );
    // A tampered copy fails the same check.
    let mut tampered = card.clone();
    tampered["description"] = json!("Summarises long documents!");
    let tampered_file = write("tampered.json", &tampered.to_string());
    let out = std::process::Command::new(&python)
        .args([
            "tests/python/check_agent_card.py",
            "--card-file",
            &tampered_file,
            "--jwks",
            &jwks,
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a tampered card must fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A token minted by the API keeps its scope string, but a scope the Agent no longer holds
    // stops working at once (not at the token's expiry).
    let minted: Value = http
        .post(format!("{api}/v1/token"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let minted = minted["token"].as_str().unwrap().to_string();
    let url = format!("{api}/v1/agents?capability=summarize");
    let r = http.get(&url).bearer_auth(&minted).send().await.unwrap();
    assert_eq!(r.status(), 200);
    Api::<Agent>::namespaced(client.clone(), &home)
        .patch(
            "finder",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"permissions": ["memory:read"]}})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the narrowed scope to apply to a minted token",
        || {
            let (http, url, minted) = (http.clone(), url.clone(), minted.clone());
            async move {
                let r = http.get(url).bearer_auth(minted).send().await.unwrap();
                r.status() == 403
            }
        },
    )
    .await;
}

fn csr_pem(key: &rcgen::KeyPair, sans: &[&str], ca: bool) -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = sans
        .iter()
        .map(|s| match s.starts_with("spiffe://") {
            true => rcgen::SanType::URI((*s).try_into().unwrap()),
            false => rcgen::SanType::DnsName((*s).try_into().unwrap()),
        })
        .collect();
    if ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    params.serialize_request(key).unwrap().pem().unwrap()
}

async fn sa_token(client: &Client, ns: &str, sa: &str, audience: &str) -> String {
    let request = k8s_openapi::api::authentication::v1::TokenRequest {
        spec: k8s_openapi::api::authentication::v1::TokenRequestSpec {
            audiences: vec![audience.into()],
            expiration_seconds: Some(600),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer: k8s_openapi::api::authentication::v1::TokenRequest =
        Api::<ServiceAccount>::namespaced(client.clone(), ns)
            .create_subresource("token", sa, &PostParams::default(), &request)
            .await
            .unwrap();
    answer.status.unwrap().token
}

#[tokio::test]
async fn csr_bootstrap_issues_only_what_the_ca_decides() {
    let (client, ns) = setup("api-csr").await;
    let ns = ns.name.clone();
    let controller = ControllerProcess::start(ControllerOptions::new(&ns));
    create_and_wait(
        &client,
        &ns,
        "outside",
        Duration::from_secs(90),
        "identity",
        identity_issued,
    )
    .await;
    create_and_wait(
        &client,
        &ns,
        "other",
        Duration::from_secs(90),
        "identity",
        identity_issued,
    )
    .await;
    wait_api(&controller).await;
    let ca = api_ca(&client, &ns).await;
    let api = controller.api_url();
    let url = format!("{api}/v1/agents/{ns}/outside/csr");
    let anon = api_client(&ca, None);
    let token = sa_token(&client, &ns, "outside", "agentry").await;
    let spiffe = format!("spiffe://cluster.local/ns/{ns}/agent/outside");
    let ledger = Ledger::open(&controller.data_dir()).unwrap();
    let rows = ledger.count().unwrap();

    let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let good = csr_pem(&p256, &[&spiffe], false);
    let mut flipped = agentry::identity::ca::pem_blocks(&good, "CERTIFICATE REQUEST").remove(0);
    let last = flipped.len() - 3;
    flipped[last] ^= 0x55;
    let flipped = pem_block("CERTIFICATE REQUEST", &flipped);
    let cases: Vec<(&str, String, String, u16)> = vec![
        ("a bad signature", flipped, token.clone(), 400),
        (
            "a P-384 key",
            csr_pem(&p384, &[], false),
            token.clone(),
            400,
        ),
        (
            "an extra SAN",
            csr_pem(&p256, &[&spiffe, "evil.example.com"], false),
            token.clone(),
            400,
        ),
        ("CA:true", csr_pem(&p256, &[], true), token.clone(), 400),
        (
            "another audience",
            good.clone(),
            sa_token(&client, &ns, "outside", "kubernetes").await,
            401,
        ),
        (
            "another agent's ServiceAccount",
            good.clone(),
            sa_token(&client, &ns, "other", "agentry").await,
            403,
        ),
        ("a garbage token", good.clone(), "not-a-token".into(), 401),
    ];
    for (what, csr, token, code) in cases {
        let (s, body) = post_json(&anon, &url, Some(&token), &json!({"csr": csr})).await;
        assert_refused(what, s, &body, &[code]);
    }
    let r = anon
        .post(&url)
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(format!(r#"{{"csr":"{}"}}"#, "A".repeat(70 * 1024)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "an oversized CSR");
    assert_eq!(
        ledger.count().unwrap(),
        rows,
        "refused CSRs are recorded nowhere"
    );

    let (s, issued) = post_json(&anon, &url, Some(&token), &json!({"csr": good})).await;
    assert_eq!(s, 200, "{issued}");
    assert_eq!(ledger.count().unwrap(), rows + 1);
    let cert = issued["certificate"].as_str().unwrap();
    let facts = agentry::identity::ca::leaf_facts(cert).unwrap();
    assert_eq!(facts.uris, vec![spiffe.clone()]);
    assert!(!facts.dns_names.iter().any(|d| d.contains("evil")));
    // The certificate and its token work on the agent routes.
    let http = api_client(&ca, Some((cert, &p256.serialize_pem())));
    let (s, body) = post_json(
        &http,
        &format!("{api}/v1/agents/register"),
        issued["token"].as_str(),
        &register_body(&ns, "outside", &["summarize"]),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    // The Deployment's own certificate was not superseded by it: its ledger row is still active.
    let a = agent_files(&client, &ns, "outside").await;
    let pod_serial = agentry::identity::ca::leaf_facts(&a.cert_pem)
        .unwrap()
        .serial;
    assert_eq!(
        ledger.get(&pod_serial).unwrap().unwrap().state,
        agentry::identity::store::CertState::Active
    );
    // A second CSR cuts the first bootstrapped key off at once.
    let again = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let (s, _) = post_json(
        &anon,
        &url,
        Some(&token),
        &json!({"csr": csr_pem(&again, &[], false)}),
    )
    .await;
    assert_eq!(s, 200);
    let (s, body) = post_json(
        &http,
        &format!("{api}/v1/agents/register"),
        issued["token"].as_str(),
        &register_body(&ns, "outside", &["summarize"]),
    )
    .await;
    assert_refused(
        "the first CSR certificate after a second CSR",
        s,
        &body,
        &[401],
    );
    let http_pod = api_client(&ca, Some((&a.cert_pem, &a.key_pem)));
    let (s, body) = post_json(
        &http_pod,
        &format!("{api}/v1/agents/register"),
        Some(&a.token),
        &register_body(&ns, "outside", &[]),
    )
    .await;
    assert_eq!(s, 200, "{body}");
}

fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

#[tokio::test]
async fn only_the_leader_serves_the_api_and_a_standby_takes_over_under_load() {
    let (client, ns) = setup("api-fail").await;
    let ns = ns.name.clone();
    // Both replicas use one data volume, as the leader's PersistentVolume moves with it.
    let data = tempfile::tempdir().unwrap();
    let mut first = ControllerOptions::new(&ns);
    first.data_dir = Some(data.path());
    let mut a = ControllerProcess::start(first);
    create_and_wait(
        &client,
        &ns,
        "steady",
        Duration::from_secs(90),
        "identity",
        identity_issued,
    )
    .await;
    wait_api(&a).await;
    let mut second = ControllerOptions::new(&ns);
    second.replica = "replica-b";
    second.data_dir = Some(data.path());
    let b = ControllerProcess::start(second);
    eventually(
        Duration::from_secs(30),
        "the standby to report itself",
        || async { matches!(b.readyz().await, Some((503, body)) if body.contains("standby")) },
    )
    .await;
    assert!(matches!(a.readyz().await, Some((200, body)) if body.contains("leader")));
    let ca = api_ca(&client, &ns).await;
    let files = agent_files(&client, &ns, "steady").await;
    let http = api_client(&ca, Some((&files.cert_pem, &files.key_pem)));
    let body = register_body(&ns, "steady", &["summarize"]);
    let token = files.token.clone();
    let try_both = move |urls: [String; 2]| {
        let (http, token, body) = (http.clone(), token.clone(), body.clone());
        async move {
            for url in urls {
                if let Ok(r) = http
                    .post(format!("{url}/v1/agents/register"))
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                    && r.status() == 200
                {
                    return Some(url);
                }
            }
            None
        }
    };
    let urls = [a.api_url(), b.api_url()];
    assert_eq!(try_both(urls.clone()).await, Some(a.api_url()));
    // Under use: a client keeps registering while the leader dies.
    let load = {
        let urls = urls.clone();
        let try_both = try_both.clone();
        tokio::spawn(async move {
            let mut served_by = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
            while tokio::time::Instant::now() < deadline {
                if let Some(url) = try_both(urls.clone()).await {
                    served_by.push(url);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                if served_by
                    .iter()
                    .rev()
                    .take(20)
                    .filter(|u| **u == urls[1])
                    .count()
                    == 20
                {
                    break;
                }
            }
            served_by
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.kill();
    let served_by = load.await.unwrap();
    assert!(
        served_by.contains(&urls[0]),
        "the leader served before it died"
    );
    assert!(
        served_by.iter().filter(|u| **u == urls[1]).count() >= 20,
        "the standby took over the API with the same credentials: {served_by:?}\n{}",
        b.logs()
    );
    assert!(matches!(b.readyz().await, Some((200, body)) if body.contains("leader")));
}

/// Writes the identity files as the kubelet updates a Secret volume: a new timestamped
/// directory, then an atomic swap of the `..data` symlink the file links point through.
fn kubelet_write(dir: &std::path::Path, files: &AgentFiles, ca: &str, generation: u32) {
    let version = format!("..2026_{generation:04}");
    let target = dir.join(&version);
    std::fs::create_dir_all(&target).unwrap();
    for (name, content) in [
        ("tls.crt", &files.cert_pem),
        ("tls.key", &files.key_pem),
        ("ca.crt", &ca.to_string()),
        ("token", &files.token),
    ] {
        std::fs::write(target.join(name), content).unwrap();
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

async fn sidecar_status(port: u16) -> Option<Value> {
    reqwest::get(format!("http://127.0.0.1:{port}/status"))
        .await
        .ok()?
        .json()
        .await
        .ok()
}

#[tokio::test]
async fn the_cli_and_sidecar_register_keep_a_token_and_follow_rotation() {
    let (client, ns) = setup("api-side").await;
    let ns = ns.name.clone();
    let controller = ControllerProcess::start(ControllerOptions::new(&ns));
    let agent = create_and_wait(
        &client,
        &ns,
        "side",
        Duration::from_secs(90),
        "identity",
        identity_issued,
    )
    .await;
    wait_api(&controller).await;
    let ca = api_ca(&client, &ns).await;
    let api = controller.api_url();
    let id = format!("{ns}/side");
    let dir = tempfile::tempdir().unwrap();
    let first = agent_files(&client, &ns, "side").await;
    kubelet_write(dir.path(), &first, &ca, 1);
    let agentry = env!("CARGO_BIN_EXE_agentry");

    // `agentry register` from a shell.
    let out = std::process::Command::new(agentry)
        .args(["register", "--api", &api, "--identity-dir"])
        .arg(dir.path())
        .args(["--id", &id, "--capabilities", "summarize"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["id"], id);
    let out = std::process::Command::new(agentry)
        .args(["register", "--api", &api, "--identity-dir"])
        .arg(dir.path())
        .args(["--id", &id, "--capabilities", "fly"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a refusal exits 2");
    assert!(String::from_utf8_lossy(&out.stderr).contains("capabilities"));

    // The sidecar, run as a local process over the same files (pods do not run on kwok).
    let port = free_port();
    let log = dir.path().join("sidecar.log");
    let sidecar = KillOnDrop(
        std::process::Command::new(agentry)
            .args(["sidecar", "--api", &api, "--identity-dir"])
            .arg(dir.path())
            .args([
                "--id",
                &id,
                "--capabilities",
                "summarize",
                "--poll",
                "1s",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("sidecar.err")).unwrap())
            .spawn()
            .unwrap(),
    );
    let serial = agent
        .status
        .as_ref()
        .unwrap()
        .identity
        .as_ref()
        .unwrap()
        .serial
        .clone();
    eventually(
        Duration::from_secs(30),
        "the sidecar to register",
        || async {
            sidecar_status(port).await.is_some_and(|s| {
                s["registrations"] == 1 && s["certificate_serial"] == serial.as_str()
            })
        },
    )
    .await;
    let token: Value = reqwest::get(format!("http://127.0.0.1:{port}/token"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let http = api_client(&ca, Some((&first.cert_pem, &first.key_pem)));
    let (s, _) = post_json(
        &http,
        &format!("{api}/v1/agents/register"),
        token["token"].as_str(),
        &register_body(&ns, "side", &["summarize"]),
    )
    .await;
    assert_eq!(s, 200, "the sidecar's token works");
    let r = reqwest::get(format!("http://127.0.0.1:{port}/card"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the sidecar serves the agent its card");
    let r = reqwest::get(format!(
        "http://127.0.0.1:{port}/agents?capability=summarize"
    ))
    .await
    .unwrap();
    assert_eq!(
        r.status(),
        403,
        "discovery needs agents:discover, which this agent lacks"
    );
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", sidecar.0.id())) {
        let rss = status
            .lines()
            .find(|l| l.starts_with("VmRSS"))
            .unwrap_or("");
        println!("sidecar {rss}");
    }

    // Rotation: a new certificate arrives through the kubelet's symlink swap; the sidecar
    // re-registers with it.
    Api::<Agent>::namespaced(client.clone(), &ns)
        .patch(
            "side",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"agentry.dev/revoke": "superseded"}}}),
            ),
        )
        .await
        .unwrap();
    let rotated = wait_agent(
        &client,
        &ns,
        "side",
        Duration::from_secs(60),
        "a new certificate",
        |a| {
            a.status
                .as_ref()
                .and_then(|s| s.identity.as_ref())
                .is_some_and(|i| i.serial != serial)
        },
    )
    .await;
    let new_serial = rotated.status.unwrap().identity.unwrap().serial;
    let second = agent_files(&client, &ns, "side").await;
    kubelet_write(dir.path(), &second, &ca, 2);
    eventually(
        Duration::from_secs(30),
        "the sidecar to re-register with the new certificate",
        || async {
            sidecar_status(port).await.is_some_and(|s| {
                s["registrations"] == 2 && s["certificate_serial"] == new_serial.as_str()
            })
        },
    )
    .await;
    drop(sidecar);

    // Narrowed scopes revoke the old token by jti: refused at once, the new one works.
    let http = api_client(&ca, Some((&second.cert_pem, &second.key_pem)));
    Api::<Agent>::namespaced(client.clone(), &ns)
        .patch(
            "side",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"permissions": ["backup:write"]}})),
        )
        .await
        .unwrap();
    eventually_ok(
        Duration::from_secs(30),
        "a token with the narrowed scope",
        || {
            let client = client.clone();
            let ns = ns.clone();
            async move {
                let f = agent_files(&client, &ns, "side").await;
                let c = peek_claims(&f.token).ok_or("no token")?;
                Ok::<_, &str>(c.scope == "backup:write")
            }
        },
    )
    .await;
    let narrowed = agent_files(&client, &ns, "side").await;
    let (s, body) = post_json(
        &http,
        &format!("{api}/v1/agents/register"),
        Some(&second.token),
        &register_body(&ns, "side", &[]),
    )
    .await;
    assert_refused("a token whose scopes were narrowed", s, &body, &[401]);
    assert!(
        body["message"].as_str().unwrap().contains("revoked"),
        "{body}"
    );
    let (s, body) = post_json(
        &http,
        &format!("{api}/v1/agents/register"),
        Some(&narrowed.token),
        &register_body(&ns, "side", &[]),
    )
    .await;
    assert_eq!(s, 200, "{body}");
}

/// The serial of the certificate the API serves now.
async fn served_serial(port: u16, ca: &str) -> Option<String> {
    let mut roots = rustls::RootCertStore::empty();
    for der in agentry::identity::ca::pem_to_ders(ca) {
        roots.add(der.into()).ok()?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("127.0.0.1".try_into().ok()?, tcp)
        .await
        .ok()?;
    let der = stream.get_ref().1.peer_certificates()?.first()?.to_vec();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(agentry::identity::ca::hex(cert.raw_serial()))
}

#[tokio::test]
async fn the_api_certificate_is_renewed_like_any_leaf() {
    let (client, ns) = setup("api-renew").await;
    let ns = ns.name.clone();
    // Lifetimes divided by 3000: the API's 24h certificate lives about 29 s.
    let mut opts = ControllerOptions::new(&ns);
    opts.extra_args = vec!["--ttl-divisor".into(), "3000".into()];
    let controller = ControllerProcess::start(opts);
    create_and_wait(
        &client,
        &ns,
        "renew",
        Duration::from_secs(90),
        "identity",
        identity_issued,
    )
    .await;
    wait_api(&controller).await;
    let ca = api_ca(&client, &ns).await;
    let first = served_serial(controller.api_port, &ca)
        .await
        .expect("the API serves a certificate our CA signed");
    let ledger = Ledger::open(&controller.data_dir()).unwrap();
    assert!(
        ledger.get(&first).unwrap().is_some(),
        "the API's certificate is in the ledger"
    );
    eventually(
        Duration::from_secs(90),
        "the API's certificate to be renewed",
        || {
            let (ca, first) = (ca.clone(), first.clone());
            let port = controller.api_port;
            async move { served_serial(port, &ca).await.is_some_and(|s| s != first) }
        },
    )
    .await;
}

/// A child process killed (and reaped) when the test ends, whether it passes or panics.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
