//! Whole-rollout simulations of the guardrail statistics.
//!
//! Owns: checking that `rollout::stats` over `rollout::window` keeps the
//! false-rollback rate of a whole rollout under `1 - confidence` and still
//! catches real regressions, on seeded simulated traffic, next to a
//! fixed-threshold check (Argo Rollouts' `successCondition` style) on the
//! same traffic. Does not own: the controller (stage moves, timers, the
//! admin API); this models only what it does with verdicts.
//!
//! The model, stated once:
//! - 20 requests per second in total, each sent to the canary with the
//!   stage's weight; plan: 1% for 30 minutes, then 10% for 30 minutes.
//! - One look every 30 s (120 planned looks); each look compares both
//!   cohorts over the same sliding window: the slots since the stage's
//!   weight took effect, less the one it took effect in (here the stage's
//!   whole first slot, the worst case), up to the ring's whole span (60
//!   slots of 30 s = 30 minutes), with `min_requests = 200` per cohort.
//! - A guardrail failing 2 looks in a row (`failure_limit = 2`) rolls back;
//!   `pass` resets its count, `inconclusive` leaves it. Stage gates (moving
//!   on only after a pass) are not modelled: a rollout either rolls back or
//!   runs the full hour.
//! - Stable: success 0.99 (failures independent), latency log-normal with
//!   median 800 ms and sigma 0.5 (p95 = 1.82 s), tokens uniform in 200..=800.
//! - Guardrails: `success_rate_min = 0.97`, `success_rate_drop_max = 0.01`,
//!   `p95_latency_ratio_max = 1.2`, `p95_latency_ms_max = 8000`,
//!   `tokens_ratio_max = 1.15`, `confidence = 0.95`.
//!   A fourth scenario, printed but not asserted, uses the spec's example
//!   `success_rate_drop_max = 0.02`.
//! - Fixed thresholds, same windows, same `min_requests`, same
//!   `failure_limit`: a look fails when the canary's success rate is below
//!   the stable's 0.99 less the same tolerance (0.98; 0.97 in the fourth
//!   scenario) or its p95 is above 2184 ms (1.2 times the stable's true p95).
//! - The scenarios share their random draws (see [`rollout`]).
//!
//! Run with `cargo test --release --test rollout_statistics -- --nocapture`
//! to see the table; the assertions hold in debug builds too.

use std::time::Duration;

use cohort::config::Guardrails;
use cohort::rollout::stats::{Look, Verdict, evaluate};
use cohort::rollout::window::{Observation, Sample, Window, latency_bin_edges};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{Rng, SeedableRng};
use statrs::distribution::{ContinuousCDF, Normal};

const RATE_PER_SECOND: u64 = 20;
const INTERVAL_SECONDS: u64 = 30;
const PLAN: [(f64, u64); 2] = [(0.01, 30 * 60), (0.10, 30 * 60)];
const FAILURE_LIMIT: u32 = 2;
const MIN_REQUESTS: u64 = 200;
const ROLLOUTS: u64 = 1_000;

const STABLE_SUCCESS: f64 = 0.99;
const MEDIAN_MS: f64 = 800.0;
const SIGMA: f64 = 0.5;
/// The stable's true p95: median * exp(1.6449 * sigma).
const STABLE_P95_MS: f64 = 1_820.0;

const FIXED_P95_MS_MAX: f64 = 1.2 * STABLE_P95_MS;

fn guardrails() -> Guardrails {
    Guardrails {
        success_rate_min: Some(0.97),
        success_rate_drop_max: Some(0.01),
        p95_latency_ratio_max: Some(1.2),
        p95_latency_ms_max: Some(8_000.0),
        tokens_ratio_max: Some(1.15),
        eval_score_min: None,
        confidence: 0.95,
    }
}

#[derive(Clone, Copy, Default)]
struct Outcome {
    /// Canary requests served when the rollback happened.
    rolled_back_after: Option<u64>,
}

/// Counts failures in a row per check and says when one reaches the limit.
struct Streaks(Vec<u32>);

impl Streaks {
    fn look(&mut self, verdicts: impl Iterator<Item = Verdict>) -> bool {
        let mut rollback = false;
        for (streak, verdict) in self.0.iter_mut().zip(verdicts) {
            match verdict {
                Verdict::Fail => *streak += 1,
                Verdict::Pass => *streak = 0,
                Verdict::Inconclusive | Verdict::NotApplicable => {}
            }
            rollback |= *streak >= FAILURE_LIMIT;
        }
        rollback
    }
}

/// Simulated requests. One 64-bit draw per request, cut into independent
/// fields (the generator's bits are uniform and independent, so disjoint bit
/// ranges are independent variables; one draw keeps the simulation fast in
/// debug builds):
/// - bits 0..12: latency, an index into 4,096 equal-probability quantiles
///   of the cohort's log-normal (its quantile function at (i + 0.5) / 2^12:
///   steps of 0.1% around the p95, far finer than the histogram's bins);
/// - bits 12..32: success, true below `success * 2^20`;
/// - bits 32..52: cohort, canary below `weight * 2^20`;
/// - bits 52..64: tokens, `200 + ((bits * 601) >> 12)`, in 200..=800.
struct Traffic {
    rng: Xoshiro256PlusPlus,
    canary_below: u64,
}

struct Behaviour {
    success_below: u64,
    latency_micros: Vec<u32>,
}

impl Behaviour {
    fn new(success: f64, latency_scale: f64) -> Self {
        let normal = Normal::standard();
        let latency_micros = (0..1u32 << 12)
            .map(|i| {
                let z = normal.inverse_cdf((f64::from(i) + 0.5) / f64::from(1u32 << 12));
                (latency_scale * MEDIAN_MS * 1_000.0 * (SIGMA * z).exp()) as u32
            })
            .collect();
        Self {
            success_below: fraction_of(success, 20),
            latency_micros,
        }
    }
}

fn fraction_of(share: f64, bits: u32) -> u64 {
    (share * f64::from(1u32 << bits)).round() as u64
}

impl Traffic {
    /// The next request: whether it went to the canary, and its draw.
    fn next(&mut self) -> (bool, u64) {
        let bits = self.rng.next_u64();
        (field(bits, 32, 20) < self.canary_below, bits)
    }
}

fn field(bits: u64, shift: u32, width: u32) -> u64 {
    (bits >> shift) & ((1 << width) - 1)
}

/// The outcome of a request drawn as `bits` from a cohort that behaves so.
fn observe(bits: u64, behaviour: &Behaviour) -> Observation {
    let latency = behaviour.latency_micros[field(bits, 0, 12) as usize];
    Observation {
        success: field(bits, 12, 20) < behaviour.success_below,
        latency: Duration::from_micros(u64::from(latency)),
        tokens: Some(200 + ((field(bits, 52, 12) * 601) >> 12)),
    }
}

/// The p95 (nearest rank) as its bin's midpoint, in milliseconds: what a
/// fixed-threshold check reads off the same histogram.
fn p95_ms(sample: &Sample) -> f64 {
    let rank = (0.95 * sample.requests as f64).ceil() as u64;
    let mut seen = 0;
    let mut bin = 0;
    while bin < sample.latency.len() {
        seen += sample.latency[bin];
        if seen >= rank {
            let (lower, upper) = latency_bin_edges(bin);
            return (lower + upper) as f64 / 2_000.0;
        }
        bin += 1;
    }
    f64::INFINITY
}

/// A simulated canary: how it behaves and what it is judged by.
struct Scenario {
    name: &'static str,
    behaviour: Behaviour,
    guardrails: Guardrails,
    /// The fixed-threshold check's success-rate floor.
    fixed_success_min: f64,
}

/// One scenario's canary inside a rollout, and how each method judged it.
struct Arm<'a> {
    scenario: &'a Scenario,
    window: Window,
    statistical: Outcome,
    fixed: Outcome,
    statistical_streaks: Streaks,
    fixed_streaks: Streaks,
}

/// One whole rollout for every scenario at once. The scenarios share the
/// draws (common random numbers): the same users reach the canary, the
/// stable cohort is the same, and each scenario's canary turns the same
/// draw into its own outcome. Each scenario alone is an ordinary simulation;
/// sharing makes the comparison sharper and the simulation fast.
fn rollout(seed: u64, stable: &Behaviour, scenarios: &[Scenario]) -> Vec<(Outcome, Outcome)> {
    let mut traffic = Traffic {
        rng: Xoshiro256PlusPlus::seed_from_u64(seed),
        canary_below: 0,
    };
    let interval = Duration::from_secs(INTERVAL_SECONDS);
    let stable_window = Window::new(interval);
    let mut arms: Vec<Arm> = scenarios
        .iter()
        .map(|scenario| Arm {
            scenario,
            window: Window::new(interval),
            statistical: Outcome::default(),
            fixed: Outcome::default(),
            statistical_streaks: Streaks(vec![0; 6]),
            fixed_streaks: Streaks(vec![0; 2]),
        })
        .collect();
    let planned = PLAN
        .iter()
        .map(|(_, seconds)| seconds / INTERVAL_SECONDS)
        .sum::<u64>() as u32;
    let (mut second, mut look, mut canary_served) = (0u64, 0u32, 0u64);
    'plan: for (weight, seconds) in PLAN {
        traffic.canary_below = fraction_of(weight, 20);
        let stage_began = Duration::from_secs(second);
        for _ in 0..seconds {
            for i in 0..RATE_PER_SECOND {
                let at = Duration::from_millis(second * 1_000 + i * 1_000 / RATE_PER_SECOND);
                let (to_canary, bits) = traffic.next();
                if to_canary {
                    canary_served += 1;
                    for arm in &arms {
                        arm.window
                            .record(at, observe(bits, &arm.scenario.behaviour));
                    }
                } else {
                    stable_window.record(at, observe(bits, stable));
                }
            }
            second += 1;
            if second % INTERVAL_SECONDS != 0 {
                continue;
            }
            look += 1;
            // The look happens at the end of the interval: the last
            // millisecond of the slot just filled.
            let now = Duration::from_millis(second * 1_000 - 1);
            let stable_sample = stable_window.snapshot_since(now, stage_began);
            for arm in &mut arms {
                let canary = arm.window.snapshot_since(now, stage_began);
                if arm.statistical.rolled_back_after.is_none() {
                    let evaluations = evaluate(
                        &arm.scenario.guardrails,
                        Some(&stable_sample),
                        &canary,
                        None,
                        MIN_REQUESTS,
                        Look {
                            index: look,
                            planned,
                        },
                    );
                    if arm
                        .statistical_streaks
                        .look(evaluations.iter().map(|e| e.verdict))
                    {
                        arm.statistical.rolled_back_after = Some(canary_served);
                    }
                }
                if arm.fixed.rolled_back_after.is_none() {
                    let enough =
                        stable_sample.requests >= MIN_REQUESTS && canary.requests >= MIN_REQUESTS;
                    let check = |failed: bool| match (enough, failed) {
                        (false, _) => Verdict::Inconclusive,
                        (true, true) => Verdict::Fail,
                        (true, false) => Verdict::Pass,
                    };
                    let rate = canary.successes as f64 / canary.requests.max(1) as f64;
                    let verdicts = [
                        check(rate < arm.scenario.fixed_success_min),
                        check(p95_ms(&canary) > FIXED_P95_MS_MAX),
                    ];
                    if arm.fixed_streaks.look(verdicts.into_iter()) {
                        arm.fixed.rolled_back_after = Some(canary_served);
                    }
                }
            }
            let decided = |o: &Outcome| o.rolled_back_after.is_some();
            if arms
                .iter()
                .all(|a| decided(&a.statistical) && decided(&a.fixed))
            {
                break 'plan;
            }
        }
    }
    arms.iter().map(|a| (a.statistical, a.fixed)).collect()
}

struct Summary {
    rolled_back: usize,
    median_canary_requests: Option<u64>,
}

impl Summary {
    fn of(outcomes: impl Iterator<Item = Outcome>) -> Self {
        let mut detected: Vec<u64> = outcomes.filter_map(|o| o.rolled_back_after).collect();
        detected.sort_unstable();
        Summary {
            rolled_back: detected.len(),
            median_canary_requests: detected.get(detected.len() / 2).copied(),
        }
    }

    fn rate(&self) -> f64 {
        self.rolled_back as f64 / ROLLOUTS as f64
    }

    fn median(&self) -> String {
        self.median_canary_requests
            .map_or("-".to_owned(), |n| n.to_string())
    }
}

/// Runs `ROLLOUTS` seeded rollouts on every core and sums up each scenario
/// as (statistical, fixed threshold); the result does not depend on the
/// number of threads.
fn simulate(scenarios: &[Scenario]) -> Vec<(Summary, Summary)> {
    let stable = &Behaviour::new(STABLE_SUCCESS, 1.0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let results: Vec<Vec<(Outcome, Outcome)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    (0..ROLLOUTS)
                        .filter(|i| i % threads == t)
                        .map(|i| rollout(i, stable, scenarios))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("simulation thread"))
            .collect()
    });
    (0..scenarios.len())
        .map(|s| {
            (
                Summary::of(results.iter().map(|r| r[s].0)),
                Summary::of(results.iter().map(|r| r[s].1)),
            )
        })
        .collect()
}

#[test]
fn whole_rollouts_hold_false_rollbacks_and_catch_regressions() {
    let scenario = |name, success, latency_scale, guardrails: Guardrails| Scenario {
        name,
        behaviour: Behaviour::new(success, latency_scale),
        fixed_success_min: STABLE_SUCCESS - guardrails.success_rate_drop_max.unwrap_or(0.0),
        guardrails,
    };
    let scenarios = [
        scenario("same as stable", STABLE_SUCCESS, 1.0, guardrails()),
        scenario(
            "success 0.99 -> 0.96",
            STABLE_SUCCESS - 0.03,
            1.0,
            guardrails(),
        ),
        scenario(
            "latency x1.5 (p95 1.82 s -> 2.73 s)",
            STABLE_SUCCESS,
            1.5,
            guardrails(),
        ),
        // Not asserted: the spec's example tolerance of 2 points, which a
        // 3-point drop exceeds by only 1 point.
        scenario(
            "success 0.99 -> 0.96, drop_max 0.02",
            STABLE_SUCCESS - 0.03,
            1.0,
            Guardrails {
                success_rate_drop_max: Some(0.02),
                ..guardrails()
            },
        ),
    ];
    let summaries = simulate(&scenarios);

    println!("{ROLLOUTS} rollouts per row; 20 req/s; 1% for 30 min then 10% for 30 min;");
    println!("a look every 30 s over a 30 min window; failure_limit = 2; min_requests = 200");
    println!("| canary | method | rolled back | median canary requests to rollback |");
    println!("|---|---|---|---|");
    for (scenario, (statistical, fixed)) in scenarios.iter().zip(&summaries) {
        let name = scenario.name;
        let (s, f) = (statistical, fixed);
        println!(
            "| {name} | statistical | {:.1}% | {} |",
            100.0 * s.rate(),
            s.median()
        );
        println!(
            "| {name} | fixed threshold | {:.1}% | {} |",
            100.0 * f.rate(),
            f.median()
        );
    }

    let statistical = |i: usize| summaries[i].0.rate();
    assert!(
        statistical(0) < 0.05,
        "false rollbacks {:.3}",
        statistical(0)
    );
    assert!(
        statistical(1) >= 0.95,
        "success drop caught {:.3}",
        statistical(1)
    );
    assert!(
        statistical(2) >= 0.95,
        "p95 x1.5 caught {:.3}",
        statistical(2)
    );
}
