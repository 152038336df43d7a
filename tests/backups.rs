//! Backups end to end: the real apiserver, the controller binary, and the two real S3 servers
//! `make test` starts (versitygw primary, SeaweedFS secondary in B2 checksum mode). Pods do not
//! run on the local control plane (kwok), so each test runs `agentry sidecar` as a local process
//! over the Agent's real identity files, as the agent's pod would.
//!
//! Stores are reached through a TCP proxy per test, so a test can take "its" primary or
//! secondary down, or slow it, without touching the shared servers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use agentry::backup::catalog::Catalog;
use agentry::backup::store::{S3Store, StoreConfig};
use agentry::crd::{Agent, AgentBackup, AgentRestore, BackupLocation, BackupPhase, RestorePhase};

mod common;
use common::s3::{pseudo_random, python_blake3, stores};
use common::*;

/// A loopback TCP proxy in front of one store: `down` refuses and cuts connections,
/// `throttle` limits bytes per second each way (0: unlimited).
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    throttle: Arc<AtomicU64>,
    generation: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (up, throttle, generation) = (
            Arc::new(AtomicBool::new(true)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let (u, t, g) = (up.clone(), throttle.clone(), generation.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !u.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let (t, g, target) = (t.clone(), g.clone(), target.clone());
                let born = g.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let a = pump(ri, wo, t.clone(), g.clone(), born);
                    let b = pump(ro, wi, t, g, born);
                    let _ = tokio::join!(a, b);
                });
            }
        });
        Self {
            port,
            up,
            throttle,
            generation,
            task,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            // Cut every open connection.
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    throttle: Arc<AtomicU64>,
    generation: Arc<AtomicU64>,
    born: u64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if generation.load(Ordering::SeqCst) != born {
            return;
        }
        let n = match tokio::time::timeout(Duration::from_millis(200), from.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
            Err(_) => continue,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        let rate = throttle.load(Ordering::SeqCst);
        if rate > 0 {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
    }
}

/// One test's backup world: namespace, controller, credentials, BackupLocation (through
/// proxies) and an Agent with backup permissions.
struct World {
    client: Client,
    ns: TestNamespace,
    controller: ControllerProcess,
    primary: StoreConfig,
    secondary: StoreConfig,
    primary_proxy: Proxy,
    secondary_proxy: Proxy,
    location: String,
    /// The agent's state, as the pod's volume would hold it.
    state: tempfile::TempDir,
    identity: tempfile::TempDir,
}

const AGENT: &str = "keeper";

fn controller_args() -> Vec<String> {
    [
        "--backup-interval",
        "1s",
        "--backup-location-check",
        "2s",
        "--backup-retry-base",
        "1s",
        "--backup-pickup-timeout",
        "10m",
    ]
    .map(String::from)
    .to_vec()
}

impl World {
    async fn new(prefix: &str, agent_overrides: Value) -> Self {
        Self::with_primary(prefix, agent_overrides, None, json!({})).await
    }

    /// `bucket`: another primary bucket; `primary_spec`: more fields of the primary's spec.
    async fn with_primary(
        prefix: &str,
        agent_overrides: Value,
        bucket: Option<&str>,
        primary_spec: Value,
    ) -> Self {
        let (client, ns) = setup(prefix).await;
        // Restoring needs backup:read, which namespaces do not allow by default.
        Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
            .patch(
                &ns.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {
                    "agentry.dev/allowed-permissions": "backup:write backup:read memory:read"}}})),
            )
            .await
            .unwrap();
        let (mut primary, mut secondary) = stores();
        if let Some(bucket) = bucket {
            primary.bucket = bucket.to_string();
        }
        // Each test under its own prefix in the shared buckets.
        primary.prefix = format!("{}/", ns.name);
        secondary.prefix = format!("{}/", ns.name);
        let primary_proxy =
            Proxy::start(primary.endpoint.trim_start_matches("http://").into()).await;
        let secondary_proxy =
            Proxy::start(secondary.endpoint.trim_start_matches("http://").into()).await;
        let mut opts = ControllerOptions::new(&ns.name);
        opts.extra_args = controller_args();
        let controller = ControllerProcess::start(opts);
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
        for (name, cfg) in [
            ("agentry-backup-primary", &primary),
            ("agentry-backup-secondary", &secondary),
        ] {
            let secret: Secret = serde_json::from_value(json!({
                "metadata": {"name": name},
                "stringData": {"accessKeyId": cfg.access_key, "secretAccessKey": cfg.secret_key},
            }))
            .unwrap();
            secrets
                .create(&PostParams::default(), &secret)
                .await
                .unwrap();
        }
        let location = format!("loc-{}", ns.name);
        let store = |cfg: &StoreConfig, endpoint: String, secret: &str, mode: &str| {
            json!({
                "endpoint": endpoint, "region": cfg.region, "bucket": cfg.bucket,
                "prefix": cfg.prefix, "forcePathStyle": true, "checksumMode": mode,
                "credentials": {"name": secret},
            })
        };
        let mut primary_store = store(
            &primary,
            primary_proxy.endpoint(),
            "agentry-backup-primary",
            "WhenSupported",
        );
        merge(&mut primary_store, primary_spec);
        let bl: BackupLocation = serde_json::from_value(json!({
            "apiVersion": "agentry.dev/v1alpha1", "kind": "BackupLocation",
            "metadata": {"name": location, "labels": {LOCATION_LABEL: ns.name}},
            "spec": {
                "primary": primary_store,
                "secondary": store(&secondary, secondary_proxy.endpoint(), "agentry-backup-secondary", "WhenRequired"),
            }
        }))
        .unwrap();
        Api::<BackupLocation>::all(client.clone())
            .create(&PostParams::default(), &bl)
            .await
            .unwrap();
        let state = tempfile::tempdir().unwrap();
        let mut overrides = json!({"spec": {
            "permissions": ["backup:write", "backup:read"],
            "backup": {"schedule": "@yearly", "paths": [state.path().join("data")], "location": location},
        }});
        merge(&mut overrides, agent_overrides);
        let world = Self {
            client,
            ns,
            controller,
            primary,
            secondary,
            primary_proxy,
            secondary_proxy,
            location,
            state,
            identity: tempfile::tempdir().unwrap(),
        };
        create_agent(
            &world.client,
            &world.ns.name,
            agent_manifest(AGENT, overrides),
        )
        .await
        .expect("creating the Agent");
        wait_agent(
            &world.client,
            &world.ns.name,
            AGENT,
            Duration::from_secs(90),
            "identity",
            identity_issued,
        )
        .await;
        wait_api(&world.controller).await;
        world.wait_location("Available").await;
        world.write_identity().await;
        world
    }

    fn ns(&self) -> &str {
        &self.ns.name
    }

    async fn wait_location(&self, phase: &str) {
        eventually(
            Duration::from_secs(60),
            &format!("BackupLocation {} to be {phase}", self.location),
            || async { self.location_phase().await.as_deref() == Some(phase) },
        )
        .await;
    }

    async fn location_phase(&self) -> Option<String> {
        Api::<BackupLocation>::all(self.client.clone())
            .get(&self.location)
            .await
            .ok()
            .and_then(|l| l.status)
            .and_then(|s| s.phase)
    }

    /// The identity Secret's files, where the sidecar reads them (as the kubelet mounts them).
    async fn write_identity(&self) {
        let files = agent_files(&self.client, self.ns(), AGENT).await;
        let ca = api_ca(&self.client, self.ns()).await;
        for (name, content) in [
            ("tls.crt", &files.cert_pem),
            ("tls.key", &files.key_pem),
            ("ca.crt", &ca),
            ("token", &files.token),
        ] {
            std::fs::write(self.identity.path().join(name), content).unwrap();
        }
    }

    /// `agentry sidecar` as a local process over the Agent's identity files.
    fn sidecar(&self) -> KillOnDrop {
        let log = self
            .identity
            .path()
            .join(format!("sidecar-{}.log", rand::random::<u32>()));
        KillOnDrop(
            std::process::Command::new(env!("CARGO_BIN_EXE_agentry"))
                .args([
                    "sidecar",
                    "--api",
                    &self.controller.api_url(),
                    "--identity-dir",
                ])
                .arg(self.identity.path())
                .args([
                    "--id",
                    &format!("{}/{AGENT}", self.ns()),
                    "--poll",
                    "1s",
                    "--backup-poll",
                    "1s",
                    "--listen",
                    &format!("127.0.0.1:{}", free_port()),
                    "--scratch-dir",
                ])
                .arg(self.identity.path())
                .env("RUST_LOG", "info,agentry=debug")
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
                .spawn()
                .unwrap(),
        )
    }

    /// What every sidecar this test ran logged.
    fn sidecar_logs(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.identity.path()).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("sidecar-") && name.ends_with(".err") {
                out.push_str(&format!("--- {name}\n"));
                out.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        out
    }

    fn data(&self) -> PathBuf {
        self.state.path().join("data")
    }

    async fn create_backup(&self, name: &str) {
        let b: AgentBackup = serde_json::from_value(json!({
            "apiVersion": "agentry.dev/v1alpha1", "kind": "AgentBackup",
            "metadata": {"name": name}, "spec": {"agent": AGENT},
        }))
        .unwrap();
        Api::<AgentBackup>::namespaced(self.client.clone(), self.ns())
            .create(&PostParams::default(), &b)
            .await
            .unwrap();
    }

    async fn backup(&self, name: &str) -> AgentBackup {
        Api::<AgentBackup>::namespaced(self.client.clone(), self.ns())
            .get(name)
            .await
            .unwrap()
    }

    async fn wait_backup(&self, name: &str, phases: &[BackupPhase]) -> AgentBackup {
        let api: Api<AgentBackup> = Api::namespaced(self.client.clone(), self.ns());
        let mut last = None;
        for _ in 0..240 {
            if let Ok(b) = api.get(name).await {
                let phase = b.status.as_ref().and_then(|s| s.phase);
                if phase.is_some_and(|p| phases.contains(&p)) {
                    return b;
                }
                last = Some(b);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!(
            "AgentBackup {name} never reached {phases:?}: {:?}\n{}\nsidecars:\n{}",
            last.and_then(|b| b.status),
            self.controller.logs(),
            self.sidecar_logs()
        );
    }

    async fn restore(&self, name: &str, backup: Option<&str>) -> AgentRestore {
        let r: AgentRestore = serde_json::from_value(json!({
            "apiVersion": "agentry.dev/v1alpha1", "kind": "AgentRestore",
            "metadata": {"name": name}, "spec": {"agent": AGENT, "backup": backup},
        }))
        .unwrap();
        let api: Api<AgentRestore> = Api::namespaced(self.client.clone(), self.ns());
        api.create(&PostParams::default(), &r).await.unwrap();
        let mut last = None;
        for _ in 0..240 {
            let r = api.get(name).await.unwrap();
            let phase = r.status.as_ref().and_then(|s| s.phase);
            if matches!(phase, Some(RestorePhase::Completed | RestorePhase::Failed)) {
                return r;
            }
            last = Some(r);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!(
            "AgentRestore {name} never finished: {:?}\n{}\nsidecars:\n{}",
            last.and_then(|r| r.status),
            self.controller.logs(),
            self.sidecar_logs()
        );
    }

    /// The controller's catalog (opened beside it: SQLite WAL allows a second reader).
    fn catalog(&self) -> Catalog {
        Catalog::open(&self.controller.data_dir()).unwrap()
    }

    async fn pending_uploads(&self) -> usize {
        let mut n = 0;
        for cfg in [&self.primary, &self.secondary] {
            n += S3Store::new(cfg).pending_uploads().await.unwrap().len();
        }
        n
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let (client, name) = (self.client.clone(), self.location.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let _ = Api::<BackupLocation>::all(client)
                    .delete(&name, &DeleteParams::default())
                    .await;
            });
        })
        .join();
    }
}

struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes a small tree of state: nested files, an empty file and `big` random bytes.
fn write_state(root: &Path, big: usize, seed: u64) -> Vec<(PathBuf, Vec<u8>)> {
    let files = vec![
        (
            root.join("memory.json"),
            format!("{{\"seed\":{seed}}}").into_bytes(),
        ),
        (root.join("notes/empty"), Vec::new()),
        (
            root.join("notes/deep/log.txt"),
            b"line one\nline two\n".repeat(100),
        ),
        (root.join("blob.bin"), pseudo_random(big, seed)),
    ];
    for (path, bytes) in &files {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_is_verified_in_both_stores_catalogued_and_restored_byte_for_byte() {
    let w = World::new("bk-round", json!({})).await;
    let files = write_state(&w.data(), 3 * 1024 * 1024 + 7, 1);
    let _sidecar = w.sidecar();
    w.create_backup("first").await;
    let b = w
        .wait_backup(
            "first",
            &[
                BackupPhase::Completed,
                BackupPhase::Failed,
                BackupPhase::PartiallyFailed,
            ],
        )
        .await;
    let s = b.status.clone().unwrap();
    assert_eq!(
        s.phase,
        Some(BackupPhase::Completed),
        "{s:?}\n{}",
        w.controller.logs()
    );
    let blake3 = s.blake3.clone().unwrap();
    assert_eq!(s.objects.len(), 2, "{s:?}");

    // Identical bytes in both stores, checked independently (boto3 + Python blake3), through
    // the recorded version ids.
    for (o, cfg) in s.objects.iter().zip([&w.primary, &w.secondary]) {
        assert_eq!(
            o.location,
            if std::ptr::eq(cfg, &w.primary) {
                "primary"
            } else {
                "secondary"
            }
        );
        assert_eq!(
            python_blake3(cfg, &o.key, o.version_id.as_deref()),
            blake3,
            "{o:?}"
        );
    }

    // The catalog: the row, and the seed's agent_backups table.
    let catalog = w.catalog();
    let row = catalog
        .get(&format!("{}/first", w.ns()))
        .unwrap()
        .expect("catalogued");
    assert_eq!(row.blake3, blake3);
    assert_eq!(row.agent_id, format!("{}/{AGENT}", w.ns()));
    assert!(row.verified_at.is_some());

    // The Agent's status and its BackupHealthy condition.
    eventually(
        Duration::from_secs(30),
        "status.backup.lastBackup",
        || async {
            let a: Agent = Api::namespaced(w.client.clone(), w.ns())
                .get(AGENT)
                .await
                .unwrap();
            let st = a.status.unwrap_or_default();
            st.backup
                .and_then(|b| b.last_backup)
                .is_some_and(|l| l.id == "first" && l.blake3 == blake3)
                && st
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "BackupHealthy" && c.status == "True")
        },
    )
    .await;

    // A tenant who resets the AgentBackup to New cannot make it take other bytes: a
    // catalogued backup is never written again.
    std::fs::write(w.data().join("memory.json"), b"tampered").unwrap();
    Api::<AgentBackup>::namespaced(w.client.clone(), w.ns())
        .patch_status(
            "first",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "New"}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        w.catalog()
            .get(&format!("{}/first", w.ns()))
            .unwrap()
            .unwrap()
            .blake3,
        blake3
    );
    // The catalog, not the status, decides: the controller puts it back to Completed.
    w.wait_backup("first", &[BackupPhase::Completed]).await;
    std::fs::write(&files[0].0, &files[0].1).unwrap();

    // Change the state, then restore: every byte comes back.
    std::fs::remove_dir_all(w.data().join("notes")).unwrap();
    std::fs::write(w.data().join("memory.json"), b"overwritten").unwrap();
    std::fs::write(w.data().join("stray"), b"not in the backup").unwrap();
    let r = w.restore("back", Some("first")).await;
    let rs = r.status.unwrap();
    assert_eq!(rs.phase, Some(RestorePhase::Completed), "{rs:?}");
    assert_eq!(rs.source.as_deref(), Some("primary"));
    for (path, bytes) in &files {
        assert_eq!(&std::fs::read(path).unwrap(), bytes, "{}", path.display());
    }
    assert!(
        w.catalog()
            .get(&format!("{}/first", w.ns()))
            .unwrap()
            .unwrap()
            .restored_at
            .is_some()
    );

    // A byte flipped in the primary copy (bit rot under the store): detected, and the
    // restore uses the secondary.
    let env = common::s3::env();
    let on_disk = PathBuf::from(&env["AGENTRY_S3_PRIMARY_DATA_DIR"])
        .join(&w.primary.bucket)
        .join(&s.objects[0].key);
    let mut bytes =
        std::fs::read(&on_disk).unwrap_or_else(|e| panic!("{}: {e}", on_disk.display()));
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&on_disk, &bytes).unwrap();
    std::fs::write(w.data().join("memory.json"), b"overwritten again").unwrap();
    let r = w.restore("after-rot", None).await;
    let rs = r.status.unwrap();
    assert_eq!(rs.phase, Some(RestorePhase::Completed), "{rs:?}");
    assert_eq!(rs.source.as_deref(), Some("secondary"), "{rs:?}");
    assert!(
        w.controller
            .logs()
            .contains("serving a restore from the copy that verified"),
        "the bad primary copy is reported"
    );
    assert_eq!(std::fs::read(&files[0].0).unwrap(), files[0].1);

    // `agentry backup scrub` finds the bad copy and repairs it from the good one.
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_agentry"))
            .arg("backup")
            .args(args)
            .args([
                "--data-dir",
                w.controller.data_dir().to_str().unwrap(),
                "--location",
                &w.location,
                "--controller-namespace",
                w.ns(),
            ])
            .output()
            .unwrap()
    };
    let out = cli(&["scrub"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("REPAIRED") && text.contains("1 repaired"),
        "{text}"
    );
    let out = cli(&["verify", "-n", w.ns(), "first"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = cli(&["scrub"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 healthy"));

    // Losing the catalog loses nothing: reindex rebuilds it from the stores' manifests.
    let data_dir = w.controller.data_dir();
    let before = w
        .catalog()
        .get(&format!("{}/first", w.ns()))
        .unwrap()
        .unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args([
            "backup",
            "reindex",
            "--data-dir",
            fresh.path().to_str().unwrap(),
            "--location",
            &w.location,
            "--controller-namespace",
            w.ns(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rebuilt = Catalog::open(fresh.path())
        .unwrap()
        .get(&format!("{}/first", w.ns()))
        .unwrap()
        .expect("reindexed");
    assert_eq!(
        (rebuilt.blake3, rebuilt.size, rebuilt.agent_id),
        (before.blake3, before.size, before.agent_id)
    );
    let _ = data_dir;

    // Turning backups off drops what the backup manager wrote on the Agent.
    let agents: Api<Agent> = Api::namespaced(w.client.clone(), w.ns());
    agents
        .patch(
            AGENT,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"backup": null}})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "status.backup and BackupHealthy to go with spec.backup",
        || async {
            let st = agents.get(AGENT).await.unwrap().status.unwrap_or_default();
            st.backup.is_none() && !st.conditions.iter().any(|c| c.type_ == "BackupHealthy")
        },
    )
    .await;

    // Deleting the Agent leaves its backups (until retention or `agentry backup purge`).
    Api::<Agent>::namespaced(w.client.clone(), w.ns())
        .delete(AGENT, &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        w.catalog()
            .get(&format!("{}/first", w.ns()))
            .unwrap()
            .is_some()
    );
    assert_eq!(
        python_blake3(
            &w.secondary,
            &s.objects[1].key,
            s.objects[1].version_id.as_deref()
        ),
        blake3
    );

    // `agentry backup ls` lists it; `purge` lists first, then (with --yes) deletes both
    // copies, the catalog row and the AgentBackup.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args(["backup", "ls", "-n", w.ns()])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        listed.contains("first") && listed.contains("Completed") && listed.contains(&blake3[..16]),
        "{listed}"
    );
    let out = cli(&["purge", "-n", w.ns(), "--agent", AGENT]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("would delete"));
    assert!(
        w.catalog()
            .get(&format!("{}/first", w.ns()))
            .unwrap()
            .is_some()
    );
    let out = cli(&["purge", "-n", w.ns(), "--agent", AGENT, "--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        w.catalog()
            .get(&format!("{}/first", w.ns()))
            .unwrap()
            .is_none()
    );
    for cfg in [&w.primary, &w.secondary] {
        let left = S3Store::new(cfg).list("").await.unwrap();
        assert!(left.is_empty(), "{left:?}");
    }
    assert!(
        Api::<AgentBackup>::namespaced(w.client.clone(), w.ns())
            .get_opt("first")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_that_fails_never_yields_a_completed_or_catalogued_backup() {
    let w = World::new("bk-down", json!({})).await;
    write_state(&w.data(), 256 * 1024, 2);
    let mut sidecar = w.sidecar();

    // The primary goes down: the location turns Unavailable; a backup asked for meanwhile is
    // never Completed and nothing is catalogued.
    w.primary_proxy.set_up(false);
    w.wait_location("Unavailable").await;
    w.create_backup("while-down").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let b = w.backup("while-down").await;
    assert_ne!(b.status.and_then(|s| s.phase), Some(BackupPhase::Completed));
    assert!(
        w.catalog()
            .get(&format!("{}/while-down", w.ns()))
            .unwrap()
            .is_none()
    );
    eventually(
        Duration::from_secs(30),
        "BackupHealthy=False (LocationUnavailable)",
        || async {
            let a: Agent = Api::namespaced(w.client.clone(), w.ns())
                .get(AGENT)
                .await
                .unwrap();
            a.status.unwrap_or_default().conditions.iter().any(|c| {
                c.type_ == "BackupHealthy"
                    && c.status == "False"
                    && c.reason == "LocationUnavailable"
            })
        },
    )
    .await;

    // Back up: the waiting backup goes through.
    w.primary_proxy.set_up(true);
    w.wait_location("Available").await;
    let b = w
        .wait_backup("while-down", &[BackupPhase::Completed, BackupPhase::Failed])
        .await;
    assert_eq!(b.status.unwrap().phase, Some(BackupPhase::Completed));

    // The primary dies in the middle of an upload (slowed so it is mid-way): Failed, nothing
    // catalogued, no multipart upload left behind.
    write_state(&w.data(), 24 * 1024 * 1024, 3);
    w.primary_proxy
        .throttle
        .store(4 * 1024 * 1024, Ordering::SeqCst);
    w.create_backup("cut").await;
    w.wait_backup("cut", &[BackupPhase::InProgress]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    w.primary_proxy.set_up(false);
    let b = w
        .wait_backup(
            "cut",
            &[
                BackupPhase::Failed,
                BackupPhase::Completed,
                BackupPhase::PartiallyFailed,
            ],
        )
        .await;
    let st = b.status.unwrap();
    assert_eq!(st.phase, Some(BackupPhase::Failed), "{st:?}");
    assert!(st.error.unwrap_or_default().contains("primary"));
    assert!(
        w.catalog()
            .get(&format!("{}/cut", w.ns()))
            .unwrap()
            .is_none()
    );
    w.primary_proxy.throttle.store(0, Ordering::SeqCst);
    w.primary_proxy.set_up(true);
    eventually(
        Duration::from_secs(90),
        "no multipart upload left in either store",
        || async { w.pending_uploads().await == 0 },
    )
    .await;

    // The secondary fails: PartiallyFailed (in the primary, verified), BackupHealthy=False,
    // retried with backoff until the secondary is back; only then Completed and catalogued.
    w.secondary_proxy.set_up(false);
    // Re-validation would mark the location Unavailable; the upload races it on purpose.
    w.create_backup("half").await;
    // Either the upload gets there first (PartiallyFailed: in the primary only) or the
    // re-validation does (the location Unavailable: the backup waits, New, asking again).
    eventually(
        Duration::from_secs(120),
        "half PartiallyFailed, or New while the location is Unavailable",
        || async {
            let phase = w.backup("half").await.status.and_then(|s| s.phase);
            match phase {
                Some(
                    BackupPhase::PartiallyFailed | BackupPhase::Completed | BackupPhase::Failed,
                ) => true,
                None | Some(BackupPhase::New) => {
                    w.location_phase().await.as_deref() == Some("Unavailable")
                }
                _ => false,
            }
        },
    )
    .await;
    let b = w.backup("half").await;
    let phase = b.status.as_ref().and_then(|s| s.phase);
    if phase == Some(BackupPhase::PartiallyFailed) {
        assert!(
            w.catalog()
                .get(&format!("{}/half", w.ns()))
                .unwrap()
                .is_none(),
            "not catalogued until both are verified"
        );
        eventually(
            Duration::from_secs(30),
            "BackupHealthy=False (SecondaryPending)",
            || async {
                let a: Agent = Api::namespaced(w.client.clone(), w.ns())
                    .get(AGENT)
                    .await
                    .unwrap();
                a.status
                    .unwrap_or_default()
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "BackupHealthy" && c.status == "False")
            },
        )
        .await;
    } else {
        // The location was found Unavailable first: the backup waits (New) instead.
        assert_ne!(phase, Some(BackupPhase::Completed), "{:?}", b.status);
    }
    w.secondary_proxy.set_up(true);
    let b = w.wait_backup("half", &[BackupPhase::Completed]).await;
    let st = b.status.unwrap();
    assert_eq!(st.objects.len(), 2);
    let blake3 = st.blake3.unwrap();
    assert_eq!(
        python_blake3(
            &w.secondary,
            &st.objects[1].key,
            st.objects[1].version_id.as_deref()
        ),
        blake3
    );
    assert!(
        w.catalog()
            .get(&format!("{}/half", w.ns()))
            .unwrap()
            .is_some()
    );
    sidecar.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_killed_midway_leave_no_catalog_row_and_no_multipart_upload() {
    let w = World::new("bk-kill", json!({})).await;
    write_state(&w.data(), 24 * 1024 * 1024, 4);
    // Slow the primary so the upload is in flight when the processes die.
    w.primary_proxy
        .throttle
        .store(2 * 1024 * 1024, Ordering::SeqCst);

    // SIGKILL of the sidecar mid-upload: the API sees the body end early.
    let mut sidecar = w.sidecar();
    w.create_backup("sidecar-dies").await;
    w.wait_backup("sidecar-dies", &[BackupPhase::InProgress])
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    sidecar.kill();
    let b = w
        .wait_backup(
            "sidecar-dies",
            &[BackupPhase::Failed, BackupPhase::Completed],
        )
        .await;
    let st = b.status.unwrap();
    assert_eq!(st.phase, Some(BackupPhase::Failed), "{st:?}");
    assert!(
        w.catalog()
            .get(&format!("{}/sidecar-dies", w.ns()))
            .unwrap()
            .is_none()
    );
    eventually(
        Duration::from_secs(60),
        "the aborted upload is gone",
        || async { w.pending_uploads().await == 0 },
    )
    .await;

    // SIGKILL of the controller mid-upload: the next leader marks the backup Failed and
    // aborts the multipart uploads the dead one left.
    let mut sidecar = w.sidecar();
    w.create_backup("controller-dies").await;
    w.wait_backup("controller-dies", &[BackupPhase::InProgress])
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let data_dir = w.controller.data_dir();
    kill_controller(&w);
    sidecar.kill();
    let mut opts = ControllerOptions::new(w.ns());
    opts.extra_args = controller_args();
    opts.replica = "replica-b";
    opts.data_dir = Some(&data_dir);
    assert!(
        w.pending_uploads().await > 0,
        "the dead controller left its multipart upload"
    );
    let _next = ControllerProcess::start(opts);
    let b = w
        .wait_backup(
            "controller-dies",
            &[BackupPhase::Failed, BackupPhase::Completed],
        )
        .await;
    let st = b.status.unwrap();
    assert_eq!(st.phase, Some(BackupPhase::Failed), "{st:?}");
    assert!(st.error.unwrap_or_default().contains("interrupted"));
    assert!(
        Catalog::open(&data_dir)
            .unwrap()
            .get(&format!("{}/controller-dies", w.ns()))
            .unwrap()
            .is_none()
    );
    eventually(
        Duration::from_secs(60),
        "the orphaned multipart upload is aborted",
        || async { w.pending_uploads().await == 0 },
    )
    .await;
}

/// SIGKILL of a World's controller (no graceful release).
fn kill_controller(w: &World) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &w.controller.child.id().to_string()])
        .status();
    std::thread::sleep(Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_backup_requests_are_refused_with_clear_errors_and_change_nothing() {
    let w = World::new("bk-bad", json!({})).await;
    // A second agent in the namespace without backup scopes.
    create_agent(
        &w.client,
        w.ns(),
        agent_manifest("plain", json!({"spec": {"permissions": ["memory:read"]}})),
    )
    .await
    .expect("creating the second Agent");
    wait_agent(
        &w.client,
        w.ns(),
        "plain",
        Duration::from_secs(90),
        "identity",
        identity_issued,
    )
    .await;
    let mine = agent_files(&w.client, w.ns(), AGENT).await;
    let plain = agent_files(&w.client, w.ns(), "plain").await;
    let ca = api_ca(&w.client, w.ns()).await;
    let me = api_client(&ca, Some((&mine.cert_pem, &mine.key_pem)));
    let other = api_client(&ca, Some((&plain.cert_pem, &plain.key_pem)));
    let base = w.controller.api_url();
    let ns = w.ns().to_string();
    w.create_backup("target").await;
    w.wait_backup("target", &[BackupPhase::New]).await;
    let put = |c: &reqwest::Client, token: &str, path: String, ct: &str, body: Vec<u8>| {
        c.put(format!("{base}{path}"))
            .bearer_auth(token)
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let check = |r: reqwest::Response, status: u16, field: Option<&'static str>| async move {
        let code = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(code, status, "{body}");
        if let Some(f) = field {
            assert_eq!(body["field"], f, "{body}");
        }
        assert!(
            !body["message"].as_str().unwrap_or_default().is_empty(),
            "{body}"
        );
    };
    let path = |agent: &str, id: &str| format!("/v1/agents/{ns}/{agent}/backups/{id}");
    // Without backup:write.
    check(
        put(
            &other,
            &plain.token,
            path("plain", "target"),
            "application/zstd",
            vec![1],
        )
        .await
        .unwrap(),
        403,
        Some("scope"),
    )
    .await;
    // Another agent's path, with my credentials.
    check(
        put(
            &me,
            &mine.token,
            path("plain", "target"),
            "application/zstd",
            vec![1],
        )
        .await
        .unwrap(),
        403,
        Some("path"),
    )
    .await;
    // My path with another agent's token: the token is bound to its own certificate.
    check(
        put(
            &me,
            &plain.token,
            path(AGENT, "target"),
            "application/zstd",
            vec![1],
        )
        .await
        .unwrap(),
        401,
        None,
    )
    .await;
    // A malformed id, a missing AgentBackup, the wrong media type.
    check(
        put(
            &me,
            &mine.token,
            path(AGENT, "Bad_ID"),
            "application/zstd",
            vec![1],
        )
        .await
        .unwrap(),
        400,
        Some("id"),
    )
    .await;
    check(
        put(
            &me,
            &mine.token,
            path(AGENT, "missing"),
            "application/zstd",
            vec![1],
        )
        .await
        .unwrap(),
        404,
        None,
    )
    .await;
    check(
        put(
            &me,
            &mine.token,
            path(AGENT, "target"),
            "application/json",
            b"{}".to_vec(),
        )
        .await
        .unwrap(),
        415,
        Some("content-type"),
    )
    .await;
    // An AgentBackup for another agent.
    let b: AgentBackup = serde_json::from_value(json!({"apiVersion": "agentry.dev/v1alpha1", "kind": "AgentBackup", "metadata": {"name": "for-plain"}, "spec": {"agent": "plain"}})).unwrap();
    Api::<AgentBackup>::namespaced(w.client.clone(), w.ns())
        .create(&PostParams::default(), &b)
        .await
        .unwrap();
    check(
        put(
            &me,
            &mine.token,
            path(AGENT, "for-plain"),
            "application/zstd",
            vec![1],
        )
        .await
        .unwrap(),
        403,
        Some("id"),
    )
    .await;
    // Reading another agent's backup, or one that does not exist.
    check(
        me.get(format!("{base}{}", path(AGENT, "nope")))
            .bearer_auth(&mine.token)
            .send()
            .await
            .unwrap(),
        404,
        None,
    )
    .await;
    check(
        other
            .get(format!("{base}{}", path("plain", "target")))
            .bearer_auth(&plain.token)
            .send()
            .await
            .unwrap(),
        403,
        Some("scope"),
    )
    .await;
    // An oversized and a malformed restore report.
    let report = format!("{base}/v1/agents/{ns}/{AGENT}/restores/r1");
    check(
        me.post(&report)
            .bearer_auth(&mine.token)
            .header("content-type", "application/json")
            .body(vec![b' '; 70 * 1024])
            .send()
            .await
            .unwrap(),
        413,
        None,
    )
    .await;
    check(
        me.post(&report)
            .bearer_auth(&mine.token)
            .header("content-type", "application/json")
            .body(r#"{"ok": true, "extra": 1}"#)
            .send()
            .await
            .unwrap(),
        400,
        None,
    )
    .await;
    // A backup made in an earlier namespace of the same name (another uid) is never served or
    // restored here.
    let mut ghost = w.catalog().list(&format!("{ns}/{AGENT}")).unwrap();
    assert!(ghost.is_empty());
    w.catalog()
        .record(&agentry::backup::catalog::BackupVersion {
            id: format!("{ns}/ghost"),
            agent_id: format!("{ns}/{AGENT}"),
            size: 1,
            blake3: "00".repeat(32),
            objects: vec![],
            created_at: "2026-01-01T00:00:00Z".into(),
            verified_at: None,
            restored_at: None,
            location: w.location.clone(),
            namespace_uid: Some("a-namespace-that-was-deleted".into()),
        })
        .unwrap();
    check(
        me.get(format!("{base}{}", path(AGENT, "ghost")))
            .bearer_auth(&mine.token)
            .send()
            .await
            .unwrap(),
        403,
        Some("id"),
    )
    .await;
    let r = w.restore("from-ghost", Some("ghost")).await.status.unwrap();
    assert_eq!(r.phase, Some(RestorePhase::Failed));
    assert!(r.message.unwrap_or_default().contains("earlier namespace"));
    w.catalog().delete(&format!("{ns}/ghost")).unwrap();
    ghost.clear();

    // Nothing changed: the AgentBackup is still New, nothing catalogued.
    assert_eq!(
        w.backup("target").await.status.and_then(|s| s.phase),
        Some(BackupPhase::New)
    );
    assert!(
        w.catalog()
            .list(&format!("{ns}/{AGENT}"))
            .unwrap()
            .is_empty()
    );

    // A tenant who may write AgentBackup status cannot make the controller copy another
    // agent's archive: a forged PartiallyFailed pointing elsewhere is refused.
    let api: Api<AgentBackup> = Api::namespaced(w.client.clone(), w.ns());
    let forged = json!({"status": {"phase": "PartiallyFailed", "location": w.location, "size": 1, "blake3": "00".repeat(32),
        "objects": [{"location": "primary", "key": format!("{}other-ns/victim/secret.tar.zst", w.primary.prefix)}]}});
    api.patch_status("for-plain", &PatchParams::default(), &Patch::Merge(&forged))
        .await
        .unwrap();
    let b = w
        .wait_backup("for-plain", &[BackupPhase::Failed, BackupPhase::Completed])
        .await;
    let st = b.status.unwrap();
    assert_eq!(st.phase, Some(BackupPhase::Failed));
    assert!(st.error.unwrap_or_default().contains("refusing"));
    assert!(
        w.catalog()
            .get(&format!("{ns}/for-plain"))
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_schedule_creates_one_backup_per_slot_and_retention_keeps_the_newest() {
    let mut w = World::new(
        "bk-sched",
        json!({"spec": {"backup": {"schedule": "* * * * *", "retention": {"keepLast": 2, "keepDaily": 0}}}}),
    )
    .await;
    write_state(&w.data(), 64 * 1024, 5);
    let mut sidecar = w.sidecar();
    let api: Api<AgentBackup> = Api::namespaced(w.client.clone(), w.ns());
    // The Agent says when the next run is.
    eventually(
        Duration::from_secs(30),
        "status.backup.nextScheduledTime",
        || async {
            let a: Agent = Api::namespaced(w.client.clone(), w.ns())
                .get(AGENT)
                .await
                .unwrap();
            a.status
                .and_then(|s| s.backup)
                .and_then(|b| b.next_scheduled_time)
                .is_some()
        },
    )
    .await;
    // Within a minute a scheduled backup appears, named after its slot, and completes.
    let mut scheduled = None;
    for _ in 0..150 {
        let list = api.list(&Default::default()).await.unwrap().items;
        if let Some(b) = list
            .into_iter()
            .find(|b| b.labels().contains_key("agentry.dev/scheduled"))
        {
            scheduled = Some(b);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let scheduled = scheduled.expect("a scheduled AgentBackup within 75s");
    let slot: jiff::Timestamp = scheduled.annotations()["agentry.dev/scheduled-for"]
        .parse()
        .unwrap();
    assert_eq!(
        scheduled.name_any(),
        agentry::backup::schedule::backup_name(AGENT, slot)
    );
    w.wait_backup(&scheduled.name_any(), &[BackupPhase::Completed])
        .await;

    // A controller restart (SIGKILL, then a new leader on the same data) makes no duplicate
    // for that slot.
    let data_dir = w.controller.data_dir();
    kill_controller(&w);
    let ns = w.ns().to_string();
    let mut opts = ControllerOptions::new(&ns);
    opts.extra_args = controller_args();
    opts.replica = "replica-b";
    opts.data_dir = Some(&data_dir);
    // The old process (dead) keeps its temporary data directory alive for the new one.
    let next = ControllerProcess::start(opts);
    let _dead = std::mem::replace(&mut w.controller, next);
    wait_api(&w.controller).await;
    // The sidecar follows the API to the new leader (a Service does that in a cluster).
    sidecar.kill();
    let _sidecar = w.sidecar();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let for_slot = api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|b| {
            b.annotations().get("agentry.dev/scheduled-for")
                == scheduled.annotations().get("agentry.dev/scheduled-for")
        })
        .count();
    assert_eq!(for_slot, 1, "one AgentBackup per slot, across restarts");
    // No more scheduled runs from here: the retention count below must not race one.
    Api::<Agent>::namespaced(w.client.clone(), w.ns())
        .patch(
            AGENT,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"backup": {"schedule": "@yearly"}}})),
        )
        .await
        .unwrap();

    // Retention (keepLast 2): after more Completed backups, only the newest two remain, in
    // the catalog, in both stores and as AgentBackups.
    for name in ["m1", "m2", "m3"] {
        api.create(&PostParams::default(), &serde_json::from_value(json!({"apiVersion": "agentry.dev/v1alpha1", "kind": "AgentBackup", "metadata": {"name": name}, "spec": {"agent": AGENT}})).unwrap()).await.unwrap();
        w.wait_backup(name, &[BackupPhase::Completed]).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let catalog = Catalog::open(&data_dir).unwrap();
    eventually(
        Duration::from_secs(90),
        "retention to keep exactly the newest two",
        || async {
            let list = catalog.list(&format!("{}/{AGENT}", w.ns())).unwrap();
            list.len() == 2
        },
    )
    .await;
    let kept: Vec<String> = catalog
        .list(&format!("{}/{AGENT}", w.ns()))
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    let all = api.list(&Default::default()).await.unwrap().items;
    let completed: Vec<String> = all
        .iter()
        .filter(|b| b.status.as_ref().and_then(|s| s.phase) == Some(BackupPhase::Completed))
        .map(|b| format!("{}/{}", w.ns(), b.name_any()))
        .collect();
    for id in &kept {
        assert!(
            completed.contains(id),
            "{id} kept in the catalog and as an AgentBackup"
        );
    }
    // Whatever retention deleted is gone from both stores.
    let listed = S3Store::new(&w.primary).list("").await.unwrap();
    let archives = listed
        .iter()
        .filter(|l| l.key.ends_with(".tar.zst"))
        .count();
    assert_eq!(archives, 2, "{listed:?}");
    let listed = S3Store::new(&w.secondary).list("").await.unwrap();
    assert_eq!(
        listed
            .iter()
            .filter(|l| l.key.ends_with(".tar.zst"))
            .count(),
        2,
        "{listed:?}"
    );
}

/// boto3 against the primary: creates a bucket with object lock on, or reads an object
/// version's retention (`MODE UNTIL`).
fn python_lock(cfg: &StoreConfig, action: &str, bucket: &str, key: &str, version: &str) -> String {
    let python = std::env::var("AGENTRY_PYTHON").unwrap_or("python3".into());
    let script = r#"
import sys, boto3
endpoint, access, secret, action, bucket, key, version = sys.argv[1:8]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id=access, aws_secret_access_key=secret,
                  config=boto3.session.Config(s3={"addressing_style": "path"}))
if action == "create":
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    print("created")
else:
    r = s3.get_object_retention(Bucket=bucket, Key=key, VersionId=version)["Retention"]
    print(r["Mode"], r["RetainUntilDate"].isoformat())
"#;
    let out = std::process::Command::new(python)
        .args([
            "-c",
            script,
            &cfg.endpoint,
            &cfg.access_key,
            &cfg.secret_key,
            action,
            bucket,
            key,
            version,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// objectLockDays: the primary copy is written in COMPLIANCE mode (read back independently with
/// boto3), the store itself refuses to delete it, and retention does not try: the backup stays
/// catalogued past keepLast.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn object_locked_copies_are_written_in_compliance_mode_and_kept_by_retention() {
    let (primary, _) = stores();
    let bucket = format!("agentry-locked-{:08x}", rand::random::<u32>());
    assert_eq!(python_lock(&primary, "create", &bucket, "", ""), "created");
    let w = World::with_primary(
        "bk-lock",
        json!({"spec": {"backup": {"retention": {"keepLast": 1, "keepDaily": 0}}}}),
        Some(&bucket),
        json!({"objectLockDays": 2}),
    )
    .await;
    write_state(&w.data(), 64 * 1024, 6);
    let _sidecar = w.sidecar();
    for name in ["locked-1", "locked-2"] {
        w.create_backup(name).await;
        let b = w
            .wait_backup(name, &[BackupPhase::Completed, BackupPhase::Failed])
            .await;
        let st = b.status.unwrap();
        assert_eq!(st.phase, Some(BackupPhase::Completed), "{st:?}");
        let primary_copy = &st.objects[0];
        let retention = python_lock(
            &w.primary,
            "retention",
            &bucket,
            &primary_copy.key,
            primary_copy.version_id.as_deref().unwrap(),
        );
        assert!(retention.starts_with("COMPLIANCE "), "{retention}");
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    // keepLast 1 would delete locked-1, but its primary copy is locked for 2 days.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let kept = w.catalog().list(&format!("{}/{AGENT}", w.ns())).unwrap();
    assert_eq!(
        kept.len(),
        2,
        "a locked backup is not deleted early: {kept:?}"
    );
    // And the store would have refused anyway.
    let old = &kept[1].objects[0];
    let refused = S3Store::new(&w.primary)
        .delete(&old.key, old.version_id.as_deref())
        .await;
    assert!(refused.is_err(), "the store enforces the lock");
}
