"""The host side of the GPU indexing path, on any machine: the shipped ``index_corpus`` with
``decode="gpu"`` on the CPU, over tiny JPEGs, with a cheap deterministic 768-d encoder, so that what
is timed is the per-file and per-commit work of the process that feeds a GPU (reading, hashing,
header checks, batching, the device-path bookkeeping, rows and FAISS commits), not a model.

Usage:
    python benchmarks/bench_index_host.py                          # 20,000 files, 3 runs
    python benchmarks/bench_index_host.py --count 20000 --runs 3 --commit-interval 10

``--commit-interval`` is ``clipfp8 index``'s (the CLI's default, 10 s). The corpus (16x16 JPEGs in
folders of 1,000) is written once under ``--work`` and reused. Prints one JSON line per run:
images/s of the pass and its stage seconds (``IndexSummary.stage_seconds``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def make_encoder() -> Any:
    """A ``FakeEncoder`` (768-d, 16x16 input) with an open_clip-style eval transform, which the GPU
    path recognises (``gpu_transform.transform_spec``) and runs with torch on the CPU."""
    from torchvision import transforms as T

    from clipfp8.quant.core.testing import FakeEncoder

    class HostEncoder(FakeEncoder):
        def __init__(self) -> None:
            super().__init__(dim=768, size=16)

        @property
        def preprocess_transform(self) -> T.Compose:
            return T.Compose([T.Resize(16, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(16),
                              T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))])

        def preprocess(self, image: Any) -> torch.Tensor:
            return self.preprocess_transform(image.convert("RGB"))

    return HostEncoder()


def write_corpus(root: Path, count: int) -> None:
    from PIL import Image

    if root.is_dir() and sum(1 for _ in root.rglob("*.jpg")) == count:
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:06d}.jpg", quality=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--commit-interval", type=float, default=10.0)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "clipfp8-bench-index-host")
    args = ap.parse_args()
    from clipfp8.indexing.config import IndexConfig
    from clipfp8.indexing.pipeline import index_corpus

    write_corpus(args.work / "corpus", args.count)
    cfg = IndexConfig(batch_size=args.batch_size, workers=args.workers, decode="gpu",
                      commit_interval_s=args.commit_interval)
    for _ in range(args.runs):
        shutil.rmtree(args.work / "index", ignore_errors=True)
        s = index_corpus(args.work / "corpus", args.work / "index", [make_encoder()], config=cfg)
        print(json.dumps({"img_per_s": round(s.indexed / s.total_seconds), "indexed": s.indexed,
                          "seconds": round(s.total_seconds, 2),
                          "stages": {k: round(v, 2) for k, v in s.stage_seconds.items()}}), flush=True)


if __name__ == "__main__":
    main()
