//! Housekeeping: a lifetime for every row and a bounded database file.
//!
//! A finished message (every recipient delivered, bounced or expired, and
//! in no mailbox) stays for `queue show` during `store.keep_history`, then
//! goes with its recipients and history. The pages that frees are given
//! back to the file system (incremental auto-vacuum) when enough of the
//! file is free, and the WAL is checkpointed. Every write goes through the
//! writer in small requests, so sessions' commits go on in between: one
//! request never holds the write lock for long.
//!
//! The daemon runs it at start and then every few minutes
//! ([`run_housekeeping`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{Change, PageStats, Store, StoreError, Writer};

/// Messages looked at per purge request: with their recipients and
/// history, at most a few thousand rows.
const PURGE_CHUNK: u32 = 500;
/// Pages given back per vacuum request (4 MiB of 4 KiB pages).
const VACUUM_CHUNK: i64 = 1024;
/// Free pages are given back once they are more than a tenth of the file
/// and at least this many: fewer are reused by new mail soon enough, and
/// giving them back only for the file to grow again costs writes.
const MIN_FREE_PAGES: i64 = 256;

/// What one housekeeping run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Housekeeping {
    /// Finished messages purged (with their recipients and history).
    pub purged: u64,
    /// Pages given back to the file system.
    pub vacuumed_pages: i64,
    /// The WAL checkpoint: frames in the WAL, frames copied to the database.
    pub wal_frames: i64,
    pub checkpointed: i64,
}

/// How often the daemon runs housekeeping: a quarter of `keep_history`,
/// between 1 s and 5 min (so every 5 minutes with the default 7 days; a
/// short keep_history, as in tests and benchmarks, purges promptly).
pub fn housekeeping_interval(keep_history: Duration) -> Duration {
    (keep_history / 4).clamp(Duration::from_secs(1), Duration::from_secs(300))
}

/// One run: purges what finished before `now - keep_history`, gives free
/// pages back when more than a tenth of the file is free, checkpoints the
/// WAL (PASSIVE: never waits for readers, never blocks the writer).
pub async fn housekeeping(
    store: &Arc<Store>,
    writer: &Writer,
    keep_history: Duration,
    now: i64,
) -> Result<Housekeeping, StoreError> {
    let mut done = Housekeeping::default();
    let before = now.saturating_sub(keep_history.as_secs().min(i64::MAX as u64) as i64);
    let mut after = None;
    loop {
        let step = writer
            .apply_reporting(vec![Change::Purge {
                before,
                after: after.take(),
                limit: PURGE_CHUNK,
            }])
            .await?;
        done.purged += step.purged;
        match step.purge_next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let pages = blocking(store, |s| s.pages()).await?;
    if pages.auto_vacuum == 2 && pages.free > (pages.pages / 10).max(MIN_FREE_PAGES) {
        let mut left = pages.free;
        while left > 0 {
            let step = writer
                .apply_reporting(vec![Change::Vacuum {
                    pages: left.min(VACUUM_CHUNK) as u32,
                }])
                .await?;
            if step.vacuumed <= 0 {
                break;
            }
            done.vacuumed_pages += step.vacuumed;
            left -= step.vacuumed;
        }
    }
    (done.wal_frames, done.checkpointed) = blocking(store, |s| s.checkpoint()).await?;
    Ok(done)
}

/// Switches a store made before outpost used incremental auto-vacuum to
/// it (once: a VACUUM of the whole file, through the writer).
async fn make_incremental(store: &Arc<Store>, writer: &Writer) -> Result<(), StoreError> {
    let pages: PageStats = blocking(store, |s| s.pages()).await?;
    if pages.auto_vacuum == 2 {
        return Ok(());
    }
    let mib = (pages.pages * pages.size) as f64 / (1 << 20) as f64;
    warn!(
        store = %store.path().display(),
        size_mib = format!("{mib:.1}"),
        "converting the store to incremental auto-vacuum, once: this rewrites the whole file and needs about as much free disk space again; mail waits meanwhile"
    );
    let started = std::time::Instant::now();
    writer.make_incremental().await?;
    info!(
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "the store now gives free space back to the file system"
    );
    Ok(())
}

/// The daemon's housekeeping task: converts an older store to incremental
/// auto-vacuum, then runs [`housekeeping`] at once and every
/// [`housekeeping_interval`] until `stop` turns true. A run that fails is
/// logged and tried again at the next interval.
pub async fn run_housekeeping(
    store: Arc<Store>,
    writer: Writer,
    keep_history: Duration,
    checkpoint_keep: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let every = housekeeping_interval(keep_history);
    let stopped = |stop: &mut watch::Receiver<bool>| {
        let mut stop = stop.clone();
        async move {
            while !*stop.borrow_and_update() {
                if stop.changed().await.is_err() {
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = stopped(&mut stop) => return,
        r = make_incremental(&store, &writer) => if let Err(e) = r {
            warn!("the store stays without incremental auto-vacuum until the next start: {e}");
        },
    }
    loop {
        let run = housekeeping(&store, &writer, keep_history, super::unix_now());
        tokio::select! {
            _ = stopped(&mut stop) => return,
            r = run => match r {
                Ok(h) if h.purged > 0 || h.vacuumed_pages > 0 => info!(
                    purged = h.purged,
                    vacuumed_pages = h.vacuumed_pages,
                    wal_frames = h.wal_frames,
                    checkpointed = h.checkpointed,
                    "store housekeeping"
                ),
                Ok(h) => debug!(
                    wal_frames = h.wal_frames,
                    checkpointed = h.checkpointed,
                    "store housekeeping: nothing to purge"
                ),
                Err(e) => warn!("store housekeeping failed, tried again in {}: {e}", humantime::format_duration(every)),
            },
        }
        // Checkpoints (RFC 1845) no client came back for.
        let before = super::unix_now() - checkpoint_keep.as_secs() as i64;
        if let Err(e) = writer.apply(vec![Change::PurgePartials { before }]).await {
            warn!("purging old checkpoints failed: {e}");
        }
        // The status page draws the last 24 hours; 48 are kept.
        let before = super::unix_now() - super::SAMPLES_KEPT;
        if let Err(e) = writer.apply(vec![Change::PurgeSamples { before }]).await {
            warn!("purging old samples failed: {e}");
        }
        tokio::select! {
            _ = stopped(&mut stop) => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Runs a store read on the blocking pool.
async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| StoreError::Failed(format!("store task: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    const DAY: i64 = 86_400;

    fn msg(received_at: i64, routes: &[Route], body: usize) -> NewMessage {
        NewMessage {
            id: QueueId::generate(),
            received_at,
            sender: "s@x.example".into(),
            client_addr: "127.0.0.1".into(),
            client_helo: "h".into(),
            auth_user: None,
            protocol: "ESMTP".into(),
            body_type: None,
            smtputf8: false,
            dsn_ret: None,
            dsn_envid: None,
            recipients: routes
                .iter()
                .map(|&route| {
                    let domain = match route {
                        Route::Upstream => "up.example",
                        Route::Local => "branch.example",
                        Route::Hold => "hold.example",
                    };
                    NewRecipient {
                        address: format!("u@{domain}"),
                        domain: domain.into(),
                        route,
                        dsn_notify: None,
                        dsn_orcpt: None,
                        mailboxes: if route == Route::Local {
                            vec!["alice".into()]
                        } else {
                            Vec::new()
                        },
                    }
                })
                .collect(),
            body: vec![b'x'; body].into(),
        }
    }

    /// Recipient `idx` of `m` becomes `state` at `at` (and the body goes
    /// when that was the last pending one).
    fn change(m: &NewMessage, idx: u32, state: RecipientState, at: i64) -> Change {
        Change::Recipient(RecipientChange {
            message_id: m.id.to_string(),
            idx,
            state,
            attempted: true,
            next_attempt: at,
            last_reply: Some("250 ok".into()),
            uncertain: false,
            warned: false,
            at,
            event: state.as_str(),
            detail: String::new(),
        })
    }

    fn count(c: &rusqlite::Connection, table: &str) -> i64 {
        c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finished_messages_go_after_keep_history_and_the_file_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sqlite");
        let store = Arc::new(Store::open(&path).unwrap());
        assert_eq!(
            store.pages().unwrap().auto_vacuum,
            2,
            "a new store is incremental"
        );
        store.add_user("alice", "hash").unwrap();
        let (writer, thread) = Writer::start(&path).unwrap();
        let now = unix_now();
        let old = now - 30 * DAY;
        let keep = Duration::from_secs(7 * DAY as u64);

        // Finished long ago: purged. More than one purge request's worth,
        // and some with large bodies (freed when they finished).
        let gone: Vec<NewMessage> = (0..1200)
            .map(|i| {
                msg(
                    old,
                    &[Route::Upstream],
                    if i % 10 == 0 { 64 * 1024 } else { 100 },
                )
            })
            .collect();
        for m in &gone {
            writer.insert(m.clone()).await.unwrap();
        }
        for (i, m) in gone.iter().enumerate() {
            let state = [
                RecipientState::Delivered,
                RecipientState::Bounced,
                RecipientState::Expired,
            ][i % 3];
            writer
                .apply(vec![change(m, 0, state, old + DAY)])
                .await
                .unwrap();
        }
        // Kept: pending, held, partly finished, finished recently, or still
        // in a mailbox.
        let queued = msg(old, &[Route::Upstream], 100);
        let deferred = msg(old, &[Route::Upstream], 100);
        let held = msg(old, &[Route::Hold], 100);
        let partly = msg(old, &[Route::Upstream, Route::Upstream], 100);
        let lately = msg(old, &[Route::Upstream], 100);
        let mailbox = msg(old, &[Route::Local], 100);
        let recent = msg(now - DAY, &[Route::Upstream], 100);
        for m in [
            &queued, &deferred, &held, &partly, &lately, &mailbox, &recent,
        ] {
            writer.insert(m.clone()).await.unwrap();
        }
        writer
            .apply(vec![
                change(&deferred, 0, RecipientState::Deferred, old + DAY),
                change(&partly, 0, RecipientState::Delivered, old + DAY),
                change(&lately, 0, RecipientState::Delivered, now - DAY),
                change(&recent, 0, RecipientState::Delivered, now - DAY),
            ])
            .await
            .unwrap();
        let kept = [
            &queued, &deferred, &held, &partly, &lately, &mailbox, &recent,
        ];

        let conn = connect(&path).unwrap();
        assert_eq!(count(&conn, "messages"), 1207);
        assert_eq!(count(&conn, "recipients"), 1208);
        let history_of = |m: &NewMessage| -> i64 {
            conn.query_row(
                "SELECT count(*) FROM history WHERE message_id = ?1",
                [m.id.as_str()],
                |r| r.get(0),
            )
            .unwrap()
        };
        let history_kept: i64 = kept.iter().map(|m| history_of(m)).sum();
        assert!(history_kept >= 11 && history_of(&gone[0]) == 2);
        let full = store.pages().unwrap();
        assert!(
            full.free > 1000,
            "the large bodies' pages are free: {full:?}"
        );

        let h = housekeeping(&store, &writer, keep, now).await.unwrap();
        assert_eq!(h.purged, 1200);
        assert!(h.vacuumed_pages >= full.free - 10, "{h:?} {full:?}");
        for m in &gone {
            assert!(!store.exists(m.id.as_str()).unwrap());
        }
        for m in kept {
            assert!(store.exists(m.id.as_str()).unwrap(), "{m:?}");
        }
        assert_eq!(count(&conn, "messages"), 7);
        assert_eq!(count(&conn, "recipients"), 8);
        assert_eq!(count(&conn, "history"), history_kept);
        assert_eq!(count(&conn, "mailbox"), 1);
        let after = store.pages().unwrap();
        assert!(
            after.pages < full.pages - 1000 && after.free < 10,
            "before {full:?}, after {after:?}"
        );
        let file = std::fs::metadata(&path).unwrap().len() as i64;
        assert!(file <= after.pages * after.size, "{file}");

        // Nothing more to do; then the mailbox entry goes (POP3 DELE), and
        // with it the last reason to keep that message.
        let h = housekeeping(&store, &writer, keep, now).await.unwrap();
        assert_eq!((h.purged, h.vacuumed_pages), (0, 0));
        let entry = store.mailbox("alice").unwrap()[0].id;
        writer
            .apply(vec![Change::MailboxRemove {
                user: "alice".into(),
                ids: vec![entry],
            }])
            .await
            .unwrap();
        let h = housekeeping(&store, &writer, keep, now).await.unwrap();
        assert_eq!(h.purged, 1);
        assert!(!store.exists(mailbox.id.as_str()).unwrap());
        assert_eq!(count(&conn, "messages"), 6);
        drop(writer);
        thread.join();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_older_store_is_made_incremental_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sqlite");
        {
            // A store as outpost made it before: auto_vacuum NONE.
            let c = rusqlite::Connection::open(&path).unwrap();
            c.execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE before_outpost (x);")
                .unwrap();
        }
        let store = Arc::new(Store::open(&path).unwrap());
        assert_eq!(store.pages().unwrap().auto_vacuum, 0);
        let (writer, thread) = Writer::start(&path).unwrap();
        // Sessions' messages keep coming meanwhile: the VACUUM runs between
        // their batches, and none of them is lost.
        let inserts: Vec<_> = (0..100)
            .map(|_| {
                let w = writer.clone();
                tokio::spawn(
                    async move { w.insert(msg(unix_now(), &[Route::Upstream], 100)).await },
                )
            })
            .collect();
        make_incremental(&store, &writer).await.unwrap();
        for t in inserts {
            t.await.unwrap().unwrap();
        }
        assert_eq!(store.pages().unwrap().auto_vacuum, 2);
        assert!(!writer.make_incremental().await.unwrap(), "converted once");
        assert_eq!(store.list(None).unwrap().len(), 100);
        drop(writer);
        thread.join();
    }

    #[test]
    fn housekeeping_runs_every_few_minutes_at_most() {
        let d = |s| Duration::from_secs(s);
        assert_eq!(housekeeping_interval(d(7 * 86_400)), d(300));
        assert_eq!(housekeeping_interval(d(60)), d(15));
        assert_eq!(housekeeping_interval(d(0)), d(1));
    }
}
