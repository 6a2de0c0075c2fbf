//! The whole decision in-process, on the embedded store with the demo world: what
//! `personalize` costs without HTTP and GraphQL, and the stages a decision reads through
//! (features, the customer's context). The demo's `homepage_hero` placement has the
//! candidates, rules (the examples in `rules/`), model and bandit of the SPEC §6 target.
//!
//! `cargo bench --bench decision` (the setup builds the demo world and trains its model
//! first, about half a minute; twice, for the `decision_log_durable` group, which runs the
//! same with `storage.decision_log = "durable"`). `…/cpu_time_per_decision_16_in_flight`
//! reports CPU time, not wall time, per decision.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;

use tailor::app::Engine;
use tailor::config::{DecisionLog, Settings};
use tailor::customers::CustomerId;
use tailor::decision::pipeline::PersonalizeRequest;

struct World {
    rt: tokio::runtime::Runtime,
    engine: Arc<Engine>,
    customers: Vec<CustomerId>,
    _dir: tempfile::TempDir,
}

fn world(decision_log: DecisionLog) -> World {
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
    settings.storage.decision_log = decision_log;
    let engine = rt.block_on(async {
        let engine = Engine::open(settings).await.expect("engine opens");
        tailor::demo::ensure(&engine).await.expect("demo world");
        engine
    });
    // Every demo customer: the demo rules cap each item at 3 impressions a day, so fewer
    // customers run out of eligible content within a long run.
    let customers = (0..tailor::demo::CUSTOMERS)
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
    // Only when measuring (`cargo bench`): the test suite runs every bench target once
    // in a debug build, where building and training the demo world takes minutes, and
    // the decision path has its own tests.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // Built on first use: listing the benches (`--list`) builds nothing.
    let world = std::cell::OnceCell::new();
    let world = || world.get_or_init(|| self::world(DecisionLog::Relaxed));
    let next = AtomicUsize::new(0);
    let customer = |world: &World| {
        world.customers[next.fetch_add(1, Ordering::Relaxed) % world.customers.len()].clone()
    };
    c.bench_function("decision/personalize_homepage_hero", |b| {
        let world = world();
        b.iter(|| {
            world
                .rt
                .block_on(world.engine.decisions.personalize(request(customer(world))))
                .expect("decision")
        })
    });
    // Decisions in flight together, as a loaded server has them: the store's writer then
    // commits several decisions' writes with one fsync.
    let mut group = c.benchmark_group("decision");
    group.throughput(criterion::Throughput::Elements(IN_FLIGHT as u64));
    group.bench_function("personalize_16_in_flight", |b| {
        let world = world();
        b.iter(|| decide(world, IN_FLIGHT, &customer))
    });
    group.finish();
    // CPU time of the whole process (runtime workers, the store's writer, the scorer)
    // per decision, 16 in flight, reported as criterion's time per iteration: the figure
    // that bounds throughput on a machine's cores, which latency alone does not show.
    c.bench_function("decision/cpu_time_per_decision_16_in_flight", |b| {
        let world = world();
        b.iter_custom(|decisions| cpu_for(world, decisions, &customer))
    });
    // The same with every decision-log write fsynced (`storage.decision_log =
    // "durable"`), on a world of its own, so the two compare in one run.
    let durable = std::cell::OnceCell::new();
    let durable = || durable.get_or_init(|| self::world(DecisionLog::Durable));
    let mut group = c.benchmark_group("decision_log_durable");
    group.throughput(criterion::Throughput::Elements(IN_FLIGHT as u64));
    group.bench_function("personalize_16_in_flight", |b| {
        let world = durable();
        b.iter(|| decide(world, IN_FLIGHT, &customer))
    });
    group.finish();
    c.bench_function(
        "decision_log_durable/cpu_time_per_decision_16_in_flight",
        |b| {
            let world = durable();
            b.iter_custom(|decisions| cpu_for(world, decisions, &customer))
        },
    );
    c.bench_function("decision/feature_read_all", |b| {
        let world = world();
        b.iter(|| {
            world
                .rt
                .block_on(world.engine.features.read(
                    &customer(world),
                    None,
                    "names",
                    chrono::Utc::now(),
                ))
                .expect("features")
        })
    });
    // The segments stage's read: the customer's memberships (kept current by the event
    // processor, so a decision only reads them).
    c.bench_function("decision/segments_of_customer", |b| {
        let world = world();
        b.iter(|| {
            world
                .rt
                .block_on(world.engine.stores.segments.segments_of(&customer(world)))
                .expect("segments")
        })
    });
    // The recording stage's writes for one decision, 16 in flight: the decision (as
    // `personalize` made it, under a new id) into the decision log, one bandit trial per
    // shown item, the experiment exposure.
    let mut group = c.benchmark_group("decision");
    group.throughput(criterion::Throughput::Elements(IN_FLIGHT as u64));
    group.bench_function("record_16_in_flight", |b| {
        let world = world();
        let made = world
            .rt
            .block_on(world.engine.decisions.personalize(request(customer(world))))
            .expect("decision");
        b.iter(|| world.rt.block_on(record(world, &made)))
    });
    group.finish();
}

/// The stores' writes of the recording stage for `IN_FLIGHT` copies of `made`.
async fn record(world: &World, made: &tailor::decision::Decision) {
    let writes = (0..IN_FLIGHT).map(|_| {
        let engine = world.engine.clone();
        let mut decision = made.clone();
        decision.id = uuid::Uuid::now_v7().to_string();
        tokio::spawn(async move {
            let placement = decision.placement.clone().unwrap_or_default();
            let stores = &engine.stores;
            let trials = async {
                for shown in &decision.items {
                    stores
                        .bandit
                        .add(
                            &placement,
                            &shown.item.id,
                            tailor::bandit::ArmStats::trial(),
                        )
                        .await?;
                }
                Ok::<_, tailor::storage::StorageError>(())
            };
            let (stored, counted, exposed) = tokio::join!(
                stores.decisions.put(&decision),
                trials,
                engine.experiments.record_exposures(&decision.experiments),
            );
            stored.and(counted).expect("decision and trials stored");
            exposed.expect("exposures stored");
        })
    });
    for write in futures::future::join_all(writes).await {
        write.expect("task");
    }
}

const IN_FLIGHT: usize = 16;

/// `count` decisions for the next customers, all in flight together.
fn decide(world: &World, count: usize, customer: &dyn Fn(&World) -> CustomerId) {
    world.rt.block_on(async {
        let decisions = (0..count).map(|_| {
            let engine = world.engine.clone();
            let req = request(customer(world));
            tokio::spawn(async move { engine.decisions.personalize(req).await })
        });
        for decision in futures::future::join_all(decisions).await {
            decision.expect("task").expect("decision");
        }
    })
}

/// The process's CPU time for `decisions` decisions, `IN_FLIGHT` at a time.
fn cpu_for(world: &World, decisions: u64, customer: &dyn Fn(&World) -> CustomerId) -> Duration {
    let started = cpu_time();
    let mut left = decisions as usize;
    while left > 0 {
        let wave = left.min(IN_FLIGHT);
        decide(world, wave, customer);
        left -= wave;
    }
    cpu_time() - started
}

/// CPU time of this process, every thread.
fn cpu_time() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write to; the clock id is a constant Linux has.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) } == 0;
    assert!(ok, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID) failed");
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50);
    targets = decision
}
criterion_main!(benches);
