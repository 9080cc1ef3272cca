//! SIGHUP: a valid configuration takes effect without dropping sessions; an
//! invalid one is refused and the running one stays.

mod common;

use std::time::Duration;

use common::{free_port, queued_id, wait_for, Client, Gateway};

fn hup(g: &Gateway) {
    std::process::Command::new("kill")
        .args(["-HUP", &g.pid().to_string()])
        .status()
        .unwrap();
}

fn reloads(g: &Gateway) -> usize {
    g.log().matches("configuration reloaded").count()
}

#[test]
fn a_changed_listener_opens_while_an_open_session_finishes() {
    let g = Gateway::start("");
    let old = g.relay;
    // A session on the old port, in the middle of a transaction.
    let mut c = Client::connect(old);
    c.cmd("EHLO before.test");
    assert!(c.cmd("MAIL FROM:<s@before.test>").starts_with("250"));

    let new = free_port();
    let config = std::fs::read_to_string(&g.config_path).unwrap();
    std::fs::write(
        &g.config_path,
        config.replace(&format!("127.0.0.1:{old}\""), &format!("127.0.0.1:{new}\"")),
    )
    .unwrap();
    hup(&g);
    wait_for("the reload", Duration::from_secs(10), || reloads(&g) == 1);

    // The new port answers; the old one takes no new sessions.
    let mut fresh = Client::connect(new);
    fresh.cmd("EHLO after.test");
    assert!(queued_id(&fresh.send_mail(
        "s@after.test",
        &["x@far.example"],
        b"Subject: new\r\n\r\nx\r\n"
    ))
    .is_some());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", old)).is_err(),
        "the old port still accepts"
    );
    // The session opened before the reload finishes its message.
    assert!(c.cmd("RCPT TO:<y@far.example>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: old\r\n\r\nx\r\n.\r\n");
    assert!(queued_id(&c.reply()).is_some());
    assert_eq!(g.queue().len(), 2);
}

#[test]
fn a_broken_configuration_is_refused_and_the_old_one_stays() {
    let g = Gateway::start("");
    let good = std::fs::read_to_string(&g.config_path).unwrap();
    std::fs::write(
        &g.config_path,
        format!("{good}[retry]\nbase = \"whenever\"\n"),
    )
    .unwrap();
    hup(&g);
    wait_for("the refusal in the log", Duration::from_secs(10), || {
        g.log().contains("reload refused")
    });
    let log = g.log();
    assert!(
        log.contains("invalid duration") && log.contains("line"),
        "{log}"
    );
    assert_eq!(reloads(&g), 0);
    // Still serving with the old configuration.
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO x.test");
    assert!(
        queued_id(&c.send_mail("s@x.test", &["x@far.example"], b"Subject: s\r\n\r\nx\r\n"))
            .is_some()
    );
}

#[test]
fn policy_changes_apply_to_new_sessions() {
    let g = Gateway::start("[relay]\nnetworks = [\"127.0.0.0/8\"]\n");
    let mut before = Client::connect(g.relay);
    before.cmd("EHLO x.test");
    let config = std::fs::read_to_string(&g.config_path).unwrap();
    std::fs::write(
        &g.config_path,
        config.replace(
            "networks = [\"127.0.0.0/8\"]",
            "networks = [\"10.0.0.0/8\"]",
        ),
    )
    .unwrap();
    hup(&g);
    wait_for("the reload", Duration::from_secs(10), || reloads(&g) == 1);
    let mut after = Client::connect(g.relay);
    after.cmd("EHLO x.test");
    after.cmd("MAIL FROM:<s@x.test>");
    let r = after.cmd("RCPT TO:<x@far.example>");
    assert!(
        r.starts_with("554 5.7.1"),
        "127.0.0.1 is no longer in relay.networks: {r}"
    );
    // The session from before keeps the policy it started with.
    before.cmd("MAIL FROM:<s@x.test>");
    assert!(before.cmd("RCPT TO:<x@far.example>").starts_with("250"));
}
