"""Timing primitives for the runtime benchmark: CUDA events on the GPU, perf_counter on the CPU."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Timing:
    """Per-call latencies (ms) of ``iters`` timed calls after warm-up, and their wall time."""

    latencies_ms: tuple[float, ...]
    total_s: float

    @property
    def p50_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 50))

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 99))

    @property
    def iters(self) -> int:
        return len(self.latencies_ms)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, min_time_s: float = 1.0,
               min_iters: int = 5, max_iters: int = 200) -> Timing:
    """Call ``fn`` ``warmup`` times, then enough times to fill ``min_time_s`` (bounded by
    ``min_iters``/``max_iters``); each call is bracketed by CUDA events (GPU) or perf_counter."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(device)
    est = max((time.perf_counter() - t0) / max(warmup, 1), 1e-5)
    # The first warm-up call may include compilation; time one more call for a fair estimate.
    t1 = time.perf_counter()
    fn()
    _sync(device)
    est = min(est, max(time.perf_counter() - t1, 1e-5))
    iters = int(min(max_iters, max(min_iters, math.ceil(min_time_s / est))))
    lat: list[float] = []
    start_wall = time.perf_counter()
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for s, e in events:
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        lat = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            lat.append((time.perf_counter() - t) * 1e3)
    return Timing(tuple(lat), time.perf_counter() - start_wall)


__all__ = ["Timing", "time_calls"]
