//! Failed logins counted per client across sessions, and per account, like
//! Postfix's anvil with fail2ban built in (`[auth]`).
//!
//! A client is an IPv4 address or an IPv6 network
//! (`shared::client_key`). Past `auth.max_failures` failures within
//! `auth.failure_window` the client is refused logins for `auth.block_time`,
//! without its password being checked. Only the client is refused, never
//! the account, so the account's owner still logs in from elsewhere. An
//! account with `auth.max_account_failures` failures from everywhere is
//! "under attack": a client that fails for it is blocked at once.
//!
//! Decisions take `now` as an argument; the state is bounded
//! ([`MAX_TRACKED`] clients and accounts), oldest forgotten first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::AuthConfig;

/// Clients (and accounts) remembered at most; an attacker with many
/// addresses cannot make the table grow without bound.
pub const MAX_TRACKED: usize = 10_000;

#[derive(Default)]
pub struct LoginGuard {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    clients: HashMap<IpAddr, Counter>,
    /// For accounts, `blocked_until` is the end of "under attack".
    accounts: HashMap<String, Counter>,
    /// `smtp.ipv6_client_prefix` at the last failure, for the report.
    v6_prefix: Option<u8>,
}

#[derive(Clone, Copy)]
struct Counter {
    /// Start of the current window.
    since: Instant,
    failures: u32,
    blocked_until: Option<Instant>,
    /// The failures that led to the block, for the report.
    blocked_after: u32,
}

impl Counter {
    fn new(now: Instant) -> Counter {
        Counter {
            since: now,
            failures: 0,
            blocked_until: None,
            blocked_after: 0,
        }
    }

    fn blocked(&self, now: Instant) -> bool {
        self.blocked_until.is_some_and(|u| u > now)
    }

    /// Nothing left to remember: the window is over and no block runs.
    fn stale(&self, now: Instant, window: Duration) -> bool {
        !self.blocked(now) && now.saturating_duration_since(self.since) >= window
    }

    /// One more failure, in a fresh window when the last one is over.
    fn add(&mut self, now: Instant, window: Duration) -> u32 {
        if now.saturating_duration_since(self.since) >= window {
            self.since = now;
            self.failures = 0;
        }
        self.failures = self.failures.saturating_add(1);
        self.failures
    }
}

/// What a failed login led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Failures of this client in the current window.
    pub failures: u32,
    /// This failure blocked the client.
    pub blocked: bool,
    /// This failure put the account over `auth.max_account_failures`.
    pub account_under_attack: bool,
}

/// A blocked client or an account under attack, for `outpost status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub blocked: Vec<BlockedClient>,
    pub accounts_under_attack: Vec<AccountUnderAttack>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockedClient {
    /// The address, or the IPv6 network as `addr/prefix`.
    pub client: String,
    pub failures: u32,
    pub seconds_left: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountUnderAttack {
    pub account: String,
    pub failures: u32,
}

impl LoginGuard {
    /// How much longer `client` is refused logins, if it is.
    pub fn blocked(&self, client: IpAddr, now: Instant) -> Option<Duration> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let until = state.clients.get(&client)?.blocked_until?;
        (until > now).then(|| until - now)
    }

    /// Records a failed login from `client` (a network of `v6_prefix`
    /// bits when IPv6); `account` is the name tried when it exists (names
    /// that do not exist are not remembered).
    pub fn failed(
        &self,
        client: IpAddr,
        v6_prefix: u8,
        account: Option<&str>,
        limits: &AuthConfig,
        now: Instant,
    ) -> Verdict {
        let window = limits.failure_window;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.v6_prefix = Some(v6_prefix);
        let mut under_attack = false;
        let mut account_under_attack = false;
        if let Some(name) = account {
            let key = name.to_ascii_lowercase();
            make_room(&mut state.accounts, &key, now, window);
            let a = state
                .accounts
                .entry(key)
                .or_insert_with(|| Counter::new(now));
            let n = a.add(now, window);
            under_attack = n >= limits.max_account_failures;
            account_under_attack = n == limits.max_account_failures;
            if under_attack {
                a.blocked_until = Some(a.since + window);
            }
        }
        make_room(&mut state.clients, &client, now, window);
        let c = state
            .clients
            .entry(client)
            .or_insert_with(|| Counter::new(now));
        let failures = c.add(now, window);
        let blocked = !c.blocked(now) && (failures >= limits.max_failures || under_attack);
        if blocked {
            c.blocked_until = Some(now + limits.block_time);
            c.blocked_after = failures;
            // The block is the sentence; a new window starts after it.
            c.since = now + limits.block_time;
            c.failures = 0;
        }
        Verdict {
            failures,
            blocked,
            account_under_attack,
        }
    }

    /// Blocked clients and accounts under attack now.
    pub fn report(&self, now: Instant) -> Report {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let v6_prefix = state.v6_prefix.unwrap_or(128);
        let mut blocked: Vec<BlockedClient> = state
            .clients
            .iter()
            .filter_map(|(ip, c)| {
                let until = c.blocked_until.filter(|u| *u > now)?;
                Some(BlockedClient {
                    client: match ip {
                        IpAddr::V6(_) if v6_prefix < 128 => format!("{ip}/{v6_prefix}"),
                        _ => ip.to_string(),
                    },
                    failures: c.blocked_after,
                    seconds_left: (until - now).as_secs().max(1),
                })
            })
            .collect();
        blocked.sort_by(|a, b| a.client.cmp(&b.client));
        let mut accounts: Vec<AccountUnderAttack> = state
            .accounts
            .iter()
            .filter(|(_, a)| a.blocked(now))
            .map(|(name, a)| AccountUnderAttack {
                account: name.clone(),
                failures: a.failures,
            })
            .collect();
        accounts.sort_by(|a, b| a.account.cmp(&b.account));
        Report {
            blocked,
            accounts_under_attack: accounts,
        }
    }
}

/// Keeps `map` under [`MAX_TRACKED`] before `key` is added: forgets what is
/// over, then the entry whose window started first.
fn make_room<K: std::hash::Hash + Eq + Clone>(
    map: &mut HashMap<K, Counter>,
    key: &K,
    now: Instant,
    window: Duration,
) {
    if map.len() < MAX_TRACKED || map.contains_key(key) {
        return;
    }
    map.retain(|_, c| !c.stale(now, window));
    if map.len() >= MAX_TRACKED {
        if let Some(oldest) = map
            .iter()
            .min_by_key(|(_, c)| (c.blocked(now), c.blocked_until, c.since))
            .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> AuthConfig {
        AuthConfig {
            max_failures: 3,
            failure_window: Duration::from_secs(600),
            block_time: Duration::from_secs(900),
            max_account_failures: 5,
            verify_threads: 2,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_client_is_blocked_after_max_failures_and_only_it() {
        let g = LoginGuard::default();
        let l = limits();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        assert!(!g.failed(a, 64, Some("alice"), &l, t0).blocked);
        assert!(!g.failed(a, 64, Some("alice"), &l, t0).blocked);
        let v = g.failed(a, 64, Some("alice"), &l, t0);
        assert!(v.blocked && v.failures == 3, "{v:?}");
        assert_eq!(g.blocked(a, t0), Some(l.block_time));
        // Another client is not blocked, for the same account too.
        assert_eq!(g.blocked(ip("192.0.2.2"), t0), None);
        // The block ends.
        let later = t0 + l.block_time;
        assert_eq!(g.blocked(a, later), None);
        // And the count starts again after it.
        assert!(!g.failed(a, 64, None, &l, later).blocked);
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let g = LoginGuard::default();
        let l = limits();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        g.failed(a, 64, None, &l, t0);
        g.failed(a, 64, None, &l, t0);
        let v = g.failed(a, 64, None, &l, t0 + l.failure_window);
        assert_eq!(v.failures, 1);
        assert!(!v.blocked);
    }

    #[test]
    fn an_account_under_attack_blocks_each_failing_client_at_once() {
        let g = LoginGuard::default();
        let l = limits();
        let t0 = Instant::now();
        // Five clients, one failure each, for the same account.
        for i in 1..=4 {
            let v = g.failed(ip(&format!("192.0.2.{i}")), 64, Some("Alice"), &l, t0);
            assert!(!v.blocked && !v.account_under_attack);
        }
        let v = g.failed(ip("192.0.2.5"), 64, Some("alice"), &l, t0);
        assert!(v.blocked && v.account_under_attack, "{v:?}");
        let v = g.failed(ip("192.0.2.6"), 64, Some("alice"), &l, t0);
        assert!(v.blocked && !v.account_under_attack, "{v:?}");
        // Failures for another account are counted as usual.
        assert!(!g.failed(ip("192.0.2.7"), 64, Some("bob"), &l, t0).blocked);
        let r = g.report(t0);
        assert_eq!(
            r.accounts_under_attack,
            vec![AccountUnderAttack {
                account: "alice".into(),
                failures: 6
            }]
        );
        let blocked: Vec<&str> = r.blocked.iter().map(|b| b.client.as_str()).collect();
        assert_eq!(blocked, ["192.0.2.5", "192.0.2.6"]);
    }

    #[test]
    fn the_table_is_bounded() {
        let g = LoginGuard::default();
        let l = limits();
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 500) {
            let a = IpAddr::V6(std::net::Ipv6Addr::from(
                (0x2001_0db8u128 << 96) | (i as u128) << 64,
            ));
            g.failed(a, 64, Some(&format!("name{i}")), &l, t0);
        }
        let state = g.state.lock().unwrap();
        assert!(state.clients.len() <= MAX_TRACKED);
        assert!(state.accounts.len() <= MAX_TRACKED);
    }

    #[test]
    fn report_names_networks() {
        let g = LoginGuard::default();
        let l = limits();
        let t0 = Instant::now();
        let net = ip("2001:db8:1:2::");
        for _ in 0..3 {
            g.failed(net, 64, None, &l, t0);
        }
        let r = g.report(t0);
        assert_eq!(r.blocked.len(), 1);
        assert_eq!(r.blocked[0].client, "2001:db8:1:2::/64");
        assert_eq!(r.blocked[0].seconds_left, 900);
    }
}
