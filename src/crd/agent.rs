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
    ),
    validation = name_rule(),
    validation = identity_secret_rule()
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

    /// What the agent's A2A agent card says about it (description and skills). Its
    /// capabilities become skill tags; the card is served by the registry API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card: Option<CardSpec>,
}

/// The agent's A2A card content.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CardSpec {
    /// What the agent does, for people and other agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// The agent's version as its card reports it (default: the image tag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub version: Option<String>,
    /// What the agent can do, as A2A skills.
    #[serde(default)]
    #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["id"]))]
    pub skills: Vec<CardSkill>,
}

/// One A2A skill.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CardSkill {
    /// Unique within the agent, e.g. `summarize-text`.
    #[schemars(length(min = 1, max = 63))]
    pub id: String,
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub description: String,
    #[serde(default)]
    #[schemars(length(max = 16), inner(length(max = 63)))]
    pub tags: Vec<String>,
    #[serde(default)]
    #[schemars(length(max = 8), inner(length(max = 512)))]
    pub examples: Vec<String>,
}

/// An Agent's name becomes its Service's name (a DNS-1035 label), a label value, a path segment of
/// its SPIFFE ID and the prefix of its `<name>-identity` Secret: a lowercase DNS-1035 label.
pub const NAME_PATTERN: &str = "^[a-z]([-a-z0-9]*[a-z0-9])?$";
/// The longest Agent name (a DNS label).
pub const NAME_MAX_LEN: usize = 63;
/// Secrets with this suffix are Agent identities (`<name>-identity`).
pub const IDENTITY_SECRET_SUFFIX: &str = "-identity";

const NAME_MESSAGE: &str = "metadata.name must be a DNS-1035 label: lowercase a-z, 0-9 and '-', starting with a letter, ending with a letter or digit, at most 63 characters (e.g. summarizer); it names the Agent's Service, its <name>-identity Secret and its SPIFFE ID";

const IDENTITY_REF_MESSAGE: &str =
    "Secrets named *-identity are Agent identities; an Agent may not read another Agent's identity";

fn name_rule() -> kube::core::Rule {
    kube::core::Rule::new(format!(
        "size(self.metadata.name) <= {NAME_MAX_LEN} && self.metadata.name.matches('{NAME_PATTERN}')"
    ))
    .message(NAME_MESSAGE)
}

fn identity_secret_rule() -> kube::core::Rule {
    // No `self.metadata.name + '-identity'`: concatenating the (statically unbounded) name in a
    // loop is beyond the CEL cost budget; the bounded Secret name minus its suffix is compared.
    kube::core::Rule::new(format!(
        "!has(self.spec.template.env) || self.spec.template.env.all(e, !has(e.valueFrom) || !has(e.valueFrom.secretKeyRef) || !has(e.valueFrom.secretKeyRef.name) || !e.valueFrom.secretKeyRef.name.endsWith('{IDENTITY_SECRET_SUFFIX}') || e.valueFrom.secretKeyRef.name.substring(0, size(e.valueFrom.secretKeyRef.name) - {suffix_len}) == self.metadata.name)",
        suffix_len = IDENTITY_SECRET_SUFFIX.len()
    ))
    .message(
        format!("spec.template.env[].valueFrom.secretKeyRef.name: {IDENTITY_REF_MESSAGE}")
            .as_str(),
    )
    .field_path(".spec.template.env")
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
    /// Entrypoint override: at most 64 items of at most 4096 characters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 4096)))]
    pub command: Vec<String>,
    /// Arguments to the entrypoint: at most 256 items of at most 4096 characters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 4096)))]
    pub args: Vec<String>,
    /// Environment variables for the agent's container: at most 128; names of at most 256
    /// characters, values of at most 32768 (32 KiB), referenced Secret/ConfigMap names and keys of
    /// at most 253. `valueFrom.secretKeyRef` may not name another Agent's `<name>-identity` Secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128), schema_with = "env_schema")]
    pub env: Vec<EnvVar>,
    /// The port the agent serves on; the Service exposes it.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

/// Limits on the template's strings, so that one Agent cannot fill the controller's cache (the
/// schema enforces them; `AgentSpec::validate` repeats them).
pub const MAX_COMMAND_ITEMS: usize = 64;
pub const MAX_ARGS_ITEMS: usize = 256;
pub const MAX_ARG_LEN: usize = 4096;
pub const MAX_ENV_ITEMS: usize = 128;
pub const MAX_ENV_NAME_LEN: usize = 256;
pub const MAX_ENV_VALUE_LEN: usize = 32 * 1024;
/// Names of referenced Secrets/ConfigMaps (DNS subdomains) and their keys.
pub const MAX_REF_LEN: usize = 253;

/// `Vec<EnvVar>`'s schema from k8s-openapi, with length limits on every free-form string (they
/// also bound the cost of the CEL rules that read them).
fn env_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<EnvVar>>();
    let limits = [
        ("/items/properties/name", MAX_ENV_NAME_LEN),
        ("/items/properties/value", MAX_ENV_VALUE_LEN),
        (
            "/items/properties/valueFrom/properties/secretKeyRef/properties/name",
            MAX_REF_LEN,
        ),
        (
            "/items/properties/valueFrom/properties/secretKeyRef/properties/key",
            MAX_REF_LEN,
        ),
        (
            "/items/properties/valueFrom/properties/configMapKeyRef/properties/name",
            MAX_REF_LEN,
        ),
        (
            "/items/properties/valueFrom/properties/configMapKeyRef/properties/key",
            MAX_REF_LEN,
        ),
    ];
    for (pointer, max) in limits {
        let property = schema
            .pointer_mut(pointer)
            .and_then(|p| p.as_object_mut())
            .unwrap_or_else(|| panic!("EnvVar schema has no {pointer}"));
        property.insert("maxLength".into(), max.into());
    }
    schema
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
    /// CPU request for the agent, e.g. 250m; more than 0, at most 1000 (cores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = kube::core::Rule::new(
        "isQuantity(self) && quantity(self).isGreaterThan(quantity('0')) && quantity(self).compareTo(quantity('1k')) <= 0"
    ).message("cpu must be a positive quantity of at most 1000 (cores) such as 250m or 1"))]
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
    /// Spread scheduled runs over up to this long after each cron time (e.g. `5m`), so a fleet
    /// on the same schedule does not start at once. The delay is fixed per Agent and run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = kube::core::Rule::new("duration(self) >= duration('0s') && duration(self) <= duration('24h')")
        .message("jitter must be a duration between 0s and 24h, e.g. 5m"))]
    pub jitter: Option<String>,
    /// Runs missed while the controller was down: `RunOnce` (run the latest missed one at
    /// start) or `Skip` (wait for the next).
    #[serde(default)]
    pub missed_run_policy: crate::backup::schedule::MissedRunPolicy,
}

impl BackupSpec {
    /// The one backup validator, shared by the controller (`spec.backup`) and the API
    /// (`backup_prefs`): it repeats the schema's rules. Errors name the field under the spec
    /// (`schedule`, `paths`, `retention.keepLast`, ...) and the fix.
    pub fn validate(&self) -> Result<croner::Cron, (&'static str, String)> {
        if self.paths.is_empty() || self.paths.len() > 16 {
            return Err(("paths", "give 1 to 16 absolute paths".into()));
        }
        if let Some(p) = self
            .paths
            .iter()
            .find(|p| !p.starts_with('/') || p.contains("..") || p.len() > 4096)
        {
            return Err((
                "paths",
                format!(
                    "{p:?} must be absolute (start with /), must not contain '..' and be at most 4096 bytes"
                ),
            ));
        }
        if !(1..=1000).contains(&self.retention.keep_last) {
            return Err((
                "retention.keepLast",
                format!(
                    "{} is out of range; keep 1 to 1000 backups",
                    self.retention.keep_last
                ),
            ));
        }
        if !(0..=3650).contains(&self.retention.keep_daily) {
            return Err((
                "retention.keepDaily",
                format!(
                    "{} is out of range; keep 0 to 3650 daily backups",
                    self.retention.keep_daily
                ),
            ));
        }
        if self.location.is_empty() || self.location.len() > 253 {
            return Err((
                "location",
                "name a BackupLocation (1 to 253 characters)".into(),
            ));
        }
        if self.schedule.len() > 128 {
            return Err(("schedule", "at most 128 characters".into()));
        }
        for (field, value, max) in [
            ("retention.keepHourly", self.retention.keep_hourly, 8760),
            ("retention.keepWeekly", self.retention.keep_weekly, 520),
            ("retention.keepMonthly", self.retention.keep_monthly, 1200),
            ("retention.keepYearly", self.retention.keep_yearly, 100),
        ] {
            if !(0..=max).contains(&value) {
                return Err((field, format!("{value} is out of range; keep 0 to {max}")));
            }
        }
        self.jitter()?;
        parse_cron(&self.schedule).map_err(|e| ("schedule", e))
    }

    /// `jitter` as a duration (zero when unset).
    pub fn jitter(&self) -> Result<std::time::Duration, (&'static str, String)> {
        let Some(j) = &self.jitter else {
            return Ok(std::time::Duration::ZERO);
        };
        let d = units::parse_duration(j).map_err(|e| ("jitter", e))?;
        if d > std::time::Duration::from_secs(24 * 3600) {
            return Err(("jitter", format!("{j:?} is longer than 24h")));
        }
        Ok(d)
    }

    /// The retention policy as the GFS planner takes it.
    pub fn retention_policy(&self) -> crate::backup::retention::Policy {
        let r = &self.retention;
        let n = |v: i32| u32::try_from(v).unwrap_or(0);
        crate::backup::retention::Policy {
            keep_last: n(r.keep_last),
            keep_hourly: n(r.keep_hourly),
            keep_daily: n(r.keep_daily),
            keep_weekly: n(r.keep_weekly),
            keep_monthly: n(r.keep_monthly),
            keep_yearly: n(r.keep_yearly),
        }
    }
}

/// `prefix.field` for the fields [`BackupSpec::validate`] names.
pub fn backup_field(prefix: &'static str, field: &'static str) -> &'static str {
    match (prefix, field) {
        ("spec.backup", "schedule") => "spec.backup.schedule",
        ("spec.backup", "paths") => "spec.backup.paths",
        ("spec.backup", "retention.keepLast") => "spec.backup.retention.keepLast",
        ("spec.backup", "retention.keepDaily") => "spec.backup.retention.keepDaily",
        ("spec.backup", "location") => "spec.backup.location",
        ("spec.backup", "jitter") => "spec.backup.jitter",
        ("spec.backup", "retention.keepHourly") => "spec.backup.retention.keepHourly",
        ("spec.backup", "retention.keepWeekly") => "spec.backup.retention.keepWeekly",
        ("spec.backup", "retention.keepMonthly") => "spec.backup.retention.keepMonthly",
        ("spec.backup", "retention.keepYearly") => "spec.backup.retention.keepYearly",
        ("backup_prefs", "schedule") => "backup_prefs.schedule",
        ("backup_prefs", "paths") => "backup_prefs.paths",
        ("backup_prefs", "retention.keepLast") => "backup_prefs.retention.keepLast",
        ("backup_prefs", "retention.keepDaily") => "backup_prefs.retention.keepDaily",
        ("backup_prefs", "location") => "backup_prefs.location",
        ("backup_prefs", "jitter") => "backup_prefs.jitter",
        ("backup_prefs", "retention.keepHourly") => "backup_prefs.retention.keepHourly",
        ("backup_prefs", "retention.keepWeekly") => "backup_prefs.retention.keepWeekly",
        ("backup_prefs", "retention.keepMonthly") => "backup_prefs.retention.keepMonthly",
        ("backup_prefs", "retention.keepYearly") => "backup_prefs.retention.keepYearly",
        _ => prefix,
    }
}

fn default_location() -> String {
    "default".into()
}

/// Retention of Completed backups (grandfather-father-son, all in UTC): the newest `keepLast`,
/// plus the newest backup of each of the last `keepHourly` hours, `keepDaily` days, `keepWeekly`
/// ISO weeks, `keepMonthly` months and `keepYearly` years that have one. The newest backup is
/// always kept, and nothing is deleted while a store is unavailable.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetentionSpec {
    #[serde(default = "default_keep_last")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_last: i32,
    #[serde(default)]
    #[schemars(range(min = 0, max = 8760))]
    pub keep_hourly: i32,
    #[serde(default = "default_keep_daily")]
    #[schemars(range(min = 0, max = 3650))]
    pub keep_daily: i32,
    #[serde(default)]
    #[schemars(range(min = 0, max = 520))]
    pub keep_weekly: i32,
    #[serde(default)]
    #[schemars(range(min = 0, max = 1200))]
    pub keep_monthly: i32,
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub keep_yearly: i32,
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
            keep_hourly: 0,
            keep_daily: default_keep_daily(),
            keep_weekly: 0,
            keep_monthly: 0,
            keep_yearly: 0,
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
    /// Whom this agent may send to. Unset: the Agents of its own namespace; `[]`: nobody.
    /// A message is delivered only when the sender's `allowTo` and the receiver's `allowFrom`
    /// both allow it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub allow_to: Option<Vec<PeerSelector>>,
    /// Who may send to this agent. Unset: the Agents of its own namespace; `[]`: nobody.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub allow_from: Option<Vec<PeerSelector>>,
}

/// A set of peer Agents, for `allowTo` / `allowFrom`: those in one of `namespaces` (empty: this
/// Agent's own namespace; `*`: any) that have one of `capabilities` (empty: any).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerSelector {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 63)))]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 63)))]
    pub capabilities: Vec<String>,
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
    /// The agent's last registration (`POST /v1/agents/register`), written by the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration: Option<RegistrationStatus>,
    /// Where the agent's signed A2A card is served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_card_url: Option<String>,
}

/// What the agent said when it last registered.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationStatus {
    /// RFC 3339.
    pub registered_at: String,
    /// The capabilities it registered (a subset of spec.capabilities).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// The client's User-Agent, e.g. `agentry-sidecar/0.1.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_version: Option<String>,
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
    /// The stream the agent reads (consumer group `agent`).
    pub inbox: String,
    /// The stream the agent writes to send; the relay delivers from it.
    #[serde(default)]
    pub outbox: String,
    /// Where messages go after 5 failed deliveries.
    #[serde(default)]
    pub dead_letters: String,
    /// The agent's Redis ACL user (its password is `redis-password` in the identity Secret).
    pub user: String,
    /// The Redis the agent connects to.
    #[serde(default)]
    pub endpoint: String,
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
        self.validate_capabilities()?;
        if self.template.image.trim().is_empty() {
            return Err(bad("spec.template.image", "must not be empty".into()));
        }
        self.validate_template()?;
        let (memory_bytes, cpu_millis) = self.validate_resources()?;
        let (certificate_ttl, token_ttl) = self.validate_lifetimes()?;
        let backup_schedule = match &self.backup {
            None => None,
            Some(b) => Some(b.validate().map_err(|(field, message)| SpecError {
                field: backup_field("spec.backup", field),
                message,
            })?),
        };
        Ok(ValidatedSpec {
            memory_bytes,
            cpu_millis,
            certificate_ttl,
            token_ttl,
            backup_schedule,
        })
    }

    fn validate_capabilities(&self) -> Result<(), SpecError> {
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
        Ok(())
    }

    /// Memory in bytes (compared exactly, as the schema's CEL does; the pod gets it rounded up to
    /// bytes) and CPU in millicores.
    fn validate_resources(&self) -> Result<(u64, Option<u64>), SpecError> {
        let memory = units::parse_quantity(&self.resources.memory)
            .map_err(|e| bad("spec.resources.memory", e))?;
        if memory.cmp_units(units::MEMORY_CAP_BYTES).is_gt() {
            return Err(bad(
                "spec.resources.memory",
                format!(
                    "{} exceeds the 512Mi cap; lower it, e.g. 384Mi",
                    self.resources.memory
                ),
            ));
        }
        if memory.cmp_units(units::MEMORY_MIN_BYTES).is_lt() {
            return Err(bad(
                "spec.resources.memory",
                format!("{} is below the 16Mi minimum", self.resources.memory),
            ));
        }
        let memory_bytes = u64::try_from(memory.units_ceil())
            .map_err(|_| bad("spec.resources.memory", "too large".into()))?;
        let cpu_millis = match self.resources.cpu.as_deref() {
            None => None,
            Some(c) => {
                let q = units::parse_quantity(c).map_err(|e| bad("spec.resources.cpu", e))?;
                if !q.cmp_units(0).is_gt() || q.cmp_units(units::CPU_MAX_CORES).is_gt() {
                    return Err(bad(
                        "spec.resources.cpu",
                        format!("{c} is not a positive quantity of at most 1000 (cores)"),
                    ));
                }
                Some(units::parse_cpu_millis(c).map_err(|e| bad("spec.resources.cpu", e))?)
            }
        };
        Ok((memory_bytes, cpu_millis))
    }

    /// The certificate and token lifetimes.
    fn validate_lifetimes(&self) -> Result<(std::time::Duration, std::time::Duration), SpecError> {
        use std::time::Duration;
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
        Ok((certificate_ttl, token_ttl))
    }

    /// The template's lengths, as the schema bounds them (counted in characters, like the apiserver).
    fn validate_template(&self) -> Result<(), SpecError> {
        let t = &self.template;
        let chars = |s: &str| s.chars().count();
        let too_long = |field: &'static str, what: String, max: usize| SpecError {
            field,
            message: format!("{what} is longer than {max} characters"),
        };
        if t.command.len() > MAX_COMMAND_ITEMS {
            return Err(too_long(
                "spec.template.command",
                "the list".into(),
                MAX_COMMAND_ITEMS,
            ));
        }
        if let Some(i) = t.command.iter().position(|c| chars(c) > MAX_ARG_LEN) {
            return Err(too_long(
                "spec.template.command",
                format!("item {i}"),
                MAX_ARG_LEN,
            ));
        }
        if t.args.len() > MAX_ARGS_ITEMS {
            return Err(too_long(
                "spec.template.args",
                "the list".into(),
                MAX_ARGS_ITEMS,
            ));
        }
        if let Some(i) = t.args.iter().position(|a| chars(a) > MAX_ARG_LEN) {
            return Err(too_long(
                "spec.template.args",
                format!("item {i}"),
                MAX_ARG_LEN,
            ));
        }
        if t.env.len() > MAX_ENV_ITEMS {
            return Err(too_long(
                "spec.template.env",
                "the list".into(),
                MAX_ENV_ITEMS,
            ));
        }
        for (i, e) in t.env.iter().enumerate() {
            if chars(&e.name) > MAX_ENV_NAME_LEN {
                return Err(too_long(
                    "spec.template.env",
                    format!("env[{i}].name"),
                    MAX_ENV_NAME_LEN,
                ));
            }
            if e.value
                .as_deref()
                .is_some_and(|v| chars(v) > MAX_ENV_VALUE_LEN)
            {
                return Err(too_long(
                    "spec.template.env",
                    format!("env[{i}].value"),
                    MAX_ENV_VALUE_LEN,
                ));
            }
            let from = e.value_from.as_ref();
            let refs = [
                from.and_then(|f| f.secret_key_ref.as_ref())
                    .map(|r| (&r.name, &r.key)),
                from.and_then(|f| f.config_map_key_ref.as_ref())
                    .map(|r| (&r.name, &r.key)),
            ];
            for (name, key) in refs.into_iter().flatten() {
                if chars(name) > MAX_REF_LEN || chars(key) > MAX_REF_LEN {
                    return Err(too_long(
                        "spec.template.env",
                        format!("env[{i}].valueFrom: a referenced name or key"),
                        MAX_REF_LEN,
                    ));
                }
            }
        }
        Ok(())
    }

    /// The permissions as JWT scopes: sorted, deduplicated, space-separated.
    pub fn scope(&self) -> String {
        let mut p = self.permissions.clone();
        p.sort();
        p.dedup();
        p.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(" ")
    }
}

fn bad(field: &'static str, message: String) -> SpecError {
    SpecError { field, message }
}

/// Checks an Agent's `metadata.name`, which `AgentSpec::validate` cannot see: it must be a
/// DNS-1035 label of at most 63 characters (`^[a-z]([-a-z0-9]*[a-z0-9])?$`), because it names the
/// Agent's Service, its `<name>-identity` Secret and the last segment of its SPIFFE ID. The CRD
/// refuses other names with the same rule; the controller calls this before issuing anything, for
/// Agents stored before the rule existed. The error's field is `metadata.name`.
pub fn validate_name(name: &str) -> Result<(), SpecError> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= NAME_MAX_LEN
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(SpecError {
            field: "metadata.name",
            message: format!("{name:?} is not valid: {NAME_MESSAGE}"),
        })
    }
}

/// Refuses `spec.template.env[i].valueFrom.secretKeyRef` naming a Secret that ends in `-identity`
/// other than the Agent's own `<name>-identity`: those Secrets hold other Agents' keys and tokens.
/// (The template has no `envFrom`, and its only volume is the Agent's own identity.) The CRD has
/// the same rule; the controller calls this with the Agent's name before building its workload.
/// The error's field is `spec.template.env` and its message gives the index.
pub fn validate_env_refs(name: &str, spec: &AgentSpec) -> Result<(), SpecError> {
    let own = format!("{name}{IDENTITY_SECRET_SUFFIX}");
    for (i, e) in spec.template.env.iter().enumerate() {
        let secret = e
            .value_from
            .as_ref()
            .and_then(|f| f.secret_key_ref.as_ref())
            .map(|r| r.name.as_str());
        if let Some(secret) = secret
            && secret.ends_with(IDENTITY_SECRET_SUFFIX)
            && secret != own
        {
            return Err(SpecError {
                field: "spec.template.env",
                message: format!(
                    "spec.template.env[{i}].valueFrom.secretKeyRef.name: {secret:?}: {IDENTITY_REF_MESSAGE}"
                ),
            });
        }
    }
    Ok(())
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
    fn memory_written_like_the_apiserver_allows_is_accepted() {
        for (memory, bytes) in [
            ("536870912", units::MEMORY_CAP_BYTES),
            ("5e8", 500_000_000),
            ("0.5Gi", units::MEMORY_CAP_BYTES),
            ("+256Mi", 256 << 20),
            ("1E8", 100_000_000),
        ] {
            let v = spec(serde_json::json!({"resources": {"memory": memory}}))
                .validate()
                .unwrap_or_else(|e| panic!("{memory}: {e}"));
            assert_eq!(v.memory_bytes, bytes, "{memory}");
        }
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
            (
                serde_json::json!({"resources": {"memory": "16777215.5"}}),
                "spec.resources.memory",
            ),
            (
                serde_json::json!({"resources": {"memory": "512.1Mi"}}),
                "spec.resources.memory",
            ),
            (
                serde_json::json!({"resources": {"memory": "6e8"}}),
                "spec.resources.memory",
            ),
            (
                serde_json::json!({"resources": {"cpu": "0"}}),
                "spec.resources.cpu",
            ),
            (
                serde_json::json!({"resources": {"cpu": "1001"}}),
                "spec.resources.cpu",
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
        // The apiserver runs the pattern with RE2; the regex crate has the same syntax and semantics.
        let re = regex::Regex::new(&cron_pattern()).unwrap();
        let both_accept = [
            "0 */6 * * *",
            "@daily",
            "@hourly",
            "@weekly",
            "@monthly",
            "@yearly",
            "@annually",
            "*/15 9-17 * * MON-FRI",
            "5 4 1 JAN,JUL *",
            "0 0 1 1 0",
            "59 23 31 12 7",
            "0,30 8-18/2 1-15 * 1-5",
            "5 4 * * SUN",
            "0  0  *  *  *",
        ];
        for ok in both_accept {
            assert!(re.is_match(ok), "the schema refuses {ok:?}");
            assert!(parse_cron(ok).is_ok(), "croner refuses {ok:?}");
        }
        let both_refuse = [
            "every day",
            "* * * *",
            "61 * * * *",
            "0 24 * * *",
            "0 0 32 * *",
            "0 0 * 13 *",
            "0 0 * * 8",
            "0 0 0 * *",
            "0 0 * * * 2026",
            "* * * * * *",
            "@sometimes",
            "*/x * * * *",
            "",
        ];
        for bad in both_refuse {
            assert!(!re.is_match(bad), "the schema accepts {bad:?}");
            assert!(parse_cron(bad).is_err(), "croner accepts {bad:?}");
        }
        // croner trims; the schema, stricter, refuses surrounding spaces.
        assert!(!re.is_match(" 0 0 * * *") && !re.is_match("0 0 * * *\n"));
    }

    #[test]
    fn names_must_be_dns_1035_labels() {
        for ok in ["a", "summarizer", "agent-1", &"a".repeat(63)] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        let schema = regex::Regex::new(NAME_PATTERN).unwrap();
        for bad in [
            "",
            "1abc",
            "a.b",
            "A",
            "-a",
            "a-",
            "a_b",
            "ä",
            &"a".repeat(64),
        ] {
            let err = validate_name(bad).unwrap_err();
            assert_eq!(err.field, "metadata.name");
            assert!(err.message.contains("metadata.name"), "{}", err.message);
            assert!(
                !schema.is_match(bad) || bad.len() > NAME_MAX_LEN,
                "the CRD rule accepts {bad:?}"
            );
        }
    }

    #[test]
    fn env_may_not_read_another_agents_identity() {
        let with_ref = |secret: &str| {
            spec(serde_json::json!({"template": {"image": "img:1", "env": [
                {"name": "A", "value": "b"},
                {"name": "T", "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}}}
            ]}}))
        };
        assert_eq!(validate_env_refs("me", &with_ref("me-identity")), Ok(()));
        assert_eq!(validate_env_refs("me", &with_ref("db-password")), Ok(()));
        assert_eq!(
            validate_env_refs("me", &spec(serde_json::json!({}))),
            Ok(())
        );
        for other in [
            "you-identity",
            "-identity",
            "me-identity-identity",
            "mee-identity",
        ] {
            let err = validate_env_refs("me", &with_ref(other)).unwrap_err();
            assert_eq!(err.field, "spec.template.env");
            assert!(
                err.message
                    .starts_with("spec.template.env[1].valueFrom.secretKeyRef.name")
                    && err
                        .message
                        .contains("may not read another Agent's identity"),
                "{}",
                err.message
            );
        }
    }

    #[test]
    fn template_lengths_are_bounded() {
        let long = |n: usize| "x".repeat(n);
        let ok = spec(serde_json::json!({"template": {"image": "i",
            "command": [long(MAX_ARG_LEN)], "args": [long(MAX_ARG_LEN)],
            "env": [{"name": long(MAX_ENV_NAME_LEN), "value": "é".repeat(MAX_ENV_VALUE_LEN)}]}}));
        assert!(ok.validate().is_ok());
        let cases = [
            (
                serde_json::json!({"command": [long(MAX_ARG_LEN + 1)]}),
                "spec.template.command",
            ),
            (
                serde_json::json!({"args": ["a", long(MAX_ARG_LEN + 1)]}),
                "spec.template.args",
            ),
            (
                serde_json::json!({"env": [{"name": long(MAX_ENV_NAME_LEN + 1)}]}),
                "spec.template.env",
            ),
            (
                serde_json::json!({"env": [{"name": "A", "value": long(MAX_ENV_VALUE_LEN + 1)}]}),
                "spec.template.env",
            ),
            (
                serde_json::json!({"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": long(254), "key": "k"}}}]}),
                "spec.template.env",
            ),
        ];
        for (template, field) in cases {
            let mut t = template.clone();
            t["image"] = "i".into();
            let err = spec(serde_json::json!({ "template": t }))
                .validate()
                .unwrap_err();
            assert_eq!(err.field, field, "{template}");
        }
    }

    #[test]
    fn the_schema_bounds_env_strings() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(Agent::crd()).unwrap();
        let env = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            ["template"]["properties"]["env"];
        assert_eq!(env["maxItems"], 128);
        let item = &env["items"]["properties"];
        assert_eq!(item["name"]["maxLength"], MAX_ENV_NAME_LEN);
        assert_eq!(item["value"]["maxLength"], MAX_ENV_VALUE_LEN);
        assert_eq!(
            item["valueFrom"]["properties"]["secretKeyRef"]["properties"]["name"]["maxLength"],
            MAX_REF_LEN
        );
    }

    #[test]
    fn scope_is_sorted_and_deduplicated() {
        let s = spec(
            serde_json::json!({"permissions": ["memory:read", "backup:write", "memory:read"]}),
        );
        assert_eq!(s.scope(), "backup:write memory:read");
    }
}
