//! POP3 (RFC 1939) for the local mailboxes: USER/PASS and AUTH PLAIN
//! (RFC 5034), STLS (RFC 2595), CAPA (RFC 2449), response codes (RFC 3206).
//!
//! Deletions happen only at QUIT (the UPDATE state), in one commit; a
//! dropped connection deletes nothing. One session per maildrop at a time.
//! A message is read as stored, with the Return-Path line the final
//! delivery adds (RFC 5321 §4.4), and sent dot-stuffed
//! (`dotstuff::dot_stuff_into`, the same as SMTP's).

mod session;

pub use session::Session;

/// A command line as the session reads it (RFC 1939 §3): the keyword in
/// upper case, and the rest with the white space around it trimmed.
pub fn split_command(line: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(line);
    let mut parts = text.splitn(2, ' ');
    let verb = parts.next().unwrap_or("").to_ascii_uppercase();
    let arg = parts.next().unwrap_or("").trim().to_string();
    (verb, arg)
}

/// The header section, the empty line, and the first `lines` lines of the
/// body (TOP).
pub fn top(message: &[u8], lines: usize) -> &[u8] {
    let Some(header_end) = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
    else {
        return message;
    };
    let mut end = header_end;
    for _ in 0..lines {
        match message[end..].windows(2).position(|w| w == b"\r\n") {
            Some(p) => end += p + 2,
            None => return message,
        }
    }
    &message[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_lines() {
        let m = b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n";
        assert_eq!(top(m, 0), b"A: 1\r\nB: 2\r\n\r\n");
        assert_eq!(top(m, 2), b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n");
        assert_eq!(top(m, 99), &m[..]);
    }
}
