//! Delivery status notifications: RFC 3464 `multipart/report` messages with
//! RFC 3461 semantics. Pure: builds bytes, nothing else. The flusher decides
//! when a DSN is due (NOTIFY, the null sender) and queues what [`build`]
//! returns with the null reverse-path.
//!
//! The result is a complete RFC 5322 message: CRLF line ends only, no line
//! over 998 octets. It contains 8-bit octets only when the original message
//! (or the envelope sender's address) does; the caller then needs
//! 8BITMIME (or SMTPUTF8) to send it on.
//!
//! The `message/delivery-status` part is US-ASCII as RFC 3464 requires: a
//! non-ASCII address becomes an RFC 6533 `utf-8` address with `\x{HEX}`
//! escapes, and other non-ASCII text is escaped the same way. The human
//! readable part keeps it as UTF-8.

use std::borrow::Cow;

use mail_builder::headers::address::Address;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::message_id::MessageId;
use mail_builder::headers::raw::Raw;
use mail_builder::headers::text::Text;
use mail_builder::mime::{BodyPart, MimePart};
use mail_builder::MessageBuilder;
use rand::Rng;

/// What the notification reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnKind {
    /// The gateway gave up: `Action: failed`.
    Failure,
    /// A delay warning, still trying: `Action: delayed`.
    Delay,
}

/// One recipient the notification is about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DsnRecipient {
    /// The final recipient (the RCPT TO address).
    pub address: String,
    /// ORCPT as stored, e.g. `rfc822;addr` (becomes Original-Recipient).
    pub orcpt: Option<String>,
    /// Enhanced status code, e.g. `5.1.1`, `4.4.7`. Anything that is not
    /// `class.subject.detail` is replaced by `5.0.0` / `4.0.0`.
    pub status: String,
    /// The remote reply, e.g. `550 5.1.1 no such user` (multi-line replies
    /// may keep their CRLFs: they are joined into one line).
    pub diagnostic: Option<String>,
    /// `dns; smtp.hq.example` (a bare host name gets `dns; ` prepended).
    pub remote_mta: Option<String>,
    /// Unix seconds of the last delivery attempt.
    pub last_attempt: Option<i64>,
    /// Unix seconds until which the gateway keeps trying (Delay only).
    pub will_retry_until: Option<i64>,
}

/// Everything a notification needs; see [`build`].
#[derive(Debug, Clone)]
pub struct DsnRequest<'a> {
    pub kind: DsnKind,
    /// Our host name: `Reporting-MTA: dns; host`, and the Message-ID domain.
    pub reporting_mta: &'a str,
    /// Our queue id of the original message (`X-Outpost-Queue-ID`, and the text).
    pub queue_id: &'a str,
    /// ENVID of the original transaction (Original-Envelope-Id).
    pub envid: Option<&'a str>,
    /// Unix seconds the original was accepted (Arrival-Date).
    pub arrival: i64,
    /// The original envelope sender, who receives the DSN. Never the null
    /// sender: no DSN is ever sent about a DSN.
    pub to: &'a str,
    /// The DSN's author, e.g. `MAILER-DAEMON@host`.
    pub from: &'a str,
    /// At least one; all of them share `kind`.
    pub recipients: &'a [DsnRecipient],
    /// The whole stored original message (CRLF line ends).
    pub original: &'a [u8],
    /// RET=FULL: return the whole message (message/rfc822) in a failure
    /// DSN. RET only governs failure DSNs (RFC 3461 §4.3), so a delay
    /// warning always carries the headers only.
    pub return_full: bool,
    /// Unix seconds now: Date, Message-ID.
    pub now: i64,
}

/// What the third part carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Returned {
    Full,
    Headers,
    /// RET=FULL, but a line of the original is over 998 octets: it cannot
    /// be carried in 8bit, so only the headers go back.
    HeadersLongLines,
}

/// Builds the notification: a complete message, CRLF line ends.
pub fn build(req: &DsnRequest<'_>) -> Vec<u8> {
    let original = crlf_canonical(req.original);
    let header_end = header_section_len(&original);
    let returned_kind = match (req.kind, req.return_full) {
        (DsnKind::Failure, true) if !has_long_line(&original) => Returned::Full,
        (DsnKind::Failure, true) => Returned::HeadersLongLines,
        _ => Returned::Headers,
    };
    let (returned, returned_type): (Cow<'_, [u8]>, &str) = match returned_kind {
        Returned::Full => (Cow::Borrowed(&original[..]), "message/rfc822"),
        _ => (
            fold_long_lines(&original[..header_end]),
            "text/rfc822-headers",
        ),
    };
    let returned_cte = if returned.is_ascii() { "7bit" } else { "8bit" };

    let text = human_text(req, returned_kind);
    let status = delivery_status(req);

    let mut rng = rand::rng();
    let boundary = loop {
        let b = format!("outpost-dsn-{:032x}", rng.random::<u128>());
        if !contains(&returned, b.as_bytes()) && !status.contains(&b) && !text.contains(&b) {
            break b;
        }
    };
    let message_id = format!(
        "{}.{}.{:016x}@{}",
        req.now,
        dot_atom(req.queue_id, "dsn", 64),
        rng.random::<u64>(),
        dot_atom(req.reporting_mta, "localhost", 253),
    );
    let subject = match req.kind {
        DsnKind::Failure => "Undelivered Mail Returned to Sender",
        DsnKind::Delay => "Delayed Mail (still being retried)",
    };

    // mail-builder writes the structure. The delivery status and the
    // returned original are raw parts (an explicit Content-Transfer-Encoding
    // makes mail-builder copy them verbatim): left to itself it would
    // base64 any message/* body, which RFC 2046 forbids for message/rfc822
    // and which would hide the fields from every DSN parser.
    let body = MimePart::new(
        ContentType::new("multipart/report")
            .attribute("report-type", "delivery-status")
            .attribute("boundary", boundary),
        vec![
            // text/plain; charset=utf-8, 7bit or quoted-printable as needed.
            MimePart::new("text/plain", text),
            MimePart::new(
                ContentType::new("message/delivery-status"),
                BodyPart::Binary(status.into_bytes().into()),
            )
            .transfer_encoding("7bit"),
            MimePart::new(ContentType::new(returned_type), BodyPart::Binary(returned))
                .transfer_encoding(returned_cte),
        ],
    );
    let mut out = Vec::with_capacity(original.len() + 4096);
    MessageBuilder::new()
        .from(Address::new_address(
            Some("Mail Delivery System"),
            header_address(req.from),
        ))
        // Written here, not by mail-builder, which quotes a local part
        // only when it holds a quote: `odd> x@y` would end the address
        // early.
        .header(
            "To",
            Raw::new(format!("<{}>", address_text(header_address(req.to)))),
        )
        .subject(Text::new(subject))
        .date(Date::new(req.now))
        .message_id(MessageId::new(message_id))
        .header("MIME-Version", Raw::new("1.0"))
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .body(body)
        .serialize(&mut out);
    out
}

// ---------------------------------------------------------------------------
// message/delivery-status (RFC 3464 §2.1-2.3)

fn delivery_status(req: &DsnRequest<'_>) -> String {
    let mut s = String::new();
    // Per-message fields, in the order of RFC 3464 §2.2.
    if let Some(envid) = req.envid {
        field(&mut s, "Original-Envelope-Id", &ascii_text(envid));
    }
    field(
        &mut s,
        "Reporting-MTA",
        &format!("dns; {}", ascii_text(req.reporting_mta)),
    );
    field(&mut s, "Arrival-Date", &rfc5322(req.arrival));
    field(&mut s, "X-Outpost-Queue-ID", &ascii_text(req.queue_id));

    for r in req.recipients {
        s.push_str("\r\n");
        // Per-recipient fields, in the order of RFC 3464 §2.3.
        if let Some(orcpt) = &r.orcpt {
            field(&mut s, "Original-Recipient", &original_recipient(orcpt));
        }
        field(&mut s, "Final-Recipient", &typed_address(&r.address));
        let action = match req.kind {
            DsnKind::Failure => "failed",
            DsnKind::Delay => "delayed",
        };
        field(&mut s, "Action", action);
        field(&mut s, "Status", &status_code(req.kind, &r.status));
        if let Some(mta) = &r.remote_mta {
            field(&mut s, "Remote-MTA", &remote_mta(mta));
        }
        if let Some(d) = &r.diagnostic {
            field(
                &mut s,
                "Diagnostic-Code",
                &format!("smtp; {}", ascii_text(d)),
            );
        }
        if let Some(t) = r.last_attempt {
            field(&mut s, "Last-Attempt-Date", &rfc5322(t));
        }
        if let (DsnKind::Delay, Some(t)) = (req.kind, r.will_retry_until) {
            field(&mut s, "Will-Retry-Until", &rfc5322(t));
        }
    }
    s
}

/// Writes `Name: value` CRLF, folded at spaces near 78 columns; a single
/// word too long for a 998-octet line is cut (never happens for sane input).
fn field(out: &mut String, name: &str, value: &str) {
    const SOFT: usize = 78;
    const HARD: usize = 998;
    out.push_str(name);
    out.push(':');
    let mut col = name.len() + 1;
    for (i, word) in value.split(' ').filter(|w| !w.is_empty()).enumerate() {
        if i > 0 && col + 1 + word.len() > SOFT {
            out.push_str("\r\n");
            col = 0;
        }
        out.push(' ');
        col += 1;
        // `value` is ASCII (ascii_text), so byte positions are char bounds.
        let mut rest = word;
        while col + rest.len() > HARD {
            let (head, tail) = rest.split_at(HARD - col);
            out.push_str(head);
            out.push_str("\r\n ");
            col = 1;
            rest = tail;
        }
        out.push_str(rest);
        col += rest.len();
    }
    out.push_str("\r\n");
}

/// `rfc822; addr`, or RFC 6533 `utf-8; ` with escapes for a non-ASCII one.
/// An address as it may stand in a header field: a local part that needs
/// quoting is quoted (RFC 5321 §4.1.2), so that what a client sent can
/// never read as more than one address or as another field.
fn address_text(addr: &str) -> String {
    crate::address::smtp_path(addr).unwrap_or_else(|| one_line(addr))
}

fn typed_address(addr: &str) -> String {
    let addr = address_text(addr);
    if addr.is_ascii() {
        format!("rfc822; {addr}")
    } else {
        format!("utf-8; {}", utf8_addr_xtext(&addr))
    }
}

/// The stored ORCPT (`type;addr`) as an Original-Recipient value.
fn original_recipient(orcpt: &str) -> String {
    let orcpt = one_line(orcpt);
    let (kind, addr) = match orcpt.split_once(';') {
        Some((k, a)) => (k.trim(), a.trim()),
        None => ("rfc822", orcpt.trim()),
    };
    if addr.is_ascii() && kind.is_ascii() && !kind.is_empty() {
        format!("{kind};{addr}")
    } else {
        format!("utf-8;{}", utf8_addr_xtext(addr))
    }
}

fn remote_mta(mta: &str) -> String {
    let mta = ascii_text(mta);
    if mta.contains(';') {
        mta
    } else {
        format!("dns; {mta}")
    }
}

/// The status if it is `class.subject.detail` with class 2, 4 or 5;
/// otherwise the generic one for the kind.
fn status_code(kind: DsnKind, status: &str) -> String {
    match parse_status(status) {
        Some(_) => status.trim().to_string(),
        None => match kind {
            DsnKind::Failure => "5.0.0".into(),
            DsnKind::Delay => "4.0.0".into(),
        },
    }
}

fn parse_status(status: &str) -> Option<(u16, u16, u16)> {
    let mut it = status.trim().split('.');
    let mut num = |max_len: usize| -> Option<u16> {
        let p = it.next()?;
        if p.is_empty() || p.len() > max_len || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse().ok()
    };
    let (class, subject, detail) = (num(1)?, num(3)?, num(3)?);
    if it.next().is_some() || !matches!(class, 2 | 4 | 5) {
        return None;
    }
    Some((class, subject, detail))
}

/// RFC 6533 utf-8-addr-xtext: QCHAR as is, everything else `\x{HEX}`.
fn utf8_addr_xtext(addr: &str) -> String {
    let mut s = String::with_capacity(addr.len() + 8);
    for c in addr.chars() {
        if c.is_ascii_graphic() && !matches!(c, '+' | '=' | '\\') {
            s.push(c);
        } else {
            s.push_str(&format!("\\x{{{:02X}}}", u32::from(c)));
        }
    }
    s
}

/// One line of US-ASCII text: controls become spaces, runs of white space
/// one space, non-ASCII characters `\x{HEX}` (RFC 6533's notation).
fn ascii_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in one_line(s).chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            out.push_str(&format!("\\x{{{:X}}}", u32::from(c)));
        }
    }
    out
}

/// Controls (CR, LF, tab, ...) become spaces; white space is collapsed.
fn one_line(s: &str) -> String {
    s.split(|c: char| c.is_control() || c.is_whitespace())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn rfc5322(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .unwrap_or_default()
        .to_rfc2822()
}

/// Something safe on either side of the `@` of a Message-ID, at most
/// `max` octets, so that the field stays within a line.
fn dot_atom(s: &str, fallback: &str, max: usize) -> String {
    let s: String = s
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .take(max)
        .collect();
    let s = s.trim_matches('.');
    if s.is_empty() {
        fallback.to_string()
    } else {
        s.to_string()
    }
}

/// An address for the From and To fields: an address cannot be folded,
/// so one too long for a line (no real one is: RFC 5321 §4.5.3.1 allows
/// 256 octets) is cut. The envelope, not this field, says where the
/// notification goes.
fn header_address(addr: &str) -> &str {
    // Quoting may double it.
    const MAX: usize = 450;
    if addr.len() <= MAX {
        return addr;
    }
    let mut end = MAX;
    while !addr.is_char_boundary(end) {
        end -= 1;
    }
    &addr[..end]
}

// ---------------------------------------------------------------------------
// The returned original

/// The original with bare CR and bare LF made CRLF. The store only holds
/// canonical messages, so this borrows; it is here so that a DSN can never
/// carry a bare line end whatever it is given.
fn crlf_canonical(b: &[u8]) -> Cow<'_, [u8]> {
    let bare = b.iter().enumerate().any(|(i, &c)| match c {
        b'\r' => b.get(i + 1) != Some(&b'\n'),
        b'\n' => i == 0 || b[i - 1] != b'\r',
        _ => false,
    });
    if !bare {
        return Cow::Borrowed(b);
    }
    let mut out = Vec::with_capacity(b.len() + 64);
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                if b.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\r\n"),
            c => out.push(c),
        }
        i += 1;
    }
    Cow::Owned(out)
}

/// Length of the header section including the CRLF of its last line: up to
/// the first empty line, or everything when there is none.
fn header_section_len(b: &[u8]) -> usize {
    if b.starts_with(b"\r\n") {
        return 0;
    }
    b.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(b.len(), |p| p + 2)
}

fn lines(b: &[u8]) -> impl Iterator<Item = &[u8]> {
    b.split_inclusive(|&c| c == b'\n')
}

fn content_len(line: &[u8]) -> usize {
    line.strip_suffix(b"\r\n").unwrap_or(line).len()
}

fn has_long_line(b: &[u8]) -> bool {
    lines(b).any(|l| content_len(l) > 998)
}

/// Header lines over 998 octets are cut by folding (CRLF SP), so the
/// returned headers stay within RFC 5322 even when the message came in
/// with longer lines (`smtp.max_line_length`). Usually nothing to cut, and
/// this borrows.
fn fold_long_lines(b: &[u8]) -> Cow<'_, [u8]> {
    if !has_long_line(b) {
        return Cow::Borrowed(b);
    }
    let mut out = Vec::with_capacity(b.len() + 64);
    for line in lines(b) {
        let len = content_len(line);
        let (text, end) = line.split_at(len);
        let mut chunks = text.chunks(990);
        if let Some(first) = chunks.next() {
            out.extend_from_slice(first);
        }
        for chunk in chunks {
            out.extend_from_slice(b"\r\n ");
            out.extend_from_slice(chunk);
        }
        out.extend_from_slice(end);
    }
    Cow::Owned(out)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------
// The text for people

// Short enough that mail-builder keeps an ASCII text 7bit (it switches to
// quoted-printable for lines of more than 77 octets with the CRLF).
const WIDTH: usize = 72;

fn human_text(req: &DsnRequest<'_>, returned: Returned) -> String {
    let mut t = String::new();
    let host = one_line(req.reporting_mta);
    let n = req.recipients.len();
    let whom = if n == 1 {
        "the recipient below".to_string()
    } else {
        format!("the {n} recipients below")
    };
    match req.kind {
        DsnKind::Failure => {
            para(
                &mut t,
                &format!(
                    "This is the mail gateway at {host}. Your message could not be \
                     delivered to {whom}. The gateway has stopped trying: the message \
                     will not reach {} unless you send it again.",
                    if n == 1 { "them" } else { "those recipients" }
                ),
                "",
                "",
            );
        }
        DsnKind::Delay => {
            para(
                &mut t,
                &format!(
                    "This is the mail gateway at {host}. This is only a warning: there \
                     is nothing you need to do yet."
                ),
                "",
                "",
            );
            t.push_str("\r\n");
            let until = req
                .recipients
                .iter()
                .filter_map(|r| r.will_retry_until)
                .max()
                .map_or_else(|| "it gives up".to_string(), rfc5322);
            para(
                &mut t,
                &format!(
                    "Your message has not been delivered yet to {whom}. It is kept \
                     safely in the gateway's queue, waiting because the network link \
                     or the receiving mail server is not available at the moment. The \
                     gateway will keep trying until {until}. If it still cannot \
                     deliver the message by then, you will get another report."
                ),
                "",
                "",
            );
        }
    }
    t.push_str("\r\n");
    para(
        &mut t,
        &format!("Received by the gateway: {}", rfc5322(req.arrival)),
        "",
        "    ",
    );
    para(
        &mut t,
        &format!("Queue ID: {}", one_line(req.queue_id)),
        "",
        "    ",
    );

    for r in req.recipients {
        t.push_str("\r\n");
        recipient_text(&mut t, req.kind, r);
    }

    if req.kind == DsnKind::Failure {
        let mut advice: Vec<&str> = Vec::new();
        for r in req.recipients {
            let a = advice_for(parse_status(&status_code(req.kind, &r.status)));
            if !advice.contains(&a) {
                advice.push(a);
            }
        }
        t.push_str("\r\nWhat you can do:\r\n");
        for a in advice {
            para(&mut t, a, "  - ", "    ");
        }
    }

    t.push_str("\r\n");
    let note = match returned {
        Returned::Full => "A copy of your message is attached below.",
        Returned::Headers => {
            "The headers of your message (sender, recipients, subject, date) are \
             attached below so you can tell which message this is."
        }
        Returned::HeadersLongLines => {
            "Only the headers of your message are attached below: it has lines \
             too long to be sent back in full."
        }
    };
    para(&mut t, note, "", "");
    t.push_str("\r\n");
    para(
        &mut t,
        &format!(
            "If you need help, forward this whole report to your administrator; \
             the queue ID above lets them find the message ({}).",
            one_line(req.queue_id)
        ),
        "",
        "",
    );
    t
}

fn recipient_text(t: &mut String, kind: DsnKind, r: &DsnRecipient) {
    let status = status_code(kind, &r.status);
    let parsed = parse_status(&status);
    para(t, &format!("<{}>", one_line(&r.address)), "  ", "    ");
    let server = match r.remote_mta.as_deref().map(one_line) {
        Some(m) => {
            let host = m.split_once(';').map_or(m.as_str(), |(_, h)| h).trim();
            format!("The receiving server ({host})")
        }
        None => "The receiving side".to_string(),
    };
    const IND: &str = "      ";
    const QUOTE: &str = "          ";
    let attempt = r
        .last_attempt
        .map(|t| format!("Last attempt: {}. ", rfc5322(t)))
        .unwrap_or_default();
    match &r.diagnostic {
        Some(d) => {
            para(t, &format!("{attempt}{server} answered:"), IND, IND);
            para(t, &one_line(d), QUOTE, QUOTE);
        }
        None if !attempt.is_empty() => para(t, attempt.trim_end(), IND, IND),
        None => {}
    }
    para(
        t,
        &format!("This means: {} (status {status})", meaning(parsed)),
        IND,
        IND,
    );
    if let (DsnKind::Delay, Some(until)) = (kind, r.will_retry_until) {
        para(
            t,
            &format!("The gateway keeps trying until: {}", rfc5322(until)),
            IND,
            IND,
        );
    }
}

/// What an enhanced status code (RFC 3463) means, for someone who is not a
/// mail expert.
fn meaning(status: Option<(u16, u16, u16)>) -> &'static str {
    let Some((_, subject, detail)) = status else {
        return "the message could not be delivered; no more detail is known.";
    };
    match (subject, detail) {
        (1, 1) => "this address does not exist at the receiving side.",
        (1, 2) => {
            "the domain of this address (the part after @) does not exist or \
             does not receive mail."
        }
        (1, 3) => "this address is not written correctly.",
        (1, 6) => "the recipient has moved and left no forwarding address.",
        (1, 10) => "the domain of this address does not accept any mail.",
        (1, _) => "there is a problem with this address.",
        (2, 1) => "the recipient's mailbox is disabled.",
        (2, 2) => "the recipient's mailbox is full.",
        (2, 3) | (3, 4) => "the message is too big for the receiving side.",
        (2, _) => "there is a problem with the recipient's mailbox.",
        (3, _) => "the receiving mail system has a problem.",
        (4, 1) | (4, 2) => "the receiving server did not answer, or the connection to it was lost.",
        (4, 4) => "the gateway could not find a way to deliver to that domain.",
        (4, 7) => {
            "the message waited in the queue for too long without the gateway \
             being able to deliver it."
        }
        (4, _) => "there was a network or routing problem.",
        (5, _) => "the mail servers could not understand each other.",
        (6, _) => "the receiving side cannot handle the content or format of the message.",
        (7, 1) => {
            "the receiving side does not accept this message from you (its rules \
             or its spam filter refused it)."
        }
        (7, _) => "the message was refused for security or policy reasons.",
        _ => "the message could not be delivered.",
    }
}

fn advice_for(status: Option<(u16, u16, u16)>) -> &'static str {
    match status.map(|(_, s, d)| (s, d)) {
        Some((1, _)) => {
            "Check the address for typing mistakes and send the message again, or \
             ask the recipient for their correct address."
        }
        Some((2, 2)) => "Send the message again later, or reach the recipient another way.",
        Some((2, 3) | (3, 4)) => {
            "Send a smaller message: for example, share large attachments \
             through a link instead of attaching them."
        }
        Some((4, _)) => {
            "Send the message again later. If this keeps happening, tell your \
             administrator: the network link or the receiving server may be down \
             for a long time."
        }
        Some((7, _)) => {
            "Reach the recipient another way, or forward this report to your \
             administrator."
        }
        _ => "If the reason is not clear, forward this report to your administrator.",
    }
}

/// Appends `text` word-wrapped at [`WIDTH`] columns, first line after
/// `first`, the others after `rest`; every line ends CRLF, none ends in a
/// space. A word longer than a line stays whole (quoted-printable copes).
fn para(out: &mut String, text: &str, first: &str, rest: &str) {
    out.push_str(first);
    let mut col = first.chars().count();
    let mut empty = true;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let len = word.chars().count();
        if !empty && col + 1 + len > WIDTH {
            out.push_str("\r\n");
            out.push_str(rest);
            col = rest.chars().count();
        } else if !empty {
            out.push(' ');
            col += 1;
        }
        out.push_str(word);
        col += len;
        empty = false;
    }
    out.push_str("\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &[u8] = b"Received: from pc1 by outpost.branch.example;\r\n\
        \tMon, 1 Jan 2024 10:00:00 +0000\r\n\
        From: Alice <alice@branch.example>\r\n\
        To: bob@hq.example\r\n\
        Subject: Quarterly figures\r\n\
        \r\n\
        Hello Bob,\r\n\
        the figures are attached.\r\n";

    fn recipient(addr: &str, status: &str, diag: &str) -> DsnRecipient {
        DsnRecipient {
            address: addr.into(),
            orcpt: Some(format!("rfc822;{addr}")),
            status: status.into(),
            diagnostic: Some(diag.into()),
            remote_mta: Some("dns; smtp.hq.example".into()),
            last_attempt: Some(1_704_110_400), // Mon, 1 Jan 2024 12:00:00
            will_retry_until: Some(1_704_499_200), // Sat, 6 Jan 2024 00:00:00
        }
    }

    fn request<'a>(
        kind: DsnKind,
        recipients: &'a [DsnRecipient],
        original: &'a [u8],
        return_full: bool,
    ) -> DsnRequest<'a> {
        DsnRequest {
            kind,
            reporting_mta: "outpost.branch.example",
            queue_id: "3ZK1QWBCDFGH",
            envid: Some("env-42"),
            arrival: 1_704_103_200, // Mon, 1 Jan 2024 10:00:00
            to: "alice@branch.example",
            from: "MAILER-DAEMON@outpost.branch.example",
            recipients,
            original,
            return_full,
            now: 1_704_200_000,
        }
    }

    /// A parsed multipart: top headers, and each part as (headers, body).
    struct Parsed {
        headers: String,
        parts: Vec<(String, Vec<u8>)>,
    }

    fn split_once<'a>(b: &'a [u8], sep: &[u8]) -> (&'a [u8], &'a [u8]) {
        let p = b
            .windows(sep.len())
            .position(|w| w == sep)
            .unwrap_or_else(|| panic!("{:?} not found", String::from_utf8_lossy(sep)));
        (&b[..p], &b[p + sep.len()..])
    }

    fn parse(msg: &[u8]) -> Parsed {
        let (head, body) = split_once(msg, b"\r\n\r\n");
        let headers = String::from_utf8(head.to_vec()).unwrap() + "\r\n";
        let unfolded = headers.replace("\r\n ", " ").replace("\r\n\t", " ");
        let ct = unfolded
            .lines()
            .find(|l| l.starts_with("Content-Type:"))
            .expect("Content-Type");
        let boundary = ct.split("boundary=\"").nth(1).unwrap().split('"').next();
        let boundary = boundary.unwrap();
        let delim = format!("\r\n--{boundary}");
        // No preamble: the first delimiter follows the header section's CRLF.
        let body_with_crlf = [b"\r\n".as_slice(), body].concat();
        let close = format!("{delim}--\r\n");
        assert!(
            body_with_crlf.ends_with(close.as_bytes()),
            "closing delimiter"
        );
        let inner = &body_with_crlf[..body_with_crlf.len() - close.len()];
        let mut parts = Vec::new();
        let mut rest = inner;
        let (pre, after) = split_once(rest, delim.as_bytes());
        assert!(pre.is_empty());
        rest = after;
        loop {
            let (chunk, next) = match rest
                .windows(delim.len())
                .position(|w| w == delim.as_bytes())
            {
                Some(p) => (&rest[..p], Some(&rest[p + delim.len()..])),
                None => (rest, None),
            };
            let chunk = chunk.strip_prefix(b"\r\n").expect("CRLF after delimiter");
            let (h, b) = split_once(chunk, b"\r\n\r\n");
            parts.push((String::from_utf8(h.to_vec()).unwrap() + "\r\n", b.to_vec()));
            match next {
                Some(n) => rest = n,
                None => break,
            }
        }
        Parsed { headers, parts }
    }

    fn assert_canonical(msg: &[u8]) {
        for (i, &c) in msg.iter().enumerate() {
            match c {
                b'\r' => assert_eq!(msg.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
                b'\n' => assert!(i > 0 && msg[i - 1] == b'\r', "bare LF at {i}"),
                _ => {}
            }
        }
        assert!(msg.ends_with(b"\r\n"));
        for line in msg.split(|&c| c == b'\n') {
            assert!(line.len() <= 999, "line of {} octets", line.len() - 1);
        }
    }

    fn header<'a>(headers: &'a str, name: &str) -> Vec<&'a str> {
        headers
            .split("\r\n")
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
            .collect()
    }

    #[test]
    fn structure_and_top_headers() {
        let rcpts = [recipient(
            "bob@hq.example",
            "5.1.1",
            "550 5.1.1 no such user",
        )];
        let req = request(DsnKind::Failure, &rcpts, ORIGINAL, false);
        let msg = build(&req);
        assert_canonical(&msg);
        let p = parse(&msg);
        let h = &p.headers;
        assert_eq!(
            header(h, "From"),
            ["\"Mail Delivery System\" <MAILER-DAEMON@outpost.branch.example>"]
        );
        assert_eq!(header(h, "To"), ["<alice@branch.example>"]);
        assert_eq!(
            header(h, "Subject"),
            ["Undelivered Mail Returned to Sender"]
        );
        assert_eq!(header(h, "Date"), ["Tue, 2 Jan 2024 12:53:20 +0000"]);
        assert_eq!(header(h, "MIME-Version"), ["1.0"]);
        assert_eq!(header(h, "Auto-Submitted"), ["auto-replied"]);
        let mid = header(h, "Message-ID");
        assert_eq!(mid.len(), 1);
        assert!(
            mid[0].starts_with("<1704200000.3ZK1QWBCDFGH."),
            "{}",
            mid[0]
        );
        assert!(mid[0].ends_with("@outpost.branch.example>"), "{}", mid[0]);
        let ct = h.replace("\r\n ", " ");
        let ct = header(&ct, "Content-Type");
        assert_eq!(ct.len(), 1);
        assert!(
            ct[0].starts_with("multipart/report; report-type=\"delivery-status\"; boundary="),
            "{}",
            ct[0]
        );

        assert_eq!(p.parts.len(), 3);
        let types: Vec<_> = p
            .parts
            .iter()
            .map(|(h, _)| header(h, "Content-Type")[0].to_string())
            .collect();
        assert_eq!(
            types,
            [
                "text/plain; charset=\"utf-8\"",
                "message/delivery-status",
                "text/rfc822-headers"
            ]
        );
        assert_eq!(header(&p.parts[1].0, "Content-Transfer-Encoding"), ["7bit"]);
        assert_eq!(header(&p.parts[2].0, "Content-Transfer-Encoding"), ["7bit"]);

        // The text is plain 7bit for an ASCII report, and says what happened.
        assert_eq!(header(&p.parts[0].0, "Content-Transfer-Encoding"), ["7bit"]);
        let text = String::from_utf8(p.parts[0].1.clone()).unwrap();
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for want in [
            "could not be delivered to the recipient below",
            "<bob@hq.example>",
            "The receiving server (smtp.hq.example) answered: 550 5.1.1 no such user",
            "This means: this address does not exist at the receiving side. (status 5.1.1)",
            "What you can do: - Check the address for typing mistakes",
            "Queue ID: 3ZK1QWBCDFGH",
            "The headers of your message",
        ] {
            assert!(flat.contains(want), "missing {want:?} in {text}");
        }
        assert!(text.lines().all(|l| l.len() <= WIDTH), "{text}");
    }

    #[test]
    fn delivery_status_fields_exact() {
        let mut second = recipient(
            "carol@hq.example",
            "5.2.2",
            "552-5.2.2 mailbox\r\n552 5.2.2 full",
        );
        second.orcpt = None;
        second.remote_mta = Some("mx2.hq.example".into());
        second.last_attempt = None;
        let rcpts = [
            recipient("bob@hq.example", "5.1.1", "550 5.1.1 no such user"),
            second,
        ];
        let msg = build(&request(DsnKind::Failure, &rcpts, ORIGINAL, false));
        let p = parse(&msg);
        let status = String::from_utf8(p.parts[1].1.clone()).unwrap();
        assert_eq!(
            status,
            "Original-Envelope-Id: env-42\r\n\
             Reporting-MTA: dns; outpost.branch.example\r\n\
             Arrival-Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n\
             X-Outpost-Queue-ID: 3ZK1QWBCDFGH\r\n\
             \r\n\
             Original-Recipient: rfc822;bob@hq.example\r\n\
             Final-Recipient: rfc822; bob@hq.example\r\n\
             Action: failed\r\n\
             Status: 5.1.1\r\n\
             Remote-MTA: dns; smtp.hq.example\r\n\
             Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n\
             Last-Attempt-Date: Mon, 1 Jan 2024 12:00:00 +0000\r\n\
             \r\n\
             Final-Recipient: rfc822; carol@hq.example\r\n\
             Action: failed\r\n\
             Status: 5.2.2\r\n\
             Remote-MTA: dns; mx2.hq.example\r\n\
             Diagnostic-Code: smtp; 552-5.2.2 mailbox 552 5.2.2 full\r\n"
        );
        // Will-Retry-Until belongs to delay reports only.
        assert!(!status.contains("Will-Retry-Until"));
        let text = String::from_utf8(p.parts[0].1.clone()).unwrap();
        assert!(text.contains("the 2 recipients below"), "{text}");
        assert!(text.contains("mailbox is full"), "{text}");
        assert!(
            text.contains("Send the message again later, or reach"),
            "{text}"
        );
    }

    #[test]
    fn no_envid_and_bad_status() {
        let mut r = recipient("bob@hq.example", "bogus", "550 no");
        r.diagnostic = None;
        r.remote_mta = None;
        let rcpts = [r];
        let mut req = request(DsnKind::Failure, &rcpts, ORIGINAL, false);
        req.envid = None;
        let p = parse(&build(&req));
        let status = String::from_utf8(p.parts[1].1.clone()).unwrap();
        assert!(status.starts_with("Reporting-MTA: dns; outpost.branch.example\r\n"));
        assert!(!status.contains("Original-Envelope-Id"));
        assert!(status.contains("\r\nStatus: 5.0.0\r\n"), "{status}");
        assert!(!status.contains("Remote-MTA") && !status.contains("Diagnostic-Code"));
    }

    #[test]
    fn ret_full_returns_the_whole_message_exactly() {
        let rcpts = [recipient(
            "bob@hq.example",
            "5.1.1",
            "550 5.1.1 no such user",
        )];
        let msg = build(&request(DsnKind::Failure, &rcpts, ORIGINAL, true));
        assert_canonical(&msg);
        let p = parse(&msg);
        assert_eq!(header(&p.parts[2].0, "Content-Type"), ["message/rfc822"]);
        assert_eq!(header(&p.parts[2].0, "Content-Transfer-Encoding"), ["7bit"]);
        assert_eq!(p.parts[2].1, ORIGINAL);
        let text = String::from_utf8(p.parts[0].1.clone()).unwrap();
        assert!(
            text.contains("A copy of your message is attached"),
            "{text}"
        );
    }

    #[test]
    fn ret_hdrs_returns_the_header_section_only() {
        let rcpts = [recipient(
            "bob@hq.example",
            "5.1.1",
            "550 5.1.1 no such user",
        )];
        let msg = build(&request(DsnKind::Failure, &rcpts, ORIGINAL, false));
        let p = parse(&msg);
        let end = ORIGINAL.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 2;
        assert_eq!(p.parts[2].1, &ORIGINAL[..end]);
        assert!(!contains(&msg, b"Hello Bob"));
    }

    #[test]
    fn eight_bit_original_is_kept_exactly() {
        let original: &[u8] = b"From: Ren\xc3\xa9 <rene@branch.example>\r\n\
            Subject: =?utf-8?q?caf=C3=A9?=\r\n\
            Content-Type: text/plain; charset=iso-8859-1\r\n\
            Content-Transfer-Encoding: 8bit\r\n\
            \r\n\
            Caf\xe9 cr\xe8me, \xff\xfe\x80 bytes\r\n.dot line\r\n";
        let rcpts = [recipient("bob@hq.example", "5.7.1", "550 5.7.1 spam")];

        let full = build(&request(DsnKind::Failure, &rcpts, original, true));
        assert_canonical(&full);
        let p = parse(&full);
        assert_eq!(header(&p.parts[2].0, "Content-Type"), ["message/rfc822"]);
        assert_eq!(header(&p.parts[2].0, "Content-Transfer-Encoding"), ["8bit"]);
        assert_eq!(p.parts[2].1, original);
        // The report itself stays ASCII.
        assert!(p.parts[1].1.is_ascii());

        let hdrs = build(&request(DsnKind::Failure, &rcpts, original, false));
        let p = parse(&hdrs);
        assert_eq!(
            header(&p.parts[2].0, "Content-Type"),
            ["text/rfc822-headers"]
        );
        assert_eq!(header(&p.parts[2].0, "Content-Transfer-Encoding"), ["8bit"]);
        let end = original.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 2;
        assert_eq!(p.parts[2].1, &original[..end]);
    }

    #[test]
    fn delay_warning() {
        let rcpts = [recipient("bob@hq.example", "4.4.1", "connection timed out")];
        // RET=FULL governs failure reports only: a warning carries headers.
        let msg = build(&request(DsnKind::Delay, &rcpts, ORIGINAL, true));
        assert_canonical(&msg);
        let p = parse(&msg);
        assert_eq!(
            header(&p.headers, "Subject"),
            ["Delayed Mail (still being retried)"]
        );
        let status = String::from_utf8(p.parts[1].1.clone()).unwrap();
        let group = status.split("\r\n\r\n").nth(1).unwrap();
        assert_eq!(
            group,
            "Original-Recipient: rfc822;bob@hq.example\r\n\
             Final-Recipient: rfc822; bob@hq.example\r\n\
             Action: delayed\r\n\
             Status: 4.4.1\r\n\
             Remote-MTA: dns; smtp.hq.example\r\n\
             Diagnostic-Code: smtp; connection timed out\r\n\
             Last-Attempt-Date: Mon, 1 Jan 2024 12:00:00 +0000\r\n\
             Will-Retry-Until: Sat, 6 Jan 2024 00:00:00 +0000\r\n"
        );
        assert_eq!(
            header(&p.parts[2].0, "Content-Type"),
            ["text/rfc822-headers"]
        );
        assert!(!contains(&msg, b"Hello Bob"));
        let text = String::from_utf8(p.parts[0].1.clone()).unwrap();
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for want in [
            "only a warning: there is nothing you need to do yet",
            "has not been delivered yet to the recipient below",
            "network link or the receiving mail server is not available",
            "will keep trying until Sat, 6 Jan 2024 00:00:00 +0000",
            "did not answer, or the connection to it was lost",
        ] {
            assert!(flat.contains(want), "missing {want:?} in {text}");
        }
        assert!(!flat.contains("What you can do"), "{text}");
    }

    #[test]
    fn message_ids_and_boundaries_are_unique() {
        let rcpts = [recipient(
            "bob@hq.example",
            "5.1.1",
            "550 5.1.1 no such user",
        )];
        let req = request(DsnKind::Failure, &rcpts, ORIGINAL, false);
        let (a, b) = (parse(&build(&req)), parse(&build(&req)));
        assert_ne!(
            header(&a.headers, "Message-ID"),
            header(&b.headers, "Message-ID")
        );
        assert_ne!(
            header(&a.headers.replace("\r\n ", " "), "Content-Type"),
            header(&b.headers.replace("\r\n ", " "), "Content-Type")
        );
    }

    #[test]
    fn hostile_and_long_values_keep_lines_short_and_canonical() {
        let long_word = "x".repeat(2500);
        let long_text = "word ".repeat(400);
        let mut r = recipient("bob@hq.example", "5.0.0", &format!("550 {long_word}"));
        r.remote_mta = Some(format!("dns; {long_text}\r\ninjected: yes"));
        let mut r2 = recipient("c@hq.example", "5.0.0", &long_text);
        r2.orcpt = Some("rfc822;c@hq.example\rX-Evil: 1\n".into());
        let rcpts = [r, r2];
        let mut req = request(DsnKind::Failure, &rcpts, ORIGINAL, true);
        req.envid = Some("a\r\nReporting-MTA: dns; evil");
        let msg = build(&req);
        assert_canonical(&msg);
        let p = parse(&msg);
        let status = String::from_utf8(p.parts[1].1.clone()).unwrap();
        // Every field line starts a real field; injected text stays inside values.
        let unfolded = status.replace("\r\n ", " ");
        assert_eq!(unfolded.matches("Reporting-MTA:").count(), 2, "{unfolded}");
        assert!(unfolded.starts_with("Original-Envelope-Id: a Reporting-MTA: dns; evil\r\n"));
        assert!(!unfolded.contains("\r\ninjected"));
        assert!(!unfolded.contains("\r\nX-Evil"));
        // The one word too long for a line is cut by folding, not lost.
        let diag = unfolded
            .split("\r\n")
            .find(|l| l.starts_with("Diagnostic-Code: smtp; 550 x"));
        assert_eq!(diag.unwrap().matches('x').count(), 2500);
    }

    /// Found by the `dsn` fuzz target: a reporting MTA name (here 1125
    /// octets) went whole into the Message-ID, a header line of 1182
    /// octets; a long address did the same to To and From.
    #[test]
    fn long_names_and_addresses_keep_header_lines_short() {
        let mta = [&b"rfc822;x@elsewhere.example\xeb"[..], &[b'w'; 1098][..]].concat();
        let mta = String::from_utf8_lossy(&mta).into_owned();
        assert_eq!(mta.len(), 1127);
        let rcpts = [recipient(
            "x@elsewhere.example",
            "5.1.1",
            "550 5.1.1 unknown",
        )];
        let mut req = request(DsnKind::Failure, &rcpts, ORIGINAL, false);
        req.reporting_mta = &mta;
        let msg = build(&req);
        assert_canonical(&msg);
        let p = parse(&msg);
        let id = header(&p.headers, "Message-ID")[0];
        assert!(id.contains("@rfc822xelsewhere.examplewww"), "{id}");
        assert!(id.len() < 400, "{id}");

        let long = format!("{}@branch.example", "a".repeat(1500));
        let mut req = request(DsnKind::Failure, &rcpts, ORIGINAL, false);
        req.to = &long;
        req.from = &long;
        let msg = build(&req);
        assert_canonical(&msg);
        assert!(parse(&msg).headers.contains("<aaaaaaaa"));
    }

    #[test]
    fn non_ascii_addresses_become_rfc6533_utf8_addresses() {
        let mut r = recipient(
            "j\u{fc}rgen@hq.example",
            "5.1.1",
            "550 5.1.1 unbekannt \u{2013} nein",
        );
        r.orcpt = Some("rfc822;j\u{fc}rgen+x@hq.example".into());
        let rcpts = [r];
        let msg = build(&request(DsnKind::Failure, &rcpts, ORIGINAL, false));
        assert_canonical(&msg);
        let p = parse(&msg);
        let status = String::from_utf8(p.parts[1].1.clone()).unwrap();
        assert!(status.is_ascii());
        assert!(
            status.contains("\r\nOriginal-Recipient: utf-8;j\\x{FC}rgen\\x{2B}x@hq.example\r\n"),
            "{status}"
        );
        assert!(
            status.contains("\r\nFinal-Recipient: utf-8; j\\x{FC}rgen@hq.example\r\n"),
            "{status}"
        );
        assert!(status.contains("Diagnostic-Code: smtp; 550 5.1.1 unbekannt \\x{2013} nein\r\n"));
        // The human text keeps the real characters, in quoted-printable.
        assert_eq!(
            header(&p.parts[0].0, "Content-Transfer-Encoding"),
            ["quoted-printable"]
        );
        assert!(contains(&p.parts[0].1, b"<j=C3=BCrgen@hq.example>"));
    }

    #[test]
    fn non_canonical_or_long_originals_are_made_safe() {
        // Long lines are stored as they came (smtp.max_line_length); bare
        // CR/LF never are. The DSN must stay valid either way.
        let mut original = b"Subject: bare\nX-Long: ".to_vec();
        original.extend(std::iter::repeat_n(b'h', 1500));
        original.extend_from_slice(b"\r\n\r\nbody\rmore\n");
        original.extend(std::iter::repeat_n(b'b', 1200));
        original.extend_from_slice(b"\r\n");
        let rcpts = [recipient(
            "bob@hq.example",
            "5.1.1",
            "550 5.1.1 no such user",
        )];
        let msg = build(&request(DsnKind::Failure, &rcpts, &original, true));
        assert_canonical(&msg);
        let p = parse(&msg);
        // Full return impossible in 8bit with a 1200-octet line: headers only.
        assert_eq!(
            header(&p.parts[2].0, "Content-Type"),
            ["text/rfc822-headers"]
        );
        let hdrs = &p.parts[2].1;
        assert!(hdrs.starts_with(b"Subject: bare\r\nX-Long: hhh"));
        let unfolded = String::from_utf8(hdrs.clone())
            .unwrap()
            .replace("\r\n ", "");
        assert_eq!(
            unfolded,
            format!("Subject: bare\r\nX-Long: {}\r\n", "h".repeat(1500))
        );
        let text = String::from_utf8(p.parts[0].1.clone()).unwrap();
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(flat.contains("too long to be sent back"), "{text}");
    }

    /// Python's own MIME parser must read the report as a DSN.
    #[test]
    fn python_email_package_parses_the_report() {
        const SCRIPT: &str = r#"
import email, email.policy, sys
path, kind, action, status, final, third = sys.argv[1:7]
with open(path, 'rb') as f:
    msg = email.message_from_bytes(f.read(), policy=email.policy.default)
assert msg.get_content_type() == 'multipart/report', msg.get_content_type()
assert msg.get_param('report-type') == 'delivery-status', msg.get_param('report-type')
assert str(msg['Auto-Submitted']) == 'auto-replied'
parts = msg.get_payload()
assert len(parts) == 3, len(parts)
assert parts[0].get_content_type() == 'text/plain'
assert 'bob@hq.example' in parts[0].get_content()
ds = parts[1]
assert ds.get_content_type() == 'message/delivery-status', ds.get_content_type()
blocks = ds.get_payload()
assert isinstance(blocks, list) and len(blocks) == 3, blocks
assert str(blocks[0]['Reporting-MTA']) == 'dns; outpost.branch.example', blocks[0]['Reporting-MTA']
rcpt = blocks[1]
assert str(rcpt['Status']) == status, rcpt['Status']
assert str(rcpt['Final-Recipient']) == final, rcpt['Final-Recipient']
assert str(rcpt['Action']) == action, rcpt['Action']
assert str(blocks[2]['Final-Recipient']) == 'rfc822; carol@hq.example'
assert parts[2].get_content_type() == third, parts[2].get_content_type()
if third == 'message/rfc822':
    inner = parts[2].get_payload()[0]
    assert str(inner['Subject']) == 'Quarterly figures', inner['Subject']
for part in msg.walk():
    assert not part.defects, (part.get_content_type(), part.defects)
print('ok', kind)
"#;
        let carol = recipient("carol@hq.example", "5.2.2", "552 5.2.2 full");
        let mut original = ORIGINAL.to_vec();
        original.extend_from_slice(b"Gr\xc3\xbc\xc3\x9fe \xe9\r\n");
        let cases = [
            (DsnKind::Failure, "failed", "5.1.1", true, "message/rfc822"),
            (
                DsnKind::Failure,
                "failed",
                "5.1.1",
                false,
                "text/rfc822-headers",
            ),
            (
                DsnKind::Delay,
                "delayed",
                "4.4.1",
                true,
                "text/rfc822-headers",
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        for (i, (kind, action, status, full, third)) in cases.into_iter().enumerate() {
            let mut c = carol.clone();
            c.status = status.replace('1', "2");
            let rcpts = [
                recipient("bob@hq.example", status, "550 5.1.1 no such user"),
                c,
            ];
            let msg = build(&request(kind, &rcpts, &original, full));
            let path = dir.path().join(format!("dsn{i}.eml"));
            std::fs::write(&path, &msg).unwrap();
            let out = std::process::Command::new("/usr/bin/python3")
                .arg("-c")
                .arg(SCRIPT)
                .arg(&path)
                .arg(format!("{kind:?}"))
                .arg(action)
                .arg(status)
                .arg("rfc822; bob@hq.example")
                .arg(third)
                .output()
                .expect("run /usr/bin/python3");
            assert!(
                out.status.success(),
                "case {i}: python said:\n{}\n{}\nmessage:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&msg)
            );
        }
    }

    #[test]
    fn addresses_that_need_quoting_are_quoted_in_the_report() {
        let recipients = [DsnRecipient {
            address: "a> NOTIFY=NEVER@hq.example".into(),
            ..recipient("x@hq.example", "5.1.1", "550 5.1.1 no such user")
        }];
        let mut req = request(DsnKind::Failure, &recipients, ORIGINAL, false);
        // Stored as parsed: the local part without its quotes.
        req.to = "odd> RET=FULL ENVID=x@outside.example";
        let p = parse(&build(&req));
        assert!(
            p.headers
                .contains("To: <\"odd> RET=FULL ENVID=x\"@outside.example>\r\n"),
            "{}",
            p.headers
        );
        let status = String::from_utf8_lossy(&p.parts[1].1).to_string();
        assert!(
            status.contains("Final-Recipient: rfc822; \"a> NOTIFY=NEVER\"@hq.example\r\n"),
            "{status}"
        );
    }
}
