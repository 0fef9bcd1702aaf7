#!/usr/bin/env bash
# Issue 10 on the GPU machine: compiled engines for ViT-L-14 (random weights, FP8-quantized on
# random data). Measures the build (first process), a fresh process's start to its first results
# without an engine (CLIPFP8_ENGINE=off: the lazy compile of before) and with it, the engine size
# and the compiler-cache hits; prints a Markdown table (also $OUT/engine_check.md) and keeps the
# JSON files in $OUT.
#
# Usage, from the repository root on a bare GPU image with torch (carry .whl, see
# scripts/device_gpu_tests.sh for the wheels: open_clip, modelopt and their needs):
#   scripts/device_engine_check.sh [PRECISION ...]          # default: fp8 fp16
# Every process gets fresh Inductor/Triton caches. Steps whose output exists in $ENGINE_CHECK_DIR
# (default /tmp/engine_check) are redone only when named in ENGINE_STEPS, so a run longer than
# one command can be split over calls while the machine stays warm, e.g.
#   ENGINE_STEPS="quantize build" scripts/device_engine_check.sh fp8
#   ENGINE_STEPS="cold warm table" scripts/device_engine_check.sh fp8
# ENGINE_BATCH (default 64, as `clipfp8 index --batch-size`) is the batch warmed up and timed.
set -euo pipefail
cd "$(dirname "$0")/.."
precisions=("$@")
[ ${#precisions[@]} -eq 0 ] && precisions=(fp8 fp16)
steps=" ${ENGINE_STEPS:-quantize build cold warm table} "
dir=${ENGINE_CHECK_DIR:-/tmp/engine_check}
batch=${ENGINE_BATCH:-64}
out=${OUT:-$dir}
mkdir -p "$dir" "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site

# The project itself is installed (not just put on the path): its entry points register the
# precisions that create_encoder finds.
if ! python3 -c 'import clipfp8.quant.runtime.engine, open_clip, modelopt' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'

check() { python3 scripts/engine_check.py "$@"; }
fresh() {  # fresh compiler caches for one process: fresh NAME CMD...
  local name=$1; shift
  rm -rf "$dir/inductor-$name" "$dir/triton-$name"
  env XDG_CACHE_HOME="$dir/xdg" TORCHINDUCTOR_CACHE_DIR="$dir/inductor-$name" TRITON_CACHE_DIR="$dir/triton-$name" "$@"
}
common=(--quantized "$dir/q" --precision "${precisions[@]}" --batch-size "$batch")

if [[ $steps == *" quantize "* && ! -f $dir/q/manifest.json ]]; then
  fresh quantize check quantize --model ViT-L-14 --out "$dir/q"
fi
if [[ $steps == *" build "* ]]; then
  rm -rf "$dir/q/engines" "$dir/xdg/clipfp8/engines"
  fresh build python3 scripts/engine_check.py build "${common[@]}" --json "$dir/build.json"
  du -sh "$dir"/q/engines/* "$dir"/xdg/clipfp8/engines/*/* 2>/dev/null || true
fi
if [[ $steps == *" cold "* ]]; then
  fresh cold env CLIPFP8_ENGINE=off python3 scripts/engine_check.py probe "${common[@]}" --json "$dir/cold.json"
fi
if [[ $steps == *" warm "* ]]; then
  fresh warm env CLIPFP8_ENGINE=auto python3 scripts/engine_check.py probe "${common[@]}" --json "$dir/warm.json"
fi
if [[ $steps == *" table "* ]]; then
  files=()
  for f in build cold warm; do [ -f "$dir/$f.json" ] && files+=("$dir/$f.json") && cp "$dir/$f.json" "$out/engine_$f.json"; done
  check table "${files[@]}" | tee "$out/engine_check.md"
fi
