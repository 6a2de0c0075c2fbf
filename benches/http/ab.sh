#!/usr/bin/env bash
# Usage: benches/http/ab.sh BINARY... (e.g. a copy of target/release/tailor before a change, then after)
# A/B: same demo world, same wrk command, binaries back to back.
for bin in "$@"; do
  pkill -f "tailor serve"; sleep 0.5
  dir=$(mktemp -d)
  RUST_LOG=warn $bin serve --demo --data-dir $dir --listen 127.0.0.1:18092 >/dev/null 2>&1 &
  until curl -sf 127.0.0.1:18092/readyz >/dev/null; do sleep 0.2; done
  echo "== $bin"
  wrk -t2 -c16 -d10s --latency -s "$(dirname "$0")/personalize.lua" http://127.0.0.1:18092 | grep -E "Requests/sec|50%|99%"
  pkill -f "tailor serve"; rm -rf $dir
done
