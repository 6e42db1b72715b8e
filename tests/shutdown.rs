//! A graceful stop: open requests finish, new connections are refused.
//!
//! Owns: `Server::shutdown` with a request in flight (and `/ready`
//! meanwhile), with a connection accepted but not yet used, with a
//! keep-alive connection between two requests or streaming a response,
//! and with an upgrade whose answer is still on its way, and with a rollout running
//! (suspended, not replaced, still abortable). The test holds each in place
//! (the upstream holds the request, the client holds its first bytes) until
//! the drain has begun, so "in flight" is a fact, not a race. Does not own:
//! the SIGTERM path of the binary (`tests/cli.rs`).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::Method;
use serde_json::{Value, json};
use support::{
    AdminApi, Http, STABLE, SlowBackend, cohort, eventually, eventually_async, metric, read_head,
    wait_for_refusal, within,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, watch};

/// The tests here count the proxy's client connections, a process-wide gauge.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_in_flight_request_finish_and_refuses_new_connections() {
    let _one = ONE_AT_A_TIME.lock().await;
    let slow = SlowBackend::start(STABLE).await;
    let server = cohort(&[slow.addr], None, "").await;
    let proxy = server.proxy_addr();
    let admin_addr = server.admin_addr();
    let admin = Http::new(admin_addr);
    assert_eq!(admin.get("/ready", &[]).await.status, 200);

    let in_flight = tokio::spawn(async move {
        Http::new(proxy)
            .get("/slow", &[("x-user-id", "alice")])
            .await
    });
    eventually("the request reaching the upstream", || slow.hits() == 1).await;

    let stopping = tokio::spawn(server.shutdown());
    wait_for_refusal(proxy).await;
    assert!(
        !stopping.is_finished(),
        "shutdown must wait for the request the upstream still holds"
    );
    // Still answering while it drains, on new connections too, and not
    // ready: a load balancer moves on, and an operator can still act.
    assert_eq!(admin.get("/ready", &[]).await.status, 503);
    let fresh = Http::new(admin_addr);
    assert_eq!(fresh.get("/ready", &[]).await.status, 503);
    assert_eq!(fresh.get("/health", &[]).await.status, 200);
    assert_eq!(fresh.get("/metrics", &[]).await.status, 200);
    assert!(!in_flight.is_finished());

    slow.release();
    let reply = within("the in-flight response", in_flight)
        .await
        .expect("the client task ran");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.version(), STABLE);
    assert_eq!(reply.body, SlowBackend::BODY);
    within("the drain to finish", stopping)
        .await
        .expect("shutdown ran to the end");
    assert_eq!(slow.hits(), 1);
}

/// The value of header `name` in a response `head`, if present.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_accepted_before_the_drain_has_its_first_request_answered() {
    let _one = ONE_AT_A_TIME.lock().await;
    let backend = support::Backend::start(STABLE).await;
    let server = cohort(&[backend.addr], None, "").await;
    let proxy = server.proxy_addr();
    let open = metric(&server, "cohort_client_connections", &[]).await;
    // A client (or a load balancer) that connected and has not written yet.
    let mut early = TcpStream::connect(proxy).await.expect("connect");
    eventually_async("the proxy accepting the connection", || async {
        metric(&server, "cohort_client_connections", &[]).await == Some(open.unwrap_or(0.0) + 1.0)
    })
    .await;

    let stopping = tokio::spawn(server.shutdown());
    wait_for_refusal(proxy).await;
    early
        .write_all(b"GET /first HTTP/1.1\r\nhost: cohort\r\nx-user-id: alice\r\n\r\n")
        .await
        .expect("write the first request");
    let head = read_head(&mut early).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(header(&head, "x-agent-version"), Some(STABLE), "{head}");
    // Its only request: the connection closes behind it.
    assert_eq!(header(&head, "connection"), Some("close"), "{head}");
    within("the drain to finish", stopping)
        .await
        .expect("shutdown ran to the end");
    assert_eq!(backend.hits(), 1);
}

/// A keep-alive connection between two requests when the drain begins
/// is not closed under the next one its client sends: that one is
/// answered, with `connection: close`. (Closed at once, as hyper's own
/// graceful shutdown would, a busy client loses a request at every
/// reload that restarts the workers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_between_requests_has_its_next_one_answered() {
    let _one = ONE_AT_A_TIME.lock().await;
    let backend = support::Backend::start(STABLE).await;
    let server = cohort(&[backend.addr], None, "").await;
    let proxy = server.proxy_addr();
    let mut client = support::KeepAlive::connect(proxy).await;
    let first = client.get("/first", &[("x-user-id", "alice")]).await;
    assert_eq!(first.map(|r| r.status), Ok(http::StatusCode::OK));

    let stopping = tokio::spawn(server.shutdown());
    wait_for_refusal(proxy).await;
    let next = client
        .get("/next", &[("x-user-id", "alice")])
        .await
        .expect("the next request is answered");
    assert_eq!(next.status, 200, "{next:?}");
    assert_eq!(next.version(), STABLE);
    assert_eq!(
        next.headers.get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..]),
        "{next:?}"
    );
    within("the drain to finish", stopping)
        .await
        .expect("shutdown ran to the end");
    assert_eq!(backend.hits(), 2);
}

/// An upstream whose `/stream` sends its head and a first chunk, then ends
/// once the test says so; anything else (the health probes, the next
/// request) is answered `ok` at once, on a kept-alive connection.
async fn streaming_upstream(end: watch::Receiver<bool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut end = end.clone();
            tokio::spawn(async move {
                loop {
                    let head = read_request_head(&mut stream).await;
                    if head.is_empty() {
                        return;
                    }
                    let answered = if head.starts_with("GET /stream ") {
                        let started =
                            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n";
                        let _ = stream.write_all(started).await;
                        let _ = end.wait_for(|ended| *ended).await;
                        stream.write_all(b"0\r\n\r\n").await
                    } else {
                        stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                    };
                    if answered.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A request head up to its blank line, read a byte at a time; empty at
/// the end of the connection.
async fn read_request_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read_u8().await {
            Ok(byte) => head.push(byte),
            Err(_) => return String::new(),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A keep-alive connection whose response is streaming when the drain
/// begins (its head already out, so it cannot say `connection: close`) is
/// not closed behind that response, under the next request its client
/// sends: the next one is answered, with `connection: close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_streaming_a_response_has_its_next_request_answered() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (end, ended) = watch::channel(false);
    let upstream = streaming_upstream(ended).await;
    let server = cohort(&[upstream], None, "").await;
    let proxy = server.proxy_addr();
    let mut client = TcpStream::connect(proxy).await.expect("connect");
    client
        .write_all(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("send the request");
    let head = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );

    let stopping = tokio::spawn(server.shutdown());
    wait_for_refusal(proxy).await;
    end.send_replace(true);
    let mut body = Vec::new();
    while !body.ends_with(b"0\r\n\r\n") {
        let byte = within("the stream's end", client.read_u8())
            .await
            .expect("the stream ends whole");
        body.push(byte);
    }
    client
        .write_all(b"GET /next HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("send the next request");
    let next = read_head(&mut client).await;
    assert!(next.starts_with("HTTP/1.1 200"), "{next}");
    assert_eq!(header(&next, "connection"), Some("close"), "{next}");
    within("the drain to finish", stopping)
        .await
        .expect("shutdown ran to the end");
}

/// An upgrade backend that holds each `101` until the test opens the gate,
/// then echoes what it reads on the upgraded connection. Anything else (the
/// health probes) is answered `200` at once.
struct GatedUpgrade {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    gate: watch::Sender<bool>,
}

impl GatedUpgrade {
    async fn start() -> GatedUpgrade {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let backend = GatedUpgrade {
            addr: listener.local_addr().expect("an address"),
            requests: Arc::default(),
            gate: watch::Sender::new(false),
        };
        let requests = Arc::clone(&backend.requests);
        let gate = backend.gate.subscribe();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let requests = Arc::clone(&requests);
                let mut gate = gate.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        let Ok(byte) = stream.read_u8().await else {
                            return;
                        };
                        head.push(byte);
                    }
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    if !head.contains("upgrade: echo") {
                        // A health probe: answered at once.
                        let ok =
                            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                        let _ = stream.write_all(ok.as_bytes()).await;
                        return;
                    }
                    requests.fetch_add(1, Ordering::SeqCst);
                    let _ = gate.wait_for(|open| *open).await;
                    let answer = "HTTP/1.1 101 Switching Protocols\r\n\
                                  connection: upgrade\r\nupgrade: echo\r\n\r\n";
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        backend
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn open(&self) {
        self.gate.send_replace(true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_answered_during_the_drain_gets_a_working_tunnel() {
    let _one = ONE_AT_A_TIME.lock().await;
    let upstream = GatedUpgrade::start().await;
    let server = cohort(&[upstream.addr], None, "").await;
    let proxy = server.proxy_addr();
    let mut client = TcpStream::connect(proxy).await.expect("connect");
    client
        .write_all(
            b"GET /socket HTTP/1.1\r\nhost: cohort\r\nx-user-id: alice\r\n\
              connection: upgrade\r\nupgrade: echo\r\n\r\n",
        )
        .await
        .expect("write the upgrade request");
    eventually("the upgrade request reaching the upstream", || {
        upstream.requests() == 1
    })
    .await;

    let stopping = tokio::spawn(server.shutdown());
    wait_for_refusal(proxy).await;
    upstream.open();
    let head = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // A `close` beside the upgrade would tell the client the tunnel is not coming.
    let connection = header(&head, "connection").unwrap_or_default();
    assert!(connection.eq_ignore_ascii_case("upgrade"), "{head}");

    client
        .write_all(b"ping")
        .await
        .expect("write on the tunnel");
    let mut echoed = [0u8; 4];
    within("the echo", client.read_exact(&mut echoed))
        .await
        .expect("read on the tunnel");
    assert_eq!(&echoed, b"ping");
    assert!(
        !stopping.is_finished(),
        "shutdown must wait for the open tunnel"
    );
    drop(client);
    within("the drain to finish once the tunnel closes", stopping)
        .await
        .expect("shutdown ran to the end");
}

/// A rollout that a shutdown suspended is not judged through the drain
/// (it carries on at the next start), so no other rollout may start in its
/// place, nor once it is gone; an abort, a rollback, is still made, as
/// `POST /admin/rollback` is: the admin API answers through the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_suspended_by_the_drain_can_be_aborted_but_not_replaced() {
    let _one = ONE_AT_A_TIME.lock().await;
    let slow = SlowBackend::start(STABLE).await;
    let canary = support::Backend::start(support::CANARY).await;
    let toml = support::config(&[slow.addr], Some((&[canary.addr], 0.0)), "");
    let audit = cohort::config::Config::parse(&toml, "test")
        .expect("a valid config")
        .state
        .audit_log;
    let server = support::start_cohort(&toml).await;
    let admin = AdminApi::new(server.admin_addr());
    let plan = json!({"interval": "1s", "stages": [{"weight": 10, "duration": "1h"}]});
    let started = admin
        .call(Method::POST, "/admin/rollout", plan.clone())
        .await;
    assert_eq!(started.status, 200, "{started:?}");

    // A request the upstream holds keeps the drain open.
    let proxy = server.proxy_addr();
    let user = support::key_on(support::CANARY, 10.0, STABLE, "user");
    let in_flight = tokio::spawn(async move {
        Http::new(proxy)
            .get("/slow", &[("x-user-id", user.as_str())])
            .await
    });
    eventually("the request reaching the upstream", || slow.hits() == 1).await;
    let stopping = tokio::spawn(server.shutdown());
    eventually("the rollout's suspension", || {
        support::audit_lines(&audit)
            .iter()
            .any(|line| line["action"] == "rollout_suspend")
    })
    .await;

    let again = admin
        .call(Method::POST, "/admin/rollout", plan.clone())
        .await;
    assert_eq!(again.status, 409, "{again:?}");
    let aborted = admin
        .call(Method::POST, "/admin/rollout/abort", Value::Null)
        .await;
    assert_eq!(aborted.status, 200, "{aborted:?}");
    let state = aborted.json();
    assert_eq!(state["status"], "rolled_back", "{state:#}");
    assert_eq!(state["rollout"]["phase"], "aborted", "{state:#}");
    assert_eq!(state["canary"]["weight"], 0.0, "{state:#}");
    // Nor may one start once none runs: nothing would suspend it.
    let installed = admin
        .call(
            Method::PUT,
            "/admin/canary",
            json!({"name": "v3", "upstreams": [canary.addr.to_string()]}),
        )
        .await;
    assert_eq!(installed.status, 200, "{installed:?}");
    let fresh = admin.call(Method::POST, "/admin/rollout", plan).await;
    assert_eq!(fresh.status, 409, "{fresh:?}");
    assert!(
        fresh.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("shutting down")),
        "{fresh:?}"
    );

    slow.release();
    let reply = within("the in-flight response", in_flight)
        .await
        .expect("the client task ran");
    assert_eq!(reply.status, 200, "{reply:?}");
    within("the drain to finish", stopping)
        .await
        .expect("shutdown ran to the end");
}
