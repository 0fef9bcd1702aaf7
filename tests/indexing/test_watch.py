"""``index --watch``: after the first pass the index follows the folder (new, moved, deleted
files) until stopped. The watcher runs in a thread with a stop event; every wait is bounded."""
from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from clipfp8.indexing.config import IndexConfig
from clipfp8.indexing.watch import WatchConfig, relevant_paths, watch_corpus
from tests.fakes import FakeEncoder
from tests.indexing.conftest import make_corpus, write_image

WAIT_S = 60.0  # an upper bound for a pass on a loaded 2-core machine, never a speed assertion


def _rows(index_dir: Path) -> dict[str, int]:
    """path -> id of the indexed images."""
    from clipfp8.indexing.store import open_index

    with open_index(index_dir) as store:
        return {r["path"]: r["id"] for r in store.db.query("SELECT id, path FROM images")}


class Watcher:
    """``watch_corpus`` in a thread; ``wait_for(pred)`` consumes passes until ``pred(rows)``."""

    def __init__(self, corpus: Path, index_dir: Path) -> None:
        self.index_dir, self.passes = index_dir, queue.Queue()
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(corpus,), daemon=True)

    def _run(self, corpus: Path) -> None:
        try:
            watch_corpus(corpus, self.index_dir, [FakeEncoder()], config=IndexConfig(workers=1),
                         watch=WatchConfig(debounce_ms=400, quiet_ms=100), stop_event=self.stop,
                         on_pass=lambda summary, paths: self.passes.put((summary, paths)))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            self.errors.append(e)
            self.passes.put(None)

    def wait_for(self, pred: Callable[[dict[str, int]], bool]) -> dict[str, int]:
        while True:
            item = self.passes.get(timeout=WAIT_S)
            assert item is not None, self.errors
            rows = _rows(self.index_dir)
            if pred(rows):
                return rows


@pytest.mark.timeout(300)
def test_the_index_follows_new_moved_and_deleted_files(tmp_path: Path) -> None:
    corpus, idx = tmp_path / "corpus", tmp_path / "idx"
    make_corpus(corpus, 4)
    w = Watcher(corpus, idx)
    w.thread.start()
    try:
        first = w.wait_for(lambda rows: len(rows) == 4)
        assert set(first) == {"d0/img000.png", "d1/img001.png", "d0/img002.png", "d1/img003.png"}

        write_image(corpus / "new" / "fresh.png", seed=99)
        rows = w.wait_for(lambda rows: "new/fresh.png" in rows)
        assert len(rows) == 5

        os.rename(corpus / "d1" / "img001.png", corpus / "moved.png")
        rows = w.wait_for(lambda rows: "moved.png" in rows and "d1/img001.png" not in rows)
        assert rows["moved.png"] == first["d1/img001.png"]  # a move keeps the row (and its vectors)

        (corpus / "d0" / "img002.png").unlink()
        (corpus / "notes.txt").write_text("not an image")
        rows = w.wait_for(lambda rows: "d0/img002.png" not in rows)
        assert set(rows) == {"d0/img000.png", "d1/img003.png", "new/fresh.png", "moved.png"}
    finally:
        w.stop.set()
        w.thread.join(timeout=WAIT_S)
    assert not w.thread.is_alive() and not w.errors


def test_max_passes_bounds_the_loop_and_the_index_dir_inside_the_corpus_is_ignored(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    make_corpus(corpus, 2)
    seen: list[list[str]] = []
    # The index inside the corpus: its own writes must not count as changes (else: endless passes).
    n = watch_corpus(corpus, corpus / ".index", [FakeEncoder()], config=IndexConfig(workers=1),
                     watch=WatchConfig(debounce_ms=200, quiet_ms=50), max_passes=1,
                     on_pass=lambda s, paths: seen.append(paths))
    assert n == 1 and len(seen) == 1 and len(_rows(corpus / ".index")) == 2


def test_relevant_paths_keep_images_and_deletions_only(tmp_path: Path) -> None:
    (tmp_path / "idx").mkdir()
    (tmp_path / "a.JPG").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    changes = [(1, str(tmp_path / "a.JPG")), (1, str(tmp_path / "notes.txt")), (3, str(tmp_path / "gone.txt")),
               (1, str(tmp_path / "sub")), (2, str(tmp_path / "idx" / "db.sqlite")), (2, str(tmp_path / "idx"))]
    got = relevant_paths(changes, (".jpg", ".png"), tmp_path / "idx")
    assert got == sorted([str(tmp_path / "a.JPG"), str(tmp_path / "gone.txt"), str(tmp_path / "sub")])


def test_watch_config_validates() -> None:
    with pytest.raises(ValueError, match="quiet_ms"):
        WatchConfig(debounce_ms=100, quiet_ms=200)


def test_cli_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipfp8.app.cli import build_parser

    monkeypatch.setenv("CLIPFP8_TEST_FAKE_ENCODER", "1")
    args = build_parser().parse_args(["index", "c", "--index-dir", "i", "--watch", "--debounce-ms", "300"])
    assert args.watch and args.debounce_ms == 300
    assert build_parser().parse_args(["index", "c", "--index-dir", "i"]).watch is False


@pytest.mark.timeout(300)  # the pipe reads below block; never hang the suite
def test_cli_watch_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    """The console script in a subprocess: first pass, "watching", SIGINT -> exit 0, no traceback."""
    import signal
    import subprocess
    import sys

    corpus = tmp_path / "corpus"
    make_corpus(corpus, 2)
    env = dict(os.environ, CLIPFP8_TEST_FAKE_ENCODER="1", OMP_NUM_THREADS="1")
    # A shell's background job (e.g. `.ci/run &`) ignores SIGINT, and a child inherits an ignored
    # signal: catch it here while the child starts, so the child gets Python's own handler.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "clipfp8.app.cli", "index", str(corpus), "--index-dir",
                                 str(tmp_path / "idx"), "--precision", "fake", "--no-progress", "--watch"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    finally:
        signal.signal(signal.SIGINT, old)
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("watching "):
                break
        assert lines and lines[0].startswith("indexed 2,"), lines
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=WAIT_S)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "stopped watching" in err and "Traceback" not in err
