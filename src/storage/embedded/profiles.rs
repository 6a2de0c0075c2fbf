//! Customer profiles ([`ProfileStore`]).
//!
//! Table `profiles`: customer id (`&str`) → JSON of [`Customer`]. Listing is a key range
//! scan; the count is the table's length.

use std::ops::Bound;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{ReadableTableMetadata, TableDefinition, WriteTransaction};

use super::{db_err, decode, encode, EmbeddedStore};
use crate::customers::{Customer, CustomerId};
use crate::storage::{ProfileStore, StorageResult};

pub(super) const PROFILES: TableDefinition<&str, &[u8]> = TableDefinition::new("profiles");

pub(super) fn create_tables(txn: &WriteTransaction) -> StorageResult<()> {
    txn.open_table(PROFILES).map_err(db_err)?;
    Ok(())
}

/// [`ProfileStore`] on the embedded store.
pub struct EmbeddedProfiles {
    store: Arc<EmbeddedStore>,
}

impl EmbeddedProfiles {
    pub fn new(store: Arc<EmbeddedStore>) -> Self {
        EmbeddedProfiles { store }
    }
}

#[async_trait]
impl ProfileStore for EmbeddedProfiles {
    async fn get(&self, id: &CustomerId) -> StorageResult<Option<Customer>> {
        self.store.read(|txn| {
            let table = txn.open_table(PROFILES).map_err(db_err)?;
            let Some(value) = table.get(id.as_str()).map_err(db_err)? else {
                return Ok(None);
            };
            decode("profile", id, value.value()).map(Some)
        })
    }

    async fn put(&self, customer: &Customer) -> StorageResult<()> {
        let id = customer.id.as_str().to_owned();
        let value = encode("profile", customer)?;
        self.store
            .write(move |txn| {
                let mut table = txn.open_table(PROFILES).map_err(db_err)?;
                table
                    .insert(id.as_str(), value.as_slice())
                    .map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn delete(&self, id: &CustomerId) -> StorageResult<bool> {
        let id = id.as_str().to_owned();
        self.store
            .write(move |txn| {
                let mut table = txn.open_table(PROFILES).map_err(db_err)?;
                let removed = table.remove(id.as_str()).map_err(db_err)?.is_some();
                Ok(removed)
            })
            .await
    }

    async fn list(&self, after: Option<&CustomerId>, limit: usize) -> StorageResult<Vec<Customer>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let after = after.map(|id| id.as_str().to_owned());
        self.store
            .read_blocking(move |txn| {
                let table = txn.open_table(PROFILES).map_err(db_err)?;
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
                    out.push(decode("profile", key.value(), value.value())?);
                }
                Ok(out)
            })
            .await
    }

    async fn count(&self) -> StorageResult<u64> {
        self.store.read(|txn| {
            let table = txn.open_table(PROFILES).map_err(db_err)?;
            table.len().map_err(db_err)
        })
    }
}
