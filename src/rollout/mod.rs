//! Progressive rollouts: plans, the controller, judging, statistics, webhooks.
//!
//! - [`plan`]: plan files (TOML, AgentRelease YAML) into plan documents.
//! - [`controller`]: the stage machine that drives a canary through a plan.
//! - [`window`]: per-version sliding windows, recorded on every request,
//!   and the tallies that count a stage longer than their span.
//! - [`stats`]: the guardrail tests, valid under repeated looks.
//! - [`judge`]: one evaluation of a stage from the live table's windows.
//! - [`webhook`]: rollout events to configured URLs.

pub mod controller;
pub mod judge;
pub mod plan;
pub mod stats;
pub mod webhook;
pub mod window;
