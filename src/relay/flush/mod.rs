//! A flush: send what is due to the upstream, record what happened.
//!
//! `mod.rs` runs one flush (aging, selection, the gate, ETRN, ATRN);
//! `deliver` runs the connections and records outcomes as they arrive;
//! `atrn` is ODMR both ways; `lock` is the flush lock.
//!
//! The driver around [`super::decide`]: it reads the queue, asks the
//! decisions what to age and what to send, runs the connections, and
//! commits each message's outcome as soon as its reply arrives.
//!
//! One flush at a time, across processes: a lock file beside the database,
//! shared by the daemon, `outpost flush` and the queue administration
//! commands, so no message is ever sent by two flushers at once, nor held
//! or bounced while it is being sent. A link that does not answer (DNS,
//! connect, TLS, greeting, AUTH, timeout) marks the link down and burns no
//! attempt: a link that is down is not a delivery failure, and
//! `retry.max_age` counts only time with the link up.

mod atrn;
mod deliver;
mod lock;

pub use atrn::TurnedBack;
pub use deliver::upstream_settings;
pub use lock::FlushLock;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::client::{self, LinkError, Outcome, Session};
use super::decide;
use crate::config::Config;
use crate::queue::{unix_now, Change, DueMessage, LinkState, QueueId, Store, StoreError, Writer};

/// Aging changes committed together at most (DSNs carry message bodies).
const AGING_BATCH: usize = 256;

/// What to flush.
#[derive(Debug, Clone, Default, serde::Deserialize, Serialize)]
pub struct FlushOptions {
    /// Ignore retry back-off: everything pending is due.
    #[serde(default)]
    pub all: bool,
    /// Only recipients in these domains (all when empty); `@domain` also
    /// covers its subdomains. Held mail of a hold domain named here is
    /// released first (the hub's ETRN, or `outpost flush --domain D`).
    #[serde(default)]
    pub domains: Vec<String>,
    /// Do not send ETRN to the upstream afterwards.
    #[serde(default)]
    pub no_etrn: bool,
    /// Send nothing; only ETRN (`outpost flush --etrn-only`).
    #[serde(default)]
    pub etrn_only: bool,
}

impl FlushOptions {
    /// True when `domain` is one of the domains asked for.
    pub fn covers(&self, domain: &str) -> bool {
        self.domains.is_empty() || self.domains.iter().any(|spec| domain_matches(spec, domain))
    }
}

pub use crate::address::domain_matches;

/// Progress, as `outpost flush` prints it (and `--json` streams it).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Start {
        due: usize,
    },
    Link {
        state: LinkState,
        upstream: String,
        tls: Option<String>,
        error: Option<String>,
    },
    Message {
        id: String,
        recipients: Vec<RcptResult>,
    },
    Etrn(EtrnResult),
    Done(Summary),
}

/// The upstream's answer to one ETRN (RFC 1985: 250, 251, 252, 253, 458, 459).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct EtrnResult {
    pub name: String,
    pub reply: String,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RcptResult {
    pub address: String,
    pub outcome: String,
    pub reply: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Summary {
    pub delivered: usize,
    pub deferred: usize,
    pub bounced: usize,
    pub expired: usize,
    pub uncertain: usize,
    /// Due but not tried (the connection ended first).
    pub untouched: usize,
    pub delay_warnings: usize,
    /// up, down, closed, or unknown (nothing was due, so the link was not
    /// tried).
    pub link: LinkState,
    pub error: Option<String>,
    #[serde(default)]
    pub etrn: Vec<EtrnResult>,
    /// Due upstream mail left for a window or the budget.
    #[serde(default)]
    pub waiting: decide::Waiting,
    /// The hub's answer to our ATRN, when one was sent.
    #[serde(default)]
    pub atrn: Option<String>,
}

impl Summary {
    /// Nothing happened yet: the link was not tried.
    pub fn untried() -> Summary {
        Summary::default()
    }

    /// The link could not be used: down, or closed (a window or the
    /// budget) with mail waiting. `outpost flush` exits 75 then.
    pub fn link_down(&self) -> bool {
        self.link == LinkState::Down || (self.link == LinkState::Closed && self.waiting.total() > 0)
    }

    /// The flush's result in one word, for `outpost_flushes_total`.
    pub fn result(&self) -> &'static str {
        match self.link {
            LinkState::Down => "link_down",
            LinkState::Closed => "closed",
            _ if self.error.is_some() => "error",
            _ => "ok",
        }
    }
}

/// Runs flushes; cheap to clone.
#[derive(Clone)]
pub struct Flusher {
    pub config: Arc<Config>,
    pub store: Arc<Store>,
    pub writer: Writer,
    /// Set at shutdown: transactions in flight finish, none starts.
    stop: Arc<AtomicBool>,
    /// Branch role: where a connection the hub turned around (ATRN) goes,
    /// to be served as an SMTP server. None without a daemon.
    turned: Option<mpsc::UnboundedSender<TurnedBack>>,
    /// Flushes, attempts and octets, for `GET /metrics`.
    pub metrics: crate::metrics::Metrics,
}

impl Flusher {
    pub fn new(config: Arc<Config>, store: Arc<Store>, writer: Writer) -> Flusher {
        Flusher {
            config,
            store,
            writer,
            stop: Arc::default(),
            turned: None,
            metrics: Default::default(),
        }
    }

    /// Counts into `metrics` (the daemon's, served on `[metrics]`).
    pub fn counting_into(mut self, metrics: crate::metrics::Metrics) -> Flusher {
        self.metrics = metrics;
        self
    }

    /// Counts the octets the upstream had kept (CHECKPOINT) on a session.
    fn count_resumed(&self, p: &client::Progress) {
        let kept = p.resumed_total.swap(0, Ordering::Relaxed);
        self.metrics.resumed(kept);
    }

    /// Counts the recipients of one attempt by outcome.
    fn count_attempts(&self, c: &decide::Counts) {
        for (outcome, n) in crate::metrics::OUTCOMES.into_iter().zip([
            c.delivered,
            c.deferred,
            c.bounced,
            c.uncertain,
        ]) {
            self.metrics.attempts(outcome, n);
        }
    }
    /// This flusher stops starting transactions once `stop` is set (the
    /// daemon's shutdown); the flag is shared by every clone.
    pub fn stopping_on(mut self, stop: Arc<AtomicBool>) -> Flusher {
        self.stop = stop;
        self
    }

    /// One whole flush. `progress` sees every event, `Done` last.
    pub async fn run(
        &self,
        opts: &FlushOptions,
        progress: &mut (dyn FnMut(&Event) + Send),
    ) -> Summary {
        let mut summary = Summary::untried();
        let _lock = match FlushLock::acquire(&self.config.store.path).await {
            Ok(l) => l,
            Err(e) => {
                summary.error = Some(e);
                progress(&Event::Done(summary.clone()));
                return summary;
            }
        };
        let r = self.run_locked(opts, progress, &mut summary).await;
        if let Err(e) = r {
            summary.error = Some(e.to_string());
        }
        let result = format!(
            "{} delivered, {} deferred, {} bounced, {} expired{}",
            summary.delivered,
            summary.deferred,
            summary.bounced,
            summary.expired,
            summary
                .error
                .as_deref()
                .map(|e| format!("; {e}"))
                .unwrap_or_default()
        );
        let _ = self
            .writer
            .apply(vec![Change::FlushDone {
                at: unix_now(),
                result,
            }])
            .await;
        self.metrics.flush(summary.result());
        progress(&Event::Done(summary.clone()));
        summary
    }

    async fn run_locked(
        &self,
        opts: &FlushOptions,
        progress: &mut (dyn FnMut(&Event) + Send),
        summary: &mut Summary,
    ) -> Result<(), StoreError> {
        let now = unix_now();
        // Hold domains asked for by name are released first.
        let release: Vec<Change> = opts
            .domains
            .iter()
            .filter(|spec| {
                let d = spec.trim_start_matches('@');
                self.config
                    .hub
                    .hold_domains
                    .iter()
                    .any(|h| domain_matches(spec, h) || h.eq_ignore_ascii_case(d))
            })
            .map(|spec| Change::Release {
                spec: spec.clone(),
                at: now,
            })
            .collect();
        if !release.is_empty() && !opts.etrn_only {
            self.writer.apply(release).await?;
        }
        let store = self.store.clone();
        let local = chrono::Local::now().naive_local();
        let today = local.date().to_string();
        let (pending, link, sent_today) = tokio::task::spawn_blocking(move || {
            Ok::<_, StoreError>((
                store.pending_outbound()?,
                store.link(now)?,
                store.sent_on(&today)?,
            ))
        })
        .await
        .map_err(|e| StoreError::Failed(e.to_string()))??;
        summary.link = link.state;
        // Windows and the budget, unless everything is asked for now.
        let gate = if opts.all {
            decide::Gate::wide_open()
        } else {
            decide::gate(&self.config.flush, local, sent_today)
        };

        // Age first: expiry and delay warnings do not need the link.
        // Their changes are committed a batch at a time, not one commit
        // per message (a morning of delay warnings is one fsync, not
        // hundreds).
        let mut aged = Vec::with_capacity(pending.len());
        let mut aging = Vec::new();
        for mut m in pending {
            let d = decide::age(&m, link.up_clock, now, &self.config);
            if !d.is_empty() {
                summary.expired += d.expired;
                summary.bounced += d.bounced;
                summary.delay_warnings += d.warnings;
                let mut finished = Vec::new();
                for c in &d.changes {
                    if let Change::Recipient(r) = c {
                        let rcpt = m.recipients.iter().find(|x| x.idx == r.idx);
                        warn!(queue_id = %m.id, rcpt = rcpt.map(|x| x.address.as_str()).unwrap_or(""),
                              outcome = r.event, reason = r.last_reply.as_deref().unwrap_or(""),
                              notice = d.notice.is_some(), "given up");
                        finished.push(r.idx);
                    }
                }
                aging.extend(self.with_notice(d, &m, None, now));
                if aging.len() >= AGING_BATCH {
                    self.writer.apply(std::mem::take(&mut aging)).await?;
                }
                m.recipients.retain(|r| !finished.contains(&r.idx));
            }
            aged.push(m);
        }
        if !aging.is_empty() {
            self.writer.apply(aging).await?;
        }
        // Then what is due now (or everything with --all), in the domains
        // asked, split by where it goes: the upstream, or a hold domain's
        // branch.
        let selection = decide::select(
            aged,
            opts,
            now,
            self.config.flush.large_message_size as i64,
            &gate,
        );
        progress(&Event::Start {
            due: selection.count,
        });
        summary.waiting = selection.waiting;
        // The link is closed (not to be used now) when the window is shut,
        // or when the budget leaves nothing due to send: the link-up clock
        // stands still, so what waits does not age.
        let closed = if !gate.open {
            let next = decide::next_gate_change(&self.config.flush, local);
            Some(format!(
                "outside flush.windows ({}){}",
                self.config
                    .flush
                    .windows
                    .iter()
                    .map(|w| w.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                next.map(|t| format!("; the link is used again at {}", t.format("%Y-%m-%d %H:%M")))
                    .unwrap_or_default()
            ))
        } else if selection.upstream.is_empty() && selection.waiting.budget > 0 {
            Some(format!(
                "flush.daily_byte_budget spent ({sent_today} of {} octets today); {} message{} wait for tomorrow",
                self.config.flush.daily_byte_budget,
                selection.waiting.budget,
                if selection.waiting.budget == 1 { "" } else { "s" },
            ))
        } else {
            None
        };
        if let Some(why) = &closed {
            info!(reason = %why, waiting = selection.waiting.total(), "link closed");
            self.writer
                .apply(vec![Change::Link {
                    state: LinkState::Closed,
                    error: Some(why.clone()),
                    at: now,
                }])
                .await?;
            summary.link = LinkState::Closed;
            progress(&Event::Link {
                state: LinkState::Closed,
                upstream: self.config.upstream.server.clone(),
                tls: None,
                error: Some(why.clone()),
            });
        } else if link.state == LinkState::Closed && selection.upstream.is_empty() {
            // Open again, and nothing to send: not known to be up or down.
            self.writer
                .apply(vec![Change::Link {
                    state: LinkState::Unknown,
                    error: None,
                    at: now,
                }])
                .await?;
            summary.link = LinkState::Unknown;
        }

        let mut etrn_session = None;
        if !selection.upstream.is_empty() {
            etrn_session = self
                .deliver(
                    Destination::upstream(&self.config),
                    selection.upstream,
                    progress,
                    summary,
                )
                .await?;
        }
        for (domain, msgs) in selection.held {
            if self.stopping() {
                break;
            }
            let dest = Destination::hold(&self.config, &domain);
            if let Some(s) = self.deliver(dest, msgs, progress, summary).await? {
                s.quit().await;
            }
        }
        // ETRN: ask the upstream to release this office's mail, whenever
        // the link is not known to be down.
        let wants_etrn = !self.config.flush.etrn.is_empty()
            && closed.is_none()
            && !opts.no_etrn
            && opts.domains.is_empty()
            && !self.stopping();
        if wants_etrn && summary.link != LinkState::Down {
            let session = match etrn_session {
                Some(s) => Some(s),
                None => match self.connect(&Destination::upstream(&self.config)).await {
                    Ok((s, _)) => {
                        self.link_up(&s, progress, summary).await?;
                        Some(s)
                    }
                    Err(e) => {
                        self.link_down(&e, 0, progress, summary).await?;
                        None
                    }
                },
            };
            if let Some(mut s) = session {
                for name in &self.config.flush.etrn {
                    let reply = match s.etrn(name).await {
                        Ok(r) => r.to_string(),
                        Err(e) => {
                            summary.error.get_or_insert(e.to_string());
                            break;
                        }
                    };
                    info!(upstream = %s.addr, name = %name, reply = %reply, "ETRN");
                    let r = EtrnResult {
                        name: name.clone(),
                        reply,
                    };
                    progress(&Event::Etrn(r.clone()));
                    summary.etrn.push(r);
                }
                s.quit().await;
                let text = summary
                    .etrn
                    .iter()
                    .map(|e| format!("{}: {}", e.name, e.reply))
                    .collect::<Vec<_>>()
                    .join("; ");
                self.writer
                    .apply(vec![Change::EtrnSent {
                        at: unix_now(),
                        result: text,
                    }])
                    .await?;
            }
        } else if let Some(s) = etrn_session {
            s.quit().await;
        }
        // ATRN: take this office's held mail over our own connection.
        let wants_atrn = !self.config.flush.atrn.is_empty()
            && closed.is_none()
            && !opts.no_etrn
            && opts.domains.is_empty()
            && summary.link != LinkState::Down
            && !self.stopping();
        if wants_atrn {
            self.take_by_atrn(summary).await?;
        }
        Ok(())
    }

    /// A decision's changes, with its notice turned into a DSN message
    /// (from `body`, or the stored original when not given).
    fn with_notice(
        &self,
        d: decide::Decision,
        m: &DueMessage,
        body: Option<&[u8]>,
        now: i64,
    ) -> Vec<Change> {
        let mut changes = d.changes;
        if let Some(n) = d.notice {
            let stored;
            let original = match body {
                Some(b) => b,
                None => {
                    stored = self.store.body(&m.id).ok().flatten().unwrap_or_default();
                    &stored[..]
                }
            };
            let domain = decide::sender_domain(m);
            let mailboxes = if self.config.is_local_domain(&domain) {
                let local = m.sender.rsplit_once('@').map(|(l, _)| l).unwrap_or("");
                crate::aliases::expand_local(&self.config, local).0
            } else {
                Vec::new()
            };
            changes.push(Change::Insert(Box::new(decide::notice_message(
                &self.config,
                m,
                &n,
                original,
                QueueId::generate(),
                mailboxes,
                now,
            ))));
        }
        changes
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    async fn link_up(
        &self,
        s: &Session,
        progress: &mut (dyn FnMut(&Event) + Send),
        summary: &mut Summary,
    ) -> Result<(), StoreError> {
        info!(upstream = %s.addr, tls = s.tls.as_deref().unwrap_or("none"), "link up");
        self.writer
            .apply(vec![Change::Link {
                state: LinkState::Up,
                error: None,
                at: unix_now(),
            }])
            .await?;
        summary.link = LinkState::Up;
        progress(&Event::Link {
            state: LinkState::Up,
            upstream: s.addr.clone(),
            tls: s.tls.clone(),
            error: None,
        });
        Ok(())
    }

    async fn link_down(
        &self,
        e: &LinkError,
        pending: usize,
        progress: &mut (dyn FnMut(&Event) + Send),
        summary: &mut Summary,
    ) -> Result<(), StoreError> {
        let upstream = self.config.upstream.server.clone();
        warn!(upstream = %upstream, error = %e, pending, "link down: nothing sent, no attempt counted");
        self.writer
            .apply(vec![Change::Link {
                state: LinkState::Down,
                error: Some(e.to_string()),
                at: unix_now(),
            }])
            .await?;
        summary.link = LinkState::Down;
        summary.error = Some(e.to_string());
        progress(&Event::Link {
            state: LinkState::Down,
            upstream,
            tls: None,
            error: Some(e.to_string()),
        });
        Ok(())
    }

    /// `outpost queue bounce`: return these messages' recipients still
    /// waiting to the sender with a DSN, as if the upstream had said 5xx.
    pub fn admin_bounce(&self, ids: &[String]) -> Result<Vec<Change>, StoreError> {
        let reply = client::UpstreamReply {
            code: 550,
            text: "5.0.0 returned to the sender by the administrator".into(),
        };
        let now = unix_now();
        let mut changes = Vec::new();
        for m in self
            .store
            .pending_outbound()?
            .iter()
            .filter(|m| ids.contains(&m.id))
        {
            let outcomes = vec![Outcome::Bounced(reply.clone()); m.recipients.len()];
            let a = decide::attempt(
                m,
                &outcomes,
                &self.config.hostname,
                now,
                &self.config,
                &mut rand::rng(),
            );
            changes.extend(self.with_notice(a.decision, m, None, now));
        }
        Ok(changes)
    }
}

/// Where a group of recipients goes.
#[derive(Debug, Clone)]
struct Destination {
    /// "upstream", or the hold domain.
    name: String,
    server: String,
    /// The upstream relay: link state, its TLS policy and account, and
    /// `upstream.connections` apply.
    upstream: bool,
    /// A branch of this hub: how its certificate is checked
    /// (`hub.routes`). None for the upstream.
    route: Option<crate::config::HubRoute>,
}

impl Destination {
    fn upstream(config: &Config) -> Destination {
        Destination {
            name: "upstream".into(),
            server: config.upstream.server.clone(),
            upstream: true,
            route: None,
        }
    }

    fn hold(config: &Config, domain: &str) -> Destination {
        let route = config.hub.destination(domain);
        Destination {
            name: domain.to_string(),
            server: route.server.clone(),
            upstream: false,
            route: Some(route),
        }
    }

    /// The host named in the configuration (not one DNS led to): the
    /// name a certificate is checked against unless a `tls_name` is set.
    fn configured_host(&self) -> Result<String, LinkError> {
        crate::config::parse_server(&self.server)
            .map(|s| s.host)
            .map_err(LinkError::Config)
    }
}
