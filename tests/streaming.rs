//! Bodies that stream and connections that upgrade, through the proxy.
//!
//! Owns: server-sent events arriving event by event, large request bodies
//! reaching the upstream intact and before the client has finished sending,
//! WebSocket tunnels routed at the handshake, tunnels closed when idle
//! or unread, and response streams cut when their upstream falls silent
//! (but not while their client streams to it), and a chunked upload to an
//! upstream that answers in HTTP/1.0.
//! The backends wait for the test's signal; the idle timeouts are short,
//! and only the tests that keep a tunnel or a stream busy past its idle
//! timeout pace themselves by the clock. Does not own: rollback of open streams
//! (`control_streams`).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::Method;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use support::{
    Backend, CANARY, Http, STABLE, SseBackend, SseTicker, WsBackend, client, cohort, eventually,
    eventually_async, metric, read_head, read_until, read_whole, request, sha256_hex, within,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
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

/// A config for `stable` whose `[listen]` section has `keys` added, with a
/// header read timeout short enough that connections are checked often.
fn with_listen(stable: SocketAddr, keys: &str) -> String {
    support::with_listen_keys(
        &support::config(&[stable], None, ""),
        &format!("{keys}\nheader_read_timeout = \"600ms\""),
    )
}

/// A WebSocket through `server`, with one message echoed to show it open.
async fn open_websocket(
    server: &cohort::serve::Server,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>> {
    let url = format!("ws://{}/socket", server.proxy_addr());
    let (mut ws, rsp) = within("the handshake", tokio_tungstenite::connect_async(url))
        .await
        .expect("the handshake");
    assert_eq!(rsp.status(), 101);
    ws.send(Message::text("hello")).await.expect("send");
    let echo = within("the echo", ws.next())
        .await
        .expect("the tunnel is open")
        .expect("a good message");
    assert_eq!(echo, Message::text(format!("{STABLE}:hello")));
    ws
}

#[tokio::test]
async fn a_websocket_quiet_for_the_tunnel_idle_timeout_is_closed() {
    let stable = WsBackend::start(STABLE).await;
    let server =
        support::start_cohort(&with_listen(stable.addr, "tunnel_idle_timeout = \"300ms\"")).await;
    let mut ws = open_websocket(&server).await;
    // Nothing is sent: the proxy closes the tunnel, and the client's stream
    // ends (without a close frame: the proxy speaks no WebSocket).
    let end = within("the tunnel to close", ws.next()).await;
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
}

#[tokio::test]
async fn a_websocket_in_use_outlives_the_tunnel_idle_timeout() {
    let stable = WsBackend::start(STABLE).await;
    let server =
        support::start_cohort(&with_listen(stable.addr, "tunnel_idle_timeout = \"400ms\"")).await;
    let mut ws = open_websocket(&server).await;
    // A message every 100 ms for 2 s: five idle timeouts long, never quiet
    // for one. (The pace is the client's, not a wait for the proxy.)
    for i in 0..20 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        ws.send(Message::text(format!("{i}")))
            .await
            .unwrap_or_else(|e| panic!("message {i}: {e}"));
        let echo = within("the echo", ws.next())
            .await
            .unwrap_or_else(|| panic!("the tunnel closed before message {i}"))
            .expect("a good message");
        assert_eq!(echo, Message::text(format!("{STABLE}:{i}")));
    }
}

/// An upstream that switches every request (but Cohort's health probes) to
/// protocol `flood` and then writes to it without end, until a write fails:
/// the connection was cut.
struct FloodUpstream {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
}

impl FloodUpstream {
    async fn start() -> FloodUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("an address");
        let cut = Arc::new(AtomicBool::new(false));
        let noted = Arc::clone(&cut);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let noted = Arc::clone(&noted);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        match stream.read_u8().await {
                            Ok(byte) => head.push(byte),
                            Err(_) => return,
                        }
                    }
                    if String::from_utf8_lossy(&head)
                        .to_ascii_lowercase()
                        .contains("user-agent: cohort-health-check")
                    {
                        let ok =
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                        let _ = stream.write_all(ok).await;
                        return;
                    }
                    let switch = b"HTTP/1.1 101 Switching Protocols\r\n\
                        connection: upgrade\r\nupgrade: flood\r\n\r\n";
                    if stream.write_all(switch).await.is_err() {
                        return;
                    }
                    let chunk = vec![b'x'; 64 << 10];
                    while stream.write_all(&chunk).await.is_ok() {}
                    noted.store(true, Ordering::SeqCst);
                });
            }
        });
        FloodUpstream { addr, cut }
    }

    fn was_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn a_tunnel_whose_client_stops_reading_is_cut_at_the_send_timeout() {
    let flood = FloodUpstream::start().await;
    let server = support::start_cohort(&with_listen(flood.addr, "send_timeout = \"1s\"")).await;
    let mut client = TcpStream::connect(server.proxy_addr())
        .await
        .expect("connect");
    client
        .write_all(
            b"GET /flood HTTP/1.1\r\nhost: x\r\nx-user-id: alice\r\n\
              connection: upgrade\r\nupgrade: flood\r\n\r\n",
        )
        .await
        .expect("send the upgrade request");
    // The client reads nothing: the socket buffers fill, and the proxy's
    // writes wait for room that never comes. (The tunnel is never idle
    // from the upstream's side.)
    support::eventually("the upstream's connection to be cut", || flood.was_cut()).await;
    // The client's connection is closed too: what was sent before the cut
    // can still be read, and then the stream ends.
    let mut received = Vec::new();
    let _ = within("the close", client.read_to_end(&mut received)).await;
    let start = String::from_utf8_lossy(&received[..received.len().min(64)]).into_owned();
    assert!(start.starts_with("HTTP/1.1 101"), "{start}");
}

#[tokio::test]
async fn a_client_streaming_to_a_quiet_upstream_is_not_cut_at_the_stream_idle_timeout() {
    // An upstream that sends its response head at once, then nothing until
    // the request body has ended: the client's side of the stream is the
    // only one that moves meanwhile.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("an address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = support::read_head(&mut stream).await;
                if !seen.starts_with("POST") {
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    let _ = stream.write_all(answer).await;
                    return;
                }
                let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                let _ = stream.write_all(head).await;
                let mut buf = [0; 1024];
                while !seen.ends_with("0\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                    }
                }
                let _ = stream.write_all(b"4\r\ndone\r\n0\r\n\r\n").await;
            });
        }
    });
    let server = cohort(
        &[upstream],
        None,
        "[upstream]\nstream_idle_timeout = \"1s\"\n",
    )
    .await;
    let mut client = TcpStream::connect(server.proxy_addr())
        .await
        .expect("connect");
    let head = "POST /stream HTTP/1.1\r\nhost: x\r\nx-user-id: alice\r\n\
                transfer-encoding: chunked\r\n\r\n";
    client
        .write_all(head.as_bytes())
        .await
        .expect("send the head");
    let answer = support::read_head(&mut client).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // A chunk every 250 ms, for three times the limit.
    for _ in 0..12 {
        // The client's pace, not a wait for anything.
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        client
            .write_all(b"1\r\nx\r\n")
            .await
            .expect("the stream is open");
    }
    client
        .write_all(b"0\r\n\r\n")
        .await
        .expect("the stream is open");
    // The answer's end, or the connection's close if the stream was cut.
    let rest = within("the answer's end", async {
        let mut rest = String::new();
        let mut buf = [0; 1024];
        while !rest.ends_with("0\r\n\r\n") {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => rest.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        rest
    })
    .await;
    assert!(
        rest.ends_with("done\r\n0\r\n\r\n"),
        "the stream was cut: {rest:?}"
    );
}

#[tokio::test]
async fn a_stream_whose_upstream_falls_silent_is_cut_at_the_stream_idle_timeout() {
    let ticker = SseTicker::start(STABLE).await;
    // The version has a name of its own: its error counter is this test's alone.
    const VERSION: &str = "v1-falls-silent";
    let toml = support::config(
        &[ticker.addr],
        None,
        "[upstream]\nstream_idle_timeout = \"1s\"\n",
    )
    .replace(
        &format!("name = \"{STABLE}\""),
        &format!("name = \"{VERSION}\""),
    );
    let server = support::start_cohort(&toml).await;
    let mut body = Http::new(server.proxy_addr())
        .get_streaming("/events", &[("x-user-id", "alice")])
        .await
        .into_body();
    read_until(&mut body, SseTicker::READY)
        .await
        .expect("the first event");
    // An event every 250 ms keeps the stream open well past the limit.
    for _ in 0..6 {
        // The upstream's pace, not a wait for anything.
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let event = ticker.tick();
        read_until(&mut body, &event)
            .await
            .expect("the stream is open");
    }
    // Then silence: the stream is cut, as the upstream's timeout.
    let end = within("the cut", async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error),
                None => return Ok(()),
            }
        }
    })
    .await;
    assert!(end.is_err(), "the stream ended as if whole");
    let labels = [("version", VERSION), ("kind", "timeout")];
    eventually_async("the cut counted as the upstream's timeout", || async {
        metric(&server, "cohort_upstream_errors_total", &labels).await == Some(1.0)
    })
    .await;
}

/// A chunked upload reaches its upstream whole even after that upstream
/// answered in HTTP/1.0 with keep-alive: the proxy does not send the next
/// request on that connection.
#[tokio::test]
async fn a_chunked_body_reaches_an_upstream_that_answers_in_http_1_0() {
    let upstream = support::Http10Backend::start().await;
    let server = cohort(&[upstream.addr], None, "[health]\ninterval = \"1h\"\n").await;
    let mut client = TcpStream::connect(server.proxy_addr())
        .await
        .expect("connect");
    let first = "GET /first HTTP/1.1\r\nhost: x\r\n\r\n";
    let upload = "POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
                  b\r\nhello world\r\n0\r\n\r\n";
    for request in [first, upload] {
        client
            .write_all(request.as_bytes())
            .await
            .expect("send a request");
        let head = read_head(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let mut body = [0; 2];
        within("the body", client.read_exact(&mut body))
            .await
            .expect("read the body");
        assert_eq!(&body, b"ok");
    }
    let received = upstream.received();
    assert!(
        received.contains("POST /upload HTTP/1.1") && received.contains("hello world"),
        "the upstream got: {received}"
    );
}
