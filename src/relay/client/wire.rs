//! Commands out, replies in: every write and read with its deadline, and
//! every reply bounded in size.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::reply::ReplyReader;
use super::{LinkError, Session, UpstreamReply};

/// Message data is handed to the socket at most this much at a time; each
/// write has its own `Timeouts::data` (RFC 5321 §4.5.3.2.5: a timeout per
/// block written).
pub const BLOCK: usize = 64 << 10;

impl Session {
    pub(super) async fn command(
        &mut self,
        line: &str,
        phase: &'static str,
    ) -> Result<UpstreamReply, LinkError> {
        self.write(line.as_bytes(), phase).await?;
        self.read_reply(phase).await
    }

    /// Writes `bytes`: a command line within the command timeout; message
    /// data with the data timeout for each write, so that only a stall
    /// (no octet taken in that long) times out, never a message that is
    /// merely big or slow.
    pub(super) async fn write(
        &mut self,
        bytes: &[u8],
        phase: &'static str,
    ) -> Result<(), LinkError> {
        let limit = if bytes.len() > 4096 {
            self.timeouts.data
        } else {
            self.timeouts.command
        };
        let addr = &self.addr;
        let failed = |e: std::io::Error| LinkError::Lost {
            addr: addr.clone(),
            phase,
            error: e.to_string(),
        };
        let stalled = |_| LinkError::Timeout {
            addr: addr.clone(),
            phase,
        };
        let io = self.stream.io().map_err(failed)?;
        let mut done = 0;
        while done < bytes.len() {
            let end = (done + BLOCK).min(bytes.len());
            let n = tokio::time::timeout(limit, io.write(&bytes[done..end]))
                .await
                .map_err(stalled)?
                .map_err(failed)?;
            if n == 0 {
                return Err(failed(std::io::ErrorKind::WriteZero.into()));
            }
            done += n;
            if self.progress.message.load(Ordering::Relaxed) != 0 {
                self.progress.sent.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        tokio::time::timeout(limit, io.flush())
            .await
            .map_err(stalled)?
            .map_err(failed)
    }

    /// Reads one (possibly multi-line) reply to a command.
    pub(super) async fn read_reply(
        &mut self,
        phase: &'static str,
    ) -> Result<UpstreamReply, LinkError> {
        self.read_reply_within(phase, self.timeouts.command).await
    }

    /// Reads the reply to the end of a message.
    pub(super) async fn read_final_reply(&mut self) -> Result<UpstreamReply, LinkError> {
        self.read_reply_within("final dot", self.timeouts.final_reply)
            .await
    }

    pub(super) async fn read_reply_within(
        &mut self,
        phase: &'static str,
        limit: Duration,
    ) -> Result<UpstreamReply, LinkError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut reader = ReplyReader::default();
        loop {
            match reader.take(&mut self.rbuf) {
                Ok(Some(reply)) => return Ok(reply),
                Ok(None) => {}
                Err(why) => {
                    return Err(LinkError::Protocol {
                        addr: self.addr.clone(),
                        why,
                    })
                }
            }
            let mut chunk = [0u8; 4096];
            let io = &mut self.stream;
            let n =
                match tokio::time::timeout_at(deadline, async { io.io()?.read(&mut chunk).await })
                    .await
                {
                    Ok(Ok(0)) => {
                        return Err(LinkError::Lost {
                            addr: self.addr.clone(),
                            phase,
                            error: "connection closed".into(),
                        })
                    }
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) => {
                        return Err(LinkError::Lost {
                            addr: self.addr.clone(),
                            phase,
                            error: e.to_string(),
                        })
                    }
                    Err(_) => {
                        return Err(LinkError::Timeout {
                            addr: self.addr.clone(),
                            phase,
                        })
                    }
                };
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }
}
