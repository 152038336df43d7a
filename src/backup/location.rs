//! A BackupLocation's two stores: built from its spec and the credentials Secrets in the
//! controller's namespace, and validated (bucket reachable, credentials valid, versioning).

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};

use super::store::{ChecksumMode, S3Store, StoreConfig, WriteOptions};
use crate::crd::{BackupLocation, BackupLocationStatus, ChecksumModeSpec, StoreSpec, StoreStatus};

/// The Secret keys holding a store's credentials.
pub const ACCESS_KEY_ID: &str = "accessKeyId";
pub const SECRET_ACCESS_KEY: &str = "secretAccessKey";

/// The two stores of one BackupLocation.
pub struct Stores {
    /// The BackupLocation's name.
    pub location: String,
    pub primary: S3Store,
    pub secondary: S3Store,
    /// Object lock days of each store (None: no lock).
    pub primary_lock_days: Option<u32>,
    pub secondary_lock_days: Option<u32>,
}

impl Stores {
    /// The store called `primary` or `secondary`.
    pub fn by_name(&self, location: &str) -> Option<&S3Store> {
        match location {
            "primary" => Some(&self.primary),
            "secondary" => Some(&self.secondary),
            _ => None,
        }
    }
}

/// Why a location's stores cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct LocationError {
    pub field: String,
    pub message: String,
}

/// Reads the credentials named by `spec` (in `namespace`) and builds the store config.
pub async fn store_config(
    client: &Client,
    namespace: &str,
    field: &str,
    spec: &StoreSpec,
) -> Result<StoreConfig, LocationError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let name = &spec.credentials.name;
    let err = |message: String| LocationError {
        field: format!("{field}.credentials.name"),
        message,
    };
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(|e| err(format!("reading Secret {namespace}/{name}: {e}")))?
        .ok_or_else(|| {
            err(format!(
                "Secret {namespace}/{name} does not exist; create it with keys {ACCESS_KEY_ID} and {SECRET_ACCESS_KEY}"
            ))
        })?;
    let value = |key: &str| -> Result<String, LocationError> {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| err(format!("Secret {namespace}/{name} has no {key}")))
    };
    Ok(StoreConfig {
        endpoint: spec.endpoint.clone(),
        region: spec.region.clone(),
        bucket: spec.bucket.clone(),
        prefix: spec.prefix.clone(),
        access_key: value(ACCESS_KEY_ID)?,
        secret_key: value(SECRET_ACCESS_KEY)?,
        force_path_style: spec.force_path_style,
        checksum_mode: match spec.checksum_mode {
            ChecksumModeSpec::WhenSupported => ChecksumMode::WhenSupported,
            ChecksumModeSpec::WhenRequired => ChecksumMode::WhenRequired,
        },
        options: WriteOptions {
            storage_class: Some(spec.storage_class.clone()),
            object_lock_days: spec
                .object_lock_days
                .and_then(|d| u32::try_from(d).ok())
                .filter(|d| *d > 0),
            sse: spec
                .server_side_encryption
                .as_ref()
                .map(|s| (s.algorithm.clone(), s.kms_key_id.clone())),
        },
    })
}

/// Builds both stores of `location`.
pub async fn stores(
    client: &Client,
    namespace: &str,
    location: &BackupLocation,
) -> Result<Stores, LocationError> {
    let primary = store_config(client, namespace, "spec.primary", &location.spec.primary).await?;
    let secondary = store_config(
        client,
        namespace,
        "spec.secondary",
        &location.spec.secondary,
    )
    .await?;
    Ok(Stores {
        location: location.name_any(),
        primary_lock_days: primary.options.object_lock_days,
        secondary_lock_days: secondary.options.object_lock_days,
        primary: S3Store::new(&primary),
        secondary: S3Store::new(&secondary),
    })
}

/// Checks one store: reachable, credentials accepted, versioning state.
pub async fn check_store(store: &S3Store) -> StoreStatus {
    match store.validate().await {
        Ok(versioning) => StoreStatus {
            available: true,
            message: String::new(),
            versioning: Some(versioning),
        },
        Err(e) => StoreStatus {
            available: false,
            message: format!("{e}; check the endpoint, bucket and credentials"),
            versioning: None,
        },
    }
}

/// Validates both stores of a location: its new status (phase, per-store details, the
/// Available condition).
pub async fn validate(
    client: &Client,
    namespace: &str,
    location: &BackupLocation,
) -> BackupLocationStatus {
    let now = jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap_or(jiff::Timestamp::now());
    let (primary, secondary) = match stores(client, namespace, location).await {
        Ok(s) => tokio::join!(check_store(&s.primary), check_store(&s.secondary)),
        Err(e) => {
            let failed = StoreStatus {
                available: false,
                message: e.to_string(),
                versioning: None,
            };
            let (p, s) = if e.field.starts_with("spec.primary") {
                (failed, StoreStatus::default())
            } else {
                (StoreStatus::default(), failed)
            };
            (p, s)
        }
    };
    let available = primary.available && secondary.available;
    let message = if available {
        "both stores are reachable and accept the credentials".to_string()
    } else {
        [("primary", &primary), ("secondary", &secondary)]
            .iter()
            .filter(|(_, s)| !s.available)
            .map(|(n, s)| {
                if s.message.is_empty() {
                    format!("{n}: not checked")
                } else {
                    format!("{n}: {}", s.message)
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mut conditions = location
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    crate::controller::conditions::upsert(
        &mut conditions,
        "Available",
        available,
        if available {
            "Validated"
        } else {
            "Unavailable"
        },
        message,
        location.metadata.generation,
    );
    BackupLocationStatus {
        phase: Some(
            if available {
                "Available"
            } else {
                "Unavailable"
            }
            .into(),
        ),
        observed_generation: location.metadata.generation,
        last_validation_time: Some(now.to_string()),
        primary: Some(primary),
        secondary: Some(secondary),
        conditions,
    }
}

/// Whether a location's last validation found both stores available.
pub fn is_available(location: &BackupLocation) -> bool {
    location
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Available")
}
