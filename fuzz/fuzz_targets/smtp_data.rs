//! The DATA and BDAT readers (`smtp::data`): what a client sends after
//! DATA, or as BDAT chunks, turned into the stored message.
//!
//! Input: one octet choosing the chunk size, then the raw octets from the
//! client. Asserts that
//! - an accepted message has CRLF line ends only, no NUL, no line over the
//!   limit, at most the size limit and the hop limit, and ends with CRLF;
//! - the result and the end of DATA do not depend on how the input was cut;
//! - only `CRLF . CRLF` ends DATA, and the reader stops right after it;
//! - dot-stuffing an accepted message and reading it back gives it again,
//!   and the stuffed copy ends DATA exactly at its own end;
//! - BDAT (`Canonical`) accepts exactly what is already canonical, and
//!   stores it unchanged (completed with CRLF);
//! - what a checkpoint keeps of an interrupted transfer is a prefix of the
//!   message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::smtp::data::{dot_stuff, Canonical, Collect, ContentError, DotReader, Limits};

/// Small limits, so that the fuzzer reaches them.
const LIMITS: Limits = Limits {
    size: 4096,
    line: 80,
    hops: 3,
};

/// Reads DATA content fed in chunks of `step`, handing the content on
/// after every other chunk (as a session spools it): the result and the
/// octets used (None: no end).
fn read(input: &[u8], step: usize) -> (Result<Vec<u8>, ContentError>, Option<usize>) {
    let mut r = DotReader::new(LIMITS);
    let mut used = 0;
    let mut out = Vec::new();
    let mut kept: Option<usize> = None;
    for (i, chunk) in input.chunks(step).enumerate() {
        let end = r.feed(chunk);
        if i % 2 == 1 {
            out.extend(r.take_output());
        }
        if let Some(n) = end {
            let body = r.finish().map(|tail| {
                out.extend(tail);
                out
            });
            if let (Ok(body), Some(k)) = (&body, kept) {
                assert!(k <= body.len(), "a checkpoint kept more than the message");
            }
            return (body, Some(used + n));
        }
        used += chunk.len();
        // What a checkpoint would keep: whole lines, a prefix of the message.
        kept = r.complete_lines();
        if let Some(k) = kept {
            let mut so_far = out.clone();
            so_far.extend(r.take_output());
            out = so_far;
            assert!(k <= out.len(), "a checkpoint keeps content not taken");
            assert!(k == 0 || out[..k].ends_with(b"\r\n"), "not whole lines");
        }
    }
    (r.finish(), None)
}

/// The invariants of a stored message.
fn check_canonical(body: &[u8]) {
    assert!(body.len() <= LIMITS.size + 2, "over the size limit");
    assert!(!body.contains(&0), "NUL stored");
    assert!(body.is_empty() || body.ends_with(b"\r\n"), "no final CRLF");
    for (i, &b) in body.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(body.get(i + 1), Some(&b'\n'), "bare CR stored at {i}"),
            b'\n' => assert!(i > 0 && body[i - 1] == b'\r', "bare LF stored at {i}"),
            _ => {}
        }
    }
    let mut in_header = true;
    let mut hops = 0;
    for line in body.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        assert!(line.len() + 1 <= LIMITS.line, "line over the limit");
        if line == b"\r" {
            in_header = false;
        }
        if in_header && line.len() > 9 && line[..9].eq_ignore_ascii_case(b"received:") {
            hops += 1;
        }
    }
    assert!(hops <= LIMITS.hops, "more Received fields than allowed");
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let step = usize::from(first % 17) + 1;

    // DATA: the same result however the input is cut.
    let (whole, used) = read(input, input.len().max(1));
    let (cut, used_cut) = read(input, step);
    assert_eq!(whole, cut, "the result depends on the chunk size {step}");
    assert_eq!(used, used_cut, "the end depends on the chunk size {step}");
    if let Some(n) = used {
        // Only CRLF . CRLF ends DATA (or . CRLF as the very first line).
        let data = &input[..n];
        assert!(
            data == b".\r\n" || data.ends_with(b"\r\n.\r\n"),
            "DATA ended without CRLF.CRLF: {:?}",
            String::from_utf8_lossy(&data[data.len().saturating_sub(8)..])
        );
        // ... and the first one does.
        let first_end = input
            .windows(5)
            .position(|w| w == b"\r\n.\r\n")
            .map(|p| p + 5);
        let expected = if input.starts_with(b".\r\n") {
            Some(3)
        } else {
            first_end
        };
        assert_eq!(Some(n), expected, "DATA did not end at the first CRLF.CRLF");
    } else {
        assert!(!input.starts_with(b".\r\n") && !input.windows(5).any(|w| w == b"\r\n.\r\n"));
    }
    if let Ok(body) = &whole {
        check_canonical(body);
        if used.is_some() {
            // Sent on (SMTP DATA, POP3 RETR): stuffed, it reads back the same
            // and ends exactly at the final dot.
            let mut wire = dot_stuff(body);
            wire.extend_from_slice(b".\r\n");
            let mut again = DotReader::new(Limits {
                size: usize::MAX,
                line: usize::MAX,
                hops: usize::MAX,
            });
            assert_eq!(
                again.feed(&wire),
                Some(wire.len()),
                "stuffed copy ends early"
            );
            assert_eq!(&again.finish().expect("stuffed copy refused"), body);
        }
    }

    // BDAT: the same octets as one message in chunks.
    let mut c = Canonical::new(LIMITS);
    let mut handed = Vec::new();
    for chunk in input.chunks(step) {
        c.extend(chunk);
        handed.extend(c.take_output());
        if let Some(n) = c.accepted() {
            assert_eq!(n, handed.len(), "BDAT lost count of its content");
            assert!(input.starts_with(&handed), "BDAT changed the content");
        }
    }
    assert_eq!(c.size(), input.len());
    match c.finish() {
        Ok(tail) => {
            let mut body = handed;
            body.extend(tail);
            check_canonical(&body);
            assert!(
                body == input || (body.len() == input.len() + 2 && body.starts_with(input)),
                "BDAT changed the content"
            );
        }
        Err(e) => {
            // A refusal has its reason in the input.
            let bare = input.iter().enumerate().any(|(i, &b)| match b {
                b'\r' => input.get(i + 1) != Some(&b'\n'),
                b'\n' => i == 0 || input[i - 1] != b'\r',
                _ => false,
            });
            match e {
                ContentError::BareCr | ContentError::BareLf => assert!(bare),
                ContentError::Nul => assert!(input.contains(&0)),
                ContentError::TooBig => assert!(input.len() > LIMITS.size),
                ContentError::LineTooLong | ContentError::TooManyHops => {}
            }
        }
    }
});
