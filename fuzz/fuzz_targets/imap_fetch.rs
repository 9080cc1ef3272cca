//! IMAP FETCH of a hostile message: the MIME structure (mail-parser, the
//! `mime` module) and the response written from it (`fetch_response`,
//! encoded by imap-codec).
//!
//! Input: a message as it would be stored. Asserts that
//! - every response decodes as one valid IMAP response (imap-codec's own
//!   decoder), whatever the message holds: no broken strings, lists or
//!   literals from an envelope or body structure;
//! - BODY[] gives back the message itself, and BODY[HEADER] followed by
//!   BODY[TEXT] gives it back too;
//! - a partial fetch is the matching slice of the stored octets.
#![no_main]

use std::num::NonZeroU32;

use imap_codec::decode::Decoder;
use imap_codec::imap_types::core::{IString, NString};
use imap_codec::imap_types::fetch::{MessageDataItem, MessageDataItemName, Part, Section};
use imap_codec::imap_types::response::{Data, Response};
use imap_codec::ResponseCodec;
use libfuzzer_sys::fuzz_target;
use outpost::imap::fetch_response;
use outpost::queue::MailboxEntry;

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

/// The data items of the single FETCH response in `out`.
fn decode(out: &[u8]) -> Vec<MessageDataItem<'static>> {
    let (rest, response) = ResponseCodec::default()
        .decode_static(out)
        .unwrap_or_else(|e| panic!("undecodable response {e:?}: {:?}", String::from_utf8_lossy(out)));
    assert!(rest.is_empty(), "trailing bytes after the response");
    match response {
        Response::Data(Data::Fetch { items, .. }) => items.into_inner(),
        other => panic!("not a FETCH response: {other:?}"),
    }
}

fn data(item: &MessageDataItem<'_>) -> Vec<u8> {
    match item {
        MessageDataItem::BodyExt {
            data: NString(Some(s)),
            ..
        } => match s {
            IString::Literal(l) => l.as_ref().to_vec(),
            IString::Quoted(q) => q.inner().as_bytes().to_vec(),
        },
        MessageDataItem::BodyExt { .. } => Vec::new(),
        other => panic!("not a body section: {other:?}"),
    }
}

fuzz_target!(|message: &[u8]| {
    let part = |n: &[u32]| {
        Part(
            n.iter()
                .map(|n| NonZeroU32::new(*n).unwrap())
                .collect::<Vec<_>>()
                .try_into()
                .unwrap(),
        )
    };
    let body = |section: Option<Section<'static>>, partial| MessageDataItemName::BodyExt {
        section,
        partial,
        peek: true,
    };
    let items = vec![
        MessageDataItemName::Flags,
        MessageDataItemName::Uid,
        MessageDataItemName::Rfc822Size,
        MessageDataItemName::InternalDate,
        MessageDataItemName::Envelope,
        MessageDataItemName::BodyStructure,
        MessageDataItemName::Body,
        body(None, None),
        body(Some(Section::Header(None)), None),
        body(Some(Section::Text(None)), None),
        body(Some(Section::Part(part(&[1]))), None),
        body(Some(Section::Mime(part(&[1]))), None),
        body(Some(Section::Part(part(&[2, 1]))), None),
        body(None, Some((3, NonZeroU32::new(10).unwrap()))),
    ];
    let out = fetch_response(1, &entry(), Some(message), &items, true, false);
    let got = decode(&out);
    let sections: Vec<Vec<u8>> = got
        .iter()
        .filter(|i| matches!(i, MessageDataItem::BodyExt { .. }))
        .map(data)
        .collect();
    assert_eq!(sections.len(), 7, "one answer per section asked");
    // NUL cannot travel in an IMAP literal; the rest must be exact.
    let clean: Vec<u8> = message.iter().copied().filter(|b| *b != 0).collect();
    assert_eq!(sections[0], clean, "BODY[] is the message");
    let mut joined = sections[1].clone();
    joined.extend_from_slice(&sections[2]);
    assert_eq!(joined, clean, "HEADER + TEXT is the message");
    // The slice is of the stored octets; NUL is left out after.
    let start = 3.min(message.len());
    let end = 13.min(message.len());
    let slice: Vec<u8> = message[start..end].iter().copied().filter(|b| *b != 0).collect();
    assert_eq!(sections[6], slice, "a partial fetch is its slice");
});
