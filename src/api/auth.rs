//! Who is calling. Every check is made per request, against live state:
//!
//! 1. the client certificate chains to a CA in the current trust bundle and is within its
//!    validity (checked here rather than in the TLS handshake, so the caller gets a 401 that
//!    says why; the handshake still proves the caller holds the certificate's key);
//! 2. its serial is in the ledger with this certificate's fingerprint, and is not revoked
//!    (read from the ledger on every request: a revocation takes effect at once);
//! 3. it belongs to an Agent that still exists (same uid);
//! 4. the Bearer token passes the one `Verifier` (ES256, iss, aud, exp, kid) including its
//!    `cnf.x5t#S256` binding to this certificate, is about this agent (`sub`), and its `jti`
//!    is not revoked;
//! 5. the token carries the scope the route needs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;

use super::error::ApiError;
use super::rfc3339;
use super::state::{ApiState, CachedAgent};
use crate::identity::ca::{self, CertificateAuthority};
use crate::identity::jwt::{Claims, TokenIssuer, VerifyError};
use crate::identity::store::{CertRecord, CertState};

/// The certificate the client presented on this connection (DER), if any.
#[derive(Clone, Debug, Default)]
pub struct PeerCertificate(pub Option<Arc<[u8]>>);

/// Ledger rows of certificates issued through `POST .../csr` carry the Agent's uid with this
/// suffix, so they never supersede the certificate the controller deployed.
pub const CSR_UID_SUFFIX: &str = "/csr";

/// A caller whose certificate passed every check.
pub struct CertCaller {
    pub agent: CachedAgent,
    pub record: CertRecord,
    pub cert_der: Arc<[u8]>,
}

impl CertCaller {
    pub fn namespace(&self) -> &str {
        &self.record.namespace
    }
    pub fn name(&self) -> &str {
        &self.record.name
    }
    pub fn id(&self) -> String {
        format!("{}/{}", self.record.namespace, self.record.name)
    }
}

/// A caller with a certificate and a token bound to it.
pub struct Caller {
    pub cert: CertCaller,
    pub claims: Claims,
}

/// What the chain check learnt about a certificate (cached by fingerprint).
#[derive(Clone, Debug)]
struct Chained {
    serial: String,
    fingerprint: String,
    issuer_fingerprint: String,
    not_before: i64,
    not_after: i64,
}

/// Certificates that passed the chain check, by SHA-256 (failures are not kept: an anonymous
/// client could otherwise flush everyone's entries with self-signed certificates).
type Outcomes = HashMap<String, Chained>;

/// Chain checks by certificate SHA-256, valid for one trust bundle (its hash is kept beside).
#[derive(Default)]
pub struct CertCache {
    inner: Mutex<(String, Outcomes)>,
}

/// Entries kept before the cache starts over.
const CERT_CACHE_MAX: usize = 50_000;

impl CertCache {
    fn check(
        &self,
        der: &[u8],
        bundle_key: &str,
        cas: impl FnOnce() -> Vec<Arc<CertificateAuthority>>,
    ) -> Result<Chained, String> {
        let fingerprint = ca::sha256_hex(der);
        {
            let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if guard.0 == bundle_key
                && let Some(hit) = guard.1.get(&fingerprint)
            {
                return Ok(hit.clone());
            }
        }
        let chained = chain(der, &fingerprint, &cas())?;
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if guard.0 != bundle_key || guard.1.len() >= CERT_CACHE_MAX {
            guard.0 = bundle_key.to_string();
            guard.1.clear();
        }
        guard.1.insert(fingerprint, chained.clone());
        Ok(chained)
    }
}

/// Whether `der` is a leaf signed by one of `cas`.
fn chain(
    der: &[u8],
    fingerprint: &str,
    cas: &[Arc<CertificateAuthority>],
) -> Result<Chained, String> {
    let (_, leaf) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| "the client certificate does not parse".to_string())?;
    let issuer = crate::identity::trust::issuer_of(&leaf, cas)
        .ok_or("the client certificate is not issued by a CA this registry trusts")?;
    if leaf.is_ca() {
        return Err("the client certificate is a CA certificate".into());
    }
    Ok(Chained {
        serial: ca::hex(leaf.raw_serial()),
        fingerprint: fingerprint.to_string(),
        issuer_fingerprint: issuer.fingerprint().to_string(),
        not_before: leaf.validity().not_before.timestamp(),
        not_after: leaf.validity().not_after.timestamp(),
    })
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Checks the presented certificate (steps 1 to 3).
/// Step 1: the certificate chains to the current trust bundle and is valid now.
fn chain_now(state: &ApiState, der: &[u8]) -> Result<Chained, ApiError> {
    let bundle = state.authority.bundle();
    let chained = state
        .certs
        .check(der, &ca::sha256_hex(bundle.as_bytes()), || {
            state.authority.trusted_cas()
        })
        .map_err(|m| ApiError::unauthenticated("client_certificate", m))?;
    let now = now_unix();
    if now >= chained.not_after {
        return Err(ApiError::unauthenticated(
            "client_certificate",
            format!(
                "the client certificate expired at {}; use the renewed one from the identity Secret",
                rfc3339(chained.not_after)
            ),
        ));
    }
    if now < chained.not_before {
        return Err(ApiError::unauthenticated(
            "client_certificate",
            "the client certificate is not valid yet",
        ));
    }
    Ok(chained)
}

/// Step 2: its ledger row (same fingerprint and issuer), not revoked. Read live.
fn ledger_record(state: &ApiState, chained: &Chained) -> Result<CertRecord, ApiError> {
    // Inline: the ledger's read-only connection never waits for a commit.
    let record = state
        .authority
        .ledger
        .lookup(&chained.serial)
        .map_err(ApiError::internal)?
        .filter(|r| {
            r.fingerprint == chained.fingerprint
                && r.issuer_fingerprint == chained.issuer_fingerprint
        })
        .ok_or_else(|| {
            ApiError::unauthenticated(
                "client_certificate",
                format!("certificate serial {} is not in the ledger", chained.serial),
            )
        })?;
    if record.state == CertState::Revoked {
        return Err(ApiError::unauthenticated(
            "client_certificate",
            format!(
                "certificate serial {} was revoked{}; use the agent's current certificate",
                record.serial,
                record
                    .revoked_at
                    .map(|t| format!(" at {}", rfc3339(t)))
                    .unwrap_or_default()
            ),
        ));
    }
    Ok(record)
}

/// Step 3: the Agent it was issued to still exists (same uid) and is not being deleted.
fn live_agent(state: &ApiState, record: &CertRecord) -> Result<CachedAgent, ApiError> {
    let agent_uid = record
        .agent_uid
        .strip_suffix(CSR_UID_SUFFIX)
        .unwrap_or(&record.agent_uid);
    let agent = state
        .agent(&record.namespace, &record.name)
        .filter(|a| a.metadata.uid.as_deref() == Some(agent_uid))
        .ok_or_else(|| {
            ApiError::forbidden(
                "client_certificate",
                format!(
                    "the certificate belongs to Agent {}/{}, which no longer exists",
                    record.namespace, record.name
                ),
            )
        })?;
    if agent.metadata.deletion_timestamp.is_some() {
        return Err(ApiError::forbidden(
            "client_certificate",
            format!(
                "Agent {}/{} is being deleted",
                record.namespace, record.name
            ),
        ));
    }
    Ok(agent)
}

pub async fn certificate(state: &ApiState, peer: &PeerCertificate) -> Result<CertCaller, ApiError> {
    let der = peer.0.clone().ok_or_else(|| {
        ApiError::unauthenticated(
            "client_certificate",
            "a client certificate is required: present the agent's tls.crt and tls.key",
        )
    })?;
    let chained = chain_now(state, &der)?;
    let record = ledger_record(state, &chained)?;
    let agent = live_agent(state, &record)?;
    Ok(CertCaller {
        agent,
        record,
        cert_der: der,
    })
}

/// The Bearer token of a request.
pub fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::unauthenticated(
                "authorization",
                "send the agent's token as `Authorization: Bearer <token>`",
            )
        })?
        .to_str()
        .map_err(|_| ApiError::unauthenticated("authorization", "the header is not ASCII"))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(ApiError::unauthenticated(
            "authorization",
            "use the Bearer scheme: `Authorization: Bearer <token>`",
        )),
    }
}

/// Checks certificate and token (steps 1 to 5); `scope` is what the route needs, if anything.
pub async fn caller(
    state: &ApiState,
    peer: &PeerCertificate,
    headers: &HeaderMap,
    scope: Option<&str>,
) -> Result<Caller, ApiError> {
    let cert = certificate(state, peer).await?;
    let token = bearer(headers)?;
    let claims = state.tokens.verify(state, token, &cert.cert_der)?;
    if claims.sub != cert.record.spiffe_id {
        return Err(ApiError::forbidden(
            "authorization",
            "the token is for another agent",
        ));
    }
    let revoked = state
        .authority
        .ledger
        .is_token_revoked(&claims.jti)
        .map_err(ApiError::internal)?;
    if revoked {
        return Err(ApiError::unauthenticated(
            "authorization",
            "the token was revoked; fetch a new one with POST /v1/token",
        ));
    }
    if let Some(scope) = scope
        && !(claims.has_scope(scope) && currently_allowed(state, &cert, scope))
    {
        return Err(ApiError::forbidden(
            "scope",
            format!(
                "the token lacks the {scope} scope; add it to spec.permissions (the namespace must allow it)"
            ),
        ));
    }
    Ok(Caller { cert, claims })
}

/// Tokens whose signature, issuer and audience have been checked, by SHA-256 of the token and
/// the certificate it was presented with, for one key ring. A hit still has its time window
/// checked (and the caller checks subject, jti revocation and scope every time): a signature
/// over the same bytes with the same keys cannot change, so this skips only the ES256 math.
#[derive(Default)]
pub struct TokenCache {
    /// The key ring the entries were verified with (held, so its address cannot be reused).
    inner: Mutex<(Option<Arc<TokenIssuer>>, VerifiedTokens)>,
}

const TOKEN_CACHE_MAX: usize = 50_000;

type VerifiedTokens = HashMap<[u8; 32], Claims>;

impl TokenCache {
    pub fn verify(
        &self,
        state: &ApiState,
        token: &str,
        cert_der: &[u8],
    ) -> Result<Claims, ApiError> {
        use sha2::{Digest, Sha256};
        let tokens = state.authority.tokens();
        // The key ring is replaced (a new Arc) whenever its keys change.
        let same_ring = |held: &Option<Arc<TokenIssuer>>| {
            held.as_ref().is_some_and(|h| Arc::ptr_eq(h, &tokens))
        };
        let mut hasher = Sha256::new();
        hasher.update(token.as_bytes());
        hasher.update([0]);
        hasher.update(cert_der);
        let key: [u8; 32] = hasher.finalize().into();
        let cached = {
            let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            same_ring(&guard.0)
                .then(|| guard.1.get(&key).cloned())
                .flatten()
        };
        let claims = match cached {
            Some(c) => c,
            None => {
                let c = tokens.verifier().verify(token, cert_der).map_err(|e| match e {
                    VerifyError::CnfMismatch => ApiError::unauthenticated(
                        "authorization",
                        "the token is bound to another certificate; present the certificate it was issued for",
                    ),
                    other => ApiError::unauthenticated("authorization", other.to_string()),
                })?;
                let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
                if !same_ring(&guard.0) || guard.1.len() >= TOKEN_CACHE_MAX {
                    guard.0 = Some(tokens.clone());
                    guard.1.clear();
                }
                guard.1.insert(key, c.clone());
                c
            }
        };
        let now = jsonwebtoken::get_current_timestamp();
        let leeway = crate::identity::jwt::LEEWAY_SECS;
        if now > claims.exp.saturating_add(leeway) {
            return Err(ApiError::unauthenticated(
                "authorization",
                "token is invalid: ExpiredSignature",
            ));
        }
        if claims.nbf > now.saturating_add(leeway) {
            return Err(ApiError::unauthenticated(
                "authorization",
                "token is invalid: ImmatureSignature",
            ));
        }
        Ok(claims)
    }
}

/// Whether the Agent holds `scope` now: in its spec.permissions and allowed by its namespace's
/// policy. A token minted before either was narrowed carries the old scope until it expires;
/// this makes the narrowing apply at once.
pub fn currently_allowed(state: &ApiState, cert: &CertCaller, scope: &str) -> bool {
    let ns = cert.namespace();
    let policy = state.namespace_annotation(ns, crate::keys::ALLOWED_PERMISSIONS_ANNOTATION);
    let Ok(allowed) = crate::identity::scopes::allowed(ns, policy.as_deref()) else {
        return false;
    };
    cert.agent
        .spec
        .permissions
        .iter()
        .any(|p| p.as_str() == scope && allowed.contains(p))
}
