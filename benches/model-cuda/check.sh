#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, check a `--features cuda` build (made by build.sh, here
# or elsewhere; this script builds nothing):
#   1. the binaries find their libraries (driver, cudart, cublas, curand, nvrtc);
#   2. examples/cuda_check: the same trained model scores the same batches on the CPU and on
#      the GPU; the largest score difference and the timings, as JSON;
#   3. `tailor serve --demo` with model.device = "cuda" (TAILOR_MODEL__DEVICE) trains the
#      demo model on the GPU and becomes ready.
#
#   benches/model-cuda/check.sh [RELEASE_DIR] [OUT_DIR]
#
# RELEASE_DIR holds `tailor` and `examples/cuda_check` (default target/release); results go
# to OUT_DIR (default ./cuda-check): cuda_check.json, serve.log, summary.txt.
# ITERATIONS (default 50) and TOLERANCE (default 1e-4) go to cuda_check. Exit status 0 only
# when every step passed.
set -uo pipefail
export RUST_BACKTRACE=0   # error messages, not backtraces, in the summary

DIR=${1:-target/release}
OUT=${2:-cuda-check}
ITERATIONS=${ITERATIONS:-50}
TOLERANCE=${TOLERANCE:-1e-4}
TAILOR=$DIR/tailor
CHECK=$DIR/examples/cuda_check
mkdir -p "$OUT"
status=0
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

for bin in "$TAILOR" "$CHECK"; do
    [ -x "$bin" ] || { say "FAIL missing $bin"; exit 1; }
done

say "== gpu"
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT/summary.txt"

say "== libraries"
missing=$(ldd "$TAILOR" | grep "not found")
ldd "$TAILOR" | grep -E "libcuda|libcudart|libcublas|libcurand|libnvrtc" | tee -a "$OUT/summary.txt"
if [ -n "$missing" ]; then
    say "FAIL unresolved libraries (install the CUDA runtime libraries of the toolkit version the build used, or set LD_LIBRARY_PATH):"
    say "$missing"
    exit 1
fi
"$TAILOR" --version | tee -a "$OUT/summary.txt"

say "== cpu vs cuda scores"
if timeout 600 "$CHECK" "$ITERATIONS" "$TOLERANCE" > "$OUT/cuda_check.json" 2> "$OUT/cuda_check.err"; then
    say "PASS cuda_check: $(head -c 300 "$OUT/cuda_check.json")"
else
    rc=$?
    say "FAIL cuda_check exit $rc: $(tail -5 "$OUT/cuda_check.err") $(head -c 300 "$OUT/cuda_check.json")"
    status=1
fi

say "== serve with model.device = cuda"
data=$(mktemp -d)
port=${PORT:-18087}
TAILOR_MODEL__DEVICE=cuda RUST_LOG=${RUST_LOG:-info} \
    "$TAILOR" serve --demo --data-dir "$data" --listen "127.0.0.1:$port" > "$OUT/serve.log" 2>&1 &
pid=$!
ready=0
started=$(date +%s)
for _ in $(seq 1 600); do
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    if curl -fsS "http://127.0.0.1:$port/readyz" > /dev/null 2>&1; then ready=1; break; fi
    sleep 0.5
done
if [ "$ready" = 1 ]; then
    say "PASS serve ready after $(( $(date +%s) - started ))s on cuda"
    curl -fsS "http://127.0.0.1:$port/metrics" 2>/dev/null | grep -i -m5 "model" >> "$OUT/summary.txt"
else
    say "FAIL serve did not become ready: $(tail -5 "$OUT/serve.log")"
    status=1
fi
kill "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
rm -rf "$data"
say "status $status"
exit $status
