"""``index --engine ray`` on a local Ray cluster (2 CPUs): the index equals the single-process one
(same ids, paths, hashes, bad-file rows; vectors to 1e-6), with the fake encoders and with the
embedded default model; a worker that dies mid-run is restarted and its batch retried; a killed
driver resumes from its last commit."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import clipfp8.indexing
from clipfp8.indexing.config import IndexConfig
from clipfp8.indexing.consistency import verify
from clipfp8.indexing.errors import IndexConfigError
from clipfp8.indexing.pipeline import IndexSummary, index_corpus
from clipfp8.indexing.report import list_errors
from clipfp8.indexing.store import open_index
from clipfp8.quant.core.testing import FakeEncoder
from tests.indexing import badfiles as bf
from tests.indexing.conftest import REPO, encoders, make_corpus, write_image

ray = pytest.importorskip("ray", reason="the Ray engine needs ray[data] (pip install 'clip-fp8[ray]')")

CFG = IndexConfig(batch_size=4, workers=2, commit_every=8)


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local 2-CPU cluster shared by the module's tests; its address, for subprocess drivers."""
    if ray.is_initialized():
        ray.shutdown()
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


def _with_bad_files(root: Path) -> Path:
    (root / "bad").mkdir(parents=True)
    (root / "bad" / "truncated.jpg").write_bytes(bf.jpeg_bytes()[:600])
    (root / "bad" / "notes.jpg").write_text("not an image at all\n")
    bf.png_with_dims(root / "bad" / "bomb.png", 100_000, 100_000)
    return root


def _state(index_dir: Path) -> dict:
    """Rows (every column but the indexing time) and, per encoder, sorted ids and their vectors."""
    with open_index(index_dir) as store:
        rows = sorted(tuple(v for k, v in r.items() if k != "indexed_at") for r in store.db.query("SELECT * FROM images"))
        out: dict = {"rows": rows}
        for name in store.encoder_names():
            ids = np.sort(store.vectors(name).ids())
            out[name] = (ids.tolist(), store.vectors(name).reconstruct(ids))
        out["specs"] = {n: store.recorded_spec(n) for n in store.encoder_names()}
        out["identities"] = {n: store.identity(n) for n in store.encoder_names()}
    return out


def assert_same_index(got: Path, want: Path) -> None:
    a, b = _state(got), _state(want)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], tuple):  # an encoder: same ids, vectors to 1e-6
            assert a[key][0] == b[key][0], key
            np.testing.assert_allclose(a[key][1], b[key][1], atol=1e-6, rtol=0, err_msg=key)
        else:
            assert a[key] == b[key], key
    assert verify(got).ok


def _same_report(ray_run: IndexSummary, local_run: IndexSummary) -> None:
    assert sorted(ray_run.errors) == sorted(local_run.errors)
    assert ray_run.skipped == local_run.skipped
    for field in ("indexed", "unchanged", "updated", "moved", "removed", "bad_files"):
        assert getattr(ray_run, field) == getattr(local_run, field), field


def test_ray_index_equals_local_index_with_bad_files(cluster: str, tmp_path: Path) -> None:
    corpus = _with_bad_files(tmp_path / "corpus")
    make_corpus(corpus, 24)
    local = index_corpus(corpus, tmp_path / "local", encoders(), config=CFG)
    remote = index_corpus(corpus, tmp_path / "ray", encoders(), config=CFG, engine="ray")
    assert remote.decoder == "ray:cpu" and remote.indexed == 24
    assert set(remote.skipped) == {"corrupt", "not_an_image", "oversized"}
    _same_report(remote, local)
    assert list_errors(tmp_path / "ray") == list_errors(tmp_path / "local")
    assert_same_index(tmp_path / "ray", tmp_path / "local")


def test_incremental_ray_run_equals_local_run(cluster: str, tmp_path: Path) -> None:
    """New, deleted, touched and moved files, and two copies of a moved file (the second cannot
    claim the move, so it is embedded). Files of a size no other shares are only hashed in the
    actors (``records_for``); the copies and the same-size files are decoded in full."""
    corpus = tmp_path / "corpus"
    files = make_corpus(corpus, 20)
    odd, touched = write_image(corpus / "odd.png", 900, size=(30, 10)), write_image(corpus / "t.png", 901, size=(12, 13))
    index_corpus(corpus, tmp_path / "local", encoders(), config=CFG)
    make_corpus(corpus / "new", 6, start_seed=100)
    files[0].unlink()
    files[1].rename(corpus / "moved.png")
    odd.rename(corpus / "odd_moved.png")
    shutil.copy(files[2], corpus / "copy_a.png")
    files[2].rename(corpus / "copy_b.png")
    for f in (files[3], touched):
        os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    shutil.copytree(tmp_path / "local", tmp_path / "ray")
    local = index_corpus(corpus, tmp_path / "local", encoders(), config=CFG)
    remote = index_corpus(corpus, tmp_path / "ray", encoders(), config=CFG, engine="ray")
    assert (local.moved, local.updated, local.removed, local.indexed) == (3, 2, 1, 7)
    _same_report(remote, local)
    assert_same_index(tmp_path / "ray", tmp_path / "local")


def test_records_hash_only_what_no_copy_can_need() -> None:
    from clipfp8.indexing.decode import DecodeTask
    from clipfp8.indexing.ray_engine import records_for
    from clipfp8.indexing.scan import FileEntry

    moves = frozenset({"h1", "h2"})  # the plan's move candidates, shared by every new file

    def task(rel: bytes, size: int, skip: frozenset[str], needs: frozenset[str] | None = None) -> DecodeTask:
        return DecodeTask(FileEntry(rel, size, 0), Path(rel.decode()), skip, needs)

    tasks = [task(b"new_a", 10, moves), task(b"new_b", 10, moves), task(b"new_c", 11, moves),
             task(b"touched", 12, frozenset({"h3"}), frozenset({"fp16"})), task(b"plain", 10, frozenset())]
    records, table = records_for(tasks, ["fp16", "fp8"])
    assert table == [["h1", "h2"]]  # sent once, not once per file
    assert [(r["skip"], r["skip_set"]) for r in records] == [("", -1), ("", -1), ("", 0), ("h3", -1), ("", -1)]
    assert [r["needs"] for r in records] == [3, 3, 3, 1, 3]
    assert [r["idx"] for r in records] == list(range(5))


def test_a_killed_actor_is_restarted_and_its_batch_retried(cluster: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = tmp_path / "corpus"
    make_corpus(corpus, 20)
    marker = tmp_path / "actor_exited"
    monkeypatch.setenv("CLIPFP8_TEST_EXIT_AT", "ray:batch_embedded:2")  # forwarded to the actors
    monkeypatch.setenv("CLIPFP8_TEST_EXIT_MARKER", str(marker))
    remote = index_corpus(corpus, tmp_path / "ray", encoders(), config=CFG, engine="ray")
    assert marker.exists(), "the actor never reached its exit point"
    assert marker.read_text() != str(os.getpid())  # an actor died, not this driver
    monkeypatch.delenv("CLIPFP8_TEST_EXIT_AT")
    local = index_corpus(corpus, tmp_path / "local", encoders(), config=CFG)
    assert remote.indexed == local.indexed == 20
    assert_same_index(tmp_path / "ray", tmp_path / "local")


def test_a_killed_driver_resumes_where_it_stopped(cluster: str, tmp_path: Path) -> None:
    """The CLI driver pauses right after its second commit point (16 files durable; the test
    hook), is SIGKILLed there, and a second run indexes only the rest."""
    corpus = tmp_path / "corpus"
    make_corpus(corpus, 40)
    idx, marker = tmp_path / "ray", tmp_path / "paused"
    cmd = [sys.executable, "-m", "clipfp8.indexing", "index", str(corpus), "--index-dir", str(idx),
           "--precision", "fake", "fake-fp8", "--engine", "ray", "--ray-address", cluster,
           "--batch-size", "4", "--workers", "1", "--commit-every", "8", "--commit-interval", "0", "--no-progress"]
    env = dict(os.environ, CLIPFP8_TEST_FAKE_ENCODER="1", CLIPFP8_TEST_PAUSE_AT="commit:db_committed:2",
               CLIPFP8_TEST_PAUSE_FILE=str(marker), OMP_NUM_THREADS="1")
    with open(tmp_path / "driver.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None and not marker.exists():
                time.sleep(0.05)
            assert marker.exists(), (tmp_path / "driver.log").read_text()[-3000:]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
    with open_index(idx) as store:
        assert store.stats()["images"]["total"] == 16
    resumed = index_corpus(corpus, idx, encoders(), config=CFG, engine="ray")
    assert (resumed.unchanged, resumed.indexed) == (16, 24)
    index_corpus(corpus, tmp_path / "local", encoders(), config=CFG)
    assert_same_index(idx, tmp_path / "local")


class _SlowFake(FakeEncoder):
    """A fake encoder with a compile-like warm-up and a slow encode; it logs each encode's
    (start, end, pid, thread) and each image's preprocessing time (the decode stage)."""

    def __init__(self, log: Path) -> None:
        super().__init__()
        self.log = str(log)

    def _write(self, line: str) -> None:
        with open(self.log, "a") as f:
            f.write(line + "\n")

    def warm_up_images(self, batch_size: int) -> bool:
        time.sleep(0.5)
        return True

    def preprocess(self, image: Any) -> torch.Tensor:
        self._write(f"decode {time.time()}")
        return super().preprocess(image)

    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        t0 = time.time()
        time.sleep(0.2)  # long enough that the actor's other call decodes meanwhile
        out = super().encode_images(images)
        self._write(f"encode {t0} {time.time()} {os.getpid()} {threading.get_ident()}")
        return out


def test_actors_warm_up_first_and_decode_beside_the_encode(cluster: str, tmp_path: Path) -> None:
    """Each actor warms its encoders before its first batch (reported as the run's warm-up, not
    in its wall time, as one process does) and runs two batches at once on two threads: the
    encodes never overlap (one batch at a time on the encoders), and files of one batch are
    decoded while another batch is being encoded."""
    module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(module)  # the actor cannot import tests/
    try:
        corpus = tmp_path / "corpus"
        make_corpus(corpus, 24)
        local = index_corpus(corpus, tmp_path / "local", [_SlowFake(tmp_path / "local.log")], config=CFG)
        remote = index_corpus(corpus, tmp_path / "ray", [_SlowFake(tmp_path / "ray.log")], config=CFG, engine="ray")
    finally:
        ray.cloudpickle.unregister_pickle_by_value(module)
    assert local.warmup_seconds >= 0.5 and remote.warmup_seconds >= 0.5
    assert remote.decoder == "ray:cpu" and remote.indexed == 24
    lines = [ln.split() for ln in (tmp_path / "ray.log").read_text().splitlines()]
    encodes = sorted((float(a), float(b), pid, tid) for kind, a, b, pid, tid in (ln for ln in lines if ln[0] == "encode"))
    decodes = [float(ln[1]) for ln in lines if ln[0] == "decode"]
    assert len(encodes) == 24 // CFG.batch_size and len(decodes) == 24
    assert len({pid for *_, pid, _ in encodes}) == 1 and len({tid for *_, tid in encodes}) == 2, encodes
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(encodes, encodes[1:], strict=False)), "encodes overlapped"
    assert any(a < t < b for t in decodes for a, b, *_ in encodes), "no file was decoded during an encode"
    assert_same_index(tmp_path / "ray", tmp_path / "local")


@pytest.mark.slow
def test_default_model_ray_index_equals_local_index(cluster: str, tmp_path: Path) -> None:
    """The embedded default model on the CPU in fp32: the actors build it from its spec."""
    from clipfp8.quant.core.config import EncoderSpec, ModelSpec

    corpus = _with_bad_files(tmp_path / "corpus")
    make_corpus(corpus, 20)
    spec = EncoderSpec(model=ModelSpec(), precision="fp32", device="cpu", batch_size=8)
    cfg = IndexConfig(batch_size=8, workers=2, commit_every=16)
    local = index_corpus(corpus, tmp_path / "local", [spec], config=cfg)  # built here
    remote = index_corpus(corpus, tmp_path / "ray", [spec], config=cfg, engine="ray")
    _same_report(remote, local)
    with open_index(tmp_path / "ray") as store:
        assert store.recorded_spec("default-fp32") == spec.to_record()
    assert_same_index(tmp_path / "ray", tmp_path / "local")


def test_ray_engine_without_ray_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_corpus(tmp_path / "corpus", 2)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    monkeypatch.delitem(sys.modules, "clipfp8.indexing.ray_engine", raising=False)
    monkeypatch.delattr(clipfp8.indexing, "ray_engine", raising=False)  # imported by an earlier test
    with pytest.raises(IndexConfigError, match=r"clip-fp8\[ray\]"):
        index_corpus(tmp_path / "corpus", tmp_path / "idx", encoders(), config=CFG, engine="ray")


@pytest.mark.parametrize("flags", [["--ray-address", "127.0.0.1:1"], ["--engine", "ray", "--watch"]])
def test_contradictory_engine_flags_are_usage_errors(tmp_path: Path, flags: list[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from clipfp8.app.cli import EXIT_USAGE, main

    monkeypatch.setenv("CLIPFP8_TEST_FAKE_ENCODER", "1")
    make_corpus(tmp_path / "corpus", 2)
    code = main(["index", str(tmp_path / "corpus"), "--index-dir", str(tmp_path / "idx"), "--precision", "fake",
                 "--no-progress", *flags])
    assert code == EXIT_USAGE
    assert not (tmp_path / "idx").exists()
