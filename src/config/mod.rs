//! The configuration file: TOML, durations in humantime form.
//!
//! Every value is checked while it is deserialized, so a mistake is reported
//! with the file, the line and the line's text (see [`ConfigError`]). Relative
//! paths are taken relative to the working directory.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod sections;

pub use sections::*;

/// Where `--config` points when neither it nor `OUTPOST_CONFIG` is given.
pub const DEFAULT_PATH: &str = "/etc/outpost/outpost.toml";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// EHLO name and the name in Received headers.
    #[serde(default = "sections::default_hostname")]
    pub hostname: String,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub listen: Vec<Listen>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub relay: RelayConfig,
    #[serde(default)]
    pub smtp: SmtpConfig,
    #[serde(default)]
    pub pop3: Pop3Config,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub flush: FlushConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub local: LocalConfig,
    #[serde(default)]
    pub hub: HubConfig,
    #[serde(default)]
    pub control: ControlConfig,
    #[serde(default)]
    pub submit: SubmitConfig,
    #[serde(default)]
    pub log: LogConfig,
}

/// A configuration problem, located in the file when it can be.
#[derive(Debug)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub line_text: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(text) = &self.line_text {
            write!(
                f,
                "\n    {line_no} | {text}",
                line_no = self.line.unwrap_or(0)
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            line: None,
            line_text: None,
            message: format!(
                "cannot read the configuration file: {e} (give another with --config or OUTPOST_CONFIG)"
            ),
        })?;
        Config::parse(&text, path)
    }

    /// Parses `text`; `path` is used in error messages only.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|span| line_of(text, span.start));
            ConfigError {
                path: path.to_path_buf(),
                line,
                line_text: line
                    .and_then(|l| text.lines().nth(l - 1))
                    .map(|s| s.trim().to_string()),
                message: e.message().trim().to_string(),
            }
        })?;
        config.validate().map_err(|(key, message)| {
            let line = find_key_line(text, key);
            ConfigError {
                path: path.to_path_buf(),
                line,
                line_text: line
                    .and_then(|l| text.lines().nth(l - 1))
                    .map(|s| s.trim().to_string()),
                message: format!("`{key}`: {message}"),
            }
        })?;
        Ok(config)
    }

    /// Checks that concern more than one value. Returns the key to blame.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.hostname.trim().is_empty() || self.hostname.contains(char::is_whitespace) {
            return Err((
                "hostname",
                "must be a host name such as \"outpost.branch.example\"".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for l in &self.listen {
            if !seen.insert(l.address) {
                return Err(("listen.address", format!("{} is listed twice", l.address)));
            }
            if l.mode.implicit_tls() && self.tls.is_none() {
                return Err((
                    "listen.mode",
                    format!(
                        "mode \"{}\" on {} needs a certificate: add a [tls] section (certificate, key, or self_signed = true)",
                        l.mode, l.address
                    ),
                ));
            }
            if l.mode == ListenMode::Submission && self.tls.is_none() && !l.plaintext_auth_allowed()
            {
                return Err((
                    "listen.mode",
                    format!(
                        "submission on {} offers AUTH only after STARTTLS, which needs a [tls] section",
                        l.address
                    ),
                ));
            }
        }
        if self.relay.max_message_size == 0 {
            return Err(("max_message_size", "must be more than 0".into()));
        }
        if self.relay.max_recipients == 0 {
            return Err((
                "max_recipients",
                "must be at least 1 (RFC 5321 asks for 100)".into(),
            ));
        }
        if self.relay.max_hops == 0 {
            return Err(("max_hops", "must be at least 1 (Postfix uses 50)".into()));
        }
        if self.smtp.max_line_length < 1000 {
            return Err((
                "max_line_length",
                "must be at least 1000 (RFC 5321 §4.5.3.1.6: 998 octets and the CRLF)".into(),
            ));
        }
        if self.smtp.max_connections == 0 || self.smtp.max_connections_per_client == 0 {
            return Err(("max_connections", "must be at least 1".into()));
        }
        if !(16..=128).contains(&self.smtp.ipv6_client_prefix) {
            return Err((
                "ipv6_client_prefix",
                "must be a prefix length from 16 to 128 (64: one customer network)".into(),
            ));
        }
        if self.smtp.max_rcpt_errors == 0 {
            return Err(("max_rcpt_errors", "must be at least 1".into()));
        }
        if self.auth.verify_threads == 0 || self.auth.verify_threads > 64 {
            return Err(("verify_threads", "must be from 1 to 64".into()));
        }
        if self.auth.max_failures == 0 || self.auth.max_account_failures == 0 {
            return Err(("max_failures", "must be at least 1".into()));
        }
        if let Err(e) = self.upstream.target() {
            return Err(("server", e));
        }
        if self.upstream.connections == 0 {
            return Err(("connections", "must be at least 1".into()));
        }
        if self.retry.base > self.retry.max {
            return Err((
                "base",
                "retry.base must not be longer than retry.max".into(),
            ));
        }
        if self.retry.max_age > self.retry.max_age_absolute {
            return Err((
                "max_age",
                "retry.max_age must not be longer than retry.max_age_absolute".into(),
            ));
        }
        for (d, server) in &self.hub.routes {
            if !self.is_hold_domain(d) {
                return Err((
                    "routes",
                    format!("{d} has a route but is not in hub.hold_domains"),
                ));
            }
            if let Err(e) = parse_server(server) {
                return Err(("routes", e));
            }
        }
        for e in &self.flush.etrn {
            let name = e.trim_start_matches(['@', '#']);
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err((
                    "etrn",
                    format!("`{e}`: expected a domain, \"@domain\" (with subdomains) or \"#queue\" (RFC 1985)"),
                ));
            }
        }
        for d in &self.hub.hold_domains {
            if self.local.domains.contains(d) {
                return Err((
                    "hold_domains",
                    format!("{d} is both a local domain and a hold domain: choose one"),
                ));
            }
        }
        Ok(())
    }

    /// Free space to keep on the store's file system (`store.min_free`,
    /// by default 4 × `relay.max_message_size`); 0 means no check.
    pub fn min_free(&self) -> u64 {
        self.store
            .min_free
            .unwrap_or_else(|| self.relay.max_message_size.saturating_mul(4))
    }

    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.local
            .domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(domain))
    }

    pub fn is_hold_domain(&self, domain: &str) -> bool {
        self.hub
            .hold_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// The effective configuration, as TOML, defaults filled in.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// The first line that sets `key` (for errors found after parsing).
fn find_key_line(text: &str, key: &str) -> Option<usize> {
    let leaf = key.rsplit('.').next().unwrap_or(key);
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(leaf)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("t.toml"))
    }

    #[test]
    fn shipped_configs_parse() {
        for f in [
            "config/outpost.toml",
            "config/production.example.toml",
            "config/hub.toml",
        ] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn bad_duration_names_line_and_fix() {
        let e = parse("hostname = \"x\"\n[retry]\nbase = \"5 minutes-ish\"\n").unwrap_err();
        assert_eq!(e.line, Some(3));
        let s = e.to_string();
        assert!(s.contains("invalid duration") && s.contains("15m"), "{s}");
        assert!(s.contains("base = "), "{s}");
    }

    /// Found by the `config` fuzz target: a duration near `u64::MAX`
    /// seconds was accepted, and `Instant::now() + max_session_time`
    /// panicked in every session.
    #[test]
    fn durations_are_bounded() {
        let e = parse("[smtp]\nmax_session_time = \"500000000000y\"\n").unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("100 years"), "{}", e.message);
        assert!(parse("[flush]\ninterval = \"101y\"\n").is_err());
        let c = parse("[hub]\nmax_hold = \"100y\"\n").unwrap();
        assert!(std::time::Instant::now()
            .checked_add(c.hub.max_hold.unwrap())
            .is_some());
    }

    #[test]
    fn unknown_key_is_refused() {
        let e = parse("[relay]\nnetwork = [\"10.0.0.0/8\"]\n").unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("networks"), "{}", e.message);
    }

    #[test]
    fn bad_network_and_mode() {
        let e = parse("[relay]\nnetworks = [\"10.0.0.0/33\"]\n").unwrap_err();
        assert_eq!(e.line, Some(2));
        let e = parse("[[listen]]\naddress = \"127.0.0.1:25\"\nmode = \"smtp\"\n").unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("relay"), "{}", e.message);
    }

    #[test]
    fn cross_checks_blame_a_key() {
        let e = parse("[[listen]]\naddress = \"127.0.0.1:4650\"\nmode = \"submissions\"\n")
            .unwrap_err();
        assert!(e.message.contains("[tls]"), "{}", e.message);
        assert_eq!(e.line, Some(3));
        let e =
            parse("[local]\ndomains = [\"a.example\"]\n[hub]\nhold_domains = [\"a.example\"]\n")
                .unwrap_err();
        assert_eq!(e.line, Some(4));
    }

    #[test]
    fn relay_networks_match_mapped_v4() {
        let c = parse("[relay]\nnetworks = [\"127.0.0.1/32\"]\n").unwrap();
        assert!(c.relay.may_relay("127.0.0.1".parse().unwrap()));
        assert!(c.relay.may_relay("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!c.relay.may_relay("127.0.0.2".parse().unwrap()));
    }

    /// Every key the configuration has, as `section.key`. Tables whose keys
    /// are the administrator's own (aliases, quotas, routes) count as one.
    fn keys(v: &toml::Value, prefix: &str, out: &mut Vec<String>) {
        const FREE_FORM: [&str; 3] = ["local.aliases", "local.quotas", "hub.routes"];
        match v {
            toml::Value::Table(t) if !FREE_FORM.contains(&prefix) => {
                for (k, v) in t {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    keys(v, &p, out);
                }
            }
            toml::Value::Array(a) if a.iter().all(|x| x.is_table()) && !a.is_empty() => {
                for x in a {
                    keys(x, prefix, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }

    #[test]
    fn every_key_is_documented() {
        // Every optional key set, so that it is printed.
        let c = parse(
            "[store]\npath = \"q\"\nmin_free = 0\n\
             [[listen]]\naddress = \"127.0.0.1:25\"\nmode = \"relay\"\nplaintext_auth = true\n\
             [tls]\ncertificate = \"c\"\nkey = \"k\"\n\
             [upstream]\nca_file = \"f\"\ntls_name = \"n\"\nusername = \"u\"\npassword_file = \"p\"\n\
             resolver = \"127.0.0.1:53\"\ndsn_sender = \"s@x\"\n\
             [flush]\ninterval = \"1m\"\n[local]\npostmaster = \"a\"\nquota = 1\n\
             [submit]\ngroup = \"mail\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let value: toml::Value = toml::from_str(&c.to_toml()).unwrap();
        let mut all = Vec::new();
        keys(&value, "", &mut all);
        all.sort();
        all.dedup();
        assert!(all.len() > 50, "{all:?}");
        let doc =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/CONFIG.md"))
                .unwrap();
        let missing: Vec<_> = all
            .iter()
            .filter(|k| !doc.contains(&format!("`{k}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "keys missing from docs/CONFIG.md: {missing:?}"
        );
    }

    #[test]
    fn upstream_targets() {
        let t = |s: &str| {
            UpstreamConfig {
                server: s.into(),
                ..UpstreamConfig::default()
            }
            .target()
        };
        assert_eq!(
            t("[127.0.0.1]:2626").unwrap(),
            Server {
                host: "127.0.0.1".into(),
                port: 2626,
                literal: true
            }
        );
        assert_eq!(
            t("[smtp.hq.example]").unwrap(),
            Server {
                host: "smtp.hq.example".into(),
                port: 25,
                literal: true
            }
        );
        assert_eq!(
            t("hq.example:587").unwrap(),
            Server {
                host: "hq.example".into(),
                port: 587,
                literal: false
            }
        );
        assert_eq!(
            t("hq.example").unwrap(),
            Server {
                host: "hq.example".into(),
                port: 25,
                literal: false
            }
        );
        assert_eq!(
            t("[::1]:25").unwrap(),
            Server {
                host: "::1".into(),
                port: 25,
                literal: true
            }
        );
        assert!(t("hq.example:smtp").is_err());
        assert!(t("[hq.example").is_err());
    }

    #[test]
    fn domains_are_normalised() {
        let c = parse("[local]\ndomains = [\"Branch.Example.\"]\n").unwrap();
        assert_eq!(c.local.domains, vec!["branch.example"]);
        assert!(parse("[local]\ndomains = [\"bad domain\"]\n").is_err());
    }
}
