//! `agentry backup`: list, create, restore (through the cluster: AgentBackup and AgentRestore
//! objects), and verify, scrub, reindex and purge (against the catalog and the stores; run it
//! where the controller's data directory is, e.g. `kubectl exec deploy/agentry -- agentry backup
//! scrub`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};

use agentry::backup::catalog::Catalog;
use agentry::backup::engine::{Engine, ScrubResult};
use agentry::backup::location::{self, Stores};
use agentry::crd::{
    AgentBackup, AgentBackupSpec, AgentRestore, AgentRestoreSpec, BackupLocation, BackupPhase,
    RestorePhase,
};

#[derive(Subcommand)]
pub enum BackupCommand {
    /// List AgentBackups (all namespaces unless --namespace).
    Ls(LsArgs),
    /// Ask for a backup now: creates an AgentBackup the agent's sidecar fills.
    Create(CreateArgs),
    /// Restore an Agent from a backup (the latest Completed unless --backup): creates an
    /// AgentRestore; the controller verifies a stored copy, the sidecar verifies it again and
    /// writes it.
    Restore(RestoreArgs),
    /// Re-hash both stored copies of one backup and compare them with the catalog.
    Verify(VerifyArgs),
    /// Re-hash every catalogued backup in both stores; a bad or missing copy is replaced from
    /// the good one.
    Scrub(StoreArgs),
    /// Rebuild the catalog from the manifests in both stores (after losing the catalog).
    Reindex(StoreArgs),
    /// Delete every backup of an Agent: both copies, the catalog rows and the AgentBackups.
    /// Backups outlive their Agent until retention or this.
    Purge(PurgeArgs),
}

#[derive(Args)]
pub struct LsArgs {
    #[arg(long, short)]
    namespace: Option<String>,
    /// Only this Agent's backups.
    #[arg(long)]
    agent: Option<String>,
}

#[derive(Args)]
pub struct CreateArgs {
    #[arg(long, short)]
    namespace: String,
    /// The Agent to back up.
    #[arg(long)]
    agent: String,
    /// The AgentBackup's name (default: <agent>-manual-<UTC time>).
    #[arg(long)]
    name: Option<String>,
    /// Wait until it is Completed or Failed, showing its progress.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this long.
    #[arg(long, default_value = "30m", value_parser = agentry::crd::units::parse_duration)]
    timeout: Duration,
}

#[derive(Args)]
pub struct RestoreArgs {
    #[arg(long, short)]
    namespace: String,
    /// The Agent to restore into.
    #[arg(long)]
    agent: String,
    /// The AgentBackup to restore (default: the latest Completed).
    #[arg(long)]
    backup: Option<String>,
    /// Wait until it is Completed or Failed.
    #[arg(long)]
    wait: bool,
    #[arg(long, default_value = "30m", value_parser = agentry::crd::units::parse_duration)]
    timeout: Duration,
}

#[derive(Args, Clone)]
pub struct StoreArgs {
    /// The controller's data directory (the catalog is in its `catalog/`).
    #[arg(long, default_value = "/var/lib/agentry", env = "AGENTRY_DATA_DIR")]
    data_dir: PathBuf,
    /// The BackupLocation whose stores to use.
    #[arg(long, default_value = "default")]
    location: String,
    /// The controller's namespace (where the stores' credentials Secrets are).
    #[arg(long, default_value = "agentry-system", env = "AGENTRY_NAMESPACE")]
    controller_namespace: String,
}

#[derive(Args)]
pub struct VerifyArgs {
    #[arg(long, short)]
    namespace: String,
    /// The AgentBackup.
    backup: String,
    #[command(flatten)]
    stores: StoreArgs,
}

#[derive(Args)]
pub struct PurgeArgs {
    #[arg(long, short)]
    namespace: String,
    #[arg(long)]
    agent: String,
    /// Really delete (without it, only list what would go).
    #[arg(long)]
    yes: bool,
    #[command(flatten)]
    stores: StoreArgs,
}

pub fn run(command: BackupCommand) -> ExitCode {
    let Some(runtime) = crate::cli::runtime() else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        let client = match Client::try_default().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: connecting to the Kubernetes API (set KUBECONFIG): {e}");
                return ExitCode::FAILURE;
            }
        };
        let outcome = match command {
            BackupCommand::Ls(a) => ls(client, a).await,
            BackupCommand::Create(a) => create(client, a).await,
            BackupCommand::Restore(a) => restore(client, a).await,
            BackupCommand::Verify(a) => verify(client, a).await,
            BackupCommand::Scrub(a) => scrub(client, a).await,
            BackupCommand::Reindex(a) => reindex(client, a).await,
            BackupCommand::Purge(a) => purge(client, a).await,
        };
        match outcome {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn ls(client: Client, a: LsArgs) -> anyhow::Result<ExitCode> {
    let api: Api<AgentBackup> = match &a.namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let mut list = api.list(&ListParams::default()).await?.items;
    list.retain(|b| a.agent.as_ref().is_none_or(|n| &b.spec.agent == n));
    list.sort_by_key(|b| {
        (
            b.namespace(),
            b.metadata.creation_timestamp.clone().map(|t| t.0),
        )
    });
    println!(
        "{:<16} {:<40} {:<20} {:<16} {:>12}  {:<16} COMPLETED",
        "NAMESPACE", "NAME", "AGENT", "PHASE", "SIZE", "BLAKE3"
    );
    for b in list {
        let s = b.status.clone().unwrap_or_default();
        println!(
            "{:<16} {:<40} {:<20} {:<16} {:>12}  {:<16} {}",
            b.namespace().unwrap_or_default(),
            b.name_any(),
            b.spec.agent,
            s.phase.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            s.size.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
            s.blake3
                .as_deref()
                .map(|h| &h[..h.len().min(16)])
                .unwrap_or("-"),
            s.completed_at.unwrap_or_else(|| "-".into())
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn create(client: Client, a: CreateArgs) -> anyhow::Result<ExitCode> {
    let now = jiff::Timestamp::now();
    let name = a
        .name
        .unwrap_or_else(|| format!("{}-manual-{}", a.agent, now.strftime("%Y%m%d%H%M%S")));
    let mut backup = AgentBackup::new(
        &name,
        AgentBackupSpec {
            agent: a.agent.clone(),
        },
    );
    backup.metadata.labels =
        Some([(agentry::keys::AGENT_LABEL.to_string(), a.agent.clone())].into());
    let api: Api<AgentBackup> = Api::namespaced(client, &a.namespace);
    api.create(&PostParams::default(), &backup).await?;
    println!("agentbackup.agentry.dev/{name} created");
    if !a.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = tokio::time::Instant::now() + a.timeout;
    let mut last = None;
    loop {
        let b = api.get(&name).await?;
        let s = b.status.unwrap_or_default();
        if s.phase != last {
            eprintln!(
                "{name}: {}",
                s.phase.map(|p| p.to_string()).unwrap_or_else(|| "-".into())
            );
            last = s.phase;
        }
        match s.phase {
            Some(BackupPhase::Completed) => {
                println!(
                    "{name}: Completed, {} bytes, BLAKE3 {}",
                    s.size.unwrap_or(0),
                    s.blake3.unwrap_or_default()
                );
                return Ok(ExitCode::SUCCESS);
            }
            Some(BackupPhase::Failed) => {
                eprintln!("{name}: Failed: {}", s.error.unwrap_or_default());
                return Ok(ExitCode::from(2));
            }
            _ => {}
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("{name} is still {:?} after {:?}", last, a.timeout);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn restore(client: Client, a: RestoreArgs) -> anyhow::Result<ExitCode> {
    let now = jiff::Timestamp::now();
    let name = format!("{}-restore-{}", a.agent, now.strftime("%Y%m%d%H%M%S"));
    let restore = AgentRestore::new(
        &name,
        AgentRestoreSpec {
            agent: a.agent.clone(),
            backup: a.backup.clone(),
        },
    );
    let api: Api<AgentRestore> = Api::namespaced(client, &a.namespace);
    api.create(&PostParams::default(), &restore).await?;
    println!("agentrestore.agentry.dev/{name} created");
    if !a.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = tokio::time::Instant::now() + a.timeout;
    let mut last = None;
    loop {
        let r = api.get(&name).await?;
        let s = r.status.unwrap_or_default();
        if s.phase != last {
            eprintln!(
                "{name}: {} {}",
                s.phase.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                s.message.clone().unwrap_or_default()
            );
            last = s.phase;
        }
        match s.phase {
            Some(RestorePhase::Completed) => return Ok(ExitCode::SUCCESS),
            Some(RestorePhase::Failed) => return Ok(ExitCode::from(2)),
            _ => {}
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("{name} is still {:?} after {:?}", last, a.timeout);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The catalog and the location's stores.
async fn open(client: &Client, a: &StoreArgs) -> anyhow::Result<(Engine, Stores)> {
    let catalog = Catalog::open(&a.data_dir)
        .map_err(|e| anyhow::anyhow!("opening the catalog under {}: {e}", a.data_dir.display()))?;
    let locations: Api<BackupLocation> = Api::all(client.clone());
    let location = locations.get(&a.location).await.map_err(|e| {
        anyhow::anyhow!(
            "reading BackupLocation {}: {e} (see `kubectl get backuplocations`)",
            a.location
        )
    })?;
    let stores = location::stores(client, &a.controller_namespace, &location).await?;
    Ok((Engine::new(Arc::new(catalog)), stores))
}

async fn verify(client: Client, a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let (engine, stores) = open(&client, &a.stores).await?;
    let id = format!("{}/{}", a.namespace, a.backup);
    let version = engine.catalog.get(&id)?.ok_or_else(|| {
        anyhow::anyhow!("backup {id} is not in the catalog (`agentry backup reindex` rebuilds it)")
    })?;
    eprintln!(
        "verifying {id}: {} bytes, BLAKE3 {}",
        version.size, version.blake3
    );
    let mut bad = 0;
    for object in &version.objects {
        let Some(store) = stores.by_name(&object.location) else {
            continue;
        };
        let started = std::time::Instant::now();
        match store
            .hash_object(&object.key, object.version_id.as_deref())
            .await
        {
            Ok((hash, size)) if hash == version.blake3 && size == version.size => println!(
                "{}: ok ({} bytes in {:.1}s)",
                object.location,
                size,
                started.elapsed().as_secs_f64()
            ),
            Ok((hash, size)) => {
                bad += 1;
                println!("{}: MISMATCH: BLAKE3 {hash}, {size} bytes", object.location)
            }
            Err(e) => {
                bad += 1;
                println!("{}: unreadable: {e}", object.location)
            }
        }
    }
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

async fn scrub(client: Client, a: StoreArgs) -> anyhow::Result<ExitCode> {
    let (engine, stores) = open(&client, &a).await?;
    let all = engine.catalog.all()?;
    let (mut healthy, mut repaired, mut lost) = (0, 0, 0);
    for (i, version) in all.iter().enumerate() {
        let result = engine.scrub_one(&stores, version).await;
        let line = match result {
            Ok(ScrubResult::Healthy) => {
                healthy += 1;
                "healthy".to_string()
            }
            Ok(ScrubResult::Repaired(what)) => {
                repaired += 1;
                format!("REPAIRED ({})", what.join("; "))
            }
            Ok(ScrubResult::Lost(why)) => {
                lost += 1;
                format!("LOST: no copy verifies ({why})")
            }
            Err(e) => {
                lost += 1;
                format!("ERROR: {e}")
            }
        };
        println!(
            "[{}/{}] {} ({} bytes): {line}",
            i + 1,
            all.len(),
            version.id,
            version.size
        );
    }
    println!(
        "scrubbed {}: {healthy} healthy, {repaired} repaired, {lost} lost or unreadable",
        all.len()
    );
    Ok(if lost == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

async fn reindex(client: Client, a: StoreArgs) -> anyhow::Result<ExitCode> {
    let (engine, stores) = open(&client, &a).await?;
    let done = engine.reindex(&stores).await?;
    for r in &done.refused {
        println!("refused: {r}");
    }
    println!(
        "reindexed: {} added, {} already catalogued, {} manifests refused",
        done.added,
        done.known,
        done.refused.len()
    );
    Ok(ExitCode::SUCCESS)
}

async fn purge(client: Client, a: PurgeArgs) -> anyhow::Result<ExitCode> {
    let (engine, stores) = open(&client, &a.stores).await?;
    let agent_id = format!("{}/{}", a.namespace, a.agent);
    let all = engine.catalog.list(&agent_id)?;
    let api: Api<AgentBackup> = Api::namespaced(client, &a.namespace);
    for version in &all {
        if !a.yes {
            println!("would delete {} ({} bytes)", version.id, version.size);
            continue;
        }
        engine.delete(&stores, version).await?;
        let name = version
            .id
            .split_once('/')
            .map_or(version.id.as_str(), |(_, b)| b);
        let _ = api.delete(name, &Default::default()).await;
        println!("deleted {}", version.id);
    }
    if !a.yes {
        println!(
            "{} backups of {agent_id}; run again with --yes to delete them",
            all.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
