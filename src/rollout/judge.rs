//! Judging a rollout stage: the guardrails over the live table's windows.
//!
//! Owns: whether the canary can take requests at all ([`CANARY_AVAILABLE`],
//! judged first at every look), taking both cohorts' samples from the live
//! table over the same spans (the windows' last span and the stage's
//! [`Tallies`], see [`evaluate`]; stable's only while it serves a cohort,
//! that is below 100%), asking [`stats`] for a verdict on each configured
//! guardrail, summing them up (any failure fails; else any inconclusive, or
//! no guardrail judged at all, waits; else pass, a guardrail not applicable
//! counting for nothing), counting each guardrail's failed looks in a row
//! against `failure_limit` (and inconclusive ones, once the caller says
//! they count), and wording the reasons of a rollback or of a pause for a
//! canary past a limit. Does not own the statistical method or upstream
//! health (`health`, read here through the table).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::stats::{self, Cohorts, Look};
use super::window::{Sample, Tally, Window};
use crate::clock;
use crate::config::RolloutConfig;
use crate::routing::Weight;
use crate::table::{RouteTable, Version};

pub use super::stats::{Evaluation, Verdict};

/// The name of the first evaluation of every look: whether any upstream of
/// the canary can take a request.
pub const CANARY_AVAILABLE: &str = "canary_available";

/// Both cohorts' counts since the weight in effect took effect: what a
/// guardrail is judged over when the windows' last span holds too little
/// data for it. Kept by the caller from one look to the next, and begun
/// afresh when a weight takes effect.
pub struct Tallies {
    /// When the weight took effect (on [`clock::since_start`]'s scale), if
    /// known: after a restart it is not, and the tallies begin with what
    /// the windows hold.
    since: Option<Duration>,
    /// Stable's and the canary's, both begun at the same look.
    tallies: Option<(Tally, Tally)>,
}

impl Tallies {
    /// Tallies from `since`, or from what the windows hold at the first look.
    #[must_use]
    pub fn since(since: Option<Duration>) -> Self {
        Self {
            since,
            tallies: None,
        }
    }

    /// Both cohorts' counts up to `now`. Both begin again, from `now`,
    /// when either counts another window than the table's (a version's
    /// window begun afresh, or its slots resized by a reload): the two
    /// cohorts must be counted over the same span, and the new window
    /// holds nothing from before.
    fn samples(
        &mut self,
        stable: &Arc<Window>,
        canary: &Arc<Window>,
        now: Duration,
    ) -> (Sample, Sample) {
        let (stable_tally, canary_tally) = match &mut self.tallies {
            Some((s, c)) if s.counts(stable) && c.counts(canary) => (s, c),
            tallies => {
                let from = if tallies.is_some() {
                    Some(now)
                } else {
                    self.since
                };
                let fresh = (Tally::new(stable, from, now), Tally::new(canary, from, now));
                let (s, c) = tallies.insert(fresh);
                (s, c)
            }
        };
        (stable_tally.sample(now), canary_tally.sample(now))
    }
}

/// Evaluates the canary's availability, then every configured guardrail, at
/// look number `look` (from 1, counted over the whole rollout);
/// `canary_opened` says whether an earlier look of the rollout saw the
/// canary available on any of the upstreams it has now (see `availability`).
///
/// Both cohorts are judged over the same slots: those of the windows' last
/// span that began after the weight took effect (the whole span when
/// unknown), so that a canary that goes bad late in a long stage is not
/// hidden by the hours it was fine. A guardrail those slots hold too
/// little data for (`min_requests` of the cohorts it judges) is judged
/// over everything since the weight took effect instead: at low traffic a
/// canary may need longer than a span to reach `min_requests`, and waiting
/// for it must help (see [`stats::evaluate_over`]). Without a canary
/// there is nothing to judge, which passes.
#[must_use]
pub fn evaluate(
    table: &RouteTable,
    plan: &RolloutConfig,
    look: u32,
    eval_score: Option<f64>,
    tallies: &mut Tallies,
    canary_opened: bool,
) -> Vec<Evaluation> {
    let Some(canary) = &table.canary else {
        return Vec::new();
    };
    let now = clock::since_start();
    let span = table.stable.window.span().min(canary.version.window.span());
    let last_span = |window: &Window| match tallies.since {
        Some(since) => window.snapshot_since(now, since),
        None => window.snapshot(now, span),
    };
    // At 100% stable serves no cohort by design: its window only drains, and
    // what is left in it says nothing about the canary. The relative
    // guardrails are then not applicable, rather than inconclusive for
    // ever, which would hold a healthy canary at its last stage.
    let judges_stable = canary.weight < Weight::FULL;
    let recent_stable = judges_stable.then(|| last_span(&table.stable.window));
    let recent_canary = last_span(&canary.version.window);
    // Kept up at every look, used or not: a tally must see every span.
    let (stage_stable, stage_canary) =
        tallies.samples(&table.stable.window, &canary.version.window, now);
    let stage_stable = judges_stable.then_some(stage_stable);
    let mut evaluations = vec![availability(&canary.version, canary_opened)];
    let recent = Cohorts {
        stable: recent_stable.as_ref(),
        canary: &recent_canary,
    };
    let stage = Cohorts {
        stable: stage_stable.as_ref(),
        canary: &stage_canary,
    };
    evaluations.extend(stats::evaluate_over(
        &plan.guardrails,
        recent,
        Some(stage),
        eval_score,
        plan.min_requests,
        Look {
            index: look,
            planned: stats::planned_looks(plan),
        },
    ));
    evaluations
}

/// Whether any upstream of the canary can take a request now (healthy and
/// not ejected): the count of those that can, against a floor of one.
///
/// A canary with none fails the look. Its cohort falls back to stable (or
/// gets 503s), so its window stops filling and the guardrails go on judging
/// the numbers it had while it was up; a stage must not end on those, and a
/// promotion would send every user to upstreams not known to answer. As
/// with any failing guardrail, `failure_limit` such looks in a row roll
/// back. A canary that has yet to pass its first health probe has never
/// served anyone (an agent may take minutes to load its model): the look
/// waits, inconclusive, and too long a wait pauses the rollout for a person.
/// Unless the rollout has seen it open (`opened`): a restart holds every
/// canary back until its first probe, and one that served its cohort
/// before it and answers no probe since is down, not loading.
fn availability(canary: &Version, opened: bool) -> Evaluation {
    let available = canary.health.iter().filter(|h| h.is_available()).count();
    Evaluation {
        guardrail: Cow::Borrowed(CANARY_AVAILABLE),
        stable: None,
        canary: Some(available as f64),
        limit: 1.0,
        verdict: if available > 0 {
            Verdict::Pass
        } else if canary.awaits_first_probe() && !opened {
            Verdict::Inconclusive
        } else {
            Verdict::Fail
        },
        past_limit: false,
    }
}

/// The stage's verdict: any failure fails; else any inconclusive waits; a
/// guardrail that is not applicable counts for nothing, but a look at
/// which every configured guardrail was not applicable (relative ones
/// alone, at 100%) judged nothing, and waits too: a stage must not end,
/// nor a canary be promoted, unseen.
#[must_use]
pub fn overall(evaluations: &[Evaluation]) -> Verdict {
    let guardrails = || {
        evaluations
            .iter()
            .filter(|e| e.guardrail != CANARY_AVAILABLE)
    };
    let none_judged =
        guardrails().next().is_some() && guardrails().all(|e| e.verdict == Verdict::NotApplicable);
    if evaluations.iter().any(|e| e.verdict == Verdict::Fail) {
        Verdict::Fail
    } else if none_judged
        || evaluations
            .iter()
            .any(|e| e.verdict == Verdict::Inconclusive)
    {
        Verdict::Inconclusive
    } else {
        Verdict::Pass
    }
}

/// The name of the run the `inconclusive_limit` rule keeps beside the
/// guardrails' own, as if it were one more guardrail: `inconclusive_limit`
/// inconclusive looks in a row are one failed look of it.
pub const INCONCLUSIVE_RUN: &str = "inconclusive";

/// Each guardrail's run of failed looks in a row, by guardrail name; a
/// guardrail without a run has no entry.
pub type FailureRuns = BTreeMap<String, u32>;

/// What a look's count of failures calls for (see [`count_failures`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tripped {
    /// The guardrails whose run of failed looks reached `failure_limit`: a rollback.
    pub guardrails: Vec<String>,
    /// Whether the [`INCONCLUSIVE_RUN`] reached it: a pause for a person.
    pub inconclusive: bool,
}

/// Counts one look's `evaluations` into `runs` and returns what reached
/// the plan's `failure_limit`: nothing means go on.
///
/// A guardrail that fails extends its own run and one that passes ends it;
/// one that is inconclusive or not applicable leaves it as it was. So one
/// guardrail failing at one look and another at the next is no run at all.
/// `inconclusive_looks` counts the looks in a row whose overall verdict is
/// inconclusive, when `waiting_counts`; at `inconclusive_limit` they extend
/// the [`INCONCLUSIVE_RUN`], which a look that passes overall ends. The
/// caller counts waiting once the stage's time is up: before that the stage
/// waits for its data anyway, and at 1% a canary may need most of its stage
/// to reach `min_requests`.
#[must_use]
pub fn count_failures(
    runs: &mut FailureRuns,
    inconclusive_looks: &mut u32,
    evaluations: &[Evaluation],
    plan: &RolloutConfig,
    waiting_counts: bool,
) -> Tripped {
    for evaluation in evaluations {
        match evaluation.verdict {
            Verdict::Fail => *runs.entry(evaluation.guardrail.to_string()).or_default() += 1,
            Verdict::Pass => {
                runs.remove(evaluation.guardrail.as_ref());
            }
            Verdict::Inconclusive | Verdict::NotApplicable => {}
        }
    }
    match overall(evaluations) {
        // `overall` is never "not applicable": a look of those alone passes.
        Verdict::Pass | Verdict::NotApplicable => {
            *inconclusive_looks = 0;
            runs.remove(INCONCLUSIVE_RUN);
        }
        Verdict::Fail => *inconclusive_looks = 0,
        Verdict::Inconclusive if !waiting_counts => {}
        Verdict::Inconclusive => {
            *inconclusive_looks += 1;
            // Waiting forever for data is a run of its own, which the
            // controller answers with a pause for a person, not a rollback.
            if *inconclusive_looks >= plan.inconclusive_limit {
                *inconclusive_looks = 0;
                *runs.entry(INCONCLUSIVE_RUN.to_owned()).or_default() += 1;
            }
        }
    }
    let mut tripped = Tripped::default();
    for (run, _) in runs.iter().filter(|&(_, &n)| n >= plan.failure_limit) {
        if run == INCONCLUSIVE_RUN {
            tripped.inconclusive = true;
        } else {
            tripped.guardrails.push(run.clone());
        }
    }
    tripped
}

/// The guardrails of a look that measure the canary past their limit
/// without proof (see [`Evaluation::past_limit`]), with their values, if
/// any do.
#[must_use]
pub fn past_limit(evaluations: &[Evaluation]) -> Option<String> {
    let past: Vec<String> = evaluations
        .iter()
        .filter(|e| e.past_limit)
        .map(describe)
        .collect();
    (!past.is_empty()).then(|| past.join("; "))
}

/// One guardrail's evaluation, for a reason: its values and limit.
fn describe(e: &Evaluation) -> String {
    let show = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.4}"));
    format!(
        "{}: canary {} vs stable {} (limit {})",
        e.guardrail,
        show(e.canary),
        show(e.stable),
        e.limit
    )
}

/// The rollback reason: the guardrails whose run reached `failure_limit`
/// (from [`count_failures`]), with both values and the limit.
#[must_use]
pub fn failure_reason(
    evaluations: &[Evaluation],
    tripped: &[String],
    failure_limit: u32,
) -> String {
    let failing: Vec<String> = evaluations
        .iter()
        .filter(|e| tripped.iter().any(|t| *t == e.guardrail))
        .map(|e| {
            if e.guardrail == CANARY_AVAILABLE {
                format!("{CANARY_AVAILABLE}: no upstream of the canary is available")
            } else {
                describe(e)
            }
        })
        .collect();
    if failing.is_empty() {
        // A run is judged at the look that extends it, so this look holds
        // each tripped guardrail's evaluation; kept for a reason all the same.
        format!("guardrails failed {failure_limit} evaluations in a row")
    } else {
        format!(
            "guardrail failed {failure_limit} evaluations in a row: {}",
            failing.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::Verdict::{Fail, Inconclusive, NotApplicable, Pass};
    use super::*;
    use crate::config::rollout_from_json;

    fn plan(failure_limit: u32, inconclusive_limit: u32) -> RolloutConfig {
        rollout_from_json(serde_json::json!({
            "failure_limit": failure_limit,
            "inconclusive_limit": inconclusive_limit,
            "stages": [{"weight": 10, "duration": "1h"}],
        }))
        .expect("a valid plan")
    }

    /// One look: each guardrail's verdict, in the order given.
    fn look(verdicts: &[(&'static str, Verdict)]) -> Vec<Evaluation> {
        verdicts
            .iter()
            .map(|&(guardrail, verdict)| Evaluation {
                guardrail: Cow::Borrowed(guardrail),
                stable: Some(0.99),
                canary: Some(0.9),
                limit: 0.97,
                verdict,
                past_limit: false,
            })
            .collect()
    }

    /// Counts `looks` in order; returns what tripped at each.
    fn count(plan: &RolloutConfig, looks: &[Vec<Evaluation>]) -> Vec<Tripped> {
        let (mut runs, mut inconclusive_looks) = (FailureRuns::new(), 0);
        looks
            .iter()
            .map(|l| count_failures(&mut runs, &mut inconclusive_looks, l, plan, true))
            .collect()
    }

    fn go_on() -> Tripped {
        Tripped::default()
    }

    fn roll_back(guardrails: &[&str]) -> Tripped {
        Tripped {
            guardrails: guardrails.iter().map(|&g| g.to_owned()).collect(),
            inconclusive: false,
        }
    }

    fn pause() -> Tripped {
        Tripped {
            guardrails: vec![],
            inconclusive: true,
        }
    }

    #[test]
    fn both_tallies_begin_again_when_either_window_is_replaced() {
        let s = Duration::from_secs;
        let observation = super::super::window::Observation {
            success: true,
            latency: Duration::from_millis(1),
            tokens: None,
        };
        let (stable, canary) = (Arc::new(Window::new(s(1))), Arc::new(Window::new(s(1))));
        let mut tallies = Tallies::since(Some(s(0)));
        for t in 1..100 {
            stable.record(s(t), observation);
            canary.record(s(t), observation);
            if t % 10 == 0 {
                let _ = tallies.samples(&stable, &canary, s(t));
            }
        }
        let (a, b) = tallies.samples(&stable, &canary, s(99));
        assert_eq!((a.requests, b.requests), (99, 99));
        // Stable's window resized by a reload: it holds nothing from
        // before, so neither tally counts from before.
        let resized = Arc::new(Window::new(s(2)));
        let (a, b) = tallies.samples(&resized, &canary, s(100));
        assert_eq!((a.requests, b.requests), (0, 0));
        for t in 102..110 {
            resized.record(s(t), observation);
            canary.record(s(t), observation);
        }
        let (a, b) = tallies.samples(&resized, &canary, s(110));
        assert_eq!((a.requests, b.requests), (8, 8));
    }

    #[test]
    fn waiting_counts_only_when_the_caller_says_so() {
        let plan = plan(1, 2);
        let waiting = look(&[("success_rate", Inconclusive)]);
        let (mut runs, mut inconclusive_looks) = (FailureRuns::new(), 0);
        for _ in 0..5 {
            let tripped =
                count_failures(&mut runs, &mut inconclusive_looks, &waiting, &plan, false);
            assert_eq!(tripped, go_on());
        }
        assert_eq!(inconclusive_looks, 0);
        let tripped = [false, true, true].map(|counts| {
            count_failures(&mut runs, &mut inconclusive_looks, &waiting, &plan, counts)
        });
        assert_eq!(tripped[2], pause());
    }

    #[test]
    fn different_guardrails_failing_in_turn_make_no_run() {
        let tripped = count(
            &plan(2, 20),
            &[
                look(&[("success_rate", Fail), ("p95_latency_ms", Pass)]),
                look(&[("success_rate", Pass), ("p95_latency_ms", Fail)]),
                look(&[("success_rate", Fail), ("p95_latency_ms", Pass)]),
            ],
        );
        assert!(tripped.iter().all(|t| *t == go_on()), "{tripped:?}");
    }

    #[test]
    fn one_guardrail_failing_failure_limit_looks_in_a_row_trips_alone() {
        let tripped = count(
            &plan(2, 20),
            &[
                look(&[("success_rate", Fail), ("p95_latency_ms", Fail)]),
                look(&[("success_rate", Fail), ("p95_latency_ms", Pass)]),
            ],
        );
        assert_eq!(tripped, [go_on(), roll_back(&["success_rate"])]);
    }

    #[test]
    fn an_inconclusive_look_neither_extends_nor_ends_a_run() {
        let tripped = count(
            &plan(3, 20),
            &[
                look(&[("success_rate", Fail)]),
                look(&[("success_rate", Inconclusive)]),
                look(&[("success_rate", Fail)]),
                look(&[("success_rate", Inconclusive)]),
                look(&[("success_rate", Fail)]),
            ],
        );
        assert_eq!(tripped[3], go_on());
        assert_eq!(tripped[4], roll_back(&["success_rate"]));
        // A pass ends the run.
        let tripped = count(
            &plan(2, 20),
            &[
                look(&[("success_rate", Fail)]),
                look(&[("success_rate", Pass)]),
                look(&[("success_rate", Fail)]),
            ],
        );
        assert!(tripped.iter().all(|t| *t == go_on()), "{tripped:?}");
    }

    #[test]
    fn inconclusive_for_too_long_is_a_run_of_its_own() {
        let waiting = look(&[("success_rate", Inconclusive)]);
        // inconclusive_limit 2, failure_limit 2: four inconclusive looks in a row.
        let tripped = count(&plan(2, 2), &vec![waiting.clone(); 4]);
        assert_eq!(tripped[2], go_on());
        assert_eq!(tripped[3], pause());

        // A look that passes overall ends that run; a failing guardrail
        // does not add to it.
        let passing = look(&[("success_rate", Pass)]);
        let failing = look(&[("success_rate", Fail)]);
        let tripped = count(
            &plan(2, 2),
            &[
                waiting.clone(),
                waiting.clone(),
                passing,
                waiting.clone(),
                waiting.clone(),
            ],
        );
        assert!(tripped.iter().all(|t| *t == go_on()), "{tripped:?}");
        let tripped = count(
            &plan(2, 2),
            &[waiting.clone(), waiting.clone(), failing, waiting.clone()],
        );
        assert!(tripped.iter().all(|t| *t == go_on()), "{tripped:?}");
    }

    #[test]
    fn a_guardrail_not_applicable_neither_holds_a_look_nor_counts() {
        let at_full_weight = look(&[("success_rate", Pass), ("success_rate_drop", NotApplicable)]);
        assert_eq!(overall(&at_full_weight), Pass);
        // With nothing judged at all, the look waits.
        let relative_only = look(&[("success_rate_drop", NotApplicable)]);
        assert_eq!(overall(&relative_only), Inconclusive);
        // It leaves a run as it was, like an inconclusive look.
        let tripped = count(
            &plan(2, 1),
            &[
                look(&[("success_rate_drop", Fail)]),
                at_full_weight.clone(),
                look(&[("success_rate_drop", Fail)]),
            ],
        );
        assert_eq!(tripped[1], go_on());
        assert_eq!(tripped[2], roll_back(&["success_rate_drop"]));
        // Alone, it leaves the look with nothing judged, which waits as an
        // inconclusive one does, and too long a wait counts.
        let tripped = count(
            &plan(2, 1),
            &vec![look(&[("tokens_ratio", NotApplicable)]); 3],
        );
        assert_eq!(tripped[0], go_on());
        assert_eq!(tripped[1], pause());
    }

    #[test]
    fn an_unavailable_canary_trips_like_a_guardrail_and_is_named_plainly() {
        let down = look(&[(CANARY_AVAILABLE, Fail), ("success_rate", Pass)]);
        let tripped = count(&plan(2, 20), &[down.clone(), down.clone()]);
        assert_eq!(tripped[0], go_on());
        assert_eq!(tripped[1], roll_back(&[CANARY_AVAILABLE]));
        assert_eq!(
            failure_reason(&down, &tripped[1].guardrails, 2),
            "guardrail failed 2 evaluations in a row: \
             canary_available: no upstream of the canary is available"
        );
    }

    #[test]
    fn the_reason_names_only_the_tripped_guardrail() {
        let last = look(&[("success_rate", Fail), ("p95_latency_ms", Fail)]);
        let reason = failure_reason(&last, &["success_rate".to_owned()], 2);
        assert_eq!(
            reason,
            "guardrail failed 2 evaluations in a row: \
             success_rate: canary 0.9000 vs stable 0.9900 (limit 0.97)"
        );
    }
}
