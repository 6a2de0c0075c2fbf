#!/usr/bin/env python3
"""Reference values for the experiment statistics, computed independently with SciPy.

Writes tests/fixtures/experiment_stats.json, which `src/experiments/stats.rs` tests
compare against to 1e-6. Regenerate (after changing the cases or the formulas) with:

    python3 -m venv /tmp/stats-venv && /tmp/stats-venv/bin/pip install scipy
    /tmp/stats-venv/bin/python scripts/stats_reference.py > tests/fixtures/experiment_stats.json

Independent of the Rust code: the z-test p-value comes from SciPy's 2x2 chi-square test
without continuity correction (chi2 = Z^2), Welch's test from
`scipy.stats.ttest_ind_from_stats(equal_var=False)`, quantiles from `scipy.stats.norm` and
`scipy.stats.t`, the SRM check from `scipy.stats.chisquare`. The always-valid interval is
the formula in the module docs of `src/experiments/stats.rs` (Howard et al. 2021, eq. 14,
as GrowthBook's gbstats computes it), written out here again in NumPy.
"""

import json
import math
import random
import sys

import numpy as np
from scipy import stats

ALPHA = 0.05
TUNING = 5000.0
SRM_THRESHOLD = 0.001
Z = stats.norm.ppf(1 - ALPHA / 2)


def interval(center, halfwidth):
    if center is None or halfwidth is None:
        return None
    if not (math.isfinite(center) and math.isfinite(halfwidth)):
        return None
    return {"lower": center - halfwidth, "upper": center + halfwidth}


def always_valid_halfwidth(variance, n):
    rho = np.sqrt((-2 * np.log(ALPHA) + np.log(-2 * np.log(ALPHA) + 1)) / TUNING)
    s2 = variance * n
    return float(
        np.sqrt(s2)
        * np.sqrt(2 * (n * rho**2 + 1) / (n**2 * rho**2) * np.log(np.sqrt(n * rho**2 + 1) / ALPHA))
    )


def summary(v):
    n = v["exposures"]
    mean = v["value_sum"] / n if n > 0 else None
    var = None
    if n > 1:
        var = max((v["value_sum_sq"] - v["value_sum"] ** 2 / n) / (n - 1), 0.0)
    rate = v["conversions"] / n if n > 0 else None
    return n, rate, mean, var


def compare(control, treatment):
    out = {k: None for k in [
        "rate_diff", "rate_diff_ci", "lift", "lift_ci", "z_score", "p_value",
        "rate_always_valid_ci", "value_diff", "value_diff_ci", "value_t_score", "value_df",
        "value_p_value", "value_always_valid_ci"]}
    n_c, p_c, m_c, s_c = summary(control)
    n_t, p_t, m_t, s_t = summary(treatment)
    if p_c is not None and p_t is not None:
        v_c = p_c * (1 - p_c) / n_c
        v_t = p_t * (1 - p_t) / n_t
        diff = p_t - p_c
        out["rate_diff"] = diff
        if v_c + v_t > 0:
            out["rate_diff_ci"] = interval(diff, Z * math.sqrt(v_c + v_t))
            out["rate_always_valid_ci"] = interval(diff, always_valid_halfwidth(v_c + v_t, n_c + n_t))
        if p_c > 0:
            lift = p_t / p_c - 1
            var = v_t / p_c**2 + p_t**2 * v_c / p_c**4
            out["lift"] = lift
            out["lift_ci"] = interval(lift, Z * math.sqrt(var))
        table = [
            [treatment["conversions"], n_t - treatment["conversions"]],
            [control["conversions"], n_c - control["conversions"]],
        ]
        pooled = (treatment["conversions"] + control["conversions"]) / (n_t + n_c)
        if 0 < pooled < 1:
            chi2, p, _, _ = stats.chi2_contingency(table, correction=False)
            out["z_score"] = math.copysign(math.sqrt(chi2), diff) if diff != 0 else 0.0
            out["p_value"] = float(p)
    if m_c is not None and m_t is not None:
        out["value_diff"] = m_t - m_c
    if s_c is not None and s_t is not None:
        a_t, a_c = s_t / n_t, s_c / n_c
        if a_t + a_c > 0:
            res = stats.ttest_ind_from_stats(
                m_t, math.sqrt(s_t), n_t, m_c, math.sqrt(s_c), n_c, equal_var=False)
            df = (a_t + a_c) ** 2 / (a_t**2 / (n_t - 1) + a_c**2 / (n_c - 1))
            out["value_t_score"] = float(res.statistic)
            out["value_p_value"] = float(res.pvalue)
            out["value_df"] = df
            out["value_diff_ci"] = interval(
                m_t - m_c, stats.t.ppf(1 - ALPHA / 2, df) * math.sqrt(a_t + a_c))
            out["value_always_valid_ci"] = interval(
                m_t - m_c, always_valid_halfwidth(a_t + a_c, n_t + n_c))
    return out


def srm(variants, weights):
    observed = [v["exposures"] for v in variants]
    total = sum(observed)
    if len(observed) < 2 or total == 0:
        return None
    expected = [total * w / sum(weights) for w in weights]
    chi2, p = stats.chisquare(observed, f_exp=expected)
    return {"chi_square": float(chi2), "p_value": float(p), "mismatch": bool(p < SRM_THRESHOLD)}


def variant(rng, exposures, conversions, mean_value):
    """Totals of `exposures` decisions, `conversions` of them with a lognormal value."""
    values = [rng.lognormvariate(math.log(mean_value), 0.8) for _ in range(conversions)]
    return {
        "exposures": exposures,
        "conversions": conversions,
        "value_sum": math.fsum(values),
        "value_sum_sq": math.fsum(v * v for v in values),
    }


def cases():
    rng = random.Random(20260102)
    return [
        ("two arms, modest lift", [1, 1],
         [variant(rng, 1000, 100, 20.0), variant(rng, 1000, 120, 22.0)]),
        ("three arms, one negative", [1, 1, 2],
         [variant(rng, 2500, 250, 30.0), variant(rng, 2480, 220, 30.0),
          variant(rng, 5020, 560, 35.0)]),
        ("sample ratio mismatch", [1, 1],
         [variant(rng, 5000, 400, 10.0), variant(rng, 4000, 330, 10.0)]),
        ("large and small rates", [0.5, 0.5],
         [variant(rng, 200000, 4200, 55.0), variant(rng, 200500, 4410, 54.0)]),
        ("unequal weights", [0.2, 0.8],
         [variant(rng, 1990, 300, 5.0), variant(rng, 8010, 1300, 5.5)]),
        ("control never converts", [1, 1],
         [variant(rng, 500, 0, 1.0), variant(rng, 510, 7, 12.0)]),
        ("tiny", [1, 1],
         [variant(rng, 3, 1, 4.0), variant(rng, 2, 1, 9.0)]),
        ("nothing yet", [1, 1],
         [variant(rng, 0, 0, 1.0), variant(rng, 0, 0, 1.0)]),
    ]


# The assignment hash (src/experiments/assignment.rs), written again from its docs.
def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def fmix64(k):
    m = 0xFFFFFFFFFFFFFFFF
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & m
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & m
    k ^= k >> 33
    return k


def bucket(salt, customer):
    return fmix64(fnv1a64(f"{salt}:{customer}".encode("utf-8"))) % 10000


def main():
    out = {"cases": [], "buckets": []}
    for name, weights, variants in cases():
        out["cases"].append({
            "name": name,
            "weights": weights,
            "variants": variants,
            "comparisons": [compare(variants[0], t) for t in variants[1:]],
            "srm": srm(variants, weights),
        })
    for salt, customer in [("hero", "c1"), ("hero", "c2"), ("hero", "alice"),
                           ("checkout-2026", "customer-42"), ("x", ""),
                           ("tailor-holdout", "b\u00e9atrice"), ("a:b", "c:d")]:
        out["buckets"].append({"salt": salt, "customer": customer, "bucket": bucket(salt, customer)})
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
