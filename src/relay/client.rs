//! The SMTP client to the upstream relay.
//!
//! Opens a session (greeting, EHLO, STARTTLS, AUTH) and sends batches of
//! messages over it, pipelined: with CHUNKING, several `MAIL, RCPT…, BDAT
//! LAST` transactions are in flight back to back; with PIPELINING only, the
//! next transaction's commands ride behind the previous final dot, so a long
//! round trip is paid about once per message. Results are per recipient.
//!
//! Message bodies are stored canonical (CRLF only), and the DATA path
//! dot-stuffs every line: nothing sent can end DATA early at the upstream.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth;
use crate::codec::{BoxedIo, Io};

/// How long each phase may take (RFC 5321 §4.5.3.2 gives the minimums).
#[derive(Debug, Clone)]
pub struct Timeouts {
    pub connect: Duration,
    /// Greeting, EHLO, STARTTLS, AUTH, MAIL, RCPT and DATA replies.
    pub command: Duration,
    /// No progress while writing a message: no octet taken in this long.
    /// A slow message that keeps moving never times out.
    pub data: Duration,
    /// The reply to the end of a message (final dot or BDAT LAST).
    pub final_reply: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(30),
            command: Duration::from_secs(300),
            data: Duration::from_secs(180),
            final_reply: Duration::from_secs(600),
        }
    }
}

/// Bounds on one reply from the upstream: RFC 5321 §4.5.3.1.5 allows 512
/// octets a line; a little more is tolerated, a peer that never ends its
/// line or its reply is not.
const MAX_REPLY_LINE: usize = 4096;
const MAX_REPLY_LINES: usize = 200;
const MAX_REPLY_BYTES: usize = 64 << 10;

/// Message data is handed to the socket at most this much at a time; each
/// write has its own `Timeouts::data` (RFC 5321 §4.5.3.2.5: a timeout per
/// block written).
pub const BLOCK: usize = 64 << 10;

/// How a batch reports as it goes, and how it is told to stop.
pub struct Report<'a> {
    /// Called once per message (its index in the batch) as soon as every
    /// recipient's outcome is known: the caller records it at once, so a
    /// stop or a crash later resends nothing the upstream took.
    pub outcome: &'a mut (dyn FnMut(usize, Vec<Outcome>) + Send),
    /// Once set, no new transaction starts; those in flight finish.
    pub stop: &'a std::sync::atomic::AtomicBool,
}

impl Report<'_> {
    fn stopping(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPolicy {
    Required,
    Opportunistic,
    None,
}

/// What the client needs to open a session.
#[derive(Clone)]
pub struct ClientSettings {
    /// Our EHLO name.
    pub helo: String,
    pub tls: TlsPolicy,
    /// Verifying config for `required`; a non-verifying one for opportunistic.
    pub tls_config: Arc<rustls::ClientConfig>,
    /// The name the certificate must carry.
    pub tls_name: String,
    pub auth: Option<(String, String)>,
    pub timeouts: Timeouts,
}

/// A reply from the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl Reply {
    pub fn class(&self) -> u16 {
        self.code / 100
    }

    /// The enhanced status code in the reply, if it has one.
    pub fn status(&self) -> Option<&str> {
        let first = self.text.split_whitespace().next()?;
        let mut parts = first.split('.');
        let ok = parts.next().is_some_and(|c| matches!(c, "2" | "4" | "5"))
            && parts.clone().count() == 2
            && parts
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
        ok.then_some(first)
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text.replace('\n', " / "))
    }
}

/// Why the link is not usable: no attempt is burned for any message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    #[error("cannot resolve {0}")]
    Dns(String),
    #[error("cannot connect to {addr}: {error}")]
    Connect { addr: String, error: String },
    #[error("TLS with {addr} failed: {error}")]
    Tls { addr: String, error: String },
    #[error("{addr} does not offer STARTTLS and upstream.tls = \"required\"")]
    NoStartTls { addr: String },
    #[error("{addr} refused the session: {reply}")]
    Greeting { addr: String, reply: Reply },
    #[error("authentication at {addr} failed: {reply} (check upstream.username and upstream.password_file)")]
    Auth { addr: String, reply: Reply },
    #[error(
        "{addr} offers no AUTH mechanism we speak (PLAIN, LOGIN) but upstream.username is set"
    )]
    NoAuth { addr: String },
    #[error("timeout waiting for {addr} during {phase}")]
    Timeout { addr: String, phase: &'static str },
    #[error("connection to {addr} lost during {phase}: {error}")]
    Lost {
        addr: String,
        phase: &'static str,
        error: String,
    },
    /// The configuration cannot be used as it is (a password file that
    /// cannot be read, a CA file that does not load).
    #[error("{0}")]
    Config(String),
    #[error("{addr} sent a malformed reply ({why})")]
    Protocol { addr: String, why: &'static str },
}

/// The extensions the upstream offered in EHLO.
#[derive(Debug, Clone, Default)]
pub struct Extensions {
    pub pipelining: bool,
    pub chunking: bool,
    pub size: Option<u64>,
    pub eightbit: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub starttls: bool,
    pub auth_plain: bool,
    pub auth_login: bool,
}

impl Extensions {
    /// The extensions offered, as a person reads them.
    pub fn summary(&self) -> String {
        let mut out: Vec<String> = Vec::new();
        for (on, name) in [
            (self.pipelining, "PIPELINING"),
            (self.chunking, "CHUNKING"),
            (self.eightbit, "8BITMIME"),
            (self.smtputf8, "SMTPUTF8"),
            (self.dsn, "DSN"),
            (self.starttls, "STARTTLS"),
        ] {
            if on {
                out.push(name.into());
            }
        }
        if let Some(size) = self.size {
            out.push(format!("SIZE {size}"));
        }
        let auth: Vec<&str> = [(self.auth_plain, "PLAIN"), (self.auth_login, "LOGIN")]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, n)| *n)
            .collect();
        if !auth.is_empty() {
            out.push(format!("AUTH {}", auth.join(" ")));
        }
        out.join(" ")
    }

    fn parse(reply: &Reply) -> Extensions {
        let mut e = Extensions::default();
        for line in reply.text.lines().skip(1) {
            let mut words = line.split_whitespace();
            let kw = words.next().unwrap_or("").to_ascii_uppercase();
            match kw.as_str() {
                "PIPELINING" => e.pipelining = true,
                "CHUNKING" => e.chunking = true,
                "8BITMIME" => e.eightbit = true,
                "SMTPUTF8" => e.smtputf8 = true,
                "DSN" => e.dsn = true,
                "STARTTLS" => e.starttls = true,
                "SIZE" => e.size = words.next().and_then(|n| n.parse().ok()).filter(|&n| n > 0),
                "AUTH" => {
                    for m in words {
                        match m.to_ascii_uppercase().as_str() {
                            "PLAIN" => e.auth_plain = true,
                            "LOGIN" => e.auth_login = true,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        e
    }
}

/// A step of opening a session, as it succeeds.
#[derive(Debug)]
pub enum Step<'a> {
    Connected {
        addr: &'a str,
        elapsed: Duration,
    },
    Greeting(&'a Reply),
    Ehlo(&'a Extensions),
    Tls {
        /// Protocol version and cipher suite.
        session: &'a str,
        /// The server's certificate (DER), as it sent it.
        certificate: Option<&'a [u8]>,
    },
    Auth {
        user: &'a str,
    },
}

/// One recipient of an outgoing message.
#[derive(Debug, Clone)]
pub struct OutRecipient {
    pub address: String,
    pub notify: Option<String>,
    pub orcpt: Option<String>,
}

/// One message to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub sender: String,
    pub recipients: Vec<OutRecipient>,
    pub body: Vec<u8>,
    pub eightbit: bool,
    pub smtputf8: bool,
    pub dsn_ret: Option<String>,
    pub dsn_envid: Option<String>,
}

/// What happened to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered(Reply),
    Deferred(Reply),
    Bounced(Reply),
    /// The final dot was sent and no reply came (RFC 1047).
    Uncertain(String),
    /// Not tried: the session ended before this message's turn.
    Untouched,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// A connection the other side opened and turned around (ATRN).
    Turned(BoxedIo),
    /// Only while switching to TLS, or after a failed switch.
    Gone,
}

impl Stream {
    fn io(&mut self) -> std::io::Result<&mut dyn Io> {
        match self {
            Stream::Plain(s) => Ok(s),
            Stream::Tls(s) => Ok(s.as_mut()),
            Stream::Turned(s) => Ok(s.as_mut()),
            Stream::Gone => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }
}

/// An open session with the upstream, ready for MAIL.
pub struct Session {
    stream: Stream,
    rbuf: Vec<u8>,
    pub addr: String,
    pub ext: Extensions,
    pub tls: Option<String>,
    timeouts: Timeouts,
}

impl Session {
    /// Connects to `addr` and runs greeting, EHLO, STARTTLS and AUTH.
    pub async fn open(
        addr: std::net::SocketAddr,
        s: &ClientSettings,
    ) -> Result<Session, LinkError> {
        Self::open_observed(addr, s, &mut |_| {}).await
    }

    /// [`Session::open`], telling `seen` each step as it succeeds (for
    /// `outpost check-upstream`).
    pub async fn open_observed(
        addr: std::net::SocketAddr,
        s: &ClientSettings,
        seen: &mut (dyn FnMut(Step<'_>) + Send),
    ) -> Result<Session, LinkError> {
        let a = addr.to_string();
        let started = std::time::Instant::now();
        let tcp = match tokio::time::timeout(s.timeouts.connect, TcpStream::connect(addr)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                return Err(LinkError::Connect {
                    addr: a,
                    error: e.to_string(),
                })
            }
            Err(_) => {
                return Err(LinkError::Timeout {
                    addr: a,
                    phase: "connect",
                })
            }
        };
        let _ = tcp.set_nodelay(true);
        seen(Step::Connected {
            addr: &a,
            elapsed: started.elapsed(),
        });
        let mut sess = Session {
            stream: Stream::Plain(tcp),
            rbuf: Vec::new(),
            addr: a.clone(),
            ext: Extensions::default(),
            tls: None,
            timeouts: s.timeouts.clone(),
        };
        let greeting = sess.read_reply("greeting").await?;
        if greeting.class() != 2 {
            return Err(LinkError::Greeting {
                addr: a,
                reply: greeting,
            });
        }
        seen(Step::Greeting(&greeting));
        sess.ehlo(&s.helo).await?;
        seen(Step::Ehlo(&sess.ext));
        let want_tls = match s.tls {
            TlsPolicy::Required => {
                if !sess.ext.starttls {
                    return Err(LinkError::NoStartTls { addr: a });
                }
                true
            }
            TlsPolicy::Opportunistic => sess.ext.starttls,
            TlsPolicy::None => false,
        };
        if want_tls {
            sess.starttls(s).await?;
            let certificate = match &sess.stream {
                Stream::Tls(t) => t
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.as_ref().to_vec()),
                _ => None,
            };
            seen(Step::Tls {
                session: sess.tls.as_deref().unwrap_or(""),
                certificate: certificate.as_deref(),
            });
            sess.ehlo(&s.helo).await?;
        }
        if let Some((user, pass)) = &s.auth {
            sess.authenticate(user, pass).await?;
            seen(Step::Auth { user });
        }
        Ok(sess)
    }

    /// A transaction started and abandoned: `MAIL FROM:<>` then `RSET`,
    /// nothing sent. Tells whether the upstream would take mail from us.
    pub async fn try_mail(&mut self) -> Result<(Reply, Reply), LinkError> {
        let mail = self.command("MAIL FROM:<>\r\n", "MAIL").await?;
        let rset = self.command("RSET\r\n", "RSET").await?;
        Ok((mail, rset))
    }

    /// The client side of a connection a branch opened and turned around
    /// with ATRN (RFC 2645): the branch greets, we say EHLO. No STARTTLS
    /// and no AUTH: the connection is as secure as the branch made it, and
    /// the branch authenticated itself before ATRN.
    pub async fn turned(
        io: BoxedIo,
        addr: String,
        s: &ClientSettings,
    ) -> Result<Session, LinkError> {
        let mut sess = Session {
            stream: Stream::Turned(io),
            rbuf: Vec::new(),
            addr: addr.clone(),
            ext: Extensions::default(),
            tls: None,
            timeouts: s.timeouts.clone(),
        };
        let greeting = sess.read_reply("greeting").await?;
        if greeting.class() != 2 {
            return Err(LinkError::Greeting {
                addr,
                reply: greeting,
            });
        }
        sess.ehlo(&s.helo).await?;
        Ok(sess)
    }

    /// ATRN (RFC 2645), branch role: ask the hub to turn this connection
    /// around and deliver the held mail of `domains` over it. The hub may
    /// take long to answer (it looks through its queue).
    pub async fn atrn(&mut self, domains: &[String]) -> Result<Reply, LinkError> {
        self.write(format!("ATRN {}\r\n", domains.join(",")).as_bytes(), "ATRN")
            .await?;
        self.read_reply_within("ATRN", self.timeouts.final_reply)
            .await
    }

    /// The connection itself, after ATRN's 250: this side becomes the
    /// server on it. None when it broke.
    pub fn into_io(mut self) -> Option<BoxedIo> {
        if !self.rbuf.is_empty() {
            tracing::warn!(peer = %self.addr, octets = self.rbuf.len(), "input after ATRN's reply discarded");
        }
        match std::mem::replace(&mut self.stream, Stream::Gone) {
            Stream::Plain(s) => Some(Box::new(s)),
            Stream::Tls(s) => Some(Box::new(*s)),
            Stream::Turned(s) => Some(s),
            Stream::Gone => None,
        }
    }

    async fn ehlo(&mut self, helo: &str) -> Result<(), LinkError> {
        let r = self.command(&format!("EHLO {helo}\r\n"), "EHLO").await?;
        if r.class() != 2 {
            return Err(LinkError::Greeting {
                addr: self.addr.clone(),
                reply: r,
            });
        }
        self.ext = Extensions::parse(&r);
        Ok(())
    }

    async fn starttls(&mut self, s: &ClientSettings) -> Result<(), LinkError> {
        let r = self.command("STARTTLS\r\n", "STARTTLS").await?;
        if r.code != 220 {
            return Err(LinkError::Tls {
                addr: self.addr.clone(),
                error: format!("STARTTLS refused: {r}"),
            });
        }
        // Anything the server sent after 220 is not to be trusted (RFC 3207 §4.2).
        self.rbuf.clear();
        let name = rustls_pki_types::ServerName::try_from(s.tls_name.clone()).map_err(|e| {
            LinkError::Tls {
                addr: self.addr.clone(),
                error: format!("bad certificate name {}: {e}", s.tls_name),
            }
        })?;
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            return Err(LinkError::Tls {
                addr: self.addr.clone(),
                error: "TLS already active".into(),
            });
        };
        let connector = tokio_rustls::TlsConnector::from(s.tls_config.clone());
        let tls =
            match tokio::time::timeout(self.timeouts.command, connector.connect(name, tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    return Err(LinkError::Tls {
                        addr: self.addr.clone(),
                        error: describe_tls_error(&e),
                    })
                }
                Err(_) => {
                    return Err(LinkError::Timeout {
                        addr: self.addr.clone(),
                        phase: "TLS handshake",
                    })
                }
            };
        let (_, conn) = tls.get_ref();
        self.tls = Some(format!(
            "{} {}",
            conn.protocol_version()
                .and_then(|v| v.as_str())
                .unwrap_or("TLS")
                .replace('_', "."),
            conn.negotiated_cipher_suite()
                .and_then(|c| c.suite().as_str())
                .unwrap_or("")
        ));
        self.stream = Stream::Tls(Box::new(tls));
        Ok(())
    }

    async fn authenticate(&mut self, user: &str, pass: &str) -> Result<(), LinkError> {
        let r = if self.ext.auth_plain {
            let token = auth::encode_b64(format!("\0{user}\0{pass}").as_bytes());
            self.command(&format!("AUTH PLAIN {token}\r\n"), "AUTH")
                .await?
        } else if self.ext.auth_login {
            let r = self.command("AUTH LOGIN\r\n", "AUTH").await?;
            if r.code != 334 {
                return Err(LinkError::Auth {
                    addr: self.addr.clone(),
                    reply: r,
                });
            }
            let r = self
                .command(
                    &format!("{}\r\n", auth::encode_b64(user.as_bytes())),
                    "AUTH",
                )
                .await?;
            if r.code != 334 {
                return Err(LinkError::Auth {
                    addr: self.addr.clone(),
                    reply: r,
                });
            }
            self.command(
                &format!("{}\r\n", auth::encode_b64(pass.as_bytes())),
                "AUTH",
            )
            .await?
        } else {
            return Err(LinkError::NoAuth {
                addr: self.addr.clone(),
            });
        };
        if r.class() != 2 {
            return Err(LinkError::Auth {
                addr: self.addr.clone(),
                reply: r,
            });
        }
        Ok(())
    }

    async fn command(&mut self, line: &str, phase: &'static str) -> Result<Reply, LinkError> {
        self.write(line.as_bytes(), phase).await?;
        self.read_reply(phase).await
    }

    /// Writes `bytes`: a command line within the command timeout; message
    /// data with the data timeout for each write, so that only a stall
    /// (no octet taken in that long) times out, never a message that is
    /// merely big or slow.
    async fn write(&mut self, bytes: &[u8], phase: &'static str) -> Result<(), LinkError> {
        let limit = if bytes.len() > 4096 {
            self.timeouts.data
        } else {
            self.timeouts.command
        };
        let addr = &self.addr;
        let failed = |e: std::io::Error| LinkError::Lost {
            addr: addr.clone(),
            phase,
            error: e.to_string(),
        };
        let stalled = |_| LinkError::Timeout {
            addr: addr.clone(),
            phase,
        };
        let io = self.stream.io().map_err(failed)?;
        let mut done = 0;
        while done < bytes.len() {
            let end = (done + BLOCK).min(bytes.len());
            let n = tokio::time::timeout(limit, io.write(&bytes[done..end]))
                .await
                .map_err(stalled)?
                .map_err(failed)?;
            if n == 0 {
                return Err(failed(std::io::ErrorKind::WriteZero.into()));
            }
            done += n;
        }
        tokio::time::timeout(limit, io.flush())
            .await
            .map_err(stalled)?
            .map_err(failed)
    }

    /// Reads one (possibly multi-line) reply to a command.
    async fn read_reply(&mut self, phase: &'static str) -> Result<Reply, LinkError> {
        self.read_reply_within(phase, self.timeouts.command).await
    }

    /// Reads the reply to the end of a message.
    async fn read_final_reply(&mut self) -> Result<Reply, LinkError> {
        self.read_reply_within("final dot", self.timeouts.final_reply)
            .await
    }

    async fn read_reply_within(
        &mut self,
        phase: &'static str,
        limit: Duration,
    ) -> Result<Reply, LinkError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut lines: Vec<String> = Vec::new();
        let mut code = 0u16;
        let mut total = 0;
        loop {
            while let Some(lf) = self.rbuf.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = self.rbuf.drain(..=lf).collect();
                let line = String::from_utf8_lossy(&raw)
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                let (c, sep, text) =
                    split_reply_line(&line).ok_or_else(|| LinkError::Protocol {
                        addr: self.addr.clone(),
                        why: "not a reply line",
                    })?;
                if code != 0 && c != code {
                    return Err(LinkError::Protocol {
                        addr: self.addr.clone(),
                        why: "reply code changed within a reply",
                    });
                }
                total += raw.len();
                code = c;
                lines.push(text.to_string());
                if sep != '-' {
                    return Ok(Reply {
                        code,
                        text: lines.join("\n"),
                    });
                }
                if lines.len() > MAX_REPLY_LINES || total > MAX_REPLY_BYTES {
                    return Err(LinkError::Protocol {
                        addr: self.addr.clone(),
                        why: "reply too long",
                    });
                }
            }
            // A line without an end: a peer that never stops talking is
            // cut off, it does not fill memory.
            if self.rbuf.len() > MAX_REPLY_LINE {
                return Err(LinkError::Protocol {
                    addr: self.addr.clone(),
                    why: "reply line too long",
                });
            }
            let mut chunk = [0u8; 4096];
            let io = &mut self.stream;
            let n =
                match tokio::time::timeout_at(deadline, async { io.io()?.read(&mut chunk).await })
                    .await
                {
                    Ok(Ok(0)) => {
                        return Err(LinkError::Lost {
                            addr: self.addr.clone(),
                            phase,
                            error: "connection closed".into(),
                        })
                    }
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) => {
                        return Err(LinkError::Lost {
                            addr: self.addr.clone(),
                            phase,
                            error: e.to_string(),
                        })
                    }
                    Err(_) => {
                        return Err(LinkError::Timeout {
                            addr: self.addr.clone(),
                            phase,
                        })
                    }
                };
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Asks the server to start delivering mail queued for `name` (RFC 1985:
    /// a domain, `@domain` or `#queue`).
    pub async fn etrn(&mut self, name: &str) -> Result<Reply, LinkError> {
        self.command(&format!("ETRN {name}\r\n"), "ETRN").await
    }

    /// Ends the session politely.
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            if self.write(b"QUIT\r\n", "QUIT").await.is_ok() {
                let _ = self.read_reply("QUIT").await;
            }
            if let Ok(io) = self.stream.io() {
                let _ = io.shutdown().await;
            }
        })
        .await;
    }

    /// Checks what the upstream said it accepts; a message it cannot take
    /// is bounced here without being sent.
    pub fn refuse_before_sending(&self, m: &Outgoing) -> Option<Reply> {
        let unsendable = std::iter::once(&m.sender)
            .chain(m.recipients.iter().map(|r| &r.address))
            .find(|a| smtp_path(a).is_none());
        if let Some(a) = unsendable {
            return Some(Reply {
                code: 553,
                text: format!(
                    "5.1.7 the address {:?} cannot be written in SMTP (control characters)",
                    a
                ),
            });
        }
        if let Some(max) = self.ext.size {
            if m.body.len() as u64 > max {
                return Some(Reply {
                    code: 552,
                    text: format!(
                        "5.3.4 message of {} octets is larger than the upstream accepts ({max} octets, its SIZE)",
                        m.body.len()
                    ),
                });
            }
        }
        if m.smtputf8 && !self.ext.smtputf8 {
            return Some(Reply {
                code: 553,
                text: "5.6.7 the message needs SMTPUTF8 (non-ASCII addresses) and the upstream does not offer it".into(),
            });
        }
        if m.eightbit && !self.ext.eightbit {
            return Some(Reply {
                code: 554,
                text:
                    "5.6.3 the message has 8-bit content and the upstream does not offer 8BITMIME"
                        .into(),
            });
        }
        None
    }

    fn envelope(&self, m: &Outgoing, bdat: bool) -> Vec<u8> {
        let mut out = format!("MAIL FROM:<{}>", smtp_path(&m.sender).unwrap_or_default());
        if let Some(max) = self.ext.size.map(|_| m.body.len()) {
            out.push_str(&format!(" SIZE={max}"));
        }
        if m.eightbit && self.ext.eightbit {
            out.push_str(" BODY=8BITMIME");
        }
        if m.smtputf8 && self.ext.smtputf8 {
            out.push_str(" SMTPUTF8");
        }
        if self.ext.dsn {
            if let Some(ret) = &m.dsn_ret {
                out.push_str(&format!(" RET={ret}"));
            }
            if let Some(envid) = &m.dsn_envid {
                out.push_str(&format!(" ENVID={}", xtext(envid)));
            }
        }
        out.push_str("\r\n");
        for r in &m.recipients {
            out.push_str(&format!(
                "RCPT TO:<{}>",
                smtp_path(&r.address).unwrap_or_default()
            ));
            if self.ext.dsn {
                if let Some(n) = &r.notify {
                    out.push_str(&format!(" NOTIFY={n}"));
                }
                if let Some(o) = &r.orcpt {
                    let (kind, addr) = o.split_once(';').unwrap_or(("rfc822", o));
                    out.push_str(&format!(" ORCPT={kind};{}", xtext(addr)));
                }
            }
            out.push_str("\r\n");
        }
        if bdat {
            out.push_str(&format!("BDAT {} LAST\r\n", m.body.len()));
        } else {
            out.push_str("DATA\r\n");
        }
        out.into_bytes()
    }

    /// Sends `msgs`, reporting each message's outcomes (one per
    /// recipient) through `report` as soon as they are known; a message
    /// never reported was not tried. After a connection loss the session
    /// is unusable (`Err`); otherwise it is handed back for more.
    pub async fn send_batch(
        mut self,
        msgs: &[&Outgoing],
        report: &mut Report<'_>,
    ) -> Result<Session, LinkError> {
        let r = if self.ext.chunking && self.ext.pipelining {
            self.send_bdat_pipelined(msgs, report).await
        } else {
            self.send_data(msgs, report).await
        };
        r.map(|()| self)
    }

    /// CHUNKING + PIPELINING: keep up to WINDOW transactions in flight.
    async fn send_bdat_pipelined(
        &mut self,
        msgs: &[&Outgoing],
        report: &mut Report<'_>,
    ) -> Result<(), LinkError> {
        // Transactions and octets in flight at most. An upstream that holds
        // its replies until its input runs dry (Postfix) answers a whole
        // window at once, so the window must cover more than one round
        // trip of its processing.
        const WINDOW: usize = 64;
        const WINDOW_BYTES: usize = 8 << 20;
        let mut sent = 0;
        let mut done = 0;
        // Handed to the kernel whole, and awaiting replies.
        let mut written: Vec<bool> = vec![false; msgs.len()];
        // On a lost connection: a message written whole may have been
        // taken (RFC 1047), one not written whole cannot have been.
        let lost = |report: &mut Report<'_>, written: &[bool], from: usize, e: &LinkError| {
            for (i, w) in written.iter().enumerate().skip(from) {
                if *w {
                    (report.outcome)(
                        i,
                        vec![Outcome::Uncertain(e.to_string()); msgs[i].recipients.len()],
                    );
                }
            }
        };
        while done < msgs.len() {
            if done == sent && report.stopping() {
                return Ok(());
            }
            let mut buf = Vec::new();
            let mut in_buf = Vec::new();
            let in_flight: usize = (done..sent)
                .filter(|&i| written[i])
                .map(|i| msgs[i].body.len())
                .sum();
            while sent < msgs.len()
                && !report.stopping()
                && sent - done < WINDOW
                && buf.len() < (1 << 20)
                && (in_flight + buf.len() < WINDOW_BYTES || sent == done)
            {
                let m = msgs[sent];
                if let Some(r) = self.refuse_before_sending(m) {
                    (report.outcome)(sent, vec![Outcome::Bounced(r); m.recipients.len()]);
                } else {
                    buf.extend_from_slice(&self.envelope(m, true));
                    buf.extend_from_slice(&m.body);
                    in_buf.push(sent);
                }
                sent += 1;
            }
            if !buf.is_empty() {
                if let Err(e) = self.write(&buf, "sending messages").await {
                    lost(report, &written, done, &e);
                    return Err(e);
                }
                for i in in_buf {
                    written[i] = true;
                }
            }
            // Read the replies of the oldest messages in flight.
            while done < sent {
                if !written[done] {
                    done += 1;
                    continue;
                }
                let m = msgs[done];
                let replies = async {
                    let mail = self.read_reply("MAIL").await?;
                    let mut rcpt = Vec::with_capacity(m.recipients.len());
                    for _ in &m.recipients {
                        rcpt.push(self.read_reply("RCPT").await?);
                    }
                    let last = self.read_final_reply().await?;
                    Ok::<_, LinkError>((mail, rcpt, last))
                };
                let (mail, rcpt, last) = match replies.await {
                    Ok(r) => r,
                    Err(e) => {
                        lost(report, &written, done, &e);
                        return Err(e);
                    }
                };
                written[done] = false;
                if let Some(e) = self.closing(&mail, &rcpt, &last) {
                    // 421: the upstream is going away; this message was not
                    // refused, and what follows it was never looked at.
                    lost(report, &written, done + 1, &e);
                    return Err(e);
                }
                (report.outcome)(done, outcomes(&mail, &rcpt, Some(&last)));
                done += 1;
                if sent < msgs.len() && !report.stopping() {
                    break; // refill the window
                }
            }
        }
        Ok(())
    }

    /// A 421 anywhere in a transaction's replies: the server is closing.
    fn closing(&self, mail: &Reply, rcpt: &[Reply], last: &Reply) -> Option<LinkError> {
        std::iter::once(mail)
            .chain(rcpt)
            .chain(std::iter::once(last))
            .find(|r| r.code == 421)
            .map(|r| LinkError::Greeting {
                addr: self.addr.clone(),
                reply: r.clone(),
            })
    }

    /// DATA, pipelined when offered: the next message's MAIL/RCPT/DATA are
    /// sent right behind the final dot.
    async fn send_data(
        &mut self,
        msgs: &[&Outgoing],
        report: &mut Report<'_>,
    ) -> Result<(), LinkError> {
        let pipelining = self.ext.pipelining;
        // The envelope of message `i` already sent and awaiting replies.
        let mut pending: Option<usize> = None;
        let mut i = 0;
        loop {
            let idx = match pending.take() {
                Some(p) => p,
                None => {
                    if report.stopping() {
                        return Ok(());
                    }
                    // Skip messages refused before sending.
                    while i < msgs.len() {
                        if let Some(r) = self.refuse_before_sending(msgs[i]) {
                            (report.outcome)(
                                i,
                                vec![Outcome::Bounced(r); msgs[i].recipients.len()],
                            );
                            i += 1;
                        } else {
                            break;
                        }
                    }
                    if i >= msgs.len() {
                        return Ok(());
                    }
                    if pipelining {
                        let env = self.envelope(msgs[i], false);
                        self.write(&env, "MAIL").await?;
                    }
                    i += 1;
                    i - 1
                }
            };
            let m = msgs[idx];
            let (mail, rcpt, data) = if pipelining {
                let mail = self.read_reply("MAIL").await?;
                let mut rcpt = Vec::new();
                for _ in &m.recipients {
                    rcpt.push(self.read_reply("RCPT").await?);
                }
                (mail, rcpt, self.read_reply("DATA").await?)
            } else {
                let env = self.envelope(m, false);
                let text = String::from_utf8_lossy(&env).into_owned();
                let mut lines = text.split_inclusive("\r\n");
                let mail = self.command(lines.next().unwrap_or(""), "MAIL").await?;
                let mut rcpt = Vec::new();
                if mail.class() == 2 {
                    for _ in &m.recipients {
                        rcpt.push(self.command(lines.next().unwrap_or(""), "RCPT").await?);
                    }
                } else {
                    rcpt = vec![mail.clone(); m.recipients.len()];
                }
                let any = rcpt.iter().any(|r| r.class() == 2);
                let data = if mail.class() == 2 && any {
                    self.command("DATA\r\n", "DATA").await?
                } else {
                    Reply {
                        code: 554,
                        text: "5.5.1 no valid recipients (DATA not sent)".into(),
                    }
                };
                (mail, rcpt, data)
            };
            if let Some(e) = self.closing(&mail, &rcpt, &data) {
                return Err(e);
            }
            if data.code != 354 {
                (report.outcome)(idx, outcomes(&mail, &rcpt, Some(&data)));
                // The transaction is not open any more at most servers;
                // RSET makes sure before the next MAIL.
                if mail.class() == 2 {
                    let r = self.command("RSET\r\n", "RSET").await?;
                    if r.class() != 2 {
                        return Err(LinkError::Greeting {
                            addr: self.addr.clone(),
                            reply: r,
                        });
                    }
                }
                continue;
            }
            let mut buf = crate::smtp::data::dot_stuff(&m.body);
            buf.extend_from_slice(b".\r\n");
            // Behind the dot: the next message's envelope (RFC 2920 §3.1).
            let mut next = None;
            if pipelining && !report.stopping() {
                while i < msgs.len() {
                    if let Some(r) = self.refuse_before_sending(msgs[i]) {
                        (report.outcome)(i, vec![Outcome::Bounced(r); msgs[i].recipients.len()]);
                        i += 1;
                    } else {
                        buf.extend_from_slice(&self.envelope(msgs[i], false));
                        next = Some(i);
                        i += 1;
                        break;
                    }
                }
            }
            if let Err(e) = self.write(&buf, "sending a message").await {
                // The dot may or may not have gone out.
                (report.outcome)(
                    idx,
                    vec![Outcome::Uncertain(e.to_string()); m.recipients.len()],
                );
                return Err(e);
            }
            match self.read_final_reply().await {
                Ok(last) if last.code == 421 => {
                    // Refused while closing: not taken, try again later.
                    return Err(LinkError::Greeting {
                        addr: self.addr.clone(),
                        reply: last,
                    });
                }
                Ok(last) => (report.outcome)(idx, outcomes(&mail, &rcpt, Some(&last))),
                Err(e) => {
                    (report.outcome)(
                        idx,
                        vec![Outcome::Uncertain(e.to_string()); m.recipients.len()],
                    );
                    return Err(e);
                }
            }
            pending = next;
        }
    }
}

/// Outcomes per recipient from the replies of one transaction.
fn outcomes(mail: &Reply, rcpt: &[Reply], last: Option<&Reply>) -> Vec<Outcome> {
    let by_class = |r: &Reply| match r.class() {
        2 => Outcome::Delivered(r.clone()),
        4 => Outcome::Deferred(r.clone()),
        _ => Outcome::Bounced(r.clone()),
    };
    if mail.class() != 2 {
        return rcpt.iter().map(|_| by_class(mail)).collect();
    }
    rcpt.iter()
        .map(|r| {
            if r.class() != 2 {
                return by_class(r);
            }
            match last {
                Some(l) => by_class(l),
                None => Outcome::Untouched,
            }
        })
        .collect()
}

/// An address as it goes between `<` and `>` (RFC 5321 §4.1.2): the local
/// part as a dot-atom when it is one, else as a quoted string, so that no
/// address can end the path early or add parameters (`"a> RET=FULL"@x`
/// stays one address). `None` when it cannot be written at all (control
/// characters). UTF-8 passes as it is (RFC 6531).
pub fn smtp_path(address: &str) -> Option<String> {
    if address.is_empty() {
        return Some(String::new());
    }
    if address.chars().any(|c| c.is_control()) {
        return None;
    }
    let (local, domain) = match address.rsplit_once('@') {
        Some((l, d)) => (l, Some(d)),
        None => (address, None),
    };
    let atext =
        |c: char| c.is_ascii_alphanumeric() || !c.is_ascii() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    let dot_atom = !local.is_empty()
        && local
            .split('.')
            .all(|a| !a.is_empty() && a.chars().all(atext));
    let domain_ok = domain.is_none_or(|d| {
        !d.is_empty()
            && (d.starts_with('[')
                && d.ends_with(']')
                && !d[1..d.len() - 1].contains([']', '[', '\\', ' '])
                || d.chars()
                    .all(|c| c.is_alphanumeric() || c == '-' || c == '.'))
    });
    if !domain_ok {
        return None;
    }
    let mut out = String::with_capacity(address.len() + 2);
    if dot_atom {
        out.push_str(local);
    } else {
        out.push('"');
        for c in local.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    if let Some(d) = domain {
        out.push('@');
        out.push_str(d);
    }
    Some(out)
}

/// xtext (RFC 3461 §4): `+`, `=`, controls and non-ASCII as +XX.
fn xtext(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

fn split_reply_line(line: &str) -> Option<(u16, char, &str)> {
    if line.len() < 3 || !line.is_char_boundary(3) {
        return None;
    }
    let code: u16 = line[..3].parse().ok()?;
    if !(200..600).contains(&code) {
        return None;
    }
    let sep = line[3..].chars().next().unwrap_or(' ');
    let text = line.get(4..).unwrap_or("");
    Some((code, sep, text))
}

fn describe_tls_error(e: &std::io::Error) -> String {
    let inner = e
        .get_ref()
        .map(|i| i.to_string())
        .unwrap_or_else(|| e.to_string());
    if inner.contains("UnknownIssuer") {
        format!("{inner}: the certificate is not signed by a trusted CA (set upstream.ca_file to the CA that signed it)")
    } else if inner.contains("NotValidForName") {
        format!("{inner}: the certificate does not name the upstream (set upstream.tls_name to a name it carries)")
    } else if inner.contains("Expired") {
        format!("{inner}: the certificate has expired")
    } else {
        inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions() {
        let r = Reply {
            code: 250,
            text: "hub greets\nPIPELINING\nSIZE 1000\nCHUNKING\nAUTH LOGIN plain\nDSN\n8BITMIME"
                .into(),
        };
        let e = Extensions::parse(&r);
        assert!(e.pipelining && e.chunking && e.dsn && e.eightbit && e.auth_login && e.auth_plain);
        assert_eq!(e.size, Some(1000));
        assert!(!e.starttls && !e.smtputf8);
    }

    #[test]
    fn per_recipient_outcomes() {
        let ok = Reply {
            code: 250,
            text: "2.0.0 ok".into(),
        };
        let defer = Reply {
            code: 451,
            text: "4.3.0 later".into(),
        };
        let no = Reply {
            code: 550,
            text: "5.1.1 no".into(),
        };
        let out = outcomes(&ok, &[ok.clone(), defer.clone(), no.clone()], Some(&ok));
        assert_eq!(
            out,
            vec![
                Outcome::Delivered(ok.clone()),
                Outcome::Deferred(defer.clone()),
                Outcome::Bounced(no.clone())
            ]
        );
        let out = outcomes(&defer, &[ok.clone(), ok.clone()], None);
        assert_eq!(out, vec![Outcome::Deferred(defer.clone()); 2]);
        assert_eq!(no.status(), Some("5.1.1"));
        assert_eq!(
            Reply {
                code: 250,
                text: "ok".into()
            }
            .status(),
            None
        );
    }

    #[test]
    fn addresses_cannot_smuggle_parameters() {
        assert_eq!(smtp_path("").as_deref(), Some(""));
        assert_eq!(
            smtp_path("a.b+c@x.example").as_deref(),
            Some("a.b+c@x.example")
        );
        assert_eq!(
            smtp_path("odd> RET=FULL ENVID=x@outside.example").as_deref(),
            Some("\"odd> RET=FULL ENVID=x\"@outside.example")
        );
        assert_eq!(
            smtp_path("we\"ird\\@x.example").as_deref(),
            Some("\"we\\\"ird\\\\\"@x.example")
        );
        assert_eq!(
            smtp_path("a..b@x.example").as_deref(),
            Some("\"a..b\"@x.example")
        );
        assert_eq!(smtp_path("postmaster").as_deref(), Some("postmaster"));
        assert_eq!(
            smtp_path("ü@bücher.example").as_deref(),
            Some("ü@bücher.example")
        );
        assert_eq!(smtp_path("a@[192.0.2.1]").as_deref(), Some("a@[192.0.2.1]"));
        assert_eq!(smtp_path("a\r\nRCPT TO:<b@x>@x.example"), None);
        assert_eq!(smtp_path("a@x.example> NOTIFY=NEVER"), None);
    }

    #[test]
    fn xtext_encoding() {
        assert_eq!(xtext("a+b=c d"), "a+2Bb+3Dc+20d");
    }
}
