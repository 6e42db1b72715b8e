//! Guardrail statistics: the verdict of every guardrail at one look.
//!
//! Owns: judging a canary [`Sample`] against a stable one over the same
//! window, for each configured guardrail, at a significance level that
//! keeps the false-rollback rate of a whole rollout at `1 - confidence`.
//! Pure: no I/O, no clock. Does not own: collecting the samples
//! (`rollout::window`), counting failures in a row, stages or timers (the
//! controller).
//!
//! # Verdicts
//!
//! The absolute guardrails (`success_rate`, `p95_latency_ms`, `eval_score`)
//! judge the canary against a fixed limit and need nothing of stable; the
//! relative ones (`success_rate_drop`, `p95_latency_ratio`, `tokens_ratio`)
//! compare the canary with stable and need both cohorts.
//!
//! - `inconclusive`: the canary has fewer than `min_requests` requests in
//!   the window, or, for a relative guardrail, stable has (for
//!   `tokens_ratio`: requests that reported tokens); or no `eval_score`
//!   has been reported.
//! - `not_applicable`: a relative guardrail when there is no stable sample
//!   to compare with, because stable takes no traffic by design (the
//!   canary at 100%). It neither holds a stage nor counts against the
//!   canary; the absolute guardrails still judge.
//! - `fail`: the data show that the limit is breached: the test of "the
//!   canary is within the limit" rejects at this look's level.
//! - `inconclusive` too: enough data and no significant breach, but the
//!   canary's measured value is past the limit: the data have not decided
//!   yet. A p95 is measured as its test counts it: past a limit when more
//!   than 5% of the canary falls in latency bins wholly above it.
//! - `pass`: enough data, no significant breach, and the measured value
//!   within the limit. The gate does not ask
//!   the canary to prove itself within the limit at every look: with a 1%
//!   canary that proof needs far more requests than a stage sees, so a
//!   proof-based gate would sit at `inconclusive` and stall healthy
//!   rollouts. The error this module budgets is the false rollback; the
//!   protection against passing a bad canary on too little data is
//!   `min_requests`, and power grows as the window fills and the canary's
//!   share grows (a regression too small to show at 1% shows at 10%).
//!
//! A look may also pass everything since the weight took effect
//! ([`evaluate_over`]): a guardrail the window holds too little data for
//! is then judged over that instead, with a single test, so no level is
//! spent twice; and it passes only if the window does not show the canary
//! past the limit at the plan's own level (a check that fails nothing).
//!
//! # Tests
//!
//! Each is one-sided, asking "is the canary worse than the limit?":
//!
//! - `success_rate` (floor `m`): exact binomial test of the canary's
//!   successes against `m` (statrs `Binomial`).
//! - `success_rate_drop` (stable minus canary at most `d`): two-proportion
//!   score test with the margin `d` (Farrington and Manning, 1990); the
//!   variance is taken at the maximum-likelihood rates restricted to
//!   `p_stable - p_canary = d`, found by bisection on the score. At `d = 0`
//!   it is the classic pooled two-proportion z-test. With failures rare
//!   (a reliable service, a small canary) its normal approximation is far
//!   from exact: one canary failure in 200 against none in 20 000 stable
//!   scores z = 10. So a breach must also be significant under Fisher's
//!   exact test of "the canary fails no more often than stable" (the
//!   hypergeometric tail of the canary's share of all failures), which any
//!   breach of a margin `d >= 0` is a breach of too.
//! - `p95_latency_ms` (ceiling `L`): if the canary's p95 were at most `L`,
//!   at most 5% of its requests would be slower than `L`; exact binomial
//!   test of the count above `L` against 5%. Only histogram bins wholly
//!   above `L` count, which can only understate the count.
//! - `p95_latency_ratio` (canary p95 / stable p95 at most `r`): the same
//!   test with `L = r * U`, where `U` is an upper confidence bound of the
//!   stable p95 (an order statistic, distribution-free, rounded up to its
//!   bin's upper edge); the look's level is split between the bound and the
//!   test. This tests the p95 itself. A rank test such as Mann-Whitney
//!   compares whole distributions (`P(canary > stable)`), so it would fail
//!   a canary whose median rose with an unchanged p95 and pass one whose
//!   tail alone doubled; it answers a different question than this
//!   guardrail asks.
//! - `tokens_ratio` (canary mean / stable mean at most `r`): Welch-type
//!   z-test of `mean_c - r * mean_s > 0` (large-sample normal).
//! - `eval_score` (at least `e`): a single number reported from outside,
//!   with no sample to test: `fail` below `e`, `pass` otherwise.
//!
//! # Repeated looks
//!
//! The controller evaluates every interval, on overlapping windows, and a
//! test run at level `a` on every look would raise a false alarm far more
//! often than `a` over a rollout. The level `alpha = 1 - confidence` is
//! therefore spent across the looks and guardrails (an alpha-spending
//! plan with a linear spending function, Lan and DeMets, 1983), and the
//! union bound makes the spent levels add up: the probability that any
//! statistical guardrail fails any look while the canary is within every
//! limit is at most `alpha`, whatever the correlation between looks. That
//! correlation is why a sliding window rules out the sharper boundaries
//! of group-sequential designs (O'Brien-Fleming) and the always-valid
//! mixture SPRT / confidence sequences (Johari et al., 2017; Howard et al.,
//! 2021): those assume that each look sees the data of the previous one
//! plus more, and a sliding window also forgets. The union bound needs no
//! such assumption.
//!
//! Look `k` of `P` planned looks gets `0.9 * alpha / P`. Looks beyond the
//! plan (a held last stage, and every look while a pause waits for
//! approval) share the remaining `0.1 * alpha` as
//! `0.1 * alpha * P / (k * (k - 1))`, numbered `k = P + 1, P + 2, ...` in
//! the order they come, a series that sums to it, so no number of extra
//! looks can spend more than `alpha`. A look at a pause is never one of the
//! planned ones, so a long wait at a gate leaves their share to the stages
//! after it. Each look's level is divided equally among the statistical
//! guardrails judged at that look. Requiring `failure_limit` failures in a row
//! lowers the false-rollback rate further; no credit is taken for it.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use statrs::distribution::{Binomial, ContinuousCDF, DiscreteCDF, Hypergeometric, Normal};

use crate::config::{Guardrails, RolloutConfig, Stage};
use crate::rollout::window::{LATENCY_BINS, Sample, latency_bin, latency_bin_edges};

/// The share of alpha spent on the planned looks; the rest covers overruns.
const PLANNED_SHARE: f64 = 0.9;

/// The outcome of one guardrail at one look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail,
    Inconclusive,
    /// A relative guardrail with no stable cohort to compare with (the
    /// canary at 100%): not judged, so it neither holds a stage nor counts
    /// against the canary.
    NotApplicable,
}

/// Which look this is: `index` counts from 1 over the whole rollout;
/// `planned` is [`planned_looks`] of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Look {
    pub index: u32,
    pub planned: u32,
}

/// The guardrail that judges the score reported from outside
/// (`POST /admin/signals`); its evaluation's `canary` is that score.
pub const EVAL_SCORE: &str = "eval_score";

/// One guardrail's evaluation, as `GET /admin/state` shows it.
///
/// `stable` and `canary` are each cohort's value of the measured quantity
/// (success rate; p95 latency in milliseconds for both p95 guardrails; mean
/// tokens per request; the reported eval score for the canary), `None` when
/// the cohort has no data for it. `limit` is the configured limit in the
/// guardrail's own terms: a floor, a drop, a ratio, milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Owned when read back from the saved state, a literal when fresh.
    pub guardrail: Cow<'static, str>,
    pub stable: Option<f64>,
    pub canary: Option<f64>,
    pub limit: f64,
    pub verdict: Verdict,
    /// An inconclusive verdict on enough data: the canary measures past
    /// the limit, without proof yet. Not saved: it decides only the look
    /// that made it.
    #[serde(skip)]
    pub past_limit: bool,
}

/// The looks a plan makes if every stage ends on time: one per `interval`
/// of every weighted stage (pauses have no planned length), at least one.
#[must_use]
pub fn planned_looks(config: &RolloutConfig) -> u32 {
    let interval = config.interval.as_millis().max(1);
    let looks: u128 = config
        .stages
        .iter()
        .map(|stage| match stage {
            Stage::Weight { duration, .. } => duration.as_millis().div_ceil(interval),
            Stage::Pause => 0,
        })
        .sum();
    u32::try_from(looks).unwrap_or(u32::MAX).max(1)
}

/// The significance level of one statistical guardrail at `look`, when
/// `guardrails` of them are judged at that look (see the module doc).
#[must_use]
pub fn look_alpha(confidence: f64, look: Look, guardrails: usize) -> f64 {
    let alpha = (1.0 - confidence).clamp(0.0, 1.0);
    let planned = f64::from(look.planned.max(1));
    let k = f64::from(look.index.max(1));
    let share = if k <= planned {
        PLANNED_SHARE / planned
    } else {
        (1.0 - PLANNED_SHARE) * planned / (k * (k - 1.0))
    };
    alpha * share / guardrails.max(1) as f64
}

/// Both cohorts' samples over one span; `stable` is `None` when stable
/// takes no traffic by design (the canary at 100%).
#[derive(Debug, Clone, Copy)]
pub struct Cohorts<'a> {
    pub stable: Option<&'a Sample>,
    pub canary: &'a Sample,
}

/// What one guardrail measured over one pair of samples.
struct Measured {
    /// Enough data for the guardrail to judge.
    enough: bool,
    /// The p-value of "the canary is within the limit".
    p_breach: f64,
    /// The canary's measured value is within the limit (so with no data).
    within: bool,
    stable: Option<f64>,
    canary: Option<f64>,
}

/// Judges every configured guardrail at one look. The stable and canary
/// samples must cover the same window; `stable` is `None` when stable takes
/// no traffic by design (the canary at 100%), which leaves the relative
/// guardrails [`Verdict::NotApplicable`] and the absolute ones judging the
/// canary alone.
#[must_use]
pub fn evaluate(
    guardrails: &Guardrails,
    stable: Option<&Sample>,
    canary: &Sample,
    eval_score: Option<f64>,
    min_requests: u64,
    look: Look,
) -> Vec<Evaluation> {
    let cohorts = Cohorts { stable, canary };
    evaluate_over(guardrails, cohorts, None, eval_score, min_requests, look)
}

/// [`evaluate`], over the `recent` samples (the windows' last span), save
/// that a guardrail they hold too little data for is judged over `stage`
/// (everything since the weight took effect) if given; a pass there also
/// needs `recent` not to show the canary past the limit at the plan's
/// level (`1 - confidence`), so that the hours a canary was fine cannot
/// outvote the requests it has failed since. That check can only hold a
/// pass, never fail a guardrail, so only one test per guardrail spends
/// the look's level.
#[must_use]
pub fn evaluate_over(
    guardrails: &Guardrails,
    recent: Cohorts<'_>,
    stage: Option<Cohorts<'_>>,
    eval_score: Option<f64>,
    min_requests: u64,
    look: Look,
) -> Vec<Evaluation> {
    let g = guardrails;
    // The relative guardrails are judged only beside a stable cohort.
    let compared = recent.stable.is_some();
    let absolute = [g.success_rate_min, g.p95_latency_ms_max];
    let relative = [
        g.success_rate_drop_max,
        g.p95_latency_ratio_max,
        g.tokens_ratio_max,
    ];
    let tests = absolute.iter().flatten().count()
        + if compared {
            relative.iter().flatten().count()
        } else {
            0
        };
    let alpha = look_alpha(g.confidence, look, tests);
    // The level at which the few requests of a thin last span may show the
    // canary past its limit, to hold a pass over the whole stage: the
    // plan's own, not a look's share of it, as this fails nothing.
    let veto_level = (1.0 - g.confidence).clamp(0.0, 1.0);
    let judge = |measure: &dyn Fn(Cohorts<'_>) -> Measured| {
        let last = measure(recent);
        let Some(stage) = stage.filter(|_| !last.enough) else {
            return Judged::of(&last, alpha);
        };
        let judged = Judged::of(&measure(stage), alpha);
        // However well the stage went, a pass needs the requests since the
        // last span began not to show the canary past the limit; one bad
        // request among a handful shows nothing.
        if judged.verdict == Verdict::Pass && !last.within && last.p_breach <= veto_level {
            return Judged {
                verdict: Verdict::Inconclusive,
                stable: last.stable,
                canary: last.canary,
                past_limit: true,
            };
        }
        judged
    };
    // A relative guardrail with no stable cohort: not judged, its canary
    // value shown.
    let relative_judge = |measure: &dyn Fn(Cohorts<'_>) -> Measured| {
        if compared {
            judge(measure)
        } else {
            Judged::not_applicable(measure(recent).canary)
        }
    };

    let mut out = Vec::new();
    let mut push = |guardrail: &'static str, limit, judged: Judged| {
        out.push(Evaluation {
            guardrail: Cow::Borrowed(guardrail),
            stable: judged.stable,
            canary: judged.canary,
            limit,
            verdict: judged.verdict,
            past_limit: judged.past_limit,
        });
    };
    if let Some(floor) = g.success_rate_min {
        let judged = judge(&|c| success_rate(c, floor, min_requests));
        push("success_rate", floor, judged);
    }
    if let Some(drop) = g.success_rate_drop_max {
        let exact_below = alpha.max(veto_level);
        let judged = relative_judge(&|c| success_rate_drop(c, drop, min_requests, exact_below));
        push("success_rate_drop", drop, judged);
    }
    if let Some(ratio) = g.p95_latency_ratio_max {
        let judged = relative_judge(&|c| p95_latency_ratio(c, ratio, min_requests, alpha));
        push("p95_latency_ratio", ratio, judged);
    }
    if let Some(ceiling_ms) = g.p95_latency_ms_max {
        let judged = judge(&|c| p95_latency_ceiling(c, ceiling_ms, min_requests));
        push("p95_latency_ms", ceiling_ms, judged);
    }
    if let Some(ratio) = g.tokens_ratio_max {
        let judged = relative_judge(&|c| tokens_ratio(c, ratio, min_requests));
        push("tokens_ratio", ratio, judged);
    }
    if let Some(floor) = g.eval_score_min {
        let verdict = match eval_score {
            None => Verdict::Inconclusive,
            Some(score) if score < floor => Verdict::Fail,
            Some(_) => Verdict::Pass,
        };
        let judged = Judged {
            verdict,
            stable: None,
            canary: eval_score,
            past_limit: false,
        };
        push(EVAL_SCORE, floor, judged);
    }
    out
}

/// One guardrail's verdict at a look, with the values it was made on.
struct Judged {
    verdict: Verdict,
    stable: Option<f64>,
    canary: Option<f64>,
    /// See [`Evaluation::past_limit`].
    past_limit: bool,
}

impl Judged {
    /// The verdict on `measured` at level `alpha`. No proven breach is not
    /// enough for a pass: at 1% a canary can measure past its limit
    /// (`within` false) for a long while before the data prove it, and
    /// such a look is inconclusive, so the canary holds its stage instead
    /// of taking more users (and, held too long, pauses for a person).
    fn of(measured: &Measured, alpha: f64) -> Judged {
        let verdict = if !measured.enough {
            Verdict::Inconclusive
        } else if measured.p_breach <= alpha {
            Verdict::Fail
        } else if measured.within {
            Verdict::Pass
        } else {
            Verdict::Inconclusive
        };
        Judged {
            verdict,
            stable: measured.stable,
            canary: measured.canary,
            past_limit: measured.enough && verdict == Verdict::Inconclusive,
        }
    }

    /// A relative guardrail with no stable cohort to compare with.
    fn not_applicable(canary: Option<f64>) -> Judged {
        Judged {
            verdict: Verdict::NotApplicable,
            stable: None,
            canary,
            past_limit: false,
        }
    }
}

/// `success_rate_min`: the canary's success rate at least `floor`.
fn success_rate(c: Cohorts<'_>, floor: f64, min_requests: u64) -> Measured {
    let canary = c.canary;
    let failures = canary.requests - canary.successes;
    let p = if at_most_expected(failures, canary.requests, 1.0 - floor) {
        1.0
    } else {
        binomial_at_most(canary.successes, canary.requests, floor)
    };
    Measured {
        // An absolute guardrail needs only the canary's requests.
        enough: canary.requests >= min_requests,
        p_breach: p,
        within: rate(canary).is_none_or(|rate| rate >= floor),
        stable: c.stable.and_then(rate),
        canary: rate(canary),
    }
}

/// `success_rate_drop_max`: the canary's success rate at most `drop` below
/// stable's. The exact tail is computed only where the score test's
/// p-value is at most `exact_below` (where it would fail or hold a pass;
/// see `veto_level`): it costs a sum over the failures.
fn success_rate_drop(c: Cohorts<'_>, drop: f64, min_requests: u64, exact_below: f64) -> Measured {
    let Some(stable) = c.stable else {
        return Measured::canary_alone(rate(c.canary));
    };
    let canary = c.canary;
    let z = drop_z(
        stable.successes,
        stable.requests,
        canary.successes,
        canary.requests,
        drop,
    );
    let p = match upper_p(z) {
        p if p <= exact_below => p.max(more_failures_p(stable, canary)),
        p => p,
    };
    let (stable_rate, canary_rate) = (rate(stable), rate(canary));
    Measured {
        enough: both_hold(stable, canary, min_requests),
        p_breach: p,
        within: match (stable_rate, canary_rate) {
            (Some(stable), Some(canary)) => stable - canary <= drop,
            _ => true,
        },
        stable: stable_rate,
        canary: canary_rate,
    }
}

/// `p95_latency_ratio_max`: the canary's p95 at most `ratio` times stable's.
/// Half the level `alpha` goes to the bound of the stable p95; without
/// that bound the ratio cannot be judged, as with too few requests.
fn p95_latency_ratio(c: Cohorts<'_>, ratio: f64, min_requests: u64, alpha: f64) -> Measured {
    let Some(stable) = c.stable else {
        return Measured::canary_alone(p95_ms(c.canary));
    };
    let canary = c.canary;
    let p = p95_ratio_p(stable, canary, ratio, alpha / 2.0);
    Measured {
        enough: p.is_some() && both_hold(stable, canary, min_requests),
        p_breach: p.map_or(1.0, |p| p * 2.0),
        within: p95_within_ratio(stable, canary, ratio),
        stable: p95_ms(stable),
        canary: p95_ms(canary),
    }
}

/// `p95_latency_ms_max`: the canary's p95 at most `ceiling_ms`.
fn p95_latency_ceiling(c: Cohorts<'_>, ceiling_ms: f64, min_requests: u64) -> Measured {
    let ceiling = ceiling_ms * 1_000.0;
    let canary = c.canary;
    Measured {
        enough: canary.requests >= min_requests,
        p_breach: exceedance_p(canary, ceiling),
        within: at_most_expected(count_at_or_above(canary, ceiling), canary.requests, 0.05),
        stable: c.stable.and_then(p95_ms),
        canary: p95_ms(canary),
    }
}

/// `tokens_ratio_max`: the canary's mean tokens per request at most `ratio`
/// times stable's.
fn tokens_ratio(c: Cohorts<'_>, ratio: f64, min_requests: u64) -> Measured {
    let Some(stable) = c.stable else {
        return Measured::canary_alone(mean_tokens(c.canary));
    };
    let canary = c.canary;
    let enough = stable.token_requests >= min_requests.max(2)
        && canary.token_requests >= min_requests.max(2);
    // Computed on few requests too, for a thin last span to hold a pass
    // with (`enough` still gates a failure); a variance needs two.
    let z = if stable.token_requests >= 2 && canary.token_requests >= 2 {
        tokens_z(stable, canary, ratio)
    } else {
        0.0
    };
    let (stable_mean, canary_mean) = (mean_tokens(stable), mean_tokens(canary));
    Measured {
        enough,
        p_breach: upper_p(z),
        within: match (stable_mean, canary_mean) {
            (Some(stable), Some(canary)) => canary <= ratio * stable,
            _ => true,
        },
        stable: stable_mean,
        canary: canary_mean,
    }
}

/// A sample's p95 latency in milliseconds.
fn p95_ms(sample: &Sample) -> Option<f64> {
    p95_micros(sample).map(|us| us / 1_000.0)
}

/// A sample's mean tokens per request, over the requests that reported some.
fn mean_tokens(sample: &Sample) -> Option<f64> {
    (sample.token_requests > 0).then(|| sample.token_sum as f64 / sample.token_requests as f64)
}

impl Measured {
    /// A relative guardrail's with no stable cohort: nothing to judge,
    /// the canary's `value` to show.
    fn canary_alone(value: Option<f64>) -> Measured {
        Measured {
            canary: value,
            ..Measured::nothing()
        }
    }

    /// Nothing to judge.
    fn nothing() -> Measured {
        Measured {
            enough: false,
            p_breach: 1.0,
            within: true,
            stable: None,
            canary: None,
        }
    }
}

/// A sample's success rate, if it has requests.
fn rate(sample: &Sample) -> Option<f64> {
    (sample.requests > 0).then(|| sample.successes as f64 / sample.requests as f64)
}

/// Whether both cohorts hold `min_requests`, as a relative guardrail needs.
fn both_hold(stable: &Sample, canary: &Sample, min_requests: u64) -> bool {
    stable.requests >= min_requests && canary.requests >= min_requests
}

fn standard_normal() -> Normal {
    Normal::standard()
}

/// `P(Z >= z)` for a standard normal `Z`: the one-sided p-value of a z score.
#[must_use]
pub fn upper_p(z: f64) -> f64 {
    if z.is_nan() {
        1.0
    } else {
        standard_normal().sf(z)
    }
}

/// `P(X <= successes)` for `X ~ Binomial(requests, floor)`: the p-value of
/// "the success rate is at least `floor`".
#[must_use]
pub fn binomial_at_most(successes: u64, requests: u64, floor: f64) -> f64 {
    if requests == 0 || successes >= requests {
        return 1.0;
    }
    match Binomial::new(floor.clamp(0.0, 1.0), requests) {
        Ok(b) => b.cdf(successes),
        Err(_) => 1.0,
    }
}

/// `P(X >= count)` for `X ~ Binomial(requests, share)`: the p-value of "at
/// most `share` of the requests exceed".
#[must_use]
pub fn binomial_at_least(count: u64, requests: u64, share: f64) -> f64 {
    if count == 0 || requests == 0 {
        return 1.0;
    }
    match Binomial::new(share.clamp(0.0, 1.0), requests) {
        Ok(b) => b.sf(count - 1),
        Err(_) => 1.0,
    }
}

/// Farrington-Manning score statistic for `p_stable - p_canary > drop`
/// (stable: `x1` successes of `n1`; canary: `x2` of `n2`). Positive when the
/// canary is further below the stable than `drop`. At `drop = 0` this is
/// the pooled two-proportion z statistic.
#[must_use]
pub fn drop_z(x1: u64, n1: u64, x2: u64, n2: u64, drop: f64) -> f64 {
    if n1 == 0 || n2 == 0 {
        return 0.0;
    }
    let (x1, n1, x2, n2) = (x1 as f64, n1 as f64, x2 as f64, n2 as f64);
    let observed = x1 / n1 - x2 / n2 - drop;
    if observed <= 0.0 {
        return 0.0;
    }
    let drop = drop.clamp(0.0, 1.0);
    // Restricted MLE: maximise the likelihood over p2 with p1 = p2 + drop.
    // The score below is strictly decreasing in p2, so bisect its root.
    let score = |p2: f64| {
        let p1 = p2 + drop;
        let term = |count: f64, value: f64| if count > 0.0 { count / value } else { 0.0 };
        term(x1, p1) - term(n1 - x1, 1.0 - p1) + term(x2, p2) - term(n2 - x2, 1.0 - p2)
    };
    let (mut lo, mut hi) = (0.0, 1.0 - drop);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if score(mid) > 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let p2 = 0.5 * (lo + hi);
    let p1 = p2 + drop;
    let variance = p1 * (1.0 - p1) / n1 + p2 * (1.0 - p2) / n2;
    if variance > 0.0 {
        observed / variance.sqrt()
    } else {
        f64::INFINITY
    }
}

/// Fisher's exact one-sided p-value of "the canary fails no more often
/// than stable": given all the failures of both, the chance that the
/// canary's share of them is at least what it is, were they spread over
/// the requests at random (hypergeometric).
#[must_use]
pub fn more_failures_p(stable: &Sample, canary: &Sample) -> f64 {
    let failures = |s: &Sample| s.requests - s.successes;
    let (canary_failures, all_failures) = (failures(canary), failures(canary) + failures(stable));
    if canary_failures == 0 {
        return 1.0;
    }
    match Hypergeometric::new(
        stable.requests + canary.requests,
        canary.requests,
        all_failures,
    ) {
        Ok(h) => h.sf(canary_failures - 1),
        Err(_) => 1.0,
    }
}

/// Welch-type statistic for `mean_canary - ratio * mean_stable > 0`.
fn tokens_z(stable: &Sample, canary: &Sample, ratio: f64) -> f64 {
    let moments = |s: &Sample| {
        let n = s.token_requests as f64;
        let mean = s.token_sum as f64 / n;
        // Exact integer numerator: n * sum(x^2) - sum(x)^2.
        let spread = u128::from(s.token_requests) * s.token_sum_sq
            - u128::from(s.token_sum) * u128::from(s.token_sum);
        (n, mean, spread as f64 / (n * (n - 1.0)))
    };
    let (ns, ms, vs) = moments(stable);
    let (nc, mc, vc) = moments(canary);
    let excess = mc - ratio * ms;
    let variance = vc / nc + ratio * ratio * vs / ns;
    if variance > 0.0 {
        excess / variance.sqrt()
    } else if excess > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

/// The bin holding the `rank`-th smallest latency (1-based).
fn bin_of_rank(latency: &[u64; LATENCY_BINS], rank: u64) -> usize {
    let mut seen = 0;
    let mut bin = 0;
    while bin < LATENCY_BINS - 1 {
        seen += latency[bin];
        if seen >= rank {
            break;
        }
        bin += 1;
    }
    bin
}

/// The p95 (nearest rank) as its bin's midpoint, in microseconds.
fn p95_micros(sample: &Sample) -> Option<f64> {
    if sample.requests == 0 {
        return None;
    }
    let rank = (0.95 * sample.requests as f64).ceil() as u64;
    let (lower, upper) = latency_bin_edges(bin_of_rank(&sample.latency, rank.max(1)));
    Some((lower + upper) as f64 / 2.0)
}

/// Canary requests in the bins wholly at or above `limit_micros`.
fn count_at_or_above(sample: &Sample, limit_micros: f64) -> u64 {
    let limit = limit_micros.max(0.0).ceil();
    let first = if limit >= u64::MAX as f64 {
        LATENCY_BINS
    } else {
        let bin = latency_bin(limit as u64);
        if latency_bin_edges(bin).0 >= limit as u64 {
            bin
        } else {
            bin + 1
        }
    };
    sample.latency.iter().skip(first).sum()
}

/// Whether `count` of `n` is on the null's side of `share * n`. A binomial
/// count at or below its mean has an upper-tail p-value of at least 1/2
/// (the median is the mean rounded either way), at or above it a
/// lower-tail one; such a p-value is never significant (`alpha < 1/2`), so
/// the exact tail need not be computed: it is the common case for a
/// healthy canary, and the exact tail is the costly part of a look.
fn at_most_expected(count: u64, n: u64, share: f64) -> bool {
    count as f64 <= share * n as f64
}

/// The p-value of "at most 5% of the canary is slower than `limit_micros`",
/// counting only bins wholly at or above it (1 when not above 5%).
fn exceedance_p(canary: &Sample, limit_micros: f64) -> f64 {
    let above = count_at_or_above(canary, limit_micros);
    if at_most_expected(above, canary.requests, 0.05) {
        return 1.0;
    }
    binomial_at_least(above, canary.requests, 0.05)
}

/// The p-value of the ratio test given an upper bound of the stable p95 at
/// level `bound_alpha`; `None` when the stable sample is too small to bound it.
fn p95_ratio_p(stable: &Sample, canary: &Sample, ratio: f64, bound_alpha: f64) -> Option<f64> {
    if stable.requests == 0 {
        return None;
    }
    // The bound is at or above the point estimate's bin (its rank is at
    // least the nearest rank for any bound_alpha < 1/2): if the canary is
    // not above 5% even at the point estimate, it is not at the bound.
    if p95_within_ratio(stable, canary, ratio) {
        return Some(1.0);
    }
    // Too few stable requests to bound its p95: nothing to compare with yet.
    let rank = p95_upper_rank(stable.requests, bound_alpha)?;
    let (_, upper) = latency_bin_edges(bin_of_rank(&stable.latency, rank));
    Some(exceedance_p(canary, ratio * upper as f64))
}

/// Whether the canary measures within `ratio` times the stable p95, as the
/// ratio test counts it: at most 5% of the canary in bins wholly at or
/// above `ratio` times the lower edge of the stable p95's bin.
fn p95_within_ratio(stable: &Sample, canary: &Sample, ratio: f64) -> bool {
    if stable.requests == 0 {
        return true;
    }
    let nearest = (0.95 * stable.requests as f64).ceil() as u64;
    let (lower, _) = latency_bin_edges(bin_of_rank(&stable.latency, nearest.max(1)));
    at_most_expected(
        count_at_or_above(canary, ratio * lower as f64),
        canary.requests,
        0.05,
    )
}

/// The smallest `k` such that the `k`-th smallest of `n` observations is at
/// or above the true p95 with probability at least `1 - alpha`:
/// `P(Binomial(n, 0.95) <= k - 1) >= 1 - alpha`. `None` if even the
/// largest observation is not enough.
#[must_use]
pub fn p95_upper_rank(n: u64, alpha: f64) -> Option<u64> {
    let binomial = Binomial::new(0.95, n).ok()?;
    let covers = |k: u64| binomial.cdf(k - 1) >= 1.0 - alpha;
    if n == 0 || !covers(n) {
        return None;
    }
    // `covers` is monotone in k. Start at the normal approximation, gallop
    // to a bracket [lo, hi] with covers(hi) and (lo = 1 or !covers(lo - 1)),
    // then bisect: a handful of exact tails instead of log2(n).
    let z = standard_normal().inverse_cdf((1.0 - alpha).clamp(0.5, 1.0 - 1e-16));
    let guess = 0.95 * n as f64 + z * (0.0475 * n as f64).sqrt() + 0.5;
    let start = (guess.ceil() as u64).clamp(1, n);
    let (mut lo, mut hi);
    let mut step = 1;
    if covers(start) {
        hi = start;
        loop {
            if hi == 1 {
                lo = 1;
                break;
            }
            let probe = hi.saturating_sub(step).max(1);
            if covers(probe) {
                hi = probe;
                step *= 2;
            } else {
                lo = probe + 1;
                break;
            }
        }
    } else {
        lo = start + 1;
        loop {
            let probe = (start + step).min(n);
            if covers(probe) {
                hi = probe;
                break;
            }
            lo = probe + 1;
            step *= 2;
        }
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if covers(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Some(lo)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::rollout::window::Observation;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance
    }

    #[test]
    fn pooled_two_proportion_z_matches_hand_computation() {
        // 90/100 vs 80/100: pooled p = 0.85, se = sqrt(0.85 * 0.15 * 2 / 100)
        // = 0.0504975, z = 0.10 / 0.0504975 = 1.98030, one-sided p = 0.023835.
        let z = drop_z(90, 100, 80, 100, 0.0);
        assert!(close(z, 1.980_30, 1e-4), "{z}");
        assert!(close(upper_p(z), 0.023_835, 1e-5), "{}", upper_p(z));
        // A canary at least as good as the stable has nothing to test.
        assert_eq!(drop_z(80, 100, 90, 100, 0.0), 0.0);
    }

    #[test]
    fn a_drop_is_not_proven_on_failures_too_rare_for_the_normal_approximation() {
        let look = Look {
            index: 30,
            planned: 1_040,
        };
        let drop = Guardrails {
            success_rate_min: None,
            success_rate_drop_max: Some(0.0),
            p95_latency_ratio_max: None,
            p95_latency_ms_max: None,
            tokens_ratio_max: None,
            eval_score_min: None,
            confidence: 0.95,
        };
        // One canary failure in 200 against none in 20 000: the score test
        // says z = 10, Fisher's exact test p = 200 / 20 200.
        let stable = sample(20_000, 20_000, |_| 100);
        let canary = sample(200, 199, |_| 100);
        assert!(drop_z(20_000, 20_000, 199, 200, 0.0) > 9.0);
        assert!(close(
            more_failures_p(&stable, &canary),
            200.0 / 20_200.0,
            1e-9
        ));
        let judged = evaluate(&drop, Some(&stable), &canary, None, 200, look);
        assert_ne!(judged[0].verdict, Verdict::Fail, "{judged:?}");
        // A canary that does fail more often is still proven to.
        let stable = sample(20_000, 19_980, |_| 100);
        let canary = sample(200, 190, |_| 100);
        let judged = evaluate(&drop, Some(&stable), &canary, None, 200, look);
        assert_eq!(judged[0].verdict, Verdict::Fail, "{judged:?}");
    }

    #[test]
    fn margin_score_test_uses_the_restricted_mle() {
        let (x1, n1, x2, n2, d) = (990.0, 1000.0, 180.0, 200.0, 0.02);
        // Brute-force the restricted maximum likelihood on a fine grid.
        let loglik = |p2: f64| {
            let p1 = p2 + d;
            x1 * p1.ln() + (n1 - x1) * (1.0 - p1).ln() + x2 * p2.ln() + (n2 - x2) * (1.0 - p2).ln()
        };
        let p2 = (1..98_000)
            .map(|i| f64::from(i) / 100_000.0)
            .max_by(|a, b| loglik(*a).total_cmp(&loglik(*b)))
            .unwrap_or(0.0);
        let p1 = p2 + d;
        let expected = (0.99 - 0.9 - d) / (p1 * (1.0 - p1) / n1 + p2 * (1.0 - p2) / n2).sqrt();
        let z = drop_z(990, 1000, 180, 200, d);
        assert!(close(z, expected, 1e-3), "{z} vs {expected}");
        // The margin makes the same data less damning.
        assert!(z < drop_z(990, 1000, 180, 200, 0.0));
    }

    #[test]
    fn binomial_tails_match_hand_computation() {
        // P(X <= 7), X ~ Bin(10, 0.9) = 1 - (0.193710 + 0.387420 + 0.348678).
        assert!(close(binomial_at_most(7, 10, 0.9), 0.070_191, 1e-5));
        // P(X >= 2), X ~ Bin(10, 0.05) = 1 - 0.95^10 - 10 * 0.05 * 0.95^9.
        let expected = 1.0 - 0.95f64.powi(10) - 0.5 * 0.95f64.powi(9);
        assert!(close(binomial_at_least(2, 10, 0.05), expected, 1e-9));
        assert_eq!(binomial_at_most(10, 10, 0.9), 1.0);
        assert_eq!(binomial_at_least(0, 10, 0.05), 1.0);
    }

    #[test]
    fn p95_upper_rank_matches_hand_computation() {
        // n = 100: P(Bin <= 98) = 1 - P(99) - P(100) = 0.96292 < 0.975,
        // P(Bin <= 99) = 0.99408: the bound is the largest observation.
        assert_eq!(p95_upper_rank(100, 0.025), Some(100));
        // At alpha = 0.05, rank 99 covers.
        assert_eq!(p95_upper_rank(100, 0.05), Some(99));
        // Ten observations cannot bound a p95 at 97.5%: 0.95^10 = 0.60.
        assert_eq!(p95_upper_rank(10, 0.025), None);
    }

    #[test]
    fn p95_upper_rank_agrees_with_a_linear_scan() {
        for (n, alpha) in [
            (20, 0.3),
            (59, 0.05),
            (100, 0.025),
            (1_000, 1e-4),
            (34_000, 3e-5),
        ] {
            let binomial = Binomial::new(0.95, n).expect("valid");
            let first = (1..=n).find(|&k| binomial.cdf(k - 1) >= 1.0 - alpha);
            assert_eq!(p95_upper_rank(n, alpha), first, "n = {n}, alpha = {alpha}");
        }
    }

    #[test]
    fn alpha_spending_adds_up_to_at_most_alpha() {
        let planned = 120;
        let spent: f64 = (1..=100_000)
            .map(|index| look_alpha(0.95, Look { index, planned }, 1))
            .sum();
        assert!(spent <= 0.05 + 1e-12 && spent > 0.0499, "{spent}");
        let planned_only: f64 = (1..=planned)
            .map(|index| look_alpha(0.95, Look { index, planned }, 1))
            .sum();
        assert!(close(planned_only, 0.045, 1e-12));
        assert!(close(
            look_alpha(0.95, Look { index: 1, planned }, 5),
            0.045 / 600.0,
            1e-15
        ));
    }

    fn sample(requests: u64, successes: u64, latency_ms: impl Fn(u64) -> u64) -> Sample {
        let mut s = Sample::default();
        for i in 0..requests {
            s.add(Observation {
                success: i < successes,
                latency: Duration::from_millis(latency_ms(i)),
                tokens: Some(100 + i % 50),
            });
        }
        s
    }

    fn all_guardrails() -> Guardrails {
        Guardrails {
            success_rate_min: Some(0.97),
            success_rate_drop_max: Some(0.02),
            p95_latency_ratio_max: Some(1.2),
            p95_latency_ms_max: Some(8_000.0),
            tokens_ratio_max: Some(1.15),
            eval_score_min: Some(0.9),
            confidence: 0.95,
        }
    }

    #[test]
    fn identical_cohorts_pass_and_small_ones_are_inconclusive() {
        let stable = sample(5_000, 4_950, |i| 500 + i % 1_000);
        let canary = sample(500, 495, |i| 500 + (i * 10) % 1_000);
        let look = Look {
            index: 10,
            planned: 120,
        };
        let evals = evaluate(
            &all_guardrails(),
            Some(&stable),
            &canary,
            Some(0.95),
            200,
            look,
        );
        let names: Vec<_> = evals.iter().map(|e| e.guardrail.as_ref()).collect();
        assert_eq!(
            names,
            [
                "success_rate",
                "success_rate_drop",
                "p95_latency_ratio",
                "p95_latency_ms",
                "tokens_ratio",
                "eval_score"
            ]
        );
        assert!(
            evals.iter().all(|e| e.verdict == Verdict::Pass),
            "{evals:?}"
        );
        let drop = &evals[1];
        assert_eq!(
            (drop.stable, drop.canary, drop.limit),
            (Some(0.99), Some(0.99), 0.02)
        );

        let evals = evaluate(&all_guardrails(), Some(&stable), &canary, None, 1_000, look);
        assert!(
            evals.iter().all(|e| e.verdict == Verdict::Inconclusive),
            "{evals:?}"
        );
    }

    #[test]
    fn a_latency_ratio_without_a_stable_bound_is_inconclusive_not_a_pass() {
        // Enough requests for min_requests, too few to bound stable's p95 at
        // this level; the canary is far slower, but that cannot be judged yet.
        let stable = sample(40, 40, |i| 100 + i);
        let canary = sample(40, 40, |i| 1_000 + i);
        let g = Guardrails {
            p95_latency_ratio_max: Some(1.2),
            ..all_guardrails()
        };
        let look = Look {
            index: 1,
            planned: 120,
        };
        let evals = evaluate(&g, Some(&stable), &canary, Some(0.95), 20, look);
        let ratio = evals
            .iter()
            .find(|e| e.guardrail == "p95_latency_ratio")
            .expect("the ratio guardrail");
        assert_eq!(ratio.verdict, Verdict::Inconclusive, "{ratio:?}");
    }

    #[test]
    fn clear_breaches_fail_and_name_the_guardrail() {
        let stable = sample(20_000, 19_800, |i| 500 + i % 1_000);
        // 85% success, latencies doubled, 9 s tail on a tenth of requests.
        let canary = sample(2_000, 1_700, |i| {
            if i % 10 == 0 {
                9_000
            } else {
                2 * (500 + (i * 10) % 1_000)
            }
        });
        let look = Look {
            index: 60,
            planned: 120,
        };
        let evals = evaluate(
            &all_guardrails(),
            Some(&stable),
            &canary,
            Some(0.5),
            200,
            look,
        );
        let verdict = |name| {
            evals
                .iter()
                .find(|e| e.guardrail == name)
                .map(|e| e.verdict)
        };
        for name in [
            "success_rate",
            "success_rate_drop",
            "p95_latency_ratio",
            "p95_latency_ms",
            "eval_score",
        ] {
            assert_eq!(verdict(name), Some(Verdict::Fail), "{name}: {evals:?}");
        }
        // Same tokens: no breach there.
        assert_eq!(verdict("tokens_ratio"), Some(Verdict::Pass));
    }

    #[test]
    fn a_breach_within_noise_is_not_failed() {
        // 2 failures of 200 against a 0.98 floor: 0.99 observed, no breach;
        // 7 failures of 200 (0.965) is below the floor but not significantly.
        let stable = sample(10_000, 9_900, |_| 800);
        let canary = sample(200, 193, |_| 800);
        let g = Guardrails {
            success_rate_min: Some(0.98),
            ..all_guardrails()
        };
        let evals = evaluate(
            &g,
            Some(&stable),
            &canary,
            Some(0.95),
            200,
            Look {
                index: 1,
                planned: 120,
            },
        );
        // Not failed, and not passed either: it measures past the floor.
        assert_eq!(evals[0].verdict, Verdict::Inconclusive, "{evals:?}");
        assert!(evals[0].canary.is_some_and(|c| c < 0.98));
    }

    /// The verdict of every guardrail, by name, in the order evaluated.
    fn verdicts(evals: &[Evaluation]) -> Vec<(&str, Verdict)> {
        evals
            .iter()
            .map(|e| (e.guardrail.as_ref(), e.verdict))
            .collect()
    }

    #[test]
    fn absolute_guardrails_judge_the_canary_alone_relative_ones_need_stable() {
        // 15% errors over 1,000 requests against a 0.97 floor, and a stable
        // window that has drained: the floor needs nothing of stable.
        let canary = sample(1_000, 850, |_| 800);
        let look = Look {
            index: 10,
            planned: 120,
        };
        let evals = evaluate(
            &all_guardrails(),
            Some(&Sample::default()),
            &canary,
            Some(0.95),
            200,
            look,
        );
        assert_eq!(
            verdicts(&evals),
            [
                ("success_rate", Verdict::Fail),
                ("success_rate_drop", Verdict::Inconclusive),
                ("p95_latency_ratio", Verdict::Inconclusive),
                ("p95_latency_ms", Verdict::Pass),
                ("tokens_ratio", Verdict::Inconclusive),
                ("eval_score", Verdict::Pass),
            ],
            "{evals:?}"
        );
    }

    #[test]
    fn without_a_stable_cohort_relative_guardrails_are_not_applicable() {
        let look = Look {
            index: 10,
            planned: 120,
        };
        let healthy = sample(1_000, 995, |i| 500 + i % 1_000);
        let evals = evaluate(&all_guardrails(), None, &healthy, Some(0.95), 200, look);
        assert_eq!(
            verdicts(&evals),
            [
                ("success_rate", Verdict::Pass),
                ("success_rate_drop", Verdict::NotApplicable),
                ("p95_latency_ratio", Verdict::NotApplicable),
                ("p95_latency_ms", Verdict::Pass),
                ("tokens_ratio", Verdict::NotApplicable),
                ("eval_score", Verdict::Pass),
            ],
            "{evals:?}"
        );
        assert!(evals.iter().all(|e| e.stable.is_none()), "{evals:?}");
        // The absolute guardrails still catch a bad canary.
        let failing = sample(1_000, 850, |_| 9_000);
        let evals = evaluate(&all_guardrails(), None, &failing, Some(0.5), 200, look);
        for name in ["success_rate", "p95_latency_ms", "eval_score"] {
            let evaluation = evals.iter().find(|e| e.guardrail == name);
            assert_eq!(
                evaluation.map(|e| e.verdict),
                Some(Verdict::Fail),
                "{name}: {evals:?}"
            );
        }
    }

    #[test]
    fn planned_looks_counts_intervals_of_weighted_stages() {
        let text = r#"
            [rollout]
            interval = "30s"
            stages = [ { weight = 1, duration = "30m" }, { pause = true },
                       { weight = 10, duration = "45s" } ]
        "#;
        let config = crate::config::rollout_from_json(
            super::super::plan::document(text).expect("a TOML plan"),
        )
        .expect("plan parses");
        assert_eq!(planned_looks(&config), 60 + 2);
    }

    #[test]
    fn a_canary_measured_past_a_limit_without_proof_is_inconclusive() {
        let look = Look {
            index: 1,
            planned: 60,
        };
        let only = |set: fn(&mut Guardrails)| {
            let mut guardrails = Guardrails {
                success_rate_min: None,
                success_rate_drop_max: None,
                p95_latency_ratio_max: None,
                p95_latency_ms_max: None,
                tokens_ratio_max: None,
                eval_score_min: None,
                confidence: 0.95,
            };
            set(&mut guardrails);
            guardrails
        };
        let verdict = |guardrails: &Guardrails, stable: Option<&Sample>, canary: &Sample| {
            evaluate(guardrails, stable, canary, None, 200, look)[0].verdict
        };
        let floor = only(|g| g.success_rate_min = Some(0.97));
        let stable = sample(20_000, 19_800, |i| 500 + i % 500);
        assert_eq!(
            verdict(&floor, None, &sample(400, 386, |_| 500)),
            Verdict::Inconclusive
        );
        assert_eq!(
            verdict(&floor, None, &sample(400, 390, |_| 500)),
            Verdict::Pass
        );
        let drop = only(|g| g.success_rate_drop_max = Some(0.02));
        let canary = sample(400, 386, |_| 500);
        assert_eq!(
            verdict(&drop, Some(&stable), &canary),
            Verdict::Inconclusive
        );
        let canary = sample(400, 392, |_| 500);
        assert_eq!(verdict(&drop, Some(&stable), &canary), Verdict::Pass);

        // A p95 is past its ceiling when more than 5% of the canary is in
        // bins wholly above it, as its test counts: every request at
        // 7.87 s, in a bin that reaches past 7.9 s, is within a 7.9 s
        // ceiling, not held for ever as past it.
        let ceiling = only(|g| g.p95_latency_ms_max = Some(7_900.0));
        assert_eq!(
            verdict(&ceiling, None, &sample(1_000, 1_000, |_| 7_870)),
            Verdict::Pass
        );
        // Seven percent in bins wholly above it: past, though not proven.
        let some_slow = sample(300, 300, |i| if i < 21 { 9_000 } else { 1_000 });
        assert_eq!(verdict(&ceiling, None, &some_slow), Verdict::Inconclusive);
        let ratio = only(|g| g.p95_latency_ratio_max = Some(1.2));
        assert_eq!(
            verdict(&ratio, Some(&stable), &sample(300, 300, |_| 500)),
            Verdict::Pass
        );
    }

    /// Guardrails with only these set, at 95% confidence.
    fn only(set: impl FnOnce(&mut Guardrails)) -> Guardrails {
        let mut g = Guardrails {
            success_rate_min: None,
            success_rate_drop_max: None,
            p95_latency_ratio_max: None,
            p95_latency_ms_max: None,
            tokens_ratio_max: None,
            eval_score_min: None,
            confidence: 0.95,
        };
        set(&mut g);
        g
    }

    /// Each guardrail's verdict over the last span `recent` of a stage
    /// whose whole is `stage`, at `min_requests` of 200.
    fn over_stage(
        g: &Guardrails,
        recent: (&Sample, &Sample),
        stage: (&Sample, &Sample),
    ) -> Vec<(&'static str, Verdict)> {
        let look = Look {
            index: 1,
            planned: 10,
        };
        let recent = Cohorts {
            stable: Some(recent.0),
            canary: recent.1,
        };
        let stage = Cohorts {
            stable: Some(stage.0),
            canary: stage.1,
        };
        evaluate_over(g, recent, Some(stage), None, 200, look)
            .into_iter()
            .map(|e| match e.guardrail {
                Cow::Borrowed(name) => (name, e.verdict),
                Cow::Owned(_) => unreachable!("fresh evaluations name their guardrail literally"),
            })
            .collect()
    }

    #[test]
    fn a_guardrail_the_last_span_holds_too_little_for_is_judged_over_the_stage() {
        let g = only(|g| {
            g.success_rate_min = Some(0.9);
            g.success_rate_drop_max = Some(0.05);
        });
        let few = sample(20, 20, |_| 100);
        let healthy = sample(400, 396, |_| 100);
        assert_eq!(
            over_stage(&g, (&few, &few), (&healthy, &healthy)),
            [
                ("success_rate", Verdict::Pass),
                ("success_rate_drop", Verdict::Pass)
            ]
        );
        // The stage proves a canary failing one request in four.
        let failing = sample(400, 300, |_| 100);
        assert_eq!(
            over_stage(&g, (&few, &few), (&healthy, &failing)),
            [
                ("success_rate", Verdict::Fail),
                ("success_rate_drop", Verdict::Fail)
            ]
        );
    }

    #[test]
    fn the_stage_cannot_pass_a_canary_its_last_span_measures_past_the_limit() {
        let g = only(|g| g.success_rate_min = Some(0.9));
        // 29 requests since the last span began, all failed; the hours
        // before were fine enough to carry the stage's rate above 0.9.
        let stable = sample(5_000, 5_000, |_| 100);
        let recent = sample(29, 0, |_| 100);
        let stage = sample(2_000, 1_850, |_| 100);
        assert_eq!(
            over_stage(&g, (&stable, &recent), (&stable, &stage)),
            [("success_rate", Verdict::Inconclusive)]
        );
        // Past the limit, with the values that show it.
        let look = Look {
            index: 1,
            planned: 10,
        };
        let cohorts = |canary| Cohorts {
            stable: Some(&stable),
            canary,
        };
        let judged = evaluate_over(&g, cohorts(&recent), Some(cohorts(&stage)), None, 200, look);
        assert!(judged[0].past_limit, "{judged:?}");
        assert_eq!(judged[0].canary, Some(0.0), "{judged:?}");
    }

    #[test]
    fn one_failure_among_a_thin_last_spans_few_requests_does_not_hold_a_pass_over_the_stage() {
        let g = only(|g| g.success_rate_min = Some(0.97));
        // 1% of a service of one request a second, at the end of a 6 h
        // stage: 18 canary requests in the last 30 minutes, one failed;
        // 220 in the stage, two failed.
        let (recent_stable, recent) = (sample(1_782, 1_764, |_| 100), sample(18, 17, |_| 100));
        let (stage_stable, stage) = (sample(21_380, 21_166, |_| 100), sample(220, 218, |_| 100));
        assert_eq!(
            over_stage(&g, (&recent_stable, &recent), (&stage_stable, &stage)),
            [("success_rate", Verdict::Pass)]
        );
    }

    #[test]
    fn a_thin_last_span_far_past_the_tokens_ratio_holds_a_pass_over_the_stage() {
        let g = only(|g| g.tokens_ratio_max = Some(1.15));
        let tokens = |sample: &mut Sample, n: u64, base: u64| {
            for i in 0..n {
                sample.add(Observation {
                    success: true,
                    latency: Duration::from_millis(100),
                    tokens: Some(base + i % 50),
                });
            }
        };
        // The last span: 18 canary requests at about 1.6 times stable's
        // tokens; the stage: those, after 202 like stable's.
        let (mut recent_stable, mut recent) = (Sample::default(), Sample::default());
        tokens(&mut recent_stable, 1_782, 100);
        tokens(&mut recent, 18, 180);
        let (mut stage_stable, mut stage) = (Sample::default(), Sample::default());
        tokens(&mut stage_stable, 21_380, 100);
        tokens(&mut stage, 202, 100);
        tokens(&mut stage, 18, 180);
        assert_eq!(
            over_stage(&g, (&recent_stable, &recent), (&stage_stable, &stage)),
            [("tokens_ratio", Verdict::Inconclusive)]
        );
    }

    #[test]
    fn a_last_span_with_enough_of_the_canary_judges_an_absolute_guardrail_whatever_stable_has() {
        let g = only(|g| g.success_rate_min = Some(0.9));
        // At 95%, stable has few requests; the canary fails half of its
        // last span's, after hours of good ones.
        let stable = sample(5, 5, |_| 100);
        let recent = sample(580, 280, |_| 100);
        let stage = sample(6_000, 5_600, |_| 100);
        assert_eq!(
            over_stage(&g, (&stable, &recent), (&stable, &stage)),
            [("success_rate", Verdict::Fail)]
        );
    }

    #[test]
    fn tokens_the_last_span_holds_too_few_of_are_judged_over_the_stage() {
        let g = only(|g| g.tokens_ratio_max = Some(1.2));
        // Every request counts; one in ten reports tokens.
        let with_tokens = |requests: u64| {
            let mut s = Sample::default();
            for i in 0..requests {
                s.add(Observation {
                    success: true,
                    latency: Duration::from_millis(100),
                    tokens: (i % 10 == 0).then_some(100 + i % 20),
                });
            }
            s
        };
        let (recent, stage) = (with_tokens(300), with_tokens(3_000));
        assert_eq!(
            over_stage(&g, (&recent, &recent), (&stage, &stage)),
            [("tokens_ratio", Verdict::Pass)]
        );
    }
}
