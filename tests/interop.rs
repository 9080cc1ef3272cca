//! Real clients against the real binary: swaks and Python's smtplib.
//! `tests/run.sh` installs swaks (and Net::SSLeay for its TLS).

mod common;

use std::process::{Command, Output};

use common::Gateway;

const EXTRA: &str = "[relay]\nnetworks = [\"127.0.0.1/32\"]\n";

fn swaks(args: &[&str]) -> (bool, String) {
    let out = Command::new("swaks")
        .args(["--server", "127.0.0.1", "--timeout", "20"])
        .args(args)
        .output()
        .expect("swaks is installed (tests/run.sh installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn python(script: &str, args: &[String]) -> Output {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script);
    Command::new("/usr/bin/python3")
        .arg(path)
        .args(args)
        .output()
        .unwrap()
}

fn queued_in(text: &str) -> String {
    let at = text
        .find("queued as ")
        .unwrap_or_else(|| panic!("no queue id in:\n{text}"));
    text[at + 10..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn swaks_relay_from_allowed_network_pipelined() {
    let g = Gateway::start(EXTRA);
    let (ok, out) = swaks(&[
        "--port",
        &g.relay.to_string(),
        "--pipeline",
        "--from",
        "s@client.test",
        "--to",
        "a@elsewhere.example,b@elsewhere.example",
        "--header",
        "Subject: swaks",
    ]);
    assert!(ok, "{out}");
    let id = queued_in(&out);
    let q = g.queue();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0]["id"], id.as_str());
    assert_eq!(q[0]["sender"], "s@client.test");
    assert_eq!(q[0]["recipients"].as_array().unwrap().len(), 2);
}

#[test]
fn swaks_stranger_cannot_relay_but_reaches_local_users() {
    let g = Gateway::start(EXTRA);
    g.add_user("alice", "secret");
    let port = g.relay.to_string();
    let (ok, out) = swaks(&[
        "--port",
        &port,
        "--local-interface",
        "127.0.0.2",
        "--from",
        "x@stranger.test",
        "--to",
        "victim@elsewhere.example",
    ]);
    assert!(!ok, "{out}");
    assert!(out.contains("554 5.7.1"), "{out}");
    assert!(g.queue().is_empty());
    let (ok, out) = swaks(&[
        "--port",
        &port,
        "--local-interface",
        "127.0.0.2",
        "--from",
        "x@stranger.test",
        "--to",
        "alice@branch.example",
    ]);
    assert!(ok, "{out}");
    let id = queued_in(&out);
    // Delivered to alice's mailbox in the same commit: nothing left queued.
    assert!(g.queue().is_empty());
    let store = outpost::queue::Store::open(&g.path("queue.sqlite")).unwrap();
    let mailbox = store.mailbox("alice").unwrap();
    assert_eq!(mailbox.len(), 1);
    assert_eq!(mailbox[0].uid, id);
    let (ok, out) = swaks(&[
        "--port",
        &port,
        "--local-interface",
        "127.0.0.2",
        "--from",
        "x@stranger.test",
        "--to",
        "nobody@branch.example",
    ]);
    assert!(!ok);
    assert!(out.contains("550 5.1.1"), "{out}");
}

#[test]
fn swaks_submission_with_starttls_and_auth() {
    let g = Gateway::start(EXTRA);
    g.add_user("alice", "secret");
    let port = g.submission.to_string();
    // No TLS: AUTH is not offered (plaintext_auth = false on this listener).
    let (ok, out) = swaks(&[
        "--port",
        &port,
        "--from",
        "alice@branch.example",
        "--to",
        "f@elsewhere.example",
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice",
        "--auth-password",
        "secret",
    ]);
    assert!(!ok, "{out}");
    // Wrong password.
    let (ok, out) = swaks(&[
        "--port",
        &port,
        "-tls",
        "--from",
        "alice@branch.example",
        "--to",
        "f@elsewhere.example",
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice",
        "--auth-password",
        "nope",
    ]);
    assert!(!ok);
    assert!(out.contains("535 5.7.8"), "{out}");
    assert!(g.queue().is_empty());
    // STARTTLS + AUTH LOGIN.
    let (ok, out) = swaks(&[
        "--port",
        &port,
        "-tls",
        "--from",
        "alice@branch.example",
        "--to",
        "f@elsewhere.example",
        "--auth",
        "LOGIN",
        "--auth-user",
        "alice",
        "--auth-password",
        "secret",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("235 2.7.0"), "{out}");
    let id = queued_in(&out);
    let body = String::from_utf8(g.body(&id)).unwrap();
    assert!(body.contains("with ESMTPSA id"), "{body}");
    assert!(body.contains("(authenticated as alice)"), "{body}");
    assert!(body.contains("(using TLSv1."), "{body}");
    assert!(!body.contains("secret"));
    // Implicit TLS on the submissions listener.
    let (ok, out) = swaks(&[
        "--port",
        &g.submissions.to_string(),
        "-tlsc",
        "--from",
        "alice@branch.example",
        "--to",
        "f@elsewhere.example",
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice",
        "--auth-password",
        "secret",
    ]);
    assert!(ok, "{out}");
    assert_eq!(g.queue().len(), 2);
}

#[test]
fn swaks_smuggling_attempts_are_refused() {
    let g = Gateway::start(EXTRA);
    let dir = g.path("smuggle");
    std::fs::create_dir(&dir).unwrap();
    let sequences: [&[u8]; 6] = [
        b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r\n.\n", b"\r.\r\n",
    ];
    for (i, seq) in sequences.iter().enumerate() {
        let mut data = b"Subject: first\r\n\r\nfirst".to_vec();
        data.extend_from_slice(seq);
        data.extend_from_slice(b"MAIL FROM:<evil@client.test>\r\nRCPT TO:<victim@elsewhere.example>\r\nDATA\r\nSubject: smuggled\r\n\r\nsecond\r\n.");
        let file = dir.join(format!("{i}.eml"));
        std::fs::write(&file, &data).unwrap();
        let (ok, out) = swaks(&[
            "--port",
            &g.relay.to_string(),
            "--from",
            "s@client.test",
            "--to",
            "a@elsewhere.example",
            "--no-data-fixup",
            "--data",
            &format!("@{}", file.display()),
        ]);
        assert!(!ok, "sequence {seq:?} accepted:\n{out}");
        assert!(out.contains("550 5.5.2"), "sequence {seq:?}:\n{out}");
    }
    assert!(g.queue().is_empty(), "a smuggled message was queued");
}

#[test]
fn python_starttls_drops_pipelined_commands() {
    let g = Gateway::start(EXTRA);
    let out = python("starttls_injection.py", &[g.relay.to_string()]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(g.log().contains("discarded input pipelined after STARTTLS"));
}

#[test]
fn python_submission_auth_rules() {
    let g = Gateway::start(EXTRA);
    g.add_user("alice", "secret");
    let out = python(
        "submission.py",
        &[g.submission.to_string(), "alice".into(), "secret".into()],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let body = g.body(&id);
    assert!(
        body.ends_with(b"Subject: submitted\r\n\r\n8-bit: \xc3\xa9t\xc3\xa9\r\n.leading dot\r\n")
    );
}

#[test]
fn python_smtplib_relay_byte_exact() {
    let g = Gateway::start(EXTRA);
    let out = python("smtplib_relay.py", &[g.relay.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let body = g.body(&id);
    // smtplib dot-stuffs; the store holds the message as written.
    assert!(body.ends_with(b"Subject: smtplib\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n..\r\n.x\r\n"));
    let out = g.cli(&["queue", "show", &id]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("body:        8BITMIME"));
}
