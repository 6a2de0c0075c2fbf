//! Tests of the Kafka backend against a real Kafka-protocol broker: round trips that keep
//! each customer's order, an engine that ingests through the broker, an outage of the
//! broker, and a worker that crashes between applying a batch and committing it.
//!
//! The shared broker comes from `KAFKA_URL` (`kafka://host:port`; `scripts/test` starts
//! one). Tests that stop a broker start their own, from the `nisshi` binary on the PATH,
//! on a free port. Without them a test fails when `CI=true` and is skipped with its reason
//! otherwise. Each test works under fresh topics and a fresh consumer group.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};

use super::consumer::EventConsumer;
use super::outbox::FORWARDER;
use super::{KafkaConfig, DECISIONS, EVENTS, OUTCOMES};
use crate::app::{Background, Engine, Role};
use crate::config::Settings;
use crate::customers::CustomerId;
use crate::decision::pipeline::PersonalizeRequest;
use crate::events::ingest::LocalApply;
use crate::storage::conformance::sample_content_item;
use crate::storage::EventSink;

const VAR: &str = "KAFKA_URL";
/// Group joins take a few seconds on the test broker; a broker restart more.
const PATIENCE: Duration = Duration::from_secs(90);

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Says why a test cannot run: a failure under CI, a skip otherwise.
fn unavailable(reason: &str) {
    if in_ci() {
        panic!("{reason} (CI=true requires it; scripts/test provides it)");
    }
    eprintln!("skipped: {reason} (scripts/test provides it)");
}

/// The shared broker's `kafka://host:port`; `None` (after saying why) when none is set up.
fn shared_broker() -> Option<String> {
    match std::env::var(VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            unavailable(&format!(
                "{VAR} is not set: no Kafka broker to test against"
            ));
            None
        }
    }
}

/// `base` with fresh topics and a fresh workers' group.
fn fresh(base: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{base}?topic_prefix=t{id}.&group=g{id}&partitions=3")
}

/// A broker of this test's own: `nisshi` with in-memory storage on a fixed port, so that
/// it can be stopped and started again at the same address.
struct PrivateBroker {
    binary: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl PrivateBroker {
    /// `None` (after saying why) when `nisshi` is not on the PATH.
    fn start() -> Option<PrivateBroker> {
        let binary = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("nisshi"))
                .find(|path| path.is_file())
        });
        let Some(binary) = binary else {
            unavailable("nisshi is not on the PATH: no broker to stop and restart");
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut broker = PrivateBroker {
            binary,
            port,
            child: None,
        };
        broker.resume();
        Some(broker)
    }

    fn url(&self) -> String {
        format!("kafka://127.0.0.1:{}", self.port)
    }

    /// Starts the process and waits until its port answers.
    fn resume(&mut self) {
        assert!(self.child.is_none(), "the broker is running already");
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(&self.binary)
            .args(["broker", "--listener-url", &listener])
            .args(["--advertised-listener-url", &listener])
            .args(["--storage-engine", "memory://nisshi/"])
            // A new group's first rebalance waits this long for more members (3 s by
            // default): every test here starts a new group.
            .args(["--group-initial-rebalance-delay", "500ms"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nisshi starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nisshi did not listen on {} within 30 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the process (as a crash would) and waits for it to be gone.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Settings for an engine on a fresh data directory, events on `events`.
fn settings(dir: &std::path::Path, events: &str) -> Settings {
    let mut settings = Settings {
        data_dir: dir.to_path_buf(),
        ..Settings::default()
    };
    settings.rules.dir = String::new();
    settings.rules.plugins_dir = String::new();
    settings.backends.events = events.to_owned();
    settings
}

/// `n` events per customer, interleaved across customers, page views and purchases with
/// values, at fixed past timestamps so that two engines compute the same features.
fn sample_events(prefix: &str, customers: usize, n: usize, base: DateTime<Utc>) -> Vec<Value> {
    let mut events = Vec::new();
    for i in 0..n {
        for c in 0..customers {
            let at = base + chrono::Duration::seconds((i * customers + c) as i64);
            let (kind, properties) = if i % 3 == 2 {
                ("purchase", json!({"value": (i * 10 + c) as f64 + 0.5}))
            } else {
                ("page_view", json!({"category": "travel"}))
            };
            events.push(json!({
                "eventId": format!("{prefix}-c{c}-{i}"),
                "customerId": format!("{prefix}-c{c}"),
                "type": kind,
                "timestamp": at.to_rfc3339(),
                "properties": properties,
            }));
        }
    }
    events
}

/// `n` page views of `customer` as a client sends them (ids `<customer>-<i>`), each
/// with `properties`.
fn page_views(customer: &str, n: usize, properties: Value) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({"eventId": format!("{customer}-{i}"), "customerId": customer,
                   "type": "page_view", "properties": properties})
        })
        .collect()
}

/// The value of the feature `name` for `customer` on `engine` now.
async fn feature_value(engine: &Engine, customer: &CustomerId, name: &str) -> f64 {
    engine
        .features
        .read(customer, Some(&[name.to_owned()]), "f", Utc::now())
        .await
        .expect("features")
        .values[0]
        .value
}

fn customers_of(events: &[Value]) -> Vec<CustomerId> {
    let mut ids: Vec<String> = events
        .iter()
        .map(|e| e["customerId"].as_str().expect("customerId").to_owned())
        .collect();
    ids.sort();
    ids.dedup();
    ids.iter()
        .map(|id| CustomerId::parse("customerId", id).expect("valid id"))
        .collect()
}

/// Every customer's feature values and segments, read at `now`.
type Snapshot = BTreeMap<String, (Vec<(String, f64)>, Vec<String>)>;

async fn snapshot(engine: &Engine, customers: &[CustomerId], now: DateTime<Utc>) -> Snapshot {
    let mut out = BTreeMap::new();
    for customer in customers {
        let read = engine
            .features
            .read(customer, None, "features", now)
            .await
            .expect("features read");
        assert!(!read.degraded, "the feature read must not be degraded");
        let values = read.values.into_iter().map(|v| (v.name, v.value)).collect();
        let segments = engine
            .stores
            .segments
            .segments_of(customer)
            .await
            .expect("segments read");
        out.insert(customer.as_str().to_owned(), (values, segments));
    }
    out
}

/// A segment that depends on the events, defined the same way on every engine.
async fn define_segment(engine: &Engine) {
    engine
        .segments
        .define(
            "buyers",
            &json!({"event": "purchase", "atLeast": 2, "within": "30d"}),
            None,
        )
        .await
        .expect("segment defined");
}

/// The reference: the same events through an engine on the embedded event log.
async fn embedded_reference(events: &[Value], now: DateTime<Utc>) -> Snapshot {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(settings(dir.path(), "embedded"))
        .await
        .expect("embedded engine");
    define_segment(&engine).await;
    let background = Background::start(&engine);
    for chunk in events.chunks(25) {
        let report = engine
            .ingestor
            .ingest(chunk.to_vec())
            .await
            .expect("ingest");
        assert!(report.rejected.is_empty(), "{report:?}");
    }
    let last = engine.stores.events.last_seq().await.expect("last seq");
    assert!(
        engine.processor.wait_applied(last, PATIENCE).await,
        "the embedded engine applied its events"
    );
    let snapshot = snapshot(&engine, &customers_of(events), now).await;
    background.stop().await;
    snapshot
}

/// Polls `engine` until its snapshot equals `expected`, at most [`PATIENCE`].
async fn until_equal(engine: &Engine, expected: &Snapshot, now: DateTime<Utc>) {
    let customers: Vec<CustomerId> = expected
        .keys()
        .map(|id| CustomerId::parse("customerId", id).expect("valid id"))
        .collect();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = snapshot(engine, &customers, now).await;
        if &got == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "features and segments did not converge:\n got {got:?}\nwant {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the forwarder delivered everything in the events outbox.
async fn until_forwarded(engine: &Engine) {
    let outbox = engine.stream.as_ref().expect("an event stream").outbox();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let last = outbox.last_seq().await.expect("outbox last seq");
        let forwarded = outbox.committed_offset(FORWARDER).await.expect("offset");
        if forwarded >= last {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the outbox was not forwarded: {forwarded} of {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A message as read by [`read_raw`]: partition, key and payload.
type RawMessage = (i32, Vec<u8>, Vec<u8>);

/// Reads `topic` from its beginning in a group of its own until `n` messages arrived;
/// returns them in the order each partition delivered them.
async fn read_raw(url: &str, topic: &str, n: usize) -> Vec<RawMessage> {
    let config = KafkaConfig::parse(url).expect("valid URL");
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", config.bootstrap())
        .set("group.id", format!("reader-{}", uuid::Uuid::now_v7()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while out.len() < n {
        let message = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} messages on {topic}", out.len()))
            .expect("a message");
        out.push((
            message.partition(),
            message.key().expect("a key").to_vec(),
            message.payload().expect("a payload").to_vec(),
        ));
    }
    out
}

/// [`read_raw`], each message as (key, JSON payload).
async fn read_topic(url: &str, topic: &str, n: usize) -> Vec<(String, Value)> {
    read_raw(url, topic, n)
        .await
        .into_iter()
        .map(|(_, key, payload)| {
            (
                String::from_utf8(key).expect("utf-8 key"),
                serde_json::from_slice(&payload).expect("a JSON payload"),
            )
        })
        .collect()
}

/// Reads the events topic until `n` distinct event ids arrived; returns each event at its
/// first delivery.
async fn read_distinct_events(url: &str, topic: &str, n: usize) -> Vec<Value> {
    let config = KafkaConfig::parse(url).expect("valid URL");
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", config.bootstrap())
        .set("group.id", format!("reader-{}", uuid::Uuid::now_v7()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while out.len() < n {
        let message = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} events on {topic}", out.len()))
            .expect("a message");
        let event: Value =
            serde_json::from_slice(message.payload().expect("a payload")).expect("a JSON payload");
        if seen.insert(event["event_id"].as_str().expect("an event id").to_owned()) {
            out.push(event);
        }
    }
    out
}

/// Each customer's event ids in the order they were sent.
fn ids_by_customer<'a>(events: impl Iterator<Item = &'a Value>) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in events {
        let customer = e["customerId"]
            .as_str()
            .or_else(|| e["customer_id"].as_str())
            .expect("a customer id");
        let id = e["eventId"]
            .as_str()
            .or_else(|| e["event_id"].as_str())
            .expect("an event id");
        out.entry(customer.to_owned())
            .or_default()
            .push(id.to_owned());
    }
    out
}

/// Ingested events reach the topic keyed by customer, each customer's in order, and a
/// worker that consumes them computes the same features and segments as the embedded
/// path does from the same events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_trip_keeps_each_customers_order_and_matches_the_embedded_path() {
    let Some(base) = shared_broker() else {
        return;
    };
    let url = fresh(&base);
    let now = Utc::now();
    let events = sample_events("rt", 4, 12, now - chrono::Duration::hours(2));
    let expected = embedded_reference(&events, now).await;

    let api_dir = tempfile::tempdir().expect("tempdir");
    let api = Engine::open(settings(api_dir.path(), &url))
        .await
        .expect("api engine");
    let api_tasks = Background::start_role(&api, Role::Api);
    for chunk in events.chunks(25) {
        let report = api.ingestor.ingest(chunk.to_vec()).await.expect("ingest");
        assert_eq!(report.accepted, chunk.len(), "{report:?}");
    }
    // Acknowledged by the outbox; the api role applies nothing itself.
    assert_eq!(api.stores.events.last_seq().await.expect("last seq"), 0);

    let topic = KafkaConfig::parse(&url).expect("url").topic(EVENTS);
    let delivered = read_topic(&url, &topic, events.len()).await;
    for (key, payload) in &delivered {
        assert_eq!(
            payload["customer_id"].as_str(),
            Some(key.as_str()),
            "keyed by customer"
        );
    }
    assert_eq!(
        ids_by_customer(delivered.iter().map(|(_, p)| p)),
        ids_by_customer(events.iter()),
        "every event once, each customer's in the order sent"
    );

    let worker_dir = tempfile::tempdir().expect("tempdir");
    let worker = Engine::open(settings(worker_dir.path(), &url))
        .await
        .expect("worker engine");
    define_segment(&worker).await;
    let worker_tasks = Background::start_role(&worker, Role::Worker);
    until_equal(&worker, &expected, now).await;
    assert_eq!(
        worker.stores.events.last_seq().await.expect("last seq"),
        events.len() as u64,
        "each event stored once"
    );
    worker_tasks.stop().await;
    api_tasks.stop().await;
}

/// An API replica's outbox keeps what it delivered for the dedup window (a retry to it
/// is still a duplicate), then forgets it, so that it holds what is undelivered and one
/// window of the rest rather than everything it ever took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_outbox_records_are_forgotten_after_the_dedup_window() {
    let Some(base) = shared_broker() else {
        return;
    };
    let url = format!("{}&dedup_window_secs=2", fresh(&base));
    let events = sample_events("ob", 3, 10, Utc::now() - chrono::Duration::minutes(5));
    let dir = tempfile::tempdir().expect("tempdir");
    let api = Engine::open(settings(dir.path(), &url))
        .await
        .expect("api engine");
    let tasks = Background::start_role(&api, Role::Api);
    let report = api.ingestor.ingest(events.clone()).await.expect("ingest");
    assert_eq!(report.accepted, events.len(), "{report:?}");
    until_forwarded(&api).await;
    let outbox = api.stream.as_ref().expect("an event stream").outbox();
    let started = Instant::now();
    let retry = api.ingestor.ingest(events.clone()).await.expect("retry");
    assert_eq!(
        retry.duplicates,
        events.len(),
        "within the window: {retry:?}"
    );

    let deadline = Instant::now() + PATIENCE;
    loop {
        let held = outbox.scan(0, 1000).await.expect("scan").len();
        if held == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{held} delivered records still held"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "kept about the window: forgotten after {:?}",
        started.elapsed()
    );
    let n = events.len() as u64;
    assert_eq!(
        outbox.last_seq().await.expect("last seq"),
        n,
        "the numbering stays"
    );
    // After the window a retry is new to the replica (the workers' claims see it then).
    let late = api
        .ingestor
        .ingest(events[..1].to_vec())
        .await
        .expect("late retry");
    assert_eq!((late.accepted, late.duplicates), (1, 0), "{late:?}");
    assert_eq!(outbox.last_seq().await.expect("last seq"), n + 1);
    tasks.stop().await;
}

/// An engine in role all with events on Kafka: `trackEvents` over GraphQL is acknowledged
/// from the outbox, and once the engine's own worker has applied the events the
/// customer's features reflect them. Decisions and outcomes reach their topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_in_role_all_applies_tracked_events_and_publishes_decisions() {
    let Some(base) = shared_broker() else {
        return;
    };
    let url = fresh(&base);
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(settings(dir.path(), &url))
        .await
        .expect("engine");
    let background = Background::start_role(&engine, Role::All);
    let schema = crate::api::graphql::schema(engine.clone());
    // Authentication is on: the requests carry a frontend key's caller.
    let key = engine
        .keys
        .create(crate::auth::Role::Frontend, None, "name")
        .await
        .expect("key");
    let bearer = format!("Bearer {}", key.key.expose());
    let caller = engine.keys.caller(Some(&bearer)).await;
    let track = "mutation($e: [EventInput!]!) { trackEvents(events: $e) { accepted duplicates } }";
    let events = json!([
        {"customerId": "all-c1", "type": "page_view", "eventId": "all-1"},
        {"customerId": "all-c1", "type": "page_view", "eventId": "all-2"},
        {"customerId": "all-c1", "type": "purchase", "eventId": "all-3", "properties": {"value": 42.5}},
    ]);
    let response = schema
        .execute(
            async_graphql::Request::new(track)
                .variables(async_graphql::Variables::from_json(json!({"e": events})))
                .data(caller.clone()),
        )
        .await;
    assert!(response.errors.is_empty(), "{:?}", response.errors);
    let data = response.data.into_json().expect("json");
    assert_eq!(data["trackEvents"]["accepted"], 3);

    let customer = CustomerId::parse("customerId", "all-c1").expect("id");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let read = engine
            .features
            .read(&customer, None, "features", Utc::now())
            .await
            .expect("features");
        let value = |name: &str| {
            read.values
                .iter()
                .find(|v| v.name == name)
                .map(|v| v.value)
                .expect("a builtin feature")
        };
        if value("page_views_30d") == 2.0 {
            assert_eq!(value("purchases_30d"), 1.0);
            assert_eq!(value("revenue_30d"), 42.5);
            break;
        }
        assert!(Instant::now() < deadline, "the events were not applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Sent again: a duplicate in the outbox, nothing new anywhere.
    let response = schema
        .execute(
            async_graphql::Request::new(track)
                .variables(async_graphql::Variables::from_json(json!({"e": events})))
                .data(caller.clone()),
        )
        .await;
    let data = response.data.into_json().expect("json");
    assert_eq!(data["trackEvents"]["duplicates"], 3);

    let mut item = sample_content_item("all-i1", 1);
    item.placements = vec!["home".into()];
    item.frequency_cap = None;
    engine.upsert_content(item).await.expect("content");
    let decision = engine
        .decisions
        .personalize(PersonalizeRequest {
            customer_id: customer.clone(),
            placement: Some("home".into()),
            available_items: None,
            content_type: None,
            context: json!({}),
            count: 1,
            explain: false,
        })
        .await
        .expect("a decision");
    engine
        .decisions
        .record_outcome(&decision.id, 1.0, None, None)
        .await
        .expect("an outcome");
    let config = KafkaConfig::parse(&url).expect("url");
    let decisions = read_topic(&url, &config.topic(DECISIONS), 1).await;
    assert_eq!(decisions[0].0, "all-c1");
    assert_eq!(decisions[0].1["id"], decision.id.as_str());
    let outcomes = read_topic(&url, &config.topic(OUTCOMES), 1).await;
    assert_eq!(outcomes[0].0, "all-c1");
    assert_eq!(outcomes[0].1["decision_id"], decision.id.as_str());
    assert_eq!(outcomes[0].1["reward"], 1.0);
    background.stop().await;
}

/// The broker dies: events are still acknowledged (from the outbox), and when it comes
/// back they are all delivered, each customer's in order, and applied exactly once.
///
/// The test broker keeps everything in memory, so its restart loses the topics and the
/// group's offsets (a real broker keeps both). The worker is therefore stopped before the
/// outage and started again after it, on the same data directory and group: it finds
/// only what the outbox delivered after the restart, which is what this test is about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_acknowledged_while_the_broker_is_down_arrive_in_order_and_count_once() {
    let Some(mut broker) = PrivateBroker::start() else {
        return;
    };
    let url = fresh(&broker.url());
    let now = Utc::now();
    let before = sample_events("down-a", 2, 6, now - chrono::Duration::hours(3));
    let during = sample_events("down-b", 2, 9, now - chrono::Duration::hours(2));
    let all: Vec<Value> = before.iter().chain(&during).cloned().collect();
    let expected = embedded_reference(&all, now).await;

    let api_dir = tempfile::tempdir().expect("tempdir");
    let api = Engine::open(settings(api_dir.path(), &url))
        .await
        .expect("api engine");
    let api_tasks = Background::start_role(&api, Role::Api);
    let worker_dir = tempfile::tempdir().expect("tempdir");
    let worker = Engine::open(settings(worker_dir.path(), &url))
        .await
        .expect("worker engine");
    define_segment(&worker).await;
    let worker_tasks = Background::start_role(&worker, Role::Worker);

    let report = api.ingestor.ingest(before.clone()).await.expect("ingest");
    assert_eq!(report.accepted, before.len());
    let deadline = Instant::now() + PATIENCE;
    while worker.stores.events.last_seq().await.expect("seq") < before.len() as u64 {
        assert!(
            Instant::now() < deadline,
            "the first events were not consumed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker_tasks.stop().await;
    drop(worker);

    broker.kill();
    let report = api.ingestor.ingest(during.clone()).await.expect("ingest");
    assert_eq!(
        report.accepted,
        during.len(),
        "acknowledged with the broker down"
    );
    let outbox = api.stream.as_ref().expect("stream").outbox();
    assert!(
        outbox.committed_offset(FORWARDER).await.expect("offset") <= before.len() as u64,
        "nothing was forwarded while the broker was down"
    );
    // Some time down, so that the forwarder has failed and backed off at least once.
    tokio::time::sleep(Duration::from_secs(2)).await;

    broker.resume();
    let worker = Engine::open(settings(worker_dir.path(), &url))
        .await
        .expect("worker engine again");
    let worker_tasks = Background::start_role(&worker, Role::Worker);
    until_equal(&worker, &expected, now).await;
    assert_eq!(
        worker.stores.events.last_seq().await.expect("seq"),
        all.len() as u64,
        "every event stored once"
    );
    // On the restarted broker: every event acknowledged during the outage, each
    // customer's in order. Delivery is at least once: a batch that failed part-way is
    // sent again whole, so an event may be there twice (after its successors), and the
    // worker's dedup is what made the counts above exact.
    let topic = KafkaConfig::parse(&url).expect("url").topic(EVENTS);
    let first_deliveries = read_distinct_events(&url, &topic, during.len()).await;
    assert_eq!(
        ids_by_customer(first_deliveries.iter()),
        ids_by_customer(during.iter())
    );
    worker_tasks.stop().await;
    api_tasks.stop().await;
}

/// A worker appends and applies part of a batch, then dies before committing its
/// offsets. Started again with the same group and data directory, it receives the batch
/// again, drops what it already has, and ends with the features of a run without the
/// crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_before_committing_resumes_without_double_counting() {
    let Some(base) = shared_broker() else {
        return;
    };
    let url = fresh(&base);
    let now = Utc::now();
    let events = sample_events("crash", 3, 10, now - chrono::Duration::hours(1));
    let expected = embedded_reference(&events, now).await;

    let api_dir = tempfile::tempdir().expect("tempdir");
    let api = Engine::open(settings(api_dir.path(), &url))
        .await
        .expect("api engine");
    let api_tasks = Background::start_role(&api, Role::Api);
    let report = api.ingestor.ingest(events.clone()).await.expect("ingest");
    assert_eq!(report.accepted, events.len());
    until_forwarded(&api).await;

    // The doomed worker: its processor runs, its consumer is driven by hand.
    let worker_dir = tempfile::tempdir().expect("tempdir");
    let config = KafkaConfig::parse(&url).expect("url");
    {
        let worker = Engine::open(settings(worker_dir.path(), &url))
            .await
            .expect("worker engine");
        define_segment(&worker).await;
        let (stop, rx) = tokio::sync::watch::channel(false);
        let processor = tokio::spawn(worker.processor.clone().run(rx));
        let consumer = EventConsumer::subscribe(&config, &config.topic(EVENTS))
            .await
            .expect("consumer");
        let mut batch = tokio::time::timeout(PATIENCE, consumer.next_batch())
            .await
            .expect("a batch in time")
            .expect("a batch");
        batch.decode(None).await.expect("decoded");
        assert!(!batch.events.is_empty());
        let half = batch.events.len().div_ceil(2);
        let sink = LocalApply::new(
            worker.stores.clone(),
            worker.processor.clone(),
            Duration::ZERO,
            worker.metrics.clone(),
        );
        sink.apply(&batch.events[..half]).await.expect("applied");
        assert_eq!(
            worker.stores.events.last_seq().await.expect("seq"),
            half as u64
        );
        // Dies: no commit.
        drop(consumer);
        let _ = stop.send(true);
        processor.await.expect("processor stops");
    }

    let worker = Engine::open(settings(worker_dir.path(), &url))
        .await
        .expect("worker engine again");
    let worker_tasks = Background::start_role(&worker, Role::Worker);
    until_equal(&worker, &expected, now).await;
    assert_eq!(
        worker.stores.events.last_seq().await.expect("seq"),
        events.len() as u64,
        "redelivered events were recognised, not stored twice"
    );
    worker_tasks.stop().await;
    api_tasks.stop().await;
}

/// The events topic of a configuration, written to directly: records as the forwarder
/// writes them, or records it never would.
struct RawEvents {
    topic: String,
    producer: FutureProducer,
}

impl RawEvents {
    /// Creates the topic.
    async fn open(config: &KafkaConfig) -> RawEvents {
        let topic = config.topic(EVENTS);
        super::producer::ensure_topics(config, std::slice::from_ref(&topic))
            .await
            .expect("topic");
        let producer = ClientConfig::new()
            .set("bootstrap.servers", config.bootstrap())
            .create()
            .expect("producer");
        RawEvents { topic, producer }
    }

    /// Writes `payload` keyed by `key`, to `partition` when given; waits for delivery.
    async fn send(&self, key: &str, partition: Option<i32>, payload: &[u8]) {
        let mut record = FutureRecord::to(&self.topic).key(key).payload(payload);
        record.partition = partition;
        self.producer
            .send(record, Duration::from_secs(5))
            .await
            .map_err(|(e, _)| e)
            .expect("delivered");
    }
}

/// A page view as the forwarder stores it on the events topic.
fn stored_event(id: &str, customer: &str) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"event_id": id, "customer_id": customer, "type": "page_view",
                               "timestamp": Utc::now().to_rfc3339(), "properties": {}}),
    )
    .expect("json")
}

/// A message that is not an event is skipped and counted; the events around it are
/// applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_is_skipped_and_counted() {
    let Some(base) = shared_broker() else {
        return;
    };
    let url = fresh(&base);
    let events = RawEvents::open(&KafkaConfig::parse(&url).expect("url")).await;
    let payloads = [
        stored_event("bad-1", "bad-c1"),
        b"{not json".to_vec(),
        stored_event("bad-2", "bad-c1"),
    ];
    for payload in &payloads {
        events.send("bad-c1", None, payload).await;
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let worker = Engine::open(settings(dir.path(), &url))
        .await
        .expect("worker engine");
    let tasks = Background::start_role(&worker, Role::Worker);
    let customer = CustomerId::parse("customerId", "bad-c1").expect("id");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let value = feature_value(&worker, &customer, "page_views_30d").await;
        // The value may come first from the backfill of the built-in features, which
        // replays the partition; the consumer counts the malformed message as it
        // applies its batch.
        let counted = worker
            .metrics
            .render()
            .contains("tailor_stream_malformed_messages_total 1");
        if value == 2.0 && counted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the good events were not applied ({value}), or the malformed message not counted: {}",
            worker.metrics.render()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tasks.stop().await;
}

/// The topics a process creates keep records for `retention_hours`, as the broker says;
/// a topic created elsewhere that keeps them longer, or forever, is what it warns about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_created_with_the_configured_retention() {
    let Some(base) = shared_broker() else {
        return;
    };
    let url = format!("{}&retention_hours=48", fresh(&base));
    let config = KafkaConfig::parse(&url).expect("url");
    let dir = tempfile::tempdir().expect("tempdir");
    let api = Engine::open(settings(dir.path(), &url))
        .await
        .expect("api engine");
    let tasks = Background::start_role(&api, Role::Api);
    for stream in [EVENTS, DECISIONS, OUTCOMES] {
        let topic = config.topic(stream);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match super::producer::retention_ms(&config, &topic).await {
                Ok(Some(ms)) => {
                    assert_eq!(ms, 48 * 3_600_000, "retention of {topic}");
                    break;
                }
                other => assert!(
                    Instant::now() < deadline,
                    "the forwarder created {topic} with its retention: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            super::producer::retention_warning(&config, &topic, 48 * 3_600_000),
            None
        );
    }
    tasks.stop().await;

    // A topic that already existed, kept forever: created as an operator might.
    let kept = config.topic("kept-forever");
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new()
            .set("bootstrap.servers", config.bootstrap())
            .create()
            .expect("admin");
    let created = admin
        .create_topics(
            &[
                rdkafka::admin::NewTopic::new(&kept, 1, rdkafka::admin::TopicReplication::Fixed(1))
                    .set("retention.ms", "-1"),
            ],
            &rdkafka::admin::AdminOptions::new(),
        )
        .await
        .expect("created");
    assert!(created.iter().all(Result::is_ok), "{created:?}");
    super::producer::ensure_topics(&config, std::slice::from_ref(&kept))
        .await
        .expect("an existing topic is left as it is");
    let ms = super::producer::retention_ms(&config, &kept)
        .await
        .expect("described");
    assert_eq!(ms, Some(-1));
    let warning = super::producer::retention_warning(&config, &kept, -1).expect("a warning");
    assert!(
        warning.contains(&kept) && warning.contains("forever") && warning.contains("172800000"),
        "{warning}"
    );
    let longer =
        super::producer::retention_warning(&config, &kept, 49 * 3_600_000).expect("a warning");
    assert!(longer.contains("for 49 hours"), "{longer}");
}

/// A partition replays from its first record to its end as of the call: its events in
/// offset order, each with its position, without copies of an event within the dedup
/// window and without records that are not events; other partitions are not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_replays_from_its_start_without_copies() {
    let Some(base) = shared_broker() else {
        return;
    };
    let url = fresh(&base);
    let config = KafkaConfig::parse(&url).expect("url");
    let events = RawEvents::open(&config).await;
    let event = |id: &str| stored_event(id, "replay-c1");
    // Offsets 0–7 of partition 1: e1–e5, a copy of e2, a record that is no event, e6.
    let mut records: Vec<(i32, Vec<u8>)> = ["e1", "e2", "e3", "e4", "e5", "e2"]
        .iter()
        .map(|id| (1, event(id)))
        .collect();
    records.push((1, b"{not an event".to_vec()));
    records.push((1, event("e6")));
    records.push((0, event("elsewhere")));
    for (partition, payload) in &records {
        events.send("replay-c1", Some(*partition), payload).await;
    }
    let stream = super::KafkaStream::open(config, tempfile::tempdir().expect("dir").path())
        .await
        .expect("stream");

    let mut replay = crate::storage::EventStream::replay(&*stream, 1)
        .await
        .expect("replay");
    assert_eq!((replay.first, replay.end), (0, 8));
    let mut read = Vec::new();
    while let Some(page) = replay.pages.recv().await {
        read.extend(page.expect("page"));
    }
    let seen: Vec<(String, i32, i64)> = read
        .iter()
        .map(|e| {
            let at = e.position.expect("a position");
            (e.event_id.clone(), at.partition, at.offset)
        })
        .collect();
    let expected: Vec<(String, i32, i64)> = [
        ("e1", 0),
        ("e2", 1),
        ("e3", 2),
        ("e4", 3),
        ("e5", 4),
        ("e6", 7),
    ]
    .iter()
    .map(|(id, offset)| ((*id).to_owned(), 1, *offset))
    .collect();
    assert_eq!(seen, expected);

    let mut empty = crate::storage::EventStream::replay(&*stream, 2)
        .await
        .expect("replay of an empty partition");
    assert_eq!((empty.first, empty.end), (0, 0));
    assert!(empty.pages.recv().await.is_none(), "nothing to read");
    assert!(
        crate::storage::EventStream::assigned_partitions(&*stream).is_empty(),
        "no consumer runs: no partitions held"
    );
}

/// A version defined after an erasure is backfilled from the events topic, which still
/// holds the erased customer's events (until its retention drops them): the backfill
/// leaves them out, as the live stream does. A later version is activated only once
/// the workers have backfilled it in every partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_from_the_topic_leaves_erased_customers_out() {
    let Some(base) = shared_broker() else {
        return;
    };
    let url = fresh(&base);
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(settings(dir.path(), &url))
        .await
        .expect("engine");
    let tasks = Background::start_role(&engine, Role::All);
    let (kept, gone) = (
        CustomerId::parse("c", "kept-c1").expect("id"),
        CustomerId::parse("c", "gone-c1").expect("id"),
    );
    let mut events = page_views("kept-c1", 3, json!({}));
    events.extend(page_views("gone-c1", 2, json!({})));
    let report = engine.ingestor.ingest(events).await.expect("ingest");
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    let deadline = Instant::now() + PATIENCE;
    while feature_value(&engine, &kept, "page_views_30d").await != 3.0
        || feature_value(&engine, &gone, "page_views_30d").await != 2.0
    {
        assert!(Instant::now() < deadline, "the events were not applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    engine.erase_customer(&gone).await.expect("erased");

    engine
        .features
        .define(
            "views_again",
            json!({"kind": "count", "event_type": "page_view", "window": "30d"}),
        )
        .await
        .expect("defined");
    let stream = engine.stream.clone().expect("a stream");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let held = stream.assigned_partitions();
        let unfilled = engine
            .features
            .unfilled(&engine.features.catalog(), &held)
            .await
            .expect("marks");
        if held.len() == 3 && unfilled.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not backfilled: {held:?} held, {unfilled:?} left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(feature_value(&engine, &kept, "views_again").await, 3.0);
    let key = crate::features::FeatureKey::new("views_again", 1);
    assert_eq!(
        engine
            .stores
            .features
            .read(&gone, std::slice::from_ref(&key))
            .await
            .expect("read"),
        vec![None],
        "the erased customer's events on the topic were folded"
    );

    // A later version is activated only once every partition is backfilled into it:
    // with no worker running, nothing backfills it, and activation says why.
    tasks.stop().await;
    let v2 = engine
        .features
        .define(
            "views_again",
            json!({"kind": "count", "event_type": "page_view", "window": "7d"}),
        )
        .await
        .expect("defined");
    assert_eq!(v2.versions.keys().max(), Some(&2));
    let refused = engine
        .features
        .activate("views_again", 2)
        .await
        .expect_err("activation before the backfill");
    assert!(
        refused.to_string().contains("still being backfilled")
            && refused.to_string().contains("3 of 3 partitions"),
        "{refused}"
    );
    let tasks = Background::start_role(&engine, Role::All);
    let deadline = Instant::now() + PATIENCE;
    loop {
        match engine.features.activate("views_again", 2).await {
            Ok((entry, _)) => {
                assert_eq!(entry.active, 2, "kept after its health check");
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline && e.to_string().contains("still being backfilled"),
                "{e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(feature_value(&engine, &kept, "views_again").await, 3.0);
    tasks.stop().await;
}

/// With the data keys shared, the events topic holds each customer's events sealed: keyed
/// by an opaque tag, with no id, type or property in the clear, in the partition the
/// customer id picks (where a record keyed by the id goes too), and opened by the
/// workers. An erasure destroys the key: a replay of the partition finds nothing of the
/// customer's sealed records, while a record written in the clear before sealing began
/// is still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_topic_holds_sealed_records_that_erasure_shreds() {
    let Some(base) = shared_broker() else {
        return;
    };
    let url = fresh(&base);
    let config = KafkaConfig::parse(&url).expect("url");
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(settings(dir.path(), &url))
        .await
        .expect("engine");
    let stream = engine.stream.clone().expect("a stream");
    // What the engine does where `backends.profiles` is shared.
    stream.seal_with(engine.profiles.stream_seal());
    let tasks = Background::start_role(&engine, Role::All);

    let email = |customer: &str| json!({"email": format!("{customer}@example.com")});
    let mut events = page_views("ada-c1", 3, email("ada-c1"));
    events.extend(page_views("bob-c1", 2, email("bob-c1")));
    let report = engine.ingestor.ingest(events).await.expect("ingest");
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    // A record in the clear, keyed by the customer id, as before sealing.
    let raw = RawEvents::open(&config).await;
    raw.send("ada-c1", None, &stored_event("ada-legacy", "ada-c1"))
        .await;

    let (ada, bob) = (
        CustomerId::parse("c", "ada-c1").expect("id"),
        CustomerId::parse("c", "bob-c1").expect("id"),
    );
    let deadline = Instant::now() + PATIENCE;
    while feature_value(&engine, &ada, "page_views_30d").await != 4.0
        || feature_value(&engine, &bob, "page_views_30d").await != 2.0
    {
        assert!(
            Instant::now() < deadline,
            "the sealed events were not applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let messages = read_raw(&url, &config.topic(EVENTS), 6).await;
    let plain = messages
        .iter()
        .find(|(_, key, _)| key.as_slice() == b"ada-c1")
        .expect("the record in the clear");
    let sealed: Vec<&RawMessage> = messages
        .iter()
        .filter(|(_, key, _)| key.as_slice() != b"ada-c1")
        .collect();
    assert_eq!(sealed.len(), 5);
    let tag = |customer: &CustomerId| engine.profiles.stream_seal().tag(customer);
    for (partition, key, value) in &sealed {
        assert_eq!(value[0], crate::storage::SEALED_RECORD);
        // Whole ids: a hex tag holds "ada" by chance in about one key of 70.
        for clear in ["ada-c1", "bob-c1", "example.com", "page_view"] {
            let found = |b: &[u8]| b.windows(clear.len()).any(|w| w == clear.as_bytes());
            assert!(
                !found(key) && !found(value),
                "{clear} in the clear on the broker"
            );
        }
        let customer = if *key == tag(&ada).into_bytes() {
            &ada
        } else {
            &bob
        };
        assert_eq!(*key, tag(customer).into_bytes());
        assert_eq!(
            *partition,
            super::producer::partition_for(customer.as_str(), config.partitions),
            "in the partition its customer id picks"
        );
    }
    assert!(
        sealed.iter().any(|(p, ..)| *p == plain.0),
        "librdkafka keyed by the id picks the same partition"
    );
    assert_eq!(
        plain.0,
        super::producer::partition_for("ada-c1", config.partitions)
    );

    engine.erase_customer(&ada).await.expect("erased");
    let mut replay = stream.replay(plain.0).await.expect("replay");
    let mut read = Vec::new();
    while let Some(page) = replay.pages.recv().await {
        read.extend(page.expect("page").into_iter().map(|e| e.event_id));
    }
    read.sort();
    let expected: Vec<String> =
        if plain.0 == super::producer::partition_for("bob-c1", config.partitions) {
            vec!["ada-legacy".into(), "bob-c1-0".into(), "bob-c1-1".into()]
        } else {
            vec!["ada-legacy".into()]
        };
    assert_eq!(
        read, expected,
        "the erased customer's sealed records no longer open; the one in the clear does"
    );
    tasks.stop().await;
}
