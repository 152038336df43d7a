//! The certificate ledger: every serial the CA ever issued, in SQLite (WAL, versioned migrations,
//! file mode 0600). A certificate's row commits before the certificate leaves the CA, so no
//! Secret can hold a certificate the ledger lacks.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use rusqlite_migration::{M, Migrations};

/// Why a certificate stopped being the agent's current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertState {
    Active,
    Superseded,
    Revoked,
}

impl CertState {
    fn parse(s: &str) -> Self {
        match s {
            "active" => CertState::Active,
            "superseded" => CertState::Superseded,
            _ => CertState::Revoked,
        }
    }
}

/// RFC 5280 revocation reasons we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationReason {
    Unspecified,
    KeyCompromise,
    Superseded,
    CessationOfOperation,
    CaCompromise,
}

impl RevocationReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationReason::Unspecified => "unspecified",
            RevocationReason::KeyCompromise => "keyCompromise",
            RevocationReason::Superseded => "superseded",
            RevocationReason::CessationOfOperation => "cessationOfOperation",
            RevocationReason::CaCompromise => "cACompromise",
        }
    }
    /// Parses the value of the `agentry.dev/revoke` annotation; anything unknown is `unspecified`.
    pub fn parse(s: &str) -> Self {
        match s {
            "keyCompromise" => RevocationReason::KeyCompromise,
            "superseded" => RevocationReason::Superseded,
            "cessationOfOperation" => RevocationReason::CessationOfOperation,
            "cACompromise" | "caCompromise" => RevocationReason::CaCompromise,
            _ => RevocationReason::Unspecified,
        }
    }
}

/// The ledger key of rows adopted from a published CRL whose certificate the ledger never saw.
pub const ADOPTED_AGENT_UID: &str = "adopted-from-crl";

/// One revocation read from a published, signature-verified CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdoptedRevocation {
    /// Lowercase hex, no separators.
    pub serial: String,
    /// RFC 5280 name (`keyCompromise`, ...); `unspecified` when the CRL entry has none.
    pub reason: String,
    /// Unix seconds.
    pub revoked_at: i64,
    pub issuer_fingerprint: String,
    /// How long a placeholder row stays on the CRL (the issuing CA's notAfter).
    pub not_after: i64,
}

/// Whose rows: an Agent's uid and when it was created (unix seconds). Both are set by the
/// apiserver, never by the Agent's author, and never change.
///
/// The ledger's agent index is ordered by creation time first. Kubernetes uids are random, so
/// an index on the uid alone put every new Agent's row on a random index page: a group commit
/// of n new Agents wrote n random pages to the WAL (issuance at 0.42 of raw keygen + signing;
/// without that index at all, 0.57). Agents created together (a fleet rollout) now land next
/// to each other. Rows written before this key existed carry `created` 0 and are still found:
/// every lookup by Agent matches 0 as well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentKey {
    pub uid: String,
    pub created: i64,
}

impl AgentKey {
    pub fn new(uid: impl Into<String>, created: i64) -> Self {
        Self {
            uid: uid.into(),
            created,
        }
    }

    /// The key of an object as the apiserver returned it; None without a uid (not stored).
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<Self> {
        Some(Self::new(meta.uid.clone()?, created(meta)))
    }
}

/// An object's creationTimestamp, unix seconds (0 when absent).
pub fn created(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> i64 {
    meta.creation_timestamp
        .as_ref()
        .map_or(0, |t| t.0.as_second())
}

/// One ledger row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRecord {
    /// Lowercase hex, no separators.
    pub serial: String,
    pub agent_uid: String,
    /// When the Agent was created, unix seconds (0 on rows older than the key; see [`AgentKey`]).
    pub agent_created: i64,
    pub namespace: String,
    pub name: String,
    pub spiffe_id: String,
    /// SHA-256 of the certificate DER, lowercase hex.
    pub fingerprint: String,
    /// SHA-256 of the issuing CA certificate DER, lowercase hex.
    pub issuer_fingerprint: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    pub state: CertState,
    pub revocation_reason: Option<String>,
    pub revoked_at: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("ledger database {path}: {source}")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("ledger migration failed: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    #[error(
        "{what} {path} is at schema version {found}, newer than this agentry knows ({known}): a \
         newer agentry wrote it. Run that version (or newer), or restore the database from a \
         copy taken before the upgrade (docs/install.md, Upgrade)"
    )]
    TooNew {
        what: &'static str,
        path: String,
        found: usize,
        known: usize,
    },
    #[error("preparing ledger file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("serial {0} is already in the ledger")]
    DuplicateSerial(String),
    #[error("{0}")]
    Batch(String),
}

/// The ledger schema this version writes: the number of migrations below.
const LEDGER_SCHEMA: usize = 4;

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![M::up(
        "CREATE TABLE certificates (
            serial TEXT PRIMARY KEY NOT NULL,
            agent_uid TEXT NOT NULL,
            namespace TEXT NOT NULL,
            name TEXT NOT NULL,
            spiffe_id TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            issuer_fingerprint TEXT NOT NULL,
            not_before INTEGER NOT NULL,
            not_after INTEGER NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('active', 'superseded', 'revoked')),
            revocation_reason TEXT,
            revoked_at INTEGER,
            issued_at INTEGER NOT NULL
        ) STRICT;
        CREATE INDEX certificates_by_agent ON certificates (agent_uid, state);
        CREATE INDEX certificates_by_state ON certificates (state, not_after);
        CREATE TABLE crl_number (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL) STRICT;
        INSERT INTO crl_number VALUES (1, 0);",
    ),
    // Tokens revoked before their expiry (by jti): a token whose scopes were narrowed stops
    // working at once, not at exp. Rows are dropped once the token would have expired anyway.
    M::up(
        "CREATE TABLE revoked_tokens (
            jti TEXT PRIMARY KEY NOT NULL,
            serial TEXT NOT NULL,
            expires_at INTEGER NOT NULL,
            revoked_at INTEGER NOT NULL,
            reason TEXT NOT NULL
        ) STRICT;
        CREATE INDEX revoked_tokens_by_expiry ON revoked_tokens (expires_at);",
    ),
    // The agent index ordered by the Agent's creation time first (see `AgentKey`). Existing
    // rows get 0, which every lookup by Agent also matches.
    M::up(
        "ALTER TABLE certificates ADD COLUMN agent_created INTEGER NOT NULL DEFAULT 0;
        DROP INDEX certificates_by_agent;
        CREATE INDEX certificates_by_agent ON certificates (agent_created, agent_uid, state);",
    ),
    // The state's CHECK as comparisons: `state IN (...)` built a temporary table at each insert
    // and each state change. SQLite cannot alter a CHECK, so the table is rebuilt (the steps of
    // https://www.sqlite.org/lang_altertable.html#otheralter), every row and index kept.
    M::up(
        "CREATE TABLE certificates_v4 (
            serial TEXT PRIMARY KEY NOT NULL,
            agent_uid TEXT NOT NULL,
            namespace TEXT NOT NULL,
            name TEXT NOT NULL,
            spiffe_id TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            issuer_fingerprint TEXT NOT NULL,
            not_before INTEGER NOT NULL,
            not_after INTEGER NOT NULL,
            state TEXT NOT NULL
                CHECK (state = 'active' OR state = 'superseded' OR state = 'revoked'),
            revocation_reason TEXT,
            revoked_at INTEGER,
            issued_at INTEGER NOT NULL,
            agent_created INTEGER NOT NULL DEFAULT 0
        ) STRICT;
        INSERT INTO certificates_v4 (rowid, serial, agent_uid, namespace, name, spiffe_id,
            fingerprint, issuer_fingerprint, not_before, not_after, state, revocation_reason,
            revoked_at, issued_at, agent_created)
          SELECT rowid, serial, agent_uid, namespace, name, spiffe_id, fingerprint,
            issuer_fingerprint, not_before, not_after, state, revocation_reason, revoked_at,
            issued_at, agent_created FROM certificates;
        DROP TABLE certificates;
        ALTER TABLE certificates_v4 RENAME TO certificates;
        CREATE INDEX certificates_by_agent ON certificates (agent_created, agent_uid, state);
        CREATE INDEX certificates_by_state ON certificates (state, not_after);",
    ),
    ])
}

pub struct Ledger {
    conn: std::sync::Arc<Mutex<Connection>>,
    /// A second, read-only connection for the API's per-request lookups: in WAL mode a reader
    /// never waits for the writer's commit (fsync), so lookups can run inline on the async
    /// workers. None for an in-memory ledger (lookups share the one connection).
    reader: Option<Mutex<Connection>>,
    path: String,
    /// The issuance writer: a thread that owns the commit path. Issuers hand it their row and
    /// sleep until it answers; it writes every row queued meanwhile in one transaction (one
    /// fsync), so concurrent issuers share a durable commit without polling or a lock convoy.
    writer: Option<Writer>,
}

struct Writer {
    queue: std::sync::mpsc::Sender<Pending>,
    thread: std::thread::JoinHandle<()>,
}

struct Pending {
    record: CertRecord,
    now: i64,
    /// The answer, and the record handed back: its strings are freed by the issuer's thread
    /// that allocated them, not by the writer's (a free across threads costs the allocator a
    /// lock on the other thread's arena).
    done: std::sync::mpsc::SyncSender<(Result<(), StoreError>, CertRecord)>,
}

impl Ledger {
    /// Opens (creating with mode 0600 inside a 0700 directory) and migrates the ledger kept under
    /// `data_dir` (see [`ledger_dir`]). `data_dir` itself is created when missing but never
    /// chmod-ed: on a PersistentVolume its root belongs to root or to the fsGroup, and a
    /// non-root controller may not change it. Only the `ledger/` subdirectory, which we create
    /// and own, is tightened to 0700.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| StoreError::Io { path, source }
        };
        std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
        let dir = ledger_dir(data_dir);
        create_private_dir(&dir).map_err(io(&dir))?;
        move_legacy_ledger(data_dir, &dir).map_err(io(&dir))?;
        let path = dir.join("ledger.db");
        create_private_file(&path).map_err(io(&path))?;
        let conn = Connection::open(&path).map_err(|source| StoreError::Sqlite {
            path: path.display().to_string(),
            source,
        })?;
        let mut ledger = Self::init(conn, path.display().to_string())?;
        let reader = Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|c| {
            c.busy_timeout(std::time::Duration::from_secs(5))?;
            Ok(c)
        })
        .map_err(|source| StoreError::Sqlite {
            path: path.display().to_string(),
            source,
        })?;
        ledger.reader = Some(Mutex::new(reader));
        Ok(ledger)
    }

    /// An in-memory ledger, for unit tests and benchmarks of the pure issuance path.
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
        durable(&conn).map_err(sql)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql)?;
        migrate(
            "ledger database",
            &migrations(),
            LEDGER_SCHEMA,
            &mut conn,
            &path,
        )?;
        let conn = std::sync::Arc::new(Mutex::new(conn));
        let (queue, rows) = std::sync::mpsc::channel();
        let thread = {
            let (conn, writer_path) = (conn.clone(), path.clone());
            std::thread::Builder::new()
                .name("ledger-writer".into())
                .spawn(move || write_batches(&conn, &writer_path, &rows))
                .map_err(|source| StoreError::Io {
                    path: path.clone(),
                    source,
                })?
        };
        Ok(Self {
            conn,
            reader: None,
            path,
            writer: Some(Writer { queue, thread }),
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

    /// Records a new active certificate and supersedes the agent's previous active one, in one
    /// transaction. Returns only once committed.
    pub fn record_issued(&self, rec: &CertRecord, now: i64) -> Result<(), StoreError> {
        self.record(rec.clone(), now).map(drop)
    }

    /// [`Self::record_issued`] for a record the caller gives up until the answer, which hands
    /// it back once committed (the issuance path: no copy of the record per certificate).
    pub fn record(&self, record: CertRecord, now: i64) -> Result<CertRecord, StoreError> {
        let gone = || StoreError::Batch(format!("ledger database {}: writer stopped", self.path));
        let writer = self.writer.as_ref().ok_or_else(gone)?;
        // One slot: the writer's answer never waits, and the channel allocates nothing more.
        let (done, answer) = std::sync::mpsc::sync_channel(1);
        let pending = Pending { record, now, done };
        writer.queue.send(pending).map_err(|_| gone())?;
        let (outcome, record) = answer.recv().map_err(|_| gone())?;
        outcome.map(|()| record)
    }

    pub fn get(&self, serial: &str) -> Result<Option<CertRecord>, StoreError> {
        self.conn()
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM certificates WHERE serial = ?1"
            ))
            .and_then(|mut s| s.query_row(params![serial], row_to_record).optional())
            .map_err(self.sql())
    }

    /// Revokes one token by its `jti` until `expires_at` (its exp). Idempotent; expired rows
    /// are pruned on the way.
    pub fn revoke_token(
        &self,
        jti: &str,
        serial: &str,
        expires_at: i64,
        reason: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute(
            "DELETE FROM revoked_tokens WHERE expires_at < ?1",
            params![now],
        )
        .map_err(self.sql())?;
        conn.execute(
            "INSERT OR IGNORE INTO revoked_tokens (jti, serial, expires_at, revoked_at, reason)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![jti, serial, expires_at, now, reason],
        )
        .map_err(self.sql())?;
        Ok(())
    }

    /// Whether a token was revoked by its `jti` (read-only connection; fast enough to call
    /// inline).
    pub fn is_token_revoked(&self, jti: &str) -> Result<bool, StoreError> {
        self.read_conn()
            .prepare_cached("SELECT 1 FROM revoked_tokens WHERE jti = ?1")
            .and_then(|mut s| s.exists(params![jti]))
            .map_err(self.sql())
    }

    /// A certificate's row, read on the read-only connection (sees every committed write; fast
    /// enough to call inline).
    pub fn lookup(&self, serial: &str) -> Result<Option<CertRecord>, StoreError> {
        self.read_conn()
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM certificates WHERE serial = ?1"
            ))
            .and_then(|mut s| s.query_row(params![serial], row_to_record).optional())
            .map_err(self.sql())
    }

    fn read_conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        match &self.reader {
            Some(r) => r.lock().unwrap_or_else(|p| p.into_inner()),
            None => self.conn(),
        }
    }

    /// Revokes one certificate. Returns false when it was unknown or already revoked.
    pub fn revoke(
        &self,
        serial: &str,
        reason: RevocationReason,
        now: i64,
    ) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute(
                "UPDATE certificates SET state = 'revoked', revocation_reason = ?2, revoked_at = ?3
                 WHERE serial = ?1 AND state != 'revoked'",
                params![serial, reason.as_str(), now],
            )
            .map_err(self.sql())?;
        Ok(n > 0)
    }

    /// Revokes what an agent actually uses: the certificate `deployed` (a serial read from its
    /// Secret and already verified to be this agent's) and the agent's active certificate, both
    /// only when they belong to `agent`. Returns the serials revoked now, in one transaction.
    pub fn revoke_deployed(
        &self,
        agent: &AgentKey,
        deployed: Option<&str>,
        reason: RevocationReason,
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn();
        let run = |conn: &mut Connection| -> rusqlite::Result<Vec<String>> {
            let tx = conn.transaction()?;
            let serials = tx
                .prepare(REVOKE_DEPLOYED)?
                .query_map(
                    params![agent.uid, deployed, reason.as_str(), now, agent.created],
                    |r| r.get::<_, String>(0),
                )?
                .collect::<Result<Vec<_>, _>>()?;
            tx.commit()?;
            Ok(serials)
        };
        run(&mut conn).map_err(self.sql())
    }

    /// Revokes every unexpired certificate of an agent (on deletion). Returns how many.
    pub fn revoke_agent(
        &self,
        agent: &AgentKey,
        reason: RevocationReason,
        now: i64,
    ) -> Result<usize, StoreError> {
        self.revoke_agent_serials(agent, reason, now)
            .map(|s| s.len())
    }

    /// Revokes the unexpired certificates recorded under `agent` (the exact ledger key, uid
    /// included) other than `keep`: when a CSR-bootstrapped agent gets a new certificate, the
    /// old key is cut off rather than left valid until it expires. Returns the serials revoked
    /// now.
    pub fn revoke_others(
        &self,
        agent: &AgentKey,
        keep: &str,
        reason: RevocationReason,
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        self.serials_of(
            REVOKE_OTHERS,
            params![agent.uid, keep, reason.as_str(), now, agent.created],
        )
    }

    /// Revokes every unexpired certificate of an agent, superseded ones included, and those
    /// issued to it through a CSR (on deletion, or `keyCompromise`). Returns the serials
    /// revoked now.
    pub fn revoke_agent_serials(
        &self,
        agent: &AgentKey,
        reason: RevocationReason,
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        self.serials_of(
            REVOKE_AGENT,
            params![agent.uid, reason.as_str(), now, agent.created],
        )
    }

    /// Runs an `UPDATE ... RETURNING serial` (a cached statement) and collects the serials.
    fn serials_of(
        &self,
        sql: &str,
        params: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(sql).map_err(self.sql())?;
        stmt.query_map(params, |r| r.get::<_, String>(0))
            .map_err(self.sql())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql())
    }

    /// Revoked certificates that have not expired yet: what the CRL must list.
    pub fn revoked_unexpired(&self, now: i64) -> Result<Vec<CertRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM certificates WHERE state = 'revoked' AND not_after > ?1 ORDER BY revoked_at"
            ))
            .map_err(self.sql())?;
        let rows = stmt
            .query_map(params![now], row_to_record)
            .map_err(self.sql())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql())?;
        Ok(rows)
    }

    /// The next CRL number (monotonic, persisted).
    pub fn next_crl_number(&self) -> Result<u64, StoreError> {
        let conn = self.conn();
        conn.query_row(
            "UPDATE crl_number SET value = value + 1 WHERE id = 1 RETURNING value",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map(|v| v as u64)
        .map_err(self.sql())
    }

    /// The last CRL number taken (0 before the first CRL).
    pub fn crl_number(&self) -> Result<u64, StoreError> {
        self.conn()
            .query_row("SELECT value FROM crl_number WHERE id = 1", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|v| v as u64)
            .map_err(self.sql())
    }

    /// Of `serials`, those the ledger does not hold as revoked (unknown, or not revoked): what a
    /// CRL published from this ledger would drop.
    pub fn not_revoked<'a>(&self, serials: &'a [String]) -> Result<Vec<&'a str>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT 1 FROM certificates WHERE serial = ?1 AND state = 'revoked'")
            .map_err(self.sql())?;
        let mut missing = Vec::new();
        for serial in serials {
            if !stmt.exists(params![serial]).map_err(self.sql())? {
                missing.push(serial.as_str());
            }
        }
        Ok(missing)
    }

    /// Applies revocations taken from a published, signature-verified CRL (`agentry controller
    /// --adopt-published-crl`), in one transaction: a known serial becomes revoked (keeping an
    /// earlier revocation as it is); an unknown one (issued after the ledger's copy was taken)
    /// gets a placeholder row under [`ADOPTED_AGENT_UID`] that stays on the CRL until
    /// `not_after` (the issuing CA's end: no leaf outlives it). The CRL number moves up to
    /// `crl_number` so the next CRL is above the published one. Returns the rows changed.
    pub fn adopt_revocations(
        &self,
        revoked: &[AdoptedRevocation],
        crl_number: u64,
        now: i64,
    ) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let run = |conn: &mut Connection| -> rusqlite::Result<usize> {
            let tx = conn.transaction()?;
            let mut changed = 0;
            for r in revoked {
                changed += tx
                    .prepare_cached(
                        "UPDATE certificates SET state = 'revoked', revocation_reason = ?2, revoked_at = ?3
                         WHERE serial = ?1 AND state != 'revoked'",
                    )?
                    .execute(params![r.serial, r.reason, r.revoked_at])?;
                changed += tx
                    .prepare_cached(
                        "INSERT INTO certificates (serial, agent_uid, namespace, name, spiffe_id, fingerprint,
                            issuer_fingerprint, not_before, not_after, state, revocation_reason, revoked_at, issued_at)
                         VALUES (?1, ?2, '', '', '', '', ?3, 0, ?4, 'revoked', ?5, ?6, ?7)
                         ON CONFLICT(serial) DO NOTHING",
                    )?
                    .execute(params![
                        r.serial,
                        ADOPTED_AGENT_UID,
                        r.issuer_fingerprint,
                        r.not_after,
                        r.reason,
                        r.revoked_at,
                        now
                    ])?;
            }
            tx.execute(
                "UPDATE crl_number SET value = MAX(value, ?1) WHERE id = 1",
                params![crl_number as i64],
            )?;
            tx.commit()?;
            Ok(changed)
        };
        run(&mut conn).map_err(self.sql())
    }

    /// The soonest expiry among active certificates, unix seconds.
    pub fn nearest_active_expiry(&self) -> Result<Option<i64>, StoreError> {
        self.conn()
            .query_row(
                "SELECT MIN(not_after) FROM certificates WHERE state = 'active'",
                [],
                |r| r.get::<_, Option<i64>>(0),
            )
            .map_err(self.sql())
    }

    /// Active, unexpired certificates issued by a CA other than `issuer_fingerprint` (to
    /// re-issue on rotation; an expired one cannot hold the old CA's retirement up).
    pub fn active_not_issued_by(
        &self,
        issuer_fingerprint: &str,
        now: i64,
    ) -> Result<usize, StoreError> {
        self.conn()
            .query_row(
                "SELECT COUNT(*) FROM certificates WHERE state = 'active' AND issuer_fingerprint != ?1 AND not_after > ?2",
                params![issuer_fingerprint, now],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as usize)
            .map_err(self.sql())
    }

    /// `(journal_mode, synchronous)` of the connection: `("wal", 2)` (FULL) is what makes a
    /// commit durable before a certificate is handed out.
    pub fn durability(&self) -> Result<(String, i64), StoreError> {
        let conn = self.conn();
        let mode = conn
            .pragma_query_value(None, "journal_mode", |r| r.get::<_, String>(0))
            .map_err(self.sql())?;
        let sync = conn
            .pragma_query_value(None, "synchronous", |r| r.get::<_, i64>(0))
            .map_err(self.sql())?;
        Ok((mode, sync))
    }

    pub fn count(&self) -> Result<usize, StoreError> {
        self.conn()
            .query_row("SELECT COUNT(*) FROM certificates", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as usize)
            .map_err(self.sql())
    }
}

// The statements that find an Agent's rows. Each must search the agent index by creation time
// and uid (a test checks the query plans): with `agent_created IN (0, ?)` alone, a ledger with
// many rows from before the key would be scanned.

/// What an Agent actually uses (`Ledger::revoke_deployed`).
const REVOKE_DEPLOYED: &str =
    "UPDATE certificates SET state = 'revoked', revocation_reason = ?3, revoked_at = ?4
                     WHERE agent_created IN (0, ?5) AND agent_uid IN (?1, ?1 || '/csr')
                       AND state != 'revoked'
                       AND ((agent_uid = ?1 AND (state = 'active' OR serial = ?2))
                            OR (agent_uid = ?1 || '/csr' AND state = 'active'))
                     RETURNING serial";

/// An Agent's rows but one (`Ledger::revoke_others`).
const REVOKE_OTHERS: &str =
    "UPDATE certificates SET state = 'revoked', revocation_reason = ?3, revoked_at = ?4
             WHERE agent_created IN (0, ?5) AND agent_uid = ?1 AND serial != ?2
               AND state != 'revoked' AND not_after > ?4
             RETURNING serial";

/// Every unexpired row of an Agent (`Ledger::revoke_agent_serials`).
const REVOKE_AGENT: &str =
    "UPDATE certificates SET state = 'revoked', revocation_reason = ?2, revoked_at = ?3
             WHERE agent_created IN (0, ?4) AND agent_uid IN (?1, ?1 || '/csr')
               AND state != 'revoked' AND not_after > ?3
             RETURNING serial";

/// The Agent's active certificates, by row: run once with its creation time and once with 0
/// (rows written before the agent key). An equality probe of the agent index each; `IN (0, ?)`
/// would build a temporary table per row, and an UPDATE searching by the very index column it
/// changes (`state`) another: on the issuance path, where a new Agent has nothing to supersede,
/// that was most of the writer's time per row.
const ACTIVE_OF_AGENT: &str = "SELECT rowid FROM certificates
                 WHERE agent_created = ?2 AND agent_uid = ?1 AND state = 'active'";
const SUPERSEDE_ROW: &str = "UPDATE certificates SET state = 'superseded' WHERE rowid = ?1";
const INSERT_ISSUED: &str = "INSERT INTO certificates (serial, agent_uid, namespace, name, spiffe_id,
                    fingerprint, issuer_fingerprint, not_before, not_after, state, issued_at, agent_created)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'active', ?10, ?11)
                 ON CONFLICT(serial) DO NOTHING";

const COLUMNS: &str =
    "serial, agent_uid, namespace, name, spiffe_id, fingerprint, issuer_fingerprint,
    not_before, not_after, state, revocation_reason, revoked_at, agent_created";

fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<CertRecord> {
    Ok(CertRecord {
        serial: r.get(0)?,
        agent_uid: r.get(1)?,
        namespace: r.get(2)?,
        name: r.get(3)?,
        spiffe_id: r.get(4)?,
        fingerprint: r.get(5)?,
        issuer_fingerprint: r.get(6)?,
        not_before: r.get(7)?,
        not_after: r.get(8)?,
        state: CertState::parse(&r.get::<_, String>(9)?),
        revocation_reason: r.get(10)?,
        revoked_at: r.get(11)?,
        agent_created: r.get(12)?,
    })
}

/// Where the ledger files live inside the controller's data directory.
pub fn ledger_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("ledger")
}

/// Versions before 0.2 kept `ledger.db` (and its WAL) directly in the data directory: move them
/// into the private subdirectory once, so an upgrade keeps every serial and revocation.
fn move_legacy_ledger(data_dir: &Path, dir: &Path) -> std::io::Result<()> {
    if !data_dir.join("ledger.db").exists() || dir.join("ledger.db").exists() {
        return Ok(());
    }
    for suffix in ["", "-wal", "-shm"] {
        let from = data_dir.join(format!("ledger.db{suffix}"));
        if from.exists() {
            std::fs::rename(&from, dir.join(format!("ledger.db{suffix}")))?;
        }
    }
    Ok(())
}

/// The writer thread's loop: waits for one row, takes every row queued behind it, commits them
/// in one transaction and answers each issuer. Ends when the ledger is dropped.
fn write_batches(conn: &Mutex<Connection>, path: &str, rows: &std::sync::mpsc::Receiver<Pending>) {
    while let Ok(first) = rows.recv() {
        let mut batch = vec![first];
        batch.extend(rows.try_iter());
        let outcomes = commit_batch(
            &mut conn.lock().unwrap_or_else(|p| p.into_inner()),
            path,
            &batch,
        );
        for (p, outcome) in batch.into_iter().zip(outcomes) {
            let _ = p.done.send((outcome, p.record));
        }
    }
}

/// Marks the Agent's active certificates superseded (before its new one goes in).
fn supersede(tx: &rusqlite::Transaction, uid: &str, created: i64) -> rusqlite::Result<()> {
    let keys: &[i64] = if created == 0 { &[0] } else { &[created, 0] };
    let mut active = Vec::new();
    let mut probe = tx.prepare_cached(ACTIVE_OF_AGENT)?;
    for key in keys {
        for row in probe.query_map(params![uid, key], |r| r.get::<_, i64>(0))? {
            active.push(row?);
        }
    }
    let mut mark = tx.prepare_cached(SUPERSEDE_ROW)?;
    for rowid in active {
        mark.execute(params![rowid])?;
    }
    Ok(())
}

/// Writes a batch in one transaction. Per-row outcomes: a duplicate serial fails alone; a
/// failed commit fails them all (and nothing of the batch is stored).
fn commit_batch(
    conn: &mut Connection,
    path: &str,
    batch: &[Pending],
) -> Vec<Result<(), StoreError>> {
    let run = |conn: &mut Connection| -> Result<Vec<bool>, rusqlite::Error> {
        let tx = conn.transaction()?;
        let mut inserted = Vec::with_capacity(batch.len());
        for p in batch {
            let (rec, now) = (&p.record, p.now);
            supersede(&tx, &rec.agent_uid, rec.agent_created)?;
            let n = tx.prepare_cached(INSERT_ISSUED)?.execute(params![
                rec.serial,
                rec.agent_uid,
                rec.namespace,
                rec.name,
                rec.spiffe_id,
                rec.fingerprint,
                rec.issuer_fingerprint,
                rec.not_before,
                rec.not_after,
                now,
                rec.agent_created
            ])?;
            inserted.push(n > 0);
        }
        tx.commit()?;
        Ok(inserted)
    };
    match run(conn) {
        Ok(inserted) => batch
            .iter()
            .zip(inserted)
            .map(|(p, ok)| {
                if ok {
                    Ok(())
                } else {
                    Err(StoreError::DuplicateSerial(p.record.serial.clone()))
                }
            })
            .collect(),
        Err(e) => batch
            .iter()
            .map(|_| Err(StoreError::Batch(format!("ledger database {path}: {e}"))))
            .collect(),
    }
}

/// Migrates `conn` (a `what`, e.g. "ledger database", at `path`) to the `known`-th schema, the
/// last of `migrations`, in one transaction; a database a newer agentry migrated further is
/// refused by name and left as it is.
pub fn migrate(
    what: &'static str,
    migrations: &Migrations,
    known: usize,
    conn: &mut Connection,
    path: &str,
) -> Result<(), StoreError> {
    if let rusqlite_migration::SchemaVersion::Outside(found) = migrations.current_version(conn)? {
        return Err(StoreError::TooNew {
            what,
            path: path.to_string(),
            found: found.get(),
            known,
        });
    }
    migrations.to_latest(conn)?;
    Ok(())
}

/// WAL survives a crash mid-write; FULL makes each commit durable before its result is handed
/// out (a certificate, a catalogued backup).
pub fn durable(conn: &Connection) -> rusqlite::Result<()> {
    // Another process (the `agentry backup` CLI) may hold the write lock for a moment.
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")
}

/// Creates `dir` (and parents) with mode 0700, tightening it if it already exists. Only for
/// directories this process owns (never a volume's root).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Creates `path` with mode 0600 if missing, and tightens it to 0600 if it exists.
fn create_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

impl Drop for Ledger {
    /// Stops the writer and waits for it, so the database is closed when the ledger is gone
    /// (a restore or a test may reopen the file at once).
    fn drop(&mut self) {
        if let Some(Writer { queue, thread }) = self.writer.take() {
            drop(queue);
            let _ = thread.join();
        }
    }
}

impl CertState {
    pub fn is_active(self) -> bool {
        self == CertState::Active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(serial: &str, uid: &str, not_after: i64) -> CertRecord {
        CertRecord {
            serial: serial.into(),
            agent_uid: uid.into(),
            agent_created: 1_700_000_000,
            namespace: "ns".into(),
            name: "a".into(),
            spiffe_id: "spiffe://cluster.local/ns/ns/agent/a".into(),
            fingerprint: "ff".into(),
            issuer_fingerprint: "ca1".into(),
            not_before: 0,
            not_after,
            state: CertState::Active,
            revocation_reason: None,
            revoked_at: None,
        }
    }

    #[test]
    fn issuing_supersedes_and_revocation_feeds_the_crl() {
        let l = Ledger::in_memory().unwrap();
        l.record_issued(&rec("01", "u1", 1000), 1).unwrap();
        l.record_issued(&rec("02", "u1", 2000), 2).unwrap();
        assert_eq!(l.get("01").unwrap().unwrap().state, CertState::Superseded);
        assert_eq!(l.get("02").unwrap().unwrap().state, CertState::Active);
        assert!(matches!(
            l.record_issued(&rec("02", "u2", 2000), 3),
            Err(StoreError::DuplicateSerial(_))
        ));
        // Revoking an agent revokes its unexpired certificates, superseded ones too.
        assert_eq!(
            l.revoke_agent(
                &AgentKey::new("u1", 1_700_000_000),
                RevocationReason::CessationOfOperation,
                500,
            )
            .unwrap(),
            2
        );
        let crl = l.revoked_unexpired(500).unwrap();
        assert_eq!(crl.len(), 2);
        // Expired ones drop off the CRL.
        assert_eq!(l.revoked_unexpired(1500).unwrap().len(), 1);
        assert!(
            !l.revoke("02", RevocationReason::KeyCompromise, 600)
                .unwrap()
        );
        assert_eq!(l.next_crl_number().unwrap(), 1);
        assert_eq!(l.next_crl_number().unwrap(), 2);
    }

    #[test]
    fn ledger_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let l = Ledger::open(&data).unwrap();
        l.record_issued(&rec("01", "u1", 1000), 1).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let private = ledger_dir(&data);
        assert_eq!(mode(&private), 0o700);
        assert_eq!(mode(&private.join("ledger.db")), 0o600);
        assert_eq!(mode(&private.join("ledger.db-wal")), 0o600);
        drop(l);
        // Reopening migrates nothing and keeps the rows.
        let l = Ledger::open(&data).unwrap();
        assert_eq!(l.count().unwrap(), 1);
    }

    /// A PersistentVolume's root is not ours (root-owned, group-writable by the fsGroup): the
    /// ledger must not chmod it, only create its own private subdirectory.
    #[test]
    fn the_data_directory_itself_is_never_chmodded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let volume = dir.path().join("volume");
        std::fs::create_dir(&volume).unwrap();
        std::fs::set_permissions(&volume, std::fs::Permissions::from_mode(0o2775)).unwrap();
        let l = Ledger::open(&volume).unwrap();
        l.record_issued(&rec("01", "u1", 1000), 1).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&volume), 0o2775, "the volume root keeps its mode");
        assert_eq!(mode(&ledger_dir(&volume)) & 0o777, 0o700);
    }

    /// A ledger written by an older version (directly in the data directory) moves into the
    /// private subdirectory with every row.
    #[test]
    fn a_legacy_ledger_is_moved_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join("ledger.db")).unwrap();
            let l = Ledger::init(conn, "legacy".into()).unwrap();
            l.record_issued(&rec("0a", "u1", 1000), 1).unwrap();
        }
        let l = Ledger::open(dir.path()).unwrap();
        assert_eq!(l.count().unwrap(), 1);
        assert!(l.get("0a").unwrap().is_some());
        assert!(!dir.path().join("ledger.db").exists());
    }

    /// Revoking what is deployed touches only the named agent's rows: a serial of another agent
    /// (serials are public) revokes nothing.
    #[test]
    fn revoking_the_deployed_certificate_is_confined_to_its_agent() {
        let l = Ledger::in_memory().unwrap();
        l.record_issued(&rec("01", "victim", 5000), 1).unwrap();
        l.record_issued(&rec("02", "attacker", 5000), 1).unwrap();
        l.record_issued(&rec("03", "attacker", 5000), 2).unwrap();
        // The attacker names the victim's serial as "deployed": only its own active row goes.
        let revoked = l
            .revoke_deployed(
                &AgentKey::new("attacker", 1_700_000_000),
                Some("01"),
                RevocationReason::KeyCompromise,
                10,
            )
            .unwrap();
        assert_eq!(revoked, vec!["03".to_string()]);
        assert_eq!(l.get("01").unwrap().unwrap().state, CertState::Active);
        // A superseded certificate still deployed (crash between issue and Secret write) is
        // revoked together with the active one.
        l.record_issued(&rec("04", "victim", 5000), 3).unwrap();
        let mut revoked = l
            .revoke_deployed(
                &AgentKey::new("victim", 1_700_000_000),
                Some("01"),
                RevocationReason::Unspecified,
                11,
            )
            .unwrap();
        revoked.sort();
        assert_eq!(revoked, vec!["01".to_string(), "04".to_string()]);
    }

    #[test]
    fn concurrent_issuers_share_commits_and_every_row_lands() {
        let dir = tempfile::tempdir().unwrap();
        let l = std::sync::Arc::new(Ledger::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        l.record_issued(
                            &rec(&format!("{t:02x}{i:04x}"), &format!("u{t}-{i}"), 1000),
                            1,
                        )
                        .unwrap();
                    }
                    // A duplicate fails alone.
                    assert!(matches!(
                        l.record_issued(&rec(&format!("{t:02x}0000"), "dup", 1000), 1),
                        Err(StoreError::DuplicateSerial(_))
                    ));
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(l.count().unwrap(), 1600);
    }

    #[test]
    fn migrations_are_valid() {
        migrations().validate().unwrap();
        let mut conn = Connection::open_in_memory().unwrap();
        migrations().to_latest(&mut conn).unwrap();
        assert_eq!(
            usize::from(&migrations().current_version(&conn).unwrap()),
            LEDGER_SCHEMA
        );
    }

    #[test]
    fn a_ledger_from_a_newer_agentry_is_refused_by_name_and_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        Ledger::open(dir.path())
            .unwrap()
            .record_issued(&rec("01", "u1", 1000), 1)
            .unwrap();
        let path = ledger_dir(dir.path()).join("ledger.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", LEDGER_SCHEMA as i64 + 1)
            .unwrap();
        let err = Ledger::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains(&path.display().to_string())
                && err.contains(&format!("schema version {}", LEDGER_SCHEMA + 1))
                && err.starts_with("ledger database")
                && err.contains("restore the database"),
            "{err}"
        );
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, LEDGER_SCHEMA as i64 + 1);
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM certificates", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1);
    }

    /// Column `column` of `<how> <sql>` (EXPLAIN or EXPLAIN QUERY PLAN), each parameter bound
    /// to its index.
    fn explain(l: &Ledger, how: &str, sql: &str, column: usize) -> Vec<String> {
        let conn = l.conn();
        let mut stmt = conn.prepare(&format!("{how} {sql}")).unwrap();
        let params = stmt.parameter_count();
        stmt.query_map(
            rusqlite::params_from_iter((0..params).map(|i| i as i64)),
            |r| r.get(column),
        )
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    #[test]
    fn every_lookup_by_agent_searches_the_agent_index_by_creation_time_and_uid() {
        let l = Ledger::in_memory().unwrap();
        for sql in [
            ACTIVE_OF_AGENT,
            REVOKE_DEPLOYED,
            REVOKE_OTHERS,
            REVOKE_AGENT,
        ] {
            let plan = explain(&l, "EXPLAIN QUERY PLAN", sql, 3);
            assert!(
                plan.iter()
                    .any(|p| p
                        .contains("INDEX certificates_by_agent (agent_created=? AND agent_uid=?")),
                "{sql}\nplans as {plan:?}"
            );
        }
    }

    #[test]
    fn the_issuance_path_builds_no_temporary_table_per_row() {
        let l = Ledger::in_memory().unwrap();
        for sql in [ACTIVE_OF_AGENT, SUPERSEDE_ROW, INSERT_ISSUED] {
            let ops = explain(&l, "EXPLAIN", sql, 1);
            assert!(
                !ops.iter().any(|op| op == "OpenEphemeral"),
                "{sql}\nopens a temporary table: {ops:?}"
            );
        }
    }

    #[test]
    fn the_state_check_rebuild_keeps_every_row_and_still_refuses_an_unknown_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger").join("ledger.db");
        let before = {
            // A ledger at the schema before the rebuild (3), rows in every state.
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let mut conn = Connection::open(&path).unwrap();
            migrations().to_version(&mut conn, 3).unwrap();
            let rows = [
                ("01", "superseded", None, None),
                ("02", "active", None, None),
                ("03", "revoked", Some("keyCompromise"), Some(4)),
            ];
            for (serial, state, reason, revoked_at) in rows {
                conn.execute(
                    "INSERT INTO certificates (serial, agent_uid, namespace, name, spiffe_id,
                        fingerprint, issuer_fingerprint, not_before, not_after, state,
                        revocation_reason, revoked_at, issued_at, agent_created)
                     VALUES (?1, 'u1', 'ns', 'a', 's', 'f', 'i', 0, 5000, ?2, ?3, ?4, 1, 7)",
                    params![serial, state, reason, revoked_at],
                )
                .unwrap();
            }
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {COLUMNS} FROM certificates ORDER BY serial"
                ))
                .unwrap();
            stmt.query_map([], row_to_record)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
        };
        let l = Ledger::open(dir.path()).unwrap();
        let after: Vec<_> = ["01", "02", "03"]
            .map(|s| l.get(s).unwrap().unwrap())
            .into();
        assert_eq!(after, before);
        assert_eq!(
            after.iter().map(|r| r.state).collect::<Vec<_>>(),
            [CertState::Superseded, CertState::Active, CertState::Revoked]
        );
        assert_eq!(after[2].revoked_at, Some(4));
        let refused = l.conn().execute(
            "UPDATE certificates SET state = 'forgotten' WHERE serial = '01'",
            [],
        );
        assert!(
            refused.is_err_and(|e| e.to_string().contains("CHECK")),
            "an unknown state was stored"
        );
        assert_eq!(l.get("01").unwrap().unwrap().state, CertState::Superseded);
    }

    #[test]
    fn rows_written_before_the_agent_key_are_still_the_agents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger").join("ledger.db");
        {
            // A ledger at the schema before the key: its rows have no creation time.
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let mut conn = Connection::open(&path).unwrap();
            migrations().to_version(&mut conn, 2).unwrap();
            for (serial, state) in [("0a", "superseded"), ("0b", "active")] {
                conn.execute(
                    "INSERT INTO certificates (serial, agent_uid, namespace, name, spiffe_id,
                        fingerprint, issuer_fingerprint, not_before, not_after, state, issued_at)
                     VALUES (?1, 'u1', 'ns', 'a', 's', 'f', 'i', 0, 5000, ?2, 0)",
                    params![serial, state],
                )
                .unwrap();
            }
        }
        let l = Ledger::open(dir.path()).unwrap();
        assert_eq!(l.get("0b").unwrap().unwrap().agent_created, 0);
        // A certificate issued after the upgrade supersedes the old active one...
        l.record_issued(&rec("0c", "u1", 5000), 1).unwrap();
        assert_eq!(l.get("0b").unwrap().unwrap().state, CertState::Superseded);
        assert_eq!(l.get("0c").unwrap().unwrap().agent_created, 1_700_000_000);
        // ...and the Agent's deletion revokes the old rows with the new one.
        let key = AgentKey::new("u1", 1_700_000_000);
        let mut revoked = l
            .revoke_agent_serials(&key, RevocationReason::CessationOfOperation, 10)
            .unwrap();
        revoked.sort();
        assert_eq!(revoked, ["0a", "0b", "0c"]);
        // Another Agent's key (same uid string, another creation time) finds none of them.
        l.record_issued(&rec("0d", "u2", 5000), 2).unwrap();
        let stranger = AgentKey::new("u2", 1_600_000_000);
        assert!(
            l.revoke_agent_serials(&stranger, RevocationReason::Unspecified, 11)
                .unwrap()
                .is_empty()
        );
    }
}
