//! Sticky routing and version tagging, end to end over real sockets.
//!
//! Owns: that the proxy sends each request to the version `place()` predicts
//! and says so in `x-agent-version`; key sources and their order; the
//! override header; the three fallbacks; the default salt; no canary; and
//! balancing within a version. Does not own: the routing function's own
//! properties (`tests/routing_properties.rs`) or header rewriting
//! (`tests/headers.rs`).

mod support;

use std::collections::{HashMap, HashSet};

use cohort::routing::bucket;
use support::{AdminApi, Backend, CANARY, Http, STABLE, cohort, key_on, predicted};

/// A stable and a canary echo backend, named after their versions.
async fn two_versions() -> (Backend, Backend) {
    (Backend::start(STABLE).await, Backend::start(CANARY).await)
}

#[tokio::test]
async fn every_response_is_served_and_tagged_by_the_predicted_version() {
    let (stable, canary) = two_versions().await;
    let server = cohort(&[stable.addr], Some((&[canary.addr], 30.0)), "").await;
    let http = Http::new(server.proxy_addr());

    let mut seen = HashSet::new();
    for i in 0..120 {
        let key = format!("user-{i}");
        let reply = http.get("/chat", &[("x-user-id", &key)]).await;
        assert_eq!(reply.status, 200, "{key}: {reply:?}");
        let expected = predicted(CANARY, 30.0, &key);
        assert_eq!(reply.version(), expected, "{key}: the tag");
        assert_eq!(
            reply.backend(),
            expected,
            "{key}: the backend that served it"
        );
        assert_eq!(reply.headers["x-backend"], expected);
        seen.insert(expected);
    }
    assert_eq!(seen.len(), 2, "both versions served some keys");
    assert_eq!(stable.hits() + canary.hits(), 120);
}

#[tokio::test]
async fn a_key_sticks_to_its_version_across_many_requests() {
    let (stable, canary) = two_versions().await;
    let server = cohort(&[stable.addr], Some((&[canary.addr], 50.0)), "").await;
    let http = Http::new(server.proxy_addr());

    // SPEC: at weight 50 under salt v2, alice is on the canary and bob is not.
    for (key, version) in [("alice", CANARY), ("bob", STABLE)] {
        for _ in 0..25 {
            let reply = http.get("/", &[("x-user-id", key)]).await;
            assert_eq!(reply.version(), version, "{key}");
            assert_eq!(reply.backend(), version, "{key}");
        }
    }
    assert_eq!(canary.hits(), 25);
    assert_eq!(stable.hits(), 25);
}

#[tokio::test]
async fn key_sources_are_tried_in_order_then_the_fallback_cookie() {
    let (stable, canary) = two_versions().await;
    let routing = r#"
        [routing]
        sticky_keys = ["header:x-user-id", "cookie:session", "query:user"]
    "#;
    let server = cohort(&[stable.addr], Some((&[canary.addr], 50.0)), routing).await;
    let http = Http::new(server.proxy_addr());
    let on_canary = key_on(CANARY, 50.0, CANARY, "c");
    let on_stable = key_on(CANARY, 50.0, STABLE, "s");
    let (c, s) = (on_canary.as_str(), on_stable.as_str());

    struct Case<'a> {
        what: &'a str,
        path: String,
        headers: Vec<(&'a str, String)>,
        expected: &'a str,
    }
    let session = |key: &str| format!("a=1; session={key}");
    let fallback = |key: &str| format!("cohort_id={key}");
    let cases = [
        Case {
            what: "the header beats the cookie and the query",
            path: format!("/chat?user={s}"),
            headers: vec![("x-user-id", c.into()), ("cookie", session(s))],
            expected: CANARY,
        },
        Case {
            what: "the cookie beats the query",
            path: format!("/chat?x=1&user={c}"),
            headers: vec![("cookie", session(s))],
            expected: STABLE,
        },
        Case {
            what: "an empty header is skipped",
            path: format!("/chat?user={s}"),
            headers: vec![("x-user-id", String::new()), ("cookie", session(c))],
            expected: CANARY,
        },
        Case {
            what: "the query beats the fallback cookie",
            path: format!("/chat?user={c}"),
            headers: vec![("cookie", fallback(s))],
            expected: CANARY,
        },
        Case {
            what: "the query alone",
            path: format!("/chat?user={s}"),
            headers: vec![],
            expected: STABLE,
        },
    ];
    for Case {
        what,
        path,
        headers,
        expected,
    } in cases
    {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let reply = http.get(&path, &headers).await;
        assert_eq!(reply.version(), expected, "{what}");
        assert_eq!(reply.backend(), expected, "{what}");
        assert!(
            reply.set_cookies().is_empty(),
            "{what}: a keyed request gets no cookie"
        );
    }

    // The fallback cookie alone is a key too, and earns no new cookie.
    for (key, expected) in [(c, CANARY), (s, STABLE)] {
        let cookie = format!("cohort_id={key}");
        let reply = http.get("/", &[("cookie", &cookie)]).await;
        assert_eq!(reply.version(), expected, "fallback cookie {key}");
        assert!(reply.set_cookies().is_empty());
    }
}

#[tokio::test]
async fn query_keys_are_percent_decoded() {
    let (stable, canary) = two_versions().await;
    let routing = "[routing]\nsticky_keys = [\"query:user\"]\n";
    let server = cohort(&[stable.addr], Some((&[canary.addr], 50.0)), routing).await;
    let http = Http::new(server.proxy_addr());
    for i in 0..20 {
        let key = format!("al ice@{i}");
        let encoded = key.replace(' ', "%20").replace('@', "%40");
        let reply = http.get(&format!("/?user={encoded}"), &[]).await;
        assert_eq!(reply.version(), predicted(CANARY, 50.0, &key), "{key}");
    }
}

#[tokio::test]
async fn the_override_header_forces_a_cohort() {
    let (stable, canary) = two_versions().await;
    let routing = "[routing]\noverride_header = \"x-cohort\"\n";
    let server = cohort(&[stable.addr], Some((&[canary.addr], 50.0)), routing).await;
    let http = Http::new(server.proxy_addr());
    let on_canary = key_on(CANARY, 50.0, CANARY, "c");
    let on_stable = key_on(CANARY, 50.0, STABLE, "s");

    for (key, forced, expected) in [
        (&on_stable, "canary", CANARY),
        (&on_canary, "stable", STABLE),
        (&on_canary, "canary", CANARY),
        // Anything else is no override: the key decides.
        (&on_stable, "blue", STABLE),
        (&on_canary, "", CANARY),
    ] {
        let reply = http
            .get("/", &[("x-user-id", key), ("x-cohort", forced)])
            .await;
        assert_eq!(reply.version(), expected, "key {key}, x-cohort {forced:?}");
        assert_eq!(reply.backend(), expected);
    }
    // Keyless requests obey it as well.
    let reply = http.get("/", &[("x-cohort", "canary")]).await;
    assert_eq!(reply.version(), CANARY);

    // After a rollback it no longer reaches the canary.
    AdminApi::new(server.admin_addr())
        .rollback("bad canary")
        .await;
    for key in [&on_stable, &on_canary] {
        let reply = http
            .get("/", &[("x-user-id", key), ("x-cohort", "canary")])
            .await;
        assert_eq!(reply.version(), STABLE, "key {key} after the rollback");
    }
}

#[tokio::test]
async fn the_override_header_is_off_unless_configured() {
    let (stable, canary) = two_versions().await;
    let server = cohort(&[stable.addr], Some((&[canary.addr], 50.0)), "").await;
    let http = Http::new(server.proxy_addr());
    let on_stable = key_on(CANARY, 50.0, STABLE, "s");
    let reply = http
        .get("/", &[("x-user-id", &on_stable), ("x-cohort", "canary")])
        .await;
    assert_eq!(reply.version(), STABLE);
}

/// The value of cookie `name` in a `Set-Cookie` line that has exactly the
/// SPEC's attributes, else a panic naming what is wrong.
fn fallback_cookie_id(set_cookie: &str, name: &str, max_age: u64) -> String {
    let mut parts = set_cookie.split("; ");
    let pair = parts.next().unwrap_or_default();
    let id = pair
        .strip_prefix(&format!("{name}="))
        .unwrap_or_else(|| panic!("{set_cookie:?} does not set {name}"));
    assert_eq!(id.len(), 32, "a 128-bit id in hex: {set_cookie:?}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "lowercase hex: {set_cookie:?}"
    );
    let attributes: Vec<&str> = parts.collect();
    assert_eq!(
        attributes,
        [
            "Path=/",
            "HttpOnly",
            "SameSite=Lax",
            &format!("Max-Age={max_age}")
        ],
        "{set_cookie:?}"
    );
    id.to_owned()
}

#[tokio::test]
async fn keyless_requests_get_a_cookie_that_routes_them_from_then_on() {
    let (stable, canary) = two_versions().await;
    let routing = "[routing]\nfallback = \"cookie\"\ncookie_max_age = \"2h\"\n";
    let server = cohort(&[stable.addr], Some((&[canary.addr], 50.0)), routing).await;
    let http = Http::new(server.proxy_addr());

    let mut ids = HashSet::new();
    let mut versions = HashSet::new();
    for _ in 0..30 {
        let first = http.get("/", &[]).await;
        let cookies = first.set_cookies();
        assert_eq!(cookies.len(), 1, "{first:?}");
        let id = fallback_cookie_id(&cookies[0], "cohort_id", 7200);
        let expected = predicted(CANARY, 50.0, &id);
        assert_eq!(
            first.version(),
            expected,
            "the first request is routed by its new id"
        );
        assert_eq!(first.backend(), expected);

        let cookie = format!("cohort_id={id}");
        for _ in 0..5 {
            let again = http.get("/", &[("cookie", &cookie)]).await;
            assert_eq!(
                again.version(),
                expected,
                "sent back, the id keeps its version"
            );
            assert_eq!(again.backend(), expected);
            assert!(
                again.set_cookies().is_empty(),
                "no new id for a known client"
            );
        }
        ids.insert(id);
        versions.insert(expected);
    }
    assert_eq!(ids.len(), 30, "every keyless client gets its own id");
    // 30 fresh ids at weight 50 all on one side: 2^-29. Both sides show the ids route.
    assert_eq!(versions.len(), 2, "fresh ids land on both versions");
}

#[tokio::test]
async fn the_fallback_cookie_uses_the_configured_name() {
    let stable = Backend::start(STABLE).await;
    let routing = "[routing]\ncookie_name = \"sticky\"\ncookie_max_age = \"30s\"\n";
    let server = cohort(&[stable.addr], None, routing).await;
    let reply = Http::new(server.proxy_addr()).get("/", &[]).await;
    let cookies = reply.set_cookies();
    assert_eq!(cookies.len(), 1, "{reply:?}");
    fallback_cookie_id(&cookies[0], "sticky", 30);
}

#[tokio::test]
async fn fallback_client_ip_routes_by_the_peer_address() {
    let (stable, canary) = two_versions().await;
    // A weight just above the bucket of 127.0.0.1, so the peer's address is
    // on the canary and no other fallback would put it there.
    let ip_bucket = bucket(CANARY.as_bytes(), b"127.0.0.1");
    let weight = f64::from(ip_bucket + 1) / 100.0;
    assert_eq!(predicted(CANARY, weight, "127.0.0.1"), CANARY);
    let routing = "[routing]\nfallback = \"client_ip\"\n";
    let server = cohort(&[stable.addr], Some((&[canary.addr], weight)), routing).await;
    let http = Http::new(server.proxy_addr());
    for _ in 0..10 {
        let reply = http.get("/", &[]).await;
        assert_eq!(reply.version(), CANARY);
        assert_eq!(reply.backend(), CANARY);
        assert!(reply.set_cookies().is_empty(), "client_ip sets no cookie");
    }
    // A keyed request still goes by its key.
    let on_stable = key_on(CANARY, weight, STABLE, "s");
    let reply = http.get("/", &[("x-user-id", &on_stable)]).await;
    assert_eq!(reply.version(), STABLE);
}

#[tokio::test]
async fn fallback_stable_sends_keyless_requests_to_stable() {
    let (stable, canary) = two_versions().await;
    // Even at 99.99%, where a drawn id or the peer address would land on the canary.
    let routing = "[routing]\nfallback = \"stable\"\n";
    let server = cohort(&[stable.addr], Some((&[canary.addr], 99.99)), routing).await;
    let http = Http::new(server.proxy_addr());
    for _ in 0..10 {
        let reply = http.get("/", &[]).await;
        assert_eq!(reply.version(), STABLE);
        assert_eq!(reply.backend(), STABLE);
        assert!(
            reply.set_cookies().is_empty(),
            "fallback stable sets no cookie"
        );
    }
    let on_canary = key_on(CANARY, 99.99, CANARY, "c");
    let reply = http.get("/", &[("x-user-id", &on_canary)]).await;
    assert_eq!(reply.version(), CANARY);
    assert_eq!(canary.hits(), 1);
}

#[tokio::test]
async fn without_a_canary_everything_is_stable() {
    let stable = Backend::start(STABLE).await;
    let server = cohort(
        &[stable.addr],
        None,
        "[routing]\noverride_header = \"x-cohort\"\n",
    )
    .await;
    let http = Http::new(server.proxy_addr());
    for i in 0..20 {
        let key = format!("user-{i}");
        let reply = http.get("/", &[("x-user-id", &key)]).await;
        assert_eq!(reply.version(), STABLE, "{key}");
    }
    assert_eq!(http.get("/", &[]).await.version(), STABLE);
    assert_eq!(
        http.get("/", &[("x-cohort", "canary")]).await.version(),
        STABLE
    );
    assert_eq!(stable.hits(), 22);
}

#[tokio::test]
async fn the_salt_defaults_to_the_canary_name_and_routing_salt_pins_it() {
    // Keys whose cohort differs between the two salts tell them apart.
    let telling: Vec<String> = (0..1000)
        .map(|i| format!("user-{i}"))
        .filter(|k| predicted(CANARY, 50.0, k) != predicted("pinned", 50.0, k))
        .take(20)
        .collect();
    assert_eq!(telling.len(), 20);

    for (routing, salt) in [("", CANARY), ("[routing]\nsalt = \"pinned\"\n", "pinned")] {
        let (stable, canary) = two_versions().await;
        let server = cohort(&[stable.addr], Some((&[canary.addr], 50.0)), routing).await;
        let http = Http::new(server.proxy_addr());
        for key in &telling {
            let reply = http.get("/", &[("x-user-id", key)]).await;
            assert_eq!(
                reply.version(),
                predicted(salt, 50.0, key),
                "salt {salt}, key {key}"
            );
        }
    }
}

#[tokio::test]
async fn upstreams_of_a_version_share_its_traffic_while_keys_stick_to_the_version() {
    let stable = [Backend::start("v1-a").await, Backend::start("v1-b").await];
    let canary = [Backend::start("v2-a").await, Backend::start("v2-b").await];
    let server = cohort(
        &[stable[0].addr, stable[1].addr],
        Some((&[canary[0].addr, canary[1].addr], 50.0)),
        "",
    )
    .await;
    let http = Http::new(server.proxy_addr());

    let mut served: HashMap<String, usize> = HashMap::new();
    for key in ["alice", "bob"] {
        let version = predicted(CANARY, 50.0, key);
        for _ in 0..20 {
            let reply = http.get("/", &[("x-user-id", key)]).await;
            assert_eq!(reply.version(), version, "{key}");
            let backend = reply.backend();
            assert!(
                backend.starts_with(&format!("{version}-")),
                "{key} on {version} was served by {backend}"
            );
            *served.entry(backend).or_default() += 1;
        }
    }
    for backend in stable.iter().chain(&canary) {
        assert!(
            backend.hits() > 0,
            "{} saw no traffic: {served:?}",
            backend.name
        );
    }
}
