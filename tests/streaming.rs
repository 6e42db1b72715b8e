//! Bodies that stream and connections that upgrade, through the proxy.
//!
//! Owns: server-sent events arriving event by event, large request bodies
//! reaching the upstream intact and before the client has finished sending,
//! and WebSocket tunnels routed at the handshake. Deterministic: the backends
//! wait for the test's signal, so nothing here depends on timing. Does not
//! own: rollback of open streams (not part of this build's data path tests).

mod support;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::Method;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use support::{
    Backend, CANARY, Http, STABLE, SseBackend, WsBackend, client, cohort, eventually, read_whole,
    request, sha256_hex, within,
};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

#[tokio::test]
async fn server_sent_events_arrive_one_by_one() {
    let sse = SseBackend::start(STABLE).await;
    let server = cohort(&[sse.addr], None, "").await;
    let rsp = Http::new(server.proxy_addr())
        .get_streaming(
            "/events",
            &[("x-user-id", "alice"), ("accept", "text/event-stream")],
        )
        .await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.headers()["x-agent-version"], STABLE);
    assert_eq!(rsp.headers()["content-type"], "text/event-stream");
    let mut body = rsp.into_body();

    // The backend holds the second event until we say so: if the proxy
    // buffered the body, the first would never arrive and this would time out.
    let mut received = Vec::new();
    while received.len() < SseBackend::FIRST.len() {
        let frame = within("the first event", body.frame())
            .await
            .expect("the stream is open")
            .expect("a good frame");
        received.extend_from_slice(frame.data_ref().expect("a data frame"));
    }
    assert_eq!(received, SseBackend::FIRST.as_bytes());
    assert!(
        !sse.second_sent(),
        "the first event came before the second was sent"
    );

    sse.finish(body).await;
    assert!(sse.second_sent());
}

/// A body of `len` bytes that is not a repeated pattern, so a lost or swapped
/// chunk changes its digest.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_request_body_streams_to_the_upstream_intact() {
    const CHUNK: usize = 256 * 1024;
    const CHUNKS: usize = 24; // 6 MiB
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, "").await;

    let payload = noise(CHUNK * CHUNKS, 0x5eed);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    // Boxed and pinned: the pooled client wants an `Unpin` body.
    let frames = Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|data| (Ok::<_, std::convert::Infallible>(Frame::data(data)), rx))
    }));
    let req = request(
        Method::POST,
        server.proxy_addr(),
        "/upload",
        &[
            ("x-user-id", "bob"),
            ("content-length", &payload.len().to_string()),
        ],
        StreamBody::new(frames),
    );
    let response = tokio::spawn(client().request(req));

    // Send the first chunk only, and wait until the upstream has it: a proxy
    // that buffered the whole body would never pass it on, and this fails.
    let chunks: Vec<Bytes> = payload.chunks(CHUNK).map(Bytes::copy_from_slice).collect();
    tx.send(chunks[0].clone())
        .await
        .expect("the client takes the body");
    eventually("the first chunk reaching the upstream", || {
        stable.body_bytes_seen() > 0
    })
    .await;
    for chunk in &chunks[1..] {
        within("sending a chunk", tx.send(chunk.clone()))
            .await
            .expect("the client takes the body");
    }
    drop(tx);

    let rsp = within("the upload's response", response)
        .await
        .expect("the client task ran")
        .expect("the proxy answers");
    let reply = read_whole(rsp).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.version(), STABLE);
    let echo = reply.json();
    assert_eq!(echo["body_len"], payload.len());
    assert_eq!(echo["body_sha256"], sha256_hex(&payload));
    assert_eq!(echo["method"], "POST");
}

#[tokio::test]
async fn a_chunked_request_body_arrives_intact() {
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, "").await;
    let payload = noise(3 * 1024 * 1024 + 17, 42);
    // No content-length: hyper's client sends the unknown-length body chunked.
    let frames = futures_util::stream::iter(
        payload
            .chunks(100_000)
            .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::copy_from_slice(c))))
            .collect::<Vec<_>>(),
    );
    let req = request(
        Method::PUT,
        server.proxy_addr(),
        "/blob",
        &[],
        StreamBody::new(frames),
    );
    let rsp = within("the response", client().request(req))
        .await
        .expect("the proxy answers");
    let echo = read_whole(rsp).await.json();
    assert_eq!(echo["body_len"], payload.len());
    assert_eq!(echo["body_sha256"], sha256_hex(&payload));
}

/// hyper's client sends a GET of unknown length without its body unless
/// told otherwise; a search API's chunked GET body must still arrive.
#[tokio::test]
async fn a_chunked_get_body_arrives() {
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, "").await;
    let body = r#"{"query": {"match_all": {}}}"#;
    let request = format!(
        "GET /search HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let reply = support::raw_exchange(server.proxy_addr(), request.as_bytes()).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let echo = reply.json();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["body_len"], body.len(), "{echo}");
    assert_eq!(echo["body_sha256"], sha256_hex(body.as_bytes()));
}

#[tokio::test]
async fn websockets_are_tunnelled_to_the_version_of_the_handshake() {
    let stable = WsBackend::start(STABLE).await;
    let canary = WsBackend::start(CANARY).await;
    let server = cohort(&[stable.addr], Some((&[canary.addr], 50.0)), "").await;

    // alice is on the canary at 50% under salt v2, bob on stable (SPEC vectors).
    for (key, version) in [("alice", CANARY), ("bob", STABLE)] {
        let mut handshake = format!("ws://{}/socket", server.proxy_addr())
            .into_client_request()
            .expect("a ws URL");
        handshake
            .headers_mut()
            .insert("x-user-id", key.parse().expect("a header value"));
        let (mut ws, rsp) = within("the handshake", tokio_tungstenite::connect_async(handshake))
            .await
            .unwrap_or_else(|e| panic!("{key}: the handshake failed: {e}"));
        assert_eq!(rsp.status(), 101);
        assert_eq!(rsp.headers()["x-agent-version"], version, "{key}");

        for i in 0..3 {
            ws.send(Message::text(format!("hello {i}")))
                .await
                .expect("send");
            let echo = within("the echo", ws.next())
                .await
                .expect("the tunnel is open")
                .expect("a good message");
            assert_eq!(echo, Message::text(format!("{version}:hello {i}")), "{key}");
        }
        let blob = Bytes::from(noise(200_000, 9));
        ws.send(Message::Binary(blob.clone())).await.expect("send");
        let echo = within("the binary echo", ws.next())
            .await
            .expect("the tunnel is open")
            .expect("a good message");
        assert_eq!(echo, Message::Binary(blob), "{key}");
        ws.close(None).await.expect("close");
    }
}
