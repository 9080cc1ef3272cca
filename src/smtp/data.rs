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
//! Pure functions over bytes: no I/O here.

/// What was wrong with a message's content, if anything. The first problem
/// found wins; the reader still consumes up to the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentError {
    BareLf,
    BareCr,
    Nul,
    /// A line longer than 1000 octets including CRLF (RFC 5321 §4.5.3.1.6).
    LineTooLong,
    /// More than the size limit; the rest was discarded unread.
    TooBig,
}

/// Checks content line by line and collects it, up to a size limit.
#[derive(Debug)]
pub struct Canonical {
    limit: usize,
    prev_cr: bool,
    line_len: usize,
    size: usize,
    error: Option<ContentError>,
    out: Vec<u8>,
}

/// Octets of text per line, CRLF excluded (1000 with it).
const MAX_LINE: usize = 998;

impl Canonical {
    pub fn new(limit: usize) -> Canonical {
        Canonical::with_prefix(limit, Vec::new())
    }

    /// Collects after `prefix` (the Received header), so the stored message
    /// is built in one buffer and never copied. The prefix is not counted.
    pub fn with_prefix(limit: usize, prefix: Vec<u8>) -> Canonical {
        Canonical {
            limit,
            prev_cr: false,
            line_len: 0,
            size: 0,
            error: None,
            out: prefix,
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
            b'\n' => self.line_len = 0,
            b'\r' => {}
            0 => self.fail(ContentError::Nul),
            _ => {
                self.line_len += 1;
                if self.line_len > MAX_LINE {
                    self.fail(ContentError::LineTooLong);
                }
            }
        }
        self.prev_cr = b == b'\r';
        if self.size > self.limit {
            self.fail(ContentError::TooBig);
        }
        if self.error.is_none() {
            self.out.push(b);
        }
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

    /// Ends the content. A message must end with CRLF (or be empty); a BDAT
    /// message whose last chunk ends in the middle of a line is completed
    /// with CRLF, as RFC 3030 leaves to the receiver.
    pub fn finish(mut self) -> Result<Vec<u8>, ContentError> {
        if self.prev_cr {
            self.fail(ContentError::BareCr);
        }
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.line_len > 0 {
            self.out.extend_from_slice(b"\r\n");
        }
        Ok(self.out)
    }
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
    pub fn new(limit: usize) -> DotReader {
        DotReader::with_prefix(limit, Vec::new())
    }

    pub fn with_prefix(limit: usize, prefix: Vec<u8>) -> DotReader {
        DotReader {
            at: At::LineStart,
            content: Canonical::with_prefix(limit, prefix),
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

    /// The unstuffed content; call after `feed` returned `Some`.
    pub fn finish(self) -> Result<Vec<u8>, ContentError> {
        self.content.finish()
    }
}

/// The other direction: dot-stuffs canonical content for sending (SMTP
/// DATA, POP3 RETR): a line starting with "." gets another (RFC 5321
/// §4.5.2, RFC 1939 §3). Content that does not end with CRLF is completed
/// with one, so nothing sent can run into the final dot. Fed in pieces, it
/// keeps track of line starts across them.
#[derive(Debug)]
pub struct DotStuffer {
    line_start: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer { line_start: true }
    }
}

impl DotStuffer {
    pub fn push(&mut self, out: &mut Vec<u8>, piece: &[u8]) {
        out.reserve(piece.len() + piece.len() / 64 + 2);
        for &b in piece {
            if self.line_start && b == b'.' {
                out.push(b'.');
            }
            out.push(b);
            self.line_start = b == b'\n';
        }
    }

    pub fn finish(self, out: &mut Vec<u8>) {
        if !self.line_start {
            out.extend_from_slice(b"\r\n");
        }
    }
}

pub fn dot_stuff_into(out: &mut Vec<u8>, body: &[u8]) {
    let mut s = DotStuffer::default();
    s.push(out, body);
    s.finish(out);
}

pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    dot_stuff_into(&mut out, body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in chunks of `step` and returns (content, octets used).
    fn read(input: &[u8], step: usize) -> (Result<Vec<u8>, ContentError>, Option<usize>) {
        let mut r = DotReader::new(1 << 20);
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
        let mut r = DotReader::new(10);
        assert_eq!(r.feed(b"0123456789abc\r\n.\r\n"), Some(18));
        assert_eq!(r.finish().unwrap_err(), ContentError::TooBig);

        let mut long = vec![b'a'; 998];
        long.extend_from_slice(b"\r\n.\r\n");
        assert!(read(&long, 100).0.is_ok());
        let mut long = vec![b'a'; 999];
        long.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(read(&long, 100).0.unwrap_err(), ContentError::LineTooLong);

        assert_eq!(read(b"a\0b\r\n.\r\n", 1).0.unwrap_err(), ContentError::Nul);
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
        let mut c = Canonical::new(100);
        c.extend(b"a\r");
        c.extend(b"\nb");
        assert_eq!(c.finish().unwrap(), b"a\r\nb\r\n");
        let mut c = Canonical::new(100);
        c.extend(b"a\nb\r\n");
        assert_eq!(c.finish().unwrap_err(), ContentError::BareLf);
        let mut c = Canonical::new(100);
        c.extend(b"a\r");
        assert_eq!(c.finish().unwrap_err(), ContentError::BareCr);
    }
}
