"""Atomic, durable index writes (``quant.core.fileio``), with errors as ``StorageError`` naming the file."""
from __future__ import annotations

import errno
from pathlib import Path

from clipfp8.indexing.errors import StorageError
from clipfp8.quant.core import fileio
from clipfp8.quant.core.fileio import fsync_dir


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """Replace ``path`` by ``data`` atomically: readers see the old or the new file, never a
    partial one. Raises ``StorageError`` naming ``path`` (the temp file is removed)."""
    try:
        fileio.atomic_write_bytes(path, data)
    except OSError as e:
        hint = " (disk full)" if e.errno == errno.ENOSPC else ""
        raise StorageError(f"could not write {path}{hint}: {e}") from e


__all__ = ["atomic_write_bytes", "fsync_dir"]
