//! `outpost mailbox list USER [--folder NAME]`.

use std::process::ExitCode;

use super::status::rfc3339;
use super::{exit, open_store};
use crate::config::Config;

pub fn list(config: &Config, user: &str, folder: &str) -> ExitCode {
    let store = match open_store(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match store.user_exists(user) {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("outpost: no such account: {user} (see `outpost user list`)");
            return ExitCode::from(exit::NOUSER);
        }
        Err(e) => {
            eprintln!("outpost: {e}");
            return ExitCode::from(exit::IOERR);
        }
    }
    let listing = (|| {
        let counts = store.folder_counts(user)?;
        let entries = match store.folder(user, folder)? {
            Some(f) => Some(store.folder_messages(user, f.id)?),
            None => None,
        };
        Ok::<_, crate::queue::StoreError>((counts, entries))
    })();
    let (counts, entries) = match listing {
        Ok(l) => l,
        Err(e) => {
            eprintln!("outpost: {e}");
            return ExitCode::from(exit::IOERR);
        }
    };
    if counts.len() > 1 {
        println!("{:<30}  {:>8}  {:>10}", "FOLDER", "MESSAGES", "OCTETS");
        for (name, n, size) in &counts {
            println!("{:<30}  {n:>8}  {size:>10}", clip(name, 30));
        }
        println!();
    }
    let Some(entries) = entries else {
        eprintln!("outpost: {user} has no folder {folder}");
        return ExitCode::from(exit::NOUSER);
    };
    if entries.is_empty() {
        println!("{user}'s {folder} is empty");
        return ExitCode::from(exit::OK);
    }
    println!(
        "{:<14}  {:>5}  {:<12}  {:>8}  {:<20}  {:<30}  SUBJECT",
        "ID", "UID", "FLAGS", "SIZE", "DATE", "FROM"
    );
    let mut total = 0;
    for e in &entries {
        let body = store.body(&e.uid).ok().flatten().unwrap_or_default();
        let from = header(&body, "from").unwrap_or_else(|| format!("<{}>", e.sender));
        let subject = header(&body, "subject").unwrap_or_default();
        total += e.size();
        println!(
            "{:<14}  {:>5}  {:<12}  {:>8}  {:<20}  {:<30}  {}",
            e.uid,
            e.imap_uid,
            clip(&short_flags(&e.flags), 12),
            e.size(),
            rfc3339(e.delivered_at),
            clip(&from, 30),
            clip(&subject, 60)
        );
    }
    println!("-- {folder}: {} messages, {total} octets", entries.len());
    ExitCode::from(exit::OK)
}

/// IMAP flags without their backslashes, for a narrow column.
fn short_flags(flags: &str) -> String {
    flags.replace('\\', "")
}

/// The first `name:` header field of a message, unfolded.
fn header(message: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(message);
    let mut found: Option<String> = None;
    for line in text.split("\r\n") {
        if line.is_empty() {
            break;
        }
        if let Some(v) = found.as_mut() {
            if line.starts_with([' ', '\t']) {
                v.push(' ');
                v.push_str(line.trim());
                continue;
            }
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case(name) {
                found = Some(v.trim().to_string());
            }
        }
    }
    found
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_unfold() {
        let m =
            b"Received: x\r\nSubject: a\r\n  folded\r\nFrom: Bob <b@x>\r\n\r\nSubject: body\r\n";
        assert_eq!(header(m, "subject").as_deref(), Some("a folded"));
        assert_eq!(header(m, "FROM").as_deref(), Some("Bob <b@x>"));
        assert_eq!(header(m, "to"), None);
        assert_eq!(clip("abcdef", 4), "abc…");
    }
}
