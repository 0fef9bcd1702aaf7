"""Choosing and building the FAISS index of a large corpus (``--factory auto``, ``--index-budget``).

The choice follows autofaiss and the FAISS wiki's "guidelines to choose an index":

* below ``FLAT_MAX_VECTORS`` (100k) vectors: ``Flat``. Exact, no training, and small in absolute
  terms (100k x 768 float32 = 307 MB); a brute-force query over it takes a few milliseconds.
* above: ``IVF{nlist}[_HNSW32],{codes}`` -- an inverted file whose ``nlist`` lists are probed
  ``nprobe`` at a time, so a query scans about ``nprobe / nlist`` of the corpus.
  ``nlist`` is the power of two at or above ``4 * sqrt(n)`` (the guideline's range is 4 to 16
  ``sqrt(n)``: the low end keeps training cheap on a CPU), and at most ``n / 39`` (FAISS wants 39
  training points per centroid). From 4096 lists up the coarse quantizer is an HNSW32 graph
  over the centroids (finding the lists to probe without a brute force over all centroids);
  below, a flat (exact) quantizer is cheap enough.
  The codes fill the memory budget left after the 8-byte ids every IVF list stores and the
  quantizer: ``SQfp16`` or ``SQ8`` when 2 or 1 bytes per dimension fit, else ``PQ{M}x4fs``
  ("fast scan": M 4-bit sub-quantizers, M/2 bytes per vector, scanned with SIMD lookups) with the
  largest ``M`` dividing ``dim`` that fits. In the same 64 bytes as ``PQ64x8``, 4-bit fast scan
  reads codes ~4x faster (docs/scale.md); its coarser codes are made up by re-ranking more
  candidates from the exact copy (``rerank_factor`` 100 instead of 10: 1,000 rows for k = 10).
  At 10M vectors that gives recall@10 0.977 at 7.5 ms p50 on two CPU cores.

The budget (``--index-budget``) is either bytes per vector ("100") or a total with a K/M/G/T
suffix ("8G", divided by the vector count when planning). It bounds the index held in RAM; the
exact vectors for re-ranking live on disk (``indexing.exact_store``), read a few rows per query.

Building: the coarse centroids are trained on a sample of ``train_size`` vectors (two-level
k-means from 1024 lists up: sqrt(nlist) clusters, then each split, which is what makes 16k lists
trainable on two CPU cores in minutes), then the codes (PQ/SQ) on the same sample; vectors are
added in batches of ``add_batch`` so no copy of the corpus is ever held in RAM.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import faiss
import numpy as np

from clipfp8.indexing.errors import IndexConfigError

log = logging.getLogger(__name__)

#: ``--factory`` value that chooses the index from the corpus size and ``--index-budget``.
AUTO = "auto"
FLAT_MAX_VECTORS = 100_000
#: The issue's target for 10M vectors: index RAM <= 100 bytes per vector.
DEFAULT_BYTES_PER_VECTOR = 100.0
ID_BYTES = 8  # int64 id per vector in every IVF list
HNSW_M = 32
HNSW_QUANTIZER_MIN_NLIST = 4096
TWO_LEVEL_MIN_NLIST = 1024
MIN_CENTROID_POINTS = 39  # FAISS warns below this many training points per centroid
TRAIN_POINTS_PER_CENTROID = 40
TRAIN_MIN, TRAIN_MAX = 100_000, 2_000_000
ADD_BATCH = 65_536
#: HNSW efSearch while adding (one nearest list per vector: a small beam is enough and 4x faster).
ADD_EF_SEARCH = 64
MIN_CODE_BYTES = 4
#: Candidates re-ranked per result: ``k * factor`` (query.search). 4-bit PQ codes rank coarsely.
RERANK_FACTOR, FASTSCAN_RERANK_FACTOR = 10, 100
FASTSCAN_BLOCK = 32  # fast-scan lists are stored in blocks of 32 codes: half a block of padding per list
QUANTIZER_BUDGET_SHARE = 0.2
#: Fewest vectors an IVF is trained on: PQ x8 has 256 centroids per sub-quantizer (39 points each).
MIN_IVF_VECTORS = 256 * MIN_CENTROID_POINTS
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])(?:i?B)?\s*", re.IGNORECASE)
_NUMBER_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*")


@dataclass(frozen=True)
class IndexBudget:
    """RAM allowed for the search structure: ``bytes_per_vector`` or ``total_bytes`` (not both;
    neither: ``DEFAULT_BYTES_PER_VECTOR``)."""

    bytes_per_vector: float | None = None
    total_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.bytes_per_vector is not None and self.total_bytes is not None:
            raise IndexConfigError("--index-budget: give bytes per vector or a total size, not both")
        for name, value in (("bytes per vector", self.bytes_per_vector), ("total bytes", self.total_bytes)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise IndexConfigError(f"--index-budget: {name} must be a positive number, got {value}")

    def per_vector(self, n_vectors: int) -> float:
        """Bytes per vector the index may use when it holds ``n_vectors``."""
        if self.total_bytes is not None:
            return self.total_bytes / max(n_vectors, 1)
        return self.bytes_per_vector if self.bytes_per_vector is not None else DEFAULT_BYTES_PER_VECTOR

    def text(self) -> str:
        """The ``--index-budget`` spelling ("" for the default), as recorded in ``auto:<text>``."""
        if self.total_bytes is not None:
            return f"{self.total_bytes}B" if self.total_bytes % 1024 else _with_suffix(self.total_bytes)
        if self.bytes_per_vector is not None:
            return f"{self.bytes_per_vector:g}"
        return ""


def _with_suffix(n: int) -> str:
    for i, unit in reversed(list(enumerate("KMGT", 1))):
        if n % (1 << (10 * i)) == 0:
            return f"{n >> (10 * i)}{unit}"
    return f"{n}B"


def parse_budget(text: str) -> IndexBudget:
    """``--index-budget``: "100" = bytes per vector; "8G" (K/M/G/T, powers of 1024; "8GiB",
    "512MB" too) = total bytes. Raises ``IndexConfigError`` naming the flag."""
    if m := _NUMBER_RE.fullmatch(text):
        return IndexBudget(bytes_per_vector=float(m.group(1)))
    if m := _SIZE_RE.fullmatch(text):
        total = float(m.group(1)) * (1 << (10 * " KMGT".index(m.group(2).upper())))
        return IndexBudget(total_bytes=int(total))
    if text.strip().upper().endswith("B") and _NUMBER_RE.fullmatch(text.strip()[:-1]):
        return IndexBudget(total_bytes=int(float(text.strip()[:-1])))
    raise IndexConfigError(f"--index-budget {text!r}: expected bytes per vector (e.g. 100) or a total "
                           f"RAM size with a K/M/G/T suffix (e.g. 8G)")


def is_auto(factory: str) -> bool:
    """True for ``auto`` and ``auto:<budget>`` factory strings."""
    return factory.strip().lower().split(":", 1)[0] == AUTO


def auto_factory(budget: IndexBudget | None = None) -> str:
    """The factory string recorded for ``--factory auto`` with ``budget``: "auto" or "auto:<budget>"."""
    text = budget.text() if budget is not None else ""
    return f"{AUTO}:{text}" if text else AUTO


def budget_of(factory: str) -> IndexBudget:
    """The budget recorded in an ``auto[:<budget>]`` factory string (validated)."""
    if not is_auto(factory):
        raise IndexConfigError(f"--factory {factory!r} is not 'auto' or 'auto:<budget>'")
    _, _, text = factory.partition(":")
    return parse_budget(text) if text.strip() else IndexBudget()


@dataclass(frozen=True)
class IndexPlan:
    """One FAISS layout for ``n_vectors`` vectors of ``dim`` dims (inner product on unit vectors).

    ``kind``: "flat" or "ivf". ``factory``: the FAISS factory string. ``nlist``, ``codes`` (e.g.
    "PQ64x8", "SQ8"), ``code_bytes`` per vector, ``nprobe`` lists probed per query, ``ef_search``
    (HNSW quantizer beam; 0 without one), ``train_size`` vectors sampled for training,
    ``add_batch`` vectors per ``add_with_ids`` call, ``bytes_per_vector``: the planned RAM of the
    search structure per vector (codes + ids + the quantizer's and the padding's share).
    ``rerank_factor``: candidates re-scored exactly per result wanted.
    """

    n_vectors: int
    dim: int
    kind: str
    factory: str
    nlist: int = 0
    codes: str = ""
    code_bytes: float = 0.0
    nprobe: int = 0
    ef_search: int = 0
    train_size: int = 0
    add_batch: int = ADD_BATCH
    bytes_per_vector: float = 0.0
    rerank_factor: int = RERANK_FACTOR

    def __post_init__(self) -> None:
        if self.n_vectors < 0 or self.dim < 1:
            raise IndexConfigError(f"IndexPlan: n_vectors >= 0 and dim >= 1 needed, got {self.n_vectors}, {self.dim}")
        if self.kind not in ("flat", "ivf"):
            raise IndexConfigError(f"IndexPlan.kind must be 'flat' or 'ivf', got {self.kind!r}")
        if self.kind == "ivf":
            if not (1 <= self.nprobe <= self.nlist) or self.train_size < self.nlist or self.add_batch < 1:
                raise IndexConfigError(f"IndexPlan {self.factory}: need 1 <= nprobe <= nlist and train_size >= nlist, "
                                       f"got nprobe {self.nprobe}, nlist {self.nlist}, train_size {self.train_size}")
            if self.ef_search and self.ef_search < self.nprobe:
                raise IndexConfigError(f"IndexPlan {self.factory}: ef_search {self.ef_search} < nprobe {self.nprobe}")

    @property
    def hnsw(self) -> bool:
        return self.ef_search > 0


def _pow2_at_least(x: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1.0))))


def _pow2_at_most(x: float) -> int:
    return 1 << max(0, math.floor(math.log2(max(x, 1.0))))


def choose_nlist(n_vectors: int, max_nlist: float = math.inf) -> int:
    """Power of two >= 4 sqrt(n), <= n / 39 (enough training points per centroid) and <= ``max_nlist``."""
    caps = (_pow2_at_most(n_vectors / MIN_CENTROID_POINTS), _pow2_at_most(max_nlist) if max_nlist < math.inf else 1 << 62)
    return max(1, min(_pow2_at_least(4 * math.sqrt(n_vectors)), *caps))


def choose_nprobe(nlist: int) -> int:
    """Lists probed per query: 1/64 of the lists, at least 16 (all of them for tiny nlist), at most
    256. On the clustered 768-d benchmark (docs/scale.md) this gives recall@10 >= 0.95 after
    re-ranking; raise it for more recall at a proportional scan cost."""
    return min(nlist, max(16, min(256, nlist // 64)))


def _codes(dim: int, available: float, pad: float) -> tuple[str, float]:
    """The largest code that fits ``available`` bytes per vector: SQfp16, SQ8 or PQ{M}x4fs (M/2
    bytes, times ``1 + pad`` for the fast-scan blocks' padding)."""
    if available >= 2 * dim:
        return "SQfp16", 2.0 * dim
    if available >= dim:
        return "SQ8", float(dim)
    fits = [m for m in range(2, dim + 1, 2) if dim % m == 0 and m / 2 * (1 + pad) <= available]
    m = max(fits, default=0)
    if m / 2 < MIN_CODE_BYTES:
        raise IndexConfigError(f"--index-budget leaves {available:.1f} bytes per vector for codes after the "
                               f"{ID_BYTES}-byte ids and the quantizer; at least {MIN_CODE_BYTES} (a PQ{2 * MIN_CODE_BYTES}x4fs "
                               f"code) are needed: raise --index-budget")
    return f"PQ{m}x4fs", m / 2


def plan_index(n_vectors: int, dim: int, budget: IndexBudget | None = None,
               flat_max: int = FLAT_MAX_VECTORS) -> IndexPlan:
    """The layout for ``n_vectors`` unit vectors of ``dim`` dims within ``budget`` (see the module
    docstring). Below ``flat_max`` vectors (or too few to train an IVF) the plan is Flat whatever
    the budget: exact, and small in absolute terms. Raises ``IndexConfigError`` (naming
    ``--index-budget``) when the budget cannot hold even the ids plus a minimal code."""
    budget = budget or IndexBudget()
    flat = IndexPlan(n_vectors, dim, "flat", "Flat", bytes_per_vector=4.0 * dim + ID_BYTES)
    if n_vectors < max(flat_max, MIN_IVF_VECTORS):
        return flat
    # Quantizer RAM per list: a float32 centroid, plus the HNSW graph's level-0 links (2 * M int32).
    # Its share is capped at a fifth of the budget: at 100k vectors 4 sqrt(n) lists of 768-d would
    # take 40 of the 100 bytes; fewer, longer lists cost little at that size.
    per_list = 4.0 * dim + 2 * HNSW_M * 4
    nlist = choose_nlist(n_vectors, QUANTIZER_BUDGET_SHARE * budget.per_vector(n_vectors) * n_vectors / per_list)
    hnsw = nlist >= HNSW_QUANTIZER_MIN_NLIST
    quantizer = nlist * (per_list if hnsw else 4.0 * dim)
    overhead = ID_BYTES + quantizer / n_vectors
    pad = nlist * FASTSCAN_BLOCK / 2 / n_vectors  # empty slots per stored code, on average
    codes, code_bytes = _codes(dim, budget.per_vector(n_vectors) - overhead, pad)
    fastscan = codes.endswith("fs")
    overhead += code_bytes * pad if fastscan else 0.0
    nprobe = choose_nprobe(nlist)
    train = min(n_vectors, max(TRAIN_POINTS_PER_CENTROID * nlist, TRAIN_MIN), TRAIN_MAX)
    factory = f"IVF{nlist}{f'_HNSW{HNSW_M}' if hnsw else ''},{codes}"
    return IndexPlan(n_vectors, dim, "ivf", factory, nlist=nlist, codes=codes, code_bytes=code_bytes,
                     nprobe=nprobe, ef_search=max(2 * nprobe, ADD_EF_SEARCH) if hnsw else 0,
                     train_size=max(train, nlist), bytes_per_vector=code_bytes + overhead,
                     rerank_factor=FASTSCAN_RERANK_FACTOR if fastscan else RERANK_FACTOR)


# ----- building ------------------------------------------------------------------------------
def new_index(plan: IndexPlan) -> faiss.Index:
    """An empty, untrained FAISS index for ``plan`` (inner product)."""
    try:
        return faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise IndexConfigError(f"FAISS cannot build {plan.factory!r}: {e}") from e


def _hnsw_of(index: faiss.Index) -> faiss.IndexHNSW | None:
    ivf = faiss.try_extract_index_ivf(index)
    quantizer = faiss.downcast_index(ivf.quantizer) if ivf is not None else None
    return quantizer if isinstance(quantizer, faiss.IndexHNSW) else None


def set_search_params(index: faiss.Index, nprobe: int, ef_search: int = 0) -> None:
    """Store ``nprobe`` (and the HNSW quantizer's ``efSearch``) in ``index``; both are saved with it."""
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = max(1, min(nprobe, ivf.nlist))
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        hnsw.hnsw.efSearch = max(ef_search, ivf.nprobe)


@contextlib.contextmanager
def adding(index: faiss.Index) -> Iterator[None]:
    """A small HNSW beam while vectors are assigned to lists (k = 1), the search one restored after."""
    hnsw = _hnsw_of(index)
    if hnsw is None:
        yield
        return
    ef = hnsw.hnsw.efSearch
    hnsw.hnsw.efSearch = ADD_EF_SEARCH
    try:
        yield
    finally:
        hnsw.hnsw.efSearch = ef


def train_index(index: faiss.Index, plan: IndexPlan, sample: np.ndarray, seed: int = 1234) -> None:
    """Train ``index`` on ``sample`` float32 (T, dim), unit rows. Spherical k-means (centroids
    normalised: the quantizer ranks lists by inner product); two-level from
    ``TWO_LEVEL_MIN_NLIST`` lists up (FAISS's ``two_level_clustering``: sqrt(nlist) clusters,
    each split in proportion to its size), then the codes on the residuals."""
    from faiss.contrib.clustering import two_level_clustering

    sample = np.ascontiguousarray(sample, dtype=np.float32)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.spherical = True
    ivf.cp.seed = seed
    ivfpq = faiss.downcast_index(ivf)  # extract_index_ivf hands back the IndexIVF base class
    if isinstance(ivfpq, faiss.IndexIVFPQ):
        # On by default, and slow: it only serves Hamming pre-filtering, which we do not use.
        ivfpq.do_polysemous_training = False  # type: ignore[attr-defined]  # missing from faiss's stubs
    if plan.nlist >= TWO_LEVEL_MIN_NLIST:
        centroids, _ = two_level_clustering(sample, int(math.sqrt(plan.nlist)), plan.nlist, spherical=True, seed=seed)
        ivf.quantizer.train(centroids)
        ivf.quantizer.add(centroids)  # a full quantizer: index.train() below trains only the codes
    index.train(sample)
    set_search_params(index, plan.nprobe, plan.ef_search)


def build_index(plan: IndexPlan, sample: np.ndarray,
                batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> faiss.Index:
    """Train a new index for ``plan`` on ``sample`` (float32 (T, dim)) and add ``batches`` of
    (ids int64 (B,), vectors float32 (B, dim)) -- a generator, so the corpus streams through."""
    index = new_index(plan)
    if plan.kind == "flat":
        index = faiss.IndexIDMap2(index)
    else:
        train_index(index, plan, sample)
    with adding(index):
        for ids, vecs in batches:
            index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    log.info("built %s over %d vectors", plan.factory, index.ntotal)
    return index


def rerank_factor(index: faiss.Index) -> int:
    """``IndexPlan.rerank_factor`` of a built index: more candidates for 4-bit fast-scan codes."""
    ivf = faiss.try_extract_index_ivf(index)
    return FASTSCAN_RERANK_FACTOR if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFastScan) \
        else RERANK_FACTOR


def index_bytes(index: faiss.Index) -> int:
    """Bytes of ``index`` serialised (what it occupies in RAM once loaded, give or take the
    allocator: codes, ids, centroids, graph)."""
    return int(faiss.serialize_index(index).size)


def replan_due(index: faiss.Index, plan: IndexPlan) -> bool:
    """True when an IVF index has too few lists for ``plan`` (the plan for its current size): 4x
    fewer than planned (the corpus grew ~16x since it was built, so its lists are ~16x longer)."""
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and plan.kind == "ivf" and plan.nlist >= 4 * ivf.nlist
