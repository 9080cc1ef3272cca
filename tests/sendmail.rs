//! The sendmail command as programs use it: through the daemon's local
//! socket, in-process without a daemon, as an unprivileged user.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{Gateway, BIN};

/// A `sendmail` and a `mailq` link to the binary, as packages install them.
fn links(g: &Gateway) -> (PathBuf, PathBuf) {
    let dir = g.path("bin");
    std::fs::create_dir_all(&dir).unwrap();
    let (s, m) = (dir.join("sendmail"), dir.join("mailq"));
    for l in [&s, &m] {
        if !l.exists() {
            std::os::unix::fs::symlink(BIN, l).unwrap();
        }
    }
    (s, m)
}

fn run(cmd: &Path, g: &Gateway, args: &[&str], stdin: &[u8], user: Option<&str>) -> Output {
    let mut c = match user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--"]).arg(cmd);
            c
        }
        None => Command::new(cmd),
    };
    let mut child = c
        .args(args)
        .env("OUTPOST_CONFIG", &g.config_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn php_style_t_i_with_bcc() {
    let g = Gateway::start("");
    let (sendmail, _) = links(&g);
    // What PHP's mail() pipes: LF line ends, recipients in the headers.
    let msg = b"To: a@far.example, \"B, Person\" <b@far.example>\nCc: c@far.example\nBcc: secret@far.example\nSubject: order 42\n\nThanks for your order.\n.\nThis line is kept with -i.\n";
    let out = run(
        &sendmail,
        &g,
        &["-t", "-i", "-f", "shop@branch.example"],
        msg,
        None,
    );
    assert!(out.status.success(), "{}", text(&out));
    let q = g.queue();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0]["sender"], "shop@branch.example");
    let mut rcpts: Vec<_> = q[0]["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["address"].as_str().unwrap().to_string())
        .collect();
    rcpts.sort();
    assert_eq!(
        rcpts,
        [
            "a@far.example",
            "b@far.example",
            "c@far.example",
            "secret@far.example"
        ]
    );
    let body = String::from_utf8(g.body(q[0]["id"].as_str().unwrap())).unwrap();
    assert!(!body.contains("Bcc") && !body.contains("secret@"), "{body}");
    assert!(body.contains("\r\nSubject: order 42\r\n"), "{body}");
    assert!(
        body.contains("\r\n.\r\nThis line is kept with -i.\r\n"),
        "{body}"
    );
    assert!(
        body.contains("\r\nDate: ") && body.contains("\r\nMessage-ID: <"),
        "{body}"
    );
    assert!(body.contains("(outpost, from userid 0)"), "{body}");
    assert!(
        !body.replace("\r\n", "").contains('\n'),
        "only CRLF line ends"
    );
}

#[test]
fn sender_defaults_to_the_user_and_bs_speaks_smtp() {
    let g = Gateway::start("");
    let (sendmail, mailq) = links(&g);
    let out = run(
        &sendmail,
        &g,
        &["-F", "Cron Daemon", "ops@far.example"],
        b"Subject: nightly\n\nok\n",
        None,
    );
    assert!(out.status.success(), "{}", text(&out));
    let q = g.queue();
    assert_eq!(q[0]["sender"], "root@gw.test");
    let body = String::from_utf8(g.body(q[0]["id"].as_str().unwrap())).unwrap();
    assert!(
        body.contains("From: Cron Daemon <root@gw.test>\r\n"),
        "{body}"
    );

    let dialog = b"EHLO client\r\nMAIL FROM:<bs@branch.example>\r\nRCPT TO:<x@far.example>\r\nDATA\r\nSubject: bs\r\n\r\nx\r\n.\r\nQUIT\r\n";
    let out = run(&sendmail, &g, &["-bs"], dialog, None);
    let t = text(&out);
    assert!(
        t.starts_with("220 ") && t.contains("250 2.0.0 Ok: queued as") && t.contains("221 "),
        "{t}"
    );
    assert_eq!(g.queue().len(), 2);

    let out = run(&mailq, &g, &[], b"", None);
    let t = text(&out);
    assert!(
        out.status.success() && t.contains("bs@branch.example") && t.contains("-- 2 messages"),
        "{t}"
    );
    let out = run(&sendmail, &g, &["-bp"], b"", None);
    assert!(text(&out).contains("-- 2 messages"));
}

#[test]
fn without_a_daemon_root_writes_the_store_directly() {
    let mut g = Gateway::start("");
    g.stop();
    let (sendmail, _) = links(&g);
    let out = run(
        &sendmail,
        &g,
        &["x@far.example"],
        b"Subject: offline\n\nx\n",
        None,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(g.queue().len(), 1);
    let out = run(&sendmail, &g, &[], b"Subject: nobody\n\nx\n", None);
    assert_eq!(
        out.status.code(),
        Some(64),
        "no recipients is a usage error"
    );
    let out = run(
        &sendmail,
        &g,
        &["nobody@branch.example"],
        b"Subject: x\n\nx\n",
        None,
    );
    assert_eq!(out.status.code(), Some(67), "{}", text(&out));
    assert!(text(&out).contains("550 5.1.1"), "{}", text(&out));
}

/// A local account made for the test and removed afterwards.
struct TestUser(String);

impl TestUser {
    fn create() -> TestUser {
        // One per test: tests run at once in one process.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("opt{}x{n}", std::process::id());
        let ok = Command::new("useradd")
            .args(["--no-create-home", "--shell", "/usr/sbin/nologin", &name])
            .status()
            .unwrap();
        assert!(ok.success(), "useradd {name}");
        TestUser(name)
    }

    fn uid(&self) -> String {
        String::from_utf8(
            Command::new("id")
                .args(["-u", &self.0])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
        .trim()
        .to_string()
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.0).status();
    }
}

#[test]
fn an_unprivileged_user_submits_through_the_socket() {
    let mut g = Gateway::start("");
    let user = TestUser::create();
    // The user may reach the socket and read the config, nothing else.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(g.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&g.config_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(
        g.path("queue.sqlite"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let bin = g.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (sendmail, _) = links(&g);

    let out = run(
        &sendmail,
        &g,
        &["x@far.example"],
        b"Subject: from a user\n\nx\n",
        Some(&user.0),
    );
    assert!(out.status.success(), "{}", text(&out));
    let q = g.queue();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0]["sender"], format!("{}@gw.test", user.0));
    let body = String::from_utf8(g.body(q[0]["id"].as_str().unwrap())).unwrap();
    assert!(
        body.contains(&format!("(outpost, from userid {})", user.uid())),
        "{body}"
    );

    // No daemon, and this user cannot write the store: exit 75, and why.
    g.stop();
    let out = run(
        &sendmail,
        &g,
        &["x@far.example"],
        b"Subject: no daemon\n\nx\n",
        Some(&user.0),
    );
    assert_eq!(out.status.code(), Some(75), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("no outpost daemon listens") && t.contains("submit.sock"),
        "{t}"
    );
    assert_eq!(g.queue().len(), 1);
}

/// A configuration this user may not read: sendmail tries the default
/// submission socket, and when nothing answers there either, says both
/// (exit 78) and what to do.
#[test]
fn an_unreadable_configuration_falls_back_to_the_default_socket() {
    let default_socket = Path::new("/run/outpost/submit.sock");
    if default_socket.exists() {
        // A real outpost on this machine would take the message.
        eprintln!(
            "{} exists: this test needs it absent",
            default_socket.display()
        );
        return;
    }
    let g = Gateway::configure("");
    let user = TestUser::create();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(g.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&g.config_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let bin = g.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (sendmail, _) = links(&g);
    let out = run(
        &sendmail,
        &g,
        &["x@far.example"],
        b"Subject: x\n\nx\n",
        Some(&user.0),
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(78), "{t}");
    assert!(
        t.contains("cannot read the configuration file")
            && t.contains("Permission denied")
            && t.contains("/run/outpost/submit.sock")
            && t.contains("chmod 644"),
        "{t}"
    );
    // Root reads it and is told about the daemon, not the configuration.
    let out = run(
        &sendmail,
        &g,
        &["x@far.example"],
        b"Subject: x\n\nx\n",
        None,
    );
    assert!(
        !text(&out).contains("cannot read the configuration"),
        "{}",
        text(&out)
    );
}
