//! The API's request and response bodies. They are the contract: the OpenAPI document
//! (`agentry openapi`, committed under `openapi/`) is generated from these types.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::crd::{BackupSpec, RetentionSpec};

/// `POST /v1/agents/register`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// `namespace/name` of the Agent; must be the agent the client certificate was issued to.
    #[schema(example = "team-a/summarizer")]
    pub id: String,
    /// What the agent offers now: a subset of the Agent's `spec.capabilities`.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// The agent's backup preferences, validated as `spec.backup` is. The Agent's spec decides
    /// what is scheduled; these are checked and recorded nowhere else.
    #[serde(default)]
    pub backup_prefs: Option<BackupPrefs>,
}

/// Backup preferences: the same fields and rules as an Agent's `spec.backup`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupPrefs {
    /// Five-field cron or @hourly/@daily/@weekly/@monthly/@yearly.
    #[schema(example = "0 */6 * * *")]
    pub schedule: String,
    /// 1 to 16 absolute paths without `..`.
    pub paths: Vec<String>,
    #[serde(default)]
    pub retention: Option<RetentionPrefs>,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetentionPrefs {
    /// 1 to 1000 (default 5).
    #[serde(default)]
    pub keep_last: Option<i32>,
    /// 0 to 3650 (default 7).
    #[serde(default)]
    pub keep_daily: Option<i32>,
}

impl BackupPrefs {
    /// As a `spec.backup`, for the one shared validator.
    pub fn to_spec(&self) -> BackupSpec {
        let defaults = RetentionSpec::default();
        let retention = self.retention.as_ref();
        BackupSpec {
            schedule: self.schedule.clone(),
            paths: self.paths.clone(),
            retention: RetentionSpec {
                keep_last: retention
                    .and_then(|r| r.keep_last)
                    .unwrap_or(defaults.keep_last),
                keep_daily: retention
                    .and_then(|r| r.keep_daily)
                    .unwrap_or(defaults.keep_daily),
                ..defaults
            },
            location: "default".into(),
            jitter: None,
            missed_run_policy: Default::default(),
        }
    }
}

/// What a registered agent is given.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct RegisterResponse {
    pub id: String,
    #[schema(example = "spiffe://cluster.local/ns/team-a/agent/summarizer")]
    pub spiffe_id: String,
    pub assigned_resources: AssignedResources,
    pub token: TokenInfo,
    /// The agent's Redis Streams inbox, when messaging is enabled and ready.
    pub inbox: Option<String>,
    /// Where and when its backups run, when `spec.backup` is set.
    pub backup: Option<BackupInfo>,
    pub agent_card_url: String,
    /// RFC 3339; unchanged by a repeated, identical registration.
    pub registered_at: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct AssignedResources {
    /// The pod's memory (agent + sidecar), e.g. `384Mi`.
    pub memory: String,
    pub cpu: Option<String>,
    /// The ceiling no agent may exceed: `512Mi`.
    pub max_memory: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct TokenInfo {
    /// When the token in the agent's identity Secret expires (RFC 3339).
    pub expires_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct BackupInfo {
    pub location: String,
    pub next_scheduled: Option<String>,
}

/// `POST /v1/token`: a fresh token bound to the presented certificate.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct TokenResponse {
    pub token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// RFC 3339.
    pub expires_at: String,
    /// Space-separated scopes, from the Agent's `spec.permissions`.
    pub scope: String,
}

/// `GET /v1/agents/{namespace}/{name}`: an agent's own record.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct AgentRecord {
    pub id: String,
    pub spiffe_id: String,
    /// Pending, Provisioning, Ready, Degraded, Failed or Terminating.
    pub phase: Option<String>,
    pub capabilities: Vec<String>,
    pub permissions: Vec<String>,
    pub assigned_resources: Option<AssignedResources>,
    /// `host:port` of the agent's Service.
    pub endpoint: Option<String>,
    /// The certificate serial the caller presented.
    pub certificate_serial: String,
    pub token_expires_at: Option<String>,
    pub registered_at: Option<String>,
    pub registered_capabilities: Vec<String>,
    pub agent_card_url: String,
}

/// `GET /v1/agents?capability=...`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct DiscoveryResponse {
    pub agents: Vec<DiscoveredAgent>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct DiscoveredAgent {
    pub id: String,
    pub spiffe_id: String,
    pub endpoint: Option<String>,
    pub agent_card_url: String,
    pub capabilities: Vec<String>,
}

/// `POST /v1/agents/{namespace}/{name}/csr`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CsrRequest {
    /// A PEM PKCS#10 request for a P-256 key. Only the key is used: the CA decides the
    /// subject, SANs, key usages and lifetime.
    pub csr: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct CsrResponse {
    /// The certificate (PEM).
    pub certificate: String,
    /// The trust bundle to verify the API and other agents with (PEM).
    pub ca_bundle: String,
    pub serial: String,
    pub spiffe_id: String,
    /// RFC 3339.
    pub not_after: String,
    /// A token bound to the new certificate.
    pub token: String,
    pub token_expires_at: String,
}
