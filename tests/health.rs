//! Black-box tests of upstream health (SPEC section 10).
//!
//! Owns: checking, over real sockets, that active probes take a dead
//! upstream out of rotation and let it back in, that a canary installed at
//! run time is gated until its first good probe (its cohort served by
//! stable in either `canary_unavailable` mode, and no promotion without
//! `force`), as is one from the config on a first start or restored from
//! the state file on a restart (probed before the first request, so a live
//! one keeps its users), that a canary which was open and then fails its
//! probes answers 503 with `canary_unavailable = "error"`, that an ejected
//! canary hands its cohort to stable (or answers 503 in that mode), and that
//! health shows in `cohort_upstream_healthy` (for the versions in the
//! table only), `GET /admin/state` and the reply to a change; what probes
//! learnt survives a reload that changes a version's upstreams and a
//! promote; a reloaded `[health]` applies to the running checks, a shorter
//! interval at once. Does not
//! own the routing rule or the data path's other behaviour.
//!
//! The backends here can be really stopped (listener and open connections
//! closed) and started again on the same port, which the shared support
//! backends cannot.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cohort::serve::Server;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::{JoinHandle, JoinSet};

use support::{
    CANARY, Http, STABLE, TunedBackend, Tuning, admin, eventually, eventually_async,
    is_health_probe, key_on, metric,
};

/// Probes every 100 ms; two failures mark an upstream down, two successes up.
/// Passive ejection is pushed out of the way so the active checks are what is tested.
const FAST_HEALTH: &str = "[health]\ninterval = \"100ms\"\ntimeout = \"500ms\"\n\
    unhealthy_threshold = 2\nhealthy_threshold = 2\neject_after_errors = 1000\n";

/// An HTTP backend that answers with its name and can be stopped and started
/// again on the same port.
struct Backend {
    name: String,
    addr: SocketAddr,
    /// Requests received, health probes not counted.
    hits: Arc<AtomicUsize>,
    /// The paths health probes asked for, in order.
    probes: Arc<Mutex<Vec<String>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Backend {
    async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let backend = Backend {
            name: name.to_owned(),
            addr: listener.local_addr().expect("a bound address"),
            hits: Arc::default(),
            probes: Arc::default(),
            task: Mutex::new(None),
        };
        backend.serve(listener);
        backend
    }

    fn serve(&self, listener: TcpListener) {
        let (name, hits, probes) = (
            self.name.clone(),
            Arc::clone(&self.hits),
            Arc::clone(&self.probes),
        );
        let task = tokio::spawn(async move {
            // Dropped with this task when it is aborted: every connection closes too.
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (name, hits, probes) = (name.clone(), Arc::clone(&hits), Arc::clone(&probes));
                let service = service_fn(move |req: Request<Incoming>| {
                    if is_health_probe(&req) {
                        let path = req.uri().path().to_owned();
                        probes.lock().expect("not poisoned").push(path);
                    } else {
                        hits.fetch_add(1, Ordering::SeqCst);
                    }
                    let mut rsp = Response::new(Full::new(Bytes::from(name.clone())));
                    rsp.headers_mut()
                        .insert("x-backend", name.parse().expect("a header value"));
                    async move { Ok::<_, Infallible>(rsp) }
                });
                connections.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        *self.task.lock().expect("not poisoned") = Some(task);
    }

    /// Closes the listener and every open connection.
    async fn stop(&self) {
        let task = self.task.lock().expect("not poisoned").take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens on the same port again.
    async fn restart(&self) {
        let socket = TcpSocket::new_v4().expect("a socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket.bind(self.addr).expect("the same port again");
        self.serve(socket.listen(128).expect("listen"));
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn probe_count(&self) -> usize {
        self.probes.lock().expect("not poisoned").len()
    }

    /// The path of the last health probe.
    fn last_probe(&self) -> Option<String> {
        self.probes.lock().expect("not poisoned").last().cloned()
    }
}

async fn healthy_gauge(server: &Server, version: &str, upstream: SocketAddr) -> Option<f64> {
    metric(
        server,
        "cohort_upstream_healthy",
        &[("version", version), ("upstream", &upstream.to_string())],
    )
    .await
}

/// `health` of `upstream` under the `field` version object of `GET /admin/state`.
async fn state_health(server: &Server, field: &str, upstream: SocketAddr) -> Option<bool> {
    let state = admin(server, Method::GET, "/admin/state", "").await.json();
    state[field]["health"]
        .as_array()?
        .iter()
        .find(|h| h["upstream"] == upstream.to_string())?["healthy"]
        .as_bool()
}

#[tokio::test]
async fn a_dead_upstream_leaves_rotation_and_rejoins_when_it_is_back() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let server = support::cohort(&[a.addr, b.addr], None, FAST_HEALTH).await;
    let client = Http::new(server.proxy_addr());

    // Both serve while both are up.
    eventually_async("both upstreams take requests", || async {
        client.get("/", &[]).await;
        a.hits() > 0 && b.hits() > 0
    })
    .await;
    assert_eq!(healthy_gauge(&server, STABLE, a.addr).await, Some(1.0));
    assert_eq!(state_health(&server, "stable", a.addr).await, Some(true));

    a.stop().await;
    eventually_async("the dead upstream is marked unhealthy", || async {
        healthy_gauge(&server, STABLE, a.addr).await == Some(0.0)
    })
    .await;
    assert_eq!(state_health(&server, "stable", a.addr).await, Some(false));
    assert_eq!(state_health(&server, "stable", b.addr).await, Some(true));
    assert_eq!(healthy_gauge(&server, STABLE, b.addr).await, Some(1.0));

    // After the threshold every request succeeds, on the other upstream.
    let before = b.hits();
    for _ in 0..20 {
        let reply = client.get("/", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.headers["x-backend"], "b");
    }
    assert_eq!(b.hits(), before + 20);

    a.restart().await;
    eventually_async("the upstream is healthy again", || async {
        healthy_gauge(&server, STABLE, a.addr).await == Some(1.0)
    })
    .await;
    assert_eq!(state_health(&server, "stable", a.addr).await, Some(true));
    let before = a.hits();
    for _ in 0..20 {
        let reply = client.get("/", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }
    assert!(
        a.hits() > before,
        "the upstream that came back gets no requests"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_canary_is_gated_until_its_first_good_probe() {
    let stable = Backend::start("stable").await;
    let canary = Backend::start("gated").await;
    canary.stop().await;
    let extra = format!("[routing]\nsticky_keys = [\"header:x-user\"]\n\n{FAST_HEALTH}");
    let server = support::cohort(&[stable.addr], None, &extra).await;
    let client = Http::new(server.proxy_addr());

    let installed = admin(
        &server,
        Method::PUT,
        "/admin/canary",
        &format!(
            r#"{{"name": "v2-gated", "upstreams": ["{}"], "weight": 50}}"#,
            canary.addr
        ),
    )
    .await;
    assert_eq!(installed.status, StatusCode::OK, "{installed:?}");
    // The salt is the canary's name.
    let on_canary = key_on("v2-gated", 50.0, CANARY, "user");
    let on_stable = key_on("v2-gated", 50.0, STABLE, "user");

    let fallbacks = metric(&server, "cohort_canary_fallbacks_total", &[])
        .await
        .expect("the fallback counter is registered");
    for _ in 0..5 {
        let reply = client.get("/", &[("x-user", &on_canary)]).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.version(), STABLE);
        assert_eq!(reply.headers["x-backend"], "stable");
        let reply = client.get("/", &[("x-user", &on_stable)]).await;
        assert_eq!(reply.version(), STABLE);
    }
    let after = metric(&server, "cohort_canary_fallbacks_total", &[])
        .await
        .expect("the fallback counter");
    assert!(after >= fallbacks + 5.0, "{fallbacks} -> {after}");
    assert_eq!(
        healthy_gauge(&server, "v2-gated", canary.addr).await,
        Some(0.0)
    );
    assert_eq!(
        state_health(&server, "canary", canary.addr).await,
        Some(false)
    );
    let route = format!("/admin/route?key={on_canary}");
    let explained = admin(&server, Method::GET, &route, "").await.json();
    assert_eq!(
        (
            &explained["cohort"],
            &explained["version"],
            &explained["served_by"]
        ),
        (&"canary".into(), &"v2-gated".into(), &STABLE.into()),
        "{explained}"
    );
    // Nor can it be promoted, which would send everyone there, unless forced.
    let refused = admin(&server, Method::POST, "/admin/promote", "").await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{refused:?}");
    assert!(
        refused.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("healthy") && e.contains("force")),
        "{refused:?}"
    );

    // Once something answers there, the first good probe opens the gate.
    canary.restart().await;
    eventually_async("the canary's cohort reaches the canary", || async {
        client.get("/", &[("x-user", &on_canary)]).await.version() == "v2-gated"
    })
    .await;
    assert!(canary.hits() > 0);
    assert_eq!(
        healthy_gauge(&server, "v2-gated", canary.addr).await,
        Some(1.0)
    );
    assert_eq!(
        state_health(&server, "canary", canary.addr).await,
        Some(true)
    );
    let explained = admin(&server, Method::GET, &route, "").await.json();
    assert_eq!(explained["served_by"], "v2-gated", "{explained}");
    let reply = client.get("/", &[("x-user", &on_stable)]).await;
    assert_eq!(reply.version(), STABLE);
    let promoted = admin(&server, Method::POST, "/admin/promote", "").await;
    assert_eq!(promoted.status, StatusCode::OK, "{promoted:?}");
    assert_eq!(promoted.json()["stable"]["name"], "v2-gated");
    server.shutdown().await;
}

#[tokio::test]
async fn a_canary_that_never_answered_is_promoted_only_by_force() {
    let stable = Backend::start("stable").await;
    let dead = support::dead_addr().await;
    let server = support::cohort(&[stable.addr], None, FAST_HEALTH).await;
    let body = format!(r#"{{"name": "v2-dead", "upstreams": ["{dead}"], "weight": 10}}"#);
    let installed = admin(&server, Method::PUT, "/admin/canary", &body).await;
    assert_eq!(installed.status, StatusCode::OK, "{installed:?}");
    let refused = admin(&server, Method::POST, "/admin/promote", "{}").await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{refused:?}");
    let state = admin(&server, Method::GET, "/admin/state", "").await.json();
    assert_eq!(state["stable"]["name"], STABLE, "{state}");
    assert_eq!(state["canary"]["name"], "v2-dead", "{state}");

    let forced = admin(
        &server,
        Method::POST,
        "/admin/promote",
        r#"{"force": true}"#,
    )
    .await;
    assert_eq!(forced.status, StatusCode::OK, "{forced:?}");
    assert_eq!(forced.json()["stable"]["name"], "v2-dead");
    assert!(forced.json()["canary"].is_null());
    server.shutdown().await;
}

/// With `canary_unavailable = "error"`, a canary that was open and then
/// fails its probes answers its cohort 503; one that has never passed a
/// probe is not open to anyone yet, so its cohort stays on stable.
#[tokio::test]
async fn canary_unavailable_error_answers_its_cohort_with_503() {
    let stable = Backend::start("stable").await;
    let canary = Backend::start("down").await;
    canary.stop().await;
    let extra = format!(
        "[routing]\nsticky_keys = [\"header:x-user\"]\n\n{FAST_HEALTH}canary_unavailable = \"error\"\n"
    );
    let server = support::cohort(&[stable.addr], None, &extra).await;
    let client = Http::new(server.proxy_addr());
    let installed = admin(
        &server,
        Method::PUT,
        "/admin/canary",
        &format!(
            r#"{{"name": "v2-down", "upstreams": ["{}"], "weight": 50}}"#,
            canary.addr
        ),
    )
    .await;
    assert_eq!(installed.status, StatusCode::OK, "{installed:?}");
    let on_canary = key_on("v2-down", 50.0, CANARY, "user");
    let on_stable = key_on("v2-down", 50.0, STABLE, "user");

    // Not yet open: served by stable, not refused.
    let reply = client.get("/", &[("x-user", &on_canary)]).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.version(), STABLE);

    // Open, then down: its cohort gets the 503, tagged with the canary.
    canary.restart().await;
    eventually_async("the canary's cohort reaches the canary", || async {
        client.get("/", &[("x-user", &on_canary)]).await.version() == "v2-down"
    })
    .await;
    canary.stop().await;
    eventually_async("the failed probes take the canary out", || async {
        state_health(&server, "canary", canary.addr).await == Some(false)
    })
    .await;
    let reply = client.get("/", &[("x-user", &on_canary)]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    assert_eq!(reply.version(), "v2-down");
    let body = reply.json();
    assert_eq!(body["error"], "unavailable");
    assert_eq!(body["version"], "v2-down");
    let reply = client.get("/", &[("x-user", &on_stable)]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.version(), STABLE);
    assert_eq!(
        healthy_gauge(&server, "v2-down", canary.addr).await,
        Some(0.0)
    );
    server.shutdown().await;
}

/// A canary in the config is gated on a first start as at run time: one
/// that is not up yet takes none of its cohort, and the probe before the
/// first accept opens a live one at once.
#[tokio::test]
async fn a_canary_from_the_config_is_gated_on_a_first_start() {
    let stable = Backend::start("stable").await;
    let live = Backend::start("live").await;
    let dead = support::dead_addr().await;
    let extra = "[routing]\nsticky_keys = [\"header:x-user\"]\n\n\
        [health]\ninterval = \"1h\"\n";
    for (upstream, expected) in [(dead, STABLE), (live.addr, CANARY)] {
        let server = support::cohort(&[stable.addr], Some((&[upstream], 50.0)), extra).await;
        let on_canary = key_on(CANARY, 50.0, CANARY, "user");
        let reply = Http::new(server.proxy_addr())
            .get("/", &[("x-user", &on_canary)])
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{upstream}: {reply:?}");
        assert_eq!(reply.version(), expected, "{upstream}: {reply:?}");
        server.shutdown().await;
    }
    assert_eq!(live.hits(), 1);
}

/// A gated canary is probed every second until it opens, however long
/// `health.interval` is: it takes no traffic until then.
#[tokio::test]
async fn a_gated_canary_is_probed_again_within_a_second_whatever_the_interval() {
    let stable = Backend::start("stable").await;
    let canary = Backend::start("late").await;
    canary.stop().await;
    let extra = "[routing]\nsticky_keys = [\"header:x-user\"]\n\n\
        [health]\ninterval = \"1h\"\n";
    let server = support::cohort(&[stable.addr], Some((&[canary.addr], 50.0)), extra).await;
    let client = Http::new(server.proxy_addr());
    let on_canary = key_on(CANARY, 50.0, CANARY, "user");
    assert_eq!(
        client.get("/", &[("x-user", &on_canary)]).await.version(),
        STABLE
    );

    // Up just after the probe before the first accept: with the hour's
    // interval alone, the next probe would be an hour away.
    canary.restart().await;
    eventually_async("the canary's cohort reaches the canary", || async {
        client.get("/", &[("x-user", &on_canary)]).await.version() == CANARY
    })
    .await;
    server.shutdown().await;
}

/// A server in front of `stable` and a 50% canary named `name`, with
/// probes an hour apart, `canary_unavailable = mode` and the other `[health]` keys of
/// `health`, whose canary answered a request of its cohort and has then
/// stopped (its port refuses connections); with a client and a key of the
/// canary's cohort.
async fn canary_answered_then_stopped(
    stable: SocketAddr,
    name: &str,
    health: &str,
    mode: &str,
) -> (Server, Backend, Http, String) {
    let canary = Backend::start(name).await;
    let extra = format!(
        "[routing]\nsticky_keys = [\"header:x-user\"]\n\n\
        [health]\ninterval = \"1h\"\ncanary_unavailable = \"{mode}\"\n{health}"
    );
    let toml = support::config(&[stable], Some((&[canary.addr], 50.0)), &extra)
        .replace(&format!("name = \"{CANARY}\""), &format!("name = {name:?}"));
    let server = support::start_cohort(&toml).await;
    let client = Http::new(server.proxy_addr());
    // Without `routing.salt`, the salt is the canary's name.
    let on_canary = key_on(name, 50.0, CANARY, "user");
    let reply = client.get("/", &[("x-user", &on_canary)]).await;
    assert_eq!(reply.version(), name, "{mode}: {reply:?}");
    assert_eq!(healthy_gauge(&server, name, canary.addr).await, Some(1.0));
    canary.stop().await;
    (server, canary, client, on_canary)
}

/// Passive ejection of every canary upstream sends its cohort to stable
/// (`canary_unavailable = "stable"`) or answers it 503 (`"error"`), rather
/// than trying the ejected ones as a version with nowhere else to go does;
/// the gauge shows the ejection.
#[tokio::test]
async fn an_ejected_canary_hands_its_cohort_to_stable_or_answers_503() {
    for mode in ["stable", "error"] {
        let stable = Backend::start("stable").await;
        // Probes an hour apart: only the passive rule acts within the test.
        let health = "eject_after_errors = 2\neject_for = \"1h\"\n";
        let (server, canary, client, on_canary) =
            canary_answered_then_stopped(stable.addr, CANARY, health, mode).await;
        // The refusals that eject it: answered by stable in the first
        // mode (see the test below), with the 502 in the second.
        let mut answered = Vec::new();
        for _ in 0..2 {
            let reply = client.get("/", &[("x-user", &on_canary)]).await;
            answered.push((reply.status.as_u16(), reply.version().to_owned()));
        }
        let refused = if mode == "stable" {
            (200, STABLE.to_owned())
        } else {
            (502, CANARY.to_owned())
        };
        assert_eq!(answered, [refused.clone(), refused], "{mode}");
        for _ in 0..5 {
            let reply = client.get("/", &[("x-user", &on_canary)]).await;
            if mode == "stable" {
                assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
                assert_eq!(reply.version(), STABLE);
            } else {
                assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
                assert_eq!(reply.version(), CANARY);
                assert_eq!(reply.json()["error"], "unavailable");
            }
        }
        assert_eq!(healthy_gauge(&server, CANARY, canary.addr).await, Some(0.0));
        let state = admin(&server, Method::GET, "/admin/state", "").await.json();
        assert_eq!(state["canary"]["health"][0]["ejected"], true, "{state}");
        server.shutdown().await;
    }
}

/// A canary whose upstream refuses a request's connection, before any
/// probe or ejection has taken it out, hands the request to stable
/// (`canary_unavailable = "stable"`), body and all, since none of it was
/// sent; the refusal still counts against the canary. With `"error"`, its
/// cohort gets the 502.
#[tokio::test]
async fn a_canary_that_refuses_a_request_hands_it_to_stable() {
    for mode in ["stable", "error"] {
        let stable = support::Backend::start(STABLE).await;
        // Probes an hour apart and no passive ejection: the canary stays
        // available to the table throughout.
        let health = "eject_after_errors = 1000\n";
        // A name of its own: the metric series are the process's, and
        // other tests stop canaries too.
        let name = format!("v2-refusing-{mode}");
        let (server, canary, client, on_canary) =
            canary_answered_then_stopped(stable.addr, &name, health, mode).await;
        // Except for the fallbacks, whose counter has no version label.
        let counter = |name, labels| {
            let server = &server;
            async move { metric(server, name, labels).await.unwrap_or(0.0) }
        };
        let fallbacks_before = counter("cohort_canary_fallbacks_total", &[]).await;
        let body = Bytes::from_static(b"a body that must arrive whole");
        let mut answered = Vec::new();
        for method in [Method::GET, Method::POST, Method::GET] {
            let reply = client
                .send(method, "/", &[("x-user", &on_canary)], body.clone())
                .await;
            answered.push((reply.status.as_u16(), reply.version().to_owned()));
            if reply.status == StatusCode::OK {
                assert_eq!(reply.backend(), STABLE, "{mode}: {reply:?}");
                assert_eq!(reply.json()["body_len"], body.len(), "{mode}: {reply:?}");
            }
        }
        let expected = if mode == "stable" {
            (200, STABLE.to_owned())
        } else {
            (502, name.clone())
        };
        assert_eq!(answered, vec![expected; 3], "{mode}");
        assert_eq!(stable.hits(), if mode == "stable" { 3 } else { 0 });
        assert_eq!(
            stable.body_bytes_seen(),
            if mode == "stable" {
                3 * body.len() as u64
            } else {
                0
            }
        );
        let refused = [("version", name.as_str()), ("kind", "connect")];
        assert_eq!(
            counter("cohort_upstream_errors_total", &refused).await,
            3.0,
            "{mode}"
        );
        if mode == "stable" {
            let after = counter("cohort_canary_fallbacks_total", &[]).await;
            assert!(
                after >= fallbacks_before + 3.0,
                "{fallbacks_before} -> {after}"
            );
        }
        // Each refusal is the canary's 502 in its own numbers, whoever
        // answered the client.
        let canary_502 = [("version", name.as_str()), ("code", "502")];
        assert_eq!(
            counter("cohort_requests_total", &canary_502).await,
            3.0,
            "{mode}"
        );
        // And in both durations, with the request it answered first.
        for histogram in [
            "cohort_request_duration_seconds_count",
            "cohort_response_duration_seconds_count",
        ] {
            let count = metric(&server, histogram, &[("version", name.as_str())]).await;
            assert_eq!(count, Some(4.0), "{mode}: {histogram}");
        }
        // Not ejected, nor probed down: the refusals alone did it.
        assert_eq!(healthy_gauge(&server, &name, canary.addr).await, Some(1.0));
        server.shutdown().await;
    }
}

/// An upstream that answers the health probe made before the proxy
/// accepts (its first connection), then takes every connection and closes
/// it `after` a while, unanswered: a canary that fails slowly.
async fn closes_unanswered_after_its_first_probe(after: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(async move {
        let (mut probe, _) = listener.accept().await.expect("the probe connects");
        support::read_head(&mut probe).await;
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        probe.write_all(answer).await.expect("answer the probe");
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                drop(stream);
            });
        }
    });
    addr
}

/// Stable answers a request that the canary gave back with a response
/// timeout of its own, as nginx gives a next upstream: a canary slow to
/// fail does not spend stable's time, nor make stable's answer a 504.
#[tokio::test]
async fn stable_has_a_response_timeout_of_its_own_for_a_request_the_canary_gave_back() {
    // The canary fails at 1.5 s, stable takes 1.5 s more: within a 2 s
    // timeout for each, not for both together.
    let stable = TunedBackend::start(
        STABLE,
        Tuning {
            delay: Duration::from_millis(1500),
            ..Tuning::default()
        },
    )
    .await;
    let canary = closes_unanswered_after_its_first_probe(Duration::from_millis(1500)).await;
    let extra = "[routing]\nsticky_keys = [\"header:x-user\"]\n\n\
        [upstream]\nresponse_timeout = \"2s\"\n\n\
        [health]\ninterval = \"1h\"\neject_after_errors = 1000\n";
    let server = support::cohort(&[stable.addr], Some((&[canary], 50.0)), extra).await;
    let on_canary = key_on(CANARY, 50.0, CANARY, "user");
    let reply = Http::new(server.proxy_addr())
        .get("/", &[("x-user", &on_canary)])
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.version(), STABLE);
    assert_eq!(stable.hits(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_version_that_leaves_the_table_takes_its_health_series_with_it() {
    let stable = Backend::start("stable").await;
    let next = Backend::start("next").await;
    let dead = support::dead_addr().await;
    let server = support::cohort(&[stable.addr], None, FAST_HEALTH).await;
    let install = |name: &str, upstream: SocketAddr| {
        format!(r#"{{"name": "{name}", "upstreams": ["{upstream}"], "weight": 10}}"#)
    };
    let installed = admin(
        &server,
        Method::PUT,
        "/admin/canary",
        &install("v2-down", dead),
    )
    .await;
    assert_eq!(installed.status, StatusCode::OK, "{installed:?}");
    assert_eq!(healthy_gauge(&server, "v2-down", dead).await, Some(0.0));

    // A canary replaced (as after a rollback) leaves no 0 behind for an alert to hold on to.
    let installed = admin(
        &server,
        Method::PUT,
        "/admin/canary",
        &install("v3", next.addr),
    )
    .await;
    assert_eq!(installed.status, StatusCode::OK, "{installed:?}");
    eventually_async("the new canary passing its first probe", || async {
        healthy_gauge(&server, "v3", next.addr).await == Some(1.0)
    })
    .await;
    assert_eq!(healthy_gauge(&server, "v2-down", dead).await, None);
    assert_eq!(healthy_gauge(&server, STABLE, stable.addr).await, Some(1.0));

    // After a promotion the old stable version's series goes too.
    let promoted = admin(&server, Method::POST, "/admin/promote", "").await;
    assert_eq!(promoted.status, StatusCode::OK, "{promoted:?}");
    assert_eq!(healthy_gauge(&server, STABLE, stable.addr).await, None);
    assert_eq!(healthy_gauge(&server, "v3", next.addr).await, Some(1.0));
    server.shutdown().await;
}

#[tokio::test]
async fn a_restored_canary_is_probed_before_the_first_request() {
    let stable = Backend::start("stable").await;
    let live = Backend::start("live").await;
    let dead = support::dead_addr().await;
    // One probe round at the start, the next an hour later: what the first
    // requests see is decided by the gate and the probe before them.
    let extra = "[routing]\nsticky_keys = [\"header:x-user\"]\n\n\
        [health]\ninterval = \"1h\"\nunhealthy_threshold = 2\n";
    let text = support::config(&[stable.addr], None, extra);

    for (name, upstream, expected) in [("v2-dead", dead, STABLE), ("v2-live", live.addr, "v2-live")]
    {
        let server = support::start_cohort(&text).await;
        let installed = admin(
            &server,
            Method::PUT,
            "/admin/canary",
            &format!(r#"{{"name": "{name}", "upstreams": ["{upstream}"], "weight": 50}}"#),
        )
        .await;
        assert_eq!(installed.status, StatusCode::OK, "{installed:?}");
        server.shutdown().await;

        // Restarted on the same state file: the API's canary is restored.
        let server = support::start_cohort(&text).await;
        let state = admin(&server, Method::GET, "/admin/state", "").await.json();
        assert_eq!(state["canary"]["name"], name, "{state}");
        let on_canary = key_on(name, 50.0, CANARY, "user");
        let reply = Http::new(server.proxy_addr())
            .get("/", &[("x-user", &on_canary)])
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{name}: {reply:?}");
        assert_eq!(reply.version(), expected, "{name}: {reply:?}");
        server.shutdown().await;
    }
    assert_eq!(live.hits(), 1);
}

#[tokio::test]
async fn a_reloaded_health_section_applies_to_the_running_checks() {
    let stable = Backend::start("stable").await;
    let health = |path: &str| format!("[health]\ninterval = \"50ms\"\npath = \"{path}\"\n");
    let server = support::cohort(&[stable.addr], None, &health("/before")).await;
    eventually_async("a probe of /before", || async {
        stable.last_probe().as_deref() == Some("/before")
    })
    .await;

    let edited = support::config(&[stable.addr], None, &health("/after"));
    support::reload(&server, &edited);
    eventually_async("a probe of /after", || async {
        stable.last_probe().as_deref() == Some("/after")
    })
    .await;
    server.shutdown().await;
}

/// A reload that changes the upstream lists keeps what probes learnt about
/// the upstreams both lists hold: a dead one stays out, and the canary's
/// cohort stays on the canary rather than waiting at the readiness gate
/// again; a promote keeps it too, and its reply shows it.
#[tokio::test]
async fn what_probes_learnt_survives_a_reload_and_a_promote() {
    let stable = Backend::start("stable").await;
    let canary = Backend::start("canary").await;
    let added = Backend::start("added").await;
    let (dead_stable, dead_canary) = (support::dead_addr().await, support::dead_addr().await);
    let extra = format!("[routing]\nsticky_keys = [\"header:x-user\"]\n\n{FAST_HEALTH}");
    let text = support::config(
        &[stable.addr, dead_stable],
        Some((&[canary.addr, dead_canary], 50.0)),
        &extra,
    );
    let server = support::start_cohort(&text).await;
    eventually_async("probes find the dead upstreams out", || async {
        state_health(&server, "stable", dead_stable).await == Some(false)
            && state_health(&server, "canary", dead_canary).await == Some(false)
            && state_health(&server, "canary", canary.addr).await == Some(true)
    })
    .await;

    // Each version gets one more upstream, not probed yet when the reload returns.
    let edited = text
        .replace(
            &format!("\"{dead_stable}\""),
            &format!("\"{dead_stable}\", \"{}\"", added.addr),
        )
        .replace(
            &format!("\"{dead_canary}\""),
            &format!("\"{dead_canary}\", \"{}\"", added.addr),
        );
    support::reload(&server, &edited);
    let state = admin(&server, Method::GET, "/admin/state", "").await.json();
    assert_eq!(
        state["canary"]["upstreams"].as_array().map(Vec::len),
        Some(3),
        "{state}"
    );
    assert_eq!(
        state_health(&server, "stable", dead_stable).await,
        Some(false)
    );
    assert_eq!(
        state_health(&server, "canary", dead_canary).await,
        Some(false)
    );
    let on_canary = key_on(CANARY, 50.0, CANARY, "user");
    let reply = Http::new(server.proxy_addr())
        .get("/", &[("x-user", &on_canary)])
        .await;
    assert_eq!(reply.version(), CANARY, "{reply:?}");

    let promoted = admin(&server, Method::POST, "/admin/promote", "").await;
    assert_eq!(promoted.status, StatusCode::OK, "{promoted:?}");
    let shown = promoted.json()["stable"]["health"].clone();
    let dead_shown = shown
        .as_array()
        .and_then(|h| h.iter().find(|h| h["upstream"] == dead_canary.to_string()))
        .map(|h| h["healthy"].clone());
    assert_eq!(dead_shown, Some(false.into()), "{shown}");
    assert_eq!(
        state_health(&server, "stable", dead_canary).await,
        Some(false)
    );
    assert_eq!(
        state_health(&server, "stable", canary.addr).await,
        Some(true)
    );
    server.shutdown().await;
}

/// A reload that shortens `health.interval` applies before the next probe
/// due under the old one.
#[tokio::test]
async fn a_shorter_probe_interval_applies_at_once() {
    let stable = Backend::start("stable").await;
    let text = support::config(&[stable.addr], None, "[health]\ninterval = \"1h\"\n");
    let server = support::start_cohort(&text).await;
    eventually("the first probe", || stable.probe_count() >= 1).await;

    let edited = text.replace("\"1h\"", "\"50ms\"");
    support::reload(&server, &edited);
    eventually("probes every 50 ms", || stable.probe_count() >= 3).await;
    server.shutdown().await;
}
