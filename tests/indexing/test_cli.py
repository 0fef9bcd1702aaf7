"""The CLI wrappers (``python -m clipfp8.indexing`` = the ``clipfp8`` indexing subcommands), with the
fake-encoder test hook."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clipfp8.indexing.__main__ import main
from clipfp8.indexing.store import open_for_write


@pytest.fixture(autouse=True)
def _fake(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPFP8_TEST_FAKE_ENCODER", "1")


def test_index_search_stats_export_verify(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    idx = str(tmp_path / "idx")
    (corpus / "bad.jpg").write_bytes(b"")
    assert main(["index", str(corpus), "--index-dir", idx, "--precision", "fake", "fake-fp8",
                 "--batch-size", "4", "--workers", "2"]) == 0
    out, err = capsys.readouterr()
    assert "indexed 10," in out and "skipped 1" in out and "empty_file" in out and "stage embed" in out
    assert "img/s" in err  # the progress bar

    assert main(["search", "--index-dir", idx, "--precision", "fake", "--text", "red", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    scores = [float(line.split("\t")[0]) for line in lines]
    assert len(lines) == 3 and scores == sorted(scores, reverse=True)
    assert main(["search", "--index-dir", idx, "--precision", "fake", "--text", "red",
                 "--threshold", str(scores[1])]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    image = next(corpus.glob("d1/*.png"))
    assert main(["search", "--index-dir", idx, "--precision", "fake-fp8", "--image", str(image), "-k", "1"]) == 0
    assert capsys.readouterr().out.split("\t")[1].strip() == str(image.relative_to(corpus))

    assert main(["stats", "--index-dir", idx]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["images"] == {"total": 11, "ok": 10, "error": 1}
    assert set(stats["encoders"]) == {"fake-fp16", "fake-fp8-fake"}

    out_file = tmp_path / "e.parquet"
    assert main(["export", "--index-dir", idx, "--precision", "fp8-fake", "--output", str(out_file)]) == 0
    assert pq.read_table(out_file).num_rows == 10

    assert main(["verify", "--index-dir", idx]) == 0
    assert "consistent" in capsys.readouterr().out


def test_cli_errors_name_the_argument(tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["index", str(tmp_path / "nope"), "--index-dir", str(tmp_path / "i"), "--precision", "fake"]) == 2
    assert f"corpus path does not exist: {tmp_path / 'nope'}" in capsys.readouterr().err
    assert main(["stats", "--index-dir", str(tmp_path / "i2")]) == 2
    assert "no index in" in capsys.readouterr().err
    with open_for_write(tmp_path / "locked", corpus.resolve()):
        assert main(["index", str(corpus), "--index-dir", str(tmp_path / "locked"), "--precision", "fake"]) == 2
        assert "locked by another running index process" in capsys.readouterr().err
    main(["index", str(corpus), "--index-dir", str(tmp_path / "ok"), "--precision", "fake", "--no-progress"])
    capsys.readouterr()
    assert main(["export", "--index-dir", str(tmp_path / "ok"), "--precision", "fp8", "--output",
                 str(tmp_path / "x.parquet")]) == 2
    assert "--precision fp8" in capsys.readouterr().err


def test_fake_precisions_need_the_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CLIPFP8_TEST_FAKE_ENCODER")
    with pytest.raises(SystemExit):
        main(["index", str(tmp_path), "--index-dir", str(tmp_path / "i"), "--precision", "fake"])


def test_search_timings_line(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``search --timings``: one stderr line with each stage's seconds, the stages summing (with
    the start-up) to the total; stdout keeps only the hits."""
    idx = str(tmp_path / "idx")
    assert main(["index", str(corpus), "--index-dir", idx, "--precision", "fake", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["search", "--index-dir", idx, "--precision", "fake", "--text", "red", "-k", "2", "--timings"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 and "timings" not in out
    (line,) = [x for x in err.splitlines() if x.startswith("timings: ")]
    stages = dict(part.rsplit(" ", 2)[:2] for part in line.removeprefix("timings: ").split(", "))
    assert list(stages)[-5:] == ["open index", "encoder", "query", "output", "total"]
    seconds = {k: float(v) for k, v in stages.items()}
    assert all(v >= 0 for v in seconds.values())
    assert abs(sum(v for k, v in seconds.items() if k != "total") - seconds["total"]) < 0.01
    if Path("/proc/self/stat").exists():
        assert list(stages)[0] == "startup" and seconds["startup"] > 0
    assert main(["search", "--index-dir", idx, "--precision", "fake", "--text", "red"]) == 0
    assert "timings" not in capsys.readouterr().err  # only when asked
