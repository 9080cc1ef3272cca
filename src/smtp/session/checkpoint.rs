//! CHECKPOINT (RFC 1845), the server side: a transaction marked with
//! TRANSID is kept when its link breaks and resumed by the same client.

use super::*;

impl<S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static> Session<S> {
    /// CHECKPOINT is offered on the SMTP listeners unless
    /// `smtp.checkpoint_keep` is 0.
    pub(super) fn checkpoint_offered(&self) -> bool {
        !self.config.smtp.checkpoint_keep.is_zero() && self.listen.mode != ListenMode::Odmr
    }

    /// Who the client is, for a checkpoint's key: its account, or its
    /// address. Another client can never resume its transactions.
    pub(super) fn client_identity(&self) -> String {
        match (&self.auth_user, self.peer.ip()) {
            (Some(u), _) => format!("account:{}", u.to_ascii_lowercase()),
            (None, Some(ip)) => format!("address:{ip}"),
            (None, None) => self.peer.to_string(),
        }
    }

    /// A MAIL with a TRANSID this client used before: the transaction is
    /// restored (sender, parameters, recipients, the content received so
    /// far) and the client told where to go on (355). A TRANSID unknown,
    /// expired, or with another sender starts a new transaction (None).
    pub(super) async fn resume(&mut self, key: &TransactionKey, sender: &str) -> Option<Flow> {
        let store = self.shared.store.clone();
        let lookup = key.clone();
        let found = tokio::task::spawn_blocking(move || store.partial(&lookup))
            .await
            .ok()?
            .ok()??;
        let keep = self.config.smtp.checkpoint_keep.as_secs() as i64;
        if found.sender != sender || found.updated_at + keep < unix_now() {
            return None;
        }
        let env = found.envelope;
        info!(peer = %self.peer, transid = %key.transid, offset = found.size,
              completed = found.queue_id.as_deref().unwrap_or(""), "CHECKPOINT: transaction resumed");
        self.tx = Some(Transaction {
            sender: found.sender,
            body_type: env.body_type,
            smtputf8: env.smtputf8,
            dsn_ret: env.dsn_ret,
            dsn_envid: env.dsn_envid,
            given: env.recipients.len(),
            recipients: env.recipients,
            size_hint: found.size.max(0) as usize,
            bdat: None,
            checkpoint: Some(key.clone()),
            resumed: match found.content.into_vec() {
                Ok(v) => v,
                Err(e) => {
                    warn!(peer = %self.peer, transid = %key.transid, error = %e, "CHECKPOINT: the kept content could not be read; starting afresh");
                    return None;
                }
            },
            completed: found.queue_id,
            received: None,
        });
        Some(self.reply(reply::checkpoint_offset(found.size)))
    }

    /// The end of a session: a transaction marked with TRANSID whose
    /// content was cut off is kept, for its client to resume.
    pub(super) async fn checkpoint_interrupted(&mut self) {
        // Cut off between BDAT chunks: what came so far is kept.
        if let Some(tx) = self.tx.as_mut().filter(|t| t.checkpoint.is_some()) {
            if let Some(up) = tx.bdat.take().filter(|_| tx.received.is_none()) {
                up.keep_for_checkpoint(self);
            }
        }
        let Some(tx) = self.tx.take() else {
            return;
        };
        let (Some(key), Some(received)) = (tx.checkpoint, tx.received) else {
            return;
        };
        if tx.completed.is_some() || received.is_empty() {
            return;
        }
        let size = received.len() as i64;
        let partial = crate::queue::Partial {
            key: key.clone(),
            sender: tx.sender,
            envelope: crate::queue::Envelope {
                body_type: tx.body_type,
                smtputf8: tx.smtputf8,
                dsn_ret: tx.dsn_ret,
                dsn_envid: tx.dsn_envid,
                recipients: tx.recipients,
            },
            content: received,
            size,
            queue_id: None,
            updated_at: unix_now(),
        };
        match self
            .shared
            .writer
            .apply(vec![Change::SavePartial(Box::new(partial))])
            .await
        {
            Ok(()) => {
                info!(peer = %self.peer, transid = %key.transid, octets = size, "CHECKPOINT: interrupted transaction kept")
            }
            Err(e) => {
                warn!(peer = %self.peer, transid = %key.transid, error = %e, "CHECKPOINT: could not keep the interrupted transaction")
            }
        }
    }
}
