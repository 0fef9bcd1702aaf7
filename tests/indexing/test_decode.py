"""Decoding: mode conversions, EXIF orientation, first frames, bombs, and the bounded pool."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipfp8.indexing.decode import imap_bounded, open_image, pixel_limit
from clipfp8.indexing.errors import DecodeError
from tests.indexing import badfiles as bf


def _decode(path: Path, max_pixels: int = 10**8) -> np.ndarray:
    im = open_image(path.read_bytes(), max_pixels)
    assert im.mode == "RGB"
    return np.asarray(im).astype(int)


def test_cmyk_becomes_rgb(tmp_path: Path) -> None:
    px = _decode(bf.cmyk_jpeg(tmp_path / "c.jpg"))[10, 15]
    assert px[0] > 200 and px[1] < 60 and px[2] < 60  # red


def test_16bit_grey_is_rescaled_not_clipped(tmp_path: Path) -> None:
    with Image.open(bf.png16(tmp_path / "g.png")) as im:
        assert im.mode.startswith("I")
    arr = _decode(tmp_path / "g.png")
    assert abs(arr[5, 2, 0] - 128) <= 1 and arr[5, 20].tolist() == [255, 255, 255]


def test_palette_transparency_and_la_flatten_on_white(tmp_path: Path) -> None:
    arr = _decode(bf.palette_transparent(tmp_path / "p.png"))
    assert arr[5, 2].tolist() == [255, 255, 255] and arr[5, 20].tolist() == [0, 0, 255]
    assert _decode(bf.la_grey(tmp_path / "la.png"))[3, 3].tolist() == [255, 255, 255]


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    px = _decode(bf.animated_gif(tmp_path / "a.gif"))[5, 5]
    assert px[0] > 200 and px[2] < 60


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    assert _decode(bf.exif_rotated(tmp_path / "e.jpg")).shape[:2] == (40, 20)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty_file"), (b"GIF89a-nope", "not_an_image"), (b"hello", "not_an_image"),
    (bf.jpeg_bytes()[:500], "corrupt"),
])
def test_bad_bytes(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as e:
        open_image(data, 10**8)
    assert e.value.reason == reason


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    bomb = bf.png_with_dims(tmp_path / "b.png", 60_000, 60_000)  # above Pillow's own limit too
    with pytest.raises(DecodeError) as e:
        open_image(bomb.read_bytes(), 64_000_000)
    # our limit and flag are named, not Pillow's 178,956,970
    assert e.value.reason == "oversized" and "64,000,000 (--max-pixels)" in str(e.value)
    assert "178" not in str(e.value)
    with pytest.raises(DecodeError) as e:
        open_image(bf.png_with_dims(tmp_path / "s.png", 300, 300).read_bytes(), 1000)
    assert e.value.reason == "oversized" and "300x300 = 90,000 pixels > the limit of 1,000" in str(e.value)


def test_max_pixels_is_exact_and_per_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's process-wide limit (shrunk here to 2 x 2,000 pixels to stand for its default
    178,956,970) neither refuses below our limit nor is loosened for anyone else."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000)
    path = tmp_path / "a.png"
    Image.new("RGB", (120, 100), (1, 2, 3)).save(path)
    assert open_image(path.read_bytes(), 20_000).size == (120, 100)  # 12,000 > Pillow's 4,000
    with pytest.raises(DecodeError, match="the limit of 10,000"):
        open_image(path.read_bytes(), 10_000)
    with pytest.raises(Image.DecompressionBombError):  # outside our calls: Pillow's own check
        Image.open(path)
    results: list[object] = []

    def other_thread() -> None:  # the per-call limit belongs to the calling thread only
        try:
            Image.open(path)
            results.append("opened")
        except Image.DecompressionBombError:
            results.append("refused")

    with pixel_limit(10**9):
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
    assert results == ["refused"]


def test_imap_bounded_keeps_order_and_bounds_lookahead() -> None:
    in_flight, peak, lock = 0, 0, threading.Lock()

    def work(x: int) -> int:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.001 * (x % 3))
        with lock:
            in_flight -= 1
        return x * x

    consumed = []
    for y in imap_bounded(work, range(50), workers=4, lookahead=5):
        consumed.append(y)
    assert consumed == [x * x for x in range(50)]
    assert peak <= 5

    produced = []

    def gen():  # the source is pulled lazily: at most lookahead ahead of the consumer
        for i in range(100):
            produced.append(i)
            yield i

    it = imap_bounded(lambda x: x, gen(), workers=2, lookahead=3)
    next(it)
    assert len(produced) <= 4


def test_jpeg_draft_decodes_smaller_but_reports_the_full_oriented_size(tmp_path: Path) -> None:
    from tests.fakes import FakeEncoder

    arr = np.zeros((1200, 1600, 3), np.uint8)
    arr[:, :800] = (200, 30, 30)
    arr[:, 800:] = (30, 30, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    path = tmp_path / "big.jpg"
    Image.fromarray(arr).save(path, "JPEG", quality=90, exif=exif)
    full = open_image(path.read_bytes(), 10**8)
    small = open_image(path.read_bytes(), 10**8, draft=(224, 224))
    assert full.size == (1200, 1600) == full.info["source_size"] == small.info["source_size"]
    assert small.size == (300, 400)  # 1/4 scale: the shorter side stays >= 224
    enc = FakeEncoder()
    cos = float((enc.encode_pil([full]) * enc.encode_pil([small])).sum())
    assert cos > 0.999


def test_jpeg_draft_in_the_pipeline_records_full_dimensions(tmp_path: Path) -> None:
    from clipfp8.indexing.config import IndexConfig
    from clipfp8.indexing.pipeline import index_corpus
    from clipfp8.indexing.store import open_index
    from tests.fakes import FakeEncoder

    (tmp_path / "c").mkdir()
    Image.new("RGB", (1000, 800), (0, 90, 0)).save(tmp_path / "c" / "a.jpg")
    index_corpus(tmp_path / "c", tmp_path / "idx", [FakeEncoder()], config=IndexConfig(workers=1, jpeg_draft=True))
    with open_index(tmp_path / "idx") as store:
        row = next(iter(store.db.query("SELECT width, height FROM images")))
    assert (row["width"], row["height"]) == (1000, 800)
