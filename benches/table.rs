//! Benchmark: the live route table's swap and per-request loads.
//!
//! Owns: timing `Table::store` of a built `RouteTable` (the swap a weight
//! change or a rollback makes, without the fsync that dominates
//! `Control::set_weight`), building the next table from the live one as the
//! control plane does, and the per-request `Table::load` and
//! `Table::snapshot`, alone and while another thread keeps swapping.
//! Does not own: persisting the change (`state`) or the time from a rollback
//! call to traffic on stable (printed by `tests/control_load.rs`).

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

use cohort::config::Config;
use cohort::routing::Weight;
use cohort::table::{Gate, RouteTable, Status, Table};

const CONFIG: &str = r#"
[versions.stable]
name = "v1"
upstreams = ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]

[versions.canary]
name = "v2"
upstreams = ["127.0.0.1:9101", "127.0.0.1:9102"]
weight = 10
"#;

/// The table the control plane would build for `weight` from `previous`.
fn next_table(config: &Config, previous: &RouteTable, weight: Weight) -> RouteTable {
    let (canary, _) = config.versions.canary.clone().expect("a canary");
    RouteTable::build(
        previous.generation + 1,
        Status::Steady,
        &config.versions.stable,
        Some(&(canary, weight)),
        None,
        Arc::clone(&previous.policy),
        Some(previous),
        Gate::UntilProbed,
    )
}

fn swap(c: &mut Criterion) {
    let config = Config::parse(CONFIG, "bench").expect("a valid bench config");
    let first = RouteTable::from_config(&config);
    let built = next_table(
        &config,
        &first,
        Weight::from_percent(20.0).expect("a weight"),
    );
    let table = Table::new(first);

    c.bench_function("table store (swap a built table)", |b| {
        b.iter_batched(
            || built.clone(),
            |next| table.store(black_box(next)),
            BatchSize::SmallInput,
        );
    });

    let mut percent = 0u16;
    c.bench_function("table build from the live one + store", |b| {
        b.iter(|| {
            percent = (percent + 1) % 10_000;
            let weight = Weight::from_basis_points(percent).expect("a weight");
            let next = next_table(&config, &table.snapshot(), weight);
            table.store(next);
        });
    });

    c.bench_function("table load (per request, guard)", |b| {
        b.iter(|| black_box(table.load().generation));
    });
    c.bench_function("table snapshot (per request, Arc)", |b| {
        b.iter(|| black_box(table.snapshot().generation));
    });
}

fn load_while_swapping(c: &mut Criterion) {
    let config = Config::parse(CONFIG, "bench").expect("a valid bench config");
    let first = RouteTable::from_config(&config);
    let built = next_table(
        &config,
        &first,
        Weight::from_percent(20.0).expect("a weight"),
    );
    let table = Arc::new(Table::new(first));
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = std::thread::spawn({
        let (table, stop) = (Arc::clone(&table), Arc::clone(&stop));
        move || {
            while !stop.load(Ordering::Relaxed) {
                table.store(built.clone());
            }
        }
    });

    c.bench_function("table load while another thread swaps", |b| {
        b.iter(|| black_box(table.load().generation));
    });
    c.bench_function("table snapshot while another thread swaps", |b| {
        b.iter(|| black_box(table.snapshot().generation));
    });

    stop.store(true, Ordering::Relaxed);
    swapper.join().expect("the swapping thread");
}

criterion_group!(benches, swap, load_while_swapping);
criterion_main!(benches);
