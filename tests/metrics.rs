//! `[metrics]`: GET /metrics after real mail was accepted, refused and
//! flushed (to a second outpost as the upstream), parsed as the Prometheus
//! text format; and the listener's bounds (methods, header size, slow and
//! idle clients, connection count).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{free_port, json_out, queued_id, wait_for, Client, Gateway};

/// One HTTP/1.1 exchange on a fresh connection; returns the status code,
/// the header block and the body (read to the end: the request says
/// `Connection: close`).
fn http(port: u16, request: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    (code, head.to_string(), body.to_string())
}

fn get(port: u16, path: &str) -> (u16, String, String) {
    http(
        port,
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// The samples of a scrape, `name{labels}` -> value, after checking that
/// every line is in the Prometheus text format (version 0.0.4): HELP and
/// TYPE comments, and samples of a declared family with a float value.
fn parse(text: &str) -> HashMap<String, f64> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut out = HashMap::new();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, what) = (parts.next(), parts.next(), parts.next());
            let name = name.unwrap_or_else(|| panic!("bad comment: {line}"));
            assert!(name_ok(name), "bad metric name in {line}");
            match kind {
                Some("HELP") => assert!(what.is_some(), "HELP without text: {line}"),
                Some("TYPE") => {
                    let t = what.unwrap_or("");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                        "bad type: {line}"
                    );
                    assert!(
                        types.insert(name.to_string(), t.to_string()).is_none(),
                        "TYPE twice: {line}"
                    );
                }
                _ => panic!("unknown comment: {line}"),
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        let name = series.split('{').next().unwrap();
        assert!(name_ok(name), "bad name: {line}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(
                    labels.starts_with('{') && labels.ends_with('}'),
                    "bad labels: {line}"
                );
                for pair in labels[1..labels.len() - 1].split("\",") {
                    let (k, v) = pair
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("bad label: {line}"));
                    assert!(name_ok(k), "bad label name: {line}");
                    assert!(!v.contains('\n'), "{line}");
                }
            }
        }
        assert!(
            types.contains_key(name),
            "sample of a family without TYPE: {line}"
        );
        assert!(
            out.insert(series.to_string(), value).is_none(),
            "sample twice: {line}"
        );
    }
    out
}

fn scrape(port: u16) -> HashMap<String, f64> {
    let (code, head, body) = get(port, "/metrics");
    assert_eq!(code, 200, "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    parse(&body)
}

fn value(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no {series} in {m:#?}"))
}

fn metrics_config(port: u16) -> String {
    format!("[metrics]\naddress = \"127.0.0.1:{port}\"\n")
}

#[test]
fn counters_and_gauges_follow_accepted_refused_and_flushed_mail() {
    let mut hub = Gateway::start("");
    let port = free_port();
    let branch = Gateway::start(&format!(
        "[upstream]\nserver = \"[127.0.0.1]:{}\"\ntls = \"opportunistic\"\n\
         [flush]\nprobe_interval = \"0s\"\n{}",
        hub.relay,
        metrics_config(port)
    ));
    let m = scrape(port);
    assert_eq!(value(&m, "outpost_messages_accepted_total"), 0.0);
    assert_eq!(value(&m, "outpost_flushes_total{result=\"ok\"}"), 0.0);
    assert_eq!(value(&m, "outpost_queue_recipients{state=\"queued\"}"), 0.0);
    assert_eq!(value(&m, "outpost_queue_oldest_message_age_seconds"), 0.0);
    assert_eq!(value(&m, "outpost_link_state{state=\"unknown\"}"), 1.0);
    let relay = format!(
        "outpost_sessions_total{{listener=\"127.0.0.1:{}\",mode=\"relay\"}}",
        branch.relay
    );
    let sessions_before = m.get(&relay).copied().unwrap_or(0.0);

    // Two messages, three recipients.
    let mut c = Client::connect(branch.relay);
    c.cmd("EHLO client.test");
    let r = c.send_mail(
        "s@client.test",
        &["a@far.example", "b@far.example"],
        b"Subject: one\r\n\r\nbody\r\n",
    );
    assert!(queued_id(&r).is_some(), "{r}");
    let r = c.send_mail(
        "s@client.test",
        &["c@other.example"],
        b"Subject: two\r\n\r\nbody\r\n",
    );
    assert!(queued_id(&r).is_some(), "{r}");
    // Refused: an unknown local user at RCPT, a bare LF in DATA.
    assert!(c.cmd("MAIL FROM:<s@client.test>").starts_with("250"));
    let r = c.cmd("RCPT TO:<nobody@branch.example>");
    assert!(r.starts_with("550 5.1.1"), "{r}");
    assert!(c.cmd("RCPT TO:<d@far.example>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: bare\n\nbody\r\n.\r\n");
    let r = c.reply();
    assert!(r.starts_with("550 5.5.2"), "{r}");
    // A failed login (AUTH is offered without TLS on loopback).
    let r = c.cmd("AUTH PLAIN AG5vYm9keQB3cm9uZw==");
    assert!(r.starts_with("535"), "{r}");
    c.cmd("QUIT");

    let m = scrape(port);
    assert_eq!(value(&m, "outpost_messages_accepted_total"), 2.0);
    assert_eq!(value(&m, "outpost_auth_failures_total"), 1.0);
    assert_eq!(
        value(
            &m,
            "outpost_smtp_refused_total{stage=\"rcpt\",reason=\"unknown_user\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "outpost_smtp_refused_total{stage=\"data\",reason=\"bare_line_end\"}"
        ),
        1.0
    );
    assert_eq!(value(&m, "outpost_queue_recipients{state=\"queued\"}"), 3.0);
    assert_eq!(
        value(
            &m,
            "outpost_queue_domain_recipients{domain=\"far.example\"}"
        ),
        2.0
    );
    assert_eq!(
        value(
            &m,
            "outpost_queue_domain_recipients{domain=\"other.example\"}"
        ),
        1.0
    );
    // One session more than before (the harness's readiness check was one).
    assert_eq!(value(&m, &relay), sessions_before + 1.0);
    assert!(value(&m, "outpost_store_size_bytes{file=\"database\"}") > 0.0);
    // The age moves with the clock.
    wait_for("the oldest message to age", Duration::from_secs(5), || {
        value(&scrape(port), "outpost_queue_oldest_message_age_seconds") >= 1.0
    });

    // A flush through the daemon: everything goes.
    let out = branch.cli(&["flush", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let m = scrape(port);
    assert_eq!(value(&m, "outpost_flushes_total{result=\"ok\"}"), 1.0);
    assert_eq!(
        value(&m, "outpost_delivery_attempts_total{outcome=\"delivered\"}"),
        3.0
    );
    assert_eq!(
        value(&m, "outpost_delivery_attempts_total{outcome=\"deferred\"}"),
        0.0
    );
    assert!(
        value(&m, "outpost_upstream_sent_bytes_total") > 40.0,
        "{m:#?}"
    );
    assert!(
        value(&m, "outpost_budget_sent_today_bytes") > 40.0,
        "{m:#?}"
    );
    assert_eq!(value(&m, "outpost_queue_recipients{state=\"queued\"}"), 0.0);
    assert_eq!(value(&m, "outpost_queue_oldest_message_age_seconds"), 0.0);
    assert!(
        !m.keys().any(|k| k.contains("far.example")),
        "an empty domain is not shown: {m:#?}"
    );
    assert_eq!(value(&m, "outpost_link_state{state=\"up\"}"), 1.0);
    assert_eq!(value(&m, "outpost_link_state{state=\"down\"}"), 0.0);
    assert!(m.contains_key("outpost_last_flush_timestamp_seconds"));

    // The upstream goes away: the next flush finds the link down.
    hub.stop();
    let mut c = Client::connect(branch.relay);
    c.cmd("EHLO client.test");
    let r = c.send_mail(
        "s@client.test",
        &["e@far.example"],
        b"Subject: 3\r\n\r\nx\r\n",
    );
    assert!(queued_id(&r).is_some(), "{r}");
    let out = branch.cli(&["flush", "--json"]);
    assert_eq!(out.status.code(), Some(75), "{out:?}");
    let m = scrape(port);
    assert_eq!(
        value(&m, "outpost_flushes_total{result=\"link_down\"}"),
        1.0
    );
    assert_eq!(value(&m, "outpost_flushes_total{result=\"ok\"}"), 1.0);
    assert_eq!(value(&m, "outpost_link_state{state=\"down\"}"), 1.0);
    assert_eq!(value(&m, "outpost_messages_accepted_total"), 3.0);
    assert_eq!(value(&m, "outpost_queue_recipients{state=\"queued\"}"), 1.0);
    // What `outpost status --json` says, the gauges say.
    let status = json_out(&branch.cli(&["status", "--json"]));
    assert_eq!(status["link"]["state"], "down");
    assert_eq!(
        status["counts"]["queued"].as_f64().unwrap(),
        value(&m, "outpost_queue_recipients{state=\"queued\"}")
    );
}

#[test]
fn the_listener_is_read_only_and_bounded() {
    let port = free_port();
    let g = Gateway::start(&metrics_config(port));

    // Only GET and HEAD.
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let (code, head, _) = http(
            port,
            format!("{method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
                .as_bytes(),
        );
        assert_eq!(code, 405, "{method}: {head}");
        assert!(
            head.to_ascii_lowercase().contains("allow: get, head"),
            "{head}"
        );
    }
    // A huge body is never read: the answer comes at once.
    let started = Instant::now();
    let (code, _, _) = http(
        port,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 405);
    assert!(started.elapsed() < Duration::from_secs(5));
    // HEAD: the headers of GET, no body.
    let (code, head, body) = http(
        port,
        b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 200, "{head}");
    assert!(head.contains("text/html"), "{head}");
    assert!(body.is_empty(), "HEAD has no body: {body:?}");
    assert_eq!(get(port, "/nothing-here").0, 404);

    // Huge request headers: 431, not memory.
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The server may close before taking it all.
    let _ = s.write_all(big.as_bytes());
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.starts_with("HTTP/1.1 431"),
        "huge headers answered: {text:?}"
    );

    // Idle connections fill the slots; one more is closed at once; the
    // idle ones are closed after the header timeout, and the listener
    // serves again.
    let idle: Vec<TcpStream> = (0..16)
        .map(|_| {
            let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            // Half a request line, never finished.
            (&s).write_all(b"GET /metr").unwrap();
            s
        })
        .collect();
    // Each connection has its slot once the server accepted it.
    let mut extra_closed = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !extra_closed && Instant::now() < deadline {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        extra_closed = raw.is_empty();
    }
    assert!(
        extra_closed,
        "a connection over the limit is closed without an answer"
    );
    let started = Instant::now();
    for mut s in idle {
        let mut buf = [0u8; 512];
        // Closed (maybe with a 408) within the header timeout.
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                // Closed with the half request unread: also closed.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("an idle connection stayed open: {e}"),
            }
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
    let (code, _, body) = get(port, "/metrics");
    assert_eq!(code, 200);
    parse(&body);
    drop(g);
}

#[test]
fn a_metrics_port_in_use_stops_the_start_with_the_key_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let g = Gateway::configure(&metrics_config(port));
    let mut child = std::process::Command::new(common::BIN)
        .args(["serve", "--config"])
        .arg(&g.config_path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut exited = None;
    wait_for(
        "outpost to refuse to start",
        Duration::from_secs(20),
        || {
            exited = child.try_wait().unwrap();
            exited.is_some()
        },
    );
    assert!(!exited.unwrap().success());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("metrics.address"), "{err}");
    drop(taken);
}
