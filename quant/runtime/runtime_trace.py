"""The op trace behind the runtime audit (``quant.runtime.runtime_audit``): which GEMM kernels
and attention calls the converted FP8 runtime model really executes, and who owns them.

One sample batch runs through both towers, eagerly, under two modes at once:

* a ``TorchDispatchMode`` records every GEMM-like aten op (``quant.audit.GEMM_OPERANDS`` plus
  ``_scaled_mm``) with its owning module -- forward hooks keep the module stack, as
  ``quant.audit`` does -- and whether it is an FP8 GEMM: ``_scaled_mm`` with two float8 operands;
  and each call of the Triton FP8 flash-attention op (``clipfp8::fp8_flash_attention``) as an
  attention call, FP8 when its Q, K and V operands are float8;
* a ``TorchFunctionMode`` sees each attention call an attention module makes itself
  (``F.scaled_dot_product_attention``; ``matmul`` on the exact-softmax path) before torch lowers
  it, and checks that every operand lies on the FP8 grid of one of the module's calibrated
  rounding modules (``FakeQuantFP8``): rounding it again changes no element. That is what
  "FP8 Q/K/V" (and, exact, FP8 P) means at run time: torch has no FP8 SDPA kernel, so the
  runtime feeds FP8-rounded 16-bit tensors to a 16-bit kernel. The GEMM-like aten ops the call
  lowers to (flash, efficient, cudnn, the CPU flash kernel, or a decomposed math path's
  ``bmm``) are recorded with the call, not as separate GEMMs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.hooks import RemovableHandle

from clipfp8.quant.audit import GEMM_OPERANDS
from clipfp8.quant.core.errors import AuditError
from clipfp8.quant.core.protocols import as_clip
from clipfp8.quant.runtime.fp8_attention import FP8Attention
from clipfp8.quant.runtime.fp8_linear import FakeQuantFP8

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
#: aten ops that are FP8 GEMMs when their two matrix operands are float8.
SCALED_MM_OPS = frozenset({"_scaled_mm", "_scaled_mm_v2"})
#: The Triton FP8 flash-attention custom op (``fp8_flash``): one whole attention call.
FLASH_OP = "fp8_flash_attention"
#: Short names of the fused attention kernels (aten op -> table label).
ATTENTION_KERNELS = {
    FLASH_OP: "triton:fp8-flash",
    "_scaled_dot_product_flash_attention": "sdpa:flash",
    "_scaled_dot_product_efficient_attention": "sdpa:efficient",
    "_scaled_dot_product_cudnn_attention": "sdpa:cudnn",
    "_scaled_dot_product_flash_attention_for_cpu": "sdpa:flash_cpu",
    "_scaled_dot_product_fused_attention_overrideable": "sdpa:fused",
}
#: Attributes holding an attention module's FP8 rounding of Q/K/V/P: ``FP8Attention``'s own, and
#: the stand-ins ``convert_to_fp8`` puts into other quantized attention (e.g. HF BERT's).
ROUNDER_ATTRS = ("q_quant", "k_quant", "v_quant", "softmax_quant",
                 "q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer")
#: torch function name -> (call kind, names of its matrix operands) for attention calls.
_ATTENTION_FUNCS = {"scaled_dot_product_attention": ("sdpa", ("query", "key", "value")),
                    "matmul": ("matmul", ("input", "other")), "bmm": ("matmul", ("input", "mat2")),
                    "__matmul__": ("matmul", ("input", "other"))}


@dataclass
class AttentionCall:
    """One attention call of module ``module``: ``kind`` "sdpa" (fused), "matmul" (the
    exact-softmax path) or "fp8-flash" (the Triton FP8 kernel); ``kernels``: the GEMM-like aten ops it lowered to; ``operands_fp8``:
    each matrix operand (Q, K, V / the two matmul operands) on an FP8 grid; ``status``: set by
    the audit."""

    module: str
    tower: str
    kind: str
    kernels: list[str]
    operands_fp8: list[bool]
    status: str = "gap"

    @property
    def label(self) -> str:
        """The kernel, for tables: ``sdpa:flash``, ``sdpa:math`` (decomposed), ``bmm``..."""
        named = sorted({ATTENTION_KERNELS[k] for k in self.kernels if k in ATTENTION_KERNELS})
        if named:
            return "+".join(named)
        if self.kind == "sdpa":
            return "sdpa:math"
        return "+".join(sorted(set(self.kernels))) or self.kind


@dataclass
class GemmEvent:
    """One GEMM-like aten op outside attention calls: op, owner, FP8 GEMM or not, operand dtype."""

    op: str
    module: str
    fp8: bool
    dtype: str


#: What a trace returns, in execution order.
TraceEvent = GemmEvent | AttentionCall


def tower_of(module: str) -> str:
    """"image" for ``visual`` and below, else "text" (as ``quant.audit`` attributes towers)."""
    return "image" if module == "visual" or module.startswith("visual.") else "text"


def on_fp8_grid(t: Any, rounders: list[FakeQuantFP8]) -> bool:
    """``t`` is float8, or holds only values of one rounder's FP8 grid (rounding it again changes
    nothing). A 16-bit tensor that was not rounded with that scale fails on almost every element."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return False
    if t.dtype in FP8_DTYPES:
        return True
    # ``forward``, not ``__call__``: the audit's own check must not run the module hooks.
    return any(torch.equal(r.forward(t), t) for r in rounders)


#: Class-name endings of rounding modules (ModelOpt's quantizers, the converter's stand-ins):
#: never owners of an op.
_ROUNDING_CLASSES = ("TensorQuantizer", "DisabledQuantizer")


@dataclass
class _Trace:
    stack: list[str] = field(default_factory=list)
    events: list[TraceEvent] = field(default_factory=list)
    current: AttentionCall | None = None


class _GemmRecorder(TorchDispatchMode):
    def __init__(self, trace: _Trace) -> None:
        super().__init__()
        self.trace = trace

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        if name == FLASH_OP and self.trace.current is None:
            # Q, K, V^T as float8 operands; P is rounded to FP8 inside the kernel.
            owner = self.trace.stack[-1] if self.trace.stack else ""
            operands = [isinstance(t, torch.Tensor) and t.dtype in FP8_DTYPES for t in args[:3]]
            self.trace.events.append(AttentionCall(owner, tower_of(owner), "fp8-flash", [name], operands))
            return out
        if name not in SCALED_MM_OPS and name not in GEMM_OPERANDS:
            return out
        if self.trace.current is not None:  # lowered from an attention call: part of that call
            self.trace.current.kernels.append(name)
            return out
        mats = [t for t in args[:2] if isinstance(t, torch.Tensor)]
        fp8 = name in SCALED_MM_OPS and len(mats) == 2 and all(t.dtype in FP8_DTYPES for t in mats)
        dtype = str(mats[0].dtype).removeprefix("torch.") if mats else "?"
        self.trace.events.append(GemmEvent(name, self.trace.stack[-1] if self.trace.stack else "", fp8, dtype))
        return out


class _AttentionWatcher(TorchFunctionMode):
    def __init__(self, trace: _Trace, attention: dict[str, list[FakeQuantFP8]]) -> None:
        super().__init__()
        self.trace, self.attention = trace, attention

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        spec = _ATTENTION_FUNCS.get(getattr(func, "__name__", ""))
        owner = self.trace.stack[-1] if self.trace.stack else ""
        # Only calls the attention module makes itself; its projections are Linears of their own.
        if spec is None or owner not in self.attention or self.trace.current is not None:
            return func(*args, **kwargs)
        kind, names = spec
        operands = [args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)]
        rounders = self.attention[owner]
        call = AttentionCall(owner, tower_of(owner), kind, [], [on_fp8_grid(t, rounders) for t in operands])
        self.trace.current = call
        try:
            return func(*args, **kwargs)
        finally:
            self.trace.current = None
            self.trace.events.append(call)


def _install_hooks(model: nn.Module, stack: list[str]) -> list[RemovableHandle]:
    """Forward hooks keeping ``stack`` naming the module running now. Rounding modules are not
    owners, and a converter wrapper ``Sequential(FakeQuantFP8, Conv2d)`` owns its inner module's
    ops, so owners carry the names the fake-quant model used. Every hook returns None (a returned
    value would replace the module's input or output)."""
    handles: list[RemovableHandle] = []
    inner = {id(m[1]) for m in model.modules() if isinstance(m, nn.Sequential) and len(m) == 2
             and isinstance(m[0], FakeQuantFP8)}

    def push(name: str) -> Callable[[nn.Module, Any], None]:
        def hook(_m: nn.Module, _i: Any) -> None:
            stack.append(name)
        return hook

    def pop(_m: nn.Module, _i: Any, _o: Any) -> None:
        stack.pop()

    for name, mod in model.named_modules():
        rounding = isinstance(mod, FakeQuantFP8) or type(mod).__name__.endswith(_ROUNDING_CLASSES)
        if not rounding and id(mod) not in inner:
            handles.append(mod.register_forward_pre_hook(push(name)))
            handles.append(mod.register_forward_hook(pop))
    return handles


def attention_modules(model: nn.Module, names: list[str]) -> dict[str, list[FakeQuantFP8]]:
    """Attention modules of the runtime ``model`` (``FP8Attention``, modules with attention
    quantizer stand-ins, and ``names``) -> their FP8 rounding modules (empty: none)."""
    wanted = set(names)
    out = {}
    for n, m in model.named_modules():
        if n in wanted or isinstance(m, FP8Attention) or any(hasattr(m, a) for a in ROUNDER_ATTRS[4:]):
            out[n] = [r for a in ROUNDER_ATTRS if isinstance(r := getattr(m, a, None), FakeQuantFP8)]
    return out


def activation(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, activation dtype) of a runtime model: its first floating, non-FP8 parameter's."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype not in FP8_DTYPES:
            return p.device, p.dtype
    raise AuditError(f"{type(model).__name__} has no floating-point parameter: not a converted CLIP model")


def trace_runtime(model: nn.Module, sample_batch: tuple[torch.Tensor, torch.Tensor],
                  attention: dict[str, list[FakeQuantFP8]]) -> list[TraceEvent]:
    """Run (images float (N, 3, H, W), tokens int64 (N, L)) through both towers of the runtime
    ``model`` (moved to its device and activation dtype); return the events in execution order."""
    clip = as_clip(model)
    device, dtype = activation(model)
    trace = _Trace()
    handles = _install_hooks(model, trace.stack)
    images, tokens = sample_batch
    try:
        with torch.no_grad(), _AttentionWatcher(trace, attention), _GemmRecorder(trace):
            # As quant.audit: encode_* bypass the root's hooks, so the root's own matmul (CLIP's
            # ``x @ text_projection``) is owned by "", the name the fake-quant audit gives it.
            clip.encode_image(images.to(device=device, dtype=dtype))
            clip.encode_text(tokens.to(device))
    finally:
        for h in handles:
            h.remove()
    return trace.events


__all__ = ["trace_runtime", "attention_modules", "activation", "on_fp8_grid", "tower_of", "AttentionCall",
           "GemmEvent", "TraceEvent", "FP8_DTYPES", "SCALED_MM_OPS", "ATTENTION_KERNELS", "ROUNDER_ATTRS",
           "FLASH_OP"]
