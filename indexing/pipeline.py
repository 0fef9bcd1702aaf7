"""The indexing run: scan -> plan -> decode (threads) -> embed (all encoders) -> store, with a
commit point every ``commit_every`` files and per-stage timings.

A run killed at any moment restarts from the last commit point: the database and the FAISS
files always describe the same committed set (see ``indexing.store``), rows get ids in sorted
path order, and deletions happen in the final commit, so a resumed run ends exactly where a
clean run would.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipfp8.indexing import _testhooks
from clipfp8.indexing import db as dbm
from clipfp8.indexing.config import ENGINES, IndexConfig
from clipfp8.indexing.decode import Decoded, Decoder, DecodeTask, error_reason, imap_bounded, settle
from clipfp8.indexing.embed import EmbedResult, start_embed
from clipfp8.indexing.errors import IndexConfigError
from clipfp8.indexing.gpu_decode import make_decoder
from clipfp8.indexing.plan import Plan, Task, make_plan, raised_limits
from clipfp8.indexing.scan import FileEntry, check_corpus, scan_corpus
from clipfp8.indexing.store import IndexStore, open_for_write
from clipfp8.indexing.vectors import VectorIndex
from clipfp8.quant.core.config import EncoderSpec
from clipfp8.quant.core.encoder import Encoder, create_encoder

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Encoders = Sequence[Encoder] | Callable[[], Sequence[Encoder]]
#: Encoders or the specs to build them from (with ``engine="ray"``: built only in the Ray actors).
EncoderSources = Sequence[Encoder | EncoderSpec] | Callable[[], Sequence[Encoder | EncoderSpec]]


@dataclass
class IndexSummary:
    """What a run did. ``skipped``: bad files found this run by reason; ``errors``: (path, reason);
    ``bad_files``: bad files recorded in the whole index after the run (``clipfp8 errors``).
    ``stage_seconds``: wall time of scan, plan, embed (and ``embed:<encoder>``), store and
    decode_wait (the embedder waiting for decoders); summed worker time of decode (and
    ``decode:read|hash|decode|preprocess``; on the GPU data path also ``decode:header``, and
    ``decode_device``: the device batches, preprocessed right before they are encoded).
    ``warmup_seconds``: the encoders' first-call cost paid before the first batch (a compiled
    encoder compiles or loads its engine's kernels: ``Encoder.warm_up_images``), a start cost
    like loading the model, so not part of ``total_seconds`` (the run's wall time without it).
    With ``--engine ray`` it is the longest first start-up of an actor (load, build and warm
    its encoders; the pool waits for every actor before its first batch).
    """

    indexed: int = 0
    unchanged: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)
    bad_files: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    warmup_seconds: float = 0.0
    #: Which decode path ran: "cpu" (Pillow on worker threads), "gpu:<device>" (batched), or
    #: "ray:cpu"/"ray:gpu" (``--engine ray``: in the actors, which also embed).
    decoder: str = ""

    @property
    def images_per_second(self) -> float:
        return self.indexed / self.total_seconds if self.total_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: every field, plus ``images_per_second`` (``index --summary-json``)."""
        d = dataclasses.asdict(self)
        d["errors"] = [list(e) for e in self.errors]
        d["images_per_second"] = self.images_per_second
        return d

    def format(self) -> str:
        lines = [f"indexed {self.indexed}, unchanged {self.unchanged}, updated {self.updated}, "
                 f"moved {self.moved}, removed {self.removed}, skipped {sum(self.skipped.values())}"
                 f" in {self.total_seconds:.1f}s ({self.images_per_second:.1f} images/s)"
                 + (f" after a {self.warmup_seconds:.1f}s encoder warm-up" if self.warmup_seconds else "")]
        lines += [f"  skipped {n:5d}  {reason}" for reason, n in sorted(self.skipped.items())]
        lines += [f"  stage {k:<24} {v:8.2f}s" for k, v in self.stage_seconds.items()]
        return "\n".join(lines)


@dataclass
class _Op:
    """One image row change; ``id`` None inserts. ``vectors``: encoder name -> (D,) float32."""

    id: int | None
    row: dict[str, Any]
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    drop_vectors: bool = False


#: A batch queued on the encoders: (its files in order with their ops, None where a vector is
#: due; the files being embedded; the function that waits for their vectors, None if none).
_InFlight = tuple[list[tuple[Task, Decoded, "_Op | None"]], list[tuple[Task, Decoded]],
                  Callable[[], EmbedResult] | None]


def _row(entry: FileEntry, d: Decoded | None = None, error: str | None = None) -> dict[str, Any]:
    return {"path": entry.rel.decode("utf-8", "backslashreplace"), "path_raw": entry.rel,
            "size": entry.size, "mtime_ns": entry.mtime_ns,
            "sha256": d.sha256 if d else None, "width": d.width if d else None,
            "height": d.height if d else None, "status": "error" if error else "ok",
            "error": error, "indexed_at": time.time()}


def index_corpus(corpus: str | Path, index_dir: str | Path, encoders: Encoders | EncoderSources,
                 batch_size: int = 64, workers: int = 4, factory: str = "Flat",
                 config: IndexConfig | None = None, progress: Progress | None = None,
                 decoder: Decoder | None = None, engine: str = "local",
                 ray_address: str | None = None) -> IndexSummary:
    """Index (incrementally) every image under ``corpus`` into ``index_dir`` with all
    ``encoders`` in one pass over the decoded images. ``config``, when given, overrides
    ``batch_size``/``workers``/``factory``. ``progress(done, total)`` follows the files read.
    ``decoder`` replaces the one ``cfg.decode`` picks (Pillow's ``ImageDecoder``, or
    ``gpu_decode.GpuDecoder`` when the encoders run on CUDA); it must fill ``Decoded.tensors``
    for every encoder name. ``encoders`` may be a zero-argument
    callable returning them: it is called once the index is locked, so a second writer fails
    before loading any model.
    ``engine="ray"`` (``--engine``): read, decode and embed in a Ray actor pool on the cluster at
    ``ray_address`` (None: ``RAY_ADDRESS``, a cluster started on this machine, else a new local
    one); scan, plan and commits stay here (``indexing.ray_engine``; needs ``clip-fp8[ray]``).
    ``encoders`` may also hold ``EncoderSpec``s: built here (``create_encoder``), or with "ray"
    only in the actors; other encoders must then be picklable (each actor gets a copy)."""
    root = check_corpus(corpus)
    cfg = config or IndexConfig(batch_size=batch_size, workers=workers, factory=factory)
    if engine not in ENGINES:
        raise IndexConfigError(f"--engine must be one of {ENGINES}, got {engine!r}")
    if engine == "ray":
        if decoder is not None:
            raise IndexConfigError("index_corpus: decoder= applies to the local engine only")
        if cfg.read_processes:  # an actor decodes one batch per call: a pool per call would cost more
            raise IndexConfigError("--read-processes applies to the local engine only (Ray's actors are processes already)")
        return _index_on_ray(root, index_dir, encoders, cfg, progress, ray_address)
    if ray_address is not None:
        raise IndexConfigError("--ray-address needs --engine ray")
    if not callable(encoders) and not any(isinstance(e, EncoderSpec) for e in encoders):
        _check_encoders(_built(encoders), cfg)  # before the index directory is touched
    with open_for_write(index_dir, root) as store:
        built = _built(encoders() if callable(encoders) else encoders)
        _check_encoders(built, cfg)
        _register(store, built, cfg)
        decoder = decoder or make_decoder(built, cfg)  # cfg.decode: GPU or Pillow
        return _Run(store, built, cfg, root, progress, decoder).run()


def _built(given: Sequence[Encoder | EncoderSpec]) -> list[Encoder]:
    """The local engine's encoders: a spec is built here (the Ray engine builds it in its actors)."""
    return [create_encoder(g) if isinstance(g, EncoderSpec) else g for g in given]


def _index_on_ray(root: Path, index_dir: str | Path, encoders: EncoderSources, cfg: IndexConfig,
                  progress: Progress | None, ray_address: str | None) -> IndexSummary:
    try:
        from clipfp8.indexing import ray_engine  # lazily: only this engine needs ray installed
    except ImportError as e:
        raise IndexConfigError(f"--engine ray needs Ray: pip install 'clip-fp8[ray]' ({e})") from e
    with open_for_write(index_dir, root) as store, ray_engine.connect(ray_address):
        given = list(encoders() if callable(encoders) else encoders)
        if not given:
            raise ValueError("index_corpus: give at least one encoder")
        decoder = ray_engine.RayDecoder(given, root, cfg)  # builds each encoder once on the cluster
        _check_encoders(decoder.encoders, cfg)
        _register(store, decoder.encoders, cfg)
        return _Run(store, list(decoder.encoders), cfg, root, progress, decoder).run()


def _register(store: IndexStore, encoders: Sequence[Encoder], cfg: IndexConfig) -> None:
    for enc in encoders:
        store.register_encoder(enc.identity(), cfg.factory, enc.spec.to_record() if enc.spec else None)


def _check_encoders(encoders: Sequence[Encoder], cfg: IndexConfig) -> None:
    if not encoders:
        raise ValueError("index_corpus: give at least one encoder")
    names = [e.name for e in encoders]
    if len(set(names)) != len(names):
        raise ValueError(f"index_corpus: encoder names must be unique, got {names}")
    for enc in encoders:  # fail on a bad factory string before any work
        VectorIndex.new(enc.dim, cfg.factory)


class _Run:
    def __init__(self, store: IndexStore, encoders: list[Encoder], cfg: IndexConfig, root: Path,
                 progress: Progress | None, decoder: Decoder) -> None:
        self.store, self.encoders, self.cfg, self.root = store, encoders, cfg, root
        root_b, sep = os.fsencode(str(root)), os.fsencode(os.sep)
        self._root_prefix = root_b if root_b.endswith(sep) else root_b + sep  # for ``_abs``
        self.decoder = decoder
        self.progress = progress
        self.summary = IndexSummary()
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.ops: list[_Op] = []
        #: Batches queued on the encoders and not yet waited for, oldest first (see ``_embed``).
        self.inflight: deque[_InFlight] = deque()
        self.last_commit = time.monotonic()
        # Handled files in task order; an entry without an op still needs embedding. Ops are
        # emitted in this order so row ids follow the sorted paths (a resumed run matches).
        self.pending: list[tuple[Task, Decoded, _Op | None]] = []
        self.to_embed = 0
        self.plan = Plan()
        self.enc_ids = {n: r["id"] for n, r in dbm.encoder_rows(store.db).items()}
        self.commit_at = self._commit_threshold()

    def _commit_threshold(self) -> int:
        ntotal = max(self.store.vectors(e.name).ntotal for e in self.encoders)
        return max(self.cfg.commit_every, int(self.cfg.commit_fraction * ntotal))

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t0

    def run(self) -> IndexSummary:
        t0 = time.perf_counter()
        with self.timed("scan"):
            scan = scan_corpus(self.root, self.cfg.extensions, exclude=self.store.index_dir,
                               follow_symlinks=self.cfg.follow_symlinks)
        limits = {"max_pixels": self.cfg.max_pixels, "max_file_bytes": self.cfg.max_file_bytes}
        recorded = json.loads(dbm.get_meta(self.store.db, "limits") or "{}")
        with self.timed("plan"):
            embedded = {e.name: dbm.embedded_ids(self.store.db, self.enc_ids[e.name]) for e in self.encoders}
            self.plan = make_plan(scan, dbm.image_rows(self.store.db), embedded, rehash=self.cfg.rehash,
                                  retry=raised_limits(recorded, limits))
        self.summary.unchanged = self.plan.unchanged
        if self.plan.tasks:  # something to embed: pay the encoders' first-call cost up front
            warm = time.perf_counter()
            if any([e.warm_up_images(self.cfg.batch_size) for e in self.encoders]):
                self.summary.warmup_seconds = time.perf_counter() - warm
        for rel, reason, row in self.plan.scan_errors:
            self.ops.append(self._error(FileEntry(rel, 0, 0), row, reason))
        with _gc_frozen():
            self._process(self.plan.tasks)
            self._commit(final=True)
        if recorded != limits:  # after the final commit: files refused by a lower limit were retried
            with self.store.db.atomic():
                dbm.set_meta(self.store.db, "limits", json.dumps(limits, sort_keys=True))
        s = self.summary
        # A Ray pool's actors build and warm their own encoders (RayDecoder.warmup_seconds).
        s.warmup_seconds += float(getattr(self.decoder, "warmup_seconds", 0.0))
        s.bad_files = dbm.error_count(self.store.db)
        device = getattr(self.decoder, "device", None)  # a batching GpuDecoder knows its device
        s.decoder = getattr(self.decoder, "label", None) or (f"gpu:{device}" if device is not None else "cpu")
        s.stage_seconds = dict(self.seconds)
        s.total_seconds = time.perf_counter() - t0 - s.warmup_seconds
        return s

    def _abs(self, entry: FileEntry) -> Path:
        # Joined by concatenation to the root's bytes made once: ``os.path.join`` per file was
        # the largest single cost of the GPU-feeding thread's per-file Python (scan paths are
        # relative, so the join would only ever concatenate).
        if os.path.isabs(entry.rel):  # never from a scan; kept exact for any caller
            return Path(os.fsdecode(entry.rel))
        return Path(os.fsdecode(self._root_prefix + entry.rel))

    def _process(self, tasks: list[Task]) -> None:
        jobs = (DecodeTask(t.entry, self._abs(t.entry), t.skip_hashes, frozenset(t.needs)) for t in tasks)
        batched = getattr(self.decoder, "imap", None)  # a batching decoder (GPU) runs its own threads
        if batched is None:
            results = imap_bounded(self.decoder, jobs, self.cfg.workers, self.cfg.effective_lookahead)
        elif getattr(self.decoder, "defers", False):  # device batches decoded in _embed (see _settle)
            results = batched(jobs, self.cfg.workers, self.cfg.effective_lookahead, defer=True)
        else:
            results = batched(jobs, self.cfg.workers, self.cfg.effective_lookahead)
        done = 0
        while True:
            with self.timed("decode_wait"):
                d = next(results, None)
            if d is None:
                break
            if not done:
                # The commit interval counts from the first file, not from before the scan, the
                # encoders' warm-up (seconds for a compiled GPU tower) or, on Ray, the actors'
                # start-up inside the first result: no work could be lost before it.
                self.last_commit = time.monotonic()
            task = tasks[done]
            done += 1
            self.seconds["decode"] += d.seconds
            for part, sec in d.parts.items():
                self.seconds[f"decode:{part}"] += sec
            self._handle(task, d)
            if self.to_embed >= self.cfg.batch_size or len(self.pending) >= self.cfg.commit_every:
                self._embed()
            if len(self.ops) >= self.commit_at and time.monotonic() - self.last_commit >= self.cfg.commit_interval_s:
                self._commit(final=False)
            if self.progress is not None:
                self.progress(done, len(tasks))
        self._embed()
        while self.inflight:
            self._finish_embed()

    def _handle(self, task: Task, d: Decoded) -> None:
        if d.error is None and d.sha256 in task.skip_hashes:
            if task.row is not None and (task.row["size"], task.row["mtime_ns"]) == (d.entry.size, d.entry.mtime_ns):
                self.summary.unchanged += 1  # re-hashed (--rehash): the content is the same
                return
            if task.row is not None:  # touched but identical content: metadata only
                self._queue(task, d, _Op(task.row["id"], {"size": d.entry.size, "mtime_ns": d.entry.mtime_ns}))
                self.summary.updated += 1
                return
            src = self.plan.vanished.pop(d.sha256, None)
            if src is not None:  # a renamed/moved file: keep its id and vectors
                self._queue(task, d, _Op(src["id"], {k: v for k, v in _row(d.entry, d).items()
                                                     if k not in ("width", "height")}))
                self.summary.moved += 1
                return
            d = self.decoder(DecodeTask(d.entry, self._abs(d.entry)))  # source already claimed
        if d.error is not None:
            self._queue(task, d, self._error(d.entry, task.row, d.error))
            return
        self._queue(task, d, None)

    def _queue(self, task: Task, d: Decoded, op: _Op | None) -> None:
        self.pending.append((task, d, op))
        self.to_embed += op is None

    def _error(self, entry: FileEntry, row: dict[str, Any] | None, error: str) -> _Op:
        had_vectors = row is not None and row["status"] == "ok"
        reason = error_reason(error)
        self.summary.skipped[reason] = self.summary.skipped.get(reason, 0) + 1
        self.summary.errors.append((entry.rel_str, error))
        log.debug("skipped %s: %s", entry.rel_str, error)
        return _Op(row["id"] if row else None, _row(entry, error=error), drop_vectors=had_vectors)

    def _embed(self) -> None:
        """Queue the pending files that need it on the encoders (one batch per encoder), then
        finish the oldest batches until ``cfg.encode_ahead`` stay queued: on a GPU the device
        encodes them while the host decodes the next (``start_embed``). Two queued batches
        keep the device busy through a host step that runs longer than one batch (a commit, a
        slow read, the GIL); on the H200 fp16 A/B it measured the same as one
        (docs/benchmarks.md). Ops are emitted in file order."""
        batch, self.pending, self.to_embed = self.pending, [], 0
        self._settle(batch)
        todo = [(t, d) for t, d, op in batch if op is None]
        finish = None
        if todo:
            with self.timed("embed"):
                finish = start_embed(self.encoders, [d.tensors for _, d in todo], [t.needs for t, _ in todo])
        if batch:
            self.inflight.append((batch, todo, finish))
        while len(self.inflight) > self.cfg.encode_ahead:
            self._finish_embed()

    def _settle(self, batch: list[tuple[Task, Decoded, _Op | None]]) -> None:
        """Decode what the decoder deferred (``Decoded.pending``) right before it is queued on
        the encoders -- the previous batch is still encoding, so the device stays busy while the
        per-file work above ran; a file that fails there becomes an error op in place."""
        owed = [d for _, d, op in batch if op is None and d.pending is not None]
        if not owed:
            return
        with self.timed("decode_device"):
            settle(owed)
        for k, (t, d, op) in enumerate(batch):
            if op is None and d.error is not None:
                batch[k] = (t, d, self._error(d.entry, t.row, d.error))

    def _finish_embed(self) -> None:
        """Wait for the oldest batch in flight, if any, and turn it into ops."""
        if not self.inflight:
            return
        batch, todo, finish = self.inflight.popleft()
        if finish is not None:
            with self.timed("embed"):
                res = finish()
            for name, sec in res.seconds.items():
                self.seconds[f"embed:{name}"] += sec
            made = iter(_Op(t.row["id"] if t.row else None, _row(d.entry, d), v)
                        for (t, d), v in zip(todo, res.vectors, strict=False))
            self.summary.indexed += len(todo)
        for _, d, op in batch:
            self.ops.append(op if op is not None else next(made))
            d.tensors = {}  # free memory before the commit
        _testhooks.checkpoint("pipeline:batch_embedded")

    def _commit(self, final: bool) -> None:
        ops, self.ops = self.ops, []
        doomed = [r["id"] for r in (*self.plan.vanished.values(), *self.plan.vanished_other)] if final else []
        vecs = {e.name: self.store.vectors(e.name) for e in self.encoders}
        train = final and any(v.training_due(self.cfg.train_min) for v in vecs.values())
        if ops or doomed or train:
            with self.timed("store"):
                self.store.commit(vecs, lambda db: self._apply(db, ops, doomed, vecs, final))
        self.summary.removed += len(doomed)
        self.commit_at = self._commit_threshold()
        self.last_commit = time.monotonic()

    def _apply(self, db: Any, ops: list[_Op], doomed: list[int], vecs: dict[str, VectorIndex],
               final: bool) -> set[str]:
        """Inside the commit transaction: rows first (inserts get their ids), then the same
        changes to the in-memory vectors. Returns the encoder names whose vectors changed."""
        removals: dict[str, list[int]] = {n: list(doomed) for n in vecs}
        additions: dict[str, list[tuple[int, np.ndarray]]] = {n: [] for n in vecs}
        next_id = 1 + next(iter(db.query("SELECT COALESCE(MAX(id), 0) m FROM images")))["m"]
        inserts, booked = [], []
        for op in ops:
            if op.id is None:  # explicit ids = SQLite's own choice (max + 1), inserted in bulk
                op.id, next_id = next_id, next_id + 1
                inserts.append(dict(op.row, id=op.id))
            else:
                db["images"].update(op.id, op.row)
            for name in vecs if op.drop_vectors else op.vectors:
                removals[name].append(op.id)
            for name, v in op.vectors.items():
                additions[name].append((op.id, v))
                booked.append({"image_id": op.id, "encoder_id": self.enc_ids[name]})
            if op.drop_vectors:
                db.execute("DELETE FROM embeddings WHERE image_id=?", [op.id])
        dbm.insert_rows(db, "images", inserts)
        dbm.insert_rows(db, "embeddings", booked, ignore=True)
        _delete_rows(db, doomed)
        changed: set[str] = set()
        for name, vec in vecs.items():
            if removals[name] and vec.remove(np.array(removals[name], np.int64)):
                changed.add(name)
            if additions[name]:
                vec.add(np.array([i for i, _ in additions[name]], np.int64),
                        np.stack([v for _, v in additions[name]]))
                changed.add(name)
            if final and vec.maybe_train(self.cfg.train_min):
                changed.add(name)
        return changed


@contextlib.contextmanager
def _gc_frozen() -> Iterator[None]:
    """Everything alive before the pass (the models, the compiler's state, the plan) moved to
    Python's permanent GC generation for its duration. A full collection otherwise walks all of
    it, holding the GIL -- every thread of the pass stops, the one feeding the GPU included --
    and the pass's per-file objects trigger several: indexing 20,000 small files with a fake
    encoder on the 2-core CPU spent 1.15-1.22 s of a 7.0-7.8 s pass in 4 full collections
    (docs/indexing.md).
    Objects that die meanwhile are still freed by reference counting; the rest after the pass.
    Where a heap is frozen already (`clipfp8 serve` freezes its start-up heap; a concurrent
    pass), the pass freezes nothing more: what it froze could not be unfrozen alone, and every
    re-index of a server would leave its leftovers frozen for good (cycles never collected)."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _delete_rows(db: Any, ids: list[int]) -> None:
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        marks = ",".join("?" * len(chunk))
        db.execute(f"DELETE FROM embeddings WHERE image_id IN ({marks})", chunk)
        db.execute(f"DELETE FROM images WHERE id IN ({marks})", chunk)
