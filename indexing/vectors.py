"""One encoder's vectors: a FAISS inner-product index keyed by SQLite image ids.

Layouts, chosen from the factory string:
  * ``flat``  -- ``IndexIDMap2(IndexFlatIP)``: exact; used for "Flat" and, until enough vectors
    exist to train, for trainable factories too.
  * ``ivf``   -- the factory's IVF index itself (it stores ids natively; removal supported).
  * ``other`` -- ``IndexIDMap2(factory index)`` (e.g. HNSW); removal rebuilds it (HNSW cannot delete).

Approximate layouts keep an exact copy (``raw``, an ``IndexIDMap2(IndexFlatIP)``) next to the
search structure: it makes re-ranking exact even for lossy codes (PQ, SQ), feeds training and
export, and lets HNSW be rebuilt after deletions. Both go into one file (see ``to_bytes``).

``auto`` / ``auto:<budget>`` (``--factory auto``, ``--index-budget``; ``indexing.faiss_factory``):
flat below ``FLAT_MAX_VECTORS``, then an IVF planned for the current size and budget, re-planned
when the corpus has grown ~16x. Its exact copy is not in RAM but on disk beside the FAISS file,
in float16 (``exact_copy``, an ``indexing.exact_store.ExactVectors``), so the RAM per vector
stays within the budget (~80 bytes at 10M) while re-ranking stays exact; ``save``/``load`` write
and map those files.
"""
from __future__ import annotations

import logging
import re
import struct
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from clipfp8.indexing import faiss_factory as ff
from clipfp8.indexing.atomic import atomic_write_bytes, atomic_write_from
from clipfp8.indexing.errors import IndexConfigError, IndexCorruptError, QueryError
from clipfp8.indexing.exact_store import ExactVectors

log = logging.getLogger(__name__)

DEFAULT_NPROBE = 16
_MAGIC = b"CLIPFP8VECS1"
#: An ``auto`` IVF index whose exact copy is in ``exact_store`` files beside this one.
_MAGIC_DISK = b"CLIPFP8VECS2"


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


def _id_map(index: faiss.Index) -> faiss.IndexIDMap:
    """The ``IndexIDMap2`` wrapper of a ``flat``/``other`` layout. FAISS hands back downcast
    objects (built or deserialised), so the isinstance check narrows the type and catches a file
    whose non-IVF index lacks the id map."""
    if not isinstance(index, faiss.IndexIDMap):
        raise IndexCorruptError(f"FAISS index is a {type(index).__name__}, expected an IndexIDMap2 or an IVF index")
    return index


def _mapped_ids(index: faiss.Index) -> np.ndarray:
    """int64 (N,) ids of an ``IndexIDMap2``, in storage order."""
    return faiss.vector_to_array(_id_map(index).id_map).astype(np.int64)


class VectorIndex:
    """Unit-norm float32 vectors (N, dim) with int64 ids; inner product = cosine similarity."""

    def __init__(self, index: faiss.Index, factory: str, dim: int, raw: faiss.Index | None = None,
                 exact: ExactVectors | None = None) -> None:
        self.factory, self.dim = factory, dim
        self._adopt(index, raw, exact)

    def _adopt(self, index: faiss.Index, raw: faiss.Index | None, exact: ExactVectors | None = None) -> None:
        """Make ``index`` the search structure and ``raw`` (in RAM) or ``exact`` (on disk) its
        exact copy (neither: ``index`` is exact)."""
        self.index, self.raw, self.exact_copy = index, raw, exact
        self._ivf = faiss.try_extract_index_ivf(index) if not isinstance(index, faiss.IndexIDMap) else None
        if self._ivf is not None and exact is None:  # an auto index keeps the nprobe it was planned with
            self._ivf.nprobe = min(DEFAULT_NPROBE, self._ivf.nlist)

    # ----- construction and serialisation -----------------------------------------------
    @classmethod
    def new(cls, dim: int, factory: str = "Flat") -> VectorIndex:
        if ff.is_auto(factory):
            ff.budget_of(factory)  # a bad budget fails here, before any work
            return cls(_flat(dim), factory, dim)
        if factory.strip().lower() == "flat" or not _factory(dim, factory).is_trained:
            return cls(_flat(dim), factory, dim)
        return cls(faiss.IndexIDMap2(_factory(dim, factory)), factory, dim, raw=_flat(dim))

    def to_bytes(self) -> bytes:
        """A plain FAISS file for exact layouts; else MAGIC + len + FAISS(index) + FAISS(raw)."""
        main = faiss.serialize_index(self.index).tobytes()
        if self.exact_copy is not None:
            return _MAGIC_DISK + main
        if self.raw is None:
            return main
        return _MAGIC + struct.pack("<Q", len(main)) + main + faiss.serialize_index(self.raw).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, factory: str, dim: int, exact: ExactVectors | None = None) -> VectorIndex:
        """The inverse of ``to_bytes``; ``exact``: the on-disk copy of a ``_MAGIC_DISK`` file (``load``)."""
        raw = None
        if data.startswith(_MAGIC_DISK):
            if exact is None:
                raise IndexCorruptError("FAISS file of an auto index read without its exact-vector files")
            index = _deserialize(memoryview(data)[len(_MAGIC_DISK):])
        elif data.startswith(_MAGIC):
            n = struct.unpack_from("<Q", data, len(_MAGIC))[0]
            start = len(_MAGIC) + 8
            index, raw = _deserialize(data[start:start + n]), _deserialize(data[start + n:])
        else:
            index = _deserialize(data)
        if index.d != dim:
            raise IndexCorruptError(f"FAISS index has dim {index.d}, database says {dim}")
        return cls(index, factory, dim, raw, exact)

    @classmethod
    def load(cls, path: Path, factory: str, dim: int) -> VectorIndex:
        """Read the FAISS file ``path`` (and memory-map its exact-vector files, if it has them).
        ``FileNotFoundError`` when a file is gone (a writer replaced the generation)."""
        data = path.read_bytes()
        exact = ExactVectors.open(path.with_suffix(""), dim) if data.startswith(_MAGIC_DISK) else None
        return cls.from_bytes(data, factory, dim, exact)

    def save(self, path: Path) -> list[Path]:
        """Write the FAISS file ``path`` and, for an on-disk exact copy, its files beside it
        (``exact_store.paths(path.with_suffix(""))``), each atomically. Returns the files written."""
        written = []
        if self.exact_copy is not None:
            written += self.exact_copy.write(path.with_suffix(""))
        if self.raw is None:  # the layouts without a length field: streamed, no copy in memory
            atomic_write_from(path, self._stream)
        else:
            atomic_write_bytes(path, self.to_bytes())
        return [*written, path]

    def _stream(self, write: Callable[[bytes | memoryview], None]) -> None:
        """``to_bytes()`` of a layout without ``raw``, handed to ``write`` by ``faiss.write_index``
        piece by piece as it serializes (headers of a few bytes, vector data in pieces of at most
        8 MiB): a commit point of 32,768 768-d vectors wrote its file in 0.09 s
        instead of 0.27 s through ``serialize_index`` and ``tobytes`` (2-core CPU, 2026-12-05),
        on the thread that feeds the GPU."""
        if self.exact_copy is not None:
            write(_MAGIC_DISK)
        faiss.write_index(self.index, faiss.PyCallbackIOWriter(write, 8 << 20))  # type: ignore[attr-defined]  # not in the stubs

    # ----- properties ---------------------------------------------------------------------
    @property
    def kind(self) -> str:
        if self._ivf is not None:
            return "ivf"
        inner = faiss.downcast_index(_id_map(self.index).index)
        return "flat" if isinstance(inner, faiss.IndexFlat) else "other"

    @property
    def exact(self) -> bool:
        """True when search itself is exact (no re-ranking needed)."""
        return self.kind == "flat"

    @property
    def rerank_factor(self) -> int | None:
        """Candidates per wanted result to re-rank for an ``auto`` IVF index (50 for its 4-bit codes),
        None for the other layouts (``query.RERANK_FACTOR`` applies)."""
        return ff.rerank_factor(self.index) if self.exact_copy is not None else None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    # ----- contents -----------------------------------------------------------------------
    def ids(self) -> np.ndarray:
        """int64 (N,) ids of the search structure, in storage order."""
        if self._ivf is None:
            return _mapped_ids(self.index)
        inv = self._ivf.invlists
        if inv is None:  # only an IVF index whose lists were detached; ours always own theirs
            raise IndexCorruptError("FAISS IVF index has no inverted lists")
        parts = [faiss.rev_swig_ptr(inv.get_ids(lst), inv.list_size(lst)).copy()
                 for lst in range(self._ivf.nlist) if inv.list_size(lst)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def copy_ids(self) -> np.ndarray | None:
        """int64 (N,) ids of the exact copy (``raw`` or ``exact_copy``), in storage order; None for exact layouts."""
        if self.exact_copy is not None:
            return self.exact_copy.ids()
        return _mapped_ids(self.raw) if self.raw is not None else None

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """ids int64 (N,), vectors float32 (N, dim)."""
        if len(ids):
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            before = self.ntotal
            with ff.adding(self.index):
                self.index.add_with_ids(vectors, ids)
            if self.raw is not None:
                self.raw.add_with_ids(vectors, ids)
            if self.exact_copy is not None:
                self.exact_copy.add(ids, vectors)
            if ff.is_auto(self.factory):  # every writer adds through here: re-plan as the corpus grows
                self.maybe_train()
            elif self.factory.strip().lower() == "flat" and before < ff.FLAT_MAX_VECTORS <= self.ntotal:
                log.warning("this %s index now holds %d vectors (%.0f MB of RAM, a brute force per query); "
                            "`clipfp8 index --factory auto` (with --index-budget) switches it to a compressed "
                            "IVF index with exact re-ranking", self.factory, self.ntotal, self.ntotal * self.dim * 4 / 1e6)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """float32 (len(ids), dim): the exact stored vectors."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        if self.exact_copy is not None:
            return self.exact_copy.lookup(ids)
        return (self.raw if self.raw is not None else self.index).reconstruct_batch(ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove ``ids`` (int64); returns how many were stored."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return 0
        if self.raw is not None:
            self.raw.remove_ids(faiss.IDSelectorBatch(ids))
        if self.exact_copy is not None:
            self.exact_copy.remove(ids)
        if self.kind == "other":  # e.g. HNSW: no deletion; rebuild from the exact copy
            if self.raw is None:
                raise IndexCorruptError(f"FAISS {self.factory} index has no exact copy to rebuild from after removal")
            n_before = self.ntotal
            keep = _mapped_ids(self.raw)
            self.index = faiss.IndexIDMap2(_factory(self.dim, self.factory))
            self.index.add_with_ids(self.raw.reconstruct_batch(keep), keep)
            return n_before - self.ntotal
        return int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))

    def training_due(self, train_min: int = 0) -> bool:
        """True when this is the exact placeholder of a trainable factory and enough vectors
        exist to train it (``train_min``, default 39 * nlist for IVF). ``auto``: the flat layout once
        it holds ``train_min`` (default ``FLAT_MAX_VECTORS``) vectors, an IVF once it has grown ~16x."""
        if ff.is_auto(self.factory):
            return self._auto_plan(train_min) is not None
        if self.kind != "flat" or self.factory.strip().lower() == "flat":
            return False
        nlist = _ivf_nlist(self.factory)
        return self.ntotal >= (train_min or (39 * nlist if nlist else 1))

    def maybe_train(self, train_min: int = 0) -> bool:
        """Switch from the exact placeholder to the trained factory index once enough vectors
        exist (the placeholder becomes the exact copy); returns True when it did. ``auto``: (re)build
        the planned IVF from the exact vectors (trained on a sample, added in batches)."""
        if ff.is_auto(self.factory):
            return self._auto_build(train_min)
        if not self.training_due(train_min):
            return False
        ids = self.ids()
        vecs = self.reconstruct(ids)
        index = _factory(self.dim, self.factory)
        index.train(vecs)
        if faiss.try_extract_index_ivf(index) is None:
            index = faiss.IndexIDMap2(index)
        index.add_with_ids(vecs, ids)
        self._adopt(index, raw=self.index)
        log.info("trained %s on %d vectors", self.factory, len(ids))
        return True

    def _auto_plan(self, train_min: int = 0) -> ff.IndexPlan | None:
        """The IVF plan an ``auto`` index should switch to now, or None."""
        budget = ff.budget_of(self.factory)
        if self.kind == "flat":
            plan = ff.plan_index(self.ntotal, self.dim, budget, flat_max=train_min or ff.FLAT_MAX_VECTORS)
            return plan if plan.kind == "ivf" else None
        plan = ff.plan_index(self.ntotal, self.dim, budget)
        return plan if ff.replan_due(self.index, plan) else None

    def _auto_build(self, train_min: int = 0) -> bool:
        plan = self._auto_plan(train_min)
        if plan is None:
            return False
        exact = self.exact_copy
        if exact is None:  # leaving the flat layout: its float32 vectors become the on-disk copy
            exact = ExactVectors(self.dim)
            ids = self.ids()
            exact.add(ids, self.reconstruct(ids))
        log.info("building %s for %d vectors (%.0f bytes/vector planned)", plan.factory, self.ntotal, plan.bytes_per_vector)
        index = ff.build_index(plan, exact.sample(plan.train_size), exact.batches(plan.add_batch))
        self._adopt(index, raw=None, exact=exact)
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
