//! OS signals to the running binary: `kill -USR1` and `kill -HUP`.
//!
//! Owns: SIGUSR1 rolls back with source `signal` (in `/admin/state`, the
//! audit log, the process log and traffic), and every change, by a signal
//! or the API, is a line in the process log (a rollback a warning); SIGHUP applies an edited config to the next
//! request without dropping an open keep-alive connection; SIGHUP with a
//! moved listener and new upstream settings starts new workers while a
//! request in flight finishes on the old ones; SIGHUP with an invalid config
//! is refused in the log (a syntax error in the one line `cohort check`
//! prints) while the old config keeps serving, as does one whose new
//! `listen.addr` cannot be bound; SIGHUP with a new canary
//! starts the config's rollout plan for it; a stream cut at the end of a
//! replaced worker's drain leaves `cohort_client_connections`; fewer
//! workers after SIGHUP keep every listening socket; a client held for a
//! connection slot is served across a SIGHUP that restarts the workers.
//! Does not own: SIGTERM's drain (`cli`, `shutdown`), restarts
//! (`control_persistence`).

mod support;

use std::path::PathBuf;

use http::Method;
use support::{
    AdminApi, Backend, CANARY, COHORT_BIN, Http, KeepAlive, Process, STABLE, SlowBackend,
    SseTicker, audit_lines, config, eventually, eventually_async, read_until, with_listen_keys,
    within,
};

/// Writes `text` as the config file of a fresh state directory.
fn write_config(text: &str) -> (PathBuf, PathBuf) {
    let parsed = cohort::config::Config::parse(text, "test").expect("a valid test config");
    let path = parsed.state.path.with_file_name("cohort.toml");
    std::fs::write(&path, text).expect("write the config");
    (path, parsed.state.audit_log.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_rolls_back_with_source_signal() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let (path, audit) = write_config(&config(&[stable.addr], Some((&[canary.addr], 50.0)), ""));
    let process = Process::serve(&path, &[]).await;
    let admin = AdminApi::new(process.admin);
    let mut connection = KeepAlive::connect(process.proxy).await;
    // alice is on the canary at 50% under salt v2 (SPEC vector).
    let reply = connection.get("/", &[("x-user-id", "alice")]).await;
    assert_eq!(reply.expect("a response").version(), CANARY);

    process.signal("USR1");
    eventually_async("the rollback by SIGUSR1", || {
        let admin = admin.clone();
        async move { admin.state().await["status"] == "rolled_back" }
    })
    .await;
    let state = admin.state().await;
    assert_eq!(state["last_rollback"]["source"], "signal", "{state}");
    assert!(
        state["last_rollback"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("SIGUSR1")),
        "{state}"
    );
    assert_eq!(state["canary"]["weight"], 0.0, "{state}");
    let reply = connection.get("/", &[("x-user-id", "alice")]).await;
    assert_eq!(reply.expect("the connection stays up").version(), STABLE);
    // The rollback swaps the table before it writes: the audit line may follow.
    eventually("the rollback audited", || {
        audit_lines(&audit)
            .last()
            .is_some_and(|last| last["action"] == "rollback")
    })
    .await;
    let last = audit_lines(&audit).pop().expect("an audit line");
    assert_eq!(
        (&last["action"], &last["source"]),
        (&"rollback".into(), &"signal".into()),
        "{last}"
    );
    process
        .log_line(&["rolled back", "source=signal", "SIGUSR1 received"])
        .await;

    // The latch holds as for an API rollback; a second signal changes
    // nothing, and says so.
    let generation = state["generation"].clone();
    process.signal("USR1");
    process.log_line(&["SIGUSR1: nothing to roll back"]).await;
    let refused = admin
        .call(
            http::Method::PUT,
            "/admin/weight",
            serde_json::json!({"weight": 50}),
        )
        .await;
    assert_eq!(refused.status, 409, "{refused:?}");
    assert_eq!(admin.state().await["generation"], generation);
    assert_eq!(process.stop().await, Some(0));
}

/// Every change of the live state is a line in the process log, as it is in
/// the audit log; a rollback, whoever makes it, a warning that names its
/// source and reason, and one only when it ends a rollout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_logged_and_a_rollback_warns_with_its_source_and_reason() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let (path, _) = write_config(&config(&[stable.addr], Some((&[canary.addr], 50.0)), ""));
    let process = Process::serve(&path, &[]).await;
    let admin = AdminApi::new(process.admin);

    let moved = admin
        .call(
            Method::PUT,
            "/admin/weight",
            serde_json::json!({"weight": 20}),
        )
        .await;
    assert_eq!(moved.status, 200, "{moved:?}");
    let line = process
        .log_line(&["live state changed", "action=weight", "source=api"])
        .await;
    assert!(
        line.contains("INFO") && line.contains("weight=20"),
        "{line}"
    );

    let plan = serde_json::json!({"stages": [{"weight": 30, "duration": "1h"}]});
    let started = admin.call(Method::POST, "/admin/rollout", plan).await;
    assert_eq!(started.status, 200, "{started:?}");
    process
        .log_line(&["live state changed", "action=rollout_start", "source=api"])
        .await;
    let reason = "bad answers in #support";
    let rolled_back = admin
        .call(
            Method::POST,
            "/admin/rollback",
            serde_json::json!({"reason": reason}),
        )
        .await;
    assert_eq!(rolled_back.status, 200, "{rolled_back:?}");
    let line = process
        .log_line(&["rolled back", "action=rollback", "source=api"])
        .await;
    assert!(line.contains("WARN") && line.contains(reason), "{line}");
    // The rollout it ended says so, but is not a second rollback.
    process
        .log_line(&["live state changed", "action=rollout_end"])
        .await;
    let rollbacks = process
        .log()
        .into_iter()
        .filter(|l| l.contains("WARN") && l.contains("rolled back"))
        .count();
    assert_eq!(rollbacks, 1, "{:#?}", process.log());
    assert_eq!(process.stop().await, Some(0));
}

/// A drain may last as long as the longest stream: a rollback signalled
/// meanwhile still happens, and is what the next start serves; a second
/// SIGTERM ends the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_during_the_drain_rolls_back_and_a_second_sigterm_exits() {
    let stable = SlowBackend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let text = config(&[stable.addr], Some((&[canary.addr], 50.0)), "").replacen(
        "drain_timeout = \"10s\"",
        "drain_timeout = \"1h\"",
        1,
    );
    let (path, audit) = write_config(&text);
    let process = Process::serve(&path, &[]).await;
    // bob is on stable at 50% (SPEC vector); the upstream holds his request.
    let proxy = process.proxy;
    let held =
        tokio::spawn(async move { Http::new(proxy).get("/slow", &[("x-user-id", "bob")]).await });
    eventually("bob's request reaching the upstream", || stable.hits() == 1).await;

    process.signal("TERM");
    process.log_line(&["shutting down"]).await;
    process.signal("USR1");
    process
        .log_line(&["rolled back", "source=signal", "SIGUSR1 received"])
        .await;
    eventually("the rollback audited", || {
        audit_lines(&audit)
            .last()
            .is_some_and(|last| last["action"] == "rollback" && last["source"] == "signal")
    })
    .await;
    assert!(!held.is_finished(), "the drain waits on bob's request");

    assert_eq!(process.stop().await, Some(0), "the second SIGTERM exits");
    held.abort();
    let restarted = Process::serve(&path, &[]).await;
    let state = AdminApi::new(restarted.admin).state().await;
    assert_eq!(state["status"], "rolled_back", "{state}");
    assert_eq!(state["canary"]["weight"], 0.0, "{state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_an_edited_config_to_the_next_request_on_an_open_connection() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let text = config(
        &[stable.addr],
        Some((&[canary.addr], 50.0)),
        "[routing]\nfallback = \"cookie\"\n",
    );
    let (path, _) = write_config(&text);
    let process = Process::serve(&path, &[]).await;
    let admin = AdminApi::new(process.admin);
    let before = admin.state().await;
    let mut connection = KeepAlive::connect(process.proxy).await;
    // bob is on stable at 50% (SPEC vector); no override header is configured yet.
    let bob = [("x-user-id", "bob"), ("x-cohort", "canary")];
    let reply = connection.get("/", &bob).await.expect("a response");
    assert_eq!(reply.version(), STABLE);
    assert!(reply.headers.get("x-served-by").is_none());

    let edited = text.replacen(
        "[routing]\n",
        "[routing]\nversion_header = \"x-served-by\"\noverride_header = \"x-cohort\"\n",
        1,
    );
    assert_ne!(edited, text);
    std::fs::write(&path, edited).expect("edit the config");
    process.signal("HUP");

    // Poll on the same connection: it must stay up through the reload.
    let mut reply = None;
    within("the reloaded config to apply", async {
        loop {
            let next = connection
                .get("/", &bob)
                .await
                .expect("the keep-alive connection survives the reload");
            if next.headers.contains_key("x-served-by") {
                reply = Some(next);
                return;
            }
            assert_eq!(next.version(), STABLE, "{next:?}");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
    let reply = reply.expect("set above");
    assert_eq!(reply.headers["x-served-by"], CANARY, "{reply:?}");
    assert!(!reply.headers.contains_key("x-agent-version"), "{reply:?}");
    assert_eq!(
        reply.backend(),
        CANARY,
        "the override header forced the canary"
    );
    assert!(!connection.is_closed());

    // [versions] did not change, so the live state stays as it was.
    let after = admin.state().await;
    assert_eq!(after["generation"], before["generation"], "{after}");
    assert_eq!(after["canary"], before["canary"], "{after}");
    assert_eq!(process.stop().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_an_invalid_config_keeps_the_old_one() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let text = config(
        &[stable.addr],
        Some((&[canary.addr], 50.0)),
        "[routing]\nfallback = \"cookie\"\n",
    );
    let (path, _) = write_config(&text);
    let process = Process::serve(&path, &[]).await;
    let admin = AdminApi::new(process.admin);
    let before = admin.state().await;
    let mut connection = KeepAlive::connect(process.proxy).await;

    // A bad value next to a good change: nothing of it may apply.
    let invalid = text.replacen(
        "[routing]\nfallback = \"cookie\"\n",
        "[routing]\nfallback = \"sometimes\"\nversion_header = \"x-served-by\"\n",
        1,
    );
    std::fs::write(&path, &invalid).expect("break the config");
    process.signal("HUP");
    let line = process
        .log_line(&["config reload refused", "routing.fallback"])
        .await;
    assert!(line.contains("sometimes"), "{line}");

    // And a file that is not TOML at all: the log says what `cohort check`
    // does, on one line, with the place of the mistake.
    std::fs::write(&path, "[routing\nthis is not toml").expect("break the config");
    let checked = std::process::Command::new(COHORT_BIN)
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run cohort check");
    let checked = String::from_utf8_lossy(&checked.stderr);
    let checked = checked
        .strip_prefix("cohort: ")
        .and_then(|c| c.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("one line from cohort check: {checked:?}"));
    assert!(checked.ends_with("(line 1, column 9)"), "{checked}");
    process.signal("HUP");
    process
        .log_line(&["config reload refused", &format!("problem=\"{checked}\"")])
        .await;

    // Still serving, with the old config, on the same connection.
    for key in ["alice", "bob"] {
        let reply = connection
            .get("/", &[("x-user-id", key)])
            .await
            .expect("the connection stays up");
        assert_eq!(reply.status, 200, "{reply:?}");
        assert!(reply.headers.contains_key("x-agent-version"), "{reply:?}");
        assert!(!reply.headers.contains_key("x-served-by"), "{reply:?}");
    }
    assert_eq!(admin.state().await, before);
    assert_eq!(process.stop().await, Some(0));
}

/// A reload is applied or refused whole: a new `listen.addr` that cannot
/// be bound refuses it before the edited `[versions]` next to it re-seeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_to_an_address_that_cannot_be_bound_changes_nothing() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let text = config(&[stable.addr], Some((&[canary.addr], 50.0)), "");
    let (path, _) = write_config(&text);
    let process = Process::serve(&path, &[]).await;
    let admin = AdminApi::new(process.admin);
    let before = admin.state().await;

    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let edited = text
        .replacen(
            "addr = \"127.0.0.1:0\"",
            &format!("addr = \"{}\"", taken.local_addr().expect("its address")),
            1,
        )
        .replacen("weight = 50\n", "weight = 20\n", 1);
    assert_ne!(edited, text);
    std::fs::write(&path, edited).expect("edit the config");
    process.signal("HUP");
    process
        .log_line(&["config reload refused", "listen.addr"])
        .await;
    assert_eq!(admin.state().await, before);
    let reply = Http::new(process.proxy).get("/", &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(process.stop().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_moves_the_listener_and_lets_requests_in_flight_finish() {
    let slow = SlowBackend::start(STABLE).await;
    let text = config(
        &[slow.addr],
        None,
        "[upstream]\nresponse_timeout = \"60s\"\n",
    );
    let (path, _) = write_config(&text);
    let process = Process::serve(&path, &[]).await;
    let old = process.proxy;

    // A request in flight on the first listener, held by the backend.
    let in_flight = tokio::spawn(async move { Http::new(old).get("/", &[]).await });
    eventually_async("the held request to reach the backend", || async {
        slow.hits() == 1
    })
    .await;

    // Move the listener and change an upstream timeout.
    let new = free_port();
    let edited = text
        .replacen("addr = \"127.0.0.1:0\"", &format!("addr = \"{new}\""), 1)
        .replacen(
            "response_timeout = \"60s\"",
            "response_timeout = \"30s\"",
            1,
        );
    assert_ne!(edited, text);
    std::fs::write(&path, edited).expect("edit the config");
    process.signal("HUP");
    process.log_line(&["proxy workers restarted"]).await;

    // New connections are served on the new address...
    slow.release();
    let reply = within("the new listener to answer", Http::new(new).get("/", &[])).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.version(), STABLE);
    // ...and the request that was in flight on the old one finishes there.
    let held = in_flight.await.expect("the in-flight request's task");
    assert_eq!(held.status, 200, "{held:?}");
    // The old listener is closed once its workers have drained.
    eventually_async("the old address to refuse connections", || async {
        tokio::net::TcpStream::connect(old).await.is_err()
    })
    .await;
    assert_eq!(process.stop().await, Some(0));
}

/// A stream that outlasts `listen.drain_timeout` on workers a SIGHUP
/// replaced is cut, and its connection leaves `cohort_client_connections`
/// (the gauge of this process alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_at_the_drain_leaves_the_connection_gauge() {
    let ticker = SseTicker::start(STABLE).await;
    let text = config(&[ticker.addr], None, "[upstream]\nidle_timeout = \"90s\"\n").replacen(
        "drain_timeout = \"10s\"",
        "drain_timeout = \"300ms\"",
        1,
    );
    let (path, _) = write_config(&text);
    let process = Process::serve(&path, &[]).await;
    let admin = AdminApi::new(process.admin);
    let open = || async {
        let metrics = admin.raw(Method::GET, "/metrics", "").await;
        String::from_utf8_lossy(&metrics.body)
            .lines()
            .find_map(|line| line.strip_prefix("cohort_client_connections "))
            .and_then(|value| value.trim().parse::<f64>().ok())
    };

    let mut stream = Http::new(process.proxy)
        .get_streaming("/events", &[])
        .await
        .into_body();
    read_until(&mut stream, SseTicker::READY)
        .await
        .expect("the stream opens");
    assert_eq!(open().await, Some(1.0));

    // New pool settings: new workers; the old ones drain for 300ms, then go.
    std::fs::write(&path, text.replacen("\"90s\"", "\"7s\"", 1)).expect("edit the config");
    process.signal("HUP");
    process.log_line(&["drain timeout reached"]).await;
    eventually_async("the cut stream to leave the gauge", || async {
        open().await == Some(0.0)
    })
    .await;
    assert_eq!(process.stop().await, Some(0));
}

/// Fewer workers after a SIGHUP close no listening socket: a socket that
/// closed would reset the connections the kernel had queued on it, so the
/// remaining worker serves both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fewer_workers_after_sighup_keep_every_listening_socket() {
    let stable = Backend::start(STABLE).await;
    let text = support::with_listen_keys(&config(&[stable.addr], None, ""), "workers = 2");
    let (path, _) = write_config(&text);
    let process = Process::serve(&path, &[]).await;
    let port = process.proxy.port();
    // Listening sockets on the proxy's port (state 0A in /proc/net/tcp).
    let listening = || {
        let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
        let local = format!("0100007F:{port:04X}");
        table
            .lines()
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A")
            })
            .count()
    };
    let workers = || {
        std::fs::read_dir(format!("/proc/{}/task", process.pid()))
            .expect("the process's threads")
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with("cohort-proxy-"))
            .count()
    };
    assert_eq!((listening(), workers()), (2, 2));

    std::fs::write(&path, text.replacen("workers = 2", "workers = 1", 1)).expect("edit the config");
    process.signal("HUP");
    process.log_line(&["proxy workers restarted"]).await;
    eventually_async("the old workers to finish", || async { workers() == 1 }).await;
    assert_eq!(
        listening(),
        2,
        "a listening socket closed with the old workers"
    );
    for i in 0..8 {
        let reply = within("an answer", Http::new(process.proxy).get("/", &[])).await;
        assert_eq!(reply.status, 200, "request {i}: {reply:?}");
    }
    assert_eq!(process.stop().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_new_canary_starts_the_configured_rollout() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let plan = "[rollout]\ninterval = \"1h\"\nstages = [ { weight = 5, duration = \"1h\" } ]\n";
    let text = config(&[stable.addr], Some((&[canary.addr], 30.0)), plan);
    let (path, audit) = write_config(&text);
    let process = Process::serve(&path, &[]).await;
    let admin = AdminApi::new(process.admin);
    assert_eq!(admin.state().await["rollout"]["canary"], CANARY);

    // The next release in the config: its rollout starts at the plan's
    // first stage, not at the config's weight.
    let edited = text.replacen(&format!("name = \"{CANARY}\""), "name = \"v3\"", 1);
    assert_ne!(edited, text);
    std::fs::write(&path, edited).expect("edit the config");
    process.signal("HUP");
    eventually_async("the new canary's rollout", || async {
        admin.state().await["rollout"]["canary"] == "v3"
    })
    .await;
    let state = admin.state().await;
    assert_eq!(state["canary"]["name"], "v3", "{state}");
    assert_eq!(state["canary"]["weight"], 5.0, "{state}");
    assert_eq!(state["status"], "progressing", "{state}");
    let started = audit_lines(&audit)
        .into_iter()
        .rfind(|l| l["action"] == "rollout_start")
        .expect("an audit line for the start");
    assert_eq!(started["source"], "signal", "{started}");
    // The re-seed that installed it is in the process log too.
    let line = process
        .log_line(&["live state changed", "action=reseed", "source=signal"])
        .await;
    assert!(line.contains("canary=v3"), "{line}");
    assert_eq!(process.stop().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_admin_token_and_applies_metrics_auth() {
    let stable = Backend::start(STABLE).await;
    let text = config(&[stable.addr], None, "");
    let (path, _) = write_config(&text);
    let token_file = path.with_file_name("token");
    std::fs::write(&token_file, "first-token\n").expect("write the token");
    let admin_section = "[admin]\naddr = \"127.0.0.1:0\"\n";
    assert!(text.contains(admin_section), "{text}");
    let with_token = |metrics_auth: bool, admin_addr: &str| {
        text.replacen(
            admin_section,
            &format!(
                "[admin]\naddr = \"{admin_addr}\"\ntoken_file = {token_file:?}\nmetrics_auth = {metrics_auth}\n"
            ),
            1,
        )
    };
    std::fs::write(&path, with_token(false, "127.0.0.1:0")).expect("write the config");
    let process = Process::serve(&path, &[]).await;
    let state = |token: &'static str| {
        let admin = AdminApi::with_token(process.admin, token);
        async move { admin.raw(Method::GET, "/admin/state", "").await.status }
    };
    let metrics = || async { Http::new(process.admin).get("/metrics", &[]).await.status };
    assert_eq!(state("first-token").await, 200);
    assert_eq!(metrics().await, 200);

    // A rotated token and metrics behind it, on SIGHUP.
    std::fs::write(&token_file, "second-token\n").expect("rotate the token");
    std::fs::write(&path, with_token(true, "127.0.0.1:0")).expect("edit the config");
    process.signal("HUP");
    eventually_async("the new token to apply", || async {
        state("second-token").await == 200
    })
    .await;
    assert_eq!(state("first-token").await, 401);
    assert_eq!(metrics().await, 401);

    // A token file that cannot be read refuses the reload: the token stays.
    std::fs::remove_file(&token_file).expect("remove the token");
    std::fs::write(&path, with_token(false, "127.0.0.1:0")).expect("edit the config");
    process.signal("HUP");
    process
        .log_line(&["config reload refused", "admin.token_file"])
        .await;
    assert_eq!(state("second-token").await, 200);
    assert_eq!(metrics().await, 401);

    // A moved admin listener takes a restart, and the log says so.
    std::fs::write(&token_file, "second-token\n").expect("restore the token");
    std::fs::write(&path, with_token(true, "127.0.0.2:0")).expect("edit the config");
    process.signal("HUP");
    process
        .log_line(&["applied only on a restart", "admin.addr"])
        .await;
    assert_eq!(state("second-token").await, 200);
    assert_eq!(process.stop().await, Some(0));
}

/// A loopback port nothing listens on right now.
fn free_port() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address")
}

/// A client accepted while every `listen.max_connections` slot is busy,
/// and held for one, is served by its workers when a SIGHUP replaces
/// them, not dropped unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_held_for_a_slot_is_served_across_a_sighup_worker_restart() {
    let slow = SlowBackend::start(STABLE).await;
    let text = with_listen_keys(
        &config(
            &[slow.addr],
            None,
            "[upstream]\nresponse_timeout = \"60s\"\n",
        ),
        "workers = 1\nmax_connections = 1\nkeepalive_timeout = \"60s\"\n",
    );
    let (path, _) = write_config(&text);
    let process = Process::serve(&path, &[]).await;
    let proxy = process.proxy;
    let busy = tokio::spawn(async move { Http::new(proxy).get("/", &[]).await });
    eventually_async("the busy request to reach the backend", || async {
        slow.hits() == 1
    })
    .await;
    let held = tokio::spawn(async move { Http::new(proxy).get("/", &[]).await });
    process.log_line(&["a new client waits for a slot"]).await;

    let edited = text.replacen(
        "keepalive_timeout = \"60s\"",
        "keepalive_timeout = \"61s\"",
        1,
    );
    std::fs::write(&path, edited).expect("edit the config");
    process.signal("HUP");
    process.log_line(&["proxy workers restarted"]).await;
    slow.release();
    for (what, task) in [("busy", busy), ("held", held)] {
        let reply = within(what, task).await.expect("the request's task");
        assert_eq!(reply.status, 200, "{what}: {reply:?}");
    }
    assert_eq!(process.stop().await, Some(0));
}

/// A SIGHUP whose `[versions]` edit is of versions the live state has moved
/// past (its canary promoted) changes nothing, and says so: no new
/// generation, no `reseed` audit line. The next start restores the state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_editing_versions_the_state_moved_past_changes_nothing() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let text = config(&[stable.addr], Some((&[canary.addr], 50.0)), "");
    let (path, audit) = write_config(&text);
    let process = Process::serve(&path, &[]).await;
    let admin = AdminApi::new(process.admin);
    admin.promote().await;
    let before = admin.state().await;
    assert_eq!(before["stable"]["name"], CANARY, "{before}");
    let lines = audit_lines(&audit).len();

    // The config still names the promoted canary, now at 20%.
    std::fs::write(&path, text.replacen("weight = 50", "weight = 20", 1)).expect("edit");
    process.signal("HUP");
    process.log_line(&["nothing re-seeded", "moved past"]).await;
    let after = admin.state().await;
    assert_eq!(after, before);
    assert_eq!(audit_lines(&audit).len(), lines);

    // An edit of the same kind with a new salt: users are placed anew, and
    // the log and the audit log say so.
    let salted = text.replacen("weight = 50", "weight = 30", 1).replacen(
        "[versions.stable]",
        "[routing]\nsalt = \"brand-new\"\n\n[versions.stable]",
        1,
    );
    std::fs::write(&path, salted).expect("edit");
    process.signal("HUP");
    process.log_line(&["routing changed", "brand-new"]).await;
    let last = audit_lines(&audit).pop().expect("an audit line");
    assert_eq!(last["action"], "routing", "{last}");
    assert_eq!(admin.state().await["generation"], before["generation"]);
    let reply = Http::new(process.proxy)
        .get("/", &[("x-user-id", "alice")])
        .await;
    assert_eq!(reply.version(), CANARY);
    assert_eq!(process.stop().await, Some(0));

    // Seen: the next start restores the state rather than re-seed it.
    let process = Process::serve(&path, &[]).await;
    let admin = AdminApi::new(process.admin);
    assert_eq!(admin.state().await["generation"], before["generation"]);
    assert_eq!(
        audit_lines(&audit).last().expect("a line")["action"],
        "restore"
    );
    assert_eq!(process.stop().await, Some(0));
}
