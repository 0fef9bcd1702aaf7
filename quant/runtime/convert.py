"""Turn a calibrated ModelOpt fake-quant CLIP into modules that store FP8 weights and run FP8 GEMMs.

The walk is device-independent (the CPU tests run it with ``mode="emulate"``):

* a quantized ``nn.Linear`` (ModelOpt ``QuantLinear``) with enabled per-tensor weight and input
  quantizers -> ``FP8Linear`` (float8_e4m3fn weight, static scales ``amax / 448``);
  shapes ``_scaled_mm`` rejects (in/out not multiples of 16) get ``mode="emulate"`` and are listed
  in ``ConversionReport.emulated``;
* a quantized Linear whose quantizers are disabled (excluded layers) -> a plain ``nn.Linear``;
* an ``ExplicitAttention`` (q/k/v/out projections) -> ``FP8Attention``;
* any other quantized module (e.g. ``visual.conv1``, excluded) -> its plain torch class; when its
  quantizers are enabled the FP8 rounding is kept by fake quantization (listed in ``emulated``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol, cast

import torch
from torch import nn

from clipfp8.quant.runtime.fp8_attention import FP8Attention, qkv_quantizers
from clipfp8.quant.runtime.fp8_linear import (
    DisabledQuantizer,
    FakeQuantFP8,
    FP8Embedding,
    FP8Linear,
    fp8_scales,
    quantize_fp8,
    shape_supports_scaled_mm,
)

log = logging.getLogger(__name__)

MODES = ("scaled_mm", "emulate")


class _ActivationDtype(Protocol):
    """A module carrying open_clip's ``int8_original_dtype`` (the dtype its activations run in)."""

    int8_original_dtype: torch.dtype


class _Heads(Protocol):
    """An attention module that passed ``_is_explicit_attention``: its head count is an int."""

    num_heads: int


@dataclass
class ConversionReport:
    """What ``convert_to_fp8`` did, module by module (qualified names)."""

    fp8: list[str] = field(default_factory=list)
    emulated: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    high_precision: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"fp8": self.fp8, "emulated": [list(e) for e in self.emulated],
                "high_precision": self.high_precision, "attention": self.attention,
                "notes": sorted(set(self.notes))}

    def summary(self) -> str:
        return (f"{len(self.fp8)} FP8 GEMMs, {len(self.emulated)} emulated, {len(self.high_precision)} "
                f"high-precision, {len(self.attention)} attention blocks")


def _quantizer(module: nn.Module, attr: str) -> nn.Module | None:
    q = getattr(module, attr, None)
    return q if q is not None and getattr(q, "is_enabled", False) else None


def _per_tensor_amax(q: nn.Module | None) -> torch.Tensor | None:
    amax = getattr(q, "amax", None) if q is not None else None
    return amax.detach() if amax is not None and amax.numel() == 1 else None


def _plain_linear(src: nn.Linear) -> nn.Linear:
    new = nn.Linear(src.in_features, src.out_features, bias=src.bias is not None,
                    device=src.weight.device, dtype=src.weight.dtype)
    new.weight.data.copy_(src.weight.detach())
    if src.bias is not None:
        new.bias.data.copy_(src.bias.detach())
    return new


def _is_quant_module(module: nn.Module) -> bool:
    return any(hasattr(module, a) for a in ("weight_quantizer", "input_quantizer", "output_quantizer"))


def convert_linear(linear: nn.Linear, name: str, report: ConversionReport, mode: str,
                   fast_accum: bool = True) -> nn.Module:
    """One (quantized) Linear -> ``FP8Linear`` or plain ``nn.Linear``; records the choice."""
    wq, iq = _quantizer(linear, "weight_quantizer"), _quantizer(linear, "input_quantizer")
    if wq is None and iq is None:
        report.high_precision.append(name)
        return _plain_linear(linear) if _is_quant_module(linear) else linear
    w_amax, i_amax = _per_tensor_amax(wq), _per_tensor_amax(iq)
    if w_amax is None or i_amax is None:
        raise ValueError(f"{name}: FP8 runtime needs calibrated per-tensor weight and input amax "
                         f"(weight amax {getattr(wq, 'amax', None)}, input amax {getattr(iq, 'amax', None)})")
    layer_mode = mode
    if mode == "scaled_mm" and not shape_supports_scaled_mm(linear.in_features, linear.out_features):
        layer_mode = "emulate"
        report.emulated.append((name, f"shape {linear.in_features}->{linear.out_features} not a multiple of 16"))
    elif mode == "emulate":
        report.emulated.append((name, "emulation mode"))
    if layer_mode == "scaled_mm":
        report.fp8.append(name)
    return FP8Linear.from_linear(linear, w_amax, i_amax, mode=layer_mode, fast_accum=fast_accum)


def _convert_embedding(module: nn.Embedding, name: str, report: ConversionReport) -> nn.Module:
    amax = _per_tensor_amax(_quantizer(module, "weight_quantizer"))
    if amax is None:
        report.high_precision.append(name)
        new = nn.Embedding(module.num_embeddings, module.embedding_dim, device=module.weight.device,
                           dtype=module.weight.dtype)
        new.weight.data.copy_(module.weight.detach())
        return new
    report.fp8.append(name)  # FP8 storage; the gather dequantizes (no GEMM involved)
    return FP8Embedding.from_embedding(module, amax)


def _convert_layer_norm(module: nn.LayerNorm, name: str, report: ConversionReport) -> nn.Module:
    new = nn.LayerNorm(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine,
                       bias=module.bias is not None,
                       device=module.weight.device if module.weight is not None else None)
    new.load_state_dict({k: v for k, v in module.state_dict().items() if "_quantizer" not in k})
    iq = _quantizer(module, "input_quantizer")
    if iq is None:
        return new
    amax = _per_tensor_amax(iq)
    if amax is None:
        raise ValueError(f"{name}: FP8 runtime needs a calibrated per-tensor input amax "
                         f"(input amax {getattr(iq, 'amax', None)})")
    report.emulated.append((name, "LayerNorm input FP8 rounding kept by fake quant"))
    return nn.Sequential(FakeQuantFP8(amax), new)


def _convert_other(module: nn.Module, name: str, report: ConversionReport) -> nn.Module:
    """A quantized non-Linear module (Conv) -> its plain class; FP8 rounding kept by fake quant."""
    if isinstance(module, nn.Embedding):
        return _convert_embedding(module, name, report)
    if isinstance(module, nn.LayerNorm):
        return _convert_layer_norm(module, name, report)
    base = next((c for c in type(module).__mro__ if c.__module__.startswith("torch.nn")), None)
    if base is None or not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        report.notes.append(f"{name}: quantized {type(module).__name__} left as is")
        return module
    new = base(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
               padding=module.padding, dilation=module.dilation, groups=module.groups,
               bias=module.bias is not None, padding_mode=module.padding_mode,
               device=module.weight.device, dtype=module.weight.dtype)
    weight = module.weight.detach()
    wq, iq = _quantizer(module, "weight_quantizer"), _quantizer(module, "input_quantizer")
    # None for a disabled quantizer or one without a per-tensor amax.
    w_amax, i_amax = _per_tensor_amax(wq), _per_tensor_amax(iq)
    if w_amax is not None:
        qmul, s = fp8_scales(w_amax)
        weight = (quantize_fp8(weight, qmul).float() * s).to(weight.dtype)
    new.weight.data.copy_(weight)
    if module.bias is not None:
        new.bias.data.copy_(module.bias.detach())
    if wq is None and iq is None:
        report.high_precision.append(name)
        return new
    report.emulated.append((name, f"{base.__name__} has no FP8 kernel; FP8 rounding emulated"))
    if i_amax is not None:
        return nn.Sequential(FakeQuantFP8(i_amax), new)
    return new


def _convert_attention(module: nn.Module, name: str, report: ConversionReport, mode: str,
                       exact_softmax: bool, fast_accum: bool) -> nn.Module:
    q, k, v, out = (convert_linear(getattr(module, p), f"{name}.{p}", report, mode, fast_accum)
                    for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    qkv, softmax, notes = qkv_quantizers(module)
    if not exact_softmax:
        report.notes.extend(notes)
    report.attention.append(name)
    heads = int(cast(_Heads, module).num_heads)
    return FP8Attention(heads, q, k, v, out, qkv_quant=qkv, softmax_quant=softmax, exact_softmax=exact_softmax)


def _standin_attention_quantizers(module: nn.Module, name: str, report: ConversionReport,
                                  exact_softmax: bool) -> None:
    """Other quantized attention (e.g. HF ``BertSelfAttention``, whose forward calls
    ``quant.attention.attend``): swap its ModelOpt TensorQuantizers for plain torch stand-ins
    (FP8 rounding with the calibrated scale, or identity), so torch.compile sees simple code."""
    from clipfp8.quant.attention import ATTENTION_QUANTIZERS

    for qname in ATTENTION_QUANTIZERS:
        if not hasattr(module, qname):
            continue
        amax = _per_tensor_amax(_quantizer(module, qname))
        keep = qname != "softmax_quantizer" or exact_softmax
        setattr(module, qname, FakeQuantFP8(amax) if amax is not None and keep else DisabledQuantizer())
    report.attention.append(name)


def _is_explicit_attention(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads"))


def convert_to_fp8(model: nn.Module, *, mode: str = "scaled_mm", exact_softmax: bool = True,
                   fast_accum: bool = True) -> ConversionReport:
    """Replace quantized modules of ``model`` in place (see the module docstring).

    ``mode``: ``"scaled_mm"`` (real FP8 GEMMs; needs CUDA sm_89+ at run time) or ``"emulate"``.
    ``exact_softmax``: where a softmax quantizer is enabled, keep its FP8 rounding of P (explicit
    attention, faithful); False trades that for the fused SDPA kernel (cosine ~0.99 vs fake quant).
    Raises ``ValueError`` for an unknown mode or an uncalibrated quantizer (names the module).
    """
    if mode not in MODES:
        raise ValueError(f"convert_to_fp8: mode must be one of {MODES}, got {mode!r}")
    if any(isinstance(m, nn.MultiheadAttention) and _is_quant_module(m) for m in model.modules()):
        raise ValueError("convert_to_fp8: found a quantized nn.MultiheadAttention; convert attention "
                         "with quant.attention.convert_attention before quantizing")
    report = ConversionReport()
    _walk(model, "", report, mode, exact_softmax, fast_accum)
    log.info("FP8 conversion: %s", report.summary())
    return report


def _walk(module: nn.Module, prefix: str, report: ConversionReport, mode: str, exact_softmax: bool,
          fast_accum: bool) -> None:
    for child_name, child in list(module.named_children()):
        name = f"{prefix}{child_name}"
        if child_name.endswith("_quantizer"):
            continue  # ModelOpt TensorQuantizers of an unconverted parent
        if _is_explicit_attention(child):
            new = _convert_attention(child, name, report, mode, exact_softmax, fast_accum)
        elif isinstance(child, nn.Linear):
            new = convert_linear(child, name, report, mode, fast_accum)
        elif _is_quant_module(child):
            new = _convert_other(child, name, report)
        else:
            if hasattr(child, "q_bmm_quantizer"):
                _standin_attention_quantizers(child, name, report, exact_softmax)
            _walk(child, f"{name}.", report, mode, exact_softmax, fast_accum)
            continue
        setattr(module, child_name, new)


def cast_for_runtime(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """Move ``model`` to ``device`` and cast floating tensors to ``dtype`` -- except FP8 weights and
    the fp32 FP8 scales, which ``nn.Module.half()`` would silently widen/round."""
    for module in model.modules():
        keep_fp32 = isinstance(module, (FP8Linear, FakeQuantFP8, FP8Embedding))
        if hasattr(module, "int8_original_dtype"):
            # A plain attribute, not a tensor: nn.Module's typed __setattr__ does not describe it.
            cast(_ActivationDtype, module).int8_original_dtype = dtype
        for key, p in module._parameters.items():
            if p is not None:
                module._parameters[key] = nn.Parameter(_moved(p, key, keep_fp32, device, dtype),
                                                       requires_grad=False)
        for key, b in module._buffers.items():
            if b is not None:
                new = _moved(b, key, keep_fp32, device, dtype)
                module._buffers[key] = nn.Parameter(new, requires_grad=False) if isinstance(b, nn.Parameter) else new
    return model


def _moved(t: torch.Tensor, key: str, keep_fp32: bool, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """``t`` on ``device``; cast to ``dtype`` unless it is FP8, not floating point, or an fp32
    scale of an FP8 module (``keep_fp32``; its bias still follows ``dtype``)."""
    if t.dtype == torch.float8_e4m3fn or not t.is_floating_point() or (keep_fp32 and key != "bias"):
        return t.to(device)
    return t.to(device=device, dtype=dtype)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers (FP8 weights count 1 byte per element)."""
    tensors = list(module.parameters()) + [b for b in module.buffers() if b is not None]
    return int(sum(t.numel() * t.element_size() for t in tensors))


__all__ = ["ConversionReport", "convert_to_fp8", "convert_linear", "cast_for_runtime", "weight_bytes",
           "MODES"]
