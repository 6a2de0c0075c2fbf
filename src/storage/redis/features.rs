//! Online feature state ([`FeatureStore`]).
//!
//! Keys:
//! - `customer_features:{<customer id>}`: a hash, field `<version>:<feature name>` → JSON
//!   of [`FeatureState`]. One customer's states are one key, so a read of many features
//!   is one `HMGET` and erasure is one `DEL`;
//! - `feature_customers:{<version>:<feature name>}`: a set of the customer ids that have
//!   a state of that feature version, so dropping a version visits only them. It may
//!   list customers whose state is already gone (harmless); it never misses one, because
//!   a write adds to it before it writes the state.
//!
//! Atomicity: a batch is one `MULTI` on a single server. On a cluster each customer's
//! part of a batch is one `HSET` (atomic and visible at once); different customers live
//! on different nodes and become visible one after another.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::try_join_all;
use redis::AsyncCommands;

use super::RedisStore;
use crate::customers::CustomerId;
use crate::features::{FeatureKey, FeatureState};
use crate::storage::{FeatureStore, StorageError, StorageResult};

/// How many customers `delete_key` visits per round trip.
const DELETE_BATCH: usize = 500;

/// How many customers' reads `read_many` has in flight at once.
const READ_MANY_IN_FLIGHT: usize = 64;

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
}

fn field(key: &FeatureKey) -> String {
    format!("{}:{}", key.version, key.name)
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
        // Per customer, the fields in input order (HSET keeps the last of a repeated field).
        let mut by_customer: BTreeMap<String, Vec<(String, Vec<u8>)>> = BTreeMap::new();
        let mut indexes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (customer, key, state) in &updates {
            by_customer
                .entry(self.customer_key(customer.as_str()))
                .or_default()
                .push((field(key), encode(state)?));
            indexes
                .entry(self.index_key(key))
                .or_default()
                .insert(customer.as_str().to_owned());
        }

        if !self.store.is_cluster() {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for (index, customers) in &indexes {
                pipe.sadd(index, customers).ignore();
            }
            for (hash, fields) in &by_customer {
                pipe.hset_multiple(hash, fields).ignore();
            }
            return self
                .store
                .call("write features", |mut c| async move {
                    pipe.query_async::<()>(&mut c).await
                })
                .await;
        }

        // Cluster: the indexes first, so that `delete_key` never misses a state.
        try_join_all(indexes.iter().map(|(index, customers)| {
            self.store.call("index features", move |mut c| async move {
                c.sadd::<_, _, ()>(index, customers).await
            })
        }))
        .await?;
        try_join_all(by_customer.iter().map(|(hash, fields)| {
            self.store.call("write features", move |mut c| async move {
                c.hset_multiple::<_, _, _, ()>(hash, fields).await
            })
        }))
        .await?;
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
                return Ok(());
            }
            try_join_all(customers.iter().map(|customer| {
                let hash = self.customer_key(customer);
                let field = field.clone();
                self.store.call("delete feature", |mut c| async move {
                    c.hdel::<_, _, ()>(hash, field).await
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
}
