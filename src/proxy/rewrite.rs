//! What the proxy checks and rewrites in the messages it passes on.
//!
//! Owns: refusing what must not reach an upstream (request framing that
//! could smuggle a second request, a transfer coding other than `chunked`,
//! `CONNECT`, a target of a host alone, with user info or of `*` but for
//! `OPTIONS`, and a missing,
//! repeated, empty or invalid `Host`), stripping hop-by-hop headers both ways
//! (and those named in `Connection`; from trailers too), the
//! upstream request (origin-form URI,
//! `Host`, joined cookies, version header, `x-forwarded-*`, a chunked
//! `GET` body kept, with the client's address as a [`Peer`]), a response's
//! framing headers (a `204`'s length dropped, a repeated one written
//! once), and reading the tokens header. Does not own: choosing
//! where to send (`routing`, `table`), what a failure looks like (`error`),
//! or the tunnel of an upgraded connection (`tunnel`).

use std::net::SocketAddr;

use http::header::{
    CONNECTION, CONTENT_LENGTH, COOKIE, Entry, HOST, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE,
    TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::Body;

use super::error::ProxyError;
use super::framing::AmbiguousFraming;
use crate::shadow::X_COHORT_SHADOW;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The hop-by-hop headers of RFC 9110 section 7.6.1, and the obsolete
/// `Keep-Alive` and `Proxy-Connection`. `Connection` comes first.
static HOP_BY_HOP: [&HeaderName; 8] = [
    &CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &TE,
    &TRANSFER_ENCODING,
    &UPGRADE,
    &PROXY_AUTHENTICATE,
    &PROXY_AUTHORIZATION,
];

/// Where the entries that are read, not only removed, are in [`HOP_BY_HOP`].
const CONNECTION_INDEX: usize = 0;
const TE_INDEX: usize = 3;
const TRANSFER_ENCODING_INDEX: usize = 4;

/// A client connection's address, with its IP rendered once for the
/// connection's requests (`x-forwarded-for`, the client-IP routing key):
/// formatting it per request showed in profiles.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    ip: HeaderValue,
}

impl Peer {
    #[must_use]
    pub fn new(addr: SocketAddr) -> Peer {
        // An IPv4 client of a dual-stack (`[::]`) listener arrives as
        // `::ffff:a.b.c.d`; it is the same client, with the same routing key
        // and `x-forwarded-for`, as on an IPv4 listener.
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        // An IP address renders as digits, hex, dots and colons: always a
        // valid header value.
        let ip = HeaderValue::try_from(addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Peer { addr, ip }
    }

    /// The client's IP address as text.
    #[must_use]
    pub fn ip(&self) -> &[u8] {
        self.ip.as_bytes()
    }
}

/// Refuses what must not reach an upstream: framing that two HTTP parsers
/// could read differently (a request smuggled past us inside another's
/// body), a target or `Host` that names the upstream's host two ways or
/// not at all, and `CONNECT`.
/// (hyper itself refuses malformed and oversized heads, and conflicting
/// `Content-Length` values, before a request gets here. It drops
/// `Content-Length` when `Transfer-Encoding` is present too, so that case is
/// caught on the raw bytes by the connection's guard, whose flag is `framing`.)
pub fn check_request<B>(req: &Request<B>, framing: &AmbiguousFraming) -> Result<(), ProxyError> {
    if let Some(reason) = framing.refusal() {
        return Err(ProxyError::BadRequest(reason));
    }
    // A tunnel to wherever the client names is a forward proxy's job; past
    // a 2xx, the bytes would reach the upstream unread (nginx refuses it too).
    if req.method() == Method::CONNECT {
        return Err(ProxyError::BadRequest("CONNECT is not forwarded"));
    }
    check_target(req)?;
    let headers = req.headers();
    if headers.contains_key(TRANSFER_ENCODING) {
        if headers.contains_key(CONTENT_LENGTH) {
            return Err(ProxyError::BadRequest(
                "a request must not carry both content-length and transfer-encoding",
            ));
        }
        // hyper decodes the chunked coding only; a body under another one
        // would reach the upstream still coded, with nothing saying so
        // (RFC 9112 section 6.1: 501 for a coding the server cannot decode).
        if !is_chunked_alone(headers) {
            return Err(ProxyError::NotImplemented(
                "a request body may be sent chunked, with no other transfer coding",
            ));
        }
    }
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next()
        && lengths.any(|other| other != first)
    {
        return Err(ProxyError::BadRequest("conflicting content-length headers"));
    }
    Ok(())
}

/// The request target and `Host`: two parsers that pick different hosts
/// route one request two ways (RFC 9112 section 3.2: 400 for no `Host`,
/// more than one, or an invalid one, in HTTP/1.1).
fn check_target<B>(req: &Request<B>) -> Result<(), ProxyError> {
    let uri = req.uri();
    // The asterisk form asks about the server as a whole, which only
    // OPTIONS does (RFC 9112 section 3.2.4); an origin-form path starts
    // with `/`.
    if uri.path() == "*" && req.method() != Method::OPTIONS {
        return Err(ProxyError::BadRequest(
            "a request target of * is only for OPTIONS",
        ));
    }
    if let Some(authority) = uri.authority() {
        // `GET host:port HTTP/1.1` (authority form) is for CONNECT alone
        // (RFC 9112 section 3.2.3); forwarded, it would name a host past
        // whatever checked `Host`.
        if uri.scheme().is_none() {
            return Err(ProxyError::BadRequest(
                "a request target of a host alone is only for CONNECT",
            ));
        }
        // RFC 9110 section 4.2.4: user info in an http(s) URI is an error.
        if authority.as_str().contains('@') {
            return Err(ProxyError::BadRequest(
                "a request target must not carry user info",
            ));
        }
    }
    let mut hosts = req.headers().get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err(ProxyError::BadRequest(
            "a request must not carry two host headers",
        )),
        (Some(host), None) if host.is_empty() => Err(ProxyError::BadRequest(
            "the host header is empty: an http URI names a host",
        )),
        (Some(host), None) if !is_host(host.as_bytes()) => Err(ProxyError::BadRequest(
            "the host header holds a character no host has",
        )),
        // Absolute form too (RFC 9112 section 3.2), as nginx has it.
        (None, _) if req.version() == Version::HTTP_11 => Err(ProxyError::BadRequest(
            "an HTTP/1.1 request must carry a host header",
        )),
        _ => Ok(()),
    }
}

/// Whether `value` is written in the characters of a `Host`: those of
/// RFC 3986's registered names, IPv6 literals and ports, so no user info,
/// path or spaces. (A character check only, as nginx's is: what the
/// upstream makes of the name is its own business.)
fn is_host(value: &[u8]) -> bool {
    value.iter().all(|&b| {
        matches!(b,
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9'
            | b'-' | b'.' | b'_' | b'~' | b'%' | b':' | b'[' | b']'
            | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=')
    })
}

/// Whether the request's transfer codings are `chunked` and nothing else
/// (hyper has refused any list that does not end in it).
fn is_chunked_alone(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty());
    codings
        .next()
        .is_some_and(|coding| coding.eq_ignore_ascii_case(b"chunked"))
        && codings.next().is_none()
}

/// Whether the client asks to switch protocols (WebSocket and other
/// `Upgrade`s). An upgrade to `h2c` is not passed on: which HTTP version
/// a connection speaks is each hop's own business (RFC 9113 dropped the
/// upgrade), so a request offering it alone goes on as plain HTTP/1.1, as
/// Envoy does, and one offering others too goes on without it.
#[must_use]
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req
            .headers()
            .get(UPGRADE)
            .is_some_and(|protocols| upgrade_tokens(protocols).any(|p| !is_h2c(p)))
        && connection_has(req.headers(), "upgrade")
}

/// The protocols an `Upgrade` value offers, in order.
fn upgrade_tokens(protocols: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    protocols
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|protocol| !protocol.is_empty())
}

fn is_h2c(protocol: &[u8]) -> bool {
    protocol.eq_ignore_ascii_case(b"h2c")
}

/// The `Upgrade` an upstream is sent: the client's without `h2c` (see
/// [`is_upgrade`]). Most name one protocol, and are passed on as they are.
fn upgrade_for_upstream(protocols: HeaderValue) -> HeaderValue {
    if !protocols.as_bytes().contains(&b',') {
        return protocols;
    }
    let kept: Vec<&[u8]> = upgrade_tokens(&protocols)
        .filter(|protocol| !is_h2c(protocol))
        .collect();
    // Tokens of a valid value, joined by ", ": valid too.
    HeaderValue::from_bytes(&kept.join(&b", "[..])).unwrap_or(protocols)
}

/// Turns a client request into the request for an upstream (also used for
/// the shadow's copies, so both follow the same header rules). The URI is
/// left in origin form (path and query): the client that sends it names the
/// upstream where its way of connecting needs it, so a request that moves
/// on to another upstream needs no change.
pub fn upstream_request<B: Body>(
    req: Request<B>,
    version_header: &HeaderName,
    version: &HeaderValue,
    peer: &Peer,
    tls: bool,
) -> Request<B> {
    let upgrade = is_upgrade(&req)
        .then(|| {
            req.headers()
                .get(UPGRADE)
                .cloned()
                .map(upgrade_for_upstream)
        })
        .flatten();
    let (mut parts, body) = req.into_parts();

    // HTTP/2 clients name the host in the URI, HTTP/1.1 clients in `Host`,
    // except in an absolute-form request line, whose authority replaces
    // `Host` (RFC 9112 section 3.2.2); for a client that names neither, the
    // upstream client names the upstream it connects to.
    let authority = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
    let host = match authority {
        Some(authority) => {
            parts.headers.insert(HOST, authority.clone());
            Some(authority)
        }
        None => parts.headers.get(HOST).cloned(),
    };
    if parts.version == Version::HTTP_2 {
        join_cookies(&mut parts.headers);
    }
    let stripped = strip_hop_by_hop(&mut parts.headers);
    let headers = &mut parts.headers;
    // A client that takes trailers gets them from this hop: the upstream
    // may send them (gRPC over HTTP/2 needs to be told).
    if stripped.accepts_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    // hyper sends a GET or HEAD whose body has no stated length with no
    // body at all, since such requests rarely carry one; a client that sent
    // one chunked (or over HTTP/2 without a length) means it to arrive.
    // (hyper drops the header again for an HTTP/2 upstream.)
    if matches!(parts.method, Method::GET | Method::HEAD)
        && !body.is_end_stream()
        && body.size_hint().exact().is_none()
    {
        headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
    match host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }
        // A request that names no host (HTTP/1.0 without `Host`, HTTP/2
        // without `:authority`): the client's own must not pass for the
        // proxy's, which upstreams trust to build links and redirects.
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
    append_forwarded_for(headers, peer);
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    headers.insert(version_header.clone(), version.clone());
    if let Some(upgrade) = upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, upgrade);
    }

    crate::upstream::origin_form(&mut parts.uri);
    parts.version = Version::HTTP_11;
    Request::from_parts(parts, body)
}

/// Strips hop-by-hop headers from an upstream response, keeping the
/// handshake headers of a `101 Switching Protocols`, and makes it the
/// proxy's own HTTP/1.1 response: an HTTP/1.0 upstream does not make the
/// client's connection HTTP/1.0, and so closed after it (as with nginx).
///
/// # Errors
///
/// A response body under a transfer coding other than `chunked` alone:
/// hyper decodes only that one, and with `Transfer-Encoding` stripped the
/// client would get, say, gzip bytes with nothing saying so (nginx answers
/// 502 too). A response with no body (to a `HEAD`, a `204` or `304`) may
/// name any coding: there is nothing to decode. A `101` that names no
/// protocol to switch to (RFC 9110 section 15.2.2): what follows it
/// could not be told apart from anything else.
pub fn downstream_response<B: Body>(mut rsp: Response<B>) -> Result<Response<B>, ProxyError> {
    *rsp.version_mut() = Version::HTTP_11;
    if rsp.headers().contains_key(TRANSFER_ENCODING)
        && !rsp.body().is_end_stream()
        && !is_chunked_alone(rsp.headers())
    {
        return Err(ProxyError::Protocol(
            "its body is sent under a transfer coding other than chunked".into(),
        ));
    }
    let upgrade = if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let named = rsp.headers().get(UPGRADE).cloned();
        if named.is_none() {
            return Err(ProxyError::Protocol(
                "a 101 Switching Protocols that names no protocol in Upgrade".into(),
            ));
        }
        named
    } else {
        None
    };
    let stripped = strip_hop_by_hop(rsp.headers_mut());
    // The body was read by its transfer coding, so a length sent beside it
    // is not the length of what follows; passed on, it would cut the body
    // short (RFC 9112 section 6.3: Transfer-Encoding overrides it).
    if stripped.transfer_encoding {
        rsp.headers_mut().remove(CONTENT_LENGTH);
    } else if rsp.status() == StatusCode::NO_CONTENT {
        // RFC 9110 section 8.6: a 204 has no length (an HTTP/2 client
        // resets the stream for one).
        rsp.headers_mut().remove(CONTENT_LENGTH);
    } else if let Some(once) = length_written_once(rsp.headers()) {
        rsp.headers_mut().insert(CONTENT_LENGTH, once);
    }
    if let Some(upgrade) = upgrade {
        rsp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        rsp.headers_mut().insert(UPGRADE, upgrade);
    }
    Ok(rsp)
}

/// The length that a `Content-Length` repeated names (`5, 5` on one line,
/// or on several), which hyper has checked are all the same; `None` for a
/// length written once, or none. Passed on as written, the repeats would
/// reach an HTTP/2 client as several fields, for which it resets the
/// stream, and a strict HTTP/1.1 client could not read the length at all.
fn length_written_once(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    let first = lengths.next()?.as_bytes();
    let comma = first.iter().position(|&b| b == b',');
    if comma.is_none() && lengths.next().is_none() {
        return None;
    }
    HeaderValue::from_bytes(first[..comma.unwrap_or(first.len())].trim_ascii()).ok()
}

/// The most tokens one response may report. No response spends four
/// billion tokens, so a larger value is junk; summed, it could wrap
/// `cohort_tokens_total` and the guardrails' token sums.
const MAX_TOKENS: u64 = u32::MAX as u64;

/// The numeric value of the tokens header, if set, numeric and at most
/// `MAX_TOKENS`; anything else is skipped.
#[must_use]
pub fn tokens(headers: &HeaderMap, name: Option<&HeaderName>) -> Option<u64> {
    let text = headers.get(name?)?.to_str().ok()?.trim();
    let tokens = text.parse::<u64>().ok().or_else(|| {
        let value = text.parse::<f64>().ok()?;
        // Finite and non-negative, so the saturating cast is the rounded value.
        (value.is_finite() && value >= 0.0).then(|| value.round() as u64)
    })?;
    (tokens <= MAX_TOKENS).then_some(tokens)
}

/// Removes from a message's trailers what may not travel in them: the
/// hop-by-hop fields, as from its head (an HTTP/2 peer would reset the
/// stream for one), and the framing and routing fields that RFC 9110
/// section 6.5.1 keeps out of trailers.
pub fn strip_trailers(trailers: &mut HeaderMap) {
    strip_hop_by_hop(trailers);
    trailers.remove(CONTENT_LENGTH);
    trailers.remove(HOST);
}

/// Removes the hop-by-hop headers (see [`HOP_BY_HOP`]), any header the
/// `Connection` header names, and the shadow marker: only the proxy marks a
/// copy, and a client's marker would make its real request look like one,
/// which upstreams may answer without side effects.
///
/// Finds them in one pass over the names first: most messages carry none,
/// or only `Connection: keep-alive`, and each removal costs a hash lookup.
fn strip_hop_by_hop(headers: &mut HeaderMap) -> Stripped {
    let mut present = [false; HOP_BY_HOP.len()];
    let mut shadow_marker = false;
    for name in headers.keys() {
        if let Some(index) = hop_by_hop_index(name) {
            present[index] = true;
        } else if name == X_COHORT_SHADOW {
            shadow_marker = true;
        }
    }
    if shadow_marker {
        headers.remove(&X_COHORT_SHADOW);
    }
    // Read before `Connection` is: a client sending `TE` names it there
    // (RFC 9110 section 10.1.4).
    let accepts_trailers = present[TE_INDEX] && accepts_trailers(headers);
    if present[CONNECTION_INDEX] {
        // Collected before any is removed; most `Connection` headers name
        // options only, and then nothing is allocated.
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // Options, not header names (`Keep-Alive` is in the list above).
            // `Host` is never a connection option (RFC 9110 section 7.6.1):
            // named, it would leave the upstream to be told its own address.
            .filter(|name| {
                !name.is_empty()
                    && !name.eq_ignore_ascii_case("close")
                    && !name.eq_ignore_ascii_case("keep-alive")
                    && !name.eq_ignore_ascii_case("host")
            })
            // A name that is not a valid header name matches nothing.
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (name, present) in HOP_BY_HOP.into_iter().zip(present) {
        if present {
            headers.remove(name);
        }
    }
    Stripped {
        transfer_encoding: present[TRANSFER_ENCODING_INDEX],
        accepts_trailers,
    }
}

/// Where `name` is in [`HOP_BY_HOP`]. A match on the name's text mostly
/// compares lengths: cheaper, for the dozen names of each message, than
/// comparing each name with every entry of the list.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => CONNECTION_INDEX,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "te" => TE_INDEX,
        "transfer-encoding" => TRANSFER_ENCODING_INDEX,
        "upgrade" => 5,
        "proxy-authenticate" => 6,
        "proxy-authorization" => 7,
        _ => return None,
    })
}

/// What [`strip_hop_by_hop`] found that framing depends on.
struct Stripped {
    transfer_encoding: bool,
    /// A request's `TE` accepted trailers.
    accepts_trailers: bool,
}

/// Whether a `TE` header accepts trailers.
fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
}

/// Joins the `cookie` fields an HTTP/2 client may send one per cookie into
/// the one field an HTTP/1.1 server expects (RFC 9113 section 8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let Entry::Occupied(mut cookies) = headers.entry(COOKIE) else {
        return;
    };
    if cookies.iter().nth(1).is_none() {
        return;
    }
    let values: Vec<&[u8]> = cookies.iter().map(HeaderValue::as_bytes).collect();
    let joined = values.join(&b"; "[..]);
    // Joined valid values, with a separator that is valid too.
    if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(joined)) {
        // Replaces every value with the one.
        cookies.insert(value);
    }
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Appends the peer to any `x-forwarded-for` chain the client sent.
fn append_forwarded_for(headers: &mut HeaderMap, peer: &Peer) {
    let mut sent = match headers.entry(&X_FORWARDED_FOR) {
        Entry::Vacant(none) => {
            none.insert(peer.ip.clone());
            return;
        }
        Entry::Occupied(sent) => sent,
    };
    // One buffer, handed to the header value without a copy.
    let mut chain = Vec::with_capacity(64);
    for value in sent.iter() {
        if let Ok(v) = value.to_str() {
            chain.extend_from_slice(v.trim().as_bytes());
            chain.extend_from_slice(b", ");
        }
    }
    chain.extend_from_slice(peer.ip());
    if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(chain)) {
        // Replaces every value the client sent with the one chain.
        sent.insert(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, "close, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn an_ipv4_client_of_a_dual_stack_listener_is_known_by_its_ipv4_address() {
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:4242".parse().unwrap();
        let peer = Peer::new(mapped);
        assert_eq!(peer.ip(), b"192.0.2.7");
        assert_eq!(peer.addr, "192.0.2.7:4242".parse().unwrap());
        let v6: SocketAddr = "[2001:db8::1]:4242".parse().unwrap();
        assert_eq!(Peer::new(v6).ip(), b"2001:db8::1");
    }

    #[test]
    fn host_named_as_a_connection_option_stays() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, "Host, x-secret".parse().unwrap());
        h.insert(HOST, "app.example".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), [HOST]);
    }

    #[test]
    fn a_response_under_a_coding_other_than_chunked_is_refused() {
        let response = |coding: &str| {
            Response::builder()
                .header(TRANSFER_ENCODING, coding)
                .header(CONTENT_LENGTH, "5")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    b"hello",
                )))
                .unwrap()
        };
        for coding in ["gzip, chunked", "gzip", "chunked, chunked", "identity"] {
            let error = downstream_response(response(coding)).expect_err(coding);
            assert!(
                matches!(error, ProxyError::Protocol(_)),
                "{coding}: {error}"
            );
        }
        let passed = downstream_response(response("Chunked")).expect("chunked alone");
        assert!(!passed.headers().contains_key(TRANSFER_ENCODING));
        assert!(!passed.headers().contains_key(CONTENT_LENGTH));
        // With no body (the answer to a HEAD) there is nothing to decode.
        let head = Response::builder()
            .header(TRANSFER_ENCODING, "gzip, chunked")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        assert!(downstream_response(head).is_ok());
    }

    #[test]
    fn every_connection_value_is_read_and_odd_tokens_are_skipped() {
        let mut h = HeaderMap::new();
        h.append(CONNECTION, "Keep-Alive, X-One".parse().unwrap());
        h.append(CONNECTION, "CLOSE, not a name, ,x-two".parse().unwrap());
        h.insert("x-one", "1".parse().unwrap());
        h.insert("x-two", "2".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn each_hop_by_hop_header_is_found_where_the_list_has_it() {
        for (index, name) in HOP_BY_HOP.into_iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(index), "{name}");
        }
        for name in [&HOST, &CONTENT_LENGTH, &X_COHORT_SHADOW, &X_FORWARDED_FOR] {
            assert_eq!(hop_by_hop_index(name), None, "{name}");
        }
    }

    #[test]
    fn transfer_encoding_is_where_its_index_says() {
        assert_eq!(HOP_BY_HOP[TRANSFER_ENCODING_INDEX], TRANSFER_ENCODING);
        assert_eq!(HOP_BY_HOP[TE_INDEX], TE);
        assert_eq!(HOP_BY_HOP[CONNECTION_INDEX], CONNECTION);
        let mut h = HeaderMap::new();
        h.insert(TRANSFER_ENCODING, "chunked".parse().unwrap());
        assert!(strip_hop_by_hop(&mut h).transfer_encoding);
        assert!(!strip_hop_by_hop(&mut h).transfer_encoding);
    }

    #[test]
    fn a_message_without_hop_by_hop_headers_is_left_alone() {
        let mut h = HeaderMap::new();
        h.insert("content-type", "text/plain".parse().unwrap());
        h.append("x-many", "1".parse().unwrap());
        h.append("x-many", "2".parse().unwrap());
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

    #[test]
    fn forwarded_for_is_the_peer_when_the_client_sent_none() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &Peer::new("[2001:db8::1]:443".parse().unwrap()));
        assert_eq!(h[&X_FORWARDED_FOR], "2001:db8::1");
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, "1.1.1.1".parse().unwrap());
        h.append(&X_FORWARDED_FOR, "2.2.2.2".parse().unwrap());
        append_forwarded_for(&mut h, &Peer::new("127.0.0.1:5".parse().unwrap()));
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 127.0.0.1");
    }

    #[test]
    fn tokens_are_numeric_or_skipped() {
        let name = HeaderName::from_static("x-tokens");
        let mut h = HeaderMap::new();
        assert_eq!(tokens(&h, Some(&name)), None);
        h.insert(&name, "42".parse().unwrap());
        assert_eq!(tokens(&h, Some(&name)), Some(42));
        assert_eq!(tokens(&h, None), None);
        h.insert(&name, "7.6".parse().unwrap());
        assert_eq!(tokens(&h, Some(&name)), Some(8));
        h.insert(&name, "many".parse().unwrap());
        assert_eq!(tokens(&h, Some(&name)), None);
        h.insert(&name, "-3".parse().unwrap());
        assert_eq!(tokens(&h, Some(&name)), None);
        h.insert(&name, "4294967295".parse().unwrap());
        assert_eq!(tokens(&h, Some(&name)), Some(4_294_967_295));
        for junk in ["4294967296", "1e30", "18446744073709551615"] {
            h.insert(&name, junk.parse().unwrap());
            assert_eq!(tokens(&h, Some(&name)), None, "{junk}");
        }
    }
}
