//! The backup manager, run by the leader beside the Agent controller. On every pass (a tick, or
//! a change to an Agent, AgentBackup, AgentRestore or BackupLocation) it:
//! - re-validates BackupLocations (both stores reachable, credentials, versioning);
//! - creates each Agent's scheduled AgentBackups (deterministic names: a restart or a failover
//!   never makes a duplicate);
//! - fails AgentBackups no sidecar picked up, and those a dead controller left InProgress
//!   (aborting their multipart uploads); retries the secondary copy of PartiallyFailed ones with
//!   backoff;
//! - verifies the copy an AgentRestore will use before the sidecar may fetch it;
//! - applies GFS retention (only while both stores are available), deleting both copies, the
//!   catalog row and the AgentBackup together;
//! - writes each Agent's `status.backup` and `BackupHealthy` condition under its own field
//!   manager (`agentry-backup`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::api::backups::{BackupService, completed_status};
use crate::backup::catalog::BackupVersion;
use crate::backup::location::{self, Stores};
use crate::backup::retention::{self, Candidate};
use crate::backup::schedule::{self, Decision};
use crate::crd::{
    Agent, AgentBackup, AgentBackupSpec, AgentRestore, BackupLocation, BackupPhase, BackupStatus,
    LastBackup, RestorePhase,
};
use crate::keys::{AGENT_LABEL, MANAGED_BY, conditions::BACKUP_HEALTHY};

/// The field manager of the backup manager's writes to an Agent's status.
pub const BACKUP_MANAGER: &str = "agentry-backup";
/// On scheduled AgentBackups: the cron slot it is for (RFC 3339).
pub const SLOT_ANNOTATION: &str = "agentry.dev/scheduled-for";
/// On AgentBackups the schedule created.
pub const SCHEDULED_LABEL: &str = "agentry.dev/scheduled";

/// How the manager runs.
#[derive(Clone, Debug)]
pub struct BackupConfig {
    /// A pass at least this often.
    pub interval: Duration,
    /// BackupLocations are re-validated this often.
    pub validate_every: Duration,
    /// A New AgentBackup no sidecar sent data for within this fails.
    pub pickup_timeout: Duration,
    /// Retries of a secondary copy start at this and double (capped at 10 minutes).
    pub retry_base: Duration,
    /// Manage only BackupLocations matching this label selector (None: all).
    pub location_selector: Option<String>,
}

impl Default for BackupConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            validate_every: Duration::from_secs(60),
            pickup_timeout: Duration::from_secs(15 * 60),
            retry_base: Duration::from_secs(10),
            location_selector: None,
        }
    }
}

/// The watch caches the manager and the API share.
pub struct Caches {
    pub backups: Store<AgentBackup>,
    pub restores: Store<AgentRestore>,
    pub locations: Store<BackupLocation>,
}

/// Starts the three watches; `changed` is notified on every event.
pub fn watch(
    client: &Client,
    namespace: &Option<String>,
    location_selector: Option<&str>,
    changed: Arc<Notify>,
    stop: CancellationToken,
) -> Caches {
    fn run<K>(
        api: Api<K>,
        config: watcher::Config,
        changed: Arc<Notify>,
        stop: CancellationToken,
    ) -> Store<K>
    where
        K: Resource<DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let (store, writer) = reflector::store();
        let stream = watcher::watcher(api, config)
            .default_backoff()
            .modify(|o: &mut K| o.meta_mut().managed_fields = None)
            .reflect(writer)
            .touched_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    event = stream.next() => match event {
                        Some(Ok(_)) => changed.notify_one(),
                        Some(Err(e)) => tracing::warn!(error = %e, kind = %K::kind(&()), "watching backup resources failed; retrying"),
                        None => break,
                    },
                }
            }
        });
        store
    }
    let scoped = |c: &Client| -> (Api<AgentBackup>, Api<AgentRestore>) {
        match namespace {
            Some(ns) => (
                Api::namespaced(c.clone(), ns),
                Api::namespaced(c.clone(), ns),
            ),
            None => (Api::all(c.clone()), Api::all(c.clone())),
        }
    };
    let (backups, restores) = scoped(client);
    let all = watcher::Config::default().any_semantic();
    let mut locations = all.clone();
    if let Some(selector) = location_selector {
        locations = locations.labels(selector);
    }
    Caches {
        backups: run(backups, all.clone(), changed.clone(), stop.clone()),
        restores: run(restores, all, changed.clone(), stop.clone()),
        locations: run(Api::all(client.clone()), locations, changed, stop),
    }
}

/// The manager's memory between passes.
#[derive(Default)]
struct Memory {
    /// When each location was last validated, and at which generation.
    validated: HashMap<String, (Instant, Option<i64>)>,
    /// Secondary retries: attempts and when the next may run, per backup.
    retries: HashMap<String, (u32, Instant)>,
    /// The `status.backup` + condition last written per Agent uid.
    written: HashMap<String, serde_json::Value>,
    /// When orphaned uploads were last swept, per location.
    swept: HashMap<String, Instant>,
    /// Agents (by uid and generation) whose backup status was released once already.
    released: std::collections::HashSet<(String, Option<i64>)>,
}

pub struct Manager {
    pub service: Arc<BackupService>,
    pub agents: Store<DeserializeGuard<Agent>>,
    pub config: BackupConfig,
    memory: Mutex<Memory>,
    /// When this manager started: multipart uploads begun before it belong to no live writer.
    started: jiff::Timestamp,
}

/// The AgentBackups of each Agent (`namespace/agent`), from one snapshot of the cache.
type ByAgent = HashMap<String, Vec<Arc<AgentBackup>>>;

/// Failed AgentBackups kept per Agent (older ones are deleted: nothing of them is stored).
const KEEP_FAILED: usize = 5;

fn now_rfc3339() -> String {
    crate::api::rfc3339(jiff::Timestamp::now().as_second())
}

fn parse_time(s: &str) -> Option<jiff::Timestamp> {
    s.parse().ok()
}

impl Manager {
    pub fn new(
        service: Arc<BackupService>,
        agents: Store<DeserializeGuard<Agent>>,
        config: BackupConfig,
    ) -> Self {
        Self {
            service,
            agents,
            config,
            memory: Mutex::default(),
            started: jiff::Timestamp::now(),
        }
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Passes until `stop`: every interval, or sooner when `changed` fires.
    pub async fn run(self: Arc<Self>, changed: Arc<Notify>, stop: CancellationToken) {
        loop {
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e, "backup pass failed; retrying");
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = changed.notified() => {
                    // Let a burst of events settle into one pass.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                },
                _ = tokio::time::sleep(self.config.interval) => {},
            }
        }
    }

    /// One pass over everything (see the module docs).
    pub async fn pass(&self) -> anyhow::Result<()> {
        self.validate_locations().await;
        let mut stores: HashMap<String, Option<Arc<Stores>>> = HashMap::new();
        for location in self.service.locations.state() {
            let name = location.name_any();
            let built = if location::is_available(&location) {
                self.service.cached_stores(&location).await.ok()
            } else {
                None
            };
            stores.insert(name, built);
        }
        self.sweep_orphans(&stores).await;
        self.tend_backups(&stores).await;
        self.tend_restores(&stores).await;
        let mut by_agent: ByAgent = HashMap::new();
        for b in self.service.backups.state() {
            let key = format!("{}/{}", b.namespace().unwrap_or_default(), b.spec.agent);
            by_agent.entry(key).or_default().push(b);
        }
        for agent in self.agents.state() {
            let Ok(agent) = &agent.0 else { continue };
            if agent.meta().deletion_timestamp.is_some() {
                continue;
            }
            let Some(spec) = &agent.spec.backup else {
                self.release(agent).await;
                continue;
            };
            let available = stores.get(&spec.location).cloned().flatten();
            // While its location is unavailable a run could only fail: none is created (the
            // slot is taken again by RunOnce when it is back), BackupHealthy says why.
            let key = format!(
                "{}/{}",
                agent.namespace().unwrap_or_default(),
                agent.name_any()
            );
            let mine = by_agent.get(&key).map(Vec::as_slice).unwrap_or_default();
            // The Agent's catalogued backups, newest first, read once for retention and status
            // (retention never deletes the newest).
            let versions = self.service.engine.catalog.list(&key).unwrap_or_default();
            let next = self.schedule(agent, mine, available.is_some()).await;
            if let Some(stores) = &available {
                self.retain(agent, stores, &versions).await;
            }
            self.forget_failed(mine).await;
            let latest = versions.into_iter().next();
            self.report(agent, mine, latest, available.is_some(), next)
                .await;
        }
        Ok(())
    }

    async fn validate_locations(&self) {
        for location in self.service.locations.state() {
            let name = location.name_any();
            let due = {
                let memory = self.memory();
                match memory.validated.get(&name) {
                    Some((at, generation)) => {
                        at.elapsed() >= self.config.validate_every
                            || *generation != location.metadata.generation
                    }
                    None => true,
                }
            };
            if !due {
                continue;
            }
            let status =
                location::validate(&self.service.client, &self.service.namespace, &location).await;
            let api: Api<BackupLocation> = Api::all(self.service.client.clone());
            let patch = serde_json::json!({ "status": status });
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    if status.phase.as_deref() != Some("Available") {
                        tracing::warn!(location = %name, "BackupLocation is Unavailable");
                    }
                    self.memory()
                        .validated
                        .insert(name, (Instant::now(), location.metadata.generation));
                }
                Err(e) => {
                    tracing::warn!(location = %name, error = %e, "writing BackupLocation status failed")
                }
            }
        }
    }

    /// Creates the AgentBackup for the Agent's due slot (when `create`); returns the next
    /// scheduled time.
    async fn schedule(
        &self,
        agent: &Agent,
        mine: &[Arc<AgentBackup>],
        create: bool,
    ) -> Option<String> {
        let spec = agent.spec.backup.as_ref()?;
        let cron = spec.validate().ok()?;
        let jitter = spec.jitter().unwrap_or_default();
        let (namespace, name) = (agent.namespace()?, agent.name_any());
        let since = agent
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or_else(jiff::Timestamp::now, |t| t.0);
        let last_slot = mine
            .iter()
            .filter_map(|b| {
                b.annotations()
                    .get(SLOT_ANNOTATION)
                    .and_then(|s| parse_time(s))
            })
            .max();
        let now = jiff::Timestamp::now();
        let seed = agent.uid().unwrap_or_default();
        match schedule::decide(
            &cron,
            last_slot,
            since,
            now,
            spec.missed_run_policy,
            jitter,
            &seed,
        ) {
            Decision::RunNow { slot } if create => {
                let backup_name = schedule::backup_name(&name, slot);
                if let Err(e) = self
                    .create_backup(&namespace, &name, &backup_name, Some(slot))
                    .await
                {
                    tracing::warn!(agent = %format!("{namespace}/{name}"), error = %e, "creating the scheduled AgentBackup failed");
                }
                // The next one, now that this slot is taken.
                match schedule::decide(
                    &cron,
                    Some(slot),
                    since,
                    now,
                    spec.missed_run_policy,
                    jitter,
                    &seed,
                ) {
                    Decision::WaitUntil { at, .. } => Some(at.to_string()),
                    _ => None,
                }
            }
            Decision::RunNow { slot } => Some(crate::api::rfc3339(slot.as_second())),
            Decision::WaitUntil { at, .. } => Some(crate::api::rfc3339(at.as_second())),
            Decision::Never => None,
        }
    }

    /// Creates an AgentBackup (AlreadyExists is success: the name is the slot's).
    pub async fn create_backup(
        &self,
        namespace: &str,
        agent: &str,
        name: &str,
        slot: Option<jiff::Timestamp>,
    ) -> Result<(), kube::Error> {
        let mut backup = AgentBackup::new(
            name,
            AgentBackupSpec {
                agent: agent.to_string(),
            },
        );
        backup.metadata.namespace = Some(namespace.to_string());
        let mut labels = std::collections::BTreeMap::from([
            (AGENT_LABEL.to_string(), agent.to_string()),
            (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        ]);
        if let Some(slot) = slot {
            labels.insert(SCHEDULED_LABEL.into(), "true".into());
            backup.metadata.annotations = Some(std::collections::BTreeMap::from([(
                SLOT_ANNOTATION.to_string(),
                crate::api::rfc3339(slot.as_second()),
            )]));
        }
        backup.metadata.labels = Some(labels);
        let api: Api<AgentBackup> = Api::namespaced(self.service.client.clone(), namespace);
        match api.create(&PostParams::default(), &backup).await {
            Ok(_) => {
                tracing::info!(backup = %format!("{namespace}/{name}"), "created a scheduled AgentBackup");
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Aborts multipart uploads no backup in this process is writing (a controller that died
    /// mid-upload leaves them), at most once a minute per location.
    async fn sweep_orphans(&self, stores: &HashMap<String, Option<Arc<Stores>>>) {
        for (name, stores) in stores {
            let Some(stores) = stores else { continue };
            self.service.engine.retry_aborts(stores).await;
            {
                let mut memory = self.memory();
                if memory
                    .swept
                    .get(name)
                    .is_some_and(|at| at.elapsed() < Duration::from_secs(60))
                {
                    continue;
                }
                memory.swept.insert(name.clone(), Instant::now());
            }
            for store in [&stores.primary, &stores.secondary] {
                let Ok(pending) = store.pending_uploads().await else {
                    continue;
                };
                for (key, upload_id, initiated) in pending {
                    // Only uploads no live writer can own: begun before this leader started
                    // (its predecessor's), or older than the longest transfer (a CLI repair
                    // that died). Newer ones may be a running `agentry backup scrub`'s.
                    let stale = initiated.is_none_or(|t| {
                        t < self.started
                            || jiff::Timestamp::now().duration_since(t).unsigned_abs()
                                > crate::api::backups::TRANSFER_TIMEOUT
                    });
                    if !stale
                        || self
                            .service
                            .engine
                            .is_in_flight(&in_flight_id(store.prefix(), &key))
                    {
                        continue;
                    }
                    tracing::info!(bucket = %store.bucket, %key, "aborting an orphaned multipart upload");
                    let _ = store.abort_upload(&key, &upload_id).await;
                }
            }
        }
    }

    async fn tend_backups(&self, stores: &HashMap<String, Option<Arc<Stores>>>) {
        for backup in self.service.backups.state() {
            let Some(namespace) = backup.namespace() else {
                continue;
            };
            let name = backup.name_any();
            let id = format!("{namespace}/{name}");
            let status = backup.status.clone().unwrap_or_default();
            let age = backup
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| jiff::Timestamp::now().duration_since(t.0).unsigned_abs())
                .unwrap_or_default();
            let fail = |message: String| serde_json::json!({"phase": BackupPhase::Failed, "completedAt": now_rfc3339(), "error": message});
            // The catalog, not the (tenant-writable) status, says whether a backup is done: a
            // catalogued one shown as anything else is put back to Completed.
            let catalogued = match status.phase {
                Some(BackupPhase::Completed) => None,
                _ => self.service.engine.catalog.get(&id).ok().flatten(),
            };
            let patch = match status.phase {
                _ if catalogued.is_some() && !self.service.engine.is_in_flight(&id) => {
                    catalogued.map(|v| completed_status(&v, BackupPhase::Completed, None))
                }
                None => Some(serde_json::json!({"phase": BackupPhase::New, "observedGeneration": backup.metadata.generation})),
                Some(BackupPhase::New) if age > self.config.pickup_timeout => Some(fail(format!(
                    "no data arrived within {}s: is the agent's sidecar running, and does the Agent have backup:write?",
                    self.config.pickup_timeout.as_secs()
                ))),
                Some(BackupPhase::InProgress) if !self.service.engine.is_in_flight(&id) => {
                    Some(fail("interrupted: the controller stopped during the upload; the partial upload was aborted and nothing was catalogued".into()))
                }
                Some(BackupPhase::PartiallyFailed) => {
                    self.retry_secondary(&backup, &id, stores).await
                }
                _ => None,
            };
            // Only over the version this pass looked at: an upload that started or finished
            // since (a 409) is left alone.
            if let Some(patch) = patch
                && let Err(e) = self
                    .service
                    .set_backup_status_at(
                        &namespace,
                        &name,
                        backup.metadata.resource_version.as_deref(),
                        patch,
                    )
                    .await
                && !matches!(&e, kube::Error::Api(r) if r.code == 409)
            {
                tracing::warn!(backup = %id, error = %e, "writing AgentBackup status failed");
            }
        }
    }

    /// Copies a PartiallyFailed backup to the secondary when its backoff has passed.
    async fn retry_secondary(
        &self,
        backup: &AgentBackup,
        id: &str,
        stores: &HashMap<String, Option<Arc<Stores>>>,
    ) -> Option<serde_json::Value> {
        let status = backup.status.as_ref()?;
        let location = status.location.as_deref()?;
        let Some(Some(stores)) = stores.get(location) else {
            return None;
        };
        {
            let memory = self.memory();
            if let Some((_, next)) = memory.retries.get(id)
                && Instant::now() < *next
            {
                return None;
            }
        }
        // The status is writable by whoever may write AgentBackups: trust no key in it but the
        // one this backup's archive must have (another agent's archive must never be copied
        // and catalogued as this one's), and take nothing else from it but the hash and size
        // (which the copy checks against the bytes themselves).
        let namespace = backup.namespace()?;
        let expected = stores.primary.key(&crate::backup::engine::archive_name(
            &namespace,
            &backup.spec.agent,
            &backup.name_any(),
        ));
        let primaries: Vec<_> = status
            .objects
            .iter()
            .filter(|o| o.location == "primary")
            .collect();
        let refused = |why: String| {
            Some(serde_json::json!({
                "phase": BackupPhase::Failed,
                "completedAt": now_rfc3339(),
                "error": format!("{why}; refusing to copy it"),
            }))
        };
        if !crate::crd::units::is_object_name(&backup.spec.agent) {
            return refused(format!(
                "spec.agent {:?} is not an object name",
                backup.spec.agent
            ));
        }
        let [primary] = primaries.as_slice() else {
            return refused("status.objects must name exactly one primary copy".into());
        };
        if primary.key != expected {
            return refused(format!(
                "status.objects names a primary copy other than {expected}"
            ));
        }
        let Ok(_claim) = self.service.engine.claim(id) else {
            return None;
        };
        let version = BackupVersion {
            id: id.to_string(),
            agent_id: format!("{namespace}/{}", backup.spec.agent),
            size: u64::try_from(status.size?).ok()?,
            blake3: status.blake3.clone()?,
            objects: vec![(*primary).into()],
            created_at: status
                .started_at
                .as_deref()
                .filter(|t| parse_time(t).is_some())
                .map_or_else(now_rfc3339, str::to_string),
            verified_at: None,
            restored_at: None,
            location: stores.location.clone(),
            namespace_uid: self.namespace_uid(&namespace).await,
        };
        match self
            .service
            .engine
            .complete_secondary(stores, version)
            .await
        {
            Ok(done) => {
                self.memory().retries.remove(id);
                tracing::info!(backup = %id, "the secondary copy is in place; backup Completed");
                Some(completed_status(&done, BackupPhase::Completed, None))
            }
            Err(e) => {
                let attempts = {
                    let mut memory = self.memory();
                    let entry = memory
                        .retries
                        .entry(id.to_string())
                        .or_insert((0, Instant::now()));
                    entry.0 += 1;
                    let delay = (self.config.retry_base * 2u32.saturating_pow(entry.0.min(10)))
                        .min(Duration::from_secs(600));
                    entry.1 = Instant::now() + delay;
                    entry.0
                };
                tracing::warn!(backup = %id, error = %e, attempts, "copying to the secondary failed; retrying with backoff");
                Some(serde_json::json!({
                    "error": format!("secondary store: {e}"),
                    "attempts": attempts,
                }))
            }
        }
    }

    /// The uid of `namespace` (None when it cannot be read).
    async fn namespace_uid(&self, namespace: &str) -> Option<String> {
        Api::<k8s_openapi::api::core::v1::Namespace>::all(self.service.client.clone())
            .get_metadata_opt(namespace)
            .await
            .ok()
            .flatten()
            .and_then(|n| n.metadata.uid)
    }

    /// Deletes Failed AgentBackups beyond the newest few of an Agent: nothing of them is
    /// stored, and a schedule whose sidecar is down would otherwise pile them up.
    async fn forget_failed(&self, mine: &[Arc<AgentBackup>]) {
        let mut failed: Vec<_> = mine
            .iter()
            .filter(|b| b.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Failed))
            .collect();
        if failed.len() <= KEEP_FAILED {
            return;
        }
        failed.sort_by_key(|b| {
            std::cmp::Reverse(b.metadata.creation_timestamp.as_ref().map(|t| t.0))
        });
        for b in &failed[KEEP_FAILED..] {
            let Some(namespace) = b.namespace() else {
                continue;
            };
            let api: Api<AgentBackup> = Api::namespaced(self.service.client.clone(), &namespace);
            if let Err(e) = api.delete(&b.name_any(), &DeleteParams::default()).await {
                tracing::debug!(backup = %b.name_any(), error = %e, "deleting an old Failed AgentBackup failed");
            }
        }
    }

    async fn tend_restores(&self, stores: &HashMap<String, Option<Arc<Stores>>>) {
        for restore in self.service.restores.state() {
            let Some(namespace) = restore.namespace() else {
                continue;
            };
            let name = restore.name_any();
            let phase = restore.status.as_ref().and_then(|s| s.phase);
            if !matches!(phase, None | Some(RestorePhase::New)) {
                continue;
            }
            let patch = self.prepare_restore(&restore, &namespace, stores).await;
            if let Err(e) = self
                .service
                .set_restore_status(&namespace, &name, patch)
                .await
            {
                tracing::warn!(restore = %format!("{namespace}/{name}"), error = %e, "writing AgentRestore status failed");
            }
        }
    }

    /// Picks the backup: Ready (the sidecar may fetch it; the copy is verified when it is
    /// served, primary first, then the secondary) or Failed. Nothing is hashed here, so that
    /// many AgentRestores cannot stall the manager.
    async fn prepare_restore(
        &self,
        restore: &AgentRestore,
        namespace: &str,
        stores: &HashMap<String, Option<Arc<Stores>>>,
    ) -> serde_json::Value {
        let failed = |message: String| serde_json::json!({"phase": RestorePhase::Failed, "message": message, "completedAt": now_rfc3339(), "observedGeneration": restore.metadata.generation});
        let agent_id = format!("{namespace}/{}", restore.spec.agent);
        let catalog = &self.service.engine.catalog;
        let uid = self.namespace_uid(namespace).await;
        let version = match &restore.spec.backup {
            Some(backup) => match catalog.get(&format!("{namespace}/{backup}")) {
                Ok(Some(v)) if v.agent_id == agent_id => v,
                Ok(Some(_)) => return failed(format!("backup {backup} belongs to another Agent")),
                Ok(None) => {
                    return failed(format!(
                        "backup {backup} is not a Completed backup in the catalog"
                    ));
                }
                Err(e) => return failed(format!("catalog: {e}")),
            },
            None => match catalog.list(&agent_id) {
                Ok(list) => match list
                    .into_iter()
                    .find(|v| crate::api::backups::same_namespace(v, uid.as_deref()))
                {
                    Some(v) => v,
                    None => {
                        return failed(format!(
                            "Agent {} has no Completed backup",
                            restore.spec.agent
                        ));
                    }
                },
                Err(e) => return failed(format!("catalog: {e}")),
            },
        };
        let backup = version
            .id
            .split_once('/')
            .map_or(version.id.clone(), |(_, b)| b.to_string());
        if !crate::api::backups::same_namespace(&version, uid.as_deref()) {
            return failed(format!(
                "backup {backup} was made in an earlier namespace named {namespace} (deleted since); it is never restored into another namespace"
            ));
        }
        if !matches!(stores.get(&version.location), Some(Some(_))) {
            // Not final: tried again on the next pass.
            return serde_json::json!({"phase": RestorePhase::New, "backup": backup,
                "message": format!("waiting for BackupLocation {} to be Available", version.location)});
        }
        serde_json::json!({
            "phase": RestorePhase::Ready,
            "backup": backup,
            "blake3": version.blake3,
            "observedGeneration": restore.metadata.generation,
            "message": "waiting for the agent's sidecar; the copy is verified as it is served",
        })
    }

    /// GFS retention over the Agent's catalogued backups.
    async fn retain(&self, agent: &Agent, stores: &Stores, versions: &[BackupVersion]) {
        let Some(spec) = &agent.spec.backup else {
            return;
        };
        let Some(namespace) = agent.namespace() else {
            return;
        };
        let candidates: Vec<Candidate> = versions
            .iter()
            .filter_map(|v| {
                Some(Candidate {
                    id: v.id.clone(),
                    created: parse_time(&v.created_at)?,
                })
            })
            .collect();
        let plan = retention::plan(&spec.retention_policy(), &candidates);
        // Backups an unfinished AgentRestore will read stay until it is done.
        let restoring: std::collections::HashSet<String> = self
            .service
            .restores
            .state()
            .iter()
            .filter(|r| r.namespace().as_deref() == Some(namespace.as_str()))
            .filter(|r| {
                !matches!(
                    r.status.as_ref().and_then(|s| s.phase),
                    Some(RestorePhase::Completed | RestorePhase::Failed)
                )
            })
            .flat_map(|r| {
                [
                    r.spec.backup.clone(),
                    r.status.as_ref().and_then(|s| s.backup.clone()),
                ]
            })
            .flatten()
            .map(|b| format!("{namespace}/{b}"))
            .collect();
        for id in plan.delete {
            let Some(version) = versions.iter().find(|v| v.id == id) else {
                continue;
            };
            // Only copies in the stores at hand (a backup in an earlier location waits for
            // `agentry backup purge`), not locked, not being restored.
            if version.location != stores.location
                || locked(stores, version)
                || restoring.contains(&id)
            {
                continue;
            }
            match self.service.engine.delete(stores, version).await {
                Ok(()) => {
                    let backup = id.split_once('/').map_or(id.as_str(), |(_, b)| b);
                    let api: Api<AgentBackup> =
                        Api::namespaced(self.service.client.clone(), &namespace);
                    match api.delete(backup, &DeleteParams::default()).await {
                        Ok(_) | Err(kube::Error::Api(_)) => {}
                        Err(e) => {
                            tracing::warn!(backup = %id, error = %e, "deleting the AgentBackup failed")
                        }
                    }
                    tracing::info!(backup = %id, "retention deleted a backup (both copies and its catalog row)");
                }
                Err(e) => {
                    tracing::warn!(backup = %id, error = %e, "retention could not delete a backup; retrying later")
                }
            }
        }
    }

    /// An Agent whose `spec.backup` was removed: drops the `status.backup` and `BackupHealthy`
    /// this manager wrote (an empty apply under its field manager releases them).
    async fn release(&self, agent: &Agent) {
        let status = agent.status.as_ref();
        let ours = status.is_some_and(|s| {
            s.backup.is_some() || s.conditions.iter().any(|c| c.type_ == BACKUP_HEALTHY)
        });
        let (Some(namespace), true) = (agent.namespace(), ours) else {
            return;
        };
        // Once per generation: fields another manager owns would not go, and must not be
        // asked for again on every pass.
        let key = (agent.uid().unwrap_or_default(), agent.metadata.generation);
        if !self.memory().released.insert(key) {
            return;
        }
        let patch = serde_json::json!({
            "apiVersion": Agent::api_version(&()),
            "kind": Agent::kind(&()),
            "status": {},
        });
        let api: Api<Agent> = Api::namespaced(self.service.client.clone(), &namespace);
        if let Err(e) = api
            .patch_status(
                &agent.name_any(),
                &PatchParams::apply(BACKUP_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            tracing::debug!(agent = %agent.name_any(), error = %e, "releasing the backup status failed");
        }
        self.memory()
            .written
            .remove(&agent.uid().unwrap_or_default());
    }

    /// Writes `status.backup` and `BackupHealthy` when they changed.
    async fn report(
        &self,
        agent: &Agent,
        mine: &[Arc<AgentBackup>],
        latest: Option<BackupVersion>,
        available: bool,
        next: Option<String>,
    ) {
        let Some(namespace) = agent.namespace() else {
            return;
        };
        let name = agent.name_any();
        let agent_id = format!("{namespace}/{name}");
        let pending_secondary = mine.iter().find(|b| {
            b.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::PartiallyFailed)
        });
        let newest_final = mine
            .iter()
            .filter(|b| {
                b.status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(BackupPhase::is_final)
            })
            .max_by_key(|b| b.metadata.creation_timestamp.as_ref().map(|t| t.0));
        let (status, reason, message) = if !available {
            let location = agent
                .spec
                .backup
                .as_ref()
                .map(|b| b.location.clone())
                .unwrap_or_default();
            (
                "False",
                "LocationUnavailable",
                format!(
                    "BackupLocation {location} is not Available; backups wait and retention is paused"
                ),
            )
        } else if let Some(b) = pending_secondary {
            (
                "False",
                "SecondaryPending",
                format!(
                    "backup {} is only in the primary store; the copy to the secondary is being retried",
                    b.name_any()
                ),
            )
        } else if let Some(b) = newest_final
            .filter(|b| b.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Failed))
        {
            let why = b
                .status
                .as_ref()
                .and_then(|s| s.error.clone())
                .unwrap_or_default();
            (
                "False",
                "LastBackupFailed",
                format!("backup {} failed: {why}", b.name_any()),
            )
        } else if let Some(v) = &latest {
            (
                "True",
                "Healthy",
                format!(
                    "last backup {} verified in both stores",
                    v.id.split_once('/').map_or(v.id.as_str(), |(_, b)| b)
                ),
            )
        } else {
            (
                "True",
                "NoBackupYet",
                "no backup has completed yet".to_string(),
            )
        };
        let backup = BackupStatus {
            last_backup: latest.map(|v| LastBackup {
                id: v
                    .id
                    .split_once('/')
                    .map_or(v.id.clone(), |(_, b)| b.to_string()),
                time: v.created_at.clone(),
                blake3: v.blake3.clone(),
                size: i64::try_from(v.size).unwrap_or(i64::MAX),
                locations: v.objects.iter().map(|o| o.location.clone()).collect(),
            }),
            next_scheduled_time: next,
        };
        let key = serde_json::json!([backup, status, reason, message]);
        let uid = agent.uid().unwrap_or_default();
        if self.memory().written.get(&uid) == Some(&key) {
            return;
        }
        let previous = agent
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == BACKUP_HEALTHY));
        let transition = match previous {
            Some(c) if c.status == status => c.last_transition_time.clone(),
            _ => Time(k8s_openapi::jiff::Timestamp::now()),
        };
        let condition = Condition {
            type_: BACKUP_HEALTHY.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time: transition,
            observed_generation: agent.metadata.generation,
        };
        let patch = serde_json::json!({
            "apiVersion": Agent::api_version(&()),
            "kind": Agent::kind(&()),
            "status": {"backup": backup, "conditions": [condition]},
        });
        let api: Api<Agent> = Api::namespaced(self.service.client.clone(), &namespace);
        match api
            .patch_status(
                &name,
                &PatchParams::apply(BACKUP_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(_) => {
                self.memory().written.insert(uid, key);
            }
            Err(e) => {
                tracing::warn!(agent = %agent_id, error = %e, "writing the Agent's backup status failed")
            }
        }
    }
}

/// Whether a copy of `version` is still under object lock (retention must not try it).
fn locked(stores: &Stores, version: &BackupVersion) -> bool {
    let days = stores.primary_lock_days.max(stores.secondary_lock_days);
    let Some(days) = days else { return false };
    let Some(created) = parse_time(&version.created_at) else {
        return true;
    };
    // Uploads are locked from their start, at most a few hours before `created_at` is taken;
    // a day's margin keeps retention from trying what the store must refuse.
    let until = created
        .checked_add(jiff::SignedDuration::from_hours(24 * (i64::from(days) + 1)))
        .unwrap_or(jiff::Timestamp::MAX);
    jiff::Timestamp::now() < until
}

/// The in-flight id (`namespace/backup`) of an archive key under `prefix`.
pub fn in_flight_id(prefix: &str, key: &str) -> String {
    let rest = key.strip_prefix(prefix).unwrap_or(key);
    let mut parts = rest.splitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(ns), Some(_agent), Some(file)) => {
            format!("{ns}/{}", file.strip_suffix(".tar.zst").unwrap_or(file))
        }
        _ => rest.to_string(),
    }
}

/// `agentry_agent_backups`, `agentry_backup_last_success_timestamp_seconds` and
/// `agentry_backup_store_available`, counted from the backup caches at each scrape.
pub fn count_backups(metrics: &crate::telemetry::Metrics, service: Arc<BackupService>) {
    use crate::telemetry::{AgentLabels, BackupLabels, StoreLabels};
    metrics.on_scrape(move |m| {
        m.backups.clear();
        m.backup_last_success.clear();
        for backup in service.backups.state() {
            let status = backup.status.clone().unwrap_or_default();
            let phase = status.phase.unwrap_or(BackupPhase::New);
            let location = status.location.clone().unwrap_or_default();
            m.backups
                .get_or_create(&BackupLabels {
                    location,
                    phase: phase.to_string(),
                })
                .inc();
            let completed = status.completed_at.as_deref().and_then(parse_time);
            if let (BackupPhase::Completed, Some(at)) = (phase, completed) {
                let labels = AgentLabels {
                    namespace: backup.namespace().unwrap_or_default(),
                    agent: backup.spec.agent.clone(),
                };
                let secs = at.as_millisecond() as f64 / 1000.0;
                let gauge = m.backup_last_success.get_or_create(&labels);
                if gauge.get() < secs {
                    gauge.set(secs);
                }
            }
        }
        m.backup_store_available.clear();
        for location in service.locations.state() {
            let status = location.status.clone().unwrap_or_default();
            for (store, s) in [("primary", status.primary), ("secondary", status.secondary)] {
                let labels = StoreLabels {
                    location: location.name_any(),
                    store,
                };
                let up = s.is_some_and(|s| s.available);
                m.backup_store_available
                    .get_or_create(&labels)
                    .set(up as i64);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_keys_map_back_to_backups() {
        let key =
            crate::backup::engine::archive_name("team-a", "summarizer", "summarizer-202611291500");
        assert_eq!(
            in_flight_id("agentry/", &format!("agentry/{key}")),
            "team-a/summarizer-202611291500"
        );
    }
}
