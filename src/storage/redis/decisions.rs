//! Decisions shared between replicas ([`DecisionStore`]): what lets an outcome reach any
//! replica behind a load balancer, and a frequency cap count what every replica showed.
//!
//! [`RedisDecisions`] keeps each decision twice: in the replica's own store (its decision
//! log: `scan` for training, the customer export) and in Redis for
//! [`SHARED_DECISION_DAYS`], where every replica finds it. Keys:
//! - `decision:{<id>}`: the decision as JSON, expiring after the shared window;
//! - `decision:{<id>}:outcomes`: a list of its outcomes as JSON, in the order they were
//!   stored, in the decision's slot and expiring with it;
//! - `customer_impressions:{<customer id>}`: a sorted set with one member per decision,
//!   `<decision id>\n<item>\n<item>…` (the items it showed, in order), scored by its
//!   creation time in milliseconds, in the customer's slot beside their features; members
//!   older than the window are trimmed on every write.
//!
//! Reads: `get` answers from the local store and else from Redis; `impressions` and
//! `outcomes` answer from Redis, which holds every replica's (`outcomes` falls back to
//! the local list for a decision Redis no longer holds, or cannot be reached about). `put_outcome` counts in Redis,
//! atomically with the check that the decision exists (one script on its slot), so the
//! "first outcome" that teaches the bandit is first across all replicas; the outcome is
//! also stored locally when the decision was made here. `customer_decisions` merges the
//! local decisions with those Redis holds for the customer.
//!
//! `scan` (what training and off-policy evaluation read) merges the local log with the
//! shared one, `decision_log:{<shard>}`: [`LOG_SHARDS`] sorted sets of decision ids (all
//! scored 0, so they read in id order by `ZRANGEBYLEX`; a decision goes to the shard its
//! id hashes to, so that on a cluster every replica's writes are spread over nodes). Ids
//! are UUIDv7s, whose text sorts by creation time: each write trims the ids older than
//! the window. So a scan holds every replica's decisions of the window, with every
//! outcome, and this replica's own older ones.
//!
//! A decision whose Redis write fails is still stored locally and the call succeeds (the
//! decision has been made; its outcomes are accepted on this replica); the failure is
//! logged and counted by the connection's breaker.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use redis::Script;

use super::RedisStore;
use crate::customers::CustomerId;
use crate::decision::{Decision, Impression, Outcome};
use crate::storage::{DecisionStore, StorageError, StorageResult};

/// How long Redis keeps a decision, its outcomes and its impressions: the window in which
/// an outcome may reach any replica, and the longest frequency cap window.
pub const SHARED_DECISION_DAYS: i64 = 30;

/// How many sorted sets the shared decision log is spread over.
pub const LOG_SHARDS: u32 = 16;

/// How many decisions a scan reads from Redis at once.
const SCAN_IN_FLIGHT: usize = 64;

/// KEYS[1]: the decision, KEYS[2]: its outcome list; ARGV[1]: the outcome. Returns -1
/// when the decision is unknown (nothing stored), else how many outcomes came before.
static PUT_OUTCOME: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return -1 end
local n = redis.call('RPUSH', KEYS[2], ARGV[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return n - 1
",
    )
});

/// [`DecisionStore`] over a replica's own store and Redis.
pub struct RedisDecisions {
    store: Arc<RedisStore>,
    local: Arc<dyn DecisionStore>,
}

fn window_ms() -> i64 {
    SHARED_DECISION_DAYS * 24 * 60 * 60 * 1000
}

/// The impression member of a decision: its id, then the items it showed.
fn impression_member(decision: &Decision) -> String {
    let mut out = decision.id.clone();
    for shown in &decision.items {
        out.push('\n');
        out.push_str(&shown.item.id);
    }
    out
}

/// The shard of the shared decision log that holds `id` (FNV-1a of its text).
fn log_shard(id: &str) -> u32 {
    let hash = id.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    hash % LOG_SHARDS
}

/// The exclusive upper bound, in the text of UUIDv7 ids, of those made before `at_ms`:
/// their first 48 bits are the creation time in milliseconds.
fn id_bound(at_ms: i64) -> String {
    let ms = u64::try_from(at_ms).unwrap_or_default();
    format!("({:08x}-{:04x}", (ms >> 16) & 0xffff_ffff, ms & 0xffff)
}

/// A decision's outcomes as Redis lists them.
fn decode_outcomes(id: &str, raw: &[String]) -> StorageResult<Vec<Outcome>> {
    raw.iter()
        .map(|r| decode(&format!("outcome of decision {id}"), r))
        .collect()
}

fn encode<T: serde::Serialize>(what: &str, value: &T) -> StorageResult<String> {
    serde_json::to_string(value).map_err(|e| StorageError::Backend(format!("encoding {what}: {e}")))
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, raw: &str) -> StorageResult<T> {
    serde_json::from_str(raw).map_err(|e| StorageError::Corrupt(format!("{what}: {e}")))
}

impl RedisDecisions {
    pub fn new(store: Arc<RedisStore>, local: Arc<dyn DecisionStore>) -> Self {
        RedisDecisions { store, local }
    }

    fn decision_key(&self, id: &str) -> String {
        self.store.key("decision", id)
    }

    fn outcomes_key(&self, id: &str) -> String {
        format!("{}:outcomes", self.decision_key(id))
    }

    fn impressions_key(&self, customer: &str) -> String {
        self.store.key("customer_impressions", customer)
    }

    fn log_key(&self, shard: u32) -> String {
        self.store.key("decision_log", &shard.to_string())
    }

    /// Adds the decision's id to the shared log, trimming the ids older than the window.
    async fn log(&self, id: &str) -> StorageResult<()> {
        let key = self.log_key(log_shard(id));
        let oldest = Utc::now().timestamp_millis().saturating_sub(window_ms());
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD")
            .arg(&key)
            .arg(0)
            .arg(id)
            .ignore()
            .cmd("ZREMRANGEBYLEX")
            .arg(&key)
            .arg("-")
            .arg(id_bound(oldest))
            .ignore();
        self.store
            .call("log a decision", |mut c| async move {
                pipe.query_async::<()>(&mut c).await
            })
            .await
    }

    /// Up to `limit` ids of the shared log after `after`, ascending.
    async fn logged_ids(&self, after: Option<&str>, limit: usize) -> StorageResult<Vec<String>> {
        let min = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        let count = i64::try_from(limit).unwrap_or(i64::MAX);
        let shards = (0..LOG_SHARDS).map(|shard| {
            let (key, min) = (self.log_key(shard), min.clone());
            self.store
                .call("scan the decision log", move |mut c| async move {
                    redis::cmd("ZRANGEBYLEX")
                        .arg(key)
                        .arg(min)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(count)
                        .query_async::<Vec<String>>(&mut c)
                        .await
                })
        });
        let mut ids: Vec<String> = futures::future::try_join_all(shards)
            .await?
            .into_iter()
            .flatten()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.truncate(limit);
        Ok(ids)
    }

    /// The decision and its outcomes as Redis holds them, in one exchange on its slot;
    /// `None` when Redis holds no decision of that id.
    async fn shared_entry(&self, id: &str) -> StorageResult<Option<(Decision, Vec<Outcome>)>> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET")
            .arg(self.decision_key(id))
            .cmd("LRANGE")
            .arg(self.outcomes_key(id))
            .arg(0)
            .arg(-1);
        let (raw, outcomes): (Option<String>, Vec<String>) = self
            .store
            .call("read a decision", |mut c| async move {
                pipe.query_async(&mut c).await
            })
            .await?;
        let Some(raw) = raw else {
            return Ok(None);
        };
        let decision = decode(&format!("decision {id}"), &raw)?;
        Ok(Some((decision, decode_outcomes(id, &outcomes)?)))
    }

    /// Writes the decision and its impression; the impression of a decision it replaces
    /// (same id) goes.
    async fn share(&self, decision: &Decision) -> StorageResult<()> {
        let key = self.decision_key(&decision.id);
        let value = encode("decision", decision)?;
        let ttl = window_ms();
        let replace = self.store.call("store a decision", |mut c| async move {
            redis::cmd("SET")
                .arg(&key)
                .arg(value)
                .arg("PX")
                .arg(ttl)
                .arg("GET")
                .query_async::<Option<String>>(&mut c)
                .await
        });
        let member = impression_member(decision);
        let at = decision.created_at.timestamp_millis();
        let impressions = self.impressions_key(decision.customer_id.as_str());
        let shown = self.add_impression(impressions, member.clone(), at);
        let logged = self.log(&decision.id);
        let (previous, shown, logged) = tokio::join!(replace, shown, logged);
        shown?;
        logged?;
        // A replaced decision may have shown other items or named another customer.
        if let Some(previous) = previous? {
            if let Ok(previous) = serde_json::from_str::<Decision>(&previous) {
                let old = impression_member(&previous);
                if previous.customer_id != decision.customer_id || old != member {
                    let key = self.impressions_key(previous.customer_id.as_str());
                    self.store
                        .call("move an impression", |mut c| async move {
                            redis::cmd("ZREM")
                                .arg(key)
                                .arg(old)
                                .query_async::<()>(&mut c)
                                .await
                        })
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Adds one impression member and trims what is more than the window older than it,
    /// atomically on the customer's slot.
    async fn add_impression(&self, key: String, member: String, at: i64) -> StorageResult<()> {
        let oldest = at.saturating_sub(window_ms());
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("ZADD")
            .arg(&key)
            .arg(at)
            .arg(member)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(format!("({oldest}"))
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(window_ms())
            .ignore();
        self.store
            .call("store an impression", |mut c| async move {
                pipe.query_async::<()>(&mut c).await
            })
            .await
    }

    /// The decision as Redis holds it.
    async fn shared(&self, id: &str) -> StorageResult<Option<Decision>> {
        let key = self.decision_key(id);
        let raw: Option<String> = self
            .store
            .call("read a decision", |mut c| async move {
                redis::cmd("GET").arg(key).query_async(&mut c).await
            })
            .await?;
        raw.map(|raw| decode(&format!("decision {id}"), &raw))
            .transpose()
    }

    /// The decision's outcomes as Redis holds them; `None` when Redis holds no decision.
    async fn shared_outcomes(&self, id: &str) -> StorageResult<Option<Vec<Outcome>>> {
        let decision = self.decision_key(id);
        let outcomes = self.outcomes_key(id);
        let mut pipe = redis::pipe();
        pipe.cmd("EXISTS")
            .arg(decision)
            .cmd("LRANGE")
            .arg(outcomes)
            .arg(0)
            .arg(-1);
        let (exists, raw): (bool, Vec<String>) = self
            .store
            .call("read outcomes", |mut c| async move {
                pipe.query_async(&mut c).await
            })
            .await?;
        if !exists {
            return Ok(None);
        }
        decode_outcomes(id, &raw).map(Some)
    }

    /// The ids of the customer's decisions that Redis holds (within the window).
    async fn shared_ids(&self, customer: &CustomerId) -> StorageResult<Vec<String>> {
        let key = self.impressions_key(customer.as_str());
        let members: Vec<String> = self
            .store
            .call("read impressions", |mut c| async move {
                redis::cmd("ZRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(members
            .iter()
            .map(|m| m.split('\n').next().unwrap_or_default().to_owned())
            .collect())
    }

    /// Replaces the customer id on one shared decision and its outcomes, keeping their
    /// expiry; returns whether Redis held the decision.
    async fn pseudonymise_shared(&self, id: &str, pseudonym: &CustomerId) -> StorageResult<bool> {
        let Some(mut decision) = self.shared(id).await? else {
            return Ok(false);
        };
        decision.customer_id = pseudonym.clone();
        let outcomes = self.shared_outcomes(id).await?.unwrap_or_default();
        let outcomes = outcomes
            .into_iter()
            .map(|mut o| {
                o.customer_id = pseudonym.clone();
                encode("outcome", &o)
            })
            .collect::<StorageResult<Vec<_>>>()?;
        let key = self.decision_key(id);
        let list = self.outcomes_key(id);
        let value = encode("decision", &decision)?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(&key)
            .arg(value)
            .arg("KEEPTTL")
            .ignore();
        if !outcomes.is_empty() {
            pipe.cmd("PTTL").arg(&list);
            pipe.cmd("DEL").arg(&list).ignore();
            pipe.cmd("RPUSH").arg(&list).arg(&outcomes).ignore();
        }
        let ttls: Vec<i64> = self
            .store
            .call("pseudonymise a decision", |mut c| async move {
                pipe.query_async(&mut c).await
            })
            .await?;
        if let Some(&ttl) = ttls.first().filter(|t| **t > 0) {
            self.store
                .call("pseudonymise a decision", |mut c| async move {
                    redis::cmd("PEXPIRE")
                        .arg(list)
                        .arg(ttl)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await?;
        }
        Ok(true)
    }
}

#[async_trait]
impl DecisionStore for RedisDecisions {
    async fn put(&self, decision: &Decision) -> StorageResult<()> {
        // Side by side: recording waits for the slower write, not for both in turn. A
        // shared copy whose local write failed is harmless (it expires, and the decision
        // was never answered).
        let (local, shared) = tokio::join!(self.local.put(decision), self.share(decision));
        local?;
        if let Err(e) = shared {
            tracing::warn!(error = %e, decision = %decision.id,
                "Failed to share a decision through Redis; its outcomes are accepted on this replica only");
        }
        Ok(())
    }

    async fn get(&self, id: &str) -> StorageResult<Option<Decision>> {
        if let Some(decision) = self.local.get(id).await? {
            return Ok(Some(decision));
        }
        self.shared(id).await
    }

    async fn put_outcome(&self, outcome: &Outcome) -> StorageResult<Option<u64>> {
        let id = &outcome.decision_id;
        let value = encode("outcome", outcome)?;
        let keys = (self.decision_key(id), self.outcomes_key(id));
        let shared = self
            .store
            .call("store an outcome", |mut c| async move {
                PUT_OUTCOME
                    .key(keys.0)
                    .key(keys.1)
                    .arg(value)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
        // Stored here too when the decision was made here (the local log stays whole);
        // `None` when it was not.
        let local = self.local.put_outcome(outcome).await?;
        match shared {
            Ok(n) if n >= 0 => Ok(Some(u64::try_from(n).unwrap_or_default())),
            // Redis does not hold the decision (its write failed, or it expired): the
            // local count is the only one.
            Ok(_) => Ok(local),
            Err(e) if local.is_some() => {
                tracing::warn!(error = %e, decision = %id,
                    "Failed to share an outcome through Redis; counted on this replica only");
                Ok(local)
            }
            Err(e) => Err(e),
        }
    }

    async fn outcomes(&self, decision_id: &str) -> StorageResult<Vec<Outcome>> {
        match self.shared_outcomes(decision_id).await {
            Ok(Some(outcomes)) => Ok(outcomes),
            Ok(None) => self.local.outcomes(decision_id).await,
            // Without Redis, a decision made here still has the outcomes this replica got.
            Err(e) => {
                if self.local.get(decision_id).await?.is_some() {
                    tracing::warn!(error = %e, decision = %decision_id,
                        "Failed to read shared outcomes; answering with this replica's");
                    self.local.outcomes(decision_id).await
                } else {
                    Err(e)
                }
            }
        }
    }

    async fn impressions(
        &self,
        customer: &CustomerId,
        since: DateTime<Utc>,
        limit: usize,
    ) -> StorageResult<Vec<Impression>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let key = self.impressions_key(customer.as_str());
        let since = since.timestamp_millis();
        // Every decision shows at least one item: `limit` decisions are enough.
        let count = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Vec<(String, f64)> = self
            .store
            .call("read impressions", |mut c| async move {
                redis::cmd("ZREVRANGEBYSCORE")
                    .arg(key)
                    .arg("+inf")
                    .arg(since)
                    .arg("WITHSCORES")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(count)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let mut out = Vec::new();
        'newest: for (member, score) in rows {
            let mut parts = member.split('\n');
            let decision = parts.next().unwrap_or_default();
            // Scores are whole milliseconds, exact in an f64.
            #[allow(clippy::cast_possible_truncation)]
            let at = DateTime::from_timestamp_millis(score as i64).ok_or_else(|| {
                StorageError::Corrupt(format!(
                    "impression of decision {decision}: time out of range"
                ))
            })?;
            for item in parts {
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
    }

    async fn scan(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> StorageResult<Vec<(Decision, Vec<Outcome>)>> {
        let mut out = Vec::with_capacity(limit.min(4096));
        let mut cursor = after.map(str::to_owned);
        while out.len() < limit {
            let want = limit - out.len();
            let (local, shared) = tokio::join!(
                self.local.scan(cursor.as_deref(), want),
                self.logged_ids(cursor.as_deref(), want)
            );
            let (local, shared) = (local?, shared?);
            // Neither log has more than it returned: this is the last round.
            let last = local.len() < want && shared.len() < want;
            // The `want` smallest ids of both are among each one's first `want`.
            let mut page: BTreeMap<String, Option<(Decision, Vec<Outcome>)>> = local
                .into_iter()
                .map(|(d, o)| (d.id.clone(), Some((d, o))))
                .collect();
            for id in shared {
                page.entry(id).or_insert(None);
            }
            let page: Vec<_> = page.into_iter().take(want).collect();
            let Some((tail, _)) = page.last() else {
                break;
            };
            cursor = Some(tail.clone());
            // Redis holds every replica's outcomes of the decisions it holds; a decision
            // it no longer holds (older than the window) has only this replica's.
            let resolved: Vec<_> = futures::stream::iter(page)
                .map(|(id, local)| async move {
                    Ok::<_, StorageError>(match local {
                        // Made here: only the outcomes are read from Redis.
                        Some((decision, outcomes)) => {
                            let shared = self.shared_outcomes(&id).await?;
                            Some((decision, shared.unwrap_or(outcomes)))
                        }
                        None => self.shared_entry(&id).await?,
                    })
                })
                .buffered(SCAN_IN_FLIGHT)
                .try_collect()
                .await?;
            // A logged id whose decision is gone (expired, or its write failed) is skipped.
            out.extend(resolved.into_iter().flatten());
            if last {
                break;
            }
        }
        Ok(out)
    }

    async fn customer_decisions(
        &self,
        customer: &CustomerId,
    ) -> StorageResult<Vec<(Decision, Vec<Outcome>)>> {
        let mut all: BTreeMap<String, (Decision, Vec<Outcome>)> = BTreeMap::new();
        for (decision, outcomes) in self.local.customer_decisions(customer).await? {
            // Outcomes recorded on other replicas are in Redis.
            let outcomes = self
                .shared_outcomes(&decision.id)
                .await?
                .unwrap_or(outcomes);
            all.insert(decision.id.clone(), (decision, outcomes));
        }
        for id in self.shared_ids(customer).await? {
            if all.contains_key(&id) {
                continue;
            }
            let Some((decision, outcomes)) = self.shared_entry(&id).await? else {
                continue;
            };
            if decision.customer_id != *customer {
                continue;
            }
            all.insert(id, (decision, outcomes));
        }
        Ok(all.into_values().collect())
    }

    async fn pseudonymise(&self, customer: &CustomerId, pseudonym: &str) -> StorageResult<u64> {
        let mut changed: std::collections::BTreeSet<String> = self
            .local
            .customer_decisions(customer)
            .await?
            .into_iter()
            .map(|(d, _)| d.id)
            .collect();
        let anon = CustomerId::parse("pseudonym", pseudonym)
            .map_err(|e| StorageError::Backend(format!("invalid pseudonym: {e}")))?;
        self.local.pseudonymise(customer, pseudonym).await?;
        for id in self.shared_ids(customer).await? {
            // A member may outlive a replaced decision's move; only the customer's own
            // decisions change.
            if self
                .shared(&id)
                .await?
                .is_some_and(|d| &d.customer_id == customer)
                && self.pseudonymise_shared(&id, &anon).await?
            {
                changed.insert(id);
            }
        }
        // Decisions made here whose copy Redis still holds.
        for id in &changed.clone() {
            if self
                .shared(id)
                .await?
                .is_some_and(|d| &d.customer_id == customer)
            {
                self.pseudonymise_shared(id, &anon).await?;
            }
        }
        let key = self.impressions_key(customer.as_str());
        self.store
            .call("erase impressions", |mut c| async move {
                redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await
            })
            .await?;
        Ok(u64::try_from(changed.len()).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::{id_bound, log_shard, LOG_SHARDS};

    /// A UUIDv7 made at `ms` milliseconds after the epoch.
    fn id_at(ms: i64) -> String {
        let secs = u64::try_from(ms / 1000).unwrap();
        let nanos = u32::try_from(ms % 1000).unwrap() * 1_000_000;
        uuid::Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, secs, nanos)).to_string()
    }

    #[test]
    fn the_trim_bound_splits_ids_by_creation_time() {
        let at = 1_780_000_000_123_i64;
        let bound = id_bound(at);
        let bound = bound.strip_prefix('(').expect("an exclusive bound");
        for (ms, older) in [
            (at - 30 * 86_400_000, true),
            (at - 1, true),
            (at, false),
            (at + 1, false),
            (at + 86_400_000, false),
        ] {
            let id = id_at(ms);
            assert_eq!(id.as_str() < bound, older, "{id} against {bound}");
        }
    }

    #[test]
    fn ids_spread_over_every_shard() {
        let mut used = [0_u32; LOG_SHARDS as usize];
        for n in 0..1_000 {
            used[log_shard(&id_at(1_780_000_000_000 + n)) as usize] += 1;
        }
        assert!(used.iter().all(|&n| n > 20), "{used:?}");
    }
}
