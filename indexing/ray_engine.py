"""``index --engine ray``: read, decode and embed in a Ray actor pool; scan, plan and store stay here.

The driver (this process) runs the same ``pipeline._Run`` as the local engine -- scan, plan
against the database, commit points, crash safety -- with ``RayDecoder`` as its decoder: the
files to read become a Ray Dataset of (path, size, mtime) records, ``map_batches`` sends them
through an actor pool (``_Worker``: on CUDA one GPU per actor, one actor per GPU; else a few
CPU actors), and the results stream back in task order. Each actor builds its encoders once,
from picklable recipes (an ``EncoderSpec``, rebuilt with ``create_encoder``; or a test encoder
without a spec, e.g. ``FakeEncoder``, pickled), and runs the local decode stage
(``gpu_decode.make_decoder``: Pillow, or nvJPEG on CUDA) and ``embed.embed_batch``, so bad files
get the same reasons and report rows as in one process. A file's vectors come back as its
``Decoded.tensors`` (name -> float32 (D,)); ``RemoteEncoder``, the driver's stand-in for each
encoder, hands them through ``encode_images`` unchanged, so batching, row order (ids follow the
sorted paths) and commits are the pipeline's own.

Each actor works on ``ACTOR_CALLS`` batches at once on threads (one decodes while another is on
the encoders); the pool starts only when every actor has built and warmed its encoders.

Failures: an actor that dies is restarted and its batches retried (``RETRIES``); an exception in
a batch fails the run (a bug, not a bad file: bad files are results). The driver commits only
what came back, in order, so a killed driver resumes like the local engine. Docs:
docs/indexing.md ("On a Ray cluster").
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import torch

from clipfp8.indexing import _testhooks
from clipfp8.indexing.config import IndexConfig
from clipfp8.indexing.decode import Decoded, DecodeTask, imap_bounded
from clipfp8.indexing.embed import embed_batch
from clipfp8.indexing.errors import IndexConfigError, IndexingError
from clipfp8.indexing.gpu_decode import make_decoder
from clipfp8.indexing.scan import FileEntry
from clipfp8.quant.core.config import EncoderSpec
from clipfp8.quant.core.cuda_env import widen_device_queues
from clipfp8.quant.core.encoder import Encoder, EncoderIdentity, create_encoder

log = logging.getLogger(__name__)

#: Times a dead actor is restarted, and a batch retried, before the run fails.
RETRIES = 3
#: Most CPU actors (each reserves ``min(workers, CPUs / 2)`` CPUs for its decode threads and torch).
MAX_CPU_ACTORS = 8
#: Batches each actor works on at once: one decodes while the other is on the encoders.
ACTOR_CALLS = 2
#: How long the pool waits for all its actors to build and warm their encoders (a hub download
#: included) before Ray gives up on the run.
ACTOR_START_TIMEOUT_S = 1800
#: What an actor builds an encoder from: a spec (``create_encoder``) or a picklable test encoder.
Recipe = EncoderSpec | Encoder


@contextmanager
def connect(address: str | None) -> Iterator[None]:
    """Joins the Ray cluster at ``address`` (None: ``RAY_ADDRESS``, else a cluster started on this
    machine with ``ray start``, else a new local instance) for the block, unless this process is
    connected already (then that connection is used and kept)."""
    if ray.is_initialized():
        if address:
            log.warning("--ray-address %s ignored: this process is connected to a Ray cluster already", address)
        yield
        return
    try:
        ray.init(address=address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise IndexConfigError(f"--ray-address {address or '(default)'}: cannot join a Ray cluster: {e}") from e
    try:
        yield
    finally:
        ray.shutdown()


def cluster_device() -> str:
    """``cuda`` when the connected cluster has GPUs, else ``cpu`` (what ``auto`` means for actors)."""
    return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"


class RemoteEncoder(Encoder):
    """The driver's stand-in for an encoder that runs in the actors: what the index records
    (identity, spec) and an ``encode_images`` that returns its input, the float32 (N, D) vectors
    the actors computed (``RayDecoder`` puts each file's (D,) vector where a local decoder puts
    its pixels)."""

    def __init__(self, identity: EncoderIdentity, image_size: tuple[int, int], spec: EncoderSpec | None) -> None:
        self.name, self.precision, self.dim = identity.name, identity.precision, identity.dim
        self.device, self.image_size, self.spec = "cpu", image_size, spec
        self._identity = identity

    def identity(self) -> EncoderIdentity:
        return self._identity

    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        if images.ndim != 2 or images.shape[1] != self.dim:
            raise ValueError(f"{self.name}: expected embedded vectors (N, {self.dim}), got {tuple(images.shape)}")
        return images.cpu().numpy().astype(np.float32, copy=False)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError(f"{self.name} runs in the Ray actors; build it with create_encoder to encode texts")

    def preprocess(self, image: Any) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} runs in the Ray actors; it preprocesses there")


def _build(recipe: Recipe) -> Encoder:
    return create_encoder(recipe) if isinstance(recipe, EncoderSpec) else recipe


def _describe(recipes: Sequence[Recipe]) -> list[tuple[EncoderIdentity, tuple[int, int]]]:
    """Runs where the actors run: builds each encoder once for what the index records."""
    return [(e.identity(), tuple(e.image_size)) for e in map(_build, recipes)]  # type: ignore[misc]


def records_for(tasks: Sequence[DecodeTask], names: Sequence[str]) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """One record per task (``_Worker``'s input columns; ``names``: the encoders, in bit order)
    and the skip sets of more than one hash (the plan's move candidates: one set shared by every
    new file), sent to the actors once.

    A file whose hash is in its skip set is only hashed, as in one process -- except files of a
    size that two such tasks share: two new files can claim one moved file only if they are
    copies, so of equal size, and the later one must then be embedded after all
    (``RayDecoder.__call__``); those are decoded and embedded in full."""
    sizes = Counter(t.entry.size for t in tasks if t.skip_hashes)
    sets: dict[int, int] = {}  # id of a shared skip set (alive in ``tasks``) -> its index in table
    table: list[list[str]] = []
    records = []
    for i, t in enumerate(tasks):
        skip = frozenset() if sizes[t.entry.size] > 1 else t.skip_hashes
        k = -1
        if len(skip) > 1:
            k = sets.setdefault(id(skip), len(table))
            if k == len(table):
                table.append(sorted(skip))
        needs = t.needs if t.needs is not None else names
        records.append({"idx": i, "rel": t.entry.rel, "size": t.entry.size, "mtime_ns": t.entry.mtime_ns,
                        "skip": next(iter(skip)) if len(skip) == 1 else "", "skip_set": k,
                        "needs": sum(1 << b for b, n in enumerate(names) if n in needs)})
    return records, table


class _Worker:
    """One actor: builds its encoders once, then reads, decodes and embeds batches of files.

    Input batch columns: ``idx`` (task number), ``rel`` (path under ``root``, bytes), ``size``,
    ``mtime_ns``, ``skip`` (one hash whose file needs no decode, or ""), ``skip_set`` (index into
    ``skip_sets``, or -1), ``needs`` (bit i: embed with encoder i). Output: see ``_columns``."""

    def __init__(self, recipes: list[Recipe], root: str, cfg: IndexConfig, skip_sets: list[list[str]],
                 test_env: dict[str, str]) -> None:
        t0 = time.perf_counter()
        os.environ.update(test_env)  # the driver's test hooks (empty outside tests)
        widen_device_queues()  # before the encoders start CUDA in this actor
        self.encoders = [_build(r) for r in recipes]
        self.decoder = make_decoder(self.encoders, cfg)
        self.root, self.cfg = os.fsencode(root), cfg
        self.skip_sets = [frozenset(s) for s in skip_sets]
        # Compile (a stored engine: seconds of loading) before the first batch, as one process does.
        for enc in self.encoders:
            enc.warm_up_images(cfg.batch_size)
        # Ray runs ACTOR_CALLS batches at once on threads; the encoders take one batch at a time
        # (queued and waited for under the lock: an encoder returns results in call order), so
        # the other batch decodes meanwhile. On the CPU the calls share the decode threads.
        self._encode_lock = threading.Lock()
        on_cpu = all(str(e.device) == "cpu" for e in self.encoders)
        self.workers = max(1, cfg.workers // ACTOR_CALLS) if on_cpu else cfg.workers
        #: Seconds from the actor's start to ready, reported once with its first batch, with
        #: the actor's id (a restarted actor reports again; the driver keeps the first).
        self._start_seconds: float | None = time.perf_counter() - t0
        self._actor = ray.get_runtime_context().get_actor_id() or ""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tasks, needs = [], []
        for i, rel in enumerate(batch["rel"]):
            entry = FileEntry(bytes(rel), int(batch["size"][i]), int(batch["mtime_ns"][i]))
            k, one = int(batch["skip_set"][i]), str(batch["skip"][i])
            skip = self.skip_sets[k] if k >= 0 else frozenset([one] if one else [])
            tasks.append(DecodeTask(entry, Path(os.fsdecode(os.path.join(self.root, entry.rel))), skip))
            needs.append({e.name for b, e in enumerate(self.encoders) if int(batch["needs"][i]) >> b & 1})
        run = getattr(self.decoder, "imap", None) or partial(imap_bounded, self.decoder)
        done: list[Decoded] = list(run(tasks, self.workers, self.cfg.effective_lookahead))
        todo = [i for i, d in enumerate(done) if d.error is None and d.tensors]  # not skipped by hash
        vectors: dict[int, dict[str, np.ndarray]] = {}
        if todo:
            with self._encode_lock:
                res = embed_batch(self.encoders, [done[i].tensors for i in todo], [needs[i] for i in todo])
            share = sum(res.seconds.values()) / len(todo)  # each file's part of the batch's embedding
            for i, v in zip(todo, res.vectors, strict=True):
                vectors[i] = v
                done[i].parts["embed"] = share
                done[i].seconds += share
        _testhooks.checkpoint("ray:batch_embedded")
        with self._encode_lock:
            start, self._start_seconds = self._start_seconds, None
        return self._columns(batch["idx"], done, vectors, start)

    def _columns(self, idx: np.ndarray, done: list[Decoded], vectors: dict[int, dict[str, np.ndarray]],
                 start: float | None) -> dict[str, np.ndarray]:
        """``idx``, ``sha256``/``error`` ("" for none), ``width``/``height`` (-1 for none),
        ``seconds``, ``parts`` (JSON), ``start`` (float64 (N,): the actor's start-up seconds on
        the first row of its first batch, else 0) with ``actor`` (its Ray actor id there, else
        ""), and per encoder i ``v{i}`` float32 (N, D) with ``h{i}`` (bool (N,): row i holds a
        vector)."""
        first = np.zeros(len(done), np.float64)
        actor = np.array([""] * len(done), dtype=object)
        if start is not None and len(done):
            first[0], actor[0] = start, self._actor
        out: dict[str, np.ndarray] = {
            "start": first, "actor": actor,
            "idx": np.asarray(idx, np.int64),
            "sha256": np.array([d.sha256 or "" for d in done], dtype=object),
            "error": np.array([d.error or "" for d in done], dtype=object),
            "width": np.array([-1 if d.width is None else d.width for d in done], np.int64),
            "height": np.array([-1 if d.height is None else d.height for d in done], np.int64),
            "seconds": np.array([d.seconds for d in done], np.float64),
            "parts": np.array([json.dumps(d.parts) for d in done], dtype=object)}
        for b, enc in enumerate(self.encoders):
            has = np.array([enc.name in vectors.get(i, {}) for i in range(len(done))], bool)
            vec = np.zeros((len(done), enc.dim), np.float32)
            for i in np.flatnonzero(has):
                vec[i] = vectors[int(i)][enc.name]
            out[f"v{b}"], out[f"h{b}"] = vec, has
        return out


class RayDecoder:
    """The pipeline's decoder for ``--engine ray``: ``imap`` sends the files through the actor
    pool and yields each file's ``Decoded`` in task order, with the vectors as its ``tensors``.
    Construct it connected (``connect``): it describes the encoders on the cluster (one
    short-lived task builds them once, where the actors will) for ``encoders``, the driver-side
    ``RemoteEncoder``s whose identities and specs the index records."""

    def __init__(self, given: Sequence[Recipe], root: Path, cfg: IndexConfig) -> None:
        specs = [g if isinstance(g, EncoderSpec) else g.spec for g in given]
        on_gpu = cluster_device() == "cuda" and any(isinstance(g, EncoderSpec) for g in given) \
            and all(s is None or s.device != "cpu" for s in specs)
        self.label = "ray:gpu" if on_gpu else "ray:cpu"
        device = "cuda" if on_gpu else "cpu"  # inside an actor, its one GPU is cuda:0
        # A spec is rebuilt in each actor; only an encoder made without one travels as itself.
        self.recipes: list[Recipe] = [dataclasses.replace(s, device=device) if s is not None else g
                                      for g, s in zip(given, specs, strict=True)]
        self.resources: dict[str, Any] = {"num_gpus": 1} if on_gpu else {"num_cpus": self._cpus_per_actor(cfg)}
        self.actors = self._pool_size(on_gpu)
        self.root, self.cfg = root, cfg
        self.encoders = [RemoteEncoder(ident, size, s) for (ident, size), s in zip(self._describe(given), specs, strict=True)]
        self._last: Decoded | None = None
        #: The longest first start-up (build, compile and warm the encoders) of an actor in this
        #: run -- the pool waits for all of them before its first batch: ``pipeline`` reports it as
        #: the warm-up, as it does one process's encoder warm-up. A restart's is not counted.
        self.warmup_seconds = 0.0
        self._started: set[str] = set()

    def _describe(self, given: Sequence[Recipe]) -> list[tuple[EncoderIdentity, tuple[int, int]]]:
        found: dict[int, tuple[EncoderIdentity, tuple[int, int]]] = {}
        remote = [i for i, g in enumerate(given) if isinstance(g, EncoderSpec)]
        if remote:  # max_calls=1: the worker exits afterwards, so it holds no GPU memory
            task = ray.remote(max_calls=1, **self.resources)(_describe)
            described: list[tuple[EncoderIdentity, tuple[int, int]]] = ray.get(task.remote([self.recipes[i] for i in remote]))
            found.update(zip(remote, described, strict=True))
        return [found[i] if i in found else _describe([g])[0] for i, g in enumerate(given)]

    def _cpus_per_actor(self, cfg: IndexConfig) -> int:
        return max(1, min(cfg.workers, int(ray.cluster_resources().get("CPU", 1)) // 2))

    def _pool_size(self, on_gpu: bool) -> int:
        total = ray.cluster_resources()
        if on_gpu:
            return max(1, int(total.get("GPU", 1)))
        # One CPU stays free for Ray Data's own tasks and the describe task.
        spare = int(total.get("CPU", 1)) - 1
        return max(1, min(MAX_CPU_ACTORS, spare // self.resources["num_cpus"]))

    def imap(self, jobs: Iterable[DecodeTask], workers: int, lookahead: int) -> Iterator[Decoded]:
        """``Decoded`` of each job, in order (``workers``/``lookahead``: the actors' own, from
        ``cfg``). Raises ``IndexingError`` when the pool hands back fewer results than jobs."""
        tasks = list(jobs)
        if not tasks:
            return
        pending: dict[int, Decoded] = {}
        nxt = 0
        for out in self._dataset(tasks).iter_batches(batch_size=None, batch_format="numpy"):
            self._note_starts(out)
            for j, idx in enumerate(out["idx"]):
                pending[int(idx)] = self._decoded(out, j, tasks[int(idx)])
            while nxt in pending:  # the pool may finish batches out of order
                self._last = pending.pop(nxt)
                nxt += 1
                yield self._last
        if nxt != len(tasks):
            raise IndexingError(f"the Ray actor pool returned {nxt} of {len(tasks)} files")

    def _note_starts(self, out: dict[str, np.ndarray]) -> None:
        for j in np.flatnonzero(out["start"] > 0):
            actor = str(out["actor"][j])
            if actor not in self._started:
                self._started.add(actor)
                self.warmup_seconds = max(self.warmup_seconds, float(out["start"][j]))

    def __call__(self, task: DecodeTask) -> Decoded:
        """The pipeline asks again for the file just handed over when the moved file its hash
        matched was claimed by an earlier copy; ``records_for`` had the actors decode every such
        possible copy in full, so that answer is complete."""
        last = self._last
        if last is None or last.entry != task.entry or (last.error is None and not last.tensors):
            raise IndexingError(f"{task.path}: the Ray engine cannot decode a file outside its dataset")
        return last

    def _dataset(self, tasks: list[DecodeTask]) -> ray.data.Dataset:
        records, table = records_for(tasks, [e.name for e in self.encoders])
        blocks = max(1, math.ceil(len(records) / self.cfg.batch_size))
        with warnings.catch_warnings():
            # Ray 2.60 (pinned) warns that remote args move elsewhere in 2.64; its own defaults
            # (unbounded restarts and retries) would loop forever on a file that kills the actor.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            ds = ray.data.from_items(records, override_num_blocks=blocks).map_batches(
                _Worker, batch_size=self.cfg.batch_size, compute=ray.data.ActorPoolStrategy(
                    size=self.actors, max_concurrent_calls_per_actor=ACTOR_CALLS, enable_true_multi_threading=True),
                fn_constructor_kwargs={"recipes": self.recipes, "root": str(self.root), "cfg": self.cfg,
                                       "skip_sets": table, "test_env": _testhooks.forwarded_env()},
                max_restarts=RETRIES, max_task_retries=RETRIES, **self.resources)
        ctx = ds.context  # this dataset's settings; the process-wide DataContext stays as it is
        ctx.enable_progress_bars = False  # the CLI shows its own
        ctx.max_errored_blocks = 0  # never drop a batch: its files would silently stay unindexed
        ctx.actor_task_retry_on_errors = False  # a Python exception in a batch is a bug: fail loudly
        # Start on the first batch only when every actor is ready, so that a run's timed pass holds
        # no actor's start-up (reported as the warm-up instead).
        ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
        return ds

    def _decoded(self, out: dict[str, np.ndarray], j: int, task: DecodeTask) -> Decoded:
        d = Decoded(task.entry, sha256=str(out["sha256"][j]) or None, error=str(out["error"][j]) or None,
                    seconds=float(out["seconds"][j]), parts=json.loads(str(out["parts"][j])))
        w, h = int(out["width"][j]), int(out["height"][j])
        d.width, d.height = (w, h) if w >= 0 else (None, None)
        d.tensors = {e.name: torch.from_numpy(np.array(out[f"v{b}"][j], np.float32))
                     for b, e in enumerate(self.encoders) if out[f"h{b}"][j]}
        return d


__all__ = ["RayDecoder", "RemoteEncoder", "connect", "cluster_device", "records_for", "RETRIES", "Recipe"]
