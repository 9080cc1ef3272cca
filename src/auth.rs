//! Accounts' passwords (argon2) and the SASL mechanisms PLAIN (RFC 4616) and
//! LOGIN, shared by SMTP AUTH and POP3.

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

/// A PHC string for `password`, with a fresh salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Checks `password` against a stored PHC string. `None` (no such account)
/// still costs one hash, so the time taken does not say whether a name exists.
pub fn verify_password(stored: Option<&str>, password: &str) -> bool {
    const DUMMY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Q4Ml7sWbkjiwhXHhyp2BsO0mmAxMPf85g4qlnjJe0Tg";
    let hash = stored.unwrap_or(DUMMY);
    let ok = PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false);
    ok && stored.is_some()
}

/// Decodes a SASL response; `=` is the empty response (RFC 4954 §4).
pub fn decode_b64(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if s == "=" {
        return Some(Vec::new());
    }
    B64.decode(s).ok()
}

pub fn encode_b64(b: &[u8]) -> String {
    B64.encode(b)
}

/// PLAIN: `authzid NUL authcid NUL passwd`. Returns (user, password); an
/// authzid other than the user is refused (no proxy logins).
pub fn parse_plain(decoded: &[u8]) -> Option<(String, String)> {
    let mut parts = decoded.split(|&b| b == 0);
    let authz = parts.next()?;
    let user = std::str::from_utf8(parts.next()?).ok()?;
    let pass = std::str::from_utf8(parts.next()?).ok()?;
    if parts.next().is_some() || user.is_empty() {
        return None;
    }
    if !authz.is_empty() && authz != user.as_bytes() {
        return None;
    }
    Some((user.to_string(), pass.to_string()))
}

/// Account names: what a POP3 client and a mail address can both carry.
pub fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
        && !name.starts_with(['.', '-'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_and_verify() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2"));
        assert!(verify_password(Some(&h), "s3cret"));
        assert!(!verify_password(Some(&h), "s3cret "));
        assert!(!verify_password(None, "s3cret"));
        assert!(!verify_password(Some("garbage"), "x"));
    }

    #[test]
    fn plain() {
        assert_eq!(
            parse_plain(b"\0alice\0pw"),
            Some(("alice".into(), "pw".into()))
        );
        assert_eq!(
            parse_plain(b"alice\0alice\0pw"),
            Some(("alice".into(), "pw".into()))
        );
        assert_eq!(parse_plain(b"bob\0alice\0pw"), None);
        assert_eq!(parse_plain(b"\0alice"), None);
        assert_eq!(decode_b64("="), Some(vec![]));
        assert_eq!(decode_b64("!!"), None);
    }

    #[test]
    fn names() {
        assert!(valid_user_name("alice.smith"));
        assert!(!valid_user_name("alice smith"));
        assert!(!valid_user_name("a@b"));
        assert!(!valid_user_name(""));
    }
}
