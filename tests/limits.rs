//! Inbound limits against the running binary: long lines
//! (`smtp.max_line_length`), mail loops (`relay.max_hops`) and alias
//! loops (`local.aliases`).

mod common;

use common::{fake, json_out, queued_id, Client, Gateway};

/// A message whose body has one line of `len` octets (CRLF not counted),
/// starting with a dot when `dot`. Returns (as stored, as sent with DATA).
fn wide_message(len: usize, dot: bool) -> (Vec<u8>, Vec<u8>) {
    let mut line = vec![b'w'; len];
    if dot {
        line[0] = b'.';
    }
    let mut content = b"Subject: wide\r\n\r\nbefore\r\n".to_vec();
    content.extend_from_slice(&line);
    content.extend_from_slice(b"\r\nafter\r\n");
    let mut wire = b"Subject: wide\r\n\r\nbefore\r\n".to_vec();
    if dot {
        wire.push(b'.');
    }
    wire.extend_from_slice(&line);
    wire.extend_from_slice(b"\r\nafter\r\n");
    (content, wire)
}

#[test]
fn long_lines_up_to_the_limit_are_accepted_and_forwarded_byte_exact() {
    let (port, seen) = fake::start(fake::Script::default());
    // smtp.max_line_length left at its default, 65536 with the CRLF.
    let g = Gateway::start(&format!(
        "[upstream]\nserver = \"[127.0.0.1]:{port}\"\ntls = \"none\"\n"
    ));
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO client.test");
    let mut sent = Vec::new();
    for (len, dot) in [(5000, false), (65534, true)] {
        let (content, wire) = wide_message(len, dot);
        let r = c.send_mail("s@client.test", &["x@far.example"], &wire);
        let id = queued_id(&r).unwrap_or_else(|| panic!("{len}-octet line: {r}"));
        let stored = g.body(&id);
        assert!(
            stored.ends_with(&content) && stored.starts_with(b"Received: "),
            "{len}-octet line not stored unchanged"
        );
        sent.push(stored);
    }
    // One octet more than the limit: refused, nothing queued, the session
    // goes on.
    let (_, wire) = wide_message(65535, false);
    let r = c.send_mail("s@client.test", &["x@far.example"], &wire);
    assert!(r.starts_with("554 5.6.0"), "{r}");
    assert!(r.contains("65536"), "the reply names the limit: {r}");
    assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok");
    assert_eq!(g.queue().len(), 2);

    let out = g.cli(&["flush", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(json_out(&out)["summary"]["delivered"], 2);
    // The upstream (plain DATA, so dot-stuffed on the way) got the stored
    // bytes, long lines whole.
    let got = seen.bodies.lock().unwrap().clone();
    assert_eq!(got.len(), 2);
    for stored in &sent {
        assert!(got.contains(stored), "a message changed on the way out");
    }
}

#[test]
fn long_lines_reach_a_chunking_upstream_whole() {
    // Another outpost as the upstream: PIPELINING and CHUNKING, so the
    // branch sends BDAT, not dot-stuffed DATA.
    let hub = Gateway::start("");
    let branch = Gateway::start(&format!(
        "[upstream]\nserver = \"[127.0.0.1]:{}\"\ntls = \"none\"\n",
        hub.relay
    ));
    let mut c = Client::connect(branch.relay);
    c.cmd("EHLO client.test");
    let (content, wire) = wide_message(65534, true);
    let r = c.send_mail("s@client.test", &["x@far.example"], &wire);
    let id = queued_id(&r).unwrap_or_else(|| panic!("{r}"));
    let stored = branch.body(&id);
    assert!(stored.ends_with(&content));
    let out = branch.cli(&["flush", "--json"]);
    assert_eq!(json_out(&out)["summary"]["delivered"], 1);
    let q = hub.queue();
    assert_eq!(q.len(), 1);
    let got = hub.body(q[0]["id"].as_str().unwrap());
    // The hub put its own Received header in front of the branch's bytes.
    assert!(got.ends_with(&stored) && got.len() > stored.len());
}

/// `n` trace fields, then a short message.
fn with_received(n: usize) -> Vec<u8> {
    let mut m = Vec::new();
    for i in 0..n {
        m.extend_from_slice(
            format!(
                "Received: from h{i}.example by h{}.example;\r\n\tTue, 1 Dec 2026 10:00:00 +0000\r\n",
                i + 1
            )
            .as_bytes(),
        );
    }
    m.extend_from_slice(b"Subject: hops\r\n\r\nReceived: a body line, not a header\r\n");
    m
}

#[test]
fn too_many_received_headers_are_refused_as_a_loop() {
    let g = Gateway::start("");
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO client.test");
    let r = c.send_mail("s@client.test", &["x@far.example"], &with_received(60));
    assert!(r.starts_with("554 5.4.6"), "{r}");
    assert!(r.contains("loop"), "{r}");
    assert!(g.queue().is_empty(), "nothing queued");
    assert!(
        g.log().contains("message refused"),
        "the refusal is logged:\n{}",
        g.log()
    );
    // 50 (relay.max_hops) is accepted in the same session; the gateway's
    // own Received header comes on top.
    let r = c.send_mail("s@client.test", &["x@far.example"], &with_received(50));
    let id = queued_id(&r).unwrap_or_else(|| panic!("50 hops: {r}"));
    let body = g.body(&id);
    let fields = body
        .split(|&b| b == b'\n')
        .filter(|l| l.starts_with(b"Received:"))
        .count();
    assert_eq!(fields, 52, "50 + ours + the body line");
    // 51 is one too many.
    let r = c.send_mail("s@client.test", &["x@far.example"], &with_received(51));
    assert!(r.starts_with("554 5.4.6"), "{r}");
    assert_eq!(g.queue().len(), 1);
}

#[test]
fn a_lower_max_hops_is_honoured_over_bdat_too() {
    let g = Gateway::start("[relay]\nmax_hops = 3\n");
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO client.test");
    for (n, want) in [(4, "554 5.4.6"), (3, "250 ")] {
        let m = with_received(n);
        assert!(c.cmd("MAIL FROM:<s@client.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<x@far.example>").starts_with("250"));
        c.send(format!("BDAT {} LAST\r\n", m.len()).as_bytes());
        c.send(&m);
        let r = c.reply();
        assert!(r.starts_with(want), "{n} hops: {r}");
    }
}

#[test]
fn alias_loops_and_deep_chains_are_refused_at_rcpt() {
    let mut deep = String::new();
    for i in 0..11 {
        deep.push_str(&format!("d{i} = [\"d{}\"]\n", i + 1));
    }
    let g = Gateway::start(&format!(
        "[local]\ndomains = [\"branch.example\"]\n[local.aliases]\n\
         ping = [\"pong\"]\npong = [\"ping@branch.example\"]\n\
         sales = [\"team\"]\nteam = [\"alice\"]\n{deep}d11 = [\"alice\"]\n"
    ));
    g.add_user("alice", "secret");
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO client.test");
    assert!(c.cmd("MAIL FROM:<s@client.test>").starts_with("250"));
    for (rcpt, want) in [
        ("ping@branch.example", "550 5.4.6"),
        // d1 -> d2 ... d11 -> alice: eleven aliases on the way.
        ("d1@branch.example", "550 5.4.6"),
        // d2 ... d11 -> alice: ten, the most followed.
        ("d2@branch.example", "250 "),
        ("sales@branch.example", "250 "),
    ] {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        assert!(r.starts_with(want), "{rcpt}: {r}");
    }
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: via aliases\r\n\r\nhi\r\n.\r\n");
    let r = c.reply();
    assert!(queued_id(&r).is_some(), "{r}");
    let log = g.log();
    assert!(log.contains("alias loop ping -> pong -> ping"), "{log}");
    assert!(log.contains("nested more than 10"), "{log}");
    // d2 and sales lead to alice's mailbox.
    let store = outpost::queue::Store::open(&g.path("queue.sqlite")).unwrap();
    common::wait_for(
        "the message in alice's mailbox",
        std::time::Duration::from_secs(10),
        || !store.mailbox("alice").unwrap().is_empty(),
    );
}
