#!/usr/bin/env bash
# `clipfp8 bench` with issue 10's sizes on a CUDA machine (the lent H200: Python 3.12, torch
# preinstalled), writing the JSON, the Markdown table and the log to $OUT. About 7-9 minutes:
# 32,768 JPEGs of 500x375, ViT-L-14 (seeded random weights), quantize + compiled engines, index in
# fp16 and fp8 end to end, encoder-only, cold and warm search over 1M vectors. The JSON is
# rewritten after every step, so a run cut short keeps what it measured.
#
# On a machine with the project installed (scripts/setup.sh) run the `clipfp8 bench` line alone.
# On a bare GPU image, put the Python 3.12 wheels of the packages it lacks in .whl/ first
# (ignored by git), e.g. from a machine with PyPI access:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl nvidia-modelopt==0.47.0 open_clip_torch==3.3.0 ftfy wcwidth omegaconf pulp pydantic \
#     pydantic-core annotated-types typing-inspection faiss-cpu sqlite-utils sqlite-fts4 click-default-group
#   (antlr4-python3-runtime==4.9.3, needed by omegaconf, is an sdist: `pip wheel` it into .whl/)
# gradio is not carried (too large for the 64 MiB working tree): the `serve` step then records
# "skipped"; measure it where the project is installed (`clipfp8 bench` runs it by default).
set -o pipefail
OUT=${OUT:-/tmp/clipfp8-bench-out}
WORK=${WORK:-/tmp/clipfp8-bench-work}
mkdir -p "$OUT"
# shellcheck source=scripts/device_env.sh
source scripts/device_env.sh
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
  nproc
  git rev-parse HEAD 2>/dev/null || true
} | tee "$OUT/env.txt"
# 540 s: the run tool allows 600 per command; SIGINT lets the last JSON write finish.
timeout --signal=INT "${BENCH_TIMEOUT:-540}" python3 -m clipfp8.app.cli bench --model ViT-L-14 --jpeg-count 32768 --jpeg-size 500x375 \
  --search-rows 1000000 --cold-runs 2 --work-dir "$WORK" \
  --out "$OUT/bench_h200.json" --markdown "$OUT/bench_h200.md" 2>&1 | tee "$OUT/bench.log"
