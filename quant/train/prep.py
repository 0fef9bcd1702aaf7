"""Build the compact training pack carried to the GPU machine (at most 64 MiB per call).

Layout of ``out_dir`` (all written atomically):

* ``images32.jpg`` -- CIFAR-10 train, 32x32 tiles of one JPEG mosaic (pixels kept; one big JPEG
  amortises the per-file header that dominates 32x32 files).
* ``images64.jpg`` -- every other source, shortest side resized to 64 and centre-cropped (the
  geometry of the eval transform), 64x64 tiles.
* ``pack.npz`` -- ``group32``/``group64`` int32 (N,) group ids, ``source32``/``source64`` int8 (N,),
  ``group_captions`` int32 (G, T), ``feats`` int8 (C, 384) + ``feat_scale`` float32 (C,): the
  MiniLM mean-pooled feature of every distinct caption, row-quantised.
* ``pack.json`` -- sources, counts, group names, captions, model config, settings.
* ``eval.npz`` / ``eval32.jpg`` / ``eval64.jpg`` (optional) -- a compact copy of the evaluation sets
  for the quick GPU-side eval (the reference numbers come from ``clipfp8 train-eval``, i.e.
  ``quant.eval``, on the original files).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipfp8.quant.core.fileio import atomic_write_text
from clipfp8.quant.train.data import (
    SOURCES,
    CaptionTable,
    TrainDataError,
    decode_square,
    group_of,
    iter_shards,
    mosaic,
    save_jpeg,
    save_npz,
)
from clipfp8.quant.train.evaluate import build_eval_pack
from clipfp8.quant.train.model import default_model_cfg, quantize_rows_int8, text_features

log = logging.getLogger(__name__)

Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class PrepConfig:
    """Where the shards are, where the pack goes, and how much of each source to keep."""

    data_root: Path = Path("../shared/data")
    out_dir: Path = Path(".carry/pack")
    size: int = 64
    jpeg_quality: int = 90  # CIFAR 32x32 mosaic
    jpeg_quality64: int = 85  # the 64x64 mosaic (the pack must fit the 64 MiB transfer)
    max_per_source: int | None = None  # None = every sample (smoke runs keep a few)
    with_eval: bool = True
    # GPU-side eval copy sizes (subsets, to fit the transfer; the reference eval reads the files)
    eval_cifar: int = 2000
    eval_imagenette: int = 1000
    eval_flickr: int = 250
    sources: tuple[str, ...] = SOURCES
    model_cfg: dict[str, Any] = field(default_factory=default_model_cfg)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_root", Path(self.data_root))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if not 16 <= self.size <= 256:
            raise ValueError(f"PrepConfig.size must be in [16, 256], got {self.size}")
        if not 50 <= self.jpeg_quality <= 100:
            raise ValueError(f"PrepConfig.jpeg_quality must be in [50, 100], got {self.jpeg_quality}")
        if self.max_per_source is not None and self.max_per_source < 1:
            raise ValueError(f"PrepConfig.max_per_source must be >= 1, got {self.max_per_source}")
        unknown = set(self.sources) - set(SOURCES)
        if unknown:
            raise ValueError(f"PrepConfig.sources: unknown {sorted(unknown)}; known {SOURCES}")


def collect_training_images(cfg: PrepConfig, table: CaptionTable,
                            progress: Progress | None = None) -> dict[str, list]:
    """Decode every kept sample: CIFAR stays 32x32, the rest become ``cfg.size`` squares."""
    out: dict[str, list] = {"img32": [], "group32": [], "source32": [], "img64": [], "group64": [], "source64": []}
    root = cfg.data_root / "train"
    for si, source in enumerate(cfg.sources):
        n = 0
        for jpeg, text, meta in iter_shards(root, source):
            group, captions = group_of(source, meta, text)
            gid = table.add(group, captions)
            small = source == "cifar10-train"
            img = decode_square(jpeg, None if small else cfg.size)
            if small and img.shape != (32, 32, 3):
                raise TrainDataError(f"{source}: expected 32x32 images, got {img.shape}")
            key = "32" if small else "64"
            out["img" + key].append(img)
            out["group" + key].append(gid)
            out["source" + key].append(si)
            n += 1
            if progress:
                progress(source, 1)
            if cfg.max_per_source and n >= cfg.max_per_source:
                break
        log.info("%s: %d samples", source, n)
    return out


def build_pack(cfg: PrepConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Write the training pack (and the eval copy) into ``cfg.out_dir``; returns the summary."""
    if not (cfg.data_root / "train").is_dir():
        raise TrainDataError(f"training shards not found: {cfg.data_root / 'train'}")
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    table = CaptionTable()
    imgs = collect_training_images(cfg, table, progress)
    sizes = {}
    for key, s in (("32", 32), ("64", cfg.size)):
        arr = np.stack(imgs["img" + key]) if imgs["img" + key] else np.zeros((0, s, s, 3), np.uint8)
        if len(arr):
            sizes[f"images{key}.jpg"] = save_jpeg(mosaic(arr, 256 if s == 32 else 128), cfg.out_dir / f"images{key}.jpg",
                                                   cfg.jpeg_quality if s == 32 else cfg.jpeg_quality64)
    feats = text_features(table.captions, cfg.model_cfg,
                          progress=(lambda n: progress("captions", n)) if progress else None)
    q, scale = quantize_rows_int8(feats)
    save_npz(cfg.out_dir / "pack.npz", group32=np.array(imgs["group32"], np.int32),
              group64=np.array(imgs["group64"], np.int32), source32=np.array(imgs["source32"], np.int8),
              source64=np.array(imgs["source64"], np.int8), group_captions=table.padded(),
              feats=q.numpy(), feat_scale=scale.numpy())
    summary = {"sources": list(cfg.sources), "n32": len(imgs["group32"]), "n64": len(imgs["group64"]),
               "size": cfg.size, "n_groups": len(table.groups), "n_captions": len(table.captions),
               "per_source": {s: int(sum(1 for x in imgs["source32"] + imgs["source64"] if x == i))
                              for i, s in enumerate(cfg.sources)},
               "jpeg_bytes": sizes, "model_cfg": cfg.model_cfg,
               "settings": {k: str(v) for k, v in asdict(cfg).items() if k != "model_cfg"},
               "groups": table.groups, "captions": table.captions}
    atomic_write_text(cfg.out_dir / "pack.json", json.dumps(summary))
    if cfg.with_eval:

        summary["eval"] = build_eval_pack(cfg.data_root / "eval", cfg.out_dir, cfg.model_cfg,
                                          size=cfg.size, quality=cfg.jpeg_quality64, n_cifar=cfg.eval_cifar,
                                          n_imagenette=cfg.eval_imagenette, n_flickr=cfg.eval_flickr,
                                          limit=cfg.max_per_source)
    return {k: v for k, v in summary.items() if k not in ("groups", "captions")}


#: What ``load_pack`` (and training) needs from ``pack.json`` and ``pack.npz``.
PACK_META_KEYS: tuple[str, ...] = ("sources", "n32", "n64", "size", "model_cfg", "n_groups", "n_captions",
                                   "per_source")
PACK_ARRAY_KEYS: tuple[str, ...] = ("group32", "group64", "source32", "source64", "group_captions", "feats",
                                    "feat_scale")


def load_pack(pack_dir: Path) -> dict[str, Any]:
    """Read a pack back: uint8 arrays (N, 3, S, S) ``img32``/``img64``, the npz arrays, the json.

    Raises ``TrainDataError`` naming the file when a pack file is missing or unreadable, or when
    ``pack.json``/``pack.npz`` lacks a key."""
    from PIL import Image

    from clipfp8.quant.train.data import read_json_object, unmosaic

    pack_dir = Path(pack_dir)
    meta_file, npz_file = pack_dir / "pack.json", pack_dir / "pack.npz"
    for f in (meta_file, npz_file):
        if not f.is_file():
            raise TrainDataError(f"training pack file not found: {f} (build it with `clipfp8 train-prep`)")
    meta = read_json_object(meta_file, tuple(PACK_META_KEYS), "rebuild the pack with `clipfp8 train-prep`")
    try:
        with np.load(npz_file) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise TrainDataError(f"{npz_file}: not a readable .npz ({type(e).__name__}: {e})") from e
    for key in PACK_ARRAY_KEYS:
        if key not in arrays:
            raise TrainDataError(f"{npz_file}: missing array {key!r} (rebuild the pack with `clipfp8 train-prep`)")
    for key, s, n in (("32", 32, meta["n32"]), ("64", meta["size"], meta["n64"])):
        f = pack_dir / f"images{key}.jpg"
        if n:
            if not f.is_file():
                raise TrainDataError(f"training pack file not found: {f} ({meta_file} lists {n} images)")
            try:
                grid = np.asarray(Image.open(f).convert("RGB"))
            except OSError as e:
                raise TrainDataError(f"{f}: not a readable JPEG ({e})") from e
            if (grid.shape[0] // s) * (grid.shape[1] // s) < n:
                raise TrainDataError(f"{f}: {grid.shape[1]}x{grid.shape[0]} mosaic holds fewer than the "
                                     f"{n} {s}x{s} tiles {meta_file} lists")
            arrays["img" + key] = np.ascontiguousarray(unmosaic(grid, n, s).transpose(0, 3, 1, 2))
        else:
            arrays["img" + key] = np.zeros((0, 3, s, s), np.uint8)
    arrays["meta"] = meta
    return arrays


def feats_tensor(pack: dict[str, Any]) -> torch.Tensor:
    """float32 (C, 384) caption features from the pack's int8 rows."""
    from clipfp8.quant.train.model import dequantize_rows_int8

    return dequantize_rows_int8(torch.from_numpy(pack["feats"]), torch.from_numpy(pack["feat_scale"]))
