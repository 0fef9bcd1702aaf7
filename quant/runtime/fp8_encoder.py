"""``create_fp8_encoder``: the calibrated ModelOpt checkpoint run with real FP8 GEMMs on CUDA.

Load (``quant.checkpoint.load_quantized``) -> ``convert_to_fp8`` (FP8 weights, static scales)
-> fp16 activations on the GPU -> ``torch.compile`` (fuses each activation's FP8 cast into the
LayerNorm/GELU/residual kernel that produces it) + CUDA graphs for small batches.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipfp8.quant.core.config import EncoderSpec
from clipfp8.quant.core.errors import UnsupportedPrecisionError
from clipfp8.quant.core.models import without_image_tower
from clipfp8.quant.runtime.convert import ConversionReport, cast_for_runtime, convert_to_fp8
from clipfp8.quant.runtime.engine import engine_policy, prepare_engine
from clipfp8.quant.runtime.fast_fp16 import FastTorchEncoder
from clipfp8.quant.runtime.fp8_attention import KERNELS, FP8Attention, use_flash_kernel
from clipfp8.quant.runtime.runtime_state import load_from_engine

log = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 9)


def check_fp8_device(device: str) -> torch.device:
    """The CUDA device for real FP8 GEMMs; raises ``UnsupportedPrecisionError`` otherwise."""
    if not device.startswith("cuda"):
        raise UnsupportedPrecisionError(
            f"precision 'fp8' runs real FP8 GEMMs and needs a CUDA GPU (device {device!r}); "
            "use precision 'fp8-fake' to simulate FP8 on the CPU")
    if not torch.cuda.is_available():
        raise UnsupportedPrecisionError("precision 'fp8' needs CUDA, but torch.cuda.is_available() is False")
    dev = torch.device(device)
    cap = torch.cuda.get_device_capability(dev)
    if cap < MIN_CAPABILITY:
        raise UnsupportedPrecisionError(
            f"precision 'fp8' needs compute capability >= 8.9 (Ada/Hopper) for FP8 tensor cores; "
            f"{torch.cuda.get_device_name(dev)} has {cap[0]}.{cap[1]} (use 'fp16' or 'fp8-fake')")
    return dev


def build_fp8_model(fake_quant_model: nn.Module, device: str | torch.device = "cuda", *,
                    dtype: torch.dtype = torch.float16, exact_softmax: bool = True,
                    fast_accum: bool = True, mode: str = "scaled_mm",
                    attention_kernel: str = "torch") -> tuple[nn.Module, ConversionReport]:
    """Convert a ModelOpt fake-quant model in place and move it to ``device``/``dtype``.

    ``attention_kernel="triton"``: attention runs the Triton FP8 flash kernel (``fp8_flash``:
    Q, K, V and P in FP8, P exactly rounded, so it implies ``exact_softmax``) wherever it can;
    modules it cannot serve keep the torch path, listed in the report's notes."""
    if attention_kernel not in KERNELS:
        raise ValueError(f"build_fp8_model: attention_kernel must be one of {KERNELS}, got {attention_kernel!r}")
    exact_softmax = exact_softmax or attention_kernel == "triton"
    report = convert_to_fp8(fake_quant_model, mode=mode, exact_softmax=exact_softmax, fast_accum=fast_accum)
    leftovers = [n for n, m in fake_quant_model.named_modules() if type(m).__name__ == "TensorQuantizer"
                 and getattr(m, "is_enabled", False)]
    if leftovers:
        report.notes.append(f"{len(leftovers)} ModelOpt quantizers still fake-quantize (e.g. {leftovers[:2]})")
    model = cast_for_runtime(fake_quant_model, device, dtype).eval()
    if attention_kernel == "triton":
        used, skipped = use_flash_kernel(model, device)
        report.notes.append(f"FP8 flash-attention kernel (Triton) in {len(used)} of {len(used) + len(skipped)} "
                            "attention modules")
        report.notes.extend(f"  torch attention path: {why}" for why in skipped)
    return model, report


def create_fp8_encoder(spec: EncoderSpec, *, compile: bool = True, exact_softmax: bool = False,
                       engine: str | None = None, engine_dir: Path | None = None,
                       cache: Any = None, attention_kernel: str = "torch") -> FastTorchEncoder:
    """Real-FP8 ``Encoder`` for ``spec`` (precision ``fp8``, ``quantized`` dir required).

    ``exact_softmax``: keep the checkpoint's FP8 rounding of the softmax output P (bit-faithful
    to the fake-quant model, but explicit attention: measured 0.79x the best FP16 on the H200
    for ViT-L/14, docs/benchmarks.md). The default, False, runs FP8 Q/K/V into the fused 16-bit
    SDPA kernel (1.32x), i.e. it skips only the rounding of P, which moves results towards FP16.
    ``engine``: compiled-engine policy (``quant.runtime.engine``; default ``$CLIPFP8_ENGINE``):
    a stored engine matching this GPU/torch/checkpoint is loaded before the first compile, so
    that compile is a cache hit; a mismatching one raises ``EngineMismatchError``; ``eager``
    does not compile. ``attention_kernel="triton"``: the Triton FP8 flash-attention kernel, P
    rounded exactly (``build_fp8_model``; a separate engine variant; experimental: it failed its
    accuracy tests on the H200, docs/runtime.md, and a warning says so).
    Raises ``UnsupportedPrecisionError`` without a CUDA GPU of compute capability >= 8.9.
    """
    if spec.precision != "fp8":
        raise UnsupportedPrecisionError(f"create_fp8_encoder serves precision 'fp8', got {spec.precision!r}")
    device = spec.resolved_device()
    check_fp8_device(device)
    from clipfp8.quant.checkpoint import check_same_model, load_quantized

    if spec.quantized is None:
        raise UnsupportedPrecisionError("precision 'fp8' needs --quantized (a directory written by `clipfp8 quantize`)")
    check_same_model(spec.quantized, spec.model)
    # A text-only caller (one `search` query) runs eagerly: compiling costs seconds, a query ms.
    # It still takes the engine's converted model when there is one (no ModelOpt import).
    compile = compile and engine_policy(engine) != "eager" and not spec.text_only
    flash = attention_kernel == "triton"
    variant = f"softmax={'exact' if exact_softmax or flash else 'fused'}" + (",attention=triton" if flash else "")
    stored = stored_checksum(spec.quantized)
    runtime = None
    if stored is not None and (compile or spec.text_only):  # before the slow checkpoint load: a mismatch fails fast
        status = prepare_engine(spec, checksum=stored, model_id=spec.model.model_id(), variant=variant,
                                engine=engine, engine_dir=engine_dir, cache=cache, load_cache=compile)
        if status.folder is not None:  # the engine's converted model: no ModelOpt, no conversion
            runtime = load_from_engine(spec, status.folder, status.rebuild, device)
    if runtime is not None and stored is not None:
        (loaded, model, report), checksum = runtime, stored
    else:
        loaded, checksum = load_quantized(spec.quantized)  # verifies the stored checksum
        if spec.text_only:  # a text query: convert and move only the text tower
            loaded = without_image_tower(loaded, checksum=checksum)
        # A text query keeps the torch path (below): exact softmax, the kernel's function.
        model, report = build_fp8_model(loaded.model, device, exact_softmax=exact_softmax or flash,
                                        attention_kernel="torch" if spec.text_only else attention_kernel)
    if spec.text_only:
        # One `search` query runs eagerly: the explicit exact path computes the kernel's function
        # without importing Triton, compiling the kernel or autotuning its tiles in a cold process
        # (an engine's rebuilt model may name the kernel: it is switched back here).
        for m in model.modules():
            if isinstance(m, FP8Attention):
                m.kernel = "torch"
    log.info("FP8 runtime for %s: %s", spec.quantized, report.summary())
    if not (exact_softmax or flash):
        log.info("FP8 runtime: softmax output kept in 16 bit (fused SDPA); exact_softmax=True rounds it to FP8")
    for name, why in report.emulated:
        log.info("  emulated (dequantized fp16 GEMM): %s (%s)", name, why)
    enc = FastTorchEncoder(model, loaded.preprocess, loaded.tokenizer, precision="fp8", device=device,
                           name=f"{loaded.spec.name}-fp8", model_id=loaded.spec.model_id(), checksum=checksum,
                           dim=loaded.embed_dim, image_size=loaded.image_size, batch_size=spec.batch_size,
                           compile=compile, engine_variant=variant)
    enc.conversion_report = report  # type: ignore[attr-defined]  # an optional extra attribute the audit reads
    return enc


def stored_checksum(quantized: Path) -> str | None:
    """The checksum recorded in ``quantized/manifest.json`` (cheap: no model is loaded), or None
    when it cannot be read -- ``load_quantized`` then reports the problem."""
    try:
        value = json.loads((Path(quantized) / "manifest.json").read_text(encoding="utf-8")).get("checksum")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


__all__ = ["create_fp8_encoder", "stored_checksum", "build_fp8_model", "check_fp8_device", "MIN_CAPABILITY"]
