#!/usr/bin/env bash
# Train the embedded default model on a CUDA machine (the lent H200: Python 3.12 and torch
# preinstalled, no network) from the pack `clipfp8 train-prep` wrote (docs/training.md).
#
#   scripts/device_train.sh [BUDGET_S] [TRAIN FLAGS...]
#       one run of `clipfp8 train` with --time-budget-s BUDGET_S (default 510; it covers load and
#       compile, the quick eval and the writes come after) into $OUT/run: model.safetensors,
#       summary.json, train_log.csv, loss.png, log.txt -- what `clipfp8 train-ship` takes.
#   ABLATE=1 scripts/device_train.sh BUDGET_S 'NAME FLAGS...' ['NAME FLAGS...' ...]
#       one short run per variant, in turn (e.g. 'l8 --vision layers=8'); $OUT gets
#       ablate-NAME.json (the run summary: config, steps, final loss, quick eval on the carried
#       eval copy) and ablate.log, no weights (the run tool brings back 8 files at most).
#
# Carry the pack (.carry/pack) and .carry/train-wheels: the Python 3.12 wheels of the only packages
# training needs that the image lacks -- open_clip_torch==3.3.0 and its ftfy and wcwidth (copy them
# from .whl/, see scripts/device_bench.sh). Not needed there: the MiniLM text tower (the pack holds
# the caption features), transformers, modelopt, faiss.
set -o pipefail
OUT=${OUT:-/tmp/clipfp8-train-out}
PACK=${PACK:-.carry/pack}
WHEELS=${WHEELS:-.carry/train-wheels}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$WHEELS"/*.whl || exit 3
# The project itself (the clipfp8.* names): no network needed.
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
  --target /tmp/site . || exit 3
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import sys, torch, PIL.features as f; print("python", sys.version.split()[0], "torch", torch.__version__, "webp", f.check("webp"))'
  git rev-parse HEAD 2>/dev/null || true
  du -sh "$PACK"
} 2>&1 | tee "$OUT/env.txt"

train() {  # OUT_DIR BUDGET_S [FLAGS...]
  local dir=$1 budget=$2
  shift 2
  mkdir -p "$dir"
  timeout $((budget + 90)) python3 -m clipfp8.quant.train train --pack-dir "$PACK" --out-dir "$dir" \
    --time-budget-s "$budget" "$@"
}

if [ -z "$ABLATE" ]; then
  BUDGET=${1:-510}
  shift $(($# > 0 ? 1 : 0))
  mkdir -p "$OUT/run"
  train "$OUT/run" "$BUDGET" "$@" 2>&1 | tee "$OUT/run/log.txt"
  exit
fi
BUDGET=$1
shift
rc=0
for variant in "$@"; do
  name=${variant%% *}
  read -r -a flags <<< "${variant#"$name"}"
  mkdir -p "/tmp/ablate/$name"
  echo "=== variant $name: ${flags[*]}" | tee -a "$OUT/ablate.log"
  train "/tmp/ablate/$name" "$BUDGET" "${flags[@]}" 2>&1 | tee -a "$OUT/ablate.log" || rc=1
  cp "/tmp/ablate/$name/summary.json" "$OUT/ablate-$name.json" || rc=1
done
exit $rc
