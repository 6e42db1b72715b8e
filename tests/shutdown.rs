//! A graceful stop: open requests finish, new connections are refused.
//!
//! Owns: `Server::shutdown` with a request in flight. The upstream holds the
//! request until the test releases it, so "in flight" is a fact, not a race.
//! Does not own: the SIGTERM path of the binary (`tests/cli.rs`).

mod support;

use support::{Http, STABLE, SlowBackend, cohort, eventually, eventually_async, within};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_in_flight_request_finish_and_refuses_new_connections() {
    let slow = SlowBackend::start(STABLE).await;
    let server = cohort(&[slow.addr], None, "").await;
    let proxy = server.proxy_addr();

    let in_flight = tokio::spawn(async move {
        Http::new(proxy)
            .get("/slow", &[("x-user-id", "alice")])
            .await
    });
    eventually("the request reaching the upstream", || slow.hits() == 1).await;

    let stopping = tokio::spawn(server.shutdown());
    eventually_async("new connections being refused", || async {
        TcpStream::connect(proxy).await.is_err()
    })
    .await;
    assert!(
        !stopping.is_finished(),
        "shutdown must wait for the request the upstream still holds"
    );
    assert!(!in_flight.is_finished());

    slow.release();
    let reply = within("the in-flight response", in_flight)
        .await
        .expect("the client task ran");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.version(), STABLE);
    assert_eq!(reply.body, SlowBackend::BODY);
    within("the drain to finish", stopping)
        .await
        .expect("shutdown ran to the end");
    assert_eq!(slow.hits(), 1);
}
