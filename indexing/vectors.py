"""One encoder's vectors: a FAISS inner-product index keyed by SQLite image ids.

Layouts, chosen from the factory string:
  * ``flat``  -- ``IndexIDMap2(IndexFlatIP)``: exact; used for "Flat" and, until enough vectors
    exist to train, for trainable factories too.
  * ``ivf``   -- the factory's IVF index itself (it stores ids natively; removal supported).
  * ``other`` -- ``IndexIDMap2(factory index)`` (e.g. HNSW); removal rebuilds it (HNSW cannot delete).

Approximate layouts keep an exact copy (``raw``, an ``IndexIDMap2(IndexFlatIP)``) next to the
search structure: it makes re-ranking exact even for lossy codes (PQ, SQ), feeds training and
export, and lets HNSW be rebuilt after deletions. Both go into one file (see ``to_bytes``).
"""
from __future__ import annotations

import logging
import re
import struct

import faiss
import numpy as np

from clipfp8.indexing.errors import IndexConfigError, IndexCorruptError, QueryError

log = logging.getLogger(__name__)

DEFAULT_NPROBE = 16
_MAGIC = b"CLIPFP8VECS1"


def _ivf_nlist(factory: str) -> int | None:
    m = re.search(r"IVF(\d+)", factory)
    return int(m.group(1)) if m else None


def _flat(dim: int) -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def _deserialize(data: bytes | memoryview) -> faiss.Index:
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as e:
        raise IndexCorruptError(f"unreadable FAISS data: {e}") from e


class VectorIndex:
    """Unit-norm float32 vectors (N, dim) with int64 ids; inner product = cosine similarity."""

    def __init__(self, index: faiss.Index, factory: str, dim: int, raw: faiss.Index | None = None) -> None:
        self.index, self.factory, self.dim, self.raw = index, factory, dim, raw
        self._ivf = faiss.try_extract_index_ivf(index) if not isinstance(index, faiss.IndexIDMap) else None
        if self._ivf is not None:
            self._ivf.nprobe = min(DEFAULT_NPROBE, self._ivf.nlist)

    # ----- construction and serialisation -----------------------------------------------
    @classmethod
    def new(cls, dim: int, factory: str = "Flat") -> VectorIndex:
        if factory.strip().lower() == "flat" or not _factory(dim, factory).is_trained:
            return cls(_flat(dim), factory, dim)
        return cls(faiss.IndexIDMap2(_factory(dim, factory)), factory, dim, raw=_flat(dim))

    def to_bytes(self) -> bytes:
        """A plain FAISS file for exact layouts; else MAGIC + len + FAISS(index) + FAISS(raw)."""
        main = faiss.serialize_index(self.index).tobytes()
        if self.raw is None:
            return main
        return _MAGIC + struct.pack("<Q", len(main)) + main + faiss.serialize_index(self.raw).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, factory: str, dim: int) -> VectorIndex:
        raw = None
        if data.startswith(_MAGIC):
            n = struct.unpack_from("<Q", data, len(_MAGIC))[0]
            start = len(_MAGIC) + 8
            index, raw = _deserialize(data[start:start + n]), _deserialize(data[start + n:])
        else:
            index = _deserialize(data)
        if index.d != dim:
            raise IndexCorruptError(f"FAISS index has dim {index.d}, database says {dim}")
        return cls(index, factory, dim, raw)

    # ----- properties ---------------------------------------------------------------------
    @property
    def kind(self) -> str:
        if self._ivf is not None:
            return "ivf"
        inner = faiss.downcast_index(self.index.index)
        return "flat" if isinstance(inner, faiss.IndexFlat) else "other"

    @property
    def exact(self) -> bool:
        """True when search itself is exact (no re-ranking needed)."""
        return self.kind == "flat"

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    # ----- contents -----------------------------------------------------------------------
    def ids(self) -> np.ndarray:
        """int64 (N,) ids of the search structure, in storage order."""
        if self._ivf is None:
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        inv = self._ivf.invlists
        parts = [faiss.rev_swig_ptr(inv.get_ids(lst), inv.list_size(lst)).copy()
                 for lst in range(self._ivf.nlist) if inv.list_size(lst)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """ids int64 (N,), vectors float32 (N, dim)."""
        if len(ids):
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            self.index.add_with_ids(vectors, ids)
            if self.raw is not None:
                self.raw.add_with_ids(vectors, ids)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """float32 (len(ids), dim): the exact stored vectors."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        return (self.raw if self.raw is not None else self.index).reconstruct_batch(ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove ``ids`` (int64); returns how many were stored."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return 0
        if self.raw is not None:
            self.raw.remove_ids(faiss.IDSelectorBatch(ids))
        if self.kind == "other":  # e.g. HNSW: no deletion; rebuild from the exact copy
            n_before = self.ntotal
            keep = faiss.vector_to_array(self.raw.id_map).astype(np.int64)
            self.index = faiss.IndexIDMap2(_factory(self.dim, self.factory))
            self.index.add_with_ids(self.raw.reconstruct_batch(keep), keep)
            return n_before - self.ntotal
        return int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))

    def training_due(self, train_min: int = 0) -> bool:
        """True when this is the exact placeholder of a trainable factory and enough vectors
        exist to train it (``train_min``, default 39 * nlist for IVF)."""
        if self.kind != "flat" or self.factory.strip().lower() == "flat":
            return False
        nlist = _ivf_nlist(self.factory)
        return self.ntotal >= (train_min or (39 * nlist if nlist else 1))

    def maybe_train(self, train_min: int = 0) -> bool:
        """Switch from the exact placeholder to the trained factory index once enough vectors
        exist (the placeholder becomes the exact copy); returns True when it did."""
        if not self.training_due(train_min):
            return False
        ids = self.ids()
        vecs = self.reconstruct(ids)
        index = _factory(self.dim, self.factory)
        index.train(vecs)
        if faiss.try_extract_index_ivf(index) is None:
            index = faiss.IndexIDMap2(index)
        index.add_with_ids(vecs, ids)
        self.__init__(index, self.factory, self.dim, raw=self.index)  # type: ignore[misc]
        log.info("trained %s on %d vectors", self.factory, len(ids))
        return True

    # ----- search -------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries float32 (Q, dim) -> (scores float32 (Q, k'), ids int64 (Q, k')), k' = min(k, N);
        missing slots have id -1."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise QueryError(f"query vectors must be (Q, {self.dim}), got {queries.shape}")
        if self.ntotal == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        k = max(1, min(k, self.ntotal))
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def _factory(dim: int, factory: str) -> faiss.Index:
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise IndexConfigError(f"--factory {factory!r} is not a valid FAISS factory string: {e}") from e
