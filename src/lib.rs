//! Cohort: a sticky-routing canary reverse proxy.
//!
//! Cohort stands in front of the containers of an HTTP service where nginx
//! would, pins every user to the stable or the canary version by a hash of
//! their sticky key, tags every response with the version that served it,
//! and lets an operator move the canary's share or roll it back without
//! dropping a connection.
//!
//! # Layout
//!
//! - [`config`]: TOML -> validated [`config::Config`]; every problem named by its key.
//! - [`files`]: what a file an operator names may be (regular, at most 16 MiB), read.
//! - [`routing`]: the bucket formula, sticky keys, and the pure routing decision.
//! - [`table`]: the live route table, one immutable snapshot behind `ArcSwap`.
//! - [`upstream`]: upstream addresses and the pooled clients (HTTP/1.1, h2c, https).
//! - [`tls`]: the listener's certificate (reloadable) and the roots for `https://` upstreams.
//! - [`health`]: active health checks, passive ejection, the readiness gate.
//! - [`proxy`]: the data path: accept, route, forward, tag, record.
//! - [`control`]: every change of the live state: weight, rollback, promote, canary, reload.
//! - [`rollout`]: progressive rollouts: plans, the stage controller, per-version windows,
//!   guardrail statistics, webhooks.
//! - [`state`]: the state file, the audit log, and the start-up restore rule.
//! - [`metrics`]: metric names, help texts and per-version handles.
//! - [`admin`]: the admin listener: health, readiness, metrics, the admin API.
//! - [`shadow`]: shadow traffic: mirrored copies, dropped and counted, never in the way.
//! - [`serve`]: the composition root that builds and runs all of the above.
//! - [`signals`]: OS signals as typed events.
//! - [`demo`]: built-in demo upstreams for `cohort demo`.
//! - [`ctl`]: `cohort ctl`, the admin API from the command line.
//! - [`clock`]: the process-wide monotonic clock shared by health and rollout windows.
//! - [`coalesce`]: small vectored writes sent as one plain write (client and plain TCP upstream sockets).
//! - [`logging`]: the process log, written off the request path.
//! - [`cli`]: the command line.

#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod clock;
pub mod coalesce;
pub mod config;
pub mod control;
pub mod ctl;
pub mod demo;
pub mod files;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod rollout;
pub mod routing;
pub mod serve;
pub mod shadow;
pub mod signals;
pub mod state;
pub mod table;
pub mod tls;
pub mod upstream;

/// The error of a body or a connection whose cause may come from any of
/// several layers (hyper, rustls, the socket, Cohort's own timeouts). Boxed,
/// as hyper's and tower's are, because no caller branches on its type: they
/// log it, or look for a known cause down its `source()` chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
