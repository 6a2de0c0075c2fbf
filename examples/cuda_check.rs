//! CPU against CUDA on one machine: trains the demo model (as `benches/model.rs` does), loads
//! the saved version on the CPU and on the first GPU, scores the same batches on both and
//! prints one JSON object: the largest absolute score difference per batch size, and the
//! timings of encoding + forward pass (`score`) and of the forward pass alone (`forward`),
//! median and p90 in microseconds. A short training run on each device is timed too.
//!
//! Needs the `cuda` feature and an NVIDIA GPU:
//! `cargo run --release --features cuda --example cuda_check [ITERATIONS] [TOLERANCE]`
//! (defaults 50 and 1e-4). Exits with status 1 when a score differs by more than TOLERANCE,
//! 2 when no GPU can be opened.

use std::sync::Arc;
use std::time::Instant;

use chrono::{Duration, Utc};
use tailor::demo;
use tailor::model::dataset::Dataset;
use tailor::model::registry::Registry;
use tailor::model::schema::{EncodedBatch, ScoreContext};
use tailor::model::serving::{LoadedModel, ScoreRequest};
use tailor::model::train::{train, TrainParams};
use tailor::model::Device;

const BATCH_ROWS: [usize; 6] = [1, 20, 100, 1_000, 10_000, 100_000];
const CANDIDATES_PER_REQUEST: usize = 20;

/// Median and 90th percentile in microseconds of `iterations` runs after 3 warm-up runs.
fn time_us(iterations: usize, mut f: impl FnMut()) -> serde_json::Value {
    for _ in 0..3 {
        f();
    }
    let mut us: Vec<f64> = (0..iterations)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize];
    serde_json::json!({"median_us": at(0.5), "p90_us": at(0.9)})
}

fn requests(rows: usize) -> Vec<ScoreRequest> {
    let catalog: Vec<_> = demo::catalog().into_iter().map(Arc::new).collect();
    let mut out = Vec::new();
    let mut left = rows;
    let mut i = 0;
    while left > 0 {
        let n = left.min(CANDIDATES_PER_REQUEST);
        let (_, features) = demo::simulated_customer(1_000_000 + i, 3);
        out.push(ScoreRequest {
            features,
            items: catalog.iter().cycle().skip(i).take(n).cloned().collect(),
            context: ScoreContext {
                placement: Some("homepage_hero".into()),
                device: Some(if i % 2 == 0 { "mobile" } else { "desktop" }.into()),
                hour: (i % 24) as f64 + 0.5,
            },
            version: None,
        });
        left -= n;
        i += 1;
    }
    out
}

fn encode(model: &LoadedModel, requests: &[ScoreRequest]) -> EncodedBatch {
    let schema = &model.manifest().schema;
    let mut batch = EncodedBatch {
        rows: Vec::new(),
        items: Vec::new(),
    };
    for r in requests {
        schema.encode_request(&r.features, &r.items, &r.context, &mut batch);
    }
    batch
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let iterations: usize = args.first().map_or(Ok(50), |s| s.parse())?;
    let tolerance: f32 = args.get(1).map_or(Ok(1e-4), |s| s.parse())?;

    let gpu = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("no CUDA device: {e}");
            std::process::exit(2);
        }
    };

    let now = Utc::now();
    let customers: Vec<_> = (0..2_000).map(|i| demo::simulated_customer(i, 1)).collect();
    let history = demo::simulate_history(
        &customers,
        2,
        now - Duration::days(8),
        now - Duration::days(1),
        7,
    )?;
    let data = Dataset::from_decisions(history, Duration::hours(1), now);
    let params = TrainParams {
        epochs: 3,
        patience: 0,
        ..TrainParams::default()
    };
    let mut training = serde_json::Map::new();
    let mut trained_cpu = None;
    for (name, device) in [("cpu", &Device::Cpu), ("cuda", &gpu)] {
        let t = Instant::now();
        let trained = train(&data, &params, device, &mut |_| {})?;
        training.insert(
            name.into(),
            serde_json::json!({
                "seconds": t.elapsed().as_secs_f64(),
                "epochs": trained.report.epochs_run,
                "validation_log_loss": trained.report.metrics.log_loss,
                "validation_auc": trained.report.metrics.auc,
            }),
        );
        if name == "cpu" {
            trained_cpu = Some(trained);
        }
    }
    let trained = trained_cpu.expect("trained on the CPU");

    let dir = tempfile::tempdir()?;
    let registry = Registry::new(dir.path());
    let manifest = registry.save(&trained, &params, now, 0.0)?;
    let on_cpu = registry.load(&manifest.version, &Device::Cpu)?;
    let on_gpu = registry.load(&manifest.version, &gpu)?;

    let mut batches = Vec::new();
    let mut worst = 0f32;
    for rows in BATCH_ROWS {
        let reqs = requests(rows);
        let refs: Vec<&ScoreRequest> = reqs.iter().collect();
        let batch = encode(&on_cpu, &reqs);
        let a = on_cpu.net().score(&batch)?;
        let b = on_gpu.net().score(&batch)?;
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        worst = worst.max(diff);
        // Fewer runs for the big batches on the CPU.
        let n = if rows >= 10_000 {
            iterations.div_ceil(5).max(3)
        } else {
            iterations
        };
        batches.push(serde_json::json!({
            "rows": rows,
            "max_abs_diff": diff,
            "cpu_forward": time_us(n, || { on_cpu.net().score(&batch).expect("cpu scores"); }),
            "cuda_forward": time_us(n, || { on_gpu.net().score(&batch).expect("cuda scores"); }),
            "cpu_score": time_us(n, || { on_cpu.score_batch(&refs).expect("cpu scores"); }),
            "cuda_score": time_us(n, || { on_gpu.score_batch(&refs).expect("cuda scores"); }),
        }));
    }
    let agree = worst <= tolerance;
    println!(
        "{}",
        serde_json::json!({
            "version": manifest.version,
            "width": manifest.schema.width(),
            "iterations": iterations,
            "tolerance": tolerance,
            "max_abs_diff": worst,
            "agree": agree,
            "training": training,
            "batches": batches,
        })
    );
    if !agree {
        std::process::exit(1);
    }
    Ok(())
}
