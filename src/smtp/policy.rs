//! Who may send what where: pure decisions over addresses and the config.
//!
//! Addresses are judged literally (DESIGN rule 2): the domain is what follows
//! the one `@`; a `%` or `!` in a local part is never read as a route, and a
//! client that may not relay cannot use one to reach a hold or local domain
//! either. Source routes (`@a,@b:user@dom`) are stripped by the parser.

use crate::config::Config;
use crate::queue::Route;

use super::reply::{self, Reply};

/// A recipient that passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub address: String,
    pub local_part: String,
    pub domain: String,
    pub route: Route,
}

/// Splits `local@domain`; None when there is not exactly one `@` with text
/// on both sides.
pub fn split(address: &str) -> Option<(&str, &str)> {
    let (local, domain) = address.split_once('@')?;
    if local.is_empty() || domain.is_empty() || domain.contains('@') {
        return None;
    }
    Some((local, domain))
}

/// Decides where a recipient goes, or why it is refused. `may_relay` is true
/// for clients in `relay.networks` and for authenticated clients. Whether a
/// local name exists is checked afterwards (it needs the store).
pub fn route_recipient(config: &Config, address: &str, may_relay: bool) -> Result<Accepted, Reply> {
    // smtp-proto hands RCPT TO:<postmaster> over as "" (RFC 5321 §4.5.1).
    let address = if address.is_empty() {
        match config.local.domains.first() {
            Some(d) => format!("postmaster@{d}"),
            None => return Err(reply::unknown_user()),
        }
    } else {
        address.to_string()
    };
    let Some((local, domain)) = split(&address) else {
        return Err(reply::bad_address());
    };
    let domain_lc = domain.to_ascii_lowercase();
    let route = if config.is_local_domain(&domain_lc) {
        Route::Local
    } else if config.is_hold_domain(&domain_lc) {
        Route::Hold
    } else if may_relay {
        Route::Upstream
    } else {
        return Err(reply::relay_denied());
    };
    if !may_relay && local.contains(['%', '!', '@']) {
        // Not a route, and not a name anyone here has.
        return Err(reply::bad_address());
    }
    Ok(Accepted {
        local_part: local.to_string(),
        domain: domain_lc,
        route,
        address,
    })
}

/// The account names a local part stands for: itself, `postmaster`'s
/// account, or an alias's targets. Returns None when the name is unknown
/// to the config (the store decides about accounts).
pub fn local_targets(config: &Config, local_part: &str) -> Vec<String> {
    let lp = local_part.to_ascii_lowercase();
    if let Some(targets) = config
        .local
        .aliases
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(&lp))
        .map(|(_, v)| v)
    {
        return targets.clone();
    }
    if lp == "postmaster" {
        if let Some(pm) = &config.local.postmaster {
            return vec![pm.clone()];
        }
    }
    vec![lp]
}

/// Where mail for a local name goes: mailbox accounts, and outside
/// addresses an alias names. One level of aliasing: a target in a local
/// domain is taken as an account name.
pub fn expand_local(config: &Config, local_part: &str) -> (Vec<String>, Vec<String>) {
    let mut accounts = Vec::new();
    let mut outside = Vec::new();
    for t in local_targets(config, local_part) {
        match split(&t) {
            Some((lp, d)) if config.is_local_domain(d) => accounts.push(lp.to_ascii_lowercase()),
            Some(_) => outside.push(t),
            None => accounts.push(t.to_ascii_lowercase()),
        }
    }
    accounts.dedup();
    (accounts, outside)
}

/// `postmaster` always exists (RFC 5321 §4.5.1), even with no account for it.
pub fn always_exists(local_part: &str) -> bool {
    local_part.eq_ignore_ascii_case("postmaster")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config() -> Config {
        Config::parse(
            "[local]\ndomains = [\"branch.example\"]\n[hub]\nhold_domains = [\"other.example\"]\n",
            Path::new("t"),
        )
        .unwrap()
    }

    #[test]
    fn strangers_reach_local_and_hold_domains_only() {
        let c = config();
        assert_eq!(
            route_recipient(&c, "a@Branch.Example", false)
                .unwrap()
                .route,
            Route::Local
        );
        assert_eq!(
            route_recipient(&c, "a@other.example", false).unwrap().route,
            Route::Hold
        );
        let e = route_recipient(&c, "a@elsewhere.example", false).unwrap_err();
        assert_eq!((e.code, e.status), (554, "5.7.1"));
        assert_eq!(
            route_recipient(&c, "a@elsewhere.example", true)
                .unwrap()
                .route,
            Route::Upstream
        );
    }

    #[test]
    fn percent_and_bang_are_not_routes() {
        let c = config();
        for a in [
            "victim%elsewhere.example@branch.example",
            "elsewhere.example!victim@other.example",
        ] {
            assert_eq!(
                route_recipient(&c, a, false).unwrap_err().status,
                "5.1.3",
                "{a}"
            );
        }
        // A relay client sends to whatever domain the address literally names.
        let ok = route_recipient(&c, "a%b@elsewhere.example", true).unwrap();
        assert_eq!(
            (ok.domain.as_str(), ok.route),
            ("elsewhere.example", Route::Upstream)
        );
        assert!(route_recipient(&c, "noatsign", true).is_err());
    }

    #[test]
    fn aliases_expand_to_accounts_and_outside_addresses() {
        let c = Config::parse(
            "[local]\ndomains = [\"branch.example\"]\npostmaster = \"admin\"\n[local.aliases]\nsales = [\"alice\", \"bob@branch.example\", \"rep@far.example\"]\n",
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(
            expand_local(&c, "Sales"),
            (
                vec!["alice".to_string(), "bob".to_string()],
                vec!["rep@far.example".to_string()]
            )
        );
        assert_eq!(
            expand_local(&c, "postmaster"),
            (vec!["admin".to_string()], vec![])
        );
        assert_eq!(
            expand_local(&c, "Carol"),
            (vec!["carol".to_string()], vec![])
        );
    }

    #[test]
    fn bare_postmaster_is_local() {
        let c = config();
        let ok = route_recipient(&c, "", false).unwrap();
        assert_eq!(ok.address, "postmaster@branch.example");
        assert!(always_exists(&ok.local_part));
    }
}
