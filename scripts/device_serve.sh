#!/usr/bin/env bash
# `clipfp8 serve` on the lent H200, on the fp16 index a `scripts/device_bench.sh` run left in its
# work folder: seconds until the page answers, then two queries as a browser makes them
# (`app.bench_search.time_serve`, the bench's own `serve` step), RUNS fresh processes (default 2).
# For when gradio did not travel with the bench (its wheels and the bench's do not fit in one
# call's 64 MiB): carry gradio's Python 3.12 wheels in a folder named by GRADIO_WHEELS (ignored by
# git) in the next call, while the machine is still warm, so the work folder is still there
# (GRADIO_WHEELS=".gwA .gwB": gradio's wheels split over two calls' carries).
set -o pipefail
OUT=${OUT:-/tmp/clipfp8-serve-out}; WORK=${WORK:-/tmp/clipfp8-bench-work}; mkdir -p "$OUT"
if [ -n "${GRADIO_WHEELS:-}" ]; then  # one folder, or several separated by spaces (parts of calls)
  wheels=(); for d in $GRADIO_WHEELS; do wheels+=("$d"/*.whl); done
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" || exit 1
fi
# shellcheck source=scripts/device_env.sh
source scripts/device_env.sh
python3 - "$WORK/index-fp16" "$OUT/serve_h200.json" "${RUNS:-2}" <<'PY'
import json, sys
from pathlib import Path
from clipfp8.app.bench_search import time_serve
from clipfp8.app.bench import portable
work = str(Path(sys.argv[1]).parent)
runs = [time_serve(Path(sys.argv[1]), "FP16", ["--device", "cuda"]) for _ in range(int(sys.argv[3]))]
for r in runs:
    print(json.dumps(r))
out = portable({"index": sys.argv[1], "runs": runs}, {work: "$WORK"})  # no machine paths in the JSON
Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
PY
