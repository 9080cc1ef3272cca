//! The store's lifetime in the running daemon: finished messages are
//! purged after store.keep_history, pending and mailbox mail stays, and
//! `outpost status` tells the store's size on disk.

mod common;

use std::time::Duration;

use common::{json_out, queued_id, wait_for, Client, Gateway};

fn store(g: &Gateway) -> outpost::queue::Store {
    outpost::queue::Store::open(&g.path("queue.sqlite")).unwrap()
}

fn send(g: &Gateway, from: &str, to: &str) -> String {
    let mut c = Client::connect(g.relay);
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let r = c.send_mail(
        from,
        &[to],
        b"From: a@client.test\r\nSubject: lifetime\r\n\r\nhello\r\n",
    );
    queued_id(&r).unwrap_or_else(|| panic!("not queued: {r}"))
}

#[test]
fn the_daemon_purges_finished_mail_and_keeps_the_rest() {
    // No upstream runs and nothing flushes: mail stays until bounced.
    let mut g = Gateway::start("[store]\nkeep_history = \"1s\"\n");
    g.add_user("alice", "secret-alice");
    let finished = send(&g, "", "someone@remote.example");
    let pending = send(&g, "", "other@remote.example");
    let in_mailbox = send(&g, "bob@client.test", "alice@branch.example");
    // The administrator returns one to its (null) sender: every recipient
    // is final, no DSN is made, and a second later it may go.
    let out = g.cli(&["queue", "bounce", &finished]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = store(&g);
    assert!(s.exists(&finished).unwrap());
    wait_for(
        "the bounced message to be purged",
        Duration::from_secs(30),
        || !s.exists(&finished).unwrap(),
    );
    assert!(s.show(&finished).unwrap().is_none(), "history purged too");
    // Pending mail and mail in a mailbox stay, however old.
    assert!(s.exists(&pending).unwrap());
    assert!(s.exists(&in_mailbox).unwrap());
    assert_eq!(s.mailbox("alice").unwrap().len(), 1);
    assert_eq!(g.queue_ids(), vec![pending.clone()]);

    let status = json_out(&g.cli(&["status", "--json"]));
    let st = &status["store"];
    assert_eq!(
        st["path"].as_str(),
        Some(g.path("queue.sqlite").to_str().unwrap()),
        "{status:#}"
    );
    let size = st["size_bytes"].as_u64().unwrap();
    let on_disk = std::fs::metadata(g.path("queue.sqlite")).unwrap().len();
    assert!(size >= 4096 && size <= on_disk.max(size), "{status:#}");
    assert!(st["wal_bytes"].is_u64(), "{status:#}");
    assert!(st["free_bytes"].is_u64(), "{status:#}");
    // The contract's fields are still there.
    for key in ["link", "counts", "oldest_age_seconds", "last_flush"] {
        assert!(status.get(key).is_some(), "{key} missing: {status:#}");
    }
    let text = String::from_utf8_lossy(&g.cli(&["status"]).stdout).to_string();
    assert!(
        text.lines()
            .any(|l| l.starts_with("store:") && l.contains("queue.sqlite") && l.contains("WAL")),
        "{text}"
    );
    // The housekeeping task ends with the daemon.
    assert_eq!(g.stop(), Some(0), "{}", g.log());
}
