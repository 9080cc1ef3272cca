//! ODMR/ATRN (RFC 2645) both ways: the hub delivers held mail over a
//! connection its branch turned around; the branch asks for it after its
//! flush and hands the turned connection to the daemon to serve.

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::super::client::Session;
use super::super::decide;
use super::{Destination, Event, FlushLock, Flusher, Summary};
use crate::queue::StoreError;

/// A connection to the hub that ATRN turned around: the hub is now the
/// client on it and this side must serve it; `done` is sent when the
/// session on it has ended.
pub struct TurnedBack {
    pub io: crate::codec::BoxedIo,
    /// The hub's address.
    pub peer: std::net::SocketAddr,
    pub done: tokio::sync::oneshot::Sender<()>,
}

impl Flusher {
    /// Branch role: connections the hub turns around after ATRN go to
    /// `serve`, which runs an SMTP server session on each.
    pub fn serving_turned(mut self, serve: mpsc::UnboundedSender<TurnedBack>) -> Flusher {
        self.turned = Some(serve);
        self
    }

    /// Hub role: a branch turned its connection around with ATRN; deliver
    /// the held mail of `domains` over it, as a client, under the flush
    /// lock. Mail that does not go stays held for the next ATRN or ETRN.
    pub async fn deliver_turned(
        &self,
        io: crate::codec::BoxedIo,
        peer: String,
        domains: Vec<String>,
        progress: &mut (dyn FnMut(&Event) + Send),
    ) -> Summary {
        let mut summary = Summary::untried();
        let r = match FlushLock::acquire(&self.config.store.path).await {
            Ok(_lock) => {
                self.deliver_turned_locked(io, &peer, &domains, progress, &mut summary)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            warn!(peer = %peer, error = %e, "ATRN: held mail not delivered");
            summary.error = Some(e);
        }
        progress(&Event::Done(summary.clone()));
        summary
    }

    async fn deliver_turned_locked(
        &self,
        io: crate::codec::BoxedIo,
        peer: &str,
        domains: &[String],
        progress: &mut (dyn FnMut(&Event) + Send),
        summary: &mut Summary,
    ) -> Result<(), String> {
        let store = self.store.clone();
        let pending = tokio::task::spawn_blocking(move || store.pending_outbound())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let due = decide::held_for(pending, domains);
        let dest = Destination {
            name: format!("ATRN {}", domains.join(",")),
            server: peer.to_string(),
            upstream: false,
            route: None,
        };
        let settings = self.settings(&dest, peer).map_err(|e| e.to_string())?;
        let session = Session::turned(io, peer.to_string(), &settings)
            .await
            .map_err(|e| format!("the branch did not take the turned connection: {e}"))?;
        info!(peer = %peer, domains = %domains.join(","), messages = due.len(), "ATRN: delivering held mail over the branch's connection");
        progress(&Event::Start { due: due.len() });
        let open = self
            .send_over(dest, session, settings, due, progress, summary)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(s) = open {
            s.quit().await;
        }
        Ok(())
    }

    /// Branch role, after the outbound flush: ATRN at `upstream.odmr`
    /// for `flush.atrn`, and serve the connection the hub turns around.
    pub(super) async fn take_by_atrn(&self, summary: &mut Summary) -> Result<(), StoreError> {
        let domains = &self.config.flush.atrn;
        let Some(serve) = &self.turned else {
            summary.atrn =
                Some("not asked: ATRN needs the daemon (outpost serve) to receive the mail".into());
            return Ok(());
        };
        let up = &self.config.upstream;
        let server = match &up.odmr {
            Some(s) => s.clone(),
            None => match crate::config::parse_server(&up.server) {
                Ok(s) => format!("[{}]:366", s.host),
                Err(e) => {
                    summary.atrn = Some(format!("upstream.server: {e}"));
                    return Ok(());
                }
            },
        };
        let dest = Destination {
            name: "odmr".into(),
            server,
            upstream: true,
            route: None,
        };
        let (mut s, _) = match self.connect(&dest).await {
            Ok(s) => s,
            Err(e) => {
                warn!(odmr = %dest.server, error = %e, "ATRN: the hub's ODMR service is not usable");
                summary.atrn = Some(e.to_string());
                return Ok(());
            }
        };
        let reply = match s.atrn(domains).await {
            Ok(r) => r,
            Err(e) => {
                summary.atrn = Some(e.to_string());
                return Ok(());
            }
        };
        info!(odmr = %s.addr, domains = %domains.join(","), reply = %reply, "ATRN");
        summary.atrn = Some(reply.to_string());
        if reply.code != 250 {
            s.quit().await;
            return Ok(());
        }
        let peer = s
            .addr
            .parse()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let Some(io) = s.into_io() else {
            return Ok(());
        };
        let (done, finished) = tokio::sync::oneshot::channel();
        if serve.send(TurnedBack { io, peer, done }).is_ok() {
            // The hub delivers; this flush ends when it has.
            let _ = finished.await;
        }
        Ok(())
    }
}
