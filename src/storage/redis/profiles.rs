//! Customer profiles ([`ProfileStore`]) and their data keys and erasure markers
//! ([`DataKeyStore`]), shared by every process of a deployment
//! (`backends.profiles = "redis://…"`), so that a profile written on one API replica is
//! read, decrypted, by all of them and by the workers.
//!
//! Keys:
//! - `profile:{<customer id>}`: a string, the JSON of [`Record`] (the [`StoredProfile`] and
//!   its email-index entry), in the customer's slot beside their features;
//! - `profile_ids:{profiles}`: a sorted set of every profile's id, all with score 0, so
//!   they page in id order (`ZRANGEBYLEX`) and `ZCARD` counts them;
//! - `profile_email:{<blind index>}`: a set of entries `<customer id>\n<entry>`, one per
//!   stored profile with that email index, where `<entry>` is unique to the write that
//!   stored it;
//! - `data_key:{<owner>}`: a string, the JSON of the [`WrappedKey`] of
//!   [`KeyOwner::encode`]`(owner)`; `data_key_owners:{data_keys}`: a sorted set of the
//!   encoded owners, for `list`;
//! - `erased:{<tag>}`: a string, when the customer behind the erasure tag was erased
//!   (milliseconds since the epoch, as the embedded store keeps it).
//!
//! The position of this process in the privacy journal is its own, not shared: it stays
//! in the local keyring that [`RedisDataKeys`] wraps.
//!
//! Atomicity: a record and its index entries live in different slots, so a write is
//! several commands, ordered so that nothing stored is ever missed:
//! - a put adds the profile's id and email entry before it stores the record, and adds
//!   the id again after (so a concurrent delete's removal cannot hide it); it then
//!   removes the email entry of the record it replaced, which no other record uses
//!   (entries are unique per write);
//! - a delete removes the record first, then its id and entry, and puts the id back if a
//!   concurrent put stored the record again meanwhile.
//!
//! Reads therefore check what an index gives against the records: an id listed without
//! its record (a write cut short) is skipped, and an email entry counts only when the
//! customer's stored record still has that index. A write cut short by an outage may
//! leave such a stale entry behind (never a missing one); `count` then includes it until
//! the customer's next write.

use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::try_join_all;
use redis::Script;
use serde::{Deserialize, Serialize};

use super::RedisStore;
use crate::customers::{Consent, CustomerId};
use crate::storage::{
    DataKeyStore, KeyOwner, ProfileStore, StorageError, StorageResult, StoredProfile, WrappedKey,
};

/// How many records reads have in flight at once.
const READS_IN_FLIGHT: usize = 64;

/// Hash tag of the id index: one slot (one node of a cluster) holds it whole.
const IDS_TAG: &str = "profiles";

/// Hash tag of the owner index of data keys.
const OWNERS_TAG: &str = "data_keys";

/// A profile as kept in Redis: the profile and the email-index entry of this write.
#[derive(Serialize, Deserialize)]
struct Record {
    profile: StoredProfile,
    /// Unique per write (a UUIDv7): the member of `profile_email:{index}` is
    /// `<id>\n<entry>`.
    entry: String,
}

/// The consent of a stored [`Record`], decoded without the rest of the profile.
#[derive(Deserialize)]
struct ConsentOnly {
    profile: ConsentOfProfile,
}

#[derive(Deserialize)]
struct ConsentOfProfile {
    #[serde(default)]
    consent: Consent,
}

fn encode<T: Serialize>(what: &str, value: &T) -> StorageResult<String> {
    serde_json::to_string(value).map_err(|e| StorageError::Backend(format!("encoding {what}: {e}")))
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, raw: &str) -> StorageResult<T> {
    serde_json::from_str(raw).map_err(|e| StorageError::Corrupt(format!("{what}: {e}")))
}

/// The email-index member of `record`: `<id>\n<entry>` (ids have no control characters).
fn email_member(id: &CustomerId, entry: &str) -> String {
    format!("{id}\n{entry}")
}

/// The lower bound of `ZRANGEBYLEX` strictly after `after` (from the start with `None`).
fn after_bound(after: Option<&str>) -> String {
    after.map_or_else(|| "-".to_owned(), |a| format!("({a}"))
}

/// Reads `keys` (string values) with [`READS_IN_FLIGHT`] in flight at a time, in order.
async fn read_all(
    store: &RedisStore,
    what: &'static str,
    keys: Vec<String>,
) -> StorageResult<Vec<Option<String>>> {
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(READS_IN_FLIGHT) {
        out.extend(
            try_join_all(chunk.iter().map(|key| {
                store.call(what, move |mut c| async move {
                    redis::cmd("GET").arg(key).query_async(&mut c).await
                })
            }))
            .await?,
        );
    }
    Ok(out)
}

/// Removes `member` from the sorted set `index` after its record `record` was deleted,
/// and adds it back if a concurrent write stored the record again meanwhile.
async fn unlist(
    store: &RedisStore,
    what: &str,
    index: &str,
    member: &str,
    record: &str,
) -> StorageResult<()> {
    store
        .call(what, |mut c| async move {
            redis::cmd("ZREM")
                .arg(index)
                .arg(member)
                .query_async::<()>(&mut c)
                .await
        })
        .await?;
    let stored_again: bool = store
        .call(what, |mut c| async move {
            redis::cmd("EXISTS").arg(record).query_async(&mut c).await
        })
        .await?;
    if stored_again {
        list(store, what, index, member).await?;
    }
    Ok(())
}

/// Adds `member` to the sorted set `index` (score 0: byte order).
async fn list(store: &RedisStore, what: &str, index: &str, member: &str) -> StorageResult<()> {
    store
        .call(what, |mut c| async move {
            redis::cmd("ZADD")
                .arg(index)
                .arg(0)
                .arg(member)
                .query_async::<()>(&mut c)
                .await
        })
        .await
}

/// A page of at most `limit` members of the sorted set `index` strictly after `after`.
async fn page(
    store: &RedisStore,
    what: &str,
    index: &str,
    after: Option<&str>,
    limit: usize,
) -> StorageResult<Vec<String>> {
    let lower = after_bound(after);
    store
        .call(what, |mut c| async move {
            redis::cmd("ZRANGEBYLEX")
                .arg(index)
                .arg(lower)
                .arg("+")
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query_async(&mut c)
                .await
        })
        .await
}

// ---------------------------------------------------------------------------------------
// Profiles
// ---------------------------------------------------------------------------------------

/// [`ProfileStore`] on Redis.
pub struct RedisProfiles {
    store: Arc<RedisStore>,
}

impl RedisProfiles {
    pub fn new(store: Arc<RedisStore>) -> Self {
        RedisProfiles { store }
    }

    fn record_key(&self, id: &str) -> String {
        self.store.key("profile", id)
    }

    fn ids_key(&self) -> String {
        self.store.key("profile_ids", IDS_TAG)
    }

    fn email_key(&self, index: &str) -> String {
        self.store.key("profile_email", index)
    }

    async fn record(&self, id: &CustomerId) -> StorageResult<Option<Record>> {
        let key = self.record_key(id.as_str());
        let raw: Option<String> = self
            .store
            .call("read a profile", |mut c| async move {
                redis::cmd("GET").arg(key).query_async(&mut c).await
            })
            .await?;
        raw.map(|raw| decode(&format!("profile {id}"), &raw))
            .transpose()
    }

    /// The stored profiles of `ids`, in order (`None`: no record).
    async fn profiles(&self, ids: &[CustomerId]) -> StorageResult<Vec<Option<StoredProfile>>> {
        let keys = ids.iter().map(|id| self.record_key(id.as_str())).collect();
        let raw = read_all(&self.store, "read profiles", keys).await?;
        ids.iter()
            .zip(raw)
            .map(|(id, raw)| {
                raw.map(|raw| decode::<Record>(&format!("profile {id}"), &raw).map(|r| r.profile))
                    .transpose()
            })
            .collect()
    }
}

#[async_trait]
impl ProfileStore for RedisProfiles {
    async fn get(&self, id: &CustomerId) -> StorageResult<Option<StoredProfile>> {
        Ok(self.record(id).await?.map(|r| r.profile))
    }

    async fn get_many(&self, ids: &[CustomerId]) -> StorageResult<Vec<Option<StoredProfile>>> {
        self.profiles(ids).await
    }

    async fn consents(&self, ids: &[CustomerId]) -> StorageResult<Vec<Option<Consent>>> {
        let keys = ids.iter().map(|id| self.record_key(id.as_str())).collect();
        let raw = read_all(&self.store, "read consents", keys).await?;
        ids.iter()
            .zip(raw)
            .map(|(id, raw)| {
                raw.map(|raw| {
                    decode::<ConsentOnly>(&format!("profile {id}"), &raw).map(|r| r.profile.consent)
                })
                .transpose()
            })
            .collect()
    }

    async fn put(&self, profile: &StoredProfile) -> StorageResult<()> {
        let id = &profile.id;
        let old = self.record(id).await?;
        let record = Record {
            profile: profile.clone(),
            entry: uuid::Uuid::now_v7().to_string(),
        };
        let value = encode("profile", &record)?;
        let (ids, key) = (self.ids_key(), self.record_key(id.as_str()));
        list(&self.store, "store a profile", &ids, id.as_str()).await?;
        if let Some(index) = &profile.email_index {
            let (set, member) = (self.email_key(index), email_member(id, &record.entry));
            self.store
                .call("store a profile", |mut c| async move {
                    redis::cmd("SADD")
                        .arg(set)
                        .arg(member)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await?;
        }
        self.store
            .call("store a profile", |mut c| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await?;
        list(&self.store, "store a profile", &ids, id.as_str()).await?;
        if let Some(old) = old {
            self.drop_email_entry(&old).await?;
        }
        Ok(())
    }

    async fn delete(&self, id: &CustomerId) -> StorageResult<bool> {
        let Some(old) = self.record(id).await? else {
            // Still clear the id of a put cut short.
            let (ids, key) = (self.ids_key(), self.record_key(id.as_str()));
            unlist(&self.store, "delete a profile", &ids, id.as_str(), &key).await?;
            return Ok(false);
        };
        let key = self.record_key(id.as_str());
        let deleted: i64 = {
            let key = key.clone();
            self.store
                .call("delete a profile", |mut c| async move {
                    redis::cmd("DEL").arg(key).query_async(&mut c).await
                })
                .await?
        };
        let ids = self.ids_key();
        unlist(&self.store, "delete a profile", &ids, id.as_str(), &key).await?;
        self.drop_email_entry(&old).await?;
        Ok(deleted > 0)
    }

    async fn list(
        &self,
        after: Option<&CustomerId>,
        limit: usize,
    ) -> StorageResult<Vec<StoredProfile>> {
        let mut out = Vec::new();
        let mut after = after.map(|a| a.as_str().to_owned());
        while out.len() < limit {
            let want = limit - out.len();
            let ids = page(
                &self.store,
                "list profiles",
                &self.ids_key(),
                after.as_deref(),
                want,
            )
            .await?;
            let Some(last) = ids.last() else {
                break;
            };
            after = Some(last.clone());
            let ids = ids
                .iter()
                .map(|raw| {
                    CustomerId::parse("id", raw)
                        .map_err(|e| StorageError::Corrupt(format!("profile index: {e}")))
                })
                .collect::<StorageResult<Vec<_>>>()?;
            let fetched = ids.len();
            out.extend(self.profiles(&ids).await?.into_iter().flatten());
            if fetched < want {
                break;
            }
        }
        Ok(out)
    }

    async fn count(&self) -> StorageResult<u64> {
        let ids = self.ids_key();
        self.store
            .call("count profiles", |mut c| async move {
                redis::cmd("ZCARD").arg(ids).query_async(&mut c).await
            })
            .await
    }

    async fn find_by_email(&self, index: &str) -> StorageResult<Vec<CustomerId>> {
        let set = self.email_key(index);
        let members: Vec<String> = self
            .store
            .call("find profiles by email", |mut c| async move {
                redis::cmd("SMEMBERS").arg(set).query_async(&mut c).await
            })
            .await?;
        let candidates: BTreeSet<CustomerId> = members
            .iter()
            .filter_map(|m| m.rsplit_once('\n'))
            .filter_map(|(id, _)| CustomerId::parse("id", id).ok())
            .collect();
        let candidates: Vec<CustomerId> = candidates.into_iter().collect();
        let stored = self.profiles(&candidates).await?;
        Ok(candidates
            .into_iter()
            .zip(stored)
            .filter(|(_, p)| {
                p.as_ref()
                    .is_some_and(|p| p.email_index.as_deref() == Some(index))
            })
            .map(|(id, _)| id)
            .collect())
    }
}

impl RedisProfiles {
    /// Removes the email-index entry of a record that was replaced or deleted.
    async fn drop_email_entry(&self, old: &Record) -> StorageResult<()> {
        let Some(index) = &old.profile.email_index else {
            return Ok(());
        };
        let (set, member) = (
            self.email_key(index),
            email_member(&old.profile.id, &old.entry),
        );
        self.store
            .call("update the email index", |mut c| async move {
                redis::cmd("SREM")
                    .arg(set)
                    .arg(member)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
    }
}

// ---------------------------------------------------------------------------------------
// Data keys and erasure markers
// ---------------------------------------------------------------------------------------

/// Replaces KEYS[1] with ARGV[2] if it is exactly ARGV[1]; returns 1 if it did.
static REPLACE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
",
    )
});

/// [`DataKeyStore`] on Redis; the journal position stays in `local`.
pub struct RedisDataKeys {
    store: Arc<RedisStore>,
    local: Arc<dyn DataKeyStore>,
}

impl RedisDataKeys {
    pub fn new(store: Arc<RedisStore>, local: Arc<dyn DataKeyStore>) -> Self {
        RedisDataKeys { store, local }
    }

    fn key_key(&self, owner: &str) -> String {
        self.store.key("data_key", owner)
    }

    fn owners_key(&self) -> String {
        self.store.key("data_key_owners", OWNERS_TAG)
    }

    fn erased_key(&self, tag: &str) -> String {
        self.store.key("erased", tag)
    }
}

fn decode_key(owner: &str, raw: &str) -> StorageResult<WrappedKey> {
    decode(&format!("data key of {owner}"), raw)
}

#[async_trait]
impl DataKeyStore for RedisDataKeys {
    async fn get(&self, owner: &KeyOwner) -> StorageResult<Option<WrappedKey>> {
        let owner = owner.encode();
        let key = self.key_key(&owner);
        let raw: Option<String> = self
            .store
            .call("read a data key", |mut c| async move {
                redis::cmd("GET").arg(key).query_async(&mut c).await
            })
            .await?;
        raw.map(|raw| decode_key(&owner, &raw)).transpose()
    }

    async fn get_many(&self, owners: &[KeyOwner]) -> StorageResult<Vec<Option<WrappedKey>>> {
        let owners: Vec<String> = owners.iter().map(KeyOwner::encode).collect();
        let keys = owners.iter().map(|o| self.key_key(o)).collect();
        read_all(&self.store, "read data keys", keys)
            .await?
            .into_iter()
            .zip(&owners)
            .map(|(raw, owner)| raw.map(|raw| decode_key(owner, &raw)).transpose())
            .collect()
    }

    async fn insert(&self, owner: &KeyOwner, key: &WrappedKey) -> StorageResult<WrappedKey> {
        let owner = owner.encode();
        let value = encode("data key", key)?;
        let (owners, record) = (self.owners_key(), self.key_key(&owner));
        list(&self.store, "store a data key", &owners, &owner).await?;
        // `SET … NX GET`: nothing when this one was stored, else the key stored first.
        let first: Option<String> = {
            let record = record.clone();
            self.store
                .call("store a data key", |mut c| async move {
                    redis::cmd("SET")
                        .arg(record)
                        .arg(value)
                        .arg("NX")
                        .arg("GET")
                        .query_async(&mut c)
                        .await
                })
                .await?
        };
        list(&self.store, "store a data key", &owners, &owner).await?;
        match first {
            Some(raw) => decode_key(&owner, &raw),
            None => Ok(key.clone()),
        }
    }

    async fn replace(
        &self,
        owner: &KeyOwner,
        old: &WrappedKey,
        new: &WrappedKey,
    ) -> StorageResult<bool> {
        let record = self.key_key(&owner.encode());
        let args = [encode("data key", old)?, encode("data key", new)?];
        self.store
            .call("re-wrap a data key", |mut c| async move {
                REPLACE
                    .key(record)
                    .arg(&args[..])
                    .invoke_async(&mut c)
                    .await
            })
            .await
    }

    async fn destroy(&self, owner: &KeyOwner) -> StorageResult<bool> {
        let owner = owner.encode();
        let (owners, record) = (self.owners_key(), self.key_key(&owner));
        let deleted: i64 = {
            let record = record.clone();
            self.store
                .call("destroy a data key", |mut c| async move {
                    redis::cmd("DEL").arg(record).query_async(&mut c).await
                })
                .await?
        };
        unlist(&self.store, "destroy a data key", &owners, &owner, &record).await?;
        Ok(deleted > 0)
    }

    async fn list(
        &self,
        after: Option<&KeyOwner>,
        limit: usize,
    ) -> StorageResult<Vec<(KeyOwner, WrappedKey)>> {
        let mut out = Vec::new();
        let mut after = after.map(KeyOwner::encode);
        while out.len() < limit {
            let want = limit - out.len();
            let owners = page(
                &self.store,
                "list data keys",
                &self.owners_key(),
                after.as_deref(),
                want,
            )
            .await?;
            let Some(last) = owners.last() else {
                break;
            };
            after = Some(last.clone());
            let keys = owners.iter().map(|o| self.key_key(o)).collect();
            let raw = read_all(&self.store, "list data keys", keys).await?;
            for (owner, raw) in owners.iter().zip(raw) {
                let Some(raw) = raw else { continue };
                let decoded = KeyOwner::decode(owner).ok_or_else(|| {
                    StorageError::Corrupt(format!("data key index: unknown owner {owner:?}"))
                })?;
                out.push((decoded, decode_key(owner, &raw)?));
            }
            if owners.len() < want {
                break;
            }
        }
        Ok(out)
    }

    async fn mark_erased(&self, tag: &str, at: DateTime<Utc>) -> StorageResult<()> {
        let key = self.erased_key(tag);
        self.store
            .call("mark an erasure", |mut c| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(at.timestamp_millis())
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
    }

    async fn erased_at(&self, tag: &str) -> StorageResult<Option<DateTime<Utc>>> {
        Ok(self.erased_many(&[tag.to_owned()]).await?.pop().flatten())
    }

    async fn erased_many(&self, tags: &[String]) -> StorageResult<Vec<Option<DateTime<Utc>>>> {
        let keys = tags.iter().map(|t| self.erased_key(t)).collect();
        read_all(&self.store, "read erasure markers", keys)
            .await?
            .into_iter()
            .map(|raw| {
                raw.map(|raw| {
                    raw.parse::<i64>()
                        .ok()
                        .and_then(DateTime::from_timestamp_millis)
                        .ok_or_else(|| {
                            StorageError::Corrupt(format!("erasure marker: {raw:?} is not a time"))
                        })
                })
                .transpose()
            })
            .collect()
    }

    async fn clear_erased(&self, tag: &str) -> StorageResult<bool> {
        let key = self.erased_key(tag);
        let cleared: i64 = self
            .store
            .call("clear an erasure marker", |mut c| async move {
                redis::cmd("DEL").arg(key).query_async(&mut c).await
            })
            .await?;
        Ok(cleared > 0)
    }

    async fn journal_position(&self) -> StorageResult<Option<String>> {
        self.local.journal_position().await
    }

    async fn set_journal_position(&self, position: &str) -> StorageResult<()> {
        self.local.set_journal_position(position).await
    }
}
