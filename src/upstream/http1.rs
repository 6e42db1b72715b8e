//! The HTTP/1.1 connection pool: of plain `host:port` upstreams, and of
//! `https://` ones over HTTP/1.1.
//!
//! Owns:
//! - Keeping open HTTP/1.1 connections per upstream ([`Http1Pool`]).
//! - Lending one to each exchange and taking it back when the response body
//!   has been read to its end ([`UpstreamBody`] carries it until then);
//!   not one that answered in HTTP/1.0, on which hyper would drop the next
//!   request's body of unknown length.
//! - Sending a request again on a new connection when a pooled one closed
//!   before the request was written; for an idempotent request without a
//!   body, also when one closed unanswered after lying idle for
//!   `RESEND_AFTER_IDLE` (1 s) or more, or at any time on an upstream seen
//!   closing connections unannounced.
//! - Giving a request back for another upstream when a new connection fails
//!   the same ways.
//! - Ending the connection of an exchange dropped before its answer.
//! - Closing connections idle longer than `idle_timeout`.
//!
//! Each worker has its own pool, so a request never waits on another thread;
//! and because a connection comes back from the body that used it, no task is
//! spawned per request to watch for it going idle.
//!
//! Does not own: opening connections, over TLS for `https://` (`connect`),
//! nor HTTP/2 upstreams (`http2`), nor which `https://` upstreams speak
//! HTTP/1.1 (`super`).

use std::error::Error as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{Entry, HOST};
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::connect::CountingConnector;
use super::http2::StreamSlot;
use super::{Error, SendError};
use crate::BoxError;

/// A pooled connection idle this long may be closed by the upstream just as
/// a request goes out on it (its own keep-alive timeout ran out: 2 to 5 s is
/// common), and the request is then lost unanswered. An idempotent request
/// without a body sent on one keeps a copy of its head, and is sent again
/// on a new connection if that happens, as nginx does on a cached
/// connection. Busier connections are not worth the copy, but for an
/// upstream seen closing one unannounced (see [`Host::closes_unannounced`]).
const RESEND_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Idle HTTP/1.1 connections, by upstream. Cheap to clone: clones share the pool.
pub struct Http1Pool<B> {
    shared: Arc<Shared<B>>,
}

impl<B> Clone for Http1Pool<B> {
    fn clone(&self) -> Self {
        Http1Pool {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<B> std::fmt::Debug for Http1Pool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1Pool")
            .field("idle_timeout", &self.shared.idle_timeout)
            .field("max_idle_per_host", &self.shared.max_idle_per_host)
            .finish_non_exhaustive()
    }
}

struct Shared<B> {
    connector: CountingConnector,
    /// `http`, or `https` for connections over TLS.
    scheme: Scheme,
    idle_timeout: Duration,
    max_idle_per_host: usize,
    /// A short list: a route table names a handful of upstreams, so a scan
    /// beats hashing the authority on every request.
    idle: Mutex<Vec<Host<B>>>,
    /// Whether the task that closes expired connections has been started
    /// (on the first connection, so on the runtime that uses the pool).
    sweeping: AtomicBool,
}

struct Host<B> {
    authority: Authority,
    /// Oldest first; connections are lent newest first.
    connections: Vec<Idle<B>>,
    /// A kept-alive connection of this upstream closed unanswered under a
    /// request that kept no copy (lent again soon after its last
    /// response, or a request that may not be sent again): it closes
    /// connections without saying so (no `Connection: close`), and a
    /// request sent in the moment before the close is seen is lost. From
    /// then on each request to it that may be sent again keeps the copy
    /// that lets it be.
    closes_unannounced: bool,
}

/// An idle connection taken from the pool, and whether a request sent on
/// it should keep a copy of its head (see [`RESEND_AFTER_IDLE`]).
struct Pooled<B> {
    conn: Conn<B>,
    keep_copy: bool,
}

struct Idle<B> {
    conn: Conn<B>,
    since: Instant,
}

/// One connection: its sender, and its task, which an exchange dropped
/// before its answer ends (see [`Unanswered`]).
struct Conn<B> {
    sender: SendRequest<B>,
    task: AbortHandle,
}

/// Ends a connection whose exchange is dropped before its answer came (the
/// response timeout ran out, or the client left). hyper would otherwise go
/// on writing the request body to an upstream that reads none, holding
/// both the upstream's socket and the client's (whose body it is), for as
/// long as the upstream keeps its end open. An HTTP/2 stream is reset
/// instead, its connection kept.
struct Unanswered<'a>(Option<&'a AbortHandle>);

impl Unanswered<'_> {
    fn answered(&mut self) {
        self.0 = None;
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let Some(task) = self.0 {
            task.abort();
        }
    }
}

impl<B> Http1Pool<B>
where
    B: Body + Default + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A pool that connects with `connector` (over TLS if `scheme` is
    /// `https`), keeps at most `max_idle_per_host` idle connections per
    /// upstream, and closes those idle longer than `idle_timeout`.
    #[must_use]
    pub fn new(
        connector: CountingConnector,
        scheme: Scheme,
        idle_timeout: Duration,
        max_idle_per_host: usize,
    ) -> Http1Pool<B> {
        Http1Pool {
            shared: Arc::new(Shared {
                connector,
                scheme,
                idle_timeout,
                max_idle_per_host,
                idle: Mutex::new(Vec::new()),
                sweeping: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `req` to `authority` on a pooled connection, or a new one. If
    /// no connection can be made, the request comes back with the error.
    /// (A `B::default()` is the empty body of a request sent again.)
    pub async fn send(
        &self,
        authority: &Authority,
        mut req: Request<B>,
    ) -> Result<Response<UpstreamBody<B>>, SendError<B>> {
        // The request line names only the path: the connection is the
        // authority, which `Host` must then name (hyper does not add it).
        let mut named_host = false;
        if let Entry::Vacant(host) = req.headers_mut().entry(HOST)
            && let Ok(value) = HeaderValue::from_str(host_field(authority, &self.shared.scheme))
        {
            host.insert(value);
            named_host = true;
        }
        // A request given back may go to another upstream: it must not
        // name this one.
        let give_back = |mut req: Request<B>| {
            if named_host {
                req.headers_mut().remove(HOST);
            }
            req
        };
        super::origin_form(req.uri_mut());
        let mut pooled = self.shared.checkout(authority);
        loop {
            let reused = pooled.is_some();
            let mut resend = None;
            let mut conn = match pooled.take() {
                Some(Pooled { conn, keep_copy }) => {
                    if keep_copy {
                        resend = head_to_resend(&req);
                    }
                    conn
                }
                None => match self.connect(authority).await {
                    Ok(conn) => {
                        // New connections are rare enough to pay for the
                        // copy that lets another upstream take the request.
                        resend = head_to_resend(&req);
                        conn
                    }
                    Err(error) => {
                        return Err(SendError {
                            error,
                            retry: Some(give_back(req)),
                        });
                    }
                },
            };
            let mut unanswered = Unanswered(Some(&conn.task));
            let sent = conn.sender.try_send_request(req).await;
            unanswered.answered();
            drop(unanswered);
            match sent {
                Ok(rsp) => {
                    // An upgraded connection belongs to its tunnel from now
                    // on. One that answered in HTTP/1.0 is not lent again:
                    // hyper would send its next requests in HTTP/1.0, where a
                    // body of no declared length (chunked from the client,
                    // or an HTTP/2 stream's) cannot be framed, and hyper
                    // drops it.
                    let reusable = rsp.status() != StatusCode::SWITCHING_PROTOCOLS
                        && rsp.version() != Version::HTTP_10;
                    let lease = reusable.then(|| Lease {
                        pool: Arc::clone(&self.shared),
                        authority: authority.clone(),
                        conn,
                    });
                    return Ok(rsp.map(|incoming| UpstreamBody {
                        incoming,
                        lease,
                        _stream: None,
                    }));
                }
                Err(mut error) => {
                    // Written, but the connection closed with no answer: an
                    // idempotent request may be sent again (RFC 9110 9.2.2).
                    let closed = closed_unanswered(error.error());
                    if reused && closed && resend.is_none() {
                        self.shared.closes_unannounced(authority);
                    }
                    let unanswered = resend.filter(|_| closed);
                    let again = error
                        .take_message()
                        .or_else(|| unanswered.map(|head| Request::from_parts(head, B::default())));
                    let error = Error::Exchange(error.into_error());
                    match again {
                        // A pooled connection the upstream had closed: again,
                        // on a new connection to the same upstream.
                        Some(again) if reused => {
                            tracing::debug!(upstream = %authority, "pooled connection closed unanswered; sending again");
                            req = again;
                        }
                        // A new connection failed: the upstream is, so another may take it.
                        again => {
                            return Err(SendError {
                                error,
                                retry: again.map(give_back),
                            });
                        }
                    }
                }
            }
        }
    }

    async fn connect(&self, authority: &Authority) -> Result<Conn<B>, Error> {
        let uri = Uri::builder()
            .scheme(self.shared.scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| Error::Connect(e.into()))?;
        let mut connector = self.shared.connector.clone();
        let io = tower_service::Service::call(&mut connector, uri)
            .await
            .map_err(Error::Connect)?;
        let (sender, connection) = http1::handshake(io)
            .await
            .map_err(|e| Error::Connect(e.into()))?;
        let task = tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%error, "upstream connection ended");
            }
        })
        .abort_handle();
        if !self.shared.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(&self.shared)));
        }
        Ok(Conn { sender, task })
    }
}

impl<B> Shared<B> {
    /// The newest idle connection to `authority` that can take a request now.
    fn checkout(&self, authority: &Authority) -> Option<Pooled<B>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let host = idle.iter_mut().find(|host| host.authority == *authority)?;
        // Checked here as well as by the sweeper, which runs only every half
        // timeout: an upstream's own keep-alive timeout may be just past ours.
        let now = Instant::now();
        // Closed ones go; so does one still finishing its last exchange (an
        // answer that came before its request body was all sent): it closes
        // when that ends, rather than making this request wait.
        while let Some(Idle { conn, since }) = host.connections.pop() {
            let idle_for = now.saturating_duration_since(since);
            if idle_for >= self.idle_timeout {
                // The older ones have been idle longer still.
                host.connections.clear();
                break;
            }
            if conn.sender.is_ready() {
                let keep_copy = idle_for >= RESEND_AFTER_IDLE || host.closes_unannounced;
                return Some(Pooled { conn, keep_copy });
            }
        }
        None
    }

    fn put_back(&self, authority: Authority, conn: Conn<B>) {
        if conn.sender.is_closed() {
            return;
        }
        let since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let connections = &mut host_entry(&mut idle, authority).connections;
        if connections.len() < self.max_idle_per_host {
            connections.push(Idle { conn, since });
        }
    }

    /// Notes that `authority` closes connections unannounced (see
    /// [`Host::closes_unannounced`]).
    fn closes_unannounced(&self, authority: &Authority) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let host = host_entry(&mut idle, authority.clone());
        if !host.closes_unannounced {
            tracing::info!(
                upstream = %authority,
                "the upstream closed a kept-alive connection unannounced; idempotent requests to it now keep a copy to send again"
            );
            host.closes_unannounced = true;
        }
    }

    /// Closes the connections idle since before `deadline`, and forgets
    /// upstreams left with none (but what they were seen doing).
    fn close_idle_since(&self, deadline: Instant) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        for host in idle.iter_mut() {
            host.connections
                .retain(|idle| idle.since > deadline && !idle.conn.sender.is_closed());
        }
        idle.retain(|host| !host.connections.is_empty() || host.closes_unannounced);
    }
}

/// The entry of `authority` in `idle`, added if missing.
fn host_entry<B>(idle: &mut Vec<Host<B>>, authority: Authority) -> &mut Host<B> {
    let index = match idle.iter().position(|host| host.authority == authority) {
        Some(index) => index,
        None => {
            idle.push(Host {
                authority,
                connections: Vec::new(),
                closes_unannounced: false,
            });
            idle.len() - 1
        }
    };
    &mut idle[index]
}

/// A copy of `req`'s head, if it may be sent again: an idempotent method
/// and no body.
fn head_to_resend<B: Body>(req: &Request<B>) -> Option<http::request::Parts> {
    (req.method().is_idempotent() && req.body().is_end_stream()).then(|| super::copy_head(req))
}

/// Whether the connection closed (or was reset) before a whole response
/// head came back: what an upstream closing an idle connection looks like
/// (over TLS, maybe without a `close_notify`, which rustls reports as an
/// unexpected end of file).
/// (A partial head, or a `1xx`, before the close counts too: the method is
/// idempotent, so a second run of it is allowed, RFC 9110 9.2.2.)
pub(super) fn closed_unanswered(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() {
        return true;
    }
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = cause.source();
    }
    false
}

/// Closes expired idle connections until the pool is gone: dropping an idle
/// connection's sender ends its connection task, which closes the socket.
async fn sweep<B>(pool: Weak<Shared<B>>) {
    super::sweep_every_half(
        pool,
        |pool| pool.idle_timeout,
        |pool, now| {
            if let Some(deadline) = now.checked_sub(pool.idle_timeout) {
                pool.close_idle_since(deadline);
            }
        },
    )
    .await;
}

/// What `Host` names `authority` by when it is reached by `scheme`: without
/// the scheme's default port, as curl and browsers write it.
fn host_field<'a>(authority: &'a Authority, scheme: &Scheme) -> &'a str {
    let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    if authority.port_u16() == Some(default_port) {
        authority.host()
    } else {
        authority.as_str()
    }
}

/// A pooled connection lent to one exchange.
struct Lease<B> {
    pool: Arc<Shared<B>>,
    authority: Authority,
    conn: Conn<B>,
}

impl<B> Lease<B> {
    fn give_back(self) {
        self.pool.put_back(self.authority, self.conn);
    }
}

/// An upstream response body. For a pooled HTTP/1.1 connection, it gives
/// the connection back to the pool once read to its end (or its trailers,
/// its last frame); dropped earlier,
/// the connection closes instead, since the rest of the body is still on it.
/// For a stream of a pooled HTTP/2 connection, it holds the stream's place
/// on its connection until dropped.
pub struct UpstreamBody<B> {
    incoming: Incoming,
    lease: Option<Lease<B>>,
    _stream: Option<StreamSlot>,
}

impl<B> UpstreamBody<B> {
    /// A body that came on `stream` of a pooled HTTP/2 connection.
    pub(super) fn on_stream(incoming: Incoming, stream: StreamSlot) -> UpstreamBody<B> {
        UpstreamBody {
            incoming,
            lease: None,
            _stream: Some(stream),
        }
    }
}

impl<B> Body for UpstreamBody<B> {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.incoming).poll_frame(cx);
        // The end, or trailers: the last frame of a body, after which
        // hyper's server asks for no more.
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers(),
            _ => false,
        };
        if ended && let Some(lease) = this.lease.take() {
            lease.give_back();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

impl<B> Drop for UpstreamBody<B> {
    fn drop(&mut self) {
        // hyper stops polling a body once it reports its end: an empty one
        // (HEAD, 204, 304, `content-length: 0`) is never polled, and one with
        // a `content-length` is dropped after its last byte. Either way its
        // connection is free.
        if let Some(lease) = self.lease.take()
            && self.incoming.is_end_stream()
        {
            lease.give_back();
        }
    }
}

impl<B> std::fmt::Debug for UpstreamBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("incoming", &self.incoming)
            .field("pooled", &self.lease.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;

    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Empty, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;
    use crate::upstream::tests::{Seen, connector, tls_backend, wait_until};

    /// A keep-alive HTTP/1.1 backend whose every answer has a body of `size` bytes.
    async fn backend(size: usize) -> (Authority, Arc<Seen>) {
        crate::upstream::tests::backend(move |stream| async move {
            let service = service_fn(move |_req| async move {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(vec![b'x'; size]))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        })
        .await
    }

    fn authority(addr: SocketAddr) -> Authority {
        addr.to_string().parse().unwrap()
    }

    fn pool(idle_timeout: Duration) -> Http1Pool<Empty<Bytes>> {
        Http1Pool::new(connector(), Scheme::HTTP, idle_timeout, 8)
    }

    fn get() -> Request<Empty<Bytes>> {
        Request::get("/").body(Empty::new()).unwrap()
    }

    /// Reads one request head (a GET's: no body follows) from `stream`;
    /// empty if the client closes before a whole one.
    async fn read_head(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return Vec::new(),
                Ok(read) => head.extend_from_slice(&buf[..read]),
            }
        }
        head
    }

    #[test]
    fn only_an_idempotent_request_without_a_body_is_kept_to_send_again() {
        let head = head_to_resend(
            &Request::get("/a?b")
                .header("x-k", "v")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .expect("a GET without a body");
        assert_eq!(
            (head.method, head.uri.to_string()),
            (http::Method::GET, "/a?b".to_owned())
        );
        assert_eq!(head.headers["x-k"], "v");
        let post = Request::post("/").body(Empty::<Bytes>::new()).unwrap();
        assert!(head_to_resend(&post).is_none());
        let put = Request::put("/")
            .body(http_body_util::Full::new(Bytes::from_static(b"x")))
            .unwrap();
        assert!(head_to_resend(&put).is_none());
    }

    #[tokio::test]
    async fn a_connection_read_to_the_end_is_reused() {
        let (upstream, seen) = backend(100_000).await;
        let pool = pool(Duration::from_secs(60));
        for _ in 0..5 {
            let rsp = pool.send(&upstream, get()).await.unwrap();
            let body = rsp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), 100_000);
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
    }

    /// What hyper's server does with a body that ends in trailers: it
    /// stops polling once it has them, the body's last frame.
    #[tokio::test]
    async fn a_body_dropped_after_its_trailers_frees_its_connection() {
        let (upstream, seen) = crate::upstream::tests::backend(|stream| async move {
            let service = service_fn(|_req| async {
                let frames = [
                    Frame::data(Bytes::from_static(b"answer")),
                    Frame::trailers(http::HeaderMap::from_iter([(
                        http::HeaderName::from_static("grpc-status"),
                        http::HeaderValue::from_static("0"),
                    )])),
                ]
                .map(Ok::<_, Infallible>);
                let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
                // hyper's server sends the trailer fields its answer declares.
                let rsp = Response::builder()
                    .header(http::header::TRAILER, "grpc-status")
                    .body(body);
                Ok::<_, Infallible>(rsp.unwrap())
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        })
        .await;
        let pool = pool(Duration::from_secs(60));
        for _ in 0..3 {
            // And to a client that says it takes them.
            let req = Request::get("/")
                .header(http::header::TE, "trailers")
                .body(Empty::new())
                .unwrap();
            let mut body = pool.send(&upstream, req).await.unwrap().into_body();
            let data = body.frame().await.unwrap().unwrap();
            assert_eq!(data.into_data().unwrap(), "answer");
            let trailers = body.frame().await.unwrap().unwrap();
            assert!(trailers.is_trailers(), "{trailers:?}");
            drop(body);
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_empty_body_never_polled_still_frees_its_connection() {
        let (upstream, seen) = backend(0).await;
        let pool = pool(Duration::from_secs(60));
        for _ in 0..3 {
            let rsp = pool.send(&upstream, get()).await.unwrap();
            assert!(rsp.body().is_end_stream());
            drop(rsp);
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_after_its_last_byte_frees_its_connection() {
        // What hyper's server does with a `content-length` body: it stops
        // polling once the body says it has ended.
        let (upstream, seen) = backend(100).await;
        let pool = pool(Duration::from_secs(60));
        for _ in 0..3 {
            let mut body = pool.send(&upstream, get()).await.unwrap().into_body();
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap().len(), 100);
            assert!(body.is_end_stream());
            drop(body);
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_half_read_closes_its_connection() {
        let (upstream, seen) = backend(1_000_000).await;
        let pool = pool(Duration::from_secs(60));
        let mut body = pool.send(&upstream, get()).await.unwrap().into_body();
        body.frame().await.unwrap().unwrap();
        drop(body);
        // The rest of that body is still on the first connection: a new one serves this.
        let rsp = pool.send(&upstream, get()).await.unwrap();
        rsp.into_body().collect().await.unwrap();
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
        wait_until("the half-read connection is closed", || {
            seen.open.load(Ordering::SeqCst) == 1
        })
        .await;
    }

    #[tokio::test]
    async fn idle_connections_close_after_the_idle_timeout() {
        let (upstream, seen) = backend(10).await;
        let pool = pool(Duration::from_millis(200));
        let rsp = pool.send(&upstream, get()).await.unwrap();
        rsp.into_body().collect().await.unwrap();
        assert_eq!(seen.open.load(Ordering::SeqCst), 1);
        wait_until("the idle connection is closed", || {
            seen.open.load(Ordering::SeqCst) == 0
        })
        .await;
    }

    #[tokio::test]
    async fn a_request_given_back_does_not_name_the_upstream_that_could_not_take_it() {
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = authority(dead.local_addr().unwrap());
        drop(dead);
        let req = Request::get("/").body(Empty::new()).unwrap();
        let failed = pool(Duration::from_secs(60))
            .send(&upstream, req)
            .await
            .unwrap_err();
        assert!(failed.error.is_connect(), "{failed:?}");
        let again = failed.retry.expect("the request, given back");
        assert_eq!(again.headers().get(HOST), None);
    }

    #[tokio::test]
    async fn a_tls_connection_cut_without_close_notify_gives_back_an_idempotent_request() {
        // It reads the request, then drops the connection without a TLS
        // close_notify, as a server killed mid-request does.
        let (authority, _, connector) = tls_backend(b"http/1.1", |mut tls| async move {
            let _ = tokio::io::AsyncReadExt::read(&mut tls, &mut [0; 1024]).await;
        })
        .await;
        let pool = Http1Pool::new(connector, Scheme::HTTPS, Duration::from_secs(60), 8);
        let get = Request::get(format!("https://{authority}/"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let failed = pool.send(&authority, get).await.unwrap_err();
        assert!(failed.retry.is_some(), "{failed:?}");
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_not_used() {
        // Answers one request per connection with a keep-alive response,
        // then closes the connection without saying so.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = authority(listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let n = counted.fetch_add(1, Ordering::SeqCst);
                let head = read_head(&mut stream).await;
                assert!(!head.is_empty(), "the client closed before a request head");
                let body = format!("answer {n}");
                let rsp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(rsp.as_bytes()).await.unwrap();
            }
        });
        let pool = pool(Duration::from_secs(60));
        for n in 0..3 {
            let rsp = pool.send(&upstream, get()).await.unwrap();
            let body = rsp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, format!("answer {n}").as_bytes());
            wait_until("the pooled connection is seen closed", || {
                let idle = pool.shared.idle.lock().unwrap();
                idle.iter()
                    .flat_map(|host| &host.connections)
                    .all(|idle| idle.conn.sender.is_closed())
            })
            .await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_upstream_seen_closing_connections_unannounced_loses_no_more_requests() {
        // Answers the first request of each connection with a keep-alive
        // response; reads the second, then closes without answering, as an
        // upstream does when its close crosses the next request.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = authority(listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    for answer in [true, false] {
                        let head = read_head(&mut stream).await;
                        if head.is_empty() || !answer {
                            return;
                        }
                        let rsp = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        stream.write_all(rsp.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        let pool = pool(Duration::from_secs(60));
        let mut lost = Vec::new();
        for n in 0..10 {
            match pool.send(&upstream, get()).await {
                Ok(rsp) => {
                    rsp.into_body().collect().await.unwrap();
                }
                Err(failed) => lost.push((n, failed.retry.is_some())),
            }
        }
        // The second request finds out, and is lost (it had no copy); the
        // rest are sent again on a new connection when theirs closes.
        assert_eq!(lost, [(1, false)]);
    }

    #[test]
    fn host_names_the_upstream_without_its_schemes_default_port() {
        let host =
            |authority: &str, scheme| host_field(&authority.parse().unwrap(), &scheme).to_owned();
        assert_eq!(host("agent:443", Scheme::HTTPS), "agent");
        assert_eq!(host("agent:80", Scheme::HTTP), "agent");
        assert_eq!(host("[::1]:443", Scheme::HTTPS), "[::1]");
        assert_eq!(host("agent:80", Scheme::HTTPS), "agent:80");
        assert_eq!(host("agent:8443", Scheme::HTTPS), "agent:8443");
        assert_eq!(host("[::1]:8080", Scheme::HTTP), "[::1]:8080");
    }

    #[tokio::test]
    async fn an_absolute_uri_is_sent_in_origin_form_with_its_host() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = authority(listener.local_addr().unwrap());
        let served = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (seen, saw) = tokio::sync::oneshot::channel();
            let seen = std::sync::Mutex::new(Some(seen));
            let service = service_fn(move |req: Request<Incoming>| {
                if let Some(seen) = seen.lock().unwrap().take() {
                    let host = req
                        .headers()
                        .get(HOST)
                        .map(|h| h.to_str().unwrap().to_owned());
                    let _ = seen.send((req.uri().to_string(), host));
                }
                async { Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new())) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            saw.await.unwrap()
        });
        let pool = pool(Duration::from_secs(60));
        let req = Request::get(format!("http://{upstream}/health?deep=1"))
            .body(Empty::new())
            .unwrap();
        pool.send(&upstream, req).await.unwrap();
        drop(pool);
        let (target, host) = served.await.unwrap();
        assert_eq!(target, "/health?deep=1");
        assert_eq!(host.as_deref(), Some(upstream.as_str()));
    }
}
