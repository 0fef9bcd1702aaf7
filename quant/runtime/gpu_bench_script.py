"""The device-machine entry point of the encoder-only tower table (``clipfp8 bench-towers``):
environment facts, then ``run_bench`` on ViT-L/14. The shipped-path benchmark is ``clipfp8 bench``
(``scripts/device_bench.sh``).

Usage (on the GPU machine): ``python -m clipfp8.quant.runtime.gpu_bench_script OUT_DIR [--quick]``.
Writes OUT_DIR/bench_towers.json, OUT_DIR/bench_h200.png and OUT_DIR/bench_towers.md.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    import torch

    from clipfp8.quant.core.fileio import atomic_write_text
    from clipfp8.quant.runtime.bench import BenchConfig, run_bench
    from clipfp8.quant.runtime.bench_report import markdown, plot, write_json_atomic

    out = Path(argv[0]) if argv else Path("artifacts")
    quick = "--quick" in argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0),
          torch.cuda.get_device_capability(0), flush=True)
    t0 = time.time()
    cfg = BenchConfig(model="ViT-L-14",
                      batch_sizes=(256, 1, 8, 64, 1024) if quick else (1, 8, 32, 64, 128, 256, 512, 1024),
                      min_time_s=0.4 if quick else 0.6)
    cmd = "python -m clipfp8.quant.runtime.gpu_bench_script $OUT" + (" --quick" if quick else "")
    result = run_bench(cfg, command=cmd, progress=lambda s: print(f"[{time.time() - t0:6.1f}s] {s}", flush=True),
                       save=lambda r: write_json_atomic(r, out / "bench_towers.json"))
    result["meta"]["wall_s"] = time.time() - t0
    write_json_atomic(result, out / "bench_towers.json")
    plot(result, out / "bench_h200.png")
    md = markdown(result)
    atomic_write_text(out / "bench_towers.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
