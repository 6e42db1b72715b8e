//! Criterion benches of the routing decision.
//!
//! Owns: timing the per-request routing work alone, without sockets: reading
//! the sticky key off a realistic request head (`routing::key`), the bucket
//! hash (`routing::bucket`), and the decision (`routing::decide`/`place`).
//! Does not own: a request through the proxy end to end (`benches/proxy.rs`).

use std::hint::black_box;
use std::time::Duration;

use cohort::config::Config;
use cohort::routing::{self, Weight, key};
use cohort::table::RouteTable;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue, Uri};

/// The sticky sources of the example config, with a fixed salt.
const CONFIG: &str = r#"
[routing]
salt = "bench"
sticky_keys = ["header:x-user-id", "query:user"]
override_header = "x-cohort"

[versions.stable]
name = "v1"
upstreams = ["127.0.0.1:9001"]

[versions.canary]
name = "v2"
upstreams = ["127.0.0.1:9002"]
weight = 10
"#;

/// The head of a typical API call from a browser behind a load balancer;
/// `x-user-id` is left out when `user` is `None`.
fn headers(user: Option<&str>, cookie: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut put = |name: &'static str, value: &str| {
        h.append(
            HeaderName::from_static(name),
            HeaderValue::from_str(value).expect("a valid header value"),
        );
    };
    put("host", "chat.example.com");
    put(
        "user-agent",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36",
    );
    put("accept", "application/json, text/event-stream");
    put("accept-encoding", "gzip, deflate, br");
    put("accept-language", "en-GB,en;q=0.9,de;q=0.8");
    put(
        "authorization",
        "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyLTQyIn0.c2lnbmF0dXJl",
    );
    put("content-type", "application/json");
    put("x-request-id", "5f0c6d7e-2b1a-4c3d-9e8f-0a1b2c3d4e5f");
    put("x-forwarded-for", "203.0.113.7, 10.0.0.12");
    put(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    put("cookie", cookie);
    if let Some(user) = user {
        put("x-user-id", user);
    }
    h
}

const COOKIES: &str = "_ga=GA1.2.123456789.1700000000; theme=dark; session=\"s-7f3a\"; cohort_id=0f1e2d3c4b5a69788796a5b4c3d2e1f0";

fn routing(c: &mut Criterion) {
    let config = Config::parse(CONFIG, "bench").expect("the bench config is valid");
    let table = RouteTable::from_config(&config);
    let policy = &table.policy.routing;
    let uri: Uri = "/v1/chat/completions?stream=true&model=small"
        .parse()
        .expect("a valid URI");

    c.bench_function("bucket", |b| {
        b.iter(|| routing::bucket(black_box(b"bench"), black_box(b"user-4242")));
    });

    let weight = Weight::from_percent(10.0).expect("10% is a weight");
    c.bench_function("place", |b| {
        b.iter(|| routing::place(black_box(b"bench"), weight, black_box(b"user-4242")));
    });

    // The per-request routing work of the proxy: key, override, decision.
    let mut group = c.benchmark_group("decide");
    let cases = [
        ("header_key", headers(Some("user-4242"), COOKIES)),
        // No x-user-id and no ?user=: every source is tried, then the fallback cookie.
        ("fallback_cookie", headers(None, COOKIES)),
    ];
    for (name, head) in &cases {
        group.bench_function(*name, |b| {
            b.iter(|| {
                let head = black_box(head);
                let key = key::extract(head, &uri, &policy.sticky_keys, &policy.cookie_name);
                let forced = key::forced_cohort(head, policy.override_header.as_ref());
                routing::decide(&table, key.as_deref(), forced)
            });
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = routing
}
criterion_main!(benches);
