//! Identity benchmarks (BENCHMARKS.md): each of ours against its raw baseline in the same run.
//! - certificate issuance incl. the SQLite ledger commit (on disk, WAL, synchronous=FULL, group
//!   commit by a dedicated writer thread; random v4-UUID agent UIDs as Kubernetes gives) vs raw
//!   P-256 keygen + rcgen sign, 32 threads each (single-threaded figures too). The main figure
//!   is a fleet rollout: each Agent new, the fleet created at 1,000 Agents per second. An extra
//!   figure re-issues for Agents created at random times over a year (a CA rotation of an old
//!   fleet);
//! - JWT mint (claims, scope, jti, cnf thumbprint) vs a raw ES256 signature of the same bytes;
//! - JWT verify (alg pin, kid, iss, aud, exp, nbf, cnf) vs a raw ES256 verification.

mod report;

/// The controller's allocator (src/main.rs), so the figures are those of what ships.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::time::Duration;

use agentry::identity::ca::{CertificateAuthority, LeafRequest, service_dns_names};
use agentry::identity::jwt::{SigningKey, TokenIssuer};
use agentry::identity::store::Ledger;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use report::{Row, ops_per_sec};

/// A v4-UUID-shaped agent UID, unique per `i`.
fn uuid_like(i: u64) -> String {
    let r: u128 = rand::random::<u128>() ^ u128::from(i);
    let h = format!("{r:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn main() {
    let seconds: f64 = std::env::var("AGENTRY_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4.0);
    let total = Duration::from_secs_f64(seconds);
    let mut rows = Vec::new();

    // Certificate issuance.
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path()).unwrap();
    let ca = CertificateAuthority::generate("bench CA", Duration::from_secs(86400)).unwrap();
    let counter = std::sync::atomic::AtomicU64::new(0);
    let start = time::OffsetDateTime::now_utc().unix_timestamp();
    // `created_over`: how far back (seconds) the Agents' creation times are spread at random; 0
    // for a fleet created at 1,000 Agents/s (the local apiserver created the 10,000-Agent
    // fleet at 370/s; creation times have one-second resolution).
    let issue_for = |created_over: i64| {
        let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let agent_created = if created_over == 0 {
            start + (i / 1000) as i64
        } else {
            start - rand::random_range(0..created_over)
        };
        let req = LeafRequest {
            // Random, as Kubernetes UIDs are (v4 UUIDs).
            agent_uid: uuid_like(i),
            agent_created,
            namespace: "bench".into(),
            name: format!("agent-{i}"),
            trust_domain: "cluster.local".into(),
            dns_names: service_dns_names("bench", "agent"),
            ttl: Duration::from_secs(86400),
        };
        std::hint::black_box(ca.issue(&ledger, &req).unwrap());
    };
    let issue = || issue_for(0);
    // The same certificate (same fields, same extensions), signed without the ledger.
    let raw_req = LeafRequest {
        agent_uid: "uid".into(),
        agent_created: start,
        namespace: "bench".into(),
        name: "agent".into(),
        trust_domain: "cluster.local".into(),
        dns_names: service_dns_names("bench", "agent"),
        ttl: Duration::from_secs(86400),
    };
    let raw = || {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params =
            agentry::identity::ca::leaf_params(&raw_req, time::OffsetDateTime::now_utc()).unwrap();
        std::hint::black_box((
            params.signed_by(&key, ca.issuer()).unwrap().pem(),
            key.serialize_pem(),
        ));
    };
    // As the controller issues: up to --concurrency (32) reconciles at once, sharing group
    // commits of the ledger. The baseline gets the same 32 threads.
    let (ours, baseline) = report::parallel_ops_per_sec(32, total, issue, raw);
    // One at a time: every certificate pays a full fsync of its own.
    let (ours_1, baseline_1) = ops_per_sec(total / 2, issue, raw);
    // Re-issuing for an old fleet: each row lands on a random page of the agent index.
    let (reissue, reissue_baseline) =
        report::parallel_ops_per_sec(32, total, || issue_for(365 * 86400), raw);
    rows.push(Row {
        name: "certificate_issue",
        ours,
        baseline,
        unit: "certs/s",
        ratio: ours / baseline,
        baseline_is: "P-256 keygen + rcgen sign of the same certificate, no ledger; 32 threads each",
        target: ">= 0.5 and >= 1000/s",
        extra: vec![
            ("ledger_rows", ledger.count().unwrap() as f64),
            ("single_thread_ours", ours_1),
            ("single_thread_baseline", baseline_1),
            ("reissue_old_fleet_ours", reissue),
            ("reissue_old_fleet_ratio", reissue / reissue_baseline),
        ],
    });

    // JWT mint and verify.
    let key = SigningKey::generate(0).unwrap();
    let raw_key = EncodingKey::from_ec_pem(key.pem().as_bytes()).unwrap();
    let issuer = TokenIssuer::new(
        "https://agentry.bench.svc".into(),
        "agentry".into(),
        vec![key],
    )
    .unwrap();
    let cert = ca.cert_der().to_vec();
    let now = jsonwebtoken::get_current_timestamp();
    let (sample, _) = issuer
        .mint(
            "spiffe://cluster.local/ns/bench/agent/a",
            "backup:write memory:read",
            Duration::from_secs(3600),
            &cert,
            now,
        )
        .unwrap();
    let (signing_input, signature) = sample
        .rsplit_once('.')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap();
    let (ours, baseline) = ops_per_sec(
        total,
        || {
            std::hint::black_box(
                issuer
                    .mint(
                        "spiffe://cluster.local/ns/bench/agent/a",
                        "backup:write memory:read",
                        Duration::from_secs(3600),
                        &cert,
                        now,
                    )
                    .unwrap(),
            );
        },
        || {
            std::hint::black_box(
                jsonwebtoken::crypto::sign(signing_input.as_bytes(), &raw_key, Algorithm::ES256)
                    .unwrap(),
            );
        },
    );
    rows.push(Row {
        name: "jwt_mint",
        ours,
        baseline,
        unit: "ops/s",
        ratio: ours / baseline,
        baseline_is: "jsonwebtoken::crypto::sign ES256 of the same signing input",
        target: ">= 0.8",
        extra: vec![],
    });

    let verifier = issuer.verifier();
    let raw_decoding = DecodingKey::from_jwk(issuer.active_key().jwk()).unwrap();
    let (ours, baseline) = ops_per_sec(
        total,
        || {
            std::hint::black_box(verifier.verify(&sample, &cert).unwrap());
        },
        || {
            assert!(
                jsonwebtoken::crypto::verify(
                    &signature,
                    signing_input.as_bytes(),
                    &raw_decoding,
                    Algorithm::ES256
                )
                .unwrap()
            );
        },
    );
    rows.push(Row {
        name: "jwt_verify",
        ours,
        baseline,
        unit: "ops/s",
        ratio: ours / baseline,
        baseline_is: "jsonwebtoken::crypto::verify ES256 of the same token",
        target: ">= 0.8",
        extra: vec![],
    });

    report::write("identity", &rows);
}
