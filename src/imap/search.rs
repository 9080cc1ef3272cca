//! SEARCH (RFC 9051 §6.4.4): which messages of the selected folder match.
//! Flags, sizes and dates come from the folder's rows; headers and text
//! need the message, which is read only when a key asks for it.

use chrono::{DateTime, NaiveDate, Utc};
use imap_next::imap_types::search::SearchKey;

use super::mime::Parsed;
use super::wire::{astring, contains};
use crate::queue::MailboxEntry;

/// One message as SEARCH sees it.
pub struct Candidate<'a> {
    pub seq: u32,
    pub entry: &'a MailboxEntry,
    /// The highest sequence number and UID in the folder (`*`).
    pub last_seq: u32,
    pub last_uid: u32,
    /// The message, parsed, when a key needs its content
    /// ([`needs_content`]); None when it is not needed or is gone.
    pub message: Option<&'a Parsed<'a>>,
}

impl Candidate<'_> {
    fn with_message<T>(&self, f: impl FnOnce(&Parsed<'_>) -> T) -> Option<T> {
        self.message.map(f)
    }
}

/// Whether the key needs the message's content.
pub fn needs_content(key: &SearchKey<'_>) -> bool {
    use SearchKey::*;
    match key {
        And(keys) => keys.as_ref().iter().any(needs_content),
        Or(a, b) => needs_content(a) || needs_content(b),
        Not(k) => needs_content(k),
        Bcc(_) | Body(_) | Cc(_) | From(_) | Header(..) | SentBefore(_) | SentOn(_)
        | SentSince(_) | Subject(_) | Text(_) | To(_) => true,
        _ => false,
    }
}

fn day(at: i64) -> NaiveDate {
    DateTime::<Utc>::from_timestamp(at, 0)
        .map(|d| d.date_naive())
        .unwrap_or_default()
}

fn header_has(c: &Candidate<'_>, name: &str, needle: &str) -> bool {
    let needle = needle.to_lowercase();
    c.with_message(|p| {
        p.header_values(name)
            .iter()
            .any(|v| v.to_lowercase().contains(&needle))
    })
    .unwrap_or(false)
}

pub fn matches(key: &SearchKey<'_>, c: &Candidate<'_>) -> bool {
    use SearchKey::*;
    let e = c.entry;
    match key {
        And(keys) => keys.as_ref().iter().all(|k| matches(k, c)),
        Or(a, b) => matches(a, c) || matches(b, c),
        Not(k) => !matches(k, c),
        SequenceSet(set) => contains(set, c.seq, c.last_seq),
        Uid(set) => contains(set, e.imap_uid, c.last_uid),
        All => true,
        Answered => e.has_flag("\\Answered"),
        Unanswered => !e.has_flag("\\Answered"),
        Deleted => e.has_flag("\\Deleted"),
        Undeleted => !e.has_flag("\\Deleted"),
        Draft => e.has_flag("\\Draft"),
        Undraft => !e.has_flag("\\Draft"),
        Flagged => e.has_flag("\\Flagged"),
        Unflagged => !e.has_flag("\\Flagged"),
        Seen | Old => e.has_flag("\\Seen") || matches!(key, Old),
        Unseen => !e.has_flag("\\Seen"),
        // No message is \Recent here (IMAP4rev2 dropped it).
        New | Recent => false,
        Keyword(k) => e.has_flag(k.as_ref()),
        Unkeyword(k) => !e.has_flag(k.as_ref()),
        Larger(n) => e.size() > i64::from(*n),
        Smaller(n) => e.size() < i64::from(*n),
        Before(d) => day(e.delivered_at) < *d.as_ref(),
        On(d) => day(e.delivered_at) == *d.as_ref(),
        Since(d) => day(e.delivered_at) >= *d.as_ref(),
        SentBefore(d) | SentOn(d) | SentSince(d) => {
            let Some(Some(sent)) = c.with_message(|p| p.sent_date()) else {
                return false;
            };
            let sent = day(sent);
            match key {
                SentBefore(_) => sent < *d.as_ref(),
                SentOn(_) => sent == *d.as_ref(),
                _ => sent >= *d.as_ref(),
            }
        }
        From(s) => header_has(c, "From", &astring(s)),
        To(s) => header_has(c, "To", &astring(s)),
        Cc(s) => header_has(c, "Cc", &astring(s)),
        Bcc(s) => header_has(c, "Bcc", &astring(s)),
        Subject(s) => header_has(c, "Subject", &astring(s)),
        Header(name, s) => {
            let (name, s) = (astring(name), astring(s));
            if s.is_empty() {
                // RFC 9051 §6.4.4: an empty string matches every message
                // that has the field.
                c.with_message(|p| !p.header_values(&name).is_empty())
                    .unwrap_or(false)
            } else {
                header_has(c, &name, &s)
            }
        }
        Body(s) => {
            let s = astring(s);
            c.with_message(|p| p.body_contains(&s, false))
                .unwrap_or(false)
        }
        Text(s) => {
            let s = astring(s);
            c.with_message(|p| p.body_contains(&s, true))
                .unwrap_or(false)
        }
        #[allow(unreachable_patterns)]
        _ => false,
    }
}
