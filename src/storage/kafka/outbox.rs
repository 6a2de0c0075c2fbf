//! The outboxes: durable local logs of what must reach a topic, and the forwarders that
//! deliver them.
//!
//! An outbox is an embedded [`EventLog`] of its own (`<data_dir>/outbox/<stream>/`):
//! durable (fsync) and idempotent on the record id. Its forwarder reads after its
//! committed offset (consumer [`FORWARDER`]), sends the batch, waits for every delivery
//! report and only then commits, so a record is delivered at least once and first in
//! append order; a broker outage only delays it. A batch that failed part-way is sent
//! again whole, so some of its records may arrive twice. Decisions and outcomes ride in an outbox as an
//! [`Event`] whose `properties` are the payload.
//!
//! Delivered records are kept for the deployment's dedup window (`dedup_window_secs`),
//! so that a client's retry to the same replica within it is still recognised there,
//! then forgotten ([`EmbeddedEventLog::forget_through`]): an outbox holds what is not
//! yet delivered and one window of what is, not everything it ever took.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use super::config::KafkaConfig;
use super::producer::{
    ensure_topics, partition_for, prepare_topic, KafkaProducer, OutRecord, ProducerSlot,
};
use crate::events::{Event, StoredEvent};
use crate::storage::embedded::events::EmbeddedEventLog;
use crate::storage::embedded::EmbeddedStore;
use crate::storage::{EventLog, RecordSeal, StorageError, StorageResult};
use crate::telemetry::Metrics;

/// The forwarder's consumer name in each outbox.
pub const FORWARDER: &str = "kafka-forwarder";
const BATCH: usize = 1000;
/// Poll interval when nothing woke the forwarder.
const IDLE_POLL: Duration = Duration::from_millis(250);
/// Delivered records forgotten per transaction.
const FORGET_CHUNK: usize = 5000;
/// Deliveries closer together than this share one entry in the forwarder's record of
/// what it delivered when.
const DELIVERY_GRAIN: Duration = Duration::from_secs(1);
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What a record's message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Payload {
    /// The event itself (its stored JSON).
    Event,
    /// The event's `properties` (a decision or an outcome as JSON).
    Properties,
}

pub(super) struct Outbox {
    pub topic: String,
    pub log: Arc<EmbeddedEventLog>,
    payload: Payload,
    /// How long delivered records are kept.
    retention: Duration,
    wake: Notify,
}

/// When the forwarder delivered through which seq, oldest first.
type Delivered = VecDeque<(Instant, u64)>;

impl Outbox {
    pub fn open(
        dir: &Path,
        topic: String,
        payload: Payload,
        retention: Duration,
    ) -> anyhow::Result<Outbox> {
        let store = EmbeddedStore::open(dir)?;
        Ok(Outbox {
            topic,
            log: Arc::new(EmbeddedEventLog::new(store)),
            payload,
            retention,
            wake: Notify::new(),
        })
    }

    /// Forgets the records delivered longer than `retention` ago, as `delivered` tells.
    async fn forget_delivered(&self, delivered: &mut Delivered) -> StorageResult<u64> {
        let mut through = None;
        while let Some(&(at, seq)) = delivered.front() {
            if at.elapsed() < self.retention {
                break;
            }
            through = Some(seq);
            delivered.pop_front();
        }
        let Some(through) = through else {
            return Ok(0);
        };
        let mut forgotten = 0;
        loop {
            let n = self.log.forget_through(through, FORGET_CHUNK).await?;
            forgotten += n;
            if n < FORGET_CHUNK as u64 {
                return Ok(forgotten);
            }
        }
    }

    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Appends one record and wakes the forwarder.
    pub async fn push(&self, event: Event) -> StorageResult<()> {
        self.log.append(std::slice::from_ref(&event)).await?;
        self.wake();
        Ok(())
    }

    /// Delivers the next batch after the committed offset; returns how many records, and
    /// notes the delivery in `delivered`.
    async fn step(
        &self,
        producer: &KafkaProducer,
        delivered: &mut Delivered,
        sealing: Option<&mut Sealing>,
    ) -> StorageResult<usize> {
        let from = self.log.committed_offset(FORWARDER).await?;
        let batch = self.log.scan(from, BATCH).await?;
        let Some(last) = batch.last().map(|e| e.seq) else {
            return Ok(0);
        };
        let records = match sealing {
            Some(sealing) if self.payload == Payload::Event => {
                sealing.records(producer, &self.topic, &batch).await?
            }
            _ => batch
                .iter()
                .map(|stored| {
                    let event = &stored.event;
                    let payload = match self.payload {
                        Payload::Event => serde_json::to_vec(event),
                        Payload::Properties => serde_json::to_vec(&event.properties),
                    }
                    .map_err(|e| StorageError::Backend(format!("encoding a message: {e}")))?;
                    Ok(OutRecord {
                        key: event.customer_id.as_str().to_owned(),
                        payload,
                        partition: None,
                    })
                })
                .collect::<StorageResult<Vec<_>>>()?,
        };
        producer.send_all(&self.topic, &records).await?;
        self.log.commit_offset(FORWARDER, last).await?;
        note_delivery(delivered, Instant::now(), last);
        Ok(batch.len())
    }

    /// Forwards until `shutdown`, retrying with backoff while the broker fails. Stopping
    /// mid-batch leaves the batch uncommitted: it is sent again on the next start. With
    /// `seal`, the events outbox sends its events sealed.
    pub async fn forward(
        self: Arc<Self>,
        producers: Arc<ProducerSlot>,
        config: KafkaConfig,
        seal: Option<Arc<dyn RecordSeal>>,
        metrics: Arc<Metrics>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = MIN_BACKOFF;
        let mut sealing = seal.map(|seal| Sealing {
            seal,
            partitions: None,
        });
        // What was delivered before this start is kept one window from now.
        let mut delivered = Delivered::new();
        match self.log.committed_offset(FORWARDER).await {
            Ok(seq) if seq > 0 => note_delivery(&mut delivered, Instant::now(), seq),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(topic = %self.topic, error = %e, "Failed to read the outbox's delivered offset")
            }
        }
        // Created with its retention before anything is sent (a broker that creates
        // topics on first use would give them its own), and checked.
        tokio::select! {
            () = prepare_topic(&config, &self.topic) => {}
            _ = shutdown.changed() => return,
        }
        loop {
            if *shutdown.borrow() {
                return;
            }
            match self.forget_delivered(&mut delivered).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::debug!(topic = %self.topic, records = n, "Forgot delivered outbox records")
                }
                // Kept, not lost: the next pass forgets them.
                Err(e) => {
                    tracing::warn!(topic = %self.topic, error = %e, "Failed to forget delivered outbox records")
                }
            }
            let producer = producers.get();
            let step = tokio::select! {
                step = self.step(&producer, &mut delivered, sealing.as_mut()) => step,
                _ = shutdown.changed() => return,
            };
            match step {
                Ok(0) => {
                    backoff = MIN_BACKOFF;
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(IDLE_POLL) => {}
                        _ = shutdown.changed() => return,
                    }
                }
                Ok(n) => {
                    backoff = MIN_BACKOFF;
                    tracing::debug!(topic = %self.topic, records = n, "Forwarded to Kafka");
                }
                Err(e) => {
                    tracing::warn!(topic = %self.topic, error = %e, retry_in = ?backoff, "Failed to forward to Kafka; the records stay in the outbox");
                    metrics.backend_error("events");
                    producers.replace(&producer);
                    let retry = async {
                        tokio::time::sleep(backoff).await;
                        // A broker that restarted empty has lost its topics.
                        if let Err(e) =
                            ensure_topics(&config, std::slice::from_ref(&self.topic)).await
                        {
                            tracing::debug!(error = %e, "Failed to ensure the topic");
                        }
                    };
                    tokio::select! {
                        _ = retry => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// How often the forwarder of sealed records reads the topic's partition count again.
const PARTITIONS_TTL: Duration = Duration::from_secs(10);

/// The events outbox's sealing: the seal, and the topic's partition count as last read.
pub(super) struct Sealing {
    seal: Arc<dyn RecordSeal>,
    partitions: Option<(Instant, i32)>,
}

impl Sealing {
    /// The batch's events sealed, each sent to the partition its customer id picks
    /// ([`partition_for`]); events of customers erased meanwhile are left out.
    async fn records(
        &mut self,
        producer: &KafkaProducer,
        topic: &str,
        batch: &[StoredEvent],
    ) -> StorageResult<Vec<OutRecord>> {
        let partitions = match self.partitions {
            Some((at, n)) if at.elapsed() < PARTITIONS_TTL => n,
            _ => {
                let n = producer.partitions(topic).await?;
                self.partitions = Some((Instant::now(), n));
                n
            }
        };
        let events: Vec<&Event> = batch.iter().map(|stored| &stored.event).collect();
        let sealed = self.seal.seal(&events).await?;
        let mut records = Vec::with_capacity(sealed.len());
        let mut erased = 0;
        for (event, sealed) in events.iter().zip(sealed) {
            match sealed {
                Some(sealed) => records.push(OutRecord {
                    key: sealed.key,
                    payload: sealed.value,
                    partition: Some(partition_for(event.customer_id.as_str(), partitions)),
                }),
                None => erased += 1,
            }
        }
        if erased > 0 {
            tracing::info!(
                topic,
                events = erased,
                "Not sending events of customers erased since they were accepted"
            );
        }
        Ok(records)
    }
}

/// Notes that everything through `seq` was delivered at `at` (a delivery within
/// [`DELIVERY_GRAIN`] of the last noted one moves that entry on instead).
fn note_delivery(delivered: &mut Delivered, at: Instant, seq: u64) {
    match delivered.back_mut() {
        Some((last_at, last_seq)) if at.duration_since(*last_at) < DELIVERY_GRAIN => {
            *last_seq = (*last_seq).max(seq);
        }
        _ => delivered.push_back((at, seq)),
    }
}
