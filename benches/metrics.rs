//! Benchmark: the metrics one proxied request records.
//!
//! Owns: timing the per-request recording path with the Prometheus recorder
//! installed: the in-flight gauge up and down, the status counter and the
//! two duration histograms, through handles resolved once per version.
//! Does not own: rendering `/metrics` or anything else on the data path.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use http::StatusCode;

use cohort::metrics::{self, VersionMetrics};
use cohort::routing::Cohort;

fn record_one_request(c: &mut Criterion) {
    let handle = metrics::install();
    let version = VersionMetrics::new("bench-v1", Cohort::Canary);
    let to_headers = Duration::from_micros(850);
    let to_end = Duration::from_millis(12);

    c.bench_function("record one request", |b| {
        b.iter(|| {
            version.in_flight.increment(1.0);
            version.record_response(black_box(StatusCode::OK), black_box(to_headers));
            version.tokens.increment(black_box(42));
            version.in_flight.decrement(1.0);
            version.response_duration.record(black_box(to_end));
        });
    });

    // Histogram samples wait in a queue until a scrape or upkeep folds them in.
    handle.run_upkeep();
}

criterion_group!(benches, record_one_request);
criterion_main!(benches);
