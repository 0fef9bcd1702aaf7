"""Calibration data: image-text pairs from a folder or webdataset shards, batched for both CLIP towers.

``folder`` is a folder of image files, or -- when it holds none -- webdataset shards (a shard
file, or a folder with shards at any depth, e.g. ``../shared/data/train``): each sample is
``KEY.<image>`` with its caption from ``KEY.json`` (``"captions"`` list or ``"caption"``), else
``KEY.txt`` -- a class name when the sample is labelled (``KEY.json`` ``"label"``/``"class"``),
which becomes a prompt -- else a prompt from the key. Shards are read twice: once for keys and
captions, once for the sampled images only. For image files, captions come from an optional file read leniently by ``quant.core.captions.read_captions`` --
JSON ``{"file": ["caption", ...] | "caption"}`` or CSV ``image,caption`` (several rows per image
allowed; the header may be left out) -- keyed by the path relative to the folder or by the bare
file name. Images without a caption get a prompt built from their class folder
name (``cats/001.jpg`` -> "a photo of a cats.") or, at the top level, from the file name.
Sampling is deterministic: a seeded ``random.Random`` picks the files and the captions.
"""
from __future__ import annotations

import io
import logging
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipfp8.quant.core.captions import read_captions
from clipfp8.quant.core.config import IMAGE_EXTS
from clipfp8.quant.core.errors import CalibrationDataError, DatasetError
from clipfp8.quant.core.shards import (
    IMAGE_PARTS,
    image_part,
    is_shard,
    iter_samples,
    list_shards,
    sample_captions,
    sample_meta,
)

log = logging.getLogger(__name__)

PROMPT = "a photo of a {name}."


def default_sizes(device: str) -> tuple[int, int]:
    """(num_samples, batch_size) defaults: 8192/512 on a GPU, 256/32 on a CPU."""
    return (8192, 512) if str(device).startswith("cuda") else (256, 32)


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration pairs come from and how many; ``None`` sizes mean ``default_sizes``."""

    folder: Path
    captions: Path | None = None
    num_samples: int | None = None
    batch_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))
        if self.captions is not None:
            object.__setattr__(self, "captions", Path(self.captions))
        for key in ("num_samples", "batch_size"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ValueError(f"CalibConfig.{key} must be >= 1, got {v}")


def _holds_images(folder: Path) -> bool:
    """Whether ``folder`` is a folder with image files (else it may hold shards); a missing path
    counts as one, so ``find_images`` reports it."""
    if not folder.is_dir():
        return not is_shard(folder)
    return any(p.is_file() and p.suffix.lower() in IMAGE_EXTS for p in folder.rglob("*"))


def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted). Raises ``CalibrationDataError`` when
    the folder is missing, not a folder, or holds no image file."""
    folder = Path(folder)
    if not folder.exists():
        raise CalibrationDataError(f"calibration folder not found: {folder}")
    if not folder.is_dir():
        raise CalibrationDataError(f"calibration path is not a folder: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        exts = ", ".join(sorted(IMAGE_EXTS))
        raise CalibrationDataError(f"calibration folder {folder} holds no image files ({exts})")
    return files


def _shard_caption(parts: dict[str, bytes]) -> list[str]:
    """A shard sample's captions (see module doc); [] when it carries none usable. Lenient
    (``strict=False``): broken metadata is skipped for calibration, not fatal. A ``.txt`` beside
    a json label/class is a class name, made into a prompt."""
    caps = sample_captions(parts, strict=False, txt=False)
    if caps:
        return caps
    meta = sample_meta(parts, strict=False)
    text = parts.get("txt", b"").decode("utf-8", "replace").strip()
    if text and ("label" in meta or "class" in meta):
        return [PROMPT.format(name=text)]
    return sample_captions(parts, strict=False)


def shard_pairs(root: Path, num_samples: int, rng: random.Random) -> list[tuple[str, bytes, list[str]]]:
    """``num_samples`` (or all, if fewer) seeded random samples of the shards under ``root``:
    (``"<shard name>:<key>"``, encoded image bytes, its captions). Raises
    ``CalibrationDataError`` when there are no shards, a shard is unreadable, or no sample has an
    image."""
    shards = list_shards(root, recursive=True)
    if not shards:
        raise CalibrationDataError(f"calibration folder {root} holds no image files and no webdataset shards")
    index: list[tuple[int, str, str, list[str]]] = []  # (shard, key, image ext, captions)
    try:
        for s, shard in enumerate(shards):  # first pass: keys and captions, images not read
            for key, parts in iter_samples(shard, skip=IMAGE_PARTS):
                ext = image_part(parts)
                if ext is not None:
                    index.append((s, key, ext, _shard_caption(parts) or [prompt_for(Path(key), Path())]))
        if not index:
            raise CalibrationDataError(f"calibration shards under {root}: no sample holds an image")
        chosen = sorted(rng.sample(index, num_samples)) if len(index) > num_samples else index
        wanted: dict[int, dict[str, tuple[str, list[str]]]] = {}
        for s, key, ext, caps in chosen:
            wanted.setdefault(s, {})[key] = (ext, caps)
        out = []
        for s in sorted(wanted):  # second pass: only the shards and images sampled
            for key, parts in iter_samples(shards[s]):
                if key in wanted[s]:
                    ext, caps = wanted[s][key]
                    out.append((f"{shards[s].name}:{key}", parts[ext], caps))
    except DatasetError as e:
        raise CalibrationDataError(str(e)) from e
    return out


def prompt_for(path: Path, root: Path) -> str:
    """A prompt from the class folder name, or from the file name at the top level."""
    rel = path.relative_to(root)
    raw = rel.parts[-2] if len(rel.parts) > 1 else path.stem
    name = re.sub(r"[\d_\-.]+", " ", raw).strip() or raw
    return PROMPT.format(name=name)


class CalibrationSet:
    """Iterable of (images float32 (B, 3, H, W), tokens int64 (B, L)) calibration batches.

    ``preprocess`` maps a PIL image to (3, H, W); ``tokenizer`` maps N strings to (N, L).
    Undecodable files are logged and skipped; if none decodes, iteration raises
    ``CalibrationDataError`` naming the folder.
    """

    def __init__(self, cfg: CalibConfig, preprocess: Callable[[Any], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor], device: str = "cpu") -> None:
        self.cfg = cfg
        n_default, b_default = default_sizes(device)
        self.num_samples = cfg.num_samples or n_default
        self.batch_size = min(cfg.batch_size or b_default, self.num_samples)
        self._preprocess, self._tokenizer = preprocess, tokenizer
        rng = random.Random(cfg.seed)
        #: (image file, or "<shard>:<key>" with its bytes in ``_encoded``; caption)
        self.pairs: list[tuple[Path | str, str]] = []
        self._encoded: dict[str, bytes] = {}
        if _holds_images(cfg.folder):
            files = find_images(cfg.folder)
            if len(files) > self.num_samples:
                files = sorted(rng.sample(files, self.num_samples))
            caps = read_captions(cfg.captions, strict=False) if cfg.captions else {}
            self.pairs = [(f, self._caption(f, caps, rng)) for f in files]
        else:
            if cfg.captions is not None:
                raise CalibrationDataError(f"--captions applies to a folder of images; {cfg.folder} holds shards, "
                                           "whose samples carry their own captions")
            for name, data, options in shard_pairs(cfg.folder, self.num_samples, rng):
                self._encoded[name] = data
                self.pairs.append((name, rng.choice(options)))
        self.skipped: list[Path | str] = []

    def _caption(self, f: Path, caps: dict[str, list[str]], rng: random.Random) -> str:
        options = caps.get(f.relative_to(self.cfg.folder).as_posix()) or caps.get(f.name)
        return rng.choice(options) if options else prompt_for(f, self.cfg.folder)

    def __len__(self) -> int:
        """Number of batches (an upper bound when files turn out undecodable)."""
        return -(-len(self.pairs) // self.batch_size)

    def _decode(self, path: Path | str) -> torch.Tensor | None:
        from PIL import Image, UnidentifiedImageError

        try:
            src = io.BytesIO(self._encoded[path]) if isinstance(path, str) else path
            with Image.open(src) as im:
                return self._preprocess(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            log.warning("skipping undecodable calibration image %s: %s", path, e)
            self.skipped.append(path)
            return None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.skipped = []
        images: list[torch.Tensor] = []
        texts: list[str] = []
        yielded = 0
        for path, caption in self.pairs:
            x = self._decode(path)
            if x is None:
                continue
            images.append(x)
            texts.append(caption)
            if len(images) == self.batch_size:
                yield torch.stack(images).float(), self._tokenizer(texts)
                yielded += len(images)
                images, texts = [], []
        if images:
            yield torch.stack(images).float(), self._tokenizer(texts)
            yielded += len(images)
        if yielded == 0:
            raise CalibrationDataError(
                f"calibration folder {self.cfg.folder}: none of {len(self.pairs)} images could be decoded")


__all__ = ["CalibConfig", "CalibrationSet", "find_images", "prompt_for", "shard_pairs",
           "default_sizes", "IMAGE_EXTS", "PROMPT"]
