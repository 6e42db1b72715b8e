//! Cohort's own pool of HTTP/2 connections: to `h2c://` upstreams, and to
//! `https://` ones that ALPN brings to HTTP/2.
//!
//! Owns:
//! - The connections to each upstream ([`Http2Pool`]), each carrying at
//!   most [`MAX_STREAMS`] requests at once, or as many as the upstream
//!   allows if fewer.
//! - Opening a new connection when every open one is full (as Envoy does),
//!   by one request at a time.
//! - Counting a request's stream from its send to the drop of its response
//!   body (`StreamSlot`).
//! - Sending a request again on another connection when a pooled one it
//!   was given closed (after a `GOAWAY`) before taking it.
//! - Giving back a request that a new connection lost, as the HTTP/1.1 pool
//!   does.
//! - Closing connections that carried no stream for `idle_timeout`.
//! - Remembering, for [`ASK_ALPN_AGAIN_AFTER`], the `https://` upstreams
//!   whose ALPN chose HTTP/1.1, and opening no connections to them
//!   meanwhile ([`Http2Pool::speaks_http1_only`]).
//!
//! One connection per upstream, which hyper-util's pooled client shares,
//! would not do: once as many streams are open as the upstream allows
//! (`SETTINGS_MAX_CONCURRENT_STREAMS`), every later request would wait for
//! one to end, behind long streams (server-sent events, gRPC streams) until
//! the response timeout, which then blames the upstream.
//!
//! Does not own: opening connections, over TLS for `https://` (`connect`),
//! the flow-control windows (`super`), nor sending requests to upstreams
//! that speak HTTP/1.1 (`http1`, chosen in `super`).

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Poll, ready};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Body;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use super::connect::{CountedConnection, CountingConnector};
use super::{Error, SendError, UpstreamBody};
use crate::BoxError;

/// How long an `https://` upstream whose ALPN chose HTTP/1.1 is sent its
/// requests over HTTP/1.1 before it is asked again (on the next request's
/// connection), so that one that comes to speak HTTP/2, or chose HTTP/1.1
/// only while starting, is spoken to over HTTP/2 within this long.
pub const ASK_ALPN_AGAIN_AFTER: Duration = Duration::from_secs(60);

/// The most streams one connection carries at once, fewer if the upstream
/// allows fewer. RFC 9113 (section 6.5.2) recommends that a server allow at
/// least 100, and hyper assumes 100 until the server's SETTINGS say.
pub const MAX_STREAMS: usize = 100;

/// HTTP/2 connections to upstreams, by upstream. Cheap to clone: clones
/// share the pool.
pub struct Http2Pool<B> {
    shared: Arc<Shared<B>>,
}

impl<B> Clone for Http2Pool<B> {
    fn clone(&self) -> Self {
        Http2Pool {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<B> std::fmt::Debug for Http2Pool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http2Pool")
            .field("idle_timeout", &self.shared.idle_timeout)
            .finish_non_exhaustive()
    }
}

struct Shared<B> {
    connector: CountingConnector,
    /// `http` (prior knowledge), or `https` for TLS with ALPN.
    scheme: Scheme,
    idle_timeout: Duration,
    /// A short list, as in the HTTP/1.1 pool: a route table names a
    /// handful of upstreams.
    hosts: Mutex<Vec<Host<B>>>,
    /// Whether the task that closes idle connections has been started (on
    /// the first connection, so on the runtime that uses the pool).
    sweeping: AtomicBool,
}

struct Host<B> {
    authority: Authority,
    /// Oldest first; streams go to the oldest with room, so that a burst's
    /// extra connections fall idle and close.
    connections: Vec<Connection<B>>,
    /// Held while a connection to this upstream is being opened, so that a
    /// burst of requests opens one, not one each.
    connecting: Arc<ConnectingGate>,
    /// The stream limit the upstream's SETTINGS last gave: what a new
    /// connection is held to until its own SETTINGS arrive, so that a
    /// burst does not put more on it than the upstream allows.
    learnt_limit: usize,
    /// Until when requests to this upstream go to the HTTP/1.1 pool: ALPN
    /// chose HTTP/1.1 (or nothing) when it was last connected to over TLS,
    /// and it is asked again [`ASK_ALPN_AGAIN_AFTER`] later.
    http1_until: Option<Instant>,
}

impl<B> Host<B> {
    fn new(authority: Authority) -> Host<B> {
        Host {
            authority,
            connections: Vec::new(),
            connecting: Arc::default(),
            learnt_limit: MAX_STREAMS,
            http1_until: None,
        }
    }
}

/// One opening of a connection at a time; holds when the last one failed.
type ConnectingGate = tokio::sync::Mutex<Option<Instant>>;

struct Connection<B> {
    sender: SendRequest<B>,
    dispatch: Arc<dyn StreamLimit>,
    /// The task that polls `dispatch`: stopped when the pool lets the
    /// connection go, since a request the upstream never gave a stream
    /// would keep it waiting, and the connection open, for ever.
    task: tokio::task::AbortHandle,
    /// Its open streams, the one being sent included.
    streams: Arc<AtomicUsize>,
    /// When the idle sweep first saw it without a stream, since it last had one.
    idle_since: Option<Instant>,
}

impl<B> Drop for Connection<B> {
    fn drop(&mut self) {
        // Streams still open carry on: hyper runs the HTTP/2 connection
        // itself in a task of its own, which ends with the last of them.
        self.task.abort();
    }
}

/// One stream of a pooled connection, held from the request's send until
/// its response body is dropped, when the stream has ended or is reset.
#[derive(Debug)]
pub(super) struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

impl<B> Http2Pool<B>
where
    B: Body + Default + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A pool that connects with `connector`, with prior knowledge if
    /// `scheme` is `http` and over TLS if it is `https`, and closes a
    /// connection once it has carried no stream for `idle_timeout`
    /// (checked every half of it).
    #[must_use]
    pub fn new(
        connector: CountingConnector,
        scheme: Scheme,
        idle_timeout: Duration,
    ) -> Http2Pool<B> {
        Http2Pool {
            shared: Arc::new(Shared {
                connector,
                scheme,
                idle_timeout,
                hosts: Mutex::new(Vec::new()),
                sweeping: AtomicBool::new(false),
            }),
        }
    }

    /// Whether ALPN chose HTTP/1.1 when `authority` was last connected to
    /// over TLS, less than [`ASK_ALPN_AGAIN_AFTER`] ago: it is sent no
    /// requests meanwhile (they come back with [`Error::Http1Only`]).
    pub fn speaks_http1_only(&self, authority: &Authority) -> bool {
        self.shared.speaks_http1_only(authority)
    }

    /// Sends `req` (absolute-form, HTTP/2) to `authority` on a pooled
    /// connection with room for another stream, or a new one. If no
    /// connection can be made, or none took the request, it comes back with
    /// the error (which is [`Error::Http1Only`] for an upstream whose ALPN
    /// chose HTTP/1.1); a bodiless one also comes back when the upstream
    /// did not process it.
    pub async fn send(
        &self,
        authority: &Authority,
        mut req: Request<B>,
    ) -> Result<Response<UpstreamBody<B>>, SendError<B>> {
        // hyper keeps a request it sent; a copy of a bodiless one's head lets
        // it go again if the upstream turns it away unprocessed.
        let unsent = req.body().is_end_stream().then(|| super::copy_head(&req));
        // A pooled connection that had a graceful GOAWAY still looks open
        // until a request wakes its dispatch task, which then closes it and
        // gives the request back: the next checkout passes it by, so this
        // ends after at most every pooled connection and one new one.
        loop {
            let lent = match self.shared.checkout(authority) {
                Some(lent) => lent,
                None => match self.connect(authority).await {
                    Ok(lent) => lent,
                    Err(error) => {
                        return Err(SendError {
                            error,
                            retry: Some(req),
                        });
                    }
                },
            };
            let Lent {
                mut sender,
                stream,
                new,
            } = lent;
            let mut failed = match sender.try_send_request(req).await {
                Ok(rsp) => {
                    return Ok(rsp.map(|incoming| UpstreamBody::on_stream(incoming, stream)));
                }
                Err(failed) => failed,
            };
            let Some(again) = failed.take_message() else {
                // As in the HTTP/1.1 pool, a new connection lost before an
                // answer is an upstream failing: an idempotent request
                // without a body may go to another.
                let lost_new = new && super::http1::closed_unanswered(failed.error());
                let error = Error::Exchange(failed.into_error());
                let retry = unsent
                    .filter(|head| {
                        error.is_unprocessed() || (lost_new && head.method.is_idempotent())
                    })
                    .map(|head| Request::from_parts(head, B::default()));
                return Err(SendError { error, retry });
            };
            // A new connection that closes before taking a request is an
            // upstream that is failing, as one that cannot be connected to.
            if new {
                return Err(SendError {
                    error: Error::NotSent(failed.into_error()),
                    retry: Some(again),
                });
            }
            tracing::debug!(upstream = %authority, "connection closed before taking the request; sending it on another");
            req = again;
        }
    }

    /// A stream on a new connection to `authority`, or on the one the
    /// request that was opening one meanwhile opened: one request at a time
    /// opens a connection to an upstream.
    async fn connect(&self, authority: &Authority) -> Result<Lent<B>, Error> {
        let gate = self.shared.connecting_gate(authority);
        let waited_from = Instant::now();
        let mut last_failure = gate.lock().await;
        if let Some(lent) = self.shared.checkout(authority) {
            return Ok(lent);
        }
        // The request that held the gate found it speaks HTTP/1.1.
        if self.shared.speaks_http1_only(authority) {
            return Err(Error::Http1Only);
        }
        // An upstream that allows no stream at all now (it may, for a
        // while) would have a new connection opened for every request.
        if self.shared.allows_no_stream(authority) {
            return Err(Error::Connect(
                "the upstream allows no new stream (SETTINGS_MAX_CONCURRENT_STREAMS 0)".into(),
            ));
        }
        // The attempt it waited for failed: the requests that waited each
        // try on their own, all at once rather than one after another (and
        // each failure is its own, as without the gate).
        if last_failure.is_some_and(|failed| failed >= waited_from) {
            drop(last_failure);
            return self.open(authority).await;
        }
        let opened = self.open(authority).await;
        if let Err(error) = &opened
            && !matches!(error, Error::Http1Only)
        {
            *last_failure = Some(Instant::now());
        }
        opened
    }

    /// Opens a connection to `authority`, adds it to the pool and lends its
    /// first stream; over TLS, unless ALPN chooses HTTP/1.1, which the pool
    /// then remembers.
    async fn open(&self, authority: &Authority) -> Result<Lent<B>, Error> {
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
        // The sweep also forgets upstreams that chose HTTP/1.1 once it is
        // time to ask them again.
        if !self.shared.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(&self.shared)));
        }
        if self.shared.scheme == Scheme::HTTPS && !io.negotiated_h2() {
            // One handshake per upstream and period is the cost of asking;
            // the connection closes unused.
            let until = Instant::now() + ASK_ALPN_AGAIN_AFTER;
            self.shared
                .with_host(authority, |host| host.http1_until = Some(until));
            return Err(Error::Http1Only);
        }
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_max_send_streams(SETTINGS_NOT_IN)
            .initial_stream_window_size(super::H2_STREAM_WINDOW)
            .initial_connection_window_size(super::H2_CONNECTION_WINDOW)
            .handshake(io)
            .await
            .map_err(|e| Error::Connect(e.into()))?;
        let dispatch = Arc::new(Dispatch(Mutex::new(Some(Box::pin(connection)))));
        let polled = Arc::clone(&dispatch);
        let task = tokio::spawn(async move {
            let ended = std::future::poll_fn(|cx| {
                let mut running = polled.lock();
                let Some(task) = running.as_mut() else {
                    return Poll::Ready(Ok(()));
                };
                let ended = ready!(task.as_mut().poll(cx));
                // Dropped as it ends, which is what closes its senders
                // (`is_closed`), though the pool still holds the `Dispatch`.
                *running = None;
                Poll::Ready(ended)
            })
            .await;
            if let Err(error) = ended {
                tracing::debug!(%error, "upstream HTTP/2 connection ended");
            }
        });
        Ok(self
            .shared
            .add(authority, sender, dispatch, task.abort_handle()))
    }
}

/// hyper's dispatch task of one connection (`C`), which hands requests to
/// the HTTP/2 connection: polled by the task spawned for it (`None` once it
/// has ended), and asked for the upstream's current stream limit at each
/// checkout.
struct Dispatch<C>(Mutex<Option<Pin<Box<C>>>>);

impl<C> Dispatch<C> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Pin<Box<C>>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a connection's stream limit reads as until the upstream's SETTINGS
/// set it (hyper's assumption until then, set to one past [`MAX_STREAMS`]
/// to tell it apart), or for ever if they set none (no limit).
const SETTINGS_NOT_IN: usize = MAX_STREAMS + 1;

/// What the pool asks of a connection's dispatch task. A trait, with one
/// implementation, so that the pool's connections need not name the
/// request body's type.
trait StreamLimit: Send + Sync {
    /// The most streams the connection may carry now: the upstream's
    /// SETTINGS_MAX_CONCURRENT_STREAMS, at most [`MAX_STREAMS`]; none once
    /// its dispatch has ended; not known (`None`) until its SETTINGS
    /// arrive, or if they set no limit.
    fn limit(&self) -> Option<usize>;
}

impl<B> StreamLimit for Dispatch<http2::Connection<CountedConnection, B, TokioExecutor>>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    fn limit(&self) -> Option<usize> {
        match self.lock().as_ref() {
            None => Some(0),
            Some(task) => match task.as_ref().get_ref().current_max_send_streams() {
                SETTINGS_NOT_IN => None,
                allowed => Some(allowed.min(MAX_STREAMS)),
            },
        }
    }
}

/// A stream lent for one request.
struct Lent<B> {
    sender: SendRequest<B>,
    stream: StreamSlot,
    /// Whether its connection was opened for this request.
    new: bool,
}

impl<B> Shared<B> {
    /// A stream on the oldest open connection to `authority` with room.
    fn checkout(&self, authority: &Authority) -> Option<Lent<B>> {
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        let host = hosts.iter_mut().find(|host| host.authority == *authority)?;
        // A connection that went away (its upstream closed it, or a request
        // found that it had sent a GOAWAY) takes no more streams.
        host.connections.retain(|conn| !conn.sender.is_closed());
        let learnt = &mut host.learnt_limit;
        let conn = host.connections.iter_mut().find(|conn| {
            let limit = match conn.dispatch.limit() {
                // An upstream allows no stream for a while, if at all (and
                // an ended dispatch none): not a limit to hold new
                // connections to.
                Some(0) => 0,
                Some(known) => {
                    *learnt = known;
                    known
                }
                None => *learnt,
            };
            conn.streams.load(Ordering::Acquire) < limit
        })?;
        conn.streams.fetch_add(1, Ordering::AcqRel);
        conn.idle_since = None;
        Some(Lent {
            sender: conn.sender.clone(),
            stream: StreamSlot(Arc::clone(&conn.streams)),
            new: false,
        })
    }

    /// Whether an open connection to `authority` says the upstream allows
    /// no stream at all.
    fn allows_no_stream(&self, authority: &Authority) -> bool {
        let hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        hosts
            .iter()
            .filter(|host| host.authority == *authority)
            .flat_map(|host| &host.connections)
            .any(|conn| !conn.sender.is_closed() && conn.dispatch.limit() == Some(0))
    }

    /// Whether ALPN chose HTTP/1.1 when `authority` was last connected to,
    /// less than [`ASK_ALPN_AGAIN_AFTER`] ago.
    fn speaks_http1_only(&self, authority: &Authority) -> bool {
        let hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        hosts.iter().any(|host| {
            host.authority == *authority
                && host.http1_until.is_some_and(|until| Instant::now() < until)
        })
    }

    /// The gate that one opening of a connection to `authority` holds.
    fn connecting_gate(&self, authority: &Authority) -> Arc<ConnectingGate> {
        self.with_host(authority, |host| Arc::clone(&host.connecting))
    }

    /// Runs `f` on what the pool holds for `authority`, made if need be.
    fn with_host<R>(&self, authority: &Authority, f: impl FnOnce(&mut Host<B>) -> R) -> R {
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        let index = match hosts.iter().position(|host| host.authority == *authority) {
            Some(index) => index,
            None => {
                hosts.push(Host::new(authority.clone()));
                hosts.len() - 1
            }
        };
        f(&mut hosts[index])
    }

    /// Adds a new connection to `authority`'s, and lends its first stream.
    fn add(
        &self,
        authority: &Authority,
        sender: SendRequest<B>,
        dispatch: Arc<dyn StreamLimit>,
        task: tokio::task::AbortHandle,
    ) -> Lent<B> {
        let streams = Arc::new(AtomicUsize::new(1));
        let stream = StreamSlot(Arc::clone(&streams));
        let connection = Connection {
            sender: sender.clone(),
            dispatch,
            task,
            streams,
            idle_since: None,
        };
        self.with_host(authority, |host| host.connections.push(connection));
        Lent {
            sender,
            stream,
            new: true,
        }
    }

    /// Closes the connections without a stream since `now - idle_timeout`,
    /// marks those without one now as idle from `now`, and forgets
    /// upstreams left with no connection and no request opening one (but
    /// not those that chose HTTP/1.1 until it is time to ask them again).
    fn close_idle(&self, now: Instant) {
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        for host in hosts.iter_mut() {
            host.connections.retain_mut(|conn| {
                if conn.sender.is_closed() {
                    return false;
                }
                if conn.streams.load(Ordering::Acquire) > 0 {
                    conn.idle_since = None;
                    return true;
                }
                let since = *conn.idle_since.get_or_insert(now);
                now.saturating_duration_since(since) < self.idle_timeout
            });
        }
        hosts.retain(|host| {
            !host.connections.is_empty()
                || Arc::strong_count(&host.connecting) > 1
                || host.http1_until.is_some_and(|until| now < until)
        });
    }
}

/// Closes idle connections until the pool is gone: dropping a connection's
/// last sender ends it (hyper closes an HTTP/2 connection once no sender
/// and no stream is left). Looking every half `idle_timeout`, it closes a
/// connection between one and one and a half `idle_timeout`s after its
/// last stream ended.
async fn sweep<B>(pool: Weak<Shared<B>>) {
    super::sweep_every_half(pool, |pool| pool.idle_timeout, Shared::close_idle).await;
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Empty, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;
    use crate::upstream::tests::{Seen, connector, tls_backend, wait_until};

    /// An h2c backend that answers every request with `ok`.
    async fn backend() -> (Authority, Arc<Seen>) {
        backend_allowing(None).await
    }

    /// An h2c backend that answers every request with `ok`, and allows
    /// `max_streams` streams per connection (hyper's default if `None`).
    async fn backend_allowing(max_streams: Option<u32>) -> (Authority, Arc<Seen>) {
        crate::upstream::tests::backend(move |stream| async move {
            let service = service_fn(|_req| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_concurrent_streams(max_streams)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        })
        .await
    }

    fn pool(idle_timeout: Duration) -> Http2Pool<Empty<Bytes>> {
        Http2Pool::new(connector(), Scheme::HTTP, idle_timeout)
    }

    fn get(authority: &Authority) -> Request<Empty<Bytes>> {
        let mut req = Request::get(format!("http://{authority}/"))
            .body(Empty::new())
            .unwrap();
        *req.version_mut() = http::Version::HTTP_2;
        req
    }

    #[tokio::test]
    async fn a_burst_of_first_requests_opens_one_connection() {
        let (authority, seen) = backend().await;
        let pool = pool(Duration::from_secs(60));
        let replies = futures_util::future::join_all((0..20).map(|_| async {
            let rsp = pool.send(&authority, get(&authority)).await.unwrap();
            rsp.into_body().collect().await.unwrap().to_bytes()
        }))
        .await;
        assert!(replies.iter().all(|body| body == "ok"));
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_upstream_whose_alpn_chooses_http1_is_asked_once_a_period() {
        // It chooses HTTP/1.1 and holds each connection open, unused.
        let (authority, seen, connector) = tls_backend(b"http/1.1", |mut tls| async move {
            let _ = tokio::io::AsyncReadExt::read(&mut tls, &mut [0; 64]).await;
        })
        .await;
        let pool = Http2Pool::new(connector, Scheme::HTTPS, Duration::from_secs(60));
        let send = || async {
            let failed = pool.send(&authority, get(&authority)).await.unwrap_err();
            // Given back whole, for the HTTP/1.1 pool to send.
            assert!(matches!(failed.error, Error::Http1Only), "{failed:?}");
            assert!(failed.retry.is_some());
        };
        // A burst asks once.
        futures_util::future::join_all((0..10).map(|_| send())).await;
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
        assert!(pool.speaks_http1_only(&authority));
        // Remembered past idle sweeps, with no connection to keep it...
        let asked = Instant::now();
        pool.shared.close_idle(asked + ASK_ALPN_AGAIN_AFTER / 2);
        send().await;
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
        // ... until it is time to ask again.
        pool.shared.close_idle(asked + ASK_ALPN_AGAIN_AFTER);
        assert!(!pool.speaks_http1_only(&authority));
        send().await;
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn streams_past_the_upstreams_limit_go_on_another_connection() {
        let (authority, seen) = backend_allowing(Some(2)).await;
        let pool = pool(Duration::from_secs(60));
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(pool.send(&authority, get(&authority)).await.unwrap());
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_new_connection_is_held_to_the_limit_the_upstream_gave_before() {
        let (authority, seen) = backend_allowing(Some(2)).await;
        let pool = pool(Duration::from_secs(60));
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(pool.send(&authority, get(&authority)).await.unwrap());
        }
        // A burst at once: the new connection's own SETTINGS are not in
        // when the requests that waited for it take their streams.
        let burst = (0..3).map(|_| pool.send(&authority, get(&authority)));
        for rsp in futures_util::future::join_all(burst).await {
            held.push(rsp.unwrap());
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn requests_waiting_for_a_connection_that_cannot_be_made_fail_too() {
        // Refused at once.
        let authority: Authority = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().to_string().parse().unwrap()
        };
        let pool = pool(Duration::from_secs(60));
        let sends = (0..3).map(|_| pool.send(&authority, get(&authority)));
        let failed = tokio::time::timeout(
            Duration::from_secs(10),
            futures_util::future::join_all(sends),
        )
        .await
        .expect("every request fails in time");
        for result in failed {
            let failed = result.expect_err("nothing listens");
            assert!(failed.error.is_connect(), "{:?}", failed.error);
            assert!(failed.retry.is_some());
        }
    }

    #[tokio::test]
    async fn a_new_connection_closed_before_it_takes_the_request_is_a_connect_failure() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        let pool = pool(Duration::from_secs(60));
        let failed = pool
            .send(&authority, get(&authority))
            .await
            .expect_err("nothing answers");
        // Counted against this upstream, not sent again to it, and given
        // back for another: as a refused connection if hyper saw the close
        // before taking the request, else as a reset (the request is a GET).
        assert!(!failed.error.is_unprocessed(), "{:?}", failed.error);
        assert!(
            failed.error.is_connect() || matches!(failed.error, Error::Exchange(_)),
            "{:?}",
            failed.error
        );
        assert!(failed.retry.is_some(), "{:?}", failed.error);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_new_connection_lost_before_an_answer_gives_back_only_an_idempotent_request() {
        use tokio::io::AsyncReadExt as _;
        // Reads up to the first request's HEADERS frame, then closes.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut preface = [0u8; 24];
                    stream.read_exact(&mut preface).await.unwrap();
                    loop {
                        let mut head = [0u8; 9];
                        stream.read_exact(&mut head).await.unwrap();
                        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                        let mut payload = vec![0u8; len];
                        stream.read_exact(&mut payload).await.unwrap();
                        if head[3] == 0x1 {
                            return;
                        }
                    }
                });
            }
        });
        let pool = pool(Duration::from_secs(60));
        let failed = pool
            .send(&authority, get(&authority))
            .await
            .expect_err("no answer");
        assert!(
            matches!(failed.error, Error::Exchange(_)),
            "{:?}",
            failed.error
        );
        assert!(failed.retry.is_some(), "{:?}", failed.error);
        let mut post = get(&authority);
        *post.method_mut() = http::Method::POST;
        let failed = pool.send(&authority, post).await.expect_err("no answer");
        assert!(failed.retry.is_none(), "{:?}", failed.error);
    }

    #[tokio::test]
    async fn an_upstream_that_allows_no_stream_is_not_sent_a_connection_per_request() {
        let (authority, seen) = backend_allowing(Some(0)).await;
        let pool = pool(Duration::from_secs(60));
        // The first goes out before the upstream's SETTINGS are in, and is
        // refused unprocessed; or, if they came first, waits for a stream
        // it will never have (the response timeout ends it in the proxy).
        let first = tokio::time::timeout(
            Duration::from_secs(2),
            pool.send(&authority, get(&authority)),
        )
        .await;
        if let Ok(answered) = first {
            let failed = answered.expect_err("no stream allowed");
            assert!(failed.error.is_unprocessed(), "{:?}", failed.error);
        }
        for _ in 0..3 {
            let failed = pool
                .send(&authority, get(&authority))
                .await
                .expect_err("no stream allowed");
            assert!(failed.error.is_connect(), "{:?}", failed.error);
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_stream_is_held_until_its_body_is_dropped() {
        let (authority, _seen) = backend().await;
        let pool = pool(Duration::from_secs(60));
        let rsp = pool.send(&authority, get(&authority)).await.unwrap();
        let streams = || {
            let hosts = pool.shared.hosts.lock().unwrap();
            hosts[0].connections[0].streams.load(Ordering::SeqCst)
        };
        assert_eq!(streams(), 1);
        drop(rsp);
        assert_eq!(streams(), 0);
    }

    #[tokio::test]
    async fn idle_connections_close_after_the_idle_timeout() {
        let (authority, seen) = backend().await;
        let pool = pool(Duration::from_secs(1));
        let rsp = pool.send(&authority, get(&authority)).await.unwrap();
        rsp.into_body().collect().await.unwrap();
        assert_eq!(seen.open.load(Ordering::SeqCst), 1);
        wait_until("the idle connection closes", || {
            seen.open.load(Ordering::SeqCst) == 0
        })
        .await;
        // The next request opens a new one.
        let rsp = pool.send(&authority, get(&authority)).await.unwrap();
        rsp.into_body().collect().await.unwrap();
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn only_a_connection_without_a_stream_for_the_idle_timeout_is_closed() {
        const IDLE: Duration = Duration::from_secs(60);
        let (authority, seen) = backend().await;
        // Swept by hand here, at made-up times.
        let pool = pool(IDLE);
        let held = pool.send(&authority, get(&authority)).await.unwrap();
        let t0 = Instant::now();
        pool.shared.close_idle(t0);
        pool.shared.close_idle(t0 + 10 * IDLE);
        let rsp = pool.send(&authority, get(&authority)).await.unwrap();
        rsp.into_body().collect().await.unwrap();
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);

        // Idle from the first look after its last stream ended.
        drop(held);
        pool.shared.close_idle(t0 + 11 * IDLE);
        pool.shared
            .close_idle(t0 + 12 * IDLE - Duration::from_millis(1));
        assert_eq!(pool.shared.hosts.lock().unwrap()[0].connections.len(), 1);
        pool.shared.close_idle(t0 + 12 * IDLE);
        wait_until("the idle connection closes", || {
            seen.open.load(Ordering::SeqCst) == 0
        })
        .await;
    }
}
