//! The POP3 server against the real binary: real clients (Python's poplib,
//! fetchmail, mpop) over STLS and implicit TLS, and a line-level client for
//! the state rules (deletion only at QUIT, one session per maildrop, stable
//! UIDs, login rules, quota).
//!
//! `tests/run.sh` installs fetchmail and mpop. Every process a test starts
//! is stopped by PID when its guard is dropped; every wait has a deadline.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use common::peers::chmod;
use common::{free_port, queued_id, run_logged as run, wait_for, Client, Gateway};
use serde_json::Value;

const PYTHON: &str = "/usr/bin/python3";
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Listeners

/// The POP3 listeners a test adds to the gateway: `plain` allows plain-text
/// login without TLS, `stls` requires STLS first, `pop3s` is implicit TLS.
struct Ports {
    plain: u16,
    stls: u16,
    pop3s: u16,
}

impl Ports {
    fn new() -> Ports {
        Ports {
            plain: free_port(),
            stls: free_port(),
            pop3s: free_port(),
        }
    }

    fn toml(&self) -> String {
        format!(
            r#"
[[listen]]
address = "127.0.0.1:{}"
mode = "pop3"
plaintext_auth = true
[[listen]]
address = "127.0.0.1:{}"
mode = "pop3"
plaintext_auth = false
[[listen]]
address = "127.0.0.1:{}"
mode = "pop3s"
"#,
            self.plain, self.stls, self.pop3s
        )
    }
}

/// Runs a script from tests/py with Debian's python3; it must succeed and
/// print one JSON document.
fn python(g: &Gateway, script: &str, args: &[String]) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script);
    let ran = common::peers::run(
        script,
        Command::new(PYTHON).arg(path).args(args),
        CLIENT_TIMEOUT,
    );
    assert!(ran.code == Some(0), "{script} failed ({ran})\n{}", g.log());
    serde_json::from_str(&ran.stdout).unwrap_or_else(|e| panic!("{script}: {e}:\n{ran}"))
}

// ---------------------------------------------------------------------------
// SMTP in, expectations out

/// Dot-stuffs a message for DATA (it ends with CRLF).
fn stuff(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in content.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out
}

/// Sends `content` (unstuffed, CRLF line ends) over SMTP to the relay port
/// and returns the queue id. `eight_bit` declares BODY=8BITMIME.
fn send(g: &Gateway, from: &str, to: &[&str], content: &[u8], eight_bit: bool) -> String {
    let mut c = Client::connect(g.relay);
    let r = c.cmd("EHLO client.test");
    assert!(r.starts_with("250"), "EHLO: {r}");
    let body = if eight_bit { " BODY=8BITMIME" } else { "" };
    let r = c.cmd(&format!("MAIL FROM:<{from}>{body}"));
    assert!(r.starts_with("250"), "MAIL: {r}");
    for t in to {
        let r = c.cmd(&format!("RCPT TO:<{t}>"));
        assert!(r.starts_with("250"), "RCPT {t}: {r}\n{}", g.log());
    }
    let r = c.cmd("DATA");
    assert!(r.starts_with("354"), "DATA: {r}");
    c.send(&stuff(content));
    c.send(b".\r\n");
    let r = c.reply();
    let id = queued_id(&r).unwrap_or_else(|| panic!("not queued: {r}"));
    c.cmd("QUIT");
    assert!(
        g.body(&id).ends_with(content),
        "stored body of {id} does not end with what was sent"
    );
    id
}

/// One RCPT in a fresh transaction; returns the reply (the transaction is
/// reset, nothing is sent).
fn rcpt_reply(g: &Gateway, to: &str) -> String {
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO client.test");
    let r = c.cmd("MAIL FROM:<s@client.test>");
    assert!(r.starts_with("250"), "MAIL: {r}");
    let r = c.cmd(&format!("RCPT TO:<{to}>"));
    c.cmd("QUIT");
    r
}

/// What a POP3 client must read for message `id` sent by `sender`: the
/// Return-Path line, then the stored message (outpost's Received header and
/// the bytes the SMTP client sent, unstuffed), CRLF line ends.
fn expected(g: &Gateway, sender: &str, id: &str) -> Vec<u8> {
    let mut m = format!("Return-Path: <{sender}>\r\n").into_bytes();
    m.extend_from_slice(&g.body(id));
    assert!(m.ends_with(b"\r\n"));
    m
}

fn crlf_to_lf(m: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(m.len());
    let mut i = 0;
    while i < m.len() {
        if m[i] == b'\r' && m.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(m[i]);
        i += 1;
    }
    out
}

fn show(m: &[u8]) -> String {
    String::from_utf8_lossy(m).to_string()
}

const SENDER: &str = "s@client.test";

/// An ordinary message with a long line.
fn plain_message() -> Vec<u8> {
    let mut m = b"From: s@client.test\r\nTo: alice@branch.example\r\nSubject: plain\r\nMessage-ID: <plain@client.test>\r\n\r\nHello Alice,\r\n\r\n".to_vec();
    m.extend_from_slice(&b"0123456789".repeat(90));
    m.extend_from_slice(b"\r\n\tindented line\r\nend\r\n");
    m
}

/// 8-bit MIME: UTF-8 in the header and the body.
fn eight_bit_message() -> Vec<u8> {
    "From: J\u{fc}rgen <s@client.test>\r\nTo: alice@branch.example\r\nSubject: Gr\u{fc}\u{df}e\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGr\u{fc}\u{df}e aus K\u{f6}ln \u{2013} \u{20ac}100, na\u{ef}ve caf\u{e9}\r\n\u{65e5}\u{672c}\u{8a9e}\u{306e}\u{30c6}\u{30ad}\u{30b9}\u{30c8} \u{1f600}\r\n\u{ff}\u{fe}\r\n"
        .as_bytes()
        .to_vec()
}

/// Lines starting with dots, a lone dot in the middle and as the last line.
fn dot_message() -> Vec<u8> {
    b"From: s@client.test\r\nTo: alice@branch.example\r\nSubject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nmiddle . line\r\n...\r\n. space\r\n.\r\n"
        .to_vec()
}

// ---------------------------------------------------------------------------
// A line-level POP3 client

struct Pop {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
}

impl Pop {
    fn connect(port: u16) -> Pop {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut p = Pop { reader, stream };
        let greeting = p.line();
        assert_eq!(greeting, "+OK outpost POP3 ready");
        p
    }

    /// Connects and logs in with USER/PASS; panics unless it works.
    fn login(port: u16, user: &str, password: &str) -> Pop {
        let mut p = Pop::connect(port);
        let r = p.user_pass(user, password);
        assert!(r.starts_with("+OK "), "login {user}: {r}");
        p
    }

    /// Logs in, retrying while the maildrop is still held by a session the
    /// server has not yet seen end (a dropped connection).
    fn login_when_free(port: u16, user: &str, password: &str) -> Pop {
        let mut got = None;
        wait_for(
            "the maildrop to be released",
            Duration::from_secs(10),
            || {
                let mut p = Pop::connect(port);
                let r = p.user_pass(user, password);
                if r.starts_with("-ERR [IN-USE]") {
                    return false;
                }
                assert!(r.starts_with("+OK "), "login {user}: {r}");
                got = Some(p);
                true
            },
        );
        got.unwrap()
    }

    /// USER then PASS; returns the PASS reply.
    fn user_pass(&mut self, user: &str, password: &str) -> String {
        let r = self.cmd(&format!("USER {user}"));
        assert!(r.starts_with("+OK"), "USER {user}: {r}");
        self.cmd(&format!("PASS {password}"))
    }

    /// One reply line without CRLF; "<EOF>" when the server closed.
    fn line(&mut self) -> String {
        let mut line = Vec::new();
        match self.reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => "<EOF>".into(),
            Ok(_) => {
                assert!(line.ends_with(b"\r\n"), "reply line without CRLF: {line:?}");
                String::from_utf8(line[..line.len() - 2].to_vec()).unwrap()
            }
        }
    }

    fn cmd(&mut self, line: &str) -> String {
        self.stream
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap();
        self.line()
    }

    /// A multi-line command: the status line and, after +OK, the data with
    /// CRLF line ends and dots unstuffed (up to the terminating ".").
    fn multi(&mut self, line: &str) -> (String, Vec<u8>) {
        let status = self.cmd(line);
        let mut data = Vec::new();
        if !status.starts_with("+OK") {
            return (status, data);
        }
        loop {
            let mut l = Vec::new();
            let n = self.reader.read_until(b'\n', &mut l).unwrap();
            assert!(n > 0, "EOF inside the {line} answer");
            assert!(l.ends_with(b"\r\n"), "{line}: line without CRLF: {l:?}");
            if l == b".\r\n" {
                return (status, data);
            }
            let l = match l.strip_prefix(b".") {
                Some(rest) => {
                    assert!(rest.starts_with(b"."), "{line}: unstuffed dot line {l:?}");
                    rest
                }
                None => &l[..],
            };
            data.extend_from_slice(l);
        }
    }

    /// UIDL: (message number, uid) pairs.
    fn uidl(&mut self) -> Vec<(usize, String)> {
        let (status, data) = self.multi("UIDL");
        assert!(status.starts_with("+OK"), "UIDL: {status}");
        String::from_utf8(data)
            .unwrap()
            .lines()
            .map(|l| {
                let (n, uid) = l.split_once(' ').unwrap();
                (n.parse().unwrap(), uid.to_string())
            })
            .collect()
    }

    /// STAT: (messages, octets).
    fn stat(&mut self) -> (usize, usize) {
        let r = self.cmd("STAT");
        let mut w = r
            .strip_prefix("+OK ")
            .unwrap_or_else(|| panic!("STAT: {r}"))
            .split(' ');
        (
            w.next().unwrap().parse().unwrap(),
            w.next().unwrap().parse().unwrap(),
        )
    }

    fn retr(&mut self, n: usize) -> Vec<u8> {
        let (status, data) = self.multi(&format!("RETR {n}"));
        assert_eq!(status, format!("+OK {} octets", data.len()), "RETR {n}");
        data
    }

    fn quit(&mut self) -> String {
        self.cmd("QUIT")
    }

    /// True when the server closed the connection (EOF).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0))
    }

    /// Drops the connection without QUIT.
    fn drop_connection(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

fn store(g: &Gateway) -> outpost::queue::Store {
    outpost::queue::Store::open(&g.path("queue.sqlite")).unwrap()
}

fn mailbox_uids(g: &Gateway, user: &str) -> Vec<String> {
    store(g)
        .mailbox(user)
        .unwrap()
        .into_iter()
        .map(|e| e.uid)
        .collect()
}

fn numbered(ids: &[&String]) -> Vec<(usize, String)> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| (i + 1, id.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------
// 1. Real clients read the messages byte-exact

fn b64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
}

/// poplib's lines (line ends removed, dots unstuffed) joined back: each
/// line ends with CRLF, the last one included.
fn joined(lines: &Value) -> Vec<u8> {
    let mut m = Vec::new();
    for l in lines.as_array().unwrap() {
        m.extend_from_slice(&b64(l));
        m.extend_from_slice(b"\r\n");
    }
    m
}

fn header_section(m: &[u8]) -> &[u8] {
    let end = m.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    &m[..end]
}

/// Files a client delivered into `dir`, sorted by content.
fn delivered(dir: &Path) -> Vec<Vec<u8>> {
    let mut all: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    all.sort();
    all
}

fn assert_same_messages(client: &str, got: Vec<Vec<u8>>, want: &[Vec<u8>]) {
    let mut want = want.to_vec();
    want.sort();
    assert_eq!(got.len(), want.len(), "{client}: number of messages");
    for (g, w) in got.iter().zip(&want) {
        assert!(
            g == w,
            "{client} delivered\n{}\n---- expected ----\n{}",
            show(g),
            show(w)
        );
    }
}

#[test]
fn poplib_fetchmail_and_mpop_read_messages_byte_exact() {
    let ports = Ports::new();
    let g = Gateway::start(&ports.toml());
    g.add_user("alice", "secret");
    let ids = [
        send(
            &g,
            SENDER,
            &["alice@branch.example"],
            &plain_message(),
            false,
        ),
        send(
            &g,
            SENDER,
            &["alice@branch.example"],
            &eight_bit_message(),
            true,
        ),
        send(&g, SENDER, &["alice@branch.example"], &dot_message(), false),
    ];
    let want: Vec<Vec<u8>> = ids.iter().map(|id| expected(&g, SENDER, id)).collect();
    let cert = g.path("cert.pem").display().to_string();

    // Python's poplib over implicit TLS, the certificate checked.
    let v = python(
        &g,
        "pop3_fetch.py",
        &[
            ports.pop3s.to_string(),
            "pop3s".into(),
            cert.clone(),
            "alice".into(),
            "secret".into(),
        ],
    );
    assert_eq!(v["greeting"], "+OK outpost POP3 ready");
    let caps: Vec<&str> = v["capa"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for c in ["TOP", "UIDL", "USER", "RESP-CODES"] {
        assert!(
            caps.contains(&c),
            "CAPA over implicit TLS lacks {c}: {caps:?}"
        );
    }
    assert!(!caps.contains(&"STLS"), "STLS offered inside TLS: {caps:?}");
    let total: usize = want.iter().map(Vec::len).sum();
    assert_eq!(v["stat"], serde_json::json!([3, total]));
    let list: Vec<String> = want
        .iter()
        .enumerate()
        .map(|(i, m)| format!("{} {}", i + 1, m.len()))
        .collect();
    assert_eq!(v["list"], serde_json::json!(list));
    let uidl: Vec<String> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| format!("{} {id}", i + 1))
        .collect();
    assert_eq!(v["uidl"], serde_json::json!(uidl));
    let messages = v["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3);
    for (i, (m, w)) in messages.iter().zip(&want).enumerate() {
        let got = joined(&m["lines"]);
        assert!(
            &got == w,
            "poplib RETR {}:\n{}\n---- expected ----\n{}",
            i + 1,
            show(&got),
            show(w)
        );
        // poplib counts the octets it read, line ends included, stuffing
        // dots not: the size LIST announced.
        assert_eq!(m["octets"].as_u64().unwrap() as usize, w.len());
        assert_eq!(m["resp"], format!("+OK {} octets", w.len()).as_str());
        let top = joined(&m["top0"]);
        assert_eq!(show(&top), show(header_section(w)), "TOP {} 0", i + 1);
    }
    assert!(v["quit"].as_str().unwrap().starts_with("+OK"));

    // fetchmail: STLS on the listener without plain-text login, `keep`
    // (TOP and UIDL), an MDA that stores each message.
    let f = g.path("fetchmail");
    std::fs::create_dir_all(f.join("got")).unwrap();
    let mda = f.join("mda.sh");
    std::fs::write(
        &mda,
        format!(
            "#!/bin/sh\ncat >\"{}/got/$(date +%s%N).eml\"\n",
            f.display()
        ),
    )
    .unwrap();
    chmod(&mda, 0o755);
    let rc = f.join("rc");
    std::fs::write(
        &rc,
        format!(
            r#"set no syslog
set invisible
poll 127.0.0.1 protocol pop3 port {} uidl timeout 20
  user "alice" password "secret" is root here
  sslproto 'tls1.2+' sslcertck sslcertfile "{cert}" sslcommonname localhost
  keep
  mda "{}"
"#,
            ports.stls,
            mda.display()
        ),
    )
    .unwrap();
    chmod(&rc, 0o600);
    let fetchmail = |log: &str| {
        run(
            Command::new("fetchmail")
                .args(["-f"])
                .arg(&rc)
                .arg("-v")
                .env("FETCHMAILHOME", &f),
            &f.join(log),
            CLIENT_TIMEOUT,
        )
    };
    let (code, log) = fetchmail("log1");
    assert_eq!(code, Some(0), "fetchmail:\n{log}\n{}", g.log());
    assert!(
        log.contains("POP3> STLS"),
        "fetchmail did not use STLS:\n{log}"
    );
    assert_same_messages(
        "fetchmail",
        delivered(&f.join("got")),
        &want.iter().map(|m| crlf_to_lf(m)).collect::<Vec<_>>(),
    );
    // Kept, and known by UIDL: nothing new on the second run (exit 1).
    let (code, log) = fetchmail("log2");
    assert_eq!(code, Some(1), "second fetchmail run:\n{log}");
    assert_eq!(std::fs::read_dir(f.join("got")).unwrap().count(), 3);

    // mpop: implicit TLS, pipelined, RETR, into a maildir.
    let m = g.path("mpop");
    for d in ["new", "cur", "tmp"] {
        std::fs::create_dir_all(m.join("box").join(d)).unwrap();
    }
    let rc = m.join("rc");
    std::fs::write(
        &rc,
        [
            "account test".to_string(),
            "host 127.0.0.1".into(),
            format!("port {}", ports.pop3s),
            "timeout 20".into(),
            "tls on".into(),
            "tls_starttls off".into(),
            format!("tls_trust_file {cert}"),
            "tls_host_override localhost".into(),
            "user alice".into(),
            "auth user".into(),
            "password secret".into(),
            "keep on".into(),
            "received_header off".into(),
            format!("uidls_file {}", m.join("uidls").display()),
            format!("delivery maildir {}", m.join("box").display()),
            String::new(),
        ]
        .join("\n"),
    )
    .unwrap();
    chmod(&rc, 0o600);
    let mpop = |log: &str| {
        run(
            Command::new("mpop").arg("-C").arg(&rc).args(["-d", "test"]),
            &m.join(log),
            CLIENT_TIMEOUT,
        )
    };
    let (code, log) = mpop("log1");
    assert_eq!(code, Some(0), "mpop:\n{log}\n{}", g.log());
    assert_same_messages(
        "mpop",
        delivered(&m.join("box/new")),
        &want.iter().map(|m| crlf_to_lf(m)).collect::<Vec<_>>(),
    );
    let (code, log) = mpop("log2");
    assert_eq!(code, Some(0), "second mpop run:\n{log}");
    assert_eq!(std::fs::read_dir(m.join("box/new")).unwrap().count(), 3);

    // Every client kept the messages.
    assert_eq!(mailbox_uids(&g, "alice"), ids);
}

// ---------------------------------------------------------------------------
// 2. Deletion happens at QUIT only

#[test]
fn dele_takes_effect_only_at_quit() {
    let ports = Ports::new();
    let g = Gateway::start(&ports.toml());
    g.add_user("alice", "secret");
    let ids: Vec<String> = (1..=3)
        .map(|i| {
            let m = format!("Subject: m{i}\r\n\r\nbody {i}\r\n");
            send(&g, SENDER, &["alice@branch.example"], m.as_bytes(), false)
        })
        .collect();
    let all: Vec<&String> = ids.iter().collect();
    let full = {
        let mut p = Pop::login(ports.plain, "alice", "secret");
        let s = p.stat();
        assert_eq!(s.0, 3);
        assert_eq!(p.uidl(), numbered(&all));
        assert!(p.quit().starts_with("+OK"));
        s
    };

    // DELE, then the connection drops without QUIT: nothing is removed.
    let mut p = Pop::login(ports.plain, "alice", "secret");
    assert!(p.cmd("DELE 1").starts_with("+OK"));
    assert!(p.cmd("DELE 3").starts_with("+OK"));
    assert_eq!(p.stat().0, 1, "STAT after DELE counts the marked ones out");
    p.drop_connection();
    let mut p = Pop::login_when_free(ports.plain, "alice", "secret");
    assert_eq!(p.stat(), full, "a dropped session deleted messages");
    assert_eq!(p.uidl(), numbered(&all));
    assert_eq!(mailbox_uids(&g, "alice"), ids);

    // DELE, RSET, QUIT: nothing is removed.
    assert!(p.cmd("DELE 2").starts_with("+OK"));
    assert!(
        p.cmd("RETR 2").starts_with("-ERR"),
        "RETR of a deleted message"
    );
    assert!(p.cmd("RSET").starts_with("+OK"));
    assert_eq!(p.stat(), full);
    assert!(!p.retr(2).is_empty(), "RSET did not unmark message 2");
    assert!(p.cmd("DELE 1").starts_with("+OK"));
    assert!(p.cmd("RSET").starts_with("+OK"));
    assert!(p.quit().starts_with("+OK"));
    let mut p = Pop::login(ports.plain, "alice", "secret");
    assert_eq!(p.stat(), full, "DELE + RSET + QUIT deleted messages");
    assert_eq!(mailbox_uids(&g, "alice"), ids);

    // DELE, QUIT: removed; a new session sees fewer messages.
    let size2 = {
        let r = p.cmd("LIST 2");
        r.rsplit(' ').next().unwrap().parse::<usize>().unwrap()
    };
    assert!(p.cmd("DELE 2").starts_with("+OK"));
    assert!(p.quit().starts_with("+OK"));
    let mut p = Pop::login(ports.plain, "alice", "secret");
    assert_eq!(p.stat(), (2, full.1 - size2));
    assert_eq!(p.uidl(), numbered(&[&ids[0], &ids[2]]));
    assert!(p.retr(2).ends_with(b"body 3\r\n"));
    assert!(p.quit().starts_with("+OK"));
    assert_eq!(mailbox_uids(&g, "alice"), [ids[0].clone(), ids[2].clone()]);
}

// ---------------------------------------------------------------------------
// 3. One session per maildrop

#[test]
fn second_login_gets_in_use_until_the_first_quits() {
    let ports = Ports::new();
    let g = Gateway::start(&ports.toml());
    g.add_user("alice", "secret");
    send(
        &g,
        SENDER,
        &["alice@branch.example"],
        b"Subject: x\r\n\r\nx\r\n",
        false,
    );
    let mut first = Pop::login(ports.plain, "alice", "secret");
    assert!(first.cmd("DELE 1").starts_with("+OK"));

    let mut second = Pop::connect(ports.plain);
    let r = second.user_pass("alice", "secret");
    assert!(r.starts_with("-ERR [IN-USE] "), "second login: {r}");
    // Not logged in: transaction commands are refused.
    assert!(second.cmd("STAT").starts_with("-ERR"));
    // AUTH PLAIN too.
    let mut third = Pop::connect(ports.plain);
    let r = third.cmd(&format!(
        "AUTH PLAIN {}",
        base64::engine::general_purpose::STANDARD.encode(b"\0alice\0secret")
    ));
    assert!(
        r.starts_with("-ERR [IN-USE] "),
        "AUTH PLAIN while in use: {r}"
    );

    // The first session is unaffected and ends normally.
    assert_eq!(first.stat().0, 0);
    assert!(first.quit().starts_with("+OK"));
    assert!(first.closed());

    // Released at QUIT: a new login works and sees the deletion.
    let mut p = Pop::login(ports.plain, "alice", "secret");
    assert_eq!(p.stat(), (0, 0));
    assert!(p.quit().starts_with("+OK"));
    drop(second);
    drop(third);
}

// ---------------------------------------------------------------------------
// 4. Stable UIDs

#[test]
fn uidl_is_stable_across_sessions_and_restart() {
    let ports = Ports::new();
    let mut g = Gateway::start(&ports.toml());
    g.add_user("alice", "secret");
    let a = send(
        &g,
        SENDER,
        &["alice@branch.example"],
        b"Subject: a\r\n\r\na\r\n",
        false,
    );
    let b = send(
        &g,
        SENDER,
        &["alice@branch.example"],
        b"Subject: b\r\n\r\nb\r\n",
        false,
    );
    let mut p = Pop::login(ports.plain, "alice", "secret");
    let first = p.uidl();
    assert_eq!(first, numbered(&[&a, &b]), "UIDs are the queue ids");
    for (_, uid) in &first {
        // RFC 1939 §7: 1 to 70 characters in 0x21..0x7E.
        assert!(
            (1..=70).contains(&uid.len()) && uid.bytes().all(|c| (0x21..=0x7e).contains(&c)),
            "bad unique-id {uid:?}"
        );
    }
    assert_eq!(p.cmd("UIDL 2"), format!("+OK 2 {b}"));
    assert!(p.quit().starts_with("+OK"));

    let mut p = Pop::login(ports.plain, "alice", "secret");
    assert_eq!(p.uidl(), first, "second session");
    assert!(p.quit().starts_with("+OK"));

    g.restart();
    let mut p = Pop::login(ports.plain, "alice", "secret");
    assert_eq!(p.uidl(), first, "after a restart");
    // Deleting the first renumbers, but the ids stay.
    assert!(p.cmd("DELE 1").starts_with("+OK"));
    assert!(p.quit().starts_with("+OK"));
    let c = send(
        &g,
        SENDER,
        &["alice@branch.example"],
        b"Subject: c\r\n\r\nc\r\n",
        false,
    );
    let mut p = Pop::login(ports.plain, "alice", "secret");
    assert_eq!(p.uidl(), numbered(&[&b, &c]));
    assert_eq!(p.cmd("UIDL 1"), format!("+OK 1 {b}"));
    assert!(p.quit().starts_with("+OK"));
}

// ---------------------------------------------------------------------------
// 5. Plain-text login needs STLS where the listener says so

#[test]
fn stls_required_for_user_pass_where_plaintext_auth_is_off() {
    let ports = Ports::new();
    let g = Gateway::start(&ports.toml());
    g.add_user("alice", "secret");
    let id = send(
        &g,
        SENDER,
        &["alice@branch.example"],
        b"Subject: tls\r\n\r\nx\r\n",
        false,
    );

    // A line-level look first: no USER in CAPA, USER refused.
    let mut p = Pop::connect(ports.stls);
    let (status, capa) = p.multi("CAPA");
    assert!(status.starts_with("+OK"));
    let capa = show(&capa);
    assert!(capa.lines().any(|l| l == "STLS"), "CAPA:\n{capa}");
    assert!(
        !capa.lines().any(|l| l == "USER"),
        "USER offered before STLS:\n{capa}"
    );
    let r = p.cmd("USER alice");
    assert!(r.starts_with("-ERR"), "USER before STLS: {r}");
    let r = p.cmd("PASS secret");
    assert!(r.starts_with("-ERR"), "PASS before STLS: {r}");
    assert!(p.quit().starts_with("+OK"));

    // poplib: the same before STLS, then stls() and the login works.
    let v = python(
        &g,
        "pop3_stls.py",
        &[
            ports.stls.to_string(),
            g.path("cert.pem").display().to_string(),
            "alice".into(),
            "secret".into(),
        ],
    );
    let caps = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect()
    };
    let before = caps("capa_before");
    assert!(before.contains(&"STLS".into()), "{before:?}");
    assert!(
        !before.contains(&"USER".into()),
        "USER before STLS: {before:?}"
    );
    assert!(
        !before.contains(&"SASL".into()),
        "SASL before STLS: {before:?}"
    );
    for k in ["user_before", "pass_before", "auth_before"] {
        assert!(v[k].as_str().unwrap().starts_with("-ERR"), "{k}: {}", v[k]);
    }
    assert!(
        v["stls"].as_str().unwrap().starts_with("+OK"),
        "{}",
        v["stls"]
    );
    let after = caps("capa_after");
    assert!(
        after.contains(&"USER".into()),
        "no USER after STLS: {after:?}"
    );
    assert!(
        !after.contains(&"STLS".into()),
        "STLS again after STLS: {after:?}"
    );
    assert!(
        v["user_after"].as_str().unwrap().starts_with("+OK"),
        "{}",
        v["user_after"]
    );
    assert!(
        v["pass_after"].as_str().unwrap().starts_with("+OK"),
        "{}",
        v["pass_after"]
    );
    let size = expected(&g, SENDER, &id).len();
    assert_eq!(v["stat_after"], serde_json::json!([1, size]));
    assert!(v["quit"].as_str().unwrap().starts_with("+OK"));
}

// ---------------------------------------------------------------------------
// 6. Recipients: unknown users refused, aliases fan out

#[test]
fn unknown_user_refused_and_alias_delivers_to_every_target() {
    let ports = Ports::new();
    let extra = format!(
        "[local]\ndomains = [\"branch.example\"]\n[local.aliases]\nteam = [\"alice\", \"bob\"]\n{}",
        ports.toml()
    );
    let g = Gateway::start(&extra);
    g.add_user("alice", "secret");
    g.add_user("bob", "hunter2");
    let r = rcpt_reply(&g, "nobody@branch.example");
    assert!(r.starts_with("550 5.1.1"), "unknown local user: {r}");
    let content = b"From: s@client.test\r\nTo: team@branch.example\r\nSubject: team\r\n\r\nfor all of you\r\n.dot\r\n";
    let id = send(&g, SENDER, &["team@branch.example"], content, false);
    let want = expected(&g, SENDER, &id);
    for (user, pw) in [("alice", "secret"), ("bob", "hunter2")] {
        let mut p = Pop::login(ports.plain, user, pw);
        assert_eq!(p.stat(), (1, want.len()), "{user}");
        assert_eq!(p.uidl(), numbered(&[&id]), "{user}");
        let got = p.retr(1);
        assert!(
            got == want,
            "{user} read:\n{}\n---- expected ----\n{}",
            show(&got),
            show(&want)
        );
        assert!(p.quit().starts_with("+OK"));
    }
    // Nothing queued for relaying; nothing delivered to a mailbox "team".
    assert!(g.queue().is_empty(), "{:?}", g.queue());
    assert!(mailbox_uids(&g, "team").is_empty());

    // One stored copy: alice deleting hers leaves bob's intact.
    let mut p = Pop::login(ports.plain, "alice", "secret");
    assert!(p.cmd("DELE 1").starts_with("+OK"));
    assert!(p.quit().starts_with("+OK"));
    let mut p = Pop::login(ports.plain, "bob", "hunter2");
    assert_eq!(p.retr(1), want, "bob's copy after alice deleted hers");
    assert!(p.cmd("DELE 1").starts_with("+OK"));
    assert!(p.quit().starts_with("+OK"));
    assert_eq!(
        store(&g).body(&id).unwrap(),
        None,
        "body kept after both deleted"
    );

    // Named directly and through the alias: one copy, so UIDs stay unique.
    let id = send(
        &g,
        SENDER,
        &["alice@branch.example", "team@branch.example"],
        b"Subject: twice\r\n\r\nx\r\n",
        false,
    );
    assert_eq!(mailbox_uids(&g, "alice"), vec![id.clone()]);
    assert_eq!(mailbox_uids(&g, "bob"), vec![id.clone()]);
    let mut p = Pop::login(ports.plain, "alice", "secret");
    assert_eq!(p.uidl(), numbered(&[&id]));
    assert!(p.quit().starts_with("+OK"));
}

// ---------------------------------------------------------------------------
// 7. Failed logins

#[test]
fn wrong_password_gets_auth_code_and_too_many_close_the_connection() {
    let ports = Ports::new();
    let extra = format!(
        "[pop3]\nmax_auth_failures = 2\nauth_failure_delay = \"10ms\"\n{}",
        ports.toml()
    );
    let g = Gateway::start(&extra);
    g.add_user("alice", "secret");

    let mut p = Pop::connect(ports.plain);
    let r = p.user_pass("alice", "wrong");
    assert!(r.starts_with("-ERR [AUTH] "), "wrong password: {r}");
    // Still open after one failure.
    let (status, _) = p.multi("CAPA");
    assert!(status.starts_with("+OK"), "after one failure: {status}");
    let r = p.user_pass("alice", "wrong again");
    assert!(r.starts_with("-ERR [AUTH] "), "second failure: {r}");
    assert!(
        p.closed(),
        "the connection stays open after max_auth_failures"
    );

    // An unknown user gets the same answer; AUTH PLAIN failures count too.
    let mut p = Pop::connect(ports.plain);
    let r = p.user_pass("nobody", "secret");
    assert!(r.starts_with("-ERR [AUTH] "), "unknown user: {r}");
    let r = p.cmd(&format!(
        "AUTH PLAIN {}",
        base64::engine::general_purpose::STANDARD.encode(b"\0alice\0nope")
    ));
    assert!(r.starts_with("-ERR [AUTH] "), "AUTH PLAIN: {r}");
    assert!(p.closed(), "AUTH PLAIN failure did not count");

    // The right password still works (failures are per connection).
    let mut p = Pop::login(ports.plain, "alice", "secret");
    assert!(p.quit().starts_with("+OK"));
}

// ---------------------------------------------------------------------------
// 8. Quota

fn set_quota(g: &mut Gateway, quota: u64) {
    g.stop();
    let config = std::fs::read_to_string(&g.config_path).unwrap();
    let mut out = String::new();
    for line in config.lines() {
        if line.starts_with("quota = ") {
            out.push_str(&format!("quota = {quota}\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    std::fs::write(&g.config_path, out).unwrap();
    g.spawn();
}

#[test]
fn full_mailbox_refuses_rcpt_until_messages_are_deleted() {
    let ports = Ports::new();
    let quota = 600;
    let extra = format!(
        "[local]\ndomains = [\"branch.example\"]\nquota = {quota}\n{}",
        ports.toml()
    );
    let mut g = Gateway::start(&extra);
    g.add_user("alice", "secret");
    g.add_user("bob", "hunter2");

    // Under the quota: accepted, even if the message takes it over.
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    big.extend_from_slice(&b"x".repeat(700));
    big.extend_from_slice(b"\r\n");
    send(&g, SENDER, &["alice@branch.example"], &big, false);
    let usage = store(&g).mailbox_usage("alice").unwrap() as u64;
    assert!(usage >= quota);

    // Over it: 452 4.2.2 for alice, bob is not affected.
    let r = rcpt_reply(&g, "alice@branch.example");
    assert!(r.starts_with("452 4.2.2"), "RCPT to a full mailbox: {r}");
    let r = rcpt_reply(&g, "bob@branch.example");
    assert!(r.starts_with("250"), "RCPT to bob: {r}");

    // Deleting without QUIT frees nothing.
    let mut p = Pop::login(ports.plain, "alice", "secret");
    assert!(p.cmd("DELE 1").starts_with("+OK"));
    let r = rcpt_reply(&g, "alice@branch.example");
    assert!(r.starts_with("452 4.2.2"), "RCPT before QUIT: {r}");
    assert!(p.quit().starts_with("+OK"));
    let r = rcpt_reply(&g, "alice@branch.example");
    assert!(r.starts_with("250"), "RCPT after deleting over POP3: {r}");

    // Exactly at the quota counts as full; one octet under does not.
    let id = send(
        &g,
        SENDER,
        &["alice@branch.example"],
        b"Subject: small\r\n\r\ns\r\n",
        false,
    );
    let usage = store(&g).mailbox_usage("alice").unwrap() as u64;
    assert_eq!(usage, g.body(&id).len() as u64);
    set_quota(&mut g, usage);
    let r = rcpt_reply(&g, "alice@branch.example");
    assert!(r.starts_with("452 4.2.2"), "RCPT at exactly the quota: {r}");
    set_quota(&mut g, usage + 1);
    let r = rcpt_reply(&g, "alice@branch.example");
    assert!(r.starts_with("250"), "RCPT one octet under the quota: {r}");
}
