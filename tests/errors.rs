//! The proxy's own error responses when an upstream fails.
//!
//! Owns: 502 for an upstream that refuses connections or answers with
//! something that is not HTTP, 504 for one that does not answer in
//! `upstream.response_timeout` (counted from the request body's last
//! byte, so a long upload is not cut off), the exact JSON body of SPEC section 2, the
//! version tag on errors, that one version's failure does not touch the
//! other's traffic, that a refused connection moves on to the version's
//! next upstream, that an idempotent request lost on a kept-alive
//! connection the upstream closed is sent again (and a `POST` is not),
//! that one a new connection closes unanswered goes on to the next
//! upstream, that an upstream hanging up mid-body is counted as a reset
//! (and a client breaking its upload off is not, nor is a chunked body
//! that does not parse, which is a `bad_request`), that an upload whose
//! upstream answered early is cut once its client falls silent for the
//! response timeout, that a `101` naming no
//! protocol is a 502, as is a head of too many fields (saying so), that the log names an upstream that failed,
//! and that a client that stops reading a response is cut off at
//! `listen.send_timeout` (with the upstream connection it held) while a
//! stream that is merely quiet is not.
//! Does not own: malformed client requests (`tests/smuggling.rs`).

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use support::{
    Backend, CANARY, Http, STABLE, SlowBackend, cohort, dead_addr, key_on, metric, within,
};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Checks the SPEC error body: exactly `error`, `version` and a non-empty
/// string `detail`, with `application/json`.
fn assert_error_body(reply: &support::Reply, kind: &str, version: &str) {
    assert_eq!(
        reply.headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/json"[..]),
        "{reply:?}"
    );
    let json = reply.json();
    let object = json.as_object().expect("the error body is a JSON object");
    let mut fields: Vec<&str> = object.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(fields, ["detail", "error", "version"], "{json}");
    assert_eq!(json["error"], kind, "{json}");
    assert_eq!(json["version"], version, "{json}");
    let detail = json["detail"].as_str().expect("detail is a string");
    assert!(!detail.is_empty(), "{json}");
    assert_eq!(reply.version(), version, "errors are tagged too");
}

/// A `GET /` for `bob` on a connection of its own to `proxy`, and the
/// answer's head; the connection is left open for the rest.
async fn get_head(proxy: SocketAddr) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(proxy).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-user-id: bob\r\n\r\n")
        .await
        .expect("send a request");
    let head = support::read_head(&mut stream).await;
    (stream, head)
}

/// A connection to `proxy` with the head of a `length`-byte upload sent,
/// its body to come.
async fn upload_head(proxy: SocketAddr, length: usize) -> TcpStream {
    let mut stream = TcpStream::connect(proxy).await.expect("connect");
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: x\r\nx-user-id: alice\r\ncontent-length: {length}\r\n\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .await
        .expect("send the head");
    stream
}

/// An upstream that passes the health probe made before the proxy accepts
/// (its one connection), then refuses every connection: a canary that
/// opened, then died.
async fn dies_after_its_first_probe() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("the probe connects");
        // Closed before the answer, so nothing after the probe connects.
        drop(listener);
        support::read_head(&mut stream).await;
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        stream.write_all(answer).await.expect("answer the probe");
    });
    addr
}

/// With `canary_unavailable = "error"`: in the default mode, stable
/// answers a request that the canary refuses (`health` tests).
#[tokio::test]
async fn a_dead_canary_gives_502_to_its_cohort_only() {
    let stable = Backend::start(STABLE).await;
    let dead = dies_after_its_first_probe().await;
    let no_fallback = "[health]\ncanary_unavailable = \"error\"\n";
    let server = cohort(&[stable.addr], Some((&[dead], 50.0)), no_fallback).await;
    let http = Http::new(server.proxy_addr());
    let on_canary = key_on(CANARY, 50.0, CANARY, "c");
    let on_stable = key_on(CANARY, 50.0, STABLE, "s");

    for _ in 0..3 {
        let reply = http.get("/", &[("x-user-id", &on_canary)]).await;
        assert_eq!(reply.status, 502, "{reply:?}");
        assert_error_body(&reply, "connect", CANARY);

        let reply = http.get("/", &[("x-user-id", &on_stable)]).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.version(), STABLE);
        assert_eq!(reply.backend(), STABLE);
    }
    assert_eq!(stable.hits(), 3);
}

#[tokio::test]
async fn a_refused_connection_goes_to_the_versions_next_upstream() {
    let live = Backend::start(STABLE).await;
    let dead = dead_addr().await;
    // One probe at start (below the unhealthy threshold) and no passive
    // ejection: the dead upstream stays in the rotation, so every other
    // request meets it first.
    let health = "[health]\ninterval = \"1h\"\neject_after_errors = 1000\n";
    let server = cohort(&[dead, live.addr], None, health).await;
    let http = Http::new(server.proxy_addr());

    for _ in 0..6 {
        let reply = http.get("/", &[("x-user-id", "u")]).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.backend(), STABLE);
    }
    assert_eq!(live.hits(), 6);
    // The refusals are still counted, though no client saw them.
    let labels = [("version", STABLE), ("kind", "connect")];
    let refused = metric(&server, "cohort_upstream_errors_total", &labels).await;
    assert!(refused.is_some_and(|n| n >= 3.0), "{refused:?}");
}

#[tokio::test]
async fn a_slow_upstream_gives_504_after_the_response_timeout() {
    let slow = SlowBackend::start(STABLE).await;
    let upstream = "[upstream]\nresponse_timeout = \"200ms\"\n";
    let server = cohort(&[slow.addr], None, upstream).await;

    let reply = Http::new(server.proxy_addr())
        .get("/", &[("x-user-id", "alice")])
        .await;
    assert_eq!(reply.status, 504, "{reply:?}");
    assert_error_body(&reply, "timeout", STABLE);
    assert_eq!(slow.hits(), 1, "the request did reach the upstream");
    slow.release();
}

#[tokio::test]
async fn an_upload_outlasting_the_response_timeout_is_not_cut_off_but_a_stalled_one_is() {
    let stable = Backend::start(STABLE).await;
    // One upstream error would eject the only upstream (then a 503). The
    // version has a name of its own, so that the upstream error counter
    // read below is this server's alone (the metrics are the process's).
    const VERSION: &str = "stalled-uploads";
    let upstream = "[upstream]\nresponse_timeout = \"2s\"\n\n[health]\neject_after_errors = 1\n";
    let toml = support::config(&[stable.addr], None, upstream).replace(
        &format!("name = \"{STABLE}\""),
        &format!("name = \"{VERSION}\""),
    );
    let server = support::start_cohort(&toml).await;
    // A connection with the head of a 20-byte upload sent, its body to come.
    let upload = || upload_head(server.proxy_addr(), 20);

    // Twenty chunks 150 ms apart: half as long again as the timeout in
    // all, and never more than a small part of it without one.
    let mut stream = upload().await;
    for _ in 0..20 {
        // Pacing the upload is the point of the test, not a wait for anything.
        tokio::time::sleep(Duration::from_millis(150)).await;
        stream.write_all(b"x").await.expect("send a chunk");
    }
    let answer = support::read_head(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(stable.body_bytes_seen(), 20);

    // A body whose client stops sending still times out, a timeout after
    // its last byte: a 408 (nginx's `client_body_timeout`), which the
    // upstream is not blamed for, and the connection closes.
    let timeouts = [("version", VERSION), ("kind", "timeout")];
    let before = metric(&server, "cohort_upstream_errors_total", &timeouts).await;
    let mut stream = upload().await;
    stream.write_all(b"xxxxx").await.expect("send a part");
    let answer = support::read_head(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    let mut rest = Vec::new();
    within("the close", stream.read_to_end(&mut rest))
        .await
        .expect("read to the close");
    assert!(String::from_utf8_lossy(&rest).contains("\"client_timeout\""));
    assert_eq!(
        metric(&server, "cohort_upstream_errors_total", &timeouts).await,
        before
    );
    let reply = Http::new(server.proxy_addr())
        .get("/after", &[("x-user-id", "alice")])
        .await;
    assert_eq!(reply.status, 200, "the upstream was ejected: {reply:?}");
}

#[tokio::test]
async fn an_upload_answered_early_is_cut_once_its_client_falls_silent_for_the_timeout() {
    // An upstream that answers 401 as soon as it has the head, reads none
    // of the body, and keeps its connection open: only the proxy can end
    // the exchange.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("an address");
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let ended_tx = ended_tx.clone();
            tokio::spawn(async move {
                let head = support::read_head(&mut stream).await;
                if head.starts_with("POST") {
                    let answer = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n";
                    let _ = stream.write_all(answer).await;
                    // Reads on only to see the proxy close the connection.
                    let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
                    let _ = ended_tx.send(());
                } else {
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    let _ = stream.write_all(answer).await;
                }
            });
        }
    });
    let server = support::start_cohort(&support::config(
        &[upstream],
        None,
        "[upstream]\nresponse_timeout = \"1s\"\n",
    ))
    .await;

    let mut stream = upload_head(server.proxy_addr(), 1_000_000).await;
    stream.write_all(b"0123456789").await.expect("send a part");
    let answer = support::read_head(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    // The client sends nothing more: a timeout after its last byte, the
    // proxy closes its connection, and the upstream's.
    let mut rest = Vec::new();
    within(
        "the client connection's close",
        stream.read_to_end(&mut rest),
    )
    .await
    .expect("read to the close");
    within("the upstream connection's close", ended.recv())
        .await
        .expect("the upstream saw its connection end");
}

#[tokio::test]
async fn an_upload_its_client_breaks_off_is_not_counted_against_the_upstream() {
    let stable = Backend::start(STABLE).await;
    // One error counted against the only upstream would eject it (then a
    // 503); the version's own name keeps its counters this server's alone.
    const VERSION: &str = "broken-off-uploads";
    let toml = support::config(&[stable.addr], None, "[health]\neject_after_errors = 1\n").replace(
        &format!("name = \"{STABLE}\""),
        &format!("name = \"{VERSION}\""),
    );
    let server = support::start_cohort(&toml).await;
    let kinds = ["connect", "timeout", "reset", "protocol"];
    let upstream_errors = || {
        support::metric_sum(
            &server,
            "cohort_upstream_errors_total",
            VERSION,
            "kind",
            &kinds,
        )
    };
    // Answered 400, or 499 if it went away first: the client's doing either way.
    let by_the_client = || {
        support::metric_sum(
            &server,
            "cohort_requests_total",
            VERSION,
            "code",
            &["400", "499"],
        )
    };
    // The head of a 1000-byte upload and 10 bytes of its body.
    let part_of_an_upload = || async {
        let mut stream = upload_head(server.proxy_addr(), 1000).await;
        stream.write_all(&[b'x'; 10]).await.expect("send a part");
        stream
    };

    // A client that half-closes is told the body was broken off, by it.
    let mut stream = part_of_an_upload().await;
    stream.shutdown().await.expect("half-close");
    let answer = support::read_head(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let mut rest = Vec::new();
    within("the close", stream.read_to_end(&mut rest))
        .await
        .expect("read to the close");
    assert!(
        String::from_utf8_lossy(&rest).contains("\"client_closed\""),
        "{}",
        String::from_utf8_lossy(&rest)
    );

    // One that goes away altogether is recorded, as the client's doing too.
    let before = by_the_client().await;
    drop(part_of_an_upload().await);
    support::eventually_async("the broken-off upload is recorded", || async {
        by_the_client().await > before
    })
    .await;

    assert_eq!(upstream_errors().await, 0.0, "the upstream was blamed");
    let reply = Http::new(server.proxy_addr())
        .get("/after", &[("x-user-id", "alice")])
        .await;
    assert_eq!(reply.status, 200, "the upstream was ejected: {reply:?}");
}

/// A chunked body that does not parse (a chunk size, a trailer line) is
/// the client's bad request, said so: `bad_request`, not a close.
#[tokio::test]
async fn a_chunked_body_that_does_not_parse_is_a_bad_request() {
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, "").await;
    for (what, body) in [
        ("a chunk size", "5\r\nhello\r\nzz\r\n"),
        ("a trailer line", "5\r\nhello\r\n0\r\nno colon here\r\n\r\n"),
    ] {
        let request =
            format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{body}");
        let reply = support::raw_exchange(server.proxy_addr(), request.as_bytes()).await;
        assert_eq!(reply.status, 400, "{what}: {reply:?}");
        assert_eq!(reply.json()["error"], "bad_request", "{what}: {reply:?}");
        assert_eq!(reply.header("x-agent-version"), Some(STABLE), "{what}");
    }
}

/// An upstream that answers an upload early and streams its answer, and a
/// client that then resets its connection with its upload unfinished: hyper
/// drops the upstream connection for the broken upload, and the cut that
/// follows is the client's doing, not the upstream's.
#[tokio::test]
async fn an_upload_broken_off_after_an_early_answer_is_not_counted_against_the_upstream() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("an address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let head = support::read_head(&mut stream).await;
                if !head.starts_with("POST") {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    return;
                }
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nearly\r\n",
                    )
                    .await;
                // Paced: a chunk every 100 ms, until the proxy lets go.
                for _ in 0..50 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if stream.write_all(b"1\r\nx\r\n").await.is_err() {
                        return;
                    }
                }
                let _ = stream.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    const VERSION: &str = "broken-off-after-answer";
    let toml = support::config(&[upstream], None, "").replace(
        &format!("name = \"{STABLE}\""),
        &format!("name = \"{VERSION}\""),
    );
    let server = support::start_cohort(&toml).await;
    for _ in 0..3 {
        let mut stream = upload_head(server.proxy_addr(), 1000).await;
        stream.write_all(&[b'x'; 10]).await.expect("send a part");
        let head = support::read_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        // Paced: some of the streamed answer comes first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream.set_zero_linger().expect("a reset on drop");
        drop(stream);
    }
    // Each answer's end, however it came, is recorded by then.
    support::eventually_async("the answers to end", || async {
        metric(
            &server,
            "cohort_requests_in_flight",
            &[("version", VERSION)],
        )
        .await
            == Some(0.0)
    })
    .await;
    let upstream_errors = support::metric_sum(
        &server,
        "cohort_upstream_errors_total",
        VERSION,
        "kind",
        &["connect", "timeout", "reset", "protocol"],
    )
    .await;
    assert_eq!(
        upstream_errors, 0.0,
        "the upstream was blamed for the client's reset"
    );
}

#[tokio::test]
async fn an_upload_that_its_upstream_stops_reading_gives_504() {
    // An upstream that reads the request head and then nothing more.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = support::read_head(&mut stream).await;
            held.push(stream);
        }
    });
    let upstream = "[upstream]\nresponse_timeout = \"1s\"\n";
    let server = cohort(&[addr], None, upstream).await;
    let mut stream = TcpStream::connect(server.proxy_addr())
        .await
        .expect("connect");
    // More than the sockets on the way can hold, so the body stalls on the
    // upstream while the client still has plenty to send.
    const LEN: usize = 64 << 20;
    let head = format!("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {LEN}\r\n\r\n");
    stream
        .write_all(head.as_bytes())
        .await
        .expect("send the head");
    let (mut reader, mut writer) = stream.into_split();
    let sender = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..LEN / chunk.len() {
            if writer.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let answer = within("the 504", support::read_head(&mut reader)).await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    sender.abort();
}

#[tokio::test]
async fn a_101_that_names_no_protocol_is_a_502() {
    let addr = support::raw_upstream(b"HTTP/1.1 101 Switching Protocols\r\n\r\n").await;
    let server = cohort(&[addr], None, "").await;
    let mut stream = within("connect", TcpStream::connect(server.proxy_addr()))
        .await
        .expect("connect");
    let handshake = "GET /ws HTTP/1.1\r\nhost: x\r\nx-user-id: bob\r\n\
                     connection: upgrade\r\nupgrade: websocket\r\n\
                     sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    stream
        .write_all(handshake.as_bytes())
        .await
        .expect("send the handshake");
    let head = support::read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(head.contains(STABLE), "{head}");
}

/// A GET through Cohort to an upstream that answers `answer` gets a 502
/// `protocol`, returned.
async fn assert_protocol_error_for(answer: &'static [u8]) -> support::Reply {
    let addr = support::raw_upstream(answer).await;
    let server = cohort(&[addr], None, "").await;
    let reply = within(
        "the 502",
        Http::new(server.proxy_addr()).get("/", &[("x-user-id", "bob")]),
    )
    .await;
    assert_eq!(reply.status, 502, "{reply:?}");
    assert_error_body(&reply, "protocol", STABLE);
    reply
}

#[tokio::test]
async fn an_upstream_that_does_not_speak_http_gives_502() {
    assert_protocol_error_for(b"this is not http\r\n\r\n").await;
}

/// A head of too many fields is a 502 whose detail says that too, not
/// only a size: hyper calls both "too large".
#[tokio::test]
async fn a_head_of_too_many_fields_gives_502_saying_so() {
    let fields: String = (0..150).map(|i| format!("x-field-{i}: 1\r\n")).collect();
    let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n{fields}\r\n");
    let reply = assert_protocol_error_for(answer.leak().as_bytes()).await;
    let detail = reply.json()["detail"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(detail.contains("over 100 header fields"), "{detail}");
}

#[tokio::test]
async fn a_response_under_a_transfer_coding_other_than_chunked_gives_502() {
    // The body is chunked over gzip: passed on without its header, the
    // client would get gzip bytes it has no way to know of.
    assert_protocol_error_for(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
}

/// hyper, handed a head whose body fails at once, would drop the
/// connection without sending the head: the client would get no answer at
/// all. It gets the head, then the cut, as nginx's clients do.
#[tokio::test]
async fn an_upstream_that_breaks_its_body_as_its_head_comes_still_gets_the_head_to_the_client() {
    // A chunk size that is not one, in the read that brings the head.
    let addr =
        support::raw_upstream(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n").await;
    let server = cohort(&[addr], None, "").await;
    for _ in 0..20 {
        let (mut stream, head) = get_head(server.proxy_addr()).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.contains(&format!("x-agent-version: {STABLE}")),
            "{head}"
        );
        // Then the cut: the connection ends with the body unfinished.
        let mut rest = Vec::new();
        let _ = within("the cut", stream.read_to_end(&mut rest)).await;
        assert!(!rest.ends_with(b"0\r\n\r\n"), "{rest:?}");
    }
}

#[tokio::test]
async fn an_upstream_that_hangs_up_mid_body_is_counted_as_a_reset() {
    // Ten bytes of the thousand it announced, then the connection closes.
    let addr =
        support::raw_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789").await;
    let server = cohort(&[addr], None, "").await;
    let labels = [("version", STABLE), ("kind", "reset")];
    let before = metric(&server, "cohort_upstream_errors_total", &labels)
        .await
        .unwrap_or(0.0);

    let (mut stream, head) = get_head(server.proxy_addr()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The client sees the body cut short: the connection ends early.
    let mut body = Vec::new();
    let _ = within("the cut body", stream.read_to_end(&mut body)).await;
    assert!(body.len() < 1000, "{}", body.len());
    support::eventually_async("the reset to be counted", || async {
        metric(&server, "cohort_upstream_errors_total", &labels).await > Some(before)
    })
    .await;
}

#[tokio::test]
async fn an_upstream_that_hangs_up_gives_502() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            // Read the request head, then close without a word.
            let mut head = [0u8; 1024];
            let _ = stream.read(&mut head).await;
            drop(stream);
        }
    });
    let server = cohort(&[addr], None, "").await;
    let reply = Http::new(server.proxy_addr()).get("/", &[]).await;
    assert_eq!(reply.status, 502, "{reply:?}");
    assert_error_body(&reply, "reset", STABLE);
}

/// An upstream that answers the first `answers` requests on each
/// connection, keeping it alive, and closes it, unanswered, on reading the
/// next: with one, what a server whose keep-alive timeout runs out just as
/// a request arrives does; with none, a sidecar whose app is down.
struct ClosingBackend {
    addr: SocketAddr,
    /// The request lines read, in order.
    seen: Arc<Mutex<Vec<String>>>,
}

impl ClosingBackend {
    async fn start(answers: usize) -> ClosingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("an address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(Self::serve(stream, answers, Arc::clone(&log)));
            }
        });
        ClosingBackend { addr, seen }
    }

    async fn serve(stream: TcpStream, answers: usize, seen: Arc<Mutex<Vec<String>>>) {
        let mut stream = BufReader::new(stream);
        for answered in (0..=answers).map(|i| i < answers) {
            let Some(line) = read_request(&mut stream).await else {
                return;
            };
            seen.lock().expect("the log").push(line);
            if answered {
                let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if stream.get_mut().write_all(ok).await.is_err() {
                    return;
                }
            }
        }
    }

    fn seen(&self, request_line: &str) -> usize {
        let seen = self.seen.lock().expect("the log");
        seen.iter().filter(|line| *line == request_line).count()
    }

    fn seen_starting(&self, prefix: &str) -> usize {
        let seen = self.seen.lock().expect("the log");
        seen.iter().filter(|line| line.starts_with(prefix)).count()
    }
}

/// Reads one request (head, and a `content-length` body) and returns its
/// request line; `None` at the end of the connection.
async fn read_request(stream: &mut BufReader<TcpStream>) -> Option<String> {
    let mut request_line = String::new();
    if stream.read_line(&mut request_line).await.ok()? == 0 {
        return None;
    }
    let mut length = 0;
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.ok()?;
    Some(request_line.trim_end().to_owned())
}

#[tokio::test]
async fn a_get_lost_on_a_closed_keepalive_connection_is_sent_again_and_a_post_is_not() {
    let upstream = ClosingBackend::start(1).await;
    // No probe after the first, which would meet the closing upstream too.
    let health = "[health]\ninterval = \"1h\"\n";
    let server = cohort(&[upstream.addr], None, health).await;
    let http = Http::new(server.proxy_addr());
    let user = [("x-user-id", "alice")];
    assert_eq!(http.get("/first", &user).await.status, 200);

    // Only a connection idle for a second or more keeps a copy to send
    // again, so the client pauses that long (the idleness is what is tested).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reply = http.get("/second", &user).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(upstream.seen("GET /second HTTP/1.1"), 2);

    // The new connection has answered once: the next request meets the
    // close. A POST, even without a body, is not sent twice.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reply = http.send(Method::POST, "/third", &user, Bytes::new()).await;
    assert_eq!(reply.status, 502, "{reply:?}");
    assert_error_body(&reply, "reset", STABLE);
    assert_eq!(upstream.seen("POST /third HTTP/1.1"), 1);
}

#[tokio::test]
async fn a_get_a_new_connection_closes_unanswered_goes_to_the_next_upstream_and_a_post_does_not() {
    let closing = ClosingBackend::start(0).await;
    let good = Backend::start(STABLE).await;
    // Neither probes nor passive ejection may take the closing upstream out.
    let health = "[health]\ninterval = \"1h\"\neject_after_errors = 1000\n";
    let server = cohort(&[closing.addr, good.addr], None, health).await;
    let http = Http::new(server.proxy_addr());

    // Round-robin starts half of them on the closing upstream.
    for i in 0..4 {
        let reply = http.get(&format!("/get-{i}"), &[]).await;
        assert_eq!(reply.status, 200, "GET {i}: {reply:?}");
        assert_eq!(reply.backend(), STABLE, "GET {i}: {reply:?}");
    }
    assert!(
        closing.seen_starting("GET /get-") >= 1,
        "no GET met the closing upstream"
    );
    assert_eq!(good.hits(), 4);

    // A POST that met it may have run there: it is not sent twice.
    let mut failed = 0;
    for i in 0..4 {
        let reply = http
            .send(Method::POST, &format!("/post-{i}"), &[], Bytes::new())
            .await;
        if reply.status == 502 {
            assert_error_body(&reply, "reset", STABLE);
            failed += 1;
        } else {
            assert_eq!(reply.status, 200, "POST {i}: {reply:?}");
        }
    }
    assert!(failed >= 1, "no POST met the closing upstream");
    assert_eq!(closing.seen_starting("POST /post-"), failed);
    assert_eq!(good.hits(), 4 + 4 - failed);
}

#[tokio::test]
async fn a_client_that_gives_up_before_the_answer_is_counted_as_499() {
    let slow = SlowBackend::start(STABLE).await;
    let server = cohort(&[slow.addr], None, "").await;
    let labels = [("version", STABLE), ("code", "499")];
    assert_eq!(
        metric(&server, "cohort_requests_total", &labels).await,
        None
    );

    let mut stream = TcpStream::connect(server.proxy_addr())
        .await
        .expect("connect");
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\nx-user-id: alice\r\n\r\n")
        .await
        .expect("send a request");
    support::eventually("the request to reach the upstream", || slow.hits() == 1).await;
    // The user closes the tab while the upstream still thinks.
    drop(stream);
    support::eventually_async("the abandoned request to be counted", || async {
        metric(&server, "cohort_requests_total", &labels).await == Some(1.0)
    })
    .await;
    slow.release();
}

/// The log says which upstream failed and how, as nginx's error log does:
/// the client's answer names only the version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upstream_is_named_in_the_log() {
    let addr = support::raw_upstream(b"not HTTP at all\r\n\r\n").await;
    let text = support::config(&[addr], None, "");
    let parsed = cohort::config::Config::parse(&text, "test").expect("a valid test config");
    let path = parsed.state.path.with_file_name("cohort.toml");
    std::fs::write(&path, &text).expect("write the config");
    let process = support::Process::serve(&path, &[]).await;
    let reply = Http::new(process.proxy)
        .get("/", &[("x-user-id", "alice")])
        .await;
    assert_eq!(reply.status, 502, "{reply:?}");
    let line = process
        .log_line(&["upstream request failed", &addr.to_string()])
        .await;
    assert!(line.contains("not valid HTTP"), "{line}");
}

/// A body its upstream cuts has a log line naming the upstream: its client
/// saw a head, so no other line tells of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_by_its_upstream_is_named_in_the_log() {
    let addr =
        support::raw_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789").await;
    let text = support::config(&[addr], None, "");
    let parsed = cohort::config::Config::parse(&text, "test").expect("a valid test config");
    let path = parsed.state.path.with_file_name("cohort.toml");
    std::fs::write(&path, &text).expect("write the config");
    let process = support::Process::serve(&path, &[]).await;
    let (_stream, head) = get_head(process.proxy).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let line = process
        .log_line(&["upstream failed mid-body", &addr.to_string()])
        .await;
    assert!(line.contains(&format!("version={STABLE}")), "{line}");
    assert!(
        line.contains("end of file before message length reached"),
        "{line}"
    );
}

/// The access log has a line for every request, an abandoned one too (as
/// nginx logs its 499s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_its_client_gave_up_on_has_an_access_log_line() {
    let slow = SlowBackend::start(STABLE).await;
    let text = support::config(&[slow.addr], None, "");
    let parsed = cohort::config::Config::parse(&text, "test").expect("a valid test config");
    let path = parsed.state.path.with_file_name("cohort.toml");
    std::fs::write(&path, &text).expect("write the config");
    let process = support::Process::serve(&path, &[]).await;

    let mut stream = TcpStream::connect(process.proxy).await.expect("connect");
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\nx-user-id: alice\r\n\r\n")
        .await
        .expect("send a request");
    support::eventually("the request to reach the upstream", || slow.hits() == 1).await;
    drop(stream);
    let line = process.log_line(&["status=499"]).await;
    assert!(
        line.contains(&format!("agent.version=\"{STABLE}\"")) || line.contains(STABLE),
        "{line}"
    );
    slow.release();
    assert_eq!(process.stop().await, Some(0));
}

/// A config for `stable` with the send timeout of `[listen]` at `timeout`,
/// and a header read timeout short enough that connections are checked
/// every 200 ms.
fn with_send_timeout(stable: SocketAddr, timeout: &str) -> String {
    support::with_listen_keys(
        &support::config(&[stable], None, ""),
        &format!("send_timeout = \"{timeout}\"\nheader_read_timeout = \"600ms\""),
    )
}

/// A connection that has asked `server` for an endless response.
async fn ask_for_endless(server: &cohort::serve::Server) -> TcpStream {
    let mut client = TcpStream::connect(server.proxy_addr())
        .await
        .expect("connect");
    client
        .write_all(b"GET /endless HTTP/1.1\r\nhost: x\r\nx-user-id: alice\r\n\r\n")
        .await
        .expect("send the request");
    client
}

#[tokio::test]
async fn a_client_that_stops_reading_a_response_is_cut_off_at_the_send_timeout() {
    let endless = support::EndlessBackend::start().await;
    let server = support::start_cohort(&with_send_timeout(endless.addr, "1s")).await;

    // The client asks, then reads nothing: the socket buffers fill, and
    // the proxy's writes wait for room that never comes.
    let mut client = ask_for_endless(&server).await;
    support::eventually("the upstream's body is dropped", || endless.dropped() == 1).await;
    // The client's connection is closed too: what was sent before the cut
    // can still be read, and then the stream ends.
    let mut received = Vec::new();
    let _ = within("the close", client.read_to_end(&mut received)).await;
    let start = String::from_utf8_lossy(&received[..received.len().min(64)]).into_owned();
    assert!(start.starts_with("HTTP/1.1 200"), "{start}");
}

#[tokio::test]
async fn a_client_that_reads_slowly_but_steadily_is_not_cut_off() {
    let endless = support::EndlessBackend::start().await;
    let server = support::start_cohort(&with_send_timeout(endless.addr, "1500ms")).await;
    let mut client = ask_for_endless(&server).await;
    // 16 KiB every 30 ms for 3.6 s, about 0.5 MiB/s: far slower than the
    // proxy can write, so its writes keep waiting for room, but never for
    // long. (The pace is the client's, not a wait for the proxy.) Had the
    // proxy cut the connection, the reads would end once the buffers were
    // drained.
    let mut chunk = vec![0; 16 << 10];
    let mut received = 0;
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let n = within("a read", client.read(&mut chunk))
            .await
            .expect("a read");
        assert!(
            n > 0,
            "the proxy closed the connection after {received} bytes"
        );
        received += n;
    }
    assert_eq!(endless.dropped(), 0, "the upstream's body was dropped");
}

#[tokio::test]
async fn a_stream_whose_upstream_is_quiet_for_longer_than_the_send_timeout_is_not_cut() {
    let sse = support::SseBackend::start(STABLE).await;
    let server = support::start_cohort(&with_send_timeout(sse.addr, "200ms")).await;
    let rsp = Http::new(server.proxy_addr())
        .get_streaming("/events", &[("x-user-id", "alice")])
        .await;
    assert_eq!(rsp.status(), 200);
    let mut body = rsp.into_body();
    let mut received = Vec::new();
    while received.len() < support::SseBackend::FIRST.len() {
        let frame = within("the first event", http_body_util::BodyExt::frame(&mut body))
            .await
            .expect("the stream is open")
            .expect("a good frame");
        received.extend_from_slice(frame.data_ref().expect("a data frame"));
    }
    // Seven send timeouts, and idle checks, without a byte from the
    // upstream: the silence is the point of the test, not a wait for
    // anything. The client reads all along, so no write is held up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sse.finish(body).await;
}

/// `cohort serve` on `upstream` (with `extra`), its descriptors then
/// limited to four above those it holds, all four taken by clients, and
/// more clients waiting in the listen backlog, so that any descriptor it
/// frees goes to one of those. Returns the process and the clients, in
/// the order they were accepted.
async fn out_of_descriptors(
    upstream: SocketAddr,
    extra: &str,
) -> (support::Process, Vec<TcpStream>) {
    let text = support::with_listen_keys(&support::config(&[upstream], None, extra), "workers = 1");
    let parsed = cohort::config::Config::parse(&text, "test").expect("a valid test config");
    let path = parsed.state.path.with_file_name("cohort.toml");
    std::fs::write(&path, &text).expect("write the config");
    let process = support::Process::serve(&path, &[]).await;
    // A new descriptor takes the lowest free number.
    let open: std::collections::HashSet<u32> =
        std::fs::read_dir(format!("/proc/{}/fd", process.pid()))
            .expect("the process's descriptors")
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect();
    let lowest_free = (0..).find(|fd| !open.contains(fd)).expect("a free number");
    let limit = format!("--nofile={}", lowest_free + 4);
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &process.pid(), &limit])
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit failed");
    let mut clients = Vec::new();
    for _ in 0..64 {
        clients.push(TcpStream::connect(process.proxy).await.expect("connect"));
    }
    process.log_line(&["accept failed"]).await;
    (process, clients)
}

/// A proxy out of file descriptors cannot connect upstream, and says so
/// with a 503: its own shortage, which ejects no upstream (nginx counts no
/// failed `socket()` against a peer), however low the ejection threshold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_out_of_file_descriptors_answers_503_and_ejects_no_upstream() {
    let backend = Backend::start(STABLE).await;
    // No probe but the one at the start: nothing else opens or frees a
    // descriptor meanwhile.
    let extra = "[health]\ninterval = \"1h\"\neject_after_errors = 1\n";
    let (process, mut clients) = out_of_descriptors(backend.addr, extra).await;

    // The first client was accepted first; its request finds no descriptor.
    let first = &mut clients[0];
    first
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-user-id: alice\r\n\r\n")
        .await
        .expect("send a request");
    let mut head = Vec::new();
    let mut reader = BufReader::new(first);
    while !head.ends_with(b"\r\n\r\n") {
        let read = within("the answer's head", reader.read_until(b'\n', &mut head))
            .await
            .expect("read the answer");
        assert!(read > 0, "closed: {}", String::from_utf8_lossy(&head));
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    let line = process.log_line(&["upstream request failed"]).await;
    assert!(line.contains("Too many open files"), "{line}");

    // With the clients gone, the one upstream serves again, never ejected.
    drop(reader);
    drop(clients);
    let admin = support::AdminApi::new(process.admin);
    let state = admin.state().await;
    assert_eq!(state["stable"]["health"][0]["ejected"], false, "{state:#}");
    let reply = Http::new(process.proxy)
        .get("/", &[("x-user-id", "bob")])
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(backend.hits(), 1);
}

/// A health probe the proxy cannot send for want of descriptors says
/// nothing of the upstream, however low the threshold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_not_sent_for_want_of_descriptors_fails_no_upstream() {
    // Closes each connection after its answer: every probe needs a new one.
    let upstream = support::raw_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
    )
    .await;
    let extra = "[health]\ninterval = \"100ms\"\nunhealthy_threshold = 1\n\
                 healthy_threshold = 1000\n";
    let (process, clients) = out_of_descriptors(upstream, extra).await;
    let line = process.log_line(&["health probe not sent"]).await;
    assert!(line.contains("Too many open files"), "{line}");

    drop(clients);
    let state = support::AdminApi::new(process.admin).state().await;
    assert_eq!(state["stable"]["health"][0]["healthy"], true, "{state:#}");
}
