//! The SMTP client to the upstream relay (and, for ATRN, to a branch).
//!
//! `mod.rs` opens a session (greeting, EHLO, STARTTLS, AUTH) or takes over
//! a turned connection; `wire` reads replies and writes commands and data
//! with their timeouts and bounds; `send` sends batches of messages,
//! pipelined: with CHUNKING, several `MAIL, RCPT…, BDAT LAST` transactions
//! are in flight back to back; with PIPELINING only, the next transaction's
//! commands ride behind the previous final dot, so a long round trip is
//! paid about once per message. Results are per recipient. `reply` holds
//! what the upstream says: replies, extensions, and why a link failed.
//!
//! Message bodies are stored canonical (CRLF only), and the DATA path
//! dot-stuffs every line: nothing sent can end DATA early at the upstream.

mod reply;
mod send;
mod wire;

pub use crate::address::smtp_path;
pub use reply::{Extensions, LinkError, ReplyReader, UpstreamReply};
pub use send::{OutRecipient, Outcome, Outgoing, Report, RESUME_OVER};
pub use wire::BLOCK;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
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

/// A step of opening a session, as it succeeds.
#[derive(Debug)]
pub enum Step<'a> {
    Connected {
        addr: &'a str,
        elapsed: Duration,
    },
    Greeting(&'a UpstreamReply),
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

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// A connection the other side opened and turned around (ATRN).
    Turned(BoxedIo),
    /// Only while switching to TLS, or after a failed switch.
    Gone,
}

impl Stream {
    /// The TCP socket under the stream, where there is one of ours.
    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(s) => Some(s.get_ref().0),
            Stream::Turned(_) | Stream::Gone => None,
        }
    }

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
    progress: Arc<Progress>,
    /// Octets handed to the connection so far (before any TLS).
    written: u64,
}

/// How far the message on its way has got, for the big messages sent
/// alone: the flusher reads it while they go (`outpost status`).
#[derive(Debug, Default)]
pub struct Progress {
    /// The message's index in its batch, plus one; 0 while none goes.
    pub message: std::sync::atomic::AtomicUsize,
    /// Octets of the message, where this try started (the CHECKPOINT
    /// offset), and how far it has got (the offset included).
    pub size: std::sync::atomic::AtomicU64,
    pub resumed_at: std::sync::atomic::AtomicU64,
    pub sent: std::sync::atomic::AtomicU64,
    /// Octets the upstream had kept, summed over every resumed message.
    pub resumed_total: std::sync::atomic::AtomicU64,
    /// When the content began to go (Unix seconds).
    pub started_at: std::sync::atomic::AtomicI64,
}

impl Session {
    /// How far the message on its way has got.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

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
        let (mut sess, greeting) = Session::begin(Stream::Plain(tcp), a.clone(), s).await?;
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

    /// A session on `stream`, once the server greeted it with 2xx.
    async fn begin(
        stream: Stream,
        addr: String,
        s: &ClientSettings,
    ) -> Result<(Session, UpstreamReply), LinkError> {
        let mut sess = Session {
            stream,
            rbuf: Vec::new(),
            addr,
            ext: Extensions::default(),
            tls: None,
            timeouts: s.timeouts.clone(),
            progress: Arc::default(),
            written: 0,
        };
        let greeting = sess.read_reply("greeting").await?;
        if greeting.class() != 2 {
            return Err(LinkError::Greeting {
                addr: sess.addr,
                reply: greeting,
            });
        }
        Ok((sess, greeting))
    }

    /// A transaction started and abandoned: `MAIL FROM:<>` then `RSET`,
    /// nothing sent. Tells whether the upstream would take mail from us.
    pub async fn try_mail(&mut self) -> Result<(UpstreamReply, UpstreamReply), LinkError> {
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
        let (mut sess, _) = Session::begin(Stream::Turned(io), addr, s).await?;
        sess.ehlo(&s.helo).await?;
        Ok(sess)
    }

    /// ATRN (RFC 2645), branch role: ask the hub to turn this connection
    /// around and deliver the held mail of `domains` over it. The hub may
    /// take long to answer (it looks through its queue).
    pub async fn atrn(&mut self, domains: &[String]) -> Result<UpstreamReply, LinkError> {
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

    /// Asks the server to start delivering mail queued for `name` (RFC 1985:
    /// a domain, `@domain` or `#queue`).
    pub async fn etrn(&mut self, name: &str) -> Result<UpstreamReply, LinkError> {
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
}

fn describe_tls_error(e: &std::io::Error) -> String {
    use rustls::CertificateError as C;
    let inner = e
        .get_ref()
        .map(|i| i.to_string())
        .unwrap_or_else(|| e.to_string());
    let cert = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .and_then(|r| match r {
            rustls::Error::InvalidCertificate(c) => Some(c),
            _ => None,
        });
    match cert {
        Some(C::UnknownIssuer) => format!(
            "{inner}: the certificate is not signed by a trusted CA (set upstream.ca_file, or the ca_file of the hub.routes entry, to the CA that signed it)"
        ),
        Some(C::NotValidForName | C::NotValidForNameContext { .. }) => format!(
            "{inner}: the certificate does not name the upstream as configured (set upstream.tls_name, or the tls_name of the hub.routes entry, to a name it carries)"
        ),
        Some(C::Expired | C::ExpiredContext { .. }) => {
            format!("{inner}: the certificate has expired")
        }
        _ => inner,
    }
}
