"""The index directory: SQLite metadata plus one FAISS file per encoder, kept consistent.

Layout::

    DIR/metadata.sqlite         images, encoders, embeddings, meta (see ``indexing.db``)
    DIR/LOCK                    fcntl.flock-ed by the one writer
    DIR/vectors/E.gN.faiss      encoder row E's vectors as of generation N
    DIR/vectors/E.gN.ids.npy    (``--factory auto`` IVF indexes) the exact vectors' sorted ids
    DIR/vectors/E.gN.f16.npy    ... and the exact vectors in float16 (``indexing.exact_store``)

Commit protocol (crash-safe at any instant, SIGKILL included): inside one SQLite transaction,
(1) apply the row changes, (2) write each changed encoder's FAISS file under a NEW generation
name (temp + fsync + rename + dir fsync), (3) point the encoder row at that generation, then
(4) COMMIT, and only after that (5) delete the old generation files. A crash before (4) leaves
the database at the old generation, whose files still exist (the new ones are orphans, removed
by the next writer); a crash after (4) leaves only stale files. Readers load exactly the file
named by the committed row.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipfp8.indexing import _testhooks, exact_store
from clipfp8.indexing import db as dbm
from clipfp8.indexing.atomic import fsync_dir
from clipfp8.indexing.errors import (
    EncoderMismatchError,
    IndexCorruptError,
    IndexLockedError,
    IndexNotFoundError,
    QueryError,
    StorageError,
    UnknownEncoderError,
)
from clipfp8.indexing.faiss_factory import is_auto
from clipfp8.indexing.vectors import VectorIndex
from clipfp8.quant.core.encoder import EncoderIdentity

if TYPE_CHECKING:  # annotations only; indexing.db imports it (without pandas, see sqlite_import)
    import sqlite_utils

log = logging.getLogger(__name__)

LOCK_NAME = "LOCK"
#: ``meta`` key prefix of each encoder's recorded ``EncoderSpec`` (JSON).
SPEC_META_PREFIX = "encoder_spec:"
VECTORS_DIR = "vectors"
_VEC_RE = re.compile(r"^(\d+)\.g(\d+)\.(?:faiss|ids\.npy|f16\.npy)$")


def _generation_files(faiss_path: Path) -> list[Path]:
    """Every file a generation of one encoder may have: the FAISS file and its exact-vector files."""
    return [faiss_path, *exact_store.paths(faiss_path.with_suffix(""))]


class IndexStore:
    """An open index directory. Open with ``open_index`` (read-only) or ``open_for_write``."""

    def __init__(self, index_dir: Path, db: sqlite_utils.Database, lock_fd: int | None = None) -> None:
        self.index_dir, self.db, self._lock_fd = index_dir, db, lock_fd
        self._vectors: dict[str, tuple[int, VectorIndex]] = {}

    # ----- identity and paths ------------------------------------------------------------
    @property
    def writable(self) -> bool:
        return self._lock_fd is not None

    @property
    def corpus_root(self) -> Path:
        return Path(dbm.get_meta(self.db, "corpus_root") or "")

    def encoder_names(self) -> list[str]:
        return list(dbm.encoder_rows(self.db))

    def encoder_row(self, name: str) -> dict[str, Any]:
        rows = dbm.encoder_rows(self.db)
        if name not in rows:
            raise UnknownEncoderError(
                f"index {self.index_dir} has no embeddings for encoder {name!r}; it has {list(rows)}")
        return rows[name]

    def identity(self, name: str) -> EncoderIdentity:
        r = self.encoder_row(name)
        return EncoderIdentity(r["name"], r["precision"], r["model_id"], r["checksum"], int(r["dim"]))

    def check_identity(self, identity: EncoderIdentity) -> None:
        """Raise ``EncoderMismatchError`` unless ``identity`` equals the recorded one."""
        stored = self.identity(identity.name)
        if stored != identity:
            diff = {k: (v, identity.to_dict()[k]) for k, v in stored.to_dict().items()
                    if identity.to_dict()[k] != v}
            raise EncoderMismatchError(
                f"encoder {identity.name!r} differs from the one index {self.index_dir} was built "
                f"with (stored vs given: {diff}); rebuild the index into a new directory")

    def resolve(self, rel_path: str) -> Path:
        """Absolute path of an indexed file; refuses absolute paths, '..' escapes and paths
        that are not in the index (so the app serves only indexed files)."""
        raw = os.fsencode(rel_path)
        norm = os.path.normpath(raw)
        if os.path.isabs(raw) or norm.startswith(b"..") or norm != raw:
            raise QueryError(f"path {rel_path!r} is not a plain path inside the corpus")
        if not list(self.db.query("SELECT 1 FROM images WHERE path_raw=?", [raw])):
            raise QueryError(f"path {rel_path!r} is not in index {self.index_dir}")
        return Path(os.fsdecode(os.path.join(os.fsencode(str(self.corpus_root)), raw)))

    # ----- vectors -----------------------------------------------------------------------
    def _vec_path(self, encoder_id: int, gen: int) -> Path:
        return self.index_dir / VECTORS_DIR / f"{encoder_id}.g{gen}.faiss"

    def vectors(self, name: str) -> VectorIndex:
        """The committed vectors of encoder ``name`` (reloaded when another process committed)."""
        for _ in range(5):  # a writer may replace the file between our two reads
            row = self.encoder_row(name)
            gen = int(row["generation"] or 0)
            cached = self._vectors.get(name)
            if cached and cached[0] == gen:
                return cached[1]
            if gen == 0:
                vec = VectorIndex.new(int(row["dim"]), row["factory"])
            else:
                try:
                    vec = VectorIndex.load(self._vec_path(row["id"], gen), row["factory"], int(row["dim"]))
                except FileNotFoundError:
                    continue
            self._vectors[name] = (gen, vec)
            return vec
        raise IndexCorruptError(f"index {self.index_dir}: FAISS file of encoder {name!r} generation "
                                f"{gen} is missing (run `clipfp8 verify --repair`)")

    def id_paths(self, ids: np.ndarray) -> dict[int, str]:
        return {i: os.fsdecode(p) for i, p in dbm.paths_for_ids(self.db, ids).items()}

    # ----- writing -----------------------------------------------------------------------
    def register_encoder(self, identity: EncoderIdentity, factory: str, spec: dict[str, Any] | None = None) -> None:
        """Record a new encoder, or check that an existing one is the same. ``spec``
        (``EncoderSpec.to_record()``: model, precision, quantized dir, batch size) is stored in
        the ``meta`` table as ``encoder_spec:<name>`` (JSON), so ``search``/``serve`` can rebuild
        the encoder without the user repeating --model/--quantized; the latest one wins."""
        rows = dbm.encoder_rows(self.db)
        if identity.name in rows:
            self.check_identity(identity)
            if rows[identity.name]["factory"] != factory and not self._refactor_flat(rows[identity.name], factory):
                log.warning("encoder %s keeps its index type %r (asked for %r; use a new index "
                            "directory to change it)", identity.name, rows[identity.name]["factory"], factory)
            if spec is not None and self.recorded_spec(identity.name) != spec:
                with self.db.atomic():
                    dbm.set_meta(self.db, SPEC_META_PREFIX + identity.name, json.dumps(spec, sort_keys=True))
            return
        with self.db.atomic():
            self.db.table("encoders").insert(dict(identity.to_dict(), factory=factory, index_type="flat",
                                                  generation=0))
            if spec is not None:
                dbm.set_meta(self.db, SPEC_META_PREFIX + identity.name, json.dumps(spec, sort_keys=True))

    def _refactor_flat(self, row: dict[str, Any], factory: str) -> bool:
        """Between ``Flat`` and ``auto[:budget]``, the factory asked for replaces the recorded one
        while the index is still exact and flat (an index made with ``Flat`` switches to ``auto``
        and becomes an IVF index once large; nothing needs rebuilding). Returns True when it did."""
        def flat_or_auto(f: str) -> bool:
            return f.strip().lower() == "flat" or is_auto(f)

        if row["index_type"] != "flat" or not (flat_or_auto(row["factory"]) and flat_or_auto(factory)):
            return False
        VectorIndex.new(int(row["dim"]), factory)  # validates the new factory string
        with self.db.atomic():
            self.db.table("encoders").update(row["id"], {"factory": factory})
        self._vectors.pop(row["name"], None)
        log.info("encoder %s: index type %r -> %r (still exact: nothing to rebuild)", row["name"], row["factory"], factory)
        return True

    def recorded_spec(self, name: str) -> dict[str, Any] | None:
        """The ``EncoderSpec.to_record()`` dict stored when encoder ``name`` was registered, or
        None (an index written before specs were recorded, or a test encoder)."""
        raw = dbm.get_meta(self.db, SPEC_META_PREFIX + name)
        if raw is None:
            return None
        try:
            spec = json.loads(raw)
        except json.JSONDecodeError as e:
            raise IndexCorruptError(f"index {self.index_dir}: the recorded spec of encoder {name!r} is not "
                                    f"JSON ({e})") from e
        return spec if isinstance(spec, dict) else None

    def commit(self, vectors: dict[str, VectorIndex],
               apply_rows: Callable[[sqlite_utils.Database], set[str]]) -> int:
        """Commit point: ``apply_rows(db)`` makes the row changes (and the matching changes to
        ``vectors``) and returns the names of the encoders whose vectors it changed; those are
        persisted under a new generation, atomically with respect to crashes. Returns the new
        generation. On any error the database is rolled back, the in-memory vectors are dropped
        (they may hold uncommitted changes) and the error propagates."""
        new_gen = dbm.generation(self.db) + 1
        written: list[Path] = []
        changed: dict[str, VectorIndex] = {}
        old: list[Path] = []
        try:
            with self.db.atomic():
                changed = {n: vectors[n] for n in apply_rows(self.db)}
                for name, vec in changed.items():
                    row = self.encoder_row(name)
                    path = self._vec_path(row["id"], new_gen)
                    path.parent.mkdir(exist_ok=True)
                    written += _generation_files(path)  # listed first: a failed save is cleaned up too
                    vec.save(path)
                    if row["generation"]:
                        old += _generation_files(self._vec_path(row["id"], row["generation"]))
                    self.db.table("encoders").update(row["id"], {"generation": new_gen, "index_type": vec.kind})
                dbm.set_meta(self.db, "generation", new_gen)
                _testhooks.checkpoint("commit:faiss_written")
        except BaseException as e:
            self._vectors.clear()
            for p in written:
                p.unlink(missing_ok=True)
            if isinstance(e, sqlite3.OperationalError):  # e.g. "database or disk is full"
                raise StorageError(f"could not commit {self.index_dir / dbm.DB_NAME}: {e}") from e
            raise
        _testhooks.checkpoint("commit:db_committed")
        for name, vec in changed.items():
            self._vectors[name] = (new_gen, vec)
        for p in old:
            p.unlink(missing_ok=True)
        return new_gen

    def remove_stale_files(self) -> int:
        """Writer only: delete vector and temp files no committed row points to."""
        live = {(r["id"], r["generation"]) for r in dbm.encoder_rows(self.db).values()}
        n = 0
        for p in (self.index_dir / VECTORS_DIR).glob("*"):
            m = _VEC_RE.match(p.name)
            if m is None or (int(m.group(1)), int(m.group(2))) not in live:
                p.unlink(missing_ok=True)
                n += 1
        return n

    # ----- stats and lifetime ------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        q = lambda sql: list(self.db.query(sql))  # noqa: E731
        counts = {r["status"]: r["n"] for r in q("SELECT status, COUNT(*) n FROM images GROUP BY status")}
        reasons = {r["reason"]: r["n"] for r in q(
            "SELECT substr(error, 1, instr(error || ':', ':') - 1) reason, COUNT(*) n FROM images "
            "WHERE status='error' GROUP BY reason")}
        encoders = {}
        for name, r in dbm.encoder_rows(self.db).items():
            n = q(f"SELECT COUNT(*) n FROM embeddings WHERE encoder_id={int(r['id'])}")[0]["n"]
            encoders[name] = {k: r[k] for k in ("precision", "model_id", "checksum", "dim", "factory",
                                                "index_type")} | {"count": n}
        return {"index_dir": str(self.index_dir), "corpus_root": str(self.corpus_root),
                "schema_version": dbm.schema_version(self.db), "generation": dbm.generation(self.db),
                "images": {"total": sum(counts.values()), "ok": counts.get("ok", 0),
                           "error": counts.get("error", 0)},
                "errors_by_reason": reasons, "encoders": encoders}

    def close(self) -> None:
        self.db.conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_index(index_dir: str | Path) -> IndexStore:
    """Open an existing index for reading (no lock; safe while a writer runs)."""
    index_dir = Path(index_dir).expanduser().resolve()
    db_path = index_dir / dbm.DB_NAME
    if not db_path.is_file():
        raise IndexNotFoundError(f"no index in {index_dir} (missing {dbm.DB_NAME}); run `clipfp8 index`")
    return IndexStore(index_dir, dbm.connect(db_path))


def _lock(index_dir: Path) -> int:
    fd = os.open(index_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise IndexLockedError(f"index directory {index_dir} is locked by another running index "
                               f"process (pid {holder}); wait for it or stop it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def open_for_write(index_dir: str | Path, corpus_root: Path | None = None) -> IndexStore:
    """Lock ``index_dir`` (creating it and the database when new) for one writer; reconcile
    leftovers of a crashed run. ``corpus_root`` must match the recorded one when given."""
    index_dir = Path(index_dir).expanduser().resolve()
    if index_dir.exists() and not index_dir.is_dir():
        raise IndexNotFoundError(f"index directory {index_dir} exists and is not a directory")
    index_dir.mkdir(parents=True, exist_ok=True)
    fd = _lock(index_dir)
    db: sqlite_utils.Database | None = None
    try:
        db = dbm.connect(index_dir / dbm.DB_NAME, create=True)
        store = IndexStore(index_dir, db, fd)
        recorded = dbm.get_meta(db, "corpus_root")
        if corpus_root is not None:
            if recorded and Path(recorded) != corpus_root:
                raise IndexCorruptError(f"index {index_dir} was built for corpus {recorded}, "
                                        f"not {corpus_root}; use another --index-dir")
            if not recorded:
                with db.atomic():
                    dbm.set_meta(db, "corpus_root", str(corpus_root))
        if not (index_dir / VECTORS_DIR).is_dir():
            (index_dir / VECTORS_DIR).mkdir()
            # The new folder (and database file) entries must be durable before any commit
            # points at files inside them.
            fsync_dir(index_dir)
        removed = store.remove_stale_files()
        if removed:
            log.info("removed %d stale file(s) left by an interrupted run", removed)
        return store
    except BaseException:
        if db is not None:
            db.conn.close()
        os.close(fd)
        raise
