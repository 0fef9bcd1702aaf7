"""Build the compact training pack carried to the GPU machine (one 64 MiB transfer, with the repo).

Layout of ``out_dir`` (all written atomically):

* ``images32-0.jpg`` -- CIFAR-10 train, 32x32 tiles of one JPEG mosaic (pixels kept; one big JPEG
  amortises the per-file header that dominates 32x32 files).
* ``images64-<i>.webp`` (or ``.jpg``) -- every other source (classes, clip art, captioned photos),
  shortest side resized to ``size`` and centre-cropped (the geometry of the eval transform),
  ``size`` x ``size`` tiles in as few mosaics as the format allows (WebP: 16383 px a side).
* ``pack.npz`` -- ``group32``/``group64`` int32 (N,) group ids, ``source32``/``source64`` int8 (N,),
  ``cap_offsets`` int32 (G+1,) + ``cap_ids`` int32: each group's caption ids (Flickr8k photos: all
  five captions), ``feats`` int8 (C, k) + ``feat_scale`` float32 (C,) + ``text_basis`` float32
  (384, k): every distinct caption's MiniLM feature as row-quantised coefficients on a PCA basis
  (``quant.train.textfeats``).
* ``pack.json`` -- sources, counts, file names and sizes, model config, settings.
* ``eval.npz`` / ``eval32.jpg`` / ``eval64.<ext>`` (optional) -- a compact copy of the evaluation
  sets for the quick GPU-side eval (the reference numbers come from ``clipfp8 train-eval``, i.e.
  ``quant.eval``, on the original files).

Beside the folder (not carried): ``<out_dir>-captions.json.gz`` with the group names and caption
texts, for inspection.
"""
from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipfp8.quant.core.fileio import atomic_write_bytes, atomic_write_text
from clipfp8.quant.train.data import (
    MOSAIC_FORMATS,
    SOURCES,
    CaptionTable,
    TrainDataError,
    decode_square,
    group_of,
    iter_shards,
    load_mosaics,
    read_json_object,
    save_mosaics,
    save_npz,
)
from clipfp8.quant.train.evaluate import build_eval_pack
from clipfp8.quant.train.model import TEXT_FEATURE_DIM, default_model_cfg
from clipfp8.quant.train.textfeats import caption_features, compress_features, energy_kept, fit_text_basis

log = logging.getLogger(__name__)

Progress = Callable[[str, int], None]
#: What one device call may carry in all (the repository's tracked files included).
TRANSFER_MIB = 64


@dataclass(frozen=True)
class PrepConfig:
    """Where the shards are, where the pack goes, how its images and captions are stored."""

    data_root: Path = Path("../shared/data")
    out_dir: Path = Path(".carry/pack")
    size: int = 64  # tile side of every source but CIFAR (the model's input size)
    jpeg_quality: int = 65  # CIFAR's 32x32 JPEG mosaic (its source JPEGs are q75-like: 34 dB PSNR here)
    image_format: str = "webp"  # the size-px mosaics: WebP is ~25% smaller than JPEG at equal PSNR
    quality: int = 45  # ... and their quality (~29-30 dB PSNR at 64 px, like JPEG q65-70)
    text_dims: int = 80  # PCA coefficients carried per caption (384 = the whole feature)
    text_cache: Path | None = None  # .npz reused across builds (MiniLM on 2 cores: ~110 captions/s)
    max_per_source: int | None = None  # None = every sample (smoke runs keep a few)
    with_eval: bool = True
    # GPU-side eval copy sizes (subsets, to fit the transfer; the reference eval reads the files)
    eval_cifar: int = 1000
    eval_imagenette: int = 1000
    eval_flickr: int = 1000  # all of flickr8k-1k: its quick R@5 is the target metric's
    sources: tuple[str, ...] = SOURCES
    model_cfg: dict[str, Any] = field(default_factory=default_model_cfg)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_root", Path(self.data_root))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.text_cache is not None:
            object.__setattr__(self, "text_cache", Path(self.text_cache))
        object.__setattr__(self, "sources", tuple(self.sources))
        if not 16 <= self.size <= 256:
            raise ValueError(f"PrepConfig.size must be in [16, 256], got {self.size}")
        for name in ("jpeg_quality", "quality"):
            if not 1 <= getattr(self, name) <= 100:
                raise ValueError(f"PrepConfig.{name} must be in [1, 100], got {getattr(self, name)}")
        if self.image_format not in MOSAIC_FORMATS:
            raise ValueError(f"PrepConfig.image_format must be one of {sorted(MOSAIC_FORMATS)}, "
                             f"got {self.image_format!r}")
        if not 1 <= self.text_dims <= TEXT_FEATURE_DIM:
            raise ValueError(f"PrepConfig.text_dims must be in [1, {TEXT_FEATURE_DIM}], got {self.text_dims}")
        if self.max_per_source is not None and self.max_per_source < 1:
            raise ValueError(f"PrepConfig.max_per_source must be >= 1, got {self.max_per_source}")
        unknown = set(self.sources) - set(SOURCES)
        if unknown or not self.sources:
            raise ValueError(f"PrepConfig.sources: unknown {sorted(unknown)} or none given; known {SOURCES}")


def collect_training_images(cfg: PrepConfig, table: CaptionTable,
                            progress: Progress | None = None) -> dict[str, list]:
    """Decode every kept sample: CIFAR stays 32x32, the rest become ``cfg.size`` squares. A photo
    without a usable caption is skipped (and counted in ``skipped``)."""
    out: dict[str, list] = {"img32": [], "group32": [], "source32": [], "img64": [], "group64": [], "source64": [],
                            "skipped": []}
    root = cfg.data_root / "train"
    for si, source in enumerate(cfg.sources):
        n = 0
        for sample in iter_shards(root, source):
            group, captions = group_of(source, sample.key, sample.meta, sample.text)
            if not captions:
                out["skipped"].append(f"{source}/{sample.key}")
                continue
            gid = table.add(group, captions)
            small = source == "cifar10-train"
            img = decode_square(sample.jpeg, None if small else cfg.size)
            if small and img.shape != (32, 32, 3):
                raise TrainDataError(f"{source}: expected 32x32 images, got {img.shape} ({sample.key})")
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
    if out["skipped"]:
        log.warning("%d samples without a usable caption skipped (first: %s)", len(out["skipped"]),
                    out["skipped"][0])
    return out


def captions_index_path(out_dir: Path) -> Path:
    """The inspection file written beside the pack folder (not carried): group names, captions."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + "-captions.json.gz")


def _write_images(cfg: PrepConfig, imgs: dict[str, list]) -> tuple[dict[str, list[str]], dict[str, int]]:
    """The two mosaic pools -> ({"files32": [...], "files64": [...]}, {file: bytes})."""
    files: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for key, s, fmt, q in (("32", 32, "jpeg", cfg.jpeg_quality), ("64", cfg.size, cfg.image_format, cfg.quality)):
        arr = np.stack(imgs["img" + key]) if imgs["img" + key] else np.zeros((0, s, s, 3), np.uint8)
        written = save_mosaics(arr, cfg.out_dir, f"images{key}", fmt, q) if len(arr) else {}
        files["files" + key] = list(written)
        sizes.update(written)
    return files, sizes


def _caption_arrays(cfg: PrepConfig, table: CaptionTable,
                    progress: Progress | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """MiniLM features of every caption -> the pack's feature arrays + a summary of the PCA."""
    feats = caption_features(table.captions, cfg.model_cfg, cfg.text_cache,
                             progress=(lambda n: progress("captions", n)) if progress else None)
    basis = fit_text_basis(feats, cfg.text_dims)
    q, scale = compress_features(feats, basis)
    offsets, ids = table.csr()
    arrays = {"cap_offsets": offsets, "cap_ids": ids, "feats": q.numpy(), "feat_scale": scale.numpy(),
              "text_basis": basis.numpy()}
    return arrays, {"text_dims": int(basis.shape[1]), "text_energy_kept": round(energy_kept(feats, basis), 4)}


def build_pack(cfg: PrepConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Write the training pack (and the eval copy) into ``cfg.out_dir``; returns the summary
    (counts, file sizes, ``pack_mib``: the folder's total)."""
    if not (cfg.data_root / "train").is_dir():
        raise TrainDataError(f"training shards not found: {cfg.data_root / 'train'}")
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    table = CaptionTable()
    imgs = collect_training_images(cfg, table, progress)
    files, sizes = _write_images(cfg, imgs)
    cap_arrays, text_summary = _caption_arrays(cfg, table, progress)
    save_npz(cfg.out_dir / "pack.npz", compressed=True, group32=np.array(imgs["group32"], np.int32),
             group64=np.array(imgs["group64"], np.int32), source32=np.array(imgs["source32"], np.int8),
             source64=np.array(imgs["source64"], np.int8), **cap_arrays)
    sources = imgs["source32"] + imgs["source64"]
    summary = {"sources": list(cfg.sources), "n32": len(imgs["group32"]), "n64": len(imgs["group64"]),
               "size": cfg.size, "n_groups": len(table.groups), "n_captions": len(table.captions),
               "per_source": {s: sources.count(i) for i, s in enumerate(cfg.sources)},
               "skipped_without_caption": len(imgs["skipped"]), **files, "image_format": cfg.image_format,
               "file_bytes": sizes, **text_summary, "model_cfg": cfg.model_cfg,
               "settings": {k: str(v) for k, v in asdict(cfg).items() if k != "model_cfg"}}
    atomic_write_text(cfg.out_dir / "pack.json", json.dumps(summary))
    atomic_write_bytes(captions_index_path(cfg.out_dir),
                       gzip.compress(json.dumps({"groups": table.groups, "captions": table.captions}).encode(),
                                     mtime=0))
    if cfg.with_eval:
        summary["eval"] = build_eval_pack(cfg.data_root / "eval", cfg.out_dir, cfg.model_cfg, size=cfg.size,
                                          quality=cfg.quality, image_format=cfg.image_format,
                                          cifar_quality=cfg.jpeg_quality, basis=torch.from_numpy(cap_arrays["text_basis"]),
                                          n_cifar=cfg.eval_cifar, n_imagenette=cfg.eval_imagenette,
                                          n_flickr=cfg.eval_flickr, limit=cfg.max_per_source,
                                          text_cache=cfg.text_cache)
    summary["pack_mib"] = round(sum(f.stat().st_size for f in cfg.out_dir.iterdir() if f.is_file()) / 2**20, 2)
    return summary


#: What ``load_pack`` (and training) needs from ``pack.json`` and ``pack.npz``.
PACK_META_KEYS: tuple[str, ...] = ("sources", "n32", "n64", "size", "model_cfg", "n_groups", "n_captions",
                                   "per_source", "files32", "files64")
PACK_ARRAY_KEYS: tuple[str, ...] = ("group32", "group64", "source32", "source64", "cap_offsets", "cap_ids",
                                    "feats", "feat_scale", "text_basis")
_REBUILD = "rebuild the pack with `clipfp8 train-prep`"


def load_pack(pack_dir: Path) -> dict[str, Any]:
    """Read a pack back: uint8 arrays (N, 3, S, S) ``img32``/``img64``, the npz arrays, the json
    (under ``meta``).

    Raises ``TrainDataError`` naming the file when a pack file is missing or unreadable, or when
    ``pack.json``/``pack.npz`` lacks a key."""
    pack_dir = Path(pack_dir)
    meta_file, npz_file = pack_dir / "pack.json", pack_dir / "pack.npz"
    for f in (meta_file, npz_file):
        if not f.is_file():
            raise TrainDataError(f"training pack file not found: {f} (build it with `clipfp8 train-prep`)")
    meta = read_json_object(meta_file, PACK_META_KEYS, _REBUILD)
    try:
        with np.load(npz_file) as z:
            arrays: dict[str, Any] = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise TrainDataError(f"{npz_file}: not a readable .npz ({type(e).__name__}: {e})") from e
    for key in PACK_ARRAY_KEYS:
        if key not in arrays:
            raise TrainDataError(f"{npz_file}: missing array {key!r} ({_REBUILD})")
    for key, s in (("32", 32), ("64", int(meta["size"]))):
        tiles = load_mosaics([pack_dir / f for f in meta["files" + key]], int(meta["n" + key]), s)
        arrays["img" + key] = np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))
    arrays["meta"] = meta
    return arrays


def feats_tensor(pack: dict[str, Any]) -> torch.Tensor:
    """float32 (C, 384) caption features from the pack's int8 PCA coefficients."""
    from clipfp8.quant.train.textfeats import expand_features

    return expand_features(torch.from_numpy(pack["feats"]), torch.from_numpy(pack["feat_scale"]),
                           torch.from_numpy(pack["text_basis"]))
