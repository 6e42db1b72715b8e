//! State that survives a restart: the live route table as data, and where it lives.
//!
//! Owns: [`LiveState`] (the document `GET /admin/state` serves and the state
//! file holds), the digest of the config's `[versions]` section, the rule
//! that decides on start between the state file and the config
//! ([`restore`]), and [`StateStore`], the seam behind which the state is kept
//! (a file today, [`file::FileStore`]; a store shared by replicas later).
//! Does not own: applying the state to traffic (`control`, `table`).

pub mod audit;
pub mod file;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{VersionConfig, VersionsConfig};
use crate::routing::Weight;
use crate::table::Status;
use crate::upstream::UpstreamAddr;

/// The live state, as served by `GET /admin/state` and saved to `state.path`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveState {
    pub generation: u64,
    pub status: Status,
    pub stable: VersionState,
    pub canary: Option<CanaryState>,
    pub last_rollback: Option<Rollback>,
    pub shadow: Option<serde_json::Value>,
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

/// Who asked for a rollback; the `source` label of `cohort_rollbacks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Api,
    Signal,
    Guardrail,
}

impl Source {
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

/// What the state file holds: the live state and the digest of the
/// `[versions]` section it was seeded from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedState {
    pub versions_digest: String,
    #[serde(flatten)]
    pub live: LiveState,
}

impl LiveState {
    /// The state a config's `[versions]` section describes, at `generation`.
    #[must_use]
    pub fn seed(versions: &VersionsConfig, generation: u64) -> LiveState {
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
            shadow: None,
            rollout: None,
        }
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
    let canonical = serde_json::json!({
        "stable": versions.stable,
        "canary": versions.canary.as_ref().map(|(c, w)| serde_json::json!({
            "name": c.name, "upstreams": c.upstreams, "weight_bp": w.basis_points(),
        })),
    });
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

/// Where the durable state is kept. One implementation today (a file); the
/// seam exists so that replicas can share their state through a store such
/// as etcd without touching the data path.
pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// The saved state, or `None` when nothing was saved yet.
    fn load(&self) -> Result<Option<SavedState>, StateError>;

    /// Saves `state` if the stored generation is still `expected` (`None`:
    /// nothing stored yet), durably, before returning.
    fn write(&self, expected: Option<u64>, state: &SavedState) -> Result<(), StateError>;

    /// Changes made by others, for stores shared between replicas; a file
    /// has a single writer, so it returns `None`.
    fn watch(&self) -> Option<tokio::sync::watch::Receiver<SavedState>> {
        None
    }
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
pub fn restore(
    store: &dyn StateStore,
    versions: &VersionsConfig,
    reset: bool,
) -> Result<(SavedState, Origin, Option<SavedState>), StateError> {
    let digest = versions_digest(versions);
    let saved = if reset { None } else { store.load()? };
    let next_generation =
        |saved: &Option<SavedState>| saved.as_ref().map_or(1, |s| s.live.generation + 1);
    let (origin, previous) = match saved {
        Some(saved) if saved.versions_digest == digest => {
            return Ok((saved, Origin::Restored, None));
        }
        Some(saved) => (Origin::Reseeded, Some(saved)),
        None if reset => (Origin::Reset, store.load().ok().flatten()),
        None => (Origin::Seeded, None),
    };
    let seeded = SavedState {
        versions_digest: digest,
        live: LiveState::seed(versions, next_generation(&previous)),
    };
    store.write(previous.as_ref().map(|p| p.live.generation), &seeded)?;
    Ok((seeded, origin, previous))
}

/// Now, as RFC 3339 UTC with seconds.
#[must_use]
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}
