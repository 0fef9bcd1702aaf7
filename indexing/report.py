"""Finding bad files, and printing paths safely.

``list_errors`` reads the bad files (``status='error'`` rows) of an index: path, reason, detail,
size. ``display_path`` makes any path one unambiguous printable line (file names may hold
newlines, tabs, terminal escapes or bytes that are not UTF-8); ``--json`` outputs give exact
paths instead.
"""
from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clipfp8.indexing import db as dbm

_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Bidirectional-text controls can make a name display as another (e.g. "gpj.exe" as "exe.jpg").
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def display_path(path: str) -> str:
    """``path`` as one printable line: backslash, control characters (C0, DEL, C1), line and
    paragraph separators and bidi controls as C-style escapes (``\\n``, ``\\t``, ``\\x1b``,
    ``\\u2028``), bytes that were not UTF-8 (``os.fsdecode``'s surrogate escapes) as ``\\xff``.
    Everything else, non-ASCII letters included, is unchanged."""
    if path.isprintable() and "\\" not in path:
        return path
    out = []
    for ch in path:
        o = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0xDC80 <= o <= 0xDCFF:  # an undecodable byte, as os.fsdecode escapes it
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o < 0x20 or 0x7F <= o < 0xA0:
            out.append(f"\\x{o:02x}")
        elif ch in _BIDI or ch in "\u2028\u2029" or 0xD800 <= o <= 0xDFFF:
            out.append(f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


@dataclass(frozen=True)
class BadFile:
    """One bad file of an index: ``path`` relative to the corpus (``os.fsdecode`` of the stored
    bytes), ``reason`` (the tag, e.g. ``oversized``), ``detail`` (the rest of the message),
    ``size`` in bytes as scanned (0 for files that could not be stat-ed or are not regular)."""

    path: str
    reason: str
    detail: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """``path<TAB>reason<TAB>size<TAB>detail``, escaped to one line."""
        return "\t".join((display_path(self.path), self.reason, str(self.size), display_path(self.detail)))


def list_errors(index_dir: str | Path, reason: Sequence[str] = (), limit: int | None = None) -> list[BadFile]:
    """The bad files recorded in ``index_dir``, sorted by path; only those with one of the
    reasons ``reason`` when given; at most ``limit``. Read-only (safe while a writer runs)."""
    from clipfp8.indexing.store import open_index

    with open_index(index_dir) as store:
        rows = dbm.error_rows(store.db, reason, limit)
    return [BadFile(os.fsdecode(bytes(r["path_raw"])), r["reason"],
                    r["error"].split(":", 1)[1].strip() if ":" in r["error"] else "", int(r["size"] or 0))
            for r in rows]


def format_bad_files(errors: Sequence[tuple[str, str]], total: int, index_dir: str | Path,
                     limit: int = 20) -> str:
    """The index summary's tail: the first ``limit`` of this run's bad files (``errors``:
    (path, error)), then how many the index holds in all and the command that lists them.
    Empty when the index holds none."""
    lines = []
    if errors and limit > 0:
        more = f", the first {limit}" if len(errors) > limit else ""
        lines.append(f"bad files found in this run ({len(errors)}{more}):")
        lines += [f"  {display_path(p)}  ({display_path(e)})" for p, e in errors[:limit]]
    if total:
        lines.append(f"bad files in the index: {total}; list them with "
                     f"`clipfp8 errors --index-dir {shlex.quote(str(index_dir))}`")
    return "\n".join(lines)


__all__ = ["display_path", "BadFile", "list_errors", "format_bad_files"]
