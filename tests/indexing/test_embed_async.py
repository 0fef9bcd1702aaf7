"""The pipeline queues batch k+1 on the encoders before it waits for batch k (the GPU encodes
while the host decodes), and the index it writes is the same as with encoders that finish at once."""
from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from clipfp8.indexing.config import IndexConfig
from clipfp8.indexing.pipeline import index_corpus
from clipfp8.quant.core.testing import FakeEncoder
from tests.indexing.conftest import encoders, index_state, make_corpus


class DeferredFake(FakeEncoder):
    """A FakeEncoder whose results arrive only when asked for, logging starts and finishes."""

    def __init__(self, log: list[tuple[str, int]], **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]  # FakeEncoder's keyword arguments
        self.log, self.started = log, 0

    def encode_images_async(self, images: torch.Tensor) -> Callable[[], np.ndarray]:
        k = self.started
        self.started += 1
        self.log.append(("start", k))
        snapshot = images.clone()  # the caller may free its batch tensors meanwhile

        def result() -> np.ndarray:
            self.log.append(("finish", k))
            return self.encode_images(snapshot)

        return result


@pytest.mark.parametrize("ahead", [1, 2, 3])
def test_batches_overlap_and_index_is_unchanged(tmp_path: Path, ahead: int) -> None:
    corpus = tmp_path / "corpus"
    make_corpus(corpus, 22)
    cfg = IndexConfig(batch_size=4, workers=2, commit_every=8, encode_ahead=ahead)
    index_corpus(corpus, tmp_path / "plain", encoders(), config=cfg)
    logs: list[list[tuple[str, int]]] = [[], []]
    deferred = [DeferredFake(log, dim=e.dim, precision=e.precision, noise=e.noise, name=e.name)
                for log, e in zip(logs, encoders(), strict=True)]
    index_corpus(corpus, tmp_path / "deferred", deferred, config=cfg)
    assert index_state(tmp_path / "deferred") == index_state(tmp_path / "plain")
    for enc, log in zip(deferred, logs, strict=True):
        assert enc.started == 6  # 22 files in batches of 4
        assert [k for what, k in log if what == "finish"] == list(range(6))  # all waited for, once, in order
        # Batch k+ahead was queued before batch k was waited for: the device had `ahead`
        # batches to work through while the host prepared the next one...
        assert all(log.index(("start", k + ahead)) < log.index(("finish", k)) for k in range(6 - ahead))
        # ... and no more: batch k+ahead+1 waited for batch k (device memory stays bounded).
        assert all(log.index(("finish", k)) < log.index(("start", k + ahead + 1)) for k in range(5 - ahead))


def test_encode_ahead_must_be_positive() -> None:
    with pytest.raises(ValueError, match="encode_ahead.*--encode-ahead.*>= 1"):
        IndexConfig(encode_ahead=0)


class WarmingFake(FakeEncoder):
    """A FakeEncoder with a first-call cost paid in ``warm_up_images`` (as a compiled encoder's)."""

    def __init__(self, log: list[tuple[str, int]], cost_s: float, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]  # FakeEncoder's keyword arguments
        self.log, self.cost_s = log, cost_s

    def warm_up_images(self, batch_size: int) -> bool:
        self.log.append(("warm", batch_size))
        time.sleep(self.cost_s)
        return True

    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        self.log.append(("encode", int(images.shape[0])))
        return super().encode_images(images)


def test_encoders_are_warmed_up_once_before_the_first_batch_and_not_timed(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    make_corpus(corpus, 10)
    log: list[tuple[str, int]] = []
    encs = [WarmingFake(log, 0.4), WarmingFake(log, 0.0, precision="fp8-fake", noise=0.05)]
    cfg = IndexConfig(batch_size=4, workers=2)
    t0 = time.perf_counter()
    s = index_corpus(corpus, tmp_path / "idx", encs, config=cfg)
    wall = time.perf_counter() - t0
    assert s.indexed == 10
    assert log[:2] == [("warm", 4), ("warm", 4)]  # every encoder, at the run's batch size, first
    assert [e for e in log if e[0] == "warm"] == log[:2]
    assert s.warmup_seconds >= 0.4
    assert wall - s.total_seconds >= 0.4  # the warm-up is a start cost, outside total_seconds
    assert "after a 0.4s encoder warm-up" in s.format()
    assert s.to_dict()["warmup_seconds"] == s.warmup_seconds

    log.clear()  # nothing changed: no batch to embed, so no warm-up either
    again = index_corpus(corpus, tmp_path / "idx", encs, config=cfg)
    assert again.unchanged == 10 and log == [] and again.warmup_seconds == 0.0


def test_encoders_without_a_first_call_cost_report_no_warm_up(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    make_corpus(corpus, 5)
    s = index_corpus(corpus, tmp_path / "idx", encoders(), config=IndexConfig(batch_size=4, workers=2))
    assert s.indexed == 5 and s.warmup_seconds == 0.0 and "warm-up" not in s.format()


class FreezeWatcher(FakeEncoder):
    """A FakeEncoder that notes how many objects the GC holds frozen at each batch."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen: list[int] = []

    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        self.frozen.append(gc.get_freeze_count())
        return super().encode_images(images)


def test_the_pass_runs_with_the_heap_frozen_and_gives_it_back(tmp_path: Path) -> None:
    """Full GC collections walk every live object holding the GIL (the models, the compiler):
    during the pass those are frozen, and afterwards the process's GC is as it was."""
    corpus = tmp_path / "corpus"
    make_corpus(corpus, 9)
    gc.unfreeze()
    enc = FreezeWatcher()
    s = index_corpus(corpus, tmp_path / "idx", [enc], config=IndexConfig(batch_size=4, workers=2))
    assert s.indexed == 9 and len(enc.frozen) == 3
    assert min(enc.frozen) > 1000  # the heap that existed before the pass (imports, the encoder)
    assert gc.get_freeze_count() == 0  # unfrozen again


def test_a_program_that_froze_its_heap_keeps_it_frozen(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    make_corpus(corpus, 5)
    gc.freeze()
    try:
        before = gc.get_freeze_count()
        index_corpus(corpus, tmp_path / "idx", encoders(), config=IndexConfig(batch_size=4, workers=2))
        # Not unfrozen behind the program's back, and nothing more frozen: a server that
        # re-indexes again and again would otherwise keep each pass's leftovers for good.
        # (Frozen objects may still be freed by reference counting: a few fewer is fine.)
        assert before - 1000 < gc.get_freeze_count() <= before
    finally:
        gc.unfreeze()
