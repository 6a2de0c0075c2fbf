//! Off-policy evaluation on simulated logs whose truth is known.
//!
//! The world: five actions, one context feature `x ~ U(0, 1)`, and a click (reward 1)
//! with probability `p(a, x) = BASE[a] + SLOPE[a]·x`. Logs come from a uniform or an
//! epsilon-greedy logging policy; the target policy is deterministic (action 1 below
//! `x = 0.5`, action 2 above), so its value is `∫₀^½ p(1, x) dx + ∫_½^1 p(2, x) dx = 0.3`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tailor::ope::{self, Estimator, Evaluation, LoggedRound, Options};

const BASE: [f64; 5] = [0.10, 0.30, 0.05, 0.20, 0.15];
const SLOPE: [f64; 5] = [0.30, -0.20, 0.40, 0.05, 0.10];
const ACTIONS: usize = BASE.len();
/// Exploration share of the epsilon-greedy logging policy: the greedy action has
/// probability 0.6, every other 0.1.
const EPSILON: f64 = 0.5;

fn click_probability(a: usize, x: f64) -> f64 {
    BASE[a] + SLOPE[a] * x
}

/// `∫_lo^hi p(a, x) dx`.
fn integral(a: usize, lo: f64, hi: f64) -> f64 {
    BASE[a] * (hi - lo) + SLOPE[a] * (hi * hi - lo * lo) / 2.0
}

#[derive(Clone, Copy, Debug)]
enum Logging {
    Uniform,
    /// Greedy on action 3 below `x = 0.5`, action 0 above.
    EpsilonGreedy,
}

impl Logging {
    fn distribution(self, x: f64) -> Vec<f64> {
        match self {
            Logging::Uniform => vec![1.0 / ACTIONS as f64; ACTIONS],
            Logging::EpsilonGreedy => {
                let greedy = if x < 0.5 { 3 } else { 0 };
                let mut d = vec![EPSILON / ACTIONS as f64; ACTIONS];
                d[greedy] += 1.0 - EPSILON;
                d
            }
        }
    }

    /// `∫₀¹ Σ_a μ(a|x) p(a, x) dx`.
    fn true_value(self) -> f64 {
        let explore: f64 =
            (0..ACTIONS).map(|a| integral(a, 0.0, 1.0)).sum::<f64>() / ACTIONS as f64;
        match self {
            Logging::Uniform => explore,
            Logging::EpsilonGreedy => {
                EPSILON * explore
                    + (1.0 - EPSILON) * (integral(3, 0.0, 0.5) + integral(0, 0.5, 1.0))
            }
        }
    }
}

fn target_action(x: f64) -> usize {
    if x < 0.5 {
        1
    } else {
        2
    }
}

fn target_distribution(x: f64) -> Vec<f64> {
    let mut d = vec![0.0; ACTIONS];
    d[target_action(x)] = 1.0;
    d
}

fn target_value() -> f64 {
    integral(1, 0.0, 0.5) + integral(2, 0.5, 1.0)
}

/// A reward model that reads the context backwards: far off for the target policy
/// (its direct method says 0.15 instead of 0.3).
fn flipped_model(a: usize, x: f64) -> f64 {
    click_probability(a, 1.0 - x)
}

fn simulate(logging: Logging, n: usize, rng: &mut StdRng) -> Vec<LoggedRound> {
    let actions: Vec<String> = (0..ACTIONS).map(|a| format!("a{a}")).collect();
    (0..n)
        .map(|_| {
            let x: f64 = rng.random();
            let distribution = logging.distribution(x);
            let u: f64 = rng.random();
            let mut cumulative = 0.0;
            let chosen = distribution
                .iter()
                .position(|p| {
                    cumulative += p;
                    u < cumulative
                })
                .unwrap_or(ACTIONS - 1);
            let reward = if rng.random::<f64>() < click_probability(chosen, x) {
                1.0
            } else {
                0.0
            };
            LoggedRound {
                actions: actions.clone(),
                chosen,
                propensity: distribution[chosen],
                reward,
                context: [("x".to_string(), x)].into(),
            }
        })
        .collect()
}

fn x(round: &LoggedRound) -> f64 {
    round.context["x"]
}

/// Evaluates the policy whose distribution in context `x` is `policy(x)`, with a reward
/// model when one is given.
fn evaluate(
    rounds: &[LoggedRound],
    policy: impl Fn(f64) -> Vec<f64>,
    model: Option<fn(usize, f64) -> f64>,
    options: Options,
) -> Evaluation {
    let target: Vec<Vec<f64>> = rounds.iter().map(|r| policy(x(r))).collect();
    let estimates: Option<Vec<Vec<f64>>> = model.map(|m| {
        rounds
            .iter()
            .map(|r| (0..ACTIONS).map(|a| m(a, x(r))).collect())
            .collect()
    });
    ope::evaluate(rounds, &target, estimates.as_deref(), options).unwrap()
}

fn get(e: &Evaluation, estimator: Estimator) -> ope::Estimate {
    *e.estimate(estimator).unwrap()
}

#[test]
fn the_truth_is_what_the_world_says() {
    assert!((target_value() - 0.3).abs() < 1e-12);
    // A Monte Carlo check of the analytic values, so the other tests test the estimators.
    let mut rng = StdRng::seed_from_u64(1);
    let n = 400_000;
    let mean = (0..n)
        .map(|_| {
            let x: f64 = rng.random();
            click_probability(target_action(x), x)
        })
        .sum::<f64>()
        / n as f64;
    assert!((mean - target_value()).abs() < 2e-3, "{mean}");
}

#[test]
fn evaluating_the_logging_policy_returns_its_observed_mean() {
    let mut rng = StdRng::seed_from_u64(7);
    for logging in [Logging::Uniform, Logging::EpsilonGreedy] {
        let rounds = simulate(logging, 20_000, &mut rng);
        let observed = rounds.iter().map(|r| r.reward).sum::<f64>() / rounds.len() as f64;
        let e = evaluate(
            &rounds,
            |x| logging.distribution(x),
            Some(flipped_model),
            Options::default(),
        );
        assert_eq!(e.logged_value, observed);
        // Every weight is π(a|x)/μ(a|x) = 1: IPS and SNIPS are the observed mean.
        assert_eq!(e.max_weight, 1.0);
        assert_eq!(e.effective_sample_size, rounds.len() as f64);
        assert!((get(&e, Estimator::Ips).value - observed).abs() < 1e-12);
        assert!((get(&e, Estimator::Snips).value - observed).abs() < 1e-12);
        for estimator in [Estimator::Ips, Estimator::Snips, Estimator::DoublyRobust] {
            let estimate = get(&e, estimator);
            assert!(
                estimate.covers(observed),
                "{logging:?}: {estimate:?} vs {observed}"
            );
            // And near the policy's analytic value (a loose bound: the interval itself
            // misses it one time in twenty).
            let z = (estimate.value - logging.true_value()) / estimate.std_error;
            assert!(
                z.abs() < 4.0,
                "{logging:?}: {estimate:?} vs {}",
                logging.true_value()
            );
        }
    }
}

/// One seeded log per logging policy. The seed is one where every estimate lies well inside
/// its interval (within 0.4 standard errors of the truth), so the assertions do not hang
/// on luck; how often the intervals cover is what the repetition test below checks.
#[test]
fn estimators_cover_the_value_of_a_different_policy() {
    let truth = target_value();
    let mut rng = StdRng::seed_from_u64(24);
    for logging in [Logging::Uniform, Logging::EpsilonGreedy] {
        let rounds = simulate(logging, 20_000, &mut rng);
        // The log's own mean is the logging policy's value, not the target's.
        let e = evaluate(
            &rounds,
            target_distribution,
            Some(click_probability),
            Options::default(),
        );
        assert!(
            (e.logged_value - truth).abs() > 0.03,
            "{logging:?}: {}",
            e.logged_value
        );
        assert!(e.effective_sample_size < 0.3 * rounds.len() as f64, "{e:?}");
        for estimator in [Estimator::Ips, Estimator::Snips, Estimator::DoublyRobust] {
            let estimate = get(&e, estimator);
            assert!(estimate.covers(truth), "{logging:?}: {estimate:?}");
            assert!(
                estimate.ci_high - estimate.ci_low < 0.06,
                "{logging:?}: {estimate:?}"
            );
        }
        // The direct method with the true model is off only by the sampling of contexts.
        assert!((get(&e, Estimator::DirectMethod).value - truth).abs() < 0.005);
        // A perfect model leaves DR only the click noise to correct: `E[w²p(1−p)]` per
        // round against IPS's `E[w²p] − V²`, about 15% less standard error here.
        let (dr, ips) = (get(&e, Estimator::DoublyRobust), get(&e, Estimator::Ips));
        assert!(
            dr.std_error < 0.92 * ips.std_error,
            "{logging:?}: {dr:?} vs {ips:?}"
        );

        // A wrong model: the direct method is off, DR is still unbiased.
        let wrong = evaluate(
            &rounds,
            target_distribution,
            Some(flipped_model),
            Options::default(),
        );
        let dm = get(&wrong, Estimator::DirectMethod);
        assert!(
            !dm.covers(truth) && (dm.value - 0.15).abs() < 0.01,
            "{logging:?}: {dm:?}"
        );
        let dr = get(&wrong, Estimator::DoublyRobust);
        assert!(dr.covers(truth), "{logging:?}: {dr:?}");
    }
}

#[test]
fn clipping_trades_bias_for_variance() {
    // Epsilon-greedy logging gives the target's actions weight 10 wherever the target
    // does not follow the greedy action (everywhere here): clipping at 5 halves IPS.
    let mut rng = StdRng::seed_from_u64(3);
    let rounds = simulate(Logging::EpsilonGreedy, 20_000, &mut rng);
    let plain = evaluate(&rounds, target_distribution, None, Options::default());
    let clipped = evaluate(
        &rounds,
        target_distribution,
        None,
        Options { clip: Some(5.0) },
    );
    assert!((plain.max_weight - 10.0).abs() < 1e-9 && (clipped.max_weight - 10.0).abs() < 1e-9);
    let matched = rounds
        .iter()
        .filter(|r| r.chosen == target_action(x(r)))
        .count();
    assert_eq!(clipped.clipped_rounds, matched);
    let (p, c) = (get(&plain, Estimator::Ips), get(&clipped, Estimator::Ips));
    assert!((c.value - p.value / 2.0).abs() < 1e-9);
    assert!(c.std_error < p.std_error);
    assert!(!c.covers(target_value()));
    // Every nonzero weight is clipped to the same value, so SNIPS is unchanged.
    let (p, c) = (
        get(&plain, Estimator::Snips),
        get(&clipped, Estimator::Snips),
    );
    assert!((c.value - p.value).abs() < 1e-12);
}

#[test]
fn intervals_cover_the_truth_about_95_percent_of_the_time() {
    let truth = target_value();
    let repetitions = 200;
    let mut rng = StdRng::seed_from_u64(2024);
    let estimators = [
        ("ips", Estimator::Ips, None),
        ("snips", Estimator::Snips, None),
        (
            "dr, perfect model",
            Estimator::DoublyRobust,
            Some(click_probability as fn(usize, f64) -> f64),
        ),
        (
            "dr, wrong model",
            Estimator::DoublyRobust,
            Some(flipped_model as fn(usize, f64) -> f64),
        ),
    ];
    let mut covered = [0usize; 4];
    for _ in 0..repetitions {
        let rounds = simulate(Logging::EpsilonGreedy, 2_000, &mut rng);
        for (k, (_, estimator, model)) in estimators.iter().enumerate() {
            let e = evaluate(&rounds, target_distribution, *model, Options::default());
            covered[k] += usize::from(get(&e, *estimator).covers(truth));
        }
    }
    for (k, (name, _, _)) in estimators.iter().enumerate() {
        let rate = covered[k] as f64 / repetitions as f64;
        assert!((0.88..=0.99).contains(&rate), "{name}: coverage {rate}");
    }
}

#[test]
fn a_log_exported_and_imported_evaluates_the_same() {
    let mut rng = StdRng::seed_from_u64(11);
    let rounds = simulate(Logging::EpsilonGreedy, 500, &mut rng);
    let mut file = Vec::new();
    ope::write_jsonl(&mut file, &rounds).unwrap();
    let back = ope::read_jsonl(file.as_slice()).unwrap();
    assert_eq!(back, rounds);
    let before = evaluate(
        &rounds,
        target_distribution,
        Some(flipped_model),
        Options::default(),
    );
    let after = evaluate(
        &back,
        target_distribution,
        Some(flipped_model),
        Options::default(),
    );
    assert_eq!(before, after);
}
