"""The pure core of the app: run one query through one or two precisions and compare them.

Nothing here knows Gradio. The UI calls :func:`search` and renders its :class:`SearchResult`;
tests drive it with ``quant.core.testing.FakeEncoder`` and an in-memory index. The index is anything
satisfying :class:`SearchIndex` (``app.backend.StoreIndex`` adapts ``indexing.IndexStore``).

Paging (``page``), the folder filter (``folder``) and the banner's wording (:func:`banner_text`)
live here too, so they are tested without a browser. The benchmark is in ``app.benchmark``.

Latency is split into *encode* (time inside the encoder: text tokenise+forward or image
preprocess+forward) and *search* (the rest: the nearest-neighbour lookup and bookkeeping), both
measured with ``time.perf_counter`` around the calls the index makes on a timing wrapper of the
encoder, so the split holds whatever the index does internally.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from clipfp8.quant.core.encoder import Encoder, EncoderIdentity

log = logging.getLogger(__name__)

Mode = Literal["single", "side_by_side"]
#: Paging and the folder filter look at most this many hits per precision and query.
MAX_RANK = 5000
#: The folder choice meaning "no filter".
ALL_FOLDERS = "All folders"
Query = Any  # str (text query) or PIL.Image.Image (image query)


class PathOutsideCorpusError(ValueError):
    """A result path that would resolve outside the indexed corpus (never served)."""


class HitLike(Protocol):
    """One search result as an index returns it (``indexing.Hit`` satisfies this)."""

    @property
    def id(self) -> int: ...

    @property
    def path(self) -> str: ...

    @property
    def score(self) -> float: ...


class SearchIndex(Protocol):
    """What the app needs from an index."""

    corpus_root: Path

    def query(self, encoder: Encoder, query: Query, k: int, threshold: float | None) -> Sequence[HitLike]:
        """Top-k hits for ``query`` embedded by ``encoder``, best first, score >= threshold."""

    def resolve(self, rel_path: str) -> Path:
        """Absolute path of an indexed file; raises ``PathOutsideCorpusError`` if it escapes."""

    def path_of(self, hit_id: int) -> str | None:
        """The corpus-relative path the index holds for ``hit_id`` (None if it has none)."""

    def indexed_paths(self) -> list[str]:
        """Corpus-relative paths of every successfully indexed image."""


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

    def __add__(self, other: Latency) -> Latency:
        return Latency(self.encode_ms + other.encode_ms, self.search_ms + other.search_ms,
                       self.total_ms + other.total_ms)


NO_TIME = Latency(0.0, 0.0, 0.0)


@dataclass(frozen=True)
class ResultItem:
    """One ranked hit; ``marker`` says how it differs from the other precision ("" if same)."""

    id: int
    path: str
    score: float
    rank: int  # 1-based, counted over every page (page 2 of k=10 starts at 11)
    marker: str = ""


@dataclass(frozen=True)
class PrecisionResult:
    precision: str
    items: list[ResultItem]
    latency: Latency


@dataclass(frozen=True)
class SearchResult:
    """Per-precision hits and latencies of one page, in the order the precisions were run.

    ``overlap`` is ``|A ∩ B| / k`` of the two pages' id sets in side-by-side mode, else None.
    ``has_more``: a next page exists for some precision. ``truncated``: the folder filter looked
    at the top ``MAX_RANK`` hits and found fewer than the page needs.
    """

    mode: Mode
    k: int
    results: dict[str, PrecisionResult]
    overlap: float | None = None
    page: int = 0
    folder: str | None = None
    threshold: float | None = None
    has_more: bool = False
    truncated: bool = False

    def precisions(self) -> list[str]:
        return list(self.results)

    @property
    def first_rank(self) -> int:
        return self.page * self.k + 1

    def shown(self) -> int:
        """Hits on this page in the longest list."""
        return max((len(pr.items) for pr in self.results.values()), default=0)


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


def normalize_folder(folder: str | None) -> str | None:
    """A folder filter as typed or picked -> a corpus-relative POSIX prefix without slashes, or
    None for "no filter" (None, "", "/", ``ALL_FOLDERS``). Raises ``ValueError`` for absolute
    paths, ``..`` parts and NUL bytes."""
    if folder is None or folder.strip() in ("", "/", ".", ALL_FOLDERS):
        return None
    text = folder.strip().replace("\\", "/")
    if "\x00" in text or text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise ValueError(f"folder filter {folder!r} must be a folder inside the corpus, e.g. 'animals'")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"folder filter {folder!r} must not contain '..'")
    return "/".join(parts) or None


def in_folder(path: str, folder: str | None) -> bool:
    """True when the corpus-relative ``path`` lies under ``folder`` (None: every path)."""
    return folder is None or path.startswith(folder + "/")


def top_folders(paths: Iterable[str]) -> list[str]:
    """The sorted top-level folder names of corpus-relative paths (files at the root have none)."""
    return sorted({p.split("/", 1)[0] for p in paths if "/" in p})


def _validate(query: Query, encoders: Mapping[str, Encoder], k: int, threshold: float | None,
              mode: str, precision: str, page: int) -> None:
    if isinstance(query, str) and not query.strip():
        raise ValueError("the query is empty: type some words or upload an image")
    if query is None:
        raise ValueError("no query: type some words or upload an image")
    if not 1 <= k <= 1000:
        raise ValueError(f"k must be between 1 and 1000, got {k}")
    if page < 0:
        raise ValueError(f"page must be >= 0, got {page}")
    if (page + 1) * k > MAX_RANK:
        raise ValueError(f"paging stops at result {MAX_RANK}: results {page * k + 1}-{(page + 1) * k} are past it")
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be between -1 and 1, got {threshold}")
    if mode not in ("single", "side_by_side"):
        raise ValueError(f"mode must be 'single' or 'side_by_side', got {mode!r}")
    if mode == "single" and precision not in encoders:
        raise ValueError(f"precision {precision!r} is not loaded; choose one of {sorted(encoders)}")
    if mode == "side_by_side" and len(encoders) < 2:
        raise ValueError("side-by-side mode needs two precisions loaded")


def fetch_ranked(index: SearchIndex, encoder: Encoder, query: Query, need: int, threshold: float | None,
                 folder: str | None) -> tuple[list[HitLike], Latency, bool]:
    """The first ``need`` hits inside ``folder``, best first, with the summed latency.

    Without a folder this is one index query. With one, the index is asked for more hits
    (x4 per round, at most ``MAX_RANK``) until ``need`` of them lie in the folder or the index
    runs out. The flag is True when the ``MAX_RANK`` cap stopped the search short.
    """
    fetch = need if folder is None else min(max(4 * need, 64), MAX_RANK)
    total = NO_TIME
    while True:
        hits, lat = run_query(index, encoder, query, fetch, threshold)
        total += lat
        kept = [h for h in hits if in_folder(str(h.path), folder)]
        exhausted = len(hits) < fetch
        if len(kept) >= need or exhausted or fetch >= MAX_RANK:
            return kept[:need], total, not exhausted and len(kept) < need
        fetch = min(4 * fetch, MAX_RANK)


def search(query: Query, encoders: Mapping[str, Encoder], index: SearchIndex, k: int = 10,
           threshold: float | None = None, mode: Mode = "single", precision: str = "FP16",
           folder: str | None = None, page: int = 0) -> SearchResult:
    """Page ``page`` (0-based, ``k`` hits per page) of ``query`` on ``encoders[precision]``
    (single) or on the first two encoders (side by side), only hits under ``folder`` when given.

    In side-by-side mode the first encoder is the reference (e.g. FP16) and each hit carries a
    marker relative to the other precision's list up to this page's end. Ranks count from the
    first page. Raises ``ValueError`` with a user-facing message on bad input.
    """
    _validate(query, encoders, k, threshold, mode, precision, page)
    folder = normalize_folder(folder)
    labels = [precision] if mode == "single" else list(encoders)[:2]
    end = (page + 1) * k
    raw: dict[str, tuple[list[HitLike], Latency]] = {}
    has_more = truncated = False
    for label in labels:
        # One hit past the page end tells whether a next page exists.
        hits, lat, cut = fetch_ranked(index, encoders[label], query, end + 1, threshold, folder)
        has_more, truncated = has_more or len(hits) > end, truncated or cut
        raw[label] = (hits[:end], lat)
    markers: dict[str, list[str]] = {label: [""] * len(raw[label][0]) for label in labels}
    overlap = None
    start = page * k
    if mode == "side_by_side":
        (la, (ha, _)), (lb, (hb, _)) = raw.items()
        markers[la], markers[lb] = compare_markers(ha, hb, la, lb)
        overlap = topk_overlap(ha[start:], hb[start:], k) if (ha[start:] or hb[start:]) else None
    results = {}
    for label, (hits, lat) in raw.items():
        items = [ResultItem(int(h.id), str(h.path), float(h.score), i, m)
                 for i, (h, m) in enumerate(zip(hits, markers[label], strict=True), 1)]
        results[label] = PrecisionResult(label, items[start:], lat)
    return SearchResult(mode, k, results, overlap, page, folder, threshold, has_more, truncated)


@dataclass(frozen=True)
class QuerySpec:
    """What the shown results are for: a text, or a decoded image with a display name.

    The UI keeps one per session so paging, the folder filter and re-submitting the text box
    ("image: NAME") repeat the same query.
    """

    text: str = ""
    image: Any = None  # PIL.Image.Image for an image query
    name: str = ""

    @property
    def is_image(self) -> bool:
        return self.image is not None

    @property
    def label(self) -> str:
        """What the text box shows for this query."""
        return f"image: {self.name}" if self.is_image else self.text

    def query(self) -> Query:
        return self.image if self.is_image else self.text

    @staticmethod
    def from_text_box(text: str | None, previous: QuerySpec | None) -> QuerySpec:
        """The text box's query; its unchanged "image: NAME" label repeats the previous image query."""
        text = text or ""
        if previous is not None and previous.is_image and text.strip() == previous.label:
            return previous
        return QuerySpec(text=text)


def md_code(text: str, limit: int = 80) -> str:
    """``text`` as an inline Markdown code span: one line, no backticks, at most ``limit`` chars."""
    clean = " ".join(str(text).replace("`", "'").split())
    return f"`{clean if len(clean) <= limit else clean[: limit - 1] + '…'}`"


def banner_text(spec: QuerySpec, result: SearchResult) -> str:
    """One Markdown line saying what the shown results are: query, folder, ranks, paging state."""
    what = f"image {md_code(spec.name)}" if spec.is_image else md_code(spec.text)
    where = f" in folder {md_code(result.folder + '/')}" if result.folder else ""
    shown = result.shown()
    if shown == 0:
        why = " above the minimum score" if result.threshold is not None else ""
        past = f" past result {result.first_rank - 1}" if result.page else ""
        return f"**No results for {what}**{where}{past}{why}."
    last = result.first_rank + shown - 1
    text = f"**Results for {what}**{where} · results {result.first_rank}–{last}"
    if not result.has_more:
        text += " (no more)"
    if result.truncated:
        text += f" · only the top {MAX_RANK} hits were searched for this folder"
    return text + "."


def placeholder_text(captions: Sequence[str], folders: Sequence[str]) -> str:
    """An example query that exists in this corpus: one-word captions, else folder names."""
    words = sorted({c.strip().lower() for c in captions if c.strip().isalpha() and len(c.strip()) >= 4})
    if len(words) < 3:
        words = [f.replace("_", " ") for f in folders]
    if not words:
        return "e.g. a dog on a beach — or upload a picture"
    picks = list(dict.fromkeys(words[(2 * i + 1) * len(words) // 6] for i in range(min(3, len(words)))))
    listed = picks[0] if len(picks) == 1 else ", ".join(picks[:-1]) + " or " + picks[-1]
    return f"e.g. {listed} — or upload a picture"
