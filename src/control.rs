//! The control plane: every change of the live route table, in one place.
//!
//! Owns:
//! - The operations of SPEC section 3 on [`Control`]: set the weight, roll
//!   back, promote, install a canary, install or remove the shadow, explain
//!   a key, reload the config.
//! - The rollback latch.
//! - The order each change is made in: check, write the state file, swap
//!   the table (its gauges with it), tell the watchers of
//!   [`Control::changes`], log it, then write the audit line.
//! - Changes made anyway: a rollback, and a rollout's end, swap first and
//!   hold even when the state file refuses them (see `made_anyway`). They
//!   are saved again until it takes, as are audit lines the log refused.
//! - A rollback takes traffic off the canary (a rollout's: its own canary
//!   only) before it waits for the lock, and the tables that the changes
//!   ahead of it install keep that canary rolled back (`Installing`); once
//!   it is made (or found nothing to do), the table is the live state's
//!   again. With `on_rollback = "close"`, the rolled-back canary's streams
//!   are cut as it is rolled back, before the write.
//! - What is saved and audited: a rollout's look that changes only its
//!   progress is saved without a new generation or an audit line; a reload
//!   that places users anew without changing the live state is audited.
//! - Serialising changes by one lock, so two admin calls never interleave;
//!   readers of the live state take a copy that never waits for that lock
//!   (and shows a rollback once it is made).
//!
//! Does not own: HTTP (`admin`), the file format (`state`), or routing
//! (`routing`).

use std::sync::{Arc, Mutex, TryLockError};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;

use crate::config::{Config, ShadowConfig, VersionConfig, check_version_name};
use crate::routing::{self, Cohort, Weight};
use crate::shadow::SHADOW_PROTOCOL;
use crate::state::audit::{Action, Actor, AuditLog, Entry};
use crate::state::{
    CanaryState, LiveState, Origin, Rollback, SavedState, ShadowState, Source, StateError,
    StateStore, VersionState,
};
use crate::table::{Gate, Policy, RouteTable, Status, Table};
use crate::upstream::{Protocol, UpstreamAddr};

/// Why a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The request is malformed: a wrong type or an unknown key (SPEC: 400).
    #[error("{0}")]
    BadRequest(String),
    /// The change contradicts the current state (SPEC: 409).
    #[error("{0}")]
    Conflict(String),
    /// A value is out of range or malformed (SPEC: 422).
    #[error("{0}")]
    Invalid(String),
    /// The change could not be made durable, so it was not made.
    #[error(transparent)]
    Persist(#[from] StateError),
    /// A rollback (or a rollout's end) is live but could not be saved;
    /// saving it is retried.
    #[error(
        "{made}, but the state could not be saved ({error}); saving is retried every second and before any other change"
    )]
    Unsaved {
        /// What is live: "rolled back", "the rollout ended".
        made: &'static str,
        error: StateError,
    },
}

/// Runs `change`, a change through [`Control`] (which writes and syncs the
/// state file), from an async task: the rollout's, or the signals'. On a
/// multi-threaded runtime the thread first hands its other tasks to
/// another (`block_in_place`), so that a disk that stalls stalls the
/// change alone, not `/health`, `/metrics` or the admin API beside it. A
/// single-threaded runtime (in tests) has no other thread to hand them to.
pub(crate) fn on_disk<T>(change: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|runtime| runtime.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(change),
        _ => change(),
    }
}

/// Where one key lands under the live table (`GET /admin/route`).
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The key as text: a byte that is not UTF-8 shows as U+FFFD, though
    /// the bucket is the key's own bytes'.
    pub key: String,
    pub bucket: u16,
    pub cohort: &'static str,
    pub version: String,
    /// The version a request with this key gets now: `version`, or stable
    /// when the canary cannot take its cohort (none of its upstreams is
    /// available and `canary_unavailable = "stable"`, or it has yet to pass
    /// its first probe).
    pub served_by: String,
    pub weight: f64,
    pub salt: String,
    pub generation: u64,
}

/// What a config reload left.
#[derive(Debug)]
pub struct Reloaded {
    /// The live state after it.
    pub live: LiveState,
    /// Whether the reload itself made a canary live that was not (whose
    /// rollout the config's plan then starts); a canary installed through
    /// the admin API while it ran is not its own.
    pub new_canary: bool,
}

/// The one owner of the live state.
#[derive(Debug)]
pub struct Control {
    table: Arc<Table>,
    store: Box<dyn StateStore>,
    audit: AuditLog,
    current: Mutex<Current>,
    /// A copy of the live state for readers, replaced with every change,
    /// so that `GET /admin/state` and the rollout controller never wait
    /// for the lock while a change is being written to a slow disk.
    live: ArcSwap<LiveState>,
    /// The generation of the live state, for those who act on its changes.
    changes: watch::Sender<u64>,
    /// What the live table is made of. Held only while a table is
    /// swapped, never across a write.
    installing: Mutex<Installing>,
}

/// The table the live state describes, and the rollbacks under way.
#[derive(Debug)]
struct Installing {
    /// The table the live state describes, as last built. The live table
    /// is this one, but with its canary rolled back while a rollback of it
    /// is under way; the next build carries versions over from this one,
    /// so that a rollback under way does not start a canary's window
    /// afresh as a real one does.
    built: Arc<RouteTable>,
    /// The canary each rollback under way is for: a rollout's, by name, or
    /// (`None`) whichever is live when it is made.
    rollbacks: Vec<Option<String>>,
}

impl Installing {
    /// Swaps `built` in as the live table, its canary rolled back if a
    /// rollback under way is for it, and sets the table's gauges: the
    /// canary's share is the one traffic sees, even while the state that
    /// says so is still being written.
    fn show(&self, table: &Table) {
        let canary = self.built.canary.as_ref().map(|c| c.version.name.as_str());
        let rolled_back = self
            .rollbacks
            .iter()
            .any(|rollback| rollback.is_none() || rollback.as_deref() == canary);
        let shown = if rolled_back {
            self.built.rolled_back()
        } else {
            RouteTable::clone(&self.built)
        };
        record_table_gauges(&shown);
        table.store(shown);
    }
}

/// A rollback between taking traffic off its canary and being made;
/// dropped, it is no longer under way, and the live table is the one the
/// live state describes again (but for other rollbacks under way).
struct RollbackUnderWay<'a> {
    control: &'a Control,
    canary: Option<String>,
}

impl Drop for RollbackUnderWay<'_> {
    fn drop(&mut self) {
        let mut installing = self.control.installing();
        if let Some(at) = installing
            .rollbacks
            .iter()
            .position(|rollback| *rollback == self.canary)
        {
            installing.rollbacks.swap_remove(at);
        }
        // A rollback made installed its own table already; one that found
        // nothing to do, or was refused, gives its canary its traffic back.
        installing.show(&self.control.table);
    }
}

#[derive(Debug)]
struct Current {
    saved: SavedState,
    policy: Arc<Policy>,
    /// Changes that are live but not yet in the state file: a rollback,
    /// or a rollout's end, takes effect even when saving it fails (see
    /// [`made_anyway`]).
    unsaved: Option<Unsaved>,
}

/// What is needed to finish the changes that failed writes left in memory.
#[derive(Debug)]
struct Unsaved {
    /// The generation the state file still holds.
    on_disk: u64,
    /// Their audit lines, oldest first, written once they are saved.
    changes: Vec<UnsavedChange>,
}

#[derive(Debug)]
struct UnsavedChange {
    action: Action,
    before: LiveState,
    after: LiveState,
    reason: Option<String>,
    source: Actor,
}

impl Control {
    /// Takes over `saved` as the live state and builds the table from it.
    /// Its canary takes no traffic until it passes a health probe, wherever
    /// it came from: one in the config may not be running yet, and one
    /// restored from the state file may have been installed through the
    /// API and never have passed one (`serve` probes it before accepting).
    #[must_use]
    pub fn new(
        saved: SavedState,
        policy: Arc<Policy>,
        store: Box<dyn StateStore>,
        audit: AuditLog,
    ) -> Control {
        let built = Arc::new(build(&saved.live, &policy, None));
        let table = Arc::new(Table::new(RouteTable::clone(&built)));
        record_table_gauges(&built);
        Control {
            table,
            store,
            audit,
            live: ArcSwap::from_pointee(saved.live.clone()),
            changes: watch::Sender::new(saved.live.generation),
            current: Mutex::new(Current {
                saved,
                policy,
                unsaved: None,
            }),
            installing: Mutex::new(Installing {
                built,
                rollbacks: Vec::new(),
            }),
        }
    }

    /// Told the generation of every live state from now on, as soon as it
    /// is live (the rollout controller ends a rollout that a rollback ended).
    #[must_use]
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether the config's `[rollout]` plan is still to start for the
    /// live canary: it was installed by a seed and nothing has changed it
    /// since (see [`SavedState::rollout_due`]).
    #[must_use]
    pub fn is_rollout_due(&self) -> bool {
        self.lock().saved.is_rollout_due()
    }

    /// The table requests are routed by.
    #[must_use]
    pub fn table(&self) -> &Arc<Table> {
        &self.table
    }

    /// The live state. Never waits for a change in progress: it is the
    /// state before it until the change is made (a rollback, which swaps
    /// the table before it writes, is shown from that swap; traffic may
    /// leave the canary sooner, while a change ahead of it is written).
    #[must_use]
    pub fn state(&self) -> LiveState {
        LiveState::clone(&self.live.load())
    }

    /// Records how the live state was chosen on start. A saved state (the
    /// one restored, or the one a re-seed replaced) newer than the audit
    /// log's last line was saved by changes whose lines never went in (the
    /// process stopped between the two writes, or the log refused them to
    /// the end): the line says so, and a restore's has the last state the
    /// log has as its `before`.
    pub fn record_start(&self, origin: Origin, previous: Option<&LiveState>) {
        let current = self.lock();
        let live = &current.saved.live;
        let saved = match origin {
            Origin::Restored => Some(live),
            Origin::Reseeded => previous,
            Origin::Seeded | Origin::Reset => None,
        };
        let unlogged = saved.and_then(|saved| {
            self.audit
                .last_after::<LiveState>()
                .filter(|logged| logged.generation < saved.generation)
                .map(|logged| (logged, saved.generation))
        });
        let reason = match origin {
            Origin::Seeded => "no saved state: seeded from the config",
            Origin::Restored => "restored the saved state",
            Origin::Reseeded => {
                "the config's [versions] changed since the state was seeded: re-seeded from the \
                 config, whose renamed versions replace the live ones; the others stay as they \
                 were live"
            }
            Origin::Reset => "--reset-state: re-seeded from the config",
        };
        let reason = match &unlogged {
            Some((logged, saved)) => {
                tracing::warn!(
                    logged = logged.generation,
                    saved,
                    "the state file has changes the audit log does not"
                );
                format!(
                    "{reason}; the audit log's last line is of generation {}: the changes up to \
                     generation {saved} were saved but not logged",
                    logged.generation
                )
            }
            None => reason.to_owned(),
        };
        tracing::info!(
            origin = origin.as_str(),
            generation = live.generation,
            stable = %live.stable.name,
            canary = live.canary.as_ref().map_or("none", |c| c.name.as_str()),
            "{reason}"
        );
        self.write_audit(
            Action::Start(origin),
            previous.or(unlogged.as_ref().map(|(logged, _)| logged)),
            live,
            Some(&reason),
            Actor::Start,
        );
    }

    /// Sets the canary's weight. After a rollback only `force` may raise it;
    /// during a rollout it is the rollout's to set.
    pub fn set_weight(&self, weight: Weight, force: bool) -> Result<LiveState, ControlError> {
        self.change(Action::Weight, None, Actor::Api, |live| {
            if matches!(live.status, Status::Progressing | Status::Paused) {
                return Err(ControlError::Conflict(
                    "a rollout is in progress and sets the weight; abort it first".into(),
                ));
            }
            let rolled_back = live.status == Status::RolledBack;
            let canary = live
                .canary
                .as_mut()
                .ok_or_else(|| ControlError::Conflict("there is no canary to weigh; install one (PUT /admin/canary, or cohort ctl canary)".into()))?;
            if rolled_back && weight > Weight::ZERO && !force {
                return Err(ControlError::Conflict(format!(
                    "the canary {:?} was rolled back; send \"force\": true or install a new canary to raise its weight",
                    canary.name
                )));
            }
            canary.weight = weight.percent();
            if rolled_back && weight > Weight::ZERO {
                live.status = Status::Steady;
            }
            Ok(())
        })
    }

    /// Sends everyone to stable at once and latches until a new canary or a
    /// forced weight. Idempotent: rolling back a rolled-back canary changes nothing.
    pub fn rollback(&self, reason: &str, source: Source) -> Result<LiveState, ControlError> {
        self.roll_back(reason, source, None).map(|(live, _)| live)
    }

    /// [`Control::rollback`], saying also whether this call rolled a canary
    /// back: `false` when, by the time it was made, there was none (a
    /// promotion ahead of it, say) or it was rolled back already.
    pub fn rollback_telling(
        &self,
        reason: &str,
        source: Source,
    ) -> Result<(LiveState, bool), ControlError> {
        self.roll_back(reason, source, None)
    }

    /// [`Control::rollback`] by a rollout that ends with it (a guardrail, an
    /// abort), its end recorded in the same change: when the disk refuses
    /// the rollback, the rollout's end is live, and saved, with it.
    /// Refused if `canary` is no longer the live canary under its rollout:
    /// one installed since (a new canary, or the same name again) was not
    /// judged, and a rollback or promotion from outside ended the rollout.
    pub fn rollback_rollout(
        &self,
        canary: &str,
        reason: &str,
        source: Source,
        progress: serde_json::Value,
    ) -> Result<LiveState, ControlError> {
        self.roll_back(reason, source, Some((canary, progress)))
            .map(|(live, _)| live)
    }

    fn roll_back(
        &self,
        reason: &str,
        source: Source,
        rollout: Option<(&str, serde_json::Value)>,
    ) -> Result<(LiveState, bool), ControlError> {
        // Traffic leaves the canary before the lock is waited for: another
        // change being written (a weight, a rollout's look) holds it for
        // as long as the disk takes, and a rollback must not queue behind
        // it. Until this one is made, the tables those changes install
        // keep the canary rolled back too; a rollout's rollback is for
        // its own canary alone.
        let (under_way, taken_off) =
            self.take_traffic_off_the_canary(rollout.as_ref().map(|(canary, _)| *canary));
        let by_its_rollout = rollout.is_some();
        let mut made = false;
        let result = self.change(Action::Rollback, Some(reason), source.into(), |live| {
            if let Some((rolled_out, progress)) = rollout {
                if live.canary.as_ref().is_none_or(|c| c.name != rolled_out)
                    || !matches!(live.status, Status::Progressing | Status::Paused)
                {
                    return Err(ControlError::Conflict(format!(
                        "the canary is no longer {rolled_out:?} under its rollout"
                    )));
                }
                live.rollout = Some(progress);
            }
            let Some(canary) = live.canary.as_mut() else {
                return Ok(());
            };
            if live.status == Status::RolledBack && canary.weight == 0.0 {
                return Ok(());
            }
            canary.weight = 0.0;
            live.status = Status::RolledBack;
            made = true;
            live.last_rollback = Some(Rollback {
                at: crate::state::now_rfc3339(),
                reason: reason.to_owned(),
                source,
            });
            // One running is ended by it, in the same change, as by a
            // promotion (the controller then records why).
            if !by_its_rollout {
                live.supersede_rollout();
            }
            crate::metrics::record_rollback(source);
            Ok(())
        });
        drop(under_way);
        let table = self.table.snapshot();
        // The rolled-back canary's streams were cut as it was rolled back
        // (see `commit`). An operator's rollback asked while a new canary
        // was being written rolled back the new one; the one it took
        // traffic off, replaced meanwhile, was the one meant to stop
        // talking now. One promoted meanwhile is left alone.
        if table.policy.routing.on_rollback == crate::config::OnRollback::Close
            && let Some(replaced) = taken_off.filter(|_| !by_its_rollout)
            && table.stable.name != replaced.name
            && table
                .canary
                .as_ref()
                .is_none_or(|c| c.version.name != replaced.name)
        {
            replaced.close_streams();
        }
        result.map(|live| (live, made))
    }

    /// Swaps in the live table with the canary rolled back (only the one
    /// named `canary`, if given), and keeps every table installed so
    /// until the returned guard is dropped. Also returns the canary that
    /// traffic was taken off, if any.
    fn take_traffic_off_the_canary(
        &self,
        canary: Option<&str>,
    ) -> (RollbackUnderWay<'_>, Option<Arc<crate::table::Version>>) {
        let canary = canary.map(str::to_owned);
        let mut installing = self.installing();
        installing.rollbacks.push(canary.clone());
        installing.show(&self.table);
        let taken_off = installing
            .built
            .canary
            .as_ref()
            .filter(|c| canary.as_ref().is_none_or(|name| c.version.name == *name))
            .map(|c| Arc::clone(&c.version));
        (
            RollbackUnderWay {
                control: self,
                canary,
            },
            taken_off,
        )
    }

    fn installing(&self) -> std::sync::MutexGuard<'_, Installing> {
        self.installing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// With `on_rollback = "close"`, ends the open streams of the canary
    /// the live table holds rolled back: as it is rolled back, before the
    /// rollback is written, so that a bad version stops talking to users
    /// however long the disk takes.
    fn cut_rolled_back_streams(&self) {
        let table = self.table.load();
        if table.status == Status::RolledBack
            && table.policy.routing.on_rollback == crate::config::OnRollback::Close
            && let Some(canary) = &table.canary
        {
            canary.version.close_streams();
        }
    }

    /// Makes the canary the stable version; there is no canary after. A
    /// canary none of whose upstreams has passed a health check would take
    /// every user to upstreams not known to answer: only `force` promotes it.
    /// `source` is who asked, for the audit log (`api`, `rollout`).
    pub fn promote(&self, force: bool, source: Actor) -> Result<LiveState, ControlError> {
        self.promote_recording(force, source, None)
    }

    /// Promotes `canary` at the end of its rollout, recording the
    /// rollout's last `progress` in the same write: a crash cannot leave
    /// the rollout's end saved without the promotion it implies. Refused
    /// if `canary` is no longer the live canary, or, as an operator's
    /// promotion is, if none of its upstreams is healthy: a plan that ends
    /// at an approval gate may never have judged it on real traffic.
    pub fn promote_rollout(
        &self,
        canary: &str,
        progress: serde_json::Value,
    ) -> Result<LiveState, ControlError> {
        self.promote_recording(false, Actor::Rollout, Some((canary, progress)))
    }

    fn promote_recording(
        &self,
        force: bool,
        source: Actor,
        rollout: Option<(&str, serde_json::Value)>,
    ) -> Result<LiveState, ControlError> {
        self.change(Action::Promote, None, source, |live| {
            // The rollout's canary, still under its rollout: not one
            // installed again under its name since, unjudged.
            if let Some((rolled_out, _)) = &rollout
                && (live.canary.as_ref().is_none_or(|c| c.name != *rolled_out)
                    || !matches!(live.status, Status::Progressing | Status::Paused))
            {
                return Err(ControlError::Conflict(format!(
                    "the canary is no longer {rolled_out:?} under its rollout"
                )));
            }
            let canary = live
                .canary
                .take()
                .ok_or_else(|| ControlError::Conflict("there is no canary to promote".into()))?;
            if live.status == Status::RolledBack {
                live.canary = Some(canary);
                return Err(ControlError::Conflict(
                    "the canary was rolled back; install a new canary instead of promoting it"
                        .into(),
                ));
            }
            let table = self.table.snapshot();
            let never_healthy = table.canary.as_ref().is_some_and(|c| {
                c.version.name == canary.name && !c.version.health.iter().any(|h| h.is_healthy())
            });
            if never_healthy && !force {
                let name = canary.name.clone();
                live.canary = Some(canary);
                return Err(ControlError::Conflict(format!(
                    "no upstream of the canary {name:?} is healthy; send \"force\": true to promote it anyway"
                )));
            }
            live.stable = VersionState {
                name: canary.name,
                upstreams: canary.upstreams,
            };
            live.status = Status::Steady;
            match rollout {
                Some((_, progress)) => live.rollout = Some(progress),
                None => live.supersede_rollout(),
            }
            Ok(())
        })
    }

    /// Installs a new canary (replacing any), which clears the rollback
    /// latch. The rolled-back version itself, installed again under the same
    /// name, stays latched: at weight 0, or above it only with `force`, so a
    /// pipeline that re-applies the same release cannot re-expose it.
    pub fn install_canary(
        &self,
        name: &str,
        upstreams: &[String],
        weight: Weight,
        force: bool,
    ) -> Result<LiveState, ControlError> {
        check_version_name(name).map_err(|m| ControlError::Invalid(format!("name: {m}")))?;
        let upstreams = parse_upstreams(upstreams)?;
        self.change(Action::Canary, None, Actor::Api, |live| {
            if live.stable.name == name {
                return Err(ControlError::Conflict(format!(
                    "{name:?} is the stable version's name"
                )));
            }
            if live.shadow.as_ref().is_some_and(|s| s.name == name) {
                return Err(ControlError::Conflict(format!(
                    "{name:?} is the shadow's name"
                )));
            }
            let latched = live.status == Status::RolledBack
                && live.canary.as_ref().is_some_and(|c| c.name == name);
            if latched && weight > Weight::ZERO && !force {
                return Err(ControlError::Conflict(format!(
                    "the canary {name:?} was rolled back; install a new version, or send \"force\": true to expose it again"
                )));
            }
            // A running rollout is ended by it, in the same change, as by
            // a rollback or a promotion (its controller then records
            // why); an ended one's record goes with its canary.
            if matches!(live.status, Status::Progressing | Status::Paused) {
                live.supersede_rollout();
            } else {
                live.rollout = None;
            }
            live.canary = Some(CanaryState {
                name: name.to_owned(),
                upstreams,
                weight: weight.percent(),
            });
            if !latched || weight > Weight::ZERO {
                live.status = Status::Steady;
            }
            Ok(())
        })
    }

    /// Installs, changes or removes (`None`) the shadow version.
    pub fn set_shadow(
        &self,
        shadow: Option<(&str, &[String], Weight)>,
    ) -> Result<LiveState, ControlError> {
        let Some((name, upstreams, percent)) = shadow else {
            return self.change(Action::Shadow, Some("shadow removed"), Actor::Api, |live| {
                live.shadow = None;
                Ok(())
            });
        };
        check_version_name(name).map_err(|m| ControlError::Invalid(format!("name: {m}")))?;
        let upstreams = parse_upstreams(upstreams)?;
        if let Some((i, _)) = upstreams
            .iter()
            .enumerate()
            .find(|(_, u)| u.protocol != Protocol::Http1)
        {
            return Err(ControlError::Invalid(format!(
                "upstreams[{i}]: {SHADOW_PROTOCOL}"
            )));
        }
        self.change(Action::Shadow, None, Actor::Api, |live| {
            if live.stable.name == name || live.canary.as_ref().is_some_and(|c| c.name == name) {
                return Err(ControlError::Conflict(format!(
                    "{name:?} is already a version's name"
                )));
            }
            live.shadow = Some(ShadowState {
                name: name.to_owned(),
                upstreams,
                percent: percent.percent(),
            });
            Ok(())
        })
    }

    /// Takes the config's `[shadow]` as the live shadow when the operator
    /// edited that section since the live shadow was taken from it, as a
    /// changed `[versions]` re-seeds the versions (SPEC section 4). Until
    /// then a shadow set or removed through the admin API stays. Called on
    /// start (`source` [`Actor::Start`]) and on every reload ([`Actor::Signal`]).
    pub fn follow_config_shadow(
        &self,
        shadow: Option<&ShadowConfig>,
        source: Actor,
    ) -> Result<LiveState, ControlError> {
        let digest = crate::state::shadow_digest(shadow);
        {
            let mut current = self.lock();
            if current.saved.shadow_digest.is_none() {
                // Saved before the digest was kept: which section the live
                // shadow came from is unknown, so the config's counts as
                // seen. Saved with the next change.
                current.saved.shadow_digest = Some(digest);
                return Ok(current.saved.live.clone());
            }
        }
        let reason = "the config's [shadow] section changed";
        let mut followed = false;
        let live = self.change_saved(Action::Shadow, Some(reason), source, |saved| {
            if saved.shadow_digest.as_deref() == Some(digest.as_str()) {
                return Ok(());
            }
            followed = true;
            let next = shadow.map(ShadowState::from);
            if let Some(next) = &next {
                let live = &saved.live;
                if live.stable.name == next.name
                    || live.canary.as_ref().is_some_and(|c| c.name == next.name)
                {
                    return Err(ControlError::Conflict(format!(
                        "shadow.name: {:?} is a live version's name; the live shadow stays",
                        next.name
                    )));
                }
            }
            saved.live.shadow = next;
            saved.shadow_digest = Some(digest);
            Ok(())
        })?;
        if followed {
            tracing::info!(
                shadow = live.shadow.as_ref().map_or("none", |s| s.name.as_str()),
                "the config's [shadow] changed; the live shadow follows it"
            );
        }
        Ok(live)
    }

    /// The live state as `GET /admin/state` shows it: with the health of
    /// every upstream of every version, read from the live table (health is
    /// observed, never saved).
    #[must_use]
    pub fn state_with_health(&self) -> serde_json::Value {
        self.with_health(&self.live.load())
    }

    /// `live` with the health of every upstream of each of its versions
    /// that the live table holds: how `GET /admin/state` and the replies to
    /// changes show a state.
    #[must_use]
    pub fn with_health(&self, live: &LiveState) -> serde_json::Value {
        let table = self.table.snapshot();
        let mut value = serde_json::to_value(live).unwrap_or_default();
        crate::rollout::webhook::hide_secrets(&mut value);
        let versions = [
            ("stable", Some(&table.stable)),
            ("canary", table.canary.as_ref().map(|c| &c.version)),
            ("shadow", table.shadow.as_ref().map(|s| &s.version)),
        ];
        for (field, version) in versions {
            if let (Some(version), Some(object)) = (
                version,
                value.get_mut(field).and_then(|v| v.as_object_mut()),
            ) && object.get("name").and_then(|n| n.as_str()) == Some(version.name.as_str())
            {
                let health: Vec<_> = version
                    .upstreams
                    .iter()
                    .zip(version.health.iter())
                    .map(|(upstream, health)| health.report(upstream.to_string()))
                    .collect();
                object.insert(
                    "health".into(),
                    serde_json::to_value(health).unwrap_or_default(),
                );
            }
        }
        value
    }

    /// A change made by the rollout controller (progress, weight, status),
    /// by itself (`source` = `rollout`) or on an operator's command.
    pub fn rollout_change(
        &self,
        action: Action,
        reason: Option<&str>,
        source: Actor,
        edit: impl FnOnce(&mut LiveState),
    ) -> Result<LiveState, ControlError> {
        self.change(action, reason, source, |live| {
            edit(live);
            Ok(())
        })
    }

    /// Where `key` lands under the live table.
    #[must_use]
    pub fn explain(&self, key: &[u8]) -> Explanation {
        let table = self.table.load();
        let placement = routing::place(table.salt.as_bytes(), table.weight(), key);
        let cohort = if table.canary.is_some() {
            placement.cohort
        } else {
            Cohort::Stable
        };
        let version = table.version(cohort);
        let falls_back =
            cohort == Cohort::Canary && table.canary_may_fall_back() && !version.has_available();
        let served_by = if falls_back { &table.stable } else { version };
        Explanation {
            key: String::from_utf8_lossy(key).into_owned(),
            bucket: placement.bucket,
            cohort: cohort.as_str(),
            version: version.name.clone(),
            served_by: served_by.name.clone(),
            weight: table.weight().percent(),
            salt: table.salt.clone(),
            generation: table.generation,
        }
    }

    /// Applies a reloaded config: routing options always; `[versions]` only
    /// when it changed since the live state was seeded from it, and
    /// `[shadow]` likewise ([`Control::follow_config_shadow`]). All or
    /// nothing: a change the disk refuses, or a `[shadow]` named as a live
    /// version is, leaves the running config as it was.
    pub fn reload(&self, config: &Config) -> Result<Reloaded, ControlError> {
        let versions_changed =
            crate::state::versions_digest(&config.versions) != self.lock().saved.versions_digest;
        // A changed `[versions]` re-seeds the shadow with the versions, in
        // the same write; otherwise the shadow goes first, so that the
        // routing options are not applied when it cannot be.
        if !versions_changed {
            self.follow_config_shadow(config.shadow.as_ref(), Actor::Signal)?;
        }
        self.reload_versions(config)
    }

    fn reload_versions(&self, config: &Config) -> Result<Reloaded, ControlError> {
        let policy = Arc::new(Policy::from_config(config));
        let digest = crate::state::versions_digest(&config.versions);
        let mut current = self.lock();
        let salt_before = self.table.load().salt.clone();
        let keys_before = current.policy.routing.sticky_keys.clone();
        if digest == current.saved.versions_digest {
            current.policy = policy;
            self.install(&current.saved.live, &current.policy);
            tracing::info!("config reloaded; [versions] unchanged, the live state stays");
            self.tell_routing_change(&current, &salt_before, &keys_before);
            return Ok(Reloaded {
                live: current.saved.live.clone(),
                new_canary: false,
            });
        }
        // Saved first, so that the state file never skips a change. Only
        // here: the other way writes nothing, so it cannot fail after the
        // shadow went live.
        self.save_unsaved(&mut current)?;
        let before = current.saved.live.clone();
        let mut live = current.saved.reseed(
            &config.versions,
            config.shadow.as_ref(),
            before.generation + 1,
        );
        // An edit of versions the live state has moved past (promoted, or
        // replaced through the API) changes nothing: the new section is
        // saved as the one seen, and no generation or audit line says
        // otherwise.
        let unchanged = LiveState {
            generation: before.generation,
            ..live.clone()
        } == before;
        if unchanged {
            live.generation = before.generation;
        }
        let next = SavedState::seeded(
            live,
            &config.versions,
            config.shadow.as_ref(),
            Some(&current.saved),
            config.rollout.is_some(),
        );
        self.store.write(Some(before.generation), &next)?;
        self.keep(&mut current, next);
        current.policy = policy;
        self.install(&current.saved.live, &current.policy);
        if unchanged {
            tracing::info!(
                generation = before.generation,
                "config reloaded; [versions] changed, but only in versions the live state has moved past: nothing re-seeded"
            );
            self.tell_routing_change(&current, &salt_before, &keys_before);
            return Ok(Reloaded {
                live: before,
                new_canary: false,
            });
        }
        self.publish(&current.saved.live);
        let reason = "config reloaded with a changed [versions]";
        log_change(
            Action::Reseed,
            Actor::Signal,
            Some(reason),
            &current.saved.live,
        );
        self.write_audit(
            Action::Reseed,
            Some(&before),
            &current.saved.live,
            Some(reason),
            Actor::Signal,
        );
        Ok(Reloaded {
            new_canary: crate::state::new_canary(Some(&before), &current.saved.live),
            live: current.saved.live.clone(),
        })
    }

    /// Logs and audits a reload that left the live state as it was but
    /// changed the salt or the sticky keys: users may not be where they
    /// were, a change of the route table all the same.
    fn tell_routing_change(
        &self,
        current: &Current,
        salt_before: &str,
        keys_before: &[crate::routing::key::KeySource],
    ) {
        let salt = &self.table.load().salt;
        let keys = &current.policy.routing.sticky_keys;
        let mut changed = Vec::new();
        if salt.as_str() != salt_before {
            changed.push(format!("the salt from {salt_before:?} to {salt:?}"));
        }
        if keys.as_slice() != keys_before {
            let list = |keys: &[crate::routing::key::KeySource]| {
                keys.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            changed.push(format!(
                "routing.sticky_keys from [{}] to [{}]",
                list(keys_before),
                list(keys)
            ));
        }
        if !changed.is_empty() {
            let reason = format!(
                "config reloaded with {}: every user is placed anew",
                changed.join(" and ")
            );
            tracing::warn!(%reason, "routing changed");
            let live = &current.saved.live;
            self.write_audit(
                Action::Routing,
                Some(live),
                live,
                Some(&reason),
                Actor::Signal,
            );
        }
    }

    /// Swaps in the route table for `live`, carrying over the unchanged
    /// versions of the table last built (see [`build`]); with its canary
    /// rolled back while a rollback of it is under way (see [`Installing`]).
    fn install(&self, live: &LiveState, policy: &Arc<Policy>) {
        let mut installing = self.installing();
        installing.built = Arc::new(build(live, policy, Some(&installing.built)));
        installing.show(&self.table);
    }

    /// Makes `next` the state held, and its live part the one readers see.
    fn keep(&self, current: &mut Current, next: SavedState) {
        self.live.store(Arc::new(next.live.clone()));
        current.saved = next;
    }

    /// Tells whoever watches [`Control::changes`] of `live`.
    fn publish(&self, live: &LiveState) {
        self.changes.send_replace(live.generation);
    }

    /// Applies `edit` to a copy of the live state; if it changed anything,
    /// persists it, swaps the table and audits it. A rollback (and a
    /// rollout's end) swaps first, so traffic leaves the canary even if
    /// the disk is slow or failing (see [`made_anyway`]).
    fn change(
        &self,
        action: Action,
        reason: Option<&str>,
        source: Actor,
        edit: impl FnOnce(&mut LiveState) -> Result<(), ControlError>,
    ) -> Result<LiveState, ControlError> {
        self.change_saved(action, reason, source, |saved| edit(&mut saved.live))
    }

    /// Saves a rollout's look at its guardrails. One that changed the
    /// rollout's progress alone (no weight, status or version) moves no
    /// request: it is written to the state file, so a restart resumes from
    /// it, but under the same generation and with no audit line, so
    /// neither counts looks. Any other is saved as
    /// [`Control::rollout_change`] saves it.
    pub fn rollout_look(
        &self,
        edit: impl FnOnce(&mut LiveState),
    ) -> Result<LiveState, ControlError> {
        let mut current = self.lock();
        self.save_unsaved(&mut current)?;
        let mut next = current.saved.clone();
        edit(&mut next.live);
        if !only_the_rollout_differs(&next, &current.saved) {
            return self.commit(
                &mut current,
                Action::RolloutEvaluation,
                None,
                Actor::Rollout,
                next,
            );
        }
        if next != current.saved {
            self.store
                .write(Some(current.saved.live.generation), &next)?;
            self.keep(&mut current, next);
        }
        Ok(current.saved.live.clone())
    }

    /// [`Control::change`], for an edit that also records where the state
    /// came from (the config digests beside the live state).
    fn change_saved(
        &self,
        action: Action,
        reason: Option<&str>,
        source: Actor,
        edit: impl FnOnce(&mut SavedState) -> Result<(), ControlError>,
    ) -> Result<LiveState, ControlError> {
        let mut current = self.lock();
        // Saved before anything else, so the state file never skips a
        // change; what is made anyway queues behind it instead.
        let still_unsaved = match self.save_unsaved(&mut current) {
            Ok(()) => None,
            Err(error) => match made_anyway(action) {
                None => return Err(error.into()),
                Some(made) => Some(ControlError::Unsaved { made, error }),
            },
        };
        let mut next = current.saved.clone();
        edit(&mut next)?;
        // Nothing to make (a rollback repeated), but what is live is still
        // not saved: not an `Ok`, which would pass for a saved change to a
        // caller that retries until it succeeds.
        if next == current.saved
            && let Some(unsaved) = still_unsaved
        {
            return Err(unsaved);
        }
        self.commit(&mut current, action, reason, source, next)
    }

    /// Makes `next` the live state, if it differs from the current one:
    /// see [`Control::change`].
    fn commit(
        &self,
        current: &mut Current,
        action: Action,
        reason: Option<&str>,
        source: Actor,
        mut next: SavedState,
    ) -> Result<LiveState, ControlError> {
        if next == current.saved {
            return Ok(next.live);
        }
        // The canary's first change after its seed (the plan's start, or
        // an operator's) settles what the config's plan was to decide.
        if next.live.canary != current.saved.live.canary
            || next.live.status != current.saved.live.status
        {
            next.rollout_due = None;
        }
        let before = current.saved.live.clone();
        next.live.generation = before.generation + 1;
        let on_disk = current
            .unsaved
            .as_ref()
            .map_or(before.generation, |unsaved| unsaved.on_disk);
        let made_anyway = made_anyway(action);
        let swap_first = made_anyway.is_some();
        if swap_first {
            self.install(&next.live, &current.policy);
            self.live.store(Arc::new(next.live.clone()));
            if action == Action::Rollback {
                self.cut_rolled_back_streams();
            }
        }
        if let Err(error) = self.store.write(Some(on_disk), &next) {
            let Some(made) = made_anyway else {
                return Err(error.into());
            };
            // In effect already: keep it so, in memory, and keep trying to
            // save it, so that a restart cannot undo it.
            tracing::error!(%error, "{made}, but the state could not be saved; retrying");
            let change = UnsavedChange {
                action,
                before,
                after: next.live.clone(),
                reason: reason.map(str::to_owned),
                source,
            };
            self.keep(current, next);
            current
                .unsaved
                .get_or_insert_with(|| Unsaved {
                    on_disk,
                    changes: Vec::new(),
                })
                .changes
                .push(change);
            self.publish(&current.saved.live);
            log_change(action, source, reason, &current.saved.live);
            return Err(ControlError::Unsaved { made, error });
        }
        if !swap_first {
            self.install(&next.live, &current.policy);
        }
        self.keep(current, next);
        self.publish(&current.saved.live);
        log_change(action, source, reason, &current.saved.live);
        // Changes held back before this one are in the state file with it.
        self.audit_saved(current);
        self.write_audit(action, Some(&before), &current.saved.live, reason, source);
        Ok(current.saved.live.clone())
    }

    /// Saves a live state that a failed write left in memory only, if
    /// any, and audits the change that made it. Run before every change,
    /// so the state file never skips one, and every second (see
    /// [`Control::keep_saved`]).
    fn save_unsaved(&self, current: &mut Current) -> Result<(), StateError> {
        let Some(unsaved) = &current.unsaved else {
            return Ok(());
        };
        self.store.write(Some(unsaved.on_disk), &current.saved)?;
        tracing::info!(
            generation = current.saved.live.generation,
            "the state that could not be saved is saved now"
        );
        self.audit_saved(current);
        Ok(())
    }

    /// Writes the audit lines of the changes a failed write held back,
    /// once the state file holds them.
    fn audit_saved(&self, current: &mut Current) {
        for change in current
            .unsaved
            .take()
            .map(|u| u.changes)
            .unwrap_or_default()
        {
            self.write_audit(
                change.action,
                Some(&change.before),
                &change.after,
                change.reason.as_deref(),
                change.source,
            );
        }
    }

    /// Saves a live state that could not be saved, one last time before
    /// the process exits; `Ok` when nothing is left unsaved.
    pub fn save_before_exit(&self) -> Result<(), ControlError> {
        let mut current = self.lock();
        let saved = self.save_unsaved(&mut current);
        // Audit lines held back are lost with the process, unless the disk
        // takes them now.
        if let Err(error) = self.audit.retry() {
            tracing::error!(%error, "audit lines held back are lost: the log still refuses them");
        }
        saved.map_err(ControlError::from)
    }

    /// Retries saving a live state that a failed write left in memory
    /// only, and appending the audit lines a failed append held back,
    /// every second until `stop` resolves.
    pub async fn keep_saved(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = &mut stop => return,
            }
            // On the blocking pool: a write to a stalled disk must not
            // hold a runtime thread that `/health` is answered on.
            let control = Arc::clone(&self);
            let _ = tokio::task::spawn_blocking(move || control.retry_saving()).await;
        }
    }

    /// One pass of [`Control::keep_saved`].
    fn retry_saving(&self) {
        // A change in progress saves what is unsaved before anything else:
        // no need to wait for it.
        let current = match self.current.try_lock() {
            Ok(current) => Some(current),
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        if let Some(mut current) = current {
            if current.unsaved.is_some()
                && let Err(error) = self.save_unsaved(&mut current)
            {
                tracing::warn!(%error, "the live state is still not saved");
            }
            drop(current);
        }
        // Without the state's lock, which a slow write of the held lines
        // would otherwise keep from every change.
        match self.audit.retry() {
            Ok(0) => {}
            Ok(bytes) => tracing::info!(bytes, "the audit lines held back are appended now"),
            Err(error) => tracing::warn!(%error, "the audit log still refuses its lines"),
        }
    }

    fn write_audit(
        &self,
        action: Action,
        before: Option<&LiveState>,
        after: &LiveState,
        reason: Option<&str>,
        source: Actor,
    ) {
        // The audit log is a log: it shows webhooks as the process log does.
        let shown = |state: &LiveState| {
            let mut value = serde_json::to_value(state).unwrap_or_default();
            crate::rollout::webhook::hide_secrets(&mut value);
            value
        };
        let (before, after) = (before.map(shown), shown(after));
        let entry = Entry {
            action,
            before: before.as_ref(),
            after: Some(&after),
            reason,
            source,
        };
        if let Err(error) = self.audit.append(&entry) {
            tracing::error!(%error, action = action.as_str(), "cannot append to the audit log; the line is kept and retried every second");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        // A panic while holding the lock leaves the state as last persisted; carry on.
        self.current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What a change is said to have done when it is in effect although the
/// state file refused it, or `None` for a change that the refusal undoes.
/// Made anyway: traffic off the canary, and a rollout that has stopped no
/// longer reading as running (which would refuse every weight change, with
/// no rollout left to abort). Each is swapped in first, kept in memory and
/// saved later (see [`Control::keep_saved`]).
fn made_anyway(action: Action) -> Option<&'static str> {
    match action {
        Action::Rollback => Some("rolled back"),
        Action::RolloutEnd | Action::RolloutDone => Some("the rollout ended"),
        _ => None,
    }
}

/// Whether `next` differs from `saved` in the live state's `rollout` alone.
fn only_the_rollout_differs(next: &SavedState, saved: &SavedState) -> bool {
    let mut same = next.clone();
    same.live.rollout.clone_from(&saved.live.rollout);
    same == *saved
}

/// Parses the upstreams of an admin call: at least one, each once (as the
/// config requires: a repeated upstream would take twice its share).
fn parse_upstreams(upstreams: &[String]) -> Result<Vec<UpstreamAddr>, ControlError> {
    if upstreams.is_empty() {
        return Err(ControlError::Invalid(
            "upstreams: must name at least one upstream".into(),
        ));
    }
    let mut parsed: Vec<UpstreamAddr> = Vec::with_capacity(upstreams.len());
    for (i, text) in upstreams.iter().enumerate() {
        let addr = UpstreamAddr::parse(text)
            .map_err(|m| ControlError::Invalid(format!("upstreams[{i}]: {m}")))?;
        if parsed.contains(&addr) {
            return Err(ControlError::Invalid(format!(
                "upstreams[{i}]: {text:?} is listed twice"
            )));
        }
        parsed.push(addr);
    }
    Ok(parsed)
}

/// Builds the route table for `live` from `previous` (see
/// [`RouteTable::build`]): unchanged versions are reused, changed ones keep
/// their upstreams' health, window and open streams. A canary not in
/// `previous` passes the readiness gate before it gets traffic.
fn build(live: &LiveState, policy: &Arc<Policy>, previous: Option<&Arc<RouteTable>>) -> RouteTable {
    // The windows' slots follow a running rollout's interval, whatever the
    // config's: each look then finds the slots closed since the last, and
    // one `interval` after a step the first slot wholly at the new weight.
    // With slots of a longer config interval, a plan that looks more often
    // would see nothing of a short stage; with shorter ones, a plan that
    // looks less often than once per span would lose requests between looks.
    let policy = match running_interval(live) {
        Some(slot) if slot != policy.window_slot => Arc::new(Policy {
            window_slot: slot,
            ..Policy::clone(policy)
        }),
        _ => Arc::clone(policy),
    };
    let stable = live.stable.config();
    let canary = live.canary.as_ref().map(|c| {
        (
            VersionConfig {
                name: c.name.clone(),
                upstreams: c.upstreams.clone(),
            },
            live.weight(),
        )
    });
    let shadow = live.shadow.as_ref().map(|s| {
        (
            VersionConfig {
                name: s.name.clone(),
                upstreams: s.upstreams.clone(),
            },
            s.weight(),
        )
    });
    RouteTable::build(
        live.generation,
        live.status,
        &stable,
        canary.as_ref(),
        shadow.as_ref(),
        policy,
        previous.map(AsRef::as_ref),
        Gate::UntilProbed,
    )
}

/// The interval of the rollout `live` says is running, read from its plan;
/// `None` when none runs (or its plan cannot be read: a start refuses such
/// a state, see `rollout::controller::check_saved`).
fn running_interval(live: &LiveState) -> Option<std::time::Duration> {
    if !matches!(live.status, Status::Progressing | Status::Paused) {
        return None;
    }
    let plan = live.rollout.as_ref()?.get("plan")?.clone();
    crate::config::saved_rollout_from_json(plan)
        .ok()
        .map(|plan| plan.interval)
}

/// Says in the process log what a change made live, as its audit line
/// does (which waits for a disk that refuses it): who, what, why, and
/// where the release stands now. A rollback, whoever made it (a
/// guardrail's too: see `Control::rollback_rollout`), is a warning, as
/// `SIGUSR1`'s always was; the end it gives a rollout is not another.
fn log_change(action: Action, source: Actor, reason: Option<&str>, live: &LiveState) {
    let rolled_back = action == Action::Rollback && live.status == Status::RolledBack;
    let (action, source) = (action.as_str(), source.as_str());
    let (generation, status) = (live.generation, live.status.as_str());
    let stable = live.stable.name.as_str();
    let canary = live.canary.as_ref().map_or("none", |c| c.name.as_str());
    let weight = live.weight().percent();
    let why = reason
        .map(|reason| format!(": {reason}"))
        .unwrap_or_default();
    if rolled_back {
        tracing::warn!(%action, %source, generation, %status, %stable, %canary, weight, "rolled back{why}");
    } else {
        tracing::info!(%action, %source, generation, %status, %stable, %canary, weight, "live state changed{why}");
    }
}

/// The route table's gauges: the canary's weight, the generation.
fn record_table_gauges(table: &RouteTable) {
    let weight = table.canary.as_ref().map_or(0.0, |c| c.weight.percent());
    crate::metrics::record_table(weight, table.generation);
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    use super::*;
    use crate::state::file::FileStore;

    /// Long enough for any thread here to get the CPU; only a read that
    /// waits for the stalled write (a hang) runs into it.
    const DEADLINE: Duration = Duration::from_secs(30);

    /// The state file on a disk that has stalled: each write waits, after
    /// saying it has begun, until the test lets it through.
    #[derive(Debug)]
    struct StalledDisk {
        file: FileStore,
        begun: Mutex<mpsc::Sender<()>>,
        go: Mutex<mpsc::Receiver<()>>,
    }

    impl StateStore for StalledDisk {
        fn load(&self) -> Result<Option<SavedState>, StateError> {
            self.file.load()
        }

        fn write(&self, expected: Option<u64>, state: &SavedState) -> Result<(), StateError> {
            let _ = self.begun.lock().unwrap().send(());
            let _ = self.go.lock().unwrap().recv_timeout(DEADLINE);
            self.file.write(expected, state)
        }

        fn set_aside(&self) -> Result<String, StateError> {
            self.file.set_aside()
        }
    }

    /// Reads the live state on another thread; `None` if the read did not
    /// return before the deadline.
    fn read_state(control: &Arc<Control>) -> Option<(LiveState, serde_json::Value)> {
        let control = Arc::clone(control);
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send((control.state(), control.state_with_health()));
        });
        rx.recv_timeout(DEADLINE).ok()
    }

    /// A control plane whose state file is on a [`StalledDisk`], with the
    /// disk's signals: a write has begun, and let it through.
    struct Stalled {
        control: Arc<Control>,
        begun: mpsc::Receiver<()>,
        go: mpsc::Sender<()>,
        _dir: tempfile::TempDir,
    }

    fn stalled() -> Stalled {
        stalled_with(&crate::config::two_versions(10))
    }

    fn stalled_with(config: &Config) -> Stalled {
        let dir = tempfile::tempdir().unwrap();
        let file = FileStore::new(dir.path().join("state.json"));
        let (saved, _, _) =
            crate::state::restore(&file, &config.versions, None, false, false).unwrap();
        let (begun_tx, begun) = mpsc::channel();
        let (go, go_rx) = mpsc::channel();
        let disk = StalledDisk {
            file,
            begun: Mutex::new(begun_tx),
            go: Mutex::new(go_rx),
        };
        let audit = AuditLog::open(dir.path().join("audit.jsonl")).unwrap();
        let control = Arc::new(Control::new(
            saved,
            Arc::new(Policy::from_config(config)),
            Box::new(disk),
            audit,
        ));
        Stalled {
            control,
            begun,
            go,
            _dir: dir,
        }
    }

    /// A runtime with one worker: a task that holds it up holds up every
    /// other task on it, as `/health` and `/metrics` would be.
    fn one_worker() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    /// A runtime with two workers, as the control runtime has: a rollout's
    /// task and a command to it run side by side.
    fn two_workers() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// The rollouts of `stalled`'s control plane.
    fn rollouts_of(stalled: &Stalled) -> Arc<crate::rollout::controller::Rollouts> {
        let tls = crate::tls::client_config(None).unwrap();
        crate::rollout::controller::Rollouts::new(
            Arc::clone(&stalled.control),
            None,
            crate::rollout::webhook::Webhooks::new(tls),
        )
    }

    /// Starts `plan` as the admin API starts one, off `runtime` (on which
    /// its task runs), and lets the start's write through.
    fn start_on_a_stalled_disk(
        stalled: &Stalled,
        rollouts: &Arc<crate::rollout::controller::Rollouts>,
        runtime: &tokio::runtime::Runtime,
        plan: serde_json::Value,
    ) {
        let start = thread::spawn({
            let rollouts = Arc::clone(rollouts);
            let runtime = runtime.handle().clone();
            move || {
                let _entered = runtime.enter();
                rollouts.start(Some(plan), Actor::Api)
            }
        });
        stalled
            .begun
            .recv_timeout(DEADLINE)
            .expect("the start saves");
        stalled.go.send(()).unwrap();
        start.join().unwrap().expect("the rollout starts");
    }

    /// Starts a change of the weight to `percent` on its own thread, and
    /// waits until its write stalls.
    fn stall_a_change(
        stalled: &Stalled,
        percent: f64,
    ) -> thread::JoinHandle<Result<LiveState, ControlError>> {
        let change = thread::spawn({
            let control = Arc::clone(&stalled.control);
            move || control.set_weight(Weight::from_percent(percent).unwrap(), false)
        });
        stalled
            .begun
            .recv_timeout(DEADLINE)
            .expect("the change writes the state");
        change
    }

    #[test]
    fn reading_the_live_state_does_not_wait_for_a_stalled_write() {
        let stalled = stalled();
        let Stalled {
            control, begun, go, ..
        } = &stalled;

        // A weight change: the state read while it is written is the one before it.
        let change = stall_a_change(&stalled, 50.0);
        let (live, shown) = read_state(control).expect("the read returns while the write stalls");
        assert_eq!((live.generation, live.weight().percent()), (1, 10.0));
        assert_eq!(shown["generation"], 1);
        go.send(()).unwrap();
        let changed = change.join().unwrap().expect("the change is saved");
        assert_eq!(changed.generation, 2);
        assert_eq!(control.state(), changed);

        // A rollback: traffic leaves the canary before the write, and so does the state read.
        let rollback = thread::spawn({
            let control = Arc::clone(control);
            move || control.rollback("a test", Source::Api)
        });
        begun
            .recv_timeout(DEADLINE)
            .expect("the rollback writes the state");
        let (live, shown) = read_state(control).expect("the read returns while the write stalls");
        assert_eq!((live.generation, live.status), (3, Status::RolledBack));
        assert_eq!(live.weight(), Weight::ZERO);
        assert_eq!(shown["status"], "rolled_back");
        go.send(()).unwrap();
        let rolled_back = rollback.join().unwrap().expect("the rollback is saved");
        assert_eq!(control.state(), rolled_back);
    }

    /// The table's status and canary weight, polled every 10 ms until it is
    /// rolled back or the deadline passes.
    fn rolled_back_within_deadline(control: &Control) -> (Status, Option<Weight>) {
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let table = control.table().snapshot();
            let seen = (table.status, table.canary.as_ref().map(|c| c.weight));
            if seen.0 == Status::RolledBack || std::time::Instant::now() > deadline {
                return seen;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_rollback_takes_traffic_off_the_canary_while_another_change_is_written() {
        let stalled = stalled();
        let change = stall_a_change(&stalled, 50.0);
        let rollback = thread::spawn({
            let control = Arc::clone(&stalled.control);
            move || control.rollback_telling("a test", Source::Signal)
        });
        let during_the_write = rolled_back_within_deadline(&stalled.control);
        let write_stalled = !change.is_finished();

        // The weight change is made after its write, and does not put
        // traffic back on the canary before the rollback is made after it.
        stalled.go.send(()).unwrap();
        let changed = change.join().unwrap().expect("the change is saved");
        assert_eq!(changed.weight().percent(), 50.0);
        let table = stalled.control.table().snapshot();
        let after_the_change = (table.status, table.canary.as_ref().map(|c| c.weight));
        stalled
            .begun
            .recv_timeout(DEADLINE)
            .expect("the rollback writes the state");
        stalled.go.send(()).unwrap();
        let (rolled_back, made) = rollback.join().unwrap().expect("the rollback is saved");

        assert!(made, "the rollback says it did not roll back");
        assert!(
            write_stalled && during_the_write == (Status::RolledBack, Some(Weight::ZERO)),
            "the rollback waited for the other change's write: {during_the_write:?}"
        );
        assert_eq!(after_the_change, (Status::RolledBack, Some(Weight::ZERO)));
        assert_eq!(
            (rolled_back.generation, rolled_back.status),
            (3, Status::RolledBack)
        );
        assert_eq!(stalled.control.state(), rolled_back);
    }

    #[test]
    fn the_canary_weight_gauge_reads_0_once_a_rollback_takes_traffic_off() {
        let stalled = stalled();
        let change = stall_a_change(&stalled, 50.0);
        // The rollback's gauges, kept apart from other tests' (the
        // process-wide recorder would mix them).
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let scrape = recorder.handle();
        let rollback = thread::spawn({
            let control = Arc::clone(&stalled.control);
            move || {
                metrics::with_local_recorder(&recorder, || {
                    control.rollback_telling("a test", Source::Api)
                })
            }
        });
        let during_the_write = rolled_back_within_deadline(&stalled.control);
        let gauge = scrape
            .render()
            .lines()
            .find_map(|line| line.strip_prefix("cohort_canary_weight_percent "))
            .map(str::to_owned);
        let write_stalled = !change.is_finished();
        stalled.go.send(()).unwrap();
        change.join().unwrap().expect("the change is saved");
        stalled
            .begun
            .recv_timeout(DEADLINE)
            .expect("the rollback writes the state");
        stalled.go.send(()).unwrap();
        rollback.join().unwrap().expect("the rollback is saved");

        assert!(write_stalled, "the change ahead was written first");
        assert_eq!(during_the_write.0, Status::RolledBack);
        assert_eq!(gauge.as_deref(), Some("0"), "{}", scrape.render());
    }

    #[test]
    fn an_abort_while_a_rollouts_start_is_written_does_not_hold_a_runtime_thread() {
        let stalled = stalled();
        let runtime = one_worker();
        let rollouts = rollouts_of(&stalled);
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        runtime.spawn({
            let (rollouts, started) = (Arc::clone(&rollouts), Arc::clone(&started));
            async move {
                let plan = serde_json::json!({"stages": [{"weight": 20, "duration": "1h"}]});
                let _ = rollouts.start(Some(plan), Actor::Api);
                started.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        });
        stalled
            .begun
            .recv_timeout(DEADLINE)
            .expect("the start saves");
        let (tx, rx) = mpsc::channel();
        runtime.spawn({
            let rollouts = Arc::clone(&rollouts);
            async move {
                let aborted = rollouts.abort(Some("the disk is slow")).await;
                let _ = tx.send(aborted);
            }
        });
        let aborted = rx.recv_timeout(DEADLINE);
        let while_the_start_was_written = !started.load(std::sync::atomic::Ordering::SeqCst);
        stalled.go.send(()).unwrap();
        runtime.shutdown_background();
        assert!(
            while_the_start_was_written,
            "the abort waited for the start's write"
        );
        assert!(
            matches!(aborted, Ok(Err(ControlError::Conflict(_)))),
            "{aborted:?}"
        );
    }

    /// An abort sent while a shutdown's suspension of the rollout is being
    /// written waits in the rollout's inbox, which the suspended task drops:
    /// the rollout is then aborted all the same, not reported ended.
    #[test]
    fn an_abort_sent_while_a_shutdown_saves_the_rollout_rolls_it_back() {
        let stalled = stalled();
        let runtime = two_workers();
        let rollouts = rollouts_of(&stalled);
        let plan = serde_json::json!({"stages": [{"weight": 20, "duration": "1h"}]});
        start_on_a_stalled_disk(&stalled, &rollouts, &runtime, plan);

        // A suspension saves the time spent in the stage: once there is
        // some, it has something to write.
        let deadline = std::time::Instant::now() + DEADLINE;
        while rollouts.state_with_health()["rollout"]["stage_elapsed_ms"] == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the stage's clock stands"
            );
            thread::sleep(Duration::from_millis(5));
        }
        let suspending = runtime.spawn({
            let rollouts = Arc::clone(&rollouts);
            async move { rollouts.suspend().await }
        });
        stalled
            .begun
            .recv_timeout(DEADLINE)
            .expect("the suspension saves");
        let aborting = runtime.spawn({
            let rollouts = Arc::clone(&rollouts);
            async move { rollouts.abort(Some("a bad canary")).await }
        });
        let deadline = std::time::Instant::now() + DEADLINE;
        while rollouts.queued_commands() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the abort is not sent"
            );
            thread::sleep(Duration::from_millis(5));
        }
        // The suspension's write, then the abort's.
        stalled.go.send(()).unwrap();
        runtime.block_on(suspending).unwrap();
        assert_rolled_back_by(&stalled, runtime, aborting);
    }

    /// A shutdown that begins while a rollout's start is being written finds
    /// no task to suspend: the rollout it started is left as saved, which
    /// is suspended, not run through the drain.
    #[test]
    fn a_rollout_whose_start_a_shutdown_overtakes_is_left_suspended() {
        let stalled = stalled();
        let runtime = two_workers();
        let rollouts = rollouts_of(&stalled);
        let start = thread::spawn({
            let rollouts = Arc::clone(&rollouts);
            let runtime = runtime.handle().clone();
            move || {
                let _entered = runtime.enter();
                let plan = serde_json::json!({"stages": [{"weight": 20, "duration": "1h"}]});
                rollouts.start(Some(plan), Actor::Api)
            }
        });
        stalled
            .begun
            .recv_timeout(DEADLINE)
            .expect("the start saves");
        // The shutdown, as `Server::shutdown` makes it.
        rollouts.shutting_down();
        runtime.block_on(rollouts.suspend());
        stalled.go.send(()).unwrap();
        let started = start.join().unwrap().expect("the start is made");
        assert_eq!(started.status, crate::table::Status::Progressing);

        // No task runs it: an abort, as during a drain, makes the rollback.
        assert!(
            !rollouts.runs_a_task(),
            "the rollout runs through the drain"
        );
        let aborting = runtime.spawn({
            let rollouts = Arc::clone(&rollouts);
            async move { rollouts.abort(Some("a bad canary")).await }
        });
        assert_rolled_back_by(&stalled, runtime, aborting);
    }

    /// Lets `aborting`'s write through, and checks that it rolled the
    /// suspended rollout back.
    fn assert_rolled_back_by(
        stalled: &Stalled,
        runtime: tokio::runtime::Runtime,
        aborting: tokio::task::JoinHandle<Result<LiveState, ControlError>>,
    ) {
        stalled
            .begun
            .recv_timeout(DEADLINE)
            .expect("the abort saves");
        stalled.go.send(()).unwrap();
        let aborted = runtime.block_on(aborting).unwrap();
        runtime.shutdown_background();
        let aborted = aborted.expect("the suspended rollout is aborted");
        assert_eq!(aborted.status, crate::table::Status::RolledBack);
    }

    /// Runs `rollback` on its own thread, and waits until it has taken
    /// traffic off the canary and waits for the lock.
    fn a_rollback_under_way<T: Send + 'static>(
        control: &Arc<Control>,
        rollback: impl FnOnce(&Control) -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        let rolling_back = thread::spawn({
            let control = Arc::clone(control);
            move || rollback(&control)
        });
        let deadline = std::time::Instant::now() + DEADLINE;
        while control.installing().rollbacks.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "no rollback under way"
            );
            thread::sleep(Duration::from_millis(5));
        }
        rolling_back
    }

    #[test]
    fn a_rollback_that_finds_the_canary_promoted_cuts_no_stream_of_it() {
        let (stalled, canary) = stalled_closing();
        let closes = canary.close_epoch();
        let promote = thread::spawn({
            let control = Arc::clone(&stalled.control);
            move || control.promote(true, Actor::Api)
        });
        stalled
            .begun
            .recv_timeout(DEADLINE)
            .expect("the promotion writes the state");
        let rollback = a_rollback_under_way(&stalled.control, |control| {
            control.rollback_telling("a test", Source::Api)
        });
        stalled.go.send(()).unwrap();
        let promoted = promote.join().unwrap().expect("the promotion is saved");
        let (after, made) = rollback.join().unwrap().expect("the rollback answers");

        assert_eq!(after, promoted, "nothing was left to roll back");
        assert!(!made, "the rollback says it rolled back");
        let table = stalled.control.table().snapshot();
        assert_eq!(
            (table.stable.name.as_str(), table.status),
            ("v2", Status::Steady)
        );
        assert_eq!(
            table.stable.close_epoch(),
            closes,
            "the promoted version's streams were cut"
        );
    }

    #[test]
    fn a_rollouts_rollback_leaves_a_canary_installed_meanwhile_alone() {
        let stalled = stalled();
        // v2 under its rollout, then v3 installed: both written at once.
        stalled.go.send(()).unwrap();
        stalled.go.send(()).unwrap();
        stalled
            .control
            .rollout_change(Action::RolloutStart, None, Actor::Api, |live| {
                live.status = Status::Progressing;
                live.rollout = Some(serde_json::json!({"canary": "v2", "phase": "progressing"}));
            })
            .unwrap();
        let upstreams = ["127.0.0.1:9003".to_owned()];
        let ten = Weight::from_percent(10.0).unwrap();
        let installed = stalled
            .control
            .install_canary("v3", &upstreams, ten, false)
            .expect("v3 is installed");
        let v3 = Arc::clone(
            &stalled
                .control
                .table()
                .snapshot()
                .canary
                .as_ref()
                .unwrap()
                .version,
        );
        for _ in 0..2 {
            stalled.begun.recv_timeout(DEADLINE).expect("a write");
        }

        // v2's guardrail trips while another change is being written.
        let weight = stall_a_change(&stalled, 20.0);
        let rollback = a_rollback_under_way(&stalled.control, |control| {
            let progress = serde_json::json!({"canary": "v2", "phase": "rolled_back"});
            control.rollback_rollout("v2", "guardrail failed", Source::Guardrail, progress)
        });
        let table = stalled.control.table().snapshot();
        let during_the_write = (table.status, table.weight());
        stalled.go.send(()).unwrap();
        weight.join().unwrap().expect("the weight is saved");
        let refused = rollback.join().unwrap();

        assert!(
            matches!(refused, Err(ControlError::Conflict(_))),
            "{refused:?}"
        );
        assert_eq!(
            during_the_write,
            (installed.status, ten),
            "v2's rollback took v3's users off it"
        );
        let table = stalled.control.table().snapshot();
        let canary = table.canary.as_ref().unwrap();
        assert_eq!(
            (canary.version.name.as_str(), canary.weight, table.status),
            ("v3", Weight::from_percent(20.0).unwrap(), Status::Steady),
            "v3 is served at its weight"
        );
        assert!(
            Arc::ptr_eq(&canary.version.window, &v3.window),
            "v3's window (what its guardrails judge) was started afresh"
        );
    }

    /// As [`stalled`], with `routing.on_rollback = "close"`; and its canary.
    fn stalled_closing() -> (Stalled, Arc<crate::table::Version>) {
        let mut config = crate::config::two_versions(10);
        config.routing.on_rollback = crate::config::OnRollback::Close;
        let stalled = stalled_with(&config);
        let table = stalled.control.table().snapshot();
        let canary = Arc::clone(&table.canary.as_ref().unwrap().version);
        (stalled, canary)
    }

    #[test]
    fn a_rollback_cuts_the_canarys_streams_before_its_write() {
        let (stalled, v2) = stalled_closing();
        let closes = v2.close_epoch();
        let rollback = thread::spawn({
            let control = Arc::clone(&stalled.control);
            move || control.rollback("v2 is bad", Source::Api)
        });
        stalled
            .begun
            .recv_timeout(DEADLINE)
            .expect("the rollback writes the state");
        let cut_during_the_write = v2.close_epoch() > closes;
        stalled.go.send(()).unwrap();
        rollback.join().unwrap().expect("the rollback is saved");
        assert!(
            cut_during_the_write,
            "v2's streams ran on while the rollback was written"
        );
    }

    #[test]
    fn a_rollback_asked_while_a_new_canary_is_written_cuts_the_one_it_took_traffic_off() {
        let (stalled, v2) = stalled_closing();
        let closes = v2.close_epoch();
        let install = thread::spawn({
            let control = Arc::clone(&stalled.control);
            move || {
                let upstreams = ["127.0.0.1:9003".to_owned()];
                control.install_canary("v3", &upstreams, Weight::from_percent(10.0).unwrap(), false)
            }
        });
        stalled
            .begun
            .recv_timeout(DEADLINE)
            .expect("the install writes the state");
        let rollback = a_rollback_under_way(&stalled.control, |control| {
            control.rollback("v2 is bad", Source::Api)
        });
        assert_eq!(stalled.control.table().snapshot().weight(), Weight::ZERO);
        stalled.go.send(()).unwrap();
        install.join().unwrap().expect("v3 is installed");
        stalled
            .begun
            .recv_timeout(DEADLINE)
            .expect("the rollback writes the state");
        stalled.go.send(()).unwrap();
        let rolled_back = rollback.join().unwrap().expect("the rollback is saved");
        // In the order the lock was taken: v3, then its rollback.
        assert_eq!(rolled_back.canary.as_ref().unwrap().name, "v3");
        assert_eq!(rolled_back.status, Status::RolledBack);
        assert!(v2.close_epoch() > closes, "v2's streams ran on");
    }

    #[test]
    fn a_change_made_while_a_rollback_is_under_way_keeps_the_canarys_window() {
        let stalled = stalled();
        let table = stalled.control.table().snapshot();
        let v2 = Arc::clone(&table.canary.as_ref().unwrap().version);
        let (under_way, _) = stalled.control.take_traffic_off_the_canary(None);
        stalled.go.send(()).unwrap();
        stalled
            .control
            .set_weight(Weight::from_percent(50.0).unwrap(), false)
            .expect("the change is saved");
        drop(under_way);
        // Not made after all: the canary has its traffic, and its window.
        let table = stalled.control.table().snapshot();
        let canary = table.canary.as_ref().unwrap();
        assert_eq!(
            (table.status, canary.weight),
            (Status::Steady, Weight::from_percent(50.0).unwrap())
        );
        assert!(
            Arc::ptr_eq(&canary.version.window, &v2.window),
            "a change made while a rollback was under way started v2's window afresh"
        );
    }

    #[test]
    fn a_change_made_while_a_rollback_is_under_way_keeps_the_canary_rolled_back() {
        let stalled = stalled();
        let (under_way, _) = stalled.control.take_traffic_off_the_canary(None);
        // The change's write goes through at once.
        stalled.go.send(()).unwrap();
        let changed = stalled
            .control
            .set_weight(Weight::from_percent(50.0).unwrap(), false)
            .expect("the change is saved");
        assert_eq!(changed.weight().percent(), 50.0);
        let table = stalled.control.table().snapshot();
        assert_eq!(
            (table.status, table.canary.as_ref().map(|c| c.weight)),
            (Status::RolledBack, Some(Weight::ZERO))
        );
        drop(under_way);
    }

    #[test]
    fn the_retry_of_unsaved_state_does_not_hold_a_runtime_thread_while_a_write_stalls() {
        let stalled = stalled();
        let change = stall_a_change(&stalled, 50.0);
        // One worker: were the retry to wait for the state lock on it,
        // nothing else on the runtime (`/health`, `/metrics`) would run.
        let runtime = one_worker();
        runtime.spawn(Arc::clone(&stalled.control).keep_saved(std::future::pending::<()>()));
        // A task that answers every 10 ms, for more than the retry's
        // one-second period, so that a retry falls within it.
        let (tx, rx) = mpsc::channel();
        runtime.spawn(async move {
            while tx.send(()).is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let answered = (0..150).try_for_each(|_| rx.recv_timeout(DEADLINE));
        stalled.go.send(()).unwrap();
        change.join().unwrap().expect("the change is saved");
        runtime.shutdown_background();
        answered.expect("a task on the runtime ran on while the write stalled");
    }

    #[test]
    fn a_rollout_saving_on_a_stalled_disk_does_not_hold_a_runtime_thread() {
        let stalled = stalled();
        let runtime = one_worker();
        let rollouts = rollouts_of(&stalled);
        // Its task then looks, and saves, every 100 ms.
        let plan = serde_json::json!({
            "interval": "100ms",
            "stages": [{"weight": 20, "duration": "1h"}],
        });
        start_on_a_stalled_disk(&stalled, &rollouts, &runtime, plan);

        stalled
            .begun
            .recv_timeout(DEADLINE)
            .expect("the rollout's task saves");
        let (tx, rx) = mpsc::channel();
        runtime.spawn(async move { tx.send(()) });
        let answered = rx.recv_timeout(DEADLINE);
        runtime.shutdown_background();
        answered.expect("a task on the runtime ran while the rollout's save stalled");
    }
}
