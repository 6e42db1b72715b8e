//! Judging a rollout stage: the guardrails over the live table's windows.
//!
//! Owns: taking both cohorts' samples from the live table over the same
//! window, asking [`stats`](super::stats) for a verdict on each configured
//! guardrail, summing them up (any failure fails; else any inconclusive
//! waits; else pass), and wording the rollback reason. Does not own the
//! statistical method.

use std::collections::HashMap;

use super::stats::{self, Look};
use crate::clock;
use crate::config::RolloutConfig;
use crate::table::RouteTable;

pub use super::stats::{Evaluation, Verdict};

/// Evaluates every configured guardrail at look number `look` (from 1,
/// counted over the whole rollout). Without a canary there is nothing to
/// judge, which passes.
#[must_use]
pub fn evaluate(
    table: &RouteTable,
    plan: &RolloutConfig,
    look: u32,
    eval_scores: &HashMap<String, f64>,
) -> Vec<Evaluation> {
    let Some(canary) = &table.canary else {
        return Vec::new();
    };
    let now = clock::since_start();
    // The whole span: at 1% a canary needs most of it to reach `min_requests`.
    let span = table.stable.window.span().min(canary.version.window.span());
    let stable = table.stable.window.snapshot(now, span);
    let canary_sample = canary.version.window.snapshot(now, span);
    stats::evaluate(
        &plan.guardrails,
        &stable,
        &canary_sample,
        eval_scores.get(&canary.version.name).copied(),
        plan.min_requests,
        Look {
            index: look,
            planned: stats::planned_looks(plan),
        },
    )
}

/// The stage's verdict: any failure fails; else any inconclusive waits.
#[must_use]
pub fn overall(evaluations: &[Evaluation]) -> Verdict {
    if evaluations.iter().any(|e| e.verdict == Verdict::Fail) {
        Verdict::Fail
    } else if evaluations
        .iter()
        .any(|e| e.verdict == Verdict::Inconclusive)
    {
        Verdict::Inconclusive
    } else {
        Verdict::Pass
    }
}

/// The rollback reason: the failing guardrails with both values and the limit.
#[must_use]
pub fn failure_reason(evaluations: &[Evaluation], failure_limit: u32) -> String {
    let show = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.4}"));
    let failing: Vec<String> = evaluations
        .iter()
        .filter(|e| e.verdict == Verdict::Fail)
        .map(|e| {
            format!(
                "{}: canary {} vs stable {} (limit {})",
                e.guardrail,
                show(e.canary),
                show(e.stable),
                e.limit
            )
        })
        .collect();
    if failing.is_empty() {
        format!(
            "guardrails inconclusive for too long ({failure_limit} failed evaluations in a row)"
        )
    } else {
        format!(
            "guardrail failed {failure_limit} evaluations in a row: {}",
            failing.join("; ")
        )
    }
}
