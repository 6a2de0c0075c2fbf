//! Customer profiles ([`ProfileStore`]).
//!
//! Tables:
//! - `profiles`: customer id (`&str`) → JSON of [`StoredProfile`] (PII sealed). Listing
//!   is a key range scan; the count is the table's length;
//! - `email_index`: (blind index `&str`, customer id `&str`) → `()`, kept in the same
//!   write as the profile.

use std::ops::Bound;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};

use super::{db_err, decode, encode, stored_customer_id, EmbeddedStore};
use crate::customers::{Consent, CustomerId};
use crate::storage::{ProfileStore, StorageResult, StoredProfile};

pub(super) const PROFILES: TableDefinition<&str, &[u8]> = TableDefinition::new("profiles");
pub(super) const EMAIL_INDEX: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("email_index");

pub(super) fn create_tables(txn: &WriteTransaction) -> StorageResult<()> {
    txn.open_table(PROFILES).map_err(db_err)?;
    txn.open_table(EMAIL_INDEX).map_err(db_err)?;
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

/// The stored profile's email index, if it has one (an undecodable old value has none:
/// it is replaced or removed anyway).
fn old_index(table: &redb::Table<&str, &[u8]>, id: &str) -> StorageResult<Option<String>> {
    let Some(value) = table.get(id).map_err(db_err)? else {
        return Ok(None);
    };
    Ok(serde_json::from_slice::<StoredProfile>(value.value())
        .ok()
        .and_then(|p| p.email_index))
}

#[async_trait]
impl ProfileStore for EmbeddedProfiles {
    async fn get(&self, id: &CustomerId) -> StorageResult<Option<StoredProfile>> {
        Ok(self
            .get_many(std::slice::from_ref(id))
            .await?
            .pop()
            .flatten())
    }

    async fn get_many(&self, ids: &[CustomerId]) -> StorageResult<Vec<Option<StoredProfile>>> {
        self.store.read(|txn| {
            let table = txn.open_table(PROFILES).map_err(db_err)?;
            ids.iter()
                .map(|id| match table.get(id.as_str()).map_err(db_err)? {
                    Some(value) => decode("profile", id, value.value()).map(Some),
                    None => Ok(None),
                })
                .collect()
        })
    }

    async fn consents(&self, ids: &[CustomerId]) -> StorageResult<Vec<Option<Consent>>> {
        /// The consent of a stored profile: the other fields are skipped, not decoded.
        #[derive(serde::Deserialize)]
        struct ConsentOf {
            #[serde(default)]
            consent: Consent,
        }
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.store.read(|txn| {
            let table = txn.open_table(PROFILES).map_err(db_err)?;
            ids.iter()
                .map(|id| match table.get(id.as_str()).map_err(db_err)? {
                    Some(value) => {
                        decode::<ConsentOf>("profile", id, value.value()).map(|p| Some(p.consent))
                    }
                    None => Ok(None),
                })
                .collect()
        })
    }

    async fn put(&self, profile: &StoredProfile) -> StorageResult<()> {
        let id = profile.id.as_str().to_owned();
        let index = profile.email_index.clone();
        let value = encode("profile", profile)?;
        self.store
            .write(move |txn| {
                let mut table = txn.open_table(PROFILES).map_err(db_err)?;
                let mut emails = txn.open_table(EMAIL_INDEX).map_err(db_err)?;
                let old = old_index(&table, &id)?;
                if old != index {
                    if let Some(old) = &old {
                        emails.remove((old.as_str(), id.as_str())).map_err(db_err)?;
                    }
                    if let Some(new) = &index {
                        emails
                            .insert((new.as_str(), id.as_str()), ())
                            .map_err(db_err)?;
                    }
                }
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
                let mut emails = txn.open_table(EMAIL_INDEX).map_err(db_err)?;
                if let Some(old) = old_index(&table, &id)? {
                    emails.remove((old.as_str(), id.as_str())).map_err(db_err)?;
                }
                let removed = table.remove(id.as_str()).map_err(db_err)?.is_some();
                Ok(removed)
            })
            .await
    }

    async fn list(
        &self,
        after: Option<&CustomerId>,
        limit: usize,
    ) -> StorageResult<Vec<StoredProfile>> {
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

    async fn find_by_email(&self, index: &str) -> StorageResult<Vec<CustomerId>> {
        self.store.read(|txn| {
            let table = txn.open_table(EMAIL_INDEX).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in table
                .range::<(&str, &str)>((Bound::Included((index, "")), Bound::Unbounded))
                .map_err(db_err)?
            {
                let (key, _) = entry.map_err(db_err)?;
                let (found, id) = key.value();
                if found != index {
                    break;
                }
                out.push(stored_customer_id(id)?);
            }
            Ok(out)
        })
    }
}
