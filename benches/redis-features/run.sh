#!/usr/bin/env bash
# Feature retrieval from Redis, in one run on one machine: Tailor's FeatureStore read of
# 20 features against `redis-benchmark` HMGET of the same 20 fields on the same keys,
# and against Feast's `feast serve` (online store: the same Redis) over HTTP; optionally
# Tailor's GraphQL `features` query with `backends.features` on that Redis.
#
# 1. starts its own redis-server on a free port (no persistence, temp dir);
# 2. `examples/redis_features.rs fill`: N customers × 20 feature states through Tailor's
#    Redis FeatureStore (hashes `customer_features:{<12-digit id>}`, fields `1:f00` …),
#    and the same values as CSV;
# 3. for each concurrency (closed loops; default "1 16"):
#    - `redis_features read`: FeatureStore::read of all 20 features of a uniformly drawn
#      customer (HMGET + JSON decode), HDR histogram of every read;
#    - `redis-benchmark -r N HMGET customer_features:{__rand_int__} 1:f00 … 1:f19`:
#      `__rand_int__` becomes a 12-digit number below N, exactly Tailor's ids, so the
#      same hashes and fields (one connection per client);
#    - `feast serve` (PyPI feast[redis] in a venv): feature view of the same 20 values
#      for the same customers, `feast apply` + `feast materialize` into the same Redis,
#      POST /get-online-features for one customer × 20 features, driven by wrk (feast.lua);
#    - with WITH_GRAPHQL=1: `tailor serve --demo` with backends.features on the same Redis
#      (its own key prefix) and `tailor bench --workload features` (the demo's 9
#      features of a customer over GraphQL; not the same keys as above).
# Everything shares the machine's cores, unpinned. Installs redis-server, redis-tools,
# wrk, jq and curl with apt-get and Feast into a venv (FEAST_VENV) when missing.
#
# Usage: benches/redis-features/run.sh [customers] [seconds]
#   env: CONCURRENCY="1 16"  WITH_GRAPHQL=1 (not TAILOR_*: the server reads those)  FEAST_WORKERS=1  FEAST_VENV=<dir>
set -euo pipefail
cd "$(dirname "$0")/../.."
here=benches/redis-features
customers="${1:-10000}"
secs="${2:-10}"
concurrencies="${CONCURRENCY:-1 16}"
venv="${FEAST_VENV:-$here/.venv}"
feast_workers="${FEAST_WORKERS:-1}"
target="${CARGO_TARGET_DIR:-target}"

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-benchmark >/dev/null || missing+=(redis-tools)
command -v wrk >/dev/null || missing+=(wrk)
command -v jq >/dev/null || missing+=(jq)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  sudo_if_needed apt-get update -qq
  sudo_if_needed apt-get install -y -qq "${missing[@]}"
fi
if [ ! -x "$venv/bin/feast" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'feast[redis]'
fi
venv=$(cd "$venv" && pwd)  # absolute: Feast runs in its repository's directory

cargo build --release --quiet --features redis --example redis_features --bin tailor
example="$target/release/examples/redis_features"
tailor="$target/release/tailor"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# Polls a command until it succeeds, for at most $1 seconds, while the last server started lives.
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    kill -0 "${pids[-1]}" 2>/dev/null || { echo "the server exited: $*" >&2; return 1; }
    [ $SECONDS -lt $deadline ] || { echo "not ready in time: $*" >&2; return 1; }
    sleep 0.2
  done
}

dir=$(mktemp -d)
pids=()
cleanup() {
  local rc=$?
  # On failure, the servers' last words.
  [ "$rc" -eq 0 ] || for log in "$dir"/*.log; do echo "== $log" >&2; sed -n '1,/backtrace/p' "$log" | tail -n 20 >&2; done
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
results="$dir/results.jsonl"
# Appends one measurement: its label fields merged into the JSON on stdin.
record() { jq -c --arg system "$1" --argjson c "$2" '{system: $system, concurrency: $c} + .' | tee -a "$results"; }

rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --dir "$dir" --save '' --appendonly no \
  --daemonize no --loglevel warning >"$dir/redis.log" 2>&1 &
pids+=($!)
wait_for 10 redis-cli -p "$rport" ping
url="redis://127.0.0.1:$rport"

echo "== fill: $customers customers × 20 features through Tailor's Redis FeatureStore"
"$example" fill "$url" "$customers" "$dir/values.csv"
# The hash redis-benchmark will address for customer 5 has Tailor's 20 fields.
[ "$(redis-cli -p "$rport" hlen 'customer_features:{000000000005}')" = 20 ]

echo "== Feast $("$venv/bin/pip" show feast 2>/dev/null | awk '/^Version/ {print $2}'): apply, materialize into the same Redis, serve"
repo="$dir/feast"
"$venv/bin/python" "$here/feast_repo.py" "$dir/values.csv" "$repo" "$rport"
(
  cd "$repo"
  "$venv/bin/feast" apply >/dev/null
  "$venv/bin/feast" materialize 2000-01-01T00:00:00 "$(date -u +%Y-%m-%dT%H:%M:%S)" >/dev/null
)
fport=$(free_port)
# max-requests 0: gunicorn otherwise restarts the worker every ~1,000 requests.
(cd "$repo" && exec "$venv/bin/feast" serve -h 127.0.0.1 -p "$fport" --no-access-log \
  --workers "$feast_workers" --max-requests 0) >"$dir/feast.log" 2>&1 &
pids+=($!)
wait_for 120 curl -sf "127.0.0.1:$fport/health"
one=$(curl -sf -X POST "127.0.0.1:$fport/get-online-features" -H 'Content-Type: application/json' \
  -d '{"features":["customer_features:f00","customer_features:f19"],"entities":{"customer_id":[5]}}')
echo "$one" | jq -e '[.results[1:][].values[0]] | all(. != null)' >/dev/null \
  || { echo "feast serve did not return customer 5's features: $one" >&2; exit 1; }
# Warm-up (imports, connections), discarded.
CUSTOMERS=$customers wrk -t1 -c4 -d3s -s "$here/feast.lua" "http://127.0.0.1:$fport" >/dev/null

if [ "${WITH_GRAPHQL:-0}" = 1 ]; then
  tport=$(free_port)
  TAILOR_BACKENDS__FEATURES="$url?prefix=demo:" RUST_LOG=warn \
    "$tailor" serve --demo --data-dir "$dir/tailor" --listen "127.0.0.1:$tport" >"$dir/tailor.log" 2>&1 &
  pids+=($!)
  wait_for 300 curl -sf "127.0.0.1:$tport/readyz"
  TAILOR_API_KEY=$(awk '$1 == "admin" {print $2}' "$dir/tailor/demo-keys.txt")
  export TAILOR_API_KEY
  "$tailor" bench --url "http://127.0.0.1:$tport" --workload features --dist uniform --rate 0 \
    --concurrency 4 --duration 3s >/dev/null
fi

for c in $concurrencies; do
  echo "== $c in flight"
  "$example" read "$url" "$customers" "$secs" "$c" | record tailor-featurestore "$c"
  fields=()
  for j in $(seq 0 19); do fields+=("1:f$(printf %02d "$j")"); done
  # redis-benchmark has no duration: as many requests as the FeatureStore loop read.
  n=$(tail -1 "$results" | jq '.reads')
  redis-benchmark -p "$rport" -c "$c" -n "$n" -r "$customers" --csv \
    HMGET 'customer_features:{__rand_int__}' "${fields[@]}" |
    awk -F'"' 'NR == 2 {printf "{\"requests\":%d,\"rate_per_s\":%s,\"avg_us\":%.0f,\"p50_us\":%.0f,\"p95_us\":%.0f,\"p99_us\":%.0f,\"max_us\":%.0f}\n", '"$n"', $4, $6 * 1000, $10 * 1000, $12 * 1000, $14 * 1000, $16 * 1000}' |
    record redis-benchmark "$c"
  CUSTOMERS=$customers wrk -t1 -c"$c" -d"${secs}s" -s "$here/feast.lua" "http://127.0.0.1:$fport" |
    grep '^{' | record "feast-serve-http" "$c"
  if [ "${WITH_GRAPHQL:-0}" = 1 ]; then
    "$tailor" bench --url "http://127.0.0.1:$tport" --workload features --dist uniform --rate 0 \
      --concurrency "$c" --duration "${secs}s" |
      jq -c '. + {rate_per_s: .achieved_rps, p50_us: (.p50_ms * 1000), p90_us: (.p90_ms * 1000),
                  p99_us: (.p99_ms * 1000), p999_us: (.p999_ms * 1000), max_us: (.max_ms * 1000)}' |
      record tailor-graphql-http "$c"
  fi
done

echo "== versions"
redis-server --version
"$venv/bin/pip" show feast | awk '/^Version/ {print "feast " $2}'
wrk --version 2>&1 | head -1 || true
echo "== summary (µs; closed loops, $customers customers, ${secs}s each)"
jq -r '[.system, .concurrency, (.rate_per_s | floor), .p50_us, .p99_us] | @tsv' "$results" |
  awk 'BEGIN {printf "%-22s %4s %10s %10s %10s\n", "system", "c", "rate/s", "p50", "p99"}
       {printf "%-22s %4s %10s %10s %10s\n", $1, $2, $3, $4, $5}'
