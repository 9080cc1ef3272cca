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
    pub imap: ImapConfig,
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
    /// Prometheus metrics and the status page; off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    #[serde(default)]
    pub submit: SubmitConfig,
    #[serde(default)]
    pub log: LogConfig,
}

/// A configuration problem, located in the file when it can be.
#[derive(Debug)]
pub struct ConfigError {
    pub path: PathBuf,
    /// The file could not be read at all (missing, no permission), as
    /// opposed to read and found wrong.
    pub unreadable: bool,
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
            unreadable: true,
            line: None,
            line_text: None,
            message: format!(
                "cannot read the configuration file: {e} (give another with --config or OUTPOST_CONFIG)"
            ),
        })?;
        Config::parse(&text, path)
    }

    /// Every value at its default, as an empty file gives them.
    pub fn defaults() -> Result<Config, ConfigError> {
        Config::parse("", Path::new("(defaults)"))
    }

    /// Parses `text`; `path` is used in error messages only.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|span| line_of(text, span.start));
            ConfigError {
                path: path.to_path_buf(),
                unreadable: false,
                line,
                line_text: line
                    .and_then(|l| text.lines().nth(l - 1))
                    .map(|s| s.trim().to_string()),
                message: e.message().trim().to_string(),
            }
        })?;
        let checked = config.fill_defaults().and_then(|()| config.validate());
        checked.map_err(|(key, message)| {
            let line = find_key_line(text, key);
            ConfigError {
                path: path.to_path_buf(),
                unreadable: false,
                line,
                line_text: line
                    .and_then(|l| text.lines().nth(l - 1))
                    .map(|s| s.trim().to_string()),
                message: format!("`{key}`: {message}"),
            }
        })?;
        Ok(config)
    }

    /// Defaults that depend on other values: the self-signed certificate
    /// and its key go under the store's directory (`<dir>/tls/`), which the
    /// daemon may write (under systemd's `ProtectSystem=strict`, /etc is
    /// read-only to it). Returns the key to blame.
    fn fill_defaults(&mut self) -> Result<(), (&'static str, String)> {
        let store_dir = self
            .store
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        if let Some(t) = &mut self.tls {
            for (key, path, file) in [
                ("tls.certificate", &mut t.certificate, "cert.pem"),
                ("tls.key", &mut t.key, "key.pem"),
            ] {
                if !path.as_os_str().is_empty() {
                    continue;
                }
                if !t.self_signed {
                    return Err((
                        key,
                        format!(
                            "missing: name the PEM file in {key}, or set tls.self_signed = true \
                             to have a certificate made under the store's directory ({})",
                            store_dir.join("tls").display()
                        ),
                    ));
                }
                *path = store_dir.join("tls").join(file);
            }
        }
        Ok(())
    }

    /// The files the configuration names that hold secrets, with their
    /// keys. The configuration itself holds none, so it may be readable by
    /// every local user (sendmail reads it to find `submit.socket`).
    pub fn secret_files(&self) -> Vec<(&'static str, &Path)> {
        let mut files = Vec::new();
        if let Some(p) = &self.upstream.password_file {
            files.push(("upstream.password_file", p.as_path()));
        }
        if let Some(t) = &self.tls {
            files.push(("tls.key", t.key.as_path()));
        }
        files
    }

    /// What is wrong with the secret files as this user sees them: one
    /// readable by every user, or one that cannot be read. A self-signed
    /// key not made yet is not a problem.
    pub fn secret_warnings(&self) -> Vec<String> {
        use std::os::unix::fs::PermissionsExt;
        let mut out = Vec::new();
        for (key, path) in self.secret_files() {
            let meta = match std::fs::metadata(path) {
                Ok(m) => m,
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        && key == "tls.key"
                        && self.tls.as_ref().is_some_and(|t| t.self_signed) =>
                {
                    continue
                }
                Err(e) => {
                    out.push(format!(
                        "{key} {}: {e} (the daemon's user, outpost, must be able to read it)",
                        path.display()
                    ));
                    continue;
                }
            };
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o004 != 0 {
                out.push(format!(
                    "{key} {} is readable by every user (mode {mode:04o}): \
                     chown root:outpost it and chmod 640 it",
                    path.display()
                ));
            } else if let Err(e) = std::fs::File::open(path) {
                out.push(format!(
                    "{key} {}: cannot be read by this user: {e} (the daemon's user, outpost, \
                     must be able to: chown root:outpost it and chmod 640 it)",
                    path.display()
                ));
            }
        }
        out
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
            if matches!(l.mode, ListenMode::Submission | ListenMode::Imap)
                && self.tls.is_none()
                && !l.plaintext_auth_allowed()
            {
                return Err((
                    "listen.mode",
                    format!(
                        "{} on {} offers login only after STARTTLS, which needs a [tls] section",
                        l.mode, l.address
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
        if self.upstream.username.is_some()
            && self.upstream.tls != UpstreamTls::Required
            && !self.upstream.allow_plaintext_auth
        {
            return Err((
                "username",
                format!(
                    "upstream.username is set with upstream.tls = \"{}\": the password could cross the link in clear or to an impostor; set upstream.tls = \"required\" (with upstream.ca_file for a private CA), or upstream.allow_plaintext_auth = true for an upstream on a network you trust",
                    self.upstream.tls.as_str()
                ),
            ));
        }
        for (d, route) in &self.hub.routes {
            if !self.is_hold_domain(d) {
                return Err((
                    "routes",
                    format!("{d} has a route but is not in hub.hold_domains"),
                ));
            }
            if let Err(e) = parse_server(&route.server) {
                return Err(("routes", format!("{d}: {e}")));
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
             [submit]\ngroup = \"mail\"\n\
             [metrics]\naddress = \"127.0.0.1:9465\"\n",
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
    fn an_upstream_password_needs_verified_tls_or_a_stated_exception() {
        let base = "[upstream]\nusername = \"b7\"\npassword_file = \"p\"\n";
        assert!(parse(base).is_ok(), "tls = \"required\" is the default");
        for tls in ["opportunistic", "none"] {
            let e = parse(&format!("{base}tls = \"{tls}\"\n")).unwrap_err();
            assert_eq!(e.line, Some(2), "{e}");
            let text = e.to_string();
            assert!(
                text.contains(&format!("upstream.tls = \"{tls}\""))
                    && text.contains("allow_plaintext_auth"),
                "{text}"
            );
            assert!(parse(&format!(
                "{base}tls = \"{tls}\"\nallow_plaintext_auth = true\n"
            ))
            .is_ok());
        }
        // Without an account there is nothing to protect.
        assert!(parse("[upstream]\ntls = \"none\"\n").is_ok());
    }

    #[test]
    fn hub_routes_are_servers_or_tables_with_a_tls_policy() {
        let c = parse(
            "[hub]\nhold_domains = [\"a.example\", \"b.example\"]\n[hub.routes]\n\"a.example\" = \"[10.0.0.7]:25\"\n\"b.example\" = { server = \"[10.0.0.8]:25\", tls = \"required\", ca_file = \"/etc/outpost/b.pem\", tls_name = \"gw.b.example\" }\n",
        )
        .unwrap();
        let a = c.hub.destination("A.example");
        assert_eq!(a.server, "[10.0.0.7]:25");
        assert_eq!(a.tls, UpstreamTls::Opportunistic);
        let b = c.hub.destination("b.example");
        assert_eq!(b.tls, UpstreamTls::Required);
        assert_eq!(b.tls_name.as_deref(), Some("gw.b.example"));
        assert_eq!(b.ca_file.as_deref(), Some(Path::new("/etc/outpost/b.pem")));
        let other = c.hub.destination("c.example");
        assert_eq!(
            (other.server.as_str(), other.tls),
            ("c.example", UpstreamTls::Opportunistic)
        );
        // A mistyped key in a route is named.
        let e = parse(
            "[hub]\nhold_domains = [\"a.example\"]\n[hub.routes]\n\"a.example\" = { server = \"[10.0.0.7]:25\", tsl = \"required\" }\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("tsl"), "{e}");
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
    fn a_self_signed_certificate_goes_under_the_store_directory() {
        let c = parse("[store]\npath = \"/var/lib/op/queue.sqlite\"\n[tls]\nself_signed = true\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let t = c.tls.as_ref().unwrap();
        assert_eq!(t.certificate, Path::new("/var/lib/op/tls/cert.pem"));
        assert_eq!(t.key, Path::new("/var/lib/op/tls/key.pem"));
        // Paths given are kept; check-config prints the effective ones.
        let c = parse("[tls]\nself_signed = true\ncertificate = \"/etc/c.pem\"\n").unwrap();
        assert_eq!(c.tls.as_ref().unwrap().certificate, Path::new("/etc/c.pem"));
        assert_eq!(
            c.tls.as_ref().unwrap().key,
            Path::new("/var/lib/outpost/tls/key.pem")
        );
        assert!(c.to_toml().contains("/var/lib/outpost/tls/key.pem"));
        // Without self_signed the files must be named.
        let e = parse("[tls]\nkey = \"/etc/k.pem\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tls.certificate") && e.contains("self_signed = true"),
            "{e}"
        );
    }

    #[test]
    fn secret_files_readable_by_every_user_are_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("upstream.secret");
        std::fs::write(&secret, "pw\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = format!(
            "[upstream]\nusername = \"u\"\npassword_file = \"{}\"\n\
             [tls]\nself_signed = true\nkey = \"{}\"\ncertificate = \"{}\"\n",
            secret.display(),
            dir.path().join("tls/key.pem").display(),
            dir.path().join("tls/cert.pem").display()
        );
        let c = parse(&text).unwrap();
        let w = c.secret_warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("upstream.password_file")
                && w[0].contains("readable by every user (mode 0644)")
                && w[0].contains("chmod 640"),
            "{w:?}"
        );
        // A self-signed key not made yet is fine; a private secret is too.
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(c.secret_warnings().is_empty(), "{:?}", c.secret_warnings());
        // A key that is readable by everyone is named as well.
        std::fs::create_dir(dir.path().join("tls")).unwrap();
        std::fs::write(dir.path().join("tls/key.pem"), "k").unwrap();
        std::fs::set_permissions(
            dir.path().join("tls/key.pem"),
            std::fs::Permissions::from_mode(0o604),
        )
        .unwrap();
        let w = c.secret_warnings();
        assert!(w.len() == 1 && w[0].contains("tls.key"), "{w:?}");
        // A missing password file is named too.
        std::fs::remove_file(&secret).unwrap();
        assert!(c
            .secret_warnings()
            .iter()
            .any(|w| w.contains("upstream.password_file") && w.contains("outpost")));
    }

    #[test]
    fn domains_are_normalised() {
        let c = parse("[local]\ndomains = [\"Branch.Example.\"]\n").unwrap();
        assert_eq!(c.local.domains, vec!["branch.example"]);
        assert!(parse("[local]\ndomains = [\"bad domain\"]\n").is_err());
    }
}
