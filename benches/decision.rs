//! The whole decision in-process, on the embedded store with the demo world: what
//! `personalize` costs without HTTP and GraphQL, and the stages a decision reads through
//! (features, the customer's context). The demo's `homepage_hero` placement has the
//! candidates, rules (the examples in `rules/`), model and bandit of the SPEC §6 target.
//!
//! `cargo bench --bench decision` (the setup builds the demo world and trains its model
//! first, about half a minute).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;

use tailor::app::Engine;
use tailor::config::Settings;
use tailor::customers::CustomerId;
use tailor::decision::pipeline::PersonalizeRequest;

struct World {
    rt: tokio::runtime::Runtime,
    engine: Arc<Engine>,
    customers: Vec<CustomerId>,
    _dir: tempfile::TempDir,
}

fn world() -> World {
    // As `tailor serve` does (see main.rs): one thread per candle forward pass.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut settings = Settings {
        data_dir: dir.path().to_path_buf(),
        ..Settings::default()
    };
    settings.rules.dir = root.join("rules").display().to_string();
    settings.rules.plugins_dir = root.join("plugins").display().to_string();
    let engine = rt.block_on(async {
        let engine = Engine::open(settings).await.expect("engine opens");
        tailor::demo::ensure(&engine).await.expect("demo world");
        engine
    });
    let customers = (0..1_000)
        .map(|i| CustomerId::parse("customerId", &tailor::demo::customer_id(i)).unwrap())
        .collect();
    World {
        rt,
        engine,
        customers,
        _dir: dir,
    }
}

fn request(customer: CustomerId) -> PersonalizeRequest {
    PersonalizeRequest {
        customer_id: customer,
        placement: Some("homepage_hero".into()),
        available_items: None,
        content_type: None,
        context: json!({"channel": "web", "device": "mobile", "timezone": "Europe/Berlin"}),
        count: 1,
        explain: false,
    }
}

fn decision(c: &mut Criterion) {
    let world = world();
    let next = AtomicUsize::new(0);
    let customer =
        || world.customers[next.fetch_add(1, Ordering::Relaxed) % world.customers.len()].clone();
    c.bench_function("decision/personalize_homepage_hero", |b| {
        b.iter(|| {
            world
                .rt
                .block_on(world.engine.decisions.personalize(request(customer())))
                .expect("decision")
        })
    });
    // Decisions in flight together, as a loaded server has them: the store's writer then
    // commits several decisions' writes with one fsync.
    let mut group = c.benchmark_group("decision");
    group.throughput(criterion::Throughput::Elements(IN_FLIGHT as u64));
    group.bench_function("personalize_16_in_flight", |b| {
        b.iter(|| {
            world.rt.block_on(async {
                let decisions = (0..IN_FLIGHT).map(|_| {
                    let engine = world.engine.clone();
                    let req = request(customer());
                    tokio::spawn(async move { engine.decisions.personalize(req).await })
                });
                for decision in futures::future::join_all(decisions).await {
                    decision.expect("task").expect("decision");
                }
            })
        })
    });
    group.finish();
    cpu_per_decision(&world, &customer);
    c.bench_function("decision/feature_read_all", |b| {
        b.iter(|| {
            world
                .rt
                .block_on(world.engine.features.read(
                    &customer(),
                    None,
                    "names",
                    chrono::Utc::now(),
                ))
                .expect("features")
        })
    });
}

const IN_FLIGHT: usize = 16;

/// CPU time of this process (every thread: runtime workers, the store's writer, the
/// scorer) per decision, over 4,000 decisions 16 in flight: the figure that bounds
/// throughput on a machine's cores, which wall-clock latency alone does not show.
fn cpu_per_decision(world: &World, customer: &dyn Fn() -> CustomerId) {
    const DECISIONS: usize = 4_000;
    let (cpu, wall) = (cpu_seconds(), std::time::Instant::now());
    world.rt.block_on(async {
        for _ in 0..DECISIONS / IN_FLIGHT {
            let decisions = (0..IN_FLIGHT).map(|_| {
                let engine = world.engine.clone();
                let req = request(customer());
                tokio::spawn(async move { engine.decisions.personalize(req).await })
            });
            for decision in futures::future::join_all(decisions).await {
                decision.expect("task").expect("decision");
            }
        }
    });
    let (cpu, wall) = (cpu_seconds() - cpu, wall.elapsed().as_secs_f64());
    println!(
        "decision/cpu_per_decision: {:.0} µs CPU, {:.0} µs wall per decision ({DECISIONS} decisions, {IN_FLIGHT} in flight, {:.0} decisions/s)",
        cpu / DECISIONS as f64 * 1e6,
        wall / DECISIONS as f64 * 1e6,
        DECISIONS as f64 / wall
    );
}

/// User + system CPU seconds of this process, from `/proc/self/stat` (Linux).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) closed by ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime: fields 14 and 15 of the line, 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50);
    targets = decision
}
criterion_main!(benches);
