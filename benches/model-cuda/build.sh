#!/usr/bin/env bash
# Build tailor with `--features cuda` on a Linux x86_64 machine that has no CUDA toolkit
# installed (and needs no GPU): the toolkit comes from NVIDIA's PyPI wheels.
#
#   benches/model-cuda/build.sh            # toolkit (if missing) + release build
#   benches/model-cuda/build.sh --env      # only print the exports the build uses
#
# Idempotent: the venv, the assembled CUDA_HOME and the libcuda stub are reused when present.
#
# Settings (environment):
#   CUDA_WHEELS     cuda-toolkit meta-package version on PyPI (default 13.0.2 = CUDA 13.0 U2).
#                   Match the target machine: the binary links libcudart.so.13, libcublas.so.13,
#                   libnvrtc.so.13, libcurand.so.10 and libcuda.so.1 dynamically (candle turns on
#                   cudarc's `dynamic-linking`), and the driver must be new enough for the PTX
#                   this nvcc writes (CUDA 13.0: driver >= 580).
#   CUDA_COMPUTE_CAP  target GPU (default 90 = H100/H200, built as sm_90a; 80 = A100 and, via
#                   PTX JIT, newer). No GPU is probed at build time.
#   CUDA_WHEELS_PREFIX  where the venv and the toolkit go (default ~/.cache/tailor-cuda).
#                   (No TAILOR_ names here: the engine reads TAILOR_* as configuration.)
#   CARGO_TARGET_DIR, CARGO_BUILD_JOBS, CUDAFORGE_THREADS: passed through to cargo / the
#                   kernel build.
#   BUILD_ARGS      extra cargo arguments (default: --bin tailor --example cuda_check).
set -euo pipefail

CUDA_WHEELS=${CUDA_WHEELS:-13.0.2}
CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
PREFIX=${CUDA_WHEELS_PREFIX:-${XDG_CACHE_HOME:-$HOME/.cache}/tailor-cuda}
VENV=$PREFIX/venv-$CUDA_WHEELS
CUDA_HOME=$PREFIX/cuda-$CUDA_WHEELS
PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)

log() { echo "[cuda-build] $*" >&2; }

install_wheels() {
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/pip" show cuda-toolkit 2>/dev/null | grep -qx "Version: $CUDA_WHEELS"; then
        return
    fi
    log "installing cuda-toolkit==$CUDA_WHEELS wheels into $VENV (~1.2 GB unpacked)"
    "$PYTHON" -m venv "$VENV"
    # nvcc + crt + nvvm compile the kernels; cudart/cublas/curand/nvrtc are linked;
    # cccl gives the libcu++ headers nvcc's profile puts on the include path.
    "$VENV/bin/pip" install --quiet --no-cache-dir \
        "cuda-toolkit[nvcc,crt,nvvm,cccl,cudart,cublas,curand,nvrtc]==$CUDA_WHEELS"
}

# The wheels unpack into site-packages/nvidia/cu<major>/{bin,include,lib,nvvm}. Build scripts
# expect a toolkit tree: nvcc in bin/, headers in include/, unversioned .so in lib64/, and
# libcuda.so (the driver, which no wheel ships) in lib64/stubs/.
assemble_home() {
    local wheel_root
    wheel_root=$("$VENV/bin/python" - <<'EOF'
import glob, os, sysconfig
roots = glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu1*"))
print(sorted(roots)[-1])
EOF
)
    [ -x "$wheel_root/bin/nvcc" ] || { log "no nvcc under $wheel_root"; exit 1; }
    mkdir -p "$CUDA_HOME/lib64/stubs"
    for d in bin include nvvm; do ln -sfn "$wheel_root/$d" "$CUDA_HOME/$d"; done
    local f base
    for f in "$wheel_root"/lib/*.so* "$wheel_root"/lib/*.a; do
        base=$(basename "$f")
        ln -sfn "$f" "$CUDA_HOME/lib64/$base"
        # libfoo.so.13 / libfoo.so.13.0 -> libfoo.so, what `-lfoo` looks for
        case $base in *.so.*) ln -sfn "$f" "$CUDA_HOME/lib64/${base%%.so.*}.so" ;; esac
    done
    make_libcuda_stub
}

# A link-time stand-in for the driver library, like the toolkit's lib64/stubs/libcuda.so:
# every driver API entry point declared in cuda.h (before and after its _v2/_v3 macro
# renaming), each returning CUDA_ERROR_STUB_LIBRARY (34). SONAME libcuda.so.1, so the binary
# binds to the real driver on a GPU machine. Never put it on a GPU machine's library path.
make_libcuda_stub() {
    local stub=$CUDA_HOME/lib64/stubs/libcuda.so
    [ -f "$stub" ] && [ "$stub" -nt "$CUDA_HOME/include/cuda.h" ] && return
    log "generating libcuda stub from cuda.h"
    local tmp
    tmp=$(mktemp -d)
    {
        grep -ohE '\bCUDAAPI[[:space:]]+cu[A-Za-z0-9_]+[[:space:]]*\(' "$CUDA_HOME/include/cuda.h" \
            | sed -E 's/CUDAAPI[[:space:]]+//; s/[[:space:]]*\($//'
        ${CC:-cc} -E -P -I"$CUDA_HOME/include" "$CUDA_HOME/include/cuda.h" \
            | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | sed -E 's/[[:space:]]*\($//'
    } | sort -u | awk '{ printf "int %s(void) { return 34; }\n", $1 }' > "$tmp/libcuda_stub.c"
    ${CC:-cc} -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$tmp/libcuda.so" "$tmp/libcuda_stub.c"
    mv "$tmp/libcuda.so" "$stub"
    ln -sfn libcuda.so "$CUDA_HOME/lib64/stubs/libcuda.so.1"
    log "stub exports $(grep -c . "$tmp/libcuda_stub.c") symbols"
    rm -rf "$tmp"
}

print_env() {
    cat <<EOF
export CUDA_HOME=$CUDA_HOME
export CUDA_PATH=$CUDA_HOME
export CUDA_ROOT=$CUDA_HOME
export NVCC=$CUDA_HOME/bin/nvcc
export PATH=$CUDA_HOME/bin:\$PATH
export CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP
# only to start the binary on this (GPU-less) machine; on a GPU machine use its own libraries
export CUDA_RUN_LIBRARY_PATH=$CUDA_HOME/lib64:$CUDA_HOME/lib64/stubs
EOF
}

install_wheels
assemble_home
if [ "${1:-}" = "--env" ]; then print_env; exit 0; fi

eval "$(print_env)"
log "nvcc: $(nvcc --version | tail -2 | head -1)"
log "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
cd "$ROOT"
# shellcheck disable=SC2086
time cargo build --release --features cuda ${BUILD_ARGS:---bin tailor --example cuda_check}
