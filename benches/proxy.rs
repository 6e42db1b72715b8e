//! Criterion bench of one request through the proxy on loopback.
//!
//! Owns: timing a keep-alive `GET` through a real Cohort (`serve::start`)
//! to a tiny real hyper backend, both on 127.0.0.1 port 0, with a pooled
//! hyper-util client; and the same `GET` straight to the backend as the
//! baseline, so the difference is what the proxy adds. Does not own: the
//! routing decision alone (`benches/routing.rs`) or comparisons with other
//! proxies (`benches/compare.sh`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cohort::config::Config;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Distinct users cycled through, as a load generator would send them.
const USERS: usize = 5000;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// A backend that answers every request with `200 stable\n`.
async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the backend");
    let addr = listener.local_addr().expect("the backend's address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"stable\n"))))
                });
                // A client closing its connection is not an error worth reporting here.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn config(backend: SocketAddr, state_dir: &std::path::Path) -> Config {
    let text = format!(
        r#"
[listen]
addr = "127.0.0.1:0"
drain_timeout = "1s"

[routing]
salt = "bench"
sticky_keys = ["header:x-user-id"]

[versions.stable]
name = "v1-stable"
upstreams = ["{backend}"]

[versions.canary]
name = "v2-canary"
upstreams = ["{backend}"]
weight = 10

[admin]
addr = "127.0.0.1:0"

[state]
path = "{state}"
audit_log = "{audit}"
"#,
        state = state_dir.join("state.json").display(),
        audit = state_dir.join("audit.jsonl").display(),
    );
    Config::parse(&text, "bench").expect("the bench config is valid")
}

/// One GET with the next user's key; panics unless it is answered 200 in full.
async fn get(client: &HttpClient, uri: &str, users: &[HeaderValue], next: &AtomicUsize) {
    let user = &users[next.fetch_add(1, Ordering::Relaxed) % users.len()];
    let req = Request::get(uri)
        .header("x-user-id", user)
        .body(Empty::new())
        .expect("a valid request");
    let rsp = client.request(req).await.expect("the request is answered");
    assert_eq!(rsp.status(), StatusCode::OK);
    let body = rsp
        .into_body()
        .collect()
        .await
        .expect("the body arrives")
        .to_bytes();
    assert_eq!(&body[..], b"stable\n");
}

fn proxy(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let state_dir = tempfile::Builder::new()
        .prefix("cohort-bench-")
        .tempdir()
        .expect("a scratch directory");
    let (backend, server) = rt.block_on(async {
        let backend = backend().await;
        let server = cohort::serve::start(config(backend, state_dir.path()))
            .await
            .expect("cohort starts");
        (backend, server)
    });
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let users: Vec<HeaderValue> = (0..USERS)
        .map(|n| HeaderValue::from_str(&format!("user-{n}")).expect("a valid header value"))
        .collect();
    let next = AtomicUsize::new(0);
    let via_proxy = format!("http://{}/", server.proxy_addr());
    let direct = format!("http://{backend}/");

    // The proxy must really be in the path: its responses carry the version header.
    rt.block_on(async {
        let req = Request::get(&via_proxy)
            .header("x-user-id", "user-1")
            .body(Empty::new())
            .expect("a valid request");
        let rsp = client.request(req).await.expect("the proxy answers");
        assert_eq!(rsp.status(), StatusCode::OK);
        assert!(
            rsp.headers().contains_key("x-agent-version"),
            "the proxy's response is tagged with the version"
        );
    });

    let mut group = c.benchmark_group("get_keep_alive");
    group.bench_function("direct", |b| {
        b.to_async(&rt)
            .iter(|| get(&client, &direct, &users, &next));
    });
    group.bench_function("via_cohort", |b| {
        b.to_async(&rt)
            .iter(|| get(&client, &via_proxy, &users, &next));
    });
    group.finish();

    drop(client);
    rt.block_on(server.shutdown());
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = proxy
}
criterion_main!(benches);
