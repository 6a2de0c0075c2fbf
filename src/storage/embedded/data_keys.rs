//! Wrapped data keys and erasure markers ([`DataKeyStore`]).
//!
//! Tables:
//! - `data_keys`: [`KeyOwner::encode`] (`&str`) → JSON of [`WrappedKey`];
//! - `erased`: erasure tag (`&str`, a keyed hash of the customer id) → erased at, in
//!   milliseconds since the epoch (`i64`);
//! - `privacy_journal`: `"applied"` → the position of the last entry of the deployment's
//!   privacy journal this process applied (beside the markers it set).

use std::ops::Bound;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redb::{ReadableTable, TableDefinition, WriteTransaction};

use super::{db_err, decode, encode, EmbeddedStore};
use crate::storage::{DataKeyStore, KeyOwner, StorageError, StorageResult, WrappedKey};

pub(super) const DATA_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("data_keys");
pub(super) const ERASED: TableDefinition<&str, i64> = TableDefinition::new("erased");
const JOURNAL: TableDefinition<&str, &str> = TableDefinition::new("privacy_journal");
const APPLIED: &str = "applied";

pub(super) fn create_tables(txn: &WriteTransaction) -> StorageResult<()> {
    txn.open_table(DATA_KEYS).map_err(db_err)?;
    txn.open_table(ERASED).map_err(db_err)?;
    txn.open_table(JOURNAL).map_err(db_err)?;
    Ok(())
}

/// [`DataKeyStore`] on the embedded store.
pub struct EmbeddedDataKeys {
    store: Arc<EmbeddedStore>,
}

impl EmbeddedDataKeys {
    pub fn new(store: Arc<EmbeddedStore>) -> Self {
        EmbeddedDataKeys { store }
    }
}

fn decode_key(owner: &str, bytes: &[u8]) -> StorageResult<WrappedKey> {
    decode("data key", owner, bytes)
}

#[async_trait]
impl DataKeyStore for EmbeddedDataKeys {
    async fn get(&self, owner: &KeyOwner) -> StorageResult<Option<WrappedKey>> {
        let owner = owner.encode();
        self.store.read(|txn| {
            let table = txn.open_table(DATA_KEYS).map_err(db_err)?;
            let Some(value) = table.get(owner.as_str()).map_err(db_err)? else {
                return Ok(None);
            };
            decode_key(&owner, value.value()).map(Some)
        })
    }

    async fn insert(&self, owner: &KeyOwner, key: &WrappedKey) -> StorageResult<WrappedKey> {
        let owner = owner.encode();
        let key = key.clone();
        let value = encode("data key", &key)?;
        self.store
            .write(move |txn| {
                let mut table = txn.open_table(DATA_KEYS).map_err(db_err)?;
                if let Some(existing) = table.get(owner.as_str()).map_err(db_err)? {
                    return decode_key(&owner, existing.value());
                }
                table
                    .insert(owner.as_str(), value.as_slice())
                    .map_err(db_err)?;
                Ok(key.clone())
            })
            .await
    }

    async fn replace(
        &self,
        owner: &KeyOwner,
        old: &WrappedKey,
        new: &WrappedKey,
    ) -> StorageResult<bool> {
        let owner = owner.encode();
        let old = old.clone();
        let value = encode("data key", new)?;
        self.store
            .write(move |txn| {
                let mut table = txn.open_table(DATA_KEYS).map_err(db_err)?;
                let current = match table.get(owner.as_str()).map_err(db_err)? {
                    Some(v) => decode_key(&owner, v.value())?,
                    None => return Ok(false),
                };
                if current != old {
                    return Ok(false);
                }
                table
                    .insert(owner.as_str(), value.as_slice())
                    .map_err(db_err)?;
                Ok(true)
            })
            .await
    }

    async fn destroy(&self, owner: &KeyOwner) -> StorageResult<bool> {
        let owner = owner.encode();
        self.store
            .write(move |txn| {
                let mut table = txn.open_table(DATA_KEYS).map_err(db_err)?;
                let removed = table.remove(owner.as_str()).map_err(db_err)?.is_some();
                Ok(removed)
            })
            .await
    }

    async fn list(
        &self,
        after: Option<&KeyOwner>,
        limit: usize,
    ) -> StorageResult<Vec<(KeyOwner, WrappedKey)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let after = after.map(KeyOwner::encode);
        self.store
            .read_blocking(move |txn| {
                let table = txn.open_table(DATA_KEYS).map_err(db_err)?;
                let lower = match &after {
                    Some(after) => Bound::Excluded(after.as_str()),
                    None => Bound::Unbounded,
                };
                let mut out = Vec::new();
                for entry in table
                    .range::<&str>((lower, Bound::Unbounded))
                    .map_err(db_err)?
                    .take(limit)
                {
                    let (key, value) = entry.map_err(db_err)?;
                    let raw = key.value();
                    let owner = KeyOwner::decode(raw).ok_or_else(|| {
                        StorageError::Corrupt(format!("data key owner {raw:?} is not an owner"))
                    })?;
                    out.push((owner, decode_key(raw, value.value())?));
                }
                Ok(out)
            })
            .await
    }

    async fn mark_erased(&self, tag: &str, at: DateTime<Utc>) -> StorageResult<()> {
        let tag = tag.to_owned();
        let at = at.timestamp_millis();
        self.store
            .write(move |txn| {
                let mut table = txn.open_table(ERASED).map_err(db_err)?;
                table.insert(tag.as_str(), at).map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn erased_at(&self, tag: &str) -> StorageResult<Option<DateTime<Utc>>> {
        Ok(self.erased_many(&[tag.to_owned()]).await?.pop().flatten())
    }

    async fn erased_many(&self, tags: &[String]) -> StorageResult<Vec<Option<DateTime<Utc>>>> {
        // One snapshot for the whole batch.
        self.store.read(|txn| {
            let table = txn.open_table(ERASED).map_err(db_err)?;
            tags.iter()
                .map(|tag| {
                    let Some(value) = table.get(tag.as_str()).map_err(db_err)? else {
                        return Ok(None);
                    };
                    let ms = value.value();
                    DateTime::from_timestamp_millis(ms)
                        .map(Some)
                        .ok_or_else(|| {
                            StorageError::Corrupt(format!("erasure marker {tag}: time {ms}"))
                        })
                })
                .collect()
        })
    }

    async fn clear_erased(&self, tag: &str) -> StorageResult<bool> {
        let tag = tag.to_owned();
        self.store
            .write(move |txn| {
                let mut table = txn.open_table(ERASED).map_err(db_err)?;
                let removed = table.remove(tag.as_str()).map_err(db_err)?.is_some();
                Ok(removed)
            })
            .await
    }

    async fn journal_position(&self) -> StorageResult<Option<String>> {
        self.store.read(|txn| {
            let table = txn.open_table(JOURNAL).map_err(db_err)?;
            Ok(table
                .get(APPLIED)
                .map_err(db_err)?
                .map(|v| v.value().to_owned()))
        })
    }

    async fn set_journal_position(&self, position: &str) -> StorageResult<()> {
        let position = position.to_owned();
        self.store
            .write(move |txn| {
                let mut table = txn.open_table(JOURNAL).map_err(db_err)?;
                table.insert(APPLIED, position.as_str()).map_err(db_err)?;
                Ok(())
            })
            .await
    }
}
