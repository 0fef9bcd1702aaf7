"""A self-contained FP8 PTQ for benchmarks and tests of the runtime (random data is enough there:
speed does not depend on the values, and the numerics tests compare against the same
fake-quant model). Real checkpoints come from ``quant.ptq`` / ``clipfp8 quantize``.
"""
from __future__ import annotations

import copy
import logging
from typing import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

_FP8 = {"num_bits": (4, 3), "axis": None}


def runtime_fp8_config(exclude: Iterable[str] = ("*visual.conv1*",), bmm: bool = True,
                       softmax: bool = False) -> dict:
    """ModelOpt (0.47 list format) FP8 per-tensor config: every Linear's weight and input,
    attention Q/K/V (``bmm``) and optionally the softmax output; ``exclude`` patterns disabled."""
    cfg = [{"quantizer_name": "*", "enable": False},
           {"quantizer_name": "*weight_quantizer", "cfg": dict(_FP8)},
           {"quantizer_name": "*input_quantizer", "cfg": dict(_FP8)}]
    if bmm:
        cfg += [{"quantizer_name": f"*{n}_bmm_quantizer", "cfg": dict(_FP8)} for n in ("q", "k", "v")]
    if softmax:
        cfg.append({"quantizer_name": "*softmax_quantizer", "cfg": dict(_FP8)})
    cfg += [{"quantizer_name": f"{pat}", "enable": False} for pat in exclude]
    return {"quant_cfg": cfg, "algorithm": "max"}


def avoid_modelopt_cuda_jit() -> None:
    """Make ModelOpt fake-quantize FP8 with its eager torch path instead of JIT-building its CUDA
    extension (49 s on the H200 on first use); the two compute the same rounding."""
    try:
        from modelopt.torch.quantization import extensions
    except ImportError:  # pragma: no cover - modelopt is a dependency
        return
    extensions.get_cuda_ext_fp8.extension = None


def fp8_quantize(model: nn.Module, image_batches: list[torch.Tensor] | None,
                 text_batches: list[torch.Tensor] | None, *, softmax: bool = False,
                 exclude: Iterable[str] = ("*visual.conv1*",), copy_model: bool = True) -> nn.Module:
    """Explicit attention + ModelOpt FP8 max calibration of an open_clip model.

    ``image_batches``: float tensors (B, 3, H, W); ``text_batches``: int64 tokens (B, ctx), on the
    model's device. Returns the fake-quant model (a deep copy unless ``copy_model`` is False).
    """
    import modelopt.torch.quantization as mtq

    from clipfp8.quant.runtime.fp8_attention import ensure_explicit_attention

    avoid_modelopt_cuda_jit()
    from clipfp8.quant.attention import register_quant_attention

    register_quant_attention()  # ModelOpt wrappers that add the *_bmm/softmax quantizers of attention
    model = copy.deepcopy(model) if copy_model else model
    n = ensure_explicit_attention(model)
    log.info("explicit attention: %d blocks", n)

    def forward_loop(m: nn.Module) -> None:
        with torch.no_grad():
            for x in image_batches or []:
                m.encode_image(x)
            for t in text_batches or []:
                m.encode_text(t)

    return mtq.quantize(model, runtime_fp8_config(exclude=exclude, softmax=softmax), forward_loop)


__all__ = ["runtime_fp8_config", "fp8_quantize", "avoid_modelopt_cuda_jit"]
