"""Corpus indexing: scan -> decode -> embed -> store into FAISS + SQLite, and search.

Public API (see docs/indexing.md): ``index_corpus``, ``open_index``, ``IndexStore``, ``search``,
``Hit``, ``verify``, ``export_parquet``, ``IndexConfig``, ``IndexSummary``.
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {
    "index_corpus": "clipfp8.indexing.pipeline", "IndexSummary": "clipfp8.indexing.pipeline",
    "open_index": "clipfp8.indexing.store", "IndexStore": "clipfp8.indexing.store",
    "search": "clipfp8.indexing.query", "Hit": "clipfp8.indexing.query",
    "verify": "clipfp8.indexing.consistency", "VerifyReport": "clipfp8.indexing.consistency",
    "export_parquet": "clipfp8.indexing.export", "IndexConfig": "clipfp8.indexing.config",
}


def __getattr__(name: str) -> Any:
    # Lazy, so `import indexing.errors` (done by app.cli on every command) stays cheap.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'indexing' has no attribute {name!r}")


__all__ = list(_EXPORTS)
