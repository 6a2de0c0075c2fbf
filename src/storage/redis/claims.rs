//! [`EventClaims`] on Redis: one string per event id read from the stream,
//! `<prefix>event_id:{<customer>}:<event id>` = `<partition>:<offset>` of the first read,
//! set only if absent and returning what was there (`SET … NX GET PX <window>`), so that
//! the first worker to read an id records its position and every later read learns it in
//! the same command. The hash tag is the customer's, as for their features. On a single
//! server a batch's claims are one script; on a cluster, where they span slots, they are
//! single commands, [`CLAIMS_IN_FLIGHT`] at a time.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::try_join_all;
use redis::Script;

use super::RedisStore;
use crate::events::Event;
use crate::storage::{EventClaims, StorageResult};

/// Claims in flight at once on a cluster (each key is routed on its own).
const CLAIMS_IN_FLIGHT: usize = 64;

/// Claims per script on a single server.
const CLAIMS_PER_SCRIPT: usize = 1000;

/// `KEYS`: the ids' keys; `ARGV[1]`: the window in ms, then one position per key. Returns
/// per key what was stored before, or `false` where nothing was (in key order, so two
/// copies in one call are claimed in stream order).
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local firsts = {}
for i, key in ipairs(KEYS) do
  firsts[i] = redis.call('SET', key, ARGV[i + 1], 'NX', 'GET', 'PX', ARGV[1])
end
return firsts
",
    )
});

/// [`EventClaims`] on a Redis server or cluster.
pub struct RedisClaims {
    store: Arc<RedisStore>,
}

/// An event's claim: its key and position, as stored.
struct Claim {
    key: String,
    here: String,
}

impl RedisClaims {
    pub(super) fn new(store: Arc<RedisStore>) -> Self {
        RedisClaims { store }
    }

    fn claim(&self, event: &Event) -> Option<Claim> {
        let at = event.position?;
        Some(Claim {
            key: format!(
                "{}:{}",
                self.store.key("event_id", event.customer_id.as_str()),
                event.event_id
            ),
            here: format!("{}:{}", at.partition, at.offset),
        })
    }

    /// What was stored before each claim (`None`: it is the first), one script per
    /// [`CLAIMS_PER_SCRIPT`].
    async fn by_script(
        &self,
        claims: &[&Claim],
        window_ms: u64,
    ) -> StorageResult<Vec<Option<String>>> {
        let mut firsts = Vec::with_capacity(claims.len());
        for chunk in claims.chunks(CLAIMS_PER_SCRIPT) {
            let keys: Vec<&str> = chunk.iter().map(|c| c.key.as_str()).collect();
            let positions: Vec<&str> = chunk.iter().map(|c| c.here.as_str()).collect();
            let answer: Vec<Option<String>> = self
                .store
                .call("claim event ids", |mut c| async move {
                    CLAIM
                        .key(&keys[..])
                        .arg(window_ms)
                        .arg(&positions[..])
                        .invoke_async(&mut c)
                        .await
                })
                .await?;
            firsts.extend(answer);
        }
        Ok(firsts)
    }

    /// What was stored before each claim, one command per claim, in order.
    async fn one_by_one(
        &self,
        claims: &[&Claim],
        window_ms: u64,
    ) -> StorageResult<Vec<Option<String>>> {
        let mut firsts = Vec::with_capacity(claims.len());
        for chunk in claims.chunks(CLAIMS_IN_FLIGHT) {
            firsts.extend(
                try_join_all(chunk.iter().map(|claim| {
                    self.store
                        .call("claim an event id", move |mut c| async move {
                            redis::cmd("SET")
                                .arg(&claim.key)
                                .arg(&claim.here)
                                .arg("NX")
                                .arg("GET")
                                .arg("PX")
                                .arg(window_ms)
                                .query_async::<Option<String>>(&mut c)
                                .await
                        })
                }))
                .await?,
            );
        }
        Ok(firsts)
    }
}

#[async_trait]
impl EventClaims for RedisClaims {
    async fn copies(&self, events: &[Event], window: Duration) -> StorageResult<Vec<bool>> {
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
        let claims: Vec<Option<Claim>> = events.iter().map(|e| self.claim(e)).collect();
        let made: Vec<&Claim> = claims.iter().flatten().collect();
        let firsts = if self.store.is_cluster() {
            self.one_by_one(&made, window_ms).await?
        } else {
            self.by_script(&made, window_ms).await?
        };
        let mut firsts = firsts.into_iter();
        Ok(claims
            .iter()
            .map(|claim| {
                claim.as_ref().is_some_and(|claim| {
                    firsts
                        .next()
                        .flatten()
                        .is_some_and(|first| first != claim.here)
                })
            })
            .collect())
    }
}
