//! The event log ([`EventLog`]).
//!
//! Tables:
//! - `events`: seq (`u64`) → JSON of [`Event`]; seqs are assigned at append, 1, 2, 3, ...;
//! - `event_ids`: event id (`&str`) → seq it was first stored at (the dedup set; kept
//!   when the customer's events are erased);
//! - `customer_event_types`: (customer id, timestamp seconds `i64`, sub-second nanos
//!   `u32`, seq `u64`) → event type (`&str`): one customer's events in (timestamp, seq)
//!   order, exact to the nanosecond, with what counting them by type needs, so that
//!   segment conditions count a window without loading (and decoding) its events;
//! - `event_meta`: `"last_seq"` → highest seq ever assigned (never decreases, so seqs are
//!   not reused after an erasure);
//! - `consumer_offsets`: consumer name (`&str`) → committed seq.
//!
//! Stores written before the index held the types have a `customer_events` table with
//! the same keys and `()` values; opening one moves its entries into
//! `customer_event_types`, each with its event's type, and drops it
//! ([`migrate_customer_index`]).

use std::collections::HashSet;
use std::ops::Bound;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redb::{ReadTransaction, ReadableTable, TableDefinition, TableHandle, WriteTransaction};

use super::{db_err, decode, encode, has_table, EmbeddedStore};
use crate::customers::CustomerId;
use crate::events::{Event, StoredEvent};
use crate::storage::{AppendOutcome, EventLog, StorageError, StorageResult};

pub(super) const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
pub(super) const EVENT_IDS: TableDefinition<&str, u64> = TableDefinition::new("event_ids");
pub(super) const CUSTOMER_EVENTS: TableDefinition<(&str, i64, u32, u64), &str> =
    TableDefinition::new("customer_event_types");
/// The customer index of stores written before it held the types.
pub(super) const OLD_CUSTOMER_EVENTS: TableDefinition<(&str, i64, u32, u64), ()> =
    TableDefinition::new("customer_events");
pub(super) const EVENT_META: TableDefinition<&str, u64> = TableDefinition::new("event_meta");
pub(super) const CONSUMER_OFFSETS: TableDefinition<&str, u64> =
    TableDefinition::new("consumer_offsets");

/// Key of the highest assigned seq in `event_meta`.
const LAST_SEQ: &str = "last_seq";

pub(super) fn create_tables(txn: &WriteTransaction) -> StorageResult<()> {
    txn.open_table(EVENTS).map_err(db_err)?;
    txn.open_table(EVENT_IDS).map_err(db_err)?;
    txn.open_table(CUSTOMER_EVENTS).map_err(db_err)?;
    txn.open_table(EVENT_META).map_err(db_err)?;
    txn.open_table(CONSUMER_OFFSETS).map_err(db_err)?;
    migrate_customer_index(txn)
}

/// Moves the entries of an old `customer_events` table into `customer_event_types`, each
/// with the type of the event it names, and drops the old table. An entry naming a
/// missing event is dropped (readers reported it as corruption; erasure removes both);
/// one naming an event that cannot be decoded is kept with an empty type (counted by no
/// condition; reading the customer's events still reports it). Runs in the transaction
/// that creates the tables, so a crash leaves either the old table or the move done.
fn migrate_customer_index(txn: &WriteTransaction) -> StorageResult<()> {
    if !has_table(txn, OLD_CUSTOMER_EVENTS.name())? {
        return Ok(());
    }
    /// The one field the move reads of a stored event.
    #[derive(serde::Deserialize)]
    struct TypeOnly {
        #[serde(rename = "type")]
        event_type: String,
    }
    let mut moved = 0u64;
    {
        let old = txn.open_table(OLD_CUSTOMER_EVENTS).map_err(db_err)?;
        let log = txn.open_table(EVENTS).map_err(db_err)?;
        let mut index = txn.open_table(CUSTOMER_EVENTS).map_err(db_err)?;
        for entry in old.iter().map_err(db_err)? {
            let (key, _) = entry.map_err(db_err)?;
            let key = key.value();
            let Some(value) = log.get(key.3).map_err(db_err)? else {
                continue;
            };
            let event_type = serde_json::from_slice::<TypeOnly>(value.value())
                .map(|e| e.event_type)
                .unwrap_or_default();
            index.insert(key, event_type.as_str()).map_err(db_err)?;
            moved += 1;
        }
    }
    txn.delete_table(OLD_CUSTOMER_EVENTS).map_err(db_err)?;
    tracing::info!(
        entries = moved,
        "Moved the customer index of events into customer_event_types"
    );
    Ok(())
}

/// (seconds, sub-second nanoseconds): sorts like the timestamp itself, before 1970 too.
fn time_key(ts: DateTime<Utc>) -> (i64, u32) {
    (ts.timestamp(), ts.timestamp_subsec_nanos())
}

/// One event of an append, serialized before it reaches the writer thread.
struct Encoded {
    event_id: String,
    customer: String,
    event_type: String,
    time: (i64, u32),
    value: Vec<u8>,
}

/// [`EventLog`] on the embedded store.
pub struct EmbeddedEventLog {
    store: Arc<EmbeddedStore>,
}

impl EmbeddedEventLog {
    pub fn new(store: Arc<EmbeddedStore>) -> Self {
        EmbeddedEventLog { store }
    }

    /// Forgets the oldest events with `seq <= through`, at most `limit` of them in one
    /// transaction (relaxed: what a crash undoes is forgotten again): their records,
    /// their customer index rows and their ids, so an id forgotten is new again. What an
    /// outbox does with the records it delivered long enough ago. `last_seq` stays, so
    /// sequence numbers are never reused. Returns how many were forgotten; 0 when none
    /// is left at or below `through`.
    pub async fn forget_through(&self, through: u64, limit: usize) -> StorageResult<u64> {
        self.store
            .write_relaxed(move |txn| {
                let mut log = txn.open_table(EVENTS).map_err(db_err)?;
                let mut ids = txn.open_table(EVENT_IDS).map_err(db_err)?;
                let mut index = txn.open_table(CUSTOMER_EVENTS).map_err(db_err)?;
                // Check: decode what goes, so that its id and index row go with it.
                let mut doomed = Vec::new();
                for entry in log.range(..=through).map_err(db_err)?.take(limit) {
                    let (key, value) = entry.map_err(db_err)?;
                    let seq = key.value();
                    let event: Event = decode("event", seq, value.value())?;
                    doomed.push((seq, event));
                }
                // Write.
                for (seq, event) in &doomed {
                    let (secs, nanos) = time_key(event.timestamp);
                    index
                        .remove((event.customer_id.as_str(), secs, nanos, *seq))
                        .map_err(db_err)?;
                    let first = ids
                        .get(event.event_id.as_str())
                        .map_err(db_err)?
                        .map(|v| v.value());
                    if first == Some(*seq) {
                        ids.remove(event.event_id.as_str()).map_err(db_err)?;
                    }
                    log.remove(*seq).map_err(db_err)?;
                }
                Ok(doomed.len() as u64)
            })
            .await
    }
}

/// Loads stored events by seq; an index entry without its event is corruption.
fn load_events(txn: &ReadTransaction, seqs: &[u64]) -> StorageResult<Vec<StoredEvent>> {
    let table = txn.open_table(EVENTS).map_err(db_err)?;
    let mut out = Vec::with_capacity(seqs.len());
    for &seq in seqs {
        let value = table.get(seq).map_err(db_err)?.ok_or_else(|| {
            StorageError::Corrupt(format!(
                "customer index names event {seq}, which is missing"
            ))
        })?;
        out.push(StoredEvent {
            seq,
            event: decode("event", seq, value.value())?,
        });
    }
    Ok(out)
}

#[async_trait]
impl EventLog for EmbeddedEventLog {
    async fn append(&self, events: &[Event]) -> StorageResult<Vec<AppendOutcome>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let encoded = events
            .iter()
            .map(|event| {
                Ok(Encoded {
                    event_id: event.event_id.clone(),
                    customer: event.customer_id.as_str().to_owned(),
                    event_type: event.event_type.clone(),
                    time: time_key(event.timestamp),
                    value: encode("event", event)?,
                })
            })
            .collect::<StorageResult<Vec<_>>>()?;
        self.store
            .write(move |txn| {
                let mut meta = txn.open_table(EVENT_META).map_err(db_err)?;
                let mut ids = txn.open_table(EVENT_IDS).map_err(db_err)?;
                let mut log = txn.open_table(EVENTS).map_err(db_err)?;
                let mut index = txn.open_table(CUSTOMER_EVENTS).map_err(db_err)?;

                // Check: which events are new, and their seqs in input order.
                let first_seq = meta.get(LAST_SEQ).map_err(db_err)?.map_or(0, |v| v.value());
                let mut last_seq = first_seq;
                let mut in_batch = HashSet::with_capacity(encoded.len());
                let mut outcomes = Vec::with_capacity(encoded.len());
                for event in &encoded {
                    let known = !in_batch.insert(event.event_id.as_str())
                        || ids.get(event.event_id.as_str()).map_err(db_err)?.is_some();
                    if known {
                        outcomes.push(AppendOutcome::Duplicate);
                    } else {
                        last_seq = last_seq.checked_add(1).ok_or_else(|| {
                            StorageError::Backend("event sequence numbers exhausted".into())
                        })?;
                        outcomes.push(AppendOutcome::Appended(last_seq));
                    }
                }

                // Write.
                for (event, outcome) in encoded.iter().zip(&outcomes) {
                    let AppendOutcome::Appended(seq) = *outcome else {
                        continue;
                    };
                    log.insert(seq, event.value.as_slice()).map_err(db_err)?;
                    ids.insert(event.event_id.as_str(), seq).map_err(db_err)?;
                    index
                        .insert(
                            (event.customer.as_str(), event.time.0, event.time.1, seq),
                            event.event_type.as_str(),
                        )
                        .map_err(db_err)?;
                }
                if last_seq != first_seq {
                    meta.insert(LAST_SEQ, last_seq).map_err(db_err)?;
                }
                Ok(outcomes)
            })
            .await
    }

    async fn scan(&self, after: u64, limit: usize) -> StorageResult<Vec<StoredEvent>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.store
            .read_blocking(move |txn| {
                let table = txn.open_table(EVENTS).map_err(db_err)?;
                let mut out = Vec::new();
                for entry in table
                    .range::<u64>((Bound::Excluded(after), Bound::Unbounded))
                    .map_err(db_err)?
                    .take(limit)
                {
                    let (key, value) = entry.map_err(db_err)?;
                    let seq = key.value();
                    out.push(StoredEvent {
                        seq,
                        event: decode("event", seq, value.value())?,
                    });
                }
                Ok(out)
            })
            .await
    }

    async fn customer_events(
        &self,
        customer: &CustomerId,
        since: DateTime<Utc>,
    ) -> StorageResult<Vec<StoredEvent>> {
        let customer = customer.as_str().to_owned();
        let (secs, nanos) = time_key(since);
        self.store
            .read_blocking(move |txn| {
                let index = txn.open_table(CUSTOMER_EVENTS).map_err(db_err)?;
                let lower = (customer.as_str(), secs, nanos, 0u64);
                let upper = (customer.as_str(), i64::MAX, u32::MAX, u64::MAX);
                let mut seqs = Vec::new();
                for entry in index.range(lower..=upper).map_err(db_err)? {
                    let (key, _) = entry.map_err(db_err)?;
                    seqs.push(key.value().3);
                }
                load_events(txn, &seqs)
            })
            .await
    }

    async fn count_customer_events(
        &self,
        customers: &[CustomerId],
        windows: &[(String, DateTime<Utc>)],
    ) -> StorageResult<Vec<Vec<u64>>> {
        let Some(oldest) = windows.iter().map(|(_, since)| *since).min() else {
            return Ok(vec![Vec::new(); customers.len()]);
        };
        let customers: Vec<String> = customers.iter().map(|c| c.as_str().to_owned()).collect();
        let windows: Vec<(String, (i64, u32))> = windows
            .iter()
            .map(|(t, since)| (t.clone(), time_key(*since)))
            .collect();
        let (secs, nanos) = time_key(oldest);
        self.store
            .read_blocking(move |txn| {
                let index = txn.open_table(CUSTOMER_EVENTS).map_err(db_err)?;
                let mut out = Vec::with_capacity(customers.len());
                for customer in &customers {
                    let mut counts = vec![0u64; windows.len()];
                    let lower = (customer.as_str(), secs, nanos, 0u64);
                    let upper = (customer.as_str(), i64::MAX, u32::MAX, u64::MAX);
                    for entry in index.range(lower..=upper).map_err(db_err)? {
                        let (key, value) = entry.map_err(db_err)?;
                        let (_, s, n, _) = key.value();
                        let event_type = value.value();
                        for ((t, since), count) in windows.iter().zip(&mut counts) {
                            if t == event_type && (s, n) > *since {
                                *count += 1;
                            }
                        }
                    }
                    out.push(counts);
                }
                Ok(out)
            })
            .await
    }

    async fn last_seq(&self) -> StorageResult<u64> {
        self.store.read(|txn| {
            let meta = txn.open_table(EVENT_META).map_err(db_err)?;
            Ok(meta.get(LAST_SEQ).map_err(db_err)?.map_or(0, |v| v.value()))
        })
    }

    async fn delete_customer(&self, customer: &CustomerId) -> StorageResult<u64> {
        let customer = customer.as_str().to_owned();
        self.store
            .write(move |txn| {
                let mut index = txn.open_table(CUSTOMER_EVENTS).map_err(db_err)?;
                let mut log = txn.open_table(EVENTS).map_err(db_err)?;
                let lower = (customer.as_str(), i64::MIN, 0u32, 0u64);
                let upper = (customer.as_str(), i64::MAX, u32::MAX, u64::MAX);
                let mut keys = Vec::new();
                for entry in index.range(lower..=upper).map_err(db_err)? {
                    let (key, _) = entry.map_err(db_err)?;
                    let (_, secs, nanos, seq) = key.value();
                    keys.push((secs, nanos, seq));
                }
                let mut removed = 0;
                for (secs, nanos, seq) in keys {
                    index
                        .remove((customer.as_str(), secs, nanos, seq))
                        .map_err(db_err)?;
                    if log.remove(seq).map_err(db_err)?.is_some() {
                        removed += 1;
                    }
                }
                Ok(removed)
            })
            .await
    }

    async fn commit_offset(&self, consumer: &str, seq: u64) -> StorageResult<()> {
        let consumer = consumer.to_owned();
        self.store
            .write(move |txn| {
                let mut offsets = txn.open_table(CONSUMER_OFFSETS).map_err(db_err)?;
                offsets.insert(consumer.as_str(), seq).map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn committed_offset(&self, consumer: &str) -> StorageResult<u64> {
        self.store.read(|txn| {
            let offsets = txn.open_table(CONSUMER_OFFSETS).map_err(db_err)?;
            Ok(offsets
                .get(consumer)
                .map_err(db_err)?
                .map_or(0, |v| v.value()))
        })
    }
}
