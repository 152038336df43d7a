//! Backup benchmarks (BENCHMARKS.md, area `backup`), each against its baseline in the same run,
//! on the two real S3 servers `make s3-up` starts on loopback (versitygw primary, SeaweedFS
//! secondary; settings from `hack/s3-stores env`, everything under a random prefix that is
//! removed at the end, every object version included):
//! - `blake3_stream`: `hash::hash_stream` over a `tokio::fs::File` vs `b3sum` (multi-threaded,
//!   mmap) on the same file, both from the page cache; the blake3 crate's `update_mmap_rayon`
//!   stands in when no `b3sum` is found (on PATH or as `make bench-tools` caches it).
//! - `backup_single_store`: what the API's PUT does for one store (`S3Store::put_stream`,
//!   hashing while it streams 8 MiB parts, then the verification re-read `hash_object`, then
//!   the catalog `record` on disk) vs a raw aws-sdk-s3 multipart upload (create, 8 MiB parts
//!   one after another, complete) of the same bytes to the same server with the same SDK
//!   config. The figure without the re-read is an extra field.
//! - `backup_dual_store`: `Engine::ingest` (both stores at once, both copies re-read and
//!   verified, manifests, catalog) vs the single-store backup above.
//! - `ingest_peak_rss`: the peak RSS (VmHWM) of a fresh process of this binary doing one dual
//!   ingest of the full size, against the same at 256 MiB: memory must not grow with size.
//!
//! Every stream comes from one deterministic generator (pseudo-random, incompressible, never
//! held whole in memory, at most 64 KiB per read as a request body arrives); the file of the
//! first row holds the same bytes, so every upload is checked against that file's BLAKE3.
//!
//! The client, both S3 servers and everything else on the machine share its cores: the S3 rows
//! also report how many cores were busy (CPU seconds of this process and both servers over the
//! wall time), which says when a ratio is set by the CPU rather than by our code.
//!
//! Environment: `AGENTRY_BENCH_BACKUP_MIB` (size, default 1024), `AGENTRY_BENCH_BACKUP_ROUNDS`
//! (S3 rounds, default 3; each round runs every side once, in rotating order, each side after a
//! `sync` so none pays for the previous one's disk writeback). Arguments
//! `hash`, `s3` or `rss` run only those rows (the report then holds only them).

mod report;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use agentry::backup::catalog::{BackupVersion, Catalog, StoredObject};
use agentry::backup::engine::{Engine, Ingested};
use agentry::backup::hash::hash_stream;
use agentry::backup::location::Stores;
use agentry::backup::store::{ChecksumMode, PART_SIZE, S3Store, StoreConfig, sdk_config};
use anyhow::{Context as _, bail, ensure};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use report::Row;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

const MIB: u64 = 1024 * 1024;
const SEED: u64 = 0x5eed_b4c4_u64;
/// The most one read of the generator returns: a request body arrives in pieces, not in parts.
const READ_MAX: usize = 64 * 1024;
/// Set in the child process that measures the peak RSS of one ingest (its size in MiB).
const CHILD_ENV: &str = "AGENTRY_BENCH_BACKUP_RSS_CHILD_MIB";
/// The child's store prefix (under the parent's, so the parent's cleanup covers it).
const CHILD_PREFIX_ENV: &str = "AGENTRY_BENCH_BACKUP_RSS_CHILD_PREFIX";

// ---------------------------------------------------------------- the generator

/// splitmix64 of word `index`: any offset of the stream can be produced on its own.
fn word(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `out` with the stream's bytes from offset `pos` on.
fn fill(seed: u64, pos: u64, out: &mut [u8]) {
    let mut i = 0;
    // Up to the next word boundary.
    while i < out.len() && !(pos + i as u64).is_multiple_of(8) {
        let p = pos + i as u64;
        out[i] = word(seed, p / 8).to_le_bytes()[(p % 8) as usize];
        i += 1;
    }
    let mut index = (pos + i as u64) / 8;
    let mut words = out[i..].chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&word(seed, index).to_le_bytes());
        index += 1;
    }
    let tail = words.into_remainder();
    let last = word(seed, index).to_le_bytes();
    let n = tail.len();
    tail.copy_from_slice(&last[..n]);
}

/// `len` pseudo-random bytes as an AsyncRead, produced as they are read, [`READ_MAX`] at most
/// per read.
struct Pattern {
    seed: u64,
    pos: u64,
    len: u64,
}

impl Pattern {
    fn new(len: u64) -> Self {
        Self {
            seed: SEED,
            pos: 0,
            len,
        }
    }
}

impl AsyncRead for Pattern {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let n = (buf.remaining().min(READ_MAX) as u64).min(this.len - this.pos) as usize;
        fill(this.seed, this.pos, buf.initialize_unfilled_to(n));
        buf.advance(n);
        this.pos += n as u64;
        Poll::Ready(Ok(()))
    }
}

/// Writes the stream to `path` (and syncs it, so no writeback runs during the measurement).
fn write_file(path: &Path, len: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    let mut buf = vec![0u8; 8 * MIB as usize];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        fill(SEED, pos, &mut buf[..n]);
        file.write_all(&buf[..n])?;
        pos += n as u64;
    }
    file.sync_all()
}

// ---------------------------------------------------------------- settings

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The two stores' settings as `hack/s3-stores env` prints them (as tests/common/s3.rs reads
/// them), under `prefix`.
fn store_configs(prefix: &str) -> anyhow::Result<(StoreConfig, StoreConfig)> {
    let out = std::process::Command::new("hack/s3-stores")
        .arg("env")
        .output()
        .context("running hack/s3-stores env")?;
    let env: HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            (
                k.to_string(),
                v.trim_matches('\'').trim_matches('"').to_string(),
            )
        })
        .collect();
    let get = |k: &str| {
        env.get(k)
            .cloned()
            .with_context(|| format!("{k} missing from hack/s3-stores env (run `make s3-up`)"))
    };
    let store = |which: &str, mode| -> anyhow::Result<StoreConfig> {
        Ok(StoreConfig {
            endpoint: get(&format!("AGENTRY_S3_{which}_ENDPOINT"))?,
            region: get("AWS_REGION")?,
            bucket: get(&format!("AGENTRY_S3_{which}_BUCKET"))?,
            prefix: prefix.to_string(),
            access_key: get(&format!("AGENTRY_S3_{which}_ACCESS_KEY"))?,
            secret_key: get(&format!("AGENTRY_S3_{which}_SECRET_KEY"))?,
            force_path_style: true,
            checksum_mode: mode,
            options: Default::default(),
        })
    };
    // The secondary in the checksum mode Backblaze B2 needs, as the tests run it.
    Ok((
        store("PRIMARY", ChecksumMode::WhenSupported)?,
        store("SECONDARY", ChecksumMode::WhenRequired)?,
    ))
}

/// CPU seconds (user + system, all threads) of a process; Linux counts them in 1/100 s.
fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after "(comm) ": state is the first, utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 2..)?
        .split_whitespace()
        .collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// This process and the two S3 servers (their pid files from `hack/s3-stores`).
struct Cpu {
    pids: [String; 3],
}

impl Cpu {
    fn new() -> Self {
        let dir = std::env::var("AGENTRY_S3_DIR").unwrap_or_else(|_| {
            let cache = std::env::var("AGENTRY_CACHE").unwrap_or_else(|_| {
                format!(
                    "{}/.cache/agentry",
                    std::env::var("HOME").unwrap_or_default()
                )
            });
            format!("{cache}/s3")
        });
        let pid = |name: &str| {
            std::fs::read_to_string(format!("{dir}/pids/{name}.pid"))
                .map(|p| p.trim().to_string())
                .unwrap_or_default()
        };
        Self {
            pids: ["self".into(), pid("primary"), pid("secondary")],
        }
    }

    /// CPU seconds so far of [this process, primary server, secondary server] (0 if unknown).
    fn now(&self) -> [f64; 3] {
        self.pids.each_ref().map(|p| {
            if p.is_empty() {
                0.0
            } else {
                cpu_secs(p).unwrap_or(0.0)
            }
        })
    }

    fn since(&self, before: [f64; 3]) -> [f64; 3] {
        let now = self.now();
        [0, 1, 2].map(|i| now[i] - before[i])
    }
}

fn raw_client(cfg: &StoreConfig) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(sdk_config(cfg).build())
}

// ---------------------------------------------------------------- BLAKE3

/// `b3sum` on PATH, else the one `make bench-tools` caches under
/// `$AGENTRY_CACHE/bin/b3sum-<version>/`.
fn find_b3sum() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("b3sum"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let cache = std::env::var_os("AGENTRY_CACHE").map_or_else(
            || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/agentry"),
            PathBuf::from,
        );
        let mut found: Vec<PathBuf> = std::fs::read_dir(cache.join("bin"))
            .ok()?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("b3sum-"))
            .map(|e| e.path().join("bin/b3sum"))
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        found.pop()
    })
}

fn b3sum(bin: &Path, path: &Path, threads: Option<usize>) -> String {
    let mut cmd = std::process::Command::new(bin);
    if let Some(n) = threads {
        cmd.arg("--num-threads").arg(n.to_string());
    }
    let out = cmd
        .arg("--no-names")
        .arg(path)
        .output()
        .expect("running b3sum");
    assert!(out.status.success(), "b3sum failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn hash_row(rt: &tokio::runtime::Runtime, size: u64) -> anyhow::Result<(Row, String)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("backup.bin");
    write_file(&path, size)?;
    let b3sum_bin = find_b3sum();
    let ours = || {
        rt.block_on(async {
            let file = tokio::fs::File::open(&path).await.unwrap();
            hash_stream(file).await.unwrap().0
        })
    };
    let baseline = || match &b3sum_bin {
        Some(bin) => b3sum(bin, &path, None),
        None => blake3::Hasher::new()
            .update_mmap_rayon(&path)
            .unwrap()
            .finalize()
            .to_hex()
            .to_string(),
    };
    // One single-threaded hash of the same file, for scale: what one core does.
    let one_thread = || match &b3sum_bin {
        Some(bin) => b3sum(bin, &path, Some(1)),
        None => blake3::Hasher::new()
            .update_mmap(&path)
            .unwrap()
            .finalize()
            .to_hex()
            .to_string(),
    };
    // Only reading the file through a tokio::fs::File, no hashing (two copies: page cache ->
    // tokio's buffer -> ours): what any hash of it as an AsyncRead pays before hashing a byte.
    let read_only = || {
        rt.block_on(async {
            let mut file = tokio::fs::File::open(&path).await.unwrap();
            let mut buf = vec![0u8; 2 * MIB as usize];
            while file.read(&mut buf).await.unwrap() > 0 {}
        })
    };
    // Warm-up (and the file is in the page cache for both sides).
    let expected = baseline();
    ensure!(
        ours() == expected,
        "hash_stream disagrees with the baseline"
    );
    let rounds = 5;
    let (mut t_ours, mut t_base, mut t_one, mut t_read) = (
        Duration::ZERO,
        Duration::ZERO,
        Duration::ZERO,
        Duration::ZERO,
    );
    let mb_s = |t: Duration| size as f64 / 1e6 / t.as_secs_f64();
    for round in 0..rounds {
        let start = Instant::now();
        ensure!(baseline() == expected);
        let base = start.elapsed();
        let start = Instant::now();
        ensure!(ours() == expected);
        let ours = start.elapsed();
        let start = Instant::now();
        ensure!(one_thread() == expected);
        let one = start.elapsed();
        let start = Instant::now();
        read_only();
        let read = start.elapsed();
        eprintln!(
            "  round {round}: ours {:.0} MB/s, baseline {:.0}, one thread {:.0}, read only {:.0}",
            mb_s(ours),
            mb_s(base),
            mb_s(one),
            mb_s(read)
        );
        (t_ours, t_base, t_one, t_read) =
            (t_ours + ours, t_base + base, t_one + one, t_read + read);
    }
    let mb = (size * rounds) as f64 / 1e6;
    let (ours, baseline, one, read) = (
        mb / t_ours.as_secs_f64(),
        mb / t_base.as_secs_f64(),
        mb / t_one.as_secs_f64(),
        mb / t_read.as_secs_f64(),
    );
    let row = Row {
        name: "blake3_stream",
        ours,
        baseline,
        unit: "MB/s",
        ratio: ours / baseline,
        baseline_is: if b3sum_bin.is_some() {
            "b3sum (mmap, all cores) on the same file, page-cached"
        } else {
            "blake3 Hasher::update_mmap_rayon on the same file, page-cached (no b3sum found)"
        },
        target: ">= 0.9",
        extra: vec![
            ("size_mib", (size / MIB) as f64),
            ("cores", available_cores() as f64),
            ("one_thread_baseline_mb_s", one),
            ("tokio_file_read_only_mb_s", read),
        ],
    };
    Ok((row, expected))
}

fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

// ---------------------------------------------------------------- S3

/// What one single-store backup took (seconds).
struct Single {
    put: f64,
    verify: f64,
    record: f64,
}

impl Single {
    fn total(&self) -> f64 {
        self.put + self.verify + self.record
    }
}

/// The baseline: a plain multipart upload of the same bytes, parts one after another.
async fn raw_multipart(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    size: u64,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut body = Pattern::new(size);
    let created = client
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await?;
    let upload_id = created.upload_id().context("no upload id")?.to_string();
    let mut parts = Vec::new();
    loop {
        let mut part = vec![0u8; PART_SIZE];
        let mut filled = 0;
        while filled < PART_SIZE {
            let n = body.read(&mut part[filled..]).await?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 && !parts.is_empty() {
            break;
        }
        part.truncate(filled);
        let number = parts.len() as i32 + 1;
        let sent = client
            .upload_part()
            .bucket(bucket)
            .key(key)
            .upload_id(&upload_id)
            .part_number(number)
            .body(ByteStream::from(part))
            .send()
            .await?;
        parts.push(
            CompletedPart::builder()
                .part_number(number)
                .set_e_tag(sent.e_tag().map(str::to_string))
                .build(),
        );
        if filled < PART_SIZE {
            break;
        }
    }
    client
        .complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(&upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await?;
    Ok(start.elapsed().as_secs_f64())
}

/// Ours, one store: as the API's PUT does it (stream + hash, re-read + verify, catalog).
async fn single_store(
    store: &S3Store,
    location: &str,
    catalog: &Arc<Catalog>,
    backup: &str,
    size: u64,
    expected: &str,
) -> anyhow::Result<Single> {
    let start = Instant::now();
    let metadata = HashMap::from([
        ("agentry-agent".to_string(), "bench/agent".to_string()),
        ("agentry-backup".to_string(), backup.to_string()),
    ]);
    let up = store
        .put_stream(
            &format!("bench/agent/{backup}.tar.zst"),
            Pattern::new(size),
            metadata,
        )
        .await?;
    let put = start.elapsed().as_secs_f64();
    ensure!(up.blake3 == expected && up.size == size, "streamed hash");
    let start = Instant::now();
    let (stored, stored_size) = store.hash_object(&up.key, up.version_id.as_deref()).await?;
    ensure!(stored == expected && stored_size == size, "re-read hash");
    let verify = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let version = BackupVersion {
        id: format!("bench/{backup}"),
        agent_id: "bench/agent".into(),
        size,
        blake3: up.blake3.clone(),
        objects: vec![StoredObject {
            location: location.into(),
            key: up.key.clone(),
            version_id: up.version_id.clone(),
            etag: up.etag.clone(),
        }],
        created_at: jiff::Timestamp::now().to_string(),
        verified_at: Some(jiff::Timestamp::now().to_string()),
        restored_at: None,
        location: "bench".into(),
        namespace_uid: None,
    };
    let catalog = catalog.clone();
    tokio::task::spawn_blocking(move || catalog.record(&version)).await??;
    let record = start.elapsed().as_secs_f64();
    Ok(Single {
        put,
        verify,
        record,
    })
}

fn stores(primary: &StoreConfig, secondary: &StoreConfig) -> Stores {
    Stores {
        location: "bench".into(),
        primary: S3Store::new(primary),
        secondary: S3Store::new(secondary),
        primary_lock_days: None,
        secondary_lock_days: None,
    }
}

async fn dual_store(
    engine: &Engine,
    stores: &Stores,
    backup: &str,
    size: u64,
    expected: Option<&str>,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let done = engine
        .ingest(stores, "bench", None, "agent", backup, Pattern::new(size))
        .await?;
    let secs = start.elapsed().as_secs_f64();
    match done {
        Ingested::Completed(v) => {
            ensure!(v.size == size && v.objects.len() == 2, "ingested {v:?}");
            if let Some(expected) = expected {
                ensure!(v.blake3 == expected, "ingested hash");
            }
        }
        Ingested::PartiallyFailed { error, .. } => bail!("dual ingest partially failed: {error}"),
    }
    Ok(secs)
}

/// Removes every version, delete marker and pending upload under `prefix`; how many.
async fn purge(client: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> anyhow::Result<usize> {
    let pending = client
        .list_multipart_uploads()
        .bucket(bucket)
        .prefix(prefix)
        .send()
        .await?;
    for u in pending.uploads() {
        if let (Some(key), Some(id)) = (u.key(), u.upload_id()) {
            client
                .abort_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(id)
                .send()
                .await?;
        }
    }
    let mut removed = 0;
    // Each pass deletes what it lists; bounded, in case a store keeps listing something.
    for _ in 0..100 {
        let page = client
            .list_object_versions()
            .bucket(bucket)
            .prefix(prefix)
            .send()
            .await?;
        let found: Vec<(String, Option<String>)> = page
            .versions()
            .iter()
            .map(|v| (v.key(), v.version_id()))
            .chain(
                page.delete_markers()
                    .iter()
                    .map(|m| (m.key(), m.version_id())),
            )
            .filter_map(|(k, v)| Some((k?.to_string(), v.map(str::to_string))))
            .collect();
        if found.is_empty() {
            return Ok(removed);
        }
        for (key, version) in found {
            client
                .delete_object()
                .bucket(bucket)
                .key(&key)
                .set_version_id(version)
                .send()
                .await?;
            removed += 1;
        }
    }
    bail!("{bucket}/{prefix} still lists objects after 100 passes")
}

/// Purges both stores under the prefix and checks (with `S3Store::list`) that nothing is left.
async fn cleanup(primary: &StoreConfig, secondary: &StoreConfig) -> anyhow::Result<usize> {
    let mut removed = 0;
    for cfg in [primary, secondary] {
        removed += purge(&raw_client(cfg), &cfg.bucket, &cfg.prefix).await?;
        let left = S3Store::new(cfg).list("").await?;
        ensure!(
            left.is_empty(),
            "{}: left under {}: {left:?}",
            cfg.endpoint,
            cfg.prefix
        );
    }
    Ok(removed)
}

/// Rows b and c, `rounds` times each side, in rotating order.
async fn s3_rows(
    primary: &StoreConfig,
    secondary: &StoreConfig,
    size: u64,
    rounds: usize,
    expected: &str,
) -> anyhow::Result<Vec<Row>> {
    let stores = stores(primary, secondary);
    let raw = raw_client(primary);
    let dir = tempfile::tempdir()?;
    let catalog = Arc::new(Catalog::open(dir.path())?);
    let engine = Engine::new(catalog.clone());
    // Connections up, credentials checked.
    stores.primary.validate().await?;
    stores.secondary.validate().await?;

    let (mut t_raw, mut t_dual, mut t_secondary) = (0.0, 0.0, 0.0);
    let mut singles = Vec::new();
    // CPU seconds [client, primary server, secondary server] used by each side.
    let cpu = Cpu::new();
    let mut used = [[0.0f64; 3]; 4];
    for round in 0..rounds {
        for side in 0..4 {
            let which = (side + round) % 4;
            // Every side starts with nothing left to write back from the one before (not timed).
            let _ = std::process::Command::new("sync").status();
            let before = cpu.now();
            match which {
                0 => {
                    let key = format!("{}raw/r{round}.bin", primary.prefix);
                    let secs = raw_multipart(&raw, &primary.bucket, &key, size).await?;
                    eprintln!("  round {round}: raw multipart {secs:.2} s");
                    t_raw += secs;
                }
                1 => {
                    let s = single_store(
                        &stores.primary,
                        "primary",
                        &catalog,
                        &format!("single-r{round}"),
                        size,
                        expected,
                    )
                    .await?;
                    eprintln!(
                        "  round {round}: single store {:.2} s (put {:.2}, verify {:.2}, record {:.3})",
                        s.total(),
                        s.put,
                        s.verify,
                        s.record
                    );
                    singles.push(s);
                }
                2 => {
                    let secs = dual_store(
                        &engine,
                        &stores,
                        &format!("dual-r{round}"),
                        size,
                        Some(expected),
                    )
                    .await?;
                    eprintln!("  round {round}: dual store {secs:.2} s");
                    t_dual += secs;
                }
                _ => {
                    let s = single_store(
                        &stores.secondary,
                        "secondary",
                        &catalog,
                        &format!("secondary-r{round}"),
                        size,
                        expected,
                    )
                    .await?;
                    eprintln!(
                        "  round {round}: single store, secondary {:.2} s",
                        s.total()
                    );
                    t_secondary += s.total();
                }
            }
            let spent = cpu.since(before);
            eprintln!(
                "           CPU s: client {:.1}, versitygw {:.1}, SeaweedFS {:.1}",
                spent[0], spent[1], spent[2]
            );
            for (total, x) in used[which].iter_mut().zip(spent) {
                *total += x;
            }
        }
        // Keep the stores' disks from filling up over the rounds (not timed).
        cleanup(primary, secondary).await?;
    }
    let n = rounds as f64;
    let mb = size as f64 / 1e6;
    let single: f64 = singles.iter().map(Single::total).sum::<f64>() / n;
    let unverified: f64 = singles.iter().map(|s| s.put + s.record).sum::<f64>() / n;
    let verify: f64 = singles.iter().map(|s| s.verify).sum::<f64>() / n;
    let record: f64 = singles.iter().map(|s| s.record).sum::<f64>() / n;
    let (raw_s, dual, secondary_s) = (t_raw / n, t_dual / n, t_secondary / n);
    // Cores kept busy by the client and both servers over a side's wall time.
    let busy = |which: usize, wall: f64| used[which].iter().sum::<f64>() / n / wall;
    let per_run = |which: usize, process: usize| used[which][process] / n;
    Ok(vec![
        Row {
            name: "backup_single_store",
            ours: mb / single,
            baseline: mb / raw_s,
            unit: "MB/s",
            ratio: raw_s / single,
            baseline_is: "raw aws-sdk-s3 multipart upload (8 MiB parts, sequential) of the same bytes, same server, same SDK config",
            target: ">= 0.8",
            extra: vec![
                ("size_mib", (size / MIB) as f64),
                ("rounds", n),
                ("ours_s", single),
                ("baseline_s", raw_s),
                ("unverified_mb_s", mb / unverified),
                ("unverified_ratio", raw_s / unverified),
                ("verify_reread_s", verify),
                ("catalog_record_ms", record * 1000.0),
                ("ours_cores_busy", busy(1, single)),
                ("baseline_cores_busy", busy(0, raw_s)),
                ("ours_client_cpu_s", per_run(1, 0)),
                ("baseline_client_cpu_s", per_run(0, 0)),
            ],
        },
        Row {
            name: "backup_dual_store",
            ours: dual,
            baseline: single,
            unit: "s",
            ratio: dual / single,
            baseline_is: "backup_single_store (primary only, verified, catalogued)",
            target: "<= 1.2",
            extra: vec![
                ("dual_mb_s", mb / dual),
                ("single_secondary_s", secondary_s),
                ("ratio_vs_slower_store", dual / single.max(secondary_s)),
                ("ratio_vs_both_in_turn", dual / (single + secondary_s)),
                ("dual_cores_busy", busy(2, dual)),
                ("dual_client_cpu_s", per_run(2, 0)),
                ("dual_versitygw_cpu_s", per_run(2, 1)),
                ("dual_seaweedfs_cpu_s", per_run(2, 2)),
            ],
        },
    ])
}

// ---------------------------------------------------------------- peak RSS

fn proc_status_kib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0.0)
}

/// In the child: one dual ingest of `mib` MiB on a fresh process; prints its memory figures.
fn rss_child(mib: u64) -> anyhow::Result<()> {
    let prefix = std::env::var(CHILD_PREFIX_ENV)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let (primary, secondary) = store_configs(&prefix)?;
        let stores = stores(&primary, &secondary);
        let dir = tempfile::tempdir()?;
        let engine = Engine::new(Arc::new(Catalog::open(dir.path())?));
        // Clients, connections and the catalog set up, as in a running controller.
        stores.primary.validate().await?;
        stores.secondary.validate().await?;
        let (rss_before, hwm_before) = (proc_status_kib("VmRSS:"), proc_status_kib("VmHWM:"));
        let secs = dual_store(&engine, &stores, "rss", mib * MIB, None).await?;
        let (rss_after, hwm_after) = (proc_status_kib("VmRSS:"), proc_status_kib("VmHWM:"));
        println!(
            "{}",
            serde_json::json!({"rss_before": rss_before, "hwm_before": hwm_before,
                "rss_after": rss_after, "hwm_after": hwm_after, "secs": secs})
        );
        Ok(())
    })
}

/// In the parent: runs the child for `mib` MiB; its figures (KiB).
fn rss_of(mib: u64, prefix: &str) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .env(CHILD_ENV, mib.to_string())
        .env(CHILD_PREFIX_ENV, prefix)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    ensure!(out.status.success(), "the RSS child failed: {out:?}");
    let line = String::from_utf8_lossy(&out.stdout);
    let figures: serde_json::Value = serde_json::from_str(line.trim())
        .with_context(|| format!("the RSS child printed {line:?}"))?;
    eprintln!("  dual ingest of {mib} MiB in a fresh process: {figures}");
    Ok(figures)
}

fn rss_row(size: u64, prefix: &str) -> anyhow::Result<Row> {
    let big = size / MIB;
    let small = if big > 256 { 256 } else { (big / 4).max(1) };
    let (b, s) = (rss_of(big, prefix)?, rss_of(small, prefix)?);
    let mib = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(0.0) / 1024.0;
    let (peak_big, peak_small) = (mib(&b, "hwm_after"), mib(&s, "hwm_after"));
    Ok(Row {
        name: "ingest_peak_rss",
        ours: peak_big,
        baseline: peak_small,
        unit: "MiB",
        ratio: peak_big / peak_small,
        baseline_is: "the same dual ingest of a quarter of the size, at most 256 MiB, in a fresh process",
        target: "<= 1.1",
        extra: vec![
            ("size_mib", big as f64),
            ("small_size_mib", small as f64),
            ("rss_before_ingest_mib", mib(&b, "rss_before")),
            ("growth_mib", peak_big - mib(&b, "rss_before")),
            ("small_growth_mib", peak_small - mib(&s, "rss_before")),
            ("part_size_mib", (PART_SIZE as u64 / MIB) as f64),
        ],
    })
}

// ---------------------------------------------------------------- main

fn main() {
    if let Ok(mib) = std::env::var(CHILD_ENV) {
        rss_child(mib.parse().expect("child size")).expect("the RSS child");
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; `cargo test --benches` does not, and must not need S3.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let only: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let wanted = |group: &str| only.is_empty() || only.iter().any(|a| *a == group);
    let size = env_or("AGENTRY_BENCH_BACKUP_MIB", 1024u64) * MIB;
    let rounds = env_or("AGENTRY_BENCH_BACKUP_ROUNDS", 3usize).max(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut rows = Vec::new();

    // The file's BLAKE3 is what every upload of the same bytes must hash to.
    let expected = if wanted("hash") {
        eprintln!("blake3_stream: {} MiB", size / MIB);
        let (row, expected) = hash_row(&rt, size).expect("the hashing row");
        rows.push(row);
        expected
    } else {
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 8 * MIB as usize];
        let mut pos = 0;
        while pos < size {
            let n = (size - pos).min(buf.len() as u64) as usize;
            fill(SEED, pos, &mut buf[..n]);
            hasher.update(&buf[..n]);
            pos += n as u64;
        }
        hasher.finalize().to_hex().to_string()
    };

    if wanted("s3") || wanted("rss") {
        let prefix = format!("bench-{:08x}/", rand::random::<u32>());
        let (primary, secondary) = store_configs(&prefix).expect("the S3 stores' settings");
        let measured = (|| -> anyhow::Result<Vec<Row>> {
            let mut rows = Vec::new();
            if wanted("s3") {
                eprintln!(
                    "backup_single_store, backup_dual_store: {} MiB, {rounds} rounds, under {prefix}",
                    size / MIB
                );
                rows.extend(rt.block_on(s3_rows(&primary, &secondary, size, rounds, &expected))?);
            }
            if wanted("rss") {
                eprintln!("ingest_peak_rss");
                rows.push(rss_row(size, &format!("{prefix}rss/"))?);
            }
            Ok(rows)
        })();
        // Whatever happened, nothing stays behind.
        let removed = rt.block_on(cleanup(&primary, &secondary));
        match &removed {
            Ok(n) => eprintln!("cleanup: removed the last {n} object versions under {prefix}"),
            Err(e) => eprintln!("cleanup under {prefix} failed: {e:#}"),
        }
        rows.extend(measured.expect("the S3 rows"));
        removed.expect("cleanup");
    }
    report::write("backup", &rows);
}
