//! Progressive rollout.
//!
//! Owns: the guardrails' measurements and statistics. `window` collects the
//! outcome of every proxied request per cohort; `stats` judges a canary
//! sample against a stable one. Does not own (yet): the controller that
//! walks the stages and acts on the verdicts.

pub mod stats;
pub mod window;
