"""Remembered weight digests of checkpoint files, so a cold start does not hash 1.7 GB again.

An encoder's identity (``LoadedModel.weights_checksum``: sha256 over every tensor) is what
indexes and compiled engines are keyed by. Hashing ViT-L/14's weights took 1.5 s of every cold
``clipfp8 search`` on the H200 (profile, 2026-12-04) and 2.5 s on a 2-core CPU. The digest of a
checkpoint file's weights is stored in ``<cache_root>/checksums.json`` under the file's identity
(resolved path, size, mtime, ctime, inode), and used only while the loaded tensors are still the
ones loaded (same storage, no in-place change since: ``LoadStamp.matches``).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from clipfp8.quant.core.fileio import atomic_write_text, cache_root

log = logging.getLogger(__name__)

CACHE_FILE = "checksums.json"
#: Entries kept in the cache file (the newest); one per checkpoint a user loads.
MAX_ENTRIES = 256


def cache_file() -> Path:
    return cache_root() / CACHE_FILE


def file_key(path: str | Path) -> str:
    """The identity of a file's current content as the filesystem reports it. Raises
    ``OSError`` when the file cannot be stat'ed."""
    p = Path(path).resolve()
    st = p.stat()
    return json.dumps([str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])


def _read() -> dict[str, str]:
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) else {}


def try_file_key(path: str | Path) -> str | None:
    try:
        return file_key(path)
    except OSError:
        return None


def lookup(key: str) -> str | None:
    """The digest remembered for ``key``, or None."""
    return _read().get(key)


def remember(key: str, checksum: str) -> None:
    """Store ``checksum`` for ``key`` (best effort: a read-only cache only costs the next cold
    start its hashing)."""
    entries = _read()
    entries.pop(key, None)
    entries[key] = checksum
    kept = dict(list(entries.items())[-MAX_ENTRIES:])
    try:
        cache_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_file(), json.dumps(kept, indent=0))
    except OSError as e:
        log.debug("checksum cache %s not written: %s", cache_file(), e)


def _fingerprint(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    # detach() (state_dict's) shares the version counter: an in-place change shows here.
    return {k: (int(t.data_ptr()), int(t._version)) for k, t in state.items()}


@dataclass(frozen=True)
class LoadStamp:
    """A checkpoint file's path and identity, and its loaded tensors' (storage, version) right
    after load."""

    path: Path
    key: str
    tensors: dict[str, tuple[int, int]]

    @classmethod
    def of(cls, path: str | Path, key: str | None, state: dict[str, torch.Tensor]) -> LoadStamp | None:
        """``key``: ``file_key(path)`` taken before the file was read (None: no stamp)."""
        return None if key is None else cls(Path(path), key, _fingerprint(state))

    def matches(self, state: dict[str, torch.Tensor]) -> bool:
        """Whether ``state`` holds exactly the tensors loaded, unchanged since, and the file is
        still the one loaded: safetensors maps the file, so weights loaded by assignment change
        with it if it is overwritten in place (same storage, same version counter)."""
        return _fingerprint(state) == self.tensors and try_file_key(self.path) == self.key


__all__ = ["LoadStamp", "CACHE_FILE", "cache_file", "file_key", "try_file_key", "lookup", "remember"]
