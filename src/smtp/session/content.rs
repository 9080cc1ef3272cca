//! DATA and BDAT: the content read strictly, checked, and committed with
//! its envelope before the reply.

use super::*;

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
        let mut reader = DotReader::with_prefix(self.content_limits(), self.message_buffer(&id));
        // A resumed transaction goes on after the content it kept (whole
        // lines, so dot-stuffing goes on where it left off).
        if let Some(tx) = &self.tx {
            if !tx.resumed.is_empty() {
                let _ = reader.feed(&crate::dotstuff::dot_stuff(&tx.resumed)[..]);
            }
        }
        self.codec.reply(&reply::start_data());
        loop {
            let input = self.codec.buffered();
            if let Some(n) = reader.feed(input) {
                self.codec.consume(n);
                break;
            }
            let n = input.len();
            self.codec.consume(n);
            if !self.fill_data().await {
                if let Some(tx) = self.tx.as_mut().filter(|t| t.checkpoint.is_some()) {
                    tx.received = reader.complete_lines().map(<[u8]>::to_vec);
                }
                return Flow::Close;
            }
        }
        let size = reader.size();
        self.finish_message(id, reader.finish(), size).await
    }

    pub(super) async fn bdat(&mut self, chunk: usize, last: bool) -> Flow {
        // The chunk is read whatever the answer, so the dialog stays in step.
        let refused = self.content_allowed();
        let mut sink = match (&refused, self.tx.as_mut().and_then(|t| t.bdat.take())) {
            (None, Some(open)) => Some(open),
            (None, None) => {
                let id = QueueId::generate();
                let mut c = Canonical::with_prefix(self.content_limits(), self.message_buffer(&id));
                if let Some(tx) = &self.tx {
                    c.extend(&tx.resumed);
                }
                Some((id.clone(), c))
            }
            (Some(_), _) => None,
        };
        let mut left = chunk;
        while left > 0 {
            if self.codec.buffered().is_empty() && !self.fill_data().await {
                if let (Some(tx), Some((_, c))) = (
                    self.tx.as_mut().filter(|t| t.checkpoint.is_some()),
                    sink.as_ref(),
                ) {
                    tx.received = c.taken().map(<[u8]>::to_vec);
                }
                return Flow::Close;
            }
            let input = self.codec.buffered();
            let take = input.len().min(left);
            if let Some((_, c)) = sink.as_mut() {
                c.extend(&input[..take]);
            }
            self.codec.consume(take);
            left -= take;
        }
        if let Some(r) = refused {
            return self.error(r);
        }
        let (id, content) = sink.expect("set when not refused");
        if !last {
            let tx = self.tx.as_mut().expect("content_allowed checked");
            if tx.checkpoint.is_some() {
                // Between chunks the link may break too.
                tx.received = content.taken().map(<[u8]>::to_vec);
            }
            tx.bdat = Some((id, content));
            return self.reply(reply::bdat_ok(chunk));
        }
        let size = content.size();
        self.finish_message(id, content.finish(), size).await
    }

    /// Ends the transaction: commits the message, or says why not.
    pub(super) async fn finish_message(
        &mut self,
        id: QueueId,
        content: Result<Vec<u8>, ContentError>,
        size: usize,
    ) -> Flow {
        let tx = self.tx.take().expect("a transaction is open");
        let checkpoint = tx.checkpoint.clone();
        if let Some(queued) = &tx.completed {
            // Taken before the link broke (RFC 1047's window): said again,
            // not stored again.
            info!(peer = %self.peer, queue_id = %queued, "CHECKPOINT: already queued, not stored twice");
            return self.reply(reply::already_queued(queued));
        }
        let body = match content {
            Ok(body) => body,
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
                content: Vec::new(),
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
    /// The buffer a message is collected in: the Received header first, and
    /// room for the size the client declared.
    pub(super) fn message_buffer(&self, id: &QueueId) -> Vec<u8> {
        let mut buf = self.received_header(id);
        if let Some(tx) = &self.tx {
            buf.reserve(tx.size_hint.saturating_add(2));
        }
        buf
    }

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
