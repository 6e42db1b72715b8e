//! The rollout controller: steps a canary through a plan's stages.
//!
//! Owns:
//! - Starting, approving and aborting a rollout ([`Rollouts::start`],
//!   [`Rollouts::approve`], [`Rollouts::abort`]).
//! - The stage machine: set the weight, wait the duration, judge at every
//!   interval what was served since the weight took effect, go on; at a
//!   pause, wait for approval, judging meanwhile.
//! - Rolling back when a guardrail fails `failure_limit` looks in a row.
//! - Pausing for a person when the guardrails still lack data once the
//!   stage's time is up, or when the first look then measures the canary
//!   past a limit without proof.
//! - The end: promote or hold.
//! - Ending at once when a change made outside it (a rollback, a promotion,
//!   a new canary) supersedes it.
//! - The stage's clock: shown live in `GET /admin/state`, saved at every
//!   evaluation and on a graceful shutdown ([`Rollouts::suspend`]), after
//!   which no rollout starts and the suspended one can still be aborted.
//! - Resuming after a restart with the time already spent counted
//!   ([`Rollouts::resume`]).
//! - Webhook events.
//!
//! It changes the world only through `Control`, and its progress
//! ([`Progress`]) lives in the live state under `rollout`.
//!
//! Does not own: the statistics (`stats`) or the counting of failed looks
//! (`judge`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::judge::{self, Tallies, Tripped, Verdict};
use super::stats;
use super::webhook::Webhooks;
use crate::config::{
    ConfigError, OnSuccess, RolloutConfig, Stage, rollout_from_json, saved_rollout_from_json,
};
use crate::control::{Control, ControlError, on_disk};
use crate::state::audit::{Action, Actor};
use crate::state::{LiveState, Source};
use crate::table::{RouteTable, Status};

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Progressing,
    /// Waiting at a `{ pause = true }` stage for `rollout approve`.
    Paused,
    Promoted,
    Held,
    RolledBack,
    Aborted,
    /// Ended by a change made outside the rollout (rollback, promote, new canary).
    Superseded,
}

impl Phase {
    fn is_active(self) -> bool {
        matches!(self, Phase::Progressing | Phase::Paused)
    }

    /// The name `GET /admin/state` gives it.
    fn as_str(self) -> &'static str {
        match self {
            Phase::Progressing => "progressing",
            Phase::Paused => "paused",
            Phase::Promoted => "promoted",
            Phase::Held => "held",
            Phase::RolledBack => "rolled_back",
            Phase::Aborted => "aborted",
            Phase::Superseded => "superseded",
        }
    }
}

/// Whether the rollout a saved state holds can be resumed; an error names
/// the field that cannot be read. Checked on start before anything is
/// written, so that such a state stops the start and changes nothing.
pub fn check_saved(live: &LiveState) -> Result<(), String> {
    saved_rollout(live).map(|_| ())
}

/// The running rollout a saved state holds, read strictly: left unread, it
/// would hold every weight change (the status says a rollout sets it) for
/// a controller that never runs. With a status that says none is running,
/// a rollout is history, and not read.
fn saved_rollout(live: &LiveState) -> Result<Option<(Progress, RolloutConfig)>, String> {
    if !matches!(live.status, Status::Progressing | Status::Paused) {
        return Ok(None);
    }
    let Some(saved) = live.rollout.clone() else {
        return Err("rollout: missing, though the status says one is running".to_owned());
    };
    let progress: Progress = serde_path_to_error::deserialize(saved)
        .map_err(|e| crate::config::keyed("rollout", e.path(), e.inner()))?;
    // A status that says a rollout sets the weight, beside one that has
    // ended or is for another canary, would refuse every weight change for
    // a rollout that never runs.
    if !progress.phase.is_active() {
        return Err(format!(
            "rollout.phase: \"{}\" has ended, though the status says a rollout is running",
            progress.phase.as_str()
        ));
    }
    let canary = live.canary.as_ref().map(|c| c.name.as_str());
    if canary != Some(progress.canary.as_str()) {
        return Err(format!(
            "rollout.canary: {:?} is not the live canary {}",
            progress.canary,
            canary.map_or("(none)".to_owned(), |c| format!("{c:?}"))
        ));
    }
    let plan = saved_rollout_from_json(progress.plan.clone())
        .map_err(|error| format!("rollout.plan: {error}"))?;
    if progress.stage >= plan.stages.len() {
        return Err(format!(
            "rollout.stage: {} is past the plan's {} stages",
            progress.stage,
            plan.stages.len()
        ));
    }
    Ok(Some((progress, plan)))
}

/// The rollout's progress, as kept in the live state under `rollout`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The plan document, re-validated on resume.
    pub plan: Value,
    /// The canary this rollout is for.
    pub canary: String,
    pub phase: Phase,
    /// Index into the plan's stages.
    pub stage: usize,
    pub stages: usize,
    pub weight: f64,
    /// Time spent in the current stage, in milliseconds, saved at every
    /// evaluation and on a graceful shutdown ([`Rollouts::suspend`]);
    /// [`Rollouts::state_with_health`] shows it live.
    pub stage_elapsed_ms: u64,
    /// Time left in the current stage, in milliseconds (`null` at a pause).
    pub time_left_ms: Option<u64>,
    /// The longest of `failure_runs`, kept for readers from before the runs
    /// were counted per guardrail.
    pub consecutive_failures: u32,
    /// Each guardrail's run of failed evaluations in a row, and the
    /// `inconclusive_limit` rule's ([`judge::count_failures`]). Absent from
    /// state files written before it existed.
    #[serde(default)]
    pub failure_runs: judge::FailureRuns,
    /// Evaluations in a row whose overall verdict was inconclusive.
    pub consecutive_inconclusive: u32,
    pub evaluations: u64,
    /// Of `evaluations`, those made while a pause waited for approval,
    /// which the guardrails' level is spent on apart (see
    /// `spending_index`). Absent from state files written before pauses
    /// were judged.
    #[serde(default)]
    pub pause_looks: u64,
    /// Every guardrail's last evaluation: stable value, canary value, limit, verdict.
    pub last_evaluation: Vec<judge::Evaluation>,
    pub reason: Option<String>,
    /// Whether this stage has paused once for a canary measuring past a
    /// limit, unproven, at its end: after the approval, it goes on judging
    /// without pausing for that again, across a restart too. Absent when
    /// false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused_past_limit: bool,
    /// The canary's upstreams that the last look to find any available
    /// found available (absent until one does, and in states saved before
    /// it existed). Held back again by a restart, and unavailable, a canary
    /// with any of them is judged down rather than waiting for its first
    /// probe (see `judge::evaluate`); one moved to others has served no one
    /// from them, and waits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub canary_open_on: Vec<String>,
}

impl Progress {
    /// As kept in the live state.
    fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("rollout progress serialises to JSON")
    }

    /// Sets `consecutive_failures` from `failure_runs`.
    fn sync_consecutive_failures(&mut self) {
        self.consecutive_failures = self.failure_runs.values().copied().max().unwrap_or(0);
    }

    /// Moves on to the next stage, whose time, runs and pause start afresh.
    fn next_stage(&mut self) {
        self.stage += 1;
        self.stage_elapsed_ms = 0;
        self.consecutive_failures = 0;
        self.failure_runs.clear();
        self.paused_past_limit = false;
        self.consecutive_inconclusive = 0;
    }
}

/// The reason a rollout ended by a change made outside it gives.
const SUPERSEDED: &str = "ended by a change outside the rollout";

enum Command {
    /// Passes a pause; answered once the rollout has moved on.
    Approve(Reply),
    /// Ends the rollout with a rollback for `reason`; answered once both
    /// are recorded.
    Abort { reason: String, reply: Reply },
    /// Saves the progress with the time spent in the stage and stops the
    /// rollout's task without ending the rollout, which the next start
    /// resumes; answered once saved.
    Suspend(oneshot::Sender<()>),
}

/// Where a command is answered: the live state once the rollout's task has
/// acted on it. Dropped unanswered when the command found nothing to act on.
type Reply = oneshot::Sender<Result<LiveState, ControlError>>;

/// How a rollout ends, and who waits to hear of it.
#[derive(Debug)]
struct Ending {
    phase: Phase,
    reply: Option<Reply>,
}

impl From<Phase> for Ending {
    fn from(phase: Phase) -> Ending {
        Ending { phase, reply: None }
    }
}

/// Why a rollout's task stops before its last stage is done.
#[derive(Debug)]
enum Stop {
    /// The rollout ends.
    End(Ending),
    /// The server shuts down: the progress is saved, and the rollout
    /// carries on at the next start. Whoever asked waits to hear it is saved.
    Suspend(oneshot::Sender<()>),
}

impl From<Ending> for Stop {
    fn from(ending: Ending) -> Stop {
        Stop::End(ending)
    }
}

impl From<Phase> for Stop {
    fn from(phase: Phase) -> Stop {
        Stop::End(phase.into())
    }
}

/// The time spent in a weighted stage: `spent` before the clock last
/// started (before a restart or a pause), plus the time since, while it
/// runs. Counting from a saved amount rather than from a start instant
/// back-dated by it, so no instant before the machine's boot is ever needed.
#[derive(Debug, Clone, Copy)]
struct StageClock {
    spent: Duration,
    /// When the clock last started; `None` while it is stopped.
    since: Option<Instant>,
}

impl StageClock {
    /// A clock that has counted `spent` and runs from now.
    fn running_from(spent: Duration) -> StageClock {
        StageClock {
            spent,
            since: Some(Instant::now()),
        }
    }

    fn elapsed(&self) -> Duration {
        self.spent + self.since.map_or(Duration::ZERO, |since| since.elapsed())
    }

    fn stop(&mut self) {
        self.spent = self.elapsed();
        self.since = None;
    }

    fn start(&mut self) {
        self.since.get_or_insert_with(Instant::now);
    }
}

/// The running stage's clock as the rollout's task last published it, for
/// readers of the state between two saves.
#[derive(Debug, Clone)]
struct ShownClock {
    canary: String,
    stage: usize,
    duration: Duration,
    clock: StageClock,
}

/// How long a graceful shutdown waits for the rollout to save its progress.
const SUSPEND_TIMEOUT: Duration = Duration::from_secs(5);

/// What a running rollout listens to besides the clock.
#[derive(Debug)]
struct Inbox {
    commands: mpsc::Receiver<Command>,
    /// The live state's changes: a rollback, a promotion or a new canary
    /// made outside the rollout ends it at once, not at its next look.
    changes: watch::Receiver<u64>,
}

/// An outside judgement of a version (`POST /admin/signals`), with the
/// lineage of the window it was reported against: the version as the
/// guardrails judged it then (see [`Window::lineage`](super::window::Window::lineage)).
#[derive(Debug)]
struct EvalScore {
    score: f64,
    lineage: u64,
}

/// Runs at most one rollout at a time.
#[derive(Debug)]
pub struct Rollouts {
    control: Arc<Control>,
    /// The `[rollout]` plan from the config, used when a start names none;
    /// replaced when the config is reloaded.
    default_plan: Mutex<Option<Value>>,
    webhooks: Webhooks,
    running: Mutex<Option<mpsc::Sender<Command>>>,
    /// Set by [`Rollouts::suspend`]: the server shuts down, and no rollout
    /// starts, as nothing would suspend it (it would judge a window that
    /// no longer fills through the drain, and might promote).
    draining: AtomicBool,
    /// The latest outside judgement per version (`POST /admin/signals`).
    eval_scores: Mutex<HashMap<String, EvalScore>>,
    /// The clock of the weighted stage the rollout's task is in, as the
    /// task last published it; `None` between stages and with no rollout
    /// running.
    clock: Mutex<Option<ShownClock>>,
}

impl Rollouts {
    #[must_use]
    pub fn new(
        control: Arc<Control>,
        default_plan: Option<Value>,
        webhooks: Webhooks,
    ) -> Arc<Rollouts> {
        Arc::new(Rollouts {
            control,
            default_plan: Mutex::new(default_plan),
            webhooks,
            running: Mutex::new(None),
            draining: AtomicBool::new(false),
            eval_scores: Mutex::new(HashMap::new()),
            clock: Mutex::new(None),
        })
    }

    /// Starts `plan` (or the config's) for the installed canary; `source`
    /// says who asked, for the audit log.
    pub fn start(
        self: &Arc<Self>,
        plan: Option<Value>,
        source: Actor,
    ) -> Result<LiveState, ControlError> {
        let default = self.default_plan();
        let mut document = plan.or_else(|| default.clone()).ok_or_else(|| {
            ControlError::Invalid("no plan given and the config has no [rollout]".into())
        })?;
        // A plan that names no webhooks is told about like the config's.
        if let (Some(object), Some(urls)) = (
            document.as_object_mut(),
            default.as_ref().and_then(|d| d.get("webhooks")),
        ) {
            object.entry("webhooks").or_insert_with(|| urls.clone());
        }
        let plan = rollout_from_json(document.clone()).map_err(|e| match e {
            ConfigError::Syntax { .. } => ControlError::BadRequest(e.to_string()),
            ConfigError::Invalid(_) | ConfigError::Read { .. } => {
                ControlError::Invalid(e.to_string())
            }
        })?;
        let mut running = self.running();
        if self.draining.load(Ordering::SeqCst) {
            return Err(ControlError::Conflict(
                "the server is shutting down; start the rollout once it has restarted".into(),
            ));
        }
        if running.as_ref().is_some_and(|tx| !tx.is_closed()) {
            return Err(ControlError::Conflict(
                "a rollout is already running; abort it first".into(),
            ));
        }
        let live = self.control.state();
        // One that no task runs: a shutdown suspended it (the admin API
        // answers through the drain), and it carries on at the next start.
        if matches!(live.status, Status::Progressing | Status::Paused) {
            return Err(ControlError::Conflict(
                "a rollout is already running; abort it first".into(),
            ));
        }
        let canary = live.canary.as_ref().ok_or_else(|| {
            ControlError::Conflict(
                "there is no canary to roll out; install one (PUT /admin/canary, or cohort ctl canary)".into(),
            )
        })?;
        // A rollout raises the weight: it must not lift the rollback latch,
        // which only a new canary or a forced weight clears.
        if live.status == Status::RolledBack {
            return Err(ControlError::Conflict(
                "the canary was rolled back; install a new canary to roll it out".into(),
            ));
        }
        if plan.guardrails.are_none() {
            tracing::warn!(
                canary = %canary.name,
                "the rollout has no guardrails: it moves on by time alone, judging nothing"
            );
        }
        // The first stage takes effect with the start, so that the answer
        // shows it; the rollout's task then carries on from there.
        let (phase, weight, time_left_ms) = match plan.stages.first() {
            Some(Stage::Weight { weight, duration }) => (
                Phase::Progressing,
                weight.percent(),
                Some(millis(*duration)),
            ),
            Some(Stage::Pause) | None => (Phase::Paused, canary.weight, None),
        };
        let progress = Progress {
            plan: document,
            canary: canary.name.clone(),
            phase,
            stage: 0,
            stages: plan.stages.len(),
            weight,
            stage_elapsed_ms: 0,
            time_left_ms,
            consecutive_failures: 0,
            failure_runs: judge::FailureRuns::new(),
            consecutive_inconclusive: 0,
            evaluations: 0,
            pause_looks: 0,
            last_evaluation: Vec::new(),
            reason: None,
            paused_past_limit: false,
            canary_open_on: Vec::new(),
        };
        let state = self.save(&progress, Action::RolloutStart, source, None)?;
        // A shutdown that began during the save found no task to suspend:
        // the rollout stays as saved, which is suspended, and carries on at
        // the next start.
        if !self.draining.load(Ordering::SeqCst) {
            *running = Some(self.spawn(plan, progress));
        }
        Ok(state)
    }

    /// Resumes a rollout the live state says was running when the process
    /// stopped; returns whether there was one to resume. A start checks
    /// first, with [`check_saved`], that it can be read.
    pub fn resume(self: &Arc<Self>) -> Result<bool, String> {
        let Some((mut progress, plan)) = saved_rollout(&self.control.state())? else {
            return Ok(false);
        };
        // A webhook the plan was read without (see
        // `config::saved_rollout_from_json`) leaves the plan it is saved with.
        if let Some(saved) = progress
            .plan
            .get_mut("webhooks")
            .and_then(Value::as_array_mut)
        {
            saved.retain(|url| {
                let Some(url) = url.as_str() else { return true };
                let kept = plan.webhooks.iter().any(|w| w == url);
                if !kept {
                    tracing::warn!(
                        webhook = %super::webhook::shown(url),
                        "the running rollout's webhook is left out: its URL, or its port, cannot be called"
                    );
                }
                kept
            });
        }
        tracing::info!(
            stage = progress.stage,
            elapsed_ms = progress.stage_elapsed_ms,
            "resuming the rollout"
        );
        // The canary's score as of the last look, which saved it: a score
        // reported since is lost with the process, as its time is.
        let saved_score = progress
            .last_evaluation
            .iter()
            .find(|e| e.guardrail == stats::EVAL_SCORE)
            .and_then(|e| e.canary);
        if let Some(score) = saved_score {
            self.keep_eval_score(&progress.canary, score);
        }
        *self.running() = Some(self.spawn(plan, progress));
        Ok(true)
    }

    /// Takes the `[rollout]` plan of a reloaded config as the default.
    pub fn set_default_plan(&self, plan: Option<Value>) {
        *self.default_plan.lock().unwrap_or_else(|p| p.into_inner()) = plan;
    }

    /// Starts the config's plan for a canary that a reloaded config just
    /// installed, once the rollout that the new canary ended (if any) has
    /// recorded its end, which it does as soon as it sees the change.
    pub async fn start_configured(self: &Arc<Self>) -> Result<LiveState, ControlError> {
        let previous = self.try_running()?.clone();
        if let Some(previous) = previous {
            let ended = tokio::time::timeout(Duration::from_secs(5), previous.closed()).await;
            if ended.is_err() {
                return Err(ControlError::Conflict(
                    "the previous rollout has not ended; start the new one with POST /admin/rollout"
                        .into(),
                ));
            }
        }
        self.start(None, Actor::Signal)
    }

    fn default_plan(&self) -> Option<Value> {
        self.default_plan
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Passes the approval gate of a paused rollout. The rollout's task
    /// records it, the one writer of a running rollout's progress, and
    /// answers with the state once the stage after the gate is in effect.
    pub async fn approve(&self) -> Result<LiveState, ControlError> {
        let not_paused = || ControlError::Conflict("no rollout is waiting for approval".into());
        if !self.progress().is_some_and(|p| p.phase == Phase::Paused) {
            return Err(not_paused());
        }
        let (reply, answer) = oneshot::channel();
        self.command(Command::Approve(reply))?;
        answer.await.unwrap_or_else(|_| Err(not_paused()))
    }

    /// Aborts the running rollout, which rolls the canary back; answers
    /// with the state after both.
    pub async fn abort(&self, reason: Option<&str>) -> Result<LiveState, ControlError> {
        let reason = reason.unwrap_or("rollout aborted").to_owned();
        let (reply, answer) = oneshot::channel();
        {
            let running = self.try_running()?;
            let Some(task) = running.as_ref().filter(|tx| !tx.is_closed()) else {
                // Held: no start, and no other abort, comes between.
                return self.abort_suspended(reason, no_rollout());
            };
            let command = Command::Abort {
                reason: reason.clone(),
                reply,
            };
            task.try_send(command)
                .map_err(|_| ControlError::Conflict("the rollout is busy; try again".into()))?;
        }
        if let Ok(answer) = answer.await {
            return answer;
        }
        // The task stopped without reading it: it ended, or a shutdown
        // suspended it while the abort waited, and then it is aborted here.
        let running = self.try_running()?;
        if running.as_ref().is_some_and(|tx| !tx.is_closed()) {
            // A rollout started since: not the one this abort was for.
            return Err(ended_before_abort());
        }
        self.abort_suspended(reason, ended_before_abort())
    }

    /// Aborts a rollout that the live state holds but no task runs: one a
    /// shutdown suspended (see [`Rollouts::suspend`]). The admin API answers
    /// through the drain, and an abort, a rollback, must be made then as
    /// `POST /admin/rollback` is.
    /// `none` is the answer when the state holds no rollout to abort.
    fn abort_suspended(
        &self,
        reason: String,
        none: ControlError,
    ) -> Result<LiveState, ControlError> {
        let Ok(Some((mut progress, plan))) = saved_rollout(&self.control.state()) else {
            return Err(none);
        };
        progress.reason = Some(reason);
        let (reply, mut answer) = oneshot::channel();
        let ending = Ending {
            phase: Phase::Aborted,
            reply: Some(reply),
        };
        self.end(&plan, progress, ending);
        answer
            .try_recv()
            .unwrap_or_else(|_| Err(ended_before_abort()))
    }

    /// Records an outside judgement of `version` (`POST /admin/signals`).
    pub fn record_eval_score(&self, version: &str, score: f64) -> Result<(), ControlError> {
        if !(0.0..=1.0).contains(&score) {
            return Err(ControlError::Invalid(format!(
                "eval_score: {score} is not within 0.0..=1.0"
            )));
        }
        let live = self.control.state();
        let known =
            live.stable.name == version || live.canary.as_ref().is_some_and(|c| c.name == version);
        if !known {
            return Err(ControlError::Conflict(format!(
                "{version:?} is neither the stable nor the canary version"
            )));
        }
        self.keep_eval_score(version, score);
        Ok(())
    }

    /// Keeps `score` for `version` as it is judged now, by its window.
    fn keep_eval_score(&self, version: &str, score: f64) {
        let table = self.control.table().snapshot();
        let Some(judged) = table.versions().find(|v| v.name == version) else {
            return;
        };
        self.eval_scores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                version.to_owned(),
                EvalScore {
                    score,
                    lineage: judged.window.lineage(),
                },
            );
    }

    /// The canary's score, if one was reported for it as `table` judges
    /// it: a canary installed again after its rollback starts a new window,
    /// and the score of the one before, good or bad, is not its own; one
    /// whose window was only resized (a plan of another interval) keeps it.
    fn canary_eval_score(&self, table: &RouteTable) -> Option<f64> {
        let canary = &table.canary.as_ref()?.version;
        let scores = self.eval_scores.lock().unwrap_or_else(|p| p.into_inner());
        let kept = scores.get(&canary.name)?;
        (kept.lineage == canary.window.lineage()).then_some(kept.score)
    }

    /// The live state as `GET /admin/state` shows it
    /// ([`Control::state_with_health`]), with the running stage's time spent
    /// and time left read off its clock: the saved ones are as of the last
    /// evaluation, up to an `interval` old. A stopped clock (a pause, the
    /// approval gate) shows what was saved when it stopped.
    #[must_use]
    pub fn state_with_health(&self) -> Value {
        let mut state = self.control.state_with_health();
        let shown = self.clock.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (Some(shown), Some(rollout)) = (
            shown,
            state.get_mut("rollout").and_then(Value::as_object_mut),
        ) else {
            return state;
        };
        // The clock and the saved progress are published one after the
        // other: show the clock only on the stage it runs for.
        let same_stage = rollout.get("canary").and_then(Value::as_str) == Some(&shown.canary)
            && rollout.get("stage").and_then(Value::as_u64) == u64::try_from(shown.stage).ok()
            && rollout.get("phase").and_then(Value::as_str) == Some("progressing");
        if same_stage && shown.clock.since.is_some() {
            let elapsed = shown.clock.elapsed();
            rollout.insert("stage_elapsed_ms".into(), millis(elapsed).into());
            rollout.insert(
                "time_left_ms".into(),
                time_left_ms(shown.duration, elapsed).into(),
            );
        }
        state
    }

    /// From here no rollout starts: the server shuts down (see
    /// [`Rollouts::suspend`], which says so too).
    pub fn shutting_down(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Saves the running rollout's progress with the time spent in its
    /// stage, and stops its task without ending it, so that the next start
    /// resumes it where it stopped: for a graceful shutdown. Waits at most
    /// `SUSPEND_TIMEOUT` for the save.
    pub async fn suspend(&self) {
        self.shutting_down();
        let (reply, saved) = oneshot::channel();
        match self.command(Command::Suspend(reply)) {
            Ok(()) => {
                if tokio::time::timeout(SUSPEND_TIMEOUT, saved).await.is_err() {
                    tracing::warn!("the rollout did not save its progress in time");
                }
            }
            // None running: nothing to save.
            Err(_)
                if self
                    .try_running()
                    .is_ok_and(|running| running.as_ref().is_none_or(mpsc::Sender::is_closed)) => {}
            Err(error) => tracing::warn!(%error, "the rollout's progress was not saved"),
        }
    }

    /// Publishes the running stage's clock, or that none runs (`None`).
    fn show_clock(&self, shown: Option<ShownClock>) {
        *self.clock.lock().unwrap_or_else(|p| p.into_inner()) = shown;
    }

    fn progress(&self) -> Option<Progress> {
        self.control
            .state()
            .rollout
            .and_then(|v| serde_json::from_value(v).ok())
    }

    fn command(&self, command: Command) -> Result<(), ControlError> {
        let running = self.try_running()?;
        let sender = running
            .as_ref()
            .filter(|tx| !tx.is_closed())
            .ok_or_else(|| {
                ControlError::Conflict(
                    if matches!(self.control.state().status, Status::Progressing | Status::Paused) {
                        "the rollout is suspended while the server shuts down; it carries on at the next start"
                    } else {
                        "no rollout is running"
                    }
                    .into(),
                )
            })?;
        sender
            .try_send(command)
            .map_err(|_| ControlError::Conflict("the rollout is busy; try again".into()))
    }

    /// Whether a task runs a rollout.
    #[cfg(test)]
    pub(crate) fn runs_a_task(&self) -> bool {
        self.running().as_ref().is_some_and(|tx| !tx.is_closed())
    }

    /// Commands sent to the rollout's task that it has yet to read.
    #[cfg(test)]
    pub(crate) fn queued_commands(&self) -> usize {
        self.running()
            .as_ref()
            .map_or(0, |tx| tx.max_capacity() - tx.capacity())
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Option<mpsc::Sender<Command>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`Rollouts::running`] for the async callers (commands, a reload, a
    /// shutdown): a start holds the lock while it saves the rollout's
    /// first step, and a disk that stalls must not stall a runtime thread
    /// waiting on it.
    fn try_running(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, Option<mpsc::Sender<Command>>>, ControlError> {
        match self.running.try_lock() {
            Ok(running) => Ok(running),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => Ok(poisoned.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => Err(ControlError::Conflict(
                "the rollout is busy (starting, its first step being saved, or taking another command); try again".into(),
            )),
        }
    }

    fn spawn(self: &Arc<Self>, plan: RolloutConfig, progress: Progress) -> mpsc::Sender<Command> {
        let (tx, commands) = mpsc::channel(4);
        let inbox = Inbox {
            commands,
            changes: self.control.changes(),
        };
        let this = Arc::clone(self);
        tokio::spawn(async move { this.run(plan, progress, inbox).await });
        tx
    }

    /// The stage machine. Returns when the rollout ends, however it ends,
    /// or when it is suspended for a shutdown.
    async fn run(self: Arc<Self>, plan: RolloutConfig, mut progress: Progress, mut inbox: Inbox) {
        // An approval is answered once the stage after the gate is in
        // effect, so the answer shows where the rollout went.
        let mut approval = None;
        // What was served at the weight now in effect, since it took
        // effect: the guardrails judge that. When is unknown after a
        // restart, whose windows start empty anyway.
        let mut tallies = Tallies::since(None);
        while progress.stage < plan.stages.len() {
            let outcome = match plan.stages[progress.stage] {
                Stage::Pause => {
                    self.pause(
                        &plan,
                        &mut progress,
                        &mut inbox,
                        &mut approval,
                        &mut tallies,
                    )
                    .await
                }
                Stage::Weight { weight, duration } => {
                    let stage = (weight.percent(), duration);
                    self.weight_stage(
                        &plan,
                        &mut progress,
                        stage,
                        &mut inbox,
                        &mut approval,
                        &mut tallies,
                    )
                    .await
                }
            };
            self.show_clock(None);
            match outcome {
                Ok(()) => progress.next_stage(),
                Err(Stop::End(ending)) => {
                    let why = progress.reason.clone();
                    self.end(&plan, progress, ending);
                    // An approval the rollout ended before acting on (its
                    // step could not be saved, say) is refused, with why.
                    if let Some(reply) = approval.take() {
                        let why = why.unwrap_or_else(|| "ended".into());
                        // The caller may have given up waiting.
                        let _ = reply.send(Err(ControlError::Conflict(format!(
                            "the rollout ended before the approval took effect: {why}"
                        ))));
                    }
                    return;
                }
                Err(Stop::Suspend(reply)) => {
                    tracing::info!(
                        stage = progress.stage,
                        elapsed_ms = progress.stage_elapsed_ms,
                        "rollout suspended; it resumes on the next start"
                    );
                    self.answer(&mut approval);
                    // The caller may have given up waiting; the save stands.
                    let _ = reply.send(());
                    return;
                }
            }
        }
        let end = match plan.on_success {
            OnSuccess::Promote => Phase::Promoted,
            OnSuccess::Hold => Phase::Held,
        };
        self.end(&plan, progress, end.into());
        self.answer(&mut approval);
    }

    /// Answers a waiting approval with the live state.
    fn answer(&self, approval: &mut Option<Reply>) {
        if let Some(reply) = approval.take() {
            // The caller may have given up waiting; the approval stands.
            let _ = reply.send(Ok(self.control.state()));
        }
    }

    /// Waits for approval, judging the canary at its weight (see
    /// `tallies`) meanwhile.
    async fn pause(
        &self,
        plan: &RolloutConfig,
        progress: &mut Progress,
        inbox: &mut Inbox,
        approval: &mut Option<Reply>,
        tallies: &mut Tallies,
    ) -> Result<(), Stop> {
        progress.phase = Phase::Paused;
        progress.time_left_ms = None;
        self.save_or_end(progress, Action::RolloutPause, Actor::Rollout)?;
        self.webhooks
            .send(&plan.webhooks, "pause", &self.control.state());
        self.answer(approval);
        let mut next_look = Instant::now() + plan.interval;
        loop {
            tokio::select! {
                // A command first: an abort must not pass for a change made outside.
                biased;
                command = inbox.commands.recv() => match command {
                    Some(Command::Approve(reply)) => {
                        progress.phase = Phase::Progressing;
                        *approval = Some(reply);
                        self.save_or_end(progress, Action::RolloutApprove, Actor::Api)?;
                        return Ok(());
                    }
                    Some(Command::Abort { reason, reply }) => {
                        return Err(aborted(progress, reason, reply).into());
                    }
                    // Everything a pause has is saved already, its stopped
                    // clock included.
                    Some(Command::Suspend(reply)) => return Err(Stop::Suspend(reply)),
                    None => return Err(orphaned().into()),
                },
                Ok(()) = inbox.changes.changed() => self.still_ours(progress)?,
                () = tokio::time::sleep_until(next_look), if self.serves_anyone(progress) => {
                    next_look = Instant::now() + plan.interval;
                    self.still_ours(progress)?;
                    self.look_while_paused(plan, progress, tallies)?;
                }
            }
        }
    }

    /// Whether the canary serves anyone at its weight: at 0%, only through
    /// the override header, if one is set. One that serves no one has
    /// nothing to judge at a pause, and nothing a rollback would protect.
    fn serves_anyone(&self, progress: &Progress) -> bool {
        progress.weight > 0.0
            || self
                .control
                .table()
                .load()
                .policy
                .routing
                .override_header
                .is_some()
    }

    /// A look at the guardrails while the rollout waits for a person. The
    /// canary still serves its share meanwhile, so, as Argo Rollouts'
    /// background analysis runs through a pause, a guardrail whose run of
    /// failures reaches the limit rolls it back; a lack of data only waits,
    /// as the pause does already.
    fn look_while_paused(
        &self,
        plan: &RolloutConfig,
        progress: &mut Progress,
        tallies: &mut Tallies,
    ) -> Result<(), Stop> {
        let (_, tripped) = self.look(plan, progress, Pausing::Yes, true, tallies);
        progress.failure_runs.remove(judge::INCONCLUSIVE_RUN);
        progress.sync_consecutive_failures();
        if !tripped.guardrails.is_empty() {
            return Err(rollback_for(progress, &tripped.guardrails, plan));
        }
        self.save_look(progress)
    }

    /// One look at the guardrails over what the versions served at the
    /// weight in effect (see [`judge::evaluate`]), recorded in `progress`: the
    /// overall verdict, and the guardrails whose run of failed looks
    /// reached the plan's `failure_limit` (the inconclusive run among
    /// them; see [`judge::count_failures`]), `waiting_counts` saying
    /// whether an inconclusive look counts towards it.
    fn look(
        &self,
        plan: &RolloutConfig,
        progress: &mut Progress,
        pausing: Pausing,
        waiting_counts: bool,
        tallies: &mut Tallies,
    ) -> (Verdict, Tripped) {
        progress.evaluations += 1;
        if pausing == Pausing::Yes {
            progress.pause_looks += 1;
        }
        let index = spending_index(
            progress.evaluations,
            progress.pause_looks,
            stats::planned_looks(plan),
            pausing,
        );
        let table = self.control.table().snapshot();
        // The canary's upstreams, and whether each may take a request now.
        let upstreams: Vec<(String, bool)> = table.canary.as_ref().map_or_else(Vec::new, |c| {
            let health = c.version.health.iter().map(|h| h.is_available());
            c.version
                .upstreams
                .iter()
                .map(ToString::to_string)
                .zip(health)
                .collect()
        });
        let opened = upstreams
            .iter()
            .any(|(u, _)| progress.canary_open_on.contains(u));
        let evaluation = judge::evaluate(
            &table,
            plan,
            u32::try_from(index).unwrap_or(u32::MAX),
            self.canary_eval_score(&table),
            tallies,
            opened,
        );
        // Only those available: one added and still loading has served no one.
        let available: Vec<String> = upstreams
            .into_iter()
            .filter_map(|(u, available)| available.then_some(u))
            .collect();
        if !available.is_empty() {
            progress.canary_open_on = available;
        }
        let verdict = judge::overall(&evaluation);
        let tripped = judge::count_failures(
            &mut progress.failure_runs,
            &mut progress.consecutive_inconclusive,
            &evaluation,
            plan,
            waiting_counts,
        );
        progress.sync_consecutive_failures();
        progress.last_evaluation = evaluation;
        (verdict, tripped)
    }

    async fn weight_stage(
        &self,
        plan: &RolloutConfig,
        progress: &mut Progress,
        (weight, duration): (f64, Duration),
        inbox: &mut Inbox,
        approval: &mut Option<Reply>,
        tallies: &mut Tallies,
    ) -> Result<(), Stop> {
        // Paused for lack of data when the process stopped: still paused.
        let resumed_paused = progress.phase == Phase::Paused;
        if resumed_paused {
            self.pause(plan, progress, inbox, approval, tallies).await?;
            progress.reason = None;
        }
        progress.phase = Phase::Progressing;
        progress.weight = weight;
        let spent = Duration::from_millis(progress.stage_elapsed_ms);
        let mut clock = StageClock::running_from(spent);
        progress.time_left_ms = Some(time_left_ms(duration, spent));
        // Published before the save it belongs with: a reader that sees the
        // save sees the clock (see `state_with_health`).
        let show = |clock: StageClock, progress: &Progress| {
            self.show_clock(Some(ShownClock {
                canary: progress.canary.clone(),
                stage: progress.stage,
                duration,
                clock,
            }));
        };
        show(clock, progress);
        self.save_or_end(progress, Action::RolloutStage, Actor::Rollout)?;
        // From here the stage's weight is in effect: what the windows hold
        // from before it was served at another weight, which says little of
        // this one (and a burst shared by both cohorts just after the step
        // would weigh on the canary's window alone). A pause resumed after
        // a restart served at this weight already, and its counts go on.
        if !resumed_paused {
            *tallies = Tallies::since(Some(crate::clock::since_start()));
        }
        self.webhooks
            .send(&plan.webhooks, "stage", &self.control.state());
        self.answer(approval);
        let mut next_look = Instant::now() + plan.interval;
        loop {
            tokio::select! {
                biased;
                command = inbox.commands.recv() => match command {
                    // Nothing waits for approval: the caller hears so.
                    Some(Command::Approve(_)) => continue,
                    Some(Command::Abort { reason, reply }) => {
                        return Err(aborted(progress, reason, reply).into());
                    }
                    Some(Command::Suspend(reply)) => {
                        clock.stop();
                        show(clock, progress);
                        progress.stage_elapsed_ms = millis(clock.elapsed());
                        progress.time_left_ms = Some(time_left_ms(duration, clock.elapsed()));
                        self.save_or_end(progress, Action::RolloutSuspend, Actor::Rollout)?;
                        return Err(Stop::Suspend(reply));
                    }
                    None => return Err(orphaned().into()),
                },
                Ok(()) = inbox.changes.changed() => {
                    self.still_ours(progress)?;
                    continue;
                }
                () = tokio::time::sleep_until(next_look) => {}
            }
            next_look = Instant::now() + plan.interval;
            self.still_ours(progress)?;
            let elapsed = clock.elapsed();
            progress.stage_elapsed_ms = millis(elapsed);
            progress.time_left_ms = Some(time_left_ms(duration, elapsed));
            let stage_over = elapsed >= duration;
            let (verdict, tripped) = self.look(plan, progress, Pausing::No, stage_over, tallies);
            let hold = if !tripped.guardrails.is_empty() {
                return Err(rollback_for(progress, &tripped.guardrails, plan));
            } else if tripped.inconclusive {
                // Too little data is not a bad canary: as Argo Rollouts does,
                // wait for a person (approve to wait longer, abort to roll
                // back) instead of rolling back.
                progress.failure_runs.remove(judge::INCONCLUSIVE_RUN);
                Some(inconclusive_pause(plan))
            } else if stage_over && verdict == Verdict::Inconclusive && !progress.paused_past_limit
            {
                // The stage's time is up and the canary measures past a
                // limit, unproven. Looking again until one look happens to
                // measure it within would promote a canary just past its
                // limit far more often than one look does (optional
                // stopping): the first look with the data decides, and a
                // person decides on this one.
                judge::past_limit(&progress.last_evaluation).map(|past| {
                    progress.paused_past_limit = true;
                    past_limit_pause(&past)
                })
            } else {
                None
            };
            if let Some(reason) = hold {
                // The stage's clock stops at the time this evaluation saved.
                progress.reason = Some(reason);
                clock = StageClock {
                    spent: elapsed,
                    since: None,
                };
                show(clock, progress);
                self.pause(plan, progress, inbox, approval, tallies).await?;
                clock.start();
                progress.phase = Phase::Progressing;
                progress.reason = None;
                progress.time_left_ms = Some(time_left_ms(duration, elapsed));
                show(clock, progress);
                self.save_or_end(progress, Action::RolloutStage, Actor::Rollout)?;
                self.answer(approval);
                next_look = Instant::now() + plan.interval;
                continue;
            }
            self.save_look(progress)?;
            // A stage ends only on a passing evaluation: an inconclusive one
            // (too little data, or, once approved, a canary that measures
            // past a limit without proof yet) waits, and a failing one (a
            // guardrail, or a canary with no upstream available) holds it.
            if stage_over && verdict == Verdict::Pass {
                return Ok(());
            }
        }
    }

    /// Ends the rollout as `ending` says, making the change it implies,
    /// and answers whoever asked for the end.
    fn end(&self, plan: &RolloutConfig, mut progress: Progress, ending: Ending) {
        let mut phase = ending.phase;
        if phase == Phase::Aborted && !is_ours(&self.control.state(), &progress.canary) {
            // Superseded before the abort was read: the canary now
            // installed is not this rollout's to roll back.
            phase = Phase::Superseded;
            progress.reason = Some(SUPERSEDED.into());
        }
        progress.phase = phase;
        progress.time_left_ms = None;
        let result = match phase {
            // One change, so the rollout's end is live (and saved) with the
            // rollback, even when the disk refuses both for now.
            Phase::RolledBack | Phase::Aborted => {
                let (source, fallback) = if phase == Phase::RolledBack {
                    (Source::Guardrail, "guardrail failed")
                } else {
                    (Source::Api, "rollout aborted")
                };
                let reason = progress.reason.clone().unwrap_or_else(|| fallback.into());
                let recorded = progress.to_json();
                on_disk(|| {
                    self.control
                        .rollback_rollout(&progress.canary, &reason, source, recorded)
                })
            }
            Phase::Promoted => {
                let recorded = progress.to_json();
                on_disk(|| self.control.promote_rollout(&progress.canary, recorded))
            }
            Phase::Held => self.record_end(Action::RolloutDone, None, &progress),
            Phase::Superseded | Phase::Progressing | Phase::Paused => {
                self.record_end(Action::RolloutEnd, progress.reason.as_deref(), &progress)
            }
        };
        // A promotion refused (the disk refused it, or a change outside
        // the rollout came first) is not made: the rollout still ends,
        // leaving the canary at its last weight.
        let result = match result {
            Err(error) if phase == Phase::Promoted => {
                phase = Phase::Superseded;
                progress.phase = phase;
                progress.reason = Some(match error {
                    ControlError::Persist(_) => {
                        format!("the promotion could not be saved: {error}")
                    }
                    _ => format!("not promoted: {error}"),
                });
                self.record_end(Action::RolloutEnd, progress.reason.as_deref(), &progress)
            }
            // A rollback refused because a change outside the rollout came
            // first (a new canary, or a rollback or promotion of this
            // one): that change ended the rollout, and its canary is not
            // this rollout's to roll back.
            Err(ControlError::Conflict(_))
                if matches!(phase, Phase::RolledBack | Phase::Aborted) =>
            {
                phase = Phase::Superseded;
                progress.phase = phase;
                progress.reason = Some(SUPERSEDED.into());
                self.record_end(Action::RolloutEnd, progress.reason.as_deref(), &progress)
            }
            result => result,
        };
        let event = match phase {
            Phase::RolledBack | Phase::Aborted => "rollback",
            Phase::Promoted => "promotion",
            _ => "end",
        };
        match &result {
            Ok(state) => {
                self.webhooks.send(&plan.webhooks, event, state);
                tracing::info!(phase = %phase.as_str(), "rollout ended");
            }
            // In effect, though not saved yet (see `Control::keep_saved`).
            Err(error @ ControlError::Unsaved { .. }) => {
                self.webhooks
                    .send(&plan.webhooks, event, &self.control.state());
                tracing::error!(%error, phase = %phase.as_str(), "rollout ended; its end is not saved yet");
            }
            Err(error) => {
                tracing::error!(%error, phase = %phase.as_str(), "cannot record the end of the rollout")
            }
        }
        if let Some(reply) = ending.reply {
            let answer = match phase {
                Phase::Aborted => result,
                _ => Err(ended_before_abort()),
            };
            // The caller may have given up waiting; the end stands.
            let _ = reply.send(answer);
        }
    }

    /// Records the end of a rollout other than by a rollback or promotion
    /// (as `action`, for `reason`): held at its last stage, or stopped short
    /// of it. The canary stays steady at its last weight; a rollback just
    /// before keeps its latch, and a superseded rollout no longer holds the
    /// status: the change that superseded it set its own.
    fn record_end(
        &self,
        action: Action,
        reason: Option<&str>,
        progress: &Progress,
    ) -> Result<LiveState, ControlError> {
        let recorded = progress.to_json();
        on_disk(|| {
            self.control
                .rollout_change(action, reason, Actor::Rollout, |live| {
                    if matches!(live.status, Status::Progressing | Status::Paused) {
                        live.status = Status::Steady;
                    }
                    live.rollout = Some(recorded);
                })
        })
    }

    /// Fails with `Superseded` when a change outside the rollout ended it.
    fn still_ours(&self, progress: &mut Progress) -> Result<(), Phase> {
        if is_ours(&self.control.state(), &progress.canary) {
            Ok(())
        } else {
            progress.reason = Some(SUPERSEDED.into());
            Err(Phase::Superseded)
        }
    }

    /// Saves `progress`, or ends the rollout (`Superseded`) if it is no
    /// longer ours or cannot be saved: a stage whose weight is not saved
    /// is not in effect, so the rollout cannot go on from it.
    fn save_or_end(
        &self,
        progress: &mut Progress,
        action: Action,
        source: Actor,
    ) -> Result<(), Phase> {
        self.still_ours(progress)?;
        self.save(progress, action, source, None)
            .map(|_| ())
            .map_err(|error| {
                tracing::error!(%error, "cannot save the rollout's progress");
                progress.reason = Some(format!(
                    "the rollout's progress could not be saved: {error}"
                ));
                Phase::Superseded
            })
    }

    /// Saves a look's `progress` (see [`Control::rollout_look`]). One that
    /// cannot be saved ends nothing, unlike a stage's: a look puts nothing
    /// into effect, and the next one saves again.
    fn save_look(&self, progress: &mut Progress) -> Result<(), Stop> {
        self.still_ours(progress)?;
        if let Err(error) = on_disk(|| self.control.rollout_look(progress_edit(progress, false))) {
            tracing::warn!(%error, "cannot save the rollout's look; the next one tries again");
        }
        Ok(())
    }

    /// Writes `progress` into the live state with the weight and status it implies.
    fn save(
        &self,
        progress: &Progress,
        action: Action,
        source: Actor,
        reason: Option<&str>,
    ) -> Result<LiveState, ControlError> {
        on_disk(|| {
            self.control.rollout_change(
                action,
                reason,
                source,
                progress_edit(progress, action == Action::RolloutStart),
            )
        })
    }
}

/// The edit that writes `progress` into the live state with the weight
/// and status it implies; `starting` for the rollout's first save.
fn progress_edit(progress: &Progress, starting: bool) -> impl FnOnce(&mut LiveState) + '_ {
    let value = progress.to_json();
    move |live| {
        if progress.phase.is_active() {
            // Checked again under the state's lock: a rollback, promote or
            // new canary since `still_ours` must not be undone by this
            // save. The next `still_ours` ends the rollout. (The first
            // save makes it ours, if its canary is still there and was
            // not rolled back meanwhile.)
            let startable = starting
                && live.status != Status::RolledBack
                && live
                    .canary
                    .as_ref()
                    .is_some_and(|c| c.name == progress.canary);
            if !startable && !is_ours(live, &progress.canary) {
                return;
            }
            if let Some(canary) = live.canary.as_mut() {
                canary.weight = progress.weight;
            }
            live.status = if progress.phase == Phase::Paused {
                Status::Paused
            } else {
                Status::Progressing
            };
        }
        live.rollout = Some(value);
    }
}

/// Whether a look is made while a pause waits for approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pausing {
    Yes,
    No,
}

/// Where the look just counted (the rollout's `looks`th, its
/// `pause_looks`th at a pause if `pausing`) falls in the plan of spending
/// the guardrails' level (see the module doc of `stats`): a weighted
/// stage's looks, up to the `planned` ones, take the planned places; every
/// other look (at a pause, or past the plan) takes the next place after
/// them, so a long wait at a gate spends none of the planned looks' share.
fn spending_index(looks: u64, pause_looks: u64, planned: u32, pausing: Pausing) -> u64 {
    let planned = u64::from(planned);
    let stage_looks = looks.saturating_sub(pause_looks);
    if pausing == Pausing::No && stage_looks <= planned {
        stage_looks
    } else {
        planned + stage_looks.saturating_sub(planned) + pause_looks
    }
}

/// The answer to an abort with no rollout to abort.
fn no_rollout() -> ControlError {
    // A canary a finished rollout left in place is rolled back as any other.
    ControlError::Conflict(
        "no rollout is running; POST /admin/rollback (cohort ctl rollback) rolls the canary back"
            .into(),
    )
}

/// The answer to an abort that the rollout's end came before.
fn ended_before_abort() -> ControlError {
    ControlError::Conflict("the rollout ended before it could be aborted".into())
}

/// The reason of a pause for guardrails that stayed inconclusive too long.
fn inconclusive_pause(plan: &RolloutConfig) -> String {
    format!(
        "paused: the guardrails were inconclusive for {1} looks in a row (fewer than {0} requests in the canary, or in stable for a comparison with it, since the weight took effect, no eval_score reported, a canary that has yet to pass its first health probe, or one measuring past a limit without proof); approve to keep waiting (the requests served at this weight go on adding up), or abort. A lower rollout.min_requests asks for fewer",
        plan.min_requests,
        u64::from(plan.inconclusive_limit) * u64::from(plan.failure_limit),
    )
}

/// The reason of a pause at a stage's end for a canary measuring past a
/// limit without proof (`past`: which, with their values).
fn past_limit_pause(past: &str) -> String {
    format!(
        "paused: at the stage's end the canary measures past a limit, without proof ({past}); approve to go on judging at this stage (it ends at the first look that passes), or abort"
    )
}

/// The rollback the guardrails in `tripped` call for, their values in its reason.
fn rollback_for(progress: &mut Progress, tripped: &[String], plan: &RolloutConfig) -> Stop {
    progress.reason = Some(judge::failure_reason(
        &progress.last_evaluation,
        tripped,
        plan.failure_limit,
    ));
    Phase::RolledBack.into()
}

/// Whether `live` still has `canary` as its canary, not rolled back, with a
/// rollout of it under way. The last part tells a canary installed again
/// under the same name (which clears `rollout`) from the one rolled out.
fn is_ours(live: &LiveState, canary: &str) -> bool {
    let rolling_out = recorded(live)
        .is_some_and(|progress| progress.phase.is_active() && progress.canary == canary);
    rolling_out
        && live.status != Status::RolledBack
        && live.canary.as_ref().is_some_and(|c| c.name == canary)
}

/// The rollout recorded in `live`, if any.
fn recorded(live: &LiveState) -> Option<Progress> {
    Progress::deserialize(live.rollout.as_ref()?).ok()
}

/// The ending of a rollout nobody can command any more. Not reached: the
/// commands' sender lives in `Rollouts`, which the rollout's task holds;
/// and never a reason to roll back.
fn orphaned() -> Ending {
    Phase::Superseded.into()
}

/// An abort's ending: the reason kept for the record, the caller to answer.
fn aborted(progress: &mut Progress, reason: String, reply: Reply) -> Ending {
    progress.reason = Some(reason);
    Ending {
        phase: Phase::Aborted,
        reply: Some(reply),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The time left of a stage of `duration` after `elapsed`, in whole
/// milliseconds that add up with [`millis`] of `elapsed` to the duration's.
fn time_left_ms(duration: Duration, elapsed: Duration) -> u64 {
    millis(duration).saturating_sub(millis(elapsed))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Looks at a pause take places after the planned ones, one each, and
    /// leave the planned places to the stage looks after them.
    #[test]
    fn looks_at_a_pause_spend_none_of_the_planned_share() {
        let mut looks = 0;
        let mut pause_looks = 0;
        let mut look = |pausing: Pausing| {
            looks += 1;
            if pausing == Pausing::Yes {
                pause_looks += 1;
            }
            spending_index(looks, pause_looks, 4, pausing)
        };
        let indexes: Vec<u64> = [
            Pausing::No,
            Pausing::No,
            Pausing::Yes,
            Pausing::Yes,
            Pausing::No,
            Pausing::No,
            Pausing::No,
            Pausing::Yes,
        ]
        .into_iter()
        .map(&mut look)
        .collect();
        // Stage looks 1 to 4 are planned; the pause's and the overrun's
        // take 5, 6, 7 and 8 in the order they come.
        assert_eq!(indexes, [1, 2, 5, 6, 3, 4, 7, 8]);
    }

    /// `rollout` in a state file written before failure runs were kept per
    /// guardrail.
    fn saved_by_an_older_version() -> Value {
        json!({
            "plan": {"stages": [{"weight": 10, "duration": "1h"}]},
            "canary": "v2",
            "phase": "progressing",
            "stage": 0,
            "stages": 1,
            "weight": 10.0,
            "stage_elapsed_ms": 1500,
            "time_left_ms": 3_598_500,
            "consecutive_failures": 1,
            "consecutive_inconclusive": 0,
            "evaluations": 3,
            "last_evaluation": [],
            "reason": null,
        })
    }

    #[test]
    fn progress_without_failure_runs_still_loads() {
        let progress: Progress = serde_json::from_value(saved_by_an_older_version())
            .expect("an older state file resumes");
        assert!(progress.failure_runs.is_empty());
        assert_eq!(progress.consecutive_failures, 1);
    }

    #[test]
    fn failure_runs_survive_a_save_and_load() {
        let mut progress: Progress =
            serde_json::from_value(saved_by_an_older_version()).expect("loads");
        progress.failure_runs.insert("success_rate".into(), 1);
        progress
            .failure_runs
            .insert(judge::INCONCLUSIVE_RUN.into(), 1);
        let saved = serde_json::to_value(&progress).expect("serialises");
        assert_eq!(
            saved["failure_runs"],
            json!({"inconclusive": 1, "success_rate": 1})
        );
        let loaded: Progress = serde_json::from_value(saved).expect("loads");
        assert_eq!(loaded, progress);
    }
}
