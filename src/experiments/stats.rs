//! Experiment statistics from additive sufficient statistics ([`VariantTotals`]).
//!
//! The unit is the decision: a variant's `n` is its exposures (decisions made under it),
//! its conversions are decisions with a positive outcome, and its value per exposure is
//! 0 for a decision without a converting outcome.
//!
//! For a treatment `t` against the control `c` (z = Φ⁻¹(0.975), all intervals 95%):
//! - **conversion rate** `p = conversions / n`; difference `p_t − p_c` with the unpooled
//!   Wald interval `± z·√(p_t(1−p_t)/n_t + p_c(1−p_c)/n_c)`;
//! - **lift** `p_t / p_c − 1` with a delta-method interval:
//!   `Var ≈ v_t / p_c² + p_t²·v_c / p_c⁴`, `v = p(1−p)/n`;
//! - **p-value** of the two-proportion z-test with the pooled rate
//!   `p̂ = (conv_t + conv_c) / (n_t + n_c)`: `Z = (p_t − p_c) / √(p̂(1−p̂)(1/n_t + 1/n_c))`,
//!   `p = 2·(1 − Φ(|Z|))` (the same p-value as a 2×2 chi-square test without correction);
//! - **value**: mean per exposure `S / n`, sample variance `(Q − S²/n) / (n − 1)` from the
//!   sums `S` and `Q` of values and squared values; Welch's t-test
//!   `T = Δ / √(s_t²/n_t + s_c²/n_c)` with Welch–Satterthwaite degrees of freedom
//!   `ν = (a_t + a_c)² / (a_t²/(n_t−1) + a_c²/(n_c−1))`, `a = s²/n`, two-sided p-value
//!   from Student's t with ν degrees of freedom, interval `Δ ± t_{ν,0.975}·√(a_t + a_c)`;
//! - **always-valid interval** (safe to look at after every decision): the asymptotic
//!   confidence sequence of Howard, Ramdas, McAuliffe and Sekhon (2021, eq. 14), a
//!   normal-mixture sequential probability ratio bound, as GrowthBook computes it. For an
//!   estimate `Δ` with variance `V` after `N = n_t + n_c` exposures, `σ² = V·N`,
//!   `ρ = √((−2 ln α + ln(−2 ln α + 1)) / N*)` with the tuning size `N* = 5000` (where
//!   the interval is tightest) and `α = 0.05`:
//!   `Δ ± σ·√( 2(Nρ² + 1) / (N²ρ²) · ln(√(Nρ² + 1) / α) )`. It is computed for the rate
//!   difference and for the value difference;
//! - **sample-ratio mismatch**: Pearson's chi-square of the exposures against the
//!   configured weights (`k − 1` degrees of freedom); a p-value below 0.001 flags it.
//!
//! A quantity that is undefined for the data (no exposures, a control rate of 0, zero
//! variance) is `None`, never NaN. `tests/fixtures/experiment_stats.json` holds values
//! computed independently with SciPy (`scripts/stats_reference.py`); the tests here
//! match them to 1e-6.

use serde::{Deserialize, Serialize};
use statrs::distribution::{ChiSquared, ContinuousCDF, Normal, StudentsT};

use super::VariantTotals;

/// Two-sided level of every interval.
pub const ALPHA: f64 = 0.05;
/// Exposures (both arms together) at which the always-valid interval is tightest.
pub const SEQUENTIAL_TUNING: f64 = 5_000.0;
/// SRM p-values below this flag a mismatch.
pub const SRM_THRESHOLD: f64 = 0.001;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub lower: f64,
    pub upper: f64,
}

impl Interval {
    fn around(center: f64, halfwidth: f64) -> Option<Interval> {
        (center.is_finite() && halfwidth.is_finite()).then_some(Interval {
            lower: center - halfwidth,
            upper: center + halfwidth,
        })
    }
}

/// One variant's own figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VariantSummary {
    pub exposures: u64,
    pub conversions: u64,
    pub conversion_rate: Option<f64>,
    pub value_sum: f64,
    pub value_mean: Option<f64>,
    /// Sample variance of the value per exposure (n − 1 in the denominator).
    pub value_variance: Option<f64>,
}

impl VariantSummary {
    pub fn of(t: &VariantTotals) -> Self {
        let n = t.exposures as f64;
        let mean = (t.exposures > 0).then(|| t.value_sum / n);
        let variance = (t.exposures > 1).then(|| {
            // Cancellation can make a zero variance slightly negative.
            ((t.value_sum_sq - t.value_sum * t.value_sum / n) / (n - 1.0)).max(0.0)
        });
        VariantSummary {
            exposures: t.exposures,
            conversions: t.conversions,
            conversion_rate: (t.exposures > 0).then(|| t.conversions as f64 / n),
            value_sum: t.value_sum,
            value_mean: mean,
            value_variance: variance,
        }
    }
}

/// A treatment against the control; `None` where undefined.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub rate_diff: Option<f64>,
    pub rate_diff_ci: Option<Interval>,
    pub lift: Option<f64>,
    pub lift_ci: Option<Interval>,
    pub z_score: Option<f64>,
    pub p_value: Option<f64>,
    pub rate_always_valid_ci: Option<Interval>,
    pub value_diff: Option<f64>,
    pub value_diff_ci: Option<Interval>,
    pub value_t_score: Option<f64>,
    pub value_df: Option<f64>,
    pub value_p_value: Option<f64>,
    pub value_always_valid_ci: Option<Interval>,
}

/// A sample-ratio-mismatch check.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Srm {
    pub chi_square: f64,
    pub p_value: f64,
    /// `p_value < SRM_THRESHOLD`.
    pub mismatch: bool,
}

fn standard_normal() -> Normal {
    // Mean 0 and standard deviation 1 are valid parameters.
    Normal::standard()
}

/// Φ⁻¹(1 − α/2).
pub fn z_critical() -> f64 {
    standard_normal().inverse_cdf(1.0 - ALPHA / 2.0)
}

/// Two-sided p-value of a standard normal statistic.
pub fn normal_p_value(z: f64) -> f64 {
    (2.0 * standard_normal().sf(z.abs())).min(1.0)
}

/// `x > 0`, false for NaN.
fn positive(x: f64) -> bool {
    x > 0.0
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// Pooled two-proportion z-test: (Z, two-sided p-value).
pub fn two_proportion_z(c_t: u64, n_t: u64, c_c: u64, n_c: u64) -> Option<(f64, f64)> {
    if n_t == 0 || n_c == 0 {
        return None;
    }
    let (nt, nc) = (n_t as f64, n_c as f64);
    let pooled = (c_t + c_c) as f64 / (nt + nc);
    let se = (pooled * (1.0 - pooled) * (1.0 / nt + 1.0 / nc)).sqrt();
    if !positive(se) {
        return None;
    }
    let z = finite((c_t as f64 / nt - c_c as f64 / nc) / se)?;
    Some((z, normal_p_value(z)))
}

/// Welch's t-test from means, sample variances and sizes: (T, ν, two-sided p-value,
/// 95% interval of the difference `mean_t − mean_c`).
pub fn welch(
    mean_t: f64,
    var_t: f64,
    n_t: u64,
    mean_c: f64,
    var_c: f64,
    n_c: u64,
) -> Option<(f64, f64, f64, Interval)> {
    if n_t < 2 || n_c < 2 {
        return None;
    }
    let a_t = var_t / n_t as f64;
    let a_c = var_c / n_c as f64;
    let se2 = a_t + a_c;
    if !positive(se2) {
        return None;
    }
    let diff = mean_t - mean_c;
    let t = finite(diff / se2.sqrt())?;
    let df = finite(se2 * se2 / (a_t * a_t / (n_t - 1) as f64 + a_c * a_c / (n_c - 1) as f64))?;
    let dist = StudentsT::new(0.0, 1.0, df).ok()?;
    let p = (2.0 * dist.sf(t.abs())).min(1.0);
    let critical = dist.inverse_cdf(1.0 - ALPHA / 2.0);
    let ci = Interval::around(diff, critical * se2.sqrt())?;
    Some((t, df, p, ci))
}

/// Half-width of the always-valid interval of an estimate with variance `variance`
/// after `n` observations (see the module docs).
pub fn always_valid_halfwidth(variance: f64, n: f64) -> Option<f64> {
    if !(positive(variance) || variance == 0.0) || !positive(n) {
        return None;
    }
    let log_alpha = ALPHA.ln();
    let rho = ((-2.0 * log_alpha + (-2.0 * log_alpha + 1.0).ln()) / SEQUENTIAL_TUNING).sqrt();
    let sigma = (variance * n).sqrt();
    let nr2 = n * rho * rho;
    finite(
        sigma
            * (2.0 * (nr2 + 1.0) / (n * n * rho * rho) * ((nr2 + 1.0).sqrt() / ALPHA).ln()).sqrt(),
    )
}

/// Compares a treatment with the control.
pub fn compare(control: &VariantTotals, treatment: &VariantTotals) -> Comparison {
    let c = VariantSummary::of(control);
    let t = VariantSummary::of(treatment);
    let mut out = Comparison::default();
    let z = z_critical();
    let n_total = (control.exposures + treatment.exposures) as f64;
    if let (Some(p_c), Some(p_t)) = (c.conversion_rate, t.conversion_rate) {
        let v_c = p_c * (1.0 - p_c) / control.exposures as f64;
        let v_t = p_t * (1.0 - p_t) / treatment.exposures as f64;
        let diff = p_t - p_c;
        out.rate_diff = Some(diff);
        if v_c + v_t > 0.0 {
            out.rate_diff_ci = Interval::around(diff, z * (v_c + v_t).sqrt());
            out.rate_always_valid_ci =
                always_valid_halfwidth(v_c + v_t, n_total).and_then(|h| Interval::around(diff, h));
        }
        if p_c > 0.0 {
            let lift = p_t / p_c - 1.0;
            let var = v_t / (p_c * p_c) + p_t * p_t * v_c / p_c.powi(4);
            out.lift = finite(lift);
            out.lift_ci = Interval::around(lift, z * var.sqrt());
        }
        if let Some((zs, p)) = two_proportion_z(
            treatment.conversions,
            treatment.exposures,
            control.conversions,
            control.exposures,
        ) {
            out.z_score = Some(zs);
            out.p_value = Some(p);
        }
    }
    if let (Some(m_c), Some(m_t)) = (c.value_mean, t.value_mean) {
        out.value_diff = finite(m_t - m_c);
    }
    if let (Some(m_c), Some(s_c), Some(m_t), Some(s_t)) = (
        c.value_mean,
        c.value_variance,
        t.value_mean,
        t.value_variance,
    ) {
        if let Some((ts, df, p, ci)) =
            welch(m_t, s_t, treatment.exposures, m_c, s_c, control.exposures)
        {
            out.value_t_score = Some(ts);
            out.value_df = Some(df);
            out.value_p_value = Some(p);
            out.value_diff_ci = Some(ci);
        }
        let var = s_t / treatment.exposures as f64 + s_c / control.exposures as f64;
        if var > 0.0 {
            out.value_always_valid_ci =
                always_valid_halfwidth(var, n_total).and_then(|h| Interval::around(m_t - m_c, h));
        }
    }
    out
}

/// Pearson's chi-square of `observed` exposures against `weights` (same length, > 0).
/// `None` with fewer than two variants or no exposures.
pub fn srm(observed: &[u64], weights: &[f64]) -> Option<Srm> {
    if observed.len() < 2 || observed.len() != weights.len() {
        return None;
    }
    let total: u64 = observed.iter().sum();
    let weight_sum: f64 = weights.iter().sum();
    if total == 0 || !positive(weight_sum) {
        return None;
    }
    let mut chi = 0.0;
    for (&o, &w) in observed.iter().zip(weights) {
        let expected = total as f64 * w / weight_sum;
        if !positive(expected) {
            return None;
        }
        chi += (o as f64 - expected).powi(2) / expected;
    }
    let dist = ChiSquared::new((observed.len() - 1) as f64).ok()?;
    let p_value = dist.sf(chi).clamp(0.0, 1.0);
    Some(Srm {
        chi_square: chi,
        p_value,
        mismatch: p_value < SRM_THRESHOLD,
    })
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    /// `tests/fixtures/experiment_stats.json`, written by `scripts/stats_reference.py`.
    #[derive(Deserialize)]
    struct Fixture {
        cases: Vec<Case>,
        buckets: Vec<BucketCase>,
    }

    #[derive(Deserialize)]
    struct Case {
        name: String,
        weights: Vec<f64>,
        /// `variants[0]` is the control.
        variants: Vec<VariantTotals>,
        /// One per treatment (`variants[1..]`).
        comparisons: Vec<Comparison>,
        srm: Option<Srm>,
    }

    #[derive(Deserialize)]
    struct BucketCase {
        salt: String,
        customer: String,
        bucket: u32,
    }

    const TOLERANCE: f64 = 1e-6;

    fn fixture() -> Fixture {
        serde_json::from_str(include_str!("../../tests/fixtures/experiment_stats.json"))
            .expect("the fixture parses")
    }

    fn close(what: &str, got: Option<f64>, want: Option<f64>) {
        match (got, want) {
            (Some(g), Some(w)) => assert!(
                (g - w).abs() <= TOLERANCE * w.abs().max(1.0),
                "{what}: got {g}, reference {w}"
            ),
            (None, None) => {}
            _ => panic!("{what}: got {got:?}, reference {want:?}"),
        }
    }

    fn close_interval(what: &str, got: Option<Interval>, want: Option<Interval>) {
        close(
            &format!("{what}.lower"),
            got.map(|i| i.lower),
            want.map(|i| i.lower),
        );
        close(
            &format!("{what}.upper"),
            got.map(|i| i.upper),
            want.map(|i| i.upper),
        );
    }

    #[test]
    fn statistics_match_the_scipy_reference() {
        let fixture = fixture();
        assert!(fixture.cases.len() >= 5, "the fixture has too few cases");
        for case in &fixture.cases {
            let control = &case.variants[0];
            assert_eq!(case.comparisons.len(), case.variants.len() - 1);
            for (i, (treatment, want)) in
                case.variants[1..].iter().zip(&case.comparisons).enumerate()
            {
                let got = compare(control, treatment);
                let at = |f: &str| format!("{} variant {}: {f}", case.name, i + 1);
                close(&at("rate_diff"), got.rate_diff, want.rate_diff);
                close_interval(&at("rate_diff_ci"), got.rate_diff_ci, want.rate_diff_ci);
                close(&at("lift"), got.lift, want.lift);
                close_interval(&at("lift_ci"), got.lift_ci, want.lift_ci);
                close(&at("z_score"), got.z_score, want.z_score);
                close(&at("p_value"), got.p_value, want.p_value);
                close_interval(
                    &at("rate_always_valid_ci"),
                    got.rate_always_valid_ci,
                    want.rate_always_valid_ci,
                );
                close(&at("value_diff"), got.value_diff, want.value_diff);
                close_interval(&at("value_diff_ci"), got.value_diff_ci, want.value_diff_ci);
                close(&at("value_t_score"), got.value_t_score, want.value_t_score);
                close(&at("value_df"), got.value_df, want.value_df);
                close(&at("value_p_value"), got.value_p_value, want.value_p_value);
                close_interval(
                    &at("value_always_valid_ci"),
                    got.value_always_valid_ci,
                    want.value_always_valid_ci,
                );
            }
            let observed: Vec<u64> = case.variants.iter().map(|v| v.exposures).collect();
            let got = srm(&observed, &case.weights);
            close(
                &format!("{}: srm chi-square", case.name),
                got.map(|s| s.chi_square),
                case.srm.map(|s| s.chi_square),
            );
            close(
                &format!("{}: srm p-value", case.name),
                got.map(|s| s.p_value),
                case.srm.map(|s| s.p_value),
            );
            assert_eq!(
                got.map(|s| s.mismatch),
                case.srm.map(|s| s.mismatch),
                "{}: srm flag",
                case.name
            );
        }
    }

    /// The assignment hash, as an independent implementation computes it.
    #[test]
    fn buckets_match_the_reference_hash() {
        let fixture = fixture();
        assert!(!fixture.buckets.is_empty());
        for case in &fixture.buckets {
            assert_eq!(
                crate::experiments::assignment::bucket(&case.salt, &case.customer),
                case.bucket,
                "bucket({:?}, {:?})",
                case.salt,
                case.customer
            );
        }
    }

    #[test]
    fn the_always_valid_interval_is_wider_than_the_fixed_one_and_shrinks() {
        let z = z_critical();
        for n in [100.0_f64, 1_000.0, 5_000.0, 100_000.0] {
            let variance = 0.25 / n;
            let fixed = z * variance.sqrt();
            let sequential = always_valid_halfwidth(variance, n).expect("defined");
            assert!(sequential > fixed, "n {n}: {sequential} ≤ {fixed}");
        }
        let at = |n: f64| always_valid_halfwidth(0.25 / n, n).expect("defined");
        assert!(at(1_000.0) > at(10_000.0) && at(10_000.0) > at(100_000.0));
    }

    #[test]
    fn undefined_quantities_are_none_not_nan() {
        let empty = VariantTotals::default();
        let some = VariantTotals {
            exposures: 10,
            conversions: 0,
            value_sum: 0.0,
            value_sum_sq: 0.0,
        };
        assert_eq!(compare(&empty, &empty), Comparison::default());
        let c = compare(&some, &some);
        assert_eq!(c.rate_diff, Some(0.0));
        assert_eq!((c.lift, c.p_value, c.value_p_value), (None, None, None));
        assert_eq!(srm(&[0, 0], &[1.0, 1.0]), None);
        assert_eq!(srm(&[5], &[1.0]), None);
    }
}
