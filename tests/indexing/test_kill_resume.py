"""Crash safety: SIGKILL a real ``python -m clipfp8.indexing index`` process at chosen instants (it pauses
at a named checkpoint via the documented test hook, then the test kills it), restart, and check
the result equals a clean run: same ids, paths, hashes and vectors, no duplicates, no losses."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipfp8.indexing.config import IndexConfig
from clipfp8.indexing.consistency import verify
from clipfp8.indexing.pipeline import index_corpus
from tests.indexing.conftest import REPO, encoders, index_state, make_corpus

CFG = IndexConfig(batch_size=4, workers=2, commit_every=8)


def _cmd(corpus: Path, idx: Path) -> list[str]:
    return [sys.executable, "-m", "indexing", "index", str(corpus), "--index-dir", str(idx),
            "--precision", "fake", "fake-fp8", "--batch-size", "4", "--workers", "2",
            "--commit-every", "8", "--commit-interval", "0", "--no-progress"]


def _kill_at(corpus: Path, idx: Path, point: str | None, tmp: Path, delay: float = 0.0) -> None:
    """Run the CLI until it reaches ``point`` (or for ``delay`` seconds), then SIGKILL it."""
    env = dict(os.environ, CLIPFP8_TEST_FAKE_ENCODER="1", OMP_NUM_THREADS="1")
    marker = tmp / "paused"
    marker.unlink(missing_ok=True)
    if point:
        env.update(CLIPFP8_TEST_PAUSE_AT=point, CLIPFP8_TEST_PAUSE_FILE=str(marker))
    else:  # slow the run down so that it is surely still running when killed
        env.update(CLIPFP8_TEST_THROTTLE="0.15")
    proc = subprocess.Popen(_cmd(corpus, idx), env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if point and marker.exists():
                break
            if not point and (idx / "vectors").exists() and delay <= 0:
                break
            if not point and (idx / "vectors").exists():
                time.sleep(delay)
                delay = 0
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before being killed: {proc.communicate()}"
        assert not point or marker.exists(), "the checkpoint was never reached"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("kill")
    corpus = tmp / "corpus"
    make_corpus(corpus, 30)
    (corpus / "d0" / "broken.png").write_bytes(b"junk")
    index_corpus(corpus, tmp / "clean", encoders(), config=CFG)
    return {"tmp": tmp, "corpus": corpus, "clean": index_state(tmp / "clean")}


@pytest.mark.parametrize("point,delay", [
    ("pipeline:batch_embedded:3", 0),   # mid-run, between commit points
    ("commit:faiss_written:2", 0),      # new FAISS files durable, database not committed
    ("commit:db_committed:2", 0),       # database committed, old FAISS files not yet deleted
    ("commit:faiss_written:3", 0),      # inside the final commit (the third, with the default --encode-ahead 2)
    (None, 0.4),                        # whenever: a while after the (slowed) run started
    (None, 1.1),
])
def test_sigkill_then_resume_equals_clean_run(scenario: dict, point: str | None, delay: float,
                                              tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    _kill_at(scenario["corpus"], idx, point, tmp_path, delay=delay)
    s = index_corpus(scenario["corpus"], idx, encoders(), config=CFG)  # the restart
    assert s.indexed + s.unchanged + sum(s.skipped.values()) == 31
    assert index_state(idx) == scenario["clean"]
    assert verify(idx).ok


def test_sigkill_during_incremental_run(scenario: dict, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(scenario["corpus"], corpus, symlinks=True)
    idx, ref = tmp_path / "idx", tmp_path / "ref"
    index_corpus(corpus, idx, encoders(), config=CFG)
    make_corpus(corpus / "new", 12, start_seed=500)
    (corpus / "d0" / "img000.png").unlink()
    (corpus / "d1" / "img001.png").rename(corpus / "renamed.png")
    shutil.copytree(idx, ref)
    index_corpus(corpus, ref, encoders(), config=CFG)  # the uninterrupted incremental run
    _kill_at(corpus, idx, "commit:db_committed:1", tmp_path)
    index_corpus(corpus, idx, encoders(), config=CFG)
    assert index_state(idx) == index_state(ref)
