//! Black-box tests of `GET /metrics` (SPEC section 5).
//!
//! Owns: checking, over real sockets, what the admin listener exports after
//! known traffic through a real Cohort to real backends: exact per-version
//! counts, the tokens sum, histogram counts, the in-flight gauge back at zero,
//! upstream errors by kind, the proxy's own series, `promtool check metrics`,
//! and a real Prometheus server scraping Cohort. Does not own: the routing
//! rule or the data path's other behaviour (their own test files).
//!
//! The metrics recorder is global to this test process, so every test uses
//! version names of its own and asserts only on series carrying them.

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use cohort::serve::Server;

/// How long a condition that should hold soon may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// A backend: a real HTTP/1.1 server on 127.0.0.1:0.
// ---------------------------------------------------------------------------

/// A response body the backend writes: whole, or frame by frame from a channel.
enum TestBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut *self {
            TestBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            TestBody::Stream(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }
}

/// What the tests can steer and observe in a backend.
struct BackendState {
    /// `/sse` sends its first event, then waits for a permit here before the rest.
    sse_release: Semaphore,
    /// Set once a `/hang` stream's reader (the proxy) has gone away.
    hang_cancelled: AtomicBool,
}

/// Routes:
/// - `/tokens/N`: 200 with `x-tokens: N` (N is sent as is, numeric or not);
///   `/tokens/none`: 200 without the header.
/// - `/status/N`: status N.
/// - `/sse`: an event stream of three events; the second waits for `sse_release`.
/// - `/hang`: an event stream that sends one event and then stays open until
///   its reader goes away.
/// - `/upgrade`: `101 Switching Protocols` to `echo`, then echoes bytes back.
/// - anything else: 200 "ok".
async fn backend_response(
    state: Arc<BackendState>,
    mut req: Request<Incoming>,
) -> Response<TestBody> {
    let path = req.uri().path().to_owned();
    if path == "/upgrade" {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            }
        });
        let mut rsp = Response::new(TestBody::Full(None));
        *rsp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        rsp.headers_mut()
            .insert("connection", "upgrade".parse().expect("valid"));
        rsp.headers_mut()
            .insert("upgrade", "echo".parse().expect("valid"));
        return rsp;
    }
    let full = |status: StatusCode| {
        let mut rsp = Response::new(TestBody::Full(Some(Bytes::from_static(b"ok"))));
        *rsp.status_mut() = status;
        rsp
    };
    if let Some(tokens) = path.strip_prefix("/tokens/") {
        let mut rsp = full(StatusCode::OK);
        if tokens != "none" {
            rsp.headers_mut()
                .insert("x-tokens", tokens.parse().expect("a header value"));
        }
        return rsp;
    }
    if let Some(code) = path.strip_prefix("/status/") {
        return full(StatusCode::from_u16(code.parse().expect("a number")).expect("a status"));
    }
    let stream = |rx| {
        let mut rsp = Response::new(TestBody::Stream(rx));
        rsp.headers_mut()
            .insert("content-type", "text/event-stream".parse().expect("valid"));
        rsp
    };
    match path.as_str() {
        "/sse" => {
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"data: one\n\n")).await;
                let permit = state.sse_release.acquire().await.expect("never closed");
                permit.forget();
                let _ = tx.send(Bytes::from_static(b"data: two\n\n")).await;
                let _ = tx.send(Bytes::from_static(b"data: three\n\n")).await;
            });
            stream(rx)
        }
        "/hang" => {
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"data: first\n\n")).await;
                tx.closed().await;
                state.hang_cancelled.store(true, Ordering::SeqCst);
            });
            stream(rx)
        }
        _ => full(StatusCode::OK),
    }
}

struct Backend {
    addr: SocketAddr,
    state: Arc<BackendState>,
}

async fn backend() -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let state = Arc::new(BackendState {
        sse_release: Semaphore::new(0),
        hang_cancelled: AtomicBool::new(false),
    });
    let shared = Arc::clone(&state);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = Arc::clone(&shared);
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(backend_response(state, req).await) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades(),
            );
        }
    });
    Backend { addr, state }
}

/// An address nothing listens on: bound, then released.
async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("local addr")
}

// ---------------------------------------------------------------------------
// Cohort and its clients.
// ---------------------------------------------------------------------------

/// Every test's table has the same canary weight and generation, because
/// `cohort_canary_weight_percent` and `cohort_route_generation` are global.
const WEIGHT: u32 = 50;

async fn cohort(stable: (&str, SocketAddr), canary: Option<(&str, SocketAddr)>) -> Server {
    let scratch = support::scratch_dir();
    let (state, audit) = (scratch.join("state.json"), scratch.join("audit.jsonl"));
    let mut toml = format!(
        r#"
[listen]
addr = "127.0.0.1:0"

[admin]
addr = "127.0.0.1:0"

[state]
path = {state:?}
audit_log = {audit:?}

[routing]
override_header = "x-cohort"
fallback = "stable"

[versions.stable]
name = "{}"
upstreams = ["{}"]

[metrics]
tokens_header = "x-tokens"
"#,
        stable.0, stable.1
    );
    if let Some((name, addr)) = canary {
        toml.push_str(&format!(
            "\n[versions.canary]\nname = \"{name}\"\nupstreams = [\"{addr}\"]\nweight = {WEIGHT}\n"
        ));
    }
    let config = cohort::config::Config::parse(&toml, "test").expect("a valid config");
    cohort::serve::start(config).await.expect("cohort starts")
}

type TestClient = Client<HttpConnector, Empty<Bytes>>;

fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends `GET path` forced into `cohort` and reads the whole response.
async fn get(
    client: &TestClient,
    server: &Server,
    cohort: &str,
    path: &str,
) -> (StatusCode, Bytes) {
    let req = Request::get(format!("http://{}{path}", server.proxy_addr()))
        .header("x-cohort", cohort)
        .body(Empty::new())
        .expect("a request");
    let rsp = client.request(req).await.expect("a response");
    let status = rsp.status();
    let body = rsp.into_body().collect().await.expect("a body").to_bytes();
    (status, body)
}

async fn scrape(client: &TestClient, server: &Server) -> Scrape {
    let uri = format!("http://{}/metrics", server.admin_addr());
    let rsp = client
        .get(uri.parse().expect("a uri"))
        .await
        .expect("a scrape");
    assert_eq!(rsp.status(), StatusCode::OK);
    let body = rsp.into_body().collect().await.expect("a body").to_bytes();
    Scrape(String::from_utf8(body.to_vec()).expect("UTF-8"))
}

/// Scrapes until `name{labels}` equals `expected`, or fails at the deadline.
async fn wait_for(
    client: &TestClient,
    server: &Server,
    name: &str,
    labels: &[(&str, &str)],
    expected: f64,
) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let value = scrape(client, server).await.value(name, labels);
        if value == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} is {value:?}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// The exposition text.
// ---------------------------------------------------------------------------

/// A scraped exposition text, read by exact label sets.
struct Scrape(String);

impl Scrape {
    /// The value of the sample `name` whose labels are exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples()
            .find(|(n, l, _)| n == name && *l == wanted)
            .map(|(_, _, v)| v)
    }

    /// Every sample line as (name, labels, value).
    fn samples(&self) -> impl Iterator<Item = (String, BTreeMap<String, String>, f64)> + '_ {
        self.0
            .lines()
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(parse_sample)
    }

    fn has_help(&self, name: &str) -> bool {
        self.0.lines().any(|l| {
            l.strip_prefix("# HELP ")
                .and_then(|rest| rest.strip_prefix(name))
                .is_some_and(|help| help.starts_with(' ') && help.trim().len() > 10)
        })
    }

    fn type_of(&self, name: &str) -> Option<&str> {
        self.0.lines().find_map(|l| {
            let rest = l.strip_prefix("# TYPE ")?.strip_prefix(name)?;
            rest.strip_prefix(' ')
        })
    }
}

fn parse_sample(line: &str) -> (String, BTreeMap<String, String>, f64) {
    let (series, value) = line.rsplit_once(' ').expect("a sample line");
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().expect("a number"),
    };
    let Some((name, rest)) = series.split_once('{') else {
        return (series.to_owned(), BTreeMap::new(), value);
    };
    let mut labels = BTreeMap::new();
    let mut rest = rest.strip_suffix('}').expect("closed labels");
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("key=\"value\"");
        let mut text = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().expect("a closing quote") {
                (_, '\\') => {
                    let (_, escaped) = chars.next().expect("an escaped char");
                    text.push(if escaped == 'n' { '\n' } else { escaped });
                }
                (i, '"') => break i,
                (_, c) => text.push(c),
            }
        };
        labels.insert(key.to_owned(), text);
        rest = after[end + 1..].trim_start_matches(',');
    }
    (name.to_owned(), labels, value)
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn counts_tokens_and_histograms_are_exact_per_version() {
    let backend = backend().await;
    let server = cohort(("count-v1", backend.addr), Some(("count-v2", backend.addr))).await;
    let client = client();

    for _ in 0..4 {
        assert_eq!(
            get(&client, &server, "stable", "/tokens/5").await.0,
            StatusCode::OK
        );
    }
    // 10 + 20 + 12 = 42; the missing and the non-numeric header are skipped.
    for path in [
        "/tokens/10",
        "/tokens/20",
        "/tokens/12",
        "/tokens/none",
        "/tokens/abc",
    ] {
        assert_eq!(
            get(&client, &server, "canary", path).await.0,
            StatusCode::OK
        );
    }
    for _ in 0..2 {
        assert_eq!(
            get(&client, &server, "canary", "/status/404").await.0,
            StatusCode::NOT_FOUND
        );
    }

    let stable = [("version", "count-v1"), ("cohort", "stable")];
    let canary = [("version", "count-v2"), ("cohort", "canary")];
    // The response duration is recorded when a body ends, just after the client has it.
    wait_for(&client, &server, "cohort_requests_in_flight", &stable, 0.0).await;
    wait_for(&client, &server, "cohort_requests_in_flight", &canary, 0.0).await;
    wait_for(
        &client,
        &server,
        "cohort_response_duration_seconds_count",
        &stable,
        4.0,
    )
    .await;
    wait_for(
        &client,
        &server,
        "cohort_response_duration_seconds_count",
        &canary,
        7.0,
    )
    .await;

    let s = scrape(&client, &server).await;
    let with = |labels: &[(&'static str, &'static str)], extra: (&'static str, &'static str)| {
        let mut all = labels.to_vec();
        all.push(extra);
        all
    };
    assert_eq!(
        s.value("cohort_requests_total", &with(&stable, ("code", "200"))),
        Some(4.0)
    );
    assert_eq!(
        s.value("cohort_requests_total", &with(&canary, ("code", "200"))),
        Some(5.0)
    );
    assert_eq!(
        s.value("cohort_requests_total", &with(&canary, ("code", "404"))),
        Some(2.0)
    );
    assert_eq!(
        s.value("cohort_requests_total", &with(&stable, ("code", "404"))),
        None
    );
    // Nothing of this test's traffic is attributed to the wrong cohort.
    let misattributed = s
        .samples()
        .filter(|(n, l, _)| {
            n == "cohort_requests_total" && l.get("version").map(String::as_str) == Some("count-v2")
        })
        .all(|(_, l, _)| l.get("cohort").map(String::as_str) == Some("canary"));
    assert!(misattributed, "count-v2 counted outside the canary cohort");

    assert_eq!(s.value("cohort_tokens_total", &stable), Some(20.0));
    assert_eq!(s.value("cohort_tokens_total", &canary), Some(42.0));

    // Real histograms: one observation per request, the explicit buckets, `+Inf` = count.
    for (labels, count) in [(&stable, 4.0), (&canary, 7.0)] {
        assert_eq!(
            s.value("cohort_request_duration_seconds_count", labels),
            Some(count)
        );
        for le in ["0.001", "0.1", "1", "60", "+Inf"] {
            let bucket = s.value(
                "cohort_request_duration_seconds_bucket",
                &with(labels, ("le", le)),
            );
            assert!(bucket.is_some(), "no bucket le={le} for {labels:?}");
        }
        assert_eq!(
            s.value(
                "cohort_request_duration_seconds_bucket",
                &with(labels, ("le", "+Inf"))
            ),
            Some(count)
        );
        assert_eq!(
            s.value(
                "cohort_response_duration_seconds_bucket",
                &with(labels, ("le", "+Inf"))
            ),
            Some(count)
        );
        let sum = s
            .value("cohort_request_duration_seconds_sum", labels)
            .expect("a sum");
        assert!(sum > 0.0, "request duration sum {sum}");
    }
    assert_eq!(
        s.type_of("cohort_request_duration_seconds"),
        Some("histogram")
    );
    assert_eq!(
        s.type_of("cohort_response_duration_seconds"),
        Some("histogram")
    );
    assert_eq!(s.type_of("cohort_requests_total"), Some("counter"));
    assert_eq!(s.type_of("cohort_requests_in_flight"), Some("gauge"));
    // No upstream failed.
    for kind in ["connect", "timeout", "reset", "protocol"] {
        assert_eq!(
            s.value(
                "cohort_upstream_errors_total",
                &with(&canary, ("kind", kind))
            ),
            Some(0.0)
        );
    }
}

#[tokio::test]
async fn in_flight_returns_to_zero_when_a_stream_ends() {
    let backend = backend().await;
    let server = cohort(("sse-v1", backend.addr), None).await;
    let client = client();
    let labels = [("version", "sse-v1"), ("cohort", "stable")];

    let req = Request::get(format!("http://{}/sse", server.proxy_addr()))
        .body(Empty::new())
        .expect("a request");
    let rsp = client.request(req).await.expect("a response");
    assert_eq!(rsp.status(), StatusCode::OK);
    let mut body = rsp.into_body();
    let first = body.frame().await.expect("a frame").expect("no error");
    assert_eq!(first.into_data().expect("data"), "data: one\n\n");

    // Mid-stream: the request has its headers, so it is counted, and still in flight.
    let s = scrape(&client, &server).await;
    assert_eq!(s.value("cohort_requests_in_flight", &labels), Some(1.0));
    let with_code = [labels[0], labels[1], ("code", "200")];
    assert_eq!(s.value("cohort_requests_total", &with_code), Some(1.0));
    assert_eq!(
        s.value("cohort_request_duration_seconds_count", &labels),
        Some(1.0)
    );
    assert_eq!(
        s.value("cohort_response_duration_seconds_count", &labels),
        Some(0.0)
    );

    backend.state.sse_release.add_permits(1);
    let rest = body.collect().await.expect("the rest").to_bytes();
    assert_eq!(rest, "data: two\n\ndata: three\n\n");

    wait_for(&client, &server, "cohort_requests_in_flight", &labels, 0.0).await;
    wait_for(
        &client,
        &server,
        "cohort_response_duration_seconds_count",
        &labels,
        1.0,
    )
    .await;
}

#[tokio::test]
async fn in_flight_returns_to_zero_when_the_client_disconnects() {
    let backend = backend().await;
    let server = cohort(("gone-v1", backend.addr), None).await;
    let client = client();
    let labels = [("version", "gone-v1"), ("cohort", "stable")];

    let mut socket = TcpStream::connect(server.proxy_addr())
        .await
        .expect("connect");
    socket
        .write_all(b"GET /hang HTTP/1.1\r\nhost: cohort\r\n\r\n")
        .await
        .expect("write");
    read_until(&mut socket, b"data: first").await;
    assert_eq!(
        scrape(&client, &server)
            .await
            .value("cohort_requests_in_flight", &labels),
        Some(1.0)
    );

    drop(socket);
    wait_for(&client, &server, "cohort_requests_in_flight", &labels, 0.0).await;
    wait_for(
        &client,
        &server,
        "cohort_response_duration_seconds_count",
        &labels,
        1.0,
    )
    .await;
    // The proxy also let go of the upstream stream.
    let deadline = Instant::now() + DEADLINE;
    while !backend.state.hang_cancelled.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the upstream stream was never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn in_flight_returns_to_zero_when_an_upgraded_connection_ends() {
    let backend = backend().await;
    let server = cohort(("upgrade-v1", backend.addr), None).await;
    let client = client();
    let labels = [("version", "upgrade-v1"), ("cohort", "stable")];

    let mut socket = TcpStream::connect(server.proxy_addr())
        .await
        .expect("connect");
    socket
        .write_all(
            b"GET /upgrade HTTP/1.1\r\nhost: cohort\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
        )
        .await
        .expect("write");
    let head = read_until(&mut socket, b"\r\n\r\n").await;
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    socket.write_all(b"ping").await.expect("write");
    let echoed = read_until(&mut socket, b"ping").await;
    assert!(echoed.ends_with(b"ping"), "{echoed:?}");
    assert_eq!(
        scrape(&client, &server)
            .await
            .value("cohort_requests_in_flight", &labels),
        Some(1.0)
    );

    drop(socket);
    wait_for(&client, &server, "cohort_requests_in_flight", &labels, 0.0).await;
    let with_code = [labels[0], labels[1], ("code", "101")];
    assert_eq!(
        scrape(&client, &server)
            .await
            .value("cohort_requests_total", &with_code),
        Some(1.0)
    );
}

/// Reads from `socket` until what it has read contains `marker`, failing
/// the test if it has not come by the deadline.
async fn read_until(socket: &mut TcpStream, marker: &[u8]) -> Vec<u8> {
    let what = format!("{:?} from the proxy", String::from_utf8_lossy(marker));
    support::within(&what, async {
        let mut received = Vec::new();
        let mut buf = [0u8; 1024];
        while !received.windows(marker.len()).any(|w| w == marker) {
            let n = socket.read(&mut buf).await.expect("read");
            assert_ne!(n, 0, "closed before {marker:?}: {received:?}");
            received.extend_from_slice(&buf[..n]);
        }
        received
    })
    .await
}

#[tokio::test]
async fn upstream_errors_are_counted_by_kind() {
    let server = cohort(("dead-v1", dead_addr().await), None).await;
    let client = client();

    let (status, body) = get(&client, &server, "stable", "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(
        String::from_utf8_lossy(&body).contains("\"connect\""),
        "{body:?}"
    );

    let labels = [("version", "dead-v1"), ("cohort", "stable")];
    wait_for(&client, &server, "cohort_requests_in_flight", &labels, 0.0).await;
    let s = scrape(&client, &server).await;
    for (kind, count) in [
        ("connect", 1.0),
        ("timeout", 0.0),
        ("reset", 0.0),
        ("protocol", 0.0),
    ] {
        let with_kind = [labels[0], labels[1], ("kind", kind)];
        assert_eq!(
            s.value("cohort_upstream_errors_total", &with_kind),
            Some(count),
            "{kind}"
        );
    }
    let with_code = [labels[0], labels[1], ("code", "502")];
    assert_eq!(s.value("cohort_requests_total", &with_code), Some(1.0));
    assert_eq!(
        s.value("cohort_request_duration_seconds_count", &labels),
        Some(1.0)
    );
}

#[tokio::test]
async fn exports_the_proxy_own_series_and_passes_promtool() {
    let backend = backend().await;
    let server = cohort(("lint-v1", backend.addr), Some(("lint-v2", backend.addr))).await;
    let client = client();
    assert_eq!(
        get(&client, &server, "canary", "/tokens/7").await.0,
        StatusCode::OK
    );
    cohort::metrics::record_rollback(cohort::state::Source::Signal);

    let s = scrape(&client, &server).await;
    // Every metric of SPEC section 5 that exists without a shadow, plus the
    // proxy's own, is described.
    for name in [
        "cohort_requests_total",
        "cohort_request_duration_seconds",
        "cohort_response_duration_seconds",
        "cohort_upstream_errors_total",
        "cohort_requests_in_flight",
        "cohort_tokens_total",
        "cohort_canary_weight_percent",
        "cohort_route_generation",
        "cohort_rollbacks_total",
        "cohort_canary_fallbacks_total",
        "cohort_shadow_dropped_total",
        "cohort_client_connections",
        "cohort_upstream_connections",
        "cohort_upstream_healthy",
        "cohort_log_lines_dropped_total",
        "cohort_build_info",
    ] {
        assert!(s.has_help(name), "no HELP for {name}");
        assert!(s.type_of(name).is_some(), "no TYPE for {name}");
    }
    // Present at 0 before their first event.
    for (source, count) in [("api", 0.0), ("signal", 1.0), ("guardrail", 0.0)] {
        assert_eq!(
            s.value("cohort_rollbacks_total", &[("source", source)]),
            Some(count)
        );
    }
    assert_eq!(s.value("cohort_canary_fallbacks_total", &[]), Some(0.0));
    assert_eq!(s.value("cohort_log_lines_dropped_total", &[]), Some(0.0));
    for reason in ["queue_full", "timeout", "too_large"] {
        assert_eq!(
            s.value("cohort_shadow_dropped_total", &[("reason", reason)]),
            Some(0.0)
        );
    }
    assert_eq!(
        s.value("cohort_canary_weight_percent", &[]),
        Some(f64::from(WEIGHT))
    );
    assert_eq!(s.value("cohort_route_generation", &[]), Some(1.0));
    // Versions from the config start healthy; both share the one backend.
    let backend_addr = backend.addr.to_string();
    for version in ["lint-v1", "lint-v2"] {
        assert_eq!(
            s.value(
                "cohort_upstream_healthy",
                &[("version", version), ("upstream", &backend_addr)]
            ),
            Some(1.0)
        );
    }
    // The request's pooled upstream connection stays open (idle) after it.
    let upstream = s
        .value("cohort_upstream_connections", &[])
        .expect("the gauge");
    assert!(upstream >= 1.0, "cohort_upstream_connections = {upstream}");
    let clients = s
        .value("cohort_client_connections", &[])
        .expect("the gauge");
    assert!(clients >= 1.0, "cohort_client_connections = {clients}");
    let build = s
        .samples()
        .find(|(n, _, _)| n == "cohort_build_info")
        .expect("build info");
    assert_eq!(
        build.1.get("version").map(String::as_str),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert!(
        build.1.get("commit").is_some_and(|c| !c.is_empty()),
        "{build:?}"
    );
    assert_eq!(build.2, 1.0);

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run promtool ({NEEDS_PROMETHEUS}): {error}"));
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(s.0.as_bytes())
        .expect("write to promtool");
    let output = promtool.wait_with_output().expect("promtool ends");
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}\n--- scraped text ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        s.0
    );
}

/// What a test that runs Prometheus's own tools needs.
const NEEDS_PROMETHEUS: &str =
    "Debian package prometheus; scripts/test.sh installs it when it is missing";

// ---------------------------------------------------------------------------
// A real Prometheus server.
// ---------------------------------------------------------------------------

/// A running `prometheus`, killed and its data removed on drop, pass or fail.
struct Prometheus {
    child: Child,
    /// Its config, data and log; removed after the process is stopped.
    dir: tempfile::TempDir,
    addr: SocketAddr,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second.
    async fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("cohort-metrics-test-")
            .tempdir()
            .expect("a temp dir");
        std::fs::create_dir_all(dir.path().join("data")).expect("a data dir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: cohort\n    scrape_interval: 1s\n    \
                 scrape_timeout: 1s\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        // A free port: bound, then released for Prometheus to take.
        let addr = dead_addr().await;
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("a log file");
        let spawned = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn();
        let child = spawned.unwrap_or_else(|error| {
            panic!("cannot start prometheus ({NEEDS_PROMETHEUS}): {error}")
        });
        Prometheus { child, dir, addr }
    }

    fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(self.dir.path().join("prometheus.log")) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- prometheus log ---\n{}", self.log());
        }
    }
}

/// `GET` on Prometheus's HTTP API; `None` until it answers 200.
async fn prometheus_get(
    client: &TestClient,
    prometheus: &Prometheus,
    path_and_query: &str,
) -> Option<serde_json::Value> {
    let uri = format!("http://{}{path_and_query}", prometheus.addr);
    let rsp = client.get(uri.parse().expect("a uri")).await.ok()?;
    if rsp.status() != StatusCode::OK {
        return None;
    }
    let body = rsp.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&body)
        .ok()
        .or(Some(serde_json::Value::Null))
}

#[tokio::test]
async fn prometheus_scrapes_the_canary_request_rate_by_version() {
    let backend = backend().await;
    let server = cohort(("prom-v1", backend.addr), Some(("prom-v2", backend.addr))).await;
    let prometheus = Prometheus::start(server.admin_addr()).await;
    let client = client();

    // Steady traffic to both versions while Prometheus scrapes.
    let traffic = tokio::spawn({
        let client = client.clone();
        let proxy = server.proxy_addr();
        async move {
            loop {
                for cohort in ["canary", "stable"] {
                    let req = Request::get(format!("http://{proxy}/tokens/1"))
                        .header("x-cohort", cohort)
                        .body(Empty::new())
                        .expect("a request");
                    if let Ok(rsp) = client.request(req).await {
                        let _ = rsp.into_body().collect().await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });

    let query = "sum by (version) (rate(cohort_requests_total{cohort=\"canary\",version=~\"prom-.*\"}[5s]))";
    let path = format!(
        "/api/v1/query?query={}",
        percent_encoding::utf8_percent_encode(query, percent_encoding::NON_ALPHANUMERIC)
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let result = loop {
        if let Some(answer) = prometheus_get(&client, &prometheus, &path).await {
            let result = answer["data"]["result"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let has_rate = result.iter().any(|series| {
                series["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|rate| rate > 0.0)
            });
            if has_rate {
                break result;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never reported the canary's request rate"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    traffic.abort();

    // The canary's rate is there, under the canary's version and no other.
    let versions: Vec<&str> = result
        .iter()
        .filter_map(|series| series["metric"]["version"].as_str())
        .collect();
    assert_eq!(versions, ["prom-v2"], "{result:?}");

    // And the target is up: Prometheus parsed Cohort's exposition.
    let up = prometheus_get(
        &client,
        &prometheus,
        "/api/v1/query?query=up%7Bjob%3D%22cohort%22%7D",
    )
    .await
    .expect("an answer");
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    drop(prometheus);
}
