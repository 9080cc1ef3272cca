//! Bytes in, lines and raw octets out, for SMTP and POP3; replies buffered
//! until the client's input is drained (RFC 2920 §3.1: a server answers a
//! pipelined group in one write, and must flush before it waits for more
//! input).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use std::borrow::Cow;
use std::fmt::Write as _;

/// One command line, or why there is none.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// The line without its CRLF.
    Text(Vec<u8>),
    /// Longer than the limit; the whole line was discarded.
    TooLong,
    /// Ended by a bare LF or held a bare CR.
    BareLf,
    /// The client closed the connection.
    Eof,
}

pub struct Codec<S> {
    stream: S,
    rbuf: Vec<u8>,
    rpos: usize,
    wbuf: Vec<u8>,
    /// Octets of `wbuf` already written: a flush cut short by a timeout
    /// goes on where it stopped, never sends anything twice.
    wpos: usize,
    /// How long one flush may wait for the peer to take the output.
    write_timeout: Duration,
    /// A write failed or timed out: the peer is gone or not reading, and
    /// nothing more is sent.
    broken: bool,
}

const READ_CHUNK: usize = 16 * 1024;
/// Replies to pipelined commands are held until the input is drained
/// (RFC 2920), but no more than this: a client that sends commands without
/// reading the answers makes outpost wait on the write, not buffer them all.
const OUTPUT_HIGH_WATER: usize = 64 * 1024;
/// Until a session sets its own.
const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(300);

impl<S: AsyncRead + AsyncWrite + Unpin> Codec<S> {
    pub fn new(stream: S) -> Codec<S> {
        Codec {
            stream,
            rbuf: Vec::with_capacity(1024),
            rpos: 0,
            wbuf: Vec::with_capacity(512),
            wpos: 0,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            broken: false,
        }
    }

    /// How long a flush may wait for the peer to take the output; past it
    /// the flush fails with `TimedOut` and the codec sends nothing more.
    pub fn set_write_timeout(&mut self, t: Duration) {
        self.write_timeout = t;
    }

    /// Queues a reply; it is sent before the next read that has to wait.
    pub fn reply(&mut self, r: &Reply) {
        r.write_to(&mut self.wbuf);
    }

    /// Queues raw octets (POP3 responses, message data).
    pub fn write(&mut self, bytes: &[u8]) {
        self.wbuf.extend_from_slice(bytes);
    }

    /// Octets queued and not yet sent.
    pub fn pending_output(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// True once a write failed or timed out.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Sends queued replies now, within the write timeout.
    pub async fn flush(&mut self) -> io::Result<()> {
        let t = self.write_timeout;
        self.flush_within(t).await
    }

    /// Sends queued output within `limit`. Cancel-safe: what was written
    /// is remembered, so a later flush sends only the rest.
    pub async fn flush_within(&mut self, limit: Duration) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "an earlier write failed",
            ));
        }
        let r = match tokio::time::timeout(limit, self.write_pending()).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer took no output within the write timeout",
            )),
        };
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    async fn write_pending(&mut self) -> io::Result<()> {
        while self.wpos < self.wbuf.len() {
            let n = self.stream.write(&self.wbuf[self.wpos..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.wpos += n;
        }
        self.wbuf.clear();
        self.wpos = 0;
        self.stream.flush().await
    }

    /// The end of a session: sends what is queued and closes, giving the
    /// peer at most `limit` to take it.
    pub async fn close(&mut self, limit: Duration) {
        let limit = limit.min(self.write_timeout);
        if self.flush_within(limit).await.is_ok() {
            let _ = tokio::time::timeout(limit, self.stream.shutdown()).await;
        }
    }

    /// Input received and not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.rbuf[self.rpos..]
    }

    pub fn consume(&mut self, n: usize) {
        self.rpos += n;
        if self.rpos == self.rbuf.len() {
            self.rbuf.clear();
            self.rpos = 0;
        }
    }

    /// Drops everything the client sent ahead (STARTTLS, RFC 3207 §4.2 and
    /// the injection attacks of CVE-2011-0411).
    pub fn discard_input(&mut self) -> usize {
        let n = self.rbuf.len() - self.rpos;
        self.rbuf.clear();
        self.rpos = 0;
        n
    }

    /// Reads more input, after sending any queued replies. Returns 0 at EOF.
    /// Cancel-safe once the replies are sent.
    pub async fn fill(&mut self) -> io::Result<usize> {
        self.flush().await?;
        if self.rpos > 0 {
            self.rbuf.drain(..self.rpos);
            self.rpos = 0;
        }
        // Into the spare capacity: cancelled (a select! that took another
        // branch), it leaves the buffer as it was.
        self.rbuf.reserve(READ_CHUNK);
        self.stream.read_buf(&mut self.rbuf).await
    }

    /// The next line of at most `max` octets including CRLF.
    pub async fn read_line(&mut self, max: usize) -> io::Result<Line> {
        if self.pending_output() >= OUTPUT_HIGH_WATER {
            self.flush().await?;
        }
        let mut discarding = false;
        loop {
            let buf = self.buffered();
            if let Some(lf) = buf.iter().position(|&b| b == b'\n') {
                let line = &buf[..lf];
                let result = if discarding || lf + 1 > max {
                    Line::TooLong
                } else if line.last() != Some(&b'\r') || line[..lf - 1].contains(&b'\r') {
                    Line::BareLf
                } else {
                    Line::Text(line[..lf - 1].to_vec())
                };
                self.consume(lf + 1);
                return Ok(result);
            }
            if buf.len() >= max {
                discarding = true;
                self.discard_input();
            }
            if self.fill().await? == 0 {
                return Ok(Line::Eof);
            }
        }
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    pub fn get_ref(&self) -> &S {
        &self.stream
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Codec<Conn<S>> {
    /// Runs the server side of a TLS handshake on the plain stream (implicit
    /// TLS, STARTTLS, STLS). Input buffered before it is dropped first.
    pub async fn tls_handshake(
        &mut self,
        acceptor: &tokio_rustls::TlsAcceptor,
        timeout: std::time::Duration,
    ) -> io::Result<()> {
        self.discard_input();
        let Conn::Plain(stream) = std::mem::replace(&mut self.stream, Conn::Gone) else {
            return Err(io::Error::other("TLS is already active"));
        };
        match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => {
                self.stream = Conn::Tls(Box::new(tls));
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        }
    }

    pub fn tls_active(&self) -> bool {
        matches!(self.stream, Conn::Tls(_))
    }
}

/// A connection that may be switched to TLS in the middle (STARTTLS).
/// A reply as the servers send it: a code, an enhanced status code
/// (empty for the greeting and EHLO), and its lines. The texts are in
/// `smtp::reply` and `pop3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code, e.g. "5.7.1"; empty for the greeting and EHLO.
    pub status: &'static str,
    pub lines: Vec<Cow<'static, str>>,
}

impl Reply {
    pub fn new(code: u16, status: &'static str, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            status,
            lines: vec![text.into()],
        }
    }

    pub fn multi(code: u16, lines: Vec<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            status: "",
            lines,
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// Appends the reply in wire form to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut s = String::new();
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            let _ = write!(s, "{}{}", self.code, sep);
            if !self.status.is_empty() {
                let _ = write!(s, "{} ", self.status);
            }
            s.push_str(line);
            s.push_str("\r\n");
        }
        out.extend_from_slice(s.as_bytes());
    }

    /// One line for logs.
    pub fn summary(&self) -> String {
        let text = self.lines.last().map(|l| l.as_ref()).unwrap_or("");
        if self.status.is_empty() {
            format!("{} {}", self.code, text)
        } else {
            format!("{} {} {}", self.code, self.status, text)
        }
    }
}

/// Any byte stream a session can run on (TCP, TLS, a connection whose
/// roles were turned around by ATRN), boxed where the type must not show.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

pub type BoxedIo = Box<dyn Io>;

pub enum Conn<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
    /// Only while switching.
    Gone,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// TLS version and cipher suite, for the Received header.
    pub fn tls_info(&self) -> Option<(String, String)> {
        match self {
            Conn::Tls(t) => {
                let (_, c) = t.get_ref();
                let v = c
                    .protocol_version()
                    .and_then(|v| v.as_str())
                    .unwrap_or("TLS")
                    .replace('_', ".");
                let s = c
                    .negotiated_cipher_suite()
                    .and_then(|s| s.suite().as_str())
                    .unwrap_or("unknown")
                    .to_string();
                Some((v, s))
            }
            _ => None,
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Conn::Plain($s) => $e,
            Conn::Tls($s) => $e,
            Conn::Gone => Poll::Ready(Err(io::Error::from(io::ErrorKind::NotConnected))),
        }
    };
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_and_limits() {
        let (client, server) = tokio::io::duplex(4096);
        let mut c = Codec::new(server);
        let mut client = client;
        let mut long = vec![b'x'; 600];
        long.extend_from_slice(b"\r\n");
        client.write_all(b"EHLO a\r\nNOOP\nRSET\r\n").await.unwrap();
        client.write_all(&long).await.unwrap();
        client.write_all(b"QU\rIT\r\nQUIT\r\n").await.unwrap();
        drop(client);
        assert_eq!(
            c.read_line(512).await.unwrap(),
            Line::Text(b"EHLO a".to_vec())
        );
        assert_eq!(c.read_line(512).await.unwrap(), Line::BareLf);
        assert_eq!(
            c.read_line(512).await.unwrap(),
            Line::Text(b"RSET".to_vec())
        );
        assert_eq!(c.read_line(512).await.unwrap(), Line::TooLong);
        assert_eq!(c.read_line(512).await.unwrap(), Line::BareLf);
        assert_eq!(
            c.read_line(512).await.unwrap(),
            Line::Text(b"QUIT".to_vec())
        );
        assert_eq!(c.read_line(512).await.unwrap(), Line::Eof);
    }

    #[tokio::test]
    async fn replies_wait_until_input_is_drained() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut c = Codec::new(server);
        client.write_all(b"NOOP\r\nNOOP\r\n").await.unwrap();
        assert!(matches!(c.read_line(512).await.unwrap(), Line::Text(_)));
        c.reply(&crate::smtp::reply::ok());
        assert!(matches!(c.read_line(512).await.unwrap(), Line::Text(_)));
        c.reply(&crate::smtp::reply::ok());
        // Nothing was written yet: both replies go in the flush before the next read.
        let mut probe = [0u8; 64];
        let nothing = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            client.read(&mut probe),
        )
        .await;
        assert!(nothing.is_err());
        c.flush().await.unwrap();
        let n = client.read(&mut probe).await.unwrap();
        assert_eq!(&probe[..n], b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n");
    }

    #[tokio::test]
    async fn a_peer_that_takes_no_output_times_the_write_out() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut c = Codec::new(server);
        c.set_write_timeout(Duration::from_millis(50));
        c.write(&[b'x'; 1000]);
        let e = c.flush().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(c.is_broken());
        // Nothing more is tried, and a read reports the broken write.
        c.write(b"more");
        assert!(c.flush().await.is_err());
        client.write_all(b"NOOP\r\n").await.unwrap();
        assert!(c.read_line(512).await.is_err());
    }

    #[tokio::test]
    async fn a_flush_cut_short_goes_on_where_it_stopped() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut c = Codec::new(server);
        let out: Vec<u8> = (0..200u8).collect();
        c.write(&out);
        // Cancelled from outside (a read timeout around it) after 64 octets.
        let cut = tokio::time::timeout(Duration::from_millis(20), c.flush()).await;
        assert!(cut.is_err());
        assert_eq!(c.pending_output(), 200 - 64);
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 200];
            client.read_exact(&mut got).await.unwrap();
            got
        });
        c.flush().await.unwrap();
        assert_eq!(reader.await.unwrap(), out, "every octet once, in order");
    }

    #[tokio::test]
    async fn pipelined_replies_are_not_buffered_without_bound() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut c = Codec::new(server);
        client.write_all(&b"HELP\r\n".repeat(10_000)).await.unwrap();
        let mut most = 0;
        for _ in 0..10_000 {
            assert!(matches!(c.read_line(512).await.unwrap(), Line::Text(_)));
            c.write(&[b'r'; 90]);
            most = most.max(c.pending_output());
        }
        assert!(most <= OUTPUT_HIGH_WATER + 90, "{most}");
    }
}
