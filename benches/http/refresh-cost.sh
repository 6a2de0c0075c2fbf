#!/usr/bin/env bash
# The CPU an idle demo server spends rebuilding its time-dependent segments (conditions
# that slide with time: event counts in a window, feature comparisons), per rebuild.
# Each binary serves the demo world on a fresh data dir twice, idle for SECONDS (default
# 40): once with segments.refresh_interval_secs = 5, once with the refresh off (an
# interval longer than the run); the difference, divided by the refreshes, is the cost
# of one. Usage: benches/http/refresh-cost.sh [-s SECONDS] BINARY...
set -euo pipefail
secs=40
if [ "${1:-}" = "-s" ]; then
  secs=$2
  shift 2
fi
[ $# -gt 0 ] || { echo "usage: $0 [-s SECONDS] BINARY..." >&2; exit 2; }
port=18093
pid=
dir=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  if [ -n "$dir" ]; then rm -rf "$dir"; fi
}
trap cleanup EXIT
hz=$(getconf CLK_TCK)
# The server's CPU (user + system, every thread) over $secs idle seconds, in ms.
idle_cpu_ms() {
  local bin=$1 interval=$2
  dir=$(mktemp -d)
  TAILOR_SEGMENTS__REFRESH_INTERVAL_SECS=$interval RUST_LOG=warn \
    "$bin" serve --demo --data-dir "$dir" --listen 127.0.0.1:$port >/dev/null 2>&1 &
  pid=$!
  until curl -sf 127.0.0.1:$port/readyz >/dev/null; do sleep 0.2; done
  # Past the first refresh, which runs at start.
  sleep 6
  local before after
  before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  sleep "$secs"
  after=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  pid=
  rm -rf "$dir"
  dir=
  echo $(((after - before) * 1000 / hz))
}
for bin in "$@"; do
  refreshing=$(idle_cpu_ms "$bin" 5)
  quiet=$(idle_cpu_ms "$bin" 1000000)
  refreshes=$((secs / 5))
  jq -nc --arg bin "$bin" --argjson r "$refreshing" --argjson q "$quiet" --argjson n "$refreshes" \
    '{bin: $bin, cpu_ms_refreshing: $r, cpu_ms_idle: $q, refreshes: $n, cpu_ms_per_refresh: (($r - $q) / $n | round)}'
done
