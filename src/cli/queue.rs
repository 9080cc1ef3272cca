//! `outpost queue list|show`.

use std::fmt::Write as _;
use std::process::ExitCode;

use serde_json::json;

use super::status::{age, rfc3339};
use super::{exit, open_store, QueueCommand, Selection};
use crate::config::Config;
use crate::queue::{
    unix_now, Change, MessageDetail, MessageSummary, RecipientChange, RecipientState,
    RecipientStatus, Route, Store, Writer,
};
use crate::relay::flush::{FlushLock, Flusher};

pub fn run(config: &Config, cmd: &QueueCommand) -> ExitCode {
    let store = match open_store(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match cmd {
        QueueCommand::Delete(sel) => admin(config, store, Admin::Delete, sel),
        QueueCommand::Hold(sel) => admin(config, store, Admin::Hold, sel),
        QueueCommand::Release(sel) => admin(config, store, Admin::Release, sel),
        QueueCommand::Retry(sel) => admin(config, store, Admin::Retry, sel),
        QueueCommand::Bounce(sel) => admin(config, store, Admin::Bounce, sel),
        QueueCommand::List { json, state } => match store.list(*state) {
            Ok(msgs) => {
                if *json {
                    let list: Vec<_> = msgs.iter().map(message_json).collect();
                    println!("{}", serde_json::Value::Array(list));
                } else {
                    print!("{}", terminal_safe(&render_list(&msgs, unix_now())));
                    // Hub role: what waits for which branch, and since when it asked.
                    if let Ok(held) = store.held_by_domain() {
                        let now = unix_now();
                        for h in held {
                            println!(
                                "-- held for {}: {} messages (last asked {})",
                                terminal_safe(&h.domain),
                                h.messages,
                                h.last_asked
                                    .map(|t| format!("{} ago", age(now - t)))
                                    .unwrap_or_else(|| "never".into())
                            );
                        }
                    }
                }
                ExitCode::from(exit::OK)
            }
            Err(e) => {
                eprintln!("outpost: {e}");
                ExitCode::from(exit::IOERR)
            }
        },
        QueueCommand::Show { id } => match store.show(id) {
            Ok(Some(m)) => {
                let transfer = store
                    .transfers()
                    .ok()
                    .and_then(|t| t.into_iter().find(|t| &t.message_id == id));
                print!(
                    "{}",
                    terminal_safe(&render_show(&m, transfer.as_ref(), unix_now()))
                );
                ExitCode::from(exit::OK)
            }
            Ok(None) => {
                eprintln!("outpost: no message {id} in the queue (see `outpost queue list`)");
                ExitCode::from(exit::NOINPUT)
            }
            Err(e) => {
                eprintln!("outpost: {e}");
                ExitCode::from(exit::IOERR)
            }
        },
    }
}

/// The shape `queue list --json` keeps for scripts (DESIGN: interface contract).
fn message_json(m: &MessageSummary) -> serde_json::Value {
    json!({
        "id": m.id,
        "received_at": rfc3339(m.received_at),
        "size": m.size,
        "sender": m.sender,
        "protocol": m.protocol,
        "recipients": m.recipients.iter().map(|r| json!({
            "address": r.address,
            "state": r.state.as_str(),
            "route": r.route.as_str(),
            "attempts": r.attempts,
            "next_attempt": (!r.state.is_final() && r.state != RecipientState::Held)
                .then(|| rfc3339(r.next_attempt)),
            "last_reply": r.last_reply,
        })).collect::<Vec<_>>(),
    })
}

fn size(n: i64) -> String {
    if n >= 1 << 20 {
        format!("{:.1}M", n as f64 / (1i64 << 20) as f64)
    } else if n >= 1024 {
        format!("{:.1}K", n as f64 / 1024.0)
    } else {
        n.to_string()
    }
}

fn recipient_line(r: &RecipientStatus) -> String {
    let mut s = format!("{} ({}", r.address, r.state);
    if r.attempts > 0 {
        s.push_str(&format!(", {} attempts", r.attempts));
    }
    if let Some(reply) = &r.last_reply {
        s.push_str(&format!(": {reply}"));
    }
    s.push(')');
    s
}

fn render_list(msgs: &[MessageSummary], now: i64) -> String {
    let mut out = String::new();
    if msgs.is_empty() {
        out.push_str("Mail queue is empty\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<14}  {:>6}  {:>6}  {:<30}  RECIPIENTS",
        "ID", "AGE", "SIZE", "SENDER"
    );
    let mut total = 0;
    for m in msgs {
        total += m.size;
        let sender = if m.sender.is_empty() { "<>" } else { &m.sender };
        for (i, r) in m
            .recipients
            .iter()
            .filter(|r| !r.state.is_final())
            .enumerate()
        {
            if i == 0 {
                let _ = writeln!(
                    out,
                    "{:<14}  {:>6}  {:>6}  {:<30}  {}",
                    m.id,
                    age(now - m.received_at),
                    size(m.size),
                    sender,
                    recipient_line(r)
                );
            } else {
                let _ = writeln!(out, "{:<62}  {}", "", recipient_line(r));
            }
        }
    }
    let _ = writeln!(
        out,
        "-- {} message{}, {} in all",
        msgs.len(),
        if msgs.len() == 1 { "" } else { "s" },
        size(total)
    );
    out
}

/// `queue show`: envelope, recipients, history and headers.
fn render_show(m: &MessageDetail, transfer: Option<&crate::queue::Transfer>, now: i64) -> String {
    let mut out = String::new();
    let s = &m.summary;
    let _ = writeln!(out, "id:          {}", s.id);
    let _ = writeln!(
        out,
        "received:    {} ({} ago)",
        rfc3339(s.received_at),
        age(now - s.received_at)
    );
    let _ = writeln!(out, "from:        <{}>", s.sender);
    let _ = writeln!(out, "size:        {} octets", s.size);
    if let Some(t) = transfer {
        let _ = writeln!(out, "{}", super::status::transfer_line(t, now));
    }
    let _ = writeln!(
        out,
        "client:      {} (HELO {}) via {}",
        m.client_addr, m.client_helo, s.protocol
    );
    if let Some(u) = &m.auth_user {
        let _ = writeln!(out, "account:     {u}");
    }
    if let Some(b) = &m.body_type {
        let _ = writeln!(out, "body:        {b}");
    }
    if m.smtputf8 {
        let _ = writeln!(out, "smtputf8:    yes");
    }
    if m.dsn_ret.is_some() || m.dsn_envid.is_some() {
        let _ = writeln!(
            out,
            "dsn:         RET={} ENVID={}",
            m.dsn_ret.map_or("-", |r| r.as_str()),
            m.dsn_envid.as_deref().unwrap_or("-")
        );
    }
    let _ = writeln!(out, "recipients:");
    for r in &s.recipients {
        let _ = writeln!(out, "  {}", recipient_line(r));
    }
    let _ = writeln!(out, "history:");
    for h in &m.history {
        let who = h
            .recipient
            .map(|i| format!(" rcpt #{i}"))
            .unwrap_or_default();
        let _ = writeln!(out, "  {} {}{}: {}", rfc3339(h.at), h.event, who, h.detail);
    }
    match &m.headers {
        Some(hdrs) => {
            let _ = writeln!(out, "headers:");
            for line in hdrs.lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        None => {
            let _ = writeln!(out, "headers:     (body removed: every recipient is final)");
        }
    }
    out
}

/// Text for a terminal: whatever a client or an upstream put in the queue
/// (addresses, ENVID, replies, headers) cannot move the cursor, retitle
/// the window or clear the screen. Control characters other than line
/// ends and tabs are shown escaped (`\x1b`, `\u{9b}`).
pub fn terminal_safe(text: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| (c.is_control() && c != '\n' && c != '\t') || c == '\u{7f}';
    if !text.chars().any(bad) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if !bad(c) {
            out.push(c);
        } else if (c as u32) < 0x80 {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admin {
    Delete,
    Hold,
    Release,
    Retry,
    Bounce,
}

/// delete / hold / release / retry / bounce, through a writer of our own
/// (the daemon's may be running: SQLite serialises the two). Under the
/// flush lock: a flush in progress ends first, so a message is never held,
/// bounced or deleted while it is on its way, and what the flush recorded
/// is what this command sees.
fn admin(config: &Config, store: Store, what: Admin, sel: &Selection) -> ExitCode {
    let _lock = match FlushLock::acquire_blocking(&config.store.path, |_| {
        eprintln!(
            "outpost: a flush is in progress; waiting for it to end before changing the queue"
        )
    }) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("outpost: {e}");
            return ExitCode::from(exit::CANTCREAT);
        }
    };
    let ids: Vec<String> = if sel.all {
        match store.list(None) {
            Ok(l) => l.into_iter().map(|m| m.id).collect(),
            Err(e) => {
                eprintln!("outpost: {e}");
                return ExitCode::from(exit::IOERR);
            }
        }
    } else {
        sel.ids.clone()
    };
    for id in &ids {
        if !store.exists(id).unwrap_or(false) {
            eprintln!(
                "outpost: no message {id} in the queue (see `outpost queue list`); nothing changed"
            );
            return ExitCode::from(exit::NOINPUT);
        }
    }
    let now = unix_now();
    let pending = match store.pending_recipients(&ids) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("outpost: {e}");
            return ExitCode::from(exit::IOERR);
        }
    };
    let change =
        |id: &str, idx: u32, state: RecipientState, event: &'static str, reply: Option<&str>| {
            Change::Recipient(RecipientChange {
                message_id: id.to_string(),
                idx,
                state,
                attempted: false,
                next_attempt: now,
                last_reply: reply.map(str::to_string),
                uncertain: false,
                warned: false,
                at: now,
                event,
                detail: "by the administrator".into(),
            })
        };
    let store = std::sync::Arc::new(store);
    let (writer, thread) = match Writer::start(&config.store.path) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("outpost: {e}");
            return ExitCode::from(exit::CANTCREAT);
        }
    };
    let changes: Vec<Change> = match what {
        Admin::Delete => ids
            .iter()
            .map(|id| Change::Delete {
                message_id: id.clone(),
            })
            .collect(),
        Admin::Hold => pending
            .iter()
            .filter(|p| matches!(p.state, RecipientState::Queued | RecipientState::Deferred))
            .map(|p| {
                change(
                    &p.message_id,
                    p.idx,
                    RecipientState::Held,
                    "held",
                    Some("held by the administrator"),
                )
            })
            .collect(),
        // Hub mail held for its branch is released by ETRN, not here.
        Admin::Release => pending
            .iter()
            .filter(|p| p.state == RecipientState::Held && p.route != Route::Hold)
            .map(|p| {
                change(
                    &p.message_id,
                    p.idx,
                    RecipientState::Queued,
                    "released",
                    None,
                )
            })
            .collect(),
        Admin::Retry => pending
            .iter()
            .filter(|p| matches!(p.state, RecipientState::Queued | RecipientState::Deferred))
            .map(|p| change(&p.message_id, p.idx, p.state, "retry", None))
            .collect(),
        Admin::Bounce => {
            let flusher = Flusher::new(
                std::sync::Arc::new(config.clone()),
                store.clone(),
                writer.clone(),
            );
            match flusher.admin_bounce(&ids) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("outpost: {e}");
                    return ExitCode::from(exit::IOERR);
                }
            }
        }
    };
    let n = changes.len();
    let rt = tokio::runtime::Builder::new_current_thread().build();
    let result = match rt {
        Ok(rt) => rt.block_on(writer.apply(changes)),
        Err(e) => Err(crate::queue::StoreError::Failed(e.to_string())),
    };
    drop(writer);
    thread.join();
    match result {
        Ok(()) => {
            let verb = match what {
                Admin::Delete => "deleted",
                Admin::Hold => "held",
                Admin::Release => "released",
                Admin::Retry => "due now",
                Admin::Bounce => "bounced",
            };
            if what == Admin::Delete {
                println!(
                    "{} message{} {verb}",
                    ids.len(),
                    if ids.len() == 1 { "" } else { "s" }
                );
            } else {
                println!("{n} recipient{} {verb}", if n == 1 { "" } else { "s" });
            }
            ExitCode::from(exit::OK)
        }
        Err(e) => {
            eprintln!("outpost: {e}");
            ExitCode::from(exit::IOERR)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Route;

    #[test]
    fn terminal_escapes_are_shown_not_obeyed() {
        let hostile = "a\u{1b}]0;pwned\u{7}\u{1b}[2J b\u{9b}31m\r\nnext\tline\n";
        let safe = terminal_safe(hostile);
        assert_eq!(
            safe,
            "a\\x1b]0;pwned\\x07\\x1b[2J b\\u{9b}31m\\x0d\nnext\tline\n"
        );
        assert!(!safe
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t'));
        assert!(matches!(
            terminal_safe("plain\n"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn list_shows_pending_recipients_and_totals() {
        let m = MessageSummary {
            id: "ABC".into(),
            received_at: 1000,
            size: 2048,
            sender: String::new(),
            protocol: "ESMTP".into(),
            recipients: vec![
                RecipientStatus {
                    address: "a@x.example".into(),
                    route: Route::Upstream,
                    state: RecipientState::Deferred,
                    attempts: 2,
                    next_attempt: 2000,
                    last_reply: Some("451 4.3.0 try later".into()),
                },
                RecipientStatus {
                    address: "b@x.example".into(),
                    route: Route::Upstream,
                    state: RecipientState::Delivered,
                    attempts: 1,
                    next_attempt: 0,
                    last_reply: None,
                },
            ],
        };
        let out = render_list(std::slice::from_ref(&m), 1000 + 3 * 3600 + 120);
        assert!(out.contains("3h2m"), "{out}");
        assert!(out.contains("<>"), "{out}");
        assert!(
            out.contains("a@x.example (deferred, 2 attempts: 451 4.3.0 try later)"),
            "{out}"
        );
        assert!(!out.contains("b@x.example"), "{out}");
        assert!(out.contains("-- 1 message, 2.0K in all"), "{out}");
        let j = message_json(&m);
        assert_eq!(j["received_at"], "1970-01-01T00:16:40Z");
        assert_eq!(j["recipients"][0]["next_attempt"], "1970-01-01T00:33:20Z");
        assert!(j["recipients"][1]["next_attempt"].is_null());
        assert_eq!(render_list(&[], 0), "Mail queue is empty\n");
    }
}
