//! The backup catalog: SQLite (WAL, synchronous=FULL) with versioned migrations, next to the
//! identity ledger on the controller's data volume.
//!
//! Migrations (never edited once released; each runs in a transaction):
//! 1. `agent_backups`: the seed's table, one row per agent: its latest backup's time, storage
//!    path and checksum, and whether it was restored.
//! 2. `backup_versions`: every backup (id, agent, size, BLAKE3, the objects in each store as
//!    JSON, created/verified/restored times). Rows of version 1 are carried over, so an
//!    upgraded catalog still lists every backup it knew.
//! 3. `backup_versions.location` (the BackupLocation the copies are in; `default` for older
//!    rows) and `namespace_uid` (the uid of the namespace the backup was made in: a namespace
//!    deleted and created again, perhaps for another tenant, does not get the old one's
//!    backups; NULL for older rows, which match any).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use rusqlite_migration::{M, Migrations};
use serde::{Deserialize, Serialize};

use crate::identity::store::{StoreError, create_private_dir};

/// The catalog schema this version writes: the number of migrations below.
const CATALOG_SCHEMA: usize = 3;

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![
        M::up(
            "CREATE TABLE agent_backups (
                agent_id TEXT PRIMARY KEY,
                last_backup TIMESTAMP,
                storage_path TEXT,
                checksum TEXT,
                restored BOOLEAN DEFAULT FALSE
            );",
        ),
        M::up(
            "CREATE TABLE backup_versions (
                id TEXT PRIMARY KEY NOT NULL,
                agent_id TEXT NOT NULL,
                size INTEGER NOT NULL CHECK (size >= 0),
                blake3 TEXT NOT NULL,
                objects TEXT NOT NULL DEFAULT '[]',
                created_at TEXT NOT NULL,
                verified_at TEXT,
                restored_at TEXT
            ) STRICT;
            CREATE INDEX backup_versions_by_agent ON backup_versions (agent_id, created_at);
            INSERT INTO backup_versions (id, agent_id, size, blake3, objects, created_at, verified_at, restored_at)
                SELECT agent_id || '@' || last_backup, agent_id, 0, checksum,
                       json_array(json_object('location', 'primary', 'key', storage_path)),
                       last_backup, NULL, CASE WHEN restored THEN last_backup END
                FROM agent_backups
                WHERE last_backup IS NOT NULL AND checksum IS NOT NULL AND storage_path IS NOT NULL;",
        ),
        M::up(
            "ALTER TABLE backup_versions ADD COLUMN location TEXT NOT NULL DEFAULT 'default';
            ALTER TABLE backup_versions ADD COLUMN namespace_uid TEXT;",
        ),
    ])
}

/// One stored copy of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredObject {
    /// `primary` or `secondary`.
    pub location: String,
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// One backup, as catalogued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupVersion {
    pub id: String,
    /// `namespace/name`.
    pub agent_id: String,
    pub size: u64,
    /// Lowercase hex.
    pub blake3: String,
    pub objects: Vec<StoredObject>,
    /// RFC 3339.
    pub created_at: String,
    pub verified_at: Option<String>,
    pub restored_at: Option<String>,
    /// The BackupLocation its copies are in.
    pub location: String,
    /// The uid of the namespace it was made in (None: unknown, from an older catalog).
    pub namespace_uid: Option<String>,
}

pub struct Catalog {
    conn: Mutex<Connection>,
    path: String,
}

impl Catalog {
    /// Opens (creating 0600 inside a 0700 `catalog/` directory) and migrates the catalog under
    /// `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let dir = data_dir.join("catalog");
        create_private_dir(&dir).map_err(|source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let path = dir.join("catalog.db");
        let conn = Connection::open(&path).map_err(|source| StoreError::Sqlite {
            path: path.display().to_string(),
            source,
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
        Self::init(conn, path.display().to_string())
    }

    pub fn in_memory() -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory().map_err(|source| StoreError::Sqlite {
            path: ":memory:".into(),
            source,
        })?;
        Self::init(conn, ":memory:".into())
    }

    fn init(mut conn: Connection, path: String) -> Result<Self, StoreError> {
        let sql = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        crate::identity::store::durable(&conn).map_err(sql)?;
        crate::identity::store::migrate(
            "backup catalog",
            &migrations(),
            CATALOG_SCHEMA,
            &mut conn,
            &path,
        )?;
        Ok(Self {
            conn: Mutex::new(conn),
            path,
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// The schema version (the number of migrations applied).
    pub fn schema_version(&self) -> Result<usize, StoreError> {
        let v: i64 = self
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(self.sql())?;
        Ok(v.max(0) as usize)
    }

    /// Records a verified backup and makes it the agent's latest, in one transaction. Recording
    /// the same id again updates its copies (idempotent).
    pub fn record(&self, b: &BackupVersion) -> Result<(), StoreError> {
        let objects = serde_json::to_string(&b.objects).unwrap_or_else(|_| "[]".into());
        let primary_key = b
            .objects
            .iter()
            .find(|o| o.location == "primary")
            .map(|o| o.key.clone());
        let mut conn = self.conn();
        let run = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            tx.execute(
                "INSERT INTO backup_versions (id, agent_id, size, blake3, objects, created_at, verified_at, restored_at, location, namespace_uid)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (id) DO UPDATE SET objects = excluded.objects, verified_at = excluded.verified_at
                 WHERE backup_versions.blake3 = excluded.blake3 AND backup_versions.size = excluded.size
                   AND backup_versions.agent_id = excluded.agent_id",
                params![b.id, b.agent_id, b.size as i64, b.blake3, objects, b.created_at, b.verified_at, b.restored_at, b.location, b.namespace_uid],
            )?;
            tx.execute(
                "INSERT INTO agent_backups (agent_id, last_backup, storage_path, checksum, restored)
                 VALUES (?1, ?2, ?3, ?4, FALSE)
                 ON CONFLICT (agent_id) DO UPDATE SET last_backup = excluded.last_backup,
                     storage_path = excluded.storage_path, checksum = excluded.checksum, restored = FALSE
                 WHERE excluded.last_backup >= agent_backups.last_backup OR agent_backups.last_backup IS NULL",
                params![b.agent_id, b.created_at, primary_key, b.blake3],
            )?;
            tx.commit()
        };
        run(&mut conn).map_err(self.sql())
    }

    /// An agent's backups, newest first.
    pub fn list(&self, agent_id: &str) -> Result<Vec<BackupVersion>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, agent_id, size, blake3, objects, created_at, verified_at, restored_at, location, namespace_uid
                 FROM backup_versions WHERE agent_id = ?1 ORDER BY created_at DESC, id DESC",
            )
            .map_err(self.sql())?;
        stmt.query_map(params![agent_id], row_to_version)
            .map_err(self.sql())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql())
    }

    pub fn get(&self, id: &str) -> Result<Option<BackupVersion>, StoreError> {
        self.conn()
            .query_row(
                "SELECT id, agent_id, size, blake3, objects, created_at, verified_at, restored_at, location, namespace_uid
                 FROM backup_versions WHERE id = ?1",
                params![id],
                row_to_version,
            )
            .optional()
            .map_err(self.sql())
    }

    /// Marks a backup restored (and, when it is the agent's latest, the seed's `restored`).
    pub fn mark_restored(&self, id: &str, at: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let run = |conn: &mut Connection| -> rusqlite::Result<bool> {
            let tx = conn.transaction()?;
            let n = tx.execute(
                "UPDATE backup_versions SET restored_at = ?2 WHERE id = ?1",
                params![id, at],
            )?;
            tx.execute(
                "UPDATE agent_backups SET restored = TRUE
                 WHERE (agent_id, checksum, last_backup) IN
                       (SELECT agent_id, blake3, created_at FROM backup_versions WHERE id = ?1)",
                params![id],
            )?;
            tx.commit()?;
            Ok(n > 0)
        };
        run(&mut conn).map_err(self.sql())
    }

    /// Every backup, oldest first (scrub).
    pub fn all(&self) -> Result<Vec<BackupVersion>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, agent_id, size, blake3, objects, created_at, verified_at, restored_at, location, namespace_uid
                 FROM backup_versions ORDER BY created_at, id",
            )
            .map_err(self.sql())?;
        stmt.query_map([], row_to_version)
            .map_err(self.sql())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql())
    }

    /// Replaces a backup's stored copies (a repaired copy) and its verification time.
    pub fn update_objects(
        &self,
        id: &str,
        objects: &[StoredObject],
        verified_at: &str,
    ) -> Result<bool, StoreError> {
        let objects = serde_json::to_string(objects).unwrap_or_else(|_| "[]".into());
        let n = self
            .conn()
            .execute(
                "UPDATE backup_versions SET objects = ?2, verified_at = ?3 WHERE id = ?1",
                params![id, objects, verified_at],
            )
            .map_err(self.sql())?;
        Ok(n > 0)
    }

    /// Forgets a backup (retention, after both copies are deleted). Returns false if unknown.
    pub fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute("DELETE FROM backup_versions WHERE id = ?1", params![id])
            .map_err(self.sql())?;
        Ok(n > 0)
    }
}

fn row_to_version(r: &rusqlite::Row<'_>) -> rusqlite::Result<BackupVersion> {
    let objects: String = r.get(4)?;
    Ok(BackupVersion {
        id: r.get(0)?,
        agent_id: r.get(1)?,
        size: r.get::<_, i64>(2)?.max(0) as u64,
        blake3: r.get(3)?,
        objects: serde_json::from_str(&objects).unwrap_or_default(),
        created_at: r.get(5)?,
        verified_at: r.get(6)?,
        restored_at: r.get(7)?,
        location: r.get(8)?,
        namespace_uid: r.get(9)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(id: &str, agent: &str, created: &str) -> BackupVersion {
        BackupVersion {
            id: id.into(),
            agent_id: agent.into(),
            size: 42,
            blake3: blake3::hash(id.as_bytes()).to_hex().to_string(),
            objects: vec![
                StoredObject {
                    location: "primary".into(),
                    key: format!("{agent}/{id}.tar.zst"),
                    version_id: Some("v1".into()),
                    etag: None,
                },
                StoredObject {
                    location: "secondary".into(),
                    key: format!("{agent}/{id}.tar.zst"),
                    version_id: None,
                    etag: Some("e".into()),
                },
            ],
            created_at: created.into(),
            verified_at: Some(created.into()),
            restored_at: None,
            location: "default".into(),
            namespace_uid: Some("ns-uid".into()),
        }
    }

    #[test]
    fn migrations_are_valid() {
        migrations().validate().unwrap();
        let c = Catalog::in_memory().unwrap();
        assert_eq!(c.schema_version().unwrap(), CATALOG_SCHEMA);
    }

    #[test]
    fn a_catalog_from_a_newer_agentry_is_refused_by_name_and_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        drop(Catalog::open(dir.path()).unwrap());
        let path = dir.path().join("catalog").join("catalog.db");
        let newer = CATALOG_SCHEMA as i64 + 1;
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", newer)
            .unwrap();
        let err = Catalog::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.starts_with(&format!("backup catalog {}", path.display()))
                && err.contains(&format!("schema version {newer}")),
            "{err}"
        );
        let version: i64 = Connection::open(&path)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, newer);
    }

    #[test]
    fn records_lists_restores_and_deletes() {
        let c = Catalog::in_memory().unwrap();
        assert_eq!(c.schema_version().unwrap(), 3);
        c.record(&version("b1", "team-a/x", "2026-11-29T10:00:00Z"))
            .unwrap();
        c.record(&version("b2", "team-a/x", "2026-11-29T11:00:00Z"))
            .unwrap();
        c.record(&version("b3", "team-a/y", "2026-11-29T09:00:00Z"))
            .unwrap();
        let ids: Vec<String> = c
            .list("team-a/x")
            .unwrap()
            .into_iter()
            .map(|v| v.id)
            .collect();
        assert_eq!(ids, ["b2", "b1"], "newest first");
        assert_eq!(c.get("b1").unwrap().unwrap().objects.len(), 2);
        // The seed's table holds the latest, and its restored flag follows a restore of it.
        let latest: (String, bool) = c
            .conn()
            .query_row(
                "SELECT checksum, restored FROM agent_backups WHERE agent_id = 'team-a/x'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(latest, (blake3::hash(b"b2").to_hex().to_string(), false));
        assert!(c.mark_restored("b2", "2026-11-29T12:00:00Z").unwrap());
        let restored: bool = c
            .conn()
            .query_row(
                "SELECT restored FROM agent_backups WHERE agent_id = 'team-a/x'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(restored);
        assert!(c.delete("b1").unwrap());
        assert!(!c.delete("b1").unwrap());
        // Recording an id again (a retried secondary copy) updates it; it never duplicates,
        // and never takes another hash, size or agent.
        c.record(&version("b2", "team-a/x", "2026-11-29T11:00:00Z"))
            .unwrap();
        let mut other = version("b2", "team-a/x", "2026-11-29T11:00:00Z");
        other.blake3 = "0".repeat(64);
        other.objects.clear();
        c.record(&other).unwrap();
        assert_eq!(
            c.get("b2").unwrap().unwrap().blake3,
            blake3::hash(b"b2").to_hex().to_string()
        );
        assert_eq!(c.get("b2").unwrap().unwrap().objects.len(), 2);
        assert_eq!(c.list("team-a/x").unwrap().len(), 1, "ids are unique");
        assert!(
            c.get("b2").unwrap().unwrap().restored_at.is_some(),
            "a repeat keeps what it does not carry"
        );
    }

    /// A catalog at schema 1 with the seed's rows upgrades to the latest with nothing lost.
    #[test]
    fn upgrading_from_the_first_schema_keeps_every_backup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog");
        std::fs::create_dir_all(&path).unwrap();
        {
            let mut conn = Connection::open(path.join("catalog.db")).unwrap();
            migrations().to_version(&mut conn, 1).unwrap();
            conn.execute_batch(
                "INSERT INTO agent_backups VALUES ('team-a/x', '2026-01-01T00:00:00Z', 'team-a/x/1.tar.zst', 'abc', TRUE);
                 INSERT INTO agent_backups VALUES ('team-a/y', '2026-01-02T00:00:00Z', 'team-a/y/1.tar.zst', 'def', FALSE);
                 INSERT INTO agent_backups (agent_id) VALUES ('team-a/never');",
            )
            .unwrap();
        }
        let c = Catalog::open(dir.path()).unwrap();
        assert_eq!(c.schema_version().unwrap(), 3);
        let x = c.list("team-a/x").unwrap();
        assert_eq!(x.len(), 1);
        // Migration 3: older rows are in the default location, of an unknown namespace uid.
        assert_eq!(
            (x[0].location.as_str(), x[0].namespace_uid.as_deref()),
            ("default", None)
        );
        assert_eq!(x[0].blake3, "abc");
        assert_eq!(x[0].objects[0].key, "team-a/x/1.tar.zst");
        assert_eq!(x[0].restored_at.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(c.list("team-a/y").unwrap()[0].restored_at, None);
        assert!(
            c.list("team-a/never").unwrap().is_empty(),
            "no backup, no version"
        );
        // The seed's rows are still there.
        let n: i64 = c
            .conn()
            .query_row("SELECT COUNT(*) FROM agent_backups", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 3);
    }
}
