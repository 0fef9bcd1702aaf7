"""``verify``: check that each encoder's FAISS ids match the database, and repair.

Per encoder: ``orphans`` (ids in FAISS without a bookkeeping row), ``missing`` (bookkeeping row
but no vector), ``duplicates`` (an id stored twice), ``unembedded`` (an ``ok`` image without a
vector), ``stale`` (bookkeeping for an image that is gone or bad), ``copy_mismatch`` (ids in only one of
an approximate index and its exact copy). Repair drops orphans,
duplicates and stale bookkeeping in one commit, then re-embeds what is missing with the given
encoders (an ordinary incremental run, which embeds ``ok`` images lacking a vector).
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipfp8.indexing import db as dbm
from clipfp8.indexing.errors import IndexCorruptError
from clipfp8.indexing.store import IndexStore, open_for_write, open_index
from clipfp8.indexing.vectors import VectorIndex
from clipfp8.quant.core.encoder import Encoder

log = logging.getLogger(__name__)

PROBLEMS = ("orphans", "missing", "duplicates", "unembedded", "stale", "copy_mismatch")


@dataclass
class VerifyReport:
    """encoders[name][problem] -> list of ids; ``repaired`` / ``reembedded`` after a repair."""

    encoders: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    file_missing: list[str] = field(default_factory=list)
    repaired: bool = False
    reembedded: int = 0

    @property
    def ok(self) -> bool:
        return not self.file_missing and not any(ids for p in self.encoders.values() for ids in p.values())

    def format(self) -> str:
        lines = [f"index {'consistent' if self.ok else 'INCONSISTENT'}"]
        for name, probs in self.encoders.items():
            lines.append(f"  {name}: " + ", ".join(f"{k} {len(v)}" for k, v in probs.items()))
        lines += [f"  {name}: FAISS file missing" for name in self.file_missing]
        if self.repaired:
            lines.append(f"repaired; re-embedded {self.reembedded} image(s)")
            if any(p["unembedded"] for p in self.encoders.values()):
                lines.append("images still lack vectors: run `clipfp8 index` (or `verify --repair` "
                             "with --precision and the model arguments) to embed them")
        return "\n".join(lines)


def _check_encoder(store: IndexStore, name: str, vec: VectorIndex) -> dict[str, list[int]]:
    row = store.encoder_row(name)
    ids = vec.ids()
    counts = Counter(ids.tolist())
    in_faiss = set(counts)
    booked = dbm.embedded_ids(store.db, row["id"])
    ok_ids = {r["id"] for r in store.db.query("SELECT id FROM images WHERE status='ok'")}
    copy_ids = vec.copy_ids()
    copy = set(copy_ids.tolist()) if copy_ids is not None else in_faiss
    return {"orphans": sorted(in_faiss - booked), "missing": sorted(booked - in_faiss),
            "duplicates": sorted(i for i, n in counts.items() if n > 1),
            "unembedded": sorted(ok_ids - booked), "stale": sorted(booked - ok_ids),
            "copy_mismatch": sorted(copy ^ in_faiss)}


def _load(store: IndexStore, name: str, report: VerifyReport) -> VectorIndex:
    try:
        return store.vectors(name)
    except IndexCorruptError:
        report.file_missing.append(name)
        row = store.encoder_row(name)
        return VectorIndex.new(int(row["dim"]), row["factory"])


def check(store: IndexStore) -> tuple[VerifyReport, dict[str, VectorIndex]]:
    report = VerifyReport()
    vecs = {name: _load(store, name, report) for name in store.encoder_names()}
    report.encoders = {name: _check_encoder(store, name, v) for name, v in vecs.items()}
    return report, vecs


def _repair_commit(store: IndexStore, report: VerifyReport, vecs: dict[str, VectorIndex]) -> None:
    def apply(db: Any) -> set[str]:
        changed = set(report.file_missing)
        for name, probs in report.encoders.items():
            enc_id = store.encoder_row(name)["id"]
            redo = set(probs["duplicates"]) | set(probs["copy_mismatch"])  # dropped, re-embedded
            drop = sorted(set(probs["orphans"]) | redo | set(probs["stale"]))
            if drop:
                vecs[name].remove(np.array(drop, np.int64))
                changed.add(name)
            unbook = sorted(set(probs["missing"]) | redo | set(probs["stale"]))
            for i in range(0, len(unbook), 500):
                chunk = unbook[i:i + 500]
                db.execute(f"DELETE FROM embeddings WHERE encoder_id=? AND image_id IN "
                           f"({','.join('?' * len(chunk))})", [enc_id, *chunk])
        return changed

    store.commit(vecs, apply)


def verify(index_dir: str | Path, repair: bool = False, encoders: Sequence[Encoder] = ()) -> VerifyReport:
    """Check index <-> database consistency; with ``repair``, fix it (taking the write lock) and
    re-embed missing vectors with ``encoders`` (those not given stay listed as ``unembedded``
    until the next ``index`` run embeds them). Returns the report of the final state."""
    if not repair:
        with open_index(index_dir) as store:
            return check(store)[0]
    with open_index(index_dir):
        pass  # IndexNotFoundError rather than creating an empty index
    with open_for_write(index_dir) as store:
        report, vecs = check(store)
        if not report.ok:
            _repair_commit(store, report, vecs)
        root = store.corpus_root
    reembedded = 0
    if encoders:
        from clipfp8.indexing.pipeline import index_corpus

        reembedded = index_corpus(root, index_dir, encoders).indexed
    with open_index(index_dir) as store:
        final = check(store)[0]
    final.repaired, final.reembedded = True, reembedded
    return final
