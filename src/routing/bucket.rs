//! The bucket formula and canary weights, exactly as SPEC section 1 fixes them.
//!
//! Owns: `bucket = u64_be(SHA-256(salt ++ ":" ++ key)[0..8]) mod 10000` and the
//! weight in basis points it is compared with. Does not own: where the key or
//! the salt come from. This formula is a compatibility promise: every replica,
//! every release and every offline tool must put a user in the same bucket.

use sha2::{Digest, Sha256};

/// Number of buckets; a weight of 100% covers all of them.
pub const BUCKETS: u16 = 10_000;

/// The bucket of `key` under `salt`, in `0..BUCKETS`.
#[must_use]
pub fn bucket(salt: &[u8], key: &[u8]) -> u16 {
    // Fed in three pieces rather than formatted into one string: no allocation.
    let digest = Sha256::new()
        .chain_update(salt)
        .chain_update(b":")
        .chain_update(key)
        .finalize();
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&digest[..8]);
    // The remainder is below 10 000, so the narrowing cannot truncate.
    (u64::from_be_bytes(prefix) % u64::from(BUCKETS)) as u16
}

/// A canary weight in basis points (0.01% steps), `0..=10000`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Weight(u16);

impl Weight {
    pub const ZERO: Weight = Weight(0);
    pub const FULL: Weight = Weight(BUCKETS);

    /// `weight_bp = round(percent * 100)`, refusing anything outside `0..=100`.
    pub fn from_percent(percent: f64) -> Result<Weight, String> {
        if percent.is_finite() && (0.0..=100.0).contains(&percent) {
            // In range and rounded, so the cast is exact.
            Ok(Weight((percent * 100.0).round() as u16))
        } else {
            // Far out of range, shown in exponent form, not in 300 digits.
            let shown = if percent.abs() < 1e9 {
                percent.to_string()
            } else {
                format!("{percent:e}")
            };
            Err(format!("{shown} is not within 0..=100"))
        }
    }

    #[must_use]
    pub fn from_basis_points(bp: u16) -> Option<Weight> {
        (bp <= BUCKETS).then_some(Weight(bp))
    }

    #[must_use]
    pub fn basis_points(self) -> u16 {
        self.0
    }

    #[must_use]
    pub fn percent(self) -> f64 {
        f64::from(self.0) / 100.0
    }

    /// Whether a user in `bucket` belongs to the canary at this weight.
    #[must_use]
    pub fn covers(self, bucket: u16) -> bool {
        bucket < self.0
    }
}

impl std::fmt::Display for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.percent())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_round_to_basis_points() {
        assert_eq!(Weight::from_percent(10.0).unwrap().basis_points(), 1000);
        assert_eq!(Weight::from_percent(0.015).unwrap().basis_points(), 2);
        assert_eq!(Weight::from_percent(100.0).unwrap(), Weight::FULL);
        assert!(Weight::from_percent(150.0).is_err());
        assert!(Weight::from_percent(-1.0).is_err());
        assert!(Weight::from_percent(f64::NAN).is_err());
        assert!(Weight::from_percent(50.0).unwrap().covers(4727));
        assert!(!Weight::from_percent(50.0).unwrap().covers(9112));
    }

    #[test]
    fn a_weight_out_of_range_is_named_briefly() {
        assert_eq!(
            Weight::from_percent(150.0).unwrap_err(),
            "150 is not within 0..=100"
        );
        assert_eq!(
            Weight::from_percent(1e308).unwrap_err(),
            "1e308 is not within 0..=100"
        );
    }
}
