//! Experiments: A/B tests whose variants change how decisions are made, and the
//! statistics that say which variant wins.
//!
//! Map:
//! - [`definition`]: `Experiment`, `Variant`, `Overrides` (policy, model version, rule
//!   set, pinned item), `Status` and the validation of a caller's `ExperimentInput`;
//! - [`assignment`]: the documented, stable hash of (salt, customer id) into 10,000
//!   buckets, traffic, weights, layers (mutually exclusive experiments), the global
//!   holdout;
//! - [`stats`]: per-variant rates and value means, lift with 95% intervals, the
//!   two-proportion z-test, Welch's t-test, the always-valid (sequential) interval and
//!   the sample-ratio-mismatch check;
//! - [`service`]: `ExperimentService`: create, change status, list, assign on the
//!   decision path, count exposures and conversions, compute results.
//!
//! Pure logic: definitions live in the `DefinitionStore` (`DefinitionKind::Experiment`),
//! counters in the `ExperimentStore`; nothing here knows a concrete backend.

pub mod assignment;
pub mod definition;
pub mod service;
pub mod stats;

use crate::storage::{StorageError, StorageResult};
use serde::{Deserialize, Serialize};

pub use definition::{Experiment, ExperimentInput, Overrides, RuleOverride, Status, Variant};
pub use service::{Applied, ExperimentResults, ExperimentService, VariantResult};

/// Additive sufficient statistics of one variant: everything the statistics need, and
/// merged across replicas by addition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct VariantTotals {
    /// Decisions made under the variant.
    pub exposures: u64,
    /// Decisions of the variant with a positive outcome (each counted once).
    pub conversions: u64,
    /// Sum of the converting outcomes' values.
    pub value_sum: f64,
    /// Sum of their squares (for the value's variance).
    pub value_sum_sq: f64,
}

impl VariantTotals {
    pub fn exposure() -> Self {
        VariantTotals {
            exposures: 1,
            ..Default::default()
        }
    }

    pub fn conversion(value: f64) -> Self {
        VariantTotals {
            exposures: 0,
            conversions: 1,
            value_sum: value,
            value_sum_sq: value * value,
        }
    }

    pub fn merge(&mut self, other: VariantTotals) {
        self.exposures += other.exposures;
        self.conversions += other.conversions;
        self.value_sum += other.value_sum;
        self.value_sum_sq += other.value_sum_sq;
    }

    pub fn is_finite(&self) -> bool {
        self.value_sum.is_finite() && self.value_sum_sq.is_finite()
    }

    /// What every experiment store refuses before writing: a batch with a non-finite
    /// delta (which would poison the totals for good).
    pub fn check_finite(deltas: &[(String, String, VariantTotals)]) -> StorageResult<()> {
        match deltas.iter().find(|(_, _, d)| !d.is_finite()) {
            Some((e, v, d)) => Err(StorageError::Backend(format!(
                "experiment {e}/{v}: refusing a non-finite delta {d:?}"
            ))),
            None => Ok(()),
        }
    }
}
