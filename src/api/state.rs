//! What the API handlers share: the identity authority (CA, ledger, token keys), the
//! controller's watch caches (no apiserver round trip per request), and the two places the API
//! writes to or asks the cluster: registration status and TokenReview.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::PartialObjectMeta;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{ObjectRef, Store};

use crate::crd::{Agent, RegistrationStatus};
use crate::identity::authority::Authority;

/// Writes an Agent's `status.registration` and its `Registered` condition.
pub trait Registrar: Send + Sync {
    fn record<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        registration: &'a RegistrationStatus,
    ) -> BoxFuture<'a, Result<(), String>>;

    /// Publishes the CRL after the API revoked something (default: nothing to publish to).
    fn publish_crl<'a>(&'a self, _authority: &'a Authority) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

/// Who a Kubernetes ServiceAccount token belongs to, per the apiserver (TokenReview).
pub trait TokenReviewer: Send + Sync {
    /// `Ok(Some(username))` when the token is valid for `audience`, `Ok(None)` when it is not.
    fn review<'a>(
        &'a self,
        token: &'a str,
        audience: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, String>>;
}

/// How the API describes itself.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    /// The URL agents reach the API at, e.g. `https://agentry-api.agentry-system.svc:8443`;
    /// card URLs are built on it.
    pub public_url: String,
    /// The audience a ServiceAccount token must carry for `POST .../csr`.
    pub csr_audience: String,
}

pub struct ApiState {
    pub authority: Arc<Authority>,
    pub agents: Store<DeserializeGuard<Agent>>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub registrar: Arc<dyn Registrar>,
    pub reviewer: Arc<dyn TokenReviewer>,
    pub settings: ApiSettings,
    /// The last registration written per Agent uid and when, so a repeat writes nothing and
    /// changes are rate-limited; with a lock per Agent so writes do not race.
    pub(crate) registrations: Mutex<HashMap<String, Registered>>,
    /// At most this many TokenReviews (CSR bootstrap) in flight.
    pub(crate) reviews: tokio::sync::Semaphore,
    /// Verified client certificates by SHA-256, per trust bundle.
    pub(crate) certs: super::auth::CertCache,
    /// Tokens already verified (signature, iss, aud), per key ring.
    pub(crate) tokens: super::auth::TokenCache,
    /// Signed cards by Agent uid, with the generation and signing key they were made for.
    pub(crate) cards: Mutex<HashMap<String, SignedCard>>,
    /// Request counts and latencies, when served by the controller.
    pub metrics: Option<Arc<crate::telemetry::Metrics>>,
    /// The backup data path (None: backups are not served).
    pub backups: Option<Arc<super::backups::BackupService>>,
}

impl ApiState {
    pub fn new(
        authority: Arc<Authority>,
        agents: Store<DeserializeGuard<Agent>>,
        namespaces: Store<PartialObjectMeta<Namespace>>,
        registrar: Arc<dyn Registrar>,
        reviewer: Arc<dyn TokenReviewer>,
        settings: ApiSettings,
    ) -> Self {
        Self {
            authority,
            agents,
            namespaces,
            registrar,
            reviewer,
            settings,
            registrations: Default::default(),
            reviews: tokio::sync::Semaphore::new(8),
            certs: Default::default(),
            tokens: Default::default(),
            cards: Default::default(),
            metrics: None,
            backups: None,
        }
    }

    /// Serves the backup routes.
    pub fn with_backups(mut self, backups: Arc<super::backups::BackupService>) -> Self {
        self.backups = Some(backups);
        self
    }

    /// Counts requests into the controller's metrics.
    pub fn with_metrics(mut self, metrics: Arc<crate::telemetry::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// An Agent from the watch cache (None when absent or undecodable).
    pub fn agent(&self, namespace: &str, name: &str) -> Option<CachedAgent> {
        CachedAgent::new(self.agents.get(&ObjectRef::new(name).within(namespace))?)
    }

    /// The uid of a namespace, from the namespace cache.
    pub fn namespace_uid(&self, namespace: &str) -> Option<String> {
        self.namespaces
            .get(&ObjectRef::new(namespace))?
            .metadata
            .uid
            .clone()
    }

    /// The annotation `key` of a namespace, from the namespace cache.
    pub fn namespace_annotation(&self, namespace: &str, key: &str) -> Option<String> {
        self.namespaces
            .get(&ObjectRef::new(namespace))?
            .metadata
            .annotations
            .as_ref()?
            .get(key)
            .cloned()
    }

    pub fn card_url(&self, namespace: &str, name: &str) -> String {
        format!(
            "{}/a2a/{namespace}/{name}/.well-known/agent-card.json",
            self.settings.public_url.trim_end_matches('/')
        )
    }
}

/// What the API last wrote for an Agent.
#[derive(Clone, Default)]
pub(crate) struct Registered {
    pub registration: Option<RegistrationStatus>,
    /// When it wrote recently (within the rate window).
    pub writes: std::collections::VecDeque<std::time::Instant>,
    pub lock: Arc<tokio::sync::Mutex<()>>,
}

/// A signed card's version (generation and key id) and its bytes.
pub(crate) type SignedCard = (String, Arc<[u8]>);

/// An Agent in the watch cache that decoded (shared, not copied).
#[derive(Clone)]
pub struct CachedAgent(Arc<DeserializeGuard<Agent>>);

impl CachedAgent {
    pub fn new(guard: Arc<DeserializeGuard<Agent>>) -> Option<Self> {
        guard.0.is_ok().then_some(Self(guard))
    }
}

impl std::ops::Deref for CachedAgent {
    type Target = Agent;
    fn deref(&self) -> &Agent {
        match &self.0.0 {
            Ok(agent) => agent,
            // `new` admits only decoded Agents.
            Err(_) => unreachable!("CachedAgent holds only decoded Agents"),
        }
    }
}
