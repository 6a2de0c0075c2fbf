//! Feature retrieval from Redis through Tailor's own [`FeatureStore`] code, for the
//! comparison with `redis-benchmark` and Feast in `benches/redis-features/run.sh`.
//!
//! ```sh
//! cargo run --release --features redis --example redis_features -- fill redis://127.0.0.1:PORT CUSTOMERS VALUES.csv
//! cargo run --release --features redis --example redis_features -- read redis://127.0.0.1:PORT CUSTOMERS SECONDS CONCURRENCY
//! ```
//!
//! - `fill` writes 20 feature states (`f00` … `f19`, version 1, one minute bucket each)
//!   for customers `000000000000` … (twelve digits: the ids `redis-benchmark -r` writes
//!   for `__rand_int__`, so it can address the same hashes), 100 customers per
//!   `FeatureStore::write`, and writes each state's summed value as CSV
//!   (`customer_id,f00,…,f19`) for the Feast side;
//! - `read` is a closed loop: `CONCURRENCY` tasks, each reading all 20 features of a
//!   uniformly drawn customer with `FeatureStore::read` (one `HMGET` on the customer's
//!   hash, each state's JSON decoded), as the decision path loads a customer's features.
//!   One second of warm-up is discarded; every read of the next `SECONDS` goes into an
//!   HDR histogram. Prints JSON with the rate and p50/p90/p99/p99.9/max in microseconds.
//!
//! All tasks share one multiplexed connection, as the engine does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tailor::customers::CustomerId;
use tailor::features::{Bucket, FeatureKey, FeatureState};
use tailor::storage::redis::{RedisConfig, RedisStore};
use tailor::storage::FeatureStore;

const FEATURES: usize = 20;
const CUSTOMERS_PER_WRITE: usize = 100;

fn customer(i: usize) -> CustomerId {
    CustomerId::parse("customer", &format!("{i:012}")).expect("a twelve-digit id is valid")
}

fn keys() -> Vec<FeatureKey> {
    (0..FEATURES)
        .map(|j| FeatureKey::new(format!("f{j:02}"), 1))
        .collect()
}

/// Feature `j` of customer `i`: one minute bucket; its sum is the value Feast serves.
fn state(i: usize, j: usize, minute: i64) -> FeatureState {
    let count = 1 + ((i * 31 + j * 7) % 50) as u32;
    FeatureState {
        applied_seq: (i * FEATURES + j) as u64,
        applied_position: None,
        buckets: vec![Bucket {
            minute,
            count,
            sum: f64::from(count) * 1.5 + j as f64 * 0.25,
        }],
        last_seen_ms: Some(minute * 60_000),
    }
}

async fn fill(features: &dyn FeatureStore, customers: usize, csv: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(csv).with_context(|| format!("Failed to create {csv}"))?,
    );
    let header: Vec<String> = (0..FEATURES).map(|j| format!("f{j:02}")).collect();
    writeln!(out, "customer_id,{}", header.join(","))?;
    let minute = chrono::Utc::now().timestamp() / 60;
    let keys = keys();
    let started = Instant::now();
    for first in (0..customers).step_by(CUSTOMERS_PER_WRITE) {
        let mut updates = Vec::with_capacity(CUSTOMERS_PER_WRITE * FEATURES);
        for i in first..customers.min(first + CUSTOMERS_PER_WRITE) {
            let mut row = vec![i.to_string()];
            for (j, key) in keys.iter().enumerate() {
                let s = state(i, j, minute);
                row.push(s.buckets[0].sum.to_string());
                updates.push((customer(i), key.clone(), s));
            }
            writeln!(out, "{}", row.join(","))?;
        }
        features
            .write(updates)
            .await
            .context("Failed to write features")?;
    }
    out.flush()?;
    println!(
        "{}",
        json!({
            "filled_customers": customers,
            "features_per_customer": FEATURES,
            "seconds": started.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}

async fn read(
    features: Arc<dyn FeatureStore>,
    customers: usize,
    seconds: f64,
    concurrency: usize,
) -> anyhow::Result<()> {
    let warm_up = Duration::from_secs(1);
    let measured = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let features = features.clone();
            tokio::spawn(async move {
                let keys = keys();
                let mut rng = StdRng::seed_from_u64(t as u64);
                // Nanoseconds, 3 significant digits.
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
                let (mut errors, mut missing) = (0u64, 0u64);
                loop {
                    let id = customer(rng.random_range(0..customers));
                    let sent = Instant::now();
                    let result = features.read(&id, &keys).await;
                    let took = sent.elapsed();
                    let since_start = sent.duration_since(start);
                    if since_start >= warm_up + measured {
                        break;
                    }
                    if since_start < warm_up {
                        continue;
                    }
                    match result {
                        Ok(states) => {
                            if states.len() != FEATURES || states.iter().any(Option::is_none) {
                                missing += 1;
                            }
                        }
                        Err(_) => errors += 1,
                    }
                    hist.record(took.as_nanos().max(1) as u64)?;
                }
                Ok::<_, anyhow::Error>((hist, errors, missing))
            })
        })
        .collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let (mut errors, mut missing) = (0u64, 0u64);
    for task in tasks {
        let (h, e, m) = task.await??;
        hist.add(h)?;
        errors += e;
        missing += m;
    }
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1e3;
    println!(
        "{}",
        json!({
            "what": "FeatureStore::read on Redis, 20 features of one customer",
            "concurrency": concurrency,
            "customers": customers,
            "seconds": seconds,
            "reads": hist.len(),
            "rate_per_s": hist.len() as f64 / seconds,
            "p50_us": us(0.5),
            "p90_us": us(0.9),
            "p99_us": us(0.99),
            "p999_us": us(0.999),
            "max_us": hist.max() as f64 / 1e3,
            "errors": errors,
            "incomplete": missing,
        })
    );
    if errors > 0 || missing > 0 {
        bail!("{errors} reads failed and {missing} came back incomplete");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: redis_features fill URL CUSTOMERS VALUES.csv | read URL CUSTOMERS SECONDS CONCURRENCY";
    let (Some(mode), Some(url), Some(customers)) = (args.first(), args.get(1), args.get(2)) else {
        bail!(usage);
    };
    let customers: usize = customers.parse().context("CUSTOMERS: a whole number")?;
    let config = RedisConfig::parse(url, Duration::from_secs(2)).map_err(anyhow::Error::msg)?;
    let store = RedisStore::connect(&config)
        .await
        .context("Failed to connect to Redis")?;
    let features: Arc<dyn FeatureStore> = Arc::new(store.features());
    match (mode.as_str(), args.get(3), args.get(4)) {
        ("fill", Some(csv), None) => fill(features.as_ref(), customers, csv).await,
        ("read", Some(seconds), Some(concurrency)) => {
            let seconds: f64 = seconds.parse().context("SECONDS: a number")?;
            let concurrency: usize = concurrency.parse().context("CONCURRENCY: a number")?;
            read(features, customers, seconds, concurrency.max(1)).await
        }
        _ => bail!(usage),
    }
}
