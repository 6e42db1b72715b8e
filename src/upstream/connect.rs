//! Opening connections to upstreams: TCP, and TLS on top for `https://`.
//!
//! Owns: the TCP settings of every upstream connection (`TCP_NODELAY`,
//! keep-alive probes, the connect timeout), the TLS handshake with the
//! upstream's server name (under the same timeout, as nginx's
//! `proxy_connect_timeout` covers its SSL handshake), and counting each open connection in
//! `cohort_upstream_connections` from connect to close (the shadow's
//! connections take the TCP settings alone: they are not counted). Does not
//! own: which connections are kept for reuse (the HTTP/1.1 pool in `http1`,
//! the HTTP/2 one in `http2`; hyper-util's, for the shadow and webhooks), nor
//! the trust roots (`tls`).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use http::uri::Scheme;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use metrics::Gauge;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::BoxError;
use crate::coalesce;

/// Whether `error` is an upstream certificate that does not name the
/// upstream. Its text holds the name the proxy asked for and those the
/// certificate has: an internal address and host names, which the answer
/// to a client must not carry. The connector logs them.
pub(crate) fn is_name_mismatch(error: &(dyn std::error::Error + 'static)) -> bool {
    let rustls = error.downcast_ref::<rustls::Error>().or_else(|| {
        error
            .downcast_ref::<std::io::Error>()?
            .get_ref()?
            .downcast_ref::<rustls::Error>()
    });
    matches!(
        rustls,
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. }
        ))
    )
}

/// A TCP connector with the settings of every upstream connection.
pub(crate) fn http_connector(connect_timeout: Duration) -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    // `https://` URIs pass through to the TLS handshake below.
    connector.enforce_http(false);
    connector
}

/// Connects over TCP, and for `https://` URIs over TLS on top; every
/// connection counts itself in `open` from connect to close, so the gauge
/// covers connections in use and idle in the pool alike.
#[derive(Clone)]
pub struct CountingConnector {
    inner: HttpConnector,
    tls: TlsConnector,
    /// The limit of the TCP connect (set in `inner`) and, apart, of the TLS handshake.
    connect_timeout: Duration,
    open: Gauge,
}

impl fmt::Debug for CountingConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountingConnector")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl CountingConnector {
    /// Counts the connections it opens in `open`; `tls` is for `https://`.
    #[must_use]
    pub fn new(
        connect_timeout: Duration,
        tls: Arc<ClientConfig>,
        open: Gauge,
    ) -> CountingConnector {
        CountingConnector {
            inner: http_connector(connect_timeout),
            tls: TlsConnector::from(tls),
            connect_timeout,
            open,
        }
    }
}

impl tower_service::Service<Uri> for CountingConnector {
    type Response = CountedConnection;
    type Error = BoxError;
    // One allocation per new connection, not per request: the pool reuses them.
    type Future = Pin<Box<dyn Future<Output = Result<CountedConnection, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(BoxError::from)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let server_name = (dst.scheme() == Some(&Scheme::HTTPS)).then(|| {
            let host = dst.host().unwrap_or_default();
            // An IPv6 literal is bracketed in a URI, not in a server name.
            let host = host.trim_start_matches('[').trim_end_matches(']');
            ServerName::try_from(host.to_owned())
        });
        let connecting = self.inner.call(dst);
        let tls = self.tls.clone();
        let handshake_timeout = self.connect_timeout;
        let open = self.open.clone();
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            let io = match server_name {
                None => Transport::Tcp(tcp),
                Some(name) => {
                    let name = name?;
                    let handshake = tls.connect(name.clone(), tcp);
                    let tls = tokio::time::timeout(handshake_timeout, handshake)
                        .await
                        .map_err(|_| {
                            std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "the TLS handshake timed out",
                            )
                        })?
                        .inspect_err(|error| {
                            // Told here only: the client's answer leaves
                            // the names out (`is_name_mismatch`).
                            if is_name_mismatch(error) {
                                tracing::warn!(
                                    upstream = ?name,
                                    %error,
                                    "the upstream's certificate does not name it"
                                );
                            }
                        })?;
                    Transport::Tls(Box::new(tls))
                }
            };
            open.increment(1.0);
            Ok(CountedConnection {
                io: TokioIo::new(io),
                open,
            })
        })
    }
}

/// A byte stream to an upstream: TCP, or TLS over TCP.
#[derive(Debug)]
enum Transport {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(io) => Pin::new(io).poll_read(cx, buf),
            Transport::Tls(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(io) => Pin::new(io).poll_write(cx, buf),
            Transport::Tls(io) => Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(io) => Pin::new(io).poll_flush(cx),
            Transport::Tls(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(io) => Pin::new(io).poll_shutdown(cx),
            Transport::Tls(io) => Pin::new(io).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Tcp(io) => io.is_write_vectored(),
            Transport::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(io) => coalesce::poll_write_vectored(Pin::new(io), cx, bufs),
            Transport::Tls(io) => Pin::new(io).poll_write_vectored(cx, bufs),
        }
    }
}

/// An open upstream connection, counted until it is dropped.
#[derive(Debug)]
pub struct CountedConnection {
    io: TokioIo<Transport>,
    open: Gauge,
}

impl Drop for CountedConnection {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

impl CountedConnection {
    /// Whether TLS's ALPN chose HTTP/2 for this connection (never for plain TCP).
    #[must_use]
    pub fn negotiated_h2(&self) -> bool {
        match self.io.inner() {
            Transport::Tcp(_) => false,
            Transport::Tls(tls) => tls.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl Connection for CountedConnection {
    fn connected(&self) -> Connected {
        let tcp = match self.io.inner() {
            Transport::Tcp(tcp) => tcp,
            Transport::Tls(tls) => tls.get_ref().0,
        };
        // ALPN's choice makes a pooled client speak HTTP/2 on this connection.
        if self.negotiated_h2() {
            tcp.connected().negotiated_h2()
        } else {
            tcp.connected()
        }
    }
}

impl Read for CountedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for CountedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use http_body_util::{BodyExt as _, Empty};
    use hyper::service::service_fn;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    use super::*;

    /// A gauge of whole numbers this test can read.
    #[derive(Debug, Default)]
    struct Count(AtomicI64);

    impl metrics::GaugeFn for Count {
        fn increment(&self, value: f64) {
            self.0.fetch_add(value as i64, Ordering::SeqCst);
        }
        fn decrement(&self, value: f64) {
            self.0.fetch_sub(value as i64, Ordering::SeqCst);
        }
        fn set(&self, value: f64) {
            self.0.store(value as i64, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn counts_pooled_connections_from_connect_to_close() {
        // A backend that serves keep-alive connections until told to stop.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let backend = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            let mut stopped = stopped;
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let (stream, _) = accepted.unwrap();
                        let service = service_fn(|_req| async {
                            Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<bytes::Bytes>::new()))
                        });
                        let conn = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service);
                        connections.spawn(conn);
                    }
                    _ = stopped.wait_for(|s| *s) => break,
                }
            }
            // Aborting the connections closes their sockets.
            connections.shutdown().await;
        });

        let count = Arc::new(Count::default());
        let client: Client<CountingConnector, Empty<bytes::Bytes>> =
            Client::builder(TokioExecutor::new()).build(CountingConnector::new(
                Duration::from_secs(5),
                Arc::new(
                    ClientConfig::builder()
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth(),
                ),
                Gauge::from_arc(count.clone()),
            ));
        for _ in 0..3 {
            let rsp = client
                .get(format!("http://{addr}/").parse().unwrap())
                .await
                .unwrap();
            rsp.into_body().collect().await.unwrap();
        }
        // Sequential requests reuse the one pooled connection.
        assert_eq!(count.0.load(Ordering::SeqCst), 1);

        stop.send_replace(true);
        backend.await.unwrap();
        crate::upstream::tests::wait_until("the closed connection is no longer counted", || {
            count.0.load(Ordering::SeqCst) == 0
        })
        .await;
    }
}
