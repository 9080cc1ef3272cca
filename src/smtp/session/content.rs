//! DATA and BDAT: the content read strictly, checked, and committed with
//! its envelope before the reply.

use super::*;
use crate::queue::{Body, Spool, SPILL_OVER};
use crate::smtp::data::Collect;

impl<S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static> Session<S> {
    /// What message content may be: `relay.max_message_size`,
    /// `smtp.max_line_length`, `relay.max_hops`.
    pub(super) fn content_limits(&self) -> Limits {
        let c = &self.config;
        Limits {
            size: usize::try_from(c.relay.max_message_size).unwrap_or(usize::MAX),
            line: c.smtp.max_line_length,
            hops: c.relay.max_hops,
        }
    }

    /// Checks that DATA or BDAT may start; returns the reply if not.
    pub(super) fn content_allowed(&self) -> Option<Reply> {
        match &self.tx {
            None => Some(reply::need_mail()),
            Some(tx) if tx.recipients.is_empty() => Some(reply::need_rcpt()),
            Some(_) => None,
        }
    }

    pub(super) async fn data(&mut self) -> Flow {
        if let Some(r) = self.content_allowed() {
            return self.error(r);
        }
        if self.tx.as_ref().is_some_and(|t| t.bdat.is_some()) {
            return self.error(reply::bdat_in_progress());
        }
        let id = QueueId::generate();
        let mut reader = DotReader::with_capacity(self.content_limits(), self.buffer_size());
        let mut spool = self.spool();
        // A resumed transaction goes on after the content it kept (whole
        // lines, so dot-stuffing goes on where it left off).
        let resumed = self.take_resumed();
        for block in crate::dotstuff::dot_stuff(&resumed).chunks(SPILL_OVER) {
            let _ = reader.feed(block);
            spill(&mut reader, &mut spool).await;
        }
        drop(resumed);
        self.codec.reply(&reply::start_data());
        loop {
            let input = self.codec.buffered();
            let end = reader.feed(input);
            let n = end.unwrap_or(input.len());
            self.codec.consume(n);
            spill(&mut reader, &mut spool).await;
            if end.is_some() {
                break;
            }
            if !self.fill_data().await {
                if self.tx.as_ref().is_some_and(|t| t.checkpoint.is_some()) {
                    let keep = reader.complete_lines();
                    let tail = reader.take_output();
                    self.keep_for_checkpoint(keep, tail, spool);
                }
                return Flow::Close;
            }
        }
        let size = reader.size();
        self.finish_message(id, reader.finish(), spool, size).await
    }

    pub(super) async fn bdat(&mut self, chunk: usize, last: bool) -> Flow {
        // The chunk is read whatever the answer, so the dialog stays in step.
        let refused = self.content_allowed();
        let mut sink = match (&refused, self.tx.as_mut().and_then(|t| t.bdat.take())) {
            (None, Some(open)) => Some(open),
            (None, None) => {
                let mut up = Chunked {
                    id: QueueId::generate(),
                    content: Canonical::with_capacity(self.content_limits(), self.buffer_size()),
                    spool: self.spool(),
                };
                let resumed = self.take_resumed();
                for block in resumed.chunks(SPILL_OVER) {
                    up.content.extend(block);
                    spill(&mut up.content, &mut up.spool).await;
                }
                Some(up)
            }
            (Some(_), _) => None,
        };
        let mut left = chunk;
        while left > 0 {
            if self.codec.buffered().is_empty() && !self.fill_data().await {
                if let Some(up) = sink {
                    if self.tx.as_ref().is_some_and(|t| t.checkpoint.is_some()) {
                        up.keep_for_checkpoint(self);
                    }
                }
                return Flow::Close;
            }
            let input = self.codec.buffered();
            let take = input.len().min(left);
            if let Some(up) = sink.as_mut() {
                up.content.extend(&input[..take]);
            }
            self.codec.consume(take);
            left -= take;
            if let Some(up) = sink.as_mut() {
                spill(&mut up.content, &mut up.spool).await;
            }
        }
        if let Some(r) = refused {
            return self.error(r);
        }
        let up = sink.expect("set when not refused");
        if !last {
            let tx = self.tx.as_mut().expect("content_allowed checked");
            tx.bdat = Some(up);
            return self.reply(reply::bdat_ok(chunk));
        }
        let size = up.content.size();
        self.finish_message(up.id, up.content.finish(), up.spool, size)
            .await
    }

    /// Where content past [`SPILL_OVER`] goes while it arrives.
    fn spool(&self) -> Spool {
        Spool::new(crate::queue::spool_dir(&self.config.store.path))
    }

    /// Room made at once for the content: what SIZE= declared, up to what
    /// is held in memory before it is spooled.
    fn buffer_size(&self) -> usize {
        self.tx
            .as_ref()
            .map_or(0, |t| t.size_hint.min(SPILL_OVER).saturating_add(2))
    }

    /// The content an earlier connection left, to go on after.
    fn take_resumed(&mut self) -> Vec<u8> {
        self.tx
            .as_mut()
            .map(|t| std::mem::take(&mut t.resumed))
            .unwrap_or_default()
    }

    /// The link broke in the content: what came of it (`keep` octets, in
    /// `spool` and then `tail`) is kept for a checkpoint when the session
    /// ends. Nothing when the content was refused anyway.
    pub(super) fn keep_for_checkpoint(&mut self, keep: Option<usize>, tail: Vec<u8>, spool: Spool) {
        let Some(keep) = keep else { return };
        let body = spool.finish(tail).and_then(|mut b| {
            b.truncate(keep as u64)?;
            Ok(b)
        });
        match (body, self.tx.as_mut()) {
            (Ok(b), Some(tx)) => tx.received = Some(b),
            (Err(e), _) => {
                warn!(peer = %self.peer, error = %e, "CHECKPOINT: the content received could not be kept")
            }
            (Ok(_), None) => {}
        }
    }

    /// Ends the transaction: commits the message, or says why not.
    pub(super) async fn finish_message(
        &mut self,
        id: QueueId,
        content: Result<Vec<u8>, ContentError>,
        spool: Spool,
        size: usize,
    ) -> Flow {
        let head = self.received_header(&id);
        let tx = self.tx.take().expect("a transaction is open");
        let checkpoint = tx.checkpoint.clone();
        if let Some(queued) = &tx.completed {
            // Taken before the link broke (RFC 1047's window): said again,
            // not stored again.
            info!(peer = %self.peer, queue_id = %queued, "CHECKPOINT: already queued, not stored twice");
            return self.reply(reply::already_queued(queued));
        }
        let body = match content.map(|tail| spool.finish(tail)) {
            Ok(Ok(body)) => body.with_head(head),
            Ok(Err(e)) => {
                let r = if e.kind() == std::io::ErrorKind::StorageFull {
                    reply::store_full()
                } else {
                    reply::store_failed()
                };
                tracing::error!(peer = %self.peer, queue_id = %id, error = %e, "could not spool the message in the store's directory");
                self.shared.metrics.refused("data", r.status);
                return self.reply(r);
            }
            Err(e) => {
                let r = match e {
                    ContentError::BareLf => reply::bare_lf(),
                    ContentError::BareCr => reply::bare_cr(),
                    ContentError::Nul => reply::nul_in_data(),
                    ContentError::LineTooLong => {
                        reply::data_line_too_long(self.config.smtp.max_line_length)
                    }
                    ContentError::TooBig => {
                        reply::too_big(self.config.relay.max_message_size as usize)
                    }
                    ContentError::TooManyHops => reply::too_many_hops(self.config.relay.max_hops),
                };
                warn!(peer = %self.peer, from = %tx.sender, size, reply = %r.summary(), "message refused");
                self.shared.metrics.refused("data", r.status);
                return self.reply(r);
            }
        };
        let msg = NewMessage {
            id: id.clone(),
            received_at: unix_now(),
            sender: tx.sender,
            client_addr: self
                .peer
                .ip()
                .map(|ip| ip.to_string())
                .unwrap_or_else(|| "local".into()),
            client_helo: self.helo.clone().unwrap_or_default(),
            auth_user: self.auth_user.clone(),
            protocol: self.protocol(),
            body_type: tx.body_type,
            smtputf8: tx.smtputf8,
            dsn_ret: tx.dsn_ret,
            dsn_envid: tx.dsn_envid,
            recipients: tx.recipients,
            body,
        };
        let (sender, nrcpt, stored) = (msg.sender.clone(), msg.recipients.len(), msg.body.len());
        // In the same commit: a client that misses our reply learns on its
        // next try (same TRANSID) that the message was taken.
        let remembered = checkpoint.map(|key| {
            Change::SavePartial(Box::new(crate::queue::Partial {
                key,
                sender: msg.sender.clone(),
                envelope: crate::queue::Envelope {
                    body_type: msg.body_type.clone(),
                    smtputf8: msg.smtputf8,
                    dsn_ret: msg.dsn_ret,
                    dsn_envid: msg.dsn_envid.clone(),
                    recipients: msg.recipients.clone(),
                },
                content: Body::default(),
                size: size as i64,
                queue_id: Some(id.to_string()),
                updated_at: unix_now(),
            }))
        });
        let mut changes = vec![Change::Insert(Box::new(msg))];
        changes.extend(remembered);
        match self.shared.writer.apply(changes).await {
            Ok(()) => {
                info!(peer = %self.peer, queue_id = %id, from = %sender, rcpts = nrcpt, size = stored, "queued");
                self.shared.metrics.accepted();
                if let Some(n) = &self.shared.triggers.submitted {
                    n.notify_one();
                }
                self.reply(reply::queued(id.as_str()))
            }
            Err(e) => {
                let r = if e.is_full() {
                    reply::store_full()
                } else {
                    reply::store_failed()
                };
                tracing::error!(peer = %self.peer, queue_id = %id, error = %e, "could not store the message");
                self.shared.metrics.refused("data", r.status);
                self.reply(r)
            }
        }
    }

    /// The trace header this gateway adds (RFC 5321 §4.4). Names the TLS
    /// version and cipher and the account, never a password.
    pub(super) fn received_header(&self, id: &QueueId) -> Vec<u8> {
        let config = &self.config;
        let mut h = match (&self.peer, self.peer.ip()) {
            (_, Some(ip)) => format!(
                "Received: from {} ([{ip}])\r\n\tby {} (outpost) with {} id {}",
                self.helo.as_deref().unwrap_or("unknown"),
                config.hostname,
                self.protocol(),
                id
            ),
            (peer, None) => {
                let uid = match peer {
                    Peer::Local { uid } => *uid,
                    Peer::Tcp(_) => 0,
                };
                format!(
                    "Received: by {} (outpost, from userid {uid}) with {} id {}",
                    config.hostname,
                    self.protocol(),
                    id
                )
            }
        };
        if let Some((version, cipher)) = self.codec.get_ref().tls_info() {
            h.push_str(&format!("\r\n\t(using {version} with cipher {cipher})"));
        }
        if let Some(user) = &self.auth_user {
            h.push_str(&format!("\r\n\t(authenticated as {user})"));
        }
        if let Some(tx) = &self.tx {
            if let [only] = tx.recipients.as_slice() {
                h.push_str(&format!("\r\n\tfor <{}>", only.address));
            }
        }
        h.push_str(&format!(";\r\n\t{}\r\n", chrono::Local::now().to_rfc2822()));
        h.into_bytes()
    }
}

/// BDAT content between chunks.
#[derive(Debug)]
pub(super) struct Chunked {
    id: QueueId,
    content: Canonical,
    spool: Spool,
}

impl Chunked {
    /// Cut off between or in chunks: all that came is kept (BDAT content
    /// need not end at a line).
    pub(super) fn keep_for_checkpoint<S>(mut self, session: &mut Session<S>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static,
    {
        let keep = self.content.accepted();
        let tail = self.content.take_output();
        session.keep_for_checkpoint(keep, tail, self.spool);
    }
}

/// Moves what `content` holds to `spool` once it is [`SPILL_OVER`] or more.
async fn spill(content: &mut impl Collect, spool: &mut Spool) {
    if content.pending() >= SPILL_OVER {
        spool.write(content.take_output()).await;
    }
}
