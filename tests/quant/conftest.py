"""Fixtures for the quantization tests: tiny random open_clip models and small image folders.

Nothing here is autouse: other areas under tests/quant/ are unaffected.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from clipfp8.quant.core.config import ModelSpec
from clipfp8.quant.core.models import LoadedModel, load_model, tiny_config

warnings.filterwarnings("ignore", message=".*transformers .* is not tested.*")

CAPTIONS = ["a photo of a cat.", "a photo of a dog.", "a red car.", "a green tree.",
            "a blue sky over the sea.", "a bowl of fruit.", "two people walking.", "a white house."]


def tiny_loaded(hf_text: bool = False, seed: int = 0) -> LoadedModel:
    """A tiny open_clip model (random weights, fixed seed), fp32, eval, CPU."""
    torch.manual_seed(seed)
    name = "tiny-hf" if hf_text else "tiny"
    return load_model(ModelSpec(name=name, config=tiny_config(hf_text=hf_text)))


def sample_batch(loaded: LoadedModel, n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 (n, 3, H, W), tokens int64 (n, L)): random images + fixed captions."""
    gen = torch.Generator().manual_seed(seed)
    h, w = loaded.image_size
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    return torch.randn(n, 3, h, w, generator=gen), loaded.tokenizer(texts)


def make_images(folder: Path, classes: dict[str, int], size: int = 40, seed: int = 0) -> list[Path]:
    """Write small random RGB PNGs into folder/<class>/<i>.png (class "" = top level)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for cls, count in classes.items():
        d = folder / cls if cls else folder
        d.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            base = rng.integers(0, 256, size=3)
            arr = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype("uint8")
            p = d / f"{cls or 'img'}_{i:03d}.png"
            Image.fromarray(arr).save(p)
            paths.append(p)
    return paths


@pytest.fixture
def tiny() -> LoadedModel:
    return tiny_loaded()


@pytest.fixture
def tiny_hf() -> LoadedModel:
    return tiny_loaded(hf_text=True)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "calib"
    make_images(folder, {"cat": 6, "dog": 6, "car": 4})
    return folder


@pytest.fixture(scope="module")
def quantized_tiny() -> tuple[LoadedModel, object, tuple[torch.Tensor, torch.Tensor]]:
    """(quantized tiny model, QuantResult, its calibration batch) -- shared, do not mutate."""
    from clipfp8.quant.ptq import QuantConfig, quantize

    loaded = tiny_loaded()
    batch = sample_batch(loaded, 16)
    result = quantize(loaded, [batch], QuantConfig())
    return loaded, result, batch


@pytest.fixture
def make_batch() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    return sample_batch
