//! Changes of the live table under load, through the admin API.
//!
//! Owns: a thousand weight changes and a hundred rollbacks made while
//! keep-alive clients send continuously (no failed request, no dropped
//! connection, every response routed by a weight that was live at some point
//! while it was in flight), and how soon after a rollback returns traffic is
//! on stable (asserted: every request sent after it; printed, not asserted:
//! the gap to the first stable response). Does not own: the admin API's
//! error paths (`control_api`) or open streams (`control_streams`).

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use support::{
    AdminApi, Backend, CANARY, KeepAlive, STABLE, audit_lines, config, eventually, key_on,
    memory_scratch_dir, predicted, start_cohort, with_state_in, within,
};

const SALT: &str = "load";

/// Every weight applied, in order, and how far the applying has got.
///
/// Entry 0 is the weight Cohort started with; entry `k` is the `k`-th change.
/// `begun` is the last entry whose admin call has been sent, `done` the last
/// whose call has returned. A request sent when `done` was `a` and answered
/// when `begun` was `b` was routed by a table with one of the weights
/// `a..=b`: the table live when it was sent is at least entry `a`, and no
/// change after `b` had been asked for when its answer arrived.
struct ChangeLog {
    weights: Mutex<Vec<f64>>,
    begun: AtomicUsize,
    done: AtomicUsize,
}

impl ChangeLog {
    fn new(initial: f64) -> ChangeLog {
        ChangeLog {
            weights: Mutex::new(vec![initial]),
            begun: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
        }
    }

    fn begin(&self, weight: f64) {
        let mut weights = self.weights.lock().expect("the change log");
        weights.push(weight);
        self.begun.store(weights.len() - 1, Ordering::SeqCst);
    }

    fn end(&self) {
        self.done
            .store(self.begun.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    fn weights(&self, from: usize, to: usize) -> Vec<f64> {
        self.weights.lock().expect("the change log")[from..=to].to_vec()
    }
}

/// A small deterministic generator, so a failure can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A weight in 0.01..=100.00 percent, in 0.01 steps, unlike `not`.
    fn weight(&mut self, not: f64) -> f64 {
        loop {
            let weight = (1 + self.next() % 10_000) as f64 / 100.0;
            if weight != not {
                return weight;
            }
        }
    }
}

#[derive(Debug, Default)]
struct ClientReport {
    requests: usize,
    /// Responses whose window held weights that route the key differently.
    ambiguous: usize,
    canary: usize,
    failures: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_changes_and_rollbacks_under_load_route_every_request_by_a_live_weight() {
    const CLIENTS: usize = 6;
    const CHANGES: usize = 1_000;
    const ROLLBACK_EVERY: usize = 10; // 100 rollbacks
    const INITIAL: f64 = 10.0;
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let dir = memory_scratch_dir();
    let toml = with_state_in(
        &config(
            &[stable.addr],
            Some((&[canary.addr], INITIAL)),
            &format!("[routing]\nsalt = {SALT:?}\n"),
        ),
        &dir,
    );
    let server = start_cohort(&toml).await;
    let admin = AdminApi::new(server.admin_addr());
    let log = Arc::new(ChangeLog::new(INITIAL));
    let stop = Arc::new(AtomicBool::new(false));

    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let (log, stop) = (Arc::clone(&log), Arc::clone(&stop));
        let mut connection = KeepAlive::connect(server.proxy_addr()).await;
        clients.push(tokio::spawn(async move {
            let mut report = ClientReport::default();
            while !stop.load(Ordering::SeqCst) {
                let key = format!("user-{client}-{}", report.requests);
                let from = log.done.load(Ordering::SeqCst);
                let result = connection.get("/", &[("x-user-id", &key)]).await;
                let to = log.begun.load(Ordering::SeqCst);
                report.requests += 1;
                let reply = match result {
                    Ok(reply) => reply,
                    Err(error) => {
                        report.failures.push(format!("{key}: {error}"));
                        // The connection is gone; carrying on would only repeat this.
                        break;
                    }
                };
                if reply.status != 200 {
                    report.failures.push(format!("{key}: {reply:?}"));
                    continue;
                }
                let version = reply.version().to_owned();
                let allowed: Vec<&str> = log
                    .weights(from, to)
                    .into_iter()
                    .map(|w| predicted(SALT, w, &key))
                    .collect();
                if !allowed.contains(&version.as_str()) {
                    report.failures.push(format!(
                        "{key}: served by {version}, but the weights live meanwhile were {:?}",
                        log.weights(from, to)
                    ));
                }
                if reply.backend() != version {
                    report.failures.push(format!(
                        "{key}: tagged {version}, served by {}",
                        reply.backend()
                    ));
                }
                report.ambiguous += usize::from(allowed.iter().any(|v| *v != allowed[0]));
                report.canary += usize::from(version == CANARY);
            }
            (report, connection.is_closed())
        }));
    }

    let started = Instant::now();
    let mut random = XorShift(0x5eed_cafe_f00d_d00d);
    let mut current = INITIAL;
    let mut rollbacks = 0;
    for change in 0..CHANGES {
        let forced = change % ROLLBACK_EVERY == ROLLBACK_EVERY / 2;
        if forced {
            log.begin(0.0);
            let state = admin.rollback(&format!("rollback {rollbacks}")).await;
            log.end();
            assert_eq!(state["status"], "rolled_back", "{state}");
            rollbacks += 1;
            current = 0.0;
        }
        let weight = random.weight(current);
        log.begin(weight);
        let state = admin.set_weight(weight, forced).await;
        log.end();
        assert_eq!(state["canary"]["weight"], weight, "{state}");
        current = weight;
    }
    let changing = started.elapsed();
    stop.store(true, Ordering::SeqCst);

    let mut total = ClientReport::default();
    for client in clients {
        let (report, closed) = within("a client to stop", client)
            .await
            .expect("a client task");
        assert!(!closed, "a client's keep-alive connection was closed");
        total.requests += report.requests;
        total.ambiguous += report.ambiguous;
        total.canary += report.canary;
        total.failures.extend(report.failures);
    }
    println!(
        "{CHANGES} weight changes and {rollbacks} rollbacks in {changing:?}; \
         {} requests on {CLIENTS} connections, {} on the canary, {} sent across a change that moved their key",
        total.requests, total.canary, total.ambiguous
    );
    assert!(
        total.failures.is_empty(),
        "{} of {} requests failed or were misrouted; the first: {:#?}",
        total.failures.len(),
        total.requests,
        &total.failures[..total.failures.len().min(5)]
    );
    assert_eq!(rollbacks, CHANGES / ROLLBACK_EVERY);
    // The load was real: both versions served, many requests per client.
    assert!(total.requests >= CLIENTS * 50, "{}", total.requests);
    assert!(total.canary > 0 && total.canary < total.requests);

    // Every change was a change: one generation and one audit line each.
    let state = admin.state().await;
    let changes = (CHANGES + rollbacks) as u64;
    assert_eq!(state["generation"], 1 + changes, "{state}");
    assert_eq!(state["canary"]["weight"], current, "{state}");
    let audit = audit_lines(&dir.join("audit.jsonl"));
    assert_eq!(
        audit.len() as u64,
        1 + changes,
        "one line per change after the start"
    );
    assert_eq!(
        audit.iter().filter(|l| l["action"] == "rollback").count(),
        rollbacks
    );
}

/// One response seen by the client loop of the rollback measurement.
struct Seen {
    sent: Instant,
    arrived: Instant,
    canary: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rollback_returns_every_request_goes_to_stable() {
    const ROUNDS: usize = 20;
    let stable = Backend::start(STABLE).await;
    let canary = Backend::start(CANARY).await;
    let dir = memory_scratch_dir();
    let toml = with_state_in(
        &config(
            &[stable.addr],
            Some((&[canary.addr], 50.0)),
            &format!("[routing]\nsalt = {SALT:?}\n"),
        ),
        &dir,
    );
    let server = start_cohort(&toml).await;
    let admin = AdminApi::new(server.admin_addr());
    let key = key_on(SALT, 50.0, CANARY, "gap");
    let mut connection = KeepAlive::connect(server.proxy_addr()).await;

    let mut gaps = Vec::new();
    let mut calls = Vec::new();
    for round in 0..ROUNDS {
        if round > 0 {
            admin.set_weight(50.0, true).await;
        }
        let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let sender = tokio::spawn({
            let (seen, stop, key) = (Arc::clone(&seen), Arc::clone(&stop), key.clone());
            async move {
                while !stop.load(Ordering::SeqCst) {
                    let sent = Instant::now();
                    let reply = connection
                        .get("/", &[("x-user-id", &key)])
                        .await
                        .expect("the keep-alive connection stays up");
                    let canary = reply.version() == CANARY;
                    seen.lock().expect("seen").push(Seen {
                        sent,
                        arrived: Instant::now(),
                        canary,
                    });
                }
                connection
            }
        });
        eventually("traffic on the canary", || {
            seen.lock().expect("seen").iter().any(|s| s.canary)
        })
        .await;

        let called = Instant::now();
        admin.rollback("measured").await;
        let returned = Instant::now();
        eventually("a stable response sent after the rollback", || {
            seen.lock()
                .expect("seen")
                .iter()
                .any(|s| !s.canary && s.sent > returned)
        })
        .await;
        stop.store(true, Ordering::SeqCst);
        connection = within("the client loop to stop", sender)
            .await
            .expect("the client loop");

        let seen = seen.lock().expect("seen");
        for s in seen.iter().filter(|s| s.sent > returned) {
            assert!(
                !s.canary,
                "round {round}: a request sent after the rollback returned went to the canary"
            );
        }
        let first_stable = seen
            .iter()
            .find(|s| !s.canary && s.arrived > called)
            .expect("a stable response");
        // Signed: a stable response may arrive before the admin reply does.
        let gap = first_stable.arrived.duration_since(returned).as_secs_f64()
            - returned.duration_since(first_stable.arrived).as_secs_f64();
        gaps.push(gap * 1e6);
        calls.push(returned.duration_since(called).as_secs_f64() * 1e6);
    }
    let summary = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        format!(
            "min {:.0} µs, median {:.0} µs, max {:.0} µs",
            values[0],
            values[values.len() / 2],
            values[values.len() - 1]
        )
    };
    println!(
        "rollback over {ROUNDS} rounds: admin call {}; first stable response after the call returned: {}",
        summary(&mut calls),
        summary(&mut gaps)
    );
}
