//! Accept loops for every listener (SMTP and POP3), connection limits and
//! a clean stop.
//!
//! [`run`] takes listeners that are already bound and a future that says
//! "stop": it never binds sockets or installs signal handlers itself, so
//! tests and `serve` drive it the same way.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn, Instrument};

use crate::config::{Config, Listen, ListenMode};

use crate::shared::{phase_reached, Peer, Phase, Refused, Shared};
use crate::smtp::reply::{self, Reply};
use crate::smtp::session::Session;

/// A bound listener for [`run`].
pub enum Listener {
    Tcp(TcpListener, Listen),
    /// The local submission socket: SMTP from programs on this machine.
    Unix(tokio::net::UnixListener),
}

/// The `[[listen]]`-like description of the local submission socket:
/// relay mode (local programs may send anywhere), no AUTH.
pub fn local_listen() -> Listen {
    Listen {
        address: SocketAddr::from(([127, 0, 0, 1], 0)),
        mode: crate::config::ListenMode::Relay,
        plaintext_auth: Some(false),
    }
}

/// Serves SMTP on `listeners` until `stop` resolves, then drains: idle
/// sessions are closed with 421 at once, sessions with a transaction open get
/// `smtp.shutdown_grace` to finish, and then 421 too. Returns when every
/// session has ended, so every commit has been answered.
pub async fn run(
    shared: Arc<Shared>,
    listeners: Vec<Listener>,
    mut reload: mpsc::UnboundedReceiver<Arc<Config>>,
    stop: impl Future<Output = ()>,
) {
    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    // Each session holds a sender; recv() returns None once all are gone.
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    let mut open: HashMap<SocketAddr, Running> = HashMap::new();
    for listener in listeners {
        match listener {
            Listener::Tcp(listener, listen) => {
                let r = Running::start(&shared, listener, listen.clone(), &phase_rx, &alive_tx);
                open.insert(listen.address, r);
            }
            Listener::Unix(listener) => {
                tokio::spawn(accept_local(
                    shared.clone(),
                    listener,
                    phase_rx.clone(),
                    alive_tx.clone(),
                ));
            }
        }
    }
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(config) = reload.recv() => {
                relisten(&shared, &config, &mut open, &phase_rx, &alive_tx).await;
                info!(listeners = open.len(), "configuration reloaded");
            }
        }
    }
    drop(alive_tx);
    info!("stopping: no new sessions; waiting for messages in flight");
    let _ = phase_tx.send(Phase::Draining);
    let grace = shared.config().smtp.shutdown_grace;
    if tokio::time::timeout(grace, alive_rx.recv()).await.is_err() {
        warn!(grace = ?grace, "shutdown grace period over: closing the remaining sessions with 421");
        let _ = phase_tx.send(Phase::Stopped);
        if tokio::time::timeout(Duration::from_secs(10), alive_rx.recv())
            .await
            .is_err()
        {
            error!("sessions did not end after 421; stopping anyway");
        }
    }
}

/// One listener's accept loop, which can be stopped on its own (a reload
/// that removes or changes it); its sessions go on.
struct Running {
    listen: Listen,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(
        shared: &Arc<Shared>,
        listener: TcpListener,
        listen: Listen,
        phase: &watch::Receiver<Phase>,
        alive: &mpsc::Sender<()>,
    ) -> Running {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            shared.clone(),
            listener,
            listen.clone(),
            phase.clone(),
            stopped,
            alive.clone(),
        ));
        Running { listen, stop, task }
    }

    /// Stops accepting; returns once the socket is closed.
    async fn close(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// A reload: closes listeners that are gone or changed, opens new ones.
async fn relisten(
    shared: &Arc<Shared>,
    config: &Config,
    open: &mut HashMap<SocketAddr, Running>,
    phase: &watch::Receiver<Phase>,
    alive: &mpsc::Sender<()>,
) {
    let wanted: HashMap<SocketAddr, &Listen> =
        config.listen.iter().map(|l| (l.address, l)).collect();
    let stale: Vec<SocketAddr> = open
        .iter()
        .filter(|(a, r)| {
            wanted.get(*a).is_none_or(|l| {
                l.mode != r.listen.mode || l.plaintext_auth != r.listen.plaintext_auth
            })
        })
        .map(|(a, _)| *a)
        .collect();
    for a in stale {
        if let Some(r) = open.remove(&a) {
            r.close().await;
            info!(address = %a, "stopped listening (reload)");
        }
    }
    for (a, l) in wanted {
        if open.contains_key(&a) {
            continue;
        }
        match TcpListener::bind(a).await {
            Ok(listener) => {
                info!(address = %a, mode = %l.mode, "listening (reload)");
                open.insert(a, Running::start(shared, listener, l.clone(), phase, alive));
            }
            Err(e) => {
                error!(address = %a, error = %e, "cannot listen on {a} (listen.address): {e}; the rest of the reload applies")
            }
        }
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    listen: Listen,
    mut phase: watch::Receiver<Phase>,
    mut stopped: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = phase_reached(&mut phase, Phase::Draining) => break,
            _ = stopped.changed() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(10);
                a
            }
            Err(e) => {
                // Out of file descriptors and the like: wait, then try again.
                error!(listener = %listen.address, error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match shared.admit(peer.ip()) {
            Ok(slot) => {
                shared
                    .metrics
                    .session(listen.address.to_string(), listen.mode.to_string());
                let alive = alive.clone();
                let (shared, listen, phase) = (shared.clone(), listen.clone(), phase.clone());
                // Every line a session logs carries its peer and listener.
                let span = tracing::info_span!("session", peer = %peer, mode = %listen.mode);
                tokio::spawn(
                    async move {
                        if listen.mode.is_smtp() {
                            Session::new(shared, listen, Peer::Tcp(peer), stream, phase)
                                .run()
                                .await;
                        } else if matches!(listen.mode, ListenMode::Imap | ListenMode::Imaps) {
                            crate::imap::Session::new(shared, listen, peer, stream, phase)
                                .run()
                                .await;
                        } else {
                            crate::pop3::Session::new(shared, listen, peer, stream, phase)
                                .run()
                                .await;
                        }
                        drop(slot);
                        drop(alive);
                    }
                    .instrument(span),
                );
            }
            Err(why) => {
                shared.metrics.session_refused(match why {
                    Refused::Busy => "busy",
                    Refused::TooManyFromClient => "per_client",
                });
                let r = match why {
                    Refused::Busy => reply::too_many_connections(),
                    Refused::TooManyFromClient => reply::too_many_from_you(),
                };
                warn!(peer = %peer, reply = %r.summary(), "connection refused");
                tokio::spawn(refuse(stream, refusal(listen.mode, &r)));
            }
        }
    }
}

/// The local submission socket: SMTP sessions from this machine's programs.
async fn accept_local(
    shared: Arc<Shared>,
    listener: tokio::net::UnixListener,
    mut phase: watch::Receiver<Phase>,
    alive: mpsc::Sender<()>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = phase_reached(&mut phase, Phase::Draining) => break,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                error!(error = %e, "accept on the submission socket failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let uid = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
        let Some(permit) = shared.local_slot() else {
            shared.metrics.session_refused("busy");
            let r = reply::too_many_connections();
            tokio::spawn(refuse(stream, refusal(ListenMode::Submission, &r)));
            continue;
        };
        shared.metrics.session("local".into(), "local".into());
        let alive = alive.clone();
        let (shared, phase) = (shared.clone(), phase.clone());
        let span = tracing::info_span!("session", peer = %Peer::Local { uid }, mode = "local");
        tokio::spawn(
            async move {
                Session::new(shared, local_listen(), Peer::Local { uid }, stream, phase)
                    .run()
                    .await;
                drop(permit);
                drop(alive);
            }
            .instrument(span),
        );
    }
}

/// A connection refused before its session starts, told so in its own
/// protocol (an SMTP reply, a POP3 -ERR, an IMAP BYE).
fn refusal(mode: ListenMode, r: &Reply) -> Vec<u8> {
    let text = r.lines.join(" ");
    match mode {
        ListenMode::Pop3 | ListenMode::Pop3s => format!("-ERR [SYS/TEMP] {text}\r\n").into_bytes(),
        ListenMode::Imap | ListenMode::Imaps => {
            format!("* BYE [UNAVAILABLE] {text}\r\n").into_bytes()
        }
        _ => {
            let mut out = Vec::new();
            r.write_to(&mut out);
            out
        }
    }
}

async fn refuse<S: tokio::io::AsyncWrite + Unpin>(mut stream: S, out: Vec<u8>) {
    let limit = Duration::from_secs(5);
    if let Ok(Ok(())) = tokio::time::timeout(limit, stream.write_all(&out)).await {
        let _ = tokio::time::timeout(limit, stream.shutdown()).await;
    }
}
