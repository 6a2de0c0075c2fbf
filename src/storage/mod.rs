//! Storage: one trait per capability, each with its contract, and the backends.
//!
//! Domain code (`decision`, `features`, `segments`, `bandit`, `events`, `experiments`)
//! does I/O only through these traits. Only `storage/<backend>/` knows a concrete store; every backend
//! passes the shared suites in [`conformance`]. [`check_backend`] and [`with_backends`]
//! turn the `backends.*` settings into stores.
//!
//! Common contract for every trait here:
//! - a method that returns `Ok` has made its write durable: it survives `kill -9`
//!   (embedded) or a backend restart (scaled out);
//! - `Err(StorageError::Unavailable)` means the backend could not be reached in time;
//!   callers may degrade; nothing was half-written;
//! - reads see every write whose method has returned;
//! - a write whose caller stopped waiting (its future was dropped) may still take effect:
//!   once submitted, it is as good as written;
//! - bad values (NaN or infinite numbers) are refused with an error, never stored.

pub mod catalog_copy;
pub mod conformance;
pub mod counted_here;
pub mod embedded;
pub mod health;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "redis")]
pub mod redis;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::auth::KeyRecord;
use crate::bandit::linear::LinearStats;
use crate::bandit::ArmStats;
use crate::config::Backends;
use crate::content::ContentItem;
use crate::customers::{Consent, CustomerId};
use crate::decision::{Decision, Impression, Outcome};
use crate::events::{Event, StoredEvent};
use crate::experiments::VariantTotals;
use crate::features::{FeatureKey, FeatureState};
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("backend error: {0}")]
    Backend(String),
}

pub type StorageResult<T> = std::result::Result<T, StorageError>;

/// One sealed (encrypted) value of a profile: AES-256-GCM under the customer's data key,
/// with the customer id and the field name bound as associated data (`privacy` seals and
/// opens; stores keep it as opaque bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedField {
    /// The 96-bit nonce, unique per sealing.
    #[serde(with = "b64")]
    pub nonce: Vec<u8>,
    /// Ciphertext followed by the 128-bit tag.
    #[serde(with = "b64")]
    pub ciphertext: Vec<u8>,
}

/// A profile as stored: PII and sensitive traits only as [`SealedField`]s, never in the
/// clear. `privacy::Profiles` turns it into a [`Customer`](crate::customers::Customer) and back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredProfile {
    pub id: CustomerId,
    /// The traits not marked sensitive: always a JSON object.
    pub traits: serde_json::Map<String, Value>,
    /// Sealed values by field name (`email`, `phone`, `name`, `traits.<name>`).
    #[serde(default)]
    pub sealed: std::collections::BTreeMap<String, SealedField>,
    /// Keyed hash (blind index) of the normalised email: what `find_by_email` looks up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_index: Option<String>,
    #[serde(default)]
    pub consent: Consent,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Customer profiles as stored ([`StoredProfile`]: PII sealed), with the blind index of
/// emails.
#[async_trait]
pub trait ProfileStore: Send + Sync {
    /// `None`: no customer with this id.
    async fn get(&self, id: &CustomerId) -> StorageResult<Option<StoredProfile>>;
    /// [`ProfileStore::get`] of each id, in order: what a batch of events reads. A
    /// backend that can reads them in one snapshot.
    async fn get_many(&self, ids: &[CustomerId]) -> StorageResult<Vec<Option<StoredProfile>>> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.get(id).await?);
        }
        Ok(out)
    }
    /// The stored consent of each id, in order (`None`: no profile): what admitting events
    /// reads, without decoding the rest of the profile. A backend that can reads them in
    /// one snapshot.
    async fn consents(&self, ids: &[CustomerId]) -> StorageResult<Vec<Option<Consent>>> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.get(id).await?.map(|p| p.consent));
        }
        Ok(out)
    }
    /// Inserts or replaces the whole profile. Merging updates is the caller's job. The
    /// email index follows in the same atomic write: the profile's old `email_index`
    /// stops finding it, its new one finds it.
    async fn put(&self, profile: &StoredProfile) -> StorageResult<()>;
    /// Removes the profile and its email index entry. `false`: there was nothing to delete.
    async fn delete(&self, id: &CustomerId) -> StorageResult<bool>;
    /// Profiles in ascending id order, strictly after `after`, at most `limit`.
    async fn list(
        &self,
        after: Option<&CustomerId>,
        limit: usize,
    ) -> StorageResult<Vec<StoredProfile>>;
    async fn count(&self) -> StorageResult<u64>;
    /// The customers whose stored `email_index` is `index`, ascending by id (several
    /// customers may share an email).
    async fn find_by_email(&self, index: &str) -> StorageResult<Vec<CustomerId>>;
}

/// Whose data key a [`WrappedKey`] is: a customer's, a customer's records on the events
/// topic (by the keyed-hash tag the records are keyed by, since a reader of the topic
/// knows nothing else), or one of the engine's own secrets (the blind-index key). They
/// never collide.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyOwner {
    Customer(CustomerId),
    Stream(String),
    System(String),
}

impl KeyOwner {
    /// The owner as one string: `c:<customer id>`, `t:<tag>` or `s:<name>`; also the
    /// associated data that binds a wrapped key to its owner.
    pub fn encode(&self) -> String {
        match self {
            KeyOwner::Customer(id) => format!("c:{id}"),
            KeyOwner::Stream(tag) => format!("t:{tag}"),
            KeyOwner::System(name) => format!("s:{name}"),
        }
    }

    /// The inverse of [`KeyOwner::encode`]; `None` for anything else.
    pub fn decode(raw: &str) -> Option<KeyOwner> {
        if let Some(id) = raw.strip_prefix("c:") {
            return CustomerId::parse("owner", id).ok().map(KeyOwner::Customer);
        }
        if let Some(tag) = raw.strip_prefix("t:") {
            return Some(KeyOwner::Stream(tag.to_owned()));
        }
        raw.strip_prefix("s:")
            .map(|name| KeyOwner::System(name.to_owned()))
    }
}

/// A data key encrypted ("wrapped") with AES-256-GCM under the master key `master_key_id`,
/// the owner and the master key id bound as associated data.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    pub master_key_id: String,
    #[serde(with = "b64")]
    pub nonce: Vec<u8>,
    #[serde(with = "b64")]
    pub ciphertext: Vec<u8>,
    pub created_at: DateTime<Utc>,
}

impl std::fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrappedKey")
            .field("master_key_id", &self.master_key_id)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

/// Data keys (wrapped, never in the clear) per owner, and erasure markers.
///
/// Destroying a customer's key is what makes their sealed fields unreadable everywhere,
/// backups included (crypto-shredding). Erasure markers are keyed by an opaque tag (a
/// keyed hash of the customer id), so the store never lists erased ids in the clear.
#[async_trait]
pub trait DataKeyStore: Send + Sync {
    /// `None`: the owner has no key (never had one, or it was destroyed).
    async fn get(&self, owner: &KeyOwner) -> StorageResult<Option<WrappedKey>>;
    /// [`DataKeyStore::get`] of each owner, in order: what sealing or opening a batch of
    /// the events topic's records reads. A backend over the network reads them together.
    async fn get_many(&self, owners: &[KeyOwner]) -> StorageResult<Vec<Option<WrappedKey>>> {
        let mut out = Vec::with_capacity(owners.len());
        for owner in owners {
            out.push(self.get(owner).await?);
        }
        Ok(out)
    }
    /// Stores `key` unless the owner already has one, atomically, and returns the key the
    /// owner has afterwards: concurrent creators all get the first one stored.
    async fn insert(&self, owner: &KeyOwner, key: &WrappedKey) -> StorageResult<WrappedKey>;
    /// Replaces the owner's key with `new` if it is still exactly `old` (re-wrapping
    /// under another master key); `false` and nothing written otherwise.
    async fn replace(
        &self,
        owner: &KeyOwner,
        old: &WrappedKey,
        new: &WrappedKey,
    ) -> StorageResult<bool>;
    /// Removes the owner's key. `false`: there was none.
    async fn destroy(&self, owner: &KeyOwner) -> StorageResult<bool>;
    /// Keys in ascending order of [`KeyOwner::encode`], strictly after `after`, at most
    /// `limit`.
    async fn list(
        &self,
        after: Option<&KeyOwner>,
        limit: usize,
    ) -> StorageResult<Vec<(KeyOwner, WrappedKey)>>;
    /// Records that the customer behind `tag` was erased at `at` (the last write wins).
    async fn mark_erased(&self, tag: &str, at: DateTime<Utc>) -> StorageResult<()>;
    /// When the customer behind `tag` was erased; `None`: not erased (or re-consented).
    async fn erased_at(&self, tag: &str) -> StorageResult<Option<DateTime<Utc>>>;
    /// [`DataKeyStore::erased_at`] of each tag, in order: what admitting a batch of
    /// events reads. A backend over the network reads them together.
    async fn erased_many(&self, tags: &[String]) -> StorageResult<Vec<Option<DateTime<Utc>>>> {
        let mut out = Vec::with_capacity(tags.len());
        for tag in tags {
            out.push(self.erased_at(tag).await?);
        }
        Ok(out)
    }
    /// Forgets the erasure marker (the customer consented again). `false`: there was none.
    async fn clear_erased(&self, tag: &str) -> StorageResult<bool>;
    /// How far this process has applied the deployment's [`PrivacyJournal`]: the
    /// position of the last entry applied; `None` before the first.
    async fn journal_position(&self) -> StorageResult<Option<String>>;
    /// Records that every entry up to and including `position` was applied.
    async fn set_journal_position(&self, position: &str) -> StorageResult<()>;
}

/// What one entry of the [`PrivacyJournal`] says happened to a customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum PrivacyChange {
    /// Erased at `at`; decisions of theirs are pseudonymised as `pseudonym`.
    Erased { pseudonym: String },
    /// Consented again after an erasure: their writes are accepted again.
    Consented,
}

/// One entry of the [`PrivacyJournal`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivacyEntry {
    pub customer: CustomerId,
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub change: PrivacyChange,
}

/// The erasures (and the consents that lift them) of a deployment whose processes keep
/// stores of their own (profiles, data keys, event logs, decision logs), in one order
/// that every process applies to its own stores. On the shared catalog
/// (`backends.definitions`); a single process has none.
///
/// Contract: an `append` that returns `Ok` is durable in the backend and read by every
/// later `read_after`; `read_after` returns entries in append order, strictly after
/// `after` (from the first when `None`), at most `limit`, each with its position.
#[async_trait]
pub trait PrivacyJournal: Send + Sync {
    /// Appends and returns the entry's position.
    async fn append(&self, entry: &PrivacyEntry) -> StorageResult<String>;
    async fn read_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> StorageResult<Vec<(String, PrivacyEntry)>>;
}

/// Byte strings as standard base64 in JSON.
mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let raw = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(raw)
            .map_err(serde::de::Error::custom)
    }
}

/// What [`EventLog::append`] did with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Newly stored at this sequence number.
    Appended(u64),
    /// An event with the same `event_id` was stored before (or earlier in the batch).
    Duplicate,
}

/// The event log: ordered, idempotent on `event_id`, with committed consumer offsets.
#[async_trait]
pub trait EventLog: Send + Sync {
    /// Appends, in input order, every event whose `event_id` was never stored, all of the
    /// batch atomically. Sequence numbers are strictly increasing across calls. The result
    /// has one entry per input event.
    async fn append(&self, events: &[Event]) -> StorageResult<Vec<AppendOutcome>>;
    /// Events with `seq > after`, ascending by `seq`, at most `limit`.
    async fn scan(&self, after: u64, limit: usize) -> StorageResult<Vec<StoredEvent>>;
    /// One customer's events with `timestamp >= since`, ascending by (timestamp, seq).
    async fn customer_events(
        &self,
        customer: &CustomerId,
        since: DateTime<Utc>,
    ) -> StorageResult<Vec<StoredEvent>>;
    /// For each customer, in order, one count per `(event type, since)` of `windows`, in
    /// order: how many of the customer's events of that type have `timestamp > since`.
    /// What segment conditions count, read without the events themselves.
    async fn count_customer_events(
        &self,
        customers: &[CustomerId],
        windows: &[(String, DateTime<Utc>)],
    ) -> StorageResult<Vec<Vec<u64>>>;
    /// Highest sequence number ever assigned; 0 for an empty log.
    async fn last_seq(&self) -> StorageResult<u64>;
    /// Removes every event of the customer (erasure). Their dedup keys stay, so a replayed
    /// event is still recognised. Returns how many were removed.
    async fn delete_customer(&self, customer: &CustomerId) -> StorageResult<u64>;
    /// Durably records that `consumer` has processed everything up to `seq` (the last
    /// value written wins). Sequence numbers may have gaps (erasure removes events).
    async fn commit_offset(&self, consumer: &str, seq: u64) -> StorageResult<()>;
    /// Last committed offset of `consumer`; 0 when it never committed.
    async fn committed_offset(&self, consumer: &str) -> StorageResult<u64>;
}

/// Online feature state per customer, keyed by feature name and version.
///
/// States are opaque to the store; `features` defines how they merge and evaluate.
#[async_trait]
pub trait FeatureStore: Send + Sync {
    /// One entry per key, in order; `None` where nothing was ever written.
    async fn read(
        &self,
        customer: &CustomerId,
        keys: &[FeatureKey],
    ) -> StorageResult<Vec<Option<FeatureState>>>;
    /// [`FeatureStore::read`] for many customers: one entry per request, in order. A
    /// backend that can reads them in one snapshot or one round trip.
    async fn read_many(
        &self,
        requests: &[(CustomerId, Vec<FeatureKey>)],
    ) -> StorageResult<Vec<Vec<Option<FeatureState>>>> {
        let mut out = Vec::with_capacity(requests.len());
        for (customer, keys) in requests {
            out.push(self.read(customer, keys).await?);
        }
        Ok(out)
    }
    /// Writes all states. A customer's states become visible together; a single-node
    /// backend makes the whole batch atomic, a clustered one (Redis Cluster) each
    /// customer's part. After a failed call some customers' states may be written:
    /// callers replay the batch, and each state's sequence makes that safe.
    async fn write(
        &self,
        updates: Vec<(CustomerId, FeatureKey, FeatureState)>,
    ) -> StorageResult<()>;
    /// Removes every state of the customer.
    async fn delete_customer(&self, customer: &CustomerId) -> StorageResult<()>;
    /// Removes one feature version's state for every customer, and its backfill marks.
    async fn delete_key(&self, key: &FeatureKey) -> StorageResult<()>;
    /// The partitions of the event stream whose history `key`'s states were backfilled
    /// from ([`FeatureStore::mark_backfilled`]), by any worker.
    async fn backfilled_partitions(&self, key: &FeatureKey) -> StorageResult<BTreeSet<i32>>;
    /// Records that `key`'s states now hold partition `partition`'s history: written after
    /// the states, so a worker that reads the mark then reads them.
    async fn mark_backfilled(&self, key: &FeatureKey, partition: i32) -> StorageResult<()>;
}

/// One change of segment membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipChange {
    pub segment: String,
    pub customer: CustomerId,
    pub joined: bool,
}

/// Segment membership: which customers are in which segment, both ways.
#[async_trait]
pub trait SegmentStore: Send + Sync {
    /// Applies the given memberships in order and returns those that changed anything (a
    /// join of a member or a leave of a non-member is not a change). Atomic as a whole on
    /// a single-node backend, per segment on a clustered one; after a failed call a
    /// replay is safe (applying a membership twice changes nothing the second time).
    async fn apply(&self, changes: &[MembershipChange]) -> StorageResult<Vec<MembershipChange>>;
    async fn contains(&self, segment: &str, customer: &CustomerId) -> StorageResult<bool>;
    async fn size(&self, segment: &str) -> StorageResult<u64>;
    /// Members in ascending id order strictly after `after`, at most `limit`.
    async fn members(
        &self,
        segment: &str,
        after: Option<&CustomerId>,
        limit: usize,
    ) -> StorageResult<Vec<CustomerId>>;
    /// The customer's segments, sorted by name.
    async fn segments_of(&self, customer: &CustomerId) -> StorageResult<Vec<String>>;
    /// [`SegmentStore::segments_of`] of each customer, in order. A backend that can
    /// reads them in one snapshot.
    async fn segments_of_many(&self, customers: &[CustomerId]) -> StorageResult<Vec<Vec<String>>> {
        let mut out = Vec::with_capacity(customers.len());
        for customer in customers {
            out.push(self.segments_of(customer).await?);
        }
        Ok(out)
    }
    /// Drops the segment and all its memberships.
    async fn clear(&self, segment: &str) -> StorageResult<()>;
    /// Removes the customer from every segment, returning the leaves.
    async fn remove_customer(&self, customer: &CustomerId) -> StorageResult<Vec<MembershipChange>>;
}

/// The content catalog.
#[async_trait]
pub trait ContentStore: Send + Sync {
    async fn upsert(&self, item: &ContentItem) -> StorageResult<()>;
    async fn get(&self, id: &str) -> StorageResult<Option<ContentItem>>;
    /// Several items, one entry per id in order.
    async fn get_many(&self, ids: &[String]) -> StorageResult<Vec<Option<ContentItem>>>;
    /// Every item, in ascending id order.
    async fn list(&self) -> StorageResult<Vec<ContentItem>>;
    async fn delete(&self, id: &str) -> StorageResult<bool>;
}

/// Decisions and their outcomes.
#[async_trait]
pub trait DecisionStore: Send + Sync {
    async fn put(&self, decision: &Decision) -> StorageResult<()>;
    /// `None`: no decision with this id.
    async fn get(&self, id: &str) -> StorageResult<Option<Decision>>;
    /// Stores an outcome of an existing decision; returns how many outcomes that decision
    /// had before this one. Returns `Ok(None)` and stores nothing if the decision is unknown.
    async fn put_outcome(&self, outcome: &Outcome) -> StorageResult<Option<u64>>;
    /// The outcomes of one decision, in the order they were stored.
    async fn outcomes(&self, decision_id: &str) -> StorageResult<Vec<Outcome>>;
    /// The items shown to `customer` (each decision's `items`) by decisions created at or
    /// after `since`, newest first, at most `limit`: what frequency caps count.
    async fn impressions(
        &self,
        customer: &CustomerId,
        since: DateTime<Utc>,
        limit: usize,
    ) -> StorageResult<Vec<Impression>>;
    /// Decisions with ids strictly after `after` (all when `None`), in ascending id order,
    /// at most `limit`, each with its outcomes in the order they were stored: the
    /// decision log for training. Ids are UUIDv7, so for decisions made by Tailor this is
    /// creation order; readers that need time order sort by `created_at`.
    async fn scan(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> StorageResult<Vec<(Decision, Vec<Outcome>)>>;
    /// The customer's decisions, each with its outcomes in the order they were stored,
    /// in ascending id order (what an export of the customer's data returns).
    async fn customer_decisions(
        &self,
        customer: &CustomerId,
    ) -> StorageResult<Vec<(Decision, Vec<Outcome>)>>;
    /// Replaces the customer id on their decisions and outcomes with `pseudonym`
    /// (erasure keeps aggregate history) and deletes their impressions. Returns how many
    /// decisions were changed.
    async fn pseudonymise(&self, customer: &CustomerId, pseudonym: &str) -> StorageResult<u64>;
}

/// Bandit sufficient statistics per (placement, arm): additive, so concurrent updates
/// from many replicas merge by addition.
#[async_trait]
pub trait BanditStore: Send + Sync {
    /// Adds `delta` to the arm's statistics atomically (see [`BanditStore::flush`]).
    async fn add(&self, placement: &str, arm: &str, delta: ArmStats) -> StorageResult<()>;
    /// One entry per arm, in order; never-seen arms read as zero.
    async fn get(&self, placement: &str, arms: &[String]) -> StorageResult<Vec<ArmStats>>;
    /// Adds `delta` to the arm's linear-model statistics of its dimension, atomically.
    /// Refuses invalid statistics (lengths that do not fit `dims`, non-finite numbers).
    async fn add_linear(
        &self,
        placement: &str,
        arm: &str,
        delta: &LinearStats,
    ) -> StorageResult<()>;
    /// One entry per arm, in order, of dimension `dims`; never-seen arms (or arms only
    /// seen with another dimension) read as [`LinearStats::zero`].
    async fn get_linear(
        &self,
        placement: &str,
        arms: &[String],
        dims: usize,
    ) -> StorageResult<Vec<LinearStats>>;
    /// Writes what the adds before it hold in memory, on a store that writes behind
    /// (Redis: reads see an add once flushed, and one that failed for an outage is kept
    /// and written exactly once by a later flush). The embedded store writes at once.
    async fn flush(&self) -> StorageResult<()> {
        Ok(())
    }
}

/// Experiment counters per (experiment key, variant key): additive sufficient statistics,
/// so concurrent updates from many replicas merge by addition.
#[async_trait]
pub trait ExperimentStore: Send + Sync {
    /// Adds every delta to its (experiment, variant) totals, all in one atomic write (a
    /// pair named twice gets both). Refuses non-finite values, storing nothing.
    async fn add(&self, deltas: &[(String, String, VariantTotals)]) -> StorageResult<()>;
    /// The totals of every variant of `experiment` ever added to, ascending by variant
    /// key; variants never added to are absent (they read as zero).
    async fn totals(&self, experiment: &str) -> StorageResult<Vec<(String, VariantTotals)>>;
}

/// Experiment totals that each process of a deployment counts in its own store and
/// publishes whole (the absolute totals, not a delta), so that a publication repeated
/// after a timeout or an outage counts once ([`counted_here`]). On the shared catalog.
#[async_trait]
pub trait PublishedTotals: Send + Sync {
    /// Sets `process`'s totals of each (experiment, variant) to the value given.
    async fn publish(
        &self,
        process: &str,
        totals: &[(String, String, VariantTotals)],
    ) -> StorageResult<()>;
    /// The totals of every variant of `experiment`, summed over every process but
    /// `process` (and over what [`ExperimentStore::add`] added to the same store),
    /// ascending by variant key.
    async fn totals_except(
        &self,
        experiment: &str,
        process: &str,
    ) -> StorageResult<Vec<(String, VariantTotals)>>;
}

/// The kinds of definition the engine keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefinitionKind {
    Segment,
    Feature,
    Experiment,
    Rule,
    Model,
    /// The activation history of a feature: one version per (de)activation, with reason.
    FeatureActivation,
    /// This process's saved copy of a shared catalog ([`catalog_copy`]); only ever in the
    /// local embedded store.
    CatalogCopy,
    /// This process's own records (its id in shared stores); only ever in the local
    /// embedded store.
    Process,
}

impl DefinitionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DefinitionKind::Segment => "segment",
            DefinitionKind::Feature => "feature",
            DefinitionKind::Experiment => "experiment",
            DefinitionKind::Rule => "rule",
            DefinitionKind::Model => "model",
            DefinitionKind::FeatureActivation => "feature_activation",
            DefinitionKind::CatalogCopy => "catalog_copy",
            DefinitionKind::Process => "process",
        }
    }
}

/// One stored version of a definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Definition {
    pub kind: DefinitionKind,
    pub name: String,
    /// 1 for the first version, n+1 for each later put.
    pub version: u32,
    pub body: Value,
    pub created_at: DateTime<Utc>,
}

/// Versioned definitions (segments, features, experiments, rules, models), plus one
/// "active version" pointer per (kind, name).
#[async_trait]
pub trait DefinitionStore: Send + Sync {
    /// Stores `body` as the next version of (kind, name) and returns that version number.
    /// Version numbers are never reused, even after `delete`.
    async fn put(&self, kind: DefinitionKind, name: &str, body: Value) -> StorageResult<u32>;
    /// Stores `body` as version 1 of (kind, name) if the name never had a version (not even
    /// one deleted since), atomically: of processes racing to create it, one gets `true`.
    async fn put_first(&self, kind: DefinitionKind, name: &str, body: Value)
        -> StorageResult<bool>;
    /// A given version, or the latest when `version` is `None`.
    async fn get(
        &self,
        kind: DefinitionKind,
        name: &str,
        version: Option<u32>,
    ) -> StorageResult<Option<Definition>>;
    /// Every version of (kind, name), ascending.
    async fn versions(&self, kind: DefinitionKind, name: &str) -> StorageResult<Vec<Definition>>;
    /// The latest version of every live (not deleted) name of this kind, sorted by name.
    async fn list(&self, kind: DefinitionKind) -> StorageResult<Vec<Definition>>;
    /// Deletes every version and the active pointer. `false` if there was nothing.
    async fn delete(&self, kind: DefinitionKind, name: &str) -> StorageResult<bool>;
    /// Points (kind, name) at `version`, which must exist (else `Ok(false)`).
    async fn set_active(
        &self,
        kind: DefinitionKind,
        name: &str,
        version: u32,
    ) -> StorageResult<bool>;
    /// The active version, `None` if never set.
    async fn active(&self, kind: DefinitionKind, name: &str) -> StorageResult<Option<u32>>;
}

/// API keys (hashes only: a [`KeyRecord`] holds no secret), by their public id.
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Stores a new key. `false`: a key with this id exists (nothing was written).
    async fn insert(&self, key: &KeyRecord) -> StorageResult<bool>;
    /// `None`: no key with this id.
    async fn get(&self, id: &str) -> StorageResult<Option<KeyRecord>>;
    /// Every key, revoked ones included, ascending by id.
    async fn list(&self) -> StorageResult<Vec<KeyRecord>>;
    /// Sets `revoked_at` to `at` unless it is already set (the first revocation time
    /// stays), atomically, and returns the record as stored; `None`: no such key.
    async fn revoke(&self, id: &str, at: DateTime<Utc>) -> StorageResult<Option<KeyRecord>>;
}

/// Every capability, each on the backend the configuration chose.
#[derive(Clone)]
pub struct Stores {
    pub profiles: Arc<dyn ProfileStore>,
    pub data_keys: Arc<dyn DataKeyStore>,
    pub events: Arc<dyn EventLog>,
    pub features: Arc<dyn FeatureStore>,
    pub segments: Arc<dyn SegmentStore>,
    pub content: Arc<dyn ContentStore>,
    pub decisions: Arc<dyn DecisionStore>,
    pub bandit: Arc<dyn BanditStore>,
    pub definitions: Arc<dyn DefinitionStore>,
    pub experiments: Arc<dyn ExperimentStore>,
    pub keys: Arc<dyn KeyStore>,
    /// The scaled-out backends these stores reach over the network, for metrics (none
    /// for the embedded store).
    pub health: Vec<health::BackendHealth>,
    /// The local copy of the shared catalog that `content` and `definitions` fall back
    /// to while their backend is unreachable; `None` when they are the embedded store.
    pub catalog_copy: Option<Arc<catalog_copy::CatalogCopy>>,
    /// The deployment's erasures, when its processes share a catalog
    /// (`backends.definitions` is not embedded); `None` for one process.
    pub journal: Option<Arc<dyn PrivacyJournal>>,
    /// With a shared catalog, `experiments` counts in this process's store and this
    /// publishes its totals there; `None` for one process.
    pub counted_here: Option<Arc<counted_here::CountedHere>>,
    /// Which of these every process of the deployment shares.
    pub shared: Shared,
    /// The event ids read by every worker, kept beside shared features; `None` where
    /// features are this process's own (one worker's log is its dedup).
    pub claims: Option<Arc<dyn EventClaims>>,
}

/// Which capabilities live on a backend that every process of the deployment shares: a
/// change one process made there, the others must not make again (an erasure applied
/// from the privacy journal touches only the stores a process keeps for itself).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shared {
    /// Profiles, their data keys and the erasure markers (`backends.profiles`).
    pub profiles: bool,
    pub features: bool,
    pub segments: bool,
}

/// The event ids the workers of a deployment read from the stream, with the position each
/// was first read at, shared so that a second copy of an event (a client's retry through
/// another API replica, an outbox batch sent again) is recognised by whichever worker it
/// reaches: each worker's own log recognises only the copies it received itself, and a
/// rebalance between two copies hands the second to another worker.
#[async_trait]
pub trait EventClaims: Send + Sync {
    /// For each event, in order: `true` when its id was first read at another stream
    /// position within `window` (a copy, to drop); `false` when this is the first
    /// position it is read at (recorded now and kept for `window`), or that same position
    /// again (a redelivery, which the feature states' positions recognise). Events
    /// without a stream position are never copies.
    async fn copies(&self, events: &[Event], window: Duration) -> StorageResult<Vec<bool>>;
}

/// Where a stream consumer hands the events it received. `apply` returns once they are
/// appended to the local event log (idempotently on `event_id`: an event delivered twice
/// is stored and applied once) and applied to features and segment membership, so that
/// the consumer may then commit its position.
#[async_trait]
pub trait EventSink: Send + Sync {
    async fn apply(&self, events: &[Event]) -> crate::error::Result<()>;
}

/// The event stream of a scaled-out deployment (`backends.events = "kafka://…"`):
/// ingested events, decisions and outcomes go out to a broker, and workers consume the
/// events into their local log.
///
/// Contract:
/// - an append to [`EventStream::outbox`] that returns `Ok` is the acknowledgement point:
///   the event is on local disk and will be delivered to the broker at least once, even
///   across broker outages and restarts of this process, first deliveries in append
///   order per customer (a batch that failed part-way is sent again whole, so a record
///   may arrive twice, its second copy after its successors);
/// - the consumer commits its position in the stream only after the sink has applied the
///   events, so a crash redelivers and never skips;
/// - decisions and outcomes are delivered the same way through their own outboxes.
#[async_trait]
pub trait EventStream: Send + Sync {
    /// The durable local outbox of ingested events.
    fn outbox(&self) -> Arc<dyn EventLog>;
    /// Tells the events forwarder that the outbox has new events (it also polls).
    fn forward(&self);
    /// Queues a decision event for its topic (a durable local write).
    async fn publish_decision(&self, decision: &Decision) -> StorageResult<()>;
    /// Queues an outcome for its topic (a durable local write).
    async fn publish_outcome(&self, outcome: &Outcome) -> StorageResult<()>;
    /// Starts the forwarders that deliver the outboxes to the broker; they stop with
    /// `shutdown`.
    fn spawn_forwarders(
        self: Arc<Self>,
        metrics: Arc<Metrics>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>>;
    /// Starts the consumer of the events topic (a member of the workers' group) that
    /// hands every batch to `sink` and then commits; it stops with `shutdown`.
    fn spawn_consumer(
        self: Arc<Self>,
        sink: Arc<dyn EventSink>,
        metrics: Arc<Metrics>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()>;
    /// Waits for what the producer still holds to be delivered, at most `timeout`.
    async fn flush(&self, timeout: Duration);
    /// How long workers remember an event id for one another ([`EventClaims`]); zero
    /// when they do not.
    fn dedup_window(&self) -> Duration;
    /// The partitions of the events topic this process's consumer holds now (none before
    /// it joined the workers' group, or in a process without one).
    fn assigned_partitions(&self) -> BTreeSet<i32>;
    /// Reads partition `partition` of the events topic from its first retained record to
    /// its end as of the call: the events a new feature version is backfilled from. Each
    /// carries its stream position; copies of an event read within the dedup window of
    /// its first record are left out, as [`EventClaims`] leaves them out of the live
    /// stream, and records that are not events are skipped.
    async fn replay(&self, partition: i32) -> StorageResult<Replay>;
    /// How many partitions the events topic has now.
    async fn partitions(&self) -> StorageResult<i32>;
    /// Seals the events topic's records with `seal` from now on (records already on the
    /// topic in the clear are still read). Called once, before the background tasks
    /// start, by a process whose data keys every process of the deployment shares.
    fn seal_with(&self, seal: Arc<dyn RecordSeal>);
}

/// The events topic's records sealed per customer, so that erasing a customer makes
/// their records unreadable on the broker (crypto-shredding) long before its retention
/// drops them, and the broker holds no customer id or event in the clear.
///
/// A sealed record's value starts with the byte [`SEALED_RECORD`] (an event's JSON never
/// does); its key is an opaque tag of the customer, the same for all of their records.
#[async_trait]
pub trait RecordSeal: Send + Sync {
    /// The record of each event, in order; `None` for an event whose customer is erased
    /// (it is not sent: erasure covers what was accepted before it and not yet sent).
    async fn seal(&self, events: &[&Event]) -> StorageResult<Vec<Option<SealedRecord>>>;
    /// Opens each sealed record (key and value as read from the topic), in order. `Err`
    /// only when the keys cannot be read now: the caller retries.
    async fn open(&self, records: &[(&[u8], &[u8])]) -> StorageResult<Vec<Opened>>;
}

/// The first byte of a sealed record's value.
pub const SEALED_RECORD: u8 = 0;

/// One event sealed for the events topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedRecord {
    /// The record key: the customer's opaque tag.
    pub key: String,
    pub value: Vec<u8>,
}

/// What a sealed record turned out to be.
#[derive(Debug, Clone)]
pub enum Opened {
    Event(Event),
    /// Its customer was erased: the key it was sealed under is destroyed.
    Shredded,
    /// Not a record this engine sealed (altered, truncated, keyed by another tag).
    Malformed(String),
}

/// A partition's history being read ([`EventStream::replay`]).
pub struct Replay {
    /// The offset of the first record the topic still holds: records before it were
    /// dropped by the topic's retention.
    pub first: i64,
    /// The partition's end when the replay began: the offset after the last record it
    /// reads.
    pub end: i64,
    /// The events in offset order, a page at a time; an error ends the replay.
    pub pages: tokio::sync::mpsc::Receiver<StorageResult<Vec<Event>>>,
}

/// The event stream `backends.events` names, if it names one; its outboxes live under
/// `data_dir`. The value is assumed checked by [`check_backend`].
pub async fn open_event_stream(
    backends: &Backends,
    data_dir: &std::path::Path,
) -> anyhow::Result<Option<Arc<dyn EventStream>>> {
    #[cfg(feature = "kafka")]
    if kafka::config::is_kafka_url(&backends.events) {
        let config = kafka::KafkaConfig::parse(&backends.events)
            .map_err(|e| anyhow::anyhow!("backends.events: {e}"))?;
        let stream = kafka::KafkaStream::open(config, data_dir)
            .await
            .map_err(|e| anyhow::anyhow!("backends.events: {e:#}"))?;
        return Ok(Some(stream));
    }
    let _ = (backends, data_dir);
    Ok(None)
}

/// Capabilities that a Redis URL may serve.
#[cfg(feature = "redis")]
const REDIS_CAPABILITIES: [&str; 6] = [
    "profiles",
    "features",
    "segments",
    "bandit",
    "decisions",
    "definitions",
];

/// Whether this build can serve `capability` (a `backends.*` key) from `value`; the
/// error says why not, without echoing secrets.
pub fn check_backend(capability: &str, value: &str, timeout: Duration) -> Result<(), String> {
    if value == "embedded" {
        return Ok(());
    }
    #[cfg(feature = "redis")]
    if redis::config::is_redis_url(value) && REDIS_CAPABILITIES.contains(&capability) {
        return redis::RedisConfig::parse(value, timeout).map(|_| ());
    }
    #[cfg(feature = "kafka")]
    if kafka::config::is_kafka_url(value) && capability == "events" {
        return kafka::KafkaConfig::parse(value).map(|_| ());
    }
    let _ = (capability, timeout);
    Err(format!(
        "'{value}' is not available in this build (only \"embedded\"; \
         scaled-out backends come with their cargo features)"
    ))
}

/// The API keys of `backends.definitions` when it is not the embedded store (`None`
/// then), connected within `timeout`: how the CLI manages the keys every replica shares.
pub async fn shared_key_store(
    backends: &Backends,
    timeout: Duration,
    breaker: &crate::config::BreakerSettings,
) -> anyhow::Result<Option<Arc<dyn KeyStore>>> {
    #[cfg(feature = "redis")]
    if redis::config::is_redis_url(&backends.definitions) {
        use anyhow::Context as _;

        let mut config = redis::RedisConfig::parse(&backends.definitions, timeout)
            .map_err(|e| anyhow::anyhow!("backends.definitions: {e}"))?;
        config.breaker = breaker.clone();
        let store = redis::RedisStore::connect(&config)
            .await
            .context("Failed to connect backends.definitions")?;
        return Ok(Some(Arc::new(store.keys())));
    }
    let _ = (backends, timeout, breaker);
    Ok(None)
}

/// `stores` (the embedded ones) with each capability that `backends` puts elsewhere
/// replaced by that backend, each connection behind a circuit breaker set by `breaker`
/// and every call under `timeout`. A backend that cannot be reached now is no error: its
/// calls fail (fast, once the breaker opens) until it answers, and the shared catalog
/// (`backends.definitions`) is read from this process's local copy meanwhile
/// ([`catalog_copy`]). Capabilities that name the same location share one
/// connection (and its breaker), listed once in [`Stores::health`]. Values are assumed
/// checked by [`check_backend`].
pub async fn with_backends(
    stores: Stores,
    backends: &Backends,
    timeout: Duration,
    breaker: &crate::config::BreakerSettings,
) -> anyhow::Result<Stores> {
    #[cfg(feature = "redis")]
    {
        use anyhow::Context as _;

        let mut stores = stores;
        // In the order of REDIS_CAPABILITIES, so `serves` labels are stable.
        let mut connected: Vec<(String, Arc<redis::RedisStore>, Vec<&str>)> = Vec::new();
        for capability in REDIS_CAPABILITIES {
            let value = match capability {
                "profiles" => &backends.profiles,
                "features" => &backends.features,
                "segments" => &backends.segments,
                "bandit" => &backends.bandit,
                "decisions" => &backends.decisions,
                _ => &backends.definitions,
            };
            if !redis::config::is_redis_url(value) {
                continue;
            }
            let store = match connected.iter_mut().find(|(v, _, _)| v == value) {
                Some((_, store, serves)) => {
                    serves.push(capability);
                    store.clone()
                }
                None => {
                    let mut config = redis::RedisConfig::parse(value, timeout)
                        .map_err(|e| anyhow::anyhow!("backends.{capability}: {e}"))?;
                    config.breaker = breaker.clone();
                    let store = redis::RedisStore::open(&config)
                        .await
                        .with_context(|| format!("Failed to open backends.{capability}"))?;
                    connected.push((value.clone(), store.clone(), vec![capability]));
                    store
                }
            };
            match capability {
                "profiles" => {
                    stores.profiles = Arc::new(store.profiles());
                    stores.data_keys = Arc::new(store.data_keys(stores.data_keys.clone()));
                    stores.shared.profiles = true;
                }
                "features" => {
                    stores.features = Arc::new(store.features());
                    stores.claims = Some(Arc::new(store.claims()));
                    stores.shared.features = true;
                }
                "segments" => {
                    stores.segments = Arc::new(store.segments());
                    stores.shared.segments = true;
                }
                "bandit" => stores.bandit = Arc::new(store.bandit()),
                "decisions" => {
                    stores.decisions = Arc::new(store.decisions(stores.decisions.clone()));
                }
                _ => {
                    // `stores.definitions` and `stores.experiments` are still the local
                    // embedded store here.
                    let local_definitions = stores.definitions.clone();
                    let copy = catalog_copy::CatalogCopy::open(local_definitions.clone(), value)
                        .await
                        .context("Failed to read the local copy of the shared catalog")?;
                    stores.content = Arc::new(catalog_copy::CopiedContent::new(
                        Arc::new(store.content()),
                        copy.clone(),
                    ));
                    stores.definitions = Arc::new(catalog_copy::CopiedDefinitions::new(
                        Arc::new(store.definitions()),
                        copy.clone(),
                    ));
                    stores.catalog_copy = Some(copy);
                    let counted = counted_here::CountedHere::open(
                        stores.experiments.clone(),
                        local_definitions.clone(),
                        Arc::new(store.experiments()),
                    )
                    .await
                    .context("Failed to open this process's experiment totals")?;
                    stores.experiments = counted.clone();
                    stores.counted_here = Some(counted);
                    stores.keys = Arc::new(store.keys());
                    stores.journal = Some(Arc::new(store.journal()));
                }
            }
        }
        stores
            .health
            .extend(
                connected
                    .into_iter()
                    .map(|(_, store, serves)| health::BackendHealth {
                        backend: "redis",
                        serves: serves.join(","),
                        breaker: store.breaker_stats(),
                    }),
            );
        Ok(stores)
    }
    #[cfg(not(feature = "redis"))]
    {
        let _ = (backends, timeout, breaker);
        Ok(stores)
    }
}
