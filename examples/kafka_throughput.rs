//! Events per second end to end through a Kafka-protocol broker: an engine in role `api`
//! ingests (acknowledged from its outbox), its forwarder delivers to the broker, an engine
//! in role `worker` consumes, appends and applies to features and segments. Both run in
//! this process, each on its own fresh data directory, under fresh topics and group.
//!
//! ```sh
//! cargo run --release --features kafka --example kafka_throughput -- kafka://127.0.0.1:9092 [EVENTS]
//! ```
//!
//! With `FEATURES_REDIS=redis://…` (a build with `--features kafka,redis`), features and
//! segments live on that Redis, as in a scaled-out deployment, and the worker claims the
//! event ids it reads there; append `&dedup_window_secs=0` to the broker URL to measure
//! the same without the claims.
//!
//! With `PROFILES_REDIS=redis://…` too, profiles and their data keys live on that Redis
//! (under one master key, written to a temporary file), so the engines share them, and
//! the events topic's records are sealed per customer.
//!
//! Prints the ingest rate (acknowledged) and the end-to-end rate (first event ingested to
//! last event applied by the worker), as JSON. Then defines a new feature on the worker
//! and times its backfill from the events topic (every partition replayed from its start
//! and folded), as `backfill_events_per_second`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::Utc;
use serde_json::json;
use tailor::app::{Background, Engine, Role};
use tailor::config::Settings;

const CUSTOMERS: usize = 1_000;
const PER_REQUEST: usize = 500;

/// `redis`: where features and segments live, when not in the embedded store; `profiles`:
/// where profiles and data keys live (Redis, with the master key in `key_file`).
fn settings(
    dir: &std::path::Path,
    events: &str,
    redis: Option<&str>,
    profiles: Option<(&str, &std::path::Path)>,
) -> Settings {
    let mut settings = Settings {
        data_dir: dir.to_path_buf(),
        ..Settings::default()
    };
    settings.rules.dir = String::new();
    settings.rules.plugins_dir = String::new();
    settings.backends.events = events.to_owned();
    if let Some(redis) = redis {
        settings.backends.features = redis.to_owned();
        settings.backends.segments = redis.to_owned();
    }
    if let Some((redis, key_file)) = profiles {
        settings.backends.profiles = redis.to_owned();
        settings.encryption.key_file = key_file.display().to_string();
    }
    settings
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(broker) = args.next() else {
        bail!("usage: kafka_throughput kafka://host:port [EVENTS]");
    };
    let total: usize = match args.next() {
        Some(n) => n.parse().context("EVENTS: a whole number")?,
        None => 100_000,
    };
    let id = uuid::Uuid::now_v7().simple().to_string();
    // Parameters given with the broker (`kafka://h:p?dedup_window_secs=0`) are kept.
    let (broker, given) = broker.split_once('?').unwrap_or((&broker, ""));
    let url = format!("{broker}?topic_prefix=bench{id}.&group=bench{id}&{given}");

    let api_dir = tempfile::tempdir()?;
    let worker_dir = tempfile::tempdir()?;
    let redis = std::env::var("FEATURES_REDIS")
        .ok()
        .map(|r| format!("{r}?prefix=bench{id}:"));
    let key_dir = tempfile::tempdir()?;
    let key_file = key_dir.path().join("master.key");
    let profiles = match std::env::var("PROFILES_REDIS") {
        Ok(r) => {
            let key: [u8; 32] = rand::random();
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            std::fs::write(&key_file, hex)?;
            Some(format!("{r}?prefix=bench{id}:"))
        }
        Err(_) => None,
    };
    let profiles = profiles.as_deref().map(|p| (p, key_file.as_path()));
    let api = Engine::open(settings(api_dir.path(), &url, redis.as_deref(), profiles)).await?;
    let worker = Engine::open(settings(
        worker_dir.path(),
        &url,
        redis.as_deref(),
        profiles,
    ))
    .await?;
    let api_tasks = Background::start_role(&api, Role::Api);
    let worker_tasks = Background::start_role(&worker, Role::Worker);

    let base = Utc::now() - chrono::Duration::hours(1);
    let requests: Vec<Vec<serde_json::Value>> = (0..total)
        .collect::<Vec<_>>()
        .chunks(PER_REQUEST)
        .map(|chunk| {
            chunk
                .iter()
                .map(|&i| {
                    json!({
                        "eventId": format!("{id}-{i}"),
                        "customerId": format!("c{}", i % CUSTOMERS),
                        "type": if i % 5 == 0 { "purchase" } else { "page_view" },
                        "timestamp": (base + chrono::Duration::milliseconds(i as i64)).to_rfc3339(),
                        "properties": {"value": 10.0},
                    })
                })
                .collect()
        })
        .collect();

    let started = Instant::now();
    for batch in requests {
        let report = api.ingestor.ingest(batch).await?;
        if !report.rejected.is_empty() {
            bail!("rejected events: {:?}", report.rejected);
        }
    }
    let ingested = started.elapsed();

    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let last = worker.stores.events.last_seq().await?;
        if last >= total as u64 && worker.processor.applied() >= last {
            break;
        }
        if Instant::now() > deadline {
            bail!("the worker applied only {last} of {total} events in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let applied = started.elapsed();

    // A new version, backfilled from the topic: every partition the worker holds.
    let backfill_started = Instant::now();
    worker
        .features
        .define(
            "bench_purchases_30d",
            json!({"kind": "count", "event_type": "purchase", "window": "30d"}),
        )
        .await?;
    let held = worker
        .stream
        .as_ref()
        .context("the worker has an event stream")?
        .assigned_partitions();
    loop {
        worker.processor.backfill_assigned().await?;
        let catalog = worker.features.catalog();
        if worker.features.unfilled(&catalog, &held).await?.is_empty() {
            break;
        }
    }
    let backfilled = backfill_started.elapsed();
    let sample = worker
        .features
        .read(
            &tailor::customers::CustomerId::parse("customerId", "c0")?,
            Some(&["bench_purchases_30d".to_owned()]),
            "features",
            Utc::now(),
        )
        .await?;
    worker_tasks.stop().await;
    api_tasks.stop().await;

    let rate = |d: Duration| (total as f64 / d.as_secs_f64()).round();
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "events": total,
            "customers": CUSTOMERS,
            "features": if redis.is_some() { "redis" } else { "embedded" },
            "profiles": if profiles.is_some() { "redis (events topic sealed)" } else { "embedded" },
            "broker_url": url,
            "events_per_request": PER_REQUEST,
            "ingest_seconds": ingested.as_secs_f64(),
            "ingest_events_per_second": rate(ingested),
            "end_to_end_seconds": applied.as_secs_f64(),
            "end_to_end_events_per_second": rate(applied),
            "backfill_partitions": held.len(),
            "backfill_seconds": backfilled.as_secs_f64(),
            "backfill_events_per_second": rate(backfilled),
            "backfilled_value_of_c0": sample.values.first().map(|v| v.value),
        }))?
    );
    Ok(())
}
