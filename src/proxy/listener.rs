//! The proxy's accept loop and connection lifecycle.
//!
//! Owns: accepting client connections (up to `listen.max_connections` at a
//! time), serving each with hyper (HTTP/1.1 with upgrades, or HTTP/2 with
//! prior knowledge) behind a [`FramingGuard`], the client header-read
//! timeout, and the graceful drain on shutdown. Does not own: what happens
//! to a request (`Proxy::handle`).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::Proxy;
use super::framing::FramingGuard;
use crate::config::ListenConfig;

/// Largest request head (request line and headers) accepted, like nginx's
/// `large_client_header_buffers`; a larger one is answered 431.
pub(super) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Accepts and serves connections until `shutdown` resolves, then stops
/// accepting and lets open requests finish for up to `drain_timeout`.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    config: &ListenConfig,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    builder.http2().timer(TokioTimer::new());

    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let open_connections = crate::metrics::client_connections();
    tokio::pin!(shutdown);
    loop {
        // Take a permit before accepting, so a full proxy leaves new
        // connections in the kernel's backlog instead of failing them.
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, client.addr = %peer, "cannot set TCP_NODELAY");
        }
        // hyper hides a request that carries both lengths; the guard does not.
        let stream = FramingGuard::new(stream);
        let framing = stream.framing();
        let proxy = Arc::clone(&proxy);
        let service = service_fn(move |req| {
            let proxy = Arc::clone(&proxy);
            let framing = framing.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, peer, &framing).await) }
        });
        let connection = graceful.watch(
            builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned(),
        );
        let open_connections = open_connections.clone();
        tokio::spawn(async move {
            open_connections.increment(1.0);
            if let Err(error) = connection.await {
                tracing::debug!(%error, client.addr = %peer, "connection ended with an error");
            }
            open_connections.decrement(1.0);
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!(timeout = ?config.drain_timeout, "draining open connections");
    if tokio::time::timeout(config.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached with requests still open");
    }
}
