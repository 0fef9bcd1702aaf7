"""sqlite-utils is imported without pandas (``indexing.sqlite_import``): opening an index does not
pay pandas' import, and pandas stays importable."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from clipfp8.indexing.store import open_for_write, open_index


def _fresh(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


@pytest.mark.skipif(importlib.util.find_spec("pandas") is None, reason="pandas is not installed")
def test_opening_an_index_does_not_import_pandas(tmp_path: Path) -> None:
    with open_for_write(tmp_path / "idx", corpus_root=tmp_path):
        pass
    out = _fresh("import sys; from clipfp8.indexing.store import open_index\n"
                 f"with open_index({str(tmp_path / 'idx')!r}) as s: s.stats()\n"
                 "print('pandas' in sys.modules); import pandas, sqlite_utils.db as d; "
                 "print(pandas.__name__, d.pd is None)")
    assert out.splitlines() == ["False", "pandas True"]


def test_with_pandas_already_imported_sqlite_utils_is_imported_as_usual() -> None:
    if importlib.util.find_spec("pandas") is None:
        pytest.skip("pandas is not installed")
    out = _fresh("import pandas; from clipfp8.indexing.sqlite_import import import_sqlite_utils; "
                 "m = import_sqlite_utils(); print(m.db.pd is pandas)")
    assert out == "True"


def test_the_store_works_in_this_process(tmp_path: Path) -> None:
    with open_for_write(tmp_path / "idx", corpus_root=tmp_path) as store:
        assert store.stats()["images"]["total"] == 0
    with open_index(tmp_path / "idx") as store:
        assert store.stats()["images"]["total"] == 0
