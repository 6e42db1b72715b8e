//! A process-wide monotonic clock, as time since its first use.
//!
//! Owns: one origin that health ejection and the rollout windows share, so
//! their timestamps fit in atomics and compare across threads. Does not own
//! time inside requests (they use `tokio::time::Instant`, which tests can pause).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Time since the first call in this process.
#[must_use]
pub fn since_start() -> Duration {
    origin().elapsed()
}

/// `at` as time since the first call (zero if earlier), for a caller that
/// has just read the clock for its own use: a clock read costs more than
/// this subtraction.
#[must_use]
pub fn since_start_at(at: Instant) -> Duration {
    at.saturating_duration_since(origin())
}
