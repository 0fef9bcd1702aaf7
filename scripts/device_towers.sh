#!/usr/bin/env bash
# `clipfp8 bench-towers` (encoder-only, issue 12) on a CUDA machine (the lent H200: Python 3.12,
# torch preinstalled): ViT-L-14 image and text towers, batch sizes 256/1/8/64/1024, every default
# precision (fp16-eager, fp16-compiled, fp16-sdpa, fp8; fp8-exact at 1 and 256) in one
# process, so the FP8 / best-FP16 ratios are side by side. About 6-9 minutes (a compile per tower
# and precision); the JSON is rewritten after every stage, so a run cut short keeps its figures.
# PRECISIONS=... overrides the list (e.g. add fp16-autotune,fp8-autotune: minutes more each);
# BATCHES=... the batch sizes (e.g. 256,1 when device time is short).
# Wheels: as scripts/device_bench.sh (.whl/ with nvidia-modelopt, open_clip_torch and their deps).
set -o pipefail
OUT=${OUT:-/tmp/clipfp8-towers-out}
mkdir -p "$OUT"
# shellcheck source=scripts/device_env.sh
source scripts/device_env.sh
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
  git rev-parse HEAD 2>/dev/null || true
} | tee "$OUT/env.txt"
timeout --signal=INT "${BENCH_TIMEOUT:-560}" python3 -m clipfp8.app.cli bench-towers --model ViT-L-14 \
  --precisions "${PRECISIONS:-fp16-eager,fp16-compiled,fp16-sdpa,fp8,fp8-exact}" \
  --batch-sizes "${BATCHES:-256,1,8,64,1024}" --min-time-s 0.4 \
  --out "$OUT/bench_towers.json" --plot "$OUT/bench_towers.png" 2>&1 | tee "$OUT/towers.log"
