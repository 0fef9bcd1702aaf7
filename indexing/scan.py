"""Stage 1, scan: walk the corpus and list candidate image files with their size and mtime.

Paths are handled as bytes (``os.fsencode``) so that file names which are not valid UTF-8
survive the round trip to the database and back to the file system.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from clipfp8.indexing.errors import CorpusError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileEntry:
    """One candidate file: ``rel`` is its path relative to the corpus root, as bytes."""

    rel: bytes
    size: int
    mtime_ns: int

    @property
    def rel_str(self) -> str:
        return os.fsdecode(self.rel)


@dataclass
class ScanResult:
    """Files found (sorted by ``rel``) and files that could not even be stat-ed: (rel, reason)."""

    files: list[FileEntry] = field(default_factory=list)
    errors: list[tuple[bytes, str]] = field(default_factory=list)


def check_corpus(corpus: str | Path) -> Path:
    """The absolute corpus root; raises ``CorpusError`` naming it when unusable."""
    root = Path(corpus).expanduser()
    if not root.exists():
        raise CorpusError(f"corpus path does not exist: {root}")
    if not root.is_dir():
        raise CorpusError(f"corpus path is not a directory: {root}")
    return root.resolve()


def scan_corpus(root: Path, extensions: tuple[str, ...], exclude: Path | None = None,
                follow_symlinks: bool = True) -> ScanResult:
    """Recursively list files under ``root`` whose lower-cased suffix is in ``extensions``.
    Matching names that are not regular files (FIFOs, devices, sockets) go to ``errors`` with
    reason ``not_regular_file``; they are never opened.

    Directory symlinks are followed when ``follow_symlinks``; each real directory is visited once
    (by (device, inode)), so symlink loops terminate. ``exclude`` (the index directory, when it
    lives inside the corpus) is skipped.
    """
    exts = tuple(os.fsencode(e) for e in extensions)
    result = ScanResult()
    seen: set[tuple[int, int]] = set()
    skip = _dir_key(exclude) if exclude is not None and exclude.exists() else None
    # Real directories first, symlinked ones afterwards, so a directory reachable both ways is
    # listed under its real path (the result does not depend on listing order).
    stack: list[bytes] = [b""]
    linked: list[bytes] = []
    root_b = os.fsencode(str(root))
    while stack or linked:
        rel_dir = stack.pop() if stack else linked.pop(0)
        abs_dir = os.path.join(root_b, rel_dir) if rel_dir else root_b
        try:
            key = _dir_key(abs_dir)
            if key in seen or key == skip:
                continue
            seen.add(key)
            entries = list(os.scandir(abs_dir))
        except OSError as e:
            log.warning("cannot read directory %s: %s", os.fsdecode(abs_dir), e)
            result.errors.append((rel_dir, f"unreadable_dir: {e.strerror}"))
            continue
        for ent in sorted(entries, key=lambda e: e.name, reverse=True):
            _visit(ent, os.path.join(rel_dir, ent.name) if rel_dir else ent.name, exts,
                   follow_symlinks, stack, linked, result)
    result.files.sort(key=lambda f: f.rel)
    result.errors.sort()
    return result


def _dir_key(path: bytes | str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _visit(ent: os.DirEntry, rel: bytes, exts: tuple[bytes, ...], follow: bool,
           stack: list[bytes], linked: list[bytes], result: ScanResult) -> None:
    try:
        is_link = ent.is_symlink()
        st = ent.stat(follow_symlinks=follow)
    except OSError as e:
        if ent.name.lower().endswith(exts):
            reason = "symlink_loop" if e.errno == errno.ELOOP else (
                "broken_symlink" if e.errno == errno.ENOENT else f"stat_failed: {e.strerror}")
            result.errors.append((rel, reason))
        return
    if stat.S_ISDIR(st.st_mode):
        if not is_link:
            stack.append(rel)
        elif follow:
            linked.append(rel)
    elif ent.name.lower().endswith(exts):
        if stat.S_ISREG(st.st_mode):
            result.files.append(FileEntry(rel, st.st_size, st.st_mtime_ns))
        elif not stat.S_ISLNK(st.st_mode):  # a symlink here: not followed, by request
            # FIFOs, devices, sockets (or symlinks to them) are never opened -- opening a FIFO
            # blocks, reading a device may never end -- but they are recorded, so the user
            # can find them.
            result.errors.append((rel, f"not_regular_file: {special_file_kind(st.st_mode)}"))


def special_file_kind(mode: int) -> str:
    """What a non-regular file is, in words ("fifo", "character device", ...)."""
    for test, name in ((stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"
