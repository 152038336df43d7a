//! The backup routes. The agent's sidecar asks what to do (`GET .../work`), streams a backup in
//! (`PUT .../backups/{id}`, scope `backup:write`), fetches a verified archive to restore
//! (`GET .../backups/{id}`, scope `backup:read`) and reports the restore
//! (`POST .../restores/{name}`). Agents never hold S3 credentials: the controller writes both
//! stores.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{self, PeerCertificate};
use super::error::ApiError;
use super::state::ApiState;
use crate::backup::catalog::BackupVersion;
use crate::backup::engine::{Engine, Ingested};
use crate::backup::location::{self, Stores};
use crate::crd::{
    AgentBackup, AgentBackupStatus, AgentRestore, BackupLocation, BackupObject, BackupPhase,
    RestorePhase,
};

/// A backup body that sends nothing for this long is cut off.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The whole of a backup or restore transfer.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// The BLAKE3 of an archive served for restore.
pub const BLAKE3_HEADER: &str = "x-agentry-blake3";
/// Which copy (`primary`/`secondary`) an archive was served from.
pub const SOURCE_HEADER: &str = "x-agentry-source";

/// What the backup routes need beyond the API state.
pub struct BackupService {
    pub engine: Engine,
    pub client: Client,
    /// The controller's namespace (credentials Secrets).
    pub namespace: String,
    pub backups: Store<AgentBackup>,
    pub restores: Store<AgentRestore>,
    pub locations: Store<BackupLocation>,
    /// Transfers (uploads and restores) at once: each holds up to two 8 MiB parts.
    pub transfers: Arc<tokio::sync::Semaphore>,
    /// Built stores per location, with the location's resourceVersion and when they were built.
    stores: std::sync::Mutex<HashMap<String, CachedStores>>,
}

type CachedStores = (Option<String>, std::time::Instant, Arc<Stores>);

/// Transfers the controller runs at once (more get 503 and retry).
pub const MAX_TRANSFERS: usize = 8;
/// Built stores are rebuilt (credentials re-read) at least this often.
const STORES_TTL: Duration = Duration::from_secs(60);

impl BackupService {
    pub fn new(
        engine: Engine,
        client: Client,
        namespace: String,
        caches: crate::controller::backups::Caches,
    ) -> Self {
        Self {
            engine,
            client,
            namespace,
            backups: caches.backups,
            restores: caches.restores,
            locations: caches.locations,
            transfers: Arc::new(tokio::sync::Semaphore::new(MAX_TRANSFERS)),
            stores: Default::default(),
        }
    }

    /// A transfer slot, or 503 when all are taken.
    pub fn transfer_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.transfers.clone().try_acquire_owned().map_err(|_| {
            ApiError::unavailable(format!(
                "{MAX_TRANSFERS} backup transfers are under way; try again shortly"
            ))
        })
    }

    /// The stores of an Available location, built at most every minute (or when it changes).
    pub async fn cached_stores(&self, location: &BackupLocation) -> Result<Arc<Stores>, String> {
        let name = location.name_any();
        let version = location.metadata.resource_version.clone();
        if let Some((v, at, stores)) = self
            .stores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
            && *v == version
            && at.elapsed() < STORES_TTL
        {
            return Ok(stores.clone());
        }
        let built = Arc::new(
            location::stores(&self.client, &self.namespace, location)
                .await
                .map_err(|e| e.to_string())?,
        );
        self.stores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, (version, std::time::Instant::now(), built.clone()));
        Ok(built)
    }

    /// The stores of the BackupLocation `location_name`, if it is Available.
    pub async fn stores_for(&self, location_name: &str) -> Result<Arc<Stores>, ApiError> {
        let location = self
            .locations
            .get(&ObjectRef::new(location_name))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    Some("spec.backup.location"),
                    format!("BackupLocation {location_name} does not exist; create it or fix spec.backup.location"),
                )
            })?;
        if !location::is_available(&location) {
            return Err(ApiError::unavailable(format!(
                "BackupLocation {location_name} is not Available (see `kubectl get backuplocation {location_name} -o yaml`); try again later"
            )));
        }
        self.cached_stores(&location)
            .await
            .map_err(|e| ApiError::unavailable(format!("BackupLocation {location_name}: {e}")))
    }

    /// Merges `status` into an AgentBackup's status.
    pub async fn set_backup_status(
        &self,
        namespace: &str,
        name: &str,
        status: serde_json::Value,
    ) -> Result<(), kube::Error> {
        self.merge_status::<AgentBackup>(namespace, name, None, status)
            .await
    }

    /// Merges `status` into an AgentBackup's status only if it is still at `resource_version`
    /// (409 otherwise).
    pub async fn set_backup_status_at(
        &self,
        namespace: &str,
        name: &str,
        resource_version: Option<&str>,
        status: serde_json::Value,
    ) -> Result<(), kube::Error> {
        self.merge_status::<AgentBackup>(namespace, name, resource_version, status)
            .await
    }

    /// Merges `status` into an AgentRestore's status.
    pub async fn set_restore_status(
        &self,
        namespace: &str,
        name: &str,
        status: serde_json::Value,
    ) -> Result<(), kube::Error> {
        self.merge_status::<AgentRestore>(namespace, name, None, status)
            .await
    }

    async fn merge_status<K>(
        &self,
        namespace: &str,
        name: &str,
        resource_version: Option<&str>,
        status: serde_json::Value,
    ) -> Result<(), kube::Error>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        Api::<K>::namespaced(self.client.clone(), namespace)
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(match resource_version {
                    Some(v) => {
                        serde_json::json!({"metadata": {"resourceVersion": v}, "status": status})
                    }
                    None => serde_json::json!({ "status": status }),
                }),
            )
            .await
            .map(|_| ())
    }
}

/// What the sidecar is asked to do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Work {
    /// AgentBackups waiting for data (needs `backup:write`): PUT each to
    /// `/v1/agents/{ns}/{name}/backups/{id}`.
    pub backups: Vec<String>,
    /// Paths to pack (`spec.backup.paths`).
    pub paths: Vec<String>,
    /// Restores ready to apply (needs `backup:read`).
    pub restores: Vec<RestoreWork>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RestoreWork {
    /// The AgentRestore.
    pub name: String,
    /// The AgentBackup to fetch from `/v1/agents/{ns}/{name}/backups/{backup}`.
    pub backup: String,
    /// The BLAKE3 the archive must have: check it before writing anything.
    pub blake3: String,
    pub size: u64,
}

/// The answer to a backup upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackupResult {
    pub id: String,
    /// `Completed` or `PartiallyFailed`.
    pub phase: String,
    pub blake3: String,
    pub size: u64,
    pub locations: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The sidecar's report of a restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreReport {
    /// Whether the archive was verified and written.
    pub ok: bool,
    /// Files written.
    #[serde(default)]
    pub files: u64,
    /// What went wrong (at most 1 KiB kept).
    #[serde(default)]
    pub error: Option<String>,
    /// The copy the archive came from (`x-agentry-source`): `primary` or `secondary`.
    #[serde(default)]
    pub source: Option<String>,
}

fn service(state: &ApiState) -> Result<&Arc<BackupService>, ApiError> {
    state
        .backups
        .as_ref()
        .ok_or_else(|| ApiError::unavailable("backups are not enabled on this controller"))
}

/// The caller must be the agent of the path, with `scope`.
async fn own_agent(
    state: &ApiState,
    peer: &PeerCertificate,
    headers: &HeaderMap,
    namespace: &str,
    name: &str,
    scope: &str,
) -> Result<auth::Caller, ApiError> {
    let caller = auth::caller(state, peer, headers, Some(scope)).await?;
    if namespace != caller.cert.namespace() || name != caller.cert.name() {
        return Err(ApiError::forbidden(
            "path",
            format!(
                "an agent backs up and restores only itself ({})",
                caller.cert.id()
            ),
        ));
    }
    Ok(caller)
}

fn check_name(field: &str, value: &str) -> Result<(), ApiError> {
    if crate::crd::units::is_object_name(value) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            Some(field),
            format!(
                "{value:?} is not a Kubernetes object name (lowercase letters, digits, '-', '.')"
            ),
        ))
    }
}

#[utoipa::path(
    get, path = "/v1/agents/{namespace}/{name}/work", tag = "backups",
    params(("namespace" = String, Path), ("name" = String, Path)),
    responses(
        (status = 200, body = Work, description = "Backups waiting for data and restores ready to apply"),
        (status = 401, body = super::error::ErrorBody), (status = 403, body = super::error::ErrorBody),
    ),
    security(("mtls" = [], "bearer" = []))
)]
pub async fn work(
    State(state): State<Arc<ApiState>>,
    Extension(peer): Extension<PeerCertificate>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Work>, ApiError> {
    let caller = auth::caller(&state, &peer, &headers, None).await?;
    if namespace != caller.cert.namespace() || name != caller.cert.name() {
        return Err(ApiError::forbidden(
            "path",
            format!("an agent asks only for its own work ({})", caller.cert.id()),
        ));
    }
    let svc = service(&state)?;
    let allowed = |scope: &str| {
        caller.claims.has_scope(scope) && auth::currently_allowed(&state, &caller.cert, scope)
    };
    let (write, read) = (allowed("backup:write"), allowed("backup:read"));
    if !write && !read {
        return Err(ApiError::forbidden(
            "scope",
            "the token has neither backup:write nor backup:read; add one to spec.permissions",
        ));
    }
    let mut out = Work::default();
    if let Some(spec) = &caller.cert.agent.spec.backup {
        out.paths = spec.paths.clone();
    }
    if write && caller.cert.agent.spec.backup.is_some() {
        let mut pending: Vec<_> = svc
            .backups
            .state()
            .into_iter()
            .filter(|b| {
                b.namespace().as_deref() == Some(&namespace)
                    && b.spec.agent == name
                    && b.status
                        .as_ref()
                        .and_then(|s| s.phase)
                        .is_none_or(|p| p == BackupPhase::New)
            })
            .map(|b| b.name_any())
            .collect();
        pending.sort();
        out.backups = pending;
    }
    if read {
        let mut ready: Vec<_> = svc
            .restores
            .state()
            .into_iter()
            .filter(|r| r.namespace().as_deref() == Some(&namespace) && r.spec.agent == name)
            .filter_map(|r| {
                let s = r.status.as_ref()?;
                if s.phase != Some(RestorePhase::Ready) {
                    return None;
                }
                let backup = s.backup.clone()?;
                // The status is writable by the tenant: only this agent's backups.
                let version = catalogued(&state, svc, &namespace, &name, &backup).ok()?;
                Some(RestoreWork {
                    name: r.name_any(),
                    backup,
                    blake3: version.blake3,
                    size: version.size,
                })
            })
            .collect();
        ready.sort_by(|a, b| a.name.cmp(&b.name));
        out.restores = ready;
    }
    Ok(Json(out))
}

#[utoipa::path(
    put, path = "/v1/agents/{namespace}/{name}/backups/{id}", tag = "backups",
    params(("namespace" = String, Path), ("name" = String, Path), ("id" = String, Path, description = "The AgentBackup (phase New)")),
    request_body(content = Vec<u8>, content_type = "application/zstd", description = "A tar (zstd) of spec.backup.paths, streamed"),
    responses(
        (status = 200, body = BackupResult, description = "Stored and verified (Completed), or in the primary only (PartiallyFailed)"),
        (status = 400, body = super::error::ErrorBody), (status = 401, body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody),
        (status = 409, body = super::error::ErrorBody, description = "The AgentBackup is not New, or is being written"),
        (status = 415, body = super::error::ErrorBody),
        (status = 502, body = super::error::ErrorBody, description = "The primary store failed; nothing was kept"),
        (status = 503, body = super::error::ErrorBody, description = "The BackupLocation is unavailable"),
    ),
    security(("mtls" = [], "bearer" = []))
)]
pub async fn put_backup(
    State(state): State<Arc<ApiState>>,
    Extension(peer): Extension<PeerCertificate>,
    Path((namespace, name, id)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<BackupResult>, ApiError> {
    let caller = own_agent(&state, &peer, &headers, &namespace, &name, "backup:write").await?;
    check_name("id", &id)?;
    check_archive_type(&headers)?;
    let svc = service(&state)?;
    let Some(spec) = caller.cert.agent.spec.backup.clone() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            Some("spec.backup"),
            "the Agent has no spec.backup; add one to back it up",
        ));
    };
    let backup = upload_target(svc, &namespace, &name, &id).await?;
    let permit = svc.transfer_slot()?;
    let conflict = |e: crate::backup::engine::EngineError| {
        ApiError::new(StatusCode::CONFLICT, "conflict", Some("id"), e.to_string())
    };
    let claim = svc
        .engine
        .claim(&format!("{namespace}/{id}"))
        .map_err(conflict)?;
    // One upload per agent at a time.
    let agent_claim = svc
        .engine
        .claim(&format!("agent:{namespace}/{name}"))
        .map_err(conflict)?;
    let stores = svc.stores_for(&spec.location).await?;
    mark_in_progress(svc, &backup, &spec.location).await?;
    let namespace_uid = state.namespace_uid(&namespace);
    let reader = body_reader(body);
    let svc = svc.clone();
    // The transfer runs in its own task: a client that goes away (or a timeout) drops this
    // request, not the upload's cleanup and status.
    let task = tokio::spawn(async move {
        let _held = (permit, claim, agent_claim);
        let outcome = svc
            .engine
            .ingest(&stores, &namespace, namespace_uid, &name, &id, reader)
            .await;
        record_outcome(&svc, &namespace, &id, outcome).await
    });
    task.await.map_err(ApiError::internal)?.map(Json)
}

/// The body must be the archive.
fn check_archive_type(headers: &HeaderMap) -> Result<(), ApiError> {
    match super::body::content_type(headers) {
        Some("application/zstd" | "application/octet-stream") => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            Some("content-type"),
            "send the archive as application/zstd",
        )),
    }
}

/// The AgentBackup an upload fills: it exists, is this agent's, is New and is not catalogued.
/// Read live, not from the cache: two uploads must not both see New.
async fn upload_target(
    svc: &BackupService,
    namespace: &str,
    name: &str,
    id: &str,
) -> Result<AgentBackup, ApiError> {
    let api: Api<AgentBackup> = Api::namespaced(svc.client.clone(), namespace);
    let backup = api
        .get_opt(id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "AgentBackup {namespace}/{id} does not exist; create one (or let spec.backup.schedule) first"
            ))
        })?;
    if backup.spec.agent != name {
        return Err(ApiError::forbidden(
            "id",
            format!("AgentBackup {id} is for Agent {}", backup.spec.agent),
        ));
    }
    let phase = backup.status.as_ref().and_then(|s| s.phase);
    if phase.is_some_and(|p| p != BackupPhase::New) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            Some("id"),
            format!(
                "AgentBackup {id} is {}; only a New one takes data",
                phase.map(|p| p.to_string()).unwrap_or_default()
            ),
        ));
    }
    let catalogued = svc
        .engine
        .catalog
        .get(&format!("{namespace}/{id}"))
        .map_err(ApiError::internal)?;
    if catalogued.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            Some("id"),
            format!("backup {id} is already catalogued; create a new AgentBackup"),
        ));
    }
    Ok(backup)
}

/// InProgress, only if nothing wrote the AgentBackup since it was read (a second upload, the
/// manager).
async fn mark_in_progress(
    svc: &BackupService,
    backup: &AgentBackup,
    location: &str,
) -> Result<(), ApiError> {
    let (namespace, id) = (backup.namespace().unwrap_or_default(), backup.name_any());
    svc.set_backup_status_at(
        &namespace,
        &id,
        backup.metadata.resource_version.as_deref(),
        serde_json::json!({
            "phase": BackupPhase::InProgress,
            "startedAt": now(),
            "location": location,
            "observedGeneration": backup.metadata.generation,
        }),
    )
    .await
    .map_err(|e| match e {
        kube::Error::Api(ref r) if r.code == 409 => ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            Some("id"),
            format!("AgentBackup {id} changed while the upload started; ask for work again"),
        ),
        e => ApiError::internal(e),
    })
}

/// Writes what became of an upload to its AgentBackup; the API's answer.
async fn record_outcome(
    svc: &BackupService,
    namespace: &str,
    id: &str,
    outcome: Result<Ingested, crate::backup::engine::EngineError>,
) -> Result<BackupResult, ApiError> {
    match outcome {
        Ok(Ingested::Completed(version)) => {
            let status = completed_status(&version, BackupPhase::Completed, None);
            svc.set_backup_status(namespace, id, status)
                .await
                .map_err(ApiError::internal)?;
            Ok(result(id, &version, "Completed", None))
        }
        Ok(Ingested::PartiallyFailed { backup, error }) => {
            tracing::warn!(backup = %format!("{namespace}/{id}"), %error, "secondary store failed; retrying in the background");
            let status = completed_status(&backup, BackupPhase::PartiallyFailed, Some(&error));
            svc.set_backup_status(namespace, id, status)
                .await
                .map_err(ApiError::internal)?;
            Ok(result(id, &backup, "PartiallyFailed", Some(error)))
        }
        Err(e) => {
            let message = e.to_string();
            tracing::warn!(backup = %format!("{namespace}/{id}"), error = %message, "backup failed; nothing was kept");
            let _ = svc
                .set_backup_status(
                    namespace,
                    id,
                    serde_json::json!({
                        "phase": BackupPhase::Failed,
                        "completedAt": now(),
                        "error": message,
                    }),
                )
                .await;
            let status = match e {
                crate::backup::engine::EngineError::Stream(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::BAD_GATEWAY,
            };
            Err(ApiError::new(status, "backup_failed", None, message))
        }
    }
}

/// The status of a backup whose primary copy is verified.
pub fn completed_status(
    version: &BackupVersion,
    phase: BackupPhase,
    error: Option<&str>,
) -> serde_json::Value {
    let objects: Vec<BackupObject> = version.objects.iter().map(BackupObject::from).collect();
    let status = AgentBackupStatus {
        phase: Some(phase),
        completed_at: (phase == BackupPhase::Completed).then(now),
        size: i64::try_from(version.size).ok(),
        blake3: Some(version.blake3.clone()),
        objects,
        error: error.map(str::to_string),
        ..Default::default()
    };
    let mut value = serde_json::to_value(status).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        // A merge patch: an absent error must clear an old one.
        map.entry("error").or_insert(serde_json::Value::Null);
        map.remove("conditions");
    }
    value
}

fn result(id: &str, v: &BackupVersion, phase: &str, error: Option<String>) -> BackupResult {
    BackupResult {
        id: id.to_string(),
        phase: phase.into(),
        blake3: v.blake3.clone(),
        size: v.size,
        locations: v.objects.iter().map(|o| o.location.clone()).collect(),
        error,
    }
}

fn now() -> String {
    super::rfc3339(jiff::Timestamp::now().as_second())
}

/// The request body as a reader that fails when the client stops sending for [`IDLE_TIMEOUT`].
fn body_reader(body: Body) -> impl tokio::io::AsyncRead + Unpin + Send {
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let idle = tokio_stream_timeout(stream);
    tokio_util::io::StreamReader::new(idle)
}

fn tokio_stream_timeout<S>(
    stream: S,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + Unpin
where
    S: futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + Unpin + 'static,
{
    Box::pin(futures::stream::unfold(stream, |mut s| async move {
        use futures::StreamExt;
        match tokio::time::timeout(IDLE_TIMEOUT, s.next()).await {
            Ok(Some(item)) => Some((item, s)),
            Ok(None) => None,
            Err(_) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the client sent nothing for {}s", IDLE_TIMEOUT.as_secs()),
                )),
                s,
            )),
        }
    }))
}

#[utoipa::path(
    get, path = "/v1/agents/{namespace}/{name}/backups/{id}", tag = "backups",
    params(("namespace" = String, Path), ("name" = String, Path), ("id" = String, Path)),
    responses(
        (status = 200, content_type = "application/zstd", description = "The archive, from a copy whose BLAKE3 was just verified (header x-agentry-blake3)"),
        (status = 401, body = super::error::ErrorBody), (status = 403, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody),
        (status = 502, body = super::error::ErrorBody, description = "No stored copy passed verification"),
    ),
    security(("mtls" = [], "bearer" = []))
)]
pub async fn get_backup(
    State(state): State<Arc<ApiState>>,
    Extension(peer): Extension<PeerCertificate>,
    Path((namespace, name, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    own_agent(&state, &peer, &headers, &namespace, &name, "backup:read").await?;
    check_name("id", &id)?;
    let svc = service(&state)?;
    let version = catalogued(&state, svc, &namespace, &name, &id)?;
    let permit = svc.transfer_slot()?;
    // The copies are where the backup was written, whatever the Agent says now.
    let stores = svc.stores_for(&version.location).await?;
    let (source, problems, reader) =
        svc.engine
            .open_verified(&stores, &version)
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "backup_unreadable",
                    None,
                    e.to_string(),
                )
            })?;
    if !problems.is_empty() {
        tracing::warn!(backup = %version.id, %source, problems = %problems.join("; "), "serving a restore from the copy that verified");
    }
    // The transfer slot is held until the body is sent (or the client goes).
    let body = futures::StreamExt::map(tokio_util::io::ReaderStream::new(reader), move |chunk| {
        let _held = &permit;
        chunk
    });
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/zstd"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(version.size));
    if let Ok(v) = HeaderValue::from_str(&version.blake3) {
        headers.insert(BLAKE3_HEADER, v);
    }
    headers.insert(SOURCE_HEADER, HeaderValue::from_static(source));
    Ok(response)
}

/// Whether `version` was made in the namespace whose uid is `uid` (backups from before the uid
/// was recorded match any).
pub fn same_namespace(version: &BackupVersion, uid: Option<&str>) -> bool {
    match (&version.namespace_uid, uid) {
        (None, _) => true,
        (Some(made), Some(now)) => made == now,
        (Some(_), None) => false,
    }
}

/// The catalogued backup `id` of agent `namespace/name`, made in this very namespace (not in
/// an earlier namespace of the same name).
pub fn catalogued(
    state: &ApiState,
    svc: &BackupService,
    namespace: &str,
    name: &str,
    id: &str,
) -> Result<BackupVersion, ApiError> {
    let version = svc
        .engine
        .catalog
        .get(&format!("{namespace}/{id}"))
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            ApiError::not_found(format!("backup {namespace}/{id} is not in the catalog"))
        })?;
    if version.agent_id != format!("{namespace}/{name}") {
        return Err(ApiError::forbidden(
            "id",
            format!("backup {id} belongs to another agent"),
        ));
    }
    if !same_namespace(&version, state.namespace_uid(namespace).as_deref()) {
        return Err(ApiError::forbidden(
            "id",
            format!(
                "backup {id} was made in an earlier namespace named {namespace} (deleted since); it is never restored into another namespace"
            ),
        ));
    }
    Ok(version)
}

#[utoipa::path(
    post, path = "/v1/agents/{namespace}/{name}/restores/{restore}", tag = "backups",
    params(("namespace" = String, Path), ("name" = String, Path), ("restore" = String, Path)),
    request_body = RestoreReport,
    responses(
        (status = 204, description = "Recorded"),
        (status = 400, body = super::error::ErrorBody), (status = 401, body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody),
        (status = 409, body = super::error::ErrorBody, description = "The AgentRestore is not Ready"),
    ),
    security(("mtls" = [], "bearer" = []))
)]
pub async fn report_restore(
    State(state): State<Arc<ApiState>>,
    Extension(peer): Extension<PeerCertificate>,
    Path((namespace, name, restore)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    own_agent(&state, &peer, &headers, &namespace, &name, "backup:read").await?;
    check_name("restore", &restore)?;
    let bytes = super::body::read_limited(body).await?;
    let report: RestoreReport =
        super::body::parse_json(super::body::content_type(&headers), &bytes)?;
    let svc = service(&state)?;
    let api: Api<AgentRestore> = Api::namespaced(svc.client.clone(), &namespace);
    let current = api
        .get_opt(&restore)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| {
            ApiError::not_found(format!("AgentRestore {namespace}/{restore} does not exist"))
        })?;
    if current.spec.agent != name {
        return Err(ApiError::forbidden(
            "restore",
            format!("AgentRestore {restore} is for Agent {}", current.spec.agent),
        ));
    }
    let status = current.status.unwrap_or_default();
    if status.phase != Some(RestorePhase::Ready) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            Some("restore"),
            format!("AgentRestore {restore} is not Ready"),
        ));
    }
    let at = now();
    let patch = if report.ok {
        // Only a backup of this agent, made in this namespace (the status is tenant-writable).
        if let Some(backup) = &status.backup
            && catalogued(&state, svc, &namespace, &name, backup).is_ok()
        {
            svc.engine
                .catalog
                .mark_restored(&format!("{namespace}/{backup}"), &at)
                .map_err(ApiError::internal)?;
        }
        serde_json::json!({"phase": RestorePhase::Completed, "completedAt": at,
        "files": i64::try_from(report.files).unwrap_or(i64::MAX),
            "source": report.source.as_deref().filter(|s| matches!(*s, "primary" | "secondary")),
            "message": format!(
                "restored {} files from the {} copy, verified by BLAKE3 before writing",
                report.files,
                report.source.as_deref().filter(|s| matches!(*s, "primary" | "secondary")).unwrap_or("stored")
            )})
    } else {
        let mut error = report
            .error
            .unwrap_or_else(|| "the sidecar reported a failure".into());
        error.truncate(error.floor_char_boundary(1024));
        serde_json::json!({"phase": RestorePhase::Failed, "completedAt": at, "message": error})
    };
    svc.set_restore_status(&namespace, &restore, patch)
        .await
        .map_err(ApiError::internal)?;
    Ok(StatusCode::NO_CONTENT)
}
