//! CHECKPOINT (RFC 1845) both ways: a branch outpost sends a big message
//! to a hub outpost through a proxy that breaks the link at chosen points;
//! the next flush resumes where it broke, the message arrives once and
//! byte-exact, and only the rest crosses the link. Also the server alone,
//! driven by hand: DATA resumed, a TRANSID from another client, purging.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{json_out, queued_id, wait_for, Client, Gateway};
use outpost::queue::{Store, TransactionKey};

/// How the proxy breaks the first connection.
#[derive(Clone, Copy)]
enum Break {
    /// After this many octets from the client.
    Cut(usize),
    /// Once this many octets came from the client, nothing more from the
    /// server reaches it (the final reply is lost) and the link closes.
    LoseReplyAfter(usize),
    /// No break: the client's octets go at about this many a second.
    Throttle(usize),
}

/// Forwards to `to`; breaks the first connection as told, later ones pass
/// whole. Counts the client's octets per connection.
fn proxy(to: u16, how: Break) -> (u16, Arc<Mutex<Vec<usize>>>) {
    // A small receive buffer, so that a throttled client really waits
    // instead of filling the kernel's buffers at once.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(16 << 10).unwrap();
    sock.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    sock.listen(16).unwrap();
    let l: TcpListener = sock.into();
    let port = l.local_addr().unwrap().port();
    let counts = Arc::new(Mutex::new(Vec::new()));
    let seen = counts.clone();
    std::thread::spawn(move || {
        for client in l.incoming().flatten() {
            let n = {
                let mut c = seen.lock().unwrap();
                c.push(0);
                c.len() - 1
            };
            let first = n == 0;
            let server = TcpStream::connect(("127.0.0.1", to)).unwrap();
            let sent = Arc::new(AtomicUsize::new(0));
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut s_in, mut c_out) = (server, client);
            let up = sent.clone();
            let seen2 = seen.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    let got = match c_in.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(g) => g,
                    };
                    if let Break::Throttle(rate) = how {
                        std::thread::sleep(Duration::from_millis((got * 1000 / rate) as u64));
                    }
                    let before = up.load(Ordering::SeqCst);
                    let take = match how {
                        Break::Cut(limit) if first => got.min(limit.saturating_sub(before)),
                        _ => got,
                    };
                    if s_out.write_all(&buf[..take]).is_err() {
                        break;
                    }
                    up.fetch_add(take, Ordering::SeqCst);
                    seen2.lock().unwrap()[n] += take;
                    if let Break::Cut(limit) = how {
                        if first && before + take >= limit {
                            break;
                        }
                    }
                }
                let _ = c_in.shutdown(std::net::Shutdown::Both);
                let _ = s_out.shutdown(std::net::Shutdown::Both);
            });
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    let got = match s_in.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(g) => g,
                    };
                    if let Break::LoseReplyAfter(limit) = how {
                        if first && sent.load(Ordering::SeqCst) >= limit {
                            // The reply to the end of the message is lost
                            // with the link.
                            break;
                        }
                    }
                    if c_out.write_all(&buf[..got]).is_err() {
                        break;
                    }
                }
                let _ = c_out.shutdown(std::net::Shutdown::Both);
                let _ = s_in.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (port, counts)
}

fn big_body() -> Vec<u8> {
    body_of(300 << 10)
}

fn body_of(size: usize) -> Vec<u8> {
    let mut body = b"Subject: a scan\r\n\r\n".to_vec();
    let mut i = 0u32;
    while body.len() < size {
        body.extend_from_slice(
            format!("{i:08} .line of the scan, base64-ish ABCDEFGHIJKLMNOPQRSTUVWXYZ\r\n")
                .as_bytes(),
        );
        if i.is_multiple_of(50) {
            body.extend_from_slice(b"..a line that starts with a dot\r\n");
        }
        i += 1;
    }
    body
}

fn branch_to(port: u16) -> Gateway {
    branch_with(port, "")
}

fn branch_with(port: u16, extra: &str) -> Gateway {
    Gateway::start(&format!(
        "[upstream]\nserver = \"[127.0.0.1]:{port}\"\ntls = \"none\"\n[flush]\nprobe_interval = \"0s\"\n{extra}"
    ))
}

/// One sample of the branch's `GET /metrics` (0 when absent).
fn metric(port: u16, series: &str) -> f64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn send(g: &Gateway, body: &[u8]) -> String {
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO client.test");
    let r = c.send_mail("s@client.test", &["x@far.example"], body);
    queued_id(&r).unwrap_or_else(|| panic!("{r}"))
}

/// The hub's checkpoint of the branch's transaction for queue id `id`.
fn partial(hub: &Gateway, id: &str) -> Option<outpost::queue::Partial> {
    let store = Store::open(&hub.path("queue.sqlite")).unwrap();
    store
        .partial(&TransactionKey {
            transid: format!("{id}.r0@gw.test"),
            helo: "gw.test".into(),
            client: "address:127.0.0.1".into(),
        })
        .unwrap()
}

fn cut_and_resume(how: Break) -> (usize, Vec<usize>) {
    let hub = Gateway::start("");
    let (port, counts) = proxy(hub.relay, how);
    let web = common::free_port();
    let branch = branch_with(port, &format!("[metrics]\naddress = \"127.0.0.1:{web}\"\n"));
    let id = send(&branch, &big_body());
    let stored = branch.body(&id);

    let v = json_out(&branch.cli(&["flush", "--json"]));
    assert_eq!(v["summary"]["delivered"], 0, "{v}");
    assert_eq!(branch.queue().len(), 1, "nothing lost");
    assert_eq!(
        branch.queue()[0]["recipients"][0]["state"],
        "queued",
        "a cut transfer is neither an attempt nor uncertain: it resumes"
    );
    let kept = partial(&hub, &id).map(|p| (p.size, p.queue_id.is_some()));

    let v = json_out(&branch.cli(&["flush", "--json", "--all"]));
    assert_eq!(v["summary"]["delivered"], 1, "{v}");
    let q = hub.queue();
    assert_eq!(q.len(), 1, "exactly once at the hub: {q:?}");
    assert!(
        hub.body(q[0]["id"].as_str().unwrap()).ends_with(&stored),
        "byte-exact"
    );
    let p = partial(&hub, &id).expect("the checkpoint is remembered");
    assert!(p.content.is_empty() && p.queue_id.is_some(), "{p:?}");
    // What the hub had kept is counted as resumed, not as sent again.
    let resumed = metric(web, "outpost_checkpoint_resumed_bytes_total") as i64;
    match kept {
        Some((size, _)) if size > 0 => assert!(
            resumed >= size && resumed <= stored.len() as i64,
            "resumed {resumed}, kept {size}"
        ),
        _ => assert_eq!(resumed, 0, "nothing was kept"),
    }
    assert_eq!(
        metric(
            web,
            "outpost_delivery_attempts_total{outcome=\"delivered\"}"
        ),
        1.0
    );
    let counts = counts.lock().unwrap().clone();
    (
        kept.map(|k| k.0 as usize).unwrap_or(0) + usize::from(kept.is_some_and(|k| k.1)),
        counts,
    )
}

#[test]
fn a_transfer_cut_early_in_the_body_resumes() {
    let (kept, counts) = cut_and_resume(Break::Cut(40_000));
    // The hub kept most of what came, and the second connection carried
    // the rest, not the whole message again.
    assert!(kept > 20_000 && kept < 40_000, "kept {kept}");
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(counts[1] < (300 << 10) - 20_000, "{counts:?}");
}

#[test]
fn a_transfer_cut_late_in_the_body_resumes() {
    let (kept, counts) = cut_and_resume(Break::Cut(290_000));
    assert!(kept > 250_000, "kept {kept}");
    assert!(counts[1] < 60_000, "only the rest went again: {counts:?}");
}

#[test]
fn a_transfer_cut_in_the_envelope_starts_afresh() {
    let (kept, counts) = cut_and_resume(Break::Cut(30));
    assert_eq!(kept, 0, "nothing to keep");
    assert!(counts[1] > 300 << 10, "{counts:?}");
}

#[test]
fn a_lost_final_reply_sends_nothing_twice() {
    // The whole message reaches the hub, which takes it; its reply never
    // reaches the branch (RFC 1047's window). With CHECKPOINT the branch
    // learns on its next try that the hub has it.
    let (_, counts) = cut_and_resume(Break::LoseReplyAfter(300 << 10));
    assert!(
        counts[1] < 1000,
        "nothing of the body went again: {counts:?}"
    );
}

#[test]
fn the_server_resumes_data_by_hand_and_refuses_another_clients_transid() {
    let hub = Gateway::start("");
    let mut c = Client::connect(hub.relay);
    let ehlo = c.cmd("EHLO branch.test");
    assert!(ehlo.contains("CHECKPOINT"), "{ehlo}");
    assert!(c
        .cmd("MAIL FROM:<s@client.test> TRANSID=<t1@branch.test>")
        .starts_with("250"));
    assert!(c.cmd("RCPT TO:<x@far.example>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: by hand\r\n\r\nfirst line\r\n..second, dot-stuffed\r\nthird, cut in the mid");
    drop(c);
    // Another client (another address) with the same TRANSID and EHLO
    // name does not get the transaction.
    let mut other = Client::connect_from(hub.relay, Some("127.0.0.2"));
    other.cmd("EHLO branch.test");
    let r = other.cmd("MAIL FROM:<s@client.test> TRANSID=<t1@branch.test>");
    assert!(r.starts_with("250"), "{r}");
    other.cmd("QUIT");
    // The client itself resumes after the last whole line it sent.
    let mut c = Client::connect(hub.relay);
    c.cmd("EHLO branch.test");
    let kept = b"Subject: by hand\r\n\r\nfirst line\r\n.second, dot-stuffed\r\n".len();
    wait_for("the checkpoint", Duration::from_secs(5), || {
        let mut probe = Client::connect(hub.relay);
        probe.cmd("EHLO branch.test");
        let r = probe.cmd("MAIL FROM:<s@client.test> TRANSID=<t1@branch.test>");
        r.starts_with("355")
    });
    let r = c.cmd("MAIL FROM:<s@client.test> TRANSID=<t1@branch.test>");
    assert_eq!(r, format!("355 {kept} is the transaction offset"));
    assert!(c.cmd("DATA").starts_with("354"));
    let r = c.cmd("third, whole this time\r\n.");
    let id = queued_id(&r).unwrap_or_else(|| panic!("{r}"));
    let body = hub.body(&id);
    assert!(
        body.ends_with(b"Subject: by hand\r\n\r\nfirst line\r\n.second, dot-stuffed\r\nthird, whole this time\r\n"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(hub.queue().len(), 1);
}

#[test]
fn old_checkpoints_are_purged() {
    let hub = Gateway::start("[smtp]\ncheckpoint_keep = \"1s\"\n[store]\nkeep_history = \"4s\"\n");
    let mut c = Client::connect(hub.relay);
    c.cmd("EHLO branch.test");
    c.cmd("MAIL FROM:<s@client.test> TRANSID=<t2@branch.test>");
    c.cmd("RCPT TO:<x@far.example>");
    c.cmd("DATA");
    c.send(b"Subject: x\r\n\r\nline\r\n");
    drop(c);
    let key = TransactionKey {
        transid: "t2@branch.test".into(),
        helo: "branch.test".into(),
        client: "address:127.0.0.1".into(),
    };
    let store = Store::open(&hub.path("queue.sqlite")).unwrap();
    wait_for("the checkpoint kept", Duration::from_secs(5), || {
        store.partial(&key).unwrap().is_some()
    });
    wait_for("the checkpoint purged", Duration::from_secs(15), || {
        store.partial(&key).unwrap().is_none()
    });
}

#[test]
fn status_shows_a_big_message_on_its_way() {
    let hub = Gateway::start("");
    // About 2 MiB/s: a 12 MiB message takes some seconds, more than the
    // kernel's socket buffers (a few MiB on loopback) can hide.
    let (port, _) = proxy(hub.relay, Break::Throttle(2 << 20));
    let branch = branch_to(port);
    let id = send(&branch, &body_of(12 << 20));
    let mut flush = std::process::Command::new(common::BIN)
        .args(["flush", "--config"])
        .arg(&branch.config_path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = serde_json::Value::Null;
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    let mut poll = || {
        let v = json_out(&branch.cli(&["status", "--json"]));
        seen = v["transfers"][0].clone();
        seen["in_progress"] == true && seen["bytes_per_second"].is_i64()
    };
    while !poll() {
        assert!(
            std::time::Instant::now() < deadline,
            "no transfer in status:\n{}",
            branch.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("LOG {}", branch.log());
    assert_eq!(seen["id"], id.as_str(), "{seen}");
    let (sent, size) = (
        seen["sent"].as_i64().unwrap(),
        seen["size"].as_i64().unwrap(),
    );
    assert!(sent > 0 && sent < size, "{seen}");
    assert!(seen["bytes_per_second"].as_i64().unwrap() > 0, "{seen}");
    let text = String::from_utf8_lossy(&branch.cli(&["queue", "show", &id]).stdout).to_string();
    assert!(text.contains("sending:") && text.contains(&id), "{text}");
    assert!(flush.wait().unwrap().success());
    assert_eq!(hub.queue().len(), 1);
    let v = json_out(&branch.cli(&["status", "--json"]));
    assert_eq!(v["transfers"], serde_json::json!([]), "{v}");
}
