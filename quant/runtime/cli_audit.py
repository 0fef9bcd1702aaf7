"""``clipfp8 audit --runtime``: the runtime side of ``quant.cli_quantize.cmd_audit``, registered
into its ``RUNTIME_AUDIT_HOOKS`` (the quantization layer never imports the runtime)."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: building the `clipfp8` parser must stay cheap
    import torch


def prepare_runtime_audit(args: argparse.Namespace) -> Callable[[Any, Any, Any], dict[str, Any]]:
    """Check the machine first (``runtime_target`` raises ``AuditError`` without an FP8 GPU unless
    ``args.emulate``); return ``run(loaded, reference, batch)``: convert ``loaded.model`` in place
    into the FP8 runtime, audit it against the fake-quant ``reference`` on ``batch`` (images,
    tokens), print the side-by-side table, raise ``AuditError`` on a fallback, return its dict."""
    from clipfp8.quant.runtime.runtime_audit import runtime_target

    device, mode, dtype = runtime_target(args.device, args.emulate)

    def run(loaded: Any, reference: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        from clipfp8.quant.runtime.fp8_encoder import build_fp8_model
        from clipfp8.quant.runtime.runtime_audit import runtime_audit

        model, conversion = build_fp8_model(loaded.model, device, dtype=dtype, exact_softmax=args.exact_softmax,
                                            mode=mode, attention_kernel=getattr(args, "attention_kernel", "torch"))
        report = runtime_audit(model, batch, conversion, reference, strict=False)
        print()
        print(report.table())
        if args.emulate:
            how = ("torch's CPU float8 _scaled_mm stood in for the GPU's FP8 tensor cores" if mode == "scaled_mm"
                   else "this torch has no CPU float8 _scaled_mm: GEMMs ran on dequantized values")
            print(f"emulated on the CPU ({how}); run on an FP8 GPU to audit the runtime that serves")
        report.raise_on_fallbacks()
        return report.to_dict()

    return run


def register() -> None:
    """Register ``prepare_runtime_audit`` with ``clipfp8 audit`` (once)."""
    from clipfp8.quant.cli_quantize import RUNTIME_AUDIT_HOOKS

    if prepare_runtime_audit not in RUNTIME_AUDIT_HOOKS:
        RUNTIME_AUDIT_HOOKS.append(prepare_runtime_audit)


__all__ = ["prepare_runtime_audit", "register"]
