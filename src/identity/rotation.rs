//! CA rotation in three steps, like SPIRE's prepare/activate/retire, driven by the CA Secret:
//!
//! 1. `agentry ca rotate` annotates the Secret `agentry.dev/rotate=requested`.
//! 2. prepare: the leader generates the next CA (`next.crt`/`next.key`); `ca.crt` holds both,
//!    and every agent's Secret gets the two-CA bundle.
//! 3. activate, one overlap later: the next CA signs (`tls.crt`/`tls.key`), the old one moves
//!    to `previous.*` and stays trusted; every leaf is re-issued by the new CA.
//! 4. retire, once no active, unexpired leaf of the old CA remains and an overlap has passed:
//!    the old CA leaves the bundle.
//!
//! Expiry never bricks the controller: an expired next or previous CA is dropped from the set
//! (with a note for an Event); an expired signing CA still loads, is reported (metric, error
//! log, `Authority::ca_health`), and issues nothing until replaced. Recovery: `agentry ca
//! rotate` -- with an expired signing CA the leader replaces it at once (`Step::Replace`, or
//! `Step::Activate` when a next CA is already prepared) instead of waiting an overlap.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

use super::ca::{CaError, CertificateAuthority};

pub use crate::keys::{PHASE_ANNOTATION, ROTATE_ANNOTATION};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Idle,
    /// The next CA exists and is trusted; the current one still signs. Since (unix seconds).
    Prepared(i64),
    /// The new CA signs; the previous one is still trusted. Since (unix seconds).
    Activated(i64),
}

impl Phase {
    pub fn parse(s: Option<&str>) -> Self {
        let Some((name, at)) = s.and_then(|s| s.split_once(':')) else {
            return Phase::Idle;
        };
        let at = at.parse().unwrap_or(0);
        match name {
            "prepared" => Phase::Prepared(at),
            "activated" => Phase::Activated(at),
            _ => Phase::Idle,
        }
    }
    /// The phase recorded on the CA Secret.
    pub fn of(secret: &Secret) -> Self {
        Self::parse(
            secret
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(PHASE_ANNOTATION))
                .map(String::as_str),
        )
    }

    pub fn render(self) -> Option<String> {
        match self {
            Phase::Idle => None,
            Phase::Prepared(at) => Some(format!("prepared:{at}")),
            Phase::Activated(at) => Some(format!("activated:{at}")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Prepare,
    Activate,
    Retire,
    /// The signing CA expired and a rotation was requested: a new CA signs at once, alone
    /// (nothing the expired CA signed can verify any more, so there is nothing to overlap).
    Replace,
}

/// What to do next when the signing CA has expired (pure): an already prepared CA is activated
/// at once; otherwise a requested rotation replaces the CA. Nothing happens unasked.
pub fn recovery_step(phase: Phase, requested: bool) -> Option<Step> {
    match phase {
        Phase::Prepared(_) => Some(Step::Activate),
        _ if requested => Some(Step::Replace),
        _ => None,
    }
}

/// What to do next (pure): `old_leaves` is how many active certificates the previous CA signed.
pub fn next_step(
    phase: Phase,
    requested: bool,
    now: i64,
    overlap: Duration,
    old_leaves: usize,
) -> Option<Step> {
    let overlap = overlap.as_secs() as i64;
    match phase {
        Phase::Idle if requested => Some(Step::Prepare),
        Phase::Prepared(at) if now - at >= overlap => Some(Step::Activate),
        Phase::Activated(at) if now - at >= overlap && old_leaves == 0 => Some(Step::Retire),
        _ => None,
    }
}

/// The CAs in play: the one that signs, and those trusted beside it during a rotation.
#[derive(Clone)]
pub struct CaSet {
    pub active: Arc<CertificateAuthority>,
    pub next: Option<Arc<CertificateAuthority>>,
    pub previous: Option<Arc<CertificateAuthority>>,
    pub phase: Phase,
}

impl CaSet {
    /// A set of one CA, no rotation under way.
    pub fn single(ca: CertificateAuthority) -> Self {
        Self {
            active: Arc::new(ca),
            next: None,
            previous: None,
            phase: Phase::Idle,
        }
    }

    /// `ca.crt` for agents: the active CA first (with the chain of a brought intermediate),
    /// then the others trusted during a rotation; each certificate once.
    pub fn bundle(&self) -> String {
        let mut seen: Vec<&[u8]> = Vec::new();
        let mut out = String::new();
        for ca in std::iter::once(&self.active)
            .chain(self.next.iter())
            .chain(self.previous.iter())
        {
            for der in ca.ders() {
                if !seen.contains(&der) {
                    seen.push(der);
                    out.push_str(&super::ca::der_to_pem(der));
                }
            }
        }
        out
    }

    /// Reads the set from the CA Secret's data and annotations, at `now` (unix seconds).
    ///
    /// An expired next or previous CA is left out (its rotation phase ends with it), and a
    /// line saying so is returned beside the set for a warning Event; an expired signing CA is
    /// kept (see `Authority::ca_health`). Certificates in `ca.crt` that issued the signing CA
    /// (a brought intermediate's root) stay in the bundle.
    pub fn from_secret(secret: &Secret, now: i64) -> Result<(Self, Vec<String>), CaSetError> {
        let get = |k: &'static str| {
            secret
                .data
                .as_ref()
                .and_then(|d| d.get(k))
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
        };
        let bundle = get("ca.crt").unwrap_or_default();
        let pair = |crt: &'static str,
                    key: &'static str|
         -> Result<Option<CertificateAuthority>, CaSetError> {
            match (get(crt), get(key)) {
                (Some(c), Some(k)) => {
                    let mut ca = CertificateAuthority::load(&c, &k)
                        .map_err(|e| CaSetError::Invalid(crt, e))?;
                    ca.adopt_issuers(&bundle);
                    Ok(Some(ca))
                }
                _ => Ok(None),
            }
        };
        let active = pair("tls.crt", "tls.key")?.ok_or(CaSetError::Missing)?;
        let mut phase = Phase::of(secret);
        let mut dropped = Vec::new();
        let mut unexpired = |ca: Option<CertificateAuthority>, role: &str| {
            let ca = ca?;
            if ca.is_expired_at(now) {
                let note = format!(
                    "the {role} CA (sha256:{}) expired at {}; it is no longer trusted and leaves \
                     the bundle",
                    ca.fingerprint(),
                    ca.not_after()
                );
                tracing::warn!(fingerprint = %ca.fingerprint(), role, "{note}");
                dropped.push(note);
                return None;
            }
            Some(Arc::new(ca))
        };
        let next = unexpired(pair("next.crt", "next.key")?, "next");
        let previous = unexpired(pair("previous.crt", "previous.key")?, "previous");
        // A phase whose other CA is gone is over.
        match phase {
            Phase::Prepared(_) if next.is_none() => phase = Phase::Idle,
            Phase::Activated(_) if previous.is_none() => phase = Phase::Idle,
            _ => {}
        }
        Ok((
            Self {
                active: Arc::new(active),
                next,
                previous,
                phase,
            },
            dropped,
        ))
    }

    /// The Secret data for this set.
    pub fn secret_data(&self) -> BTreeMap<String, ByteString> {
        let mut data = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
        };
        put("tls.crt", &self.active.full_pem());
        put("tls.key", self.active.key_pem());
        put("ca.crt", &self.bundle());
        if let Some(n) = &self.next {
            put("next.crt", &n.full_pem());
            put("next.key", n.key_pem());
        }
        if let Some(p) = &self.previous {
            put("previous.crt", &p.full_pem());
            put("previous.key", p.key_pem());
        }
        data
    }

    /// Applies one step (pure apart from key generation for `Prepare`).
    pub fn apply(
        &self,
        step: Step,
        now: i64,
        new_ca: impl FnOnce() -> Result<CertificateAuthority, CaError>,
    ) -> Result<Self, CaError> {
        Ok(match step {
            Step::Prepare => Self {
                active: self.active.clone(),
                next: Some(Arc::new(new_ca()?)),
                previous: None,
                phase: Phase::Prepared(now),
            },
            Step::Activate => Self {
                active: self.next.clone().unwrap_or_else(|| self.active.clone()),
                next: None,
                previous: Some(self.active.clone()),
                phase: Phase::Activated(now),
            },
            Step::Retire => Self {
                active: self.active.clone(),
                next: None,
                previous: None,
                phase: Phase::Idle,
            },
            Step::Replace => Self::single(new_ca()?),
        })
    }
}

/// `agentry ca rotate`: asks the leader to start a rotation. Returns a line for the user.
pub async fn request(
    client: &kube::Client,
    namespace: &str,
    secret: &str,
) -> Result<String, kube::Error> {
    use kube::api::{Patch, PatchParams};
    let api: kube::Api<Secret> = kube::Api::namespaced(client.clone(), namespace);
    let current = api.get(secret).await?;
    let phase = Phase::of(&current);
    if phase != Phase::Idle {
        return Ok(format!(
            "a rotation is already under way ({}); nothing to do",
            phase.render().unwrap_or_default()
        ));
    }
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({"metadata": {"annotations": {ROTATE_ANNOTATION: now}}});
    api.patch(secret, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(format!(
        "rotation requested on Secret {namespace}/{secret}: the leader prepares the next CA, activates it one \
         overlap later (--ca-rotation-overlap), re-issues every certificate, then retires the old CA"
    ))
}

/// Reads the CA set from its Secret (for `agentry ca status`), with notes on dropped CAs.
pub async fn load(
    client: &kube::Client,
    namespace: &str,
    secret: &str,
) -> Result<(CaSet, Vec<String>), String> {
    let api: kube::Api<Secret> = kube::Api::namespaced(client.clone(), namespace);
    let s = api
        .get(secret)
        .await
        .map_err(|e| format!("reading Secret {namespace}/{secret}: {e}"))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    CaSet::from_secret(&s, now).map_err(|e| e.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum CaSetError {
    #[error("the CA Secret has no tls.crt/tls.key")]
    Missing,
    #[error("{0} in the CA Secret: {1}")]
    Invalid(&'static str, #[source] CaError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_follow_the_overlap_and_the_old_leaves() {
        let o = Duration::from_secs(100);
        assert_eq!(next_step(Phase::Idle, false, 0, o, 0), None);
        assert_eq!(next_step(Phase::Idle, true, 0, o, 0), Some(Step::Prepare));
        assert_eq!(next_step(Phase::Prepared(1000), true, 1099, o, 5), None);
        assert_eq!(
            next_step(Phase::Prepared(1000), false, 1100, o, 5),
            Some(Step::Activate)
        );
        assert_eq!(
            next_step(Phase::Activated(1000), false, 1200, o, 1),
            None,
            "old leaves remain"
        );
        assert_eq!(
            next_step(Phase::Activated(1000), false, 1050, o, 0),
            None,
            "overlap not over"
        );
        assert_eq!(
            next_step(Phase::Activated(1000), false, 1100, o, 0),
            Some(Step::Retire)
        );
        for p in [Phase::Idle, Phase::Prepared(7), Phase::Activated(9)] {
            assert_eq!(Phase::parse(p.render().as_deref()), p);
        }
    }

    #[test]
    fn a_rotation_keeps_both_cas_trusted_until_retirement() {
        let gen_ca = || CertificateAuthority::generate("ca", Duration::from_secs(3600));
        let start = CaSet {
            active: Arc::new(gen_ca().unwrap()),
            next: None,
            previous: None,
            phase: Phase::Idle,
        };
        let old = start.active.fingerprint().to_string();
        let prepared = start.apply(Step::Prepare, 10, gen_ca).unwrap();
        assert_eq!(prepared.active.fingerprint(), old);
        assert_eq!(prepared.bundle().matches("BEGIN CERTIFICATE").count(), 2);
        let new = prepared.next.as_ref().unwrap().fingerprint().to_string();
        let activated = prepared.apply(Step::Activate, 20, gen_ca).unwrap();
        assert_eq!(activated.active.fingerprint(), new);
        assert_eq!(activated.previous.as_ref().unwrap().fingerprint(), old);
        assert_eq!(activated.bundle().matches("BEGIN CERTIFICATE").count(), 2);
        let retired = activated.apply(Step::Retire, 30, gen_ca).unwrap();
        assert_eq!(retired.active.fingerprint(), new);
        assert_eq!(retired.bundle().matches("BEGIN CERTIFICATE").count(), 1);
        assert_eq!(retired.phase, Phase::Idle);
        // Round trip through the Secret.
        let secret = Secret {
            data: Some(activated.secret_data()),
            metadata: kube::api::ObjectMeta {
                annotations: Some(
                    [(
                        PHASE_ANNOTATION.to_string(),
                        activated.phase.render().unwrap(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        let (back, dropped) = CaSet::from_secret(&secret, 0).unwrap();
        assert!(dropped.is_empty());
        assert_eq!(back.active.fingerprint(), new);
        assert_eq!(back.previous.unwrap().fingerprint(), old);
        assert_eq!(back.phase, Phase::Activated(20));
    }

    fn secret_with(data: BTreeMap<String, ByteString>, phase: Phase) -> Secret {
        Secret {
            data: Some(data),
            metadata: kube::api::ObjectMeta {
                annotations: phase
                    .render()
                    .map(|p| [(PHASE_ANNOTATION.to_string(), p)].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn expired_ca() -> CertificateAuthority {
        let now = time::OffsetDateTime::now_utc();
        CertificateAuthority::generate_valid(
            "agentry CA (td)",
            now - Duration::from_secs(7200),
            now - Duration::from_secs(60),
        )
        .unwrap()
    }

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    /// Item 5 of issue 8: an expired previous or next CA is dropped, with a note, instead of
    /// failing the load (which stopped the controller from starting).
    #[test]
    fn an_expired_previous_or_next_ca_is_dropped_not_fatal() {
        let good =
            Arc::new(CertificateAuthority::generate("ca", Duration::from_secs(3600)).unwrap());
        let expired = Arc::new(expired_ca());
        // Activated, with the previous CA expired.
        let set = CaSet {
            active: good.clone(),
            next: None,
            previous: Some(expired.clone()),
            phase: Phase::Activated(5),
        };
        let (loaded, dropped) =
            CaSet::from_secret(&secret_with(set.secret_data(), set.phase), now()).unwrap();
        assert!(loaded.previous.is_none());
        assert_eq!(
            loaded.phase,
            Phase::Idle,
            "the rotation is over with its old CA"
        );
        assert_eq!(dropped.len(), 1);
        assert!(dropped[0].contains(expired.fingerprint()), "{dropped:?}");
        assert_eq!(loaded.bundle(), good.cert_pem());
        // Prepared, with the next CA expired.
        let set = CaSet {
            active: good.clone(),
            next: Some(expired.clone()),
            previous: None,
            phase: Phase::Prepared(5),
        };
        let (loaded, dropped) =
            CaSet::from_secret(&secret_with(set.secret_data(), set.phase), now()).unwrap();
        assert!(loaded.next.is_none());
        assert_eq!(loaded.phase, Phase::Idle);
        assert_eq!(dropped.len(), 1);
        assert_eq!(loaded.bundle(), good.cert_pem());
    }

    /// Item 5: an expired signing CA still loads; only an explicit rotation replaces it, at once.
    #[test]
    fn an_expired_signing_ca_loads_and_only_a_requested_rotation_replaces_it() {
        let set = CaSet::single(expired_ca());
        let (loaded, dropped) =
            CaSet::from_secret(&secret_with(set.secret_data(), Phase::Idle), now()).unwrap();
        assert!(dropped.is_empty());
        assert!(loaded.active.is_expired_at(now()));
        assert_eq!(recovery_step(Phase::Idle, false), None, "never silently");
        assert_eq!(recovery_step(Phase::Idle, true), Some(Step::Replace));
        assert_eq!(
            recovery_step(Phase::Prepared(1), false),
            Some(Step::Activate)
        );
        let gen_ca = || CertificateAuthority::generate("ca", Duration::from_secs(3600));
        let replaced = loaded.apply(Step::Replace, now(), gen_ca).unwrap();
        assert!(!replaced.active.is_expired_at(now()));
        assert!(replaced.next.is_none() && replaced.previous.is_none());
        assert_eq!(replaced.phase, Phase::Idle);
        assert_eq!(replaced.bundle().matches("BEGIN CERTIFICATE").count(), 1);
    }

    /// Item 2: with both CAs of a rotation trusted and both CRLs published, a verifier choosing
    /// the CRL by issuer name (rustls-webpki) accepts each CA's valid leaf and refuses each
    /// CA's revoked leaf.
    /// Verifies a leaf for client auth with rustls-webpki, trusting every CA in `bundle` and
    /// checking revocation (end entity, unknown status refused) against `crls` in this order.
    fn webpki_verify(leaf: &[u8], bundle: &str, crls: &[&str]) -> Result<(), webpki::Error> {
        use rustls::pki_types::{CertificateDer, UnixTime};
        let anchor_ders: Vec<CertificateDer<'static>> = crate::identity::ca::pem_to_ders(bundle)
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let anchors: Vec<_> = anchor_ders
            .iter()
            .map(|d| webpki::anchor_from_trusted_cert(d).unwrap().to_owned())
            .collect();
        let owned: Vec<webpki::CertRevocationList<'static>> = crls
            .iter()
            .map(|pem| {
                let der = x509_parser::pem::parse_x509_pem(pem.as_bytes())
                    .unwrap()
                    .1
                    .contents;
                webpki::OwnedCertRevocationList::from_der(&der)
                    .unwrap()
                    .into()
            })
            .collect();
        let refs: Vec<&webpki::CertRevocationList<'_>> = owned.iter().collect();
        let der = CertificateDer::from(leaf);
        let ee = webpki::EndEntityCert::try_from(&der).unwrap();
        let revocation = webpki::RevocationOptionsBuilder::new(&refs)
            .unwrap()
            .with_depth(webpki::RevocationCheckDepth::EndEntity)
            .with_status_policy(webpki::UnknownStatusPolicy::Deny)
            .build();
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            Some(revocation),
            None,
        )
        .map(|_| ())
    }

    #[test]
    fn a_verifier_picks_the_right_crl_for_each_ca_during_a_rotation() {
        use crate::identity::ca::{LeafRequest, pem_to_ders};
        use crate::identity::store::{Ledger, RevocationReason};

        let gen_ca =
            || CertificateAuthority::generate("agentry CA (td)", Duration::from_secs(86400));
        let ledger = Ledger::in_memory().unwrap();
        let request = |name: &str| LeafRequest {
            agent_uid: format!("uid-{name}"),
            agent_created: 1_700_000_000,
            namespace: "ns".into(),
            name: name.into(),
            trust_domain: "td".into(),
            dns_names: vec![],
            ttl: Duration::from_secs(3600),
        };
        let start = CaSet::single(gen_ca().unwrap());
        let old_valid = start.active.issue(&ledger, &request("old-valid")).unwrap();
        let old_revoked = start
            .active
            .issue(&ledger, &request("old-revoked"))
            .unwrap();
        let set = start
            .apply(Step::Prepare, 1, gen_ca)
            .unwrap()
            .apply(Step::Activate, 2, gen_ca)
            .unwrap();
        let new_valid = set.active.issue(&ledger, &request("new-valid")).unwrap();
        let new_revoked = set.active.issue(&ledger, &request("new-revoked")).unwrap();
        for leaf in [&old_revoked, &new_revoked] {
            assert!(
                ledger
                    .revoke(&leaf.record.serial, RevocationReason::KeyCompromise, now())
                    .unwrap()
            );
        }
        let revoked = ledger.revoked_unexpired(now()).unwrap();
        let at = time::OffsetDateTime::now_utc();
        let crls: Vec<String> = [&set.active, set.previous.as_ref().unwrap()]
            .iter()
            .map(|ca| {
                ca.sign_crl(&revoked, 7, at, Duration::from_secs(3600))
                    .unwrap()
            })
            .collect();

        assert_eq!(pem_to_ders(&set.bundle()).len(), 2);
        // Both orders of the CRL list: the first CRL with a matching issuer name is the one used.
        for order in [[0, 1], [1, 0]] {
            let crls = [crls[order[0]].as_str(), crls[order[1]].as_str()];
            let verify = |leaf: &crate::identity::ca::IssuedLeaf| {
                webpki_verify(&leaf.cert_der, &set.bundle(), &crls)
            };
            assert_eq!(verify(&old_valid), Ok(()), "old CA, valid leaf, {order:?}");
            assert_eq!(verify(&new_valid), Ok(()), "new CA, valid leaf, {order:?}");
            assert_eq!(
                verify(&old_revoked),
                Err(webpki::Error::CertRevoked),
                "{order:?}"
            );
            assert_eq!(
                verify(&new_revoked),
                Err(webpki::Error::CertRevoked),
                "{order:?}"
            );
        }
    }

    /// Item 3: a brought intermediate CA keeps its root in the bundle agents get, whether the
    /// root follows it in `tls.crt` or sits in `ca.crt`; an unrelated CA in `ca.crt` does not.
    #[test]
    fn a_brought_intermediate_keeps_its_chain_in_the_bundle() {
        use crate::identity::ca::{pem_to_ders, test_support};
        let dir = tempfile::tempdir().unwrap();
        let (root, _) = test_support::openssl_root(dir.path(), "Brought Root");
        let (int, int_key) = test_support::openssl_intermediate(dir.path(), "Brought Intermediate");
        let stranger =
            CertificateAuthority::generate("stranger", Duration::from_secs(3600)).unwrap();
        let data = |pairs: &[(&str, &str)]| -> BTreeMap<String, ByteString> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect()
        };
        let expect = [pem_to_ders(&int)[0].clone(), pem_to_ders(&root)[0].clone()];
        // cert-manager's layout: tls.crt is the intermediate, ca.crt its root (+ a stranger).
        let both = format!("{root}{}", stranger.cert_pem());
        let secret = secret_with(
            data(&[("tls.crt", &int), ("tls.key", &int_key), ("ca.crt", &both)]),
            Phase::Idle,
        );
        let (set, _) = CaSet::from_secret(&secret, now()).unwrap();
        assert_eq!(pem_to_ders(&set.bundle()), expect);
        // The chain in tls.crt.
        let chained = format!("{int}{root}");
        let secret = secret_with(
            data(&[("tls.crt", &chained), ("tls.key", &int_key)]),
            Phase::Idle,
        );
        let (set, _) = CaSet::from_secret(&secret, now()).unwrap();
        assert_eq!(pem_to_ders(&set.bundle()), expect);
        // It survives a write back to the Secret (tls.crt keeps the chain).
        let (again, _) =
            CaSet::from_secret(&secret_with(set.secret_data(), Phase::Idle), now()).unwrap();
        assert_eq!(pem_to_ders(&again.bundle()), expect);
        assert_eq!(pem_to_ders(&again.active.full_pem()), expect);
    }
}
