//! State that survives a restart: the live route table as data, and where it lives.
//!
//! Owns: [`LiveState`] (the document `GET /admin/state` serves and the state
//! file holds), the digests of the config's `[versions]` and `[shadow]`
//! sections and what the file records of its last seed (the config's
//! stable, canary and weight, a plan still due), the rules that decide on
//! start between the state file and the config ([`restore`]) and what an
//! edited `[versions]` keeps ([`SavedState::reseed`]), and [`StateStore`], the seam behind which the state is kept
//! (a file today, [`file::FileStore`]; a store shared by replicas later).
//! Does not own: applying the state to traffic (`control`, `table`).

pub mod audit;
pub mod file;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{ShadowConfig, VersionConfig, VersionsConfig, check_version_name};
use crate::routing::Weight;
use crate::shadow::SHADOW_PROTOCOL;
use crate::table::Status;
use crate::upstream::{Protocol, UpstreamAddr};

/// The highest generation a state file may hold: `i64::MAX`, which no count
/// of changes reaches, so that counting on never wraps around.
pub const MOST_GENERATION: u64 = i64::MAX as u64;

/// The live state, as served by `GET /admin/state` and saved to `state.path`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveState {
    pub generation: u64,
    pub status: Status,
    pub stable: VersionState,
    pub canary: Option<CanaryState>,
    pub last_rollback: Option<Rollback>,
    pub shadow: Option<ShadowState>,
    pub rollout: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionState {
    pub name: String,
    pub upstreams: Vec<UpstreamAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryState {
    pub name: String,
    pub upstreams: Vec<UpstreamAddr>,
    /// Percent, in 0.01 steps.
    pub weight: f64,
}

/// The shadow version (SPEC section 11): who receives mirrored copies, and what share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowState {
    pub name: String,
    pub upstreams: Vec<UpstreamAddr>,
    /// Percent of keys mirrored, in 0.01 steps.
    pub percent: f64,
}

impl ShadowState {
    /// The share of buckets mirrored (0 when the saved value is out of range).
    #[must_use]
    pub fn weight(&self) -> Weight {
        Weight::from_percent(self.percent).unwrap_or(Weight::ZERO)
    }
}

impl From<&ShadowConfig> for ShadowState {
    fn from(s: &ShadowConfig) -> ShadowState {
        ShadowState {
            name: s.name.clone(),
            upstreams: s.upstreams.clone(),
            percent: s.percent.percent(),
        }
    }
}

/// Who asked for a rollback; the `source` label of `cohort_rollbacks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Api,
    Signal,
    Guardrail,
}

impl Source {
    pub const ALL: [Source; 3] = [Source::Api, Source::Signal, Source::Guardrail];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::Signal => "signal",
            Source::Guardrail => "guardrail",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    /// RFC 3339, UTC.
    pub at: String,
    pub reason: String,
    pub source: Source,
}

/// What the state file holds: the live state and the digests of the
/// config sections it was taken from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a JSON object of the state file's fields"
)]
pub struct SavedState {
    /// Of the `[versions]` section the state was seeded from.
    pub versions_digest: String,
    /// Of the `[shadow]` section the live shadow was last taken from (see
    /// [`shadow_digest`]); `None` in a file written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_digest: Option<String>,
    /// The stable version that `[versions]` named when the state was last
    /// seeded from it: a re-seed keeps the live stable (a promotion) unless
    /// the edit renamed it (see [`SavedState::reseed`]). `None` in a file
    /// written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_stable: Option<String>,
    /// The canary that `[versions]` named when the state was last seeded
    /// from it, and its weight: a re-seed keeps the live canary unless the
    /// edit renamed it, and a weight set at run time unless the edit
    /// changed the config's. `None` when the section had no canary (or, with
    /// no `config_stable` either, in a file written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_canary: Option<ConfigCanary>,
    /// The canary (by name) that the config's `[rollout]` plan is to start
    /// for: set by the seed that installed it, cleared by the first change
    /// of the canary or the status (the plan's start is one). A start that
    /// finds it set, because the process stopped between the two writes,
    /// starts the plan then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_due: Option<String>,
    #[serde(flatten)]
    pub live: LiveState,
}

/// What a config's `[versions.canary]` said of the canary's name and weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigCanary {
    pub name: String,
    /// Percent, in 0.01 steps.
    pub weight: f64,
}

impl ConfigCanary {
    fn of(versions: &VersionsConfig) -> Option<ConfigCanary> {
        versions
            .canary
            .as_ref()
            .map(|(canary, weight)| ConfigCanary {
                name: canary.name.clone(),
                weight: weight.percent(),
            })
    }
}

impl SavedState {
    /// The state seeded or re-seeded from `versions`, with the digests and
    /// the records that go beside it. `previous` is the state it replaces,
    /// if any; `plan` says whether the config has a `[rollout]` plan, which
    /// a new canary is to start.
    #[must_use]
    pub fn seeded(
        live: LiveState,
        versions: &VersionsConfig,
        shadow: Option<&ShadowConfig>,
        previous: Option<&SavedState>,
        plan: bool,
    ) -> SavedState {
        // Due for a new canary, and still due for one whose plan had not
        // started when an edit elsewhere in the section re-seeded it.
        let still_due = |name: &String| previous.is_some_and(|p| p.is_rollout_due_for(name));
        let rollout_due = live
            .canary
            .as_ref()
            .filter(|canary| {
                plan && (new_canary(previous.map(|p| &p.live), &live) || still_due(&canary.name))
            })
            .map(|canary| canary.name.clone());
        SavedState {
            versions_digest: versions_digest(versions),
            // A re-seed keeps the live shadow, so the record of the section
            // it was last taken from stays too (`Control::follow_config_shadow`
            // applies an edited one); a seed takes the config's.
            shadow_digest: match previous {
                Some(previous) => previous.shadow_digest.clone(),
                None => Some(shadow_digest(shadow)),
            },
            config_stable: Some(versions.stable.name.clone()),
            config_canary: ConfigCanary::of(versions),
            rollout_due,
            live,
        }
    }

    /// Whether the config's `[rollout]` plan is still to start for the live canary.
    #[must_use]
    pub fn is_rollout_due(&self) -> bool {
        self.live
            .canary
            .as_ref()
            .is_some_and(|canary| self.is_rollout_due_for(&canary.name))
    }

    fn is_rollout_due_for(&self, canary: &str) -> bool {
        self.rollout_due.as_deref() == Some(canary)
            && self.live.canary.as_ref().is_some_and(|c| c.name == canary)
    }

    /// The live state after an edit of `[versions]` that this state was
    /// not seeded from, keeping what the edit did not decide (SPEC
    /// section 4 makes the edited section the newer intent; this says of
    /// what). Which version is stable, and which is the canary, are the
    /// edit's only where it renamed them from what the section named at
    /// the last seed (`config_stable`, `config_canary`): so a promotion, a
    /// canary installed through the API, a rollback and its latch, and a
    /// running rollout all survive an edit elsewhere in the section
    /// (another stable upstream) and move no one between versions. A live
    /// version that the section names takes its upstreams from it.
    ///
    /// A canary kept by name keeps its latch (weight 0 while rolled back),
    /// its rollout and the weight that rollout set, and a weight set at run
    /// time unless the edit changed the config's `weight`: that is where a
    /// *new* canary starts. A version that would be both stable and canary
    /// is stable alone, as after a promotion. The last rollback is kept as
    /// history, and the shadow as it is (its own section decides it:
    /// `Control::follow_config_shadow`) unless it now bears a version's
    /// name, when it stops.
    #[must_use]
    pub fn reseed(
        &self,
        versions: &VersionsConfig,
        shadow: Option<&ShadowConfig>,
        generation: u64,
    ) -> LiveState {
        let live = &self.live;
        let edited = LiveState::seed(versions, shadow, generation);
        let config_canary = ConfigCanary::of(versions);
        // What the section named at the last seed. Older builds recorded
        // the canary only, or neither (then an absent canary says nothing);
        // what a file does not record is taken as not renamed: when in
        // doubt, no one moves.
        let canary_recorded = self.config_stable.is_some() || self.config_canary.is_some();
        let seeded_stable = self
            .config_stable
            .as_deref()
            .unwrap_or(versions.stable.name.as_str());
        let seeded_canary = if canary_recorded {
            self.config_canary.as_ref().map(|c| c.name.as_str())
        } else {
            config_canary.as_ref().map(|c| c.name.as_str())
        };
        if self.config_stable.is_none() {
            tracing::warn!(
                "the state file does not record all that [versions] named (an older build wrote it): \
                 a version it does not record is taken as not renamed, so no one moves; \
                 `cohort serve --reset-state` takes the config whole"
            );
        }
        let upstreams_of = |name: &str| {
            std::iter::once(&edited.stable)
                .map(|v| (&v.name, &v.upstreams))
                .chain(edited.canary.iter().map(|c| (&c.name, &c.upstreams)))
                .find(|(named, _)| *named == name)
                .map(|(_, upstreams)| upstreams.clone())
        };

        let mut next = edited.clone();
        next.last_rollback = live.last_rollback.clone();
        if versions.stable.name == seeded_stable {
            next.stable = live.stable.clone();
            if let Some(upstreams) = upstreams_of(&live.stable.name) {
                next.stable.upstreams = upstreams;
            }
        }
        let canary_renamed = config_canary.as_ref().map(|c| c.name.as_str()) != seeded_canary;
        let kept_canary = if canary_renamed {
            // The edit names the canary; if that is the live one, what
            // happened to it at run time stays.
            live.canary.as_ref().filter(|before| {
                edited
                    .canary
                    .as_ref()
                    .is_some_and(|canary| canary.name == before.name)
            })
        } else {
            live.canary.as_ref()
        };
        if !canary_renamed || kept_canary.is_some() {
            next.canary = kept_canary.cloned();
            next.status = live.status;
            next.rollout = live.rollout.clone();
        }
        if let Some(canary) = &mut next.canary
            && kept_canary.is_some()
        {
            if let Some(upstreams) = upstreams_of(&canary.name) {
                canary.upstreams = upstreams;
            }
            // A weight the edit changed for this canary is the new intent.
            let named = config_canary.as_ref().filter(|c| c.name == canary.name);
            if let Some(named) = named
                && live.status == Status::Steady
                && canary_recorded
                && self.config_canary.as_ref() != Some(named)
            {
                canary.weight = named.weight;
            }
        }
        // The stable is the canary too: a version made stable (by the edit,
        // or by a promotion it kept) has been promoted past its canary
        // stage, so there is no canary, as after a promotion.
        if next
            .canary
            .as_ref()
            .is_some_and(|c| c.name == next.stable.name)
        {
            next.canary = None;
            next.status = Status::Steady;
            next.supersede_rollout();
        }

        // The shadow's own section decides it; one that now bears a
        // version's name stops, rather than bring back one that the API
        // replaced or removed.
        next.shadow = live.shadow.clone().filter(|kept| !next.names(&kept.name));
        if live.shadow.is_some() && next.shadow.is_none() {
            tracing::warn!("the live shadow bears a version's name now; it stops");
        }
        next
    }
}

/// Whether `after` has a canary that `before` did not have (by name).
#[must_use]
pub fn new_canary(before: Option<&LiveState>, after: &LiveState) -> bool {
    let before = before.and_then(|b| b.canary.as_ref()).map(|c| &c.name);
    after
        .canary
        .as_ref()
        .is_some_and(|canary| before != Some(&canary.name))
}

impl LiveState {
    /// Ends a rollout still recorded as running, as one that a change
    /// outside it ended (`superseded`, with no time left in a stage).
    pub fn supersede_rollout(&mut self) {
        if let Some(rollout) = self.rollout.as_mut().and_then(|r| r.as_object_mut())
            && matches!(
                rollout.get("phase").and_then(|p| p.as_str()),
                Some("progressing" | "paused")
            )
        {
            rollout.insert("phase".into(), "superseded".into());
            rollout.insert("time_left_ms".into(), serde_json::Value::Null);
        }
    }

    /// Whether `name` is the stable version's or the canary's.
    #[must_use]
    pub fn names(&self, name: &str) -> bool {
        self.stable.name == name || self.canary.as_ref().is_some_and(|c| c.name == name)
    }

    /// The state a config's `[versions]` and `[shadow]` sections describe, at `generation`.
    #[must_use]
    pub fn seed(
        versions: &VersionsConfig,
        shadow: Option<&ShadowConfig>,
        generation: u64,
    ) -> LiveState {
        LiveState {
            generation,
            status: Status::Steady,
            stable: VersionState::from(&versions.stable),
            canary: versions
                .canary
                .as_ref()
                .map(|(canary, weight)| CanaryState {
                    name: canary.name.clone(),
                    upstreams: canary.upstreams.clone(),
                    weight: weight.percent(),
                }),
            last_rollback: None,
            shadow: shadow.map(ShadowState::from),
            rollout: None,
        }
    }

    /// Checks what the type does not: a state file edited by hand, or
    /// written by something else, must describe a table the proxy can
    /// serve, or the start stops. Names the first field that is wrong.
    pub fn check(&self) -> Result<(), String> {
        let version = |field: &str, name: &str, upstreams: &[UpstreamAddr]| {
            check_version_name(name).map_err(|m| format!("{field}.name: {m}"))?;
            if upstreams.is_empty() {
                return Err(format!(
                    "{field}.upstreams: must name at least one upstream"
                ));
            }
            // As the config and the admin API refuse it: a repeated
            // upstream would take twice its share.
            if let Some((i, upstream)) = upstreams
                .iter()
                .enumerate()
                .find(|(i, u)| upstreams[..*i].contains(u))
            {
                return Err(format!(
                    "{field}.upstreams[{i}]: \"{upstream}\" is listed twice"
                ));
            }
            Ok(())
        };
        // As the admin API rounds it before it saves it: a share off the
        // 0.01 grid would be shown as it is, and served rounded.
        let share = |field: &str, percent: f64| match Weight::from_percent(percent) {
            Err(m) => Err(format!("{field}: {m}")),
            Ok(weight) if weight.percent() != percent => Err(format!(
                "{field}: {percent} is not in 0.01 steps (the nearest is {})",
                weight.percent()
            )),
            Ok(_) => Ok(()),
        };
        // Every change counts it up by one; so far from the top, it never
        // wraps around to look older than the file it replaces.
        if self.generation > MOST_GENERATION {
            return Err(format!(
                "generation: {} is over {MOST_GENERATION}, the most this build counts to",
                self.generation
            ));
        }
        version("stable", &self.stable.name, &self.stable.upstreams)?;
        if let Some(canary) = &self.canary {
            version("canary", &canary.name, &canary.upstreams)?;
            share("canary.weight", canary.weight)?;
            // A rollback sets the weight to 0, and anything that raises it
            // ends the status: a file that has both would serve a canary
            // that says it was rolled back.
            if self.status == Status::RolledBack && canary.weight != 0.0 {
                return Err(format!(
                    "canary.weight: {} with status \"rolled_back\", which has weight 0",
                    canary.weight
                ));
            }
            if canary.name == self.stable.name {
                return Err(format!(
                    "canary.name: {:?} is the stable version's name",
                    canary.name
                ));
            }
        } else if self.status != Status::Steady {
            let status = serde_json::to_value(self.status).unwrap_or_default();
            return Err(format!("status: {status} needs a canary"));
        }
        if let Some(shadow) = &self.shadow {
            version("shadow", &shadow.name, &shadow.upstreams)?;
            share("shadow.percent", shadow.percent)?;
            if let Some(i) = shadow
                .upstreams
                .iter()
                .position(|u| u.protocol != Protocol::Http1)
            {
                return Err(format!("shadow.upstreams[{i}]: {SHADOW_PROTOCOL}"));
            }
            let taken = self.stable.name == shadow.name
                || self.canary.as_ref().is_some_and(|c| c.name == shadow.name);
            if taken {
                return Err(format!(
                    "shadow.name: {:?} is another version's name",
                    shadow.name
                ));
            }
        }
        if let Some(rollback) = &self.last_rollback {
            humantime::parse_rfc3339(&rollback.at).map_err(|error| {
                format!(
                    "last_rollback.at: {:?} is not an RFC 3339 time ({error})",
                    rollback.at
                )
            })?;
        }
        Ok(())
    }

    /// The canary's weight in basis points (0 without a canary).
    #[must_use]
    pub fn weight(&self) -> Weight {
        self.canary
            .as_ref()
            .and_then(|c| Weight::from_percent(c.weight).ok())
            .unwrap_or(Weight::ZERO)
    }
}

impl From<&VersionConfig> for VersionState {
    fn from(v: &VersionConfig) -> VersionState {
        VersionState {
            name: v.name.clone(),
            upstreams: v.upstreams.clone(),
        }
    }
}

impl VersionState {
    #[must_use]
    pub fn config(&self) -> VersionConfig {
        VersionConfig {
            name: self.name.clone(),
            upstreams: self.upstreams.clone(),
        }
    }
}

/// A digest of the `[versions]` section, so a restart can tell whether the
/// operator edited it since the state was seeded.
#[must_use]
pub fn versions_digest(versions: &VersionsConfig) -> String {
    hex_digest(&serde_json::json!({
        "stable": versions.stable,
        "canary": versions.canary.as_ref().map(|(c, w)| serde_json::json!({
            "name": c.name, "upstreams": c.upstreams, "weight_bp": w.basis_points(),
        })),
    }))
}

/// A digest of what the `[shadow]` section puts in the live state (its
/// name, upstreams and share; the rest is policy, applied on every
/// reload), so a reload or restart can tell whether the operator edited it
/// since the live shadow was taken from it.
#[must_use]
pub fn shadow_digest(shadow: Option<&ShadowConfig>) -> String {
    hex_digest(&serde_json::json!(shadow.map(ShadowState::from)))
}

fn hex_digest(canonical: &serde_json::Value) -> String {
    Sha256::digest(canonical.to_string().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Why the state could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the state file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the state file {path} is not valid ({message}); fix or remove it, or start with --reset-state to re-seed it from the config"
    )]
    Corrupt { path: String, message: String },
    #[error("cannot write the state file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("the state changed elsewhere: expected generation {expected}, found {found}")]
    Conflict { expected: u64, found: u64 },
}

/// Where the durable state is kept. One implementation serves (a file);
/// the seam lets tests stand in a disk that stalls or fails, and would let
/// replicas share their state through a store such as etcd without
/// touching the data path.
pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// The saved state, or `None` when nothing was saved yet.
    fn load(&self) -> Result<Option<SavedState>, StateError>;

    /// Saves `state` if the stored generation is still `expected` (`None`:
    /// nothing stored yet), durably, before returning.
    fn write(&self, expected: Option<u64>, state: &SavedState) -> Result<(), StateError>;

    /// Moves a saved state that cannot be read out of the way, kept for the
    /// operator to look at, before a reset replaces it; says where it went.
    fn set_aside(&self) -> Result<String, StateError>;
}

/// How the live state was chosen on start, for the log and the audit line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// No state was saved: seeded from the config.
    Seeded,
    /// The saved state is the live truth.
    Restored,
    /// The config's `[versions]` changed since the state was seeded: re-seeded.
    Reseeded,
    /// `--reset-state`: re-seeded on request.
    Reset,
}

impl Origin {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Seeded => "seed",
            Origin::Restored => "restore",
            Origin::Reseeded => "reseed",
            Origin::Reset => "reset",
        }
    }
}

/// Decides the live state on start: the saved state, unless there is none,
/// the config's `[versions]` changed since it was seeded, or `reset` asks
/// for a fresh seed. A state that cannot be read is an error, never a reset.
/// A seed takes its shadow from the config's `[shadow]`; a restored state
/// keeps the shadow it had (set or removed through the admin API) until
/// that section changes (`Control::follow_config_shadow`).
pub fn restore(
    store: &dyn StateStore,
    versions: &VersionsConfig,
    shadow: Option<&ShadowConfig>,
    plan: bool,
    reset: bool,
) -> Result<(SavedState, Origin, Option<SavedState>), StateError> {
    let digest = versions_digest(versions);
    let mut saved = if reset { None } else { store.load()? };
    if let Some(saved) = &mut saved {
        // Stopped between a change outside a rollout and the rollout's
        // record of its end: it ended then.
        if !matches!(saved.live.status, Status::Progressing | Status::Paused) {
            saved.live.supersede_rollout();
        }
    }
    let next_generation =
        |saved: &Option<SavedState>| saved.as_ref().map_or(1, |s| s.live.generation + 1);
    let (origin, previous) = match saved {
        Some(mut saved) if saved.versions_digest == digest => {
            // A file from an older build learns what the section named at
            // its seed: this very section. Saved with the next change.
            if saved.config_stable.is_none() {
                saved.config_stable = Some(versions.stable.name.clone());
                saved.config_canary = ConfigCanary::of(versions);
            }
            return Ok((saved, Origin::Restored, None));
        }
        Some(saved) => (Origin::Reseeded, Some(saved)),
        None if reset => match store.load() {
            Ok(previous) => (Origin::Reset, previous),
            Err(error) => {
                let kept = store.set_aside()?;
                tracing::warn!(%error, kept, "the unreadable state file was set aside");
                (Origin::Reset, None)
            }
        },
        None => (Origin::Seeded, None),
    };
    let generation = next_generation(&previous);
    let (live, replaced) = match (&previous, origin) {
        (Some(previous), Origin::Reseeded) => (
            previous.reseed(versions, shadow, generation),
            Some(previous),
        ),
        // A reset starts afresh: nothing of the previous state is kept.
        _ => (LiveState::seed(versions, shadow, generation), None),
    };
    // An edit of versions the state has moved past (promoted, or replaced
    // through the API) decides nothing: the state is restored, and the new
    // section saved as the one seen, under the same generation.
    if let Some(previous) = replaced {
        let restored = LiveState {
            generation: previous.live.generation,
            ..live.clone()
        };
        if restored == previous.live {
            tracing::info!(
                "the config's [versions] changed, but only in versions the live state has moved past: nothing re-seeded"
            );
            let seeded = SavedState::seeded(restored, versions, shadow, replaced, plan);
            store.write(Some(previous.live.generation), &seeded)?;
            return Ok((seeded, Origin::Restored, None));
        }
    }
    let seeded = SavedState::seeded(live, versions, shadow, replaced, plan);
    store.write(previous.as_ref().map(|p| p.live.generation), &seeded)?;
    Ok((seeded, origin, previous))
}

/// Now, as RFC 3339 UTC with seconds.
#[must_use]
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::file::FileStore;
    use super::*;
    use crate::config::Config;

    fn versions(canary_weight: u32) -> VersionsConfig {
        crate::config::two_versions(canary_weight).versions
    }

    /// `versions` with one more stable upstream: an edit that leaves the canary alone.
    fn with_another_stable_upstream(mut versions: VersionsConfig) -> VersionsConfig {
        versions
            .stable
            .upstreams
            .push(UpstreamAddr::parse("127.0.0.1:9003").unwrap());
        versions
    }

    /// A store in a fresh directory, removed when the returned guard drops.
    fn store() -> (FileStore, std::path::PathBuf, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        (FileStore::new(path.clone()), path, dir)
    }

    #[test]
    fn seeds_then_restores_then_reseeds_when_versions_change() {
        let (store, _, _dir) = store();
        let (saved, origin, _) = restore(&store, &versions(10), None, false, false).unwrap();
        assert_eq!((origin, saved.live.generation), (Origin::Seeded, 1));

        // A change made at run time survives a restart with the same config.
        let mut changed = saved.clone();
        changed.live.generation = 2;
        changed.live.canary.as_mut().unwrap().weight = 50.0;
        store.write(Some(1), &changed).unwrap();
        let (restored, origin, _) = restore(&store, &versions(10), None, false, false).unwrap();
        assert_eq!(origin, Origin::Restored);
        assert_eq!(restored.live.weight().basis_points(), 5000);

        // An edited [versions] is the newer intent.
        let (reseeded, origin, previous) =
            restore(&store, &versions(20), None, false, false).unwrap();
        assert_eq!(origin, Origin::Reseeded);
        assert_eq!(reseeded.live.weight().basis_points(), 2000);
        assert_eq!(reseeded.live.generation, 3);
        assert_eq!(previous.unwrap().live.generation, 2);

        let (reset, origin, _) = restore(&store, &versions(20), None, false, true).unwrap();
        assert_eq!((origin, reset.live.generation), (Origin::Reset, 4));
    }

    #[test]
    fn a_reseed_keeps_a_run_time_weight_unless_the_configs_weight_changed() {
        let (store, _, _dir) = store();
        let (saved, _, _) = restore(&store, &versions(10), None, false, false).unwrap();
        assert_eq!(saved.config_canary.as_ref().map(|c| c.weight), Some(10.0));
        let mut changed = saved.clone();
        changed.live.generation = 2;
        changed.live.canary.as_mut().unwrap().weight = 1.0;
        store.write(Some(1), &changed).unwrap();

        let edited = with_another_stable_upstream(versions(10));
        let (reseeded, origin, _) = restore(&store, &edited, None, false, false).unwrap();
        assert_eq!(origin, Origin::Reseeded);
        assert_eq!(reseeded.live.weight().basis_points(), 100);
        assert_eq!(
            reseeded.config_canary.as_ref().map(|c| c.weight),
            Some(10.0)
        );

        let (reseeded, _, _) = restore(&store, &versions(20), None, false, false).unwrap();
        assert_eq!(reseeded.live.weight().basis_points(), 2000);

        // A canary installed at run time, then named in the config at the
        // weight the config had for the one before: the config's weight
        // is where it starts, since the config never chose one for it.
        let mut installed = reseeded.clone();
        installed.live.generation += 1;
        let canary = installed.live.canary.as_mut().unwrap();
        (canary.name, canary.weight) = ("v3".into(), 50.0);
        store
            .write(Some(reseeded.live.generation), &installed)
            .unwrap();
        let mut adopted = versions(20);
        adopted.canary.as_mut().unwrap().0.name = "v3".into();
        let (reseeded, _, _) = restore(&store, &adopted, None, false, false).unwrap();
        assert_eq!(reseeded.live.weight().basis_points(), 2000);
    }

    /// Writes `saved` with `change` made to its live state, as a run-time
    /// change would.
    fn change(store: &FileStore, saved: &SavedState, change: impl FnOnce(&mut LiveState)) {
        let mut changed = saved.clone();
        changed.live.generation += 1;
        change(&mut changed.live);
        store.write(Some(saved.live.generation), &changed).unwrap();
    }

    /// What `POST /admin/promote` does to the live state.
    fn promote(live: &mut LiveState) {
        let canary = live.canary.take().unwrap();
        live.stable = VersionState {
            name: canary.name,
            upstreams: canary.upstreams,
        };
    }

    /// Removes `fields` from the state file at `path`, as an older build
    /// that did not write them would have left it.
    fn without_fields(path: &std::path::Path, fields: &[&str]) {
        let mut file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        for field in fields {
            file.as_object_mut().unwrap().remove(*field);
        }
        std::fs::write(path, file.to_string()).unwrap();
    }

    #[test]
    fn a_reseed_by_an_edit_elsewhere_keeps_a_promotion_until_the_stable_is_renamed() {
        let (store, _, _dir) = store();
        let (saved, _, _) = restore(&store, &versions(10), None, false, false).unwrap();
        change(&store, &saved, promote);
        let edited = with_another_stable_upstream(versions(10));
        let (reseeded, origin, _) = restore(&store, &edited, None, false, false).unwrap();
        // Of a version no longer live, the edit decides nothing.
        assert_eq!(origin, Origin::Restored);
        assert_eq!(reseeded.live.stable.name, "v2");
        assert!(reseeded.live.canary.is_none(), "{:?}", reseeded.live);

        // Renaming the stable is the edit's to decide; the canary it did
        // not rename stays as it is live (none).
        let mut renamed = edited.clone();
        renamed.stable.name = "v1b".into();
        let (reseeded, _, _) = restore(&store, &renamed, None, false, false).unwrap();
        assert_eq!(reseeded.live.stable.name, "v1b");
        assert_eq!(reseeded.live.stable.upstreams.len(), 2);
        assert!(reseeded.live.canary.is_none(), "{:?}", reseeded.live);

        // Renaming the canary too installs the config's.
        let mut both = renamed.clone();
        both.canary.as_mut().unwrap().0.name = "v3".into();
        let (reseeded, _, _) = restore(&store, &both, None, false, false).unwrap();
        let canary = reseeded.live.canary.as_ref().unwrap();
        assert_eq!((canary.name.as_str(), canary.weight), ("v3", 10.0));
    }

    #[test]
    fn a_reseed_by_an_edit_elsewhere_brings_no_rolled_back_canary_back() {
        let (store, _, _dir) = store();
        let (saved, _, _) = restore(&store, &versions(10), None, false, false).unwrap();
        let rollback = Rollback {
            at: "2026-01-01T00:00:00Z".into(),
            reason: "v2 is bad".into(),
            source: Source::Api,
        };
        change(&store, &saved, |live| {
            live.status = Status::RolledBack;
            live.canary.as_mut().unwrap().weight = 0.0;
            live.last_rollback = Some(rollback.clone());
        });
        let edited = with_another_stable_upstream(versions(10));
        let (reseeded, _, _) = restore(&store, &edited, None, false, false).unwrap();
        assert_eq!(reseeded.live.status, Status::RolledBack);
        assert_eq!(reseeded.live.weight().basis_points(), 0);

        // A canary installed through the API after the rollback stays too.
        change(&store, &reseeded, |live| {
            live.status = Status::Steady;
            live.canary = Some(CanaryState {
                name: "v3".into(),
                upstreams: vec![UpstreamAddr::parse("127.0.0.1:9009").unwrap()],
                weight: 5.0,
            });
        });
        let mut edited_again = edited.clone();
        edited_again
            .stable
            .upstreams
            .push(UpstreamAddr::parse("127.0.0.1:9004").unwrap());
        let (reseeded, _, _) = restore(&store, &edited_again, None, false, false).unwrap();
        let canary = reseeded.live.canary.as_ref().unwrap();
        assert_eq!((canary.name.as_str(), canary.weight), ("v3", 5.0));
        assert_eq!(reseeded.live.status, Status::Steady);
        assert_eq!(reseeded.live.last_rollback, Some(rollback));
        assert_eq!(reseeded.live.stable.upstreams.len(), 3);
    }

    #[test]
    fn a_stable_that_is_also_the_canary_leaves_no_canary_as_a_promotion_would() {
        // The live canary v3 (installed at run time) made stable by the
        // edit: the config's canary, rolled back, stays out.
        let (store, _, _dir) = store();
        let (saved, _, _) = restore(&store, &versions(10), None, false, false).unwrap();
        change(&store, &saved, |live| {
            live.canary = Some(CanaryState {
                name: "v3".into(),
                upstreams: vec![UpstreamAddr::parse("127.0.0.1:9009").unwrap()],
                weight: 5.0,
            });
        });
        let mut edited = versions(10);
        edited.stable.name = "v3".into();
        let (reseeded, _, _) = restore(&store, &edited, None, false, false).unwrap();
        assert_eq!(reseeded.live.stable.name, "v3");
        assert!(reseeded.live.canary.is_none(), "{:?}", reseeded.live);
        assert_eq!(reseeded.live.status, Status::Steady);
    }

    #[test]
    fn a_promotion_stands_when_the_edit_names_the_promoted_version_as_canary() {
        let (store, _, _dir) = store();
        let (saved, _, _) = restore(&store, &versions(10), None, false, false).unwrap();
        change(&store, &saved, |live| {
            live.canary = None;
            live.stable.name = "v3".into();
        });
        let mut edited = versions(10);
        edited.canary.as_mut().unwrap().0.name = "v3".into();
        let (reseeded, _, _) = restore(&store, &edited, None, false, false).unwrap();
        assert_eq!(reseeded.live.stable.name, "v3");
        assert!(reseeded.live.canary.is_none(), "{:?}", reseeded.live);
    }

    #[test]
    fn a_file_from_an_older_build_moves_no_one_on_an_edit_and_learns_the_names_on_a_restore() {
        let (store, path, _dir) = store();
        let (saved, _, _) = restore(&store, &versions(10), None, false, false).unwrap();
        change(&store, &saved, promote);
        without_fields(&path, &["config_stable", "config_canary"]);
        // Restored with the section it was seeded from: the names are learnt.
        let (restored, origin, _) = restore(&store, &versions(10), None, false, false).unwrap();
        assert_eq!(origin, Origin::Restored);
        assert_eq!(restored.config_stable.as_deref(), Some("v1"));
        assert_eq!(
            restored.config_canary.as_ref().map(|c| c.name.as_str()),
            Some("v2")
        );
        // Edited before it could learn them: the promotion stays all the
        // same, and the edit, of a version no longer live, decides nothing.
        let edited = with_another_stable_upstream(versions(10));
        let (reseeded, origin, _) = restore(&store, &edited, None, false, false).unwrap();
        assert_eq!(origin, Origin::Restored);
        assert_eq!(reseeded.live.stable.name, "v2");
        assert!(reseeded.live.canary.is_none());
    }

    #[test]
    fn a_file_that_records_the_canary_but_not_the_stable_still_sees_the_canary_renamed() {
        let (store, path, _dir) = store();
        restore(&store, &versions(10), None, false, false).unwrap();
        without_fields(&path, &["config_stable"]);

        // The weight edited: taken, as the canary is the config's.
        let (reseeded, _, _) = restore(&store, &versions(20), None, false, false).unwrap();
        assert_eq!(reseeded.live.weight().basis_points(), 2000);
        // The canary renamed: the new one is installed.
        let mut renamed = versions(20);
        renamed.canary.as_mut().unwrap().0.name = "v3".into();
        let (reseeded, _, _) = restore(&store, &renamed, None, false, false).unwrap();
        assert_eq!(reseeded.live.canary.as_ref().unwrap().name, "v3");
    }

    #[test]
    fn a_rollout_recorded_as_running_beside_a_status_that_says_none_runs_has_ended() {
        let (store, _, _dir) = store();
        let (saved, _, _) = restore(&store, &versions(10), None, false, false).unwrap();
        change(&store, &saved, |live| {
            live.status = Status::RolledBack;
            live.canary.as_mut().unwrap().weight = 0.0;
            live.rollout = Some(serde_json::json!({"phase": "progressing", "time_left_ms": 5}));
        });
        let (restored, _, _) = restore(&store, &versions(10), None, false, false).unwrap();
        let rollout = restored.live.rollout.unwrap();
        assert_eq!(rollout["phase"], "superseded");
        assert_eq!(rollout["time_left_ms"], serde_json::Value::Null);
    }

    #[test]
    fn a_reseed_keeps_a_shadow_removed_at_run_time_removed() {
        let text = "[versions.stable]\nname = \"v1\"\nupstreams = [\"127.0.0.1:9001\"]\n\
                    [shadow]\nname = \"v9\"\nupstreams = [\"127.0.0.1:9009\"]\npercent = 100\n";
        let config = Config::parse(text, "test").unwrap();
        let shadow = config.shadow.as_ref();
        let (store, _, _dir) = store();
        let (saved, _, _) = restore(&store, &config.versions, shadow, false, false).unwrap();
        assert!(saved.live.shadow.is_some());
        change(&store, &saved, |live| live.shadow = None);
        let edited = with_another_stable_upstream(config.versions.clone());
        let (reseeded, origin, _) = restore(&store, &edited, shadow, false, false).unwrap();
        assert_eq!(origin, Origin::Reseeded);
        assert!(reseeded.live.shadow.is_none(), "{:?}", reseeded.live.shadow);
        assert_eq!(reseeded.shadow_digest, saved.shadow_digest);

        // A shadow set through the API, whose name the edit gives to a new
        // canary, stops; the config's, removed before, does not come back.
        change(&store, &reseeded, |live| {
            live.shadow = Some(ShadowState {
                name: "v4".into(),
                upstreams: vec![UpstreamAddr::parse("127.0.0.1:9004").unwrap()],
                percent: 5.0,
            });
        });
        let mut renamed = edited.clone();
        renamed.canary = versions(10).canary;
        renamed.canary.as_mut().unwrap().0.name = "v4".into();
        // `[shadow]` edited in the same change (v9 to v8).
        let edited_shadow = Config::parse(&text.replace("v9", "v8"), "test")
            .unwrap()
            .shadow;
        let (reseeded, _, _) =
            restore(&store, &renamed, edited_shadow.as_ref(), false, false).unwrap();
        assert_eq!(reseeded.live.canary.as_ref().unwrap().name, "v4");
        assert!(reseeded.live.shadow.is_none(), "{:?}", reseeded.live.shadow);
        // The record of the `[shadow]` last applied stays, so the edit of
        // that section is still applied after this one.
        assert_eq!(reseeded.shadow_digest, saved.shadow_digest);
        assert_ne!(
            reseeded.shadow_digest,
            Some(shadow_digest(edited_shadow.as_ref()))
        );
    }

    #[test]
    fn a_seeded_canary_is_due_its_plan_until_it_first_changes() {
        let (store, _, _dir) = store();
        let (saved, _, _) = restore(&store, &versions(10), None, true, false).unwrap();
        assert!(saved.is_rollout_due());
        // Restored as saved: still due.
        let (restored, origin, _) = restore(&store, &versions(10), None, true, false).unwrap();
        assert_eq!(origin, Origin::Restored);
        assert!(restored.is_rollout_due());
        // An edit elsewhere in the section re-seeds the same canary: still due.
        let edited = with_another_stable_upstream(versions(10));
        let (reseeded, origin, _) = restore(&store, &edited, None, true, false).unwrap();
        assert_eq!(origin, Origin::Reseeded);
        assert!(reseeded.is_rollout_due());
        // No plan in the config: nothing is due.
        let (reset, _, _) = restore(&store, &versions(10), None, false, true).unwrap();
        assert!(!reset.is_rollout_due());
    }

    #[test]
    fn a_corrupt_state_file_stops_the_start() {
        let (store, path, _dir) = store();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"{\"generation\": 3, \"stat").unwrap();
        let error = restore(&store, &versions(10), None, false, false).unwrap_err();
        assert!(matches!(error, StateError::Corrupt { .. }), "{error}");
        assert!(error.to_string().contains("--reset-state"), "{error}");
        // The file is left as it was for the operator to inspect.
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"generation\": 3, \"stat");
        // --reset-state replaces it.
        let (saved, origin, _) = restore(&store, &versions(10), None, false, true).unwrap();
        assert_eq!((origin, saved.live.generation), (Origin::Reset, 1));
    }

    #[test]
    fn writes_check_the_generation_and_leave_no_temp_files() {
        let (store, path, _dir) = store();
        let (saved, _, _) = restore(&store, &versions(10), None, false, false).unwrap();
        let error = store.write(Some(7), &saved).unwrap_err();
        assert!(matches!(
            error,
            StateError::Conflict {
                expected: 7,
                found: 1
            }
        ));
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
    }
    #[test]
    fn a_state_file_that_describes_no_servable_table_is_refused_by_field() {
        let (store, path, _dir) = store();
        let (saved, _, _) = restore(&store, &versions(10), None, false, false).unwrap();
        let text = serde_json::to_value(&saved).unwrap();
        let upstream = text["stable"]["upstreams"][0].clone();
        let edits: [(&str, serde_json::Value, &str); 13] = [
            (
                "/stable/upstreams",
                serde_json::json!([upstream, upstream]),
                "stable.upstreams[1]",
            ),
            (
                "/shadow",
                serde_json::json!({"name": "sx", "upstreams": ["h2c://127.0.0.1:1"], "percent": 5.0}),
                "shadow.upstreams[0]",
            ),
            (
                "/last_rollback",
                serde_json::json!({"at": "yesterday", "reason": "r", "source": "api"}),
                "last_rollback.at",
            ),
            ("/canary/weight", 500.into(), "canary.weight"),
            ("/canary/weight", 0.004.into(), "canary.weight"),
            ("/generation", "9".into(), "generation"),
            ("/generation", u64::MAX.into(), "generation"),
            ("/status", "sometimes".into(), "status"),
            ("/status", "rolled_back".into(), "canary.weight"),
            (
                "/stable/upstreams",
                serde_json::json!([]),
                "stable.upstreams",
            ),
            ("/canary/name", "v1".into(), "canary.name"),
            ("/stable/name", "has space".into(), "stable.name"),
            ("/canary", serde_json::Value::Null, "status"),
        ];
        for (pointer, value, field) in edits {
            let mut edited = text.clone();
            if pointer == "/canary" {
                edited["status"] = "rolled_back".into();
            }
            *edited.pointer_mut(pointer).unwrap() = value;
            std::fs::write(&path, edited.to_string()).unwrap();
            let error = store.load().unwrap_err().to_string();
            assert!(error.contains(&format!("{field}:")), "{pointer}: {error}");
            assert!(error.contains("--reset-state"), "{error}");
        }
    }

    /// A newer build's field is named, not drowned in a list of the live
    /// state's fields alone.
    #[test]
    fn a_state_file_with_a_field_this_build_does_not_know_is_refused_by_it() {
        let (store, path, _dir) = store();
        let (saved, _, _) = restore(&store, &versions(10), None, false, false).unwrap();
        let mut text = serde_json::to_value(&saved).unwrap();
        text["from_the_future"] = 1.into();
        std::fs::write(&path, text.to_string()).unwrap();
        let error = store.load().unwrap_err().to_string();
        assert!(
            error.contains("`from_the_future` is not a field this build of Cohort writes"),
            "{error}"
        );
    }

    #[test]
    fn a_start_removes_the_temp_files_a_crash_left_and_no_others() {
        let (store, path, _dir) = store();
        restore(&store, &versions(10), None, false, false).unwrap();
        let dir = path.parent().unwrap();
        let old = dir.join("state.json.tmp.4242");
        let fresh = dir.join("state.json.tmp.4343");
        let other = dir.join("notes.tmp.4242");
        for file in [&old, &fresh, &other] {
            std::fs::write(file, b"{").unwrap();
        }
        let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for file in [&old, &other] {
            std::fs::File::options()
                .write(true)
                .open(file)
                .unwrap()
                .set_modified(long_ago)
                .unwrap();
        }
        store.load().unwrap();
        assert!(!old.exists(), "a crash's leftover stays");
        assert!(
            fresh.exists(),
            "a write that may be in progress was removed"
        );
        assert!(other.exists(), "a file that is not the state's was removed");
    }
}
