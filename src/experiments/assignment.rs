//! Deterministic assignment: which experiments and variants a customer is in.
//!
//! # The hash
//!
//! `bucket(salt, id) = fmix64(fnv1a64(utf8(salt + ":" + id))) mod 10000`, where
//! - `fnv1a64` is 64-bit FNV-1a (offset basis `0xcbf29ce484222325`, prime
//!   `0x100000001b3`, one byte at a time: `h ^= byte; h *= prime`, wrapping);
//! - `fmix64` is MurmurHash3's 64-bit finaliser (`k ^= k >> 33; k *= 0xff51afd7ed558ccd;
//!   k ^= k >> 33; k *= 0xc4ceb9fe1a85ec53; k ^= k >> 33`, wrapping), which spreads
//!   FNV's weak low bits before the modulo.
//!
//! Every replica, restart and language that implements these few lines gets the same
//! bucket: assignment depends on nothing but the salt and the customer id (plus, for a
//! layer, the layer's name).
//!
//! # From bucket to variant
//!
//! With normalised weights `w_i`, cumulative starts `c_i = w_0 + … + w_{i-1}` and
//! coverage `k` (traffic / 100), variant `i` owns the experiment buckets `b` with
//! `c_i ≤ b / 10000 < c_i + w_i·k` (GrowthBook's layout): raising traffic only adds
//! customers, it never moves one between variants. A bucket in no range is not in the
//! experiment.
//!
//! # Layers and holdout
//!
//! A layer hashes the customer again, with salt `layer:<name>`, into its own 10,000
//! buckets. Each experiment of a layer owns a disjoint range of them (allocated at
//! creation, sized by its traffic), so a customer is in at most one experiment of a
//! layer; within its range the experiment's own bucket picks the variant at full
//! coverage. The global holdout (`[experiments] holdout_percent`) hashes with its own
//! salt; a customer whose holdout bucket is below `holdout_percent × 100` is in no
//! experiment at all.

use super::definition::{Experiment, Status, Variant};

/// Size of every bucket space.
pub const BUCKETS: u32 = 10_000;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h = FNV_OFFSET;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(FNV_PRIME);
        }
    }
    h
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The customer's bucket in `[0, 10000)` under `salt` (see the module docs).
pub fn bucket(salt: &str, customer: &str) -> u32 {
    let h = fmix64(fnv1a64(&[salt.as_bytes(), b":", customer.as_bytes()]));
    // The remainder is below 10,000: it fits.
    (h % u64::from(BUCKETS)) as u32
}

/// The customer's bucket in a layer's own bucket space.
pub fn layer_bucket(layer: &str, customer: &str) -> u32 {
    let h = fmix64(fnv1a64(&[
        b"layer:",
        layer.as_bytes(),
        b":",
        customer.as_bytes(),
    ]));
    (h % u64::from(BUCKETS)) as u32
}

/// The global holdout: customers in no experiment.
#[derive(Debug, Clone, PartialEq)]
pub struct Holdout {
    /// In [0, 100).
    pub percent: f64,
    pub salt: String,
}

impl Holdout {
    pub fn none() -> Self {
        Holdout {
            percent: 0.0,
            salt: String::new(),
        }
    }

    pub fn contains(&self, customer: &str) -> bool {
        if self.percent <= 0.0 {
            return false;
        }
        f64::from(bucket(&self.salt, customer)) < self.percent * f64::from(BUCKETS) / 100.0
    }
}

/// The index of the variant that owns `bucket` at coverage `coverage` in (0, 1], if any.
pub fn variant_for_bucket(weights: &[f64], coverage: f64, bucket: u32) -> Option<usize> {
    let total: f64 = weights.iter().sum();
    if total.is_nan() || total <= 0.0 {
        return None;
    }
    let n = f64::from(bucket) / f64::from(BUCKETS);
    let mut start = 0.0;
    for (i, w) in weights.iter().enumerate() {
        let share = w / total;
        if n >= start && n < start + share * coverage {
            return Some(i);
        }
        start += share;
    }
    None
}

/// The variant of `experiment` that `customer` is in, ignoring status, targeting and the
/// holdout: traffic (or the layer range) and weights only.
pub fn variant_of<'a>(experiment: &'a Experiment, customer: &str) -> Option<&'a Variant> {
    let weights = experiment.weights();
    let own = bucket(&experiment.salt, customer);
    let index = match &experiment.layer {
        Some(slot) => {
            if !slot.range.contains(layer_bucket(&slot.name, customer)) {
                return None;
            }
            variant_for_bucket(&weights, 1.0, own)
        }
        None => variant_for_bucket(&weights, experiment.traffic_percent / 100.0, own),
    }?;
    experiment.variants.get(index)
}

/// Every running experiment (of `experiments`, in their order) that assigns `customer`,
/// with the variant: not in the holdout, a member of the targeting segment, inside the
/// traffic or layer range.
pub fn assign<'a>(
    experiments: &'a [Experiment],
    customer: &str,
    segments: &[String],
    holdout: &Holdout,
) -> Vec<(&'a Experiment, &'a Variant)> {
    if holdout.contains(customer) {
        return Vec::new();
    }
    experiments
        .iter()
        .filter(|e| e.status == Status::Running)
        .filter(|e| {
            e.targeting_segment
                .as_ref()
                .is_none_or(|s| segments.contains(s))
        })
        .filter_map(|e| variant_of(e, customer).map(|v| (e, v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::experiments::definition::{LayerRange, LayerSlot, Overrides};

    const N: usize = 100_000;

    fn ids() -> impl Iterator<Item = String> {
        (0..N).map(|i| format!("customer-{i}"))
    }

    fn experiment(key: &str, weights: &[f64], traffic: f64) -> Experiment {
        Experiment {
            key: key.into(),
            description: None,
            salt: key.into(),
            variants: weights
                .iter()
                .enumerate()
                .map(|(i, &weight)| Variant {
                    key: format!("v{i}"),
                    weight,
                    overrides: Overrides::default(),
                })
                .collect(),
            traffic_percent: traffic,
            targeting_segment: None,
            layer: None,
            status: Status::Running,
            created_at: Utc::now(),
            started_at: None,
            stopped_at: None,
        }
    }

    /// Upper 0.1% point of the chi-square distribution with `df` degrees of freedom.
    fn chi2_critical_999(df: f64) -> f64 {
        use statrs::distribution::{ChiSquared, ContinuousCDF};
        ChiSquared::new(df).expect("df > 0").inverse_cdf(0.999)
    }

    fn chi2(observed: &[u64], expected: &[f64]) -> f64 {
        observed
            .iter()
            .zip(expected)
            .map(|(&o, &e)| (o as f64 - e).powi(2) / e)
            .sum()
    }

    /// The hash is pinned: other replicas and languages must get these exact buckets.
    #[test]
    fn the_hash_is_the_documented_one() {
        assert_eq!(fnv1a64(&[b""]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(&[b"foobar"]), 0x8594_4171_f739_67e8);
        let got: Vec<u32> = ["c1", "c2", "alice", "bob"]
            .iter()
            .map(|id| bucket("hero", id))
            .collect();
        let expected: Vec<u32> = ["hero:c1", "hero:c2", "hero:alice", "hero:bob"]
            .iter()
            .map(|s| (fmix64(fnv1a64(&[s.as_bytes()])) % 10_000) as u32)
            .collect();
        assert_eq!(got, expected);
        expect_test::expect![[r#"
            [
                383,
                3388,
                97,
                16,
            ]
        "#]]
        .assert_debug_eq(&got);
    }

    #[test]
    fn buckets_are_uniform_over_100k_ids() {
        // 100 cells of 100 buckets each: chi-square with 99 degrees of freedom.
        let mut cells = vec![0u64; 100];
        for id in ids() {
            cells[(bucket("uniformity", &id) / 100) as usize] += 1;
        }
        let expected = vec![N as f64 / 100.0; 100];
        let stat = chi2(&cells, &expected);
        assert!(
            stat < chi2_critical_999(99.0),
            "chi-square {stat} over the critical value"
        );
    }

    #[test]
    fn variants_follow_the_weights_over_100k_ids() {
        let cases: &[(&[f64], f64)] = &[
            (&[1.0, 1.0], 100.0),
            (&[1.0, 1.0, 2.0], 100.0),
            (&[9.0, 1.0], 40.0),
            (&[0.2, 0.3, 0.5], 10.0),
        ];
        for &(weights, traffic) in cases {
            let e = experiment("weights", weights, traffic);
            let mut counts = vec![0u64; weights.len() + 1];
            for id in ids() {
                let cell = variant_of(&e, &id).map_or(weights.len(), |v| {
                    e.variants.iter().position(|x| x.key == v.key).expect("own")
                });
                counts[cell] += 1;
            }
            let total: f64 = weights.iter().sum();
            let coverage = traffic / 100.0;
            let mut expected: Vec<f64> = weights
                .iter()
                .map(|w| N as f64 * coverage * w / total)
                .collect();
            expected.push(N as f64 * (1.0 - coverage));
            let (counts, expected): (Vec<u64>, Vec<f64>) = counts
                .into_iter()
                .zip(expected)
                .filter(|&(_, e)| e > 0.0)
                .unzip();
            let stat = chi2(&counts, &expected);
            let df = (counts.len() - 1) as f64;
            assert!(
                stat < chi2_critical_999(df),
                "weights {weights:?} at {traffic}%: chi-square {stat}, counts {counts:?}"
            );
        }
    }

    #[test]
    fn assignment_is_stable_and_more_traffic_never_moves_anyone() {
        let small = experiment("stable", &[1.0, 3.0], 20.0);
        let large = experiment("stable", &[1.0, 3.0], 80.0);
        for id in ids().take(20_000) {
            let first = variant_of(&small, &id).map(|v| v.key.clone());
            assert_eq!(first, variant_of(&small, &id).map(|v| v.key.clone()));
            if let Some(v) = first {
                assert_eq!(variant_of(&large, &id).map(|v| v.key.clone()), Some(v));
            }
        }
    }

    #[test]
    fn experiments_of_one_layer_never_overlap() {
        let mut layered = Vec::new();
        for (i, (start, end)) in [(0, 3_000), (3_000, 3_500), (3_500, 10_000)]
            .into_iter()
            .enumerate()
        {
            let mut e = experiment(&format!("layered-{i}"), &[1.0, 1.0], 100.0);
            e.traffic_percent = f64::from(end - start) / 100.0;
            e.layer = Some(LayerSlot {
                name: "homepage".into(),
                range: LayerRange { start, end },
            });
            layered.push(e);
        }
        let mut per_experiment = [0u64; 3];
        for id in ids() {
            let assigned = assign(&layered, &id, &[], &Holdout::none());
            assert_eq!(
                assigned.len(),
                1,
                "{id} is in {} experiments",
                assigned.len()
            );
            let i = layered
                .iter()
                .position(|e| e.key == assigned[0].0.key)
                .expect("own");
            per_experiment[i] += 1;
        }
        let expected = [0.3, 0.05, 0.65].map(|s| s * N as f64);
        let stat = chi2(&per_experiment, &expected);
        assert!(stat < chi2_critical_999(2.0), "{per_experiment:?}");
    }

    #[test]
    fn the_holdout_is_in_no_experiment_and_has_its_share() {
        let experiments = vec![
            experiment("a", &[1.0, 1.0], 100.0),
            experiment("b", &[1.0, 1.0], 100.0),
        ];
        let holdout = Holdout {
            percent: 5.0,
            salt: "holdout".into(),
        };
        let mut held = 0u64;
        for id in ids() {
            let assigned = assign(&experiments, &id, &[], &holdout);
            if holdout.contains(&id) {
                held += 1;
                assert!(assigned.is_empty());
            } else {
                assert_eq!(assigned.len(), 2);
            }
        }
        let stat = chi2(&[held, N as u64 - held], &[5_000.0, 95_000.0]);
        assert!(stat < chi2_critical_999(1.0), "held out {held}");
    }

    #[test]
    fn only_running_experiments_for_their_segment_assign() {
        let mut draft = experiment("draft", &[1.0, 1.0], 100.0);
        draft.status = Status::Draft;
        let mut stopped = experiment("stopped", &[1.0, 1.0], 100.0);
        stopped.status = Status::Stopped;
        let mut targeted = experiment("targeted", &[1.0, 1.0], 100.0);
        targeted.targeting_segment = Some("vip".into());
        let all = vec![draft, stopped, targeted];
        let keys = |segments: &[String]| -> Vec<String> {
            assign(&all, "c1", segments, &Holdout::none())
                .into_iter()
                .map(|(e, _)| e.key.clone())
                .collect()
        };
        assert!(keys(&[]).is_empty());
        assert_eq!(keys(&["vip".to_string()]), vec!["targeted".to_string()]);
    }
}
