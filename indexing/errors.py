"""Exceptions raised by the ``indexing`` package."""
from __future__ import annotations


class IndexingError(Exception):
    """Base class of every error this package raises on purpose."""


class CorpusError(IndexingError):
    """The corpus path is missing, not a directory, or unreadable."""


class IndexNotFoundError(IndexingError):
    """The index directory holds no index (no database)."""


class IndexLockedError(IndexingError):
    """Another process holds the index directory's write lock."""


class EncoderMismatchError(IndexingError):
    """An encoder's identity differs from the one an index was built with."""


class UnknownEncoderError(IndexingError):
    """The index has no embeddings for the requested encoder name."""


class EncoderSpecError(IndexingError):
    """How to rebuild one of an index's encoders is unknown or no longer valid (no recorded
    spec, a recorded quantized directory that is gone); the message names the flags to pass."""


class StorageError(IndexingError):
    """Writing the index failed (e.g. disk full); the on-disk index is left at the last commit."""


class IndexCorruptError(IndexingError):
    """The on-disk index is inconsistent in a way that cannot be reconciled automatically."""


class IndexConfigError(IndexingError, ValueError):
    """An invalid indexing option (e.g. a FAISS factory string FAISS does not understand)."""


class QueryError(IndexingError):
    """A search query or path argument is invalid."""


class DecodeError(IndexingError):
    """One file could not be read or decoded; ``reason`` is a short machine-friendly tag."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail
