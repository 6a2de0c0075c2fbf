//! Model scoring: one request's candidates (20 and 100) in one forward pass on one
//! thread, with a model trained on simulated demo history: encoding included
//! (`model_score`), and the forward pass alone on the encoded rows (`model_forward`).
//!
//! Run with `cargo bench --bench model`. With `MODEL_EXPORT_DIR` set, the trained version
//! and the encoded inputs with their scores are left there for `benches/model-onnx/`.

use std::sync::Arc;

use chrono::{Duration, Utc};
use criterion::{criterion_group, BenchmarkId, Criterion};
use tailor::demo;
use tailor::model::dataset::Dataset;
use tailor::model::registry::Registry;
use tailor::model::schema::{EncodedBatch, ScoreContext};
use tailor::model::serving::{LoadedModel, ScoreRequest};
use tailor::model::train::{train, TrainParams};
use tailor::model::Device;

fn trained_model(dir: &std::path::Path) -> LoadedModel {
    let customers: Vec<_> = (0..2_000).map(|i| demo::simulated_customer(i, 1)).collect();
    let now = Utc::now();
    let history = demo::simulate_history(
        &customers,
        2,
        now - Duration::days(8),
        now - Duration::days(1),
        7,
    )
    .expect("simulated history");
    let data = Dataset::from_decisions(history, Duration::hours(1), now);
    let params = TrainParams {
        epochs: 3,
        ..TrainParams::default()
    };
    let trained = train(&data, &params, &Device::Cpu, &mut |_| {}).expect("training");
    let registry = Registry::new(dir);
    let manifest = registry.save(&trained, &params, now, 0.0).expect("saved");
    registry
        .load(&manifest.version, &Device::Cpu)
        .expect("loaded")
}

fn scoring(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let export = std::env::var_os("MODEL_EXPORT_DIR").map(std::path::PathBuf::from);
    let model = trained_model(export.as_deref().unwrap_or(dir.path()));
    let mut exported = serde_json::Map::new();
    let catalog: Vec<_> = demo::catalog().into_iter().map(Arc::new).collect();
    let (_, features) = demo::simulated_customer(1_000_000, 3);
    let mut forward = Vec::new();
    let mut group = c.benchmark_group("model_score");
    for n in [20usize, 100] {
        let request = ScoreRequest {
            features: features.clone(),
            items: catalog.iter().cycle().take(n).cloned().collect(),
            context: ScoreContext {
                placement: Some("homepage_hero".into()),
                device: Some("mobile".into()),
                hour: 14.5,
            },
            version: None,
        };
        group.bench_with_input(BenchmarkId::new("candidates", n), &request, |b, r| {
            b.iter(|| model.score(r).expect("scores"))
        });
        let schema = &model.manifest().schema;
        let mut batch = EncodedBatch {
            rows: Vec::new(),
            items: Vec::new(),
        };
        schema.encode_request(
            &request.features,
            &request.items,
            &request.context,
            &mut batch,
        );
        let scores = model.net().score(&batch).expect("scores");
        exported.insert(
            n.to_string(),
            serde_json::json!({"width": schema.width(), "rows": batch.rows, "items": batch.items, "scores": scores}),
        );
        forward.push((n, batch));
    }
    group.finish();
    let mut group = c.benchmark_group("model_forward");
    for (n, batch) in &forward {
        group.bench_with_input(BenchmarkId::new("candidates", n), batch, |b, batch| {
            b.iter(|| model.net().score(batch).expect("scores"))
        });
    }
    group.finish();
    if let Some(export) = export {
        let path = export.join("inputs.json");
        std::fs::write(&path, serde_json::Value::Object(exported).to_string())
            .expect("inputs.json written");
        eprintln!(
            "exported the model and {} to {}",
            path.display(),
            export.display()
        );
    }
}

criterion_group!(benches, scoring);

fn main() {
    // One thread for candle's CPU kernels, read before its first use.
    std::env::set_var("RAYON_NUM_THREADS", "1");
    benches();
    Criterion::default().configure_from_args().final_summary();
}
