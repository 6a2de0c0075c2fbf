#!/usr/bin/env bash
# `tailor bench` against a release server with the demo world on a fresh data dir: the
# open loop at a few offered rates, the closed loop for the maximum, and the events and
# features workloads. Server and load generator share the machine's cores (no pinning).
# Customers are drawn uniformly: under Zipf the few hottest customers get thousands of
# decisions in seconds, the demo's frequency cap (3 per item per day) then filters every
# candidate for them and those decisions are refused ("no eligible content").
# Usage: benches/http/tailor-bench.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs="${1:-10}"
port=18091
dir=$(mktemp -d)
cargo build --release --quiet
tailor="${CARGO_TARGET_DIR:-target}/release/tailor"
RUST_LOG=warn "$tailor" serve --demo --data-dir "$dir" --listen 127.0.0.1:$port &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
until curl -sf 127.0.0.1:$port/readyz >/dev/null; do sleep 0.5; done
# The demo's admin key (written on first start, before the server listens).
TAILOR_API_KEY=$(awk '$1 == "admin" {print $2}' "$dir/demo-keys.txt")
export TAILOR_API_KEY
bench() { "$tailor" bench --url http://127.0.0.1:$port --dist uniform "$@"; }
# Warm up (caches, connections, the allocator) and discard.
bench --workload personalize --rate 0 --concurrency 16 --duration 3s >/dev/null
bench() { "$tailor" bench --url http://127.0.0.1:$port --dist uniform --duration "${secs}s" "$@"; }
for rate in 1000 2500 5000; do
  echo "== personalize, open loop at $rate/s"
  bench --workload personalize --rate "$rate" --concurrency 256
done
# personalize against its two ceilings, back to back at the same concurrency: the bare
# route (HTTP stack alone) and a constant GraphQL query (HTTP + GraphQL, no resolver).
for workload in personalize http-ceiling graphql-ceiling; do
  echo "== $workload, closed loop, 16 in flight"
  bench --workload "$workload" --rate 0 --concurrency 16
done
echo "== features (every active feature of a customer), open loop at 2000/s"
bench --workload features --rate 2000 --concurrency 256
echo "== trackEvents, 100 events per request, closed loop, 8 in flight"
bench --workload events --rate 0 --concurrency 8 --events-per-request 100
echo "== the same events through REST (/api/v1/events), closed loop, 8 in flight"
bench --workload rest-events --rate 0 --concurrency 8 --events-per-request 100
echo "== mean time per decision stage over every decision above (ms), from /metrics"
curl -s 127.0.0.1:$port/metrics | awk -F'[{}" ]+' '
  /^tailor_decision_stage_latency_ms_sum/ {sum[$3] = $NF}
  /^tailor_decision_stage_latency_ms_count/ {n[$3] = $NF}
  END {for (s in sum) if (n[s] > 0) printf "%-12s %.3f\n", s, sum[s] / n[s]}'
