//! Delivery status notifications (`relay::dsn::build`) from any input:
//! addresses, ORCPT, status and reply texts, ENVID, host names, queue ids
//! and the original message.
//!
//! Input: NUL-separated fields: flags (octet 0: bit 0 delay, bit 1
//! RET=FULL; octet 1: recipients - 1, modulo 3), to, from, ENVID,
//! queue id, reporting MTA, then per recipient address, ORCPT, status,
//! diagnostic, remote MTA (empty: none), and the rest is the original
//! message. Asserts that the DSN
//! - has CRLF line ends only and no line over 998 octets;
//! - has a header section of well-formed fields, each of the expected
//!   names once (nothing added through a value), without control
//!   characters;
//! - is `multipart/report` with exactly three parts under its boundary,
//!   the second one US-ASCII with one Final-Recipient and one Action per
//!   recipient;
//! - parses as a message (mail-parser) with three parts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::relay::dsn::{build, DsnKind, DsnRecipient, DsnRequest};

const HEADER_NAMES: [&str; 9] = [
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "auto-submitted",
    "content-type",
    "content-transfer-encoding",
];

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn optional(b: &[u8]) -> Option<String> {
    (!b.is_empty()).then(|| text(b))
}

/// Lines (without CRLF) of `b`, checking that every line end is CRLF.
fn crlf_lines(b: &[u8]) -> Vec<&[u8]> {
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'\r' => assert_eq!(b.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
            b'\n' => assert!(i > 0 && b[i - 1] == b'\r', "bare LF at {i}"),
            _ => {}
        }
    }
    assert!(b.ends_with(b"\r\n"), "no final CRLF");
    b[..b.len() - 2]
        .split(|&c| c == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .collect()
}

/// Checks a header section's lines; returns the field names, lower case.
fn fields(lines: &[&[u8]]) -> Vec<String> {
    let mut names = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        assert!(
            !line.iter().any(|&c| (c < 0x20 && c != b'\t') || c == 0x7f),
            "control character in header line {:?}",
            text(line)
        );
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            assert!(i > 0, "continuation without a field");
            continue;
        }
        let colon = line
            .iter()
            .position(|&c| c == b':')
            .unwrap_or_else(|| panic!("header line without a colon: {:?}", text(line)));
        let name = &line[..colon];
        assert!(
            !name.is_empty() && name.iter().all(|&c| c.is_ascii_graphic()),
            "bad field name {:?}",
            text(name)
        );
        names.push(text(name).to_ascii_lowercase());
    }
    names
}

fuzz_target!(|data: &[u8]| {
    let mut it = data.splitn(6, |&b| b == 0);
    let (Some(flags), Some(to), Some(from), Some(envid), Some(queue_id), Some(rest)) = (
        it.next(),
        it.next(),
        it.next(),
        it.next(),
        it.next(),
        it.next(),
    ) else {
        return;
    };
    let kind = if flags.first().is_some_and(|f| f & 1 != 0) {
        DsnKind::Delay
    } else {
        DsnKind::Failure
    };
    let return_full = flags.first().is_some_and(|f| f & 2 != 0);
    let count = usize::from(flags.get(1).copied().unwrap_or(0) % 3) + 1;
    let mut it = rest.splitn(2 + 5 * count, |&b| b == 0);
    let Some(reporting_mta) = it.next() else {
        return;
    };
    let mut recipients = Vec::new();
    for i in 0..count {
        let f: Vec<&[u8]> = (0..5).map_while(|_| it.next()).collect();
        let [address, orcpt, status, diagnostic, remote_mta] = f[..] else {
            return;
        };
        recipients.push(DsnRecipient {
            address: text(address),
            orcpt: optional(orcpt),
            status: text(status),
            diagnostic: optional(diagnostic),
            remote_mta: optional(remote_mta),
            last_attempt: Some(1_700_000_000 + 3600 * i as i64),
            will_retry_until: Some(1_700_400_000),
        });
    }
    let original = it.next().unwrap_or_default();
    let (to, from, envid, queue_id, reporting_mta) = (
        text(to),
        text(from),
        optional(envid),
        text(queue_id),
        text(reporting_mta),
    );
    let req = DsnRequest {
        kind,
        reporting_mta: &reporting_mta,
        queue_id: &queue_id,
        envid: envid.as_deref(),
        arrival: 1_699_990_000,
        to: &to,
        from: &from,
        recipients: &recipients,
        original,
        return_full,
        now: 1_700_500_000,
    };
    let dsn = build(&req);

    let lines = crlf_lines(&dsn);
    for l in &lines {
        assert!(
            l.len() <= 998,
            "line of {} octets: {:?}",
            l.len(),
            text(&l[..80])
        );
    }
    let blank = lines
        .iter()
        .position(|l| l.is_empty())
        .expect("no end of the header section");
    let names = fields(&lines[..blank]);
    for n in &names {
        assert!(HEADER_NAMES.contains(&n.as_str()), "unexpected field {n:?}");
        assert_eq!(names.iter().filter(|m| *m == n).count(), 1, "{n} twice");
    }

    // The structure: three parts under the boundary.
    let header = lines[..blank].join(&b"\r\n"[..]);
    let header = text(&header);
    let at = header.find("boundary=").expect("no boundary");
    let boundary: String = header[at + 9..]
        .trim_start_matches('"')
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    assert!(boundary.starts_with("outpost-dsn-"), "{boundary:?}");
    let delimiter = format!("--{boundary}");
    let body = &lines[blank + 1..];
    let delimiters: Vec<usize> = body
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with(delimiter.as_bytes()))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(delimiters.len(), 4, "three parts and the close");
    assert_eq!(body[delimiters[3]], format!("{delimiter}--").as_bytes());

    // The delivery status: US-ASCII fields, one group per recipient.
    let status = &body[delimiters[1] + 1..delimiters[2]];
    let start = status
        .iter()
        .position(|l| l.is_empty())
        .expect("part header");
    let status = &status[start + 1..];
    for l in status {
        assert!(
            l.is_ascii(),
            "non-ASCII in the delivery status: {:?}",
            text(l)
        );
    }
    let groups: Vec<&[&[u8]]> = status
        .split(|l| l.is_empty())
        .filter(|g| !g.is_empty())
        .collect();
    assert_eq!(
        groups.len(),
        1 + count,
        "per-message group and one per recipient"
    );
    for g in &groups {
        fields(g);
    }
    let starting = |name: &str| {
        status
            .iter()
            .filter(|l| l.starts_with(name.as_bytes()))
            .count()
    };
    assert_eq!(starting("Final-Recipient:"), count);
    assert_eq!(starting("Action:"), count);
    assert_eq!(starting("Status:"), count);
    assert_eq!(starting("Reporting-MTA:"), 1);
    assert_eq!(
        starting("Original-Envelope-Id:"),
        usize::from(req.envid.is_some())
    );

    let parsed = mail_parser::MessageParser::default()
        .parse(&dsn[..])
        .expect("mail-parser reads the report");
    assert_eq!(
        parsed.root_part().sub_parts().map(<[_]>::len),
        Some(3),
        "three parts"
    );
});
