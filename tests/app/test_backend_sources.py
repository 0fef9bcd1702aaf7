"""Where the app reads files: the Benchmark tab's ground truth, a result's full-size view, uploads."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from clipfp8.app import backend
from clipfp8.app.latency import LatencyTracker, latency_chart
from clipfp8.app.search import PathOutsideCorpusError, search
from tests.app.helpers import MemIndex, make_corpus
from tests.fakes import FakeEncoder


@pytest.fixture()
def encoders() -> dict[str, FakeEncoder]:
    return backend.fake_encoders()


def _ctx(corpus: Path, encoders) -> backend.AppContext:
    ctx = backend.AppContext(corpus, encoders, MemIndex(corpus, list(encoders.values())))
    ctx.refresh()
    return ctx


def test_captions_beside_an_images_folder_are_offered_and_matched(tmp_path, encoders):
    """The issue's case: DATASET/captions.json keyed by file name, the corpus is DATASET/images."""
    images = make_corpus(tmp_path / "dataset" / "images", per_colour=1, captions=False)
    flat = {p.name: [f"a photo of {p.stem}"] for p in images.rglob("*.png")}
    (tmp_path / "dataset" / "captions.json").write_text(json.dumps(flat))
    ctx = _ctx(images, encoders)
    assert ctx.sources == ["../captions.json"] and ctx.default_source() == "../captions.json"
    truth = backend.load_ground_truth(ctx.index, "../captions.json", ctx.sources)
    assert truth.kind == "captions" and len(truth.pairs) == 6 and truth.skipped == 0
    assert {p for _, rel in truth.pairs for p in rel} == set(ctx.index.indexed_paths())
    assert "`../captions.json` next to the corpus" in truth.source
    # The same file given as the corpus itself (keys relative to images/) matches too.
    outer = _ctx(tmp_path / "dataset", encoders)
    assert outer.sources[0] == "captions.json"
    assert len(backend.load_ground_truth(outer.index, "captions.json", outer.sources).pairs) == 6


def test_caption_files_inside_the_corpus_can_be_picked_or_typed(tmp_path, encoders):
    corpus = make_corpus(tmp_path / "c", per_colour=2)
    (corpus / "red" / "extra.csv").write_text("image,caption\nred_0.png,the first red one\nnope.png,gone\n")
    (corpus / "notes.txt").write_text("not offered")
    ctx = _ctx(corpus, encoders)
    assert ctx.sources == ["captions.json", "red/extra.csv"]
    truth = backend.load_ground_truth(ctx.index, "red/extra.csv", ctx.sources)
    assert truth.pairs == [("the first red one", frozenset({"red/red_0.png"}))] and truth.skipped == 1
    labels = backend.load_ground_truth(ctx.index, backend.FOLDERS_SOURCE)
    assert labels.kind == "labels" and len(labels.pairs) == 6
    for bad, err in [("../../etc/passwd.json", PathOutsideCorpusError), ("/etc/x.json", PathOutsideCorpusError),
                     ("../captions.json", PathOutsideCorpusError), ("notes.txt", ValueError),
                     ("missing.json", ValueError), ("", ValueError)]:
        with pytest.raises(err):
            backend.load_ground_truth(ctx.index, bad, ctx.sources)


def test_uploaded_captions_errors_name_the_upload_not_the_temp_path(tmp_path, encoders):
    ctx = _ctx(make_corpus(tmp_path / "c", per_colour=1), encoders)
    up = tmp_path / "tmp-xyz" / "upload.json"
    up.parent.mkdir()
    up.write_text("{broken")
    with pytest.raises(ValueError) as e:
        backend.load_ground_truth(ctx.index, None, upload=(up, "my captions.json"))
    assert "my captions.json" in str(e.value) and "tmp-xyz" not in str(e.value)
    up.write_text(json.dumps({"elsewhere/x.png": ["nothing here"]}))
    with pytest.raises(ValueError, match="none of the 1 files named in `my captions.json` .uploaded. is in the index"):
        backend.load_ground_truth(ctx.index, None, upload=(up, "my captions.json"))
    up.write_text(json.dumps({"blue_0.png": ["blue"], "red/red_0.png": "red"}))
    truth = backend.load_ground_truth(ctx.index, None, upload=(up, "my captions.json"))
    assert sorted(truth.pairs) == [("blue", frozenset({"blue/blue_0.png"})), ("red", frozenset({"red/red_0.png"}))]


def test_a_flat_corpus_has_no_class_folders(tmp_path, encoders):
    make_corpus(tmp_path / "c", per_colour=1, captions=False)
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (tmp_path / "c").rglob("*.png"):
        p.rename(flat / p.name)
    ctx = _ctx(flat, encoders)
    assert ctx.folders == [] and ctx.sources == [] and ctx.default_source() is None
    with pytest.raises(ValueError, match="no class folders"):
        backend.load_ground_truth(ctx.index, backend.FOLDERS_SOURCE)


def test_full_size_view_reads_the_indexed_file_by_hit_id(tmp_path, encoders, monkeypatch):
    corpus = make_corpus(tmp_path / "c", per_colour=1)
    Image.new("RGB", (300, 120), (200, 10, 10)).save(corpus / "red" / "red_0.png")  # re-saved larger
    ctx = _ctx(corpus, encoders)
    hit = ctx.index.paths.index("red/red_0.png")
    image, rel = backend.load_full_image(ctx.index, hit)
    assert rel == "red/red_0.png" and image.size == (300, 120) and image.mode == "RGB"
    monkeypatch.setattr(backend, "FULL_MAX_SIDE", 100)
    assert backend.load_full_image(ctx.index, hit)[0].size == (100, 40)  # capped, aspect kept
    monkeypatch.setattr(backend, "FULL_MAX_BYTES", 10)
    with pytest.raises(ValueError, match="not shown at full size"):
        backend.load_full_image(ctx.index, hit)
    with pytest.raises(ValueError, match="no longer in the index"):
        backend.load_full_image(ctx.index, 999)
    outside = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(outside)
    (corpus / "blue" / "blue_0.png").unlink()
    (corpus / "blue" / "blue_0.png").symlink_to(outside)  # an indexed path now pointing out of the corpus
    with pytest.raises(PathOutsideCorpusError):
        backend.load_full_image(ctx.index, ctx.index.paths.index("blue/blue_0.png"))


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds almost no data (a bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("data, message", [
    (b"", "the upload 'x.png' is empty"),
    (b"GIF89a but not really", "is not an image this app can read"),
    (_png_header(40_000, 40_000), "the upload 'x.png' is too large: over 25,000,000 pixels"),
    (_png_header(64, 64), "is damaged or truncated"),
])
def test_bad_uploads_get_a_short_reason(data, message):
    with pytest.raises(ValueError) as e:
        backend.decode_upload(data, "some/dir/x.png")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_uploads_are_downscaled_to_the_query_size():
    import io

    buf = io.BytesIO()
    Image.new("RGB", (3000, 1500), (0, 0, 255)).save(buf, "JPEG")
    image = backend.decode_upload(buf.getvalue(), "big.jpg")
    assert max(image.size) == backend.QUERY_MAX_SIDE and image.size[0] == 2 * image.size[1]


def test_latency_chart_has_integer_ticks_and_shows_a_single_query(tmp_path, encoders):
    import xml.etree.ElementTree as ET

    ns = {"s": "http://www.w3.org/2000/svg"}
    ctx = _ctx(make_corpus(tmp_path / "c", per_colour=1), encoders)
    empty = ET.fromstring(latency_chart(LatencyTracker(), ["FP16", "FP8"]))
    assert empty.find("s:text[@class='empty']", ns).text.startswith("No query yet")
    assert not empty.findall("s:polyline", ns) and not empty.findall("s:text[@class='xtick']", ns)
    tracker = LatencyTracker()
    for q in ("red", "green", "blue", "white", "black", "yellow", "red green", "a square"):
        tracker.record(search(q, ctx.encoders, ctx.index, k=2, precision="FP16"))
    tracker.record(search("red", ctx.encoders, ctx.index, k=2, precision="FP8"))
    svg = ET.fromstring(latency_chart(tracker, ["FP16", "FP8"]))
    lines = {p.get("data-series"): p.get("points").split() for p in svg.findall("s:polyline", ns)}
    assert set(lines) == {"FP16 p50", "FP16 p95", "FP8 p50", "FP8 p95"} and len(lines["FP8 p50"]) == 1
    assert len(svg.findall("s:circle", ns)) == 2 * 8 + 2 * 1  # a marker per point: one FP8 query shows
    xticks = [t.text for t in svg.findall("s:text[@class='xtick']", ns)]
    assert xticks and all(t.isdigit() for t in xticks) and xticks[0] == "1" and int(xticks[-1]) <= 8
    yticks = [float(t.text) for t in svg.findall("s:text[@class='ytick']", ns)]
    assert yticks[0] == 0 and all(b > a for a, b in zip(yticks, yticks[1:], strict=False))


@pytest.mark.parametrize("lo, hi, integer, want", [
    (0.5, 1.5, True, [1]), (0.5, 5.5, True, [1, 2, 3, 4, 5]), (0.5, 40.5, True, [5, 10, 15, 20, 25, 30, 35, 40]),
    (0, 0.012, False, [0, 0.005, 0.01]), (0, 130, False, [0, 50, 100])])
def test_chart_ticks_are_nice_numbers(lo, hi, integer, want):
    from clipfp8.app.latency import ticks

    got = ticks(lo, hi, 10 if integer else 5, integer)
    assert got == pytest.approx(want)
