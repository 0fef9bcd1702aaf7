"""Finding what went wrong: bad files listed by `index` and `errors`, exact paths in
`search --json`, escaped paths in text output, --rehash, --max-pixels, the lock before the model."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipfp8.indexing.__main__ import main
from clipfp8.indexing.cli import byte_size
from clipfp8.indexing.config import IndexConfig
from clipfp8.indexing.pipeline import index_corpus
from clipfp8.indexing.report import display_path, list_errors
from clipfp8.indexing.store import open_for_write, open_index
from tests.fakes import FakeEncoder
from tests.indexing import badfiles as bf
from tests.indexing.conftest import write_image


@pytest.fixture(autouse=True)
def _fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPFP8_TEST_FAKE_ENCODER", "1")


def _index(corpus: Path, idx: Path, *extra: str) -> int:
    return main(["index", str(corpus), "--index-dir", str(idx), "--precision", "fake", "--workers", "1",
                 "--no-progress", *extra])


def test_index_lists_bad_files_and_errors_lists_them_all(corpus: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    idx = tmp_path / "idx"
    (corpus / "zero.jpg").write_bytes(b"")
    (corpus / "bad\nname.png").write_text("not an image\n")
    bf.png_with_dims(corpus / "bomb.png", 50_000, 50_000)
    assert _index(corpus, idx, "--show-errors", "2") == 0
    out = capsys.readouterr().out
    assert "bad files found in this run (3, the first 2):" in out
    assert "  bad\\nname.png  (not_an_image: not a recognised image format)" in out  # one line
    assert f"bad files in the index: 3; list them with `clipfp8 errors --index-dir {idx}`" in out

    assert main(["errors", "--index-dir", str(idx)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line.split("\t")[:3] for line in lines] == [
        ["bad\\nname.png", "not_an_image", "13"], ["bomb.png", "oversized", str((corpus / "bomb.png").stat().st_size)],
        ["zero.jpg", "empty_file", "0"]]
    assert lines[1].split("\t")[3] == "50000x50000 = 2,500,000,000 pixels > the limit of 64,000,000 (--max-pixels)"
    assert "3 bad file(s)" in captured.err

    assert main(["errors", "--index-dir", str(idx), "--json", "--reason", "not_an_image", "empty_file"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["path"], r["reason"], r["size"]) for r in rows] == [("bad\nname.png", "not_an_image", 13),
                                                                  ("zero.jpg", "empty_file", 0)]
    assert [b.path for b in list_errors(idx, limit=1)] == ["bad\nname.png"]


def test_a_clean_run_prints_no_bad_files(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _index(corpus, tmp_path / "idx") == 0
    assert "bad files" not in capsys.readouterr().out
    assert main(["errors", "--index-dir", str(tmp_path / "idx")]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "0 bad file(s)" in captured.err


def test_search_json_keeps_exact_paths_and_text_output_escapes_them(
        corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    idx = tmp_path / "idx"
    odd = "new\nline\x1b[31m.png"  # a newline and a terminal escape in a file name
    write_image(corpus / odd, 99)
    assert _index(corpus, idx) == 0
    capsys.readouterr()
    query = ["search", "--index-dir", str(idx), "--precision", "fake", "--image", str(corpus / odd), "-k", "11"]
    assert main([*query, "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(hits) == 11 and [h["rank"] for h in hits] == list(range(1, 12))
    assert hits[0]["path"] == odd and hits[0]["score"] > 0.999 and not hits[0]["outside_corpus"]
    assert main(query) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 11 and lines[0].split("\t")[1] == "new\\nline\\x1b[31m.png"


def test_a_result_outside_the_corpus_is_marked_not_dropped(corpus: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    outside = write_image(tmp_path / "elsewhere" / "x.png", 77)
    os.symlink(outside, corpus / "link.png")
    idx = tmp_path / "idx"
    assert _index(corpus, idx) == 0
    capsys.readouterr()
    query = ["search", "--index-dir", str(idx), "--precision", "fake", "--image", str(outside), "-k", "3"]
    assert main([*query, "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(h["rank"], h["path"], h["outside_corpus"]) for h in hits][0] == (1, "link.png", True)
    assert [h["outside_corpus"] for h in hits[1:]] == [False, False]
    assert main(query) == 0
    assert capsys.readouterr().out.splitlines()[0].split("\t")[1:] == ["link.png", "outside-corpus"]


def test_rehash_catches_an_edit_that_restored_size_and_mtime(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "c"
    for i in range(3):
        write_image(root / f"{i}.bmp", i, fmt="BMP")  # BMP: same dimensions -> same file size
    enc = FakeEncoder()
    index_corpus(root, tmp_path / "idx", [enc], config=IndexConfig(workers=1))
    target = root / "1.bmp"
    st = target.stat()
    write_image(target, 42, fmt="BMP")  # edited in place ...
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... with size and mtime restored
    assert target.stat().st_size == st.st_size

    s = index_corpus(root, tmp_path / "idx", [enc], config=IndexConfig(workers=1))
    assert (s.indexed, s.unchanged) == (0, 3)  # size + mtime: not looked at
    calls = enc.calls["images"]
    s = index_corpus(root, tmp_path / "idx", [enc], config=IndexConfig(workers=1, rehash=True))
    assert (s.indexed, s.unchanged, s.updated) == (1, 2, 0)
    assert enc.calls["images"] == calls + 1  # only the edited file was embedded again
    with open_index(tmp_path / "idx") as store:
        row = next(iter(store.db.query("SELECT id, sha256 FROM images WHERE path='1.bmp'")))
        assert row["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
        want = enc.encode_pil([Image.open(target)])[0]
        np.testing.assert_allclose(store.vectors(enc.name).reconstruct(np.array([row["id"]]))[0], want, atol=1e-5)
    assert _index(root, tmp_path / "idx") == 0  # the CLI flag: nothing changed since
    assert "indexed 0, unchanged 3," in capsys.readouterr().out
    assert _index(root, tmp_path / "idx", "--rehash") == 0
    assert "indexed 0, unchanged 3," in capsys.readouterr().out


def test_max_pixels_really_sets_the_limit_and_raising_it_retries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Pillow's own limit (shrunk here to 2 x 2,000 pixels, standing for its 178,956,970) refuses
    nothing below --max-pixels; an unchanged file refused as oversized is retried once the
    limit is raised (not on every run)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2_000)
    root = tmp_path / "c"
    write_image(root / "big.png", 1, size=(120, 100))
    write_image(root / "small.png", 2, size=(20, 10))
    idx = tmp_path / "idx"
    assert _index(root, idx, "--max-pixels", "5000") == 0
    refused = "big.png  (oversized: 120x100 = 12,000 pixels > the limit of 5,000 (--max-pixels))"
    assert refused in capsys.readouterr().out
    assert _index(root, idx, "--max-pixels", "5000") == 0
    assert "indexed 0, unchanged 2," in capsys.readouterr().out  # same limit: not retried
    assert _index(root, idx, "--max-pixels", "20000") == 0
    assert "indexed 1, unchanged 1," in capsys.readouterr().out  # 12,000 > Pillow's 4,000: fine
    assert list_errors(idx) == []
    assert _index(root, idx, "--max-pixels", "5000") == 0  # a lower limit keeps what is indexed
    assert "indexed 0, unchanged 2," in capsys.readouterr().out


def test_the_lock_is_checked_before_the_model_loads(corpus: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    idx = tmp_path / "idx"
    model = ["--model", str(tmp_path / "missing.json"), "--precision", "fp32", "--no-progress"]
    with open_for_write(idx, corpus.resolve()):
        assert main(["index", str(corpus), "--index-dir", str(idx), *model]) == 2
        err = capsys.readouterr().err
    assert "locked by another running index process" in err and "missing.json" not in err
    assert main(["index", str(corpus), "--index-dir", str(idx), *model]) == 2  # unlocked: the model
    assert "model config file not found" in capsys.readouterr().err


@pytest.mark.parametrize("raw,shown", [
    ("plain/é.png", "plain/é.png"), ("a\nb.png", "a\\nb.png"), ("tab\there", "tab\\there"),
    ("back\\slash", "back\\\\slash"), ("esc\x1b[0m", "esc\\x1b[0m"), ("c1\x85", "c1\\x85"),
    ("ls\u2028x", "ls\\u2028x"), ("gpj\u202eexe.png", "gpj\\u202eexe.png"),
    (os.fsdecode(b"caf\xe9.png"), "caf\\xe9.png"),
])
def test_display_path_is_one_unambiguous_line(raw: str, shown: str) -> None:
    assert display_path(raw) == shown and "\n" not in display_path(raw)


def test_sizes_and_limits_name_their_flags() -> None:
    assert [byte_size(v) for v in ("1000", "256M", "1GiB", "2k")] == [1000, 256 << 20, 1 << 30, 2048]
    with pytest.raises(argparse.ArgumentTypeError):
        byte_size("lots")
    for kwargs, flag in (({"max_pixels": 0}, "--max-pixels"), ({"max_file_bytes": 0}, "--max-file-bytes"),
                         ({"max_aspect": 0.5}, "--max-aspect"), ({"max_aspect": float("nan")}, "--max-aspect")):
        with pytest.raises(ValueError, match=flag):
            IndexConfig(**kwargs)
