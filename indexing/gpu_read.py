"""Stage 1 of the GPU data path: files read, hashed and header-checked ahead of the device.

``DeviceReads`` feeds ``GpuDecoder``: it reads files in task order with bounded prefetch (at most
``lookahead`` files and ``max_bytes_in_flight`` bytes), checks each JPEG header
(``fileread.read_for_device``), turns the bytes the device will decode into uint8 tensors, and
sends every file the header check refuses (and every non-JPEG) through the CPU decoder
(``ImageDecoder``), whose rules and error reasons then apply unchanged.

Where the reading runs: ``read_processes`` = 0 (the default), on up to ``max_readers`` threads of
this process; > 0, in that many reader processes (forkserver); either way ``read_many`` over
chunks of JPEGs, only the CPU fallbacks going to the threads one by one. Reader threads spend ~0.3 ms of Python per
file holding the GIL that the thread issuing the device work needs as well (on the H200, eight
reader threads indexed slower than four: docs/benchmarks.md); processes take that off this
process at the price of sending each file's bytes through a pipe.
"""
from __future__ import annotations

import logging
import multiprocessing
import sys
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, InvalidStateError, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from clipfp8.indexing.decode import Decoded, DecodeTask, ImageDecoder
from clipfp8.indexing.fileread import ReadJob, ReadResult, read_for_device, read_many

log = logging.getLogger(__name__)

JPEG_SUFFIXES = (b".jpg", b".jpeg", b".jpe", b".jfif")
#: Files per reader-process task at most: many enough that the per-task cost (pickling, a
#: future) is small beside the files', few enough to keep every process busy.
READ_CHUNK = 16
#: A file's ``skip_hashes`` (content already embedded) travel to the reader processes only when
#: this small; a larger set (a moved folder: every vanished hash) is checked here instead, or
#: pickling it with every chunk would cost more than the reading.
SHIPPED_SKIP_HASHES = 64


@dataclass
class Item:
    """A file on its way: ``out`` is final unless ``data`` (the JPEG bytes, uint8 (n,) on the
    CPU) awaits the device, which must decode it to ``shape`` (3, height, width) as its header
    says. ``held``: bytes counted against ``max_bytes_in_flight`` (the scanned size) until the
    device is done."""

    task: DecodeTask
    out: Decoded
    held: int
    data: torch.Tensor | None = None
    shape: tuple[int, int, int] | None = None


class Budget:
    """Bytes in flight (``max_bytes_in_flight``), shared by the reading generator and the decode
    thread, which gives a batch's bytes back once nvJPEG is done with them."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


def _mp_context() -> multiprocessing.context.BaseContext:
    # Not fork: this process has CUDA and threads. The forkserver starts once, light (it imports
    # nothing of ours until a task names ``fileread.read_many``).
    return multiprocessing.get_context("forkserver" if sys.platform.startswith("linux") else "spawn")


class DeviceReads:
    """Reading for ``GpuDecoder``. ``cpu``: the CPU decoder (its limits apply here, and it
    decodes the files the device must not); ``count(route, n)``: route statistics."""

    def __init__(self, cpu: ImageDecoder, count: Callable[[str, int], None], max_readers: int = 4,
                 max_bytes_in_flight: int = 1 << 30, read_processes: int = 0) -> None:
        if read_processes < 0:
            raise ValueError(f"DeviceReads: read_processes must be >= 0, got {read_processes}")
        self.cpu, self._count = cpu, count
        self.max_readers, self.read_processes = max(1, max_readers), read_processes
        self.max_bytes_in_flight = max(max_bytes_in_flight, cpu.max_file_bytes)

    # ----- one file ------------------------------------------------------------------------------
    def _job(self, task: DecodeTask, ship_skips: bool = True) -> ReadJob:
        skips = frozenset(task.skip_hashes) if ship_skips or len(task.skip_hashes) <= SHIPPED_SKIP_HASHES else frozenset()
        return ReadJob(str(task.path), skips, self.cpu.max_file_bytes, self.cpu.max_pixels, self.cpu.max_aspect)

    def item(self, task: DecodeTask, held: int) -> Item:
        """Read + hash + header check of one file here (a reader thread); refused files are
        finished by the CPU path, the others keep their bytes for the device."""
        if not _is_jpeg(task):
            self._count("cpu:not_jpeg", 1)
            return Item(task, self.cpu(task), held)
        item, refused = self._convert(task, held, read_for_device(self._job(task)))
        return self.fallback(item) if refused else item

    def _convert(self, task: DecodeTask, held: int, res: ReadResult) -> tuple[Item, bool]:
        """(the file as an ``Item``, whether the CPU path must take it). The byte tensor is made
        on a reader's thread (or the pool's result thread): every torch call releases and retakes
        the GIL, and the thread that issues the device work must not queue for it per file."""
        out = Decoded(task.entry)
        item = Item(task, out, held)
        if res.sha256 is not None and res.sha256 in task.skip_hashes:  # checked here when not shipped
            res = ReadResult(res.sha256, read_s=res.read_s, seconds=res.seconds)
        out.sha256, out.error, out.seconds = res.sha256, res.error, res.seconds
        if res.read_s is not None:
            out.parts["read"] = res.read_s
        if res.header_s is not None:
            out.parts["header"] = res.header_s
        if res.unexpected:
            log.warning("unexpected error reading %s: %s", task.path, res.error)
        if res.refusal is not None:
            self._count(f"cpu:{res.refusal}", 1)
            return item, True
        if res.data is not None:
            item.data = torch.frombuffer(bytearray(res.data), dtype=torch.uint8)
            item.shape = (3, res.height, res.width)
            out.width, out.height = res.width, res.height
        return item, False

    def fallback(self, item: Item) -> Item:
        """The CPU path for this file (it reads the file again: its rules, its reasons)."""
        fresh, out = self.cpu(item.task), item.out
        # In place: a deferred file's ``Decoded`` is already in the caller's hands.
        out.sha256, out.width, out.height = fresh.sha256, fresh.width, fresh.height
        out.tensors, out.error = fresh.tensors, fresh.error
        out.seconds = fresh.seconds + sum(out.parts.values())
        for part, sec in fresh.parts.items():
            out.parts[part] = out.parts.get(part, 0.0) + sec
        item.data = None
        return item

    # ----- the stream ------------------------------------------------------------------------------
    def stream(self, tasks: Iterable[DecodeTask], workers: int, lookahead: int,
               budget: Budget) -> Generator[Item | None, None, None]:
        """An ``Item`` per task, in order, with at most ``lookahead`` files and
        ``max_bytes_in_flight`` bytes (``budget``) in flight. Yields None when the byte budget is
        spent and nothing is being read: the caller must then decode what it holds."""
        threads = max(1, min(workers, self.max_readers))
        ex = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gpu-read")
        procs = None
        try:
            procs = ProcessPoolExecutor(self.read_processes, mp_context=_mp_context()) if self.read_processes else None
            yield from self._stream(tasks, lookahead, budget, _Chunks(self, procs, ex, lookahead))
        finally:  # closed early: chunks and files not started are dropped (their slots were cancelled)
            if procs is not None:
                procs.shutdown(wait=True, cancel_futures=True)
            ex.shutdown(wait=True, cancel_futures=True)

    def _stream(self, tasks: Iterable[DecodeTask], lookahead: int, budget: Budget,
                chunks: _Chunks) -> Generator[Item | None, None, None]:
        it = iter(tasks)
        nxt = next(it, None)
        pending: deque[Future[Item]] = deque()
        try:
            while True:
                while nxt is not None and len(pending) < max(1, lookahead) and (
                        budget.value == 0 or budget.value + nxt.entry.size <= self.max_bytes_in_flight):
                    budget.add(nxt.entry.size)
                    pending.append(chunks.add(nxt, nxt.entry.size))
                    nxt = next(it, None)
                chunks.flush(pending[0] if pending else None, ending=nxt is None)
                if pending:
                    yield pending.popleft().result()
                elif nxt is None:
                    return
                else:
                    yield None
        finally:
            for fut in pending:
                fut.cancel()


class _Chunks:
    """Where ``DeviceReads`` sends its files: JPEGs in chunks of up to ``READ_CHUNK`` (one
    ``read_many`` task each) to the reader processes, or without them to the reader threads;
    non-JPEGs and the files the header check refuses to the threads one by one (the CPU path).
    Chunks on threads too: a task per file cost the process a ``Future``, a queue hop and a
    callback each, all holding the GIL that the thread feeding the GPU needs."""

    def __init__(self, reads: DeviceReads, procs: ProcessPoolExecutor | None, threads: ThreadPoolExecutor,
                 lookahead: int = 4 * READ_CHUNK) -> None:
        self.reads, self.procs, self.threads = reads, procs, threads
        self.waiting: list[tuple[DecodeTask, int, Future[Item]]] = []
        self.broken = False  # the reader processes failed: every later file goes to a thread alone
        # Small enough that the lookahead holds a chunk for every reader and one more each.
        readers = reads.read_processes if procs is not None else threads._max_workers
        self.chunk = max(1, min(READ_CHUNK, lookahead // (2 * max(1, readers))))

    def add(self, task: DecodeTask, held: int) -> Future[Item]:
        if self.broken or not _is_jpeg(task):
            return self.threads.submit(self.reads.item, task, held)
        slot: Future[Item] = Future()
        self.waiting.append((task, held, slot))
        if len(self.waiting) >= self.chunk:
            self.flush(None, ending=True)
        return slot

    def flush(self, oldest: Future[Item] | None, ending: bool) -> None:
        """Send the waiting files when a chunk is full, at the end, or when the caller's next
        file (``oldest``) is among them -- it would otherwise wait for a file never sent."""
        if not self.waiting:
            return
        if not (ending or oldest is self.waiting[0][2]):
            return
        batch, self.waiting = self.waiting, []
        if self.procs is None:  # threads: skip sets go by reference, nothing is pickled
            try:
                fut = self.threads.submit(read_many, [self.reads._job(t) for t, _, _ in batch])
            except RuntimeError as e:  # the stream is closing: nobody waits for these slots
                for _, _, slot in batch:
                    _settle(slot, exc=e)
                return
        else:
            try:
                fut = self.procs.submit(read_many, [self.reads._job(t, ship_skips=False) for t, _, _ in batch])
            except Exception as e:  # broken or shut down, or a process could not start (e.g. EMFILE)
                self._on_threads(batch, e)
                return
        fut.add_done_callback(lambda f: self._done(batch, f))

    def _done(self, batch: list[tuple[DecodeTask, int, Future[Item]]], fut: Future[list[ReadResult]]) -> None:
        """The chunk's results (on the reader thread that read it, or the process pool's result
        thread): items for the device at once; refused files to the CPU path, right here on a
        reader thread (a task queued behind the other chunks could keep the caller waiting for
        its next file), else on the reader threads."""
        if fut.cancelled():  # the stream closed early: nobody waits for these
            for _, _, slot in batch:
                _settle(slot, exc=RuntimeError("read cancelled"))
            return
        try:
            results = fut.result()
        except BaseException as e:  # a reader process died (BrokenProcessPool): read here instead
            self._on_threads(batch, e)
            return
        for (task, held, slot), res in zip(batch, results, strict=True):
            try:
                item, refused = self.reads._convert(task, held, res)
                if refused and self.procs is None:
                    _settle(slot, self.reads.fallback(item))
                elif refused:
                    _chain(self.threads.submit(self.reads.fallback, item), slot)
                else:
                    _settle(slot, item)
            except BaseException as e:  # noqa: BLE001 - handed to the reader of this slot
                _settle(slot, exc=e)

    def _on_threads(self, batch: list[tuple[DecodeTask, int, Future[Item]]], why: BaseException) -> None:
        """Read ``batch`` on the threads one file each; after a reader-process failure, every
        later file too (a failed thread chunk, which ``read_many`` does not let happen for a
        bad file, costs only its own batch)."""
        if self.procs is not None:
            if not self.broken:
                log.warning("reader processes failed (%r); reading on threads from here", why)
            self.broken = True
        for task, held, slot in batch:
            try:
                _chain(self.threads.submit(self.reads.item, task, held), slot)
            except RuntimeError as e:  # the stream is closing: nobody waits for this slot
                _settle(slot, exc=e)


def _is_jpeg(task: DecodeTask) -> bool:
    """Whether the file's name says JPEG (only those go to the device's decoder)."""
    return task.entry.rel.lower().endswith(JPEG_SUFFIXES)


def _settle(slot: Future[Item], item: Item | None = None, exc: BaseException | None = None) -> None:
    """Complete ``slot`` unless the stream cancelled it (closed early)."""
    try:
        if exc is not None:
            slot.set_exception(exc)
        else:
            slot.set_result(item)  # type: ignore[arg-type]  # an Item whenever exc is None
    except InvalidStateError:
        pass


def _chain(src: Future[Item], slot: Future[Item]) -> None:
    def copy(f: Future[Item]) -> None:
        if f.cancelled():
            _settle(slot, exc=RuntimeError("read cancelled"))
        elif f.exception() is not None:
            _settle(slot, exc=f.exception())
        else:
            _settle(slot, f.result())
    src.add_done_callback(copy)


__all__ = ["DeviceReads", "Item", "Budget", "READ_CHUNK", "JPEG_SUFFIXES"]
