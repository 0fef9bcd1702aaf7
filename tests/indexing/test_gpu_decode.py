"""The GPU data path (``indexing.gpu_decode``) against the Pillow path: the same code runs on
the CPU here (torchvision's libjpeg decoder, torch resize on the CPU); ``@pytest.mark.gpu``
tests repeat it with nvJPEG on CUDA."""
from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest
import torch

from clipfp8.indexing.config import IndexConfig
from clipfp8.indexing.decode import Decoded, DecodeTask, ImageDecoder, imap_bounded, settle
from clipfp8.indexing.errors import IndexConfigError
from clipfp8.indexing.fileread import ReadJob, ReadResult, read_for_device
from clipfp8.indexing.gpu_decode import GpuDecoder, choose_decoder
from clipfp8.indexing.gpu_read import Item, _Chunks
from clipfp8.indexing.gpu_transform import transform_spec
from clipfp8.indexing.pipeline import index_corpus
from clipfp8.quant.core.config import EncoderSpec
from clipfp8.quant.core.encoder import Encoder, create_encoder
from tests.fakes import FakeEncoder
from tests.indexing import badfiles as bf
from tests.indexing.conftest import index_state, write_image
from tests.indexing.gpujpeg import bogus_huffman, exif_block, photo_bytes, tasks, with_save, write_photos

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision.io's decoders

MAX_PIXELS = 350_000  # above every generated photo, below big.jpg
QUERIES = ["a dog running on grass", "a child playing", "people walking in a city street", "a man riding a bike",
           "a boat on the water", "snow on a mountain", "a black and white dog", "a girl in a red dress"]


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return create_encoder(EncoderSpec(precision="fp32", device="cpu"))


def decoders(enc: Encoder, device: str, read_processes: int = 0, **limits: object) -> tuple[ImageDecoder, GpuDecoder]:
    cpu = ImageDecoder({enc.name: enc.preprocess}, **limits)  # type: ignore[arg-type]
    spec = transform_spec(enc.preprocess_transform)
    assert spec is not None
    return cpu, GpuDecoder({enc.name: spec}, cpu, device, batch_size=16, read_processes=read_processes)


def both_paths(enc: Encoder, paths: list[Path], root: Path,
               device: str) -> tuple[list[Decoded], list[Decoded], Counter]:
    cpu, gpu = decoders(enc, device)
    ts = tasks(paths, root)
    return list(imap_bounded(cpu, ts, 2, 32)), list(gpu.imap(ts, 2, 32)), gpu.stats


def embed(enc: Encoder, decoded: list[Decoded]) -> np.ndarray:
    return enc.encode_images(torch.stack([d.tensors[enc.name].to(enc.device) for d in decoded]))


def check_agreement(enc: Encoder, paths: list[Path], root: Path, device: str, queries: bool) -> float:
    """Embeddings through both paths: every file decoded on the torch path, cosine >= 0.995 on
    average (>= 0.9999 on the CPU, where the decoder is the same libjpeg and only the resize's
    rounding differs; measured: 0.999999), and (``queries``) the same top-10 images for every
    text query. Returns the mean cosine."""
    ref, got, stats = both_paths(enc, paths, root, device)
    if device == "cpu":
        assert stats == Counter(gpu=len(paths))
    else:  # nvJPEG may refuse an odd file (it then takes the Pillow path): most must pass
        assert stats["gpu"] >= 0.75 * len(paths) and set(stats) <= {"gpu", "cpu:device_failed"}, stats
    on_device = sum(all(t.device.type == torch.device(device).type for t in d.tensors.values()) for d in got)
    assert on_device == stats["gpu"] and all(d.error is None for d in ref + got)
    assert [d.entry for d in got] == [d.entry for d in ref]
    assert [(d.sha256, d.width, d.height) for d in got] == [(d.sha256, d.width, d.height) for d in ref]
    a, b = embed(enc, ref), embed(enc, got)
    cos = (a * b).sum(1)
    floor = 0.9999 if device == "cpu" else 0.995
    assert cos.mean() >= floor and cos.min() >= floor - 0.01, (cos.mean(), cos.min())
    if queries:
        text = enc.encode_texts(QUERIES)
        for q, t in zip(QUERIES, text, strict=True):
            assert set(np.argsort(-a @ t)[:10]) == set(np.argsort(-b @ t)[:10]), q
    return float(cos.mean())


@pytest.mark.slow
def test_photos_embed_alike_on_both_paths(encoder: Encoder, shared_data: Path) -> None:
    src = shared_data / "eval" / "flickr8k-1k" / "images"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    paths = sorted(src.glob("*.jpg"))[:64]
    check_agreement(encoder, paths, src, "cpu", queries=True)


def test_generated_jpegs_embed_alike_on_both_paths(encoder: Encoder, tmp_path: Path) -> None:
    paths = write_photos(tmp_path / "c", 36)
    check_agreement(encoder, paths, tmp_path / "c", "cpu", queries=False)


def bad_corpus(root: Path) -> dict[str, str]:
    """Files the torch path must hand to Pillow -> the route ``GpuDecoder.stats`` counts."""
    root.mkdir(parents=True, exist_ok=True)
    good = photo_bytes((120, 90), 3)
    files = {"a.png": None, "cmyk.jpg": None, "trunc.jpg": good[:len(good) * 2 // 3],
             "rot.jpg": with_save((40, 20), exif=exif_block(6, big_endian=False)),
             "rot_mm.jpg": with_save((40, 20), exif=exif_block(8, big_endian=True)),
             "big.jpg": photo_bytes((800, 500), 4), "wide.jpg": photo_bytes((1000, 40), 5),
             "huffman.jpg": bogus_huffman(good), "empty.jpg": b"", "text.jpg": b"hello", "ok.jpg": good}
    for name, data in files.items():
        if data is not None:
            (root / name).write_bytes(data)
    write_image(root / "a.png", 1, fmt="PNG")
    bf.cmyk_jpeg(root / "cmyk.jpg")
    return {"a.png": "cpu:not_jpeg", "cmyk.jpg": "cpu:colour", "trunc.jpg": "cpu:no_eoi",
            "rot.jpg": "cpu:orientation", "rot_mm.jpg": "cpu:orientation", "big.jpg": "cpu:oversized",
            "wide.jpg": "cpu:aspect", "huffman.jpg": "cpu:device_failed", "empty.jpg": "cpu:not_jpeg",
            "text.jpg": "cpu:not_jpeg", "ok.jpg": "gpu"}


@pytest.mark.parametrize("procs", [0, 2])
def test_fallbacks_give_the_cpu_paths_results(encoder: Encoder, tmp_path: Path, procs: int,
                                              caplog: pytest.LogCaptureFixture) -> None:
    routes = bad_corpus(tmp_path / "c")
    paths = sorted((tmp_path / "c").iterdir())
    cpu, gpu = decoders(encoder, "cpu", read_processes=procs, max_pixels=MAX_PIXELS)
    ts = tasks(paths, tmp_path / "c")
    with caplog.at_level(logging.WARNING, logger="clipfp8.indexing.gpu_read"):
        ref, got = list(imap_bounded(cpu, ts, 2, 8)), list(gpu.imap(ts, 2, 8))
    assert "reader processes failed" not in caplog.text
    assert gpu.stats == Counter(routes.values())
    for r, g in zip(ref, got, strict=True):
        name = r.entry.rel.decode()
        assert (g.entry, g.error, g.sha256, g.width, g.height) == (r.entry, r.error, r.sha256, r.width, r.height), name
        assert g.tensors.keys() == r.tensors.keys(), name
        for k, t in r.tensors.items():
            if routes[name] == "gpu":
                assert torch.allclose(g.tensors[k], t, atol=0.05), name
            else:
                assert torch.equal(g.tensors[k], t), name  # Pillow's own pixels
    reasons = {r.entry.rel.decode(): (r.error or "ok").split(":")[0] for r in ref}
    assert reasons == {"a.png": "ok", "cmyk.jpg": "ok", "trunc.jpg": "corrupt", "rot.jpg": "ok", "rot_mm.jpg": "ok",
                       "big.jpg": "oversized", "wide.jpg": "ok", "huffman.jpg": "corrupt",
                       "empty.jpg": "empty_file", "text.jpg": "not_an_image", "ok.jpg": "ok"}
    one = gpu(ts[-1])  # a single file outside the stream: same answer
    assert one.sha256 == got[-1].sha256 and torch.equal(one.tensors[encoder.name], got[-1].tensors[encoder.name])


@pytest.mark.parametrize("procs", [0, 2])
def test_stream_keeps_order_under_a_tight_byte_budget(encoder: Encoder, tmp_path: Path, procs: int) -> None:
    paths = write_photos(tmp_path / "c", 30)
    ts = tasks(paths, tmp_path / "c")
    skip = frozenset({_sha(paths[4])})
    ts[4] = DecodeTask(ts[4].entry, ts[4].path, skip)  # an unchanged/moved file: hashed, not decoded
    _, roomy = decoders(encoder, "cpu")
    _, tight = decoders(encoder, "cpu", read_processes=procs)
    tight.reads.max_bytes_in_flight = 20_000  # one or two files at a time (larger ones alone): early flushes
    a, b = list(roomy.imap(ts, 2, 64)), list(tight.imap(ts, 3, 64))
    assert [d.entry for d in b] == [t.entry for t in ts] == [d.entry for d in a]
    assert a[4].tensors == {} == b[4].tensors and a[4].sha256 == next(iter(skip)) == b[4].sha256
    for x, y in zip(a, b, strict=True):
        assert x.sha256 == y.sha256 and all(torch.equal(x.tensors[k], y.tensors[k]) for k in x.tensors)


def same_results(x: list[Decoded], y: list[Decoded]) -> None:
    for a, b in zip(x, y, strict=True):
        assert (a.entry, a.error, a.sha256, a.width, a.height) == (b.entry, b.error, b.sha256, b.width, b.height)
        assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def odd_and_photos(root: Path) -> tuple[dict[str, str], list[DecodeTask]]:
    """``bad_corpus``'s odd files in root/odd and 20 photos in root/ok: (expected routes, tasks)."""
    routes = bad_corpus(root / "odd")
    write_photos(root / "ok", 20)
    return routes, tasks(sorted(p for p in root.rglob("*") if p.is_file()), root)


def test_deferred_stream_decodes_when_settled(encoder: Encoder, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """``imap(defer=True)`` hands files out before decoding them (the pipeline does its per-file
    work while the device still encodes); ``settle`` then gives exactly the eager results, a file
    the device fails on included (its Pillow answer lands in the same ``Decoded``). The routes
    are logged once the last deferred batch is settled, so they count every file."""
    routes, ts = odd_and_photos(tmp_path / "c")
    _, eager = decoders(encoder, "cpu", max_pixels=MAX_PIXELS)
    _, lazy = decoders(encoder, "cpu", max_pixels=MAX_PIXELS)
    ref = list(eager.imap(ts, 2, 64))
    caplog.set_level(logging.INFO, logger="clipfp8.indexing.gpu_decode")
    caplog.clear()
    got = list(lazy.imap(ts, 2, 64, defer=True))
    assert not [r for r in caplog.records if r.getMessage().startswith("decode routes")]
    owed = [d for d in got if d.pending is not None]
    assert len(owed) == 21 + 1 and all(d.tensors == {} and d.error is None for d in owed)  # 20 photos, ok.jpg, huffman.jpg
    assert lazy.stats["gpu"] == 0
    settle(owed[:1])  # settling one file decodes its whole batch (16 device files), once
    assert sum(d.pending is None for d in owed) == 16
    assert lazy.stats["gpu"] + lazy.stats["cpu:device_failed"] == 16
    settle(got)
    assert all(d.pending is None for d in got) and lazy.stats == eager.stats
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decode routes")]
    assert logged == ["decode routes: " + ", ".join(f"{k} {v}" for k, v in sorted(eager.stats.items()))]
    assert lazy.stats["cpu:device_failed"] == 1 == Counter(routes.values())["cpu:device_failed"]
    same_results(ref, got)
    assert next(d for d in got if d.entry.rel.endswith(b"huffman.jpg")).error.startswith("corrupt")


def test_deferred_stream_decodes_itself_when_the_byte_budget_runs_out(encoder: Encoder, tmp_path: Path) -> None:
    paths = write_photos(tmp_path / "c", 30)
    ts = tasks(paths, tmp_path / "c")
    _, roomy = decoders(encoder, "cpu")
    _, tight = decoders(encoder, "cpu")
    tight.reads.max_bytes_in_flight = 20_000  # unsettled batches hold their bytes: the stream must decode them
    a, b = list(roomy.imap(ts, 2, 64)), list(tight.imap(ts, 3, 64, defer=True))
    assert sum(d.pending is None for d in b) >= 25  # decoded by the stream itself, not by a caller
    settle(b)
    same_results(a, b)


def test_batches_are_decoded_ahead_on_the_decode_thread(encoder: Encoder, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """nvJPEG runs on one decode thread, ``decode_ahead`` batches beyond the one handed out,
    before anyone settles them; preprocessing stays on the caller's thread."""
    paths = write_photos(tmp_path / "c", 40)
    _, gpu = decoders(encoder, "cpu")
    gpu.batch_size = 8
    raw_threads: list[str] = []
    pre_threads: list[str] = []
    decode_raw, finish = GpuDecoder._decode_raw, GpuDecoder._finish_group
    started = threading.Event()

    def spy_raw(self: GpuDecoder, *a: object) -> object:
        raw_threads.append(threading.current_thread().name)
        if len(raw_threads) == 1 + gpu.decode_ahead:
            started.set()
        return decode_raw(self, *a)  # type: ignore[arg-type]

    def spy_finish(self: GpuDecoder, *a: object) -> None:
        pre_threads.append(threading.current_thread().name)
        finish(self, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(GpuDecoder, "_decode_raw", spy_raw)
    monkeypatch.setattr(GpuDecoder, "_finish_group", spy_finish)
    stream = gpu.imap(tasks(paths, tmp_path / "c"), 2, 64, defer=True)
    first = next(stream)
    assert started.wait(30), raw_threads  # three batches decoding, nothing settled yet
    assert first.pending is not None and pre_threads == []
    rest = [first, *stream]
    settle(rest)
    assert len(raw_threads) == 5 and {t.split("_")[0] for t in raw_threads} == {"gpu-decode"}
    assert pre_threads == [threading.current_thread().name] * 5
    assert all(d.error is None and d.tensors for d in rest)


@pytest.mark.parametrize("procs", [0, 2])
def test_closing_the_stream_early_stops_its_threads(encoder: Encoder, tmp_path: Path, procs: int) -> None:
    paths = write_photos(tmp_path / "c", 100)  # more than the batches decoded ahead (3 x 16): still reading
    _, gpu = decoders(encoder, "cpu", read_processes=procs)
    stream = gpu.imap(tasks(paths, tmp_path / "c"), 2, 8)
    assert next(stream).error is None
    assert bool(_reader_processes()) == bool(procs)  # they did the reading
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith(("gpu-decode", "gpu-read"))]
    assert not _reader_processes()  # gone too


def test_closing_the_read_stream_early_drops_the_chunks_not_started(encoder: Encoder, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Closed after its first file, the reading stream lets the chunks already running finish and
    drops the queued ones: it does not read its whole look-ahead (128 files here) first."""
    import time

    from clipfp8.indexing import gpu_read

    paths = write_photos(tmp_path / "c", 160)
    _, gpu = decoders(encoder, "cpu")
    read: list[int] = []
    real = gpu_read.read_many

    def slow(jobs):  # type: ignore[no-untyped-def]
        time.sleep(0.5)  # long beside the close that follows the first file: no third pair starts
        read.append(len(jobs))
        return real(jobs)

    monkeypatch.setattr(gpu_read, "read_many", slow)
    stream = gpu.reads.stream(tasks(paths, tmp_path / "c"), 2, 128, gpu_read.Budget())  # 2 threads, chunks of 16
    assert next(stream) is not None
    stream.close()
    # The first two chunks (read side by side) and at most the two the threads took up next.
    assert sum(read) <= 64, read


def _reader_processes() -> list[int]:
    """Pids of the live processes forked by this process's multiprocessing forkserver (Linux
    /proc): the reader processes of a stream."""
    procs: dict[int, tuple[int, bytes]] = {}
    for d in Path("/proc").iterdir():
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                procs[int(d.name)] = (int(fields[1]), (d / "cmdline").read_bytes())
        except (OSError, ValueError):
            continue
    servers = {pid for pid, (ppid, cmd) in procs.items() if ppid == os.getpid() and b"multiprocessing.forkserver" in cmd}
    return [pid for pid, (ppid, _) in procs.items() if ppid in servers]


class _Pool:
    """A stand-in process pool: ``submit`` raises ``error`` (a process that cannot start), and
    counts its calls."""

    def __init__(self, error: BaseException) -> None:
        self.error, self.calls = error, 0

    def submit(self, *_: object) -> None:
        self.calls += 1
        raise self.error


def _same_items(got: list[Item], want: list[Item]) -> None:
    for g, w in zip(got, want, strict=True):
        assert (g.out.sha256, g.shape, g.out.error) == (w.out.sha256, w.shape, w.out.error)
        assert g.data is not None and w.data is not None and torch.equal(g.data, w.data)


def test_a_dead_reader_process_is_replaced_by_threads(encoder: Encoder, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A reader process that dies (the pool breaks) costs nothing: its files are read on threads,
    with the same results, and so is every later file of the stream."""
    paths = write_photos(tmp_path / "c", 3)
    ts = tasks(paths, tmp_path / "c")
    _, gpu = decoders(encoder, "cpu", read_processes=1)
    want = [gpu.reads.item(t, 0) for t in ts]
    pool = _Pool(AssertionError("a broken pool must not be used again"))
    with ThreadPoolExecutor(2) as threads:
        chunks = _Chunks(gpu.reads, pool, threads)  # type: ignore[arg-type]  # a stand-in pool
        slots: list[Future[Item]] = [Future() for _ in ts]
        broken: Future[list[ReadResult]] = Future()
        broken.set_exception(BrokenProcessPool("a reader process died"))
        with caplog.at_level(logging.WARNING, logger="clipfp8.indexing.gpu_read"):
            chunks._done([(t, 0, s) for t, s in zip(ts, slots, strict=True)], broken)
        got = [s.result(timeout=30) for s in slots]
        assert chunks.broken and "reading on threads" in caplog.text
        later = chunks.add(ts[0], 0).result(timeout=30)  # later files: on threads at once
        chunks.flush(None, ending=True)
        assert pool.calls == 0 and later.out.sha256 == want[0].out.sha256
    _same_items(got, want)


def test_reader_processes_that_cannot_start_leave_the_reading_to_threads(encoder: Encoder, tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    paths = write_photos(tmp_path / "c", 5)
    ts = tasks(paths, tmp_path / "c")
    _, gpu = decoders(encoder, "cpu", read_processes=2)
    pool = _Pool(OSError(24, "Too many open files"))
    with ThreadPoolExecutor(2) as threads, caplog.at_level(logging.WARNING, logger="clipfp8.indexing.gpu_read"):
        chunks = _Chunks(gpu.reads, pool, threads, lookahead=8)  # type: ignore[arg-type]  # a stand-in pool
        slots = [chunks.add(t, 0) for t in ts]
        chunks.flush(slots[0], ending=True)
        got = [s.result(timeout=30) for s in slots]
    assert pool.calls == 1 and chunks.broken and "Too many open files" in caplog.text
    _same_items(got, [gpu.reads.item(t, 0) for t in ts])


def test_reader_threads_read_jpegs_in_chunks_with_the_per_file_results(encoder: Encoder, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without reader processes the threads take JPEGs in chunks (one ``read_many`` task each, not
    one task per file); every file's item equals the one-file path's, a non-JPEG goes to the CPU
    path alone, and the caller's next file is sent even when its chunk is not full."""
    from clipfp8.indexing import gpu_read

    paths = write_photos(tmp_path / "c", 11)
    (tmp_path / "c" / "note.png").write_bytes((tmp_path / "c" / "photo000.jpg").read_bytes())
    ts = tasks([*paths, tmp_path / "c" / "note.png"], tmp_path / "c")
    _, gpu = decoders(encoder, "cpu")
    want = [gpu.reads.item(t, 0) for t in ts]
    sizes: list[int] = []
    real = gpu_read.read_many
    monkeypatch.setattr(gpu_read, "read_many", lambda jobs: sizes.append(len(jobs)) or real(jobs))
    with ThreadPoolExecutor(2) as threads:
        chunks = _Chunks(gpu.reads, None, threads, lookahead=32)  # 32 // (2 * 2 threads): chunks of 8
        slots = [chunks.add(t, 0) for t in ts]
        assert sizes == [8] or sizes == []  # the first 8 JPEGs went as one task; 3 wait
        chunks.flush(slots[8], ending=False)  # the caller waits for the 9th: its chunk is sent
        got = [s.result(timeout=30) for s in slots]
    assert sorted(sizes) == [3, 8]  # two tasks (the threads may start them in either order)
    assert got[-1].out.error == want[-1].out.error and got[-1].data is None  # the PNG: the CPU path
    _same_items(got[:-1], want[:-1])


def test_large_skip_sets_stay_in_this_process(encoder: Encoder, tmp_path: Path) -> None:
    """A moved folder gives every new file all vanished hashes: they are checked here, not pickled
    into every chunk; the file is still recognised as content already embedded."""
    paths = write_photos(tmp_path / "c", 20)
    ts = tasks(paths, tmp_path / "c")
    many = frozenset({_sha(paths[3])} | {f"{i:064x}" for i in range(200)})
    ts[3] = DecodeTask(ts[3].entry, ts[3].path, many)
    _, gpu = decoders(encoder, "cpu", read_processes=2)
    assert gpu.reads._job(ts[3], ship_skips=False).skip_hashes == frozenset()
    assert gpu.reads._job(ts[4], ship_skips=False).skip_hashes == ts[4].skip_hashes  # small: shipped
    got = list(gpu.imap(ts, 2, 64))
    assert got[3].sha256 == _sha(paths[3]) and got[3].tensors == {} and got[3].error is None
    assert all(d.tensors for k, d in enumerate(got) if k != 3)
    assert gpu.stats == Counter({"gpu": 19})


def test_a_file_that_cannot_be_read_reports_no_read_time(tmp_path: Path) -> None:
    res = read_for_device(ReadJob(str(tmp_path / "gone.jpg"), frozenset(), 1 << 20, 10**6, 20.0))
    assert res.error is not None and res.read_s is None and res.header_s is None and res.seconds >= 0
    assert res.data is None and res.sha256 is None


def test_reader_processes_index_like_threads(encoder: Encoder, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    corpus = tmp_path / "corpus"
    write_photos(corpus / "d0", 12)
    bad_corpus(corpus / "odd")
    kw = dict(batch_size=8, workers=2, max_pixels=MAX_PIXELS, decode="gpu")
    s0 = index_corpus(corpus, tmp_path / "threads", [encoder], config=IndexConfig(**kw))  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="clipfp8.indexing.gpu_read"):
        s2 = index_corpus(corpus, tmp_path / "procs", [encoder], config=IndexConfig(read_processes=2, **kw))  # type: ignore[arg-type]
    assert "reader processes failed" not in caplog.text  # the processes did the reading
    assert (s0.indexed, s0.skipped) == (s2.indexed, s2.skipped) and s0.indexed >= 12
    assert index_state(tmp_path / "threads") == index_state(tmp_path / "procs")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_choose_decoder(encoder: Encoder) -> None:
    def cfg(mode: str) -> IndexConfig:
        return IndexConfig(decode=mode)

    cpu = ImageDecoder({encoder.name: encoder.preprocess})
    assert choose_decoder([encoder], cfg("cpu"), cpu) is cpu
    assert choose_decoder([encoder], cfg("auto"), cpu) is cpu  # encoder on the CPU
    forced = choose_decoder([encoder], cfg("gpu"), cpu)
    assert isinstance(forced, GpuDecoder) and forced.device == torch.device("cpu")
    fake = FakeEncoder()
    fake_cpu = ImageDecoder({fake.name: fake.preprocess})
    assert choose_decoder([fake], cfg("auto"), fake_cpu) is fake_cpu  # no open_clip transform to re-do
    with pytest.raises(IndexConfigError, match="--decode gpu: encoder 'fake-fp16'"):
        choose_decoder([fake], cfg("gpu"), fake_cpu)
    with pytest.raises(ValueError, match="--decode"):
        IndexConfig(decode="nvjpeg")


def index_rows(index_dir: Path) -> list[tuple]:
    with sqlite3.connect(index_dir / "metadata.sqlite") as db:
        return db.execute("SELECT id, path, sha256, width, height, status, error FROM images ORDER BY id").fetchall()


def check_same_index(cpu_dir: Path, gpu_dir: Path, min_cos: float) -> None:
    a, b = index_state(cpu_dir), index_state(gpu_dir)
    assert a["rows"] == b["rows"] and index_rows(cpu_dir) == index_rows(gpu_dir)
    for name in set(a) - {"rows"}:
        assert a[name][0] == b[name][0]  # the same ids
        cos = (np.array(a[name][1]) * np.array(b[name][1])).sum(1)
        assert cos.min() >= min_cos, (name, cos.min())


def index_both(enc: Encoder, corpus: Path, tmp_path: Path, gpu_mode: str, run: int) -> None:
    kw = dict(batch_size=8, workers=2, max_pixels=MAX_PIXELS, commit_every=16)
    s_cpu = index_corpus(corpus, tmp_path / "cpu", [enc], config=IndexConfig(decode="cpu", **kw))
    s_gpu = index_corpus(corpus, tmp_path / "gpu", [enc], config=IndexConfig(decode=gpu_mode, **kw))
    assert (s_cpu.indexed, s_cpu.moved, s_cpu.skipped) == (s_gpu.indexed, s_gpu.moved, s_gpu.skipped), run
    # device batches are decoded in the pipeline's own stage, right before they are encoded
    assert {"decode:read", "decode:header", "decode_device", "decode_wait"} <= set(s_gpu.stage_seconds)
    assert "decode:gpu" not in s_gpu.stage_seconds


@pytest.mark.slow
def test_index_built_on_the_torch_path_equals_the_pillow_index(encoder: Encoder, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    write_photos(corpus / "d0", 14)
    write_photos(corpus / "d1", 10, start=14)
    bad_corpus(corpus / "odd")
    index_both(encoder, corpus, tmp_path, "gpu", 1)
    check_same_index(tmp_path / "cpu", tmp_path / "gpu", 0.9999)
    (corpus / "d0" / "photo003.jpg").rename(corpus / "d1" / "moved.jpg")  # a move keeps its id
    write_photos(corpus / "d2", 3, start=40)
    index_both(encoder, corpus, tmp_path, "gpu", 2)
    check_same_index(tmp_path / "cpu", tmp_path / "gpu", 0.9999)


@pytest.mark.gpu
def test_gpu_index_equals_the_pillow_index(tmp_path: Path) -> None:
    enc = create_encoder(EncoderSpec(precision="fp32", device="cuda"))
    cpu = ImageDecoder({enc.name: enc.preprocess})
    assert isinstance(choose_decoder([enc], IndexConfig(), cpu), GpuDecoder)  # auto picks nvJPEG
    corpus = tmp_path / "corpus"
    paths = write_photos(corpus / "d0", 36)
    check_agreement(enc, paths, corpus, "cuda", queries=False)
    bad_corpus(corpus / "odd")
    index_both(enc, corpus, tmp_path, "auto", 1)
    check_same_index(tmp_path / "cpu", tmp_path / "gpu", 0.995)  # nvJPEG's IDCT differs a little


@pytest.mark.gpu
def test_gpu_photos_embed_alike(shared_data: Path) -> None:
    src = shared_data / "eval" / "flickr8k-1k" / "images"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    enc = create_encoder(EncoderSpec(precision="fp32", device="cuda"))
    check_agreement(enc, sorted(src.glob("*.jpg"))[:64], src, "cuda", queries=True)


def test_cli_decode_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from clipfp8.indexing.__main__ import main

    monkeypatch.setenv("CLIPFP8_TEST_FAKE_ENCODER", "1")
    write_photos(tmp_path / "c", 3)
    args = ["index", str(tmp_path / "c"), "--index-dir", str(tmp_path / "i"), "--precision", "fake", "--no-progress"]
    assert main([*args, "--decode", "gpu"]) == 2  # the fake encoder has no open_clip transform
    assert "--decode gpu: encoder 'fake-fp16'" in capsys.readouterr().err
    assert main([*args, "--decode", "cpu"]) == 0 and "indexed 3," in capsys.readouterr().out


def test_several_decode_calls_per_batch_give_the_same_tensors(encoder: Encoder, tmp_path: Path) -> None:
    """A batch split into several ``decode_jpeg`` calls (``max_batch_pixels``), each stacked per
    size on the decode thread, with a file the decoder fails on inside: the same results as one
    call per batch, in order."""
    routes, ts = odd_and_photos(tmp_path / "c")
    _, whole = decoders(encoder, "cpu", max_pixels=MAX_PIXELS)
    _, split = decoders(encoder, "cpu", max_pixels=MAX_PIXELS)
    split.max_batch_pixels = 60_000  # a couple of photos per call
    calls: list[int] = []
    real = split._decode_jpegs

    def counted(chunk: list) -> list:
        calls.append(len(chunk))
        return real(chunk)

    split._decode_jpegs = counted  # type: ignore[method-assign]
    ref, got = list(whole.imap(ts, 2, 64)), list(split.imap(ts, 2, 64, defer=True))
    settle(got)
    assert len(calls) > 4 and max(calls) < 16  # really split
    assert split.stats == whole.stats and split.stats["cpu:device_failed"] == Counter(routes.values())["cpu:device_failed"]
    same_results(ref, got)


def test_reader_processes_are_checked_and_for_the_local_engine(tmp_path: Path) -> None:
    write_photos(tmp_path / "c", 2)
    with pytest.raises(IndexConfigError, match="--read-processes applies to the local engine"):
        index_corpus(tmp_path / "c", tmp_path / "i", [FakeEncoder()], config=IndexConfig(read_processes=2), engine="ray")
    assert not (tmp_path / "i").exists()  # refused before anything was written
    with pytest.raises(ValueError, match=r"read_processes must be >= 0"):
        IndexConfig(read_processes=-1)
