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
/// The propensity of the first arm is computed by quadrature
/// ([`thompson_first_probability`], `Exact` to its accuracy, never below
/// [`MIN_PROPENSITY`]). Only when an arm has no proper posterior (non-finite statistics)
/// or a weight is not finite and positive is it estimated by Monte Carlo over the same
/// weighted draws: the share of `samples` further independent rounds in which it wins,
/// Laplace-smoothed over the K arms (`(wins + 1) / (samples + K)`) so that no logged
/// propensity is ever 0 (`Estimated`). The score shown for each arm is its weighted
/// posterior mean.
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
    if let Some(p) = thompson_first_probability(stats, weights, chosen) {
        return Ranking {
            order: order.into_iter().map(|i| (i, means[i])).collect(),
            propensity: p.max(MIN_PROPENSITY),
            propensity_kind: PropensityKind::Exact,
        };
    }
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

/// Half-width, in standard deviations, of the window over which a Beta posterior is
/// integrated: outside it lies at most about 2e-5 of its mass (the skewed case, Beta(1, b)).
const WINDOW_SDS: f64 = 10.0;
/// Grid steps per standard deviation of the narrowest posterior that overlaps the chosen
/// arm's window (each step is integrated by Simpson's rule).
const STEPS_PER_SD: f64 = 3.0;
/// Fewest and most steps of the grid: the product of many rivals' CDFs can be sharper
/// than any one posterior (with K uniform arms the integrand is x^(K−1)).
const MIN_STEPS: usize = 64;
const MAX_STEPS: usize = 2048;
/// A propensity below the quadrature's accuracy is reported as this.
pub const MIN_PROPENSITY: f64 = 1e-6;

/// A Beta posterior with what the quadrature needs of it.
struct BetaPosterior {
    a: f64,
    b: f64,
    /// −ln B(a, b).
    ln_norm: f64,
    sd: f64,
    lo: f64,
    hi: f64,
}

impl BetaPosterior {
    /// `None` unless both parameters are finite and ≥ 1 (always so for finite statistics).
    fn new(stats: &ArmStats) -> Option<Self> {
        let (a, b) = stats.beta();
        if !(a.is_finite() && b.is_finite() && a >= 1.0 && b >= 1.0) {
            return None;
        }
        let mean = a / (a + b);
        let sd = (a * b / ((a + b) * (a + b) * (a + b + 1.0))).sqrt();
        Some(BetaPosterior {
            a,
            b,
            ln_norm: -statrs::function::beta::ln_beta(a, b),
            sd,
            lo: (mean - WINDOW_SDS * sd).max(0.0),
            hi: (mean + WINDOW_SDS * sd).min(1.0),
        })
    }

    /// The density at `t`, from `ln t` and `ln(1 − t)` (shared between arms on one grid).
    fn pdf_ln(&self, ln_t: f64, ln_1mt: f64) -> f64 {
        // (a − 1)·ln t is 0 at t = 0 when a = 1, not NaN: the density is finite there.
        let left = if self.a == 1.0 {
            0.0
        } else {
            (self.a - 1.0) * ln_t
        };
        let right = if self.b == 1.0 {
            0.0
        } else {
            (self.b - 1.0) * ln_1mt
        };
        (left + right + self.ln_norm).exp()
    }

    fn pdf(&self, t: f64) -> f64 {
        if !(0.0..=1.0).contains(&t) {
            return 0.0;
        }
        self.pdf_ln(t.ln(), (1.0 - t).ln())
    }

    fn cdf(&self, t: f64) -> f64 {
        if t <= 0.0 {
            0.0
        } else if t >= 1.0 {
            1.0
        } else {
            statrs::function::beta::beta_reg(self.a, self.b, t)
        }
    }
}

/// Probability that Thompson sampling with rule weights puts arm `chosen` first:
/// `∫ fᵢ(x) Πⱼ≠ᵢ Fⱼ(x·wᵢ/wⱼ) dx`, where `fᵢ` is the chosen arm's Beta posterior density
/// and `Fⱼ` the rivals' CDFs (a rival's weighted draw `wⱼXⱼ` stays below `wᵢx` exactly
/// when `Xⱼ < x·wᵢ/wⱼ`).
///
/// Deterministic quadrature on one grid over the chosen arm's window (cut where some
/// rival's lower tail makes the integrand vanish): each rival's CDF is its value at the
/// grid's start (the regularised incomplete Beta function) plus Simpson's rule step by
/// step; a rival too narrow for the grid is evaluated node by node instead; the outer
/// integral is Simpson's rule. Accurate to about 1e-5 (the windows' tails); `None` when
/// an arm has no proper posterior or a weight is not finite and positive.
pub fn thompson_first_probability(
    stats: &[ArmStats],
    weights: &[f64],
    chosen: usize,
) -> Option<f64> {
    if weights.iter().any(|w| !w.is_finite() || *w <= 0.0) {
        return None;
    }
    let posteriors: Vec<BetaPosterior> = stats
        .iter()
        .map(BetaPosterior::new)
        .collect::<Option<_>>()?;
    let me = &posteriors[chosen];
    // A rival's value at the chosen arm's x is x·ratio.
    let ratio = |j: usize| weights[chosen] / weights[j];
    // Below a rival's window it is (almost) surely above the chosen arm: nothing to
    // integrate there.
    let lo = (0..posteriors.len())
        .filter(|&j| j != chosen)
        .map(|j| posteriors[j].lo / ratio(j))
        .fold(me.lo, f64::max);
    let hi = me.hi;
    if lo >= hi {
        return Some(0.0);
    }
    // Rivals whose window ends below `lo` are (almost) surely below the chosen arm.
    let rivals: Vec<usize> = (0..posteriors.len())
        .filter(|&j| j != chosen && posteriors[j].hi / ratio(j) > lo)
        .collect();
    let narrowest = rivals
        .iter()
        .map(|&j| posteriors[j].sd / ratio(j))
        .fold(me.sd, f64::min);
    let steps = ((hi - lo) * STEPS_PER_SD / narrowest).ceil() as usize;
    let steps = steps.clamp(MIN_STEPS, MAX_STEPS).next_multiple_of(2);
    let h = (hi - lo) / steps as f64;
    // The grid at half steps (nodes at even indices, midpoints at odd ones), with the
    // logarithms every unweighted rival shares.
    let at = |k: usize| (lo + 0.5 * h * k as f64).min(hi);
    let ln_t: Vec<f64> = (0..=2 * steps).map(|k| at(k).ln()).collect();
    let ln_1mt: Vec<f64> = (0..=2 * steps).map(|k| (1.0 - at(k)).ln()).collect();
    let mut beaten = vec![1.0; steps + 1];
    for &j in &rivals {
        let rival = &posteriors[j];
        let r = ratio(j);
        let density = |k: usize| {
            if r == 1.0 {
                rival.pdf_ln(ln_t[k], ln_1mt[k])
            } else {
                rival.pdf(r * at(k))
            }
        };
        let mut below = if r * lo <= rival.lo {
            0.0
        } else {
            rival.cdf(r * lo)
        };
        beaten[0] *= below;
        if rival.sd / (r * h) >= 2.0 {
            // The density at the previous node, when the previous step needed it.
            let mut left = None;
            for (k, node) in beaten.iter_mut().enumerate().skip(1) {
                let (ta, tb) = (r * at(2 * k - 2), r * at(2 * k));
                if tb > rival.lo && ta < rival.hi {
                    let start = left.unwrap_or_else(|| density(2 * k - 2));
                    let end = density(2 * k);
                    below += r * h / 6.0 * (start + 4.0 * density(2 * k - 1) + end);
                    left = Some(end);
                } else {
                    left = None;
                }
                *node *= below.min(1.0);
            }
        } else {
            for (k, node) in beaten.iter_mut().enumerate().skip(1) {
                let t = r * at(2 * k);
                *node *= if t <= rival.lo {
                    0.0
                } else if t >= rival.hi {
                    1.0
                } else {
                    rival.cdf(t)
                };
            }
        }
    }
    let mut total = 0.0;
    for (k, b) in beaten.iter().enumerate() {
        if *b == 0.0 {
            continue;
        }
        let weight = if k == 0 || k == steps {
            1.0
        } else if k % 2 == 1 {
            4.0
        } else {
            2.0
        };
        total += weight * me.pdf_ln(ln_t[2 * k], ln_1mt[2 * k]) * b;
    }
    Some((total * h / 3.0).clamp(0.0, 1.0))
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

    fn arm(trials: f64, reward: f64) -> ArmStats {
        ArmStats { trials, reward }
    }

    /// (name, statistics, rule weights): the shapes the quadrature must handle.
    fn quadrature_cases() -> Vec<(&'static str, Vec<ArmStats>, Vec<f64>)> {
        // 24 items with demo-like statistics: thousands of impressions, similar rates.
        let demo: Vec<ArmStats> = (0..24)
            .map(|i| arm(2_000.0 + 150.0 * i as f64, 100.0 + 9.0 * (i % 7) as f64))
            .collect();
        let mut demo_weights = vec![1.0; 24];
        demo_weights[3] = 1.5;
        demo_weights[10] = 0.5;
        vec![
            (
                "a known bad, a known good and an unexplored arm",
                arms(),
                vec![1.0; 3],
            ),
            ("demo-like, unweighted", demo.clone(), vec![1.0; 24]),
            ("demo-like, two arms re-weighted", demo, demo_weights),
            (
                "few trials, skewed posteriors",
                vec![arm(3.0, 0.0), arm(10.0, 1.0), arm(1.0, 1.0), arm(40.0, 2.5)],
                vec![1.0, 2.0, 1.0, 1.0],
            ),
            (
                "a posterior far narrower than the others",
                vec![arm(1e6, 3e5), arm(0.0, 0.0), arm(20.0, 6.0)],
                vec![1.0, 1.0, 1.2],
            ),
        ]
    }

    #[test]
    fn thompson_propensity_by_quadrature_is_exact_for_uniform_arms() {
        // K arms with no data: by symmetry each is first with probability 1/K.
        for k in [2usize, 5, 24] {
            let stats = vec![ArmStats::default(); k];
            for i in [0, k - 1] {
                let p = thompson_first_probability(&stats, &vec![1.0; k], i).expect("proper");
                assert!((p - 1.0 / k as f64).abs() < 1e-5, "K = {k}: {p}");
            }
        }
    }

    #[test]
    fn thompson_propensity_by_quadrature_matches_a_large_monte_carlo_run() {
        let mut rng = StdRng::seed_from_u64(11);
        for (name, stats, weights) in quadrature_cases() {
            let rounds = 100_000;
            let simulated = thompson_distribution(&stats, &weights, rounds, &mut rng);
            let computed: Vec<f64> = (0..stats.len())
                .map(|i| thompson_first_probability(&stats, &weights, i).expect("proper"))
                .collect();
            let total: f64 = computed.iter().sum();
            assert!((total - 1.0).abs() < 1e-4, "{name}: sums to {total}");
            for (i, (c, s)) in computed.iter().zip(&simulated).enumerate() {
                // Four standard errors of the simulated share, and a little more.
                let tolerance = 4.0 * (s * (1.0 - s) / rounds as f64).sqrt() + 1e-3;
                assert!(
                    (c - s).abs() < tolerance,
                    "{name}, arm {i}: quadrature {c}, Monte Carlo {s}"
                );
            }
        }
    }

    #[test]
    fn thompson_reports_the_quadrature_and_falls_back_to_monte_carlo() {
        let mut rng = StdRng::seed_from_u64(5);
        let r = thompson(&arms(), &[1.0; 3], 200, &mut rng);
        assert_eq!(r.propensity_kind, PropensityKind::Exact);
        let expected = thompson_first_probability(&arms(), &[1.0; 3], r.order[0].0)
            .expect("proper")
            .max(MIN_PROPENSITY);
        assert_eq!(r.propensity, expected);
        // An arm without a proper posterior: the Monte Carlo estimate, said so.
        let mut broken = arms();
        broken[0].trials = f64::INFINITY;
        assert!(thompson_first_probability(&broken, &[1.0; 3], 1).is_none());
        let r = thompson(&broken, &[1.0; 3], 200, &mut rng);
        assert_eq!(r.propensity_kind, PropensityKind::Estimated);
        assert!(r.propensity > 0.0 && r.propensity <= 1.0);
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
