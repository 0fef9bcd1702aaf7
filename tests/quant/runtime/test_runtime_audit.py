"""The runtime audit (``quant.runtime.runtime_audit``): the converted FP8 runtime of a tiny quantized
CLIP traced op by op and judged against the fake-quant audit of the same checkpoint.

This torch runs ``torch._scaled_mm`` on float8 CPU tensors (``cpu_scaled_mm_available``), so the
CPU tests audit the real ``mode="scaled_mm"`` runtime; the converter's ``mode="emulate"``
(dequantized GEMMs) must fail the audit wherever it runs, which is the "silent fallback fails"
property. The GPU test runs the same audit on CUDA in fp16.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipfp8.quant.core.errors import AuditError
from clipfp8.quant.runtime.fp8_attention import FP8Attention
from clipfp8.quant.runtime.fp8_encoder import build_fp8_model
from clipfp8.quant.runtime.fp8_linear import FakeQuantFP8, FP8Linear
from clipfp8.quant.runtime.runtime_audit import RuntimeAuditReport, cpu_scaled_mm_available, runtime_audit
from clipfp8.quant.runtime.runtime_trace import on_fp8_grid, tower_of

needs_cpu_fp8 = pytest.mark.skipif(not cpu_scaled_mm_available(),
                                   reason="this torch has no CPU float8 _scaled_mm")


def _runtime(quantized_tiny: Any, *, mode: str = "scaled_mm", exact_softmax: bool = False,
             device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """A fresh FP8 runtime of the shared quantized tiny model (the fixture is never mutated)."""
    _, result, _ = quantized_tiny
    return build_fp8_model(copy.deepcopy(result.model), device, dtype=dtype, exact_softmax=exact_softmax, mode=mode)


def _audit(quantized_tiny: Any, model: nn.Module, conversion: Any, strict: bool = True) -> RuntimeAuditReport:
    _, result, batch = quantized_tiny
    return runtime_audit(model, batch, conversion, result.report, strict=strict)


def _fp8_linears(model: nn.Module, tower: str) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, FP8Linear) and tower_of(n) == tower]


@needs_cpu_fp8
def test_real_fp8_runtime_passes_and_counts_every_op(quantized_tiny) -> None:  # type: ignore[no-untyped-def]
    model, conversion = _runtime(quantized_tiny)
    report = _audit(quantized_tiny, model, conversion)
    reference = quantized_tiny[1].report
    assert report.fallbacks == {} and report.runtime.attention_covered
    for tower in ("image", "text"):
        g8, g, a8, a = report.tower_counts(tower)
        linears = _fp8_linears(model, tower)
        allowed = [r for r in reference.ops if r.tower == tower and not r.fp8]
        assert g8 == len(linears) > 0 and g == len(linears) + len(allowed)
        attention = [n for n, m in model.named_modules() if isinstance(m, FP8Attention) and tower_of(n) == tower]
        assert a8 == a == len(attention)
    # every module that is FP8 in the fake-quant audit ran a real FP8 GEMM (or FP8 Q/K/V attention)
    ran = {(r.module, r.op) for r in report.runtime.ops if r.fp8}
    for r in reference.ops:
        if r.fp8 and r.op == "addmm":
            assert (r.module, "_scaled_mm") in ran
    statuses = {r.module: r.status for r in report.runtime.ops if not r.fp8}
    assert statuses == {"visual.conv1": "excluded", "visual": "projection", "": "projection"}
    assert {c.status for c in report.attention} == {"fp8-qkv"}
    assert all(c.label.startswith("sdpa:") and c.kernels for c in report.attention)
    assert "FP8 Q/K/V -> 16-bit fused softmax" in report.attention_mode()


@needs_cpu_fp8
def test_table_puts_fake_quant_and_runtime_side_by_side(quantized_tiny) -> None:  # type: ignore[no-untyped-def]
    model, conversion = _runtime(quantized_tiny)
    report = _audit(quantized_tiny, model, conversion)
    layers = len(model.visual.transformer.resblocks)
    rows = {line.split()[0]: line for line in report.table().splitlines() if line.strip()}
    fc = rows["visual.transformer.resblocks.*.mlp.c_fc"]
    assert f"{layers}/{layers} fp8 addmm" in fc and f"{layers}/{layers} fp8 _scaled_mm" in fc and fc.endswith("ok")
    attn = rows["transformer.resblocks.*.attn"]
    assert f"{2 * layers}/{2 * layers} fp8 bmm" in attn and f"{layers}/{layers} fp8-qkv sdpa:" in attn
    n, m = report.runtime.n_fp8, len(report.runtime.ops)
    assert f"{n} of {m} GEMM-like ops in FP8" in report.summary() and m - n == 3  # conv1 + two projections
    data = json.loads(report.to_json())
    assert data["fallbacks"] == {} and data["towers"]["image"]["fp8_gemms"] == len(_fp8_linears(model, "image"))


@needs_cpu_fp8
def test_exact_softmax_runtime_rounds_every_attention_operand(quantized_tiny) -> None:  # type: ignore[no-untyped-def]
    model, conversion = _runtime(quantized_tiny, exact_softmax=True)
    report = _audit(quantized_tiny, model, conversion)
    n_attn = sum(isinstance(m, FP8Attention) for m in model.modules())
    assert report.fallbacks == {}
    # QK^T and PV per attention module, every operand (P included) on its FP8 grid
    assert len(report.attention) == 2 * n_attn
    assert all(c.kind == "matmul" and c.status == "fp8-exact" and c.operands_fp8 == [True, True]
               for c in report.attention)
    assert "exact FP8 softmax" in report.attention_mode()


def test_emulated_runtime_fails_the_audit(quantized_tiny) -> None:  # type: ignore[no-untyped-def]
    """Dequantize-and-matmul is numerically FP8 but runs 16/32-bit GEMMs: every layer falls back."""
    model, conversion = _runtime(quantized_tiny, mode="emulate")
    with pytest.raises(AuditError, match=r"fell back to high precision: .*mlp\.c_fc \(addmm in float32 on dequantized"):
        _audit(quantized_tiny, model, conversion)
    report = _audit(quantized_tiny, model, conversion, strict=False)
    assert set(report.fallbacks) == set(_fp8_linears(model, "image") + _fp8_linears(model, "text"))
    assert report.tower_counts("image")[0] == report.tower_counts("text")[0] == 0


@needs_cpu_fp8
def test_planted_linear_fallback_is_named(quantized_tiny) -> None:  # type: ignore[no-untyped-def]
    """One FP8Linear swapped for an nn.Linear of the same (dequantized) weights: the outputs hardly
    move -- the fallback is silent -- but the audit names exactly that module."""
    model, conversion = _runtime(quantized_tiny)
    images = quantized_tiny[2][0]
    with torch.no_grad():
        before = model.encode_image(images)
    name = "visual.transformer.resblocks.1.mlp.c_fc"
    fp8 = model.get_submodule(name)
    plain = nn.Linear(fp8.in_features, fp8.out_features)
    plain.weight.data.copy_(fp8.dequantized_weight())
    plain.bias.data.copy_(fp8.bias)
    model.visual.transformer.resblocks[1].mlp.c_fc = plain
    with torch.no_grad():
        assert F.cosine_similarity(before, model.encode_image(images)).min() > 0.99
    with pytest.raises(AuditError, match=r"1 module fell back") as err:
        _audit(quantized_tiny, model, conversion)
    assert name in str(err.value) and "addmm in float32" in str(err.value)
    report = _audit(quantized_tiny, model, conversion, strict=False)
    assert list(report.fallbacks) == [name]
    row = next(ln for ln in report.table().splitlines() if ln.startswith("visual.transformer.resblocks.*.mlp.c_fc"))
    assert row.endswith("FELL BACK")


@needs_cpu_fp8
def test_attention_without_fp8_qkv_is_a_fallback(quantized_tiny) -> None:  # type: ignore[no-untyped-def]
    model, conversion = _runtime(quantized_tiny)
    model.transformer.resblocks[0].attn.q_quant = nn.Identity()  # Q reaches SDPA unrounded
    report = _audit(quantized_tiny, model, conversion, strict=False)
    assert report.fallbacks == {"transformer.resblocks.0.attn": "attention sdpa:flash_cpu on Q/K/V not rounded to FP8"}
    bad = [c for c in report.attention if c.status == "gap"]
    assert len(bad) == 1 and bad[0].operands_fp8 == [False, True, True]
    assert not report.runtime.attention_covered


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fp8_grid_check(dtype: torch.dtype) -> None:
    """Rounded tensors are fixed points of their own rounding, in every activation dtype the
    runtime uses; raw tensors and tensors rounded with another scale are not."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)).to(dtype) * 3
    own, other = FakeQuantFP8(torch.tensor(3.0)), FakeQuantFP8(torch.tensor(5.0))
    assert on_fp8_grid(own(x), [own]) and on_fp8_grid(own(x), [other, own])
    assert not on_fp8_grid(x, [own]) and not on_fp8_grid(own(x), [other]) and not on_fp8_grid(own(x), [])
    assert on_fp8_grid(x.to(torch.float8_e4m3fn), [])


def test_cli_runtime_audit(quantized_tiny, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from clipfp8.app.cli import EXIT_AUDIT_FAILED, EXIT_USAGE, main
    from clipfp8.quant.checkpoint import save_quantized
    from clipfp8.quant.ptq import QuantConfig

    loaded, result, _ = quantized_tiny
    q = save_quantized(loaded, tmp_path / "q", QuantConfig(), result.report)
    # No FP8 GPU (device cpu): nothing to prove; explained, audit-failure exit code.
    assert main(["audit", "--quantized", str(q), "--runtime", "--device", "cpu"]) == EXIT_AUDIT_FAILED
    assert "--emulate" in capsys.readouterr().err
    assert main(["audit", "--quantized", str(q), "--emulate"]) == EXIT_USAGE
    capsys.readouterr()
    js = tmp_path / "audit.json"
    rc = main(["audit", "--quantized", str(q), "--runtime", "--emulate", "--json", str(js)])
    out = capsys.readouterr().out
    if not cpu_scaled_mm_available():  # emulated GEMMs: the audit must fail
        assert rc == EXIT_AUDIT_FAILED and "FELL BACK" in out
        return
    assert rc == 0 and "FP8 runtime" in out and "fell back to high precision: none" in out
    data = json.loads(js.read_text())
    assert data["fp8_ops"] == result.report.n_fp8  # the fake-quant report, as before
    assert data["runtime"]["fallbacks"] == {} and data["runtime"]["towers"]["text"]["fp8_gemms"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 GEMMs need a CUDA GPU of compute capability >= 8.9")
@pytest.mark.parametrize("exact_softmax", [False, True])
def test_gpu_runtime_audit_has_no_fallbacks(quantized_tiny, exact_softmax: bool) -> None:  # type: ignore[no-untyped-def]
    model, conversion = _runtime(quantized_tiny, device="cuda", dtype=torch.float16, exact_softmax=exact_softmax)
    report = _audit(quantized_tiny, model, conversion)
    assert report.fallbacks == {} and report.device.startswith("cuda") and report.activation_dtype == "float16"
    for tower in ("image", "text"):
        g8, _, a8, a = report.tower_counts(tower)
        assert g8 == len(_fp8_linears(model, tower)) and a8 == a > 0
    want = "fp8-exact" if exact_softmax else "fp8-qkv"
    assert {c.status for c in report.attention} == {want}
    if not exact_softmax:  # a fused CUDA kernel, not the decomposed math path
        assert all(c.label in ("sdpa:flash", "sdpa:efficient", "sdpa:cudnn") for c in report.attention)
