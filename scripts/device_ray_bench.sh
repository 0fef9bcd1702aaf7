#!/usr/bin/env bash
# Issue 16 on a lent GPU machine: `clipfp8 index --engine ray` beside `--engine local` through the
# shipped CLI, on the same generated JPEGs (N, default 32,768 of 500x375) and a seeded random
# ViT-L-14, per precision (PRECS, default "fp16 fp8"); the summaries and logs go to $OUT.
# Bring ray first: `bash scripts/device_ray_stage.sh receive` on one call per carried part
# each (see that script), then this with .whl carried (the wheels scripts/device_bench.sh names).
# Recorded in docs/benchmarks.md ("Ray Data on one H200") with docs/ray_h200.json.
set -o pipefail
bash scripts/device_ray_stage.sh install 2>&1 | tail -2 || exit 1
python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target /tmp/site . 2>/dev/null
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=/tmp/pyc
W=/tmp/rw; mkdir -p $W; T0=$(date +%s)
stamp() { echo "[$(( $(date +%s)-T0 ))s] $*"; }
python3 -c "
from pathlib import Path
from clipfp8.app.bench_corpus import write_jpegs, random_checkpoint
print(write_jpegs(Path('$W/corpus'), ${N:-32768}, (500, 375)).to_dict())
random_checkpoint('ViT-L-14', Path('$W/vitl.safetensors'))
" 2>&1 | grep -v "random weights\|No pretrained"
M="--model ViT-L-14 --checkpoint $W/vitl.safetensors --device cuda"
CLI="python3 -m clipfp8.app.cli"
stamp corpus
$CLI build-engine --precision fp16 --batch-size 256 $M 2>&1 | tail -1; stamp engine
for P in ${PRECS:-fp16 fp8}; do
  Q=""
  if [ $P = fp8 ]; then
    timeout 300 $CLI quantize --calib $W/corpus --num-samples 256 --calib-batch-size 64 --output $W/q $M 2>&1 | tail -2
    Q="--quantized $W/q"; stamp quantize
  fi
  for E in local ray; do
    timeout 200 $CLI index $W/corpus --index-dir $W/idx-$P-$E --precision $P --batch-size 256 --workers 16 \
      --no-progress --engine $E --summary-json $OUT/summary-$P-$E.json $M $Q > $OUT/index-$P-$E.log 2>&1
    echo "rc=$?"; tail -4 $OUT/index-$P-$E.log
    python3 -c "import json; d=json.load(open('$OUT/summary-$P-$E.json')); print('== $P $E', d['indexed'], round(d['images_per_second']), 'img/s', d['total_seconds'], d['warmup_seconds'], d['decoder'])" 2>&1 | tail -1
    stamp "$P $E"
  done
  python3 - <<PY 2>&1 | tail -3
import sqlite3
a, b = "$W/idx-$P-local", "$W/idx-$P-ray"
ra = sqlite3.connect(a + "/metadata.sqlite").execute("select id, path from images order by id").fetchall()
rb = sqlite3.connect(b + "/metadata.sqlite").execute("select id, path from images order by id").fetchall()
print("== same ids/paths:", ra == rb, len(ra))
PY
done
stamp done
