//! The `[metrics]` listener: `GET /metrics` in the Prometheus text format
//! and `GET /` the status page, over HTTP/1.1 (hyper), read-only.
//!
//! Bounded like the mail listeners: at most [`MAX_CONNECTIONS`] at once
//! (more are closed at once), request headers of at most [`MAX_HEADER`]
//! octets (431) read within [`HEADER_TIMEOUT`], every connection closed
//! after [`CONNECTION_TIME`] however busy. Only GET and HEAD are answered;
//! anything else is 405, and a request body is never read.
//!
//! Gauges and the page are read from the store when asked for (on the
//! blocking pool); counters come from [`crate::metrics::Metrics`]. While
//! it serves, the daemon also records a sample of the queue and the link
//! every minute ([`run_sampler`]) for the page's picture of the last day.

mod page;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, warn};

use crate::metrics::{Gauges, TOP_DOMAINS};
use crate::queue::{unix_now, Change, RecipientState, Writer};
use crate::shared::Shared;

/// Connections served at once; more are closed without an answer.
pub const MAX_CONNECTIONS: usize = 16;
/// Octets of a request's line and headers (hyper's smallest buffer).
pub const MAX_HEADER: usize = 8192;
/// Time to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a connection stays open, keep-alive included.
pub const CONNECTION_TIME: Duration = Duration::from_secs(30);
/// How often the daemon records a sample for the page.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(60);

/// Serves `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER)
        .max_headers(64);
    let builder = Arc::new(builder);
    // Connections end with the daemon: they are aborted at stop.
    let mut open = tokio::task::JoinSet::new();
    loop {
        // Reap the connections that ended.
        while open.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => {
                open.shutdown().await;
                return;
            }
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept on the metrics listener failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(peer = %peer, "metrics listener busy: connection closed");
            continue;
        };
        let (shared, builder) = (shared.clone(), builder.clone());
        open.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(answer(&shared, req).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            if tokio::time::timeout(CONNECTION_TIME, conn).await.is_err() {
                debug!(peer = %peer, "metrics connection closed after {CONNECTION_TIME:?}");
            }
            drop(permit);
        });
    }
}

/// Records a sample now and every [`SAMPLE_EVERY`] until `stop`.
pub async fn run_sampler(writer: Writer, mut stop: watch::Receiver<bool>) {
    loop {
        if let Err(e) = writer.apply(vec![Change::Sample { at: unix_now() }]).await {
            warn!(error = %e, "could not record a sample for the status page");
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
    }
}

async fn answer(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served here: the metrics and the status page are read-only\n",
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let path = req.uri().path().to_string();
    let shared = shared.clone();
    let made = tokio::task::spawn_blocking(move || match path.as_str() {
        "/metrics" => Some(metrics(&shared).map(|body| (crate::metrics::CONTENT_TYPE, body))),
        "/" => Some(page::render(&shared).map(|body| ("text/html; charset=utf-8", body))),
        _ => None,
    })
    .await;
    match made {
        Ok(Some(Ok((kind, body)))) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
            r.headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Ok(Some(Err(e))) => {
            warn!(error = %e, "metrics: cannot read the store");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("cannot read the store: {e}; see the daemon's log\n"),
            )
        }
        Ok(None) => text(
            StatusCode::NOT_FOUND,
            "not found: GET /metrics (Prometheus) or GET / (status page)\n",
        ),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("the request failed: {e}\n"),
        ),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The counters, and the gauges as the store has them now.
fn metrics(shared: &Shared) -> Result<String, crate::queue::StoreError> {
    let config = shared.config();
    let store = &shared.store;
    let now = unix_now();
    let link = store.link(now)?;
    let counts = store.counts()?;
    let disk = store.disk_usage()?;
    let today = chrono::Local::now().date_naive().to_string();
    let gauges = Gauges {
        by_state: [
            ("queued", RecipientState::Queued),
            ("deferred", RecipientState::Deferred),
            ("held", RecipientState::Held),
        ]
        .into_iter()
        .map(|(name, s)| (name, counts.count(s)))
        .collect(),
        by_domain: store.pending_by_domain(TOP_DOMAINS)?,
        uncertain: counts.uncertain,
        oldest_age_seconds: counts.oldest.map(|t| (now - t).max(0)).unwrap_or(0),
        link_state: link.state.as_str(),
        link_state_seconds: (now - link.since).max(0),
        last_flush_at: link.last_flush_at,
        store_bytes: disk.size_bytes,
        wal_bytes: disk.wal_bytes,
        free_inside_bytes: disk.free_bytes,
        filesystem_free_bytes: crate::queue::space::available(store.path()).ok(),
        budget_bytes: config.flush.daily_byte_budget,
        sent_today_bytes: store.sent_on(&today)?,
    };
    Ok(shared.metrics.render(&gauges))
}
