//! The estimators and their intervals.
//!
//! For `n` logged rounds `(x_i, a_i, μ_i, r_i)` — context, logged action, its logged
//! propensity `μ_i = μ(a_i|x_i)` and reward — a target policy `π` given per round as its
//! distribution over the round's actions, and optionally a reward model `r̂(x_i, a)` given
//! per round as one estimate per action:
//!
//! - **importance weight** `w_i = π(a_i|x_i) / μ_i`, or `min(w_i, clip)` with clipping.
//!   Clipping trades bias (toward lower values for nonnegative rewards) for variance;
//!   without it IPS and DR are unbiased under the module's assumptions;
//! - **IPS** (inverse propensity scoring): `V = (1/n) Σ w_i r_i`;
//! - **SNIPS** (self-normalised IPS): `V = Σ w_i r_i / Σ w_i`. Biased for small `n` but
//!   consistent, and never outside the range of the logged rewards;
//! - **DM** (direct method): `V = (1/n) Σ_i Σ_a π(a|x_i) r̂(x_i, a)`, the reward model's
//!   own answer. Reported as a by-product of DR: it is as wrong as the model, and its
//!   interval covers only the sampling of contexts, not the model's bias;
//! - **DR** (doubly robust):
//!   `V = (1/n) Σ_i [ Σ_a π(a|x_i) r̂(x_i, a) + w_i (r_i − r̂(x_i, a_i)) ]`. Unbiased when the propensities are right, whatever the model; the better the model,
//!   the smaller the correction term and its variance.
//!
//! Intervals are at [`LEVEL`] with the normal approximation `V ± z·se`, `z = Φ⁻¹(0.975)`:
//! for IPS, DM and DR `se = s / √n` with `s` the sample standard deviation (`n − 1`) of the
//! per-round terms; for SNIPS the delta-method `se² = Σ w_i² (r_i − V)² / (Σ w_i)²`. They
//! are trustworthy when the effective sample size is large; with heavy-tailed weights
//! they are too narrow.
//!
//! Diagnostics: the **effective sample size** `(Σ w_i)² / Σ w_i²` of the weights used
//! (`n` when all weights are equal, near 1 when one round dominates), the largest weight
//! before clipping, and how many rounds were clipped.

use std::fmt;

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, Normal};

use super::logged::LoggedRound;
use super::{OpeError, OpeResult};

/// Two-sided confidence level of every interval.
pub const LEVEL: f64 = 0.95;

/// How far a target distribution's sum may stray from 1 (rounding in the caller's
/// arithmetic).
const SUM_TOLERANCE: f64 = 1e-6;

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Options {
    /// Upper bound on each importance weight; `None` leaves weights as they are.
    pub clip: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Estimator {
    /// Inverse propensity scoring.
    Ips,
    /// Self-normalised inverse propensity scoring.
    Snips,
    /// The reward model alone, no correction: a diagnostic of the model, biased as it is.
    DirectMethod,
    /// Direct method plus the importance-weighted correction of its error.
    DoublyRobust,
}

impl fmt::Display for Estimator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Estimator::Ips => "ips",
            Estimator::Snips => "snips",
            Estimator::DirectMethod => "direct_method",
            Estimator::DoublyRobust => "doubly_robust",
        })
    }
}

/// One estimator's estimate of the target policy's mean reward per round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub estimator: Estimator,
    pub value: f64,
    /// The interval at [`LEVEL`]: `value ± z·std_error`.
    pub ci_low: f64,
    pub ci_high: f64,
    pub std_error: f64,
}

impl Estimate {
    fn new(estimator: Estimator, value: f64, std_error: f64) -> Self {
        let half = z_critical() * std_error;
        Estimate {
            estimator,
            value,
            ci_low: value - half,
            ci_high: value + half,
            std_error,
        }
    }

    /// Mean of per-round terms with `se = s / √n`; needs at least two terms.
    fn mean_of(estimator: Estimator, terms: &[f64]) -> Self {
        let n = terms.len() as f64;
        let mean = terms.iter().sum::<f64>() / n;
        let variance = terms.iter().map(|t| (t - mean).powi(2)).sum::<f64>() / (n - 1.0);
        Estimate::new(estimator, mean, (variance / n).sqrt())
    }

    pub fn covers(&self, value: f64) -> bool {
        self.ci_low <= value && value <= self.ci_high
    }
}

/// What the log says about a target policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub rounds: usize,
    /// Mean reward of the log: the logging policy's own value.
    pub logged_value: f64,
    /// `(Σ w)² / Σ w²` over the weights used (after clipping).
    pub effective_sample_size: f64,
    /// The largest importance weight before clipping.
    pub max_weight: f64,
    /// The clip applied, if any, and how many rounds it lowered.
    pub clip: Option<f64>,
    pub clipped_rounds: usize,
    /// IPS and SNIPS always; DM and DR when a reward model was given.
    pub estimates: Vec<Estimate>,
}

impl Evaluation {
    pub fn estimate(&self, estimator: Estimator) -> Option<&Estimate> {
        self.estimates.iter().find(|e| e.estimator == estimator)
    }
}

/// `Φ⁻¹(1 − (1 − LEVEL)/2)`, about 1.96.
fn z_critical() -> f64 {
    Normal::standard().inverse_cdf(1.0 - (1.0 - LEVEL) / 2.0)
}

/// Evaluates a target policy on `rounds`.
///
/// `target[i]` is the target policy's distribution over `rounds[i].actions` (same order,
/// each in [0, 1], summing to 1). `reward_model[i]`, when given, is one reward estimate
/// per action of round `i`; it adds the direct method and doubly robust estimates.
///
/// Errors name the offending input (`rounds[3].propensity`, `target[3][1]`,
/// `reward_model[0]`); no partial result or NaN is ever returned. At least two rounds
/// are needed (an interval needs a sample variance), and the target must give a positive
/// probability to at least one logged action ([`OpeError::NoOverlap`]).
pub fn evaluate(
    rounds: &[LoggedRound],
    target: &[Vec<f64>],
    reward_model: Option<&[Vec<f64>]>,
    options: Options,
) -> OpeResult<Evaluation> {
    check(rounds, target, reward_model, options)?;
    let n = rounds.len();

    let raw: Vec<f64> = rounds
        .iter()
        .zip(target)
        .map(|(round, pi)| pi[round.chosen] / round.propensity)
        .collect();
    if let Some(i) = raw.iter().position(|w| !w.is_finite()) {
        return Err(OpeError::invalid(
            format!("rounds[{i}].propensity"),
            "too small: the importance weight overflows",
        ));
    }
    let weights: Vec<f64> = match options.clip {
        Some(clip) => raw.iter().map(|w| w.min(clip)).collect(),
        None => raw.clone(),
    };
    let sum_w: f64 = weights.iter().sum();
    if sum_w == 0.0 {
        return Err(OpeError::NoOverlap);
    }
    let sum_w2: f64 = weights.iter().map(|w| w * w).sum();

    let rewards: Vec<f64> = rounds.iter().map(|r| r.reward).collect();
    let ips_terms: Vec<f64> = weights.iter().zip(&rewards).map(|(w, r)| w * r).collect();
    let mut estimates = vec![Estimate::mean_of(Estimator::Ips, &ips_terms)];

    let snips = ips_terms.iter().sum::<f64>() / sum_w;
    let snips_variance = weights
        .iter()
        .zip(&rewards)
        .map(|(w, r)| (w * (r - snips)).powi(2))
        .sum::<f64>()
        / (sum_w * sum_w);
    estimates.push(Estimate::new(
        Estimator::Snips,
        snips,
        snips_variance.sqrt(),
    ));

    if let Some(model) = reward_model {
        let direct: Vec<f64> = target
            .iter()
            .zip(model)
            .map(|(pi, r_hat)| pi.iter().zip(r_hat).map(|(p, r)| p * r).sum())
            .collect();
        let doubly_robust: Vec<f64> = (0..n)
            .map(|i| direct[i] + weights[i] * (rewards[i] - model[i][rounds[i].chosen]))
            .collect();
        estimates.push(Estimate::mean_of(Estimator::DirectMethod, &direct));
        estimates.push(Estimate::mean_of(Estimator::DoublyRobust, &doubly_robust));
    }

    let effective_sample_size = sum_w * sum_w / sum_w2;
    let overflow = estimates
        .iter()
        .find(|e| !(e.value.is_finite() && e.std_error.is_finite()))
        .map(|e| e.estimator.to_string())
        .or_else(|| (!effective_sample_size.is_finite()).then(|| "effective sample size".into()));
    if let Some(what) = overflow {
        return Err(OpeError::invalid(
            "rounds",
            format!("{what} overflows: rewards or weights too large"),
        ));
    }

    Ok(Evaluation {
        rounds: n,
        logged_value: rewards.iter().sum::<f64>() / n as f64,
        effective_sample_size,
        max_weight: raw.iter().copied().fold(0.0, f64::max),
        clip: options.clip,
        clipped_rounds: options
            .clip
            .map_or(0, |clip| raw.iter().filter(|w| **w > clip).count()),
        estimates,
    })
}

fn check(
    rounds: &[LoggedRound],
    target: &[Vec<f64>],
    reward_model: Option<&[Vec<f64>]>,
    options: Options,
) -> OpeResult<()> {
    if rounds.is_empty() {
        return Err(OpeError::invalid("rounds", "the log is empty"));
    }
    if rounds.len() < 2 {
        return Err(OpeError::invalid(
            "rounds",
            format!(
                "at least 2 rounds are needed for an interval, got {}",
                rounds.len()
            ),
        ));
    }
    if let Some(clip) = options.clip {
        if !(clip.is_finite() && clip > 0.0) {
            return Err(OpeError::invalid("clip", "must be a positive number"));
        }
    }
    let lengths = |name: &str, len: usize| {
        if len == rounds.len() {
            Ok(())
        } else {
            Err(OpeError::invalid(
                name,
                format!("has {len} entries for {} rounds", rounds.len()),
            ))
        }
    };
    lengths("target", target.len())?;
    if let Some(model) = reward_model {
        lengths("reward_model", model.len())?;
    }
    for (i, (round, pi)) in rounds.iter().zip(target).enumerate() {
        round.check(&format!("rounds[{i}]"))?;
        let actions = round.actions.len();
        if pi.len() != actions {
            return Err(OpeError::invalid(
                format!("target[{i}]"),
                format!("has {} probabilities for {actions} actions", pi.len()),
            ));
        }
        if let Some(a) = pi.iter().position(|p| !(0.0..=1.0).contains(p)) {
            return Err(OpeError::invalid(
                format!("target[{i}][{a}]"),
                "must be in [0, 1]",
            ));
        }
        let sum: f64 = pi.iter().sum();
        if (sum - 1.0).abs() > SUM_TOLERANCE {
            return Err(OpeError::invalid(
                format!("target[{i}]"),
                format!("must sum to 1, sums to {sum}"),
            ));
        }
        if let Some(r_hat) = reward_model.map(|m| &m[i]) {
            if r_hat.len() != actions {
                return Err(OpeError::invalid(
                    format!("reward_model[{i}]"),
                    format!("has {} estimates for {actions} actions", r_hat.len()),
                ));
            }
            if let Some(a) = r_hat.iter().position(|r| !r.is_finite()) {
                return Err(OpeError::invalid(
                    format!("reward_model[{i}][{a}]"),
                    "must be finite",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A round over actions `a`, `b`, `c`.
    fn round(chosen: usize, propensity: f64, reward: f64) -> LoggedRound {
        LoggedRound {
            actions: vec!["a".into(), "b".into(), "c".into()],
            chosen,
            propensity,
            reward,
            context: BTreeMap::new(),
        }
    }

    fn close(got: f64, want: f64) {
        assert!((got - want).abs() < 1e-12, "got {got}, want {want}");
    }

    #[test]
    fn z_is_the_normal_quantile() {
        close(z_critical(), 1.959_963_984_540_054);
    }

    /// Four rounds worked by hand. Weights: 0.5/0.5 = 1, 0.25/0.25 = 1, 0.5/0.25 = 2,
    /// 0/0.5 = 0; rewards 1, 0, 1, 1.
    #[test]
    fn a_small_log_worked_by_hand() {
        let rounds = vec![
            round(0, 0.5, 1.0),
            round(1, 0.25, 0.0),
            round(0, 0.25, 1.0),
            round(2, 0.5, 1.0),
        ];
        let target = vec![
            vec![0.5, 0.25, 0.25],
            vec![0.5, 0.25, 0.25],
            vec![0.5, 0.5, 0.0],
            vec![1.0, 0.0, 0.0],
        ];
        let model = vec![vec![0.8, 0.2, 0.5]; 4];
        let e = evaluate(&rounds, &target, Some(&model), Options::default()).unwrap();
        assert_eq!(e.rounds, 4);
        close(e.logged_value, 0.75);
        close(e.max_weight, 2.0);
        // (1 + 1 + 2 + 0)² / (1 + 1 + 4 + 0)
        close(e.effective_sample_size, 16.0 / 6.0);
        assert_eq!((e.clip, e.clipped_rounds), (None, 0));

        // IPS terms w·r: 1, 0, 2, 0 → mean 0.75, s² = (0.0625 + 0.5625 + 1.5625 + 0.5625) / 3.
        let ips = e.estimate(Estimator::Ips).unwrap();
        close(ips.value, 0.75);
        close(ips.std_error, (2.75f64 / 3.0 / 4.0).sqrt());
        close(ips.ci_low, 0.75 - z_critical() * ips.std_error);
        close(ips.ci_high, 0.75 + z_critical() * ips.std_error);

        // SNIPS: 3 / 4; se² = (1·0.25² + 1·0.75² + 4·0.25² + 0) / 16.
        let snips = e.estimate(Estimator::Snips).unwrap();
        close(snips.value, 0.75);
        close(snips.std_error, (0.875f64 / 16.0).sqrt());

        // DM per round: 0.5·0.8 + 0.25·0.2 + 0.25·0.5 = 0.575 (twice), 0.5, 0.8.
        let dm = e.estimate(Estimator::DirectMethod).unwrap();
        close(dm.value, (0.575 * 2.0 + 0.5 + 0.8) / 4.0);
        // DR adds w·(r − r̂(a_i)): 1·0.2, 1·(−0.2), 2·0.2, 0.
        let dr = e.estimate(Estimator::DoublyRobust).unwrap();
        let terms = [0.775, 0.375, 0.9, 0.8];
        let mean = terms.iter().sum::<f64>() / 4.0;
        let s2 = terms.iter().map(|t| (t - mean).powi(2)).sum::<f64>() / 3.0;
        close(dr.value, mean);
        close(dr.std_error, (s2 / 4.0).sqrt());

        let order: Vec<Estimator> = e.estimates.iter().map(|e| e.estimator).collect();
        use Estimator::*;
        assert_eq!(order, vec![Ips, Snips, DirectMethod, DoublyRobust]);
        let without_model = evaluate(&rounds, &target, None, Options::default()).unwrap();
        assert_eq!(without_model.estimates, e.estimates[..2]);
    }

    #[test]
    fn the_result_serialises_with_stable_names() {
        let rounds = vec![round(0, 0.5, 1.0), round(0, 0.5, 0.0)];
        let target = vec![vec![0.5, 0.5, 0.0]; 2];
        let e = evaluate(&rounds, &target, None, Options { clip: Some(10.0) }).unwrap();
        let json = serde_json::to_value(&e).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            keys,
            [
                "clip",
                "clipped_rounds",
                "effective_sample_size",
                "estimates",
                "logged_value",
                "max_weight",
                "rounds"
            ]
        );
        assert_eq!(json["estimates"][1]["estimator"], "snips");
        let keys: Vec<&str> = json["estimates"][0]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            keys,
            ["ci_high", "ci_low", "estimator", "std_error", "value"]
        );
        assert_eq!(Estimator::DoublyRobust.to_string(), "doubly_robust");
        assert_eq!(
            serde_json::to_value(Estimator::DirectMethod).unwrap(),
            "direct_method"
        );
    }

    #[test]
    fn the_logging_policy_with_unit_weights_is_its_own_mean() {
        let rewards = [0.0, 1.0, 1.0, 0.0, 1.0, 0.3, 2.5];
        let rounds: Vec<LoggedRound> = rewards
            .iter()
            .enumerate()
            .map(|(i, r)| round(i % 3, 1.0 / 3.0, *r))
            .collect();
        let target = vec![vec![1.0 / 3.0; 3]; rounds.len()];
        let e = evaluate(&rounds, &target, None, Options::default()).unwrap();
        let mean = rewards.iter().sum::<f64>() / rewards.len() as f64;
        assert_eq!(e.logged_value, mean);
        assert_eq!(e.estimate(Estimator::Ips).unwrap().value, mean);
        assert_eq!(e.estimate(Estimator::Snips).unwrap().value, mean);
        assert_eq!(e.effective_sample_size, rounds.len() as f64);
        assert_eq!(e.max_weight, 1.0);
    }

    #[test]
    fn effective_sample_size_drops_as_weights_skew() {
        // Ten rounds; the target moves probability from the first to the second logged
        // action, so one round's weight grows while the others' shrink.
        let ess = |skew: f64| {
            let rounds: Vec<LoggedRound> = (0..10)
                .map(|i| round(usize::from(i > 0), 0.5, 1.0))
                .collect();
            let target: Vec<Vec<f64>> =
                (0..10).map(|_| vec![0.5 + skew, 0.5 - skew, 0.0]).collect();
            evaluate(&rounds, &target, None, Options::default())
                .unwrap()
                .effective_sample_size
        };
        let figures: Vec<f64> = [0.0, 0.2, 0.4, 0.49].map(ess).to_vec();
        close(figures[0], 10.0);
        assert!(figures.windows(2).all(|w| w[1] < w[0]), "{figures:?}");
        // One weight 1.98 and nine of 0.02: (1.98 + 0.18)² / (3.9204 + 0.0036).
        close(figures[3], 2.16f64.powi(2) / 3.924);
    }

    #[test]
    fn clipping_caps_weights_and_counts_them() {
        // Weights 10, 10, 0.5, 0.5 (target 1.0 on the first action, logged at 0.1 / 1.0;
        // 0.5 on it logged at 1.0).
        let rounds = vec![
            round(0, 0.1, 1.0),
            round(0, 0.1, 0.0),
            round(0, 1.0, 1.0),
            round(0, 1.0, 1.0),
        ];
        let target = vec![
            vec![1.0, 0.0, 0.0],
            vec![1.0, 0.0, 0.0],
            vec![0.5, 0.5, 0.0],
            vec![0.5, 0.0, 0.5],
        ];
        let plain = evaluate(&rounds, &target, None, Options::default()).unwrap();
        let clipped = evaluate(&rounds, &target, None, Options { clip: Some(5.0) }).unwrap();
        close(
            plain.estimate(Estimator::Ips).unwrap().value,
            (10.0 + 0.5 + 0.5) / 4.0,
        );
        close(
            clipped.estimate(Estimator::Ips).unwrap().value,
            (5.0 + 0.5 + 0.5) / 4.0,
        );
        close(
            clipped.estimate(Estimator::Snips).unwrap().value,
            6.0 / 11.0,
        );
        assert_eq!((plain.clipped_rounds, clipped.clipped_rounds), (0, 2));
        assert_eq!(clipped.clip, Some(5.0));
        close(clipped.max_weight, 10.0);
        close(clipped.effective_sample_size, 11.0f64.powi(2) / 50.5);
    }

    #[test]
    fn a_perfect_model_on_deterministic_rewards_leaves_nothing_to_correct() {
        let r_hat = [0.2, 0.9, 0.4];
        let rounds: Vec<LoggedRound> = (0..9)
            .map(|i| round(i % 3, 1.0 / 3.0, r_hat[i % 3]))
            .collect();
        let target: Vec<Vec<f64>> = (0..9)
            .map(|i| {
                if i < 5 {
                    vec![0.0, 1.0, 0.0]
                } else {
                    vec![0.5, 0.0, 0.5]
                }
            })
            .collect();
        let model = vec![r_hat.to_vec(); 9];
        let e = evaluate(&rounds, &target, Some(&model), Options::default()).unwrap();
        let dm = e.estimate(Estimator::DirectMethod).unwrap();
        let dr = e.estimate(Estimator::DoublyRobust).unwrap();
        assert_eq!(dr.value, dm.value);
        assert_eq!(dr.std_error, dm.std_error);
        close(dr.value, (5.0 * 0.9 + 4.0 * 0.3) / 9.0);
        let ips = e.estimate(Estimator::Ips).unwrap();
        assert!(ips.std_error > 2.0 * dr.std_error, "{ips:?} vs {dr:?}");
    }

    #[test]
    fn bad_input_is_refused_by_name() {
        let rounds = vec![round(0, 0.5, 1.0), round(1, 0.5, 0.0)];
        let target = vec![vec![0.5, 0.5, 0.0]; 2];
        let model = vec![vec![0.1, 0.2, 0.3]; 2];
        let run = |rounds: &[LoggedRound],
                   target: &[Vec<f64>],
                   model: Option<&[Vec<f64>]>,
                   clip: Option<f64>| {
            evaluate(rounds, target, model, Options { clip })
                .unwrap_err()
                .to_string()
        };
        let with_round = |i: usize, r: LoggedRound| {
            let mut rounds = rounds.clone();
            rounds[i] = r;
            rounds
        };
        let with_target = |i: usize, t: Vec<f64>| {
            let mut target = target.clone();
            target[i] = t;
            target
        };
        let with_model = |i: usize, m: Vec<f64>| {
            let mut model = model.clone();
            model[i] = m;
            model
        };
        let cases: Vec<(String, &str)> = vec![
            (run(&[], &[], None, None), "rounds: the log is empty"),
            (
                run(&rounds[..1], &target[..1], None, None),
                "rounds: at least 2 rounds are needed for an interval, got 1",
            ),
            (
                run(&with_round(1, round(0, 0.0, 1.0)), &target, None, None),
                "rounds[1].propensity: must be in (0, 1]",
            ),
            (
                run(
                    &with_round(1, round(0, 1.0 + 1e-9, 1.0)),
                    &target,
                    None,
                    None,
                ),
                "rounds[1].propensity: must be in (0, 1]",
            ),
            (
                run(&with_round(0, round(3, 0.5, 1.0)), &target, None, None),
                "rounds[0].chosen: index 3 out of range for 3 actions",
            ),
            (
                run(&with_round(1, round(0, 0.5, f64::NAN)), &target, None, None),
                "rounds[1].reward: must be finite",
            ),
            (
                run(&with_round(1, round(0, 1e-320, 1.0)), &target, None, None),
                "rounds[1].propensity: too small: the importance weight overflows",
            ),
            (
                run(&with_round(1, round(0, 0.5, 1e308)), &target, None, None),
                "rounds: ips overflows: rewards or weights too large",
            ),
            (
                run(&rounds, &target[..1], None, None),
                "target: has 1 entries for 2 rounds",
            ),
            (
                run(&rounds, &with_target(1, vec![0.5, 0.5]), None, None),
                "target[1]: has 2 probabilities for 3 actions",
            ),
            (
                run(&rounds, &with_target(1, vec![0.5, 0.6, -0.1]), None, None),
                "target[1][2]: must be in [0, 1]",
            ),
            (
                run(
                    &rounds,
                    &with_target(0, vec![0.5, f64::NAN, 0.5]),
                    None,
                    None,
                ),
                "target[0][1]: must be in [0, 1]",
            ),
            (
                run(&rounds, &with_target(0, vec![0.5, 0.4, 0.0]), None, None),
                "target[0]: must sum to 1, sums to 0.9",
            ),
            (
                run(
                    &rounds,
                    &[vec![0.0, 0.0, 1.0], vec![0.0, 0.0, 1.0]],
                    None,
                    None,
                ),
                "target: gives probability 0 to every logged action; the log cannot evaluate it",
            ),
            (
                run(&rounds, &target, Some(&model[..1]), None),
                "reward_model: has 1 entries for 2 rounds",
            ),
            (
                run(&rounds, &target, Some(&with_model(1, vec![0.1])), None),
                "reward_model[1]: has 1 estimates for 3 actions",
            ),
            (
                run(
                    &rounds,
                    &target,
                    Some(&with_model(1, vec![0.1, f64::INFINITY, 0.0])),
                    None,
                ),
                "reward_model[1][1]: must be finite",
            ),
            (
                run(&rounds, &target, None, Some(0.0)),
                "clip: must be a positive number",
            ),
            (
                run(&rounds, &target, None, Some(f64::NAN)),
                "clip: must be a positive number",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
        // A sum off by rounding only is accepted.
        evaluate(
            &rounds,
            &with_target(0, vec![0.1, 0.2, 0.7 + 1e-9]),
            None,
            Options::default(),
        )
        .unwrap();
    }

    #[test]
    fn errors_map_to_the_crate_error() {
        use crate::error::Error;
        let e: Error = OpeError::invalid("line 3.propensity", "must be in (0, 1]").into();
        assert!(matches!(&e, Error::Invalid { field, .. } if field == "line 3.propensity"));
        let e: Error = OpeError::NoOverlap.into();
        assert_eq!(
            e.to_string(),
            "target: gives probability 0 to every logged action; the log cannot evaluate it"
        );
    }
}
