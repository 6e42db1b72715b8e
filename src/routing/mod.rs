//! Sticky routing decision.
//!
//! Owns: turning a sticky key and the live [`RouteTable`] into a
//! [`Decision`] (cohort, bucket, and why). Pure: no I/O, no clock. The proxy,
//! `cohort route`, `GET /admin/route` and the tests all call [`place`], so
//! they cannot disagree. Does not own: reading the key off the request
//! ([`key`]), the bucket formula ([`mod@bucket`]), the table's lifecycle
//! (`table`), or forwarding.

pub mod bucket;
pub mod key;

pub use bucket::{BUCKETS, Weight, bucket};
pub use key::KeySource;

use crate::table::{RouteTable, Status};

/// Which side of a release a request belongs to; also the `cohort` metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cohort {
    Stable,
    Canary,
    Shadow,
}

impl Cohort {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Cohort::Stable => "stable",
            Cohort::Canary => "canary",
            Cohort::Shadow => "shadow",
        }
    }

    /// The cohort a `cohort` label names.
    #[must_use]
    pub fn from_label(label: &str) -> Option<Cohort> {
        [Cohort::Stable, Cohort::Canary, Cohort::Shadow]
            .into_iter()
            .find(|c| c.as_str() == label)
    }
}

/// Where one key lands under one salt and weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub bucket: u16,
    pub cohort: Cohort,
}

/// The one routing function: the key's bucket and its cohort at `weight`.
#[must_use]
pub fn place(salt: &[u8], weight: Weight, key: &[u8]) -> Placement {
    let bucket = bucket(salt, key);
    let cohort = if weight.covers(bucket) {
        Cohort::Canary
    } else {
        Cohort::Stable
    };
    Placement { bucket, cohort }
}

/// Why a request went where it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Placed by its sticky key's bucket.
    Key,
    /// Forced by the override header.
    Override,
    /// No key, or no canary to place it against: stable.
    Default,
}

impl Reason {
    /// The name the access log gives it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Key => "key",
            Reason::Override => "override",
            Reason::Default => "default",
        }
    }
}

/// The routing decision for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Decision {
    pub cohort: Cohort,
    /// The key's bucket, when a key was hashed.
    pub bucket: Option<u16>,
    pub reason: Reason,
}

/// Decides the cohort of a request with sticky `key` (if any) under `table`;
/// `forced` is the override header's cohort, obeyed unless it asks for a
/// rolled-back canary.
pub fn decide(table: &RouteTable, key: Option<&[u8]>, forced: Option<Cohort>) -> Decision {
    let Some(canary) = &table.canary else {
        return Decision {
            cohort: Cohort::Stable,
            bucket: None,
            reason: Reason::Default,
        };
    };
    // A rollback flips everyone back to stable, insiders with the override
    // included: a rolled-back canary is there only to be replaced.
    let forced = forced.filter(|&c| c != Cohort::Canary || table.status != Status::RolledBack);
    if let Some(cohort) = forced {
        return Decision {
            cohort,
            bucket: None,
            reason: Reason::Override,
        };
    }
    match key {
        Some(key) => {
            let placement = place(table.salt.as_bytes(), canary.weight, key);
            Decision {
                cohort: placement.cohort,
                bucket: Some(placement.bucket),
                reason: Reason::Key,
            }
        }
        None => Decision {
            cohort: Cohort::Stable,
            bucket: None,
            reason: Reason::Default,
        },
    }
}
