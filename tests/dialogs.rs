//! Plays every `tests/dialogs/*.dialog` against one running gateway.
//!
//! A dialog is a script of lines:
//!   `FROM: 127.0.0.2`     connect from this address (first line only)
//!   `PORT: submission`    connect to this listener (relay by default)
//!   `C: text`             send `text` CRLF
//!   `R: bytes`            send raw bytes; escapes \r \n \t \0 \\ \xNN
//!   `S: prefix`           read a reply; its last line starts with `prefix`
//!   `S~ text`             read a reply; it contains `text`
//!   `X:`                  the server has closed the connection
//!   `Q: n`                exactly n messages were queued by this dialog
//! Adding a case means adding a file.

mod common;

use common::{Client, Gateway};

const EXTRA: &str = r#"
[relay]
networks = ["127.0.0.1/32"]
max_recipients = 3
max_message_size = 2000
[local]
domains = ["branch.example"]
[local.aliases]
sales = ["alice", "someone@elsewhere.example"]
[hub]
hold_domains = ["other.example"]
[smtp]
auth_failure_delay = "10ms"
max_auth_failures = 3
max_errors = 5
# RFC 5321's own limit, so that long_lines.dialog shows the refusal.
max_line_length = 1000
"#;

fn unescape(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            i += 1;
            match b[i] {
                b'r' => out.push(b'\r'),
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'0' => out.push(0),
                b'\\' => out.push(b'\\'),
                b'x' => {
                    out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                    i += 2;
                }
                other => panic!("unknown escape \\{}", other as char),
            }
        } else {
            out.push(b[i]);
        }
        i += 1;
    }
    out
}

fn play(g: &Gateway, name: &str, script: &str) -> Result<(), String> {
    let lines: Vec<(usize, &str)> = script
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    let mut from = None;
    let mut port = g.relay;
    let mut rest = &lines[..];
    while let Some((_, l)) = rest.first() {
        if let Some(v) = l.strip_prefix("FROM: ") {
            from = Some(v.trim().to_string());
        } else if let Some(v) = l.strip_prefix("PORT: ") {
            port = match v.trim() {
                "relay" => g.relay,
                "submission" => g.submission,
                other => panic!("{name}: unknown port {other}"),
            };
        } else {
            break;
        }
        rest = &rest[1..];
    }
    let before = g.queue_ids().len();
    let mut c = Client::connect_from(port, from.as_deref());
    for (n, l) in rest {
        let at = format!("{name}:{n}");
        if let Some(t) = l.strip_prefix("C: ") {
            c.send(format!("{t}\r\n").as_bytes());
        } else if let Some(t) = l.strip_prefix("R: ") {
            c.send(&unescape(t));
        } else if let Some(want) = l.strip_prefix("S: ") {
            let got = c.reply();
            let last = got.lines().last().unwrap_or("");
            let last = if last.len() > 3 {
                format!("{} {}", &last[..3], &last[4..])
            } else {
                last.to_string()
            };
            if !last.starts_with(want) {
                return Err(format!("{at}: expected `{want}`, got `{got}`"));
            }
        } else if let Some(want) = l.strip_prefix("S~ ") {
            let got = c.reply();
            if !got.contains(want) {
                return Err(format!(
                    "{at}: expected a reply containing `{want}`, got `{got}`"
                ));
            }
        } else if l.starts_with("X:") {
            if !c.closed() {
                return Err(format!("{at}: expected the server to close the connection"));
            }
        } else if let Some(n) = l.strip_prefix("Q: ") {
            let want: usize = n.trim().parse().unwrap();
            let got = g.queue_ids().len() - before;
            if got != want {
                return Err(format!(
                    "{at}: expected {want} new queued messages, found {got}"
                ));
            }
        } else {
            return Err(format!("{at}: cannot parse `{l}`"));
        }
    }
    Ok(())
}

#[test]
fn dialogs() {
    let g = Gateway::start(EXTRA);
    g.add_user("alice", "secret");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dialogs");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dialog"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "dialogs missing from {}", dir.display());
    let mut failures = Vec::new();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        if let Err(e) = play(&g, &name, &std::fs::read_to_string(f).unwrap()) {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} dialogs failed:\n{}\n--- log ---\n{}",
        failures.len(),
        files.len(),
        failures.join("\n"),
        g.log()
    );
}
