//! IMAP's memory bound against the real binary: a command is held in
//! memory while it arrives, so large ones (an APPEND with its message)
//! take turns, a few at a time, and a stranger cannot send a large one at
//! all before logging in.
//!
//! Every process a test starts is stopped by PID when its guard is
//! dropped; every wait has a deadline.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{free_port, wait_for, Gateway};

/// The permits of `Shared::big_commands`.
const BIG_COMMANDS: usize = 8;

fn imap_gateway() -> (Gateway, u16) {
    let port = free_port();
    let g = Gateway::start(&format!(
        r#"
[[listen]]
address = "127.0.0.1:{port}"
mode = "imap"
plaintext_auth = true
[smtp]
max_connections_per_client = 40
"#
    ));
    g.add_user("alice", "pw");
    (g, port)
}

struct Imap {
    s: TcpStream,
    r: BufReader<TcpStream>,
}

impl Imap {
    fn connect(port: u16) -> Imap {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        let mut c = Imap { s, r };
        assert!(c.line().starts_with("* OK"));
        c
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        l
    }

    /// Sends `cmd` tagged `t` and returns the tagged response.
    fn cmd(&mut self, t: &str, cmd: &str) -> String {
        self.s
            .write_all(format!("{t} {cmd}\r\n").as_bytes())
            .unwrap();
        self.tagged(t)
    }

    fn tagged(&mut self, t: &str) -> String {
        loop {
            let l = self.line();
            assert!(!l.is_empty(), "connection closed waiting for {t}");
            if l.starts_with(&format!("{t} ")) {
                return l;
            }
        }
    }
}

/// The daemon's side of the established IMAP connections: the octets
/// each has received and not yet read.
fn unread(port: u16) -> Vec<u64> {
    let out = std::process::Command::new("ss")
        .args(["-tnH", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// 24 sessions each start an 8 MiB APPEND at once: 8 are read on, the
/// others wait with a little over 1 MiB taken, and then every one is
/// stored whole, in turn.
#[test]
fn large_appends_take_turns() {
    const SESSIONS: usize = 24;
    const SIZE: usize = 8 << 20;
    const FIRST: usize = 4 << 20;
    let (g, port) = imap_gateway();
    let mut sessions: Vec<Imap> = (0..SESSIONS)
        .map(|_| {
            let mut c = Imap::connect(port);
            assert!(c.cmd("a", "LOGIN alice pw").starts_with("a OK"));
            c
        })
        .collect();
    let mut line = vec![b'x'; 1022];
    line.extend_from_slice(b"\r\n");
    // Each message from its own thread: FIRST octets, then, when told, the
    // rest. A session that waits its turn stops reading, and its writer
    // blocks until the daemon reads on.
    let (writers, go): (Vec<_>, Vec<_>) = sessions
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut s = c.s.try_clone().unwrap();
            let line = line.clone();
            let (go, wait) = std::sync::mpsc::channel::<()>();
            let writer = std::thread::spawn(move || {
                let head = format!("Subject: big {i:02}\r\n\r\n");
                s.write_all(format!("b APPEND INBOX {{{SIZE}+}}\r\n{head}").as_bytes())
                    .unwrap();
                let mut sent = head.len();
                while sent + line.len() <= FIRST {
                    s.write_all(&line).unwrap();
                    sent += line.len();
                }
                wait.recv().unwrap();
                while SIZE - sent > line.len() + 4 {
                    s.write_all(&line).unwrap();
                    sent += line.len();
                }
                // The message's last line, then the end of the command.
                let mut tail = vec![b'y'; SIZE - sent - 2];
                tail.extend_from_slice(b"\r\n\r\n");
                s.write_all(&tail).unwrap();
            });
            (writer, go)
        })
        .unzip();
    // Exactly BIG_COMMANDS sessions are read to the end of what came;
    // the rest hold octets the daemon does not take.
    wait_for(
        "eight sessions read on and the rest waiting",
        Duration::from_secs(60),
        || {
            let q = unread(port);
            q.len() == SESSIONS
                && q.iter().filter(|&&n| n == 0).count() == BIG_COMMANDS
                && q.iter().filter(|&&n| n > 0).count() == SESSIONS - BIG_COMMANDS
        },
    );
    // The rest of every message: the waiting ones go as others finish.
    for g in go {
        g.send(()).unwrap();
    }
    for w in writers {
        w.join().unwrap();
    }
    for c in &mut sessions {
        let r = c.tagged("b");
        assert!(r.starts_with("b OK [APPENDUID "), "{r}");
    }
    let mut c = Imap::connect(port);
    c.cmd("a", "LOGIN alice pw");
    c.s.write_all(b"s STATUS INBOX (MESSAGES SIZE)\r\n")
        .unwrap();
    let status = c.line();
    assert_eq!(
        status.trim_end(),
        format!(
            "* STATUS \"INBOX\" (MESSAGES {SESSIONS} SIZE {})",
            SESSIONS * SIZE
        )
    );
    drop(g);
}

/// Before login, a literal of any size is cut off at 64 KiB with a BYE,
/// and the session ends; a command that fits is answered.
#[test]
fn a_stranger_cannot_send_a_large_literal() {
    let (g, port) = imap_gateway();
    let mut c = Imap::connect(port);
    c.s.write_all(b"a LOGIN alice {1000000}\r\n").unwrap();
    assert!(c.line().starts_with("+ "));
    // The daemon stops reading past 64 KiB; the write may fail when it
    // closes the connection.
    let _ = c.s.write_all(&vec![b'x'; 200_000]);
    let bye = c.line();
    assert!(bye.starts_with("* BYE [LIMIT]"), "{bye}");
    assert!(g
        .log()
        .contains("imap client sent too much before logging in"));
    // A login with a small literal password works.
    let mut c = Imap::connect(port);
    c.s.write_all(b"a LOGIN alice {2}\r\n").unwrap();
    assert!(c.line().starts_with("+ "));
    c.s.write_all(b"pw\r\n").unwrap();
    let ok = c.tagged("a");
    assert!(ok.starts_with("a OK"), "{ok}");
}
