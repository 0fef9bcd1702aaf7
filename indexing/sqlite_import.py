"""sqlite-utils imported without pandas.

``sqlite_utils.db`` imports pandas whenever it is installed (gradio brings it), only to accept
pandas values in inserts, which this project never passes. That import took 0.30 s of every
process that opens an index (0.34 s against 0.04 s on the 2-core CPU: a third of the index
stage of a cold `clipfp8 search`). ``import_sqlite_utils`` imports sqlite-utils with pandas
hidden for that one import; pandas itself stays importable afterwards. Where pandas or
sqlite-utils is already imported, it changes nothing.
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType

from clipfp8.quant.core.deferred_import import import_without


def import_sqlite_utils() -> ModuleType:
    """``sqlite_utils``, imported (once) without importing pandas."""
    if "sqlite_utils" in sys.modules or "pandas" in sys.modules:
        return importlib.import_module("sqlite_utils")
    return import_without("sqlite_utils", ["pandas"])


__all__ = ["import_sqlite_utils"]
