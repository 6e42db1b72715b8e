//! `cohort ctl`, the binary, against a running proxy.
//!
//! Owns: every ctl command of SPEC section 6 (status, weight, weight
//! --force, rollback --reason, promote [--force], canary [--force], with
//! several upstreams after one `--upstream` or the option repeated) run as
//! a process: exit code 0 and the state printed readably on success (the
//! shadow, versions without an available upstream, and whether the last
//! rollback is in effect included), non-zero with the server's message on
//! a refusal, an unreachable admin API (with the cause), a missing or
//! unsendable token, a weight JSON cannot carry, an https admin URL or one
//! that would go elsewhere (a port out of range, a query), a server that is not the admin API, or one that does not answer within
//! `--timeout`; where the token comes from (`--token`, `--token-file` and
//! their variables); and that each command's effect shows in
//! `GET /admin/state`. Does not own: the admin API's own error paths
//! (`control_api`), rollouts.

mod support;

use std::net::SocketAddr;
use std::process::Output;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use support::{
    AdminApi, Backend, CANARY, COHORT_BIN, Http, STABLE, TunedBackend, Tuning, cohort, config,
    dead_addr, eventually_async, raw_upstream, scratch_dir, start_cohort, within,
};

const TOKEN: &str = "ctl-token";

/// `cohort ctl --admin http://<admin>`, with none of ctl's variables
/// inherited from the environment the tests run in.
fn ctl_command(admin: SocketAddr) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(COHORT_BIN);
    command
        .arg("ctl")
        .arg("--admin")
        .arg(format!("http://{admin}"))
        .env_remove("COHORT_ADMIN")
        .env_remove("COHORT_ADMIN_TOKEN")
        .env_remove("COHORT_ADMIN_TOKEN_FILE")
        .env_remove("COHORT_CTL_TIMEOUT")
        .kill_on_drop(true);
    command
}

/// Runs `command` to completion, failing the test after the deadline.
async fn run(mut command: tokio::process::Command, what: &str) -> Output {
    within(what, command.output())
        .await
        .expect("run cohort ctl")
}

/// Runs `cohort ctl --admin http://<admin> [--token T] <args>`.
async fn ctl(admin: SocketAddr, token: Option<&str>, args: &[&str]) -> Output {
    let mut command = ctl_command(admin);
    if let Some(token) = token {
        command.arg("--token").arg(token);
    }
    command.args(args);
    run(command, &format!("cohort ctl {args:?}")).await
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts success and returns stdout.
fn ok(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what}: {:?}\nstdout: {}\nstderr: {}",
        output.status,
        stdout(output),
        stderr(output)
    );
    stdout(output)
}

/// Asserts failure and returns stderr.
fn refused(output: &Output, what: &str) -> String {
    assert!(
        !output.status.success(),
        "{what} succeeded:\n{}",
        stdout(output)
    );
    assert_ne!(output.status.code(), None, "{what} died by a signal");
    stderr(output)
}

/// The printed line that starts with `label`.
fn line<'a>(printed: &'a str, label: &str) -> &'a str {
    printed
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{printed}"))
}

/// `toml` with [`TOKEN`] as the admin token, from an `admin.token_file`.
fn with_token(toml: &str) -> String {
    let token_file = scratch_dir().join("admin.token");
    std::fs::write(&token_file, TOKEN).expect("write the token file");
    let admin_section = "[admin]\naddr = \"127.0.0.1:0\"\n";
    assert!(toml.contains(admin_section), "{toml}");
    toml.replacen(
        admin_section,
        &format!("{admin_section}token_file = {token_file:?}\n"),
        1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ctl_command_drives_a_running_proxy() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let next = Backend::start("v3").await;
    let server = start_cohort(&with_token(&config(
        &[stable.addr],
        Some((&[canary.addr], 10.0)),
        "",
    )))
    .await;
    let addr = server.admin_addr();
    let api = AdminApi::with_token(addr, TOKEN);
    let token = Some(TOKEN);

    // status
    let printed = ok(&ctl(addr, token, &["status"]).await, "status");
    assert!(line(&printed, "status").contains("steady"), "{printed}");
    assert!(
        line(&printed, "status").contains("generation 1"),
        "{printed}"
    );
    let stable_line = line(&printed, "stable");
    assert!(
        stable_line.contains(STABLE) && stable_line.contains(&stable.addr.to_string()),
        "{printed}"
    );
    let canary_line = line(&printed, "canary");
    assert!(
        canary_line.contains(CANARY) && canary_line.contains("weight 10"),
        "{printed}"
    );

    // weight
    let printed = ok(&ctl(addr, token, &["weight", "30"]).await, "weight 30");
    assert!(line(&printed, "canary").contains("weight 30"), "{printed}");
    assert_eq!(api.state().await["canary"]["weight"], 30.0);

    // rollback --reason
    let printed = ok(
        &ctl(addr, token, &["rollback", "--reason", "p95 too high"]).await,
        "rollback",
    );
    assert!(
        line(&printed, "status").contains("rolled_back"),
        "{printed}"
    );
    let rollback_line = line(&printed, "rollback");
    assert!(
        rollback_line.contains("p95 too high") && rollback_line.contains("api"),
        "{printed}"
    );
    let state = api.state().await;
    assert_eq!(state["last_rollback"]["reason"], "p95 too high", "{state}");
    assert_eq!(state["canary"]["weight"], 0.0, "{state}");

    // A refusal: non-zero, with the status and the server's own message.
    let message = refused(&ctl(addr, token, &["weight", "40"]).await, "weight 40");
    assert!(message.contains("409"), "{message}");
    assert!(
        message.contains("rolled back") && message.contains("force"),
        "{message}"
    );
    assert_eq!(api.state().await["canary"]["weight"], 0.0);

    // weight --force
    let printed = ok(
        &ctl(addr, token, &["weight", "40", "--force"]).await,
        "weight --force",
    );
    assert!(line(&printed, "status").contains("steady"), "{printed}");
    assert!(line(&printed, "canary").contains("weight 40"), "{printed}");

    // promote
    let printed = ok(&ctl(addr, token, &["promote"]).await, "promote");
    assert!(line(&printed, "stable").contains(CANARY), "{printed}");
    assert!(line(&printed, "canary").contains("none"), "{printed}");
    assert_eq!(api.state().await["stable"]["name"], CANARY);
    let reply = Http::new(server.proxy_addr())
        .get("/", &[("x-user-id", "anyone")])
        .await;
    assert_eq!(reply.version(), CANARY);
    let message = refused(&ctl(addr, token, &["promote"]).await, "promote again");
    assert!(
        message.contains("409") && message.contains("no canary"),
        "{message}"
    );

    // canary --name --upstream --weight
    let upstream = next.addr.to_string();
    let printed = ok(
        &ctl(
            addr,
            token,
            &[
                "canary",
                "--name",
                "v3",
                "--upstream",
                &upstream,
                "--weight",
                "15",
            ],
        )
        .await,
        "canary",
    );
    let canary_line = line(&printed, "canary");
    assert!(
        canary_line.contains("v3")
            && canary_line.contains(&upstream)
            && canary_line.contains("weight 15"),
        "{printed}"
    );
    let state = api.state().await;
    assert_eq!(state["canary"]["name"], "v3", "{state}");
    assert_eq!(state["canary"]["weight"], 15.0, "{state}");
    assert_eq!(state["canary"]["upstreams"][0], upstream, "{state}");
    // A value out of range is the server's 422, reported as such.
    let message = refused(
        &ctl(
            addr,
            token,
            &[
                "canary",
                "--name",
                "v4",
                "--upstream",
                &upstream,
                "--weight",
                "101",
            ],
        )
        .await,
        "canary at 101%",
    );
    assert!(
        message.contains("422") && message.contains("weight"),
        "{message}"
    );

    // The rolled-back v3, installed again: latched, unless --force.
    ok(&ctl(addr, token, &["rollback"]).await, "rollback v3");
    let again = [
        "canary",
        "--name",
        "v3",
        "--upstream",
        &upstream,
        "--weight",
        "20",
    ];
    let message = refused(&ctl(addr, token, &again).await, "canary v3 again");
    assert!(
        message.contains("409") && message.contains("force"),
        "{message}"
    );
    let forced = [&again[..], &["--force"]].concat();
    let printed = ok(&ctl(addr, token, &forced).await, "canary v3 --force");
    assert!(line(&printed, "canary").contains("weight 20"), "{printed}");
    // promote --force sends the flag (v3's upstream is healthy, so either passes).
    let printed = ok(
        &ctl(addr, token, &["promote", "--force"]).await,
        "promote --force",
    );
    assert!(line(&printed, "stable").contains("v3"), "{printed}");

    // No token, a wrong token: the server's 401.
    for token in [None, Some("not-the-token")] {
        let message = refused(
            &ctl(addr, token, &["status"]).await,
            "status without the token",
        );
        assert!(message.contains("401"), "{message}");
        assert!(message.contains("Authorization"), "{message}");
    }
}

/// What went wrong is in the message: the cause of a failed connection, and
/// a token that cannot be sent told apart from a bad URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_say_what_went_wrong() {
    // Nobody there: the address, and why it could not be reached.
    let nowhere = dead_addr().await;
    let message = refused(
        &ctl(nowhere, Some(TOKEN), &["status"]).await,
        "status of nothing",
    );
    assert!(
        message.contains("cannot reach") && message.contains(&nowhere.to_string()),
        "{message}"
    );
    assert!(
        message.to_lowercase().contains("connection refused"),
        "{message}"
    );

    // A token with a newline cannot go in a header; the URL is fine.
    let server = cohort(&[dead_addr().await], None, "").await;
    let message = refused(
        &ctl(server.admin_addr(), Some("ctl\ntoken"), &["status"]).await,
        "status with a token holding a newline",
    );
    assert!(
        message.contains("token") && !message.contains("not a URL"),
        "{message}"
    );

    // Nor can a letter outside ASCII be matched by the admin listener,
    // which reads the header as ASCII: refused here, not answered 401.
    let message = refused(
        &ctl(server.admin_addr(), Some("t\u{f6}ken"), &["status"]).await,
        "status with a token outside ASCII",
    );
    assert!(
        message.contains("token") && message.contains("cannot be sent in an HTTP header"),
        "{message}"
    );
    assert!(!message.contains("401"), "{message}");
}

/// An https admin URL is refused for what it is: the admin listener speaks
/// plain HTTP, not a URL ctl cannot read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_admin_url_is_refused_as_unsupported() {
    let addr = dead_addr().await;
    for url in [format!("https://{addr}"), format!("HTTPS://{addr}/")] {
        let mut command = tokio::process::Command::new(COHORT_BIN);
        command
            .args(["ctl", "--admin", &url, "status"])
            .env_remove("COHORT_ADMIN")
            .env_remove("COHORT_ADMIN_TOKEN")
            .env_remove("COHORT_ADMIN_TOKEN_FILE")
            .env_remove("COHORT_CTL_TIMEOUT")
            .kill_on_drop(true);
        let message = refused(&run(command, "status over https").await, &url);
        assert!(
            message.contains(&url)
                && message.contains("https admin URLs are not supported")
                && message.contains("plain HTTP")
                && message.contains("SSH tunnel"),
            "{message}"
        );
        assert!(!message.contains("not a URL"), "{message}");
    }
}

/// An admin URL ctl would send somewhere else than it says is refused
/// before any call: a port that is not a `u16` (a client would use port 80
/// instead, token and all), and a query, fragment or user info that the
/// call's path would be appended to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_url_that_would_go_elsewhere_is_refused_before_any_call() {
    for (url, expected) in [
        (
            "http://127.0.0.1:99011",
            "cannot be used: port 99011 is out of range (1 to 65535)",
        ),
        (
            "http://127.0.0.1:0/",
            "cannot be used: port 0 cannot be connected to",
        ),
        (
            "http://127.0.0.1:9901/?x",
            "has a query, a fragment or user info",
        ),
        (
            "http://127.0.0.1:9901#x",
            "has a query, a fragment or user info",
        ),
        (
            "http://u:p@127.0.0.1:9901",
            "has a query, a fragment or user info",
        ),
    ] {
        let mut command = tokio::process::Command::new(COHORT_BIN);
        command
            .args(["ctl", "--admin", url, "--token", TOKEN, "rollback"])
            .env_remove("COHORT_ADMIN")
            .env_remove("COHORT_ADMIN_TOKEN")
            .env_remove("COHORT_ADMIN_TOKEN_FILE")
            .env_remove("COHORT_CTL_TIMEOUT")
            .kill_on_drop(true);
        let message = refused(&run(command, url).await, url);
        assert!(
            message.contains(&format!("the admin URL {url:?}")) && message.contains(expected),
            "{url}: {message}"
        );
        assert!(!message.contains("cannot reach"), "{url}: {message}");
    }
}

/// A bad admin URL or timeout from the environment is refused naming the
/// variable, not only the option it stands in for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_value_from_the_environment_names_its_variable() {
    for (variable, value) in [
        ("COHORT_ADMIN", "127.0.0.1:9901"),
        ("COHORT_CTL_TIMEOUT", "abc"),
    ] {
        let mut command = tokio::process::Command::new(COHORT_BIN);
        command
            .args(["ctl", "status"])
            .env_remove("COHORT_ADMIN")
            .env_remove("COHORT_ADMIN_TOKEN")
            .env_remove("COHORT_ADMIN_TOKEN_FILE")
            .env_remove("COHORT_CTL_TIMEOUT")
            .env(variable, value)
            .kill_on_drop(true);
        let message = refused(&run(command, variable).await, variable);
        assert!(
            message.contains(variable) && message.contains(value),
            "{message}"
        );
    }
}

/// A weight JSON cannot carry (NaN, infinity) is refused before any call,
/// naming the argument, as `cohort route --weight` does: sent, it would be
/// `null`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_json_cannot_carry_is_refused_before_any_call() {
    let dead = dead_addr().await;
    let server = start_cohort(&with_token(&config(&[dead], Some((&[dead], 10.0)), ""))).await;
    let addr = server.admin_addr();
    let token = Some(TOKEN);
    for (args, expected) in [
        (
            &["weight", "NaN"][..],
            "<WEIGHT>: NaN is not within 0..=100",
        ),
        (&["weight", "inf"], "<WEIGHT>: inf is not within 0..=100"),
        (
            &["weight", "infinity", "--force"],
            "<WEIGHT>: inf is not within 0..=100",
        ),
        (
            &[
                "canary",
                "--name",
                "v3",
                "--upstream",
                "127.0.0.1:1",
                "--weight",
                "NaN",
            ],
            "--weight: NaN is not within 0..=100",
        ),
    ] {
        let message = refused(&ctl(addr, token, args).await, &format!("{args:?}"));
        assert_eq!(message, format!("cohort: {expected}\n"), "{args:?}");
    }
    let state = AdminApi::with_token(addr, TOKEN).state().await;
    assert_eq!(state["generation"], 1, "{state}");
    assert_eq!(state["canary"]["name"], CANARY, "{state}");
    assert_eq!(state["canary"]["weight"], 10.0, "{state}");
}

/// `canary --upstream` takes several addresses after one option, as SPEC
/// section 6 writes it, and the option repeated, or both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_takes_several_upstreams_after_one_option_or_repeated() {
    let dead = dead_addr().await;
    let server = start_cohort(&with_token(&config(&[dead], None, ""))).await;
    let addr = server.admin_addr();
    let api = AdminApi::with_token(addr, TOKEN);
    let (a, b, c) = ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3");
    for (name, args, expected) in [
        (
            "v3",
            &["--upstream", a, b, "--weight", "1"][..],
            &[a, b][..],
        ),
        ("v4", &["--upstream", a, "--upstream", b], &[a, b]),
        (
            "v5",
            &["--weight", "2", "--upstream", a, b, "--upstream", c],
            &[a, b, c],
        ),
    ] {
        let args = [&["canary", "--name", name][..], args].concat();
        let printed = ok(&ctl(addr, Some(TOKEN), &args).await, &format!("{args:?}"));
        let canary_line = line(&printed, "canary");
        assert!(
            canary_line.contains(name) && expected.iter().all(|u| canary_line.contains(u)),
            "{printed}"
        );
        let state = api.state().await;
        assert_eq!(state["canary"]["name"], name, "{state}");
        assert_eq!(
            state["canary"]["upstreams"],
            serde_json::json!(expected),
            "{state}"
        );
    }
}

/// `status` shows the shadow, marks each upstream that cannot take traffic
/// and says when a version has none that can, and tells a rollback in
/// effect on the live canary from one that is history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_shadow_health_and_whether_the_rollback_holds() {
    // Stable passes its probes but fails real requests, so one request ejects it.
    let failing = Tuning {
        fail_every: Some(1),
        ..Tuning::default()
    };
    let stable = TunedBackend::start(STABLE, failing).await;
    let (canary, shadow) = (dead_addr().await, dead_addr().await);
    let extra = format!(
        "[health]\ninterval = \"50ms\"\nunhealthy_threshold = 1\n\
         eject_after_errors = 1\neject_for = \"1h\"\n\n\
         [shadow]\nname = \"v9\"\nupstreams = [\"{shadow}\"]\npercent = 10\n"
    );
    let server = start_cohort(&with_token(&config(
        &[stable.addr],
        Some((&[canary], 30.0)),
        &extra,
    )))
    .await;
    let addr = server.admin_addr();
    let api = AdminApi::with_token(addr, TOKEN);

    // The canary has never passed a probe: at 30%, but serving no one.
    let printed = ok(&ctl(addr, Some(TOKEN), &["status"]).await, "status");
    assert!(
        line(&printed, "canary").contains(&format!("{canary} (not healthy)"))
            && line(&printed, "canary").contains("weight 30"),
        "{printed}"
    );
    assert!(
        printed.contains(&format!(
            "\n            no upstream of {CANARY} is available: its cohort is served by stable"
        )),
        "{printed}"
    );
    let shadow_line = line(&printed, "shadow");
    assert!(
        shadow_line.contains("v9")
            && shadow_line.contains(&shadow.to_string())
            && shadow_line.contains("percent 10"),
        "{printed}"
    );

    // One failed request ejects stable; the shadow fails its probes.
    let reply = Http::new(server.proxy_addr())
        .get("/", &[("x-user-id", "alice")])
        .await;
    assert_eq!(reply.status, 500, "{reply:?}");
    eventually_async("stable ejected and the shadow unhealthy", || {
        let api = api.clone();
        async move {
            let state = api.state().await;
            state["stable"]["health"][0]["ejected"] == true
                && state["shadow"]["health"][0]["healthy"] == false
        }
    })
    .await;
    let printed = ok(&ctl(addr, Some(TOKEN), &["status"]).await, "status");
    assert!(
        line(&printed, "stable").contains(&format!("{} (ejected)", stable.addr)),
        "{printed}"
    );
    assert!(
        printed.contains(&format!(
            "\n            no upstream of {STABLE} is available: the ejected ones are tried anyway\n"
        )),
        "{printed}"
    );
    assert!(
        line(&printed, "shadow").contains(&format!("{shadow} (not healthy)")),
        "{printed}"
    );
    assert!(
        printed.contains("\n            no upstream of v9 is available: no copies are sent\n"),
        "{printed}"
    );

    // A rollback in effect is the live canary's; after a new canary it is history.
    let printed = ok(
        &ctl(addr, Some(TOKEN), &["rollback", "--reason", "bad answers"]).await,
        "rollback",
    );
    let at = api.state().await["last_rollback"]["at"]
        .as_str()
        .expect("the rollback's time")
        .to_owned();
    assert_eq!(
        line(&printed, "rollback"),
        format!("rollback    {CANARY} rolled back at {at} by api: bad answers"),
        "{printed}"
    );
    let printed = ok(
        &ctl(
            addr,
            Some(TOKEN),
            &["canary", "--name", "v3", "--upstream", &canary.to_string()],
        )
        .await,
        "canary v3",
    );
    assert_eq!(
        line(&printed, "rollback"),
        format!("rollback    none in effect (the last one was at {at}, by api: bad answers)"),
        "{printed}"
    );
}

/// A 2xx reply that is not the admin API's state is a failure: `--admin`
/// aimed at the proxy reaches an upstream, which answers 200 to anything,
/// and nothing was rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_not_from_the_admin_api_is_a_failure() {
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let server = cohort(&[stable.addr], Some((&[canary.addr], 10.0)), "").await;
    let proxy = server.proxy_addr();

    // The proxy: the echo upstream's JSON, which holds no generation.
    for args in [&["rollback"][..], &["status"]] {
        let message = refused(&ctl(proxy, None, args).await, "ctl at the proxy");
        assert!(
            message.contains("not from a Cohort admin API")
                && message.contains(&format!("http://{proxy}"))
                && message.contains("--admin"),
            "{message}"
        );
    }
    assert!(
        stable.hits() + canary.hits() >= 2,
        "the calls went through the proxy"
    );
    let state = AdminApi::new(server.admin_addr()).state().await;
    assert_eq!(state["status"], "steady", "{state}");
    assert_eq!(state["canary"]["weight"], 10.0, "{state}");

    // A server that answers 200 with a body that is not JSON at all.
    let plain =
        raw_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello")
            .await;
    let message = refused(
        &ctl(plain, None, &["rollback"]).await,
        "ctl at a plain server",
    );
    assert!(
        message.contains("not from a Cohort admin API") && message.contains(&plain.to_string()),
        "{message}"
    );

    // A server that answers without end (a stream, a large download):
    // not read whole, and failed long before the timeout.
    let flood = flooding_server().await;
    let message = refused(
        &ctl(flood, None, &["--timeout", "1h", "status"]).await,
        "ctl at a server that answers without end",
    );
    assert!(message.contains("not from a Cohort admin API"), "{message}");

    // An error reply that is not the admin API's either: a proxy's own
    // (a 502 or 503 that names a version), and a bare 404.
    let unreachable = cohort(&[dead_addr().await], None, "").await;
    let not_found =
        raw_upstream(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await;
    for (server, status) in [
        (unreachable.proxy_addr(), None),
        (not_found, Some("(404 Not Found)")),
    ] {
        let message = refused(&ctl(server, None, &["status"]).await, "ctl at an error");
        assert!(
            message.contains("not from a Cohort admin API")
                && status.is_none_or(|status| message.contains(status)),
            "{message}"
        );
    }
}

/// A listener on a loopback port of its own, and its address.
async fn loopback_listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    (listener, addr)
}

/// A server that answers every connection with a 200 whose body never ends.
async fn flooding_server() -> SocketAddr {
    let (listener, addr) = loopback_listener().await;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let head = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n";
                let chunk = vec![b'x'; 64 * 1024];
                if stream.write_all(head).await.is_ok() {
                    while stream.write_all(&chunk).await.is_ok() {}
                }
            });
        }
    });
    addr
}

/// A server that accepts connections and never answers on them.
async fn silent_server() -> SocketAddr {
    let (listener, addr) = loopback_listener().await;
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    addr
}

/// A server that never answers fails the call after `--timeout` (or
/// `COHORT_CTL_TIMEOUT`), with a message naming the address and the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_admin_api_times_out() {
    let silent = silent_server().await;

    let message = refused(
        &ctl(silent, None, &["--timeout", "1s", "rollback"]).await,
        "rollback against a silent server",
    );
    assert!(
        message.contains(&format!("http://{silent}")) && message.contains("1s"),
        "{message}"
    );

    let mut command = ctl_command(silent);
    command.env("COHORT_CTL_TIMEOUT", "300ms").arg("status");
    let message = refused(
        &run(command, "status with COHORT_CTL_TIMEOUT").await,
        "status against a silent server",
    );
    assert!(
        message.contains(&silent.to_string()) && message.contains("300ms"),
        "{message}"
    );

    // No wait at all is not a timeout.
    let message = refused(
        &ctl(silent, None, &["--timeout", "0s", "status"]).await,
        "a zero timeout",
    );
    assert!(message.contains("--timeout"), "{message}");

    // The default, in the help.
    let mut command = ctl_command(silent);
    command.arg("--help");
    let help = ok(&run(command, "ctl --help").await, "ctl --help");
    assert!(
        help.contains("--timeout") && help.contains("[default: 10s]"),
        "{help}"
    );
}

/// The token can come from a file, as the server's `admin.token_file` does
/// (`--token-file` or `COHORT_ADMIN_TOKEN_FILE`, trimmed), or from
/// `COHORT_ADMIN_TOKEN`; an option on the command line wins over the other
/// source's variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_comes_from_a_file_or_the_environment() {
    let server = start_cohort(&with_token(&config(&[dead_addr().await], None, ""))).await;
    let admin = server.admin_addr();
    let dir = scratch_dir();
    let file = dir.join("ctl.token");
    std::fs::write(&file, format!("\n  {TOKEN} \n")).expect("write the token file");
    let file = file.to_str().expect("a UTF-8 scratch path");
    let empty = dir.join("empty.token");
    std::fs::write(&empty, " \n").expect("write the empty token file");
    let empty = empty.to_str().expect("a UTF-8 scratch path");
    let missing = dir.join("missing.token");
    let missing = missing.to_str().expect("a UTF-8 scratch path");

    let with = |env: &[(&str, &str)], args: &[&str]| {
        let mut command = ctl_command(admin);
        command.envs(env.iter().copied()).args(args).arg("status");
        run(command, "ctl status")
    };
    for (env, args) in [
        (&[][..], &["--token-file", file][..]),
        (&[("COHORT_ADMIN_TOKEN_FILE", file)], &[]),
        (&[("COHORT_ADMIN_TOKEN", TOKEN)], &[]),
        (&[("COHORT_ADMIN_TOKEN", "not-it")], &["--token-file", file]),
        (&[("COHORT_ADMIN_TOKEN_FILE", missing)], &["--token", TOKEN]),
    ] {
        let what = format!("status with {env:?} {args:?}");
        let printed = ok(&with(env, args).await, &what);
        assert!(
            line(&printed, "status").contains("steady"),
            "{what}: {printed}"
        );
    }

    // A file that cannot be read, or holds no token: an error naming it.
    for (env, args, path) in [
        (&[][..], &["--token-file", missing][..], missing),
        (&[][..], &["--token-file", empty], empty),
        (&[("COHORT_ADMIN_TOKEN_FILE", empty)], &[], empty),
    ] {
        let what = format!("status with {env:?} {args:?}");
        let message = refused(&with(env, args).await, &what);
        assert!(
            message.contains("token file") && message.contains(path),
            "{what}: {message}"
        );
    }

    // Two tokens: which one was meant is not clear.
    let message = refused(
        &with(&[], &["--token", TOKEN, "--token-file", file]).await,
        "--token and --token-file",
    );
    assert!(message.contains("cannot be used with"), "{message}");
    let message = refused(
        &with(
            &[
                ("COHORT_ADMIN_TOKEN", TOKEN),
                ("COHORT_ADMIN_TOKEN_FILE", file),
            ],
            &[],
        )
        .await,
        "both variables",
    );
    assert!(
        message.contains("COHORT_ADMIN_TOKEN and COHORT_ADMIN_TOKEN_FILE"),
        "{message}"
    );
}

/// ctl's options may follow the command as well as precede it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_may_follow_the_command() {
    let dead = dead_addr().await;
    let server = start_cohort(&with_token(&config(&[dead], Some((&[dead], 10.0)), ""))).await;
    let admin = format!("http://{}", server.admin_addr());

    let mut command = tokio::process::Command::new(COHORT_BIN);
    command
        .args(["ctl", "weight", "7", "--admin", &admin, "--token", TOKEN])
        .args(["--timeout", "5s"])
        .env_remove("COHORT_ADMIN")
        .env_remove("COHORT_ADMIN_TOKEN")
        .env_remove("COHORT_ADMIN_TOKEN_FILE")
        .env_remove("COHORT_CTL_TIMEOUT")
        .kill_on_drop(true);
    let printed = ok(&run(command, "ctl weight 7 --admin ...").await, "weight");
    assert!(line(&printed, "canary").contains("weight 7"), "{printed}");
    let state = AdminApi::with_token(server.admin_addr(), TOKEN)
        .state()
        .await;
    assert_eq!(state["canary"]["weight"], 7.0, "{state}");
}

/// `canary --upstream` takes several addresses and can be given again for
/// more; the usage shows the `...`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_help_says_upstream_repeats() {
    let mut command = ctl_command(dead_addr().await);
    command.args(["canary", "--help"]);
    let help = ok(
        &run(command, "ctl canary --help").await,
        "ctl canary --help",
    );
    let upstream = help
        .lines()
        .find(|l| l.trim_start().starts_with("--upstream"))
        .unwrap_or_else(|| panic!("no --upstream line in:\n{help}"));
    assert!(upstream.contains("repeat"), "{help}");
    let usage = line(&help, "Usage:");
    assert!(usage.contains("--upstream <ADDR>..."), "{help}");
}
