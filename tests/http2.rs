//! HTTP/2 (SPEC section 9, with sections 1 and 2 over HTTP/2): clients with
//! prior knowledge on a plain listener, `h2c://` and `https://` upstreams,
//! gRPC trailers, real HTTP/2 tools, and malformed HTTP/2 input.
//!
//! Owns: sticky routing, version tags, forwarded headers, streaming,
//! metrics and rollback for HTTP/2 clients, and their idle connections
//! closed at the keep-alive timeout, or at the header read timeout if no
//! stream was opened (dropped if the client stalls the close), while a
//! stream that crossed the `GOAWAY` is answered; a drain not held up by a
//! client that stalls the close; a stream
//! its client stops reading reset at the send timeout, and one it reads
//! slowly but steadily not; upstreams reached over h2c and over
//! TLS with a test CA (`upstream.ca_file`), and kept healthy by probes
//! that speak their protocol; a gRPC-style response's trailers reaching an
//! HTTP/2 client, also on a retry from a refused HTTP/1.1 upstream; curl, nghttp and h2load with prior knowledge; a bad
//! preface, an oversized header block and a stream reset mid-body, each
//! refused without a panic while another connection carries on. Does not
//! own: the TLS listener and its certificate (`tests/tls.rs`).

mod support;
mod tls_support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};

use bytes::Bytes;
use cohort::serve::Server;
use cohort::state::Source;
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{
    Backend, CANARY, Http, STABLE, SlowBackend, SseBackend, cohort, eventually, eventually_async,
    key_on, start_cohort, within,
};
use tls_support::{
    ACK, BigH2Backend, CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, H2, H2Backend, HEADERS,
    PREFACE, Pki, RST_STREAM, RawH2, RawH2Upstream, SETTINGS, StreamTurn, frame, get, h2c,
    listen_tls, request_block, require, run, seen_version, send_h2, tls_client, tls_connect,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const SALT: &str = "h2-tests";

fn routing() -> String {
    format!("[routing]\nsalt = \"{SALT}\"\n")
}

fn url(server: &Server, path: &str) -> String {
    format!("http://{}{path}", server.proxy_addr())
}

/// Starts Cohort from [`named_config`].
async fn cohort_named(
    stable: (&str, &[String]),
    canary: Option<(&str, &[String], f64)>,
    extra: &str,
) -> Server {
    start_cohort(&named_config(stable, canary, extra)).await
}

/// `support::config` with the versions renamed so that this test's metric
/// series are its own.
fn named_config(
    stable: (&str, &[String]),
    canary: Option<(&str, &[String], f64)>,
    extra: &str,
) -> String {
    let list = |addrs: &[String]| {
        addrs
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut toml = support::config(&[], None, extra).replace(
        &format!("name = \"{STABLE}\"\nupstreams = []"),
        &format!("name = \"{}\"\nupstreams = [{}]", stable.0, list(stable.1)),
    );
    if let Some((name, upstreams, weight)) = canary {
        toml.push_str(&format!(
            "\n[versions.canary]\nname = \"{name}\"\nupstreams = [{}]\nweight = {weight}\n",
            list(upstreams)
        ));
    }
    toml
}

/// The sum of `name`'s series whose labels include every one of `labels`.
async fn metric(server: &Server, name: &str, labels: &[(&str, &str)]) -> f64 {
    let reply = Http::new(server.admin_addr()).get("/metrics", &[]).await;
    let text = String::from_utf8_lossy(&reply.body).into_owned();
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .filter(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------
// The data path over HTTP/2

#[tokio::test]
async fn prior_knowledge_clients_are_routed_tagged_and_forwarded() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let server = cohort(&[stable.addr], Some((&[canary.addr], 50.0)), &routing()).await;
    let mut h2 = h2c(server.proxy_addr()).await;
    for i in 0..10 {
        let key = format!("h2-user-{i}");
        let expected = support::predicted(SALT, 50.0, &key);
        let (version, reply) = send_h2(
            &mut h2,
            get(&url(&server, "/chat?x=1"), &[("x-user-id", &key)]),
        )
        .await;
        assert_eq!(version, Version::HTTP_2);
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.version(), expected, "key {key}");
        assert_eq!(reply.backend(), expected, "key {key}");
        assert_eq!(reply.json()["uri"], "/chat?x=1");
        assert_eq!(reply.seen("x-agent-version"), [expected]);
        assert_eq!(reply.seen("x-forwarded-for"), ["127.0.0.1"]);
        assert_eq!(reply.seen("x-forwarded-proto"), ["http"]);
        assert_eq!(
            reply.seen("x-forwarded-host"),
            [server.proxy_addr().to_string()]
        );
        assert_eq!(reply.seen("host"), [server.proxy_addr().to_string()]);
    }
    // A keyless HTTP/2 client gets the fallback cookie, without Secure on a plain listener.
    let (_, reply) = send_h2(&mut h2, get(&url(&server, "/"), &[])).await;
    let cookies = reply.set_cookies();
    assert_eq!(cookies.len(), 1, "{reply:?}");
    assert!(!cookies[0].contains("Secure"), "{cookies:?}");
    // Cookies sent one per field reach an HTTP/1.1 upstream as one field.
    let (_, reply) = send_h2(
        &mut h2,
        get(
            &url(&server, "/"),
            &[
                ("cookie", "a=1"),
                ("cookie", "cohort_id=kept"),
                ("cookie", "b=2"),
            ],
        ),
    )
    .await;
    assert_eq!(
        reply.seen("cookie"),
        ["a=1; cohort_id=kept; b=2"],
        "{reply:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_stream_streams_and_rollback_moves_the_next_request_over_http2() {
    let stable = Backend::start(STABLE).await;
    let canary = SseBackend::start(CANARY).await;
    let server = cohort(&[stable.addr], Some((&[canary.addr], 50.0)), &routing()).await;
    let key = key_on(SALT, 50.0, CANARY, "h2-stream");
    let mut h2 = h2c(server.proxy_addr()).await;

    let mut body = open_canary_events(&mut h2, &server, &key).await;
    let first = within("the first event", body.frame())
        .await
        .expect("a frame")
        .expect("a good frame")
        .into_data()
        .expect("data");
    // The first event arrives while the second is not even sent: nothing is buffered whole.
    assert_eq!(&first[..], SseBackend::FIRST.as_bytes());
    assert!(!canary.second_sent());

    // Rolled back: the same user's next request, on the same connection, goes to stable.
    server
        .control()
        .rollback("test", Source::Api)
        .expect("a rollback");
    let (_, reply) = send_h2(&mut h2, get(&url(&server, "/"), &[("x-user-id", &key)])).await;
    assert_eq!(reply.version(), STABLE);
    assert_eq!(reply.backend(), STABLE);

    // The canary stream drains (the default) to its end.
    canary.finish(body).await;
    server.shutdown().await;
}

/// An upstream's trailers reach an HTTP/2 client without the hop-by-hop
/// and framing fields it put in them, as its head would (h2 resets a
/// stream whose trailers carry a connection-specific field).
#[tokio::test]
async fn trailers_reach_an_http2_client_without_hop_by_hop_fields() {
    let upstream = support::raw_upstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n\
          5\r\nhello\r\n0\r\nX-Sum: 1\r\nConnection: close\r\nContent-Length: 5\r\n\r\n",
    )
    .await;
    let server = cohort(&[upstream], None, &routing()).await;
    let mut h2 = h2c(server.proxy_addr()).await;
    h2.ready().await.expect("an open connection");
    let rsp = within(
        "the response",
        h2.send_request(get(&url(&server, "/"), &[("te", "trailers")])),
    )
    .await
    .expect("a response");
    let whole = within("the body and its trailers", rsp.into_body().collect())
        .await
        .expect("the stream ends cleanly");
    let trailers = whole.trailers().cloned().expect("trailers");
    assert_eq!(trailers.get("x-sum").map(|v| v.as_bytes()), Some(&b"1"[..]));
    assert!(trailers.get("connection").is_none(), "{trailers:?}");
    assert!(trailers.get("content-length").is_none(), "{trailers:?}");
    assert_eq!(&whole.to_bytes()[..], b"hello");
    server.shutdown().await;
}

/// What an HTTP/2 client gets through Cohort from an HTTP/1.1 upstream
/// that answers `answer`: the head, and the whole body of a stream that
/// must end cleanly.
async fn through_to_http2(answer: &'static [u8]) -> (http::response::Parts, Bytes) {
    let upstream = support::raw_upstream(answer).await;
    let server = cohort(&[upstream], None, &routing()).await;
    let mut h2 = h2c(server.proxy_addr()).await;
    h2.ready().await.expect("an open connection");
    let rsp = within(
        "the response",
        h2.send_request(get(&url(&server, "/"), &[])),
    )
    .await
    .expect("a response, not a reset stream");
    let (head, body) = rsp.into_parts();
    let whole = within("the end of the stream", body.collect())
        .await
        .expect("the stream ends cleanly");
    server.shutdown().await;
    (head, whole.to_bytes())
}

/// An upstream's 204 that names a length reaches an HTTP/2 client
/// without it: RFC 9110 gives a 204 none, and the client would reset the
/// stream for one.
#[tokio::test]
async fn a_204_with_a_length_reaches_an_http2_client_without_it() {
    let (head, body) =
        through_to_http2(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n").await;
    assert_eq!(head.status, 204);
    assert!(head.headers.get("content-length").is_none(), "{head:?}");
    assert!(body.is_empty());
}

/// A length an upstream repeats on two field lines (RFC 9110 section 8.6
/// reads it as `5, 5`) reaches an HTTP/2 client once: the client would
/// reset the stream for a repeated `content-length`.
#[tokio::test]
async fn a_length_repeated_on_two_lines_reaches_an_http2_client_once() {
    let (head, body) =
        through_to_http2(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello")
            .await;
    assert_eq!(head.status, 200);
    let lengths: Vec<_> = head.headers.get_all("content-length").iter().collect();
    assert_eq!(lengths, ["5"], "{head:?}");
    assert_eq!(body, "hello");
}

/// Opens `/events` for `key`, a canary user, on `h2`: the stream's body,
/// once its head says the canary serves it.
async fn open_canary_events(h2: &mut H2, server: &Server, key: &str) -> Incoming {
    h2.ready().await.expect("an open connection");
    let rsp = within(
        "the stream's head",
        h2.send_request(get(&url(server, "/events"), &[("x-user-id", key)])),
    )
    .await
    .expect("a response");
    assert_eq!(rsp.headers()["x-agent-version"], CANARY);
    rsp.into_body()
}

/// With `on_rollback = "close"`, a rollback resets the canary's open
/// HTTP/2 stream with `CANCEL`, a deliberate cut, not the `INTERNAL_ERROR`
/// of a failure; the connection and its other streams go on.
#[tokio::test]
async fn a_close_rollback_cancels_the_canarys_http2_stream() {
    let stable = Backend::start(STABLE).await;
    let canary = SseBackend::start(CANARY).await;
    let extra = format!("{}on_rollback = \"close\"\n", routing());
    let server = cohort(&[stable.addr], Some((&[canary.addr], 50.0)), &extra).await;
    let key = key_on(SALT, 50.0, CANARY, "h2-cancel");
    let mut h2 = h2c(server.proxy_addr()).await;
    let mut body = open_canary_events(&mut h2, &server, &key).await;
    within("the first event", body.frame())
        .await
        .expect("a frame")
        .expect("a good frame");

    server
        .control()
        .rollback("test", Source::Api)
        .expect("a rollback");
    let cut = within("the cut", body.frame())
        .await
        .expect("an error, not the end")
        .expect_err("the stream is cut");
    let reason = std::iter::successors(Some(&cut as &dyn std::error::Error), |e| e.source())
        .find_map(|e| e.downcast_ref::<h2::Error>())
        .and_then(h2::Error::reason);
    assert_eq!(reason, Some(h2::Reason::CANCEL), "{cut:?}");
    let (_, reply) = send_h2(&mut h2, get(&url(&server, "/"), &[("x-user-id", &key)])).await;
    assert_eq!(reply.version(), STABLE);
    server.shutdown().await;
}

/// Starts Cohort in front of `stable` with `listen_key` (a `key = value`
/// line) added to its `[listen]` section.
async fn cohort_listening_with(stable: SocketAddr, listen_key: &str) -> Server {
    let toml = support::with_listen_keys(&support::config(&[stable], None, &routing()), listen_key);
    start_cohort(&toml).await
}

/// Starts Cohort in front of `stable` with a 1 s keep-alive timeout.
async fn cohort_with_short_keepalive(stable: SocketAddr) -> Server {
    cohort_listening_with(stable, "keepalive_timeout = \"1s\"").await
}

/// Opens a raw HTTP/2 connection that, past its SETTINGS, sends nothing
/// and answers nothing (not even the ping h2 waits on before its last
/// GOAWAY), and checks that the proxy sends a GOAWAY and then closes it.
async fn assert_a_silent_client_is_sent_goaway_and_closed(server: &Server) {
    let mut raw = RawH2::open(server.proxy_addr()).await;
    let mut kinds = Vec::new();
    while let Some(frame) = raw.next_frame().await {
        kinds.push(frame.kind);
    }
    assert!(kinds.contains(&GOAWAY), "{kinds:?}");
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_keepalive_timeout() {
    let backend = Backend::start(STABLE).await;
    let server = cohort_with_short_keepalive(backend.addr).await;
    let mut h2 = h2c(server.proxy_addr()).await;
    let (_, reply) = send_h2(&mut h2, get(&url(&server, "/"), &[("x-user-id", "a")])).await;
    assert_eq!(reply.status, 200);
    eventually("the idle connection is closed", || h2.is_closed()).await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_idle_http2_client_that_ignores_the_goaway_is_dropped() {
    let backend = Backend::start(STABLE).await;
    let server = cohort_with_short_keepalive(backend.addr).await;
    // The idle close cannot finish: the grace period ends it instead.
    assert_a_silent_client_is_sent_goaway_and_closed(&server).await;
    server.shutdown().await;
}

/// The PING frame's type (RFC 9113 section 6.7).
const PING: u8 = 0x6;

#[tokio::test]
async fn a_stream_that_crosses_the_idle_goaway_is_answered_however_long_it_takes() {
    let slow = SlowBackend::start(STABLE).await;
    let server = cohort_with_short_keepalive(slow.addr).await;
    let mut raw = RawH2::open(server.proxy_addr()).await;
    // The idle close begins: a GOAWAY that still takes streams, and a PING.
    raw.until(|f| f.kind == GOAWAY)
        .await
        .expect("the idle connection's first GOAWAY");
    // A request that crossed it, sent before the PING is answered.
    let block = request_block(
        Method::GET,
        &server.proxy_addr().to_string(),
        "/slow",
        &[("x-user-id", "a")],
    );
    raw.write(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &block))
        .await;
    let ping = raw
        .until(|f| f.kind == PING && f.flags & ACK == 0)
        .await
        .expect("the GOAWAY's PING");
    raw.write(&frame(PING, ACK, 0, &ping.payload)).await;
    eventually("the request at the upstream", || slow.hits() == 1).await;
    // Held past the grace a connection told to close has with no stream
    // open: the point of the test, not a wait for anything.
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    slow.release();
    let answer = raw
        .until(|f| f.stream == 1 && (f.kind == HEADERS || f.kind == RST_STREAM))
        .await;
    assert!(
        answer.as_ref().is_some_and(|f| f.kind == HEADERS),
        "the stream was not answered: {answer:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_drain_does_not_wait_on_an_http2_client_that_ignores_the_goaway() {
    let backend = Backend::start(STABLE).await;
    let toml = support::config(&[backend.addr], None, &routing())
        .replace("drain_timeout = \"10s\"", "drain_timeout = \"60s\"");
    let server = start_cohort(&toml).await;
    // One request answered whole, then a client that reads nothing more
    // and so never answers the drain's PING.
    let mut raw = RawH2::open(server.proxy_addr()).await;
    let block = request_block(
        Method::GET,
        &server.proxy_addr().to_string(),
        "/",
        &[("x-user-id", "a")],
    );
    raw.write(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &block))
        .await;
    raw.until(|f| f.stream == 1 && f.flags & END_STREAM != 0)
        .await
        .expect("the answer");
    // Nothing is open: the grace, not the drain timeout, bounds the wait.
    within("the drain", server.shutdown()).await;
    drop(raw);
}

#[tokio::test]
async fn an_http2_connection_that_opens_no_stream_is_closed_at_the_header_read_timeout() {
    let backend = Backend::start(STABLE).await;
    // The keep-alive timeout (75 s) is far past the test's deadline.
    let server = cohort_listening_with(backend.addr, "header_read_timeout = \"1s\"").await;
    assert_a_silent_client_is_sent_goaway_and_closed(&server).await;
    server.shutdown().await;
}

/// Sends `req` on `h2` and returns the response once its head is in.
async fn response_head(h2: &mut H2, req: Request<Full<Bytes>>) -> http::Response<Incoming> {
    h2.ready().await.expect("an open connection");
    within("a response head", h2.send_request(req))
        .await
        .expect("a response")
}

/// Opens a stream on `h2`: a `GET` of `path` for user `a`, up to its
/// response head.
async fn open_stream(h2: &mut H2, server: &Server, path: &str) -> http::Response<Incoming> {
    response_head(h2, get(&url(server, path), &[("x-user-id", "a")])).await
}

/// Asserts that the connection still opens a stream (then dropped).
async fn assert_opens_a_stream(h2: &mut H2, server: &Server, path: &str) {
    let rsp = open_stream(h2, server, path).await;
    assert_eq!(rsp.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_open_stream_keeps_its_http2_connection_past_the_keepalive_timeout() {
    let sse = SseBackend::start(STABLE).await;
    let server = cohort_with_short_keepalive(sse.addr).await;
    let mut h2 = h2c(server.proxy_addr()).await;
    let mut body = open_stream(&mut h2, &server, "/events").await.into_body();
    within("the first event", body.frame()).await;

    // Two idle connections opened one after the other close in turn: by
    // then the stream has sent nothing for well over the timeout.
    for _ in 0..2 {
        let idle = h2c(server.proxy_addr()).await;
        eventually("an idle connection is closed", || idle.is_closed()).await;
    }
    // Not sent a GOAWAY: it still takes new streams.
    assert_opens_a_stream(&mut h2, &server, "/events").await;
    sse.finish(body).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_stream_whose_client_reads_nothing_is_reset_at_the_send_timeout() {
    let endless = support::EndlessBackend::start().await;
    let server = cohort_listening_with(endless.addr, "send_timeout = \"1s\"").await;
    let mut h2 = h2c(server.proxy_addr()).await;
    // The client takes the head and reads nothing of the body, so it never
    // opens the stream's flow-control window again once the first 2 MiB
    // (hyper's window) are in. The connection itself carries on.
    let held = open_stream(&mut h2, &server, "/endless").await;
    assert_eq!(held.status(), StatusCode::OK);
    eventually("the upstream's body is dropped", || endless.dropped() == 1).await;
    // What came before the reset can still be read, and then the stream fails.
    let end = within("the rest of the stream", held.into_body().collect()).await;
    assert!(end.is_err(), "the stream ended cleanly");
    // Only the stream was reset: the connection takes another.
    assert_opens_a_stream(&mut h2, &server, "/endless").await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_stream_whose_client_reads_slowly_but_steadily_is_not_reset() {
    let bulk = support::BulkBackend::start().await;
    let server = cohort_listening_with(bulk.addr, "send_timeout = \"1s\"").await;
    // Windows of 64 KiB: the proxy runs at most that far ahead of the
    // client, which reads a frame (16 KiB at most) every 50 ms, about
    // 320 KB/s. Each frame moves well within the send timeout, while one
    // upstream read of a few hundred KiB would take longer to get through.
    let io = TcpStream::connect(server.proxy_addr())
        .await
        .expect("connect");
    let (mut h2, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(64 << 10)
        .initial_connection_window_size(64 << 10)
        .handshake(TokioIo::new(io))
        .await
        .expect("an HTTP/2 handshake");
    tokio::spawn(conn);
    let mut body = open_stream(&mut h2, &server, "/bulk").await.into_body();
    let mut read = 0;
    while read < 1 << 20 {
        let frame = within("the next frame", body.frame())
            .await
            .expect("the stream is open")
            .expect("a frame, not a reset stream");
        read += frame.data_ref().map_or(0, Bytes::len);
        // The client's pace, not a wait for anything.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(body);
    server.shutdown().await;
}

#[tokio::test]
async fn a_stream_whose_upstream_is_quiet_for_longer_than_the_send_timeout_is_not_reset() {
    let sse = SseBackend::start(STABLE).await;
    let server = cohort_listening_with(sse.addr, "send_timeout = \"200ms\"").await;
    let mut h2 = h2c(server.proxy_addr()).await;
    let mut body = open_stream(&mut h2, &server, "/events").await.into_body();
    let first = within("the first event", body.frame())
        .await
        .expect("the stream is open")
        .expect("a good frame");
    assert_eq!(
        first.data_ref().expect("a data frame"),
        SseBackend::FIRST.as_bytes()
    );
    // Seven send timeouts without a byte from the upstream: the silence is
    // the point of the test, not a wait for anything. The client reads all
    // along, so no frame waits on it.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    sse.finish(body).await;
    server.shutdown().await;
}

#[tokio::test]
async fn http2_requests_are_counted_per_version() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let server = cohort_named(
        ("h2-metrics-stable", &[stable.addr.to_string()]),
        Some(("h2-metrics-canary", &[canary.addr.to_string()], 50.0)),
        &routing(),
    )
    .await;
    let on_canary = key_on(SALT, 50.0, CANARY, "h2-metrics");
    let on_stable = key_on(SALT, 50.0, STABLE, "h2-metrics");
    let mut h2 = h2c(server.proxy_addr()).await;
    for _ in 0..3 {
        send_h2(
            &mut h2,
            get(&url(&server, "/"), &[("x-user-id", &on_canary)]),
        )
        .await;
    }
    send_h2(
        &mut h2,
        get(&url(&server, "/"), &[("x-user-id", &on_stable)]),
    )
    .await;

    let canary_200 = [("version", "h2-metrics-canary"), ("code", "200")];
    let stable_200 = [("version", "h2-metrics-stable"), ("code", "200")];
    assert_eq!(
        metric(&server, "cohort_requests_total", &canary_200).await,
        3.0
    );
    assert_eq!(
        metric(&server, "cohort_requests_total", &stable_200).await,
        1.0
    );
    let idle = [("version", "h2-metrics-canary")];
    assert_eq!(
        metric(&server, "cohort_requests_in_flight", &idle).await,
        0.0
    );
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Upstreams over h2c and TLS

#[tokio::test]
async fn an_h2c_upstream_is_spoken_to_over_http2() {
    let backend = H2Backend::h2c(STABLE).await;
    let server = cohort_named((STABLE, &[format!("h2c://{}", backend.addr)]), None, "").await;
    // An HTTP/1.1 client and an HTTP/2 client alike.
    let reply = Http::new(server.proxy_addr()).get("/one", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.backend(), STABLE);
    assert_eq!(reply.version(), STABLE);
    assert_eq!(seen_version(&reply), "HTTP/2.0");
    assert_eq!(reply.seen("x-agent-version"), [STABLE]);
    assert_eq!(reply.seen("x-forwarded-proto"), ["http"]);
    // `:authority` names the upstream; a `host` beside it that differs is
    // refused by servers such as nginx. The client's goes in x-forwarded-host.
    assert_eq!(reply.seen("host"), Vec::<String>::new(), "{reply:?}");
    assert_eq!(
        reply.seen("x-forwarded-host"),
        [server.proxy_addr().to_string()]
    );

    let mut h2 = h2c(server.proxy_addr()).await;
    let (_, reply) = send_h2(&mut h2, get(&url(&server, "/two"), &[])).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(seen_version(&reply), "HTTP/2.0");
    assert_eq!(backend.hits(), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn an_https_upstream_is_reached_with_the_configured_ca_only() {
    let pki = Pki::new();
    let backend = H2Backend::tls(STABLE, &pki.leaf("upstream")).await;
    let upstream = format!("https://127.0.0.1:{}", backend.addr.port());
    let ca = format!("[upstream]\nca_file = {:?}\n", pki.ca);
    let server = cohort_named((STABLE, std::slice::from_ref(&upstream)), None, &ca).await;
    let reply = Http::new(server.proxy_addr()).get("/secure", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.backend(), STABLE);
    assert_eq!(reply.version(), STABLE);
    // ALPN chose HTTP/2 on the way to the upstream, named by `:authority` alone.
    assert_eq!(seen_version(&reply), "HTTP/2.0");
    assert_eq!(reply.seen("host"), Vec::<String>::new(), "{reply:?}");
    assert_eq!(backend.hits(), 1);
    server.shutdown().await;

    // Without the test CA the upstream's certificate is not trusted.
    let server = cohort_named((STABLE, &[upstream]), None, "").await;
    let reply = Http::new(server.proxy_addr()).get("/secure", &[]).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{reply:?}");
    assert_eq!(reply.json()["error"], "connect");
    assert_eq!(reply.version(), STABLE);
    assert_eq!(backend.hits(), 1);
    server.shutdown().await;
}

/// A self-signed certificate marked as a CA (`openssl req -x509` makes
/// them so), named in `upstream.ca_file`, is taken as nginx and curl take
/// it; it must still name the upstream.
#[tokio::test]
async fn a_self_signed_ca_certificate_in_the_ca_file_is_taken() {
    let pki = Pki::new();
    let own = pki.self_signed_ca("own", &["localhost", "127.0.0.1"]);
    let elsewhere = pki.self_signed_ca("elsewhere", &["elsewhere.example"]);
    let other = pki.self_signed_ca("other", &["localhost", "127.0.0.1"]);
    let backend = H2Backend::tls(STABLE, &own).await;
    let misnamed = H2Backend::tls(STABLE, &elsewhere).await;
    let cases = [
        (&own, "127.0.0.1", &backend, StatusCode::OK),
        (&own, "localhost", &backend, StatusCode::OK),
        // In the file, but naming another host.
        (&elsewhere, "127.0.0.1", &misnamed, StatusCode::BAD_GATEWAY),
        // Of the same kind, but not in the file.
        (&other, "127.0.0.1", &backend, StatusCode::BAD_GATEWAY),
    ];
    for (ca_file, host, upstream, status) in cases {
        let ca = format!("[upstream]\nca_file = {:?}\n", ca_file.cert);
        let upstream = format!("https://{host}:{}", upstream.addr.port());
        let server = cohort_named((STABLE, std::slice::from_ref(&upstream)), None, &ca).await;
        let reply = Http::new(server.proxy_addr()).get("/secure", &[]).await;
        assert_eq!(reply.status, status, "{upstream}: {reply:?}");
        server.shutdown().await;
    }
    assert_eq!(backend.hits(), 2);
    assert_eq!(misnamed.hits(), 0);
}

/// An upstream certificate that does not name its upstream fails the
/// request without the client being told the names: the address the proxy
/// asked for, and those the certificate holds.
#[tokio::test]
async fn a_certificate_for_another_name_is_not_described_to_the_client() {
    let pki = Pki::new();
    let leaf = pki.leaf_for("internal", &["billing.internal.example"]);
    let backend = H2Backend::tls(STABLE, &leaf).await;
    let upstream = format!("https://127.0.0.1:{}", backend.addr.port());
    let ca = format!("[upstream]\nca_file = {:?}\n", pki.ca);
    let server = cohort_named((STABLE, &[upstream]), None, &ca).await;
    let reply = Http::new(server.proxy_addr()).get("/secure", &[]).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{reply:?}");
    assert_eq!(reply.json()["error"], "connect");
    let detail = reply.json()["detail"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        detail.contains("not valid for the upstream's name"),
        "{detail}"
    );
    assert!(!detail.contains("internal.example"), "{detail}");
    assert!(!detail.contains("127.0.0.1"), "{detail}");
    assert_eq!(backend.hits(), 0);
    server.shutdown().await;
}

/// An upstream that accepts TCP connections and holds them open, never
/// answering a byte (a TLS ClientHello included); returns its address and
/// how many connections it has accepted.
async fn accepts_and_says_nothing() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("an address");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&accepted);
    tokio::spawn(async move {
        // Kept, unread, until the test's runtime ends.
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    (addr, accepted)
}

/// A TLS handshake the upstream never answers is bounded by
/// `upstream.connect_timeout`, as the TCP connect is (and as nginx's
/// `proxy_connect_timeout` bounds its SSL handshake): 504, rather than
/// holding the request until `upstream.response_timeout`, which is set
/// far past the client's deadline here.
#[tokio::test]
async fn an_https_upstream_that_never_answers_the_tls_handshake_times_out_at_the_connect_timeout() {
    let (addr, accepted) = accepts_and_says_nothing().await;
    let upstream = format!("https://127.0.0.1:{}", addr.port());
    // No probe before the test ends: the request is what meets the upstream.
    let extra = "[upstream]\nconnect_timeout = \"300ms\"\nresponse_timeout = \"30s\"\n\n\
                 [health]\ninterval = \"1h\"\neject_after_errors = 1000\n";
    let server = cohort_named((STABLE, &[upstream]), None, extra).await;
    let reply = Http::new(server.proxy_addr()).get("/stalled", &[]).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{reply:?}");
    assert_eq!(reply.json()["error"], "timeout", "{reply:?}");
    assert!(
        reply.json()["detail"]
            .as_str()
            .is_some_and(|d| d.contains("TLS handshake")),
        "{reply:?}"
    );
    assert_eq!(reply.version(), STABLE);
    // The TCP connect succeeded: it was the handshake that stalled.
    assert!(accepted.load(Ordering::SeqCst) >= 1);
    server.shutdown().await;
}

/// Sends an `Upgrade: echo` request as raw bytes and returns the
/// connection with the response head read.
async fn upgrade(proxy: std::net::SocketAddr) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(proxy).await.expect("connect");
    let request = "GET /ws HTTP/1.1\r\nHost: agents.example\r\nConnection: upgrade\r\n\
                   Upgrade: echo\r\n\r\n";
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the upgrade");
    let head = support::read_head(&mut stream).await;
    (stream, head)
}

#[tokio::test]
async fn an_upgrade_reaches_an_https_upstream_over_http1_and_is_refused_for_h2c() {
    // The upstream offers HTTP/2 too; an upgrade needs HTTP/1.1 to it.
    let pki = Pki::new();
    let backend = H2Backend::tls(STABLE, &pki.leaf("upstream")).await;
    let upstream = format!("https://127.0.0.1:{}", backend.addr.port());
    let ca = format!("[upstream]\nca_file = {:?}\n", pki.ca);
    let server = cohort_named((STABLE, &[upstream]), None, &ca).await;
    let (mut stream, head) = upgrade(server.proxy_addr()).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream.write_all(b"ping").await.expect("write through");
    let mut echoed = [0u8; 4];
    within("the echo", stream.read_exact(&mut echoed))
        .await
        .expect("read the echo");
    assert_eq!(&echoed, b"ping");
    // Closed, so the drain does not wait for the tunnel.
    drop(stream);
    server.shutdown().await;

    // HTTP/2 has no Upgrade: an h2c upstream gets nothing, and is not blamed.
    let backend = H2Backend::h2c(STABLE).await;
    let upstream = format!("h2c://127.0.0.1:{}", backend.addr.port());
    let server = cohort_named((STABLE, &[upstream]), None, "").await;
    let (mut stream, head) = upgrade(server.proxy_addr()).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    let mut body = Vec::new();
    let _ = within("the error body", async {
        let mut chunk = [0u8; 1024];
        while !body.ends_with(b"}") {
            let n = stream.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let body: serde_json::Value = serde_json::from_slice(&body).expect("a JSON error");
    assert_eq!(body["error"], "protocol", "{body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| d.contains("h2c")),
        "{body}"
    );
    assert_eq!(backend.hits(), 0);
    let errors = support::metric(
        &server,
        "cohort_upstream_errors_total",
        &[("version", STABLE), ("kind", "protocol")],
    )
    .await;
    assert!(errors.is_none_or(|n| n == 0.0), "{errors:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn clients_that_read_slowly_do_not_hold_up_other_streams_of_an_upstream_connection() {
    let backend = BigH2Backend::start().await;
    let server = cohort_named(
        ("h2-window", &[format!("h2c://{}", backend.addr)]),
        None,
        "",
    )
    .await;
    // Eight streams whose client reads nothing: each takes in what its
    // client's 64 KiB window and its upstream stream's window (256 KiB)
    // hold, and what waits for them in each server's send buffer.
    let (mut stalled, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .handshake(TokioIo::new(
            TcpStream::connect(server.proxy_addr())
                .await
                .expect("connect"),
        ))
        .await
        .expect("an HTTP/2 handshake");
    tokio::spawn(conn);
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(response_head(&mut stalled, get(&url(&server, "/big"), &[])).await);
    }
    eventually("the slow streams to take in their windows", || {
        backend.taken() >= 8 * (256 << 10)
    })
    .await;
    // Another client's response shares their upstream connection.
    let reply = Http::new(server.proxy_addr()).get("/small", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.len(), BigH2Backend::SMALL);
    drop(held);
    server.shutdown().await;
}

/// A client that opens streams and reads nothing of them holds what their
/// responses may buffer in the proxy: as many streams as nginx allows, and
/// an HTTP/2 upstream may run 256 KiB ahead of each (hyper's 2 MiB let one
/// client make the proxy hold 800 MB).
#[tokio::test]
async fn what_a_stalled_http2_client_may_hold_is_bounded() {
    // An HTTP/2 upstream that only reads the settings it is sent.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream = listener.local_addr().expect("an address");
    let server = cohort_named(("h2-bounds", &[format!("h2c://{upstream}")]), None, "").await;

    let mut h2 = RawH2 {
        stream: TcpStream::connect(server.proxy_addr())
            .await
            .expect("connect"),
    };
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    h2.write(&hello).await;
    let settings = h2
        .until(|f| f.kind == SETTINGS && f.flags & ACK == 0)
        .await
        .expect("the proxy's SETTINGS");
    const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    assert_eq!(
        setting(&settings.payload, MAX_CONCURRENT_STREAMS),
        Some(128)
    );

    // A request makes the proxy connect (if its start-up probe has not).
    let proxy = server.proxy_addr();
    let request = tokio::spawn(async move { Http::new(proxy).get("/", &[]).await });
    let (mut tcp, _) = within("the proxy to connect upstream", listener.accept())
        .await
        .expect("accept");
    let mut preface = [0u8; 24];
    tcp.read_exact(&mut preface).await.expect("the preface");
    assert_eq!(&preface[..], PREFACE);
    let mut upstream_side = RawH2 { stream: tcp };
    let settings = upstream_side
        .until(|f| f.kind == SETTINGS && f.flags & ACK == 0)
        .await
        .expect("the proxy's SETTINGS to its upstream");
    const INITIAL_WINDOW_SIZE: u16 = 0x4;
    assert_eq!(
        setting(&settings.payload, INITIAL_WINDOW_SIZE),
        Some(256 << 10)
    );
    request.abort();
    drop(upstream_side);
    server.shutdown().await;
}

/// The value of setting `id` in a SETTINGS frame's payload, if it is there.
fn setting(payload: &[u8], id: u16) -> Option<u32> {
    payload.chunks_exact(6).find_map(|entry| {
        (u16::from_be_bytes([entry[0], entry[1]]) == id)
            .then(|| u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]))
    })
}

/// Starts Cohort with one worker, so that every request goes through the
/// same upstream pools, and `upstream` as version `name`'s only one; no
/// health probe but the one at the start.
async fn one_worker_cohort(name: &str, upstream: String, extra: &str) -> Server {
    let extra = format!("{extra}\n[health]\ninterval = \"1h\"\n");
    let toml = named_config((name, &[upstream]), None, &extra);
    start_cohort(&support::with_listen_keys(&toml, "workers = 1")).await
}

#[tokio::test]
async fn streams_past_an_h2c_upstreams_limit_go_on_another_connection() {
    let backend = BigH2Backend::start().await;
    let upstream = format!("h2c://{}", backend.addr);
    let server = one_worker_cohort("h2c-limit", upstream, "").await;
    assert_streams_past_the_limit_go_on_another_connection(server, &backend).await;
}

#[tokio::test]
async fn streams_past_an_https_upstreams_limit_go_on_another_connection() {
    let pki = Pki::new();
    let backend = BigH2Backend::tls(&pki.leaf("upstream")).await;
    let upstream = format!("https://127.0.0.1:{}", backend.addr.port());
    let ca = format!("[upstream]\nca_file = {:?}\n", pki.ca);
    let server = one_worker_cohort("https-limit", upstream, &ca).await;
    assert_streams_past_the_limit_go_on_another_connection(server, &backend).await;
}

async fn assert_streams_past_the_limit_go_on_another_connection(
    server: Server,
    backend: &BigH2Backend,
) {
    // As many open streams as the upstream allows on a connection, as
    // long-lived server-sent events streams are.
    let mut h2 = h2c(server.proxy_addr()).await;
    let mut held = Vec::new();
    for _ in 0..BigH2Backend::MAX_STREAMS {
        held.push(response_head(&mut h2, get(&url(&server, "/hold"), &[])).await);
    }
    // One connection for them, one for the health probe at the start.
    eventually("the health probe's connection", || {
        backend.connections() == 2
    })
    .await;
    let reply = Http::new(server.proxy_addr()).get("/small", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.body.len(), BigH2Backend::SMALL);
    assert_eq!(backend.connections(), 3);
    drop(held);
    server.shutdown().await;
}

#[tokio::test]
async fn an_https_upstream_that_chooses_http1_keeps_its_connections_over_http1() {
    let pki = Pki::new();
    let backend = H2Backend::tls_http1("https-h1-pooled", &pki.leaf("upstream")).await;
    let upstream = format!("https://127.0.0.1:{}", backend.addr.port());
    let ca = format!("[upstream]\nca_file = {:?}\n", pki.ca);
    let server = one_worker_cohort("https-h1-pooled", upstream, &ca).await;
    eventually("the health probe at the start", || backend.probes() == 1).await;
    let before = backend.connections();
    let http = Http::new(server.proxy_addr());
    for n in 0..5 {
        // The first, which asks, with a body: it arrives whole.
        let body = format!("payload {n}");
        let reply = http
            .send(Method::POST, "/", &[], Bytes::from(body.clone()))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(seen_version(&reply), "HTTP/1.1");
        assert_eq!(reply.json()["body"], body.as_str());
    }
    // Offered HTTP/2, it chose HTTP/1.1 once; after that, requests go over
    // HTTP/1.1 on a kept-alive connection.
    let opened = backend.connections() - before;
    assert!(opened <= 2, "{opened} connections for 5 requests");
    assert_eq!(backend.hits(), 5);
    // Its choice is no failure.
    let failures = metric(
        &server,
        "cohort_upstream_errors_total",
        &[("version", "https-h1-pooled")],
    )
    .await;
    assert_eq!(failures, 0.0);
    server.shutdown().await;
}

#[tokio::test]
async fn a_request_an_h2c_upstream_cannot_take_reaches_an_http1_one_with_its_host() {
    let dead = support::dead_addr().await;
    let backend = Backend::start("h1-beside-h2c").await;
    let server = cohort_named(
        (
            "h2c-then-h1",
            &[format!("h2c://{dead}"), backend.addr.to_string()],
        ),
        None,
        "",
    )
    .await;
    // Round-robin: one of the two goes to the h2c upstream first.
    let http = Http::new(server.proxy_addr());
    for _ in 0..2 {
        let reply = http.get("/", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.seen("host"), [server.proxy_addr().to_string()]);
    }
    assert_eq!(backend.hits(), 2);
    server.shutdown().await;
}

/// Cohort with `upstream` as version `name`'s only upstream, once the
/// health probe at its start (stream 0) has reached it; no other probe
/// comes during the test.
async fn behind_raw_h2(name: &str, upstream: &RawH2Upstream) -> Server {
    let server = cohort_named(
        (name, &[format!("h2c://{}", upstream.addr)]),
        None,
        "[health]\ninterval = \"1h\"\n",
    )
    .await;
    eventually("the first health probe", || upstream.streams() >= 1).await;
    server
}

#[tokio::test]
async fn a_request_an_h2c_upstream_left_unprocessed_at_a_graceful_goaway_is_sent_again() {
    const NAME: &str = "h2-goaway";
    let upstream = RawH2Upstream::start(|stream| match stream {
        1 => StreamTurn::GoAway,
        _ => StreamTurn::Answer,
    })
    .await;
    let server = behind_raw_h2(NAME, &upstream).await;
    let http = Http::new(server.proxy_addr());
    let reply = http.get("/", &[]).await;
    // A server shutting down or recycling its connection processed none
    // of it (RFC 9113, section 6.8): the request goes again, on a new
    // connection, and nothing went wrong.
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(upstream.streams(), 3);
    assert_eq!(upstream.streams_after_goaway(), 0);
    for _ in 0..3 {
        assert_eq!(http.get("/", &[]).await.status, StatusCode::OK);
    }
    assert_eq!(upstream.streams_after_goaway(), 0);
    let errors = support::metric(
        &server,
        "cohort_upstream_errors_total",
        &[("version", NAME)],
    )
    .await;
    assert!(errors.is_none_or(|n| n == 0.0), "{errors:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_refused_stream_is_sent_again_and_a_reset_one_is_a_reset() {
    const NAME: &str = "h2-refused";
    let upstream = RawH2Upstream::start(|stream| match stream {
        1 | 4 => StreamTurn::Reset(7),
        3 => StreamTurn::Reset(2),
        _ => StreamTurn::Answer,
    })
    .await;
    let server = behind_raw_h2(NAME, &upstream).await;
    let http = Http::new(server.proxy_addr());
    // REFUSED_STREAM: not processed, so sent again (stream 2).
    let reply = http.get("/", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(upstream.streams(), 3);

    // INTERNAL_ERROR: the upstream broke the exchange off.
    let reply = http.get("/", &[]).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{reply:?}");
    assert_eq!(reply.json()["error"], "reset", "{reply:?}");
    assert_eq!(upstream.streams(), 4);

    // A request with a body cannot be sent again: its body went to the
    // first stream.
    let reply = http
        .send(Method::POST, "/", &[], Bytes::from_static(b"once"))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{reply:?}");
    assert_eq!(reply.json()["error"], "reset", "{reply:?}");
    assert_eq!(upstream.streams(), 5);

    let errors = "cohort_upstream_errors_total";
    let reset = metric(&server, errors, &[("version", NAME), ("kind", "reset")]).await;
    assert_eq!(reset, 2.0);
    let protocol = metric(&server, errors, &[("version", NAME), ("kind", "protocol")]).await;
    assert_eq!(protocol, 0.0);
    server.shutdown().await;
}

#[tokio::test]
async fn an_https_upstream_on_http1_is_named_in_host() {
    let pki = Pki::new();
    let backend = H2Backend::tls_http1(STABLE, &pki.leaf("upstream")).await;
    let upstream = format!("https://127.0.0.1:{}", backend.addr.port());
    let ca = format!("[upstream]\nca_file = {:?}\n", pki.ca);
    let server = cohort_named((STABLE, std::slice::from_ref(&upstream)), None, &ca).await;
    let reply = Http::new(server.proxy_addr())
        .get("/secure", &[("host", "agents.example")])
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(seen_version(&reply), "HTTP/1.1");
    // Named as its certificate names it; the client's host goes alongside.
    assert_eq!(
        reply.seen("host"),
        [format!("127.0.0.1:{}", backend.addr.port())]
    );
    assert_eq!(reply.seen("x-forwarded-host"), ["agents.example"]);
    server.shutdown().await;
}

#[tokio::test]
async fn health_probes_speak_each_upstreams_protocol() {
    let pki = Pki::new();
    let h2c_backend = H2Backend::h2c(STABLE).await;
    let tls_backend = H2Backend::tls(CANARY, &pki.leaf("probed")).await;
    let extra = format!(
        "[upstream]\nca_file = {:?}\n\n\
         [health]\ninterval = \"20ms\"\nunhealthy_threshold = 1\nhealthy_threshold = 1\n\n{}",
        pki.ca,
        routing()
    );
    let server = cohort_named(
        (STABLE, &[format!("h2c://{}", h2c_backend.addr)]),
        Some((
            CANARY,
            &[format!("https://127.0.0.1:{}", tls_backend.addr.port())],
            50.0,
        )),
        &extra,
    )
    .await;
    // Several probes have been answered by each: one failed probe would mark it down.
    eventually("three probes of each upstream", || {
        h2c_backend.probes() >= 3 && tls_backend.probes() >= 3
    })
    .await;
    let http = Http::new(server.proxy_addr());
    for (version, prefix) in [(STABLE, "probe-s"), (CANARY, "probe-c")] {
        let key = key_on(SALT, 50.0, version, prefix);
        let reply = http.get("/", &[("x-user-id", &key)]).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.backend(), version, "{reply:?}");
    }
    server.shutdown().await;
}

/// A gRPC-style call (`te: trailers`) through `server`.
fn grpc_request(server: &Server) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri(url(server, "/grpc"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))
        .expect("a request")
}

#[tokio::test]
async fn grpc_trailers_pass_through_to_an_http2_client() {
    let backend = H2Backend::h2c(STABLE).await;
    let server = cohort_named((STABLE, &[format!("h2c://{}", backend.addr)]), None, "").await;
    let mut h2 = h2c(server.proxy_addr()).await;
    let rsp = response_head(&mut h2, grpc_request(&server)).await;
    assert_eq!(rsp.status(), StatusCode::OK);
    assert_eq!(rsp.headers()["content-type"], "application/grpc");
    assert_eq!(rsp.headers()["x-agent-version"], STABLE);
    assert_eq!(rsp.headers()["x-saw-te"], "trailers");
    let collected = within("the gRPC body", rsp.into_body().collect())
        .await
        .expect("a whole body");
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
    assert_eq!(&collected.to_bytes()[..], H2Backend::GRPC_MESSAGE);
    server.shutdown().await;
}

#[tokio::test]
async fn a_retry_onto_an_http2_upstream_passes_on_te_trailers() {
    let backend = H2Backend::h2c(STABLE).await;
    let dead = support::dead_addr().await;
    // No passive ejection and no probe before the test ends: the refused
    // HTTP/1.1 upstream stays in the rotation, so every other request is
    // retried onto the h2c one.
    let health = "[health]\ninterval = \"1h\"\neject_after_errors = 1000\n";
    let upstreams = [dead.to_string(), format!("h2c://{}", backend.addr)];
    let server = cohort_named((STABLE, &upstreams), None, health).await;
    let mut h2 = h2c(server.proxy_addr()).await;
    for _ in 0..4 {
        let rsp = response_head(&mut h2, grpc_request(&server)).await;
        assert_eq!(rsp.status(), StatusCode::OK);
        assert_eq!(rsp.headers()["x-saw-te"], "trailers");
    }
    let refused = metric(
        &server,
        "cohort_upstream_errors_total",
        &[("version", STABLE), ("kind", "connect")],
    )
    .await;
    assert!(refused >= 2.0, "the dead upstream was tried: {refused}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_request_moves_on_from_an_h2c_or_https_upstream_that_refuses() {
    let pki = Pki::new();
    let h2c_backend = H2Backend::h2c(STABLE).await;
    let tls_backend = H2Backend::tls(STABLE, &pki.leaf("upstream")).await;
    let dead = support::dead_addr().await;
    // No passive ejection and no probe before the test ends: the refusing
    // upstream stays in the rotation, so about every other request meets it.
    let extra = format!(
        "[health]\ninterval = \"1h\"\neject_after_errors = 1000\n\n[upstream]\nca_file = {:?}\n",
        pki.ca
    );
    for (scheme, backend) in [("h2c", &h2c_backend), ("https", &tls_backend)] {
        let upstreams = [
            format!("{scheme}://127.0.0.1:{}", dead.port()),
            format!("{scheme}://127.0.0.1:{}", backend.addr.port()),
        ];
        // A version name of its own, so that the counter below is this
        // server's alone (the metrics are the process's).
        let version = format!("failover-{scheme}");
        let server = cohort_named((&version, &upstreams), None, &extra).await;
        let labels = [("version", version.as_str()), ("kind", "connect")];
        let refused = || metric(&server, "cohort_upstream_errors_total", &labels);
        // With a body or without: nothing of it was sent, so it moves on
        // whole. Until a request of each kind has met the refusing upstream.
        let (mut without_body, mut with_body) = (false, false);
        for n in 0..20 {
            let (method, body) = match n % 3 {
                0 => (Method::GET, String::new()),
                _ => (Method::POST, format!("payload {n}")),
            };
            let before = refused().await;
            let reply = Http::new(server.proxy_addr())
                .send(
                    method.clone(),
                    &format!("/{n}"),
                    &[],
                    Bytes::from(body.clone()),
                )
                .await;
            assert_eq!(reply.status, StatusCode::OK, "{scheme} {n}: {reply:?}");
            assert_eq!(reply.backend(), STABLE);
            assert_eq!(reply.json()["body"], body.as_str(), "{scheme} {n}");
            if refused().await > before {
                match method {
                    Method::GET => without_body = true,
                    _ => with_body = true,
                }
            }
            if without_body && with_body {
                break;
            }
        }
        assert!(
            without_body && with_body,
            "{scheme}: each kind met the dead upstream"
        );
        server.shutdown().await;
    }
}

// ---------------------------------------------------------------------------
// HTTP/2 tools no one here wrote

#[tokio::test]
async fn curl_speaks_http2_with_prior_knowledge() {
    require("curl");
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, "").await;
    let (ok, out) = run(
        "curl",
        &[
            "--http2-prior-knowledge",
            "--silent",
            "--show-error",
            "--include",
            "-H",
            "x-user-id: curl-user",
            &url(&server, "/via-curl"),
        ],
    )
    .await;
    assert!(ok, "curl failed:\n{out}");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(out.contains(&format!("x-agent-version: {STABLE}")), "{out}");
    assert_eq!(stable.hits(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn nghttp_and_h2load_speak_h2c() {
    require("nghttp");
    require("h2load");
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, "").await;
    let target = url(&server, "/via-nghttp");
    let (ok, out) = run("nghttp", &["--verbose", &target]).await;
    assert!(ok, "nghttp failed:\n{out}");
    assert!(out.contains(":status: 200"), "{out}");
    assert!(out.contains(&format!("x-agent-version: {STABLE}")), "{out}");

    let (ok, out) = run("h2load", &["-n", "40", "-c", "4", "-m", "4", &target]).await;
    assert!(ok, "h2load failed:\n{out}");
    assert!(out.contains("40 succeeded, 0 failed, 0 errored"), "{out}");
    assert!(out.contains("status codes: 40 2xx"), "{out}");
    assert!(out.contains("Application protocol: h2c"), "{out}");
    assert_eq!(stable.hits(), 41);
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// Malformed HTTP/2

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts panics anywhere in this test process (the proxy's tasks included).
fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// A proxy in front of one echo backend (its version named `version`, so
/// that its metric series are this test's own), and a good HTTP/2
/// connection to it opened before the test's bad one.
async fn proxy_with_a_good_connection(version: &str) -> (Backend, Server, H2) {
    count_panics();
    let stable = Backend::start(STABLE).await;
    let server = cohort_named((version, &[stable.addr.to_string()]), None, "").await;
    let good = h2c(server.proxy_addr()).await;
    (stable, server, good)
}

/// The good connection still works, and nothing panicked.
async fn still_good(server: &Server, good: &mut H2) {
    let (_, reply) = send_h2(good, get(&url(server, "/after"), &[])).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.backend(), STABLE);
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked");
}

#[tokio::test]
async fn a_bad_preface_is_refused() {
    let (stable, server, mut good) = proxy_with_a_good_connection("h2-preface").await;

    // Almost the preface: read as HTTP/1.1, whose parser refuses it.
    let mut stream = TcpStream::connect(server.proxy_addr())
        .await
        .expect("connect");
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    within("the refusal", stream.read_to_end(&mut answer))
        .await
        .expect("read to the end");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");

    // The real preface, then a frame that may not come first (DATA on stream 0).
    let mut stream = TcpStream::connect(server.proxy_addr())
        .await
        .expect("connect");
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(DATA, 0, 0, b"junk"));
    stream.write_all(&bytes).await.expect("write");
    let mut raw = RawH2 { stream };
    let goaway = raw
        .until(|f| f.kind == GOAWAY)
        .await
        .expect("a GOAWAY before the connection ends");
    // GOAWAY: the last stream id (4 bytes), then the error code; 1 = PROTOCOL_ERROR.
    assert_eq!(
        goaway.payload.get(4..8),
        Some(&[0, 0, 0, 1][..]),
        "{goaway:?}"
    );

    // Over TLS, where ALPN chose h2, an HTTP/1.1 request instead of the preface.
    let pki = Pki::new();
    let tls_server = cohort(&[stable.addr], None, &listen_tls(&pki.leaf("preface"))).await;
    let mut tls = tls_connect(tls_server.proxy_addr(), &tls_client(&pki.ca, &["h2"])).await;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    // The server's SETTINGS at most, then the end of the connection: no HTTP/1.1 answer.
    let _ = within("the end of the connection", tls.read_to_end(&mut answer)).await;
    assert!(
        !answer.windows(8).any(|w| w == b"HTTP/1.1"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );

    assert_eq!(stable.hits(), 0, "a bad preface reached the upstream");
    still_good(&server, &mut good).await;
    tls_server.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_oversized_header_block_is_refused() {
    let (stable, server, mut good) = proxy_with_a_good_connection("h2-oversized").await;
    let mut raw = RawH2::open(server.proxy_addr()).await;

    // 100 KiB of one header: over the 64 KiB limit, sent as HEADERS plus CONTINUATIONs.
    let big = "a".repeat(100 * 1024);
    let block = request_block(
        Method::GET,
        &server.proxy_addr().to_string(),
        "/",
        &[("x-big", &big)],
    );
    let chunks: Vec<&[u8]> = block.chunks(16 * 1024).collect();
    let mut bytes = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let (kind, flags) = if i == 0 {
            (HEADERS, END_STREAM)
        } else {
            (CONTINUATION, 0)
        };
        bytes.extend(frame(
            kind,
            flags | if last { END_HEADERS } else { 0 },
            1,
            chunk,
        ));
    }
    raw.write(&bytes).await;

    // A 431 response, a reset stream, or the connection closed: never a request upstream.
    let answer = raw
        .until(|f| {
            (f.stream == 1 && (f.kind == HEADERS || f.kind == RST_STREAM)) || f.kind == GOAWAY
        })
        .await;
    match &answer {
        Some(f) if f.kind == HEADERS => {
            // `:status` (static index 8) with the value 431, plain or Huffman-coded.
            let status_431 = [
                &[0x48, 0x03, b'4', b'3', b'1'][..],
                &[0x48, 0x83, 0x69, 0x90, 0xff],
            ];
            assert!(
                status_431.iter().any(|s| f.payload.starts_with(s)),
                "a response other than 431: {f:?}"
            );
        }
        Some(_) | None => {}
    }
    assert_eq!(stable.hits(), 0, "an oversized head reached the upstream");
    still_good(&server, &mut good).await;
    // A raw client answers no PING, which a drain would wait on for the
    // close grace.
    drop(raw);
    server.shutdown().await;
}

#[tokio::test]
async fn a_stream_reset_mid_body_leaves_its_connection_and_others_working() {
    let (stable, server, mut good) = proxy_with_a_good_connection("h2-reset").await;
    let mut raw = RawH2::open(server.proxy_addr()).await;
    let authority = server.proxy_addr().to_string();

    // A POST that promises 100 bytes, sends 10, and is reset (CANCEL).
    let mut bytes = frame(
        HEADERS,
        END_HEADERS,
        1,
        &request_block(
            Method::POST,
            &authority,
            "/upload",
            &[("content-length", "100")],
        ),
    );
    bytes.extend(frame(DATA, 0, 1, &[b'x'; 10]));
    raw.write(&bytes).await;
    eventually("the upload reaches the upstream", || {
        stable.body_bytes_seen() == 10
    })
    .await;
    raw.write(&frame(RST_STREAM, 0, 1, &8u32.to_be_bytes()))
        .await;

    // The same connection serves the next stream.
    raw.write(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        3,
        &request_block(Method::GET, &authority, "/next", &[]),
    ))
    .await;
    let head = raw
        .until(|f| f.stream == 3 && f.kind == HEADERS)
        .await
        .expect("stream 3 is answered");
    // 0x88 is `:status: 200` from HPACK's static table.
    assert_eq!(head.payload.first(), Some(&0x88), "{head:?}");
    let end = raw
        .until(|f| f.stream == 3 && f.flags & END_STREAM != 0)
        .await
        .expect("stream 3 ends");
    assert!(end.kind == DATA || end.kind == HEADERS, "{end:?}");

    // The reset request is no longer in flight.
    eventually_async("the reset request leaves the in-flight gauge", || async {
        metric(
            &server,
            "cohort_requests_in_flight",
            &[("version", "h2-reset")],
        )
        .await
            == 0.0
    })
    .await;
    still_good(&server, &mut good).await;
    drop(raw);
    server.shutdown().await;
}

/// A client that resets most of its streams once the proxy has taken them
/// (a rapid reset paced to pass h2's own guard, which counts only streams
/// reset before they are taken) costs an upstream request each: past 500
/// streams, more than half of them reset, its connection is told to go,
/// as Envoy does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_resets_most_of_its_streams_is_told_to_go() {
    let slow = SlowBackend::start(STABLE).await;
    let server = cohort(&[slow.addr], None, "").await;
    let mut raw = RawH2::open(server.proxy_addr()).await;
    let block = tls_support::request_block(Method::GET, "a", "/slow", &[("x-user-id", "alice")]);
    let mut id = 1u32;
    for round in 1..=30 {
        let first = id;
        let mut batch = Vec::new();
        for _ in 0..20 {
            batch.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
            id += 2;
        }
        raw.write(&batch).await;
        eventually("the round's requests reaching the upstream", || {
            slow.hits() >= round * 20
        })
        .await;
        let mut resets = Vec::new();
        for stream in (first..id).step_by(2) {
            resets.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
        }
        raw.write(&resets).await;
    }
    let goaway = raw.until(|f| f.kind == GOAWAY).await;
    assert!(goaway.is_some(), "the connection ended without a GOAWAY");
    slow.release();
}

/// An HTTP/1.1 upstream that breaks its body as its head comes (a chunk
/// size that is not one, in the same read): an HTTP/2 client gets the
/// response's HEADERS before the stream's reset, not a reset alone (h2
/// drops a HEADERS frame still queued when its stream is reset).
#[tokio::test]
async fn an_http2_client_gets_the_head_of_a_body_broken_as_it_came() {
    let addr =
        support::raw_upstream(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n").await;
    // A version of its own: the metrics are the test binary's, and other
    // tests count the errors of theirs.
    let server = cohort_named(("h2-broken-at-head", &[addr.to_string()]), None, "").await;
    let mut raw = RawH2::open(server.proxy_addr()).await;
    for stream in (1..20).step_by(2) {
        let block = request_block(
            Method::GET,
            &server.proxy_addr().to_string(),
            "/",
            &[("x-user-id", "a")],
        );
        raw.write(&frame(HEADERS, END_STREAM | END_HEADERS, stream, &block))
            .await;
        let first = raw
            .until(|f| f.stream == stream && (f.kind == HEADERS || f.kind == RST_STREAM))
            .await
            .expect("an answer");
        assert_eq!(first.kind, HEADERS, "stream {stream}: a reset alone");
        raw.until(|f| f.stream == stream && f.kind == RST_STREAM)
            .await
            .expect("the reset that cuts the body");
    }
    drop(raw);
    server.shutdown().await;
}

/// An HTTP/2 upstream whose connection breaks mid-body broke the exchange
/// off, as an HTTP/1.1 one that closes mid-body does: `kind="reset"`.
#[tokio::test]
async fn an_h2c_upstream_that_closes_mid_body_counts_as_a_reset() {
    const NAME: &str = "h2-cut";
    // Every request's (after the first health probe): a broken connection
    // may leave the response head unread, and the request then goes once
    // more, on another connection.
    let upstream = RawH2Upstream::start(|stream| match stream {
        0 => StreamTurn::Answer,
        _ => StreamTurn::CutMidBody,
    })
    .await;
    let server = behind_raw_h2(NAME, &upstream).await;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    // The head, its first data and the break come in one read: hyper, had
    // the body's failure come with them, would drop the client's connection
    // with nothing sent.
    for _ in 0..10 {
        let mut client = tokio::net::TcpStream::connect(server.proxy_addr())
            .await
            .expect("connect");
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
            .await
            .expect("send");
        let mut answer = Vec::new();
        let _ = within("the cut response", client.read_to_end(&mut answer)).await;
        // A 502, or a 200 cut short: never a whole body, and never nothing.
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 "), "no answer: {answer:?}");
        assert!(
            !(answer.starts_with("HTTP/1.1 200") && answer.ends_with("0\r\n\r\n")),
            "a whole body: {answer}"
        );
    }
    let kind = |kind| {
        let server = &server;
        async move {
            support::metric(
                server,
                "cohort_upstream_errors_total",
                &[("version", NAME), ("kind", kind)],
            )
            .await
        }
    };
    eventually_async("the broken exchange counted", || async {
        kind("reset").await.is_some_and(|n| n >= 1.0)
    })
    .await;
    assert!(kind("protocol").await.is_none_or(|n| n == 0.0));
    server.shutdown().await;
}
