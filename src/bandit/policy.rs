//! The policies: each ranks candidate arms from their statistics and says how likely it
//! was to put the chosen arm first (the propensity, for off-policy evaluation).

use rand::Rng;
use rand_distr::{Beta, Distribution};

use super::ArmStats;
use crate::decision::PropensityKind;

/// A policy's choice: candidate indices best first, with the score shown for each.
#[derive(Debug, Clone, PartialEq)]
pub struct Ranking {
    /// (candidate index, score) — every candidate, best first.
    pub order: Vec<(usize, f64)>,
    /// Probability that this policy puts `order[0]` first, given the same statistics.
    pub propensity: f64,
    pub propensity_kind: PropensityKind,
}

/// One arm's posterior, built once per decision and sampled many times.
struct Posterior {
    beta: Option<Beta<f64>>,
    mean: f64,
}

impl Posterior {
    fn new(stats: &ArmStats) -> Self {
        let (a, b) = stats.beta();
        // a, b ≥ 1 for any finite statistics; otherwise fall back to the mean.
        Posterior {
            beta: Beta::new(a, b).ok(),
            mean: stats.mean(),
        }
    }

    fn sample(&self, rng: &mut impl Rng) -> f64 {
        self.beta.as_ref().map_or(self.mean, |d| d.sample(rng))
    }
}

/// Sorts indices by score descending; ties keep candidate order (priority order).
pub(crate) fn rank(scores: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    order
}

/// Beta-Bernoulli Thompson sampling: one posterior draw per arm, multiplied by the
/// arm's rule weight (finite, > 0), highest first.
///
/// The propensity of the first arm is estimated by Monte Carlo over the same weighted
/// draws: the share of `samples` further independent rounds in which it wins,
/// Laplace-smoothed over the K arms (`(wins + 1) / (samples + K)`) so that no logged
/// propensity is ever 0. The score shown for each arm is its weighted posterior mean.
pub fn thompson(
    stats: &[ArmStats],
    weights: &[f64],
    samples: usize,
    rng: &mut impl Rng,
) -> Ranking {
    let posteriors: Vec<Posterior> = stats.iter().map(Posterior::new).collect();
    let draw = |i: usize, rng: &mut _| posteriors[i].sample(rng) * weights[i];
    let draws: Vec<f64> = (0..stats.len()).map(|i| draw(i, rng)).collect();
    let order = rank(&draws);
    let chosen = order[0];
    let means: Vec<f64> = (0..stats.len())
        .map(|i| posteriors[i].mean * weights[i])
        .collect();
    // Each round asks "does the chosen arm's draw beat every other arm's draw?". Rivals
    // are tried best weighted mean first and a round stops at the first rival that
    // wins, so a typical round draws a few samples instead of K (same estimator).
    let mut rivals: Vec<usize> = (0..stats.len()).filter(|&i| i != chosen).collect();
    rivals.sort_by(|&a, &b| means[b].total_cmp(&means[a]));
    let mut wins = 0usize;
    for _ in 0..samples {
        let mine = draw(chosen, rng);
        if rivals.iter().all(|&j| draw(j, rng) < mine) {
            wins += 1;
        }
    }
    let k = stats.len();
    Ranking {
        order: order.into_iter().map(|i| (i, means[i])).collect(),
        propensity: (wins + 1) as f64 / (samples + k) as f64,
        propensity_kind: PropensityKind::Estimated,
    }
}

/// The seed's epsilon-greedy: with probability `epsilon` a uniformly random arm goes
/// first, otherwise the arm with the highest posterior mean × rule weight. The
/// propensity is exact: `(1 − ε)·[chosen is greedy] + ε / K`.
pub fn epsilon_greedy(
    stats: &[ArmStats],
    weights: &[f64],
    epsilon: f64,
    rng: &mut impl Rng,
) -> Ranking {
    let means: Vec<f64> = stats
        .iter()
        .zip(weights)
        .map(|(s, w)| s.mean() * w)
        .collect();
    let mut order = rank(&means);
    let greedy = order[0];
    let k = stats.len();
    if rng.random::<f64>() < epsilon {
        let pick = rng.random_range(0..k);
        order.retain(|&i| i != pick);
        order.insert(0, pick);
    }
    let chosen = order[0];
    let propensity = if chosen == greedy { 1.0 - epsilon } else { 0.0 } + epsilon / k as f64;
    Ranking {
        order: order.into_iter().map(|i| (i, means[i])).collect(),
        propensity,
        propensity_kind: PropensityKind::Exact,
    }
}

/// Deterministic greedy ranking by `scores` × rule weight (the model-greedy policy): the
/// first arm is chosen with certainty, so its propensity is exactly 1.
pub fn greedy(scores: &[f64], weights: &[f64]) -> Ranking {
    let weighted: Vec<f64> = scores.iter().zip(weights).map(|(s, w)| s * w).collect();
    Ranking {
        order: rank(&weighted)
            .into_iter()
            .map(|i| (i, weighted[i]))
            .collect(),
        propensity: 1.0,
        propensity_kind: PropensityKind::Exact,
    }
}

/// Softmax over the model's scores: arm `i` goes first with probability
/// `exp(sᵢ·wᵢ/τ) / Σⱼ exp(sⱼ·wⱼ/τ)` (exact propensity); the others follow by weighted
/// score. A lower temperature `τ` explores less.
pub fn softmax(scores: &[f64], weights: &[f64], temperature: f64, rng: &mut impl Rng) -> Ranking {
    let probabilities = softmax_distribution(scores, weights, temperature);
    let weighted: Vec<f64> = scores.iter().zip(weights).map(|(s, w)| s * w).collect();
    let mut u: f64 = rng.random();
    let mut pick = probabilities.len() - 1;
    for (i, p) in probabilities.iter().enumerate() {
        if u < *p {
            pick = i;
            break;
        }
        u -= p;
    }
    let mut order = rank(&weighted);
    order.retain(|&i| i != pick);
    order.insert(0, pick);
    Ranking {
        order: order.into_iter().map(|i| (i, weighted[i])).collect(),
        propensity: probabilities[pick],
        propensity_kind: PropensityKind::Exact,
    }
}

/// The probability that [`softmax`] puts each arm first.
pub fn softmax_distribution(scores: &[f64], weights: &[f64], temperature: f64) -> Vec<f64> {
    let logits: Vec<f64> = scores
        .iter()
        .zip(weights)
        .map(|(s, w)| s * w / temperature.max(1e-9))
        .collect();
    let top = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = logits.iter().map(|l| (l - top).exp()).collect();
    let total: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / total).collect()
}

/// The probability that [`epsilon_greedy`] puts each arm first (exact).
pub fn epsilon_greedy_distribution(stats: &[ArmStats], weights: &[f64], epsilon: f64) -> Vec<f64> {
    let means: Vec<f64> = stats
        .iter()
        .zip(weights)
        .map(|(s, w)| s.mean() * w)
        .collect();
    let greedy = rank(&means)[0];
    let k = stats.len() as f64;
    (0..stats.len())
        .map(|i| if i == greedy { 1.0 - epsilon } else { 0.0 } + epsilon / k)
        .collect()
}

/// The probability that [`greedy`] puts each arm first: 1 for the best weighted score.
pub fn greedy_distribution(scores: &[f64], weights: &[f64]) -> Vec<f64> {
    let weighted: Vec<f64> = scores.iter().zip(weights).map(|(s, w)| s * w).collect();
    let best = rank(&weighted)[0];
    (0..scores.len())
        .map(|i| f64::from(u8::from(i == best)))
        .collect()
}

/// The probability that [`thompson`] puts each arm first, estimated from `samples` rounds
/// of posterior draws (no smoothing: an arm that never wins reads 0).
pub fn thompson_distribution(
    stats: &[ArmStats],
    weights: &[f64],
    samples: usize,
    rng: &mut impl Rng,
) -> Vec<f64> {
    let posteriors: Vec<Posterior> = stats.iter().map(Posterior::new).collect();
    let mut wins = vec![0usize; stats.len()];
    for _ in 0..samples.max(1) {
        let draws: Vec<f64> = (0..stats.len())
            .map(|i| posteriors[i].sample(rng) * weights[i])
            .collect();
        wins[rank(&draws)[0]] += 1;
    }
    wins.into_iter()
        .map(|w| w as f64 / samples.max(1) as f64)
        .collect()
}

/// No personalization: candidates stay in priority order, deterministically.
pub fn by_priority(count: usize) -> Ranking {
    Ranking {
        order: (0..count).map(|i| (i, 0.0)).collect(),
        propensity: 1.0,
        propensity_kind: PropensityKind::Exact,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn arms() -> Vec<ArmStats> {
        vec![
            ArmStats {
                trials: 1000.0,
                reward: 50.0,
            },
            ArmStats {
                trials: 1000.0,
                reward: 200.0,
            },
            ArmStats {
                trials: 0.0,
                reward: 0.0,
            },
        ]
    }

    #[test]
    fn thompson_prefers_the_better_arm_and_estimates_its_propensity() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut firsts = [0usize; 3];
        let mut propensity_of_best = Vec::new();
        for _ in 0..400 {
            let r = thompson(&arms(), &[1.0; 3], 200, &mut rng);
            firsts[r.order[0].0] += 1;
            if r.order[0].0 == 1 {
                propensity_of_best.push(r.propensity);
            }
            assert_eq!(r.order.len(), 3);
            assert!(r.propensity > 0.0 && r.propensity <= 1.0);
        }
        // The unexplored arm (uniform posterior) beats 0.2 about 80% of the time.
        let observed = firsts[1] as f64 / 400.0;
        let estimated: f64 =
            propensity_of_best.iter().sum::<f64>() / propensity_of_best.len() as f64;
        assert!(
            (observed - estimated).abs() < 0.08,
            "observed {observed} estimated {estimated}"
        );
        assert!(
            firsts[0] < 5,
            "the clearly worse arm is rarely first: {firsts:?}"
        );
    }

    #[test]
    fn epsilon_greedy_propensity_is_exact() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut greedy_first = 0;
        for _ in 0..2000 {
            let r = epsilon_greedy(&arms(), &[1.0; 3], 0.1, &mut rng);
            let expected = if r.order[0].0 == 2 {
                0.9 + 0.1 / 3.0
            } else {
                0.1 / 3.0
            };
            assert!((r.propensity - expected).abs() < 1e-12);
            if r.order[0].0 == 2 {
                greedy_first += 1;
            }
        }
        // arm 2's posterior mean is 0.5 (no data): greedy.
        let share = greedy_first as f64 / 2000.0;
        assert!((share - (0.9 + 0.1 / 3.0)).abs() < 0.03, "{share}");
    }

    #[test]
    fn rule_weights_shift_choices_and_propensities_together() {
        let mut rng = StdRng::seed_from_u64(3);
        // Two equal arms; the second is weighted ×3 by a rule.
        let equal = vec![
            ArmStats {
                trials: 100.0,
                reward: 20.0,
            };
            2
        ];
        let weights = [1.0, 3.0];
        let mut second_first = 0;
        let mut propensities = Vec::new();
        for _ in 0..400 {
            let r = thompson(&equal, &weights, 200, &mut rng);
            if r.order[0].0 == 1 {
                second_first += 1;
                propensities.push(r.propensity);
            }
            let (_, shown) = r.order.iter().find(|(i, _)| *i == 1).copied().unwrap();
            assert!(
                (shown - 3.0 * equal[1].mean()).abs() < 1e-12,
                "weighted mean shown"
            );
        }
        let observed = second_first as f64 / 400.0;
        let estimated = propensities.iter().sum::<f64>() / propensities.len() as f64;
        assert!(observed > 0.95, "{observed}");
        assert!(
            (observed - estimated).abs() < 0.05,
            "{observed} vs {estimated}"
        );
        let r = epsilon_greedy(&equal, &weights, 0.0, &mut rng);
        assert_eq!(r.order[0].0, 1, "greedy on weighted means");
    }

    #[test]
    fn softmax_propensity_is_exact_and_matches_frequencies() {
        let mut rng = StdRng::seed_from_u64(9);
        let scores = [0.1, 0.3, 0.2];
        let weights = [1.0, 1.0, 2.0];
        let dist = softmax_distribution(&scores, &weights, 0.1);
        assert!((dist.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let mut firsts = [0usize; 3];
        for _ in 0..20_000 {
            let r = softmax(&scores, &weights, 0.1, &mut rng);
            assert!((r.propensity - dist[r.order[0].0]).abs() < 1e-12);
            firsts[r.order[0].0] += 1;
        }
        for i in 0..3 {
            let observed = firsts[i] as f64 / 20_000.0;
            assert!(
                (observed - dist[i]).abs() < 0.015,
                "{i}: {observed} vs {}",
                dist[i]
            );
        }
        // 0.2 × 2 beats 0.3: the boosted arm is the most likely.
        assert!(dist[2] > dist[1] && dist[1] > dist[0], "{dist:?}");
    }

    #[test]
    fn distributions_agree_with_the_policies() {
        let mut rng = StdRng::seed_from_u64(4);
        let e = epsilon_greedy_distribution(&arms(), &[1.0; 3], 0.1);
        assert!((e[2] - (0.9 + 0.1 / 3.0)).abs() < 1e-12 && (e[0] - 0.1 / 3.0).abs() < 1e-12);
        assert_eq!(
            greedy_distribution(&[0.1, 0.5, 0.2], &[1.0, 1.0, 3.0]),
            vec![0.0, 0.0, 1.0]
        );
        let t = thompson_distribution(&arms(), &[1.0; 3], 20_000, &mut rng);
        // Arm 2 (uniform posterior) beats arm 1 (≈ 0.2) about 80% of the time.
        assert!((t[2] - 0.8).abs() < 0.02 && t[0] < 0.001, "{t:?}");
    }
}
