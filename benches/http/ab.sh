#!/usr/bin/env bash
# A/B: the same demo world and the same wrk command against each binary, back to back.
# Usage: benches/http/ab.sh BINARY... (e.g. a copy of target/release/tailor built before a
# change, then the one after, then both again).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
port=18092
for bin in "$@"; do
  dir=$(mktemp -d)
  RUST_LOG=warn "$bin" serve --demo --data-dir "$dir" --listen 127.0.0.1:$port >/dev/null 2>&1 &
  pid=$!
  until curl -sf 127.0.0.1:$port/readyz >/dev/null; do sleep 0.2; done
  echo "== $bin"
  wrk -t2 -c16 -d10s --latency -s "$here/personalize.lua" http://127.0.0.1:$port | grep -E "Requests/sec|50%|99%"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
done
