"""A corpus of broken and awkward files: every bad one is recorded with a reason, every good one
is indexed, converted correctly, and nothing stops the run."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from clipfp8.indexing.config import IndexConfig
from clipfp8.indexing.pipeline import index_corpus
from clipfp8.indexing.query import search
from clipfp8.indexing.store import open_index
from tests.fakes import FakeEncoder
from tests.indexing import badfiles as bf
from tests.indexing.conftest import encoders, write_image

BAD = {  # file -> expected reason
    "zero.jpg": "empty_file", "truncated.jpg": "corrupt", "random.jpg": "not_an_image",
    "text.png": "not_an_image", "bomb.png": "oversized", "loop_a.jpg": "symlink_loop",
    "loop_b.jpg": "symlink_loop", "dangling.png": "broken_symlink",
}
GOOD = {  # file -> (width, height) after decoding
    "cmyk.jpg": (30, 20), "png16.png": (30, 20), "palette.png": (30, 20), "anim.gif": (30, 20),
    "exif.jpg": (20, 40), "la.png": (16, 16), "png_named.jpg": (12, 10), "normal.png": (24, 20),
    "grey.jpg": (14, 12),
}
if features.check("avif"):  # Pillow built with AVIF (or a plugin installed)
    GOOD["photo.avif"] = (18, 16)


def build_corpus(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "zero.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(bf.jpeg_bytes()[:600])
    (root / "random.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "text.png").write_text("this is not an image\n")
    bf.png_with_dims(root / "bomb.png", 50_000, 50_000)
    os.symlink("loop_b.jpg", root / "loop_a.jpg")
    os.symlink("loop_a.jpg", root / "loop_b.jpg")
    os.symlink("nowhere.png", root / "dangling.png")
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "up")  # a directory loop: must be walked once
    bf.cmyk_jpeg(root / "cmyk.jpg")
    bf.png16(root / "png16.png")
    bf.palette_transparent(root / "palette.png")
    bf.animated_gif(root / "anim.gif")
    bf.exif_rotated(root / "exif.jpg")
    bf.la_grey(root / "la.png")
    Image.new("RGB", (12, 10), (9, 9, 9)).save(root / "png_named.jpg", "PNG")
    write_image(root / "normal.png", 1)
    Image.new("L", (14, 12), 77).save(root / "grey.jpg")
    if "photo.avif" in GOOD:
        Image.new("RGB", (18, 16), (10, 120, 200)).save(root / "photo.avif")
    bf.non_utf8_name(root / "sub")
    return root


def test_bad_file_corpus(tmp_path: Path) -> None:
    root = build_corpus(tmp_path / "c")
    s = index_corpus(root, tmp_path / "idx", encoders(), batch_size=4, workers=2)
    assert s.indexed == len(GOOD) + 1  # + the non-UTF-8 name
    assert sum(s.skipped.values()) == len(BAD) == len(s.errors)
    with open_index(tmp_path / "idx") as store:
        rows = {os.fsdecode(bytes(r["path_raw"])): r for r in store.db.query("SELECT * FROM images")}
        assert len(rows) == len(BAD) + len(GOOD) + 1  # the directory loop added no duplicates
        for name, reason in BAD.items():
            assert rows[name]["status"] == "error" and rows[name]["error"].split(":")[0] == reason, name
        for name, dims in GOOD.items():
            assert rows[name]["status"] == "ok", (name, rows[name]["error"])
            assert (rows[name]["width"], rows[name]["height"]) == dims, name
        weird = os.fsdecode(b"sub/caf\xe9-\xff.png")
        assert rows[weird]["status"] == "ok"
        assert store.stats()["errors_by_reason"] == {r: list(BAD.values()).count(r) for r in set(BAD.values())}
        # the non-UTF-8 file is found by search and resolves to the real file
        hits = search(store, FakeEncoder(), "yellow", k=1)
        assert hits[0].path == weird and store.resolve(hits[0].path).read_bytes()[:4] == b"\x89PNG"


def test_bad_files_are_not_retried_until_they_change(tmp_path: Path) -> None:
    root = build_corpus(tmp_path / "c")
    index_corpus(root, tmp_path / "idx", encoders(), workers=1)
    s = index_corpus(root, tmp_path / "idx", encoders(), workers=1)
    assert s.indexed == 0 and s.skipped == {}
    write_image(root / "zero.jpg", 5, fmt="JPEG")  # fixed
    s = index_corpus(root, tmp_path / "idx", encoders(), workers=1)
    assert s.indexed == 1
    with open_index(tmp_path / "idx") as store:
        row = next(iter(store.db.query("SELECT * FROM images WHERE path='zero.jpg'")))
        assert row["status"] == "ok" and row["error"] is None
        assert row["id"] in store.vectors("fake-fp16").ids()


def test_good_file_turning_bad_loses_its_vectors(tmp_path: Path) -> None:
    root = tmp_path / "c"
    write_image(root / "a.png", 1)
    write_image(root / "b.png", 2)
    index_corpus(root, tmp_path / "idx", encoders(), workers=1)
    (root / "a.png").write_bytes(b"garbage")
    s = index_corpus(root, tmp_path / "idx", encoders(), workers=1)
    assert s.skipped == {"not_an_image": 1}
    with open_index(tmp_path / "idx") as store:
        assert store.vectors("fake-fp16").ids().tolist() == [2]
        assert store.stats()["encoders"]["fake-fp16"]["count"] == 1


def test_max_pixels_is_configurable(tmp_path: Path) -> None:
    root = tmp_path / "c"
    write_image(root / "big.png", 1, size=(200, 100))
    write_image(root / "small.png", 2, size=(20, 10))
    s = index_corpus(root, tmp_path / "idx", encoders(), config=IndexConfig(workers=1, max_pixels=10_000))
    assert s.skipped == {"oversized": 1} and s.errors[0][0] == "big.png"


def test_unreadable_file_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EACCES on open (what chmod 000 gives a non-root user), simulated so it runs as root too."""
    import builtins

    root = tmp_path / "c"
    write_image(root / "locked.png", 1)
    write_image(root / "open.png", 2)
    real_open = builtins.open

    def fake_open(file, *a, **kw):  # type: ignore[no-untyped-def]
        if str(file).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", fake_open)
    s = index_corpus(root, tmp_path / "idx", encoders(), workers=1)
    assert s.skipped == {"permission_denied": 1} and s.indexed == 1


def test_unreadable_file_real_permissions(tmp_path: Path) -> None:
    root = tmp_path / "c"
    locked = write_image(root / "locked.png", 1)
    write_image(root / "open.png", 2)
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as root: chmod 000 files stay readable (simulated case covers it)")
        s = index_corpus(root, tmp_path / "idx", encoders(), workers=1)
        assert s.skipped == {"permission_denied": 1} and s.indexed == 1
    finally:
        locked.chmod(0o644)
