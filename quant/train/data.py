"""Training data for the embedded default model: webdataset shards -> samples -> captions.

A *group* is one caption meaning: a class name or one Open Clip Art title (a few captions from
prompt templates, shared by every image of the class or title), or one captioned photo (its own
captions only: Flickr8k's five human captions, webcaps' one). Images sharing a group are all
positives for each other's captions, which the multi-positive loss in ``quant.train.train``
relies on; two different photos never share a group.
"""
from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from clipfp8.quant.core.captions import entry_captions
from clipfp8.quant.core.errors import QuantError
from clipfp8.quant.core.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

#: Training sources (folders under ``../shared/data/train``) and what their captions are.
SOURCES: tuple[str, ...] = ("cifar10-train", "imagenette-train", "openclipart", "imagen", "flickr8k-train",
                             "webcaps")
#: Captioned photos: each photo is its own group (``photo:<source>:<key>``).
PHOTO_SOURCES: tuple[str, ...] = ("flickr8k-train", "webcaps")
#: Image formats of the pack's mosaics, and the largest side each can store.
MOSAIC_FORMATS: dict[str, tuple[str, int]] = {"jpeg": ("jpg", 65500), "webp": ("webp", 16383)}

#: Class-name prompts: the CLIP / CLIP_benchmark family ("a photo of a {}." ...), plus bare names.
CLASS_TEMPLATES: tuple[str, ...] = (
    "{}", "a {}.", "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a low resolution photo of a {}.", "a close-up photo of a {}.",
    "a bright photo of a {}.", "a cropped photo of a {}.", "a picture of a {}.", "an image of a {}.",
    "a photo of my {}.", "a {} in the picture.", "there is a {} in this photo.",
)
#: Open Clip Art titles: bare, as a drawing, and with the category folders for context.
DRAWING_TEMPLATES: tuple[str, ...] = ("{title}", "a drawing of {title}.", "clip art of {title} ({cats}).")


class TrainDataError(QuantError):
    """The training shards or the training pack are missing or malformed."""


def read_json_object(path: Path, required: tuple[str, ...], hint: str) -> dict:
    """The JSON object in ``path`` holding every key of ``required``; ``TrainDataError`` naming the
    file (and the missing key, followed by ``hint``) otherwise."""
    try:
        obj = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise TrainDataError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(obj, dict):
        raise TrainDataError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    for key in required:
        if key not in obj:
            raise TrainDataError(f"{path}: missing key {key!r} ({hint})")
    return obj


@dataclass
class CaptionTable:
    """Groups and their captions. ``group_captions[g]`` lists caption ids (into ``captions``)."""

    groups: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    group_captions: list[list[int]] = field(default_factory=list)
    _index: dict[str, int] = field(default_factory=dict)
    _cap_index: dict[str, int] = field(default_factory=dict)

    def add(self, group: str, captions: list[str]) -> int:
        """Register ``group`` with ``captions`` (deduplicated); returns the group id."""
        if group in self._index:
            return self._index[group]
        ids = []
        for c in dict.fromkeys(captions):
            if c not in self._cap_index:
                self._cap_index[c] = len(self.captions)
                self.captions.append(c)
            ids.append(self._cap_index[c])
        self._index[group] = len(self.groups)
        self.groups.append(group)
        self.group_captions.append(ids)
        return self._index[group]

    def csr(self) -> tuple[np.ndarray, np.ndarray]:
        """(offsets int32 (G+1,), caption ids int32 (offsets[-1],)): group g owns the caption ids
        ``ids[offsets[g]:offsets[g+1]]`` (compressed rows: groups own 1 to 22 captions)."""
        counts = [len(ids) for ids in self.group_captions]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        flat = [i for ids in self.group_captions for i in ids]
        return offsets, np.array(flat, np.int32)


_AUTHORLESS = re.compile(r"[_\s]+")


def clean_title(title: str) -> str:
    """Open Clip Art title from a file name -> readable text ('view_tree' -> 'view tree')."""
    return _AUTHORLESS.sub(" ", title.replace("-", " ")).strip() or "drawing"


def class_captions(name: str) -> list[str]:
    return [t.format(name) for t in CLASS_TEMPLATES]


def drawing_captions(title: str, categories: list[str]) -> list[str]:
    cats = [c.replace("_", " ") for c in categories if c not in ("unsorted",)][-2:] or ["drawing"]
    return [t.format(title=title, cats=", ".join(cats)) for t in DRAWING_TEMPLATES]


def photo_captions(meta: dict, text: str) -> list[str]:
    """A captioned photo's captions: every caption of the metadata's ``captions`` list (Flickr8k:
    the five human captions), else the sample's text (webcaps); whitespace collapsed."""
    caps = entry_captions(meta.get("captions")) or entry_captions(text)
    return [" ".join(c.split()) for c in caps]


def group_of(source: str, key: str, meta: dict, text: str) -> tuple[str, list[str]]:
    """(group name, captions) for one sample. Class names merge across sources ('dog'); a
    captioned photo is a group of its own, keyed by its shard key. The list is empty when a
    photo has no usable caption."""
    if source in PHOTO_SOURCES:
        return f"photo:{source}:{key}", photo_captions(meta, text)
    if source == "openclipart":
        title = clean_title(meta.get("title", text))
        return f"drawing:{title}", drawing_captions(title, meta.get("categories", []))
    name = (meta.get("label") or text).strip()
    return f"class:{name.lower()}", class_captions(name)


class ShardSample(NamedTuple):
    """One webdataset sample: its key (the member name without extension), the JPEG bytes, the
    ``.txt`` caption and the ``.json`` metadata."""

    key: str
    jpeg: bytes
    text: str
    meta: dict[str, Any]


def iter_shards(root: Path, source: str) -> Iterator[ShardSample]:
    """Every complete sample (KEY.jpg + KEY.txt + KEY.json) in ``root/source/*.tar.gz``."""
    shards = sorted((root / source).glob("*.tar.gz"))
    if not shards:
        raise TrainDataError(f"no .tar.gz shards in {root / source}")
    for shard in shards:
        pending: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.rpartition(".")
                f = tar.extractfile(m)
                entry = pending.setdefault(key, {})
                entry[ext] = f.read() if f else b""
                if {"jpg", "txt", "json"} <= entry.keys():
                    e = pending.pop(key)
                    yield ShardSample(key, e["jpg"], e["txt"].decode("utf-8").strip(), json.loads(e["json"]))
        if pending:
            log.warning("%s: %d incomplete samples skipped", shard, len(pending))


def decode_square(jpeg: bytes, size: int | None) -> np.ndarray:
    """JPEG -> uint8 (S, S, 3): shortest side resized to ``size`` (bicubic) and centre-cropped, the
    geometry of open_clip's eval transform; ``size=None`` keeps the pixels (CIFAR's 32x32)."""
    from PIL import Image

    im = Image.open(io.BytesIO(jpeg)).convert("RGB")
    if size is not None:
        w, h = im.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8)


def mosaic(images: np.ndarray, cols: int) -> np.ndarray:
    """uint8 (N, S, S, 3) -> one uint8 (rows*S, cols*S, 3) grid; missing tiles stay black."""
    n, s = images.shape[0], images.shape[1]
    rows = -(-n // cols)
    grid = np.zeros((rows * cols, s, s, 3), np.uint8)
    grid[:n] = images
    return grid.reshape(rows, cols, s, s, 3).transpose(0, 2, 1, 3, 4).reshape(rows * s, cols * s, 3)


def unmosaic(grid: np.ndarray, n: int, size: int) -> np.ndarray:
    """Inverse of ``mosaic``: uint8 (rows*S, cols*S, 3) -> uint8 (n, S, S, 3)."""
    rows, cols = grid.shape[0] // size, grid.shape[1] // size
    tiles = grid.reshape(rows, size, cols, size, 3).transpose(0, 2, 1, 3, 4).reshape(-1, size, size, 3)
    return tiles[:n]


def save_jpeg(grid: np.ndarray, path: Path, quality: int) -> int:
    """uint8 (H, W, 3) mosaic -> JPEG file written atomically; returns its size in bytes."""
    return save_image(grid, path, "jpeg", quality)


def save_image(grid: np.ndarray, path: Path, fmt: str, quality: int) -> int:
    """uint8 (H, W, 3) mosaic -> a ``fmt`` file ("jpeg": 4:2:0, optimised Huffman tables,
    progressive; "webp": lossy, slowest/best method) written atomically; returns its bytes."""
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(grid).save(buf, "JPEG", quality=quality, subsampling=2, optimize=True, progressive=True)
    elif fmt == "webp":
        Image.fromarray(grid).save(buf, "WEBP", quality=quality, method=6)
    else:
        raise ValueError(f"unknown mosaic format {fmt!r}; known {sorted(MOSAIC_FORMATS)}")
    atomic_write_bytes(path, buf.getvalue())
    return len(buf.getvalue())


def save_mosaics(images: np.ndarray, out_dir: Path, stem: str, fmt: str, quality: int,
                 max_side: int | None = None) -> dict[str, int]:
    """uint8 (N, S, S, 3) tiles -> as few ``stem-<i>.<ext>`` mosaics as the format's largest side
    allows (WebP: 16383 px); returns {file name: bytes}, in tile order."""
    ext, limit = MOSAIC_FORMATS[fmt]
    n, s = images.shape[0], images.shape[1]
    side = min(limit, max_side or limit)
    cols = max(1, min(8192, side) // s)
    per_file = cols * max(1, side // s)
    out: dict[str, int] = {}
    for i, start in enumerate(range(0, n, per_file)):
        name = f"{stem}-{i}.{ext}"
        chunk = images[start:start + per_file]
        out[name] = save_image(mosaic(chunk, min(cols, len(chunk))), Path(out_dir) / name, fmt, quality)
    return out


def load_mosaics(paths: list[Path], n: int, size: int) -> np.ndarray:
    """Inverse of ``save_mosaics``: the first ``n`` tiles of the files, in order -> uint8 (n, S, S, 3).
    Raises ``TrainDataError`` naming a file that is missing, unreadable or holds too few tiles."""
    from PIL import Image

    tiles = []
    for path in paths:
        if not path.is_file():
            raise TrainDataError(f"training pack file not found: {path}")
        try:
            grid = np.asarray(Image.open(path).convert("RGB"))
        except OSError as e:
            raise TrainDataError(f"{path}: not a readable image ({e})") from e
        tiles.append(unmosaic(grid, (grid.shape[0] // size) * (grid.shape[1] // size), size))
    out = np.concatenate(tiles) if tiles else np.zeros((0, size, size, 3), np.uint8)
    if len(out) < n:
        raise TrainDataError(f"{', '.join(str(p) for p in paths) or 'no mosaic files'}: hold fewer than the "
                             f"{n} {size}x{size} tiles the pack lists")
    return out[:n]


def save_npz(path: Path, compressed: bool = False, **arrays: np.ndarray) -> None:
    """Named arrays -> ``.npz`` (zip-deflated when ``compressed``) written atomically (fsync'd
    temp file, rename)."""
    buf = io.BytesIO()
    # No object arrays: np.load (allow_pickle=False) could not read them back anyway.
    (np.savez_compressed if compressed else np.savez)(buf, allow_pickle=False, **arrays)
    atomic_write_bytes(path, buf.getvalue())
