//! Strict readers for message content (DATA and BDAT).
//!
//! Only `CRLF . CRLF` ends DATA (RFC 5321 §4.1.1.4). Every other sequence that
//! some server somewhere treats as the end (`LF . LF`, `CR . CR`, `LF . CRLF`,
//! `CRLF . LF` ...) is what SMTP smuggling relies on: one server sees one
//! message, the next sees two. So a bare CR or bare LF anywhere in the content
//! marks the whole message as refused (550 5.5.2), and the reader keeps going
//! until the real end so the dialog stays in step. Stored messages therefore
//! always have canonical CRLF line ends, whatever way they arrived.
//!
//! Lines may be longer than RFC 5321's 1000 octets (office programs send
//! such lines, and Postfix takes them) up to `smtp.max_line_length`; they
//! are stored and forwarded unchanged. The `Received:` fields of the header
//! section are counted on the way (`relay.max_hops`): a message that went
//! round too many times is in a loop.
//!
//! Pure functions over bytes: no I/O here.

/// What was wrong with a message's content, if anything. The first problem
/// found wins; the reader still consumes up to the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentError {
    BareLf,
    BareCr,
    Nul,
    /// A line longer than `Limits::line` octets including CRLF.
    LineTooLong,
    /// More than the size limit; the rest was discarded unread.
    TooBig,
    /// More than `Limits::hops` `Received:` fields in the header section.
    TooManyHops,
}

/// What content may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Octets of content at most.
    pub size: usize,
    /// Octets of one line at most, CRLF included (RFC 5321 §4.5.3.1.6
    /// counts 1000 this way).
    pub line: usize,
    /// `Received:` header fields at most (the one this gateway adds is not
    /// in the content, so it is not counted).
    pub hops: usize,
}

impl Limits {
    /// `size`, and the defaults of `smtp.max_line_length` and `relay.max_hops`.
    pub fn with_size(size: usize) -> Limits {
        Limits {
            size,
            line: 65536,
            hops: 50,
        }
    }
}

/// Checks content line by line and collects it, up to a size limit.
#[derive(Debug)]
pub struct Canonical {
    limits: Limits,
    prev_cr: bool,
    line_len: usize,
    size: usize,
    /// Still in the header section (before the first empty line).
    in_header: bool,
    /// The first octets of the current line, to recognise `Received:`.
    head: [u8; HEAD],
    /// `Received:` fields seen in the header section.
    hops: usize,
    error: Option<ContentError>,
    /// Content not yet handed on by [`Canonical::take_output`].
    out: Vec<u8>,
    /// Octets of content handed on so far.
    handed: usize,
    /// Octets of content up to the end of the last complete line.
    line_end: usize,
}

/// Content collected in memory that can be handed on as it grows (to a
/// spool file, see `queue::Spool`).
pub trait Collect {
    /// Octets held, not yet handed on.
    fn pending(&self) -> usize;
    /// Hands on what is held.
    fn take_output(&mut self) -> Vec<u8>;
}

impl Collect for Canonical {
    fn pending(&self) -> usize {
        self.out.len()
    }

    /// Nothing once the content is refused.
    fn take_output(&mut self) -> Vec<u8> {
        let keep = self.out.capacity();
        let out = std::mem::replace(&mut self.out, Vec::with_capacity(keep));
        self.handed += out.len();
        out
    }
}

impl Collect for DotReader {
    fn pending(&self) -> usize {
        self.content.pending()
    }

    fn take_output(&mut self) -> Vec<u8> {
        self.content.take_output()
    }
}

/// Enough of a line for "Received" and some white space before the colon.
const HEAD: usize = 16;

impl Canonical {
    pub fn new(limits: Limits) -> Canonical {
        Canonical::with_capacity(limits, 0)
    }

    /// Room for `capacity` octets made once, not by doubling.
    pub fn with_capacity(limits: Limits, capacity: usize) -> Canonical {
        Canonical {
            limits,
            prev_cr: false,
            line_len: 0,
            size: 0,
            in_header: true,
            head: [0; HEAD],
            hops: 0,
            error: None,
            out: Vec::with_capacity(capacity),
            handed: 0,
            line_end: 0,
        }
    }

    fn fail(&mut self, e: ContentError) {
        if self.error.is_none() {
            self.error = Some(e);
            // Nothing of a refused message will be stored.
            self.out = Vec::new();
        }
    }

    /// Takes one octet of content.
    #[inline]
    pub fn push(&mut self, b: u8) {
        self.size += 1;
        if self.prev_cr && b != b'\n' {
            self.fail(ContentError::BareCr);
        }
        match b {
            b'\n' if !self.prev_cr => self.fail(ContentError::BareLf),
            b'\n' => self.end_line(),
            b'\r' => {}
            0 => self.fail(ContentError::Nul),
            _ => {
                if self.in_header && self.line_len < HEAD {
                    self.head[self.line_len] = b;
                }
                self.line_len += 1;
                // The CRLF counts: a line of `line` octets with it is allowed.
                if self.line_len + 2 > self.limits.line {
                    self.fail(ContentError::LineTooLong);
                }
            }
        }
        self.prev_cr = b == b'\r';
        if self.size > self.limits.size {
            self.fail(ContentError::TooBig);
        }
        if self.error.is_none() {
            self.out.push(b);
            if b == b'\n' {
                self.line_end = self.handed + self.out.len();
            }
        }
    }

    /// A line ended: counts a `Received:` field while in the header section.
    fn end_line(&mut self) {
        if self.in_header {
            if self.line_len == 0 {
                self.in_header = false;
            } else if is_received(&self.head[..self.line_len.min(HEAD)]) {
                self.hops += 1;
                if self.hops > self.limits.hops {
                    self.fail(ContentError::TooManyHops);
                }
            }
        }
        self.line_len = 0;
    }

    /// Takes a run of octets.
    pub fn extend(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.push(b);
        }
    }

    /// Octets taken so far, refused ones included.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Octets of content taken so far while all of it is acceptable (what
    /// a checkpoint keeps of an interrupted BDAT transfer); None once it
    /// is refused.
    pub fn accepted(&self) -> Option<usize> {
        self.error.is_none().then_some(self.handed + self.out.len())
    }

    /// Octets up to the end of the last complete line, while all the
    /// content is acceptable.
    pub fn complete_lines(&self) -> Option<usize> {
        self.error.is_none().then_some(self.line_end)
    }

    /// Ends the content and returns what was not handed on. A message must
    /// end with CRLF (or be empty); a BDAT message whose last chunk ends in
    /// the middle of a line is completed with CRLF, as RFC 3030 leaves to
    /// the receiver.
    pub fn finish(mut self) -> Result<Vec<u8>, ContentError> {
        if self.prev_cr {
            self.fail(ContentError::BareCr);
        }
        if self.line_len > 0 {
            self.end_line();
            if self.error.is_none() {
                self.out.extend_from_slice(b"\r\n");
            }
        }
        if let Some(e) = self.error {
            return Err(e);
        }
        Ok(self.out)
    }
}

/// True for the start of a `Received:` field: the name in any case, then
/// the colon, maybe after white space (RFC 5322 §4.5's obsolete syntax).
fn is_received(head: &[u8]) -> bool {
    const NAME: &[u8] = b"received";
    head.len() > NAME.len()
        && head[..NAME.len()].eq_ignore_ascii_case(NAME)
        && head[NAME.len()..]
            .iter()
            .find(|&&c| c != b' ' && c != b'\t')
            == Some(&b':')
}

/// Where the DATA reader is in the raw stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Right after CRLF (or at the very start): a dot here is special.
    LineStart,
    /// A dot at line start was taken (and dropped: RFC 5321 §4.5.2).
    Dot,
    /// `.` then CR at line start: LF now ends the data.
    DotCr,
    /// Anywhere else in a line.
    Text,
    /// After a CR in a line: LF now ends the line.
    Cr,
}

/// Reads the content after DATA until `CRLF . CRLF`, dot-unstuffing it.
#[derive(Debug)]
pub struct DotReader {
    at: At,
    content: Canonical,
}

impl DotReader {
    pub fn new(limits: Limits) -> DotReader {
        DotReader::with_capacity(limits, 0)
    }

    pub fn with_capacity(limits: Limits, capacity: usize) -> DotReader {
        DotReader {
            at: At::LineStart,
            content: Canonical::with_capacity(limits, capacity),
        }
    }

    /// Consumes `input` up to the end of the data. Returns `Some(n)` when the
    /// end was found after `n` octets (the rest is the next command, already
    /// pipelined), `None` when all of `input` was content.
    pub fn feed(&mut self, input: &[u8]) -> Option<usize> {
        for (i, &b) in input.iter().enumerate() {
            self.at = match (self.at, b) {
                (At::LineStart, b'.') => At::Dot,
                (At::Dot, b'\r') => At::DotCr,
                (At::DotCr, b'\n') => return Some(i + 1),
                (At::DotCr, _) => {
                    // ".\r" then not LF: the CR was content after all.
                    self.content.push(b'\r');
                    self.text(b)
                }
                (_, b'\r') => {
                    self.content.push(b);
                    At::Cr
                }
                (At::Cr, b'\n') => {
                    self.content.push(b);
                    At::LineStart
                }
                // A bare LF never starts a line: `LF . CRLF` must not end
                // the data. `Canonical` records it as an error.
                (_, _) => self.text(b),
            };
        }
        None
    }

    fn text(&mut self, b: u8) -> At {
        self.content.push(b);
        if b == b'\r' {
            At::Cr
        } else {
            At::Text
        }
    }

    pub fn size(&self) -> usize {
        self.content.size()
    }

    /// Octets of unstuffed content in the complete lines taken so far,
    /// while all of it is acceptable: what a checkpoint keeps of an
    /// interrupted DATA (a resumed transfer starts at a line, so that
    /// dot-stuffing works).
    pub fn complete_lines(&self) -> Option<usize> {
        self.content.complete_lines()
    }

    /// The unstuffed content; call after `feed` returned `Some`.
    pub fn finish(self) -> Result<Vec<u8>, ContentError> {
        self.content.finish()
    }
}

pub use crate::dotstuff::{dot_stuff, dot_stuff_into, DotStuffer};

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in chunks of `step` and returns (content, octets used).
    fn read(input: &[u8], step: usize) -> (Result<Vec<u8>, ContentError>, Option<usize>) {
        read_with(Limits::with_size(1 << 20), input, step)
    }

    fn read_with(
        limits: Limits,
        input: &[u8],
        step: usize,
    ) -> (Result<Vec<u8>, ContentError>, Option<usize>) {
        let mut r = DotReader::new(limits);
        let mut used = 0;
        for chunk in input.chunks(step) {
            if let Some(n) = r.feed(chunk) {
                return (r.finish(), Some(used + n));
            }
            used += chunk.len();
        }
        (r.finish(), None)
    }

    #[test]
    fn ends_only_at_crlf_dot_crlf() {
        for step in [1, 2, 3, 7, 1000] {
            let (body, used) = read(b"Subject: x\r\n\r\nhi\r\n.\r\nMAIL FROM:<>\r\n", step);
            assert_eq!(body.unwrap(), b"Subject: x\r\n\r\nhi\r\n");
            assert_eq!(used, Some(21));
        }
    }

    #[test]
    fn empty_message() {
        let (body, used) = read(b".\r\nQUIT\r\n", 1);
        assert_eq!(body.unwrap(), b"");
        assert_eq!(used, Some(3));
    }

    #[test]
    fn dots_are_unstuffed() {
        let (body, _) = read(b"..\r\n..x\r\n.y\r\n...\r\n.\r\n", 1);
        assert_eq!(body.unwrap(), b".\r\n.x\r\ny\r\n..\r\n");
    }

    #[test]
    fn smuggling_sequences_never_end_data_and_are_refused() {
        let tails: [&[u8]; 8] = [
            b"\n.\n",
            b"\n.\r\n",
            b"\r.\r",
            b"\r\n.\r",
            b"\r\n.\n",
            b"\r.\r\n",
            b"\n.\r",
            b"\r\n.\r\r\n",
        ];
        for tail in tails {
            let mut input = b"Subject: a\r\n\r\nfirst".to_vec();
            input.extend_from_slice(tail);
            input.extend_from_slice(
                b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\n\r\nsecond\r\n.\r\n",
            );
            for step in [1, 5, 4096] {
                let (body, used) = read(&input, step);
                assert_eq!(used, Some(input.len()), "tail {tail:?} ended early");
                let e = body.unwrap_err();
                assert!(
                    matches!(e, ContentError::BareLf | ContentError::BareCr),
                    "tail {tail:?}: {e:?}"
                );
            }
        }
    }

    #[test]
    fn bare_cr_at_line_start_after_dot() {
        let (body, used) = read(b"x\r\n.\rx\r\n.\r\n", 1);
        assert_eq!(body.unwrap_err(), ContentError::BareCr);
        assert!(used.is_some());
    }

    #[test]
    fn limits() {
        let mut r = DotReader::new(Limits::with_size(10));
        assert_eq!(r.feed(b"0123456789abc\r\n.\r\n"), Some(18));
        assert_eq!(r.finish().unwrap_err(), ContentError::TooBig);
        assert_eq!(read(b"a\0b\r\n.\r\n", 1).0.unwrap_err(), ContentError::Nul);
    }

    /// A message with one line of `text` octets (CRLF not counted), read
    /// with a line limit of `line`.
    fn one_line(text: usize, line: usize) -> Result<Vec<u8>, ContentError> {
        let mut input = b"Subject: wide\r\n\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'a', text));
        input.extend_from_slice(b"\r\n.\r\n");
        let limits = Limits {
            line,
            ..Limits::with_size(1 << 20)
        };
        let (body, used) = read_with(limits, &input, 4096);
        assert_eq!(used, Some(input.len()), "the reader stays in step");
        body
    }

    #[test]
    fn line_limit_counts_the_crlf() {
        // RFC 5321's own limit: 998 octets of text and the CRLF.
        assert!(one_line(998, 1000).is_ok());
        assert_eq!(one_line(999, 1000).unwrap_err(), ContentError::LineTooLong);
        // Longer lines up to the configured limit are kept unchanged.
        let body = one_line(65534, 65536).unwrap();
        assert_eq!(body.len(), 17 + 65534 + 2);
        assert!(body[17..17 + 65534].iter().all(|&b| b == b'a'));
        assert_eq!(
            one_line(65535, 65536).unwrap_err(),
            ContentError::LineTooLong
        );
        // BDAT content is held to the same limit.
        let limits = Limits {
            line: 1000,
            ..Limits::with_size(1 << 20)
        };
        let mut c = Canonical::new(limits);
        c.extend(&[b'b'; 999]);
        assert_eq!(c.finish().unwrap_err(), ContentError::LineTooLong);
    }

    fn with_received(n: usize, hops: usize, field: &str) -> Result<Vec<u8>, ContentError> {
        let mut input = Vec::new();
        for i in 0..n {
            input.extend_from_slice(
                format!("{field} from h{i} by h{};\r\n\tdate\r\n", i + 1).as_bytes(),
            );
        }
        input.extend_from_slice(b"Subject: loop\r\n\r\nReceived: in the body\r\n.\r\n");
        let limits = Limits {
            hops,
            ..Limits::with_size(1 << 20)
        };
        read_with(limits, &input, 7).0
    }

    #[test]
    fn received_fields_of_the_header_section_are_counted() {
        assert!(with_received(50, 50, "Received:").is_ok());
        assert_eq!(
            with_received(51, 50, "Received:").unwrap_err(),
            ContentError::TooManyHops
        );
        // Any case, white space before the colon (obsolete syntax).
        assert_eq!(
            with_received(3, 2, "rECEIVED :").unwrap_err(),
            ContentError::TooManyHops
        );
        // Not Received fields, and Received lines in the body, do not count.
        assert!(with_received(3, 2, "X-Received:").is_ok());
        assert!(with_received(3, 2, "Received-SPF:").is_ok());
        assert!(with_received(2, 2, "Received:").is_ok());
        assert!(!is_received(b"Received"));
        assert!(is_received(b"received:"));
    }

    #[test]
    fn stuffing_round_trips_through_the_reader() {
        assert_eq!(dot_stuff(b".\r\n..x\r\na.b\r\n"), b"..\r\n...x\r\na.b\r\n");
        assert_eq!(dot_stuff(b""), b"");
        assert_eq!(dot_stuff(b"x"), b"x\r\n");
        let body = b"a\r\n.\r\n..\r\n.b\r\n";
        let mut wire = dot_stuff(body);
        wire.extend_from_slice(b".\r\n");
        assert_eq!(read(&wire, 3).0.unwrap(), body);
        // In pieces, split anywhere, the same bytes.
        for cut in 0..body.len() {
            let (mut out, mut s) = (Vec::new(), DotStuffer::default());
            s.push(&mut out, &body[..cut]);
            s.push(&mut out, &body[cut..]);
            s.finish(&mut out);
            assert_eq!(out, dot_stuff(body), "cut at {cut}");
        }
    }

    #[test]
    fn canonical_for_bdat() {
        let mut c = Canonical::new(Limits::with_size(100));
        c.extend(b"a\r");
        c.extend(b"\nb");
        assert_eq!(c.finish().unwrap(), b"a\r\nb\r\n");
        let mut c = Canonical::new(Limits::with_size(100));
        c.extend(b"a\nb\r\n");
        assert_eq!(c.finish().unwrap_err(), ContentError::BareLf);
        let mut c = Canonical::new(Limits::with_size(100));
        c.extend(b"a\r");
        assert_eq!(c.finish().unwrap_err(), ContentError::BareCr);
    }

    #[test]
    fn content_handed_on_in_pieces_is_the_whole_content() {
        let text = b"Subject: x\r\n\r\n..dot\r\nline two\r\nhalf".to_vec();
        let mut r = DotReader::new(Limits::with_size(1 << 20));
        let mut out = Vec::new();
        for piece in text.chunks(5) {
            assert_eq!(r.feed(piece), None);
            out.extend(r.take_output());
        }
        // Whole lines: up to the CRLF after "line two", dot unstuffed.
        assert_eq!(
            r.complete_lines(),
            Some(b"Subject: x\r\n\r\n.dot\r\nline two\r\n".len())
        );
        assert_eq!(r.feed(b"\r\n.\r\n"), Some(5));
        out.extend(r.finish().unwrap());
        assert_eq!(out, b"Subject: x\r\n\r\n.dot\r\nline two\r\nhalf\r\n");
    }

    #[test]
    fn nothing_is_handed_on_once_refused() {
        let mut c = Canonical::new(Limits::with_size(100));
        c.extend(b"ok\r\n");
        assert_eq!(c.take_output(), b"ok\r\n");
        assert_eq!(c.accepted(), Some(4));
        c.extend(b"bare\nlf");
        assert!(c.take_output().is_empty());
        assert_eq!((c.accepted(), c.complete_lines()), (None, None));
        assert_eq!(c.finish(), Err(ContentError::BareLf));
    }
}
