//! Addresses and domains as the protocols see them: splitting
//! `local@domain`, matching a domain against `domain` or `@domain`, and
//! writing an address so that it stays one address on the wire. Pure; the
//! bottom of the module graph.

/// Splits `local@domain`; None when there is not exactly one `@` with text
/// on both sides.
pub fn split(address: &str) -> Option<(&str, &str)> {
    let (local, domain) = address.split_once('@')?;
    if local.is_empty() || domain.is_empty() || domain.contains('@') {
        return None;
    }
    Some((local, domain))
}

/// `spec` is a domain, or `@domain` for the domain and its subdomains.
pub fn domain_matches(spec: &str, domain: &str) -> bool {
    match spec.strip_prefix('@') {
        Some(d) => {
            domain.eq_ignore_ascii_case(d)
                || (domain.len() > d.len() + 1
                    && domain.as_bytes()[domain.len() - d.len() - 1] == b'.'
                    && domain[domain.len() - d.len()..].eq_ignore_ascii_case(d))
        }
        None => domain.eq_ignore_ascii_case(spec),
    }
}

/// An address as it goes between `<` and `>` (RFC 5321 §4.1.2): the local
/// part as a dot-atom when it is one, else as a quoted string, so that no
/// address can end the path early or add parameters (`"a> RET=FULL"@x`
/// stays one address). `None` when it cannot be written at all (control
/// characters). UTF-8 passes as it is (RFC 6531).
pub fn smtp_path(address: &str) -> Option<String> {
    if address.is_empty() {
        return Some(String::new());
    }
    if address.chars().any(|c| c.is_control()) {
        return None;
    }
    let (local, domain) = match address.rsplit_once('@') {
        Some((l, d)) => (l, Some(d)),
        None => (address, None),
    };
    let atext =
        |c: char| c.is_ascii_alphanumeric() || !c.is_ascii() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    let dot_atom = !local.is_empty()
        && local
            .split('.')
            .all(|a| !a.is_empty() && a.chars().all(atext));
    let domain_ok = domain.is_none_or(|d| {
        !d.is_empty()
            && (d.starts_with('[')
                && d.ends_with(']')
                && !d[1..d.len() - 1].contains([']', '[', '\\', ' '])
                || d.chars()
                    .all(|c| c.is_alphanumeric() || c == '-' || c == '.'))
    });
    if !domain_ok {
        return None;
    }
    let mut out = String::with_capacity(address.len() + 2);
    if dot_atom {
        out.push_str(local);
    } else {
        out.push('"');
        for c in local.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    if let Some(d) = domain {
        out.push('@');
        out.push_str(d);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_cannot_smuggle_parameters() {
        assert_eq!(smtp_path("").as_deref(), Some(""));
        assert_eq!(
            smtp_path("a.b+c@x.example").as_deref(),
            Some("a.b+c@x.example")
        );
        assert_eq!(
            smtp_path("odd> RET=FULL ENVID=x@outside.example").as_deref(),
            Some("\"odd> RET=FULL ENVID=x\"@outside.example")
        );
        assert_eq!(
            smtp_path("we\"ird\\@x.example").as_deref(),
            Some("\"we\\\"ird\\\\\"@x.example")
        );
        assert_eq!(
            smtp_path("a..b@x.example").as_deref(),
            Some("\"a..b\"@x.example")
        );
        assert_eq!(smtp_path("postmaster").as_deref(), Some("postmaster"));
        assert_eq!(
            smtp_path("ü@bücher.example").as_deref(),
            Some("ü@bücher.example")
        );
        assert_eq!(smtp_path("a@[192.0.2.1]").as_deref(), Some("a@[192.0.2.1]"));
        assert_eq!(smtp_path("a\r\nRCPT TO:<b@x>@x.example"), None);
        assert_eq!(smtp_path("a@x.example> NOTIFY=NEVER"), None);
    }
}
