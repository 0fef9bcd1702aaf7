"""Shared tiny fixtures for the runtime tests: a tiny open_clip CLIP and its FP8 fake-quant twin."""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import nn

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


def fake_quantize(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  qcfg: Any = None, disabled: Sequence[str] = (), extra_rules: Sequence[dict] = ()) -> nn.Module:
    """A ModelOpt FP8 fake-quant copy of ``model`` made with the product's PTQ config
    (``quant.ptq.prepare_model`` + ``build_mtq_config(qcfg)``, default ``QuantConfig()``: Q/K/V and
    softmax quantized, ``visual.conv1`` excluded), calibrated on (images, tokens) ``batches`` in
    the model's own dtype and device; ``disabled``: extra quantizer-name patterns switched off
    (tests of partial coverage); ``extra_rules``: more ModelOpt rules, applied last. No audit."""
    import modelopt.torch.quantization as mtq

    from clipfp8.quant.ptq import QuantConfig, avoid_modelopt_cuda_jit, build_mtq_config, prepare_model, quiet_stdout

    avoid_modelopt_cuda_jit()
    model = copy.deepcopy(model).eval()
    prepare_model(model)
    cfg = build_mtq_config(qcfg or QuantConfig(), model)
    cfg["quant_cfg"] = (cfg["quant_cfg"] + [{"quantizer_name": pat, "enable": False} for pat in disabled]
                        + [dict(r) for r in extra_rules])

    def loop(m: nn.Module) -> None:
        with torch.no_grad():
            for images, tokens in batches:
                m.encode_image(images)
                m.encode_text(tokens)

    with quiet_stdout():
        return mtq.quantize(model, cfg, loop).eval()


@pytest.fixture(scope="session")
def tiny_fake_quant(tiny_loaded):
    """ModelOpt FP8 fake-quant (fp32, CPU) of the tiny model, calibrated on random data with the
    product's config; Q/K/V and softmax quantizers enabled so the attention path is exercised too."""
    return fake_quantize(tiny_loaded.model, [tiny_inputs(8, seed=s) for s in (1, 2)])
