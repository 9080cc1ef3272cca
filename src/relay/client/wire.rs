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
    /// Octets handed to the connection so far: where a message ends, for
    /// [`Session::never_reached`].
    pub(super) fn written(&self) -> u64 {
        self.written
    }

    /// After the connection failed: true when the upstream cannot have
    /// received the octet at `end` (a count of octets written, from
    /// [`Session::written`]), because it was never handed to the
    /// connection, or because the upstream's TCP has not acknowledged it
    /// (it is still in our send queue). Then a message ending there was not
    /// taken: its loss is a link failure before the end of the data, not
    /// RFC 1047's uncertain window. False when that cannot be told (a
    /// connection reset empties the send queue; a turned connection has no
    /// socket of ours): the message stays uncertain.
    pub(super) fn never_reached(&self, end: u64) -> bool {
        if end > self.written {
            return true;
        }
        let Some(queued) = self.stream.tcp().and_then(send_queue) else {
            return false;
        };
        let after = self.written - end;
        // What was written after `end`, and for TLS the record overhead
        // over it (at most 32 octets a record of up to 16 KiB, and the
        // record holding `end`).
        let margin = match self.stream {
            super::Stream::Tls(_) => 32 * (after / 16384 + 2),
            _ => 0,
        };
        queued > after + margin
    }

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
            self.written += n as u64;
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

/// Octets in `socket`'s send queue not yet acknowledged by the peer (what
/// `ioctl(SIOCOUTQ)` tells), read from `/proc/net/tcp{,6}` by the socket's
/// inode: no unsafe code, and Linux is where outpost runs. None when it
/// cannot be found.
fn send_queue(socket: &tokio::net::TcpStream) -> Option<u64> {
    use std::os::fd::AsFd;
    let inode = rustix::fs::fstat(socket.as_fd()).ok()?.st_ino.to_string();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        if let Some(q) = text.lines().skip(1).find_map(|l| tx_queue(l, &inode)) {
            return Some(q);
        }
    }
    None
}

/// The tx_queue of one `/proc/net/tcp` line when it is socket `inode`'s:
/// `sl local rem st tx_queue:rx_queue tr:when retrnsmt uid timeout inode`.
fn tx_queue(line: &str, inode: &str) -> Option<u64> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.get(9) != Some(&inode) {
        return None;
    }
    let (tx, _) = f.get(4)?.split_once(':')?;
    u64::from_str_radix(tx, 16).ok()
}

#[cfg(test)]
mod send_queue_tests {
    use super::*;

    #[test]
    fn a_proc_net_tcp_line_is_read_by_inode() {
        let line = "   3: 0100007F:9C4A 0100007F:0019 01 0001A2B0:00000000 01:00000014 00000000     0        0 48213 1 0000000000000000 20 4 30 10 -1";
        assert_eq!(tx_queue(line, "48213"), Some(0x1A2B0));
        assert_eq!(tx_queue(line, "4821"), None);
    }

    /// A peer that takes nothing: what we wrote stays in our send queue,
    /// and the count says so.
    #[tokio::test]
    async fn unread_data_is_counted_in_the_send_queue() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s2 = socket2::SockRef::from(&l);
        s2.set_recv_buffer_size(4096).unwrap();
        let addr = l.local_addr().unwrap();
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (_peer, _) = l.accept().unwrap();
        assert_eq!(send_queue(&c), Some(0));
        let block = vec![b'x'; 256 << 10];
        let _ = tokio::time::timeout(Duration::from_millis(500), c.write_all(&block)).await;
        let queued = send_queue(&c).unwrap();
        assert!(queued > 64 << 10, "{queued}");
    }
}
