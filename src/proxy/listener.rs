//! The proxy's accept loop and connection lifecycle.
//!
//! Owns:
//! - Accepting client connections ([`serve`]), up to
//!   `listen.max_connections` at a time.
//! - Closing the longest-idle keep-alive connection when a client waits for
//!   a slot and every slot is taken ([`ConnectionSlots`]).
//! - The TLS handshake on a TLS listener, and the plain `400` for a client
//!   that speaks plain HTTP there.
//! - Choosing HTTP/1.1 (with upgrades) or HTTP/2 (by ALPN, or with prior
//!   knowledge on a plain listener).
//! - Serving each connection with hyper behind a
//!   [`FramingGuard`](super::framing::FramingGuard) on the decrypted bytes.
//! - Taking an idle HTTP/1.1 connection back from hyper to free its buffers
//!   (see [`idle`](super::idle)), also through the upgrade hyper promised
//!   after one was declined.
//! - The client timeouts.
//! - Running an upgraded connection's tunnel on the connection's task, and
//!   cutting it when idle or when its client stops reading.
//! - Telling an HTTP/2 client that resets most of its streams to go.
//! - The graceful drain on shutdown, which waits for tunnels too and
//!   closes no HTTP/1.1 connection under a request on its way.
//!
//! Does not own: what happens to a request (`Proxy::handle`) or the
//! certificate (`tls`).

use std::convert::{self, Infallible};
use std::future::Future;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::future::OptionFuture;
use http::header::{CONNECTION, UPGRADE};
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::{HttpService, service_fn};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::framing::{AmbiguousFraming, H2_PREFACE};
use super::h2stream::{ReportingBody, StreamExecutor};
use super::idle::{Activity, ClientIo, Tracked};
use super::slots::ConnectionSlots;
use super::{Peer, Proxy, ResponseBody, Tunnel, rewrite};
use crate::BoxError;
use crate::config::ListenConfig;
use crate::metrics::Counted;
use crate::tls::ServerTls;

/// Largest request head (request line and headers) accepted, like nginx's
/// `large_client_header_buffers`; a larger one is answered 431.
pub(super) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How often a serving HTTP/1.1 connection is checked for idleness, at
/// most. A connection idle for a whole check is taken back from hyper, so
/// an idle connection holds hyper's buffers for one to two checks. Checking
/// after every response instead cost about 12% of throughput.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// The most of a response left unsent in a client socket's kernel buffer
/// (`TCP_NOTSENT_LOWAT`); the proxy is woken to write more once half of it
/// has gone. Without it, a client that reads slowly lets the unsent part
/// grow to the whole send buffer (up to 4 MiB with Linux's default
/// `tcp_wmem`), holding that much kernel memory, and the proxy is woken
/// only once a third of that has drained: a client taking tens of
/// kilobytes a second would see no write for long enough to trip
/// `listen.send_timeout` although it never stopped reading. With this,
/// a client taking 5 KiB a second is seen to within a minute. A smaller
/// cap costs bulk transfers: at 128 KiB, 1 MiB responses on loopback took
/// a quarter more CPU (more and smaller writes); at 512 KiB they measure
/// level with no cap (`BENCHMARKS.md`).
const CLIENT_NOTSENT_LOWAT: u32 = 512 * 1024;

/// How long an HTTP/2 connection told to close (idle, or on a drain) may
/// go on with no stream open: h2 sends its last `GOAWAY` only once the
/// client acknowledges a ping, and a client that has gone (or never sent
/// the preface) would hold the connection, and a drain, until TCP gives
/// up. Past this it is dropped. A stream the client opened before it saw
/// the `GOAWAY` is answered first, however long it takes.
const H2_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How long an idle HTTP/2 connection closed for a client waiting for its
/// slot has to finish closing before it is dropped: about a round trip,
/// and well under [`RECLAIM_AGAIN`](super::slots::RECLAIM_AGAIN), so that one waiting client costs one
/// connection.
const RECLAIMED_H2_GRACE: Duration = Duration::from_millis(200);

/// Streams an HTTP/2 client may have open at once: nginx's default.
const H2_MAX_STREAMS: u32 = 128;

/// How much of a stream's response may wait in the proxy for its HTTP/2
/// client's flow-control window to open.
const H2_SEND_BUFFER: usize = 64 << 10;

/// Accepts and serves connections (on any of `listeners`: usually one, more
/// after a reload to fewer workers) until `shutdown` resolves, then stops
/// accepting and lets open requests finish for up to `drain_timeout`. With
/// `tls`, each connection first completes a TLS handshake (within
/// `header_read_timeout`) and speaks HTTP/2 if ALPN chose `h2`. Each open
/// connection holds one of `slots` (`listen.max_connections`, shared by
/// every worker's listener).
pub async fn serve(
    listeners: Vec<TcpListener>,
    proxy: Arc<Proxy>,
    config: &ListenConfig,
    tls: Option<Arc<ServerTls>>,
    slots: Arc<ConnectionSlots>,
    shutdown: impl Future<Output = ()>,
) {
    let settings = Arc::new(Settings::new(config, Arc::clone(&slots)));
    // Sent once to start the drain; every connection holds a receiver, so
    // the sender learns when the last one has ended.
    let (drain, drain_signal) = watch::channel(false);
    let open_connections = crate::metrics::client_connections();
    let mut next_listener = 0;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = accept_any(&listeners, &mut next_listener) => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // A client accepted, then stopped for: served all the same (the
        // drain answers and closes it), not dropped unanswered, as it
        // would not have been left in the backlog for the next workers.
        let (permit, stopping) = tokio::select! {
            permit = slots.take() => (Some(permit), false),
            () = &mut shutdown => (None, true),
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, client.addr = %peer, "cannot set TCP_NODELAY");
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Err(error) =
            socket2::SockRef::from(&stream).set_tcp_notsent_lowat(CLIENT_NOTSENT_LOWAT)
        {
            tracing::debug!(%error, client.addr = %peer, "cannot set TCP_NOTSENT_LOWAT");
        }
        let mut connection = Connection {
            proxy: Arc::clone(&proxy),
            peer,
            settings: Arc::clone(&settings),
            // Held from here, so a drain also waits for a handshake under way.
            drain: drain_signal.clone(),
        };
        let acceptor = tls.as_ref().map(|tls| tls.acceptor());
        let counted = Counted::new(open_connections.clone());
        // The task holds every connection for its life, idle ones too: its
        // log line reads the peer from `connection` rather than keep a copy
        // (a few bytes that take the task into jemalloc's next size class).
        tokio::spawn(async move {
            if let Err(error) = connection.run(stream, acceptor).await {
                let peer = connection.peer;
                tracing::debug!(%error, client.addr = %peer, "connection ended with an error");
            }
            drop(counted);
            drop(permit);
        });
        if stopping {
            break;
        }
    }
    drop(listeners);
    drop(drain_signal);
    tracing::info!(timeout = ?config.drain_timeout, "draining open connections");
    let _ = drain.send(true);
    if tokio::time::timeout(config.drain_timeout, drain.closed())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached with requests still open");
    }
}

/// The next connection on any of `listeners`. A worker has one, unless a
/// reload left fewer workers than listening sockets: a socket that closed
/// would reset the connections queued on it. Each accept starts the search
/// at the next socket, so a busy one cannot starve the others.
async fn accept_any(
    listeners: &[TcpListener],
    next: &mut usize,
) -> std::io::Result<(TcpStream, SocketAddr)> {
    poll_fn(|cx| {
        let n = listeners.len();
        for i in 0..n {
            let index = (*next + i) % n;
            if let Poll::Ready(accepted) = listeners[index].poll_accept(cx) {
                *next = (index + 1) % n;
                return Poll::Ready(accepted);
            }
        }
        Poll::Pending
    })
    .await
}

/// How every connection of a listener is served.
struct Settings {
    http1: http1::Builder,
    http2: http2::Builder<StreamExecutor>,
    header_read_timeout: Duration,
    keepalive_timeout: Duration,
    send_timeout: Duration,
    tunnel_idle_timeout: Duration,
    /// How often a serving HTTP/1.1 connection is checked for idleness.
    idle_check: Duration,
    /// Connections waiting for a request with nothing of hyper's, and
    /// HTTP/2 ones with no stream open for a whole check.
    idle_connections: ::metrics::Gauge,
    slots: Arc<ConnectionSlots>,
}

impl Settings {
    fn new(config: &ListenConfig, slots: Arc<ConnectionSlots>) -> Settings {
        let mut http1 = http1::Builder::new();
        // hyper's own header-read timer is a boxed sleep that each request
        // of a keep-alive connection sets up, registers (hyper looks for
        // the next head as soon as a response is out) and cancels: about
        // 1 400 instructions per request (`BENCHMARKS.md`). The
        // connection's idle checks time a head instead (`serve_until_idle`).
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(MAX_HEAD_BYTES);
        let mut http2 = http2::Builder::new(StreamExecutor::new(config.send_timeout));
        // The same limit on a request's headers as over HTTP/1.1 (HPACK-decoded size).
        // A client that opens streams and reads nothing of them holds, for
        // each, what its response may buffer here and upstream: so as many
        // streams as nginx allows (`http2_max_concurrent_streams`), where
        // hyper's default is 200, and 64 KiB of each response queued for
        // the client, where hyper's is 400 KiB (the upstream's window is
        // as small: `upstream::H2_STREAM_WINDOW`).
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEAD_BYTES as u32)
            .max_concurrent_streams(H2_MAX_STREAMS)
            .max_send_buf_size(H2_SEND_BUFFER);
        Settings {
            http1,
            http2,
            header_read_timeout: config.header_read_timeout,
            keepalive_timeout: config.keepalive_timeout,
            send_timeout: config.send_timeout,
            tunnel_idle_timeout: config.tunnel_idle_timeout,
            // Often enough that the header read timeout, which these
            // checks enforce for later heads, is kept to within two thirds
            // of itself (a head is timed from the first check that sees
            // it), and the keep-alive timeout to within half.
            // (Not below a millisecond, whatever the timeouts.)
            idle_check: IDLE_CHECK
                .min(config.header_read_timeout / 3)
                .min(config.keepalive_timeout / 2)
                .max(Duration::from_millis(1)),
            idle_connections: crate::metrics::idle_client_connections(),
            slots,
        }
    }
}

/// Tells, at each idle check, whether the client has taken nothing of what
/// is being written to it for `listen.send_timeout`, as nginx's
/// `send_timeout` does: a client that stops reading would otherwise hold
/// its connection, and the upstream connection its response comes from,
/// for as long as it likes. Time spent waiting for the upstream, or for a
/// quiet stream's next event, does not count: only a write the socket has
/// no room for.
struct SendWatch {
    timeout: Duration,
    /// The client's write count at the previous check.
    writes: u64,
    /// The first check that found the current write blocked.
    blocked_since: Option<Instant>,
}

impl SendWatch {
    fn new(timeout: Duration, activity: &Activity) -> SendWatch {
        SendWatch {
            timeout,
            writes: activity.writes(),
            blocked_since: None,
        }
    }

    /// Whether, as of the check at `now`, a write has been blocked with
    /// nothing taken by the client for the timeout (to within a check).
    fn timed_out(&mut self, activity: &Activity, now: Instant) -> bool {
        let writes = activity.writes();
        if writes != self.writes {
            // The client took something since the last check.
            self.writes = writes;
            self.blocked_since = None;
        }
        if !activity.is_write_blocked() {
            self.blocked_since = None;
            return false;
        }
        let since = *self.blocked_since.get_or_insert(now);
        now.saturating_duration_since(since) >= self.timeout
    }
}

/// Why a connection was cut when its client stopped reading.
const SEND_TIMED_OUT: &str = "the client took nothing of the response within the send timeout";

/// Why an upgraded connection was cut when nothing went through it.
const TUNNEL_IDLE: &str = "nothing went through the tunnel within the tunnel idle timeout";

/// Why a connection was cut when a later request head did not come whole.
const HEAD_TIMED_OUT: &str = "request head not complete within the header read timeout";

/// A client socket the listener can wait on without reading it.
trait Socket: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    fn tcp(&self) -> &TcpStream;
}

impl Socket for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Socket for TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// What a request handler needs from its client connection.
struct Client {
    proxy: Arc<Proxy>,
    peer: Peer,
    framing: AmbiguousFraming,
    activity: Arc<Activity>,
    /// The tunnel of a `101` sent on this connection, for the connection's
    /// task to run once hyper hands the socket over. Boxed: few connections
    /// ever upgrade, and every one holds the slot.
    tunnel: Mutex<Option<Box<Tunnel>>>,
    /// The upgrade the last request that asked for one was promised, if it
    /// was declined (see [`Connection::serve_until_idle`]).
    declined_upgrade: Mutex<Option<OnUpgrade>>,
}

impl Client {
    fn take_tunnel(&self) -> Option<Box<Tunnel>> {
        self.tunnel
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn declined_upgrade(&self) -> std::sync::MutexGuard<'_, Option<OnUpgrade>> {
        self.declined_upgrade
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Serves `Proxy::handle` to one client connection, each response body
/// counted open (see [`Activity`]) until hyper drops it and handed to hyper
/// as `wrap` makes it, and an upgrade's tunnel kept in the client's slot.
fn client_service<B, W>(
    client: Arc<Client>,
    wrap: W,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<B>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<B>, Infallible>> + Send,
> + Clone
+ Send
+ 'static
where
    B: Body,
    W: Fn(Tracked<ResponseBody>) -> B + Copy + Send + 'static,
{
    service_fn(move |req| {
        let client = Arc::clone(&client);
        let open = client.activity.open_request();
        // Any `Upgrade` header, `h2c` included: hyper then promises the
        // request an upgrade, and the framing guard stops expecting a next
        // head after it.
        let promised = req
            .headers()
            .contains_key(UPGRADE)
            .then(|| req.extensions().get::<OnUpgrade>().cloned());
        let upgrading =
            (promised.is_some() && rewrite::is_upgrade(&req)).then(|| client.activity.upgrading());
        async move {
            let (mut rsp, tunnel) = client
                .proxy
                .handle(req, &client.peer, &client.framing)
                .await;
            // A drain that found this connection between requests ends it
            // behind the answer to the request it was sending (HTTP/1.1).
            if client.activity.closes_after_response()
                && rsp.status() != StatusCode::SWITCHING_PROTOCOLS
            {
                rsp.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            // hyper writes the head in the same poll that takes the response.
            drop(upgrading);
            if let Some(promised) = promised
                && rsp.status() != StatusCode::SWITCHING_PROTOCOLS
            {
                client.activity.decline_upgrade();
                if promised.is_some() {
                    *client.declined_upgrade() = promised;
                }
            }
            if let Some(tunnel) = tunnel {
                *client.tunnel.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(Box::new(tunnel));
            }
            // Wrapped in here: over HTTP/2 hyper runs this future on the
            // stream's own task, where `ReportingBody` finds its stream.
            Ok::<_, Infallible>(rsp.map(|body| wrap(Tracked::new(body, open))))
        }
    })
}

/// An idle HTTP/1.1 connection's socket, as hyper handed it back.
enum Released<S, Svc> {
    Parts(http1::Parts<TokioIo<ClientIo<S>>, Svc>),
    /// Through a declined upgrade (see [`Connection::serve_until_idle`]),
    /// without the service, which hyper dropped.
    Upgraded(hyper::upgrade::Parts<TokioIo<ClientIo<S>>>),
}

/// Whether a client of the TLS listener opened with plain HTTP: a TLS
/// record starts with its content type (a handshake is 22), a request line
/// with an upper-case method. Peeked, so the handshake still reads it all.
async fn speaks_plain_http(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(stream.peek(&mut first).await, Ok(1) if first[0].is_ascii_uppercase())
}

/// Tells a client that sent plain HTTP to the TLS listener so, as nginx
/// does, rather than with a TLS alert it cannot read; then closes.
async fn answer_plain_http(mut stream: TcpStream) -> Result<(), BoxError> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const BODY: &str = "The plain HTTP request was sent to the HTTPS port\n";
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    stream.write_all(answer.as_bytes()).await?;
    stream.shutdown().await?;
    // What the client sent is read before the close: left unread, it would
    // turn the close into a reset, which can cost the client the answer.
    let mut unread = vec![0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(1..) = stream.read(&mut unread).await {}
    })
    .await;
    Err("plain HTTP sent to the TLS listener".into())
}

/// One accepted client connection, until it ends.
struct Connection {
    proxy: Arc<Proxy>,
    peer: SocketAddr,
    settings: Arc<Settings>,
    drain: watch::Receiver<bool>,
}

impl Connection {
    /// Serves the connection to its end: on a plain listener HTTP/2 if it
    /// opens with the HTTP/2 preface, else HTTP/1.1; with `tls`, after the
    /// handshake, HTTP/2 if ALPN chose it (by the preface if no protocol
    /// was negotiated); a client that opens a TLS connection with plain
    /// HTTP is told so and closed.
    ///
    /// The connection's task is as large as the largest state of this
    /// future, for the connection's whole life, so whatever most
    /// connections never need (TLS, HTTP/2) or need only while busy
    /// (hyper's connection) is boxed, and values are borrowed rather than
    /// moved into callees (a moved-from binding keeps its room).
    async fn run(&mut self, stream: TcpStream, tls: Option<TlsAcceptor>) -> Result<(), BoxError> {
        // The TLS handshake and the first request head share one deadline,
        // as nginx's `client_header_timeout` counts from the accept.
        let first_head = Instant::now() + self.settings.header_read_timeout;
        let Some(acceptor) = tls else {
            return self.serve(ClientIo::new(stream), None, first_head).await;
        };
        if Box::pin(tokio::time::timeout_at(
            first_head,
            speaks_plain_http(&stream),
        ))
        .await
            == Ok(true)
        {
            return Box::pin(answer_plain_http(stream)).await;
        }
        let handshake = Box::pin(acceptor.accept(stream));
        let stream = match tokio::time::timeout_at(first_head, handshake).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(format!("TLS handshake failed: {error}").into()),
            Err(_) => return Err("TLS handshake timed out".into()),
        };
        // Without ALPN, the opening bytes tell, as on a plain listener.
        let h2 = stream
            .get_ref()
            .1
            .alpn_protocol()
            .map(|protocol| protocol == b"h2");
        Box::pin(self.serve(ClientIo::new(stream), h2, first_head)).await
    }

    /// Serves HTTP/2 if `h2`, else HTTP/1.1; with `h2` unset, tells by
    /// whether the connection opens with the HTTP/2 preface. The first
    /// request head (over HTTP/2, the first stream) must be in by
    /// `first_head`.
    async fn serve<S: Socket>(
        &mut self,
        mut io: ClientIo<S>,
        h2: Option<bool>,
        first_head: Instant,
    ) -> Result<(), BoxError> {
        let h2 = match h2 {
            Some(h2) => h2,
            None => {
                let opening = opens_h2(&mut io);
                tokio::pin!(opening);
                let opened = tokio::select! {
                    opened = tokio::time::timeout_at(first_head, &mut opening) => opened,
                    () = draining(&mut self.drain) => {
                        // A connection accepted just before a drain (on a
                        // worker restart, the old workers race the new ones
                        // to accept) may have its request on the way: it
                        // gets one idle check to arrive.
                        let grace = first_head.min(Instant::now() + self.settings.idle_check);
                        match tokio::time::timeout_at(grace, &mut opening).await {
                            Ok(opened) => Ok(opened),
                            Err(_) => return Ok(()),
                        }
                    }
                };
                match opened {
                    Ok(opened) => opened?,
                    Err(_) => return Err("no request within the header read timeout".into()),
                }
            }
        };
        let activity = Arc::clone(io.activity());
        let client = Arc::new(Client {
            proxy: Arc::clone(&self.proxy),
            peer: Peer::new(self.peer),
            framing: io.framing(),
            activity: Arc::clone(&activity),
            tunnel: Mutex::new(None),
            declined_upgrade: Mutex::new(None),
        });
        if h2 {
            let service = client_service(Arc::clone(&client), ReportingBody::new);
            // Boxed where it is made: a binding would keep room for it in
            // the task after the move.
            let conn = Box::pin(
                self.settings
                    .http2
                    .serve_connection(TokioIo::new(io), service),
            );
            return self.serve_h2(conn, &activity, first_head).await;
        }
        let mut service = client_service(Arc::clone(&client), convert::identity);
        // When the connection last served a request, and how many it had then.
        let mut served = (Instant::now(), 0);
        loop {
            // Boxed, so that once hyper hands the socket back nothing of
            // its connection stays in the task: a task is as large as its
            // largest state.
            let conn = Box::pin(
                self.settings
                    .http1
                    .serve_connection(TokioIo::new(io), service)
                    .with_upgrades(),
            );
            let head_due = (activity.requests() == 0).then_some(first_head);
            match self.serve_until_idle(conn, &client, head_due).await? {
                Some(Released::Parts(parts)) => {
                    io = parts.io.into_inner();
                    io.rewind(parts.read_buf);
                    service = parts.service;
                }
                Some(Released::Upgraded(parts)) => {
                    io = parts.io.into_inner();
                    io.rewind(parts.read_buf);
                    service = client_service(Arc::clone(&client), convert::identity);
                }
                None => {
                    // After an upgrade the tunnel carries the connection on,
                    // still counted open and still holding up a drain
                    // (until `drain_timeout`), as nginx's old workers keep
                    // their WebSockets on a reload.
                    if let Some(tunnel) = client.take_tunnel() {
                        return Box::pin(self.run_tunnel(*tunnel, &activity)).await;
                    }
                    // Boxed: few connections need it, and the task is as
                    // large as its largest state.
                    let promised = client.declined_upgrade().take();
                    if let Some(promised) = promised {
                        let limit = self.settings.idle_check;
                        Box::pin(shut_down_declined::<S>(promised, limit)).await;
                    }
                    return Ok(());
                }
            }
            if activity.requests() != served.1 {
                // Taken back at the first idle check that saw no transfers,
                // so the last one was about one or two checks ago.
                served = (Instant::now(), activity.requests());
            }
            // A first request must come by `first_head` (however often the
            // client makes the socket readable without one), a next one
            // within the keep-alive timeout.
            let deadline = if served.1 == 0 {
                first_head
            } else {
                served.0 + self.settings.keepalive_timeout
            };
            if !io.has_rewound() {
                let idle = Counted::new(self.settings.idle_connections.clone());
                let waited = self.wait_for_request(&io, deadline).await;
                drop(idle);
                if !waited? {
                    return Ok(());
                }
            }
        }
    }

    /// Serves HTTP/1.1 with hyper until the connection ends (`None`), or
    /// until it has been idle for a whole check and hyper has handed the
    /// socket back (`Some`).
    ///
    /// After an upgrade was declined, hyper still expects it for as long as
    /// that connection lasts: told to let go of the idle connection, it
    /// hands the socket over as upgraded, to the upgrade it promised
    /// the request (kept in `client`), and it comes back from there.
    ///
    /// With `head_due`, the connection is closed if
    /// no request head has come by then. A later head is timed at the idle
    /// checks, from the first that sees part of it (see [`Settings::new`]),
    /// and a client that takes nothing of a response for the send timeout
    /// is cut off (see [`SendWatch`]).
    async fn serve_until_idle<S, Svc, B>(
        &mut self,
        mut conn: Pin<Box<http1::UpgradeableConnection<TokioIo<ClientIo<S>>, Svc>>>,
        client: &Client,
        head_due: Option<Instant>,
    ) -> Result<Option<Released<S, Svc>>, BoxError>
    where
        S: Socket,
        Svc: HttpService<Incoming, ResBody = B>,
        Svc::Error: Into<BoxError>,
        B: Body + 'static,
        B::Error: Into<BoxError>,
    {
        let activity = &*client.activity;
        let check = self.settings.idle_check;
        let mut checks = tokio::time::interval_at(Instant::now() + check, check);
        // Checks that fell behind must not fire back to back: each one
        // stands for a whole check period without transfers.
        checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut transfers = activity.transfers();
        let mut send_watch = SendWatch::new(self.settings.send_timeout, activity);
        // hyper gave the socket back.
        let mut released = false;
        // hyper was told to close (a drain, or a release it was too busy for).
        let mut closing = false;
        // A drain that hyper has not been told of: told between requests,
        // it would close the connection at once, under a request the
        // client may be sending (all of it perhaps already in hyper's
        // buffer: hyper counts a connection idle until a head is parsed);
        // told while a response streams, its head already out, it would
        // close the connection behind it, under the client's next request;
        // and told while an upgrade waits for its answer, it would send the
        // `101` with `connection: close`, which clients refuse. So the next
        // answer says `connection: close` instead (see `client_service`),
        // and hyper is told at a check that finds a request waiting for its
        // answer, or the connection quiet, with no response open, since the
        // check before, as nginx closes an idle keep-alive connection.
        let mut drain_due = false;
        // One wait for the drain across the loop: a fresh one on every
        // wake-up would join the watch's list of waiters and leave it again.
        let drain = draining(&mut self.drain);
        tokio::pin!(drain);
        // Inline, not boxed: the task has room for it already (its largest
        // state is elsewhere), while a box per connection, freed only at
        // the idle release, measurably raised memory per idle connection.
        let head_timer = OptionFuture::from(head_due.map(tokio::time::sleep_until));
        tokio::pin!(head_timer);
        let mut awaiting_head = head_due.is_some();
        // The first check that found part of a later request head read,
        // and how many requests the connection had begun by then: a head
        // found after another request began is a new head, with a timer
        // of its own.
        let mut head_started: Option<(Instant, u64)> = None;
        loop {
            tokio::select! {
                biased;
                result = conn.as_mut() => {
                    result?;
                    break;
                }
                Some(()) = &mut head_timer, if awaiting_head => {
                    if activity.requests() == 0 {
                        return Err("no request within the header read timeout".into());
                    }
                    awaiting_head = false;
                }
                // Polled until it resolves once: `closing` or `drain_due` is set then.
                () = &mut drain, if !closing && !drain_due => {
                    if activity.awaits_answer() && !activity.is_upgrading() {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    } else {
                        drain_due = true;
                        activity.close_after_response();
                    }
                }
                // Still checked while closing: a client that stops reading
                // would hold up the close as well.
                now = checks.tick() => {
                    if send_watch.timed_out(activity, now) {
                        return Err(SEND_TIMED_OUT.into());
                    }
                    if closing {
                        continue;
                    }
                    if activity.is_reading_head() {
                        // Counted from the check that first saw it, as
                        // nginx's `client_header_timeout` counts a head
                        // from its first bytes (here never sooner, and up
                        // to two checks later).
                        let requests = activity.requests();
                        if head_started.is_some_and(|(_, seen)| seen != requests) {
                            head_started = None;
                        }
                        let (started, _) = *head_started.get_or_insert((now, requests));
                        let timeout = self.settings.header_read_timeout;
                        if now.saturating_duration_since(started) >= timeout {
                            return Err(HEAD_TIMED_OUT.into());
                        }
                    } else {
                        head_started = None;
                    }
                    let seen = activity.transfers();
                    if drain_due {
                        let quiet = seen == transfers
                            && !activity.is_reading_head()
                            && !activity.has_open_requests();
                        transfers = seen;
                        if !activity.is_upgrading() && (activity.awaits_answer() || quiet) {
                            closing = true;
                            conn.as_mut().graceful_shutdown();
                        }
                        continue;
                    }
                    if seen == transfers && activity.is_between_requests() {
                        // An idle hyper connection ends on its next poll,
                        // without reading from or writing to the socket;
                        // its shutdown of the socket is held back, so the
                        // socket stays open.
                        activity.keep_open(true);
                        conn.as_mut().graceful_shutdown();
                        match poll_fn(|cx| Poll::Ready(conn.as_mut().poll(cx))).await {
                            Poll::Ready(result) => {
                                activity.keep_open(false);
                                result?;
                                released = true;
                                break;
                            }
                            // Still busy after all (a body to drain, bytes
                            // to flush): it finishes the exchange and then
                            // closes for real, as on a drain.
                            Poll::Pending => {
                                activity.keep_open(false);
                                closing = true;
                            }
                        }
                    }
                    transfers = seen;
                }
            }
        }
        if !released {
            return Ok(None);
        }
        if let Some(parts) = Pin::into_inner(conn).into_parts() {
            return Ok(Some(Released::Parts(parts)));
        }
        let promised = client.declined_upgrade().take();
        let Some(promised) = promised else {
            return Err("an idle connection was handed over as upgraded".into());
        };
        match promised.await?.downcast() {
            Ok(parts) => Ok(Some(Released::Upgraded(parts))),
            Err(_) => Err("an idle connection came back from hyper as another type".into()),
        }
    }

    /// Serves HTTP/2 to the connection's end. It is shut down gracefully
    /// (`GOAWAY`, then open streams finish) once a drain starts, or once it
    /// has had no open stream and no traffic for the keep-alive timeout, as
    /// nginx's `keepalive_timeout` closes an idle HTTP/2 connection: hyper
    /// would keep it, and its buffers, open for as long as the client does.
    /// One that has opened no stream by `first_head` is closed the same
    /// way (to within a check), as an HTTP/1.1 connection with no request
    /// is, and so is one with no stream open for a whole check when a new
    /// client waits for a slot (see [`ConnectionSlots`]; dropped after
    /// [`RECLAIMED_H2_GRACE`]), as nginx closes idle HTTP/2 connections for
    /// one. One told to close that has had no open stream for
    /// [`H2_CLOSE_GRACE`] is dropped. `conn` comes boxed: a task is as
    /// large as its largest state.
    async fn serve_h2<C>(
        &mut self,
        mut conn: Pin<Box<C>>,
        activity: &Activity,
        first_head: Instant,
    ) -> Result<(), BoxError>
    where
        C: GracefulConnection,
        C::Error: Into<BoxError>,
    {
        let keepalive = self.settings.keepalive_timeout;
        let check = self.settings.idle_check;
        let mut checks = tokio::time::interval_at(Instant::now() + check, check);
        checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut transfers = activity.transfers();
        let mut send_watch = SendWatch::new(self.settings.send_timeout, activity);
        let mut last_active = Instant::now();
        let drain = draining(&mut self.drain);
        tokio::pin!(drain);
        // Heard while no stream has been open for a whole check, in the
        // line of connections that wait for a next request, from when it
        // began to wait: a fresh one, not in the line yet, whenever a
        // stream is open.
        let slots = Arc::clone(&self.settings.slots);
        let reclaim = slots.reclaim.notified();
        tokio::pin!(reclaim);
        // Counted among the idle connections while in the line.
        let mut idle: Option<Counted> = None;
        let mut requests = activity.requests();
        let mut reclaimed = false;
        loop {
            tokio::select! {
                biased;
                result = conn.as_mut() => return result.map_err(Into::into),
                () = &mut drain => break,
                () = &mut reclaim, if idle.is_some() => {
                    if activity.has_open_requests() || activity.requests() != requests {
                        // A stream came since the check: the request goes
                        // to the next idle connection.
                        slots.reclaim.notify_one();
                        idle = None;
                        reclaim.set(slots.reclaim.notified());
                        continue;
                    }
                    slots.warn(
                        "listen.max_connections reached: closing the longest-idle keep-alive connection (HTTP/2) for a new client",
                        Some(self.peer),
                    );
                    reclaimed = true;
                    break;
                }
                now = checks.tick() => {
                    let streams_since = activity.requests() != requests;
                    requests = activity.requests();
                    // As over HTTP/1.1, one that has yet to open a stream
                    // waits for its first until `first_head`.
                    if activity.has_open_requests() || streams_since || requests == 0 {
                        if idle.take().is_some() {
                            reclaim.set(slots.reclaim.notified());
                        }
                    } else if idle.is_none() {
                        idle = Some(Counted::new(self.settings.idle_connections.clone()));
                    }
                    if send_watch.timed_out(activity, now) {
                        return Err(SEND_TIMED_OUT.into());
                    }
                    if activity.requests() == 0 && now >= first_head {
                        break;
                    }
                    if activity.resets_most_streams() {
                        tracing::warn!(
                            client.addr = %self.peer,
                            streams = activity.requests(),
                            "HTTP/2 client resets most of its streams before their answer; closing its connection"
                        );
                        break;
                    }
                    let seen = activity.transfers();
                    if seen != transfers || activity.has_open_requests() {
                        transfers = seen;
                        last_active = now;
                    } else if now.saturating_duration_since(last_active) >= keepalive {
                        break;
                    }
                }
            }
        }
        // Out of the line: a notification that came meanwhile goes to the
        // next connection in it, not to this one, which is closing anyway.
        reclaim.set(slots.reclaim.notified());
        drop(idle);
        // Open streams finish (on a drain, within the listener's drain
        // timeout), and so do those the client opened before it saw the
        // `GOAWAY`; then the client has the grace to close.
        conn.as_mut().graceful_shutdown();
        if reclaimed {
            // A client waits for the slot, and this connection had no
            // stream open: its client has a moment to take the `GOAWAY`
            // (one that has gone never acknowledges it), as nginx closes
            // such a connection at once.
            match tokio::time::timeout(RECLAIMED_H2_GRACE, conn.as_mut()).await {
                Ok(result) => return result.map_err(Into::into),
                Err(_) if !activity.has_open_requests() => return Ok(()),
                // A stream it opened before it saw the `GOAWAY` is answered.
                Err(_) => {}
            }
        }
        let mut last_open = Instant::now();
        loop {
            tokio::select! {
                biased;
                result = conn.as_mut() => return result.map_err(Into::into),
                now = checks.tick() => {
                    if send_watch.timed_out(activity, now) {
                        return Err(SEND_TIMED_OUT.into());
                    }
                    if activity.has_open_requests() {
                        last_open = now;
                    } else if now.saturating_duration_since(last_open) >= H2_CLOSE_GRACE {
                        return Err("HTTP/2 connection told to close did not close in time".into());
                    }
                }
            }
        }
    }

    /// Runs an upgraded connection's tunnel to its end, or cuts it once it
    /// has carried no byte either way for `listen.tunnel_idle_timeout`, or
    /// once the client has taken nothing of what is written to it for
    /// `listen.send_timeout`, as for a response. An upstream that stops
    /// reading stops the tunnel reading its client, so one that sends
    /// nothing either is seen as idle. Checked four times per the shorter timeout, so each holds to
    /// within a quarter of itself.
    async fn run_tunnel(&self, tunnel: Tunnel, activity: &Activity) -> Result<(), BoxError> {
        let idle_timeout = self.settings.tunnel_idle_timeout;
        let check =
            (self.settings.send_timeout.min(idle_timeout) / 4).max(Duration::from_millis(1));
        let mut checks = tokio::time::interval_at(Instant::now() + check, check);
        checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut send_watch = SendWatch::new(self.settings.send_timeout, activity);
        let mut transfers = activity.transfers();
        let mut last_moved = Instant::now();
        let run = tunnel.run();
        tokio::pin!(run);
        loop {
            tokio::select! {
                () = &mut run => return Ok(()),
                now = checks.tick() => {
                    if send_watch.timed_out(activity, now) {
                        return Err(SEND_TIMED_OUT.into());
                    }
                    let seen = activity.transfers();
                    if seen != transfers {
                        transfers = seen;
                        last_moved = now;
                    } else if now.saturating_duration_since(last_moved) >= idle_timeout {
                        return Err(TUNNEL_IDLE.into());
                    }
                }
            }
        }
    }

    /// Waits, holding only the socket, for the client's next request:
    /// `true` once it sends something, `false` if `deadline` passes or a
    /// drain starts first.
    ///
    /// Over TLS the TCP socket's readiness is the right thing to wait on:
    /// hyper was idle, so its last read through rustls found no decrypted
    /// bytes left and the socket empty.
    async fn wait_for_request<S: Socket>(
        &mut self,
        io: &ClientIo<S>,
        deadline: Instant,
    ) -> std::io::Result<bool> {
        tokio::select! {
            // A request that has come is served, whatever else is due.
            biased;
            ready = io.get_ref().tcp().readable() => ready.map(|()| true),
            () = tokio::time::sleep_until(deadline) => Ok(false),
            () = draining(&mut self.drain) => Ok(false),
            () = self.settings.slots.reclaim.notified() => {
                self.settings.slots.warn(
                    "listen.max_connections reached: closing the longest-idle keep-alive connection for a new client",
                    Some(self.peer),
                );
                Ok(false)
            }
        }
    }
}

/// Shuts down the socket of a connection that hyper ended through the
/// upgrade it had promised a declined request: hyper hands the socket over
/// to that upgrade unshut, so it is shut down here, as hyper would have
/// (over TLS, with its `close_notify`), for at most `limit`.
async fn shut_down_declined<S: Socket>(promised: OnUpgrade, limit: Duration) {
    if let Ok(upgraded) = promised.await
        && let Ok(parts) = upgraded.downcast::<TokioIo<ClientIo<S>>>()
    {
        let mut io = parts.io.into_inner();
        let _ = tokio::time::timeout(limit, io.shutdown()).await;
    }
}

/// Resolves once the listener's drain has started (or its sender is gone).
async fn draining(drain: &mut watch::Receiver<bool>) {
    let _ = drain.wait_for(|&drain| drain).await;
}

/// Reads the start of a plain connection: whether it is the HTTP/2 preface.
/// What was read is rewound for hyper, which reads it again.
async fn opens_h2<S: Socket>(io: &mut ClientIo<S>) -> std::io::Result<bool> {
    // Room for a typical request head, so that HTTP/1.1 costs no extra read.
    let mut start = BytesMut::with_capacity(1024);
    while start.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&start) {
        if io.read_buf(&mut start).await? == 0 {
            break;
        }
    }
    let h2 = start.starts_with(H2_PREFACE);
    io.rewind(start.freeze());
    Ok(h2)
}
