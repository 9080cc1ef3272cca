//! A flush: send what is due to the upstream, record what happened.
//!
//! One flush at a time, across processes: a lock file beside the database,
//! shared by the daemon and `outpost flush`, so no message is ever sent by
//! two flushers at once. A link that does not answer (DNS, connect, TLS,
//! greeting, AUTH, timeout) marks the link down and burns no attempt
//! (DESIGN rule 6); `retry.max_age` counts only time with the link up.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rand::Rng;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::client::{
    self, ClientSettings, LinkError, OutRecipient, Outcome, Outgoing, Session, TlsPolicy,
};
use super::dsn::{self, DsnKind, DsnRecipient, DsnRequest};
use super::route;
use crate::config::{Config, Uncertain, UpstreamTls};
use crate::queue::{
    unix_now, Change, DueMessage, LinkState, NewMessage, NewRecipient, QueueId, RecipientChange,
    RecipientState, Route, Store, StoreError, Writer,
};

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
}

impl Summary {
    pub fn link_down(&self) -> bool {
        self.link == "down"
    }
}

/// Runs flushes; cheap to clone.
#[derive(Clone)]
pub struct Flusher {
    pub config: Arc<Config>,
    pub store: Arc<Store>,
    pub writer: Writer,
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
        }
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
        let (pending, link) = tokio::task::spawn_blocking(move || {
            Ok::<_, StoreError>((store.pending_outbound()?, store.link(now)?))
        })
        .await
        .map_err(|e| StoreError::Failed(e.to_string()))??;
        summary.link = link.state.to_string();

        // Age first: expiry and delay warnings do not need the link.
        let mut due = Vec::new();
        for m in pending {
            match self.age(&m, link.up_clock, now) {
                Aging::Expire(changes, n) => {
                    self.writer.apply(changes).await?;
                    summary.expired += n;
                }
                Aging::Warn(changes, n) => {
                    self.writer.apply(changes).await?;
                    summary.delay_warnings += n;
                    due.push(m);
                }
                Aging::Fine => due.push(m),
            }
        }
        // Then what is due now (or everything with --all), in the domains
        // asked, split by where it goes: the upstream, or a hold domain's
        // branch.
        let mut upstream: VecDeque<DueMessage> = VecDeque::new();
        let mut held: std::collections::BTreeMap<String, VecDeque<DueMessage>> = Default::default();
        let mut count = 0;
        for m in due {
            if opts.etrn_only {
                break;
            }
            let mine: Vec<_> = m
                .recipients
                .iter()
                .filter(|r| (opts.all || r.next_attempt <= now) && opts.covers(&r.domain))
                .cloned()
                .collect();
            let (up, hold): (Vec<_>, Vec<_>) =
                mine.into_iter().partition(|r| r.route == Route::Upstream);
            if !up.is_empty() {
                count += 1;
                upstream.push_back(DueMessage {
                    recipients: up,
                    ..m.clone()
                });
            }
            let mut by_domain: std::collections::BTreeMap<String, Vec<_>> = Default::default();
            for r in hold {
                by_domain
                    .entry(r.domain.to_ascii_lowercase())
                    .or_default()
                    .push(r);
            }
            for (d, rcpts) in by_domain {
                count += 1;
                held.entry(d).or_default().push_back(DueMessage {
                    recipients: rcpts,
                    ..m.clone()
                });
            }
        }
        progress(&Event::Start { due: count });

        let mut etrn_session = None;
        if !upstream.is_empty() {
            etrn_session = self
                .deliver(
                    Destination::upstream(&self.config),
                    upstream,
                    progress,
                    summary,
                )
                .await?;
        }
        for (domain, msgs) in held {
            let dest = Destination::hold(&self.config, &domain);
            if let Some(s) = self.deliver(dest, msgs, progress, summary).await? {
                s.quit().await;
            }
        }
        // ETRN: ask the upstream to release this office's mail, whenever
        // the link is not known to be down.
        let wants_etrn =
            !self.config.flush.etrn.is_empty() && !opts.no_etrn && opts.domains.is_empty();
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
        Ok(())
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
                        .map(|(m, r)| self.held_again(&m.id, r.idx, &text))
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
        let n = if dest.upstream {
            self.config.upstream.connections.max(1) as usize
        } else {
            1
        };
        // Every connection gets a share: a short queue is not taken whole
        // by the first worker while the others find nothing.
        let batch = due.len().div_ceil(n).clamp(1, BATCH);
        let queue = Arc::new(Mutex::new(due));
        let (tx, mut rx) = mpsc::unbounded_channel::<WorkerReport>();
        let mut workers = Vec::new();
        let mut first = Some(first);
        for _ in 0..n {
            let w = self.clone();
            let queue = queue.clone();
            let tx = tx.clone();
            let session = first.take();
            let (settings, dest) = (settings.clone(), dest.clone());
            workers.push(tokio::spawn(async move {
                w.worker(dest, session, settings, queue, batch, tx).await
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
        let left: usize = queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|m| m.recipients.len())
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

    /// A hold-domain recipient goes back to waiting for ETRN.
    fn held_again(&self, message_id: &str, idx: u32, why: &str) -> Change {
        let now = unix_now();
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
                },
            });
        }
        let cfg_err = |e: String| LinkError::Tls {
            addr: up.server.clone(),
            error: e,
        };
        let tls_config =
            crate::tls::client_config(up.tls == UpstreamTls::Required, up.ca_file.as_deref())
                .map_err(|e| cfg_err(e.to_string()))?;
        let auth = match (&up.username, &up.password_file) {
            (Some(user), Some(file)) => Some((
                user.clone(),
                read_secret(file).map_err(|e| LinkError::NoAuth { addr: e })?,
            )),
            (Some(_), None) => {
                return Err(LinkError::NoAuth {
                    addr: "upstream.username is set but upstream.password_file is not".into(),
                })
            }
            _ => None,
        };
        Ok(ClientSettings {
            helo: self.config.hostname.clone(),
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
            },
        })
    }

    async fn worker(
        &self,
        dest: Destination,
        mut session: Option<Session>,
        settings: ClientSettings,
        queue: Arc<Mutex<VecDeque<DueMessage>>>,
        batch_max: usize,
        tx: mpsc::UnboundedSender<WorkerReport>,
    ) -> Option<Session> {
        loop {
            let batch: Vec<DueMessage> = {
                let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
                let mut n = 0;
                let mut bytes = 0;
                while n < q.len().min(batch_max) && (n == 0 || bytes + q[n].size <= BATCH_BYTES) {
                    bytes += q[n].size;
                    n += 1;
                }
                q.drain(..n).collect()
            };
            if batch.is_empty() {
                break;
            }
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
            let mut sendable: Vec<(usize, Outgoing)> = Vec::new();
            for (i, (m, body)) in batch.iter().zip(&bodies).enumerate() {
                match body {
                    Some(b) => sendable.push((i, outgoing(m, b.clone()))),
                    None => warn!(queue_id = %m.id, "message body missing from the store; skipped"),
                }
            }
            let refs: Vec<&Outgoing> = sendable.iter().map(|(_, o)| o).collect();
            let (results, back) = s.send_batch(&refs).await;
            for ((i, _), outcomes) in sendable.iter().zip(results) {
                let m = &batch[*i];
                let body = bodies[*i].as_deref().unwrap_or_default();
                let (changes, rcpt_results, counts) = self.record(m, body, &outcomes, &peer);
                if !changes.is_empty() {
                    if let Err(e) = self.writer.apply(changes).await {
                        let _ = tx.send(WorkerReport::StoreFailed(e.to_string()));
                    }
                }
                for r in &rcpt_results {
                    info!(queue_id = %m.id, rcpt = %r.address, upstream = %peer, outcome = %r.outcome,
                          reply = r.reply.as_deref().unwrap_or(""), "delivery attempt");
                }
                let _ = tx.send(WorkerReport::Message {
                    id: m.id.clone(),
                    results: rcpt_results,
                    counts,
                });
            }
            match back {
                Some(s) => session = Some(s),
                None => {
                    let _ = tx.send(WorkerReport::Lost(format!("connection to {peer} lost")));
                    return None;
                }
            }
        }
        session
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

    /// `outpost queue bounce`: return these messages' pending upstream
    /// recipients to the sender with a DSN, as if the upstream had said 5xx.
    pub fn admin_bounce(&self, ids: &[String]) -> Result<Vec<Change>, StoreError> {
        let reply = client::Reply {
            code: 550,
            text: "5.0.0 returned to the sender by the administrator".into(),
        };
        let mut changes = Vec::new();
        for m in self
            .store
            .pending_outbound()?
            .iter()
            .filter(|m| ids.contains(&m.id))
        {
            let outcomes = vec![Outcome::Bounced(reply.clone()); m.recipients.len()];
            changes.extend(self.record(m, &[], &outcomes, &self.config.hostname).0);
        }
        Ok(changes)
    }

    /// What to write after one message's attempt.
    fn record(
        &self,
        m: &DueMessage,
        body: &[u8],
        outcomes: &[Outcome],
        peer: &str,
    ) -> (Vec<Change>, Vec<RcptResult>, Counts) {
        let now = unix_now();
        let mut changes = Vec::new();
        let mut results = Vec::new();
        let mut counts = Counts::default();
        let mut failed: Vec<DsnRecipient> = Vec::new();
        for (r, o) in m.recipients.iter().zip(outcomes) {
            // Every outcome here is an attempt: (state, next attempt, reply, uncertain, what happened).
            let (state, next, reply, uncertain, event) = match o {
                Outcome::Delivered(rep) => {
                    counts.delivered += 1;
                    (
                        RecipientState::Delivered,
                        now,
                        Some(rep.to_string()),
                        false,
                        "delivered",
                    )
                }
                Outcome::Deferred(rep) => {
                    counts.deferred += 1;
                    let next = next_attempt(now, r.attempts + 1, &self.config);
                    (
                        RecipientState::Deferred,
                        next,
                        Some(rep.to_string()),
                        false,
                        "deferred",
                    )
                }
                Outcome::Bounced(rep) => {
                    counts.bounced += 1;
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
                        Some(rep.to_string()),
                        false,
                        "bounced",
                    )
                }
                Outcome::Uncertain(why) => {
                    counts.uncertain += 1;
                    let text = format!("delivery uncertain: the message was sent but {peer} did not confirm it ({why})");
                    let state = match self.config.retry.uncertain {
                        Uncertain::Resend => RecipientState::Queued,
                        Uncertain::Hold => RecipientState::Held,
                    };
                    (state, now, Some(text), true, "uncertain")
                }
                Outcome::Untouched => {
                    counts.untouched += 1;
                    continue;
                }
            };
            // Hold-domain mail that did not go waits for the next ETRN.
            let state = if r.route == Route::Hold && !state.is_final() {
                RecipientState::Held
            } else {
                state
            };
            results.push(RcptResult {
                address: r.address.clone(),
                outcome: event.into(),
                reply: reply.clone(),
            });
            changes.push(Change::Recipient(RecipientChange {
                message_id: m.id.clone(),
                idx: r.idx,
                state,
                attempted: true,
                next_attempt: next,
                detail: format!("{} ({peer})", reply.as_deref().unwrap_or("")),
                last_reply: reply,
                uncertain,
                warned: false,
                at: now,
                event,
            }));
        }
        if let Some(dsn) = self.dsn(m, body, DsnKind::Failure, failed, now) {
            changes.push(dsn);
        }
        (changes, results, counts)
    }

    /// Expiry and delay warnings for one pending message.
    fn age(&self, m: &DueMessage, up_clock: i64, now: i64) -> Aging {
        let retry = &self.config.retry;
        let wall = now - m.received_at;
        let up_age = up_clock - m.up_clock_at_receipt;
        if wall > retry.max_age_absolute.as_secs() as i64 || up_age > retry.max_age.as_secs() as i64
        {
            let why = if wall > retry.max_age_absolute.as_secs() as i64 {
                format!(
                    "4.4.7 message expired: waited {} in all (retry.max_age_absolute)",
                    human(wall)
                )
            } else {
                format!(
                    "4.4.7 message expired: not delivered in {} with the link up (retry.max_age)",
                    human(up_age)
                )
            };
            let mut changes = Vec::new();
            let mut rcpts = Vec::new();
            for r in &m.recipients {
                changes.push(Change::Recipient(RecipientChange {
                    message_id: m.id.clone(),
                    idx: r.idx,
                    state: RecipientState::Expired,
                    attempted: false,
                    next_attempt: now,
                    last_reply: Some(why.clone()),
                    uncertain: false,
                    warned: false,
                    at: now,
                    event: "expired",
                    detail: why.clone(),
                }));
                rcpts.push(DsnRecipient {
                    address: r.address.clone(),
                    orcpt: r.orcpt.clone(),
                    status: "4.4.7".into(),
                    diagnostic: r.last_reply.clone(),
                    remote_mta: None,
                    last_attempt: None,
                    will_retry_until: None,
                });
            }
            let n = rcpts.len();
            changes.extend(self.dsn(m, &[], DsnKind::Failure, rcpts, now));
            return Aging::Expire(changes, n);
        }
        let warn_after = retry.delay_warning.as_secs() as i64;
        if warn_after > 0 && wall >= warn_after {
            let cold: Vec<_> = m.recipients.iter().filter(|r| !r.warned).collect();
            if !cold.is_empty() {
                let until = m.received_at + retry.max_age_absolute.as_secs() as i64;
                let mut changes: Vec<Change> = cold
                    .iter()
                    .map(|r| Change::Warned {
                        message_id: m.id.clone(),
                        idx: r.idx,
                    })
                    .collect();
                let rcpts: Vec<DsnRecipient> = cold
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
                let dsn = self.dsn(m, &[], DsnKind::Delay, rcpts, now);
                let sent = dsn.is_some();
                changes.extend(dsn);
                return Aging::Warn(changes, usize::from(sent));
            }
        }
        Aging::Fine
    }

    /// A DSN to the sender, when one is wanted: never for the null sender
    /// (no bounce storms), and as NOTIFY asks (absent: failures and delays).
    /// `body` may be empty: it is then read from the store.
    fn dsn(
        &self,
        m: &DueMessage,
        body: &[u8],
        kind: DsnKind,
        rcpts: Vec<DsnRecipient>,
        now: i64,
    ) -> Option<Change> {
        if m.sender.is_empty() {
            return None;
        }
        let want = match kind {
            DsnKind::Failure => "FAILURE",
            DsnKind::Delay => "DELAY",
        };
        let rcpts: Vec<DsnRecipient> = rcpts
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
        if rcpts.is_empty() {
            return None;
        }
        let stored;
        let original = if body.is_empty() {
            stored = self.store.body(&m.id).ok().flatten().unwrap_or_default();
            &stored[..]
        } else {
            body
        };
        let host = &self.config.hostname;
        let from = format!("MAILER-DAEMON@{host}");
        let bytes = dsn::build(&DsnRequest {
            kind,
            reporting_mta: host,
            queue_id: &m.id,
            envid: m.dsn_envid.as_deref(),
            arrival: m.received_at,
            to: &m.sender,
            from: &from,
            recipients: &rcpts,
            original,
            return_full: m.dsn_ret.as_deref() == Some("FULL"),
            now,
        });
        let domain = m
            .sender
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default();
        // A local sender's notice goes straight to their mailbox: it does
        // not wait behind a dead link (DESIGN rule 6).
        let (route, mailboxes) = if self.config.is_local_domain(&domain) {
            let local = m.sender.rsplit_once('@').map(|(l, _)| l).unwrap_or("");
            (
                Route::Local,
                crate::smtp::policy::expand_local(&self.config, local).0,
            )
        } else {
            (Route::Upstream, Vec::new())
        };
        Some(Change::Insert(Box::new(NewMessage {
            id: QueueId::generate(),
            received_at: now,
            sender: self.config.upstream.dsn_sender.clone().unwrap_or_default(),
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
                mailboxes,
            }],
            body: bytes,
        })))
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

enum Aging {
    Fine,
    /// Changes to commit; recipients expired.
    Expire(Vec<Change>, usize),
    /// Changes to commit; warnings sent. The message is still due.
    Warn(Vec<Change>, usize),
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    delivered: usize,
    deferred: usize,
    bounced: usize,
    uncertain: usize,
    untouched: usize,
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

/// Exponential back-off from `retry.base`, capped at `retry.max`, with
/// ±10 % jitter so deferred mail does not all come due at once.
pub fn next_attempt(now: i64, attempts: u32, config: &Config) -> i64 {
    let base = config.retry.base.as_secs_f64();
    let max = config.retry.max.as_secs_f64();
    let exp = base * 2f64.powi(attempts.saturating_sub(1).min(30) as i32);
    let delay = exp.min(max);
    let jitter = rand::rng().random_range(0.9..=1.1);
    now + (delay * jitter).round().max(1.0) as i64
}

fn human(secs: i64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(secs.max(0) as u64)).to_string()
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
        let path = Self::path(store);
        tokio::task::spawn_blocking(move || {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| format!("flush lock {}: {e}", path.display()))?;
            f.lock()
                .map_err(|e| format!("flush lock {}: {e}", path.display()))?;
            Ok(FlushLock(f))
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn backoff_grows_and_is_capped() {
        let c = Config::parse("[retry]\nbase = \"60s\"\nmax = \"10m\"\n", Path::new("t")).unwrap();
        for _ in 0..50 {
            let d1 = next_attempt(0, 1, &c);
            assert!((54..=66).contains(&d1), "{d1}");
            let d3 = next_attempt(0, 3, &c);
            assert!((216..=264).contains(&d3), "{d3}");
            let d20 = next_attempt(0, 20, &c);
            assert!((540..=660).contains(&d20), "{d20}");
        }
    }

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
