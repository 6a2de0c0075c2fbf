"""Vowpal Wabbit's contextual bandit on the stream that `tailor simulate` plays.

Reads the JSONL that `tailor simulate --export FILE` writes (one round per line: the
placement, device, time, the customer's feature values, the placement's candidates with
their ids, tags and true click probabilities, and the round's click draw) and replays it
through `vw --cb_explore_adf`, learning online:

- shared features (namespace U): every customer feature as a number, `placement=…`,
  `device=…`, and the hour of day as sine and cosine;
- action features (namespace A): `id=…` and `tag=…` for each tag;
- `-q UA`: every customer feature crossed with every action feature, so VW can learn
  "page views about books × tag=books" (the demo world's hidden structure);
- each round's action is sampled from VW's PMF with a seeded `random.Random`; the pick is
  clicked when the round's exported draw is below its true probability (the same rule,
  and the same draws, as `tailor simulate`), and VW learns cost −1 for a click, 0
  otherwise, with the PMF's probability of the pick.

Prints one JSON object per configuration with the fields of `tailor simulate`'s report;
`decisions_per_second` times VW's predict and learn calls (text parsing included), not
reading the stream. See run.sh for the whole command.
"""

import argparse
import json
import math
import random
import sys
import time

import vowpalwabbit

CONFIGURATIONS = {
    "epsilon": "--cb_explore_adf --epsilon 0.1",
    "squarecb": "--cb_explore_adf --squarecb",
    "cover": "--cb_explore_adf --cover 4",
}
COMMON = "-q UA --quiet"


def shared_line(r):
    parts = [f"placement={r['placement']}", f"device={r['device']}"]
    for name, value in sorted(r["features"].items()):
        if value != 0:
            parts.append(f"{name}:{value:.6g}")
    # "2026-11-27T13:05:00+00:00": hour of day as a fraction.
    hh, mm = r["at"][11:13], r["at"][14:16]
    angle = (int(hh) + int(mm) / 60.0) / 24.0 * 2.0 * math.pi
    parts.append(f"hour_sin:{math.sin(angle):.6g}")
    parts.append(f"hour_cos:{math.cos(angle):.6g}")
    return "shared |U " + " ".join(parts)


def action_line(candidate):
    tags = " ".join(f"tag={t}" for t in candidate["tags"])
    return f"|A id={candidate['id']} {tags}"


def sample(pmf, rng):
    u = rng.random() * sum(pmf)
    for i, p in enumerate(pmf):
        if u < p:
            return i
        u -= p
    return len(pmf) - 1


def run(stream_path, name, args, seed):
    vw = vowpalwabbit.Workspace(f"{args} {COMMON} --random_seed {seed}")
    rng = random.Random(seed)
    rounds = clicks = 0
    expected = oracle = busy = 0.0
    with open(stream_path) as f:
        for line in f:
            r = json.loads(line)
            shared = shared_line(r)
            actions = [action_line(c) for c in r["candidates"]]
            probabilities = [c["click_probability"] for c in r["candidates"]]
            started = time.perf_counter()
            pmf = vw.predict([shared] + actions)
            busy += time.perf_counter() - started
            pick = sample(pmf, rng)
            truth = probabilities[pick]
            clicked = r["click_draw"] < truth
            labelled = list(actions)
            cost = -1.0 if clicked else 0.0
            labelled[pick] = f"{pick}:{cost}:{pmf[pick]} {actions[pick]}"
            started = time.perf_counter()
            vw.learn([shared] + labelled)
            busy += time.perf_counter() - started
            rounds += 1
            clicks += int(clicked)
            expected += truth
            oracle += max(probabilities)
    vw.finish()
    return {
        "policy": f"vw_{name}",
        "vw_args": f"{args} {COMMON}",
        "rounds": rounds,
        "seed": seed,
        "model": None,
        "cumulative_reward": clicks,
        "expected_cumulative_reward": expected,
        "oracle_expected_cumulative_reward": oracle,
        "regret": oracle - expected,
        "click_rate": clicks / max(rounds, 1),
        "expected_click_rate": expected / max(rounds, 1),
        "decisions_per_second": rounds / max(busy, 1e-9),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stream", help="JSONL written by `tailor simulate --export`")
    parser.add_argument("--seed", type=int, default=1, help="seed of VW and the sampling")
    parser.add_argument(
        "--config",
        action="append",
        choices=sorted(CONFIGURATIONS),
        help="exploration to run (repeatable; default: all)",
    )
    opts = parser.parse_args()
    for name in opts.config or list(CONFIGURATIONS):
        print(json.dumps(run(opts.stream, name, CONFIGURATIONS[name], opts.seed)))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
