//! FETCH responses (RFC 9051 §6.4.5, §7.5.2): built as imap-types values
//! and encoded by imap-codec, so that strings, literals, envelopes and body
//! structures are always well-formed.

use std::num::NonZeroU32;

use chrono::{DateTime, FixedOffset};
use imap_codec::encode::Encoder;
use imap_codec::imap_types::{
    core::{IString, Literal, NString},
    datetime::DateTime as ImapDateTime,
    fetch::{MessageDataItem, MessageDataItemName, Section},
    flag::{Flag, FlagFetch},
    response::{Data, Response},
    ToStatic,
};
use imap_codec::ResponseCodec;

use super::mime::Parsed;
use super::wire::nz;
use crate::queue::MailboxEntry;

/// Whether any item needs the message's content.
pub fn needs_body(items: &[MessageDataItemName<'_>]) -> bool {
    items.iter().any(|i| {
        !matches!(
            i,
            MessageDataItemName::Flags
                | MessageDataItemName::Uid
                | MessageDataItemName::Rfc822Size
                | MessageDataItemName::InternalDate
        )
    })
}

/// Whether fetching the items sets \Seen (RFC 9051 §6.4.5: BODY[...]
/// without PEEK, RFC822, RFC822.TEXT).
pub fn sets_seen(items: &[MessageDataItemName<'_>]) -> bool {
    items.iter().any(|i| {
        matches!(
            i,
            MessageDataItemName::BodyExt { peek: false, .. }
                | MessageDataItemName::Rfc822
                | MessageDataItemName::Rfc822Text
        )
    })
}

fn literal(bytes: Vec<u8>) -> NString<'static> {
    // A literal cannot carry NUL (RFC 9051 §4.3); such a message is sent
    // without them rather than not at all.
    let lit = match Literal::try_from(bytes) {
        Ok(l) => l,
        Err(_) => Literal::unvalidated(Vec::new()),
    };
    NString(Some(IString::Literal(lit)))
}

fn literal_of(bytes: &[u8]) -> NString<'static> {
    if bytes.contains(&0) {
        return literal(bytes.iter().copied().filter(|b| *b != 0).collect());
    }
    literal(bytes.to_vec())
}

fn flags(entry: &MailboxEntry) -> Vec<FlagFetch<'static>> {
    entry
        .flags
        .split(' ')
        .filter_map(|f| Flag::try_from(f).ok().map(|f| f.to_static()))
        .map(FlagFetch::from)
        .collect()
}

fn internal_date(at: i64) -> ImapDateTime {
    let utc = FixedOffset::east_opt(0).expect("UTC offset");
    let d = DateTime::from_timestamp(at, 0)
        .unwrap_or_default()
        .with_timezone(&utc);
    ImapDateTime::unvalidated(d)
}

/// One `* n FETCH (...)` response for `entry` (sequence number `seq`),
/// `raw` being the message when an item needs it. A UID FETCH always
/// carries the UID, and FLAGS when the fetch set \Seen.
pub fn response(
    seq: u32,
    entry: &MailboxEntry,
    raw: Option<&[u8]>,
    items: &[MessageDataItemName<'_>],
    uid: bool,
    seen_set: bool,
) -> Vec<u8> {
    let parsed = raw.map(Parsed::new);
    let mut out: Vec<MessageDataItem<'static>> = Vec::new();
    let has = |n: &MessageDataItemName<'_>| items.contains(n);
    if uid && !has(&MessageDataItemName::Uid) {
        out.push(MessageDataItem::Uid(nz(entry.imap_uid)));
    }
    for item in items {
        let data = match item {
            MessageDataItemName::Flags => MessageDataItem::Flags(flags(entry)),
            MessageDataItemName::Uid => MessageDataItem::Uid(nz(entry.imap_uid)),
            MessageDataItemName::Rfc822Size => {
                MessageDataItem::Rfc822Size(entry.size().clamp(0, u32::MAX as i64) as u32)
            }
            MessageDataItemName::InternalDate => {
                MessageDataItem::InternalDate(internal_date(entry.delivered_at))
            }
            _ => {
                let (Some(raw), Some(p)) = (raw, parsed.as_ref()) else {
                    continue;
                };
                match item {
                    MessageDataItemName::Envelope => MessageDataItem::Envelope(p.envelope()),
                    MessageDataItemName::Body => MessageDataItem::Body(p.body_structure(false)),
                    MessageDataItemName::BodyStructure => {
                        MessageDataItem::BodyStructure(p.body_structure(true))
                    }
                    MessageDataItemName::Rfc822 => MessageDataItem::Rfc822(literal_of(raw)),
                    MessageDataItemName::Rfc822Header => MessageDataItem::Rfc822Header(literal(
                        p.section(Some(&Section::Header(None))).unwrap_or_default(),
                    )),
                    MessageDataItemName::Rfc822Text => MessageDataItem::Rfc822Text(literal(
                        p.section(Some(&Section::Text(None))).unwrap_or_default(),
                    )),
                    MessageDataItemName::BodyExt {
                        section, partial, ..
                    } => {
                        let bytes = match section {
                            None => raw.to_vec(),
                            Some(s) => p.section(Some(s)).unwrap_or_default(),
                        };
                        let (origin, bytes) = match partial {
                            Some((start, len)) => {
                                let start = (*start as usize).min(bytes.len());
                                let end = start.saturating_add(len.get() as usize).min(bytes.len());
                                (Some(start as u32), bytes[start..end].to_vec())
                            }
                            None => (None, bytes),
                        };
                        MessageDataItem::BodyExt {
                            section: section.clone().map(|s| s.to_static()),
                            origin,
                            data: literal(bytes.into_iter().filter(|b| *b != 0).collect()),
                        }
                    }
                    // BINARY and the CONDSTORE items are not offered.
                    _ => continue,
                }
            }
        };
        out.push(data);
    }
    if seen_set && !has(&MessageDataItemName::Flags) {
        out.push(MessageDataItem::Flags(flags(entry)));
    }
    let Ok(items) = out.try_into() else {
        // Nothing to say (e.g. only items not offered): the UID at least.
        return format!("* {seq} FETCH (UID {})\r\n", entry.imap_uid).into_bytes();
    };
    let response = Response::Data(Data::Fetch {
        seq: NonZeroU32::new(seq).unwrap_or(NonZeroU32::MIN),
        items,
    });
    ResponseCodec::default().encode(&response).dump()
}

#[cfg(test)]
mod tests {
    use super::*;
    use imap_codec::decode::Decoder;

    fn entry() -> MailboxEntry {
        MailboxEntry {
            id: 1,
            uid: "6J8TMH5D000NKX".into(),
            imap_uid: 7,
            flags: "\\Seen $Work".into(),
            sender: String::new(),
            stored_size: 0,
            delivered_at: 1_796_000_000,
            appended: true,
        }
    }

    /// Found by fuzz/imap_fetch: control characters and NUL in a header.
    #[test]
    fn a_header_with_control_characters_gives_a_decodable_response() {
        let message = b"Subject: p\x0c\0\0\0\r\n\r!\n8bit \xc3\xa1\r\n";
        let items = [
            MessageDataItemName::Envelope,
            MessageDataItemName::BodyStructure,
            MessageDataItemName::BodyExt {
                section: None,
                partial: None,
                peek: true,
            },
        ];
        let out = response(1, &entry(), Some(message), &items, true, false);
        let decoded = ResponseCodec::default().decode_static(&out);
        assert!(
            decoded.is_ok(),
            "{decoded:?}: {:?}",
            String::from_utf8_lossy(&out)
        );
    }
}
