"""Shared tiny fixtures for the runtime tests: a tiny open_clip CLIP and its FP8 fake-quant twin."""
from __future__ import annotations

import pytest
import torch

from clipfp8.quant.core.config import ModelSpec
from clipfp8.quant.core.models import load_model, tiny_config


def tiny_inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 (n, 3, 32, 32), tokens int64 (n, 16)) for ``tiny_config()``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(1, 49408, (n, 16), generator=g)


@pytest.fixture(scope="session")
def tiny_loaded():
    torch.manual_seed(0)
    return load_model(ModelSpec(name="tiny", config=tiny_config()))


@pytest.fixture(scope="session")
def tiny_fake_quant(tiny_loaded):
    """ModelOpt FP8 fake-quant (fp32, CPU) of the tiny model, calibrated on random data; Q/K/V and
    softmax quantizers enabled so the attention path is exercised too."""
    from clipfp8.quant.runtime.calibrate import fp8_quantize

    imgs, toks = zip(*(tiny_inputs(8, seed=s) for s in (1, 2)))
    return fp8_quantize(tiny_loaded.model, list(imgs), list(toks), softmax=True).eval()
