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

/// The daemon keeps the store and a self-signed key to itself: a state
/// directory it makes is 0700, the database and its WAL 0600, and with
/// `tls.self_signed` and no paths the certificate goes under the store's
/// directory (which the hardened unit may write; /etc it may not).
#[test]
fn the_store_and_the_self_signed_key_are_the_daemons_alone() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = dir.path().display();
    let port = common::free_port();
    let config = dir.path().join("outpost.toml");
    std::fs::write(
        &config,
        format!(
            "hostname = \"gw.test\"\n[store]\npath = \"{d}/state/queue.sqlite\"\n\
             [[listen]]\naddress = \"127.0.0.1:{port}\"\nmode = \"relay\"\n\
             [tls]\nself_signed = true\n\
             [control]\nsocket = \"{d}/control.sock\"\n[submit]\nsocket = \"{d}/submit.sock\"\n"
        ),
    )
    .unwrap();
    let checked = Command::new(common::BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let effective = String::from_utf8_lossy(&checked.stdout);
    assert!(
        effective.contains(&format!("certificate = \"{d}/state/tls/cert.pem\""))
            && effective.contains(&format!("key = \"{d}/state/tls/key.pem\"")),
        "{effective}"
    );
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    struct Daemon(std::process::Child);
    impl Drop for Daemon {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _daemon = Daemon(
        Command::new(common::BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let read_log = || std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    common::wait_for("outpost ready", Duration::from_secs(20), || {
        read_log().contains("outpost ready")
    });
    let mode = |p: &str| {
        std::fs::metadata(dir.path().join(p))
            .unwrap_or_else(|e| panic!("{p}: {e}\n{}", read_log()))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("state"), 0o700);
    assert_eq!(mode("state/queue.sqlite"), 0o600);
    assert_eq!(mode("state/queue.sqlite-wal"), 0o600);
    assert_eq!(mode("state/tls"), 0o700);
    assert_eq!(mode("state/tls/key.pem"), 0o600);
    assert!(dir.path().join("state/tls/cert.pem").exists());
    assert!(read_log().contains("made a self-signed certificate"));
}
