//! The sections of the configuration file, each with its defaults, and
//! the checks a value gets while it is read.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

use crate::window::Window;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub path: PathBuf,
    /// Free space (bytes) to keep on the store's file system: below it, MAIL
    /// is answered 452 4.3.1. Unset: 4 × `relay.max_message_size`; 0: no check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_free: Option<u64>,
    /// How long a finished message (every recipient delivered, bounced or
    /// expired, in no mailbox) stays in the store for `queue show` before
    /// it and its history are purged.
    #[serde(with = "humantime_serde_compat")]
    pub keep_history: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("/var/lib/outpost/queue.sqlite"),
            min_free: None,
            keep_history: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub address: SocketAddr,
    pub mode: ListenMode,
    /// Offer AUTH (SMTP) or plain-text login before TLS. Defaults to on for
    /// listeners bound to a loopback address only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plaintext_auth: Option<bool>,
}

impl Listen {
    pub fn plaintext_auth_allowed(&self) -> bool {
        self.plaintext_auth
            .unwrap_or_else(|| self.address.ip().is_loopback())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenMode {
    /// Port 25 style: relaying for `relay.networks`, local and hold domains for anyone.
    Relay,
    /// Port 587: STARTTLS, then AUTH, before MAIL.
    Submission,
    /// Port 465: implicit TLS, then AUTH.
    Submissions,
    Pop3,
    Pop3s,
    /// Port 143: IMAP with STARTTLS.
    Imap,
    /// Port 993: IMAP over implicit TLS.
    Imaps,
    /// Port 366, hub role: branches authenticate and take their held mail
    /// over their own connection with ATRN (RFC 2645).
    Odmr,
}

impl ListenMode {
    pub fn is_smtp(self) -> bool {
        matches!(
            self,
            ListenMode::Relay | ListenMode::Submission | ListenMode::Submissions | ListenMode::Odmr
        )
    }
    pub fn implicit_tls(self) -> bool {
        matches!(
            self,
            ListenMode::Submissions | ListenMode::Pop3s | ListenMode::Imaps
        )
    }
}

impl fmt::Display for ListenMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ListenMode::Relay => "relay",
            ListenMode::Submission => "submission",
            ListenMode::Submissions => "submissions",
            ListenMode::Pop3 => "pop3",
            ListenMode::Pop3s => "pop3s",
            ListenMode::Imap => "imap",
            ListenMode::Imaps => "imaps",
            ListenMode::Odmr => "odmr",
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Required unless `self_signed`; then `<store dir>/tls/cert.pem` when
    /// not given (filled in by [`super::Config::parse`]).
    #[serde(default)]
    pub certificate: PathBuf,
    /// Required unless `self_signed`; then `<store dir>/tls/key.pem`.
    #[serde(default)]
    pub key: PathBuf,
    /// Make a self-signed certificate on first start when the files are missing.
    #[serde(default)]
    pub self_signed: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Clients in these networks may relay outbound without AUTH.
    pub networks: Vec<IpNet>,
    pub max_message_size: u64,
    pub max_recipients: usize,
    /// `Received:` header fields a message may arrive with; more means a
    /// mail loop (554 5.4.6). Postfix's hopcount_limit.
    pub max_hops: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            networks: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_hops: 50,
        }
    }
}

impl RelayConfig {
    pub fn may_relay(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.networks.iter().any(|n| n.contains(&ip))
    }
}

/// An IPv4 client reaching a dual-stack socket shows as `::ffff:a.b.c.d`;
/// networks are written in IPv4 form, so compare in that form.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Limits and timeouts of the SMTP server (RFC 5321 §4.5.3).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// Sessions open at once, over all listeners.
    pub max_connections: usize,
    /// Sessions open at once from one client address.
    pub max_connections_per_client: usize,
    /// Waiting for the next command (RFC 5321 §4.5.3.2.7: at least 5 minutes).
    #[serde(with = "humantime_serde_compat")]
    pub command_timeout: Duration,
    /// Waiting for the next block of message data (§4.5.3.2.7 asks 5 minutes too).
    #[serde(with = "humantime_serde_compat")]
    pub data_timeout: Duration,
    /// Failed AUTH attempts before the session is closed.
    pub max_auth_failures: u32,
    /// Pause before answering a failed AUTH.
    #[serde(with = "humantime_serde_compat")]
    pub auth_failure_delay: Duration,
    /// Protocol errors (unknown commands, bad syntax) before the session is closed.
    pub max_errors: u32,
    /// On SIGTERM, how long transactions in flight may take to finish.
    #[serde(with = "humantime_serde_compat")]
    pub shutdown_grace: Duration,
    /// The longest line of message content, in octets with its CRLF.
    /// RFC 5321 says 1000; office programs send longer ones.
    pub max_line_length: usize,
    /// The longest a session may last, whatever it does (421 then).
    #[serde(with = "humantime_serde_compat")]
    pub max_session_time: Duration,
    /// Errors, refused recipients included, after which a session that
    /// had a recipient refused is closed (Postfix's smtpd_hard_error_limit).
    pub max_rcpt_errors: u32,
    /// IPv6 clients in one network of this prefix length count as one
    /// client for `max_connections_per_client` and failed logins.
    pub ipv6_client_prefix: u8,
    /// CHECKPOINT (RFC 1845): how long an interrupted transaction, or the
    /// id of a completed one, is kept for its client to resume; 0: not
    /// offered.
    #[serde(with = "humantime_serde_compat")]
    pub checkpoint_keep: Duration,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            max_connections: 200,
            max_connections_per_client: 20,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(300),
            max_auth_failures: 3,
            auth_failure_delay: Duration::from_secs(2),
            max_errors: 10,
            shutdown_grace: Duration::from_secs(30),
            max_line_length: 65536,
            max_session_time: Duration::from_secs(3600),
            max_rcpt_errors: 20,
            ipv6_client_prefix: 64,
            checkpoint_keep: Duration::from_secs(24 * 3600),
        }
    }
}

/// Limits of the POP3 server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pop3Config {
    /// An idle session is closed after this (RFC 1939 §3: at least 10 minutes).
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// Failed logins before the session is closed.
    pub max_auth_failures: u32,
    /// Pause before answering a failed login.
    #[serde(with = "humantime_serde_compat")]
    pub auth_failure_delay: Duration,
    /// The longest a session may last, whatever it does.
    #[serde(with = "humantime_serde_compat")]
    pub max_session_time: Duration,
}

impl Default for Pop3Config {
    fn default() -> Self {
        Pop3Config {
            idle_timeout: Duration::from_secs(600),
            max_auth_failures: 3,
            auth_failure_delay: Duration::from_secs(2),
            max_session_time: Duration::from_secs(1800),
        }
    }
}

/// Limits of the IMAP server.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImapConfig {
    /// A session that sends nothing is closed after this (RFC 9051 §5.4:
    /// at least 30 minutes). A client in IDLE renews it by ending and
    /// starting IDLE again, as clients do every 29 minutes or less.
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// Failed logins before the session is closed.
    pub max_auth_failures: u32,
    /// Pause before answering a failed login.
    #[serde(with = "humantime_serde_compat")]
    pub auth_failure_delay: Duration,
    /// The longest a session may last, whatever it does; the client then
    /// connects again (phones keep one open for hours).
    #[serde(with = "humantime_serde_compat")]
    pub max_session_time: Duration,
    /// The largest literal a client may send (an APPEND's message, a
    /// password); unset: `relay.max_message_size`.
    pub max_literal_size: Option<u64>,
}

impl Default for ImapConfig {
    fn default() -> Self {
        ImapConfig {
            idle_timeout: Duration::from_secs(30 * 60),
            max_auth_failures: 3,
            auth_failure_delay: Duration::from_secs(2),
            max_session_time: Duration::from_secs(24 * 3600),
            max_literal_size: None,
        }
    }
}

/// Failed logins (SMTP AUTH, POP3 and IMAP) counted across sessions, and the
/// password checks themselves.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Failed logins from one client (an IPv4 address, an IPv6
    /// `smtp.ipv6_client_prefix` network) within `failure_window` after
    /// which that client is refused logins for `block_time`.
    pub max_failures: u32,
    #[serde(with = "humantime_serde_compat")]
    pub failure_window: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub block_time: Duration,
    /// Failed logins for one account (from anywhere) within
    /// `failure_window` after which the account is reported as under
    /// attack; each address that fails for it is then blocked at once.
    pub max_account_failures: u32,
    /// Password checks (argon2, about 19 MiB each) run at once.
    pub verify_threads: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            max_failures: 10,
            failure_window: Duration::from_secs(900),
            block_time: Duration::from_secs(900),
            max_account_failures: 30,
            verify_threads: 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    Required,
    Opportunistic,
    None,
}

impl UpstreamTls {
    /// As written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamTls::Required => "required",
            UpstreamTls::Opportunistic => "opportunistic",
            UpstreamTls::None => "none",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `[host]:port` connects to that host; `host:port` looks up MX records.
    pub server: String,
    pub tls: UpstreamTls,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Lets `username` go with `tls` other than "required", where the
    /// password may cross the link in clear (an upstream on a trusted
    /// network only).
    pub allow_plaintext_auth: bool,
    /// Parallel connections to the upstream during a flush.
    pub connections: u32,
    /// The name the upstream's certificate must carry; defaults to the host
    /// in `server`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_name: Option<String>,
    /// A DNS server ("127.0.0.1:53") for MX lookups instead of the system's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolver: Option<SocketAddr>,
    /// Envelope sender of DSNs; empty (the null sender) unless set, for
    /// upstreams that refuse <> from an authenticated client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dsn_sender: Option<String>,
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    /// Waiting for a reply to a command (RFC 5321 §4.5.3.2: 5 minutes).
    #[serde(with = "humantime_serde_compat")]
    pub command_timeout: Duration,
    /// No progress while sending a message: one block of it not taken by
    /// the upstream in this long (Postfix's `smtp_data_xfer_timeout`). A
    /// message that is merely slow never times out.
    #[serde(with = "humantime_serde_compat")]
    pub data_timeout: Duration,
    /// Waiting for the reply to the end of a message (RFC 5321
    /// §4.5.3.2.6: 10 minutes).
    #[serde(with = "humantime_serde_compat")]
    pub final_timeout: Duration,
    /// Where ATRN goes (`flush.atrn`): `[host]:port`; the upstream's host
    /// on port 366 when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub odmr: Option<String>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            server: "[127.0.0.1]:2626".into(),
            tls: UpstreamTls::Required,
            ca_file: None,
            username: None,
            password_file: None,
            allow_plaintext_auth: false,
            connections: 1,
            tls_name: None,
            resolver: None,
            dsn_sender: None,
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            final_timeout: Duration::from_secs(600),
            odmr: None,
        }
    }
}

impl UpstreamConfig {
    /// `server` split as [`parse_server`] does.
    pub fn target(&self) -> Result<Server, String> {
        parse_server(&self.server)
    }
}

/// Where a server setting (`upstream.server`, a hub route) points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub host: String,
    pub port: u16,
    /// `[host]`: the host as it is, no MX lookup.
    pub literal: bool,
}

/// Reads a server setting: `[host]:port` is used as is, `host:port` means
/// an MX lookup first. The port defaults to 25.
pub fn parse_server(s: &str) -> Result<Server, String> {
    let s = s.trim();
    let (host, literal, rest) = if let Some(inner) = s.strip_prefix('[') {
        let (h, rest) = inner
            .split_once(']')
            .ok_or_else(|| format!("`{s}`: missing `]` after the host"))?;
        (h.to_string(), true, rest)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => {
                (h.to_string(), false, &s[h.len()..][..p.len() + 1])
            }
            _ => (s.to_string(), false, ""),
        }
    };
    let port = match rest.strip_prefix(':') {
        Some(p) => p
            .parse()
            .map_err(|_| format!("`{s}`: `{p}` is not a port number"))?,
        None if rest.is_empty() => 25,
        None => return Err(format!("`{s}`: expected \"[host]:port\" or \"host:port\"")),
    };
    if host.is_empty() {
        return Err(format!("`{s}`: no host"));
    }
    Ok(Server {
        host,
        port,
        literal,
    })
}

/// What to do with a message whose final dot was sent but whose reply never
/// came (RFC 1047).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Uncertain {
    /// Send it again on the next flush (a duplicate is possible).
    Resend,
    /// Keep it held until the administrator releases or deletes it.
    Hold,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlushConfig {
    #[serde(
        with = "humantime_serde_compat::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub interval: Option<Duration>,
    pub on_submit: bool,
    pub etrn: Vec<String>,
    /// Messages larger than this go after every smaller one due in the
    /// same flush, so small mail is never held behind a big one.
    pub large_message_size: u64,
    /// While the link is down and mail waits, try a TCP connect to the
    /// upstream this often and flush as soon as it answers ("0s": off).
    #[serde(with = "humantime_serde_compat")]
    pub probe_interval: Duration,
    /// When the link may be used at all (local time); always when empty.
    pub windows: Vec<Window>,
    /// When messages over `large_message_size` may go (inside `windows`);
    /// always when empty.
    pub large_message_window: Vec<Window>,
    /// Octets sent to the upstream per local day at most; 0: no limit.
    pub daily_byte_budget: u64,
    /// After each flush, take this office's held mail from the hub over
    /// our own connection (ATRN, RFC 2645): passes NAT.
    #[serde(deserialize_with = "domains")]
    pub atrn: Vec<String>,
}

impl Default for FlushConfig {
    fn default() -> Self {
        FlushConfig {
            interval: None,
            on_submit: false,
            etrn: Vec::new(),
            large_message_size: 1 << 20,
            probe_interval: Duration::from_secs(5),
            windows: Vec::new(),
            large_message_window: Vec::new(),
            daily_byte_budget: 0,
            atrn: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    #[serde(with = "humantime_serde_compat")]
    pub base: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub max: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub max_age: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub max_age_absolute: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub delay_warning: Duration,
    pub uncertain: Uncertain,
}

impl Default for RetryConfig {
    fn default() -> Self {
        let h = 3600;
        RetryConfig {
            base: Duration::from_secs(300),
            max: Duration::from_secs(4 * h),
            max_age: Duration::from_secs(5 * 24 * h),
            max_age_absolute: Duration::from_secs(30 * 24 * h),
            delay_warning: Duration::from_secs(4 * h),
            uncertain: Uncertain::Resend,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    #[serde(deserialize_with = "domains")]
    pub domains: Vec<String>,
    /// Account that receives mail for `postmaster` in every local domain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postmaster: Option<String>,
    /// Extra names: `alias = ["account", "someone@elsewhere.example"]`.
    pub aliases: BTreeMap<String, Vec<String>>,
    /// Mailbox size limit in bytes for every account (none when unset);
    /// a full mailbox refuses new mail at RCPT with 452 4.2.2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota: Option<u64>,
    /// Per-account limits in bytes, overriding `quota`.
    pub quotas: BTreeMap<String, u64>,
}

impl LocalConfig {
    /// The mailbox limit of `account`, if any.
    pub fn quota_of(&self, account: &str) -> Option<u64> {
        self.quotas
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(account))
            .map(|(_, v)| *v)
            .or(self.quota)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Mail for these domains is accepted from anyone and held until the
    /// domain's branch asks for it (ETRN) or `outpost flush --domain D`.
    #[serde(deserialize_with = "domains")]
    pub hold_domains: Vec<String>,
    /// Clients here (or authenticated ones) may send ETRN.
    pub etrn_networks: Vec<IpNet>,
    /// Where a hold domain's mail goes: `"branch.example" = "[gw.branch.example]:25"`,
    /// or a table with the TLS policy: `{ server = "...", tls = "required" }`;
    /// a domain not listed goes to its MX.
    pub routes: BTreeMap<String, HubRoute>,
    /// Held mail that no branch took in this long is returned to its
    /// sender; `retry.max_age_absolute` when unset.
    #[serde(
        with = "humantime_serde_compat::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_hold: Option<Duration>,
    /// ATRN (RFC 2645): which held domains each account may take over an
    /// `odmr` listener: `branch7 = ["branch.example"]`.
    pub odmr: BTreeMap<String, Vec<String>>,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            hold_domains: Vec::new(),
            etrn_networks: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
            routes: BTreeMap::new(),
            max_hold: None,
            odmr: BTreeMap::new(),
        }
    }
}

impl HubConfig {
    pub fn may_etrn(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.etrn_networks.iter().any(|n| n.contains(&ip))
    }

    /// How long held mail waits for its branch.
    pub fn max_hold(&self, retry: &RetryConfig) -> Duration {
        self.max_hold.unwrap_or(retry.max_age_absolute)
    }

    /// The held domains `account` may take with ATRN (lower case).
    pub fn odmr_domains(&self, account: &str) -> Vec<String> {
        self.odmr
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(account))
            .map(|(_, v)| v.iter().map(|d| d.to_ascii_lowercase()).collect())
            .unwrap_or_default()
    }

    /// Where `domain`'s held mail goes: the route, or the domain (MX) with
    /// TLS when offered.
    pub fn destination(&self, domain: &str) -> HubRoute {
        self.routes
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(domain))
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| HubRoute::to(domain.to_string()))
    }
}

/// One entry of `hub.routes`: a server (`"[gw.branch.example]:25"`), or a
/// table that also says how the branch's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HubRoute {
    /// As `upstream.server`: `[host]:port`, or `host:port` for its MX.
    pub server: String,
    /// `opportunistic` unless set: a branch's gateway often has a
    /// self-signed certificate. `required` checks it against the system's
    /// roots or `ca_file` and the name (`tls_name`, else the host in
    /// `server`; never a name from DNS).
    pub tls: UpstreamTls,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_name: Option<String>,
}

impl HubRoute {
    /// A route to `server` with the default TLS policy.
    pub fn to(server: String) -> HubRoute {
        HubRoute {
            server,
            tls: UpstreamTls::Opportunistic,
            ca_file: None,
            tls_name: None,
        }
    }
}

impl<'de> Deserialize<'de> for HubRoute {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<HubRoute, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            server: String,
            #[serde(default = "opportunistic")]
            tls: UpstreamTls,
            ca_file: Option<PathBuf>,
            tls_name: Option<String>,
        }
        fn opportunistic() -> UpstreamTls {
            UpstreamTls::Opportunistic
        }
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = HubRoute;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a server (\"[host]:port\") or a table { server = \"...\", tls = \"required\" }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HubRoute, E> {
                Ok(HubRoute::to(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<HubRoute, A::Error> {
                let t = Table::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(HubRoute {
                    server: t.server,
                    tls: t.tls,
                    ca_file: t.ca_file,
                    tls_name: t.tls_name,
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    pub socket: PathBuf,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: PathBuf::from("/run/outpost/control.sock"),
        }
    }
}

/// `GET /metrics` (Prometheus) and `GET /` (the status page), read-only,
/// on one HTTP listener. Read at start.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub address: SocketAddr,
}

/// The local submission socket that `outpost sendmail` (and `sendmail`,
/// for programs) uses: SMTP from this machine, so an unprivileged user can
/// send without access to the store.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubmitConfig {
    pub socket: PathBuf,
    /// Permissions of the socket: 0o666 lets every local user submit.
    pub mode: u32,
    /// Group of the socket (with mode 0o660: only its members may submit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl Default for SubmitConfig {
    fn default() -> Self {
        SubmitConfig {
            socket: PathBuf::from("/run/outpost/submit.sock"),
            mode: 0o666,
            group: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    #[serde(deserialize_with = "log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

pub(super) fn default_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn domains<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    list.into_iter()
        .map(|s| {
            let s = s.trim().trim_end_matches('.').to_ascii_lowercase();
            let ok = !s.is_empty()
                && s.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if ok {
                Ok(s)
            } else {
                Err(de::Error::custom(format!(
                    "`{s}` is not a domain name: expected something like \"branch.example\""
                )))
            }
        })
        .collect()
}

fn log_level<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    match s.to_ascii_lowercase().as_str() {
        "error" | "warn" | "info" | "debug" | "trace" => Ok(s.to_ascii_lowercase()),
        _ => Err(de::Error::custom(format!(
            "unknown log level `{s}`: expected one of error, warn, info, debug, trace"
        ))),
    }
}

/// humantime durations ("15m", "4h", "5d") through serde.
pub(super) mod humantime_serde_compat {
    use super::*;

    /// The longest duration taken: deadlines are `now` plus a duration,
    /// and one near `u64::MAX` seconds overflows them (a panic in every
    /// session).
    pub const MAX: Duration = Duration::from_secs(100 * 31_557_600);

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        let v = humantime::parse_duration(&s).map_err(|e| {
            de::Error::custom(format!(
                "invalid duration \"{s}\" ({e}): expected a number and a unit, such as \"30s\", \"15m\", \"4h\" or \"5d\""
            ))
        })?;
        if v > MAX {
            return Err(de::Error::custom(format!(
                "duration \"{s}\" is too long: 100 years at most"
            )));
        }
        Ok(v)
    }

    pub fn serialize<S: serde::Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*v).to_string())
    }

    pub mod option {
        use super::*;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }

        pub fn serialize<S: serde::Serializer>(
            v: &Option<Duration>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => super::serialize(v, s),
                None => s.serialize_none(),
            }
        }
    }
}
