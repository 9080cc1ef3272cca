//! POP3 commands: the codec's line reader (1024 octets, as the POP3
//! session reads them), the command split (`pop3::split_command`), AUTH
//! PLAIN decoding, and what RETR and TOP send (`pop3::top`, the
//! Return-Path line, dot-stuffing).
//!
//! Input: command lines, then a NUL, then a message as it would be stored
//! (it is stored only when the strict reader accepts it). Asserts that
//! - the keyword is one upper-case word and the argument is trimmed;
//! - TOP gives a prefix of the message that grows with the line count;
//! - the multi-line response to RETR/TOP ends at its own final dot: a
//!   client reading it gets back exactly the Return-Path line and the
//!   message (or its top), whatever the message holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::dotstuff::DotStuffer;
use outpost::pop3::{split_command, top};
use outpost::queue::MailboxEntry;
use outpost::smtp::data::{Canonical, DotReader, Limits};

/// As the session sends a message: Return-Path, then the part, stuffed.
fn response(entry: &MailboxEntry, part: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut s = DotStuffer::default();
    s.push(&mut out, entry.return_path().as_bytes());
    // In pieces, as the session writes it.
    for piece in part.chunks(7) {
        s.push(&mut out, piece);
    }
    s.finish(&mut out);
    out.extend_from_slice(b".\r\n");
    out
}

fn check_retrieval(entry: &MailboxEntry, message: &[u8], lines: Option<usize>) {
    let part = match lines {
        Some(n) => {
            let t = top(message, n);
            assert!(message.starts_with(t), "TOP is not a prefix");
            if n > 0 {
                assert!(top(message, n - 1).len() <= t.len(), "TOP shrank");
            }
            t
        }
        None => message,
    };
    let wire = response(entry, part);
    // A client reads it as the multi-line response it is (RFC 1939 §3).
    let mut r = DotReader::new(Limits {
        size: usize::MAX,
        line: usize::MAX,
        hops: usize::MAX,
    });
    assert_eq!(r.feed(&wire), Some(wire.len()), "the response ends early");
    let got = r.finish().expect("a response a strict client refuses");
    let mut expected = entry.return_path().into_bytes();
    expected.extend_from_slice(part);
    if !part.is_empty() && !part.ends_with(b"\r\n") {
        expected.extend_from_slice(b"\r\n");
    }
    assert_eq!(got, expected);
}

fuzz_target!(|data: &[u8]| {
    let (commands, stored) = match data.iter().position(|&b| b == 0) {
        Some(p) => (&data[..p], &data[p + 1..]),
        None => (data, &[][..]),
    };
    // Only what the strict reader takes is ever stored.
    let mut c = Canonical::new(Limits::with_size(1 << 16));
    c.extend(stored);
    let message = c.finish().ok();
    let entry = MailboxEntry {
        id: 1,
        uid: "4HkQ2mX9cVb".into(),
        imap_uid: 1,
        flags: String::new(),
        sender: "sender@branch.example".into(),
        stored_size: message.as_ref().map_or(0, |m| m.len() as i64),
        delivered_at: 0,
        appended: false,
    };
    for line in commands.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > 1024 || line.contains(&b'\r') {
            continue; // The codec refuses it.
        }
        let (verb, arg) = split_command(line);
        assert!(!verb.contains(' '), "keyword {verb:?}");
        assert_eq!(verb, verb.to_ascii_uppercase());
        assert_eq!(arg, arg.trim());
        let args: Vec<&str> = arg.split_whitespace().collect();
        match verb.as_str() {
            "AUTH" | "PASS" => {
                if let Some((user, _)) = outpost::auth::decode_b64(args.get(1).unwrap_or(&""))
                    .and_then(|d| outpost::auth::parse_plain(&d))
                {
                    assert!(!user.is_empty());
                }
            }
            "RETR" | "TOP" => {
                let Some(m) = &message else { continue };
                let lines = if verb == "TOP" {
                    match args.get(1).and_then(|n| n.parse::<usize>().ok()) {
                        Some(n) => Some(n),
                        None => continue,
                    }
                } else {
                    None
                };
                check_retrieval(&entry, m, lines);
            }
            _ => {}
        }
    }
    if let Some(m) = &message {
        check_retrieval(&entry, m, None);
        for n in [0, 1, 2, 1000] {
            check_retrieval(&entry, m, Some(n));
        }
    }
});
