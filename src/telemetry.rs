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
    /// Seconds until the soonest-expiring active certificate (a float gauge).
    pub nearest_certificate_expiry: Gauge<f64, AtomicU64>,
    /// The signing CA's health (the same gauges as `ca_gauges()`).
    pub ca: CaGauges,
    /// Agent API requests by route and status code.
    pub api_requests: Family<ApiLabels, Counter>,
    pub api_request_duration: Histogram,
}

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
        Self {
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
        }
    }
}

impl Metrics {
    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
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
}
