//! HTTP surfaces. `ops` serves /metrics, /healthz and /readyz on a plain-HTTP port for Prometheus
//! and kubelet probes; the mTLS agent API (register, token, discovery, backups) joins it later.

pub mod ops;
