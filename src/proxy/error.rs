//! The one error funnel: every way a request can fail, as a tagged response.
//!
//! Owns: [`ProxyError`], the classification of upstream client failures into
//! the `kind` labels of SPEC section 5, and the 400/408/501/502/503/504 JSON bodies of
//! SPEC section 2. Does not own: tagging the version header (`proxy::tag`).

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response, StatusCode};

use super::body::{InFlight, ResponseBody};
use crate::metrics::UpstreamErrorKind;

/// Why the proxy answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request could be read two ways, or cannot be forwarded at all.
    #[error("{0}")]
    BadRequest(&'static str),
    /// The client's request body broke off on bytes that do not parse (a
    /// chunk size, a trailer): 400, as for a bad head, and as little the
    /// version's doing.
    #[error("the request body does not parse: {0}")]
    MalformedBody(String),
    /// The request uses a feature the proxy cannot carry (501).
    #[error("{0}")]
    NotImplemented(&'static str),
    /// The client stopped sending its request body for the response
    /// timeout (408, as nginx's `client_body_timeout`): not the upstream's
    /// doing, so it counts against neither the upstream nor the version.
    #[error("the request body stopped arriving: {0}")]
    ClientTimeout(String),
    /// The client broke its request body off part way (closed or reset its
    /// connection, or its HTTP/2 stream): as nginx logs it, 400, and not
    /// the upstream's doing. The guardrails judge it as a client's giving
    /// up only for an open-ended HTTP/2 body (a gRPC stream, say), which
    /// stays open while its client waits; an upload (of a declared length,
    /// or any over HTTP/1.1) was left part way, which says nothing of the
    /// version.
    #[error("the client broke its request body off: {detail}")]
    ClientClosed { detail: String, open_ended: bool },
    /// The version has no upstream to send to.
    #[error("no upstream of this version is available")]
    NoUpstream,
    /// The proxy could not open a connection for want of its own resources
    /// (file descriptors, socket memory): 503, as for no upstream,
    /// and held against neither the upstream nor the version.
    #[error("the proxy cannot open another connection: {0}")]
    OutOfResources(String),
    #[error("cannot connect to the upstream: {0}")]
    Connect(String),
    #[error("the upstream did not answer in time: {0}")]
    Timeout(String),
    /// The upstream closed the connection, or reset the HTTP/2 stream.
    #[error("the upstream closed the connection or stream: {0}")]
    Reset(String),
    #[error("the upstream's response is not valid HTTP: {0}")]
    Protocol(String),
    /// The request cannot be carried the way the upstream is spoken to;
    /// nothing was sent, and the upstream is not to blame.
    #[error("{0}")]
    Unsupported(String),
}

impl ProxyError {
    /// Whether the request was refused unread (no upstream saw it), or cut
    /// short by its client (a body that stopped arriving or was broken
    /// off): the client connection is not to be trusted with another, and,
    /// save as [`ProxyError::counts_against_version`] says, it says
    /// nothing of the version.
    #[must_use]
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest(_)
                | ProxyError::MalformedBody(_)
                | ProxyError::NotImplemented(_)
                | ProxyError::ClientTimeout(_)
                | ProxyError::ClientClosed { .. }
        )
    }

    /// Whether the version's guardrails count this failure (as one): not a
    /// refusal, save a client's giving up on an open-ended body, nor the
    /// proxy's own shortage.
    #[must_use]
    pub fn counts_against_version(&self) -> bool {
        match self {
            ProxyError::ClientClosed { open_ended, .. } => *open_ended,
            ProxyError::OutOfResources(_) => false,
            _ => !self.is_refusal(),
        }
    }

    /// Classifies a failure of the upstream exchange.
    #[must_use]
    pub fn from_upstream(error: &crate::upstream::Error) -> ProxyError {
        if let crate::upstream::Error::UpgradeOverHttp2 = error {
            return ProxyError::Unsupported(error.to_string());
        }
        ProxyError::classify(error, error.is_connect())
    }

    /// Classifies a failure of an upstream's response body, after its head.
    #[must_use]
    pub fn from_body(error: &hyper::Error) -> ProxyError {
        ProxyError::classify(error, false)
    }

    /// Classifies a failure of a hyper-util pooled client (the shadow's).
    #[must_use]
    pub fn from_client(error: &hyper_util::client::legacy::Error) -> ProxyError {
        ProxyError::classify(error, error.is_connect())
    }

    /// By the first I/O error or hyper error among `error` and its causes.
    fn classify(error: &(dyn std::error::Error + 'static), is_connect: bool) -> ProxyError {
        let detail = chain(error);
        let causes = || std::iter::successors(Some(error), |e| e.source());
        let h2 = crate::upstream::h2_cause(error);
        // h2 keeps the I/O error of a connection that broke (an HTTP/2
        // upstream that closed mid-stream) out of the `source()` chain.
        let io_kind = causes()
            .find_map(|e| e.downcast_ref::<std::io::Error>().map(std::io::Error::kind))
            .or_else(|| h2.and_then(h2::Error::get_io).map(std::io::Error::kind));
        let hyper = causes().find_map(|e| e.downcast_ref::<hyper::Error>());
        // An HTTP/2 upstream's RST_STREAM or GOAWAY, or its connection
        // broken: it ended the exchange.
        let h2_ended = h2.is_some_and(|e| e.is_remote() || e.is_io());
        let errno = causes().find_map(|e| e.downcast_ref::<std::io::Error>()?.raw_os_error());
        use std::io::ErrorKind::*;
        match io_kind {
            Some(TimedOut) => ProxyError::Timeout(detail),
            _ if errno.is_some_and(is_local_exhaustion) => ProxyError::OutOfResources(detail),
            _ if is_connect => ProxyError::Connect(detail),
            Some(ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof) => {
                ProxyError::Reset(detail)
            }
            _ if h2_ended => ProxyError::Reset(detail),
            _ if hyper
                .is_some_and(|h| h.is_incomplete_message() || h.is_canceled() || h.is_closed()) =>
            {
                ProxyError::Reset(detail)
            }
            // hyper says "too large" for too many fields as well as too many bytes.
            _ if hyper.is_some_and(hyper::Error::is_parse_too_large) => ProxyError::Protocol(
                format!("{detail} (over 100 header fields, or about 400 KiB)"),
            ),
            _ => ProxyError::Protocol(detail),
        }
    }

    /// The `kind` label, for failures of the upstream exchange.
    #[must_use]
    pub fn upstream_kind(&self) -> Option<UpstreamErrorKind> {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::MalformedBody(_)
            | ProxyError::NotImplemented(_)
            | ProxyError::ClientTimeout(_)
            | ProxyError::ClientClosed { .. }
            | ProxyError::NoUpstream
            | ProxyError::OutOfResources(_)
            | ProxyError::Unsupported(_) => None,
            ProxyError::Connect(_) => Some(UpstreamErrorKind::Connect),
            ProxyError::Timeout(_) => Some(UpstreamErrorKind::Timeout),
            ProxyError::Reset(_) => Some(UpstreamErrorKind::Reset),
            ProxyError::Protocol(_) => Some(UpstreamErrorKind::Protocol),
        }
    }

    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::MalformedBody(_)
            | ProxyError::ClientClosed { .. } => StatusCode::BAD_REQUEST,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::ClientTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::NoUpstream | ProxyError::OutOfResources(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Connect(_)
            | ProxyError::Reset(_)
            | ProxyError::Protocol(_)
            | ProxyError::Unsupported(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// The `error` field of the JSON body.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) | ProxyError::MalformedBody(_) => "bad_request",
            ProxyError::NotImplemented(_) => "not_implemented",
            ProxyError::ClientTimeout(_) => "client_timeout",
            ProxyError::ClientClosed { .. } => "client_closed",
            ProxyError::NoUpstream | ProxyError::OutOfResources(_) => "unavailable",
            ProxyError::Unsupported(_) | ProxyError::Protocol(_) => "protocol",
            ProxyError::Connect(_) => "connect",
            ProxyError::Timeout(_) => "timeout",
            ProxyError::Reset(_) => "reset",
        }
    }

    /// `{"error": kind, "version": name, "detail": text}` with the matching status.
    #[must_use]
    pub fn into_response(self, version: &str, in_flight: InFlight) -> Response<ResponseBody> {
        let body = serde_json::json!({
            "error": self.kind(),
            "version": version,
            "detail": self.to_string(),
        });
        let mut rsp = Response::new(ResponseBody::full(body.to_string(), in_flight));
        *rsp.status_mut() = self.status();
        rsp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        rsp
    }
}

/// Whether an I/O error's code says the proxy itself ran short: of file
/// descriptors (its own or the system's), or of memory for a socket. No
/// upstream is to blame, as nginx does not count a failed `socket()`
/// against a peer. (Not `EADDRNOTAVAIL`: it is also what an address the
/// host cannot reach at all gets, such as `[::1]` with IPv6 off.)
fn is_local_exhaustion(errno: i32) -> bool {
    matches!(
        errno,
        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
    )
}

/// An error and its causes, as one line. An upstream certificate that does
/// not name its upstream is told without the names, which are the
/// operator's business, not the client's (the connector logs them).
pub(super) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut next = Some(error);
    while let Some(cause) = next {
        if !text.is_empty() {
            text.push_str(": ");
        }
        if crate::upstream::connect::is_name_mismatch(cause) {
            text.push_str("invalid peer certificate: not valid for the upstream's name");
            break;
        }
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}
