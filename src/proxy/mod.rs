//! The data path: route, forward, tag, record, for one request.
//!
//! Owns: [`Proxy::handle`], which reads top to bottom in the order a request
//! lives: load the table snapshot, read the sticky key, decide the cohort,
//! offer the shadow a copy, forward to one of the version's upstreams
//! (stable's, for a request that every canary upstream turned away), tag
//! the response, record it; the answer itself is shaped by `relay` (an
//! upstream's response) or `answer_error` (the proxy's own), which say
//! when the guardrails are to judge it.
//! Does not own: accepting connections and their lifecycle ([`listener`],
//! with [`slots`] for `listen.max_connections`, [`idle`] for freeing idle
//! ones and [`h2stream`] for the HTTP/2 streams' tasks), header rewriting
//! ([`rewrite`]), the tunnel of an upgraded connection ([`tunnel`]), the
//! mapping of failures to responses ([`error`]), or the
//! routing rule itself (`routing`).

pub mod body;
pub mod error;
pub mod framing;
pub mod h2stream;
pub mod idle;
pub mod listener;
pub mod rewrite;
pub mod slots;
pub mod tunnel;

use std::borrow::Cow;
use std::sync::Arc;

use http::header::{CONNECTION, SET_COOKIE};
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::{Body as _, Incoming};
use hyper::upgrade::OnUpgrade;
use tokio::time::Instant;

use crate::clock;
use crate::config::Fallback;
use crate::rollout::window::Observation;
use crate::routing::{self, Cohort, key};
use crate::table::{RouteTable, Table, Version};
use crate::upstream::{self, UpstreamAddr, UpstreamClient};

/// An upstream's response body as the proxy receives it.
type UpstreamBody = upstream::UpstreamBody<RequestBody>;

pub use body::{RequestBody, ResponseBody};
pub use error::ProxyError;
pub use framing::AmbiguousFraming;
pub use rewrite::Peer;
pub use tunnel::Tunnel;

/// Everything a request needs, shared by every connection of a listener.
#[derive(Debug)]
pub struct Proxy {
    table: Arc<Table>,
    client: UpstreamClient<RequestBody>,
    /// Whether clients reach this listener over TLS (`x-forwarded-proto`, `Secure` cookies).
    tls: bool,
}

impl Proxy {
    #[must_use]
    pub fn new(table: Arc<Table>, client: UpstreamClient<RequestBody>, tls: bool) -> Proxy {
        Proxy { table, client, tls }
    }

    /// Proxies one request. Never fails: every error becomes a tagged response.
    /// `framing` is the flag of the client connection's [`framing::FramingGuard`].
    /// A `101 Switching Protocols` comes with the [`Tunnel`] that the client
    /// connection runs once the response is sent.
    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        peer: &Peer,
        framing: &AmbiguousFraming,
    ) -> (Response<ResponseBody>, Option<Tunnel>) {
        let started = Instant::now();
        // One snapshot for the whole request: a concurrent change applies to the next one.
        let table = self.table.snapshot();
        let routing = &table.policy.routing;

        // Route: the first sticky key, else the configured fallback.
        let mut new_cookie = None;
        let key = match key::extract(
            req.headers(),
            req.uri(),
            &routing.sticky_keys,
            &routing.cookie_name,
        ) {
            Some(key) => Some(key),
            None => match routing.fallback {
                Fallback::Cookie => {
                    Some(Cow::Borrowed(new_cookie.insert(key::fresh_id()).as_bytes()))
                }
                Fallback::ClientIp => Some(Cow::Borrowed(peer.ip())),
                Fallback::Stable => None,
            },
        };
        let forced = key::forced_cohort(req.headers(), routing.override_header.as_ref());
        let decision = routing::decide(&table, key.as_deref(), forced);
        // A canary with no available upstream hands its cohort to stable,
        // or answers 503 (`canary_unavailable = "error"`); so does one whose
        // every upstream fails this request before taking it (below).
        let mut version = table.version(decision.cohort);
        let canary = decision.cohort == Cohort::Canary;
        let mut upstream = version.pick(canary);
        let mut may_fall_back = canary && table.canary_may_fall_back();
        if upstream.is_none() && may_fall_back {
            crate::metrics::record_canary_fallback();
            version = &table.stable;
            upstream = version.pick(false);
            may_fall_back = false;
        }
        let mut version = Arc::clone(version);

        // Forward, with the version's in-flight gauge held until the body
        // ends. A version's numbers time its own part of the request.
        let mut timed_from = started;
        let mut in_flight =
            body::InFlight::start(Arc::clone(&version), started, decision, peer.addr);
        let http_version = req.version();
        let result = match rewrite::check_request(&req, framing) {
            Err(error) => Err(error),
            Ok(()) => {
                // A copy for the shadow, if it takes this request; never waits.
                let tap = table.shadow.as_ref().and_then(|shadow| {
                    shadow.offer(&req, key.as_deref(), &table.policy, peer, self.tls)
                });
                let client_upgrade =
                    rewrite::is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
                let mut req = req.map(|body| RequestBody::new(body, tap));
                if !req.body().is_end_stream() {
                    let timeout = table.policy.response_timeout;
                    let http2 = http_version == http::Version::HTTP_2;
                    in_flight.watch_body(req.body_mut().watch(timeout, http2));
                }
                let req = rewrite::upstream_request(
                    req,
                    &routing.version_header,
                    &version.header_value,
                    peer,
                    self.tls,
                );
                let mut forwarded = self
                    .forward(req, &table, &version, upstream, started, may_fall_back)
                    .await;
                if let Forwarded::GivenBack(error, mut req) = forwarded {
                    // No canary upstream took it (a refused connection,
                    // mostly): stable answers it, as it would had the canary
                    // been known to be down, with a response timeout of its
                    // own, as nginx gives a next upstream. The canary's
                    // failure is counted and judged all the same.
                    timed_from = canary_gave_back(&version, &error, started);
                    version = Arc::clone(&table.stable);
                    in_flight.move_to(Arc::clone(&version), timed_from);
                    req.headers_mut()
                        .insert(&routing.version_header, version.header_value.clone());
                    let upstream = version.pick(false);
                    forwarded = self
                        .forward(*req, &table, &version, upstream, timed_from, false)
                        .await;
                }
                match forwarded {
                    Forwarded::Answered(rsp, upstream) => Ok((rsp, upstream, client_upgrade)),
                    Forwarded::Failed(error) | Forwarded::GivenBack(error, _) => Err(error),
                }
            }
        };

        // Tag and record, on success and failure alike. Nothing below waits,
        // so a client that goes away from here still has its status recorded
        // (and the guardrails are told of it now or, for a streamed
        // response, when its body ends).
        in_flight.answered();
        let answered = Instant::now();
        let to_headers = answered - timed_from;
        let Answer {
            mut rsp,
            tunnel,
            tokens,
            judged,
        } = match result {
            Ok((rsp, upstream, client_upgrade)) => relay(
                rsp,
                upstream,
                client_upgrade,
                &table,
                &version,
                in_flight,
                to_headers,
            ),
            Err(error) => {
                // A request refused (or cut short by its client) pins no
                // one to a cohort.
                if error.is_refusal() {
                    new_cookie = None;
                }
                answer_error(error, &version, in_flight, http_version)
            }
        };
        tag(&mut rsp, &table, &version, new_cookie.as_deref(), self.tls);
        version.metrics.record_response(rsp.status(), to_headers);
        if let Judged::AtHead { success } = judged {
            version.window.record(
                clock::since_start_at(answered.into_std()),
                Observation {
                    success,
                    latency: to_headers,
                    tokens,
                },
            );
        }
        access::log(&version.name, decision, peer.addr, rsp.status(), started);
        (rsp, tunnel)
    }

    /// Sends `req`, rewritten for `version`, to one of its upstreams and
    /// waits for the response headers. A request that an upstream failed
    /// without it being sent (the connection was refused, or closed before
    /// the request went out), or an idempotent one without a body that a
    /// new connection closed unanswered, goes on to the version's next
    /// available upstream when the client gives it back (see
    /// `upstream::SendError`), as nginx's `proxy_next_upstream error
    /// timeout` does; each is tried once, all within one response timeout
    /// from `started`, which a request body still streaming pushes back
    /// (see [`body::BodyProgress`]). The try of one
    /// that an HTTP/2 upstream says it did not process counts against no
    /// upstream, and it may go to the same upstream once more when that is
    /// the only one; a failure that ends the request counts. With
    /// `hand_back`, a request that the last upstream tried gave back comes
    /// back to the caller ([`Forwarded::GivenBack`]), for another version.
    async fn forward(
        &self,
        mut req: Request<RequestBody>,
        table: &RouteTable,
        version: &Version,
        upstream: Option<(usize, &UpstreamAddr)>,
        started: Instant,
        hand_back: bool,
    ) -> Forwarded {
        let Some((mut index, mut upstream)) = upstream else {
            return Forwarded::Failed(ProxyError::NoUpstream);
        };
        let response_timeout = table.policy.response_timeout;
        // From the request's arrival (or its hand-over), microseconds
        // before it is sent: one clock read fewer per request.
        let mut deadline = started + response_timeout;
        let progress = req.body().progress();
        let first = index;
        let mut resent_unprocessed = false;
        let mut given_back = None;
        let result = loop {
            let sent = self.client.request(upstream, req);
            tokio::pin!(sent);
            // The deadline moves while a request body still streams (see
            // `body::BodyProgress`). Waited for here, not in a helper `async
            // fn`, which would hold a second copy of the large `sent` future.
            let waited = loop {
                tokio::select! {
                    biased;
                    output = &mut sent => break Some(output),
                    () = tokio::time::sleep_until(deadline) => {
                        match progress.as_deref().map(|p| p.deadline(response_timeout)) {
                            Some(later) if later > deadline => deadline = later,
                            _ => break None,
                        }
                    }
                }
            };
            let failed = match waited {
                Some(Ok(rsp)) => break rewrite::downstream_response(rsp).map(|rsp| (rsp, index)),
                // The exchange failed because the client's body did: not
                // the upstream's doing, and nothing to try again.
                Some(Err(failed))
                    if let Some(progress) = progress.as_deref()
                        && progress.is_broken_off() =>
                {
                    if progress.is_malformed() {
                        break Err(ProxyError::MalformedBody(error::chain(&failed.error)));
                    }
                    break Err(ProxyError::ClientClosed {
                        detail: error::chain(&failed.error),
                        open_ended: !progress.is_upload(),
                    });
                }
                Some(Err(failed)) => failed,
                None if progress
                    .as_deref()
                    .is_some_and(body::BodyProgress::is_awaiting_client) =>
                {
                    break Err(ProxyError::ClientTimeout(format!(
                        "nothing of it for {response_timeout:?}"
                    )));
                }
                None => {
                    break Err(ProxyError::Timeout(format!(
                        "no response headers within {response_timeout:?} of the request (or of the last of its body)"
                    )));
                }
            };
            let error = ProxyError::from_upstream(&failed.error);
            // Short of its own resources, the proxy would fail the same way
            // at any upstream.
            let Some(retry) = failed.retry.filter(|_| error.upstream_kind().is_some()) else {
                break Err(error);
            };
            // Given back only when another upstream, or for a request it did
            // not process the same one, may take it (see `SendError`).
            if let Some(next) = version.pick_other(first, index) {
                tracing::warn!(
                    version = %version.name,
                    %upstream,
                    %error,
                    "upstream request failed; trying another upstream"
                );
                if !failed.error.is_unprocessed() {
                    if let Some(kind) = error.upstream_kind() {
                        version.metrics.record_upstream_error(kind);
                    }
                    record_outcome(version, index, false, table);
                }
                (index, upstream) = next;
                req = retry;
                continue;
            }
            // An HTTP/2 upstream that turned the request away unprocessed
            // (shutting down gracefully, or at its stream limit) failed at
            // nothing: with no other upstream to take it, it gets it once
            // more, as Envoy's `refused-stream` retry does. The pool gives a
            // connection that sent a graceful GOAWAY no new streams.
            if failed.error.is_unprocessed() && !resent_unprocessed {
                tracing::info!(
                    version = %version.name,
                    %upstream,
                    %error,
                    "upstream did not process the request; sending it again"
                );
                resent_unprocessed = true;
                req = retry;
                continue;
            }
            given_back = hand_back.then_some(retry);
            break Err(error);
        };
        // As nginx's error log does: which upstream failed, and how (the
        // answer to the client names only the version); or that the proxy
        // could not connect to it for want of descriptors.
        if let Err(error) = &result
            && (error.upstream_kind().is_some() || matches!(error, ProxyError::OutOfResources(_)))
        {
            tracing::warn!(version = %version.name, %upstream, %error, "upstream request failed");
        }
        // Passive health: consecutive failed exchanges (no connection, a
        // timeout, a reset, a broken answer: the client's 502 or 504) and
        // 5xx answers eject the upstream, as Envoy's gateway failures do. A
        // client that stalled or broke its body off says nothing of it
        // either way.
        let ok = match &result {
            Ok((rsp, _)) => Some(!rsp.status().is_server_error()),
            Err(
                ProxyError::ClientTimeout(_)
                | ProxyError::ClientClosed { .. }
                | ProxyError::OutOfResources(_),
            ) => None,
            Err(error) => Some(error.upstream_kind().is_none()),
        };
        if let Some(ok) = ok {
            record_outcome(version, index, ok, table);
        }
        match (result, given_back) {
            (Ok((rsp, index)), _) => Forwarded::Answered(rsp, index),
            (Err(error), Some(req)) => Forwarded::GivenBack(error, Box::new(req)),
            (Err(error), None) => Forwarded::Failed(error),
        }
    }
}

/// How [`Proxy::forward`] ended.
enum Forwarded {
    /// The response head, and which of the version's upstreams sent it.
    Answered(Response<UpstreamBody>, usize),
    /// The failure to answer the client with.
    Failed(ProxyError),
    /// The failure, and the request given back for another version (see
    /// `upstream::SendError`): nothing of it reached an upstream, or it is
    /// idempotent, without a body, and a new connection closed without
    /// answering it. Boxed: it is rare, and the future holds the enum.
    GivenBack(ProxyError, Box<Request<RequestBody>>),
}

/// Records against the canary a request that none of its upstreams took,
/// which stable is to answer, as the answer it would have had (a 502 or
/// 504, with no body): in its metrics, so that its error ratio counts it,
/// and for the guardrails, which would otherwise never hear of it. Returns
/// the time of the hand-over.
fn canary_gave_back(canary: &Version, error: &ProxyError, started: Instant) -> Instant {
    let metrics = &canary.metrics;
    if let Some(kind) = error.upstream_kind() {
        metrics.record_upstream_error(kind);
    }
    crate::metrics::record_canary_fallback();
    let now = Instant::now();
    let waited = now - started;
    metrics.record_response(error.status(), waited);
    metrics.response_duration.record(waited);
    canary.window.record(
        clock::since_start_at(now.into_std()),
        Observation {
            success: false,
            latency: waited,
            tokens: None,
        },
    );
    tracing::warn!(version = %canary.name, %error, "no canary upstream took the request; stable answers it");
    now
}

/// A response on its way to the client, and what the guardrails are to
/// make of it.
struct Answer {
    rsp: Response<ResponseBody>,
    /// An upgrade both sides agreed to, run once the response is sent.
    tunnel: Option<Tunnel>,
    /// What the upstream said the request spent (`metrics.tokens_header`).
    tokens: Option<u64>,
    judged: Judged,
}

/// When the guardrails hear of a request's outcome. They judge the version
/// by what its upstreams did: a request refused unread, or whose client
/// stopped sending its body or left part way through it, says nothing of
/// it, and a client must not be able to fail a canary by sending malformed,
/// stalled or unfinished requests. A client that gave up on an open-ended
/// body while it waited is a failure, as one that gave up on any other
/// request is (a 499).
enum Judged {
    /// Now, at the response head.
    AtHead { success: bool },
    /// When the response body ends, streams included (`InFlight`).
    AtEnd,
    /// Never.
    Not,
}

/// An upstream's response, relayed: its body streamed through, or its
/// upgrade paired with the client's.
fn relay(
    mut rsp: Response<UpstreamBody>,
    upstream: usize,
    client_upgrade: Option<OnUpgrade>,
    table: &RouteTable,
    version: &Version,
    mut in_flight: body::InFlight,
    to_headers: std::time::Duration,
) -> Answer {
    let tokens = rewrite::tokens(rsp.headers(), table.policy.metrics.tokens_header.as_ref());
    if let Some(tokens) = tokens {
        version.metrics.tokens.increment(tokens);
    }
    if rsp.status() != StatusCode::SWITCHING_PROTOCOLS {
        in_flight.judge_at_end(Observation {
            success: !rsp.status().is_server_error(),
            latency: to_headers,
            tokens,
        });
        let idle_limit = table.policy.stream_idle_timeout;
        return Answer {
            rsp: rsp.map(|body| ResponseBody::upstream(body, upstream, in_flight, idle_limit)),
            tunnel: None,
            tokens,
            judged: Judged::AtEnd,
        };
    }
    // hyper keeps a response's upgrade in its extensions.
    let upstream_upgrade = rsp.extensions_mut().remove::<OnUpgrade>();
    let (rsp, tunnel) = match (client_upgrade, upstream_upgrade) {
        (Some(client), Some(upstream)) => (
            rsp.map(|_| ResponseBody::empty()),
            Some(Tunnel::new(client, upstream, in_flight)),
        ),
        // A 101 the client never asked for cannot be honoured.
        _ => (
            ProxyError::Protocol("upgrade without a request to upgrade".into())
                .into_response(&version.name, in_flight),
            None,
        ),
    };
    let success = !rsp.status().is_server_error();
    Answer {
        rsp,
        tunnel,
        tokens,
        judged: Judged::AtHead { success },
    }
}

/// The proxy's own answer to a request that failed, recorded against the
/// upstream it failed at, if any.
fn answer_error(
    error: ProxyError,
    version: &Version,
    in_flight: body::InFlight,
    http_version: http::Version,
) -> Answer {
    if let Some(kind) = error.upstream_kind() {
        version.metrics.record_upstream_error(kind);
    }
    tracing::debug!(version = %version.name, %error, "request failed");
    let refused = error.is_refusal();
    // Every failure that counts is one: an upstream's (a 5xx), or a
    // client's giving up on an open-ended body (a 499).
    let judged = if error.counts_against_version() {
        Judged::AtHead { success: false }
    } else {
        Judged::Not
    };
    let mut rsp = error.into_response(&version.name, in_flight);
    // What follows a refused request on the connection (a CONNECT's
    // tunnel, a body framed one way or another, the rest of a stalled one)
    // is not read as requests: hyper closes once this is sent, as nginx does.
    if refused && http_version <= http::Version::HTTP_11 {
        rsp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Answer {
        rsp,
        tunnel: None,
        tokens: None,
        judged,
    }
}

/// Passive health: counts one real request's outcome against its upstream,
/// and says so when that ejects it.
fn record_outcome(version: &Version, index: usize, ok: bool, table: &RouteTable) {
    let config = &table.policy.health;
    if version.health[index].record_outcome(ok, config) {
        tracing::warn!(
            version = %version.name,
            upstream = %version.upstreams[index],
            eject_for = ?config.eject_for,
            "upstream ejected after consecutive errors"
        );
    }
}

/// Adds the version header and, for a client we just gave a key, its cookie.
fn tag(
    rsp: &mut Response<ResponseBody>,
    table: &RouteTable,
    version: &Version,
    new_cookie: Option<&str>,
    tls: bool,
) {
    let routing = &table.policy.routing;
    rsp.headers_mut()
        .insert(routing.version_header.clone(), version.header_value.clone());
    if let Some(id) = new_cookie {
        let cookie = format!(
            "{}={id}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{}",
            routing.cookie_name,
            routing.cookie_max_age.as_secs(),
            if tls { "; Secure" } else { "" }
        );
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            rsp.headers_mut().append(SET_COOKIE, value);
        }
    }
}

/// The access log: one line per request, off unless the filter enables its
/// target (`RUST_LOG=info,cohort::proxy::access=info`).
mod access {
    use std::net::SocketAddr;

    use http::StatusCode;
    use tokio::time::Instant;

    use crate::routing::Decision;

    pub fn log(
        version: &str,
        decision: Decision,
        peer: SocketAddr,
        status: StatusCode,
        started: Instant,
    ) {
        tracing::info!(
            agent.version = version,
            cohort = decision.cohort.as_str(),
            bucket = decision.bucket,
            routed_by = decision.reason.as_str(),
            client.addr = %peer,
            status = status.as_u16(),
            // Whole microseconds, so the field reads 0.104, not 0.10365100000000001.
            elapsed_ms = started.elapsed().as_micros() as f64 / 1e3,
        );
    }
}
