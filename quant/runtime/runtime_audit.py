"""The runtime audit: what the converted FP8 runtime really executes, judged against what the
fake-quant audit proved for the same checkpoint.

``quant.audit`` proves FP8 coverage for the ModelOpt fake-quant model; this module proves it for
the model ``convert_to_fp8`` / ``build_fp8_model`` make of it (the model ``create_fp8_encoder``
compiles). ``runtime_trace`` runs one sample batch through both towers and records every GEMM-like
aten op and attention call with its owning module; each is then judged:

* ``fp8``: ``_scaled_mm`` on float8 operands (a real FP8 GEMM);
* ``fp8-qkv``: an attention call whose Q/K/V lie on their calibrated FP8 grids, into a 16-bit
  fused SDPA kernel (the softmax output P stays 16 bit: ``create_fp8_encoder``'s default);
* ``fp8-exact``: an exact-softmax attention matmul whose operands (Q, K^T / P, V) are all
  FP8-rounded (``exact_softmax=True``);
* ``fp8-flash``: a call of the Triton FP8 flash-attention kernel on float8 Q, K and V (P is
  rounded to FP8 inside it; ``attention_kernel="triton"``);
* ``excluded`` / ``projection`` / ``tower-off`` / ``attention-off``: a high-precision op in a
  module where the fake-quant audit allowed one (e.g. ``visual.conv1``, ``x @ proj``), as many
  times as it did there;
* ``emulated``: a GEMM on dequantized FP8 values (``mode="emulate"``, or a shape ``_scaled_mm``
  rejects, or a quantized Conv) -- not FP8;
* ``gap``: any other high-precision op.

A module whose GEMM is FP8 in the fake-quant audit (or that ``convert_to_fp8`` reported as FP8)
and that runs no FP8 op here "fell back"; ``RuntimeAuditReport.raise_on_fallbacks`` raises
``AuditError`` naming each such module. The trace is eager: ``torch.compile`` fuses elementwise
work around these ops, but it does not change which GEMMs the modules call, nor their dtypes.
"""
from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from clipfp8.quant.audit import AuditReport, OpRecord
from clipfp8.quant.core.errors import AuditError, UnsupportedPrecisionError
from clipfp8.quant.runtime.convert import ConversionReport
from clipfp8.quant.runtime.fp8_linear import FP8Embedding, FP8Linear
from clipfp8.quant.runtime.runtime_trace import (
    AttentionCall,
    GemmEvent,
    TraceEvent,
    activation,
    attention_modules,
    tower_of,
    trace_runtime,
)

log = logging.getLogger(__name__)

#: Runtime statuses that count as FP8 (see the module docstring).
FP8_STATUSES = ("fp8", "fp8-qkv", "fp8-exact", "fp8-flash")
#: High-precision statuses the fake-quant audit can allow.
ALLOWED_STATUSES = ("excluded", "projection", "tower-off", "attention-off")
TOWERS = ("image", "text")
LEGEND = ("runtime: fp8 = FP8 _scaled_mm; fp8-qkv = FP8 Q/K/V into a 16-bit fused SDPA; fp8-exact = "
          "attention matmul on FP8-rounded operands; fp8-flash = Triton FP8 attention kernel (Q, K, V, P in FP8); "
          "emulated = GEMM on dequantized FP8 values")


@dataclass
class RuntimeAuditReport:
    """The runtime audit of one converted model. ``runtime`` is in the fake-quant audit's format
    (``AuditReport`` without quantizers), so both say "N of M GEMM-like ops in FP8"; attention
    calls are its ops named ``attn:<kernel>``."""

    runtime: AuditReport
    reference: AuditReport
    conversion: ConversionReport
    attention: list[AttentionCall]
    #: module -> why it fell back to high precision (empty when the audit passes).
    fallbacks: dict[str, str]
    device: str
    activation_dtype: str
    notes: list[str] = field(default_factory=list)

    def tower_counts(self, tower: str) -> tuple[int, int, int, int]:
        """(FP8 GEMMs, GEMMs, FP8 attention calls, attention calls) run by ``tower``."""
        gemms = [r for r in self.runtime.ops if r.tower == tower and not r.op.startswith("attn:")]
        calls = [c for c in self.attention if c.tower == tower]
        return (sum(r.fp8 for r in gemms), len(gemms), sum(c.status in FP8_STATUSES for c in calls), len(calls))

    def attention_mode(self) -> str:
        """How attention ran: FP8 Q/K/V into a 16-bit fused softmax, exact FP8 softmax, or both."""
        modes = []
        fused = sorted({c.label for c in self.attention if c.status == "fp8-qkv"})
        if fused:
            modes.append(f"FP8 Q/K/V -> 16-bit fused softmax ({', '.join(fused)})")
        if any(c.status == "fp8-exact" for c in self.attention):
            modes.append("exact FP8 softmax (explicit matmuls, P rounded to FP8)")
        if any(c.status == "fp8-flash" for c in self.attention):
            modes.append("Triton FP8 flash attention (Q, K, V and P in FP8 on tensor cores)")
        return "; ".join(modes) or "no FP8 attention"

    def summary(self) -> str:
        lines = [f"runtime ({self.device}, {self.activation_dtype} activations): {self.runtime.summary()}"]
        for tower in TOWERS:
            g8, g, a8, a = self.tower_counts(tower)
            lines.append(f"  {tower} tower: {g8} of {g} GEMMs as FP8 _scaled_mm; attention: {a8} of {a} calls in FP8")
        lines.append(f"  attention: {self.attention_mode()}")
        lines.append(f"fake quant: {self.reference.summary()}")
        fell = [f"{m} ({why})" for m, why in self.fallbacks.items()]
        more = f" (+{len(fell) - 8} more)" if len(fell) > 8 else ""
        lines.append("fell back to high precision: " + ("; ".join(fell[:8]) + more if fell else "none"))
        return "\n".join(lines)

    def table(self) -> str:
        """Side by side per module group (block indices folded into ``*``): FP8 ops of all ops,
        with their statuses and aten ops, in the fake-quant model and in the runtime."""
        ref, run = _group_cells(self.reference.ops), _group_cells(self.runtime.ops)
        fell = {_group(m) for m in self.fallbacks}
        rows = [f"{'module group':<56} {'fake quant':<26} {'FP8 runtime':<30} check"]
        for group in list(ref) + [g for g in run if g not in ref]:
            check = "FELL BACK" if group in fell else "ok"
            rows.append(f"{group or '<root>':<56} {ref.get(group, '-'):<26} {run.get(group, '-'):<30} {check}")
        return "\n".join([*rows, f"({LEGEND})", "", self.summary(), *self.notes])

    def to_dict(self) -> dict[str, Any]:
        towers = {}
        for tower in TOWERS:
            g8, g, a8, a = self.tower_counts(tower)
            towers[tower] = {"fp8_gemms": g8, "gemms": g, "fp8_attention_calls": a8, "attention_calls": a}
        return {"summary": self.summary(), "device": self.device, "activation_dtype": self.activation_dtype,
                "fp8_ops": self.runtime.n_fp8, "gemm_ops": len(self.runtime.ops), "towers": towers,
                "attention_mode": self.attention_mode(), "fallbacks": self.fallbacks,
                "ops": [asdict(o) for o in self.runtime.ops], "attention": [asdict(c) for c in self.attention],
                "conversion": self.conversion.to_dict(), "fake_quant_summary": self.reference.summary(),
                "notes": self.notes}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def raise_on_fallbacks(self) -> None:
        """``AuditError`` naming every module that fell back, and why; nothing when none did."""
        if not self.fallbacks:
            return
        items = [f"{m} ({why})" for m, why in self.fallbacks.items()]
        log.error("FP8 runtime audit failed:\n%s", self.table())
        more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
        raise AuditError(f"FP8 runtime audit: {len(items)} module{'s' if len(items) > 1 else ''} fell back to high "
                         "precision: " + "; ".join(items[:8]) + more)


def _group(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def _group_cells(ops: list[OpRecord]) -> dict[str, str]:
    """module group -> "FP8 ops/ops status op[, status op]", groups in first-seen order."""
    groups: dict[str, list[OpRecord]] = {}
    for r in ops:
        groups.setdefault(_group(r.module), []).append(r)
    out = {}
    for group, recs in groups.items():
        kinds = dict.fromkeys(f"{r.status} {r.op.removeprefix('attn:')}" for r in recs)
        out[group] = f"{sum(r.fp8 for r in recs)}/{len(recs)} " + ", ".join(kinds)
    return out


def runtime_audit(model: nn.Module, sample_batch: tuple[torch.Tensor, torch.Tensor],
                  conversion: ConversionReport, reference: AuditReport, *, strict: bool = True) -> RuntimeAuditReport:
    """Trace the converted FP8 runtime ``model`` on ``sample_batch`` (images float (N, 3, H, W),
    tokens int64 (N, L)) and judge every op against ``reference`` (``quant.audit.audit`` of the
    same checkpoint before conversion) and ``conversion`` (what ``convert_to_fp8`` reported).
    With ``strict`` (default), raises ``AuditError`` naming each module that fell back."""
    attention = attention_modules(model, conversion.attention)
    events = trace_runtime(model, sample_batch, attention)
    emulated = _emulated(model, conversion)
    records, calls = _classify(events, _allowed(reference), emulated, set(attention))
    fallbacks = _fallbacks(records, reference, _claimed(model, conversion) + conversion.attention, emulated,
                           {e.module: e.dtype for e in events if isinstance(e, GemmEvent)})
    device, dtype = activation(model)
    used = {r.status for r in records}
    judged = [c for c in calls if c.status not in ALLOWED_STATUSES]
    runtime = AuditReport(quantizers=[], ops=records,
                          excluded=list(reference.excluded) if used & set(ALLOWED_STATUSES) else [],
                          attention_covered=bool(judged) and all(c.status in FP8_STATUSES for c in judged),
                          gaps=sorted(fallbacks))
    executed = {r.module for r in records}
    notes = [f"note: {m} was converted but not executed by the audit batch"
             for m in _claimed(model, conversion) if m not in executed]
    report = RuntimeAuditReport(runtime, reference, conversion, calls, fallbacks, str(device),
                                str(dtype).removeprefix("torch."), notes)
    log.debug("FP8 runtime audit: %s", runtime.summary())
    if strict:
        report.raise_on_fallbacks()
    return report


def _allowed(reference: AuditReport) -> dict[str, list[str]]:
    """module -> the high-precision statuses the fake-quant audit allowed there, one per op."""
    out: dict[str, list[str]] = {}
    for r in reference.ops:
        if not r.fp8 and r.status in ALLOWED_STATUSES:
            out.setdefault(r.module, []).append(r.status)
    return out


def _emulated(model: nn.Module, conversion: ConversionReport) -> dict[str, str]:
    """module -> why its GEMM runs on dequantized values (the converter's reason, or the mode of
    an FP8Linear, which also covers a runtime rebuilt from a stored engine)."""
    out = dict(conversion.emulated)
    for name, m in model.named_modules():
        if isinstance(m, FP8Linear) and m.mode != "scaled_mm":
            out.setdefault(name, f"FP8Linear mode {m.mode!r}")
    return out


def _claimed(model: nn.Module, conversion: ConversionReport) -> list[str]:
    """Modules ``convert_to_fp8`` reported as FP8 that run GEMMs (not the FP8 embedding gathers)."""
    modules = dict(model.named_modules())
    return [n for n in conversion.fp8 if not isinstance(modules.get(n), (FP8Embedding, nn.Embedding))]


def _classify(events: list[TraceEvent], allowed: dict[str, list[str]], emulated: dict[str, str],
              attention: set[str]) -> tuple[list[OpRecord], list[AttentionCall]]:
    """One ``OpRecord`` per GEMM and per attention call, with its runtime status."""
    budget = {k: list(v) for k, v in allowed.items()}
    records, calls = [], []

    def allowance(owner: str) -> str:
        return budget[owner].pop(0) if budget.get(owner) else "gap"

    for ev in events:
        if isinstance(ev, GemmEvent):
            status = "fp8" if ev.fp8 else "emulated" if ev.module in emulated else allowance(ev.module)
            in_attn = any(ev.module == a or ev.module.startswith(a + ".") for a in attention)
            records.append(OpRecord(op=ev.op, module=ev.module, tower=tower_of(ev.module), attention=in_attn,
                                    fp8=status == "fp8", status=status))
            continue
        if ev.operands_fp8 and all(ev.operands_fp8):
            ev.status = {"sdpa": "fp8-qkv", "fp8-flash": "fp8-flash"}.get(ev.kind, "fp8-exact")
        else:
            ev.status = allowance(ev.module)
        calls.append(ev)
        records.append(OpRecord(op=f"attn:{ev.label}", module=ev.module, tower=ev.tower, attention=True,
                                fp8=ev.status in FP8_STATUSES, status=ev.status))
    return records, calls


def _fallbacks(records: list[OpRecord], reference: AuditReport, claimed: list[str], emulated: dict[str, str],
               dtypes: dict[str, str]) -> dict[str, str]:
    """module -> why it fell back: a high-precision op not allowed by the fake-quant audit, or no
    FP8 op in a module that is FP8 in the fake-quant audit or that the converter ``claimed``."""
    out: dict[str, str] = {}
    ran: dict[str, set[str]] = {}
    fp8_there = dict.fromkeys(r.module for r in reference.ops if r.fp8)  # ordered, for the message
    for r in records:
        ran.setdefault(r.module, set()).add(r.op)
        if r.status == "emulated":
            out.setdefault(r.module, f"{r.op} in {dtypes.get(r.module, '?')} on dequantized FP8 values: "
                                     f"{emulated[r.module]}")
        elif r.status == "gap" and r.op.startswith("attn:"):
            out.setdefault(r.module, f"attention {r.op[5:]} on Q/K/V not rounded to FP8")
        elif r.status == "gap":
            there = "FP8 in the fake-quant audit" if r.module in fp8_there else "not allowed by the fake-quant audit"
            out.setdefault(r.module, f"{r.op} in {dtypes.get(r.module, '?')}; {there}")
    fp8_here = {r.module for r in records if r.fp8}
    allowed_here = {r.module for r in records if r.status in ALLOWED_STATUSES}
    for m in fp8_there:
        if m not in fp8_here:
            ops = ", ".join(sorted(ran.get(m, ()))) or "nothing"
            out.setdefault(m, f"FP8 in the fake-quant audit, but the runtime ran {ops}")
    for m in claimed:
        if m in ran and m not in fp8_here and m not in allowed_here:
            out.setdefault(m, f"convert_to_fp8 reported it FP8, but the runtime ran {', '.join(sorted(ran[m]))}")
    return out


@functools.lru_cache(maxsize=1)
def cpu_scaled_mm_available() -> bool:
    """Whether this torch runs ``torch._scaled_mm`` on float8_e4m3fn CPU tensors (2.14 does)."""
    a = torch.ones(16, 16).to(torch.float8_e4m3fn)
    one = torch.ones((), dtype=torch.float32)
    try:
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


def runtime_target(device: str | None, emulate: bool) -> tuple[str, str, torch.dtype]:
    """(device, ``convert_to_fp8`` mode, activation dtype) for auditing the FP8 runtime.

    ``device`` None or "auto": CUDA when available. Without ``emulate`` the device must be a CUDA
    GPU with FP8 tensor cores (compute capability >= 8.9); otherwise ``AuditError`` explains why
    nothing can be proven here. ``emulate`` traces the same runtime on the CPU: fp32 activations,
    FP8 GEMMs through torch's CPU ``_scaled_mm`` where this torch has one, else the converter's
    dequantize-and-matmul emulation (which the audit then reports as fallbacks)."""
    if emulate:
        return "cpu", "scaled_mm" if cpu_scaled_mm_available() else "emulate", torch.float32
    from clipfp8.quant.runtime.fp8_encoder import check_fp8_device

    resolved = ("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else str(device)
    try:
        return str(check_fp8_device(resolved)), "scaled_mm", torch.float16
    except UnsupportedPrecisionError as e:
        why = f" ({e})" if resolved.startswith("cuda") else ""
        raise AuditError(f"cannot audit the FP8 runtime on {resolved!r}{why}: it runs real FP8 GEMMs only on a CUDA "
                         "GPU with FP8 tensor cores (compute capability >= 8.9), so nothing it would run can be "
                         "proven here; `--emulate` traces the same converted model on the CPU instead") from e


__all__ = ["runtime_audit", "RuntimeAuditReport", "runtime_target", "cpu_scaled_mm_available", "FP8_STATUSES",
           "ALLOWED_STATUSES"]
