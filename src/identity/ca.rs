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
    #[error(
        "the signing CA expired at {0}; no certificate can be issued until it is replaced \
         (`agentry ca rotate` activates a new CA at once when the signing CA has expired)"
    )]
    SigningCaExpired(String),
    #[error("{0}")]
    InvalidName(String),
    #[error(transparent)]
    Ledger(#[from] StoreError),
}

/// A loaded CA: its certificate, and an issuer holding its key.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: Vec<u8>,
    /// Certificates above this CA (an intermediate's issuers, up to its root), DER, in order:
    /// kept so the trust bundle agents get holds the whole chain of a brought CA.
    chain: Vec<Vec<u8>>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    fingerprint: String,
    /// Subject key identifier, lowercase hex: what its leaves carry as AKI.
    subject_key_id: Option<String>,
    /// The same, raw: what its CRLs carry as AKI (never recomputed: a CA made by
    /// `openssl req -x509` uses SHA-1 key ids).
    subject_key_id_raw: Option<Vec<u8>>,
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
    ///
    /// Its common name is `common_name` followed by the first 8 hex digits of its key id, so
    /// that every CA has a distinct subject: a verifier picks a CRL by issuer name, and during
    /// a rotation two CAs are trusted at once.
    pub fn generate(common_name: &str, validity: Duration) -> Result<Self, CaError> {
        let now = OffsetDateTime::now_utc();
        Self::generate_valid(common_name, now - BACKDATE, now + validity)
    }

    /// Generates a new self-signed P-256 CA valid from `not_before` to `not_after` (which may
    /// be in the past: tests craft expired CAs with it).
    pub fn generate_valid(
        common_name: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        // RFC 7093 method 1, as rcgen computes it by default, but fixed here so the name can
        // carry it.
        let key_id = Sha256::digest(key.subject_public_key_info())[..20].to_vec();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "agentry.dev");
        dn.push(
            DnType::CommonName,
            format!("{common_name} {}", hex(&key_id[..4])),
        );
        params.distinguished_name = dn;
        params.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(key_id);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.self_signed(&key)?;
        Self::load(&cert.pem(), &key.serialize_pem())
    }

    /// Loads a CA from PEM (as stored in a Secret's tls.crt / tls.key, cert-manager's layout).
    /// Checks that it is a CA, unexpired, and that the key matches.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let ca = Self::load(cert_pem, key_pem)?;
        if ca.is_expired_at(OffsetDateTime::now_utc().unix_timestamp()) {
            return Err(CaError::Expired(ca.not_after.to_string()));
        }
        Ok(ca)
    }

    /// Like `from_pem`, but an expired CA loads too (the controller must start, say so, and
    /// refuse to issue, rather than fail). The first CERTIFICATE block is the CA; any further
    /// blocks are its chain (an intermediate's issuers) and are kept for the trust bundle.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem)?;
        let mut ders = pem_to_ders(cert_pem).into_iter();
        let der = ders
            .next()
            .ok_or_else(|| CaError::BadCaCert("no CERTIFICATE block".into()))?;
        let chain: Vec<Vec<u8>> = ders.filter(|d| *d != der).collect();
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| CaError::BadCaCert(e.to_string()))?;
        if !x509.is_ca() {
            return Err(CaError::NotCa);
        }
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::KeyMismatch);
        }
        let not_after = x509.validity().not_after.to_datetime();
        let subject_key_id_raw =
            x509.extensions()
                .iter()
                .find_map(|e| match e.parsed_extension() {
                    x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => {
                        Some(k.0.to_vec())
                    }
                    _ => None,
                });
        // Leaves' AKI: rcgen takes the CA's own SKI when it has one (`KeyIdMethod::PreSpecified`).
        let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key)?;
        Ok(Self {
            subject_key_id: subject_key_id_raw.as_deref().map(hex),
            subject_key_id_raw,
            cert_pem: der_to_pem(&der),
            fingerprint: sha256_hex(&der),
            cert_der: der,
            chain,
            key_pem: key_pem.to_string(),
            issuer,
            not_after,
        })
    }

    /// Adds, from `pem` (a Secret's `ca.crt`), each certificate that issued the top of this
    /// CA's chain, walking up to a self-signed root. Certificates that issued nothing here
    /// (other CAs of a rotation, strangers) are ignored.
    pub fn adopt_issuers(&mut self, pem: &str) {
        let candidates = pem_to_ders(pem);
        loop {
            let top = self.chain.last().unwrap_or(&self.cert_der).clone();
            let Ok((_, top_x509)) = x509_parser::parse_x509_certificate(&top) else {
                return;
            };
            if top_x509.subject() == top_x509.issuer() {
                return; // a root
            }
            let found = candidates.iter().find(|c| {
                **c != self.cert_der
                    && !self.chain.contains(c)
                    && x509_parser::parse_x509_certificate(c).is_ok_and(|(_, x)| {
                        x.is_ca()
                            && x.subject() == top_x509.issuer()
                            && top_x509.verify_signature(Some(x.public_key())).is_ok()
                    })
            });
            match found {
                Some(c) => self.chain.push(c.clone()),
                None => return,
            }
        }
    }

    /// The certificates above this CA, PEM (empty for a self-signed CA).
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(|d| der_to_pem(d)).collect()
    }

    /// This CA's certificate followed by its chain, PEM: what its Secret's `tls.crt` holds.
    pub fn full_pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.chain_pem())
    }

    /// The DER of this CA and of its chain, in order.
    pub fn ders(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(self.cert_der.as_slice()).chain(self.chain.iter().map(Vec::as_slice))
    }

    /// Whether the CA's notAfter is at or before `now` (unix seconds).
    pub fn is_expired_at(&self, now: i64) -> bool {
        self.not_after.unix_timestamp() <= now
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
    ///
    /// A leaf never outlives its CA: its notAfter is clamped to the CA's, and
    /// `IssuedLeaf::clamped_to` says so. An expired CA issues nothing.
    pub fn issue(&self, ledger: &Ledger, req: &LeafRequest) -> Result<IssuedLeaf, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut leaf = self.issue_for_key(ledger, req, &key)?;
        leaf.key_pem = key.serialize_pem();
        Ok(leaf)
    }

    /// Issues a leaf for a public key the requester holds the private half of (a CSR): the
    /// same parameters as [`Self::issue`], decided here, none copied from the request. The
    /// returned `key_pem` is empty.
    pub fn issue_for_key(
        &self,
        ledger: &Ledger,
        req: &LeafRequest,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<IssuedLeaf, CaError> {
        let now = OffsetDateTime::now_utc();
        if self.is_expired_at(now.unix_timestamp()) {
            return Err(CaError::SigningCaExpired(self.not_after.to_string()));
        }
        let mut params = leaf_params(req, now)?;
        let clamped_to = (params.not_after > self.not_after).then(|| {
            params.not_after = self.not_after;
            self.not_after.unix_timestamp()
        });
        let cert = params.signed_by(public_key, &self.issuer)?;
        let der = cert.der().to_vec();
        let serial = hex(params
            .serial_number
            .as_ref()
            .map(|s| s.as_ref())
            .unwrap_or_default());
        let record = CertRecord {
            serial: serial.clone(),
            agent_uid: req.agent_uid.clone(),
            agent_created: req.agent_created,
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
        let record = ledger.record(record, now.unix_timestamp())?;
        Ok(IssuedLeaf {
            cert_pem: cert.pem(),
            key_pem: String::new(),
            cert_der: der,
            record,
            clamped_to,
        })
    }

    /// Signs a CRL listing every revoked, unexpired certificate in the ledger, with the
    /// ledger's next CRL number. (The controller publishes through `CrlPublisher`, which
    /// orders numbers; this is for one-off use.)
    pub fn crl_pem(&self, ledger: &Ledger, next_update: Duration) -> Result<String, CaError> {
        let now = OffsetDateTime::now_utc();
        let revoked = ledger.revoked_unexpired(now.unix_timestamp())?;
        let number = ledger.next_crl_number()?;
        self.sign_crl(&revoked, number, now, next_update)
    }

    /// Signs a CRL numbered `number` listing those of `revoked` that this CA issued. Its AKI is
    /// this CA's own subject key identifier (as read from its certificate, never recomputed).
    pub fn sign_crl(
        &self,
        revoked: &[CertRecord],
        number: u64,
        now: OffsetDateTime,
        next_update: Duration,
    ) -> Result<String, CaError> {
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
            key_identifier_method: match &self.subject_key_id_raw {
                Some(ski) => rcgen::KeyIdMethod::PreSpecified(ski.clone()),
                None => rcgen::KeyIdMethod::Sha256,
            },
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
    /// When the Agent was created, unix seconds: with the uid, its key in the ledger (see
    /// [`crate::identity::store::AgentKey`]).
    pub agent_created: i64,
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
    /// Set (to the CA's notAfter, unix seconds) when the requested lifetime would have
    /// outlived the CA and notAfter was cut to the CA's: worth an Event.
    pub clamped_to: Option<i64>,
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
            match d.parse::<std::net::IpAddr>() {
                // The API server's certificate also names loopback addresses.
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => d
                    .clone()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|e: rcgen::Error| CaError::InvalidName(format!("DNS name {d}: {e}"))),
            }
        }))
        .collect::<Result<_, _>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(leaf_serial(now));
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

/// A positive 128-bit leaf serial: the issuance time in milliseconds (46 bits) followed by 80
/// bits from the OS CSPRNG (more than the 64 the CA/Browser Forum asks for). Time-ordered
/// serials land next to each other in the ledger's serial index, so a group commit writes a
/// few index pages instead of one random page per certificate.
pub fn leaf_serial(now: OffsetDateTime) -> SerialNumber {
    let millis = (now.unix_timestamp_nanos() / 1_000_000).clamp(0, (1 << 46) - 1) as u64;
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
    bytes[6..].copy_from_slice(&rand::random::<[u8; 10]>());
    // Positive (top bit clear) and fixed length (second bit set) so DER never trims or pads it.
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Lowercase hex (serials, fingerprints, key ids in the ledger and in status).
pub fn hex(bytes: &[u8]) -> String {
    ::hex::encode(bytes)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    ::hex::decode(s).ok()
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
    pem_blocks(pem, "CERTIFICATE")
}

/// The DER contents of every PEM block labelled `label` (`X509 CRL`, `CERTIFICATE REQUEST`...).
pub fn pem_blocks(pem: &str, label: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .filter(|p| p.label == label)
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
            agent_created: 1_700_000_000,
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

    fn common_name(der: &[u8]) -> String {
        let (_, x) = x509_parser::parse_x509_certificate(der).unwrap();
        x.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    }

    fn crl_aki(crl_pem: &str) -> Option<String> {
        let der = x509_parser::pem::parse_x509_pem(crl_pem.as_bytes())
            .unwrap()
            .1
            .contents;
        let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
        crl.extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                    a.key_identifier.as_ref().map(|k| hex(k.0))
                }
                _ => None,
            })
    }

    /// Item 2 of issue 8: two CAs of one trust domain never share a subject.
    #[test]
    fn every_generated_ca_has_a_distinct_subject() {
        let a =
            CertificateAuthority::generate("agentry CA (td)", Duration::from_secs(3600)).unwrap();
        let b =
            CertificateAuthority::generate("agentry CA (td)", Duration::from_secs(3600)).unwrap();
        let (cn_a, cn_b) = (common_name(a.cert_der()), common_name(b.cert_der()));
        assert_ne!(cn_a, cn_b);
        // The suffix is the start of the CA's own key id.
        let ski = a.subject_key_id().unwrap();
        assert_eq!(cn_a, format!("agentry CA (td) {}", &ski[..8]));
    }

    /// Item 4: a leaf never outlives its CA, and says when it was cut short.
    #[test]
    fn a_leaf_never_outlives_its_ca() {
        let ca = CertificateAuthority::generate("a", Duration::from_secs(3600)).unwrap();
        let ledger = Ledger::in_memory().unwrap();
        let leaf = ca.issue(&ledger, &request()).unwrap(); // asks for 24h
        let facts = leaf_facts(&leaf.cert_pem).unwrap();
        assert_eq!(facts.not_after, ca.not_after().unix_timestamp());
        assert_eq!(leaf.clamped_to, Some(ca.not_after().unix_timestamp()));
        assert_eq!(leaf.record.not_after, ca.not_after().unix_timestamp());
        let mut short = request();
        short.ttl = Duration::from_secs(600);
        let leaf = ca.issue(&ledger, &short).unwrap();
        assert_eq!(leaf.clamped_to, None);
        assert!(leaf_facts(&leaf.cert_pem).unwrap().not_after < ca.not_after().unix_timestamp());
    }

    /// Item 5: an expired CA loads (so the controller can start and say so) but issues nothing.
    #[test]
    fn an_expired_ca_loads_but_issues_nothing() {
        let now = OffsetDateTime::now_utc();
        let ca = CertificateAuthority::generate_valid(
            "old",
            now - Duration::from_secs(7200),
            now - Duration::from_secs(60),
        )
        .unwrap();
        assert!(matches!(
            CertificateAuthority::from_pem(ca.cert_pem(), ca.key_pem()),
            Err(CaError::Expired(_))
        ));
        let loaded = CertificateAuthority::load(ca.cert_pem(), ca.key_pem()).unwrap();
        assert!(loaded.is_expired_at(now.unix_timestamp()));
        let ledger = Ledger::in_memory().unwrap();
        let err = loaded.issue(&ledger, &request()).err().unwrap();
        assert!(matches!(err, CaError::SigningCaExpired(_)), "{err}");
        assert!(err.to_string().contains("agentry ca rotate"), "{err}");
        assert_eq!(ledger.count().unwrap(), 0);
    }

    /// Item 3: a CA brought from `openssl req -x509` has a SHA-1 key id; its leaves' AKI and its
    /// CRL's AKI must be that key id, not one recomputed with SHA-256.
    #[test]
    fn a_brought_openssl_ca_keeps_its_own_key_id_in_leaves_and_crls() {
        let dir = tempfile::tempdir().unwrap();
        let (crt, key) = test_support::openssl_root(dir.path(), "Brought Root");
        let ca = CertificateAuthority::from_pem(&crt, &key).unwrap();
        let ski = ca.subject_key_id().unwrap().to_string();
        let spki_sha256 = {
            let (_, x) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
            hex(&Sha256::digest(x.public_key().raw)[..20])
        };
        assert_ne!(ski, spki_sha256, "openssl uses SHA-1 key ids");
        let ledger = Ledger::in_memory().unwrap();
        let leaf = ca.issue(&ledger, &request()).unwrap();
        assert_eq!(
            leaf_facts(&leaf.cert_pem).unwrap().authority_key_id,
            Some(ski.clone())
        );
        let crl = ca.crl_pem(&ledger, Duration::from_secs(3600)).unwrap();
        assert_eq!(crl_aki(&crl), Some(ski));
        // And openssl itself accepts the leaf with the CRL.
        std::fs::write(dir.path().join("leaf.pem"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.path().join("crl.pem"), &crl).unwrap();
        let out = std::process::Command::new("openssl")
            .current_dir(dir.path())
            .args([
                "verify",
                "-crl_check",
                "-CAfile",
                "ca.crt",
                "-CRLfile",
                "crl.pem",
            ])
            .arg("leaf.pem")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    #[test]
    fn leaf_serials_are_unique_positive_wide_and_time_ordered() {
        let mut seen = std::collections::HashSet::new();
        let start = OffsetDateTime::now_utc();
        let mut last = Vec::new();
        for i in 0..100_000i64 {
            let b = leaf_serial(start + time::Duration::milliseconds(i / 10)).to_bytes();
            assert_eq!(b.len(), 16);
            assert!(b[0] & 0x80 == 0 && b[0] & 0x40 != 0);
            assert!(
                b[..6] >= last[..last.len().min(6)],
                "not time-ordered at {i}"
            );
            last = b.clone();
            assert!(seen.insert(b), "duplicate serial");
        }
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

#[cfg(test)]
pub(crate) mod test_support {
    //! CAs made by `openssl`, as an operator would bring them; numbered leaf requests.
    use std::path::Path;
    use std::time::Duration;

    /// Agent `i`'s request (uid `uid-<i>`, name `a<i>` in namespace `ns`, trust domain `td`, 1h).
    pub fn numbered_request(i: usize) -> super::LeafRequest {
        super::LeafRequest {
            agent_uid: format!("uid-{i}"),
            agent_created: 1_700_000_000,
            namespace: "ns".into(),
            name: format!("a{i}"),
            trust_domain: "td".into(),
            dns_names: super::service_dns_names("ns", &format!("a{i}")),
            ttl: Duration::from_secs(3600),
        }
    }

    pub fn openssl(dir: &Path, args: &[&str]) {
        let out = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl is installed");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    }

    fn read(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(name)).unwrap()
    }

    /// A self-signed P-256 root: `ca.crt`/`ca.key` in `dir`; returns (cert PEM, key PEM).
    pub fn openssl_root(dir: &Path, cn: &str) -> (String, String) {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "30",
                "-subj",
                &format!("/CN={cn}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        (read(dir, "ca.crt"), read(dir, "ca.key"))
    }

    /// An intermediate CA issued by the root `openssl_root` left in `dir`: (cert PEM, key PEM).
    pub fn openssl_intermediate(dir: &Path, cn: &str) -> (String, String) {
        std::fs::write(
            dir.join("ext.cnf"),
            "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n\
             subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
        )
        .unwrap();
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "int.key",
                "-out",
                "int.csr",
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "int.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "int.crt",
                "-days",
                "30",
                "-extfile",
                "ext.cnf",
            ],
        );
        (read(dir, "int.crt"), read(dir, "int.key"))
    }
}
