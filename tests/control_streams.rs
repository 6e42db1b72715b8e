//! Open streams and upgraded connections across changes of the live table.
//!
//! Owns: an SSE stream and a WebSocket opened on the canary run on through a
//! weight change and a promote; on a rollback they run on with
//! `routing.on_rollback = "drain"` and end at once with `"close"` (while a
//! stable stream runs on), also after a reload changed the canary's
//! upstreams under the stream; a request still waiting for its answer at
//! such a rollback gets it whole. Changes go through the admin API. An open
//! WebSocket also outlives a restart of the proxy workers (a reload of
//! `[upstream]`), and holds up a shutdown. Does not own: streaming itself (`streaming`), or requests
//! that are not streams (`control_load`).

mod support;

use cohort::serve::Server;
use futures_util::{SinkExt as _, StreamExt as _};
use hyper::body::Incoming;
use support::{
    AdminApi, Backend, CANARY, Http, STABLE, SlowBackend, SseTicker, WsBackend, cohort, eventually,
    key_on, read_until, within,
};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The canary starts at this weight; the streams' key is on the canary at
/// it and on stable at [`LOWER`], so a weight change moves the key.
const WEIGHT: f64 = 50.0;
const LOWER: f64 = 10.0;

/// A key on the canary at [`WEIGHT`] but on stable at [`LOWER`].
fn moving_key() -> String {
    (0..10_000)
        .map(|i| format!("stream-{i}"))
        .find(|k| {
            support::predicted(CANARY, WEIGHT, k) == CANARY
                && support::predicted(CANARY, LOWER, k) == STABLE
        })
        .expect("a key between the two weights")
}

/// Opens an SSE stream for `key` and reads its first event.
async fn open_sse(server: &Server, key: &str, version: &str) -> Incoming {
    let rsp = Http::new(server.proxy_addr())
        .get_streaming(
            "/events",
            &[("x-user-id", key), ("accept", "text/event-stream")],
        )
        .await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.headers()["x-agent-version"], version, "{key}");
    let mut body = rsp.into_body();
    read_until(&mut body, SseTicker::READY)
        .await
        .expect("the stream opens");
    body
}

/// Opens a WebSocket for `key` through the proxy.
async fn open_ws(server: &Server, key: &str, version: &str) -> Ws {
    let mut handshake = format!("ws://{}/socket", server.proxy_addr())
        .into_client_request()
        .expect("a ws URL");
    handshake
        .headers_mut()
        .insert("x-user-id", key.parse().expect("a header value"));
    let (ws, rsp) = within("the handshake", tokio_tungstenite::connect_async(handshake))
        .await
        .expect("the handshake");
    assert_eq!(rsp.status(), 101);
    assert_eq!(rsp.headers()["x-agent-version"], version, "{key}");
    ws
}

/// Sends `text` and expects the backend `version`'s echo.
async fn echo(ws: &mut Ws, version: &str, text: &str) {
    ws.send(Message::text(text))
        .await
        .expect("send on the tunnel");
    let reply = within("the echo", ws.next())
        .await
        .expect("the tunnel is open")
        .expect("a good message");
    assert_eq!(reply, Message::text(format!("{version}:{text}")));
}

/// Asserts the WebSocket ends (EOF, an error, or a close frame) without
/// the test closing it.
async fn assert_ws_ends(ws: &mut Ws) {
    match within("the tunnel to be closed", ws.next()).await {
        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => {}
        Some(Ok(message)) => panic!("the tunnel is still open: {message:?}"),
    }
}

#[tokio::test]
async fn an_sse_stream_on_the_canary_survives_a_weight_change_and_a_promote() {
    let stable = SseTicker::start(STABLE).await;
    let canary = SseTicker::start(CANARY).await;
    let server = cohort(&[stable.addr], Some((&[canary.addr], WEIGHT)), "").await;
    let admin = AdminApi::new(server.admin_addr());
    let key = moving_key();
    let mut stream = open_sse(&server, &key, CANARY).await;

    // Lower the weight: new requests of this key go to stable; the stream stays.
    admin.set_weight(LOWER, false).await;
    let reply = Http::new(server.proxy_addr())
        .get_streaming("/events", &[("x-user-id", &key)])
        .await;
    assert_eq!(reply.headers()["x-agent-version"], STABLE);
    drop(reply);
    read_until(&mut stream, &canary.tick())
        .await
        .expect("the canary stream runs on after a weight change");

    admin.set_weight(WEIGHT, false).await;
    admin.promote().await;
    for _ in 0..3 {
        read_until(&mut stream, &canary.tick())
            .await
            .expect("the stream runs on after a promote");
    }
}

#[tokio::test]
async fn a_websocket_on_the_canary_survives_a_weight_change_and_a_promote() {
    let stable = WsBackend::start(STABLE).await;
    let canary = WsBackend::start(CANARY).await;
    let server = cohort(&[stable.addr], Some((&[canary.addr], WEIGHT)), "").await;
    let admin = AdminApi::new(server.admin_addr());
    let key = moving_key();
    let mut ws = open_ws(&server, &key, CANARY).await;
    echo(&mut ws, CANARY, "before").await;

    admin.set_weight(LOWER, false).await;
    // A new handshake of the same key goes to stable; the open tunnel stays.
    let mut fresh = open_ws(&server, &key, STABLE).await;
    echo(&mut fresh, STABLE, "fresh").await;
    echo(&mut ws, CANARY, "after a weight change").await;

    admin.promote().await;
    for i in 0..3 {
        echo(&mut ws, CANARY, &format!("after a promote {i}")).await;
    }
    ws.close(None).await.expect("close");
}

/// SSE and WebSocket servers with `on_rollback`, a stream of each on the
/// canary, and the rollback made; returns what the caller checks.
struct RolledBack {
    /// Dropping a `Server` shuts it down: both are held to the test's end.
    _servers: [Server; 2],
    sse: SseTicker,
    sse_stable: SseTicker,
    canary_stream: Incoming,
    stable_stream: Incoming,
    ws: Ws,
    stable_ws: Ws,
}

async fn open_then_roll_back(on_rollback: &str) -> RolledBack {
    let extra = format!("[routing]\non_rollback = {on_rollback:?}\n");
    let canary_key = key_on(CANARY, WEIGHT, CANARY, "on");
    let stable_key = key_on(CANARY, WEIGHT, STABLE, "off");

    let sse_stable = SseTicker::start(STABLE).await;
    let sse = SseTicker::start(CANARY).await;
    let sse_server = cohort(&[sse_stable.addr], Some((&[sse.addr], WEIGHT)), &extra).await;
    let canary_stream = open_sse(&sse_server, &canary_key, CANARY).await;
    let stable_stream = open_sse(&sse_server, &stable_key, STABLE).await;

    let ws_stable = WsBackend::start(STABLE).await;
    let ws_canary = WsBackend::start(CANARY).await;
    let ws_server = cohort(&[ws_stable.addr], Some((&[ws_canary.addr], WEIGHT)), &extra).await;
    let mut ws = open_ws(&ws_server, &canary_key, CANARY).await;
    echo(&mut ws, CANARY, "before").await;
    let mut stable_ws = open_ws(&ws_server, &stable_key, STABLE).await;
    echo(&mut stable_ws, STABLE, "before").await;

    for server in [&sse_server, &ws_server] {
        let state = AdminApi::new(server.admin_addr())
            .rollback("streams test")
            .await;
        assert_eq!(state["status"], "rolled_back", "{state}");
    }
    // New traffic of the canary's key is on stable now.
    let reply = Http::new(sse_server.proxy_addr())
        .get_streaming("/events", &[("x-user-id", &canary_key)])
        .await;
    assert_eq!(reply.headers()["x-agent-version"], STABLE);
    RolledBack {
        _servers: [sse_server, ws_server],
        sse,
        sse_stable,
        canary_stream,
        stable_stream,
        ws,
        stable_ws,
    }
}

#[tokio::test]
async fn on_rollback_drain_lets_canary_streams_run_on() {
    let mut rolled = open_then_roll_back("drain").await;
    for _ in 0..2 {
        read_until(&mut rolled.canary_stream, &rolled.sse.tick())
            .await
            .expect("the canary's stream drains: it runs on after the rollback");
    }
    echo(&mut rolled.ws, CANARY, "after the rollback").await;
    echo(&mut rolled.stable_ws, STABLE, "after the rollback").await;
    read_until(&mut rolled.stable_stream, &rolled.sse_stable.tick())
        .await
        .expect("stable's stream runs on");
}

#[tokio::test]
async fn on_rollback_close_ends_canary_streams_at_once() {
    let mut rolled = open_then_roll_back("close").await;
    // Nothing is sent on the canary's stream: only the close can end it.
    let ended = read_until(&mut rolled.canary_stream, "data: never\n\n").await;
    assert!(ended.is_err(), "the canary's stream is still open");
    assert_ws_ends(&mut rolled.ws).await;

    // Stable's stream and tunnel are not the rolled-back version's: they run on.
    echo(&mut rolled.stable_ws, STABLE, "after the rollback").await;
    read_until(&mut rolled.stable_stream, &rolled.sse_stable.tick())
        .await
        .expect("stable's stream runs on");
}

#[tokio::test]
async fn a_canary_request_still_waiting_at_a_close_rollback_gets_its_answer_whole() {
    let stable = Backend::start(STABLE).await;
    let canary = SlowBackend::start(CANARY).await;
    let server = cohort(
        &[stable.addr],
        Some((&[canary.addr], WEIGHT)),
        "[routing]\non_rollback = \"close\"\n",
    )
    .await;
    let key = key_on(CANARY, WEIGHT, CANARY, "on");
    let http = Http::new(server.proxy_addr());
    let waiting = tokio::spawn(async move { http.get("/", &[("x-user-id", &key)]).await });
    eventually("the canary to hold the request", || canary.hits() == 1).await;

    // Not a stream yet: the close is for streams open at the rollback.
    AdminApi::new(server.admin_addr())
        .rollback("a request in flight")
        .await;
    canary.release();
    let reply = within("the held answer", waiting)
        .await
        .expect("the request is answered, not cut");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.version(), CANARY);
    assert_eq!(reply.body, SlowBackend::BODY, "{reply:?}");
}

#[tokio::test]
async fn streams_opened_after_a_close_rollback_and_a_forced_weight_run_on() {
    let mut rolled = open_then_roll_back("close").await;
    assert_ws_ends(&mut rolled.ws).await;
    let sse_server = &rolled._servers[0];
    let state = AdminApi::new(sse_server.admin_addr())
        .set_weight(WEIGHT, true)
        .await;
    assert_eq!(state["status"], "steady", "{state}");

    // The same canary version serves again: a stream it opens now is not cut.
    let canary_key = key_on(CANARY, WEIGHT, CANARY, "on");
    let mut stream = open_sse(sse_server, &canary_key, CANARY).await;
    for _ in 0..2 {
        read_until(&mut stream, &rolled.sse.tick())
            .await
            .expect("a canary stream opened after the close runs on");
    }
}

#[tokio::test]
async fn an_open_websocket_survives_a_worker_restart_and_holds_up_a_shutdown() {
    let stable = WsBackend::start(STABLE).await;
    let text = support::config(&[stable.addr], None, "");
    let mut server = support::start_cohort(&text).await;
    let mut ws = open_ws(&server, "alice", STABLE).await;
    echo(&mut ws, STABLE, "before").await;

    // The response timeout is the route table's: no new workers for it, so
    // no drain that could cut long streams.
    let timeout_only = format!("{text}\n[upstream]\nresponse_timeout = \"7s\"\n");
    let timeout_only =
        cohort::config::Config::parse(&timeout_only, "test").expect("a valid config");
    assert!(!server.reload_workers(&timeout_only).expect("the reload"));

    // A reloaded [upstream] pool setting starts new workers; the old ones
    // drain, and the tunnel they hold runs on.
    let edited = format!("{text}\n[upstream]\nidle_timeout = \"7s\"\n");
    let edited = cohort::config::Config::parse(&edited, "test").expect("a valid config");
    assert!(server.reload_workers(&edited).expect("the reload"));
    // `listen.tls` takes a restart: edited, it starts no workers, on this
    // reload or any after it.
    let tls_edited = format!(
        "{text}\n[upstream]\nidle_timeout = \"7s\"\n\n\
         [listen.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n"
    );
    let tls_edited = cohort::config::Config::parse(&tls_edited, "test").expect("a valid config");
    assert!(!server.reload_workers(&tls_edited).expect("the reload"));
    assert!(!server.reload_workers(&tls_edited).expect("the reload"));
    let mut fresh = open_ws(&server, "bob", STABLE).await;
    echo(&mut fresh, STABLE, "on the new workers").await;
    for i in 0..3 {
        echo(&mut ws, STABLE, &format!("after the restart {i}")).await;
    }
    drop(fresh);

    // A shutdown waits for the tunnel (up to `drain_timeout`), which works meanwhile.
    let proxy = server.proxy_addr();
    let stopping = tokio::spawn(server.shutdown());
    support::wait_for_refusal(proxy).await;
    echo(&mut ws, STABLE, "during the drain").await;
    assert!(
        !stopping.is_finished(),
        "shutdown must wait for the open WebSocket"
    );
    drop(ws);
    within("the drain to finish once the tunnel closes", stopping)
        .await
        .expect("shutdown ran to the end");
}

#[tokio::test]
async fn on_rollback_close_ends_canary_streams_even_when_the_state_cannot_be_saved() {
    let canary_key = key_on(CANARY, WEIGHT, CANARY, "unsaved");
    let stable = SseTicker::start(STABLE).await;
    let sse = SseTicker::start(CANARY).await;
    let text = support::config(
        &[stable.addr],
        Some((&[sse.addr], WEIGHT)),
        "[routing]\non_rollback = \"close\"\n",
    );
    let state_path = cohort::config::Config::parse(&text, "test")
        .expect("a valid config")
        .state
        .path;
    let server = support::start_cohort(&text).await;
    let mut stream = open_sse(&server, &canary_key, CANARY).await;

    // A non-empty directory where the state file was: no save can replace it.
    std::fs::remove_file(&state_path).expect("remove the state file");
    std::fs::create_dir_all(state_path.join("in-the-way")).expect("block the state path");
    let reply = AdminApi::new(server.admin_addr())
        .call(
            http::Method::POST,
            "/admin/rollback",
            serde_json::json!({"reason": "unsaved"}),
        )
        .await;
    assert_eq!(reply.status, 500, "{reply:?}");

    // The rollback is in effect all the same, the close included.
    let ended = read_until(&mut stream, "data: never\n\n").await;
    assert!(ended.is_err(), "the canary's stream is still open");
    let reply = Http::new(server.proxy_addr())
        .get_streaming("/events", &[("x-user-id", &canary_key)])
        .await;
    assert_eq!(reply.headers()["x-agent-version"], STABLE);
}

#[tokio::test]
async fn on_rollback_close_ends_streams_opened_before_a_reload_changed_the_canary() {
    let canary_key = key_on(CANARY, WEIGHT, CANARY, "reloaded");
    let stable = SseTicker::start(STABLE).await;
    let sse = SseTicker::start(CANARY).await;
    let other = SseTicker::start(CANARY).await;
    let text = support::config(
        &[stable.addr],
        Some((&[sse.addr], WEIGHT)),
        "[routing]\non_rollback = \"close\"\n",
    );
    let server = support::start_cohort(&text).await;
    let mut stream = open_sse(&server, &canary_key, CANARY).await;

    let edited = text.replace(
        &format!("\"{}\"]\nweight", sse.addr),
        &format!("\"{}\", \"{}\"]\nweight", sse.addr, other.addr),
    );
    let live = support::reload(&server, &edited);
    assert_eq!(live.canary.map(|c| c.upstreams.len()), Some(2));
    let state = AdminApi::new(server.admin_addr())
        .rollback("after a reload")
        .await;
    assert_eq!(state["status"], "rolled_back", "{state}");

    let ended = read_until(&mut stream, "data: never\n\n").await;
    assert!(ended.is_err(), "the canary's stream is still open");
}
