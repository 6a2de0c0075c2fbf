//! Versioned definitions and their active pointers ([`DefinitionStore`]).
//!
//! Tables (kind is [`DefinitionKind::as_str`]):
//! - `definitions`: (kind, name, version `u32`) → JSON of [`Definition`];
//! - `definition_versions`: (kind, name) → last version ever assigned; kept by `delete`, so
//!   version numbers are never reused;
//! - `definition_active`: (kind, name) → active version.

use std::ops::Bound;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use serde_json::Value;

use super::{db_err, decode, encode, EmbeddedStore};
use crate::storage::{Definition, DefinitionKind, DefinitionStore, StorageError, StorageResult};

pub(super) const DEFINITIONS: TableDefinition<(&str, &str, u32), &[u8]> =
    TableDefinition::new("definitions");
pub(super) const DEFINITION_VERSIONS: TableDefinition<(&str, &str), u32> =
    TableDefinition::new("definition_versions");
pub(super) const DEFINITION_ACTIVE: TableDefinition<(&str, &str), u32> =
    TableDefinition::new("definition_active");

pub(super) fn create_tables(txn: &WriteTransaction) -> StorageResult<()> {
    txn.open_table(DEFINITIONS).map_err(db_err)?;
    txn.open_table(DEFINITION_VERSIONS).map_err(db_err)?;
    txn.open_table(DEFINITION_ACTIVE).map_err(db_err)?;
    Ok(())
}

fn decode_definition(
    kind: &str,
    name: &str,
    version: u32,
    bytes: &[u8],
) -> StorageResult<Definition> {
    decode(
        "definition",
        format_args!("{kind}/{name}@v{version}"),
        bytes,
    )
}

/// Every stored version of (kind, name), ascending.
fn versions_in(txn: &ReadTransaction, kind: &str, name: &str) -> StorageResult<Vec<Definition>> {
    let table = txn.open_table(DEFINITIONS).map_err(db_err)?;
    let mut out = Vec::new();
    for entry in table
        .range((kind, name, 0u32)..=(kind, name, u32::MAX))
        .map_err(db_err)?
    {
        let (key, value) = entry.map_err(db_err)?;
        out.push(decode_definition(kind, name, key.value().2, value.value())?);
    }
    Ok(out)
}

/// [`DefinitionStore`] on the embedded store.
pub struct EmbeddedDefinitions {
    store: Arc<EmbeddedStore>,
}

impl EmbeddedDefinitions {
    pub fn new(store: Arc<EmbeddedStore>) -> Self {
        EmbeddedDefinitions { store }
    }
}

impl EmbeddedDefinitions {
    /// Stores `body` as the next version of (kind, name) and returns it; with
    /// `first_only`, only when the name never had a version (`None` otherwise).
    async fn store_next(
        &self,
        kind: DefinitionKind,
        name: &str,
        body: Value,
        first_only: bool,
    ) -> StorageResult<Option<u32>> {
        let name = name.to_owned();
        self.store
            .write(move |txn| {
                let mut definitions = txn.open_table(DEFINITIONS).map_err(db_err)?;
                let mut counters = txn.open_table(DEFINITION_VERSIONS).map_err(db_err)?;
                let key = (kind.as_str(), name.as_str());
                // Check.
                let last = counters.get(key).map_err(db_err)?.map(|v| v.value());
                if first_only && last.is_some() {
                    return Ok(None);
                }
                let version = last.unwrap_or(0).checked_add(1).ok_or_else(|| {
                    StorageError::Backend(format!(
                        "definition {}/{name}: version numbers exhausted",
                        kind.as_str()
                    ))
                })?;
                let definition = Definition {
                    kind,
                    name: name.clone(),
                    version,
                    body: body.clone(),
                    created_at: Utc::now(),
                };
                let value = encode("definition", &definition)?;
                // Write.
                definitions
                    .insert((kind.as_str(), name.as_str(), version), value.as_slice())
                    .map_err(db_err)?;
                counters.insert(key, version).map_err(db_err)?;
                Ok(Some(version))
            })
            .await
    }
}

#[async_trait]
impl DefinitionStore for EmbeddedDefinitions {
    async fn put(&self, kind: DefinitionKind, name: &str, body: Value) -> StorageResult<u32> {
        let stored = self.store_next(kind, name, body, false).await?;
        stored.ok_or_else(|| StorageError::Backend("definition version not stored".into()))
    }

    async fn put_first(
        &self,
        kind: DefinitionKind,
        name: &str,
        body: Value,
    ) -> StorageResult<bool> {
        Ok(self.store_next(kind, name, body, true).await?.is_some())
    }

    async fn get(
        &self,
        kind: DefinitionKind,
        name: &str,
        version: Option<u32>,
    ) -> StorageResult<Option<Definition>> {
        let kind = kind.as_str();
        self.store.read(|txn| {
            let table = txn.open_table(DEFINITIONS).map_err(db_err)?;
            match version {
                Some(version) => match table.get((kind, name, version)).map_err(db_err)? {
                    Some(value) => decode_definition(kind, name, version, value.value()).map(Some),
                    None => Ok(None),
                },
                None => {
                    let latest = table
                        .range((kind, name, 0u32)..=(kind, name, u32::MAX))
                        .map_err(db_err)?
                        .next_back();
                    match latest {
                        Some(entry) => {
                            let (key, value) = entry.map_err(db_err)?;
                            decode_definition(kind, name, key.value().2, value.value()).map(Some)
                        }
                        None => Ok(None),
                    }
                }
            }
        })
    }

    async fn versions(&self, kind: DefinitionKind, name: &str) -> StorageResult<Vec<Definition>> {
        let name = name.to_owned();
        self.store
            .read_blocking(move |txn| versions_in(txn, kind.as_str(), &name))
            .await
    }

    async fn list(&self, kind: DefinitionKind) -> StorageResult<Vec<Definition>> {
        self.store
            .read_blocking(move |txn| {
                let kind = kind.as_str();
                let table = txn.open_table(DEFINITIONS).map_err(db_err)?;
                // Keys come sorted by (name, version): the last entry of each name is its
                // latest version. Only that one is decoded.
                let mut latest: Vec<(String, u32, Vec<u8>)> = Vec::new();
                for entry in table
                    .range::<(&str, &str, u32)>((
                        Bound::Included((kind, "", 0u32)),
                        Bound::Unbounded,
                    ))
                    .map_err(db_err)?
                {
                    let (key, value) = entry.map_err(db_err)?;
                    let (entry_kind, name, version) = key.value();
                    if entry_kind != kind {
                        break;
                    }
                    match latest.last_mut() {
                        Some(last) if last.0 == name => {
                            last.1 = version;
                            last.2 = value.value().to_vec();
                        }
                        _ => latest.push((name.to_owned(), version, value.value().to_vec())),
                    }
                }
                latest
                    .iter()
                    .map(|(name, version, bytes)| decode_definition(kind, name, *version, bytes))
                    .collect()
            })
            .await
    }

    async fn delete(&self, kind: DefinitionKind, name: &str) -> StorageResult<bool> {
        let name = name.to_owned();
        self.store
            .write(move |txn| {
                let mut definitions = txn.open_table(DEFINITIONS).map_err(db_err)?;
                let mut active = txn.open_table(DEFINITION_ACTIVE).map_err(db_err)?;
                let kind = kind.as_str();
                let mut versions = Vec::new();
                for entry in definitions
                    .range((kind, name.as_str(), 0u32)..=(kind, name.as_str(), u32::MAX))
                    .map_err(db_err)?
                {
                    let (key, _) = entry.map_err(db_err)?;
                    versions.push(key.value().2);
                }
                for &version in &versions {
                    definitions
                        .remove((kind, name.as_str(), version))
                        .map_err(db_err)?;
                }
                // The version counter stays, so numbers are never reused.
                let had_active = active
                    .remove((kind, name.as_str()))
                    .map_err(db_err)?
                    .is_some();
                Ok(!versions.is_empty() || had_active)
            })
            .await
    }

    async fn set_active(
        &self,
        kind: DefinitionKind,
        name: &str,
        version: u32,
    ) -> StorageResult<bool> {
        let name = name.to_owned();
        self.store
            .write(move |txn| {
                let definitions = txn.open_table(DEFINITIONS).map_err(db_err)?;
                let mut active = txn.open_table(DEFINITION_ACTIVE).map_err(db_err)?;
                let kind = kind.as_str();
                if definitions
                    .get((kind, name.as_str(), version))
                    .map_err(db_err)?
                    .is_none()
                {
                    return Ok(false);
                }
                active
                    .insert((kind, name.as_str()), version)
                    .map_err(db_err)?;
                Ok(true)
            })
            .await
    }

    async fn active(&self, kind: DefinitionKind, name: &str) -> StorageResult<Option<u32>> {
        self.store.read(|txn| {
            let active = txn.open_table(DEFINITION_ACTIVE).map_err(db_err)?;
            Ok(active
                .get((kind.as_str(), name))
                .map_err(db_err)?
                .map(|v| v.value()))
        })
    }
}
