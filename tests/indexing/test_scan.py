"""Scanning: recursion, extensions, symlink loops, the index directory, bad corpus paths."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from clipfp8.indexing.errors import CorpusError
from clipfp8.indexing.pipeline import index_corpus
from clipfp8.indexing.scan import check_corpus, scan_corpus
from tests.indexing.conftest import encoders, write_image


def test_recursive_with_configurable_extensions_and_loops(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 1)
    write_image(tmp_path / "x" / "y" / "b.JPG", 2, fmt="JPEG")
    (tmp_path / "notes.txt").write_text("x")
    os.symlink("..", tmp_path / "x" / "y" / "up")       # loop back to the root
    os.symlink(tmp_path / "x", tmp_path / "x_again")    # the same directory twice
    files = scan_corpus(tmp_path, (".png", ".jpg")).files
    assert [f.rel for f in files] == [b"a.png", b"x/y/b.JPG"]
    assert [f.rel for f in scan_corpus(tmp_path, (".jpg",)).files] == [b"x/y/b.JPG"]
    assert [f.rel for f in scan_corpus(tmp_path, (".png", ".jpg"), follow_symlinks=False).files] == \
        [b"a.png", b"x/y/b.JPG"]


def test_index_dir_inside_corpus_is_not_indexed(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", 1)
    s = index_corpus(tmp_path, tmp_path / "idx", encoders(), workers=1)
    (tmp_path / "idx" / "fake.png").write_bytes(b"not scanned")
    s = index_corpus(tmp_path, tmp_path / "idx", encoders(), workers=1)
    assert s.unchanged == 1 and s.skipped == {}


def test_bad_corpus_paths(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        check_corpus(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CorpusError, match="not a directory"):
        index_corpus(tmp_path / "file", tmp_path / "idx", encoders())
