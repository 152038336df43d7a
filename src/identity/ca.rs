//! The certificate authority: ECDSA P-256, its key held in a Kubernetes Secret (never on disk),
//! issuing per-agent leaf certificates whose every field we choose, and signing the CRL.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, RevokedCertParams, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::store::{CertRecord, CertState, Ledger, RevocationReason, StoreError};

/// How far back a leaf's notBefore is set, to tolerate clock skew between nodes.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("the CA certificate does not parse: {0}")]
    BadCaCert(String),
    #[error("the CA key does not match the CA certificate")]
    KeyMismatch,
    #[error("the CA certificate is not a CA (basicConstraints CA:true is missing)")]
    NotCa,
    #[error("the CA certificate expired at {0}")]
    Expired(String),
    #[error("{0}")]
    InvalidName(String),
    #[error(transparent)]
    Ledger(#[from] StoreError),
}

/// A loaded CA: its certificate, and an issuer holding its key.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: Vec<u8>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    fingerprint: String,
    /// Subject key identifier, lowercase hex: what its leaves carry as AKI.
    subject_key_id: Option<String>,
    not_after: OffsetDateTime,
}

impl std::fmt::Debug for CertificateAuthority {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Generates a new self-signed P-256 CA valid for `validity`.
    pub fn generate(common_name: &str, validity: Duration) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "agentry.dev");
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + validity;
        let cert = params.self_signed(&key)?;
        Self::from_pem(&cert.pem(), &key.serialize_pem())
    }

    /// Loads a CA from PEM (as stored in a Secret's tls.crt / tls.key, cert-manager's layout).
    /// Checks that it is a CA, unexpired, and that the key matches.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let der = pem_to_der(cert_pem)
            .ok_or_else(|| CaError::BadCaCert("no CERTIFICATE block".into()))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| CaError::BadCaCert(e.to_string()))?;
        if !x509.is_ca() {
            return Err(CaError::NotCa);
        }
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::KeyMismatch);
        }
        let not_after = x509.validity().not_after.to_datetime();
        if not_after <= OffsetDateTime::now_utc() {
            return Err(CaError::Expired(not_after.to_string()));
        }
        let subject_key_id = x509
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => Some(hex(k.0)),
                _ => None,
            });
        let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key)?;
        Ok(Self {
            subject_key_id,
            cert_pem: der_to_pem(&der),
            fingerprint: sha256_hex(&der),
            cert_der: der,
            key_pem: key_pem.to_string(),
            issuer,
            not_after,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }
    /// The CA key, for writing back to its Secret only.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }
    /// SHA-256 of the CA certificate, lowercase hex.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Issues a leaf for an agent and commits it to the ledger before returning it.
    pub fn issue(&self, ledger: &Ledger, req: &LeafRequest) -> Result<IssuedLeaf, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = OffsetDateTime::now_utc();
        let params = leaf_params(req, now)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let der = cert.der().to_vec();
        let serial = hex(params
            .serial_number
            .as_ref()
            .map(|s| s.as_ref())
            .unwrap_or_default());
        let record = CertRecord {
            serial: serial.clone(),
            agent_uid: req.agent_uid.clone(),
            namespace: req.namespace.clone(),
            name: req.name.clone(),
            spiffe_id: req.spiffe_id(),
            fingerprint: sha256_hex(&der),
            issuer_fingerprint: self.fingerprint.clone(),
            not_before: params.not_before.unix_timestamp(),
            not_after: params.not_after.unix_timestamp(),
            state: CertState::Active,
            revocation_reason: None,
            revoked_at: None,
        };
        // The ledger first: a certificate that is not recorded never leaves this function.
        ledger.record_issued(&record, now.unix_timestamp())?;
        Ok(IssuedLeaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: der,
            record,
        })
    }

    /// Signs a CRL listing every revoked, unexpired certificate in the ledger.
    pub fn crl_pem(&self, ledger: &Ledger, next_update: Duration) -> Result<String, CaError> {
        let now = OffsetDateTime::now_utc();
        let revoked = ledger.revoked_unexpired(now.unix_timestamp())?;
        let number = ledger.next_crl_number()?;
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + next_update,
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .filter(|r| r.issuer_fingerprint == self.fingerprint)
                .filter_map(|r| {
                    Some(RevokedCertParams {
                        serial_number: SerialNumber::from_slice(&unhex(&r.serial)?),
                        revocation_time: OffsetDateTime::from_unix_timestamp(
                            r.revoked_at.unwrap_or(0),
                        )
                        .ok()?,
                        reason_code: r
                            .revocation_reason
                            .as_deref()
                            .map(|s| crl_reason(RevocationReason::parse(s))),
                        invalidity_date: None,
                    })
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

fn crl_reason(r: RevocationReason) -> rcgen::RevocationReason {
    match r {
        RevocationReason::Unspecified => rcgen::RevocationReason::Unspecified,
        RevocationReason::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
        RevocationReason::Superseded => rcgen::RevocationReason::Superseded,
        RevocationReason::CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
        RevocationReason::CaCompromise => rcgen::RevocationReason::CaCompromise,
    }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafRequest {
    pub agent_uid: String,
    pub namespace: String,
    pub name: String,
    pub trust_domain: String,
    pub dns_names: Vec<String>,
    pub ttl: Duration,
}

impl LeafRequest {
    pub fn spiffe_id(&self) -> String {
        spiffe_id(&self.trust_domain, &self.namespace, &self.name)
    }
}

pub fn spiffe_id(trust_domain: &str, namespace: &str, name: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/agent/{name}")
}

/// The DNS names of an agent's Service.
pub fn service_dns_names(namespace: &str, name: &str) -> Vec<String> {
    vec![
        format!("{name}.{namespace}.svc"),
        format!("{name}.{namespace}.svc.cluster.local"),
    ]
}

/// A freshly issued leaf (already in the ledger).
pub struct IssuedLeaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
    pub record: CertRecord,
}

/// Builds a leaf's parameters: only what we choose, never what a requester asks for.
pub fn leaf_params(req: &LeafRequest, now: OffsetDateTime) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "agentry.dev");
    let cn: String = format!("{}.{}", req.name, req.namespace)
        .chars()
        .take(64)
        .collect();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    let uri = req
        .spiffe_id()
        .try_into()
        .map_err(|e: rcgen::Error| CaError::InvalidName(format!("SPIFFE ID: {e}")))?;
    params.subject_alt_names = std::iter::once(Ok(SanType::URI(uri)))
        .chain(req.dns_names.iter().map(|d| {
            d.clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|e: rcgen::Error| CaError::InvalidName(format!("DNS name {d}: {e}")))
        }))
        .collect::<Result<_, _>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params.not_before = now - BACKDATE;
    params.not_after = now + req.ttl;
    Ok(params)
}

/// A positive 128-bit serial from the OS CSPRNG: 126 random bits, never rcgen's default.
pub fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive (top bit clear) and fixed length (second bit set) so DER never trims or pads it.
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The DER of the first CERTIFICATE block in `pem`.
pub fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .find(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
}

/// Every CERTIFICATE block in `pem`, as DER.
pub fn pem_to_ders(pem: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
        .collect()
}

pub fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The facts of an existing leaf that decide between reuse and re-issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafFacts {
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    pub uris: Vec<String>,
    pub dns_names: Vec<String>,
    /// The authority key identifier, lowercase hex.
    pub authority_key_id: Option<String>,
}

/// Reads the facts of a leaf certificate PEM; None when it does not parse.
pub fn leaf_facts(pem: &str) -> Option<LeafFacts> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    let der = pem_to_der(pem)?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der).ok()?;
    let mut uris = Vec::new();
    let mut dns_names = Vec::new();
    let mut authority_key_id = None;
    for ext in x509.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(u) => uris.push(u.to_string()),
                        GeneralName::DNSName(d) => dns_names.push(d.to_string()),
                        _ => {}
                    }
                }
            }
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                authority_key_id = aki.key_identifier.as_ref().map(|k| hex(k.0));
            }
            _ => {}
        }
    }
    Some(LeafFacts {
        serial: hex(x509.raw_serial()),
        not_before: x509.validity().not_before.timestamp(),
        not_after: x509.validity().not_after.timestamp(),
        uris,
        dns_names,
        authority_key_id,
    })
}

impl CertificateAuthority {
    /// An issuer for signing outside `issue` (benchmarks compare against it).
    pub fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// The CA's subject key identifier, lowercase hex (what its leaves carry as AKI); read once
    /// when the CA is loaded, since every reconcile compares against it.
    pub fn subject_key_id(&self) -> Option<&str> {
        self.subject_key_id.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> LeafRequest {
        LeafRequest {
            agent_uid: "uid-1".into(),
            namespace: "team-a".into(),
            name: "summarizer".into(),
            trust_domain: "cluster.local".into(),
            dns_names: service_dns_names("team-a", "summarizer"),
            ttl: Duration::from_secs(24 * 3600),
        }
    }

    #[test]
    fn leaf_carries_exactly_what_we_chose() {
        let ca =
            CertificateAuthority::generate("test CA", Duration::from_secs(86400 * 365)).unwrap();
        let ledger = Ledger::in_memory().unwrap();
        let leaf = ca.issue(&ledger, &request()).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&leaf.cert_der).unwrap();
        assert!(!x509.is_ca());
        assert!(
            !x509
                .tbs_certificate
                .basic_constraints()
                .unwrap()
                .unwrap()
                .value
                .ca
        );
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && eku.server_auth && !eku.code_signing && eku.other.is_empty());
        let ku = x509.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
        let facts = leaf_facts(&leaf.cert_pem).unwrap();
        assert_eq!(
            facts.uris,
            ["spiffe://cluster.local/ns/team-a/agent/summarizer"]
        );
        assert_eq!(
            facts.dns_names,
            [
                "summarizer.team-a.svc",
                "summarizer.team-a.svc.cluster.local"
            ]
        );
        assert_eq!(facts.authority_key_id.as_deref(), ca.subject_key_id());
        assert!(facts.authority_key_id.is_some());
        assert_eq!(
            facts.not_after - facts.not_before,
            24 * 3600 + BACKDATE.as_secs() as i64
        );
        assert_eq!(facts.serial, leaf.record.serial);
        assert_eq!(facts.serial.len(), 32, "128-bit serial");
        // In the ledger, active.
        let row = ledger.get(&facts.serial).unwrap().unwrap();
        assert!(row.state.is_active());
        assert_eq!(row.fingerprint, sha256_hex(&leaf.cert_der));
        assert!(
            x509.verify_signature(Some(
                x509_parser::parse_x509_certificate(ca.cert_der())
                    .unwrap()
                    .1
                    .public_key()
            ))
            .is_ok()
        );
    }

    #[test]
    fn ca_round_trips_through_pem_and_refuses_mismatched_keys() {
        let ca = CertificateAuthority::generate("a", Duration::from_secs(3600)).unwrap();
        let again = CertificateAuthority::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
        let other = CertificateAuthority::generate("b", Duration::from_secs(3600)).unwrap();
        assert!(matches!(
            CertificateAuthority::from_pem(ca.cert_pem(), other.key_pem()),
            Err(CaError::KeyMismatch)
        ));
        assert!(CertificateAuthority::from_pem("garbage", ca.key_pem()).is_err());
        // A leaf is not a CA.
        let ledger = Ledger::in_memory().unwrap();
        let leaf = ca.issue(&ledger, &request()).unwrap();
        assert!(matches!(
            CertificateAuthority::from_pem(&leaf.cert_pem, &leaf.key_pem),
            Err(CaError::NotCa)
        ));
    }

    #[test]
    fn crl_lists_revoked_serials() {
        let ca = CertificateAuthority::generate("a", Duration::from_secs(3600)).unwrap();
        let ledger = Ledger::in_memory().unwrap();
        let leaf = ca.issue(&ledger, &request()).unwrap();
        ledger
            .revoke(
                &leaf.record.serial,
                RevocationReason::KeyCompromise,
                OffsetDateTime::now_utc().unix_timestamp(),
            )
            .unwrap();
        let crl = ca.crl_pem(&ledger, Duration::from_secs(3600)).unwrap();
        let der = x509_parser::pem::parse_x509_pem(crl.as_bytes())
            .unwrap()
            .1
            .contents;
        let (_, parsed) = x509_parser::parse_x509_crl(&der).unwrap();
        let serials: Vec<String> = parsed
            .iter_revoked_certificates()
            .map(|r| hex(r.raw_serial()))
            .collect();
        assert_eq!(serials, std::slice::from_ref(&leaf.record.serial));
    }

    /// 100,000 certificates issued through the CA and its ledger: every serial distinct (the
    /// ledger's primary key would refuse a repeat) and 128 bits wide.
    #[test]
    fn a_hundred_thousand_issued_serials_are_unique() {
        let ca = CertificateAuthority::generate("a", Duration::from_secs(3600)).unwrap();
        let ledger = Ledger::in_memory().unwrap();
        let mut seen = std::collections::HashSet::new();
        for i in 0..100_000 {
            let mut req = request();
            req.agent_uid = format!("uid-{i}");
            let leaf = ca.issue(&ledger, &req).unwrap();
            assert_eq!(leaf.record.serial.len(), 32);
            assert!(seen.insert(leaf.record.serial), "duplicate serial at {i}");
        }
        assert_eq!(ledger.count().unwrap(), 100_000);
    }

    #[test]
    fn serials_are_unique_positive_and_wide() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100_000 {
            let s = random_serial();
            let b = s.to_bytes();
            assert_eq!(b.len(), 16);
            assert!(b[0] & 0x80 == 0 && b[0] & 0x40 != 0);
            assert!(seen.insert(b), "duplicate serial");
        }
    }
}
