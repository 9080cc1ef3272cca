//! What the listeners and their sessions share: the configuration of the
//! moment, the store and its writer, TLS, the connection limits, login
//! guarding, the triggers that wake the daemon, and where the server is in
//! its life. Below `server` (which starts sessions) and the sessions
//! (`smtp`, `pop3`), so that neither needs the other.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use tracing::warn;

use crate::config::{canonical_ip, Config};
use crate::queue::{Store, Writer};

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
    /// Event counters for `GET /metrics` (`[metrics]`).
    pub metrics: crate::metrics::Metrics,
    /// IMAP commands larger than [`BIG_COMMAND`] being received (an APPEND
    /// with its message): each holds one of [`BIG_COMMANDS`] permits, so
    /// that the memory they take together stays bounded.
    pub big_commands: Arc<Semaphore>,
}

/// See [`Shared::big_commands`]. A command is held in memory while it
/// arrives (imap-next frames it whole).
pub const BIG_COMMAND: usize = 1024 * 1024;
pub const BIG_COMMANDS: usize = 8;

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
            metrics: Default::default(),
            big_commands: Arc::new(Semaphore::new(BIG_COMMANDS)),
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

    /// Counts into `metrics` (the daemon serves them on `[metrics]`).
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Shared {
        self.metrics = metrics;
        self
    }

    /// The client `peer` counts as for per-client limits, if it has an
    /// address.
    pub fn client_of(&self, peer: IpAddr) -> IpAddr {
        client_key(peer, self.config().smtp.ipv6_client_prefix)
    }

    /// Checks `user`'s password on the pool (SMTP AUTH and POP3).
    pub async fn check_password(&self, user: &str, pass: String) -> Login {
        let store = self.store.clone();
        let name = user.to_string();
        self.verifier
            .run(move || {
                let hash = store.password_hash(&name).ok().flatten();
                // Verified even without an account (against a dummy hash),
                // so the time taken does not tell whether a name exists.
                let right = crate::auth::verify_password(hash.as_deref(), &pass);
                match (hash.is_some(), right) {
                    (_, true) => Login::Accepted,
                    (true, false) => Login::WrongPassword,
                    (false, false) => Login::NoSuchAccount,
                }
            })
            .await
            .unwrap_or(Login::NoSuchAccount)
    }

    /// Counts a failed login (SMTP or POP3) across sessions and logs what
    /// it led to. `account` only when it exists.
    pub fn login_failed(&self, config: &Config, client: IpAddr, account: Option<&str>, peer: &str) {
        self.metrics.auth_failed();
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

    /// A connection slot for a local program (the submission socket): no
    /// per-client count.
    pub fn local_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Takes a connection slot for `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refused> {
        let permit = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Busy)?;
        let ip = client_key(ip, self.config().smtp.ipv6_client_prefix);
        let mut map = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.config().smtp.max_connections_per_client {
            return Err(Refused::TooManyFromClient);
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

/// What a login attempt came to. A wrong password for an account that
/// exists counts against the account too; one for no account only against
/// the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Login {
    Accepted,
    WrongPassword,
    NoSuchAccount,
}

/// Why a connection gets no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `smtp.max_connections` sessions run already.
    Busy,
    /// This client has `smtp.max_connections_per_client` already.
    TooManyFromClient,
}

/// A session's place in the connection limits, given back on drop.
pub struct Slot {
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
