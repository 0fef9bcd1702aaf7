"""Stage 3, embed: batches of preprocessed images through each encoder, in one pass.

Every decoded image is preprocessed once per encoder by the decode stage; here each encoder
gets the stacked batch of the images that need its embedding. ``start_embed`` only queues the
work where the encoder can (``Encoder.encode_images_async``: on a GPU), so the pipeline decodes
the next batch while the device encodes this one; ``embed_batch`` waits at once.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from clipfp8.quant.core.encoder import Encoder


@dataclass
class EmbedResult:
    """vectors[name][i]: float32 (D,) of batch item i, for items that needed encoder ``name``.
    ``seconds``: per encoder, the host time spent queueing its batch and waiting for it."""

    vectors: list[dict[str, np.ndarray]]
    seconds: dict[str, float] = field(default_factory=dict)


def start_embed(encoders: Sequence[Encoder], tensors: Sequence[dict[str, torch.Tensor]],
                needs: Sequence[set[str]]) -> Callable[[], EmbedResult]:
    """Queue the batch on every encoder; the returned function waits for and returns the result.

    tensors[i][name]: float32 (3, H, W) preprocessed for encoder ``name``, on the CPU or
    already on the encoder's device (the GPU data path: never copied back to the host);
    ``needs[i]`` the encoder names item i must be embedded with. The result holds per-item
    vectors, (D,) float32 each."""
    started: list[tuple[Encoder, list[int], Callable[[], np.ndarray]]] = []
    seconds: dict[str, float] = {}
    for enc in encoders:
        idx = [i for i, need in enumerate(needs) if enc.name in need]
        if not idx:
            continue
        t0 = time.perf_counter()
        items = [tensors[i][enc.name] for i in idx]
        if len({t.device for t in items}) > 1:  # device-decoded files + CPU fallbacks
            items = [t.to(enc.device, non_blocking=True) for t in items]
        started.append((enc, idx, enc.encode_images_async(torch.stack(items))))
        seconds[enc.name] = time.perf_counter() - t0

    def finish() -> EmbedResult:
        out: list[dict[str, np.ndarray]] = [{} for _ in tensors]
        for enc, idx, result in started:
            t0 = time.perf_counter()
            vecs = result()
            seconds[enc.name] += time.perf_counter() - t0
            if vecs.shape != (len(idx), enc.dim):
                raise ValueError(f"encoder {enc.name!r} returned shape {vecs.shape}, expected {(len(idx), enc.dim)}")
            for row, i in enumerate(idx):
                out[i][enc.name] = np.asarray(vecs[row], dtype=np.float32)
        return EmbedResult(out, seconds)

    return finish


def embed_batch(encoders: Sequence[Encoder], tensors: Sequence[dict[str, torch.Tensor]],
                needs: Sequence[set[str]]) -> EmbedResult:
    """``start_embed(...)()``: the batch's vectors, waited for."""
    return start_embed(encoders, tensors, needs)()
