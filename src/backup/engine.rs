//! The data path. A backup streams once through the controller: each 8 MiB part is hashed with
//! BLAKE3 and uploaded to the primary and the secondary at the same time (the next part is read
//! while the current one uploads), so memory stays at two parts whatever the size. Then both
//! copies are re-read and re-hashed; only when both match is a manifest written next to each
//! copy and the catalog row committed. A secondary that fails leaves a verified primary copy
//! (PartiallyFailed) that [`Engine::complete_secondary`] copies over later.
//!
//! Layout in each store, under its prefix: `<namespace>/<agent>/<backup>.tar.zst` (the archive;
//! metadata `agentry-agent`, `agentry-backup`) and `<namespace>/<agent>/<backup>.json` (the
//! manifest: agent, backup, BLAKE3, size, creation time and both copies; metadata
//! `agentry-agent`, `agentry-blake3`). S3 fixes an object's metadata when a multipart upload
//! starts, before the hash is known, so the BLAKE3 travels in the manifest: `reindex` rebuilds
//! the catalog from the manifests.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;

use super::catalog::{BackupVersion, Catalog, StoredObject};
use super::hash::HashingReader;
use super::location::Stores;
use super::store::{PART_SIZE, S3Store, StoreError, Upload, read_part};

pub const PRIMARY: &str = "primary";
pub const SECONDARY: &str = "secondary";
/// The largest manifest `reindex` reads.
const MAX_MANIFEST: usize = 64 * 1024;

/// The key of a backup's archive (below the store's prefix).
pub fn archive_name(namespace: &str, agent: &str, backup: &str) -> String {
    format!("{namespace}/{agent}/{backup}.tar.zst")
}

/// The key of a backup's manifest (below the store's prefix).
pub fn manifest_name(namespace: &str, agent: &str, backup: &str) -> String {
    format!("{namespace}/{agent}/{backup}.json")
}

/// What a manifest records (and `reindex` reads back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub namespace: String,
    pub agent: String,
    pub backup: String,
    pub blake3: String,
    pub size: u64,
    pub created_at: String,
    pub objects: Vec<StoredObject>,
    /// The BackupLocation, and the uid of the namespace the backup was made in.
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub namespace_uid: Option<String>,
}

impl Manifest {
    pub fn agent_id(&self) -> String {
        format!("{}/{}", self.namespace, self.agent)
    }
    pub fn catalog_id(&self) -> String {
        format!("{}/{}", self.namespace, self.backup)
    }
}

/// How a backup went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingested {
    /// In both stores, verified in both, catalogued.
    Completed(BackupVersion),
    /// Verified in the primary; the secondary failed (`error`), nothing catalogued yet.
    PartiallyFailed {
        backup: BackupVersion,
        error: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("primary store: {0}")]
    Primary(StoreError),
    #[error("secondary store: {0}")]
    Secondary(StoreError),
    #[error("reading the backup stream: {0}")]
    Stream(std::io::Error),
    #[error(
        "{location} copy does not match: stored BLAKE3 {found} ({found_size} bytes), expected {expected} ({expected_size} bytes)"
    )]
    Mismatch {
        location: &'static str,
        found: String,
        found_size: u64,
        expected: String,
        expected_size: u64,
    },
    #[error("no copy of backup {0} passed verification: {1}")]
    NoGoodCopy(String, String),
    #[error("catalog: {0}")]
    Catalog(#[from] crate::identity::store::StoreError),
    #[error("backup {0} is already being written")]
    Busy(String),
}

impl EngineError {
    /// A store failure, named after the store (`primary` or `secondary`).
    fn in_store(location: &str, e: StoreError) -> Self {
        if location == PRIMARY {
            EngineError::Primary(e)
        } else {
            EngineError::Secondary(e)
        }
    }
}

/// Runs a catalog call on the blocking pool (SQLite waits on the disk).
async fn on_catalog<T: Send + 'static>(
    catalog: &Arc<Catalog>,
    call: impl FnOnce(&Catalog) -> Result<T, crate::identity::store::StoreError> + Send + 'static,
) -> Result<T, EngineError> {
    let catalog = catalog.clone();
    Ok(tokio::task::spawn_blocking(move || call(&catalog))
        .await
        .map_err(|e| EngineError::Stream(std::io::Error::other(e)))??)
}

/// Marks a backup as being written by this process until dropped.
pub struct InFlight {
    set: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

pub struct Engine {
    pub catalog: Arc<Catalog>,
    in_flight: Arc<Mutex<HashSet<String>>>,
    /// Multipart uploads whose abort failed (the store was down): location, `primary` or
    /// `secondary`, key, upload id. The manager retries them.
    unaborted: Mutex<Vec<(String, &'static str, String, String)>>,
}

fn now_rfc3339() -> String {
    let now = jiff::Timestamp::now();
    now.round(jiff::Unit::Second).unwrap_or(now).to_string()
}

impl Engine {
    pub fn new(catalog: Arc<Catalog>) -> Self {
        Self {
            catalog,
            in_flight: Arc::default(),
            unaborted: Mutex::default(),
        }
    }

    /// Aborts an upload in `stores`' `which` store, remembering it when that fails.
    async fn abort(&self, stores: &Stores, which: &'static str, upload: &Upload) {
        let Some(store) = stores.by_name(which) else {
            return;
        };
        if !store.abort_upload(&upload.key, &upload.upload_id).await {
            self.unaborted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((
                    stores.location.clone(),
                    which,
                    upload.key.clone(),
                    upload.upload_id.clone(),
                ));
        }
    }

    /// Retries the aborts that failed in `stores`' location.
    pub async fn retry_aborts(&self, stores: &Stores) {
        let mine: Vec<_> = {
            let mut all = self.unaborted.lock().unwrap_or_else(|p| p.into_inner());
            let (mine, rest) = all.drain(..).partition(|u| u.0 == stores.location);
            *all = rest;
            mine
        };
        for (location, which, key, upload_id) in mine {
            let Some(store) = stores.by_name(which) else {
                continue;
            };
            if !store.abort_upload(&key, &upload_id).await {
                self.unaborted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((location, which, key, upload_id));
            }
        }
    }

    /// Claims `id` (`namespace/backup`) for this process: a second writer gets `Busy`.
    pub fn claim(&self, id: &str) -> Result<InFlight, EngineError> {
        let mut set = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(id.to_string()) {
            return Err(EngineError::Busy(id.to_string()));
        }
        Ok(InFlight {
            set: self.in_flight.clone(),
            id: id.to_string(),
        })
    }

    /// Whether this process is writing `id` now.
    pub fn is_in_flight(&self, id: &str) -> bool {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// Streams `body` into both stores of `stores`, verifies both copies and catalogues the
    /// backup (see the module docs). `Err` leaves nothing behind: both uploads are aborted.
    pub async fn ingest<R: AsyncRead + Unpin>(
        &self,
        stores: &Stores,
        namespace: &str,
        namespace_uid: Option<String>,
        agent: &str,
        backup: &str,
        body: R,
    ) -> Result<Ingested, EngineError> {
        let name = archive_name(namespace, agent, backup);
        let created_at = now_rfc3339();
        let metadata = HashMap::from([
            ("agentry-agent".to_string(), format!("{namespace}/{agent}")),
            ("agentry-backup".to_string(), backup.to_string()),
            ("agentry-created".to_string(), created_at.clone()),
        ]);
        let (primary_key, secondary_key) = (stores.primary.key(&name), stores.secondary.key(&name));
        let (p, s) = tokio::join!(
            stores.primary.start_upload(&primary_key, metadata.clone()),
            stores.secondary.start_upload(&secondary_key, metadata)
        );
        let mut primary = p.map_err(EngineError::Primary)?;
        let mut secondary = match s {
            Ok(s) => Ok(s),
            Err(e) => Err(e.to_string()),
        };
        let mut hashing = HashingReader::new(body);
        let sent = stream_parts(stores, &mut hashing, &mut primary, &mut secondary).await;
        if let Err(e) = sent {
            self.abort(stores, PRIMARY, &primary).await;
            if let Ok(s) = &secondary {
                self.abort(stores, SECONDARY, s).await;
            }
            return Err(e);
        }
        let (blake3, size) = hashing.finish();
        let (p, s) = tokio::join!(stores.primary.finish_upload(primary), async {
            match secondary {
                Ok(s) => stores
                    .secondary
                    .finish_upload(s)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            }
        });
        let (etag, version_id) = match p {
            Ok(done) => done,
            Err(e) => {
                // The secondary alone is no backup: remove it.
                if let Ok((_, version)) = &s {
                    let _ = stores
                        .secondary
                        .delete(&secondary_key, version.as_deref())
                        .await;
                }
                return Err(EngineError::Primary(e));
            }
        };
        let primary_object = StoredObject {
            location: PRIMARY.into(),
            key: primary_key,
            version_id,
            etag,
        };
        let (p, s) = tokio::join!(
            verify(&stores.primary, PRIMARY, &primary_object, &blake3, size),
            async {
                match s {
                    Ok((etag, version_id)) => {
                        let object = StoredObject {
                            location: SECONDARY.into(),
                            key: secondary_key,
                            version_id,
                            etag,
                        };
                        verify(&stores.secondary, SECONDARY, &object, &blake3, size)
                            .await
                            .map(|()| object)
                            .map_err(|e| e.to_string())
                    }
                    Err(e) => Err(e),
                }
            }
        );
        if let Err(e) = p {
            // A primary copy that does not read back as sent is worthless: remove both.
            let _ = stores
                .primary
                .delete(&primary_object.key, primary_object.version_id.as_deref())
                .await;
            if let Ok(object) = &s {
                let _ = stores
                    .secondary
                    .delete(&object.key, object.version_id.as_deref())
                    .await;
            }
            return Err(e);
        }
        let mut version = BackupVersion {
            id: format!("{namespace}/{backup}"),
            agent_id: format!("{namespace}/{agent}"),
            size,
            blake3,
            objects: vec![primary_object],
            created_at,
            verified_at: None,
            restored_at: None,
            location: stores.location.clone(),
            namespace_uid,
        };
        match s {
            Ok(secondary) => {
                version.objects.push(secondary);
                if let Err(e) = self.commit(stores, &mut version).await {
                    // Not catalogued, so not kept: a later reindex must not resurrect it.
                    self.remove_copies(stores, &version).await;
                    return Err(e);
                }
                Ok(Ingested::Completed(version))
            }
            Err(error) => Ok(Ingested::PartiallyFailed {
                backup: version,
                error: format!("secondary store: {error}"),
            }),
        }
    }

    /// Copies a PartiallyFailed backup's verified primary copy to the secondary, verifies it and
    /// catalogues the backup.
    pub async fn complete_secondary(
        &self,
        stores: &Stores,
        mut version: BackupVersion,
    ) -> Result<BackupVersion, EngineError> {
        let primary = version
            .objects
            .iter()
            .find(|o| o.location == PRIMARY)
            .cloned()
            .ok_or_else(|| EngineError::NoGoodCopy(version.id.clone(), "no primary copy".into()))?;
        let name = primary
            .key
            .strip_prefix(stores.primary.prefix())
            .unwrap_or(&primary.key)
            .to_string();
        let object = copy(
            &stores.primary,
            &primary,
            &stores.secondary,
            &name,
            SECONDARY,
            &version,
        )
        .await?;
        version.objects.retain(|o| o.location != SECONDARY);
        version.objects.push(object.clone());
        if let Err(e) = self.commit(stores, &mut version).await {
            // The primary copy stays (PartiallyFailed retries); this copy and the manifests go.
            let _ = stores
                .secondary
                .delete(&object.key, object.version_id.as_deref())
                .await;
            self.remove_manifests(stores, &version).await;
            return Err(e);
        }
        Ok(version)
    }

    /// Best effort: both copies and both manifests of a backup that is not catalogued.
    async fn remove_copies(&self, stores: &Stores, version: &BackupVersion) {
        for object in &version.objects {
            if let Some(store) = stores.by_name(&object.location) {
                let _ = store
                    .delete(&object.key, object.version_id.as_deref())
                    .await;
            }
        }
        self.remove_manifests(stores, version).await;
    }

    async fn remove_manifests(&self, stores: &Stores, version: &BackupVersion) {
        for object in &version.objects {
            if let (Some(store), Some(stem)) = (
                stores.by_name(&object.location),
                object.key.strip_suffix(".tar.zst"),
            ) {
                let _ = store.delete(&format!("{stem}.json"), None).await;
            }
        }
    }

    /// Writes the manifests next to both copies, then the catalog row.
    async fn commit(
        &self,
        stores: &Stores,
        version: &mut BackupVersion,
    ) -> Result<(), EngineError> {
        version.verified_at = Some(now_rfc3339());
        let (namespace, backup) = version.id.split_once('/').unwrap_or(("", &version.id));
        let agent = version
            .agent_id
            .split_once('/')
            .map_or(version.agent_id.as_str(), |(_, a)| a);
        let manifest = Manifest {
            format: 1,
            namespace: namespace.into(),
            agent: agent.into(),
            backup: backup.into(),
            blake3: version.blake3.clone(),
            size: version.size,
            created_at: version.created_at.clone(),
            objects: version.objects.clone(),
            location: Some(version.location.clone()),
            namespace_uid: version.namespace_uid.clone(),
        };
        let body = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        let metadata = HashMap::from([
            ("agentry-agent".to_string(), version.agent_id.clone()),
            ("agentry-blake3".to_string(), version.blake3.clone()),
        ]);
        let name = manifest_name(namespace, agent, backup);
        let (primary_key, secondary_key) = (stores.primary.key(&name), stores.secondary.key(&name));
        let (p, s) = tokio::join!(
            stores
                .primary
                .put_small(&primary_key, body.clone(), metadata.clone()),
            stores.secondary.put_small(&secondary_key, body, metadata)
        );
        p.map_err(EngineError::Primary)?;
        s.map_err(EngineError::Secondary)?;
        let row = version.clone();
        on_catalog(&self.catalog, move |c| c.record(&row)).await
    }

    /// Finds a copy of `version` whose BLAKE3 and size match the catalog, primary first, and
    /// opens it. Returns the copy's location, what was wrong with the others, and the stream.
    pub async fn open_verified(
        &self,
        stores: &Stores,
        version: &BackupVersion,
    ) -> Result<
        (
            &'static str,
            Vec<String>,
            impl AsyncRead + Unpin + Send + 'static,
        ),
        EngineError,
    > {
        let mut problems = Vec::new();
        for (location, store) in [(PRIMARY, &stores.primary), (SECONDARY, &stores.secondary)] {
            let Some(object) = version.objects.iter().find(|o| o.location == location) else {
                problems.push(format!("{location}: no copy recorded"));
                continue;
            };
            match verify(store, location, object, &version.blake3, version.size).await {
                Ok(()) => {
                    let reader = store
                        .open(&object.key, object.version_id.as_deref())
                        .await
                        .map_err(|e| EngineError::NoGoodCopy(version.id.clone(), e.to_string()))?;
                    return Ok((location, problems, reader));
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        Err(EngineError::NoGoodCopy(
            version.id.clone(),
            problems.join("; "),
        ))
    }

    /// Deletes both copies and both manifests of a backup, then its catalog row. A copy under
    /// object lock is refused by the store and the row stays (retention retries later).
    pub async fn delete(
        &self,
        stores: &Stores,
        version: &BackupVersion,
    ) -> Result<(), EngineError> {
        for object in &version.objects {
            let store = stores.by_name(&object.location).ok_or_else(|| {
                EngineError::NoGoodCopy(version.id.clone(), "unknown location".into())
            })?;
            let wrap = |e| EngineError::in_store(&object.location, e);
            store
                .delete(&object.key, object.version_id.as_deref())
                .await
                .map_err(wrap)?;
            if let Some(manifest) = object.key.strip_suffix(".tar.zst") {
                // The manifest goes too (on a versioned bucket: a delete marker, which a reindex, listing
                // current objects only, does not see), so it cannot resurrect the backup.
                store
                    .delete(&format!("{manifest}.json"), None)
                    .await
                    .map_err(wrap)?;
            }
        }
        let id = version.id.clone();
        on_catalog(&self.catalog, move |c| c.delete(&id)).await?;
        Ok(())
    }

    /// Re-hashes both copies of `version`; a bad or missing copy is replaced from a good one.
    pub async fn scrub_one(
        &self,
        stores: &Stores,
        version: &BackupVersion,
    ) -> Result<ScrubResult, EngineError> {
        let mut bad = Vec::new();
        let mut good = None;
        for (location, store) in [(PRIMARY, &stores.primary), (SECONDARY, &stores.secondary)] {
            let outcome = match version.objects.iter().find(|o| o.location == location) {
                Some(object) => verify(store, location, object, &version.blake3, version.size)
                    .await
                    .map(|()| object.clone())
                    .map_err(|e| e.to_string()),
                None => Err(format!("{location}: no copy recorded")),
            };
            match outcome {
                Ok(object) => {
                    if good.is_none() {
                        good = Some((store, object));
                    }
                }
                Err(e) => bad.push((location, store, e)),
            }
        }
        let Some((good_store, good_object)) = good else {
            return Ok(ScrubResult::Lost(
                bad.into_iter()
                    .map(|(_, _, e)| e)
                    .collect::<Vec<_>>()
                    .join("; "),
            ));
        };
        if bad.is_empty() {
            return Ok(ScrubResult::Healthy);
        }
        let mut objects = version.objects.clone();
        let mut repaired = Vec::new();
        for (location, store, problem) in bad {
            let name = good_object
                .key
                .strip_prefix(good_store.prefix())
                .unwrap_or(&good_object.key)
                .to_string();
            let object = copy(good_store, &good_object, store, &name, location, version).await?;
            if let Some(old) = objects.iter().find(|o| o.location == location)
                && old.version_id.is_some()
                && old.version_id != object.version_id
            {
                // The bad version goes; the repaired one is current.
                let _ = store.delete(&old.key, old.version_id.as_deref()).await;
            }
            objects.retain(|o| o.location != location);
            objects.push(object);
            repaired.push(format!("{location}: {problem}"));
        }
        let (id, now) = (version.id.clone(), now_rfc3339());
        on_catalog(&self.catalog, move |c| {
            c.update_objects(&id, &objects, &now)
        })
        .await?;
        Ok(ScrubResult::Repaired(repaired))
    }

    /// Rebuilds catalog rows from the manifests in both stores (a lost catalog loses nothing).
    /// Manifests are checked: the fields must be well-formed and their archive must exist with
    /// the recorded size. Returns (added, already known, refused with why).
    pub async fn reindex(&self, stores: &Stores) -> Result<Reindexed, EngineError> {
        let mut out = Reindexed::default();
        let mut seen = HashSet::new();
        for (location, store) in [(PRIMARY, &stores.primary), (SECONDARY, &stores.secondary)] {
            let listed = store
                .list("")
                .await
                .map_err(|e| EngineError::in_store(location, e))?;
            let sizes: HashMap<&str, u64> =
                listed.iter().map(|l| (l.key.as_str(), l.size)).collect();
            for item in listed.iter().filter(|l| l.key.ends_with(".json")) {
                let manifest = match store.get_small(&item.key, MAX_MANIFEST).await {
                    Ok(bytes) => match serde_json::from_slice::<Manifest>(&bytes) {
                        Ok(m) => m,
                        Err(e) => {
                            out.refused
                                .push(format!("{location} {}: not a manifest: {e}", item.key));
                            continue;
                        }
                    },
                    Err(e) => {
                        out.refused.push(format!("{location} {}: {e}", item.key));
                        continue;
                    }
                };
                if let Err(why) = check_manifest(store, &item.key, &manifest, &sizes, location) {
                    out.refused.push(format!("{location} {}: {why}", item.key));
                    continue;
                }
                let id = manifest.catalog_id();
                if !seen.insert(id.clone()) {
                    continue;
                }
                let known = {
                    let id = id.clone();
                    on_catalog(&self.catalog, move |c| c.get(&id)).await?
                };
                if known.is_some() {
                    out.known += 1;
                    continue;
                }
                let version = BackupVersion {
                    id,
                    agent_id: manifest.agent_id(),
                    size: manifest.size,
                    blake3: manifest.blake3.clone(),
                    objects: manifest.objects.clone(),
                    created_at: manifest.created_at.clone(),
                    verified_at: None,
                    restored_at: None,
                    // The stores it was found in are the location's, whatever the manifest says.
                    location: stores.location.clone(),
                    namespace_uid: manifest.namespace_uid.clone(),
                };
                on_catalog(&self.catalog, move |c| c.record(&version)).await?;
                out.added += 1;
            }
        }
        Ok(out)
    }
}

/// What `reindex` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reindexed {
    pub added: u64,
    pub known: u64,
    pub refused: Vec<String>,
}

/// What `scrub_one` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScrubResult {
    Healthy,
    /// Bad copies replaced from a good one (what was wrong with each).
    Repaired(Vec<String>),
    /// No copy matches the catalog.
    Lost(String),
}

/// A manifest must name a plausible agent and backup, put its archive where the layout says,
/// and that archive must be listed with the recorded size.
fn check_manifest(
    store: &S3Store,
    manifest_key: &str,
    m: &Manifest,
    sizes: &HashMap<&str, u64>,
    location: &str,
) -> Result<(), String> {
    let dns = crate::crd::units::is_object_name;
    if m.format != 1 {
        return Err(format!("unknown manifest format {}", m.format));
    }
    if !(dns(&m.namespace) && dns(&m.agent) && dns(&m.backup)) {
        return Err("namespace, agent and backup must be DNS names".into());
    }
    if m.blake3.len() != 64 || !m.blake3.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("blake3 is not 64 hex digits".into());
    }
    if jiff::Timestamp::strptime("%Y-%m-%dT%H:%M:%S%:z", &m.created_at).is_err()
        && m.created_at.parse::<jiff::Timestamp>().is_err()
    {
        return Err("createdAt is not RFC 3339".into());
    }
    if store.key(&manifest_name(&m.namespace, &m.agent, &m.backup)) != manifest_key {
        return Err("the manifest is not where its fields say it belongs".into());
    }
    let archive = store.key(&archive_name(&m.namespace, &m.agent, &m.backup));
    match m.objects.iter().find(|o| o.location == location) {
        Some(o) if o.key == archive => {}
        _ => return Err(format!("its {location} copy is not {archive}")),
    }
    match sizes.get(archive.as_str()) {
        Some(size) if *size == m.size => Ok(()),
        Some(size) => Err(format!("archive is {size} bytes, manifest says {}", m.size)),
        None => Err(format!("archive {archive} is missing")),
    }
}

/// Re-reads `object` from `store` and checks its BLAKE3 and size.
async fn verify(
    store: &S3Store,
    location: &'static str,
    object: &StoredObject,
    blake3: &str,
    size: u64,
) -> Result<(), EngineError> {
    let (found, found_size) = store
        .hash_object(&object.key, object.version_id.as_deref())
        .await
        .map_err(|e| EngineError::in_store(location, e))?;
    if found != blake3 || found_size != size {
        return Err(EngineError::Mismatch {
            location,
            found,
            found_size,
            expected: blake3.to_string(),
            expected_size: size,
        });
    }
    Ok(())
}

/// Streams `from` (in `source`) into `name` in `target`, checking on the way that what was read
/// is what the catalog says, then re-reads the new copy.
async fn copy(
    source: &S3Store,
    from: &StoredObject,
    target: &S3Store,
    name: &str,
    location: &'static str,
    version: &BackupVersion,
) -> Result<StoredObject, EngineError> {
    let reader = source
        .open(&from.key, from.version_id.as_deref())
        .await
        .map_err(EngineError::Primary)?;
    let (namespace, backup) = version.id.split_once('/').unwrap_or(("", &version.id));
    let metadata = HashMap::from([
        ("agentry-agent".to_string(), version.agent_id.clone()),
        ("agentry-backup".to_string(), backup.to_string()),
        ("agentry-created".to_string(), version.created_at.clone()),
    ]);
    let _ = namespace;
    let uploaded = target
        .put_stream(name, reader, metadata)
        .await
        .map_err(EngineError::Secondary)?;
    let object = StoredObject {
        location: location.into(),
        key: uploaded.key.clone(),
        version_id: uploaded.version_id.clone(),
        etag: uploaded.etag.clone(),
    };
    if uploaded.blake3 != version.blake3 || uploaded.size != version.size {
        // The source itself was bad: the new copy is no better; remove it.
        let _ = target
            .delete(&uploaded.key, uploaded.version_id.as_deref())
            .await;
        return Err(EngineError::Mismatch {
            location: if location == PRIMARY {
                SECONDARY
            } else {
                PRIMARY
            },
            found: uploaded.blake3,
            found_size: uploaded.size,
            expected: version.blake3.clone(),
            expected_size: version.size,
        });
    }
    verify(target, location, &object, &version.blake3, version.size).await?;
    Ok(object)
}

/// Sends each part to both uploads at once while reading the next; a failing secondary is
/// aborted and dropped (the backup goes on, PartiallyFailed), a failing primary fails it all.
async fn stream_parts<R: AsyncRead + Unpin>(
    stores: &Stores,
    reader: &mut HashingReader<R>,
    primary: &mut Upload,
    secondary: &mut Result<Upload, String>,
) -> Result<(), EngineError> {
    let mut part = read_part(reader).await.map_err(EngineError::Stream)?;
    loop {
        let last = part.len() < PART_SIZE;
        let send = async {
            let (p, s) = tokio::join!(stores.primary.upload_part(primary, part.clone()), async {
                match secondary.as_mut() {
                    Ok(upload) => Some(stores.secondary.upload_part(upload, part.clone()).await),
                    Err(_) => None,
                }
            });
            (p, s)
        };
        let (sent, next) = if last {
            (send.await, Ok(bytes::Bytes::new()))
        } else {
            tokio::join!(send, read_part(reader))
        };
        let (p, s) = sent;
        if let Some(Err(e)) = s
            && let Ok(upload) = secondary.as_ref()
        {
            let _ = stores
                .secondary
                .abort_upload(&upload.key, &upload.upload_id)
                .await;
            *secondary = Err(e.to_string());
        }
        p.map_err(EngineError::Primary)?;
        if last {
            return Ok(());
        }
        part = next.map_err(EngineError::Stream)?;
        if part.is_empty() {
            return Ok(());
        }
    }
}
