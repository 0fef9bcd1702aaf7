"""Evaluation datasets from plain folders, caption files and webdataset shards.

Two kinds, as in LAION's CLIP_benchmark:

* ``classification``: images with one class each; zero-shot metrics.
  Folder layout ``root/<class>/*.jpg`` with an optional ``root/classes.json`` mapping folder
  names to class names (e.g. ImageNet wnids -> readable names); without it the folder name is
  the class name.
* ``retrieval``: images with one or more captions each; Recall@k both ways.
  Folder layout: an image folder (``root/images/`` if present, else ``root``) and a captions
  file in ``root``: ``captions.json`` (``{file: [caption, ...]}`` or ``{file: caption}``) or
  ``captions.csv`` (header ``image,caption``; one row per caption), read strictly by
  ``quant.core.captions``.

Either kind can also come as webdataset ``.tar``/``.tar.gz``/``.tgz`` shards (one file, or a
folder of shards): see ``quant.eval.webdataset``.

Every problem raises ``quant.core.errors.DatasetError`` naming the offending path. Sample order is
sorted (by class then file, or by file), so results never depend on the file system's order;
``limit`` picks a seeded random subset of that order.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from clipfp8.quant.core.captions import CAPTION_FILES, find_captions_file, read_captions
from clipfp8.quant.core.config import IMAGE_EXTS
from clipfp8.quant.core.errors import DatasetError
from clipfp8.quant.core.shards import SHARD_SUFFIXES, list_shards
from clipfp8.quant.eval.data import (
    CLASSES_FILE,
    ClassificationData,
    EvalData,
    ImageRef,
    RetrievalData,
    class_names_from_json,
    read_json,
)
from clipfp8.quant.eval.webdataset import detect_shard_kind, load_shards

log = logging.getLogger(__name__)

Kind = Literal["auto", "classification", "retrieval"]
KINDS: tuple[str, ...] = ("auto", "classification", "retrieval")

@dataclass(frozen=True)
class DatasetSpec:
    """Which dataset to evaluate and how much of it.

    ``path``: a folder or a shard file. ``kind``: ``auto`` detects it from the layout.
    ``name``: shown in reports (default: the folder/shard name). ``limit``: evaluate a seeded
    random subset of at most ``limit`` images (``None`` = all). ``seed``: subset seed.
    """

    path: Path
    kind: Kind = "auto"
    name: str | None = None
    limit: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.kind not in KINDS:
            raise ValueError(f"DatasetSpec.kind must be one of {KINDS}, got {self.kind!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"DatasetSpec.limit must be >= 1, got {self.limit}")
        if self.name is None:
            object.__setattr__(self, "name", _default_name(self.path))

    @classmethod
    def parse(cls, text: str, limit: int | None = None, seed: int = 0) -> DatasetSpec:
        """``"PATH"`` or ``"PATH:kind"`` (kind = classification/retrieval/auto), as on the CLI."""
        path, kind = text, "auto"
        head, sep, tail = text.rpartition(":")
        if sep and tail in KINDS and head:
            path, kind = head, tail
        return cls(Path(path), kind=kind, limit=limit, seed=seed)  # type: ignore[arg-type]  # kind is checked against KINDS just above


def _default_name(path: Path) -> str:
    name = path.name
    for suffix in SHARD_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name or str(path)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def detect_kind(path: Path) -> str:
    """``classification`` or ``retrieval`` from a folder's layout (shards: see webdataset)."""
    if not path.exists():
        raise DatasetError(f"dataset path does not exist: {path}")
    if list_shards(path):

        return detect_shard_kind(list_shards(path))
    if not path.is_dir():
        raise DatasetError(f"dataset path is neither a folder nor a .tar/.tar.gz shard: {path}")
    if find_captions_file(path) is not None:
        return "retrieval"
    if any(d.is_dir() and any(_is_image(f) for f in d.iterdir()) for d in path.iterdir()):
        return "classification"
    raise DatasetError(
        f"cannot tell the dataset kind of {path}: expected class subfolders of images "
        f"(classification) or {' / '.join(CAPTION_FILES)} (retrieval)"
    )


#: ``--preset shared``: the three evaluation sets in ``../shared/data/eval`` beside the repository.
PRESETS: dict[str, tuple[tuple[str, str], ...]] = {
    "shared": (("flickr8k-1k", "retrieval"), ("imagenette-val", "classification"),
               ("cifar10-test", "classification")),
}
SHARED_EVAL_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"


def preset_datasets(preset: str, root: Path = SHARED_EVAL_DIR) -> list[str]:
    """``--dataset`` strings (``PATH:kind``) of a preset; ``DatasetError`` if its folder is missing."""
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    missing = [name for name, _ in PRESETS[preset] if not (root / name).is_dir()]
    if missing:
        raise DatasetError(f"--preset {preset}: {root} lacks {missing}")
    return [f"{root / name}:{kind}" for name, kind in PRESETS[preset]]


def load_dataset(spec: DatasetSpec) -> EvalData:
    """Load (the seeded subset of) a dataset. Raises ``DatasetError`` naming the path."""
    kind = detect_kind(spec.path) if spec.kind == "auto" else spec.kind
    shards = list_shards(spec.path)
    if shards:

        data = load_shards(shards, kind, spec.name or spec.path.name)
    elif not spec.path.is_dir():
        raise DatasetError(f"dataset path is neither a folder nor a .tar/.tar.gz shard: {spec.path}")
    elif kind == "classification":
        data = load_class_folder(spec.path, spec.name or spec.path.name)
    else:
        data = load_retrieval_folder(spec.path, spec.name or spec.path.name)
    data = subsample(data, spec.limit, spec.seed)
    log.info("dataset %s: %s, %d images", data.name, data.kind, len(data.images))
    return data


def subsample(data: EvalData, limit: int | None, seed: int) -> EvalData:
    """A seeded random subset of at most ``limit`` images, kept in the dataset's order."""
    n = len(data.images)
    if limit is None or limit >= n:
        return data
    keep = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
    images = [data.images[i] for i in keep]
    ids = [data.ids[i] for i in keep]
    if isinstance(data, ClassificationData):
        return ClassificationData(data.name, images, ids, data.labels[keep], data.classnames)
    return RetrievalData(data.name, images, ids, [data.captions[i] for i in keep])


def load_class_folder(root: Path, name: str) -> ClassificationData:
    """``root/<class>/*.jpg`` (+ optional ``classes.json``) -> ``ClassificationData``."""
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    folders = [d for d in folders if any(_is_image(f) for f in d.iterdir())]
    if not folders:
        raise DatasetError(f"{root}: no class subfolder holds an image ({', '.join(sorted(IMAGE_EXTS))})")
    keys = [d.name for d in folders]
    names = (class_names_from_json(root / CLASSES_FILE, keys) if (root / CLASSES_FILE).is_file()
             else {k: k for k in keys})
    images: list[ImageRef] = []
    ids, labels = [], []
    for label, folder in enumerate(folders):
        for f in sorted(p for p in folder.iterdir() if _is_image(p)):
            images.append(f)
            ids.append(f"{folder.name}/{f.name}")
            labels.append(label)
    return ClassificationData(name, images, ids, np.asarray(labels, dtype=np.int64),
                              [names[k] for k in keys])


def load_retrieval_folder(root: Path, name: str) -> RetrievalData:
    """An image folder (``root/images`` or ``root``) + ``captions.json``/``.csv`` -> ``RetrievalData``.

    Captions are read strictly (``quant.core.captions``). Every captioned image must exist;
    images without captions are ignored (logged).
    """
    src = find_captions_file(root)
    if src is None:
        raise DatasetError(f"{root}: no captions file ({' or '.join(CAPTION_FILES)})")
    cap_file, image_dir = src.path, src.image_dir
    caps = read_captions(cap_file, strict=True)
    missing = [k for k in caps if not _is_image(image_dir / k)]
    if missing:
        raise DatasetError(f"{cap_file}: {len(missing)} captioned images are missing from {image_dir} "
                           f"(e.g. {missing[:3]})")
    uncaptioned = sum(1 for p in image_dir.iterdir() if _is_image(p) and p.name not in caps)
    if uncaptioned:
        log.warning("%s: %d images have no caption in %s and are skipped", image_dir, uncaptioned, cap_file)
    keys = sorted(caps)
    return RetrievalData(name, [image_dir / k for k in keys], keys, [caps[k] for k in keys])


def open_image(ref: ImageRef, label: str) -> Any:
    """Decode an image ref to an RGB PIL image; ``DatasetError`` naming ``label`` if undecodable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DatasetError(f"cannot decode image {label}: {e}") from e


__all__ = ["DatasetSpec", "ClassificationData", "RetrievalData", "EvalData", "ImageRef", "KINDS",
           "detect_kind", "load_dataset", "subsample", "load_class_folder", "load_retrieval_folder",
           "list_shards", "open_image", "read_json", "class_names_from_json", "PRESETS", "SHARED_EVAL_DIR",
           "preset_datasets"]
