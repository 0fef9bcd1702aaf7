"""The index directory: locking, atomic commits under ENOSPC, encoder identity, migrations."""
from __future__ import annotations

import errno
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlite_utils

from clipfp8.indexing import db as dbm
from clipfp8.indexing.config import IndexConfig
from clipfp8.indexing.errors import (
    EncoderMismatchError,
    IndexCorruptError,
    IndexLockedError,
    IndexNotFoundError,
    StorageError,
    UnknownEncoderError,
)
from clipfp8.indexing.pipeline import index_corpus
from clipfp8.indexing.query import search
from clipfp8.indexing.store import open_for_write, open_index
from clipfp8.quant.core import fileio
from tests.fakes import FakeEncoder
from tests.indexing.conftest import REPO, encoders, index_state, make_corpus


def test_second_writer_is_refused_while_first_holds_the_lock(corpus: Path, tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    with open_for_write(idx, corpus.resolve()):
        with pytest.raises(IndexLockedError, match=str(idx)):
            index_corpus(corpus, idx, encoders())
        # another process gets the same clear error
        code = ("import sys; from indexing.store import open_for_write\n"
                "try:\n open_for_write(sys.argv[1])\nexcept Exception as e:\n print(type(e).__name__, e)")
        out = subprocess.run([sys.executable, "-c", code, str(idx)], capture_output=True, text=True,
                             cwd=REPO, timeout=120).stdout
        assert out.startswith("IndexLockedError") and "locked by another running index process" in out
    index_corpus(corpus, idx, encoders())  # released on close


def test_enospc_during_commit_leaves_the_previous_commit_intact(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = tmp_path / "c"
    make_corpus(corpus, 6)
    idx = tmp_path / "idx"
    index_corpus(corpus, idx, encoders(), workers=1)
    before = index_state(idx)
    make_corpus(corpus / "more", 6, start_seed=50)
    calls = {"n": 0}
    real = fileio._write_all

    def full_disk(fd: int, data: memoryview) -> None:
        calls["n"] += 1
        real(fd, data[: len(data) // 2])  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "_write_all", full_disk)
    with pytest.raises(StorageError, match="disk full"):
        index_corpus(corpus, idx, encoders(), workers=1)
    assert calls["n"] == 1
    assert index_state(idx) == before                      # DB and FAISS at the old commit
    assert not [p for p in (idx / "vectors").iterdir() if p.name.startswith(".")]  # no temp left
    monkeypatch.setattr(fileio, "_write_all", real)
    s = index_corpus(corpus, idx, encoders(), workers=1)   # space again: the run completes
    assert s.indexed == 6 and len(index_state(idx)["rows"]) == 12


class _SlowWarmUp(FakeEncoder):
    """A fake whose warm-up takes ``seconds`` (as a compiled GPU tower's does)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def warm_up_images(self, batch_size: int) -> bool:
        import time

        time.sleep(self.seconds)
        return True


def test_commit_interval_counts_from_the_first_file_not_from_the_warm_up(tmp_path: Path) -> None:
    """With a 2.5 s commit interval, a run whose files take well under 2.5 s commits once, at the
    end, however long the encoders' warm-up took before the first file (it was counted)."""
    corpus = tmp_path / "c"
    make_corpus(corpus, 24)
    idx = tmp_path / "idx"
    s = index_corpus(corpus, idx, [_SlowWarmUp(3.0)],
                     config=IndexConfig(batch_size=4, workers=2, commit_every=8, commit_interval_s=2.5))
    assert s.indexed == 24 and s.warmup_seconds >= 3.0
    with open_index(idx) as store:
        assert dbm.generation(store.db) == 1  # one commit point: the final one


def test_mismatched_encoder_is_refused(corpus: Path, tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    index_corpus(corpus, idx, [FakeEncoder()], workers=1)
    other = FakeEncoder(noise=0.1)  # same name, different weights checksum
    with pytest.raises(EncoderMismatchError, match="fake-fp16"):
        index_corpus(corpus, idx, [other])
    with open_index(idx) as store:
        with pytest.raises(EncoderMismatchError, match="checksum"):
            search(store, other, "red")
        with pytest.raises(UnknownEncoderError, match="fake-fp8"):
            search(store, FakeEncoder(precision="fp8"), "red")


def test_other_corpus_and_missing_index_are_refused(corpus: Path, tmp_path: Path) -> None:
    index_corpus(corpus, tmp_path / "idx", encoders(), workers=1)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(IndexCorruptError, match="built for corpus"):
        index_corpus(other, tmp_path / "idx", encoders())
    with pytest.raises(IndexNotFoundError, match="no index"):
        open_index(tmp_path / "nothing")


def test_migration_from_schema_v1(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    db = sqlite_utils.Database(tmp_path / dbm.DB_NAME)
    dbm.migrate(db, create=True, target=1)
    db["images"].insert({"id": 1, "path": "a.png", "path_raw": b"a.png", "size": 1, "mtime_ns": 1,
                         "sha256": "x", "width": 1, "height": 1, "status": "ok", "error": None})
    db.conn.close()
    with open_index(tmp_path) as store:
        assert store.stats()["schema_version"] == dbm.SCHEMA_VERSION == 2
        assert "generation" in store.db["encoders"].columns_dict
        assert [r["path"] for r in store.db.query("SELECT path FROM images")] == ["a.png"]


def test_stale_generation_files_are_removed_by_the_next_writer(corpus: Path, tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    index_corpus(corpus, idx, encoders(), config=IndexConfig(workers=1, commit_every=3))
    live = sorted(p.name for p in (idx / "vectors").iterdir())
    assert len(live) == 2  # one file per encoder, the committed generation only
    (idx / "vectors" / "1.g999.faiss").write_bytes(b"left by a crash")
    (idx / "vectors" / ".1.g999.faiss.tmp-1").write_bytes(b"half written")
    with open_for_write(idx):
        pass
    assert sorted(p.name for p in (idx / "vectors").iterdir()) == live


def test_reader_sees_new_commits(corpus: Path, tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    index_corpus(corpus, idx, encoders(), workers=1)
    with open_index(idx) as reader:
        assert reader.vectors("fake-fp16").ntotal == 10
        make_corpus(corpus / "more", 3, start_seed=70)
        index_corpus(corpus, idx, encoders(), workers=1)
        assert reader.vectors("fake-fp16").ntotal == 13


def test_bad_factory_string_fails_before_any_work(corpus: Path, tmp_path: Path) -> None:
    from clipfp8.indexing.errors import IndexConfigError

    with pytest.raises(IndexConfigError, match="NotAnIndex"):
        index_corpus(corpus, tmp_path / "idx", encoders(), factory="NotAnIndex")
    assert not (tmp_path / "idx").exists()


def test_database_full_during_commit_is_a_storage_error(corpus: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    from clipfp8.indexing.pipeline import _Run

    idx = tmp_path / "idx"
    index_corpus(corpus, idx, encoders(), workers=1)
    before = index_state(idx)
    make_corpus(corpus / "more", 3, start_seed=90)

    def full(*a, **kw):  # type: ignore[no-untyped-def]
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(_Run, "_apply", full)
    with pytest.raises(StorageError, match="disk is full"):
        index_corpus(corpus, idx, encoders(), workers=1)
    assert index_state(idx) == before
    assert len(list((idx / "vectors").iterdir())) == 2


def test_insert_rows_matches_sqlite_utils_whatever_the_key_order(tmp_path: Path) -> None:
    db = dbm.connect(tmp_path / "m.sqlite", create=True)
    row = {"id": 1, "path": "a.jpg", "path_raw": b"a.jpg", "size": 3, "mtime_ns": 4, "sha256": "ab",
           "width": 5, "height": 6, "status": "ok", "error": None, "indexed_at": 7.5}
    # The same keys in another order: values must land in their own columns.
    shuffled = dict(reversed(list(dict(row, id=2, path="b.jpg", path_raw=b"b.jpg").items())))
    dbm.insert_rows(db, "images", [row, shuffled])
    got = {r["id"]: r for r in db.query("SELECT * FROM images")}
    assert got[1] == row and got[2]["path_raw"] == b"b.jpg" and got[2]["width"] == 5
    dbm.insert_rows(db, "embeddings", [{"image_id": 1, "encoder_id": 1}, {"image_id": 1, "encoder_id": 1}], ignore=True)
    assert db["embeddings"].count == 1  # the duplicate was ignored
    with pytest.raises(sqlite3.IntegrityError):  # without ignore, a duplicate path is refused
        dbm.insert_rows(db, "images", [dict(row, id=3)])
    # Rows of different shapes (a missing optional column) still go in.
    dbm.insert_rows(db, "images", [dict(row, id=4, path_raw=b"c"), {"id": 5, "path": "d", "path_raw": b"d"}])
    assert db["images"].count == 4 and db["images"].get(5)["status"] is None
