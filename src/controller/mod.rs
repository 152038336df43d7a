//! The controller: `runtime` (leader election, watches, one shutdown path), `context` (what
//! every reconcile shares), `error`, and `agent/`, the Agent pipeline with one file per step.

pub mod agent;
pub mod backups;
pub mod conditions;
pub mod context;
pub mod error;
pub mod messaging;
pub mod runtime;
pub mod watched;

use std::net::SocketAddr;
use std::time::Duration;

pub use context::{Applied, ChildStores, Context, OwnWrite};
pub use error::{Error, NameConflict};
pub use runtime::run;

use crate::identity::authority::AuthorityConfig;

/// A process-local fingerprint of `value` (never stored, never compared across processes).
pub(crate) fn hash_of(value: impl std::hash::Hash) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(value)
}

/// [`hash_of`] the serialized form, for types that are not `Hash` (floats, maps).
pub(crate) fn content_hash<T: serde::Serialize>(obj: &T) -> u64 {
    hash_of(serde_json::to_vec(obj).unwrap_or_default())
}

/// Requests per second, with bursts of up to `burst` (like client-go's `--kube-api-qps` and
/// `--kube-api-burst`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ApiRate {
    pub qps: f64,
    pub burst: u32,
}

/// How the controller process is run (from `agentry controller` flags).
#[derive(Clone, Debug)]
pub struct Config {
    /// Reconcile Agents only in this namespace (sharding, tests); all namespaces when None.
    pub watch_namespace: Option<String>,
    /// Reconcile only Agents matching this label selector (sharding, tests).
    pub agent_selector: Option<String>,
    /// The controller's own namespace: its Lease, CA Secret and published ConfigMaps.
    pub namespace: String,
    pub lease_name: String,
    pub lease_duration: Duration,
    /// This replica's name in the Lease.
    pub replica: String,
    pub ops_addr: SocketAddr,
    /// How often the leader checks signing-key age, CA rotation steps and the CRL.
    pub maintenance_interval: Duration,
    /// The longest between two passes over a healthy Agent.
    pub resync: Duration,
    /// Agents reconciled at once (0: unbounded).
    pub concurrency: u16,
    /// Agents' Services get a cluster IP (else they are headless).
    pub service_cluster_ip: bool,
    /// How long an Agent's triggers are gathered before its pass (0: none).
    pub debounce: Duration,
    /// Client-side limit on the controller's requests to the apiserver (None: no limit), so a
    /// burst (a CA rotation re-issuing every Agent) is spread instead of flooding it.
    pub api_rate: Option<ApiRate>,
    /// The CA, ledger, token keys and what they publish.
    pub authority: AuthorityConfig,
    /// The agent API, served by the leader (None: not served).
    pub api: Option<ApiConfig>,
    /// The sidecar added to every agent pod (None: no sidecar; always None without the API).
    pub sidecar: Option<crate::workload::SidecarSpec>,
    /// The backup manager and the backup routes (None: no backups; always None without the API).
    pub backup: Option<backups::BackupConfig>,
    /// Messaging: inboxes, ACL users and the relay (None: no `--redis-url`).
    pub messaging: Option<messaging::MessagingConfig>,
    /// What a replica does around its leadership, for a ledger replicated by Litestream.
    pub ha: HaConfig,
}

/// Leadership hooks for a ledger that reaches standbys only through a replica (docs/ha.md).
#[derive(Clone, Debug, Default)]
pub struct HaConfig {
    /// Run (`sh -c`) after the Lease is acquired and before the ledger is opened, e.g. a
    /// `litestream restore` of the newest replica; a failure stops this replica leading.
    pub on_lead_exec: Option<String>,
    /// Spawned (`sh -c`) after `on_lead_exec` and killed when leadership ends, e.g.
    /// `litestream replicate`: only the leader replicates.
    pub while_leading_exec: Option<String>,
    /// Apply the published, signature-verified CRL to a ledger that is behind it, then resume
    /// (the stale-ledger guard's recovery; see `identity::guard`).
    pub adopt_published_crl: bool,
}

/// Where and as what the agent API is served.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    pub addr: SocketAddr,
    /// The URL agents reach it at.
    pub public_url: String,
    /// Names and addresses on its certificate.
    pub sans: Vec<String>,
    /// The audience of ServiceAccount tokens for CSR bootstrap.
    pub csr_audience: String,
}

/// Whether an object belongs to the Agent with `uid` (a controller owner reference to it).
/// Objects that do not are never applied over, deleted or read as the Agent's.
pub fn owned_by(meta: &kube::api::ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.controller == Some(true))
}
