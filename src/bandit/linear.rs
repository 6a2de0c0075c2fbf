//! Linear contextual bandits: LinUCB and linear Thompson sampling, one ridge regression
//! per arm (the "disjoint" model of Li et al., 2010) over one context vector built from
//! the customer, the request context and the item's model score.
//!
//! **Context vector.** [`Featurizer::encode`] hashes every input into `dims` slots:
//! slot 0 is a constant 1 (the arm's own bias), the last slot the candidate's model score
//! (logit, scaled; 0 without a model: the only part that differs between arms), and the
//! slots between take the customer's numeric features (`sign(v)·ln(1 + |v|)`), segments,
//! the request context's fields (strings and booleans one-hot as `key=value`, numbers as
//! values) and the hour of day (sine and cosine). Each name is hashed (FNV-1a) to a slot
//! and a sign, so collisions cancel out on average instead of adding up. The part after
//! the bias is scaled to unit length at most, so `α` and `v` mean the same whatever the
//! number of features.
//!
//! **State.** Each (placement, arm) keeps additive sufficient statistics
//! ([`LinearStats`]): `n`, `A = Σ x xᵀ` and `b = Σ r x`. An impression adds `x xᵀ`, a
//! reward adds `r x`, so replicas merge by addition. The posterior is the ridge solution
//! `θ = (λI + A)⁻¹ b`, computed per decision by a Cholesky factorisation.
//!
//! **Policies.** LinUCB ranks by `θᵀx + α·√(xᵀ(λI + A)⁻¹x)`: deterministic, so the chosen
//! arm's propensity is exactly 1. Linear Thompson sampling draws `θ̃ ~ N(θ, v²(λI + A)⁻¹)`
//! per arm; since the arms' models are independent, each arm's sampled score is a normal
//! `N(θᵀx, v²·xᵀ(λI + A)⁻¹x)`, and the probability that an arm comes first is a
//! one-dimensional integral, computed by quadrature ([`linear_thompson_distribution`]).
//!
//! **Rule weights** act through a monotone map `g_w(s) = s·w` for `s ≥ 0` and `s / w`
//! below, so a boost always helps even when a linear estimate is negative.

use std::collections::BTreeMap;

use chrono::{DateTime, Timelike, Utc};
use nalgebra::{DMatrix, DVector};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::policy::{rank, Ranking};
use crate::decision::PropensityKind;

/// Additive sufficient statistics of one arm's ridge regression: `n` impressions,
/// `A = Σ x xᵀ` (the upper triangle, row by row) and `b = Σ r x`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearStats {
    pub dims: usize,
    pub n: f64,
    /// Upper triangle of `A`, row-major: `dims·(dims + 1)/2` entries.
    pub a: Vec<f64>,
    pub b: Vec<f64>,
}

impl LinearStats {
    pub fn zero(dims: usize) -> Self {
        LinearStats {
            dims,
            n: 0.0,
            a: vec![0.0; dims * (dims + 1) / 2],
            b: vec![0.0; dims],
        }
    }

    /// What one impression with context `x` adds: `n = 1`, `A = x xᵀ`.
    pub fn impression(x: &[f64]) -> Self {
        let dims = x.len();
        let mut s = LinearStats::zero(dims);
        s.n = 1.0;
        let mut k = 0;
        for i in 0..dims {
            for j in i..dims {
                s.a[k] = x[i] * x[j];
                k += 1;
            }
        }
        s
    }

    /// What a reward `r` for an impression with context `x` adds: `b = r x`.
    pub fn reward(x: &[f64], r: f64) -> Self {
        let mut s = LinearStats::zero(x.len());
        for (b, xi) in s.b.iter_mut().zip(x) {
            *b = r * xi;
        }
        s
    }

    /// Whether the entry lengths agree with `dims` and every number is finite.
    pub fn is_valid(&self) -> bool {
        self.a.len() == self.dims * (self.dims + 1) / 2
            && self.b.len() == self.dims
            && self.n.is_finite()
            && self.a.iter().chain(&self.b).all(|v| v.is_finite())
    }

    /// Adds `other` (same `dims`) entry by entry.
    pub fn merge(&mut self, other: &LinearStats) {
        debug_assert_eq!(self.dims, other.dims);
        self.n += other.n;
        for (a, o) in self.a.iter_mut().zip(&other.a) {
            *a += o;
        }
        for (b, o) in self.b.iter_mut().zip(&other.b) {
            *b += o;
        }
    }

    /// The statistics as little-endian `f64`s: `n`, then `b`, then `A`'s upper triangle
    /// (how stores keep them).
    pub fn to_bytes(&self) -> Vec<u8> {
        std::iter::once(self.n)
            .chain(self.b.iter().copied())
            .chain(self.a.iter().copied())
            .flat_map(f64::to_le_bytes)
            .collect()
    }

    /// Reads [`LinearStats::to_bytes`]; `None` when the length does not fit `dims`.
    pub fn from_bytes(dims: usize, bytes: &[u8]) -> Option<Self> {
        let tri = dims * (dims + 1) / 2;
        if bytes.len() != 8 * (1 + dims + tri) {
            return None;
        }
        let mut values = bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
        let n = values.next()?;
        let b: Vec<f64> = values.by_ref().take(dims).collect();
        let a: Vec<f64> = values.collect();
        Some(LinearStats { dims, n, a, b })
    }
}

/// Hashes a decision's inputs into a context vector of `dims` slots (module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Featurizer {
    pub dims: usize,
}

/// Everything a context vector is built from, as a decision records it.
pub struct ContextInput<'a> {
    pub features: &'a BTreeMap<String, f64>,
    pub segments: &'a [String],
    /// The request context, as sent.
    pub context: &'a Value,
    pub at: DateTime<Utc>,
}

/// Smallest number of slots: bias, one hashed slot, model score.
pub const MIN_DIMS: usize = 3;

impl Featurizer {
    /// The vector of one candidate; `model_score` is its model probability, if any.
    pub fn encode(&self, input: &ContextInput<'_>, model_score: Option<f64>) -> Vec<f64> {
        let dims = self.dims.max(MIN_DIMS);
        let mut x = vec![0.0; dims];
        let hashed = dims - 2;
        let mut put = |name: &str, value: f64| {
            if !value.is_finite() || value == 0.0 {
                return;
            }
            let h = fnv1a(name.as_bytes());
            let slot = 1 + (h % hashed as u64) as usize;
            let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
            x[slot] += sign * value;
        };
        for (name, &v) in input.features {
            put(name, v.signum() * v.abs().ln_1p());
        }
        for segment in input.segments {
            put(&format!("segment={segment}"), 1.0);
        }
        if let Value::Object(fields) = input.context {
            for (key, v) in fields {
                match v {
                    Value::String(s) => put(&format!("{key}={s}"), 1.0),
                    Value::Bool(b) => put(&format!("{key}={b}"), 1.0),
                    Value::Number(n) => {
                        if let Some(f) = n.as_f64() {
                            put(key, f.signum() * f.abs().ln_1p());
                        }
                    }
                    _ => {}
                }
            }
        }
        let hour = f64::from(input.at.hour()) + f64::from(input.at.minute()) / 60.0;
        let angle = hour / 24.0 * std::f64::consts::TAU;
        put("hour_sin", angle.sin());
        put("hour_cos", angle.cos());
        if let Some(p) = model_score.filter(|p| p.is_finite()) {
            let p = p.clamp(1e-4, 1.0 - 1e-4);
            x[dims - 1] = (p / (1.0 - p)).ln() / 10.0;
        }
        let norm = x[1..].iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm > 1.0 {
            for v in &mut x[1..] {
                *v /= norm;
            }
        }
        x[0] = 1.0;
        x
    }
}

/// FNV-1a, 64 bits: the slot and sign of a feature name.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// One arm's ridge posterior: `θ = (λI + A)⁻¹ b` and the Cholesky factor of `λI + A`.
pub struct LinearPosterior {
    theta: DVector<f64>,
    factor: nalgebra::Cholesky<f64, nalgebra::Dyn>,
}

impl LinearPosterior {
    /// `None` when the statistics are invalid or `λI + A` is not positive definite
    /// (impossible for valid statistics and `λ > 0`).
    pub fn new(stats: &LinearStats, ridge: f64) -> Option<Self> {
        if !stats.is_valid() || ridge.is_nan() || ridge <= 0.0 {
            return None;
        }
        let d = stats.dims;
        let mut a = DMatrix::<f64>::identity(d, d) * ridge;
        let mut k = 0;
        for i in 0..d {
            for j in i..d {
                a[(i, j)] += stats.a[k];
                if i != j {
                    a[(j, i)] += stats.a[k];
                }
                k += 1;
            }
        }
        let factor = a.cholesky()?;
        let theta = factor.solve(&DVector::from_column_slice(&stats.b));
        Some(LinearPosterior { theta, factor })
    }

    /// `(θᵀx, xᵀ(λI + A)⁻¹x)`: the estimate and its variance factor.
    pub fn predict(&self, x: &[f64]) -> (f64, f64) {
        let x = DVector::from_column_slice(x);
        let mean = self.theta.dot(&x);
        let solved = self.factor.solve(&x);
        (mean, x.dot(&solved).max(0.0))
    }
}

/// Per-candidate inputs of a linear policy: its estimate and variance factor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearArm {
    pub mean: f64,
    pub variance: f64,
}

impl LinearArm {
    /// The arm's estimate for context `x` from its statistics; statistics that give no
    /// posterior (invalid ones) explore from the prior `N(0, |x|²/λ)`.
    pub fn estimate(stats: &LinearStats, x: &[f64], ridge: f64) -> Self {
        match LinearPosterior::new(stats, ridge) {
            Some(post) => {
                let (mean, variance) = post.predict(x);
                LinearArm { mean, variance }
            }
            None => LinearArm {
                mean: 0.0,
                variance: x.iter().map(|v| v * v).sum::<f64>() / ridge,
            },
        }
    }
}

/// `g_w`: the rule weight's monotone effect on a score (module docs).
fn weighted(s: f64, w: f64) -> f64 {
    if s >= 0.0 {
        s * w
    } else {
        s / w
    }
}

/// `g_w⁻¹`.
fn unweighted(t: f64, w: f64) -> f64 {
    if t >= 0.0 {
        t / w
    } else {
        t * w
    }
}

/// LinUCB: rank by `g_w(mean + α·√variance)`; the first arm is chosen with certainty.
/// The score shown for each arm is its weighted estimate `g_w(mean)`.
pub fn lin_ucb(arms: &[LinearArm], weights: &[f64], alpha: f64) -> Ranking {
    let ucb: Vec<f64> = arms
        .iter()
        .zip(weights)
        .map(|(a, &w)| weighted(a.mean + alpha * a.variance.sqrt(), w))
        .collect();
    Ranking {
        order: rank(&ucb)
            .into_iter()
            .map(|i| (i, weighted(arms[i].mean, weights[i])))
            .collect(),
        propensity: 1.0,
        propensity_kind: PropensityKind::Exact,
    }
}

/// Linear Thompson sampling: one draw `N(mean, v²·variance)` per arm, ranked by
/// `g_w(draw)`. The first arm's propensity comes from [`first_probability`] (quadrature,
/// `Exact` up to its 1e-6 accuracy).
pub fn linear_thompson(arms: &[LinearArm], weights: &[f64], v: f64, rng: &mut impl Rng) -> Ranking {
    let draws: Vec<f64> = arms
        .iter()
        .zip(weights)
        .map(|(a, &w)| {
            let z: f64 = StandardNormal.sample(rng);
            weighted(a.mean + v * a.variance.sqrt() * z, w)
        })
        .collect();
    let order = rank(&draws);
    let propensity = first_probability(arms, weights, v, order[0]);
    Ranking {
        order: order
            .into_iter()
            .map(|i| (i, weighted(arms[i].mean, weights[i])))
            .collect(),
        propensity,
        propensity_kind: PropensityKind::Exact,
    }
}

/// Probability that linear Thompson sampling puts each arm first.
pub fn linear_thompson_distribution(arms: &[LinearArm], weights: &[f64], v: f64) -> Vec<f64> {
    let p: Vec<f64> = (0..arms.len())
        .map(|i| first_probability(arms, weights, v, i))
        .collect();
    let total: f64 = p.iter().sum();
    if total > 0.0 {
        p.into_iter().map(|x| x / total).collect()
    } else {
        vec![1.0 / arms.len() as f64; arms.len()]
    }
}

/// Nodes of the quadrature over the chosen arm's normal, from −8σ to +8σ (Simpson's rule).
const QUADRATURE_NODES: usize = 400;

/// `P(arm i first) = ∫ φ(z) · Πⱼ≠ᵢ P(g_wⱼ(Sⱼ) < g_wᵢ(μᵢ + σᵢz)) dz`, with
/// `Sⱼ ~ N(μⱼ, σⱼ²)`, `σ = v·√variance`. An arm with σ = 0 is a point mass.
pub fn first_probability(arms: &[LinearArm], weights: &[f64], v: f64, i: usize) -> f64 {
    let sd = |a: &LinearArm| v * a.variance.sqrt();
    // P(g_w(S) < t) for one rival.
    let below = |j: usize, t: f64| {
        let (mu, s) = (arms[j].mean, sd(&arms[j]));
        let raw = unweighted(t, weights[j]);
        if s > 0.0 {
            normal_cdf((raw - mu) / s)
        } else if mu < raw {
            1.0
        } else {
            0.0
        }
    };
    let (mu, s) = (arms[i].mean, sd(&arms[i]));
    // Rivals that stay below arm i's lowest plausible score (8σ) never matter.
    let floor = weighted(mu - 8.0 * s, weights[i]);
    let rivals: Vec<usize> = (0..arms.len())
        .filter(|&j| j != i && weighted(arms[j].mean + 8.0 * sd(&arms[j]), weights[j]) >= floor)
        .collect();
    let beats_all = |t: f64| rivals.iter().map(|&j| below(j, t)).product::<f64>();
    if s <= 0.0 {
        return beats_all(weighted(mu, weights[i]));
    }
    // Rivals without variance are steps in the integrand: split the range at them so
    // that Simpson's rule only ever sees smooth pieces.
    let mut cuts: Vec<f64> = rivals
        .iter()
        .copied()
        .filter(|&j| sd(&arms[j]) <= 0.0)
        .map(|j| (unweighted(weighted(arms[j].mean, weights[j]), weights[i]) - mu) / s)
        .filter(|z| z.abs() < 8.0)
        .collect();
    cuts.extend([-8.0, 8.0]);
    cuts.sort_by(f64::total_cmp);
    let integrand = |z: f64| {
        let density = (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt();
        density * beats_all(weighted(mu + s * z, weights[i]))
    };
    let mut total = 0.0;
    for piece in cuts.windows(2) {
        let (lo, hi) = (piece[0], piece[1]);
        if hi <= lo {
            continue;
        }
        // Nodes in proportion to the piece's length, an even number of intervals.
        let n = ((QUADRATURE_NODES as f64 * (hi - lo) / 16.0).ceil() as usize).max(2);
        let n = n + n % 2;
        let h = (hi - lo) / n as f64;
        // Just inside the ends, so a step exactly at a cut counts on its own side.
        let at = |k: usize| (lo + h * k as f64).clamp(lo + 1e-12, hi - 1e-12);
        let mut sum = integrand(at(0)) + integrand(at(n));
        for k in 1..n {
            sum += if k % 2 == 1 { 4.0 } else { 2.0 } * integrand(at(k));
        }
        total += sum * h / 3.0;
    }
    total.clamp(0.0, 1.0)
}

/// The standard normal CDF.
fn normal_cdf(z: f64) -> f64 {
    0.5 * statrs::function::erf::erfc(-z / std::f64::consts::SQRT_2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use serde_json::json;

    fn input<'a>(
        features: &'a BTreeMap<String, f64>,
        segments: &'a [String],
        context: &'a Value,
    ) -> ContextInput<'a> {
        ContextInput {
            features,
            segments,
            context,
            at: "2026-11-27T12:00:00Z".parse().expect("time"),
        }
    }

    #[test]
    fn encoding_is_deterministic_bounded_and_carries_the_model_score() {
        let f: BTreeMap<String, f64> = [("views".to_string(), 12.0), ("spend".into(), -3.0)]
            .into_iter()
            .collect();
        let segments = vec!["vip".to_string()];
        let ctx = json!({"device": "mobile", "returning": true, "cart": 2});
        let enc = Featurizer { dims: 16 };
        let a = enc.encode(&input(&f, &segments, &ctx), Some(0.3));
        let b = enc.encode(&input(&f, &segments, &ctx), Some(0.3));
        assert_eq!(a, b, "the same inputs give the same vector");
        assert_eq!(a.len(), 16);
        assert_eq!(a[0], 1.0, "bias");
        let norm: f64 = a[1..].iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!(norm <= 1.0 + 1e-12, "{norm}");
        let without = enc.encode(&input(&f, &segments, &ctx), None);
        assert_eq!(without[15], 0.0);
        assert!(a[15] < 0.0, "logit(0.3) < 0: {}", a[15]);
        let other = enc.encode(&input(&f, &[], &json!({"device": "web"})), Some(0.3));
        assert_ne!(a, other, "segments and context change the vector");
    }

    #[test]
    fn stats_merge_by_addition_and_round_trip_as_bytes() {
        let x = [1.0, 0.5, -0.25];
        let mut s = LinearStats::zero(3);
        s.merge(&LinearStats::impression(&x));
        s.merge(&LinearStats::reward(&x, 1.0));
        s.merge(&LinearStats::impression(&x));
        assert_eq!(s.n, 2.0);
        assert_eq!(s.a, vec![2.0, 1.0, -0.5, 0.5, -0.25, 0.125]);
        assert_eq!(s.b, vec![1.0, 0.5, -0.25]);
        assert_eq!(LinearStats::from_bytes(3, &s.to_bytes()), Some(s.clone()));
        assert_eq!(LinearStats::from_bytes(4, &s.to_bytes()), None);
    }

    #[test]
    fn ridge_posterior_recovers_a_linear_reward() {
        // r = 0.1 + 0.4·x1 − 0.2·x2, exactly, over random contexts.
        let mut rng = StdRng::seed_from_u64(5);
        let mut s = LinearStats::zero(3);
        for _ in 0..2000 {
            let x = [1.0, rng.random::<f64>(), rng.random::<f64>()];
            let r = 0.1 + 0.4 * x[1] - 0.2 * x[2];
            s.merge(&LinearStats::impression(&x));
            s.merge(&LinearStats::reward(&x, r));
        }
        let post = LinearPosterior::new(&s, 1e-3).expect("posterior");
        let (mean, var) = post.predict(&[1.0, 0.5, 0.5]);
        assert!((mean - 0.2).abs() < 1e-3, "{mean}");
        assert!(var < 0.01, "variance shrinks with data: {var}");
        let fresh = LinearPosterior::new(&LinearStats::zero(3), 1.0).expect("prior");
        assert_eq!(fresh.predict(&[1.0, 0.0, 0.0]), (0.0, 1.0));
        assert!(LinearPosterior::new(&s, 0.0).is_none(), "λ must be > 0");
    }

    #[test]
    fn lin_ucb_prefers_uncertainty_until_the_estimate_wins() {
        let arms = [
            LinearArm {
                mean: 0.3,
                variance: 0.0001,
            },
            LinearArm {
                mean: 0.1,
                variance: 0.25,
            },
        ];
        assert_eq!(lin_ucb(&arms, &[1.0, 1.0], 1.0).order[0].0, 1, "explores");
        let r = lin_ucb(&arms, &[1.0, 1.0], 0.1);
        assert_eq!(r.order[0].0, 0, "exploits");
        assert_eq!(r.propensity, 1.0);
        assert_eq!(r.order[0].1, 0.3, "shows the estimate");
        assert_eq!(lin_ucb(&arms, &[5.0, 1.0], 1.0).order[0].0, 0, "boost");
    }

    #[test]
    fn linear_thompson_propensities_match_observed_frequencies() {
        let arms = [
            LinearArm {
                mean: 0.2,
                variance: 0.01,
            },
            LinearArm {
                mean: 0.25,
                variance: 0.04,
            },
            LinearArm {
                mean: -0.1,
                variance: 0.09,
            },
            LinearArm {
                mean: 0.22,
                variance: 0.0,
            },
        ];
        let weights = [1.0, 1.0, 2.0, 1.0];
        let dist = linear_thompson_distribution(&arms, &weights, 1.0);
        assert!((dist.iter().sum::<f64>() - 1.0).abs() < 1e-6);
        let unnormalised: f64 = (0..4)
            .map(|i| first_probability(&arms, &weights, 1.0, i))
            .sum();
        assert!(
            (unnormalised - 1.0).abs() < 1e-6,
            "quadrature: {unnormalised}"
        );
        let mut rng = StdRng::seed_from_u64(11);
        let n = 10_000;
        let mut firsts = [0usize; 4];
        for _ in 0..n {
            let r = linear_thompson(&arms, &weights, 1.0, &mut rng);
            assert!((r.propensity - dist[r.order[0].0]).abs() < 1e-6);
            firsts[r.order[0].0] += 1;
        }
        for i in 0..4 {
            let observed = firsts[i] as f64 / n as f64;
            let se = (dist[i] * (1.0 - dist[i]) / n as f64).sqrt();
            assert!(
                (observed - dist[i]).abs() < 5.0 * se + 1e-9,
                "arm {i}: observed {observed}, computed {}",
                dist[i]
            );
        }
    }
}
