"""Metrics on embeddings, with LAION CLIP_benchmark's definitions, and agreement between encoders.

All embeddings are float32 arrays with unit-norm rows; similarity is the dot product.

Ties (deterministic, everywhere): items with equal scores rank in index order, lower index
first -- the order of a stable sort by descending score. So the rank of item ``j`` in a row
``s`` is ``#{i: s[i] > s[j]} + #{i < j: s[i] == s[j]}`` (0-based) and it is "in the top k" when
that rank is < k. A degenerate encoder that scores everything equal therefore gets the ranking
0, 1, 2, ... rather than a random one.

* Zero-shot classification (CLIP_benchmark ``zeroshot_classification``): the class embedding
  is the mean of the unit-norm embeddings of the class's prompts, re-normalised; an image's
  logits are its dot products with the C class embeddings. ``acc1``/``acc5``: fraction of
  images whose true class ranks < 1 / < 5 (``acc5`` is NaN with fewer than 5 classes, as in
  CLIP_benchmark). ``mean_per_class_recall``: the mean, over the classes present in the labels,
  of the fraction of that class's images whose top-1 class is right (sklearn's balanced
  accuracy).
* Retrieval (CLIP_benchmark ``zeroshot_retrieval``; scores = texts @ images.T):
  ``image_retrieval_recall@k`` (text -> image): fraction of captions whose image ranks < k
  among all images. ``text_retrieval_recall@k`` (image -> text): fraction of images for which
  ANY of their captions ranks < k among all captions.
* Agreement of encoder B with baseline A on the same inputs: mean cosine of matching rows;
  top-k overlap = faiss ``knn_intersection_measure`` (mean over queries of
  ``|topk_A(q) & topk_B(q)| / k``); Spearman correlation of each query's similarity scores over
  all items (average ranks for ties), averaged over queries.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Rows per chunk when a (queries x items) matrix is processed piecewise, to bound memory.
_CHUNK = 1024


def positive_ranks(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """0-based rank of item ``positive[q]`` in row ``q`` of ``scores`` (Q, N) -> int64 (Q,).

    Ties break by index (see the module docstring); no sort is needed.
    """
    q = scores.shape[0]
    positive = np.asarray(positive, dtype=np.int64)
    if positive.shape != (q,):
        raise ValueError(f"positive must have shape ({q},), got {positive.shape}")
    out = np.empty(q, dtype=np.int64)
    cols = np.arange(scores.shape[1])
    for s in range(0, q, _CHUNK):
        block, pos = scores[s:s + _CHUNK], positive[s:s + _CHUNK]
        target = block[np.arange(len(block)), pos][:, None]
        before = cols[None, :] < pos[:, None]
        out[s:s + _CHUNK] = (block > target).sum(1) + ((block == target) & before).sum(1)
    return out


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best items per row of ``scores`` (Q, N), best first -> int64 (Q, min(k, N))."""
    k = min(k, scores.shape[1])
    out = np.empty((scores.shape[0], k), dtype=np.int64)
    for s in range(0, scores.shape[0], _CHUNK):
        out[s:s + _CHUNK] = np.argsort(-scores[s:s + _CHUNK], axis=1, kind="stable")[:, :k]
    return out


def class_embeddings(prompt_emb: np.ndarray, n_classes: int) -> np.ndarray:
    """Prompt embeddings (C*T, D), class-major (class c's T prompts are rows c*T..c*T+T-1),
    -> float32 (C, D): mean of the unit rows per class, re-normalised."""
    if prompt_emb.shape[0] % n_classes:
        raise ValueError(f"{prompt_emb.shape[0]} prompt embeddings do not split into {n_classes} classes")
    x = prompt_emb.astype(np.float64).reshape(n_classes, -1, prompt_emb.shape[1])
    x = x / np.maximum(np.linalg.norm(x, axis=2, keepdims=True), 1e-12)
    mean = x.mean(axis=1)
    return (mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def zero_shot_metrics(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray,
                      ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """image_emb (N, D), class_emb (C, D), labels int (N,) -> ``acc{k}`` and ``mean_per_class_recall``."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(image_emb) or len(labels) == 0:
        raise ValueError(f"need one label per image, got {len(labels)} labels for {len(image_emb)} images")
    logits = image_emb @ class_emb.T
    ranks = positive_ranks(logits, labels)
    n_classes = class_emb.shape[0]
    out = {f"acc{k}": float(np.mean(ranks < k)) if n_classes >= k else float("nan") for k in ks}
    correct = ranks == 0
    present = np.unique(labels)
    out["mean_per_class_recall"] = float(np.mean([correct[labels == c].mean() for c in present]))
    return out


def best_positive(scores: np.ndarray, owner: np.ndarray, n_images: int) -> np.ndarray:
    """For each image, the caption index ranking best in its column of ``scores`` (T, N):
    highest score, lowest index on ties -> int64 (N,). ``owner`` int (T,): each caption's image."""
    owner = np.asarray(owner, dtype=np.int64)
    pos_scores = scores[np.arange(len(owner)), owner]
    order = np.lexsort((np.arange(len(owner)), -pos_scores, owner))
    first = np.r_[True, owner[order][1:] != owner[order][:-1]]
    best = np.full(n_images, -1, dtype=np.int64)
    best[owner[order][first]] = order[first]
    if (best < 0).any():
        raise ValueError(f"image {int(np.flatnonzero(best < 0)[0])} has no caption")
    return best


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, owner: np.ndarray,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """image_emb (N, D), text_emb (T, D), owner int (T,) = image of each caption ->
    ``image_retrieval_recall@k`` (text->image) and ``text_retrieval_recall@k`` (image->text)."""
    owner = np.asarray(owner, dtype=np.int64)
    if owner.shape != (len(text_emb),):
        raise ValueError(f"owner must have shape ({len(text_emb)},), got {owner.shape}")
    scores = text_emb @ image_emb.T  # (T, N)
    t2i = positive_ranks(scores, owner)
    # The best-ranked caption of an image decides "any caption in the top k".
    i2t = positive_ranks(np.ascontiguousarray(scores.T), best_positive(scores, owner, len(image_emb)))
    out = {f"image_retrieval_recall@{k}": float(np.mean(t2i < k)) for k in ks}
    out.update({f"text_retrieval_recall@{k}": float(np.mean(i2t < k)) for k in ks})
    return out


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of matching rows of a (N, D) and b (N, D); NaN if dims differ."""
    if a.shape != b.shape:
        return float("nan")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(1)
    den = np.maximum(np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1), 1e-12)
    return float(np.mean(num / den))


def topk_overlap(scores_a: np.ndarray, scores_b: np.ndarray, k: int) -> float:
    """faiss ``knn_intersection_measure`` of the top-k lists of two (Q, N) score matrices."""
    ia, ib = topk_indices(scores_a, k), topk_indices(scores_b, k)
    inter = sum(np.intersect1d(x, y, assume_unique=True).size for x, y in zip(ia, ib, strict=True))
    return float(inter / ia.size) if ia.size else float("nan")


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-D ranks (0-based) with ties given their average rank (as scipy.stats.rankdata - 1)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = ((starts + ends - 1) / 2.0)[np.cumsum(new) - 1]
    return ranks


def spearman_rows(scores_a: np.ndarray, scores_b: np.ndarray) -> float:
    """Mean over rows of the Spearman correlation between two (Q, N) score matrices.

    Rows where either side is constant (correlation undefined) are left out; NaN if all are.
    """
    if scores_a.shape != scores_b.shape:
        raise ValueError(f"score matrices differ in shape: {scores_a.shape} vs {scores_b.shape}")
    rhos = []
    for ra, rb in zip(scores_a, scores_b, strict=True):
        xa, xb = average_ranks(ra), average_ranks(rb)
        xa, xb = xa - xa.mean(), xb - xb.mean()
        den = np.sqrt((xa * xa).sum() * (xb * xb).sum())
        if den > 0:
            rhos.append(float((xa * xb).sum() / den))
    return float(np.mean(rhos)) if rhos else float("nan")


def agreement_metrics(images_a: np.ndarray, images_b: np.ndarray, queries_a: np.ndarray,
                      queries_b: np.ndarray, texts_a: np.ndarray, texts_b: np.ndarray,
                      ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """How closely encoder B reproduces baseline A.

    images_* (N, D): image embeddings; texts_* (T, D): every text embedded (captions or
    prompts); queries_* (Q, D): the text queries searched over the images (captions, or class
    embeddings). Text->image search scores are queries @ images.T.
    """
    scores_a, scores_b = queries_a @ images_a.T, queries_b @ images_b.T
    out = {"image_cosine": mean_cosine(images_a, images_b), "text_cosine": mean_cosine(texts_a, texts_b)}
    out.update({f"t2i_overlap@{k}": topk_overlap(scores_a, scores_b, k) for k in ks})
    out["score_spearman"] = spearman_rows(scores_a, scores_b)
    return out


def top1_agreement(image_emb_a: np.ndarray, class_emb_a: np.ndarray, image_emb_b: np.ndarray,
                   class_emb_b: np.ndarray) -> float:
    """Fraction of images whose zero-shot top-1 class is the same under both encoders."""
    pa = topk_indices(image_emb_a @ class_emb_a.T, 1)[:, 0]
    pb = topk_indices(image_emb_b @ class_emb_b.T, 1)[:, 0]
    return float(np.mean(pa == pb))


__all__ = ["positive_ranks", "topk_indices", "class_embeddings", "zero_shot_metrics", "best_positive",
           "retrieval_metrics", "mean_cosine", "topk_overlap", "average_ranks", "spearman_rows",
           "agreement_metrics", "top1_agreement"]
