//! The `outpost` binary: arguments, logging, signals; the rest is the library.

use std::process::ExitCode;

use clap::Parser;
use outpost::cli::{self, exit, Cli, Command};
use outpost::config::{Config, LogFormat};

fn main() -> ExitCode {
    // Invoked as `sendmail` or `mailq` (links installed for programs that
    // expect them): behave as `outpost sendmail` / `outpost queue list`.
    let argv: Vec<String> = std::env::args().collect();
    let name = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let config = std::env::var_os("OUTPOST_CONFIG")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| outpost::config::DEFAULT_PATH.into());
    match name.as_str() {
        "sendmail" => {
            init_logging("warn", LogFormat::Text);
            return cli::sendmail_main(&config, &argv[1..]);
        }
        "mailq" => {
            init_logging("warn", LogFormat::Text);
            return cli::sendmail_main(&config, &["-bp".to_string()]);
        }
        _ => {}
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Serve => serve(&cli),
        _ => {
            init_logging("warn", LogFormat::Text);
            cli::run(&cli)
        }
    }
}

fn init_logging(level: &str, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    // OUTPOST_LOG (EnvFilter syntax) overrides log.level for debugging.
    let filter = EnvFilter::try_from_env("OUTPOST_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    // A log line that cannot be written is counted and dropped: it must
    // never take a session (or the store writer) down with it.
    // Colours only for a person at a terminal: the journal and log files
    // would keep the escape sequences as text.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(outpost::logwriter::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn serve(cli: &Cli) -> ExitCode {
    let config: Config = match cli::load_config(cli) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(&config.log.level, config.log.format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            say(&format!("outpost: cannot start the runtime: {e}"));
            return ExitCode::from(exit::SOFTWARE);
        }
    };
    let path = cli.config.clone();
    let store_path = config.store.path.clone();
    let result = runtime.block_on(async move {
        let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(reload_on_sighup(path, reload_tx));
        tokio::spawn(systemd_watch(store_path));
        tokio::spawn(report_lost_log_lines());
        outpost::serve(config, notify_ready, stop_signal(), reload_rx).await
    });
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            tracing::error!("{e:#}");
            say(&format!("outpost: {e:#}"));
            ExitCode::from(exit::CONFIG)
        }
    }
}

/// A line on stderr; if even that fails there is nobody left to tell.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Says, once the log can be written again, how many lines were lost
/// while it could not (a full disk, typically).
async fn report_lost_log_lines() {
    let mut reported = 0;
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        let lost = outpost::logwriter::lost();
        if lost > reported {
            tracing::warn!(
                lost = lost - reported,
                "log lines could not be written (is the log's disk full?)"
            );
            // Reported only once it was written: a line lost meanwhile
            // (this one too) means the whole count is said again later.
            if outpost::logwriter::lost() == lost {
                reported = lost;
            }
        }
    }
}

/// Tells systemd (Type=notify) that the listeners are up. Outside systemd
/// NOTIFY_SOCKET is unset and this does nothing.
fn notify_ready() {
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("accepting mail"),
    ]);
}

/// Under systemd: the watchdog ping (WatchdogSec=) and a STATUS= line with
/// the link state and the queue depth, for `systemctl status outpost`.
async fn systemd_watch(store: std::path::PathBuf) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let watchdog = sd_notify::watchdog_enabled();
    let every = watchdog
        .map(|d| d / 2)
        .unwrap_or(std::time::Duration::from_secs(30))
        .min(std::time::Duration::from_secs(30));
    let store = std::sync::Arc::new(store);
    let mut open: Option<std::sync::Arc<outpost::queue::Store>> = None;
    loop {
        if open.is_none() {
            let path = store.clone();
            open = tokio::task::spawn_blocking(move || outpost::queue::Store::open(&path).ok())
                .await
                .ok()
                .flatten()
                .map(std::sync::Arc::new);
        }
        let status = match open.clone() {
            Some(s) => tokio::task::spawn_blocking(move || status_line(&s))
                .await
                .unwrap_or_default(),
            None => String::new(),
        };
        let mut states = Vec::new();
        if watchdog.is_some() {
            states.push(sd_notify::NotifyState::Watchdog);
        }
        if !status.is_empty() {
            states.push(sd_notify::NotifyState::Status(&status));
        }
        if !states.is_empty() {
            let _ = sd_notify::notify(&states);
        }
        tokio::time::sleep(every).await;
    }
}

fn status_line(store: &outpost::queue::Store) -> String {
    let now = outpost::queue::unix_now();
    let (Ok(link), Ok(counts)) = (store.link(now), store.counts()) else {
        return String::new();
    };
    use outpost::queue::RecipientState::{Deferred, Held, Queued};
    format!(
        "link {}; {} queued, {} deferred, {} held",
        link.state,
        counts.count(Queued),
        counts.count(Deferred),
        counts.count(Held)
    )
}

/// SIGHUP: read the configuration again; pass it on only when it is valid,
/// else log why and keep the running one.
async fn reload_on_sighup(
    path: std::path::PathBuf,
    tx: tokio::sync::mpsc::UnboundedSender<Config>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
        match Config::load(&path) {
            Ok(c) => {
                tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
                let _ = tx.send(c);
            }
            Err(e) => {
                tracing::error!("SIGHUP: reload refused, the running configuration stays: {e}")
            }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}
