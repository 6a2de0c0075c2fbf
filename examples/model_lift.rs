//! The demo model's figures: trains on a simulated log of the demo world (as
//! `tailor serve --demo` does at first start: every demo customer, two decisions each,
//! a uniform logging policy) and compares the click rate of the model's greedy policy
//! with Thompson sampling's and a random policy's on fresh simulated customers.
//!
//! `cargo run --release --example model_lift` prints one JSON object. Optional arguments:
//! `CUSTOMERS EPOCHS BATCH_SIZE LEARNING_RATE` (defaults: the demo's 10,000 and the
//! default training parameters).

use std::time::Instant;

use chrono::{Duration, Utc};
use tailor::demo;
use tailor::model::dataset::Dataset;
use tailor::model::registry::Registry;
use tailor::model::train::{train, TrainParams};
use tailor::model::Device;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    let mut params = TrainParams::default();
    if let Some(v) = arg(1) {
        params.epochs = v.parse()?;
    }
    if let Some(v) = arg(2) {
        params.batch_size = v.parse()?;
    }
    if let Some(v) = arg(3) {
        params.learning_rate = v.parse()?;
    }
    let n = arg(0).map_or(Ok(demo::CUSTOMERS), str::parse)?;
    let now = Utc::now();
    let customers: Vec<_> = (0..n).map(|i| demo::simulated_customer(i, 1)).collect();
    let history = demo::simulate_history(
        &customers,
        2,
        now - Duration::days(8),
        now - Duration::days(1),
        7,
    )?;
    let data = Dataset::from_decisions(history, Duration::days(1), now);
    let started = Instant::now();
    let trained = train(&data, &params, &Device::Cpu, &mut |_| {})?;
    let training_seconds = started.elapsed().as_secs_f64();
    let dir = tempfile::tempdir()?;
    let registry = Registry::new(dir.path());
    let manifest = registry.save(&trained, &params, now, training_seconds)?;
    let model = registry.load(&manifest.version, &Device::Cpu)?;
    let comparison = demo::compare_policies(&model, 1_000_000, 20_000, 2026)?;
    let r = &manifest.report;
    println!(
        "{}",
        serde_json::json!({
            "decisions": r.data.decisions,
            "examples": r.data.examples,
            "positives": r.data.positives,
            "validation_examples": r.data.validation_examples,
            "epochs_run": r.epochs_run,
            "best_epoch": r.best_epoch,
            "training_seconds": training_seconds,
            "validation_auc": r.metrics.auc,
            "validation_log_loss": r.metrics.log_loss,
            "baseline_log_loss": r.metrics.baseline_log_loss,
            "validation_ece": r.metrics.ece,
            "policies": comparison,
        })
    );
    Ok(())
}
