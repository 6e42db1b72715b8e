//! Judging a rollout stage: the guardrails over the live table's windows.
//!
//! Owns: collecting both cohorts' samples from the live table, asking the
//! statistics for a verdict on each configured guardrail, and summing them
//! up (any failure fails; else any inconclusive waits; else pass). Does not
//! own the statistical method (`stats`).

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::RolloutConfig;
use crate::table::RouteTable;

/// One guardrail's verdict at one evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail,
    Inconclusive,
}

/// One guardrail's last evaluation, as shown under `rollout` in the state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub guardrail: String,
    pub stable: Option<f64>,
    pub canary: Option<f64>,
    pub limit: f64,
    pub verdict: Verdict,
}

/// Evaluates every configured guardrail for the current stage.
#[must_use]
pub fn evaluate(
    table: &RouteTable,
    plan: &RolloutConfig,
    _elapsed: Duration,
    eval_scores: &HashMap<String, f64>,
) -> Vec<Evaluation> {
    let mut evaluations = Vec::new();
    if let (Some(limit), Some(canary)) = (plan.guardrails.eval_score_min, &table.canary) {
        let canary_score = eval_scores.get(&canary.version.name).copied();
        evaluations.push(Evaluation {
            guardrail: "eval_score".into(),
            stable: eval_scores.get(&table.stable.name).copied(),
            canary: canary_score,
            limit,
            verdict: match canary_score {
                None => Verdict::Inconclusive,
                Some(score) if score >= limit => Verdict::Pass,
                Some(_) => Verdict::Fail,
            },
        });
    }
    evaluations
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
        format!("guardrails inconclusive for too long ({failure_limit} evaluations in a row)")
    } else {
        format!(
            "guardrail failed {failure_limit} evaluations in a row: {}",
            failing.join("; ")
        )
    }
}
