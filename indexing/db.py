"""The metadata database (SQLite, written with sqlite-utils): schema, migrations, queries.

Tables:
  ``meta``       key/value: ``schema_version``, ``generation`` (bumped by every commit; the FAISS
                 files of that generation are the ones consistent with the rows), ``corpus_root``.
  ``images``     one row per file seen: ``id`` (the FAISS id), ``path`` (display text),
                 ``path_raw`` (relative path as bytes, unique), ``size``, ``mtime_ns``, ``sha256``,
                 ``width``, ``height``, ``status`` (``ok``/``error``), ``error`` (reason).
  ``encoders``   one row per encoder: identity (``name``, ``precision``, ``model_id``, ``checksum``,
                 ``dim``) plus ``factory`` and the actual ``index_type``.
  ``embeddings`` (image_id, encoder_id): which images have a vector in which encoder's index.
"""
from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from clipfp8.indexing.errors import IndexCorruptError
from clipfp8.indexing.sqlite_import import import_sqlite_utils

import_sqlite_utils()  # first, without pandas (see that module); the import below then finds it
import sqlite_utils  # noqa: E402

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
DB_NAME = "metadata.sqlite"


def _v1(db: sqlite_utils.Database) -> None:
    db.table("meta").create({"key": str, "value": str}, pk="key")
    db.table("images").create({"id": int, "path": str, "path_raw": bytes, "size": int, "mtime_ns": int,
                         "sha256": str, "width": int, "height": int, "status": str, "error": str},
                        pk="id")
    db.table("images").create_index(["path_raw"], unique=True)
    db.table("encoders").create({"id": int, "name": str, "precision": str, "model_id": str,
                           "checksum": str, "dim": int, "factory": str, "index_type": str}, pk="id")
    db.table("encoders").create_index(["name"], unique=True)
    db.table("embeddings").create({"image_id": int, "encoder_id": int}, pk=("image_id", "encoder_id"))


def _v2(db: sqlite_utils.Database) -> None:
    # v2: content-hash lookups (move detection), an indexing timestamp, and per-encoder
    # generations so a commit rewrites only the FAISS files it changed.
    db.table("images").create_index(["sha256"], if_not_exists=True)
    db.table("images").add_column("indexed_at", float)
    db.table("encoders").add_column("generation", int)


#: MIGRATIONS[v] upgrades a database at version v-1 to version v (v1 creates the schema).
MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {1: _v1, 2: _v2}


def connect(path: Path, create: bool = False) -> sqlite_utils.Database:
    """Open (and migrate) the database at ``path``. Durable settings: WAL + synchronous=FULL,
    because the old FAISS generation is deleted right after a commit and must not outlive it."""
    conn = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False)
    db = sqlite_utils.Database(conn)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    migrate(db, create=create)
    return db


def schema_version(db: sqlite_utils.Database) -> int:
    if not db["meta"].exists():
        return 0
    rows = list(db.query("SELECT value FROM meta WHERE key='schema_version'"))
    return int(rows[0]["value"]) if rows else 0


def migrate(db: sqlite_utils.Database, create: bool = False, target: int = SCHEMA_VERSION) -> int:
    """Apply the missing migrations, each in its own transaction; returns the final version."""
    version = schema_version(db)
    if version > SCHEMA_VERSION:
        raise IndexCorruptError(f"index schema version {version} is newer than this code ({SCHEMA_VERSION})")
    if version == 0 and not create:
        raise IndexCorruptError("the database has no schema (not an index database)")
    for v in range(version + 1, target + 1):
        with db.atomic():
            MIGRATIONS[v](db)
            db.table("meta").upsert({"key": "schema_version", "value": str(v)}, pk="key")
        log.debug("migrated index database to schema version %d", v)
    return max(version, target)


def get_meta(db: sqlite_utils.Database, key: str, default: str | None = None) -> str | None:
    rows = list(db.query("SELECT value FROM meta WHERE key=?", [key]))
    return rows[0]["value"] if rows else default


def set_meta(db: sqlite_utils.Database, key: str, value: Any) -> None:
    db.table("meta").upsert({"key": key, "value": str(value)}, pk="key")


def generation(db: sqlite_utils.Database) -> int:
    return int(get_meta(db, "generation", "0") or 0)


def encoder_rows(db: sqlite_utils.Database) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in db.query("SELECT * FROM encoders ORDER BY id")}


def image_rows(db: sqlite_utils.Database) -> dict[bytes, dict[str, Any]]:
    """path_raw -> row, for every image."""
    return {bytes(r["path_raw"]): r for r in db.query("SELECT * FROM images")}


def embedded_ids(db: sqlite_utils.Database, encoder_id: int) -> set[int]:
    return {r["image_id"] for r in db.query(
        "SELECT image_id FROM embeddings WHERE encoder_id=?", [encoder_id])}


def insert_rows(db: sqlite_utils.Database, table: str, rows: list[dict[str, Any]], ignore: bool = False) -> None:
    """Insert ``rows`` (dicts with the same keys, existing columns of ``table``) in one
    ``executemany``; ``ignore``: skip rows that break a unique constraint. The indexer commits
    tens of thousands of rows at once, where sqlite-utils' ``insert_all`` spent most of the
    commit building its statements in Python (~30 us a row, on the thread that feeds the GPU)."""
    if not rows:
        return
    cols = list(rows[0])
    if any(r.keys() != rows[0].keys() for r in rows):
        db.table(table).insert_all(rows, ignore=ignore)  # mixed shapes: let sqlite-utils sort them out
        return
    names = ", ".join(f'"{c}"' for c in cols)
    verb = "INSERT OR IGNORE" if ignore else "INSERT"
    db.conn.executemany(f'{verb} INTO "{table}" ({names}) VALUES ({", ".join("?" * len(cols))})',
                        [tuple(r[c] for c in cols) for r in rows])


def paths_for_ids(db: sqlite_utils.Database, ids: Iterable[int]) -> dict[int, bytes]:
    ids = [int(i) for i in ids]
    out: dict[int, bytes] = {}
    for i in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
        chunk = ids[i:i + 500]
        q = f"SELECT id, path_raw FROM images WHERE id IN ({','.join('?' * len(chunk))})"
        out.update({r["id"]: bytes(r["path_raw"]) for r in db.query(q, chunk)})
    return out


def error_count(db: sqlite_utils.Database) -> int:
    return int(next(iter(db.query("SELECT COUNT(*) n FROM images WHERE status='error'")))["n"])


def error_rows(db: sqlite_utils.Database, reasons: Iterable[str] = (),
               limit: int | None = None) -> list[dict[str, Any]]:
    """The bad files (``status='error'`` rows), sorted by path; only those whose reason (the
    error's tag before ':') is in ``reasons`` when given; at most ``limit``."""
    reasons = list(reasons)
    sql = ("SELECT id, path_raw, size, mtime_ns, error, substr(error, 1, instr(error || ':', ':') - 1)"
           " reason FROM images WHERE status='error'")
    if reasons:
        sql += f" AND reason IN ({','.join('?' * len(reasons))})"
    sql += " ORDER BY path_raw"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return list(db.query(sql, reasons))
