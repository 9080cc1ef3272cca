//! ETRN with real peers on loopback high ports: a private Postfix instance
//! as the hub that holds a branch's mail (outpost is the branch and sends
//! ETRN), and fetchmail's ETRN mode as the client of an outpost hub.
//!
//! `tests/run.sh` installs postfix (preseeded "No configuration": nothing
//! listens on port 25), swaks and fetchmail. Every process a test starts is
//! stopped by PID (a Drop guard), every wait has a deadline, and each test
//! ends by checking that nothing listens on port 25.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::peers::*;
use common::*;

// ---------------------------------------------------------------------------
// outpost helpers

fn store(g: &Gateway) -> outpost::queue::Store {
    outpost::queue::Store::open(&g.path("queue.sqlite")).unwrap()
}

/// alice's mailbox at `g`: the stored bodies, oldest first.
fn alice_mail(g: &Gateway) -> Vec<Vec<u8>> {
    let s = store(g);
    s.mailbox("alice")
        .unwrap()
        .iter()
        .map(|m| s.body(&m.uid).unwrap().expect("body stored"))
        .collect()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn send(port: u16, from: &str, to: &[&str], data: &[u8]) -> String {
    let mut c = Client::connect(port);
    let r = c.cmd("EHLO client.test");
    assert!(r.starts_with("250"), "EHLO: {r}");
    let r = c.send_mail(from, to, data);
    let id = queued_id(&r).unwrap_or_else(|| panic!("not queued: {r}"));
    c.cmd("QUIT");
    id
}

// ---------------------------------------------------------------------------
// 1. Postfix is the hub, outpost the branch

#[test]
fn postfix_hub_releases_held_mail_to_an_outpost_branch_on_etrn() {
    // The branch first: Postfix's transport points at its relay listener.
    let hub_port = free_port();
    let mut branch = Gateway::configure(&format!(
        "[upstream]\nserver = \"[127.0.0.1]:{hub_port}\"\ntls = \"none\"\n[flush]\netrn = [\"branch.example\"]\n"
    ));
    branch.spawn();
    branch.add_user("alice", "pw");

    // peers.md 3b: relay for branch.example, held (defer_transports) until ETRN.
    let mut pf = Postfix::new(hub_port);
    pf.postconf(&[
        "relay_domains = branch.example",
        "fast_flush_domains = $relay_domains",
        &format!(
            "transport_maps = inline:{{ branch.example=etrnhold:[127.0.0.1]:{} }}",
            branch.relay
        ),
        "defer_transports = etrnhold",
        "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
    ]);
    pf.start();

    let subject = "held by postfix for alice";
    let r = run(
        "swaks",
        Command::new("swaks")
            .args(["-s", "127.0.0.1", "-p", &hub_port.to_string()])
            .args(["-f", "friend@far.example", "-t", "alice@branch.example"])
            .args(["--h-Subject", subject, "--body", "kept at the hub"])
            .args(["--timeout", "20"]),
        Duration::from_secs(40),
    );
    assert_eq!(r.code, Some(0), "swaks to Postfix: {r}");
    assert!(r.stdout.contains("queued as"), "{r}");

    // Held: deferred by transport, no delivery attempt, nothing at the branch.
    wait_for(
        "Postfix to hold the message (deferred transport)",
        Duration::from_secs(20),
        || {
            let q = pf.queue();
            q.contains("deferred transport") && q.contains("alice@branch.example")
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        alice_mail(&branch).is_empty(),
        "nothing delivered before ETRN"
    );
    assert!(pf.queue().contains("deferred transport"), "{}", pf.queue());

    // The branch asks: ETRN only, nothing sent.
    let out = branch.cli(&["flush", "--etrn-only", "--json"]);
    let v = json_out(&out);
    assert_eq!(out.status.code(), Some(0), "{v:#}\n{}", pf.maillog());
    let etrn = v["summary"]["etrn"].as_array().expect("summary.etrn");
    assert_eq!(etrn.len(), 1, "{v:#}");
    assert_eq!(etrn[0]["name"], "branch.example", "{v:#}");
    let reply = etrn[0]["reply"].as_str().unwrap_or("");
    assert!(
        reply.starts_with("250"),
        "Postfix answers ETRN with 250 Queuing started: {v:#}\n{}",
        pf.maillog()
    );
    assert!(reply.contains("Queuing started"), "{v:#}");

    // Postfix delivers the held message to the branch: alice's mailbox.
    wait_for(
        "the held message in alice's mailbox",
        Duration::from_secs(60),
        || !alice_mail(&branch).is_empty(),
    );
    let got = alice_mail(&branch);
    assert_eq!(got.len(), 1, "exactly one message");
    assert!(
        contains(&got[0], &format!("Subject: {subject}")),
        "{}",
        String::from_utf8_lossy(&got[0])
    );
    assert!(contains(&got[0], "kept at the hub"));
    wait_for("Postfix's queue to drain", Duration::from_secs(30), || {
        pf.queue().contains("Mail queue is empty")
    });
    assert!(
        pf.maillog().contains("status=sent"),
        "Postfix logged the delivery:\n{}",
        pf.maillog()
    );

    let status = branch.cli(&["status"]);
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(
        status.contains("last ETRN:") && status.contains("branch.example: 250"),
        "{status}"
    );

    drop(pf);
    drop(branch);
    assert_nothing_on_port_25();
}

// ---------------------------------------------------------------------------
// 2. fetchmail's ETRN mode is the client of an outpost hub

/// `fetchmail -v -p ETRN` against 127.0.0.1:port for `domain`, with its
/// own FETCHMAILHOME (no ~/.fetchmailrc, no shared lock). `-v` adds the
/// dialogue ("ETRN< reply") to what fetchmail prints anyway.
fn fetchmail_etrn(home: &Path, port: u16, domain: &str) -> Ran {
    run(
        "fetchmail",
        Command::new("fetchmail")
            .env("FETCHMAILHOME", home)
            .args(["-v", "--nosyslog", "-t", "20", "-p", "ETRN", "-P"])
            .arg(port.to_string())
            .args(["--fetchdomains", domain, "127.0.0.1"]),
        Duration::from_secs(60),
    )
}

#[test]
fn fetchmail_etrn_releases_an_outpost_hubs_held_mail() {
    // The branch: a second outpost, alice's mailbox.
    let branch = Gateway::start("");
    branch.add_user("alice", "pw");
    let hub = Gateway::start(&format!(
        "[local]\ndomains = [\"hub.example\"]\n[hub]\nhold_domains = [\"branch.example\"]\n[hub.routes]\n\"branch.example\" = \"[127.0.0.1]:{}\"\n",
        branch.relay
    ));
    let subject = "held by outpost for alice";
    send(
        hub.relay,
        "friend@far.example",
        &["alice@branch.example"],
        format!("Subject: {subject}\r\n\r\nwaiting for ETRN\r\n").as_bytes(),
    );
    let q = hub.queue();
    assert_eq!(q.len(), 1, "{q:#?}");
    assert_eq!(q[0]["recipients"][0]["state"], "held", "{q:#?}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(alice_mail(&branch).is_empty(), "held until ETRN");

    let home = tempfile::tempdir().unwrap();

    // 253: fetchmail says "Pending messages for D started" and exits 0.
    let r = fetchmail_etrn(home.path(), hub.relay, "branch.example");
    assert_eq!(r.code, Some(0), "fetchmail: {r}\n{}", hub.log());
    assert!(
        r.all()
            .contains("Pending messages for branch.example started"),
        "fetchmail's text for 253: {r}"
    );
    assert!(
        r.all()
            .contains("ETRN< 253 2.0.0 OK, 1 pending messages for node branch.example started"),
        "the hub's reply: {r}"
    );

    // The hub delivers to the branch; its queue empties.
    wait_for(
        "the held message in alice's mailbox",
        Duration::from_secs(60),
        || !alice_mail(&branch).is_empty(),
    );
    let got = alice_mail(&branch);
    assert_eq!(got.len(), 1);
    assert!(
        contains(&got[0], &format!("Subject: {subject}")),
        "{}",
        String::from_utf8_lossy(&got[0])
    );
    assert!(contains(&got[0], "waiting for ETRN"));
    wait_for("the hub's queue to drain", Duration::from_secs(30), || {
        hub.queue().is_empty()
    });

    // Asked again, nothing waits: 251, "No messages waiting for D", exit 0.
    let r = fetchmail_etrn(home.path(), hub.relay, "branch.example");
    assert_eq!(r.code, Some(0), "fetchmail: {r}");
    assert!(
        r.all().contains("No messages waiting for branch.example"),
        "fetchmail's text for 251: {r}"
    );
    assert!(
        r.all()
            .contains("ETRN< 251 2.0.0 OK, no messages waiting for node branch.example"),
        "the hub's reply: {r}"
    );
    assert_eq!(alice_mail(&branch).len(), 1, "nothing delivered twice");

    // A domain this hub does not hold: 459; fetchmail reports it and fails
    // (exit 3, PS_AUTHFAIL).
    let r = fetchmail_etrn(home.path(), hub.relay, "elsewhere.example");
    assert_eq!(r.code, Some(3), "fetchmail: {r}");
    assert!(
        r.stderr.contains("Node elsewhere.example not allowed: 459"),
        "fetchmail reports the 459: {r}"
    );
    assert!(
        r.all().contains(
            "ETRN< 459 4.7.1 Node elsewhere.example not allowed: no mail is held here for it"
        ),
        "the hub's reply: {r}"
    );

    drop(hub);
    drop(branch);
    assert_nothing_on_port_25();
}
