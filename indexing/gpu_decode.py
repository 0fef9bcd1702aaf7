"""Stage 2 on the GPU: batched nvJPEG decode and preprocessing on the encoders' device.

``GpuDecoder`` is a ``Decoder`` whose ``imap`` runs three overlapping steps:

1. ``gpu_read.DeviceReads`` reads and hashes files on a few threads, or in reader processes
   (bounded prefetch: at most ``lookahead`` files and ``max_bytes_in_flight`` bytes), and checks
   each JPEG header (``jpeg_header.gpu_refusal``: the ``max_pixels`` bomb guard, EXIF rotation,
   CMYK, truncation...);
2. one decode thread decodes each batch with ``torchvision.io.decode_jpeg(list, device=...)``
   (nvJPEG on CUDA) as soon as it is formed, a few batches ahead; the caller's thread then
   preprocesses it on the device (``gpu_transform``, the encoders' own open_clip transform) on
   a high-priority side stream, without waiting for the device, while the previous batch is
   still being encoded (``Encoder.encode_images_async``);
3. the caller receives ``Decoded`` items in task order whose tensors live on the device.

Every file the header check refuses, and every file nvJPEG fails on, goes through the CPU path
(``ImageDecoder``, Pillow) unchanged: same pixels, same error reasons. The device is a parameter,
so the same code runs on the CPU (libjpeg via torchvision) for tests.
``choose_decoder`` picks this decoder or the CPU one (``IndexConfig.decode``).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from clipfp8.indexing.config import IndexConfig
from clipfp8.indexing.decode import Decoded, Decoder, DecodeTask, ImageDecoder
from clipfp8.indexing.errors import IndexConfigError
from clipfp8.indexing.gpu_read import JPEG_SUFFIXES, DeviceReads
from clipfp8.indexing.gpu_read import Budget as _Budget
from clipfp8.indexing.gpu_read import Item as _Item
from clipfp8.indexing.gpu_transform import SizeGroup, TransformSpec, preprocess_groups, stack_by_size, transform_spec
from clipfp8.quant.core.cuda_env import queue_warning
from clipfp8.quant.core.encoder import Encoder

log = logging.getLogger(__name__)

@dataclass
class _Streams:
    """``decode``: where the decode thread's nvJPEG output lands; ``pre``: high priority, where
    the caller's thread preprocesses (waiting on ``decode``'s event, not on the host)."""

    decode: Any
    pre: Any


@dataclass
class _Chunk:
    """One ``decode_jpeg`` call's outcome (the decode thread): ``ok``, the files decoded to what
    their headers promised, whose images are stacked per size in ``groups`` (indices into
    ``ok``); ``failed``, the files the device could not decode (they take the CPU path)."""

    ok: list[_Item]
    groups: list[SizeGroup]
    failed: list[_Item]


#: The decode thread's answer for a batch: its chunks, an event on ``_Streams.decode`` that marks
#: their stacks ready (None on the CPU), and the seconds it took.
_Raw = tuple[list[_Chunk], Any, float]


class _Batch:
    """One device batch. Its JPEGs are decoded on the decoder's decode thread as soon as the batch
    is formed (``start``); calling it (``Decoded.pending`` of its files, run once) waits for that
    and preprocesses on the caller's thread, so that a deferring ``imap`` hands files out before
    their pixels exist."""

    def __init__(self, decoder: GpuDecoder, items: list[_Item], streams: _Streams | None,
                 budget: _Budget) -> None:
        self.decoder, self.items, self.streams, self.budget = decoder, items, streams, budget
        self.done = False
        self.future: Future[_Raw] | None = None
        self.then: Callable[[], None] | None = None  # run once this batch is finished
        for it in items:
            if it.data is not None:
                it.out.pending = self

    def start(self, pool: ThreadPoolExecutor | None) -> _Batch:
        """Decode on ``pool`` (one thread) from now on; inline at ``__call__`` without one."""
        if pool is not None and any(it.data is not None for it in self.items):
            self.future = pool.submit(self.raw)
        return self

    def raw(self) -> _Raw:
        """nvJPEG's part (the decode thread, or the caller's): uint8 images on the device."""
        try:
            return self.decoder._decode_raw(self.items, self.streams)
        finally:  # the JPEG bytes are no longer needed
            self.budget.add(-sum(it.held for it in self.items if it.shape is not None))

    def _from_thread(self) -> _Raw | None:
        """The decode thread's answer, waited for; None when it never ran (no thread, or the
        stream was closed before the thread got to it: its pool is shut down)."""
        if self.future is None or self.future.cancelled():
            return None
        return self.future.result()

    def owed(self) -> bool:
        """Some file of this batch still waits for its caller to settle it."""
        return not self.done and any(it.out.pending is self for it in self.items)

    def wait(self) -> None:
        """Block until the decode thread is done with this batch (its bytes are given back)."""
        self._from_thread()

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            raw = self._from_thread()
            if raw is None:
                raw = self.raw()
            self.decoder._finish_group(self.items, raw, self.streams)
            for it in self.items:
                it.out.pending = None
        finally:  # even when it failed: the routes line must still be written
            if self.then is not None:
                self.then()


class GpuDecoder:
    """Batched JPEG decode + preprocess on ``device``, CPU fallback per file.

    ``specs``: encoder name -> its transform's parameters; ``cpu``: the CPU decoder used for
    fallbacks (its limits ``max_pixels``, ``max_file_bytes``, ``max_aspect`` apply here too).
    ``batch_size``: files per device batch; ``max_batch_pixels``: decoded pixels per
    ``decode_jpeg`` call (bounds device memory). ``stats`` counts files by route:
    ``gpu``, ``cpu:<refusal reason>``, ``cpu:device_failed``. Files are read by
    ``gpu_read.DeviceReads``: on up to ``max_readers`` threads, or in ``read_processes``
    reader processes (``--read-processes``).
    """

    def __init__(self, specs: dict[str, TransformSpec], cpu: ImageDecoder, device: str,
                 batch_size: int = 64, max_bytes_in_flight: int = 1 << 30,
                 max_batch_pixels: int = 256_000_000, max_readers: int = 4, read_processes: int = 0) -> None:
        if set(specs) != set(cpu.preprocess):
            raise ValueError(f"GpuDecoder: specs for {sorted(specs)} but CPU preprocess for {sorted(cpu.preprocess)}")
        self.specs, self.cpu, self.device = specs, cpu, torch.device(device)
        self.batch_size = max(1, batch_size)
        self.max_batch_pixels = max_batch_pixels
        self.stats: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.reads = DeviceReads(cpu, self._count, max_readers, max_bytes_in_flight, read_processes)

    @property
    def max_bytes_in_flight(self) -> int:
        """File bytes read ahead of the device at most (``DeviceReads.max_bytes_in_flight``)."""
        return self.reads.max_bytes_in_flight

    @max_bytes_in_flight.setter
    def max_bytes_in_flight(self, value: int) -> None:
        self.reads.max_bytes_in_flight = value

    @property
    def max_readers(self) -> int:
        """Reader threads at most (``DeviceReads.max_readers``)."""
        return self.reads.max_readers

    @max_readers.setter
    def max_readers(self, value: int) -> None:
        self.reads.max_readers = max(1, value)

    # ----- one file --------------------------------------------------------------------------
    def __call__(self, task: DecodeTask) -> Decoded:
        """Decode one file synchronously; on CUDA with the same streams as ``imap`` (the
        caller's current stream is made to wait for its tensors)."""
        item = self.reads.item(task, 0)
        if item.data is not None:
            _Batch(self, [item], self._streams(), _Budget())()
        return item.out

    def _streams(self) -> _Streams | None:
        """The decode and preprocessing streams on CUDA; None on the CPU (one stream there)."""
        if self.device.type != "cuda":
            return None
        return _Streams(torch.cuda.Stream(self.device), torch.cuda.Stream(self.device, priority=-1))

    def _count(self, route: str, n: int = 1) -> None:
        with self._lock:
            self.stats[route] += n

    # ----- batches on the device -------------------------------------------------------------
    def _pixel_chunks(self, items: list[_Item]) -> Iterator[list[_Item]]:
        chunk: list[_Item] = []
        pixels = 0
        for it in items:
            _, h, w = it.shape or (0, 0, 0)
            n = h * w
            if chunk and pixels + n > self.max_batch_pixels:
                yield chunk
                chunk, pixels = [], 0
            chunk.append(it)
            pixels += n
        if chunk:
            yield chunk

    def _decode_jpegs(self, chunk: list[_Item]) -> list[torch.Tensor | None]:
        """uint8 (3, h, w) per file on the device; None where the decoder failed (a batch that
        fails is retried file by file to find the culprits)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        raw = [it.data for it in chunk if it.data is not None]
        try:
            images: list[torch.Tensor | None] = list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            images = []
            for it, r in zip(chunk, raw, strict=True):
                try:
                    images.append(decode_jpeg([r], mode=ImageReadMode.RGB, device=self.device)[0])
                except RuntimeError as e:
                    log.debug("device JPEG decode failed for %s: %s", it.task.path, e)
                    images.append(None)
        for k, (it, im) in enumerate(zip(chunk, images, strict=True)):
            if im is not None and tuple(im.shape) != it.shape:
                images[k] = None  # not what the header promised: let Pillow judge
        return images

    def _preprocess(self, items: list[_Item], groups: list[SizeGroup]) -> list[torch.Tensor]:
        """Fill each item's tensors (one preprocessing per distinct transform, shared by the
        encoders that use it); returns the batch tensors that back them."""
        batches = {spec: preprocess_groups(groups, len(items), spec) for spec in set(self.specs.values())}
        rows = {spec: b.unbind(0) for spec, b in batches.items()}  # one call, not one per file
        for name, spec in self.specs.items():
            for it, row in zip(items, rows[spec], strict=True):
                it.out.tensors[name] = row
        return list(batches.values())

    def _stack(self, chunk: list[_Item], held: list[list[torch.Tensor | None]]) -> _Chunk:
        """Decode ``chunk`` and stack its images per size (the decode thread). The per-file
        images go to ``held``: the caller keeps them until the stacks have run, since nvJPEG
        writes the next chunk on its own stream, unordered with the stacking one."""
        images = self._decode_jpegs(chunk)
        held.append(images)
        ok = [it for it, im in zip(chunk, images, strict=True) if im is not None]
        failed = [it for it, im in zip(chunk, images, strict=True) if im is None]
        try:
            groups = stack_by_size([im for im in images if im is not None]) if ok else []
        except RuntimeError as e:  # e.g. device out of memory: the CPU path still works
            log.warning("device stacking failed (%s); %d files fall back to the CPU", e, len(ok))
            return _Chunk([], [], failed + ok)
        return _Chunk(ok, groups, failed)

    def _decode_raw(self, group: list[_Item], streams: _Streams | None) -> _Raw:
        """nvJPEG's part of a batch (the decode thread): the pending files decoded on the device,
        chunked by ``max_batch_pixels``, their images stacked per size on ``streams.decode``,
        and an event after that. The thread waits for the event (without the GIL) before it
        lets the per-file images go: the stacks have read them, so the allocator may reuse them
        at once and the issuing thread gets a few tensors per batch, not one per file (256
        ``record_stream`` calls there took 15 % of its time in the shipped ``index``)."""
        t0 = time.perf_counter()
        chunks: list[_Chunk] = []
        ready = None
        with torch.no_grad(), (torch.cuda.stream(streams.decode) if streams is not None else nullcontext()):
            for chunk in self._pixel_chunks([it for it in group if it.data is not None]):
                held: list[list[torch.Tensor | None]] = []
                try:
                    chunks.append(self._stack(chunk, held))
                finally:  # per chunk, so at most one chunk's per-file images are alive
                    if streams is not None:
                        ready = torch.cuda.Event()
                        ready.record(streams.decode)
                        ready.synchronize()
                    held.clear()  # the stacks have read them (on the device: waited for above)
        for it in group:
            it.data = None
        return chunks, ready, time.perf_counter() - t0

    def _finish_group(self, group: list[_Item], raw: _Raw, streams: _Streams | None) -> None:
        """Preprocess a decoded batch on the device (the caller's thread, on ``streams.pre``;
        the caller's current stream is made to wait for it, not the host), filling each file's
        ``Decoded.tensors``. Files the device failed on take the CPU path."""
        chunks, ready, decode_s = raw
        items = [it for c in chunks for it in (*c.ok, *c.failed)]
        if not items:
            return
        t0 = time.perf_counter()
        bases: list[torch.Tensor] = []
        failed: list[_Item] = [it for c in chunks for it in c.failed]
        with torch.no_grad(), (torch.cuda.stream(streams.pre) if streams is not None else nullcontext()):
            if streams is not None:
                streams.pre.wait_event(ready)
            for c in chunks:
                if streams is not None:  # made on the decode stream, read here, freed by us
                    for _, stacked in c.groups:
                        stacked.record_stream(streams.pre)
                try:
                    if c.ok:
                        bases += self._preprocess(c.ok, c.groups)
                except RuntimeError as e:  # e.g. device out of memory: the CPU path still works
                    log.warning("device preprocessing failed (%s); %d files fall back to the CPU", e, len(c.ok))
                    failed += c.ok
            if streams is not None:  # the caller's stream waits for it, the host does not
                user = torch.cuda.current_stream(self.device)
                user.wait_stream(streams.pre)
                for b in bases:  # made on the side stream, used and freed on the caller's
                    b.record_stream(user)
        share = (decode_s + time.perf_counter() - t0) / len(items)
        self._count("gpu", len(items) - len(failed))
        for it in items:
            it.out.parts["gpu"] = share
            it.out.seconds += share
        for it in failed:
            it.out.tensors = {}
            self._count("cpu:device_failed")
            self.reads.fallback(it)

    # ----- the stream --------------------------------------------------------------------------
    #: ``imap`` takes ``defer`` (the local pipeline asks for it; Ray's actors do not).
    defers = True
    #: Batches formed, their decode started, beyond the one being handed out.
    decode_ahead = 2

    def imap(self, tasks: Iterable[DecodeTask], workers: int, lookahead: int,
             defer: bool = False) -> Iterator[Decoded]:
        """``Decoded`` for every task, in order (see module doc). Files are read ahead on
        ``min(workers, max_readers)`` threads, or in ``read_processes`` processes. Each device batch is decoded by nvJPEG on one
        decode thread as soon as it is formed, up to ``decode_ahead`` batches ahead of the one
        handed out, then preprocessed in the caller's thread on a high-priority side stream,
        the caller's current stream being made to wait for that work instead of the host.
        Tensors of device-decoded files are views of batch tensors on ``device``, safe to use
        on the caller's stream.

        Why a decode thread, running ahead: torchvision's batched nvJPEG decode waits on the
        host for the device, so on the caller's thread it would keep the next encode from being
        queued. The thread makes one library call per batch, which releases the GIL for the
        whole wait; per-file torch calls stay on the caller's thread, since each one would queue
        for the GIL behind the busy caller (5 ms switch interval). The decode itself is short
        (11 ms per 256 files of 500x375 on the H200) only when nvJPEG's internal streams have
        hardware queues of their own: with CUDA's default of 8 they share one with the encoder
        and each decode waited 120-390 ms behind the queued encode batches (probe, 2026-12-04;
        ``quant.core.cuda_env``, which the CLI applies before CUDA starts).

        ``defer``: hand a batch's files out before preprocessing them, each with
        ``Decoded.pending`` (``decode.settle``), so the caller does its per-file work while the
        device still encodes the previous batch. Batches are finished regardless when the byte
        budget (``max_bytes_in_flight``) runs out."""
        streams = self._streams()
        budget = _Budget()
        owed: deque[_Batch] = deque()  # deferred batches not yet preprocessed, oldest first
        formed: deque[tuple[_Batch, bool]] = deque()  # (batch, starved), not yet handed out

        def release() -> None:  # the byte budget is spent: finish what is owed, drain the thread
            while owed:
                owed.popleft()()
            for b, _ in formed:
                b.wait()

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-decode")
        ended = False
        try:
            with closing(self.reads.stream(tasks, workers, lookahead, budget)) as reads:
                groups = self._groups(reads, budget, release)
                while True:
                    while len(formed) <= self.decode_ahead and not (formed and formed[-1][1]):
                        nxt = next(groups, None)
                        if nxt is None:
                            break
                        formed.append((_Batch(self, nxt[0], streams, budget).start(pool), nxt[1]))
                    if not formed:
                        ended = True
                        return
                    batch, starved = formed.popleft()
                    if defer and not starved:
                        while owed and owed[0].done:
                            owed.popleft()
                        owed.append(batch)
                    else:
                        batch()
                    yield from (it.out for it in batch.items)
        finally:
            # At the end the thread finishes the batches handed out (the caller settles them);
            # closed early, it stops: batches it had not started are then decoded when settled.
            pool.shutdown(wait=not ended, cancel_futures=not ended)
            self._log_stats_when_settled([b for b in owed if b.owed()] if ended else [])

    def _groups(self, reads: Iterator[_Item | None], budget: _Budget,
                release: Callable[[], None]) -> Iterator[tuple[list[_Item], bool]]:
        """(items, starved): consecutive items holding ``batch_size`` device files (or fewer at
        the end, or when the byte budget asks for a flush: ``starved``, after ``release()``
        finished every deferred batch); finished items pass at once when nothing waits."""
        group: list[_Item] = []
        waiting = 0
        for item in reads:
            starved = item is None
            if item is not None:
                group.append(item)
                if item.shape is None:  # finished on the CPU or failed: its bytes are gone
                    budget.add(-item.held)
                else:
                    waiting += 1
                if waiting and waiting < self.batch_size:
                    continue
            else:
                release()
            if group:
                yield group, starved
            group, waiting = [], 0
        if group:
            yield group, False

    def _log_stats_when_settled(self, owed: list[_Batch]) -> None:
        """Log the routes now, or once the caller has settled the last of ``owed`` (a deferred
        stream ends before its last batches are preprocessed, and only then are they counted)."""
        left = len(owed)
        if not left:
            self._log_stats()
            return
        lock = threading.Lock()

        def one_done() -> None:
            nonlocal left
            with lock:
                left -= 1
                last = left == 0
            if last:
                self._log_stats()

        for b in owed:
            b.then = one_done

    def _log_stats(self) -> None:
        with self._lock:
            stats = dict(self.stats)
        if stats:
            log.info("decode routes: %s", ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))


# ----- choosing the path -------------------------------------------------------------------------
def device_decode_available(device: str) -> bool:
    """torchvision can decode JPEGs on ``device`` (tried on a tiny image: nvJPEG may be missing)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
    except ImportError:
        return False
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return False
    try:
        probe = encode_jpeg(torch.full((3, 8, 8), 128, dtype=torch.uint8))
        out = decode_jpeg([probe], mode=ImageReadMode.RGB, device=device)
        return tuple(out[0].shape) == (3, 8, 8)
    except Exception as e:  # any failure means: not usable here
        log.info("JPEG decoding on %s is unavailable: %s", device, e)
        return False


def _same_device(encoders: Sequence[Encoder]) -> str | None:
    devices = {str(e.device) for e in encoders}
    cuda = {torch.device(d) for d in devices}
    if len(cuda) == 1:
        return devices.pop()
    if all(d.type == "cuda" for d in cuda) and len({d.index or 0 for d in cuda}) == 1:
        return devices.pop()  # "cuda" and "cuda:0" (current device 0)
    return None


def device_path_problem(encoders: Sequence[Encoder], require_cuda: bool) -> tuple[str | None, dict[str, TransformSpec]]:
    """(why the device path cannot serve these encoders or None, their transform specs)."""
    specs: dict[str, TransformSpec] = {}
    for e in encoders:
        spec = transform_spec(getattr(e, "preprocess_transform", None))
        if spec is None:
            return f"encoder {e.name!r}: its preprocessing is not a recognised open_clip eval transform", {}
        specs[e.name] = spec
    device = _same_device(encoders)
    if device is None:
        return f"the encoders are on different devices ({sorted({str(e.device) for e in encoders})})", {}
    if require_cuda and torch.device(device).type != "cuda":
        return f"the encoders run on {device}, not CUDA", {}
    if not device_decode_available(device):
        return f"torchvision cannot decode JPEGs on {device}", {}
    return None, specs


def choose_decoder(encoders: Sequence[Encoder], cfg: IndexConfig, cpu: ImageDecoder) -> Decoder:
    """The decoder for ``cfg.decode``: ``"cpu"`` -> ``cpu``; ``"auto"`` -> a ``GpuDecoder``
    when every encoder runs on one CUDA device that torchvision decodes JPEGs on and has a
    recognised transform, else ``cpu``; ``"gpu"`` -> a ``GpuDecoder`` on the encoders' device
    (the CPU too: the same batched torch code, for tests), or ``IndexConfigError``."""
    if cfg.decode == "cpu":
        _unused_read_processes(cfg)
        return cpu
    problem, specs = device_path_problem(encoders, require_cuda=cfg.decode == "auto")
    if problem is not None:
        if cfg.decode == "gpu":
            raise IndexConfigError(f"--decode gpu: {problem}")
        log.info("decoding on the CPU: %s", problem)
        _unused_read_processes(cfg)
        return cpu
    device = str(encoders[0].device)
    log.info("decoding JPEGs on %s (batched torchvision.io.decode_jpeg)", device)
    slow = queue_warning() if torch.device(device).type == "cuda" else None
    if slow is not None:
        log.warning("%s", slow)
    return GpuDecoder(specs, cpu, device, batch_size=cfg.batch_size, read_processes=cfg.read_processes)


def _unused_read_processes(cfg: IndexConfig) -> None:
    if cfg.read_processes:
        log.warning("--read-processes applies to the GPU path; the CPU path decodes on %d threads", cfg.workers)


def make_decoder(encoders: Sequence[Encoder], cfg: IndexConfig) -> Decoder:
    """The decoder ``index`` runs for ``encoders`` (in the driver, or in each Ray actor): Pillow's
    ``ImageDecoder`` with ``cfg``'s limits and every encoder's ``preprocess``, or the GPU path
    ``choose_decoder`` picks for ``cfg.decode``."""
    side = max(max(e.image_size) for e in encoders)
    cpu = ImageDecoder({e.name: e.preprocess for e in encoders}, cfg.max_pixels, (side, side) if cfg.jpeg_draft else None,
                       max_file_bytes=cfg.max_file_bytes, max_aspect=cfg.max_aspect)
    return choose_decoder(encoders, cfg, cpu)


__all__ = ["GpuDecoder", "choose_decoder", "make_decoder", "device_decode_available", "device_path_problem", "JPEG_SUFFIXES"]
