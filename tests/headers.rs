//! What the proxy adds to and removes from traffic, seen on the wire.
//!
//! Owns: the version header and `x-forwarded-*` on the upstream request, and
//! the removal of hop-by-hop headers (the fixed list and those named in
//! `Connection`) in both directions (`Trailer` is not one: trailers reach an
//! HTTP/1.1 client that accepts them), an h2c upgrade kept to its hop (alone
//! or beside another protocol), the `Host` of an absolute-form
//! request, a response's stale `Content-Length` beside its chunks, a
//! length written as a list of itself, the trailers of a request, and an
//! HTTP/1.0 upstream's answer sent as HTTP/1.1 on a kept-alive client
//! connection. Requests go as raw bytes so that the
//! test, not a client library, decides exactly which headers are sent.
//! Does not own: which version is chosen (`tests/routing.rs`).

mod support;

use support::{Backend, CANARY, Http, STABLE, cohort, raw_exchange};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "te",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

#[tokio::test]
async fn the_upstream_sees_the_version_and_forwarded_headers() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let server = cohort(&[stable.addr], Some((&[canary.addr], 50.0)), "").await;
    let http = Http::new(server.proxy_addr());

    // alice is on the canary at 50% under salt v2, bob on stable (SPEC vectors).
    for (key, version) in [("alice", CANARY), ("bob", STABLE)] {
        let reply = http
            .get(
                "/chat",
                &[
                    ("x-user-id", key),
                    ("host", "agent.example.com"),
                    ("x-forwarded-for", "203.0.113.7"),
                    // A client must not be able to pick the version header the upstream reads,
                    // nor pass its request off as a shadow copy.
                    ("x-agent-version", "forged"),
                    ("x-cohort-shadow", "1"),
                ],
            )
            .await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.seen("x-agent-version"), [version], "{key}");
        assert_eq!(reply.seen("x-cohort-shadow"), Vec::<String>::new(), "{key}");
        assert_eq!(
            reply.seen("x-forwarded-for"),
            ["203.0.113.7, 127.0.0.1"],
            "the peer is appended to the incoming chain"
        );
        assert_eq!(reply.seen("x-forwarded-proto"), ["http"]);
        assert_eq!(reply.seen("x-forwarded-host"), ["agent.example.com"]);
    }
}

#[tokio::test]
async fn a_request_without_a_forwarded_chain_starts_one() {
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, "").await;
    let reply = Http::new(server.proxy_addr())
        .get("/", &[("host", "svc.internal:8443")])
        .await;
    assert_eq!(reply.seen("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(reply.seen("x-forwarded-host"), ["svc.internal:8443"]);
    assert_eq!(reply.seen("x-agent-version"), [STABLE]);
}

#[tokio::test]
async fn several_forwarded_for_lines_are_joined_in_order() {
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, "").await;
    let reply = Http::new(server.proxy_addr())
        .get(
            "/",
            &[
                ("x-forwarded-for", "198.51.100.1, 198.51.100.2"),
                ("x-forwarded-for", "198.51.100.3"),
            ],
        )
        .await;
    assert_eq!(
        reply.seen("x-forwarded-for"),
        ["198.51.100.1, 198.51.100.2, 198.51.100.3, 127.0.0.1"]
    );
}

#[tokio::test]
async fn hop_by_hop_request_headers_do_not_reach_the_upstream() {
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, "").await;
    let request = "GET /chat HTTP/1.1\r\n\
                   Host: agent.example.com\r\n\
                   Connection: x-client-secret\r\n\
                   X-Client-Secret: 1\r\n\
                   Keep-Alive: timeout=5\r\n\
                   TE: deflate\r\n\
                   Trailer: x-checksum\r\n\
                   Upgrade: websocket\r\n\
                   Proxy-Authorization: Basic YWxhZGRpbjpvcGVuc2VzYW1l\r\n\
                   X-End-To-End: kept\r\n\
                   \r\n";
    let reply = raw_exchange(server.proxy_addr(), request.as_bytes()).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = reply.seen_names();
    for name in HOP_BY_HOP.iter().chain(&["x-client-secret"]) {
        assert!(
            !seen.iter().any(|n| n == name),
            "{name} reached the upstream: {seen:?}"
        );
    }
    // `Trailer` announces fields at the end of the message: end to end.
    for name in ["x-end-to-end", "trailer"] {
        assert!(
            seen.iter().any(|n| n == name),
            "{name} did not reach the upstream: {seen:?}"
        );
    }
    assert_eq!(stable.hits(), 1);
}

/// An upgrade to h2c concerns only the client's hop: the request goes on
/// as plain HTTP/1.1, and the answer is an ordinary one.
#[tokio::test]
async fn an_h2c_upgrade_is_not_passed_on() {
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, "").await;
    let request = "GET /chat HTTP/1.1\r\n\
                   Host: agent.example.com\r\n\
                   Connection: Upgrade, HTTP2-Settings\r\n\
                   Upgrade: h2c\r\n\
                   HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\
                   \r\n";
    let reply = raw_exchange(server.proxy_addr(), request.as_bytes()).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("upgrade"), None, "{reply:?}");
    let seen = reply.seen_names();
    for name in ["upgrade", "connection", "http2-settings"] {
        assert!(
            !seen.iter().any(|n| n == name),
            "{name} reached the upstream: {seen:?}"
        );
    }
}

/// Offered beside another protocol, `h2c` is dropped from the `Upgrade`
/// the upstream gets, and the other protocol passed on.
#[tokio::test]
async fn h2c_is_dropped_from_an_upgrade_offering_others_too() {
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, "").await;
    let request = "GET /chat HTTP/1.1\r\n\
                   Host: agent.example.com\r\n\
                   Connection: Upgrade\r\n\
                   Upgrade: h2c, websocket, H2C\r\n\
                   \r\n";
    let reply = raw_exchange(server.proxy_addr(), request.as_bytes()).await;
    // The backend answers an ordinary 200: it does not switch.
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.seen("upgrade"), ["websocket"], "{reply:?}");
}

#[tokio::test]
async fn hop_by_hop_response_headers_do_not_reach_the_client() {
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, "").await;
    let request = "GET / HTTP/1.1\r\nHost: a\r\nX-Want-Hop-By-Hop: 1\r\n\r\n";
    // The control: asked directly, the backend does send every one of them.
    let direct = raw_exchange(stable.addr, request.as_bytes()).await;
    for name in [
        "connection",
        "keep-alive",
        "upgrade",
        "trailer",
        "proxy-authenticate",
        "x-backend-secret",
    ] {
        assert!(
            direct.header(name).is_some(),
            "the backend did not send {name}: {:?}",
            direct.headers
        );
    }

    let reply = raw_exchange(server.proxy_addr(), request.as_bytes()).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    for name in HOP_BY_HOP.iter().chain(&["x-backend-secret"]) {
        assert!(
            reply.header(name).is_none(),
            "{name} reached the client: {:?}",
            reply.headers
        );
    }
    assert_eq!(reply.header("x-kept"), Some("1"), "{:?}", reply.headers);
    assert_eq!(
        reply.header("trailer"),
        Some("x-checksum"),
        "{:?}",
        reply.headers
    );
    assert_eq!(reply.header("x-agent-version"), Some(STABLE));
    assert_eq!(reply.json()["backend"], STABLE);
}

/// A client that accepts trailers (`TE: trailers`) gets an HTTP/1.1
/// upstream's, and the upstream is told it may send them.
#[tokio::test]
async fn trailers_reach_an_http1_client_that_accepts_them() {
    let upstream = support::raw_upstream(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: grpc-status\r\n\r\n\
          2\r\nok\r\n0\r\ngrpc-status: 0\r\n\r\n",
    )
    .await;
    let server = cohort(&[upstream], None, "").await;
    let request = "GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nConnection: close\r\n\r\n";
    let mut stream = tokio::net::TcpStream::connect(server.proxy_addr())
        .await
        .expect("connect");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    support::within("the whole response", stream.read_to_end(&mut raw))
        .await
        .expect("read");
    let raw = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(raw.contains("trailer: grpc-status\r\n"), "{raw}");
    assert!(
        raw.ends_with("2\r\nok\r\n0\r\ngrpc-status: 0\r\n\r\n"),
        "{raw}"
    );
    // Of the client's `TE`, the upstream is told only that trailers are welcome.
    let echo = Backend::start(STABLE).await;
    let server = cohort(&[echo.addr], None, "").await;
    let request =
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: TE\r\nTE: deflate, trailers;q=0.5\r\n\r\n";
    let reply = raw_exchange(server.proxy_addr(), request.as_bytes()).await;
    assert_eq!(reply.seen("te"), ["trailers"], "{reply:?}");
}

/// A request's trailers reach the upstream without the hop-by-hop, framing
/// and routing fields a client put in them, as its head would: RFC 9110
/// section 6.5.1 keeps those out of trailers, and an HTTP/2 upstream
/// resets a stream whose trailers carry one.
#[tokio::test]
async fn request_trailers_reach_the_upstream_without_hop_by_hop_fields() {
    let echo = Backend::start(STABLE).await;
    let server = cohort(&[echo.addr], None, "").await;
    let request = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\
                   Trailer: x-checksum, keep-alive, content-length, host, proxy-authorization\r\n\r\n\
                   5\r\nhello\r\n0\r\nx-checksum: 1\r\nkeep-alive: timeout=5\r\n\
                   content-length: 5\r\nhost: elsewhere\r\nproxy-authorization: Basic eA==\r\n\r\n";
    let reply = raw_exchange(server.proxy_addr(), request.as_bytes()).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let json = reply.json();
    assert_eq!(json["body_len"], 5, "{json}");
    assert_eq!(
        json["trailers"],
        serde_json::json!([["x-checksum", "1"]]),
        "{json}"
    );
}

/// A length an upstream wrote as a list of itself (`5, 5`, which RFC 9110
/// lets a recipient take as `5`) reaches the client written once, which
/// strict clients can read.
#[tokio::test]
async fn a_repeated_length_reaches_the_client_written_once() {
    let upstream =
        support::raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello").await;
    let server = cohort(&[upstream], None, "").await;
    let reply = raw_exchange(
        server.proxy_addr(),
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.header("content-length"), Some("5"), "{reply:?}");
    assert_eq!(reply.body, b"hello", "{reply:?}");
}

/// A request that names no host gets no `x-forwarded-host`: the client's
/// own would pass for the proxy's, which upstreams trust.
#[tokio::test]
async fn a_request_that_names_no_host_cannot_forge_x_forwarded_host() {
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, "").await;
    let request = "GET /reset-password HTTP/1.0\r\nX-Forwarded-Host: evil.example\r\n\r\n";
    let reply = raw_exchange(server.proxy_addr(), request.as_bytes()).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(
        reply.seen("x-forwarded-host").is_empty(),
        "{}",
        reply.json()
    );
}

#[tokio::test]
async fn the_authority_of_an_absolute_form_request_replaces_its_host() {
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, "").await;
    let request = "GET http://agent.example.com/chat HTTP/1.1\r\nHost: other.example\r\n\r\n";
    let reply = raw_exchange(server.proxy_addr(), request.as_bytes()).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let echo = reply.json();
    assert_eq!(echo["uri"], "/chat", "{echo}");
    assert_eq!(reply.seen("host"), ["agent.example.com"], "{echo}");
    assert_eq!(
        reply.seen("x-forwarded-host"),
        ["agent.example.com"],
        "{echo}"
    );
}

#[tokio::test]
async fn a_chunked_response_with_a_stale_length_reaches_the_client_whole() {
    // An upstream that sends both: the chunked body is five bytes, the length says three.
    let addr = support::raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let server = cohort(&[addr], None, "").await;
    let reply = raw_exchange(
        server.proxy_addr(),
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, b"hello", "{reply:?}");
    assert_ne!(reply.header("content-length"), Some("3"), "{reply:?}");
}

#[tokio::test]
async fn an_http_1_0_upstream_answers_as_http_1_1_and_the_client_connection_stays_open() {
    let upstream = support::raw_upstream(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let server = cohort(&[upstream], None, "").await;
    let mut stream = support::within(
        "connect",
        tokio::net::TcpStream::connect(server.proxy_addr()),
    )
    .await
    .expect("connect");
    for _ in 0..2 {
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-user-id: alice\r\n\r\n")
            .await
            .expect("send a request");
        let head = support::read_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        let mut body = [0; 2];
        support::within("the body", stream.read_exact(&mut body))
            .await
            .expect("the body");
        assert_eq!(&body, b"ok");
    }
}
