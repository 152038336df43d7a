//! The CA ledger survives losing the controller's node: real Litestream (hack/build-litestream)
//! replicating to the real versitygw store (hack/s3-stores), real controller processes.
//! - a controller killed with its data directory is restored from the replica with every
//!   serial and revocation, and the CRL number goes on above the last published one (and the
//!   replication lag is measured);
//! - the stale-ledger guard: a controller started on an older copy of the ledger issues nothing
//!   and publishes no CRL that would drop a revocation, until `--adopt-published-crl`;
//! - failover: a standby with its own empty volume restores the replica when it takes the
//!   Lease (`--on-lead-exec hack/ledger-restore`), then replicates (`--while-leading-exec`).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use agentry::crd::Agent;
use agentry::identity::authority::crl_numbers;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn litestream_bin() -> PathBuf {
    let out = Command::new(format!("{REPO}/hack/build-litestream"))
        .arg("--print-dir")
        .output()
        .expect("running hack/build-litestream --print-dir");
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("litestream");
    assert!(
        bin.exists(),
        "{} is missing: run hack/build-litestream (make test's .ci/run does)",
        bin.display()
    );
    bin
}

/// A Litestream replica of one controller installation: a fresh key prefix in the primary
/// versitygw bucket, configured by hack/litestream.yml.tmpl through its environment.
struct Replica {
    env: Vec<(String, String)>,
    bin: PathBuf,
    config: String,
}

impl Replica {
    fn new(tag: &str) -> Self {
        let s3 = common::s3::env();
        let get = |k: &str| {
            s3.get(k)
                .cloned()
                .unwrap_or_else(|| panic!("{k} missing from hack/s3-stores env (run `make s3-up`)"))
        };
        let bin = litestream_bin();
        let env = [
            ("LITESTREAM_BUCKET", get("AGENTRY_S3_PRIMARY_BUCKET")),
            (
                "LITESTREAM_PATH",
                format!("litestream-{tag}-{:08x}", rand::random::<u32>()),
            ),
            ("LITESTREAM_ENDPOINT", get("AGENTRY_S3_PRIMARY_ENDPOINT")),
            ("LITESTREAM_REGION", get("AWS_REGION")),
            ("LITESTREAM_FORCE_PATH_STYLE", "true".into()),
            ("LITESTREAM_SYNC_INTERVAL", "1s".into()),
            (
                "LITESTREAM_ACCESS_KEY_ID",
                get("AGENTRY_S3_PRIMARY_ACCESS_KEY"),
            ),
            (
                "LITESTREAM_SECRET_ACCESS_KEY",
                get("AGENTRY_S3_PRIMARY_SECRET_KEY"),
            ),
            ("LITESTREAM", bin.display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let config = format!("{REPO}/hack/litestream.yml.tmpl");
        Self { env, bin, config }
    }

    fn config(&self) -> &str {
        &self.config
    }

    /// The bucket prefix this replica writes under.
    fn path(&self) -> &str {
        &self
            .env
            .iter()
            .find(|(k, _)| k == "LITESTREAM_PATH")
            .unwrap()
            .1
    }

    /// `litestream <args>` for the controller whose data directory is `data_dir`.
    fn command(&self, data_dir: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("AGENTRY_DATA_DIR", data_dir)
            // See hack/build-litestream: litestream refuses to start with it set.
            .env_remove("AWS_CA_BUNDLE")
            .stdin(Stdio::null());
        c
    }

    /// The sidecar: `litestream replicate`, killed when dropped.
    fn replicate(&self, data_dir: &Path) -> Sidecar {
        let log = std::fs::File::create(data_dir.with_extension("litestream.log")).unwrap();
        let child = self
            .command(data_dir, &["replicate", "-config", self.config()])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting litestream replicate");
        Sidecar(child)
    }

    /// The init container: restore each database unless it exists, if a replica exists.
    fn restore_in_place(&self, data_dir: &Path) {
        for db in [ledger_path(data_dir), data_dir.join("catalog/catalog.db")] {
            let out = self
                .command(
                    data_dir,
                    &[
                        "restore",
                        "-config",
                        self.config(),
                        "-if-replica-exists",
                        "-if-db-not-exists",
                        db.to_str().unwrap(),
                    ],
                )
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// The ledger as the replica has it now (restored into a scratch file).
    fn replicated_ledger(&self, data_dir: &Path) -> Option<Ledger> {
        let out = data_dir.with_extension("probe.db");
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", out.display()));
        }
        let db = ledger_path(data_dir);
        let status = self
            .command(
                data_dir,
                &[
                    "restore",
                    "-config",
                    self.config(),
                    "-if-replica-exists",
                    "-o",
                    out.to_str().unwrap(),
                    db.to_str().unwrap(),
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        (status.success() && out.exists()).then(|| Ledger::read(&out))
    }

    /// The controller hooks for a replica with its own volume (docs/ha.md).
    fn ha_args(&self) -> Vec<String> {
        let config = self.config();
        vec![
            "--on-lead-exec".into(),
            format!("{REPO}/hack/ledger-restore {config}"),
            "--while-leading-exec".into(),
            format!(
                "exec env -u AWS_CA_BUNDLE {} replicate -config {config}",
                self.bin.display()
            ),
        ]
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}

struct Sidecar(Child);

impl Sidecar {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill();
    }
}

fn ledger_path(data_dir: &Path) -> PathBuf {
    data_dir.join("ledger/ledger.db")
}

/// What a ledger holds: serial -> (state, revocation reason), and its CRL number.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ledger {
    rows: BTreeMap<String, (String, Option<String>)>,
    crl_number: i64,
}

impl Ledger {
    fn read(db: &Path) -> Self {
        let conn =
            rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        let mut stmt = conn
            .prepare("SELECT serial, state, revocation_reason FROM certificates")
            .unwrap();
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let crl_number = conn
            .query_row("SELECT value FROM crl_number", [], |r| r.get(0))
            .unwrap();
        Self { rows, crl_number }
    }

    fn revoked(&self, serial: &str) -> bool {
        self.rows.get(serial).is_some_and(|(s, _)| s == "revoked")
    }
}

/// A consistent copy of a live SQLite database (what an older replica or backup would hold).
fn snapshot(db: &Path, to: &Path) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.execute("VACUUM INTO ?1", [to.to_str().unwrap()])
        .unwrap();
}

/// SIGKILLs the controller and whatever it started (`--while-leading-exec`): a node lost.
fn kill_with_children(c: &mut ControllerProcess) {
    let out = Command::new("pgrep")
        .args(["-P", &c.child.id().to_string()])
        .output()
        .unwrap();
    c.kill();
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
}

fn serial(a: &Agent) -> String {
    a.status
        .as_ref()
        .and_then(|s| s.identity.as_ref())
        .map(|i| i.serial.clone())
        .unwrap_or_default()
}

fn ready(a: &Agent) -> bool {
    condition(a, "Ready").is_some_and(|c| c.status == "True")
        && a.status.as_ref().and_then(|s| s.observed_generation) == a.metadata.generation
}

async fn published_crl(client: &Client, ns: &str) -> (u64, HashSet<String>) {
    let pem = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt("agentry-ca")
        .await
        .ok()
        .flatten()
        .and_then(|cm| cm.data?.remove("crl.pem"))
        .unwrap_or_default();
    (
        crl_numbers(&pem).into_iter().max().unwrap_or(0),
        crl_serials(&pem),
    )
}

/// Creates the Agents and returns their first serials.
async fn issue(client: &Client, ns: &str, names: &[&str]) -> Vec<String> {
    for name in names {
        create_agent(client, ns, agent_manifest(name, json!({})))
            .await
            .unwrap();
    }
    let mut serials = Vec::new();
    for name in names {
        let a = wait_agent(
            client,
            ns,
            name,
            Duration::from_secs(60),
            "identity issued",
            identity_issued,
        )
        .await;
        serials.push(serial(&a));
    }
    serials
}

/// Asks for `name`'s certificate to be revoked (`reason`), and waits until it is re-issued and
/// the old serial is on the published CRL.
async fn revoke(client: &Client, ns: &str, name: &str, reason: &str, old: &str) {
    Api::<Agent>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"agentry.dev/revoke": reason}}})),
        )
        .await
        .unwrap();
    wait_agent(
        client,
        ns,
        name,
        Duration::from_secs(60),
        "re-issued after revocation",
        |a| identity_issued(a) && !serial(a).is_empty() && serial(a) != old,
    )
    .await;
    eventually(Duration::from_secs(30), "the serial on the CRL", || async {
        published_crl(client, ns).await.1.contains(old)
    })
    .await;
}

/// Waits until the replica holds everything the local ledger holds.
async fn wait_replicated(replica: &Replica, data_dir: &Path) -> Ledger {
    let local = Ledger::read(&ledger_path(data_dir));
    eventually(
        Duration::from_secs(30),
        "the replica to catch up",
        || async { replica.replicated_ledger(data_dir).as_ref() == Some(&local) },
    )
    .await;
    local
}

/// Revokes `name` and measures the replication lag: from the revocation's commit in the local
/// ledger to its presence in a `litestream restore` of the replica (polled; an upper bound that
/// includes one restore, about 0.1 s).
async fn revoke_and_measure_lag(
    client: &Client,
    ns: &str,
    replica: &Replica,
    data_dir: &Path,
    (name, reason, old): (&str, &str, &str),
) -> Duration {
    Api::<Agent>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"agentry.dev/revoke": reason}}})),
        )
        .await
        .unwrap();
    let db = ledger_path(data_dir);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !Ledger::read(&db).revoked(old) {
        assert!(Instant::now() < deadline, "{old} never revoked locally");
        std::thread::sleep(Duration::from_millis(10));
    }
    let committed = Instant::now();
    while !replica
        .replicated_ledger(data_dir)
        .is_some_and(|l| l.revoked(old))
    {
        assert!(Instant::now() < deadline, "{old} never reached the replica");
        std::thread::sleep(Duration::from_millis(20));
    }
    committed.elapsed()
}

/// The node is lost (controller and sidecar SIGKILLed, data directory deleted); the init
/// container's `litestream restore` brings back every serial and revocation, and the new
/// controller publishes a CRL listing every revoked serial, above the last number.
#[tokio::test]
async fn a_lost_data_directory_is_restored_from_the_replica() {
    let (client, ns) = setup("ls-restore").await;
    let ns = ns.name.clone();
    let replica = Replica::new("restore");
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let mut sidecar = replica.replicate(&data_dir);
    let mut opts = ControllerOptions::new(&ns);
    opts.data_dir = Some(&data_dir);
    let mut controller = ControllerProcess::start(opts);
    let names = ["r0", "r1", "r2", "r3"];
    let first = issue(&client, &ns, &names).await;
    let mut lags = Vec::new();
    for (i, reason) in ["keyCompromise", "superseded", "keyCompromise"]
        .iter()
        .enumerate()
    {
        let target = (names[i], *reason, first[i].as_str());
        lags.push(revoke_and_measure_lag(&client, &ns, &replica, &data_dir, target).await);
    }
    eprintln!("replication lag (revocation commit -> in the replica): {lags:?}");
    for old in &first[..3] {
        eventually(
            Duration::from_secs(30),
            "revoked serial on the CRL",
            || async { published_crl(&client, &ns).await.1.contains(old) },
        )
        .await;
    }
    let before = wait_replicated(&replica, &data_dir).await;
    let (number_before, _) = published_crl(&client, &ns).await;

    controller.kill();
    sidecar.kill();
    std::fs::remove_dir_all(&data_dir).unwrap();
    let started = Instant::now();
    replica.restore_in_place(&data_dir);
    eprintln!("restore took {:?}", started.elapsed());
    let after = Ledger::read(&ledger_path(&data_dir));
    assert_eq!(after, before, "the restored ledger differs");
    for old in &first[..3] {
        assert!(after.revoked(old), "{old} is not revoked after the restore");
    }

    let _sidecar = replica.replicate(&data_dir);
    let mut opts = ControllerOptions::new(&ns);
    opts.data_dir = Some(&data_dir);
    opts.replica = "replica-b";
    let restarted = ControllerProcess::start(opts);
    create_and_wait(
        &client,
        &ns,
        "after",
        Duration::from_secs(60),
        "identity issued after the restore",
        identity_issued,
    )
    .await;
    let (number, listed) = published_crl(&client, &ns).await;
    assert!(
        number > number_before,
        "CRL number {number} after the restore, {number_before} before"
    );
    for old in &first[..3] {
        assert!(listed.contains(old), "{old} dropped from the CRL");
    }
    assert!(!restarted.logs().contains("ledger is behind"));
}

/// The stale-ledger guard, end to end: a controller restarted on a copy of the ledger taken
/// before two revocations issues nothing, says why (Agent condition, /readyz, metrics) and
/// leaves the published CRL as it was; `--adopt-published-crl` applies that CRL and resumes.
#[tokio::test]
async fn an_older_ledger_is_refused_until_the_published_crl_is_adopted() {
    let (client, ns) = setup("ls-guard").await;
    let ns = ns.name.clone();
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let start = |extra: Vec<String>| {
        let mut opts = ControllerOptions::new(&ns);
        opts.data_dir = Some(&data_dir);
        opts.extra_args = extra;
        ControllerProcess::start(opts)
    };
    let mut controller = start(vec![]);
    let first = issue(&client, &ns, &["g0", "g1", "g2"]).await;
    let old_copy = data.path().join("older.db");
    snapshot(&ledger_path(&data_dir), &old_copy);
    revoke(&client, &ns, "g0", "keyCompromise", &first[0]).await;
    revoke(&client, &ns, "g1", "superseded", &first[1]).await;
    let (number, listed) = published_crl(&client, &ns).await;
    controller.kill();

    // The older copy replaces the ledger (as a restore from a lagging replica would).
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", ledger_path(&data_dir).display()));
    }
    std::fs::copy(&old_copy, ledger_path(&data_dir)).unwrap();
    let stale = start(vec![]);
    create_agent(&client, &ns, agent_manifest("late", json!({})))
        .await
        .unwrap();
    let late = wait_agent(
        &client,
        &ns,
        "late",
        Duration::from_secs(60),
        "CertificateIssued=False LedgerBehindCRL",
        |a| condition(a, "CertificateIssued").is_some_and(|c| c.reason == "LedgerBehindCRL"),
    )
    .await;
    let message = condition(&late, "CertificateIssued")
        .unwrap()
        .message
        .clone();
    assert!(
        message.contains("2 revoked serial(s)") && message.contains("docs/ha.md"),
        "{message}"
    );
    assert_eq!(serial(&late), "", "nothing may be issued");
    let readyz = stale.readyz().await.unwrap();
    assert!(
        readyz.0 == 503 && readyz.1.contains("LedgerBehindCRL"),
        "{readyz:?}"
    );
    assert_eq!(stale.metric("agentry_ledger_behind_crl").await, Some(1.0));
    assert_eq!(
        stale.metric("agentry_ledger_missing_revocations").await,
        Some(2.0)
    );
    // Decided before anything could be published: the CRL is the one from before.
    assert_eq!(published_crl(&client, &ns).await, (number, listed.clone()));
    // A deletion waits too (its revocation would go into a ledger about to be replaced).
    Api::<Agent>::namespaced(client.clone(), &ns)
        .delete("g2", &Default::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "the deletion refused", || async {
        refused_event(&client, &ns, "g2").await
    })
    .await;
    assert!(
        Api::<Agent>::namespaced(client.clone(), &ns)
            .get_opt("g2")
            .await
            .unwrap()
            .is_some(),
        "the finalizer must wait for the ledger"
    );
    assert_eq!(published_crl(&client, &ns).await, (number, listed.clone()));
    drop(stale);

    let adopted = start(vec!["--adopt-published-crl".into()]);
    wait_agent(
        &client,
        &ns,
        "late",
        Duration::from_secs(60),
        "identity issued after adopting the CRL",
        identity_issued,
    )
    .await;
    let (after, now_listed) = published_crl(&client, &ns).await;
    assert!(after > number, "CRL number {after}, was {number}");
    assert!(listed.is_subset(&now_listed), "a revocation was dropped");
    assert!(now_listed.contains(&first[0]) && now_listed.contains(&first[1]));
    let ledger = Ledger::read(&ledger_path(&data_dir));
    assert!(ledger.revoked(&first[0]) && ledger.revoked(&first[1]));
    assert_eq!(adopted.metric("agentry_ledger_behind_crl").await, Some(0.0));
    // The deletion goes through now: g2's certificate is revoked and published.
    eventually(
        Duration::from_secs(30),
        "g2 deleted and on the CRL",
        || async {
            let gone = matches!(
                Api::<Agent>::namespaced(client.clone(), &ns)
                    .get_opt("g2")
                    .await,
                Ok(None)
            );
            gone && published_crl(&client, &ns).await.1.contains(&first[2])
        },
    )
    .await;
}

/// Whether the controller refused `name`'s reconcile because the ledger is behind (a Warning
/// Event with the reason).
async fn refused_event(client: &Client, ns: &str, name: &str) -> bool {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    events.list(&Default::default()).await.is_ok_and(|l| {
        l.items.iter().any(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                && e.note
                    .as_deref()
                    .is_some_and(|n| n.contains("ledger is behind"))
        })
    })
}

/// Failover with a volume per replica: the leader replicates while it leads; the standby, on
/// taking the Lease, restores the replica before it opens the ledger, then replicates itself.
/// Measures the time from SIGKILL to the standby leading and to a new Agent being Ready.
#[tokio::test]
async fn a_standby_restores_the_replica_when_it_takes_over() {
    let (client, ns) = setup("ls-failover").await;
    let ns = ns.name.clone();
    let replica = Replica::new("failover");
    let dirs = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (dirs.path().join("a"), dirs.path().join("b"));
    let start = |name: &'static str, dir: &Path| {
        let mut opts = ControllerOptions::new(&ns);
        opts.replica = name;
        opts.data_dir = Some(dir);
        opts.extra_args = replica.ha_args();
        ControllerProcess::start_with_env(opts, &replica.env())
    };
    let mut a = start("replica-a", &dir_a);
    let first = issue(&client, &ns, &["f0", "f1"]).await;
    let b = start("replica-b", &dir_b);
    eventually(Duration::from_secs(20), "the standby is up", || async {
        b.metric("agentry_leader").await == Some(0.0)
    })
    .await;
    assert!(!ledger_path(&dir_b).exists(), "a standby opens no ledger");
    revoke(&client, &ns, "f0", "keyCompromise", &first[0]).await;
    wait_replicated(&replica, &dir_a).await;
    let (number_before, _) = published_crl(&client, &ns).await;

    kill_with_children(&mut a);
    let killed = Instant::now();
    create_agent(&client, &ns, agent_manifest("after", json!({})))
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "the standby leads", || async {
        b.metric("agentry_leader").await == Some(1.0)
    })
    .await;
    let leading = killed.elapsed();
    wait_agent(
        &client,
        &ns,
        "after",
        Duration::from_secs(60),
        "Ready after failover",
        ready,
    )
    .await;
    let agent_ready = killed.elapsed();
    eprintln!("failover: standby leading after {leading:?}, new Agent Ready after {agent_ready:?}");

    let restored = Ledger::read(&ledger_path(&dir_b));
    assert!(
        restored.revoked(&first[0]),
        "the revocation did not survive"
    );
    let (number, listed) = published_crl(&client, &ns).await;
    assert!(number > number_before && listed.contains(&first[0]));
    // The new leader replicates: its next revocation reaches the replica.
    revoke(&client, &ns, "f1", "superseded", &first[1]).await;
    eventually(
        Duration::from_secs(30),
        "the new leader's revocation replicated",
        || async {
            replica
                .replicated_ledger(&dir_b)
                .is_some_and(|l| l.revoked(&first[1]) && l.revoked(&first[0]))
        },
    )
    .await;
    let mut b = b;
    kill_with_children(&mut b);
}

/// A replica whose `--on-lead-exec` fails (e.g. the replica is unreachable) does not lead: it
/// opens no ledger, says why, and exits so that it restarts as a standby.
#[tokio::test]
async fn a_failing_restore_on_lead_keeps_the_replica_from_leading() {
    let (_client, ns) = setup("ls-nolead").await;
    let mut opts = ControllerOptions::new(&ns.name);
    opts.extra_args = vec!["--on-lead-exec".into(), "exit 3".into()];
    let mut c = ControllerProcess::start(opts);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = c.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running:\n{}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let logs = c.logs();
    assert!(
        logs.contains("--on-lead-exec `exit 3` failed") && logs.contains("may be stale"),
        "{logs}"
    );
    assert!(
        !ledger_path(&c.data_dir()).exists(),
        "no ledger may be opened"
    );
}

/// The chart's ConfigMap (`templates/litestream-configmap.yaml`, rendered by helm) is a
/// configuration the real Litestream accepts: with it, a committed row reaches the bucket and
/// comes back with `litestream restore`, for both databases.
#[tokio::test]
async fn the_charts_litestream_config_replicates_and_restores() {
    let mut replica = Replica::new("chart");
    let s3 = common::s3::env();
    let sets = [
        "litestream.enabled=true".to_string(),
        format!("litestream.bucket={}", s3["AGENTRY_S3_PRIMARY_BUCKET"]),
        format!("litestream.path={}", replica.path()),
        format!("litestream.endpoint={}", s3["AGENTRY_S3_PRIMARY_ENDPOINT"]),
        "litestream.region=us-east-1".into(),
        "litestream.forcePathStyle=true".into(),
        "litestream.syncInterval=200ms".into(),
        "litestream.credentialsSecret.name=s3".into(),
    ];
    let mut helm = Command::new(tool_dir().join("helm"));
    helm.args(["template", "t", &format!("{REPO}/charts/agentry")])
        .args(["--show-only", "templates/litestream-configmap.yaml"]);
    for set in &sets {
        helm.args(["--set", set]);
    }
    let rendered = helm.output().unwrap();
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let config = configmap_data(&rendered.stdout, "litestream.yml");
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("agentry");
    let file = data.path().join("litestream.yml");
    // Litestream's metrics on a free loopback port instead of the pod's :9090.
    let metrics = format!("127.0.0.1:{}", free_port());
    assert!(config.contains("addr: \":9090\""), "{config}");
    std::fs::write(
        &file,
        config
            .replace("/var/lib/agentry", data_dir.to_str().unwrap())
            .replace("addr: \":9090\"", &format!("addr: \"{metrics}\"")),
    )
    .unwrap();
    replica.config = file.display().to_string();
    for db in ["ledger/ledger.db", "catalog/catalog.db"] {
        let path = data_dir.join(db);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch("CREATE TABLE t (v TEXT); INSERT INTO t VALUES ('kept')")
            .unwrap();
    }
    let sidecar = replica.replicate(&data_dir);
    for db in ["ledger/ledger.db", "catalog/catalog.db"] {
        let out = data
            .path()
            .join(format!("{}.restored", db.replace('/', "-")));
        eventually(
            Duration::from_secs(20),
            "the row in the replica",
            || async {
                let _ = std::fs::remove_file(&out);
                let ok = replica
                    .command(&data_dir, &["restore", "-config", replica.config(), "-o"])
                    .args([out.to_str().unwrap(), data_dir.join(db).to_str().unwrap()])
                    .output()
                    .is_ok_and(|o| o.status.success());
                ok && rusqlite::Connection::open(&out)
                    .and_then(|c| c.query_row("SELECT v FROM t", [], |r| r.get::<_, String>(0)))
                    .is_ok_and(|v| v == "kept")
            },
        )
        .await;
    }
    // `agentry verify` reads the same config and Litestream's metrics: both replicas in step.
    let url = format!("http://{metrics}/metrics");
    let verify = || {
        let out = Command::new(env!("CARGO_BIN_EXE_agentry"))
            .args(["verify", "-o", "json", "--namespace", "agentry-verify-none"])
            .args(["--backup-location-selector", "agentry.dev/none=none"])
            .args([
                "--litestream-config",
                &replica.config,
                "--litestream-metrics-url",
                &url,
            ])
            .envs(replica.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| {
                c["name"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with("litestream")
            })
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_string(),
                    c["status"].as_str().unwrap().to_string(),
                    c["detail"].to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    eventually(
        Duration::from_secs(20),
        "verify: both replicas in sync",
        || async {
            let checks = verify();
            checks.len() == 2
                && checks
                    .iter()
                    .all(|c| c.1 == "ok" && c.2.contains("in sync"))
        },
    )
    .await;
    // Broken: litestream stops. verify says so (its metrics are gone), per check.
    drop(sidecar);
    let checks = verify();
    assert_eq!(checks.len(), 1, "{checks:?}");
    assert_eq!(checks[0].1, "fail", "{checks:?}");
    assert!(checks[0].2.contains(&metrics), "{checks:?}");
}

/// One key of a ConfigMap in YAML (converted by kubectl, which reads YAML).
fn configmap_data(yaml: &[u8], key: &str) -> String {
    use std::io::Write;
    let mut kubectl = Command::new(tool_dir().join("kubectl"))
        .args(["create", "--dry-run=client", "-o", "json", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    kubectl.stdin.take().unwrap().write_all(yaml).unwrap();
    let out = kubectl.wait_with_output().unwrap();
    assert!(out.status.success());
    let cm: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    cm["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} in {cm}"))
        .to_string()
}
