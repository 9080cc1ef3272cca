//! What the upstream says: a reply, the extensions it offers, and why a
//! link could not be used.

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

    pub(super) fn parse(reply: &Reply) -> Extensions {
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
                "CHECKPOINT" => e.checkpoint = true,
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
}
