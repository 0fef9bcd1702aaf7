"""Unit tests of the pure app.search module with FakeEncoder and an in-memory index."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

import clipfp8.app.search as S
from tests.app.helpers import FakeHit, MemIndex
from tests.fakes import FakeEncoder


def _ids(items: list[S.ResultItem]) -> list[int]:
    return [it.id for it in items]


def test_single_mode_runs_only_the_chosen_precision(index, encoders):
    res = S.search("a red square", encoders, index, k=4, mode="single", precision="FP8")
    assert res.precisions() == ["FP8"] and res.overlap is None
    assert encoders["FP16"].calls["texts"] == 0 and encoders["FP8"].calls["texts"] == 1
    items = res.results["FP8"].items
    assert [it.rank for it in items] == [1, 2, 3, 4]
    assert all(a.score >= b.score for a, b in zip(items, items[1:], strict=False))
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


def _all_ids(res: S.SearchResult, label: str) -> list[int]:
    return [it.id for it in res.results[label].items]


def test_pages_concatenate_to_the_single_long_list(index, encoders):
    full = S.search("a green square", encoders, index, k=15, precision="FP16")
    pages = [S.search("a green square", encoders, index, k=5, precision="FP16", page=p) for p in range(4)]
    assert sum((_all_ids(r, "FP16") for r in pages[:3]), []) == _all_ids(full, "FP16")
    assert [it.rank for it in pages[2].results["FP16"].items] == [11, 12, 13, 14, 15]
    assert [r.has_more for r in pages] == [True, True, True, False]  # 18 images: page 4 holds 16-18
    assert len(pages[3].results["FP16"].items) == 3 and pages[3].first_rank == 16
    beyond = S.search("a green square", encoders, index, k=5, precision="FP16", page=4)
    assert beyond.shown() == 0 and not beyond.has_more


def test_side_by_side_pages_mark_against_every_earlier_rank(index, encoders):
    k, page = 4, 1
    whole = S.search("blue", encoders, index, k=k * (page + 1), mode="side_by_side")
    res = S.search("blue", encoders, index, k=k, mode="side_by_side", page=page)
    for label in ("FP16", "FP8"):
        assert res.results[label].items == whole.results[label].items[k:]  # same ranks, same markers
    a, b = (set(_all_ids(res, x)) for x in ("FP16", "FP8"))
    assert res.overlap == pytest.approx(len(a & b) / k)


@pytest.mark.parametrize("folder, want", [
    (None, None), ("", None), ("All folders", None), ("/", None), ("red/", "red"), ("./red//", "red"),
    ("a\\b", "a/b"), ("animals/cats", "animals/cats")])
def test_normalize_folder(folder, want):
    assert S.normalize_folder(folder) == want


@pytest.mark.parametrize("folder", ["/etc", "../x", "a/../../b", "C:\\x", "red\x00"])
def test_normalize_folder_refuses_escapes(folder):
    with pytest.raises(ValueError, match="folder filter"):
        S.normalize_folder(folder)


def test_folder_filter_keeps_the_ranking_within_the_folder(index, encoders):
    everything = S.search("a white square", encoders, index, k=18, precision="FP8").results["FP8"].items
    want = [it.path for it in everything if it.path.startswith("blue/")]
    res = S.search("a white square", encoders, index, k=2, precision="FP8", folder="blue/")
    assert [it.path for it in res.results["FP8"].items] == want[:2] and res.folder == "blue"
    assert [it.rank for it in res.results["FP8"].items] == [1, 2] and res.has_more
    last = S.search("a white square", encoders, index, k=2, precision="FP8", folder="blue", page=1)
    assert [it.path for it in last.results["FP8"].items] == want[2:] and not last.has_more
    assert S.search("red", encoders, index, k=3, folder="nowhere").shown() == 0


class _RankedIndex:
    """A synthetic index of ``n`` hits, best first, whose paths put ids in ``rare`` under rare/;
    it records the k of every query."""

    corpus_root = Path("/nonexistent")

    def __init__(self, n: int, rare: set[int]) -> None:
        self.n, self.rare, self.asked = n, rare, []

    def query(self, encoder, query, k, threshold):
        encoder.encode_texts([query])
        self.asked.append(k)
        return [FakeHit(i, f"{'rare' if i in self.rare else 'common'}/{i}.png", 1 - i / self.n)
                for i in range(min(k, self.n))]


def test_folder_filter_widens_the_search_until_the_page_is_full(encoders, monkeypatch):
    idx = _RankedIndex(1000, {500, 900})
    res = S.search("x", encoders, idx, k=2, precision="FP16", folder="rare")
    assert idx.asked == [64, 256, 1024]  # x4 per round until the index ran out
    assert [it.path for it in res.results["FP16"].items] == ["rare/500.png", "rare/900.png"]
    assert not res.has_more and not res.truncated
    monkeypatch.setattr(S, "MAX_RANK", 300)
    idx.asked.clear()
    cut = S.search("x", encoders, idx, k=2, precision="FP16", folder="rare")
    assert idx.asked == [64, 256, 300] and cut.truncated and cut.shown() == 0
    assert "only the top 300 hits" not in S.banner_text(S.QuerySpec("x"), cut)  # no results: says so instead
    assert S.banner_text(S.QuerySpec("x"), cut).startswith("**No results for `x`** in folder `rare/`")


def test_paging_is_bounded(index, encoders):
    with pytest.raises(ValueError, match="paging stops at result 5000"):
        S.search("red", encoders, index, k=50, page=100)
    with pytest.raises(ValueError, match="page must be"):
        S.search("red", encoders, index, k=5, page=-1)


def test_query_spec_repeats_an_image_query_only_while_its_label_is_unchanged():
    image = Image.new("RGB", (4, 4))
    spec = S.QuerySpec(image=image, name="cat.jpg")
    assert spec.label == "image: cat.jpg" and spec.query() is image
    assert S.QuerySpec.from_text_box("image: cat.jpg ", spec) is spec
    edited = S.QuerySpec.from_text_box("image: cat.jpg on a mat", spec)
    assert not edited.is_image and edited.query() == "image: cat.jpg on a mat"
    assert S.QuerySpec.from_text_box("a dog", None).query() == "a dog"


def test_banner_says_what_the_results_are_for(index, encoders, corpus):
    text = S.search("red", encoders, index, k=5, precision="FP16")
    assert S.banner_text(S.QuerySpec("red"), text) == "**Results for `red`** · results 1–5."
    with Image.open(corpus / "red/red_1.png") as im:
        spec = S.QuerySpec(image=im.convert("RGB"), name="red_1.png")
    res = S.search(spec.query(), encoders, index, k=2, precision="FP16", folder="red", page=1)
    assert S.banner_text(spec, res) == "**Results for image `red_1.png`** in folder `red/` · results 3–3 (no more)."
    empty = S.search("red", encoders, index, k=5, precision="FP16", threshold=1.0)
    assert S.banner_text(S.QuerySpec("red"), empty) == "**No results for `red`** above the minimum score."
    assert S.md_code("a`b\nc" + "x" * 100, limit=10) == "`a'b cxxxx…`"


def test_placeholder_suggests_words_the_corpus_has():
    caps = ["elephant", "contour fox", "tree", "scissors", "cat 2", "axe"]
    assert S.placeholder_text(caps, ["animals"]) == "e.g. elephant, scissors or tree — or upload a picture"
    assert S.placeholder_text(["a red square"], ["blue", "red", "white_cat"]) == \
        "e.g. blue, red or white cat — or upload a picture"
    assert "red car" not in S.placeholder_text([], []) and S.placeholder_text([], []).startswith("e.g.")
