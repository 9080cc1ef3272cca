//! The store: the only code that opens the database.
//!
//! SQLite in WAL mode with `synchronous=FULL`, so a commit that returned is on
//! disk. Schema files in `schema/` are applied in order at open
//! (`PRAGMA user_version` counts them). In the daemon, message writes go
//! through one [`Writer`] thread that commits many sessions' messages in one
//! transaction; reads use their own connections.

mod body;
mod folders;
mod housekeeping;
mod model;
mod observe;
pub mod space;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

pub use body::{spool_dir, Body, Spool, SPILL_OVER};
pub use folders::{
    canonical as canonical_folder, merge_flags, FlagOp, Folder, FolderChange, INBOX, SPECIAL_USE,
};
pub use housekeeping::{housekeeping, housekeeping_interval, run_housekeeping, Housekeeping};
pub use model::*;
pub use observe::{Sample, SAMPLES_KEPT};
pub use writer::{Applied, Change, RecipientChange, Writer, WriterThread};

/// Schema migrations, in order. Each is applied once; never edit a shipped one.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_initial",
        include_str!("../../schema/0001_initial.sql"),
    ),
    ("0002_flush", include_str!("../../schema/0002_flush.sql")),
    (
        "0003_mailboxes",
        include_str!("../../schema/0003_mailboxes.sql"),
    ),
    ("0004_etrn", include_str!("../../schema/0004_etrn.sql")),
    (
        "0005_windows",
        include_str!("../../schema/0005_windows.sql"),
    ),
    (
        "0006_checkpoint",
        include_str!("../../schema/0006_checkpoint.sql"),
    ),
    (
        "0007_samples",
        include_str!("../../schema/0007_samples.sql"),
    ),
    ("0008_imap", include_str!("../../schema/0008_imap.sql")),
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("database {path} has schema version {found}, newer than this outpost knows ({known}): run the newer outpost or restore a backup")]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("{0}")]
    Failed(String),
    #[error("the store's writer has stopped")]
    WriterGone,
    #[error("no such account: {0}")]
    NoSuchUser(String),
    #[error("account {0} exists already")]
    UserExists(String),
    #[error("account {0} has {1} messages in its mailbox: add --force to delete it with them")]
    UserHasMail(String, i64),
}

impl StoreError {
    /// True when the disk (or the database) is full: SMTP says 452 4.3.1.
    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Sqlite { source: rusqlite::Error::SqliteFailure(e, _), .. }
            if e.code == rusqlite::ErrorCode::DiskFull)
    }
}

pub(crate) fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| StoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `path` empty with mode 0600 when it does not exist, so that
/// nobody but its owner ever reads it (SQLite gives the `-wal` and `-shm`
/// files the database's mode). Run as root in a directory someone else owns
/// (`outpost user add` before the daemon's first start), the file goes to
/// that directory's owner, or the daemon could not open it. An existing
/// file of ours that others may read (made by an older outpost, through
/// the umask) is made private, with its `-wal` and `-shm`. Returns whether
/// it made the file.
pub(crate) fn private_file(path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {
            if rustix::process::geteuid().is_root() {
                let dir = path
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                let owner = std::fs::metadata(dir)?;
                if owner.uid() != 0 {
                    std::os::unix::fs::chown(path, Some(owner.uid()), Some(owner.gid()))?;
                }
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = std::fs::metadata(path)?;
            let mode = meta.permissions().mode();
            if meta.uid() == rustix::process::geteuid().as_raw() && mode & 0o077 != 0 {
                for suffix in ["", "-wal", "-shm"] {
                    let mut p = path.as_os_str().to_owned();
                    p.push(suffix);
                    match std::fs::set_permissions(
                        &p,
                        std::fs::Permissions::from_mode(mode & 0o700),
                    ) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
            }
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Creates the directory `dir` (and its parents) with mode 0700 when missing.
pub(crate) fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Opens a connection with the settings every connection needs.
pub(crate) fn connect(path: &Path) -> Result<Connection, StoreError> {
    private_file(path).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
            " (the store belongs to the user the daemon runs as: run this as root or as that user)"
        } else {
            ""
        };
        StoreError::Failed(format!("{}: {e}{hint}", path.display()))
    })?;
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql_err(path))?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(sql_err(path))?;
    // auto_vacuum first: it only takes effect on a database that has no
    // table yet (a new one); an older store is converted once by the
    // daemon's housekeeping (see `Writer::make_incremental`). INCREMENTAL
    // lets housekeeping give free pages back to the file system.
    // FULL: a commit is durable once it returns, also on power loss (NORMAL
    // in WAL mode may lose the last commits).
    // journal_size_limit: a WAL that grew past it (a long read, a burst) is
    // cut back to it once checkpointed, instead of keeping its largest size.
    let pragmas = format!(
        "PRAGMA auto_vacuum = INCREMENTAL;
         PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT};"
    );
    // Switching a new database to WAL needs it to itself for an instant;
    // when another process opens it at the same moment SQLite answers
    // "busy" at once instead of waiting (the busy handler does not run for
    // that lock), so wait here, as long as the busy timeout would.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match conn.execute_batch(&pragmas) {
            Ok(()) => return Ok(conn),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(sql_err(path)(e)),
        }
    }
}

/// Bytes the WAL file is cut back to after a checkpoint.
pub const JOURNAL_SIZE_LIMIT: i64 = 64 << 20;

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let read_version = |c: &Connection| -> Result<i64, StoreError> {
        c.query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql_err(path))
    };
    let known = MIGRATIONS.len() as i64;
    let too_new = |found| StoreError::TooNew {
        path: path.to_path_buf(),
        found,
        known,
    };
    let version = read_version(conn)?;
    if version > known {
        return Err(too_new(version));
    }
    if version == known {
        return Ok(());
    }
    // Under the write lock, and reading the version again: two processes
    // starting at once (the daemon and a command) must not both migrate.
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(sql_err(path))?;
    let version = read_version(&tx)?;
    for (i, (_name, sql)) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql).map_err(sql_err(path))?;
        tx.pragma_update(None, "user_version", i as i64 + 1)
            .map_err(sql_err(path))?;
    }
    tx.commit().map_err(sql_err(path))?;
    Ok(())
}

/// Read access (and the rare administrative write) on one connection.
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens the database at `path`, creating it and its directory when
    /// missing, and brings the schema up to date.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            private_dir(dir).map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let mut conn = connect(path)?;
        migrate(&mut conn, path)?;
        Ok(Store {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(sql_err(&self.path))
    }

    /// Messages that still have a recipient to deliver, oldest first.
    /// `state` keeps only messages with a recipient in that state.
    pub fn list(&self, state: Option<RecipientState>) -> Result<Vec<MessageSummary>, StoreError> {
        self.with(|c| {
            let mut msgs = c.prepare_cached(
                "SELECT m.id, m.received_at, m.size, m.sender, m.protocol
                   FROM messages m
                  WHERE EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id
                                   AND r.state IN ('queued', 'deferred', 'held'))
                  ORDER BY m.received_at, m.id",
            )?;
            let mut rcpts = c.prepare_cached(
                "SELECT message_id, address, state, attempts, next_attempt, last_reply, route
                   FROM recipients
                  WHERE message_id IN (SELECT message_id FROM recipients
                                        WHERE state IN ('queued', 'deferred', 'held'))
                  ORDER BY message_id, idx",
            )?;
            let mut by_id: std::collections::HashMap<String, Vec<RecipientStatus>> =
                std::collections::HashMap::new();
            let rows = rcpts.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, recipient_status(r, 1)?))
            })?;
            for row in rows {
                let (id, rs) = row?;
                by_id.entry(id).or_default().push(rs);
            }
            let rows = msgs.query_map([], message_summary)?;
            let mut out = Vec::new();
            for m in rows {
                let mut m = m?;
                m.recipients = by_id.remove(&m.id).unwrap_or_default();
                if state.is_none_or(|s| m.recipients.iter().any(|r| r.state == s)) {
                    out.push(m);
                }
            }
            Ok(out)
        })
    }

    /// Everything known about one message, or None.
    pub fn show(&self, id: &str) -> Result<Option<MessageDetail>, StoreError> {
        self.with(|c| {
            let msg = c
                .query_row(
                    "SELECT id, received_at, size, sender, protocol, client_addr, client_helo,
                            auth_user, body_type, smtputf8, dsn_ret, dsn_envid
                       FROM messages WHERE id = ?1",
                    [id],
                    |r| {
                        Ok(MessageDetail {
                            summary: MessageSummary {
                                id: r.get(0)?,
                                received_at: r.get(1)?,
                                size: r.get(2)?,
                                sender: r.get(3)?,
                                protocol: r.get(4)?,
                                recipients: Vec::new(),
                            },
                            client_addr: r.get(5)?,
                            client_helo: r.get(6)?,
                            auth_user: r.get(7)?,
                            body_type: r.get(8)?,
                            smtputf8: r.get(9)?,
                            dsn_ret: r.get(10)?,
                            dsn_envid: r.get(11)?,
                            headers: None,
                            history: Vec::new(),
                        })
                    },
                )
                .optional()?;
            let Some(mut msg) = msg else { return Ok(None) };
            let mut st = c.prepare_cached(
                "SELECT address, state, attempts, next_attempt, last_reply, route
                   FROM recipients WHERE message_id = ?1 ORDER BY idx",
            )?;
            msg.summary.recipients = st
                .query_map([id], |r| recipient_status(r, 0))?
                .collect::<Result<_, _>>()?;
            msg.headers = c
                .query_row("SELECT data FROM bodies WHERE message_id = ?1", [id], |r| {
                    let data: Vec<u8> = r.get(0)?;
                    Ok(header_block(&data))
                })
                .optional()?;
            let mut st = c.prepare_cached(
                "SELECT at, rcpt_idx, event, detail FROM history
                  WHERE message_id = ?1 ORDER BY at, id",
            )?;
            msg.history = st
                .query_map([id], |r| {
                    Ok(HistoryEntry {
                        at: r.get(0)?,
                        recipient: r.get(1)?,
                        event: r.get(2)?,
                        detail: r.get(3)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(Some(msg))
        })
    }

    /// The stored message bytes (Received header included).
    pub fn body(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|c| {
            c.query_row("SELECT data FROM bodies WHERE message_id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
        })
    }

    // ---- flushing ---------------------------------------------------------

    /// Every message with recipients not yet final (`queued`, `deferred` or
    /// `held`, due or not, on every route), with those recipients. Oldest
    /// first. The flusher ages them all and picks what is due.
    pub fn pending_outbound(&self) -> Result<Vec<DueMessage>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT m.id, m.received_at, m.up_clock_at_receipt, m.sender, m.body_type, m.smtputf8,
                        m.dsn_ret, m.dsn_envid,
                        r.idx, r.address, r.attempts, r.dsn_notify, r.dsn_orcpt, r.warned, r.last_reply,
                        r.domain, r.next_attempt, r.route, m.size, r.state
                   FROM recipients r JOIN messages m ON m.id = r.message_id
                  WHERE r.state IN ('queued', 'deferred', 'held')
                  ORDER BY m.received_at, m.id, r.idx",
            )?;
            let mut out: Vec<DueMessage> = Vec::new();
            let rows = st.query_map([], |r| {
                Ok((
                    DueMessage {
                        id: r.get(0)?,
                        received_at: r.get(1)?,
                        size: r.get(18)?,
                        up_clock_at_receipt: r.get(2)?,
                        sender: r.get(3)?,
                        body_type: r.get(4)?,
                        smtputf8: r.get(5)?,
                        dsn_ret: r.get(6)?,
                        dsn_envid: r.get(7)?,
                        recipients: Vec::new(),
                    },
                    DueRecipient {
                        idx: r.get(8)?,
                        address: r.get(9)?,
                        attempts: r.get(10)?,
                        notify: r.get(11)?,
                        orcpt: r.get(12)?,
                        warned: r.get(13)?,
                        last_reply: r.get(14)?,
                        domain: r.get(15)?,
                        next_attempt: r.get(16)?,
                        route: r.get::<_, String>(17)?.parse().unwrap_or(Route::Upstream),
                        state: r
                            .get::<_, String>(19)?
                            .parse()
                            .unwrap_or(RecipientState::Queued),
                    },
                ))
            })?;
            for row in rows {
                let (m, rcpt) = row?;
                match out.last_mut() {
                    Some(last) if last.id == m.id => last.recipients.push(rcpt),
                    _ => out.push(DueMessage { recipients: vec![rcpt], ..m }),
                }
            }
            Ok(out)
        })
    }

    /// Big messages on their way to the upstream, or cut on their way
    /// (only those still pending).
    pub fn transfers(&self) -> Result<Vec<Transfer>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT t.message_id, t.upstream, t.size, t.resumed_at, t.sent, t.started_at, t.updated_at
                   FROM transfers t
                  WHERE EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = t.message_id
                                   AND r.state IN ('queued', 'deferred'))
                  ORDER BY t.started_at",
            )?;
            let rows = st.query_map([], |r| {
                Ok(Transfer {
                    message_id: r.get(0)?,
                    upstream: r.get(1)?,
                    size: r.get(2)?,
                    resumed_at: r.get(3)?,
                    sent: r.get(4)?,
                    started_at: r.get(5)?,
                    updated_at: r.get(6)?,
                })
            })?;
            rows.collect()
        })
    }

    /// The checkpointed transaction `key`, if one is kept.
    pub fn partial(&self, key: &TransactionKey) -> Result<Option<Partial>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT sender, envelope, content, size, queue_id, updated_at FROM partials
                  WHERE transid = ?1 AND helo = ?2 AND client = ?3",
                params![key.transid, key.helo, key.client],
                |r| {
                    let envelope: String = r.get(1)?;
                    Ok(Partial {
                        key: key.clone(),
                        sender: r.get(0)?,
                        envelope: serde_json::from_str(&envelope).map_err(|e| {
                            rusqlite::Error::FromSqlConversionFailure(
                                1,
                                rusqlite::types::Type::Text,
                                Box::new(e),
                            )
                        })?,
                        content: Body::from(r.get::<_, Vec<u8>>(2)?),
                        size: r.get(3)?,
                        queue_id: r.get(4)?,
                        updated_at: r.get(5)?,
                    })
                },
            )
            .optional()
        })
    }

    /// True when some recipient waits to be sent (queued or deferred): an
    /// index lookup, cheap enough to ask every few seconds.
    pub fn mail_waits(&self) -> Result<bool, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT EXISTS (SELECT 1 FROM recipients WHERE state IN ('queued', 'deferred'))",
                [],
                |r| r.get(0),
            )
        })
    }

    /// Octets sent to the upstream on `day` (local, `YYYY-MM-DD`).
    pub fn sent_on(&self, day: &str) -> Result<i64, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT coalesce(sum(bytes), 0) FROM sent_bytes WHERE day = ?1",
                [day],
                |r| r.get(0),
            )
        })
    }

    /// The link row, with the link-up clock brought up to `now`.
    pub fn link(&self, now: i64) -> Result<LinkStatus, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT state, since, last_error, last_flush_at, last_flush_result,
                        up_total + CASE WHEN state = 'up' THEN max(0, ?1 - clock_at) ELSE 0 END
                   FROM link WHERE id = 1",
                [now],
                |r| {
                    let state: String = r.get(0)?;
                    Ok(LinkStatus {
                        state: state.parse().unwrap_or(LinkState::Unknown),
                        since: r.get(1)?,
                        last_error: r.get(2)?,
                        last_flush_at: r.get(3)?,
                        last_flush_result: r.get(4)?,
                        up_clock: r.get(5)?,
                    })
                },
            )
        })
    }

    /// Recipients by state (of messages that still have a body or are pending),
    /// the received time of the oldest pending message, and the number of
    /// recipients whose delivery is uncertain.
    pub fn counts(&self) -> Result<QueueCounts, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT state, count(*) FROM recipients
                  WHERE state IN ('queued', 'deferred', 'held') GROUP BY state",
            )?;
            let by_state = st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            let oldest: Option<i64> = c.query_row(
                "SELECT min(m.received_at) FROM messages m WHERE EXISTS (
                    SELECT 1 FROM recipients r WHERE r.message_id = m.id
                       AND r.state IN ('queued', 'deferred', 'held'))",
                [],
                |r| r.get(0),
            )?;
            let uncertain: i64 = c.query_row(
                "SELECT count(*) FROM recipients WHERE uncertain = 1 AND state IN ('queued', 'deferred', 'held')",
                [],
                |r| r.get(0),
            )?;
            let next_due: Option<i64> = c.query_row(
                "SELECT min(next_attempt) FROM recipients
                  WHERE route = 'upstream' AND state IN ('queued', 'deferred')",
                [],
                |r| r.get(0),
            )?;
            Ok(QueueCounts { by_state, oldest, uncertain, next_due })
        })
    }

    /// Pending recipients of `ids` (all pending messages when `ids` is empty),
    /// for administrative commands.
    pub fn pending_recipients(&self, ids: &[String]) -> Result<Vec<PendingRecipient>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT message_id, idx, state, route FROM recipients
                  WHERE state IN ('queued', 'deferred', 'held') ORDER BY message_id, idx",
            )?;
            let rows = st.query_map([], |r| {
                let s: String = r.get(2)?;
                let route: String = r.get(3)?;
                Ok(PendingRecipient {
                    message_id: r.get(0)?,
                    idx: r.get(1)?,
                    state: s.parse().unwrap_or(RecipientState::Queued),
                    route: route.parse().unwrap_or(Route::Upstream),
                })
            })?;
            let mut out = Vec::new();
            for row in rows {
                let row = row?;
                if ids.is_empty() || ids.contains(&row.message_id) {
                    out.push(row);
                }
            }
            Ok(out)
        })
    }

    /// Hub role: held messages per hold domain, with when the domain last
    /// asked (ETRN or flush --domain).
    pub fn held_by_domain(&self) -> Result<Vec<HeldDomain>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT r.domain, count(DISTINCT r.message_id),
                        (SELECT max(at) FROM etrn_requests e
                          WHERE e.spec = r.domain
                             OR (substr(e.spec, 1, 1) = '@'
                                 AND (r.domain = substr(e.spec, 2) OR r.domain LIKE '%.' || substr(e.spec, 2))))
                   FROM recipients r WHERE r.route = 'hold' AND r.state = 'held'
                  GROUP BY r.domain ORDER BY r.domain",
            )?;
            let rows = st.query_map([], |r| {
                Ok(HeldDomain { domain: r.get(0)?, messages: r.get(1)?, last_asked: r.get(2)? })
            })?;
            rows.collect()
        })
    }

    /// Hub role: how many messages are held for `spec` (a domain, or
    /// `@domain` with its subdomains).
    pub fn held_count(&self, spec: &str) -> Result<i64, StoreError> {
        let (domain, sub) = match spec.strip_prefix('@') {
            Some(d) => (d.to_ascii_lowercase(), true),
            None => (spec.to_ascii_lowercase(), false),
        };
        self.with(|c| {
            c.prepare_cached(
                "SELECT count(DISTINCT message_id) FROM recipients
                  WHERE route = 'hold' AND state = 'held'
                    AND (domain = ?1 OR (?2 AND domain LIKE '%.' || ?1))",
            )?
            .query_row(params![domain, sub], |r| r.get(0))
        })
    }

    /// Branch role: the last ETRN answers, and when.
    pub fn last_etrn(&self) -> Result<(Option<i64>, Option<String>), StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT last_etrn_at, last_etrn_result FROM link WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
    }

    /// True when a message with this id exists.
    pub fn exists(&self, id: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            c.prepare_cached("SELECT 1 FROM messages WHERE id = ?1")?
                .exists([id])
        })
    }

    // ---- the file ---------------------------------------------------------

    /// The database's pages: how many, how many free, and their size.
    pub fn pages(&self) -> Result<PageStats, StoreError> {
        self.with(|c| {
            let get = |pragma: &str| c.query_row(&format!("PRAGMA {pragma}"), [], |r| r.get(0));
            Ok(PageStats {
                pages: get("page_count")?,
                free: get("freelist_count")?,
                size: get("page_size")?,
                auto_vacuum: get("auto_vacuum")?,
            })
        })
    }

    /// Bytes on disk: the database file and its WAL (either may be absent:
    /// 0), and the bytes of free pages inside the database.
    pub fn disk_usage(&self) -> Result<DiskUsage, StoreError> {
        let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        let pages = self.pages()?;
        Ok(DiskUsage {
            size_bytes: len(&self.path),
            wal_bytes: len(Path::new(&wal)),
            free_bytes: (pages.free * pages.size).max(0) as u64,
        })
    }

    /// Copies what the WAL holds into the database, without waiting for
    /// (or blocking) readers or the writer (PASSIVE): what it cannot copy
    /// now, the next one does. Returns (frames in the WAL, frames copied).
    pub fn checkpoint(&self) -> Result<(i64, i64), StoreError> {
        self.with(|c| {
            c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(1)?, r.get(2)?))
            })
        })
    }

    // ---- mailboxes ------------------------------------------------------

    /// Octets in `user`'s mailbox.
    pub fn mailbox_usage(&self, user: &str) -> Result<i64, StoreError> {
        self.with(|c| {
            c.prepare_cached(
                "SELECT coalesce(sum(m.size), 0) FROM mailbox mb JOIN messages m ON m.id = mb.message_id
                  WHERE mb.user = ?1",
            )?
            .query_row([user], |r| r.get(0))
        })
    }

    /// `user`'s INBOX, oldest first: the POP3 maildrop.
    pub fn mailbox(&self, user: &str) -> Result<Vec<MailboxEntry>, StoreError> {
        match self.folder(user, folders::INBOX)? {
            Some(f) => self.folder_messages(user, f.id),
            None => Ok(Vec::new()),
        }
    }

    // ---- accounts -------------------------------------------------------

    pub fn user_exists(&self, name: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            c.prepare_cached("SELECT 1 FROM users WHERE name = ?1")?
                .exists([name])
        })
    }

    pub fn password_hash(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            c.prepare_cached("SELECT password_hash FROM users WHERE name = ?1")?
                .query_row([name], |r| r.get(0))
                .optional()
        })
    }

    pub fn users(&self) -> Result<Vec<UserRow>, StoreError> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT name, created_at, updated_at FROM users ORDER BY name")?;
            let rows = st.query_map([], |r| {
                Ok(UserRow {
                    name: r.get(0)?,
                    created_at: r.get(1)?,
                    updated_at: r.get(2)?,
                })
            })?;
            rows.collect()
        })
    }

    pub fn add_user(&self, name: &str, hash: &str) -> Result<(), StoreError> {
        let now = unix_now();
        let added = self.with(|c| {
            c.execute(
                "INSERT INTO users (name, password_hash, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?3) ON CONFLICT DO NOTHING",
                params![name, hash, now],
            )
        })?;
        if added == 0 {
            return Err(StoreError::UserExists(name.into()));
        }
        Ok(())
    }

    pub fn set_password(&self, name: &str, hash: &str) -> Result<(), StoreError> {
        let n = self.with(|c| {
            c.execute(
                "UPDATE users SET password_hash = ?2, updated_at = ?3 WHERE name = ?1",
                params![name, hash, unix_now()],
            )
        })?;
        if n == 0 {
            return Err(StoreError::NoSuchUser(name.into()));
        }
        Ok(())
    }

    /// Removes an account. With mail in its mailbox, only with `force`,
    /// and then the mail goes too.
    pub fn delete_user(&self, name: &str, force: bool) -> Result<(), StoreError> {
        let r = self.with(|c| {
            let tx = c.transaction()?;
            let mail: i64 = tx.query_row(
                "SELECT count(*) FROM mailbox WHERE user = ?1",
                [name],
                |r| r.get(0),
            )?;
            if mail > 0 && !force {
                return Ok(Err(StoreError::UserHasMail(name.into(), mail)));
            }
            let ids: Vec<String> = tx
                .prepare("DELETE FROM mailbox WHERE user = ?1 RETURNING message_id")?
                .query_map([name], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            for id in ids {
                tx.execute(
                    "DELETE FROM bodies WHERE message_id = ?1 AND NOT EXISTS (
                        SELECT 1 FROM recipients WHERE message_id = ?1
                           AND state NOT IN ('delivered', 'bounced', 'expired'))
                       AND NOT EXISTS (SELECT 1 FROM mailbox WHERE message_id = ?1)",
                    [&id],
                )?;
            }
            tx.execute("DELETE FROM folders WHERE user = ?1", [name])?;
            let n = tx.execute("DELETE FROM users WHERE name = ?1", [name])?;
            if n == 0 {
                return Ok(Err(StoreError::NoSuchUser(name.into())));
            }
            tx.commit()?;
            Ok(Ok(()))
        })?;
        r
    }
}

/// A message's row (`id, received_at, size, sender, protocol`), its
/// recipients still to be read.
fn message_summary(r: &rusqlite::Row<'_>) -> rusqlite::Result<MessageSummary> {
    Ok(MessageSummary {
        id: r.get(0)?,
        received_at: r.get(1)?,
        size: r.get(2)?,
        sender: r.get(3)?,
        protocol: r.get(4)?,
        recipients: Vec::new(),
    })
}

fn recipient_status(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<RecipientStatus> {
    let state: String = r.get(at + 1)?;
    let route: String = r.get(at + 5)?;
    Ok(RecipientStatus {
        address: r.get(at)?,
        state: state.parse().map_err(|e: String| {
            rusqlite::Error::FromSqlConversionFailure(at + 1, rusqlite::types::Type::Text, e.into())
        })?,
        attempts: r.get(at + 2)?,
        next_attempt: r.get(at + 3)?,
        last_reply: r.get(at + 4)?,
        route: route.parse().map_err(|e: String| {
            rusqlite::Error::FromSqlConversionFailure(at + 5, rusqlite::types::Type::Text, e.into())
        })?,
    })
}

/// The header section of a stored message (up to the empty line).
fn header_block(data: &[u8]) -> String {
    let end = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
        .unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_store_is_readable_by_its_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        // Whatever the umask says.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("state/queue.sqlite");
        let store = Store::open(&path).unwrap();
        store.add_user("alice", "a password").unwrap();
        assert_eq!(mode(&dir.path().join("state")), 0o700);
        for f in ["queue.sqlite", "queue.sqlite-wal", "queue.sqlite-shm"] {
            assert_eq!(mode(&dir.path().join("state").join(f)), 0o600, "{f}");
        }
        drop(store);
        // A store an older outpost made through a looser umask is made
        // private when it is next opened, with its WAL.
        for f in ["queue.sqlite", "queue.sqlite-wal"] {
            let p = dir.path().join("state").join(f);
            if p.exists() {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
            }
        }
        let store = Store::open(&path).unwrap();
        assert!(store.user_exists("alice").unwrap());
        assert_eq!(mode(&path), 0o600);
        let wal = dir.path().join("state/queue.sqlite-wal");
        if wal.exists() {
            assert_eq!(mode(&wal), 0o600);
        }
    }

    #[test]
    fn a_store_root_makes_goes_to_the_owner_of_its_directory() {
        use std::os::unix::fs::MetadataExt;
        if !rustix::process::geteuid().is_root() {
            eprintln!("only root makes files for another user: nothing to check");
            return;
        }
        // `outpost user add` as root before the daemon (user outpost, here
        // nobody's uid) ever started: the daemon must be able to open it.
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        private_dir(&state).unwrap();
        std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
        let path = state.join("queue.sqlite");
        let store = Store::open(&path).unwrap();
        store.add_user("alice", "a password").unwrap();
        for f in ["queue.sqlite", "queue.sqlite-wal", "queue.sqlite-shm"] {
            let meta = std::fs::metadata(state.join(f)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "{f}");
            assert_eq!(meta.mode() & 0o777, 0o600, "{f}");
        }
    }
}
