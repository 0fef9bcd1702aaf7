"""Calibration data: image-text pairs from a folder, batched for both CLIP towers.

Captions come from an optional file read leniently by ``quant.core.captions.read_captions`` --
JSON ``{"file": ["caption", ...] | "caption"}`` or CSV ``image,caption`` (several rows per image
allowed; the header may be left out) -- keyed by the path relative to the folder or by the bare
file name. Images without a caption get a prompt built from their class folder
name (``cats/001.jpg`` -> "a photo of a cats.") or, at the top level, from the file name.
Sampling is deterministic: a seeded ``random.Random`` picks the files and the captions.
"""
from __future__ import annotations

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
from clipfp8.quant.core.errors import CalibrationDataError

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
        files = find_images(cfg.folder)
        rng = random.Random(cfg.seed)
        if len(files) > self.num_samples:
            files = sorted(rng.sample(files, self.num_samples))
        caps = read_captions(cfg.captions, strict=False) if cfg.captions else {}
        self.pairs = [(f, self._caption(f, caps, rng)) for f in files]
        self.skipped: list[Path] = []

    def _caption(self, f: Path, caps: dict[str, list[str]], rng: random.Random) -> str:
        options = caps.get(f.relative_to(self.cfg.folder).as_posix()) or caps.get(f.name)
        return rng.choice(options) if options else prompt_for(f, self.cfg.folder)

    def __len__(self) -> int:
        """Number of batches (an upper bound when files turn out undecodable)."""
        return -(-len(self.pairs) // self.batch_size)

    def _decode(self, path: Path) -> torch.Tensor | None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
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
                f"calibration folder {self.cfg.folder}: none of {len(self.pairs)} image files could be decoded")


__all__ = ["CalibConfig", "CalibrationSet", "find_images", "prompt_for",
           "default_sizes", "IMAGE_EXTS", "PROMPT"]
