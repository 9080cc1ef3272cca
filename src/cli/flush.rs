//! `outpost flush`: through the daemon's control socket, or in-process.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;

use serde_json::json;

use super::{exit, open_store};
use crate::config::Config;
use crate::control;
use crate::queue::Writer;
use crate::relay::flush::{Event, FlushOptions, Flusher, Summary};

pub fn run(config: Config, opts: FlushOptions, as_json: bool) -> ExitCode {
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let mut messages = Vec::new();
    let mut link = serde_json::Value::Null;
    // On a terminal, a progress line on stderr under the per-message lines.
    let bar = !as_json && std::io::stderr().is_terminal();
    let (mut due, mut seen) = (0usize, 0usize);
    let mut print = |e: &Event| {
        if bar {
            match e {
                Event::Start { due: d } => due = *d,
                Event::Message { .. } => seen += 1,
                _ => {}
            }
        }
        if as_json {
            match e {
                Event::Message { id, recipients } => {
                    messages.push(json!({ "id": id, "recipients": recipients }))
                }
                Event::Link { .. } => link = serde_json::to_value(e).unwrap_or_default(),
                Event::Etrn(_) => {}
                _ => {}
            }
        } else {
            if bar {
                eprint!("\r\x1b[K");
            }
            print_event(e);
            if bar && due > 0 && !matches!(e, Event::Done(_)) {
                let width = 30;
                let filled = seen * width / due;
                eprint!(
                    "[{}{}] {seen}/{due}",
                    "#".repeat(filled),
                    " ".repeat(width - filled)
                );
            }
        }
    };
    let summary = rt.block_on(async {
        match control::request_flush(&config.control.socket, &opts, &mut print).await {
            Ok(Some(s)) => Ok(s),
            Ok(None) => in_process(config, &opts, &mut print).await,
            Err(e) => Err((
                exit::TEMPFAIL,
                format!(
                    "the daemon's control socket {}: {e}",
                    config.control.socket.display()
                ),
            )),
        }
    });
    let summary = match summary {
        Ok(s) => s,
        Err((code, msg)) => {
            eprintln!("outpost: {msg}");
            return ExitCode::from(code);
        }
    };
    if as_json {
        println!(
            "{}",
            json!({ "summary": summary, "link": link, "messages": messages })
        );
    }
    ExitCode::from(if summary.link_down() {
        exit::TEMPFAIL
    } else if summary.error.is_some() {
        exit::IOERR
    } else {
        exit::OK
    })
}

/// No daemon: run the flush here, with this process's own store writer.
async fn in_process(
    config: Config,
    opts: &FlushOptions,
    progress: &mut (dyn FnMut(&Event) + Send),
) -> Result<Summary, (u8, String)> {
    let store =
        open_store(&config).map_err(|_| (exit::CANTCREAT, "cannot open the store".to_string()))?;
    let (writer, thread) = Writer::start(&config.store.path)
        .map_err(|e| (exit::CANTCREAT, format!("{e} (store.path)")))?;
    let flusher = Flusher::new(Arc::new(config), Arc::new(store), writer);
    let summary = flusher.run(opts, progress).await;
    drop(flusher);
    thread.join();
    Ok(summary)
}

fn print_event(e: &Event) {
    let mut out = std::io::stdout().lock();
    let _ = match e {
        Event::Start { due: 0 } => writeln!(out, "nothing is due"),
        Event::Start { due } => {
            writeln!(out, "{due} message{} due", if *due == 1 { "" } else { "s" })
        }
        Event::Link {
            state,
            upstream,
            tls,
            error,
        } => match error {
            Some(err) => writeln!(out, "link {state}: {err}"),
            None => writeln!(
                out,
                "link {state}: {upstream}{}",
                tls.as_deref()
                    .map(|t| format!(" ({t})"))
                    .unwrap_or_default()
            ),
        },
        Event::Message { id, recipients } => {
            for r in recipients {
                let _ = writeln!(
                    out,
                    "{id}  {}: {}{}",
                    r.address,
                    r.outcome,
                    r.reply
                        .as_deref()
                        .map(|t| format!(" ({t})"))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
        Event::Etrn(r) => writeln!(out, "ETRN {}: {}", r.name, r.reply),
        Event::Done(s) => {
            let mut line = format!(
                "done: {} delivered, {} deferred, {} bounced, {} expired",
                s.delivered, s.deferred, s.bounced, s.expired
            );
            if s.uncertain > 0 {
                line.push_str(&format!(", {} delivery uncertain", s.uncertain));
            }
            if s.untouched > 0 {
                line.push_str(&format!(", {} not tried", s.untouched));
            }
            if s.delay_warnings > 0 {
                line.push_str(&format!(", {} delay warnings", s.delay_warnings));
            }
            line.push_str(&format!("; link {}", s.link));
            if let Some(e) = &s.error {
                line.push_str(&format!(" ({e})"));
            }
            writeln!(out, "{line}")
        }
    };
}
