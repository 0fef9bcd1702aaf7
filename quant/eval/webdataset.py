"""Evaluation datasets stored as webdataset shards (``.tar``, ``.tar.gz``, ``.tgz``).

A sample is the group of members sharing a key (the member path up to the first dot of its file
name, the webdataset convention): one image (``.jpg``/``.png``/...) plus metadata:

* classification: a ``.json`` with ``"label"`` or ``"class"`` (a class name, or an int index
  into an optional ``classes.json`` list/object next to the shards), else a ``.cls`` (int) or
  a ``.txt`` holding the class name;
* retrieval: a ``.json`` with ``"captions"`` (list) or ``"caption"`` (str), else a ``.txt``
  whose non-empty lines are the captions.

Shards are read whole into memory (image bytes stay encoded until evaluation decodes them);
that suits evaluation sets of up to some 100k images. Samples are ordered by (shard, key).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from clipfp8.quant.core.errors import DatasetError
from clipfp8.quant.core.shards import image_part, iter_samples, sample_captions, sample_meta
from clipfp8.quant.eval.data import (
    CLASSES_FILE,
    ClassificationData,
    EvalData,
    ImageRef,
    RetrievalData,
    class_names_from_json,
)

log = logging.getLogger(__name__)

#: How many samples ``detect_shard_kind`` looks at.
_DETECT_SAMPLES = 16


def _image_part(parts: dict[str, bytes]) -> bytes | None:
    ext = image_part(parts)
    return parts[ext] if ext is not None else None


def _json_part(shard: Path, key: str, parts: dict[str, bytes]) -> dict[str, Any]:
    return sample_meta(parts, f"{shard}: sample {key!r}")


def detect_shard_kind(shards: list[Path]) -> str:
    """``classification`` when samples carry a label (json label/class or .cls), ``retrieval``
    when they carry captions (json caption(s) or .txt). A bare .txt counts as a caption; pass
    ``:classification`` explicitly when .txt holds class names."""
    for i, (key, parts) in enumerate(iter_samples(shards[0])):
        meta = _json_part(shards[0], key, parts)
        if "label" in meta or "class" in meta or "cls" in parts:
            return "classification"
        if "caption" in meta or "captions" in meta or "txt" in parts:
            return "retrieval"
        if i >= _DETECT_SAMPLES:
            break
    raise DatasetError(f"{shards[0]}: cannot tell the dataset kind: no sample has a json "
                       "label/class/caption(s), a .cls or a .txt")


def _label_of(shard: Path, key: str, parts: dict[str, bytes]) -> int | str:
    meta = _json_part(shard, key, parts)
    for field in ("label", "class"):
        if field in meta:
            value = meta[field]
            if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
                raise DatasetError(f"{shard}: sample {key!r}: json {field!r} must be an int or a name")
            return value
    for ext in ("cls", "txt"):
        if ext in parts:
            text = parts[ext].decode("utf-8", errors="replace").strip()
            if ext == "cls" or text.lstrip("-").isdigit():
                try:
                    return int(text)
                except ValueError as e:
                    raise DatasetError(f"{shard}: sample {key!r}: .cls is not an integer: {text!r}") from e
            if text:
                return text
    raise DatasetError(f"{shard}: sample {key!r} has no class label (json label/class, .cls or .txt)")


def _captions_of(shard: Path, key: str, parts: dict[str, bytes]) -> list[str]:
    return sample_captions(parts, f"{shard}: sample {key!r}")


def _class_index(shards: list[Path], raw: list[int | str]) -> tuple[np.ndarray, list[str]]:
    """Raw labels (all names or all ints) -> int64 indices and the class names."""
    str_labels = [v for v in raw if isinstance(v, str)]
    if len(str_labels) == len(raw):
        names = sorted(set(str_labels))
        index = {n: i for i, n in enumerate(names)}
        return np.asarray([index[v] for v in str_labels], dtype=np.int64), names
    if not all(isinstance(v, int) for v in raw):
        raise DatasetError(f"{shards[0].parent}: shards mix int and string class labels")
    labels = np.asarray(raw, dtype=np.int64)
    if labels.min() < 0:
        raise DatasetError(f"{shards[0].parent}: negative class label {int(labels.min())}")
    n_classes = int(labels.max()) + 1
    classes_file = shards[0].parent / CLASSES_FILE
    if classes_file.is_file():
        names_map = class_names_from_json(classes_file, [str(i) for i in range(n_classes)])
        return labels, [names_map[str(i)] for i in range(n_classes)]
    log.warning("%s: int labels without %s; class names are the numbers", shards[0].parent, CLASSES_FILE)
    return labels, [str(i) for i in range(n_classes)]


def load_shards(shards: list[Path], kind: str, name: str) -> EvalData:
    """Read every sample of ``shards`` as ``kind`` data; samples without an image are skipped."""
    images: list[ImageRef] = []
    ids: list[str] = []
    meta: list[Any] = []
    for shard in shards:
        for key, parts in iter_samples(shard):
            image = _image_part(parts)
            if image is None:
                log.warning("%s: sample %r has no image; skipped", shard, key)
                continue
            meta.append(_label_of(shard, key, parts) if kind == "classification"
                        else _captions_of(shard, key, parts))
            images.append(image)
            ids.append(f"{shard.name}:{key}")
    if not images:
        raise DatasetError(f"{shards[0]}: the shard(s) hold no image sample")
    if kind == "classification":
        labels, classnames = _class_index(shards, meta)
        return ClassificationData(name, images, ids, labels, classnames)
    return RetrievalData(name, images, ids, meta)


__all__ = ["detect_shard_kind", "load_shards"]
