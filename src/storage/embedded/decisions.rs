//! Decisions and their outcomes ([`DecisionStore`]).
//!
//! Tables:
//! - `decisions`: decision id (`&str`) → JSON of [`Decision`];
//! - `outcomes`: (decision id, n `u64`) → JSON of [`Outcome`], n = 0, 1, 2, ... in the
//!   order they were stored (outcomes are never removed, so n is also the count before);
//! - `impressions`: (customer id, created at in ms `i64`, decision id) → the shown item
//!   ids joined by `\n` (ids never contain a newline): what rules' frequency caps count,
//!   and the customer's decisions in time order, for `customer_decisions` and
//!   `pseudonymise` (one row per decision: a second index would cost every decision
//!   another insert in a random page). A pseudonymised decision's row has no items: what
//!   a customer was shown is erased with them.
//!
//! Stores written before the impressions became the index have a `customer_decisions`
//! table, (customer id, decision id) → `()`; opening one moves its entries into
//! `impressions` (without items) and drops it ([`migrate_customer_index`]).

use std::ops::Bound;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redb::{ReadableTable, TableDefinition, TableHandle, WriteTransaction};

use super::{db_err, decode, encode, encode_checked, has_table, EmbeddedStore};
use crate::customers::CustomerId;
use crate::decision::{Decision, Impression, Outcome};
use crate::storage::{DecisionStore, StorageError, StorageResult};

pub(super) const DECISIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("decisions");
pub(super) const OUTCOMES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("outcomes");
pub(super) const IMPRESSIONS: TableDefinition<(&str, i64, &str), &str> =
    TableDefinition::new("impressions");

pub(super) fn create_tables(txn: &WriteTransaction) -> StorageResult<()> {
    txn.open_table(DECISIONS).map_err(db_err)?;
    txn.open_table(OUTCOMES).map_err(db_err)?;
    txn.open_table(IMPRESSIONS).map_err(db_err)?;
    migrate_customer_index(txn)
}

/// The customer index of stores written before the impressions became the index:
/// (customer id, decision id) → `()`.
const CUSTOMER_DECISIONS: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("customer_decisions");

/// Moves the entries of an old `customer_decisions` table into `impressions` and drops
/// the table. An entry becomes a row without items unless the decision already has one
/// (stores from before impressions were kept had none; a pseudonymised decision's items
/// were erased). Entries naming a missing decision, or one that is no longer that
/// customer's, are dropped, as readers skipped them; so is one naming a decision that
/// cannot be decoded (logged: `get` still reports it), rather than the store refusing
/// to open. Runs in the transaction that creates the tables, so a crash leaves either
/// both tables as they were or the move done.
fn migrate_customer_index(txn: &WriteTransaction) -> StorageResult<()> {
    if !has_table(txn, CUSTOMER_DECISIONS.name())? {
        return Ok(());
    }
    {
        let index = txn.open_table(CUSTOMER_DECISIONS).map_err(db_err)?;
        let decisions = txn.open_table(DECISIONS).map_err(db_err)?;
        let mut impressions = txn.open_table(IMPRESSIONS).map_err(db_err)?;
        for entry in index.iter().map_err(db_err)? {
            let (key, _) = entry.map_err(db_err)?;
            let (customer, id) = key.value();
            let Some(value) = decisions.get(id).map_err(db_err)? else {
                continue;
            };
            let decision: Decision = match decode("decision", id, value.value()) {
                Ok(decision) => decision,
                Err(e) => {
                    tracing::warn!(error = %e, "Left an undecodable decision out of the customer index");
                    continue;
                }
            };
            if decision.customer_id.as_str() != customer {
                continue;
            }
            let at = decision.created_at.timestamp_millis();
            if impressions
                .get((customer, at, id))
                .map_err(db_err)?
                .is_none()
            {
                impressions.insert((customer, at, id), "").map_err(db_err)?;
            }
        }
    }
    txn.delete_table(CUSTOMER_DECISIONS).map_err(db_err)?;
    tracing::info!("Moved the customer index of decisions into the impressions table");
    Ok(())
}

/// [`DecisionStore`] on the embedded store.
pub struct EmbeddedDecisions {
    store: Arc<EmbeddedStore>,
}

impl EmbeddedDecisions {
    pub fn new(store: Arc<EmbeddedStore>) -> Self {
        EmbeddedDecisions { store }
    }
}

#[async_trait]
impl DecisionStore for EmbeddedDecisions {
    async fn put(&self, decision: &Decision) -> StorageResult<()> {
        let id = decision.id.clone();
        let customer = decision.customer_id.as_str().to_owned();
        let value = encode_checked("decision", decision)?;
        let at = decision.created_at.timestamp_millis();
        let shown = decision
            .items
            .iter()
            .map(|s| s.item.id.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        self.store
            .write_relaxed(move |txn| {
                let mut decisions = txn.open_table(DECISIONS).map_err(db_err)?;
                let mut impressions = txn.open_table(IMPRESSIONS).map_err(db_err)?;
                // A replaced decision may have named another customer or time: move its
                // row. (A stored value that cannot be decoded is simply replaced; readers
                // check every row against the decision it names.)
                let previous = decisions
                    .get(id.as_str())
                    .map_err(db_err)?
                    .and_then(|v| serde_json::from_slice::<Decision>(v.value()).ok());
                if let Some(previous) = previous {
                    impressions
                        .remove((
                            previous.customer_id.as_str(),
                            previous.created_at.timestamp_millis(),
                            id.as_str(),
                        ))
                        .map_err(db_err)?;
                }
                decisions
                    .insert(id.as_str(), value.as_slice())
                    .map_err(db_err)?;
                impressions
                    .insert((customer.as_str(), at, id.as_str()), shown.as_str())
                    .map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn impressions(
        &self,
        customer: &CustomerId,
        since: DateTime<Utc>,
        limit: usize,
    ) -> StorageResult<Vec<Impression>> {
        let since = since.timestamp_millis();
        // On the caller's thread: `limit` bounds the scan (a decision reads at most a
        // thousand), and a hand-off to the blocking pool cost more than the read.
        self.store.read(|txn| {
            let table = txn.open_table(IMPRESSIONS).map_err(db_err)?;
            let mut out = Vec::new();
            let range = table
                .range::<(&str, i64, &str)>((
                    Bound::Included((customer.as_str(), since, "")),
                    Bound::Included((customer.as_str(), i64::MAX, "\u{10ffff}")),
                ))
                .map_err(db_err)?;
            'newest: for entry in range.rev() {
                let (key, value) = entry.map_err(db_err)?;
                let at = DateTime::from_timestamp_millis(key.value().1).ok_or_else(|| {
                    StorageError::Corrupt(format!(
                        "impression of decision {}: time out of range",
                        key.value().2
                    ))
                })?;
                // A row without items (pseudonymised, or moved from the old index)
                // counts nothing.
                for item in value.value().split('\n').filter(|i| !i.is_empty()) {
                    if out.len() == limit {
                        break 'newest;
                    }
                    out.push(Impression {
                        item_id: item.to_owned(),
                        at,
                    });
                }
            }
            Ok(out)
        })
    }

    async fn get(&self, id: &str) -> StorageResult<Option<Decision>> {
        self.store.read(|txn| {
            let decisions = txn.open_table(DECISIONS).map_err(db_err)?;
            match decisions.get(id).map_err(db_err)? {
                Some(value) => decode("decision", id, value.value()).map(Some),
                None => Ok(None),
            }
        })
    }

    async fn put_outcome(&self, outcome: &Outcome) -> StorageResult<Option<u64>> {
        let decision_id = outcome.decision_id.clone();
        let value = encode_checked("outcome", outcome)?;
        self.store
            .write(move |txn| {
                let decisions = txn.open_table(DECISIONS).map_err(db_err)?;
                let mut outcomes = txn.open_table(OUTCOMES).map_err(db_err)?;
                // Check.
                if decisions
                    .get(decision_id.as_str())
                    .map_err(db_err)?
                    .is_none()
                {
                    return Ok(None);
                }
                let id = decision_id.as_str();
                let before = match outcomes
                    .range((id, 0u64)..=(id, u64::MAX))
                    .map_err(db_err)?
                    .next_back()
                {
                    Some(last) => {
                        let (key, _) = last.map_err(db_err)?;
                        key.value().1.checked_add(1).ok_or_else(|| {
                            StorageError::Corrupt(format!("decision {id}: outcome index overflow"))
                        })?
                    }
                    None => 0,
                };
                // Write.
                outcomes
                    .insert((id, before), value.as_slice())
                    .map_err(db_err)?;
                Ok(Some(before))
            })
            .await
    }

    async fn outcomes(&self, decision_id: &str) -> StorageResult<Vec<Outcome>> {
        let id = decision_id.to_owned();
        self.store
            .read_blocking(move |txn| {
                let outcomes = txn.open_table(OUTCOMES).map_err(db_err)?;
                let mut out = Vec::new();
                for entry in outcomes
                    .range((id.as_str(), 0u64)..=(id.as_str(), u64::MAX))
                    .map_err(db_err)?
                {
                    let (key, value) = entry.map_err(db_err)?;
                    let n = key.value().1;
                    out.push(decode("outcome", format_args!("{id}#{n}"), value.value())?);
                }
                Ok(out)
            })
            .await
    }

    async fn scan(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> StorageResult<Vec<(Decision, Vec<Outcome>)>> {
        let after = after.map(str::to_owned);
        self.store
            .read_blocking(move |txn| {
                let decisions = txn.open_table(DECISIONS).map_err(db_err)?;
                let outcomes = txn.open_table(OUTCOMES).map_err(db_err)?;
                let start = match &after {
                    Some(a) => Bound::Excluded(a.as_str()),
                    None => Bound::Unbounded,
                };
                let mut out = Vec::new();
                for entry in decisions
                    .range::<&str>((start, Bound::Unbounded))
                    .map_err(db_err)?
                {
                    if out.len() == limit {
                        break;
                    }
                    let (key, value) = entry.map_err(db_err)?;
                    let id = key.value();
                    let decision: Decision = decode("decision", id, value.value())?;
                    let mut list = Vec::new();
                    for o in outcomes
                        .range((id, 0u64)..=(id, u64::MAX))
                        .map_err(db_err)?
                    {
                        let (k, v) = o.map_err(db_err)?;
                        let n = k.value().1;
                        list.push(decode("outcome", format_args!("{id}#{n}"), v.value())?);
                    }
                    out.push((decision, list));
                }
                Ok(out)
            })
            .await
    }

    async fn customer_decisions(
        &self,
        customer: &CustomerId,
    ) -> StorageResult<Vec<(Decision, Vec<Outcome>)>> {
        let customer = customer.clone();
        self.store
            .read_blocking(move |txn| {
                let index = txn.open_table(IMPRESSIONS).map_err(db_err)?;
                let decisions = txn.open_table(DECISIONS).map_err(db_err)?;
                let outcomes = txn.open_table(OUTCOMES).map_err(db_err)?;
                let mut out = Vec::new();
                for (_, id) in decision_rows(&index, customer.as_str())? {
                    let id = id.as_str();
                    let Some(value) = decisions.get(id).map_err(db_err)? else {
                        continue; // stale index entry
                    };
                    let decision: Decision = decode("decision", id, value.value())?;
                    if decision.customer_id != customer {
                        continue; // stale index entry
                    }
                    let mut list = Vec::new();
                    for o in outcomes
                        .range((id, 0u64)..=(id, u64::MAX))
                        .map_err(db_err)?
                    {
                        let (k, v) = o.map_err(db_err)?;
                        let n = k.value().1;
                        list.push(decode("outcome", format_args!("{id}#{n}"), v.value())?);
                    }
                    out.push((decision, list));
                }
                Ok(out)
            })
            .await
    }

    async fn pseudonymise(&self, customer: &CustomerId, pseudonym: &str) -> StorageResult<u64> {
        let pseudonym = CustomerId::parse("pseudonym", pseudonym)
            .map_err(|e| StorageError::Backend(format!("invalid pseudonym: {e}")))?;
        let customer = customer.clone();
        self.store
            .write(move |txn| {
                let mut decisions = txn.open_table(DECISIONS).map_err(db_err)?;
                let mut outcomes = txn.open_table(OUTCOMES).map_err(db_err)?;
                let mut impressions = txn.open_table(IMPRESSIONS).map_err(db_err)?;

                // Check: collect the rewritten records; any undecodable one fails the call.
                let rows = decision_rows(&impressions, customer.as_str())?;
                let mut new_decisions = Vec::new();
                let mut new_outcomes = Vec::new();
                for (at, id) in &rows {
                    let Some(value) = decisions.get(id.as_str()).map_err(db_err)? else {
                        continue; // stale index entry: dropped below
                    };
                    let mut decision: Decision = decode("decision", id, value.value())?;
                    if decision.customer_id != customer {
                        continue; // stale index entry: dropped below
                    }
                    decision.customer_id = pseudonym.clone();
                    new_decisions.push((*at, id.as_str(), encode("decision", &decision)?));
                    for entry in outcomes
                        .range((id.as_str(), 0u64)..=(id.as_str(), u64::MAX))
                        .map_err(db_err)?
                    {
                        let (key, value) = entry.map_err(db_err)?;
                        let n = key.value().1;
                        let mut outcome: Outcome =
                            decode("outcome", format_args!("{id}#{n}"), value.value())?;
                        if outcome.customer_id == customer {
                            outcome.customer_id = pseudonym.clone();
                            new_outcomes.push((id.as_str(), n, encode("outcome", &outcome)?));
                        }
                    }
                }

                // Write. What the customer was shown is theirs alone: their rows go, and
                // the pseudonym's rows index the decisions without items.
                impressions
                    .retain_in::<(&str, i64, &str), _>(
                        (customer.as_str(), i64::MIN, "")
                            ..=(customer.as_str(), i64::MAX, "\u{10ffff}"),
                        |_, _| false,
                    )
                    .map_err(db_err)?;
                for (at, id, value) in &new_decisions {
                    decisions.insert(*id, value.as_slice()).map_err(db_err)?;
                    impressions
                        .insert((pseudonym.as_str(), *at, *id), "")
                        .map_err(db_err)?;
                }
                for (id, n, value) in &new_outcomes {
                    outcomes
                        .insert((*id, *n), value.as_slice())
                        .map_err(db_err)?;
                }
                Ok(new_decisions.len() as u64)
            })
            .await
    }
}

/// `customer`'s decisions as (created at in ms, decision id), oldest first, from the
/// impressions table (rows may be stale: callers check the decision they name).
fn decision_rows(
    index: &impl ReadableTable<(&'static str, i64, &'static str), &'static str>,
    customer: &str,
) -> StorageResult<Vec<(i64, String)>> {
    let mut rows = Vec::new();
    for entry in index
        .range::<(&str, i64, &str)>((customer, i64::MIN, "")..=(customer, i64::MAX, "\u{10ffff}"))
        .map_err(db_err)?
    {
        let (key, _) = entry.map_err(db_err)?;
        let (_, at, id) = key.value();
        rows.push((at, id.to_owned()));
    }
    Ok(rows)
}
