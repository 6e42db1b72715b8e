//! The proxy's own error responses when an upstream fails.
//!
//! Owns: 502 for an upstream that refuses connections or answers with
//! something that is not HTTP, 504 for one that does not answer in
//! `upstream.response_timeout`, the exact JSON body of SPEC section 2, the
//! version tag on errors, that one version's failure does not touch the
//! other's traffic, and that a refused connection moves on to the version's
//! next upstream. Does not own: malformed client requests
//! (`tests/smuggling.rs`).

mod support;

use support::{
    Backend, CANARY, Http, STABLE, SlowBackend, cohort, dead_addr, key_on, metric, within,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

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

#[tokio::test]
async fn a_dead_canary_gives_502_to_its_cohort_only() {
    let stable = Backend::start(STABLE).await;
    let dead = dead_addr().await;
    let server = cohort(&[stable.addr], Some((&[dead], 50.0)), "").await;
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
async fn an_upstream_that_does_not_speak_http_gives_502() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = [0u8; 1024];
                let _ = stream.read(&mut head).await;
                let _ = stream.write_all(b"this is not http\r\n\r\n").await;
                let _ = stream.shutdown().await;
            });
        }
    });
    let server = cohort(&[addr], None, "").await;
    let reply = within(
        "the 502",
        Http::new(server.proxy_addr()).get("/", &[("x-user-id", "bob")]),
    )
    .await;
    assert_eq!(reply.status, 502, "{reply:?}");
    assert_error_body(&reply, "protocol", STABLE);
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
