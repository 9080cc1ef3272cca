//! One POP3 session: AUTHORIZATION, TRANSACTION, UPDATE (RFC 1939 §3).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::auth;
use crate::codec::{Codec, Conn, Line};
use crate::config::{Config, Listen};
use crate::queue::{Change, MailboxEntry};
use crate::shared::{phase_reached, Login, Phase, Shared};

/// RFC 2449 §4: a command line is at most 255 octets; AUTH responses may
/// be longer (RFC 5034 §4).
const MAX_LINE: usize = 1024;
/// How long a TLS handshake may take (less when `pop3.idle_timeout` is).
const TLS_TIMEOUT: Duration = Duration::from_secs(30);
/// After a timeout, how long the last response may take to leave.
const LINGER: Duration = Duration::from_secs(1);
/// Octets of a message sent per write when it is retrieved.
const PIECE: usize = 64 * 1024;

enum Flow {
    Go,
    Close,
}

/// The maildrop of a logged-in user, as it was at login.
struct Maildrop {
    user: String,
    entries: Vec<MailboxEntry>,
    deleted: Vec<bool>,
}

impl Maildrop {
    fn live(&self) -> impl Iterator<Item = (usize, &MailboxEntry)> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.deleted[*i])
    }
}

pub struct Session<S> {
    shared: Arc<Shared>,
    /// The configuration when the session started: a reload applies to the
    /// next session.
    config: Arc<Config>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    listen: Listen,
    peer: SocketAddr,
    codec: Codec<Conn<S>>,
    phase: watch::Receiver<Phase>,
    /// USER given, waiting for PASS.
    user: Option<String>,
    drop: Option<Maildrop>,
    failures: u32,
    /// `pop3.max_session_time` from the start.
    deadline: Instant,
    /// How long the last response may take to leave at the end: the
    /// write timeout, [`LINGER`] after a read timeout, nothing when the
    /// peer already left output untaken.
    linger: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub fn new(
        shared: Arc<Shared>,
        listen: Listen,
        peer: SocketAddr,
        stream: S,
        phase: watch::Receiver<Phase>,
    ) -> Self {
        let config = shared.config();
        let mut codec = Codec::new(Conn::Plain(stream));
        // A client that stops taking a message it asked for is cut off
        // like one that stops sending commands.
        codec.set_write_timeout(config.pop3.idle_timeout);
        let linger = config.pop3.idle_timeout;
        Session {
            linger,
            deadline: Instant::now() + config.pop3.max_session_time,
            config,
            tls: shared.tls(),
            shared,
            listen,
            peer,
            codec,
            phase,
            user: None,
            drop: None,
            failures: 0,
        }
    }

    pub async fn run(mut self) {
        debug!(peer = %self.peer, listener = %self.listen.address, "pop3 connect");
        if self.listen.mode.implicit_tls() && !self.tls_handshake().await {
            return;
        }
        self.ok("outpost POP3 ready");
        loop {
            let line = match self.next_line().await {
                Some(Line::Text(l)) => l,
                Some(Line::TooLong) => {
                    self.err("command line too long");
                    continue;
                }
                Some(Line::BareLf) => {
                    self.err("command lines end with CRLF");
                    continue;
                }
                Some(Line::Eof) | None => break,
            };
            if let Flow::Close = self.command(&line).await {
                break;
            }
        }
        self.release();
        self.codec.close(self.linger).await;
        debug!(peer = %self.peer, "pop3 disconnect");
    }

    fn ok(&mut self, text: &str) {
        self.codec.write(format!("+OK {text}\r\n").as_bytes());
    }

    fn err(&mut self, text: &str) {
        self.codec.write(format!("-ERR {text}\r\n").as_bytes());
    }

    /// The next command; None when the session must end (idle timeout,
    /// shutdown, connection error). A session that ends here deletes nothing.
    async fn next_line(&mut self) -> Option<Line> {
        if Instant::now() >= self.deadline {
            self.session_too_long();
            return None;
        }
        let timeout = self
            .config
            .pop3
            .idle_timeout
            .min(self.deadline.saturating_duration_since(Instant::now()));
        let mut phase = self.phase.clone();
        tokio::select! {
            biased;
            _ = phase_reached(&mut phase, Phase::Draining) => {
                self.err("[SYS/TEMP] server shutting down, nothing was deleted; try again later");
                None
            }
            r = tokio::time::timeout(timeout, self.codec.read_line(MAX_LINE)) => match r {
                Ok(Ok(line)) => Some(line),
                Ok(Err(e)) => {
                    if e.kind() == std::io::ErrorKind::TimedOut {
                        info!(peer = %self.peer, "pop3 client takes no output (pop3.idle_timeout); nothing deleted");
                    }
                    None
                }
                Err(_) if Instant::now() >= self.deadline => {
                    self.session_too_long();
                    None
                }
                Err(_) => {
                    info!(peer = %self.peer, "pop3 idle timeout; nothing deleted");
                    if self.codec.pending_output() == 0 {
                        self.linger = LINGER;
                        self.err("idle timeout, closing; nothing was deleted");
                    } else {
                        self.linger = Duration::ZERO;
                    }
                    None
                }
            }
        }
    }

    fn session_too_long(&mut self) {
        self.linger = LINGER;
        warn!(peer = %self.peer, limit = ?self.config.pop3.max_session_time, "pop3 session time limit reached (pop3.max_session_time); nothing deleted");
        self.err("session time limit reached, closing; nothing was deleted");
    }

    /// Plain-text login (USER/PASS, AUTH PLAIN) is allowed over TLS, or in
    /// the clear where the listener allows it (by default on loopback).
    fn login_allowed(&self) -> bool {
        self.codec.tls_active() || self.listen.plaintext_auth_allowed()
    }

    async fn command(&mut self, line: &[u8]) -> Flow {
        let (verb, arg) = super::split_command(line);
        if verb == "QUIT" {
            return self.quit().await;
        }
        if verb == "CAPA" {
            self.capa();
            return Flow::Go;
        }
        if verb == "NOOP" && self.drop.is_some() {
            self.ok("");
            return Flow::Go;
        }
        if self.drop.is_none() {
            return self.authorization(&verb, &arg).await;
        }
        self.transaction(&verb, &arg).await;
        Flow::Go
    }

    fn capa(&mut self) {
        let mut caps = vec!["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"];
        if self.drop.is_none() {
            if self.login_allowed() {
                caps.push("USER");
                caps.push("SASL PLAIN");
            }
            if self.tls.is_some() && !self.codec.tls_active() {
                caps.push("STLS");
            }
        }
        caps.push("IMPLEMENTATION outpost");
        let mut out = String::from("+OK capability list follows\r\n");
        for c in caps {
            out.push_str(c);
            out.push_str("\r\n");
        }
        out.push_str(".\r\n");
        self.codec.write(out.as_bytes());
    }

    async fn authorization(&mut self, verb: &str, arg: &str) -> Flow {
        match verb {
            "STLS" => {
                if self.codec.tls_active() {
                    self.err("TLS is already active");
                    return Flow::Go;
                }
                if self.tls.is_none() {
                    self.err("TLS is not available: no certificate is configured");
                    return Flow::Go;
                }
                self.ok("begin TLS negotiation");
                if self.codec.flush().await.is_err() || !self.tls_handshake().await {
                    return Flow::Close;
                }
                self.user = None;
                Flow::Go
            }
            "USER" => {
                if !self.login_allowed() {
                    self.err("plain-text login needs TLS here: send STLS first");
                } else if arg.is_empty() {
                    self.err("USER needs a name");
                } else {
                    self.user = Some(arg.to_string());
                    self.ok("send PASS");
                }
                Flow::Go
            }
            "PASS" => {
                let Some(user) = self.user.take() else {
                    self.err("send USER first");
                    return Flow::Go;
                };
                if !self.login_allowed() {
                    self.err("plain-text login needs TLS here: send STLS first");
                    return Flow::Go;
                }
                self.login(user, arg.to_string()).await
            }
            "AUTH" => {
                if arg.is_empty() {
                    // The mechanism list some clients ask for (RFC 5034 §4 note).
                    self.codec.write(b"+OK\r\nPLAIN\r\n.\r\n");
                    return Flow::Go;
                }
                let mut words = arg.split_whitespace();
                let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
                if mechanism != "PLAIN" {
                    self.err("unsupported mechanism: use PLAIN");
                    return Flow::Go;
                }
                if !self.login_allowed() {
                    self.err("plain-text login needs TLS here: send STLS first");
                    return Flow::Go;
                }
                let response = match words.next() {
                    Some(r) => r.to_string(),
                    None => {
                        self.codec.write(b"+ \r\n");
                        match self.next_line().await {
                            Some(Line::Text(l)) => String::from_utf8_lossy(&l).to_string(),
                            _ => return Flow::Close,
                        }
                    }
                };
                if response == "*" {
                    self.err("authentication cancelled");
                    return Flow::Go;
                }
                match auth::decode_b64(&response).and_then(|d| auth::parse_plain(&d)) {
                    Some((user, pass)) => self.login(user, pass).await,
                    None => {
                        if self.refused_as_blocked() {
                            return Flow::Go;
                        }
                        self.login_failed(None, false).await
                    }
                }
            }
            "APOP" => {
                self.err("APOP is not supported: use USER/PASS or AUTH PLAIN over TLS");
                Flow::Go
            }
            _ => {
                self.err("unknown command or not allowed before login");
                Flow::Go
            }
        }
    }

    /// Refuses the login at once when this client is blocked after too
    /// many failed logins (`[auth]`); true when it did.
    fn refused_as_blocked(&mut self) -> bool {
        let client = self.shared.client_of(self.peer.ip());
        let Some(left) = self
            .shared
            .logins
            .blocked(client, Instant::now().into_std())
        else {
            return false;
        };
        info!(peer = %self.peer, minutes_left = left.as_secs().div_ceil(60), "pop3 login refused: this client is blocked after too many failed logins (auth.max_failures)");
        self.err(&format!(
            "[SYS/TEMP] too many failed logins from your address; try again in {} minutes",
            left.as_secs().div_ceil(60)
        ));
        true
    }

    async fn login(&mut self, user: String, pass: String) -> Flow {
        if self.refused_as_blocked() {
            return Flow::Go;
        }
        match self.shared.check_password(&user, pass).await {
            Login::Accepted => {}
            Login::WrongPassword => return self.login_failed(Some(&user), true).await,
            Login::NoSuchAccount => return self.login_failed(Some(&user), false).await,
        }
        let key = user.to_ascii_lowercase();
        if !self.shared.lock_maildrop(&key) {
            info!(peer = %self.peer, user = %user, "pop3 maildrop in use");
            self.err("[IN-USE] the maildrop is open in another session; close it and try again");
            return Flow::Go;
        }
        let store = self.shared.store.clone();
        let lookup = key.clone();
        let entries = match tokio::task::spawn_blocking(move || store.mailbox(&lookup)).await {
            Ok(Ok(e)) => e,
            other => {
                self.shared.unlock_maildrop(&key);
                warn!(peer = %self.peer, user = %user, error = ?other.err(), "cannot read the mailbox");
                self.err("[SYS/TEMP] cannot read the mailbox now; try again later");
                return Flow::Go;
            }
        };
        let total: i64 = entries.iter().map(MailboxEntry::size).sum();
        info!(peer = %self.peer, user = %user, messages = entries.len(), "pop3 login");
        self.ok(&format!(
            "{user} has {} messages ({total} octets)",
            entries.len()
        ));
        self.drop = Some(Maildrop {
            user: key,
            deleted: vec![false; entries.len()],
            entries,
        });
        Flow::Go
    }

    /// A failed login; `exists` when `user` is an account.
    async fn login_failed(&mut self, user: Option<&str>, exists: bool) -> Flow {
        self.failures += 1;
        warn!(peer = %self.peer, user = user.unwrap_or("?"), failures = self.failures, "pop3 login failed");
        let client = self.shared.client_of(self.peer.ip());
        self.shared.login_failed(
            &self.config,
            client,
            user.filter(|_| exists),
            &self.peer.to_string(),
        );
        tokio::time::sleep(self.config.pop3.auth_failure_delay).await;
        if self.failures >= self.config.pop3.max_auth_failures {
            self.err("[AUTH] too many failed logins, closing");
            return Flow::Close;
        }
        self.err("[AUTH] invalid user name or password");
        Flow::Go
    }

    /// Message `arg` (1-based), not deleted.
    fn pick(&mut self, arg: &str) -> Option<usize> {
        let d = self.drop.as_ref()?;
        match arg.parse::<usize>() {
            Ok(n) if n >= 1 && n <= d.entries.len() && !d.deleted[n - 1] => Some(n - 1),
            Ok(n) if n >= 1 && n <= d.entries.len() => {
                self.err(&format!("message {n} is deleted"));
                None
            }
            _ => {
                self.err("no such message");
                None
            }
        }
    }

    async fn transaction(&mut self, verb: &str, arg: &str) {
        let args: Vec<&str> = arg.split_whitespace().collect();
        match verb {
            "STAT" => {
                let d = self.drop.as_ref().expect("logged in");
                let (n, size) = d
                    .live()
                    .fold((0, 0i64), |(n, s), (_, e)| (n + 1, s + e.size()));
                self.ok(&format!("{n} {size}"));
            }
            "LIST" | "UIDL" => {
                let uidl = verb == "UIDL";
                let show = |i: usize, e: &MailboxEntry| {
                    if uidl {
                        format!("{} {}", i + 1, e.uid)
                    } else {
                        format!("{} {}", i + 1, e.size())
                    }
                };
                if let Some(a) = args.first() {
                    if let Some(i) = self.pick(a) {
                        let line = show(i, &self.drop.as_ref().expect("logged in").entries[i]);
                        self.ok(&line);
                    }
                } else {
                    let d = self.drop.as_ref().expect("logged in");
                    let mut out = String::from("+OK\r\n");
                    for (i, e) in d.live() {
                        out.push_str(&show(i, e));
                        out.push_str("\r\n");
                    }
                    out.push_str(".\r\n");
                    self.codec.write(out.as_bytes());
                }
            }
            "RETR" | "TOP" => {
                let lines = if verb == "TOP" {
                    match args.get(1).and_then(|n| n.parse::<usize>().ok()) {
                        Some(n) => Some(n),
                        None => {
                            self.err("TOP needs a message number and a line count");
                            return;
                        }
                    }
                } else {
                    None
                };
                let Some(i) = args.first().and_then(|a| self.pick(a)) else {
                    if args.is_empty() {
                        self.err("which message?");
                    }
                    return;
                };
                let entry = self.drop.as_ref().expect("logged in").entries[i].clone();
                let store = self.shared.store.clone();
                let uid = entry.uid.clone();
                let body = match tokio::task::spawn_blocking(move || store.body(&uid)).await {
                    Ok(Ok(Some(b))) => b,
                    Ok(Ok(None)) => {
                        // An IMAP session expunged it after this session's
                        // login, which took its snapshot of the maildrop.
                        self.err(&format!(
                            "message {} was deleted in another session (IMAP) since you logged in",
                            i + 1
                        ));
                        return;
                    }
                    other => {
                        warn!(peer = %self.peer, uid = %entry.uid, error = ?other, "cannot read a message");
                        self.err("[SYS/TEMP] cannot read the message now; try again later");
                        return;
                    }
                };
                let part = match lines {
                    Some(n) => super::top(&body, n),
                    None => &body[..],
                };
                // Streamed in pieces: a large message is not copied whole
                // into the output as well.
                self.codec
                    .write(format!("+OK {} octets\r\n", entry.size()).as_bytes());
                let mut stuffer = crate::dotstuff::DotStuffer::default();
                let mut buf = Vec::with_capacity(PIECE + PIECE / 32);
                stuffer.push(&mut buf, entry.return_path().as_bytes());
                for piece in part.chunks(PIECE) {
                    stuffer.push(&mut buf, piece);
                    self.codec.write(&buf);
                    buf.clear();
                    if self.codec.pending_output() >= PIECE * 4 {
                        if let Err(e) = self.codec.flush().await {
                            if e.kind() == std::io::ErrorKind::TimedOut {
                                info!(peer = %self.peer, "pop3 client takes no output (pop3.idle_timeout); nothing deleted");
                            }
                            return;
                        }
                    }
                }
                stuffer.finish(&mut buf);
                buf.extend_from_slice(b".\r\n");
                self.codec.write(&buf);
            }
            "DELE" => {
                if let Some(i) = args.first().and_then(|a| self.pick(a)) {
                    self.drop.as_mut().expect("logged in").deleted[i] = true;
                    self.ok(&format!("message {} deleted", i + 1));
                } else if args.is_empty() {
                    self.err("which message?");
                }
            }
            "RSET" => {
                let d = self.drop.as_mut().expect("logged in");
                d.deleted.iter_mut().for_each(|x| *x = false);
                let n = d.entries.len();
                self.ok(&format!("maildrop has {n} messages"));
            }
            "STLS" | "USER" | "PASS" | "AUTH" => self.err("already logged in"),
            _ => self.err("unknown command"),
        }
    }

    /// QUIT: in TRANSACTION, the UPDATE state deletes what was marked, in
    /// one commit, before the answer.
    async fn quit(&mut self) -> Flow {
        let Some(d) = self.drop.as_ref() else {
            self.ok("bye");
            return Flow::Close;
        };
        let ids: Vec<i64> = d
            .entries
            .iter()
            .zip(&d.deleted)
            .filter(|(_, del)| **del)
            .map(|(e, _)| e.id)
            .collect();
        let n = ids.len();
        if n > 0 {
            let change = Change::MailboxRemove {
                user: d.user.clone(),
                ids,
            };
            if let Err(e) = self.shared.writer.apply(vec![change]).await {
                warn!(peer = %self.peer, error = %e, "pop3 update failed");
                self.err("[SYS/TEMP] could not delete the messages; none were deleted");
                return Flow::Close;
            }
        }
        info!(peer = %self.peer, user = %d.user, deleted = n, "pop3 quit");
        self.ok(&format!("bye, {n} messages deleted"));
        Flow::Close
    }

    async fn tls_handshake(&mut self) -> bool {
        let Some(acceptor) = self.tls.clone() else {
            return false;
        };
        let limit = TLS_TIMEOUT
            .min(self.config.pop3.idle_timeout)
            .min(self.deadline.saturating_duration_since(Instant::now()));
        match self.codec.tls_handshake(&acceptor, limit).await {
            Ok(()) => true,
            Err(e) => {
                info!(peer = %self.peer, error = %e, "pop3 TLS handshake failed");
                false
            }
        }
    }

    fn release(&mut self) {
        if let Some(d) = self.drop.take() {
            self.shared.unlock_maildrop(&d.user);
        }
    }
}
