"""Unit tests of the pure app.search module with FakeEncoder and an in-memory index."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipfp8.app.search as S
from tests.app.helpers import FakeHit, MemIndex, make_corpus
from tests.fakes import FakeEncoder


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    return make_corpus(tmp_path / "corpus")


@pytest.fixture()
def encoders() -> dict[str, FakeEncoder]:
    return {"FP16": FakeEncoder(precision="fp16"), "FP8": FakeEncoder(precision="fp8-fake", noise=1.0)}


@pytest.fixture()
def index(corpus: Path, encoders: dict[str, FakeEncoder]) -> MemIndex:
    return MemIndex(corpus, list(encoders.values()))


def _ids(items: list[S.ResultItem]) -> list[int]:
    return [it.id for it in items]


def test_single_mode_runs_only_the_chosen_precision(index, encoders):
    res = S.search("a red square", encoders, index, k=4, mode="single", precision="FP8")
    assert res.precisions() == ["FP8"] and res.overlap is None
    assert encoders["FP16"].calls["texts"] == 0 and encoders["FP8"].calls["texts"] == 1
    items = res.results["FP8"].items
    assert [it.rank for it in items] == [1, 2, 3, 4]
    assert all(a.score >= b.score for a, b in zip(items, items[1:]))
    assert all(it.marker == "" for it in items)


def test_side_by_side_overlap_and_markers_agree_with_the_lists(index, encoders):
    k = 6
    overlaps = []
    for query in ("blue", "red", "green", "white", "black", "yellow", "a square"):
        res = S.search(query, encoders, index, k=k, mode="side_by_side")
        a, b = res.results["FP16"].items, res.results["FP8"].items
        ids_a, ids_b = _ids(a), _ids(b)
        assert res.overlap == pytest.approx(len(set(ids_a) & set(ids_b)) / k)
        overlaps.append(res.overlap)
        for mine, theirs, label in ((a, ids_b, "FP16"), (b, ids_a, "FP8")):
            for it in mine:
                if it.id not in theirs:
                    assert it.marker == f"only in {label}"
                elif theirs.index(it.id) + 1 != it.rank:
                    assert it.marker.startswith("rank moved") and f"#{theirs.index(it.id) + 1}" in it.marker
                else:
                    assert it.marker == ""
    assert min(overlaps) < 1.0, "the noisy FP8 twin should disagree somewhere for this test to mean anything"


def test_identical_precisions_overlap_fully_without_markers(index):
    enc = FakeEncoder(precision="fp16")
    res = S.search("green", {"FP16": enc, "FP8": enc}, index, k=5, mode="side_by_side")
    assert res.overlap == 1.0
    assert all(it.marker == "" for pr in res.results.values() for it in pr.items)


def test_topk_overlap_and_markers_on_crafted_lists():
    a = [FakeHit(1, "a", .9), FakeHit(2, "b", .8), FakeHit(3, "c", .7)]
    b = [FakeHit(3, "c", .9), FakeHit(4, "d", .8), FakeHit(1, "a", .7)]
    assert S.topk_overlap(a, b, 3) == pytest.approx(2 / 3)
    assert S.topk_overlap(a, b, 1) == 0.0
    ma, mb = S.compare_markers(a, b, "FP16", "FP8")
    assert ma == ["rank moved FP16 #1 → FP8 #3", "only in FP16", "rank moved FP16 #3 → FP8 #1"]
    assert mb == ["rank moved FP16 #3 → FP8 #1", "only in FP8", "rank moved FP16 #1 → FP8 #3"]
    with pytest.raises(ValueError):
        S.topk_overlap(a, b, 0)


def test_threshold_filters_scores_and_empty_results_have_no_overlap(index, encoders):
    all_hits = S.search("yellow", encoders, index, k=18, mode="single", precision="FP16").results["FP16"].items
    cut = all_hits[3].score
    kept = S.search("yellow", encoders, index, k=18, threshold=cut, precision="FP16").results["FP16"].items
    assert kept and all(it.score >= cut for it in kept)
    assert len(kept) == sum(it.score >= cut for it in all_hits)
    none = S.search("yellow", encoders, index, k=5, threshold=1.0, mode="side_by_side")
    assert all(not pr.items for pr in none.results.values()) and none.overlap is None


@pytest.mark.parametrize("kwargs, msg", [
    ({"query": "   "}, "empty"), ({"query": None}, "no query"), ({"k": 0}, "k must"),
    ({"threshold": 2.0}, "threshold"), ({"mode": "triple"}, "mode"), ({"precision": "INT4"}, "not loaded"),
])
def test_bad_input_is_refused_with_a_message(index, encoders, kwargs, msg):
    args = {"query": "red", "k": 3, "threshold": None, "mode": "single", "precision": "FP16"} | kwargs
    with pytest.raises(ValueError, match=msg):
        S.search(args.pop("query"), encoders, index, **args)


def test_side_by_side_needs_two_precisions(index, encoders):
    with pytest.raises(ValueError, match="two precisions"):
        S.search("red", {"FP16": encoders["FP16"]}, index, mode="side_by_side")


def test_image_query_finds_the_identical_image_first(corpus, index, encoders):
    target = "green/green_1.png"
    with Image.open(corpus / target) as im:
        res = S.search(im.copy(), encoders, index, k=3, precision="FP16")
    assert res.results["FP16"].items[0].path == target
    assert encoders["FP16"].calls["images"] > 0


class _Clock:
    """A fake perf_counter: encoders and the index advance it by known amounts."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_latency_splits_encode_and_search_time(monkeypatch, index, encoders):
    clock = _Clock()
    monkeypatch.setattr(S.time, "perf_counter", clock)
    enc = encoders["FP16"]
    real_encode = enc.encode_texts

    def slow_encode(texts):
        clock.t += 0.030
        return real_encode(texts)

    def slow_query(encoder, query, k, threshold):
        clock.t += 0.005
        hits = MemIndex.query(index, encoder, query, k, threshold)
        clock.t += 0.002
        return hits

    monkeypatch.setattr(enc, "encode_texts", slow_encode)
    monkeypatch.setattr(index, "query", slow_query)
    lat = S.search("red", encoders, index, k=3, precision="FP16").results["FP16"].latency
    assert lat.encode_ms == pytest.approx(30.0)
    assert lat.search_ms == pytest.approx(7.0)
    assert lat.total_ms == pytest.approx(lat.encode_ms + lat.search_ms)


def test_timed_encoder_counts_nested_calls_once_and_keeps_identity(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(S.time, "perf_counter", clock)
    inner = FakeEncoder()
    real_pre = inner.preprocess

    def pre(im):
        clock.t += 1.0
        return real_pre(im)

    monkeypatch.setattr(inner, "preprocess", pre)
    timed = S.TimedEncoder(inner)
    timed.encode_pil([Image.new("RGB", (8, 8))] * 2)  # calls preprocess twice inside encode_pil
    assert timed.elapsed == pytest.approx(2.0)
    assert timed.identity() == inner.identity() and timed.name == inner.name


def test_latency_tracker_percentiles_and_bound(index, encoders):
    tracker = S.LatencyTracker(maxlen=5, window=3)
    queries = ["red", "green", "blue", "white", "black", "yellow", "red green"]
    for q in queries:
        tracker.record(S.search(q, encoders, index, k=3, mode="side_by_side"))
    for label in ("FP16", "FP8"):
        s = tracker.series(label)
        assert len(s) == 5
        pct = tracker.percentiles(label)
        assert pct["p50"] == pytest.approx(np.percentile(s, 50)) and pct["p95"] == pytest.approx(np.percentile(s, 95))
        rows = [r for r in tracker.running_rows() if r["series"].startswith(label + " ")]
        assert [r["query"] for r in rows if r["series"].endswith("p50")] == [3, 4, 5, 6, 7]  # numbering continues
        last_p95 = [r["ms"] for r in rows if r["series"].endswith("p95")][-1]
        assert last_p95 == pytest.approx(np.percentile(s[-3:], 95))  # rolling over the trailing window
    assert np.isnan(tracker.percentiles("FP32")["p50"])
    with pytest.raises(ValueError):
        S.LatencyTracker(maxlen=0)


def _brute_recall(index, enc, truth, k):
    hits = 0
    for text, relevant in truth.pairs:
        scores = index.emb[enc.name] @ enc.encode_texts([text])[0]
        top = [index.paths[i] for i in np.argsort(-scores, kind="stable")[:k]]
        hits += any(p in relevant for p in top)
    return hits / len(truth.pairs)


def test_benchmark_recall_with_captions_matches_brute_force(corpus, index, encoders):
    import json
    truth = S.captions_ground_truth(json.loads((corpus / "captions.json").read_text()))
    assert truth.kind == "captions" and len(truth.pairs) == 2 * 18
    res = S.benchmark(index, encoders, truth, ks=(1, 5, 10))
    for label, enc in encoders.items():
        for k in (1, 5, 10):
            assert res["recall"][label][k] == pytest.approx(_brute_recall(index, enc, truth, k))
        assert res["recall"][label][1] <= res["recall"][label][5] <= res["recall"][label][10]
    for k in (1, 5, 10):
        assert res["delta"][k] == pytest.approx(res["recall"]["FP8"][k] - res["recall"]["FP16"][k])


def test_benchmark_with_class_labels(corpus, index, encoders):
    labels = {p.relative_to(corpus).as_posix(): p.parent.name for p in corpus.rglob("*.png")}
    truth = S.labels_ground_truth(labels)
    assert truth.kind == "labels" and len(truth.pairs) == 6
    res = S.benchmark(index, {"FP16": encoders["FP16"]}, truth, ks=(1, 3))
    assert res["recall"]["FP16"][1] == pytest.approx(_brute_recall(index, encoders["FP16"], truth, 1))
    assert res["recall"]["FP16"][1] > 0.5  # colour words find their colour folder with the fake encoder
    assert res["delta"] == {}
    with pytest.raises(ValueError):
        S.benchmark(index, encoders, S.GroundTruth("labels", []))


@pytest.mark.parametrize("rel", ["../outside.png", "/etc/passwd", "red/../../outside.png", "", "red/\x00x.png",
                                 "link_out/secret.png"])
def test_safe_resolve_refuses_paths_outside_the_corpus(corpus, tmp_path, rel):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    os.symlink(outside, corpus / "link_out")
    with pytest.raises(S.PathOutsideCorpusError):
        S.safe_resolve(corpus, rel)


def test_safe_resolve_accepts_files_inside(corpus):
    assert S.safe_resolve(corpus, "red/red_0.png") == (corpus / "red" / "red_0.png").resolve()
    assert S.safe_resolve(corpus, "red/../blue/blue_0.png") == (corpus / "blue" / "blue_0.png").resolve()
