//! The bodies the proxy hands to hyper (the request's, for its upstream;
//! the response's, for its client), and the in-flight guard a response
//! carries.
//!
//! Owns:
//! - [`RequestBody`]: the client's body on its way upstream, frame by
//!   frame, feeding a shadow copy's [`Tap`] when the request is mirrored;
//!   it tells [`BodyProgress`] of every frame and cuts a body whose client
//!   fell silent after its response ended.
//! - [`ResponseBody`]: an upstream body streamed through frame by frame
//!   (never buffered whole), or the proxy's own small body. It ends a
//!   stream whose version was rolled back with `on_rollback = "close"`
//!   after its head (an HTTP/2 stream with `CANCEL`), or that went silent both ways (no byte from its
//!   upstream, none of the request body) for
//!   `upstream.stream_idle_timeout`, and counts and logs an upstream that
//!   fails mid-body, handing the failure on only after what came before
//!   it has been sent.
//! - [`InFlight`]: holds a version's in-flight gauge from the request's
//!   start to the body's end (or the client's disconnect), moving it to
//!   stable with a request the canary gave back, then records the
//!   response duration, and in the version's window the outcome of a
//!   streamed response (a failure if its upstream cut it); for a request
//!   its client abandoned before the response head, a 499, its access log
//!   line and a failure.
//! - [`BodyProgress`]: how far a request body has got (which the response
//!   timeout counts from), whether it waits on its client, and when one
//!   left silent after its response has ended is due to be cut.
//!
//! Does not own: when the response head is due (`Proxy::forward`), the
//! HTTP/2 stream's send timeout (`h2stream`), or the metric names
//! (`metrics`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::StatusCode;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Instant;

use super::ProxyError;
use crate::BoxError;
use crate::rollout::window::Observation;
use crate::routing::Decision;
use crate::shadow::Tap;
use crate::table::Version;
use crate::upstream::UpstreamBody;

/// The real request's body on its way upstream: every frame passes through
/// unchanged and, when the request is mirrored, a clone of each data frame
/// (a reference count, not a copy of the bytes) goes to the shadow's copy
/// through its [`Tap`].
/// Without a shadow this is one `Option` check per frame. It also cuts a
/// body whose client falls silent once its response has ended (see
/// [`BodyProgress`]).
///
/// The default is an empty body, for a bodiless request sent again.
#[derive(Debug, Default)]
pub struct RequestBody {
    /// `None` for an empty body.
    inner: Option<Incoming>,
    tap: Option<Tap>,
    /// Told of every frame, when the proxy waits on the body (see [`RequestBody::watch`]).
    progress: Option<Arc<BodyProgress>>,
    /// Armed when the response has ended and the body still waits on its
    /// client: it cuts the body then (see [`BodyProgress`]).
    cut: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl RequestBody {
    #[must_use]
    pub fn new(inner: Incoming, tap: Option<Tap>) -> RequestBody {
        RequestBody {
            inner: Some(inner),
            tap,
            progress: None,
            cut: None,
        }
    }

    /// Follows how far the body gets from now on: the response timeout of
    /// a request with a body (`timeout`) counts from its last frame. Over
    /// HTTP/2 (`http2`), only a body of a declared length is an upload
    /// (see [`BodyProgress::new`]).
    pub fn watch(&mut self, timeout: Duration, http2: bool) -> Arc<BodyProgress> {
        let upload = !http2 || self.size_hint().exact().is_some();
        Arc::clone(
            self.progress
                .get_or_insert_with(|| BodyProgress::new(upload, timeout)),
        )
    }

    /// The progress [`RequestBody::watch`] follows, if it was asked to.
    #[must_use]
    pub fn progress(&self) -> Option<Arc<BodyProgress>> {
        self.progress.clone()
    }

    /// The timeout, if the body has waited on its client for that long
    /// since its response ended; registers `cx` otherwise.
    fn cut_after(
        progress: Option<&BodyProgress>,
        cut: &mut Option<Pin<Box<tokio::time::Sleep>>>,
        cx: &mut Context<'_>,
    ) -> Option<Duration> {
        let progress = progress?;
        let due = progress.cut_due(cx)?;
        let timer = cut.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() != due {
            timer.as_mut().reset(due);
        }
        timer
            .as_mut()
            .poll(cx)
            .is_ready()
            .then(|| progress.timeout())
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(inner) = &mut this.inner else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        if let Some(progress) = &this.progress {
            match &polled {
                Poll::Pending => progress.awaiting_client(),
                Poll::Ready(Some(Err(error))) => progress.broken_off(is_malformed(error)),
                Poll::Ready(_) => progress.moved(),
            }
        }
        let mut polled = polled.map_err(BoxError::from);
        if polled.is_pending()
            && let Some(timeout) = Self::cut_after(this.progress.as_deref(), &mut this.cut, cx)
        {
            polled = Poll::Ready(Some(Err(format!(
                "request body cut: nothing of it from the client for {timeout:?} after its response ended (upstream.response_timeout)"
            )
            .into())));
        }
        let mut frame = ready!(polled);
        // Trailers are filtered as the head was, for the upstream and the
        // shadow's copy alike.
        if let Some(Ok(frame)) = &mut frame
            && let Some(trailers) = frame.trailers_mut()
        {
            super::rewrite::strip_trailers(trailers);
        }
        if let Some(tap) = &mut this.tap {
            let fed = matches!(&frame, Some(Ok(frame)) if tap.feed(frame));
            // hyper may stop polling once the body has ended without
            // saying so again: once it says it has ended, and after
            // trailers, the last frame.
            let whole =
                inner.is_end_stream() || matches!(&frame, Some(Ok(frame)) if frame.is_trailers());
            let ended = frame.is_none() || (fed && whole);
            if ended || !fed {
                // A tap let go before the end abandons its copy.
                if let Some(tap) = this.tap.take()
                    && ended
                {
                    tap.complete();
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// A request of `version` that has not finished yet: counted in
/// `cohort_requests_in_flight` until dropped, when it records the response
/// duration and, for a streamed response or an abandoned request, the
/// outcome the guardrails judge.
#[derive(Debug)]
pub struct InFlight {
    version: Arc<Version>,
    /// The request's arrival, for the access log.
    started: Instant,
    /// Where the version's durations count from: the arrival, or the
    /// hand-over of a request the canary gave back ([`InFlight::move_to`]).
    timed_from: Instant,
    /// For the access log line of a request abandoned before its answer.
    decision: Decision,
    client: SocketAddr,
    /// The version's close count when this request's response head came
    /// (when it started, until then): a close ends the streams open at
    /// the rollback, not the requests still waiting for their answer,
    /// which get it whole.
    close_epoch: u64,
    /// Whether the proxy got as far as a response head. A request dropped
    /// before that was abandoned by its client while it waited.
    answered: bool,
    /// The request body's progress, for a request with a body: one whose
    /// client left while the proxy waited for its body was abandoned by
    /// the client alone, not while it waited for the version.
    body: Option<Arc<BodyProgress>>,
    /// What the guardrails are told of an answered request whose body
    /// streams from its upstream, once the body has ended (or its client
    /// has left): a failure if the upstream cut it.
    verdict: Option<Observation>,
}

impl InFlight {
    #[must_use]
    pub fn start(
        version: Arc<Version>,
        started: Instant,
        decision: Decision,
        client: SocketAddr,
    ) -> InFlight {
        version.metrics.in_flight.increment(1.0);
        let close_epoch = version.close_epoch();
        InFlight {
            version,
            started,
            timed_from: started,
            decision,
            client,
            close_epoch,
            answered: false,
            body: None,
            verdict: None,
        }
    }

    /// Moves the request to `version` before it was answered (a canary's
    /// cohort handed to stable): its gauge, what it is recorded against,
    /// and the time its durations count from, `timed_from`.
    pub fn move_to(&mut self, version: Arc<Version>, timed_from: Instant) {
        self.version.metrics.in_flight.decrement(1.0);
        version.metrics.in_flight.increment(1.0);
        self.close_epoch = version.close_epoch();
        self.version = version;
        self.timed_from = timed_from;
    }

    /// Follows the request body's progress (see the `body` field).
    pub fn watch_body(&mut self, progress: Arc<BodyProgress>) {
        self.body = Some(progress);
    }

    /// Marks that a response head is on its way: from here the request is
    /// recorded with its status, not as abandoned, and its response is a
    /// stream that a later close ends.
    pub fn answered(&mut self) {
        self.answered = true;
        self.close_epoch = self.version.close_epoch();
    }

    /// Tells the guardrails `observation` when the response body ends, or
    /// its client leaves; as a failure if its upstream cuts it first: a
    /// response that breaks off is no success, whatever its status said.
    pub fn judge_at_end(&mut self, observation: Observation) {
        self.verdict = Some(observation);
    }

    /// Upstream `index` of the version cut this response's body with `cut`:
    /// the log says which upstream, as nginx's does (the client saw the head,
    /// so no other line tells of it), the version's upstream errors count it,
    /// and the guardrails are told of a failure (see
    /// [`InFlight::judge_at_end`]). None of it when the client broke its own
    /// request body off first: the upstream is not to blame then.
    fn cut_by_upstream(&mut self, index: usize, cut: &ProxyError) {
        if self.client_broke_off() {
            return;
        }
        tracing::warn!(
            version = %self.version.name,
            upstream = %self.version.upstreams[index],
            client.addr = %self.client,
            error = %cut,
            "upstream failed mid-body; the response is cut"
        );
        if let Some(kind) = cut.upstream_kind() {
            self.version.metrics.record_upstream_error(kind);
            if let Some(verdict) = &mut self.verdict {
                verdict.success = false;
            }
        }
    }

    /// Whether the client broke its request body off: an upstream still
    /// reading it, or its connection, which hyper then drops, may well
    /// fail the response after, and is not to blame for that.
    fn client_broke_off(&self) -> bool {
        self.body
            .as_deref()
            .is_some_and(BodyProgress::is_broken_off)
    }

    /// Whether the version's streams were ordered closed since this one's
    /// response head came.
    fn is_closed(&self) -> bool {
        self.version.close_epoch() > self.close_epoch
    }

    /// Resolves when the version's streams are ordered closed (a rollback
    /// with `on_rollback = "close"`) after this one's response head came.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        self.version.closed_after(self.close_epoch)
    }
}

/// When a request's body last moved towards the upstream. The response
/// timeout counts from there: an upload that takes longer than the timeout
/// is not cut off while it streams, and the wait for the response starts
/// when the body has been sent (as nginx's `proxy_read_timeout` does). A
/// body that stops moving for the timeout still times out, and whose
/// doing that was is known: the client's, if the body was last asked for
/// a frame and had none; else the upstream's, which stopped taking it.
///
/// Once the response has ended, nothing else times the rest of the body
/// (an upstream may answer a 401 or a 413 before reading it): a body
/// still waiting on its client for the timeout after its last frame is
/// cut then, as nginx's `client_body_timeout` would, rather than hold its
/// client and upstream connections for as long as the client stays silent.
#[derive(Debug)]
pub struct BodyProgress {
    created: Instant,
    /// Nanoseconds from `created` to the last frame.
    last_frame: AtomicU64,
    /// Whether the body is waiting for the client's next frame.
    awaiting_client: AtomicBool,
    /// Whether the client broke the body off (closed or reset its
    /// connection, or its HTTP/2 stream, part way through, or sent what
    /// does not parse).
    broken_off: AtomicBool,
    /// Whether what broke it off was bytes that do not parse (a chunk
    /// size, a trailer), not a close.
    malformed: AtomicBool,
    /// Whether the body is an upload, which its client sends whole before
    /// it waits for the answer: one of a declared length, or any over
    /// HTTP/1.1, whose exchanges go one way and then the other. One that
    /// has not all arrived is unfinished by its client's doing, while an
    /// open-ended HTTP/2 body (a gRPC stream) may rightly stay open as
    /// long as its response.
    upload: bool,
    /// The response timeout: how long the body may wait on its client.
    timeout: Duration,
    /// Whether the response has ended (or its client left).
    response_over: AtomicBool,
    /// The body waiting on its client, woken when the response ends.
    waiting: AtomicWaker,
}

impl BodyProgress {
    /// The progress of a body; `upload` if its client sends it whole
    /// before it waits for the answer (see the field).
    #[must_use]
    pub fn new(upload: bool, timeout: Duration) -> Arc<BodyProgress> {
        Arc::new(BodyProgress {
            created: Instant::now(),
            last_frame: AtomicU64::new(0),
            awaiting_client: AtomicBool::new(false),
            broken_off: AtomicBool::new(false),
            malformed: AtomicBool::new(false),
            upload,
            timeout,
            response_over: AtomicBool::new(false),
            waiting: AtomicWaker::new(),
        })
    }

    /// Records that the response has ended, or its client left.
    pub fn response_over(&self) {
        self.response_over.store(true, Ordering::Release);
        self.waiting.wake();
    }

    /// When the body, waiting on its client, is cut: `None` while its
    /// response goes on (the response timeout and the stream's idle
    /// timeout are what time it then). `cx` is woken when the response ends.
    pub fn cut_due(&self, cx: &Context<'_>) -> Option<Instant> {
        // Registered before the flag is read, so an end between the two wakes it.
        self.waiting.register(cx.waker());
        self.response_over
            .load(Ordering::Acquire)
            .then(|| self.deadline(self.timeout))
    }

    /// The response timeout this body waits on its client for.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Records a frame (or the body's end) passing now.
    pub fn moved(&self) {
        let since = u64::try_from(self.created.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_frame.fetch_max(since, Ordering::Relaxed);
        self.awaiting_client.store(false, Ordering::Relaxed);
    }

    /// Records that the body was asked for a frame the client has not sent.
    pub fn awaiting_client(&self) {
        self.awaiting_client.store(true, Ordering::Relaxed);
    }

    /// Whether the body is stalled on its client rather than its upstream.
    #[must_use]
    pub fn is_awaiting_client(&self) -> bool {
        self.awaiting_client.load(Ordering::Relaxed)
    }

    /// Records that the client's body failed: it was broken off, by bytes
    /// that do not parse if `malformed`.
    pub fn broken_off(&self, malformed: bool) {
        self.malformed.store(malformed, Ordering::Relaxed);
        self.broken_off.store(true, Ordering::Relaxed);
    }

    /// Whether the client's body broke off on bytes that do not parse.
    #[must_use]
    pub fn is_malformed(&self) -> bool {
        self.malformed.load(Ordering::Relaxed)
    }

    /// Whether the client broke its body off.
    #[must_use]
    pub fn is_broken_off(&self) -> bool {
        self.broken_off.load(Ordering::Relaxed)
    }

    /// Whether the body is an upload (see the field).
    #[must_use]
    pub fn is_upload(&self) -> bool {
        self.upload
    }

    /// Whether the client left part way through an upload (broke it off,
    /// or stopped sending it).
    #[must_use]
    pub fn is_left_unfinished(&self) -> bool {
        self.upload && (self.is_broken_off() || self.is_awaiting_client())
    }

    /// `timeout` after the last frame (or after the request, before any).
    #[must_use]
    pub fn deadline(&self, timeout: Duration) -> Instant {
        self.created + Duration::from_nanos(self.last_frame.load(Ordering::Relaxed)) + timeout
    }
}

/// Whether a client's body failed on what it sent rather than on a close:
/// hyper reports a chunk size or trailer that does not parse as an I/O
/// error of kind `InvalidData` or `InvalidInput`, and a body cut short
/// as `UnexpectedEof` or the connection's own error. (TLS reports a
/// client's fatal alert as `InvalidData` too, wrapping its own error: a
/// close, not a malformed body.)
fn is_malformed(error: &hyper::Error) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<std::io::Error>())
        .is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
            ) && io
                .get_ref()
                .is_none_or(|inner| !inner.is::<rustls::Error>())
        })
}

/// nginx's status for a request its client closed before the response.
const CLIENT_CLOSED_REQUEST: u16 = 499;

impl Drop for InFlight {
    fn drop(&mut self) {
        let metrics = &self.version.metrics;
        let now = Instant::now();
        let elapsed = now - self.timed_from;
        metrics.in_flight.decrement(1.0);
        metrics.response_duration.record(elapsed);
        if let Some(body) = &self.body {
            body.response_over();
        }
        if let Some(verdict) = self.verdict.take() {
            let at = crate::clock::since_start_at(now.into_std());
            self.version.window.record(at, verdict);
        }
        if !self.answered {
            // The client gave up waiting for this version: the wait it felt
            // is recorded as a failure, so a canary that hangs is seen by
            // its metrics and judged by the guardrails.
            if let Ok(status) = StatusCode::from_u16(CLIENT_CLOSED_REQUEST) {
                metrics.record_response(status, elapsed);
                super::access::log(
                    &self.version.name,
                    self.decision,
                    self.client,
                    status,
                    self.started,
                );
            }
            // Unless it left part way through its own body, which says
            // nothing of the version (as a body that stalls says nothing).
            let left_mid_body = self
                .body
                .as_deref()
                .is_some_and(BodyProgress::is_left_unfinished);
            if !left_mid_body {
                self.version.window.record(
                    crate::clock::since_start_at(now.into_std()),
                    Observation {
                        success: false,
                        latency: elapsed,
                        tokens: None,
                    },
                );
            }
        }
    }
}

enum Inner {
    Upstream {
        body: UpstreamBody<RequestBody>,
        /// Which of the version's upstreams sends it, for the log line of a cut.
        upstream: usize,
        /// The upstream's failure, held back for one poll (see `poll_frame`).
        failed: Option<hyper::Error>,
    },
    Full(Option<Bytes>),
}

/// A response body: an upstream's, streamed, or one the proxy wrote.
pub struct ResponseBody {
    inner: Inner,
    in_flight: Option<InFlight>,
    /// Created only once the upstream body makes us wait, so short responses
    /// pay nothing for the rollback watch.
    closing: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// The upstream's silence that cuts the body (`upstream.stream_idle_timeout`).
    idle: Option<IdleLimit>,
}

/// How long an upstream's body may go without a byte, as Envoy's
/// `stream_idle_timeout` and nginx's `proxy_read_timeout` do: a hung
/// upstream must not hold its client and its connection for ever. As for
/// Envoy, a frame of the request body counts too: a client may stream to
/// an upstream that answers only at the end.
struct IdleLimit {
    limit: Duration,
    /// Armed when the body first makes us wait, so short responses pay
    /// nothing for it.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the timer was last set.
    moved: bool,
}

impl IdleLimit {
    /// Whether the stream has been silent both ways for the limit;
    /// registers the timer with `cx` otherwise. Called when the body makes
    /// us wait.
    fn is_over(&mut self, cx: &mut Context<'_>, request_body: Option<&BodyProgress>) -> bool {
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if std::mem::take(&mut self.moved) {
            timer.as_mut().reset(Instant::now() + limit);
        }
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        // Read only when the timer fires: the request body's frames move
        // no timer of their own.
        match request_body.map(|body| body.deadline(limit)) {
            Some(later) if later > Instant::now() => {
                timer.as_mut().reset(later);
                timer.as_mut().poll(cx).is_ready()
            }
            _ => true,
        }
    }
}

impl ResponseBody {
    /// The body of the version's upstream `upstream`, cut after
    /// `idle_limit` without a byte, if set.
    #[must_use]
    pub fn upstream(
        body: UpstreamBody<RequestBody>,
        upstream: usize,
        in_flight: InFlight,
        idle_limit: Option<Duration>,
    ) -> ResponseBody {
        ResponseBody {
            inner: Inner::Upstream {
                body,
                upstream,
                failed: None,
            },
            in_flight: Some(in_flight),
            closing: None,
            idle: idle_limit.map(|limit| IdleLimit {
                limit,
                timer: None,
                moved: false,
            }),
        }
    }

    #[must_use]
    pub fn full(bytes: impl Into<Bytes>, in_flight: InFlight) -> ResponseBody {
        ResponseBody {
            inner: Inner::Full(Some(bytes.into())),
            in_flight: Some(in_flight),
            closing: None,
            idle: None,
        }
    }

    /// A body with nothing in it, whose request is recorded elsewhere (an
    /// upgrade's, by its tunnel).
    #[must_use]
    pub fn empty() -> ResponseBody {
        ResponseBody {
            inner: Inner::Full(None),
            in_flight: None,
            closing: None,
            idle: None,
        }
    }
}

/// Why a response stream of a rolled-back version is cut: a deliberate cut,
/// which an HTTP/2 client sees as a reset with `CANCEL` (hyper takes the
/// reason from an `h2::Error` among a body error's sources), not with the
/// `INTERNAL_ERROR` of a failure.
#[derive(Debug)]
struct RolledBack(h2::Error);

impl RolledBack {
    fn error() -> BoxError {
        Box::new(RolledBack(h2::Reason::CANCEL.into()))
    }
}

impl std::fmt::Display for RolledBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stream closed: its version was rolled back")
    }
}

impl std::error::Error for RolledBack {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        // Checked before every frame, so a stream that always has data ready
        // is closed as promptly as an idle one (over HTTP/2, once the pieces
        // of the frame before are sent: see `h2stream::ReportingBody`).
        if this.in_flight.as_ref().is_some_and(InFlight::is_closed) {
            this.in_flight.take();
            return Poll::Ready(Some(Err(RolledBack::error())));
        }
        let polled = match &mut this.inner {
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Upstream { failed, .. } if failed.is_some() => {
                Poll::Ready(failed.take().map(|error| Err(error.into())))
            }
            Inner::Upstream {
                body,
                upstream,
                failed,
            } => match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(Some(Err(error))) => {
                    // The upstream failed mid-body (it closed or reset the
                    // connection, or broke the framing): the client sees the
                    // stream cut.
                    if let Some(in_flight) = &mut this.in_flight {
                        in_flight.cut_by_upstream(*upstream, &ProxyError::from_body(&error));
                    }
                    // hyper drops a connection whose body fails without
                    // sending what it holds: the head, if this is the body's
                    // first poll, and the frames taken in the same turn (an
                    // upstream that broke off in the read that brought them).
                    // Handed on at the next poll, once hyper has sent them,
                    // the failure cuts the stream after them, as nginx's
                    // clients see it, rather than leave the client with no
                    // answer at all.
                    *failed = Some(error);
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                Poll::Ready(frame) => {
                    if let Some(idle) = &mut this.idle {
                        idle.moved = true;
                    }
                    Poll::Ready(frame.map(|frame| {
                        frame.map_err(BoxError::from).map(|mut frame| {
                            if let Some(trailers) = frame.trailers_mut() {
                                super::rewrite::strip_trailers(trailers);
                            }
                            frame
                        })
                    }))
                }
                Poll::Pending => {
                    let request_body = this.in_flight.as_ref().and_then(|f| f.body.as_deref());
                    if let Some(idle) = &mut this.idle
                        && idle.is_over(cx, request_body)
                    {
                        let limit = idle.limit;
                        let cut = ProxyError::Timeout(format!(
                            "stream cut: no byte from the upstream for {limit:?} (upstream.stream_idle_timeout)"
                        ));
                        if let Some(mut in_flight) = this.in_flight.take() {
                            in_flight.cut_by_upstream(*upstream, &cut);
                        }
                        return Poll::Ready(Some(Err(cut.to_string().into())));
                    }
                    if let Some(in_flight) = &this.in_flight {
                        let closing = this
                            .closing
                            .get_or_insert_with(|| Box::pin(in_flight.closed()));
                        if closing.as_mut().poll(cx).is_ready() {
                            this.in_flight.take();
                            return Poll::Ready(Some(Err(RolledBack::error())));
                        }
                    }
                    Poll::Pending
                }
            },
        };
        if let Poll::Ready(None) = polled {
            // The body is complete: stop counting it as in flight now, not when hyper drops it.
            this.in_flight.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream { body, failed, .. } => failed.is_none() && body.is_end_stream(),
            Inner::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream { body, .. } => body.size_hint(),
            Inner::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}
