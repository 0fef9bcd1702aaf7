"""Webdataset shards (``.tar``, ``.tar.gz``, ``.tgz``): finding them and reading their samples.

A sample is the group of members sharing a key (the member path up to the first dot of its file
name, the webdataset convention), e.g. ``KEY.jpg`` + ``KEY.txt`` + ``KEY.json``. Shared by the
evaluation datasets (``quant.eval.webdataset``) and the calibration data (``quant.calib``).
"""
from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clipfp8.quant.core.config import IMAGE_EXTS
from clipfp8.quant.core.errors import DatasetError

SHARD_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")
#: Member extensions (no dot, lower case) that hold an image.
IMAGE_PARTS = frozenset(e.lstrip(".") for e in IMAGE_EXTS)


def is_shard(path: Path) -> bool:
    return path.is_file() and path.name.endswith(SHARD_SUFFIXES)


def list_shards(path: Path, recursive: bool = False) -> list[Path]:
    """The shard files a path names: itself, or the shards inside a folder (directly, or at any
    depth with ``recursive``), sorted by path."""
    if is_shard(path):
        return [path]
    if path.is_dir():
        found = path.rglob("*") if recursive else path.iterdir()
        return sorted(p for p in found if is_shard(p))
    return []


def split_key(member_name: str) -> tuple[str, str]:
    """A member name -> (sample key, extension in lower case): ``a/b.c.jpg`` -> (``a/b``, ``c.jpg``)."""
    folder, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_samples(shard: Path, skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` per sample of one shard, in member order. Members whose
    extension is in ``skip`` are listed with empty bytes, not read (a first pass over large
    shards that needs only the small parts). Raises ``DatasetError`` naming an unreadable shard."""
    try:
        with tarfile.open(shard, mode="r:*") as tar:
            key, parts = None, {}
            for member in tar:
                if not member.isfile() or member.name.rpartition("/")[2].startswith("."):
                    continue
                k, ext = split_key(member.name)
                if k != key and key is not None:
                    yield key, parts
                    parts = {}
                key = k
                fh = None if ext in skip else tar.extractfile(member)
                parts[ext] = fh.read() if fh else b""
            if key is not None:
                yield key, parts
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetError(f"{shard}: not a readable tar/tar.gz shard ({e})") from e


def sample_meta(parts: dict[str, bytes], where: str = "sample", strict: bool = True) -> dict[str, Any]:
    """A sample's ``.json`` part as a dict ({} when absent). ``strict``: an invalid or non-object
    ``.json`` raises ``DatasetError`` naming ``where`` (evaluation: a broken dataset must not
    score); else it counts as absent (calibration: any usable text will do)."""
    if not parts.get("json"):
        return {}
    try:
        meta = json.loads(parts["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        if strict:
            raise DatasetError(f"{where} has an invalid .json ({e})") from e
        return {}
    if not isinstance(meta, dict):
        if strict:
            raise DatasetError(f"{where}: .json must be an object")
        return {}
    return meta


def _listed(value: Any) -> list[str] | None:
    """``value`` (a string or a list of strings) as stripped, non-empty captions; None when it
    is neither."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        return None
    return [c.strip() for c in value if c.strip()]


def sample_captions(parts: dict[str, bytes], where: str = "sample", strict: bool = True,
                    txt: bool = True) -> list[str]:
    """A sample's captions: the ``.json``'s ``captions`` (a list) or ``caption`` (a string), else
    the ``.txt`` lines (``txt``); stripped, empty ones dropped. ``strict``: a malformed ``.json``,
    captions that are not strings, or no caption at all raise ``DatasetError`` naming ``where``.
    Lenient: an unusable field counts as absent and the next one is tried ([] when none is
    usable), so any usable text serves (calibration)."""
    meta = sample_meta(parts, where, strict)
    lines = parts["txt"].decode("utf-8", errors="replace").splitlines() if txt and "txt" in parts else None
    if not strict:
        for raw in (meta.get("captions"), meta.get("caption"), lines):
            caps = _listed(raw)
            if caps:
                return caps
        return []
    raw = meta.get("captions", meta.get("caption"))
    if raw is None:
        raw = lines if lines is not None else []
    caps = _listed(raw)
    if caps is None:
        raise DatasetError(f"{where}: captions must be a string or a list of strings")
    if not caps:
        raise DatasetError(f"{where} has no caption (json caption(s) or .txt)")
    return caps


def image_part(parts: dict[str, bytes]) -> str | None:
    """The extension of a sample's image member (the first in sorted order), or None."""
    return next((ext for ext in sorted(parts) if ext in IMAGE_PARTS), None)


__all__ = ["SHARD_SUFFIXES", "IMAGE_PARTS", "is_shard", "list_shards", "split_key", "iter_samples", "image_part",
           "sample_meta", "sample_captions"]
