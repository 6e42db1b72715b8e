//! Metric names, help texts, label values and per-version handles.
//!
//! Owns: every metric Cohort exports (SPEC section 5 plus the proxy's own
//! health), described once at start-up, the bounded label values
//! ([`UpstreamErrorKind`], [`ShadowDropReason`]), the
//! recorder's upkeep, [`VersionMetrics`], the handles a version resolves
//! once when a route table is built so that recording a request allocates
//! nothing, and [`Counted`], a gauge held up by a guard. Does not own: when
//! to record (the proxy: its `handle` at the response head, its `body` at
//! the body's end, and its `forward` for each upstream tried), serving
//! `/metrics` (`admin`, which renders it through [`retain_live_series`]), or the
//! series of [`UPSTREAM_HEALTHY`], which `health` writes from the live table
//! at each scrape (`health::write_gauges`).

use std::sync::OnceLock;
use std::time::Duration;

use http::StatusCode;
use metrics::{
    Counter, Gauge, Histogram, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::routing::Cohort;
use crate::state::Source;

pub const REQUESTS_TOTAL: &str = "cohort_requests_total";
pub const REQUEST_DURATION: &str = "cohort_request_duration_seconds";
pub const RESPONSE_DURATION: &str = "cohort_response_duration_seconds";
pub const UPSTREAM_ERRORS_TOTAL: &str = "cohort_upstream_errors_total";
pub const REQUESTS_IN_FLIGHT: &str = "cohort_requests_in_flight";
pub const TOKENS_TOTAL: &str = "cohort_tokens_total";
pub const CANARY_WEIGHT: &str = "cohort_canary_weight_percent";
pub const ROUTE_GENERATION: &str = "cohort_route_generation";
pub const ROLLBACKS_TOTAL: &str = "cohort_rollbacks_total";
pub const UPSTREAM_HEALTHY: &str = "cohort_upstream_healthy";
pub const CANARY_FALLBACKS_TOTAL: &str = "cohort_canary_fallbacks_total";
pub const SHADOW_DROPPED_TOTAL: &str = "cohort_shadow_dropped_total";
pub const CLIENT_CONNECTIONS: &str = "cohort_client_connections";
pub const IDLE_CLIENT_CONNECTIONS: &str = "cohort_client_connections_idle";
pub const UPSTREAM_CONNECTIONS: &str = "cohort_upstream_connections";
pub const BUILD_INFO: &str = "cohort_build_info";
pub const LOG_LINES_DROPPED_TOTAL: &str = "cohort_log_lines_dropped_total";

/// Histogram buckets, in seconds, for proxied agent calls: from a cached
/// answer in about a millisecond to a long tool-using turn of a minute.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// Why an upstream exchange failed; the `kind` label of `cohort_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect,
    Timeout,
    Reset,
    Protocol,
}

impl UpstreamErrorKind {
    const ALL: [UpstreamErrorKind; 4] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Reset,
        UpstreamErrorKind::Protocol,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Protocol => "protocol",
        }
    }
}

/// Why a shadow copy was not sent or given up; the `reason` label of `cohort_shadow_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowDropReason {
    /// The shadow's queue was full.
    QueueFull,
    /// The shadow was too slow to take the copy in time.
    Timeout,
    /// The request body is larger than `shadow.max_body`.
    TooLarge,
}

impl ShadowDropReason {
    pub const ALL: [ShadowDropReason; 3] = [
        ShadowDropReason::QueueFull,
        ShadowDropReason::Timeout,
        ShadowDropReason::TooLarge,
    ];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ShadowDropReason::QueueFull => "queue_full",
            ShadowDropReason::Timeout => "timeout",
            ShadowDropReason::TooLarge => "too_large",
        }
    }
}

/// How often histogram samples are folded into their buckets when nobody
/// scrapes: without it, an unscraped proxy's memory grows with its traffic.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The commit this binary was built from (`build.rs`), or `"unknown"`.
pub const GIT_COMMIT: &str = match option_env!("COHORT_GIT_COMMIT") {
    Some(commit) => commit,
    None => "unknown",
};

/// Installs the Prometheus recorder (once per process), describes every
/// metric and registers those that must read 0 before their first event.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_duration_seconds".into()),
                    DURATION_BUCKETS,
                )
                .expect("the bucket list is not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed in this process");
            describe();
            register_process_metrics();
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("cohort-metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP_INTERVAL);
                        upkeep.run_upkeep();
                    }
                });
            if let Err(error) = spawned {
                // Scrapes still drain the histograms; only an unscraped proxy grows.
                tracing::warn!(%error, "cannot start the metrics upkeep thread");
            }
            handle
        })
        .clone()
}

/// The proxy's own series, present from the first scrape on.
fn register_process_metrics() {
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "commit" => GIT_COMMIT).set(1.0);
    for source in Source::ALL {
        counter!(ROLLBACKS_TOTAL, "source" => source.as_str()).increment(0);
    }
    for reason in ShadowDropReason::ALL {
        counter!(SHADOW_DROPPED_TOTAL, "reason" => reason.as_str()).increment(0);
    }
    counter!(CANARY_FALLBACKS_TOTAL).increment(0);
    counter!(LOG_LINES_DROPPED_TOTAL).increment(0);
    gauge!(CLIENT_CONNECTIONS).increment(0.0);
    gauge!(IDLE_CLIENT_CONNECTIONS).increment(0.0);
    gauge!(UPSTREAM_CONNECTIONS).increment(0.0);
    gauge!(CANARY_WEIGHT).increment(0.0);
    gauge!(ROUTE_GENERATION).increment(0.0);
}

fn describe() {
    describe_counter!(
        REQUESTS_TOTAL,
        "Requests answered, by version, cohort and status code."
    );
    describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Time from the request to the response headers: the wait a user feels."
    );
    describe_histogram!(
        RESPONSE_DURATION,
        metrics::Unit::Seconds,
        "Time from the request to the end of the response body, streams included."
    );
    describe_counter!(
        UPSTREAM_ERRORS_TOTAL,
        "Failed upstream exchanges, by kind: connect, timeout, reset, protocol."
    );
    describe_gauge!(
        REQUESTS_IN_FLIGHT,
        "Requests, streams and upgraded connections open right now."
    );
    describe_counter!(
        TOKENS_TOTAL,
        "Sum of the tokens header of upstream responses."
    );
    describe_gauge!(CANARY_WEIGHT, "The canary's share of buckets, in percent.");
    describe_gauge!(ROUTE_GENERATION, "Generation of the live route table.");
    describe_counter!(
        ROLLBACKS_TOTAL,
        "Rollbacks, by source: api, signal, guardrail."
    );
    describe_counter!(
        CANARY_FALLBACKS_TOTAL,
        "Canary-cohort requests sent to stable: no canary upstream was available, or every one refused the request."
    );
    describe_counter!(
        LOG_LINES_DROPPED_TOTAL,
        "Log lines dropped because stderr took none for a while (the queue before it was full)."
    );
    describe_counter!(
        SHADOW_DROPPED_TOTAL,
        "Shadow copies not sent or given up, by reason."
    );
    describe_gauge!(CLIENT_CONNECTIONS, "Client connections open right now.");
    describe_gauge!(
        IDLE_CLIENT_CONNECTIONS,
        "Idle client connections: HTTP/1.1 between requests with their buffers freed, HTTP/2 with no stream open."
    );
    describe_gauge!(
        UPSTREAM_CONNECTIONS,
        "Upstream connections open right now, pooled idle ones included."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; labels carry the build's version and commit."
    );
}

/// Handles for one version in one cohort, resolved once per route-table build.
#[derive(Debug)]
pub struct VersionMetrics {
    name: String,
    cohort: Cohort,
    /// One counter per status code (100..=999, all that `http` can hold),
    /// created on first use.
    requests: Box<[OnceLock<Counter>]>,
    pub request_duration: Histogram,
    pub response_duration: Histogram,
    pub in_flight: Gauge,
    pub tokens: Counter,
    upstream_errors: [Counter; 4],
}

impl VersionMetrics {
    #[must_use]
    pub fn new(name: &str, cohort: Cohort) -> VersionMetrics {
        let labels = [
            ("version", name.to_owned()),
            ("cohort", cohort.as_str().to_owned()),
        ];
        VersionMetrics {
            name: name.to_owned(),
            cohort,
            requests: (100..1000).map(|_| OnceLock::new()).collect(),
            request_duration: histogram!(REQUEST_DURATION, &labels),
            response_duration: histogram!(RESPONSE_DURATION, &labels),
            in_flight: gauge!(REQUESTS_IN_FLIGHT, &labels),
            tokens: counter!(TOKENS_TOTAL, &labels),
            upstream_errors: UpstreamErrorKind::ALL.map(|kind| {
                counter!(UPSTREAM_ERRORS_TOTAL, "version" => name.to_owned(), "cohort" => cohort.as_str(), "kind" => kind.as_str())
            }),
        }
    }

    /// Counts one answered request with `status` and the time to its headers.
    pub fn record_response(&self, status: StatusCode, to_headers: Duration) {
        let index = usize::from(status.as_u16()).saturating_sub(100);
        if let Some(slot) = self.requests.get(index) {
            slot.get_or_init(|| {
                counter!(REQUESTS_TOTAL, "version" => self.name.clone(), "cohort" => self.cohort.as_str(), "code" => status.as_str().to_owned())
            })
            .increment(1);
        }
        self.request_duration.record(to_headers);
    }

    pub fn record_upstream_error(&self, kind: UpstreamErrorKind) {
        // In `ALL`'s order, which is the declaration's (tested below).
        self.upstream_errors[kind as usize].increment(1);
    }
}

/// Drops from a rendered scrape every series labelled with a `version`
/// and a `cohort` that `is_live` says to drop: those of a version that left
/// the route table a while ago (a replaced canary, the stable version
/// before a promotion, a removed shadow; see `Table::held_lately`). The
/// recorder keeps each series for the life of the process, and the
/// handles a table resolves would stop counting if it forgot one; so a
/// departed version leaves at render time, and a scrape does not grow with
/// every release. (The health gauges, which count nothing, leave at once:
/// `health::write_gauges`.)
#[must_use]
pub fn retain_live_series(text: &str, is_live: impl Fn(&str, &str) -> bool) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let departed = !line.starts_with('#')
            && matches!(
                (label(line, "version"), label(line, "cohort")),
                (Some(version), Some(cohort)) if !is_live(version, cohort)
            );
        if !departed {
            out.push_str(line);
        }
    }
    out
}

/// The value of label `name` in a sample line of the text exposition. The
/// values Cohort writes hold no `,`, `"` or `}` (version names are checked
/// for that), so the labels split on commas.
fn label<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let (_, labels) = line.split_once('{')?;
    let (labels, _) = labels.split_once('}')?;
    labels.split(',').find_map(|pair| {
        pair.strip_prefix(name)?
            .strip_prefix("=\"")?
            .strip_suffix('"')
    })
}

/// Publishes the live table's weight and generation.
pub fn record_table(weight_percent: f64, generation: u64) {
    gauge!(CANARY_WEIGHT).set(weight_percent);
    // Generations stay far below 2^53, where f64 is exact.
    gauge!(ROUTE_GENERATION).set(generation as f64);
}

/// One in a gauge, for as long as it is held. Counted down on drop, so
/// work whose task is dropped unfinished (a drain that ran out of time ends
/// its worker's runtime, and every task on it) leaves the gauge too.
#[derive(Debug)]
pub struct Counted(Gauge);

impl Counted {
    #[must_use]
    pub fn new(gauge: Gauge) -> Counted {
        gauge.increment(1.0);
        Counted(gauge)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// The gauge of open client connections.
pub fn client_connections() -> Gauge {
    gauge!(CLIENT_CONNECTIONS)
}

/// The gauge of idle client connections: HTTP/1.1 ones whose buffers were
/// freed, and HTTP/2 ones with no stream open for a whole check.
pub fn idle_client_connections() -> Gauge {
    gauge!(IDLE_CLIENT_CONNECTIONS)
}

/// The gauge of open upstream connections, resolved once by the pooled client's connector.
pub fn upstream_connections() -> Gauge {
    gauge!(UPSTREAM_CONNECTIONS)
}

/// Sets the count of log lines dropped (`logging::dropped_lines`), which the
/// log's writer keeps: read at each scrape.
pub fn record_log_lines_dropped(total: u64) {
    counter!(LOG_LINES_DROPPED_TOTAL).absolute(total);
}

/// Counts one rollback by `source`.
pub fn record_rollback(source: Source) {
    counter!(ROLLBACKS_TOTAL, "source" => source.as_str()).increment(1);
}

/// Counts one canary-cohort request sent to stable. The handle is
/// resolved once: with the canary down, every request of its cohort counts.
pub fn record_canary_fallback() {
    static FALLBACKS: OnceLock<Counter> = OnceLock::new();
    FALLBACKS
        .get_or_init(|| counter!(CANARY_FALLBACKS_TOTAL))
        .increment(1);
}

/// Counts one shadow copy not sent, by `reason`; the handles are resolved once.
pub fn record_shadow_dropped(reason: ShadowDropReason) {
    static DROPPED: OnceLock<[Counter; 3]> = OnceLock::new();
    DROPPED.get_or_init(|| {
        ShadowDropReason::ALL
            .map(|reason| counter!(SHADOW_DROPPED_TOTAL, "reason" => reason.as_str()))
    })[reason as usize]
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The handles of a bounded label are kept in an array in `ALL`'s
    /// order and looked up by the value's discriminant: both orders must
    /// agree.
    #[test]
    fn label_values_are_listed_in_declaration_order() {
        for (index, kind) in UpstreamErrorKind::ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, index, "{kind:?}");
        }
        for (index, reason) in ShadowDropReason::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, index, "{reason:?}");
        }
    }
}
