//! [`EventClaims`] on Redis: one string per event id read from the stream,
//! `<prefix>event_id:{<customer>}:<event id>` = `<partition>:<offset>` of the first read,
//! set with `SET … NX GET PX <window>` so that the first worker to read an id records
//! its position and every later read learns it in the same command. The hash tag is the
//! customer's, as for their features.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::try_join_all;

use super::RedisStore;
use crate::events::Event;
use crate::storage::{EventClaims, StorageResult};

/// Claims in flight at once (on a cluster each key is routed on its own).
const CLAIMS_IN_FLIGHT: usize = 64;

/// [`EventClaims`] on a Redis server or cluster.
pub struct RedisClaims {
    store: Arc<RedisStore>,
}

impl RedisClaims {
    pub(super) fn new(store: Arc<RedisStore>) -> Self {
        RedisClaims { store }
    }

    /// Whether `event` is a copy of one first read at another position; records its
    /// position when it is the first read.
    async fn copy(&self, event: &Event, window_ms: u64) -> StorageResult<bool> {
        let Some(at) = event.position else {
            return Ok(false);
        };
        let key = format!(
            "{}:{}",
            self.store.key("event_id", event.customer_id.as_str()),
            event.event_id
        );
        let here = format!("{}:{}", at.partition, at.offset);
        let value = here.clone();
        let first: Option<String> = self
            .store
            .call("claim an event id", move |mut c| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("NX")
                    .arg("GET")
                    .arg("PX")
                    .arg(window_ms)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(first.is_some_and(|first| first != here))
    }
}

#[async_trait]
impl EventClaims for RedisClaims {
    async fn copies(&self, events: &[Event], window: Duration) -> StorageResult<Vec<bool>> {
        let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut out = Vec::with_capacity(events.len());
        // Chunks in order, so that two copies in one batch are claimed in stream order.
        for chunk in events.chunks(CLAIMS_IN_FLIGHT) {
            out.extend(try_join_all(chunk.iter().map(|e| self.copy(e, window_ms))).await?);
        }
        Ok(out)
    }
}
