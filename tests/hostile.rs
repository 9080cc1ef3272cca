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

/// No backscatter: mail from a stranger (a client that may not relay, not
/// logged in) may name anyone as its sender, so a bounce of it returns the
/// headers only, even when it asked RET=FULL. A client of the office still
/// gets its whole message back.
#[test]
fn a_bounce_of_a_strangers_held_mail_carries_no_body() {
    let (port, seen) = fake::start(Script::default());
    let mut g = Gateway::start(&format!(
        "{}[relay]\nnetworks = [\"127.0.0.2/32\"]\n[hub]\nhold_domains = [\"other.example\"]\nmax_hold = \"1h\"\n",
        upstream(port)
    ));
    for (i, (local, from)) in [
        (None, "victim@far.example"),
        (Some("127.0.0.2"), "colleague@office.example"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = Client::connect_from(g.relay, local);
        c.cmd("EHLO client.test");
        let r = c.cmd(&format!("MAIL FROM:<{from}> RET=FULL"));
        assert!(r.starts_with("250"), "{r}");
        let r = c.cmd("RCPT TO:<x@other.example>");
        assert!(r.starts_with("250"), "{r}");
        assert!(c.cmd("DATA").starts_with("354"));
        let r = c.cmd(&format!("Subject: held {i}\r\n\r\nSECRET-BODY-{i}\r\n."));
        assert!(queued_id(&r).is_some(), "{r}");
    }
    g.stop();
    wait_for("both notices sent", Duration::from_secs(30), || {
        g.flush_later("+2h");
        seen.bodies().len() >= 2
    });
    let notices: Vec<String> = seen
        .bodies()
        .iter()
        .map(|b| String::from_utf8_lossy(b).to_string())
        .collect();
    let to = |who: &str| {
        notices
            .iter()
            .find(|n| n.contains(who))
            .unwrap_or_else(|| panic!("no notice to {who}: {notices:#?}"))
    };
    let stranger = to("victim@far.example");
    assert!(
        stranger.contains("Subject: held 0"),
        "headers returned: {stranger}"
    );
    assert!(!stranger.contains("SECRET-BODY-0"), "{stranger}");
    let colleague = to("colleague@office.example");
    assert!(colleague.contains("SECRET-BODY-1"), "{colleague}");
}

/// The daemon's log, written to a file or the journal, is plain text: no
/// terminal colour sequences (they were written whatever stderr was).
#[test]
fn the_log_carries_no_terminal_escapes() {
    let g = Gateway::start("");
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO client.test");
    let r = c.send_mail(
        "s@client.test",
        &["x@far.example"],
        b"Subject: t\r\n\r\nx\r\n",
    );
    let id = queued_id(&r).unwrap();
    wait_for("the queued line in the log", Duration::from_secs(5), || {
        g.log().contains(&format!("queue_id={id}"))
    });
    assert!(!g.log().contains('\x1b'), "{}", g.log());
}
