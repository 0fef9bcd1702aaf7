"""The benchmark's inputs: a folder of photo-like JPEGs, made fast, and a model checkpoint.

JPEGs: a few dozen distinct base pictures (smooth colour fields plus mid-frequency structure,
seeded) each written many times with a different shift of a Gaussian noise field, so every file
has its own content (and hash) and compresses like a photo (about 75 KB at 500 x 375, quality
90). Written by a pool of processes, a contiguous chunk each: 32,768 files take well under a
minute on 16 cores.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Distinct base pictures per worker and noise fields; files cycle through them.
BASES, NOISES = 48, 4
#: Noise amplitude (grey levels, standard deviation) and JPEG quality: ~75 KB at 500 x 375.
NOISE_STD, QUALITY = 12.0, 90


@dataclass(frozen=True)
class JpegSet:
    """What ``write_jpegs`` made: ``count`` files of ``size`` (W, H) in ``folder``."""

    folder: Path
    count: int
    size: tuple[int, int]
    mean_bytes: float
    seconds: float
    workers: int

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "width": self.size[0], "height": self.size[1],
                "mean_kib": round(self.mean_bytes / 1024, 1), "seconds": round(self.seconds, 2),
                "workers": self.workers}


def parse_size(text: str) -> tuple[int, int]:
    """``--jpeg-size`` ``WxH`` -> (W, H); ``ValueError`` naming the flag otherwise."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--jpeg-size must be WIDTHxHEIGHT, e.g. 500x375, got {text!r}") from None
    if not (16 <= w <= 8192 and 16 <= h <= 8192):
        raise ValueError(f"--jpeg-size sides must lie in 16..8192, got {text!r}")
    return w, h


def _bases(size: tuple[int, int], seed: int) -> list[np.ndarray]:
    from PIL import Image

    w, h = size
    out = []
    for i in range(BASES):
        rng = np.random.default_rng(seed * 1000 + i)
        low = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
        mid = Image.fromarray(rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8))
        mid = mid.resize(size, Image.Resampling.BICUBIC)
        out.append(0.6 * np.asarray(low, np.float32) + 0.4 * np.asarray(mid, np.float32))
    return out


def _write_chunk(folder: str, start: int, stop: int, size: tuple[int, int]) -> int:
    """Write files ``start`` .. ``stop - 1``; returns their total bytes."""
    from PIL import Image

    bases = _bases(size, seed=start)
    noises = [np.random.default_rng(10_000 + start + i).normal(0, NOISE_STD, (size[1], size[0], 3)).astype(np.float32)
              for i in range(NOISES)]
    total = 0
    for i in range(start, stop):
        shift = ((i * 7) % size[1], (i * 13) % size[0])  # a different noise field per file
        pixels = bases[i % BASES] + np.roll(noises[(i // BASES) % NOISES], shift, axis=(0, 1))
        buf = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=QUALITY)
        data = buf.getvalue()
        sub = Path(folder) / f"{i // 1000:03d}"  # a thousand files per folder, as cameras do
        sub.mkdir(exist_ok=True)
        (sub / f"img_{i:06d}.jpg").write_bytes(data)
        total += len(data)
    return total


def write_jpegs(folder: Path, count: int, size: tuple[int, int], workers: int | None = None) -> JpegSet:
    """``count`` distinct photo-like JPEGs of ``size`` (W, H) under ``folder`` (in sub-folders of
    1,000), written by ``workers`` processes (default: every CPU)."""
    if count < 1:
        raise ValueError(f"--jpeg-count must be >= 1, got {count}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers or os.cpu_count() or 1, count // 64 or 1))
    step = -(-count // workers)
    chunks = [(str(folder), s, min(s + step, count), size) for s in range(0, count, step)]
    t0 = time.perf_counter()
    if workers == 1:
        total = sum(_write_chunk(*c) for c in chunks)
    else:
        # spawn: the caller may already hold a CUDA context, which forked children must not inherit
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            total = sum(pool.map(_write_chunk, *zip(*chunks, strict=True)))
    return JpegSet(folder, count, size, total / count, time.perf_counter() - t0, workers)


def random_checkpoint(name: str, path: Path, seed: int = 0) -> Path:
    """A seeded random-weight checkpoint of open_clip architecture ``name`` (speed does not depend
    on the weights), so every process of the benchmark loads the same model: ``--random-init``
    would draw new weights in each, and the index would refuse them as another model."""
    import torch
    from safetensors.torch import save_file

    from clipfp8.quant.core.config import ModelSpec
    from clipfp8.quant.core.models import load_model

    torch.manual_seed(seed)
    loaded = load_model(ModelSpec(name=name))
    state = {k: v.detach().contiguous().clone() for k, v in loaded.model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


__all__ = ["JpegSet", "write_jpegs", "parse_size", "random_checkpoint"]
