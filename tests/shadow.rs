//! Black-box tests of shadow traffic (SPEC section 11).
//!
//! Owns: checking, over real sockets, that the shadow receives copies of
//! exactly the keys the bucket rule (salted with its name) picks, marked
//! `x-cohort-shadow: 1`; that its answers never reach a client; that a shadow
//! which does not answer leaves the clients' throughput as it was; that POST
//! is not mirrored by default; that a chunked body reaches a shadow that
//! answers in HTTP/1.0; its `cohort="shadow"` metrics; and that
//! `PUT /admin/shadow` installs and removes it durably. Does not own the
//! routing of the real request (`tests/routing.rs`).

mod support;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cohort::routing::{Weight, bucket};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use support::{Backend, Http, Reply, STABLE, admin, eventually, is_health_probe, metric, within};

const ROUTING: &str = "[routing]\nsticky_keys = [\"header:x-user\"]\n";

/// One request as the shadow saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    user: Option<String>,
    shadow_header: Option<String>,
    version_header: Option<String>,
    transfer_encoding: Option<String>,
    /// The whole request body, or `None` if it could not be read whole.
    body: Option<Bytes>,
}

/// The tokens a [`ShadowBackend`] says each answer spent (`x-tokens`).
const SHADOW_TOKENS: u32 = 7;

/// A shadow backend that records what it receives and answers `shadow says
/// no` with a 500 and [`SHADOW_TOKENS`], or holds every request until
/// [`ShadowBackend::release`].
#[derive(Clone)]
struct ShadowBackend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    release: watch::Sender<bool>,
}

impl ShadowBackend {
    async fn start(hold: bool) -> ShadowBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let backend = ShadowBackend {
            addr: listener.local_addr().expect("an address"),
            seen: Arc::default(),
            release: watch::Sender::new(!hold),
        };
        let state = backend.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = state.clone();
                let service = service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(state.answer(req).await) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        backend
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if is_health_probe(&req) {
            return Response::new(Full::new(Bytes::from_static(b"ok")));
        }
        let header = |name: &str| {
            req.headers()
                .get(name)
                .map(|v| v.to_str().expect("printable").to_owned())
        };
        let (method, user, shadow_header, version_header, transfer_encoding) = (
            req.method().clone(),
            header("x-user"),
            header("x-cohort-shadow"),
            header("x-agent-version"),
            header("transfer-encoding"),
        );
        let body = req.into_body().collect().await.ok().map(|b| b.to_bytes());
        let seen = Seen {
            method,
            user,
            shadow_header,
            version_header,
            transfer_encoding,
            body,
        };
        self.seen.lock().expect("not poisoned").push(seen);
        let _ = self.release.subscribe().wait_for(|r| *r).await;
        let mut rsp = Response::new(Full::new(Bytes::from_static(b"shadow says no")));
        *rsp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        rsp.headers_mut()
            .insert("x-backend", "shadow".parse().expect("a header value"));
        rsp.headers_mut().insert("x-tokens", SHADOW_TOKENS.into());
        rsp
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("not poisoned").clone()
    }

    fn users(&self) -> BTreeSet<String> {
        self.seen().into_iter().filter_map(|s| s.user).collect()
    }

    fn release(&self) {
        self.release.send_replace(true);
    }
}

fn shadow_body(name: &str, upstream: SocketAddr, percent: f64) -> String {
    format!(r#"{{"name": "{name}", "upstreams": ["{upstream}"], "percent": {percent}}}"#)
}

/// Checks that a client reply came from the stable echo backend, untouched by the shadow.
fn assert_real(reply: &Reply, stable: &Backend) {
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.version(), STABLE);
    assert_eq!(reply.backend(), stable.name);
    assert!(
        reply
            .headers
            .get("x-backend")
            .is_some_and(|b| b == &stable.name)
    );
}

#[tokio::test]
async fn the_shadow_gets_exactly_the_keys_the_bucket_rule_picks() {
    let stable = Backend::start("real").await;
    let shadow = ShadowBackend::start(false).await;
    let extra = format!(
        "{ROUTING}\n[shadow]\nname = \"sh-keys\"\nupstreams = [\"{}\"]\npercent = 30\n",
        shadow.addr
    );
    let server = support::cohort(&[stable.addr], None, &extra).await;
    let client = Http::new(server.proxy_addr());

    let keys: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
    let weight = Weight::from_percent(30.0).expect("a weight");
    let expected: BTreeSet<String> = keys
        .iter()
        .filter(|k| weight.covers(bucket(b"sh-keys", k.as_bytes())))
        .cloned()
        .collect();
    assert!((60..=120).contains(&expected.len()), "{}", expected.len());

    for key in &keys {
        // The shadow answers 500 with its own body; the client never sees it.
        let reply = client.get("/", &[("x-user", key)]).await;
        assert_real(&reply, &stable);
    }
    eventually("the shadow has seen every picked key", || {
        shadow.users().len() >= expected.len()
    })
    .await;
    assert_eq!(shadow.users(), expected);
    for seen in shadow.seen() {
        assert_eq!(seen.method, Method::GET);
        assert_eq!(seen.shadow_header.as_deref(), Some("1"), "{seen:?}");
        assert_eq!(seen.version_header.as_deref(), Some("sh-keys"), "{seen:?}");
        // A copy of a GET without a body has none either, as the real one.
        assert_eq!(seen.transfer_encoding, None, "{seen:?}");
        assert_eq!(seen.body.as_deref(), Some(&b""[..]), "{seen:?}");
    }

    // Its answers are counted under cohort="shadow", apart from stable's.
    let count = expected.len() as f64;
    support::eventually_async("the shadow's metrics count every copy", || async {
        metric(
            &server,
            "cohort_requests_total",
            &[
                ("version", "sh-keys"),
                ("cohort", "shadow"),
                ("code", "500"),
            ],
        )
        .await
            == Some(count)
    })
    .await;
    assert!(
        metric(
            &server,
            "cohort_request_duration_seconds_count",
            &[("version", "sh-keys"), ("cohort", "shadow")],
        )
        .await
        .is_some_and(|n| n >= count)
    );

    // POST is not among the default methods: never mirrored.
    let picked = expected.iter().next().expect("a picked key").clone();
    for _ in 0..5 {
        let reply = client
            .send(Method::POST, "/", &[("x-user", &picked)], Bytes::new())
            .await;
        assert_real(&reply, &stable);
    }
    // A GET afterwards is the marker that the copies before it had their chance.
    let marker = expected.iter().nth(1).expect("a second picked key").clone();
    let before = shadow.seen().len();
    client.get("/", &[("x-user", &marker)]).await;
    eventually("the marker copy arrives", || shadow.seen().len() > before).await;
    assert!(
        shadow.seen().iter().all(|s| s.method == Method::GET),
        "{:?}",
        shadow.seen()
    );
    server.shutdown().await;
}

/// With `routing.fallback = "stable"` a request with no key has no bucket:
/// it is mirrored at random at the shadow's share, so a shadow at 100% sees
/// every one, and one at 0% none.
#[tokio::test]
async fn requests_with_no_key_are_mirrored_at_the_shadows_share() {
    let stable = Backend::start("real").await;
    let shadow = ShadowBackend::start(false).await;
    let extra = format!(
        "[routing]\nsticky_keys = [\"header:x-user\"]\nfallback = \"stable\"\n\n\
         [shadow]\nname = \"sh-keyless\"\nupstreams = [\"{}\"]\npercent = 100\n",
        shadow.addr
    );
    let server = support::cohort(&[stable.addr], None, &extra).await;
    let client = Http::new(server.proxy_addr());
    for _ in 0..20 {
        assert_real(&client.get("/", &[]).await, &stable);
    }
    eventually("every keyless request mirrored", || {
        shadow.seen().len() == 20
    })
    .await;

    let put = |percent| shadow_body("sh-keyless", shadow.addr, percent);
    let off = admin(&server, Method::PUT, "/admin/shadow", &put(0.0)).await;
    assert_eq!(off.status, StatusCode::OK, "{off:?}");
    for _ in 0..20 {
        assert_real(&client.get("/", &[]).await, &stable);
    }
    // A keyed request at 100% again is the marker that those before it
    // had their chance to be mirrored.
    let full = admin(&server, Method::PUT, "/admin/shadow", &put(100.0)).await;
    assert_eq!(full.status, StatusCode::OK, "{full:?}");
    client.get("/", &[("x-user", "marker")]).await;
    eventually("the marker copy arrives", || shadow.seen().len() > 20).await;
    assert_eq!(shadow.seen().len(), 21, "{:?}", shadow.seen());
    server.shutdown().await;
}

/// A copy with no healthy shadow upstream to go to is counted as the real
/// path would count it: a 503 of the shadow, in both histograms alike.
#[tokio::test]
async fn a_copy_with_no_healthy_shadow_upstream_counts_as_a_503_in_every_series() {
    let stable = Backend::start("real").await;
    let dead = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dead_addr = dead.local_addr().expect("an address");
    drop(dead);
    let extra = format!(
        "{ROUTING}\n[health]\ninterval = \"100ms\"\nunhealthy_threshold = 1\n\n\
         [shadow]\nname = \"sh-dead\"\nupstreams = [\"{dead_addr}\"]\npercent = 100\n"
    );
    let server = support::cohort(&[stable.addr], None, &extra).await;
    let healthy = [
        ("version", "sh-dead"),
        ("upstream", &*dead_addr.to_string()),
    ];
    support::eventually_async("the shadow's upstream marked down", || async {
        metric(&server, "cohort_upstream_healthy", &healthy).await == Some(0.0)
    })
    .await;
    let client = Http::new(server.proxy_addr());
    for i in 0..10 {
        assert_real(
            &client.get("/", &[("x-user", &format!("u{i}"))]).await,
            &stable,
        );
    }
    let shadow = [("version", "sh-dead"), ("cohort", "shadow")];
    let unavailable = [
        ("version", "sh-dead"),
        ("cohort", "shadow"),
        ("code", "503"),
    ];
    assert_eq!(
        metric(&server, "cohort_requests_total", &unavailable).await,
        Some(10.0)
    );
    for histogram in [
        "cohort_request_duration_seconds_count",
        "cohort_response_duration_seconds_count",
    ] {
        assert_eq!(
            metric(&server, histogram, &shadow).await,
            Some(10.0),
            "{histogram}"
        );
    }
    server.shutdown().await;
}

/// A shadow that never answers: no client's answer waits for it, even once
/// it holds every copy it may at once; the copies past that are dropped and
/// counted.
#[tokio::test]
async fn a_shadow_that_never_answers_does_not_slow_the_clients() {
    let stable = Backend::start("fast").await;
    // Holds every copy until the end of the test.
    let shadow = ShadowBackend::start(true).await;
    let server = support::cohort(&[stable.addr], None, ROUTING).await;
    let client = Http::new(server.proxy_addr());
    let installed = admin(
        &server,
        Method::PUT,
        "/admin/shadow",
        &shadow_body("sh-slow", shadow.addr, 100.0),
    )
    .await;
    assert_eq!(installed.status, StatusCode::OK, "{installed:?}");
    let dropped_before = metric(
        &server,
        "cohort_shadow_dropped_total",
        &[("reason", "queue_full")],
    )
    .await
    .expect("the drop counter is registered");

    let past_the_limit = 20;
    let requests = cohort::shadow::MAX_IN_FLIGHT + past_the_limit;
    for n in 0..requests {
        // An answer that waited for its copy's would never come.
        let reply = within(
            &format!("answer {n} while the shadow holds its copies"),
            client.get("/", &[("x-user", &format!("t-{n}"))]),
        )
        .await;
        assert_real(&reply, &stable);
    }

    // Copies were really sent (and are held), and the rest dropped and counted.
    eventually("the shadow to hold as many copies as it may", || {
        shadow.seen().len() == cohort::shadow::MAX_IN_FLIGHT
    })
    .await;
    support::eventually_async("the copies past the limit counted as dropped", || async {
        let dropped = metric(
            &server,
            "cohort_shadow_dropped_total",
            &[("reason", "queue_full")],
        )
        .await
        .unwrap_or_default();
        dropped - dropped_before >= past_the_limit as f64
    })
    .await;
    shadow.release();
    server.shutdown().await;
}

#[tokio::test]
async fn put_admin_shadow_installs_and_removes_it_across_restarts() {
    let stable = Backend::start("kept").await;
    let shadow = ShadowBackend::start(false).await;
    let toml = support::config(&[stable.addr], None, ROUTING);
    let server = support::start_cohort(&toml).await;
    assert!(admin(&server, Method::GET, "/admin/state", "").await.json()["shadow"].is_null());

    // Refusals: unknown field, out-of-range percent, a taken name, no body.
    let refused = [
        (
            r#"{"name": "x", "upstreams": [], "percent": 1, "extra": 1}"#,
            400,
        ),
        (&shadow_body("sh-api", shadow.addr, 101.0) as &str, 422),
        (&shadow_body(STABLE, shadow.addr, 10.0), 409),
        (r#"{"name": "sh-api", "upstreams": [], "percent": 10}"#, 422),
        ("", 400),
    ];
    for (body, status) in refused {
        let reply = admin(&server, Method::PUT, "/admin/shadow", body).await;
        assert_eq!(reply.status.as_u16(), status, "{body}: {reply:?}");
        assert!(reply.json()["error"].is_string());
    }

    let reply = admin(
        &server,
        Method::PUT,
        "/admin/shadow",
        &shadow_body("sh-api", shadow.addr, 100.0),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.json()["shadow"]["name"], "sh-api");
    assert_eq!(reply.json()["shadow"]["percent"], 100.0);
    server.shutdown().await;

    // It survives a restart, and mirrors.
    let server = support::start_cohort(&toml).await;
    let state = admin(&server, Method::GET, "/admin/state", "").await.json();
    assert_eq!(state["shadow"]["name"], "sh-api");
    assert_eq!(state["shadow"]["upstreams"][0], shadow.addr.to_string());
    assert_eq!(state["shadow"]["health"][0]["healthy"], true);
    let client = Http::new(server.proxy_addr());
    assert_real(
        &client.get("/", &[("x-user", "after-restart")]).await,
        &stable,
    );
    eventually("the restored shadow gets its copy", || {
        shadow.users().contains("after-restart")
    })
    .await;

    // A changed share applies at once; null removes it, for good.
    let reply = admin(
        &server,
        Method::PUT,
        "/admin/shadow",
        &shadow_body("sh-api", shadow.addr, 12.5),
    )
    .await;
    assert_eq!(reply.json()["shadow"]["percent"], 12.5);
    let reply = admin(&server, Method::PUT, "/admin/shadow", "null").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert!(reply.json()["shadow"].is_null());
    server.shutdown().await;
    let server = support::start_cohort(&toml).await;
    assert!(admin(&server, Method::GET, "/admin/state", "").await.json()["shadow"].is_null());
    server.shutdown().await;
}

/// A `[shadow]` section the operator edits is the newer intent, on a
/// reload as on a restart, as an edited `[versions]` is; until it changes,
/// the shadow set through the admin API stays.
#[tokio::test]
async fn an_edited_shadow_section_replaces_the_live_shadow() {
    let stable = Backend::start("kept").await;
    let shadow = ShadowBackend::start(false).await;
    let dir = support::scratch_dir();
    let toml = |section: &str| {
        let extra = format!("{ROUTING}\n{section}");
        support::with_state_in(&support::config(&[stable.addr], None, &extra), &dir)
    };
    let section = |percent: f64| {
        format!(
            "[shadow]\nname = \"sh-config\"\nupstreams = [\"{}\"]\npercent = {percent}\n",
            shadow.addr
        )
    };
    let shadow_of = |state: serde_json::Value| {
        let shadow = &state["shadow"];
        (
            shadow["name"].as_str().map(str::to_owned),
            shadow["percent"].as_f64(),
        )
    };
    let live_shadow = |server: &cohort::serve::Server| {
        shadow_of(serde_json::to_value(server.control().state()).expect("a state"))
    };

    let first = toml(&section(100.0));
    let server = support::start_cohort(&first).await;
    assert_eq!(
        live_shadow(&server),
        (Some("sh-config".into()), Some(100.0))
    );
    let reply = admin(
        &server,
        Method::PUT,
        "/admin/shadow",
        &shadow_body("sh-api", shadow.addr, 50.0),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");

    // The section as it was: the admin API's shadow stays, on a reload,
    // on a re-seed by an edited [versions], and across a restart.
    support::reload(&server, &first);
    assert_eq!(live_shadow(&server), (Some("sh-api".into()), Some(50.0)));
    let more = Backend::start("more").await;
    let versions_edited = support::with_state_in(
        &support::config(
            &[stable.addr, more.addr],
            None,
            &format!("{ROUTING}\n{}", section(100.0)),
        ),
        &dir,
    );
    support::reload(&server, &versions_edited);
    let state = serde_json::to_value(server.control().state()).expect("a state");
    assert_eq!(
        state["stable"]["upstreams"].as_array().map(Vec::len),
        Some(2)
    );
    assert_eq!(live_shadow(&server), (Some("sh-api".into()), Some(50.0)));
    server.shutdown().await;
    let server = support::start_cohort(&first).await;
    assert_eq!(live_shadow(&server), (Some("sh-api".into()), Some(50.0)));

    // An edited section replaces it on a reload, durably.
    let second = toml(&section(25.0));
    support::reload(&server, &second);
    assert_eq!(live_shadow(&server), (Some("sh-config".into()), Some(25.0)));
    let client = Http::new(server.proxy_addr());
    let mirrored = (0..400)
        .map(|i| format!("edited-{i}"))
        .find(|user| {
            Weight::from_percent(25.0)
                .expect("a weight")
                .covers(bucket(b"sh-config", user.as_bytes()))
        })
        .expect("a key in the edited share");
    assert_real(&client.get("/", &[("x-user", &mirrored)]).await, &stable);
    eventually("the edited shadow gets its copy", || {
        shadow.users().contains(&mirrored)
    })
    .await;
    let reply = admin(&server, Method::PUT, "/admin/shadow", "null").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    server.shutdown().await;

    // Unedited since: the removal stays. Edited while stopped: the start
    // takes it, and the audit log says why.
    let server = support::start_cohort(&second).await;
    assert_eq!(live_shadow(&server), (None, None));
    server.shutdown().await;
    let third = toml(&section(40.0));
    let server = support::start_cohort(&third).await;
    assert_eq!(live_shadow(&server), (Some("sh-config".into()), Some(40.0)));
    let audit = support::audit_lines(&dir.join("audit.jsonl"));
    let last = audit.last().expect("audit lines");
    assert_eq!(
        (&last["action"], &last["source"]),
        (&serde_json::json!("shadow"), &serde_json::json!("start")),
        "{last}"
    );
    assert!(
        last["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("[shadow]"),
        "{last}"
    );

    // A section removed is a shadow removed.
    support::reload(&server, &toml(""));
    assert_eq!(live_shadow(&server), (None, None));
    server.shutdown().await;
}

#[tokio::test]
async fn large_bodies_are_mirrored_whole_and_the_shadows_tokens_are_counted() {
    let stable = Backend::start("real-large").await;
    let shadow = ShadowBackend::start(false).await;
    let extra = format!(
        "{ROUTING}\n[metrics]\ntokens_header = \"x-tokens\"\n\n\
         [shadow]\nname = \"sh-large\"\nupstreams = [\"{}\"]\npercent = 100\n\
         methods = [\"POST\"]\nmax_body = \"4MiB\"\n",
        shadow.addr
    );
    let server = support::cohort(&[stable.addr], None, &extra).await;
    let client = Http::new(server.proxy_addr());

    // Bodies of a MiB each, sent one after another: a copy keeps up with a
    // real upstream as fast as its shadow, even while its connection opens.
    const COPIES: usize = 10;
    let body: Bytes = (0..1_048_576u32)
        .map(|i| (i % 253) as u8)
        .collect::<Vec<_>>()
        .into();
    for _ in 0..COPIES {
        let reply = client
            .send(Method::POST, "/", &[("x-user", "uploader")], body.clone())
            .await;
        assert_real(&reply, &stable);
    }
    eventually("every copy at the shadow", || shadow.seen().len() == COPIES).await;
    for seen in shadow.seen() {
        assert!(
            seen.body.as_ref() == Some(&body),
            "a copy arrived cut: {:?} bytes",
            seen.body.map(|b| b.len())
        );
    }
    let labels = [("version", "sh-large"), ("cohort", "shadow")];
    let expected = f64::from(SHADOW_TOKENS) * COPIES as f64;
    support::eventually_async("the shadow's tokens counted", || async {
        metric(&server, "cohort_tokens_total", &labels).await == Some(expected)
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn request_bodies_are_mirrored_while_they_stream_up_to_max_body() {
    let stable = Backend::start("real-bodies").await;
    let shadow = ShadowBackend::start(false).await;
    let extra = format!(
        "{ROUTING}\n[shadow]\nname = \"sh-bodies\"\nupstreams = [\"{}\"]\npercent = 100\n\
         methods = [\"POST\"]\nmax_body = \"64KiB\"\n",
        shadow.addr
    );
    let server = support::cohort(&[stable.addr], None, &extra).await;
    let client = Http::new(server.proxy_addr());

    // A body under the limit reaches both the real upstream and the shadow, whole.
    let small: Bytes = (0..40_000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    let reply = client
        .send(Method::POST, "/", &[("x-user", "poster")], small.clone())
        .await;
    assert_real(&reply, &stable);
    assert_eq!(reply.json()["body_len"], small.len());
    eventually("the shadow gets the mirrored POST", || {
        !shadow.seen().is_empty()
    })
    .await;
    let seen = shadow.seen().remove(0);
    assert_eq!(seen.method, Method::POST);
    assert_eq!(
        seen.body.as_deref(),
        Some(&small[..]),
        "the copy's body differs"
    );

    // A body over the limit is not mirrored; the real request is untouched.
    let large: Bytes = vec![7u8; 100_000].into();
    let reply = client
        .send(Method::POST, "/", &[("x-user", "poster")], large.clone())
        .await;
    assert_real(&reply, &stable);
    assert_eq!(reply.json()["body_len"], large.len());
    support::eventually_async("the oversized copy is counted as too_large", || async {
        metric(
            &server,
            "cohort_shadow_dropped_total",
            &[("reason", "too_large")],
        )
        .await
        .is_some_and(|n| n >= 1.0)
    })
    .await;
    // A GET is not among these methods, so a further POST is the marker.
    client
        .send(
            Method::POST,
            "/",
            &[("x-user", "poster")],
            Bytes::from_static(b"marker"),
        )
        .await;
    eventually("the marker copy arrives", || shadow.seen().len() >= 2).await;
    let bodies: Vec<_> = shadow.seen().into_iter().map(|s| s.body).collect();
    assert_eq!(
        bodies,
        [Some(small), Some(Bytes::from_static(b"marker"))],
        "only bodies within max_body are mirrored"
    );

    // A chunked body that turns out too large while it streams: its copy is
    // abandoned, counted once as too_large, and never as the shadow's failure.
    let chunk = "a".repeat(40_000);
    let request = format!(
        "POST / HTTP/1.1\r\nhost: x\r\nx-user: poster\r\ntransfer-encoding: chunked\r\n\r\n\
         {len:x}\r\n{chunk}\r\n{len:x}\r\n{chunk}\r\n0\r\n\r\n",
        len = chunk.len()
    );
    let reply = support::raw_exchange(server.proxy_addr(), request.as_bytes()).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    support::eventually_async("the chunked copy is counted as too_large", || async {
        metric(
            &server,
            "cohort_shadow_dropped_total",
            &[("reason", "too_large")],
        )
        .await
        .is_some_and(|n| n >= 2.0)
    })
    .await;
    let shadow_labels = [("version", "sh-bodies"), ("cohort", "shadow")];
    for code in ["502", "504"] {
        let labels = [shadow_labels[0], shadow_labels[1], ("code", code)];
        assert_eq!(
            metric(&server, "cohort_requests_total", &labels).await,
            None,
            "an abandoned copy counted as the shadow's {code}"
        );
    }
    let errors = metric(&server, "cohort_upstream_errors_total", &shadow_labels).await;
    assert!(errors.is_none_or(|n| n == 0.0), "{errors:?}");
    server.shutdown().await;
}

/// A reloaded `[shadow]` named as a live version (here a canary installed
/// through the admin API) refuses the whole reload: the salt edited in the
/// same config is not applied either.
#[tokio::test]
async fn a_reloaded_shadow_named_as_a_live_version_refuses_the_whole_reload() {
    let stable = Backend::start("sh-clash-stable").await;
    let canary = Backend::start("sh-clash-canary").await;
    let toml = support::config(&[stable.addr], None, "[routing]\nsalt = \"before\"\n");
    let server = support::start_cohort(&toml).await;
    let body = format!(
        r#"{{"name": "sh-clash-canary", "upstreams": ["{}"], "weight": 10}}"#,
        canary.addr
    );
    let reply = admin(&server, Method::PUT, "/admin/canary", &body).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");

    let edited = format!(
        "{}\n[shadow]\nname = \"sh-clash-canary\"\nupstreams = [\"{}\"]\npercent = 100\n",
        toml.replace("salt = \"before\"", "salt = \"after\""),
        stable.addr
    );
    let config = cohort::config::Config::parse(&edited, "test").expect("a valid config");
    let refused = server
        .control()
        .reload(&config)
        .expect_err("a refused reload");
    assert!(refused.to_string().contains("shadow.name"), "{refused}");
    assert_eq!(server.control().explain(b"k").salt, "before");
    assert!(server.control().state().shadow.is_none());
    server.shutdown().await;
}

/// The shadow's `max_body` 64 KiB, every POST mirrored.
fn mirroring_posts(shadow: &ShadowBackend, name: &str) -> String {
    format!(
        "{ROUTING}\n[shadow]\nname = \"{name}\"\nupstreams = [\"{}\"]\npercent = 100\n\
         methods = [\"POST\"]\nmax_body = \"64KiB\"\n",
        shadow.addr
    )
}

/// Waits for the shadow's next copy after the `before` it had seen, and
/// returns its body as the shadow read it.
async fn next_copy(shadow: &ShadowBackend, before: usize) -> Option<Bytes> {
    eventually("the copy at the shadow", || shadow.seen().len() > before).await;
    shadow.seen()[before].body.clone()
}

/// Trailers are the body's last frame: the copy ends whole without them.
#[tokio::test]
async fn a_body_that_ends_with_trailers_is_mirrored_whole() {
    let stable = Backend::start(STABLE).await;
    let shadow = ShadowBackend::start(false).await;
    let extra = mirroring_posts(&shadow, "sh-trailers");
    let server = support::cohort(&[stable.addr], None, &extra).await;
    for (what, request) in [
        (
            "without trailers",
            "POST / HTTP/1.1\r\nhost: x\r\nx-user: poster\r\ntransfer-encoding: chunked\r\n\r\n\
             5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "with trailers",
            "POST / HTTP/1.1\r\nhost: x\r\nx-user: poster\r\ntransfer-encoding: chunked\r\n\r\n\
             5\r\nhello\r\n0\r\nx-checksum: 1\r\n\r\n",
        ),
    ] {
        let before = shadow.seen().len();
        let reply = support::raw_exchange(server.proxy_addr(), request.as_bytes()).await;
        assert_eq!(reply.status, 200, "{what}: {reply:?}");
        let copy = next_copy(&shadow, before).await;
        assert_eq!(copy.as_deref(), Some(&b"hello"[..]), "{what}");
    }
    server.shutdown().await;
}

/// A chunked body is mirrored whole to a shadow that answers in HTTP/1.0
/// with keep-alive, copy after copy: the proxy does not send a copy on a
/// connection hyper would speak HTTP/1.0 on, where it has no framing.
#[tokio::test]
async fn chunked_bodies_reach_a_shadow_that_answers_in_http_1_0() {
    let stable = Backend::start("real-h10").await;
    let shadow = support::Http10Backend::start().await;
    let extra = format!(
        "{ROUTING}\n[health]\ninterval = \"1h\"\n\n\
         [shadow]\nname = \"sh-h10\"\nupstreams = [\"{}\"]\npercent = 100\nmethods = [\"POST\"]\n",
        shadow.addr
    );
    let server = support::cohort(&[stable.addr], None, &extra).await;
    let upload = "POST /upload HTTP/1.1\r\nhost: x\r\nx-user: u\r\n\
                  transfer-encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n";
    for copies in 1..=3 {
        let reply = support::raw_exchange(server.proxy_addr(), upload.as_bytes()).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        eventually("the copy at the shadow", || {
            shadow.received().matches("POST /upload").count() == copies
        })
        .await;
    }
    let received = shadow.received();
    assert_eq!(
        received.matches("hello world").count(),
        3,
        "the shadow got: {received}"
    );
    server.shutdown().await;
}
