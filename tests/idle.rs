//! Idle keep-alive client connections: after one to two idle checks the
//! proxy takes the socket back from hyper (freeing its buffers), and the
//! connection still serves its next request, pipelined requests, an
//! upgrade and a smuggling refusal, over TCP and TLS; it closes after
//! `keepalive_timeout` (a connection that never sent a request, or sent
//! its first head too slowly, at `header_read_timeout` after the accept; one
//! that leaves a later head unfinished, that long after its first bytes,
//! though not an upload still arriving after its early answer, nor heads
//! that each come in time, back to back), and
//! neither it nor a silent new connection holds up a drain; a full proxy
//! closes its longest-idle one (HTTP/1.1 or HTTP/2, one whose peer has
//! gone included, and one at a time) for a new client; and one whose
//! upgrade was declined is freed, and closes, like any other.
//!
//! The tests share one process-wide `cohort_client_connections_idle`
//! gauge, so they run one at a time.

mod support;
mod tls_support;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use cohort::serve::Server;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{
    Backend, CANARY, STABLE, SlowBackend, WsBackend, client, config, eventually, eventually_async,
    start_cohort, within,
};
use tls_support::{Pki, listen_tls, tls_client, tls_connect};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// The `[listen]` keys of most tests: a short header read timeout, so that
/// idleness is checked every 200 ms.
const QUICK: &str = "header_read_timeout = \"600ms\"";

/// A config whose `[listen]` section has the keys in `listen`, with `extra` sections.
fn idle_config(
    stable: &[SocketAddr],
    canary: Option<(&[SocketAddr], f64)>,
    listen: &str,
    extra: &str,
) -> String {
    let base = config(stable, canary, extra);
    let listen_keys = "drain_timeout = \"10s\"\n";
    assert!(
        base.contains(listen_keys),
        "the test config changed: {base}"
    );
    base.replace(listen_keys, &format!("{listen}\n"))
}

/// The gauge `name` (no labels), scraped from the admin API.
async fn gauge(admin: SocketAddr, name: &str) -> f64 {
    let rsp = client::<http_body_util::Empty<bytes::Bytes>>()
        .get(format!("http://{admin}/metrics").parse().expect("a uri"))
        .await
        .expect("a scrape");
    let body = rsp.into_body().collect().await.expect("a body").to_bytes();
    let text = String::from_utf8(body.to_vec()).expect("UTF-8");
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no gauge {name}"))
}

/// Polls the gauge `name` until it reads `expected`.
async fn wait_for_gauge(admin: SocketAddr, name: &str, expected: f64) {
    eventually_async(&format!("{name} = {expected}"), || async {
        gauge(admin, name).await == expected
    })
    .await;
}

/// Polls the idle gauge until it reads `expected`.
async fn wait_for_idle(admin: SocketAddr, expected: f64) {
    wait_for_gauge(admin, "cohort_client_connections_idle", expected).await;
}

async fn connect(server: &Server) -> TcpStream {
    TcpStream::connect(server.proxy_addr())
        .await
        .expect("connect to the proxy")
}

async fn send(stream: &mut (impl AsyncWrite + Unpin), bytes: &str) {
    stream.write_all(bytes.as_bytes()).await.expect("write");
}

/// Sends a GET of `path` as `user` and reads its answer.
async fn ask(stream: &mut (impl AsyncRead + AsyncWrite + Unpin), path: &str, user: &str) -> Answer {
    send(stream, &get(path, user)).await;
    read_answers(stream, 1).await.remove(0)
}

/// Reads until the proxy closes the connection, expecting nothing more.
async fn assert_closed(stream: &mut TcpStream) {
    let mut rest = Vec::new();
    let read = within("the close", stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok() && rest.is_empty(), "{read:?} {rest:?}");
}

/// A response read off a kept-alive connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    version: String,
    body: String,
}

/// Reads `count` responses (with `content-length` bodies) in order.
async fn read_answers(stream: &mut (impl AsyncRead + Unpin), count: usize) -> Vec<Answer> {
    within("the responses", async {
        let mut buf = Vec::new();
        let mut answers = Vec::new();
        while answers.len() < count {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut rsp = httparse::Response::new(&mut headers);
            let parsed = rsp.parse(&buf).expect("a well-formed response");
            if let httparse::Status::Complete(head) = parsed {
                let header = |name: &str| {
                    rsp.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).into_owned())
                };
                let length: usize = header("content-length")
                    .expect("a content-length")
                    .parse()
                    .expect("a number");
                if buf.len() >= head + length {
                    answers.push(Answer {
                        status: rsp.code.expect("a status"),
                        version: header("x-agent-version").unwrap_or_default(),
                        body: String::from_utf8_lossy(&buf[head..head + length]).into_owned(),
                    });
                    buf.drain(..head + length);
                    continue;
                }
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.expect("a read");
            assert!(n > 0, "the proxy closed the connection");
            buf.extend_from_slice(&chunk[..n]);
        }
        answers
    })
    .await
}

fn get(path: &str, user: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: cohort\r\nx-user-id: {user}\r\n\r\n")
}

/// A GET asking for an upgrade to `protocol`, which a plain backend declines.
fn asking_upgrade(protocol: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nhost: cohort\r\nx-user-id: alice\r\n\
         connection: upgrade\r\nupgrade: {protocol}\r\n\r\n"
    )
}

#[tokio::test]
async fn an_idle_connection_is_freed_and_still_serves_requests_pipelined_or_not() {
    let _one = ONE_AT_A_TIME.lock().await;
    let backend = Backend::start(STABLE).await;
    let server = start_cohort(&idle_config(&[backend.addr], None, QUICK, "")).await;
    let mut stream = connect(&server).await;

    let first = ask(&mut stream, "/first", "alice").await;
    assert_eq!((first.status, first.version.as_str()), (200, STABLE));
    wait_for_idle(server.admin_addr(), 1.0).await;

    // The next request on the freed connection is served by a fresh hyper connection.
    let second = ask(&mut stream, "/second", "alice").await;
    assert_eq!(second.status, 200);
    assert!(second.body.contains("/second"), "{second:?}");
    wait_for_idle(server.admin_addr(), 1.0).await;

    // Three pipelined requests in one write, after the connection was freed again.
    send(
        &mut stream,
        &[get("/a", "alice"), get("/b", "bob"), get("/c", "carol")].concat(),
    )
    .await;
    let answers = read_answers(&mut stream, 3).await;
    for (answer, path) in answers.iter().zip(["/a", "/b", "/c"]) {
        assert_eq!(answer.status, 200, "{answer:?}");
        assert!(
            answer.body.contains(&format!("\"uri\":\"{path}\"")),
            "{answer:?}"
        );
    }
    assert_eq!(backend.hits(), 5);
    server.shutdown().await;
}

#[tokio::test]
async fn a_request_head_cut_in_two_by_a_long_pause_is_served() {
    let _one = ONE_AT_A_TIME.lock().await;
    let backend = Backend::start(STABLE).await;
    // Checks every second; the split head must beat the header read timeout.
    let toml = idle_config(&[backend.addr], None, "header_read_timeout = \"8s\"", "");
    let server = start_cohort(&toml).await;
    let admin = server.admin_addr();
    let mut half = connect(&server).await;
    ask(&mut half, "/first", "alice").await;
    let mut other = connect(&server).await;
    ask(&mut other, "/other", "bob").await;
    wait_for_idle(admin, 2.0).await;

    // Half a head arrives on a freed connection, then idle checks pass (the
    // other connection is freed again after a request), then the rest.
    let head = get("/split", "alice");
    let (start, end) = head.split_at(20);
    send(&mut half, start).await;
    wait_for_idle(admin, 1.0).await;
    ask(&mut other, "/other", "bob").await;
    wait_for_idle(admin, 1.0).await;
    send(&mut half, end).await;
    let split = read_answers(&mut half, 1).await;
    assert_eq!(split[0].status, 200);
    assert!(split[0].body.contains("/split"), "{split:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_freed_connection_still_refuses_smuggling_and_upgrades_to_a_websocket() {
    let _one = ONE_AT_A_TIME.lock().await;
    let stable = Backend::start(STABLE).await;
    let canary = WsBackend::start(CANARY).await;
    // At 50% under salt v2, alice is on the canary and bob on stable (SPEC vectors).
    let toml = idle_config(&[stable.addr], Some((&[canary.addr], 50.0)), QUICK, "");
    let server = start_cohort(&toml).await;

    // Smuggling: both lengths, sent after the connection was freed.
    let mut stream = connect(&server).await;
    assert_eq!(ask(&mut stream, "/", "bob").await.status, 200);
    wait_for_idle(server.admin_addr(), 1.0).await;
    let smuggling = "POST / HTTP/1.1\r\nhost: cohort\r\nx-user-id: bob\r\n\
                     content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
    send(&mut stream, smuggling).await;
    assert_eq!(read_answers(&mut stream, 1).await[0].status, 400);
    assert_eq!(
        stable.hits(),
        1,
        "the smuggling request reached the upstream"
    );

    // An upgrade: a WebSocket handshake on a connection freed after a plain request.
    let mut stream = connect(&server).await;
    assert_eq!(ask(&mut stream, "/", "bob").await.version, STABLE);
    wait_for_idle(server.admin_addr(), 1.0).await;
    let mut handshake = format!("ws://{}/socket", server.proxy_addr())
        .into_client_request()
        .expect("a ws URL");
    handshake
        .headers_mut()
        .insert("x-user-id", "alice".parse().expect("a header value"));
    let (mut ws, rsp) = within(
        "the handshake",
        tokio_tungstenite::client_async(handshake, stream),
    )
    .await
    .expect("the handshake succeeds");
    assert_eq!(rsp.headers()["x-agent-version"], CANARY);
    ws.send(Message::text("hello")).await.expect("send");
    let echo = within("the echo", ws.next())
        .await
        .expect("the tunnel is open")
        .expect("a good message");
    assert_eq!(echo, Message::text(format!("{CANARY}:hello")));
    server.shutdown().await;
}

#[tokio::test]
async fn an_idle_connection_closes_after_the_keepalive_timeout() {
    let _one = ONE_AT_A_TIME.lock().await;
    let backend = Backend::start(STABLE).await;
    // hyper alone would close an idle connection at the header read timeout
    // (8 s); the freed connection must close at the keep-alive timeout.
    let listen = "header_read_timeout = \"8s\"\nkeepalive_timeout = \"2s\"";
    let server = start_cohort(&idle_config(&[backend.addr], None, listen, "")).await;
    let mut stream = connect(&server).await;
    ask(&mut stream, "/", "alice").await;
    wait_for_idle(server.admin_addr(), 1.0).await;

    assert_closed(&mut stream).await;
    wait_for_idle(server.admin_addr(), 0.0).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_later_head_left_unfinished_closes_the_connection_at_the_header_read_timeout() {
    let _one = ONE_AT_A_TIME.lock().await;
    let backend = Backend::start(STABLE).await;
    // The keep-alive timeout is far off: only the head's own timeout can
    // close these connections within the test's deadline.
    let listen = "header_read_timeout = \"1s\"\nkeepalive_timeout = \"60s\"";
    let server = start_cohort(&idle_config(&[backend.addr], None, listen, "")).await;
    let head = get("/never", "alice");
    let (start, _) = head.split_at(20);

    // Straight after an answer, while hyper still serves the connection.
    let mut busy = connect(&server).await;
    ask(&mut busy, "/", "alice").await;
    send(&mut busy, start).await;
    assert_closed(&mut busy).await;

    // And on a connection already freed.
    let mut freed = connect(&server).await;
    ask(&mut freed, "/", "alice").await;
    wait_for_idle(server.admin_addr(), 1.0).await;
    send(&mut freed, start).await;
    assert_closed(&mut freed).await;

    assert_eq!(backend.hits(), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn an_upload_that_goes_on_after_its_early_answer_is_not_timed_as_a_head() {
    let _one = ONE_AT_A_TIME.lock().await;
    const LEN: usize = 40_000;
    // An upstream that answers each request at once, as one refusing an
    // upload or accepting it for later does, and then reads its body.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream = listener.local_addr().expect("an address");
    let (drained, mut uploads) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let drained = drained.clone();
            tokio::spawn(async move {
                let head = support::read_head(&mut stream).await;
                if head.contains("cohort-health-check") {
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                    return;
                }
                let answer = "HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n";
                stream.write_all(answer.as_bytes()).await.expect("answer");
                let mut body = vec![0; LEN];
                let read = stream.read_exact(&mut body).await.map(|_| LEN);
                let _ = drained.send(read.unwrap_or(0));
            });
        }
    });
    // Checks every 200 ms; the upload takes five header read timeouts.
    let listen = "header_read_timeout = \"600ms\"\nkeepalive_timeout = \"60s\"";
    let server = start_cohort(&idle_config(&[upstream], None, listen, "")).await;
    let mut stream = connect(&server).await;
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: cohort\r\nx-user-id: alice\r\ncontent-length: {LEN}\r\n\r\n"
    );
    send(&mut stream, &head).await;
    let answer = within("the early answer", support::read_head(&mut stream)).await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    let piece = "x".repeat(LEN / 20);
    for _ in 0..20 {
        // The client's pace, not a wait for the proxy: 3 s in all.
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
        send(&mut stream, &piece).await;
    }
    let received = within("the upload's end", uploads.recv()).await;
    assert_eq!(received, Some(LEN), "the upload was cut");
    server.shutdown().await;
}

#[tokio::test]
async fn a_tls_connection_is_freed_and_serves_its_next_request() {
    let _one = ONE_AT_A_TIME.lock().await;
    let pki = Pki::new();
    let backend = Backend::start(STABLE).await;
    let tls = listen_tls(&pki.leaf("idle"));
    let server = start_cohort(&idle_config(&[backend.addr], None, QUICK, &tls)).await;
    let client = tls_client(&pki.ca, &["http/1.1"]);
    let mut stream = tls_connect(server.proxy_addr(), &client).await;
    assert_eq!(ask(&mut stream, "/first", "alice").await.status, 200);
    wait_for_idle(server.admin_addr(), 1.0).await;

    let second = ask(&mut stream, "/second", "alice").await;
    assert_eq!(second.status, 200);
    assert!(second.body.contains("/second"), "{second:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_tls_client_that_never_sends_a_request_is_closed_at_the_header_read_timeout() {
    let _one = ONE_AT_A_TIME.lock().await;
    let pki = Pki::new();
    let backend = Backend::start(STABLE).await;
    let tls = listen_tls(&pki.leaf("silent"));
    // The keep-alive timeout (75 s) is far past the test's deadline.
    let listen = "header_read_timeout = \"1s\"";
    let server = start_cohort(&idle_config(&[backend.addr], None, listen, &tls)).await;
    let client = tls_client(&pki.ca, &["http/1.1"]);
    let mut stream = tls_connect(server.proxy_addr(), &client).await;

    // The proxy closes without a close_notify, which rustls reports as an error.
    let mut rest = Vec::new();
    let _ = within("the close", stream.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "{rest:?}");
    server.shutdown().await;
}

/// Plays a slow client on a new connection, from `connected`: nothing for
/// 1.2 s, then the start of a head, the rest of it at 2.8 s, then reads
/// what comes back: nothing if the proxy closed the connection. The
/// proxy's header read timeout is 2 s, counted from the accept, so it must
/// close before the head is whole; a timer started by the first bytes
/// would serve it. (The pauses are the client's pace, not a wait for the
/// proxy.)
async fn dribble_first_head<S>(connected: tokio::time::Instant, stream: S) -> Vec<u8>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut stream = stream;
    let head = get("/late", "alice");
    let (start, rest) = head.split_at(16);
    tokio::time::sleep_until(connected + std::time::Duration::from_millis(1200)).await;
    send(&mut stream, start).await;
    tokio::time::sleep_until(connected + std::time::Duration::from_millis(2800)).await;
    // The proxy may have closed already: a failed write is the expected end.
    let _ = stream.write_all(rest.as_bytes()).await;
    let mut answer = vec![0; 1024];
    let read = within("a close or an answer", stream.read(&mut answer)).await;
    answer.truncate(read.unwrap_or(0));
    answer
}

#[tokio::test]
async fn a_first_head_must_come_within_the_header_read_timeout_of_the_accept() {
    let _one = ONE_AT_A_TIME.lock().await;
    let backend = Backend::start(STABLE).await;
    let listen = "header_read_timeout = \"2s\"";
    let server = start_cohort(&idle_config(&[backend.addr], None, listen, "")).await;
    let connected = tokio::time::Instant::now();
    let stream = connect(&server).await;
    let answer = dribble_first_head(connected, stream).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    assert_eq!(backend.hits(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn over_tls_the_handshake_and_first_head_share_the_header_read_timeout() {
    let _one = ONE_AT_A_TIME.lock().await;
    let pki = Pki::new();
    let backend = Backend::start(STABLE).await;
    let tls = listen_tls(&pki.leaf("late"));
    let listen = "header_read_timeout = \"2s\"";
    let server = start_cohort(&idle_config(&[backend.addr], None, listen, &tls)).await;
    let client = tls_client(&pki.ca, &["http/1.1"]);
    let connected = tokio::time::Instant::now();
    let tcp = connect(&server).await;
    // The handshake at 1 s, the head's first bytes at 1.2 s.
    tokio::time::sleep_until(connected + std::time::Duration::from_millis(1000)).await;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
    let stream = within("a TLS handshake", client.connect(name, tcp))
        .await
        .expect("the handshake succeeds");
    let answer = dribble_first_head(connected, stream).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    assert_eq!(backend.hits(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn a_drain_closes_idle_connections_without_waiting_for_them() {
    let _one = ONE_AT_A_TIME.lock().await;
    let backend = Backend::start(STABLE).await;
    // A drain that waited for an idle connection would outlast the test's deadline.
    let listen = "header_read_timeout = \"30s\"\ndrain_timeout = \"60s\"";
    let server = start_cohort(&idle_config(&[backend.addr], None, listen, "")).await;
    let admin = server.admin_addr();
    let mut freed = connect(&server).await;
    ask(&mut freed, "/", "alice").await;
    wait_for_idle(admin, 1.0).await;
    // And one still held by hyper, just served.
    let mut fresh = connect(&server).await;
    ask(&mut fresh, "/", "bob").await;
    // And one that has not sent anything yet, once the proxy has accepted it.
    let open = gauge(admin, "cohort_client_connections").await;
    let mut silent = connect(&server).await;
    wait_for_gauge(admin, "cohort_client_connections", open + 1.0).await;

    within("the drain", server.shutdown()).await;
    for stream in [&mut freed, &mut fresh, &mut silent] {
        assert_closed(stream).await;
    }
}

/// Each head here arrives in two pieces 300 ms apart, well within the
/// header read timeout (1 s), and the next head starts as soon as the
/// answer is read: nearly every idle check finds a head under way, but
/// never the same one twice. The timeout is per head, so none is cut.
#[tokio::test]
async fn heads_that_each_come_in_time_are_not_timed_as_one() {
    let _one = ONE_AT_A_TIME.lock().await;
    let backend = Backend::start(STABLE).await;
    let listen = "header_read_timeout = \"1s\"\nkeepalive_timeout = \"60s\"";
    let server = start_cohort(&idle_config(&[backend.addr], None, listen, "")).await;
    let mut stream = connect(&server).await;
    for i in 0..15 {
        let head = get(&format!("/r{i}"), "alice");
        let (start, rest) = head.split_at(20);
        send(&mut stream, start).await;
        // The client's own pace (a slow link), not a wait on the proxy.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        send(&mut stream, rest).await;
        let answer = read_answers(&mut stream, 1).await.remove(0);
        assert_eq!(answer.status, 200, "request {i}");
    }
    server.shutdown().await;
}

/// With every `listen.max_connections` slot held, by connections idle
/// between requests, a new client is served: the connection that has
/// waited longest for a next request is closed for it, as nginx reuses
/// idle connections when `worker_connections` run out.
#[tokio::test]
async fn a_full_proxy_closes_its_longest_idle_connection_for_a_new_client() {
    let _one = ONE_AT_A_TIME.lock().await;
    let backend = Backend::start(STABLE).await;
    let listen = "max_connections = 2\nkeepalive_timeout = \"60s\"";
    let server = start_cohort(&idle_config(&[backend.addr], None, listen, "")).await;
    let admin = server.admin_addr();
    let mut oldest = connect(&server).await;
    assert_eq!(ask(&mut oldest, "/", "alice").await.status, 200);
    wait_for_idle(admin, 1.0).await;
    let mut newer = connect(&server).await;
    assert_eq!(ask(&mut newer, "/", "bob").await.status, 200);
    wait_for_idle(admin, 2.0).await;

    let mut third = connect(&server).await;
    assert_eq!(ask(&mut third, "/", "carol").await.status, 200);
    assert_closed(&mut oldest).await;
    assert_eq!(ask(&mut newer, "/", "bob").await.status, 200);
    server.shutdown().await;
}

/// A full proxy closes no busy connection for a new client: the clients
/// are served once those have answered and are idle, each of them, though
/// they wait on different workers.
#[tokio::test]
async fn a_full_proxy_closes_no_busy_connection_for_a_new_client() {
    let _one = ONE_AT_A_TIME.lock().await;
    let backend = SlowBackend::start(STABLE).await;
    let listen = "max_connections = 2\nkeepalive_timeout = \"60s\"";
    let server = start_cohort(&idle_config(&[backend.addr], None, listen, "")).await;
    let mut busy = [connect(&server).await, connect(&server).await];
    for (stream, user) in busy.iter_mut().zip(["alice", "bob"]) {
        send(stream, &get("/", user)).await;
    }
    eventually("both requests to reach the backend", || backend.hits() == 2).await;

    let mut waiting = [connect(&server).await, connect(&server).await];
    for (stream, user) in waiting.iter_mut().zip(["carol", "dave"]) {
        send(stream, &get("/", user)).await;
    }
    backend.release();
    for stream in &mut busy {
        let answer = read_answers(stream, 1).await.remove(0);
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (200, SlowBackend::BODY)
        );
    }
    for stream in &mut waiting {
        assert_eq!(read_answers(stream, 1).await.remove(0).status, 200);
    }
    server.shutdown().await;
}

/// An upgrade its upstream declines (a plain `200`), or one the proxy
/// drops (`h2c`), leaves a connection like any other: freed once idle, not
/// closed at the header read timeout, and serving its next request.
#[tokio::test]
async fn a_connection_whose_upgrade_was_declined_is_freed_and_serves_its_next_request() {
    let _one = ONE_AT_A_TIME.lock().await;
    let backend = Backend::start(STABLE).await;
    let server = start_cohort(&idle_config(&[backend.addr], None, QUICK, "")).await;
    let mut stream = connect(&server).await;
    for upgrade in ["websocket", "h2c"] {
        send(&mut stream, &asking_upgrade(upgrade)).await;
        assert_eq!(read_answers(&mut stream, 1).await[0].status, 200);
        // Not counted in a head: it would close at the header read timeout.
        wait_for_idle(server.admin_addr(), 1.0).await;
        assert_eq!(ask(&mut stream, "/", "alice").await.status, 200);
        wait_for_idle(server.admin_addr(), 1.0).await;
    }
    let smuggling = "POST / HTTP/1.1\r\nhost: cohort\r\nx-user-id: bob\r\n\
                     content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
    send(&mut stream, smuggling).await;
    assert_eq!(read_answers(&mut stream, 1).await[0].status, 400);
    assert_eq!(
        backend.hits(),
        4,
        "the smuggling request reached the upstream"
    );
    server.shutdown().await;
}

/// An HTTP/2 connection with no stream open is closed (`GOAWAY`) for a new
/// client when it holds the last slot.
#[tokio::test]
async fn a_full_proxy_closes_an_idle_http2_connection_for_a_new_client() {
    let _one = ONE_AT_A_TIME.lock().await;
    let backend = Backend::start(STABLE).await;
    let listen = "max_connections = 1\nkeepalive_timeout = \"60s\"";
    let server = start_cohort(&idle_config(&[backend.addr], None, listen, "")).await;
    let (_h2, h2_conn) = h2_answered_once(connect(&server).await).await;

    let mut newer = connect(&server).await;
    assert_eq!(ask(&mut newer, "/", "bob").await.status, 200);
    within("the HTTP/2 connection's close", h2_conn)
        .await
        .expect("the connection task")
        .expect("a graceful close");
    server.shutdown().await;
}

/// A client socket whose reads can be stopped: once muted, the client's
/// HTTP/2 connection reads nothing more, as a peer that has gone away
/// does, so it never acknowledges a `GOAWAY`'s ping and never closes.
struct Muted {
    inner: TcpStream,
    muted: Arc<AtomicBool>,
}

impl AsyncRead for Muted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.muted.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Muted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// An HTTP/2 connection answered once, then silent (its reads muted), and
/// idle in the proxy's count. The sender is returned to be held: dropping
/// it would have the client close.
async fn silent_h2(
    server: &Server,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let muted = Arc::new(AtomicBool::new(false));
    let io = Muted {
        inner: connect(server).await,
        muted: Arc::clone(&muted),
    };
    let (h2, _) = h2_answered_once(io).await;
    muted.store(true, Ordering::Relaxed);
    wait_for_idle(server.admin_addr(), 1.0).await;
    h2
}

/// An HTTP/2 client connection over `io` whose first GET was answered
/// `200`, and the task that runs the connection.
async fn h2_answered_once(
    io: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let (mut h2, h2_conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(io))
        .await
        .expect("an HTTP/2 handshake");
    let h2_conn = tokio::spawn(h2_conn);
    let request = http::Request::get("http://cohort/")
        .header("x-user-id", "alice")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("a request");
    let rsp = within("the HTTP/2 answer", h2.send_request(request))
        .await
        .expect("an answer");
    assert_eq!(rsp.status(), 200);
    (h2, h2_conn)
}

/// An idle HTTP/2 connection closed for a new client, whose peer has gone
/// and never finishes closing, frees its slot at once: the one client
/// costs one connection, not the next idle one too.
#[tokio::test]
async fn a_silent_http2_connection_closed_for_a_new_client_costs_no_other_connection() {
    let _one = ONE_AT_A_TIME.lock().await;
    let backend = Backend::start(STABLE).await;
    let listen = "max_connections = 2\nkeepalive_timeout = \"60s\"";
    let server = start_cohort(&idle_config(&[backend.addr], None, listen, "")).await;
    let _h2 = silent_h2(&server).await;
    let mut newer = connect(&server).await;
    assert_eq!(ask(&mut newer, "/", "bob").await.status, 200);
    wait_for_idle(server.admin_addr(), 2.0).await;

    let mut third = connect(&server).await;
    assert_eq!(ask(&mut third, "/", "carol").await.status, 200);
    // The HTTP/2 connection was the one closed for it, and no other.
    assert_eq!(ask(&mut newer, "/", "bob").await.status, 200);
    server.shutdown().await;
}

/// An HTTP/2 connection that closes at its keep-alive timeout leaves the
/// line of idle connections: the notification a new client sends goes to
/// the next one, and none is left over to close another for no one.
#[tokio::test]
async fn an_http2_connection_closing_at_its_keepalive_timeout_leaves_the_line() {
    let _one = ONE_AT_A_TIME.lock().await;
    let backend = Backend::start(STABLE).await;
    // Quick connection checks, and a keep-alive timeout long enough for
    // the HTTP/1.1 connections to outlast the HTTP/2 one's and the 5 s it
    // then takes to be dropped.
    let listen = format!("{QUICK}\nmax_connections = 3\nkeepalive_timeout = \"10s\"");
    let server = start_cohort(&idle_config(&[backend.addr], None, &listen, "")).await;
    let admin = server.admin_addr();
    let _h2 = silent_h2(&server).await;
    // Past its keep-alive timeout it is told to close, no longer counted
    // idle, and, silent, holds its slot for 5 s more.
    wait_for_idle(admin, 0.0).await;
    let mut b = connect(&server).await;
    assert_eq!(ask(&mut b, "/", "bob").await.status, 200);
    let mut d = connect(&server).await;
    assert_eq!(ask(&mut d, "/", "dave").await.status, 200);
    wait_for_idle(admin, 2.0).await;

    let mut c = connect(&server).await;
    assert_eq!(ask(&mut c, "/", "carol").await.status, 200);
    // One of bob's and dave's connections was closed for carol; once the
    // HTTP/2 connection has gone too, the other is still open.
    wait_for_gauge(admin, "cohort_client_connections", 2.0).await;
    let mut open = 0;
    for (stream, user) in [(&mut b, "bob"), (&mut d, "dave")] {
        send(stream, &get("/", user)).await;
        let mut byte = [0u8; 1];
        if let Ok(1) = within("an answer or a close", stream.read(&mut byte)).await {
            open += 1;
        }
    }
    assert_eq!(open, 1, "bob's and dave's connections still open");
    server.shutdown().await;
}

/// A TLS connection whose upgrade was declined, later closed with its
/// last answer, ends with a `close_notify`, as any other does.
#[tokio::test]
async fn a_tls_connection_whose_upgrade_was_declined_closes_cleanly() {
    let _one = ONE_AT_A_TIME.lock().await;
    let pki = Pki::new();
    let backend = Backend::start(STABLE).await;
    let tls = listen_tls(&pki.leaf("declined"));
    let server = start_cohort(&idle_config(&[backend.addr], None, QUICK, &tls)).await;
    let client = tls_client(&pki.ca, &["http/1.1"]);
    let mut stream = tls_connect(server.proxy_addr(), &client).await;
    send(&mut stream, &asking_upgrade("websocket")).await;
    assert_eq!(read_answers(&mut stream, 1).await[0].status, 200);
    send(
        &mut stream,
        "GET / HTTP/1.1\r\nhost: cohort\r\nx-user-id: alice\r\nconnection: close\r\n\r\n",
    )
    .await;
    let mut rest = Vec::new();
    let read = within("the close", stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "{read:?}");
    assert!(String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 200"));
    server.shutdown().await;
}
