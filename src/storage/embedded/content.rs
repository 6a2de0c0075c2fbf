//! The content catalog ([`ContentStore`]).
//!
//! Table `content`: item id (`&str`) → JSON of [`ContentItem`]; listing is a full scan in
//! id order.

use std::sync::Arc;

use async_trait::async_trait;
use redb::{TableDefinition, WriteTransaction};

use super::{db_err, decode, encode, EmbeddedStore};
use crate::content::ContentItem;
use crate::storage::{ContentStore, StorageResult};

pub(super) const CONTENT: TableDefinition<&str, &[u8]> = TableDefinition::new("content");

pub(super) fn create_tables(txn: &WriteTransaction) -> StorageResult<()> {
    txn.open_table(CONTENT).map_err(db_err)?;
    Ok(())
}

/// [`ContentStore`] on the embedded store.
pub struct EmbeddedContent {
    store: Arc<EmbeddedStore>,
}

impl EmbeddedContent {
    pub fn new(store: Arc<EmbeddedStore>) -> Self {
        EmbeddedContent { store }
    }
}

#[async_trait]
impl ContentStore for EmbeddedContent {
    async fn upsert(&self, item: &ContentItem) -> StorageResult<()> {
        let id = item.id.clone();
        let value = encode("content item", item)?;
        self.store
            .write(move |txn| {
                let mut table = txn.open_table(CONTENT).map_err(db_err)?;
                table
                    .insert(id.as_str(), value.as_slice())
                    .map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn get(&self, id: &str) -> StorageResult<Option<ContentItem>> {
        self.store.read(|txn| {
            let table = txn.open_table(CONTENT).map_err(db_err)?;
            match table.get(id).map_err(db_err)? {
                Some(value) => decode("content item", id, value.value()).map(Some),
                None => Ok(None),
            }
        })
    }

    async fn get_many(&self, ids: &[String]) -> StorageResult<Vec<Option<ContentItem>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.store.read(|txn| {
            let table = txn.open_table(CONTENT).map_err(db_err)?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                out.push(match table.get(id.as_str()).map_err(db_err)? {
                    Some(value) => Some(decode("content item", id, value.value())?),
                    None => None,
                });
            }
            Ok(out)
        })
    }

    async fn list(&self) -> StorageResult<Vec<ContentItem>> {
        self.store
            .read_blocking(|txn| {
                let table = txn.open_table(CONTENT).map_err(db_err)?;
                let mut out = Vec::new();
                for entry in table.range::<&str>(..).map_err(db_err)? {
                    let (key, value) = entry.map_err(db_err)?;
                    out.push(decode("content item", key.value(), value.value())?);
                }
                Ok(out)
            })
            .await
    }

    async fn delete(&self, id: &str) -> StorageResult<bool> {
        let id = id.to_owned();
        self.store
            .write(move |txn| {
                let mut table = txn.open_table(CONTENT).map_err(db_err)?;
                let removed = table.remove(id.as_str()).map_err(db_err)?.is_some();
                Ok(removed)
            })
            .await
    }
}
