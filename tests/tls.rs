//! TLS termination (SPEC section 9): a TLS listener with ALPN, its
//! certificate reload, and real HTTP/2 clients over TLS.
//!
//! Owns: routing and tagging over TLS with HTTP/1.1 and HTTP/2 clients (by
//! ALPN), the `Secure` fallback cookie, `x-forwarded-proto: https`, reload
//! of the certificate while a stream runs on an old connection, a broken
//! pair refused with the old certificate still served, a SIGHUP whose
//! config is refused leaving the certificate as it was, plain HTTP sent to
//! the TLS listener, webhooks over TLS, and curl, nghttp and
//! h2load against the TLS listener. Certificates are made at test time.
//! Does not own: HTTP/2 without TLS and upstream protocols (`tests/http2.rs`).

mod support;
mod tls_support;

use http::{StatusCode, Version};
use http_body_util::BodyExt as _;
use support::{Backend, CANARY, STABLE, SseBackend, cohort, key_on, read_head, within};
use tls_support::{
    Pki, alpn, get, h1_over, h2_over, listen_tls, peer_cert, require, run, send_h1, send_h2,
    tls_client, tls_connect,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SALT: &str = "tls-tests";

fn routing() -> String {
    format!("[routing]\nsalt = \"{SALT}\"\n")
}

#[tokio::test]
async fn http1_and_http2_clients_are_routed_and_tagged_over_tls() {
    let pki = Pki::new();
    let leaf = pki.leaf("first");
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let extra = format!("{}\n{}", listen_tls(&leaf), routing());
    let server = cohort(&[stable.addr], Some((&[canary.addr], 50.0)), &extra).await;
    let addr = server.proxy_addr();
    let on_canary = key_on(SALT, 50.0, CANARY, "tls");
    let on_stable = key_on(SALT, 50.0, STABLE, "tls");

    // HTTP/1.1, chosen by ALPN.
    let stream = tls_connect(addr, &tls_client(&pki.ca, &["http/1.1"])).await;
    assert_eq!(alpn(&stream).as_deref(), Some("http/1.1"));
    let mut h1 = h1_over(stream).await;
    let (version, reply) = send_h1(
        &mut h1,
        get(
            &format!("https://localhost:{}/a", addr.port()),
            &[("x-user-id", &on_canary)],
        ),
    )
    .await;
    assert_eq!(version, Version::HTTP_11);
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.version(), CANARY);
    assert_eq!(reply.backend(), CANARY);
    assert_eq!(reply.seen("x-forwarded-proto"), ["https"]);

    // HTTP/2, chosen by ALPN; both keys on one connection, each to its version.
    let stream = tls_connect(addr, &tls_client(&pki.ca, &["h2", "http/1.1"])).await;
    assert_eq!(alpn(&stream).as_deref(), Some("h2"));
    let mut h2 = h2_over(stream).await;
    for (key, expected) in [
        (&on_stable, STABLE),
        (&on_canary, CANARY),
        (&on_stable, STABLE),
    ] {
        let (version, reply) = send_h2(
            &mut h2,
            get(
                &format!("https://localhost:{}/b", addr.port()),
                &[("x-user-id", key)],
            ),
        )
        .await;
        assert_eq!(version, Version::HTTP_2);
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.version(), expected, "key {key}");
        assert_eq!(reply.backend(), expected, "key {key}");
        assert_eq!(reply.seen("x-forwarded-proto"), ["https"]);
        assert_eq!(
            reply.seen("x-forwarded-host"),
            [format!("localhost:{}", addr.port())]
        );
    }

    // A keyless client gets the fallback cookie, marked Secure, and sticks by it.
    let (_, first) = send_h2(
        &mut h2,
        get(&format!("https://localhost:{}/c", addr.port()), &[]),
    )
    .await;
    let cookies = first.set_cookies();
    assert_eq!(cookies.len(), 1, "{first:?}");
    assert!(cookies[0].starts_with("cohort_id="), "{cookies:?}");
    assert!(cookies[0].ends_with("; Secure"), "{cookies:?}");
    let pair = cookies[0].split(';').next().expect("a name=value pair");
    for _ in 0..3 {
        let (_, again) = send_h2(
            &mut h2,
            get(
                &format!("https://localhost:{}/c", addr.port()),
                &[("cookie", pair)],
            ),
        )
        .await;
        assert_eq!(again.version(), first.version());
        assert!(again.set_cookies().is_empty(), "{again:?}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_reloaded_certificate_serves_new_connections_while_an_old_stream_finishes() {
    let pki = Pki::new();
    let first = pki.leaf("first");
    // Stable streams events; the canary answers at once.
    let sse = SseBackend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let extra = format!("{}\n{}", listen_tls(&first), routing());
    let server = cohort(&[sse.addr], Some((&[canary.addr], 50.0)), &extra).await;
    let addr = server.proxy_addr();
    let client = tls_client(&pki.ca, &["h2"]);

    // A stream opened with the first certificate, its first event read.
    let old = tls_connect(addr, &client).await;
    assert_eq!(peer_cert(&old), first.der);
    let mut h2 = h2_over(old).await;
    h2.ready().await.expect("an open connection");
    let rsp = within(
        "the stream's head",
        h2.send_request(get(
            &format!("https://localhost:{}/events", addr.port()),
            &[("x-user-id", &key_on(SALT, 50.0, STABLE, "reload"))],
        )),
    )
    .await
    .expect("a response");
    assert_eq!(rsp.status(), StatusCode::OK);
    let mut body = rsp.into_body();
    let event = within("the first event", body.frame())
        .await
        .expect("a frame")
        .expect("a good frame")
        .into_data()
        .expect("data");
    assert_eq!(&event[..], SseBackend::FIRST.as_bytes());

    // The files are replaced and reloaded, as SIGHUP does.
    let second = pki.leaf("second");
    std::fs::copy(&second.cert, &first.cert).expect("replace the certificate");
    std::fs::copy(&second.key, &first.key).expect("replace the key");
    assert!(server.reload_tls().expect("the new pair loads"));

    let fresh = tls_connect(addr, &client).await;
    assert_eq!(
        peer_cert(&fresh),
        second.der,
        "a new connection gets the new certificate"
    );
    let mut fresh = h2_over(fresh).await;
    let (_, reply) = send_h2(
        &mut fresh,
        get(
            &format!("https://localhost:{}/", addr.port()),
            &[("x-user-id", &key_on(SALT, 50.0, CANARY, "reload"))],
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.backend(), CANARY);

    // The old stream runs on to its end.
    sse.finish(body).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_broken_pair_is_refused_by_file_name_and_the_old_certificate_stays() {
    let pki = Pki::new();
    let first = pki.leaf("first");
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, &listen_tls(&first)).await;
    let addr = server.proxy_addr();
    let client = tls_client(&pki.ca, &["h2"]);
    let original_cert = std::fs::read(&first.cert).expect("read");
    let original_key = std::fs::read(&first.key).expect("read");

    // A certificate whose key is not the one on disk.
    let other = pki.leaf("other");
    std::fs::copy(&other.cert, &first.cert).expect("replace the certificate");
    let error = server
        .reload_tls()
        .expect_err("a mismatched pair is refused");
    let text = error.to_string();
    assert!(text.contains(&*first.cert.to_string_lossy()), "{text}");
    assert!(text.contains(&*first.key.to_string_lossy()), "{text}");
    assert_eq!(peer_cert(&tls_connect(addr, &client).await), first.der);

    // Garbage where the key was.
    std::fs::write(&first.cert, &original_cert).expect("restore");
    std::fs::write(&first.key, b"-----BEGIN GARBAGE-----\nnot a key\n").expect("write");
    let error = server.reload_tls().expect_err("a garbage key is refused");
    assert!(
        error.to_string().contains(&*first.key.to_string_lossy()),
        "{error}"
    );
    // Garbage where the certificate was.
    std::fs::write(&first.key, &original_key).expect("restore");
    std::fs::write(&first.cert, b"garbage").expect("write");
    let error = server
        .reload_tls()
        .expect_err("a garbage certificate is refused");
    assert!(
        error.to_string().contains(&*first.cert.to_string_lossy()),
        "{error}"
    );

    // The old certificate still serves, and serves requests.
    let stream = tls_connect(addr, &client).await;
    assert_eq!(peer_cert(&stream), first.der);
    let mut h2 = h2_over(stream).await;
    let (_, reply) = send_h2(
        &mut h2,
        get(&format!("https://localhost:{}/", addr.port()), &[]),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.backend(), STABLE);
    server.shutdown().await;
}

#[tokio::test]
async fn curl_speaks_http2_over_tls() {
    require("curl");
    let pki = Pki::new();
    let leaf = pki.leaf("curl");
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, &listen_tls(&leaf)).await;
    let url = format!("https://localhost:{}/via-curl", server.proxy_addr().port());
    let ca = pki.ca.to_string_lossy().into_owned();
    let resolve = format!("localhost:{}:127.0.0.1", server.proxy_addr().port());
    let (ok, out) = run(
        "curl",
        &[
            "--http2",
            "--silent",
            "--show-error",
            "--include",
            "--cacert",
            &ca,
            "--resolve",
            &resolve,
            "-H",
            "x-user-id: curl-user",
            &url,
        ],
    )
    .await;
    assert!(ok, "curl failed:\n{out}");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(out.contains(&format!("x-agent-version: {STABLE}")), "{out}");
    assert!(out.contains("\"backend\":\"v1\""), "{out}");
    assert_eq!(stable.hits(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn nghttp_and_h2load_speak_http2_over_tls() {
    require("nghttp");
    require("h2load");
    let pki = Pki::new();
    let leaf = pki.leaf("nghttp");
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, &listen_tls(&leaf)).await;
    let url = format!(
        "https://127.0.0.1:{}/via-nghttp",
        server.proxy_addr().port()
    );

    let (ok, out) = run("nghttp", &["--verbose", "--stat", &url]).await;
    assert!(ok, "nghttp failed:\n{out}");
    assert!(out.contains("The negotiated protocol: h2"), "{out}");
    assert!(out.contains(":status: 200"), "{out}");
    assert!(out.contains(&format!("x-agent-version: {STABLE}")), "{out}");

    let (ok, out) = run("h2load", &["-n", "40", "-c", "4", "-m", "4", &url]).await;
    assert!(ok, "h2load failed:\n{out}");
    assert!(out.contains("40 succeeded, 0 failed, 0 errored"), "{out}");
    assert!(out.contains("status codes: 40 2xx"), "{out}");
    assert!(out.contains("Application protocol: h2"), "{out}");
    assert_eq!(stable.hits(), 41);
    server.shutdown().await;
}

#[tokio::test]
async fn the_framing_guard_reads_the_decrypted_stream() {
    let pki = Pki::new();
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, &listen_tls(&pki.leaf("guard"))).await;
    let client = tls_client(&pki.ca, &["http/1.1"]);

    // Both lengths in one head, hiding a second request in the body: refused.
    let smuggled = "GET /admin HTTP/1.1\r\nHost: a\r\n\r\n";
    let request = format!(
        "POST /chat HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
        5 + smuggled.len()
    );
    let mut stream = tls_connect(server.proxy_addr(), &client).await;
    stream.write_all(request.as_bytes()).await.expect("write");
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
    assert_eq!(stable.hits(), 0, "a smuggled request reached the upstream");

    // A plain request on a TLS connection is not mistaken for one.
    let mut stream = tls_connect(server.proxy_addr(), &client).await;
    stream
        .write_all(b"POST /chat HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .expect("write");
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(stable.hits(), 1);
    server.shutdown().await;
}

/// A client that speaks plain HTTP to the TLS listener is told so in a
/// plain `400`, as nginx tells it, rather than with a TLS alert it cannot
/// read; the request reaches no upstream.
#[tokio::test]
async fn plain_http_on_the_tls_listener_gets_a_plain_400() {
    let pki = Pki::new();
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, &listen_tls(&pki.leaf("plain"))).await;
    let mut stream = tokio::net::TcpStream::connect(server.proxy_addr())
        .await
        .expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    within(
        "the answer and the close",
        stream.read_to_string(&mut answer),
    )
    .await
    .expect("read to the close");
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(
        answer.ends_with("The plain HTTP request was sent to the HTTPS port\n"),
        "{answer}"
    );
    assert_eq!(stable.hits(), 0);

    // TLS clients are served as before.
    let client = tls_client(&pki.ca, &["http/1.1"]);
    let mut stream = tls_connect(server.proxy_addr(), &client).await;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let head = read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    server.shutdown().await;
}

#[tokio::test]
async fn webhooks_are_called_over_https_with_the_upstream_trust() {
    let pki = Pki::new();
    let receiver = tls_support::H2Backend::tls("hooks", &pki.leaf("hooks")).await;
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    // The canary comes from the config, so the config's plan starts at once.
    let extra = format!(
        "[upstream]\nca_file = {:?}\n\n[rollout]\nstages = [ {{ weight = 5, duration = \"1h\" }} ]\n\
         webhooks = [\"https://127.0.0.1:{}/hook\"]\n",
        pki.ca,
        receiver.addr.port()
    );
    let server = cohort(&[stable.addr], Some((&[canary.addr], 10.0)), &extra).await;
    support::eventually("the stage's webhook over TLS", || receiver.hits() >= 1).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_refused_config_keeps_the_old_certificate() {
    let pki = Pki::new();
    let first = pki.leaf("first");
    let stable = Backend::start(STABLE).await;
    let text = support::config(&[stable.addr], None, &listen_tls(&first));
    let parsed = cohort::config::Config::parse(&text, "test").expect("a valid config");
    let path = parsed.state.path.with_file_name("cohort.toml");
    std::fs::write(&path, &text).expect("write the config");
    let process = support::Process::serve(&path, &[]).await;
    let client = tls_client(&pki.ca, &["http/1.1"]);
    let served = || async { peer_cert(&tls_connect(process.proxy, &client).await) };
    assert_eq!(served().await, first.der);

    // New certificate files, and a config with a problem: one reload, refused whole.
    let second = pki.leaf("second");
    std::fs::copy(&second.cert, &first.cert).expect("replace the certificate");
    std::fs::copy(&second.key, &first.key).expect("replace the key");
    std::fs::write(
        &path,
        format!("{text}\n[routing]\nfallback = \"sometimes\"\n"),
    )
    .expect("break the config");
    process.signal("HUP");
    process
        .log_line(&["config reload refused", "routing.fallback"])
        .await;
    assert_eq!(
        served().await,
        first.der,
        "the refused reload changed the certificate"
    );

    // The config fixed: the new certificate is taken.
    std::fs::write(&path, &text).expect("fix the config");
    process.signal("HUP");
    process.log_line(&["TLS certificate reloaded"]).await;
    assert_eq!(served().await, second.der);
    assert_eq!(process.stop().await, Some(0));
}

/// A client that offers only `http/1.0` by ALPN is served HTTP/1.x, as
/// nginx serves it, rather than refused the handshake.
#[tokio::test]
async fn a_client_offering_only_http10_by_alpn_is_served() {
    let pki = Pki::new();
    let leaf = pki.leaf("first");
    let stable = Backend::start(STABLE).await;
    let server = cohort(&[stable.addr], None, &listen_tls(&leaf)).await;
    let addr = server.proxy_addr();
    let stream = tls_connect(addr, &tls_client(&pki.ca, &["http/1.0"])).await;
    assert_eq!(alpn(&stream).as_deref(), Some("http/1.0"));
    let mut h1 = h1_over(stream).await;
    let (_, reply) = send_h1(
        &mut h1,
        get(&format!("https://localhost:{}/a", addr.port()), &[]),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(reply.backend(), STABLE);
}
