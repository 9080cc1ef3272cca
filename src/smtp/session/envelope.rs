//! MAIL and RCPT: who may send, where each recipient goes, and the
//! limits a transaction must keep.

use super::*;

impl<S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static> Session<S> {
    pub(super) fn may_relay(&self) -> bool {
        self.auth_user.is_some()
            || (self.listen.mode == ListenMode::Relay
                && match self.peer.ip() {
                    Some(ip) => self.config.relay.may_relay(ip),
                    // Programs on this machine (outpost sendmail) may send anywhere.
                    None => true,
                })
    }

    pub(super) async fn mail(&mut self, from: proto::MailFrom<String>) -> Flow {
        if self.helo.is_none() {
            return self.error(reply::need_helo());
        }
        if self.tx.is_some() {
            return self.error(reply::nested_mail());
        }
        if self.listen.mode != ListenMode::Relay && self.auth_user.is_none() {
            return self.refuse("mail", reply::auth_required());
        }
        let smtputf8 = from.flags & proto::MAIL_SMTPUTF8 != 0;
        if !from.address.is_ascii() && !smtputf8 {
            return self.reply(reply::non_ascii_address());
        }
        if !from.address.is_empty() && policy::split(&from.address).is_none() {
            return self.reply(reply::sender_not_an_address());
        }
        for (set, name) in [
            (
                from.flags & proto::MAIL_BODY_BINARYMIME != 0,
                "BODY=BINARYMIME",
            ),
            (from.flags & proto::MAIL_REQUIRETLS != 0, "REQUIRETLS"),
            (
                from.hold_for != 0 || from.hold_until != 0,
                "HOLDFOR/HOLDUNTIL",
            ),
            (from.by != 0, "BY"),
            (from.mtrk.is_some(), "MTRK"),
        ] {
            if set {
                return self.reply(reply::smtputf8_unsupported_param(name));
            }
        }
        let max = self.config.relay.max_message_size;
        if from.size as u64 > max {
            info!(peer = %self.peer, declared = from.size, limit = max, "refused: SIZE over the limit");
            return self.refuse("mail", reply::too_big_declared(max));
        }
        if let Err(r) = self.room_for(from.size as u64) {
            return self.refuse("mail", r);
        }
        let body_type = if from.flags & proto::MAIL_BODY_8BITMIME != 0 {
            Some("8BITMIME".to_string())
        } else if from.flags & proto::MAIL_BODY_7BIT != 0 {
            Some("7BIT".to_string())
        } else {
            None
        };
        let dsn_ret = if from.flags & proto::MAIL_RET_FULL != 0 && !self.may_relay() {
            // Mail from a stranger (for our own, held or aliased addresses)
            // may carry a forged sender: a bounce of it returns the
            // headers only, so that outpost never sends a stranger's body
            // to whoever they named (backscatter).
            Some(DsnRet::Hdrs)
        } else if from.flags & proto::MAIL_RET_FULL != 0 {
            Some(DsnRet::Full)
        } else if from.flags & proto::MAIL_RET_HDRS != 0 {
            Some(DsnRet::Hdrs)
        } else {
            None
        };
        let checkpoint = match from.trans_id {
            Some(transid) if self.checkpoint_offered() => Some(TransactionKey {
                transid,
                helo: self.helo.clone().unwrap_or_default(),
                client: self.client_identity(),
            }),
            _ => None,
        };
        if let Some(key) = &checkpoint {
            if let Some(flow) = self.resume(key, &from.address).await {
                return flow;
            }
        }
        self.tx = Some(Transaction {
            sender: from.address,
            body_type,
            smtputf8,
            dsn_ret,
            dsn_envid: from.env_id,
            recipients: Vec::new(),
            given: 0,
            size_hint: from.size.min(max as usize),
            bdat: None,
            checkpoint,
            resumed: Vec::new(),
            completed: None,
            received: None,
        });
        self.reply(reply::sender_ok())
    }

    /// `store.min_free`: refuses a new message (452 4.3.1) while the store's
    /// file system is short of space, or short of room for `declared`.
    pub(super) fn room_for(&self, declared: u64) -> Result<(), Reply> {
        let min_free = self.config.min_free();
        if min_free == 0 {
            return Ok(());
        }
        let free = match crate::queue::space::available(&self.config.store.path) {
            Ok(f) => f,
            Err(e) => {
                // Not knowing is no reason to refuse: a full disk still
                // shows as 452 when the message is committed.
                debug!(peer = %self.peer, error = %e, "cannot read the store's free space");
                return Ok(());
            }
        };
        policy::room_for_message(free, min_free, declared).inspect_err(|r| {
            warn!(peer = %self.peer, free, min_free, declared, reply = %r.summary(), "MAIL refused: the store's disk is short of space (store.min_free)");
        })
    }

    pub(super) async fn rcpt(&mut self, to: proto::RcptTo<String>) -> Flow {
        let may_relay = self.may_relay();
        let max = self.config.relay.max_recipients;
        let Some(tx) = self.tx.as_ref() else {
            return self.error(reply::need_mail());
        };
        if tx.bdat.is_some() {
            return self.error(reply::bdat_in_progress());
        }
        if !to.address.is_ascii() && !tx.smtputf8 {
            return self.refuse_rcpt(reply::non_ascii_address());
        }
        let notify_any =
            proto::RCPT_NOTIFY_SUCCESS | proto::RCPT_NOTIFY_FAILURE | proto::RCPT_NOTIFY_DELAY;
        if to.flags & proto::RCPT_NOTIFY_NEVER != 0 && to.flags & notify_any != 0 {
            // RFC 3461 §4.1: NEVER stands alone.
            return self.error(reply::bad_param(
                "NOTIFY=NEVER cannot be combined with other values".into(),
            ));
        }
        if tx.given >= max {
            return self.refuse("rcpt", reply::too_many_recipients(max));
        }
        let accepted = match policy::route_recipient(&self.config, &to.address, may_relay) {
            Ok(a) => a,
            Err(r) => {
                info!(peer = %self.peer, rcpt = %to.address, reply = %r.summary(), "recipient refused");
                return self.refuse_rcpt(r);
            }
        };
        if accepted.route == Route::Local {
            match self.local_name_exists(&accepted.local_part).await {
                Ok(true) => {}
                Ok(false) => {
                    info!(peer = %self.peer, rcpt = %accepted.address, "recipient refused: no such local user");
                    return self.refuse_rcpt(reply::unknown_user());
                }
                Err(e) => {
                    warn!(peer = %self.peer, error = %e, "account lookup failed");
                    return self.reply(reply::temp_lookup_failed());
                }
            }
        }
        let (mailboxes, outside) = if accepted.route == Route::Local {
            match policy::try_expand_local(&self.config, &accepted.local_part) {
                Ok(expanded) => expanded,
                Err(e) => {
                    warn!(peer = %self.peer, rcpt = %accepted.address, error = %e, "recipient refused: fix local.aliases");
                    return self.refuse("rcpt", reply::alias_loop());
                }
            }
        } else {
            (Vec::new(), Vec::new())
        };
        match self.mailbox_full(&mailboxes).await {
            Ok(None) => {}
            Ok(Some(account)) => {
                info!(peer = %self.peer, rcpt = %accepted.address, account = %account, "recipient refused: mailbox full");
                return self.refuse("rcpt", reply::mailbox_full());
            }
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "mailbox size lookup failed");
                return self.reply(reply::temp_lookup_failed());
            }
        }
        let notify = notify_string(to.flags);
        let tx = self.tx.as_mut().expect("checked above");
        if !tx
            .recipients
            .iter()
            .any(|r| r.address.eq_ignore_ascii_case(&accepted.address))
        {
            tx.given += 1;
        }
        let orcpt = to
            .orcpt
            .map(|o| format!("rfc822;{o}"))
            .or_else(|| (!outside.is_empty()).then(|| format!("rfc822;{}", accepted.address)));
        for address in outside {
            // An alias's outside targets go upstream, on behalf of the name.
            tx.add(NewRecipient {
                domain: policy::split(&address)
                    .map(|(_, d)| d.to_ascii_lowercase())
                    .unwrap_or_default(),
                address,
                route: Route::Upstream,
                dsn_notify: notify.clone(),
                dsn_orcpt: orcpt.clone(),
                mailboxes: Vec::new(),
            });
        }
        tx.add(NewRecipient {
            address: accepted.address,
            domain: accepted.domain,
            route: accepted.route,
            dsn_notify: notify,
            dsn_orcpt: orcpt,
            mailboxes,
        });
        self.reply(reply::recipient_ok())
    }

    /// The first of `accounts` whose mailbox is at its quota, if any.
    pub(super) async fn mailbox_full(
        &self,
        accounts: &[String],
    ) -> Result<Option<String>, crate::queue::StoreError> {
        let limited: Vec<(String, u64)> = accounts
            .iter()
            .filter_map(|a| self.config.local.quota_of(a).map(|q| (a.clone(), q)))
            .collect();
        if limited.is_empty() {
            return Ok(None);
        }
        let store = self.shared.store.clone();
        tokio::task::spawn_blocking(move || {
            for (account, quota) in limited {
                if store.mailbox_usage(&account)? as u64 >= quota {
                    return Ok(Some(account));
                }
            }
            Ok(None)
        })
        .await
        .unwrap_or(Ok(None))
    }

    pub(super) async fn local_name_exists(
        &self,
        local_part: &str,
    ) -> Result<bool, crate::queue::StoreError> {
        let config = &self.config;
        if policy::always_exists(local_part)
            || config
                .local
                .aliases
                .keys()
                .any(|k| k.eq_ignore_ascii_case(local_part))
        {
            return Ok(true);
        }
        let store = self.shared.store.clone();
        let name = local_part.to_string();
        tokio::task::spawn_blocking(move || store.user_exists(&name))
            .await
            .unwrap_or(Ok(false))
    }
}
