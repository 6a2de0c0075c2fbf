//! Segment membership ([`SegmentStore`]), kept in both directions.
//!
//! Keys:
//! - `segment:{<segment>}`: a sorted set of the members' ids, all with score 0, so they
//!   page in id order (`ZRANGEBYLEX`) and `ZCARD` is the exact size;
//! - `customer_segments:{<customer id>}`: a sorted set of the customer's segment names
//!   (score 0: name order), in the customer's slot, beside their features.
//!
//! Atomicity: `apply` is one Lua script that replays the batch in order (a `ZADD` or
//! `ZREM` that changes nothing is not a change). On a single server the script updates
//! both directions of the whole batch at once. On a cluster it runs once per segment
//! (atomic for that segment's members and size), and the customers' segment lists follow
//! right after; `clear` and `remove_customer` visit their keys one slot at a time.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use futures::future::try_join_all;
use redis::{AsyncCommands, Script};

use super::RedisStore;
use crate::customers::CustomerId;
use crate::storage::{MembershipChange, SegmentStore, StorageError, StorageResult};

/// How many customers' segment lists `segments_of_many` has in flight at once.
const READS_IN_FLIGHT: usize = 64;

/// How many members `clear` moves per round trip.
const CLEAR_BATCH: isize = 500;

/// ARGV: the change count, then per change five values: the index in KEYS of the
/// segment's member set, the index of the customer's segment list (0: leave it alone),
/// the segment name, the customer id, "1" for a join. Returns the 0-based positions of
/// the changes that changed something.
static APPLY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = tonumber(ARGV[1])
local changed = {}
for i = 0, n - 1 do
  local at = 2 + i * 5
  local members = KEYS[tonumber(ARGV[at])]
  local list = tonumber(ARGV[at + 1])
  local segment = ARGV[at + 2]
  local customer = ARGV[at + 3]
  if ARGV[at + 4] == '1' then
    if redis.call('ZADD', members, 0, customer) == 1 then
      if list > 0 then redis.call('ZADD', KEYS[list], 0, segment) end
      changed[#changed + 1] = i
    end
  elseif redis.call('ZREM', members, customer) == 1 then
    if list > 0 then redis.call('ZREM', KEYS[list], segment) end
    changed[#changed + 1] = i
  end
end
return changed
",
    )
});

/// Moves KEYS[1] to KEYS[2] (same slot) when it exists; returns 1 if it did.
static DETACH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('RENAME', KEYS[1], KEYS[2])
  return 1
end
return 0
",
    )
});

/// [`SegmentStore`] on Redis.
pub struct RedisSegments {
    store: Arc<RedisStore>,
}

impl RedisSegments {
    pub fn new(store: Arc<RedisStore>) -> Self {
        RedisSegments { store }
    }

    fn members_key(&self, segment: &str) -> String {
        self.store.key("segment", segment)
    }

    fn list_key(&self, customer: &str) -> String {
        self.store.key("customer_segments", customer)
    }

    /// Runs [`APPLY`] over `changes`; `with_lists` also updates the customers' segment
    /// lists (only when every key involved is on one server).
    async fn run_apply(
        &self,
        changes: &[&MembershipChange],
        with_lists: bool,
    ) -> StorageResult<Vec<usize>> {
        let mut keys: Vec<String> = Vec::new();
        let mut positions: HashMap<String, usize> = HashMap::new();
        let mut position = |key: String| {
            *positions.entry(key.clone()).or_insert_with(|| {
                keys.push(key);
                keys.len()
            })
        };
        let mut args: Vec<String> = vec![changes.len().to_string()];
        for change in changes {
            let members = position(self.members_key(&change.segment));
            let list = if with_lists {
                position(self.list_key(change.customer.as_str()))
            } else {
                0
            };
            args.extend([
                members.to_string(),
                list.to_string(),
                change.segment.clone(),
                change.customer.as_str().to_owned(),
                if change.joined { "1" } else { "0" }.to_owned(),
            ]);
        }
        let changed: Vec<usize> = self
            .store
            .call("apply memberships", |mut c| async move {
                let mut invocation = APPLY.prepare_invoke();
                invocation.key(&keys).arg(&args);
                invocation.invoke_async(&mut c).await
            })
            .await?;
        if changed.iter().any(|&i| i >= changes.len()) {
            return Err(StorageError::Backend(
                "Redis apply memberships: the script answered an unknown position".into(),
            ));
        }
        Ok(changed)
    }
}

#[async_trait]
impl SegmentStore for RedisSegments {
    async fn apply(&self, changes: &[MembershipChange]) -> StorageResult<Vec<MembershipChange>> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        if !self.store.is_cluster() {
            let all: Vec<&MembershipChange> = changes.iter().collect();
            let changed = self.run_apply(&all, true).await?;
            return Ok(changed.into_iter().map(|i| changes[i].clone()).collect());
        }

        // Cluster: each segment's changes in order, one script per segment.
        let mut by_segment: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, change) in changes.iter().enumerate() {
            by_segment.entry(&change.segment).or_default().push(i);
        }
        let per_segment = try_join_all(by_segment.values().map(|positions| async move {
            let group: Vec<&MembershipChange> = positions.iter().map(|&i| &changes[i]).collect();
            let changed = self.run_apply(&group, false).await?;
            Ok::<_, StorageError>(
                changed
                    .into_iter()
                    .map(|j| positions[j])
                    .collect::<Vec<_>>(),
            )
        }))
        .await?;
        let mut changed: Vec<usize> = per_segment.into_iter().flatten().collect();
        changed.sort_unstable();

        // Then each customer's list: the last change of each (customer, segment) wins.
        let mut lists: BTreeMap<&str, BTreeMap<&str, bool>> = BTreeMap::new();
        for &i in &changed {
            let change = &changes[i];
            lists
                .entry(change.customer.as_str())
                .or_default()
                .insert(&change.segment, change.joined);
        }
        try_join_all(lists.iter().map(|(customer, segments)| {
            let key = self.list_key(customer);
            let joined: Vec<&str> = segments
                .iter()
                .filter(|(_, &j)| j)
                .map(|(s, _)| *s)
                .collect();
            let left: Vec<&str> = segments
                .iter()
                .filter(|(_, &j)| !j)
                .map(|(s, _)| *s)
                .collect();
            async move {
                // Disjoint members of one key: the two commands commute.
                if !joined.is_empty() {
                    let members: Vec<(i64, &str)> = joined.into_iter().map(|s| (0, s)).collect();
                    let key = key.clone();
                    self.store
                        .call("update segment list", |mut c| async move {
                            c.zadd_multiple::<_, _, _, ()>(key, &members).await
                        })
                        .await?;
                }
                if !left.is_empty() {
                    self.store
                        .call("update segment list", |mut c| async move {
                            c.zrem::<_, _, ()>(key, left).await
                        })
                        .await?;
                }
                Ok::<_, StorageError>(())
            }
        }))
        .await?;
        Ok(changed.into_iter().map(|i| changes[i].clone()).collect())
    }

    async fn contains(&self, segment: &str, customer: &CustomerId) -> StorageResult<bool> {
        let key = self.members_key(segment);
        let score: Option<f64> = self
            .store
            .call("segment membership", |mut c| async move {
                c.zscore(key, customer.as_str()).await
            })
            .await?;
        Ok(score.is_some())
    }

    async fn size(&self, segment: &str) -> StorageResult<u64> {
        let key = self.members_key(segment);
        self.store
            .call("segment size", |mut c| async move { c.zcard(key).await })
            .await
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
        let key = self.members_key(segment);
        let min = match after {
            Some(after) => format!("({after}"),
            None => "-".to_owned(),
        };
        let ids: Vec<String> = self
            .store
            .call("segment members", |mut c| async move {
                c.zrangebylex_limit(key, min, "+", 0, limit as isize).await
            })
            .await?;
        ids.iter().map(|id| stored_customer_id(id)).collect()
    }

    async fn segments_of(&self, customer: &CustomerId) -> StorageResult<Vec<String>> {
        let key = self.list_key(customer.as_str());
        self.store
            .call("customer segments", |mut c| async move {
                c.zrange(key, 0, -1).await
            })
            .await
    }

    async fn segments_of_many(&self, customers: &[CustomerId]) -> StorageResult<Vec<Vec<String>>> {
        // READS_IN_FLIGHT at a time on the multiplexed connection.
        let mut out = Vec::with_capacity(customers.len());
        for chunk in customers.chunks(READS_IN_FLIGHT) {
            out.extend(try_join_all(chunk.iter().map(|c| self.segments_of(c))).await?);
        }
        Ok(out)
    }

    async fn clear(&self, segment: &str) -> StorageResult<()> {
        // Detach the member set in one step (the segment is empty from then on), then
        // take the segment off its former members' lists.
        let members = self.members_key(segment);
        let detached = format!(
            "{}segment_clearing:{{{segment}}}:{}",
            self.store.prefix,
            uuid::Uuid::now_v7()
        );
        let moved: i64 = self
            .store
            .call("clear segment", |mut c| {
                let (members, detached) = (members.clone(), detached.clone());
                async move { DETACH.key(members).key(detached).invoke_async(&mut c).await }
            })
            .await?;
        if moved == 0 {
            return Ok(());
        }
        loop {
            let batch: Vec<String> = self
                .store
                .call("clear segment", |mut c| {
                    let detached = detached.clone();
                    async move { c.zrange(detached, 0, CLEAR_BATCH - 1).await }
                })
                .await?;
            if batch.is_empty() {
                return Ok(());
            }
            try_join_all(batch.iter().map(|customer| {
                let list = self.list_key(customer);
                self.store.call("clear segment", |mut c| async move {
                    c.zrem::<_, _, ()>(list, segment).await
                })
            }))
            .await?;
            self.store
                .call("clear segment", |mut c| {
                    let detached = detached.clone();
                    let batch = batch.clone();
                    async move { c.zrem::<_, _, ()>(detached, batch).await }
                })
                .await?;
        }
    }

    async fn remove_customer(&self, customer: &CustomerId) -> StorageResult<Vec<MembershipChange>> {
        let list = self.list_key(customer.as_str());
        let segments: Vec<String> = self
            .store
            .call("customer segments", |mut c| {
                let list = list.clone();
                async move { c.zrange(list, 0, -1).await }
            })
            .await?;
        if segments.is_empty() {
            return Ok(Vec::new());
        }
        let removed = try_join_all(segments.iter().map(|segment| {
            let key = self.members_key(segment);
            self.store.call("remove customer", |mut c| async move {
                c.zrem::<_, _, i64>(key, customer.as_str()).await
            })
        }))
        .await?;
        self.store
            .call("remove customer", |mut c| {
                let segments = segments.clone();
                async move { c.zrem::<_, _, ()>(list, segments).await }
            })
            .await?;
        Ok(segments
            .into_iter()
            .zip(removed)
            .filter(|(_, removed)| *removed == 1)
            .map(|(segment, _)| MembershipChange {
                segment,
                customer: customer.clone(),
                joined: false,
            })
            .collect())
    }
}

/// A customer id read back from a member set, re-validated.
fn stored_customer_id(raw: &str) -> StorageResult<CustomerId> {
    CustomerId::parse("customerId", raw)
        .map_err(|e| StorageError::Corrupt(format!("stored customer id {raw:?}: {e}")))
}
