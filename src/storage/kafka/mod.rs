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
//! Where the data keys are shared (`backends.profiles`), the events topic's records are
//! sealed ([`RecordSeal`]): keyed by an opaque tag of the customer, sent to the partition
//! the customer id picks, and opened by [`decode`] on the way out.
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
use crate::storage::{
    EventLog, EventSink, EventStream, Opened, RecordSeal, Replay, StorageError, StorageResult,
    SEALED_RECORD,
};
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
    /// What seals the events topic's records, once [`EventStream::seal_with`] gave it.
    seal: std::sync::OnceLock<Arc<dyn RecordSeal>>,
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
            seal: std::sync::OnceLock::new(),
        }))
    }

    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }
}

/// A record as read from the events topic: its key and value, either possibly absent.
pub(super) type RawRecord<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

/// Decodes records of the events topic, in order: events stored in the
/// clear as they are, sealed ones opened with `seal`. `Err` only when `seal` cannot
/// read its keys now.
pub(super) async fn decode(
    seal: Option<&dyn RecordSeal>,
    records: &[RawRecord<'_>],
) -> StorageResult<Vec<Opened>> {
    let mut out: Vec<Option<Opened>> = Vec::with_capacity(records.len());
    let mut sealed: Vec<(&[u8], &[u8])> = Vec::new();
    for (key, value) in records {
        out.push(match (value, seal) {
            (None, _) => Some(Opened::Malformed("a message without payload".into())),
            (Some(value @ [SEALED_RECORD, ..]), Some(_)) => {
                sealed.push((key.unwrap_or_default(), value));
                None
            }
            (Some([SEALED_RECORD, ..]), None) => Some(Opened::Malformed(
                "a sealed record, and this process cannot open it: the events topic is \
                 sealed by processes whose data keys are shared (backends.profiles)"
                    .into(),
            )),
            (Some(value), _) => Some(match Event::from_stored_json(value) {
                Ok(event) => Opened::Event(event),
                Err(e) => Opened::Malformed(e.to_string()),
            }),
        });
    }
    let mut opened = match seal {
        Some(seal) if !sealed.is_empty() => seal.open(&sealed).await?.into_iter(),
        _ => Vec::new().into_iter(),
    };
    Ok(out
        .into_iter()
        .map(|o| {
            o.or_else(|| opened.next())
                .unwrap_or_else(|| Opened::Malformed("a sealed record left unopened".into()))
        })
        .collect())
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
        // Only the events topic is sealed: the decisions and outcomes topics are read by
        // other tools, and their retention bounds what they keep of an erased customer.
        [
            (&self.events, self.seal.get().cloned()),
            (&self.decisions, None),
            (&self.outcomes, None),
        ]
        .into_iter()
        .map(|(outbox, seal)| {
            tokio::spawn(outbox.clone().forward(
                self.producers.clone(),
                self.config.clone(),
                seal,
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
            self.seal.get().cloned(),
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
        replay::replay(
            &self.config,
            self.config.topic(EVENTS),
            partition,
            self.seal.get().cloned(),
        )
        .await
    }

    async fn partitions(&self) -> StorageResult<i32> {
        replay::partitions(&self.config, self.config.topic(EVENTS)).await
    }

    fn seal_with(&self, seal: Arc<dyn RecordSeal>) {
        if self.seal.set(seal).is_err() {
            tracing::warn!("The events topic's seal was given twice; the first one stays");
        }
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

#[cfg(test)]
mod decode_tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::decode;
    use crate::events::Event;
    use crate::privacy::seal::{BlindIndex, DataKey};
    use crate::privacy::stream::StreamSeal;
    use crate::privacy::{KeyRing, MasterKey};
    use crate::storage::embedded::EmbeddedStore;
    use crate::storage::{Opened, RecordSeal};

    fn event(id: &str, customer: &str) -> Event {
        let stored = json!({"event_id": id, "customer_id": customer, "type": "page_view",
                            "timestamp": "2026-01-01T00:00:00Z"});
        Event::from_stored_json(stored.to_string().as_bytes()).expect("an event")
    }

    fn kinds(decoded: &[Opened]) -> Vec<String> {
        decoded
            .iter()
            .map(|o| match o {
                Opened::Event(e) => e.event_id.clone(),
                Opened::Shredded => "shredded".into(),
                Opened::Malformed(_) => "malformed".into(),
            })
            .collect()
    }

    /// Records in the clear and sealed ones come back in their order, whatever each
    /// turned out to be; without a seal, sealed records are malformed, never guessed at.
    #[tokio::test]
    async fn records_decode_in_order_sealed_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let keys = EmbeddedStore::open(dir.path()).unwrap().stores().data_keys;
        let ring = KeyRing::new(MasterKey::generate("k1"), Vec::new()).unwrap();
        let seal = StreamSeal::new(keys, ring, Arc::new(BlindIndex::new(DataKey::generate())));
        let (b, c) = (event("b", "bob"), event("c", "cy"));
        let sealed = seal.seal(&[&b, &c]).await.unwrap();
        let [Some(b), Some(c)] = &sealed[..] else {
            panic!("{sealed:?}")
        };
        seal.forget(&event("c", "cy").customer_id).await.unwrap();
        let plain = serde_json::to_vec(&event("a", "ada")).unwrap();
        let records = [
            (Some(b"ada".as_slice()), Some(plain.as_slice())),
            (Some(b.key.as_bytes()), Some(b.value.as_slice())),
            (Some(b"x".as_slice()), Some(b"{not json".as_slice())),
            (Some(c.key.as_bytes()), Some(c.value.as_slice())),
            (None, None),
            (Some(b"ada".as_slice()), Some(plain.as_slice())),
        ];
        let decoded = decode(Some(&seal), &records).await.unwrap();
        assert_eq!(
            kinds(&decoded),
            ["a", "b", "malformed", "shredded", "malformed", "a"]
        );
        let decoded = decode(None, &records).await.unwrap();
        assert_eq!(
            kinds(&decoded),
            ["a", "malformed", "malformed", "malformed", "malformed", "a"]
        );
    }
}
