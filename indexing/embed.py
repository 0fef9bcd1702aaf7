"""Stage 3, embed: batches of preprocessed images through each encoder, in one pass.

Every decoded image is preprocessed once per encoder in the decode workers; here each encoder
gets the stacked batch of the images that need its embedding.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from clipfp8.quant.core.encoder import Encoder


@dataclass
class EmbedResult:
    """vectors[name][i]: float32 (D,) of batch item i, for items that needed encoder ``name``."""

    vectors: list[dict[str, np.ndarray]]
    seconds: dict[str, float] = field(default_factory=dict)


def embed_batch(encoders: Sequence[Encoder], tensors: Sequence[dict[str, torch.Tensor]],
                needs: Sequence[set[str]]) -> EmbedResult:
    """tensors[i][name]: float32 (3, H, W) preprocessed for encoder ``name``, on the CPU or
    already on the encoder's device (the GPU data path: never copied back to the host);
    ``needs[i]`` the encoder names item i must be embedded with. Returns per-item vectors,
    (D,) float32 each."""
    out: list[dict[str, np.ndarray]] = [{} for _ in tensors]
    seconds: dict[str, float] = {}
    for enc in encoders:
        idx = [i for i, need in enumerate(needs) if enc.name in need]
        if not idx:
            continue
        t0 = time.perf_counter()
        items = [tensors[i][enc.name] for i in idx]
        if len({t.device for t in items}) > 1:  # device-decoded files + CPU fallbacks
            items = [t.to(enc.device, non_blocking=True) for t in items]
        batch = torch.stack(items)
        vecs = enc.encode_images(batch)
        seconds[enc.name] = time.perf_counter() - t0
        if vecs.shape != (len(idx), enc.dim):
            raise ValueError(f"encoder {enc.name!r} returned shape {vecs.shape}, expected {(len(idx), enc.dim)}")
        for row, i in enumerate(idx):
            out[i][enc.name] = np.asarray(vecs[row], dtype=np.float32)
    return EmbedResult(out, seconds)
