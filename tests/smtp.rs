//! The real binary over real TCP: envelopes, durability, shutdown, limits
//! and the command line.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{queued_id, wait_for, Client, Gateway};

#[test]
fn relayed_message_is_stored_with_exact_envelope_and_body() {
    let g = Gateway::start("");
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO client.test");
    let content =
        b"Subject: exact\r\nFrom: s@client.test\r\n\r\nline\r\n..dot-stuffed\r\n\r\nend\r\n";
    let r = c.send_mail(
        "s@client.test",
        &["a@elsewhere.example", "B@Other.Example"],
        content,
    );
    let id = queued_id(&r).unwrap_or_else(|| panic!("not queued: {r}"));
    let q = g.queue();
    assert_eq!(q.len(), 1);
    let m = &q[0];
    assert_eq!(m["id"], id.as_str());
    assert_eq!(m["sender"], "s@client.test");
    let rcpts: Vec<_> = m["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["address"].as_str().unwrap())
        .collect();
    assert_eq!(rcpts, ["a@elsewhere.example", "B@Other.Example"]);
    assert!(m["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["state"] == "queued" && r["attempts"] == 0));
    let body = g.body(&id);
    let unstuffed =
        b"Subject: exact\r\nFrom: s@client.test\r\n\r\nline\r\n.dot-stuffed\r\n\r\nend\r\n";
    assert!(
        body.ends_with(unstuffed),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let header = String::from_utf8_lossy(&body[..body.len() - unstuffed.len()]).to_string();
    assert!(
        header.starts_with(
            "Received: from client.test ([127.0.0.1])\r\n\tby gw.test (outpost) with ESMTP id "
        ),
        "{header}"
    );
    assert!(header.contains(&id));
    assert_eq!(m["size"].as_u64().unwrap() as usize, body.len());
}

#[test]
fn restart_leaves_the_queue_unchanged() {
    let mut g = Gateway::start("");
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO client.test");
    for i in 0..5 {
        let r = c.send_mail(
            &format!("s{i}@client.test"),
            &["a@elsewhere.example"],
            b"Subject: r\r\n\r\nx\r\n",
        );
        assert!(queued_id(&r).is_some(), "{r}");
    }
    drop(c);
    let before = g.queue();
    assert_eq!(before.len(), 5);
    assert_eq!(g.stop(), Some(0), "clean exit on SIGTERM");
    g.spawn();
    assert_eq!(g.queue(), before);
}

#[test]
fn kill_9_during_load_loses_no_acknowledged_message() {
    let mut g = Gateway::start("");
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let port = g.relay;
    let workers: Vec<_> = (0..10)
        .map(|w| {
            let acked = acked.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(port);
                c.cmd("EHLO load.test");
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    // Pipelined, so the kill can land anywhere in a transaction.
                    let msg = format!(
                        "MAIL FROM:<w{w}@load.test>\r\nRCPT TO:<r{n}@elsewhere.example>\r\nDATA\r\n"
                    );
                    c.send(msg.as_bytes());
                    let replies = [c.reply(), c.reply(), c.reply()];
                    if !replies[2].starts_with("354") {
                        return;
                    }
                    c.send(
                        format!("Subject: load {w}/{n}\r\n\r\n{}\r\n.\r\n", "x".repeat(900))
                            .as_bytes(),
                    );
                    let r = c.reply();
                    match queued_id(&r) {
                        Some(id) => acked.lock().unwrap().push(id),
                        None => return,
                    }
                }
            })
        })
        .collect();
    wait_for("300 acknowledged messages", Duration::from_secs(60), || {
        acked.lock().unwrap().len() >= 300
    });
    g.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    g.spawn();
    let present: std::collections::HashSet<String> = g.queue_ids().into_iter().collect();
    let lost: Vec<_> = acked.iter().filter(|id| !present.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    // Every stored message is whole: its body ends with the content sent.
    for id in acked.iter().take(20) {
        assert!(g
            .body(id)
            .ends_with(format!("{}\r\n", "x".repeat(900)).as_bytes()));
    }
}

#[test]
fn sigterm_finishes_messages_in_flight_and_closes_idle_sessions() {
    let mut g = Gateway::start("[smtp]\nshutdown_grace = \"20s\"\n");
    let mut idle = Client::connect(g.relay);
    idle.cmd("EHLO idle.test");
    let mut busy = Client::connect(g.relay);
    busy.cmd("EHLO busy.test");
    assert!(busy.cmd("MAIL FROM:<s@busy.test>").starts_with("250"));
    assert!(busy.cmd("RCPT TO:<a@elsewhere.example>").starts_with("250"));
    assert!(busy.cmd("DATA").starts_with("354"));
    busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n");
    let pid = g.pid();
    std::process::Command::new("kill")
        .arg(pid.to_string())
        .status()
        .unwrap();
    // The idle session hears 421 at once.
    let r = idle.reply();
    assert!(r.starts_with("421 4.3.2"), "idle session got: {r}");
    // No new sessions.
    wait_for("listener to close", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", g.relay)).is_err()
    });
    // The message in flight is completed and acknowledged.
    busy.send(b"second half\r\n.\r\n");
    let r = busy.reply();
    let id = queued_id(&r).unwrap_or_else(|| panic!("in-flight message not queued: {r}"));
    // ...and then the session is closed with 421 rather than left open.
    let r = busy.cmd("MAIL FROM:<s2@busy.test>");
    assert!(r.starts_with("421") || r.contains("<EOF>"), "{r}");
    assert_eq!(g.stop(), Some(0));
    g.spawn();
    assert_eq!(g.queue_ids(), vec![id]);
}

#[test]
fn shutdown_grace_ends_with_421_and_nothing_half_stored() {
    let mut g = Gateway::start("[smtp]\nshutdown_grace = \"300ms\"\n");
    let mut busy = Client::connect(g.relay);
    busy.cmd("EHLO busy.test");
    busy.cmd("MAIL FROM:<s@busy.test>");
    busy.cmd("RCPT TO:<a@elsewhere.example>");
    assert!(busy.cmd("DATA").starts_with("354"));
    busy.send(b"Subject: never finished\r\n\r\n");
    std::process::Command::new("kill")
        .arg(g.pid().to_string())
        .status()
        .unwrap();
    let r = busy.reply();
    assert!(r.starts_with("421 4.3.2"), "{r}");
    assert_eq!(g.stop(), Some(0));
    g.spawn();
    assert!(g.queue().is_empty());
}

#[test]
fn connections_per_client_are_limited() {
    let g = Gateway::start("[smtp]\nmax_connections_per_client = 2\n");
    // The start-up probe's session may still hold a slot for a moment.
    let greeted = || {
        let s = std::net::TcpStream::connect(("127.0.0.1", g.relay)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = std::io::BufReader::new(s);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut r, &mut line).unwrap();
        line.starts_with("220").then_some(r)
    };
    let mut slots = Vec::new();
    wait_for("two sessions", Duration::from_secs(10), || {
        if let Some(s) = greeted() {
            slots.push(s);
        }
        slots.len() == 2
    });
    let s = std::net::TcpStream::connect(("127.0.0.1", g.relay)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line).unwrap();
    assert!(line.starts_with("421 4.7.0"), "{line}");
    slots.pop();
    // The slot is given back when a session ends.
    wait_for("a free slot", Duration::from_secs(10), || {
        greeted().is_some()
    });
}

#[test]
fn command_timeout_closes_with_421() {
    let g = Gateway::start("[smtp]\ncommand_timeout = \"300ms\"\n");
    let mut c = Client::connect(g.relay);
    let r = c.reply();
    assert!(r.starts_with("421 4.4.2"), "{r}");
    assert!(c.closed());
}

#[test]
fn check_config_names_file_line_and_fix() {
    let g = Gateway::configure("[retry]\nbase = \"soon\"\n");
    let out = g.cli(&["check-config"]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("outpost.toml, line"), "{err}");
    assert!(err.contains("base = \"soon\""), "{err}");
    assert!(err.contains("15m"), "{err}");

    let g = Gateway::configure("");
    let out = g.cli(&["check-config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // Defaults are filled in and printed.
    assert!(text.contains("max_recipients = 100"), "{text}");
    assert!(text.contains("base = \"5m\""), "{text}");

    let out = std::process::Command::new(common::BIN)
        .args(["check-config", "--config", "/nonexistent/outpost.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/outpost.toml"));
}

#[test]
fn serve_refuses_a_bad_config_with_exit_78() {
    let g = Gateway::configure("[relay]\nnetworks = [\"10.0.0.0/33\"]\n");
    let out = g.cli(&["serve"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line"));
}

#[test]
fn user_commands() {
    let g = Gateway::configure("");
    g.add_user("alice", "pw1");
    let out = g.cli_stdin(&["user", "add", "alice", "--password-stdin"], Some("x\n"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists"));
    let out = g.cli_stdin(
        &["user", "add", "bad name", "--password-stdin"],
        Some("x\n"),
    );
    assert_eq!(out.status.code(), Some(64));
    g.add_user("bob", "pw2");
    let out = g.cli(&["user", "list"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "alice\nbob\n");
    let out = g.cli_stdin(
        &["user", "passwd", "alice", "--password-stdin"],
        Some("pw3\n"),
    );
    assert!(out.status.success());
    let store = outpost::queue::Store::open(&g.path("queue.sqlite")).unwrap();
    let hash = store.password_hash("alice").unwrap().unwrap();
    assert!(outpost::auth::verify_password(Some(&hash), "pw3"));
    assert!(!hash.contains("pw3"));
    let out = g.cli(&["user", "del", "bob"]);
    assert!(out.status.success());
    let out = g.cli(&["user", "del", "bob"]);
    assert_eq!(out.status.code(), Some(67));
    let out = g.cli(&["user", "list"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "alice\n");
}

#[test]
fn queue_show_and_state_filter() {
    let g = Gateway::start("[hub]\nhold_domains = [\"other.example\"]\n");
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO client.test");
    let r = c.send_mail(
        "s@client.test",
        &["a@elsewhere.example"],
        b"Subject: one\r\n\r\nx\r\n",
    );
    let up = queued_id(&r).unwrap();
    let r = c.send_mail(
        "s@client.test",
        &["b@other.example"],
        b"Subject: two\r\n\r\nx\r\n",
    );
    let held = queued_id(&r).unwrap();
    let out = g.cli(&["queue", "show", &held]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("from:        <s@client.test>"), "{text}");
    assert!(text.contains("b@other.example (held)"), "{text}");
    assert!(text.contains("Subject: two"), "{text}");
    assert!(
        text.contains("received: from 127.0.0.1 via ESMTP"),
        "{text}"
    );
    let out = g.cli(&["queue", "list", "--json", "--state", "held"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [held.as_str()]);
    let out = g.cli(&["queue", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&up) && text.contains(&held) && text.contains("-- 2 messages"),
        "{text}"
    );
    let out = g.cli(&["queue", "show", "NOSUCHID"]);
    assert_eq!(out.status.code(), Some(66));
}

#[test]
fn serve_tells_systemd_when_ready_and_when_stopping() {
    let mut g = Gateway::configure("");
    let sock_path = g.path("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    g.spawn_with_env(&[
        ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "1000000"),
    ]);
    let mut seen = String::new();
    let mut buf = [0u8; 512];
    // READY, and the watchdog pings with a status line.
    while !(seen.contains("READY=1")
        && seen.contains("WATCHDOG=1")
        && seen.contains("STATUS=link unknown; 0 queued"))
    {
        let n = sock.recv(&mut buf).expect("notifications in time");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        seen.push('\n');
    }
    // Ready means listening: a client is greeted at once.
    Client::connect(g.relay);
    std::process::Command::new("kill")
        .arg(g.pid().to_string())
        .status()
        .unwrap();
    loop {
        let n = sock.recv(&mut buf).expect("STOPPING in time");
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
    assert_eq!(g.stop(), Some(0));
}

#[test]
fn json_logs_carry_peer_and_queue_id() {
    let g = Gateway::start("[log]\nformat = \"json\"\n");
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO client.test");
    let id = queued_id(&c.send_mail(
        "s@client.test",
        &["a@elsewhere.example"],
        b"Subject: j\r\n\r\nx\r\n",
    ))
    .unwrap();
    wait_for("the queued log line", Duration::from_secs(10), || {
        g.log().contains(&id)
    });
    let line = g
        .log()
        .lines()
        .find(|l| l.contains(&id))
        .unwrap()
        .to_string();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["message"], "queued");
    assert_eq!(v["queue_id"], id.as_str());
    assert!(v["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(v["from"], "s@client.test");
}

#[test]
fn mailbox_list_and_deleting_a_user_with_mail() {
    let g = Gateway::start("");
    g.add_user("alice", "pw");
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO client.test");
    let id = queued_id(&c.send_mail(
        "bob@far.example",
        &["alice@branch.example"],
        b"From: Bob <bob@far.example>\r\nSubject: lunch\r\n on friday\r\n\r\nhi\r\n",
    ))
    .unwrap();
    let out = g.cli(&["mailbox", "list", "alice"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&id)
            && text.contains("Bob <bob@far.example>")
            && text.contains("lunch on friday"),
        "{text}"
    );
    assert!(text.contains("-- INBOX: 1 messages"), "{text}");
    assert_eq!(
        g.cli(&["mailbox", "list", "nobody"]).status.code(),
        Some(67)
    );

    let out = g.cli(&["user", "del", "alice"]);
    assert_eq!(out.status.code(), Some(65));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert!(g.cli(&["user", "del", "alice", "--force"]).status.success());
    let store = outpost::queue::Store::open(&g.path("queue.sqlite")).unwrap();
    assert!(store.mailbox("alice").unwrap().is_empty());
    assert!(
        store.body(&id).unwrap().is_none(),
        "the message went with the mailbox"
    );
}
