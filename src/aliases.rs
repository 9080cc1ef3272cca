//! Where mail for a local name goes: `local.aliases` and
//! `local.postmaster`, followed to accounts and outside addresses, with
//! loops and deep chains caught. Pure over the configuration.

use crate::address::split;
use crate::config::Config;

/// How many aliases a name may lead through (`a -> b -> carol`, where
/// carol is an account, is two).
pub const MAX_ALIAS_DEPTH: usize = 10;

/// Why a local name cannot be expanded: a mistake in `local.aliases`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AliasError {
    /// The names from the first to the one that came back (`a -> b -> a`).
    Loop(Vec<String>),
    /// More than [`MAX_ALIAS_DEPTH`] levels; the names followed.
    TooDeep(Vec<String>),
}

impl std::fmt::Display for AliasError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AliasError::Loop(chain) => write!(f, "alias loop {}", chain.join(" -> ")),
            AliasError::TooDeep(chain) => write!(
                f,
                "aliases nested more than {MAX_ALIAS_DEPTH} deep: {}",
                chain.join(" -> ")
            ),
        }
    }
}

/// The targets `name` (lower case) is an alias for, if it is one:
/// `local.aliases`, or `postmaster`'s account.
fn alias_targets<'c>(config: &'c Config, name: &str) -> Option<&'c [String]> {
    if let Some((_, targets)) = config
        .local
        .aliases
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
    {
        return Some(targets);
    }
    match &config.local.postmaster {
        Some(pm) if name == "postmaster" => Some(std::slice::from_ref(pm)),
        _ => None,
    }
}

/// Where mail for a local name goes: mailbox accounts, and outside
/// addresses an alias names. An alias target that is a local name (bare,
/// or in a local domain) is expanded again, up to [`MAX_ALIAS_DEPTH`]
/// levels; a name that is no alias is an account. An alias that names
/// itself keeps a copy in its own account (`alice = ["alice",
/// "alice@home.example"]`); any other way back to a name already on the
/// way is a loop.
pub fn try_expand_local(
    config: &Config,
    local_part: &str,
) -> Result<(Vec<String>, Vec<String>), AliasError> {
    let mut accounts = Vec::new();
    let mut outside = Vec::new();
    let mut chain = Vec::new();
    expand(
        config,
        &local_part.to_ascii_lowercase(),
        &mut chain,
        &mut accounts,
        &mut outside,
    )?;
    let mut seen = std::collections::HashSet::new();
    accounts.retain(|a| seen.insert(a.clone()));
    let mut seen = std::collections::HashSet::new();
    outside.retain(|a| seen.insert(a.to_ascii_lowercase()));
    Ok((accounts, outside))
}

fn expand(
    config: &Config,
    name: &str,
    chain: &mut Vec<String>,
    accounts: &mut Vec<String>,
    outside: &mut Vec<String>,
) -> Result<(), AliasError> {
    chain.push(name.to_string());
    let Some(targets) = alias_targets(config, name) else {
        accounts.push(name.to_string());
        chain.pop();
        return Ok(());
    };
    if chain.len() > MAX_ALIAS_DEPTH {
        return Err(AliasError::TooDeep(chain.clone()));
    }
    for t in targets {
        let local = match split(t) {
            Some((lp, d)) if config.is_local_domain(d) => lp.to_ascii_lowercase(),
            Some(_) => {
                outside.push(t.clone());
                continue;
            }
            None => t.to_ascii_lowercase(),
        };
        if local == name {
            accounts.push(local);
        } else if chain.contains(&local) {
            chain.push(local);
            return Err(AliasError::Loop(chain.clone()));
        } else {
            expand(config, &local, chain, accounts, outside)?;
        }
    }
    chain.pop();
    Ok(())
}

/// [`try_expand_local`] for callers that must put the mail somewhere (a
/// notice for a local sender): a broken alias leaves it in the account
/// of the name itself.
pub fn expand_local(config: &Config, local_part: &str) -> (Vec<String>, Vec<String>) {
    try_expand_local(config, local_part)
        .unwrap_or_else(|_| (vec![local_part.to_ascii_lowercase()], Vec::new()))
}
