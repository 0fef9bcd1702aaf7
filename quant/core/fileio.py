"""Atomic, durable file and directory writes shared by every package.

* ``atomic_write_bytes`` / ``atomic_write_text``: a temp file in the same directory, fsync,
  rename over the target, fsync of the directory. Readers see the old or the new file, never a
  partial one; on failure the temp file is removed and the ``OSError`` propagates.
* ``atomic_path``: the same for writers that need a file name (``torch.onnx.export``,
  ``safetensors.save_file``, ``savefig``): they write the yielded temp path, the rest is done here.
* ``replace_dir``: swap a fully written temp directory in as ``target`` (its files fsynced first;
  the old directory is moved aside, the new one renamed in, the parent fsynced, and only then the
  old one deleted). Files written into such a staged directory need no fsync of their own.
* ``portable_path``: a path as recorded in committed results (relative, never this machine's).
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def _write_all(fd: int, data: memoryview) -> None:
    """Write every byte of ``data`` to ``fd`` (tests monkeypatch this to simulate ENOSPC)."""
    while data:
        n = os.write(fd, data[: 1 << 24])
        data = data[n:]


def _fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    _fsync_path(Path(path))


def fsync_file(path: Path) -> None:
    """Flush a file written by someone else (a library that only takes a file name) to disk."""
    _fsync_path(Path(path))


def fsync_tree(root: Path) -> None:
    """fsync every regular file and directory under ``root`` (symlinks are not followed), deepest
    first, so a directory renamed into place afterwards is complete after a crash."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                fsync_file(p)
        fsync_dir(Path(dirpath))


def _temp_name(path: Path) -> Path:
    # Hidden, in the same directory (same file system: the rename is atomic), unique per writer,
    # and ending in the target's suffix so format-sniffing writers (savefig) still work.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """Replace ``path`` by ``data`` atomically (the parent directory must exist)."""
    atomic_write_from(path, lambda write: write(data))


def atomic_write_from(path: str | Path, produce: Callable[[Callable[[bytes | memoryview], None]], None]) -> None:
    """``atomic_write_bytes`` for content handed over in pieces: ``produce(write)`` calls
    ``write(piece)`` in order, so no whole copy of the content is built in memory (a FAISS index
    streamed by ``faiss.write_index``). An exception of ``produce`` propagates and leaves
    ``path`` as it was."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            produce(lambda piece: _write_all(fd, memoryview(piece).cast("B")))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """``atomic_write_bytes`` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for a writer that needs a file name. On a normal exit the
    temp file is fsynced and renamed over ``path`` and the directory fsynced; on an exception it
    is removed and the exception propagates (``path`` keeps its old content)."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir(tmp: str | Path, target: str | Path) -> None:
    """Swap the finished directory ``tmp`` in as ``target`` (both in the same parent folder).

    Every file under ``tmp`` is fsynced first; an existing ``target`` is renamed aside, ``tmp`` is
    renamed to ``target``, the parent is fsynced, and only then the old directory is deleted. If
    renaming ``tmp`` fails, the old directory is renamed back and the ``OSError`` propagates
    (``tmp`` is left for the caller to remove). A crash leaves ``target`` old or new, or (between
    the two renames) the old one beside it as ``.NAME.old-*``. Raises ``ValueError`` if the two
    are not siblings and ``NotADirectoryError`` if ``target`` exists and is not a directory.
    """
    tmp, target = Path(tmp), Path(target)
    if tmp.parent.resolve() != target.parent.resolve():
        raise ValueError(f"replace_dir: {tmp} and {target} must be in the same folder")
    if not tmp.is_dir():
        raise NotADirectoryError(f"replace_dir: {tmp} is not a directory")
    if (target.exists() or target.is_symlink()) and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory; refusing to replace it")
    fsync_tree(tmp)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{secrets.token_hex(6)}")
        target.rename(old)
    try:
        tmp.rename(target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        if old.exists():
            log.warning("could not delete the replaced directory %s", old)


def cache_root() -> Path:
    """The project's cache folder: ``$XDG_CACHE_HOME/clipfp8`` (``~/.cache/clipfp8``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipfp8"


def portable_path(path: str | Path, base: str | Path) -> str:
    """``path`` as recorded in results that get committed: relative paths are kept (POSIX form);
    an absolute path under ``base`` or under ``base``'s parent (e.g. ``../shared/data``) becomes
    relative to ``base``; any other absolute path is kept as given (it is the user's own data)."""
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    base = Path(base).resolve()
    resolved = p.resolve()
    if base.parent != Path(base.anchor) and resolved.is_relative_to(base.parent):
        return Path(os.path.relpath(resolved, base)).as_posix()
    return str(p)


__all__ = ["cache_root", "atomic_write_bytes", "atomic_write_from", "atomic_write_text", "atomic_path", "replace_dir", "fsync_dir", "fsync_file",
           "fsync_tree", "portable_path"]
