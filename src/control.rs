//! The control socket: how `outpost flush` and `outpost status` reach the
//! running daemon.
//!
//! A Unix socket (mode 0660). The client sends one JSON request line (at
//! most [`MAX_REQUEST`] octets, within [`REQUEST_TIMEOUT`]); the daemon
//! answers with JSON lines: for a flush one per event, `done` last; for
//! `logins` one [`crate::guard::Report`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::{info, warn, Instrument};

use crate::guard::{LoginGuard, Report};
use crate::relay::flush::{Event, FlushOptions, Flusher, Summary};

/// The longest request line; a longer one is refused unread.
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long a client may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Flush(FlushOptions),
    /// Clients blocked after failed logins, accounts under attack.
    Logins,
}

/// Binds the control socket (mode 0660), replacing a stale one.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    bind_socket(path, 0o660, None)
}

/// Binds a Unix socket with `mode` (and `group`), replacing a stale one left
/// by a crash; refuses when a live process still listens on it.
pub fn bind_socket(path: &Path, mode: u32, group: Option<u32>) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use: is another outpost running?", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    Ok(l)
}

/// The gid of a group name, through the system's name service (local
/// files, LDAP, whatever nsswitch.conf says).
pub fn group_id(name: &str) -> Option<u32> {
    uzers::get_group_by_name(name).map(|g| g.gid())
}

/// Serves requests until `stop` changes; removes the socket then.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    flushers: watch::Receiver<Flusher>,
    logins: Arc<LoginGuard>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let flusher = flushers.borrow().clone();
                    let logins = logins.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, flusher, &logins).await {
                            warn!(error = %e, "control request failed");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Reads one request line: at most [`MAX_REQUEST`] octets, within
/// [`REQUEST_TIMEOUT`].
async fn read_request<R: tokio::io::AsyncRead + Unpin>(
    r: R,
    within: Duration,
) -> std::io::Result<Request> {
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut line = Vec::new();
    let mut limited = BufReader::new(r.take(MAX_REQUEST as u64 + 1));
    tokio::time::timeout(within, limited.read_until(b'\n', &mut line))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no request within the time allowed",
            )
        })??;
    if line.len() > MAX_REQUEST {
        return Err(invalid(format!(
            "request line longer than {MAX_REQUEST} octets"
        )));
    }
    serde_json::from_slice(&line).map_err(|e| invalid(e.to_string()))
}

async fn handle(stream: UnixStream, flusher: Flusher, logins: &LoginGuard) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let req = read_request(r, REQUEST_TIMEOUT).await?;
    match req {
        Request::Logins => {
            let mut s = serde_json::to_string(&logins.report(std::time::Instant::now()))
                .unwrap_or_default();
            s.push('\n');
            w.write_all(s.as_bytes()).await?;
        }
        Request::Flush(opts) => {
            info!(all = opts.all, domains = ?opts.domains, "flush requested on the control socket");
            // Events go to the client as they happen; a client that went
            // away does not stop the flush.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
            let run = tokio::spawn(async move {
                let mut send = |e: &Event| {
                    let _ = tx.send(e.clone());
                };
                flusher
                    .run(&opts, &mut send)
                    .instrument(tracing::info_span!("flush", trigger = "control"))
                    .await
            });
            while let Some(e) = rx.recv().await {
                let mut s = serde_json::to_string(&e).unwrap_or_default();
                s.push('\n');
                if w.write_all(s.as_bytes()).await.is_err() {
                    break;
                }
            }
            let _ = run.await;
        }
    }
    Ok(())
}

/// Client side: asks the daemon to flush. `Ok(None)` when no daemon listens.
pub async fn request_flush(
    path: &Path,
    opts: &FlushOptions,
    progress: &mut (dyn FnMut(&Event) + Send),
) -> std::io::Result<Option<Summary>> {
    let Some(r) = send(path, &Request::Flush(opts.clone())).await? else {
        return Ok(None);
    };
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let e: Event = serde_json::from_str(&line)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        progress(&e);
        if let Event::Done(s) = e {
            return Ok(Some(s));
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the daemon closed the control socket before the flush ended",
    ))
}

/// Client side: sends `req` to the daemon, and gives back the half of the
/// connection its answer comes on. `Ok(None)` when no daemon listens.
async fn send(
    path: &Path,
    req: &Request,
) -> std::io::Result<Option<tokio::net::unix::OwnedReadHalf>> {
    let stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    w.write_all(line.as_bytes()).await?;
    Ok(Some(r))
}

/// Client side: the daemon's blocked clients and accounts under attack.
/// `Ok(None)` when no daemon listens.
pub async fn request_logins(path: &Path) -> std::io::Result<Option<Report>> {
    let Some(r) = send(path, &Request::Logins).await? else {
        return Ok(None);
    };
    let mut line = String::new();
    let mut limited = BufReader::new(r.take(16 << 20));
    tokio::time::timeout(REQUEST_TIMEOUT, limited.read_line(&mut line))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "the daemon did not answer")
        })??;
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn request_lines_are_bounded() {
        // A line without an end is refused once it passes the limit, not
        // read on for ever.
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; 8192];
            while client.write_all(&chunk).await.is_ok() {}
        });
        let e = read_request(server, REQUEST_TIMEOUT).await.unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
        writer.abort();
        // A good one passes.
        let (mut client, server) = tokio::io::duplex(4096);
        client.write_all(b"{\"op\":\"logins\"}\n").await.unwrap();
        assert!(matches!(
            read_request(server, REQUEST_TIMEOUT).await.unwrap(),
            Request::Logins
        ));
    }

    #[tokio::test]
    async fn a_silent_client_is_given_up_on() {
        let (_client, server) = tokio::io::duplex(4096);
        let e = read_request(server, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    }
}
