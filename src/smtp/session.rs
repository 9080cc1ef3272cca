//! One SMTP session: commands in, replies out, accepted messages to the store.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use smtp_proto::{self as proto, Request};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::auth;
use crate::config::{Config, Listen, ListenMode};
use crate::queue::{unix_now, Change, NewMessage, NewRecipient, QueueId, Route, TransactionKey};

use super::data::{Canonical, ContentError, DotReader, Limits};
use super::policy;
use super::reply::{self, Reply};
use crate::codec::{Codec, Conn, Line};
use crate::shared::{phase_reached, Peer, Phase, Shared};

/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with CRLF.
const MAX_COMMAND: usize = 512;
/// RFC 4954 §4: an AUTH response line may be up to 12288 octets.
const MAX_AUTH_LINE: usize = 12288;
/// How long a TLS handshake may take (less when `smtp.command_timeout` is).
const TLS_TIMEOUT: Duration = Duration::from_secs(30);
/// After a timeout, how long the last reply may take to leave: the peer
/// is probably stuck, and its slot is wanted.
const LINGER: Duration = Duration::from_secs(1);

enum Flow {
    Go,
    Close,
}

/// The open mail transaction (between MAIL and the end of the message).
struct Transaction {
    sender: String,
    body_type: Option<String>,
    smtputf8: bool,
    dsn_ret: Option<String>,
    dsn_envid: Option<String>,
    recipients: Vec<NewRecipient>,
    /// Recipients the client gave (alias targets not counted).
    given: usize,
    /// SIZE= from MAIL: room for the message is made once, not by doubling.
    size_hint: usize,
    /// Set by the first BDAT chunk.
    bdat: Option<(QueueId, Canonical)>,
    /// CHECKPOINT (RFC 1845): the transaction's TRANSID key.
    checkpoint: Option<TransactionKey>,
    /// Content received over an earlier connection, resumed after it.
    resumed: Vec<u8>,
    /// Committed already under this id; the client never heard it.
    completed: Option<String>,
    /// What came of the content before this link broke: checkpointed when
    /// the session ends.
    received: Option<Vec<u8>>,
}

impl Transaction {
    /// Adds a recipient once: the same address twice is one copy.
    fn add(&mut self, r: NewRecipient) {
        if !self
            .recipients
            .iter()
            .any(|x| x.address.eq_ignore_ascii_case(&r.address))
        {
            self.recipients.push(r);
        }
    }
}

pub struct Session<S> {
    shared: Arc<Shared>,
    /// The configuration when the session started: a reload applies to the
    /// next session.
    config: Arc<Config>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    listen: Listen,
    peer: Peer,
    codec: Codec<Conn<S>>,
    phase: watch::Receiver<Phase>,
    helo: Option<String>,
    esmtp: bool,
    auth_user: Option<String>,
    auth_failures: u32,
    /// Protocol errors and refused recipients.
    errors: u32,
    /// `errors` when last judged against `smtp.max_errors`: only a protocol
    /// error closes the session there.
    checked_errors: u32,
    tx: Option<Transaction>,
    /// `smtp.max_session_time` from the start.
    deadline: Instant,
    /// How long the last reply may take to leave at the end: the write
    /// timeout, [`LINGER`] after a read timeout, nothing when the peer
    /// already left output untaken.
    linger: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static> Session<S> {
    pub fn new(
        shared: Arc<Shared>,
        listen: Listen,
        peer: Peer,
        stream: S,
        phase: watch::Receiver<Phase>,
    ) -> Self {
        let config = shared.config();
        let mut codec = Codec::new(Conn::Plain(stream));
        // Writes wait as long as reads: a peer that stops taking replies
        // is cut off like one that stops sending commands.
        codec.set_write_timeout(config.smtp.command_timeout);
        let linger = config.smtp.command_timeout;
        Session {
            linger,
            deadline: Instant::now() + config.smtp.max_session_time,
            config,
            tls: shared.tls(),
            shared,
            listen,
            peer,
            codec,
            phase,
            helo: None,
            esmtp: false,
            auth_user: None,
            auth_failures: 0,
            errors: 0,
            checked_errors: 0,
            tx: None,
        }
    }

    /// How long the next read may wait: `limit`, or less when the session's
    /// time is nearly up.
    fn read_limit(&self, limit: Duration) -> Duration {
        limit.min(self.deadline.saturating_duration_since(Instant::now()))
    }

    /// A read timed out: says why (the wait, or the whole session) and
    /// queues the 421.
    fn read_timed_out(&mut self, waiting_for: &str) {
        self.linger = LINGER;
        if Instant::now() >= self.deadline {
            warn!(peer = %self.peer, limit = ?self.config.smtp.max_session_time, "session time limit reached (smtp.max_session_time), closing");
            self.codec.reply(&reply::session_too_long());
        } else if self.codec.pending_output() > 0 {
            self.linger = Duration::ZERO;
            info!(peer = %self.peer, "the client takes no replies (smtp.command_timeout), closing");
        } else {
            info!(peer = %self.peer, "timeout waiting for {waiting_for}");
            self.codec.reply(&reply::timeout());
        }
    }

    pub async fn run(mut self) {
        debug!(peer = %self.peer, listener = %self.listen.address, mode = %self.listen.mode, "connect");
        if self.listen.mode.implicit_tls() && !self.start_tls().await {
            return;
        }
        let greeting = reply::greeting(&self.config.hostname);
        self.codec.reply(&greeting);
        loop {
            if self.errors >= self.config.smtp.max_errors && self.errors > self.checked_errors {
                warn!(peer = %self.peer, errors = self.errors, "too many protocol errors, closing");
                self.codec.reply(&reply::too_many_errors());
                break;
            }
            self.checked_errors = self.errors;
            let flow = match self.next_line(MAX_COMMAND).await {
                Some(Line::Text(line)) => self.command(line).await,
                Some(Line::TooLong) => self.error(reply::line_too_long()),
                Some(Line::BareLf) => self.error(reply::bare_lf_in_command()),
                Some(Line::Eof) | None => Flow::Close,
            };
            if let Flow::Close = flow {
                break;
            }
        }
        self.codec.close(self.linger).await;
        self.checkpoint_interrupted().await;
        debug!(peer = %self.peer, "disconnect");
    }

    /// Waits for a line; None when the session must end (the reason has
    /// been queued as a reply and logged).
    async fn next_line(&mut self, max: usize) -> Option<Line> {
        let stop_at = if self.tx.is_some() {
            Phase::Stopped
        } else {
            Phase::Draining
        };
        if Instant::now() >= self.deadline {
            self.read_timed_out("a command");
            return None;
        }
        let timeout = self.read_limit(self.config.smtp.command_timeout);
        let mut phase = self.phase.clone();
        tokio::select! {
            biased;
            _ = phase_reached(&mut phase, stop_at) => {
                self.codec.reply(&reply::shutting_down(&self.config.hostname));
                None
            }
            r = tokio::time::timeout(timeout, self.codec.read_line(max)) => match r {
                Ok(Ok(line)) => Some(line),
                Ok(Err(e)) => {
                    if e.kind() == std::io::ErrorKind::TimedOut {
                        info!(peer = %self.peer, "the client takes no replies (smtp.command_timeout), closing");
                    } else {
                        debug!(peer = %self.peer, error = %e, "connection error");
                    }
                    None
                }
                Err(_) => {
                    self.read_timed_out("a command");
                    None
                }
            }
        }
    }

    /// Reads more message content; false when the session must end.
    async fn fill_data(&mut self) -> bool {
        if Instant::now() >= self.deadline {
            self.read_timed_out("message data; nothing was queued");
            return false;
        }
        let timeout = self.read_limit(self.config.smtp.data_timeout);
        let mut phase = self.phase.clone();
        tokio::select! {
            biased;
            _ = phase_reached(&mut phase, Phase::Stopped) => {
                warn!(peer = %self.peer, "shutdown deadline reached while receiving a message; nothing was queued");
                self.codec.reply(&reply::shutting_down(&self.config.hostname));
                false
            }
            r = tokio::time::timeout(timeout, self.codec.fill()) => match r {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    info!(peer = %self.peer, "connection lost while receiving a message; nothing was queued");
                    false
                }
                Ok(Ok(_)) => true,
                Err(_) => {
                    self.read_timed_out("message data; nothing was queued");
                    false
                }
            }
        }
    }

    fn error(&mut self, r: Reply) -> Flow {
        self.errors += 1;
        self.codec.reply(&r);
        Flow::Go
    }

    fn reply(&mut self, r: Reply) -> Flow {
        self.codec.reply(&r);
        Flow::Go
    }

    /// A recipient refused for what the client asked (not for a limit or
    /// a failure on this side): an error like a protocol error, and at
    /// `smtp.max_rcpt_errors` the end of the session, so that one session
    /// cannot probe a long list of names.
    fn refuse_rcpt(&mut self, r: Reply) -> Flow {
        self.errors += 1;
        // Judged against max_rcpt_errors here, not against max_errors.
        self.checked_errors = self.errors;
        self.codec.reply(&r);
        if self.errors >= self.config.smtp.max_rcpt_errors {
            warn!(peer = %self.peer, errors = self.errors, "too many errors and refused recipients (smtp.max_rcpt_errors), closing");
            self.codec.reply(&reply::too_many_rcpt_errors());
            return Flow::Close;
        }
        Flow::Go
    }

    async fn command(&mut self, mut line: Vec<u8>) -> Flow {
        if line.contains(&0) {
            return self.error(reply::nul_in_command());
        }
        if looks_like_http(&line) {
            warn!(peer = %self.peer, "HTTP request on the SMTP port, closing");
            self.codec.reply(&reply::http_refused());
            return Flow::Close;
        }
        // RFC 2645 allows ATRN without domains (all the account may take);
        // the command parser wants at least one.
        if self.listen.mode == ListenMode::Odmr && line.trim_ascii().eq_ignore_ascii_case(b"ATRN") {
            return self.atrn(Vec::new()).await;
        }
        line.extend_from_slice(b"\r\n");
        let request = match Request::parse(&mut line.iter()) {
            Ok(r) => r.into_owned(),
            Err(e) => return self.error(parse_error(e)),
        };
        let odmr = self.listen.mode == ListenMode::Odmr;
        if odmr
            && matches!(
                request,
                Request::Mail { .. }
                    | Request::Rcpt { .. }
                    | Request::Data
                    | Request::Bdat { .. }
                    | Request::Etrn { .. }
                    | Request::Vrfy { .. }
                    | Request::Expn { .. }
            )
        {
            return self.error(reply::odmr_only());
        }
        match request {
            Request::Ehlo { host } => self.helo(host, true),
            Request::Helo { host } => self.helo(host, false),
            Request::Mail { from } => self.mail(from).await,
            Request::Rcpt { to } => self.rcpt(to).await,
            Request::Data => self.data().await,
            Request::Bdat {
                chunk_size,
                is_last,
            } => self.bdat(chunk_size, is_last).await,
            Request::Rset => {
                self.tx = None;
                self.reply(reply::ok())
            }
            Request::Noop { .. } => self.reply(reply::ok()),
            Request::Quit => {
                self.codec.reply(&reply::bye(&self.config.hostname));
                Flow::Close
            }
            Request::Help { .. } => self.reply(reply::help()),
            Request::Vrfy { .. } => self.reply(reply::vrfy()),
            Request::Expn { .. } => self.reply(reply::expn()),
            Request::StartTls => self.starttls().await,
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, initial_response).await,
            Request::Etrn { name } => self.etrn(name).await,
            Request::Atrn { domains } if odmr => self.atrn(domains).await,
            Request::Lhlo { .. } | Request::Atrn { .. } | Request::Burl { .. } => {
                self.error(reply::unknown_command())
            }
        }
    }

    fn tls_active(&self) -> bool {
        self.codec.tls_active()
    }

    /// AUTH is offered over TLS, or in the clear only where the listener
    /// allows it (by default: loopback listeners).
    fn auth_offered(&self) -> bool {
        self.tls_active() || self.listen.plaintext_auth_allowed()
    }

    /// ETRN is offered where mail is held, to `hub.etrn_networks` and
    /// authenticated clients.
    fn etrn_offered(&self) -> bool {
        self.shared.triggers.etrn.is_some() && !self.config.hub.hold_domains.is_empty()
    }

    fn may_etrn(&self) -> bool {
        self.auth_user.is_some()
            || match self.peer.ip() {
                Some(ip) => self.config.hub.may_etrn(ip),
                None => true,
            }
    }

    /// ETRN (RFC 1985): start delivering a hold domain's mail to its branch.
    async fn etrn(&mut self, name: String) -> Flow {
        if !self.etrn_offered() {
            return self.error(reply::unknown_command());
        }
        if self.helo.is_none() {
            return self.error(reply::need_helo());
        }
        if self.tx.is_some() {
            return self.error(reply::etrn_in_transaction());
        }
        if !self.may_etrn() {
            info!(peer = %self.peer, name = %name, "ETRN refused: not in hub.etrn_networks and not authenticated");
            return self.reply(reply::etrn_not_allowed(&name));
        }
        if name.starts_with('#') {
            return self.reply(reply::etrn_no_queues(&name));
        }
        let config = &self.config;
        let held_here = config.hub.hold_domains.iter().any(|h| {
            crate::address::domain_matches(&name, h) || crate::address::domain_matches(h, &name)
        });
        if name.is_empty() || !held_here {
            info!(peer = %self.peer, name = %name, "ETRN for a domain not held here");
            return self.reply(reply::etrn_not_held(&name));
        }
        let store = self.shared.store.clone();
        let spec = name.to_ascii_lowercase();
        let lookup = spec.clone();
        let count = match tokio::task::spawn_blocking(move || store.held_count(&lookup)).await {
            Ok(Ok(n)) => n,
            _ => return self.reply(reply::etrn_failed(&name)),
        };
        // One delivery per domain at a time: a repeated ETRN starts none.
        let started = self
            .shared
            .triggers
            .etrn_running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(spec.clone());
        if started {
            if let Some(tx) = &self.shared.triggers.etrn {
                let _ = tx.send(spec);
            }
        }
        info!(peer = %self.peer, name = %name, held = count, started, "ETRN");
        self.reply(if count == 0 {
            reply::etrn_nothing(&name)
        } else {
            reply::etrn_started(&name, count)
        })
    }

    /// ATRN (RFC 2645), hub role: an authenticated branch takes the held
    /// mail of the domains `[hub.odmr]` gives its account, over this very
    /// connection. After 250 the connection goes to the daemon, which
    /// delivers as a client; this session ends without closing it.
    async fn atrn(&mut self, asked: Vec<String>) -> Flow {
        if self.helo.is_none() {
            return self.error(reply::need_helo());
        }
        let Some(account) = self.auth_user.clone() else {
            info!(peer = %self.peer, "ATRN refused: not authenticated");
            return self.reply(reply::atrn_auth_required());
        };
        let allowed = self.config.hub.odmr_domains(&account);
        let domains: Vec<String> = if asked.is_empty() {
            allowed.clone()
        } else {
            asked
                .iter()
                .map(|d| d.trim().to_ascii_lowercase())
                .collect()
        };
        if domains.is_empty() {
            info!(peer = %self.peer, account = %account, "ATRN refused: no domains in [hub.odmr]");
            return self.reply(reply::atrn_refused(format!(
                "account {account} has no domains in [hub.odmr]"
            )));
        }
        if let Some(d) = domains.iter().find(|d| !allowed.contains(d)) {
            info!(peer = %self.peer, account = %account, domain = %d, "ATRN refused: domain not allowed for the account");
            return self.reply(reply::atrn_refused(format!(
                "account {account} may not take {d} ([hub.odmr])"
            )));
        }
        let Some(turn) = self.shared.triggers.atrn.clone() else {
            return self.reply(reply::atrn_unavailable());
        };
        let store = self.shared.store.clone();
        let lookup = domains.clone();
        let held = tokio::task::spawn_blocking(move || {
            lookup
                .iter()
                .map(|d| store.held_count(d))
                .sum::<Result<i64, _>>()
        })
        .await;
        let held = match held {
            Ok(Ok(n)) => n,
            _ => return self.reply(reply::atrn_unavailable()),
        };
        if held == 0 {
            info!(peer = %self.peer, account = %account, domains = %domains.join(","), "ATRN: no mail");
            return self.reply(reply::atrn_no_mail());
        }
        self.codec
            .reply(&reply::atrn_turning(held, &domains.join(",")));
        if self.codec.flush().await.is_err() {
            return Flow::Close;
        }
        if !self.codec.buffered().is_empty() {
            // The branch spoke before our 250: nothing it said can stand.
            warn!(peer = %self.peer, octets = self.codec.buffered().len(), "ATRN: input after ATRN discarded");
            self.codec.discard_input();
        }
        info!(peer = %self.peer, account = %account, domains = %domains.join(","), held, "ATRN: turning the connection around");
        let io = std::mem::replace(self.codec.get_mut(), Conn::Gone);
        let _ = turn.send(crate::shared::Turned {
            io: Box::new(io),
            peer: self.peer.to_string(),
            account,
            domains,
        });
        Flow::Close
    }

    fn may_relay(&self) -> bool {
        self.auth_user.is_some()
            || (self.listen.mode == ListenMode::Relay
                && match self.peer.ip() {
                    Some(ip) => self.config.relay.may_relay(ip),
                    // Programs on this machine (outpost sendmail) may send anywhere.
                    None => true,
                })
    }

    fn helo(&mut self, host: String, esmtp: bool) -> Flow {
        if host.is_empty() || !host.bytes().all(|b| b.is_ascii_graphic()) {
            return self.error(reply::syntax(
                "Send EHLO with your host name or address literal",
            ));
        }
        self.tx = None;
        self.helo = Some(host.chars().take(255).collect());
        self.esmtp = esmtp;
        let config = &self.config;
        let mut lines: Vec<std::borrow::Cow<'static, str>> = vec![format!(
            "{} greets {}",
            config.hostname,
            self.helo.as_deref().unwrap_or("")
        )
        .into()];
        if esmtp && self.listen.mode == ListenMode::Odmr {
            lines.push("ENHANCEDSTATUSCODES".into());
            if self.tls.is_some() && !self.tls_active() {
                lines.push("STARTTLS".into());
            }
            if self.auth_offered() && self.auth_user.is_none() {
                lines.push("AUTH PLAIN LOGIN".into());
            }
            lines.push("ATRN".into());
        } else if esmtp {
            lines.push("PIPELINING".into());
            lines.push(format!("SIZE {}", config.relay.max_message_size).into());
            lines.push("8BITMIME".into());
            lines.push("SMTPUTF8".into());
            lines.push("ENHANCEDSTATUSCODES".into());
            lines.push("CHUNKING".into());
            lines.push("DSN".into());
            if self.checkpoint_offered() {
                lines.push("CHECKPOINT".into());
            }
            if self.etrn_offered() && self.may_etrn() {
                lines.push("ETRN".into());
            }
            if self.tls.is_some() && !self.tls_active() {
                lines.push("STARTTLS".into());
            }
            if self.auth_offered() && self.auth_user.is_none() {
                lines.push("AUTH PLAIN LOGIN".into());
            }
            lines.push("HELP".into());
        }
        self.reply(Reply::multi(250, lines))
    }

    async fn mail(&mut self, from: proto::MailFrom<String>) -> Flow {
        if self.helo.is_none() {
            return self.error(reply::need_helo());
        }
        if self.tx.is_some() {
            return self.error(reply::nested_mail());
        }
        if self.listen.mode != ListenMode::Relay && self.auth_user.is_none() {
            return self.reply(reply::auth_required());
        }
        let smtputf8 = from.flags & proto::MAIL_SMTPUTF8 != 0;
        if !from.address.is_ascii() && !smtputf8 {
            return self.reply(reply::non_ascii_address());
        }
        if !from.address.is_empty() && policy::split(&from.address).is_none() {
            return self.reply(Reply::new(
                553,
                "5.1.7",
                "Sender address must be user@domain or <>",
            ));
        }
        for (set, name) in [
            (
                from.flags & proto::MAIL_BODY_BINARYMIME != 0,
                "BODY=BINARYMIME",
            ),
            (from.flags & proto::MAIL_REQUIRETLS != 0, "REQUIRETLS"),
            (
                from.hold_for != 0 || from.hold_until != 0,
                "HOLDFOR/HOLDUNTIL",
            ),
            (from.by != 0, "BY"),
            (from.mtrk.is_some(), "MTRK"),
        ] {
            if set {
                return self.reply(reply::smtputf8_unsupported_param(name));
            }
        }
        let max = self.config.relay.max_message_size;
        if from.size as u64 > max {
            info!(peer = %self.peer, declared = from.size, limit = max, "refused: SIZE over the limit");
            return self.reply(reply::too_big_declared(max));
        }
        if let Err(r) = self.room_for(from.size as u64) {
            return self.reply(r);
        }
        let body_type = if from.flags & proto::MAIL_BODY_8BITMIME != 0 {
            Some("8BITMIME".to_string())
        } else if from.flags & proto::MAIL_BODY_7BIT != 0 {
            Some("7BIT".to_string())
        } else {
            None
        };
        let dsn_ret = if from.flags & proto::MAIL_RET_FULL != 0 {
            Some("FULL".to_string())
        } else if from.flags & proto::MAIL_RET_HDRS != 0 {
            Some("HDRS".to_string())
        } else {
            None
        };
        let checkpoint = match from.trans_id {
            Some(transid) if self.checkpoint_offered() => Some(TransactionKey {
                transid,
                helo: self.helo.clone().unwrap_or_default(),
                client: self.client_identity(),
            }),
            _ => None,
        };
        if let Some(key) = &checkpoint {
            if let Some(flow) = self.resume(key, &from.address).await {
                return flow;
            }
        }
        self.tx = Some(Transaction {
            sender: from.address,
            body_type,
            smtputf8,
            dsn_ret,
            dsn_envid: from.env_id,
            recipients: Vec::new(),
            given: 0,
            size_hint: from.size.min(max as usize),
            bdat: None,
            checkpoint,
            resumed: Vec::new(),
            completed: None,
            received: None,
        });
        self.reply(reply::sender_ok())
    }

    /// CHECKPOINT is offered on the SMTP listeners unless
    /// `smtp.checkpoint_keep` is 0.
    fn checkpoint_offered(&self) -> bool {
        !self.config.smtp.checkpoint_keep.is_zero() && self.listen.mode != ListenMode::Odmr
    }

    /// Who the client is, for a checkpoint's key: its account, or its
    /// address. Another client can never resume its transactions.
    fn client_identity(&self) -> String {
        match (&self.auth_user, self.peer.ip()) {
            (Some(u), _) => format!("account:{}", u.to_ascii_lowercase()),
            (None, Some(ip)) => format!("address:{ip}"),
            (None, None) => self.peer.to_string(),
        }
    }

    /// A MAIL with a TRANSID this client used before: the transaction is
    /// restored (sender, parameters, recipients, the content received so
    /// far) and the client told where to go on (355). A TRANSID unknown,
    /// expired, or with another sender starts a new transaction (None).
    async fn resume(&mut self, key: &TransactionKey, sender: &str) -> Option<Flow> {
        let store = self.shared.store.clone();
        let lookup = key.clone();
        let found = tokio::task::spawn_blocking(move || store.partial(&lookup))
            .await
            .ok()?
            .ok()??;
        let keep = self.config.smtp.checkpoint_keep.as_secs() as i64;
        if found.sender != sender || found.updated_at + keep < unix_now() {
            return None;
        }
        let env = found.envelope;
        info!(peer = %self.peer, transid = %key.transid, offset = found.size,
              completed = found.queue_id.as_deref().unwrap_or(""), "CHECKPOINT: transaction resumed");
        self.tx = Some(Transaction {
            sender: found.sender,
            body_type: env.body_type,
            smtputf8: env.smtputf8,
            dsn_ret: env.dsn_ret,
            dsn_envid: env.dsn_envid,
            given: env.recipients.len(),
            recipients: env.recipients,
            size_hint: found.size.max(0) as usize,
            bdat: None,
            checkpoint: Some(key.clone()),
            resumed: found.content,
            completed: found.queue_id,
            received: None,
        });
        Some(self.reply(reply::checkpoint_offset(found.size)))
    }

    /// The end of a session: a transaction marked with TRANSID whose
    /// content was cut off is kept, for its client to resume.
    async fn checkpoint_interrupted(&mut self) {
        let Some(tx) = self.tx.take() else {
            return;
        };
        let (Some(key), Some(received)) = (tx.checkpoint, tx.received) else {
            return;
        };
        if tx.completed.is_some() || received.is_empty() {
            return;
        }
        let size = received.len() as i64;
        let partial = crate::queue::Partial {
            key: key.clone(),
            sender: tx.sender,
            envelope: crate::queue::Envelope {
                body_type: tx.body_type,
                smtputf8: tx.smtputf8,
                dsn_ret: tx.dsn_ret,
                dsn_envid: tx.dsn_envid,
                recipients: tx.recipients,
            },
            content: received,
            size,
            queue_id: None,
            updated_at: unix_now(),
        };
        match self
            .shared
            .writer
            .apply(vec![Change::SavePartial(Box::new(partial))])
            .await
        {
            Ok(()) => {
                info!(peer = %self.peer, transid = %key.transid, octets = size, "CHECKPOINT: interrupted transaction kept")
            }
            Err(e) => {
                warn!(peer = %self.peer, transid = %key.transid, error = %e, "CHECKPOINT: could not keep the interrupted transaction")
            }
        }
    }

    /// `store.min_free`: refuses a new message (452 4.3.1) while the store's
    /// file system is short of space, or short of room for `declared`.
    fn room_for(&self, declared: u64) -> Result<(), Reply> {
        let min_free = self.config.min_free();
        if min_free == 0 {
            return Ok(());
        }
        let free = match crate::queue::space::available(&self.config.store.path) {
            Ok(f) => f,
            Err(e) => {
                // Not knowing is no reason to refuse: a full disk still
                // shows as 452 when the message is committed.
                debug!(peer = %self.peer, error = %e, "cannot read the store's free space");
                return Ok(());
            }
        };
        policy::room_for_message(free, min_free, declared).inspect_err(|r| {
            warn!(peer = %self.peer, free, min_free, declared, reply = %r.summary(), "MAIL refused: the store's disk is short of space (store.min_free)");
        })
    }

    async fn rcpt(&mut self, to: proto::RcptTo<String>) -> Flow {
        let may_relay = self.may_relay();
        let max = self.config.relay.max_recipients;
        let Some(tx) = self.tx.as_ref() else {
            return self.error(reply::need_mail());
        };
        if tx.bdat.is_some() {
            return self.error(reply::bdat_in_progress());
        }
        if !to.address.is_ascii() && !tx.smtputf8 {
            return self.refuse_rcpt(reply::non_ascii_address());
        }
        let notify_any =
            proto::RCPT_NOTIFY_SUCCESS | proto::RCPT_NOTIFY_FAILURE | proto::RCPT_NOTIFY_DELAY;
        if to.flags & proto::RCPT_NOTIFY_NEVER != 0 && to.flags & notify_any != 0 {
            // RFC 3461 §4.1: NEVER stands alone.
            return self.error(reply::bad_param(
                "NOTIFY=NEVER cannot be combined with other values".into(),
            ));
        }
        if tx.given >= max {
            return self.reply(reply::too_many_recipients(max));
        }
        let accepted = match policy::route_recipient(&self.config, &to.address, may_relay) {
            Ok(a) => a,
            Err(r) => {
                info!(peer = %self.peer, rcpt = %to.address, reply = %r.summary(), "recipient refused");
                return self.refuse_rcpt(r);
            }
        };
        if accepted.route == Route::Local {
            match self.local_name_exists(&accepted.local_part).await {
                Ok(true) => {}
                Ok(false) => {
                    info!(peer = %self.peer, rcpt = %accepted.address, "recipient refused: no such local user");
                    return self.refuse_rcpt(reply::unknown_user());
                }
                Err(e) => {
                    warn!(peer = %self.peer, error = %e, "account lookup failed");
                    return self.reply(reply::temp_lookup_failed());
                }
            }
        }
        let (mailboxes, outside) = if accepted.route == Route::Local {
            match policy::try_expand_local(&self.config, &accepted.local_part) {
                Ok(expanded) => expanded,
                Err(e) => {
                    warn!(peer = %self.peer, rcpt = %accepted.address, error = %e, "recipient refused: fix local.aliases");
                    return self.reply(reply::alias_loop());
                }
            }
        } else {
            (Vec::new(), Vec::new())
        };
        match self.mailbox_full(&mailboxes).await {
            Ok(None) => {}
            Ok(Some(account)) => {
                info!(peer = %self.peer, rcpt = %accepted.address, account = %account, "recipient refused: mailbox full");
                return self.reply(reply::mailbox_full());
            }
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "mailbox size lookup failed");
                return self.reply(reply::temp_lookup_failed());
            }
        }
        let notify = notify_string(to.flags);
        let tx = self.tx.as_mut().expect("checked above");
        if !tx
            .recipients
            .iter()
            .any(|r| r.address.eq_ignore_ascii_case(&accepted.address))
        {
            tx.given += 1;
        }
        let orcpt = to
            .orcpt
            .map(|o| format!("rfc822;{o}"))
            .or_else(|| (!outside.is_empty()).then(|| format!("rfc822;{}", accepted.address)));
        for address in outside {
            // An alias's outside targets go upstream, on behalf of the name.
            tx.add(NewRecipient {
                domain: policy::split(&address)
                    .map(|(_, d)| d.to_ascii_lowercase())
                    .unwrap_or_default(),
                address,
                route: Route::Upstream,
                dsn_notify: notify.clone(),
                dsn_orcpt: orcpt.clone(),
                mailboxes: Vec::new(),
            });
        }
        tx.add(NewRecipient {
            address: accepted.address,
            domain: accepted.domain,
            route: accepted.route,
            dsn_notify: notify,
            dsn_orcpt: orcpt,
            mailboxes,
        });
        self.reply(reply::recipient_ok())
    }

    /// The first of `accounts` whose mailbox is at its quota, if any.
    async fn mailbox_full(
        &self,
        accounts: &[String],
    ) -> Result<Option<String>, crate::queue::StoreError> {
        let limited: Vec<(String, u64)> = accounts
            .iter()
            .filter_map(|a| self.config.local.quota_of(a).map(|q| (a.clone(), q)))
            .collect();
        if limited.is_empty() {
            return Ok(None);
        }
        let store = self.shared.store.clone();
        tokio::task::spawn_blocking(move || {
            for (account, quota) in limited {
                if store.mailbox_usage(&account)? as u64 >= quota {
                    return Ok(Some(account));
                }
            }
            Ok(None)
        })
        .await
        .unwrap_or(Ok(None))
    }

    async fn local_name_exists(&self, local_part: &str) -> Result<bool, crate::queue::StoreError> {
        let config = &self.config;
        if policy::always_exists(local_part)
            || config
                .local
                .aliases
                .keys()
                .any(|k| k.eq_ignore_ascii_case(local_part))
        {
            return Ok(true);
        }
        let store = self.shared.store.clone();
        let name = local_part.to_string();
        tokio::task::spawn_blocking(move || store.user_exists(&name))
            .await
            .unwrap_or(Ok(false))
    }

    /// What message content may be: `relay.max_message_size`,
    /// `smtp.max_line_length`, `relay.max_hops`.
    fn content_limits(&self) -> Limits {
        let c = &self.config;
        Limits {
            size: usize::try_from(c.relay.max_message_size).unwrap_or(usize::MAX),
            line: c.smtp.max_line_length,
            hops: c.relay.max_hops,
        }
    }

    /// Checks that DATA or BDAT may start; returns the reply if not.
    fn content_allowed(&self) -> Option<Reply> {
        match &self.tx {
            None => Some(reply::need_mail()),
            Some(tx) if tx.recipients.is_empty() => Some(reply::need_rcpt()),
            Some(_) => None,
        }
    }

    async fn data(&mut self) -> Flow {
        if let Some(r) = self.content_allowed() {
            return self.error(r);
        }
        if self.tx.as_ref().is_some_and(|t| t.bdat.is_some()) {
            return self.error(reply::bdat_in_progress());
        }
        let id = QueueId::generate();
        let mut reader = DotReader::with_prefix(self.content_limits(), self.message_buffer(&id));
        // A resumed transaction goes on after the content it kept (whole
        // lines, so dot-stuffing goes on where it left off).
        if let Some(tx) = &self.tx {
            if !tx.resumed.is_empty() {
                let _ = reader.feed(&crate::dotstuff::dot_stuff(&tx.resumed)[..]);
            }
        }
        self.codec.reply(&reply::start_data());
        loop {
            let input = self.codec.buffered();
            if let Some(n) = reader.feed(input) {
                self.codec.consume(n);
                break;
            }
            let n = input.len();
            self.codec.consume(n);
            if !self.fill_data().await {
                if let Some(tx) = self.tx.as_mut().filter(|t| t.checkpoint.is_some()) {
                    tx.received = reader.complete_lines().map(<[u8]>::to_vec);
                }
                return Flow::Close;
            }
        }
        let size = reader.size();
        self.finish_message(id, reader.finish(), size).await
    }

    async fn bdat(&mut self, chunk: usize, last: bool) -> Flow {
        // The chunk is read whatever the answer, so the dialog stays in step.
        let refused = self.content_allowed();
        let mut sink = match (&refused, self.tx.as_mut().and_then(|t| t.bdat.take())) {
            (None, Some(open)) => Some(open),
            (None, None) => {
                let id = QueueId::generate();
                let mut c = Canonical::with_prefix(self.content_limits(), self.message_buffer(&id));
                if let Some(tx) = &self.tx {
                    c.extend(&tx.resumed);
                }
                Some((id.clone(), c))
            }
            (Some(_), _) => None,
        };
        let mut left = chunk;
        while left > 0 {
            if self.codec.buffered().is_empty() && !self.fill_data().await {
                if let (Some(tx), Some((_, c))) = (
                    self.tx.as_mut().filter(|t| t.checkpoint.is_some()),
                    sink.as_ref(),
                ) {
                    tx.received = c.taken().map(<[u8]>::to_vec);
                }
                return Flow::Close;
            }
            let input = self.codec.buffered();
            let take = input.len().min(left);
            if let Some((_, c)) = sink.as_mut() {
                c.extend(&input[..take]);
            }
            self.codec.consume(take);
            left -= take;
        }
        if let Some(r) = refused {
            return self.error(r);
        }
        let (id, content) = sink.expect("set when not refused");
        if !last {
            let tx = self.tx.as_mut().expect("content_allowed checked");
            if tx.checkpoint.is_some() {
                // Between chunks the link may break too.
                tx.received = content.taken().map(<[u8]>::to_vec);
            }
            tx.bdat = Some((id, content));
            return self.reply(reply::bdat_ok(chunk));
        }
        let size = content.size();
        self.finish_message(id, content.finish(), size).await
    }

    /// Ends the transaction: commits the message, or says why not.
    async fn finish_message(
        &mut self,
        id: QueueId,
        content: Result<Vec<u8>, ContentError>,
        size: usize,
    ) -> Flow {
        let tx = self.tx.take().expect("a transaction is open");
        let checkpoint = tx.checkpoint.clone();
        if let Some(queued) = &tx.completed {
            // Taken before the link broke (RFC 1047's window): said again,
            // not stored again.
            info!(peer = %self.peer, queue_id = %queued, "CHECKPOINT: already queued, not stored twice");
            return self.reply(reply::already_queued(queued));
        }
        let body = match content {
            Ok(body) => body,
            Err(e) => {
                let r = match e {
                    ContentError::BareLf => reply::bare_lf(),
                    ContentError::BareCr => reply::bare_cr(),
                    ContentError::Nul => reply::nul_in_data(),
                    ContentError::LineTooLong => {
                        reply::data_line_too_long(self.config.smtp.max_line_length)
                    }
                    ContentError::TooBig => {
                        reply::too_big(self.config.relay.max_message_size as usize)
                    }
                    ContentError::TooManyHops => reply::too_many_hops(self.config.relay.max_hops),
                };
                warn!(peer = %self.peer, from = %tx.sender, size, reply = %r.summary(), "message refused");
                return self.reply(r);
            }
        };
        let msg = NewMessage {
            id: id.clone(),
            received_at: unix_now(),
            sender: tx.sender,
            client_addr: self
                .peer
                .ip()
                .map(|ip| ip.to_string())
                .unwrap_or_else(|| "local".into()),
            client_helo: self.helo.clone().unwrap_or_default(),
            auth_user: self.auth_user.clone(),
            protocol: self.protocol(),
            body_type: tx.body_type,
            smtputf8: tx.smtputf8,
            dsn_ret: tx.dsn_ret,
            dsn_envid: tx.dsn_envid,
            recipients: tx.recipients,
            body,
        };
        let (sender, nrcpt, stored) = (msg.sender.clone(), msg.recipients.len(), msg.body.len());
        // In the same commit: a client that misses our reply learns on its
        // next try (same TRANSID) that the message was taken.
        let remembered = checkpoint.map(|key| {
            Change::SavePartial(Box::new(crate::queue::Partial {
                key,
                sender: msg.sender.clone(),
                envelope: crate::queue::Envelope {
                    body_type: msg.body_type.clone(),
                    smtputf8: msg.smtputf8,
                    dsn_ret: msg.dsn_ret.clone(),
                    dsn_envid: msg.dsn_envid.clone(),
                    recipients: msg.recipients.clone(),
                },
                content: Vec::new(),
                size: size as i64,
                queue_id: Some(id.to_string()),
                updated_at: unix_now(),
            }))
        });
        let mut changes = vec![Change::Insert(Box::new(msg))];
        changes.extend(remembered);
        match self.shared.writer.apply(changes).await {
            Ok(()) => {
                info!(peer = %self.peer, queue_id = %id, from = %sender, rcpts = nrcpt, size = stored, "queued");
                if let Some(n) = &self.shared.triggers.submitted {
                    n.notify_one();
                }
                self.reply(reply::queued(id.as_str()))
            }
            Err(e) => {
                let r = if e.is_full() {
                    reply::store_full()
                } else {
                    reply::store_failed()
                };
                tracing::error!(peer = %self.peer, queue_id = %id, error = %e, "could not store the message");
                self.reply(r)
            }
        }
    }

    /// RFC 3848 protocol names.
    fn protocol(&self) -> String {
        let mut p = String::from(if self.esmtp { "ESMTP" } else { "SMTP" });
        if self.esmtp && self.tls_active() {
            p.push('S');
        }
        if self.esmtp && self.auth_user.is_some() {
            p.push('A');
        }
        p
    }

    /// The trace header this gateway adds (RFC 5321 §4.4). Names the TLS
    /// version and cipher and the account, never a password.
    /// The buffer a message is collected in: the Received header first, and
    /// room for the size the client declared.
    fn message_buffer(&self, id: &QueueId) -> Vec<u8> {
        let mut buf = self.received_header(id);
        if let Some(tx) = &self.tx {
            buf.reserve(tx.size_hint.saturating_add(2));
        }
        buf
    }

    fn received_header(&self, id: &QueueId) -> Vec<u8> {
        let config = &self.config;
        let mut h = match (&self.peer, self.peer.ip()) {
            (_, Some(ip)) => format!(
                "Received: from {} ([{ip}])\r\n\tby {} (outpost) with {} id {}",
                self.helo.as_deref().unwrap_or("unknown"),
                config.hostname,
                self.protocol(),
                id
            ),
            (peer, None) => {
                let uid = match peer {
                    Peer::Local { uid } => *uid,
                    Peer::Tcp(_) => 0,
                };
                format!(
                    "Received: by {} (outpost, from userid {uid}) with {} id {}",
                    config.hostname,
                    self.protocol(),
                    id
                )
            }
        };
        if let Some((version, cipher)) = self.codec.get_ref().tls_info() {
            h.push_str(&format!("\r\n\t(using {version} with cipher {cipher})"));
        }
        if let Some(user) = &self.auth_user {
            h.push_str(&format!("\r\n\t(authenticated as {user})"));
        }
        if let Some(tx) = &self.tx {
            if let [only] = tx.recipients.as_slice() {
                h.push_str(&format!("\r\n\tfor <{}>", only.address));
            }
        }
        h.push_str(&format!(";\r\n\t{}\r\n", chrono::Local::now().to_rfc2822()));
        h.into_bytes()
    }

    async fn starttls(&mut self) -> Flow {
        if self.tls_active() {
            return self.error(reply::tls_already());
        }
        if self.tls.is_none() {
            return self.reply(reply::tls_unavailable());
        }
        self.codec.reply(&reply::ready_tls());
        if self.codec.flush().await.is_err() {
            return Flow::Close;
        }
        let dropped = self.codec.discard_input();
        if dropped > 0 {
            warn!(peer = %self.peer, octets = dropped, "discarded input pipelined after STARTTLS");
        }
        if !self.start_tls().await {
            return Flow::Close;
        }
        // RFC 3207 §4.2: forget everything learnt before TLS.
        self.helo = None;
        self.esmtp = false;
        self.tx = None;
        self.auth_user = None;
        Flow::Go
    }

    /// Runs the TLS handshake on the plain stream. False when it failed.
    async fn start_tls(&mut self) -> bool {
        let Some(acceptor) = self.tls.clone() else {
            return false;
        };
        let limit = self.read_limit(TLS_TIMEOUT.min(self.config.smtp.command_timeout));
        match self.codec.start_tls(&acceptor, limit).await {
            Ok(()) => {
                let (v, c) = self.codec.get_ref().tls_info().unwrap_or_default();
                debug!(peer = %self.peer, version = %v, cipher = %c, "TLS established");
                true
            }
            Err(e) => {
                info!(peer = %self.peer, error = %e, "TLS handshake failed");
                false
            }
        }
    }

    async fn auth(&mut self, mechanism: u64, initial: String) -> Flow {
        if self.auth_user.is_some() {
            return self.error(reply::auth_already());
        }
        if self.tx.is_some() {
            return self.error(reply::auth_in_transaction());
        }
        if !self.auth_offered() {
            return self.reply(reply::encryption_required());
        }
        let client = self.peer.ip().map(|ip| self.shared.client_of(ip));
        if let Some(left) =
            client.and_then(|c| self.shared.logins.blocked(c, Instant::now().into_std()))
        {
            info!(peer = %self.peer, minutes_left = left.as_secs().div_ceil(60), "AUTH refused: this client is blocked after too many failed logins (auth.max_failures)");
            return self.reply(reply::auth_blocked(left));
        }
        let creds = match mechanism {
            proto::AUTH_PLAIN => {
                let response = if initial.is_empty() {
                    match self.challenge("").await {
                        Ok(r) => r,
                        Err(flow) => return flow,
                    }
                } else {
                    initial
                };
                match auth::decode_b64(&response) {
                    Some(d) => auth::parse_plain(&d),
                    None => return self.error(reply::auth_bad_base64()),
                }
            }
            proto::AUTH_LOGIN => {
                let user = if initial.is_empty() {
                    match self.challenge("VXNlcm5hbWU6").await {
                        Ok(r) => r,
                        Err(flow) => return flow,
                    }
                } else {
                    initial
                };
                let pass = match self.challenge("UGFzc3dvcmQ6").await {
                    Ok(r) => r,
                    Err(flow) => return flow,
                };
                match (auth::decode_b64(&user), auth::decode_b64(&pass)) {
                    (Some(u), Some(p)) => match (String::from_utf8(u), String::from_utf8(p)) {
                        (Ok(u), Ok(p)) if !u.is_empty() => Some((u, p)),
                        _ => None,
                    },
                    _ => return self.error(reply::auth_bad_base64()),
                }
            }
            _ => return self.error(reply::auth_mechanism()),
        };
        let ok_user = match creds {
            Some((user, pass)) => {
                let (exists, ok) = self.shared.check_password(&user, pass).await;
                if ok {
                    Ok(user)
                } else {
                    Err(Some(user).filter(|_| exists))
                }
            }
            None => Err(None),
        };
        match ok_user {
            Ok(user) => {
                info!(peer = %self.peer, user = %user, "authenticated");
                self.auth_user = Some(user);
                self.reply(reply::auth_ok())
            }
            Err(user) => {
                self.auth_failures += 1;
                warn!(peer = %self.peer, user = user.as_deref().unwrap_or("?"), failures = self.auth_failures, "authentication failed");
                if let Some(client) = client {
                    self.shared.login_failed(
                        &self.config,
                        client,
                        user.as_deref(),
                        &self.peer.to_string(),
                    );
                }
                tokio::time::sleep(self.config.smtp.auth_failure_delay).await;
                if self.auth_failures >= self.config.smtp.max_auth_failures {
                    self.codec.reply(&reply::auth_too_many());
                    return Flow::Close;
                }
                self.reply(reply::auth_failed())
            }
        }
    }

    /// Sends a 334 challenge and reads the client's answer. `*` cancels.
    async fn challenge(&mut self, text: &'static str) -> Result<String, Flow> {
        self.codec.reply(&Reply::new(334, "", text));
        match self.next_line(MAX_AUTH_LINE).await {
            Some(Line::Text(l)) if l == b"*" => Err(self.error(reply::auth_cancelled())),
            Some(Line::Text(l)) => {
                String::from_utf8(l).map_err(|_| self.error(reply::auth_bad_base64()))
            }
            Some(Line::TooLong) => Err(self.error(Reply::new(
                500,
                "5.5.6",
                "Authentication exchange line is too long",
            ))),
            Some(Line::BareLf) => Err(self.error(reply::bare_lf_in_command())),
            Some(Line::Eof) | None => Err(Flow::Close),
        }
    }
}

fn looks_like_http(line: &[u8]) -> bool {
    const VERBS: [&[u8]; 6] = [
        b"GET ",
        b"POST ",
        b"HEAD ",
        b"PUT ",
        b"CONNECT ",
        b"OPTIONS ",
    ];
    VERBS
        .iter()
        .any(|v| line.len() >= v.len() && line[..v.len()].eq_ignore_ascii_case(v))
}

fn parse_error(e: proto::Error) -> Reply {
    match e {
        proto::Error::UnknownCommand => reply::unknown_command(),
        proto::Error::SyntaxError { syntax } => {
            Reply::new(501, "5.5.4", format!("Syntax: {syntax}"))
        }
        proto::Error::InvalidSenderAddress => Reply::new(553, "5.1.7", "Invalid sender address"),
        proto::Error::InvalidRecipientAddress => {
            Reply::new(553, "5.1.3", "Invalid recipient address")
        }
        proto::Error::InvalidParameter { param } => {
            reply::bad_param(format!("Invalid value for {param}"))
        }
        proto::Error::UnsupportedParameter { param } => reply::smtputf8_unsupported_param(&param),
        proto::Error::NeedsMoreData { .. }
        | proto::Error::ResponseTooLong
        | proto::Error::InvalidResponse { .. } => reply::syntax("Syntax error"),
    }
}

/// NOTIFY= as stored: "NEVER" or a comma list (RFC 3461 §4.1).
fn notify_string(flags: u64) -> Option<String> {
    if flags & proto::RCPT_NOTIFY_NEVER != 0 {
        return Some("NEVER".into());
    }
    let parts: Vec<&str> = [
        (proto::RCPT_NOTIFY_SUCCESS, "SUCCESS"),
        (proto::RCPT_NOTIFY_FAILURE, "FAILURE"),
        (proto::RCPT_NOTIFY_DELAY, "DELAY"),
    ]
    .iter()
    .filter(|(f, _)| flags & f != 0)
    .map(|(_, n)| *n)
    .collect();
    (!parts.is_empty()).then(|| parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify() {
        assert_eq!(notify_string(0), None);
        assert_eq!(
            notify_string(proto::RCPT_NOTIFY_NEVER),
            Some("NEVER".into())
        );
        assert_eq!(
            notify_string(proto::RCPT_NOTIFY_FAILURE | proto::RCPT_NOTIFY_DELAY),
            Some("FAILURE,DELAY".into())
        );
    }

    #[test]
    fn http() {
        assert!(looks_like_http(b"GET / HTTP/1.1"));
        assert!(looks_like_http(b"post /x HTTP/1.0"));
        assert!(!looks_like_http(b"GETX"));
    }
}
