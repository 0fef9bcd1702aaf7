"""clipfp8.app.backend choices and the UI helpers that guard what reaches the browser."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest

import clipfp8.app.search as S
from clipfp8.app import backend, ui, ui_render
from clipfp8.app.latency import LatencyTracker
from clipfp8.app.uploads import TempSpace
from clipfp8.quant.core.config import ModelSpec
from tests.app.helpers import COLOURS, FakeHit, MemIndex, make_corpus
from tests.fakes import FakeEncoder


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    return make_corpus(tmp_path / "corpus", per_colour=2)


@pytest.fixture()
def encoders() -> dict[str, FakeEncoder]:
    return backend.fake_encoders()  # the same twins the serve test hook uses


def _ctx(corpus: Path, encoders, extra_hits=()) -> backend.AppContext:
    index = MemIndex(corpus, list(encoders.values()), extra_hits)
    ctx = backend.AppContext(corpus, encoders, index, backend.CPU_FP8_NOTE, {"images": {"ok": 12}})
    ctx.refresh()
    return ctx


def _tab(ctx: backend.AppContext, tmp_path: Path) -> ui.SearchTab:
    with gr.Blocks():
        return ui.SearchTab(ctx, TempSpace(tmp_path / "uploads"))


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


def test_gallery_items_never_include_paths_outside_the_corpus(corpus, encoders, tmp_path):
    (tmp_path / "secret.png").write_bytes(b"x")
    crafted = [FakeHit(900, "../secret.png", 1.0), FakeHit(901, str(tmp_path / "secret.png"), 1.0),
               FakeHit(902, "red/../../secret.png", 1.0)]
    ctx = _ctx(corpus, encoders, crafted)
    res = S.search("red", encoders, ctx.index, k=6, mode="side_by_side")  # the index ranks the crafted 3 first
    for label in ("FP16", "FP8"):
        items = ui_render.gallery_items(ctx, res, label)
        assert len(items) == 3  # the 3 real hits; the crafted ones are dropped
        for path, caption, _ in items:
            assert Path(path).resolve().is_relative_to(corpus.resolve())
            assert Path(path).name in caption and caption.startswith("#")


def test_latency_markdown_shows_each_precision_and_overlap(corpus, encoders):
    ctx = _ctx(corpus, encoders)
    tracker = LatencyTracker()
    res = S.search("blue", encoders, ctx.index, k=4, mode="side_by_side")
    tracker.record(res)
    md = ui_render.latency_markdown(res, tracker)
    assert "| FP16 |" in md and "| FP8 |" in md
    assert f"{res.overlap:.0%}" in md and "Top-4 overlap FP8 vs FP16" in md


def test_render_hides_second_gallery_in_single_mode(corpus, encoders, tmp_path):
    ctx = _ctx(corpus, encoders)
    tab = _tab(ctx, tmp_path)
    tracker = LatencyTracker()
    out = out_first = tab.render(tracker, S.QuerySpec("green"), 0, 3, 0.0, "FP8", ui.SINGLE, S.ALL_FOLDERS)
    assert out[tab.gal_a].label == "FP8 results" and out[tab.gal_b].visible is False
    assert len(out[tab.shown][0]) == 3 and out[tab.shown][1] == []
    assert out[tab.query] == "green" and out[tab.banner].startswith("**Results for `green`**")
    assert out[tab.next].interactive is True and out[tab.prev].interactive is False
    out = tab.render(tracker, S.QuerySpec("green"), 1, 3, 0.0, "FP8", ui.SIDE, "green")
    assert out[tab.gal_b].visible is True and len(out[tab.shown][1]) == 0  # green/ holds only 2 images
    assert out[tab.prev].interactive is True and out[tab.next].interactive is False
    assert "in folder `green/`" in out[tab.banner]
    # Galleries are sent as JPEG; the same query again decodes no thumbnail a second time.
    assert tab.gal_a.format == "jpeg" and tab.gal_b.format == "jpeg"
    misses = tab.thumbs.misses
    again = tab.render(tracker, S.QuerySpec("green"), 0, 3, 0.0, "FP8", ui.SINGLE, S.ALL_FOLDERS)
    assert tab.thumbs.misses == misses and again[tab.shown][0] == out_first[tab.shown][0]
    with pytest.raises(ValueError, match="no query yet"):
        tab.render(tracker, None, 0, 3, 0.0, "FP8", ui.SINGLE, None)


def test_clicking_a_result_shows_it_full_size_by_hit_id_then_searches_by_it(corpus, encoders, tmp_path):
    ctx = _ctx(corpus, encoders)
    tab = _tab(ctx, tmp_path)
    tracker = LatencyTracker()
    out = tab.render(tracker, S.QuerySpec("a blue square"), 0, 4, 0.0, "FP16", ui.SINGLE, None)
    shown = out[tab.shown]
    target = ctx.index.path_of(shown[0][2])
    with pytest.raises(ValueError, match="no longer available"):
        tab.select(0, shown, ui.CLICK_SEARCH, 9)
    step1 = tab.select(0, shown, ui.CLICK_SEARCH, 2)
    assert step1[tab.full].size == (20, 20) and step1[tab.pending] is True
    assert not step1[tab.gal_a].value  # emptied: no selection survives onto the new results
    assert step1[tab.query] == f"image: {Path(target).name}" and step1[tab.sel_folder] == target.split("/")[0]
    assert f"folder `{target.split('/')[0]}/`" in step1[tab.info]
    step2 = tab.on_pending(tracker, step1[tab.spec], True, 4, 0.0, "FP16", ui.SINGLE, None)
    assert step2[tab.banner].startswith(f"**Results for image `{Path(target).name}`**")
    assert step2[tab.shown][0][0] == shown[0][2]  # the image finds itself first
    assert tab.on_pending(tracker, step1[tab.spec], False, 4, 0.0, "FP16", ui.SINGLE, None) == {tab.pending: False}
    only = tab.select(0, shown, ui.CLICK_SHOW, 1)
    assert only[tab.pending] is False and tab.spec not in only and tab.gal_a not in only
    assert "shown full size (no search)" in only[tab.info]


def test_a_new_folder_choice_searches_again_and_nothing_else_does(corpus, encoders, tmp_path):
    ctx = _ctx(corpus, encoders)
    tab = _tab(ctx, tmp_path)
    tracker = LatencyTracker()
    assert tab.on_folder(tracker, None, None, 3, 0.0, "FP16", ui.SINGLE, "red") == {tab.folder_shown: None}
    spec = S.QuerySpec("a red square")
    out = tab.on_folder(tracker, spec, None, 3, 0.0, "FP16", ui.SINGLE, "red/")
    assert out[tab.folder_shown] == "red" and "in folder `red/`" in out[tab.banner]
    again = tab.on_folder(tracker, spec, "red", 3, 0.0, "FP16", ui.SINGLE, "red")  # the same choice reported twice
    assert again == {tab.folder_shown: "red"} and tracker.percentiles("FP16")["n"] == 1


def test_uploads_are_decoded_here_and_deleted_after_use(corpus, encoders, tmp_path):
    ctx = _ctx(corpus, encoders)
    tab = _tab(ctx, tmp_path)
    good = tmp_path / "uploads" / "0a1b" / "my picture.png"
    good.parent.mkdir(parents=True)
    good.write_bytes((corpus / "red" / "red_1.png").read_bytes())
    out = tab.on_upload(LatencyTracker(), str(good), 3, 0.0, "FP16", ui.SINGLE, None)
    assert not good.exists() and not good.parent.exists()
    assert out[tab.query] == "image: my picture.png" and out[tab.full].size == (20, 20)
    assert out[tab.shown][0][0] == ctx.index.paths.index("red/red_1.png")
    bad = tmp_path / "uploads" / "ff" / "notes.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="the upload 'notes.png' is not an image this app can read"):
        tab.on_upload(LatencyTracker(), str(bad), 3, 0.0, "FP16", ui.SINGLE, None)
    assert not bad.exists()


def test_user_errors_give_short_messages_without_tracebacks():
    @ui_render.user_errors
    def bad_value():
        raise ValueError("k must be between 1 and 1000, got 0\nsecond line")

    @ui_render.user_errors
    def crash():
        raise RuntimeError("internal detail /secret/path")

    with pytest.raises(gr.Error) as e:
        bad_value()
    assert e.value.message == "k must be between 1 and 1000, got 0"
    with pytest.raises(gr.Error) as e:
        crash()
    assert "secret" not in e.value.message and "server log" in e.value.message


def test_markers_markdown_lists_every_difference(corpus):
    encs = {"FP16": FakeEncoder(precision="fp16"), "FP8": FakeEncoder(precision="fp8-fake", noise=1.0)}
    ctx = _ctx(corpus, encs)
    results = [S.search(q, encs, ctx.index, k=5, mode="side_by_side") for q in ("white", "red", "blue", "green")]
    res = min(results, key=lambda r: r.overlap)  # the query where the twins disagree most
    md = ui_render.markers_markdown(res)
    marked = [(label, it) for label, pr in res.results.items() for it in pr.items if it.marker]
    assert marked, "the noisy twin should produce differences"
    for label, it in marked:
        line = f"**{label}** #{it.rank} `{Path(it.path).name}`: {it.marker}"
        # FP16's rank moves are stated once, from the FP8 side; everything else is listed
        assert (line in md) == (label == "FP8" or it.marker.startswith("only")), line
    assert ui_render.markers_markdown(S.search("white", encs, ctx.index, k=5, precision="FP16")) == ""


def test_open_context_over_a_real_index(tmp_path, monkeypatch):
    from clipfp8.indexing import index_corpus

    corpus = make_corpus(tmp_path / "c", per_colour=2)
    index_corpus(corpus, tmp_path / "idx", list(backend.fake_encoders().values()), workers=1)
    monkeypatch.setenv(backend.FAKE_ENCODER_ENV, "1")
    ctx = backend.open_context(tmp_path / "idx")
    assert list(ctx.encoders) == ["FP16", "FP8"] and ctx.device_note == backend.CPU_FP8_NOTE
    assert ctx.corpus_root == corpus.resolve() and ctx.sources == ["captions.json"]
    assert ctx.folders == sorted(COLOURS) and ctx.default_source() == "captions.json"
    assert ctx.index.indexed_paths() == sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.png"))
    res = S.search("a red square", ctx.encoders, ctx.index, k=4, mode="side_by_side")
    mem = MemIndex(corpus, list(ctx.encoders.values()))
    for label, enc in ctx.encoders.items():
        want = [h.path for h in mem.query(enc, "a red square", 4, None)]
        assert [it.path for it in res.results[label].items] == want  # same ranking as brute force
        assert [ctx.index.path_of(it.id) for it in res.results[label].items] == want
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


def test_benchmark_tab_reports_progress_and_says_where_its_ground_truth_comes_from(corpus, encoders, tmp_path):
    ctx = _ctx(corpus, encoders)
    calls = []
    md, frame = ui.run_benchmark(ctx, "captions.json", None, 0, lambda *a, **kw: calls.append((a, kw)))
    counted = [a[0] for a, _ in calls if isinstance(a[0], tuple)]
    assert counted[-1] == (48, 48) and len(counted) == 48  # 24 captions x 2 precisions, every 1 %
    assert all(kw.get("unit") == "queries" for a, kw in calls if isinstance(a[0], tuple))
    assert md.startswith("Ground truth: **`captions.json` in the corpus** — 24 captions of 12 indexed images")
    assert "24 queries from the captions" in md and set(frame["precision"]) == {"FP16", "FP8"}
    md, _ = ui.run_benchmark(ctx, backend.FOLDERS_SOURCE, None, 2, lambda *a, **kw: None)
    assert "class folders" in md and "2 queries from the labels" in md
    assert ui.describe_source(ctx, "nope.json").startswith("⚠ no captions file 'nope.json' in the corpus")
    up = tmp_path / "uploads" / "ab" / "mine.json"
    up.parent.mkdir(parents=True)
    up.write_text('{"red_0.png": ["red"]}')
    text, truth = ui.read_uploaded_truth(ctx, TempSpace(tmp_path / "uploads"), str(up))
    assert not up.exists() and "`mine.json` (uploaded)" in text
    assert truth.pairs == [("red", frozenset({"red/red_0.png"}))]
    md, _ = ui.run_benchmark(ctx, "captions.json", truth, 0, lambda *a, **kw: None)  # the upload wins
    assert "1 query from the captions" in md


def test_header_shows_the_corpus_with_home_as_tilde(corpus, encoders, tmp_path):
    assert ui_render.display_path(tmp_path / "photos" / "a b", home=tmp_path) == "~/photos/a b"
    assert ui_render.display_path(Path("/srv/photos"), home=tmp_path) == "/srv/photos"
    ctx = _ctx(corpus, encoders)
    assert f"Corpus `{ui_render.display_path(ctx.corpus_root)}`" in ui_render.header_markdown(ctx)
