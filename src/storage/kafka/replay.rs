//! Reading one partition of the events topic from its start ([`EventStream::replay`]):
//! the history a new feature version is backfilled from. Every worker agrees on a
//! partition's records, whichever of them consumed it when, so a version backfilled
//! from here counts a customer's whole history even after the partition moved between
//! workers.
//!
//! [`EventStream::replay`]: crate::storage::EventStream::replay

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::config::KafkaConfig;
use super::decode;
use super::producer::{admin_client, client_config, count_partitions};
use crate::events::{Event, StreamPosition};
use crate::storage::{Opened, RecordSeal, Replay, StorageError, StorageResult};

/// Events per page handed to the reader.
const PAGE: usize = 2048;
/// Pages read ahead of the reader.
const AHEAD: usize = 2;
/// How long the broker may send nothing before the replay fails.
const STALL: Duration = Duration::from_secs(30);
const WATERMARKS_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(200);

/// Starts reading `partition` of `topic` from its first retained record to its end now,
/// opening sealed records with `seal`.
pub(super) async fn replay(
    config: &KafkaConfig,
    topic: String,
    partition: i32,
    seal: Option<Arc<dyn RecordSeal>>,
) -> StorageResult<Replay> {
    let client = client_config(config)
        .set("group.id", format!("{}.replay", config.group))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .to_owned();
    let window_ms =
        i64::try_from(config.dedup_window_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let (consumer, first, end) = {
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || -> StorageResult<_> {
            let consumer: BaseConsumer = client.create().map_err(|e| {
                StorageError::Backend(format!("creating the Kafka replay consumer: {e}"))
            })?;
            let (first, end) = consumer
                .fetch_watermarks(&topic, partition, WATERMARKS_TIMEOUT)
                .map_err(|e| {
                    StorageError::Unavailable(format!(
                        "reading the offsets of {topic} partition {partition}: {e}"
                    ))
                })?;
            Ok((consumer, first, end))
        })
        .await
        .map_err(|e| StorageError::Backend(format!("replay task failed: {e}")))??
    };
    let (pages, rx) = mpsc::channel(AHEAD);
    if first < end {
        let (raw, raw_rx) = mpsc::channel(AHEAD);
        let reader_topic = topic.clone();
        tokio::task::spawn_blocking(move || {
            let mut reader = Reader {
                topic: reader_topic,
                partition,
                end,
                page: Vec::with_capacity(PAGE),
                pages: raw,
            };
            if let Err(e) = reader.read(&consumer, first) {
                let _ = reader.pages.blocking_send(Err(e));
            }
        });
        tokio::spawn(decode_pages(
            topic,
            partition,
            seal,
            Copies::new(window_ms),
            raw_rx,
            pages,
        ));
    }
    Ok(Replay {
        first,
        end,
        pages: rx,
    })
}

/// How many partitions `topic` has now.
pub(super) async fn partitions(config: &KafkaConfig, topic: String) -> StorageResult<i32> {
    let admin = admin_client(config)?;
    tokio::task::spawn_blocking(move || count_partitions(admin.inner(), &topic))
        .await
        .map_err(|e| StorageError::Backend(format!("metadata task failed: {e}")))?
}

/// Reads a partition's records, a page at a time, on a blocking thread.
struct Reader {
    topic: String,
    partition: i32,
    end: i64,
    page: Vec<OwnedMessage>,
    pages: mpsc::Sender<StorageResult<Vec<OwnedMessage>>>,
}

impl Reader {
    /// Reads from `first` to the end, sending full pages; stops early when the receiver
    /// is gone.
    fn read(&mut self, consumer: &BaseConsumer, first: i64) -> StorageResult<()> {
        let (topic, partition) = (self.topic.clone(), self.partition);
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&topic, partition, Offset::Offset(first))
            .map_err(|e| StorageError::Backend(format!("replay offset list: {e}")))?;
        consumer.assign(&list).map_err(|e| {
            StorageError::Unavailable(format!("reading {topic} partition {partition}: {e}"))
        })?;
        let mut last_heard = Instant::now();
        let mut last_error = None;
        let mut next = first;
        while next < self.end {
            match consumer.poll(POLL) {
                Some(Ok(message)) => {
                    last_heard = Instant::now();
                    next = message.offset() + 1;
                    if message.offset() >= self.end {
                        break;
                    }
                    self.page.push(message.detach());
                    if self.page.len() == PAGE && !self.send() {
                        return Ok(());
                    }
                }
                // The partition's end now, at or after the end when the replay began
                // (offsets before it without a record: compacted, or control records).
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => last_error = Some(e.to_string()),
                None => {}
            }
            if last_heard.elapsed() > STALL {
                return Err(StorageError::Unavailable(format!(
                    "reading {topic} partition {partition}: nothing for {}s at offset {next} of {}{}",
                    STALL.as_secs(),
                    self.end,
                    last_error.map(|e| format!(" ({e})")).unwrap_or_default()
                )));
            }
        }
        self.send();
        Ok(())
    }

    /// Sends the page; `false` when the receiver is gone.
    fn send(&mut self) -> bool {
        if self.page.is_empty() {
            return true;
        }
        let page = std::mem::replace(&mut self.page, Vec::with_capacity(PAGE));
        self.pages.blocking_send(Ok(page)).is_ok()
    }
}

/// Decodes the reader's pages into events (sealed records opened), each stamped with its
/// position, leaving out copies, records that are not events and records of erased
/// customers. Stops at the first error, which it passes on, or when the receiver is gone.
async fn decode_pages(
    topic: String,
    partition: i32,
    seal: Option<Arc<dyn RecordSeal>>,
    mut copies: Copies,
    mut raw: mpsc::Receiver<StorageResult<Vec<OwnedMessage>>>,
    pages: mpsc::Sender<StorageResult<Vec<Event>>>,
) {
    let (mut malformed, mut copied, mut shredded) = (0u64, 0u64, 0u64);
    while let Some(messages) = raw.recv().await {
        let decoded = match messages {
            Ok(messages) => {
                let records: Vec<_> = messages.iter().map(|m| (m.key(), m.payload())).collect();
                decode(seal.as_deref(), &records)
                    .await
                    .map(|decoded| (messages, decoded))
            }
            Err(e) => Err(e),
        };
        let (messages, decoded) = match decoded {
            Ok(d) => d,
            Err(e) => {
                let _ = pages.send(Err(e)).await;
                return;
            }
        };
        let mut page = Vec::with_capacity(messages.len());
        for (message, decoded) in messages.iter().zip(decoded) {
            match decoded {
                Opened::Event(mut event) => {
                    let written = match message.timestamp().to_millis() {
                        Some(ms) => ms,
                        None => event.timestamp.timestamp_millis(),
                    };
                    if copies.is_copy(&event.event_id, written) {
                        copied += 1;
                        continue;
                    }
                    event.position = Some(StreamPosition {
                        partition,
                        offset: message.offset(),
                    });
                    page.push(event);
                }
                Opened::Shredded => shredded += 1,
                Opened::Malformed(_) => malformed += 1,
            }
        }
        if !page.is_empty() && pages.send(Ok(page)).await.is_err() {
            return;
        }
    }
    if malformed > 0 || copied > 0 || shredded > 0 {
        tracing::info!(topic = %topic, partition, malformed, copies = copied, erased = shredded, "Replay skipped records that are not events, copies of events and records of erased customers");
    }
}

/// The event ids read within the dedup window, by the time their first record was
/// written: a later record with one of them is a copy (as the workers' claims see it).
struct Copies {
    window_ms: i64,
    first_written: HashMap<String, i64>,
    order: VecDeque<(i64, String)>,
}

impl Copies {
    fn new(window_ms: i64) -> Self {
        Copies {
            window_ms,
            first_written: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Whether `id` was first written within the window before `written` (ms); records
    /// it as first written now otherwise.
    fn is_copy(&mut self, id: &str, written: i64) -> bool {
        if self.window_ms == 0 {
            return false;
        }
        while let Some((at, _)) = self.order.front() {
            if written.saturating_sub(*at) <= self.window_ms {
                break;
            }
            if let Some((at, old)) = self.order.pop_front() {
                if self.first_written.get(&old) == Some(&at) {
                    self.first_written.remove(&old);
                }
            }
        }
        if self.first_written.contains_key(id) {
            return true;
        }
        self.first_written.insert(id.to_owned(), written);
        self.order.push_back((written, id.to_owned()));
        false
    }
}

#[cfg(test)]
mod tests {
    use super::Copies;

    #[test]
    fn copies_are_recognised_within_the_window_only() {
        let mut copies = Copies::new(1_000);
        assert!(!copies.is_copy("a", 0));
        assert!(!copies.is_copy("b", 500));
        assert!(copies.is_copy("a", 900), "a copy within the window");
        assert!(copies.is_copy("a", 1_000), "at the window's edge");
        assert!(
            !copies.is_copy("a", 1_001),
            "past the window: a new first record"
        );
        assert!(copies.is_copy("b", 1_400));
        assert!(copies.is_copy("a", 2_000));
        assert!(!copies.is_copy("b", 2_000));
        let mut off = Copies::new(0);
        assert!(!off.is_copy("a", 0));
        assert!(!off.is_copy("a", 0), "no window: nothing is a copy");
    }
}
