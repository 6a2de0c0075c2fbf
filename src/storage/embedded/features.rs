//! Online feature state ([`FeatureStore`]).
//!
//! Tables:
//! - `features`: (customer id, feature name, version `u32`) → JSON of [`FeatureState`];
//!   one customer's states are one key range (reads, erasure);
//! - `feature_keys`: (feature name, version `u32`, customer id) → `()`: the same entries by
//!   feature version, so dropping one version is a range scan, not a full scan.

use std::sync::Arc;

use async_trait::async_trait;
use redb::{ReadableTable, TableDefinition, WriteTransaction};

use super::{db_err, decode, encode_checked, EmbeddedStore};
use crate::customers::CustomerId;
use crate::features::{FeatureKey, FeatureState};
use crate::storage::{FeatureStore, StorageResult};

pub(super) const FEATURES: TableDefinition<(&str, &str, u32), &[u8]> =
    TableDefinition::new("features");
pub(super) const FEATURE_KEYS: TableDefinition<(&str, u32, &str), ()> =
    TableDefinition::new("feature_keys");

pub(super) fn create_tables(txn: &WriteTransaction) -> StorageResult<()> {
    txn.open_table(FEATURES).map_err(db_err)?;
    txn.open_table(FEATURE_KEYS).map_err(db_err)?;
    Ok(())
}

/// The states of one customer's `keys`, in order.
fn read_states(
    table: &impl ReadableTable<(&'static str, &'static str, u32), &'static [u8]>,
    customer: &CustomerId,
    keys: &[FeatureKey],
) -> StorageResult<Vec<Option<FeatureState>>> {
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let value = table
            .get((customer.as_str(), key.name.as_str(), key.version))
            .map_err(db_err)?;
        out.push(match value {
            Some(value) => Some(decode(
                "feature state",
                format_args!("{customer}/{key}"),
                value.value(),
            )?),
            None => None,
        });
    }
    Ok(out)
}

/// [`FeatureStore`] on the embedded store.
pub struct EmbeddedFeatures {
    store: Arc<EmbeddedStore>,
}

impl EmbeddedFeatures {
    pub fn new(store: Arc<EmbeddedStore>) -> Self {
        EmbeddedFeatures { store }
    }
}

#[async_trait]
impl FeatureStore for EmbeddedFeatures {
    async fn read(
        &self,
        customer: &CustomerId,
        keys: &[FeatureKey],
    ) -> StorageResult<Vec<Option<FeatureState>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.store.read(|txn| {
            let table = txn.open_table(FEATURES).map_err(db_err)?;
            read_states(&table, customer, keys)
        })
    }

    async fn read_many(
        &self,
        requests: &[(CustomerId, Vec<FeatureKey>)],
    ) -> StorageResult<Vec<Vec<Option<FeatureState>>>> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        // One snapshot and one table open for the whole batch.
        self.store.read(|txn| {
            let table = txn.open_table(FEATURES).map_err(db_err)?;
            requests
                .iter()
                .map(|(customer, keys)| read_states(&table, customer, keys))
                .collect()
        })
    }

    async fn write(
        &self,
        updates: Vec<(CustomerId, FeatureKey, FeatureState)>,
    ) -> StorageResult<()> {
        if updates.is_empty() {
            return Ok(());
        }
        let encoded = updates
            .into_iter()
            .map(|(customer, key, state)| {
                Ok((customer, key, encode_checked("feature state", &state)?))
            })
            .collect::<StorageResult<Vec<_>>>()?;
        self.store
            .write(move |txn| {
                let mut table = txn.open_table(FEATURES).map_err(db_err)?;
                let mut by_key = txn.open_table(FEATURE_KEYS).map_err(db_err)?;
                for (customer, key, value) in &encoded {
                    let replaced = table
                        .insert(
                            (customer.as_str(), key.name.as_str(), key.version),
                            value.as_slice(),
                        )
                        .map_err(db_err)?
                        .is_some();
                    // A state that existed has its index row: writing the row again
                    // would only copy its page (the tables are copy-on-write).
                    if !replaced {
                        by_key
                            .insert((key.name.as_str(), key.version, customer.as_str()), ())
                            .map_err(db_err)?;
                    }
                }
                Ok(())
            })
            .await
    }

    async fn delete_customer(&self, customer: &CustomerId) -> StorageResult<()> {
        let customer = customer.as_str().to_owned();
        self.store
            .write(move |txn| {
                let mut table = txn.open_table(FEATURES).map_err(db_err)?;
                let mut by_key = txn.open_table(FEATURE_KEYS).map_err(db_err)?;
                let mut keys = Vec::new();
                for entry in table
                    .range((customer.as_str(), "", 0u32)..)
                    .map_err(db_err)?
                {
                    let (key, _) = entry.map_err(db_err)?;
                    let (owner, name, version) = key.value();
                    if owner != customer {
                        break;
                    }
                    keys.push((name.to_owned(), version));
                }
                for (name, version) in keys {
                    table
                        .remove((customer.as_str(), name.as_str(), version))
                        .map_err(db_err)?;
                    by_key
                        .remove((name.as_str(), version, customer.as_str()))
                        .map_err(db_err)?;
                }
                Ok(())
            })
            .await
    }

    async fn delete_key(&self, key: &FeatureKey) -> StorageResult<()> {
        let key = key.clone();
        self.store
            .write(move |txn| {
                let mut table = txn.open_table(FEATURES).map_err(db_err)?;
                let mut by_key = txn.open_table(FEATURE_KEYS).map_err(db_err)?;
                let mut customers = Vec::new();
                for entry in by_key
                    .range((key.name.as_str(), key.version, "")..)
                    .map_err(db_err)?
                {
                    let (entry_key, _) = entry.map_err(db_err)?;
                    let (name, version, customer) = entry_key.value();
                    if name != key.name || version != key.version {
                        break;
                    }
                    customers.push(customer.to_owned());
                }
                for customer in customers {
                    table
                        .remove((customer.as_str(), key.name.as_str(), key.version))
                        .map_err(db_err)?;
                    by_key
                        .remove((key.name.as_str(), key.version, customer.as_str()))
                        .map_err(db_err)?;
                }
                Ok(())
            })
            .await
    }
}
