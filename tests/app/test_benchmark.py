"""The Benchmark tab's pure core (clipfp8.app.benchmark) with FakeEncoder and an in-memory index."""
from __future__ import annotations

import json

import numpy as np
import pytest

import clipfp8.app.benchmark as B


def _brute_recall(index, enc, truth, k):
    hits = 0
    for text, relevant in truth.pairs:
        scores = index.emb[enc.name] @ enc.encode_texts([text])[0]
        top = [index.paths[i] for i in np.argsort(-scores, kind="stable")[:k]]
        hits += any(p in relevant for p in top)
    return hits / len(truth.pairs)


def test_benchmark_recall_with_captions_matches_brute_force(corpus, index, encoders):
    truth = B.captions_ground_truth(json.loads((corpus / "captions.json").read_text()))
    assert truth.kind == "captions" and len(truth.pairs) == 2 * 18
    seen = []
    res = B.benchmark(index, encoders, truth, ks=(1, 5, 10), progress=lambda d, t: seen.append((d, t)))
    for label, enc in encoders.items():
        for k in (1, 5, 10):
            assert res["recall"][label][k] == pytest.approx(_brute_recall(index, enc, truth, k))
        assert res["recall"][label][1] <= res["recall"][label][5] <= res["recall"][label][10]
    for k in (1, 5, 10):
        assert res["delta"][k] == pytest.approx(res["recall"]["FP8"][k] - res["recall"]["FP16"][k])
    assert seen == [(i, 72) for i in range(1, 73)]  # every query of both precisions, counted once


def test_benchmark_with_class_labels(corpus, index, encoders):
    truth = B.labels_ground_truth(B.folder_labels(index.indexed_paths()))
    assert truth.kind == "labels" and len(truth.pairs) == 6
    res = B.benchmark(index, {"FP16": encoders["FP16"]}, truth, ks=(1, 3), max_queries=4)
    assert res["n_queries"] == 4
    sub = B.GroundTruth("labels", truth.pairs[:4])
    assert res["recall"]["FP16"][1] == pytest.approx(_brute_recall(index, encoders["FP16"], sub, 1))
    assert res["delta"] == {}
    with pytest.raises(ValueError, match="no queries"):
        B.benchmark(index, encoders, B.GroundTruth("labels", []))


def test_folder_labels_use_the_immediate_folder_and_skip_the_root():
    assert B.folder_labels(["a/x.jpg", "a/b/y.jpg", "z.jpg"]) == {"a/x.jpg": "a", "a/b/y.jpg": "b"}


TREE = ["red/a.jpg", "red/b.jpg", "blue/dup.jpg", "green/dup.jpg", "top.jpg"]


@pytest.mark.parametrize("base, indexed, keys, want", [
    ("", TREE, {"red/a.jpg": ["c1"]}, {"red/a.jpg": ["c1"]}),                 # corpus-relative
    ("", TREE, {"a.jpg": ["c1"]}, {"red/a.jpg": ["c1"]}),                     # DATASET/images layout
    ("red", TREE, {"a.jpg": ["c1"], "b.jpg": ["c2"]}, {"red/a.jpg": ["c1"], "red/b.jpg": ["c2"]}),  # red/x.json
    ("", TREE, {"images/red/a.jpg": ["c1"]}, {"red/a.jpg": ["c1"]}),          # keys name the corpus folder
    ("..", ["a.jpg", "b.jpg"], {"a.jpg": ["c1"]}, {"a.jpg": ["c1"]}),         # captions.json beside the corpus
    ("", TREE, {"dup.jpg": ["c1"]}, {}),                                      # in two folders: ambiguous
    ("", TREE, {"missing.jpg": ["c1"]}, {}),
])
def test_match_captions(base, indexed, keys, want):
    matched, unmatched = B.match_captions(keys, indexed, base)
    assert matched == want and unmatched == len(keys) - len(want)


def test_captions_that_repeat_file_names_are_recognised():
    titles = {"animals/contour_fox.jpg": ["contour fox"], "animals/elephant.jpg": ["elephant"],
              "tools/cartoon_cat_gerald_g.jpg": ["cartoon cat gerald g."]}
    assert B.captions_are_file_names(titles)
    described = B.describe_truth(B.captions_ground_truth(titles, "`captions.json` in the corpus"))
    assert "file names" in described and "easy task" in described and "`captions.json` in the corpus" in described
    real = {"1000268201_693b08cb0e.jpg": ["A child in a pink dress is climbing up a set of stairs"]}
    assert not B.captions_are_file_names(real)
    assert "file names" not in B.describe_truth(B.captions_ground_truth(real))
    assert not B.captions_are_file_names({})


def test_describe_truth_says_where_it_comes_from_and_what_counts():
    truth = B.labels_ground_truth({"cats/a.jpg": "cats", "dogs/b.jpg": "dogs"})
    text = B.describe_truth(truth)
    assert "class folders" in text and "2 folders" in text and "any of its top k" in text
    caps = B.captions_ground_truth({"a.jpg": ["one", "two"], "b.jpg": ["three"]}, "`x.csv` (uploaded)")
    text = B.describe_truth(B.GroundTruth(caps.kind, caps.pairs, caps.source, skipped=4))
    assert text.startswith("Ground truth: **`x.csv` (uploaded)** — 3 captions of 2 indexed images")
    assert "4 captioned files are not in the index" in text
