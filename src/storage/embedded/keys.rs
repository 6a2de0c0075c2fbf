//! API keys ([`KeyStore`]).
//!
//! Table `api_keys`: key id (`&str`) → JSON of [`KeyRecord`] (the secret's SHA-256, never
//! the secret); listing is a full scan in id order.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redb::{ReadableTable, TableDefinition, WriteTransaction};

use super::{db_err, decode, encode, EmbeddedStore};
use crate::auth::KeyRecord;
use crate::storage::{KeyStore, StorageResult};

pub(super) const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("api_keys");

pub(super) fn create_tables(txn: &WriteTransaction) -> StorageResult<()> {
    txn.open_table(KEYS).map_err(db_err)?;
    Ok(())
}

/// [`KeyStore`] on the embedded store.
pub struct EmbeddedKeys {
    store: Arc<EmbeddedStore>,
}

impl EmbeddedKeys {
    pub fn new(store: Arc<EmbeddedStore>) -> Self {
        EmbeddedKeys { store }
    }
}

#[async_trait]
impl KeyStore for EmbeddedKeys {
    async fn insert(&self, key: &KeyRecord) -> StorageResult<bool> {
        let id = key.id.clone();
        let value = encode("API key", key)?;
        self.store
            .write(move |txn| {
                let mut table = txn.open_table(KEYS).map_err(db_err)?;
                if table.get(id.as_str()).map_err(db_err)?.is_some() {
                    return Ok(false);
                }
                table
                    .insert(id.as_str(), value.as_slice())
                    .map_err(db_err)?;
                Ok(true)
            })
            .await
    }

    async fn get(&self, id: &str) -> StorageResult<Option<KeyRecord>> {
        self.store.read(|txn| {
            let table = txn.open_table(KEYS).map_err(db_err)?;
            match table.get(id).map_err(db_err)? {
                Some(value) => decode("API key", id, value.value()).map(Some),
                None => Ok(None),
            }
        })
    }

    async fn list(&self) -> StorageResult<Vec<KeyRecord>> {
        self.store
            .read_blocking(|txn| {
                let table = txn.open_table(KEYS).map_err(db_err)?;
                let mut out = Vec::new();
                for entry in table.range::<&str>(..).map_err(db_err)? {
                    let (key, value) = entry.map_err(db_err)?;
                    out.push(decode("API key", key.value(), value.value())?);
                }
                Ok(out)
            })
            .await
    }

    async fn revoke(&self, id: &str, at: DateTime<Utc>) -> StorageResult<Option<KeyRecord>> {
        let id = id.to_owned();
        self.store
            .write(move |txn| {
                let mut table = txn.open_table(KEYS).map_err(db_err)?;
                let mut record: KeyRecord = match table.get(id.as_str()).map_err(db_err)? {
                    Some(value) => decode("API key", &id, value.value())?,
                    None => return Ok(None),
                };
                if record.revoked_at.is_none() {
                    record.revoked_at = Some(at);
                    let value = encode("API key", &record)?;
                    table
                        .insert(id.as_str(), value.as_slice())
                        .map_err(db_err)?;
                }
                Ok(Some(record))
            })
            .await
    }
}
