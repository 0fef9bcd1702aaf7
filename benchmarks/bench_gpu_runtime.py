"""Encoder-only GPU benchmark of the FP8 runtime (issue 6): FP16 eager / FP16 compiled / FP8 /
FP8-exact, both towers of an open_clip architecture with random weights (FP8 from the product's
PTQ config). Prints the Markdown tables; writes JSON + PNG.

    python benchmarks/bench_gpu_runtime.py OUT_DIR [--quick]

(the same as ``python -m clipfp8.quant.runtime.gpu_bench_script``; ``clipfp8 bench-towers`` exposes
every knob). The end-to-end figures of the shipped paths come from ``clipfp8 bench``.
"""
from __future__ import annotations

import sys

from clipfp8.quant.runtime.gpu_bench_script import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
