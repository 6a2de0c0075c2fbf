#!/usr/bin/env bash
# Vowpal Wabbit's contextual bandit on the same stream as `tailor simulate`: exports the
# stream with `tailor simulate --export`, then replays it through `vw --cb_explore_adf`.
#   benches/simulate-vw/run.sh [ROUNDS [SEED [--config epsilon|squarecb|cover ...]]]
#   (defaults: 50000 rounds, seed 1, every configuration; VW_VENV=DIR reuses a
#   virtualenv that has vowpalwabbit)
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds="${1:-50000}"
seed="${2:-1}"
shift $(( $# < 2 ? $# : 2 ))
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
venv="${VW_VENV:-$work/venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q vowpalwabbit
fi
cargo run --release --quiet -- simulate --policy uniform --rounds "$rounds" --seed "$seed" \
  --export "$work/stream.jsonl" > /dev/null
"$venv/bin/python" benches/simulate-vw/simulate_vw.py "$work/stream.jsonl" --seed "$seed" "$@"
