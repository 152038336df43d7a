//! The credentials step of the Agent pipeline: keep a valid certificate and token in the
//! Agent's `<name>-identity` Secret (cert-manager's layout: `tls.crt`, `tls.key`, `ca.crt`, plus
//! `token`), renewing at 2/3 of the certificate's life and 80% of the token's, revoking on
//! request. Nothing read back from the Secret is trusted until `identity::trust` verified it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};

use super::report::{Note, Report};
use crate::controller::error::refused_as_invalid;
use crate::controller::{Context, NameConflict};
use crate::crd::{Agent, IdentityStatus, ValidatedSpec};
use crate::identity::authority::{Authority, AuthorityError};
use crate::identity::ca::{self, BACKDATE, CaError, CertificateAuthority, LeafRequest};
use crate::identity::jwt::{self, JwtError};
use crate::identity::store::{self, AgentKey, Ledger, RevocationReason, StoreError};
use crate::identity::trust::{self, TrustedLeaf, Untrusted};
use crate::keys::conditions::{CERTIFICATE_ISSUED, TOKEN_ISSUED};
use crate::keys::{AGENT_LABEL, MANAGED_BY, MANAGER, REVOKE_ANNOTATION, reasons};
use crate::workload::Observed;

/// What failed while keeping an Agent's credentials.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("certificate ledger: {0}")]
    Ledger(#[from] StoreError),
    #[error("issuing the certificate: {0}")]
    Issue(#[from] CaError),
    #[error("minting the token: {0}")]
    Mint(#[from] JwtError),
    #[error(transparent)]
    Authority(Box<AuthorityError>),
    #[error(transparent)]
    NameConflict(#[from] NameConflict),
    #[error("a blocking ledger or signing task failed: {0}")]
    Blocking(#[from] tokio::task::JoinError),
    #[error("the Agent has no uid or namespace yet")]
    NotStored,
    #[error("{0}")]
    CaExpired(String),
    #[error("{0}")]
    LedgerBehind(String),
}

impl From<AuthorityError> for IdentityError {
    fn from(e: AuthorityError) -> Self {
        IdentityError::Authority(Box::new(e))
    }
}

impl IdentityError {
    /// Retrying cannot help until something changes.
    pub fn is_permanent(&self) -> bool {
        matches!(self, IdentityError::Kube(e) if refused_as_invalid(e))
    }

    /// The condition this failure leaves on the Agent.
    pub fn report(&self) -> Report {
        let message = format!("could not issue the identity: {self}");
        match self {
            IdentityError::NameConflict(_) => {
                Report::stalled(Some(CERTIFICATE_ISSUED), reasons::NAME_CONFLICT, message)
            }
            IdentityError::CaExpired(_) => {
                Report::pending(CERTIFICATE_ISSUED, reasons::CA_EXPIRED, message)
            }
            IdentityError::LedgerBehind(_) => {
                Report::pending(CERTIFICATE_ISSUED, reasons::LEDGER_BEHIND_CRL, message)
            }
            _ => Report::pending(CERTIFICATE_ISSUED, reasons::ISSUE_FAILED, message),
        }
    }
}

pub fn secret_name(agent: &Agent) -> String {
    format!("{}-identity", agent.name_any())
}

/// What the credentials step applied.
pub struct Credentials {
    pub status: IdentityStatus,
    pub secret_name: String,
}

/// The stored identity, as read from the Secret.
struct Stored {
    cert_pem: String,
    /// Empty when the Secret has no usable key.
    key_pem: String,
    token: Option<String>,
    redis_password: Option<String>,
}

fn read_stored(secret: &Secret) -> Option<Stored> {
    let data = secret.data.as_ref()?;
    let get = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    Some(Stored {
        cert_pem: get("tls.crt")?,
        key_pem: get("tls.key").unwrap_or_default(),
        token: get("token"),
        redis_password: get("redis-password"),
    })
}

/// What the Agent's certificate must look like now.
pub struct WantedLeaf<'a> {
    pub ca_key_id: Option<&'a str>,
    /// The signing CA's notAfter: no leaf outlives it, so a leaf clamped to it is as long as
    /// it can be.
    pub ca_not_after: i64,
    pub uri: &'a str,
    pub dns: &'a [String],
    pub ttl: Duration,
}

/// Why a certificate is (re-)issued: cert-manager's trigger policies, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReissueReason {
    NoCertificate,
    /// The Secret holds something we cannot trust (see [`Untrusted`]).
    Untrusted(Untrusted),
    /// The certificate is ours but no longer active in the ledger (revoked or superseded).
    NotActive,
    RevocationRequested,
    OtherCa,
    SansChanged,
    TtlChanged,
    RenewalDue,
}

impl ReissueReason {
    /// The constant reason string for Events and conditions.
    pub fn reason(&self) -> &'static str {
        match self {
            ReissueReason::NoCertificate => "NoCertificate",
            ReissueReason::Untrusted(Untrusted::KeyMismatch) => "KeyMissing",
            ReissueReason::Untrusted(Untrusted::NotInLedger(_)) => "NotInLedger",
            ReissueReason::Untrusted(_) => "Untrusted",
            ReissueReason::NotActive => "Revoked",
            ReissueReason::RevocationRequested => "RevocationRequested",
            ReissueReason::OtherCa => "OtherCa",
            ReissueReason::SansChanged => "SansChanged",
            ReissueReason::TtlChanged => "TtlChanged",
            ReissueReason::RenewalDue => "RenewalDue",
        }
    }
}

impl std::fmt::Display for ReissueReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReissueReason::NoCertificate => f.write_str("no certificate yet"),
            ReissueReason::Untrusted(why) => write!(f, "stored certificate not trusted: {why}"),
            ReissueReason::NotActive => {
                f.write_str("certificate is no longer active in the ledger")
            }
            ReissueReason::RevocationRequested => f.write_str("revocation requested"),
            ReissueReason::OtherCa => f.write_str("issued by a different CA"),
            ReissueReason::SansChanged => f.write_str("subject alternative names changed"),
            ReissueReason::TtlChanged => f.write_str("certificate TTL changed"),
            ReissueReason::RenewalDue => f.write_str("renewal due (2/3 of lifetime)"),
        }
    }
}

/// Why a trusted, active certificate cannot be kept, or None to keep it (pure).
pub fn reissue_reason(
    facts: &ca::LeafFacts,
    want: &WantedLeaf<'_>,
    now: i64,
) -> Option<ReissueReason> {
    if facts.authority_key_id.as_deref() != want.ca_key_id {
        return Some(ReissueReason::OtherCa);
    }
    if facts.uris != [want.uri] || facts.dns_names != want.dns {
        return Some(ReissueReason::SansChanged);
    }
    let life = facts.not_after.saturating_sub(facts.not_before);
    let wanted = (want.ttl.as_secs() as i64).saturating_add(BACKDATE.as_secs() as i64);
    // Clamped to the CA's end: as long as it can be, and renewing cannot make it longer (only
    // a new CA can; the CA's expiry is reported on its own).
    let clamped = facts.not_after >= want.ca_not_after && life < wanted;
    if life != wanted && !clamped {
        return Some(ReissueReason::TtlChanged);
    }
    if now >= renewal_time(facts) && !clamped {
        return Some(ReissueReason::RenewalDue);
    }
    None
}

/// Why the token is re-minted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefresh {
    NoToken,
    /// It does not verify (not ours, tampered, unknown key, expired, bound to another cert).
    Unverified,
    CertificateChanged,
    ClaimsChanged,
    TtlChanged,
    RefreshDue,
}

impl TokenRefresh {
    pub fn reason(self) -> &'static str {
        match self {
            TokenRefresh::NoToken => "NoToken",
            TokenRefresh::Unverified => "Unverified",
            TokenRefresh::CertificateChanged => "CertificateChanged",
            TokenRefresh::ClaimsChanged => "ClaimsChanged",
            TokenRefresh::TtlChanged => "TtlChanged",
            TokenRefresh::RefreshDue => "RefreshDue",
        }
    }
}

/// Whether a stored token can be kept (pure): `verified` is the outcome of the one verifier
/// over it (None: no token stored).
pub fn token_refresh(
    verified: Option<Result<&jwt::Claims, ()>>,
    cert_changed: bool,
    sub: &str,
    scope: &str,
    ttl: Duration,
    now: i64,
) -> Option<TokenRefresh> {
    if cert_changed {
        return Some(TokenRefresh::CertificateChanged);
    }
    let c = match verified {
        None => return Some(TokenRefresh::NoToken),
        Some(Err(())) => return Some(TokenRefresh::Unverified),
        Some(Ok(c)) => c,
    };
    if c.sub != sub || c.scope != scope {
        return Some(TokenRefresh::ClaimsChanged);
    }
    if c.exp.checked_sub(c.iat) != Some(ttl.as_secs()) {
        return Some(TokenRefresh::TtlChanged);
    }
    if now >= token_refresh_time(c) {
        return Some(TokenRefresh::RefreshDue);
    }
    None
}

/// 2/3 of the way from issuance (notBefore + backdate) to notAfter, brought forward by up to
/// a tenth of the lifetime, by a fraction taken from the serial: certificates issued in the
/// same second (a fleet created together, a CA rotation) renew spread over that tenth, not in
/// one burst. Deterministic, so every pass computes the same time (and writes nothing).
pub fn renewal_time(f: &ca::LeafFacts) -> i64 {
    let issued = f.not_before.saturating_add(BACKDATE.as_secs() as i64);
    let life = f.not_after.saturating_sub(issued).max(0) as i128;
    let spread = life / 10 * i128::from(jitter_per_million(&f.serial)) / 1_000_000;
    clamp_i64(issued as i128 + life * 2 / 3 - spread)
}

/// 0..1,000,000 from a serial's last 32 bits (random; its head is the issuance time): where
/// in the spread window this certificate renews.
fn jitter_per_million(serial: &str) -> u32 {
    let tail = serial
        .get(serial.len().saturating_sub(8)..)
        .unwrap_or(serial);
    u32::from_str_radix(tail, 16).map_or(0, |v| v % 1_000_000)
}

/// 80% of the way from iat to exp. Total over any claims (a stored token is tenant-writable):
/// `exp < iat` or absurd values give a time in the past, never a panic or a wrap.
pub fn token_refresh_time(c: &jwt::Claims) -> i64 {
    let (iat, exp) = (c.iat as i128, c.exp as i128);
    clamp_i64(iat + (exp - iat).max(0) * 4 / 5)
}

fn clamp_i64(v: i128) -> i64 {
    v.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// Runs a ledger call on the blocking pool: SQLite (and its fsync) never runs on the async
/// workers, where it could starve lease renewal.
async fn with_ledger<T: Send + 'static>(
    authority: &Arc<Authority>,
    f: impl FnOnce(&Ledger) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, IdentityError> {
    let authority = authority.clone();
    Ok(tokio::task::spawn_blocking(move || f(&authority.ledger)).await??)
}

/// Reads the identity Secret and decides whether its certificate can be trusted.
async fn read_trusted(
    secret: Option<&Secret>,
    uid: &str,
    authority: &Arc<Authority>,
) -> Result<(Option<Stored>, Result<TrustedLeaf, Untrusted>), IdentityError> {
    let stored = secret.and_then(read_stored);
    let Some(s) = &stored else {
        return Ok((None, Err(Untrusted::Missing)));
    };
    let record = match trust::claimed_serial(&s.cert_pem) {
        Some(serial) => with_ledger(authority, move |l| l.get(&serial)).await?,
        None => None,
    };
    let verdict = trust::verify_leaf(
        &s.cert_pem,
        &s.key_pem,
        &authority.trusted_cas(),
        record.as_ref(),
        uid,
    );
    Ok((stored, verdict))
}

/// Who the step works for, read once.
struct Target<'a> {
    agent: &'a Agent,
    ns: String,
    name: String,
    uid: String,
    /// The Agent's creationTimestamp, unix seconds: with the uid, its ledger key.
    created: i64,
    spiffe: String,
    dns: Vec<String>,
    now: i64,
}

/// The certificate the Secret will hold.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
    facts: ca::LeafFacts,
    changed: bool,
}

pub async fn step(
    agent: &Agent,
    spec: &ValidatedSpec,
    ctx: &Context,
) -> Result<(Credentials, Vec<Report>), IdentityError> {
    let authority = &ctx.authority;
    let t = Target::of(agent, &authority.config.trust_domain)?;
    // An expired signing CA issues nothing: say so on every Agent (with the recovery), never
    // silently make a new CA.
    authority.ca_health().map_err(IdentityError::CaExpired)?;
    // A ledger behind the published CRL issues nothing and handles no revocation (its CRL
    // would drop published revocations): say why on every Agent, with the fix.
    authority
        .ledger_health()
        .map_err(IdentityError::LedgerBehind)?;
    let secret_name = secret_name(agent);
    let existing = Api::<Secret>::namespaced(ctx.client.clone(), &t.ns)
        .get_opt(&secret_name)
        .await?;
    // Never take over a Secret this Agent did not create (before anything is issued).
    if let Some(s) = &existing
        && !crate::controller::owned_by(&s.metadata, &t.uid)
    {
        return Err(NameConflict::new("Secret", &secret_name).into());
    }
    let (stored, trusted) = read_trusted(existing.as_ref(), &t.uid, authority).await?;
    let mut events: Vec<Note> = untrusted_note(&t, &trusted).into_iter().collect();
    let revoke = pending_revocation(agent, &t, ctx).await?;
    if let Some(reason) = &revoke {
        events.push(revoke_on_request(&t, reason, &trusted, ctx).await?);
    }
    let ca = authority.ca();
    let cert_ttl = authority.scaled(spec.certificate_ttl);
    let why = certificate_decision(&t, revoke.is_some(), &trusted, &ca, cert_ttl);
    let leaf = match (why, stored.as_ref(), &trusted) {
        (None, Some(s), Ok(kept)) => Leaf {
            cert_pem: s.cert_pem.clone(),
            key_pem: s.key_pem.clone(),
            der: kept.der.clone(),
            facts: kept.facts.clone(),
            changed: false,
        },
        (why, ..) => {
            let why = why.unwrap_or(ReissueReason::NoCertificate);
            let (leaf, notes) = issue(&t, &ca, cert_ttl, &why, trusted.is_ok(), ctx).await?;
            events.extend(notes);
            leaf
        }
    };
    let token_ttl = authority.scaled(spec.token_ttl).max(Duration::from_secs(1));
    let stored_token = stored.as_ref().and_then(|s| s.token.clone());
    let (token, claims) = token(&t, &leaf, stored_token, token_ttl, ctx).await?;
    let stored_password = stored.as_ref().and_then(|s| s.redis_password.as_deref());
    let messaging = super::inbox::password(agent, stored_password, leaf.changed, ctx).await;
    let desired = identity_secret(
        agent,
        &secret_name,
        &leaf.cert_pem,
        &leaf.key_pem,
        &authority.bundle(),
        &token,
        messaging.as_ref().map(|(p, e)| (p.as_str(), e.as_str())),
    );
    write_secret(&t, existing.as_ref(), &desired, revoke.is_some(), ctx).await?;
    if let Some(nearest) = with_ledger(authority, |l| l.nearest_active_expiry()).await? {
        ctx.metrics.set_nearest_certificate_expiry(nearest);
    }
    Ok(finish(&t, secret_name, &leaf.facts, &claims, events))
}

impl<'a> Target<'a> {
    fn of(agent: &'a Agent, trust_domain: &str) -> Result<Self, IdentityError> {
        let (ns, uid) = agent
            .namespace()
            .zip(agent.uid())
            .ok_or(IdentityError::NotStored)?;
        let name = agent.name_any();
        Ok(Target {
            agent,
            spiffe: ca::spiffe_id(trust_domain, &ns, &name),
            dns: ca::service_dns_names(&ns, &name),
            now: Timestamp::now().as_second(),
            created: store::created(&agent.metadata),
            ns,
            name,
            uid,
        })
    }

    fn key(&self) -> AgentKey {
        AgentKey::new(self.uid.clone(), self.created)
    }
}

/// A Warning for a Secret that held something we could not trust (none when it was empty).
fn untrusted_note(t: &Target<'_>, trusted: &Result<TrustedLeaf, Untrusted>) -> Option<Note> {
    let why = trusted
        .as_ref()
        .err()
        .filter(|w| **w != Untrusted::Missing)?;
    tracing::warn!(agent = %format!("{}/{}", t.ns, t.name), reason = %why, "identity Secret holds an untrusted certificate; replacing it");
    Some(Note::warning(
        reasons::UNTRUSTED_IDENTITY,
        "Verify",
        format!(
            "the identity Secret held a certificate that failed verification ({why}); it is replaced, nothing in it was reused or revoked"
        ),
    ))
}

/// Applies the identity Secret when it differs, then clears a handled revocation request.
async fn write_secret(
    t: &Target<'_>,
    existing: Option<&Secret>,
    desired: &Secret,
    revoked: bool,
    ctx: &Context,
) -> Result<(), IdentityError> {
    if existing.map(|e| (&e.data, e.type_.as_deref()))
        != Some((&desired.data, Some("kubernetes.io/tls")))
    {
        // The answer is read for its version only: decoded as `Observed`, its data (the key
        // among it) and managedFields are skipped unread.
        let written = Api::<Observed<Secret>>::namespaced(ctx.client.clone(), &t.ns)
            .patch(
                &desired.name_any(),
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(desired),
            )
            .await?;
        // Its watch event is our own write coming back: no pass for it.
        ctx.stores
            .secrets
            .wrote(written.metadata.uid.as_deref(), &written.metadata);
    }
    if revoked {
        // Done: clear the request so it is not repeated.
        let patch = serde_json::json!({"metadata": {"annotations": {REVOKE_ANNOTATION: null}}});
        Api::<Agent>::namespaced(ctx.client.clone(), &t.ns)
            .patch(&t.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(())
}

/// The revocation request to act on, confirmed against a fresh read of the Agent: the cache
/// can still show a request this controller already handled and cleared (the watch event for
/// the clearing patch may not have arrived yet), and acting on it twice would revoke the
/// certificate just issued in its place.
async fn pending_revocation(
    agent: &Agent,
    t: &Target<'_>,
    ctx: &Context,
) -> Result<Option<String>, IdentityError> {
    if !agent.annotations().contains_key(REVOKE_ANNOTATION) {
        return Ok(None);
    }
    let fresh = Api::<Agent>::namespaced(ctx.client.clone(), &t.ns)
        .get_opt(&t.name)
        .await?;
    Ok(fresh
        .filter(|a| a.uid().as_deref() == Some(t.uid.as_str()))
        .and_then(|a| a.annotations().get(REVOKE_ANNOTATION).cloned()))
}

/// Revokes on request what is actually deployed (once verified) and the active row;
/// `keyCompromise` revokes every unexpired certificate the Agent ever had.
async fn revoke_on_request(
    t: &Target<'_>,
    reason: &str,
    trusted: &Result<TrustedLeaf, Untrusted>,
    ctx: &Context,
) -> Result<Note, IdentityError> {
    let why = RevocationReason::parse(reason);
    let deployed = trusted.as_ref().ok().map(|l| l.facts.serial.clone());
    let (key, now) = (t.key(), t.now);
    let serials = with_ledger(&ctx.authority, move |l| {
        if why == RevocationReason::KeyCompromise {
            l.revoke_agent_serials(&key, why, now)
        } else {
            l.revoke_deployed(&key, deployed.as_deref(), why, now)
        }
    })
    .await?;
    // Published before the request is cleared, also on a retry of a failed publish.
    ctx.authority
        .publish_after_revoking(&ctx.client, serials.len())
        .await?;
    ctx.metrics
        .certificates_revoked
        .inc_by(serials.len() as u64);
    Ok(Note::normal(
        reasons::REVOKED,
        "Revoke",
        format!(
            "revoked {} certificate(s) ({}) on request: [{}]",
            serials.len(),
            why.as_str(),
            serials.join(", ")
        ),
    ))
}

/// Why a new certificate is needed, or None to keep the stored one.
fn certificate_decision(
    t: &Target<'_>,
    revocation_requested: bool,
    trusted: &Result<TrustedLeaf, Untrusted>,
    ca: &CertificateAuthority,
    ttl: Duration,
) -> Option<ReissueReason> {
    match trusted {
        _ if revocation_requested => Some(ReissueReason::RevocationRequested),
        Err(Untrusted::Missing) => Some(ReissueReason::NoCertificate),
        Err(why) => Some(ReissueReason::Untrusted(why.clone())),
        Ok(kept) if !kept.record.state.is_active() => Some(ReissueReason::NotActive),
        Ok(kept) => reissue_reason(
            &kept.facts,
            &WantedLeaf {
                ca_key_id: ca.subject_key_id(),
                ca_not_after: ca.not_after().unix_timestamp(),
                uri: &t.spiffe,
                dns: &t.dns,
                ttl,
            },
            t.now,
        ),
    }
}

/// Issues a certificate: key generation, signing and the durable ledger commit run on the
/// blocking pool, and the ledger row commits before the certificate leaves the CA.
async fn issue(
    t: &Target<'_>,
    ca: &Arc<CertificateAuthority>,
    ttl: Duration,
    why: &ReissueReason,
    renewal: bool,
    ctx: &Context,
) -> Result<(Leaf, Vec<Note>), IdentityError> {
    let req = LeafRequest {
        agent_uid: t.uid.clone(),
        agent_created: t.created,
        namespace: t.ns.clone(),
        name: t.name.clone(),
        trust_domain: ctx.authority.config.trust_domain.clone(),
        dns_names: t.dns.clone(),
        ttl,
    };
    let (authority, signing_ca) = (ctx.authority.clone(), ca.clone());
    let leaf =
        tokio::task::spawn_blocking(move || signing_ca.issue(&authority.ledger, &req)).await??;
    failpoint_after_commit(&leaf.record.serial);
    ctx.metrics.certificates_issued.inc();
    tracing::info!(agent = %format!("{}/{}", t.ns, t.name), serial = %leaf.record.serial, reason = why.reason(), "certificate issued");
    let note = Note::normal(
        if renewal { "Renewed" } else { "Issued" },
        "Issue",
        format!(
            "certificate {} issued for {} ({why}), valid until {}",
            leaf.record.serial,
            t.spiffe,
            rfc3339(leaf.record.not_after)
        ),
    );
    let mut notes = vec![note];
    if let Some(end) = leaf.clamped_to {
        notes.push(Note::warning(
            reasons::CLAMPED,
            "Issue",
            format!(
                "certificate {} ends at {} with its CA instead of after the full certificateTTL; rotate the CA (agentry ca rotate)",
                leaf.record.serial,
                rfc3339(end)
            ),
        ));
    }
    let facts = ca::leaf_facts(&leaf.cert_pem)
        .ok_or_else(|| CaError::BadCaCert("the issued certificate does not parse".into()))?;
    Ok((
        Leaf {
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
            der: leaf.cert_der,
            facts,
            changed: true,
        },
        notes,
    ))
}

/// Crash-safety testing only: with `AGENTRY_TEST_ABORT_AFTER_COMMITS=N` the process aborts right
/// after the N-th certificate is committed to the ledger and before it reaches any Secret, the
/// worst moment for a crash. It prints the serial first, so a test can check the ledger kept it.
fn failpoint_after_commit(serial: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    static COMMITS: AtomicU64 = AtomicU64::new(0);
    let limit = LIMIT.get_or_init(|| {
        std::env::var("AGENTRY_TEST_ABORT_AFTER_COMMITS")
            .ok()?
            .parse()
            .ok()
    });
    if let Some(limit) = *limit
        && COMMITS.fetch_add(1, Ordering::SeqCst) + 1 == limit
    {
        eprintln!("failpoint: aborting after committing serial {serial}");
        std::process::abort();
    }
}

/// Keeps the stored token when it verifies (our signature, a published key, bound to this
/// certificate) and still fits; mints a new one otherwise. A new signing key does not re-mint
/// every token at once: tokens move to it at their normal refresh.
async fn token(
    t: &Target<'_>,
    leaf: &Leaf,
    stored: Option<String>,
    ttl: Duration,
    ctx: &Context,
) -> Result<(String, jwt::Claims), IdentityError> {
    let tokens = ctx.authority.tokens();
    let scope = t.agent.spec.scope();
    let verified = stored
        .as_deref()
        .map(|token| tokens.verifier().verify(token, &leaf.der).map_err(|_| ()));
    let refresh = token_refresh(
        verified.as_ref().map(|v| v.as_ref().map_err(|_| ())),
        leaf.changed,
        &t.spiffe,
        &scope,
        ttl,
        t.now,
    );
    if let (None, Some(token), Some(Ok(claims))) = (refresh, stored, verified.clone()) {
        return Ok((token, claims));
    }
    // Scopes changed (e.g. the namespace narrowed what its agents may hold): the old token is
    // revoked by jti, so the API refuses it at once rather than at its expiry.
    if let (Some(TokenRefresh::ClaimsChanged), Some(Ok(old))) = (refresh, verified) {
        let (jti, serial, now) = (old.jti.clone(), leaf.facts.serial.clone(), t.now);
        let exp = old.exp.min(i64::MAX as u64) as i64;
        with_ledger(&ctx.authority, move |l| {
            l.revoke_token(&jti, &serial, exp, "claimsChanged", now)
        })
        .await?;
        tracing::info!(agent = %format!("{}/{}", t.ns, t.name), jti = %old.jti, "revoked the token whose scopes changed");
    }
    let minted = tokens.mint(&t.spiffe, &scope, ttl, &leaf.der, t.now.max(0) as u64)?;
    tracing::debug!(agent = %format!("{}/{}", t.ns, t.name), reason = refresh.map_or("NoToken", TokenRefresh::reason), "token minted");
    ctx.metrics.tokens_minted.inc();
    Ok(minted)
}

/// The step's reports and the identity status.
fn finish(
    t: &Target<'_>,
    secret_name: String,
    facts: &ca::LeafFacts,
    claims: &jwt::Claims,
    events: Vec<Note>,
) -> (Credentials, Vec<Report>) {
    let renew_at = renewal_time(facts);
    let refresh_at = token_refresh_time(claims);
    let token_expires_at = rfc3339(i64::try_from(claims.exp).unwrap_or(i64::MAX));
    let next = renew_at.min(refresh_at).saturating_sub(t.now).max(1);
    let status = IdentityStatus {
        spiffe_id: t.spiffe.clone(),
        serial: facts.serial.clone(),
        not_after: rfc3339(facts.not_after),
        renewal_time: Some(rfc3339(renew_at)),
        token_expires_at: Some(token_expires_at.clone()),
        secret_name: secret_name.clone(),
    };
    let certificate = Report::ok(
        CERTIFICATE_ISSUED,
        reasons::ISSUED,
        format!(
            "certificate {} for {} valid until {}",
            status.serial, status.spiffe_id, status.not_after
        ),
    )
    .with_events(events)
    .requeue_after(Duration::from_secs(next as u64));
    let token = Report::ok(
        TOKEN_ISSUED,
        reasons::ISSUED,
        format!(
            "token with scope [{}] valid until {token_expires_at}",
            claims.scope
        ),
    );
    (
        Credentials {
            status,
            secret_name,
        },
        vec![certificate, token],
    )
}

/// On deletion: revoke every unexpired certificate of the Agent and re-publish the CRL.
pub async fn cleanup(agent: &Agent, ctx: &Context) -> Result<usize, IdentityError> {
    let authority = &ctx.authority;
    let Some(key) = AgentKey::of(&agent.metadata) else {
        return Ok(0);
    };
    // A ledger behind the published CRL may be replaced by a restore: a revocation written
    // into it now could be lost, and could not be published. The finalizer waits instead.
    authority.ledger_health().map_err(|e| {
        tracing::warn!(agent = %agent.name_any(), "deletion waits: the ledger is behind the published CRL");
        IdentityError::LedgerBehind(e)
    })?;
    let now = Timestamp::now().as_second();
    let n = with_ledger(authority, move |l| {
        l.revoke_agent(&key, RevocationReason::CessationOfOperation, now)
    })
    .await?;
    // The finalizer stays until the revocation is published, also on a retry of a failed
    // publish (which finds nothing left to revoke).
    authority.publish_after_revoking(&ctx.client, n).await?;
    ctx.metrics.certificates_revoked.inc_by(n as u64);
    Ok(n)
}

pub fn rfc3339(unix: i64) -> String {
    Timestamp::from_second(unix)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// The identity Secret (pure): owned by the Agent, labelled for discovery and for our watch.
pub fn identity_secret(
    agent: &Agent,
    name: &str,
    cert: &str,
    key: &str,
    bundle: &str,
    token: &str,
    messaging: Option<(&str, &str)>,
) -> Secret {
    let mut files = vec![
        ("tls.crt", cert),
        ("tls.key", key),
        ("ca.crt", bundle),
        ("token", token),
    ];
    if let Some((password, endpoint)) = messaging {
        files.extend([("redis-password", password), ("redis.json", endpoint)]);
    }
    let data: BTreeMap<String, ByteString> = files
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: agent.namespace(),
            labels: Some(
                [
                    (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
                    (AGENT_LABEL.to_string(), agent.name_any()),
                ]
                .into(),
            ),
            owner_references: agent.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(not_before: i64, not_after: i64) -> ca::LeafFacts {
        ca::LeafFacts {
            serial: "ab".into(),
            not_before,
            not_after,
            uris: vec!["spiffe://td/ns/a/agent/b".into()],
            dns_names: vec!["b.a.svc".into()],
            authority_key_id: Some("k1".into()),
        }
    }

    /// 1,000 certificates issued in the same second renew spread over the last tenth before
    /// 2/3 of their life (24h: 2.4h wide), never after 2/3, and the same serial always gets
    /// the same time.
    #[test]
    fn renewals_of_certificates_issued_together_are_spread() {
        let issued = 1_000_000;
        // Real leaf serials, all from the same millisecond: their heads are the same time.
        let now = time::OffsetDateTime::now_utc();
        let times: Vec<i64> = (0..1000u32)
            .map(|_| {
                let mut f = facts(issued - BACKDATE.as_secs() as i64, issued + 86_400);
                f.serial = ca::hex(ca::leaf_serial(now).as_ref());
                renewal_time(&f)
            })
            .collect();
        let latest = issued + 86_400 * 2 / 3;
        assert!(times.iter().all(|&t| t <= latest && t >= latest - 8_640));
        let distinct: std::collections::BTreeSet<_> = times.iter().collect();
        assert!(
            distinct.len() > 900,
            "{} distinct renewal times",
            distinct.len()
        );
        let spread = times.iter().max().unwrap() - times.iter().min().unwrap();
        assert!(spread > 8_000, "spread {spread}s");
        let mut f = facts(issued, issued + 86_400);
        f.serial = "deadbeef00".into();
        assert_eq!(renewal_time(&f), renewal_time(&f.clone()));
    }

    #[test]
    fn keeps_a_good_certificate_and_renews_at_two_thirds() {
        let ttl = Duration::from_secs(3000);
        let issued = 10_000;
        let f = facts(issued - BACKDATE.as_secs() as i64, issued + 3000);
        let dns = vec!["b.a.svc".to_string()];
        let want = |ca: &'static str, uri: &'static str, ttl| WantedLeaf {
            ca_key_id: Some(ca),
            ca_not_after: i64::MAX,
            uri,
            dns: &dns,
            ttl,
        };
        let good = want("k1", "spiffe://td/ns/a/agent/b", ttl);
        let check = |now| reissue_reason(&f, &good, now);
        // Serial "ab" (171): 171 millionths of a tenth of the life (0 s here) before 2/3.
        assert_eq!(renewal_time(&f), issued + 2000);
        assert_eq!(check(issued + 1999), None);
        assert_eq!(check(issued + 2000), Some(ReissueReason::RenewalDue));
        // Each change forces a new certificate, with its own constant reason.
        let cases = [
            (
                want("k2", "spiffe://td/ns/a/agent/b", ttl),
                ReissueReason::OtherCa,
                "OtherCa",
            ),
            (
                want("k1", "spiffe://td/ns/a/agent/c", ttl),
                ReissueReason::SansChanged,
                "SansChanged",
            ),
            (
                want("k1", "spiffe://td/ns/a/agent/b", ttl * 2),
                ReissueReason::TtlChanged,
                "TtlChanged",
            ),
        ];
        for (wanted, expected, reason) in cases {
            let got = reissue_reason(&f, &wanted, issued).unwrap();
            assert_eq!(got, expected);
            assert_eq!(got.reason(), reason);
        }
        assert_eq!(ReissueReason::NoCertificate.reason(), "NoCertificate");
        assert_eq!(ReissueReason::NotActive.reason(), "Revoked");
        assert_eq!(
            ReissueReason::Untrusted(Untrusted::KeyMismatch).reason(),
            "KeyMissing"
        );
        assert_eq!(
            ReissueReason::Untrusted(Untrusted::NotInLedger("ab".into())).reason(),
            "NotInLedger"
        );
    }

    /// A leaf clamped to its CA's end is kept, not re-issued on every pass (renewing cannot
    /// make it longer; the CA's expiry is reported on its own).
    #[test]
    fn a_leaf_clamped_to_its_ca_is_not_reissued_in_a_loop() {
        let issued = 10_000;
        let ca_end = issued + 600;
        let f = facts(issued - BACKDATE.as_secs() as i64, ca_end);
        let dns = vec!["b.a.svc".to_string()];
        let want = WantedLeaf {
            ca_key_id: Some("k1"),
            ca_not_after: ca_end,
            uri: "spiffe://td/ns/a/agent/b",
            dns: &dns,
            ttl: Duration::from_secs(86_400),
        };
        assert_eq!(reissue_reason(&f, &want, issued), None);
        assert_eq!(reissue_reason(&f, &want, issued + 590), None);
        // A new CA (longer life) makes the same certificate worth renewing.
        let renewed_ca = WantedLeaf {
            ca_not_after: ca_end + 86_400 * 365,
            ..want
        };
        assert_eq!(
            reissue_reason(&f, &renewed_ca, issued),
            Some(ReissueReason::TtlChanged)
        );
    }

    /// A token issued at 1000 for 3600 s, scope "x", subject "s".
    fn claims() -> jwt::Claims {
        jwt::Claims {
            iss: "i".into(),
            sub: "s".into(),
            aud: "a".into(),
            iat: 1000,
            nbf: 1000,
            exp: 4600,
            jti: "j".into(),
            scope: "x".into(),
            cnf: None,
        }
    }

    #[test]
    fn token_decisions_have_constant_reasons() {
        let c = claims();
        let ttl = Duration::from_secs(3600);
        let decide =
            |v, changed, sub, scope, ttl, now| token_refresh(v, changed, sub, scope, ttl, now);
        assert_eq!(decide(Some(Ok(&c)), false, "s", "x", ttl, 1000), None);
        let cases = [
            (
                decide(None, false, "s", "x", ttl, 1000),
                TokenRefresh::NoToken,
            ),
            (
                decide(Some(Err(())), false, "s", "x", ttl, 1000),
                TokenRefresh::Unverified,
            ),
            (
                decide(Some(Ok(&c)), true, "s", "x", ttl, 1000),
                TokenRefresh::CertificateChanged,
            ),
            (
                decide(Some(Ok(&c)), false, "s", "y", ttl, 1000),
                TokenRefresh::ClaimsChanged,
            ),
            (
                decide(Some(Ok(&c)), false, "t", "x", ttl, 1000),
                TokenRefresh::ClaimsChanged,
            ),
            (
                decide(Some(Ok(&c)), false, "s", "x", ttl * 2, 1000),
                TokenRefresh::TtlChanged,
            ),
            (
                decide(Some(Ok(&c)), false, "s", "x", ttl, 1000 + 2880),
                TokenRefresh::RefreshDue,
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, Some(want));
            assert!(!want.reason().is_empty());
        }
    }

    #[test]
    fn token_refreshes_at_eighty_percent() {
        assert_eq!(token_refresh_time(&claims()), 1000 + 2880);
    }

    /// Claims come from a tenant-writable Secret: no value may panic or wrap (a debug build
    /// used to die with "attempt to subtract with overflow" on `exp < iat`).
    #[test]
    fn hostile_claims_never_panic_and_never_fit() {
        let base = claims();
        let ttl = Duration::from_secs(3600);
        let fits =
            |c: &jwt::Claims| token_refresh(Some(Ok(c)), false, "s", "x", ttl, 1000).is_none();
        assert!(fits(&base));
        for (iat, exp) in [
            (1000, 900),
            (u64::MAX, 0),
            (0, u64::MAX),
            (u64::MAX, u64::MAX),
            (i64::MAX as u64 + 1, 3),
        ] {
            let c = jwt::Claims {
                iat,
                exp,
                ..base.clone()
            };
            let _ = token_refresh_time(&c);
            assert!(!fits(&c), "iat {iat} exp {exp}");
        }
        let f = ca::LeafFacts {
            serial: "ab".into(),
            not_before: i64::MAX,
            not_after: i64::MIN,
            uris: vec![],
            dns_names: vec![],
            authority_key_id: None,
        };
        let _ = renewal_time(&f);
    }
}
