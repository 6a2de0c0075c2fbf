//! Segment membership ([`SegmentStore`]), kept in both directions.
//!
//! Tables:
//! - `segment_members`: (segment, customer id) → `()`: a segment's members in id order;
//! - `customer_segments`: (customer id, segment) → `()`: a customer's segments by name;
//! - `segment_sizes`: segment → member count (`u64`), absent for an empty segment; kept
//!   exact by every write, which always updates the three tables together.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};

use super::{db_err, stored_customer_id, EmbeddedStore};
use crate::customers::CustomerId;
use crate::storage::{MembershipChange, SegmentStore, StorageError, StorageResult};

pub(super) const SEGMENT_MEMBERS: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("segment_members");
pub(super) const CUSTOMER_SEGMENTS: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("customer_segments");
pub(super) const SEGMENT_SIZES: TableDefinition<&str, u64> = TableDefinition::new("segment_sizes");

pub(super) fn create_tables(txn: &WriteTransaction) -> StorageResult<()> {
    txn.open_table(SEGMENT_MEMBERS).map_err(db_err)?;
    txn.open_table(CUSTOMER_SEGMENTS).map_err(db_err)?;
    txn.open_table(SEGMENT_SIZES).map_err(db_err)?;
    Ok(())
}

/// Applies size deltas to `segment_sizes`; a count that would go negative (or overflow)
/// means the counter and the membership disagree.
fn apply_size_deltas(
    sizes: &mut Table<&str, u64>,
    deltas: &BTreeMap<String, i64>,
) -> StorageResult<()> {
    for (segment, &delta) in deltas {
        if delta == 0 {
            continue;
        }
        let current = sizes
            .get(segment.as_str())
            .map_err(db_err)?
            .map_or(0, |v| v.value());
        let updated = current.checked_add_signed(delta).ok_or_else(|| {
            StorageError::Corrupt(format!(
                "segment {segment:?}: size counter {current} cannot take a change of {delta}"
            ))
        })?;
        if updated == 0 {
            sizes.remove(segment.as_str()).map_err(db_err)?;
        } else {
            sizes.insert(segment.as_str(), updated).map_err(db_err)?;
        }
    }
    Ok(())
}

/// [`SegmentStore`] on the embedded store.
pub struct EmbeddedSegments {
    store: Arc<EmbeddedStore>,
}

impl EmbeddedSegments {
    pub fn new(store: Arc<EmbeddedStore>) -> Self {
        EmbeddedSegments { store }
    }
}

#[async_trait]
impl SegmentStore for EmbeddedSegments {
    async fn apply(&self, changes: &[MembershipChange]) -> StorageResult<Vec<MembershipChange>> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let changes = changes.to_vec();
        self.store
            .write(move |txn| {
                let mut members = txn.open_table(SEGMENT_MEMBERS).map_err(db_err)?;
                let mut by_customer = txn.open_table(CUSTOMER_SEGMENTS).map_err(db_err)?;
                let mut sizes = txn.open_table(SEGMENT_SIZES).map_err(db_err)?;

                // Check: replay the changes in order over the stored membership.
                let mut state: HashMap<(&str, &str), bool> = HashMap::new();
                let mut effective = Vec::new();
                let mut deltas: BTreeMap<String, i64> = BTreeMap::new();
                for change in &changes {
                    let key = (change.segment.as_str(), change.customer.as_str());
                    let member = match state.get(&key) {
                        Some(&member) => member,
                        None => members.get(key).map_err(db_err)?.is_some(),
                    };
                    if member == change.joined {
                        continue;
                    }
                    state.insert(key, change.joined);
                    *deltas.entry(change.segment.clone()).or_default() +=
                        if change.joined { 1 } else { -1 };
                    effective.push(change.clone());
                }

                // Write the final state of every pair that changed, and the sizes.
                for (&(segment, customer), &joined) in &state {
                    if joined {
                        members.insert((segment, customer), ()).map_err(db_err)?;
                        by_customer
                            .insert((customer, segment), ())
                            .map_err(db_err)?;
                    } else {
                        members.remove((segment, customer)).map_err(db_err)?;
                        by_customer.remove((customer, segment)).map_err(db_err)?;
                    }
                }
                apply_size_deltas(&mut sizes, &deltas)?;
                Ok(effective)
            })
            .await
    }

    async fn contains(&self, segment: &str, customer: &CustomerId) -> StorageResult<bool> {
        self.store.read(|txn| {
            let members = txn.open_table(SEGMENT_MEMBERS).map_err(db_err)?;
            Ok(members
                .get((segment, customer.as_str()))
                .map_err(db_err)?
                .is_some())
        })
    }

    async fn size(&self, segment: &str) -> StorageResult<u64> {
        self.store.read(|txn| {
            let sizes = txn.open_table(SEGMENT_SIZES).map_err(db_err)?;
            Ok(sizes.get(segment).map_err(db_err)?.map_or(0, |v| v.value()))
        })
    }

    async fn members(
        &self,
        segment: &str,
        after: Option<&CustomerId>,
        limit: usize,
    ) -> StorageResult<Vec<CustomerId>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let segment = segment.to_owned();
        let after = after.map(|id| id.as_str().to_owned());
        self.store
            .read_blocking(move |txn| {
                let members = txn.open_table(SEGMENT_MEMBERS).map_err(db_err)?;
                let lower = match &after {
                    Some(after) => Bound::Excluded((segment.as_str(), after.as_str())),
                    None => Bound::Included((segment.as_str(), "")),
                };
                let mut out = Vec::new();
                for entry in members
                    .range::<(&str, &str)>((lower, Bound::Unbounded))
                    .map_err(db_err)?
                {
                    if out.len() == limit {
                        break;
                    }
                    let (key, _) = entry.map_err(db_err)?;
                    let (owner, customer) = key.value();
                    if owner != segment {
                        break;
                    }
                    out.push(stored_customer_id(customer)?);
                }
                Ok(out)
            })
            .await
    }

    async fn segments_of(&self, customer: &CustomerId) -> StorageResult<Vec<String>> {
        Ok(self
            .segments_of_many(std::slice::from_ref(customer))
            .await?
            .pop()
            .unwrap_or_default())
    }

    async fn segments_of_many(&self, customers: &[CustomerId]) -> StorageResult<Vec<Vec<String>>> {
        self.store.read(|txn| {
            let by_customer = txn.open_table(CUSTOMER_SEGMENTS).map_err(db_err)?;
            let mut all = Vec::with_capacity(customers.len());
            for customer in customers {
                let mut out = Vec::new();
                for entry in by_customer
                    .range((customer.as_str(), "")..)
                    .map_err(db_err)?
                {
                    let (key, _) = entry.map_err(db_err)?;
                    let (owner, segment) = key.value();
                    if owner != customer.as_str() {
                        break;
                    }
                    out.push(segment.to_owned());
                }
                all.push(out);
            }
            Ok(all)
        })
    }

    async fn clear(&self, segment: &str) -> StorageResult<()> {
        let segment = segment.to_owned();
        self.store
            .write(move |txn| {
                let mut members = txn.open_table(SEGMENT_MEMBERS).map_err(db_err)?;
                let mut by_customer = txn.open_table(CUSTOMER_SEGMENTS).map_err(db_err)?;
                let mut sizes = txn.open_table(SEGMENT_SIZES).map_err(db_err)?;
                let mut customers = Vec::new();
                for entry in members.range((segment.as_str(), "")..).map_err(db_err)? {
                    let (key, _) = entry.map_err(db_err)?;
                    let (owner, customer) = key.value();
                    if owner != segment {
                        break;
                    }
                    customers.push(customer.to_owned());
                }
                for customer in &customers {
                    members
                        .remove((segment.as_str(), customer.as_str()))
                        .map_err(db_err)?;
                    by_customer
                        .remove((customer.as_str(), segment.as_str()))
                        .map_err(db_err)?;
                }
                sizes.remove(segment.as_str()).map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn remove_customer(&self, customer: &CustomerId) -> StorageResult<Vec<MembershipChange>> {
        let customer = customer.clone();
        self.store
            .write(move |txn| {
                let mut members = txn.open_table(SEGMENT_MEMBERS).map_err(db_err)?;
                let mut by_customer = txn.open_table(CUSTOMER_SEGMENTS).map_err(db_err)?;
                let mut sizes = txn.open_table(SEGMENT_SIZES).map_err(db_err)?;
                let mut segments = Vec::new();
                for entry in by_customer
                    .range((customer.as_str(), "")..)
                    .map_err(db_err)?
                {
                    let (key, _) = entry.map_err(db_err)?;
                    let (owner, segment) = key.value();
                    if owner != customer.as_str() {
                        break;
                    }
                    segments.push(segment.to_owned());
                }
                let mut deltas = BTreeMap::new();
                for segment in &segments {
                    by_customer
                        .remove((customer.as_str(), segment.as_str()))
                        .map_err(db_err)?;
                    members
                        .remove((segment.as_str(), customer.as_str()))
                        .map_err(db_err)?;
                    deltas.insert(segment.clone(), -1);
                }
                apply_size_deltas(&mut sizes, &deltas)?;
                Ok(segments
                    .into_iter()
                    .map(|segment| MembershipChange {
                        segment,
                        customer: customer.clone(),
                        joined: false,
                    })
                    .collect())
            })
            .await
    }
}
