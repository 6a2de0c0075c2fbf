//! Online feature state ([`FeatureStore`]).
//!
//! Keys:
//! - `customer_features:{<customer id>}`: a hash, field `<version>:<feature name>` → JSON
//!   of [`FeatureState`]. One customer's states are one key, so a read of many features
//!   is one `HMGET` and erasure is one `DEL`;
//!   In the same hash, `@<version>:<feature name>` → `<partition>:<offset>`: the state's
//!   `applied_position`, readable without decoding the state (below);
//! - `feature_customers:{<version>:<feature name>}`: a set of the customer ids that have
//!   a state of that feature version, so dropping a version visits only them. It may
//!   list customers whose state is already gone (harmless); it never misses one, because
//!   a write adds to it before it writes the state;
//! - `feature_backfilled:{<version>:<feature name>}`: a set of the event-stream
//!   partitions whose history the version's states hold (added after the states).
//!
//! Fencing: a write of a state with a stream position is skipped where the stored state
//! has a later one in the same partition, so a worker that stalled past its group session
//! and wakes mid-batch cannot overwrite what the partition's new owner wrote meanwhile
//! (nor can a backfill from an older log). States without a position are written as
//! given.
//!
//! Atomicity: a batch is one script on a single server. On a cluster each customer's
//! part of a batch is one script on its slot (atomic and visible at once); different
//! customers live on different nodes and become visible one after another.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use futures::future::try_join_all;
use redis::{AsyncCommands, Script};

use super::RedisStore;
use crate::customers::CustomerId;
use crate::features::{FeatureKey, FeatureState};
use crate::storage::{FeatureStore, StorageError, StorageResult};

/// How many customers `delete_key` visits per round trip.
const DELETE_BATCH: usize = 500;

/// How many customers' reads `read_many` has in flight at once.
const READ_MANY_IN_FLIGHT: usize = 64;

/// Writes states, fenced by their stream positions. `KEYS`: the customers' hashes, then
/// the version indexes. `ARGV`: the number of hashes, of indexes; per index its member
/// count and members; per hash its field count and (field, state, position) triples,
/// position `""` for none. Returns how many states were skipped as older than stored.
static WRITE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local hashes, indexes = tonumber(ARGV[1]), tonumber(ARGV[2])
local a = 3
for j = 1, indexes do
  local count = tonumber(ARGV[a])
  for x = 1, count do
    redis.call('SADD', KEYS[hashes + j], ARGV[a + x])
  end
  a = a + count + 1
end
local function later(stored, new)
  local sp, so = string.match(stored, '^(-?%d+):(%d+)$')
  local np, no = string.match(new, '^(-?%d+):(%d+)$')
  if sp == nil or sp ~= np then return false end
  -- Offsets as decimal strings: longer is larger; equal lengths compare as text.
  return #so > #no or (#so == #no and so > no)
end
local skipped = 0
for i = 1, hashes do
  local count = tonumber(ARGV[a])
  a = a + 1
  -- One HMGET of the stored positions, one HSET of what is written, one HDEL.
  local marks = {}
  for x = 0, count - 1 do
    marks[#marks + 1] = '@' .. ARGV[a + 3 * x]
  end
  local stored = redis.call('HMGET', KEYS[i], unpack(marks))
  local writes, unmarks = {}, {}
  for x = 0, count - 1 do
    local field, state, position = ARGV[a + 3 * x], ARGV[a + 3 * x + 1], ARGV[a + 3 * x + 2]
    if position == '' then
      writes[#writes + 1] = field
      writes[#writes + 1] = state
      unmarks[#unmarks + 1] = marks[x + 1]
    elseif stored[x + 1] and later(stored[x + 1], position) then
      skipped = skipped + 1
    else
      writes[#writes + 1] = field
      writes[#writes + 1] = state
      writes[#writes + 1] = marks[x + 1]
      writes[#writes + 1] = position
    end
  end
  a = a + 3 * count
  if #writes > 0 then
    redis.call('HSET', KEYS[i], unpack(writes))
  end
  if #unmarks > 0 then
    redis.call('HDEL', KEYS[i], unpack(unmarks))
  end
end
return skipped
",
    )
});

/// [`FeatureStore`] on Redis.
pub struct RedisFeatures {
    store: Arc<RedisStore>,
}

impl RedisFeatures {
    pub fn new(store: Arc<RedisStore>) -> Self {
        RedisFeatures { store }
    }

    fn customer_key(&self, customer: &str) -> String {
        self.store.key("customer_features", customer)
    }

    fn index_key(&self, key: &FeatureKey) -> String {
        self.store.key("feature_customers", &field(key))
    }

    fn marks_key(&self, key: &FeatureKey) -> String {
        self.store.key("feature_backfilled", &field(key))
    }
}

fn field(key: &FeatureKey) -> String {
    format!("{}:{}", key.version, key.name)
}

/// The field beside a state's that holds its stream position.
fn position_field(field: &str) -> String {
    format!("@{field}")
}

/// A state's stream position as the write script compares it; `""` for none.
fn position(state: &FeatureState) -> String {
    state
        .applied_position
        .map(|p| format!("{}:{}", p.partition, p.offset))
        .unwrap_or_default()
}

/// Appends the script arguments of one hash's states: their count, then the triples.
fn hash_args(args: &mut Vec<Vec<u8>>, fields: Vec<(String, Vec<u8>, String)>) {
    args.push(fields.len().to_string().into_bytes());
    for (field, state, position) in fields {
        args.push(field.into_bytes());
        args.push(state);
        args.push(position.into_bytes());
    }
}

/// The feature key of a stored field, or `None` for a field this layout did not write.
fn parse_field(raw: &str) -> Option<FeatureKey> {
    let (version, name) = raw.split_once(':')?;
    Some(FeatureKey::new(name, version.parse().ok()?))
}

/// JSON of a state, refused when it would not read back (a non-finite number).
fn encode(state: &FeatureState) -> StorageResult<Vec<u8>> {
    let bytes = serde_json::to_vec(state)
        .map_err(|e| StorageError::Backend(format!("cannot serialize feature state: {e}")))?;
    serde_json::from_slice::<FeatureState>(&bytes).map_err(|e| {
        StorageError::Backend(format!(
            "refusing to store a feature state that would not read back: {e}"
        ))
    })?;
    Ok(bytes)
}

#[async_trait]
impl FeatureStore for RedisFeatures {
    async fn read(
        &self,
        customer: &CustomerId,
        keys: &[FeatureKey],
    ) -> StorageResult<Vec<Option<FeatureState>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let hash = self.customer_key(customer.as_str());
        let fields: Vec<String> = keys.iter().map(field).collect();
        let values: Vec<Option<Vec<u8>>> = self
            .store
            .call("read features", |mut c| async move {
                redis::cmd("HMGET")
                    .arg(&hash)
                    .arg(&fields)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        if values.len() != keys.len() {
            return Err(StorageError::Backend(format!(
                "Redis read features: {} values for {} keys",
                values.len(),
                keys.len()
            )));
        }
        values
            .into_iter()
            .zip(keys)
            .map(|(value, key)| {
                value
                    .map(|bytes| {
                        serde_json::from_slice(&bytes).map_err(|e| {
                            StorageError::Corrupt(format!(
                                "feature state {customer}/{key}: undecodable value: {e}"
                            ))
                        })
                    })
                    .transpose()
            })
            .collect()
    }

    async fn read_many(
        &self,
        requests: &[(CustomerId, Vec<FeatureKey>)],
    ) -> StorageResult<Vec<Vec<Option<FeatureState>>>> {
        // READ_MANY_IN_FLIGHT at a time on the multiplexed connection: pipelined, not a
        // round trip each, and few enough that each meets its own deadline.
        let mut out = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(READ_MANY_IN_FLIGHT) {
            out.extend(
                try_join_all(
                    chunk
                        .iter()
                        .map(|(customer, keys)| self.read(customer, keys)),
                )
                .await?,
            );
        }
        Ok(out)
    }

    async fn write(
        &self,
        updates: Vec<(CustomerId, FeatureKey, FeatureState)>,
    ) -> StorageResult<()> {
        if updates.is_empty() {
            return Ok(());
        }
        // Per customer, the fields in input order (a repeated field keeps the last).
        let mut by_customer: BTreeMap<String, Vec<(String, Vec<u8>, String)>> = BTreeMap::new();
        let mut indexes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (customer, key, state) in &updates {
            let fields = by_customer
                .entry(self.customer_key(customer.as_str()))
                .or_default();
            let written = (field(key), encode(state)?, position(state));
            match fields.iter_mut().find(|(f, _, _)| *f == written.0) {
                Some(earlier) => *earlier = written,
                None => fields.push(written),
            }
            indexes
                .entry(self.index_key(key))
                .or_default()
                .insert(customer.as_str().to_owned());
        }

        let skipped: u64 = if !self.store.is_cluster() {
            let (mut keys, states): (Vec<String>, Vec<_>) = by_customer.into_iter().unzip();
            keys.extend(indexes.keys().cloned());
            let mut args: Vec<Vec<u8>> = vec![
                states.len().to_string().into_bytes(),
                indexes.len().to_string().into_bytes(),
            ];
            for customers in indexes.values() {
                args.push(customers.len().to_string().into_bytes());
                args.extend(customers.iter().map(|c| c.clone().into_bytes()));
            }
            for fields in states {
                hash_args(&mut args, fields);
            }
            self.store
                .call("write features", |mut c| async move {
                    WRITE
                        .key(&keys[..])
                        .arg(&args[..])
                        .invoke_async(&mut c)
                        .await
                })
                .await?
        } else {
            // Cluster: the indexes first, so that `delete_key` never misses a state.
            try_join_all(indexes.iter().map(|(index, customers)| {
                self.store.call("index features", move |mut c| async move {
                    c.sadd::<_, _, ()>(index, customers).await
                })
            }))
            .await?;
            try_join_all(by_customer.into_iter().map(|(hash, fields)| {
                let mut args = vec![b"1".to_vec(), b"0".to_vec()];
                hash_args(&mut args, fields);
                self.store.call("write features", move |mut c| async move {
                    WRITE
                        .key(hash)
                        .arg(&args[..])
                        .invoke_async::<u64>(&mut c)
                        .await
                })
            }))
            .await?
            .into_iter()
            .sum()
        };
        if skipped > 0 {
            tracing::warn!(
                skipped,
                "Feature states older than those stored were not written (a worker that lost its partitions wrote late, or a backfill finished after the partition's owner folded later events)"
            );
        }
        Ok(())
    }

    async fn delete_customer(&self, customer: &CustomerId) -> StorageResult<()> {
        let hash = self.customer_key(customer.as_str());
        let fields: Vec<String> = self
            .store
            .call("list features", |mut c| {
                let hash = hash.clone();
                async move { c.hkeys(hash).await }
            })
            .await?;
        self.store
            .call("erase features", |mut c| {
                let hash = hash.clone();
                async move { c.del::<_, ()>(hash).await }
            })
            .await?;
        // The index entries are only a hint now; drop them so the indexes do not grow.
        try_join_all(fields.iter().filter_map(|f| parse_field(f)).map(|key| {
            let index = self.index_key(&key);
            self.store
                .call("unindex features", move |mut c| async move {
                    c.srem::<_, _, ()>(index, customer.as_str()).await
                })
        }))
        .await?;
        Ok(())
    }

    async fn delete_key(&self, key: &FeatureKey) -> StorageResult<()> {
        let index = self.index_key(key);
        let field = field(key);
        loop {
            // Take a batch off the index only after its states are gone, so a failure
            // midway leaves the rest listed for the next attempt.
            let customers: Vec<String> = self
                .store
                .call("scan feature index", |mut c| {
                    let index = index.clone();
                    async move {
                        redis::cmd("SRANDMEMBER")
                            .arg(index)
                            .arg(DELETE_BATCH)
                            .query_async(&mut c)
                            .await
                    }
                })
                .await?;
            if customers.is_empty() {
                let marks = self.marks_key(key);
                return self
                    .store
                    .call("delete backfill marks", move |mut c| async move {
                        c.del::<_, ()>(marks).await
                    })
                    .await;
            }
            try_join_all(customers.iter().map(|customer| {
                let hash = self.customer_key(customer);
                let fields = [field.clone(), position_field(&field)];
                self.store.call("delete feature", |mut c| async move {
                    c.hdel::<_, _, ()>(hash, &fields[..]).await
                })
            }))
            .await?;
            self.store
                .call("unindex feature", |mut c| {
                    let index = index.clone();
                    let customers = customers.clone();
                    async move { c.srem::<_, _, ()>(index, customers).await }
                })
                .await?;
        }
    }

    async fn backfilled_partitions(&self, key: &FeatureKey) -> StorageResult<BTreeSet<i32>> {
        let marks = self.marks_key(key);
        self.store
            .call("read backfill marks", move |mut c| async move {
                c.smembers(marks).await
            })
            .await
    }

    async fn mark_backfilled(&self, key: &FeatureKey, partition: i32) -> StorageResult<()> {
        let marks = self.marks_key(key);
        self.store
            .call("mark backfill", move |mut c| async move {
                c.sadd::<_, _, ()>(marks, partition).await
            })
            .await
    }
}
