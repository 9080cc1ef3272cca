//! `outpost status`: what is stuck and why, at a glance.

use std::process::ExitCode;

use serde_json::json;

use super::queue::terminal_safe;
use super::{exit, open_store};
use crate::config::Config;
use crate::queue::{
    unix_now, DiskUsage, HeldDomain, LinkStatus, QueueCounts, RecipientState, Store, StoreError,
    Transfer,
};
use crate::relay::decide;

/// Everything `outpost status` shows, read at one moment; the status page
/// (`GET /` on `[metrics]`) shows the same.
pub struct Status {
    pub now: i64,
    pub link: LinkStatus,
    pub counts: QueueCounts,
    pub held: Vec<HeldDomain>,
    /// The last ETRN we sent: when, and what the upstream said.
    pub etrn: (Option<i64>, Option<String>),
    pub disk: DiskUsage,
    pub sent_today: i64,
    pub oldest_age: Option<i64>,
    pub transfers: Vec<Transfer>,
    /// What waits for a window or the budget.
    pub waiting: decide::Waiting,
    pub gate_change: Option<chrono::NaiveDateTime>,
    pub next_flush: Option<i64>,
    /// Blocked clients and accounts under attack, from the daemon (None
    /// when none answers).
    pub logins: Option<crate::guard::Report>,
}

impl Status {
    /// Reads the store (and takes `logins` as the daemon reported them).
    pub fn gather(
        config: &Config,
        store: &Store,
        logins: Option<crate::guard::Report>,
    ) -> Result<Status, StoreError> {
        let now = unix_now();
        let local = chrono::Local::now().naive_local();
        let link = store.link(now)?;
        let counts = store.counts()?;
        let held = store.held_by_domain()?;
        let etrn = store.last_etrn()?;
        let disk = store.disk_usage()?;
        let sent_today = store.sent_on(&local.date().to_string())?;
        let oldest_age = counts.oldest.map(|t| (now - t).max(0));
        let transfers = store.transfers()?;
        // What waits for a window or the budget, as the next flush would
        // see it (reading the whole queue only when windows or a budget
        // are set).
        let flush = &config.flush;
        let gated = !flush.windows.is_empty()
            || !flush.large_message_window.is_empty()
            || flush.daily_byte_budget > 0;
        let waiting = if gated {
            decide::select(
                store.pending_outbound()?,
                &Default::default(),
                now,
                flush.large_message_size as i64,
                &decide::gate(flush, local, sent_today),
            )
            .waiting
        } else {
            decide::Waiting::default()
        };
        let gate_change = decide::next_gate_change(flush, local);
        // The next flush: the schedule's next tick (fixed times, see
        // relay::decide::next_tick), or when deferred mail next comes due,
        // whichever is later.
        let next_timer = flush
            .interval
            .map(|i| decide::next_tick(i, now * 1000).div_euclid(1000));
        let next_flush = match (next_timer, counts.next_due) {
            (Some(t), Some(d)) => Some(t.max(d)),
            (Some(t), None) => Some(t),
            _ => None,
        };
        Ok(Status {
            now,
            link,
            counts,
            held,
            etrn,
            disk,
            sent_today,
            oldest_age,
            transfers,
            waiting,
            gate_change,
            next_flush,
            logins,
        })
    }

    /// `outpost status --json`.
    pub fn to_json(&self, config: &Config, store_path: &std::path::Path) -> serde_json::Value {
        let (link, counts, now) = (&self.link, &self.counts, self.now);
        let (waiting, flush) = (&self.waiting, &config.flush);
        json!({
            "link": {
                "state": link.state.as_str(),
                "since": rfc3339(link.since),
                "last_error": link.last_error,
            },
            "last_flush": link.last_flush_at.map(|at| json!({ "at": rfc3339(at), "result": link.last_flush_result })),
            "counts": { "queued": counts.count(RecipientState::Queued), "deferred": counts.count(RecipientState::Deferred), "held": counts.count(RecipientState::Held) },
            "uncertain": counts.uncertain,
            "oldest_age_seconds": self.oldest_age,
            "next_flush": self.next_flush.map(rfc3339),
            "next_due": counts.next_due.map(rfc3339),
            "last_etrn": self.etrn.0.map(|at| json!({ "at": rfc3339(at), "result": self.etrn.1 })),
            "waiting": {
                "window": waiting.window,
                "large_window": waiting.large_window,
                "budget": waiting.budget,
                "next_change": self.gate_change.map(|t| t.format("%Y-%m-%dT%H:%M").to_string()),
            },
            "budget": (flush.daily_byte_budget > 0).then(|| json!({
                "limit": flush.daily_byte_budget,
                "sent_today": self.sent_today,
            })),
            "transfers": self.transfers.iter().map(|t| {
                let v = TransferView::of(t, now);
                json!({
                    "id": t.message_id,
                    "upstream": t.upstream,
                    "size": t.size,
                    "sent": t.sent,
                    "resumed_at": t.resumed_at,
                    "in_progress": v.in_progress,
                    "bytes_per_second": v.rate,
                    "seconds_left": v.left,
                    "updated_at": rfc3339(t.updated_at),
                })
            }).collect::<Vec<_>>(),
            "held": self.held.iter().map(|h| json!({
                "domain": h.domain,
                "messages": h.messages,
                "last_asked": h.last_asked.map(rfc3339),
            })).collect::<Vec<_>>(),
            "store": {
                "path": store_path.display().to_string(),
                "size_bytes": self.disk.size_bytes,
                "wal_bytes": self.disk.wal_bytes,
                "free_bytes": self.disk.free_bytes,
            },
            // null when no daemon runs (the state is the daemon's).
            "logins": self.logins,
        })
    }
}

pub fn run(config: &Config, as_json: bool) -> ExitCode {
    let store = match open_store(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let status = match Status::gather(config, &store, daemon_logins(config)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("outpost: {e}");
            return ExitCode::from(exit::IOERR);
        }
    };
    if as_json {
        println!("{}", status.to_json(config, store.path()));
        return ExitCode::from(exit::OK);
    }
    let Status {
        now,
        link,
        counts,
        held,
        etrn,
        disk,
        sent_today,
        oldest_age,
        transfers,
        waiting,
        gate_change,
        next_flush,
        logins,
    } = status;
    let flush = &config.flush;
    println!(
        "link:        {} since {} ({} ago)",
        link.state,
        rfc3339(link.since),
        age(now - link.since)
    );
    if let Some(e) = &link.last_error {
        let label = if link.state == crate::queue::LinkState::Closed {
            "closed:     "
        } else {
            "last error: "
        };
        println!("{label} {}", terminal_safe(e));
    }
    if waiting.total() > 0 {
        let mut why = Vec::new();
        for (n, what) in [
            (waiting.window, "flush.windows"),
            (waiting.large_window, "flush.large_message_window"),
            (waiting.budget, "flush.daily_byte_budget"),
        ] {
            if n > 0 {
                why.push(format!("{n} for {what}"));
            }
        }
        println!(
            "waiting:     {}{}",
            why.join(", "),
            gate_change
                .map(|t| format!(" (next change {})", t.format("%Y-%m-%d %H:%M")))
                .unwrap_or_default()
        );
    }
    for t in &transfers {
        println!("{}", terminal_safe(&transfer_line(t, now)));
    }
    if flush.daily_byte_budget > 0 {
        println!(
            "budget:      {sent_today} of {} octets sent today",
            flush.daily_byte_budget
        );
    }
    match link.last_flush_at {
        Some(at) => println!(
            "last flush:  {} ({} ago): {}",
            rfc3339(at),
            age(now - at),
            terminal_safe(link.last_flush_result.as_deref().unwrap_or(""))
        ),
        None => println!("last flush:  never"),
    }
    println!(
        "queue:       {} queued, {} deferred, {} held{}",
        counts.count(RecipientState::Queued),
        counts.count(RecipientState::Deferred),
        counts.count(RecipientState::Held),
        if counts.uncertain > 0 {
            format!(
                " ({} delivery uncertain: see `outpost queue list`)",
                counts.uncertain
            )
        } else {
            String::new()
        }
    );
    match oldest_age {
        Some(a) => println!("oldest:      {}", age(a)),
        None => println!("oldest:      (queue empty)"),
    }
    if let (Some(at), Some(result)) = (etrn.0, &etrn.1) {
        println!(
            "last ETRN:   {} ({} ago): {}",
            rfc3339(at),
            age(now - at),
            terminal_safe(result)
        );
    }
    for h in &held {
        println!(
            "held:        {} messages for {} (last asked {})",
            h.messages,
            terminal_safe(&h.domain),
            h.last_asked
                .map(|t| format!("{} ago", age(now - t)))
                .unwrap_or_else(|| "never".into())
        );
    }
    if let Some(r) = &logins {
        if r.blocked.is_empty() {
            println!("logins:      no client blocked");
        }
        for b in &r.blocked {
            println!(
                "blocked:     {} after {} failed logins (for {} more)",
                terminal_safe(&b.client),
                b.failures,
                age(b.seconds_left as i64)
            );
        }
        for a in &r.accounts_under_attack {
            println!(
                "attacked:    account {}: {} failed logins from several clients",
                terminal_safe(&a.account),
                a.failures
            );
        }
    }
    match next_flush {
        Some(t) if t <= now => println!("next flush:  now (mail is due)"),
        Some(t) => println!("next flush:  {} (in {})", rfc3339(t), age(t - now)),
        None => println!("next flush:  on `outpost flush` only (no flush.interval)"),
    }
    println!(
        "store:       {} {} + {} WAL ({} free inside)",
        store.path().display(),
        bytes(disk.size_bytes),
        bytes(disk.wal_bytes),
        bytes(disk.free_bytes)
    );
    ExitCode::from(exit::OK)
}

/// Clients blocked after failed logins, from the running daemon (None when
/// none runs or it does not answer).
fn daemon_logins(config: &Config) -> Option<crate::guard::Report> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(crate::control::request_logins(&config.control.socket))
        .ok()
        .flatten()
}

/// How a transfer is going, as `status` and `queue show` say it.
pub(super) struct TransferView {
    /// Updated in the last few seconds: still going.
    pub in_progress: bool,
    /// Octets a second over this try.
    pub rate: Option<i64>,
    /// Seconds left at that rate.
    pub left: Option<i64>,
}

impl TransferView {
    pub(super) fn of(t: &crate::queue::Transfer, now: i64) -> TransferView {
        let secs = t.updated_at - t.started_at;
        let rate = (secs > 0 && t.sent > t.resumed_at).then(|| (t.sent - t.resumed_at) / secs);
        TransferView {
            in_progress: now - t.updated_at <= 10,
            rate,
            left: rate
                .filter(|&r| r > 0)
                .map(|r| (t.size - t.sent).max(0) / r),
        }
    }
}

/// One line about a big message on its way, or cut on its way.
pub fn transfer_line(t: &crate::queue::Transfer, now: i64) -> String {
    let v = TransferView::of(t, now);
    let pct = if t.size > 0 { t.sent * 100 / t.size } else { 0 };
    let done = format!("{} of {} ({pct} %)", octets(t.sent), octets(t.size));
    if v.in_progress {
        format!(
            "sending:     {} to {}: {done}{}{}",
            t.message_id,
            t.upstream,
            v.rate
                .map(|r| format!(", {}/s", octets(r)))
                .unwrap_or_default(),
            v.left
                .map(|l| format!(", about {} left", age(l)))
                .unwrap_or_default()
        )
    } else {
        format!(
            "cut:         {} to {} at {done}, {} ago; the next flush goes on from what the upstream kept",
            t.message_id,
            t.upstream,
            age(now - t.updated_at)
        )
    }
}

fn octets(n: i64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.0} KiB", n as f64 / (1 << 10) as f64),
        n => format!("{n} octets"),
    }
}

pub fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// Bytes for people: "512 B", "3.4 KiB", "12.0 MiB", "1.2 GiB".
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

pub fn age(secs: i64) -> String {
    let s = secs.max(0);
    let (d, h, m) = (s / 86400, s % 86400 / 3600, s % 3600 / 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m")
    } else {
        format!("{s}s")
    }
}
