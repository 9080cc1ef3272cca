//! What the upstream says: a reply, the extensions it offers, and why a
//! link could not be used.

/// A reply from the upstream (or, after ATRN, a branch): what our client
/// reads. What our servers send is `codec::Reply`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamReply {
    pub code: u16,
    pub text: String,
}

impl UpstreamReply {
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

impl std::fmt::Display for UpstreamReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text.replace('\n', " / "))
    }
}

/// Bounds on one reply from the upstream: RFC 5321 §4.5.3.1.5 allows 512
/// octets a line; a little more is tolerated, a peer that never ends its
/// line or its reply is not.
pub const MAX_REPLY_LINE: usize = 4096;
pub const MAX_REPLY_LINES: usize = 200;
pub const MAX_REPLY_BYTES: usize = 64 << 10;

/// Reads one (possibly multi-line) reply from what the upstream sent, as
/// it arrives, within the bounds above. Pure: the session's reads feed it.
#[derive(Debug, Default)]
pub struct ReplyReader {
    lines: Vec<String>,
    code: u16,
    total: usize,
}

impl ReplyReader {
    /// Takes the complete lines at the start of `buf` (removing them) up to
    /// the end of the reply. `Ok(None)`: the reply goes on, read more into
    /// `buf`. `Err`: what is wrong with what the upstream sent.
    pub fn take(&mut self, buf: &mut Vec<u8>) -> Result<Option<UpstreamReply>, &'static str> {
        while let Some(lf) = buf.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = buf.drain(..=lf).collect();
            let line = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            let (c, sep, text) = split_reply_line(&line).ok_or("not a reply line")?;
            if self.code != 0 && c != self.code {
                return Err("reply code changed within a reply");
            }
            self.total += raw.len();
            self.code = c;
            self.lines.push(text.to_string());
            if sep != '-' {
                return Ok(Some(UpstreamReply {
                    code: c,
                    text: std::mem::take(&mut self.lines).join("\n"),
                }));
            }
            if self.lines.len() > MAX_REPLY_LINES || self.total > MAX_REPLY_BYTES {
                return Err("reply too long");
            }
        }
        // A line without an end: a peer that never stops talking is cut
        // off, it does not fill memory.
        if buf.len() > MAX_REPLY_LINE {
            return Err("reply line too long");
        }
        Ok(None)
    }
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
    /// The upstream ended the session in the middle (a 421, or a RSET it
    /// would not take): what was not answered stays due.
    #[error("{addr} ended the session: {reply}")]
    Closing { addr: String, reply: UpstreamReply },
    #[error("{addr} refused the session: {reply}")]
    Greeting { addr: String, reply: UpstreamReply },
    #[error("authentication at {addr} failed: {reply} (check upstream.username and upstream.password_file)")]
    Auth { addr: String, reply: UpstreamReply },
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
    /// RFC 1845: transactions resume after a cut.
    pub checkpoint: bool,
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
            (self.checkpoint, "CHECKPOINT"),
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

    /// The keywords of an EHLO reply, read by smtp-proto's EHLO parser
    /// (the reply is given back its wire form for it).
    pub fn parse(reply: &UpstreamReply) -> Extensions {
        use smtp_proto as p;
        let lines: Vec<&str> = reply.text.split('\n').collect();
        let mut wire = String::new();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            wire.push_str(&format!("{}{sep}{line}\r\n", reply.code));
        }
        let Ok(ehlo) = p::EhloResponse::<String>::parse(&mut wire.as_bytes().iter()) else {
            return Extensions::default();
        };
        let has = |ext: u32| ehlo.capabilities & ext != 0;
        Extensions {
            pipelining: has(p::EXT_PIPELINING),
            chunking: has(p::EXT_CHUNKING),
            size: (has(p::EXT_SIZE) && ehlo.size > 0).then_some(ehlo.size as u64),
            eightbit: has(p::EXT_8BIT_MIME),
            smtputf8: has(p::EXT_SMTP_UTF8),
            dsn: has(p::EXT_DSN),
            starttls: has(p::EXT_START_TLS),
            auth_plain: ehlo.auth_mechanisms & p::AUTH_PLAIN != 0,
            checkpoint: has(p::EXT_CHECKPOINT),
            auth_login: ehlo.auth_mechanisms & p::AUTH_LOGIN != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_read_as_they_arrive_and_bounded() {
        let mut r = ReplyReader::default();
        let mut buf = b"250-hub greets\r\n250-PIPE".to_vec();
        assert_eq!(r.take(&mut buf), Ok(None));
        assert_eq!(buf, b"250-PIPE");
        buf.extend_from_slice(b"LINING\r\n250 DSN\r\n354 go on\r\n");
        let reply = r.take(&mut buf).unwrap().unwrap();
        assert_eq!(reply.code, 250);
        assert_eq!(reply.text, "hub greets\nPIPELINING\nDSN");
        // The next reply, pipelined, is left for the next reader.
        assert_eq!(buf, b"354 go on\r\n");
        let mut changed = b"250-a\r\n550 b\r\n".to_vec();
        assert!(ReplyReader::default().take(&mut changed).is_err());
        let mut junk = b"hello\r\n".to_vec();
        assert!(ReplyReader::default().take(&mut junk).is_err());
        let mut endless = vec![b'2'; MAX_REPLY_LINE + 1];
        assert!(ReplyReader::default().take(&mut endless).is_err());
        let mut many = b"250-x\r\n".repeat(MAX_REPLY_LINES + 1);
        assert!(ReplyReader::default().take(&mut many).is_err());
    }

    #[test]
    fn extensions() {
        let r = UpstreamReply {
            code: 250,
            text: "hub greets\nPIPELINING\nSIZE 1000\nCHUNKING\nAUTH LOGIN plain\nDSN\n8BITMIME\nCHECKPOINT"
                .into(),
        };
        let e = Extensions::parse(&r);
        assert!(e.pipelining && e.chunking && e.dsn && e.eightbit && e.auth_login && e.auth_plain);
        assert!(e.checkpoint);
        assert_eq!(e.size, Some(1000));
        assert!(!e.starttls && !e.smtputf8);
    }
}
