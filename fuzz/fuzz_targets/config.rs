//! The configuration: `Config::parse` (TOML, every value checked as it is
//! read, then the cross checks of `validate`) and what the daemon computes
//! from a configuration it accepted.
//!
//! Input: the text of a configuration file. Asserts that
//! - a refused file gets an error whose line number is in the file;
//! - an accepted configuration printed back (`check-config --print`,
//!   `Config::to_toml`) is accepted again and prints the same;
//! - nothing the daemon derives from an accepted configuration panics or
//!   overflows: session deadlines (`now + max_session_time` and the other
//!   durations), the flush schedule's ticks, probe delays, retry back-off,
//!   the flush gate and its next change, hold times, the upstream and hub
//!   routes, recipient routing and alias expansion.
#![no_main]

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use libfuzzer_sys::fuzz_target;
use outpost::config::Config;
use outpost::relay::decide;
use rand::SeedableRng;

/// Every duration of the configuration.
fn durations(c: &Config) -> Vec<Duration> {
    let mut d = vec![
        c.store.keep_history,
        c.smtp.command_timeout,
        c.smtp.data_timeout,
        c.smtp.auth_failure_delay,
        c.smtp.shutdown_grace,
        c.smtp.max_session_time,
        c.smtp.checkpoint_keep,
        c.pop3.idle_timeout,
        c.pop3.auth_failure_delay,
        c.pop3.max_session_time,
        c.auth.failure_window,
        c.auth.block_time,
        c.upstream.connect_timeout,
        c.upstream.command_timeout,
        c.upstream.data_timeout,
        c.upstream.final_timeout,
        c.flush.probe_interval,
        c.retry.base,
        c.retry.max,
        c.retry.max_age,
        c.retry.max_age_absolute,
        c.retry.delay_warning,
        c.hub.max_hold(&c.retry),
    ];
    d.extend(c.flush.interval);
    d
}

fn exercise(c: &Config) {
    let now = Instant::now();
    let wall = SystemTime::now();
    let now_s = 1_800_000_000i64;
    for d in durations(c) {
        // Deadlines and timers: `Instant::now() + d` panics on overflow.
        assert!(now.checked_add(d).is_some(), "{d:?} overflows a deadline");
        assert!(wall.checked_add(d).is_some(), "{d:?} overflows the clock");
        assert!(
            now_s.checked_add(d.as_secs() as i64).is_some() && d.as_secs() <= i64::MAX as u64,
            "{d:?} overflows a Unix time"
        );
    }
    if let Some(i) = c.flush.interval {
        let t = decide::next_tick(i, now_s * 1000);
        assert!(t > now_s * 1000);
    }
    for down in [0, 1, 1800, 3600, 1 << 40] {
        if let Some(p) = decide::probe_delay(c.flush.probe_interval, down) {
            assert!(p >= c.flush.probe_interval);
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for attempts in [0, 1, 2, 10, 31, 1000, u32::MAX] {
        let at = decide::next_attempt(now_s, attempts, c, &mut rng);
        assert!(at > now_s, "retry not in the future");
    }
    for local in [
        "2027-01-01T00:00:00",
        "2027-03-28T02:30:00",
        "2027-06-15T12:59:59",
        "2027-12-31T23:59:59",
    ] {
        let local: chrono::NaiveDateTime = local.parse().expect("date");
        let _ = decide::gate(&c.flush, local, 0);
        let _ = decide::gate(&c.flush, local, i64::MAX);
        if let Some(next) = decide::next_gate_change(&c.flush, local) {
            assert!(next > local, "the gate's next change is not ahead");
        }
    }
    let target = c.upstream.target().expect("validated");
    assert!(!target.host.is_empty());
    for d in &c.hub.hold_domains {
        let _ = outpost::config::parse_server(&c.hub.destination(d).server);
    }
    let mut names: Vec<String> = c.local.aliases.keys().cloned().collect();
    names.extend(c.local.postmaster.clone());
    names.push("postmaster".into());
    for name in &names {
        let _ = outpost::aliases::try_expand_local(c, name);
        for d in c.local.domains.iter().chain(&c.hub.hold_domains).take(3) {
            let _ = outpost::smtp::policy::route_recipient(c, &format!("{name}@{d}"), false);
        }
    }
    let _ = outpost::smtp::policy::route_recipient(c, "", true);
    let _ = outpost::smtp::policy::route_recipient(c, "someone@outside.example", true);
    let _ = c.min_free();
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, Path::new("fuzz.toml")) {
        Ok(c) => {
            exercise(&c);
            let printed = c.to_toml();
            let again = Config::parse(&printed, Path::new("printed.toml"))
                .unwrap_or_else(|e| panic!("printed configuration refused: {e}\n{printed}"));
            assert_eq!(again.to_toml(), printed, "printing is not stable");
        }
        Err(e) => {
            if let Some(line) = e.line {
                assert!(line >= 1 && line <= text.split('\n').count(), "line {line}");
            }
            let _ = e.to_string();
        }
    }
});
