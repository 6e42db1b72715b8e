//! Shadow traffic: mirrored copies of a share of requests (SPEC section 11).
//!
//! Owns: [`Shadow`], the shadow version of a route table and the share of
//! keys it mirrors; the choice of which requests are copied (the bucket rule
//! salted with the shadow's name, `shadow.methods`, the body limit); sending
//! each copy from its own task through the shadow's own pooled client with a
//! timeout, reading its response and throwing it away; and the shadow's
//! metrics under `cohort="shadow"`. A copy never delays or fails the real
//! request: at most [`MAX_IN_FLIGHT`] copies are open per shadow, and one
//! more is dropped and counted in `cohort_shadow_dropped_total`, as is a copy
//! that times out. Does not own: the real request and its body
//! (`proxy`, whose `RequestBody` feeds the copy through its [`Tap`]), when
//! the shadow is installed or removed (`control`), or its health
//! (`health`).
//!
//! Request bodies are copied while they stream to the real upstream, never
//! buffered first: the real request's body hands each data frame to its
//! [`Tap`], which passes a clone to the copy's [`CopyBody`] over a small
//! bounded channel, without waiting. A copy whose body turns out larger than
//! `shadow.max_body` (reason `too_large`), or that falls [`COPY_FRAMES`]
//! frames behind (reason `queue_full`), is abandoned: its task stops at
//! once, closing its connection to the shadow, and it is counted under that
//! reason alone, not as the shadow's failure; the real request never
//! notices. A copy whose real request ends early (the client went away, or
//! the upstream answered without reading the body) is dropped the same way,
//! and not counted: nothing went wrong on the shadow's side.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{HttpConnector, capture_connection};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::BoxError;
use crate::config::{Config, VersionConfig};
use crate::metrics::{Counted, ShadowDropReason, UpstreamErrorKind, record_shadow_dropped};
use crate::proxy::{Peer, ProxyError, rewrite};
use crate::routing::{BUCKETS, Cohort, Weight, bucket};
use crate::table::{Gate, Policy, Version, WindowFrom};
use crate::upstream::connect;

/// The header every shadow copy carries, so the shadow can tell copies from users.
pub static X_COHORT_SHADOW: HeaderName = HeaderName::from_static("x-cohort-shadow");

/// Copies open at once per shadow; one more is dropped (`queue_full`).
pub const MAX_IN_FLIGHT: usize = 64;

/// What the config, the admin API and the state file say of a shadow
/// upstream that is not `host:port`: copies go out over plain HTTP/1.1.
pub const SHADOW_PROTOCOL: &str = "a shadow is reached over plain HTTP/1.1; write it \"host:port\"";

/// What the config says about copies, whichever shadow is installed.
#[derive(Debug, Clone)]
pub struct ShadowPolicy {
    /// Requests with a larger body are not mirrored.
    pub max_body: u64,
    /// The methods that may be mirrored.
    pub methods: Vec<Method>,
    /// Time allowed to connect to a shadow upstream.
    pub connect_timeout: Duration,
    /// Time allowed for a whole copy, response headers and body:
    /// `upstream.response_timeout`, as for the requests it copies.
    pub copy_timeout: Duration,
}

impl ShadowPolicy {
    #[must_use]
    pub fn from_config(config: &Config) -> ShadowPolicy {
        let shadow = config.shadow.as_ref();
        ShadowPolicy {
            max_body: shadow.map_or(1 << 20, |s| s.max_body),
            methods: shadow.map_or_else(|| vec![Method::GET, Method::HEAD], |s| s.methods.clone()),
            connect_timeout: config.upstream.connect_timeout,
            copy_timeout: config.upstream.response_timeout,
        }
    }
}

type ShadowClient = Client<HttpConnector, CopyBody>;

/// How many body frames a copy may fall behind the real request before it
/// is abandoned: room for a body of the default `shadow.max_body` (1 MiB)
/// in hyper's smallest reads (8 KiB) twice over, so that a copy whose
/// connection to the shadow is still opening keeps up with a real upstream
/// that takes the body at once; and few enough that a body sent a byte at
/// a time cannot make a copy hold much.
pub const COPY_FRAMES: usize = 256;

/// The sending end of a copy's body.
#[derive(Debug)]
pub struct Tap {
    frames: mpsc::Sender<Bytes>,
    /// Set before the sender is dropped when the real body ended whole, so
    /// the copy can tell a complete body from an abandoned one.
    complete: Arc<AtomicBool>,
    /// Told when the tap goes without completing: the copy is abandoned,
    /// and its task stops at once, even while its upstream is not reading.
    abandoned: Arc<Notify>,
    /// Bytes the copy may still take under `shadow.max_body`.
    left: u64,
}

impl Drop for Tap {
    fn drop(&mut self) {
        if !self.complete.load(Ordering::Acquire) {
            // A permit is kept if the task is not waiting yet.
            self.abandoned.notify_one();
        }
    }
}

impl Tap {
    /// Passes `frame` to the copy; `false` when the copy must be abandoned.
    pub fn feed(&mut self, frame: &Frame<Bytes>) -> bool {
        let Some(data) = frame.data_ref() else {
            // Trailers are not mirrored; the copy's body ends without them.
            return true;
        };
        let len = data.len() as u64;
        if len > self.left {
            record_shadow_dropped(ShadowDropReason::TooLarge);
            return false;
        }
        self.left -= len;
        match self.frames.try_send(data.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                record_shadow_dropped(ShadowDropReason::QueueFull);
                false
            }
            // The copy is over already (timed out, or the shadow answered early).
            Err(TrySendError::Closed(_)) => false,
        }
    }

    /// Tells the copy that the real body ended whole, then lets it go: the
    /// copy's body ends as the real one did.
    pub fn complete(self) {
        self.complete.store(true, Ordering::Release);
    }
}

/// A copy's body: the real request's data frames as they pass, ending in an
/// error if the copy was abandoned, so the shadow never sees a truncated
/// body as a whole one.
#[derive(Debug)]
pub struct CopyBody {
    frames: mpsc::Receiver<Bytes>,
    complete: Arc<AtomicBool>,
    abandoned: Arc<Notify>,
    /// The copy of a request without a body: said so to hyper, which
    /// otherwise frames a body of unknown length as chunked, and a `GET`
    /// would reach the shadow with a `Transfer-Encoding` the real one lacks.
    empty: bool,
}

impl CopyBody {
    /// A body and the tap that feeds it.
    fn channel(max_body: u64) -> (CopyBody, Tap) {
        let (tx, rx) = mpsc::channel(COPY_FRAMES);
        let complete = Arc::new(AtomicBool::new(false));
        let abandoned = Arc::new(Notify::new());
        let body = CopyBody {
            frames: rx,
            complete: Arc::clone(&complete),
            abandoned: Arc::clone(&abandoned),
            empty: false,
        };
        let tap = Tap {
            frames: tx,
            complete,
            abandoned,
            left: max_body,
        };
        (body, tap)
    }

    /// An empty, complete body.
    fn empty() -> CopyBody {
        let (mut body, tap) = CopyBody::channel(0);
        tap.complete.store(true, Ordering::Release);
        body.empty = true;
        body
    }
}

impl Body for CopyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match ready!(self.frames.poll_recv(cx)) {
            Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            None if self.complete.load(Ordering::Acquire) => Poll::Ready(None),
            None => Poll::Ready(Some(Err("the shadow copy was abandoned".into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.empty
    }

    fn size_hint(&self) -> SizeHint {
        if self.empty {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}

/// What outlives a change of the shadow's share: its client and its copy slots.
#[derive(Debug)]
struct Sender {
    client: ShadowClient,
    slots: Arc<Semaphore>,
}

/// The shadow of a route table: a version that receives copies of `percent` of the keys.
#[derive(Debug, Clone)]
pub struct Shadow {
    /// Its name, upstreams, round-robin cursor, health and `cohort="shadow"` metrics.
    pub version: Arc<Version>,
    pub percent: Weight,
    sender: Arc<Sender>,
}

impl Shadow {
    /// The shadow `config` at `percent`, reusing `previous`'s version, client
    /// and slots when its name and upstreams are the same, and the health of
    /// the upstreams it keeps when only the list changed.
    #[must_use]
    pub fn build(
        config: &VersionConfig,
        percent: Weight,
        policy: &Policy,
        previous: Option<&Shadow>,
    ) -> Shadow {
        if let Some(previous) = previous
            && previous.version.name == config.name
            && previous.version.upstreams == config.upstreams
        {
            return Shadow {
                version: Arc::clone(&previous.version),
                percent,
                sender: Arc::clone(&previous.sender),
            };
        }
        let connector = connect::http_connector(policy.shadow.connect_timeout);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(MAX_IN_FLIGHT)
            .build(connector);
        Shadow {
            version: Arc::new(Version::new(
                config,
                Cohort::Shadow,
                Gate::Open,
                policy.window_slot,
                previous
                    .map(|p| &*p.version)
                    .filter(|v| v.name == config.name),
                WindowFrom::Predecessor,
            )),
            percent,
            sender: Arc::new(Sender {
                client,
                slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            }),
        }
    }

    /// Whether a request with sticky `key` is mirrored: the bucket rule,
    /// salted with the shadow's name.
    #[must_use]
    pub fn covers(&self, key: &[u8]) -> bool {
        self.percent
            .covers(bucket(self.version.name.as_bytes(), key))
    }

    /// Sends a copy of `req` to the shadow if the rules pick it. Returns at
    /// once: the copy is sent by its own task, or dropped and counted. When
    /// the request has a body, the returned [`Tap`] must go into the real
    /// request's body, which feeds the copy through it as the body streams.
    /// `key` is the request's sticky key (or the fallback key drawn for it);
    /// a request with none (`routing.fallback = "stable"`) has no bucket to
    /// go by, and is drawn at random, at the same share.
    pub fn offer<B: Body>(
        &self,
        req: &Request<B>,
        key: Option<&[u8]>,
        policy: &Policy,
        peer: &Peer,
        tls: bool,
    ) -> Option<Tap> {
        let covered = match key {
            Some(key) => self.covers(key),
            None => self.percent.covers(rand::random_range(0..BUCKETS)),
        };
        if !policy.shadow.methods.contains(req.method()) || !covered {
            return None;
        }
        if rewrite::is_upgrade(req) {
            return None;
        }
        let declared = req.body().size_hint().exact();
        if declared.is_some_and(|len| len > policy.shadow.max_body) {
            record_shadow_dropped(ShadowDropReason::TooLarge);
            return None;
        }
        let Ok(slot) = Arc::clone(&self.sender.slots).try_acquire_owned() else {
            record_shadow_dropped(ShadowDropReason::QueueFull);
            return None;
        };
        let Some((_, upstream)) = self.version.pick(false) else {
            // As the real path would answer: counted as a 503 of the
            // shadow, in both histograms, so their counts agree.
            let metrics = &self.version.metrics;
            metrics.record_response(StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO);
            metrics.response_duration.record(Duration::ZERO);
            return None;
        };
        let (body, tap) = if bodiless(req) {
            (CopyBody::empty(), None)
        } else {
            let (body, tap) = CopyBody::channel(policy.shadow.max_body);
            (body, Some(tap))
        };
        let mut copy = rewrite::upstream_request(
            Request::from_parts(crate::upstream::copy_head(req), body),
            &policy.routing.version_header,
            &self.version.header_value,
            peer,
            tls,
        );
        crate::upstream::address(&mut copy, upstream);
        copy.headers_mut()
            .insert(X_COHORT_SHADOW.clone(), HeaderValue::from_static("1"));
        tokio::spawn(send(
            self.sender.client.clone(),
            copy,
            Arc::clone(&self.version),
            Limits {
                timeout: policy.shadow.copy_timeout,
                tokens_header: policy.metrics.tokens_header.clone(),
            },
            slot,
        ));
        tap
    }
}

/// Whether `req` has no body at all.
fn bodiless<B: Body>(req: &Request<B>) -> bool {
    req.body().is_end_stream() || req.body().size_hint().exact() == Some(0)
}

/// What a copy's exchange is held to, and read for, from the policy.
struct Limits {
    /// [`ShadowPolicy::copy_timeout`]: the whole exchange, response body included.
    timeout: Duration,
    /// `metrics.tokens_header`: the shadow's spend, as the real path reads it.
    tokens_header: Option<HeaderName>,
}

/// Sends one copy, reads its response to the end and discards it, and
/// records it under `cohort="shadow"`; gives up after `limits.timeout`.
async fn send(
    client: ShadowClient,
    copy: Request<CopyBody>,
    version: Arc<Version>,
    limits: Limits,
    slot: OwnedSemaphorePermit,
) {
    let started = Instant::now();
    let metrics = &version.metrics;
    let in_flight = Counted::new(metrics.in_flight.clone());
    let abandoned = Arc::clone(&copy.body().abandoned);
    tokio::select! {
        // First: the tap is told before its channel closes, so once the
        // exchange can see the cut body (and fail as a 502), this is ready.
        biased;
        // Counted in `cohort_shadow_dropped_total` when its tap let go: not
        // the shadow's failure, so not in its requests or errors.
        () = abandoned.notified() => {}
        () = exchange(client, copy, &version, &limits, started) => {
            metrics.response_duration.record(started.elapsed());
        }
    }
    drop(in_flight);
    drop(slot);
}

/// The copy's exchange: the request, then its response read to the end
/// and discarded, all within the timeout from `started`, recorded under
/// `cohort="shadow"` with its tokens.
async fn exchange(
    client: ShadowClient,
    copy: Request<CopyBody>,
    version: &Version,
    limits: &Limits,
    started: Instant,
) {
    let deadline = started + limits.timeout;
    let metrics = &version.metrics;
    let mut copy = copy;
    let connection = capture_connection(&mut copy);
    let result = match tokio::time::timeout_at(deadline, client.request(copy)).await {
        Ok(Ok(rsp)) => Ok(rsp),
        Ok(Err(error)) => Err(ProxyError::from_client(&error)),
        Err(_) => Err(ProxyError::Timeout("shadow copy timed out".into())),
    };
    // No passive ejection here: a shadow that fails is what its metrics are
    // for, and every copy it is sent is measured. Active probes still apply.
    match result {
        Ok(rsp) => {
            // As the proxy's own pool does (`upstream::http1`): hyper would
            // send the next copies on a connection that answered in
            // HTTP/1.0 in HTTP/1.0, dropping a body of unknown length.
            if rsp.version() == http::Version::HTTP_10
                && let Some(connection) = connection.connection_metadata().as_ref()
            {
                connection.poison();
            }
            metrics.record_response(rsp.status(), started.elapsed());
            if let Some(tokens) = rewrite::tokens(rsp.headers(), limits.tokens_header.as_ref()) {
                metrics.tokens.increment(tokens);
            }
            let mut body = rsp.into_body();
            let drained = tokio::time::timeout_at(deadline, async {
                while let Some(frame) = body.frame().await {
                    if frame.is_err() {
                        break;
                    }
                }
            })
            .await;
            if drained.is_err() {
                record_shadow_dropped(ShadowDropReason::Timeout);
            }
        }
        Err(error) => {
            if let Some(kind) = error.upstream_kind() {
                metrics.record_upstream_error(kind);
                if kind == UpstreamErrorKind::Timeout {
                    record_shadow_dropped(ShadowDropReason::Timeout);
                }
            }
            tracing::debug!(version = %version.name, %error, "shadow copy failed");
            metrics.record_response(error.status(), started.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodiless_requests_are_told_apart() {
        let empty = Request::new(http_body_util::Empty::<Bytes>::new());
        assert!(bodiless(&empty));
        let full = Request::new(http_body_util::Full::new(Bytes::from_static(b"x")));
        assert!(!bodiless(&full));
    }
}
