//! Bandit sufficient statistics ([`BanditStore`]).
//!
//! Keys, tagged by (placement, arm) so that one arm's statistics live on one node:
//! - `bandit_arm:{<len>:<placement>:<arm>}`: a hash with fields `trials` and `reward`;
//! - `bandit_linear:{<len>:<placement>:<arm>}:<dims>`: a hash with fields `n`, `b0`…,
//!   `a0`… (the upper triangle of `A`, row by row) for the model of that dimension.
//!
//! (`<len>` is the placement's length in bytes, so that no placement/arm pair can spell
//! another's key.) Values are decimal text that reads back to the exact `f64`.
//!
//! Adds are written behind: [`BanditStore::add`] and [`BanditStore::add_linear`] sum
//! their deltas per key and field in memory, and [`BanditStore::flush`] (the engine
//! calls it every 100 ms and at shutdown) writes them as one batch, one Lua script per
//! key that adds each field's delta to its stored value, so concurrent writers from any
//! number of replicas merge by addition, and decisions never wait for Redis to count.
//! A batch is written exactly once: it carries a sequence number, and each key's script
//! first checks and then records, in a marker key beside it
//! (`<key>:applied:<writer>`, kept 7 days), the last number that writer applied there. So
//! a batch whose call failed or timed out (and may or may not have been applied) is sent
//! again, unchanged, until every key took it, while newer deltas gather for the next:
//! an outage loses nothing this process holds, and a retry counts nothing twice. (The
//! writer id is random per process start: what a stopped process still held is lost
//! with it, so nothing of an earlier start is ever retried.)
//!
//! The script adds in `f64` and writes 17 significant digits; `HINCRBYFLOAT` would add in
//! long double but write a fixed 17 decimals, which loses small magnitudes (1e-20 reads
//! back as 0). A sum that would overflow to infinity is refused and nothing is written
//! to that key.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use futures::future::try_join_all;
use redis::Script;

use super::{stored_f64, RedisStore};
use crate::bandit::linear::LinearStats;
use crate::bandit::ArmStats;
use crate::storage::{BanditStore, StorageError, StorageResult};

/// KEYS[1]: the hash, KEYS[2]: the writer's marker beside it; ARGV[1]: the batch's
/// sequence number, then field, delta, field, delta, … Unless the writer already
/// applied this batch (or a later one) here, adds every delta or, when a sum would not
/// be finite, none; then records the batch.
static ADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local applied = tonumber(redis.call('GET', KEYS[2]) or '0')
if applied >= tonumber(ARGV[1]) then return 0 end
local sums = {}
for i = 2, #ARGV, 2 do
  local current = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  local sum = current + tonumber(ARGV[i + 1])
  if sum ~= sum or sum == math.huge or sum == -math.huge then
    return redis.error_reply('refusing a sum that is not finite in field ' .. ARGV[i])
  end
  sums[#sums + 1] = ARGV[i]
  sums[#sums + 1] = string.format('%.17g', sum)
end
redis.call('HSET', KEYS[1], unpack(sums))
redis.call('SET', KEYS[2], ARGV[1], 'EX', 604800)
return 1
",
    )
});

/// Deltas per key, each a list of (field, delta) in first-added order.
type Deltas = HashMap<String, Vec<(String, f64)>>;

/// What is held in memory until written.
#[derive(Default)]
struct Pending {
    /// Added since the batch being sent was cut.
    adding: Deltas,
    /// The batch being sent: its number and the keys that have not taken it yet.
    sending: Option<(u64, Deltas)>,
    /// The last batch number handed out.
    last: u64,
}

/// [`BanditStore`] on Redis, written behind (see the module).
pub struct RedisBandit {
    store: Arc<RedisStore>,
    /// This process start's id in the markers.
    writer: String,
    /// A std lock: never held across an await.
    pending: parking_lot::Mutex<Pending>,
    /// One flush at a time.
    flushing: tokio::sync::Mutex<()>,
}

impl RedisBandit {
    pub fn new(store: Arc<RedisStore>) -> Self {
        RedisBandit {
            store,
            writer: uuid::Uuid::now_v7().simple().to_string(),
            pending: parking_lot::Mutex::default(),
            flushing: tokio::sync::Mutex::new(()),
        }
    }

    /// Adds `deltas` to what `key` holds in memory; refuses (changing nothing) a sum
    /// that would not be finite.
    fn hold(&self, key: String, deltas: &[(&str, f64)]) -> StorageResult<()> {
        let mut pending = self.pending.lock();
        let held = pending.adding.entry(key).or_default();
        let mut sums = Vec::with_capacity(deltas.len());
        for (field, delta) in deltas {
            let current = held
                .iter()
                .find(|(f, _)| f == field)
                .map_or(0.0, |(_, v)| *v);
            let sum = current + delta;
            if !sum.is_finite() {
                return Err(StorageError::Backend(format!(
                    "refusing a sum that is not finite in field {field}"
                )));
            }
            sums.push((*field, sum));
        }
        for (field, sum) in sums {
            match held.iter_mut().find(|(f, _)| f == field) {
                Some(slot) => slot.1 = sum,
                None => held.push((field.to_owned(), sum)),
            }
        }
        Ok(())
    }

    /// Sends the batch being sent (cutting one from what was added, when there is none)
    /// to every key that has not taken it. A key that refuses it for good (a sum that
    /// would not be finite) is dropped from it; the first error is returned.
    async fn send(&self) -> StorageResult<()> {
        let (seq, batch) = {
            let mut pending = self.pending.lock();
            if pending.sending.is_none() && !pending.adding.is_empty() {
                let now = u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(0);
                let seq = now.max(pending.last + 1);
                pending.last = seq;
                let batch = std::mem::take(&mut pending.adding);
                pending.sending = Some((seq, batch));
            }
            match &pending.sending {
                Some((seq, batch)) => (*seq, batch.clone()),
                None => return Ok(()),
            }
        };
        let results =
            futures::future::join_all(batch.into_iter().map(|(key, deltas)| async move {
                let result = self.add_fields(&key, seq, deltas).await;
                (key, result)
            }))
            .await;
        let mut first_error = None;
        let mut pending = self.pending.lock();
        let Some((_, left)) = pending.sending.as_mut() else {
            return Ok(());
        };
        for (key, result) in results {
            match result {
                Ok(()) => {
                    left.remove(&key);
                }
                Err(StorageError::Unavailable(e)) => {
                    first_error.get_or_insert(StorageError::Unavailable(e));
                }
                Err(e) => {
                    tracing::error!(key, error = %e, "Bandit statistics refused by Redis; dropped");
                    left.remove(&key);
                    first_error.get_or_insert(e);
                }
            }
        }
        if left.is_empty() {
            pending.sending = None;
        }
        first_error.map_or(Ok(()), Err)
    }

    fn tag(placement: &str, arm: &str) -> String {
        format!("{}:{placement}:{arm}", placement.len())
    }

    fn arm_key(&self, placement: &str, arm: &str) -> String {
        self.store.key("bandit_arm", &Self::tag(placement, arm))
    }

    fn linear_key(&self, placement: &str, arm: &str, dims: usize) -> String {
        format!(
            "{}:{dims}",
            self.store.key("bandit_linear", &Self::tag(placement, arm))
        )
    }

    async fn add_fields(
        &self,
        key: &str,
        seq: u64,
        deltas: Vec<(String, f64)>,
    ) -> StorageResult<()> {
        let mut args: Vec<String> = Vec::with_capacity(1 + 2 * deltas.len());
        args.push(seq.to_string());
        for (field, delta) in deltas {
            // Debug formatting of an f64 is the shortest text that parses back exactly.
            args.push(field);
            args.push(format!("{delta:?}"));
        }
        let keys = [key.to_owned(), format!("{key}:applied:{}", self.writer)];
        self.store
            .call("add bandit statistics", |mut c| async move {
                ADD.key(&keys[0])
                    .key(&keys[1])
                    .arg(args)
                    .invoke_async::<()>(&mut c)
                    .await
            })
            .await
    }

    /// The named fields of every key (absent fields as `None`): one round trip on a
    /// single server, one per key (concurrently) on a cluster.
    async fn read_fields(
        &self,
        keys: Vec<String>,
        fields: &[String],
    ) -> StorageResult<Vec<Vec<Option<String>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<Vec<Option<String>>> = if self.store.is_cluster() {
            try_join_all(keys.iter().map(|key| {
                self.store
                    .call("read bandit statistics", move |mut c| async move {
                        redis::cmd("HMGET")
                            .arg(key)
                            .arg(fields)
                            .query_async(&mut c)
                            .await
                    })
            }))
            .await?
        } else {
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("HMGET").arg(key).arg(fields);
            }
            self.store
                .call("read bandit statistics", |mut c| async move {
                    pipe.query_async(&mut c).await
                })
                .await?
        };
        if rows.len() != keys.len() || rows.iter().any(|row| row.len() != fields.len()) {
            return Err(StorageError::Backend(
                "Redis read bandit statistics: answer does not fit the request".into(),
            ));
        }
        Ok(rows)
    }
}

fn linear_fields(dims: usize) -> Vec<String> {
    let tri = dims * (dims + 1) / 2;
    std::iter::once("n".to_owned())
        .chain((0..dims).map(|i| format!("b{i}")))
        .chain((0..tri).map(|i| format!("a{i}")))
        .collect()
}

fn value(what: &str, raw: Option<String>) -> StorageResult<f64> {
    raw.map_or(Ok(0.0), |raw| stored_f64(what, &raw))
}

#[async_trait]
impl BanditStore for RedisBandit {
    async fn add(&self, placement: &str, arm: &str, delta: ArmStats) -> StorageResult<()> {
        if !delta.trials.is_finite() || !delta.reward.is_finite() {
            return Err(StorageError::Backend(format!(
                "bandit {placement}/{arm}: refusing a non-finite delta {delta:?}"
            )));
        }
        self.hold(
            self.arm_key(placement, arm),
            &[("trials", delta.trials), ("reward", delta.reward)],
        )
    }

    async fn get(&self, placement: &str, arms: &[String]) -> StorageResult<Vec<ArmStats>> {
        let keys = arms
            .iter()
            .map(|arm| self.arm_key(placement, arm))
            .collect();
        let fields = ["trials".to_owned(), "reward".to_owned()];
        self.read_fields(keys, &fields)
            .await?
            .into_iter()
            .zip(arms)
            .map(|(row, arm)| {
                let what = format!("bandit {placement}/{arm}");
                let mut row = row.into_iter();
                Ok(ArmStats {
                    trials: value(&what, row.next().flatten())?,
                    reward: value(&what, row.next().flatten())?,
                })
            })
            .collect()
    }

    async fn add_linear(
        &self,
        placement: &str,
        arm: &str,
        delta: &LinearStats,
    ) -> StorageResult<()> {
        if !delta.is_valid() {
            return Err(StorageError::Backend(format!(
                "bandit {placement}/{arm}: refusing invalid linear statistics (dims {})",
                delta.dims
            )));
        }
        let values = std::iter::once(delta.n)
            .chain(delta.b.iter().copied())
            .chain(delta.a.iter().copied());
        let fields = linear_fields(delta.dims);
        let deltas: Vec<(&str, f64)> = fields.iter().map(String::as_str).zip(values).collect();
        self.hold(self.linear_key(placement, arm, delta.dims), &deltas)
    }

    /// Writes what was added (see the module): the batch being sent first, then, once
    /// every key took it, a new one of what was added since.
    async fn flush(&self) -> StorageResult<()> {
        let _flushing = self.flushing.lock().await;
        // At most twice: a batch left by an earlier failure, then the newer deltas.
        self.send().await?;
        self.send().await
    }

    async fn get_linear(
        &self,
        placement: &str,
        arms: &[String],
        dims: usize,
    ) -> StorageResult<Vec<LinearStats>> {
        let keys = arms
            .iter()
            .map(|arm| self.linear_key(placement, arm, dims))
            .collect();
        let fields = linear_fields(dims);
        self.read_fields(keys, &fields)
            .await?
            .into_iter()
            .zip(arms)
            .map(|(row, arm)| {
                let what = format!("bandit {placement}/{arm} linear");
                let values = row
                    .into_iter()
                    .map(|raw| value(&what, raw))
                    .collect::<StorageResult<Vec<f64>>>()?;
                Ok(LinearStats {
                    dims,
                    n: values[0],
                    b: values[1..=dims].to_vec(),
                    a: values[dims + 1..].to_vec(),
                })
            })
            .collect()
    }
}
