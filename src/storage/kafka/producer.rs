//! The producer: idempotent, `acks=all`, lz4-compressed; sends a batch in order and
//! waits for every delivery report.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::{Client, ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer, PurgeConfig};
use rdkafka::util::Timeout;

use super::config::KafkaConfig;
use crate::storage::{StorageError, StorageResult};

/// How long librdkafka keeps trying to deliver one message (retries included) before it
/// reports the delivery as failed; the forwarder then sends the batch again.
pub(super) const MESSAGE_TIMEOUT: Duration = Duration::from_secs(15);

const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings every client of this backend shares.
pub(super) fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", config.bootstrap())
        .set("client.id", "tailor")
        // Topics recreated after a broker restart are noticed within seconds.
        .set("topic.metadata.refresh.interval.ms", "2000")
        .set("reconnect.backoff.max.ms", "1000")
        .set("socket.connection.setup.timeout.ms", "5000");
    c
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::Unavailable(format!("{what}: {e}"))
}

pub(super) struct KafkaProducer {
    inner: FutureProducer,
}

/// One message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OutRecord {
    pub key: String,
    pub payload: Vec<u8>,
    /// `None`: the partition librdkafka's partitioner picks for the key.
    pub partition: Option<i32>,
}

/// The partition librdkafka's default partitioner (`consistent_random`) picks for a
/// non-empty `key` among `partitions`: CRC-32 of the key, modulo the count. A sealed
/// record is keyed by a tag but sent where its customer id would go, so a customer's
/// records stay in the partition they were in before sealing.
pub(super) fn partition_for(key: &str, partitions: i32) -> i32 {
    let partitions = u32::try_from(partitions.max(1)).unwrap_or(1);
    (crc32fast::hash(key.as_bytes()) % partitions) as i32
}

impl KafkaProducer {
    pub fn new(config: &KafkaConfig) -> StorageResult<Self> {
        let inner = client_config(config)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .set(
                "message.timeout.ms",
                MESSAGE_TIMEOUT.as_millis().to_string(),
            )
            .create()
            .map_err(|e| StorageError::Backend(format!("creating the Kafka producer: {e}")))?;
        Ok(KafkaProducer { inner })
    }

    /// Queues every record in order (the idempotent producer keeps that order within a
    /// partition and never leaves a gap), then waits for every delivery report. `Err` if
    /// any record was not delivered; some others may have been, so the caller sends the
    /// whole batch again and consumers drop what they already have.
    pub async fn send_all(&self, topic: &str, records: &[OutRecord]) -> StorageResult<()> {
        let mut deliveries: Vec<DeliveryFuture> = Vec::with_capacity(records.len());
        for out in records {
            let mut record = FutureRecord::to(topic).key(&out.key).payload(&out.payload);
            if let Some(partition) = out.partition {
                record = record.partition(partition);
            }
            loop {
                match self.inner.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((e, back))
                        if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) =>
                    {
                        // The local queue is full: let librdkafka drain it.
                        record = back;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err((e, _)) => return Err(unavailable("queueing a message", e)),
                }
            }
        }
        // Every report, even after a failure: the batch is settled before it is retried.
        let mut failure = None;
        for delivery in deliveries {
            let error = match delivery.await {
                Ok(Ok(_)) => continue,
                Ok(Err((e, _))) => unavailable("delivering a message", e),
                Err(_) => unavailable("delivering a message", "producer closed"),
            };
            failure.get_or_insert(error);
        }
        failure.map_or(Ok(()), Err)
    }

    /// How many partitions `topic` has, as the broker says now.
    pub async fn partitions(&self, topic: &str) -> StorageResult<i32> {
        let inner = self.inner.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || count_partitions(inner.client(), &topic))
            .await
            .map_err(|e| StorageError::Backend(format!("metadata task failed: {e}")))?
    }

    /// Waits for the queued messages to be delivered, at most `timeout`.
    pub async fn flush(&self, timeout: Duration) -> StorageResult<()> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.flush(Timeout::After(timeout)))
            .await
            .map_err(|e| StorageError::Backend(format!("flush task failed: {e}")))?
            .map_err(|e| unavailable("flushing the producer", e))
    }
}

/// The producer the forwarders share, replaced by a fresh one after a failed batch.
///
/// A fresh producer is a fresh idempotent session (new producer id, sequences from 0):
/// a broker that lost the old session's state (restarted without it, or expired it
/// during a long outage) refuses that session's next messages until they time out,
/// but accepts a new one's.
pub(super) struct ProducerSlot {
    config: KafkaConfig,
    current: parking_lot::Mutex<Arc<KafkaProducer>>,
}

impl ProducerSlot {
    pub fn new(config: &KafkaConfig) -> StorageResult<Self> {
        Ok(ProducerSlot {
            config: config.clone(),
            current: parking_lot::Mutex::new(Arc::new(KafkaProducer::new(config)?)),
        })
    }

    pub fn get(&self) -> Arc<KafkaProducer> {
        self.current.lock().clone()
    }

    /// Replaces `failed` with a fresh producer, unless another forwarder already did.
    /// What `failed` still holds is purged: its senders have their reports, and their
    /// records are still in their outboxes.
    pub fn replace(&self, failed: &Arc<KafkaProducer>) {
        let fresh = match KafkaProducer::new(&self.config) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                tracing::warn!(error = %e, "Failed to create a fresh Kafka producer");
                return;
            }
        };
        let old = {
            let mut current = self.current.lock();
            if !Arc::ptr_eq(&current, failed) {
                return;
            }
            std::mem::replace(&mut *current, fresh)
        };
        old.inner.purge(PurgeConfig::default().queue().inflight());
        // Destroying a client may wait for its threads: not on the executor.
        tokio::task::spawn_blocking(move || drop(old));
    }
}

/// How many partitions `topic` has, as the broker tells `client` now (blocking).
pub(super) fn count_partitions<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
) -> StorageResult<i32> {
    let metadata = client
        .fetch_metadata(Some(topic), ADMIN_TIMEOUT)
        .map_err(|e| unavailable(&format!("reading the metadata of {topic}"), e))?;
    metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.partitions().len() as i32)
        .ok_or_else(|| unavailable(topic, "not known to the broker"))
}

pub(super) fn admin_client(
    config: &KafkaConfig,
) -> StorageResult<AdminClient<DefaultClientContext>> {
    client_config(config)
        .create()
        .map_err(|e| StorageError::Backend(format!("creating the Kafka admin client: {e}")))
}

fn admin_options() -> AdminOptions {
    AdminOptions::new()
        .operation_timeout(Some(ADMIN_TIMEOUT))
        .request_timeout(Some(ADMIN_TIMEOUT))
}

/// Creates the topics that do not exist yet (`config.partitions`, `config.replication`,
/// `retention.ms` from `config.retention_hours`); existing topics are left as they are.
pub(super) async fn ensure_topics(config: &KafkaConfig, topics: &[String]) -> StorageResult<()> {
    let admin = admin_client(config)?;
    let retention = config.retention_ms().to_string();
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                config.partitions,
                TopicReplication::Fixed(config.replication),
            )
            .set("retention.ms", &retention)
        })
        .collect();
    let options = admin_options();
    let results = tokio::time::timeout(ADMIN_TIMEOUT, admin.create_topics(&new, &options))
        .await
        .map_err(|_| unavailable("creating topics", "timed out"))?
        .map_err(|e| unavailable("creating topics", e))?;
    for result in results {
        match result {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(unavailable(&format!("creating topic {topic}"), code));
            }
        }
    }
    Ok(())
}

/// The `retention.ms` the broker has for `topic` (-1: forever); `None` where it does not
/// say.
pub(super) async fn retention_ms(config: &KafkaConfig, topic: &str) -> StorageResult<Option<i64>> {
    let admin = admin_client(config)?;
    let resources = [ResourceSpecifier::Topic(topic)];
    let options = admin_options();
    let results = tokio::time::timeout(ADMIN_TIMEOUT, admin.describe_configs(&resources, &options))
        .await
        .map_err(|_| unavailable("describing a topic", "timed out"))?
        .map_err(|e| unavailable("describing a topic", e))?;
    let Some(result) = results.into_iter().next() else {
        return Ok(None);
    };
    let resource =
        result.map_err(|code| unavailable(&format!("describing topic {topic}"), code))?;
    Ok(resource
        .get("retention.ms")
        .and_then(|entry| entry.value.as_deref())
        .and_then(|value| value.parse().ok()))
}

/// What to warn about a topic that keeps records for `retention_ms` (as the broker says)
/// when this process creates its topics with `config.retention_hours`; `None` when it
/// keeps them no longer.
pub(super) fn retention_warning(
    config: &KafkaConfig,
    topic: &str,
    retention_ms: i64,
) -> Option<String> {
    let kept = if retention_ms < 0 {
        "forever".to_owned()
    } else if retention_ms > config.retention_ms() {
        format!("for {} hours", retention_ms / 3_600_000)
    } else {
        return None;
    };
    Some(format!(
        "Topic {topic} keeps records {kept} (retention.ms {retention_ms}), longer than \
         retention_hours ({} hours): an erased customer's records stay on the broker that long; \
         set the topic's retention.ms to at most {}",
        config.retention_hours,
        config.retention_ms()
    ))
}

/// Creates `topic` if it is missing, then warns when it keeps records longer than
/// `config.retention_hours`. Failures only log: forwarding and consuming retry on their
/// own.
pub(super) async fn prepare_topic(config: &KafkaConfig, topic: &str) {
    if let Err(e) = ensure_topics(config, &[topic.to_owned()]).await {
        tracing::debug!(topic, error = %e, "Failed to ensure the topic");
        return;
    }
    match retention_ms(config, topic).await {
        Ok(Some(ms)) => {
            if let Some(warning) = retention_warning(config, topic, ms) {
                tracing::warn!("{warning}");
            }
        }
        Ok(None) => {
            tracing::warn!(
                topic,
                "The broker does not say how long this topic keeps records"
            );
        }
        Err(e) => tracing::debug!(topic, error = %e, "Failed to read the topic's retention"),
    }
}
