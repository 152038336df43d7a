//! Agentry: a Kubernetes controller that gives every AI agent declared as an `Agent` resource a
//! verifiable identity, a right-sized workload, discovery by capability, messaging and backups.
#![forbid(unsafe_code)]

pub mod api;
pub mod backup;
pub mod controller;
pub mod crd;
pub mod identity;
pub mod keys;
pub mod messaging;
pub mod sidecar;
pub mod telemetry;
pub mod verify;
pub mod workload;
