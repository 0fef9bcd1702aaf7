"""Hostile inputs: bounded memory and disk reads in `index`, special files never opened.

The corpus test runs the real CLI with a tiny open_clip model (Resize + CenterCrop preprocess,
like every CLIP) in a subprocess and compares its peak RSS with the same run over good files.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipfp8.indexing.decode import ByteBudget, DecodeTask, ImageDecoder, check_file, limit_aspect, read_and_hash
from clipfp8.indexing.errors import DecodeError
from clipfp8.indexing.scan import FileEntry, scan_corpus
from clipfp8.indexing.store import open_index
from tests.indexing import badfiles as bf
from tests.indexing.conftest import write_image

# Peak RSS of a child: a fresh wrapper whose only child is the index run, so RUSAGE_CHILDREN's
# maximum is that run's (the test process's own children would mix in earlier tests).
_MEASURE = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
BUDGET_MB = 300


def _index_peak_rss_mb(corpus: Path, index_dir: Path, model_json: Path) -> float:
    cmd = [sys.executable, "-c", _MEASURE, sys.executable, "-m", "clipfp8.indexing", "index",
           str(corpus), "--index-dir", str(index_dir), "--model", str(model_json), "--device", "cpu",
           "--precision", "fp32", "--workers", "2", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.strip().splitlines()[-1]) / 1024  # ru_maxrss is in KiB on Linux


@pytest.mark.slow
def test_hostile_corpus_costs_bounded_memory(tmp_path: Path) -> None:
    from clipfp8.quant.core.models import tiny_config

    model = tmp_path / "tiny.json"
    model.write_text(json.dumps(tiny_config()))  # 32 px input: a 1 x 300000 strip would resize to 32 x 9.6M
    good, hostile = tmp_path / "good", tmp_path / "hostile"
    names = [f"g{i}.png" for i in range(6)]
    for folder in (good, hostile):
        for i, name in enumerate(names):
            write_image(folder / name, i, size=(64, 48))
    expected = bf.hostile_corpus(hostile, strip=300_000, sparse_bytes=3 << 30)

    baseline = _index_peak_rss_mb(good, tmp_path / "idx-good", model)
    peak = _index_peak_rss_mb(hostile, tmp_path / "idx-hostile", model)
    assert peak < baseline + BUDGET_MB, f"hostile run peaked at {peak:.0f} MB, good files only {baseline:.0f} MB"

    with open_index(tmp_path / "idx-hostile") as store:
        rows = {r["path"]: r for r in store.db.query("SELECT * FROM images")}
        counts = [e["count"] for e in store.stats()["encoders"].values()]
    assert counts == [len(names) + 2]  # every good file and both strips (cropped, not refused)
    for name in names:
        assert rows[name]["status"] == "ok", name
    for name, reason in expected.items():
        got = rows[name]["error"].split(":")[0] if rows[name]["error"] else ""
        assert got == reason, (name, rows[name]["error"])
    assert (rows["strip_tall.png"]["width"], rows["strip_tall.png"]["height"]) == (1, 300_000)


def test_file_size_cap_is_checked_before_reading(tmp_path: Path) -> None:
    sparse = bf.sparse_file(tmp_path / "s.jpg", 5 << 30)
    with pytest.raises(DecodeError) as e:
        read_and_hash(sparse, 1 << 20)
    assert e.value.reason == "file_too_large" and "(--max-file-bytes)" in str(e.value)
    data, digest = read_and_hash(write_image(tmp_path / "ok.png", 1), 1 << 20)
    import hashlib

    assert digest == hashlib.sha256(data).hexdigest() and data[:4] == b"\x89PNG"


def test_a_lying_size_cannot_make_it_read_more(tmp_path: Path) -> None:
    """procfs files report size 0 but have content: at most cap + 1 bytes are ever read."""
    lying = Path("/proc/self/smaps")
    if not lying.exists() or lying.stat().st_size != 0:
        pytest.skip("needs Linux procfs")
    with pytest.raises(DecodeError) as e:
        read_and_hash(lying, 100)
    assert e.value.reason == "file_too_large" and "at least 101 bytes" in str(e.value)


def test_special_files_are_recorded_and_never_opened(tmp_path: Path) -> None:
    root = tmp_path / "c"
    write_image(root / "ok.png", 1)
    bf.fifo(root / "pipe.jpg")
    os.symlink("/dev/null", root / "null.png")
    os.mkfifo(root / "pipe_not_an_image")  # other names stay ignored, as any non-image file
    scan = scan_corpus(root, (".png", ".jpg"))
    assert [f.rel for f in scan.files] == [b"ok.png"]
    assert scan.errors == [(b"null.png", "not_regular_file: character device"),
                           (b"pipe.jpg", "not_regular_file: fifo")]
    # the decoder refuses them from stat too (a file replaced after the scan); opening the
    # FIFO would block this test forever
    with pytest.raises(DecodeError, match="not_regular_file: fifo"):
        check_file(root / "pipe.jpg", 1 << 20)
    dec = ImageDecoder({"x": lambda im: im})
    assert dec(DecodeTask(FileEntry(b"pipe.jpg", 0, 0), root / "pipe.jpg")).error == "not_regular_file: fifo"


def test_extreme_aspect_is_cropped_before_any_resize() -> None:
    tall = Image.new("RGB", (3, 1000), (5, 6, 7))
    assert limit_aspect(tall, 20).size == (3, 60)
    assert limit_aspect(Image.new("L", (100_000, 1)), 20).size == (20, 1)
    normal = Image.new("RGB", (400, 30))
    assert limit_aspect(normal, 20) is normal


def test_aspect_crop_keeps_what_a_center_crop_model_sees() -> None:
    from clipfp8.quant.core.config import ModelSpec
    from clipfp8.quant.core.models import load_model, tiny_config

    preprocess = load_model(ModelSpec(name="tiny", config=tiny_config())).preprocess
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.normal(size=(1200, 40, 3)), axis=0)  # a tall 40 x 1200 random walk
    smooth = ((smooth - smooth.min()) / np.ptp(smooth) * 255).astype(np.uint8)
    im = Image.fromarray(smooth)
    cropped = limit_aspect(im, 4)
    assert cropped.size == (40, 160)
    np.testing.assert_allclose(preprocess(cropped).numpy(), preprocess(im).numpy(), atol=0.05)


def test_byte_budget_bounds_bytes_in_flight_but_never_deadlocks() -> None:
    budget = ByteBudget(10)
    got: list[str] = []

    def take(n: int, tag: str) -> None:
        with budget.hold(n):
            got.append(tag)

    with budget.hold(6):
        t = threading.Thread(target=take, args=(6, "second"))
        t.start()
        t.join(0.3)
        assert t.is_alive() and got == []  # 6 + 6 > 10: waits for the first
        take(3, "small")  # 6 + 3 fits
    t.join(10)
    assert got == ["small", "second"] and budget.used == 0
    take(50, "huge")  # larger than the whole budget: runs alone rather than never
    assert got[-1] == "huge"
