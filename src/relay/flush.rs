//! A flush: send what is due to the upstream, record what happened.
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

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::client::{
    self, ClientSettings, LinkError, OutRecipient, Outcome, Outgoing, Report, Session, TlsPolicy,
};
use super::decide::{self, Counts};
use super::route;
use crate::config::{Config, UpstreamTls};
use crate::queue::{unix_now, Change, DueMessage, LinkState, QueueId, Store, StoreError, Writer};

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

/// `spec` is a domain, or `@domain` for the domain and its subdomains.
pub fn domain_matches(spec: &str, domain: &str) -> bool {
    match spec.strip_prefix('@') {
        Some(d) => {
            domain.eq_ignore_ascii_case(d)
                || (domain.len() > d.len() + 1
                    && domain.as_bytes()[domain.len() - d.len() - 1] == b'.'
                    && domain[domain.len() - d.len()..].eq_ignore_ascii_case(d))
        }
        None => domain.eq_ignore_ascii_case(spec),
    }
}

/// Progress, as `outpost flush` prints it (and `--json` streams it).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Start {
        due: usize,
    },
    Link {
        state: String,
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
    /// up, down or unknown (nothing was due, so the link was not tried).
    pub link: String,
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
    /// The link could not be used: down, or closed (a window or the
    /// budget) with mail waiting. `outpost flush` exits 75 then.
    pub fn link_down(&self) -> bool {
        self.link == "down" || (self.link == "closed" && self.waiting.total() > 0)
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
}

/// A connection to the hub that ATRN turned around: the hub is now the
/// client on it and this side must serve it; `done` is sent when the
/// session on it has ended.
pub struct TurnedBack {
    pub io: crate::codec::BoxedIo,
    /// The hub's address.
    pub peer: std::net::SocketAddr,
    pub done: tokio::sync::oneshot::Sender<()>,
}

/// Messages handed to one connection at a time, and their octets at most:
/// each batch starts its pipeline afresh (one round trip more), and its
/// bodies are in memory together.
const BATCH: usize = 256;
const BATCH_BYTES: i64 = 16 << 20;

impl Flusher {
    pub fn new(config: Arc<Config>, store: Arc<Store>, writer: Writer) -> Flusher {
        Flusher {
            config,
            store,
            writer,
            stop: Arc::default(),
            turned: None,
        }
    }

    /// Branch role: connections the hub turns around after ATRN go to
    /// `serve`, which runs an SMTP server session on each.
    pub fn serving_turned(mut self, serve: mpsc::UnboundedSender<TurnedBack>) -> Flusher {
        self.turned = Some(serve);
        self
    }

    /// Hub role: a branch turned its connection around with ATRN; deliver
    /// the held mail of `domains` over it, as a client, under the flush
    /// lock. Mail that does not go stays held for the next ATRN or ETRN.
    pub async fn deliver_turned(
        &self,
        io: crate::codec::BoxedIo,
        peer: String,
        domains: Vec<String>,
        progress: &mut (dyn FnMut(&Event) + Send),
    ) -> Summary {
        let mut summary = Summary {
            link: "unknown".into(),
            ..Summary::default()
        };
        let _lock = match FlushLock::acquire(&self.config.store.path).await {
            Ok(l) => l,
            Err(e) => {
                summary.error = Some(e);
                return summary;
            }
        };
        let store = self.store.clone();
        let pending = match tokio::task::spawn_blocking(move || store.pending_outbound()).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                summary.error = Some(e.to_string());
                return summary;
            }
            Err(e) => {
                summary.error = Some(e.to_string());
                return summary;
            }
        };
        let due = decide::held_for(pending, &domains);
        let dest = Destination {
            name: format!("ATRN {}", domains.join(",")),
            server: peer.clone(),
            upstream: false,
        };
        let settings = match self.settings(&dest, &peer) {
            Ok(s) => s,
            Err(e) => {
                summary.error = Some(e.to_string());
                return summary;
            }
        };
        let session = match Session::turned(io, peer.clone(), &settings).await {
            Ok(s) => s,
            Err(e) => {
                warn!(peer = %peer, error = %e, "ATRN: the branch did not take the turned connection");
                summary.error = Some(e.to_string());
                return summary;
            }
        };
        info!(peer = %peer, domains = %domains.join(","), messages = due.len(), "ATRN: delivering held mail over the branch's connection");
        progress(&Event::Start { due: due.len() });
        match self
            .send_over(dest, session, settings, due, progress, &mut summary)
            .await
        {
            Ok(Some(s)) => s.quit().await,
            Ok(None) => {}
            Err(e) => summary.error = Some(e.to_string()),
        }
        progress(&Event::Done(summary.clone()));
        summary
    }

    /// Branch role, after the outbound flush: ATRN at `upstream.odmr`
    /// for `flush.atrn`, and serve the connection the hub turns around.
    async fn take_by_atrn(&self, summary: &mut Summary) -> Result<(), StoreError> {
        let domains = &self.config.flush.atrn;
        let Some(serve) = &self.turned else {
            summary.atrn =
                Some("not asked: ATRN needs the daemon (outpost serve) to receive the mail".into());
            return Ok(());
        };
        let up = &self.config.upstream;
        let server = match &up.odmr {
            Some(s) => s.clone(),
            None => match crate::config::parse_server(&up.server) {
                Ok((host, _, _)) => format!("[{host}]:366"),
                Err(e) => {
                    summary.atrn = Some(format!("upstream.server: {e}"));
                    return Ok(());
                }
            },
        };
        let dest = Destination {
            name: "odmr".into(),
            server,
            upstream: true,
        };
        let (mut s, _) = match self.connect(&dest).await {
            Ok(s) => s,
            Err(e) => {
                warn!(odmr = %dest.server, error = %e, "ATRN: the hub's ODMR service is not usable");
                summary.atrn = Some(e.to_string());
                return Ok(());
            }
        };
        let reply = match s.atrn(domains).await {
            Ok(r) => r,
            Err(e) => {
                summary.atrn = Some(e.to_string());
                return Ok(());
            }
        };
        info!(odmr = %s.addr, domains = %domains.join(","), reply = %reply, "ATRN");
        summary.atrn = Some(reply.to_string());
        if reply.code != 250 {
            s.quit().await;
            return Ok(());
        }
        let peer = s
            .addr
            .parse()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let Some(io) = s.into_io() else {
            return Ok(());
        };
        let (done, finished) = tokio::sync::oneshot::channel();
        if serve.send(TurnedBack { io, peer, done }).is_ok() {
            // The hub delivers; this flush ends when it has.
            let _ = finished.await;
        }
        Ok(())
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
        let mut summary = Summary {
            link: "unknown".into(),
            ..Summary::default()
        };
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
        summary.link = link.state.to_string();
        // Windows and the budget, unless everything is asked for now.
        let gate = if opts.all {
            decide::Gate::wide_open()
        } else {
            decide::gate(&self.config.flush, local, sent_today)
        };

        // Age first: expiry and delay warnings do not need the link.
        let mut aged = Vec::with_capacity(pending.len());
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
                self.writer
                    .apply(self.with_notice(d, &m, None, now))
                    .await?;
                m.recipients.retain(|r| !finished.contains(&r.idx));
            }
            aged.push(m);
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
            summary.link = "closed".into();
            progress(&Event::Link {
                state: "closed".into(),
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
            summary.link = "unknown".into();
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
        if wants_etrn && summary.link != "down" {
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
            && summary.link != "down"
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
                crate::smtp::policy::expand_local(&self.config, local).0
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
        summary.link = "up".into();
        progress(&Event::Link {
            state: "up".into(),
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
        summary.link = "down".into();
        summary.error = Some(e.to_string());
        progress(&Event::Link {
            state: "down".into(),
            upstream,
            tls: None,
            error: Some(e.to_string()),
        });
        Ok(())
    }

    /// Sends `due` to one destination over `connections` sessions. Returns a
    /// session still open (for ETRN), if one is.
    async fn deliver(
        &self,
        dest: Destination,
        due: VecDeque<DueMessage>,
        progress: &mut (dyn FnMut(&Event) + Send),
        summary: &mut Summary,
    ) -> Result<Option<Session>, StoreError> {
        let (first, settings) = match self.connect(&dest).await {
            Ok(s) => s,
            Err(e) => {
                let n: usize = due.iter().map(|m| m.recipients.len()).sum();
                if dest.upstream {
                    self.link_down(&e, n, progress, summary).await?;
                    summary.untouched += n;
                } else {
                    // The branch is not there: its mail waits for the next ETRN.
                    info!(domain = %dest.name, error = %e, held = n, "branch unreachable; mail stays held");
                    let text = format!("{} unreachable: {e}", dest.name);
                    let changes = due
                        .iter()
                        .flat_map(|m| m.recipients.iter().map(move |r| (m, r)))
                        .map(|(m, r)| decide::held_again(&m.id, r.idx, &text, unix_now()))
                        .collect();
                    self.writer.apply(changes).await?;
                    summary.untouched += n;
                    summary.error.get_or_insert(text);
                }
                return Ok(None);
            }
        };
        if dest.upstream {
            self.link_up(&first, progress, summary).await?;
        } else {
            info!(domain = %dest.name, server = %first.addr, "delivering held mail");
        }
        self.send_over(dest, first, settings, due, progress, summary)
            .await
    }

    /// Sends `due` over `first` and, for the upstream, up to
    /// `upstream.connections` sessions in all. Returns a session still
    /// open (for ETRN), if one is.
    async fn send_over(
        &self,
        dest: Destination,
        first: Session,
        settings: ClientSettings,
        due: VecDeque<DueMessage>,
        progress: &mut (dyn FnMut(&Event) + Send),
        summary: &mut Summary,
    ) -> Result<Option<Session>, StoreError> {
        let n = if dest.upstream {
            self.config.upstream.connections.max(1) as usize
        } else {
            1
        };
        // Small mail and large mail wait apart. With several connections,
        // the last one takes the large messages first, so that they never
        // hold up the small ones; every other connection takes small mail
        // first. With one connection, large mail goes last.
        let large = self.config.flush.large_message_size as i64;
        let (big, small): (VecDeque<_>, VecDeque<_>) =
            due.into_iter().partition(|m| m.size > large);
        let big_lane = n > 1 && !big.is_empty();
        let small_lanes = if big_lane { n - 1 } else { n };
        // Every connection gets a share: a short queue is not taken whole
        // by the first worker while the others find nothing.
        let batch = small.len().div_ceil(small_lanes).clamp(1, BATCH);
        let small = Arc::new(Mutex::new(small));
        let big = Arc::new(Mutex::new(big));
        let (tx, mut rx) = mpsc::unbounded_channel::<WorkerReport>();
        let mut workers = Vec::new();
        let mut first = Some(first);
        for i in 0..n {
            let w = self.clone();
            let queues = if big_lane && i == n - 1 {
                vec![big.clone(), small.clone()]
            } else {
                vec![small.clone(), big.clone()]
            };
            let tx = tx.clone();
            let session = first.take();
            let (settings, dest) = (settings.clone(), dest.clone());
            workers.push(tokio::spawn(async move {
                w.worker(dest, session, settings, queues, batch, tx).await
            }));
        }
        drop(tx);
        let mut lost: Option<String> = None;
        while let Some(report) = rx.recv().await {
            match report {
                WorkerReport::Message {
                    id,
                    results,
                    counts,
                } => {
                    summary.delivered += counts.delivered;
                    summary.deferred += counts.deferred;
                    summary.bounced += counts.bounced;
                    summary.uncertain += counts.uncertain;
                    summary.untouched += counts.untouched;
                    progress(&Event::Message {
                        id,
                        recipients: results,
                    });
                }
                WorkerReport::Lost(e) => lost = Some(e),
                WorkerReport::StoreFailed(e) => summary.error = Some(e),
            }
        }
        let mut open = None;
        for w in workers {
            if let Ok(Some(s)) = w.await {
                match open {
                    None => open = Some(s),
                    Some(_) => s.quit().await,
                }
            }
        }
        let left: usize = [small, big]
            .iter()
            .flat_map(|q| {
                let q = q.lock().unwrap_or_else(|p| p.into_inner());
                q.iter().map(|m| m.recipients.len()).collect::<Vec<_>>()
            })
            .sum();
        summary.untouched += left;
        if let Some(e) = lost {
            if dest.upstream {
                // The link broke under us: what was not sent stays due.
                warn!(upstream = %dest.server, error = %e, "link lost during the flush");
                self.writer
                    .apply(vec![Change::Link {
                        state: LinkState::Down,
                        error: Some(e.clone()),
                        at: unix_now(),
                    }])
                    .await?;
                summary.link = "down".into();
            }
            summary.error.get_or_insert(e);
        }
        Ok(open)
    }

    /// Opens the first session, trying each address in turn.
    async fn connect(&self, dest: &Destination) -> Result<(Session, ClientSettings), LinkError> {
        let targets = route::targets(&dest.server, self.config.upstream.resolver).await?;
        let mut last = None;
        for t in &targets {
            let settings = self.settings(dest, &t.host)?;
            match Session::open(t.addr, &settings).await {
                Ok(s) => return Ok((s, settings)),
                Err(e) => {
                    info!(upstream = %t.addr, error = %e, "upstream not usable, trying the next");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| LinkError::Dns("no upstream address".into())))
    }

    fn settings(&self, dest: &Destination, host: &str) -> Result<ClientSettings, LinkError> {
        let up = &self.config.upstream;
        if !dest.upstream {
            // A branch of this hub: encrypt when offered, no account.
            return Ok(ClientSettings {
                helo: self.config.hostname.clone(),
                tls: TlsPolicy::Opportunistic,
                tls_config: crate::tls::client_config(false, None).map_err(|e| LinkError::Tls {
                    addr: dest.server.clone(),
                    error: e.to_string(),
                })?,
                tls_name: host.to_string(),
                auth: None,
                timeouts: client::Timeouts {
                    connect: up.connect_timeout,
                    command: up.command_timeout,
                    data: up.data_timeout,
                    final_reply: up.final_timeout,
                },
            });
        }
        upstream_settings(&self.config, host)
    }

    async fn worker(
        &self,
        dest: Destination,
        mut session: Option<Session>,
        settings: ClientSettings,
        queues: Vec<Arc<Mutex<VecDeque<DueMessage>>>>,
        batch_max: usize,
        tx: mpsc::UnboundedSender<WorkerReport>,
    ) -> Option<Session> {
        loop {
            if self.stopping() {
                break;
            }
            // A batch from the first queue (in this worker's order) that
            // has mail.
            let Some((queue, batch)) = queues.iter().find_map(|queue| {
                let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
                let mut n = 0;
                let mut bytes = 0;
                while n < q.len().min(batch_max) && (n == 0 || bytes + q[n].size <= BATCH_BYTES) {
                    bytes += q[n].size;
                    n += 1;
                }
                (n > 0).then(|| (queue, q.drain(..n).collect::<Vec<_>>()))
            }) else {
                break;
            };
            let s = match session.take() {
                Some(s) => s,
                None => match self.connect_more(&dest, &settings).await {
                    Some(s) => s,
                    None => {
                        queue
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .extend(batch);
                        return None;
                    }
                },
            };
            let peer = s.addr.clone();
            // Bodies are read per batch: memory holds one batch at a time.
            let store = self.store.clone();
            let ids: Vec<String> = batch.iter().map(|m| m.id.clone()).collect();
            let bodies = match tokio::task::spawn_blocking(move || {
                ids.iter()
                    .map(|id| store.body(id))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await
            {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    let _ = tx.send(WorkerReport::StoreFailed(e.to_string()));
                    s.quit().await;
                    return None;
                }
                Err(e) => {
                    let _ = tx.send(WorkerReport::StoreFailed(e.to_string()));
                    return None;
                }
            };
            let mut sendable: Vec<(DueMessage, Outgoing)> = Vec::new();
            for (m, body) in batch.into_iter().zip(bodies) {
                match body {
                    Some(b) => {
                        let o = outgoing(&m, b);
                        sendable.push((m, o));
                    }
                    None => warn!(queue_id = %m.id, "message body missing from the store; skipped"),
                }
            }
            // Outcomes come back as the upstream answers, and are committed
            // as they come (the writer groups them): a stop or a crash
            // later in the batch resends nothing the upstream took.
            let (otx, orx) = mpsc::unbounded_channel::<(usize, Vec<Outcome>)>();
            let refs: Vec<&Outgoing> = sendable.iter().map(|(_, o)| o).collect();
            let stop = self.stop.clone();
            let send = async move {
                let mut outcome = move |i: usize, o: Vec<Outcome>| {
                    let _ = otx.send((i, o));
                };
                let mut report = Report {
                    outcome: &mut outcome,
                    stop: &stop,
                };
                s.send_batch(&refs, &mut report).await
            };
            let record = self.record_as_they_come(orx, &sendable, &peer, dest.upstream, &tx);
            let (sent, ()) = tokio::join!(send, record);
            match sent {
                Ok(s) => session = Some(s),
                Err(e) => {
                    let _ = tx.send(WorkerReport::Lost(e.to_string()));
                    return None;
                }
            }
        }
        session
    }

    /// Commits outcomes as they arrive, all those waiting in one request.
    async fn record_as_they_come(
        &self,
        mut outcomes: mpsc::UnboundedReceiver<(usize, Vec<Outcome>)>,
        sent: &[(DueMessage, Outgoing)],
        peer: &str,
        upstream: bool,
        tx: &mpsc::UnboundedSender<WorkerReport>,
    ) {
        while let Some(first) = outcomes.recv().await {
            let mut ready = vec![first];
            while let Ok(more) = outcomes.try_recv() {
                ready.push(more);
            }
            let now = unix_now();
            let mut changes = Vec::new();
            let mut reports = Vec::new();
            // Octets that went over the link, for flush.daily_byte_budget.
            let mut octets = 0;
            for (i, o) in ready {
                let (m, out) = &sent[i];
                octets += m.size;
                let a = decide::attempt(m, &o, peer, now, &self.config, &mut rand::rng());
                for r in &a.results {
                    info!(queue_id = %m.id, rcpt = %r.address, upstream = %peer, outcome = %r.outcome,
                          reply = r.reply.as_deref().unwrap_or(""), "delivery attempt");
                }
                changes.extend(self.with_notice(a.decision, m, Some(&out.body), now));
                reports.push(WorkerReport::Message {
                    id: m.id.clone(),
                    results: a.results,
                    counts: a.counts,
                });
            }
            if upstream && octets > 0 {
                changes.push(Change::Sent {
                    day: chrono::Local::now().date_naive().to_string(),
                    bytes: octets,
                });
            }
            if !changes.is_empty() {
                if let Err(e) = self.writer.apply(changes).await {
                    let _ = tx.send(WorkerReport::StoreFailed(e.to_string()));
                }
            }
            for r in reports {
                let _ = tx.send(r);
            }
        }
    }

    /// The cheapest look at the link: does any upstream address take a TCP
    /// connection? Nothing is said on it; it is closed at once.
    pub async fn probe(&self) -> bool {
        let up = &self.config.upstream;
        let Ok(targets) = route::targets(&up.server, up.resolver).await else {
            return false;
        };
        for t in targets {
            let connect = tokio::net::TcpStream::connect(t.addr);
            if let Ok(Ok(_)) = tokio::time::timeout(up.connect_timeout, connect).await {
                return true;
            }
        }
        false
    }

    /// A further parallel connection; None when the upstream will not take one.
    async fn connect_more(&self, dest: &Destination, settings: &ClientSettings) -> Option<Session> {
        let targets = route::targets(&dest.server, self.config.upstream.resolver)
            .await
            .ok()?;
        for t in targets {
            if let Ok(s) = Session::open(t.addr, settings).await {
                return Some(s);
            }
        }
        None
    }

    /// `outpost queue bounce`: return these messages' recipients still
    /// waiting to the sender with a DSN, as if the upstream had said 5xx.
    pub fn admin_bounce(&self, ids: &[String]) -> Result<Vec<Change>, StoreError> {
        let reply = client::Reply {
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
}

impl Destination {
    fn upstream(config: &Config) -> Destination {
        Destination {
            name: "upstream".into(),
            server: config.upstream.server.clone(),
            upstream: true,
        }
    }

    fn hold(config: &Config, domain: &str) -> Destination {
        Destination {
            name: domain.to_string(),
            server: config.hub.destination(domain),
            upstream: false,
        }
    }
}

enum WorkerReport {
    Message {
        id: String,
        results: Vec<RcptResult>,
        counts: Counts,
    },
    Lost(String),
    StoreFailed(String),
}

fn outgoing(m: &DueMessage, body: Vec<u8>) -> Outgoing {
    Outgoing {
        sender: m.sender.clone(),
        recipients: m
            .recipients
            .iter()
            .map(|r| OutRecipient {
                address: r.address.clone(),
                notify: r.notify.clone(),
                orcpt: r.orcpt.clone(),
            })
            .collect(),
        eightbit: m.body_type.as_deref() == Some("8BITMIME") || body.iter().any(|&b| b >= 0x80),
        smtputf8: m.smtputf8,
        dsn_ret: m.dsn_ret.clone(),
        dsn_envid: m.dsn_envid.clone(),
        body,
    }
}

/// How to talk to the upstream at `host` (an address `upstream.server` led
/// to): EHLO name, TLS policy and trust, account, timeouts. Fails when the
/// configuration cannot be used as it is (the password file, the CA file).
pub fn upstream_settings(config: &Config, host: &str) -> Result<ClientSettings, LinkError> {
    let up = &config.upstream;
    let tls_config =
        crate::tls::client_config(up.tls == UpstreamTls::Required, up.ca_file.as_deref())
            .map_err(|e| LinkError::Config(format!("upstream.ca_file: {e}")))?;
    let auth = match (&up.username, &up.password_file) {
        (Some(user), Some(file)) => Some((user.clone(), read_secret(file).map_err(LinkError::Config)?)),
        (Some(_), None) => {
            return Err(LinkError::Config(
                "upstream.username is set but upstream.password_file is not: name the file that holds the password".into(),
            ))
        }
        _ => None,
    };
    Ok(ClientSettings {
        helo: config.hostname.clone(),
        tls: match up.tls {
            UpstreamTls::Required => TlsPolicy::Required,
            UpstreamTls::Opportunistic => TlsPolicy::Opportunistic,
            UpstreamTls::None => TlsPolicy::None,
        },
        tls_config,
        tls_name: up.tls_name.clone().unwrap_or_else(|| host.to_string()),
        auth,
        timeouts: client::Timeouts {
            connect: up.connect_timeout,
            command: up.command_timeout,
            data: up.data_timeout,
            final_reply: up.final_timeout,
        },
    })
}

fn read_secret(path: &Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("upstream.password_file {}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o004 != 0 {
        warn!(file = %path.display(), "upstream.password_file is readable by every user: chmod 640 it");
    }
    let s = std::fs::read_to_string(path)
        .map_err(|e| format!("upstream.password_file {}: {e}", path.display()))?;
    Ok(s.lines().next().unwrap_or("").to_string())
}

/// The exclusive flush lock: `<store path>.flush.lock`, flock(2)ed.
pub struct FlushLock(#[allow(dead_code)] std::fs::File);

impl FlushLock {
    pub fn path(store: &Path) -> PathBuf {
        let mut p = store.as_os_str().to_owned();
        p.push(".flush.lock");
        PathBuf::from(p)
    }

    /// Waits until no other flush runs, here or in another process.
    pub async fn acquire(store: &Path) -> Result<FlushLock, String> {
        let store = store.to_path_buf();
        tokio::task::spawn_blocking(move || Self::acquire_blocking(&store, |_| {}))
            .await
            .map_err(|e| e.to_string())?
    }

    /// The same, for a thread that may block; `waiting` is called once
    /// when another flush holds the lock (to tell the user why).
    pub fn acquire_blocking(
        store: &Path,
        waiting: impl FnOnce(&Path),
    ) -> Result<FlushLock, String> {
        let path = Self::path(store);
        let err = |e: std::io::Error| format!("flush lock {}: {e}", path.display());
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(err)?;
        match f.try_lock() {
            Ok(()) => return Ok(FlushLock(f)),
            Err(std::fs::TryLockError::WouldBlock) => waiting(&path),
            Err(std::fs::TryLockError::Error(e)) => return Err(err(e)),
        }
        f.lock().map_err(err)?;
        Ok(FlushLock(f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn flush_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("q.sqlite");
        let a = FlushLock::acquire(&store).await.unwrap();
        let waiting = tokio::spawn({
            let store = store.clone();
            async move { FlushLock::acquire(&store).await.map(|_| ()) }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "a second flush must wait");
        drop(a);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
