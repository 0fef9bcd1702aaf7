"""The gallery's thumbnail cache: order, captions and ids kept, bad files left out, each file
decoded once while it is unchanged, LRU bounded by bytes, copies handed out, thread-safe."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipfp8.app.thumbs import THUMB_SIZE, ThumbnailCache


def _jpeg(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (600, 300)) -> str:
    Image.new("RGB", size, color).save(path, "JPEG", quality=95)
    return str(path)


@pytest.fixture()
def files(tmp_path: Path) -> list[str]:
    return [_jpeg(tmp_path / f"{i}.jpg", (40 * i, 200 - 30 * i, 90)) for i in range(5)]


def test_keeps_order_captions_and_ids_and_leaves_out_bad_files(files: list[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    cache = ThumbnailCache(workers=2)
    items = [(files[2], "c2", 12), (str(bad), "bad", 99), (files[0], "c0", 10),
             (str(tmp_path / "gone.jpg"), "gone", 98), (files[4], "c4", 14)]
    out, ids = cache.get(items)
    assert ids == [12, 10, 14] and [t for _, t in out] == ["c2", "c0", "c4"]
    for (img, _), i in zip(out, (2, 0, 4), strict=True):
        assert img.mode == "RGB" and max(img.size) == THUMB_SIZE and img.size == (256, 128)  # aspect kept
        assert np.abs(np.asarray(img)[64, 128].astype(int) - (40 * i, 200 - 30 * i, 90)).max() <= 3
    assert len(cache) == 3 and cache.misses == 4  # the bad file was tried, the missing one not; neither cached


def test_a_file_is_decoded_once_while_unchanged_and_again_after_a_change(files: list[str]) -> None:
    cache = ThumbnailCache(workers=2)
    first, _ = cache.get([(files[1], "a", 1), (files[1], "again", 1)])  # twice in one call: decoded once
    assert cache.misses == 1 and [t for _, t in first] == ["a", "again"]
    second, _ = cache.get([(files[1], "b", 1), (files[3], "d", 3)])
    assert (cache.hits, cache.misses) == (1, 2)
    assert second[0][0] is not first[0][0] and second[0][0].tobytes() == first[0][0].tobytes()  # a copy
    _jpeg(Path(files[1]), (0, 0, 255), (300, 600))
    st = os.stat(files[1])
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a coarse clock may not see it
    third, _ = cache.get([(files[1], "c", 1)])
    assert cache.misses == 3 and third[0][0].size == (128, 256)  # the new file, not the cached one


def test_least_recently_used_thumbnails_go_first_past_the_byte_budget(files: list[str]) -> None:
    one = 256 * 128 * 4  # Pillow's RGB: 4 bytes a pixel
    cache = ThumbnailCache(max_bytes=2 * one, workers=1)
    cache.get([(files[0], "", 0), (files[1], "", 1)])
    cache.get([(files[0], "", 0)])  # files[0] is now the most recent
    cache.get([(files[2], "", 2)])  # evicts files[1]
    assert len(cache) == 2
    misses = cache.misses
    cache.get([(files[0], "", 0), (files[2], "", 2)])
    assert cache.misses == misses
    cache.get([(files[1], "", 1)])
    assert cache.misses == misses + 1
    with pytest.raises(ValueError, match="max_bytes"):
        ThumbnailCache(max_bytes=-1)


def test_threads_share_one_cache(files: list[str]) -> None:
    cache = ThumbnailCache(workers=2)
    items = [(f, str(i), i) for i, f in enumerate(files)]
    results: list[list[int]] = []

    def run() -> None:
        for _ in range(5):
            results.append(cache.get(items)[1])

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [[0, 1, 2, 3, 4]] * 20 and len(cache) == 5
    assert cache.hits + cache.misses == 100 and cache.misses < 100
