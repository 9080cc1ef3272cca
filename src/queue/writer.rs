//! The one writer: a thread that owns the write connection and commits in
//! groups.
//!
//! Sessions send their message and wait for the answer. The thread takes
//! every request that is waiting, writes them all in one transaction and
//! commits once (one fsync for the lot), then answers each. A session hears
//! "committed" only after the commit that holds its own message returned.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;

use rusqlite::{params, Connection};
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    connect, sql_err, LinkState, NewMessage, NewRecipient, RecipientState, Route, StoreError,
};

/// Requests in one transaction at most: bounds the time one commit takes.
const MAX_BATCH: usize = 512;

/// One change to the store. A request's changes are applied together or
/// not at all (one savepoint), so e.g. a bounce and its DSN land at once.
/// Not Clone outside tests: a message's body may be a spool file.
#[derive(Debug)]
#[cfg_attr(test, derive(Clone))]
pub enum Change {
    /// A new message, from a session or a DSN.
    Insert(Box<NewMessage>),
    /// A recipient's new state after an attempt or an administrator's action.
    Recipient(RecipientChange),
    /// The link was found up or down at `at`.
    Link {
        state: LinkState,
        error: Option<String>,
        at: i64,
    },
    /// A flush ended.
    FlushDone { at: i64, result: String },
    /// A transaction marked with TRANSID: interrupted (what came is kept),
    /// or committed (its queue id is kept, the content is not).
    SavePartial(Box<super::Partial>),
    /// How far a big message on its way has got.
    Transfer(super::Transfer),
    /// Its outcome is recorded: no longer on its way.
    TransferDone { message_id: String },
    /// Checkpoints older than `before` are dropped (smtp.checkpoint_keep).
    PurgePartials { before: i64 },
    /// The queue's depth by state and the link's state, recorded at `at`
    /// (the status page's picture of the last day).
    Sample { at: i64 },
    /// Samples older than `before` are dropped.
    PurgeSamples { before: i64 },
    /// `bytes` more octets went to the upstream on `day` (local date).
    Sent { day: String, bytes: i64 },
    /// A delay warning went out for this recipient.
    Warned { message_id: String, idx: u32 },
    /// Hub role: held mail for `spec` (a domain, or `@domain` with its
    /// subdomains) is released for delivery, and the request remembered.
    Release { spec: String, at: i64 },
    /// Branch role: our ETRN went out, and this is what the upstream said.
    EtrnSent { at: i64, result: String },
    /// POP3 UPDATE: these mailbox entries of `user` are deleted.
    MailboxRemove { user: String, ids: Vec<i64> },
    /// A change to a user's folders (IMAP).
    Folder(super::FolderChange),
    /// Delete a message outright (administrator).
    Delete { message_id: String },
    /// Housekeeping: of the next `limit` messages after `after` (by id, so
    /// by arrival; None: from the first), delete those that are finished
    /// (every recipient delivered, bounced or expired, the last of them
    /// before `before`, and in no mailbox) with their recipients and
    /// history. Reports how many went and where to go on ([`Applied`]).
    /// Bounded, so that one request never holds the write lock long.
    Purge {
        before: i64,
        after: Option<String>,
        limit: u32,
    },
    /// Housekeeping: give up to `pages` free pages back to the file system
    /// (`PRAGMA incremental_vacuum`); reports how many went.
    Vacuum { pages: u32 },
}

/// What a request did beyond being committed, for the changes that say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// [`Change::Purge`]: messages deleted.
    pub purged: u64,
    /// [`Change::Purge`]: the last message looked at, to go on after; None
    /// when there is nothing more to look at.
    pub purge_next: Option<String>,
    /// [`Change::Vacuum`]: pages given back.
    pub vacuumed: i64,
    /// [`Writer::make_incremental`]: the database was converted.
    pub converted: bool,
    /// [`Change::Folder`]: why it was not done (the IMAP response code
    /// first), when it was not.
    pub refused: Option<String>,
    /// [`Change::Folder`] APPEND and COPY: (source UID, new UID) of each
    /// message stored (0 as the source of an APPEND)...
    pub uids: Vec<(u32, u32)>,
    /// ... in the folder with this UIDVALIDITY.
    pub uidvalidity: u32,
}

#[derive(Debug, Clone)]
pub struct RecipientChange {
    pub message_id: String,
    pub idx: u32,
    pub state: RecipientState,
    /// True when this was a delivery attempt (burns one).
    pub attempted: bool,
    pub next_attempt: i64,
    pub last_reply: Option<String>,
    pub uncertain: bool,
    pub warned: bool,
    pub at: i64,
    /// History: what happened, and the detail (reply, peer).
    pub event: &'static str,
    pub detail: String,
}

struct Request {
    work: Work,
    done: oneshot::Sender<Result<Applied, StoreError>>,
}

impl Request {
    /// The accounts whose mailboxes this request may change.
    fn mail_accounts(&self) -> Vec<&str> {
        let Work::Changes(changes) = &self.work else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for c in changes {
            match c {
                // Outbound mail, most of what a branch sends, is in no mailbox.
                Change::Insert(m) => out.extend(
                    m.recipients
                        .iter()
                        .flat_map(|r| r.mailboxes.iter().map(String::as_str)),
                ),
                Change::MailboxRemove { user, .. } => out.push(user),
                Change::Folder(f) => out.push(f.user()),
                _ => {}
            }
        }
        out
    }
}

/// A signal per account (by its name in lower case) that its mailboxes
/// may have changed: an IMAP session in IDLE waits on its own account's.
#[derive(Clone, Default)]
struct MailSignals(Arc<Mutex<HashMap<String, watch::Sender<u64>>>>);

impl MailSignals {
    fn subscribe(&self, account: &str) -> watch::Receiver<u64> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(account.to_lowercase())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn bump(&self, account: &str) {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = map.get(&account.to_lowercase()) {
            tx.send_modify(|n| *n += 1);
        }
    }
}

enum Work {
    /// Applied in the batch's transaction, in a savepoint of their own.
    Changes(Vec<Change>),
    /// Switch the database to incremental auto-vacuum (VACUUM: alone,
    /// outside any transaction).
    MakeIncremental,
}

/// A handle to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<Request>,
    mail: MailSignals,
}

/// Joined at shutdown, after every handle is dropped, so the last commits end.
pub struct WriterThread(thread::JoinHandle<()>);

impl WriterThread {
    pub fn join(self) {
        let _ = self.0.join();
    }
}

impl Writer {
    /// Starts the writer on its own connection to `path` (already migrated
    /// by [`super::Store::open`]).
    pub fn start(path: &Path) -> Result<(Writer, WriterThread), StoreError> {
        let conn = connect(path)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mail = MailSignals::default();
        let signals = mail.clone();
        let path = path.to_path_buf();
        let handle = thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run(conn, path, rx, signals))
            .map_err(|source| StoreError::Io {
                path: PathBuf::from("store-writer thread"),
                source,
            })?;
        Ok((Writer { tx, mail }, WriterThread(handle)))
    }

    /// Changes whenever a commit may have changed `account`'s mailboxes:
    /// a delivery, a POP3 deletion, an IMAP change. Sessions that show a
    /// folder (IMAP IDLE) look again when it does.
    pub fn mail_changes(&self, account: &str) -> watch::Receiver<u64> {
        self.mail.subscribe(account)
    }

    /// Commits `msg` durably; returns once it is on disk.
    pub async fn insert(&self, msg: NewMessage) -> Result<(), StoreError> {
        self.apply(vec![Change::Insert(Box::new(msg))]).await
    }

    /// Commits `changes` durably and together; returns once on disk.
    pub async fn apply(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        self.apply_reporting(changes).await.map(|_| ())
    }

    /// As [`Writer::apply`], and says what the changes did (purge, vacuum).
    pub async fn apply_reporting(&self, changes: Vec<Change>) -> Result<Applied, StoreError> {
        self.send(Work::Changes(changes)).await
    }

    /// Switches a store made before incremental auto-vacuum to it: once,
    /// with a VACUUM that rewrites the whole file (it needs free disk space
    /// about twice the database's size, and writes wait meanwhile).
    /// Returns true when it converted, false when there was nothing to do.
    pub async fn make_incremental(&self) -> Result<bool, StoreError> {
        self.send(Work::MakeIncremental).await.map(|a| a.converted)
    }

    async fn send(&self, work: Work) -> Result<Applied, StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Request { work, done })
            .map_err(|_| StoreError::WriterGone)?;
        wait.await.map_err(|_| StoreError::WriterGone)?
    }
}

fn run(
    mut conn: Connection,
    path: PathBuf,
    mut rx: mpsc::UnboundedReceiver<Request>,
    mail: MailSignals,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // A request that must run alone, met while gathering a batch.
    let mut alone: Option<Request> = None;
    loop {
        let first = match alone.take() {
            Some(r) => r,
            None => match rx.blocking_recv() {
                Some(r) => r,
                None => break,
            },
        };
        if let Work::MakeIncremental = first.work {
            let r = make_incremental(&conn, &path).map(|converted| Applied {
                converted,
                ..Applied::default()
            });
            let _ = first.done.send(r);
            continue;
        }
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) if matches!(r.work, Work::Changes(_)) => batch.push(r),
                Ok(r) => {
                    alone = Some(r);
                    break;
                }
                Err(_) => break,
            }
        }
        let results = commit(&mut conn, &path, &batch);
        for account in batch.iter().flat_map(Request::mail_accounts) {
            mail.bump(account);
        }
        for (req, result) in batch.drain(..).zip(results) {
            let _ = req.done.send(result);
        }
    }
}

/// Converts a store made with auto_vacuum NONE (before outpost set it) to
/// INCREMENTAL. VACUUM rewrites the file and cannot run in a transaction.
fn make_incremental(conn: &Connection, path: &Path) -> Result<bool, StoreError> {
    let mode: i64 = conn
        .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
        .map_err(sql_err(path))?;
    if mode == 2 {
        return Ok(false);
    }
    conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;")
        .map_err(sql_err(path))?;
    // The whole database went through the WAL: copy it back and cut the
    // WAL short now rather than at some later checkpoint. Readers may keep
    // it from finishing; journal_size_limit then trims it later.
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    Ok(true)
}

/// Writes the batch in one transaction. Each request has its own savepoint,
/// so one that cannot be written fails alone; a failed commit fails all.
///
/// On some errors (SQLITE_FULL, SQLITE_IOERR, SQLITE_NOMEM, SQLITE_BUSY:
/// SQLite's "Response To Errors Within A Transaction") SQLite may roll back
/// the whole transaction instead of the one statement. The connection is
/// then in autocommit mode: what the earlier requests wrote is gone, and a
/// later request's savepoint would start and commit a transaction of its
/// own, so that it would be stored although the batch fails. So after each
/// request the transaction must still be open; if it is not, no request of
/// the batch runs further and every one of them hears the error.
fn commit(
    conn: &mut Connection,
    path: &Path,
    batch: &[Request],
) -> Vec<Result<Applied, StoreError>> {
    let mut results: Vec<Result<Applied, StoreError>> = Vec::with_capacity(batch.len());
    let mut tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => return batch.iter().map(|_| Err(copy_err(&e, path))).collect(),
    };
    for req in batch {
        let r = (|| {
            let mut applied = Applied::default();
            let sp = tx.savepoint()?;
            if let Work::Changes(changes) = &req.work {
                for c in changes {
                    apply(&sp, c, &mut applied)?;
                }
            }
            sp.commit()?;
            Ok(applied)
        })();
        if tx.is_autocommit() {
            return rolled_back(path, batch, results, r);
        }
        results.push(r.map_err(sql_err(path)));
    }
    // Dropping an uncommitted `tx` rolls the batch back; every session in it
    // hears the error and answers 4xx, so nothing is acknowledged unstored.
    if let Err(e) = tx.commit() {
        for r in results.iter_mut().filter(|r| r.is_ok()) {
            *r = Err(copy_err(&e, path));
        }
    }
    results
}

/// The results of a batch whose transaction SQLite rolled back while it
/// ran the request after `done` (whose outcome is `last`): nothing of the
/// batch is stored, so every request fails, with the error that caused the
/// rollback (so that a full disk still reads as full, 452 4.3.1).
fn rolled_back(
    path: &Path,
    batch: &[Request],
    done: Vec<Result<Applied, StoreError>>,
    last: rusqlite::Result<Applied>,
) -> Vec<Result<Applied, StoreError>> {
    let cause = match last {
        Err(e) => e,
        // Cannot happen (a request that succeeded leaves the transaction
        // open), but if it did, its data is not stored either.
        Ok(_) => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
            Some("the transaction ended while the batch was written".into()),
        ),
    };
    tracing::error!(
        requests = batch.len(),
        error = %cause,
        "the store rolled back a whole batch: every request in it fails, none is stored"
    );
    let mut out: Vec<_> = done
        .into_iter()
        .map(|r| match r {
            // Its own error says more than the batch's.
            Err(e) => Err(e),
            Ok(_) => Err(copy_err(&cause, path)),
        })
        .collect();
    out.push(Err(copy_err(&cause, path)));
    while out.len() < batch.len() {
        out.push(Err(copy_err(&cause, path)));
    }
    out
}

fn apply(tx: &rusqlite::Savepoint<'_>, c: &Change, applied: &mut Applied) -> rusqlite::Result<()> {
    match c {
        Change::Insert(m) => insert(tx, m),
        Change::Recipient(r) => recipient(tx, r),
        Change::Link { state, error, at } => {
            // Bring the link-up clock up to date, then switch state.
            tx.prepare_cached(
                "UPDATE link SET
                    up_total = up_total + CASE WHEN state = 'up' THEN max(0, ?1 - clock_at) ELSE 0 END,
                    clock_at = ?1,
                    since = CASE WHEN state = ?2 THEN since ELSE ?1 END,
                    state = ?2,
                    last_error = ?3
                  WHERE id = 1",
            )?
            .execute(params![at, state.as_str(), error])?;
            Ok(())
        }
        Change::SavePartial(p) => {
            let envelope = serde_json::to_string(&p.envelope)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            tx.prepare_cached(
                "INSERT OR REPLACE INTO partials
                    (transid, helo, client, sender, envelope, content, size, queue_id, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                p.key.transid,
                p.key.helo,
                p.key.client,
                p.sender,
                envelope,
                rusqlite::blob::ZeroBlob(p.content.len()),
                p.size,
                p.queue_id,
                p.updated_at
            ])?;
            write_blob(tx, "partials", "content", &p.content)
        }
        Change::Transfer(t) => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO transfers
                    (message_id, upstream, size, resumed_at, sent, started_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                t.message_id,
                t.upstream,
                t.size,
                t.resumed_at,
                t.sent,
                t.started_at,
                t.updated_at
            ])?;
            Ok(())
        }
        Change::TransferDone { message_id } => {
            tx.prepare_cached("DELETE FROM transfers WHERE message_id = ?1")?
                .execute([message_id])?;
            Ok(())
        }
        Change::PurgePartials { before } => {
            tx.prepare_cached("DELETE FROM partials WHERE updated_at < ?1")?
                .execute([before])?;
            Ok(())
        }
        Change::Sample { at } => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO samples (at, queued, deferred, held, link)
                 SELECT ?1,
                        (SELECT count(*) FROM recipients WHERE state = 'queued'),
                        (SELECT count(*) FROM recipients WHERE state = 'deferred'),
                        (SELECT count(*) FROM recipients WHERE state = 'held'),
                        (SELECT state FROM link WHERE id = 1)",
            )?
            .execute([at])?;
            Ok(())
        }
        Change::PurgeSamples { before } => {
            tx.prepare_cached("DELETE FROM samples WHERE at < ?1")?
                .execute([before])?;
            Ok(())
        }
        Change::Sent { day, bytes } => {
            tx.prepare_cached(
                "INSERT INTO sent_bytes (day, bytes) VALUES (?1, ?2)
                 ON CONFLICT (day) DO UPDATE SET bytes = bytes + excluded.bytes",
            )?
            .execute(params![day, bytes])?;
            tx.prepare_cached("DELETE FROM sent_bytes WHERE day < date(?1, '-40 days')")?
                .execute([day])?;
            Ok(())
        }
        Change::FlushDone { at, result } => {
            tx.prepare_cached(
                "UPDATE link SET last_flush_at = ?1, last_flush_result = ?2 WHERE id = 1",
            )?
            .execute(params![at, result])?;
            Ok(())
        }
        Change::Warned { message_id, idx } => {
            tx.prepare_cached(
                "UPDATE recipients SET warned = 1 WHERE message_id = ?1 AND idx = ?2",
            )?
            .execute(params![message_id, idx])?;
            Ok(())
        }
        Change::Release { spec, at } => {
            let (domain, sub) = match spec.strip_prefix('@') {
                Some(d) => (d.to_ascii_lowercase(), true),
                None => (spec.to_ascii_lowercase(), false),
            };
            let released: Vec<String> = tx
                .prepare_cached(
                    "UPDATE recipients SET state = 'queued', next_attempt = ?3, updated_at = ?3
                      WHERE route = 'hold' AND state = 'held'
                        AND (domain = ?1 OR (?2 AND domain LIKE '%.' || ?1))
                     RETURNING message_id",
                )?
                .query_map(params![domain, sub, at], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut ids = released.clone();
            ids.sort();
            ids.dedup();
            for id in &ids {
                tx.prepare_cached(
                    "INSERT INTO history (message_id, at, event, detail) VALUES (?1, ?2, 'released', ?3)",
                )?
                .execute(params![id, at, format!("ETRN {spec}")])?;
            }
            tx.prepare_cached(
                "INSERT INTO etrn_requests (spec, at, released) VALUES (?1, ?2, ?3)
                 ON CONFLICT (spec) DO UPDATE SET at = excluded.at, released = excluded.released",
            )?
            .execute(params![spec.to_ascii_lowercase(), at, ids.len() as i64])?;
            Ok(())
        }
        Change::EtrnSent { at, result } => {
            tx.prepare_cached(
                "UPDATE link SET last_etrn_at = ?1, last_etrn_result = ?2 WHERE id = 1",
            )?
            .execute(params![at, result])?;
            Ok(())
        }
        Change::MailboxRemove { user, ids } => super::folders::expunge(tx, user, ids),
        Change::Folder(f) => super::folders::apply(tx, f, applied),
        Change::Delete { message_id } => {
            tx.prepare_cached("DELETE FROM messages WHERE id = ?1")?
                .execute([message_id])?;
            Ok(())
        }
        Change::Purge {
            before,
            after,
            limit,
        } => purge(tx, *before, after.as_deref(), *limit, applied),
        Change::Vacuum { pages } => {
            let free = |tx: &rusqlite::Savepoint<'_>| -> rusqlite::Result<i64> {
                tx.query_row("PRAGMA freelist_count", [], |r| r.get(0))
            };
            let before = free(tx)?;
            // The pragma frees one page per step: step it to the end.
            let mut st = tx.prepare(&format!("PRAGMA incremental_vacuum({pages})"))?;
            let mut rows = st.query([])?;
            while rows.next()?.is_some() {}
            drop(rows);
            applied.vacuumed += before - free(tx)?;
            Ok(())
        }
    }
}

/// See [`Change::Purge`]. Deleting the message deletes its body,
/// recipients and history with it (ON DELETE CASCADE).
fn purge(
    tx: &rusqlite::Savepoint<'_>,
    before: i64,
    after: Option<&str>,
    limit: u32,
    applied: &mut Applied,
) -> rusqlite::Result<()> {
    let chunk: Vec<(String, i64)> = tx
        .prepare_cached("SELECT id, received_at FROM messages WHERE id > ?1 ORDER BY id LIMIT ?2")?
        .query_map(params![after.unwrap_or(""), limit], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<_, _>>()?;
    let mut delete = tx.prepare_cached(
        "DELETE FROM messages WHERE id = ?1 AND received_at < ?2
            AND NOT EXISTS (SELECT 1 FROM recipients WHERE message_id = ?1
                               AND (state NOT IN ('delivered', 'bounced', 'expired')
                                    OR updated_at >= ?2))
            AND NOT EXISTS (SELECT 1 FROM mailbox WHERE message_id = ?1)",
    )?;
    for (id, _) in &chunk {
        applied.purged += delete.execute(params![id, before])? as u64;
    }
    // Ids sort by arrival: past a message that arrived after `before`,
    // none can be finished long enough.
    applied.purge_next = match chunk.last() {
        Some((id, received_at)) if chunk.len() == limit as usize && *received_at < before => {
            Some(id.clone())
        }
        _ => None,
    };
    Ok(())
}

fn recipient(tx: &rusqlite::Savepoint<'_>, r: &RecipientChange) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE recipients SET state = ?3, attempts = attempts + ?4, next_attempt = ?5,
                last_reply = coalesce(?6, last_reply), uncertain = ?7, warned = max(warned, ?8),
                updated_at = ?9
          WHERE message_id = ?1 AND idx = ?2",
    )?
    .execute(params![
        r.message_id,
        r.idx,
        r.state.as_str(),
        r.attempted as i64,
        r.next_attempt,
        r.last_reply,
        r.uncertain,
        r.warned,
        r.at,
    ])?;
    tx.prepare_cached(
        "INSERT INTO history (message_id, rcpt_idx, at, event, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![r.message_id, r.idx, r.at, r.event, r.detail])?;
    // The body goes once every recipient is final (any DSN is in this
    // same transaction).
    drop_body_if_done(tx, &r.message_id)
}

/// Deletes a message's body when no recipient is pending and no mailbox
/// holds it any more.
pub(super) fn drop_body_if_done(
    tx: &rusqlite::Savepoint<'_>,
    message_id: &str,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "DELETE FROM bodies WHERE message_id = ?1 AND NOT EXISTS (
            SELECT 1 FROM recipients WHERE message_id = ?1
               AND state NOT IN ('delivered', 'bounced', 'expired'))
           AND NOT EXISTS (SELECT 1 FROM mailbox WHERE message_id = ?1)",
    )?
    .execute([message_id])?;
    Ok(())
}

/// Local delivery, in the commit that stores the message: a mailbox row per
/// account that exists. With none, the recipient stays queued and says why,
/// so the administrator sees it; the message is never dropped.
fn deliver_local(
    tx: &rusqlite::Savepoint<'_>,
    m: &NewMessage,
    idx: u32,
    r: &NewRecipient,
) -> rusqlite::Result<()> {
    let mut delivered = Vec::new();
    for account in &r.mailboxes {
        let exists = tx
            .prepare_cached("SELECT 1 FROM users WHERE name = ?1")?
            .exists([account])?;
        if exists {
            let inbox = super::folders::ensure(tx, account, super::INBOX, None)?;
            // Two recipients of one message may be the same account.
            let there = tx
                .prepare_cached("SELECT 1 FROM mailbox WHERE folder_id = ?1 AND message_id = ?2")?
                .exists(params![inbox, m.id.as_str()])?;
            if !there {
                super::folders::add_reference(
                    tx,
                    account,
                    inbox,
                    m.id.as_str(),
                    m.received_at,
                    "",
                )?;
            }
            delivered.push(account.as_str());
        }
    }
    let (state, reply, event) = if delivered.is_empty() {
        (
            RecipientState::Queued,
            format!(
                "no mailbox for {}: add the account (outpost user add) or map the name in [local.aliases] / local.postmaster",
                r.address
            ),
            "undeliverable",
        )
    } else {
        (
            RecipientState::Delivered,
            format!("delivered to mailbox {}", delivered.join(", ")),
            "delivered",
        )
    };
    tx.prepare_cached(
        "UPDATE recipients SET state = ?3, last_reply = ?4 WHERE message_id = ?1 AND idx = ?2",
    )?
    .execute(params![m.id.as_str(), idx, state.as_str(), reply])?;
    tx.prepare_cached(
        "INSERT INTO history (message_id, rcpt_idx, at, event, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![m.id.as_str(), idx, m.received_at, event, reply])?;
    Ok(())
}

pub(super) fn insert(tx: &rusqlite::Savepoint<'_>, m: &NewMessage) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO messages (id, received_at, sender, size, client_addr, client_helo,
                               auth_user, protocol, body_type, smtputf8, dsn_ret, dsn_envid,
                               up_clock_at_receipt)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12,
                 (SELECT up_total + CASE WHEN state = 'up' THEN max(0, ?2 - clock_at) ELSE 0 END
                    FROM link WHERE id = 1))",
    )?
    .execute(params![
        m.id.as_str(),
        m.received_at,
        m.sender,
        m.body.len() as i64,
        m.client_addr,
        m.client_helo,
        m.auth_user,
        m.protocol,
        m.body_type,
        m.smtputf8,
        m.dsn_ret,
        m.dsn_envid,
    ])?;
    tx.prepare_cached("INSERT INTO bodies (message_id, data) VALUES (?1, zeroblob(?2))")?
        .execute(params![m.id.as_str(), m.body.len() as i64])?;
    write_blob(tx, "bodies", "data", &m.body)?;
    tx.prepare_cached(
        "INSERT INTO history (message_id, at, event, detail) VALUES (?1, ?2, 'received', ?3)",
    )?
    .execute(params![
        m.id.as_str(),
        m.received_at,
        format!(
            "from {} via {}{}",
            m.client_addr,
            m.protocol,
            m.auth_user
                .as_deref()
                .map(|u| format!(" as {u}"))
                .unwrap_or_default()
        ),
    ])?;
    let mut rcpt = tx.prepare_cached(
        "INSERT INTO recipients (message_id, idx, address, domain, route, state,
                                 next_attempt, dsn_notify, dsn_orcpt, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?7)",
    )?;
    for (i, r) in m.recipients.iter().enumerate() {
        rcpt.execute(params![
            m.id.as_str(),
            i as i64,
            r.address,
            r.domain,
            r.route.as_str(),
            r.initial_state().as_str(),
            m.received_at,
            r.dsn_notify,
            r.dsn_orcpt,
        ])?;
        if r.route == Route::Local {
            deliver_local(tx, m, i as u32, r)?;
        }
    }
    Ok(())
}

/// Fills the zeroblob of the row just inserted into `table` with `body`,
/// block by block through a blob handle: binding it as a parameter would
/// make SQLite copy it first, and a spooled body is read in blocks, never
/// held whole in memory.
fn write_blob(
    tx: &rusqlite::Savepoint<'_>,
    table: &str,
    column: &str,
    body: &super::Body,
) -> rusqlite::Result<()> {
    let rowid = tx.last_insert_rowid();
    let mut blob = tx.blob_open(rusqlite::MAIN_DB, table, column, rowid, false)?;
    let mut failed = None;
    body.copy_to(|at, block| {
        blob.write_at(block, at as usize).map_err(|e| {
            failed = Some(e);
            std::io::Error::other("blob write failed")
        })
    })
    .map_err(|e| {
        failed
            .take()
            .unwrap_or(rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
    })
}

/// rusqlite errors are not Clone; rebuild one per waiting session.
fn copy_err(e: &rusqlite::Error, path: &Path) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(code, msg) => StoreError::Sqlite {
            path: path.to_path_buf(),
            source: rusqlite::Error::SqliteFailure(*code, msg.clone()),
        },
        other => StoreError::Failed(format!("database {}: {other}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;

    fn msg(n: usize) -> NewMessage {
        NewMessage {
            id: QueueId::generate(),
            received_at: unix_now(),
            sender: format!("s{n}@x.example"),
            client_addr: "127.0.0.1".into(),
            client_helo: "h".into(),
            auth_user: None,
            protocol: "ESMTP".into(),
            body_type: None,
            smtputf8: false,
            dsn_ret: None,
            dsn_envid: None,
            recipients: vec![
                NewRecipient {
                    address: "a@up.example".into(),
                    domain: "up.example".into(),
                    route: Route::Upstream,
                    dsn_notify: None,
                    dsn_orcpt: None,
                    mailboxes: Vec::new(),
                },
                NewRecipient {
                    address: "b@hold.example".into(),
                    domain: "hold.example".into(),
                    route: Route::Hold,
                    dsn_notify: Some("FAILURE".into()),
                    dsn_orcpt: Some("rfc822;b@hold.example".into()),
                    mailboxes: Vec::new(),
                },
            ],
            body: b"Subject: t\r\n\r\nhello\r\n".to_vec().into(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_inserts_are_all_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sqlite");
        let store = Store::open(&path).unwrap();
        let (writer, thread) = Writer::start(&path).unwrap();
        let mut tasks = Vec::new();
        for n in 0..200 {
            let w = writer.clone();
            tasks.push(tokio::spawn(async move { w.insert(msg(n)).await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        drop(writer);
        thread.join();
        let list = store.list(None).unwrap();
        assert_eq!(list.len(), 200);
        assert!(list.iter().all(|m| m.recipients.len() == 2));
        let held = store.list(Some(RecipientState::Held)).unwrap();
        assert_eq!(held.len(), 200);
        let m = &list[0];
        assert_eq!(m.recipients[0].state, RecipientState::Queued);
        assert_eq!(m.recipients[1].state, RecipientState::Held);
        let detail = store.show(&m.id).unwrap().unwrap();
        assert_eq!(detail.headers.as_deref(), Some("Subject: t\r\n"));
        assert_eq!(detail.history.len(), 1);
        assert_eq!(
            store.body(&m.id).unwrap().unwrap(),
            b"Subject: t\r\n\r\nhello\r\n"
        );
    }

    /// A commit signals the accounts whose mailboxes it touches, and only
    /// those: a delivery (by the account's name in any case), a folder
    /// change; outbound mail signals no one.
    #[tokio::test]
    async fn mail_changes_reach_their_own_account_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sqlite");
        let store = Store::open(&path).unwrap();
        store.add_user("alice", "x").unwrap();
        store.add_user("bob", "x").unwrap();
        let (writer, _thread) = Writer::start(&path).unwrap();
        let mut alice = writer.mail_changes("alice");
        let bob = writer.mail_changes("bob");
        writer.insert(msg(1)).await.unwrap();
        assert!(!alice.has_changed().unwrap() && !bob.has_changed().unwrap());
        let mut local = msg(2);
        local.recipients[0].route = Route::Local;
        local.recipients[0].mailboxes = vec!["Alice".into()];
        writer.insert(local).await.unwrap();
        assert!(alice.has_changed().unwrap());
        assert!(!bob.has_changed().unwrap());
        alice.borrow_and_update();
        let ensure = FolderChange::Ensure { user: "bob".into() };
        writer.apply(vec![Change::Folder(ensure)]).await.unwrap();
        assert!(bob.has_changed().unwrap());
        assert!(!alice.has_changed().unwrap());
        assert_eq!(store.mailbox("alice").unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_failing_message_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sqlite");
        let store = Store::open(&path).unwrap();
        let (writer, _thread) = Writer::start(&path).unwrap();
        let first = msg(1);
        let mut dup = msg(2);
        dup.id = first.id.clone();
        writer.insert(first).await.unwrap();
        // Two at once: the duplicate id fails, the other is committed.
        let (a, b) = tokio::join!(writer.insert(dup), writer.insert(msg(3)));
        assert!(a.is_err());
        b.unwrap();
        assert_eq!(store.list(None).unwrap().len(), 2);
    }

    /// A batch the writer would commit: one insert per message.
    fn batch_of(msgs: &[NewMessage]) -> Vec<super::Request> {
        msgs.iter()
            .map(|m| super::Request {
                work: super::Work::Changes(vec![super::Change::Insert(Box::new(m.clone()))]),
                done: tokio::sync::oneshot::channel().0,
            })
            .collect()
    }

    #[test]
    fn a_batch_rolled_back_by_a_full_database_fails_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sqlite");
        drop(Store::open(&path).unwrap());
        let mut conn = super::connect(&path).unwrap();
        // Room for a few small messages, not for a large one.
        let pages: i64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        conn.pragma_update(None, "max_page_count", pages + 40)
            .unwrap();
        let mut big = msg(2);
        big.body = vec![b'x'; 512 * 1024].into();
        let msgs = vec![msg(1), big, msg(3), msg(4)];
        let results = super::commit(&mut conn, &path, &batch_of(&msgs));
        assert_eq!(results.len(), msgs.len());
        assert!(
            results[1].as_ref().is_err_and(|e| e.is_full()),
            "{:?}",
            results[1]
        );
        // Whoever fails hears why: a full disk (452 4.3.1, try later).
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(r.is_full(), "{r}");
        }
        // The connection is usable afterwards: no transaction left open.
        assert!(conn.is_autocommit());
        let later = msg(5);
        let after = super::commit(&mut conn, &path, &batch_of(std::slice::from_ref(&later)));
        after[0].as_ref().unwrap();
        drop(conn);
        let store = Store::open(&path).unwrap();
        assert!(store.exists(later.id.as_str()).unwrap());
        for (m, r) in msgs.iter().zip(&results) {
            // Heard Ok: stored. Heard an error: not stored (the client
            // sends it again, and a stored copy would go out twice).
            assert_eq!(
                store.exists(m.id.as_str()).unwrap(),
                r.is_ok(),
                "{} heard {r:?}",
                m.sender
            );
        }
    }

    #[test]
    fn every_schema_file_is_a_migration_in_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schema");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                e.unwrap()
                    .file_name()
                    .to_string_lossy()
                    .trim_end_matches(".sql")
                    .to_string()
            })
            .collect();
        files.sort();
        let names: Vec<String> = super::super::MIGRATIONS
            .iter()
            .map(|(n, _)| n.to_string())
            .collect();
        assert_eq!(files, names);
    }

    #[test]
    fn processes_opening_a_new_store_at_once_migrate_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sqlite");
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let p = path.clone();
                std::thread::spawn(move || Store::open(&p).map(|_| ()))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
    }

    #[test]
    fn reopening_keeps_the_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sqlite");
        drop(Store::open(&path).unwrap());
        let store = Store::open(&path).unwrap();
        store.add_user("alice", "hash").unwrap();
        assert!(matches!(
            store.add_user("ALICE", "h2"),
            Err(StoreError::UserExists(_))
        ));
        assert!(store.user_exists("Alice").unwrap());
        store.delete_user("alice", false).unwrap();
        assert!(!store.user_exists("alice").unwrap());
    }
}
