//! Upstreams: where a version's requests go and the pooled clients that take them there.
//!
//! Owns: the upstream address forms of SPEC section 9 (`host:port`, also
//! written `http://host:port`, `https://host:port`, `h2c://host:port`), and the keep-alive connection
//! pools shared by every version of a worker, for HTTP/1.1 ([`http1`]) and
//! HTTP/2 ([`http2`]), and which one an `https://` request goes to: HTTP/2
//! unless ALPN chose HTTP/1.1 (HTTP/1.1 alone for upgrades, which HTTP/2
//! cannot carry); the HTTP/2 flow-control windows; and which failures leave
//! a request safe to send again ([`SendError`]).
//! Does not own: opening connections
//! and counting them ([`connect`]), the trust roots for TLS (`tls`),
//! choosing a version (`routing`) or an upstream within it
//! (`table::Version::pick`), nor turning failures into responses
//! (`proxy::error`).

pub mod connect;
pub mod http1;
pub mod http2;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HOST, UPGRADE};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::body::Body;
use metrics::Gauge;
use rustls::ClientConfig;

use crate::BoxError;
use crate::config::UpstreamConfig;

use connect::CountingConnector;
use http1::Http1Pool;
pub use http1::UpstreamBody;
use http2::Http2Pool;

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
    /// Parses `host:port` (or `http://host:port`, the same), `h2c://host:port`
    /// or `https://host:port`. A URL may end in `/`, as nginx's `proxy_pass`
    /// is often written, but have no other path: requests keep their own.
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
        let rest = match rest.split_once('/') {
            None => rest,
            Some((authority, "")) if text.contains("://") => authority,
            Some((authority, _)) => {
                return Err(format!(
                    "{text:?}: an upstream is an address with no path (a request goes with its own), such as \"{}{authority}\"",
                    &text[..text.len() - rest.len()]
                ));
            }
        };
        let authority: Authority = rest
            .parse()
            .map_err(|_| format!("{text:?} is not an address such as \"127.0.0.1:9001\""))?;
        if let Some((_, port)) = rest.rsplit_once(':')
            && !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_err()
        {
            return Err(format!(
                "{text:?}: port {port} is out of range (1 to 65535)"
            ));
        }
        if authority.port_u16().is_none() || authority.host().is_empty() || rest.contains('@') {
            return Err(format!(
                "{text:?} needs a host and a port, such as \"127.0.0.1:9001\""
            ));
        }
        // `Authority` reads the port as `u16::from_str` does, sign and all.
        if !authority
            .port()
            .is_some_and(|port| port.as_str().bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(format!(
                "{text:?}: the port must be digits, such as \"127.0.0.1:9001\""
            ));
        }
        if authority.port_u16() == Some(0) {
            return Err(format!("{text:?}: port 0 cannot be connected to"));
        }
        // `Authority` takes any bracketed host; only an IPv6 address may be.
        if let Some(inside) = authority
            .host()
            .strip_prefix('[')
            .and_then(|host| host.strip_suffix(']'))
            && inside.parse::<std::net::Ipv6Addr>().is_err()
        {
            return Err(format!(
                "{text:?}: [{inside}] is not an IPv6 address, such as \"[::1]:9001\""
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

/// The pooled connections every proxied request goes through, one pool per
/// way of speaking: `host:port` over HTTP/1.1, `h2c://` over HTTP/2, and
/// `https://` over HTTP/2 or, when ALPN chooses it, HTTP/1.1, each over TLS.
/// Generic over the body: the proxy's requests carry a
/// `proxy::RequestBody`, and health probes reach every upstream form the
/// way requests do with an empty one.
#[derive(Debug, Clone)]
pub struct UpstreamClient<B> {
    http1: Http1Pool<B>,
    h2c: Http2Pool<B>,
    /// `https://` upstreams, offered HTTP/2 and HTTP/1.1 by ALPN; those
    /// that choose HTTP/1.1 are remembered, and go to `https1`.
    https2: Http2Pool<B>,
    /// `https://` over HTTP/1.1: ALPN offers it alone, for upstreams that
    /// chose it and for upgrade requests, since HTTP/2 has no `Upgrade` (as
    /// nginx's `proxy_pass https://` does).
    https1: Http1Pool<B>,
}

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting failed")]
    Connect(#[source] BoxError),
    #[error("the exchange failed")]
    Exchange(#[source] hyper::Error),
    /// A new HTTP/2 connection closed before the request went out: nothing
    /// was sent, and the upstream is failing as one that cannot be
    /// connected to is.
    #[error("the new connection closed before the request went out")]
    NotSent(#[source] hyper::Error),
    /// A WebSocket or other `Upgrade` for an upstream that speaks only
    /// HTTP/2, which has no `Upgrade`; nothing was sent.
    #[error("an upgrade cannot be tunnelled to an h2c:// upstream (HTTP/2 has no Upgrade)")]
    UpgradeOverHttp2,
    /// An `https://` upstream's ALPN chose HTTP/1.1 when offered HTTP/2
    /// too: the HTTP/2 pool gives the request back for the HTTP/1.1 one.
    #[error("the upstream chose HTTP/1.1 by ALPN")]
    Http1Only,
}

/// A failed exchange, with the request given back when another upstream
/// may take it: none of it was sent, or it is idempotent, without a body,
/// and a new connection closed without answering it, or it has no body
/// and an HTTP/2 upstream did not process it ([`Error::is_unprocessed`],
/// which alone lets the same upstream take it again).
pub struct SendError<B> {
    pub error: Error,
    pub retry: Option<Request<B>>,
}

impl<B> fmt::Debug for SendError<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendError")
            .field("error", &self.error)
            .field("retry", &self.retry.is_some())
            .finish()
    }
}

impl<B> From<Error> for SendError<B> {
    fn from(error: Error) -> Self {
        SendError { error, retry: None }
    }
}

impl Error {
    /// Whether no connection could be made, or a new one closed before
    /// taking the request (nothing was sent).
    #[must_use]
    pub fn is_connect(&self) -> bool {
        match self {
            Error::Connect(_) | Error::NotSent(_) => true,
            Error::Exchange(_) | Error::UpgradeOverHttp2 | Error::Http1Only => false,
        }
    }

    /// Whether an HTTP/2 upstream did not process the request, so that it
    /// may be sent again, to this upstream too (RFC 9113, section 8.7): it
    /// reset the stream with `REFUSED_STREAM`, or the stream was above the
    /// last one a graceful `GOAWAY` let through (a server shutting down or
    /// recycling its connection). A `GOAWAY` with an error code says
    /// nothing of the streams it ends, so it does not count.
    #[must_use]
    pub fn is_unprocessed(&self) -> bool {
        h2_cause(self).is_some_and(|h2| {
            h2.is_remote()
                && match h2.reason() {
                    Some(h2::Reason::REFUSED_STREAM) => h2.is_reset(),
                    Some(h2::Reason::NO_ERROR) => h2.is_go_away(),
                    _ => false,
                }
        })
    }
}

/// The HTTP/2 error among `error`'s causes, if any: hyper passes it on as
/// the source of its own.
pub fn h2_cause<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a h2::Error> {
    std::iter::successors(Some(error), |e| e.source()).find_map(|e| e.downcast_ref::<h2::Error>())
}

impl<B> UpstreamClient<B>
where
    B: Body + Default + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Sends `req` to `upstream`, the way `upstream` is spoken to, and
    /// resolves to the response once its headers are in. A request that
    /// another upstream may take comes back with the error.
    pub async fn request(
        &self,
        upstream: &UpstreamAddr,
        mut req: Request<B>,
    ) -> Result<Response<UpstreamBody<B>>, SendError<B>> {
        let upgrade = |req: &Request<B>| req.headers().contains_key(UPGRADE);
        match upstream.protocol {
            Protocol::Http1 => self.http1.send(&upstream.authority, req).await,
            Protocol::H2c if upgrade(&req) => Err(Error::UpgradeOverHttp2.into()),
            Protocol::H2c => over_http2(&self.h2c, upstream, req).await,
            Protocol::Https => {
                if !upgrade(&req) && !self.https2.speaks_http1_only(&upstream.authority) {
                    match over_http2(&self.https2, upstream, req).await {
                        Err(SendError {
                            error: Error::Http1Only,
                            retry: Some(again),
                        }) => req = again,
                        sent => return sent,
                    }
                }
                // The pool names the upstream in a fresh `Host`, as its
                // certificate names it (SNI); the client's travels in
                // `x-forwarded-host`.
                let host = req.headers_mut().remove(HOST);
                self.https1
                    .send(&upstream.authority, req)
                    .await
                    .map_err(|failed| restore_for_retry(failed, host, None))
            }
        }
    }
}

/// Sends `req` over `pool` to an HTTP/2 upstream. It is named by
/// `:authority` alone: a `Host` that differs from it makes servers such as
/// nginx refuse the request (RFC 9113, section 8.3.1), so the client's goes
/// in `x-forwarded-host` only. A request given back has its `Host` and
/// version again, for another upstream, maybe an HTTP/1.1 one.
async fn over_http2<B>(
    pool: &Http2Pool<B>,
    upstream: &UpstreamAddr,
    mut req: Request<B>,
) -> Result<Response<UpstreamBody<B>>, SendError<B>>
where
    B: Body + Default + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let host = req.headers_mut().remove(HOST);
    let version = req.version();
    address(&mut req, upstream);
    *req.version_mut() = Version::HTTP_2;
    pool.send(&upstream.authority, req)
        .await
        .map_err(|failed| restore_for_retry(failed, host, Some(version)))
}

/// Puts `host` and `version` back on the request a failed send gave back.
fn restore_for_retry<B>(
    mut failed: SendError<B>,
    host: Option<http::HeaderValue>,
    version: Option<Version>,
) -> SendError<B> {
    if let Some(retry) = &mut failed.retry {
        if let Some(version) = version {
            *retry.version_mut() = version;
        }
        if let Some(host) = host {
            retry.headers_mut().insert(HOST, host);
        }
    }
    failed
}

/// Runs `sweep` on a pool every half of its `idle_timeout` (at least every
/// 50 ms) until the pool is gone: the idle sweep of Cohort's own pools.
async fn sweep_every_half<P>(
    pool: std::sync::Weak<P>,
    idle_timeout: impl Fn(&P) -> Duration,
    sweep: impl Fn(&P, tokio::time::Instant),
) {
    let Some(every) = pool.upgrade().map(|pool| idle_timeout(&pool) / 2) else {
        return;
    };
    let every = every.max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        sweep(&pool, tokio::time::Instant::now());
    }
}

/// A copy of `req`'s method, target, version and headers (not its
/// extensions, which cannot be cloned, nor its body).
pub(crate) fn copy_head<B>(req: &Request<B>) -> http::request::Parts {
    let mut head = Request::new(());
    *head.method_mut() = req.method().clone();
    *head.uri_mut() = req.uri().clone();
    *head.version_mut() = req.version();
    *head.headers_mut() = req.headers().clone();
    head.into_parts().0
}

/// Names `upstream` in `req`'s URI (absolute form): what HTTP/2 sends as
/// `:scheme` and `:authority`, and how the shadow's pooled client
/// (hyper-util's) knows where to connect.
pub fn address<B>(req: &mut Request<B>, upstream: &UpstreamAddr) {
    let mut uri = std::mem::take(req.uri_mut()).into_parts();
    uri.scheme = Some(upstream.scheme());
    uri.authority = Some(upstream.authority.clone());
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    // Scheme, authority and path are all set, which is all `from_parts` checks.
    *req.uri_mut() = Uri::from_parts(uri).unwrap_or_default();
}

/// Leaves only the path and query of an absolute-form URI (an HTTP/2
/// client's, or a probe's): what the request line to an HTTP/1.1 upstream names.
pub fn origin_form(uri: &mut Uri) {
    if uri.authority().is_some() {
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *uri = Uri::from(path);
    }
}

/// Builds the proxy's pooled clients: kept-alive connections, `TCP_NODELAY`,
/// the connect timeout, idle connections closed after `idle_timeout`, each
/// connection counted in `cohort_upstream_connections`, HTTP/2 flow-control
/// windows that keep streams from holding each other up; `tls` for `https://`.
#[must_use]
pub fn client<B>(config: &UpstreamConfig, tls: Arc<ClientConfig>) -> UpstreamClient<B>
where
    B: Body + Default + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let open = crate::metrics::upstream_connections();
    pools(
        |tls| CountingConnector::new(config.connect_timeout, tls, open.clone()),
        &tls,
        config.idle_timeout,
        config.max_idle_per_host,
    )
}

/// The pools of an [`UpstreamClient`], each connecting with a connector
/// `connect` makes from a TLS config: `tls` for HTTP/2 over TLS, `tls`
/// offering HTTP/1.1 alone for HTTP/1.1 over TLS.
fn pools<B>(
    connect: impl Fn(Arc<ClientConfig>) -> CountingConnector,
    tls: &Arc<ClientConfig>,
    idle_timeout: Duration,
    max_idle_per_host: usize,
) -> UpstreamClient<B>
where
    B: Body + Default + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    // One connector for every pool that speaks HTTP/1.1 or h2c: plain TCP
    // for `http` (its TLS config unused), and TLS offering `http/1.1` alone
    // for `https` upstreams that chose it.
    let offering_http1 = connect(http1_only(tls));
    UpstreamClient {
        http1: Http1Pool::new(
            offering_http1.clone(),
            Scheme::HTTP,
            idle_timeout,
            max_idle_per_host,
        ),
        h2c: Http2Pool::new(offering_http1.clone(), Scheme::HTTP, idle_timeout),
        https2: Http2Pool::new(connect(Arc::clone(tls)), Scheme::HTTPS, idle_timeout),
        https1: Http1Pool::new(
            offering_http1,
            Scheme::HTTPS,
            idle_timeout,
            max_idle_per_host,
        ),
    }
}

/// How much of an HTTP/2 upstream stream's response may arrive before the
/// proxy has passed it on: what a client that reads slowly, or not at all,
/// leaves waiting in the proxy, per stream. hyper's default (2 MiB) let
/// one HTTP/2 client that opened streams and read nothing make the proxy
/// hold 800 MB; with 256 KiB it holds under 70 MB, and one large download
/// over loopback goes as fast as with 2 MiB (`BENCHMARKS.md`).
pub(crate) const H2_STREAM_WINDOW: u32 = 256 << 10;

/// How much of all of an HTTP/2 upstream connection's responses may: room
/// for 256 streams' windows, where hyper's default (5 MiB) holds twenty. Every stream of a connection shares its window, so a few clients
/// that read slowly would otherwise hold up every other client's response
/// from that upstream. A window grants the upstream leave to send, no
/// memory; what waits stays bounded by the streams' own windows (so, at
/// worst, 256 KiB for each stream whose client reads nothing).
pub(crate) const H2_CONNECTION_WINDOW: u32 = 256 * H2_STREAM_WINDOW;

/// `tls` with ALPN offering HTTP/1.1 alone.
fn http1_only(tls: &ClientConfig) -> Arc<ClientConfig> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(tls)
}

/// How long a probe connection may sit idle (hyper-util's default).
const PROBE_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Clients for health probes: like [`client`], but keeping one idle
/// connection per upstream and not counted as upstream connections.
#[must_use]
pub fn probe_client<B>(connect_timeout: Duration, tls: Arc<ClientConfig>) -> UpstreamClient<B>
where
    B: Body + Default + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    pools(
        |tls| CountingConnector::new(connect_timeout, tls, Gauge::noop()),
        &tls,
        PROBE_IDLE_TIMEOUT,
        1,
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// What a test backend has seen: connections accepted, and still open.
    #[derive(Default)]
    pub(crate) struct Seen {
        pub(crate) accepted: AtomicUsize,
        pub(crate) open: AtomicUsize,
    }

    /// A backend on a loopback port that serves each connection it accepts
    /// with `serve`, counted in [`Seen`].
    pub(crate) async fn backend<F, Fut>(serve: F) -> (Authority, Arc<Seen>)
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let seen = Arc::new(Seen::default());
        let counts = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                counts.accepted.fetch_add(1, Ordering::SeqCst);
                counts.open.fetch_add(1, Ordering::SeqCst);
                let counts = Arc::clone(&counts);
                let served = serve(stream);
                tokio::spawn(async move {
                    served.await;
                    counts.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        (authority, seen)
    }

    /// A TLS backend for `localhost` on a loopback port whose ALPN chooses
    /// `alpn`, serving each connection it has shaken hands on with `serve`;
    /// and a connector that trusts it and offers `h2` and `http/1.1`.
    pub(crate) async fn tls_backend<F, Fut>(
        alpn: &[u8],
        serve: F,
    ) -> (Authority, Arc<Seen>, CountingConnector)
    where
        F: Fn(tokio_rustls::server::TlsStream<TcpStream>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let mut server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        server.alpn_protocols = vec![alpn.to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let serve = Arc::new(serve);
        let (authority, seen) = backend(move |stream| {
            let acceptor = acceptor.clone();
            let serve = Arc::clone(&serve);
            async move {
                if let Ok(tls) = acceptor.accept(stream).await {
                    serve(tls).await;
                }
            }
        })
        .await;
        let authority = format!("localhost:{}", authority.port_u16().unwrap())
            .parse()
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let mut client = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let connector =
            CountingConnector::new(Duration::from_secs(5), Arc::new(client), Gauge::noop());
        (authority, seen, connector)
    }

    /// A connector for test pools: a 5 s connect timeout, no trusted roots,
    /// connections not counted.
    pub(crate) fn connector() -> CountingConnector {
        let tls = ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        CountingConnector::new(Duration::from_secs(5), Arc::new(tls), Gauge::noop())
    }

    /// Polls `done` until it holds, failing the test after 10 s.
    pub(crate) async fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting until {what}"
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
        // `http://` is the bare form written out.
        assert_eq!(
            UpstreamAddr::parse("http://agent:80").unwrap().to_string(),
            "agent:80"
        );
        for bad in [
            "agent",
            "ftp://agent:21",
            "",
            ":80",
            "u@agent:80",
            "127.0.0.1:0",
            "[1.2.3.4]:80",
        ] {
            assert!(UpstreamAddr::parse(bad).is_err(), "{bad}");
        }
        let error = UpstreamAddr::parse("127.0.0.1:99999").unwrap_err();
        assert!(error.contains("port 99999 is out of range"), "{error}");
        assert_eq!(
            UpstreamAddr::parse("h2c://[::1]:9001").unwrap().to_string(),
            "h2c://[::1]:9001"
        );
        let error = UpstreamAddr::parse("https://[zz]:443").unwrap_err();
        assert!(error.contains("[zz] is not an IPv6 address"), "{error}");
        // A URL may end in `/` as `proxy_pass` often does; no other path.
        assert_eq!(
            UpstreamAddr::parse("http://agent:80/").unwrap().to_string(),
            "agent:80"
        );
        assert_eq!(
            UpstreamAddr::parse("https://agent:443/")
                .unwrap()
                .to_string(),
            "https://agent:443"
        );
        for (bad, shown) in [
            ("http://agent:80/v2", "\"http://agent:80\""),
            ("h2c://agent:80/v2/", "\"h2c://agent:80\""),
            ("agent:80/", "\"agent:80\""),
        ] {
            let error = UpstreamAddr::parse(bad).unwrap_err();
            assert!(
                error.contains("no path") && error.ends_with(&format!("such as {shown}")),
                "{error}"
            );
        }
    }
}
