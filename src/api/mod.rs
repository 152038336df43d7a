//! HTTP surfaces. `ops` serves /metrics, /healthz and /readyz on a plain-HTTP port for
//! Prometheus and kubelet probes. The agent API (mTLS + bound JWT) is served by the leader:
//! `server` (TLS, limits), `auth` (who is calling), `agents` (register, token, own record,
//! discovery), `card` (A2A cards), `csr` (bootstrap), `public` (JWKS, CRL, trust bundle),
//! `backups` (the sidecar's backup and restore transfers), `model` + `openapi` (the contract), `body` + `error` (input and errors), `cluster` (status
//! writes and TokenReview), `state`.

pub mod agents;
pub mod auth;
pub mod backups;
pub mod body;
pub mod card;
pub mod cluster;
pub mod csr;
pub mod error;
pub mod model;
pub mod openapi;
pub mod ops;
pub mod public;
pub mod server;
pub mod state;

/// `unix` seconds as RFC 3339 (`2026-11-29T14:42:06Z`); the number itself if out of range.
pub(crate) fn rfc3339(unix: i64) -> String {
    jiff::Timestamp::from_second(unix).map_or_else(|_| unix.to_string(), |t| t.to_string())
}
