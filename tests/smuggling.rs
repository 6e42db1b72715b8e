//! Requests that two HTTP parsers could read differently never reach an upstream.
//!
//! Owns: ambiguous framing (conflicting `Content-Length`s, `Content-Length`
//! with `Transfer-Encoding` in either order, a transfer coding other than
//! `chunked`), an oversized head, a malformed request line, a target of a
//! host alone or of `*` (but for `OPTIONS`), no `Host`, two of them or an
//! invalid one, and `CONNECT` (a
//! tunnel to whatever the client names), each sent as raw bytes; the
//! answer is a 4xx or 501, the connection is closed after it, and the
//! upstream's request counter stays at zero. Does not own: upstream
//! failures (`tests/errors.rs`).

mod support;

use support::{Backend, DEADLINE, STABLE, cohort, raw_exchange};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Sends `bytes` to a fresh proxy in front of one echo backend and checks
/// that the answer is `status` and that the backend saw nothing.
async fn refused(what: &str, bytes: &[u8], status: u16) {
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, "").await;
    let reply = raw_exchange(server.proxy_addr(), bytes).await;
    assert_eq!(reply.status, status, "{what}: {reply:?}");
    assert_eq!(stable.hits(), 0, "{what}: the upstream saw a request");
    // A request refused unread pins no one to a cohort.
    assert!(
        !reply
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("set-cookie")),
        "{what}: {reply:?}"
    );
}

#[tokio::test]
async fn connect_is_refused() {
    refused(
        "CONNECT",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        400,
    )
    .await;
}

/// What follows a refused request (here the bytes meant for a `CONNECT`'s
/// tunnel) is never read as a request: the connection closes after the
/// one answer.
#[tokio::test]
async fn the_connection_closes_after_a_refusal() {
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, "").await;
    let mut stream = tokio::net::TcpStream::connect(server.proxy_addr())
        .await
        .expect("connect to the proxy");
    stream
        .write_all(
            b"CONNECT internal.example:443 HTTP/1.1\r\nHost: internal.example:443\r\n\r\n\
              GET /tunneled HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await
        .expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
        .await
        .expect("the proxy closes the connection")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    assert_eq!(stable.hits(), 0, "the tunnel's bytes reached the upstream");
}

/// hyper decodes `chunked` only: a body under another coding would reach
/// the upstream still coded, with nothing saying so (RFC 9112 section 6.1).
#[tokio::test]
async fn a_transfer_coding_other_than_chunked_gets_501() {
    for (what, codings) in [
        ("gzip", "Transfer-Encoding: gzip, chunked\r\n"),
        ("chunked twice", "Transfer-Encoding: chunked, chunked\r\n"),
        (
            "two fields",
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
        ),
    ] {
        let request =
            format!("POST /chat HTTP/1.1\r\nHost: a\r\n{codings}\r\n5\r\nhello\r\n0\r\n\r\n");
        refused(what, request.as_bytes(), 501).await;
    }
}

/// `GET host:port` (authority form) is for `CONNECT` alone; forwarded, it
/// would name a host other than the one a front end checked in `Host`.
#[tokio::test]
async fn a_target_of_a_host_alone_is_refused() {
    refused(
        "authority form",
        b"GET evil.example HTTP/1.1\r\nHost: good.example\r\n\r\n",
        400,
    )
    .await;
}

/// `*` (asterisk form) asks about the server as a whole, which only
/// `OPTIONS` may; that one still reaches the upstream.
#[tokio::test]
async fn a_target_of_an_asterisk_is_only_for_options() {
    refused(
        "GET *",
        b"GET * HTTP/1.1\r\nHost: good.example\r\n\r\n",
        400,
    )
    .await;
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, "").await;
    let reply = raw_exchange(
        server.proxy_addr(),
        b"OPTIONS * HTTP/1.1\r\nHost: good.example\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(stable.hits(), 1);
}

#[tokio::test]
async fn an_invalid_host_is_refused() {
    for host in ["a b", "good.example/../admin", "user@good.example", "a\"b"] {
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        refused(host, request.as_bytes(), 400).await;
    }
    refused(
        "user info in an absolute-form target",
        b"GET http://u:p@other.example/p HTTP/1.1\r\nHost: other.example\r\n\r\n",
        400,
    )
    .await;
    // An http URI names a host (RFC 9110 section 4.2.1), as nginx requires.
    refused("an empty host", b"GET / HTTP/1.1\r\nHost: \r\n\r\n", 400).await;
}

#[tokio::test]
async fn conflicting_content_lengths_are_refused() {
    refused(
        "two content-lengths",
        b"POST /chat HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nhello",
        400,
    )
    .await;
}

#[tokio::test]
async fn a_content_length_list_that_disagrees_is_refused() {
    refused(
        "a content-length list",
        b"POST /chat HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 40\r\n\r\nhello",
        400,
    )
    .await;
}

// hyper drops `Content-Length` when `Transfer-Encoding` is present (in either
// order), so the proxy's own check never sees both and forwards the request
// chunked. These two wait for the framing guard that refuses it.
const SMUGGLED: &str = "GET /admin HTTP/1.1\r\nHost: a\r\n\r\n";

#[tokio::test]
async fn content_length_then_transfer_encoding_is_refused() {
    let request = format!(
        "POST /chat HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}",
        5 + SMUGGLED.len()
    );
    refused("CL then TE", request.as_bytes(), 400).await;
}

#[tokio::test]

async fn transfer_encoding_then_content_length_is_refused() {
    let request = format!(
        "POST /chat HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: {}\r\n\r\n0\r\n\r\n{SMUGGLED}",
        5 + SMUGGLED.len()
    );
    refused("TE then CL", request.as_bytes(), 400).await;
}

#[tokio::test]
async fn an_oversized_head_gets_431() {
    // One 70 KiB header: over the 64 KiB limit on the request head.
    let request = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    refused("a 70 KiB head", request.as_bytes(), 431).await;
}

#[tokio::test]
async fn many_headers_over_the_limit_get_431() {
    let mut request = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
    for i in 0..1200 {
        request.push_str(&format!("X-Filler-{i}: {}\r\n", "b".repeat(48)));
    }
    request.push_str("\r\n");
    refused("a head of many headers", request.as_bytes(), 431).await;
}

#[tokio::test]
async fn a_malformed_request_line_gets_400() {
    for line in [
        &b"GET /\x00chat HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        b"GET / HTTP/9.9x\r\nHost: a\r\n\r\n",
        b"G(ET / HTTP/1.1\r\nHost: a\r\n\r\n",
    ] {
        refused(&String::from_utf8_lossy(line), line, 400).await;
    }
}

#[tokio::test]
async fn two_host_headers_are_refused() {
    refused(
        "two hosts",
        b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        400,
    )
    .await;
}

#[tokio::test]
async fn an_http11_request_without_a_host_is_refused_and_an_http10_one_is_not() {
    refused("no host", b"GET / HTTP/1.1\r\nx-user-id: a\r\n\r\n", 400).await;
    // A host in the request line does not stand in for `Host` (RFC 9112
    // section 3.2), as nginx has it.
    refused(
        "no host beside an absolute-form target",
        b"GET http://a.example/ HTTP/1.1\r\nConnection: close\r\n\r\n",
        400,
    )
    .await;
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, "").await;
    let reply = raw_exchange(server.proxy_addr(), b"GET / HTTP/1.0\r\n\r\n").await;
    assert_eq!(reply.status, 200, "{reply:?}");
}
