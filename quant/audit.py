"""The coverage audit: what is quantized on paper, and what actually runs in FP8.

(a) Static: every module's TensorQuantizers -- enabled, format, amax, static/dynamic.
(b) Run time: one batch through BOTH towers under a ``TorchDispatchMode`` that records every
    GEMM-like aten op executed and whether each of its matrix operands was fake-quantized.

How "was fake-quantized" is decided (the tagging technique): a forward hook on every enabled
TensorQuantizer records the *storage* of its output tensor. Storage (not tensor identity) is
used because the GEMM sees views of the quantizer output (``aten.t`` of a weight, the
``view``/``transpose`` of Q/K/V), and views share storage. Inside the dispatch mode, tags also
propagate through value-preserving copies (``clone``, ``contiguous``, ``_unsafe_view``, ``cat``
of tagged tensors, ...), and an in-place op that writes anything else into a tagged storage
removes the tag. Every tagged tensor is kept alive until the audit ends, so a freed storage can
never be reused by an unquantized tensor and be mistaken for a quantized one.
A GEMM whose operands are not all tagged is a gap unless its module matches an exclusion
pattern or is a known output projection; a gap in a tower or an attention module raises
``AuditError``.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.hooks import RemovableHandle

from clipfp8.quant.attention import attention_module_types
from clipfp8.quant.core.errors import AuditError
from clipfp8.quant.core.protocols import as_clip
from clipfp8.quant.qconfig import QuantConfig

log = logging.getLogger(__name__)

#: GEMM-like aten ops -> positions of their matrix operands (the ones that must be FP8).
GEMM_OPERANDS: dict[str, tuple[int, ...]] = {
    "mm": (0, 1), "bmm": (0, 1), "matmul": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2),
    "addbmm": (1, 2), "linear": (0, 1), "convolution": (0, 1), "_convolution": (0, 1),
    "conv2d": (0, 1), "_scaled_mm": (0, 1), "_scaled_dot_product_flash_attention": (0, 1, 2),
    "_scaled_dot_product_efficient_attention": (0, 1, 2), "_scaled_dot_product_cudnn_attention": (0, 1, 2),
    "_scaled_dot_product_flash_attention_for_cpu": (0, 1, 2), "_scaled_dot_product_attention_math": (0, 1, 2),
    "scaled_dot_product_attention": (0, 1, 2), "_native_multi_head_attention": (0, 1, 2),
    "_transformer_encoder_layer_fwd": (0,),
}
#: Ops whose output holds exactly the values of their tensor inputs (so tags propagate).
_VALUE_PRESERVING = frozenset({"clone", "contiguous", "_unsafe_view", "cat", "stack", "copy", "alias",
                               "detach", "lift_fresh", "expand_copy", "view_copy", "permute_copy",
                               "transpose_copy", "t_copy", "_reshape_alias", "reshape", "flatten"})
#: Raw-parameter output projections (``x @ proj``) that ModelOpt cannot see; by module name.
OUTPUT_PROJECTIONS = {"visual": "visual.proj", "": "text_projection"}


@dataclass
class QuantizerInfo:
    """One TensorQuantizer: ``module`` owns it, ``name`` is e.g. ``input_quantizer``."""

    module: str
    name: str
    enabled: bool
    num_bits: str
    amax: float | None
    mode: str  # "static", "dynamic" or "off"


@dataclass
class OpRecord:
    """One executed GEMM-like op: aten name, owning module, tower, FP8 or why not."""

    op: str
    module: str
    tower: str
    attention: bool
    fp8: bool
    #: "fp8"; "excluded" (name pattern); "tower-off" / "attention-off" (QuantConfig.towers /
    #: quantize_attention); "projection" (raw-parameter output projection); "gap" (silent).
    status: str


@dataclass
class AuditReport:
    quantizers: list[QuantizerInfo]
    ops: list[OpRecord]
    excluded: list[str]
    attention_covered: bool
    gaps: list[str] = field(default_factory=list)

    @property
    def n_fp8(self) -> int:
        return sum(o.fp8 for o in self.ops)

    def summary(self) -> str:
        ex = "; ".join(self.excluded) or "none"
        return (f"{self.n_fp8} of {len(self.ops)} GEMM-like ops in FP8; attention covered: "
                f"{'yes' if self.attention_covered else 'no'}; excluded: {ex}")

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "fp8_ops": self.n_fp8, "gemm_ops": len(self.ops),
                "attention_covered": self.attention_covered, "excluded": self.excluded,
                "gaps": self.gaps, "ops": [asdict(o) for o in self.ops],
                "quantizers": [asdict(q) for q in self.quantizers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """Readable table: one row per module with its quantizers, then the executed GEMMs."""
        rows = [f"{'module':<56} quantizers (E4M3 = FP8 (4,3); static amax)"]
        by_module: dict[str, list[QuantizerInfo]] = {}
        for q in self.quantizers:
            by_module.setdefault(q.module, []).append(q)
        for mod, qs in by_module.items():
            rows.append(f"{mod or '<root>':<56} " + "  ".join(_cell(q) for q in qs))
        rows += ["", f"{'GEMM-like op (executed)':<56} {'aten op':<24} status"]
        for mod, op, status, count in _group_ops(self.ops):
            rows.append(f"{mod or '<root>':<56} {op + (f' x{count}' if count > 1 else ''):<24} {status}")
        rows += ["", self.summary()]
        return "\n".join(rows)


def _cell(q: QuantizerInfo) -> str:
    name = q.name.removesuffix("_quantizer")
    if not q.enabled:
        return f"{name}:off"
    fmt = "E4M3" if q.num_bits == "(4, 3)" else q.num_bits
    amax = f"{q.amax:.4g}" if q.amax is not None else "none"
    return f"{name}:{fmt} {amax}" if q.mode == "static" else f"{name}:{fmt} dynamic"


def _group_ops(ops: list[OpRecord]) -> list[tuple[str, str, str, int]]:
    out: dict[tuple[str, str, str], int] = {}
    for o in ops:
        key = (o.module, o.op, o.status)
        out[key] = out.get(key, 0) + 1
    return [(m, op, s, n) for (m, op, s), n in out.items()]


def _quantizers(model: nn.Module) -> list[tuple[str, str, Any]]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, TensorQuantizer):
            owner, _, qname = name.rpartition(".")
            found.append((owner, qname, mod))
    return found


def quantizer_counts(model: nn.Module) -> tuple[int, int]:
    """(enabled, total) TensorQuantizers in ``model``."""
    qs = _quantizers(model)
    return sum(q.is_enabled for _, _, q in qs), len(qs)


def static_audit(model: nn.Module, strict: bool = True) -> list[QuantizerInfo]:
    """Every quantizer with its state. With ``strict``, raises ``AuditError`` for an enabled
    static quantizer without a finite, positive amax (it was never calibrated)."""
    infos = []
    for owner, qname, q in _quantizers(model):
        amax = getattr(q, "_amax", None)
        amax_v = float(amax.detach().float().max()) if amax is not None and amax.numel() else None
        dynamic = bool(getattr(q, "_dynamic", False))
        mode = "off" if not q.is_enabled else ("dynamic" if dynamic else "static")
        bits = q.num_bits
        infos.append(QuantizerInfo(owner, qname, bool(q.is_enabled),
                                   str(tuple(bits)) if isinstance(bits, (tuple, list)) else str(bits), amax_v, mode))
    bad = uncalibrated(infos)
    if bad and strict:
        raise AuditError(f"{len(bad)} quantizers not calibrated: {'; '.join(bad[:5])}")
    return infos


class _Recorder(TorchDispatchMode):
    """Records GEMM-like ops; propagates "quantized storage" tags through value copies."""

    def __init__(self, tagged: set[int], keep: list[torch.Tensor], stack: list[str]) -> None:
        super().__init__()
        self.tagged, self.keep, self.stack = tagged, keep, stack
        self.ops: list[tuple[str, str, bool]] = []

    def _is_tagged(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and _storage(t) != 0 and _storage(t) in self.tagged

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        owner = self.stack[-1] if self.stack else ""
        if name in GEMM_OPERANDS:
            operands = [args[i] for i in GEMM_OPERANDS[name] if i < len(args)]
            fp8 = bool(operands) and all(self._is_tagged(t) or (isinstance(t, torch.Tensor) and t.dtype in
                                         (torch.float8_e4m3fn, torch.float8_e5m2)) for t in operands)
            self.ops.append((name, owner, fp8))
            return out
        tensors = [a for a in _flat(args) if isinstance(a, torch.Tensor)]
        mutated = func._schema.is_mutable and tensors
        if name in _VALUE_PRESERVING or name.rstrip("_") == "copy":
            src = tensors[1:] if mutated else tensors
            if src and all(self._is_tagged(t) for t in src):
                for o in _flat(out):
                    if isinstance(o, torch.Tensor):
                        self.tagged.add(_storage(o))
                        self.keep.append(o)
                return out
        if mutated:  # something else was written into args[0]: it no longer holds FP8 values
            self.tagged.discard(_storage(tensors[0]))
        return out


def _flat(x: Any) -> list[Any]:
    if isinstance(x, (list, tuple)):
        return [y for item in x for y in _flat(item)]
    return [x]


def _bits(q: Any) -> tuple[int, ...]:
    bits = q.num_bits
    return tuple(bits) if isinstance(bits, (tuple, list)) else (int(bits),)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _owner_flags(name: str, attn_names: set[str]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in attn_names)


def _matches(name: str, patterns: tuple[str, ...]) -> str | None:
    for pat in patterns:
        if fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(name, pat + ".*"):
            return pat
    return None


def _install_hooks(model: nn.Module, tagged: set[int], keep: list[torch.Tensor],
                   stack: list[str]) -> list[RemovableHandle]:
    """Hooks that tag the storage of every E4M3 quantizer output (kept alive in ``keep``) and
    keep ``stack`` naming the module running now. Every hook returns None: a returned value
    would replace the module's input or output."""
    handles: list[RemovableHandle] = []

    def tag(_m: nn.Module, _i: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and _storage(out):  # 0: empty tensor, no storage
            tagged.add(_storage(out))
            keep.append(out)

    def push(name: str) -> Callable[[nn.Module, Any], None]:
        def hook(_m: nn.Module, _i: Any) -> None:
            stack.append(name)
        return hook

    def pop(_m: nn.Module, _i: Any, _o: Any) -> None:
        stack.pop()

    for _owner, _qname, q in _quantizers(model):
        # Only quantizers that really fake-quantize to E4M3 tag their outputs.
        if q.is_enabled and getattr(q, "_if_quant", True) and tuple(_bits(q)) == (4, 3):
            handles.append(q.register_forward_hook(tag))
    for name, mod in model.named_modules():
        if not type(mod).__name__.endswith("TensorQuantizer"):
            handles.append(mod.register_forward_pre_hook(push(name)))
            handles.append(mod.register_forward_hook(pop))
    return handles


def runtime_ops(model: nn.Module, sample_batch: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[str, str, bool]]:
    """Run one batch (both towers) and return (aten op, owning module, fp8) per GEMM-like op."""
    clip = as_clip(model)
    tagged: set[int] = set()
    keep: list[torch.Tensor] = []
    stack: list[str] = []
    images, tokens = sample_batch
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    rec = _Recorder(tagged, keep, stack)
    handles = _install_hooks(model, tagged, keep, stack)
    try:
        with torch.no_grad(), rec:
            # encode_image/encode_text bypass the root's hooks: ops run in their own body (CLIP's
            # ``x @ text_projection``) are owned by the root, named "".
            clip.encode_image(images.to(device=device, dtype=dtype))
            clip.encode_text(tokens.to(device))
    finally:
        for h in handles:
            h.remove()
    return rec.ops


def _tower(module: str) -> str:
    return "image" if module == "visual" or module.startswith("visual.") else "text"


def audit(model: nn.Module, sample_batch: tuple[torch.Tensor, torch.Tensor],
          qcfg: QuantConfig | None = None) -> AuditReport:
    """Static + run-time audit of a quantized CLIP ``model`` on one (images, tokens) batch.

    ``qcfg`` (``quant.ptq.QuantConfig``, default: the default config) names the intended
    exclusions. Raises ``AuditError`` when a tower or the attention path runs GEMMs in high
    precision without being excluded, or when an enabled quantizer is uncalibrated.
    """
    qcfg = qcfg or QuantConfig()
    quantizers = static_audit(model, strict=False)
    attn_names = {n for n, m in model.named_modules() if isinstance(m, attention_module_types())}
    records, gaps = [], []
    excluded: dict[str, set[str]] = {}  # description key -> owning modules
    projections: dict[str, int] = {}
    for op, owner, fp8 in runtime_ops(model, sample_batch):
        is_attn = _owner_flags(owner, attn_names)
        status, key = ("fp8", None) if fp8 else _classify(owner, op, is_attn, qcfg)
        if status == "projection":
            # The raw-parameter output projection is ONE matmul per tower forward; any further
            # high-precision GEMM in the same forward body is a gap, not a projection.
            projections[owner] = projections.get(owner, 0) + 1
            if projections[owner] > 1:
                status, key = "gap", None
        if key is not None:
            excluded.setdefault(key, set()).add(owner)
        records.append(OpRecord(op, owner, _tower(owner), is_attn, fp8, status))
        if status == "gap":
            gaps.append(f"{owner or '<root>'}:{op} ({_tower(owner)} tower{', attention' if is_attn else ''})")
    # Attention is covered when every attention op not deliberately excluded runs in FP8.
    attn_ops = [r for r in records if r.attention and r.status in ("fp8", "gap", "attention-off")]
    attn_ok = bool(attn_ops) and all(r.fp8 for r in attn_ops)
    described = [_describe(key, mods, model) for key, mods in excluded.items()]
    report = AuditReport(quantizers, records, described, attn_ok, sorted(set(gaps)))
    _raise_on_gaps(report, qcfg)
    return report


def _classify(owner: str, op: str, is_attn: bool, qcfg: QuantConfig) -> tuple[str, str | None]:
    """(status, exclusion key) of a GEMM that did not run in FP8."""
    pat = _matches(owner, qcfg.exclude)
    if pat is not None:
        return "excluded", f"pattern:{pat}"
    if owner in OUTPUT_PROJECTIONS and not is_attn:
        return "projection", f"projection:{owner}"
    if is_attn and not qcfg.quantize_attention and op not in ("linear", "addmm", "mm"):
        return "attention-off", "attention"
    if _tower(owner) not in qcfg.towers:
        return "tower-off", f"tower:{_tower(owner)}"
    return "gap", None


def _describe(key: str, modules: set[str], model: nn.Module) -> str:
    kind, _, what = key.partition(":")
    if kind == "projection":
        return f"{OUTPUT_PROJECTIONS[what]} (output projection: raw parameter matmul, kept high precision)"
    if kind == "attention":
        return "attention matmuls (quantize_attention=False)"
    if kind == "tower":
        return f"{what} tower (not quantized, by config)"
    if modules == {what} and isinstance(model.get_submodule(what), nn.Conv2d) and what.endswith("conv1"):
        return f"{what} (patch embedding, excluded by config)"
    return f"{what} ({len(modules)} module{'s' if len(modules) > 1 else ''}, excluded by config)"


def uncalibrated(quantizers: list[QuantizerInfo]) -> list[str]:
    """Enabled static quantizers without a finite, positive amax."""
    return [f"{q.module}.{q.name} is enabled but not calibrated (amax={q.amax})" for q in quantizers
            if q.mode == "static" and (q.amax is None or not math.isfinite(q.amax) or q.amax <= 0)]


def _raise_on_gaps(report: AuditReport, qcfg: QuantConfig) -> None:
    problems = list(report.gaps) + uncalibrated(report.quantizers)
    for tower in qcfg.towers:
        if not any(r.fp8 for r in report.ops if r.tower == tower):
            problems.insert(0, f"the {tower} tower runs no GEMM in FP8")
    if qcfg.quantize_attention and not report.attention_covered:
        problems.insert(0, "the attention path is not (fully) in FP8")
    if problems:
        log.error("audit failed:\n%s", report.table())
        raise AuditError(f"{report.summary()}. Silently high precision: " + "; ".join(problems[:8])
                         + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""))


__all__ = ["audit", "static_audit", "runtime_ops", "quantizer_counts", "AuditReport", "OpRecord",
           "QuantizerInfo", "GEMM_OPERANDS"]
