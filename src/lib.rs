//! outpost: a store-and-forward mail gateway for branch offices.
//!
//! The pipeline, one module per arrow: `smtp` accepts mail, `queue` keeps it
//! (the only module that opens the database), `cli` is the command line.
//! The library never touches process-wide state (signals, argv, the global
//! log subscriber): `main.rs` does.

pub mod auth;
pub mod cli;
pub mod config;
pub mod queue;
pub mod relay;
pub mod smtp;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tracing::{info, warn};

use config::Config;
use queue::{Store, Writer};
use smtp::server::{self, Shared};

/// Runs the gateway until `stop` resolves, then drains and returns.
/// `ready` is called once every listener is bound (main.rs tells systemd).
pub async fn serve(
    config: Config,
    ready: impl FnOnce(),
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let store = Arc::new(Store::open(&config.store.path).context("store.path")?);
    let (writer, writer_thread) = Writer::start(&config.store.path)?;
    let tls = match &config.tls {
        Some(t) => {
            let (server_config, provenance) = tls::server_config(t, &config.hostname)?;
            if let tls::Provenance::MadeSelfSigned = provenance {
                warn!(
                    certificate = %t.certificate.display(),
                    key = %t.key.display(),
                    name = %config.hostname,
                    "made a self-signed certificate (tls.self_signed = true); clients will not trust it, replace it with a real one"
                );
            }
            Some(tokio_rustls::TlsAcceptor::from(server_config))
        }
        None => None,
    };
    let mut listeners = Vec::new();
    for l in &config.listen {
        if !l.mode.is_smtp() {
            anyhow::bail!(
                "listen {}: mode \"{}\" (POP3) is not available in this version of outpost; remove this [[listen]] entry",
                l.address,
                l.mode
            );
        }
        let listener = TcpListener::bind(l.address).await.with_context(|| {
            format!(
                "cannot listen on {} (listen.address, mode {})",
                l.address, l.mode
            )
        })?;
        info!(address = %l.address, mode = %l.mode, "listening");
        listeners.push((listener, l.clone()));
    }
    if listeners.is_empty() {
        warn!("no [[listen]] entries: nothing will be accepted");
    }
    let shared = Arc::new(Shared::new(config.clone(), store, writer, tls));
    info!(hostname = %config.hostname, store = %config.store.path.display(), "outpost ready");
    ready();
    server::run(shared, listeners, stop).await;
    // Every session has ended; the last handle to the writer goes with
    // `shared`, and joining the thread waits for its last commit.
    writer_thread.join();
    info!("stopped");
    Ok(())
}
