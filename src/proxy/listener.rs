//! The proxy's accept loop and connection lifecycle.
//!
//! Owns: accepting client connections (up to `listen.max_connections` at a
//! time), the TLS handshake on a TLS listener and the protocol its ALPN
//! chose, serving each connection with hyper (HTTP/1.1 with upgrades, or
//! HTTP/2: by ALPN, or with prior knowledge on a plain listener) behind a
//! [`FramingGuard`] on the decrypted bytes, the client header-read timeout,
//! and the graceful drain on shutdown. Does not own: what happens to a
//! request (`Proxy::handle`) or the certificate (`tls`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::Proxy;
use super::framing::FramingGuard;
use crate::config::ListenConfig;
use crate::tls::ServerTls;

/// Largest request head (request line and headers) accepted, like nginx's
/// `large_client_header_buffers`; a larger one is answered 431.
pub(super) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Accepts and serves connections until `shutdown` resolves, then stops
/// accepting and lets open requests finish for up to `drain_timeout`. With
/// `tls`, each connection first completes a TLS handshake (within
/// `header_read_timeout`) and speaks HTTP/2 if ALPN chose `h2`. Each open
/// connection holds one of `permits` (`listen.max_connections`, shared by
/// every worker's listener).
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    config: &ListenConfig,
    tls: Option<Arc<ServerTls>>,
    permits: Arc<Semaphore>,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    // The same limit on a request's headers as over HTTP/1.1 (HPACK-decoded size).
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32);
    let builders = Arc::new(Builders {
        h2: builder.clone().http2_only(),
        auto: builder,
    });

    let graceful = GracefulShutdown::new();
    let open_connections = crate::metrics::client_connections();
    let handshake_timeout = config.header_read_timeout;
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
        // Watched from here, so a drain also waits for a handshake under way.
        let watcher = graceful.watcher();
        let proxy = Arc::clone(&proxy);
        let builders = Arc::clone(&builders);
        let acceptor = tls.as_ref().map(|tls| tls.acceptor());
        let open_connections = open_connections.clone();
        tokio::spawn(async move {
            open_connections.increment(1.0);
            let result = match acceptor {
                None => serve_connection(stream, false, peer, proxy, &builders, watcher).await,
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                            serve_connection(stream, h2, peer, proxy, &builders, watcher).await
                        }
                        Ok(Err(error)) => Err(format!("TLS handshake failed: {error}").into()),
                        Err(_) => Err("TLS handshake timed out".into()),
                    }
                }
            };
            if let Err(error) = result {
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

/// The connection builders: `auto` reads the first bytes and serves
/// HTTP/1.1 (with upgrades) or HTTP/2 with prior knowledge; `h2` serves a
/// TLS connection whose ALPN chose `h2`.
struct Builders {
    auto: auto::Builder<TokioExecutor>,
    h2: auto::Builder<TokioExecutor>,
}

type ConnectionError = Box<dyn std::error::Error + Send + Sync>;

/// Serves one client connection (plain, or already decrypted) to its end.
async fn serve_connection<IO>(
    io: IO,
    h2: bool,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    builders: &Builders,
    watcher: Watcher,
) -> Result<(), ConnectionError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // hyper hides a request that carries both lengths; the guard, reading
    // the bytes hyper reads (decrypted, on a TLS connection), does not.
    let io = FramingGuard::new(io);
    let framing = io.framing();
    let service = service_fn(move |req| {
        let proxy = Arc::clone(&proxy);
        let framing = framing.clone();
        async move { Ok::<_, Infallible>(proxy.handle(req, peer, &framing).await) }
    });
    let io = TokioIo::new(io);
    if h2 {
        watcher
            .watch(builders.h2.serve_connection(io, service).into_owned())
            .await
    } else {
        watcher
            .watch(
                builders
                    .auto
                    .serve_connection_with_upgrades(io, service)
                    .into_owned(),
            )
            .await
    }
}
