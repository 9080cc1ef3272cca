//! One SMTP session: commands in, replies out, accepted messages to the store.
//!
//! This file holds the session, its dialog loop and the dispatch of
//! commands; `envelope` (MAIL, RCPT), `content` (DATA, BDAT and the
//! commit), `auth_tls` (STARTTLS, AUTH), `hub` (ETRN, ATRN) and
//! `checkpoint` (RFC 1845) hold the commands.

mod auth_tls;
mod checkpoint;
mod content;
mod envelope;
mod hub;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use smtp_proto::{self as proto, Request};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::auth;
use crate::config::{Config, Listen, ListenMode};
use crate::queue::{
    unix_now, Change, DsnRet, NewMessage, NewRecipient, QueueId, Route, TransactionKey,
};

use crate::codec::{Codec, Conn, Line};
use crate::shared::{phase_reached, Login, Peer, Phase, Shared};
use crate::smtp::data::{Canonical, ContentError, DotReader, Limits};
use crate::smtp::policy;
use crate::smtp::reply::{self, Reply};

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
    dsn_ret: Option<DsnRet>,
    dsn_envid: Option<String>,
    recipients: Vec<NewRecipient>,
    /// Recipients the client gave (alias targets not counted).
    given: usize,
    /// SIZE= from MAIL: room for the message is made once, not by doubling.
    size_hint: usize,
    /// Set by the first BDAT chunk.
    bdat: Option<content::Chunked>,
    /// CHECKPOINT (RFC 1845): the transaction's TRANSID key.
    checkpoint: Option<TransactionKey>,
    /// Content received over an earlier connection, resumed after it.
    resumed: Vec<u8>,
    /// Committed already under this id; the client never heard it.
    completed: Option<String>,
    /// What came of the content before this link broke: checkpointed when
    /// the session ends.
    received: Option<crate::queue::Body>,
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
        if self.listen.mode.implicit_tls() && !self.tls_handshake().await {
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

    /// A refusal of the transaction or a recipient for a limit or a
    /// condition on this side (not counted as the client's error).
    fn refuse(&mut self, stage: &'static str, r: Reply) -> Flow {
        self.shared.metrics.refused(stage, r.status);
        self.reply(r)
    }

    /// A recipient refused for what the client asked (not for a limit or
    /// a failure on this side): an error like a protocol error, and at
    /// `smtp.max_rcpt_errors` the end of the session, so that one session
    /// cannot probe a long list of names.
    fn refuse_rcpt(&mut self, r: Reply) -> Flow {
        self.shared.metrics.refused("rcpt", r.status);
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
        let request = match parse_command(&mut line) {
            Ok(r) => r,
            Err(r) => return self.error(r),
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
        self.reply(reply::ehlo(lines))
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
}

/// Parses one command line (given without its CRLF, which is added to
/// `line` for smtp-proto's parser) into a request, or the reply that
/// refuses it. Pure: the fuzz target `smtp_command` calls it as the
/// session does.
pub fn parse_command(line: &mut Vec<u8>) -> Result<Request<String>, Reply> {
    line.extend_from_slice(b"\r\n");
    Request::parse(&mut line.iter())
        .map(|r| r.into_owned())
        .map_err(parse_error)
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
        proto::Error::SyntaxError { syntax } => reply::syntax_hint(syntax),
        proto::Error::InvalidSenderAddress => reply::bad_sender_address(),
        proto::Error::InvalidRecipientAddress => reply::bad_recipient_address(),
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
