"""Search: a text or image query -> top-k (path, score) from one encoder's index.

Backends, same results: FAISS on the CPU; FAISS on the GPU(s) when faiss-gpu is installed
(``faiss.get_num_gpus() > 0``); otherwise, when CUDA is present and the index is exact, a
matrix product on the GPU with torch. Scores are inner products of unit vectors (cosine).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from PIL import Image

from clipfp8.indexing.config import DEFAULT_MAX_ASPECT, DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS
from clipfp8.indexing.decode import limit_aspect, open_image, read_file, to_rgb
from clipfp8.indexing.errors import DecodeError, QueryError
from clipfp8.indexing.store import IndexStore
from clipfp8.indexing.vectors import VectorIndex
from clipfp8.quant.core.encoder import Encoder

log = logging.getLogger(__name__)

RERANK_FACTOR = 10
QUERY_MAX_PIXELS = DEFAULT_MAX_PIXELS
QUERY_MAX_FILE_BYTES = DEFAULT_MAX_FILE_BYTES


@dataclass(frozen=True)
class Hit:
    """``path`` is relative to the corpus root (``store.resolve(path)`` gives the file)."""

    id: int
    path: str
    score: float


def embed_query(encoder: Encoder, query: str | Image.Image | Path) -> np.ndarray:
    """A text, PIL image or image file -> float32 (1, D) unit vector. Images get the same
    normalisation and limits as indexed files (first frame, EXIF orientation, alpha on white; at
    most ``QUERY_MAX_FILE_BYTES`` read and ``QUERY_MAX_PIXELS`` decoded, extreme aspect ratios
    centre-cropped before the model's resize)."""
    if isinstance(query, str):
        if not query.strip():
            raise QueryError("the text query is empty")
        return encoder.encode_texts([query])
    if isinstance(query, Path):
        try:
            query = open_image(read_file(query, QUERY_MAX_FILE_BYTES), QUERY_MAX_PIXELS)
        except DecodeError as e:
            raise QueryError(f"cannot read query image {query}: {e}") from e
    if isinstance(query, Image.Image):
        if query.width * query.height > QUERY_MAX_PIXELS:
            raise QueryError(f"query image is {query.width}x{query.height} pixels; the limit is "
                             f"{QUERY_MAX_PIXELS:,} pixels")
        return encoder.encode_pil([to_rgb(limit_aspect(query, DEFAULT_MAX_ASPECT))])
    raise QueryError(f"query must be a str, PIL.Image.Image or Path, got {type(query).__name__}")


def search(store: IndexStore, encoder: Encoder, query: str | Image.Image | Path, k: int = 10,
           threshold: float | None = None, rerank: bool | None = None) -> list[Hit]:
    """Top-``k`` hits for ``query`` in ``encoder.name``'s index, best first; only those scoring
    >= ``threshold`` when given. ``rerank``: fetch ``10 * k`` candidates (``100 * k`` from an
    ``auto`` index's 4-bit codes: ``VectorIndex.rerank_factor``) from an approximate index and
    re-score them exactly from the stored vectors; None (the default): only for
    ``--factory auto`` indexes past the flat stage, whose PQ scores are too coarse to show or to
    threshold (their exact copy is on disk: ~100 rows read per query). Raises
    ``EncoderMismatchError`` when ``encoder.identity()`` differs from the one the index was built with."""
    if k < 1:
        raise QueryError(f"k must be >= 1, got {k}")
    store.check_identity(encoder.identity())
    vec = store.vectors(encoder.name)
    q = embed_query(encoder, query)
    if rerank is None:
        rerank = vec.exact_copy is not None
    fetch = k * (vec.rerank_factor or RERANK_FACTOR) if rerank and not vec.exact else k
    scores, ids = search_vectors(vec, q, fetch)
    scores, ids = scores[0], ids[0]
    keep = ids >= 0
    scores, ids = scores[keep], ids[keep]
    if rerank and not vec.exact and len(ids):
        scores = vec.reconstruct(ids) @ q[0]
        order = np.argsort(-scores, kind="stable")
        scores, ids = scores[order], ids[order]
    scores, ids = scores[:k], ids[:k]
    if threshold is not None:
        keep = scores >= threshold
        scores, ids = scores[keep], ids[keep]
    paths = store.id_paths(ids)
    return [Hit(int(i), paths[int(i)], float(s)) for i, s in zip(ids, scores, strict=False) if int(i) in paths]


def outside_corpus(store: IndexStore, path: str) -> bool:
    """True when the indexed file ``path`` (a ``Hit.path``) really lies outside the corpus: a
    symlink whose target is elsewhere (the scanner follows symlinks; the app refuses to serve
    such files, so callers should say so rather than drop the hit)."""
    root = os.path.realpath(store.corpus_root)
    target = os.path.realpath(store.resolve(path))
    return os.path.commonpath([root, target]) != root


def search_vectors(vec: VectorIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """queries float32 (Q, D) -> (scores (Q, k'), ids (Q, k')) on the best available backend."""
    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        try:
            gpu = _cached(vec, "faiss_gpu", lambda: faiss.index_cpu_to_all_gpus(vec.index))
            return gpu.search(np.ascontiguousarray(queries, np.float32), max(1, min(k, vec.ntotal)))
        except RuntimeError as e:  # an index type without a GPU version: CPU
            log.debug("faiss-gpu search unavailable (%s); using the CPU", e)
    if vec.exact and torch.cuda.is_available() and vec.ntotal:
        return _torch_exact(vec, queries, k)
    return vec.search(queries, k)


def _torch_exact(vec: VectorIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids, mat = _cached(vec, "torch_gpu", lambda: (vec.ids(), torch.from_numpy(vec.reconstruct(vec.ids())).cuda()))
    scores = torch.from_numpy(np.ascontiguousarray(queries, np.float32)).cuda() @ mat.T
    top = torch.topk(scores, min(k, len(ids)), dim=1)
    return top.values.cpu().numpy(), ids[top.indices.cpu().numpy()]


def _cached(vec: VectorIndex, key: str, make: Any) -> Any:
    """A GPU copy of ``vec``, rebuilt when its size changed (a writer added or removed rows)."""
    cache = vec.__dict__.setdefault("_gpu_cache", {})
    if key not in cache or cache[key][0] != vec.ntotal:
        cache[key] = (vec.ntotal, make())
    return cache[key][1]
