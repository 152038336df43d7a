//! Every name Agentry writes onto Kubernetes objects, in one place: the field manager, the
//! finalizer, labels, annotations, condition types and their reasons.

/// The field manager of every server-side apply, and the Event reporter name.
pub const MANAGER: &str = "agentry";
/// The ConfigMaps the leader publishes in its namespace: the trust bundle and CRL, the JWKS.
pub const CA_CONFIGMAP: &str = "agentry-ca";
pub const JWKS_CONFIGMAP: &str = "agentry-jwks";
/// Guards state kept outside Kubernetes (CA ledger, Redis users, S3 objects).
pub const FINALIZER: &str = "agentry.dev/cleanup";

/// On everything Agentry creates; its watches select on it.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "agentry");
/// The Agent's name, on the Agent (discovery) and all its children.
pub const AGENT_LABEL: &str = "agentry.dev/agent";
/// `capability.agentry.dev/<capability>`: discovery by capability.
pub const CAPABILITY_PREFIX: &str = "capability.agentry.dev/";

/// On an Agent (value: an RFC 5280 reason such as `keyCompromise`): revoke its certificate;
/// a new one is issued and the annotation removed.
pub const REVOKE_ANNOTATION: &str = "agentry.dev/revoke";
/// On a Namespace: the permissions its Agents may request (see `identity::scopes`).
pub const ALLOWED_PERMISSIONS_ANNOTATION: &str = "agentry.dev/allowed-permissions";
/// On a Namespace: which namespaces' agents may discover its Agents and read their cards
/// (comma- or space-separated names, or `*`). Agents always discover their own namespace.
pub const DISCOVERABLE_FROM_ANNOTATION: &str = "agentry.dev/discoverable-from";
/// The field manager of the API's status writes (registration).
pub const API_MANAGER: &str = "agentry-api";
/// On the CA Secret: `agentry ca rotate` asks the leader to start a rotation.
pub const ROTATE_ANNOTATION: &str = "agentry.dev/rotate";
/// On the CA Secret: the rotation phase and since when (`prepared:<unix>`, `activated:<unix>`).
pub const PHASE_ANNOTATION: &str = "agentry.dev/rotation-phase";
/// On the signing-key Secret: when each key was created (JSON, kid -> unix seconds).
pub const KEY_CREATED_ANNOTATION: &str = "agentry.dev/key-created-at";

/// Condition types on an Agent.
pub mod conditions {
    pub const READY: &str = "Ready";
    /// kstatus: work is under way.
    pub const RECONCILING: &str = "Reconciling";
    /// kstatus: cannot progress until something changes.
    pub const STALLED: &str = "Stalled";
    pub const CERTIFICATE_ISSUED: &str = "CertificateIssued";
    pub const TOKEN_ISSUED: &str = "TokenIssued";
    pub const WORKLOAD_READY: &str = "WorkloadReady";
    pub const MESSAGING_READY: &str = "MessagingReady";
    pub const BACKUP_HEALTHY: &str = "BackupHealthy";
    /// Written by the API when the agent registers.
    pub const REGISTERED: &str = "Registered";
}

/// Condition reasons (and Event reasons) on an Agent.
pub mod reasons {
    pub const READY: &str = "Ready";
    pub const ISSUED: &str = "Issued";
    pub const ISSUE_FAILED: &str = "IssueFailed";
    pub const AVAILABLE: &str = "Available";
    pub const ROLLING_OUT: &str = "RollingOut";
    pub const APPLY_FAILED: &str = "ApplyFailed";
    pub const NAME_CONFLICT: &str = "NameConflict";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const PERMISSION_DENIED: &str = "PermissionDenied";
    pub const NOT_IMPLEMENTED: &str = "NotImplemented";
    pub const INBOX_READY: &str = "InboxReady";
    pub const REDIS_UNAVAILABLE: &str = "RedisUnavailable";
    pub const NOT_CONFIGURED: &str = "NotConfigured";
    pub const RECONCILE_FAILED: &str = "ReconcileFailed";
    pub const UNTRUSTED_IDENTITY: &str = "UntrustedIdentity";
    pub const REVOKED: &str = "Revoked";
    pub const DELETED: &str = "Deleted";
    pub const INVALID_OBJECT: &str = "InvalidObject";
    pub const CA_EXPIRED: &str = "CaExpired";
    /// The ledger lacks revocations the published CRL lists: nothing is issued (docs/ha.md).
    pub const LEDGER_BEHIND_CRL: &str = "LedgerBehindCRL";
    pub const CLAMPED: &str = "LifetimeClamped";
    pub const CA_DROPPED: &str = "CaDropped";
}
