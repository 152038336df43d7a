//! Checking what is read back from an agent's identity Secret. The Secret lives in the tenant's
//! namespace, so anyone allowed to write Secrets there can put anything in it: a certificate is
//! trusted (reused, renewed from, revoked) only once it chains to one of our CAs, its ledger row
//! belongs to this Agent and carries its fingerprint, and the stored key is its key.

use std::sync::Arc;

use super::ca::{self, CertificateAuthority, LeafFacts};
use super::store::CertRecord;

/// Why a stored certificate is not trusted. Messages name no secrets; they go into Events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    #[error("no certificate stored")]
    Missing,
    #[error("the stored certificate does not parse")]
    Unparseable,
    #[error("the stored certificate is not signed by any of our CAs")]
    ForeignIssuer,
    #[error("serial {0} is not in the ledger")]
    NotInLedger(String),
    #[error("serial {0} belongs to another Agent")]
    OtherAgent(String),
    #[error("serial {0} is in the ledger with a different certificate")]
    FingerprintMismatch(String),
    #[error("the stored private key is missing or does not match the certificate")]
    KeyMismatch,
}

/// A stored certificate that passed every check.
#[derive(Debug, Clone)]
pub struct TrustedLeaf {
    pub facts: LeafFacts,
    pub der: Vec<u8>,
    pub record: CertRecord,
    /// SHA-256 of the CA that signed it.
    pub issuer_fingerprint: String,
}

/// The serial a stored certificate claims, to look up its ledger row. Claims only: nothing is
/// trusted until [`verify_leaf`] has run.
pub fn claimed_serial(cert_pem: &str) -> Option<String> {
    ca::leaf_facts(cert_pem).map(|f| f.serial)
}

/// The CA among `cas` that signed `leaf` (subject match and a verified signature).
pub fn issuer_of<'a>(
    leaf: &x509_parser::certificate::X509Certificate<'_>,
    cas: &'a [Arc<CertificateAuthority>],
) -> Option<&'a Arc<CertificateAuthority>> {
    cas.iter().find(|authority| {
        x509_parser::parse_x509_certificate(authority.cert_der()).is_ok_and(|(_, ca_cert)| {
            leaf.issuer() == ca_cert.subject()
                && leaf.verify_signature(Some(ca_cert.public_key())).is_ok()
        })
    })
}

/// Verifies a stored certificate and key against our CAs and the ledger row of its serial
/// (`record`, looked up by [`claimed_serial`]) for the Agent with uid `agent_uid`.
pub fn verify_leaf(
    cert_pem: &str,
    key_pem: &str,
    cas: &[Arc<CertificateAuthority>],
    record: Option<&CertRecord>,
    agent_uid: &str,
) -> Result<TrustedLeaf, Untrusted> {
    if cert_pem.trim().is_empty() {
        return Err(Untrusted::Missing);
    }
    let der = ca::pem_to_der(cert_pem).ok_or(Untrusted::Unparseable)?;
    let (_, leaf) =
        x509_parser::parse_x509_certificate(&der).map_err(|_| Untrusted::Unparseable)?;
    let issuer = issuer_of(&leaf, cas).ok_or(Untrusted::ForeignIssuer)?;
    let facts = ca::leaf_facts(cert_pem).ok_or(Untrusted::Unparseable)?;
    let serial = facts.serial.clone();
    let record = record
        .filter(|r| r.serial == serial)
        .ok_or_else(|| Untrusted::NotInLedger(serial.clone()))?;
    if record.agent_uid != agent_uid {
        return Err(Untrusted::OtherAgent(serial));
    }
    if record.fingerprint != ca::sha256_hex(&der)
        || record.issuer_fingerprint != issuer.fingerprint()
    {
        return Err(Untrusted::FingerprintMismatch(serial));
    }
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|_| Untrusted::KeyMismatch)?;
    use rcgen::PublicKeyData;
    if leaf.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(Untrusted::KeyMismatch);
    }
    Ok(TrustedLeaf {
        facts,
        der: der.clone(),
        record: record.clone(),
        issuer_fingerprint: issuer.fingerprint().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::identity::ca::{LeafRequest, service_dns_names};
    use crate::identity::store::Ledger;

    fn request(uid: &str, name: &str) -> LeafRequest {
        LeafRequest {
            agent_uid: uid.into(),
            agent_created: 1_700_000_000,
            namespace: "ns".into(),
            name: name.into(),
            trust_domain: "cluster.local".into(),
            dns_names: service_dns_names("ns", name),
            ttl: Duration::from_secs(3600),
        }
    }

    fn ca() -> Arc<CertificateAuthority> {
        Arc::new(CertificateAuthority::generate("test", Duration::from_secs(86400)).unwrap())
    }

    /// A self-signed certificate carrying `serial`, as a tenant could make one.
    fn forged(serial_hex: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["victim.ns.svc".into()]).unwrap();
        let bytes: Vec<u8> = (0..serial_hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&serial_hex[i..i + 2], 16).unwrap())
            .collect();
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&bytes));
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn our_own_certificate_is_trusted() {
        let ca = ca();
        let ledger = Ledger::in_memory().unwrap();
        let leaf = ca.issue(&ledger, &request("uid-a", "a")).unwrap();
        let row = ledger.get(&leaf.record.serial).unwrap();
        let trusted = verify_leaf(
            &leaf.cert_pem,
            &leaf.key_pem,
            std::slice::from_ref(&ca),
            row.as_ref(),
            "uid-a",
        )
        .unwrap();
        assert_eq!(trusted.facts.serial, leaf.record.serial);
        assert_eq!(claimed_serial(&leaf.cert_pem).unwrap(), leaf.record.serial);
    }

    /// The attack of issue 8: a self-signed certificate carrying another Agent's (public)
    /// serial, planted in the attacker's own Secret.
    #[test]
    fn a_forged_certificate_with_a_victims_serial_is_refused() {
        let ca = ca();
        let ledger = Ledger::in_memory().unwrap();
        let victim = ca.issue(&ledger, &request("uid-victim", "victim")).unwrap();
        let (cert, key) = forged(&victim.record.serial);
        let row = ledger.get(&claimed_serial(&cert).unwrap()).unwrap();
        assert_eq!(row.as_ref().unwrap().agent_uid, "uid-victim");
        let cas = [ca];
        assert_eq!(
            verify_leaf(&cert, &key, &cas, row.as_ref(), "uid-attacker").unwrap_err(),
            Untrusted::ForeignIssuer
        );
        // The victim's real certificate, copied (it is public), is still not the attacker's.
        let row = ledger.get(&victim.record.serial).unwrap();
        assert_eq!(
            verify_leaf(
                &victim.cert_pem,
                &victim.key_pem,
                &cas,
                row.as_ref(),
                "uid-attacker"
            )
            .unwrap_err(),
            Untrusted::OtherAgent(victim.record.serial.clone())
        );
    }

    #[test]
    fn every_other_defect_is_named() {
        let ca = ca();
        let other_ca = self::ca();
        let ledger = Ledger::in_memory().unwrap();
        let leaf = ca.issue(&ledger, &request("u", "a")).unwrap();
        let row = ledger.get(&leaf.record.serial).unwrap().unwrap();
        let cas = [ca.clone()];
        let check = |cert: &str, key: &str, row: Option<&CertRecord>| {
            verify_leaf(cert, key, &cas, row, "u").map(|_| ())
        };
        assert_eq!(check("", "", None), Err(Untrusted::Missing));
        assert_eq!(
            check(
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "",
                None
            ),
            Err(Untrusted::Unparseable)
        );
        assert_eq!(
            check(&leaf.cert_pem, &leaf.key_pem, None),
            Err(Untrusted::NotInLedger(leaf.record.serial.clone()))
        );
        let mut wrong = row.clone();
        wrong.fingerprint = "00".into();
        assert_eq!(
            check(&leaf.cert_pem, &leaf.key_pem, Some(&wrong)),
            Err(Untrusted::FingerprintMismatch(leaf.record.serial.clone()))
        );
        let other_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .serialize_pem();
        assert_eq!(
            check(&leaf.cert_pem, &other_key, Some(&row)),
            Err(Untrusted::KeyMismatch)
        );
        assert_eq!(
            check(&leaf.cert_pem, "garbage", Some(&row)),
            Err(Untrusted::KeyMismatch)
        );
        // Signed by a CA we do not hold.
        let stranger = other_ca.issue(&ledger, &request("u", "a")).unwrap();
        let row = ledger.get(&stranger.record.serial).unwrap();
        assert_eq!(
            check(&stranger.cert_pem, &stranger.key_pem, row.as_ref()),
            Err(Untrusted::ForeignIssuer)
        );
    }
}
