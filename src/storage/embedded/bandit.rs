//! Bandit sufficient statistics ([`BanditStore`]).
//!
//! Table `bandit_arms`: (placement, arm) → (trials `f64`, reward `f64`). `add` reads and
//! rewrites the pair inside the writer's transaction, so concurrent adds (even in one
//! batch) merge by addition.

use std::sync::Arc;

use async_trait::async_trait;
use redb::{ReadableTable, TableDefinition, WriteTransaction};

use super::{db_err, EmbeddedStore};
use crate::bandit::ArmStats;
use crate::storage::{BanditStore, StorageError, StorageResult};

pub(super) const BANDIT_ARMS: TableDefinition<(&str, &str), (f64, f64)> =
    TableDefinition::new("bandit_arms");

pub(super) fn create_tables(txn: &WriteTransaction) -> StorageResult<()> {
    txn.open_table(BANDIT_ARMS).map_err(db_err)?;
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
        self.store
            .write(move |txn| {
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
            })
            .await
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
}
