//! Accept loops for every listener (SMTP and POP3), connection limits and
//! a clean stop.
//!
//! [`run`] takes listeners that are already bound and a future that says
//! "stop": it never binds sockets or installs signal handlers itself, so
//! tests and `serve` drive it the same way.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, warn};

use crate::config::{canonical_ip, Config, Listen};
use crate::queue::{Store, Writer};

use crate::smtp::reply::{self, Reply};
use crate::smtp::session::Session;

/// Resolves when the server's phase reaches `at_least`.
pub async fn phase_reached(rx: &mut watch::Receiver<Phase>, at_least: Phase) {
    loop {
        if *rx.borrow_and_update() >= at_least {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Who is on the other end of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    /// A program on this machine through the submission socket
    /// (`outpost sendmail`), with the uid the kernel reports.
    Local {
        uid: u32,
    },
}

impl Peer {
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Peer::Tcp(a) => Some(a.ip()),
            Peer::Local { .. } => None,
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "{a}"),
            Peer::Local { uid } => write!(f, "local(uid={uid})"),
        }
    }
}

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

/// Where the server is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running,
    /// Stop signal received: no new sessions; idle sessions get 421.
    Draining,
    /// Grace period over: every session gets 421 and closes.
    Stopped,
}

/// What every session shares.
pub struct Shared {
    config: std::sync::RwLock<Arc<Config>>,
    pub store: Arc<Store>,
    pub writer: Writer,
    tls: std::sync::RwLock<Option<TlsAcceptor>>,
    pub triggers: Triggers,
    slots: Arc<Semaphore>,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    /// POP3 maildrops open in a session (lower-case account names).
    maildrops: Mutex<std::collections::HashSet<String>>,
    /// Failed logins across sessions (`[auth]`).
    pub logins: Arc<crate::guard::LoginGuard>,
    /// Where password checks run (`auth.verify_threads`).
    pub verifier: crate::auth::VerifyPool,
}

/// How sessions hand work to the daemon's flush runner.
#[derive(Default)]
pub struct Triggers {
    /// Woken after each accepted message when `flush.on_submit` is set.
    pub submitted: Option<Arc<Notify>>,
    /// Hub role: ETRN requests (a domain, or `@domain`).
    pub etrn: Option<mpsc::UnboundedSender<String>>,
    /// Requests whose delivery is running now: a repeated ETRN starts none.
    pub etrn_running: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Hub role: connections turned around by ATRN, for the held mail of
    /// these domains to go back over them.
    pub atrn: Option<mpsc::UnboundedSender<Turned>>,
}

/// A connection a branch turned around with ATRN (RFC 2645): the hub is
/// now the client on it.
pub struct Turned {
    pub io: crate::codec::BoxedIo,
    /// The branch, for logs and the delivery history.
    pub peer: String,
    pub account: String,
    pub domains: Vec<String>,
}

impl Shared {
    pub fn new(
        config: Arc<Config>,
        store: Arc<Store>,
        writer: Writer,
        tls: Option<TlsAcceptor>,
        triggers: Triggers,
    ) -> Shared {
        Shared {
            triggers,
            slots: Arc::new(Semaphore::new(config.smtp.max_connections)),
            per_client: Mutex::new(HashMap::new()),
            maildrops: Mutex::new(std::collections::HashSet::new()),
            logins: Arc::default(),
            verifier: crate::auth::VerifyPool::new(config.auth.verify_threads),
            config: std::sync::RwLock::new(config),
            store,
            writer,
            tls: std::sync::RwLock::new(tls),
        }
    }

    /// Shares `logins` (the daemon shows it on the control socket).
    pub fn with_logins(mut self, logins: Arc<crate::guard::LoginGuard>) -> Shared {
        self.logins = logins;
        self
    }

    /// The client `peer` counts as for per-client limits, if it has an
    /// address.
    pub fn client_of(&self, peer: IpAddr) -> IpAddr {
        client_key(peer, self.config().smtp.ipv6_client_prefix)
    }

    /// Checks `user`'s password on the pool (SMTP AUTH and POP3). Returns
    /// (the account exists, the password is right).
    pub async fn check_password(&self, user: &str, pass: String) -> (bool, bool) {
        let store = self.store.clone();
        let name = user.to_string();
        self.verifier
            .run(move || {
                let hash = store.password_hash(&name).ok().flatten();
                (
                    hash.is_some(),
                    crate::auth::verify_password(hash.as_deref(), &pass),
                )
            })
            .await
            .unwrap_or((false, false))
    }

    /// Counts a failed login (SMTP or POP3) across sessions and logs what
    /// it led to. `account` only when it exists.
    pub fn login_failed(&self, config: &Config, client: IpAddr, account: Option<&str>, peer: &str) {
        let v = self.logins.failed(
            client,
            config.smtp.ipv6_client_prefix,
            account,
            &config.auth,
            std::time::Instant::now(),
        );
        if v.account_under_attack {
            warn!(account = account.unwrap_or(""), failures = config.auth.max_account_failures, window = ?config.auth.failure_window, "account under attack: many failed logins from several clients (auth.max_account_failures); each client that fails for it now is blocked at once");
        }
        if v.blocked {
            warn!(peer = %peer, client = %client, failures = v.failures, block_time = ?config.auth.block_time, "client blocked: too many failed logins (auth.max_failures); its logins are refused until the block ends");
        }
    }

    /// The configuration now (a reload replaces it for new sessions).
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn tls(&self) -> Option<TlsAcceptor> {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A reload: new sessions use `config` and `tls`; open ones go on.
    pub fn reconfigure(&self, config: Arc<Config>, tls: Option<TlsAcceptor>) {
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = config;
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = tls;
    }

    /// Opens `user`'s maildrop for one session; false when another has it.
    pub fn lock_maildrop(&self, user: &str) -> bool {
        self.maildrops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(user.to_string())
    }

    pub fn unlock_maildrop(&self, user: &str) {
        self.maildrops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(user);
    }

    /// Takes a connection slot for `ip`, or says why not.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Reply> {
        let permit = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| reply::too_many_connections())?;
        let ip = client_key(ip, self.config().smtp.ipv6_client_prefix);
        let mut map = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.config().smtp.max_connections_per_client {
            return Err(reply::too_many_from_you());
        }
        *n += 1;
        Ok(Slot {
            shared: self.clone(),
            ip,
            _permit: permit,
        })
    }
}

/// The client an address belongs to, for per-client limits: an IPv4
/// address (also when it reaches a dual-stack socket as `::ffff:a.b.c.d`),
/// or the IPv6 network of `v6_prefix` bits it is in, since one customer
/// usually has a whole /64 (or more) to connect from.
pub fn client_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match canonical_ip(ip) {
        IpAddr::V6(v6) => ipnet::Ipv6Net::new(v6, v6_prefix.min(128))
            .map(|n| IpAddr::V6(n.network()))
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// A session's place in the connection limits, given back on drop.
struct Slot {
    shared: Arc<Shared>,
    ip: IpAddr,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self
            .shared
            .per_client
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
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
                let alive = alive.clone();
                let (shared, listen, phase) = (shared.clone(), listen.clone(), phase.clone());
                tokio::spawn(async move {
                    if listen.mode.is_smtp() {
                        Session::new(shared, listen, Peer::Tcp(peer), stream, phase)
                            .run()
                            .await;
                    } else {
                        crate::pop3::Session::new(shared, listen, peer, stream, phase)
                            .run()
                            .await;
                    }
                    drop(slot);
                    drop(alive);
                });
            }
            Err(r) => {
                warn!(peer = %peer, reply = %r.summary(), "connection refused");
                tokio::spawn(refuse(stream, r));
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
        let Ok(permit) = shared.slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, reply::too_many_connections()));
            continue;
        };
        let alive = alive.clone();
        let (shared, phase) = (shared.clone(), phase.clone());
        tokio::spawn(async move {
            Session::new(shared, local_listen(), Peer::Local { uid }, stream, phase)
                .run()
                .await;
            drop(permit);
            drop(alive);
        });
    }
}

async fn refuse<S: tokio::io::AsyncWrite + Unpin>(mut stream: S, r: Reply) {
    let mut out = Vec::new();
    r.write_to(&mut out);
    let limit = Duration::from_secs(5);
    if let Ok(Ok(())) = tokio::time::timeout(limit, stream.write_all(&out)).await {
        let _ = tokio::time::timeout(limit, stream.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: &str, prefix: u8) -> String {
        client_key(ip.parse().unwrap(), prefix).to_string()
    }

    #[test]
    fn clients_are_ipv4_addresses_and_ipv6_networks() {
        // IPv4: the address itself, in either form.
        assert_eq!(key("192.0.2.7", 64), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7", 64), "192.0.2.7");
        assert_ne!(key("192.0.2.7", 64), key("192.0.2.8", 64));
        // IPv6: every address of one /64 is one client...
        assert_eq!(key("2001:db8:1:2::1", 64), "2001:db8:1:2::");
        assert_eq!(
            key("2001:db8:1:2:ffff:ffff:ffff:ffff", 64),
            key("2001:db8:1:2::1", 64)
        );
        // ...and the next /64 another.
        assert_ne!(key("2001:db8:1:3::1", 64), key("2001:db8:1:2::1", 64));
        // The prefix is configurable: a /56 per customer, or exact addresses.
        assert_eq!(key("2001:db8:1:2ff::1", 56), key("2001:db8:1:200::9", 56));
        assert_ne!(key("2001:db8::1", 128), key("2001:db8::2", 128));
        assert_eq!(key("::1", 64), "::");
    }
}
