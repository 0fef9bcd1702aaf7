"""The Benchmark tab's pure core: ground truth from captions or class folders, Recall@k.

No Gradio and no file system here: ``app.backend`` reads the captions file the user picked
(or uploaded) and hands its ``{file: [captions]}`` mapping and the index's paths to
:func:`captions_truth`; :func:`describe_truth` says in plain words where the ground truth came from.
"""
from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

import numpy as np

from clipfp8.app.search import SearchIndex, md_code, run_query
from clipfp8.quant.core.encoder import Encoder

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class GroundTruth:
    """Benchmark queries: ``pairs`` of (query text, set of relevant corpus-relative paths).

    ``kind`` is "captions" (each caption's own image is relevant) or "labels" (every image of
    the class folder is relevant). ``source`` names where it came from (shown to the user);
    ``skipped`` counts captioned files that matched no indexed image; ``names_as_captions`` is
    True when the captions merely repeat the file names.
    """

    kind: Literal["captions", "labels"]
    pairs: list[tuple[str, frozenset[str]]]
    source: str = ""
    skipped: int = 0
    names_as_captions: bool = False


def captions_ground_truth(captions: Mapping[str, Sequence[str]], source: str = "") -> GroundTruth:
    """``{file: [captions]}`` with corpus-relative keys -> one query per caption."""
    pairs = [(c, frozenset([PurePosixPath(f).as_posix()])) for f, caps in sorted(captions.items())
             for c in caps if c.strip()]
    return GroundTruth("captions", pairs, source, names_as_captions=captions_are_file_names(captions))


def labels_ground_truth(labels: Mapping[str, str], source: str = "class folders") -> GroundTruth:
    """``{file: class}`` -> one query per class (its name, underscores as spaces)."""
    by_class: dict[str, set[str]] = {}
    for f, label in labels.items():
        by_class.setdefault(label, set()).add(PurePosixPath(f).as_posix())
    return GroundTruth("labels", [(c.replace("_", " "), frozenset(fs)) for c, fs in sorted(by_class.items())],
                       source)


def folder_labels(paths: Iterable[str]) -> dict[str, str]:
    """``{path: name of its folder}`` for every path not at the corpus root."""
    return {p: posixpath.basename(posixpath.dirname(p)) for p in paths if "/" in p}


def match_captions(captions: Mapping[str, Sequence[str]], indexed: Iterable[str],
                   base: str = "") -> tuple[dict[str, list[str]], int]:
    """Map a captions file's keys onto indexed corpus-relative paths -> (matched, unmatched count).

    ``base`` is the captions file's folder relative to the corpus ("" at the root, ".." just
    outside it). A key matches, in this order: ``base/key``; the key itself; else the one indexed
    path that ends with ``/key`` or of which the key ends with ``/path`` (e.g. ``a.jpg`` for
    ``images/a.jpg``, or ``images/a.jpg`` when the corpus is ``images/``). Ambiguous keys are
    unmatched.
    """
    paths = set(indexed)
    by_name: dict[str, list[str]] = {}
    for p in paths:
        by_name.setdefault(posixpath.basename(p), []).append(p)
    matched: dict[str, list[str]] = {}
    unmatched = 0
    for key, caps in captions.items():
        k = posixpath.normpath(str(key).replace("\\", "/")).lstrip("/")
        joined = posixpath.normpath(posixpath.join(base, k)) if base else k
        hit: str | None
        if joined in paths or k in paths:
            hit = joined if joined in paths else k
        else:
            cands = [p for p in by_name.get(posixpath.basename(k), ())
                     if p.endswith("/" + k) or k.endswith("/" + p)]
            hit = cands[0] if len(cands) == 1 else None
        if hit is None:
            unmatched += 1
        else:
            matched.setdefault(hit, []).extend(str(c) for c in caps)
    return matched, unmatched


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def captions_are_file_names(captions: Mapping[str, Sequence[str]]) -> bool:
    """True when at least 80 % of captions equal their file's name (letters and digits only)."""
    pairs = [(_words(PurePosixPath(f).stem), _words(c)) for f, caps in captions.items() for c in caps]
    return bool(pairs) and sum(a == b for a, b in pairs) >= 0.8 * len(pairs)


def describe_truth(truth: GroundTruth) -> str:
    """Markdown: where the ground truth comes from, what counts as a hit, and caveats."""
    n = len(truth.pairs)
    if truth.kind == "labels":
        return (f"Ground truth: **{truth.source or 'class folders'}** — one query per folder name ({n} folders, "
                f"e.g. {md_code(truth.pairs[0][0]) if n else '—'}); a query counts as found at k when any of its "
                "top k results lies in that folder.")
    images = len({p for _, rel in truth.pairs for p in rel})
    text = (f"Ground truth: **{truth.source or 'captions'}** — {n} captions of {images} indexed images; a caption "
            "counts as found at k when its own image is among its top k results.")
    if truth.skipped:
        text += f" {truth.skipped} captioned files are not in the index and were skipped."
    if truth.names_as_captions:
        text += (" **Note:** these captions are just the images' file names (e.g. `elephant.jpg` → “elephant”), "
                 "not descriptions — on the bundled demo corpus they are the drawings' titles — so this measures "
                 "finding a picture from its title, an easy task.")
    return text


def benchmark(index: SearchIndex, encoders: Mapping[str, Encoder], truth: GroundTruth,
              ks: Sequence[int] = (1, 5, 10), max_queries: int | None = None,
              progress: Progress | None = None) -> dict[str, Any]:
    """Recall@k per precision (a query scores at k when any relevant file is in its top-k).

    ``progress(done, total)`` is called after every query (total = queries x precisions).
    Returns ``{"kind", "n_queries", "ks", "recall": {precision: {k: r}}, "delta": {k: r_last - r_first},
    "latency_ms": {precision: mean total}}``; the delta is the second precision minus the first
    (e.g. FP8 - FP16), absent with one precision.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    pairs = truth.pairs[:max_queries] if max_queries else truth.pairs
    if not pairs:
        raise ValueError("the benchmark has no queries: pick a captions file that names indexed images, "
                         "or a corpus with class folders")
    kmax = max(ks)
    recall: dict[str, dict[int, float]] = {}
    latency: dict[str, float] = {}
    total, done = len(pairs) * len(encoders), 0
    for label, enc in encoders.items():
        hits_at = np.zeros(len(ks))
        total_ms = 0.0
        for text, relevant in pairs:
            hits, lat = run_query(index, enc, text, kmax, None)
            total_ms += lat.total_ms
            ranked = [PurePosixPath(h.path).as_posix() for h in hits]
            hits_at += [any(p in relevant for p in ranked[:k]) for k in ks]
            done += 1
            if progress is not None:
                progress(done, total)
        recall[label] = {k: float(v / len(pairs)) for k, v in zip(ks, hits_at, strict=True)}
        latency[label] = total_ms / len(pairs)
    labels = list(recall)
    delta = ({k: recall[labels[1]][k] - recall[labels[0]][k] for k in ks} if len(labels) >= 2 else {})
    return {"kind": truth.kind, "n_queries": len(pairs), "ks": list(ks), "recall": recall,
            "delta": delta, "latency_ms": latency}
