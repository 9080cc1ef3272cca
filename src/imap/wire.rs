//! The small pieces of IMAP's syntax the session writes itself: strings,
//! status lines, sequence sets, LIST patterns. Commands are parsed by
//! imap-codec (through imap-next); FETCH responses are encoded by it.

use std::fmt::Write;
use std::num::NonZeroU32;

use imap_next::imap_types::{
    core::AString,
    flag::Flag,
    mailbox::{ListMailbox, Mailbox},
    sequence::{SeqOrUid, Sequence, SequenceSet},
};

/// The hierarchy delimiter of folder names.
pub const DELIMITER: char = '/';

/// The system flags a client may set (RFC 9051 §2.3.2).
pub const SYSTEM_FLAGS: &str = "\\Answered \\Flagged \\Deleted \\Seen \\Draft";

/// `s` as an IMAP string: quoted when it can be, a literal otherwise
/// (8-bit, CR, LF, or too long for a quoted string).
pub fn string(s: &str) -> String {
    let quotable = s.len() < 1024 && s.bytes().all(|b| (0x20..0x7f).contains(&b) || b == b'\t');
    if quotable {
        let mut out = String::with_capacity(s.len() + 2);
        out.push('"');
        for c in s.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        out
    } else {
        format!("{{{}}}\r\n{s}", s.len())
    }
}

/// Text for the end of a status line: one line, printable.
pub fn text(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A folder name as the client gave it (INBOX in any case is INBOX).
pub fn mailbox_name(m: &Mailbox<'_>) -> String {
    match m {
        Mailbox::Inbox => crate::queue::INBOX.to_string(),
        Mailbox::Other(o) => {
            let raw = String::from_utf8_lossy(o.as_ref()).into_owned();
            crate::queue::canonical_folder(&raw).to_string()
        }
    }
}

/// A name for a folder to be made (CREATE, RENAME's new name): without a
/// trailing delimiter (RFC 9051 §6.3.4); None when it is not one that can
/// be made (empty, an empty level, INBOX, a control character).
pub fn new_folder_name(name: &str) -> Option<String> {
    let name = name.strip_suffix(DELIMITER).unwrap_or(name);
    let bad = name.is_empty()
        || name == crate::queue::INBOX
        || name.split(DELIMITER).any(str::is_empty)
        || name.chars().any(char::is_control);
    (!bad).then(|| name.to_string())
}

pub fn astring(a: &AString<'_>) -> String {
    String::from_utf8_lossy(a.as_ref()).into_owned()
}

/// The pattern LIST and LSUB match names against: the reference, then the
/// wildcard name (RFC 9051 §6.3.9).
pub fn list_pattern(reference: &Mailbox<'_>, wildcard: &ListMailbox<'_>) -> String {
    let wildcard = match wildcard {
        ListMailbox::Token(t) => String::from_utf8_lossy(t.as_ref()),
        ListMailbox::String(s) => String::from_utf8_lossy(s.as_ref()),
    };
    format!("{}{wildcard}", mailbox_name(reference))
}

/// Whether `name` matches a LIST pattern (RFC 9051 §6.3.9): `*` matches
/// anything, `%` anything but the delimiter; INBOX in any case.
pub fn matches(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some(('*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some(('%', rest)) => (0..=n.len())
                .take_while(|&i| i == 0 || n[i - 1] != DELIMITER)
                .any(|i| go(rest, &n[i..])),
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    let (pattern, name) = if name == crate::queue::INBOX && pattern.eq_ignore_ascii_case("inbox") {
        (crate::queue::INBOX.to_string(), name)
    } else {
        (pattern.to_string(), name)
    };
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

/// Whether `n` is in the set, `*` being `largest` (RFC 9051 §9: a range's
/// ends may come in either order).
pub fn contains(set: &SequenceSet, n: u32, largest: u32) -> bool {
    let value = |v: &SeqOrUid| match v {
        SeqOrUid::Value(v) => v.get(),
        SeqOrUid::Asterisk => largest,
    };
    set.0.as_ref().iter().any(|s| match s {
        Sequence::Single(v) => value(v) == n,
        Sequence::Range(a, b) => {
            let (a, b) = (value(a), value(b));
            (a.min(b)..=a.max(b)).contains(&n)
        }
    })
}

/// UIDs as a compact set for COPYUID (`3:5,9`), in the order given.
pub fn uid_set(uids: impl IntoIterator<Item = u32>) -> String {
    let mut out = String::new();
    let mut run: Option<(u32, u32)> = None;
    let flush = |out: &mut String, (a, b): (u32, u32)| {
        if !out.is_empty() {
            out.push(',');
        }
        if a == b {
            let _ = write!(out, "{a}");
        } else {
            let _ = write!(out, "{a}:{b}");
        }
    };
    for u in uids {
        run = match run {
            Some((a, b)) if u == b + 1 => Some((a, u)),
            Some(r) => {
                flush(&mut out, r);
                Some((u, u))
            }
            None => Some((u, u)),
        };
    }
    if let Some(r) = run {
        flush(&mut out, r);
    }
    out
}

/// A flag as stored; None for one a client may not set (`\Recent`, an
/// unknown system flag).
pub fn flag_name(f: &Flag<'_>) -> Option<String> {
    match f {
        Flag::Answered => Some("\\Answered".into()),
        Flag::Deleted => Some("\\Deleted".into()),
        Flag::Draft => Some("\\Draft".into()),
        Flag::Flagged => Some("\\Flagged".into()),
        Flag::Seen => Some("\\Seen".into()),
        Flag::Keyword(k) => Some(k.as_ref().to_string()),
        Flag::Extension(_) => None,
    }
}

pub fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_quoted_or_literal() {
        assert_eq!(string("Sent"), "\"Sent\"");
        assert_eq!(string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(string("Entwürfe"), "{9}\r\nEntwürfe");
        assert_eq!(string("a\r\nb"), "{4}\r\na\r\nb");
    }

    #[test]
    fn names_for_new_folders() {
        assert_eq!(new_folder_name("Work/").as_deref(), Some("Work"));
        assert_eq!(new_folder_name("a/b").as_deref(), Some("a/b"));
        for bad in ["", "/", "x//y", "/x", "INBOX", "a\tb"] {
            assert_eq!(new_folder_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn list_patterns() {
        assert!(matches("*", "Archive/2026"));
        assert!(!matches("%", "Archive/2026"));
        assert!(matches("%", "Archive"));
        assert!(matches("Archive/%", "Archive/2026"));
        assert!(matches("inbox", "INBOX"));
        assert!(matches("*", "INBOX"));
        assert!(!matches("Sent", "Sent2"));
        assert!(matches("S%t", "Sent"));
    }

    #[test]
    fn sets() {
        let s: SequenceSet = "2:4,7,9:*".parse().unwrap();
        for (n, want) in [
            (1, false),
            (2, true),
            (4, true),
            (5, false),
            (7, true),
            (12, true),
        ] {
            assert_eq!(contains(&s, n, 12), want, "{n}");
        }
        let s: SequenceSet = "5:2".parse().unwrap();
        assert!(contains(&s, 3, 10));
        assert_eq!(uid_set([3, 4, 5, 9, 11, 12]), "3:5,9,11:12");
        assert_eq!(uid_set([7]), "7");
    }
}
