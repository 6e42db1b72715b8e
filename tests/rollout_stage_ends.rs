//! Simulations of how a stage ends: the controller's decisions at each look
//! of one weighted stage, on seeded simulated traffic.
//!
//! Owns: checking that a canary just past a limit is seldom promoted at a
//! stage's end (the first look with the data decides, rather than looking
//! again until one look happens to pass), that a healthy canary still is,
//! and that at low traffic, where the windows' last span holds too few
//! requests and the stage's tallies decide, a healthy canary is seldom
//! held for a person. Does not own: the false-rollback budget over whole
//! rollouts (`rollout_statistics`), or the controller's task, clock and
//! state (`rollout`); this models only what `weight_stage` does with a
//! look's evaluations, through the crate's own `rollout::judge` rules.
//!
//! The model, stated once:
//! - One stage: a share `weight` of `rate` requests per second goes to the
//!   canary for the stage's duration, and on after it while the stage is
//!   held; the weight takes effect at a random point of a 30 s slot.
//! - A look every 30 s: the last span (the slots since the weight took
//!   effect, up to 60 of them) and the stage's tallies, judged with
//!   `stats::evaluate_over`; failures and waiting counted with
//!   `judge::count_failures` (`failure_limit = 2`, `inconclusive_limit =
//!   20`, `min_requests = 200`); once the stage's time is up, a passing
//!   look ends it, and the first look with a guardrail past its limit
//!   without proof pauses it for a person (`judge::past_limit`). Without
//!   that pause ("re-look" below), the stage waits for a passing look, as
//!   the controller did before.
//! - Both cohorts: latency log-normal with median 800 ms and sigma 0.5,
//!   tokens uniform in 200..=800; stable succeeds 0.99 of the time.
//!
//! Run with `cargo test --release --test rollout_stage_ends -- --nocapture`
//! (and `STAGE_RUNS=2000` for the figures in `BENCHMARKS.md`) to see the
//! table; the assertions hold in debug builds at the default 200 runs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cohort::config::{RolloutConfig, rollout_from_json};
use cohort::rollout::judge::{self, FailureRuns};
use cohort::rollout::stats::{self, Cohorts, Look, Verdict, evaluate_over};
use cohort::rollout::window::{Observation, Tally, Window};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const INTERVAL: Duration = Duration::from_secs(30);
const STABLE_SUCCESS: f64 = 0.99;

/// How a simulated stage ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    RolledBack,
    /// At the first look once the stage's time was up.
    PromotedOnTime,
    /// At a later look.
    PromotedLater,
    PausedPastLimit,
    PausedForData,
    /// Still waiting a whole stage's length after its end.
    Held,
}

/// One simulated stage.
struct Setup {
    rate_per_second: u64,
    weight: f64,
    duration: Duration,
    canary_success: f64,
    guardrails: Value,
    /// Whether a guardrail past its limit at the stage's end pauses it.
    pause_past_limit: bool,
}

impl Setup {
    fn plan(&self) -> RolloutConfig {
        rollout_from_json(json!({
            "interval": "30s",
            "failure_limit": 2,
            "inconclusive_limit": 20,
            "min_requests": 200,
            "stages": [{
                "weight": self.weight * 100.0,
                "duration": format!("{}s", self.duration.as_secs()),
            }],
            "guardrails": self.guardrails,
        }))
        .expect("a valid plan")
    }
}

fn unit(rng: &mut Xoshiro256PlusPlus) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// A request that succeeds with probability `success`.
fn observe(rng: &mut Xoshiro256PlusPlus, success: f64) -> Observation {
    // Box-Muller: a standard normal from two uniforms.
    let (u1, u2) = (unit(rng).max(f64::MIN_POSITIVE), unit(rng));
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    Observation {
        success: unit(rng) < success,
        latency: Duration::from_secs_f64(0.8 * (0.5 * z).exp()),
        tokens: Some(200 + rng.next_u64() % 601),
    }
}

/// One stage, look by look, until it ends (or is held for a whole stage's
/// length past its end).
fn run(seed: u64, setup: &Setup, plan: &RolloutConfig) -> Outcome {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let (stable, canary) = (
        Arc::new(Window::new(INTERVAL)),
        Arc::new(Window::new(INTERVAL)),
    );
    // Ten minutes in, at a random point of a slot.
    let since = Duration::from_secs(600) + INTERVAL.mul_f64(unit(&mut rng));
    let mut tallies: Option<(Tally, Tally)> = None;
    let planned = stats::planned_looks(plan);
    let (mut runs, mut waiting) = (FailureRuns::new(), 0);
    let step = Duration::from_secs(1) / u32::try_from(setup.rate_per_second).expect("a rate");
    let mut at = since;
    for look in 1.. {
        let now = since + INTERVAL * look;
        while at < now {
            let (window, success) = if unit(&mut rng) < setup.weight {
                (&canary, setup.canary_success)
            } else {
                (&stable, STABLE_SUCCESS)
            };
            window.record(at, observe(&mut rng, success));
            at += step;
        }
        let (stage_stable, stage_canary) = tallies.get_or_insert_with(|| {
            (
                Tally::new(&stable, Some(since), now),
                Tally::new(&canary, Some(since), now),
            )
        });
        let (stage_stable, stage_canary) = (stage_stable.sample(now), stage_canary.sample(now));
        let (recent_stable, recent_canary) = (
            stable.snapshot_since(now, since),
            canary.snapshot_since(now, since),
        );
        let evaluations = evaluate_over(
            &plan.guardrails,
            Cohorts {
                stable: Some(&recent_stable),
                canary: &recent_canary,
            },
            Some(Cohorts {
                stable: Some(&stage_stable),
                canary: &stage_canary,
            }),
            None,
            plan.min_requests,
            Look {
                index: look,
                planned,
            },
        );
        let elapsed = INTERVAL * look;
        let stage_over = elapsed >= setup.duration;
        let verdict = judge::overall(&evaluations);
        let tripped =
            judge::count_failures(&mut runs, &mut waiting, &evaluations, plan, stage_over);
        if !tripped.guardrails.is_empty() {
            return Outcome::RolledBack;
        }
        if tripped.inconclusive {
            return Outcome::PausedForData;
        }
        if stage_over
            && setup.pause_past_limit
            && verdict == Verdict::Inconclusive
            && judge::past_limit(&evaluations).is_some()
        {
            return Outcome::PausedPastLimit;
        }
        if stage_over && verdict == Verdict::Pass {
            return if elapsed < setup.duration + INTERVAL {
                Outcome::PromotedOnTime
            } else {
                Outcome::PromotedLater
            };
        }
        if elapsed >= setup.duration * 2 {
            return Outcome::Held;
        }
    }
    unreachable!("the looks go on until the stage ends")
}

/// The share of `runs` seeded stages that ended each way.
fn simulate(setup: &Setup, runs: u64) -> BTreeMap<Outcome, f64> {
    let plan = setup.plan();
    let mut ends = BTreeMap::new();
    for seed in 0..runs {
        *ends.entry(run(seed, setup, &plan)).or_insert(0.0) += 1.0 / runs as f64;
    }
    ends
}

fn runs() -> u64 {
    std::env::var("STAGE_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(200)
}

fn share(ends: &BTreeMap<Outcome, f64>, which: &[Outcome]) -> f64 {
    which.iter().filter_map(|end| ends.get(end)).sum()
}

fn print(name: &str, rule: &str, ends: &BTreeMap<Outcome, f64>) {
    let shares: Vec<String> = ends
        .iter()
        .map(|(end, share)| format!("{end:?} {:.1}%", 100.0 * share))
        .collect();
    println!("| {name} | {rule} | {} |", shares.join(", "));
}

#[test]
fn a_canary_just_past_its_floor_is_seldom_promoted_at_the_stages_end() {
    let runs = runs();
    let setup = |canary_success, pause_past_limit| Setup {
        rate_per_second: 20,
        weight: 0.05,
        duration: Duration::from_secs(30 * 60),
        canary_success,
        guardrails: json!({"success_rate_min": 0.97}),
        pause_past_limit,
    };
    println!("{runs} stages per row: 5% of 20 req/s for 30 min, success_rate_min = 0.97");
    let mut promoted = BTreeMap::new();
    for (name, success) in [("canary 0.965", 0.965), ("canary 0.99", 0.99)] {
        for (rule, pause) in [("pause past limit", true), ("re-look", false)] {
            let ends = simulate(&setup(success, pause), runs);
            print(name, rule, &ends);
            let share = share(&ends, &[Outcome::PromotedOnTime, Outcome::PromotedLater]);
            promoted.insert((name, rule), share);
        }
    }
    let just_past = promoted[&("canary 0.965", "pause past limit")];
    assert!(just_past < 0.2, "0.965 promoted {just_past:.3}");
    let healthy = promoted[&("canary 0.99", "pause past limit")];
    assert!(healthy > 0.95, "0.99 promoted {healthy:.3}");
}

#[test]
fn at_low_traffic_a_healthy_canary_is_judged_over_its_stage_and_seldom_held() {
    let runs = runs();
    let setup = |guardrails| Setup {
        rate_per_second: 1,
        weight: 0.01,
        duration: Duration::from_secs(6 * 3600),
        canary_success: STABLE_SUCCESS,
        guardrails,
        pause_past_limit: true,
    };
    println!("{runs} stages per row: 1% of 1 req/s for 6 h, a canary like stable");
    let floor = json!({"success_rate_min": 0.97});
    let all = json!({
        "success_rate_min": 0.97,
        "success_rate_drop_max": 0.01,
        "p95_latency_ratio_max": 1.2,
        "p95_latency_ms_max": 8000,
        "tokens_ratio_max": 1.15,
    });
    for (name, guardrails, at_least) in [("floor only", floor, 0.9), ("all five", all, 0.8)] {
        let ends = simulate(&setup(guardrails), runs);
        print(name, "pause past limit", &ends);
        let promoted = share(&ends, &[Outcome::PromotedOnTime, Outcome::PromotedLater]);
        assert!(promoted > at_least, "{name}: promoted {promoted:.3}");
        let rolled_back = share(&ends, &[Outcome::RolledBack]);
        assert!(rolled_back < 0.05, "{name}: rolled back {rolled_back:.3}");
    }
}
