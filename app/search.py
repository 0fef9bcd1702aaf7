"""The pure core of the app: run one query through one or two precisions and compare them.

Nothing here knows Gradio. The UI calls :func:`search` and renders its :class:`SearchResult`;
tests drive it with ``quant.core.testing.FakeEncoder`` and an in-memory index. The index is anything
satisfying :class:`SearchIndex` (``app.backend.StoreIndex`` adapts ``indexing.IndexStore``).

Latency is split into *encode* (time inside the encoder: text tokenise+forward or image
preprocess+forward) and *search* (the rest: the nearest-neighbour lookup and bookkeeping), both
measured with ``time.perf_counter`` around the calls the index makes on a timing wrapper of the
encoder, so the split holds whatever the index does internally.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Protocol, Sequence

import numpy as np
import torch

from clipfp8.quant.core.encoder import Encoder, EncoderIdentity

log = logging.getLogger(__name__)

Mode = Literal["single", "side_by_side"]
Query = Any  # str (text query) or PIL.Image.Image (image query)


class PathOutsideCorpusError(ValueError):
    """A result path that would resolve outside the indexed corpus (never served)."""


class HitLike(Protocol):
    """One search result as an index returns it (``indexing.Hit`` satisfies this)."""

    id: int
    path: str
    score: float


class SearchIndex(Protocol):
    """What the app needs from an index."""

    corpus_root: Path

    def query(self, encoder: Encoder, query: Query, k: int, threshold: float | None) -> Sequence[HitLike]:
        """Top-k hits for ``query`` embedded by ``encoder``, best first, score >= threshold."""

    def resolve(self, rel_path: str) -> Path:
        """Absolute path of an indexed file; raises ``PathOutsideCorpusError`` if it escapes."""


def safe_resolve(corpus_root: Path, rel_path: str) -> Path:
    """``corpus_root / rel_path`` resolved (symlinks followed); refuses anything outside the root.

    Raises ``PathOutsideCorpusError`` for absolute paths, ``..`` escapes, NUL bytes and symlinks
    that point out of the corpus.
    """
    if not rel_path or "\x00" in rel_path:
        raise PathOutsideCorpusError(f"invalid result path {rel_path!r}")
    root = Path(corpus_root).resolve()
    candidate = Path(rel_path)
    if candidate.is_absolute():
        raise PathOutsideCorpusError(f"absolute result path {rel_path!r} refused")
    full = (root / candidate).resolve()
    if not full.is_relative_to(root):
        raise PathOutsideCorpusError(f"result path {rel_path!r} escapes the corpus {root}")
    return full


@dataclass(frozen=True)
class Latency:
    """Milliseconds for one query on one precision; ``total_ms = encode_ms + search_ms``."""

    encode_ms: float
    search_ms: float
    total_ms: float


@dataclass(frozen=True)
class ResultItem:
    """One ranked hit; ``marker`` says how it differs from the other precision ("" if same)."""

    id: int
    path: str
    score: float
    rank: int  # 1-based
    marker: str = ""


@dataclass(frozen=True)
class PrecisionResult:
    precision: str
    items: list[ResultItem]
    latency: Latency


@dataclass(frozen=True)
class SearchResult:
    """Per-precision hits and latencies, in the order they were run.

    ``overlap`` is ``|A ∩ B| / k`` of the two top-k id sets in side-by-side mode, else None.
    """

    mode: Mode
    k: int
    results: dict[str, PrecisionResult]
    overlap: float | None = None

    def precisions(self) -> list[str]:
        return list(self.results)


class TimedEncoder(Encoder):
    """Delegates to ``inner`` and adds the wall time spent inside it to ``elapsed`` (seconds).

    Nested calls (``encode_pil`` -> ``preprocess``/``encode_images``) count once. The identity and
    name are the inner encoder's, so index identity checks still pass.
    """

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        self.name, self.precision, self.dim = inner.name, inner.precision, inner.dim
        self.device, self.image_size = inner.device, inner.image_size
        self.elapsed = 0.0
        self._depth = 0

    def _timed(self, fn: Any, *args: Any) -> Any:
        self._depth += 1
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.elapsed += time.perf_counter() - t0

    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        return self._timed(self.inner.encode_images, images)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._timed(self.inner.encode_texts, texts)

    def preprocess(self, image: Any) -> torch.Tensor:
        return self._timed(self.inner.preprocess, image)

    def encode_pil(self, images: Sequence[Any]) -> np.ndarray:
        return self._timed(self.inner.encode_pil, images)

    def identity(self) -> EncoderIdentity:
        return self.inner.identity()


def run_query(index: SearchIndex, encoder: Encoder, query: Query, k: int,
              threshold: float | None) -> tuple[list[HitLike], Latency]:
    """One query on one encoder -> (hits, latency split into encode and search)."""
    timed = TimedEncoder(encoder)
    t0 = time.perf_counter()
    hits = list(index.query(timed, query, k, threshold))
    total = time.perf_counter() - t0
    encode = min(timed.elapsed, total)
    return hits, Latency(encode * 1e3, (total - encode) * 1e3, total * 1e3)


def compare_markers(ref: Sequence[HitLike], other: Sequence[HitLike], ref_label: str,
                    other_label: str) -> tuple[list[str], list[str]]:
    """Markers for two ranked lists: "only in X", "rank moved i→j" (1-based), or "" if same rank."""
    ref_rank = {h.id: i for i, h in enumerate(ref, 1)}
    other_rank = {h.id: i for i, h in enumerate(other, 1)}

    def marker(rank: int, hid: int, mine: str, theirs: dict[int, int], mine_first: bool) -> str:
        if hid not in theirs:
            return f"only in {mine}"
        if theirs[hid] == rank:
            return ""
        a, b = (rank, theirs[hid]) if mine_first else (theirs[hid], rank)
        return f"rank moved {ref_label} #{a} → {other_label} #{b}"

    ref_markers = [marker(i, h.id, ref_label, other_rank, True) for i, h in enumerate(ref, 1)]
    other_markers = [marker(i, h.id, other_label, ref_rank, False) for i, h in enumerate(other, 1)]
    return ref_markers, other_markers


def topk_overlap(a: Sequence[HitLike], b: Sequence[HitLike], k: int) -> float:
    """``|A ∩ B| / k`` over the first k ids of each list."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return len({h.id for h in a[:k]} & {h.id for h in b[:k]}) / k


def _validate(query: Query, encoders: Mapping[str, Encoder], k: int, threshold: float | None,
              mode: str, precision: str) -> None:
    if isinstance(query, str) and not query.strip():
        raise ValueError("the query is empty: type some words or upload an image")
    if query is None:
        raise ValueError("no query: type some words or upload an image")
    if not 1 <= k <= 1000:
        raise ValueError(f"k must be between 1 and 1000, got {k}")
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be between -1 and 1, got {threshold}")
    if mode not in ("single", "side_by_side"):
        raise ValueError(f"mode must be 'single' or 'side_by_side', got {mode!r}")
    if mode == "single" and precision not in encoders:
        raise ValueError(f"precision {precision!r} is not loaded; choose one of {sorted(encoders)}")
    if mode == "side_by_side" and len(encoders) < 2:
        raise ValueError("side-by-side mode needs two precisions loaded")


def search(query: Query, encoders: Mapping[str, Encoder], index: SearchIndex, k: int = 10,
           threshold: float | None = None, mode: Mode = "single", precision: str = "FP16") -> SearchResult:
    """Run ``query`` on ``encoders[precision]`` (single) or on the first two encoders (side by side).

    In side-by-side mode the first encoder is the reference (e.g. FP16) and each hit carries a
    marker relative to the other list. Raises ``ValueError`` with a user-facing message on bad input.
    """
    _validate(query, encoders, k, threshold, mode, precision)
    labels = [precision] if mode == "single" else list(encoders)[:2]
    raw: dict[str, tuple[list[HitLike], Latency]] = {
        label: run_query(index, encoders[label], query, k, threshold) for label in labels}
    markers: dict[str, list[str]] = {label: [""] * len(raw[label][0]) for label in labels}
    overlap = None
    if mode == "side_by_side":
        (la, (ha, _)), (lb, (hb, _)) = raw.items()
        markers[la], markers[lb] = compare_markers(ha, hb, la, lb)
        overlap = topk_overlap(ha, hb, k) if (ha or hb) else None
    results = {
        label: PrecisionResult(label, [ResultItem(int(h.id), str(h.path), float(h.score), i, m)
                                       for i, (h, m) in enumerate(zip(hits, markers[label]), 1)], lat)
        for label, (hits, lat) in raw.items()}
    return SearchResult(mode, k, results, overlap)


@dataclass
class LatencyTracker:
    """Latency series per precision, bounded to the last ``maxlen`` queries.

    ``percentiles`` summarise the retained series; the chart points are rolling p50/p95 of the
    total latency over the trailing ``window`` queries, computed once when a query is recorded
    (so drawing the chart costs O(points), not a percentile per point per query).
    """

    maxlen: int = 500
    window: int = 50
    _series: dict[str, deque[Latency]] = field(default_factory=dict)
    _points: dict[str, deque[tuple[int, float, float]]] = field(default_factory=dict)
    _count: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.maxlen < 1 or self.window < 1:
            raise ValueError(f"LatencyTracker: maxlen and window must be >= 1, got {self.maxlen}, {self.window}")

    def record(self, result: SearchResult) -> None:
        for label, pr in result.results.items():
            series = self._series.setdefault(label, deque(maxlen=self.maxlen))
            series.append(pr.latency)
            self._count[label] = self._count.get(label, 0) + 1
            recent = [lat.total_ms for lat in list(series)[-self.window:]]
            p50, p95 = np.percentile(recent, [50, 95])
            self._points.setdefault(label, deque(maxlen=self.maxlen)).append(
                (self._count[label], float(p50), float(p95)))

    def series(self, precision: str, part: str = "total_ms") -> list[float]:
        return [getattr(lat, part) for lat in self._series.get(precision, ())]

    def percentiles(self, precision: str, part: str = "total_ms") -> dict[str, float]:
        """{"n", "p50", "p95"} of the retained series (NaN percentiles when empty)."""
        s = self.series(precision, part)
        if not s:
            return {"n": 0, "p50": float("nan"), "p95": float("nan")}
        return {"n": len(s), "p50": float(np.percentile(s, 50)), "p95": float(np.percentile(s, 95))}

    def running_rows(self) -> Iterator[dict[str, Any]]:
        """Chart rows: (query number, "<precision> p50|p95", rolling ms) per recorded query."""
        for label, points in self._points.items():
            for n, p50, p95 in points:
                yield {"query": n, "series": f"{label} p50", "ms": p50}
                yield {"query": n, "series": f"{label} p95", "ms": p95}


@dataclass(frozen=True)
class GroundTruth:
    """Benchmark queries: ``pairs`` of (query text, set of relevant corpus-relative paths).

    ``kind`` is "captions" (each caption's own image is relevant) or "labels" (every image of
    the class folder is relevant).
    """

    kind: Literal["captions", "labels"]
    pairs: list[tuple[str, frozenset[str]]]


def captions_ground_truth(captions: Mapping[str, Sequence[str]]) -> GroundTruth:
    """``{file: [captions]}`` (captions.json) -> one query per caption."""
    pairs = [(c, frozenset([Path(f).as_posix()])) for f, caps in sorted(captions.items()) for c in caps if c.strip()]
    return GroundTruth("captions", pairs)


def labels_ground_truth(labels: Mapping[str, str]) -> GroundTruth:
    """``{file: class}`` -> one query per class (its name, underscores as spaces)."""
    by_class: dict[str, set[str]] = {}
    for f, label in labels.items():
        by_class.setdefault(label, set()).add(Path(f).as_posix())
    return GroundTruth("labels", [(c.replace("_", " "), frozenset(fs)) for c, fs in sorted(by_class.items())])


def benchmark(index: SearchIndex, encoders: Mapping[str, Encoder], truth: GroundTruth,
              ks: Sequence[int] = (1, 5, 10), max_queries: int | None = None) -> dict[str, Any]:
    """Recall@k per precision (a query scores at k when any relevant file is in its top-k).

    Returns ``{"kind", "n_queries", "ks", "recall": {precision: {k: r}}, "delta": {k: r_last - r_first},
    "latency_ms": {precision: mean total}}``; the delta is the second precision minus the first
    (e.g. FP8 - FP16), absent with one precision.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    pairs = truth.pairs[:max_queries] if max_queries else truth.pairs
    if not pairs:
        raise ValueError("the benchmark has no queries: the corpus needs captions.json or class folders")
    kmax = max(ks)
    recall: dict[str, dict[int, float]] = {}
    latency: dict[str, float] = {}
    for label, enc in encoders.items():
        hits_at = np.zeros(len(ks))
        total_ms = 0.0
        for text, relevant in pairs:
            hits, lat = run_query(index, enc, text, kmax, None)
            total_ms += lat.total_ms
            ranked = [Path(h.path).as_posix() for h in hits]
            hits_at += [any(p in relevant for p in ranked[:k]) for k in ks]
        recall[label] = {k: float(v / len(pairs)) for k, v in zip(ks, hits_at)}
        latency[label] = total_ms / len(pairs)
    labels = list(recall)
    delta = ({k: recall[labels[1]][k] - recall[labels[0]][k] for k in ks} if len(labels) >= 2 else {})
    return {"kind": truth.kind, "n_queries": len(pairs), "ks": list(ks), "recall": recall,
            "delta": delta, "latency_ms": latency}
