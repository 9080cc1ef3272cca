//! ODMR/ATRN (RFC 2645) both ways: a hub outpost holds mail for a branch
//! that it cannot reach (no route, as behind NAT); the branch outpost
//! authenticates on the hub's `odmr` listener, sends ATRN, and takes the
//! mail over its own connection into a local mailbox.

mod common;

use std::time::Duration;

use common::{free_port, json_out, queued_id, wait_for, Client, Gateway};

/// As sent in DATA: the line "..a dot" is stored as ".a dot".
const BODY: &[u8] = b"Subject: for alice, via ATRN\r\n\r\n..a line with a dot\r\nend\r\n";

fn hub(odmr: u16) -> Gateway {
    let g = Gateway::start(&format!(
        "[[listen]]\naddress = \"127.0.0.1:{odmr}\"\nmode = \"odmr\"\n\
         [local]\ndomains = [\"hub.example\"]\n\
         [hub]\nhold_domains = [\"branch.example\", \"other.example\"]\n\
         [hub.odmr]\nbranch7 = [\"branch.example\"]\nnobody = []\n"
    ));
    g.add_user("branch7", "secret7");
    g.add_user("nobody", "secret0");
    g
}

fn hold_for_alice(hub: &Gateway) -> String {
    let mut c = Client::connect(hub.relay);
    c.cmd("EHLO sender.test");
    let r = c.send_mail("someone@far.example", &["alice@branch.example"], BODY);
    queued_id(&r).unwrap_or_else(|| panic!("{r}"))
}

fn auth_plain(user: &str, pass: &str) -> String {
    use std::io::Write;
    let mut raw = Vec::new();
    write!(raw, "\0{user}\0{pass}").unwrap();
    format!("AUTH PLAIN {}", outpost::auth::encode_b64(&raw))
}

#[test]
fn a_branch_takes_its_held_mail_over_its_own_connection() {
    let odmr = free_port();
    let hub = hub(odmr);
    let id = hold_for_alice(&hub);
    assert_eq!(hub.queue()[0]["recipients"][0]["state"], "held");
    let stored = hub.body(&id);

    // The password file lives outside the branch's directory, which the
    // harness makes when it starts.
    let secret = std::env::temp_dir().join(format!("atrn-secret-{odmr}"));
    std::fs::write(&secret, "secret7\n").unwrap();
    let pop = free_port();
    let branch = Gateway::start(&format!(
        "[[listen]]\naddress = \"127.0.0.1:{pop}\"\nmode = \"pop3\"\n[upstream]\nserver = \"[127.0.0.1]:{}\"\ntls = \"opportunistic\"\nallow_plaintext_auth = true\nusername = \"branch7\"\n\
         password_file = \"{}\"\nodmr = \"[127.0.0.1]:{odmr}\"\n\
         [flush]\natrn = [\"branch.example\"]\nprobe_interval = \"0s\"\n",
        hub.relay,
        secret.display()
    ));
    branch.add_user("alice", "pw");

    let out = branch.cli(&["flush", "--json"]);
    let v = json_out(&out);
    assert_eq!(out.status.code(), Some(0), "{v}");
    let atrn = v["summary"]["atrn"].as_str().unwrap_or("");
    assert!(atrn.starts_with("250"), "{v}");
    wait_for("the hub's queue to empty", Duration::from_secs(10), || {
        hub.queue().is_empty()
    });
    // In alice's mailbox at the branch, byte-exact after the branch's own
    // Received line.
    let store = outpost::queue::Store::open(&branch.path("queue.sqlite")).unwrap();
    let mailbox = store.mailbox("alice").unwrap();
    assert_eq!(mailbox.len(), 1, "{}", branch.log());
    let got = store.body(&mailbox[0].uid).unwrap().unwrap();
    assert!(got.ends_with(&stored), "{}", String::from_utf8_lossy(&got));
    assert!(String::from_utf8_lossy(&got).contains("gw.test"));
    // And alice reads it with a POP3 client (Python's poplib).
    let out = std::process::Command::new("/usr/bin/python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/py/pop3_fetch.py"
        ))
        .args([
            &pop.to_string(),
            "plain",
            &branch.path("cert.pem").display().to_string(),
            "alice",
            "pw",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stat"][0], 1, "{v}");
    use base64::Engine as _;
    let lines: Vec<String> = v["messages"][0]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(l.as_str().unwrap())
                .unwrap();
            String::from_utf8(raw).unwrap()
        })
        .collect();
    assert!(
        lines.iter().any(|l| l == "Subject: for alice, via ATRN"),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l == ".a line with a dot"), "{lines:?}");
    // The hub's history says where it went.
    let show = String::from_utf8_lossy(&hub.cli(&["queue", "show", &id]).stdout).to_string();
    assert!(show.contains("delivered"), "{show}");
    assert!(hub.log().contains("ATRN: turning the connection around"));

    // Nothing more held: the next ATRN hears 453.
    let out = branch.cli(&["flush", "--json"]);
    let v = json_out(&out);
    let _ = std::fs::remove_file(&secret);
    assert!(
        v["summary"]["atrn"]
            .as_str()
            .unwrap_or("")
            .starts_with("453"),
        "{v}"
    );
}

#[test]
fn atrn_needs_auth_an_allowed_domain_and_held_mail() {
    let odmr = free_port();
    let hub = hub(odmr);
    let mut c = Client::connect(odmr);
    let ehlo = c.cmd("EHLO branch.test");
    assert!(ehlo.contains("ATRN") && ehlo.contains("AUTH"), "{ehlo}");
    assert!(!ehlo.contains("PIPELINING"), "{ehlo}");
    // Not a mail port.
    assert!(c.cmd("MAIL FROM:<a@b.example>").starts_with("502"));
    // No AUTH: 530.
    assert!(c.cmd("ATRN branch.example").starts_with("530"));
    // An account without domains, then a domain the account may not take.
    assert!(c.cmd(&auth_plain("nobody", "secret0")).starts_with("235"));
    let r = c.cmd("ATRN");
    assert!(r.starts_with("450"), "{r}");
    let mut c = Client::connect(odmr);
    c.cmd("EHLO branch.test");
    assert!(c.cmd(&auth_plain("branch7", "secret7")).starts_with("235"));
    let r = c.cmd("ATRN other.example");
    assert!(r.starts_with("450") && r.contains("hub.odmr"), "{r}");
    // Allowed, but nothing held: 453.
    assert!(c.cmd("ATRN branch.example").starts_with("453"));
    // Held mail: 250, and the hub waits for our greeting as a client.
    hold_for_alice(&hub);
    let r = c.cmd("ATRN");
    assert!(r.starts_with("250"), "{r}");
    let r = c.cmd("220 branch.test ESMTP");
    assert!(r.starts_with("EHLO "), "the hub became the client: {r}");
}
