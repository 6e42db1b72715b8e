//! The admin API over HTTP, against a real proxy on loopback.
//!
//! Owns: authentication with a token from `admin.token_file`, every error
//! path of SPEC section 3 (400, 401 with its `Bearer` challenge, 404, 405,
//! 409, 413, 422, each with a body of exactly `{"error": "..."}`), the rollback latch and what clears it,
//! `GET /admin/route` against `place()`, a monotone ramp through the API
//! observed through real requests, admin clients that never finish a
//! request head disconnected at the admin head timeout, and the versions a
//! canary change or a promotion removes leaving `/metrics`. Does not own: `cohort ctl`
//! (`control_ctl`), load (`control_load`), restarts (`control_persistence`),
//! signals (`control_signals`) or open streams (`control_streams`).

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cohort::serve::Server;
use http::Method;
use serde_json::{Value, json};
use support::{
    AdminApi, Backend, CANARY, Http, Reply, STABLE, config, predicted, scratch_dir, start_cohort,
    within,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const TOKEN: &str = "correct-horse-battery";

/// Cohort with its admin token in a file, and an admin client holding it.
async fn with_token(
    stable: &[SocketAddr],
    canary: Option<(&[SocketAddr], f64)>,
) -> (Server, AdminApi) {
    let token_file = scratch_dir().join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write the token file");
    let plain = config(stable, canary, "");
    let admin_section = "[admin]\naddr = \"127.0.0.1:0\"\n";
    assert!(plain.contains(admin_section), "{plain}");
    let text = plain.replacen(
        admin_section,
        &format!("{admin_section}token_file = {token_file:?}\n"),
        1,
    );
    let server = start_cohort(&text).await;
    let admin = AdminApi::with_token(server.admin_addr(), TOKEN);
    (server, admin)
}

/// Asserts `reply` is an error with `status` and a body of exactly
/// `{"error": "<non-empty text>"}`; returns the text.
fn error_text(reply: &Reply, status: u16) -> String {
    assert_eq!(reply.status, status, "{reply:?}");
    let body = reply.json();
    let object = body
        .as_object()
        .unwrap_or_else(|| panic!("error body is not an object: {body}"));
    assert_eq!(
        object.keys().collect::<Vec<_>>(),
        ["error"],
        "error body has other fields: {body}"
    );
    let text = object["error"]
        .as_str()
        .unwrap_or_else(|| panic!("error is not a string: {body}"));
    assert!(!text.is_empty(), "empty error text: {body}");
    text.to_owned()
}

/// Asserts `reply` is a 401 with the error body and the challenge of
/// RFC 6750 section 3, which tells the client the scheme to answer with.
fn unauthorized(reply: &Reply) {
    error_text(reply, 401);
    assert_eq!(
        reply
            .headers
            .get("www-authenticate")
            .map(|v| v.to_str().expect("a printable challenge")),
        Some("Bearer"),
        "{reply:?}"
    );
}

#[tokio::test]
async fn the_admin_api_requires_the_configured_token() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let (server, admin) = with_token(&[stable.addr], Some((&[canary.addr], 10.0))).await;
    let anonymous = AdminApi::new(server.admin_addr());
    let wrong = AdminApi::with_token(server.admin_addr(), "correct-horse-battery-staple");
    let http = Http::new(server.admin_addr());

    for client in [&anonymous, &wrong] {
        unauthorized(&client.raw(Method::GET, "/admin/state", "").await);
        let change = client
            .call(Method::PUT, "/admin/weight", json!({"weight": 90}))
            .await;
        unauthorized(&change);
        unauthorized(
            &client
                .call(Method::POST, "/admin/rollback", json!({}))
                .await,
        );
        // Unknown admin paths are behind the token too: nothing is revealed.
        unauthorized(&client.raw(Method::GET, "/admin/nothing", "").await);
    }
    // The right token in the wrong scheme is no token.
    let basic = http
        .get(
            "/admin/state",
            &[("authorization", &format!("Basic {TOKEN}"))],
        )
        .await;
    unauthorized(&basic);

    // None of the refused calls changed anything.
    let state = admin.state().await;
    assert_eq!(state["generation"], 1, "{state}");
    assert_eq!(state["canary"]["weight"], 10.0, "{state}");
    assert_eq!(state["status"], "steady", "{state}");

    // The scheme's name is case-insensitive; the token is not.
    for (auth, status) in [
        (format!("bearer {TOKEN}"), 200),
        (format!("BEARER {TOKEN}"), 200),
        (format!("Bearer {}", TOKEN.to_uppercase()), 401),
        (format!("Bearer{TOKEN}"), 401),
    ] {
        let reply = http.get("/admin/state", &[("authorization", &auth)]).await;
        assert_eq!(reply.status, status, "{auth}: {reply:?}");
    }

    // Liveness and readiness need no token.
    assert_eq!(http.get("/health", &[]).await.status, 200);
    assert_eq!(http.get("/ready", &[]).await.status, 200);
    // The right token works.
    let changed = admin.set_weight(20.0, false).await;
    assert_eq!(changed["canary"]["weight"], 20.0, "{changed}");
}

/// A page open in the operator's browser cannot drive the admin API: not
/// by a cross-site request, nor, without a token, by pointing its own
/// name at the admin listener (DNS rebinding).
#[tokio::test]
async fn the_admin_api_takes_no_calls_from_web_pages() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let server = start_cohort(&config(&[stable.addr], Some((&[canary.addr], 10.0)), "")).await;
    let http = Http::new(server.admin_addr());
    let rollback = |headers: &'static [(&'static str, &'static str)]| {
        http.send(
            Method::POST,
            "/admin/rollback",
            headers,
            bytes::Bytes::from_static(b"{\"reason\":\"from a page\"}"),
        )
    };

    let cross_site = rollback(&[
        ("origin", "https://evil.example"),
        ("content-type", "text/plain"),
    ])
    .await;
    assert!(error_text(&cross_site, 403).contains("Origin"));
    let fetched = rollback(&[("sec-fetch-site", "cross-site")]).await;
    error_text(&fetched, 403);
    let rebound = http
        .get("/admin/state", &[("host", "evil.example:9901")])
        .await;
    assert!(error_text(&rebound, 403).contains("evil.example"));
    let state = AdminApi::new(server.admin_addr()).state().await;
    assert_eq!(state["status"], "steady", "{state}");

    // Programs, by address or as localhost, and scrapers by any name.
    for host in ["localhost:9901", "127.0.0.1", "[::1]:9901"] {
        let reply = http.get("/admin/state", &[("host", host)]).await;
        assert_eq!(reply.status, 200, "{host}: {reply:?}");
    }
    let scrape = http.get("/metrics", &[("host", "cohort.internal")]).await;
    assert_eq!(scrape.status, 200, "{scrape:?}");
    let rolled_back = rollback(&[("sec-fetch-site", "none")]).await;
    assert_eq!(rolled_back.status, 200, "{rolled_back:?}");
}

#[tokio::test]
async fn bad_bodies_are_400_and_values_out_of_range_422() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let (_server, admin) = with_token(&[stable.addr], Some((&[canary.addr], 10.0))).await;

    for (method, path, body) in [
        (Method::PUT, "/admin/weight", "{\"weight\": "),
        (Method::PUT, "/admin/weight", "weight=10"),
        (Method::PUT, "/admin/weight", "{\"weight\": \"ten\"}"),
        (Method::PUT, "/admin/weight", ""),
        (Method::PUT, "/admin/weight", "{}"),
        (Method::POST, "/admin/rollback", "{\"reason\": 5}"),
        (Method::PUT, "/admin/canary", "{\"name\": \"v3\"}"),
        (Method::PUT, "/admin/canary", "[1, 2]"),
    ] {
        let reply = admin.raw(method.clone(), path, body).await;
        let text = error_text(&reply, 400);
        assert!(
            !text.contains("internal"),
            "{method} {path} {body:?}: {text}"
        );
    }

    // A value of the wrong type is refused by its field's name.
    for (method, path, body, field) in [
        (
            Method::PUT,
            "/admin/weight",
            json!({"weight": "10"}),
            "weight",
        ),
        (
            Method::POST,
            "/admin/rollback",
            json!({"reason": 5}),
            "reason",
        ),
        (
            Method::PUT,
            "/admin/canary",
            json!({"name": "v3", "upstreams": ["127.0.0.1:1", 7]}),
            "upstreams[1]",
        ),
        (
            Method::POST,
            "/admin/signals",
            json!({"version": STABLE, "eval_score": "high"}),
            "eval_score",
        ),
        (
            Method::POST,
            "/admin/rollout/abort",
            json!({"reason": ["a"]}),
            "reason",
        ),
    ] {
        let text = error_text(&admin.call(method.clone(), path, body).await, 400);
        assert!(
            text.contains(&format!("{field}: invalid type")),
            "{path}: {text:?} does not name {field}"
        );
    }
    // An array is not an object, even one with the fields in order; nor is `null`.
    let before = admin.state().await;
    for body in ["[30]", "[30, true]", "null", "30"] {
        let reply = admin.raw(Method::PUT, "/admin/weight", body).await;
        let text = error_text(&reply, 400);
        assert!(text.contains("object"), "{body}: {text}");
    }
    // Nor is a field given twice taken at its last value.
    let reply = admin
        .raw(
            Method::PUT,
            "/admin/weight",
            r#"{"weight": 5, "weight": 100}"#,
        )
        .await;
    assert!(
        error_text(&reply, 400).contains("duplicate field"),
        "{reply:?}"
    );
    // Nor is a second document after the first.
    let reply = admin
        .raw(
            Method::PUT,
            "/admin/weight",
            r#"{"weight": 5} {"weight": 100}"#,
        )
        .await;
    error_text(&reply, 400);
    assert_eq!(admin.state().await["generation"], before["generation"]);

    // A body over the limit is too large, not malformed, and changes nothing.
    let huge = json!({"reason": "x".repeat(70 * 1024)});
    let reply = admin.call(Method::POST, "/admin/rollback", huge).await;
    let text = error_text(&reply, 413);
    assert!(text.contains("64 KiB"), "{text}");
    assert_eq!(admin.state().await["generation"], before["generation"]);

    // An unknown field is refused by name, on every endpoint that takes a body.
    for (method, path, body) in [
        (
            Method::PUT,
            "/admin/weight",
            json!({"weight": 30, "wieght": 40}),
        ),
        (
            Method::POST,
            "/admin/rollback",
            json!({"reason": "x", "urgency": "high"}),
        ),
        (
            Method::PUT,
            "/admin/canary",
            json!({"name": "v3", "upstreams": ["127.0.0.1:1"], "colour": "red"}),
        ),
        (Method::POST, "/admin/promote", json!({"now": true})),
    ] {
        let field = ["wieght", "urgency", "colour", "now"]
            .into_iter()
            .find(|f| body.get(f).is_some())
            .expect("each body has one unknown field");
        let text = error_text(&admin.call(method.clone(), path, body).await, 400);
        assert_eq!(
            text.matches(&format!("`{field}`")).count(),
            1,
            "{path}: {text:?} does not name {field} once"
        );
        assert!(
            text.starts_with("invalid JSON body: unknown field"),
            "{path}: {text:?}"
        );
    }

    for weight in [150.0, 100.01, -1.0, -0.01] {
        let reply = admin
            .call(Method::PUT, "/admin/weight", json!({"weight": weight}))
            .await;
        let text = error_text(&reply, 422);
        assert!(text.contains("weight"), "{weight}: {text}");
    }
    let reply = admin
        .call(
            Method::PUT,
            "/admin/canary",
            json!({"name": "v3", "upstreams": ["127.0.0.1:1"], "weight": 101}),
        )
        .await;
    error_text(&reply, 422);
    let reply = admin
        .call(
            Method::PUT,
            "/admin/canary",
            json!({"name": "v3", "upstreams": []}),
        )
        .await;
    assert!(error_text(&reply, 422).contains("upstreams"));
    // An upstream listed twice would take twice its share, as in the config.
    for (path, body) in [
        (
            "/admin/canary",
            json!({"name": "v3", "upstreams": ["127.0.0.1:1", "127.0.0.1:1"]}),
        ),
        (
            "/admin/shadow",
            json!({"name": "v3", "upstreams": ["127.0.0.1:1", "127.0.0.1:1"], "percent": 5}),
        ),
    ] {
        let text = error_text(&admin.call(Method::PUT, path, body).await, 422);
        assert!(text.contains("upstreams[1]"), "{path}: {text}");
        assert!(text.contains("listed twice"), "{path}: {text}");
    }

    // Nothing that was refused changed the state.
    let state = admin.state().await;
    assert_eq!(state["generation"], 1, "{state}");
    assert_eq!(state["canary"]["name"], CANARY, "{state}");
    assert_eq!(state["canary"]["weight"], 10.0, "{state}");
}

#[tokio::test]
async fn a_rollback_latches_until_forced_or_a_new_canary() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let (server, admin) = with_token(&[stable.addr], Some((&[canary.addr], 50.0))).await;
    let proxy = Http::new(server.proxy_addr());
    // alice is on the canary at 50% under salt v2 (SPEC vector).
    assert_eq!(
        proxy.get("/", &[("x-user-id", "alice")]).await.version(),
        CANARY
    );

    let rolled_back = admin.rollback("error rate").await;
    assert_eq!(rolled_back["status"], "rolled_back", "{rolled_back}");
    assert_eq!(rolled_back["canary"]["weight"], 0.0, "{rolled_back}");
    assert_eq!(rolled_back["last_rollback"]["reason"], "error rate");
    assert_eq!(rolled_back["last_rollback"]["source"], "api");
    let generation = rolled_back["generation"].as_u64().expect("a generation");
    assert_eq!(
        proxy.get("/", &[("x-user-id", "alice")]).await.version(),
        STABLE
    );

    // Idempotent: a second rollback changes nothing.
    let again = admin.rollback("still bad").await;
    assert_eq!(again["generation"], generation, "{again}");
    assert_eq!(again["last_rollback"]["reason"], "error rate", "{again}");

    // The latch: no raise without force, no promote of a rolled-back canary.
    let refused = admin
        .call(Method::PUT, "/admin/weight", json!({"weight": 30}))
        .await;
    assert!(error_text(&refused, 409).contains("force"));
    let refused = admin
        .call(
            Method::PUT,
            "/admin/weight",
            json!({"weight": 30, "force": false}),
        )
        .await;
    error_text(&refused, 409);
    error_text(
        &admin
            .call(Method::POST, "/admin/promote", Value::Null)
            .await,
        409,
    );
    let state = admin.state().await;
    assert_eq!(state["generation"], generation, "{state}");
    assert_eq!(state["status"], "rolled_back", "{state}");

    // Force passes it and clears it.
    let forced = admin.set_weight(60.0, true).await;
    assert_eq!(forced["status"], "steady", "{forced}");
    assert_eq!(forced["canary"]["weight"], 60.0, "{forced}");
    assert_eq!(
        proxy.get("/", &[("x-user-id", "alice")]).await.version(),
        CANARY
    );
    let unforced = admin.set_weight(70.0, false).await;
    assert_eq!(unforced["canary"]["weight"], 70.0, "{unforced}");

    // A new canary clears it too.
    admin.rollback("again").await;
    error_text(
        &admin
            .call(Method::PUT, "/admin/weight", json!({"weight": 5}))
            .await,
        409,
    );
    let installed = admin
        .call(
            Method::PUT,
            "/admin/canary",
            json!({"name": "v3", "upstreams": [canary.addr.to_string()], "weight": 5}),
        )
        .await;
    assert_eq!(installed.status, 200, "{installed:?}");
    let installed = installed.json();
    assert_eq!(installed["status"], "steady", "{installed}");
    assert_eq!(installed["canary"]["name"], "v3", "{installed}");
    assert_eq!(installed["canary"]["weight"], 5.0, "{installed}");
    let raised = admin.set_weight(25.0, false).await;
    assert_eq!(raised["canary"]["weight"], 25.0, "{raised}");
    assert_eq!(raised["status"], "steady", "{raised}");
}

#[tokio::test]
async fn promote_without_a_canary_is_a_conflict() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let (server, admin) = with_token(&[stable.addr], Some((&[canary.addr], 10.0))).await;

    let promoted = admin.promote().await;
    assert_eq!(promoted["stable"]["name"], CANARY, "{promoted}");
    assert_eq!(promoted["canary"], Value::Null, "{promoted}");
    let generation = promoted["generation"].clone();
    // Everyone is on the promoted version now, tagged with its name.
    let proxy = Http::new(server.proxy_addr());
    for key in ["alice", "bob", "user-42"] {
        let reply = proxy.get("/", &[("x-user-id", key)]).await;
        assert_eq!((reply.version(), reply.backend()), (CANARY, CANARY.into()));
    }

    let text = error_text(
        &admin
            .call(Method::POST, "/admin/promote", Value::Null)
            .await,
        409,
    );
    assert!(text.contains("canary"), "{text}");
    let text = error_text(
        &admin
            .call(Method::PUT, "/admin/weight", json!({"weight": 10}))
            .await,
        409,
    );
    assert!(text.contains("canary"), "{text}");
    // Rolling back nothing is not a conflict, and changes nothing.
    let state = admin.rollback("nothing to roll back").await;
    assert_eq!(state["generation"], generation, "{state}");
    assert_eq!(state["status"], "steady", "{state}");
}

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_405() {
    let stable = Backend::start(STABLE).await;
    let (server, admin) = with_token(&[stable.addr], None).await;
    let http = Http::new(server.admin_addr());

    error_text(&admin.raw(Method::GET, "/admin/nothing", "").await, 404);
    error_text(&admin.raw(Method::POST, "/admin/weights", "{}").await, 404);
    error_text(&http.get("/nothing", &[]).await, 404);

    for (method, path) in [
        (Method::GET, "/admin/weight"),
        (Method::POST, "/admin/weight"),
        (Method::DELETE, "/admin/state"),
        (Method::GET, "/admin/rollback"),
        (Method::PUT, "/admin/promote"),
        (Method::POST, "/admin/route"),
    ] {
        let reply = admin.raw(method.clone(), path, "").await;
        let text = error_text(&reply, 405);
        assert!(text.contains(method.as_str()), "{method} {path}: {text}");
    }
    error_text(
        &http
            .send(Method::POST, "/health", &[], bytes::Bytes::new())
            .await,
        405,
    );
    // HEAD is answered as GET, without the body (uptime checkers, `curl -I`).
    for path in ["/health", "/ready", "/metrics"] {
        let reply = http
            .send(Method::HEAD, path, &[], bytes::Bytes::new())
            .await;
        assert_eq!(reply.status, 200, "HEAD {path}: {reply:?}");
        assert!(reply.body.is_empty(), "HEAD {path}: {reply:?}");
    }
}

#[tokio::test]
async fn a_405_names_the_allowed_methods() {
    let stable = Backend::start(STABLE).await;
    let (_server, admin) = with_token(&[stable.addr], None).await;
    let reply = admin.raw(Method::GET, "/admin/weight", "").await;
    assert_eq!(reply.status, 405);
    assert_eq!(
        reply.headers.get("allow").map(|v| v.as_bytes()),
        Some(&b"PUT"[..])
    );
}

/// How long an admin connection that never brings a whole request head may
/// stay open: the admin listener's 10 s head timeout, and as long again for
/// a loaded machine. Longer than [`support::DEADLINE`], which is shorter
/// than the timeout.
const HEAD_TIMEOUT_DEADLINE: Duration = Duration::from_secs(20);

/// Reads `stream` until the other end closes it or resets it, failing the
/// test if that has not happened by [`HEAD_TIMEOUT_DEADLINE`].
async fn assert_disconnected(what: &str, mut stream: TcpStream) {
    let mut read = Vec::new();
    let ended = tokio::time::timeout(HEAD_TIMEOUT_DEADLINE, async {
        let mut chunk = [0u8; 1024];
        while let Ok(n @ 1..) = stream.read(&mut chunk).await {
            read.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "{what} was still connected after {HEAD_TIMEOUT_DEADLINE:?}, having been sent {:?}",
        String::from_utf8_lossy(&read)
    );
}

/// An admin client that connects and never finishes a request head (a
/// port scanner, a script stuck mid-write) would otherwise hold its
/// connection, and a place under the admin listener's connection cap, for
/// as long as it liked. Both kinds are cut at the head timeout, together,
/// while the listener answers everyone else.
#[tokio::test]
async fn an_admin_client_that_never_sends_a_whole_head_is_disconnected() {
    let stable = Backend::start(STABLE).await;
    let (server, admin) = with_token(&[stable.addr], None).await;
    let connect = || async {
        within(
            "an admin connection",
            TcpStream::connect(server.admin_addr()),
        )
        .await
        .expect("connect to the admin listener")
    };
    let silent = connect().await;
    let mut half = connect().await;
    // A request line and a header, but not the blank line that ends the head.
    within(
        "half a head written",
        half.write_all(b"GET /health HTTP/1.1\r\nhost: admin\r\n"),
    )
    .await
    .expect("write half a head");

    // Meanwhile other admin clients are answered, on connections of their own.
    let health = Http::new(server.admin_addr()).get("/health", &[]).await;
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(admin.state().await["generation"], 1);

    tokio::join!(
        assert_disconnected("the client that sent nothing", silent),
        assert_disconnected("the client that sent half a head", half),
    );
    // The listener still takes new connections after cutting those.
    let health = Http::new(server.admin_addr()).get("/health", &[]).await;
    assert_eq!(health.status, 200, "{health:?}");
}

#[tokio::test]
async fn route_explains_a_key_as_place_does() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let (server, admin) = with_token(&[stable.addr], Some((&[canary.addr], 50.0))).await;
    let proxy = Http::new(server.proxy_addr());

    let explain = |key: &str| {
        let admin = admin.clone();
        let path = format!(
            "/admin/route?key={}",
            percent_encoding::utf8_percent_encode(key, percent_encoding::NON_ALPHANUMERIC)
        );
        async move {
            let reply = admin.raw(Method::GET, &path, "").await;
            assert_eq!(reply.status, 200, "{reply:?}");
            reply.json()
        }
    };

    // The SPEC vectors: salt v2 (the canary's name), alice 4727, bob 9112.
    let alice = explain("alice").await;
    assert_eq!(alice["key"], "alice", "{alice}");
    assert_eq!(alice["bucket"], 4727, "{alice}");
    assert_eq!(alice["cohort"], "canary", "{alice}");
    assert_eq!(alice["version"], CANARY, "{alice}");
    assert_eq!(alice["salt"], CANARY, "{alice}");
    assert_eq!(alice["weight"], 50.0, "{alice}");
    let bob = explain("bob").await;
    assert_eq!(
        (&bob["bucket"], &bob["cohort"], &bob["version"]),
        (&json!(9112), &json!("stable"), &json!(STABLE)),
        "{bob}"
    );

    // Any key, any weight: the explanation is place()'s answer and the proxy's choice.
    for weight in [50.0, 12.34, 0.0, 100.0] {
        if weight != 50.0 {
            admin.set_weight(weight, false).await;
        }
        for key in ["user-42", "a b&c=d", "ünïcode", "x"] {
            let expected = predicted(CANARY, weight, key);
            let placement = cohort::routing::place(
                CANARY.as_bytes(),
                cohort::routing::Weight::from_percent(weight).expect("a weight"),
                key.as_bytes(),
            );
            let explained = explain(key).await;
            assert_eq!(explained["key"], key, "{explained}");
            assert_eq!(explained["bucket"], placement.bucket, "{explained}");
            assert_eq!(
                explained["cohort"],
                placement.cohort.as_str(),
                "{explained}"
            );
            assert_eq!(explained["version"], expected, "{explained}");
            assert_eq!(explained["weight"], weight, "{explained}");
            let served = proxy.get("/", &[("x-user-id", key)]).await;
            if key.is_ascii() {
                assert_eq!(served.version(), expected, "{key} at {weight}");
            }
        }
    }

    // A key that is not UTF-8 is placed by its own bytes, as a header's
    // or a query's is.
    let latin1 = admin
        .raw(Method::GET, "/admin/route?key=ren%E9", "")
        .await
        .json();
    let placement = cohort::routing::place(
        CANARY.as_bytes(),
        cohort::routing::Weight::from_percent(100.0).expect("a weight"),
        b"ren\xe9",
    );
    assert_eq!(latin1["bucket"], placement.bucket, "{latin1}");

    let missing = admin.raw(Method::GET, "/admin/route", "").await;
    assert!(error_text(&missing, 400).contains("key"));
    let empty = admin.raw(Method::GET, "/admin/route?key=", "").await;
    error_text(&empty, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monotone_ramp_never_sends_a_canary_user_back() {
    const KEYS: usize = 2_000;
    const WORKERS: usize = 8;
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let (server, admin) = with_token(&[stable.addr], Some((&[canary.addr], 0.0))).await;
    let proxy = Http::new(server.proxy_addr());
    let keys: Arc<Vec<String>> = Arc::new((0..KEYS).map(|i| format!("ramp-{i}")).collect());

    let mut on_canary = vec![false; KEYS];
    let mut previous_share = 0;
    for weight in [5.0, 20.0, 50.0] {
        admin.set_weight(weight, false).await;
        // Every key through the proxy, on a few connections at once.
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..WORKERS {
            let (proxy, keys) = (proxy.clone(), Arc::clone(&keys));
            tasks.spawn(async move {
                let mut seen = Vec::new();
                for i in (worker..KEYS).step_by(WORKERS) {
                    let reply = proxy.get("/", &[("x-user-id", &keys[i])]).await;
                    assert_eq!(reply.status, 200, "{reply:?}");
                    assert_eq!(reply.version(), reply.backend(), "{reply:?}");
                    seen.push((i, reply.version() == CANARY));
                }
                seen
            });
        }
        let mut share = 0;
        while let Some(seen) = tasks.join_next().await {
            for (i, canary_now) in seen.expect("a worker") {
                let key = &keys[i];
                assert_eq!(
                    canary_now,
                    predicted(CANARY, weight, key) == CANARY,
                    "{key} at {weight}%"
                );
                assert!(
                    canary_now || !on_canary[i],
                    "{key} was on the canary and came back to stable at {weight}%"
                );
                on_canary[i] = canary_now;
                share += usize::from(canary_now);
            }
        }
        assert!(share > previous_share, "raising to {weight}% moved nobody");
        previous_share = share;
    }
    // The share is the weight, within sampling error (50% of 2,000: sd ~22).
    assert!((880..=1120).contains(&previous_share), "{previous_share}");
    // A key that was always stable exists too: the test saw both sides.
    assert!(on_canary.iter().any(|c| !c));
}

/// The (version, cohort) pairs that `/metrics` has series of.
async fn versions_in_scrape(server: &Server) -> BTreeSet<(String, String)> {
    let scrape = support::admin(server, Method::GET, "/metrics", "").await;
    assert_eq!(scrape.status, 200, "{scrape:?}");
    let label = |line: &str, name: &str| -> Option<String> {
        let (_, rest) = line.split_once(&format!("{name}=\""))?;
        Some(rest.split_once('"')?.0.to_owned())
    };
    String::from_utf8_lossy(&scrape.body)
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| Some((label(line, "version")?, label(line, "cohort")?)))
        .collect()
}

/// A version that leaves the route table stays in the scrape for a while
/// (`table::DEPARTED_SERIES_KEPT`; the table's unit tests see it go after),
/// so that Prometheus takes what it counted since its last scrape: the
/// last requests of a replaced canary, or of the stable version a
/// promotion sends off. Its own version names, as the recorder is the
/// process's: other tests count under `STABLE` and `CANARY`.
#[tokio::test]
async fn a_departed_version_stays_in_the_scrape_with_its_last_counts() {
    let backend = Backend::start(STABLE).await;
    let server = start_cohort(&config(&[backend.addr], None, "")).await;
    let admin = AdminApi::new(server.admin_addr());
    let pair = |version: &str, cohort: &str| (version.to_owned(), cohort.to_owned());
    let install = |name: &'static str| {
        let body = json!({"name": name, "upstreams": [backend.addr.to_string()], "weight": 100});
        let admin = &admin;
        async move {
            let installed = admin.call(Method::PUT, "/admin/canary", body).await;
            assert_eq!(installed.status, 200, "{installed:?}");
        }
    };
    let requests = |version: &'static str, cohort: &'static str| {
        let server = &server;
        async move {
            let labels = [("version", version), ("cohort", cohort), ("code", "200")];
            support::metric(server, "cohort_requests_total", &labels).await
        }
    };

    install("departing-v3").await;
    // A new canary takes traffic once its first probe passes.
    support::eventually_async("the canary to take traffic", || async {
        Http::new(server.proxy_addr()).get("/", &[]).await.version() == "departing-v3"
    })
    .await;
    let served = requests("departing-v3", "canary").await;
    assert!(served.is_some_and(|n| n >= 1.0), "{served:?}");
    // A request after that count was read, then the canary is replaced.
    let last = Http::new(server.proxy_addr()).get("/", &[]).await;
    assert_eq!(last.version(), "departing-v3", "{last:?}");
    install("leaving-v4").await;
    assert_eq!(
        versions_in_scrape(&server).await,
        [
            pair(STABLE, "stable"),
            pair("departing-v3", "canary"),
            pair("leaving-v4", "canary"),
        ]
        .into(),
    );
    assert_eq!(
        requests("departing-v3", "canary").await,
        served.map(|n| n + 1.0)
    );

    let promoted = admin
        .call(Method::POST, "/admin/promote", json!({"force": true}))
        .await;
    assert_eq!(promoted.status, 200, "{promoted:?}");
    let reply = Http::new(server.proxy_addr()).get("/", &[]).await;
    assert_eq!(reply.version(), "leaving-v4", "{reply:?}");
    assert_eq!(
        versions_in_scrape(&server).await,
        [
            pair(STABLE, "stable"),
            pair("departing-v3", "canary"),
            pair("leaving-v4", "canary"),
            pair("leaving-v4", "stable"),
        ]
        .into(),
    );
    assert_eq!(requests("leaving-v4", "stable").await, Some(1.0));
    server.shutdown().await;
}
