//! The identity authority as the controller runs it: the CA loaded from (or created into) its
//! Secret, the ledger on the data volume, the token signing keys in their own Secret, and what
//! is published for others to verify with (ConfigMaps `agentry-ca` and `agentry-jwks`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};

use super::ca::{CaError, CertificateAuthority};
use super::jwt::{JwtError, SigningKey, TokenIssuer};
use super::rotation::{
    CaSet, CaSetError, PHASE_ANNOTATION, ROTATE_ANNOTATION, Step, next_step, recovery_step,
};
use super::store::{Ledger, StoreError};

/// Labels on everything Agentry creates.
use crate::keys::{KEY_CREATED_ANNOTATION, MANAGED_BY};
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
    /// How long a new signing key is published (JWKS) before it signs, so that verifiers with a
    /// cached JWKS know it first. The next key is generated this long before the rotation is due.
    pub jwks_propagation: Duration,
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
    #[error("background task failed: {0}")]
    Task(String),
    /// The stale-ledger guard holds (see `identity::guard`): nothing is issued or published.
    #[error("{0}")]
    LedgerBehind(String),
    /// The CRL no longer fits where it is published; nothing was written there.
    #[error(
        "the CRL of {revoked} revoked, unexpired certificate(s) takes {bytes} bytes with the trust \
         bundle, more than the {limit} bytes {place} holds; nothing was published there (the \
         agent API serves the new CRL at /v1/crl). Agent deletions wait until their revocation \
         is published, so until older certificates expire out of the CRL (within the Agents' \
         spec.certificateTTL, 24h by default); to make room sooner, shorten certificateTTL or \
         split the fleet across controllers (docs/scale.md)"
    )]
    CrlTooLarge {
        revoked: usize,
        bytes: usize,
        limit: usize,
        place: String,
    },
}

impl From<tokio::task::JoinError> for AuthorityError {
    fn from(e: tokio::task::JoinError) -> Self {
        AuthorityError::Task(e.to_string())
    }
}

pub struct Authority {
    pub config: AuthorityConfig,
    /// Shared so blocking ledger work can move to `spawn_blocking`; `&authority.ledger` still
    /// coerces to `&Ledger`.
    pub ledger: Arc<Ledger>,
    /// The signing CA and, during a rotation, the others trusted beside it.
    cas: RwLock<CaSet>,
    tokens: RwLock<Arc<TokenIssuer>>,
    /// Fires when every Agent must be reconciled (new trust bundle, CA or signing key).
    changed: futures::channel::mpsc::UnboundedSender<()>,
    /// When the trust bundle and CRL were last published.
    trust_published: std::sync::Mutex<Option<std::time::Instant>>,
    /// Serialises CRL signing and publishing (numbers never go backwards).
    crl: CrlPublisher,
    /// CA lifecycle notes (an expired CA dropped from the set) not yet taken for Events, and
    /// every note ever made (each is made once).
    ca_notes: std::sync::Mutex<(Vec<String>, std::collections::HashSet<String>)>,
    /// Set when the ledger lacks revocations the published CRL lists (see `identity::guard`):
    /// the message with the fix. Nothing is issued or published while it is set.
    behind: RwLock<Option<String>>,
}

/// Test hook (also for end-to-end tests): milliseconds to wait between signing a CRL and
/// publishing it, to widen any race between concurrent publishers. Unset in production.
pub const CRL_PUBLISH_DELAY_ENV: &str = "AGENTRY_TEST_CRL_PUBLISH_DELAY_MS";

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
        Self::bootstrap_with(client, config, false).await
    }

    /// `bootstrap`, checking the ledger against the published CRL first (the stale-ledger
    /// guard): a ledger behind it issues and publishes nothing, unless `adopt_published_crl`
    /// applies the published, signature-verified revocations to it.
    pub async fn bootstrap_with(
        client: &Client,
        config: AuthorityConfig,
        adopt_published_crl: bool,
    ) -> Result<(Self, futures::channel::mpsc::UnboundedReceiver<()>), AuthorityError> {
        let dir = config.data_dir.clone();
        let ledger = Arc::new(tokio::task::spawn_blocking(move || Ledger::open(&dir)).await??);
        let (cas, notes) = load_or_create_ca(client, &config).await?;
        let keys = load_or_rotate_signing_keys(client, &config).await?;
        let tokens = TokenIssuer::new(
            config.token_issuer.clone(),
            config.token_audience.clone(),
            keys,
        )?
        .with_propagation(config.jwks_propagation);
        let (authority, receiver) = Self::standalone(config, cas, tokens, ledger);
        authority.note(notes);
        authority.report_ca_health();
        authority.guard_ledger(client, adopt_published_crl).await?;
        if authority.ledger_health().is_ok() {
            authority.publish_trust(client).await?;
        }
        authority.publish_jwks(client).await?;
        Ok((authority, receiver))
    }

    /// An authority over a CA set, a token issuer and a ledger, publishing nothing until asked
    /// (`bootstrap` loads these from the cluster; benchmarks and unit tests build them).
    pub fn standalone(
        config: AuthorityConfig,
        cas: CaSet,
        tokens: TokenIssuer,
        ledger: Arc<Ledger>,
    ) -> (Self, futures::channel::mpsc::UnboundedReceiver<()>) {
        let (changed, receiver) = futures::channel::mpsc::unbounded();
        let delay = std::env::var(CRL_PUBLISH_DELAY_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or_default();
        let authority = Self {
            config,
            ledger,
            cas: RwLock::new(cas),
            tokens: RwLock::new(Arc::new(tokens)),
            changed,
            trust_published: Default::default(),
            crl: CrlPublisher::new().with_delay(delay),
            ca_notes: Default::default(),
            behind: Default::default(),
        };
        (authority, receiver)
    }

    /// The CRLs last published (PEM, the signing CA's first), for `/v1/crl`.
    pub fn latest_crl(&self) -> Option<Arc<str>> {
        self.crl.latest()
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

    pub fn tokens(&self) -> Arc<TokenIssuer> {
        self.tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the signing CA can issue: `Err` (with the recovery) once it has expired. The
    /// controller starts and serves either way; `issue` refuses with `CaError::SigningCaExpired`.
    pub fn ca_health(&self) -> Result<(), String> {
        ca_health(&self.cas(), now_unix(), &self.config)
    }

    /// CA lifecycle notes (e.g. an expired previous or next CA dropped from the trust bundle)
    /// since the last call, for warning Events.
    pub fn take_ca_notes(&self) -> Vec<String> {
        std::mem::take(&mut self.ca_notes.lock().unwrap_or_else(|p| p.into_inner()).0)
    }

    fn note(&self, notes: Vec<String>) {
        let mut guard = self.ca_notes.lock().unwrap_or_else(|p| p.into_inner());
        let (pending, seen) = &mut *guard;
        for n in notes {
            if seen.insert(n.clone()) {
                pending.push(n);
            }
        }
    }

    /// Sets the CA gauges and, when the signing CA has expired, logs an error with the recovery.
    fn report_ca_health(&self) {
        let cas = self.cas();
        let now = now_unix();
        let gauges = crate::telemetry::ca_gauges();
        let left = cas.active.not_after().unix_timestamp() - now;
        gauges.expiry_seconds.set(left as f64);
        gauges.expired.set(i64::from(left <= 0));
        if let Err(message) = ca_health(&cas, now, &self.config) {
            tracing::error!(fingerprint = %cas.active.fingerprint(), "{message}");
        }
    }

    /// `Err` (the reason and the fix) while the ledger is behind the published CRL: nothing may
    /// be issued, and no CRL published, until it is restored or the published CRL adopted.
    pub fn ledger_health(&self) -> Result<(), String> {
        match &*self.behind.read().unwrap_or_else(|p| p.into_inner()) {
            Some(message) => Err(message.clone()),
            None => Ok(()),
        }
    }

    /// The stale-ledger guard: compares the ledger with the CRL published in the `agentry-ca`
    /// ConfigMap (only CRLs signed by one of our CAs count). Behind it, either adopts the
    /// published revocations (`adopt`) or holds: sets `behind`, logs and reports it.
    pub async fn guard_ledger(&self, client: &Client, adopt: bool) -> Result<(), AuthorityError> {
        let pem = self.sink(client).published_crl().await?;
        let (cas, ledger) = (self.trusted_cas(), self.ledger.clone());
        let outcome = tokio::task::spawn_blocking(move || {
            let published = super::guard::verified_revocations(&pem, &cas);
            let check = super::guard::check(&ledger, &published)?;
            if let (true, super::guard::LedgerCheck::Behind(_)) = (adopt, &check) {
                let changed =
                    ledger.adopt_revocations(&published.revoked, published.number, now_unix())?;
                return Ok::<_, StoreError>((published, check, Some(changed)));
            }
            Ok((published, check, None))
        })
        .await??;
        self.apply_guard(outcome);
        Ok(())
    }

    fn apply_guard(
        &self,
        (published, check, adopted): (
            super::guard::PublishedCrl,
            super::guard::LedgerCheck,
            Option<usize>,
        ),
    ) {
        use super::guard::LedgerCheck;
        let gauges = crate::telemetry::ca_gauges();
        if published.unverified > 0 {
            tracing::warn!(
                configmap = %format!("{}/{}", self.config.namespace, self.config.ca_configmap),
                count = published.unverified,
                "ignoring published CRLs that are not signed by our CA"
            );
        }
        let behind = match check {
            LedgerCheck::Behind(b) if adopted.is_none() => Some(b),
            LedgerCheck::Behind(b) => {
                tracing::warn!(
                    missing = b.missing.len(),
                    rows_changed = adopted.unwrap_or(0),
                    published = b.published_number,
                    "adopted the published, signature-verified CRL into the ledger \
                     (--adopt-published-crl); resuming"
                );
                None
            }
            LedgerCheck::InStep { number_behind } => {
                if number_behind {
                    tracing::warn!(
                        published = published.number,
                        "the ledger's CRL number is behind the published CRL but holds every \
                         published revocation; continuing above it"
                    );
                }
                None
            }
        };
        gauges.ledger_behind.set(i64::from(behind.is_some()));
        gauges
            .ledger_missing_revocations
            .set(behind.as_ref().map_or(0, |b| b.missing.len() as i64));
        let Some(behind) = behind else {
            return;
        };
        let message = behind.message();
        tracing::error!(missing = ?behind.missing, "{message}");
        *self.behind.write().unwrap_or_else(|p| p.into_inner()) = Some(message);
    }

    /// A lifetime from the spec, shortened by the testing divisor.
    pub fn scaled(&self, d: Duration) -> Duration {
        d / self.config.ttl_divisor.max(1)
    }

    /// Re-signs the CRL and publishes it with the trust bundle in the `agentry-ca` ConfigMap.
    ///
    /// Serialised (see `CrlPublisher`): a call made while another publish is in flight waits
    /// for it and then shares one more publish, which includes whatever it revoked. CRL numbers
    /// only ever go up.
    pub async fn publish_trust(&self, client: &Client) -> Result<(), AuthorityError> {
        self.publish_trust_to(&self.sink(client)).await.map(|_| ())
    }

    /// Publishes the CRL after a revocation: when `revoked` certificates were revoked just now,
    /// or when an earlier publish failed and none has completed since (see
    /// `CrlPublisher::unpublished`): a retry that finds nothing left to revoke may be retrying
    /// exactly that publish, and must not return before it is out.
    pub async fn publish_after_revoking(
        &self,
        client: &Client,
        revoked: usize,
    ) -> Result<(), AuthorityError> {
        if revoked > 0 || self.crl.unpublished() {
            self.publish_trust(client).await?;
        }
        Ok(())
    }

    /// The `agentry-ca` ConfigMap, where the trust bundle and the CRL are published.
    fn sink<'a>(&'a self, client: &'a Client) -> ConfigMapSink<'a> {
        ConfigMapSink {
            client,
            namespace: &self.config.namespace,
            name: &self.config.ca_configmap,
        }
    }

    /// `publish_trust` into any sink. Returns the CRL number published, or None when a publish
    /// that started after this call already covered it.
    pub async fn publish_trust_to(
        &self,
        sink: &dyn TrustSink,
    ) -> Result<Option<u64>, AuthorityError> {
        // Never publish a CRL from a ledger that lacks published revocations.
        self.ledger_health().map_err(AuthorityError::LedgerBehind)?;
        // The CRL is re-signed at least every day (and on every revocation); during a rotation
        // the previous CA signs a CRL for its own certificates too.
        let published = self
            .crl
            .publish(&self.ledger, || self.cas(), sink, CRL_NEXT_UPDATE)
            .await?;
        if published.is_some() {
            *self
                .trust_published
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
        }
        Ok(published)
    }

    pub async fn publish_jwks(&self, client: &Client) -> Result<(), AuthorityError> {
        self.publish_jwks_of(client, &self.tokens()).await
    }

    async fn publish_jwks_of(
        &self,
        client: &Client,
        tokens: &TokenIssuer,
    ) -> Result<(), AuthorityError> {
        let jwks = serde_json::to_string_pretty(&tokens.jwks()).unwrap_or_default();
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

    /// Periodic upkeep: publish the next signing key when one is due, re-sign the CRL.
    pub async fn maintain(&self, client: &Client) -> Result<(), AuthorityError> {
        let keys = load_or_rotate_signing_keys(client, &self.config).await?;
        let current: Vec<String> = self.tokens().keys().iter().map(|k| k.kid.clone()).collect();
        let loaded: Vec<String> = keys.iter().map(|k| k.kid.clone()).collect();
        if current != loaded {
            let tokens = TokenIssuer::new(
                self.config.token_issuer.clone(),
                self.config.token_audience.clone(),
                keys,
            )?
            .with_propagation(self.config.jwks_propagation);
            let newest = tokens.keys()[0].kid.clone();
            let signs_from =
                tokens.keys()[0].created_at + self.config.jwks_propagation.as_secs() as i64;
            // Published first (if that fails the key ring in use stays as it was, and the next
            // upkeep tries again); it signs one propagation interval after its creation. Tokens
            // are not re-minted for it: each moves to the new key at its normal refresh.
            self.publish_jwks_of(client, &tokens).await?;
            *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tokens);
            tracing::info!(
                kid = %newest,
                signing = %self.tokens().active_key().kid,
                signs_from,
                "token signing keys changed; JWKS published"
            );
        }
        self.report_ca_health();
        let trust_changed = self.rotate_ca(client).await?;
        // Re-sign the CRL well before its nextUpdate (24h), or at once when the CAs changed.
        let stale = self
            .trust_published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|at| at.elapsed() >= CRL_REFRESH);
        if (trust_changed || stale || self.crl.unpublished()) && self.ledger_health().is_ok() {
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
        let now = now_unix();
        // Parsing and chain signature checks off the async workers.
        let parse = secret.clone();
        let (stored, dropped) =
            tokio::task::spawn_blocking(move || CaSet::from_secret(&parse, now))
                .await?
                .map_err(bad)?;
        let requested = secret
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(ROTATE_ANNOTATION));
        let step = self.rotation_step(&stored, requested, now).await?;
        let next = match step {
            None if dropped.is_empty() => stored,
            step => {
                let next = self.take_step(stored, step, now).await?;
                let mut updated = secret.clone();
                let annotations = updated
                    .metadata
                    .annotations
                    .get_or_insert_with(Default::default);
                if step.is_some() {
                    annotations.remove(ROTATE_ANNOTATION);
                }
                match next.phase.render() {
                    Some(p) => annotations.insert(PHASE_ANNOTATION.to_string(), p),
                    None => annotations.remove(PHASE_ANNOTATION),
                };
                updated.data = Some(next.secret_data());
                // resourceVersion is kept: a concurrent edit makes this fail, and we retry later.
                secrets
                    .replace(&self.config.ca_secret, &PostParams::default(), &updated)
                    .await?;
                self.note(dropped);
                tracing::info!(step = ?step, signing = %next.active.fingerprint(), "CA Secret updated");
                next
            }
        };
        let current = self.cas();
        let same = current.active.fingerprint() == next.active.fingerprint()
            && current.bundle() == next.bundle()
            && current.phase == next.phase;
        if !same {
            *self.cas.write().unwrap_or_else(|p| p.into_inner()) = next;
            self.report_ca_health();
            let _ = self.changed.unbounded_send(());
        }
        Ok(!same)
    }
}

impl Authority {
    /// The rotation step due now, if any: the recovery when the signing CA has expired, else
    /// the next step of a rotation (counting the old CA's unexpired leaves off the async workers).
    async fn rotation_step(
        &self,
        stored: &CaSet,
        requested: bool,
        now: i64,
    ) -> Result<Option<Step>, AuthorityError> {
        if stored.active.is_expired_at(now) {
            return Ok(recovery_step(stored.phase, requested));
        }
        let ledger = self.ledger.clone();
        let fingerprint = stored.active.fingerprint().to_string();
        let old_leaves =
            tokio::task::spawn_blocking(move || ledger.active_not_issued_by(&fingerprint, now))
                .await??;
        Ok(next_step(
            stored.phase,
            requested,
            now,
            self.config.ca_rotation_overlap,
            old_leaves,
        ))
    }

    /// Applies `step` to the set (key generation and signing off the async workers); with no
    /// step, the set as it is (only expired CAs left it).
    async fn take_step(
        &self,
        stored: CaSet,
        step: Option<Step>,
        now: i64,
    ) -> Result<CaSet, AuthorityError> {
        let Some(step) = step else { return Ok(stored) };
        let trust_domain = self.config.trust_domain.clone();
        let validity = self.config.ca_validity;
        Ok(tokio::task::spawn_blocking(move || {
            stored.apply(step, now, || {
                CertificateAuthority::generate(&format!("agentry CA ({trust_domain})"), validity)
            })
        })
        .await??)
    }
}

/// `Err` with the documented recovery when the signing CA has expired.
fn ca_health(cas: &CaSet, now: i64, config: &AuthorityConfig) -> Result<(), String> {
    if !cas.active.is_expired_at(now) {
        return Ok(());
    }
    Err(format!(
        "the signing CA (sha256:{}) expired at {}: no certificate can be issued or renewed. \
         Recover with `agentry ca rotate --namespace {ns} --ca-secret {secret}` (with an expired \
         signing CA the leader activates a new CA at once and every Agent is re-issued), or bring \
         a new CA by replacing tls.crt/tls.key in Secret {ns}/{secret}",
        cas.active.fingerprint(),
        cas.active.not_after(),
        ns = config.namespace,
        secret = config.ca_secret,
    ))
}

/// How long a published CRL is valid (it is re-signed every `CRL_REFRESH`).
const CRL_NEXT_UPDATE: Duration = Duration::from_secs(24 * 3600);

/// Where the trust bundle and CRLs go: the `agentry-ca` ConfigMap in production, a recorder in
/// tests.
pub trait TrustSink: Send + Sync {
    /// The highest CRL number already published there (after a restart, or another leader).
    fn published_crl_number(&self) -> BoxFuture<'_, Result<Option<u64>, AuthorityError>>;
    /// Publishes `ca.crt` (the bundle) and `crl.pem` (one CRL per signing CA).
    fn publish(&self, bundle: String, crl: String) -> BoxFuture<'_, Result<(), AuthorityError>>;
    /// The most bytes of bundle and CRL it holds, and what it is (for the error), if bounded.
    fn limit(&self) -> Option<(usize, String)> {
        None
    }
}

/// The most a ConfigMap holds (the sizes of its values together), as the apiserver enforces.
pub const CONFIGMAP_MAX_BYTES: usize = 1024 * 1024;

/// The `agentry-ca` ConfigMap.
pub struct ConfigMapSink<'a> {
    pub client: &'a Client,
    pub namespace: &'a str,
    pub name: &'a str,
}

impl ConfigMapSink<'_> {
    /// The published `crl.pem` (empty when nothing was published yet).
    pub async fn published_crl(&self) -> Result<String, AuthorityError> {
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), self.namespace);
        Ok(cms
            .get_opt(self.name)
            .await?
            .and_then(|cm| cm.data?.remove("crl.pem"))
            .unwrap_or_default())
    }
}

impl TrustSink for ConfigMapSink<'_> {
    fn published_crl_number(&self) -> BoxFuture<'_, Result<Option<u64>, AuthorityError>> {
        Box::pin(async move { Ok(crl_numbers(&self.published_crl().await?).into_iter().max()) })
    }

    fn publish(&self, bundle: String, crl: String) -> BoxFuture<'_, Result<(), AuthorityError>> {
        Box::pin(async move {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(self.name.to_string()),
                    namespace: Some(self.namespace.to_string()),
                    labels: Some(labels()),
                    ..Default::default()
                },
                data: Some([("ca.crt".to_string(), bundle), ("crl.pem".to_string(), crl)].into()),
                ..Default::default()
            };
            apply(self.client, self.namespace, self.name, &cm).await
        })
    }

    fn limit(&self) -> Option<(usize, String)> {
        let place = format!("ConfigMap {}/{}", self.namespace, self.name);
        Some((CONFIGMAP_MAX_BYTES, place))
    }
}

/// The CRL numbers of every CRL in a PEM bundle.
pub fn crl_numbers(pem: &str) -> Vec<u64> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .filter(|p| p.label == "X509 CRL")
        .filter_map(|p| {
            let (_, crl) = x509_parser::parse_x509_crl(&p.contents).ok()?;
            let bytes = crl.crl_number()?.to_bytes_be();
            (bytes.len() <= 8).then(|| bytes.iter().fold(0u64, |n, b| (n << 8) | u64::from(*b)))
        })
        .collect()
}

/// Signs and publishes CRLs one at a time: "read the ledger, take a CRL number, sign, publish"
/// runs under one async mutex, so a CRL never overtakes a newer one and numbers strictly
/// increase (RFC 5280 §5.2.3) -- also across restarts, as the first publish reads the number
/// already published. Requests coalesce: callers arriving while a publish is in flight wait,
/// and the first of them publishes once for all (its ledger read sees all their revocations).
pub struct CrlPublisher {
    /// Requests so far (a ticket each).
    requested: AtomicU64,
    /// Every ticket up to this one is covered by a completed publish (`PublishState::covered`,
    /// readable without waiting for a publish in flight).
    covered: AtomicU64,
    state: tokio::sync::Mutex<PublishState>,
    delay: Duration,
    /// The CRLs of the last publish, served by the API.
    latest: std::sync::RwLock<Option<Arc<str>>>,
}

#[derive(Default)]
struct PublishState {
    /// Every ticket up to this one is covered by a completed publish.
    covered: u64,
    last_number: Option<u64>,
}

impl Default for CrlPublisher {
    fn default() -> Self {
        Self::new()
    }
}

impl CrlPublisher {
    pub fn new() -> Self {
        Self {
            requested: AtomicU64::new(0),
            covered: AtomicU64::new(0),
            state: Default::default(),
            delay: Duration::ZERO,
            latest: Default::default(),
        }
    }

    /// Whether a publish was asked for and none has completed since: a revocation committed
    /// to the ledger may be missing from the published CRL. Whoever revoked it retries the
    /// publish when it finds nothing left to revoke (its first publish failed), and so does the
    /// upkeep, so a revocation is never left unpublished until the next daily re-signing.
    pub fn unpublished(&self) -> bool {
        self.requested.load(Ordering::SeqCst) > self.covered.load(Ordering::SeqCst)
    }

    /// The CRLs of the last completed publish.
    pub fn latest(&self) -> Option<Arc<str>> {
        self.latest
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Test hook: waits this long between signing and publishing (see `CRL_PUBLISH_DELAY_ENV`).
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Publishes the trust bundle and a CRL for the active (and previous) CA of `cas()`, read
    /// under the lock. Returns the CRL number published, or None when coalesced into a publish
    /// that started after this call.
    pub async fn publish(
        &self,
        ledger: &Arc<Ledger>,
        cas: impl FnOnce() -> CaSet,
        sink: &dyn TrustSink,
        next_update: Duration,
    ) -> Result<Option<u64>, AuthorityError> {
        // The caller's revocation is committed before this ticket is taken.
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut state = self.state.lock().await;
        if state.covered >= ticket {
            return Ok(None);
        }
        // Every request so far is committed to the ledger, which is read below.
        let covers = self.requested.load(Ordering::SeqCst);
        let floor = match state.last_number {
            Some(n) => n,
            None => sink.published_crl_number().await?.unwrap_or(0),
        };
        let cas = cas();
        let bundle = cas.bundle();
        let ledger = ledger.clone();
        // SQLite and signing off the async workers.
        let (crl, number, listed) = tokio::task::spawn_blocking(move || {
            let now = time::OffsetDateTime::now_utc();
            let revoked = ledger.revoked_unexpired(now.unix_timestamp())?;
            let counted = ledger.next_crl_number()?;
            if counted <= floor {
                tracing::warn!(
                    ledger = counted,
                    published = floor,
                    "the ledger's CRL number is behind the published CRL; continuing above it"
                );
            }
            let number = counted.max(floor + 1);
            let mut crl = String::new();
            for ca in std::iter::once(&cas.active).chain(cas.previous.iter()) {
                crl.push_str(&ca.sign_crl(&revoked, number, now, next_update)?);
            }
            Ok::<_, CaError>((crl, number, revoked.len()))
        })
        .await??;
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let latest: Arc<str> = Arc::from(crl.as_str());
        let bytes = bundle.len() + crl.len();
        if let Some((limit, place)) = sink.limit().filter(|(limit, _)| bytes > *limit) {
            // Nothing half-written there; the API still serves every revocation, and the next
            // CRL is numbered above this one.
            *self.latest.write().unwrap_or_else(|p| p.into_inner()) = Some(latest);
            state.last_number = Some(number);
            return Err(AuthorityError::CrlTooLarge {
                revoked: listed,
                bytes,
                limit,
                place,
            });
        }
        sink.publish(bundle, crl).await?;
        *self.latest.write().unwrap_or_else(|p| p.into_inner()) = Some(latest);
        state.last_number = Some(number);
        state.covered = covers;
        self.covered.fetch_max(covers, Ordering::SeqCst);
        Ok(Some(number))
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
) -> Result<(CaSet, Vec<String>), AuthorityError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
    for _ in 0..3 {
        if let Some(secret) = secrets.get_opt(&config.ca_secret).await? {
            let (cas, dropped) = CaSet::from_secret(&secret, now_unix()).map_err(|e| {
                AuthorityError::BadCaSet(format!("{}/{}", config.namespace, config.ca_secret), e)
            })?;
            tracing::info!(fingerprint = %cas.active.fingerprint(), phase = ?cas.phase, "loaded the CA from its Secret");
            return Ok((cas, dropped));
        }
        let (common_name, validity) = (
            format!("agentry CA ({})", config.trust_domain),
            config.ca_validity,
        );
        let ca = tokio::task::spawn_blocking(move || {
            CertificateAuthority::generate(&common_name, validity)
        })
        .await??;
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
                return Ok((CaSet::single(ca), Vec::new()));
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
    let mut keys = existing
        .as_ref()
        .map(stored_signing_keys)
        .unwrap_or_default();
    keys.sort_by_key(|k| std::cmp::Reverse(k.created_at));
    let propagation = config.jwks_propagation.as_secs() as i64;
    let newest_age = keys.first().map(|k| now - k.created_at);
    let needs_new = newest_age.is_none_or(|age| age >= next_key_due(config));
    if !needs_new && existing.is_some() {
        // Prune: keep the signing key and any key retired less than a token lifetime ago.
        let before = keys.len();
        keys = prune(keys, now, propagation);
        if keys.len() == before {
            return Ok(keys);
        }
    } else {
        // Published now, signing one propagation interval later (`TokenIssuer::active_key_at`).
        keys.insert(0, SigningKey::generate(now)?);
        keys = prune(keys, now, propagation);
    }
    let secret = signing_secret(config, &keys, existing.as_ref());
    if existing.is_some() {
        secrets
            .replace(&config.signing_secret, &PostParams::default(), &secret)
            .await?;
    } else {
        secrets.create(&PostParams::default(), &secret).await?;
    }
    Ok(keys)
}

/// The signing keys a Secret holds (`<kid>.pem`, with creation times in an annotation); keys
/// that do not load or whose name is not their kid are ignored.
fn stored_signing_keys(secret: &Secret) -> Vec<SigningKey> {
    let created: BTreeMap<String, i64> = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(KEY_CREATED_ANNOTATION))
        .and_then(|a| serde_json::from_str(a).ok())
        .unwrap_or_default();
    secret
        .data
        .iter()
        .flatten()
        .filter_map(|(name, pem)| {
            let kid = name.strip_suffix(".pem")?;
            let pem = std::str::from_utf8(&pem.0).ok()?;
            let key = SigningKey::from_pem(pem, *created.get(kid).unwrap_or(&0)).ok()?;
            (key.kid == kid).then_some(key)
        })
        .collect()
}

/// The signing-key Secret for `keys`, carrying the existing one's resourceVersion
/// (optimistic concurrency: a racing writer makes the write fail instead of losing a key).
fn signing_secret(
    config: &AuthorityConfig,
    keys: &[SigningKey],
    existing: Option<&Secret>,
) -> Secret {
    let created: BTreeMap<_, _> = keys.iter().map(|k| (k.kid.clone(), k.created_at)).collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(config.signing_secret.clone()),
            namespace: Some(config.namespace.clone()),
            labels: Some(labels()),
            annotations: Some(
                [(
                    KEY_CREATED_ANNOTATION.to_string(),
                    serde_json::to_string(&created).unwrap_or_default(),
                )]
                .into(),
            ),
            resource_version: existing.and_then(|s| s.metadata.resource_version.clone()),
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
    }
}

/// The age of the newest signing key at which its successor is generated: one propagation
/// interval before the rotation is due, so the successor signs on time (never more often than
/// half the rotation period).
fn next_key_due(config: &AuthorityConfig) -> i64 {
    let rotation = config.signing_key_rotation.as_secs() as i64;
    let propagation = config.jwks_propagation.as_secs() as i64;
    (rotation - propagation).max(rotation / 2).max(1)
}

/// Keys sorted newest first: an older key was retired when its successor started signing (one
/// propagation interval after the successor was created), and stays published until every
/// token it signed has expired.
fn prune(keys: Vec<SigningKey>, now: i64, propagation: i64) -> Vec<SigningKey> {
    let grace = MAX_TOKEN_TTL.as_secs() as i64 + super::jwt::LEEWAY_SECS as i64;
    let mut successor_created: Option<i64> = None;
    let mut out = Vec::new();
    for key in keys {
        let keep = successor_created
            .is_none_or(|created| now - created.saturating_add(propagation) <= grace);
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
            0,
        );
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0].created_at, now - day);
        assert_eq!(kept[1].created_at, now - 40 * day);
        // Only the signing key when its predecessor was retired long ago.
        let kept = prune(vec![key(now - 3 * day), key(now - 40 * day)], now, 0);
        assert_eq!(kept.len(), 1);
    }

    /// Records every publish, in the order they land, and lands lower CRL numbers more slowly:
    /// publishers that are not serialised then overtake each other.
    struct Recorder {
        published: std::sync::Mutex<Vec<(u64, String)>>,
        already: Option<u64>,
        limit: Option<usize>,
    }

    impl Recorder {
        fn new(already: Option<u64>, limit: Option<usize>) -> Self {
            Self {
                published: Default::default(),
                already,
                limit,
            }
        }
    }

    /// An empty ledger and a CA to issue from and sign CRLs with.
    fn ledger_and_ca() -> (Arc<Ledger>, CaSet) {
        let ca = CertificateAuthority::generate("agentry CA (td)", Duration::from_secs(86400));
        (
            Arc::new(Ledger::in_memory().unwrap()),
            CaSet::single(ca.unwrap()),
        )
    }

    impl TrustSink for Recorder {
        fn published_crl_number(&self) -> BoxFuture<'_, Result<Option<u64>, AuthorityError>> {
            Box::pin(async move { Ok(self.already) })
        }
        fn publish(
            &self,
            _bundle: String,
            crl: String,
        ) -> BoxFuture<'_, Result<(), AuthorityError>> {
            Box::pin(async move {
                let numbers = crl_numbers(&crl);
                let number = numbers[0];
                assert!(numbers.iter().all(|n| *n == number));
                tokio::time::sleep(Duration::from_millis(100u64.saturating_sub(number * 4))).await;
                self.published.lock().unwrap().push((number, crl));
                Ok(())
            })
        }
        fn limit(&self) -> Option<(usize, String)> {
            self.limit.map(|l| (l, "the test sink".to_string()))
        }
    }

    /// Issues agent `i` a leaf, revokes it (key compromise) and returns its serial.
    fn issue_and_revoke(cas: &CaSet, ledger: &Ledger, i: usize) -> String {
        use crate::identity::ca::test_support::numbered_request;
        use crate::identity::store::RevocationReason;
        let leaf = cas.active.issue(ledger, &numbered_request(i)).unwrap();
        let revoked = ledger
            .revoke(
                &leaf.record.serial,
                RevocationReason::KeyCompromise,
                now_unix(),
            )
            .unwrap();
        assert!(revoked, "revoked now");
        leaf.record.serial
    }

    fn crl_serials(pem: &str) -> Vec<String> {
        x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
            .filter_map(Result::ok)
            .flat_map(|p| {
                let (_, crl) = x509_parser::parse_x509_crl(&p.contents).unwrap();
                crl.iter_revoked_certificates()
                    .map(|r| crate::identity::ca::hex(r.raw_serial()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Item 1 of issue 8: 20 concurrent revoke-and-publish calls. Every CRL lands in number
    /// order (strictly increasing), and the last one lists every revoked serial.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_revocations_publish_crls_in_order_and_the_last_has_them_all() {
        let (ledger, cas) = ledger_and_ca();
        let publisher = Arc::new(CrlPublisher::new().with_delay(Duration::from_millis(5)));
        let sink = Arc::new(Recorder::new(None, None));
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let (ledger, cas, publisher, sink) =
                    (ledger.clone(), cas.clone(), publisher.clone(), sink.clone());
                tokio::spawn(async move {
                    let serial = issue_and_revoke(&cas, &ledger, i);
                    publisher
                        .publish(&ledger, || cas.clone(), &*sink, CRL_NEXT_UPDATE)
                        .await
                        .unwrap();
                    serial
                })
            })
            .collect();
        let mut serials = Vec::new();
        for t in tasks {
            serials.push(t.await.unwrap());
        }
        let published = sink.published.lock().unwrap();
        let numbers: Vec<u64> = published.iter().map(|(n, _)| *n).collect();
        assert!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "CRL numbers went backwards: {numbers:?}"
        );
        let last = crl_serials(&published.last().unwrap().1);
        for serial in &serials {
            assert!(last.contains(serial), "{serial} missing from the final CRL");
        }
        assert!(
            published.len() <= 20,
            "coalesced: {} publishes",
            published.len()
        );
    }

    /// Item 1: the first publish continues above the number already published (a restart, or
    /// a ledger behind the ConfigMap), never below it.
    #[tokio::test]
    async fn the_first_publish_continues_above_what_is_already_published() {
        let (ledger, cas) = ledger_and_ca();
        let publisher = CrlPublisher::new();
        let sink = Recorder::new(Some(41), None);
        let first = publisher
            .publish(&ledger, || cas.clone(), &sink, CRL_NEXT_UPDATE)
            .await
            .unwrap();
        assert_eq!(first, Some(42));
        let second = publisher
            .publish(&ledger, || cas.clone(), &sink, CRL_NEXT_UPDATE)
            .await
            .unwrap();
        assert_eq!(second, Some(43));
    }

    /// A CRL too large for where it is published (a ConfigMap holds 1 MiB) is refused before
    /// anything is written there, with the count, the size and the way out; the API still
    /// serves it, the next CRL is numbered above it, and one that fits again is published.
    #[tokio::test]
    async fn a_crl_too_large_for_its_configmap_is_not_half_published() {
        let (ledger, cas) = ledger_and_ca();
        let publisher = CrlPublisher::new();
        let sink = Recorder::new(None, Some(4096));
        issue_and_revoke(&cas, &ledger, 0);
        let first = publisher
            .publish(&ledger, || cas.clone(), &sink, CRL_NEXT_UPDATE)
            .await
            .unwrap();
        assert_eq!(first, Some(1));
        for i in 1..100 {
            issue_and_revoke(&cas, &ledger, i);
        }
        assert!(!publisher.unpublished());
        let err = publisher
            .publish(&ledger, || cas.clone(), &sink, CRL_NEXT_UPDATE)
            .await
            .unwrap_err();
        // Not published: deletions keep their finalizers until it is.
        assert!(publisher.unpublished());
        let message = err.to_string();
        for needle in [
            "100 revoked",
            "more than the 4096 bytes the test sink holds",
            "nothing was published there",
            "/v1/crl",
            "certificateTTL",
        ] {
            assert!(message.contains(needle), "{needle:?} not in: {message}");
        }
        assert_eq!(
            sink.published.lock().unwrap().len(),
            1,
            "nothing more written"
        );
        let served = publisher.latest().unwrap();
        assert_eq!(
            crl_serials(&served).len(),
            100,
            "the API serves every revocation"
        );
        assert_eq!(crl_numbers(&served), vec![2]);
        // Room again (here: a larger sink): published, numbered above the refused one.
        let roomy = Recorder::new(None, Some(CONFIGMAP_MAX_BYTES));
        let next = publisher
            .publish(&ledger, || cas.clone(), &roomy, CRL_NEXT_UPDATE)
            .await
            .unwrap();
        assert_eq!(next, Some(3));
        assert!(!publisher.unpublished());
        assert_eq!(
            crl_serials(&roomy.published.lock().unwrap()[0].1).len(),
            100
        );
    }

    /// Refuses every publish, as the apiserver does a ConfigMap write in a namespace being
    /// deleted or without the permission.
    struct Refusing;

    impl TrustSink for Refusing {
        fn published_crl_number(&self) -> BoxFuture<'_, Result<Option<u64>, AuthorityError>> {
            Box::pin(async move { Ok(None) })
        }
        fn publish(&self, _: String, _: String) -> BoxFuture<'_, Result<(), AuthorityError>> {
            Box::pin(async move { Err(AuthorityError::Task("refused".into())) })
        }
        fn limit(&self) -> Option<(usize, String)> {
            None
        }
    }

    /// A revocation whose publish failed is not forgotten: the publisher says one is pending
    /// until a publish completes, so the retry that finds nothing left to revoke (and the
    /// upkeep) still publishes it, and that CRL lists it.
    #[tokio::test]
    async fn a_failed_publish_leaves_its_revocation_pending_until_one_succeeds() {
        let (ledger, cas) = ledger_and_ca();
        let publisher = CrlPublisher::new();
        assert!(!publisher.unpublished(), "nothing asked for yet");
        let serial = issue_and_revoke(&cas, &ledger, 0);
        publisher
            .publish(&ledger, || cas.clone(), &Refusing, CRL_NEXT_UPDATE)
            .await
            .unwrap_err();
        assert!(publisher.unpublished(), "the revocation is not published");
        // A second failure (the retry) keeps it pending.
        publisher
            .publish(&ledger, || cas.clone(), &Refusing, CRL_NEXT_UPDATE)
            .await
            .unwrap_err();
        assert!(publisher.unpublished());
        let sink = Recorder::new(None, None);
        let published = publisher
            .publish(&ledger, || cas.clone(), &sink, CRL_NEXT_UPDATE)
            .await
            .unwrap();
        assert!(published.is_some());
        assert!(!publisher.unpublished(), "published now");
        let crl = &sink.published.lock().unwrap()[0].1;
        assert_eq!(
            crl_serials(crl),
            vec![serial],
            "the CRL lists the revocation"
        );
    }

    /// Item 5: retirement waits only for unexpired active leaves of the old CA.
    #[test]
    fn expired_leaves_do_not_hold_a_retirement_up() {
        use crate::identity::store::{CertRecord, CertState};
        let ledger = Ledger::in_memory().unwrap();
        let rec = |serial: &str, uid: &str, not_after: i64| CertRecord {
            serial: serial.into(),
            agent_uid: uid.into(),
            agent_created: 1_700_000_000,
            namespace: "ns".into(),
            name: "a".into(),
            spiffe_id: "spiffe://td/ns/ns/agent/a".into(),
            fingerprint: "ff".into(),
            issuer_fingerprint: "old".into(),
            not_before: 0,
            not_after,
            state: CertState::Active,
            revocation_reason: None,
            revoked_at: None,
        };
        ledger.record_issued(&rec("01", "u1", 1000), 1).unwrap();
        ledger.record_issued(&rec("02", "u2", 3000), 1).unwrap();
        assert_eq!(ledger.active_not_issued_by("new", 500).unwrap(), 2);
        assert_eq!(ledger.active_not_issued_by("new", 2000).unwrap(), 1);
        assert_eq!(ledger.active_not_issued_by("new", 3000).unwrap(), 0);
    }

    /// Item 5: an expired signing CA is reported with its recovery.
    #[test]
    fn an_expired_signing_ca_is_unhealthy_with_the_recovery() {
        let now = time::OffsetDateTime::now_utc();
        let config = AuthorityConfig {
            namespace: "agentry-system".into(),
            ca_secret: "agentry-ca".into(),
            signing_secret: "s".into(),
            ca_configmap: "c".into(),
            jwks_configmap: "j".into(),
            trust_domain: "td".into(),
            token_issuer: "i".into(),
            token_audience: "a".into(),
            ca_validity: Duration::from_secs(3600),
            signing_key_rotation: Duration::from_secs(3600),
            jwks_propagation: Duration::from_secs(600),
            ca_rotation_overlap: Duration::from_secs(60),
            data_dir: "/nonexistent".into(),
            ttl_divisor: 1,
        };
        let good = CaSet::single(
            CertificateAuthority::generate("agentry CA (td)", Duration::from_secs(3600)).unwrap(),
        );
        assert_eq!(ca_health(&good, now.unix_timestamp(), &config), Ok(()));
        let expired = CaSet::single(
            CertificateAuthority::generate_valid(
                "agentry CA (td)",
                now - Duration::from_secs(7200),
                now - Duration::from_secs(1),
            )
            .unwrap(),
        );
        let err = ca_health(&expired, now.unix_timestamp(), &config).unwrap_err();
        assert!(
            err.contains("expired") && err.contains("agentry ca rotate"),
            "{err}"
        );
    }

    /// Item 6: the next signing key is made one propagation interval before the rotation is
    /// due, and its predecessor stays published a token lifetime after it stopped signing.
    #[test]
    fn the_next_signing_key_is_made_a_propagation_interval_early() {
        let mut config_rotation = 30 * 86_400;
        let due = |rotation: i64, propagation: i64| {
            next_key_due(&AuthorityConfig {
                namespace: String::new(),
                ca_secret: String::new(),
                signing_secret: String::new(),
                ca_configmap: String::new(),
                jwks_configmap: String::new(),
                trust_domain: String::new(),
                token_issuer: String::new(),
                token_audience: String::new(),
                ca_validity: Duration::ZERO,
                signing_key_rotation: Duration::from_secs(rotation as u64),
                jwks_propagation: Duration::from_secs(propagation as u64),
                ca_rotation_overlap: Duration::ZERO,
                data_dir: PathBuf::new(),
                ttl_divisor: 1,
            })
        };
        assert_eq!(due(config_rotation, 600), config_rotation - 600);
        config_rotation = 600;
        assert_eq!(
            due(config_rotation, 3600),
            300,
            "never more often than half the period"
        );
        // The old key stopped signing when the new one started (created + propagation).
        let day = 86_400;
        let now = 100 * day;
        let key = |created| SigningKey::generate(created).unwrap();
        let grace = MAX_TOKEN_TTL.as_secs() as i64 + crate::identity::jwt::LEEWAY_SECS as i64;
        let new_created = now - grace - 300;
        // Without propagation it would be pruned; it signed until new_created + 600.
        assert_eq!(prune(vec![key(new_created), key(0)], now, 0).len(), 1);
        assert_eq!(prune(vec![key(new_created), key(0)], now, 600).len(), 2);
    }
}
