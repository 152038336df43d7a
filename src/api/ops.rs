//! The operations endpoint: Prometheus metrics and health probes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use axum::{
    Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get,
};
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

#[derive(Clone)]
pub struct OpsState {
    pub metrics: Arc<Metrics>,
    /// False until the replica has joined leader election.
    pub ready: Arc<AtomicBool>,
    /// The agent API's state on this replica (see [`ApiRole`]).
    pub api: Arc<AtomicU8>,
}

/// Which replicas serve the agent API: only the leader (it alone holds the CA key and the
/// ledger). A standby is live but not ready, so the `agentry-api` Service sends API traffic
/// to the leader only; when the API is off, every replica that joined the election is ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ApiRole {
    /// `--api-addr ""`: no API.
    Off = 0,
    /// Not leading (or the leader is still starting the API).
    Standby = 1,
    /// Leading and serving the API.
    Serving = 2,
}

pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(s): State<OpsState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn readyz(State(s): State<OpsState>) -> impl IntoResponse {
    if !s.ready.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting");
    }
    if crate::telemetry::ca_gauges().ledger_behind.get() == 1 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "ledger behind the published CRL (LedgerBehindCRL): issuing nothing; restore the \
             ledger from the replica or restart with --adopt-published-crl (docs/ha.md)",
        );
    }
    match s.api.load(Ordering::Relaxed) {
        1 => (
            StatusCode::SERVICE_UNAVAILABLE,
            "standby: the agent API is served by the leader only",
        ),
        2 => (StatusCode::OK, "leader: serving the agent API"),
        _ => (StatusCode::OK, "ok"),
    }
}

/// Binds `addr` and serves until `shutdown` fires. Returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    state: OpsState,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(state);
    let handle = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "ops server failed");
        }
    });
    Ok((bound, handle))
}
