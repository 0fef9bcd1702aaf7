"""The one reader of image-caption files, for calibration, evaluation and the app's ground truth.

Formats (``.json`` is JSON, anything else is read as CSV; UTF-8, a BOM is allowed):

* JSON: an object ``{image file: [caption, ...]}``; a plain string ``{image file: "caption"}``
  is a one-caption list (never split into characters).
* CSV: one row per caption, several rows per image allowed, under a header row naming the
  ``image`` and ``caption`` columns (in any order; other columns are ignored).

``strict`` (evaluation): the CSV header is required, and every entry must be a non-empty caption
(or list of them); the first bad one raises ``CaptionsError`` naming ``file:line``. Lenient
(calibration, the app): the header may also name the columns ``file``/``filename``/``path`` and
``captions``/``text``, or be left out (then rows are ``image,caption``); empty or non-string
captions, short rows and entries without a caption are skipped (one warning says how many).
Either way a missing, unreadable or unparsable file raises ``CaptionsError`` naming it.

Keys are image paths relative to the image folder (POSIX form), as written in the file.
``find_captions_file`` finds a folder's ``captions.json``/``captions.csv``: in the folder (its
images in ``images/`` when that subfolder exists, else in the folder) or, for a folder named
``images``, beside it.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipfp8.quant.core.errors import CaptionsError

log = logging.getLogger(__name__)

CAPTION_FILES: tuple[str, ...] = ("captions.json", "captions.csv")
#: CSV header names of the image and the caption column; strict mode accepts only the first.
IMAGE_COLUMNS: tuple[str, ...] = ("image", "file", "filename", "path")
CAPTION_COLUMNS: tuple[str, ...] = ("caption", "captions", "text")


@dataclass(frozen=True)
class CaptionSource:
    """A folder's captions file and the folder its keys name images in."""

    path: Path
    image_dir: Path


def find_captions_file(folder: str | Path) -> CaptionSource | None:
    """``folder/captions.json`` (then ``.csv``) with images in ``folder/images`` if that is a
    folder, else in ``folder``; for a folder named ``images``, also a captions file beside it.
    ``None`` when there is none."""
    folder = Path(folder)
    for name in CAPTION_FILES:
        if (folder / name).is_file():
            images = folder / "images"
            return CaptionSource(folder / name, images if images.is_dir() else folder)
    if folder.name == "images":
        for name in CAPTION_FILES:
            if (folder.parent / name).is_file():
                return CaptionSource(folder.parent / name, folder)
    return None


def read_captions(path: str | Path, *, strict: bool) -> dict[str, list[str]]:
    """``{image key: [caption, ...]}`` from a JSON or CSV captions file (see the module docstring).

    Captions are stripped; every list is non-empty. Raises ``CaptionsError`` naming the file (and
    line) when it is missing or unparsable, and in ``strict`` mode on any bad entry or when it
    holds no caption at all.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionsError(f"captions file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise CaptionsError(f"{path}: not a UTF-8 text file ({e})") from e
    except OSError as e:
        raise CaptionsError(f"{path}: cannot read the captions file ({e})") from e
    reader = _read_json if path.suffix.lower() == ".json" else _read_csv
    out, skipped = reader(path, text, strict)
    if skipped:
        log.warning("%s: skipped %d entries without a usable caption (first: %s)", path, len(skipped), skipped[0])
    if strict and not out:
        raise CaptionsError(f"{path}: holds no captions")
    return out


def captions_for_folder(folder: str | Path, *, strict: bool) -> dict[str, list[str]]:
    """The captions of ``folder`` (``find_captions_file``) keyed by image path relative to
    ``folder`` (so ``images/`` is prefixed when the images sit there); ``{}`` without a file."""
    folder = Path(folder)
    src = find_captions_file(folder)
    if src is None:
        return {}
    caps = read_captions(src.path, strict=strict)
    if src.image_dir == folder:
        return caps
    prefix = src.image_dir.relative_to(folder).as_posix()
    return {f"{prefix}/{k}": v for k, v in caps.items()}


def entry_captions(value: Any) -> list[str]:
    """The captions of one entry as the lenient JSON reader takes them (e.g. the ``captions`` list
    of a training shard's metadata): a string is one caption, a list keeps its non-empty strings
    (stripped), anything else gives ``[]``."""
    return _json_entry(value, strict=False) or []


def _json_line(text: str, key: str) -> int | None:
    """1-based line of ``"key":`` in the JSON text (for error messages), if it can be found."""
    for quoted in dict.fromkeys((json.dumps(key), json.dumps(key, ensure_ascii=False))):
        m = re.search(re.escape(quoted) + r"\s*:", text)
        if m:
            return text.count("\n", 0, m.start()) + 1
    return None


def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def _json_entry(raw: Any, strict: bool) -> list[str] | None:
    """An entry's captions, or ``None`` when strict mode must reject it."""
    items = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else None
    if items is None:
        return None if strict else []
    caps = [c.strip() for c in items if isinstance(c, str) and c.strip()]
    if strict and (not items or len(caps) != len(items)):
        return None
    return caps


def _read_json(path: Path, text: str, strict: bool) -> tuple[dict[str, list[str]], list[str]]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise CaptionsError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from e
    if not isinstance(raw, dict):
        raise CaptionsError(f"{path}:1: expected a JSON object {{image file: [caption, ...]}}, "
                            f"got a {type(raw).__name__}")
    out: dict[str, list[str]] = {}
    skipped: list[str] = []
    for key, value in raw.items():
        caps = _json_entry(value, strict)
        if caps is None or (strict and not key.strip()):
            raise CaptionsError(f"{_where(path, _json_line(text, key))}: entry {key!r} needs an image name and "
                                f"a non-empty caption or list of non-empty captions, got {json.dumps(value)[:80]}")
        if caps and key.strip():
            out[key.strip()] = caps
        else:
            skipped.append(f"{_where(path, _json_line(text, key))} {key!r}")
    return out, skipped


def _header_columns(row: list[str], strict: bool) -> tuple[int, int] | None:
    """(image column, caption column) if ``row`` is a header naming both, else ``None``."""
    cells = [c.strip().lower() for c in row]
    images, captions = (IMAGE_COLUMNS[:1], CAPTION_COLUMNS[:1]) if strict else (IMAGE_COLUMNS, CAPTION_COLUMNS)
    img = next((i for i, c in enumerate(cells) if c in images), None)
    cap = next((i for i, c in enumerate(cells) if c in captions), None)
    return None if img is None or cap is None else (img, cap)


def _read_csv(path: Path, text: str, strict: bool) -> tuple[dict[str, list[str]], list[str]]:
    reader = csv.reader(io.StringIO(text))
    out: dict[str, list[str]] = {}
    skipped: list[str] = []
    cols: tuple[int, int] | None = None
    line = 1
    try:
        for row in reader:
            start, line = line, reader.line_num + 1  # a quoted caption may span several lines
            if not any(c.strip() for c in row):
                continue
            if cols is None:
                cols = _header_columns(row, strict)
                if cols is not None:
                    continue
                if strict:
                    raise CaptionsError(f"{path}:{start}: expected a header row with the columns "
                                        f"'image,caption', got {row[:4]}")
                cols = (0, 1)  # lenient: a headerless image,caption file
            image = row[cols[0]].strip() if len(row) > cols[0] else ""
            caption = row[cols[1]].strip() if len(row) > cols[1] else ""
            if not image or not caption:
                if strict:
                    raise CaptionsError(f"{path}:{start}: empty image or caption in row {row[:4]}")
                skipped.append(f"{path}:{start}")
                continue
            out.setdefault(image, []).append(caption)
    except csv.Error as e:
        raise CaptionsError(f"{path}:{reader.line_num}: malformed CSV ({e})") from e
    return out, skipped


__all__ = ["CAPTION_FILES", "IMAGE_COLUMNS", "CAPTION_COLUMNS", "CaptionSource", "find_captions_file",
           "read_captions", "captions_for_folder", "entry_captions"]
