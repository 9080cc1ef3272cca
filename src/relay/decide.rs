//! The flush's decisions, with no I/O.
//!
//! Everything the flusher decides is a function of the queue it read, the
//! configuration, `now` (Unix seconds), the link-up clock and a random
//! source: what is due and in which order, when the next scheduled flush
//! is, when a recipient is retried, when it expires, when its sender hears
//! of a delay, and what an upstream's replies mean for each recipient. The
//! driver (`flush.rs`) runs connections and commits the [`Change`]s these
//! functions return; this file never sleeps, reads a clock or opens a
//! socket, so its tests need none.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use rand::Rng;

use super::client::Outcome;
use super::dsn::{self, DsnKind, DsnRecipient, DsnRequest};
use super::flush::{FlushOptions, RcptResult};
use crate::config::{Config, FlushConfig, Uncertain};
use crate::queue::{
    Change, DueMessage, DueRecipient, NewMessage, NewRecipient, QueueId, RecipientChange,
    RecipientState, Route,
};
use crate::window;
use chrono::NaiveDateTime;

/// The first tick of a schedule of period `interval` strictly after
/// `after_ms` (Unix milliseconds). Ticks are multiples of the period since
/// the epoch, so `15m` runs at :00, :15, :30 and :45 whatever the traffic,
/// and every process computes the same times.
pub fn next_tick(interval: Duration, after_ms: i64) -> i64 {
    let period = (interval.as_millis() as i64).max(1);
    (after_ms.div_euclid(period) + 1) * period
}

/// How long to wait before the next cheap probe (a TCP connect) of a link
/// that has been down for `down_for` seconds: `interval` at first, growing
/// evenly to 60 s after an hour down (never below `interval`). `None`
/// when probing is off (`interval` zero).
pub fn probe_delay(interval: Duration, down_for: i64) -> Option<Duration> {
    if interval.is_zero() {
        return None;
    }
    let slowest = Duration::from_secs(60).max(interval);
    let ramp = down_for.clamp(0, 3600) as u32;
    Some(interval + (slowest - interval) * ramp / 3600)
}

/// When a recipient that has now failed `attempts` times is tried again:
/// exponential back-off from `retry.base`, capped at `retry.max`, with
/// ±10 % jitter so that deferred mail does not all come due at once.
pub fn next_attempt(now: i64, attempts: u32, config: &Config, rng: &mut impl Rng) -> i64 {
    let base = config.retry.base.as_secs_f64();
    let max = config.retry.max.as_secs_f64();
    let exp = base * 2f64.powi(attempts.saturating_sub(1).min(30) as i32);
    let delay = exp.min(max);
    let jitter = rng.random_range(0.9..=1.1);
    now + (delay * jitter).round().max(1.0) as i64
}

/// What may use the link to the upstream now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gate {
    /// Inside `flush.windows`.
    pub open: bool,
    /// Messages over `flush.large_message_size` may go
    /// (`flush.large_message_window`).
    pub large: bool,
    /// Octets still allowed today (`flush.daily_byte_budget`); `None`: no
    /// budget.
    pub budget_left: Option<i64>,
    /// Nothing went today: a message larger than the whole budget may
    /// then go, alone, so that it is not stuck for ever.
    pub fresh_day: bool,
}

impl Gate {
    /// Everything may go (`outpost flush --all`).
    pub fn wide_open() -> Gate {
        Gate {
            open: true,
            large: true,
            budget_left: None,
            fresh_day: true,
        }
    }
}

/// The gate at local time `local`, with `sent_today` octets already sent
/// today.
pub fn gate(flush: &FlushConfig, local: NaiveDateTime, sent_today: i64) -> Gate {
    Gate {
        open: window::open(&flush.windows, local),
        large: window::open(&flush.large_message_window, local),
        budget_left: (flush.daily_byte_budget > 0)
            .then(|| (flush.daily_byte_budget as i64 - sent_today).max(0)),
        fresh_day: sent_today == 0 || flush.daily_byte_budget == 0,
    }
}

/// When the gate may next open or close by itself (a window's edge, or
/// local midnight for the budget), if ever.
pub fn next_gate_change(flush: &FlushConfig, local: NaiveDateTime) -> Option<NaiveDateTime> {
    let midnight = (flush.daily_byte_budget > 0)
        .then(|| local.date().succ_opt())
        .flatten()
        .map(|d| d.and_time(chrono::NaiveTime::MIN));
    [
        window::next_change(&flush.windows, local),
        window::next_change(&flush.large_message_window, local),
        midnight,
    ]
    .into_iter()
    .flatten()
    .min()
}

/// What a flush sends, split by destination, oldest first.
#[derive(Debug, Default)]
pub struct Selection {
    pub upstream: VecDeque<DueMessage>,
    /// Hold-domain mail released for its branch, by domain.
    pub held: BTreeMap<String, VecDeque<DueMessage>>,
    /// Messages (per destination) in the selection.
    pub count: usize,
    /// Due upstream messages left for later, and why.
    pub waiting: Waiting,
}

/// Due messages for the upstream that wait, by reason.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Waiting {
    /// Outside `flush.windows`.
    pub window: usize,
    /// Over `flush.large_message_size`, outside `flush.large_message_window`.
    pub large_window: usize,
    /// Over what is left of `flush.daily_byte_budget` today.
    pub budget: usize,
}

impl Waiting {
    pub fn total(&self) -> usize {
        self.window + self.large_window + self.budget
    }
}

/// True when a recipient may be sent now: waiting (not held, not final)
/// for the upstream or a branch, and due (or `opts.all`), in the domains
/// asked for.
fn sendable(r: &DueRecipient, opts: &FlushOptions, now: i64) -> bool {
    matches!(r.state, RecipientState::Queued | RecipientState::Deferred)
        && matches!(r.route, Route::Upstream | Route::Hold)
        && (opts.all || r.next_attempt <= now)
        && opts.covers(&r.domain)
}

/// Picks what to send from the pending queue (already aged), oldest first,
/// except that messages over `large` octets go after every smaller one:
/// small mail is never held behind a big one. Upstream mail passes the
/// `gate`: nothing outside the windows, large mail only in its window, and
/// no more octets than the budget has left (a message that does not fit
/// waits for the next day; a smaller one behind it may still go).
pub fn select(
    pending: Vec<DueMessage>,
    opts: &FlushOptions,
    now: i64,
    large: i64,
    gate: &Gate,
) -> Selection {
    let mut s = Selection::default();
    let (small, big): (Vec<_>, Vec<_>) = pending.into_iter().partition(|m| m.size <= large);
    let pending = small.into_iter().chain(big);
    let mut budgeted = 0i64;
    if opts.etrn_only {
        return s;
    }
    for m in pending {
        let mut up = Vec::new();
        let mut by_domain: BTreeMap<String, Vec<DueRecipient>> = BTreeMap::new();
        for r in m.recipients.iter().filter(|r| sendable(r, opts, now)) {
            match r.route {
                Route::Hold => by_domain
                    .entry(r.domain.to_ascii_lowercase())
                    .or_default()
                    .push(r.clone()),
                _ => up.push(r.clone()),
            }
        }
        if !up.is_empty() {
            let fits = match gate.budget_left {
                None => true,
                Some(left) => {
                    budgeted + m.size <= left
                        || (gate.fresh_day && budgeted == 0 && s.upstream.is_empty())
                }
            };
            if !gate.open {
                s.waiting.window += 1;
            } else if m.size > large && !gate.large {
                s.waiting.large_window += 1;
            } else if !fits {
                s.waiting.budget += 1;
            } else {
                budgeted += m.size;
                s.count += 1;
                s.upstream.push_back(DueMessage {
                    recipients: up,
                    ..m.clone()
                });
            }
        }
        for (d, recipients) in by_domain {
            s.count += 1;
            s.held.entry(d).or_default().push_back(DueMessage {
                recipients,
                ..m.clone()
            });
        }
    }
    s
}

/// Hub role, ATRN: the held mail of `domains` (exact, lower case), for a
/// branch that asked for it over its own connection.
pub fn held_for(pending: Vec<DueMessage>, domains: &[String]) -> VecDeque<DueMessage> {
    pending
        .into_iter()
        .filter_map(|m| {
            let recipients: Vec<DueRecipient> = m
                .recipients
                .iter()
                .filter(|r| {
                    r.route == Route::Hold
                        && r.state == RecipientState::Held
                        && domains.iter().any(|d| d.eq_ignore_ascii_case(&r.domain))
                })
                .cloned()
                .collect();
            (!recipients.is_empty()).then_some(DueMessage { recipients, ..m })
        })
        .collect()
}

/// The TRANSID (RFC 1845) of this copy of `m`: the queue id and which of
/// its recipients go, at our host name. The same on every try of the same
/// copy, so that the upstream resumes it; another copy (other recipients)
/// gets another. At most 78 octets, as the RFC allows 80 with the brackets.
pub fn transid(m: &DueMessage, hostname: &str) -> String {
    let idx: Vec<String> = m.recipients.iter().map(|r| r.idx.to_string()).collect();
    let mut tag = idx.join("-");
    if tag.len() > 16 {
        // FNV-1a of the list: short, stable across runs and builds.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in tag.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        tag = format!("h{h:016x}");
    }
    let local = format!("{}.r{tag}", m.id);
    let room = 78usize.saturating_sub(local.len() + 1);
    let mut host: String = hostname.chars().take(room).collect();
    while host.ends_with('.') || host.ends_with('-') {
        host.pop();
    }
    if host.is_empty() {
        host.push_str("outpost");
    }
    format!("{local}@{host}")
}

/// A notice to the sender that the driver turns into a DSN message (it
/// needs the original's text, which is in the store).
#[derive(Debug, Clone)]
pub struct Notice {
    pub kind: DsnKind,
    pub recipients: Vec<DsnRecipient>,
}

/// The changes one decision makes, and the notice it sends, if any.
#[derive(Debug, Default)]
pub struct Decision {
    pub changes: Vec<Change>,
    pub notice: Option<Notice>,
    /// Recipients that waited too long.
    pub expired: usize,
    /// Recipients returned at once (a local name with no mailbox).
    pub bounced: usize,
    /// Delay warnings sent (0 or 1).
    pub warnings: usize,
}

impl Decision {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.notice.is_none()
    }
}

/// Why a waiting recipient is given up on now, if it is: the status code
/// and the text for the sender. Upstream mail expires after
/// `retry.max_age` of link-up time or `retry.max_age_absolute` in all;
/// held mail for a branch after `hub.max_hold`; a local recipient with no
/// mailbox is returned at once (nothing will ever deliver it).
fn give_up(
    m: &DueMessage,
    r: &DueRecipient,
    up_clock: i64,
    now: i64,
    config: &Config,
) -> Option<(&'static str, String)> {
    let wall = now - m.received_at;
    let up_age = up_clock - m.up_clock_at_receipt;
    let secs = |d: Duration| d.as_secs() as i64;
    match r.route {
        Route::Local => Some((
            "5.1.1",
            format!(
                "550 5.1.1 {}",
                r.last_reply
                    .clone()
                    .unwrap_or_else(|| format!("no mailbox for {}", r.address))
            ),
        )),
        Route::Hold => {
            let max = secs(config.hub.max_hold(&config.retry));
            (wall > max).then(|| {
                (
                    "4.4.7",
                    format!(
                        "4.4.7 message expired: held {} for {} and the branch never took it (hub.max_hold)",
                        human(wall),
                        r.domain
                    ),
                )
            })
        }
        Route::Upstream => {
            if wall > secs(config.retry.max_age_absolute) {
                Some((
                    "4.4.7",
                    format!(
                        "4.4.7 message expired: waited {} in all (retry.max_age_absolute)",
                        human(wall)
                    ),
                ))
            } else if up_age > secs(config.retry.max_age) && r.state != RecipientState::Held {
                Some((
                    "4.4.7",
                    format!(
                        "4.4.7 message expired: not delivered in {} with the link up (retry.max_age)",
                        human(up_age)
                    ),
                ))
            } else {
                None
            }
        }
    }
}

/// Expiry and delay warnings for one pending message: recipients given up
/// on become final (with one failure notice), and upstream recipients
/// waiting longer than `retry.delay_warning` get one delay notice. The
/// rest of the message stays as it is.
pub fn age(m: &DueMessage, up_clock: i64, now: i64, config: &Config) -> Decision {
    let mut d = Decision::default();
    let mut failed = Vec::new();
    for r in &m.recipients {
        let Some((status, why)) = give_up(m, r, up_clock, now, config) else {
            continue;
        };
        let (state, event) = match r.route {
            Route::Local => {
                d.bounced += 1;
                (RecipientState::Bounced, "bounced")
            }
            _ => {
                d.expired += 1;
                (RecipientState::Expired, "expired")
            }
        };
        d.changes.push(Change::Recipient(RecipientChange {
            message_id: m.id.clone(),
            idx: r.idx,
            state,
            attempted: false,
            next_attempt: now,
            last_reply: Some(why.clone()),
            uncertain: false,
            warned: false,
            at: now,
            event,
            detail: why.clone(),
        }));
        failed.push(DsnRecipient {
            address: r.address.clone(),
            orcpt: r.orcpt.clone(),
            status: status.into(),
            diagnostic: r.last_reply.clone().or(Some(why)),
            remote_mta: None,
            last_attempt: None,
            will_retry_until: None,
        });
    }
    if !failed.is_empty() {
        d.notice = notice(m, DsnKind::Failure, failed);
        return d;
    }
    let warn_after = config.retry.delay_warning.as_secs() as i64;
    let wall = now - m.received_at;
    if warn_after == 0 || wall < warn_after {
        return d;
    }
    let cold: Vec<&DueRecipient> = m
        .recipients
        .iter()
        .filter(|r| {
            !r.warned
                && r.route == Route::Upstream
                && matches!(r.state, RecipientState::Queued | RecipientState::Deferred)
        })
        .collect();
    if cold.is_empty() {
        return d;
    }
    let until = m.received_at + config.retry.max_age_absolute.as_secs() as i64;
    d.changes.extend(cold.iter().map(|r| Change::Warned {
        message_id: m.id.clone(),
        idx: r.idx,
    }));
    let rcpts = cold
        .iter()
        .map(|r| DsnRecipient {
            address: r.address.clone(),
            orcpt: r.orcpt.clone(),
            status: "4.4.1".into(),
            diagnostic: r.last_reply.clone(),
            remote_mta: None,
            last_attempt: None,
            will_retry_until: Some(until),
        })
        .collect();
    d.notice = notice(m, DsnKind::Delay, rcpts);
    d.warnings = usize::from(d.notice.is_some());
    d
}

/// Counts of what one message's attempt did, by outcome.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub delivered: usize,
    pub deferred: usize,
    pub bounced: usize,
    pub uncertain: usize,
    pub untouched: usize,
}

/// What one attempt at one message means for each recipient.
#[derive(Debug, Default)]
pub struct Attempt {
    pub decision: Decision,
    pub results: Vec<RcptResult>,
    pub counts: Counts,
}

/// Turns the outcomes of one message's attempt at `peer` into recipient
/// changes: delivered and bounced are final (bounces with one failure
/// notice), deferred retries after [`next_attempt`], a message whose
/// final dot went out without a reply is "delivery uncertain" (RFC 1047:
/// sent again or held as `retry.uncertain` says, never silently), and a
/// recipient not tried is left as it was. Hold-domain mail that did not go
/// waits for the next ETRN.
pub fn attempt(
    m: &DueMessage,
    outcomes: &[Outcome],
    peer: &str,
    now: i64,
    config: &Config,
    rng: &mut impl Rng,
) -> Attempt {
    let mut a = Attempt::default();
    let mut failed: Vec<DsnRecipient> = Vec::new();
    for (r, o) in m.recipients.iter().zip(outcomes) {
        let (state, next, reply, uncertain, event) = match o {
            Outcome::Delivered(rep) => {
                a.counts.delivered += 1;
                (
                    RecipientState::Delivered,
                    now,
                    rep.to_string(),
                    false,
                    "delivered",
                )
            }
            Outcome::Deferred(rep) => {
                a.counts.deferred += 1;
                let next = next_attempt(now, r.attempts + 1, config, rng);
                (
                    RecipientState::Deferred,
                    next,
                    rep.to_string(),
                    false,
                    "deferred",
                )
            }
            Outcome::Bounced(rep) => {
                a.counts.bounced += 1;
                failed.push(DsnRecipient {
                    address: r.address.clone(),
                    orcpt: r.orcpt.clone(),
                    status: rep
                        .status()
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("{}.0.0", rep.class())),
                    diagnostic: Some(rep.to_string()),
                    remote_mta: Some(format!("dns; {peer}")),
                    last_attempt: Some(now),
                    will_retry_until: None,
                });
                (
                    RecipientState::Bounced,
                    now,
                    rep.to_string(),
                    false,
                    "bounced",
                )
            }
            Outcome::Uncertain(why) => {
                a.counts.uncertain += 1;
                let text = format!(
                    "delivery uncertain: the message was sent but {peer} did not confirm it ({why})"
                );
                let state = match config.retry.uncertain {
                    Uncertain::Resend => RecipientState::Queued,
                    Uncertain::Hold => RecipientState::Held,
                };
                (state, now, text, true, "uncertain")
            }
            Outcome::Untouched => {
                a.counts.untouched += 1;
                continue;
            }
        };
        let state = if r.route == Route::Hold && !state.is_final() {
            RecipientState::Held
        } else {
            state
        };
        a.results.push(RcptResult {
            address: r.address.clone(),
            outcome: event.into(),
            reply: Some(reply.clone()),
        });
        a.decision.changes.push(Change::Recipient(RecipientChange {
            message_id: m.id.clone(),
            idx: r.idx,
            state,
            attempted: true,
            next_attempt: next,
            detail: format!("{reply} ({peer})"),
            last_reply: Some(reply),
            uncertain,
            warned: false,
            at: now,
            event,
        }));
    }
    a.decision.notice = notice(m, DsnKind::Failure, failed);
    a
}

/// A hold-domain recipient goes back to waiting for ETRN (its branch could
/// not be reached): no attempt is counted.
pub fn held_again(message_id: &str, idx: u32, why: &str, now: i64) -> Change {
    Change::Recipient(RecipientChange {
        message_id: message_id.to_string(),
        idx,
        state: RecipientState::Held,
        attempted: false,
        next_attempt: now,
        last_reply: Some(why.to_string()),
        uncertain: false,
        warned: false,
        at: now,
        event: "held",
        detail: why.to_string(),
    })
}

/// The notice the sender wants, if any: never to the null sender (no
/// bounce storms), and only for the recipients whose NOTIFY asks for this
/// kind (absent NOTIFY: failures and delays).
pub fn notice(m: &DueMessage, kind: DsnKind, rcpts: Vec<DsnRecipient>) -> Option<Notice> {
    if m.sender.is_empty() {
        return None;
    }
    let want = match kind {
        DsnKind::Failure => "FAILURE",
        DsnKind::Delay => "DELAY",
    };
    let recipients: Vec<DsnRecipient> = rcpts
        .into_iter()
        .filter(|d| {
            let notify = m
                .recipients
                .iter()
                .find(|r| r.address == d.address)
                .and_then(|r| r.notify.as_deref());
            notify.is_none_or(|n| n.split(',').any(|x| x.eq_ignore_ascii_case(want)))
        })
        .collect();
    (!recipients.is_empty()).then_some(Notice { kind, recipients })
}

/// The DSN message for `notice`, from `original` (the stored message).
/// A local sender's notice goes straight to their mailbox: it does not
/// wait behind a dead link. `mailboxes` are the accounts a local sender's
/// address reaches.
pub fn notice_message(
    config: &Config,
    m: &DueMessage,
    notice: &Notice,
    original: &[u8],
    id: QueueId,
    mailboxes: Vec<String>,
    now: i64,
) -> NewMessage {
    let host = &config.hostname;
    let from = format!("MAILER-DAEMON@{host}");
    let bytes = dsn::build(&DsnRequest {
        kind: notice.kind,
        reporting_mta: host,
        queue_id: &m.id,
        envid: m.dsn_envid.as_deref(),
        arrival: m.received_at,
        to: &m.sender,
        from: &from,
        recipients: &notice.recipients,
        original,
        return_full: m.dsn_ret == Some(crate::queue::DsnRet::Full),
        now,
    });
    let domain = sender_domain(m);
    let route = if config.is_local_domain(&domain) {
        Route::Local
    } else {
        Route::Upstream
    };
    NewMessage {
        id,
        received_at: now,
        sender: config.upstream.dsn_sender.clone().unwrap_or_default(),
        client_addr: "local".into(),
        client_helo: String::new(),
        auth_user: None,
        protocol: "DSN".into(),
        body_type: Some("8BITMIME".into()),
        smtputf8: false,
        dsn_ret: None,
        dsn_envid: None,
        recipients: vec![NewRecipient {
            address: m.sender.clone(),
            domain,
            route,
            dsn_notify: Some("NEVER".into()),
            dsn_orcpt: None,
            mailboxes: if route == Route::Local {
                mailboxes
            } else {
                Vec::new()
            },
        }],
        body: bytes.into(),
    }
}

/// The sender's domain, lower case ("" for the null sender).
pub fn sender_domain(m: &DueMessage) -> String {
    m.sender
        .rsplit_once('@')
        .map(|(_, d)| d.to_ascii_lowercase())
        .unwrap_or_default()
}

pub fn human(secs: i64) -> String {
    humantime::format_duration(Duration::from_secs(secs.max(0) as u64)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::client::UpstreamReply;
    use rand::SeedableRng;
    use std::path::Path;

    const H: i64 = 3600;
    const D: i64 = 24 * H;

    fn config(extra: &str) -> Config {
        Config::parse(
            &format!(
                "[local]\ndomains = [\"branch.example\"]\n[hub]\nhold_domains = [\"other.example\"]\n{extra}"
            ),
            Path::new("t"),
        )
        .unwrap()
    }

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    fn rcpt(idx: u32, address: &str, route: Route, state: RecipientState) -> DueRecipient {
        DueRecipient {
            idx,
            address: address.into(),
            attempts: 0,
            notify: None,
            orcpt: None,
            warned: false,
            last_reply: None,
            domain: address.rsplit_once('@').unwrap().1.into(),
            next_attempt: 0,
            route,
            state,
        }
    }

    fn message(received_at: i64, recipients: Vec<DueRecipient>) -> DueMessage {
        DueMessage {
            id: "M1".into(),
            received_at,
            size: 100,
            up_clock_at_receipt: 0,
            sender: "me@branch.example".into(),
            body_type: None,
            smtputf8: false,
            dsn_ret: None,
            dsn_envid: None,
            recipients,
        }
    }

    fn states(d: &Decision) -> Vec<(u32, RecipientState)> {
        d.changes
            .iter()
            .filter_map(|c| match c {
                Change::Recipient(r) => Some((r.idx, r.state)),
                _ => None,
            })
            .collect()
    }

    fn reply(code: u16, text: &str) -> UpstreamReply {
        UpstreamReply {
            code,
            text: text.into(),
        }
    }

    #[test]
    fn ticks_are_fixed_by_the_clock_not_by_traffic() {
        let i = Duration::from_secs(900);
        let t0 = 1_700_000_000_000; // a multiple of 15 minutes? not necessarily
        let first = next_tick(i, t0);
        assert_eq!(first % 900_000, 0);
        assert!(first > t0 && first - t0 <= 900_000);
        // However often something else wakes the runner up before the
        // tick, the tick stays where it was.
        for woke in (t0..first).step_by(1_000) {
            assert_eq!(next_tick(i, woke), first);
        }
        // At the tick itself, the next one is a whole period later.
        assert_eq!(next_tick(i, first), first + 900_000);
        // Sub-second periods work too (tests use them).
        assert_eq!(next_tick(Duration::from_millis(250), 1_001), 1_250);
    }

    #[test]
    fn probes_slow_down_over_the_first_hour() {
        let five = Duration::from_secs(5);
        assert_eq!(probe_delay(five, 0), Some(five));
        assert_eq!(probe_delay(five, 1800), Some(Duration::from_millis(32_500)));
        assert_eq!(probe_delay(five, 3600), Some(Duration::from_secs(60)));
        assert_eq!(probe_delay(five, 86_400), Some(Duration::from_secs(60)));
        assert_eq!(probe_delay(Duration::ZERO, 10), None);
        // A slow setting stays as slow as asked.
        let two_min = Duration::from_secs(120);
        assert_eq!(probe_delay(two_min, 7200), Some(two_min));
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let c = config("[retry]\nbase = \"60s\"\nmax = \"10m\"\n");
        let mut r = rng();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let d1 = next_attempt(0, 1, &c, &mut r);
            assert!((54..=66).contains(&d1), "{d1}");
            seen.insert(d1);
            let d3 = next_attempt(0, 3, &c, &mut r);
            assert!((216..=264).contains(&d3), "{d3}");
            let d20 = next_attempt(0, 20, &c, &mut r);
            assert!((540..=660).contains(&d20), "{d20}");
        }
        assert!(seen.len() > 5, "jitter spreads retries: {seen:?}");
    }

    #[test]
    fn selection_takes_due_mail_by_destination() {
        let now = 1000;
        let mut later = rcpt(
            1,
            "b@far.example",
            Route::Upstream,
            RecipientState::Deferred,
        );
        later.next_attempt = now + 60;
        let m = message(
            0,
            vec![
                rcpt(0, "a@far.example", Route::Upstream, RecipientState::Queued),
                later,
                rcpt(2, "c@other.example", Route::Hold, RecipientState::Held),
                rcpt(3, "d@other.example", Route::Hold, RecipientState::Queued),
                rcpt(
                    4,
                    "postmaster@branch.example",
                    Route::Local,
                    RecipientState::Queued,
                ),
            ],
        );
        let s = select(
            vec![m.clone()],
            &FlushOptions::default(),
            now,
            1 << 20,
            &Gate::wide_open(),
        );
        assert_eq!(s.count, 2);
        let up: Vec<u32> = s.upstream[0].recipients.iter().map(|r| r.idx).collect();
        assert_eq!(up, vec![0], "not yet due, held and local are not sent");
        let held: Vec<u32> = s.held["other.example"][0]
            .recipients
            .iter()
            .map(|r| r.idx)
            .collect();
        assert_eq!(held, vec![3], "released hold mail goes to its branch");
        // --all ignores back-off, never the held state.
        let all = FlushOptions {
            all: true,
            ..Default::default()
        };
        let s = select(vec![m.clone()], &all, now, 1 << 20, &Gate::wide_open());
        assert_eq!(s.upstream[0].recipients.len(), 2);
        // Domains narrow it.
        let only = FlushOptions {
            domains: vec!["other.example".into()],
            ..Default::default()
        };
        let s = select(vec![m.clone()], &only, now, 1 << 20, &Gate::wide_open());
        assert!(s.upstream.is_empty() && s.count == 1);
        let etrn_only = FlushOptions {
            etrn_only: true,
            ..Default::default()
        };
        assert_eq!(
            select(vec![m], &etrn_only, now, 1 << 20, &Gate::wide_open()).count,
            0
        );
    }

    #[test]
    fn small_mail_goes_before_big_mail() {
        let r = |i| rcpt(i, "a@far.example", Route::Upstream, RecipientState::Queued);
        let mut big = message(0, vec![r(0)]);
        big.id = "BIG".into();
        big.size = 5 << 20;
        let mut small1 = message(1, vec![r(0)]);
        small1.id = "S1".into();
        let mut small2 = message(2, vec![r(0)]);
        small2.id = "S2".into();
        let s = select(
            vec![big, small1, small2],
            &FlushOptions::default(),
            10,
            1 << 20,
            &Gate::wide_open(),
        );
        let order: Vec<&str> = s.upstream.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(order, vec!["S1", "S2", "BIG"]);
    }

    fn sized(id: &str, received_at: i64, size: i64) -> DueMessage {
        let mut m = message(
            received_at,
            vec![rcpt(
                0,
                "a@far.example",
                Route::Upstream,
                RecipientState::Queued,
            )],
        );
        m.id = id.into();
        m.size = size;
        m
    }

    fn ids(s: &Selection) -> Vec<&str> {
        s.upstream.iter().map(|m| m.id.as_str()).collect()
    }

    #[test]
    fn windows_and_budgets_gate_upstream_mail() {
        let at = |s: &str| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").unwrap();
        let c = config(
            "[flush]\nwindows = [\"Mon-Fri 07:00-19:00\"]\nlarge_message_window = [\"22:00-06:00\"]\nlarge_message_size = 1000\ndaily_byte_budget = 2500\n",
        );
        let queue = || {
            vec![
                sized("A", 1, 800),
                sized("BIG", 2, 5000),
                sized("B", 3, 900),
                sized("C", 4, 900),
                sized("D", 5, 300),
            ]
        };
        let opts = FlushOptions::default();
        // Monday 12:00, nothing sent yet: small mail within the budget
        // (800 + 900 + 300; C does not fit but D does), the big one waits
        // for the night.
        let g = gate(&c.flush, at("2026-12-07 12:00"), 0);
        assert!(g.open && !g.large);
        let s = select(queue(), &opts, 10, 1000, &g);
        assert_eq!(ids(&s), vec!["A", "B", "D"]);
        assert_eq!(
            s.waiting,
            Waiting {
                window: 0,
                large_window: 1,
                budget: 1
            }
        );
        // Saturday: the link is not used at all.
        let g = gate(&c.flush, at("2026-12-12 12:00"), 0);
        let s = select(queue(), &opts, 10, 1000, &g);
        assert!(s.upstream.is_empty());
        assert_eq!(s.waiting.window, 5);
        // Budget spent: everything waits for the next day...
        let g = gate(&c.flush, at("2026-12-07 12:00"), 2500);
        let s = select(queue(), &opts, 10, 1000, &g);
        assert!(s.upstream.is_empty());
        assert_eq!(s.waiting.budget, 4);
        // ... which starts at midnight.
        assert_eq!(
            next_gate_change(&c.flush, at("2026-12-07 20:00")),
            Some(at("2026-12-07 22:00")),
            "the large window opens first"
        );
        assert_eq!(
            next_gate_change(&c.flush, at("2026-12-07 23:00")),
            Some(at("2026-12-08 00:00"))
        );
        // A message larger than a whole day's budget goes alone, first
        // thing in a fresh day, when its window is open.
        let c2 = config("[flush]\ndaily_byte_budget = 1000\n");
        let g = gate(&c2.flush, at("2026-12-07 12:00"), 0);
        // Oldest first: the huge one takes the fresh day, the small one
        // behind it waits.
        let s = select(
            vec![sized("HUGE", 1, 50_000), sized("S", 2, 10)],
            &opts,
            10,
            1 << 20,
            &g,
        );
        assert_eq!(ids(&s), vec!["HUGE"]);
        assert_eq!(s.waiting.budget, 1);
        let s = select(vec![sized("HUGE", 1, 50_000)], &opts, 10, 1 << 20, &g);
        assert_eq!(ids(&s), vec!["HUGE"]);
        let g = gate(&c2.flush, at("2026-12-07 12:00"), 10);
        let s = select(vec![sized("HUGE", 1, 50_000)], &opts, 10, 1 << 20, &g);
        assert!(s.upstream.is_empty());
        // No windows, no budget: always open, nothing to wake for.
        let plain = config("");
        assert_eq!(
            gate(&plain.flush, at("2026-12-12 03:00"), 1 << 40),
            Gate::wide_open()
        );
        assert_eq!(next_gate_change(&plain.flush, at("2026-12-12 03:00")), None);
    }

    #[test]
    fn upstream_mail_ages_by_link_up_time_and_wall_clock() {
        let c = config(
            "[retry]\nmax_age = \"5d\"\nmax_age_absolute = \"30d\"\ndelay_warning = \"0s\"\n",
        );
        let m = message(
            0,
            vec![rcpt(
                0,
                "a@far.example",
                Route::Upstream,
                RecipientState::Deferred,
            )],
        );
        // Twenty days with the link down: not expired (the link-up clock
        // stood still).
        assert!(age(&m, 0, 20 * D, &c).is_empty());
        // Five days and a second with the link up: expired, with a notice.
        let d = age(&m, 5 * D + 1, 6 * D, &c);
        assert_eq!(states(&d), vec![(0, RecipientState::Expired)]);
        let n = d.notice.unwrap();
        assert!(matches!(n.kind, DsnKind::Failure));
        assert_eq!(n.recipients[0].status, "4.4.7");
        // Thirty days in all, link down the whole time: expired.
        let d = age(&m, 0, 30 * D + 1, &c);
        assert_eq!(states(&d), vec![(0, RecipientState::Expired)]);
        assert!(d.changes.iter().any(|c| matches!(c,
            Change::Recipient(r) if r.last_reply.as_deref().unwrap().contains("retry.max_age_absolute"))));
    }

    #[test]
    fn held_mail_expires_after_max_hold() {
        let mut c = config("[retry]\ndelay_warning = \"0s\"\n");
        c.hub.max_hold = Some(Duration::from_secs(2 * D as u64));
        let m = message(
            0,
            vec![
                rcpt(0, "c@other.example", Route::Hold, RecipientState::Held),
                rcpt(
                    1,
                    "a@far.example",
                    Route::Upstream,
                    RecipientState::Deferred,
                ),
            ],
        );
        // The upstream link-up clock does not matter for held mail.
        assert!(age(&m, 0, 2 * D - 1, &c).is_empty());
        let d = age(&m, 0, 2 * D + 1, &c);
        assert_eq!(states(&d), vec![(0, RecipientState::Expired)]);
        assert_eq!(d.notice.unwrap().recipients[0].address, "c@other.example");
        // Without hub.max_hold, held mail lives as long as
        // retry.max_age_absolute.
        let c = config(
            "[retry]\nmax_age = \"1d\"\nmax_age_absolute = \"3d\"\ndelay_warning = \"0s\"\n",
        );
        assert!(age(&m, 0, 2 * D + 1, &c).is_empty());
        assert_eq!(
            states(&age(&m, 0, 3 * D + 1, &c)),
            vec![(0, RecipientState::Expired), (1, RecipientState::Expired)]
        );
    }

    #[test]
    fn a_local_recipient_without_a_mailbox_is_returned_at_once() {
        let c = config("");
        let mut r = rcpt(
            0,
            "postmaster@branch.example",
            Route::Local,
            RecipientState::Queued,
        );
        r.last_reply = Some("no mailbox for postmaster@branch.example: add the account".into());
        let m = message(100, vec![r]);
        let d = age(&m, 0, 101, &c);
        assert_eq!(states(&d), vec![(0, RecipientState::Bounced)]);
        let n = d.notice.unwrap();
        assert_eq!(n.recipients[0].status, "5.1.1");
        assert!(n.recipients[0]
            .diagnostic
            .as_deref()
            .unwrap()
            .contains("no mailbox"));
        // A notice to the null sender is never sent: no loops.
        let mut m = m;
        m.sender.clear();
        let d = age(&m, 0, 101, &c);
        assert_eq!(states(&d), vec![(0, RecipientState::Bounced)]);
        assert!(d.notice.is_none());
    }

    #[test]
    fn delay_warning_once_and_as_notify_asks() {
        let c = config("[retry]\ndelay_warning = \"4h\"\n");
        let mut quiet = rcpt(
            1,
            "b@far.example",
            Route::Upstream,
            RecipientState::Deferred,
        );
        quiet.notify = Some("FAILURE".into());
        let mut m = message(
            0,
            vec![
                rcpt(
                    0,
                    "a@far.example",
                    Route::Upstream,
                    RecipientState::Deferred,
                ),
                quiet,
                rcpt(2, "c@other.example", Route::Hold, RecipientState::Held),
            ],
        );
        assert!(age(&m, 0, 4 * H - 1, &c).is_empty());
        let d = age(&m, 0, 4 * H, &c);
        assert_eq!(d.warnings, 1);
        let n = d.notice.unwrap();
        assert!(matches!(n.kind, DsnKind::Delay));
        let to: Vec<&str> = n.recipients.iter().map(|r| r.address.as_str()).collect();
        assert_eq!(
            to,
            vec!["a@far.example"],
            "NOTIFY=FAILURE and held mail hear nothing"
        );
        assert_eq!(n.recipients[0].will_retry_until, Some(30 * D));
        // Marked warned (both upstream ones), so the next flush is quiet.
        let warned = d
            .changes
            .iter()
            .filter(|c| matches!(c, Change::Warned { .. }))
            .count();
        assert_eq!(warned, 2);
        for r in &mut m.recipients {
            r.warned = true;
        }
        assert!(age(&m, 0, 5 * H, &c).is_empty());
    }

    #[test]
    fn replies_decide_each_recipient() {
        let c = config("[retry]\nbase = \"60s\"\n");
        let m = message(
            0,
            vec![
                rcpt(0, "a@far.example", Route::Upstream, RecipientState::Queued),
                rcpt(1, "b@far.example", Route::Upstream, RecipientState::Queued),
                rcpt(2, "c@far.example", Route::Upstream, RecipientState::Queued),
                rcpt(3, "d@far.example", Route::Upstream, RecipientState::Queued),
            ],
        );
        let outcomes = [
            Outcome::Delivered(reply(250, "2.0.0 ok")),
            Outcome::Deferred(reply(451, "4.3.0 later")),
            Outcome::Bounced(reply(550, "5.1.1 no such user")),
            Outcome::Untouched,
        ];
        let a = attempt(&m, &outcomes, "hub:25", 1000, &c, &mut rng());
        assert_eq!(
            states(&a.decision),
            vec![
                (0, RecipientState::Delivered),
                (1, RecipientState::Deferred),
                (2, RecipientState::Bounced)
            ]
        );
        assert_eq!(
            a.counts,
            Counts {
                delivered: 1,
                deferred: 1,
                bounced: 1,
                uncertain: 0,
                untouched: 1
            }
        );
        let next = a
            .decision
            .changes
            .iter()
            .find_map(|c| match c {
                Change::Recipient(r) if r.idx == 1 => Some(r.next_attempt),
                _ => None,
            })
            .unwrap();
        assert!((1054..=1066).contains(&next), "{next}");
        let n = a.decision.notice.unwrap();
        assert_eq!(n.recipients.len(), 1);
        assert_eq!(n.recipients[0].status, "5.1.1");
        assert_eq!(n.recipients[0].remote_mta.as_deref(), Some("dns; hub:25"));
    }

    #[test]
    fn the_uncertain_window_is_flagged_never_silent() {
        let m = message(
            0,
            vec![rcpt(
                0,
                "a@far.example",
                Route::Upstream,
                RecipientState::Queued,
            )],
        );
        let lost = [Outcome::Uncertain(
            "timeout waiting for hub during final dot".into(),
        )];
        for (policy, state) in [
            ("resend", RecipientState::Queued),
            ("hold", RecipientState::Held),
        ] {
            let c = config(&format!("[retry]\nuncertain = \"{policy}\"\n"));
            let a = attempt(&m, &lost, "hub:25", 5, &c, &mut rng());
            let Change::Recipient(r) = &a.decision.changes[0] else {
                panic!("a recipient change")
            };
            assert_eq!(r.state, state);
            assert!(r.uncertain && r.attempted);
            assert!(r
                .last_reply
                .as_deref()
                .unwrap()
                .starts_with("delivery uncertain"));
            assert!(a.decision.notice.is_none());
        }
    }

    #[test]
    fn hold_mail_that_did_not_go_waits_for_etrn() {
        let c = config("");
        let m = message(
            0,
            vec![rcpt(
                0,
                "c@other.example",
                Route::Hold,
                RecipientState::Queued,
            )],
        );
        let a = attempt(
            &m,
            &[Outcome::Deferred(reply(451, "4.4.0 busy"))],
            "branch:25",
            5,
            &c,
            &mut rng(),
        );
        assert_eq!(states(&a.decision), vec![(0, RecipientState::Held)]);
    }

    #[test]
    fn notices_go_to_local_mailboxes_directly() {
        let c = config("");
        let m = message(
            0,
            vec![rcpt(
                0,
                "a@far.example",
                Route::Upstream,
                RecipientState::Queued,
            )],
        );
        let n = notice(
            &m,
            DsnKind::Failure,
            vec![DsnRecipient {
                address: "a@far.example".into(),
                orcpt: None,
                status: "5.1.1".into(),
                diagnostic: None,
                remote_mta: None,
                last_attempt: None,
                will_retry_until: None,
            }],
        )
        .unwrap();
        let msg = notice_message(
            &c,
            &m,
            &n,
            b"Subject: x\r\n\r\nhi\r\n",
            QueueId::generate(),
            vec!["me".into()],
            10,
        );
        assert_eq!(msg.recipients[0].route, Route::Local);
        assert_eq!(msg.recipients[0].mailboxes, vec!["me".to_string()]);
        assert_eq!(msg.recipients[0].dsn_notify.as_deref(), Some("NEVER"));
        let mut far = m.clone();
        far.sender = "someone@far.example".into();
        let msg = notice_message(&c, &far, &n, b"", QueueId::generate(), vec!["x".into()], 10);
        assert_eq!(msg.recipients[0].route, Route::Upstream);
        assert!(msg.recipients[0].mailboxes.is_empty());
    }
}
