"""Exceptions raised by the ``indexing`` package."""
from __future__ import annotations


class IndexingError(Exception):
    """Base class of every error this package raises on purpose."""
