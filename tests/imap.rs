//! The IMAP server against the real binary: real clients (Python's imaplib,
//! mbsync, fetchmail) and a line-level client for the rules (flags, UIDs
//! and folders kept across restarts, EXPUNGE, IDLE, STARTTLS, POP3 and
//! IMAP on one INBOX, the limits).
//!
//! `tests/run.sh` installs fetchmail and isync (mbsync). Every process a
//! test starts is stopped by PID when its guard is dropped; every wait has
//! a deadline.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use common::peers::chmod;
use common::{free_port, queued_id, run_logged as run, wait_for, Client, Gateway};
use serde_json::Value;

const PYTHON: &str = "/usr/bin/python3";
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
const SENDER: &str = "s@client.test";
const ALICE: &str = "alice@branch.example";

// ---------------------------------------------------------------------------
// Listeners

/// The IMAP listeners a test adds: `plain` allows plain-text login without
/// TLS, `stls` needs STARTTLS first, `imaps` is implicit TLS; `pop3` is a
/// POP3 listener allowing plain-text login.
struct Ports {
    plain: u16,
    stls: u16,
    imaps: u16,
    pop3: u16,
}

impl Ports {
    fn new() -> Ports {
        loop {
            let p = Ports {
                plain: free_port(),
                stls: free_port(),
                imaps: free_port(),
                pop3: free_port(),
            };
            let mut all = [p.plain, p.stls, p.imaps, p.pop3];
            all.sort();
            if all.windows(2).all(|w| w[0] != w[1]) {
                return p;
            }
        }
    }

    fn toml(&self) -> String {
        format!(
            r#"
[[listen]]
address = "127.0.0.1:{}"
mode = "imap"
plaintext_auth = true
[[listen]]
address = "127.0.0.1:{}"
mode = "imap"
plaintext_auth = false
[[listen]]
address = "127.0.0.1:{}"
mode = "imaps"
[[listen]]
address = "127.0.0.1:{}"
mode = "pop3"
plaintext_auth = true
"#,
            self.plain, self.stls, self.imaps, self.pop3
        )
    }
}

/// A gateway with the IMAP listeners, `extra` appended, and the account
/// alice (password "secret"). The listeners' ports differ from the
/// gateway's own; when another process takes one of them before the daemon
/// binds it, the start is tried again on new ports.
fn gateway(extra: &str) -> (Gateway, Ports) {
    for attempt in 0.. {
        let mut g = Gateway::configure(extra);
        let ports = loop {
            let p = Ports::new();
            let theirs = [g.relay, g.submission, g.submissions];
            if [p.plain, p.stls, p.imaps, p.pop3]
                .iter()
                .all(|x| !theirs.contains(x))
            {
                break p;
            }
        };
        let mut config = std::fs::read_to_string(&g.config_path).unwrap();
        config.push_str(&ports.toml());
        std::fs::write(&g.config_path, config).unwrap();
        let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| g.spawn()));
        match started {
            Ok(()) => {
                g.add_user("alice", "secret");
                return (g, ports);
            }
            Err(_) if attempt < 5 && g.log().contains("cannot listen on") => continue,
            Err(e) => std::panic::resume_unwind(e),
        }
    }
    unreachable!()
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
    assert_eq!(ran.code, Some(0), "{script} failed:\n{ran}\n{}", g.log());
    let json = ran.stdout.lines().last().unwrap_or("");
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{script}: {e}:\n{ran}"))
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

/// Sends `content` (unstuffed, CRLF line ends) over SMTP to alice and
/// returns the queue id, after the 250 (the message is stored then).
fn send(g: &Gateway, content: &[u8]) -> String {
    let mut c = Client::connect(g.relay);
    let r = c.cmd("EHLO client.test");
    assert!(r.starts_with("250"), "EHLO: {r}");
    let eight_bit = content.iter().any(|&b| b >= 0x80);
    let body = if eight_bit { " BODY=8BITMIME" } else { "" };
    let r = c.cmd(&format!("MAIL FROM:<{SENDER}>{body}"));
    assert!(r.starts_with("250"), "MAIL: {r}");
    let r = c.cmd(&format!("RCPT TO:<{ALICE}>"));
    assert!(r.starts_with("250"), "RCPT: {r}\n{}", g.log());
    let r = c.cmd("DATA");
    assert!(r.starts_with("354"), "DATA: {r}");
    c.send(&stuff(content));
    c.send(b".\r\n");
    let r = c.reply();
    let id = queued_id(&r).unwrap_or_else(|| panic!("not queued: {r}"));
    c.cmd("QUIT");
    id
}

/// What an IMAP client must read for a delivered message: the Return-Path
/// line, then the stored message (outpost's Received header and the bytes
/// the SMTP client sent, unstuffed).
fn expected(g: &Gateway, id: &str) -> Vec<u8> {
    let mut m = format!("Return-Path: <{SENDER}>\r\n").into_bytes();
    m.extend_from_slice(&g.body(id));
    assert!(m.ends_with(b"\r\n"));
    m
}

fn subject(s: &str) -> Vec<u8> {
    format!("From: {SENDER}\r\nTo: {ALICE}\r\nSubject: {s}\r\n\r\nbody of {s}\r\n").into_bytes()
}

/// 8-bit MIME: UTF-8 and a lone 0xFF in the body, lines starting with dots.
fn eight_bit_dot_message() -> Vec<u8> {
    let mut m = "From: J\u{fc}rgen <s@client.test>\r\nTo: alice@branch.example\r\nSubject: Gr\u{fc}\u{df}e\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGr\u{fc}\u{df}e aus K\u{f6}ln \u{2013} \u{20ac}100\r\n"
        .as_bytes()
        .to_vec();
    m.extend_from_slice(
        b"raw \xff\xfe octets\r\n.leading dot\r\n..two dots\r\n.\r\nend . line\r\n.\r\n",
    );
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

fn b64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap())
        .unwrap()
}

fn assert_bytes(what: &str, got: &[u8], want: &[u8]) {
    assert!(
        got == want,
        "{what}:\n{}\n---- expected ----\n{}",
        show(got),
        show(want)
    );
}

// ---------------------------------------------------------------------------
// A line-level IMAP client

struct Imap {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
    tag: u32,
}

/// One tagged command's answer: the untagged responses (with their
/// literals inline) and the tagged line.
struct Answer {
    untagged: Vec<Vec<u8>>,
    tagged: String,
}

impl Answer {
    fn ok(&self) -> bool {
        self.tagged
            .split(' ')
            .nth(1)
            .is_some_and(|s| s.eq_ignore_ascii_case("OK"))
    }

    fn lines(&self) -> Vec<String> {
        self.untagged.iter().map(|u| show(u)).collect()
    }

    fn has(&self, line: &str) -> bool {
        self.lines().iter().any(|l| l.trim_end() == line)
    }

    /// The untagged FETCH responses.
    fn fetches(&self) -> Vec<&[u8]> {
        self.untagged
            .iter()
            .filter(|u| show(u).split(' ').nth(2) == Some("FETCH"))
            .map(|u| &u[..])
            .collect()
    }
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for l in self.lines() {
            writeln!(f, "{}", l.trim_end())?;
        }
        write!(f, "{}", self.tagged)
    }
}

impl Imap {
    fn connect(port: u16) -> Imap {
        Imap::connect_from(port, None)
    }

    /// Connects from a chosen local address (e.g. 127.0.0.2).
    fn connect_from(port: u16, local: Option<&str>) -> Imap {
        let stream = match local {
            None => TcpStream::connect(("127.0.0.1", port)).unwrap(),
            Some(ip) => {
                let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .unwrap();
                let local: SocketAddr = format!("{ip}:0").parse().unwrap();
                sock.bind(&local.into()).unwrap();
                sock.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())
                    .unwrap();
                sock.into()
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut c = Imap {
            reader,
            stream,
            tag: 0,
        };
        let greeting = show(&c.response());
        assert!(greeting.starts_with("* OK"), "greeting: {greeting}");
        c
    }

    /// Connects and logs in; panics unless it works.
    fn login(port: u16, user: &str, password: &str) -> Imap {
        let mut c = Imap::connect(port);
        let a = c.cmd(&format!("LOGIN {user} {password}"));
        assert!(a.ok(), "LOGIN {user}: {a:?}");
        c
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// One response (a line, with any literals it announces and the rest of
    /// the response after them); empty at EOF.
    fn response(&mut self) -> Vec<u8> {
        let mut all = Vec::new();
        loop {
            let mut line = Vec::new();
            match self.reader.read_until(b'\n', &mut line) {
                Ok(0) => return all,
                Ok(_) => {}
                Err(e) => panic!("reading a response: {e} (so far: {})", show(&all)),
            }
            all.extend_from_slice(&line);
            let Some(n) = literal_length(&line) else {
                return all;
            };
            let mut lit = vec![0; n];
            self.reader.read_exact(&mut lit).unwrap();
            all.extend_from_slice(&lit);
        }
    }

    fn next_tag(&mut self) -> String {
        self.tag += 1;
        format!("t{}", self.tag)
    }

    /// Reads responses up to the tagged one for `tag`.
    fn answer(&mut self, tag: &str) -> Answer {
        let mut untagged: Vec<Vec<u8>> = Vec::new();
        loop {
            let r = self.response();
            assert!(
                !r.is_empty(),
                "EOF before the answer to {tag}; so far:\n{}",
                untagged.iter().map(|u| show(u)).collect::<String>()
            );
            if r.starts_with(format!("{tag} ").as_bytes()) {
                return Answer {
                    untagged,
                    tagged: show(&r).trim_end().to_string(),
                };
            }
            untagged.push(r);
        }
    }

    /// Sends a tagged command line; returns its answer.
    fn cmd(&mut self, line: &str) -> Answer {
        let tag = self.next_tag();
        self.send(format!("{tag} {line}\r\n").as_bytes());
        self.answer(&tag)
    }

    /// A command that must succeed.
    fn ok(&mut self, line: &str) -> Answer {
        let a = self.cmd(line);
        assert!(a.ok(), "{line}: {a:?}");
        a
    }

    /// APPEND with a synchronizing literal; the answer (or, when the
    /// server refused the literal, that refusal).
    fn append(&mut self, folder: &str, flags: &str, message: &[u8]) -> Answer {
        let tag = self.next_tag();
        self.send(format!("{tag} APPEND {folder} ({flags}) {{{}}}\r\n", message.len()).as_bytes());
        let r = self.response();
        if !r.starts_with(b"+") {
            return Answer {
                untagged: Vec::new(),
                tagged: show(&r).trim_end().to_string(),
            };
        }
        self.send(message);
        self.send(b"\r\n");
        self.answer(&tag)
    }

    /// SELECT; the number of messages.
    fn select(&mut self, folder: &str) -> (usize, Answer) {
        let a = self.ok(&format!("SELECT {folder}"));
        let n = a
            .lines()
            .iter()
            .find_map(|l| {
                l.strip_prefix("* ")?
                    .trim_end()
                    .strip_suffix(" EXISTS")?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no EXISTS: {a:?}"));
        (n, a)
    }

    /// UID FETCH 1:* (UID FLAGS BODY.PEEK[]): (uid, flags, message).
    fn messages(&mut self) -> Vec<(u32, Vec<String>, Vec<u8>)> {
        let a = self.ok("UID FETCH 1:* (UID FLAGS BODY.PEEK[])");
        a.fetches()
            .iter()
            .map(|f| (uid_of(f), flags_of(f), literal_of(f)))
            .collect()
    }

    /// The UIDs of the selected folder, in order.
    fn uids(&mut self) -> Vec<u32> {
        let a = self.ok("UID FETCH 1:* (UID)");
        a.fetches().iter().map(|f| uid_of(f)).collect()
    }

    /// STATUS of `folder`: item → number.
    fn status(&mut self, folder: &str, items: &str) -> Vec<(String, u64)> {
        let a = self.ok(&format!("STATUS {folder} ({items})"));
        let line = a
            .lines()
            .into_iter()
            .find(|l| l.starts_with("* STATUS "))
            .unwrap_or_else(|| panic!("no STATUS: {a:?}"));
        let inner = line[line.rfind('(').unwrap() + 1..line.rfind(')').unwrap()].to_string();
        let words: Vec<&str> = inner.split(' ').collect();
        words
            .chunks(2)
            .map(|w| (w[0].to_string(), w[1].parse().unwrap()))
            .collect()
    }

    fn status_of(&mut self, folder: &str, item: &str) -> u64 {
        self.status(folder, item)[0].1
    }

    /// True when the server closed the connection (EOF).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0))
    }
}

/// N when `line` ends with a literal announcement {N} (or {N+}).
fn literal_length(line: &[u8]) -> Option<usize> {
    let line = line.strip_suffix(b"\r\n")?;
    let line = line.strip_suffix(b"}")?;
    let open = line.iter().rposition(|&b| b == b'{')?;
    let digits = &line[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The first literal's octets in a response.
fn literal_of(resp: &[u8]) -> Vec<u8> {
    let end = resp
        .windows(3)
        .position(|w| w == b"}\r\n")
        .unwrap_or_else(|| panic!("no literal in {}", show(resp)));
    let open = resp[..end].iter().rposition(|&b| b == b'{').unwrap();
    let n: usize = show(&resp[open + 1..end]).parse().unwrap();
    resp[end + 3..end + 3 + n].to_vec()
}

/// The text of a response outside its literals (so that message content
/// cannot look like FLAGS or UID).
fn outside_literals(resp: &[u8]) -> String {
    let mut out = Vec::new();
    let mut rest = resp;
    while let Some(end) = rest.windows(3).position(|w| w == b"}\r\n") {
        let open = rest[..end].iter().rposition(|&b| b == b'{').unwrap();
        let n: usize = show(&rest[open + 1..end]).parse().unwrap();
        out.extend_from_slice(&rest[..end + 1]);
        rest = &rest[end + 3 + n..];
    }
    out.extend_from_slice(rest);
    show(&out)
}

fn uid_of(resp: &[u8]) -> u32 {
    let text = outside_literals(resp);
    let at = text
        .find("UID ")
        .unwrap_or_else(|| panic!("no UID in {text}"));
    text[at + 4..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn flags_of(resp: &[u8]) -> Vec<String> {
    let text = outside_literals(resp);
    let at = text
        .find("FLAGS (")
        .unwrap_or_else(|| panic!("no FLAGS in {text}"));
    let rest = &text[at + 7..];
    let mut flags: Vec<String> = rest[..rest.find(')').unwrap()]
        .split_whitespace()
        .map(str::to_string)
        .collect();
    flags.sort();
    flags
}

/// The words of a response code in the tagged line: "[APPENDUID 1 2]" →
/// ["1", "2"].
fn code(line: &str, name: &str) -> Vec<String> {
    let at = line
        .find(&format!("[{name} "))
        .unwrap_or_else(|| panic!("no [{name}] in {line}"));
    let rest = &line[at + name.len() + 2..];
    rest[..rest.find(']').unwrap()]
        .split(' ')
        .map(str::to_string)
        .collect()
}

/// The numbers of the untagged EXPUNGE responses, in order.
fn expunged(a: &Answer) -> Vec<usize> {
    a.lines()
        .iter()
        .filter_map(|l| {
            l.strip_prefix("* ")?
                .trim_end()
                .strip_suffix(" EXPUNGE")?
                .parse()
                .ok()
        })
        .collect()
}

/// The UIDs left after the EXPUNGE responses, applied in order, each
/// naming a sequence number in the view left by the ones before.
fn after_expunges(uids: &[u32], a: &Answer) -> Vec<u32> {
    let mut left = uids.to_vec();
    for n in expunged(a) {
        assert!(
            n >= 1 && n <= left.len(),
            "* {n} EXPUNGE out of range: {a:?}"
        );
        left.remove(n - 1);
    }
    left
}

/// LIST "" "*": (attributes, name) pairs.
fn list(c: &mut Imap, verb: &str) -> Vec<(Vec<String>, String)> {
    let a = c.ok(&format!("{verb} \"\" \"*\""));
    a.lines()
        .iter()
        .map(|l| {
            let l = l.trim_end();
            let rest = l
                .strip_prefix(&format!("* {verb} ("))
                .unwrap_or_else(|| panic!("{verb}: {l}"));
            let close = rest.find(')').unwrap();
            let attrs = rest[..close]
                .split_whitespace()
                .map(str::to_string)
                .collect();
            // ") "/" NAME"
            let name = rest[close + 1..].trim_start();
            let name = name.strip_prefix("\"/\" ").unwrap_or_else(|| panic!("{l}"));
            (attrs, name.trim_matches('"').to_string())
        })
        .collect()
}

fn names(list: &[(Vec<String>, String)]) -> Vec<String> {
    let mut n: Vec<String> = list.iter().map(|(_, n)| n.clone()).collect();
    n.sort();
    n
}

/// A message as a client would APPEND it.
fn draft(subject: &str) -> Vec<u8> {
    format!("From: alice@branch.example\r\nTo: bob@example.org\r\nSubject: {subject}\r\nDate: Mon, 7 Dec 2026 10:00:00 +0000\r\n\r\nDraft text \u{e9}\u{e8}.\r\n.a dot line\r\n")
        .into_bytes()
}

// ---------------------------------------------------------------------------
// 1. imaplib: byte-exact FETCH, \Seen by BODY[] only

#[test]
fn imaplib_fetches_byte_exact_and_only_body_sets_seen() {
    let (g, ports) = gateway("");
    let content = eight_bit_dot_message();
    assert!(content.iter().any(|&b| b >= 0x80));
    let ids = [send(&g, &content), send(&g, &subject("second"))];
    let want: Vec<Vec<u8>> = ids.iter().map(|id| expected(&g, id)).collect();
    assert!(want[0].ends_with(&content));

    let v = python(
        &g,
        "imap_fetch.py",
        &[ports.plain.to_string(), "alice".into(), "secret".into()],
    );
    let caps: Vec<&str> = v["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for c in ["IMAP4REV1", "IDLE", "UIDPLUS", "MOVE", "SPECIAL-USE"] {
        assert!(caps.contains(&c), "capabilities lack {c}: {caps:?}");
    }
    let messages = v["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    for (i, (m, w)) in messages.iter().zip(&want).enumerate() {
        assert_bytes(&format!("BODY.PEEK[] of {}", i + 1), &b64(&m["peek"]), w);
        let flags = m["flags_after_peek"].as_str().unwrap();
        assert!(
            !flags.contains("\\Seen"),
            "BODY.PEEK[] set \\Seen on {}: {flags}",
            i + 1
        );
    }
    assert_bytes("BODY[] of 1", &b64(&v["body"]), &want[0]);
    let after = v["flags_after_body"].as_array().unwrap();
    assert!(
        after[0].as_str().unwrap().contains("\\Seen"),
        "BODY[] did not set \\Seen: {}",
        after[0]
    );
    assert!(
        !after[1].as_str().unwrap().contains("\\Seen"),
        "\\Seen on a message not fetched: {}",
        after[1]
    );
    // Kept in the store: a new session sees it.
    let mut c = Imap::login(ports.plain, "alice", "secret");
    c.select("INBOX");
    let m = c.messages();
    assert_eq!(m[0].1, vec!["\\Seen".to_string()]);
    assert!(m[1].1.is_empty(), "{:?}", m[1].1);
    // EXAMINE: BODY[] leaves \Seen alone.
    c.ok("EXAMINE INBOX");
    let a = c.ok("FETCH 2 (BODY[])");
    assert_bytes("BODY[] in EXAMINE", &literal_of(a.fetches()[0]), &want[1]);
    c.select("INBOX");
    assert!(c.messages()[1].1.is_empty(), "EXAMINE + BODY[] set \\Seen");
    // SELECT: BODY[] sets it and says so in the same FETCH response.
    let a = c.ok("FETCH 2 (BODY[])");
    let f = a.fetches();
    assert_eq!(f.len(), 1, "{a:?}");
    assert_bytes("BODY[] of 2", &literal_of(f[0]), &want[1]);
    assert_eq!(flags_of(f[0]), ["\\Seen"], "{a:?}");
    // The size announced is the size read.
    for (i, w) in want.iter().enumerate() {
        let a = c.ok(&format!("FETCH {} (RFC822.SIZE)", i + 1));
        let text = show(a.fetches()[0]);
        assert!(
            text.contains(&format!("RFC822.SIZE {}", w.len())),
            "{text} (read {} octets)",
            w.len()
        );
    }
}

/// APPEND stores the octets it was given: bare LF and bare CR line ends,
/// 8-bit octets, no final line end.
#[test]
fn append_is_byte_exact_whatever_the_line_ends() {
    let (g, ports) = gateway("");
    let mut c = Imap::login(ports.plain, "alice", "secret");
    let odd = b"Subject: lf only\nX-8bit: \xe4\xf6\xfc\n\nline one\n.dot\nbare\rcr\r\nmixed\n\xff end without newline".to_vec();
    let a = c.append("Drafts", "", &odd);
    assert!(a.ok(), "{a:?}");
    let uid = code(&a.tagged, "APPENDUID")[1].clone();
    c.select("Drafts");
    let a = c.ok(&format!("UID FETCH {uid} (RFC822.SIZE BODY.PEEK[])"));
    let f = a.fetches();
    assert_eq!(f.len(), 1, "{a:?}");
    assert_bytes("the appended message", &literal_of(f[0]), &odd);
    assert!(
        outside_literals(f[0]).contains(&format!("RFC822.SIZE {}", odd.len())),
        "{}",
        show(f[0])
    );
    drop(g);
}

// ---------------------------------------------------------------------------
// 2. Flags persist across sessions and restarts

#[test]
fn flags_persist_across_sessions_and_restart() {
    let (mut g, ports) = gateway("");
    send(&g, &subject("one"));
    send(&g, &subject("two"));
    let mut c = Imap::login(ports.plain, "alice", "secret");
    c.select("INBOX");
    let mut other = Imap::login(ports.plain, "alice", "secret");
    other.select("INBOX");
    let a = c.ok("STORE 1 +FLAGS (\\Flagged $Work)");
    let f = a.fetches();
    assert_eq!(f.len(), 1, "{a:?}");
    assert_eq!(flags_of(f[0]), ["$Work", "\\Flagged"]);
    c.ok("STORE 2 +FLAGS.SILENT (\\Answered)");
    c.ok("STORE 2 -FLAGS.SILENT (\\Answered)");
    c.ok("LOGOUT");
    // A session with the folder selected hears of the change.
    let a = other.ok("NOOP");
    let f = a.fetches();
    assert!(
        f.iter()
            .any(|f| show(f).starts_with("* 1 FETCH") && flags_of(f) == ["$Work", "\\Flagged"]),
        "the other session: {a:?}"
    );
    other.ok("LOGOUT");

    let want = vec![
        vec!["$Work".to_string(), "\\Flagged".to_string()],
        Vec::new(),
    ];
    let flags = |port| {
        let mut c = Imap::login(port, "alice", "secret");
        c.select("INBOX");
        let a = c.ok("FETCH 1:* (FLAGS)");
        let f: Vec<Vec<String>> = a.fetches().iter().map(|f| flags_of(f)).collect();
        c.ok("LOGOUT");
        f
    };
    assert_eq!(flags(ports.plain), want, "in a new session");
    g.restart();
    assert_eq!(flags(ports.plain), want, "after a restart");
    // FLAGS replaces them all.
    let mut c = Imap::login(ports.plain, "alice", "secret");
    c.select("INBOX");
    c.ok("STORE 1 FLAGS ($Work)");
    c.ok("LOGOUT");
    g.restart();
    assert_eq!(
        flags(ports.plain),
        vec![vec!["$Work".to_string()], Vec::new()],
        "FLAGS replaced, after a restart"
    );
}

// ---------------------------------------------------------------------------
// 3. UIDVALIDITY and UIDs across restarts

#[test]
fn uidvalidity_and_uids_stable_across_restart() {
    let (mut g, ports) = gateway("");
    for s in ["a", "b", "c", "d"] {
        send(&g, &subject(s));
    }
    let mut c = Imap::login(ports.plain, "alice", "secret");
    c.select("INBOX");
    // A gap in the UIDs (b goes) and the highest UID gone (d): UIDNEXT
    // is not the highest UID left plus one.
    c.ok("STORE 2,4 +FLAGS.SILENT (\\Deleted)");
    c.ok("EXPUNGE");
    let before = c.status("INBOX", "MESSAGES UIDNEXT UIDVALIDITY");
    let (_, sel) = c.select("INBOX");
    let validity = code(
        &sel.lines()
            .into_iter()
            .find(|l| l.contains("[UIDVALIDITY "))
            .unwrap(),
        "UIDVALIDITY",
    );
    let messages = c.messages();
    let uids: Vec<u32> = messages.iter().map(|m| m.0).collect();
    assert_eq!(uids.len(), 2);
    assert!(uids[0] < uids[1]);
    c.ok("LOGOUT");

    g.restart();
    let mut c = Imap::login(ports.plain, "alice", "secret");
    assert_eq!(
        c.status("INBOX", "MESSAGES UIDNEXT UIDVALIDITY"),
        before,
        "STATUS after a restart"
    );
    let (_, sel) = c.select("INBOX");
    assert!(
        sel.has(&format!("* OK [UIDVALIDITY {}] UIDs valid", validity[0]))
            || sel
                .lines()
                .iter()
                .any(|l| l.contains(&format!("[UIDVALIDITY {}]", validity[0]))),
        "UIDVALIDITY changed: {sel:?}"
    );
    assert_eq!(c.messages(), messages, "UID FETCH after a restart");
    // Each UID names the same message.
    for (uid, _, body) in &messages {
        let a = c.ok(&format!("UID FETCH {uid} (BODY.PEEK[])"));
        assert_eq!(a.fetches().len(), 1);
        assert_eq!(&literal_of(a.fetches()[0]), body);
    }
    // A new message gets a new UID, not the expunged one.
    let uidnext = before
        .iter()
        .find(|(k, _)| k == "UIDNEXT")
        .unwrap()
        .1
        .try_into()
        .unwrap();
    send(&g, &subject("d"));
    let a = c.ok("NOOP");
    assert!(a.has("* 3 EXISTS"), "{a:?}");
    let new = c.uids();
    assert_eq!(&new[..2], &uids[..]);
    assert!(new[2] >= uidnext, "UID {} below UIDNEXT {uidnext}", new[2]);
}

// ---------------------------------------------------------------------------
// 4. Folders

#[test]
fn folders_create_list_append_rename_delete_subscribe_copy_move_status() {
    let (g, ports) = gateway("");
    let ids = [send(&g, &subject("one")), send(&g, &subject("two"))];
    let want: Vec<Vec<u8>> = ids.iter().map(|id| expected(&g, id)).collect();
    let mut c = Imap::login(ports.plain, "alice", "secret");

    // The special-use folders, made at the first login.
    let l = list(&mut c, "LIST");
    for (name, attr) in [
        ("Sent", "\\Sent"),
        ("Drafts", "\\Drafts"),
        ("Trash", "\\Trash"),
        ("Junk", "\\Junk"),
        ("Archive", "\\Archive"),
    ] {
        let (attrs, _) = l
            .iter()
            .find(|(_, n)| n == name)
            .unwrap_or_else(|| panic!("no {name}: {l:?}"));
        assert!(attrs.contains(&attr.to_string()), "{name}: {attrs:?}");
    }
    assert!(l.iter().any(|(_, n)| n == "INBOX"), "{l:?}");

    // CREATE with a missing parent makes the parent.
    c.ok("CREATE \"Projects/2026\"");
    let l = list(&mut c, "LIST");
    let projects = l.iter().find(|(_, n)| n == "Projects");
    assert!(
        projects.is_some_and(|(a, _)| a.contains(&"\\HasChildren".to_string())),
        "{l:?}"
    );
    assert!(l.iter().any(|(_, n)| n == "Projects/2026"), "{l:?}");
    assert!(
        !c.cmd("CREATE Projects/2026").ok(),
        "CREATE of one that exists"
    );

    // APPEND to Drafts: APPENDUID, the message back byte-exact with \Draft.
    let d = draft("plan");
    let a = c.append("Drafts", "\\Draft", &d);
    assert!(a.ok(), "{a:?}");
    let appenduid = code(&a.tagged, "APPENDUID");
    let (n, sel) = c.select("Drafts");
    assert_eq!(n, 1);
    assert!(
        sel.lines()
            .iter()
            .any(|l| l.contains(&format!("[UIDVALIDITY {}]", appenduid[0]))),
        "APPENDUID's UIDVALIDITY is not the folder's: {sel:?}"
    );
    let a = c.ok(&format!(
        "UID FETCH {} (UID FLAGS BODY.PEEK[])",
        appenduid[1]
    ));
    let f = a.fetches();
    assert_eq!(f.len(), 1, "{a:?}");
    assert_eq!(flags_of(f[0]), ["\\Draft"]);
    assert_bytes("the appended draft", &literal_of(f[0]), &d);
    assert_eq!(
        c.status("Drafts", "MESSAGES UNSEEN UIDNEXT"),
        [
            ("MESSAGES".to_string(), 1),
            ("UNSEEN".into(), 1),
            ("UIDNEXT".into(), appenduid[1].parse::<u64>().unwrap() + 1)
        ]
    );
    c.ok("UNSELECT");

    // RENAME of a parent takes its sub-folders and their messages along
    // (RFC 9051 §6.3.6).
    let p = draft("in a project");
    let a = c.append("Projects/2026", "", &p);
    assert!(a.ok(), "{a:?}");
    c.ok("RENAME Projects Work");
    let l = names(&list(&mut c, "LIST"));
    assert!(l.contains(&"Work".to_string()), "{l:?}");
    assert!(l.contains(&"Work/2026".to_string()), "{l:?}");
    assert!(
        !l.iter().any(|n| n.starts_with("Projects")),
        "RENAME left the old names: {l:?}"
    );
    c.select("Work/2026");
    let m = c.messages();
    assert_eq!(m.len(), 1, "messages after RENAME of the parent");
    assert_bytes("message in a renamed folder", &m[0].2, &p);
    c.ok("UNSELECT");
    c.ok("RENAME Work Projects");

    // RENAME, then DELETE.
    c.ok("RENAME \"Projects/2026\" \"Projects/2027\"");
    assert_eq!(c.status_of("Projects/2027", "MESSAGES"), 1);
    let l = names(&list(&mut c, "LIST"));
    assert!(l.contains(&"Projects/2027".to_string()), "{l:?}");
    assert!(!l.contains(&"Projects/2026".to_string()), "{l:?}");
    assert!(!c.cmd("SELECT Projects/2026").ok());
    c.ok("DELETE \"Projects/2027\"");
    let l = list(&mut c, "LIST");
    assert!(!names(&l).contains(&"Projects/2027".to_string()), "{l:?}");
    let projects = l.iter().find(|(_, n)| n == "Projects").expect("Projects");
    assert!(projects.0.contains(&"\\HasNoChildren".to_string()), "{l:?}");

    // SUBSCRIBE / LSUB / UNSUBSCRIBE.
    c.ok("SUBSCRIBE Projects");
    assert!(
        names(&list(&mut c, "LSUB")).contains(&"Projects".to_string()),
        "LSUB after SUBSCRIBE"
    );
    c.ok("UNSUBSCRIBE Projects");
    assert!(
        !names(&list(&mut c, "LSUB")).contains(&"Projects".to_string()),
        "LSUB after UNSUBSCRIBE"
    );

    // COPY: COPYUID, the source unchanged; to no folder: TRYCREATE.
    c.select("INBOX");
    let a = c.cmd("COPY 1 Nowhere");
    assert!(a.tagged.contains(" NO [TRYCREATE]"), "{a:?}");
    let src = c.uids();
    let archive_validity = c.status_of("Archive", "UIDVALIDITY");
    let a = c.ok("COPY 1:2 Archive");
    let copyuid = code(&a.tagged, "COPYUID");
    assert_eq!(copyuid[0], archive_validity.to_string(), "{a:?}");
    assert_eq!(copyuid[1], format!("{}:{}", src[0], src[1]), "{a:?}");
    assert_eq!(c.status_of("Archive", "MESSAGES"), 2);
    assert_eq!(c.status_of("INBOX", "MESSAGES"), 2);

    // MOVE: COPYUID, EXPUNGE in the source, the message in the destination.
    let a = c.ok("MOVE 1 Trash");
    assert_eq!(after_expunges(&src, &a), [src[1]], "{a:?}");
    assert!(
        a.lines().iter().any(|l| l.contains("[COPYUID ")),
        "MOVE without COPYUID: {a:?}"
    );
    assert_eq!(c.uids(), [src[1]]);
    assert_eq!(c.status_of("INBOX", "MESSAGES"), 1);
    assert_eq!(c.status_of("Trash", "MESSAGES"), 1);
    c.select("Trash");
    let m = c.messages();
    assert_eq!(m.len(), 1);
    assert_bytes("the moved message", &m[0].2, &want[0]);
    c.select("Archive");
    let m = c.messages();
    assert_eq!(m.len(), 2);
    assert_bytes("copy 1", &m[0].2, &want[0]);
    assert_bytes("copy 2", &m[1].2, &want[1]);
    let uids: Vec<String> = m.iter().map(|m| m.0.to_string()).collect();
    assert_eq!(copyuid[2], format!("{}:{}", uids[0], uids[1]));
    // Over a fresh session: the same numbers.
    let mut c = Imap::login(ports.plain, "alice", "secret");
    for (folder, n) in [("INBOX", 1), ("Trash", 1), ("Archive", 2), ("Drafts", 1)] {
        assert_eq!(c.status_of(folder, "MESSAGES"), n, "{folder}");
    }
}

// ---------------------------------------------------------------------------
// 5. EXPUNGE and UID EXPUNGE

#[test]
fn expunge_and_uid_expunge_remove_only_what_they_should() {
    let (g, ports) = gateway("");
    for i in 1..=5 {
        send(&g, &subject(&format!("m{i}")));
    }
    let mut c = Imap::login(ports.plain, "alice", "secret");
    c.select("INBOX");
    let u = c.uids();
    assert_eq!(u.len(), 5);
    c.ok("STORE 1,2,4 +FLAGS.SILENT (\\Deleted)");
    // UID EXPUNGE of 2 (deleted) and 5 (not deleted): only 2 goes.
    let a = c.ok(&format!("UID EXPUNGE {},{}", u[1], u[4]));
    assert_eq!(expunged(&a), [2], "{a:?}");
    assert_eq!(c.uids(), [u[0], u[2], u[3], u[4]]);
    // A second session sees the same.
    let mut other = Imap::login(ports.plain, "alice", "secret");
    assert_eq!(other.select("INBOX").0, 4);
    assert_eq!(other.uids(), [u[0], u[2], u[3], u[4]]);
    // EXPUNGE: the rest of the \Deleted (1 and 4, now numbers 1 and 3),
    // told in an order that is right step by step (3 then 1, or 1 then 2).
    let a = c.ok("EXPUNGE");
    assert_eq!(expunged(&a).len(), 2, "{a:?}");
    assert_eq!(
        after_expunges(&[u[0], u[2], u[3], u[4]], &a),
        [u[2], u[4]],
        "{a:?}"
    );
    assert_eq!(c.uids(), [u[2], u[4]]);
    let a = other.ok("NOOP");
    assert_eq!(
        after_expunges(&[u[0], u[2], u[3], u[4]], &a),
        [u[2], u[4]],
        "the other session: {a:?}"
    );
    assert_eq!(other.uids(), [u[2], u[4]]);
    // Nothing \Deleted left: EXPUNGE removes nothing.
    let a = c.ok("EXPUNGE");
    assert!(expunged(&a).is_empty(), "{a:?}");
    assert_eq!(c.status_of("INBOX", "MESSAGES"), 2);
}

// ---------------------------------------------------------------------------
// 6. IDLE

#[test]
fn idle_announces_new_mail_within_a_second() {
    let (g, ports) = gateway("");
    send(&g, &subject("before"));
    let mut c = Imap::login(ports.plain, "alice", "secret");
    assert_eq!(c.select("INBOX").0, 1);
    c.send(b"i1 IDLE\r\n");
    let r = show(&c.response());
    assert!(r.starts_with("+ "), "IDLE: {r}");

    // SMTP by hand, to know when the 250 came.
    let mut s = Client::connect(g.relay);
    assert!(s.cmd("EHLO client.test").starts_with("250"));
    assert!(s.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
    assert!(s.cmd(&format!("RCPT TO:<{ALICE}>")).starts_with("250"));
    assert!(s.cmd("DATA").starts_with("354"));
    s.send(&subject("while idling"));
    s.send(b".\r\n");
    let r = s.reply();
    let accepted = Instant::now();
    assert!(queued_id(&r).is_some(), "{r}");

    let deadline = accepted + Duration::from_secs(1);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no EXISTS within 1 s of the 250; got {seen:?}"
        );
        c.stream.set_read_timeout(Some(left)).unwrap();
        let mut line = Vec::new();
        match c.reader.read_until(b'\n', &mut line) {
            Ok(0) => panic!("EOF in IDLE; got {seen:?}"),
            Ok(_) => {}
            Err(e) => panic!("no EXISTS within 1 s of the 250 ({e}); got {seen:?}"),
        }
        let l = show(&line).trim_end().to_string();
        if l == "* 2 EXISTS" {
            break;
        }
        seen.push(l);
    }
    c.stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    s.cmd("QUIT");
    c.send(b"DONE\r\n");
    let a = c.answer("i1");
    assert!(a.ok(), "after DONE: {a:?}");
    // The session goes on.
    assert_eq!(c.uids().len(), 2);
}

/// Reads untagged responses in IDLE until `want` holds for the lines seen,
/// within `timeout`.
fn idle_until(c: &mut Imap, timeout: Duration, mut want: impl FnMut(&[String]) -> bool) {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    while !want(&seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "not told in IDLE; got {seen:?}");
        c.stream.set_read_timeout(Some(left)).unwrap();
        let mut line = Vec::new();
        match c.reader.read_until(b'\n', &mut line) {
            Ok(0) => panic!("EOF in IDLE; got {seen:?}"),
            Ok(_) => seen.push(show(&line).trim_end().to_string()),
            Err(e) => panic!("not told in IDLE ({e}); got {seen:?}"),
        }
    }
    c.stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
}

/// IDLE tells of what other sessions do: flags changed over IMAP, a message
/// deleted over POP3, a message appended to the folder.
#[test]
fn idle_reports_what_other_sessions_do() {
    let (g, ports) = gateway("");
    send(&g, &subject("one"));
    send(&g, &subject("two"));
    let mut c = Imap::login(ports.plain, "alice", "secret");
    c.select("INBOX");
    c.send(b"i1 IDLE\r\n");
    assert!(show(&c.response()).starts_with("+ "));

    let mut other = Imap::login(ports.plain, "alice", "secret");
    other.select("INBOX");
    other.ok("STORE 2 +FLAGS.SILENT (\\Flagged)");
    idle_until(&mut c, Duration::from_secs(5), |seen| {
        seen.iter()
            .any(|l| l.starts_with("* 2 FETCH") && l.contains("\\Flagged"))
    });
    other.ok("LOGOUT");

    let mut p = Pop::login(ports.pop3);
    assert!(p.cmd("DELE 1").starts_with("+OK"));
    assert!(p.cmd("QUIT").starts_with("+OK"));
    idle_until(&mut c, Duration::from_secs(5), |seen| {
        seen.iter().any(|l| l == "* 1 EXPUNGE")
    });

    let mut other = Imap::login(ports.plain, "alice", "secret");
    assert!(other.append("INBOX", "", &draft("appended")).ok());
    idle_until(&mut c, Duration::from_secs(5), |seen| {
        seen.iter().any(|l| l == "* 2 EXISTS")
    });
    c.send(b"DONE\r\n");
    assert!(c.answer("i1").ok());
    let m = c.messages();
    assert_eq!(m.len(), 2);
    assert_eq!(m[0].1, ["\\Flagged"]);
    assert_bytes("appended", &m[1].2, &draft("appended"));
}

/// Stopping the gateway tells open sessions, one in IDLE included, with a
/// BYE before it closes them.
#[test]
fn stopping_the_gateway_says_bye_to_open_sessions() {
    let (mut g, ports) = gateway("");
    let mut idle = Imap::login(ports.plain, "alice", "secret");
    idle.select("INBOX");
    idle.send(b"i1 IDLE\r\n");
    assert!(show(&idle.response()).starts_with("+ "));
    let mut sel = Imap::login(ports.plain, "alice", "secret");
    sel.select("INBOX");
    assert_eq!(g.stop(), Some(0), "{}", g.log());
    for (name, c) in [("idle", &mut idle), ("selected", &mut sel)] {
        let r = show(&c.response());
        assert!(r.starts_with("* BYE"), "{name}: {r:?}");
        assert!(c.closed(), "{name}: open after BYE");
    }
}

/// COPY and MOVE keep flags and the internal date; APPEND takes the date
/// it is given.
#[test]
fn copy_and_move_keep_flags_and_internaldate() {
    let (_g, ports) = gateway("");
    let mut c = Imap::login(ports.plain, "alice", "secret");
    let tag = c.next_tag();
    let m = draft("dated");
    c.send(
        format!(
            "{tag} APPEND INBOX (\\Answered $Label1) \"07-Dec-2025 10:11:12 +0100\" {{{}+}}\r\n",
            m.len()
        )
        .as_bytes(),
    );
    c.send(&m);
    c.send(b"\r\n");
    let a = c.answer(&tag);
    assert!(a.ok(), "APPEND with a date: {a:?}");
    c.select("INBOX");
    let date = |c: &mut Imap| {
        let a = c.ok("FETCH 1 (INTERNALDATE FLAGS)");
        let f = show(a.fetches()[0]);
        let at = f.find("INTERNALDATE \"").unwrap() + 14;
        (f[at..at + 26].to_string(), flags_of(a.fetches()[0]))
    };
    let (d, flags) = date(&mut c);
    assert!(
        d == "07-Dec-2025 10:11:12 +0100" || d == "07-Dec-2025 09:11:12 +0000",
        "INTERNALDATE of the APPEND: {d}"
    );
    assert_eq!(flags, ["$Label1", "\\Answered"]);
    c.ok("COPY 1 Archive");
    c.ok("MOVE 1 Trash");
    for folder in ["Archive", "Trash"] {
        c.select(folder);
        let (d2, f2) = date(&mut c);
        assert_eq!(d2, d, "INTERNALDATE in {folder}");
        assert_eq!(f2, flags, "flags in {folder}");
    }
}

// ---------------------------------------------------------------------------
// 7. STARTTLS

#[test]
fn login_needs_starttls_where_plaintext_auth_is_off_and_imaps_works() {
    let (g, ports) = gateway("");
    send(&g, &subject("tls"));

    // Line level: LOGINDISABLED, STARTTLS offered, LOGIN and AUTHENTICATE refused.
    let mut c = Imap::connect(ports.stls);
    let a = c.ok("CAPABILITY");
    let caps = a.lines().join(" ");
    assert!(caps.contains(" LOGINDISABLED"), "{caps}");
    assert!(caps.contains(" STARTTLS"), "{caps}");
    assert!(!caps.contains("AUTH=PLAIN"), "{caps}");
    let a = c.cmd("LOGIN alice secret");
    assert!(
        a.tagged.starts_with("t2 NO [PRIVACYREQUIRED]"),
        "LOGIN before STARTTLS: {a:?}"
    );
    let a = c.cmd("AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==");
    assert!(
        a.tagged.starts_with("t3 NO [PRIVACYREQUIRED]"),
        "AUTHENTICATE before STARTTLS: {a:?}"
    );
    let a = c.cmd("SELECT INBOX");
    assert!(!a.ok(), "SELECT without a login: {a:?}");
    c.ok("LOGOUT");

    // The plain-text listener on loopback offers LOGIN without TLS.
    let mut c = Imap::connect(ports.plain);
    let caps = c.ok("CAPABILITY").lines().join(" ");
    assert!(!caps.contains("LOGINDISABLED"), "{caps}");

    // imaplib: refused before, logged in after STARTTLS; IMAP4_SSL too.
    let v = python(
        &g,
        "imap_starttls.py",
        &[
            ports.stls.to_string(),
            ports.imaps.to_string(),
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
    let before = caps("capabilities_before");
    assert!(before.contains(&"LOGINDISABLED".into()), "{before:?}");
    assert!(before.contains(&"STARTTLS".into()), "{before:?}");
    // imaplib raises on the NO with its text (the status word itself is
    // checked at the line level above).
    let login_before = v["login_before"].as_str().unwrap();
    assert!(
        login_before.starts_with("error: ") && login_before.contains("[PRIVACYREQUIRED]"),
        "{login_before}"
    );
    assert!(v["starttls"].as_str().unwrap().starts_with("OK"), "{v}");
    assert!(v["tls_version"].as_str().unwrap().starts_with("TLS"), "{v}");
    let after = caps("capabilities_after");
    assert!(!after.contains(&"LOGINDISABLED".into()), "{after:?}");
    assert!(!after.contains(&"STARTTLS".into()), "{after:?}");
    assert!(after.contains(&"AUTH=PLAIN".into()), "{after:?}");
    assert!(v["login_after"].as_str().unwrap().starts_with("OK"), "{v}");
    assert_eq!(v["select_after"], "OK 1");
    let imaps = caps("imaps_capabilities");
    assert!(!imaps.contains(&"STARTTLS".into()), "{imaps:?}");
    assert!(!imaps.contains(&"LOGINDISABLED".into()), "{imaps:?}");
    assert!(v["imaps_login"].as_str().unwrap().starts_with("OK"), "{v}");
    assert_eq!(v["imaps_select"], "OK 1");
}

/// A LOGIN pipelined behind STARTTLS in the same packet is not run inside
/// TLS; AUTHENTICATE PLAIN with a continuation and LOGIN with literals work.
#[test]
fn starttls_drops_pipelined_commands_and_login_forms_work() {
    let (g, ports) = gateway("");
    let v = python(
        &g,
        "imap_starttls_injection.py",
        &[ports.stls.to_string(), "alice".into(), "secret".into()],
    );
    let lines = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        lines("starttls").last().unwrap().split(' ').nth(1),
        Some("OK"),
        "{v}"
    );
    assert_eq!(
        v["left_in_clear"], "",
        "answered in clear after STARTTLS: {v}"
    );
    let after = lines("after_tls");
    assert!(
        !after.iter().any(|l| l.starts_with("a2 ")),
        "the LOGIN sent before the handshake was run: {after:?}"
    );
    assert!(
        after.last().unwrap().starts_with("a3 BAD") || after.last().unwrap().starts_with("a3 NO"),
        "SELECT without a login inside TLS: {after:?}"
    );

    // AUTHENTICATE PLAIN, the response after a continuation.
    let mut c = Imap::connect(ports.plain);
    c.send(b"p1 AUTHENTICATE PLAIN\r\n");
    let r = show(&c.response());
    assert!(r.starts_with("+"), "{r}");
    c.send(b"AGFsaWNlAHNlY3JldA==\r\n");
    let a = c.answer("p1");
    assert!(a.ok(), "AUTHENTICATE PLAIN: {a:?}");
    c.select("INBOX");
    // LOGIN with literals for both arguments.
    let mut c = Imap::connect(ports.plain);
    c.send(b"l1 LOGIN {5}\r\n");
    assert!(show(&c.response()).starts_with("+"));
    c.send(b"alice {6}\r\n");
    assert!(show(&c.response()).starts_with("+"));
    c.send(b"secret\r\n");
    let a = c.answer("l1");
    assert!(a.ok(), "LOGIN with literals: {a:?}");
    // An empty folder: UID FETCH 1:* answers OK with nothing.
    c.select("Trash");
    let a = c.ok("UID FETCH 1:* (UID FLAGS)");
    assert!(a.fetches().is_empty(), "{a:?}");
}

// ---------------------------------------------------------------------------
// 8. mbsync

/// Every file in a Maildir's cur and new.
fn maildir(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in ["cur", "new"] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            let content = std::fs::read(&p).unwrap();
            out.push((p, content));
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    out
}

/// `m` without the "X-TUID: ..." line mbsync puts last in the header
/// section; None when it is not there.
fn without_tuid(m: &[u8]) -> Option<Vec<u8>> {
    let end = m.windows(2).position(|w| w == b"\n\n")? + 1;
    let start = m[..end - 1]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    if !m[start..end].starts_with(b"X-TUID: ") {
        return None;
    }
    let mut out = m[..start].to_vec();
    out.extend_from_slice(&m[end..]);
    Some(out)
}

#[test]
fn mbsync_pulls_every_folder_byte_exact() {
    let (g, ports) = gateway("");
    let inbox = [
        send(&g, &eight_bit_dot_message()),
        send(&g, &subject("plain")),
    ];
    let inbox: Vec<Vec<u8>> = inbox.iter().map(|id| expected(&g, id)).collect();
    let mut c = Imap::login(ports.plain, "alice", "secret");
    c.ok("CREATE Projects/2026");
    let project = draft("project");
    assert!(c.append("Projects/2026", "\\Seen", &project).ok());
    let d = draft("draft");
    assert!(c.append("Drafts", "\\Draft", &d).ok());
    c.ok("LOGOUT");

    let m = g.path("mbsync");
    std::fs::create_dir_all(m.join("mail")).unwrap();
    let cert = g.path("cert.pem");
    let rc = m.join("rc");
    // isync 1.4 (Debian 12): SSLType. The gateway's self-signed certificate
    // in CertificateFile is trusted as a host certificate.
    std::fs::write(
        &rc,
        format!(
            "IMAPAccount test
Host 127.0.0.1
Port {port}
User alice
Pass secret
SSLType IMAPS
CertificateFile {cert}
Timeout 20

IMAPStore remote
Account test

MaildirStore local
Path {mail}/
Inbox {mail}/INBOX
SubFolders Verbatim

Channel test
Far :remote:
Near :local:
Patterns *
Create Near
Sync Pull
SyncState *
",
            port = ports.imaps,
            cert = cert.display(),
            mail = m.join("mail").display(),
        ),
    )
    .unwrap();
    chmod(&rc, 0o600);
    let (code, log) = run(
        Command::new("mbsync")
            .arg("-c")
            .arg(&rc)
            .args(["-a", "-V"])
            .env("HOME", &m),
        &m.join("log"),
        CLIENT_TIMEOUT,
    );
    assert_eq!(code, Some(0), "mbsync:\n{log}\n{}", g.log());

    // Maildir files have LF line ends. isync 1.4 writes an X-TUID header
    // (a random transaction id) as the last header line of every message it
    // propagates, pulls into a Maildir included: with it mbsync finds the
    // copy again when a run is interrupted before the new UID is recorded.
    // It is the one line mbsync adds; take it out, once, from the end of
    // the header section, and compare the rest byte for byte.
    let check = |folder: &str, want: &[&[u8]], flag: Option<char>| {
        let mut got = maildir(&m.join("mail").join(folder));
        for (path, content) in got.iter_mut() {
            *content = without_tuid(content).unwrap_or_else(|| {
                panic!("{}: no X-TUID line:\n{}", path.display(), show(content))
            });
        }
        got.sort_by(|a, b| a.1.cmp(&b.1));
        let mut want: Vec<Vec<u8>> = want.iter().map(|w| crlf_to_lf(w)).collect();
        want.sort();
        assert_eq!(got.len(), want.len(), "{folder}: {got:?}\n{log}");
        for ((path, g), w) in got.iter().zip(&want) {
            assert_bytes(&format!("mbsync {folder} {}", path.display()), g, w);
            if let Some(f) = flag {
                let name = path.file_name().unwrap().to_string_lossy().to_string();
                let info = name.rsplit_once(":2,").map(|x| x.1).unwrap_or("");
                assert!(info.contains(f), "{folder}: {name} lacks flag {f}");
            }
        }
    };
    check("INBOX", &[&inbox[0], &inbox[1]], None);
    check("Projects/2026", &[&project], Some('S'));
    check("Drafts", &[&d], Some('D'));
    for empty in ["Sent", "Trash", "Junk", "Archive"] {
        assert!(
            maildir(&m.join("mail").join(empty)).is_empty(),
            "{empty} not empty"
        );
    }
    // A second run finds nothing new.
    let (code, log2) = run(
        Command::new("mbsync")
            .arg("-c")
            .arg(&rc)
            .args(["-a", "-V"])
            .env("HOME", &m),
        &m.join("log2"),
        CLIENT_TIMEOUT,
    );
    assert_eq!(code, Some(0), "second mbsync run:\n{log2}");
    for (folder, n) in [("INBOX", 2), ("Projects/2026", 1), ("Drafts", 1)] {
        assert_eq!(
            maildir(&m.join("mail").join(folder)).len(),
            n,
            "{folder} after a second run:\n{log2}"
        );
    }
    // Pulling changed nothing on the server.
    let mut c = Imap::login(ports.plain, "alice", "secret");
    c.select("INBOX");
    let got = c.messages();
    assert_eq!(got.len(), 2);
    assert_bytes("INBOX after mbsync", &got[0].2, &inbox[0]);
}

// ---------------------------------------------------------------------------
// 9. fetchmail over IMAP

#[test]
fn fetchmail_imap_fetches_inbox_byte_exact_and_marks_seen() {
    let (g, ports) = gateway("");
    let ids = [
        send(&g, &eight_bit_dot_message()),
        send(&g, &subject("plain")),
        send(&g, &subject("third")),
    ];
    let want: Vec<Vec<u8>> = ids.iter().map(|id| crlf_to_lf(&expected(&g, id))).collect();
    let cert = g.path("cert.pem").display().to_string();

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
    let rc_with = |name: &str, keep: &str| {
        let rc = f.join(name);
        std::fs::write(
            &rc,
            format!(
                r#"set no syslog
set invisible
poll 127.0.0.1 protocol imap port {} timeout 20
  user "alice" password "secret" is root here
  sslproto 'tls1.2+' sslcertck sslcertfile "{cert}" sslcommonname localhost
  {keep}
  mda "{}"
"#,
                ports.stls,
                mda.display()
            ),
        )
        .unwrap();
        chmod(&rc, 0o600);
        rc
    };
    let fetchmail = |rc: &Path, log: &str| {
        run(
            Command::new("fetchmail")
                .arg("-f")
                .arg(rc)
                .arg("-v")
                .env("FETCHMAILHOME", &f),
            &f.join(log),
            CLIENT_TIMEOUT,
        )
    };
    let delivered = || {
        let mut all: Vec<Vec<u8>> = std::fs::read_dir(f.join("got"))
            .unwrap()
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        all.sort();
        all
    };
    let keep = rc_with("rc_keep", "keep");
    let (code, log) = fetchmail(&keep, "log1");
    assert_eq!(code, Some(0), "fetchmail:\n{log}\n{}", g.log());
    assert!(
        log.contains("STARTTLS"),
        "fetchmail did not use STARTTLS:\n{log}"
    );
    let got = delivered();
    let mut w = want.clone();
    w.sort();
    assert_eq!(got.len(), 3, "{log}");
    for (g, w) in got.iter().zip(&w) {
        assert_bytes("fetchmail", g, w);
    }
    // Kept, and \Seen now.
    let mut c = Imap::login(ports.plain, "alice", "secret");
    c.select("INBOX");
    let m = c.messages();
    assert_eq!(m.len(), 3);
    for (uid, flags, _) in &m {
        assert!(flags.contains(&"\\Seen".to_string()), "{uid}: {flags:?}");
    }
    c.ok("LOGOUT");
    // Nothing new for the second run (exit 1).
    let (code, log) = fetchmail(&keep, "log2");
    assert_eq!(code, Some(1), "second fetchmail run:\n{log}");
    assert_eq!(delivered().len(), 3);

    // Without keep: fetched, then deleted from the INBOX.
    let id = send(&g, &subject("fourth"));
    let fourth = crlf_to_lf(&expected(&g, &id));
    let nokeep = rc_with("rc_nokeep", "nokeep");
    let (code, log) = fetchmail(&nokeep, "log3");
    assert_eq!(code, Some(0), "fetchmail nokeep:\n{log}\n{}", g.log());
    let got = delivered();
    assert_eq!(got.len(), 4);
    assert!(
        got.contains(&fourth),
        "the fourth message not fetched byte-exact"
    );
    // Only what it fetched (the unseen one) is deleted.
    let mut c = Imap::login(ports.plain, "alice", "secret");
    c.select("INBOX");
    let left = c.messages();
    assert_eq!(
        left.iter().map(|m| m.0).collect::<Vec<_>>(),
        m.iter().map(|m| m.0).collect::<Vec<_>>(),
        "after fetchmail nokeep:\n{log}"
    );
}

// ---------------------------------------------------------------------------
// 10. POP3 and IMAP on one INBOX

struct Pop {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
}

impl Pop {
    fn login(port: u16) -> Pop {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut p = Pop { reader, stream };
        assert!(p.line().starts_with("+OK"));
        assert!(p.cmd("USER alice").starts_with("+OK"));
        let r = p.cmd("PASS secret");
        assert!(r.starts_with("+OK"), "PASS: {r}");
        p
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.reader.read_line(&mut l).unwrap();
        l.trim_end().to_string()
    }

    fn cmd(&mut self, line: &str) -> String {
        self.stream
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap();
        self.line()
    }

    fn uidl(&mut self) -> Vec<String> {
        assert!(self.cmd("UIDL").starts_with("+OK"));
        let mut out = Vec::new();
        loop {
            let l = self.line();
            if l == "." {
                return out;
            }
            out.push(l.split_once(' ').unwrap().1.to_string());
        }
    }

    fn stat(&mut self) -> usize {
        let r = self.cmd("STAT");
        r.split(' ').nth(1).unwrap().parse().unwrap()
    }
}

#[test]
fn pop3_and_imap_agree_on_the_inbox() {
    let (g, ports) = gateway("");
    let ids: Vec<String> = (1..=3)
        .map(|i| send(&g, &subject(&format!("m{i}"))))
        .collect();
    let mut c = Imap::login(ports.plain, "alice", "secret");
    let (n, _) = c.select("INBOX");
    let mut p = Pop::login(ports.pop3);
    let uidl = p.uidl();
    assert_eq!(uidl, ids);
    assert_eq!(uidl.len(), n, "POP3 UIDL and IMAP EXISTS");
    // POP3 deletes message 2 while IMAP has the INBOX selected.
    assert!(p.cmd("DELE 2").starts_with("+OK"));
    let a = c.ok("NOOP");
    assert!(expunged(&a).is_empty(), "EXPUNGE before POP3 QUIT: {a:?}");
    assert!(p.cmd("QUIT").starts_with("+OK"));
    let mut a = c.ok("NOOP");
    if expunged(&a).is_empty() {
        // The QUIT is answered as the removal is made: poll a little.
        wait_for(
            "the IMAP session to see the expunge",
            Duration::from_secs(5),
            || {
                a = c.ok("NOOP");
                !expunged(&a).is_empty()
            },
        );
    }
    assert_eq!(expunged(&a), [2], "{a:?}");
    let m = c.messages();
    assert_eq!(m.len(), 2);
    assert_bytes("message 1", &m[0].2, &expected(&g, &ids[0]));
    assert_bytes("message 2 (was 3)", &m[1].2, &expected(&g, &ids[2]));

    // IMAP expunges message 1: POP3's next login has one message.
    c.ok("STORE 1 +FLAGS.SILENT (\\Deleted)");
    let a = c.ok("EXPUNGE");
    assert_eq!(expunged(&a), [1]);
    let mut p = Pop::login(ports.pop3);
    assert_eq!(p.stat(), 1);
    assert_eq!(p.uidl(), [ids[2].clone()]);
    assert!(p.cmd("QUIT").starts_with("+OK"));
}

/// A message copied to another folder is its own copy there: POP3 or IMAP
/// removing the INBOX one leaves it readable.
#[test]
fn copy_survives_removal_of_the_inbox_message() {
    let (g, ports) = gateway("");
    let ids = [send(&g, &subject("kept")), send(&g, &subject("also kept"))];
    let want: Vec<Vec<u8>> = ids.iter().map(|id| expected(&g, id)).collect();
    let mut c = Imap::login(ports.plain, "alice", "secret");
    c.select("INBOX");
    c.ok("COPY 1:2 Archive");
    c.ok("UNSELECT");
    // POP3 deletes the first from the INBOX.
    let mut p = Pop::login(ports.pop3);
    assert!(p.cmd("DELE 1").starts_with("+OK"));
    assert!(p.cmd("QUIT").starts_with("+OK"));
    // IMAP expunges the second from the INBOX.
    c.select("INBOX");
    c.ok("STORE 1:* +FLAGS.SILENT (\\Deleted)");
    c.ok("EXPUNGE");
    assert!(c.uids().is_empty());
    c.select("Archive");
    let m = c.messages();
    assert_eq!(m.len(), 2, "{m:?}");
    assert_bytes("copy of the one POP3 deleted", &m[0].2, &want[0]);
    assert_bytes("copy of the one IMAP expunged", &m[1].2, &want[1]);
    // And after a restart.
    let mut g = g;
    g.restart();
    let mut c = Imap::login(ports.plain, "alice", "secret");
    c.select("Archive");
    assert_eq!(c.messages(), m);
}

// ---------------------------------------------------------------------------
// 11. Limits

#[test]
fn literal_over_max_literal_size_is_refused_and_not_read_as_commands() {
    let (g, ports) = gateway("[imap]\nmax_literal_size = 1000\n");
    let mut c = Imap::login(ports.plain, "alice", "secret");
    c.select("INBOX");
    // At the limit: taken.
    let mut m = b"Subject: at the limit\r\n\r\n".to_vec();
    m.resize(998, b'x');
    m.extend_from_slice(b"\r\n");
    assert_eq!(m.len(), 1000);
    let a = c.append("INBOX", "", &m);
    assert!(a.ok(), "APPEND of 1000 octets: {a:?}");

    // One over, synchronizing: refused without a continuation.
    let a = c.append("INBOX", "", &[b'y'; 1001]);
    assert!(
        a.tagged.contains(" BAD ") && a.tagged.contains("imap.max_literal_size"),
        "APPEND {{1001}}: {a:?}"
    );
    c.ok("NOOP");

    // Non-synchronizing (LITERAL+): the client sends it anyway; what it
    // holds must not run as commands.
    let mut lit = Vec::new();
    while lit.len() < 3000 {
        lit.extend_from_slice(b"x1 CREATE Injected\r\n");
    }
    lit.truncate(3000);
    let tag = c.next_tag();
    c.send(format!("{tag} APPEND INBOX {{3000+}}\r\n").as_bytes());
    c.send(&lit);
    c.send(b"\r\n");
    let a = c.answer(&tag);
    assert!(!a.ok(), "APPEND {{3000+}}: {a:?}");
    assert!(
        !a.lines().iter().any(|l| l.starts_with("x1 ")),
        "the literal ran as commands: {a:?}"
    );
    // Read and thrown away (docs/CONFIG.md): the session goes on.
    let a = c.ok("NOOP");
    assert!(
        !a.lines().iter().any(|l| l.starts_with("x1 ")),
        "the literal ran as commands: {a:?}"
    );
    let mut c = Imap::login(ports.plain, "alice", "secret");
    let l = names(&list(&mut c, "LIST"));
    assert!(!l.contains(&"Injected".to_string()), "{l:?}\n{}", g.log());
    assert_eq!(c.status_of("INBOX", "MESSAGES"), 1);
}

/// Without `imap.max_literal_size`, `relay.max_message_size` is the limit.
#[test]
fn literal_limit_defaults_to_relay_max_message_size() {
    let (_g, ports) = gateway("[relay]\nmax_message_size = 2000\n");
    let mut c = Imap::login(ports.plain, "alice", "secret");
    let mut m = b"Subject: at the limit\r\n\r\n".to_vec();
    m.resize(1998, b'x');
    m.extend_from_slice(b"\r\n");
    let a = c.append("INBOX", "", &m);
    assert!(a.ok(), "APPEND of 2000 octets: {a:?}");
    m.insert(30, b'x');
    let a = c.append("INBOX", "", &m);
    assert!(a.tagged.contains(" BAD "), "APPEND of 2001 octets: {a:?}");
    c.ok("NOOP");
    assert_eq!(c.status_of("INBOX", "MESSAGES"), 1);
}

#[test]
fn failed_logins_close_the_session_and_block_the_client() {
    let (g, ports) = gateway(
        "[imap]\nmax_auth_failures = 2\nauth_failure_delay = \"10ms\"\n[auth]\nmax_failures = 4\n",
    );
    // Per session: the second failure closes it with BYE.
    let mut c = Imap::connect(ports.plain);
    let a = c.cmd("LOGIN alice wrong");
    assert!(a.tagged.starts_with("t1 NO"), "{a:?}");
    c.ok("NOOP");
    let tag = c.next_tag();
    c.send(format!("{tag} LOGIN alice wrong2\r\n").as_bytes());
    let mut rest = Vec::new();
    loop {
        let r = c.response();
        if r.is_empty() {
            break;
        }
        rest.push(show(&r).trim_end().to_string());
    }
    assert!(
        rest.iter().any(|l| l.starts_with(&format!("{tag} NO"))),
        "{rest:?}"
    );
    assert!(
        rest.iter().any(|l| l.starts_with("* BYE")),
        "no BYE after max_auth_failures: {rest:?}"
    );

    // Across sessions: 2 more failures make 4 from 127.0.0.1 → blocked,
    // even with the right password.
    let mut c = Imap::connect(ports.plain);
    assert!(!c.cmd("LOGIN alice wrong3").ok());
    c.ok("LOGOUT");
    let mut c = Imap::connect(ports.plain);
    assert!(!c.cmd("AUTHENTICATE PLAIN AGFsaWNlAHdyb25nNA==").ok());
    c.ok("LOGOUT");
    let mut c = Imap::connect(ports.plain);
    let a = c.cmd("LOGIN alice secret");
    assert!(
        a.tagged.starts_with("t1 NO"),
        "the right password from a blocked client: {a:?}\n{}",
        g.log()
    );
    let a = c.cmd("SELECT INBOX");
    assert!(!a.ok(), "{a:?}");
    // Another client is not blocked: the account is not locked.
    let mut c = Imap::connect_from(ports.plain, Some("127.0.0.2"));
    let a = c.cmd("LOGIN alice secret");
    assert!(a.ok(), "from 127.0.0.2: {a:?}");
}

#[test]
fn idle_session_closed_after_idle_timeout() {
    let (g, ports) = gateway("[imap]\nidle_timeout = \"1s\"\n");
    let mut c = Imap::login(ports.plain, "alice", "secret");
    c.select("INBOX");
    // Busy: not closed.
    c.ok("NOOP");
    // Then silent: BYE and EOF, within a deadline.
    c.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let r = show(&c.response());
    assert!(
        r.starts_with("* BYE"),
        "after idle_timeout: {r:?}\n{}",
        g.log()
    );
    assert!(c.closed(), "open after BYE");
}

#[test]
fn append_over_quota_is_refused() {
    let (g, ports) = gateway("[local]\ndomains = [\"branch.example\"]\nquota = 2500\n");
    let mut c = Imap::login(ports.plain, "alice", "secret");
    let m = |s: &str| {
        let mut m = format!("Subject: {s}\r\n\r\n").into_bytes();
        m.resize(998, b'z');
        m.extend_from_slice(b"\r\n");
        m
    };
    assert!(c.append("INBOX", "", &m("one")).ok());
    assert!(c.append("Drafts", "\\Draft", &m("two")).ok());
    // 3000 > 2500, counted over all folders.
    let a = c.append("Archive", "", &m("three"));
    assert!(
        a.tagged.contains(" NO [OVERQUOTA]"),
        "APPEND over the quota: {a:?}\n{}",
        g.log()
    );
    assert_eq!(c.status_of("Archive", "MESSAGES"), 0);
    // COPY over the quota too.
    c.select("INBOX");
    let a = c.cmd("COPY 1 Trash");
    assert!(
        a.tagged.contains(" NO [OVERQUOTA]"),
        "COPY over the quota: {a:?}"
    );
    assert_eq!(c.status_of("Trash", "MESSAGES"), 0);
    // What the folders hold counts for SMTP too: at the quota (2000 of
    // 2500 here is under; fill it to exactly 2500), RCPT is refused.
    let mut fill = b"Subject: fill\r\n\r\n".to_vec();
    fill.resize(498, b'f');
    fill.extend_from_slice(b"\r\n");
    assert!(c.append("Archive", "", &fill).ok());
    let mut s = Client::connect(g.relay);
    s.cmd("EHLO client.test");
    assert!(s.cmd(&format!("MAIL FROM:<{SENDER}>")).starts_with("250"));
    let r = s.cmd(&format!("RCPT TO:<{ALICE}>"));
    assert!(
        r.starts_with("452"),
        "RCPT with the folders at the quota: {r}"
    );
    s.cmd("QUIT");
    // Freeing space lets it in again.
    c.ok("STORE 1 +FLAGS.SILENT (\\Deleted)");
    c.ok("EXPUNGE");
    c.ok("UNSELECT");
    assert!(c.append("Trash", "", &m("three")).ok());
}
/// RFC 9051 §2.3.1.1: a folder deleted and made again under the same name
/// must not be taken for the old one by a client that kept its UIDs: a new
/// UIDVALIDITY (or, at the least, UIDs past the old ones).
#[test]
fn folder_made_again_after_delete_does_not_reuse_uidvalidity_and_uids() {
    let (_g, ports) = gateway("");
    let mut c = Imap::login(ports.plain, "alice", "secret");
    c.ok("CREATE Projects");
    let old = draft("old");
    let a = c.append("Projects", "", &old);
    assert!(a.ok(), "{a:?}");
    let appenduid = code(&a.tagged, "APPENDUID");
    let (validity, uid): (u64, u64) =
        (appenduid[0].parse().unwrap(), appenduid[1].parse().unwrap());
    c.ok("DELETE Projects");
    c.ok("CREATE Projects");
    let st = c.status("Projects", "MESSAGES UIDNEXT UIDVALIDITY");
    assert_eq!(st[0].1, 0, "{st:?}");
    assert!(
        st[2].1 != validity || st[1].1 > uid,
        "made again with UIDVALIDITY {validity} and UIDNEXT {}: UID {uid} now names another \
         message than the one a client cached under it",
        st[1].1
    );
}

/// curl, another real IMAP client (libcurl's), over implicit TLS: it
/// lists the folders, fetches a message by UID byte-exact, and stores a
/// message with APPEND (its upload) that comes back byte-exact.
#[test]
fn curl_lists_fetches_and_appends_over_imaps() {
    let (g, ports) = gateway("");
    let id = send(&g, &eight_bit_dot_message());
    let want = expected(&g, &id);
    let base = format!("imaps://127.0.0.1:{}", ports.imaps);
    let curl = |args: &[&str], log: &str| {
        let mut cmd = Command::new("curl");
        // The gateway's own self-signed certificate.
        cmd.args([
            "-sS",
            "--insecure",
            "--max-time",
            "30",
            "-u",
            "alice:secret",
        ])
        .args(args);
        let (code, out) = run(&mut cmd, &g.path(log), Duration::from_secs(60));
        assert_eq!(code, Some(0), "curl {args:?}: {out}");
        out
    };
    let folders = curl(&[&format!("{base}/")], "curl-list.log");
    for name in ["INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"] {
        assert!(
            folders.lines().any(|l| l.ends_with(&format!("\"{name}\""))),
            "{name} missing: {folders}"
        );
    }
    let got_path = g.path("curl-fetch.eml");
    curl(
        &[
            &format!("{base}/INBOX;UID=1"),
            "-o",
            got_path.to_str().unwrap(),
        ],
        "curl-fetch.log",
    );
    assert_bytes("curl's fetch", &std::fs::read(&got_path).unwrap(), &want);

    let upload = draft("from curl");
    let file = g.path("curl-upload.eml");
    std::fs::write(&file, &upload).unwrap();
    curl(
        &["-T", file.to_str().unwrap(), &format!("{base}/Drafts")],
        "curl-append.log",
    );
    let mut c = Imap::login(ports.plain, "alice", "secret");
    let (n, _) = c.select("Drafts");
    assert_eq!(n, 1);
    let messages = c.messages();
    assert_bytes("the message curl stored", &messages[0].2, &upload);
}

// ---------------------------------------------------------------------------
// Sessions that hold on to what others changed

/// A session that still has a folder selected after another session
/// deleted it sees it empty; the folder made next (here another account's
/// INBOX, at its first login) never takes its place, so nothing of
/// another account's mail ever shows.
#[test]
fn a_deleted_selected_folder_never_shows_another_accounts_mail() {
    let (g, ports) = gateway("");
    g.add_user("carol", "secret2");
    let mut a1 = Imap::login(ports.plain, "alice", "secret");
    let mut a2 = Imap::login(ports.plain, "alice", "secret");
    a1.ok("CREATE tmp");
    assert!(a1.append("tmp", "", &draft("alice's own")).ok());
    let (n, _) = a1.select("tmp");
    assert_eq!(n, 1);
    a2.ok("DELETE tmp");
    let mut carol = Imap::login(ports.plain, "carol", "secret2");
    assert!(carol.append("INBOX", "", &draft("carol's secret")).ok());
    let noop = a1.ok("NOOP");
    assert!(noop.has("* 1 EXPUNGE"), "{noop:?}");
    let fetch = a1.ok("UID FETCH 1:* (UID BODY.PEEK[])");
    assert!(fetch.fetches().is_empty(), "{fetch:?}");
    assert!(!format!("{fetch:?}{noop:?}").contains("carol"));
}

/// EXPUNGE removes what has \Deleted now, not what had it when this
/// session last looked: another session took the flag off meanwhile.
#[test]
fn expunge_goes_by_the_flags_of_now() {
    let (g, ports) = gateway("");
    send(&g, &subject("keep me"));
    let mut a = Imap::login(ports.plain, "alice", "secret");
    let mut b = Imap::login(ports.plain, "alice", "secret");
    a.select("INBOX");
    b.select("INBOX");
    a.ok("STORE 1 +FLAGS.SILENT (\\Deleted)");
    b.ok("STORE 1 -FLAGS.SILENT (\\Deleted)");
    let e = a.ok("EXPUNGE");
    assert!(expunged(&e).is_empty(), "{e:?}");
    assert_eq!(a.uids(), vec![1]);
    assert_eq!(b.status_of("INBOX", "MESSAGES"), 1);
}

/// RENAME takes the checks CREATE has, refuses a folder into itself, and
/// a name taken below the new one is "already exists", not a store error.
#[test]
fn rename_refuses_what_cannot_be_made() {
    let (_g, ports) = gateway("");
    let mut c = Imap::login(ports.plain, "alice", "secret");
    c.ok("CREATE a/c");
    let r = c.cmd("RENAME a a/c/d");
    assert!(r.tagged.contains("NO [CANNOT]"), "{r:?}");
    for bad in ["\"\"", "\"x//y/\"", "INBOX"] {
        let r = c.cmd(&format!("RENAME Junk {bad}"));
        assert!(r.tagged.contains(" NO "), "{bad}: {r:?}");
    }
    c.ok("CREATE m/y");
    c.ok("CREATE n/y");
    c.ok("DELETE n/y");
    c.ok("CREATE z/w");
    c.ok("RENAME z/w n/y");
    let r = c.cmd("RENAME m n");
    assert!(r.tagged.contains("NO [ALREADYEXISTS]"), "{r:?}");
    // Nothing moved.
    let before = names(&list(&mut c, "LIST"));
    for n in ["a", "a/c", "m", "m/y", "n", "n/y", "Junk"] {
        assert!(before.contains(&n.to_string()), "{n} missing: {before:?}");
    }
    // The new name's parents are made, as CREATE makes them.
    c.ok("RENAME m/y p/q/y");
    let after = names(&list(&mut c, "LIST"));
    for n in ["p", "p/q", "p/q/y"] {
        assert!(after.contains(&n.to_string()), "{n} missing: {after:?}");
    }
}

/// `1:*` in an empty folder is answered OK with nothing, as clients
/// expect.
#[test]
fn star_in_an_empty_folder_is_not_an_error() {
    let (_g, ports) = gateway("");
    let mut c = Imap::login(ports.plain, "alice", "secret");
    let (n, _) = c.select("Trash");
    assert_eq!(n, 0);
    let f = c.ok("FETCH 1:* (FLAGS)");
    assert!(f.fetches().is_empty());
    c.ok("STORE 1:* +FLAGS (\\Seen)");
    c.ok("SEARCH ALL");
}

/// `* FLAGS` names the keywords the folder's messages have, so that a
/// client learns the tags in use: at SELECT, and again when one is new.
#[test]
fn flags_response_names_the_keywords_in_use() {
    let (g, ports) = gateway("");
    send(&g, &subject("tagged"));
    let mut a = Imap::login(ports.plain, "alice", "secret");
    let mut b = Imap::login(ports.plain, "alice", "secret");
    let (_, sel) = a.select("INBOX");
    assert!(
        sel.has("* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)"),
        "{sel:?}"
    );
    b.select("INBOX");
    b.ok("STORE 1 +FLAGS.SILENT ($Work)");
    let noop = a.ok("NOOP");
    assert!(
        noop.has("* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work)"),
        "{noop:?}"
    );
    let (_, sel) = a.select("INBOX");
    assert!(
        sel.has("* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work)"),
        "{sel:?}"
    );
    assert!(
        sel.has("* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work \\*)] flags kept"),
        "{sel:?}"
    );
}

// ---------------------------------------------------------------------------
// As an office lives

/// Steady traffic for a while: a message every 100 ms for 8 s while one
/// session sits in IDLE and another deletes every third message as it
/// comes. The idle session's view, kept only from what it was told
/// (EXISTS, EXPUNGE), ends exactly where the store is; nothing is lost or
/// told twice, and `outpost mailbox list` shows the folders.
#[test]
fn idle_keeps_up_with_steady_traffic_and_deletions() {
    let (g, ports) = gateway("");
    let mut idle = Imap::login(ports.plain, "alice", "secret");
    let mut other = Imap::login(ports.plain, "alice", "secret");
    let (mut count, _) = idle.select("INBOX");
    other.select("INBOX");
    idle.send(b"i IDLE\r\n");
    idle_until(&mut idle, Duration::from_secs(5), |seen| {
        seen.iter().any(|l| l.starts_with('+'))
    });
    let mut sent = 0;
    let mut deleted = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(8) {
        send(&g, &subject(&format!("steady {sent}")));
        sent += 1;
        if sent % 3 == 0 {
            other.ok("NOOP");
            other.ok("STORE 1 +FLAGS.SILENT (\\Deleted)");
            let e = other.ok("EXPUNGE");
            assert_eq!(expunged(&e), vec![1], "{e:?}");
            deleted += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let want = sent - deleted;
    // Everything the idle session is told, applied in order.
    idle_until(&mut idle, Duration::from_secs(10), |seen| {
        let mut n = count;
        for l in seen {
            if let Some(e) = l.strip_prefix("* ").and_then(|r| r.strip_suffix(" EXISTS")) {
                n = e.parse().unwrap();
            } else if l.ends_with(" EXPUNGE") {
                n -= 1;
            }
        }
        n == want
    });
    idle.send(b"DONE\r\n");
    let done = idle.answer("i");
    assert!(done.ok(), "{done:?}");
    count = idle.uids().len();
    assert_eq!(count, want);
    assert_eq!(other.status_of("INBOX", "MESSAGES"), want as u64);

    other.ok("CREATE Projects");
    assert!(other.append("Projects", "", &draft("plan")).ok());
    let out = g.cli(&["mailbox", "list", "alice"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    // The folder table: name, messages, octets.
    let row = |name: &str| -> Option<String> {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
    };
    assert_eq!(row("INBOX"), Some(want.to_string()), "{text}");
    assert_eq!(row("Projects"), Some("1".to_string()), "{text}");
    assert!(
        text.contains(&format!("-- INBOX: {want} messages")),
        "{text}"
    );
}

/// APPEND keeps `store.min_free` as SMTP does: with the reserve larger
/// than the disk, it is refused and nothing is stored.
#[test]
fn append_keeps_the_stores_free_space() {
    let (_g, ports) = gateway("[store]\nmin_free = 18000000000000000000\n");
    let mut c = Imap::login(ports.plain, "alice", "secret");
    let a = c.append("Drafts", "", &draft("no room"));
    assert!(a.tagged.contains("NO [LIMIT]"), "{a:?}");
    assert_eq!(c.status_of("Drafts", "MESSAGES"), 0);
}
