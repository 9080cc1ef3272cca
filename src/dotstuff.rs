//! Dot-stuffing for sending (SMTP DATA, POP3 RETR): the mirror of the
//! strict reader in `smtp::data`. Pure.

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
