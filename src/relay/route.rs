//! Where the upstream is: `[host]:port` as given, `host:port` through its
//! MX records in preference order, then its own address (RFC 5321 §5.1).
//! Decided at every flush, so a changed `[upstream]` applies to mail
//! already queued.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};

use super::client::LinkError;
use crate::config::parse_server;

/// One address to try, and the host name it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub addr: SocketAddr,
}

fn resolver(server: Option<SocketAddr>) -> Result<TokioResolver, LinkError> {
    let built = match server {
        Some(server) => {
            let mut ns = NameServerConfig::udp_and_tcp(server.ip());
            for c in &mut ns.connections {
                c.port = server.port();
            }
            Resolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            )
            .build()
        }
        None => Resolver::builder_tokio()
            .map_err(|e| LinkError::Dns(format!("the system's DNS configuration: {e}")))?
            .build(),
    };
    built.map_err(|e| LinkError::Dns(format!("DNS resolver: {e}")))
}

/// The addresses to try for `server` (see [`parse_server`]), best first.
/// `dns` is a DNS server to ask instead of the system's.
pub async fn targets(server: &str, dns: Option<SocketAddr>) -> Result<Vec<Target>, LinkError> {
    let crate::config::Server {
        host,
        port,
        literal,
    } = parse_server(server).map_err(LinkError::Dns)?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![Target {
            host,
            addr: SocketAddr::new(ip, port),
        }]);
    }
    let resolver = resolver(dns)?;
    let mut hosts: Vec<String> = Vec::new();
    if !literal {
        match resolver.mx_lookup(host.as_str()).await {
            Ok(lookup) => {
                let mut mx: Vec<(u16, String)> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some((
                            mx.preference,
                            mx.exchange.to_utf8().trim_end_matches('.').to_string(),
                        )),
                        _ => None,
                    })
                    .collect();
                mx.sort();
                if mx.iter().any(|(_, e)| e.is_empty()) {
                    // RFC 7505: a null MX says the domain takes no mail.
                    return Err(LinkError::Dns(format!(
                        "{host} publishes a null MX (it accepts no mail): check the server setting"
                    )));
                }
                hosts = mx.into_iter().map(|(_, e)| e).collect();
            }
            Err(e) if e.is_nx_domain() => {
                return Err(LinkError::Dns(format!(
                    "{host} does not exist in DNS (NXDOMAIN): check upstream.server"
                )))
            }
            Err(e) if e.is_no_records_found() => {}
            Err(e) => return Err(LinkError::Dns(format!("MX lookup for {host}: {e}"))),
        }
    }
    if hosts.is_empty() {
        hosts.push(host.clone());
    }
    let mut out = Vec::new();
    let mut last_err = None;
    for h in hosts {
        match resolver.lookup_ip(h.as_str()).await {
            Ok(ips) => out.extend(ips.iter().map(|ip| Target {
                host: h.clone(),
                addr: SocketAddr::new(ip, port),
            })),
            Err(e) => last_err = Some(format!("{h}: {e}")),
        }
    }
    if out.is_empty() {
        return Err(LinkError::Dns(
            last_err.unwrap_or_else(|| format!("no address for {host}")),
        ));
    }
    Ok(out)
}
