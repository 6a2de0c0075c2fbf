#!/usr/bin/env bash
# The model's forward pass in candle and in onnxruntime, the same weights and inputs:
# trains a model in the criterion bench, exports it, then times it in onnxruntime.
#   benches/model-onnx/run.sh      (ONNX_VENV=DIR reuses a virtualenv that has the packages)
set -euo pipefail
cd "$(dirname "$0")/../.."
export_dir="$(mktemp -d)"
trap 'rm -rf "$export_dir"' EXIT
venv="${ONNX_VENV:-$export_dir/venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q onnx onnxruntime safetensors numpy
fi
MODEL_EXPORT_DIR="$export_dir" cargo bench --bench model 2>&1 | grep -E "^model_|time:"
"$venv/bin/python" benches/model-onnx/compare.py "$export_dir"
