//! The status page (`GET /` on `[metrics]`) in a real browser: headless
//! Chromium (Debian's package; tests/run.sh installs it) renders it, and
//! the figures on it are those of `outpost status --json`. What came from
//! the upstream (a reply with markup in it) shows as text, never as markup.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, json_out, queued_id, Client, Gateway};

/// The reply our upstream gives every recipient: markup a page must not obey.
const HOSTILE: &str = "451 4.7.1 <script>alert(1)</script><b>greylisted</b> & try later";

/// An upstream that defers every recipient with [`HOSTILE`].
fn deferring_upstream() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = stream.try_clone().unwrap();
                let mut r = BufReader::new(stream);
                let _ = w.write_all(b"220 upstream.test ESMTP\r\n");
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 0 {
                    let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                    let answer = match verb.as_str() {
                        "EHLO" => "250-upstream.test\r\n250 8BITMIME\r\n".to_string(),
                        "RCPT" => format!("{HOSTILE}\r\n"),
                        "QUIT" => {
                            let _ = w.write_all(b"221 bye\r\n");
                            return;
                        }
                        _ => "250 2.0.0 ok\r\n".to_string(),
                    };
                    if w.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    port
}

/// Debian's Chromium; the test cannot pass without it.
fn chromium() -> PathBuf {
    for p in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "chromium is not installed: this test renders the status page in a real browser. \
         Install it with `apt-get install -y chromium` (tests/run.sh does)"
    );
}

/// Runs headless Chromium with `args` and `url`, in its own process group
/// (killed by that id if it overruns), with a fresh profile.
fn browse(args: &[&str], url: &str) -> Output {
    let profile = tempfile::tempdir().unwrap();
    let child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(90)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &format!("-{pid}")])
                .status();
            panic!("chromium did not finish within 90 s ({args:?})");
        }
    }
}

/// The text inside the element with `id` (up to its first child tag).
fn text_of(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element #{id} in the page"));
    let rest = &dom[at..];
    let start = rest.find('>').unwrap() + 1;
    let end = rest[start..].find('<').unwrap() + start;
    rest[start..end].to_string()
}

fn attr_of(dom: &str, id: &str, attr: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element #{id} in the page"));
    let tag_start = dom[..at].rfind('<').unwrap();
    let tag = &dom[tag_start..at + dom[at..].find('>').unwrap()];
    let key = format!("{attr}=\"");
    let v = tag
        .find(&key)
        .unwrap_or_else(|| panic!("no {attr} on #{id}: {tag}"));
    let v = &tag[v + key.len()..];
    v[..v.find('"').unwrap()].to_string()
}

#[test]
fn the_status_page_renders_in_a_browser_and_matches_status_json() {
    let upstream = deferring_upstream();
    let port = free_port();
    let g = Gateway::start(&format!(
        "[upstream]\nserver = \"[127.0.0.1]:{upstream}\"\ntls = \"none\"\n\
         [flush]\nprobe_interval = \"0s\"\n\
         [metrics]\naddress = \"127.0.0.1:{port}\"\n"
    ));
    // One message the upstream defers, with its reply kept ...
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO client.test");
    let r = c.send_mail(
        "o'brien&co@client.test",
        &["x@far.example", "y@far.example"],
        b"Subject: first\r\n\r\nbody\r\n",
    );
    let first = queued_id(&r).unwrap_or_else(|| panic!("{r}"));
    let out = g.cli(&["flush", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // ... then more than the page lists.
    for i in 0..101 {
        let r = c.send_mail(
            "s@client.test",
            &[&format!("n{i}@far.example")],
            b"Subject: more\r\n\r\nbody\r\n",
        );
        assert!(queued_id(&r).is_some(), "{r}");
    }
    c.cmd("QUIT");
    let queue = g.queue();
    assert_eq!(queue.len(), 102);

    let url = format!("http://127.0.0.1:{port}/");
    let status = json_out(&g.cli(&["status", "--json"]));
    let out = browse(&["--dump-dom"], &url);
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        dom.contains("<svg id=\"history\""),
        "no chart in the rendered page (chromium said: {})\n{dom}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dom.contains("id=\"depth\""), "{dom}");
    // The figures of `outpost status --json`.
    assert_eq!(text_of(&dom, "link-state"), status["link"]["state"]);
    assert_eq!(text_of(&dom, "link-state"), "up");
    for state in ["queued", "deferred", "held"] {
        assert_eq!(
            text_of(&dom, &format!("count-{state}")),
            status["counts"][state].to_string(),
            "{state}"
        );
    }
    assert_eq!(text_of(&dom, "count-deferred"), "2");
    assert_eq!(text_of(&dom, "count-queued"), "101");
    let oldest: i64 = attr_of(&dom, "oldest", "data-seconds").parse().unwrap();
    let expected = status["oldest_age_seconds"].as_i64().unwrap();
    assert!(
        (oldest - expected).abs() <= 5,
        "page {oldest}, status {expected}"
    );
    // The queue, oldest first and cut at 100 rows.
    assert_eq!(text_of(&dom, "queue-total"), "102");
    let listed = dom.find(&first).expect("the oldest message is listed");
    assert!(listed > dom.find("id=\"queue\"").unwrap());
    assert!(
        text_of(&dom, "queue-more").starts_with("and 2 more"),
        "{}",
        text_of(&dom, "queue-more")
    );
    // The upstream's reply and the sender are text, not markup.
    assert!(!dom.contains("<script"), "markup from a peer ran: {dom}");
    assert!(!dom.contains("<b>greylisted"), "{dom}");
    assert!(
        dom.contains(
            "&lt;script&gt;alert(1)&lt;/script&gt;&lt;b&gt;greylisted&lt;/b&gt; &amp; try later"
        ),
        "{dom}"
    );
    assert!(dom.contains("o'brien&amp;co@client.test"), "{dom}");

    // A screenshot: a PNG of the window's size with something drawn in it.
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("status.png");
    let started = Instant::now();
    let out = browse(
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1200,900",
        ],
        &url,
    );
    let bytes = std::fs::read(&png).unwrap_or_else(|e| {
        panic!(
            "no screenshot after {:?} ({e}); chromium said: {}",
            started.elapsed(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (1200, 900));
    assert!(
        bytes.len() > 20_000,
        "a {}-octet screenshot is nearly blank",
        bytes.len()
    );
}
