"""A deterministic fake ``Encoder`` for testing indexing and the app without a model.

Used by the test suite and by the CLI test hooks (``CLIPFP8_TEST_FAKE_ENCODER=1``), never by default.

Images embed by their mean colour (R, G, B) plus a fixed random projection of the pixels, so
identical images embed identically and a solid red image is nearest to the text ``"red"``.
Texts embed by colour words ("red", "green", "blue", ...) plus a hash of the string.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from clipfp8.quant.core.encoder import Encoder, EncoderIdentity

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
           "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "yellow": (1.0, 1.0, 0.0)}


class FakeEncoder(Encoder):
    """dim-dimensional deterministic embeddings; ``precision`` is a label only.

    ``noise`` > 0 perturbs image embeddings deterministically (seeded by ``precision``), which
    lets tests mimic an FP8 encoder that agrees only mostly with its FP16 twin.
    """

    def __init__(self, dim: int = 16, precision: str = "fp16", size: int = 16, noise: float = 0.0,
                 name: str | None = None) -> None:
        self.dim, self.precision, self.device = dim, precision, "cpu"
        self.image_size = (size, size)
        self.name = name or f"fake-{precision}"
        self.noise = noise
        gen = torch.Generator().manual_seed(1234)
        self._proj = torch.randn(3 * size * size, dim - 3, generator=gen) / (size * 3)
        self.calls = {"images": 0, "texts": 0}

    def preprocess(self, image: Any) -> torch.Tensor:
        im = image.convert("RGB").resize(self.image_size)
        arr = np.asarray(im, dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def identity(self) -> EncoderIdentity:
        return EncoderIdentity(self.name, self.precision, "fake", f"fake-{self.dim}-{self.noise}", self.dim)

    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        self.calls["images"] += int(images.shape[0])
        mean = images.float().mean(dim=(2, 3)) * 4.0
        rest = images.float().reshape(images.shape[0], -1) @ self._proj
        emb = torch.cat([mean, rest], dim=1)
        if self.noise:
            # Seeded per image content (and precision), so an image's noise does not depend on
            # which batch or position it arrives in.
            rows = []
            for img in images:
                digest = hashlib.sha256(self.precision.encode() + img.float().numpy().tobytes()).hexdigest()
                g = torch.Generator().manual_seed(int(digest[:8], 16))
                rows.append(torch.randn(emb.shape[1], generator=g))
            emb = emb + self.noise * torch.stack(rows)
        return _unit(emb.numpy())

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.calls["texts"] += len(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
            out[i] = np.random.default_rng(seed).normal(size=self.dim) * 0.1
            for word, rgb in COLOURS.items():
                if word in t.lower():
                    out[i, :3] += np.array(rgb) * 4.0
        return _unit(out)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
