//! Flushing to real peers on loopback high ports: an aiosmtpd upstream
//! (`tests/py/upstream.py`), MX lookups through dnsmasq, a private Postfix
//! instance as the upstream relay, and the retry clock (delay warnings,
//! link-aware expiry) driven by configuration.
//!
//! `tests/run.sh` installs python3-aiosmtpd, dnsmasq-base and postfix (the
//! latter preseeded "No configuration": nothing listens on port 25). Every
//! process a test starts is stopped by PID when its guard is dropped.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::peers::*;
use common::*;
use serde_json::Value;

const PYTHON: &str = "/usr/bin/python3";

// ---------------------------------------------------------------------------
// The aiosmtpd upstream

/// `tests/py/upstream.py` on a loopback port: 'defer' local parts get 451,
/// 'reject' 550, others 250; messages land in `dir` as NNNN.eml + NNNN.env.
struct Upstream {
    port: u16,
    dir: tempfile::TempDir,
    _proc: Proc,
}

impl Upstream {
    fn start(port: u16) -> Upstream {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let log = dir.path().join("log");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/upstream.py");
        let mut proc = Proc::spawn(
            "aiosmtpd (tests/py/upstream.py)",
            Command::new(PYTHON)
                .arg(script)
                .arg(port.to_string())
                .arg(&out)
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(std::fs::File::create(dir.path().join("err")).unwrap()),
        );
        proc.wait_port(port, &dir.path().join("err"));
        Upstream {
            port,
            dir,
            _proc: proc,
        }
    }

    /// Messages received so far: (envelope lines, bytes), in arrival order.
    fn messages(&self) -> Vec<(Vec<String>, Vec<u8>)> {
        let out = self.dir.path().join("out");
        let mut envs: Vec<PathBuf> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "env"))
            .collect();
        envs.sort();
        envs.iter()
            .map(|env| {
                let lines = std::fs::read_to_string(env)
                    .unwrap()
                    .lines()
                    .map(str::to_string)
                    .collect();
                (lines, std::fs::read(env.with_extension("eml")).unwrap())
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// outpost helpers

fn upstream_toml(server: &str) -> String {
    format!("[upstream]\nserver = \"{server}\"\ntls = \"none\"\n")
}

fn literal(port: u16) -> String {
    upstream_toml(&format!("[127.0.0.1]:{port}"))
}

fn send(g: &Gateway, from: &str, to: &[&str], data: &[u8]) -> String {
    let mut c = Client::connect(g.relay);
    let r = c.cmd("EHLO client.test");
    assert!(r.starts_with("250"), "EHLO: {r}");
    let r = c.send_mail(from, to, data);
    let id = queued_id(&r).unwrap_or_else(|| panic!("not queued: {r}"));
    c.cmd("QUIT");
    id
}

/// `outpost flush --json` through the daemon: (exit code, the JSON object).
fn flush(g: &Gateway) -> (i32, Value) {
    let out = g.cli(&["flush", "--json"]);
    (out.status.code().unwrap_or(-1), json_out(&out))
}

fn summary_is(v: &Value, key: &str, want: u64) {
    assert_eq!(
        v["summary"][key].as_u64(),
        Some(want),
        "summary.{key} in {v:#}"
    );
}

/// Queued messages that are DSNs outpost made (protocol "DSN").
fn dsns(g: &Gateway) -> Vec<Value> {
    g.queue()
        .into_iter()
        .filter(|m| m["protocol"] == "DSN")
        .collect()
}

fn message<'a>(q: &'a [Value], id: &str) -> &'a Value {
    q.iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in the queue: {q:#?}"))
}

fn recipient<'a>(m: &'a Value, address: &str) -> &'a Value {
    m["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["address"] == address)
        .unwrap_or_else(|| panic!("no recipient {address} in {m:#}"))
}

/// Flush results by recipient address: (outcome, reply).
fn outcomes(v: &Value) -> BTreeMap<String, (String, String)> {
    v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["recipients"].as_array().unwrap().iter())
        .map(|r| {
            (
                r["address"].as_str().unwrap().to_string(),
                (
                    r["outcome"].as_str().unwrap().to_string(),
                    r["reply"].as_str().unwrap_or("").to_string(),
                ),
            )
        })
        .collect()
}

/// Parses a DSN with Python's email package; returns its structure as JSON:
/// {content_type, report_type, to, parts: [types], returned: text of the
/// third part, recipients: [{final_recipient, action, status, diagnostic}]}.
fn parse_dsn(bytes: &[u8]) -> Value {
    const SCRIPT: &str = r#"
import email, json, sys
from email import policy
m = email.message_from_bytes(open(sys.argv[1], 'rb').read(), policy=policy.compat32)
parts = m.get_payload() if m.is_multipart() else []
out = {
    'content_type': m.get_content_type(),
    'report_type': m.get_param('report-type'),
    'to': m['To'],
    'parts': [p.get_content_type() for p in parts],
    'returned': '',
    'recipients': [],
}
for p in parts:
    if p.get_content_type() == 'message/delivery-status':
        blocks = p.get_payload()
        for b in blocks[1:]:
            out['recipients'].append({
                'final_recipient': b['Final-Recipient'],
                'action': b['Action'],
                'status': b['Status'],
                'diagnostic': b['Diagnostic-Code'],
            })
    elif p.get_content_type() in ('text/rfc822-headers', 'message/rfc822'):
        pl = p.get_payload()
        out['returned'] = pl if isinstance(pl, str) else pl[0].as_string()
print(json.dumps(out))
"#;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dsn.eml");
    std::fs::write(&file, bytes).unwrap();
    let out = Command::new(PYTHON)
        .args(["-c", SCRIPT])
        .arg(&file)
        .output()
        .expect("/usr/bin/python3");
    assert!(
        out.status.success(),
        "python could not parse the DSN: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(bytes)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The one recipient block of a parsed DSN, checked field by field.
fn dsn_block(dsn: &Value, final_recipient: &str, action: &str, status: &str) {
    let rcpts = dsn["recipients"].as_array().unwrap();
    assert_eq!(rcpts.len(), 1, "one recipient block: {dsn:#}");
    let r = &rcpts[0];
    let fr = r["final_recipient"].as_str().unwrap_or("");
    assert!(
        fr.to_ascii_lowercase().contains(final_recipient),
        "Final-Recipient {fr:?}, want {final_recipient}: {dsn:#}"
    );
    assert_eq!(r["action"].as_str().map(str::trim), Some(action), "{dsn:#}");
    assert_eq!(r["status"].as_str().map(str::trim), Some(status), "{dsn:#}");
}

fn dsn_structure(dsn: &Value, to: &str) {
    assert_eq!(dsn["content_type"], "multipart/report", "{dsn:#}");
    assert_eq!(dsn["report_type"], "delivery-status", "{dsn:#}");
    assert!(dsn["to"].as_str().unwrap_or("").contains(to), "To: {dsn:#}");
    let parts: Vec<&str> = dsn["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(parts.len(), 3, "{dsn:#}");
    assert_eq!(parts[1], "message/delivery-status", "{dsn:#}");
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Seconds from now until an RFC 3339 time.
fn seconds_ahead(rfc3339: &str) -> i64 {
    let t = chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap_or_else(|e| panic!("{rfc3339:?} is not RFC 3339: {e}"));
    t.timestamp() - chrono::Utc::now().timestamp()
}

const BODY: &[u8] = b"Subject: flush peers\r\nFrom: someone@sender.example\r\n\r\n\
first line\r\n..a line that starts with a dot\r\n..\r\n\
\tindented, and a long one: 0123456789012345678901234567890123456789012345678901234567890123456789\r\n\
last line\r\n";

// ---------------------------------------------------------------------------
// 1. aiosmtpd upstream: 250 / 451 / 550 per recipient, a DSN for the 550

#[test]
fn aiosmtpd_per_recipient_outcomes_byte_exact_body_and_failure_dsn() {
    let up = Upstream::start(free_port());
    let g = Gateway::start(&format!("{}[retry]\nbase = \"5m\"\n", literal(up.port)));
    let id = send(
        &g,
        "someone@sender.example",
        &["ok@up.test", "defer1@up.test", "reject1@up.test"],
        BODY,
    );
    let stored = g.body(&id);
    assert!(
        contains(
            &stored,
            b"\r\n.a line that starts with a dot\r\n.\r\n\tindented"
        ),
        "outpost stores the message unstuffed: {:?}",
        String::from_utf8_lossy(&stored)
    );

    let (code, v) = flush(&g);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["summary"]["link"], "up", "{v:#}");
    summary_is(&v, "delivered", 1);
    summary_is(&v, "deferred", 1);
    summary_is(&v, "bounced", 1);
    summary_is(&v, "expired", 0);
    assert_eq!(v["messages"].as_array().unwrap().len(), 1, "{v:#}");
    assert_eq!(v["messages"][0]["id"], id.as_str());
    let o = outcomes(&v);
    assert_eq!(o["ok@up.test"].0, "delivered", "{v:#}");
    assert!(o["ok@up.test"].1.starts_with("250"), "{v:#}");
    assert_eq!(o["defer1@up.test"].0, "deferred", "{v:#}");
    assert!(o["defer1@up.test"].1.contains("451 4.3.0"), "{v:#}");
    assert_eq!(o["reject1@up.test"].0, "bounced", "{v:#}");
    assert!(o["reject1@up.test"].1.contains("550 5.1.1"), "{v:#}");

    // The upstream has the message once, for ok@ only, byte for byte.
    let got = up.messages();
    assert_eq!(got.len(), 1, "one message at the upstream");
    assert_eq!(got[0].0, ["someone@sender.example", "ok@up.test"]);
    assert!(
        got[0].1 == stored,
        "the upstream got other bytes than outpost stored:\nstored:   {:?}\nreceived: {:?}",
        String::from_utf8_lossy(&stored),
        String::from_utf8_lossy(&got[0].1)
    );

    // defer1 waits for its next attempt, about retry.base from now.
    let q = g.queue();
    let m = message(&q, &id);
    let d = recipient(m, "defer1@up.test");
    assert_eq!(d["state"], "deferred", "{m:#}");
    assert_eq!(d["attempts"], 1, "{m:#}");
    assert!(d["last_reply"].as_str().unwrap().contains("451"), "{m:#}");
    let ahead = seconds_ahead(d["next_attempt"].as_str().unwrap());
    assert!(
        (240..=360).contains(&ahead),
        "next attempt {ahead} s ahead, want about 300 (retry.base 5m): {m:#}"
    );
    assert_eq!(recipient(m, "ok@up.test")["state"], "delivered", "{m:#}");
    assert_eq!(recipient(m, "reject1@up.test")["state"], "bounced", "{m:#}");

    // A failure DSN to the sender, from the null sender, about reject1 only.
    let dsn = dsns(&g);
    assert_eq!(dsn.len(), 1, "one DSN: {q:#?}");
    assert_eq!(dsn[0]["sender"], "", "{:#}", dsn[0]);
    let r = &dsn[0]["recipients"];
    assert_eq!(r.as_array().unwrap().len(), 1, "{:#}", dsn[0]);
    assert_eq!(r[0]["address"], "someone@sender.example");
    assert_eq!(r[0]["route"], "upstream");
    assert_eq!(r[0]["state"], "queued");
    let dsn_id = dsn[0]["id"].as_str().unwrap().to_string();
    let dsn_body = g.body(&dsn_id);
    let parsed = parse_dsn(&dsn_body);
    dsn_structure(&parsed, "someone@sender.example");
    dsn_block(&parsed, "reject1@up.test", "failed", "5.1.1");
    assert!(
        parsed["recipients"][0]["diagnostic"]
            .as_str()
            .unwrap_or("")
            .contains("550"),
        "{parsed:#}"
    );
    assert!(
        parsed["returned"]
            .as_str()
            .unwrap()
            .contains("Subject: flush peers"),
        "the original's headers come back: {parsed:#}"
    );

    // The next flush delivers the DSN (defer1 is not due yet), from <>,
    // and makes no DSN about the DSN.
    let (code, v) = flush(&g);
    assert_eq!(code, 0, "{v:#}");
    summary_is(&v, "delivered", 1);
    summary_is(&v, "deferred", 0);
    summary_is(&v, "bounced", 0);
    assert_eq!(v["messages"][0]["id"], dsn_id.as_str(), "{v:#}");
    let got = up.messages();
    assert_eq!(got.len(), 2, "the DSN reached the upstream");
    assert_eq!(got[1].0, ["", "someone@sender.example"], "null sender");
    assert!(got[1].1 == dsn_body, "the DSN arrived byte for byte");
    let q = g.queue();
    assert_eq!(q.len(), 1, "only the deferred original is left: {q:#?}");
    assert_eq!(q[0]["id"], id.as_str());
    assert!(dsns(&g).is_empty());
}

#[test]
fn aiosmtpd_dsn_for_a_local_sender_lands_in_the_mailbox() {
    let up = Upstream::start(free_port());
    let g = Gateway::start(&format!("{}[retry]\nbase = \"5m\"\n", literal(up.port)));
    g.add_user("alice", "pw");
    let id = send(
        &g,
        "alice@branch.example",
        &["ok@up.test", "defer1@up.test", "reject1@up.test"],
        BODY,
    );
    let (code, v) = flush(&g);
    assert_eq!(code, 0, "{v:#}");
    summary_is(&v, "delivered", 1);
    summary_is(&v, "deferred", 1);
    summary_is(&v, "bounced", 1);

    // The DSN is in alice's mailbox at once, not queued behind the link.
    assert!(dsns(&g).is_empty(), "{:#?}", g.queue());
    let store = outpost::queue::Store::open(&g.path("queue.sqlite")).unwrap();
    let mailbox = store.mailbox("alice").unwrap();
    assert_eq!(mailbox.len(), 1, "one DSN in alice's mailbox");
    assert_eq!(mailbox[0].sender, "");
    let parsed = parse_dsn(&store.body(&mailbox[0].uid).unwrap().unwrap());
    dsn_structure(&parsed, "alice@branch.example");
    dsn_block(&parsed, "reject1@up.test", "failed", "5.1.1");

    // Flushing again sends nothing more upstream.
    let (code, v) = flush(&g);
    assert_eq!(code, 0, "{v:#}");
    summary_is(&v, "delivered", 0);
    assert_eq!(up.messages().len(), 1, "only the original went upstream");
    let q = g.queue();
    assert_eq!(q.len(), 1);
    assert_eq!(message(&q, &id)["id"], id.as_str(), "defer1 still waits");
}

#[test]
fn aiosmtpd_dsn_for_a_local_sender_without_mailbox_is_explained_then_returned() {
    let up = Upstream::start(free_port());
    let g = Gateway::start(&format!("{}[retry]\nbase = \"5m\"\n", literal(up.port)));
    send(&g, "nobody@branch.example", &["reject1@up.test"], BODY);
    let (code, v) = flush(&g);
    assert_eq!(code, 0, "{v:#}");
    summary_is(&v, "bounced", 1);
    // No account "nobody": the DSN is kept, queued and explained, not lost.
    let dsn = dsns(&g);
    assert_eq!(dsn.len(), 1, "{:#?}", g.queue());
    let r = &dsn[0]["recipients"][0];
    assert_eq!(r["route"], "local");
    assert_eq!(r["state"], "queued");
    assert!(
        r["last_reply"].as_str().unwrap().contains("no mailbox"),
        "{r}"
    );
    let dsn_id = dsn[0]["id"].as_str().unwrap().to_string();
    // The next flush gives it up: nothing would ever deliver it. It is a
    // notice itself (null sender), so no notice about it goes anywhere;
    // its history says what happened.
    let (code, v) = flush(&g);
    assert_eq!(code, 0, "{v:#}");
    summary_is(&v, "bounced", 1);
    assert!(dsns(&g).is_empty(), "{:#?}", g.queue());
    let show = g.cli(&["queue", "show", &dsn_id]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains("bounced") && text.contains("no mailbox"),
        "{text}"
    );
    assert!(g.log().contains("given up"), "{}", g.log());
    assert_eq!(up.messages().len(), 0);
}

#[test]
fn aiosmtpd_a_bouncing_dsn_gets_no_dsn() {
    let up = Upstream::start(free_port());
    let g = Gateway::start(&format!("{}[retry]\nbase = \"5m\"\n", literal(up.port)));
    // The sender itself is refused by the upstream (local part 'reject').
    send(
        &g,
        "rejectsender@sender.example",
        &["reject2@up.test"],
        BODY,
    );
    let (code, v) = flush(&g);
    assert_eq!(code, 0, "{v:#}");
    summary_is(&v, "bounced", 1);
    let dsn = dsns(&g);
    assert_eq!(dsn.len(), 1, "{:#?}", g.queue());
    assert_eq!(
        dsn[0]["recipients"][0]["address"],
        "rejectsender@sender.example"
    );

    let (code, v) = flush(&g);
    assert_eq!(code, 0, "{v:#}");
    summary_is(&v, "bounced", 1);
    assert_eq!(
        outcomes(&v)["rejectsender@sender.example"].0,
        "bounced",
        "{v:#}"
    );
    assert!(up.messages().is_empty());
    let q = g.queue();
    assert!(q.is_empty(), "no DSN about a DSN: {q:#?}");
}

// ---------------------------------------------------------------------------
// 2. MX lookup through dnsmasq

struct Dnsmasq {
    port: u16,
    dir: tempfile::TempDir,
    _proc: Proc,
}

impl Dnsmasq {
    fn start(records: &[&str]) -> Dnsmasq {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let log = dir.path().join("log");
        let mut proc = Proc::spawn(
            "dnsmasq",
            Command::new("/usr/sbin/dnsmasq")
                .args([
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--no-poll",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    "--log-queries",
                    "--local=/test/",
                ])
                .arg(format!("--port={port}"))
                .arg(format!("--log-facility={}", log.display()))
                .args(records)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("err")).unwrap()),
        );
        proc.wait_port(port, &dir.path().join("err"));
        Dnsmasq {
            port,
            dir,
            _proc: proc,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

#[test]
fn mx_lookup_through_dnsmasq_delivers_and_null_mx_is_link_down() {
    let up = Upstream::start(free_port());
    let dns = Dnsmasq::start(&[
        "--mx-host=hq.test,mx1.hq.test,10",
        "--host-record=mx1.hq.test,127.0.0.1",
        "--mx-host=nullmx.test,.,0",
    ]);
    let resolver = format!("resolver = \"127.0.0.1:{}\"\n", dns.port);

    let g = Gateway::start(&format!(
        "{}{resolver}[retry]\nbase = \"5m\"\n",
        upstream_toml(&format!("hq.test:{}", up.port))
    ));
    let id = send(&g, "someone@sender.example", &["bob@up.test"], BODY);
    let stored = g.body(&id);
    let (code, v) = flush(&g);
    assert_eq!(code, 0, "{v:#}\n{}", g.log());
    assert_eq!(v["summary"]["link"], "up", "{v:#}");
    summary_is(&v, "delivered", 1);
    assert!(
        v["link"]["upstream"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("127.0.0.1:{}", up.port)),
        "connected to the MX's address: {v:#}"
    );
    let got = up.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, ["someone@sender.example", "bob@up.test"]);
    assert!(got[0].1 == stored, "delivered byte for byte");
    assert!(g.queue().is_empty());
    wait_for(
        "dnsmasq to log the MX query",
        Duration::from_secs(5),
        || dns.log().contains("query[MX] hq.test"),
    );

    // RFC 7505 null MX: the domain takes no mail. The link is down (nothing
    // sent, no attempt counted) and the error says why.
    let g2 = Gateway::start(&format!(
        "{}{resolver}",
        upstream_toml(&format!("nullmx.test:{}", up.port))
    ));
    let id2 = send(&g2, "someone@sender.example", &["bob@up.test"], BODY);
    let (code, v) = flush(&g2);
    assert_eq!(code, 75, "link down: {v:#}");
    assert_eq!(v["summary"]["link"], "down", "{v:#}");
    summary_is(&v, "delivered", 0);
    let err = v["summary"]["error"].as_str().unwrap_or("");
    assert!(
        err.contains("null MX"),
        "error {err:?} should name the null MX"
    );
    assert_eq!(up.messages().len(), 1, "nothing more reached the upstream");
    let q = g2.queue();
    let r = recipient(message(&q, &id2), "bob@up.test");
    assert_eq!(r["state"], "queued");
    assert_eq!(r["attempts"], 0, "a link that is down burns no attempt");
}

/// DNS is not authenticated, so with an MX lookup the upstream's
/// certificate must carry the configured name (`upstream.tls_name`, else the
/// host in `server`), never the MX name DNS handed out.
#[test]
fn with_mx_the_certificate_is_checked_against_the_configured_name() {
    // The relay's self-signed certificate names gw.test and localhost.
    let hub = Gateway::start("");
    let dns = Dnsmasq::start(&[
        "--mx-host=hq.test,gw.test,10",
        "--host-record=gw.test,127.0.0.1",
    ]);
    let mut branch = Gateway::start(&format!(
        "[upstream]\nserver = \"hq.test:{}\"\ntls = \"required\"\nca_file = \"{}\"\nresolver = \"127.0.0.1:{}\"\n",
        hub.relay,
        hub.path("cert.pem").display(),
        dns.port
    ));
    send(&branch, "s@sender.example", &["x@far.example"], BODY);
    let (code, v) = flush(&branch);
    assert_eq!(code, 75, "{v:#}\n{}", branch.log());
    let err = v["summary"]["error"].as_str().unwrap_or("");
    assert!(
        err.contains("does not name the upstream") && err.contains("upstream.tls_name"),
        "{v:#}"
    );
    assert!(hub.queue().is_empty(), "nothing went to a name from DNS");

    // The administrator names the relay's certificate: delivered.
    branch.stop();
    let config = std::fs::read_to_string(&branch.config_path).unwrap();
    std::fs::write(
        &branch.config_path,
        format!("{config}tls_name = \"gw.test\"\n"),
    )
    .unwrap();
    let out = branch.cli(&["flush", "--json"]);
    let v = json_out(&out);
    assert_eq!(out.status.code(), Some(0), "{v:#}");
    summary_is(&v, "delivered", 1);
    assert_eq!(hub.queue().len(), 1);
}

// ---------------------------------------------------------------------------
// 3. Postfix as the upstream relay

/// Postfix's delivered copy is one Received header of its own, then the
/// message with LF line ends (dots unstuffed).
fn postfix_copy_matches(delivered: &[u8], stored: &[u8]) -> bool {
    let text = delivered;
    if !text.starts_with(b"Received: ") {
        return false;
    }
    // Skip the Received header and its continuation lines.
    let mut at = 0;
    loop {
        let Some(nl) = text[at..].iter().position(|&b| b == b'\n') else {
            return false;
        };
        at += nl + 1;
        if !matches!(text.get(at), Some(b' ') | Some(b'\t')) {
            break;
        }
    }
    let lf: Vec<u8> = String::from_utf8_lossy(stored)
        .replace("\r\n", "\n")
        .into_bytes();
    text[at..] == lf[..]
}

#[test]
fn postfix_upstream_takes_twenty_messages_over_one_connection() {
    let mut pf = Postfix::new(free_port());
    pf.postconf(&[
        "default_transport = filesink",
        "local_header_rewrite_clients =",
        "smtpd_relay_restrictions = permit_mynetworks, reject",
        "smtpd_recipient_restrictions = check_recipient_access regexp:{{/^[^@]*defer[^@]*@/ 451 4.3.0 try later},{/^[^@]*reject[^@]*@/ 550 5.1.1 no such user}}",
    ]);
    pf.start();
    let g = Gateway::start(&format!(
        "{}connections = 1\n[retry]\nbase = \"5m\"\n",
        literal(pf.port)
    ));

    // Twenty messages, queued over one session.
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO client.test");
    let mut stored = BTreeMap::new();
    for i in 0..20 {
        let rcpt = format!("rcpt{i:02}@up.test");
        let data = format!(
            "Subject: message {i}\r\nFrom: someone@sender.example\r\n\r\nbody of {i}\r\n..dot\r\nend\r\n"
        );
        let r = c.send_mail("someone@sender.example", &[&rcpt], data.as_bytes());
        let id = queued_id(&r).unwrap_or_else(|| panic!("not queued: {r}"));
        stored.insert(rcpt, g.body(&id));
    }
    c.cmd("QUIT");
    assert_eq!(g.queue().len(), 20);

    let (code, v) = flush(&g);
    assert_eq!(code, 0, "{v:#}\n{}", pf.maillog());
    assert_eq!(v["summary"]["link"], "up", "{v:#}");
    summary_is(&v, "delivered", 20);
    summary_is(&v, "deferred", 0);
    summary_is(&v, "bounced", 0);
    summary_is(&v, "untouched", 0);
    assert!(
        g.queue().is_empty(),
        "outpost's queue is empty: {:#?}",
        g.queue()
    );

    wait_for(
        "Postfix to deliver all 20 to the filesink",
        Duration::from_secs(60),
        || pf.delivered().len() >= 20,
    );
    let got = pf.delivered();
    assert_eq!(got.len(), 20, "{:?}", got.keys().collect::<Vec<_>>());
    for (rcpt, body) in &stored {
        let (from, eml) = got
            .get(rcpt)
            .unwrap_or_else(|| panic!("{rcpt} not delivered by Postfix"));
        assert_eq!(from, "someone@sender.example");
        assert!(
            postfix_copy_matches(eml, body),
            "{rcpt}: Postfix's copy differs from what outpost stored\nstored:    {:?}\ndelivered: {:?}",
            String::from_utf8_lossy(body),
            String::from_utf8_lossy(eml)
        );
    }

    // One connection carried all twenty transactions, with BDAT (CHUNKING).
    wait_for(
        "Postfix to log the session's end",
        Duration::from_secs(10),
        || {
            pf.maillog()
                .lines()
                .any(|l| l.contains("disconnect from") && l.contains(" mail="))
        },
    );
    let log = pf.maillog();
    let sessions: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("disconnect from") && l.contains(" mail="))
        .collect();
    assert_eq!(
        sessions.len(),
        1,
        "one connection (upstream.connections = 1):\n{log}"
    );
    assert!(
        sessions[0].contains(" mail=20 ") && sessions[0].contains(" rcpt=20 "),
        "{}",
        sessions[0]
    );
    assert!(
        sessions[0].contains(" bdat=20"),
        "CHUNKING is offered, so BDAT: {}",
        sessions[0]
    );

    // Postfix refuses rejectme@ with 550: bounced, and the DSN goes upstream too.
    let id = send(&g, "bouncer@sender.example", &["rejectme@up.test"], BODY);
    let (code, v) = flush(&g);
    assert_eq!(code, 0, "{v:#}");
    summary_is(&v, "bounced", 1);
    summary_is(&v, "delivered", 0);
    let o = outcomes(&v);
    assert_eq!(o["rejectme@up.test"].0, "bounced", "{v:#}");
    assert!(o["rejectme@up.test"].1.contains("550 5.1.1"), "{v:#}");
    let dsn = dsns(&g);
    assert_eq!(dsn.len(), 1, "{:#?}", g.queue());
    assert!(
        g.queue().iter().all(|m| m["id"] != id.as_str()),
        "the bounced message is done"
    );
    let parsed = parse_dsn(&g.body(dsn[0]["id"].as_str().unwrap()));
    dsn_block(&parsed, "rejectme@up.test", "failed", "5.1.1");

    let (code, v) = flush(&g);
    assert_eq!(code, 0, "{v:#}");
    summary_is(&v, "delivered", 1);
    assert!(g.queue().is_empty());
    wait_for(
        "Postfix to deliver the DSN",
        Duration::from_secs(60),
        || pf.delivered().contains_key("bouncer@sender.example"),
    );
    let (from, _) = &pf.delivered()["bouncer@sender.example"];
    assert_eq!(from, "MAILER-DAEMON", "the DSN came from the null sender");
}

// ---------------------------------------------------------------------------
// 4. Delay warnings and expiry, driven by configuration

#[test]
fn delay_warning_once_while_the_link_is_down() {
    let down = free_port(); // nothing listens here
    let mut g = Gateway::start(&format!(
        "{}[retry]\nbase = \"5m\"\ndelay_warning = \"1m\"\n",
        literal(down)
    ));
    let id = send(&g, "someone@sender.example", &["far@up.test"], BODY);
    g.stop();
    let (code, v) = flush(&g);
    assert_eq!(code, 75, "link down: {v:#}");
    summary_is(&v, "delay_warnings", 0);
    // The warning is due by the clock: two minutes later.
    let (code, v) = g.flush_later("+2m");
    assert_eq!(code, 75, "link down: {v:#}");
    assert_eq!(v["summary"]["link"], "down", "{v:#}");
    summary_is(&v, "delay_warnings", 1);
    summary_is(&v, "expired", 0);
    let dsn = dsns(&g);
    assert_eq!(dsn.len(), 1, "a delay warning: {:#?}", g.queue());
    assert_eq!(dsn[0]["sender"], "");
    assert_eq!(dsn[0]["recipients"][0]["address"], "someone@sender.example");
    let parsed = parse_dsn(&g.body(dsn[0]["id"].as_str().unwrap()));
    dsn_structure(&parsed, "someone@sender.example");
    let status = parsed["recipients"][0]["status"].as_str().unwrap_or("");
    assert!(status.trim().starts_with("4."), "{parsed:#}");
    dsn_block(&parsed, "far@up.test", "delayed", status.trim());
    let q = g.queue();
    let r = recipient(message(&q, &id), "far@up.test");
    assert_eq!(r["state"], "queued", "still trying");
    assert_eq!(r["attempts"], 0);

    // No second warning for the same recipient.
    let (code, v) = g.flush_later("+3m");
    assert_eq!(code, 75, "{v:#}");
    summary_is(&v, "delay_warnings", 0);
    assert_eq!(dsns(&g).len(), 1, "{:#?}", g.queue());
}

#[test]
fn max_age_counts_only_time_with_the_link_up() {
    let up_port = free_port(); // the upstream starts later
    let mut g = Gateway::start(&format!(
        "{}[retry]\nbase = \"5m\"\nmax_age = \"1m\"\nmax_age_absolute = \"1h\"\n",
        literal(up_port)
    ));
    let id = send(&g, "someone@sender.example", &["far@up.test"], BODY);
    let stored = g.body(&id);
    g.stop();
    let (code, v) = flush(&g);
    assert_eq!(code, 75, "link down: {v:#}");
    // Longer than max_age, but all of it with the link down.
    let (code, v) = g.flush_later("+2m");
    assert_eq!(code, 75, "link down: {v:#}");
    summary_is(&v, "expired", 0);
    let q = g.queue();
    assert_eq!(q.len(), 1, "still queued, no DSN: {q:#?}");
    assert_eq!(
        recipient(message(&q, &id), "far@up.test")["state"],
        "queued"
    );

    // The link comes up: delivered, not expired (the up clock starts now).
    let up = Upstream::start(up_port);
    let (code, v) = flush(&g);
    assert_eq!(code, 0, "{v:#}");
    summary_is(&v, "expired", 0);
    summary_is(&v, "delivered", 1);
    assert!(g.queue().is_empty(), "{:#?}", g.queue());
    let got = up.messages();
    assert_eq!(got.len(), 1);
    assert!(got[0].1 == stored);
}

#[test]
fn max_age_absolute_expires_even_with_the_link_down() {
    let down = free_port();
    let mut g = Gateway::start(&format!(
        "{}[retry]\nbase = \"5m\"\nmax_age = \"1m\"\nmax_age_absolute = \"1m\"\n",
        literal(down)
    ));
    let id = send(&g, "someone@sender.example", &["far@up.test"], BODY);
    g.stop();
    let (code, v) = flush(&g);
    assert_eq!(code, 75, "link down: {v:#}");
    summary_is(&v, "expired", 0);

    let (code, v) = g.flush_later("+2m");
    assert!(code == 75 || code == 0, "exit {code}: {v:#}");
    summary_is(&v, "expired", 1);
    let q = g.queue();
    assert!(
        q.iter().all(|m| m["id"] != id.as_str()),
        "the expired message is no longer pending: {q:#?}"
    );
    let dsn = dsns(&g);
    assert_eq!(dsn.len(), 1, "a failure DSN: {q:#?}");
    assert_eq!(dsn[0]["recipients"][0]["address"], "someone@sender.example");
    let parsed = parse_dsn(&g.body(dsn[0]["id"].as_str().unwrap()));
    dsn_structure(&parsed, "someone@sender.example");
    dsn_block(&parsed, "far@up.test", "failed", "4.4.7");
}
