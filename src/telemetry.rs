//! Logs (tracing, text or JSON) and Prometheus metrics. Nothing here may log key material: callers
//! pass names, serials and fingerprints, never PEM or tokens.

use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use tracing_subscriber::{EnvFilter, prelude::*};

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// An error and its sources, `outer: inner: innermost`: the SDKs' and reqwest's Display is
/// terse, and the source chain says what the server or the connection answered.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    message
}

/// Installs the global tracing subscriber. `RUST_LOG` overrides the default `info` filter.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,kube_lease_manager=warn,kube_runtime=warn"));
    let registry = tracing_subscriber::registry().with(filter);
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: &'static str,
}

/// An Agent phase (`status.phase`; `Invalid` for an object that does not parse).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

/// AgentBackups of one BackupLocation in one phase.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackupLabels {
    pub location: String,
    pub phase: String,
}

/// One Agent (its last successful backup).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabels {
    pub namespace: String,
    pub agent: String,
}

/// One store (`primary` or `secondary`) of a BackupLocation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    pub location: String,
    pub store: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    /// The route template, e.g. `/v1/agents/{namespace}/{name}`.
    pub route: String,
    pub code: String,
}

/// The controller's metrics, served on `/metrics`.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub leader: Gauge,
    pub certificates_issued: Counter,
    pub certificates_revoked: Counter,
    pub tokens_minted: Counter,
    /// Seconds until the soonest-expiring active certificate (a float gauge), recomputed at
    /// each scrape from `nearest_certificate_expiry_at`.
    pub nearest_certificate_expiry: Gauge<f64, AtomicU64>,
    /// Unix time the soonest-expiring active certificate expires (0: none known yet).
    pub nearest_certificate_expiry_at: Gauge<f64, AtomicU64>,
    /// The signing CA's health (the same gauges as `ca_gauges()`).
    pub ca: CaGauges,
    /// Agent API requests by route and status code.
    pub api_requests: Family<ApiLabels, Counter>,
    pub api_request_duration: Histogram,
    /// Agents by phase, counted from the watch cache at each scrape.
    pub agents: Family<PhaseLabels, Gauge>,
    /// AgentBackups by location and phase (Failed: nothing stored; PartiallyFailed: the
    /// secondary copy failed), counted at each scrape.
    pub backups: Family<BackupLabels, Gauge>,
    /// Unix time of each Agent's newest Completed backup.
    pub backup_last_success: Family<AgentLabels, Gauge<f64, AtomicU64>>,
    /// 1 while a BackupLocation's store passed its last validation, else 0.
    pub backup_store_available: Family<StoreLabels, Gauge>,
    /// The messaging relay's counters.
    pub relay: RelayMetrics,
    /// Run before each render, to refresh the gauges counted from watch caches.
    scrape_hooks: std::sync::Mutex<Vec<ScrapeHook>>,
}

type ScrapeHook = Box<dyn Fn(&Metrics) + Send + Sync>;

/// The messaging relay's metrics (cheap clones of the registered ones).
#[derive(Clone, Debug)]
pub struct RelayMetrics {
    /// Messages relayed by result: `delivered` to the receiver's inbox, or `refused` (a dead
    /// letter: the sender gets an `agentry.undeliverable` notice instead).
    pub messages: Family<ResultLabels, Counter>,
    /// Failed Redis operations (a read of the outboxes or a write to an inbox; retried).
    pub errors: Counter,
    /// Seconds from a message's outbox write to the relay handling it.
    pub lag: Histogram,
}

impl Default for RelayMetrics {
    fn default() -> Self {
        // Both results from the start, so rate() and alerts see a series before the first one.
        let messages = Family::<ResultLabels, Counter>::default();
        for result in ["delivered", "refused"] {
            let _ = messages.get_or_create(&ResultLabels { result });
        }
        Self {
            messages,
            errors: Counter::default(),
            lag: Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0]),
        }
    }
}

/// Every Agent phase, so each has a series even at zero.
const PHASES: [&str; 6] = [
    "Pending",
    "Provisioning",
    "Ready",
    "Degraded",
    "Failed",
    "Terminating",
];

/// The signing CA's health. Process-wide, because the identity authority that sets them is
/// built apart from the registry; every `Metrics` exposes these same gauges.
#[derive(Clone, Debug, Default)]
pub struct CaGauges {
    /// 1 while the signing CA has expired (nothing can be issued), else 0.
    pub expired: Gauge,
    /// Seconds until the signing CA expires (negative once it has).
    pub expiry_seconds: Gauge<f64, AtomicU64>,
    /// 1 while the ledger lacks revocations the published CRL lists (nothing is issued).
    pub ledger_behind: Gauge,
    /// How many published revocations the ledger lacks.
    pub ledger_missing_revocations: Gauge,
}

/// The process-wide CA gauges.
pub fn ca_gauges() -> &'static CaGauges {
    static GAUGES: std::sync::OnceLock<CaGauges> = std::sync::OnceLock::new();
    GAUGES.get_or_init(CaGauges::default)
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("agentry");
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register(
            "reconcile",
            "Agent reconciliations by result",
            reconciles.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed Agent reconciliations by error kind",
            reconcile_errors.clone(),
        );
        let reconcile_duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one Agent reconciliation",
            reconcile_duration.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        let certificates_issued = Counter::default();
        registry.register(
            "certificates_issued",
            "Agent certificates issued",
            certificates_issued.clone(),
        );
        let certificates_revoked = Counter::default();
        registry.register(
            "certificates_revoked",
            "Agent certificates revoked",
            certificates_revoked.clone(),
        );
        let tokens_minted = Counter::default();
        registry.register("tokens_minted", "Agent JWTs minted", tokens_minted.clone());
        let nearest_certificate_expiry = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "certificate_nearest_expiry_seconds",
            "Seconds until the soonest-expiring active agent certificate",
            nearest_certificate_expiry.clone(),
        );
        let ca = ca_gauges().clone();
        registry.register(
            "ca_expired",
            "1 while the signing CA has expired and nothing can be issued (run `agentry ca rotate`)",
            ca.expired.clone(),
        );
        registry.register(
            "ca_expiry_seconds",
            "Seconds until the signing CA expires (negative once it has)",
            ca.expiry_seconds.clone(),
        );
        registry.register(
            "ledger_behind_crl",
            "1 while the ledger lacks revocations the published CRL lists: nothing is issued (restore the ledger, see docs/ha.md)",
            ca.ledger_behind.clone(),
        );
        registry.register(
            "ledger_missing_revocations",
            "Revocations listed in the published CRL that the ledger lacks",
            ca.ledger_missing_revocations.clone(),
        );
        let api_requests = Family::<ApiLabels, Counter>::default();
        registry.register(
            "api_requests",
            "Agent API requests by route and HTTP status",
            api_requests.clone(),
        );
        let api_request_duration = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ]);
        registry.register(
            "api_request_duration_seconds",
            "Time to answer an agent API request",
            api_request_duration.clone(),
        );
        let mut m = Self {
            ca,
            api_requests,
            api_request_duration,
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            leader,
            certificates_issued,
            certificates_revoked,
            tokens_minted,
            nearest_certificate_expiry,
            nearest_certificate_expiry_at: Gauge::default(),
            agents: Family::default(),
            backups: Family::default(),
            backup_last_success: Family::default(),
            backup_store_available: Family::default(),
            relay: RelayMetrics::default(),
            scrape_hooks: Default::default(),
        };
        let mut registry = std::mem::take(&mut m.registry);
        m.register_state(&mut registry);
        m.registry = registry;
        m
    }
}

impl Metrics {
    /// The gauges counted from watch caches, and the relay's metrics.
    fn register_state(&self, registry: &mut Registry) {
        registry.register(
            "certificate_nearest_expiry_timestamp_seconds",
            "Unix time the soonest-expiring active agent certificate expires",
            self.nearest_certificate_expiry_at.clone(),
        );
        registry.register("agents", "Agents by status.phase", self.agents.clone());
        registry.register(
            "agent_backups",
            "AgentBackups by BackupLocation and phase",
            self.backups.clone(),
        );
        registry.register(
            "backup_last_success_timestamp_seconds",
            "Unix time of the Agent's newest Completed backup",
            self.backup_last_success.clone(),
        );
        registry.register(
            "backup_store_available",
            "1 while the BackupLocation store passed its last validation, else 0",
            self.backup_store_available.clone(),
        );
        registry.register(
            "relay_messages",
            "Messages relayed by result (refused: a dead letter, returned as agentry.undeliverable)",
            self.relay.messages.clone(),
        );
        registry.register(
            "relay_errors",
            "Failed Redis operations of the relay (retried)",
            self.relay.errors.clone(),
        );
        registry.register(
            "relay_lag_seconds",
            "Seconds from a message's outbox write to the relay handling it",
            self.relay.lag.clone(),
        );
    }

    /// Records the soonest-expiring active certificate's `not_after` (Unix seconds), as the
    /// ledger reports it after an issuance.
    pub fn set_nearest_certificate_expiry(&self, not_after: i64) {
        self.nearest_certificate_expiry_at.set(not_after as f64);
        self.refresh_nearest_certificate_expiry();
    }

    /// Seconds from now to the recorded expiry, so the gauge counts down between issuances.
    fn refresh_nearest_certificate_expiry(&self) {
        let at = self.nearest_certificate_expiry_at.get();
        if at > 0.0 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.nearest_certificate_expiry.set(at - now);
        }
    }

    /// Runs `hook` before every render (it refreshes gauges counted from a watch cache).
    pub fn on_scrape(&self, hook: impl Fn(&Metrics) + Send + Sync + 'static) {
        let mut hooks = self.scrape_hooks.lock().unwrap_or_else(|e| e.into_inner());
        hooks.push(Box::new(hook));
    }

    /// Sets `agentry_agents` from every Agent's phase (every known phase gets a series).
    pub fn set_agent_phases(&self, phases: impl IntoIterator<Item = String>) {
        let mut counts: std::collections::BTreeMap<String, i64> =
            PHASES.iter().map(|p| (p.to_string(), 0)).collect();
        for phase in phases {
            *counts.entry(phase).or_default() += 1;
        }
        for (phase, n) in counts {
            self.agents.get_or_create(&PhaseLabels { phase }).set(n);
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        // Held while encoding too, so two scrapes do not interleave refreshes.
        let hooks = self.scrape_hooks.lock().unwrap_or_else(|e| e.into_inner());
        for hook in hooks.iter() {
            hook(self);
        }
        self.refresh_nearest_certificate_expiry();
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_the_agentry_prefix() {
        let m = Metrics::default();
        m.reconciles
            .get_or_create(&ResultLabels { result: "ok" })
            .inc();
        m.reconcile_duration.observe(0.02);
        let text = m.render();
        assert!(
            text.contains("agentry_reconcile_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("agentry_reconcile_duration_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("agentry_leader 0"), "{text}");
        ca_gauges().expired.set(1);
        let text = m.render();
        assert!(text.contains("agentry_ca_expired 1"), "{text}");
        assert!(text.contains("agentry_ca_expiry_seconds"), "{text}");
    }

    #[test]
    fn state_gauges_are_refreshed_at_each_render() {
        let m = Metrics::default();
        let phases = std::sync::Arc::new(std::sync::Mutex::new(vec!["Ready".to_string()]));
        let seen = phases.clone();
        m.on_scrape(move |m| m.set_agent_phases(seen.lock().unwrap().clone()));
        let text = m.render();
        assert!(text.contains("agentry_agents{phase=\"Ready\"} 1"), "{text}");
        assert!(
            text.contains("agentry_agents{phase=\"Failed\"} 0"),
            "{text}"
        );
        phases.lock().unwrap().push("Failed".into());
        assert!(m.render().contains("agentry_agents{phase=\"Failed\"} 1"));
        // The expiry counts down from the recorded not_after, not from issuance.
        let in_an_hour = jiff::Timestamp::now().as_second() + 3600;
        m.set_nearest_certificate_expiry(in_an_hour);
        let left = m.nearest_certificate_expiry.get();
        assert!((3500.0..=3600.0).contains(&left), "{left}");
        let text = m.render();
        assert!(
            text.contains("agentry_certificate_nearest_expiry_timestamp_seconds"),
            "{text}"
        );
    }
}
