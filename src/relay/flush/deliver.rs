//! Running the connections of a flush: connect, share the due mail among
//! `upstream.connections` workers, send it, and commit each message's
//! outcome as soon as its reply arrives.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tracing::{info, warn, Instrument};

use super::super::client::{
    self, ClientSettings, LinkError, OutRecipient, Outcome, Outgoing, Report, Session, TlsPolicy,
};
use super::super::decide::{self, Counts};
use super::super::route;
use super::{Destination, Event, Flusher, RcptResult, Summary};
use crate::config::{Config, UpstreamTls};
use crate::queue::{unix_now, Change, DueMessage, LinkState, StoreError};

/// Messages handed to one connection at a time, and their octets at most:
/// each batch starts its pipeline afresh (one round trip more), and its
/// bodies are in memory together.
const BATCH: usize = 256;
const BATCH_BYTES: i64 = 16 << 20;

impl Flusher {
    /// Sends `due` to one destination over `connections` sessions. Returns a
    /// session still open (for ETRN), if one is.
    pub(super) async fn deliver(
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
    pub(super) async fn send_over(
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
            // Every line a connection logs carries where it goes.
            let span = tracing::info_span!("upstream", dest = %dest.name, conn = i + 1);
            workers.push(tokio::spawn(
                async move { w.worker(dest, session, settings, queues, batch, tx).await }
                    .instrument(span),
            ));
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
                summary.link = LinkState::Down;
            }
            summary.error.get_or_insert(e);
        }
        Ok(open)
    }

    /// Opens the first session, trying each address in turn.
    pub(super) async fn connect(
        &self,
        dest: &Destination,
    ) -> Result<(Session, ClientSettings), LinkError> {
        let targets = route::targets(&dest.server, self.config.upstream.resolver).await?;
        // Certificates are checked against the configured name, never
        // against one that came from DNS (an MX record is not
        // authenticated).
        let settings = self.settings(dest, &dest.configured_host()?)?;
        let mut last = None;
        for t in &targets {
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

    pub(super) fn settings(
        &self,
        dest: &Destination,
        host: &str,
    ) -> Result<ClientSettings, LinkError> {
        let up = &self.config.upstream;
        if !dest.upstream {
            // A branch of this hub: no account; TLS as its route says
            // (when offered, unverified, unless the route requires it).
            let route = dest
                .route
                .clone()
                .unwrap_or_else(|| crate::config::HubRoute::to(dest.server.clone()));
            let verify = route.tls == UpstreamTls::Required;
            return Ok(ClientSettings {
                helo: self.config.hostname.clone(),
                tls: tls_policy(route.tls),
                tls_config: crate::tls::client_config(verify, route.ca_file.as_deref())
                    .map_err(|e| LinkError::Config(format!("hub.routes, {}: {e}", dest.name)))?,
                tls_name: route.tls_name.unwrap_or_else(|| host.to_string()),
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
                        let o = outgoing(&m, b, &self.config.hostname);
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
            let progress = s.progress();
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
            let watch = self.watch_transfer(&progress, &sendable, &peer);
            let (sent, ()) = tokio::select! {
                done = async { tokio::join!(send, record) } => done,
                never = watch => match never {},
            };
            self.count_resumed(&progress);
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

    /// While a big message goes alone, records every few seconds how far
    /// it has got, for `outpost status` and `queue show`. Never ends.
    async fn watch_transfer(
        &self,
        progress: &client::Progress,
        sent: &[(DueMessage, Outgoing)],
        peer: &str,
    ) -> std::convert::Infallible {
        use std::sync::atomic::Ordering::Relaxed;
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            let k = progress.message.load(Relaxed);
            let Some((m, _)) = k.checked_sub(1).and_then(|i| sent.get(i)) else {
                continue;
            };
            let now = unix_now();
            let started_at = progress.started_at.load(Relaxed);
            let t = crate::queue::Transfer {
                message_id: m.id.clone(),
                upstream: peer.to_string(),
                size: progress.size.load(Relaxed) as i64,
                resumed_at: progress.resumed_at.load(Relaxed) as i64,
                // Dot-stuffing and the command lines go too: at most the
                // message's size is counted.
                sent: progress.sent.load(Relaxed).min(progress.size.load(Relaxed)) as i64,
                started_at,
                updated_at: now,
            };
            if let Err(e) = self.writer.apply(vec![Change::Transfer(t)]).await {
                warn!(queue_id = %m.id, error = %e, "could not record how far the transfer has got");
            }
        }
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
                self.count_attempts(&a.counts);
                for r in &a.results {
                    info!(queue_id = %m.id, rcpt = %r.address, upstream = %peer, outcome = %r.outcome,
                          reply = r.reply.as_deref().unwrap_or(""), "delivery attempt");
                }
                changes.extend(self.with_notice(a.decision, m, Some(&out.body), now));
                if m.size > client::RESUME_OVER as i64 {
                    changes.push(Change::TransferDone {
                        message_id: m.id.clone(),
                    });
                }
                reports.push(WorkerReport::Message {
                    id: m.id.clone(),
                    results: a.results,
                    counts: a.counts,
                });
            }
            if upstream && octets > 0 {
                self.metrics.sent_upstream(octets);
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

fn outgoing(m: &DueMessage, body: Vec<u8>, hostname: &str) -> Outgoing {
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
        dsn_ret: m.dsn_ret,
        dsn_envid: m.dsn_envid.clone(),
        transid: Some(decide::transid(m, hostname)),
        body,
    }
}

fn tls_policy(t: UpstreamTls) -> TlsPolicy {
    match t {
        UpstreamTls::Required => TlsPolicy::Required,
        UpstreamTls::Opportunistic => TlsPolicy::Opportunistic,
        UpstreamTls::None => TlsPolicy::None,
    }
}

/// How to talk to the upstream named `host` in the configuration: EHLO
/// name, TLS policy and trust (the certificate must carry
/// `upstream.tls_name`, else `host`), account, timeouts. Fails when the
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
        tls: tls_policy(up.tls),
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
        warn!(file = %path.display(), "upstream.password_file is readable by every user: chown root:outpost it and chmod 640 it");
    }
    let s = std::fs::read_to_string(path)
        .map_err(|e| format!("upstream.password_file {}: {e}", path.display()))?;
    Ok(s.lines().next().unwrap_or("").to_string())
}
