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
//! Every add is one Lua script that adds each field's delta to its stored value, so
//! concurrent adds from any number of replicas merge by addition. The script adds in
//! `f64` and writes 17 significant digits; `HINCRBYFLOAT` would add in long double but
//! write a fixed 17 decimals, which loses small magnitudes (1e-20 reads back as 0). A sum
//! that would overflow to infinity is refused and nothing is written.

use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use futures::future::try_join_all;
use redis::Script;

use super::{stored_f64, RedisStore};
use crate::bandit::linear::LinearStats;
use crate::bandit::ArmStats;
use crate::storage::{BanditStore, StorageError, StorageResult};

/// KEYS[1]: the hash; ARGV: field, delta, field, delta, … Adds every delta or, when a
/// sum would not be finite, none.
static ADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local sums = {}
for i = 1, #ARGV, 2 do
  local current = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  local sum = current + tonumber(ARGV[i + 1])
  if sum ~= sum or sum == math.huge or sum == -math.huge then
    return redis.error_reply('refusing a sum that is not finite in field ' .. ARGV[i])
  end
  sums[#sums + 1] = ARGV[i]
  sums[#sums + 1] = string.format('%.17g', sum)
end
redis.call('HSET', KEYS[1], unpack(sums))
return 1
",
    )
});

/// [`BanditStore`] on Redis.
pub struct RedisBandit {
    store: Arc<RedisStore>,
}

impl RedisBandit {
    pub fn new(store: Arc<RedisStore>) -> Self {
        RedisBandit { store }
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

    async fn add_fields(&self, key: String, deltas: Vec<(String, f64)>) -> StorageResult<()> {
        let mut args: Vec<String> = Vec::with_capacity(2 * deltas.len());
        for (field, delta) in deltas {
            // Debug formatting of an f64 is the shortest text that parses back exactly.
            args.push(field);
            args.push(format!("{delta:?}"));
        }
        self.store
            .call("add bandit statistics", |mut c| async move {
                ADD.key(key).arg(args).invoke_async::<()>(&mut c).await
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
        self.add_fields(
            self.arm_key(placement, arm),
            vec![
                ("trials".to_owned(), delta.trials),
                ("reward".to_owned(), delta.reward),
            ],
        )
        .await
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
        let deltas = linear_fields(delta.dims).into_iter().zip(values).collect();
        self.add_fields(self.linear_key(placement, arm, delta.dims), deltas)
            .await
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
