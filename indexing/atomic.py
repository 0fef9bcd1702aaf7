"""Atomic, durable file writes: temp file in the same directory + fsync + rename + dir fsync."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from indexing.errors import StorageError


def _write_all(fd: int, data: memoryview) -> None:
    """Write every byte of ``data`` to ``fd`` (tests monkeypatch this to simulate ENOSPC)."""
    while data:
        n = os.write(fd, data[: 1 << 24])
        data = data[n:]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """Replace ``path`` by ``data`` atomically: readers see the old or the new file, never a
    partial one. Raises ``StorageError`` naming ``path`` (the temp file is removed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, memoryview(data).cast("B"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        hint = " (disk full)" if e.errno == errno.ENOSPC else ""
        raise StorageError(f"could not write {path}{hint}: {e}") from e
