"""clipfp8.app.backend choices and the UI helpers that guard what reaches the browser."""
from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest

import clipfp8.app.search as S
from clipfp8.app import backend, ui
from clipfp8.quant.core.config import ModelSpec
from tests.app.helpers import FakeHit, MemIndex, make_corpus
from tests.fakes import FakeEncoder


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    return make_corpus(tmp_path / "corpus", per_colour=2)


@pytest.fixture()
def encoders() -> dict[str, FakeEncoder]:
    return backend.fake_encoders()  # the same twins the serve test hook uses


def _ctx(corpus: Path, encoders, extra_hits=()) -> backend.AppContext:
    index = MemIndex(corpus, list(encoders.values()), extra_hits)
    return backend.AppContext(corpus, encoders, index, backend.load_ground_truth(corpus), backend.CPU_FP8_NOTE,
                              {"images": {"ok": 12}})


@pytest.mark.parametrize("indexed, capable, want", [
    (["fp16", "fp8-fake"], False, ("fp16", "fp8-fake")),
    (["fp16", "fp8-fake", "fp8"], True, ("fp16", "fp8")),
    (["fp16", "fp8"], False, ("fp16", None)),  # real FP8 needs a capable GPU
    (["fp32", "bf16"], False, ("bf16", None)),
    (["fp8-fake"], False, (None, "fp8-fake")),
])
def test_pick_precisions(indexed, capable, want):
    assert backend.pick_precisions(indexed, capable) == want


def test_encoders_for_index_builds_what_the_index_holds():
    made = []

    def factory(spec):
        made.append(spec)
        return FakeEncoder(precision=spec.precision)

    stats = {"encoders": {"m-fp16": {"precision": "fp16"}, "m-fp8-fake": {"precision": "fp8-fake"}}}
    encs = backend.encoders_for_index(stats, ModelSpec(), "cpu", Path("/q"), factory=factory)
    assert list(encs) == ["FP16", "FP8"]
    assert [s.precision for s in made] == ["fp16", "fp8-fake"] and made[1].quantized == Path("/q")
    assert list(backend.encoders_for_index(stats, ModelSpec(), "cpu", None, factory=factory)) == ["FP16"]
    with pytest.raises(ValueError, match="no FP16"):
        backend.encoders_for_index({"encoders": {}}, ModelSpec(), "cpu", None, factory=factory)


def test_ground_truth_prefers_captions_then_folders(corpus):
    truth = backend.load_ground_truth(corpus)
    assert truth.kind == "captions"
    caps = json.loads((corpus / "captions.json").read_text())
    assert len(truth.pairs) == sum(len(v) for v in caps.values())
    (corpus / "captions.json").unlink()
    truth = backend.load_ground_truth(corpus)
    assert truth.kind == "labels" and {t for t, _ in truth.pairs} == {p.name for p in corpus.iterdir()}


def test_ground_truth_absent_for_a_flat_corpus_without_captions(tmp_path):
    make_corpus(tmp_path / "c", per_colour=1, captions=False)
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (tmp_path / "c").rglob("*.png"):
        p.rename(flat / p.name)
    assert backend.load_ground_truth(flat) is None


def test_gallery_items_never_include_paths_outside_the_corpus(corpus, encoders, tmp_path):
    (tmp_path / "secret.png").write_bytes(b"x")
    crafted = [FakeHit(900, "../secret.png", 1.0), FakeHit(901, str(tmp_path / "secret.png"), 1.0),
               FakeHit(902, "red/../../secret.png", 1.0)]
    ctx = _ctx(corpus, encoders, crafted)
    res = S.search("red", encoders, ctx.index, k=3, mode="side_by_side")
    for label in ("FP16", "FP8"):
        items = ui.gallery_items(ctx, res, label)
        assert len(items) == 3  # the 3 real hits; the crafted ones are dropped
        for path, caption in items:
            assert Path(path).resolve().is_relative_to(corpus.resolve())
            assert Path(path).name in caption and caption.startswith("#")


def test_latency_markdown_shows_each_precision_and_overlap(corpus, encoders):
    ctx = _ctx(corpus, encoders)
    tracker = S.LatencyTracker()
    res = S.search("blue", encoders, ctx.index, k=4, mode="side_by_side")
    tracker.record(res)
    md = ui.latency_markdown(res, tracker)
    assert "| FP16 |" in md and "| FP8 |" in md
    assert f"{res.overlap:.0%}" in md and "Top-4 overlap FP8 vs FP16" in md


def test_run_search_hides_second_gallery_in_single_mode(corpus, encoders):
    ctx = _ctx(corpus, encoders)
    out = ui.run_search(ctx, S.LatencyTracker(), "green", 3, 0.0, "FP8", "Single")
    gal_a, gal_b, _, frame, tracker, paths = out
    assert gal_a.label == "FP8 results" and gal_b.visible is False
    assert len(paths[0]) == 3 and paths[1] == []
    assert set(frame["series"]) == {"FP8 p50", "FP8 p95"}
    out = ui.run_search(ctx, tracker, "green", 3, 0.0, "FP8", "Side by side")
    assert out[1].visible is True and len(out[5][1]) == 3


def test_user_errors_give_short_messages_without_tracebacks():
    @ui.user_errors
    def bad_value():
        raise ValueError("k must be between 1 and 1000, got 0\nsecond line")

    @ui.user_errors
    def crash():
        raise RuntimeError("internal detail /secret/path")

    with pytest.raises(gr.Error) as e:
        bad_value()
    assert e.value.message == "k must be between 1 and 1000, got 0"
    with pytest.raises(gr.Error) as e:
        crash()
    assert "secret" not in e.value.message and "server log" in e.value.message


def test_select_refuses_stale_or_foreign_paths(corpus, encoders, tmp_path):
    ctx = _ctx(corpus, encoders)
    evt = gr.SelectData(None, {"index": 0, "value": None})
    with pytest.raises(ValueError, match="no longer available"):
        ui._select(ctx, 0, S.LatencyTracker(), [[], []], 3, 0.0, "FP16", "Single", evt)
    outside = tmp_path / "x.png"
    outside.write_bytes(b"x")
    with pytest.raises(S.PathOutsideCorpusError):
        ui._select(ctx, 0, S.LatencyTracker(), [[str(outside)], []], 3, 0.0, "FP16", "Single", evt)
    image, gal_a, *_ = ui._select(ctx, 0, S.LatencyTracker(), [[str(corpus / "red/red_1.png")], []],
                                  3, 0.0, "FP16", "Single", evt)
    assert image.size == (20, 20)


def test_markers_markdown_lists_every_difference(corpus):
    encs = {"FP16": FakeEncoder(precision="fp16"), "FP8": FakeEncoder(precision="fp8-fake", noise=1.0)}
    ctx = _ctx(corpus, encs)
    results = [S.search(q, encs, ctx.index, k=5, mode="side_by_side") for q in ("white", "red", "blue", "green")]
    res = min(results, key=lambda r: r.overlap)  # the query where the twins disagree most
    md = ui.markers_markdown(res)
    marked = [(label, it) for label, pr in res.results.items() for it in pr.items if it.marker]
    assert marked, "the noisy twin should produce differences"
    for label, it in marked:
        line = f"**{label}** #{it.rank} `{Path(it.path).name}`: {it.marker}"
        # FP16's rank moves are stated once, from the FP8 side; everything else is listed
        assert (line in md) == (label == "FP8" or it.marker.startswith("only")), line
    assert ui.markers_markdown(S.search("white", encs, ctx.index, k=5, precision="FP16")) == ""


def test_open_context_over_a_real_index(tmp_path, monkeypatch):
    from clipfp8.indexing import index_corpus

    corpus = make_corpus(tmp_path / "c", per_colour=2)
    index_corpus(corpus, tmp_path / "idx", list(backend.fake_encoders().values()), workers=1)
    monkeypatch.setenv(backend.FAKE_ENCODER_ENV, "1")
    ctx = backend.open_context(tmp_path / "idx")
    assert list(ctx.encoders) == ["FP16", "FP8"] and ctx.device_note == backend.CPU_FP8_NOTE
    assert ctx.corpus_root == corpus.resolve() and ctx.truth.kind == "captions"
    res = S.search("a red square", ctx.encoders, ctx.index, k=4, mode="side_by_side")
    mem = MemIndex(corpus, list(ctx.encoders.values()))
    for label, enc in ctx.encoders.items():
        want = [h.path for h in mem.query(enc, "a red square", 4, None)]
        assert [it.path for it in res.results[label].items] == want  # same ranking as brute force
    for rel in ("../c/red/red_0.png", "/etc/passwd", "red/../../x.png"):
        with pytest.raises(S.PathOutsideCorpusError):
            ctx.index.resolve(rel)
    assert ctx.index.resolve("red/red_0.png") == (corpus / "red" / "red_0.png").resolve()


def test_reindex_button_and_handler_exist_only_when_allowed(tmp_path, monkeypatch):
    """A hidden Gradio endpoint is still callable over HTTP: without --allow-reindex there is no
    re-indexing handler at all."""
    from clipfp8.indexing import index_corpus

    corpus = make_corpus(tmp_path / "c", per_colour=1)
    index_corpus(corpus, tmp_path / "idx", list(backend.fake_encoders().values()), workers=1)
    monkeypatch.setenv(backend.FAKE_ENCODER_ENV, "1")
    ctx = backend.open_context(tmp_path / "idx")

    def elem_ids(blocks) -> set[str]:
        return {b.elem_id for b in blocks.blocks.values() if getattr(b, "elem_id", None)}

    def handlers(blocks) -> int:
        return len(blocks.fns)

    off, on = ui.build_ui(ctx), ui.build_ui(ctx, allow_reindex=True)
    assert "reindex-btn" not in elem_ids(off) and "reindex-off" in elem_ids(off)
    assert "reindex-btn" in elem_ids(on)
    assert handlers(on) == handlers(off) + 1
