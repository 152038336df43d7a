//! Scoped, short-lived agent tokens: ES256 JWTs bound to the agent's certificate (RFC 8705
//! `cnf.x5t#S256`), signed by rotating keys published as a JWKS. Verification lives in one
//! function, `Verifier::verify`, with the algorithm pinned.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Clock skew tolerated on exp/nbf.
pub const LEEWAY_SECS: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("token signing key: {0}")]
    Key(String),
    #[error("encoding the token failed: {0}")]
    Encode(#[source] jsonwebtoken::errors::Error),
}

/// Why a token was refused. Messages are safe to return to a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("token is malformed")]
    Malformed,
    #[error("token algorithm must be ES256")]
    WrongAlgorithm,
    #[error("token has no kid")]
    MissingKid,
    #[error("token kid {0:?} is not a current signing key")]
    UnknownKid(String),
    #[error("token is invalid: {0}")]
    Invalid(String),
    #[error("token has no cnf.x5t#S256 binding")]
    MissingCnf,
    #[error("token is bound to a different certificate than the one presented")]
    CnfMismatch,
}

/// The RFC 8705 confirmation claim.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Confirmation {
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    /// The agent's SPIFFE ID.
    pub sub: String,
    pub aud: String,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub jti: String,
    /// Space-separated permissions, e.g. `backup:write memory:read`.
    pub scope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
}

impl Claims {
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.scope.split_whitespace()
    }
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes().any(|s| s == scope)
    }
}

/// `x5t#S256`: base64url(SHA-256(certificate DER)).
pub fn thumbprint(cert_der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(cert_der))
}

/// One ES256 signing key. Its kid is its RFC 7638 JWK thumbprint.
pub struct SigningKey {
    pub kid: String,
    /// Unix seconds; rotation retires keys by age.
    pub created_at: i64,
    pem: String,
    encoding: EncodingKey,
    jwk: Jwk,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    pub fn generate(created_at: i64) -> Result<Self, JwtError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| JwtError::Key(e.to_string()))?;
        Self::from_pem(&key.serialize_pem(), created_at)
    }

    /// Loads a PKCS#8 P-256 private key.
    pub fn from_pem(pem: &str, created_at: i64) -> Result<Self, JwtError> {
        let encoding =
            EncodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| JwtError::Key(e.to_string()))?;
        let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::ES256)
            .map_err(|e| JwtError::Key(e.to_string()))?;
        let kid = jwk
            .thumbprint(ThumbprintHash::SHA256)
            .map_err(|e| JwtError::Key(e.to_string()))?;
        jwk.common.key_id = Some(kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        Ok(Self {
            kid,
            created_at,
            pem: pem.to_string(),
            encoding,
            jwk,
        })
    }

    /// The private key, for its Secret only.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    pub fn jwk(&self) -> &Jwk {
        &self.jwk
    }
}

/// Mints agent tokens with a key ring. Every key is published (JWKS); a new key signs only once
/// it has been published for `propagation`, so verifiers holding a cached JWKS never see a
/// token signed by a key they do not know yet (SPIRE's prepare-then-activate for JWT keys).
pub struct TokenIssuer {
    pub issuer: String,
    pub audience: String,
    /// Newest first; all are published.
    keys: Vec<SigningKey>,
    /// Seconds a key is published before it signs.
    propagation: i64,
    /// A verifier for exactly these keys, built once per key ring (every reconcile checks the
    /// stored token with it).
    verifier: Verifier,
}

impl TokenIssuer {
    pub fn new(
        issuer: String,
        audience: String,
        mut keys: Vec<SigningKey>,
    ) -> Result<Self, JwtError> {
        if keys.is_empty() {
            return Err(JwtError::Key("no signing key".into()));
        }
        keys.sort_by_key(|k| std::cmp::Reverse(k.created_at));
        let verifier = Verifier::from_jwks(&jwk_set(&keys), &issuer, &audience);
        Ok(Self {
            issuer,
            audience,
            keys,
            propagation: 0,
            verifier,
        })
    }

    /// How long a key is published before it signs (default: at once).
    pub fn with_propagation(mut self, propagation: Duration) -> Self {
        self.propagation = propagation.as_secs().min(i64::MAX as u64) as i64;
        self
    }

    /// The key that signs now.
    pub fn active_key(&self) -> &SigningKey {
        self.active_key_at(now_unix())
    }

    /// The key that signs at `now` (unix seconds): the newest key published for at least the
    /// propagation interval; when none is yet (a first key at bootstrap), the oldest key.
    pub fn active_key_at(&self, now: i64) -> &SigningKey {
        self.keys
            .iter()
            .find(|k| k.created_at.saturating_add(self.propagation) <= now)
            .unwrap_or_else(|| &self.keys[self.keys.len() - 1])
    }

    /// Whether a token with this kid still verifies against what is published: a token need
    /// not be re-minted just because another key became active.
    pub fn keys(&self) -> &[SigningKey] {
        &self.keys
    }

    /// The public keys, for `/.well-known/jwks.json` and the `agentry-jwks` ConfigMap.
    pub fn jwks(&self) -> JwkSet {
        jwk_set(&self.keys)
    }

    /// The claims a token for this agent would carry, issued at `now` (unix seconds).
    pub fn claims(
        &self,
        sub: &str,
        scope: &str,
        ttl: Duration,
        cert_der: &[u8],
        now: u64,
    ) -> Claims {
        Claims {
            iss: self.issuer.clone(),
            sub: sub.to_string(),
            aud: self.audience.clone(),
            iat: now,
            nbf: now,
            exp: now + ttl.as_secs().max(1),
            jti: crate::identity::ca::hex(&rand::random::<[u8; 16]>()),
            scope: scope.to_string(),
            cnf: Some(Confirmation {
                x5t_s256: thumbprint(cert_der),
            }),
        }
    }

    /// Signs `claims` with the key active at their `iat` (header: alg ES256, typ JWT, kid).
    pub fn sign(&self, claims: &Claims) -> Result<String, JwtError> {
        let key = self.active_key_at(claims.iat.min(i64::MAX as u64) as i64);
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.encoding).map_err(JwtError::Encode)
    }

    pub fn mint(
        &self,
        sub: &str,
        scope: &str,
        ttl: Duration,
        cert_der: &[u8],
        now: u64,
    ) -> Result<(String, Claims), JwtError> {
        let claims = self.claims(sub, scope, ttl, cert_der, now);
        Ok((self.sign(&claims)?, claims))
    }

    /// A detached JWS over `payload` with the active key (RFC 7515 §7.2 general form without
    /// the payload, as A2A card signatures are): returns (`protected`, `signature`), both
    /// base64url. The protected header is `{alg: ES256, kid, typ: JOSE}` plus `extra`.
    pub fn sign_detached(
        &self,
        payload: &[u8],
        extra: &[(&str, &str)],
    ) -> Result<(String, String), JwtError> {
        let key = self.active_key();
        let mut header = serde_json::Map::new();
        header.insert("alg".into(), "ES256".into());
        header.insert("kid".into(), key.kid.clone().into());
        header.insert("typ".into(), "JOSE".into());
        for (k, v) in extra {
            header.insert((*k).into(), (*v).into());
        }
        let protected = URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&header).map_err(|e| JwtError::Key(e.to_string()))?);
        let input = format!("{protected}.{}", URL_SAFE_NO_PAD.encode(payload));
        let signature =
            jsonwebtoken::crypto::sign(input.as_bytes(), &key.encoding, Algorithm::ES256)
                .map_err(JwtError::Encode)?;
        Ok((protected, signature))
    }

    /// A verifier for exactly the keys this issuer publishes.
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }
}

fn jwk_set(keys: &[SigningKey]) -> JwkSet {
    JwkSet {
        keys: keys.iter().map(|k| k.jwk.clone()).collect(),
    }
}

/// Verifies agent tokens against a JWKS: ES256 only, iss/aud/exp/nbf required, leeway 60 s,
/// kid must be known, and `cnf.x5t#S256` must match the client certificate presented.
pub struct Verifier {
    keys: HashMap<String, DecodingKey>,
    validation: Validation,
}

impl Verifier {
    pub fn from_jwks(jwks: &JwkSet, issuer: &str, audience: &str) -> Self {
        let keys = jwks
            .keys
            .iter()
            .filter_map(|jwk| Some((jwk.common.key_id.clone()?, DecodingKey::from_jwk(jwk).ok()?)))
            .collect();
        let mut validation = Validation::new(Algorithm::ES256);
        validation.algorithms = vec![Algorithm::ES256];
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        Self { keys, validation }
    }

    /// The one place a token is checked. `client_cert_der` is the certificate the caller
    /// presented on its mTLS connection.
    pub fn verify(&self, token: &str, client_cert_der: &[u8]) -> Result<Claims, VerifyError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| VerifyError::Malformed)?;
        if header.alg != Algorithm::ES256 {
            return Err(VerifyError::WrongAlgorithm);
        }
        let kid = header.kid.ok_or(VerifyError::MissingKid)?;
        let key = self
            .keys
            .get(&kid)
            .ok_or_else(|| VerifyError::UnknownKid(kid.clone()))?;
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map_err(|e| VerifyError::Invalid(e.to_string()))?;
        let claims = data.claims;
        let cnf = claims.cnf.as_ref().ok_or(VerifyError::MissingCnf)?;
        if !constant_time_eq(
            cnf.x5t_s256.as_bytes(),
            thumbprint(client_cert_der).as_bytes(),
        ) {
            return Err(VerifyError::CnfMismatch);
        }
        Ok(claims)
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads a token's claims WITHOUT verifying it: only for deciding when our own stored token
/// needs refreshing. Never use this to authorize anything.
pub fn peek_claims(token: &str) -> Option<Claims> {
    jsonwebtoken::dangerous::insecure_decode::<Claims>(token)
        .ok()
        .map(|d| d.claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISS: &str = "https://agentry.agentry-system.svc";
    const AUD: &str = "agentry";
    const CERT: &[u8] = b"pretend certificate DER";

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn issuer() -> TokenIssuer {
        TokenIssuer::new(
            ISS.into(),
            AUD.into(),
            vec![SigningKey::generate(0).unwrap()],
        )
        .unwrap()
    }

    fn b64(v: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    #[test]
    fn minted_token_verifies_and_carries_scope_and_binding() {
        let iss = issuer();
        let (token, claims) = iss
            .mint(
                "spiffe://cluster.local/ns/a/agent/b",
                "backup:write memory:read",
                Duration::from_secs(3600),
                CERT,
                now(),
            )
            .unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        assert_eq!(header.kid.as_deref(), Some(iss.active_key().kid.as_str()));
        let got = iss.verifier().verify(&token, CERT).unwrap();
        assert_eq!(got, claims);
        assert!(
            got.has_scope("backup:write")
                && got.has_scope("memory:read")
                && !got.has_scope("backup:read")
        );
        assert_eq!(got.exp - got.iat, 3600);
        assert_eq!(got.jti.len(), 32);
    }

    #[test]
    fn attack_tokens_are_refused() {
        let iss = issuer();
        let v = iss.verifier();
        let t = now();
        let good = iss.claims(
            "spiffe://x/ns/a/agent/b",
            "backup:write",
            Duration::from_secs(600),
            CERT,
            t,
        );
        let sign = |c: &Claims| iss.sign(c).unwrap();

        // Expired beyond the leeway.
        let mut c = good.clone();
        c.iat = t - 7200;
        c.nbf = t - 7200;
        c.exp = t - 61 - 60;
        assert!(matches!(
            v.verify(&sign(&c), CERT),
            Err(VerifyError::Invalid(_))
        ));
        // Not yet valid.
        let mut c = good.clone();
        c.nbf = t + 600;
        assert!(matches!(
            v.verify(&sign(&c), CERT),
            Err(VerifyError::Invalid(_))
        ));
        // Wrong audience, wrong issuer.
        let mut c = good.clone();
        c.aud = "someone-else".into();
        assert!(matches!(
            v.verify(&sign(&c), CERT),
            Err(VerifyError::Invalid(_))
        ));
        let mut c = good.clone();
        c.iss = "https://evil".into();
        assert!(matches!(
            v.verify(&sign(&c), CERT),
            Err(VerifyError::Invalid(_))
        ));
        // Missing cnf, and cnf for another certificate.
        let mut c = good.clone();
        c.cnf = None;
        assert_eq!(v.verify(&sign(&c), CERT), Err(VerifyError::MissingCnf));
        assert_eq!(
            v.verify(&sign(&good), b"another cert"),
            Err(VerifyError::CnfMismatch)
        );

        // Tampered payload: more scope, same signature.
        let token = sign(&good);
        let parts: Vec<&str> = token.split('.').collect();
        let mut tampered = serde_json::to_value(&good).unwrap();
        tampered["scope"] = "backup:write backup:read memory:write".into();
        let forged = format!("{}.{}.{}", parts[0], b64(&tampered), parts[2]);
        assert!(matches!(
            v.verify(&forged, CERT),
            Err(VerifyError::Invalid(_))
        ));

        // alg: none.
        let none_header =
            serde_json::json!({"alg": "none", "typ": "JWT", "kid": iss.active_key().kid});
        let unsigned = format!(
            "{}.{}.",
            b64(&none_header),
            b64(&serde_json::to_value(&good).unwrap())
        );
        assert!(v.verify(&unsigned, CERT).is_err());

        // HS256 keyed with the public key (the classic confusion attack).
        let public_jwk = serde_json::to_vec(iss.active_key().jwk()).unwrap();
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(iss.active_key().kid.clone());
        let hs = jsonwebtoken::encode(&h, &good, &EncodingKey::from_secret(&public_jwk)).unwrap();
        assert_eq!(v.verify(&hs, CERT), Err(VerifyError::WrongAlgorithm));

        // Unknown kid: signed by a key that is not published.
        let stranger = issuer();
        assert!(matches!(
            v.verify(&stranger.sign(&good).unwrap(), CERT),
            Err(VerifyError::UnknownKid(_))
        ));
        // No kid at all.
        let mut h = Header::new(Algorithm::ES256);
        h.kid = None;
        let nokid = jsonwebtoken::encode(&h, &good, &iss.active_key().encoding).unwrap();
        assert_eq!(v.verify(&nokid, CERT), Err(VerifyError::MissingKid));
        // Garbage.
        assert_eq!(v.verify("not.a.jwt", CERT), Err(VerifyError::Malformed));
        assert_eq!(v.verify("", CERT), Err(VerifyError::Malformed));
    }

    #[test]
    fn rotation_keeps_old_tokens_valid_while_published() {
        let old = SigningKey::generate(100).unwrap();
        let old_pem = old.pem().to_string();
        let iss_old = TokenIssuer::new(ISS.into(), AUD.into(), vec![old]).unwrap();
        let (token, _) = iss_old
            .mint("s", "", Duration::from_secs(600), CERT, now())
            .unwrap();
        let rotated = TokenIssuer::new(
            ISS.into(),
            AUD.into(),
            vec![
                SigningKey::from_pem(&old_pem, 100).unwrap(),
                SigningKey::generate(200).unwrap(),
            ],
        )
        .unwrap();
        assert_ne!(rotated.active_key().kid, iss_old.active_key().kid);
        assert_eq!(rotated.jwks().keys.len(), 2);
        assert!(rotated.verifier().verify(&token, CERT).is_ok());
        let retired = issuer();
        assert!(matches!(
            retired.verifier().verify(&token, CERT),
            Err(VerifyError::UnknownKid(_))
        ));
    }
}

#[cfg(test)]
mod propagation {
    //! Item 6 of issue 8: a new key is published one propagation interval before it signs.
    use super::*;

    const CERT: &[u8] = b"cert";
    const PROPAGATION: i64 = 600;

    fn ring(keys: Vec<SigningKey>) -> TokenIssuer {
        TokenIssuer::new("https://i".into(), "aud".into(), keys)
            .unwrap()
            .with_propagation(Duration::from_secs(PROPAGATION as u64))
    }

    #[test]
    fn a_new_key_signs_only_after_it_has_been_published_for_the_interval() {
        let t0: i64 = 1_000_000;
        let old = SigningKey::generate(t0 - 30 * 86_400).unwrap();
        let old_pem = old.pem().to_string();
        let old_kid = old.kid.clone();
        // At bootstrap the only key signs at once.
        let boot = ring(vec![SigningKey::from_pem(&old_pem, t0).unwrap()]);
        assert_eq!(boot.active_key_at(t0).kid, old_kid);

        // Rotation at t0: the next key is in the JWKS, the old one still signs.
        let new = SigningKey::generate(t0).unwrap();
        let new_kid = new.kid.clone();
        let rotated = ring(vec![old, new]);
        assert_eq!(rotated.jwks().keys.len(), 2);
        assert_eq!(rotated.active_key_at(t0).kid, old_kid);
        assert_eq!(rotated.active_key_at(t0 + PROPAGATION - 1).kid, old_kid);
        assert_eq!(rotated.active_key_at(t0 + PROPAGATION).kid, new_kid);
        let published: Vec<_> = rotated
            .jwks()
            .keys
            .iter()
            .filter_map(|k| k.common.key_id.clone())
            .collect();
        assert!(published.contains(&old_kid) && published.contains(&new_kid));
        assert!(!published.contains(&"nope".to_string()));

        // A verifier that cached the JWKS before the rotation (only the old key) accepts every
        // token minted during the propagation interval.
        let cached = ring(vec![
            SigningKey::from_pem(&old_pem, t0 - 30 * 86_400).unwrap(),
        ]);
        let cached_verifier = cached.verifier();
        for at in [t0, t0 + 1, t0 + PROPAGATION / 2, t0 + PROPAGATION - 1] {
            let (token, _) = rotated
                .mint("s", "", Duration::from_secs(3600), CERT, at as u64)
                .unwrap();
            let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
            assert_eq!(kid, old_kid, "minted at {at}");
            // Claims are time-checked against the real clock: check only the signature/kid.
            match cached_verifier.verify(&token, CERT) {
                Ok(_) | Err(VerifyError::Invalid(_)) => {}
                Err(e) => panic!("a cached verifier refused a token minted at {at}: {e}"),
            }
        }
        // After the interval tokens move to the new key (which every cache has by now).
        let (token, _) = rotated
            .mint(
                "s",
                "",
                Duration::from_secs(3600),
                CERT,
                (t0 + PROPAGATION) as u64,
            )
            .unwrap();
        assert_eq!(
            jsonwebtoken::decode_header(&token).unwrap().kid.unwrap(),
            new_kid
        );
    }

    #[test]
    fn with_several_unpropagated_keys_the_oldest_signs() {
        let t0: i64 = 5_000;
        let a = SigningKey::generate(t0).unwrap();
        let b = SigningKey::generate(t0 + 10).unwrap();
        let a_kid = a.kid.clone();
        let iss = ring(vec![b, a]);
        assert_eq!(iss.active_key_at(t0 + 20).kid, a_kid);
    }

    /// A token minted with the real clock verifies with a JWKS cached before the new key was
    /// added (end to end, nothing mocked but the key ages).
    #[test]
    fn live_tokens_verify_against_a_jwks_cached_before_the_rotation() {
        let now = now_unix();
        let old = SigningKey::generate(now - 86_400).unwrap();
        let cached = Verifier::from_jwks(
            &JwkSet {
                keys: vec![old.jwk().clone()],
            },
            "https://i",
            "aud",
        );
        let rotated = ring(vec![old, SigningKey::generate(now).unwrap()]);
        let (token, _) = rotated
            .mint("s", "", Duration::from_secs(600), CERT, now as u64)
            .unwrap();
        assert!(cached.verify(&token, CERT).is_ok());
    }
}

#[cfg(test)]
mod attack_corpus {
    //! RELIABILITY.md: 500 attack tokens and 1,000 replays over other certificates, 0 accepted.
    use super::*;
    use proptest::prelude::*;

    const CERT: &[u8] = b"the agent's certificate DER";

    fn fixture() -> (TokenIssuer, String) {
        let issuer = TokenIssuer::new(
            "https://i".into(),
            "aud".into(),
            vec![SigningKey::generate(0).unwrap()],
        )
        .unwrap();
        let now = jsonwebtoken::get_current_timestamp();
        let (token, _) = issuer
            .mint(
                "spiffe://td/ns/a/agent/b",
                "backup:write",
                Duration::from_secs(600),
                CERT,
                now,
            )
            .unwrap();
        (issuer, token)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

        /// Any change to any byte of a valid token, or any truncation, is refused.
        #[test]
        fn mutated_tokens_are_refused(position in 0usize..10_000, replacement in any::<u8>(), truncate in any::<bool>()) {
            let (issuer, token) = fixture();
            let mut bytes = token.clone().into_bytes();
            let i = position % bytes.len();
            if truncate {
                bytes.truncate(i);
            } else {
                prop_assume!(bytes[i] != replacement);
                bytes[i] = replacement;
            }
            let attacked = String::from_utf8_lossy(&bytes).into_owned();
            prop_assume!(attacked != token);
            prop_assert!(issuer.verifier().verify(&attacked, CERT).is_err(), "accepted: {attacked}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        /// A token presented with any other certificate is refused (cnf binding).
        #[test]
        fn replay_over_another_certificate_is_refused(other in proptest::collection::vec(any::<u8>(), 1..600)) {
            prop_assume!(other != CERT);
            let (issuer, token) = fixture();
            prop_assert_eq!(issuer.verifier().verify(&token, &other), Err(VerifyError::CnfMismatch));
        }
    }
}
