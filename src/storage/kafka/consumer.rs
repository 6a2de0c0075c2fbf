//! The worker's consumer: a member of the workers' group on the events topic. Each batch
//! is decoded (sealed records opened) and goes to the [`EventSink`] (appended to the
//! local log, idempotently, and applied), and only then are the consumed positions
//! committed, synchronously. A crash between the
//! two redelivers the batch: to the same worker, whose log recognises the events by id,
//! or, after a rebalance, to another, whose folds recognise them by the stream position
//! each event carries from here ([`StreamPosition`]); nothing is applied twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use super::config::KafkaConfig;
use super::decode;
use super::producer::{client_config, ensure_topics};
use crate::events::{Event, StreamPosition};
use crate::storage::{EventSink, Opened, RecordSeal, StorageError, StorageResult};
use crate::telemetry::Metrics;

/// Most messages per batch.
pub(super) const BATCH: usize = 1000;
/// How long a batch waits for more messages after its first.
const LINGER: Duration = Duration::from_millis(20);
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Messages received together, with the positions to commit once they are applied;
/// decoded (sealed ones opened) by [`Batch::decode`].
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// The messages as received, until decoded.
    messages: Vec<OwnedMessage>,
    pub events: Vec<Event>,
    /// Messages that did not decode as an event (skipped, committed with the rest).
    pub malformed: usize,
    /// Sealed messages of erased customers (skipped, committed with the rest).
    pub shredded: usize,
    /// (topic, partition) → offset of the next message to read.
    positions: BTreeMap<(String, i32), i64>,
}

/// Where the running group consumer is kept for [`GroupSlot::assigned`].
#[derive(Clone, Default)]
pub(super) struct GroupSlot(Arc<std::sync::Mutex<Option<Arc<StreamConsumer>>>>);

impl GroupSlot {
    fn set(&self, consumer: Option<Arc<StreamConsumer>>) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = consumer;
    }

    /// The partitions of `topic` the consumer holds now; none while it does not run.
    pub fn assigned(&self, topic: &str) -> BTreeSet<i32> {
        let consumer = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        consumer
            .and_then(|c| c.assignment().ok())
            .map(|list| {
                list.elements_for_topic(topic)
                    .iter()
                    .map(|e| e.partition())
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub(super) struct EventConsumer {
    // In an Arc so that the synchronous commit can run on the blocking pool.
    consumer: Arc<StreamConsumer>,
}

impl EventConsumer {
    /// Joins `config.group` on `topic` (created if missing), reading a partition from its
    /// beginning when the group has no committed offset for it.
    pub async fn subscribe(config: &KafkaConfig, topic: &str) -> StorageResult<Self> {
        ensure_topics(config, &[topic.to_owned()]).await?;
        let consumer: StreamConsumer = client_config(config)
            .set("group.id", &config.group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .create()
            .map_err(|e| StorageError::Backend(format!("creating the Kafka consumer: {e}")))?;
        consumer
            .subscribe(&[topic])
            .map_err(|e| StorageError::Unavailable(format!("subscribing to {topic}: {e}")))?;
        Ok(EventConsumer {
            consumer: Arc::new(consumer),
        })
    }

    /// Waits for the next message, then takes what else arrives within a short linger,
    /// at most [`BATCH`] messages.
    pub async fn next_batch(&self) -> StorageResult<Batch> {
        let mut batch = Batch::default();
        let first = self
            .consumer
            .recv()
            .await
            .map_err(|e| StorageError::Unavailable(format!("consuming: {e}")))?;
        batch.take(&first);
        drop(first);
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(Ok(message)) => batch.take(&message),
                // The error comes back on the next call, after this batch is done.
                Ok(Err(_)) | Err(_) => break,
            }
        }
        Ok(batch)
    }

    /// Commits the batch's positions and waits for the broker to confirm.
    pub async fn commit(&self, batch: &Batch) -> StorageResult<()> {
        if batch.positions.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for ((topic, partition), next) in &batch.positions {
            list.add_partition_offset(topic, *partition, Offset::Offset(*next))
                .map_err(|e| StorageError::Backend(format!("offset list: {e}")))?;
        }
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || consumer.commit(&list, CommitMode::Sync))
            .await
            .map_err(|e| StorageError::Backend(format!("commit task failed: {e}")))?
            .map_err(|e| StorageError::Unavailable(format!("committing offsets: {e}")))
    }

    /// Leaves the group now rather than after the session times out.
    pub fn close(self) {
        self.consumer.unsubscribe();
    }
}

impl Batch {
    fn len(&self) -> usize {
        self.messages.len()
    }

    /// Decodes the messages taken (opening sealed ones with `seal`) into `events`, each
    /// stamped with its position, counting what is skipped. `Err`: the keys cannot be
    /// read now; the messages stay for the next try.
    pub async fn decode(&mut self, seal: Option<&dyn RecordSeal>) -> StorageResult<()> {
        if self.messages.is_empty() {
            return Ok(());
        }
        let records: Vec<_> = self
            .messages
            .iter()
            .map(|m| (m.key(), m.payload()))
            .collect();
        let decoded = decode(seal, &records).await?;
        for (message, decoded) in self.messages.iter().zip(decoded) {
            match decoded {
                Opened::Event(mut event) => {
                    event.position = Some(StreamPosition {
                        partition: message.partition(),
                        offset: message.offset(),
                    });
                    self.events.push(event);
                }
                Opened::Shredded => self.shredded += 1,
                Opened::Malformed(e) => {
                    tracing::warn!(topic = message.topic(), partition = message.partition(), offset = message.offset(), error = %e, "Skipping a malformed message");
                    self.malformed += 1;
                }
            }
        }
        self.messages.clear();
        Ok(())
    }

    /// Counts the batch's events in `tailor_stream_events_applied_total`, by partition.
    fn count_applied(&self, metrics: &Metrics) {
        let mut by_partition: BTreeMap<i32, u64> = BTreeMap::new();
        for position in self.events.iter().filter_map(|e| e.position) {
            *by_partition.entry(position.partition).or_default() += 1;
        }
        for (partition, n) in by_partition {
            metrics.stream_events_applied.add(
                n,
                &[opentelemetry::KeyValue::new(
                    "partition",
                    i64::from(partition),
                )],
            );
        }
    }

    fn take(&mut self, message: &BorrowedMessage<'_>) {
        let position = (message.topic().to_owned(), message.partition());
        let next = message.offset() + 1;
        let entry = self.positions.entry(position).or_insert(next);
        *entry = (*entry).max(next);
        self.messages.push(message.detach());
    }
}

/// Runs the worker's consumer until `shutdown`: batch → sink → commit. Failures are
/// retried with backoff; a batch is committed only after the sink applied it.
pub(super) async fn run(
    config: KafkaConfig,
    topic: String,
    seal: Option<Arc<dyn RecordSeal>>,
    sink: Arc<dyn EventSink>,
    slot: GroupSlot,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = MIN_BACKOFF;
    let consumer = loop {
        let subscribed = tokio::select! {
            c = EventConsumer::subscribe(&config, &topic) => c,
            _ = shutdown.changed() => return,
        };
        match subscribed {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "Failed to join the workers' group");
                metrics.backend_error("events");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    };
    tracing::info!(topic = %topic, group = %config.group, "Consuming events");
    slot.set(Some(consumer.consumer.clone()));
    loop {
        let batch = tokio::select! {
            b = consumer.next_batch() => b,
            _ = shutdown.changed() => break,
        };
        let mut batch = match batch {
            Ok(b) => {
                backoff = MIN_BACKOFF;
                b
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "Failed to consume events");
                metrics.backend_error("events");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => break,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        if !apply(&*sink, &mut batch, seal.as_deref(), &metrics, &mut shutdown).await {
            break;
        }
        if batch.malformed > 0 {
            metrics.malformed_messages.add(batch.malformed as u64, &[]);
        }
        if batch.shredded > 0 {
            metrics
                .stream_records_shredded
                .add(batch.shredded as u64, &[]);
        }
        batch.count_applied(&metrics);
        if let Err(e) = consumer.commit(&batch).await {
            // Not lost: the batch is redelivered after a restart or a rebalance, and the
            // sink drops what it already has.
            tracing::warn!(error = %e, "Failed to commit consumed offsets");
            metrics.backend_error("events");
        }
    }
    slot.set(None);
    consumer.close();
}

/// Decodes the batch and hands its events to the sink until both succeed; `false` if
/// `shutdown` came first.
async fn apply(
    sink: &dyn EventSink,
    batch: &mut Batch,
    seal: Option<&dyn RecordSeal>,
    metrics: &Metrics,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let mut backoff = MIN_BACKOFF;
    loop {
        let attempt = async {
            batch.decode(seal).await?;
            if batch.events.is_empty() {
                return Ok(());
            }
            sink.apply(&batch.events).await
        };
        let applied = tokio::select! {
            r = attempt => r,
            _ = shutdown.changed() => return false,
        };
        match applied {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "Failed to apply consumed events");
                metrics.backend_error("events");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return false,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
