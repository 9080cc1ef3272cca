//! What the daemon counts as it happens, and the Prometheus text
//! exposition of those counters together with the gauges read from the
//! store at scrape time.
//!
//! A leaf: sessions (through `Shared`), the flusher and the server count
//! into one [`Metrics`]; `web` serves it. Counters live as long as the
//! process (Prometheus' `rate()` copes with the restart); every label set
//! is bounded: reasons and outcomes are fixed words, listeners come from
//! the configuration, domains are cut to the [`TOP_DOMAINS`] largest plus
//! `other`. Names and meanings are in docs/OPERATIONS.md.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

/// Domains shown by name in `outpost_queue_domain_recipients`; the rest
/// are summed as `other`.
pub const TOP_DOMAINS: usize = 20;

/// The content type of what [`Metrics::render`] returns.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// The daemon's event counters; cheap to clone (clones count together).
/// `Metrics::default()` counts for nobody in particular (the command
/// line's in-process flush, tests).
#[derive(Clone, Debug)]
pub struct Metrics {
    flushes: Family<Labels1, Counter>,
    attempts: Family<Labels1, Counter>,
    accepted: Counter,
    refused: Family<Labels2, Counter>,
    sent_bytes: Counter,
    resumed_bytes: Counter,
    sessions: Family<Vec<(&'static str, String)>, Counter>,
    sessions_refused: Family<Labels1, Counter>,
    auth_failures: Counter,
}

/// The outcome of one delivery attempt, per recipient.
pub const OUTCOMES: [&str; 4] = ["delivered", "deferred", "bounced", "uncertain"];
/// How a flush ended.
pub const FLUSH_RESULTS: [&str; 4] = ["ok", "link_down", "closed", "error"];

impl Default for Metrics {
    /// Flush results and attempt outcomes are shown at 0 from the start,
    /// so that `rate()` and alerts see them before the first event.
    fn default() -> Metrics {
        let m = Metrics {
            flushes: Family::default(),
            attempts: Family::default(),
            accepted: Counter::default(),
            refused: Family::default(),
            sent_bytes: Counter::default(),
            resumed_bytes: Counter::default(),
            sessions: Family::default(),
            sessions_refused: Family::default(),
            auth_failures: Counter::default(),
        };
        for r in FLUSH_RESULTS {
            let _ = m.flushes.get_or_create(&[("result", r)]);
        }
        for o in OUTCOMES {
            let _ = m.attempts.get_or_create(&[("outcome", o)]);
        }
        m
    }
}

impl Metrics {
    /// A flush ended: `ok`, `link_down`, `closed` or `error`.
    pub fn flush(&self, result: &'static str) {
        self.flushes.get_or_create(&[("result", result)]).inc();
    }

    /// Recipients of one attempt, by outcome (one of [`OUTCOMES`]).
    pub fn attempts(&self, outcome: &'static str, n: usize) {
        if n > 0 {
            self.attempts
                .get_or_create(&[("outcome", outcome)])
                .inc_by(n as u64);
        }
    }

    /// A message was committed and answered 250.
    pub fn accepted(&self) {
        self.accepted.inc();
    }

    /// A transaction or recipient refused at `stage` (`mail`, `rcpt`,
    /// `data`) with a reply whose enhanced status code is `status`.
    pub fn refused(&self, stage: &'static str, status: &'static str) {
        self.refused
            .get_or_create(&[("stage", stage), ("reason", reason(status))])
            .inc();
    }

    /// Octets of messages the upstream took or answered (as
    /// `flush.daily_byte_budget` counts them).
    pub fn sent_upstream(&self, bytes: i64) {
        self.sent_bytes.inc_by(bytes.max(0) as u64);
    }

    /// Octets not sent again because the upstream kept them (CHECKPOINT).
    pub fn resumed(&self, bytes: u64) {
        self.resumed_bytes.inc_by(bytes);
    }

    /// A session started on `listener` (its address, or `local` for the
    /// submission socket) in `mode`.
    pub fn session(&self, listener: String, mode: String) {
        self.sessions
            .get_or_create(&vec![("listener", listener), ("mode", mode)])
            .inc();
    }

    /// A connection got no session slot: `busy` (smtp.max_connections) or
    /// `per_client` (smtp.max_connections_per_client).
    pub fn session_refused(&self, why: &'static str) {
        self.sessions_refused.get_or_create(&[("why", why)]).inc();
    }

    /// A failed login (SMTP AUTH or POP3), wherever it happened.
    pub fn auth_failed(&self) {
        self.auth_failures.inc();
    }

    /// Every counter and `gauges`, in the Prometheus text format.
    pub fn render(&self, g: &Gauges) -> String {
        let mut r = Registry::with_prefix("outpost");
        self.register_counters(&mut r);
        register_gauges(&mut r, g);
        let mut out = String::new();
        // Writing into a String does not fail.
        let _ = prometheus_text::encode(&mut out, &r);
        out
    }

    fn register_counters(&self, r: &mut Registry) {
        r.register(
            "flushes",
            "Flushes that ended, by result (ok, link_down, closed, error)",
            self.flushes.clone(),
        );
        r.register(
            "delivery_attempts",
            "Recipients tried at the upstream or a branch, by outcome",
            self.attempts.clone(),
        );
        r.register(
            "messages_accepted",
            "Messages committed to the queue and answered 250",
            self.accepted.clone(),
        );
        r.register(
            "smtp_refused",
            "Transactions and recipients refused, by stage (mail, rcpt, data) and reason",
            self.refused.clone(),
        );
        r.register_with_unit(
            "upstream_sent",
            "Octets of messages sent to the upstream",
            Unit::Bytes,
            self.sent_bytes.clone(),
        );
        r.register_with_unit(
            "checkpoint_resumed",
            "Octets not sent again because the upstream kept them (CHECKPOINT, RFC 1845)",
            Unit::Bytes,
            self.resumed_bytes.clone(),
        );
        r.register(
            "sessions",
            "Sessions started, by listener and mode",
            self.sessions.clone(),
        );
        r.register(
            "sessions_refused",
            "Connections refused for want of a session slot",
            self.sessions_refused.clone(),
        );
        r.register(
            "auth_failures",
            "Failed logins (SMTP AUTH, POP3)",
            self.auth_failures.clone(),
        );
    }
}

/// A readable reason for an enhanced status code (RFC 3463) of a refusal;
/// the set is fixed, so the label stays bounded.
pub fn reason(status: &str) -> &'static str {
    match status {
        "5.7.1" => "relay_denied",
        "5.1.1" => "unknown_user",
        "5.1.3" | "5.1.7" | "5.6.7" => "bad_address",
        "4.2.2" => "mailbox_full",
        "4.5.3" => "too_many_recipients",
        "5.3.4" => "too_big",
        "5.4.6" => "loop",
        "5.5.2" => "bare_line_end",
        "5.6.0" => "bad_content",
        "4.3.1" => "storage_full",
        "4.3.0" => "store_error",
        "5.7.0" | "5.7.11" => "auth_required",
        _ => "other",
    }
}

/// What the store says at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Pending recipients by state (queued, deferred, held).
    pub by_state: Vec<(&'static str, i64)>,
    /// Pending recipients by destination domain, largest first, at most
    /// [`TOP_DOMAINS`] and then `other`.
    pub by_domain: Vec<(String, i64)>,
    /// Recipients whose delivery is uncertain (RFC 1047).
    pub uncertain: i64,
    /// Age of the oldest pending message; 0 when the queue is empty.
    pub oldest_age_seconds: i64,
    /// up, down, closed or unknown.
    pub link_state: &'static str,
    pub link_state_seconds: i64,
    pub last_flush_at: Option<i64>,
    pub store_bytes: u64,
    pub wal_bytes: u64,
    pub free_inside_bytes: u64,
    /// Free space on the store's file system, when it can be read.
    pub filesystem_free_bytes: Option<u64>,
    /// flush.daily_byte_budget (0: none) and what went today.
    pub budget_bytes: u64,
    pub sent_today_bytes: i64,
}

/// The link states, in the order they are exposed.
pub const LINK_STATES: [&str; 4] = ["up", "down", "closed", "unknown"];

fn gauge(v: i64) -> Gauge {
    let g = Gauge::default();
    g.set(v);
    g
}

fn register_gauges(r: &mut Registry, g: &Gauges) {
    let state: Family<Labels1, Gauge> = Family::default();
    for (s, n) in &g.by_state {
        state.get_or_create(&[("state", s)]).set(*n);
    }
    r.register("queue_recipients", "Recipients waiting, by state", state);
    let domain: Family<Vec<(&'static str, String)>, Gauge> = Family::default();
    for (d, n) in &g.by_domain {
        domain.get_or_create(&vec![("domain", d.clone())]).set(*n);
    }
    r.register(
        "queue_domain_recipients",
        "Recipients waiting, by destination domain (the 20 largest, then other)",
        domain,
    );
    r.register(
        "queue_uncertain_recipients",
        "Recipients whose delivery is uncertain: sent, but the reply never came (RFC 1047)",
        gauge(g.uncertain),
    );
    r.register_with_unit(
        "queue_oldest_message_age",
        "Age of the oldest message still waiting (0 when the queue is empty)",
        Unit::Seconds,
        gauge(g.oldest_age_seconds),
    );
    let link: Family<Labels1, Gauge> = Family::default();
    for s in LINK_STATES {
        link.get_or_create(&[("state", s)])
            .set(i64::from(s == g.link_state));
    }
    r.register(
        "link_state",
        "The link to the upstream: 1 for the state it is in",
        link,
    );
    r.register_with_unit(
        "link_state_age",
        "Time since the link entered its current state",
        Unit::Seconds,
        gauge(g.link_state_seconds),
    );
    if let Some(at) = g.last_flush_at {
        r.register(
            "last_flush_timestamp_seconds",
            "When the last flush ended (Unix time)",
            gauge(at),
        );
    }
    let store: Family<Labels1, Gauge<u64, AtomicU64>> = Family::default();
    store
        .get_or_create(&[("file", "database")])
        .set(g.store_bytes);
    store.get_or_create(&[("file", "wal")]).set(g.wal_bytes);
    r.register_with_unit(
        "store_size",
        "Size of the store on disk: the database file and its write-ahead log",
        Unit::Bytes,
        store,
    );
    let free_inside: Gauge<u64, AtomicU64> = Gauge::default();
    free_inside.set(g.free_inside_bytes);
    r.register_with_unit(
        "store_free_pages",
        "Free pages inside the database file, reused before it grows",
        Unit::Bytes,
        free_inside,
    );
    if let Some(free) = g.filesystem_free_bytes {
        let fs: Gauge<u64, AtomicU64> = Gauge::default();
        fs.set(free);
        r.register_with_unit(
            "store_filesystem_free",
            "Free space on the store's file system (store.min_free refuses mail below it)",
            Unit::Bytes,
            fs,
        );
    }
    let budget: Gauge<u64, AtomicU64> = Gauge::default();
    budget.set(g.budget_bytes);
    r.register_with_unit(
        "budget_daily",
        "flush.daily_byte_budget (0: no limit)",
        Unit::Bytes,
        budget,
    );
    r.register_with_unit(
        "budget_sent_today",
        "Octets sent to the upstream today (local day), as the budget counts them",
        Unit::Bytes,
        gauge(g.sent_today_bytes),
    );
    if g.budget_bytes > 0 {
        r.register_with_unit(
            "budget_left",
            "What is left of today's flush.daily_byte_budget",
            Unit::Bytes,
            gauge((g.budget_bytes as i64 - g.sent_today_bytes).max(0)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_render_in_the_text_format() {
        let m = Metrics::default();
        m.flush("ok");
        m.flush("ok");
        m.flush("link_down");
        m.attempts("delivered", 3);
        m.attempts("bounced", 0);
        m.accepted();
        m.refused("rcpt", "5.7.1");
        m.refused("data", "9.9.9");
        m.sent_upstream(1234);
        m.resumed(99);
        m.session("127.0.0.1:25".into(), "relay".into());
        m.auth_failed();
        let g = Gauges {
            by_state: vec![("queued", 2), ("deferred", 1), ("held", 0)],
            by_domain: vec![("a.example".into(), 2), ("other".into(), 1)],
            oldest_age_seconds: 60,
            link_state: "down",
            link_state_seconds: 5,
            budget_bytes: 1000,
            sent_today_bytes: 1234,
            ..Gauges::default()
        };
        let text = m.render(&g);
        for line in [
            "# TYPE outpost_flushes_total counter",
            "outpost_flushes_total{result=\"ok\"} 2",
            "outpost_flushes_total{result=\"link_down\"} 1",
            "outpost_delivery_attempts_total{outcome=\"delivered\"} 3",
            "outpost_messages_accepted_total 1",
            "outpost_smtp_refused_total{stage=\"rcpt\",reason=\"relay_denied\"} 1",
            "outpost_smtp_refused_total{stage=\"data\",reason=\"other\"} 1",
            "outpost_upstream_sent_bytes_total 1234",
            "outpost_checkpoint_resumed_bytes_total 99",
            "outpost_sessions_total{listener=\"127.0.0.1:25\",mode=\"relay\"} 1",
            "outpost_auth_failures_total 1",
            "outpost_queue_recipients{state=\"queued\"} 2",
            "outpost_queue_domain_recipients{domain=\"other\"} 1",
            "outpost_queue_oldest_message_age_seconds 60",
            "outpost_link_state{state=\"down\"} 1",
            "outpost_link_state{state=\"up\"} 0",
            "outpost_link_state_age_seconds 5",
            "outpost_store_size_bytes{file=\"wal\"} 0",
            "outpost_budget_left_bytes 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        // Known outcomes and results are there before they happen.
        assert!(
            text.contains("outpost_delivery_attempts_total{outcome=\"bounced\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("outpost_flushes_total{result=\"error\"} 0"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
    }

    #[test]
    fn reasons_are_a_fixed_set() {
        assert_eq!(reason("5.1.1"), "unknown_user");
        assert_eq!(reason("4.3.1"), "storage_full");
        assert_eq!(reason("anything else"), "other");
    }
}
