//! Progressive rollouts: plans, the controller, judging, webhooks.
//!
//! Owns nothing itself; see each module.

pub mod controller;
pub mod judge;
pub mod plan;
pub mod webhook;
