//! The sidecar's backup and restore work. It asks the API what to do (`GET .../work`), streams
//! a tar (zstd) of `spec.backup.paths` for each waiting AgentBackup, and applies Ready
//! AgentRestores: the archive is downloaded to a private temporary file while hashed, its
//! BLAKE3 compared with the catalog's, every entry checked, and only then written.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use futures::StreamExt;
use serde_json::Value;

use super::{ApiClient, ClientError};
use crate::api::backups::{BLAKE3_HEADER, Work};
use crate::backup::archive;

/// The most a restore may unpack (a guard against a decompression bomb).
pub const MAX_RESTORE_BYTES: u64 = 64 * 1024 * 1024 * 1024;

/// What one round of work did (for logs and the sidecar's /status).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Done {
    pub backups: Vec<String>,
    pub restores: Vec<String>,
    pub errors: Vec<String>,
}

/// One round: every waiting backup, then every ready restore.
pub async fn work(
    client: &ApiClient,
    token: &str,
    id: &str,
    scratch: &Path,
    root: Option<&Path>,
) -> Result<Done, ClientError> {
    let base = format!("/v1/agents/{id}");
    let work: Work = match client.get(&format!("{base}/work"), token).await {
        Ok(v) => serde_json::from_value(v)
            .map_err(|e| ClientError::Transport(format!("the work answer does not parse: {e}")))?,
        // No backup scope, or backups not served: nothing to do (said at debug level: an
        // agent without backups asks every poll).
        Err(ClientError::Refused {
            status: status @ (403 | 503),
            body,
        }) => {
            tracing::debug!(status, message = %body["message"], "no backup work for this agent");
            return Ok(Done::default());
        }
        Err(e) => return Err(e),
    };
    let mut done = Done::default();
    let roots: Vec<PathBuf> = work.paths.iter().map(|p| under(root, p)).collect();
    if let Some(p) = work.paths.iter().find(|p| touches_identity(p)) {
        let why = format!(
            "spec.backup.paths: {p:?} covers the identity mount {}; the private key and token are never backed up",
            crate::workload::IDENTITY_MOUNT
        );
        tracing::warn!("{why}");
        return Ok(Done {
            errors: vec![why],
            ..Done::default()
        });
    }
    for backup in &work.backups {
        match send_backup(client, token, &base, backup, &roots).await {
            Ok(answer) => {
                tracing::info!(backup, phase = %answer["phase"], size = %answer["size"], "backup sent");
                done.backups.push(backup.clone());
            }
            Err(e) => {
                tracing::warn!(backup, error = %e, "backup failed");
                done.errors.push(format!("backup {backup}: {e}"));
            }
        }
    }
    for restore in &work.restores {
        let outcome = apply_restore(client, token, &base, restore, &roots, scratch).await;
        let report = match &outcome {
            Ok((files, source)) => {
                serde_json::json!({"ok": true, "files": files, "source": source})
            }
            Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
        };
        if let Err(e) = client
            .post_json(&format!("{base}/restores/{}", restore.name), token, &report)
            .await
        {
            done.errors
                .push(format!("reporting restore {}: {e}", restore.name));
            continue;
        }
        match outcome {
            Ok((files, _)) => {
                tracing::info!(restore = %restore.name, backup = %restore.backup, files, "restored");
                done.restores.push(restore.name.clone());
            }
            Err(e) => {
                tracing::warn!(restore = %restore.name, error = %e, "restore refused");
                done.errors.push(format!("restore {}: {e}", restore.name));
            }
        }
    }
    Ok(done)
}

/// Whether a backup path is, holds or lies inside the identity mount (`/`, `/var`, ...).
pub fn touches_identity(path: &str) -> bool {
    let identity = Path::new(crate::workload::IDENTITY_MOUNT);
    let path = Path::new(path);
    identity.starts_with(path) || path.starts_with(identity)
}

/// `path` (absolute, from `spec.backup.paths`) below `root`, when the sidecar runs outside the
/// agent's pod (a local demo, tests); `path` itself otherwise.
pub fn under(root: Option<&Path>, path: &str) -> PathBuf {
    match root {
        Some(root) => root.join(path.trim_start_matches('/')),
        None => PathBuf::from(path),
    }
}

/// Streams the archive of `roots` to `PUT .../backups/{backup}`.
pub async fn send_backup(
    client: &ApiClient,
    token: &str,
    base: &str,
    backup: &str,
    roots: &[PathBuf],
) -> Result<Value, ClientError> {
    let body = reqwest::Body::wrap_stream(archive::pack_stream(roots.to_vec()));
    client
        .put_stream(&format!("{base}/backups/{backup}"), token, body)
        .await
}

/// Why a restore was refused.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("the archive's BLAKE3 is {found}, the catalog says {expected}: nothing was written")]
    Mismatch { found: String, expected: String },
    #[error("{0}")]
    Refused(String),
    #[error("writing the restore: {0}")]
    Write(String),
    #[error("staging the download in {path}: {error}")]
    Scratch { path: String, error: std::io::Error },
}

/// Downloads, verifies, checks and unpacks one restore; the number of files written and the
/// copy (`primary`/`secondary`) the API served.
pub async fn apply_restore(
    client: &ApiClient,
    token: &str,
    base: &str,
    restore: &crate::api::backups::RestoreWork,
    roots: &[PathBuf],
    scratch: &Path,
) -> Result<(u64, Option<String>), RestoreError> {
    let scratch_err = |error| RestoreError::Scratch {
        path: scratch.display().to_string(),
        error,
    };
    // A private, unnamed file: nothing else can read or swap it.
    let mut file = tempfile::tempfile_in(scratch).map_err(scratch_err)?;
    let response = client
        .get_stream(&format!("{base}/backups/{}", restore.backup), token)
        .await?;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let served = header(BLAKE3_HEADER);
    let source = header(crate::api::backups::SOURCE_HEADER);
    let mut received = 0u64;
    let mut hasher = blake3::Hasher::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ClientError::Transport(e.to_string()))?;
        received += chunk.len() as u64;
        if received > restore.size {
            return Err(RestoreError::Refused(format!(
                "the archive is longer than the catalog's {} bytes",
                restore.size
            )));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).map_err(scratch_err)?;
    }
    let found = hasher.finalize().to_hex().to_string();
    for expected in std::iter::once(&restore.blake3).chain(served.as_ref()) {
        if &found != expected {
            return Err(RestoreError::Mismatch {
                found,
                expected: expected.clone(),
            });
        }
    }
    file.flush().map_err(scratch_err)?;
    let roots = roots.to_vec();
    let files = tokio::task::spawn_blocking(move || -> Result<u64, RestoreError> {
        file.seek(SeekFrom::Start(0)).map_err(scratch_err_owned)?;
        archive::check(&mut file, &roots, MAX_RESTORE_BYTES)
            .map_err(|e| RestoreError::Refused(e.to_string()))?;
        file.seek(SeekFrom::Start(0)).map_err(scratch_err_owned)?;
        let summary = archive::unpack(&mut file, &roots, MAX_RESTORE_BYTES)
            .map_err(|e| RestoreError::Write(e.to_string()))?;
        Ok(summary.files)
    })
    .await
    .map_err(|e| RestoreError::Write(e.to_string()))??;
    Ok((files, source))
}

fn scratch_err_owned(error: std::io::Error) -> RestoreError {
    RestoreError::Scratch {
        path: "the staged download".into(),
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_is_never_packed() {
        for p in [
            "/",
            "/var",
            "/var/run",
            "/var/run/agentry/identity",
            "/var/run/agentry/identity/tls.key",
        ] {
            assert!(touches_identity(p), "{p}");
        }
        for p in ["/var/lib/agent", "/var/run/other", "/data"] {
            assert!(!touches_identity(p), "{p}");
        }
        assert_eq!(
            under(Some(Path::new("/demo/root")), "/var/lib/agent"),
            PathBuf::from("/demo/root/var/lib/agent")
        );
        assert_eq!(
            under(None, "/var/lib/agent"),
            PathBuf::from("/var/lib/agent")
        );
    }
}
