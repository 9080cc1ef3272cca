//! outpost: a store-and-forward mail gateway for branch offices.
//!
//! The pipeline, one module per arrow: `smtp` accepts mail, `queue` keeps it
//! (the only module that opens the database), `cli` is the command line.
//! The library never touches process-wide state (signals, argv, the global
//! log subscriber): `main.rs` does.

pub mod auth;
pub mod cli;
pub mod codec;
pub mod config;
pub mod control;
pub mod pop3;
pub mod queue;
pub mod relay;
pub mod server;
pub mod smtp;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tracing::{error, info, warn};

use config::Config;
use queue::{LinkState, Store, Writer};
use relay::flush::{Event, FlushOptions, Flusher};
use server::Shared;

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
    let group = match &submit.group {
        Some(g) => Some(
            control::group_id(g)
                .with_context(|| format!("submit.group: no group named {g} in /etc/group"))?,
        ),
        None => None,
    };
    let local = control::bind_socket(&submit.socket, submit.mode, group)
        .with_context(|| format!("submit.socket {}", submit.socket.display()))?;
    info!(socket = %submit.socket.display(), mode = format!("{:o}", submit.mode), "listening for local submission");
    listeners.push(server::Listener::Unix(local));
    if listeners.is_empty() {
        warn!("no [[listen]] entries: nothing will be accepted");
    }
    // The flusher in use; a reload publishes a new one.
    let (flusher_tx, flusher_rx) =
        watch::channel(Flusher::new(config.clone(), store.clone(), writer.clone()));
    let control = control::bind(&config.control.socket)
        .with_context(|| format!("control.socket {}", config.control.socket.display()))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let control_task = tokio::spawn(control::serve(
        control,
        config.control.socket.clone(),
        flusher_rx.clone(),
        stop_rx.clone(),
    ));
    // Store housekeeping (purge, vacuum, WAL checkpoint): at start, then
    // every few minutes, until shutdown.
    let housekeeping = tokio::spawn(queue::run_housekeeping(
        store.clone(),
        writer.clone(),
        config.store.keep_history,
        stop_rx.clone(),
    ));
    let submitted = Arc::new(Notify::new());
    let (etrn_tx, etrn_rx) = tokio::sync::mpsc::unbounded_channel();
    let triggers = server::Triggers {
        submitted: Some(submitted.clone()),
        etrn: Some(etrn_tx),
        etrn_running: Default::default(),
    };
    let mut runner = tokio::spawn(flush_runner(
        flusher_rx,
        submitted,
        etrn_rx,
        triggers.etrn_running.clone(),
        stop_rx,
    ));
    let shared = Arc::new(Shared::new(
        config.clone(),
        store.clone(),
        writer.clone(),
        tls,
        triggers,
    ));
    info!(hostname = %config.hostname, store = %config.store.path.display(), "outpost ready");
    ready();
    // Reloads: everything but the store, the sockets and logging.
    let (relisten_tx, relisten_rx) = tokio::sync::mpsc::unbounded_channel();
    let reloader = {
        let shared = shared.clone();
        let first = config.clone();
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
                let _ = flusher_tx.send(Flusher::new(new.clone(), store.clone(), writer.clone()));
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
    let _ = stop_tx.send(true);
    let _ = control_task.await;
    let _ = housekeeping.await;
    // A flush in progress may finish its batch, within the grace period.
    if tokio::time::timeout(config.smtp.shutdown_grace, &mut runner)
        .await
        .is_err()
    {
        warn!("the flush in progress did not end within smtp.shutdown_grace; its last batch may be sent again");
        runner.abort();
        let _ = runner.await;
    }
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
}

/// The daemon's flush schedule: `flush.interval`; right after a message is
/// accepted (`flush.on_submit`) unless the link is known down; and, in the
/// hub role, a branch's ETRN. A burst of wake-ups runs one flush.
/// `outpost flush` does not come here: the control socket runs its own
/// flush (the flush lock serialises them).
async fn flush_runner(
    flushers: watch::Receiver<Flusher>,
    submitted: Arc<Notify>,
    mut etrn: tokio::sync::mpsc::UnboundedReceiver<String>,
    etrn_running: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        // The flusher (and so the configuration) of the moment.
        let flusher = flushers.borrow().clone();
        let interval = flusher.config.flush.interval;
        let mut opts = FlushOptions::default();
        let trigger = tokio::select! {
            _ = stop.changed() => return,
            _ = async {
                match interval {
                    Some(i) => tokio::time::sleep(i).await,
                    None => std::future::pending().await,
                }
            } => Trigger::Interval,
            _ = submitted.notified() => Trigger::OnSubmit,
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
        if trigger == Trigger::OnSubmit && !flusher.config.flush.on_submit {
            continue;
        }
        if trigger == Trigger::OnSubmit {
            let store = flusher.store.clone();
            let link = tokio::task::spawn_blocking(move || store.link(queue::unix_now())).await;
            if matches!(link, Ok(Ok(ref l)) if l.state == LinkState::Down) {
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
        // A flush that started runs to its end; `serve` waits for it up to
        // smtp.shutdown_grace.
        flusher.run(&opts, &mut log).await;
        if trigger == Trigger::Etrn {
            let mut running = etrn_running.lock().unwrap_or_else(|p| p.into_inner());
            for d in &opts.domains {
                running.remove(d);
            }
        }
    }
}
