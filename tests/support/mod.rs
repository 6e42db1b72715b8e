//! Shared parts of the black-box tests: real backends, a real Cohort, clients.
//!
//! Owns: backends on `127.0.0.1:0` built on hyper (an echo backend that
//! answers with its name and the request it saw, an SSE backend paced by the
//! test, a WebSocket echo backend, a slow backend released by the test), a
//! dead address, starting Cohort from a TOML snippet, and small HTTP clients
//! (hyper's pooled client, and raw bytes over a `TcpStream`). Does not own any
//! assertion about Cohort's behaviour: those live in the test files.
//!
//! Nothing here sleeps to synchronise: backends signal through shared
//! counters and channels, and [`eventually`] polls with a deadline.

// Every test binary compiles this module but uses only part of it.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cohort::routing::{self, Cohort, Weight};
use cohort::serve::Server;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

/// The stable and canary version names every test config uses.
pub const STABLE: &str = "v1";
pub const CANARY: &str = "v2";

/// How long any single wait in a test may take before it counts as a failure.
/// Generous, because a loaded CI machine is slow; a passing test never waits it out.
pub const DEADLINE: Duration = Duration::from_secs(10);

type BackendBody = UnsyncBoxBody<Bytes, Infallible>;

// ---------------------------------------------------------------------------
// Backends

/// An HTTP backend that answers every request with its name and what it saw.
///
/// The JSON body is `{"backend", "method", "uri", "headers": [[name, value]...],
/// "body_len", "body_sha256", "trailers": [[name, value]...]}`; the response also carries `x-backend: <name>`.
/// A request with `x-want-hop-by-hop: 1` gets a response that carries
/// hop-by-hop headers (and `x-kept: 1`, which is not one).
#[derive(Debug, Clone)]
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    body_bytes: Arc<AtomicU64>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Backend::start_abortable(name).await.0
    }

    /// [`Backend::start`], and the task that accepts its connections:
    /// aborted, it closes the listener, so that new connections are
    /// refused (those already open stay).
    pub async fn start_abortable(name: &str) -> (Backend, tokio::task::JoinHandle<()>) {
        let listener = bind().await;
        let backend = Backend {
            name: name.to_owned(),
            addr: local_addr(&listener),
            hits: Arc::default(),
            body_bytes: Arc::default(),
        };
        let state = backend.clone();
        let accepting = tokio::spawn(serve_http(listener, move |req| {
            let state = state.clone();
            async move { state.answer(req).await }
        }));
        (backend, accepting)
    }

    /// Requests this backend has received (counted when their head arrives).
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Request body bytes received so far, over all requests, counted per frame.
    pub fn body_bytes_seen(&self) -> u64 {
        self.body_bytes.load(Ordering::SeqCst)
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<BackendBody> {
        self.hits.fetch_add(1, Ordering::SeqCst);
        let (parts, mut body) = req.into_parts();
        let mut digest = Sha256::new();
        let mut body_len: u64 = 0;
        let mut trailers = HeaderMap::new();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Some(fields) = frame.trailers_ref() {
                trailers.extend(fields.clone());
            }
            if let Some(data) = frame.data_ref() {
                digest.update(data);
                body_len += data.len() as u64;
                self.body_bytes
                    .fetch_add(data.len() as u64, Ordering::SeqCst);
            }
        }
        let pairs = |fields: &HeaderMap| -> Vec<[String; 2]> {
            fields
                .iter()
                .map(|(n, v)| {
                    [
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    ]
                })
                .collect()
        };
        let json = serde_json::json!({
            "backend": self.name,
            "method": parts.method.as_str(),
            "uri": parts.uri.to_string(),
            "headers": pairs(&parts.headers),
            "body_len": body_len,
            "body_sha256": hex(&digest.finalize()),
            "trailers": pairs(&trailers),
        });
        let mut rsp = Response::new(full(json.to_string()));
        let h = rsp.headers_mut();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("x-backend", value(&self.name));
        if parts.headers.get("x-want-hop-by-hop").is_some() {
            h.insert("connection", HeaderValue::from_static("x-backend-secret"));
            h.insert("x-backend-secret", HeaderValue::from_static("1"));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert("upgrade", HeaderValue::from_static("h2c"));
            h.insert("trailer", HeaderValue::from_static("x-checksum"));
            h.insert("proxy-authenticate", HeaderValue::from_static("Basic"));
            h.insert("x-kept", HeaderValue::from_static("1"));
        }
        rsp
    }
}

/// A server-sent-events backend: sends `data: one`, then waits for
/// [`SseBackend::send_second`] before it sends `data: two` and ends.
#[derive(Debug, Clone)]
pub struct SseBackend {
    pub name: String,
    pub addr: SocketAddr,
    release: Arc<Notify>,
    second_sent: Arc<AtomicBool>,
}

impl SseBackend {
    pub const FIRST: &'static str = "data: one\n\n";
    pub const SECOND: &'static str = "data: two\n\n";

    pub async fn start(name: &str) -> SseBackend {
        let listener = bind().await;
        let backend = SseBackend {
            name: name.to_owned(),
            addr: local_addr(&listener),
            release: Arc::new(Notify::new()),
            second_sent: Arc::default(),
        };
        let state = backend.clone();
        tokio::spawn(serve_http(listener, move |_req| {
            let state = state.clone();
            async move { state.answer() }
        }));
        backend
    }

    /// Lets the (single) stream send its second event and end.
    pub fn send_second(&self) {
        // `notify_one` stores a permit, so the order of this call and the wait does not matter.
        self.release.notify_one();
    }

    pub fn second_sent(&self) -> bool {
        self.second_sent.load(Ordering::SeqCst)
    }

    /// Lets the stream send its second event, and checks that `body`, the
    /// stream as the client receives it past its first event, brings just
    /// that and then ends cleanly.
    pub async fn finish(&self, body: Incoming) {
        self.send_second();
        let rest = within("the rest of the stream", body.collect())
            .await
            .expect("the stream ends cleanly")
            .to_bytes();
        assert_eq!(&rest[..], Self::SECOND.as_bytes());
    }

    fn answer(&self) -> Response<BackendBody> {
        let state = self.clone();
        let events = futures_util::stream::unfold(0u8, move |step| {
            let state = state.clone();
            async move {
                match step {
                    0 => Some((
                        Ok(Frame::data(Bytes::from_static(Self::FIRST.as_bytes()))),
                        1,
                    )),
                    1 => {
                        state.release.notified().await;
                        state.second_sent.store(true, Ordering::SeqCst);
                        Some((
                            Ok(Frame::data(Bytes::from_static(Self::SECOND.as_bytes()))),
                            2,
                        ))
                    }
                    _ => None,
                }
            }
        });
        let mut rsp = Response::new(StreamBody::new(events).boxed_unsync());
        let h = rsp.headers_mut();
        h.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert("cache-control", HeaderValue::from_static("no-cache"));
        h.insert("x-backend", value(&self.name));
        rsp
    }
}

/// A backend that answers every request with a body that never ends, and
/// tells when such a body has been dropped: its connection was cut.
#[derive(Debug, Clone)]
pub struct EndlessBackend {
    pub addr: SocketAddr,
    dropped: Arc<AtomicUsize>,
}

impl EndlessBackend {
    pub async fn start() -> EndlessBackend {
        let listener = bind().await;
        let backend = EndlessBackend {
            addr: local_addr(&listener),
            dropped: Arc::default(),
        };
        let state = backend.clone();
        tokio::spawn(serve_http(listener, move |_req| {
            let dropped = Arc::clone(&state.dropped);
            async move {
                /// Counts the body dropped when it is.
                struct Noted(Arc<AtomicUsize>);
                impl Drop for Noted {
                    fn drop(&mut self) {
                        self.0.fetch_add(1, Ordering::SeqCst);
                    }
                }
                let chunk = Bytes::from(vec![b'x'; 64 << 10]);
                let noted = Noted(dropped);
                let chunks = futures_util::stream::repeat_with(move || {
                    // Moves `noted` into the stream: it drops with the body.
                    let _held = &noted;
                    Ok(Frame::data(chunk.clone()))
                });
                Response::new(StreamBody::new(chunks).boxed_unsync())
            }
        }));
        backend
    }

    /// How many of its bodies have been dropped.
    pub fn dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }
}

/// A backend that answers every request with [`BulkBackend::LEN`] bytes,
/// under a `Content-Length`, as fast as the connection takes them, so that
/// a proxy reading it finds large reads ready.
#[derive(Debug, Clone)]
pub struct BulkBackend {
    pub addr: SocketAddr,
}

impl BulkBackend {
    pub const LEN: usize = 8 << 20;

    pub async fn start() -> BulkBackend {
        let listener = bind().await;
        let backend = BulkBackend {
            addr: local_addr(&listener),
        };
        let body = Bytes::from(vec![b'x'; Self::LEN]);
        tokio::spawn(serve_http(listener, move |_req| {
            let body = body.clone();
            async move { Response::new(full(body)) }
        }));
        backend
    }
}

/// A backend that holds every request until the test calls [`SlowBackend::release`].
#[derive(Debug, Clone)]
pub struct SlowBackend {
    pub name: String,
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    release: watch::Sender<bool>,
}

impl SlowBackend {
    pub const BODY: &'static str = "finally";

    pub async fn start(name: &str) -> SlowBackend {
        let listener = bind().await;
        let backend = SlowBackend {
            name: name.to_owned(),
            addr: local_addr(&listener),
            hits: Arc::default(),
            release: watch::Sender::new(false),
        };
        let state = backend.clone();
        tokio::spawn(serve_http(listener, move |_req| {
            let state = state.clone();
            async move {
                state.hits.fetch_add(1, Ordering::SeqCst);
                let mut released = state.release.subscribe();
                // An error means the backend is gone; answer anyway.
                let _ = released.wait_for(|r| *r).await;
                let mut rsp = Response::new(full(Self::BODY));
                rsp.headers_mut().insert("x-backend", value(&state.name));
                rsp
            }
        }));
        backend
    }

    /// Requests that have arrived (held or answered).
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Answers every held request, and every later one at once.
    pub fn release(&self) {
        self.release.send_replace(true);
    }
}

/// A WebSocket backend that answers each text message `m` with `<name>:m`
/// and echoes binary messages unchanged.
#[derive(Debug, Clone)]
pub struct WsBackend {
    pub name: String,
    pub addr: SocketAddr,
}

impl WsBackend {
    pub async fn start(name: &str) -> WsBackend {
        let listener = bind().await;
        let backend = WsBackend {
            name: name.to_owned(),
            addr: local_addr(&listener),
        };
        let name = backend.name.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let name = name.clone();
                tokio::spawn(async move {
                    let Some(mut stream) = answer_health_probe(stream).await else {
                        return;
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_async(&mut stream).await else {
                        return;
                    };
                    use tokio_tungstenite::tungstenite::Message;
                    while let Some(Ok(message)) = ws.next().await {
                        let reply = match message {
                            Message::Text(text) => Message::text(format!("{name}:{text}")),
                            Message::Binary(data) => Message::Binary(data),
                            Message::Close(_) => break,
                            _ => continue,
                        };
                        if ws.send(reply).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        backend
    }
}

/// Answers the connection `200 ok` and closes it if its request is one of
/// Cohort's health probes (which a canary must pass before it takes
/// traffic); otherwise gives it back unread.
async fn answer_health_probe(mut stream: TcpStream) -> Option<TcpStream> {
    // A probe's head comes in one write, so what the first peek sees of it
    // is enough to tell.
    let mut head = vec![0; 4096];
    let seen = stream.peek(&mut head).await.ok()?;
    let probe = String::from_utf8_lossy(&head[..seen])
        .to_ascii_lowercase()
        .contains("user-agent: cohort-health-check");
    if !probe {
        return Some(stream);
    }
    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
    let _ = stream.write_all(answer).await;
    None
}

/// An upstream that reads each request head, writes `answer` as raw bytes
/// and closes: for answers no HTTP library would send.
pub async fn raw_upstream(answer: &'static [u8]) -> SocketAddr {
    let listener = bind().await;
    let addr = local_addr(&listener);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = read_head(&mut stream).await;
                let _ = stream.write_all(answer).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// An address where nothing listens: bound, read, and released.
pub async fn dead_addr() -> SocketAddr {
    let listener = bind().await;
    local_addr(&listener)
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port")
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .expect("a bound listener has an address")
}

/// Serves HTTP/1.1 on `listener` with `handler`, one task per connection.
async fn serve_http<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Response<BackendBody>> + Send + 'static,
{
    while let Ok((stream, _)) = listener.accept().await {
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                async move {
                    // Cohort's health probes are answered here, so they never
                    // count as traffic a test is watching for.
                    if is_health_probe(&req) {
                        return Ok::<_, Infallible>(Response::new(full("ok")));
                    }
                    Ok::<_, Infallible>(handler(req).await)
                }
            });
            // A client that goes away mid-request is not the backend's problem.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Whether `req` is one of Cohort's active health checks.
pub fn is_health_probe<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(hyper::header::USER_AGENT)
        .is_some_and(|ua| ua == "cohort-health-check")
}

fn full(body: impl Into<Bytes>) -> BackendBody {
    Full::new(body.into()).boxed_unsync()
}

fn value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).expect("a test header value")
}

/// An upstream that answers every request in HTTP/1.0 with keep-alive,
/// and keeps every byte it is sent: what hyper would send next on such a
/// connection is HTTP/1.0, where a body of unknown length has no framing.
pub struct Http10Backend {
    pub addr: SocketAddr,
    received: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Http10Backend {
    pub async fn start() -> Http10Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("an address");
        let received: Arc<std::sync::Mutex<Vec<u8>>> = Arc::default();
        let kept = Arc::clone(&received);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(Self::serve(stream, Arc::clone(&kept)));
            }
        });
        Http10Backend { addr, received }
    }

    /// Answers each request once its head, and a chunked body's last
    /// chunk, are in.
    async fn serve(mut stream: TcpStream, kept: Arc<std::sync::Mutex<Vec<u8>>>) {
        let mut pending = Vec::new();
        let mut buf = [0; 4096];
        loop {
            while let Some(end) = request_end(&pending) {
                pending.drain(..end);
                let ok =
                    b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok";
                if stream.write_all(ok).await.is_err() {
                    return;
                }
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    kept.lock()
                        .expect("not poisoned")
                        .extend_from_slice(&buf[..n]);
                    pending.extend_from_slice(&buf[..n]);
                }
            }
        }
    }

    /// Everything it has been sent, on every connection, in order of arrival.
    pub fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().expect("not poisoned")).into_owned()
    }
}

/// Where the first whole request in `bytes` ends: its head, and a chunked
/// body's last chunk.
fn request_end(bytes: &[u8]) -> Option<usize> {
    let head_end = find_bytes(bytes, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_ascii_lowercase();
    if !head.contains("transfer-encoding: chunked") {
        return Some(head_end);
    }
    find_bytes(&bytes[head_end..], b"0\r\n\r\n").map(|last| head_end + last + 5)
}

fn find_bytes(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `bytes` in hex, as the echo backend reports a body.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

// ---------------------------------------------------------------------------
// Cohort

/// A config for Cohort on loopback port 0 (proxy and admin), with `extra`
/// (whole sections, e.g. `[routing]`) and versions `v1` (stable) on `stable`
/// and, if given, `v2` (canary) on its upstreams at its weight in percent.
pub fn config(stable: &[SocketAddr], canary: Option<(&[SocketAddr], f64)>, extra: &str) -> String {
    let list = |addrs: &[SocketAddr]| {
        addrs
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let state = scratch_dir();
    let mut text = format!(
        "[listen]\naddr = \"127.0.0.1:0\"\ndrain_timeout = \"10s\"\n\n\
         [admin]\naddr = \"127.0.0.1:0\"\n\n\
         [state]\npath = {:?}\naudit_log = {:?}\n\n\
         {extra}\n\n\
         [versions.stable]\nname = \"{STABLE}\"\nupstreams = [{}]\n",
        state.join("state.json"),
        state.join("audit.jsonl"),
        list(stable)
    );
    if let Some((upstreams, weight)) = canary {
        text.push_str(&format!(
            "\n[versions.canary]\nname = \"{CANARY}\"\nupstreams = [{}]\nweight = {weight}\n",
            list(upstreams)
        ));
    }
    text
}

/// `toml`, a [`config`], with `keys` (whole `key = value` lines) added to
/// its `[listen]` section.
pub fn with_listen_keys(toml: &str, keys: &str) -> String {
    let anchor = "drain_timeout = \"10s\"\n";
    assert!(toml.contains(anchor), "not a support::config: {toml}");
    toml.replacen(anchor, &format!("{anchor}{keys}\n"), 1)
}

thread_local! {
    /// The scratch directories made on this thread. Each test runs on a
    /// thread of its own, so they are removed when the test ends, passed or
    /// failed, after its runtime (and any Cohort on it) has stopped.
    static SCRATCH: std::cell::RefCell<Vec<tempfile::TempDir>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// A fresh directory for one Cohort's state file and audit log, removed when
/// the test ends. Call it from the test's own thread (not from a blocking
/// pool's), whose end is the test's.
pub fn scratch_dir() -> std::path::PathBuf {
    scratch_dir_in(&std::env::temp_dir()).expect("a scratch directory")
}

fn scratch_dir_in(parent: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix("cohort-test-")
        .tempdir_in(parent)?;
    let path = dir.path().to_owned();
    SCRATCH.with(|made| made.borrow_mut().push(dir));
    Ok(path)
}

/// Starts Cohort from a whole TOML config.
pub async fn start_cohort(toml: &str) -> Server {
    let config = cohort::config::Config::parse(toml, "test")
        .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{toml}"));
    cohort::serve::start(config)
        .await
        .expect("cohort starts on loopback")
}

/// Applies the whole TOML config `toml` to a running Cohort, as SIGHUP does
/// with the file; returns the live state after it.
pub fn reload(server: &Server, toml: &str) -> cohort::state::LiveState {
    let config = cohort::config::Config::parse(toml, "test")
        .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{toml}"));
    server.control().reload(&config).expect("the reload").live
}

/// Starts Cohort in front of `stable` and an optional canary; see [`config`].
pub async fn cohort(
    stable: &[SocketAddr],
    canary: Option<(&[SocketAddr], f64)>,
    extra: &str,
) -> Server {
    start_cohort(&config(stable, canary, extra)).await
}

/// The version name `place()` predicts for `key`.
pub fn predicted(salt: &str, weight_percent: f64, key: &str) -> &'static str {
    let weight = Weight::from_percent(weight_percent).expect("a weight in 0..=100");
    match routing::place(salt.as_bytes(), weight, key.as_bytes()).cohort {
        Cohort::Canary => CANARY,
        _ => STABLE,
    }
}

/// The first key `{prefix}-N` that lands on `version` under `salt` and `weight_percent`.
pub fn key_on(salt: &str, weight_percent: f64, version: &str, prefix: &str) -> String {
    (0..10_000)
        .map(|i| format!("{prefix}-{i}"))
        .find(|key| predicted(salt, weight_percent, key) == version)
        .expect("some key lands on each side of a weight strictly between 0 and 100")
}

// ---------------------------------------------------------------------------
// Clients

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The `x-agent-version` the proxy tagged the response with.
    pub fn version(&self) -> &str {
        self.headers
            .get("x-agent-version")
            .map(|v| v.to_str().expect("a printable version header"))
            .unwrap_or_else(|| panic!("response without x-agent-version: {self:?}"))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    /// The echo backend that answered.
    pub fn backend(&self) -> String {
        self.json()["backend"]
            .as_str()
            .unwrap_or_else(|| panic!("no backend in {:?}", self.body))
            .to_owned()
    }

    /// Every value of header `name` the echo backend received.
    pub fn seen(&self, name: &str) -> Vec<String> {
        values_of(&echoed_headers(&self.json()), name)
    }

    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().expect("a printable cookie").to_owned())
            .collect()
    }
}

/// A pooled HTTP/1.1 client aimed at one address.
#[derive(Clone)]
pub struct Http {
    addr: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Http {
        Http {
            addr,
            client: client(),
        }
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.send(Method::GET, path, headers, Bytes::new()).await
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Reply {
        let req = request(method, self.addr, path, headers, Full::new(body));
        let rsp = within("the response", self.client.request(req))
            .await
            .expect("the proxy answers");
        read_whole(rsp).await
    }

    /// Sends a GET and returns the response with its body unread.
    pub async fn get_streaming(&self, path: &str, headers: &[(&str, &str)]) -> Response<Incoming> {
        let req = request(
            Method::GET,
            self.addr,
            path,
            headers,
            Full::new(Bytes::new()),
        );
        within("the response head", self.client.request(req))
            .await
            .expect("the proxy answers")
    }
}

/// A pooled client for any request body type.
pub fn client<B>() -> Client<HttpConnector, B>
where
    B: Body + Send + 'static,
    B::Data: Send,
{
    Client::builder(TokioExecutor::new()).build_http()
}

/// A request to `http://addr{path}` with `headers`.
pub fn request<B>(
    method: Method,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: B,
) -> Request<B> {
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = format!("http://{addr}{path}")
        .parse()
        .expect("a valid test URI");
    for (name, val) in headers {
        req.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).expect("a valid test header name"),
            value(val),
        );
    }
    req
}

/// Reads a response's body to the end.
pub async fn read_whole(rsp: Response<Incoming>) -> Reply {
    let (parts, body) = rsp.into_parts();
    let body = within("the response body", body.collect())
        .await
        .expect("the body arrives whole")
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// A response as raw bytes parsed it: status, headers in wire order, body.
pub struct RawReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for RawReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawReply")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    /// The names of the headers the echo backend received, in order.
    pub fn seen_names(&self) -> Vec<String> {
        echoed_headers(&self.json())
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    }

    /// Every value of header `name` the echo backend received.
    pub fn seen(&self, name: &str) -> Vec<String> {
        values_of(&echoed_headers(&self.json()), name)
    }
}

/// The headers an echo backend's answer lists as received, in order.
fn echoed_headers(echo: &serde_json::Value) -> Vec<(String, String)> {
    echo["headers"]
        .as_array()
        .unwrap_or_else(|| panic!("the echo lists no headers: {echo}"))
        .iter()
        .map(|pair| {
            let text = |v: &serde_json::Value| v.as_str().expect("header text").to_owned();
            (text(&pair[0]), text(&pair[1]))
        })
        .collect()
}

fn values_of(headers: &[(String, String)], name: &str) -> Vec<String> {
    headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
        .collect()
}

/// Writes `bytes` to a fresh connection to `addr` and reads one response.
///
/// Write errors are ignored: a server may answer and close before it has read
/// everything (a 431 for an oversized head), and the answer is what matters.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> RawReply {
    within("a raw exchange", async {
        let mut stream = TcpStream::connect(addr)
            .await
            .expect("connect to the proxy");
        let _ = stream.write_all(bytes).await;
        read_raw_response(&mut stream).await
    })
    .await
}

async fn read_raw_response(stream: &mut TcpStream) -> RawReply {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.unwrap_or(0);
        assert!(
            n > 0,
            "connection ended before a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut rest = buf[head_end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let body = if let Some(len) = find("content-length") {
        let len: usize = len.parse().expect("a numeric content-length");
        while rest.len() < len {
            let mut chunk = [0u8; 8192];
            let n = stream.read(&mut chunk).await.unwrap_or(0);
            assert!(n > 0, "connection ended inside a body");
            rest.extend_from_slice(&chunk[..n]);
        }
        rest.truncate(len);
        rest
    } else if find("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
        read_chunked(stream, rest).await
    } else {
        let _ = stream.read_to_end(&mut rest).await;
        rest
    };
    RawReply {
        status,
        headers,
        body,
    }
}

async fn read_chunked(stream: &mut TcpStream, mut buf: Vec<u8>) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            fill(stream, &mut buf).await;
        };
        let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
        buf.drain(..line_end + 2);
        if size == 0 {
            return body;
        }
        while buf.len() < size + 2 {
            fill(stream, &mut buf).await;
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 8192];
    let n = stream.read(&mut chunk).await.unwrap_or(0);
    assert!(n > 0, "connection ended inside a chunked body");
    buf.extend_from_slice(&chunk[..n]);
}

/// Reads a response head up to its blank line, a byte at a time so that
/// nothing after it (a body, an upgraded connection's bytes) is consumed.
pub async fn read_head(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = within("a response head", stream.read_u8())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "connection ended after {:?}: {e}",
                    String::from_utf8_lossy(&head)
                )
            });
        head.push(byte);
    }
    String::from_utf8_lossy(&head).into_owned()
}

// ---------------------------------------------------------------------------
// Waiting

/// Resolves once the proxy at `proxy` refuses new connections: its drain has begun.
pub async fn wait_for_refusal(proxy: SocketAddr) {
    eventually_async("new connections being refused", || async {
        TcpStream::connect(proxy).await.is_err()
    })
    .await;
}

/// Awaits `future`, failing the test if it takes longer than [`DEADLINE`].
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {DEADLINE:?}"))
}

/// Polls `condition` until it holds, failing the test after [`DEADLINE`].
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Polls an async `condition` until it holds, failing the test after [`DEADLINE`].
pub async fn eventually_async<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    within(what, async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

// ---------------------------------------------------------------------------
// Control plane: a ticking SSE backend, one keep-alive connection, the admin
// API, and `cohort serve` as a child process.

/// A server-sent-events backend whose every open stream first sends
/// `data: ready`, then `data: N` each time the test calls [`SseTicker::tick`]
/// (N counts the ticks), and never ends on its own.
#[derive(Debug, Clone)]
pub struct SseTicker {
    pub name: String,
    pub addr: SocketAddr,
    ticks: Arc<watch::Sender<u64>>,
}

impl SseTicker {
    pub const READY: &'static str = "data: ready\n\n";

    pub async fn start(name: &str) -> SseTicker {
        let listener = bind().await;
        let backend = SseTicker {
            name: name.to_owned(),
            addr: local_addr(&listener),
            ticks: Arc::new(watch::Sender::new(0)),
        };
        let state = backend.clone();
        tokio::spawn(serve_http(listener, move |_req| {
            let state = state.clone();
            async move { state.answer() }
        }));
        backend
    }

    /// Makes every open stream send its next event; returns that event.
    pub fn tick(&self) -> String {
        let mut n = 0;
        self.ticks.send_modify(|ticks| {
            *ticks += 1;
            n = *ticks;
        });
        Self::event(n)
    }

    pub fn event(n: u64) -> String {
        format!("data: {n}\n\n")
    }

    fn answer(&self) -> Response<BackendBody> {
        let mut ticks = self.ticks.subscribe();
        ticks.mark_unchanged();
        let events = futures_util::stream::unfold((true, ticks), |(first, mut ticks)| async move {
            if first {
                let ready = Frame::data(Bytes::from_static(Self::READY.as_bytes()));
                return Some((Ok(ready), (false, ticks)));
            }
            // An error means the backend is gone: end the stream.
            ticks.changed().await.ok()?;
            let n = *ticks.borrow_and_update();
            Some((Ok(Frame::data(Bytes::from(Self::event(n)))), (false, ticks)))
        });
        let mut rsp = Response::new(StreamBody::new(events).boxed_unsync());
        let h = rsp.headers_mut();
        h.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert("x-backend", value(&self.name));
        rsp
    }
}

/// Reads `body` until the bytes received end with `needle`; `Err` with what
/// was read if the stream ends or fails first. Fails the test after [`DEADLINE`].
pub async fn read_until(body: &mut Incoming, needle: &str) -> Result<(), String> {
    within("the next event", async {
        let mut seen = Vec::new();
        while !seen.ends_with(needle.as_bytes()) {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        seen.extend_from_slice(data);
                    }
                }
                Some(Err(e)) => {
                    return Err(format!("{e} after {:?}", String::from_utf8_lossy(&seen)));
                }
                None => {
                    return Err(format!(
                        "end of stream after {:?}",
                        String::from_utf8_lossy(&seen)
                    ));
                }
            }
        }
        Ok(())
    })
    .await
}

/// One HTTP/1.1 connection kept open for many requests: if the server drops
/// it, every later request fails instead of silently reconnecting.
pub struct KeepAlive {
    addr: SocketAddr,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl KeepAlive {
    pub async fn connect(addr: SocketAddr) -> KeepAlive {
        let stream = within("connect", TcpStream::connect(addr))
            .await
            .expect("connect to the proxy");
        let (sender, connection) = within(
            "the handshake",
            hyper::client::conn::http1::handshake(TokioIo::new(stream)),
        )
        .await
        .expect("an HTTP/1.1 handshake");
        tokio::spawn(connection);
        KeepAlive { addr, sender }
    }

    /// Sends a GET of `path` with `headers`; `Err` if the connection failed.
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = path.parse().map_err(|e| format!("bad path {path}: {e}"))?;
        let host = value(&self.addr.to_string());
        req.headers_mut().insert(hyper::header::HOST, host);
        for (name, val) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).expect("a valid test header name"),
                value(val),
            );
        }
        self.sender
            .ready()
            .await
            .map_err(|e| format!("the connection is gone: {e}"))?;
        let rsp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| format!("the request failed: {e}"))?;
        let (parts, body) = rsp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("the body failed: {e}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// The admin API over HTTP, with an optional bearer token.
#[derive(Clone)]
pub struct AdminApi {
    http: Http,
    token: Option<String>,
}

impl AdminApi {
    pub fn new(addr: SocketAddr) -> AdminApi {
        AdminApi {
            http: Http::new(addr),
            token: None,
        }
    }

    pub fn with_token(addr: SocketAddr, token: &str) -> AdminApi {
        AdminApi {
            http: Http::new(addr),
            token: Some(token.to_owned()),
        }
    }

    /// Sends `body` as is (it need not be valid JSON).
    pub async fn raw(&self, method: Method, path: &str, body: &str) -> Reply {
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(auth) = &auth {
            headers.push(("authorization", auth));
        }
        self.http
            .send(method, path, &headers, Bytes::from(body.to_owned()))
            .await
    }

    pub async fn call(&self, method: Method, path: &str, body: serde_json::Value) -> Reply {
        let text = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        self.raw(method, path, &text).await
    }

    /// `GET /admin/state`, which must succeed.
    pub async fn state(&self) -> serde_json::Value {
        let reply = self.raw(Method::GET, "/admin/state", "").await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        reply.json()
    }

    /// `PUT /admin/weight`, which must succeed; returns the new state.
    pub async fn set_weight(&self, weight: f64, force: bool) -> serde_json::Value {
        let body = serde_json::json!({"weight": weight, "force": force});
        let reply = self.call(Method::PUT, "/admin/weight", body).await;
        assert_eq!(reply.status, StatusCode::OK, "weight {weight}: {reply:?}");
        reply.json()
    }

    /// `POST /admin/promote`, which must succeed; returns the new state.
    pub async fn promote(&self) -> serde_json::Value {
        let reply = self
            .call(Method::POST, "/admin/promote", serde_json::Value::Null)
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        reply.json()
    }

    /// `POST /admin/rollback`, which must succeed; returns the new state.
    pub async fn rollback(&self, reason: &str) -> serde_json::Value {
        let body = serde_json::json!({"reason": reason});
        let reply = self.call(Method::POST, "/admin/rollback", body).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        reply.json()
    }
}

/// The `cohort` binary under test.
pub const COHORT_BIN: &str = env!("CARGO_BIN_EXE_cohort");

/// `cohort serve` as a child process, its addresses read from its log.
pub struct Process {
    child: tokio::process::Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    log: Arc<std::sync::Mutex<Vec<String>>>,
}

/// How a `cohort serve` that never started serving ended.
#[derive(Debug)]
pub struct Refused {
    pub code: Option<i32>,
    pub log: String,
}

impl Process {
    /// Starts `cohort serve --config <config> <args>` and waits until it serves.
    pub async fn serve(config: &std::path::Path, args: &[&str]) -> Process {
        Self::try_serve(config, args)
            .await
            .unwrap_or_else(|refused| panic!("cohort serve did not start: {refused:?}"))
    }

    /// As [`Process::serve`], but a process that exits before it serves is an `Err`.
    pub async fn try_serve(config: &std::path::Path, args: &[&str]) -> Result<Process, Refused> {
        let mut child = tokio::process::Command::new(COHORT_BIN)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            // The token comes from the config under test, never from the environment.
            .env_remove("COHORT_ADMIN_TOKEN")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start cohort serve");
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let reader = tokio::spawn({
            let log = Arc::clone(&log);
            async move {
                use tokio::io::AsyncBufReadExt as _;
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    log.lock().expect("the log lock").push(strip_ansi(&line));
                }
            }
        });
        let announced = within("cohort serve to serve or exit", async {
            loop {
                let found = log
                    .lock()
                    .expect("the log lock")
                    .iter()
                    .find(|l| l.contains("cohort is serving"))
                    .cloned();
                if let Some(line) = found {
                    return Ok(line);
                }
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(status);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        match announced {
            Ok(line) => Ok(Process {
                child,
                proxy: announced_addr(&line, "proxy.addr")
                    .unwrap_or_else(|| panic!("no proxy.addr in {line:?}")),
                admin: announced_addr(&line, "admin.addr")
                    .unwrap_or_else(|| panic!("no admin.addr in {line:?}")),
                log,
            }),
            Err(status) => {
                let _ = within("the log to end", reader).await;
                let log = log.lock().expect("the log lock").join("\n");
                Err(Refused {
                    code: status.code(),
                    log,
                })
            }
        }
    }

    pub fn pid(&self) -> String {
        self.child.id().expect("the child is running").to_string()
    }

    /// Sends `signal` (e.g. `"USR1"`) with `kill`.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// SIGKILL, then waits for the process to be gone.
    pub async fn kill9(mut self) {
        self.child.start_kill().expect("SIGKILL cohort serve");
        within("cohort serve to die", self.child.wait())
            .await
            .expect("wait for cohort serve");
    }

    /// SIGTERM, then waits for a clean exit; returns the exit code.
    pub async fn stop(mut self) -> Option<i32> {
        self.signal("TERM");
        within("cohort serve to exit", self.child.wait())
            .await
            .expect("wait for cohort serve")
            .code()
    }

    /// The log lines so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().expect("the log lock").clone()
    }

    /// Waits until a log line contains every one of `needles`; returns it.
    pub async fn log_line(&self, needles: &[&str]) -> String {
        let mut found = None;
        eventually(&format!("a log line with {needles:?}"), || {
            found = self
                .log()
                .into_iter()
                .find(|l| needles.iter().all(|n| l.contains(n)));
            found.is_some()
        })
        .await;
        found.expect("found above")
    }
}

/// `line` without ANSI colour codes.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip up to and including the final letter of the escape.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The address logged as `field=ADDR` in `line`.
pub fn announced_addr(line: &str, field: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(&format!("{field}="))? + field.len() + 1..];
    let addr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect();
    addr.parse().ok()
}

/// The JSON lines of the audit log at `path`.
pub fn audit_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read the audit log {}: {e}", path.display()))
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("audit line {line:?}: {e}"))
        })
        .collect()
}

/// A scratch directory in memory (`/dev/shm`) where the system has one, else
/// [`scratch_dir`], removed when the test ends: for tests that make a
/// thousand durable changes, where each fsync to a real disk would cost
/// milliseconds and measure the disk.
pub fn memory_scratch_dir() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = scratch_dir_in(shm)
    {
        return dir;
    }
    scratch_dir()
}

/// `toml` (from [`config`]) with its state file and audit log moved into `dir`.
pub fn with_state_in(toml: &str, dir: &std::path::Path) -> String {
    let parsed = cohort::config::Config::parse(toml, "test")
        .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{toml}"));
    let state = format!("path = {:?}", parsed.state.path);
    let audit = format!("audit_log = {:?}", parsed.state.audit_log);
    assert!(toml.contains(&state) && toml.contains(&audit), "{toml}");
    toml.replacen(&state, &format!("path = {:?}", dir.join("state.json")), 1)
        .replacen(
            &audit,
            &format!("audit_log = {:?}", dir.join("audit.jsonl")),
            1,
        )
}

// ---------------------------------------------------------------------------
// Rollouts: a backend with a set failure rate, delay and token count.

/// How a [`TunedBackend`] answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tuning {
    /// Every `n`-th request (counted from 1) is answered 500.
    pub fail_every: Option<usize>,
    /// Every request for this path is answered 500.
    pub fail_path: Option<&'static str>,
    /// Every `n`-th request is answered 200 with a `content-length` longer
    /// than its body, so the connection closes part way through the body.
    pub cut_every: Option<usize>,
    /// Every `n`-th request is answered 200 and `ok`, then nothing more:
    /// its body never ends.
    pub stall_every: Option<usize>,
    /// Added before every answer: the backend's own latency.
    pub delay: Duration,
    /// Sent as `x-tokens: <tokens + request number % 11 - 5>`, a spread of ±5.
    pub tokens: Option<u64>,
    /// Only requests for this path are answered; every other one is held
    /// for good: a backend that passes its probes and answers no one.
    pub answers_only: Option<&'static str>,
}

/// A backend that answers `ok` after [`Tuning::delay`], fails every
/// [`Tuning::fail_every`]-th request, and those for [`Tuning::fail_path`],
/// with a 500, cuts every
/// [`Tuning::cut_every`]-th one's body short, stalls every
/// [`Tuning::stall_every`]-th one's body, and reports tokens.
#[derive(Debug, Clone)]
pub struct TunedBackend {
    pub name: String,
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl TunedBackend {
    pub async fn start(name: &str, tuning: Tuning) -> TunedBackend {
        let listener = bind().await;
        let backend = TunedBackend {
            name: name.to_owned(),
            addr: local_addr(&listener),
            hits: Arc::default(),
        };
        let state = backend.clone();
        tokio::spawn(serve_http(listener, move |req| {
            let state = state.clone();
            async move {
                let n = state.hits.fetch_add(1, Ordering::SeqCst) + 1;
                if tuning
                    .answers_only
                    .is_some_and(|path| path != req.uri().path())
                {
                    std::future::pending::<()>().await;
                }
                if !tuning.delay.is_zero() {
                    tokio::time::sleep(tuning.delay).await;
                }
                let failing = tuning
                    .fail_every
                    .is_some_and(|every| n.is_multiple_of(every))
                    || tuning.fail_path == Some(req.uri().path());
                let cut = tuning
                    .cut_every
                    .is_some_and(|every| n.is_multiple_of(every));
                let stall = tuning
                    .stall_every
                    .is_some_and(|every| n.is_multiple_of(every));
                let mut rsp = if stall {
                    let chunks = futures_util::stream::iter([Ok(Frame::data(Bytes::from("ok")))])
                        .chain(futures_util::stream::pending());
                    Response::new(StreamBody::new(chunks).boxed_unsync())
                } else if cut {
                    // "ok", then a pause, in which hyper sends the head and
                    // "ok"; then the end, which hyper finds short, so it
                    // closes the connection: a backend that dies mid-body.
                    let chunks = futures_util::stream::unfold(0, |sent| async move {
                        if sent > 0 {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            return None;
                        }
                        Some((Ok(Frame::data(Bytes::from("ok"))), 1))
                    });
                    let mut rsp = Response::new(StreamBody::new(chunks).boxed_unsync());
                    rsp.headers_mut().insert("content-length", value("1000"));
                    rsp
                } else {
                    Response::new(full(if failing { "failed" } else { "ok" }))
                };
                if failing {
                    *rsp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                }
                let h = rsp.headers_mut();
                h.insert("x-backend", value(&state.name));
                if let Some(tokens) = tuning.tokens {
                    let tokens = (tokens + (n as u64 % 11)).saturating_sub(5);
                    h.insert("x-tokens", value(&tokens.to_string()));
                }
                rsp
            }
        }));
        backend
    }

    /// Requests answered or being answered (health probes not counted).
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A call to the admin API of `server` with a JSON body (may be empty).
pub async fn admin(server: &Server, method: Method, path: &str, body: &str) -> Reply {
    Http::new(server.admin_addr())
        .send(
            method,
            path,
            &[("content-type", "application/json")],
            Bytes::from(body.to_owned()),
        )
        .await
}

/// The sum of `name`'s series of `version` over `label`'s `values` (an
/// absent series counting 0).
pub async fn metric_sum(
    server: &Server,
    name: &str,
    version: &str,
    label: &str,
    values: &[&str],
) -> f64 {
    let mut total = 0.0;
    for value in values {
        let labels = [("version", version), (label, value)];
        total += metric(server, name, &labels).await.unwrap_or(0.0);
    }
    total
}

/// The value of the series `name` (with or without labels) whose labels
/// include all of `labels`, scraped from `server`'s `/metrics`.
pub async fn metric(server: &Server, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = admin(server, Method::GET, "/metrics", "").await.body;
    let text = String::from_utf8_lossy(&text).into_owned();
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}
