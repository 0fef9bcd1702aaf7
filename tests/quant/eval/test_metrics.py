"""Metric functions on embeddings whose right answers are known by construction, and a
cross-check against straightforward brute-force loops written here."""
from __future__ import annotations

import math

import numpy as np
import pytest

from clipfp8.quant.eval import metrics as M


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def one_hot(idx, dim: int) -> np.ndarray:
    return np.eye(dim, dtype=np.float32)[np.asarray(idx)]


# --- brute force: sort each row by (-score, index) with Python's sorted -------------------------

def bf_rank(row, j) -> int:
    order = sorted(range(len(row)), key=lambda i: (-float(row[i]), i))
    return order.index(j)


def bf_retrieval(images, texts, owner, ks):
    n, t = len(images), len(texts)
    s = [[float(np.dot(texts[a], images[b])) for b in range(n)] for a in range(t)]
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = sum(bf_rank(s[a], owner[a]) < k for a in range(t)) / t
        hits = 0
        for b in range(n):
            col = [s[a][b] for a in range(t)]
            hits += any(bf_rank(col, a) < k for a in range(t) if owner[a] == b)
        out[f"text_retrieval_recall@{k}"] = hits / n
    return out


def bf_zero_shot(images, classes, labels):
    n, c = len(images), len(classes)
    logits = [[float(np.dot(images[i], classes[j])) for j in range(c)] for i in range(n)]
    ranks = [bf_rank(logits[i], labels[i]) for i in range(n)]
    per_class = [np.mean([ranks[i] == 0 for i in range(n) if labels[i] == cl]) for cl in sorted(set(labels))]
    return {"acc1": np.mean([r < 1 for r in ranks]), "acc5": np.mean([r < 5 for r in ranks]) if c >= 5 else math.nan,
            "mean_per_class_recall": float(np.mean(per_class))}


# --- retrieval -----------------------------------------------------------------------------------

def test_one_hot_embeddings_give_perfect_recall_with_several_captions_per_image():
    n = 7
    owner = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 5, 6])  # 1 to 4 captions per image
    got = M.retrieval_metrics(one_hot(range(n), n), one_hot(owner, n), owner, ks=(1, 5))
    assert all(v == 1.0 for v in got.values()), got


def test_image_to_text_counts_a_hit_if_any_caption_is_in_the_top_k():
    # Image 0 has captions 0 (perfect) and 1 (points at image 1). Image 1 has only caption 2,
    # which points at image 1 too, but caption 1 outranks it for image 1 (it is identical and
    # comes first): so image 1 misses at k=1 yet hits at k=2; image 0 hits at k=1 via caption 0.
    images = one_hot([0, 1], 2)
    texts = one_hot([0, 1, 1], 2)
    owner = np.array([0, 0, 1])
    got = M.retrieval_metrics(images, texts, owner, ks=(1, 2))
    assert got["text_retrieval_recall@1"] == 0.5
    assert got["text_retrieval_recall@2"] == 1.0
    # text->image: captions 0 and 2 find their image first; caption 1 finds image 1 first.
    assert got["image_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert got["image_retrieval_recall@2"] == 1.0


def test_ties_rank_in_index_order():
    # A constant encoder: every score ties, so the ranking is 0, 1, 2, ... for every query.
    n, per = 6, 2
    owner = np.repeat(np.arange(n), per)           # captions 2i, 2i+1 belong to image i
    images = np.ones((n, 4), np.float32) / 2.0
    texts = np.ones((n * per, 4), np.float32) / 2.0
    got = M.retrieval_metrics(images, texts, owner, ks=(1, 5))
    # text->image: a caption of image i ranks its image at position i.
    assert got["image_retrieval_recall@1"] == pytest.approx(np.mean(owner < 1))
    assert got["image_retrieval_recall@5"] == pytest.approx(np.mean(owner < 5))
    # image->text: image i's best caption is its first, 2i, at rank 2i.
    assert got["text_retrieval_recall@1"] == pytest.approx(np.mean(2 * np.arange(n) < 1))
    assert got["text_retrieval_recall@5"] == pytest.approx(np.mean(2 * np.arange(n) < 5))


def test_shuffled_encoder_is_near_chance():
    rng = np.random.default_rng(0)
    n, k = 400, 10
    texts = one_hot(range(n), n)
    images = unit(one_hot(rng.permutation(n), n) + 0.05 * rng.normal(size=(n, n)))  # wrong pairing
    got = M.retrieval_metrics(images, texts, np.arange(n), ks=(k,))
    chance = k / n
    for key in ("image_retrieval_recall@10", "text_retrieval_recall@10"):
        assert abs(got[key] - chance) < 4 * math.sqrt(chance * (1 - chance) / n) + 1 / n, (key, got[key])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_equals_brute_force_on_random_embeddings_with_ties(seed):
    rng = np.random.default_rng(seed)
    n, d = 13, 5
    owner = np.sort(rng.integers(0, n, size=30))
    owner[:n] = np.arange(n)  # every image has at least one caption
    owner = rng.permutation(owner)  # captions of one image need not be adjacent
    # Few distinct values -> many exact ties in the scores.
    images = np.round(rng.normal(size=(n, d)), 0).astype(np.float32)
    texts = np.round(rng.normal(size=(len(owner), d)), 0).astype(np.float32)
    ks = (1, 3, 5, 10)
    got = M.retrieval_metrics(images, texts, owner, ks)
    want = bf_retrieval(images, texts, owner, ks)
    assert got == pytest.approx(want, abs=1e-12)


def test_image_without_caption_is_an_error():
    with pytest.raises(ValueError, match="image 2 has no caption"):
        M.retrieval_metrics(one_hot([0, 1, 2], 3), one_hot([0, 1], 3), np.array([0, 1]))


# --- zero-shot -----------------------------------------------------------------------------------

def test_zero_shot_one_hot_is_perfect_and_acc5_nan_below_five_classes():
    labels = np.array([0, 1, 2, 2, 1, 0, 0])
    got = M.zero_shot_metrics(one_hot(labels, 3), one_hot(range(3), 3), labels)
    assert got["acc1"] == 1.0 and got["mean_per_class_recall"] == 1.0
    assert math.isnan(got["acc5"])


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_mean_per_class_recall_averages_over_present_classes():
    # Class 0: 3 of 4 right; class 1: 1 of 2 right; class 2 (never a label) is not averaged.
    labels = np.array([0, 0, 0, 0, 1, 1])
    preds = np.array([0, 0, 0, 1, 1, 2])
    got = M.zero_shot_metrics(one_hot(preds, 3), one_hot(range(3), 3), labels)
    assert got["acc1"] == pytest.approx(4 / 6)
    assert got["mean_per_class_recall"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    sklearn = pytest.importorskip("sklearn.metrics")
    assert got["mean_per_class_recall"] == pytest.approx(sklearn.balanced_accuracy_score(labels, preds))


def test_zero_shot_ties_pick_the_lowest_class():
    labels = np.array([0, 1, 2, 3, 4, 5, 0])
    images = np.ones((7, 4), np.float32) / 2
    classes = np.ones((6, 4), np.float32) / 2
    got = M.zero_shot_metrics(images, classes, labels)
    assert got["acc1"] == pytest.approx(2 / 7)             # class 0 always wins the tie
    assert got["acc5"] == pytest.approx(6 / 7)             # every label but 5 ranks < 5
    assert got["mean_per_class_recall"] == pytest.approx(1 / 6)


@pytest.mark.parametrize("seed", [0, 1])
def test_zero_shot_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    images = np.round(rng.normal(size=(40, 6)), 0).astype(np.float32)
    classes = np.round(rng.normal(size=(7, 6)), 0).astype(np.float32)
    labels = rng.integers(0, 7, size=40)
    assert M.zero_shot_metrics(images, classes, labels) == pytest.approx(bf_zero_shot(images, classes, labels))


def test_class_embeddings_average_normalised_prompts():
    prompts = np.array([[2, 0], [0, 1], [0, 3], [0, 5]], np.float32)  # class 0: rows 0-1, class 1: 2-3
    got = M.class_embeddings(prompts, 2)
    assert got == pytest.approx(np.array([[1, 1], [0, 2]]) / np.array([[math.sqrt(2)], [2]]))
    with pytest.raises(ValueError):
        M.class_embeddings(prompts[:3], 2)


# --- agreement -----------------------------------------------------------------------------------

def test_topk_overlap_matches_faiss_definition():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(9, 20)), rng.normal(size=(9, 20))
    b[:4] = a[:4]  # some identical queries
    for k in (1, 5, 10):
        ia = [sorted(range(20), key=lambda j: (-a[q, j], j))[:k] for q in range(9)]
        ib = [sorted(range(20), key=lambda j: (-b[q, j], j))[:k] for q in range(9)]
        want = sum(len(set(x) & set(y)) for x, y in zip(ia, ib, strict=False)) / (9 * k)
        assert M.topk_overlap(a, b, k) == pytest.approx(want)
    assert M.topk_overlap(a, a, 5) == 1.0
    assert M.topk_overlap(a, -a, 10) == 0.0  # reversed rankings share nothing when 2k <= N


def test_spearman_identical_reversed_and_scipy_with_ties():
    rng = np.random.default_rng(4)
    a = np.round(rng.normal(size=(5, 30)), 1)
    assert M.spearman_rows(a, a) == pytest.approx(1.0)
    assert M.spearman_rows(a, -a) == pytest.approx(-1.0)
    b = np.round(a + rng.normal(scale=0.5, size=a.shape), 0)  # heavy ties
    stats = pytest.importorskip("scipy.stats")
    want = np.mean([stats.spearmanr(x, y).statistic for x, y in zip(a, b, strict=False)])
    assert M.spearman_rows(a, b) == pytest.approx(want)
    assert M.average_ranks(np.array([3.0, 1.0, 3.0, 2.0])) == pytest.approx([2.5, 0, 2.5, 1])


def test_spearman_skips_constant_rows():
    a = np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    assert M.spearman_rows(a, a) == 1.0
    assert math.isnan(M.spearman_rows(a[1:], a[1:]))


def test_agreement_metrics_identical_and_perturbed():
    rng = np.random.default_rng(5)
    images, texts = unit(rng.normal(size=(50, 16))), unit(rng.normal(size=(20, 16)))
    same = M.agreement_metrics(images, images, texts, texts, texts, texts, ks=(1, 10))
    assert same == {"image_cosine": pytest.approx(1.0), "text_cosine": pytest.approx(1.0),
                    "t2i_overlap@1": 1.0, "t2i_overlap@10": 1.0, "score_spearman": pytest.approx(1.0)}
    noisy = unit(images + 0.3 * rng.normal(size=images.shape))
    got = M.agreement_metrics(images, noisy, texts, texts, texts, texts, ks=(1, 10))
    assert got["image_cosine"] == pytest.approx(float(np.mean(np.sum(images * noisy, 1))), rel=1e-5)
    assert 0 < got["t2i_overlap@10"] < 1 and 0 < got["score_spearman"] < 1
    assert math.isnan(M.mean_cosine(images, images[:, :8]))


def test_top1_agreement():
    classes = one_hot(range(3), 3)
    a = one_hot([0, 1, 2, 0], 3)
    b = one_hot([0, 2, 2, 1], 3)
    assert M.top1_agreement(a, classes, b, classes) == 0.5


def test_retrieval_matches_a_topk_formulation_like_clip_benchmark():
    # CLIP_benchmark's formulation: a boolean positive-pair matrix and torch.topk; a query hits
    # when at least one positive is among its top k. Continuous random scores: no ties.
    import torch
    rng = np.random.default_rng(7)
    n, owner = 30, np.repeat(np.arange(30), rng.integers(1, 6, size=30))
    images, texts = unit(rng.normal(size=(n, 8))), unit(rng.normal(size=(len(owner), 8)))
    scores = torch.from_numpy(texts @ images.T)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(owner)), torch.from_numpy(owner)] = True
    got = M.retrieval_metrics(images, texts, owner, ks=(1, 5, 10))
    for k in (1, 5, 10):
        for name, s, p in (("image", scores, positive), ("text", scores.T, positive.T)):
            top = torch.topk(s, k, dim=1).indices
            hit = p.gather(1, top).any(dim=1).float().mean().item()
            assert got[f"{name}_retrieval_recall@{k}"] == pytest.approx(hit)
