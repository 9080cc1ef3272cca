//! The store's lifetime in the running daemon: finished messages are
//! purged after store.keep_history, pending and mailbox mail stays.

mod common;

use std::time::Duration;

use common::{queued_id, wait_for, Client, Gateway};

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

    // The housekeeping task ends with the daemon.
    assert_eq!(g.stop(), Some(0), "{}", g.log());
}
