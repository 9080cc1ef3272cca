//! ETRN both ways: a hub outpost holds a branch's mail until the branch asks.

mod common;

use std::time::Duration;

use common::{queued_id, wait_for, Client, Gateway};

fn send(port: u16, from: &str, to: &[&str], body: &[u8]) -> String {
    let mut c = Client::connect(port);
    c.cmd("EHLO client.test");
    let r = c.send_mail(from, to, body);
    queued_id(&r).unwrap_or_else(|| panic!("not queued: {r}"))
}

fn store(g: &Gateway) -> outpost::queue::Store {
    outpost::queue::Store::open(&g.path("queue.sqlite")).unwrap()
}

#[test]
fn a_branch_gets_its_held_mail_after_flush_and_etrn() {
    // The branch is configured first (the hub routes to its relay port) but
    // not started: it is "offline".
    let mut branch = Gateway::configure("");
    let hub = Gateway::start(&format!(
        "[local]\ndomains = [\"hub.example\"]\n[hub]\nhold_domains = [\"branch.example\"]\n[hub.routes]\n\"branch.example\" = \"[127.0.0.1]:{}\"\n",
        branch.relay
    ));
    // Sent dot-stuffed; stored and delivered with the dot unstuffed.
    let sent = b"Subject: for alice\r\n\r\n..dotted line\r\n8-bit: \xc3\xa9\r\n";
    let content = b"Subject: for alice\r\n\r\n.dotted line\r\n8-bit: \xc3\xa9\r\n";
    let held_id = send(
        hub.relay,
        "friend@far.example",
        &["alice@branch.example"],
        sent,
    );
    let q = hub.queue();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0]["recipients"][0]["state"], "held");
    let list = String::from_utf8_lossy(&hub.cli(&["queue", "list"]).stdout).to_string();
    assert!(
        list.contains("-- held for branch.example: 1 messages (last asked never)"),
        "{list}"
    );
    let hub_body = hub.body(&held_id);

    // The branch comes up: its upstream is the hub, it asks for branch.example.
    let config = std::fs::read_to_string(&branch.config_path).unwrap();
    std::fs::write(
        &branch.config_path,
        format!(
            "{config}[upstream]\nserver = \"[127.0.0.1]:{}\"\ntls = \"opportunistic\"\n[flush]\netrn = [\"branch.example\"]\n",
            hub.relay
        ),
    )
    .unwrap();
    branch.spawn();
    branch.add_user("alice", "pw");
    send(
        branch.relay,
        "alice@branch.example",
        &["bob@far.example"],
        b"Subject: out\r\n\r\nx\r\n",
    );

    let out = branch.cli(&["flush", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert_eq!(v["summary"]["delivered"], 1, "{v}");
    let etrn = &v["summary"]["etrn"][0];
    assert_eq!(etrn["name"], "branch.example");
    assert!(
        etrn["reply"].as_str().unwrap().starts_with("253 "),
        "{etrn}"
    );

    // The hub delivers the held message to the branch: alice's mailbox.
    wait_for(
        "the held message in alice's mailbox",
        Duration::from_secs(30),
        || !store(&branch).mailbox("alice").unwrap().is_empty(),
    );
    let mailbox = store(&branch).mailbox("alice").unwrap();
    assert_eq!(mailbox.len(), 1);
    let got = store(&branch).body(&mailbox[0].uid).unwrap().unwrap();
    assert!(
        got.ends_with(&hub_body),
        "byte-exact, the hub's copy behind the branch's Received header"
    );
    assert!(got.ends_with(content));
    // The hub's queue is empty; the branch's outbound mail is at the hub.
    wait_for("the hub's queue to drain", Duration::from_secs(10), || {
        hub.queue().iter().all(|m| {
            m["recipients"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["address"] == "bob@far.example")
        })
    });
    let status = String::from_utf8_lossy(&branch.cli(&["status"]).stdout).to_string();
    assert!(
        status.contains("last ETRN:") && status.contains("branch.example: 253"),
        "{status}"
    );
    let hub_status: serde_json::Value =
        serde_json::from_slice(&hub.cli(&["status", "--json"]).stdout).unwrap();
    assert!(
        hub_status["held"].as_array().unwrap().is_empty(),
        "{hub_status}"
    );
}

#[test]
fn etrn_is_refused_outside_etrn_networks_and_for_domains_not_held() {
    let hub = Gateway::start(
        "[relay]\nnetworks = [\"127.0.0.1/32\"]\n[hub]\nhold_domains = [\"other.example\"]\netrn_networks = [\"127.0.0.1/32\"]\n",
    );
    send(
        hub.relay,
        "x@far.example",
        &["carol@other.example"],
        b"Subject: held\r\n\r\nx\r\n",
    );

    // From 127.0.0.2: not offered, refused, nothing released.
    let mut c = Client::connect_from(hub.relay, Some("127.0.0.2"));
    let ehlo = c.cmd("EHLO stranger.test");
    assert!(!ehlo.contains("ETRN"), "{ehlo}");
    let r = c.cmd("ETRN other.example");
    assert!(r.starts_with("459 4.7.1"), "{r}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(hub.queue()[0]["recipients"][0]["state"], "held");

    // From 127.0.0.1: offered; a domain not held is 459, a queue name 458.
    let mut c = Client::connect(hub.relay);
    let ehlo = c.cmd("EHLO branch.test");
    assert!(ehlo.contains("ETRN"), "{ehlo}");
    assert!(c.cmd("ETRN elsewhere.example").starts_with("459 4.7.1"));
    assert!(c.cmd("ETRN #somequeue").starts_with("458"));
    assert!(c.cmd("ETRN @nothing.example").starts_with("459"));
    // Allowed and held: 253 (its branch is not reachable: it stays held).
    let r = c.cmd("ETRN other.example");
    assert!(
        r.starts_with("253 2.0.0 OK, 1 pending messages for node other.example"),
        "{r}"
    );
    wait_for(
        "the request to be recorded",
        Duration::from_secs(20),
        || {
            let s: serde_json::Value =
                serde_json::from_slice(&hub.cli(&["status", "--json"]).stdout).unwrap();
            s["held"][0]["last_asked"].is_string()
        },
    );
    // other.example has no route and no DNS here: the mail stays held.
    let q = hub.queue();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0]["recipients"][0]["state"], "held");
    assert!(
        q[0]["recipients"][0]["last_reply"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{}",
        q[0]
    );
}

#[test]
fn the_null_hub_does_not_offer_etrn() {
    let g = Gateway::start("");
    let mut c = Client::connect(g.relay);
    let ehlo = c.cmd("EHLO x.test");
    assert!(!ehlo.contains("ETRN"));
    assert!(c.cmd("ETRN branch.example").starts_with("500"));
}

#[test]
fn flush_domain_releases_a_hold_domain_by_hand() {
    let mut branch = Gateway::configure("");
    let hub = Gateway::start(&format!(
        "[local]\ndomains = [\"hub.example\"]\n[hub]\nhold_domains = [\"branch.example\"]\n[hub.routes]\n\"branch.example\" = \"[127.0.0.1]:{}\"\n",
        branch.relay
    ));
    send(
        hub.relay,
        "x@far.example",
        &["alice@branch.example"],
        b"Subject: by hand\r\n\r\nx\r\n",
    );
    branch.spawn();
    branch.add_user("alice", "pw");
    let out = hub.cli(&["flush", "--domain", "branch.example", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["summary"]["delivered"], 1, "{v}");
    assert!(hub.queue().is_empty());
    assert_eq!(store(&branch).mailbox("alice").unwrap().len(), 1);
}

#[test]
fn a_repeated_etrn_while_delivery_runs_starts_no_second_one() {
    // A branch that is slow to greet, and counts its connections.
    let (branch, seen) = common::fake::start(common::fake::Script {
        greet_delay: Duration::from_millis(1500),
        ..Default::default()
    });
    let conns = &seen.connections;
    let hub = Gateway::start(&format!(
        "[local]\ndomains = [\"hub.example\"]\n[hub]\nhold_domains = [\"branch.example\"]\n[hub.routes]\n\"branch.example\" = \"[127.0.0.1]:{branch}\"\n"
    ));
    send(
        hub.relay,
        "x@far.example",
        &["alice@branch.example"],
        b"Subject: once\r\n\r\nx\r\n",
    );
    let mut c = Client::connect(hub.relay);
    c.cmd("EHLO branch.test");
    assert!(c.cmd("ETRN branch.example").starts_with("253"));
    wait_for("the delivery to start", Duration::from_secs(10), || {
        conns.load(std::sync::atomic::Ordering::SeqCst) == 1
    });
    // Asked again while the first delivery waits for the branch's greeting.
    assert!(c.cmd("ETRN branch.example").starts_with("25"));
    assert!(c.cmd("ETRN branch.example").starts_with("25"));
    wait_for("the delivery", Duration::from_secs(20), || {
        hub.queue().is_empty()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        conns.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one delivery, one connection"
    );
}

/// `hub.routes` entries may require a verified certificate from the branch:
/// an untrusted one gets nothing; with its CA and name it gets its mail.
#[test]
fn a_hub_route_can_require_a_verified_certificate() {
    // The branch's gateway has a self-signed certificate (gw.test, localhost).
    let branch = Gateway::start("");
    branch.add_user("alice", "pw");
    let route = |extra: &str| {
        format!(
            "[local]\ndomains = [\"hub.example\"]\n[hub]\nhold_domains = [\"branch.example\"]\n[hub.routes]\n\"branch.example\" = {{ server = \"[127.0.0.1]:{}\", tls = \"required\"{extra} }}\n",
            branch.relay
        )
    };
    let mut hub = Gateway::start(&route(""));
    send(
        hub.relay,
        "friend@far.example",
        &["alice@branch.example"],
        b"Subject: held\r\n\r\nx\r\n",
    );
    let out = hub.cli(&["flush", "--domain", "branch.example"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("not signed by a trusted CA"),
        "{text}\n{}",
        hub.log()
    );
    assert!(store(&branch).mailbox("alice").unwrap().is_empty());
    assert_eq!(hub.queue().len(), 1, "still held for the branch");

    hub.stop();
    let config = std::fs::read_to_string(&hub.config_path).unwrap();
    let with_ca = route(&format!(
        ", ca_file = \"{}\", tls_name = \"localhost\"",
        branch.path("cert.pem").display()
    ));
    std::fs::write(&hub.config_path, config.replace(&route(""), &with_ca)).unwrap();
    let out = hub.cli(&["flush", "--domain", "branch.example"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_eq!(store(&branch).mailbox("alice").unwrap().len(), 1, "{text}");
    let id = &store(&branch).mailbox("alice").unwrap()[0].uid;
    let body = String::from_utf8_lossy(&store(&branch).body(id).unwrap().unwrap()).to_string();
    assert!(body.contains("with ESMTPS"), "delivered over TLS: {body}");
}

/// A client trusted only by its login releases the domains `[hub.odmr]`
/// gives its account, not any held domain or a tree of subdomains; a client
/// in `hub.etrn_networks` still may release any held domain.
#[test]
fn etrn_after_auth_releases_only_the_accounts_domains() {
    let hub = Gateway::start(
        "[local]\ndomains = [\"hub.example\"]\n[hub]\nhold_domains = [\"branch.example\", \"other.example\"]\netrn_networks = [\"127.0.0.2/32\"]\n[hub.odmr]\nbranch7 = [\"branch.example\"]\n",
    );
    hub.add_user("branch7", "secret7");
    let mut c = Client::connect(hub.relay);
    c.cmd("EHLO branch7.test");
    let r = c.cmd("ETRN branch.example");
    assert!(r.starts_with("459"), "no login, not in etrn_networks: {r}");
    let r = c.cmd(&format!(
        "AUTH PLAIN {}",
        outpost::auth::encode_b64(b"\0branch7\0secret7")
    ));
    assert!(r.starts_with("235"), "{r}");
    for other in ["other.example", "@branch.example", "sub.branch.example"] {
        let r = c.cmd(&format!("ETRN {other}"));
        assert!(
            r.starts_with("459") && r.contains("hub.odmr"),
            "ETRN {other}: {r}"
        );
    }
    let r = c.cmd("ETRN branch.example");
    assert!(r.starts_with("25"), "its own domain: {r}");
    let mut trusted = Client::connect_from(hub.relay, Some("127.0.0.2"));
    trusted.cmd("EHLO relay.test");
    let r = trusted.cmd("ETRN other.example");
    assert!(r.starts_with("25"), "by network: {r}");
    assert!(hub.log().contains("not one of the account's domains"));
}
