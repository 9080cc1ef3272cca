//! The hub's commands: ETRN (RFC 1985) and, on an `odmr` listener, ATRN
//! (RFC 2645).

use super::*;

impl<S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static> Session<S> {
    /// ETRN is offered where mail is held, to `hub.etrn_networks` and
    /// authenticated clients.
    pub(super) fn etrn_offered(&self) -> bool {
        self.shared.triggers.etrn.is_some() && !self.config.hub.hold_domains.is_empty()
    }

    pub(super) fn may_etrn(&self) -> bool {
        self.auth_user.is_some()
            || match self.peer.ip() {
                Some(ip) => self.config.hub.may_etrn(ip),
                None => true,
            }
    }

    /// The account whose domains bound what ETRN may release: set when the
    /// client is trusted by its login, not by `hub.etrn_networks`.
    fn etrn_account(&self) -> Option<&str> {
        let by_network = match self.peer.ip() {
            Some(ip) => self.config.hub.may_etrn(ip),
            None => true,
        };
        self.auth_user.as_deref().filter(|_| !by_network)
    }

    /// ETRN (RFC 1985): start delivering a hold domain's mail to its branch.
    pub(super) async fn etrn(&mut self, name: String) -> Flow {
        if !self.etrn_offered() {
            return self.error(reply::unknown_command());
        }
        if self.helo.is_none() {
            return self.error(reply::need_helo());
        }
        if self.tx.is_some() {
            return self.error(reply::etrn_in_transaction());
        }
        if !self.may_etrn() {
            info!(peer = %self.peer, name = %name, "ETRN refused: not in hub.etrn_networks and not authenticated");
            return self.reply(reply::etrn_not_allowed(&name));
        }
        if name.starts_with('#') {
            return self.reply(reply::etrn_no_queues(&name));
        }
        if let Some(user) = self.etrn_account() {
            // A client trusted by its account only (not by its network)
            // releases its own branch's domains, named one by one: those
            // `[hub.odmr]` gives the account, never another branch's or a
            // whole tree of subdomains.
            let mine = self.config.hub.odmr_domains(user);
            if name.starts_with('@') || !mine.iter().any(|d| d.eq_ignore_ascii_case(&name)) {
                info!(peer = %self.peer, account = %user, name = %name, "ETRN refused: not one of the account's domains in [hub.odmr]");
                return self.reply(reply::etrn_not_for_account(&name, user));
            }
        }
        let config = &self.config;
        let held_here = config.hub.hold_domains.iter().any(|h| {
            crate::address::domain_matches(&name, h) || crate::address::domain_matches(h, &name)
        });
        if name.is_empty() || !held_here {
            info!(peer = %self.peer, name = %name, "ETRN for a domain not held here");
            return self.reply(reply::etrn_not_held(&name));
        }
        let store = self.shared.store.clone();
        let spec = name.to_ascii_lowercase();
        let lookup = spec.clone();
        let count = match tokio::task::spawn_blocking(move || store.held_count(&lookup)).await {
            Ok(Ok(n)) => n,
            _ => return self.reply(reply::etrn_failed(&name)),
        };
        // One delivery per domain at a time: a repeated ETRN starts none.
        let started = self
            .shared
            .triggers
            .etrn_running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(spec.clone());
        if started {
            if let Some(tx) = &self.shared.triggers.etrn {
                let _ = tx.send(spec);
            }
        }
        info!(peer = %self.peer, name = %name, held = count, started, "ETRN");
        self.reply(if count == 0 {
            reply::etrn_nothing(&name)
        } else {
            reply::etrn_started(&name, count)
        })
    }

    /// ATRN (RFC 2645), hub role: an authenticated branch takes the held
    /// mail of the domains `[hub.odmr]` gives its account, over this very
    /// connection. After 250 the connection goes to the daemon, which
    /// delivers as a client; this session ends without closing it.
    pub(super) async fn atrn(&mut self, asked: Vec<String>) -> Flow {
        if self.helo.is_none() {
            return self.error(reply::need_helo());
        }
        let Some(account) = self.auth_user.clone() else {
            info!(peer = %self.peer, "ATRN refused: not authenticated");
            return self.reply(reply::atrn_auth_required());
        };
        let allowed = self.config.hub.odmr_domains(&account);
        let domains: Vec<String> = if asked.is_empty() {
            allowed.clone()
        } else {
            asked
                .iter()
                .map(|d| d.trim().to_ascii_lowercase())
                .collect()
        };
        if domains.is_empty() {
            info!(peer = %self.peer, account = %account, "ATRN refused: no domains in [hub.odmr]");
            return self.reply(reply::atrn_refused(format!(
                "account {account} has no domains in [hub.odmr]"
            )));
        }
        if let Some(d) = domains.iter().find(|d| !allowed.contains(d)) {
            info!(peer = %self.peer, account = %account, domain = %d, "ATRN refused: domain not allowed for the account");
            return self.reply(reply::atrn_refused(format!(
                "account {account} may not take {d} ([hub.odmr])"
            )));
        }
        let Some(turn) = self.shared.triggers.atrn.clone() else {
            return self.reply(reply::atrn_unavailable());
        };
        let store = self.shared.store.clone();
        let lookup = domains.clone();
        let held = tokio::task::spawn_blocking(move || {
            lookup
                .iter()
                .map(|d| store.held_count(d))
                .sum::<Result<i64, _>>()
        })
        .await;
        let held = match held {
            Ok(Ok(n)) => n,
            _ => return self.reply(reply::atrn_unavailable()),
        };
        if held == 0 {
            info!(peer = %self.peer, account = %account, domains = %domains.join(","), "ATRN: no mail");
            return self.reply(reply::atrn_no_mail());
        }
        self.codec
            .reply(&reply::atrn_turning(held, &domains.join(",")));
        if self.codec.flush().await.is_err() {
            return Flow::Close;
        }
        if !self.codec.buffered().is_empty() {
            // The branch spoke before our 250: nothing it said can stand.
            warn!(peer = %self.peer, octets = self.codec.buffered().len(), "ATRN: input after ATRN discarded");
            self.codec.discard_input();
        }
        info!(peer = %self.peer, account = %account, domains = %domains.join(","), held, "ATRN: turning the connection around");
        let io = std::mem::replace(self.codec.get_mut(), Conn::Gone);
        let _ = turn.send(crate::shared::Turned {
            io: Box::new(io),
            peer: self.peer.to_string(),
            account,
            domains,
        });
        Flow::Close
    }
}
