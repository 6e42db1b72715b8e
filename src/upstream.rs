//! Upstreams: where a version's requests go and the pooled client that takes them there.
//!
//! Owns: the upstream address forms of SPEC section 9 (`host:port`,
//! `https://host:port`, `h2c://host:port`), and the keep-alive connection
//! pool shared by every version, whose open connections it counts in
//! `cohort_upstream_connections`. Does not own: choosing a version (`routing`)
//! or an upstream within it (`table::Version::pick`), nor turning failures
//! into responses (`proxy::error`).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use http::uri::{Authority, Scheme};
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use metrics::Gauge;
use tokio::net::TcpStream;

use crate::config::UpstreamConfig;

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

/// The pooled HTTP/1.1 client every proxied request goes through.
pub type UpstreamClient = Client<CountingConnector, Incoming>;

/// Builds the pooled client: kept-alive connections, `TCP_NODELAY`, the
/// connect timeout, and idle connections closed after `idle_timeout`.
#[must_use]
pub fn client(config: &UpstreamConfig) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(config.connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(config.idle_timeout)
        .pool_max_idle_per_host(config.max_idle_per_host)
        .build(CountingConnector::new(
            connector,
            crate::metrics::upstream_connections(),
        ))
}

/// An [`HttpConnector`] whose connections count themselves in
/// `cohort_upstream_connections` from connect to close, so the gauge covers
/// connections in use and idle in the pool alike.
#[derive(Debug, Clone)]
pub struct CountingConnector {
    inner: HttpConnector,
    open: Gauge,
}

impl CountingConnector {
    /// Counts the connections `inner` opens in `open`.
    #[must_use]
    pub fn new(inner: HttpConnector, open: Gauge) -> CountingConnector {
        CountingConnector { inner, open }
    }
}

impl tower_service::Service<Uri> for CountingConnector {
    type Response = CountedConnection;
    type Error = <HttpConnector as tower_service::Service<Uri>>::Error;
    // One allocation per new connection, not per request: the pool reuses them.
    type Future = Pin<Box<dyn Future<Output = Result<CountedConnection, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connecting = self.inner.call(dst);
        let open = self.open.clone();
        Box::pin(async move {
            let io = connecting.await?;
            open.increment(1.0);
            Ok(CountedConnection { io, open })
        })
    }
}

/// An open upstream connection, counted until it is dropped.
#[derive(Debug)]
pub struct CountedConnection {
    io: TokioIo<TcpStream>,
    open: Gauge,
}

impl Drop for CountedConnection {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

impl Connection for CountedConnection {
    fn connected(&self) -> Connected {
        self.io.connected()
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
