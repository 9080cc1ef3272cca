//! SMTP command lines: the codec's line reader (`codec::Codec::read_line`,
//! 512 octets as the session reads them) and the parser the session runs
//! on each line (`smtp::session::parse_command`).
//!
//! Input: what a client sends, cut into reads of a size taken from the
//! first octet. Asserts that
//! - a line handed to the parser has no CR, LF and is within the limit,
//!   and the lines and refusals account for all the input;
//! - a refused command gets a well-formed reply: one or more lines of
//!   `code[- ]text` CRLF, a 5xx code, no control characters;
//! - an address from MAIL or RCPT, written as it goes upstream
//!   (`address::smtp_path`), is read back as the same address with no
//!   parameter added (no parameter smuggling through a quoted local part);
//! - an AUTH PLAIN initial response that decodes to a user and password
//!   encodes back to the same pair.
#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use libfuzzer_sys::fuzz_target;
use outpost::codec::{Codec, Line, Reply};
use outpost::smtp::session::parse_command;
use smtp_proto::Request;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client: `data` handed out `step` octets per read; writes vanish.
struct Client<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Client<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.data.len().min(self.step).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Client<'_> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

/// RFC 5321 §4.5.3.1.4, as the session reads commands.
const MAX_COMMAND: usize = 512;

fn check_reply(r: &Reply) {
    let mut wire = Vec::new();
    r.write_to(&mut wire);
    assert!((500..600).contains(&r.code), "refusal with code {}", r.code);
    assert!(wire.ends_with(b"\r\n"));
    let lines: Vec<&[u8]> = wire[..wire.len() - 2].split(|&b| b == b'\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let line = if i + 1 < lines.len() {
            line.strip_suffix(b"\r").expect("bare LF in a reply")
        } else {
            line
        };
        assert!(
            !line.iter().any(|&b| b < 0x20 || b == 0x7f),
            "control character in a reply: {:?}",
            String::from_utf8_lossy(line)
        );
        assert!(line.len() >= 4 && line.starts_with(r.code.to_string().as_bytes()));
        let sep = if i + 1 == lines.len() { b' ' } else { b'-' };
        assert_eq!(line[3], sep);
        assert!(line.len() + 2 <= MAX_COMMAND, "reply line over 512 octets");
    }
}

/// `address` as the relay client writes it upstream, read back.
fn round_trip(command: &str, address: &str, rcpt: bool) {
    let Some(path) = outpost::address::smtp_path(address) else {
        return; // The client refuses to send it (control characters).
    };
    let mut line = format!("{command}<{path}>").into_bytes();
    if !address.is_ascii() {
        line.extend_from_slice(if rcpt { b"" } else { b" SMTPUTF8" });
    }
    match parse_command(&mut line) {
        Ok(Request::Mail { from }) if !rcpt => {
            assert_eq!(from.address, address, "sent as {path:?}");
            assert!(from.env_id.is_none() && from.trans_id.is_none() && from.size == 0);
        }
        Ok(Request::Rcpt { to }) if rcpt => {
            assert_eq!(to.address, address, "sent as {path:?}");
            assert!(to.orcpt.is_none() && to.flags == 0);
        }
        // What smtp-proto reads but its own writer cannot give back (say
        // an address literal it does not check) is not ours to judge;
        // what matters is that it never reads as another command.
        Ok(other) => panic!("{address:?} sent as {path:?} reads as {other:?}"),
        Err(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let step = usize::from(first) + 1;
    let mut codec = Codec::new(Client { data: input, step });
    let mut seen = 0;
    loop {
        let line = runtime()
            .block_on(codec.read_line(MAX_COMMAND))
            .expect("reads from memory do not fail");
        let mut text = match line {
            Line::Eof => break,
            Line::TooLong | Line::BareLf => {
                seen += 1;
                continue;
            }
            Line::Text(t) => t,
        };
        seen += 1;
        assert!(text.len() + 2 <= MAX_COMMAND, "line over the limit");
        assert!(!text.contains(&b'\r') && !text.contains(&b'\n'));
        if text.contains(&0) {
            continue; // The session refuses it before parsing.
        }
        match parse_command(&mut text) {
            Err(r) => check_reply(&r),
            Ok(Request::Mail { from }) => round_trip("MAIL FROM:", &from.address, false),
            Ok(Request::Rcpt { to }) => round_trip("RCPT TO:", &to.address, true),
            Ok(Request::Auth {
                initial_response, ..
            }) => {
                let Some(decoded) = outpost::auth::decode_b64(&initial_response) else {
                    continue;
                };
                if let Some((user, pass)) = outpost::auth::parse_plain(&decoded) {
                    let again = outpost::auth::encode_b64(format!("\0{user}\0{pass}").as_bytes());
                    let back = outpost::auth::decode_b64(&again).expect("own encoding");
                    assert_eq!(
                        outpost::auth::parse_plain(&back),
                        Some((user, pass)),
                        "PLAIN does not round-trip"
                    );
                }
            }
            Ok(_) => {}
        }
    }
    // Every LF ended one line (or one refusal); what is left at the end
    // is a line the client never finished.
    let lfs = input.iter().filter(|&&b| b == b'\n').count();
    assert!(seen <= lfs);
    assert!(!codec.buffered().contains(&b'\n'));
});
