//! `outpost check-upstream`: tries the upstream step by step, as a flush
//! would, and says what fails and how to fix it. Sends no mail.

use std::process::ExitCode;

use super::exit;
use super::status::rfc3339;
use crate::config::Config;
use crate::queue::unix_now;
use crate::relay::client::{LinkError, Session, Step};
use crate::relay::{flush, route};

pub fn run(config: &Config) -> ExitCode {
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    ExitCode::from(rt.block_on(check(config)))
}

fn ok(what: &str, detail: impl std::fmt::Display) {
    println!("ok    {what:<10} {detail}");
}

fn fail(what: &str, why: impl std::fmt::Display, fix: &str) {
    println!("FAIL  {what:<10} {why}");
    println!("      fix:       {fix}");
}

/// What to do about a failure, and the exit code: 78 when the
/// configuration must change, 75 when the link or the upstream is at fault
/// (try again later).
fn advice(e: &LinkError) -> (&'static str, u8) {
    match e {
        LinkError::Dns(_) => (
            "check upstream.server (\"[host]:port\" uses the host as it is, \"host:port\" looks up its MX) and the DNS (upstream.resolver)",
            exit::TEMPFAIL,
        ),
        LinkError::Connect { .. } | LinkError::Timeout { .. } | LinkError::Lost { .. } => (
            "check the line, the firewall and the port in upstream.server; nothing is lost meanwhile, mail waits",
            exit::TEMPFAIL,
        ),
        LinkError::Greeting { .. } | LinkError::Closing { .. } | LinkError::Protocol { .. } => (
            "the upstream refuses us: its reply says why (our address or EHLO name, `hostname`, may not be allowed)",
            exit::TEMPFAIL,
        ),
        LinkError::NoStartTls { .. } => (
            "ask the upstream's administrator for STARTTLS; only on a line you trust, set upstream.tls = \"opportunistic\"",
            exit::CONFIG,
        ),
        LinkError::Tls { .. } => (
            "see the TLS error above: upstream.ca_file for a private CA, upstream.tls_name for the name on the certificate",
            exit::CONFIG,
        ),
        LinkError::Auth { .. } | LinkError::NoAuth { .. } => (
            "check upstream.username and the first line of upstream.password_file",
            exit::CONFIG,
        ),
        LinkError::Config(_) => ("fix the key named above", exit::CONFIG),
    }
}

async fn check(config: &Config) -> u8 {
    let up = &config.upstream;
    println!(
        "upstream {} (tls = {}, {})",
        up.server,
        up.tls.as_str(),
        up.username
            .as_deref()
            .map(|u| format!("account {u}"))
            .unwrap_or_else(|| "no account".into())
    );
    let targets = match route::targets(&up.server, up.resolver).await {
        Ok(t) => t,
        Err(e) => {
            let (fix, code) = advice(&e);
            fail("DNS", &e, fix);
            return code;
        }
    };
    ok(
        "DNS",
        targets
            .iter()
            .map(|t| format!("{} ({})", t.addr, t.host))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let mut last = exit::TEMPFAIL;
    for t in &targets {
        // As a flush does: the certificate must name the configured host
        // (or upstream.tls_name), not the name DNS led to.
        let configured = up.target().map(|s| s.host).unwrap_or_default();
        let settings = match flush::upstream_settings(config, &configured) {
            Ok(s) => s,
            Err(e) => {
                let (fix, code) = advice(&e);
                fail("config", &e, fix);
                return code;
            }
        };
        let now = unix_now();
        let mut show = |step: Step<'_>| match step {
            Step::Connected { addr, elapsed } => {
                ok("connect", format!("{addr} in {} ms", elapsed.as_millis()))
            }
            Step::Greeting(r) => ok("greeting", r),
            Step::Ehlo(ext) => ok("EHLO", ext.summary()),
            Step::Tls {
                session,
                certificate,
            } => {
                ok("STARTTLS", session);
                if let Some(c) = certificate.and_then(crate::tls::describe_certificate) {
                    let days = (c.not_after - now) / 86_400;
                    ok(
                        "cert",
                        format!(
                            "for {}, issued by {}, expires {} ({days} days)",
                            c.names.join(", "),
                            c.issuer,
                            rfc3339(c.not_after)
                        ),
                    );
                    if days < 14 {
                        println!("      warning:   the certificate expires in {days} days");
                    }
                }
            }
            Step::Auth { user } => ok("AUTH", format!("as {user}")),
        };
        let mut session = match Session::open_observed(t.addr, &settings, &mut show).await {
            Ok(s) => s,
            Err(e) => {
                let (fix, code) = advice(&e);
                fail("session", &e, fix);
                last = code;
                continue;
            }
        };
        let verdict = match session.try_mail().await {
            Ok((mail, _)) if mail.class() == 2 => {
                ok(
                    "MAIL",
                    format!("MAIL FROM:<> {mail}, then RSET (nothing sent)"),
                );
                exit::OK
            }
            Ok((mail, _)) => {
                fail(
                    "MAIL",
                    format!("MAIL FROM:<> answered {mail}"),
                    "the upstream will not take mail from us as things are: its reply says why (an account, upstream.username, may be needed)",
                );
                exit::CONFIG
            }
            Err(e) => {
                let (fix, code) = advice(&e);
                fail("MAIL", &e, fix);
                code
            }
        };
        session.quit().await;
        if verdict == exit::OK {
            println!("the upstream at {} takes mail from this gateway", t.addr);
        }
        return verdict;
    }
    last
}
