//! The flush under the conditions an office lives in: steady traffic, a
//! slow upstream, a stop in the middle, mail that can never go, and an
//! administrator at work while a flush runs. The real binary against the
//! scripted fake upstream (tests/common/fake.rs).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::fake::{self, Script};
use common::{json_out, queued_id, wait_for, Client, Gateway};

fn upstream(port: u16) -> String {
    format!("[upstream]\nserver = \"[127.0.0.1]:{port}\"\ntls = \"none\"\n")
}

fn send(g: &Gateway, from: &str, to: &[&str], body: &[u8]) -> String {
    let mut c = Client::connect(g.relay);
    c.cmd("EHLO client.test");
    let r = c.send_mail(from, to, body);
    queued_id(&r).unwrap_or_else(|| panic!("not queued: {r}"))
}

/// The `Subject:` of each message the fake took, in order.
fn subjects(bodies: &[Vec<u8>]) -> Vec<String> {
    bodies
        .iter()
        .map(|b| {
            let text = String::from_utf8_lossy(b);
            text.lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

#[test]
fn the_schedule_runs_while_mail_keeps_arriving() {
    let (port, seen) = fake::start(Script::default());
    let g = Gateway::start(&format!(
        "{}[flush]\ninterval = \"2s\"\non_submit = false\n",
        upstream(port)
    ));
    // One message a second, for twelve seconds, from another thread.
    let sent = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let client = {
        let (sent, done, relay) = (sent.clone(), done.clone(), g.relay);
        std::thread::spawn(move || {
            for i in 0..12 {
                let mut c = Client::connect(relay);
                c.cmd("EHLO client.test");
                let r = c.send_mail(
                    "s@client.test",
                    &["x@far.example"],
                    format!("Subject: steady {i}\r\n\r\nx\r\n").as_bytes(),
                );
                assert!(queued_id(&r).is_some(), "{r}");
                sent.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_secs(1));
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    // Each accepted message used to push the timer back: nothing went
    // until the traffic stopped.
    wait_for(
        "a scheduled flush during the traffic",
        Duration::from_secs(10),
        || seen.messages.load(Ordering::SeqCst) > 0,
    );
    assert!(
        !done.load(Ordering::SeqCst),
        "the first delivery came only after the traffic stopped ({} sent)",
        sent.load(Ordering::SeqCst)
    );
    client.join().unwrap();
    wait_for("every message delivered", Duration::from_secs(10), || {
        seen.messages.load(Ordering::SeqCst) == 12
    });
    let mut s = subjects(&seen.bodies());
    s.sort();
    s.dedup();
    assert_eq!(s.len(), 12, "each once");
    // The next flush is on the schedule's fixed ticks.
    let status = json_out(&g.cli(&["status", "--json"]));
    let next = status["next_flush"].as_str().expect("a next flush");
    let t = chrono::DateTime::parse_from_rfc3339(next)
        .unwrap()
        .timestamp();
    assert_eq!(t % 2, 0, "{next} is not on a 2 s tick");
}

#[test]
fn a_slow_upstream_takes_a_big_message_and_small_mail_goes_first() {
    // 20 KiB/s: the 200 KiB message takes about ten seconds, five times the
    // no-progress timeout.
    let (port, seen) = fake::start(Script {
        read_rate: Some(20 << 10),
        ..Default::default()
    });
    let g = Gateway::start(&format!(
        "{}data_timeout = \"2s\"\n[flush]\nlarge_message_size = 102400\n",
        upstream(port)
    ));
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    while big.len() < 200 << 10 {
        big.extend_from_slice(&[b'b'; 76]);
        big.extend_from_slice(b"\r\n");
    }
    let big_id = send(&g, "s@client.test", &["x@far.example"], &big);
    let small_id = send(
        &g,
        "s@client.test",
        &["y@far.example"],
        b"Subject: small\r\n\r\nsmall\r\n",
    );
    let stored = (g.body(&big_id), g.body(&small_id));
    let out = g.cli(&["flush", "--json"]);
    let j = json_out(&out);
    assert_eq!(out.status.code(), Some(0), "{j}");
    assert_eq!(j["summary"]["delivered"], 2, "{j}");
    assert_eq!(
        j["summary"]["link"], "up",
        "a slow message is not a dead link: {j}"
    );
    let bodies = seen.bodies();
    assert_eq!(subjects(&bodies), vec!["small", "big"], "small mail first");
    assert_eq!(bodies[0], stored.1);
    assert!(bodies[1] == stored.0, "the big message arrived byte-exact");
    assert!(g.queue().is_empty());
}

#[test]
fn a_stop_in_the_middle_of_a_flush_sends_each_message_once() {
    // The upstream answers each message after 150 ms; a stop comes when a
    // few have gone, with a grace period shorter than the whole flush.
    let (port, seen) = fake::start(Script {
        reply_delay: Duration::from_millis(150),
        ..Default::default()
    });
    let mut g = Gateway::start(&format!(
        "{}[smtp]\nshutdown_grace = \"2s\"\n",
        upstream(port)
    ));
    for i in 0..40 {
        send(
            &g,
            "s@client.test",
            &["x@far.example"],
            format!("Subject: m{i}\r\n\r\nx\r\n").as_bytes(),
        );
    }
    let mut flush = std::process::Command::new(common::BIN)
        .args(["flush", "--json", "--config"])
        .arg(&g.config_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("a few messages sent", Duration::from_secs(20), || {
        seen.bodies().len() >= 5
    });
    g.stop();
    let _ = flush.kill();
    let _ = flush.wait();
    let before = seen.bodies().len();
    assert!(before < 40, "the stop came too late to test anything");
    assert!(
        g.log().contains("stopped"),
        "the daemon did not stop cleanly:\n{}",
        g.log()
    );
    // What went out is recorded: the next flush sends only the rest.
    g.spawn();
    let out = g.cli(&["flush", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        json_out(&out)["summary"]["delivered"].as_u64().unwrap() as usize,
        40 - before
    );
    let mut s = subjects(&seen.bodies());
    assert_eq!(s.len(), 40, "nothing sent twice, nothing lost: {s:?}");
    s.sort();
    s.dedup();
    assert_eq!(s.len(), 40);
    assert!(g.queue().is_empty());
}

#[test]
fn held_mail_expires_after_hub_max_hold_with_a_notice() {
    let (port, seen) = fake::start(Script::default());
    let g = Gateway::start(&format!(
        "{}[hub]\nhold_domains = [\"other.example\"]\nmax_hold = \"1s\"\n",
        upstream(port)
    ));
    let id = send(
        &g,
        "s@client.test",
        &["x@other.example"],
        b"Subject: for the other branch\r\n\r\nx\r\n",
    );
    assert_eq!(g.queue()[0]["recipients"][0]["state"], "held");
    // Each flush ages the queue; once max_hold has passed the message
    // expires and its sender's notice goes out on a later flush.
    wait_for("the expiry notice sent", Duration::from_secs(15), || {
        g.cli(&["flush"]);
        seen.messages.load(Ordering::SeqCst) > 0
    });
    let notice = String::from_utf8_lossy(&seen.bodies()[0]).to_string();
    assert!(notice.contains("hub.max_hold"), "{notice}");
    assert!(notice.contains(&id), "{notice}");
    assert!(notice.contains("Action: failed"), "{notice}");
    assert!(g.queue().is_empty(), "{:?}", g.queue());
}

#[test]
fn a_local_recipient_without_a_mailbox_is_returned_not_kept() {
    let (port, seen) = fake::start(Script::default());
    // No account and no local.postmaster: postmaster is accepted (it must
    // be) but there is nowhere to put it.
    let g = Gateway::start(&upstream(port));
    send(
        &g,
        "s@client.test",
        &["postmaster@branch.example"],
        b"Subject: hello postmaster\r\n\r\nx\r\n",
    );
    assert_eq!(g.queue().len(), 1);
    wait_for("the notice sent", Duration::from_secs(15), || {
        g.cli(&["flush"]);
        seen.messages.load(Ordering::SeqCst) > 0
    });
    let notice = String::from_utf8_lossy(&seen.bodies()[0]).to_string();
    assert!(notice.contains("no mailbox for postmaster"), "{notice}");
    assert!(notice.contains("5.1.1"), "{notice}");
    assert!(g.queue().is_empty(), "{:?}", g.queue());
}

#[test]
fn queue_hold_during_a_flush_waits_for_it_and_never_contradicts_it() {
    let (port, seen) = fake::start(Script {
        reply_delay: Duration::from_millis(150),
        ..Default::default()
    });
    let g = Gateway::start(&upstream(port));
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(send(
            &g,
            "s@client.test",
            &["x@far.example"],
            format!("Subject: h{i}\r\n\r\nx\r\n").as_bytes(),
        ));
    }
    let mut flush = std::process::Command::new(common::BIN)
        .args(["flush", "--json", "--config"])
        .arg(&g.config_path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the flush under way", Duration::from_secs(20), || {
        seen.bodies().len() >= 3
    });
    let hold = g.cli(&["queue", "hold", "--all"]);
    assert!(hold.status.success());
    assert!(
        String::from_utf8_lossy(&hold.stderr).contains("waiting for it to end"),
        "{}",
        String::from_utf8_lossy(&hold.stderr)
    );
    let flushed = flush.wait().unwrap();
    assert!(flushed.success());
    // Every message is either taken by the upstream or held here, never
    // both, never neither.
    let taken = subjects(&seen.bodies());
    let held: Vec<String> = g
        .queue()
        .iter()
        .filter(|m| m["recipients"][0]["state"] == "held")
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(taken.len() + held.len(), 20, "{taken:?} {held:?}");
    let mut unique = taken.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), taken.len());
}

#[test]
fn the_link_coming_back_is_noticed_and_flushed_at_once() {
    let port = common::free_port(); // nothing listens yet: the link is down
    let g = Gateway::start(&format!(
        "{}[flush]\nprobe_interval = \"1s\"\n",
        upstream(port)
    ));
    send(
        &g,
        "s@client.test",
        &["x@far.example"],
        b"Subject: waiting\r\n\r\nx\r\n",
    );
    let out = g.cli(&["flush"]);
    assert_eq!(out.status.code(), Some(75), "the link is down");
    // No schedule, no on_submit: only the probe can notice the link.
    let (_, seen) = fake::start_on(port, Script::default());
    wait_for(
        "the flush after the link came back",
        Duration::from_secs(15),
        || seen.messages.load(Ordering::SeqCst) == 1,
    );
    assert!(
        g.log().contains("the upstream answers again"),
        "{}",
        g.log()
    );
    wait_for("the queue to empty", Duration::from_secs(5), || {
        g.queue().is_empty()
    });
}

#[test]
fn the_network_hook_scripts_flush_when_an_interface_comes_up() {
    let (port, seen) = fake::start(Script::default());
    let g = Gateway::start(&upstream(port));
    let bin_dir = std::path::Path::new(common::BIN).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    let hook = |script: &str, args: &[&str]| {
        let st = std::process::Command::new("sh")
            .arg(format!("{}/packaging/{script}", env!("CARGO_MANIFEST_DIR")))
            .args(args)
            .env("PATH", &path)
            .env("OUTPOST_CONFIG", &g.config_path)
            .status()
            .unwrap();
        assert!(st.success(), "{script} {args:?}: {st}");
    };
    for (n, (script, args)) in [
        ("nm-dispatcher", &["eth0", "up"][..]),
        ("networkd-dispatcher", &[][..]),
    ]
    .into_iter()
    .enumerate()
    {
        send(
            &g,
            "s@client.test",
            &["x@far.example"],
            format!("Subject: hook {n}\r\n\r\nx\r\n").as_bytes(),
        );
        hook(script, args);
        wait_for(script, Duration::from_secs(15), || {
            seen.messages.load(Ordering::SeqCst) == n + 1
        });
    }
}

#[test]
fn with_several_connections_a_large_message_gets_its_own() {
    let (port, seen) = fake::start(Script {
        read_rate: Some(100 << 10),
        ..Default::default()
    });
    let g = Gateway::start(&format!(
        "{}connections = 2\n[flush]\nlarge_message_size = 102400\n",
        upstream(port)
    ));
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    while big.len() < 300 << 10 {
        big.extend_from_slice(&[b'b'; 76]);
        big.extend_from_slice(b"\r\n");
    }
    send(&g, "big@client.test", &["x@far.example"], &big);
    for i in 0..8 {
        send(
            &g,
            &format!("small{i}@client.test"),
            &["y@far.example"],
            b"Subject: small\r\n\r\nsmall\r\n",
        );
    }
    let out = g.cli(&["flush", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json_out(&out)["summary"]["delivered"], 9);
    // The big one started at once, on its own connection, beside the
    // small ones (not after them all); the small ones were all taken
    // before it ended.
    let mails = seen.mails.lock().unwrap().clone();
    let at = mails.iter().position(|m| m.contains("big@")).unwrap();
    assert!(at < 2, "{mails:?}");
    assert_eq!(
        subjects(&seen.bodies()).last().map(String::as_str),
        Some("big")
    );
}

/// A one-hour window that does not contain the present local time.
fn a_closed_window() -> String {
    use chrono::Timelike;
    let h = chrono::Local::now().hour();
    format!("{:02}:00-{:02}:00", (h + 2) % 24, (h + 3) % 24)
}

#[test]
fn outside_its_window_the_link_is_closed_and_mail_does_not_age() {
    let (port, seen) = fake::start(Script::default());
    let mut g = Gateway::start(&format!(
        "{}[flush]\nwindows = [\"{}\"]\nprobe_interval = \"0s\"\n[retry]\nmax_age = \"1m\"\nmax_age_absolute = \"1d\"\ndelay_warning = \"0s\"\n",
        upstream(port),
        a_closed_window()
    ));
    // The link was up once (a flush by hand, --all, ignores the window).
    send(
        &g,
        "s@client.test",
        &["x@far.example"],
        b"Subject: first\r\n\r\nx\r\n",
    );
    let out = g.cli(&["flush", "--all", "--json"]);
    assert_eq!(
        json_out(&out)["summary"]["delivered"],
        1,
        "{}",
        json_out(&out)
    );
    // Then, outside the window, nothing goes.
    send(
        &g,
        "s@client.test",
        &["x@far.example"],
        b"Subject: second\r\n\r\nx\r\n",
    );
    let out = g.cli(&["flush", "--json"]);
    let v = json_out(&out);
    assert_eq!(out.status.code(), Some(75), "{v}");
    assert_eq!(v["summary"]["link"], "closed", "{v}");
    assert_eq!(v["summary"]["waiting"]["window"], 1, "{v}");
    let status = json_out(&g.cli(&["status", "--json"]));
    assert_eq!(status["link"]["state"], "closed", "{status}");
    assert!(status["link"]["last_error"]
        .as_str()
        .unwrap()
        .contains("outside flush.windows"));
    assert_eq!(status["waiting"]["window"], 1, "{status}");
    assert!(status["waiting"]["next_change"].is_string(), "{status}");
    assert_eq!(seen.messages.load(Ordering::SeqCst), 1);
    // Two minutes later (max_age is one): still waiting, not expired,
    // because a closed link's clock stands still.
    g.stop();
    let (code, v) = g.flush_later("+2m");
    assert_eq!(code, 75, "{v}");
    assert_eq!(v["summary"]["expired"], 0, "{v}");
    assert_eq!(g.queue().len(), 1);
    let (code, v) = g.flush_later("+3m");
    assert_eq!(
        (code, &v["summary"]["delivered"]),
        (75, &serde_json::json!(0)),
        "{v}"
    );
    // --all sends it anyway.
    let out = g.cli(&["flush", "--all", "--json"]);
    assert_eq!(json_out(&out)["summary"]["delivered"], 1);
    assert_eq!(seen.messages.load(Ordering::SeqCst), 2);
}

#[test]
fn a_daily_byte_budget_holds_the_rest_for_tomorrow() {
    let (port, seen) = fake::start(Script::default());
    let g = Gateway::start(&format!(
        "{}[flush]\ndaily_byte_budget = 3000\nprobe_interval = \"0s\"\n",
        upstream(port)
    ));
    let body = |i: usize| {
        let mut b = format!("Subject: budget {i}\r\n\r\n").into_bytes();
        b.extend(std::iter::repeat_n(b'x', 1100));
        b.extend_from_slice(b"\r\n");
        b
    };
    for i in 0..3 {
        send(&g, "s@client.test", &["x@far.example"], &body(i));
    }
    let out = g.cli(&["flush", "--json"]);
    let v = json_out(&out);
    assert_eq!(v["summary"]["delivered"], 2, "{v}");
    assert_eq!(v["summary"]["waiting"]["budget"], 1, "{v}");
    assert_eq!(seen.messages.load(Ordering::SeqCst), 2);
    let status = json_out(&g.cli(&["status", "--json"]));
    let sent = status["budget"]["sent_today"].as_i64().unwrap();
    assert!((2400..=3000).contains(&sent), "{status}");
    assert_eq!(status["waiting"]["budget"], 1, "{status}");
    // The next flush sends nothing and says why.
    let out = g.cli(&["flush", "--json"]);
    let v = json_out(&out);
    assert_eq!(out.status.code(), Some(75), "{v}");
    assert_eq!(v["summary"]["link"], "closed");
    assert!(
        json_out(&g.cli(&["status", "--json"]))["link"]["last_error"]
            .as_str()
            .unwrap()
            .contains("daily_byte_budget spent"),
    );
    assert_eq!(seen.messages.load(Ordering::SeqCst), 2);
    assert_eq!(g.queue().len(), 1, "it waits, it is not bounced");
}
