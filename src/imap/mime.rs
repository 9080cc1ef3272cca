//! MIME view of a stored message for FETCH and SEARCH.
//!
//! `mail_parser` supplies the part tree and the decoded values (addresses,
//! dates, Content-Type parameters, decoded text). Everything the client sees
//! byte for byte (section octets, sizes, raw header strings) is taken from the
//! raw message through the part offsets, so nothing is re-serialised.

use std::ops::Range;

use imap_next::imap_types::{
    body::{
        BasicFields, Body, BodyStructure, Disposition, Language, Location, MultiPartExtensionData,
        SinglePartExtensionData, SpecificFields,
    },
    core::{IString, Literal, NString, Vec1},
    envelope::{Address, Envelope},
    fetch::{Part, Section},
};
use mail_parser::{
    Addr, Address as MpAddress, HeaderName, HeaderValue, Message, MessageParser, MessagePart,
    PartType,
};

/// Deeper nesting is reported as an opaque leaf: it keeps recursion (and the
/// stack) bounded on hostile input without affecting real mail.
const MAX_DEPTH: u32 = 48;

/// A parsed message, kept for one FETCH/SEARCH over it.
pub struct Parsed<'m> {
    raw: &'m [u8],
    msg: Option<Message<'m>>,
}

/// One MIME entity. `header` includes the blank line ending it; `body` ends
/// before the CRLF preceding the next boundary, which belongs to the boundary
/// (RFC 2046 §5.1.1).
struct Node<'a, 'm> {
    part: Option<&'a MessagePart<'m>>,
    header: Range<usize>,
    body: Range<usize>,
    kind: Kind<'a, 'm>,
}

enum Kind<'a, 'm> {
    Leaf,
    Multi(Vec<Node<'a, 'm>>),
    /// message/rfc822: the encapsulated message's root entity.
    Message(Box<Node<'a, 'm>>),
}

impl<'m> Parsed<'m> {
    pub fn new(raw: &'m [u8]) -> Parsed<'m> {
        // The parser sees untrusted input; a bug in it must cost this message
        // its structure, not the connection.
        let msg = std::panic::catch_unwind(|| MessageParser::default().parse(raw))
            .ok()
            .flatten()
            .filter(|m| !m.parts.is_empty());
        Parsed { raw, msg }
    }

    /// ENVELOPE (RFC 9051 §7.5.2) of the message.
    pub fn envelope(&self) -> Envelope<'static> {
        envelope_of(self.raw, &self.root())
    }

    /// BODY (`extended == false`) or BODYSTRUCTURE of the message.
    pub fn body_structure(&self, extended: bool) -> BodyStructure<'static> {
        structure(self.raw, &self.root(), extended)
    }

    /// The octets of BODY[section] (RFC 9051 §6.4.5), `None` if the part does
    /// not exist.
    pub fn section(&self, section: Option<&Section<'_>>) -> Option<Vec<u8>> {
        let root = self.root();
        let raw = self.raw;
        let Some(section) = section else {
            return Some(raw.to_vec());
        };
        // HEADER/TEXT with a part number address an encapsulated message.
        let message = |part: &Option<Part>| -> Option<(Range<usize>, Range<usize>)> {
            let n = match part {
                None => &root,
                Some(p) => match &find(&root, p)?.kind {
                    Kind::Message(inner) => inner,
                    _ => return None,
                },
            };
            Some((n.header.clone(), n.body.clone()))
        };
        Some(match section {
            Section::Part(p) => raw[find(&root, p)?.body.clone()].to_vec(),
            Section::Mime(p) => raw[find(&root, p)?.header.clone()].to_vec(),
            Section::Header(p) => raw[message(p)?.0].to_vec(),
            Section::Text(p) => raw[message(p)?.1].to_vec(),
            Section::HeaderFields(p, names) => subset(&raw[message(p)?.0], names, true),
            Section::HeaderFieldsNot(p, names) => subset(&raw[message(p)?.0], names, false),
        })
    }

    /// The unfolded raw value of every top-level header field named `name`.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        let header = &self.raw[self.root().header];
        fields(header)
            .0
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case(name.as_bytes()))
            .map(|f| String::from_utf8_lossy(&unfold(f.value)).into_owned())
            .collect()
    }

    /// Whether the decoded text parts (and, with `with_header`, the header)
    /// contain `needle`, case-insensitively (RFC 9051 §6.4.4 BODY/TEXT).
    pub fn body_contains(&self, needle: &str, with_header: bool) -> bool {
        let needle = needle.to_lowercase();
        let hit = |text: &str| text.to_lowercase().contains(&needle);
        let Some(msg) = &self.msg else {
            return hit(&String::from_utf8_lossy(self.raw));
        };
        if with_header {
            if hit(&String::from_utf8_lossy(&self.raw[self.root().header])) {
                return true;
            }
            // Also match the decoded form of encoded-words (RFC 2047).
            let decoded = msg.parts[0].headers.iter().any(|h| match &h.value {
                HeaderValue::Text(t) => hit(t),
                HeaderValue::TextList(l) => l.iter().any(|t| hit(t)),
                _ => false,
            });
            if decoded {
                return true;
            }
        }
        let mut texts = Vec::new();
        collect_texts(msg, &mut texts, 0);
        texts.into_iter().any(hit)
    }

    /// The Date: header as Unix seconds (SENTBEFORE/SENTON/SENTSINCE).
    pub fn sent_date(&self) -> Option<i64> {
        self.msg.as_ref()?.parts[0]
            .headers
            .iter()
            .find_map(|h| match (&h.name, &h.value) {
                (HeaderName::Date, HeaderValue::DateTime(d)) if d.is_valid() => {
                    Some(d.to_timestamp())
                }
                _ => None,
            })
    }

    fn root(&self) -> Node<'_, 'm> {
        let len = self.raw.len();
        match &self.msg {
            Some(msg) => {
                let p = &msg.parts[0];
                // The header always starts at 0 so that HEADER + TEXT is the
                // whole message, whatever the parser skipped.
                let b = (p.offset_body as usize).min(len);
                node(p, msg, self.raw, 0..b, b..len, 0)
            }
            None => {
                let b = find_bytes(self.raw, b"\r\n\r\n").map_or(len, |i| i + 4);
                Node {
                    part: None,
                    header: 0..b,
                    body: b..len,
                    kind: Kind::Leaf,
                }
            }
        }
    }
}

fn node<'a, 'm>(
    p: &'a MessagePart<'m>,
    msg: &'a Message<'m>,
    raw: &[u8],
    header: Range<usize>,
    body: Range<usize>,
    depth: u32,
) -> Node<'a, 'm> {
    let kind = match &p.body {
        _ if depth >= MAX_DEPTH => Kind::Leaf,
        PartType::Multipart(ids) => {
            let children: Vec<_> = ids
                .iter()
                .filter_map(|&id| {
                    let c = msg.parts.get(id as usize)?;
                    let h = clamp(c.offset_header, &body);
                    let b = clamp(c.offset_body, &(h..body.end));
                    let e = clamp(c.offset_end, &(b..body.end));
                    Some(node(c, msg, raw, h..b, b..e, depth + 1))
                })
                .collect();
            if children.is_empty() {
                Kind::Leaf
            } else {
                Kind::Multi(children)
            }
        }
        // Only a message parsed in place shares our offsets; one parsed from
        // a transfer-decoded body (base64 message/rfc822, which RFC 2046
        // §5.2.1 forbids anyway) is reported as an opaque leaf.
        PartType::Message(inner)
            if inner.raw_message.as_ptr() == raw.as_ptr() && !inner.parts.is_empty() =>
        {
            let ip = &inner.parts[0];
            let ib = clamp(ip.offset_body, &body);
            let n = node(ip, inner, raw, body.start..ib, ib..body.end, depth + 1);
            Kind::Message(Box::new(n))
        }
        _ => Kind::Leaf,
    };
    Node {
        part: Some(p),
        header,
        body,
        kind,
    }
}

fn clamp(offset: u32, within: &Range<usize>) -> usize {
    (offset as usize).clamp(within.start, within.end.max(within.start))
}

/// Resolves a part number (RFC 9051 §6.4.5): the parts of a multipart are
/// numbered from 1, a message/rfc822 part is numbered like the message it
/// contains, and part 1 of a non-multipart message is its body.
fn find<'n, 'a, 'm>(root: &'n Node<'a, 'm>, part: &Part) -> Option<&'n Node<'a, 'm>> {
    let path = part.0.as_ref();
    let (&first, rest) = path.split_first()?;
    let mut cur = match &root.kind {
        Kind::Multi(children) => children.get(first.get() as usize - 1)?,
        _ if first.get() == 1 => root,
        _ => return None,
    };
    for n in rest {
        let i = n.get() as usize - 1;
        cur = match &cur.kind {
            Kind::Multi(children) => children.get(i)?,
            Kind::Message(inner) => match &inner.kind {
                Kind::Multi(children) => children.get(i)?,
                _ if i == 0 => inner,
                _ => return None,
            },
            Kind::Leaf => return None,
        };
    }
    Some(cur)
}

struct Field<'h> {
    name: &'h [u8],
    whole: &'h [u8],
    value: &'h [u8],
}

/// Splits a header block into fields (RFC 5322 §2.2: a field continues on
/// lines starting with white space). Also returns what follows the last
/// field, i.e. the delimiting blank line if present.
fn fields(header: &[u8]) -> (Vec<Field<'_>>, &[u8]) {
    let mut out: Vec<Field<'_>> = Vec::new();
    let mut start = None::<usize>;
    let mut pos = 0;
    while pos < header.len() {
        let line_end = header[pos..]
            .iter()
            .position(|&c| c == b'\n')
            .map_or(header.len(), |i| pos + i + 1);
        let line = &header[pos..line_end];
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        if !matches!(line[0], b' ' | b'\t') || start.is_none() {
            if let Some(s) = start {
                finish(&mut out, &header[s..pos]);
            }
            start = Some(pos);
        }
        pos = line_end;
    }
    if let Some(s) = start {
        finish(&mut out, &header[s..pos]);
    }
    (out, &header[pos..])
}

fn finish<'h>(out: &mut Vec<Field<'h>>, whole: &'h [u8]) {
    let colon = whole.iter().position(|&c| c == b':');
    out.push(Field {
        name: trim(&whole[..colon.unwrap_or(whole.len())]),
        whole,
        value: colon.map_or(&[][..], |c| &whole[c + 1..]),
    });
}

/// HEADER.FIELDS / HEADER.FIELDS.NOT: field names match case-insensitively,
/// and the delimiting blank line is kept (RFC 9051 §6.4.5).
fn subset(header: &[u8], names: &Vec1<impl AsRef<[u8]>>, keep: bool) -> Vec<u8> {
    let (list, blank) = fields(header);
    let mut out = Vec::new();
    for f in list {
        let listed = names
            .as_ref()
            .iter()
            .any(|n| n.as_ref().eq_ignore_ascii_case(f.name));
        if listed == keep {
            out.extend_from_slice(f.whole);
        }
    }
    out.extend_from_slice(blank);
    out
}

/// Unfolds (RFC 5322 §2.2.3: drop the line breaks) and trims a field value.
fn unfold(value: &[u8]) -> Vec<u8> {
    let v: Vec<u8> = value
        .iter()
        .copied()
        .filter(|&c| c != b'\r' && c != b'\n')
        .collect();
    trim(&v).to_vec()
}

fn trim(v: &[u8]) -> &[u8] {
    let s = v
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(v.len());
    let e = v
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(s, |i| i + 1);
    &v[s..e]
}

fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An IMAP string: quoted when possible, else a literal (8-bit text). NUL is
/// the one octet neither can carry (RFC 9051 §4.3), so it is dropped.
fn istring(v: impl Into<Vec<u8>>) -> IString<'static> {
    let v: Vec<u8> = v.into().into_iter().filter(|&c| c != 0).collect();
    IString::try_from(v).unwrap_or_else(|_| IString::Literal(Literal::unvalidated(Vec::new())))
}

fn nstring(v: Option<impl Into<Vec<u8>>>) -> NString<'static> {
    NString(v.map(istring))
}

/// The first field `name` of `header`, unfolded.
fn raw_field(header: &[u8], name: &str) -> Option<Vec<u8>> {
    fields(header)
        .0
        .iter()
        .find(|f| f.name.eq_ignore_ascii_case(name.as_bytes()))
        .map(|f| unfold(f.value))
}

fn envelope_of(raw: &[u8], n: &Node<'_, '_>) -> Envelope<'static> {
    let header = &raw[n.header.clone()];
    // Decoded text is re-encoded (RFC 2047) unless the header itself was
    // 8-bit, so that an ASCII header stays ASCII on the wire.
    let ascii = header.is_ascii();
    let addresses = |name: HeaderName<'static>| -> Vec<Address<'static>> {
        let Some(value) = n
            .part
            .and_then(|p| p.headers.iter().find(|h| h.name == name))
            .map(|h| &h.value)
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        match value {
            HeaderValue::Address(MpAddress::List(list)) => {
                out.extend(list.iter().filter_map(|a| address(a, ascii)));
            }
            // RFC 3501 §7.4.2: a group is bracketed by (NIL NIL "name" NIL)
            // and (NIL NIL NIL NIL).
            HeaderValue::Address(MpAddress::Group(groups)) => {
                for g in groups {
                    let marker = g.name.as_ref().map(|name| Address {
                        name: NString::NIL,
                        adl: NString::NIL,
                        mailbox: nstring(Some(text(name, ascii))),
                        host: NString::NIL,
                    });
                    let has_marker = marker.is_some();
                    out.extend(marker);
                    out.extend(g.addresses.iter().filter_map(|a| address(a, ascii)));
                    if has_marker {
                        out.push(Address {
                            name: NString::NIL,
                            adl: NString::NIL,
                            mailbox: NString::NIL,
                            host: NString::NIL,
                        });
                    }
                }
            }
            _ => {}
        }
        out
    };
    let from = addresses(HeaderName::From);
    // RFC 3501 §7.4.2: absent or empty Sender/Reply-To default to From.
    let or_from = |v: Vec<Address<'static>>| if v.is_empty() { from.clone() } else { v };
    Envelope {
        date: nstring(raw_field(header, "Date")),
        subject: nstring(raw_field(header, "Subject")),
        sender: or_from(addresses(HeaderName::Sender)),
        reply_to: or_from(addresses(HeaderName::ReplyTo)),
        to: addresses(HeaderName::To),
        cc: addresses(HeaderName::Cc),
        bcc: addresses(HeaderName::Bcc),
        in_reply_to: nstring(raw_field(header, "In-Reply-To")),
        message_id: nstring(raw_field(header, "Message-ID")),
        from,
    }
}

fn address(a: &Addr<'_>, ascii: bool) -> Option<Address<'static>> {
    let name = a.name.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let addr = a.address.as_deref().map(str::trim);
    if name.is_none() && addr.is_none_or(str::is_empty) {
        return None;
    }
    // A NIL host would mark a group (RFC 3501 §7.4.2), so a missing domain
    // is sent as an empty string.
    let (mailbox, host) = addr.map_or(("", ""), |s| s.rsplit_once('@').unwrap_or((s, "")));
    Some(Address {
        name: nstring(name.map(|s| text(s, ascii))),
        adl: NString::NIL,
        mailbox: nstring(Some(mailbox)),
        host: nstring(Some(host)),
    })
}

/// Decoded header text for the wire: as an RFC 2047 encoded-word sequence
/// when the source header was ASCII, else as is.
fn text(s: &str, ascii: bool) -> Vec<u8> {
    if s.is_ascii() || !ascii {
        return s.as_bytes().to_vec();
    }
    // ≤45 octets per word keeps each encoded-word within 75 characters
    // (RFC 2047 §2).
    let mut words = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let mut cut = rest.len().min(45);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        words.push(format!("=?UTF-8?B?{}?=", base64(&rest.as_bytes()[..cut])));
        rest = &rest[cut..];
    }
    words.join(" ").into_bytes()
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= c.len() {
                T[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

/// RFC 2231 §4 form for a parameter whose decoded value is not ASCII.
fn param(name: &str, value: &str, ascii: bool) -> (IString<'static>, IString<'static>) {
    let name = name.to_ascii_uppercase();
    if value.is_ascii() || !ascii {
        return (istring(name), istring(value));
    }
    let mut v = String::from("UTF-8''");
    for &b in value.as_bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            v.push(b as char);
        } else {
            v.push_str(&format!("%{b:02X}"));
        }
    }
    (istring(name + "*"), istring(v))
}

fn content_type<'p>(
    part: Option<&'p MessagePart<'_>>,
    name: HeaderName<'static>,
) -> Option<&'p mail_parser::ContentType<'p>> {
    part?
        .headers
        .iter()
        .find(|h| h.name == name)
        .and_then(|h| h.value.as_content_type())
}

fn lines(body: &[u8]) -> u32 {
    let n = body.iter().filter(|&&c| c == b'\n').count();
    let partial = body.last().is_some_and(|&c| c != b'\n');
    u32::try_from(n + partial as usize).unwrap_or(u32::MAX)
}

fn structure(raw: &[u8], n: &Node<'_, '_>, extended: bool) -> BodyStructure<'static> {
    let header = &raw[n.header.clone()];
    let ascii = header.is_ascii();
    let ct = content_type(n.part, HeaderName::ContentType).filter(|c| c.c_subtype.is_some());
    let params = |default_charset: bool| -> Vec<(IString<'static>, IString<'static>)> {
        match ct.and_then(|c| c.attributes()) {
            Some(attrs) => attrs
                .iter()
                .map(|a| param(&a.name, &a.value, ascii))
                .collect(),
            None if ct.is_none() && default_charset => {
                vec![(istring("CHARSET"), istring("US-ASCII"))]
            }
            None => Vec::new(),
        }
    };
    // RFC 9051 §7.5.2 body-ext-1part/body-ext-mpart tail: disposition,
    // language, location.
    let tail = || {
        let disposition = content_type(n.part, HeaderName::ContentDisposition).map(|d| {
            let ps = d.attributes().unwrap_or_default();
            let ps = ps.iter().map(|a| param(&a.name, &a.value, ascii)).collect();
            (istring(d.ctype().to_ascii_uppercase()), ps)
        });
        let language = raw_field(header, "Content-Language")
            .map(|v| {
                v.split(|&c| c == b',')
                    .map(trim)
                    .filter(|s| !s.is_empty())
                    .map(istring)
                    .collect()
            })
            .unwrap_or_default();
        Some(Disposition {
            disposition,
            tail: Some(Language {
                language,
                tail: Some(Location {
                    location: nstring(raw_field(header, "Content-Location")),
                    extensions: Vec::new(),
                }),
            }),
        })
    };
    if let Kind::Multi(children) = &n.kind {
        let bodies = children.iter().map(|c| structure(raw, c, extended));
        let subtype = ct.and_then(|c| c.subtype()).unwrap_or("mixed");
        return BodyStructure::Multi {
            bodies: Vec1::unvalidated(bodies.collect()),
            subtype: istring(subtype.to_ascii_uppercase()),
            extension_data: extended.then(|| MultiPartExtensionData {
                parameter_list: params(false),
                tail: tail(),
            }),
        };
    }
    let body = &raw[n.body.clone()];
    let (ty, sub) = match (&n.kind, ct) {
        (Kind::Message(_), _) => ("MESSAGE".into(), "RFC822".into()),
        (_, None) => ("TEXT".into(), "PLAIN".into()),
        (_, Some(c)) => (
            c.ctype().to_ascii_uppercase(),
            c.subtype().unwrap_or_default().to_ascii_uppercase(),
        ),
    };
    // A leaf declared multipart/* or message/rfc822 (no boundary found, or
    // an undecodable message) cannot be described with that type: the
    // grammar ties those types to their nested forms.
    let (ty, sub) = match (&n.kind, ty.as_str(), sub.as_str()) {
        (Kind::Leaf, "MULTIPART", _) | (Kind::Leaf, "MESSAGE", "RFC822") => {
            ("APPLICATION".into(), "OCTET-STREAM".into())
        }
        _ => (ty, sub),
    };
    // RFC 2045 §5.2: a message without Content-Type is text/plain; charset=us-ascii.
    let default_charset = ty == "TEXT";
    let specific = match &n.kind {
        Kind::Message(inner) => SpecificFields::Message {
            envelope: Box::new(envelope_of(raw, inner)),
            body_structure: Box::new(structure(raw, inner, extended)),
            number_of_lines: lines(body),
        },
        _ if ty == "TEXT" => SpecificFields::Text {
            subtype: istring(sub),
            number_of_lines: lines(body),
        },
        _ => SpecificFields::Basic {
            r#type: istring(ty),
            subtype: istring(sub),
        },
    };
    let encoding = raw_field(header, "Content-Transfer-Encoding")
        .filter(|v| !v.is_empty())
        .map_or_else(|| b"7BIT".to_vec(), |v| v.to_ascii_uppercase());
    BodyStructure::Single {
        body: Body {
            basic: BasicFields {
                parameter_list: params(default_charset),
                id: nstring(raw_field(header, "Content-ID")),
                description: nstring(raw_field(header, "Content-Description")),
                content_transfer_encoding: istring(encoding),
                size: u32::try_from(body.len()).unwrap_or(u32::MAX),
            },
            specific,
        },
        extension_data: extended.then(|| SinglePartExtensionData {
            md5: nstring(raw_field(header, "Content-MD5")),
            tail: tail(),
        }),
    }
}

fn collect_texts<'x>(msg: &'x Message<'_>, out: &mut Vec<&'x str>, depth: u32) {
    for p in &msg.parts {
        match &p.body {
            PartType::Text(t) | PartType::Html(t) => out.push(t),
            PartType::Message(m) if depth < MAX_DEPTH => collect_texts(m, out, depth + 1),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use imap_codec::{encode::Encoder, ResponseCodec};
    use imap_next::imap_types::{
        core::AString,
        fetch::MessageDataItem,
        response::{Data, Response},
    };

    use super::*;

    const PLAIN: &[u8] = b"From: \"Doe, John\" <john@example.com>\r\n\
To: team: alice@example.com, Bob <bob@example.org>;, carol@example.net\r\n\
Subject: Hello\r\n there =?UTF-8?Q?caf=C3=A9?=\r\n\
Date: Mon, 7 Feb 1994 21:52:25 -0800\r\n\
Message-ID: <1@example.com>\r\n\
\r\n\
line one\r\n\
.leading dot\r\n\
8bit: \xc3\xa9t\xc3\xa9\r\n";

    const MIXED: &[u8] = b"From: a@example.com\r\n\
Subject: mixed\r\n\
Content-Type: multipart/mixed; boundary=\"XX\"\r\n\
\r\n\
preamble\r\n\
--XX\r\n\
Content-Type: multipart/alternative; boundary=YY\r\n\
\r\n\
--YY\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\
\r\n\
caf=C3=A9 au lait\r\n\
\r\n\
--YY\r\n\
Content-Type: text/html\r\n\
Content-Language: en, fr\r\n\
\r\n\
<b>x</b>\r\n\
--YY--\r\n\
\r\n\
--XX\r\n\
Content-Type: application/octet-stream; name=\"a.bin\"\r\n\
Content-Transfer-Encoding: base64\r\n\
Content-ID: <att@example.com>\r\n\
Content-Disposition: attachment; filename=\"a.bin\"\r\n\
\r\n\
AAECAw==\r\n\
--XX\r\n\
Content-Type: message/rfc822\r\n\
\r\n\
From: Inner <x@example.org>\r\n\
Subject: inner\r\n\
\r\n\
inner body\r\n\
--XX--\r\n\
epilogue\r\n";

    fn encode(item: MessageDataItem<'static>) -> String {
        let response = Response::Data(Data::Fetch {
            seq: NonZeroU32::MIN,
            items: Vec1::from(item),
        });
        let out = ResponseCodec::default().encode(&response).dump();
        String::from_utf8_lossy(&out).into_owned()
    }

    fn part(path: &[u32]) -> Part {
        let path: Vec<_> = path.iter().filter_map(|&n| NonZeroU32::new(n)).collect();
        Part(Vec1::try_from(path).unwrap())
    }

    fn get(p: &Parsed<'_>, s: Section<'static>) -> String {
        String::from_utf8_lossy(&p.section(Some(&s)).unwrap()).into_owned()
    }

    fn names(list: &[&'static str]) -> Vec1<AString<'static>> {
        let list = list.iter().map(|&n| AString::try_from(n).unwrap());
        Vec1::try_from(list.collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn plain_message() {
        let p = Parsed::new(PLAIN);
        assert_eq!(
            encode(MessageDataItem::BodyStructure(p.body_structure(true))),
            "* 1 FETCH (BODYSTRUCTURE (\"TEXT\" \"PLAIN\" (\"CHARSET\" \"US-ASCII\") NIL NIL \
             \"7BIT\" 37 3 NIL NIL NIL NIL))\r\n"
        );
        assert_eq!(
            encode(MessageDataItem::Body(p.body_structure(false))),
            "* 1 FETCH (BODY (\"TEXT\" \"PLAIN\" (\"CHARSET\" \"US-ASCII\") NIL NIL \"7BIT\" 37 3))\r\n"
        );
        // 8-bit octets and dot-leading lines pass through untouched.
        let body = p.section(Some(&Section::Part(part(&[1])))).unwrap();
        assert_eq!(
            body,
            b"line one\r\n.leading dot\r\n8bit: \xc3\xa9t\xc3\xa9\r\n"
        );
        assert_eq!(p.section(None).as_deref(), Some(PLAIN));
        assert_eq!(p.section(Some(&Section::Part(part(&[2])))), None);
        assert_eq!(p.section(Some(&Section::Header(Some(part(&[1]))))), None);
        assert_eq!(
            p.header_values("subject"),
            ["Hello there =?UTF-8?Q?caf=C3=A9?="]
        );
        assert_eq!(p.sent_date(), Some(760686745));
        assert!(p.body_contains("LEADING", false));
        assert!(p.body_contains("ÉTÉ", false));
        assert!(!p.body_contains("café", false));
        assert!(p.body_contains("café", true));
    }

    #[test]
    fn envelope_with_group_and_quoted_name() {
        let p = Parsed::new(PLAIN);
        let from = "((\"Doe, John\" NIL \"john\" \"example.com\"))";
        assert_eq!(
            encode(MessageDataItem::Envelope(p.envelope())),
            format!(
                "* 1 FETCH (ENVELOPE (\"Mon, 7 Feb 1994 21:52:25 -0800\" \
                 \"Hello there =?UTF-8?Q?caf=C3=A9?=\" {from} {from} {from} \
                 ((NIL NIL \"team\" NIL)(NIL NIL \"alice\" \"example.com\")\
                 (\"Bob\" NIL \"bob\" \"example.org\")(NIL NIL NIL NIL)\
                 (NIL NIL \"carol\" \"example.net\")) NIL NIL NIL \"<1@example.com>\"))\r\n"
            )
        );
    }

    #[test]
    fn multipart_structure() {
        let p = Parsed::new(MIXED);
        let alternative = "(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"utf-8\") NIL NIL \"QUOTED-PRINTABLE\" 19 1 \
             NIL NIL NIL NIL)(\"TEXT\" \"HTML\" NIL NIL NIL \"7BIT\" 8 1 NIL NIL (\"en\" \"fr\") NIL) \
             \"ALTERNATIVE\" (\"BOUNDARY\" \"YY\") NIL NIL NIL";
        let attachment =
            "\"APPLICATION\" \"OCTET-STREAM\" (\"NAME\" \"a.bin\") \"<att@example.com>\" \
             NIL \"BASE64\" 8 NIL (\"ATTACHMENT\" (\"FILENAME\" \"a.bin\")) NIL NIL";
        let inner = "(\"Inner\" NIL \"x\" \"example.org\")";
        let message = format!(
            "\"MESSAGE\" \"RFC822\" NIL NIL NIL \"7BIT\" 57 \
             (NIL \"inner\" ({inner}) ({inner}) ({inner}) NIL NIL NIL NIL NIL) \
             (\"TEXT\" \"PLAIN\" (\"CHARSET\" \"US-ASCII\") NIL NIL \"7BIT\" 10 1 NIL NIL NIL NIL) \
             4 NIL NIL NIL NIL"
        );
        assert_eq!(
            encode(MessageDataItem::BodyStructure(p.body_structure(true))),
            format!(
                "* 1 FETCH (BODYSTRUCTURE (({alternative})({attachment})({message}) \
                 \"MIXED\" (\"BOUNDARY\" \"XX\") NIL NIL NIL))\r\n"
            )
        );
        assert_eq!(
            encode(MessageDataItem::Body(p.body_structure(false))),
            "* 1 FETCH (BODY (((\"TEXT\" \"PLAIN\" (\"CHARSET\" \"utf-8\") NIL NIL \
             \"QUOTED-PRINTABLE\" 19 1)(\"TEXT\" \"HTML\" NIL NIL NIL \"7BIT\" 8 1) \"ALTERNATIVE\")\
             (\"APPLICATION\" \"OCTET-STREAM\" (\"NAME\" \"a.bin\") \"<att@example.com>\" NIL \
             \"BASE64\" 8)(\"MESSAGE\" \"RFC822\" NIL NIL NIL \"7BIT\" 57 (NIL \"inner\" \
             ((\"Inner\" NIL \"x\" \"example.org\")) ((\"Inner\" NIL \"x\" \"example.org\")) \
             ((\"Inner\" NIL \"x\" \"example.org\")) NIL NIL NIL NIL NIL) (\"TEXT\" \"PLAIN\" \
             (\"CHARSET\" \"US-ASCII\") NIL NIL \"7BIT\" 10 1) 4) \"MIXED\"))\r\n"
        );
    }

    #[test]
    fn multipart_sections() {
        let p = Parsed::new(MIXED);
        assert_eq!(p.section(None).as_deref(), Some(MIXED));
        let header = p.section(Some(&Section::Header(None))).unwrap();
        let text = p.section(Some(&Section::Text(None))).unwrap();
        assert_eq!([header, text].concat(), MIXED);
        assert!(get(&p, Section::Part(part(&[1]))).starts_with("--YY\r\n"));
        assert!(get(&p, Section::Part(part(&[1]))).ends_with("<b>x</b>\r\n--YY--\r\n"));
        assert_eq!(
            get(&p, Section::Part(part(&[1, 1]))),
            "caf=C3=A9 au lait\r\n"
        );
        assert_eq!(get(&p, Section::Part(part(&[1, 2]))), "<b>x</b>");
        assert_eq!(get(&p, Section::Part(part(&[2]))), "AAECAw==");
        assert!(get(&p, Section::Mime(part(&[2]))).ends_with("\"a.bin\"\r\n\r\n"));
        assert_eq!(
            get(&p, Section::Part(part(&[3]))),
            "From: Inner <x@example.org>\r\nSubject: inner\r\n\r\ninner body"
        );
        assert_eq!(
            get(&p, Section::Header(Some(part(&[3])))),
            "From: Inner <x@example.org>\r\nSubject: inner\r\n\r\n"
        );
        assert_eq!(get(&p, Section::Text(Some(part(&[3])))), "inner body");
        assert_eq!(get(&p, Section::Part(part(&[3, 1]))), "inner body");
        assert_eq!(
            get(&p, Section::HeaderFields(None, names(&["FROM", "subject"]))),
            "From: a@example.com\r\nSubject: mixed\r\n\r\n"
        );
        assert_eq!(
            get(&p, Section::HeaderFieldsNot(None, names(&["Content-Type"]))),
            "From: a@example.com\r\nSubject: mixed\r\n\r\n"
        );
        assert!(get(&p, Section::Text(None)).starts_with("preamble\r\n--XX\r\n"));
        assert_eq!(p.section(Some(&Section::Part(part(&[4])))), None);
        assert_eq!(p.section(Some(&Section::Part(part(&[2, 1])))), None);
        assert!(p.body_contains("CAFÉ AU", false));
        assert!(!p.body_contains("AAECAw", false));
    }

    #[test]
    fn nasty_inputs_do_not_panic() {
        let mut nested = Vec::new();
        for _ in 0..300 {
            nested.extend_from_slice(b"Content-Type: message/rfc822\r\n\r\n");
        }
        let mut deep = Vec::new();
        for i in 0..300 {
            deep.extend_from_slice(
                format!("Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n")
                    .as_bytes(),
            );
        }
        let inputs: Vec<&[u8]> = vec![
            b"",
            b"\0\0\0",
            b"\r\n\r\n",
            b"no header at all",
            b"Subject: \0\xff\xfe\r\nFrom: \xc3(\r\n\r\n\0body",
            b"From: <@>, :;, a@, @b, \"\r\nTo: g: ;\r\n\r\n",
            b"Content-Type: multipart/mixed\r\n\r\n--x\r\n\r\nbody\r\n",
            b"Content-Type: multipart/mixed; boundary=x\r\n\r\nno boundary here",
            b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x--\r\n",
            b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: message/rfc822\r\n\r\nFrom: a\r\n",
            b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\nRnJvbTogYUBiDQoNCmhp\r\n",
            b"Content-Type: text/plain; charset=x-unknown\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!\n",
            b"Content-Type: multipart/digest; boundary=d\n\n--d\n\nFrom: a@b\n\nx\n--d--\n",
            b"Content-Type: text/plain; name*=utf-8''%E2%82%AC.txt\r\nContent-Language:\r\n\r\n",
            &nested,
            &deep,
        ];
        let sections = [
            Section::Header(None),
            Section::Text(None),
            Section::HeaderFields(Some(part(&[1])), names(&["from"])),
            Section::HeaderFieldsNot(None, names(&["from"])),
            Section::Mime(part(&[1, 1])),
            Section::Part(part(&[1])),
            Section::Part(part(&[1, 1, 1])),
            Section::Text(Some(part(&[1]))),
        ];
        for raw in inputs {
            let p = Parsed::new(raw);
            encode(MessageDataItem::BodyStructure(p.body_structure(true)));
            encode(MessageDataItem::Body(p.body_structure(false)));
            encode(MessageDataItem::Envelope(p.envelope()));
            for s in &sections {
                p.section(Some(s));
            }
            let header = p.section(Some(&Section::Header(None))).unwrap();
            let text = p.section(Some(&Section::Text(None))).unwrap();
            assert_eq!([header, text].concat(), raw);
            p.header_values("from");
            p.body_contains("x", true);
            p.sent_date();
        }
    }
}
