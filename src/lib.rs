//! outpost: a store-and-forward mail gateway for branch offices.
//!
//! The pipeline, one module per arrow: `server` accepts connections and
//! `smtp` (or `pop3`) runs each session; `queue` keeps the mail (the only
//! module that opens the database); `relay` forwards it (the flush, the
//! client, link economy); `control` lets `outpost flush` reach the daemon;
//! `cli` is the command line. This file wires the daemon together: the
//! flush runner and its schedule, the link prober, ATRN both ways,
//! housekeeping and reloads. The library never touches process-wide state
//! (signals, argv, the global log subscriber): `main.rs` does.
//! `docs/ARCHITECTURE.md` has the module graph.

pub mod address;
pub mod aliases;
pub mod auth;
pub mod cli;
pub mod codec;
pub mod config;
pub mod control;
pub mod dotstuff;
pub mod guard;
pub mod imap;
pub mod logwriter;
pub mod metrics;
pub mod pop3;
pub mod queue;
pub mod relay;
pub mod server;
pub mod shared;
pub mod smtp;
pub mod tls;
pub mod web;
pub mod window;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tracing::{error, info, warn, Instrument};

use config::Config;
use queue::{LinkState, Store, Writer};
use relay::flush::{Event, FlushOptions, Flusher};
use shared::Shared;

/// The server's TLS acceptor for `config`, making a self-signed
/// certificate first when asked to.
fn acceptor(config: &Config) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
    let Some(t) = &config.tls else {
        return Ok(None);
    };
    let (server_config, provenance) = tls::server_config(t, &config.hostname)?;
    if let tls::Provenance::MadeSelfSigned = provenance {
        warn!(
            certificate = %t.certificate.display(),
            key = %t.key.display(),
            name = %config.hostname,
            "made a self-signed certificate (tls.self_signed = true); clients will not trust it, replace it with a real one"
        );
    }
    Ok(Some(tokio_rustls::TlsAcceptor::from(server_config)))
}

/// Runs the gateway until `stop` resolves, then drains and returns.
/// `ready` is called once every listener is bound (main.rs tells systemd).
/// Each configuration from `reload` (main.rs reads the file on SIGHUP and
/// sends only a valid one) applies to new sessions, listeners, policy, the
/// upstream and the schedule, without dropping open sessions.
pub async fn serve(
    config: Config,
    ready: impl FnOnce(),
    stop: impl Future<Output = ()>,
    mut reload: tokio::sync::mpsc::UnboundedReceiver<Config>,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let store = Arc::new(Store::open(&config.store.path).context("store.path")?);
    let (writer, writer_thread) = Writer::start(&config.store.path)?;
    let tls = acceptor(&config)?;
    let mut listeners = Vec::new();
    for l in &config.listen {
        let listener = TcpListener::bind(l.address).await.with_context(|| {
            format!(
                "cannot listen on {} (listen.address, mode {})",
                l.address, l.mode
            )
        })?;
        info!(address = %l.address, mode = %l.mode, "listening");
        listeners.push(server::Listener::Tcp(listener, l.clone()));
    }
    let submit = &config.submit;
    let group =
        match &submit.group {
            Some(g) => Some(control::group_id(g).with_context(|| {
                format!("submit.group: no group named {g} (see `getent group`)")
            })?),
            None => None,
        };
    let local = control::bind_socket(&submit.socket, submit.mode, group)
        .with_context(|| format!("submit.socket {}", submit.socket.display()))?;
    info!(socket = %submit.socket.display(), mode = format!("{:o}", submit.mode), "listening for local submission");
    listeners.push(server::Listener::Unix(local));
    if listeners.is_empty() {
        warn!("no [[listen]] entries: nothing will be accepted");
    }
    // GET /metrics and the status page, when asked for (bound now, so a
    // port in use stops the start like the mail listeners do).
    let web_listener = match &config.metrics {
        Some(m) => Some(TcpListener::bind(m.address).await.with_context(|| {
            format!(
                "cannot listen on {} (metrics.address): choose a free port, or remove [metrics]",
                m.address
            )
        })?),
        None => None,
    };
    let metrics = metrics::Metrics::default();
    // The flusher in use; a reload publishes a new one. At shutdown the
    // flush in progress finishes its transactions in flight and starts none.
    let stopping = Arc::new(AtomicBool::new(false));
    // Branch role: connections the hub turned around after our ATRN.
    let (turned_tx, turned_rx) = tokio::sync::mpsc::unbounded_channel();
    let (flusher_tx, flusher_rx) = watch::channel(
        Flusher::new(config.clone(), store.clone(), writer.clone())
            .stopping_on(stopping.clone())
            .serving_turned(turned_tx.clone())
            .counting_into(metrics.clone()),
    );
    let control = control::bind(&config.control.socket)
        .with_context(|| format!("control.socket {}", config.control.socket.display()))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let logins = Arc::new(guard::LoginGuard::default());
    let control_task = tokio::spawn(control::serve(
        control,
        config.control.socket.clone(),
        flusher_rx.clone(),
        logins.clone(),
        stop_rx.clone(),
    ));
    // Store housekeeping (purge, vacuum, WAL checkpoint): at start, then
    // every few minutes, until shutdown.
    let housekeeping = tokio::spawn(queue::run_housekeeping(
        store.clone(),
        writer.clone(),
        config.store.keep_history,
        config.smtp.checkpoint_keep,
        stop_rx.clone(),
    ));
    let submitted = Arc::new(Notify::new());
    let link_back = Arc::new(Notify::new());
    let prober = tokio::spawn(link_prober(
        flusher_rx.clone(),
        link_back.clone(),
        stop_rx.clone(),
    ));
    let (etrn_tx, etrn_rx) = tokio::sync::mpsc::unbounded_channel();
    let (atrn_tx, atrn_rx) = tokio::sync::mpsc::unbounded_channel();
    let triggers = shared::Triggers {
        submitted: Some(submitted.clone()),
        etrn: Some(etrn_tx),
        etrn_running: Default::default(),
        atrn: Some(atrn_tx),
    };
    let atrn_hub = tokio::spawn(atrn_hub(flusher_rx.clone(), atrn_rx, stop_rx.clone()));
    let runner = tokio::spawn(flush_runner(
        flusher_rx,
        submitted,
        link_back,
        etrn_rx,
        triggers.etrn_running.clone(),
        stop_rx.clone(),
    ));
    let shared = Arc::new(
        Shared::new(config.clone(), store.clone(), writer.clone(), tls, triggers)
            .with_logins(logins)
            .with_metrics(metrics.clone()),
    );
    let web = web_listener.map(|listener| {
        info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving /metrics and the status page");
        (
            tokio::spawn(web::serve(listener, shared.clone(), stop_rx.clone())),
            tokio::spawn(web::run_sampler(writer.clone(), stop_rx.clone())),
        )
    });
    // Sessions on turned connections see the daemon's stop like others.
    let (turned_phase_tx, turned_phase_rx) = watch::channel(shared::Phase::Running);
    let atrn_branch = tokio::spawn(atrn_branch(
        shared.clone(),
        turned_rx,
        turned_phase_rx,
        stop_rx.clone(),
    ));
    info!(hostname = %config.hostname, store = %config.store.path.display(), "outpost ready");
    ready();
    // Reloads: everything but the store, the sockets and logging.
    let (relisten_tx, relisten_rx) = tokio::sync::mpsc::unbounded_channel();
    let reloader = {
        let shared = shared.clone();
        let first = config.clone();
        let stopping = stopping.clone();
        tokio::spawn(async move {
            let writer = writer;
            while let Some(new) = reload.recv().await {
                let tls = match acceptor(&new) {
                    Ok(t) => t,
                    Err(e) => {
                        error!("reload refused, the running configuration stays: {e:#}");
                        continue;
                    }
                };
                for (what, changed) in [
                    ("store.path", new.store.path != first.store.path),
                    ("control.socket", new.control.socket != first.control.socket),
                    (
                        "metrics.address",
                        new.metrics.as_ref().map(|m| m.address)
                            != first.metrics.as_ref().map(|m| m.address),
                    ),
                    (
                        "submit",
                        new.submit.socket != first.submit.socket
                            || new.submit.mode != first.submit.mode,
                    ),
                    (
                        "log",
                        new.log.level != first.log.level || new.log.format != first.log.format,
                    ),
                ] {
                    if changed {
                        warn!("{what} changed: that takes effect at the next restart");
                    }
                }
                let new = Arc::new(new);
                shared.reconfigure(new.clone(), tls);
                let _ = flusher_tx.send(
                    Flusher::new(new.clone(), store.clone(), writer.clone())
                        .stopping_on(stopping.clone())
                        .serving_turned(turned_tx.clone())
                        .counting_into(metrics.clone()),
                );
                // The server logs "configuration reloaded" once its
                // listeners follow.
                let _ = relisten_tx.send(new.clone());
            }
        })
    };
    server::run(shared, listeners, relisten_rx, stop).await;
    reloader.abort();
    let _ = reloader.await;
    let _ = std::fs::remove_file(&config.submit.socket);
    stopping.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    let _ = control_task.await;
    // A flush in progress (scheduled, or asked for on the control socket)
    // finishes the transactions in flight and starts none; each outcome is
    // committed as it arrives. It has ended when the flush lock is free.
    let drained = tokio::time::timeout(
        config.smtp.shutdown_grace,
        relay::flush::FlushLock::acquire(&config.store.path),
    )
    .await;
    if drained.is_err() {
        warn!("the flush in progress did not end within smtp.shutdown_grace; a message whose reply had not come yet will be sent again");
    }
    runner.abort();
    let _ = runner.await;
    let _ = prober.await;
    let _ = housekeeping.await;
    if let Some((server, sampler)) = web {
        let _ = server.await;
        let _ = sampler.await;
    }
    let _ = turned_phase_tx.send(shared::Phase::Stopped);
    let _ = atrn_hub.await;
    let _ = atrn_branch.await;
    // Every session and the flusher have ended; the last handle to the
    // writer is gone, and joining the thread waits for its last commit.
    writer_thread.join();
    info!("stopped");
    Ok(())
}

/// What woke the flush runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Interval,
    OnSubmit,
    Etrn,
    LinkBack,
    /// A flush window opened or closed, or a new day's budget began.
    Gate,
}

/// Flush on link-up: while the link is down and mail waits, a TCP connect
/// to the upstream every `flush.probe_interval` (slower after a long
/// outage, see [`relay::decide::probe_delay`]). When the upstream answers
/// again after it did not, the runner flushes at once. A link that takes
/// connections but fails later (TLS, AUTH) is not flushed again on every
/// probe: only the change from silent to answering wakes the runner.
async fn link_prober(
    flushers: watch::Receiver<Flusher>,
    link_back: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut answered = false;
    loop {
        let flusher = flushers.borrow().clone();
        let interval = flusher.config.flush.probe_interval;
        let store = flusher.store.clone();
        let now = queue::unix_now();
        let seen = tokio::task::spawn_blocking(move || {
            let link = store.link(now)?;
            let waits = link.state == LinkState::Down && store.mail_waits()?;
            Ok::<_, queue::StoreError>((link, waits))
        })
        .await;
        let delay = match seen {
            Ok(Ok((link, true))) => relay::decide::probe_delay(interval, now - link.since),
            _ => None,
        };
        // Nothing to probe: look again in a while.
        let wait = delay.unwrap_or(Duration::from_secs(5).max(interval));
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if delay.is_none() {
            answered = false;
            continue;
        }
        let now_answers = tokio::select! {
            _ = stop.changed() => return,
            a = flusher.probe() => a,
        };
        if now_answers && !answered {
            info!(upstream = %flusher.config.upstream.server, "the upstream answers again: flushing");
            link_back.notify_one();
        }
        answered = now_answers;
    }
}

/// The next item from `rx`, or None once `stop` changes or `rx` closes.
async fn next_or_stop<T>(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>,
    stop: &mut watch::Receiver<bool>,
) -> Option<T> {
    tokio::select! {
        _ = stop.changed() => None,
        t = rx.recv() => t,
    }
}

/// Hub role: each connection a branch turned around with ATRN gets the
/// held mail of its domains, delivered by the flusher of the moment.
async fn atrn_hub(
    flushers: watch::Receiver<Flusher>,
    mut turned: tokio::sync::mpsc::UnboundedReceiver<shared::Turned>,
    mut stop: watch::Receiver<bool>,
) {
    let mut running = tokio::task::JoinSet::new();
    loop {
        let Some(t) = next_or_stop(&mut turned, &mut stop).await else {
            break;
        };
        let flusher = flushers.borrow().clone();
        let span = tracing::info_span!("atrn", peer = %t.peer, account = %t.account);
        running.spawn(
            async move {
                let mut log = |e: &Event| {
                    if let Event::Done(s) = e {
                        info!(peer = %t.peer, account = %t.account, delivered = s.delivered,
                          deferred = s.deferred, bounced = s.bounced,
                          error = s.error.as_deref().unwrap_or(""), "ATRN delivery done");
                    }
                };
                flusher
                    .deliver_turned(t.io, t.peer.clone(), t.domains, &mut log)
                    .await;
            }
            .instrument(span),
        );
    }
    // A delivery in progress ends by itself (the flusher stops starting
    // transactions at shutdown).
    while running.join_next().await.is_some() {}
}

/// Branch role: a connection the hub turned around after our ATRN is
/// served like any SMTP connection from the hub (relay mode: mail for the
/// local and hold domains, relaying as `relay.networks` says).
async fn atrn_branch(
    shared: Arc<Shared>,
    mut turned: tokio::sync::mpsc::UnboundedReceiver<relay::flush::TurnedBack>,
    phase: watch::Receiver<shared::Phase>,
    mut stop: watch::Receiver<bool>,
) {
    let mut running = tokio::task::JoinSet::new();
    loop {
        let Some(t) = next_or_stop(&mut turned, &mut stop).await else {
            break;
        };
        let listen = config::Listen {
            address: t.peer,
            mode: config::ListenMode::Relay,
            plaintext_auth: Some(false),
        };
        let session = smtp::session::Session::new(
            shared.clone(),
            listen,
            shared::Peer::Tcp(t.peer),
            t.io,
            phase.clone(),
        );
        running.spawn(async move {
            info!(peer = %t.peer, "ATRN: serving the hub on our connection");
            session.run().await;
            let _ = t.done.send(());
        });
    }
    while running.join_next().await.is_some() {}
}

/// The instant of the next tick of a `period` schedule (see
/// [`relay::decide::next_tick`]): fixed by the wall clock, so traffic
/// never pushes it back.
fn next_tick(period: Duration) -> tokio::time::Instant {
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let at = relay::decide::next_tick(period, now_ms);
    tokio::time::Instant::now() + Duration::from_millis((at - now_ms).max(0) as u64)
}

/// The daemon's flush schedule: `flush.interval`, at fixed times (the
/// next tick is set when a scheduled flush starts, never pushed back by
/// other wake-ups); and as extra wake-ups, right after a message is
/// accepted (`flush.on_submit`) unless the link is known down, and, in the
/// hub role, a branch's ETRN. A burst of wake-ups runs one flush.
/// `outpost flush` does not come here: the control socket runs its own
/// flush (the flush lock serialises them).
async fn flush_runner(
    mut flushers: watch::Receiver<Flusher>,
    submitted: Arc<Notify>,
    link_back: Arc<Notify>,
    mut etrn: tokio::sync::mpsc::UnboundedReceiver<String>,
    etrn_running: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    mut stop: watch::Receiver<bool>,
) {
    // The schedule's period and its next tick.
    let mut schedule: Option<(Duration, tokio::time::Instant)> = None;
    loop {
        // The flusher (and so the configuration) of the moment.
        let flusher = flushers.borrow_and_update().clone();
        schedule = match (flusher.config.flush.interval, schedule) {
            (Some(i), Some((p, at))) if p == i => Some((i, at)),
            (Some(i), _) => Some((i, next_tick(i))),
            (None, _) => None,
        };
        let mut opts = FlushOptions::default();
        // The next edge of a window (or midnight, for the budget): a flush
        // then sends what waited, or marks the link closed.
        let gate_change = {
            let local = chrono::Local::now().naive_local();
            relay::decide::next_gate_change(&flusher.config.flush, local).map(|at| {
                let wait = (at - local).to_std().unwrap_or_default();
                tokio::time::Instant::now() + wait + Duration::from_secs(1)
            })
        };
        let trigger = tokio::select! {
            _ = stop.changed() => return,
            _ = flushers.changed() => continue,
            _ = async {
                match schedule {
                    Some((_, at)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => Trigger::Interval,
            _ = submitted.notified() => Trigger::OnSubmit,
            _ = link_back.notified() => Trigger::LinkBack,
            _ = async {
                match gate_change {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => Trigger::Gate,
            Some(spec) = etrn.recv() => {
                // Every request waiting now goes in this one delivery.
                opts.domains.push(spec);
                while let Ok(more) = etrn.try_recv() {
                    if !opts.domains.contains(&more) {
                        opts.domains.push(more);
                    }
                }
                opts.all = true;
                opts.no_etrn = true;
                Trigger::Etrn
            }
        };
        if trigger == Trigger::Interval {
            // The next tick is fixed now, as this flush starts: however
            // long it takes, the schedule does not drift.
            schedule = schedule.map(|(p, _)| (p, next_tick(p)));
        }
        if trigger == Trigger::OnSubmit && !flusher.config.flush.on_submit {
            continue;
        }
        if trigger == Trigger::OnSubmit {
            let store = flusher.store.clone();
            let link = tokio::task::spawn_blocking(move || store.link(queue::unix_now())).await;
            if matches!(link, Ok(Ok(ref l)) if matches!(l.state, LinkState::Down | LinkState::Closed))
            {
                continue;
            }
        }
        let mut log = |e: &Event| {
            if let Event::Done(s) = e {
                info!(
                    delivered = s.delivered,
                    deferred = s.deferred,
                    bounced = s.bounced,
                    expired = s.expired,
                    link = %s.link,
                    error = s.error.as_deref().unwrap_or(""),
                    trigger = ?trigger,
                    "flush done"
                );
            }
        };
        // A flush that started runs to its end; at shutdown it finishes
        // what is in flight, and `serve` waits for it up to
        // smtp.shutdown_grace.
        flusher
            .run(&opts, &mut log)
            .instrument(tracing::info_span!("flush", trigger = ?trigger))
            .await;
        if trigger == Trigger::Etrn {
            let mut running = etrn_running.lock().unwrap_or_else(|p| p.into_inner());
            for d in &opts.domains {
                running.remove(d);
            }
        }
    }
}
