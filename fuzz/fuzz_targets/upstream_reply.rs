//! What the upstream says: replies read as they arrive
//! (`relay::client::ReplyReader`, the reader the client's sessions use),
//! their enhanced status codes, and the extensions of an EHLO reply
//! (`Extensions::parse`).
//!
//! Input: one octet choosing the read size, then the octets the upstream
//! sends. Asserts that
//! - every reply has a code from 200 to 599 and stays within the bounds
//!   (lines, octets), and the reader holds no more than a line's bound;
//! - a reply written back in wire form reads as the same reply;
//! - an enhanced status code found is the reply's first word and is
//!   `class.subject.detail`;
//! - the extensions of a reply, written as an EHLO reply of their own,
//!   read as the same extensions.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::relay::client::{Extensions, ReplyReader, UpstreamReply};

const MAX_REPLY_LINE: usize = 4096;

/// The reply as an upstream sends it.
fn wire(r: &UpstreamReply) -> Vec<u8> {
    let lines: Vec<&str> = r.text.split('\n').collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let sep = if i + 1 == lines.len() { ' ' } else { '-' };
        out.extend_from_slice(format!("{}{sep}{line}\r\n", r.code).as_bytes());
    }
    out
}

fn read_one(bytes: &[u8]) -> Result<Option<UpstreamReply>, &'static str> {
    let mut buf = bytes.to_vec();
    let r = ReplyReader::default().take(&mut buf);
    if let Ok(Some(_)) = r {
        assert!(buf.is_empty(), "octets left after a reply read back");
    }
    r
}

fn same_extensions(a: &Extensions, b: &Extensions) -> bool {
    a.summary() == b.summary()
}

/// `e` as an EHLO reply.
fn ehlo_of(e: &Extensions) -> UpstreamReply {
    let mut lines = vec!["upstream.example greets us".to_string()];
    for (on, name) in [
        (e.pipelining, "PIPELINING"),
        (e.chunking, "CHUNKING"),
        (e.eightbit, "8BITMIME"),
        (e.smtputf8, "SMTPUTF8"),
        (e.dsn, "DSN"),
        (e.starttls, "STARTTLS"),
        (e.checkpoint, "CHECKPOINT"),
    ] {
        if on {
            lines.push(name.into());
        }
    }
    if let Some(size) = e.size {
        lines.push(format!("SIZE {size}"));
    }
    let mut auth = Vec::new();
    if e.auth_plain {
        auth.push("PLAIN");
    }
    if e.auth_login {
        auth.push("LOGIN");
    }
    if !auth.is_empty() {
        lines.push(format!("AUTH {}", auth.join(" ")));
    }
    UpstreamReply {
        code: 250,
        text: lines.join("\n"),
    }
}

fn check(reply: &UpstreamReply) {
    assert!((200..600).contains(&reply.code));
    let n = reply.text.split('\n').count();
    assert!(n <= 201, "{n} lines in one reply");
    assert!(reply.text.len() <= (64 << 10) + MAX_REPLY_LINE);
    // Written back, the same reply.
    assert_eq!(read_one(&wire(reply)), Ok(Some(reply.clone())));
    if let Some(status) = reply.status() {
        assert_eq!(reply.text.split_whitespace().next(), Some(status));
        let parts: Vec<&str> = status.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert!(matches!(parts[0], "2" | "4" | "5"));
        assert!(parts
            .iter()
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit())));
    }
    let _ = reply.to_string();
    let ext = Extensions::parse(reply);
    let again = Extensions::parse(&ehlo_of(&ext));
    assert!(
        same_extensions(&ext, &again),
        "{} read back as {}",
        ext.summary(),
        again.summary()
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let step = usize::from(first) + 1;
    let mut buf = Vec::new();
    let mut reader = ReplyReader::default();
    for chunk in input.chunks(step) {
        buf.extend_from_slice(chunk);
        match reader.take(&mut buf) {
            Ok(Some(reply)) => {
                check(&reply);
                reader = ReplyReader::default();
            }
            Ok(None) => assert!(buf.len() <= MAX_REPLY_LINE),
            Err(_) => return,
        }
        // Several replies may have come in one read (pipelining).
        while !buf.is_empty() {
            match reader.take(&mut buf) {
                Ok(Some(reply)) => {
                    check(&reply);
                    reader = ReplyReader::default();
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
