//! The live route table: one immutable snapshot, swapped whole.
//!
//! Owns: [`RouteTable`] (versions, their upstreams, the canary weight, the
//! salt, the shadow, the routing policy, status and generation) and [`Table`], the
//! `ArcSwap` handle through which requests load it and the control plane
//! replaces it. A request loads the snapshot once and uses it to the end, so
//! it never sees half a change; the next request, on any connection, sees the
//! new one. [`Table`] also remembers, for a while, the versions that left
//! it, so that their last counts reach a scrape. Does not own: deciding a
//! cohort (`routing`), persisting changes (`state`), or who may change it
//! (`admin`).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, Guard};
use http::HeaderValue;
use tokio::sync::watch;

use crate::config::{
    CanaryUnavailable, Config, HealthConfig, MetricsConfig, RoutingConfig, VersionConfig,
};
use crate::health::Health;
use crate::metrics::VersionMetrics;
use crate::rollout::window::Window;
use crate::routing::{Cohort, Weight};
use crate::shadow::{Shadow, ShadowPolicy};
use crate::upstream::UpstreamAddr;

/// Where a release stands, as reported in `GET /admin/state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Steady,
    Progressing,
    Paused,
    RolledBack,
}

impl Status {
    /// The name `GET /admin/state` gives it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Steady => "steady",
            Status::Progressing => "progressing",
            Status::Paused => "paused",
            Status::RolledBack => "rolled_back",
        }
    }
}

/// A named release and its upstreams.
#[derive(Debug)]
pub struct Version {
    pub name: String,
    /// `name` as the version header's value, built once rather than per request.
    pub header_value: HeaderValue,
    pub upstreams: Vec<UpstreamAddr>,
    /// Round-robin cursor; shared by every request of every table this version is in.
    next: AtomicUsize,
    /// Metric handles resolved once for this version, so recording allocates nothing.
    pub metrics: VersionMetrics,
    /// One entry per upstream, in the same order. Shared with the version
    /// this one succeeds (see [`Version::new`]), so what probes and
    /// requests learnt about an upstream survives a change of the list.
    pub health: Box<[Arc<Health>]>,
    /// What the rollout guardrails judge: this version's recent requests.
    pub window: Arc<Window>,
    /// Orders this version's open streams closed; shared with the version
    /// this one succeeds, so a close reaches streams opened before a reload.
    closes: Arc<Closes>,
}

/// How many times a version's open streams and upgraded connections were
/// ordered closed (a rollback with `on_rollback = "close"`). A stream
/// remembers the count it started under and ends when it grows, so streams
/// opened after a close (the version may serve again after a forced
/// weight) are not affected.
#[derive(Debug)]
struct Closes {
    /// For streams waiting on the next close.
    count: watch::Sender<u64>,
    /// The same count, for a check on every body frame that costs one atomic load.
    latest: AtomicU64,
}

/// Whether a version's new upstreams take traffic before a probe passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Open,
    /// Until one passes (the readiness gate of a new canary).
    UntilProbed,
}

/// Whether a version that succeeds another goes on with its rollout window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowFrom {
    Predecessor,
    /// A fresh one: a canary installed again after its rollback is judged
    /// afresh, not on the requests that condemned it.
    Fresh,
}

impl Version {
    /// A version. Under [`Gate::UntilProbed`] its upstreams (a canary's)
    /// take no traffic until they pass a health check. `predecessor` is the
    /// same version (by name) in the table this one replaces, when the
    /// change kept it but altered it (another upstream list, or a promotion
    /// from canary to stable): the health of each upstream it still lists,
    /// its rollout window (as `window` says) and its open streams carry
    /// over, so a reload neither forgets an upstream known bad nor re-gates
    /// a canary already open.
    #[must_use]
    pub fn new(
        config: &VersionConfig,
        cohort: Cohort,
        gate: Gate,
        window_slot: Duration,
        predecessor: Option<&Version>,
        window: WindowFrom,
    ) -> Version {
        let gated = gate == Gate::UntilProbed;
        let carried = |upstream: &UpstreamAddr| {
            let predecessor = predecessor?;
            let i = predecessor.upstreams.iter().position(|u| u == upstream)?;
            let health = &predecessor.health[i];
            // A canary's upstream that no probe has answered yet becomes a
            // stable one as stable upstreams start: taking traffic.
            (gated || !health.is_unprobed()).then(|| Arc::clone(health))
        };
        let health = config
            .upstreams
            .iter()
            .map(|upstream| carried(upstream).unwrap_or_else(|| Arc::new(Health::new(!gated))))
            .collect();
        let window = match predecessor {
            Some(p) if window == WindowFrom::Predecessor && p.window.has_slot_len(window_slot) => {
                Arc::clone(&p.window)
            }
            // A new rollout interval changes the slots: the old ones cannot be read with it.
            Some(p) if window == WindowFrom::Predecessor => Arc::new(p.window.resized(window_slot)),
            _ => Arc::new(Window::new(window_slot)),
        };
        let closes = predecessor.map_or_else(
            || {
                Arc::new(Closes {
                    count: watch::Sender::new(0),
                    latest: AtomicU64::new(0),
                })
            },
            |p| Arc::clone(&p.closes),
        );
        Version {
            health,
            window,
            closes,
            metrics: VersionMetrics::new(&config.name, cohort),
            name: config.name.clone(),
            // Names from the config and the API are checked to be printable;
            // one from a hand-edited state file might not be.
            header_value: HeaderValue::from_str(&config.name).unwrap_or_else(|_| {
                tracing::warn!(version = %config.name.escape_debug(), "version name is not a valid header value");
                HeaderValue::from_static("invalid-version-name")
            }),
            upstreams: config.upstreams.clone(),
            next: AtomicUsize::new(0),
        }
    }

    /// Ends the streams and upgraded connections open on this version now.
    pub fn close_streams(&self) {
        self.closes.latest.fetch_add(1, Ordering::AcqRel);
        self.closes.count.send_modify(|count| *count += 1);
    }

    /// The close count a stream starting now remembers.
    #[must_use]
    pub fn close_epoch(&self) -> u64 {
        self.closes.latest.load(Ordering::Acquire)
    }

    /// Resolves once [`Version::close_streams`] is called after `epoch`.
    pub fn closed_after(
        &self,
        epoch: u64,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut closes = self.closes.count.subscribe();
        async move {
            if closes.wait_for(|count| *count > epoch).await.is_err() {
                // The version is gone, so nothing can close its streams any more.
                std::future::pending::<()>().await;
            }
        }
    }

    /// The next available upstream in round-robin order, with its index;
    /// `None` when none passes its health checks. When every healthy
    /// upstream is ejected for errors, they are tried anyway unless
    /// `strict`: ejection sheds load from a bad upstream, it must not take
    /// the whole version down when there is nowhere else to go. A canary
    /// picks strictly: its cohort goes to stable instead, or gets the 503
    /// that `canary_unavailable = "error"` asks for.
    #[must_use]
    pub fn pick(&self, strict: bool) -> Option<(usize, &UpstreamAddr)> {
        let n = self.upstreams.len();
        let start = if n > 1 {
            self.next.fetch_add(1, Ordering::Relaxed) % n
        } else {
            0
        };
        let order = || (0..n).map(|i| (start + i) % n);
        order()
            .find(|&i| self.health[i].is_available())
            .or_else(|| {
                (!strict)
                    .then(|| order().find(|&i| self.health[i].is_healthy()))
                    .flatten()
            })
            .map(|i| (i, &self.upstreams[i]))
    }

    /// Whether any upstream may take a request now (healthy, not ejected).
    #[must_use]
    pub fn has_available(&self) -> bool {
        self.health.iter().any(|h| h.is_available())
    }

    /// Whether this version still waits at the readiness gate: none of its
    /// upstreams has passed a health probe since it entered the table.
    #[must_use]
    pub fn awaits_first_probe(&self) -> bool {
        self.health.iter().all(|h| h.is_gated())
    }

    /// Where to send a request that could not reach `last`, having started
    /// at `first` and gone on in order from there: the next available
    /// upstream after `last`, short of coming back round to `first`, so
    /// each upstream gets one try.
    #[must_use]
    pub fn pick_other(&self, first: usize, last: usize) -> Option<(usize, &UpstreamAddr)> {
        let n = self.upstreams.len();
        let tried = (last + n - first) % n + 1;
        (tried..n)
            .map(|step| (first + step) % n)
            .find(|&i| self.health[i].is_available())
            .map(|i| (i, &self.upstreams[i]))
    }
}

/// The canary and the share of buckets it serves.
#[derive(Debug, Clone)]
pub struct Canary {
    pub version: Arc<Version>,
    pub weight: Weight,
}

/// What a request needs to know besides the versions: read once per request
/// with the table, so a reload changes it atomically too.
#[derive(Debug, Clone)]
pub struct Policy {
    pub routing: RoutingConfig,
    pub metrics: MetricsConfig,
    /// Time allowed for an upstream's response headers.
    pub response_timeout: Duration,
    /// How long a response body may wait for its upstream's next byte.
    pub stream_idle_timeout: Option<Duration>,
    pub health: HealthConfig,
    /// How shadow copies are made, whichever shadow is installed.
    pub shadow: ShadowPolicy,
    /// One slot of the versions' rollout windows (which hold
    /// [`Window::SLOTS`] of them): the running rollout's interval (see
    /// `control`), else the config's, else 30 s.
    pub window_slot: Duration,
}

impl Policy {
    #[must_use]
    pub fn from_config(config: &Config) -> Policy {
        Policy {
            routing: config.routing.clone(),
            metrics: config.metrics.clone(),
            response_timeout: config.upstream.response_timeout,
            stream_idle_timeout: config.upstream.stream_idle_timeout,
            health: config.health.clone(),
            window_slot: config
                .rollout
                .as_ref()
                .map_or(Duration::from_secs(30), |r| r.interval),
            shadow: ShadowPolicy::from_config(config),
        }
    }
}

/// One immutable snapshot of everything routing depends on.
#[derive(Debug, Clone)]
pub struct RouteTable {
    /// Bumped on every change of the live state, so snapshots can be told apart.
    pub generation: u64,
    pub status: Status,
    pub stable: Arc<Version>,
    pub canary: Option<Canary>,
    /// The bucket salt: `routing.salt`, else the canary's name.
    pub salt: String,
    /// The version that receives copies of a share of requests, if any.
    pub shadow: Option<Shadow>,
    pub policy: Arc<Policy>,
}

impl RouteTable {
    /// Every version in the table: stable, then the canary and the shadow if present.
    pub fn versions(&self) -> impl Iterator<Item = &Arc<Version>> {
        std::iter::once(&self.stable)
            .chain(self.canary.as_ref().map(|c| &c.version))
            .chain(self.shadow.as_ref().map(|s| &s.version))
    }

    /// This table with everyone on stable, as a rollback leaves it: its
    /// canary, if any, kept at weight 0 and latched.
    #[must_use]
    pub fn rolled_back(&self) -> RouteTable {
        let mut table = self.clone();
        if let Some(canary) = &mut table.canary {
            canary.weight = Weight::ZERO;
            table.status = Status::RolledBack;
        }
        table
    }

    /// The table's versions, each with its cohort.
    fn cohorts(&self) -> impl Iterator<Item = (&Version, Cohort)> {
        let canary = self.canary.as_ref().map(|c| (&*c.version, Cohort::Canary));
        let shadow = self.shadow.as_ref().map(|s| (&*s.version, Cohort::Shadow));
        std::iter::once((&*self.stable, Cohort::Stable))
            .chain(canary)
            .chain(shadow)
    }

    /// Whether the table holds `version` in `cohort`.
    #[must_use]
    pub fn holds(&self, version: &str, cohort: Cohort) -> bool {
        let named = |v: &Version| v.name == version;
        match cohort {
            Cohort::Stable => named(&self.stable),
            Cohort::Canary => self.canary.as_ref().is_some_and(|c| named(&c.version)),
            Cohort::Shadow => self.shadow.as_ref().is_some_and(|s| named(&s.version)),
        }
    }

    /// A table for these versions. Versions of `previous` with the same name,
    /// upstreams, cohort and window slot are reused, so their round-robin
    /// cursors, metric handles and open streams carry over (and the shadow's
    /// client). A version kept under another upstream list or window slot,
    /// or a canary promoted to stable, succeeds its old self (see
    /// [`Version::new`]). `new_canary`
    /// says whether the upstreams of a canary that was not in `previous`
    /// (and upstreams new to one that was) wait for a good probe.
    /// A canary installed again after a rollback starts a new window.
    #[must_use]
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        generation: u64,
        status: Status,
        stable: &VersionConfig,
        canary: Option<&(VersionConfig, Weight)>,
        shadow: Option<&(VersionConfig, Weight)>,
        policy: Arc<Policy>,
        previous: Option<&RouteTable>,
        new_canary: Gate,
    ) -> RouteTable {
        let reuse = |config: &VersionConfig, cohort: Cohort| {
            let in_slot = previous.and_then(|p| match cohort {
                Cohort::Canary => p.canary.as_ref().map(|c| &c.version),
                _ => Some(&p.stable),
            });
            // A canary installed again after its rollback (fixed behind the
            // same upstreams, say) is judged afresh, not on the requests
            // that condemned it.
            let reinstalled = cohort == Cohort::Canary
                && previous.is_some_and(|p| p.status == Status::RolledBack)
                && status != Status::RolledBack;
            if let Some(v) = in_slot
                && !reinstalled
                && v.name == config.name
                && v.upstreams == config.upstreams
                && v.window.has_slot_len(policy.window_slot)
            {
                return Arc::clone(v);
            }
            // Kept under another upstream list or another window slot, or a
            // canary promoted to stable.
            let predecessor = in_slot
                .into_iter()
                .chain(previous.and_then(|p| p.canary.as_ref().map(|c| &c.version)))
                .find(|v| v.name == config.name);
            let gate = match cohort {
                Cohort::Canary => new_canary,
                _ => Gate::Open,
            };
            let window = if reinstalled {
                WindowFrom::Fresh
            } else {
                WindowFrom::Predecessor
            };
            Arc::new(Version::new(
                config,
                cohort,
                gate,
                policy.window_slot,
                predecessor.map(AsRef::as_ref),
                window,
            ))
        };
        let salt = policy
            .routing
            .salt
            .clone()
            .or_else(|| canary.map(|(c, _)| c.name.clone()))
            .unwrap_or_default();
        RouteTable {
            generation,
            status,
            stable: reuse(stable, Cohort::Stable),
            canary: canary.map(|(version, weight)| Canary {
                version: reuse(version, Cohort::Canary),
                weight: *weight,
            }),
            salt,
            shadow: shadow.map(|(version, percent)| {
                Shadow::build(
                    version,
                    *percent,
                    &policy,
                    previous.and_then(|p| p.shadow.as_ref()),
                )
            }),
            policy,
        }
    }

    /// The table a config describes, at generation 1.
    #[must_use]
    pub fn from_config(config: &Config) -> RouteTable {
        let shadow = config.shadow.as_ref().map(|s| {
            (
                VersionConfig {
                    name: s.name.clone(),
                    upstreams: s.upstreams.clone(),
                },
                s.percent,
            )
        });
        RouteTable::build(
            1,
            Status::Steady,
            &config.versions.stable,
            config.versions.canary.as_ref(),
            shadow.as_ref(),
            Arc::new(Policy::from_config(config)),
            None,
            Gate::Open,
        )
    }

    /// The version serving `cohort`; stable when there is no canary.
    #[must_use]
    pub fn version(&self, cohort: Cohort) -> &Arc<Version> {
        match (cohort, &self.canary) {
            (Cohort::Canary, Some(canary)) => &canary.version,
            _ => &self.stable,
        }
    }

    #[must_use]
    pub fn weight(&self) -> Weight {
        self.canary.as_ref().map_or(Weight::ZERO, |c| c.weight)
    }

    /// Whether the canary's cohort goes to stable when no canary upstream
    /// is available: with `canary_unavailable = "stable"`, and always while
    /// the canary has yet to pass its first probe (it was never open to
    /// anyone, so that is no outage).
    #[must_use]
    pub fn canary_may_fall_back(&self) -> bool {
        self.canary.as_ref().is_some_and(|canary| {
            self.policy.health.canary_unavailable == CanaryUnavailable::Stable
                || canary.version.awaits_first_probe()
        })
    }
}

/// How long a version's metric series stay in the scrape after it leaves
/// the table (a replaced canary, the stable version before a promotion, a
/// removed shadow): long enough for Prometheus, at any usual scrape
/// interval, to take what the version counted since its last scrape
/// (Prometheus's own lookback is as long); short enough that a scrape does
/// not grow with every release.
pub const DEPARTED_SERIES_KEPT: Duration = Duration::from_secs(5 * 60);

/// The handle requests load the live table through.
#[derive(Debug)]
pub struct Table {
    live: ArcSwap<RouteTable>,
    /// Each version that left a cohort of the table, with when, for
    /// [`DEPARTED_SERIES_KEPT`]; one that comes back is taken off. Its lock
    /// also orders [`Table::store`]s, which are rare.
    departed: Mutex<Vec<Departure>>,
}

#[derive(Debug)]
struct Departure {
    version: String,
    cohort: Cohort,
    at: Instant,
}

impl Table {
    #[must_use]
    pub fn new(table: RouteTable) -> Table {
        Table {
            live: ArcSwap::from_pointee(table),
            departed: Mutex::default(),
        }
    }

    /// The live snapshot; cheap, lock-free, and consistent for as long as it is held.
    #[must_use]
    pub fn load(&self) -> Guard<Arc<RouteTable>> {
        self.live.load()
    }

    /// A full reference to the live snapshot, for holders that keep it
    /// across awaits (a request, a rollout's look): [`Table::load`]'s guard
    /// is for short reads.
    #[must_use]
    pub fn snapshot(&self) -> Arc<RouteTable> {
        self.live.load_full()
    }

    /// Installs `table` as the live snapshot, and notes the versions that
    /// leave a cohort with it.
    pub fn store(&self, table: RouteTable) {
        let next = Arc::new(table);
        let mut departed = self.departed.lock().unwrap_or_else(PoisonError::into_inner);
        let previous = self.live.swap(Arc::clone(&next));
        let now = Instant::now();
        departed.retain(|d| {
            now.duration_since(d.at) < DEPARTED_SERIES_KEPT && !next.holds(&d.version, d.cohort)
        });
        for (version, cohort) in previous.cohorts() {
            if !next.holds(&version.name, cohort) {
                departed.push(Departure {
                    version: version.name.clone(),
                    cohort,
                    at: now,
                });
            }
        }
    }

    /// Whether the live table holds `version` in `cohort`, or did less
    /// than [`DEPARTED_SERIES_KEPT`] ago: whether its series are scraped.
    #[must_use]
    pub fn held_lately(&self, version: &str, cohort: Cohort) -> bool {
        self.held_within(version, cohort, Instant::now())
    }

    fn held_within(&self, version: &str, cohort: Cohort, now: Instant) -> bool {
        self.live.load().holds(version, cohort)
            || self
                .departed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .any(|d| {
                    d.version == version
                        && d.cohort == cohort
                        && now.duration_since(d.at) < DEPARTED_SERIES_KEPT
                })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(name: &str, ports: &[u16]) -> VersionConfig {
        VersionConfig {
            name: name.into(),
            upstreams: ports
                .iter()
                .map(|p| UpstreamAddr::parse(&format!("127.0.0.1:{p}")).unwrap())
                .collect(),
        }
    }

    fn policy() -> Arc<Policy> {
        let config = Config::parse(
            "[versions.stable]\nname = \"v1\"\nupstreams = [\"127.0.0.1:1\"]\n",
            "test",
        )
        .unwrap();
        Arc::new(Policy::from_config(&config))
    }

    fn table(status: Status, canary: &VersionConfig, previous: Option<&RouteTable>) -> RouteTable {
        let weight = Weight::from_percent(10.0).unwrap();
        RouteTable::build(
            1,
            status,
            &version("v1", &[1]),
            Some(&(canary.clone(), weight)),
            None,
            policy(),
            previous,
            Gate::UntilProbed,
        )
    }

    #[test]
    fn a_changed_canary_keeps_its_upstreams_health_and_window_unless_reinstalled() {
        let before = table(Status::Steady, &version("v2", &[2, 3]), None);
        let old = &before.canary.as_ref().unwrap().version;
        let edited = table(Status::Steady, &version("v2", &[2, 4]), Some(&before));
        let new = &edited.canary.as_ref().unwrap().version;
        assert!(Arc::ptr_eq(&old.health[0], &new.health[0]));
        assert!(Arc::ptr_eq(&old.window, &new.window));

        // Installed again after its rollback, with other upstreams or the
        // same: judged afresh, its upstreams' health kept.
        let rolled_back = table(Status::RolledBack, &version("v2", &[2, 4]), Some(&edited));
        for upstreams in [[2, 5], [2, 4]] {
            let again = table(
                Status::Steady,
                &version("v2", &upstreams),
                Some(&rolled_back),
            );
            let again = &again.canary.as_ref().unwrap().version;
            assert!(Arc::ptr_eq(&new.health[0], &again.health[0]));
            assert!(!Arc::ptr_eq(&new.window, &again.window));
            assert_ne!(new.window.lineage(), again.window.lineage());
        }
    }

    #[test]
    fn another_window_slot_gives_unchanged_versions_new_windows_and_keeps_their_health() {
        let before = table(Status::Steady, &version("v2", &[2]), None);
        let resized = Arc::new(Policy {
            window_slot: Duration::from_secs(1),
            ..Policy::clone(&before.policy)
        });
        let after = RouteTable::build(
            2,
            Status::Steady,
            &version("v1", &[1]),
            Some(&(version("v2", &[2]), Weight::from_percent(10.0).unwrap())),
            None,
            resized,
            Some(&before),
            Gate::UntilProbed,
        );
        let (old, new) = (
            &before.canary.as_ref().unwrap().version,
            &after.canary.as_ref().unwrap().version,
        );
        for (old, new) in [(&before.stable, &after.stable), (old, new)] {
            assert!(Arc::ptr_eq(&old.health[0], &new.health[0]));
            assert!(!Arc::ptr_eq(&old.window, &new.window));
            assert_eq!(new.window.slot_len(), Duration::from_secs(1));
            // The same judgement of the version goes on in other slots.
            assert_eq!(old.window.lineage(), new.window.lineage());
        }
    }

    #[test]
    fn a_departed_version_is_held_lately_for_a_while_then_not() {
        let live = Table::new(table(Status::Steady, &version("v2", &[2]), None));
        live.store(table(
            Status::Steady,
            &version("v3", &[3]),
            Some(&live.snapshot()),
        ));
        let now = Instant::now();
        assert!(live.held_within("v2", Cohort::Canary, now));
        assert!(live.held_within("v3", Cohort::Canary, now));
        assert!(live.held_within("v1", Cohort::Stable, now));
        assert!(!live.held_within("v2", Cohort::Stable, now));
        let later = now + DEPARTED_SERIES_KEPT;
        assert!(!live.held_within("v2", Cohort::Canary, later));
        assert!(live.held_within("v3", Cohort::Canary, later));

        // Back in the table, a version is held for as long as it is there.
        live.store(table(
            Status::Steady,
            &version("v2", &[2]),
            Some(&live.snapshot()),
        ));
        assert!(live.held_within("v2", Cohort::Canary, later));
        assert!(live.held_lately("v3", Cohort::Canary));
    }

    #[test]
    fn a_canary_promoted_before_its_first_probe_makes_a_stable_that_takes_traffic() {
        let before = table(Status::Steady, &version("v2", &[2]), None);
        assert!(before.canary.as_ref().unwrap().version.awaits_first_probe());
        let promoted = RouteTable::build(
            2,
            Status::Steady,
            &version("v2", &[2]),
            None,
            None,
            policy(),
            Some(&before),
            Gate::UntilProbed,
        );
        assert!(promoted.stable.has_available());
    }

    #[test]
    fn after_a_failure_each_other_upstream_gets_one_try_in_order() {
        let config = VersionConfig {
            name: "v1".into(),
            upstreams: ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
                .iter()
                .map(|a| UpstreamAddr::parse(a).unwrap())
                .collect(),
        };
        let version = Version::new(
            &config,
            Cohort::Stable,
            Gate::Open,
            Duration::from_secs(1),
            None,
            WindowFrom::Predecessor,
        );
        let next = |first, last| version.pick_other(first, last).map(|(i, _)| i);
        assert_eq!(
            (next(0, 0), next(0, 1), next(0, 2)),
            (Some(1), Some(2), None)
        );
        assert_eq!(
            (next(2, 2), next(2, 0), next(2, 1)),
            (Some(0), Some(1), None)
        );
    }
}
