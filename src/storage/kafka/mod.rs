//! The Kafka backend (cargo feature `kafka`): the event stream of a scaled-out
//! deployment, [`EventStream`] on a Kafka-protocol broker. The only module that knows
//! rdkafka.
//!
//! - `config.rs`: the `kafka://` value of `backends.events`;
//! - `producer.rs`: the idempotent producer (`acks=all`, lz4) and topic creation;
//! - `outbox.rs`: the durable local outboxes and the forwarders that empty them;
//! - `consumer.rs`: the workers' consumer group on the events topic;
//! - `replay.rs`: a partition of the events topic read from its start (backfills);
//! - `tests.rs`: round trips, outages and crashes against a real broker.
//!
//! Topics (`<prefix>` from the URL, default `tailor.`): `<prefix>events` (the events as
//! stored, keyed by customer id so that one customer's events stay in one partition, in
//! order), `<prefix>decisions` and `<prefix>outcomes` (their JSON, keyed by customer id).
//!
//! Delivery: ingestion acknowledges once an event is in the local events outbox
//! (`<data_dir>/outbox/events/`, fsync); the forwarder delivers the outbox at least once,
//! first deliveries in order, and the workers drop redeliveries by event id. A worker commits its
//! offsets only after the sink applied the batch.

pub mod config;
mod consumer;
mod outbox;
mod producer;
mod replay;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use self::config::KafkaConfig;
use self::outbox::{Outbox, Payload};
use self::producer::ProducerSlot;
use crate::decision::{Decision, Outcome};
use crate::events::Event;
use crate::storage::{EventLog, EventSink, EventStream, Replay, StorageError, StorageResult};
use crate::telemetry::Metrics;

/// The topics' suffixes, after the prefix.
pub const EVENTS: &str = "events";
pub const DECISIONS: &str = "decisions";
pub const OUTCOMES: &str = "outcomes";

/// [`EventStream`] on Kafka: three outboxes, their forwarders, and the workers' consumer.
pub struct KafkaStream {
    config: KafkaConfig,
    producers: Arc<ProducerSlot>,
    events: Arc<Outbox>,
    decisions: Arc<Outbox>,
    outcomes: Arc<Outbox>,
    /// The workers' group consumer while it runs (its assignment).
    group: consumer::GroupSlot,
}

impl KafkaStream {
    /// Opens the outboxes under `data_dir/outbox/` and creates the producer. Does not
    /// wait for the broker: an unreachable one only delays delivery.
    pub async fn open(config: KafkaConfig, data_dir: &Path) -> anyhow::Result<Arc<KafkaStream>> {
        let dir = data_dir.join("outbox");
        let retention = Duration::from_secs(config.dedup_window_secs);
        let open = |stream: &str, payload| {
            Outbox::open(&dir.join(stream), config.topic(stream), payload, retention).map(Arc::new)
        };
        let events = open(EVENTS, Payload::Event)?;
        let decisions = open(DECISIONS, Payload::Properties)?;
        let outcomes = open(OUTCOMES, Payload::Properties)?;
        let producers = Arc::new(ProducerSlot::new(&config)?);
        Ok(Arc::new(KafkaStream {
            config,
            producers,
            events,
            decisions,
            outcomes,
            group: consumer::GroupSlot::default(),
        }))
    }

    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }
}

/// A decision or an outcome as an outbox record: `properties` carry its JSON.
fn record(
    id: String,
    customer: &crate::customers::CustomerId,
    kind: &str,
    timestamp: chrono::DateTime<chrono::Utc>,
    body: &impl serde::Serialize,
) -> StorageResult<Event> {
    let properties = match serde_json::to_value(body) {
        Ok(serde_json::Value::Object(map)) => map,
        Ok(_) => {
            return Err(StorageError::Backend(format!(
                "a {kind} is not a JSON object"
            )))
        }
        Err(e) => return Err(StorageError::Backend(format!("encoding a {kind}: {e}"))),
    };
    Ok(Event {
        event_id: id,
        customer_id: customer.clone(),
        event_type: kind.to_owned(),
        timestamp,
        properties,
        position: None,
    })
}

#[async_trait]
impl EventStream for KafkaStream {
    fn outbox(&self) -> Arc<dyn EventLog> {
        self.events.log.clone()
    }

    fn forward(&self) {
        self.events.wake();
    }

    async fn publish_decision(&self, decision: &Decision) -> StorageResult<()> {
        let record = record(
            decision.id.clone(),
            &decision.customer_id,
            "decision",
            decision.created_at,
            decision,
        )?;
        self.decisions.push(record).await
    }

    async fn publish_outcome(&self, outcome: &Outcome) -> StorageResult<()> {
        // Outcomes have no id of their own; every one is a new record.
        let record = record(
            uuid::Uuid::now_v7().to_string(),
            &outcome.customer_id,
            "outcome",
            outcome.created_at,
            outcome,
        )?;
        self.outcomes.push(record).await
    }

    fn spawn_forwarders(
        self: Arc<Self>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        [&self.events, &self.decisions, &self.outcomes]
            .into_iter()
            .map(|outbox| {
                tokio::spawn(outbox.clone().forward(
                    self.producers.clone(),
                    self.config.clone(),
                    metrics.clone(),
                    shutdown.clone(),
                ))
            })
            .collect()
    }

    fn spawn_consumer(
        self: Arc<Self>,
        sink: Arc<dyn EventSink>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        tokio::spawn(consumer::run(
            self.config.clone(),
            self.config.topic(EVENTS),
            sink,
            self.group.clone(),
            metrics,
            shutdown,
        ))
    }

    fn assigned_partitions(&self) -> BTreeSet<i32> {
        self.group.assigned(&self.config.topic(EVENTS))
    }

    async fn replay(&self, partition: i32) -> StorageResult<Replay> {
        replay::replay(&self.config, self.config.topic(EVENTS), partition).await
    }

    async fn partitions(&self) -> StorageResult<i32> {
        replay::partitions(&self.config, self.config.topic(EVENTS)).await
    }

    fn dedup_window(&self) -> Duration {
        Duration::from_secs(self.config.dedup_window_secs)
    }

    async fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producers.get().flush(timeout).await {
            tracing::warn!(error = %e, "Kafka producer not flushed; the outbox still holds what it did not deliver");
        }
    }
}
