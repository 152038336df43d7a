//! The backup resources: `BackupLocation` (cluster-scoped: where backups go, a primary and a
//! secondary S3-compatible store), `AgentBackup` (one run) and `AgentRestore` (one restore).
//! The controller writes their status; users create AgentBackups and AgentRestores by hand or
//! let `spec.backup.schedule` create AgentBackups.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where an Agent's backups are stored: a primary S3 store and a secondary (e.g. Backblaze B2's
/// S3 API). Every backup is written to both and verified in both.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentry.dev",
    version = "v1alpha1",
    kind = "BackupLocation",
    plural = "backuplocations",
    singular = "backuplocation",
    shortname = "bl",
    category = "agentry",
    status = "BackupLocationStatus",
    derive = "PartialEq",
    doc = "Where Agent backups are stored: a primary and a secondary S3-compatible store.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Primary",
        type_ = "string",
        json_path = ".spec.primary.endpoint"
    ),
    printcolumn(
        name = "Secondary",
        type_ = "string",
        json_path = ".spec.secondary.endpoint"
    ),
    printcolumn(
        name = "Validated",
        type_ = "date",
        json_path = ".status.lastValidationTime"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct BackupLocationSpec {
    /// The store every backup is written to first (e.g. AWS S3 Standard).
    pub primary: StoreSpec,
    /// The second copy (e.g. Backblaze B2's S3-compatible API).
    pub secondary: StoreSpec,
}

/// One S3-compatible store.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StoreSpec {
    /// `https://s3.us-east-1.amazonaws.com`, `https://s3.us-west-004.backblazeb2.com`, ...
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('https://') || self.startsWith('http://')")
        .message("endpoint must be an http:// or https:// URL"))]
    pub endpoint: String,
    #[serde(default = "default_region")]
    #[schemars(length(min = 1, max = 64))]
    pub region: String,
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// Prepended to every key, e.g. `agentry/`.
    #[serde(default)]
    #[schemars(length(max = 512))]
    #[x_kube(validation = kube::core::Rule::new("!self.startsWith('/') && !self.contains('..')")
        .message("prefix must not start with / or contain '..'"))]
    pub prefix: String,
    /// The S3 storage class of uploaded objects.
    #[serde(default = "default_storage_class")]
    #[schemars(length(min = 1, max = 64))]
    pub storage_class: String,
    /// A Secret in the controller's namespace holding `accessKeyId` and `secretAccessKey`.
    /// Agents never see these: they send backups to the controller.
    pub credentials: SecretKeyRef,
    /// Path-style addressing (`endpoint/bucket/key`); most S3-compatible servers need it.
    #[serde(default)]
    pub force_path_style: bool,
    /// `WhenSupported` (the SDK's default checksums) or `WhenRequired` (only where an operation
    /// needs one: Backblaze B2 refuses the SDK's default `x-amz-checksum-*` headers).
    #[serde(default)]
    pub checksum_mode: ChecksumModeSpec,
    /// Write objects in COMPLIANCE mode retained for this many days (the bucket must have object
    /// lock enabled); retention never deletes them earlier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 36500))]
    pub object_lock_days: Option<i32>,
    /// Server-side encryption: `AES256` or `aws:kms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_side_encryption: Option<ServerSideEncryption>,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_storage_class() -> String {
    "STANDARD".into()
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChecksumModeSpec {
    #[default]
    WhenSupported,
    WhenRequired,
}

/// Server-side encryption of stored objects.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServerSideEncryption {
    /// `AES256` or `aws:kms`.
    #[schemars(regex(pattern = r"^(AES256|aws:kms)$"))]
    pub algorithm: String,
    /// The KMS key for `aws:kms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub kms_key_id: Option<String>,
}

/// A key of a Secret in the controller's namespace.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name (in the controller's namespace).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupLocationStatus {
    /// `Available` or `Unavailable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// RFC 3339: when both stores were last checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_validation_time: Option<String>,
    /// Per store: reachable, credentials valid, versioning state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<StoreStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<StoreStatus>,
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StoreStatus {
    pub available: bool,
    /// What was wrong, naming the operation and the fix; empty when available.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// `Enabled`, `Suspended` or `Off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versioning: Option<String>,
}

/// One backup of an Agent's state: created by its schedule or by hand; the agent's sidecar
/// streams the data through the controller to both stores.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentry.dev",
    version = "v1alpha1",
    kind = "AgentBackup",
    plural = "agentbackups",
    singular = "agentbackup",
    shortname = "abk",
    category = "agentry",
    namespaced,
    status = "AgentBackupStatus",
    derive = "PartialEq",
    doc = "One backup run of an Agent's state.",
    printcolumn(name = "Agent", type_ = "string", json_path = ".spec.agent"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Size", type_ = "integer", json_path = ".status.size"),
    printcolumn(
        name = "BLAKE3",
        type_ = "string",
        json_path = ".status.blake3",
        priority = 1
    ),
    printcolumn(
        name = "Completed",
        type_ = "date",
        json_path = ".status.completedAt"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    validation = kube::core::Rule::new("self.spec == oldSelf.spec").message("spec is immutable; create a new AgentBackup")
)]
#[serde(rename_all = "camelCase")]
pub struct AgentBackupSpec {
    /// The Agent (in this namespace) to back up.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub agent: String,
}

/// Where a backup run is.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackupPhase {
    /// Waiting for the agent's sidecar to send the data.
    New,
    InProgress,
    /// In both stores, verified in both, catalogued.
    Completed,
    /// In the primary and verified; the copy to the secondary failed and is being retried.
    PartiallyFailed,
    Failed,
}

impl BackupPhase {
    pub fn is_final(self) -> bool {
        matches!(self, BackupPhase::Completed | BackupPhase::Failed)
    }
}

impl std::fmt::Display for BackupPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentBackupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BackupPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    /// Bytes (the compressed archive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    /// BLAKE3 of the archive, lowercase hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    /// The stored copies.
    #[serde(default)]
    pub objects: Vec<BackupObject>,
    /// Why it failed (or why the secondary copy is still missing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The BackupLocation it was written to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Copies to the secondary tried so far (PartiallyFailed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// One stored copy of a backup.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackupObject {
    /// `primary` or `secondary`.
    pub location: String,
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

impl From<&crate::backup::catalog::StoredObject> for BackupObject {
    fn from(o: &crate::backup::catalog::StoredObject) -> Self {
        Self {
            location: o.location.clone(),
            key: o.key.clone(),
            version_id: o.version_id.clone(),
            etag: o.etag.clone(),
        }
    }
}

impl From<&BackupObject> for crate::backup::catalog::StoredObject {
    fn from(o: &BackupObject) -> Self {
        Self {
            location: o.location.clone(),
            key: o.key.clone(),
            version_id: o.version_id.clone(),
            etag: o.etag.clone(),
        }
    }
}

/// Restores a backup into its Agent: the controller verifies the BLAKE3 of a stored copy (the
/// primary, else the secondary) and the sidecar verifies it again before writing a byte.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentry.dev",
    version = "v1alpha1",
    kind = "AgentRestore",
    plural = "agentrestores",
    singular = "agentrestore",
    shortname = "ars",
    category = "agentry",
    namespaced,
    status = "AgentRestoreStatus",
    derive = "PartialEq",
    doc = "Restores a backup (a named one, or the latest Completed) into its Agent.",
    printcolumn(name = "Agent", type_ = "string", json_path = ".spec.agent"),
    printcolumn(name = "Backup", type_ = "string", json_path = ".status.backup"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Source", type_ = "string", json_path = ".status.source"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    validation = kube::core::Rule::new("self.spec == oldSelf.spec").message("spec is immutable; create a new AgentRestore")
)]
#[serde(rename_all = "camelCase")]
pub struct AgentRestoreSpec {
    /// The Agent (in this namespace) to restore into.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub agent: String,
    /// The AgentBackup to restore; the Agent's latest Completed backup when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub backup: Option<String>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestorePhase {
    New,
    /// A verified copy was found; waiting for the agent's sidecar to fetch and apply it.
    Ready,
    Completed,
    Failed,
}

impl std::fmt::Display for RestorePhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentRestoreStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RestorePhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The AgentBackup being restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// BLAKE3 the restored archive must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    /// The copy that passed verification: `primary` or `secondary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// What was found on the way (a bad copy, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<i64>,
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
