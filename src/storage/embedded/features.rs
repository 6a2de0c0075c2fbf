//! Online feature state ([`FeatureStore`]).
//!
//! Tables:
//! - `features`: (customer id, feature name, version `u32`) → the [`FeatureState`] in
//!   its stored form (below); one customer's states are one key range (reads, erasure);
//! - `feature_keys`: (feature name, version `u32`, customer id) → `()`: the same entries by
//!   feature version, so dropping one version is a range scan, not a full scan;
//! - `feature_backfills`: (feature name, version `u32`, partition `i32`) → `()`: the
//!   event-stream partitions whose history the version's states hold.
//!
//! Stored form: the byte [`BINARY_V1`], then postcard of [`StoredState`] (varints, the
//! sums as little-endian `f64`, so they read back exactly): smaller than JSON, and no
//! text to parse on the paths that read states for every event and decision.
//! States written as JSON before (they start with `{`) still read, and are rewritten in
//! the binary form when next written.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{db_err, decode, EmbeddedStore};
use crate::customers::CustomerId;
use crate::events::StreamPosition;
use crate::features::{Bucket, FeatureKey, FeatureState};
use crate::storage::{FeatureStore, StorageError, StorageResult};

/// The first byte of a state in the binary form.
pub(super) const BINARY_V1: u8 = 1;

/// [`FeatureState`] as stored: every field always present (postcard is not
/// self-describing, so it has no place for serde's skipped fields).
#[derive(Serialize, Deserialize)]
struct StoredState<B> {
    applied_seq: u64,
    applied_position: Option<(i32, i64)>,
    buckets: B,
    last_seen_ms: Option<i64>,
}

/// A state in its stored form, refused when it would not read back (a non-finite sum).
fn encode_state(state: &FeatureState) -> StorageResult<Vec<u8>> {
    if let Some(bucket) = state.buckets.iter().find(|b| !b.sum.is_finite()) {
        return Err(StorageError::Backend(format!(
            "refusing to store feature state: it would not read back (non-finite number {})",
            bucket.sum
        )));
    }
    let stored = StoredState {
        applied_seq: state.applied_seq,
        applied_position: state.applied_position.map(|p| (p.partition, p.offset)),
        buckets: state.buckets.as_slice(),
        last_seen_ms: state.last_seen_ms,
    };
    postcard::to_extend(&stored, vec![BINARY_V1])
        .map_err(|e| StorageError::Backend(format!("encoding a feature state: {e}")))
}

/// A stored state, in either form; anything else is [`StorageError::Corrupt`].
fn decode_state(key: impl std::fmt::Display, bytes: &[u8]) -> StorageResult<FeatureState> {
    match bytes.split_first() {
        Some((&BINARY_V1, rest)) => {
            let corrupt = |why: &dyn std::fmt::Display| {
                StorageError::Corrupt(format!("feature state {key}: undecodable value: {why}"))
            };
            let (stored, left): (StoredState<Vec<Bucket>>, _) =
                postcard::take_from_bytes(rest).map_err(|e| corrupt(&e))?;
            if !left.is_empty() {
                return Err(corrupt(&format_args!(
                    "{} bytes after the state",
                    left.len()
                )));
            }
            Ok(FeatureState {
                applied_seq: stored.applied_seq,
                applied_position: stored
                    .applied_position
                    .map(|(partition, offset)| StreamPosition { partition, offset }),
                buckets: stored.buckets,
                last_seen_ms: stored.last_seen_ms,
            })
        }
        // Written as JSON before the binary form.
        _ => decode("feature state", key, bytes),
    }
}

pub(super) const FEATURES: TableDefinition<(&str, &str, u32), &[u8]> =
    TableDefinition::new("features");
pub(super) const FEATURE_KEYS: TableDefinition<(&str, u32, &str), ()> =
    TableDefinition::new("feature_keys");
const FEATURE_BACKFILLS: TableDefinition<(&str, u32, i32), ()> =
    TableDefinition::new("feature_backfills");

pub(super) fn create_tables(txn: &WriteTransaction) -> StorageResult<()> {
    txn.open_table(FEATURES).map_err(db_err)?;
    txn.open_table(FEATURE_KEYS).map_err(db_err)?;
    txn.open_table(FEATURE_BACKFILLS).map_err(db_err)?;
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
            Some(value) => Some(decode_state(
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
            .map(|(customer, key, state)| Ok((customer, key, encode_state(&state)?)))
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
                let mut marks = txn.open_table(FEATURE_BACKFILLS).map_err(db_err)?;
                marks
                    .retain_in(
                        (key.name.as_str(), key.version, i32::MIN)
                            ..=(key.name.as_str(), key.version, i32::MAX),
                        |_, _| false,
                    )
                    .map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn backfilled_partitions(&self, key: &FeatureKey) -> StorageResult<BTreeSet<i32>> {
        self.store.read(|txn| {
            let marks = txn.open_table(FEATURE_BACKFILLS).map_err(db_err)?;
            marks
                .range(
                    (key.name.as_str(), key.version, i32::MIN)
                        ..=(key.name.as_str(), key.version, i32::MAX),
                )
                .map_err(db_err)?
                .map(|entry| Ok(entry.map_err(db_err)?.0.value().2))
                .collect()
        })
    }

    async fn mark_backfilled(&self, key: &FeatureKey, partition: i32) -> StorageResult<()> {
        let key = key.clone();
        self.store
            .write(move |txn| {
                let mut marks = txn.open_table(FEATURE_BACKFILLS).map_err(db_err)?;
                marks
                    .insert((key.name.as_str(), key.version, partition), ())
                    .map_err(db_err)?;
                Ok(())
            })
            .await
    }
}
