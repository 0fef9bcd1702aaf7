"""``evaluate``: several encoders on several datasets, in one pass per dataset.

Each image is decoded once per dataset and handed to every encoder (each applies its own
``preprocess``), so a dataset is embedded exactly once per encoder. The first encoder is the
baseline: every other encoder's metrics are reported as deltas against it, together with how
closely its embeddings and rankings agree with it (``quant.eval.metrics``).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clipfp8.quant.core.encoder import Encoder
from clipfp8.quant.eval import metrics as M
from clipfp8.quant.eval.datasets import (
    ClassificationData,
    DatasetSpec,
    EvalData,
    RetrievalData,
    load_dataset,
    open_image,
)
from clipfp8.quant.eval.report import DatasetResult, EvalReport
from clipfp8.quant.eval.templates import DEFAULT_TEMPLATES, fill, validate_templates

log = logging.getLogger(__name__)

#: ``progress(iterable, desc=str, total=int) -> iterable``; tqdm fits. The library never draws bars.
Progress = Callable[..., Iterable[Any]]
RECALL_KS: tuple[int, ...] = (1, 5, 10)
OVERLAP_KS: tuple[int, ...] = (1, 10)


def _no_progress(iterable: Iterable[Any], **_: Any) -> Iterable[Any]:
    return iterable


@dataclass
class Embedded:
    """One encoder's embeddings of one dataset (float32, unit rows).

    ``images`` (N, D); ``texts`` (T, D): captions, or the C*T prompts class-major;
    ``queries`` (Q, D): what text->image search uses (captions, or the C class embeddings).
    """

    images: np.ndarray
    texts: np.ndarray
    queries: np.ndarray
    seconds: float = 0.0


def dataset_texts(data: EvalData, templates: Sequence[str]) -> list[str]:
    """The texts to embed: captions in order, or every (class, template) prompt class-major."""
    if isinstance(data, RetrievalData):
        return data.flat_captions()[0]
    return [fill(t, c) for c in data.classnames for t in templates]


def decoded_batches(data: EvalData, batch_size: int, workers: int = 0) -> Iterator[list[Any]]:
    """RGB PIL images of ``data`` in batches of ``batch_size``, in order.

    ``workers`` > 0 decodes in that many threads (PIL releases the GIL while decoding), up to
    two batches ahead, so decoding overlaps with encoding; 0 decodes in the calling thread.
    """
    def label(i: int) -> str:
        ref = data.images[i]
        return data.ids[i] if isinstance(ref, bytes) else str(ref)

    starts = range(0, len(data.images), batch_size)
    if workers <= 0:
        for s in starts:
            yield [open_image(data.images[i], label(i)) for i in range(s, min(s + batch_size, len(data.images)))]
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="eval-decode") as pool:
        pending: deque[list[Future[Any]]] = deque()
        for s in starts:
            pending.append([pool.submit(open_image, data.images[i], label(i))
                            for i in range(s, min(s + batch_size, len(data.images)))])
            if len(pending) > 2:
                yield [f.result() for f in pending.popleft()]
        while pending:
            yield [f.result() for f in pending.popleft()]


def embed(encoders: Sequence[Encoder], data: EvalData, templates: Sequence[str], batch_size: int,
          progress: Progress = _no_progress, workers: int = 0) -> list[Embedded]:
    """Embed ``data`` with every encoder; images decoded once per batch, shared by all encoders."""
    parts: list[list[np.ndarray]] = [[] for _ in encoders]
    seconds = [0.0] * len(encoders)
    n_batches = -(-len(data.images) // batch_size)
    for pils in progress(decoded_batches(data, batch_size, workers), desc=f"{data.name}: images",
                         total=n_batches):
        for e, enc in enumerate(encoders):
            t0 = time.perf_counter()
            batch = torch.stack([enc.preprocess(im) for im in pils])
            parts[e].append(_check(enc.encode_images(batch), len(pils), enc, "encode_images"))
            seconds[e] += time.perf_counter() - t0
    texts = dataset_texts(data, templates)
    text_parts: list[list[np.ndarray]] = [[] for _ in encoders]
    tstarts = range(0, len(texts), batch_size)
    for s in progress(tstarts, desc=f"{data.name}: texts", total=len(tstarts)):
        chunk = texts[s:s + batch_size]
        for e, enc in enumerate(encoders):
            t0 = time.perf_counter()
            text_parts[e].append(_check(enc.encode_texts(chunk), len(chunk), enc, "encode_texts"))
            seconds[e] += time.perf_counter() - t0
    out = []
    for e, enc in enumerate(encoders):
        images = np.concatenate(parts[e]) if parts[e] else np.zeros((0, enc.dim), np.float32)
        text_emb = np.concatenate(text_parts[e]) if text_parts[e] else np.zeros((0, enc.dim), np.float32)
        queries = (text_emb if isinstance(data, RetrievalData)
                   else M.class_embeddings(text_emb, len(data.classnames)))
        out.append(Embedded(images, text_emb, queries, seconds[e]))
    return out


def _check(x: np.ndarray, n: int, enc: Encoder, what: str) -> np.ndarray:
    """Encoders are external code: insist on the documented (n, D) float32 contract."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] != n:
        raise ValueError(f"encoder {enc.name}: {what} returned shape {x.shape}, expected ({n}, D)")
    return x.astype(np.float32, copy=False)


def score(data: EvalData, emb: Embedded, recall_ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """CLIP_benchmark metrics of one encoder's embeddings of ``data``."""
    if isinstance(data, ClassificationData):
        return M.zero_shot_metrics(emb.images, emb.queries, data.labels)
    return M.retrieval_metrics(emb.images, emb.texts, data.flat_captions()[1], recall_ks)


def agreement(data: EvalData, base: Embedded, other: Embedded,
              overlap_ks: Sequence[int] = OVERLAP_KS) -> dict[str, float]:
    """Agreement of ``other`` with the baseline's embeddings of the same dataset."""
    if base.images.shape[1] != other.images.shape[1]:
        return {}  # different embedding spaces: nothing to compare row by row
    out = M.agreement_metrics(base.images, other.images, base.queries, other.queries,
                              base.texts, other.texts, overlap_ks)
    if isinstance(data, ClassificationData):
        out["top1_agreement"] = M.top1_agreement(base.images, base.queries, other.images, other.queries)
    return out


def make_unique(names: Sequence[str]) -> list[str]:
    """``names`` with repeats suffixed ``#2``, ``#3``, ... (the first keeps its name)."""
    out: list[str] = []
    for name in names:
        label, i = name, 2
        while label in out:
            label, i = f"{name}#{i}", i + 1
        out.append(label)
    return out


def unique_labels(encoders: Sequence[Encoder], labels: Sequence[str] | None) -> list[str]:
    """Column labels: ``labels`` if given (must be unique), else encoder names made unique."""
    if labels is None:
        return make_unique([enc.name for enc in encoders])
    if len(labels) != len(encoders) or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be {len(encoders)} unique strings, got {list(labels)}")
    return list(labels)


def evaluate(encoders: Sequence[Encoder], datasets: Sequence[DatasetSpec | EvalData],
             batch_size: int = 64, *, templates: Sequence[str] | None = None,
             labels: Sequence[str] | None = None, recall_ks: Sequence[int] = RECALL_KS,
             overlap_ks: Sequence[int] = OVERLAP_KS, progress: Progress | None = None,
             workers: int = 0) -> EvalReport:
    """Evaluate every encoder on every dataset; the first encoder is the baseline.

    ``datasets``: specs (loaded here) or already loaded data. ``templates``: zero-shot prompt
    templates (default: CLIP's CIFAR-10 ensemble). ``labels``: column names (default: encoder
    names, made unique). ``progress``: a tqdm-like wrapper for progress bars (CLI only).
    ``workers``: image-decoding threads (0 = decode in the calling thread).
    Raises ``DatasetError`` for bad data, ``ValueError`` for bad arguments.
    """
    if not encoders:
        raise ValueError("evaluate needs at least one encoder")
    if not datasets:
        raise ValueError("evaluate needs at least one dataset")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tmpl = validate_templates(templates if templates is not None else DEFAULT_TEMPLATES)
    names = unique_labels(encoders, labels)
    progress = progress or _no_progress
    results: list[DatasetResult] = []
    for item in datasets:
        data = load_dataset(item) if isinstance(item, DatasetSpec) else item
        path = str(item.path) if isinstance(item, DatasetSpec) else ""
        embs = embed(encoders, data, tmpl, batch_size, progress, workers)
        n_texts = len(embs[0].texts)
        name = make_unique([r.name for r in results] + [data.name])[-1]  # two folders named "val"
        result = DatasetResult(name=name, kind=data.kind, path=path, n_images=len(data.images), n_texts=n_texts)
        for label, emb in zip(names, embs, strict=True):
            result.metrics[label] = score(data, emb, recall_ks)
            result.seconds[label] = round(emb.seconds, 3)
        for label, emb in zip(names[1:], embs[1:], strict=True):
            result.agreement[label] = agreement(data, embs[0], emb, overlap_ks)
        log.info("evaluated %s (%d images, %d texts)", data.name, result.n_images, n_texts)
        results.append(result)
    encoders_info = [dict(enc.identity().to_dict(), label=label, device=enc.device)
                     for label, enc in zip(names, encoders, strict=True)]
    settings = {"batch_size": batch_size, "workers": workers, "templates": list(tmpl),
                "recall_ks": list(recall_ks), "overlap_ks": list(overlap_ks)}
    return EvalReport(encoders=encoders_info, datasets=results, settings=settings)


__all__ = ["evaluate", "embed", "decoded_batches", "score", "agreement", "dataset_texts", "unique_labels",
           "make_unique", "Embedded", "Progress", "RECALL_KS", "OVERLAP_KS"]
