"""Atomic, durable index writes (``quant.core.fileio``), with errors as ``StorageError`` naming the file."""
from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

from clipfp8.indexing.errors import StorageError
from clipfp8.quant.core import fileio
from clipfp8.quant.core.fileio import fsync_dir


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """Replace ``path`` by ``data`` atomically: readers see the old or the new file, never a
    partial one. Raises ``StorageError`` naming ``path`` (the temp file is removed)."""
    atomic_write_from(path, lambda write: write(data))


def atomic_write_from(path: str | Path, produce: Callable[[Callable[[bytes | memoryview], None]], None]) -> None:
    """``atomic_write_bytes`` of content ``produce(write)`` hands over in pieces
    (``fileio.atomic_write_from``): a FAISS index written by ``faiss.write_index`` through a
    ``PyCallbackIOWriter`` needs no serialized copy of itself in memory. Raises ``StorageError``
    naming ``path``."""
    try:
        fileio.atomic_write_from(path, produce)
    except OSError as e:
        hint = " (disk full)" if e.errno == errno.ENOSPC else ""
        raise StorageError(f"could not write {path}{hint}: {e}") from e


__all__ = ["atomic_write_bytes", "atomic_write_from", "fsync_dir"]
