//! Hostile peers: an address built to add parameters upstream, an upstream
//! that never ends its greeting, escapes meant for the administrator's
//! terminal. The real binary over real TCP.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::time::Duration;

use common::fake::{self, Script};
use common::{json_out, queued_id, wait_for, Client, Gateway};

fn upstream(port: u16) -> String {
    format!("[upstream]\nserver = \"[127.0.0.1]:{port}\"\ntls = \"none\"\n")
}

#[test]
fn an_address_cannot_add_parameters_upstream() {
    let (port, seen) = fake::start(Script::default());
    let g = Gateway::start(&upstream(port));
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO client.test");
    let r = c.cmd("MAIL FROM:<\"odd> RET=FULL ENVID=x\"@outside.example>");
    assert!(r.starts_with("250"), "{r}");
    assert!(c
        .cmd("RCPT TO:<\"a> NOTIFY=NEVER\"@far.example>")
        .starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let r = c.cmd("Subject: quoted\r\n\r\nx\r\n.");
    assert!(queued_id(&r).is_some(), "{r}");
    let out = g.cli(&["flush", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", json_out(&out));
    wait_for("the message upstream", Duration::from_secs(5), || {
        !seen.bodies().is_empty()
    });
    let mails = seen.mails.lock().unwrap().clone();
    assert_eq!(
        mails,
        vec!["MAIL FROM:<\"odd> RET=FULL ENVID=x\"@outside.example>".to_string()]
    );
}

#[test]
fn an_upstream_that_never_ends_its_greeting_is_cut_off() {
    // "220-" and then As, forever, without a line end.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = s.write_all(b"220-");
                let chunk = [b'A'; 8192];
                while s.write_all(&chunk).is_ok() {}
            });
        }
    });
    let g = Gateway::start(&format!(
        "{}[flush]\nprobe_interval = \"0s\"\n",
        upstream(port)
    ));
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO client.test");
    let r = c.send_mail(
        "s@client.test",
        &["x@far.example"],
        b"Subject: x\r\n\r\nx\r\n",
    );
    assert!(queued_id(&r).is_some(), "{r}");
    let out = g.cli(&["flush", "--json"]);
    let v = json_out(&out);
    assert_eq!(out.status.code(), Some(75), "{v}");
    let error = v["summary"]["error"].as_str().unwrap_or("");
    assert!(error.contains("reply line too long"), "{v}");
    assert_eq!(
        g.queue()[0]["recipients"][0]["attempts"],
        0,
        "no attempt burned"
    );
}

#[test]
fn queue_show_prints_escapes_instead_of_obeying_them() {
    let g = Gateway::start("");
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO client.test");
    let r = c.cmd("MAIL FROM:<s@client.test> ENVID=a+1B]0;pwned+07+1B[2J");
    assert!(r.starts_with("250"), "{r}");
    assert!(c.cmd("RCPT TO:<x@far.example>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let r = c.cmd("Subject: escape\r\n\r\nx\r\n.");
    let id = queued_id(&r).unwrap();
    let out = g.cli(&["queue", "show", &id]);
    assert!(out.status.success());
    assert!(
        !out.stdout.contains(&0x1b),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!out.stdout.contains(&0x07));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ENVID=a\\x1b]0;pwned\\x07\\x1b[2J"), "{text}");
}
