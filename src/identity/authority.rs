//! The identity authority as the controller runs it: the CA loaded from (or created into) its
//! Secret, the ledger on the data volume, the token signing keys in their own Secret, and what
//! is published for others to verify with (ConfigMaps `agentry-ca` and `agentry-jwks`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};

use super::ca::{CaError, CertificateAuthority};
use super::jwt::{JwtError, SigningKey, TokenIssuer};
use super::rotation::{CaSet, CaSetError, PHASE_ANNOTATION, Phase, ROTATE_ANNOTATION, next_step};
use super::store::{Ledger, StoreError};

/// Labels on everything Agentry creates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "agentry");
const KEY_CREATED_ANNOTATION: &str = "agentry.dev/key-created-at";
/// The longest token TTL the CRD allows; a retired signing key stays published this long.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Debug)]
pub struct AuthorityConfig {
    /// The controller's namespace: where the Secrets and ConfigMaps below live.
    pub namespace: String,
    /// Secret with the CA (`tls.crt`, `tls.key`, optional `ca.crt` trust bundle). Created when
    /// missing; bring your own (e.g. issued by cert-manager) by creating it first.
    pub ca_secret: String,
    pub signing_secret: String,
    /// ConfigMap publishing `ca.crt` (trust bundle) and `crl.pem`.
    pub ca_configmap: String,
    /// ConfigMap publishing `jwks.json`.
    pub jwks_configmap: String,
    pub trust_domain: String,
    pub token_issuer: String,
    pub token_audience: String,
    pub ca_validity: Duration,
    /// A signing key older than this is replaced (the old one stays published for a day).
    pub signing_key_rotation: Duration,
    /// How long each CA rotation step waits for every consumer to pick up the new bundle.
    pub ca_rotation_overlap: Duration,
    pub data_dir: PathBuf,
    /// Testing only: divides every certificate and token lifetime.
    pub ttl_divisor: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(
        "CA Secret {secret}: {source}; fix or delete the Secret (a new CA is created when it is missing)"
    )]
    BadCa {
        secret: String,
        #[source]
        source: CaError,
    },
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Jwt(#[from] JwtError),
    #[error(transparent)]
    Ledger(#[from] StoreError),
    #[error(
        "CA Secret {0}: {1}; fix or delete the Secret (a new CA is created when it is missing)"
    )]
    BadCaSet(String, #[source] CaSetError),
}

pub struct Authority {
    pub config: AuthorityConfig,
    pub ledger: Ledger,
    /// The signing CA and, during a rotation, the others trusted beside it.
    cas: RwLock<CaSet>,
    tokens: RwLock<Arc<TokenIssuer>>,
    /// Fires when every Agent must be reconciled (new trust bundle, CA or signing key).
    changed: futures::channel::mpsc::UnboundedSender<()>,
    /// When the trust bundle and CRL were last published.
    trust_published: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How often the CRL is re-signed when nothing is revoked (its nextUpdate is 24h out).
const CRL_REFRESH: Duration = Duration::from_secs(3600);

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn labels() -> BTreeMap<String, String> {
    [(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())].into()
}

impl Authority {
    /// Loads or creates the CA and signing keys, opens the ledger and publishes the trust
    /// bundle, CRL and JWKS. Run by the leader only.
    ///
    /// The receiver fires whenever every Agent must be reconciled again.
    pub async fn bootstrap(
        client: &Client,
        config: AuthorityConfig,
    ) -> Result<(Self, futures::channel::mpsc::UnboundedReceiver<()>), AuthorityError> {
        let ledger = Ledger::open(&config.data_dir)?;
        let cas = load_or_create_ca(client, &config).await?;
        let keys = load_or_rotate_signing_keys(client, &config).await?;
        let tokens = TokenIssuer::new(
            config.token_issuer.clone(),
            config.token_audience.clone(),
            keys,
        )?;
        let (changed, receiver) = futures::channel::mpsc::unbounded();
        let authority = Self {
            config,
            ledger,
            cas: RwLock::new(cas),
            tokens: RwLock::new(Arc::new(tokens)),
            changed,
            trust_published: Default::default(),
        };
        authority.publish_trust(client).await?;
        authority.publish_jwks(client).await?;
        Ok((authority, receiver))
    }

    fn cas(&self) -> CaSet {
        self.cas.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The CA that signs now.
    pub fn ca(&self) -> Arc<CertificateAuthority> {
        self.cas().active
    }

    /// Every CA whose leaves are trusted now: the signing CA and any CA in a rotation overlap.
    pub fn trusted_cas(&self) -> Vec<Arc<CertificateAuthority>> {
        let cas = self.cas();
        std::iter::once(cas.active)
            .chain(cas.next)
            .chain(cas.previous)
            .collect()
    }

    /// `ca.crt` for agents: the signing CA plus any CA in a rotation overlap.
    pub fn bundle(&self) -> String {
        self.cas().bundle()
    }

    pub fn rotation_phase(&self) -> Phase {
        self.cas().phase
    }

    pub fn tokens(&self) -> Arc<TokenIssuer> {
        self.tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A lifetime from the spec, shortened by the testing divisor.
    pub fn scaled(&self, d: Duration) -> Duration {
        d / self.config.ttl_divisor.max(1)
    }

    /// Re-signs the CRL and publishes it with the trust bundle in the `agentry-ca` ConfigMap.
    pub async fn publish_trust(&self, client: &Client) -> Result<(), AuthorityError> {
        // The CRL is re-signed at least every day (and on every revocation); during a rotation
        // the previous CA signs a CRL for its own certificates too.
        let cas = self.cas();
        let mut crl = String::new();
        for ca in std::iter::once(&cas.active).chain(cas.previous.iter()) {
            crl.push_str(&ca.crl_pem(&self.ledger, Duration::from_secs(24 * 3600))?);
        }
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.config.ca_configmap.clone()),
                namespace: Some(self.config.namespace.clone()),
                labels: Some(labels()),
                ..Default::default()
            },
            data: Some(
                [
                    ("ca.crt".to_string(), self.bundle()),
                    ("crl.pem".to_string(), crl),
                ]
                .into(),
            ),
            ..Default::default()
        };
        apply(
            client,
            &self.config.namespace,
            &self.config.ca_configmap,
            &cm,
        )
        .await?;
        *self
            .trust_published
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
        Ok(())
    }

    pub async fn publish_jwks(&self, client: &Client) -> Result<(), AuthorityError> {
        let jwks = serde_json::to_string_pretty(&self.tokens().jwks()).unwrap_or_default();
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.config.jwks_configmap.clone()),
                namespace: Some(self.config.namespace.clone()),
                labels: Some(labels()),
                ..Default::default()
            },
            data: Some([("jwks.json".to_string(), jwks)].into()),
            ..Default::default()
        };
        apply(
            client,
            &self.config.namespace,
            &self.config.jwks_configmap,
            &cm,
        )
        .await
    }

    /// Periodic upkeep: rotate the signing key when it is old, re-sign the CRL.
    pub async fn maintain(&self, client: &Client) -> Result<(), AuthorityError> {
        let keys = load_or_rotate_signing_keys(client, &self.config).await?;
        let current: Vec<String> = self.tokens().keys().iter().map(|k| k.kid.clone()).collect();
        let loaded: Vec<String> = keys.iter().map(|k| k.kid.clone()).collect();
        if current != loaded {
            let tokens = TokenIssuer::new(
                self.config.token_issuer.clone(),
                self.config.token_audience.clone(),
                keys,
            )?;
            *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tokens);
            self.publish_jwks(client).await?;
            tracing::info!(kid = %self.tokens().active_key().kid, "token signing key rotated");
            let _ = self.changed.unbounded_send(());
        }
        let trust_changed = self.rotate_ca(client).await?;
        // Re-sign the CRL well before its nextUpdate (24h), or at once when the CAs changed.
        let stale = self
            .trust_published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|at| at.elapsed() >= CRL_REFRESH);
        if trust_changed || stale {
            self.publish_trust(client).await?;
        }
        Ok(())
    }

    /// Reloads the CA Secret and takes the next rotation step when one is due. Returns whether
    /// the CAs in play changed.
    async fn rotate_ca(&self, client: &Client) -> Result<bool, AuthorityError> {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &self.config.namespace);
        let Some(secret) = secrets.get_opt(&self.config.ca_secret).await? else {
            return Ok(false);
        };
        let bad = |e: CaSetError| {
            AuthorityError::BadCaSet(
                format!("{}/{}", self.config.namespace, self.config.ca_secret),
                e,
            )
        };
        let stored = CaSet::from_secret(&secret).map_err(bad)?;
        let requested = secret
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(ROTATE_ANNOTATION));
        let now = now_unix();
        let old_leaves = self
            .ledger
            .active_not_issued_by(stored.active.fingerprint())?;
        let step = next_step(
            stored.phase,
            requested,
            now,
            self.config.ca_rotation_overlap,
            old_leaves,
        );
        let next = match step {
            None => stored,
            Some(step) => {
                let trust_domain = self.config.trust_domain.clone();
                let validity = self.config.ca_validity;
                let next = stored.apply(step, now, || {
                    CertificateAuthority::generate(
                        &format!("agentry CA ({trust_domain})"),
                        validity,
                    )
                })?;
                let mut annotations = secret.metadata.annotations.clone().unwrap_or_default();
                annotations.remove(ROTATE_ANNOTATION);
                match next.phase.render() {
                    Some(p) => annotations.insert(PHASE_ANNOTATION.to_string(), p),
                    None => annotations.remove(PHASE_ANNOTATION),
                };
                let mut updated = secret.clone();
                updated.metadata.annotations = Some(annotations);
                updated.data = Some(next.secret_data());
                // resourceVersion is kept: a concurrent edit makes this fail, and we retry later.
                secrets
                    .replace(&self.config.ca_secret, &PostParams::default(), &updated)
                    .await?;
                tracing::info!(
                    step = ?step,
                    signing = %next.active.fingerprint(),
                    "CA rotation step taken"
                );
                next
            }
        };
        let current = self.cas();
        let same = current.active.fingerprint() == next.active.fingerprint()
            && current.bundle() == next.bundle()
            && current.phase == next.phase;
        if !same {
            *self.cas.write().unwrap_or_else(|p| p.into_inner()) = next;
            let _ = self.changed.unbounded_send(());
        }
        Ok(!same)
    }
}

async fn apply(
    client: &Client,
    namespace: &str,
    name: &str,
    cm: &ConfigMap,
) -> Result<(), AuthorityError> {
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(
            name,
            &PatchParams::apply(crate::keys::MANAGER).force(),
            &Patch::Apply(cm),
        )
        .await?;
    Ok(())
}

/// Reads the CA Secret, or creates it with a fresh CA. Two leaders racing to create it cannot
/// both win: creation is a POST, and the loser re-reads.
async fn load_or_create_ca(
    client: &Client,
    config: &AuthorityConfig,
) -> Result<CaSet, AuthorityError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
    for _ in 0..3 {
        if let Some(secret) = secrets.get_opt(&config.ca_secret).await? {
            let cas = CaSet::from_secret(&secret).map_err(|e| {
                AuthorityError::BadCaSet(format!("{}/{}", config.namespace, config.ca_secret), e)
            })?;
            tracing::info!(fingerprint = %cas.active.fingerprint(), phase = ?cas.phase, "loaded the CA from its Secret");
            return Ok(cas);
        }
        let ca = CertificateAuthority::generate(
            &format!("agentry CA ({})", config.trust_domain),
            config.ca_validity,
        )?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(config.ca_secret.clone()),
                namespace: Some(config.namespace.clone()),
                labels: Some(labels()),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(
                [
                    (
                        "tls.crt".to_string(),
                        ByteString(ca.cert_pem().as_bytes().to_vec()),
                    ),
                    (
                        "tls.key".to_string(),
                        ByteString(ca.key_pem().as_bytes().to_vec()),
                    ),
                    (
                        "ca.crt".to_string(),
                        ByteString(ca.cert_pem().as_bytes().to_vec()),
                    ),
                ]
                .into(),
            ),
            ..Default::default()
        };
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(fingerprint = %ca.fingerprint(), "created a new CA");
                return Ok(CaSet {
                    active: Arc::new(ca),
                    next: None,
                    previous: None,
                    phase: Phase::Idle,
                });
            }
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(AuthorityError::Kube(kube::Error::Api(
        kube::core::Status::failure("CA Secret kept changing while loading it", "Conflict")
            .with_code(409)
            .boxed(),
    )))
}

/// Loads the signing keys; adds a new one when the newest is older than the rotation period;
/// drops keys that stopped signing more than a day (the longest token TTL) ago.
async fn load_or_rotate_signing_keys(
    client: &Client,
    config: &AuthorityConfig,
) -> Result<Vec<SigningKey>, AuthorityError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
    let now = now_unix();
    let existing = secrets.get_opt(&config.signing_secret).await?;
    let created: BTreeMap<String, i64> = existing
        .as_ref()
        .and_then(|s| {
            s.metadata
                .annotations
                .as_ref()?
                .get(KEY_CREATED_ANNOTATION)
                .cloned()
        })
        .and_then(|a| serde_json::from_str(&a).ok())
        .unwrap_or_default();
    let mut keys: Vec<SigningKey> = existing
        .as_ref()
        .and_then(|s| s.data.as_ref())
        .map(|data| {
            data.iter()
                .filter_map(|(name, pem)| {
                    let kid = name.strip_suffix(".pem")?;
                    let pem = std::str::from_utf8(&pem.0).ok()?;
                    let key = SigningKey::from_pem(pem, *created.get(kid).unwrap_or(&0)).ok()?;
                    (key.kid == kid).then_some(key)
                })
                .collect()
        })
        .unwrap_or_default();
    keys.sort_by_key(|k| std::cmp::Reverse(k.created_at));
    let rotation = config.signing_key_rotation.as_secs() as i64;
    let newest_age = keys.first().map(|k| now - k.created_at);
    let needs_new = newest_age.is_none_or(|age| age >= rotation);
    if !needs_new && existing.is_some() {
        // Prune: keep the signing key and any key retired less than a token lifetime ago.
        let before = keys.len();
        keys = prune(keys, now);
        if keys.len() == before {
            return Ok(keys);
        }
    } else {
        keys.insert(0, SigningKey::generate(now)?);
        keys = prune(keys, now);
    }
    let annotations = serde_json::to_string(
        &keys
            .iter()
            .map(|k| (k.kid.clone(), k.created_at))
            .collect::<BTreeMap<_, _>>(),
    )
    .unwrap_or_default();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(config.signing_secret.clone()),
            namespace: Some(config.namespace.clone()),
            labels: Some(labels()),
            annotations: Some([(KEY_CREATED_ANNOTATION.to_string(), annotations)].into()),
            // Optimistic concurrency: a racing writer makes this fail instead of losing a key.
            resource_version: existing
                .as_ref()
                .and_then(|s| s.metadata.resource_version.clone()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            keys.iter()
                .map(|k| {
                    (
                        format!("{}.pem", k.kid),
                        ByteString(k.pem().as_bytes().to_vec()),
                    )
                })
                .collect(),
        ),
        ..Default::default()
    };
    if existing.is_some() {
        secrets
            .replace(&config.signing_secret, &PostParams::default(), &secret)
            .await?;
    } else {
        secrets.create(&PostParams::default(), &secret).await?;
    }
    Ok(keys)
}

/// Keys sorted newest first: the newest signs; an older key was retired when its successor was
/// created, and stays published until every token it signed has expired.
fn prune(keys: Vec<SigningKey>, now: i64) -> Vec<SigningKey> {
    let grace = MAX_TOKEN_TTL.as_secs() as i64 + super::jwt::LEEWAY_SECS as i64;
    let mut successor_created: Option<i64> = None;
    let mut out = Vec::new();
    for key in keys {
        let keep = successor_created.is_none_or(|retired_at| now - retired_at <= grace);
        successor_created = Some(key.created_at);
        if keep {
            out.push(key);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retired_signing_keys_stay_published_for_one_token_lifetime() {
        let day = 86_400;
        let now = 100 * day;
        let key = |created| SigningKey::generate(created).unwrap();
        // Newest first: signing key (1 day old), one retired 1 day ago, one retired 5 days ago.
        let kept = prune(
            vec![key(now - day), key(now - 40 * day), key(now - 70 * day)],
            now,
        );
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0].created_at, now - day);
        assert_eq!(kept[1].created_at, now - 40 * day);
        // Only the signing key when its predecessor was retired long ago.
        let kept = prune(vec![key(now - 3 * day), key(now - 40 * day)], now);
        assert_eq!(kept.len(), 1);
    }
}
