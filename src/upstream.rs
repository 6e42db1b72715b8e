//! Upstreams: where a version's requests go and the pooled client that takes them there.
//!
//! Owns: the upstream address forms of SPEC section 9 (`host:port`,
//! `https://host:port`, `h2c://host:port`), and the keep-alive connection
//! pools shared by every version (HTTP/1.1, HTTP/2 with prior knowledge, and
//! TLS with HTTP/2 or HTTP/1.1 by ALPN), whose open connections it counts in
//! `cohort_upstream_connections`. Does not own: the trust roots for TLS
//! (`tls`), choosing a version (`routing`)
//! or an upstream within it (`table::Version::pick`), nor turning failures
//! into responses (`proxy::error`).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::sync::Arc;

use http::uri::{Authority, Scheme};
use http::{Request, Uri, Version};
use hyper::body::Body;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use metrics::Gauge;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::UpstreamConfig;
use crate::shadow::TeeBody;

/// How an upstream is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// `host:port`: HTTP/1.1 over TCP.
    Http1,
    /// `h2c://host:port`: HTTP/2 with prior knowledge, no TLS.
    H2c,
    /// `https://host:port`: TLS, HTTP/2 or HTTP/1.1 by ALPN.
    Https,
}

/// One upstream address, as written in the config.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamAddr {
    pub protocol: Protocol,
    pub authority: Authority,
}

impl UpstreamAddr {
    /// Parses `host:port`, `h2c://host:port` or `https://host:port`.
    pub fn parse(text: &str) -> Result<UpstreamAddr, String> {
        let (protocol, rest) = if let Some(rest) = text.strip_prefix("https://") {
            (Protocol::Https, rest)
        } else if let Some(rest) = text.strip_prefix("h2c://") {
            (Protocol::H2c, rest)
        } else if let Some(rest) = text.strip_prefix("http://") {
            (Protocol::Http1, rest)
        } else if text.contains("://") {
            return Err(format!(
                "{text:?}: only \"host:port\", \"http://\", \"h2c://\" and \"https://\" upstreams are supported"
            ));
        } else {
            (Protocol::Http1, text)
        };
        let authority: Authority = rest
            .parse()
            .map_err(|_| format!("{text:?} is not an address such as \"127.0.0.1:9001\""))?;
        if authority.port_u16().is_none() || authority.host().is_empty() || rest.contains('@') {
            return Err(format!(
                "{text:?} needs a host and a port, such as \"127.0.0.1:9001\""
            ));
        }
        Ok(UpstreamAddr {
            protocol,
            authority,
        })
    }

    /// The scheme the pooled client connects with.
    #[must_use]
    pub fn scheme(&self) -> Scheme {
        match self.protocol {
            Protocol::Https => Scheme::HTTPS,
            Protocol::Http1 | Protocol::H2c => Scheme::HTTP,
        }
    }
}

impl fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.protocol {
            Protocol::Http1 => write!(f, "{}", self.authority),
            Protocol::H2c => write!(f, "h2c://{}", self.authority),
            Protocol::Https => write!(f, "https://{}", self.authority),
        }
    }
}

impl serde::Serialize for UpstreamAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for UpstreamAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        UpstreamAddr::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The pooled clients every proxied request goes through, one pool per way
/// of speaking: `host:port` and `https://` share one (an `https://`
/// connection speaks HTTP/2 or HTTP/1.1 as ALPN decides), `h2c://` has its
/// own, HTTP/2 only, since its pool keys (`http://host:port`) would collide
/// with the HTTP/1.1 ones. Requests carry the real request's body as a
/// `shadow::TeeBody` (which also feeds a shadow copy, when there is one);
/// generic over the body so that health probes reach every upstream form the
/// way requests do.
#[derive(Debug, Clone)]
pub struct UpstreamClient<B = TeeBody> {
    http: Client<CountingConnector, B>,
    h2c: Client<CountingConnector, B>,
}

impl<B> UpstreamClient<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Sends `req`, whose URI already names `upstream`, the way `upstream` is spoken to.
    pub fn request(&self, upstream: &UpstreamAddr, mut req: Request<B>) -> ResponseFuture {
        match upstream.protocol {
            Protocol::Http1 | Protocol::Https => self.http.request(req),
            Protocol::H2c => {
                *req.version_mut() = Version::HTTP_2;
                self.h2c.request(req)
            }
        }
    }
}

/// Whether a client's `TE` header accepts trailers. `TE` is hop-by-hop, but
/// an HTTP/2 upstream (gRPC) needs `te: trailers` passed on to send them.
#[must_use]
pub fn wants_trailers(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
}

/// Builds the proxy's pooled clients: kept-alive connections, `TCP_NODELAY`,
/// the connect timeout, idle connections closed after `idle_timeout`, each
/// connection counted in `cohort_upstream_connections`; `tls` for `https://`.
#[must_use]
pub fn client(config: &UpstreamConfig, tls: Arc<ClientConfig>) -> UpstreamClient {
    let connector = CountingConnector::new(
        http_connector(config.connect_timeout),
        tls,
        crate::metrics::upstream_connections(),
    );
    let build = |http2_only: bool| {
        Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.idle_timeout)
            .pool_max_idle_per_host(config.max_idle_per_host)
            .http2_only(http2_only)
            .build(connector.clone())
    };
    UpstreamClient {
        http: build(false),
        h2c: build(true),
    }
}

/// Clients for health probes: like [`client`], but keeping one idle
/// connection per upstream and not counted as upstream connections.
#[must_use]
pub fn probe_client<B>(connect_timeout: Duration, tls: Arc<ClientConfig>) -> UpstreamClient<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
{
    let connector = CountingConnector::new(http_connector(connect_timeout), tls, Gauge::noop());
    let build = |http2_only: bool| {
        Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .http2_only(http2_only)
            .build(connector.clone())
    };
    UpstreamClient {
        http: build(false),
        h2c: build(true),
    }
}

fn http_connector(connect_timeout: Duration) -> HttpConnector {
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
    /// Counts the connections `inner` opens in `open`; `tls` is for `https://`.
    #[must_use]
    pub fn new(inner: HttpConnector, tls: Arc<ClientConfig>, open: Gauge) -> CountingConnector {
        CountingConnector {
            inner,
            tls: TlsConnector::from(tls),
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
        let open = self.open.clone();
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            let io = match server_name {
                None => Transport::Tcp(tcp),
                Some(name) => Transport::Tls(Box::new(tls.connect(name?, tcp).await?)),
            };
            open.increment(1.0);
            Ok(CountedConnection {
                io: TokioIo::new(io),
                open,
            })
        })
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
            Transport::Tcp(io) => Pin::new(io).poll_write_vectored(cx, bufs),
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

impl Connection for CountedConnection {
    fn connected(&self) -> Connected {
        match self.io.inner() {
            Transport::Tcp(tcp) => tcp.connected(),
            Transport::Tls(tls) => {
                let (tcp, session) = tls.get_ref();
                // ALPN's choice makes the pool speak HTTP/2 on this connection.
                if session.alpn_protocol() == Some(b"h2") {
                    tcp.connected().negotiated_h2()
                } else {
                    tcp.connected()
                }
            }
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
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};

    use http_body_util::{BodyExt as _, Empty};
    use hyper::service::service_fn;

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
                HttpConnector::new(),
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
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while count.0.load(Ordering::SeqCst) != 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the closed connection is still counted: {}",
                count.0.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn address_forms() {
        let a = UpstreamAddr::parse("127.0.0.1:9001").unwrap();
        assert_eq!(
            (a.protocol, a.to_string().as_str()),
            (Protocol::Http1, "127.0.0.1:9001")
        );
        assert_eq!(
            UpstreamAddr::parse("h2c://agent:80").unwrap().protocol,
            Protocol::H2c
        );
        assert_eq!(
            UpstreamAddr::parse("https://agent:443").unwrap().protocol,
            Protocol::Https
        );
        for bad in ["agent", "ftp://agent:21", "", ":80", "u@agent:80"] {
            assert!(UpstreamAddr::parse(bad).is_err(), "{bad}");
        }
    }
}
