//! The embedded backend: every capability in one redb 4 file, `<dir>/tailor.redb`.
//!
//! Map:
//! - [`EmbeddedStore`] (this file): opens the file, creates every table, hands out
//!   [`Stores`]; shared helpers for reads, error mapping and JSON values;
//! - [`writer`]: the group-commit writer thread that owns every write transaction;
//! - one file per capability, each with its tables and its trait implementation:
//!   [`profiles`], [`events`], [`features`], [`segments`], [`content`], [`decisions`],
//!   [`bandit`], [`definitions`], [`experiments`], [`keys`], [`data_keys`];
//! - `tests` (test builds only): the conformance suite on this backend, durability,
//!   group commit and corruption.
//!
//! Writes go through the writer: a method returns `Ok` only after the transaction that
//! holds its write was committed with `Durability::Immediate` (fsync). Reads open their own
//! read transaction on the caller's thread (MVCC: they never wait for the writer); scans
//! of unbounded size run on `tokio::task::spawn_blocking`, scans with a small limit (a
//! decision's impressions) on the caller's thread, where the hand-off cost more than the
//! read.
//!
//! Keys are redb tuples (`(&str, u64)`, ...): redb compares tuples element by element,
//! strings by bytes and integers numerically, which is exactly the order the traits ask
//! for. Values are JSON (`&[u8]`), except counters and bandit statistics, which are native.

pub mod bandit;
pub mod content;
pub mod data_keys;
pub mod decisions;
pub mod definitions;
pub mod events;
pub mod experiments;
pub mod features;
mod finite;
pub mod keys;
pub mod profiles;
pub mod segments;
mod writer;

#[cfg(test)]
mod tests;

use std::fmt::Display;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use redb::{Database, ReadTransaction, ReadableDatabase, TableHandle, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::storage::{StorageError, StorageResult, Stores};

use self::writer::Writer;

/// Name of the database file inside the store directory.
pub const FILE_NAME: &str = "tailor.redb";

/// The key store's directory inside the data directory: a store of its own (its own
/// `tailor.redb`) whose only use is data keys and erasure markers.
///
/// Apart from the data so that it can be backed up apart, on a shorter retention: a
/// backup of the data taken before an erasure holds the customer's sealed fields, and
/// only the key store has the key that opens them. Once an erasure destroyed it there
/// (and the key store's older backups expired), those copies are unreadable.
pub const KEYRING_DIR: &str = "keyring";

/// The data key store of `data_dir` ([`KEYRING_DIR`]).
pub fn open_keyring(data_dir: &Path) -> anyhow::Result<Arc<dyn crate::storage::DataKeyStore>> {
    let store = EmbeddedStore::open(&data_dir.join(KEYRING_DIR))?;
    Ok(Arc::new(data_keys::EmbeddedDataKeys::new(store)))
}

/// The embedded store: one redb database and the writer thread that commits to it.
///
/// Dropping the last handle (including every trait object from [`EmbeddedStore::stores`])
/// lets the writer finish the operations already queued, joins its thread and closes the
/// file, so the directory can be reopened right away.
pub struct EmbeddedStore {
    // Dropped first: the writer thread holds its own handle on `db`.
    writer: Writer,
    db: Arc<Database>,
    /// Whether [`EmbeddedStore::write_relaxed`] may skip the fsync (`storage.decision_log`).
    relaxed: std::sync::atomic::AtomicBool,
}

impl EmbeddedStore {
    /// Opens (or creates) `dir/tailor.redb`, creating `dir` and every table if needed.
    pub fn open(dir: &Path) -> anyhow::Result<Arc<EmbeddedStore>> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the store directory {}", dir.display()))?;
        let path = dir.join(FILE_NAME);
        let db = Database::create(&path)
            .with_context(|| format!("opening the embedded store {}", path.display()))?;
        create_tables(&db).with_context(|| format!("creating the tables of {}", path.display()))?;
        let db = Arc::new(db);
        let writer = Writer::start(db.clone()).context("starting the embedded store writer")?;
        Ok(Arc::new(EmbeddedStore {
            writer,
            db,
            relaxed: std::sync::atomic::AtomicBool::new(true),
        }))
    }

    /// Every capability, backed by this store.
    pub fn stores(self: &Arc<Self>) -> Stores {
        Stores {
            profiles: Arc::new(profiles::EmbeddedProfiles::new(self.clone())),
            data_keys: Arc::new(data_keys::EmbeddedDataKeys::new(self.clone())),
            events: Arc::new(events::EmbeddedEventLog::new(self.clone())),
            features: Arc::new(features::EmbeddedFeatures::new(self.clone())),
            segments: Arc::new(segments::EmbeddedSegments::new(self.clone())),
            content: Arc::new(content::EmbeddedContent::new(self.clone())),
            decisions: Arc::new(decisions::EmbeddedDecisions::new(self.clone())),
            bandit: Arc::new(bandit::EmbeddedBandit::new(self.clone())),
            definitions: Arc::new(definitions::EmbeddedDefinitions::new(self.clone())),
            experiments: Arc::new(experiments::EmbeddedExperiments::new(self.clone())),
            keys: Arc::new(keys::EmbeddedKeys::new(self.clone())),
            health: Vec::new(),
            catalog_copy: None,
            journal: None,
            counted_here: None,
            shared: crate::storage::Shared::default(),
            claims: None,
        }
    }

    /// Runs `op` in the writer's next write transaction and returns its result once that
    /// transaction is durably committed. `op` may run more than once (see [`writer`]), so
    /// it must depend only on what it captured and on the transaction; if it returns
    /// `Err`, nothing it wrote is committed.
    pub(super) async fn write<T, F>(&self, op: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: Fn(&WriteTransaction) -> StorageResult<T> + Send + 'static,
    {
        self.writer.submit(op).await
    }

    /// Like [`EmbeddedStore::write`], but the commit may skip the fsync (see
    /// [`writer`]): for the decision log, which no client handed us. Durable like
    /// `write` when `storage.decision_log = "durable"`.
    pub(super) async fn write_relaxed<T, F>(&self, op: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: Fn(&WriteTransaction) -> StorageResult<T> + Send + 'static,
    {
        self.write_as(true, op).await
    }

    /// [`EmbeddedStore::write_relaxed`] when `relaxed`, else [`EmbeddedStore::write`]:
    /// for stores whose writes are part of the decision log only sometimes.
    pub(super) async fn write_as<T, F>(&self, relaxed: bool, op: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: Fn(&WriteTransaction) -> StorageResult<T> + Send + 'static,
    {
        if relaxed && self.relaxed.load(std::sync::atomic::Ordering::Relaxed) {
            self.writer.submit_relaxed(op).await
        } else {
            self.writer.submit(op).await
        }
    }

    /// Sets `storage.decision_log`: whether [`EmbeddedStore::write_relaxed`] may skip the
    /// fsync (the default) or waits for it.
    pub fn set_decision_log(&self, log: crate::config::DecisionLog) {
        self.relaxed.store(
            log == crate::config::DecisionLog::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Runs a short read (point reads) on the caller's thread, in a fresh snapshot.
    pub(super) fn read<T>(
        &self,
        f: impl FnOnce(&ReadTransaction) -> StorageResult<T>,
    ) -> StorageResult<T> {
        let txn = self.db.begin_read().map_err(db_err)?;
        f(&txn)
    }

    /// Runs a read of unbounded size (a scan) on the blocking pool, in a fresh snapshot.
    pub(super) async fn read_blocking<T, F>(&self, f: F) -> StorageResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction) -> StorageResult<T> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(db_err)?;
            f(&txn)
        })
        .await
        .map_err(|e| StorageError::Backend(format!("read task failed: {e}")))?
    }
}

/// Creates every table, so that read transactions never meet a missing one.
fn create_tables(db: &Database) -> StorageResult<()> {
    let txn = db.begin_write().map_err(db_err)?;
    profiles::create_tables(&txn)?;
    events::create_tables(&txn)?;
    features::create_tables(&txn)?;
    segments::create_tables(&txn)?;
    content::create_tables(&txn)?;
    decisions::create_tables(&txn)?;
    bandit::create_tables(&txn)?;
    definitions::create_tables(&txn)?;
    experiments::create_tables(&txn)?;
    keys::create_tables(&txn)?;
    data_keys::create_tables(&txn)?;
    txn.commit().map_err(db_err)
}

/// Whether the store has a table named `name` (what a migration of an old table checks).
pub(super) fn has_table(txn: &WriteTransaction, name: &str) -> StorageResult<bool> {
    Ok(txn.list_tables().map_err(db_err)?.any(|t| t.name() == name))
}

/// Maps any redb error: detected corruption to [`StorageError::Corrupt`], the rest to
/// [`StorageError::Backend`].
pub(super) fn db_err(e: impl Into<redb::Error>) -> StorageError {
    match e.into() {
        redb::Error::Corrupted(msg) => StorageError::Corrupt(msg),
        other => StorageError::Backend(other.to_string()),
    }
}

/// Serializes a stored value whose numbers are all inside `serde_json::Value`s or integers,
/// so that it always reads back.
pub(super) fn encode<T: Serialize>(what: &str, value: &T) -> StorageResult<Vec<u8>> {
    serde_json::to_vec(value)
        .map_err(|e| StorageError::Backend(format!("cannot serialize {what}: {e}")))
}

/// Serializes a stored value with `f64` fields, refusing one that would not read back:
/// JSON has no NaN or infinity (serde_json writes them as `null`), and a value that could
/// not be read back must be refused now rather than stored and reported as corrupt later.
/// Checked by walking the value ([`finite`]), not by decoding the bytes again.
pub(super) fn encode_checked<T: Serialize>(what: &str, value: &T) -> StorageResult<Vec<u8>> {
    if let Some(x) = finite::non_finite(value) {
        return Err(StorageError::Backend(format!(
            "refusing to store {what}: it would not read back (non-finite number {x})"
        )));
    }
    encode(what, value)
}

/// Deserializes a stored value; an undecodable one is [`StorageError::Corrupt`].
pub(super) fn decode<T: DeserializeOwned>(
    what: &str,
    key: impl Display,
    bytes: &[u8],
) -> StorageResult<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| StorageError::Corrupt(format!("{what} {key}: undecodable value: {e}")))
}

/// A stored customer id (from a key or an index), re-validated.
pub(super) fn stored_customer_id(raw: &str) -> StorageResult<crate::customers::CustomerId> {
    crate::customers::CustomerId::parse("customerId", raw)
        .map_err(|e| StorageError::Corrupt(format!("stored customer id {raw:?}: {e}")))
}
