//! Bandit sufficient statistics ([`BanditStore`]).
//!
//! Table `bandit_arms`: (placement, arm) → (trials `f64`, reward `f64`). `add` reads and
//! rewrites the pair inside the writer's transaction, so concurrent adds (even in one
//! batch) merge by addition.
//!
//! Table `bandit_linear`: (placement, arm, dims) → the linear model's statistics as
//! little-endian `f64`s ([`LinearStats::to_bytes`]), added to the same way.

use std::sync::Arc;

use async_trait::async_trait;
use redb::{ReadableTable, TableDefinition, WriteTransaction};

use super::{db_err, EmbeddedStore};
use crate::bandit::linear::LinearStats;
use crate::bandit::ArmStats;
use crate::storage::{BanditStore, StorageError, StorageResult};

pub(super) const BANDIT_ARMS: TableDefinition<(&str, &str), (f64, f64)> =
    TableDefinition::new("bandit_arms");

pub(super) const BANDIT_LINEAR: TableDefinition<(&str, &str, u32), &[u8]> =
    TableDefinition::new("bandit_linear");

pub(super) fn create_tables(txn: &WriteTransaction) -> StorageResult<()> {
    txn.open_table(BANDIT_ARMS).map_err(db_err)?;
    txn.open_table(BANDIT_LINEAR).map_err(db_err)?;
    Ok(())
}

/// [`BanditStore`] on the embedded store.
pub struct EmbeddedBandit {
    store: Arc<EmbeddedStore>,
}

impl EmbeddedBandit {
    pub fn new(store: Arc<EmbeddedStore>) -> Self {
        EmbeddedBandit { store }
    }
}

#[async_trait]
impl BanditStore for EmbeddedBandit {
    async fn add(&self, placement: &str, arm: &str, delta: ArmStats) -> StorageResult<()> {
        // A NaN or infinity would poison the arm for good: refuse it before it is stored.
        if !delta.trials.is_finite() || !delta.reward.is_finite() {
            return Err(StorageError::Backend(format!(
                "bandit {placement}/{arm}: refusing a non-finite delta {delta:?}"
            )));
        }
        let placement = placement.to_owned();
        let arm = arm.to_owned();
        let op = move |txn: &redb::WriteTransaction| {
            let mut table = txn.open_table(BANDIT_ARMS).map_err(db_err)?;
            let key = (placement.as_str(), arm.as_str());
            let (trials, reward) = table
                .get(key)
                .map_err(db_err)?
                .map_or((0.0, 0.0), |v| v.value());
            table
                .insert(key, (trials + delta.trials, reward + delta.reward))
                .map_err(db_err)?;
            Ok(())
        };
        // An impression a decision counts is part of the decision log; a reward comes
        // from an acknowledged outcome.
        self.store.write_as(delta.reward == 0.0, op).await
    }

    async fn get(&self, placement: &str, arms: &[String]) -> StorageResult<Vec<ArmStats>> {
        if arms.is_empty() {
            return Ok(Vec::new());
        }
        self.store.read(|txn| {
            let table = txn.open_table(BANDIT_ARMS).map_err(db_err)?;
            let mut out = Vec::with_capacity(arms.len());
            for arm in arms {
                let (trials, reward) = table
                    .get((placement, arm.as_str()))
                    .map_err(db_err)?
                    .map_or((0.0, 0.0), |v| v.value());
                out.push(ArmStats { trials, reward });
            }
            Ok(out)
        })
    }

    async fn add_linear(
        &self,
        placement: &str,
        arm: &str,
        delta: &LinearStats,
    ) -> StorageResult<()> {
        let dims = u32::try_from(delta.dims).ok().filter(|_| delta.is_valid());
        let Some(dims) = dims else {
            return Err(StorageError::Backend(format!(
                "bandit {placement}/{arm}: refusing invalid linear statistics (dims {})",
                delta.dims
            )));
        };
        let placement = placement.to_owned();
        let arm = arm.to_owned();
        let delta = delta.clone();
        let relaxed = delta.b.iter().all(|b| *b == 0.0);
        let op = move |txn: &redb::WriteTransaction| {
            let mut table = txn.open_table(BANDIT_LINEAR).map_err(db_err)?;
            let key = (placement.as_str(), arm.as_str(), dims);
            let mut total = table
                .get(key)
                .map_err(db_err)?
                .and_then(|v| LinearStats::from_bytes(delta.dims, v.value()))
                .unwrap_or_else(|| LinearStats::zero(delta.dims));
            total.merge(&delta);
            table
                .insert(key, total.to_bytes().as_slice())
                .map_err(db_err)?;
            Ok(())
        };
        // Without a reward the delta is an impression of the decision log.
        self.store.write_as(relaxed, op).await
    }

    async fn get_linear(
        &self,
        placement: &str,
        arms: &[String],
        dims: usize,
    ) -> StorageResult<Vec<LinearStats>> {
        let Ok(key_dims) = u32::try_from(dims) else {
            return Ok(vec![LinearStats::zero(dims); arms.len()]);
        };
        if arms.is_empty() {
            return Ok(Vec::new());
        }
        self.store.read(|txn| {
            let table = txn.open_table(BANDIT_LINEAR).map_err(db_err)?;
            let mut out = Vec::with_capacity(arms.len());
            for arm in arms {
                let stats = table
                    .get((placement, arm.as_str(), key_dims))
                    .map_err(db_err)?
                    .and_then(|v| LinearStats::from_bytes(dims, v.value()))
                    .unwrap_or_else(|| LinearStats::zero(dims));
                out.push(stats);
            }
            Ok(out)
        })
    }
}
