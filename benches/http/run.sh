#!/usr/bin/env bash
# Baseline HTTP figures until `tailor bench` exists: a release server with the demo world
# on a fresh data dir, then wrk (closed loop) against personalize and event ingestion.
# Server and wrk share the machine's cores. Usage: benches/http/run.sh [seconds]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs="${1:-10}"
port=18090
dir=$(mktemp -d)
cargo build --release --quiet
RUST_LOG=warn target/release/tailor serve --demo --data-dir "$dir" --listen 127.0.0.1:$port &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
until curl -sf 127.0.0.1:$port/readyz >/dev/null; do sleep 0.2; done
echo "== personalize (homepage_hero, 24 candidates, Thompson sampling), 16 connections"
wrk -t2 -c16 -d"${secs}s" --latency -s benches/http/personalize.lua http://127.0.0.1:$port
echo "== event ingestion, 100 events per request, 16 connections (events/s = requests/s x 100)"
wrk -t2 -c16 -d"${secs}s" --latency -s benches/http/events.lua http://127.0.0.1:$port
