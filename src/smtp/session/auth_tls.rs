//! STARTTLS and AUTH: TLS on demand (or at once on implicit-TLS
//! listeners), and logins checked off the session's task.

use super::*;

impl<S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static> Session<S> {
    pub(super) fn tls_active(&self) -> bool {
        self.codec.tls_active()
    }

    /// AUTH is offered over TLS, or in the clear only where the listener
    /// allows it (by default: loopback listeners).
    pub(super) fn auth_offered(&self) -> bool {
        self.tls_active() || self.listen.plaintext_auth_allowed()
    }

    pub(super) async fn starttls(&mut self) -> Flow {
        if self.tls_active() {
            return self.error(reply::tls_already());
        }
        if self.tls.is_none() {
            return self.reply(reply::tls_unavailable());
        }
        self.codec.reply(&reply::ready_tls());
        if self.codec.flush().await.is_err() {
            return Flow::Close;
        }
        let dropped = self.codec.discard_input();
        if dropped > 0 {
            warn!(peer = %self.peer, octets = dropped, "discarded input pipelined after STARTTLS");
        }
        if !self.tls_handshake().await {
            return Flow::Close;
        }
        // RFC 3207 §4.2: forget everything learnt before TLS.
        self.helo = None;
        self.esmtp = false;
        self.tx = None;
        self.auth_user = None;
        Flow::Go
    }

    /// Runs the TLS handshake on the plain stream. False when it failed.
    pub(super) async fn tls_handshake(&mut self) -> bool {
        let Some(acceptor) = self.tls.clone() else {
            return false;
        };
        let limit = self.read_limit(TLS_TIMEOUT.min(self.config.smtp.command_timeout));
        match self.codec.tls_handshake(&acceptor, limit).await {
            Ok(()) => {
                let (v, c) = self.codec.get_ref().tls_info().unwrap_or_default();
                debug!(peer = %self.peer, version = %v, cipher = %c, "TLS established");
                true
            }
            Err(e) => {
                info!(peer = %self.peer, error = %e, "TLS handshake failed");
                false
            }
        }
    }

    pub(super) async fn auth(&mut self, mechanism: u64, initial: String) -> Flow {
        if self.auth_user.is_some() {
            return self.error(reply::auth_already());
        }
        if self.tx.is_some() {
            return self.error(reply::auth_in_transaction());
        }
        if !self.auth_offered() {
            return self.reply(reply::encryption_required());
        }
        let client = self.peer.ip().map(|ip| self.shared.client_of(ip));
        if let Some(left) =
            client.and_then(|c| self.shared.logins.blocked(c, Instant::now().into_std()))
        {
            info!(peer = %self.peer, minutes_left = left.as_secs().div_ceil(60), "AUTH refused: this client is blocked after too many failed logins (auth.max_failures)");
            return self.reply(reply::auth_blocked(left));
        }
        let creds = match mechanism {
            proto::AUTH_PLAIN => {
                let response = if initial.is_empty() {
                    match self.challenge("").await {
                        Ok(r) => r,
                        Err(flow) => return flow,
                    }
                } else {
                    initial
                };
                match auth::decode_b64(&response) {
                    Some(d) => auth::parse_plain(&d),
                    None => return self.error(reply::auth_bad_base64()),
                }
            }
            proto::AUTH_LOGIN => {
                let user = if initial.is_empty() {
                    match self.challenge("VXNlcm5hbWU6").await {
                        Ok(r) => r,
                        Err(flow) => return flow,
                    }
                } else {
                    initial
                };
                let pass = match self.challenge("UGFzc3dvcmQ6").await {
                    Ok(r) => r,
                    Err(flow) => return flow,
                };
                match (auth::decode_b64(&user), auth::decode_b64(&pass)) {
                    (Some(u), Some(p)) => match (String::from_utf8(u), String::from_utf8(p)) {
                        (Ok(u), Ok(p)) if !u.is_empty() => Some((u, p)),
                        _ => None,
                    },
                    _ => return self.error(reply::auth_bad_base64()),
                }
            }
            _ => return self.error(reply::auth_mechanism()),
        };
        let ok_user = match creds {
            Some((user, pass)) => match self.shared.check_password(&user, pass).await {
                Login::Accepted => Ok(user),
                Login::WrongPassword => Err(Some(user)),
                Login::NoSuchAccount => Err(None),
            },
            None => Err(None),
        };
        match ok_user {
            Ok(user) => {
                info!(peer = %self.peer, user = %user, "authenticated");
                self.auth_user = Some(user);
                self.reply(reply::auth_ok())
            }
            Err(user) => {
                self.auth_failures += 1;
                warn!(peer = %self.peer, user = user.as_deref().unwrap_or("?"), failures = self.auth_failures, "authentication failed");
                if let Some(client) = client {
                    self.shared.login_failed(
                        &self.config,
                        client,
                        user.as_deref(),
                        &self.peer.to_string(),
                    );
                }
                tokio::time::sleep(self.config.smtp.auth_failure_delay).await;
                if self.auth_failures >= self.config.smtp.max_auth_failures {
                    self.codec.reply(&reply::auth_too_many());
                    return Flow::Close;
                }
                self.reply(reply::auth_failed())
            }
        }
    }

    /// Sends a 334 challenge and reads the client's answer. `*` cancels.
    pub(super) async fn challenge(&mut self, text: &'static str) -> Result<String, Flow> {
        self.codec.reply(&reply::auth_challenge(text));
        match self.next_line(MAX_AUTH_LINE).await {
            Some(Line::Text(l)) if l == b"*" => Err(self.error(reply::auth_cancelled())),
            Some(Line::Text(l)) => {
                String::from_utf8(l).map_err(|_| self.error(reply::auth_bad_base64()))
            }
            Some(Line::TooLong) => Err(self.error(reply::auth_line_too_long())),
            Some(Line::BareLf) => Err(self.error(reply::bare_lf_in_command())),
            Some(Line::Eof) | None => Err(Flow::Close),
        }
    }
}
