"""Evaluation data as loaded in memory (classification and retrieval sets), shared by the folder
readers (``quant.eval.datasets``) and the shard reader (``quant.eval.webdataset``)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipfp8.quant.core.errors import DatasetError

CLASSES_FILE = "classes.json"

#: An image is a file on disk or the encoded bytes read from a shard.
ImageRef = Path | bytes


@dataclass
class ClassificationData:
    """``images``: N refs; ``labels``: int64 (N,) indices into ``classnames`` (C names)."""

    name: str
    images: list[ImageRef]
    ids: list[str]
    labels: np.ndarray
    classnames: list[str]
    kind: str = field(default="classification", init=False)


@dataclass
class RetrievalData:
    """``images``: N refs; ``captions``: N lists (each non-empty) of caption strings."""

    name: str
    images: list[ImageRef]
    ids: list[str]
    captions: list[list[str]]
    kind: str = field(default="retrieval", init=False)

    def flat_captions(self) -> tuple[list[str], np.ndarray]:
        """All T captions in order, and int64 (T,) index of each caption's image."""
        texts = [c for caps in self.captions for c in caps]
        owner = np.repeat(np.arange(len(self.captions)), [len(c) for c in self.captions])
        return texts, owner.astype(np.int64)


EvalData = ClassificationData | RetrievalData


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: not a readable JSON file ({e})") from e


def class_names_from_json(path: Path, keys: Sequence[str]) -> dict[str, str]:
    """``classes.json``: ``{folder_or_label: name}``, or a list of names indexed by int labels."""
    raw = read_json(path)
    if isinstance(raw, list):
        raw = {str(i): v for i, v in enumerate(raw)}
    if not isinstance(raw, dict) or not all(isinstance(v, str) and v for v in raw.values()):
        raise DatasetError(f"{path}: expected an object {{folder: class name}} or a list of names")
    missing = [k for k in keys if k not in raw]
    if missing:
        raise DatasetError(f"{path}: no class name for {missing[:5]} ({len(missing)} missing)")
    return {k: raw[k] for k in keys}


__all__ = ["CLASSES_FILE", "ImageRef", "ClassificationData", "RetrievalData", "EvalData", "read_json",
           "class_names_from_json"]
