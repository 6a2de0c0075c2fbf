#!/usr/bin/env bash
# A/B: the same demo world and the same `tailor bench` runs against each binary, back to
# back, for before/after figures of a change. The load generator is the first binary's
# for every server, so only the server differs. Each server starts on a fresh data dir.
# Usage: benches/http/ab.sh [-s SECONDS] BINARY... (e.g. a copy of the release binary
# built before a change, then the one after, then both again: A B A B).
# WORKLOADS picks the workloads (default "personalize events"): personalize runs closed
# loop with 16 in flight after a 3 s warm-up; events and rest-events closed loop with 8
# requests of 100 events in flight (each acknowledged once applied, as by default).
# One JSON line per run; then the median achieved rate, and the median server CPU time
# per request, per binary and workload.
set -euo pipefail
secs=10
if [ "${1:-}" = "-s" ]; then
  secs=$2
  shift 2
fi
[ $# -gt 0 ] || { echo "usage: $0 [-s SECONDS] BINARY..." >&2; exit 2; }
port=18092
gen="$1"
results=$(mktemp)
pid=
dir=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  if [ -n "$dir" ]; then rm -rf "$dir"; fi
  rm -f "$results"
}
trap cleanup EXIT
hz=$(getconf CLK_TCK)
# utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat; the
# command name in field 2 has no spaces here).
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for bin in "$@"; do
  dir=$(mktemp -d)
  RUST_LOG=warn "$bin" serve --demo --data-dir "$dir" --listen 127.0.0.1:$port >/dev/null 2>&1 &
  pid=$!
  until curl -sf 127.0.0.1:$port/readyz >/dev/null; do sleep 0.2; done
  key=$(awk '$1 == "admin" {print $2}' "$dir/demo-keys.txt")
  for workload in ${WORKLOADS:-personalize events}; do
    case $workload in
      events | rest-events) args=(--concurrency 8 --events-per-request 100) ;;
      *) args=(--concurrency 16) ;;
    esac
    bench() {
      TAILOR_API_KEY=$key "$gen" bench --url http://127.0.0.1:$port --dist uniform \
        --workload "$workload" --rate 0 "${args[@]}" "$@"
    }
    if [ "$workload" = personalize ]; then bench --duration 3s >/dev/null; fi
    before=$(cpu_ticks "$pid")
    out=$(bench --duration "${secs}s")
    ticks=$(($(cpu_ticks "$pid") - before))
    # The server's CPU time (user + system, every thread) per request: steadier than the
    # rate on a shared machine, where other work takes cores from both sides.
    jq -c --arg bin "$bin" --argjson ticks "$ticks" --argjson hz "$hz" \
      '{bin: $bin, workload, achieved_rps, events_per_s, p50_ms, p99_ms, errors,
        server_cpu_us_per_request: (if .requests > 0 then ($ticks / $hz * 1e6 / .requests | round) else null end)}' \
      <<<"$out" | tee -a "$results"
  done
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  pid=
  rm -rf "$dir"
  dir=
done
# The median of the jq expression $1 over the runs of each binary and workload.
medians() {
  jq -rs "group_by([.bin, .workload])[] |
    (map($1) | sort) as \$r | (\$r | length) as \$n |
    (if \$n % 2 == 1 then \$r[(\$n - 1) / 2] else (\$r[\$n / 2 - 1] + \$r[\$n / 2]) / 2 end) as \$m |
    \"\\(.[0].workload)\\t\\(.[0].bin)\\t\\(\$m | round)\\t(\\(\$n) runs)\"" "$results"
}
echo "== median achieved rate (requests/s; events/s for the events workloads)"
medians '.events_per_s // .achieved_rps'
echo "== median server CPU per request (µs; per request of 100 events for the events workloads)"
medians '.server_cpu_us_per_request'
