//! Who may send what where: pure decisions over addresses and the config.
//!
//! Addresses are judged literally, so that outpost is never an open relay:
//! the domain is what follows the one `@`; a `%` or `!` in a local part is
//! never read as a route, and a client that may not relay cannot use one to
//! reach a hold or local domain either. Source routes (`@a,@b:user@dom`) are stripped by the parser.

use crate::config::Config;
use crate::queue::Route;

use super::reply::{self, Reply};
pub use crate::address::split;

/// A recipient that passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub address: String,
    pub local_part: String,
    pub domain: String,
    pub route: Route,
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

pub use crate::aliases::{expand_local, try_expand_local, AliasError, MAX_ALIAS_DEPTH};

/// Whether a new message may start with `free` bytes left on the store's
/// file system, `min_free` to keep (0: no check) and `declared` the SIZE=
/// of MAIL (0 when none): the reply (452 4.3.1) when not.
pub fn room_for_message(free: u64, min_free: u64, declared: u64) -> Result<(), Reply> {
    if min_free == 0 {
        return Ok(());
    }
    if free < min_free {
        return Err(reply::store_full());
    }
    if declared > free - min_free {
        return Err(reply::no_room_for(declared));
    }
    Ok(())
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
    fn aliases_of_aliases_end_with_accounts_or_a_clear_error() {
        let c = Config::parse(
            "[local]\ndomains = [\"branch.example\"]\npostmaster = \"admins\"\n\
             [local.aliases]\n\
             admins = [\"root@branch.example\", \"alice\"]\nroot = [\"bob\"]\n\
             a = [\"b\"]\nb = [\"c@branch.example\"]\nc = [\"A\"]\n\
             keep = [\"keep\", \"keep@far.example\"]\n\
             l0 = [\"l1\"]\nl1 = [\"l2\"]\nl2 = [\"l3\"]\nl3 = [\"l4\"]\nl4 = [\"l5\"]\n\
             l5 = [\"l6\"]\nl6 = [\"l7\"]\nl7 = [\"l8\"]\nl8 = [\"l9\"]\nl9 = [\"l10\"]\n\
             l10 = [\"l11\"]\nl11 = [\"carol\"]\n",
            Path::new("t"),
        )
        .unwrap();
        // postmaster -> admins -> root -> bob, and admins -> alice.
        assert_eq!(
            try_expand_local(&c, "postmaster").unwrap(),
            (vec!["bob".to_string(), "alice".to_string()], vec![])
        );
        assert_eq!(
            try_expand_local(&c, "a").unwrap_err(),
            AliasError::Loop(vec!["a".into(), "b".into(), "c".into(), "a".into()])
        );
        assert_eq!(
            try_expand_local(&c, "keep").unwrap(),
            (
                vec!["keep".to_string()],
                vec!["keep@far.example".to_string()]
            )
        );
        // Ten aliases on the way are followed (l2 .. l11), eleven are not.
        assert_eq!(
            try_expand_local(&c, "l2").unwrap(),
            (vec!["carol".to_string()], vec![])
        );
        let e = try_expand_local(&c, "l1").unwrap_err();
        assert!(matches!(e, AliasError::TooDeep(_)), "{e}");
        assert!(e.to_string().contains("l1 -> l2"), "{e}");
        // A notice for such a name stays in its own account.
        assert_eq!(expand_local(&c, "A"), (vec!["a".to_string()], vec![]));
    }

    #[test]
    fn room_for_a_message() {
        assert!(room_for_message(0, 0, 1 << 30).is_ok(), "0 turns it off");
        assert!(room_for_message(1000, 400, 0).is_ok());
        assert!(room_for_message(1000, 400, 600).is_ok());
        let e = room_for_message(1000, 400, 601).unwrap_err();
        assert_eq!((e.code, e.status), (452, "4.3.1"));
        let e = room_for_message(399, 400, 0).unwrap_err();
        assert_eq!((e.code, e.status), (452, "4.3.1"));
    }

    #[test]
    fn bare_postmaster_is_local() {
        let c = config();
        let ok = route_recipient(&c, "", false).unwrap();
        assert_eq!(ok.address, "postmaster@branch.example");
        assert!(always_exists(&ok.local_part));
    }
}
