//! The `Agent` custom resource (`agentry.dev/v1alpha1`): what a user declares, and the status the
//! controller writes back. Validation lives in the schema (OpenAPI + CEL) so the apiserver refuses a
//! bad spec before it is stored; `validate` repeats the checks for objects stored before a rule existed.

use k8s_openapi::api::core::v1::EnvVar;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::units;

/// The desired state of an agent.
// One `printcolumn(...)` per column is how kube-derive spells it; clippy mistakes them for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentry.dev",
    version = "v1alpha1",
    kind = "Agent",
    plural = "agents",
    singular = "agent",
    shortname = "ag",
    category = "agentry",
    namespaced,
    status = "AgentStatus",
    derive = "PartialEq",
    doc = "An AI agent: its identity, workload, discovery, messaging and backups.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Capabilities",
        type_ = "string",
        json_path = ".spec.capabilities"
    ),
    printcolumn(
        name = "Memory",
        type_ = "string",
        json_path = ".spec.resources.memory"
    ),
    printcolumn(
        name = "Cert-Expiry",
        type_ = "string",
        json_path = ".status.identity.notAfter"
    ),
    printcolumn(
        name = "Last-Backup",
        type_ = "date",
        json_path = ".status.backup.lastBackup.time"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// Discovery keys: what this agent can do. DNS-label-like names, at most 32.
    #[serde(default)]
    #[schemars(length(max = 32), inner(length(max = 63)), extend("x-kubernetes-list-type" = "set"))]
    #[x_kube(validation = capability_rule())]
    pub capabilities: Vec<String>,

    /// Scopes carried by the agent's JWT.
    #[serde(default)]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "set"))]
    pub permissions: Vec<Permission>,

    /// Lifetimes of the agent's certificate and token.
    #[serde(default)]
    pub identity: IdentitySpec,

    /// The agent's container.
    pub template: AgentTemplate,

    /// Memory and CPU for the agent; memory is capped at 512Mi for the whole pod.
    #[serde(default)]
    pub resources: ResourceSpec,

    /// Scheduled backups of the agent's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,

    /// The agent's Redis Streams inbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messaging: Option<MessagingSpec>,

    /// Persistent state: run as a StatefulSet with a volume (needed for backups of local files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<StateSpec>,
}

const CAPABILITY_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

fn capability_rule() -> kube::core::Rule {
    kube::core::Rule::new(format!("self.all(c, c.matches('{CAPABILITY_PATTERN}'))")).message(
        "each capability must be a lowercase DNS label (a-z, 0-9, '-', at most 63 characters), e.g. summarize",
    )
}

/// A JWT scope an agent may be granted. The set is closed: anything else is refused.
#[derive(
    Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub enum Permission {
    #[serde(rename = "backup:write")]
    BackupWrite,
    #[serde(rename = "backup:read")]
    BackupRead,
    #[serde(rename = "memory:read")]
    MemoryRead,
    #[serde(rename = "memory:write")]
    MemoryWrite,
    #[serde(rename = "messages:send")]
    MessagesSend,
    #[serde(rename = "messages:read")]
    MessagesRead,
    #[serde(rename = "agents:discover")]
    AgentsDiscover,
}

impl Permission {
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::BackupWrite => "backup:write",
            Permission::BackupRead => "backup:read",
            Permission::MemoryRead => "memory:read",
            Permission::MemoryWrite => "memory:write",
            Permission::MessagesSend => "messages:send",
            Permission::MessagesRead => "messages:read",
            Permission::AgentsDiscover => "agents:discover",
        }
    }
}

const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$";

pub const DEFAULT_CERTIFICATE_TTL: &str = "24h";
pub const DEFAULT_TOKEN_TTL: &str = "1h";

/// Certificate and token lifetimes, as Go durations (`30m`, `1h`, `2160h`).
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
pub struct IdentitySpec {
    /// Certificate lifetime, 1h..2160h (90 days). Renewed at 2/3 of it.
    #[serde(rename = "certificateTTL", default = "default_certificate_ttl")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    #[x_kube(validation = kube::core::Rule::new(
        "duration(self) >= duration('1h') && duration(self) <= duration('2160h')"
    ).message("certificateTTL must be between 1h and 2160h (90 days), e.g. 24h"))]
    pub certificate_ttl: String,

    /// Token lifetime, 5m..24h. Refreshed before 80% of it.
    #[serde(rename = "tokenTTL", default = "default_token_ttl")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    #[x_kube(validation = kube::core::Rule::new(
        "duration(self) >= duration('5m') && duration(self) <= duration('24h')"
    ).message("tokenTTL must be between 5m and 24h, e.g. 1h"))]
    pub token_ttl: String,
}

fn default_certificate_ttl() -> String {
    DEFAULT_CERTIFICATE_TTL.into()
}
fn default_token_ttl() -> String {
    DEFAULT_TOKEN_TTL.into()
}

impl Default for IdentitySpec {
    fn default() -> Self {
        Self {
            certificate_ttl: default_certificate_ttl(),
            token_ttl: default_token_ttl(),
        }
    }
}

/// The agent's container.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentTemplate {
    /// Container image, e.g. ghcr.io/example/summarizer:1.4
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = kube::core::Rule::new("!self.contains(' ')").message("image must not contain spaces"))]
    pub image: String,
    /// Entrypoint override.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub command: Vec<String>,
    /// Arguments to the entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub args: Vec<String>,
    /// Environment variables for the agent's container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    pub env: Vec<EnvVar>,
    /// The port the agent serves on; the Service exposes it.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

fn default_port() -> i32 {
    8080
}

pub const DEFAULT_MEMORY: &str = "512Mi";

/// Memory and CPU for the agent.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResourceSpec {
    /// Memory limit for the agent's pod, at most 512Mi (the default).
    #[serde(default = "default_memory")]
    #[schemars(length(max = 32))]
    #[x_kube(
        validation = kube::core::Rule::new("isQuantity(self)")
            .message("memory must be a quantity such as 384Mi or 512Mi"),
        validation = kube::core::Rule::new(
            "!isQuantity(self) || (quantity(self).compareTo(quantity('512Mi')) <= 0 && quantity(self).compareTo(quantity('16Mi')) >= 0)"
        ).message("memory must be between 16Mi and 512Mi: agents are capped at 512Mi; lower it, e.g. 384Mi")
    )]
    pub memory: String,
    /// CPU request for the agent, e.g. 250m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = kube::core::Rule::new(
        "isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))"
    ).message("cpu must be a positive quantity such as 250m or 1"))]
    pub cpu: Option<String>,
}

fn default_memory() -> String {
    DEFAULT_MEMORY.into()
}

impl Default for ResourceSpec {
    fn default() -> Self {
        Self {
            memory: default_memory(),
            cpu: None,
        }
    }
}

/// Scheduled backups.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// Five-field cron schedule (`0 */6 * * *`) or @hourly/@daily/@weekly/@monthly/@yearly.
    #[schemars(length(max = 128))]
    #[x_kube(validation = kube::core::Rule::new(format!("self.matches('{}')", cron_pattern()))
        .message("schedule must be a 5-field cron expression such as '0 */6 * * *' (minute hour day-of-month month day-of-week), or @hourly, @daily, @weekly, @monthly"))]
    pub schedule: String,
    /// Absolute paths inside the agent's container to back up.
    #[schemars(length(min = 1, max = 16), inner(length(max = 4096)))]
    #[x_kube(validation = kube::core::Rule::new("self.all(p, p.startsWith('/') && !p.contains('..'))")
        .message("paths must be absolute (start with /) and must not contain '..'"))]
    pub paths: Vec<String>,
    /// How many backups to keep.
    #[serde(default)]
    pub retention: RetentionSpec,
    /// Name of the BackupLocation (primary S3 + secondary B2) to store backups in.
    #[serde(default = "default_location")]
    #[schemars(length(min = 1, max = 253))]
    pub location: String,
}

fn default_location() -> String {
    "default".into()
}

/// Retention of backups: the newest `keepLast`, plus the newest of each of the last `keepDaily` days.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetentionSpec {
    #[serde(default = "default_keep_last")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_last: i32,
    #[serde(default = "default_keep_daily")]
    #[schemars(range(min = 0, max = 3650))]
    pub keep_daily: i32,
}

fn default_keep_last() -> i32 {
    5
}
fn default_keep_daily() -> i32 {
    7
}

impl Default for RetentionSpec {
    fn default() -> Self {
        Self {
            keep_last: default_keep_last(),
            keep_daily: default_keep_daily(),
        }
    }
}

/// The agent's Redis Streams inbox.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MessagingSpec {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Approximate cap on the inbox length (XADD MAXLEN ~).
    #[serde(default = "default_max_len")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub max_len: i64,
}

fn default_true() -> bool {
    true
}
fn default_max_len() -> i64 {
    10_000
}

/// Persistent state for the agent.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StateSpec {
    #[serde(default)]
    pub persistent: bool,
    /// Size of the state volume.
    #[serde(default = "default_state_size")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = kube::core::Rule::new(
        "isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))"
    ).message("state.size must be a positive quantity such as 1Gi"))]
    pub size: String,
    /// Where the state volume is mounted in the agent's container.
    #[serde(default = "default_state_path")]
    #[schemars(length(max = 4096))]
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('/')").message("state.mountPath must be absolute"))]
    pub mount_path: String,
}

fn default_state_size() -> String {
    "1Gi".into()
}
fn default_state_path() -> String {
    "/var/lib/agent".into()
}

/// The RE2 pattern for a 5-field cron expression or a macro, checked by the apiserver.
/// Uses no backslashes so it embeds in a CEL string literal unchanged.
pub fn cron_pattern() -> String {
    fn field(value: &str) -> String {
        let item = format!("([*]|{value}(-{value})?)(/[0-9]+)?");
        format!("{item}(,{item})*")
    }
    let minute = field("[0-5]?[0-9]");
    let hour = field("([01]?[0-9]|2[0-3])");
    let dom = field("(0?[1-9]|[12][0-9]|3[01])");
    let month = field("(0?[1-9]|1[0-2]|JAN|FEB|MAR|APR|MAY|JUN|JUL|AUG|SEP|OCT|NOV|DEC)");
    let dow = field("([0-7]|SUN|MON|TUE|WED|THU|FRI|SAT)");
    format!(
        "^(@(yearly|annually|monthly|weekly|daily|hourly)|{minute} +{hour} +{dom} +{month} +{dow})$"
    )
}

/// What the controller reports.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_resources: Option<AssignedResources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messaging: Option<MessagingStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupStatus>,
}

/// The agent's lifecycle phase; the Ready condition carries the reason.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Provisioning,
    Ready,
    Degraded,
    Failed,
    Terminating,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Pending => "Pending",
            Phase::Provisioning => "Provisioning",
            Phase::Ready => "Ready",
            Phase::Degraded => "Degraded",
            Phase::Failed => "Failed",
            Phase::Terminating => "Terminating",
        })
    }
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IdentityStatus {
    #[serde(rename = "spiffeID")]
    pub spiffe_id: String,
    /// Certificate serial, hex.
    pub serial: String,
    /// RFC 3339.
    pub not_after: String,
    /// When the controller renews the certificate (2/3 of its lifetime), RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires_at: Option<String>,
    pub secret_name: String,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AssignedResources {
    pub memory: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MessagingStatus {
    pub inbox: String,
    pub user: String,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<LastBackup>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_scheduled_time: Option<String>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LastBackup {
    pub id: String,
    pub time: String,
    pub blake3: String,
    pub size: i64,
    #[serde(default)]
    pub locations: Vec<String>,
}

/// A spec problem the apiserver should have refused; reported as a condition, never retried hot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: &'static str,
    pub message: String,
}

/// Values derived from a valid spec, so the rest of the controller never re-parses strings.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedSpec {
    pub memory_bytes: u64,
    pub cpu_millis: Option<u64>,
    pub certificate_ttl: std::time::Duration,
    pub token_ttl: std::time::Duration,
    pub backup_schedule: Option<croner::Cron>,
}

impl AgentSpec {
    /// Repeats the schema's checks in Rust: the controller's second line of defence.
    pub fn validate(&self) -> Result<ValidatedSpec, SpecError> {
        use std::time::Duration;
        let bad = |field: &'static str, message: String| SpecError { field, message };

        if self.capabilities.len() > 32 {
            return Err(bad(
                "spec.capabilities",
                format!(
                    "{} capabilities given, at most 32 allowed",
                    self.capabilities.len()
                ),
            ));
        }
        for c in &self.capabilities {
            let ok = !c.is_empty()
                && c.len() <= 63
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !c.starts_with('-')
                && !c.ends_with('-');
            if !ok {
                return Err(bad(
                    "spec.capabilities",
                    format!("{c:?} is not a lowercase DNS label (a-z, 0-9, '-')"),
                ));
            }
        }
        if self.template.image.trim().is_empty() {
            return Err(bad("spec.template.image", "must not be empty".into()));
        }
        let memory_bytes = units::parse_memory(&self.resources.memory)
            .map_err(|e| bad("spec.resources.memory", e))?;
        if memory_bytes > units::MEMORY_CAP_BYTES {
            return Err(bad(
                "spec.resources.memory",
                format!(
                    "{} exceeds the 512Mi cap; lower it, e.g. 384Mi",
                    self.resources.memory
                ),
            ));
        }
        if memory_bytes < units::MEMORY_MIN_BYTES {
            return Err(bad(
                "spec.resources.memory",
                format!("{} is below the 16Mi minimum", self.resources.memory),
            ));
        }
        let cpu_millis = self
            .resources
            .cpu
            .as_deref()
            .map(|c| units::parse_cpu_millis(c).map_err(|e| bad("spec.resources.cpu", e)))
            .transpose()?;
        let check_ttl = |field: &'static str, s: &str, min: Duration, max: Duration, hint: &str| {
            let d = units::parse_duration(s).map_err(|e| bad(field, e))?;
            if d < min || d > max {
                return Err(bad(field, format!("{s} is outside {hint}")));
            }
            Ok(d)
        };
        let certificate_ttl = check_ttl(
            "spec.identity.certificateTTL",
            &self.identity.certificate_ttl,
            Duration::from_secs(3600),
            Duration::from_secs(90 * 86400),
            "1h..2160h (90 days)",
        )?;
        let token_ttl = check_ttl(
            "spec.identity.tokenTTL",
            &self.identity.token_ttl,
            Duration::from_secs(300),
            Duration::from_secs(86400),
            "5m..24h",
        )?;
        let backup_schedule = match &self.backup {
            None => None,
            Some(b) => {
                if b.paths.is_empty()
                    || b.paths
                        .iter()
                        .any(|p| !p.starts_with('/') || p.contains(".."))
                {
                    return Err(bad(
                        "spec.backup.paths",
                        "give at least one absolute path without '..'".into(),
                    ));
                }
                Some(parse_cron(&b.schedule).map_err(|e| bad("spec.backup.schedule", e))?)
            }
        };
        Ok(ValidatedSpec {
            memory_bytes,
            cpu_millis,
            certificate_ttl,
            token_ttl,
            backup_schedule,
        })
    }

    /// The permissions as JWT scopes: sorted, deduplicated, space-separated.
    pub fn scope(&self) -> String {
        let mut p = self.permissions.clone();
        p.sort();
        p.dedup();
        p.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(" ")
    }
}

/// Parses a cron schedule with croner: five fields (no seconds, no year) or a macro such as @daily.
pub fn parse_cron(s: &str) -> Result<croner::Cron, String> {
    use croner::parser::{CronParser, Seconds, Year};
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(s)
        .map_err(|e| {
            format!("{s:?} is not a 5-field cron expression such as '0 */6 * * *' or @daily: {e}")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(overrides: serde_json::Value) -> AgentSpec {
        let mut base = serde_json::json!({"template": {"image": "img:1"}});
        if let (Some(b), Some(o)) = (base.as_object_mut(), overrides.as_object()) {
            for (k, v) in o {
                b.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn defaults_validate() {
        let v = spec(serde_json::json!({})).validate().unwrap();
        assert_eq!(v.memory_bytes, units::MEMORY_CAP_BYTES);
        assert_eq!(v.certificate_ttl, std::time::Duration::from_secs(86400));
        assert_eq!(v.token_ttl, std::time::Duration::from_secs(3600));
        assert!(v.backup_schedule.is_none());
    }

    #[test]
    fn the_controller_rejects_what_the_schema_rejects_naming_the_field() {
        let cases = [
            (
                serde_json::json!({"resources": {"memory": "1Gi"}}),
                "spec.resources.memory",
            ),
            (
                serde_json::json!({"resources": {"memory": "8Mi"}}),
                "spec.resources.memory",
            ),
            (
                serde_json::json!({"resources": {"memory": "x"}}),
                "spec.resources.memory",
            ),
            (
                serde_json::json!({"resources": {"memory": "256Mi", "cpu": "fast"}}),
                "spec.resources.cpu",
            ),
            (
                serde_json::json!({"capabilities": ["Bad"]}),
                "spec.capabilities",
            ),
            (
                serde_json::json!({"capabilities": ["-x"]}),
                "spec.capabilities",
            ),
            (
                serde_json::json!({"identity": {"tokenTTL": "1m"}}),
                "spec.identity.tokenTTL",
            ),
            (
                serde_json::json!({"identity": {"certificateTTL": "3000h"}}),
                "spec.identity.certificateTTL",
            ),
            (
                serde_json::json!({"backup": {"schedule": "61 * * * *", "paths": ["/d"]}}),
                "spec.backup.schedule",
            ),
            (
                serde_json::json!({"backup": {"schedule": "* * * * * *", "paths": ["/d"]}}),
                "spec.backup.schedule",
            ),
            (
                serde_json::json!({"backup": {"schedule": "@daily", "paths": ["rel"]}}),
                "spec.backup.paths",
            ),
            (
                serde_json::json!({"template": {"image": " "}}),
                "spec.template.image",
            ),
        ];
        for (overrides, field) in cases {
            let err = spec(overrides.clone()).validate().unwrap_err();
            assert_eq!(err.field, field, "{overrides}");
            assert!(!err.message.is_empty());
        }
        let caps: Vec<String> = (0..33).map(|i| format!("c{i}")).collect();
        assert_eq!(
            spec(serde_json::json!({"capabilities": caps}))
                .validate()
                .unwrap_err()
                .field,
            "spec.capabilities"
        );
    }

    #[test]
    fn cron_schedules_parse_like_the_schema_pattern_allows() {
        let re = cron_pattern();
        for ok in [
            "0 */6 * * *",
            "@daily",
            "*/15 9-17 * * MON-FRI",
            "5 4 1 JAN,JUL *",
        ] {
            assert!(parse_cron(ok).is_ok(), "{ok}");
            assert!(re.contains("@(yearly"), "{re}");
        }
        for bad in ["every day", "* * * *", "61 * * * *", "0 0 * * * 2026"] {
            assert!(parse_cron(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scope_is_sorted_and_deduplicated() {
        let s = spec(
            serde_json::json!({"permissions": ["memory:read", "backup:write", "memory:read"]}),
        );
        assert_eq!(s.scope(), "backup:write memory:read");
    }
}
