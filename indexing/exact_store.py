"""The exact copy of an approximate index's vectors, on disk in float16, read a few rows at a time.

An IVF-PQ index answers from lossy codes; re-ranking its top ``k * R`` candidates needs the
original vectors. Keeping them in RAM as float32 (what ``IndexFlat`` would do) costs 4 * dim
bytes per vector -- 3 KB at 768-d, 30 GB at 10M -- which is what the compressed index avoids.
So they live beside the FAISS file as two ``.npy`` files, memory-mapped read-only:

    PREFIX.ids.npy   int64 (N,)         sorted ids
    PREFIX.f16.npy   float16 (N, dim)   the vector of ids[i] in row i

A query touches ``k * R`` rows (1,000 rows = 1.5 MB at 768-d), found by binary search in the ids;
the rest stays on disk (in the page cache when RAM is free). float16 keeps 11 significant bits:
re-ranked cosines match the float32 ones to ~1e-3, which is also what an fp16 encoder produces.

Changes made between two commits (``add``, ``remove``) are held in RAM and merged into new files
by ``write``, streamed in id order (the corpus is never loaded whole), each file written to a
temp name, fsynced and renamed. Generations are immutable once committed, so an unchanged copy
is hard-linked to the next generation's names instead of copied.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from clipfp8.indexing.errors import IndexCorruptError, StorageError
from clipfp8.quant.core import fileio

log = logging.getLogger(__name__)

IDS_SUFFIX, VECS_SUFFIX = ".ids.npy", ".f16.npy"
STORE_DTYPE = np.float16
_BATCH = 65_536


def paths(prefix: Path) -> tuple[Path, Path]:
    """(ids file, vectors file) of the copy stored under ``prefix`` (e.g. ``vectors/3.g7``)."""
    return prefix.with_name(prefix.name + IDS_SUFFIX), prefix.with_name(prefix.name + VECS_SUFFIX)


def _in_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """bool (len(ids),): which of ``ids`` occur in the sorted array ``sorted_ids``."""
    if not len(sorted_ids):
        return np.zeros(len(ids), bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return np.asarray(sorted_ids[pos] == ids)


class ExactVectors:
    """Exact vectors keyed by int64 id: a committed base (memory-mapped files, or empty) plus
    pending additions (float16, RAM) and removals (ids) since the last ``write``."""

    def __init__(self, dim: int, ids: np.ndarray | None = None, vecs: np.ndarray | None = None,
                 prefix: Path | None = None) -> None:
        self.dim, self._prefix = dim, prefix
        self._ids = ids if ids is not None else np.zeros(0, np.int64)
        self._vecs = vecs if vecs is not None else np.zeros((0, dim), STORE_DTYPE)
        self._pending_ids = np.zeros(0, np.int64)
        self._pending_vecs = np.zeros((0, dim), STORE_DTYPE)
        self._dropped = np.zeros(0, np.int64)  # sorted base ids removed or replaced

    @classmethod
    def open(cls, prefix: Path, dim: int) -> ExactVectors:
        """Memory-map the copy written under ``prefix``. Raises ``FileNotFoundError`` when a file
        is gone (a writer replaced the generation: the caller retries) and ``IndexCorruptError``
        when the files do not describe (N,) ids and (N, dim) float16 vectors."""
        ids_path, vecs_path = paths(prefix)
        try:
            ids = np.load(ids_path, mmap_mode="r")
            vecs = np.load(vecs_path, mmap_mode="r")
        except ValueError as e:
            raise IndexCorruptError(f"unreadable exact-vector files {ids_path.name}, {vecs_path.name}: {e}") from e
        if ids.dtype != np.int64 or ids.ndim != 1 or vecs.dtype != STORE_DTYPE or vecs.shape != (len(ids), dim):
            raise IndexCorruptError(f"{vecs_path}: expected int64 ({len(ids)},) ids and float16 ({len(ids)}, {dim}) "
                                    f"vectors, got {ids.dtype} {ids.shape} and {vecs.dtype} {vecs.shape}")
        return cls(dim, ids, vecs, prefix)

    # ----- contents -----------------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        """True when changes are waiting for ``write``."""
        return bool(len(self._pending_ids) or len(self._dropped))

    @property
    def ntotal(self) -> int:
        return len(self._ids) - len(self._dropped) + len(self._pending_ids)

    def ids(self) -> np.ndarray:
        """int64 (ntotal,) every stored id, sorted."""
        return np.concatenate([i for i, _ in self._merged(_BATCH, with_vectors=False)] or [np.zeros(0, np.int64)])

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """float32 (len(ids), dim): the stored vectors of ``ids`` (int64). Raises
        ``IndexCorruptError`` for an id that is not stored."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), np.float32)
        in_pending = _in_sorted(self._pending_ids, ids)
        if in_pending.any():
            out[in_pending] = self._pending_vecs[np.searchsorted(self._pending_ids, ids[in_pending])]
        rest = ~in_pending
        want = ids[rest]
        pos = np.minimum(np.searchsorted(self._ids, want), max(len(self._ids) - 1, 0))
        found = (np.asarray(self._ids[pos] == want) if len(self._ids) else np.zeros(len(want), bool))
        found &= ~_in_sorted(self._dropped, want)
        if not found.all():
            raise IndexCorruptError(f"ids {want[~found][:5].tolist()} have no exact vector (run `clipfp8 verify --repair`)")
        order = np.argsort(pos, kind="stable")  # ascending file offsets: sequential-ish reads
        rows = np.empty((len(want), self.dim), np.float32)
        rows[order] = self._vecs[pos[order]]
        out[rest] = rows
        return out

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store ``vectors`` float32 (N, dim) under ``ids`` int64 (N,); an id already stored is replaced."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        vectors = np.asarray(vectors).astype(STORE_DTYPE)
        self._drop_base(ids)
        keep = ~_in_sorted(np.sort(ids), self._pending_ids)
        all_ids = np.concatenate([self._pending_ids[keep], ids])
        all_vecs = np.concatenate([self._pending_vecs[keep], vectors])
        all_ids, first = np.unique(all_ids[::-1], return_index=True)  # the last write of an id wins
        self._pending_ids, self._pending_vecs = all_ids, all_vecs[::-1][first]

    def remove(self, ids: np.ndarray) -> int:
        """Forget ``ids`` (int64); returns how many were stored."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        pending = _in_sorted(ids, self._pending_ids)
        n = int(pending.sum()) + self._drop_base(ids)
        self._pending_ids, self._pending_vecs = self._pending_ids[~pending], self._pending_vecs[~pending]
        return n

    def _drop_base(self, ids: np.ndarray) -> int:
        ids = np.unique(ids)
        hit = ids[_in_sorted(self._ids, ids) & ~_in_sorted(self._dropped, ids)]
        if len(hit):
            self._dropped = np.union1d(self._dropped, hit)
        return len(hit)

    # ----- streaming ----------------------------------------------------------------------
    def _merged(self, batch: int, with_vectors: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids int64 (B,), vectors float16 (B, dim) or empty) in id order, base and pending merged."""
        n, p = len(self._ids), 0
        for s in range(0, n, batch):
            ids = np.asarray(self._ids[s:s + batch])
            keep = ~_in_sorted(self._dropped, ids)
            vecs = np.asarray(self._vecs[s:s + batch][keep]) if with_vectors else np.zeros((0, self.dim), STORE_DTYPE)
            ids = ids[keep]
            end = len(self._pending_ids) if s + batch >= n else int(np.searchsorted(self._pending_ids, self._ids[s + batch]))
            if end > p:
                ids = np.concatenate([ids, self._pending_ids[p:end]])
                order = np.argsort(ids, kind="stable")
                ids = ids[order]
                if with_vectors:
                    vecs = np.concatenate([vecs, self._pending_vecs[p:end]])[order]
                p = end
            yield ids, vecs
        for s in range(p if n == 0 else len(self._pending_ids), len(self._pending_ids), batch):
            yield self._pending_ids[s:s + batch], self._pending_vecs[s:s + batch]

    def batches(self, batch: int = _BATCH) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids int64 (B,), vectors float32 (B, dim)) over every stored vector, in id order."""
        for ids, vecs in self._merged(batch):
            yield ids, vecs.astype(np.float32)

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """float32 (min(n, ntotal), dim): stored vectors drawn uniformly without replacement."""
        rng = np.random.default_rng(seed)
        total = self.ntotal
        n = min(n, total)
        pick = np.sort(rng.choice(total, size=n, replace=False)) if n < total else np.arange(total)
        if not self.dirty:  # rows straight from the file, in offset order
            return np.asarray(self._vecs[pick]).astype(np.float32)
        out, seen = [], 0
        for _ids, vecs in self._merged(_BATCH):  # one sequential pass: rows read in file order
            sel = pick[(pick >= seen) & (pick < seen + len(vecs))] - seen
            out.append(vecs[sel].astype(np.float32))
            seen += len(vecs)
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    # ----- persistence --------------------------------------------------------------------
    def write(self, prefix: Path) -> list[Path]:
        """Write the merged copy under ``prefix`` (each file atomically), then serve reads from
        it (the pending changes are dropped from RAM). Returns the files written. Raises
        ``StorageError`` naming the file (disk full, ...); the temp files are removed."""
        ids_path, vecs_path = paths(prefix)
        try:
            if not self.dirty and self._prefix is not None:
                for src, dst in zip(paths(self._prefix), (ids_path, vecs_path), strict=True):
                    _link_or_copy(src, dst)
            else:
                self._write_merged(ids_path, vecs_path)
        except OSError as e:
            hint = " (disk full)" if e.errno == errno.ENOSPC else ""
            raise StorageError(f"could not write {vecs_path}{hint}: {e}") from e
        fresh = ExactVectors.open(prefix, self.dim)
        self.__dict__.update(fresh.__dict__)
        return [ids_path, vecs_path]

    def _write_merged(self, ids_path: Path, vecs_path: Path) -> None:
        write_sorted(ids_path.with_name(ids_path.name.removesuffix(IDS_SUFFIX)), self.dim, self.ntotal, self._merged(_BATCH))


def write_sorted(prefix: Path, dim: int, n: int, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> list[Path]:
    """Stream ``n`` vectors into the files of ``prefix``, each written atomically: ``batches`` of
    (ids int64 (B,), vectors (B, dim), any float dtype) in increasing id order. Raises
    ``OSError`` from the file system and ``IndexCorruptError`` when the count or order is off."""
    ids_path, vecs_path = paths(prefix)
    with fileio.atomic_path(ids_path) as tmp_ids, fileio.atomic_path(vecs_path) as tmp_vecs:
        with open(tmp_ids, "wb") as fi, open(tmp_vecs, "wb") as fv:
            np.lib.format.write_array_header_1_0(fi, {"descr": "<i8", "fortran_order": False, "shape": (n,)})
            np.lib.format.write_array_header_1_0(
                fv, {"descr": np.dtype(STORE_DTYPE).str, "fortran_order": False, "shape": (n, dim)})
            written, last = 0, None
            for ids, vecs in batches:
                ids = np.ascontiguousarray(ids, "<i8")
                if len(ids) and ((last is not None and ids[0] <= last) or (np.diff(ids) <= 0).any()):
                    raise IndexCorruptError(f"{ids_path}: ids must be written in increasing order")
                fi.write(ids.tobytes())
                fv.write(np.ascontiguousarray(vecs, STORE_DTYPE).tobytes())
                written += len(ids)
                last = ids[-1] if len(ids) else last
        if written != n:
            raise IndexCorruptError(f"{vecs_path}: wrote {written} rows, expected {n}")
    return [ids_path, vecs_path]


def _link_or_copy(src: Path, dst: Path) -> None:
    """Give an unchanged, immutable file a second name (a hard link; a copy where links fail)."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
        fileio.fsync_dir(dst.parent)
    except OSError:
        with fileio.atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
