//! The stale-ledger guard: before the leader publishes a CRL, it compares its ledger with the
//! CRL already published (the `agentry-ca` ConfigMap). A ledger restored from an old copy (a
//! replica that lagged, a backup, a standby's own volume) may lack revocations that the
//! published CRL lists; a CRL signed from it would un-revoke those certificates. So the
//! controller refuses to issue or publish until the ledger is restored from the replica, or an
//! operator adopts the published CRL (`--adopt-published-crl`). Only CRLs whose signature
//! verifies against one of our CAs count: the ConfigMap is not a trusted source by itself.
//! See docs/ha.md.

use std::sync::Arc;

use x509_parser::prelude::{FromDer, X509Certificate};

use super::ca::{CertificateAuthority, hex};
use super::store::{AdoptedRevocation, Ledger, StoreError};

/// The revocations of the published CRLs that verified against one of our CAs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PublishedCrl {
    /// The highest CRL number among the verified CRLs (0 when none verified).
    pub number: u64,
    pub revoked: Vec<AdoptedRevocation>,
    /// CRLs in the bundle that did not verify against any of our CAs (ignored).
    pub unverified: usize,
}

/// How the ledger compares with the published CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerCheck {
    /// Every published revocation is in the ledger; `number_behind` when the published CRL
    /// number is above the ledger's (harmless: the next CRL continues above it).
    InStep { number_behind: bool },
    /// The ledger lacks revocations that the published CRL lists.
    Behind(Behind),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Behind {
    /// Serials the published CRL lists that the ledger does not hold as revoked.
    pub missing: Vec<String>,
    pub published_number: u64,
    pub ledger_number: u64,
}

impl Behind {
    /// The operator-facing message: what is wrong, what the controller does, and the fix.
    pub fn message(&self) -> String {
        format!(
            "the ledger is behind the published CRL: {} revoked serial(s) listed in CRL number {} \
             are not revoked in the ledger (ledger CRL number {}); refusing to issue or publish a \
             CRL (it would un-revoke them). Fix: restore the ledger from the replica \
             (`litestream restore`) and restart, or restart with --adopt-published-crl to apply \
             the published, signature-verified CRL to this ledger; see docs/ha.md",
            self.missing.len(),
            self.published_number,
            self.ledger_number,
        )
    }
}

/// Parses the CRLs of a PEM bundle and keeps the revocations of those signed by one of `cas`.
/// `not_after` of each revocation is its CA's notAfter (no leaf outlives its CA).
pub fn verified_revocations(pem: &str, cas: &[Arc<CertificateAuthority>]) -> PublishedCrl {
    let mut out = PublishedCrl::default();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()).filter_map(Result::ok) {
        if block.label != "X509 CRL" {
            continue;
        }
        let Ok((_, crl)) = x509_parser::parse_x509_crl(&block.contents) else {
            out.unverified += 1;
            continue;
        };
        let Some(ca) = cas.iter().find(|ca| {
            X509Certificate::from_der(ca.cert_der())
                .is_ok_and(|(_, cert)| crl.verify_signature(cert.public_key()).is_ok())
        }) else {
            out.unverified += 1;
            continue;
        };
        let number = crl
            .crl_number()
            .map(|n| n.to_bytes_be())
            .filter(|b| b.len() <= 8)
            .map(|b| b.iter().fold(0u64, |n, x| (n << 8) | u64::from(*x)))
            .unwrap_or(0);
        out.number = out.number.max(number);
        for r in crl.iter_revoked_certificates() {
            out.revoked.push(AdoptedRevocation {
                serial: hex(r.raw_serial()),
                reason: reason_name(r.reason_code().map(|(_, c)| c.0)).to_string(),
                revoked_at: r.revocation_date.timestamp(),
                issuer_fingerprint: ca.fingerprint().to_string(),
                not_after: ca.not_after().unix_timestamp(),
            });
        }
    }
    out
}

/// RFC 5280 CRLReason code → the ledger's name.
fn reason_name(code: Option<u8>) -> &'static str {
    match code {
        Some(1) => "keyCompromise",
        Some(2) => "cACompromise",
        Some(4) => "superseded",
        Some(5) => "cessationOfOperation",
        _ => "unspecified",
    }
}

/// Compares the ledger with the verified published CRL.
pub fn check(ledger: &Ledger, published: &PublishedCrl) -> Result<LedgerCheck, StoreError> {
    let serials: Vec<String> = published.revoked.iter().map(|r| r.serial.clone()).collect();
    let missing: Vec<String> = ledger
        .not_revoked(&serials)?
        .into_iter()
        .map(str::to_string)
        .collect();
    let ledger_number = ledger.crl_number()?;
    if missing.is_empty() {
        return Ok(LedgerCheck::InStep {
            number_behind: published.number > ledger_number,
        });
    }
    Ok(LedgerCheck::Behind(Behind {
        missing,
        published_number: published.number,
        ledger_number,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::test_support::numbered_request;
    use crate::identity::store::{CertState, RevocationReason};
    use std::time::Duration;

    fn ca(name: &str) -> Arc<CertificateAuthority> {
        Arc::new(CertificateAuthority::generate(name, Duration::from_secs(86400)).unwrap())
    }

    fn issue(ca: &CertificateAuthority, ledger: &Ledger, i: usize) -> String {
        ca.issue(ledger, &numbered_request(i))
            .unwrap()
            .record
            .serial
    }

    fn crl(ca: &CertificateAuthority, ledger: &Ledger) -> String {
        let now = time::OffsetDateTime::now_utc();
        let revoked = ledger.revoked_unexpired(now.unix_timestamp()).unwrap();
        let number = ledger.next_crl_number().unwrap();
        ca.sign_crl(&revoked, number, now, Duration::from_secs(3600))
            .unwrap()
    }

    /// The published CRL lists revocations an older copy of the ledger lacks (one it holds as
    /// active, one it never saw): the check names both; adopting them makes it in step again,
    /// the next CRL number is above the published one, and the adopted rows stay on the CRL.
    #[test]
    fn an_older_ledger_is_behind_until_the_published_crl_is_adopted() {
        let ca = ca("agentry CA (td)");
        let current = Ledger::in_memory().unwrap();
        let older = Ledger::in_memory().unwrap();
        let a = issue(&ca, &current, 1);
        let rec = current.get(&a).unwrap().unwrap();
        older.record_issued(&rec, 1).unwrap(); // the older copy knows `a`, not `b`
        let b = issue(&ca, &current, 2);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        current
            .revoke(&a, RevocationReason::KeyCompromise, now)
            .unwrap();
        current
            .revoke(&b, RevocationReason::Superseded, now)
            .unwrap();
        let published = verified_revocations(&crl(&ca, &current), std::slice::from_ref(&ca));
        assert_eq!(published.unverified, 0);
        assert_eq!(published.number, 1);
        assert_eq!(
            check(&current, &published).unwrap(),
            LedgerCheck::InStep {
                number_behind: false
            }
        );
        let LedgerCheck::Behind(behind) = check(&older, &published).unwrap() else {
            panic!("an older ledger must be behind");
        };
        let mut missing = behind.missing.clone();
        missing.sort();
        let mut want = vec![a.clone(), b.clone()];
        want.sort();
        assert_eq!(missing, want);
        assert!(behind.message().contains("2 revoked serial(s)"));
        assert!(behind.message().contains("docs/ha.md"));

        assert_eq!(
            older
                .adopt_revocations(&published.revoked, published.number, now)
                .unwrap(),
            2
        );
        assert_eq!(
            check(&older, &published).unwrap(),
            LedgerCheck::InStep {
                number_behind: false
            }
        );
        let row = older.get(&a).unwrap().unwrap();
        assert_eq!(row.state, CertState::Revoked);
        assert_eq!(row.revocation_reason.as_deref(), Some("keyCompromise"));
        assert_eq!(
            older.get(&b).unwrap().unwrap().agent_uid,
            "adopted-from-crl"
        );
        // The next CRL from the adopted ledger lists both, above the published number.
        let next = verified_revocations(&crl(&ca, &older), std::slice::from_ref(&ca));
        assert_eq!(next.number, 2);
        let serials: Vec<_> = next.revoked.iter().map(|r| r.serial.clone()).collect();
        assert!(serials.contains(&a) && serials.contains(&b), "{serials:?}");
    }

    /// A CRL not signed by one of our CAs (a forged ConfigMap, a leftover of another install)
    /// is ignored: it neither blocks the controller nor feeds the ledger.
    #[test]
    fn a_crl_from_another_ca_is_not_trusted() {
        let ours = ca("agentry CA (td)");
        let theirs = ca("agentry CA (td)");
        let ledger = Ledger::in_memory().unwrap();
        let serial = issue(&theirs, &ledger, 1);
        ledger
            .revoke(&serial, RevocationReason::KeyCompromise, 1)
            .unwrap();
        let forged = crl(&theirs, &ledger);
        let published = verified_revocations(&forged, std::slice::from_ref(&ours));
        assert_eq!(published.unverified, 1);
        assert!(published.revoked.is_empty());
        let empty = Ledger::in_memory().unwrap();
        assert_eq!(
            check(&empty, &published).unwrap(),
            LedgerCheck::InStep {
                number_behind: false
            }
        );
        // Tampering with a real CRL breaks its signature too.
        let mut der = crate::identity::ca::pem_blocks(&forged, "X509 CRL").remove(0);
        let last = der.len() - 1;
        der[last] ^= 1;
        let pem = format!(
            "-----BEGIN X509 CRL-----\n{}\n-----END X509 CRL-----\n",
            base64_lines(&der)
        );
        assert_eq!(
            verified_revocations(&pem, std::slice::from_ref(&theirs)).unverified,
            1
        );
    }

    /// A CRL number above the ledger's with every revocation present (a standby that took over
    /// with a fresh ledger before anything was revoked) is not a refusal.
    #[test]
    fn a_number_behind_without_missing_revocations_is_in_step() {
        let ca = ca("agentry CA (td)");
        let published_from = Ledger::in_memory().unwrap();
        for _ in 0..3 {
            published_from.next_crl_number().unwrap();
        }
        let published = verified_revocations(&crl(&ca, &published_from), std::slice::from_ref(&ca));
        assert_eq!(published.number, 4);
        let fresh = Ledger::in_memory().unwrap();
        assert_eq!(
            check(&fresh, &published).unwrap(),
            LedgerCheck::InStep {
                number_behind: true
            }
        );
    }

    fn base64_lines(der: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(der)
    }
}
