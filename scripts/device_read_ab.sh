#!/usr/bin/env bash
# A/B of `clipfp8 index --read-processes` on a CUDA machine (the lent H200), shipped CLI in fresh
# processes, alternated: N generated JPEGs of 500x375 (default 16,384), seeded random ViT-L-14,
# fp16 engine from `clipfp8 build-engine`; with FP8=1 also `clipfp8 quantize` and fp8 runs (about
# 4 more minutes). Prints one line per run (img/s and stage seconds from --summary-json) and
# leaves the summaries in $OUT; then times the device preprocessing both ways. Carry .whl/ as for
# scripts/device_bench.sh.
#   bash scripts/device_read_ab.sh                 # fp16: read processes 0, 4, 8, twice each
#   PROCS="0 8" REPS=3 FP8=1 bash scripts/device_read_ab.sh
#   BENCH_WORK=/tmp/clipfp8-bench-work FP8=1 bash scripts/device_read_ab.sh   # reuse a bench run's
#     corpus (32,768 JPEGs), checkpoint, engines and quantized dir on a still-warm machine
set -o pipefail
OUT=${OUT:-/tmp/clipfp8-read-ab}; W=${WORK:-/tmp/clipfp8-read-ab-work}; mkdir -p "$OUT" "$W"
# shellcheck source=scripts/device_env.sh
source scripts/device_env.sh
N=${N:-16384}; PROCS=${PROCS:-"0 4 8"}; REPS=${REPS:-2}
CLI="python3 -m clipfp8.app.cli"
CORPUS=$W/corpus; CKPT=$W/ckpt.safetensors; QUANT=$W/quantized
if [ -n "${BENCH_WORK:-}" ]; then
  CORPUS=$BENCH_WORK/corpus; CKPT=$BENCH_WORK/ViT-L-14-random.safetensors; QUANT=$BENCH_WORK/quantized
  echo "reusing $BENCH_WORK: $(find "$CORPUS" -name '*.jpg' | wc -l) JPEGs"
else
  python3 -c "
from pathlib import Path
from clipfp8.app.bench_corpus import write_jpegs, random_checkpoint
write_jpegs(Path('$CORPUS'), $N, (500, 375)); random_checkpoint('ViT-L-14', Path('$CKPT'))
" 2>&1 | grep -v "No pretrained weights" | tail -1
fi
MODEL=(--model ViT-L-14 --checkpoint "$CKPT" --device cuda)
[ -n "${BENCH_WORK:-}" ] || $CLI build-engine --precision fp16 --batch-size 256 "${MODEL[@]}" 2>&1 | tail -1
PRECS="fp16"
if [ "${FP8:-0}" = 1 ]; then
  [ -d "$QUANT" ] || $CLI quantize --calib "$CORPUS" --num-samples 256 --calib-batch-size 64 --output "$QUANT" "${MODEL[@]}" 2>&1 | tail -1
  PRECS="fp16 fp8"
fi
for prec in $PRECS; do
  extra=(); [ "$prec" = fp8 ] && extra=(--quantized "$QUANT")
  for rep in $(seq "$REPS"); do for p in $PROCS; do
    rm -rf "$W/idx"
    $CLI index "$CORPUS" --index-dir "$W/idx" --precision "$prec" --batch-size 256 --workers 16 --no-progress \
      --read-processes "$p" --summary-json "$OUT/$prec-p$p-r$rep.json" "${MODEL[@]}" "${extra[@]}" > /dev/null 2>&1 || echo "run failed: $prec $p"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], 'read-processes', sys.argv[3], 'img/s', round(d['indexed']/d['total_seconds']), {k: round(v, 2) for k, v in d['stage_seconds'].items() if ':' not in k})" \
      "$OUT/$prec-p$p-r$rep.json" "$prec" "$p"
  done; done
done
# The device preprocessing of one 256-image batch (500x375 -> 224x224), torch's antialiased kernels
# vs the matrix products (`gpu_transform.preprocess_groups(matmul=...)`), GPU time per batch.
python3 - "$CORPUS" <<'PY'
import glob, sys
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from clipfp8.indexing.gpu_transform import TransformSpec, preprocess_groups, stack_by_size
files = sorted(glob.glob(f"{sys.argv[1]}/**/*.jpg", recursive=True))[:256]
raw = [torch.frombuffer(bytearray(open(f, "rb").read()), dtype=torch.uint8) for f in files]
groups = stack_by_size(decode_jpeg(raw, mode=ImageReadMode.RGB, device="cuda"))
spec = TransformSpec("shortest", (224,), (224, 224), "bicubic", (0.48145466, 0.4578275, 0.40821073),
                     (0.26862954, 0.26130258, 0.27577711))
for matmul in (False, True, False, True):
    for _ in range(3):
        preprocess_groups(groups, len(files), spec, matmul=matmul)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(); start.record()
    for _ in range(20):
        preprocess_groups(groups, len(files), spec, matmul=matmul)
    end.record(); torch.cuda.synchronize()
    print(f"preprocess_groups matmul={matmul}: {start.elapsed_time(end) / 20:.2f} ms GPU per {len(files)} images")
PY
