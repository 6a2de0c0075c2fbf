//! The choose stage of one decision over 20 candidates, per policy, on one thread: from
//! the arms' statistics (already read from the store) to a ranking with its propensity.
//! The linear policies include the context vectors and one Cholesky factorisation per
//! arm (`policy.linear_dims` = 32).
//!
//! `cargo bench --bench policies`

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::{SmallRng, StdRng};
use rand::{Rng, SeedableRng};
use serde_json::json;

use tailor::bandit::linear::{
    self, ContextInput, Featurizer, LinearArm, LinearPosterior, LinearStats,
};
use tailor::bandit::{policy, ArmStats};
use tailor::config::PolicySettings;

const ARMS: usize = 20;

fn bench(c: &mut Criterion) {
    let settings = PolicySettings::default();
    let mut seed = StdRng::seed_from_u64(1);
    let stats: Vec<ArmStats> = (0..ARMS)
        .map(|_| {
            let trials = seed.random_range(100.0..2000.0);
            ArmStats {
                trials,
                reward: trials * seed.random_range(0.01..0.2),
            }
        })
        .collect();
    let scores: Vec<f64> = (0..ARMS).map(|_| seed.random_range(0.01..0.3)).collect();
    let weights = vec![1.0; ARMS];
    let features: BTreeMap<String, f64> = (0..16)
        .map(|i| (format!("feature_{i}"), seed.random_range(0.0..40.0)))
        .collect();
    let segments = vec!["engaged".to_string(), "newsletter".to_string()];
    let context = json!({"device": "mobile", "channel": "web"});
    let featurizer = Featurizer {
        dims: settings.linear_dims,
    };
    let input = ContextInput {
        features: &features,
        segments: &segments,
        context: &context,
        at: Utc::now(),
    };
    // Each arm's regression after 500 impressions of random customers.
    let linear_stats: Vec<LinearStats> = (0..ARMS)
        .map(|_| {
            let mut s = LinearStats::zero(featurizer.dims);
            for _ in 0..500 {
                let f: BTreeMap<String, f64> = (0..16)
                    .map(|i| (format!("feature_{i}"), seed.random_range(0.0..40.0)))
                    .collect();
                let x = featurizer.encode(
                    &ContextInput {
                        features: &f,
                        ..input
                    },
                    None,
                );
                s.merge(&LinearStats::impression(&x));
                if seed.random_bool(0.1) {
                    s.merge(&LinearStats::reward(&x, 1.0));
                }
            }
            s
        })
        .collect();
    let linear_arms = |scores: &[f64]| -> Vec<LinearArm> {
        linear_stats
            .iter()
            .zip(scores)
            .map(|(s, &p)| {
                let x = featurizer.encode(&input, Some(p));
                let (mean, variance) = LinearPosterior::new(s, settings.ridge)
                    .expect("positive definite")
                    .predict(&x);
                LinearArm { mean, variance }
            })
            .collect()
    };

    let mut rng = SmallRng::seed_from_u64(2);
    let mut group = c.benchmark_group("policies/choose_20");
    group
        .sample_size(100)
        .measurement_time(Duration::from_secs(3));
    group.bench_function("thompson_sampling", |b| {
        b.iter(|| policy::thompson(&stats, &weights, settings.propensity_samples, &mut rng))
    });
    group.bench_function("epsilon_greedy", |b| {
        b.iter(|| policy::epsilon_greedy(&stats, &weights, settings.epsilon, &mut rng))
    });
    group.bench_function("model_greedy", |b| {
        b.iter(|| policy::greedy(&scores, &weights))
    });
    group.bench_function("softmax", |b| {
        b.iter(|| policy::softmax(&scores, &weights, settings.softmax_temperature, &mut rng))
    });
    group.bench_function("lin_ucb", |b| {
        b.iter(|| linear::lin_ucb(&linear_arms(&scores), &weights, settings.alpha))
    });
    group.bench_function("linear_thompson", |b| {
        b.iter(|| {
            linear::linear_thompson(
                &linear_arms(&scores),
                &weights,
                settings.linear_noise,
                &mut rng,
            )
        })
    });
    group.bench_function("linear_posteriors_only", |b| {
        b.iter(|| linear_arms(&scores))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
