//! Flushing to an upstream: a second outpost as the upstream, a proxy that
//! cuts the link mid-DATA, a fake upstream that never answers the final dot.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{json_out, queued_id, Client, Gateway};

fn upstream(port: u16, tls: &str) -> String {
    format!("[upstream]\nserver = \"[127.0.0.1]:{port}\"\ntls = \"{tls}\"\n")
}

fn send(g: &Gateway, from: &str, to: &[&str], body: &[u8]) -> String {
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO client.test");
    let r = c.send_mail(from, to, body);
    queued_id(&r).unwrap_or_else(|| panic!("not queued: {r}"))
}

fn attempts(g: &Gateway) -> Vec<u64> {
    g.queue()
        .iter()
        .flat_map(|m| {
            m["recipients"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["attempts"].as_u64().unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn link_down_costs_nothing_then_the_next_flush_delivers_byte_exact() {
    let mut hub = Gateway::configure("");
    // Flushed by hand only: no probe flushes when the hub comes up.
    let branch = Gateway::start(&format!(
        "{}[flush]\nprobe_interval = \"0s\"\n",
        upstream(hub.relay, "opportunistic")
    ));
    let a = send(
        &branch,
        "s@client.test",
        &["x@far.example", "y@far.example"],
        b"Subject: one\r\n\r\n.leading dot\r\nend\r\n",
    );
    let b = send(
        &branch,
        "s@client.test",
        &["z@far.example"],
        b"Subject: two\r\n\r\nbody\r\n",
    );
    let bodies = [branch.body(&a), branch.body(&b)];

    let out = branch.cli(&["flush", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v = json_out(&out);
    assert_eq!(v["summary"]["link"], "down");
    assert_eq!(v["summary"]["untouched"], 3);
    assert!(v["summary"]["error"]
        .as_str()
        .unwrap()
        .contains("Connection refused"));
    assert_eq!(
        attempts(&branch),
        vec![0, 0, 0],
        "a link that is down burns no attempt"
    );
    let status = json_out(&branch.cli(&["status", "--json"]));
    assert_eq!(status["link"]["state"], "down");
    assert!(status["link"]["last_error"]
        .as_str()
        .unwrap()
        .contains(&hub.relay.to_string()));
    assert_eq!(status["counts"]["queued"], 3);

    hub.spawn();
    let out = branch.cli(&["flush", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v = json_out(&out);
    assert_eq!(v["summary"]["delivered"], 3);
    assert_eq!(v["summary"]["link"], "up");
    assert!(
        branch.queue().is_empty(),
        "branch queue empty after delivery"
    );
    let status = json_out(&branch.cli(&["status", "--json"]));
    assert_eq!(status["link"]["state"], "up");

    // The hub has both, with all recipients and the bytes the branch stored
    // (the hub adds its own Received header in front).
    let q = hub.queue();
    assert_eq!(q.len(), 2);
    let mut rcpts: Vec<String> = q
        .iter()
        .flat_map(|m| {
            m["recipients"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["address"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    rcpts.sort();
    assert_eq!(rcpts, ["x@far.example", "y@far.example", "z@far.example"]);
    for m in &q {
        assert_eq!(m["sender"], "s@client.test");
        let got = hub.body(m["id"].as_str().unwrap());
        assert!(
            bodies
                .iter()
                .any(|b| got.ends_with(b) && got.len() > b.len()),
            "body not byte-exact at the hub"
        );
    }
    // History records the delivery.
    let show = String::from_utf8_lossy(&branch.cli(&["queue", "show", &a]).stdout).to_string();
    assert!(show.contains("delivered"), "{show}");
}

#[test]
fn in_process_flush_when_no_daemon_runs() {
    let hub = Gateway::start("");
    let mut branch = Gateway::start(&upstream(hub.relay, "none"));
    send(
        &branch,
        "s@client.test",
        &["x@far.example"],
        b"Subject: solo\r\n\r\nx\r\n",
    );
    branch.stop();
    let out = branch.cli(&["flush"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("x@far.example: delivered (250 2.0.0 Ok: queued as"),
        "{text}"
    );
    assert!(
        text.contains("done: 1 delivered, 0 deferred, 0 bounced, 0 expired; link up"),
        "{text}"
    );
    assert_eq!(hub.queue().len(), 1);
    assert!(branch.queue().is_empty());
}

#[test]
fn tls_required_refuses_an_untrusted_certificate_and_trusts_ca_file() {
    let hub = Gateway::start("");
    let cert = hub.path("cert.pem");
    let mut branch = Gateway::start(&format!(
        "{}tls_name = \"localhost\"\n",
        upstream(hub.relay, "required")
    ));
    send(
        &branch,
        "s@client.test",
        &["x@far.example"],
        b"Subject: tls\r\n\r\nx\r\n",
    );
    branch.stop();
    let out = branch.cli(&["flush"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(75), "{text}");
    assert!(
        text.contains("not signed by a trusted CA") && text.contains("upstream.ca_file"),
        "{text}"
    );
    assert!(hub.queue().is_empty());
    assert_eq!(attempts(&branch), vec![0]);

    let config = std::fs::read_to_string(&branch.config_path).unwrap();
    std::fs::write(
        &branch.config_path,
        format!("{config}ca_file = \"{}\"\n", cert.display()),
    )
    .unwrap();
    let out = branch.cli(&["flush"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("link up") && text.contains("TLSv1.3"),
        "{text}"
    );
    assert_eq!(hub.queue().len(), 1);
    // The hub saw a TLS session from the branch.
    let id = hub.queue()[0]["id"].as_str().unwrap().to_string();
    assert!(String::from_utf8_lossy(&hub.body(&id)).contains("with ESMTPS id"));
}

/// Forwards to `to`; the first connection is cut after `cut` octets from
/// the client, later ones pass whole.
fn cutting_proxy(to: u16, cut: usize) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let conns = Arc::new(AtomicUsize::new(0));
    let seen = conns.clone();
    std::thread::spawn(move || {
        for client in l.incoming().flatten() {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let server = TcpStream::connect(("127.0.0.1", to)).unwrap();
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let limit = if n == 0 { cut } else { usize::MAX };
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
            });
            let (mut c, mut s) = (client, server);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut sent = 0;
                loop {
                    let n = match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let take = n.min(limit - sent);
                    if s.write_all(&buf[..take]).is_err() {
                        break;
                    }
                    sent += take;
                    if sent >= limit {
                        break;
                    }
                }
                let _ = c.shutdown(std::net::Shutdown::Both);
                let _ = s.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (port, conns)
}

#[test]
fn a_link_cut_mid_data_loses_nothing() {
    let hub = Gateway::start("");
    let (proxy, conns) = cutting_proxy(hub.relay, 20_000);
    let branch = Gateway::start(&upstream(proxy, "none"));
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    for i in 0..1000 {
        body.extend_from_slice(
            format!("line {i:04} of a message long enough to be cut in the middle\r\n").as_bytes(),
        );
    }
    let id = send(&branch, "s@client.test", &["x@far.example"], &body);
    let stored = branch.body(&id);
    let out = branch.cli(&["flush", "--json"]);
    let v = json_out(&out);
    assert_eq!(v["summary"]["delivered"], 0, "{v}");
    assert!(
        hub.queue().is_empty(),
        "the hub must not accept a cut message"
    );
    assert_eq!(branch.queue().len(), 1, "nothing lost");
    let out = branch.cli(&["flush", "--json", "--all"]);
    let v = json_out(&out);
    assert_eq!(v["summary"]["delivered"], 1, "{v}");
    assert!(conns.load(Ordering::SeqCst) >= 2);
    let q = hub.queue();
    assert_eq!(q.len(), 1, "delivered exactly once");
    assert!(hub.body(q[0]["id"].as_str().unwrap()).ends_with(&stored));
    assert!(branch.queue().is_empty());
}

#[test]
fn concurrent_flushes_send_each_message_once() {
    let hub = Gateway::start("");
    let mut branch = Gateway::start(&upstream(hub.relay, "none"));
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(send(
            &branch,
            &format!("s{i}@client.test"),
            &["x@far.example"],
            format!("Subject: {i}\r\n\r\nx\r\n").as_bytes(),
        ));
    }
    branch.stop();
    // Two command-line flushes at once, each in its own process.
    let spawn = || {
        std::process::Command::new(common::BIN)
            .args(["flush", "--json", "--config"])
            .arg(&branch.config_path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let delivered = json_out(&a)["summary"]["delivered"].as_u64().unwrap()
        + json_out(&b)["summary"]["delivered"].as_u64().unwrap();
    assert_eq!(delivered, 40);
    let q = hub.queue();
    assert_eq!(q.len(), 40, "each message exactly once at the hub");
    let mut senders: Vec<_> = q
        .iter()
        .map(|m| m["sender"].as_str().unwrap().to_string())
        .collect();
    senders.sort();
    senders.dedup();
    assert_eq!(senders.len(), 40);
}

fn uncertain_case(policy: &str) -> (Gateway, Gateway, String) {
    let hub = Gateway::start("");
    let (silent, seen) = common::fake::start(common::fake::Script {
        silent_after_dot: true,
        ..Default::default()
    });
    let mut branch = Gateway::start(&format!(
        "{}[retry]\nuncertain = \"{policy}\"\n",
        upstream(silent, "none")
    ));
    let id = send(
        &branch,
        "s@client.test",
        &["x@far.example"],
        b"Subject: maybe\r\n\r\nx\r\n",
    );
    branch.stop();
    let out = branch.cli(&["flush", "--json"]);
    let v = json_out(&out);
    assert_eq!(
        seen.messages.load(Ordering::SeqCst),
        1,
        "the silent upstream saw the final dot"
    );
    assert_eq!(v["summary"]["uncertain"], 1, "{v}");
    assert_eq!(v["messages"][0]["recipients"][0]["outcome"], "uncertain");
    let q = branch.queue();
    assert_eq!(q.len(), 1);
    let r = &q[0]["recipients"][0];
    assert!(
        r["last_reply"]
            .as_str()
            .unwrap()
            .contains("delivery uncertain"),
        "{r}"
    );
    let status = String::from_utf8_lossy(&branch.cli(&["status"]).stdout).to_string();
    assert!(status.contains("1 delivery uncertain"), "{status}");
    // Point the branch at the real hub for what follows.
    let config = std::fs::read_to_string(&branch.config_path)
        .unwrap()
        .replace(
            &format!("[127.0.0.1]:{silent}"),
            &format!("[127.0.0.1]:{}", hub.relay),
        );
    std::fs::write(&branch.config_path, config).unwrap();
    (hub, branch, id)
}

#[test]
fn uncertain_delivery_is_resent_with_resend() {
    let (hub, branch, _id) = uncertain_case("resend");
    assert_eq!(branch.queue()[0]["recipients"][0]["state"], "queued");
    let v = json_out(&branch.cli(&["flush", "--json"]));
    assert_eq!(v["summary"]["delivered"], 1, "{v}");
    assert_eq!(hub.queue().len(), 1);
}

#[test]
fn uncertain_delivery_waits_for_the_administrator_with_hold() {
    let (hub, branch, id) = uncertain_case("hold");
    assert_eq!(branch.queue()[0]["recipients"][0]["state"], "held");
    let v = json_out(&branch.cli(&["flush", "--json", "--all"]));
    assert_eq!(v["summary"]["delivered"], 0, "held mail is not sent: {v}");
    assert!(hub.queue().is_empty());
    let out = branch.cli(&["queue", "release", &id]);
    assert!(out.status.success());
    let v = json_out(&branch.cli(&["flush", "--json"]));
    assert_eq!(v["summary"]["delivered"], 1, "{v}");
    assert_eq!(hub.queue().len(), 1);
}

#[test]
fn queue_administration() {
    let hub = Gateway::configure("");
    let branch = Gateway::start(&upstream(hub.relay, "none"));
    let a = send(
        &branch,
        "alice@sender.example",
        &["x@far.example"],
        b"Subject: a\r\n\r\nx\r\n",
    );
    let b = send(
        &branch,
        "bob@sender.example",
        &["y@far.example"],
        b"Subject: b\r\n\r\nx\r\n",
    );
    let c = send(
        &branch,
        "carol@sender.example",
        &["z@far.example"],
        b"Subject: c\r\n\r\nx\r\n",
    );

    assert!(branch.cli(&["queue", "hold", &a]).status.success());
    let held = json_out(&branch.cli(&["queue", "list", "--json", "--state", "held"]));
    assert_eq!(held.as_array().unwrap().len(), 1);
    assert_eq!(held[0]["id"], a.as_str());
    assert!(branch.cli(&["queue", "release", &a]).status.success());
    assert!(
        json_out(&branch.cli(&["queue", "list", "--json", "--state", "held"]))
            .as_array()
            .unwrap()
            .is_empty()
    );

    assert!(branch.cli(&["queue", "delete", &b]).status.success());
    assert!(!branch.queue_ids().contains(&b));

    let out = branch.cli(&["queue", "bounce", &c]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let q = branch.queue();
    assert!(
        !q.iter().any(|m| m["id"] == c.as_str()),
        "bounced message is no longer pending"
    );
    let dsn = q
        .iter()
        .find(|m| m["sender"] == "")
        .expect("a DSN to carol");
    assert_eq!(dsn["recipients"][0]["address"], "carol@sender.example");
    let text = String::from_utf8_lossy(&branch.body(dsn["id"].as_str().unwrap())).to_string();
    assert!(
        text.contains("multipart/report") && text.contains("Status: 5.0.0"),
        "{text}"
    );

    let out = branch.cli(&["queue", "hold", "NOSUCHID"]);
    assert_eq!(out.status.code(), Some(66));
    assert!(branch.cli(&["queue", "retry", "--all"]).status.success());
    assert!(branch.cli(&["queue", "delete", "--all"]).status.success());
    assert!(branch.queue().is_empty());
}

#[test]
fn a_421_leaves_the_rest_untouched_and_due() {
    // Takes one message, then answers the next MAIL with 421 and hangs up.
    let (port, _) = common::fake::start(common::fake::Script {
        close_at_mail: Some(2),
        ..Default::default()
    });
    let mut branch = Gateway::start(&upstream(port, "none"));
    let a = send(
        &branch,
        "s@client.test",
        &["x@far.example"],
        b"Subject: a\r\n\r\nx\r\n",
    );
    let b = send(
        &branch,
        "s@client.test",
        &["y@far.example"],
        b"Subject: b\r\n\r\nx\r\n",
    );
    branch.stop();
    let v = json_out(&branch.cli(&["flush", "--json"]));
    assert_eq!(v["summary"]["delivered"], 1, "{v}");
    assert_eq!(
        v["summary"]["deferred"], 0,
        "a 421 is not a refusal of the message: {v}"
    );
    let q = branch.queue();
    assert_eq!(q.len(), 1);
    assert!(q[0]["id"] == a.as_str() || q[0]["id"] == b.as_str());
    let r = &q[0]["recipients"][0];
    assert_eq!(
        (r["state"].as_str(), r["attempts"].as_u64()),
        (Some("queued"), Some(0)),
        "{r}"
    );
}

#[test]
fn a_daemon_flush_and_a_command_line_flush_together_send_each_message_once() {
    let hub = Gateway::start("");
    // The daemon flushes every second; the command line runs in its own
    // process on the same store (its config names another control socket,
    // so it does not ask the daemon).
    let branch = Gateway::start(&format!(
        "{}[flush]\ninterval = \"1s\"\n",
        upstream(hub.relay, "none")
    ));
    let cli_config = branch.path("cli.toml");
    let text = std::fs::read_to_string(&branch.config_path).unwrap();
    std::fs::write(
        &cli_config,
        text.replace("control.sock", "cli-control.sock"),
    )
    .unwrap();
    let mut sent = 0;
    for round in 0..5 {
        for i in 0..10 {
            send(
                &branch,
                &format!("r{round}m{i}@client.test"),
                &["x@far.example"],
                b"Subject: race\r\n\r\nx\r\n",
            );
            sent += 1;
        }
        let out = std::process::Command::new(common::BIN)
            .args(["flush", "--all", "--config"])
            .arg(&cli_config)
            .output()
            .unwrap();
        assert!(
            matches!(out.status.code(), Some(0)),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    common::wait_for(
        "everything delivered",
        std::time::Duration::from_secs(30),
        || branch.queue().is_empty(),
    );
    let q = hub.queue();
    assert_eq!(q.len(), sent, "each message exactly once at the hub");
    let mut senders: Vec<_> = q
        .iter()
        .map(|m| m["sender"].as_str().unwrap().to_string())
        .collect();
    senders.sort();
    senders.dedup();
    assert_eq!(senders.len(), sent);
}

#[test]
fn a_short_queue_is_shared_by_every_connection() {
    let hub = Gateway::start("");
    let mut branch = Gateway::start(&format!("{}connections = 4\n", upstream(hub.relay, "none")));
    for i in 0..20 {
        send(
            &branch,
            &format!("s{i}@client.test"),
            &["x@far.example"],
            b"Subject: share\r\n\r\nx\r\n",
        );
    }
    branch.stop();
    let sessions =
        |g: &Gateway| g.log().matches("\"connect\"").count() + g.log().matches(" connect ").count();
    let before = sessions(&hub);
    let v = json_out(&branch.cli(&["flush", "--json"]));
    assert_eq!(v["summary"]["delivered"], 20, "{v}");
    assert_eq!(
        sessions(&hub) - before,
        4,
        "four connections, each with a share:\n{}",
        hub.log()
    );
}

/// Forwards to `to`; on its first connection it stops taking the client's
/// octets after `after` of them, without closing (a link gone silent
/// mid-message): its receive buffer is small, so the rest stays in the
/// client's send queue, unacknowledged. Later connections pass whole.
fn stalling_proxy(to: u16, after: usize) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    socket2::SockRef::from(&l)
        .set_recv_buffer_size(4096)
        .unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for (n, client) in l.incoming().flatten().enumerate() {
            let server = TcpStream::connect(("127.0.0.1", to)).unwrap();
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
            });
            let limit = if n == 0 { after } else { usize::MAX };
            let (mut c, mut s) = (client, server);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut sent = 0;
                while sent < limit {
                    let n = match c.read(&mut buf[..(limit - sent).min(4096)]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    sent += n;
                }
                // Silent: nothing more is read, nothing is closed, until
                // the client gives up.
                let mut one = [0u8; 1];
                let _ = c.set_read_timeout(None);
                let _ = std::io::Read::read(&mut s, &mut one);
            });
        }
    });
    port
}

/// A message whose end never reached the upstream (it is still in our
/// send queue when the link goes silent) was not taken: it stays due, no
/// attempt and not "delivery uncertain", even with retry.uncertain =
/// "hold". It used to be held for the administrator after the first cut of
/// a slow link. Over BDAT (an outpost upstream) and DATA (a plain one).
#[test]
fn a_message_whose_end_never_left_is_not_uncertain() {
    let hub = Gateway::start("[smtp]\ncheckpoint_keep = \"0s\"\n");
    let (plain, seen) = common::fake::start(common::fake::Script::default());
    for (name, up) in [("BDAT", hub.relay), ("DATA", plain)] {
        let proxy = stalling_proxy(up, 50_000);
        let branch = Gateway::start(&format!(
            "{}data_timeout = \"2s\"\nfinal_timeout = \"2s\"\ncommand_timeout = \"5s\"\n[retry]\nuncertain = \"hold\"\n",
            upstream(proxy, "none")
        ));
        let mut body = format!("Subject: big over {name}\r\n\r\n").into_bytes();
        while body.len() < 2 << 20 {
            body.extend_from_slice(b"a line of a message big enough to fill every buffer\r\n");
        }
        let id = send(&branch, "s@client.test", &["x@far.example"], &body);
        let out = branch.cli(&["flush", "--json"]);
        let v = json_out(&out);
        assert_eq!(v["summary"]["delivered"], 0, "{name}: {v:#}");
        assert_eq!(v["summary"]["uncertain"], 0, "{name}: {v:#}");
        assert_eq!(v["summary"]["untouched"], 1, "{name}: {v:#}");
        let q = branch.queue();
        let r = &q[0]["recipients"][0];
        assert_eq!(r["state"], "queued", "{name}: {q:#?}");
        assert!(
            !r["last_reply"].as_str().unwrap_or("").contains("uncertain"),
            "{name}: {q:#?}"
        );
        assert!(branch.body(&id).ends_with(&body), "{name}");
        let out = branch.cli(&["flush", "--json", "--all"]);
        let v = json_out(&out);
        assert_eq!(v["summary"]["delivered"], 1, "{name}: {v:#}");
    }
    assert_eq!(hub.queue().len(), 1, "delivered once over BDAT");
    assert_eq!(seen.bodies().len(), 1, "delivered once over DATA");
}
