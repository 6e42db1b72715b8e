//! The sliding window of observations of one cohort.
//!
//! Owns: recording the outcome of every proxied request of a cohort
//! (success, latency, tokens) into a ring of fixed time slots, summing the
//! slots of a window into a [`Sample`] for the guardrails, and the
//! [`Tally`] that keeps adding a window's slots up past the ring's span.
//! Does not own: the clock (time is an argument: a [`Duration`] since an
//! origin the caller keeps), deciding what a success is (the proxy says),
//! or judging a sample (`rollout::stats`).
//!
//! # Shape
//!
//! [`Window::SLOTS`] slots of `slot_len` each, so a window can reach back
//! `SLOTS * slot_len` (60 slots of a 30 s interval: 30 minutes). A slot
//! holds counts, token sums and a latency histogram with
//! [`LATENCY_BINS`] log-linear bins (HdrHistogram-style: 16 linear
//! sub-bins per power of two of microseconds, so a bin is 3.1% to 6.25%
//! wide, from 1 µs to about 71 minutes). Recording is O(1) and allocates
//! nothing: pick the slot from the time, clear it if it still holds an
//! older period, bump a few counters. A running total over all live slots
//! is kept beside the slots, so a snapshot of the whole span is a copy, and
//! a shorter one sums only the slots it covers. A window made again with
//! other slots ([`Window::resized`], for a rollout of another interval)
//! starts empty but keeps its [`Window::lineage`]: it goes on judging the
//! same version, so what was said of it outside the slots still holds.
//!
//! A [`Tally`] reaches further back than the ring: at each look it moves
//! the slots that closed since the last one into a sum of its own, so a
//! stage longer than the span is counted whole as long as it is looked at
//! at least once a span. It costs recording nothing.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Latency histogram bins: 16 exact bins for 0..16 µs, then 16 sub-bins for
/// each power of two from 2^4 to 2^31 µs. Larger values land in the last bin.
pub const LATENCY_BINS: usize = 16 + 28 * 16;

/// The bin of a latency, in microseconds.
#[must_use]
pub fn latency_bin(micros: u64) -> usize {
    if micros < 16 {
        return micros as usize;
    }
    let top = 63 - micros.leading_zeros() as usize; // 4..=63
    if top >= 32 {
        return LATENCY_BINS - 1;
    }
    let sub = ((micros >> (top - 4)) & 15) as usize;
    16 + (top - 4) * 16 + sub
}

/// The lower and upper edge of a bin, in microseconds: the bin holds
/// `lower..upper`.
#[must_use]
pub fn latency_bin_edges(bin: usize) -> (u64, u64) {
    if bin < 16 {
        return (bin as u64, bin as u64 + 1);
    }
    let shift = (bin - 16) / 16;
    let sub = ((bin - 16) % 16) as u64;
    ((16 + sub) << shift, (17 + sub) << shift)
}

/// The outcome of one proxied request, as the guardrails see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    /// Not a 5xx, not an upstream error, and not a response body its
    /// upstream cut.
    pub success: bool,
    /// From the request's arrival to the end of the response head.
    pub latency: Duration,
    /// Tokens the upstream reported for the request, if it reports any.
    pub tokens: Option<u64>,
}

/// Everything a cohort did over one window: what the guardrails judge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub requests: u64,
    pub successes: u64,
    /// Request counts per latency bin (see [`latency_bin_edges`]).
    pub latency: Box<[u64; LATENCY_BINS]>,
    /// Requests that reported tokens, and the sum and the sum of squares of
    /// their tokens (exact, for the variance).
    pub token_requests: u64,
    pub token_sum: u64,
    pub token_sum_sq: u128,
}

impl Default for Sample {
    fn default() -> Self {
        Self {
            requests: 0,
            successes: 0,
            latency: Box::new([0; LATENCY_BINS]),
            token_requests: 0,
            token_sum: 0,
            token_sum_sq: 0,
        }
    }
}

impl Sample {
    /// Adds one observation; for tests and simulations that build samples
    /// without a [`Window`].
    pub fn add(&mut self, observation: Observation) {
        self.requests += 1;
        self.successes += u64::from(observation.success);
        self.latency[latency_bin(micros(observation.latency))] += 1;
        if let Some(tokens) = observation.tokens {
            self.token_requests += 1;
            self.token_sum += tokens;
            self.token_sum_sq += u128::from(tokens) * u128::from(tokens);
        }
    }

    fn merge(&mut self, other: &Sample) {
        self.requests += other.requests;
        self.successes += other.successes;
        for (total, &count) in self.latency.iter_mut().zip(other.latency.iter()) {
            *total += count;
        }
        self.token_requests += other.token_requests;
        self.token_sum += other.token_sum;
        self.token_sum_sq += other.token_sum_sq;
    }

    fn add_slot(&mut self, slot: &Slot) {
        self.requests += u64::from(slot.requests);
        self.successes += u64::from(slot.successes);
        for (total, &count) in self.latency.iter_mut().zip(slot.latency.iter()) {
            *total += u64::from(count);
        }
        self.token_requests += u64::from(slot.token_requests);
        self.token_sum += slot.token_sum;
        self.token_sum_sq += slot.token_sum_sq;
    }

    fn remove_slot(&mut self, slot: &Slot) {
        self.requests -= u64::from(slot.requests);
        self.successes -= u64::from(slot.successes);
        for (total, &count) in self.latency.iter_mut().zip(slot.latency.iter()) {
            *total -= u64::from(count);
        }
        self.token_requests -= u64::from(slot.token_requests);
        self.token_sum -= slot.token_sum;
        self.token_sum_sq -= slot.token_sum_sq;
    }
}

/// One period of `slot_len`. Counts are `u32`: a slot would need four
/// billion requests to overflow.
#[derive(Clone)]
struct Slot {
    /// Which period (`at / slot_len`) the slot holds; `u64::MAX` when empty.
    period: u64,
    requests: u32,
    successes: u32,
    latency: [u32; LATENCY_BINS],
    token_requests: u32,
    token_sum: u64,
    token_sum_sq: u128,
}

impl Slot {
    const EMPTY: Slot = Slot {
        period: u64::MAX,
        requests: 0,
        successes: 0,
        latency: [0; LATENCY_BINS],
        token_requests: 0,
        token_sum: 0,
        token_sum_sq: 0,
    };
}

struct Ring {
    slots: Vec<Slot>,
    /// The sum of every slot that holds a period (the whole span).
    total: Sample,
    /// The newest period recorded or looked at; slots older than
    /// `newest - SLOTS + 1` have been cleared.
    newest: u64,
}

impl Ring {
    /// Clears the slots whose period fell out of the span ending at `period`.
    fn advance(&mut self, period: u64) {
        if period <= self.newest {
            return;
        }
        // Periods newest+1..=period take the slots of periods SLOTS earlier;
        // clearing at most SLOTS of them covers a jump of any length.
        let steps = (period - self.newest).min(Window::SLOTS as u64);
        for p in (period + 1 - steps)..=period {
            let index = (p % Window::SLOTS as u64) as usize;
            if self.slots[index].period != u64::MAX {
                let old = std::mem::replace(&mut self.slots[index], Slot::EMPTY);
                self.total.remove_slot(&old);
            }
        }
        self.newest = period;
    }
}

/// The sliding window of one cohort, shared by every task that proxies for it.
///
/// One short `std::sync::Mutex` guards the ring. Recording holds it for a
/// few counter increments (and, once a slot period, a clear of one slot), far
/// shorter than the request it records, so contention stays negligible at
/// the request rates a proxy core handles; an async mutex would only add a
/// cost (nothing awaits inside). Atomics per counter would avoid the lock
/// but not the hard part: moving a slot to a new period while other tasks
/// increment it, without a reader seeing half of one period and half of
/// the next. A poisoned lock is taken over: the counters stay usable.
pub struct Window {
    slot_len: Duration,
    /// `slot_len` in whole milliseconds, at least 1.
    slot_ms: u64,
    /// Which judgement of its version this window counts for: new with a
    /// new window, kept by one [`Window::resized`] from it.
    lineage: u64,
    ring: Mutex<Ring>,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("slot_len", &self.slot_len)
            .finish_non_exhaustive()
    }
}

impl Window {
    /// Slots in the ring.
    pub const SLOTS: usize = 60;

    /// A window of [`Self::SLOTS`] slots of `slot_len`, in whole
    /// milliseconds, at least one.
    #[must_use]
    pub fn new(slot_len: Duration) -> Self {
        static LINEAGES: AtomicU64 = AtomicU64::new(0);
        Self::with_lineage(slot_len, LINEAGES.fetch_add(1, Ordering::Relaxed))
    }

    /// An empty window of slots of `slot_len` that goes on with this one's
    /// judgement of its version (see [`Window::lineage`]): its slots cannot
    /// be read with the new length, but what was said of the version
    /// outside them (an `eval_score`) still holds.
    #[must_use]
    pub fn resized(&self, slot_len: Duration) -> Self {
        Self::with_lineage(slot_len, self.lineage)
    }

    fn with_lineage(slot_len: Duration, lineage: u64) -> Self {
        let slot_ms = whole_millis(slot_len);
        Self {
            slot_len: Duration::from_millis(slot_ms),
            slot_ms,
            lineage,
            ring: Mutex::new(Ring {
                slots: vec![Slot::EMPTY; Self::SLOTS],
                total: Sample::default(),
                newest: 0,
            }),
        }
    }

    /// The length of one slot, as kept (whole milliseconds).
    #[must_use]
    pub fn slot_len(&self) -> Duration {
        self.slot_len
    }

    /// Which judgement of its version this window counts for: the same
    /// for a window [`Window::resized`] from another, different for any
    /// two made with [`Window::new`].
    #[must_use]
    pub fn lineage(&self) -> u64 {
        self.lineage
    }

    /// Whether this window's slots are the ones [`Window::new`] would make
    /// of `slot_len`.
    #[must_use]
    pub fn has_slot_len(&self, slot_len: Duration) -> bool {
        self.slot_ms == whole_millis(slot_len)
    }

    /// How far back a snapshot can reach.
    #[must_use]
    pub fn span(&self) -> Duration {
        self.slot_len * Self::SLOTS as u32
    }

    fn period(&self, at: Duration) -> u64 {
        millis(at) / self.slot_ms
    }

    /// Records one request that ended at `at` (time since the caller's
    /// origin). Observations older than the span are dropped.
    pub fn record(&self, at: Duration, observation: Observation) {
        let period = self.period(at);
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.advance(period);
        if period + (Self::SLOTS as u64) <= ring.newest {
            return;
        }
        let index = (period % Self::SLOTS as u64) as usize;
        let Ring { slots, total, .. } = &mut *ring;
        let slot = &mut slots[index];
        slot.period = period;
        slot.requests += 1;
        slot.successes += u32::from(observation.success);
        let bin = latency_bin(micros(observation.latency));
        slot.latency[bin] += 1;
        total.requests += 1;
        total.successes += u64::from(observation.success);
        total.latency[bin] += 1;
        if let Some(tokens) = observation.tokens {
            let squared = u128::from(tokens) * u128::from(tokens);
            slot.token_requests += 1;
            slot.token_sum += tokens;
            slot.token_sum_sq += squared;
            total.token_requests += 1;
            total.token_sum += tokens;
            total.token_sum_sq += squared;
        }
    }

    /// What was recorded in the slots that began after `since`, up to
    /// `now` (at most the whole span): the slot `since` fell in is left
    /// out, since part of it may be from before. Empty until a slot has
    /// begun since.
    #[must_use]
    pub fn snapshot_since(&self, now: Duration, since: Duration) -> Sample {
        let slots = self.period(now).saturating_sub(self.period(since));
        if slots == 0 {
            return Sample::default();
        }
        self.snapshot(
            now,
            Duration::from_millis(slots.saturating_mul(self.slot_ms)),
        )
    }

    /// The requests of the last `window_len` before `now`, in whole slots:
    /// the slot holding `now` and the ones before it, as many as
    /// `window_len` covers (rounded up, at least one, at most
    /// [`Self::SLOTS`]). Give both cohorts the same `now` and `window_len`
    /// so that they are compared over the same window.
    #[must_use]
    pub fn snapshot(&self, now: Duration, window_len: Duration) -> Sample {
        let period = self.period(now);
        let wanted = millis(window_len)
            .div_ceil(self.slot_ms)
            .clamp(1, Self::SLOTS as u64);
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.advance(period);
        let in_window = |p: u64| p != u64::MAX && p <= period && p + wanted > period;
        if wanted as usize == Self::SLOTS && period == ring.newest {
            return ring.total.clone();
        }
        let mut sample = Sample::default();
        for slot in ring.slots.iter().filter(|s| in_window(s.period)) {
            sample.add_slot(slot);
        }
        sample
    }

    /// The sum of the slots of `periods` the ring still holds at `now`.
    fn sum_periods(&self, now: Duration, periods: Range<u64>) -> Sample {
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.advance(self.period(now));
        let mut sample = Sample::default();
        for slot in ring.slots.iter().filter(|s| periods.contains(&s.period)) {
            sample.add_slot(slot);
        }
        sample
    }
}

/// Everything one [`Window`] recorded in the slots that began after a point
/// in time, however long ago: the ring forgets a slot once it is a span
/// old, so the tally takes each slot over into a sum of its own once the
/// slot has closed.
///
/// Looked at ([`Tally::sample`]) less often than once a span, it misses the
/// slots that fell out of the ring meanwhile.
pub struct Tally {
    window: Arc<Window>,
    /// The slots taken over: the periods from the first counted up to
    /// `next`.
    closed: Sample,
    /// The first period not yet in `closed`.
    next: u64,
}

impl Tally {
    /// A tally of `window` from the first slot that begins after `since`
    /// (the slot `since` falls in may hold requests from before it), or,
    /// with no `since`, from the oldest slot the ring holds at `now`.
    #[must_use]
    pub fn new(window: &Arc<Window>, since: Option<Duration>, now: Duration) -> Self {
        let next = match since {
            Some(since) => window.period(since) + 1,
            None => window.period(now).saturating_sub(Window::SLOTS as u64 - 1),
        };
        Self {
            window: Arc::clone(window),
            closed: Sample::default(),
            next,
        }
    }

    /// Whether this is a tally of `window`.
    #[must_use]
    pub fn counts(&self, window: &Arc<Window>) -> bool {
        Arc::ptr_eq(&self.window, window)
    }

    /// Everything counted up to `now`: the closed slots taken over so far
    /// and the slot still open.
    pub fn sample(&mut self, now: Duration) -> Sample {
        let current = self.window.period(now);
        if current > self.next {
            let closed = self.window.sum_periods(now, self.next..current);
            self.closed.merge(&closed);
            self.next = current;
        }
        let mut sample = self.window.sum_periods(now, self.next..current + 1);
        sample.merge(&self.closed);
        sample
    }
}

/// A slot length in whole milliseconds, at least one.
fn whole_millis(slot_len: Duration) -> u64 {
    u64::try_from(slot_len.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

// Whole units of a duration in u64 arithmetic (the u128 of `as_millis`
// costs a division call on every record), saturating past 584,000 years.
fn millis(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000)
        .saturating_add(u64::from(d.subsec_millis()))
}

fn micros(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000)
        .saturating_add(u64::from(d.subsec_micros()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(success: bool, ms: u64, tokens: Option<u64>) -> Observation {
        Observation {
            success,
            latency: Duration::from_millis(ms),
            tokens,
        }
    }

    #[test]
    fn bins_are_contiguous_and_hold_their_values() {
        let mut expected_lower = 0;
        for bin in 0..LATENCY_BINS {
            let (lower, upper) = latency_bin_edges(bin);
            assert_eq!(lower, expected_lower, "bin {bin}");
            assert!(upper > lower);
            assert_eq!(latency_bin(lower), bin);
            assert_eq!(latency_bin(upper - 1), bin);
            expected_lower = upper;
        }
        assert_eq!(expected_lower, 1 << 32);
        assert_eq!(latency_bin(u64::MAX), LATENCY_BINS - 1);
        // Relative width at most 1/16 above 16 µs.
        let (lower, upper) = latency_bin_edges(latency_bin(800_000));
        assert!((upper - lower) as f64 / lower as f64 <= 1.0 / 16.0);
    }

    #[test]
    fn snapshot_sums_the_slots_of_the_window_only() {
        let window = Window::new(Duration::from_secs(10));
        let s = Duration::from_secs;
        window.record(s(5), obs(true, 100, Some(10)));
        window.record(s(15), obs(false, 200, Some(20)));
        window.record(s(25), obs(true, 300, None));
        let last_two = window.snapshot(s(29), s(20));
        assert_eq!((last_two.requests, last_two.successes), (2, 1));
        assert_eq!(
            (
                last_two.token_requests,
                last_two.token_sum,
                last_two.token_sum_sq
            ),
            (1, 20, 400)
        );
        let all = window.snapshot(s(29), window.span());
        assert_eq!((all.requests, all.successes, all.token_sum), (3, 2, 30));
        assert_eq!(all.latency.iter().sum::<u64>(), 3);
        assert_eq!(all.latency[latency_bin(200_000)], 1);
        // A part of a slot counts as the whole slot: never an empty window.
        assert_eq!(window.snapshot(s(29), Duration::ZERO).requests, 1);
    }

    #[test]
    fn a_snapshot_since_leaves_out_the_slot_it_began_in() {
        let window = Window::new(Duration::from_secs(10));
        let s = Duration::from_secs;
        window.record(s(11), obs(true, 100, None));
        window.record(s(15), obs(false, 100, None));
        window.record(s(25), obs(true, 100, None));
        // Since 12 s: the slot of 10..20 s may hold requests from before.
        assert_eq!(window.snapshot_since(s(29), s(12)).requests, 1);
        assert_eq!(window.snapshot_since(s(29), s(10)).requests, 1);
        assert_eq!(window.snapshot_since(s(29), s(9)).requests, 3);
        // Nothing until a slot has begun since.
        assert_eq!(window.snapshot_since(s(29), s(21)).requests, 0);
    }

    #[test]
    fn old_slots_fall_out_and_the_total_follows() {
        let window = Window::new(Duration::from_secs(1));
        let s = Duration::from_secs;
        for t in 0..100 {
            window.record(s(t), obs(t % 2 == 0, 50, Some(t)));
        }
        let full = window.snapshot(s(99), window.span());
        assert_eq!(full.requests, 60);
        assert_eq!(full.successes, 30);
        assert_eq!(full.token_sum, (40..100).sum::<u64>());
        // The running total equals a slot-by-slot sum.
        let mut by_slot = Sample::default();
        for t in 40..100 {
            by_slot.add(obs(t % 2 == 0, 50, Some(t)));
        }
        assert_eq!(full, by_slot);
        // Nothing recorded for a long time: everything has expired.
        assert_eq!(window.snapshot(s(1_000), window.span()).requests, 0);
        // An observation older than the span is dropped, not misfiled.
        window.record(s(900), obs(true, 50, None));
        assert_eq!(window.snapshot(s(1_000), window.span()).requests, 0);
    }

    #[test]
    fn a_tally_counts_past_the_span_of_the_ring() {
        let window = Arc::new(Window::new(Duration::from_secs(1)));
        let s = Duration::from_secs;
        window.record(s(3), obs(true, 50, None));
        let mut tally = Tally::new(&window, Some(s(3)), s(3));
        let mut expected = Sample::default();
        for t in 4..300 {
            let observation = obs(t % 3 != 0, t, Some(t));
            window.record(s(t), observation);
            expected.add(observation);
            // Looked at every ten slots: less than a span apart.
            if t % 10 == 0 {
                let sample = tally.sample(s(t));
                assert_eq!(sample.requests, t - 3, "at {t} s");
            }
        }
        assert_eq!(tally.sample(s(299)), expected);
        assert_eq!(window.snapshot(s(299), window.span()).requests, 60);
        // A look in the same slot again counts nothing twice.
        assert_eq!(tally.sample(s(299)), expected);
        // Without a `since`, the tally starts from what the ring holds.
        let mut from_now = Tally::new(&window, None, s(299));
        assert_eq!(from_now.sample(s(299)).requests, 60);
        assert!(from_now.counts(&window));
        assert!(!from_now.counts(&Arc::new(Window::new(Duration::from_secs(1)))));
    }

    #[test]
    fn a_tally_begun_in_the_open_slot_counts_from_the_next() {
        let window = Arc::new(Window::new(Duration::from_secs(10)));
        let s = Duration::from_secs;
        window.record(s(11), obs(true, 1, None));
        let mut tally = Tally::new(&window, Some(s(12)), s(12));
        window.record(s(15), obs(true, 1, None));
        assert_eq!(tally.sample(s(15)).requests, 0);
        window.record(s(25), obs(true, 1, None));
        assert_eq!(tally.sample(s(25)).requests, 1);
    }

    #[test]
    fn records_from_many_threads_all_count() {
        let window = Window::new(Duration::from_secs(1));
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for i in 0..1_000u64 {
                        window.record(Duration::from_millis(i), obs(true, 10, Some(1)));
                    }
                });
            }
        });
        let sample = window.snapshot(Duration::from_millis(999), window.span());
        assert_eq!((sample.requests, sample.token_sum), (4_000, 4_000));
    }
}
