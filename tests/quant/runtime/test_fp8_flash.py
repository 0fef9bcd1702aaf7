"""The Triton FP8 flash-attention option of the FP8 runtime: when it is used, how it is stored in
an engine, and (in a child process under Triton's interpreter) the kernel itself."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipfp8.quant.runtime import fp8_flash
from clipfp8.quant.runtime.fp8_attention import FP8Attention, use_flash_kernel
from clipfp8.quant.runtime.fp8_encoder import build_fp8_model
from clipfp8.quant.runtime.runtime_state import export_runtime, plain_model, rebuild_runtime

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]

needs_triton = pytest.mark.skipif(not fp8_flash._triton(), reason="Triton is not installed with this torch")


@needs_triton
def test_the_kernel_runs_under_the_interpreter_in_a_child_process() -> None:
    """``test_fp8_flash_interpreted.py`` with TRITON_INTERPRET=1: the kernel against its torch
    reference, and a tiny model whose attention all runs it, audited. Every test must pass (none
    may skip: a skip would mean the interpreter was not on)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                           str(HERE / "test_fp8_flash_interpreted.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert "8 passed" in proc.stdout and "skipped" not in proc.stdout, tail


def test_without_the_interpreter_the_cpu_keeps_the_torch_path(quantized_tiny) -> None:  # type: ignore[no-untyped-def]
    """On the CPU (no interpreter in this process) every module keeps the torch path with the
    exact softmax rounding the kernel would have applied, and the report says why."""
    if fp8_flash.interpreting():
        pytest.skip("this process runs Triton's interpreter")
    _, result, _ = quantized_tiny
    model, report = build_fp8_model(copy.deepcopy(result.model), "cpu", dtype=torch.float32, mode="emulate",
                                    attention_kernel="triton")
    modules = [m for m in model.modules() if isinstance(m, FP8Attention)]
    assert modules and all(m.kernel == "torch" and m.exact_softmax for m in modules)
    assert any("in 0 of 4" in n for n in report.notes)
    assert any("TRITON_INTERPRET" in n or "Triton is not installed" in n for n in report.notes)


def test_modules_without_fp8_rounding_are_not_switched(quantized_tiny) -> None:  # type: ignore[no-untyped-def]
    _, result, _ = quantized_tiny
    model, _ = build_fp8_model(copy.deepcopy(result.model), "cpu", dtype=torch.float32, mode="emulate",
                               exact_softmax=False)  # fused path: no softmax rounding module
    used, notes = use_flash_kernel(model, "cpu")
    assert used == [] and len(notes) == 4 and all("no calibrated FP8 rounding" in n for n in notes)


@needs_triton
def test_unsupported_reasons() -> None:
    assert "device 'meta'" in str(fp8_flash.unsupported_reason(torch.device("meta"), 64))
    if fp8_flash.interpreting():
        assert "head dimension 24" in str(fp8_flash.unsupported_reason(torch.device("cpu"), 24))
    else:
        assert "TRITON_INTERPRET" in str(fp8_flash.unsupported_reason(torch.device("cpu"), 64))


def test_unknown_kernel_is_refused(quantized_tiny) -> None:  # type: ignore[no-untyped-def]
    _, result, _ = quantized_tiny
    with pytest.raises(ValueError, match="attention_kernel must be one of"):
        build_fp8_model(copy.deepcopy(result.model), "cpu", mode="emulate", attention_kernel="cudnn")


def test_engine_state_keeps_the_kernel_choice(quantized_tiny) -> None:  # type: ignore[no-untyped-def]
    """The engine's runtime plan records each attention module's kernel, and a rebuild restores
    it (the engine key pins the GPU kind, so what ran at build time runs here); an unknown
    kernel in a plan is refused."""
    loaded, result, _ = quantized_tiny
    model, report = build_fp8_model(copy.deepcopy(result.model), "cpu", dtype=torch.float32, mode="emulate",
                                    exact_softmax=True)
    names = [n for n, m in model.named_modules() if isinstance(m, FP8Attention)]
    model.get_submodule(names[0]).kernel = "triton"  # as use_flash_kernel sets it on a GPU
    exported = export_runtime(model, plain_model(loaded.spec).model, report)
    assert exported is not None
    state, plan = exported
    kernels = {e["path"]: e["kernel"] for e in plan["modules"] if e["kind"] == "fp8_attention"}
    assert kernels == {n: ("triton" if n == names[0] else "torch") for n in names}
    rebuilt = rebuild_runtime(plain_model(loaded.spec).model, plan, state, "cpu", torch.float32)
    assert [rebuilt.get_submodule(n).kernel for n in names] == [kernels[n] for n in names]
    for e in plan["modules"]:
        if e["kind"] == "fp8_attention":
            e["kernel"] = "cudnn"
    with pytest.raises(KeyError, match="unknown attention kernel 'cudnn'"):
        rebuild_runtime(plain_model(loaded.spec).model, plan, state, "cpu", torch.float32)


def test_audit_cli_needs_runtime_for_the_kernel_flag(tmp_path: Path) -> None:
    from clipfp8.quant.cli import CLIUsageError
    from clipfp8.quant.cli_quantize import cmd_audit

    class Args:
        runtime = False
        emulate = False
        exact_softmax = False
        attention_kernel = "triton"
        quantized = tmp_path

    with pytest.raises(CLIUsageError, match="--attention-kernel only apply with --runtime"):
        cmd_audit(Args())  # type: ignore[arg-type]


def _gpu_case(b: int, h: int, n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """float8 Q, K, V on CUDA whose scores spread over several units (a peaked softmax)."""
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(b, h, n, d, generator=g) * 40).to(torch.float8_e4m3fn).cuda() for _ in range(3))


@pytest.mark.gpu
@pytest.mark.xfail(strict=True, raises=AssertionError, reason="failed on the H200, 2026-12-05 (max error 0.21 against 0.12 for the FP8 rounding of "
                   "P alone; docs/runtime.md): the kernel is wrong on the GPU, right in the interpreter")
def test_compiled_kernel_equals_its_reference_in_every_tile_configuration() -> None:
    """Each GPU tile configuration, without a mask (ViT-L/14's image shape), with the causal mask
    and with a key-padding mask (its text shape): within a small error of the fp32 reference
    with the same FP8 rounding of P, and clearly farther from the same attention without it."""
    import torch.nn.functional as F

    if torch.cuda.get_device_capability() < fp8_flash.MIN_CAPABILITY:
        pytest.skip("needs FP8 tensor cores (compute capability >= 8.9)")
    sc = tuple(torch.tensor(x, device="cuda") for x in (0.05, 0.04, 0.023, 448.0, 1 / 448.0))
    pad = torch.zeros(2, 1, 1, 77, device="cuda")
    pad[1, ..., 40:] = float("-inf")
    cases = [((2, 16, 257, 64), None), ((2, 12, 77, 64), torch.full((77, 77), float("-inf"), device="cuda").triu(1)),
             ((2, 12, 77, 64), pad)]
    for (b, h, n, d), mask in cases:
        q, k, v = _gpu_case(b, h, n, d)
        vt = v.transpose(-2, -1).contiguous()
        ref = fp8_flash.reference_attention(q, k, v, sc, mask)
        plain = F.scaled_dot_product_attention(q.float() * sc[0], k.float() * sc[1], v.float() * sc[2],
                                               attn_mask=mask).transpose(1, 2)
        far = (plain - ref).abs().max()
        for tiles in [None, *fp8_flash.GPU_CONFIGS]:
            got = fp8_flash.launch(q, k, vt, sc, mask, d ** -0.5, torch.float16, tiles=tiles).float()
            err = (got - ref).abs().max()
            assert err < far / 4 and F.cosine_similarity(got.flatten(1), ref.flatten(1)).min() > 0.9999, (tiles, mask)


@pytest.mark.gpu
@pytest.mark.xfail(strict=True, raises=AssertionError, reason="failed on the H200, 2026-12-05 (text cosine 0.9953 < 0.999; docs/runtime.md): "
                   "the kernel is wrong on the GPU, right in the interpreter")
def test_tiny_model_with_the_kernel_compiled_and_graphed_matches_fake_quant(quantized_tiny) -> None:  # type: ignore[no-untyped-def]
    """A tiny quantized CLIP whose attention runs the kernel: the runtime audit on CUDA counts
    every attention call as FP8 flash attention; eager, compiled (dynamic batch) and replayed
    from a CUDA graph bucket, each tower matches the fake-quant model."""
    import torch.nn.functional as F

    from clipfp8.quant.runtime.fast_fp16 import BatchRunner
    from clipfp8.quant.runtime.runtime_audit import runtime_audit

    if torch.cuda.get_device_capability() < fp8_flash.MIN_CAPABILITY:
        pytest.skip("needs FP8 tensor cores (compute capability >= 8.9)")
    _, result, batch = quantized_tiny
    fake = copy.deepcopy(result.model).cuda().half()
    flash, report = build_fp8_model(copy.deepcopy(result.model), "cuda", attention_kernel="triton")
    assert all(m.kernel == "triton" for m in flash.modules() if isinstance(m, FP8Attention))
    images, tokens = batch[0].cuda().half(), batch[1].cuda()
    audit = runtime_audit(flash, (images, tokens), report, result.report)  # raises on a fallback
    assert {c.status for c in audit.attention} == {"fp8-flash"} and len(audit.attention) == 4
    for tower, x in (("encode_image", images), ("encode_text", tokens)):
        runner = BatchRunner(getattr(flash, tower), compile=True, graph_buckets=(4,))
        with torch.no_grad():
            ref = getattr(fake, tower)(x).float()
            for got in (getattr(flash, tower)(x), runner(x[:3]), runner(x)):  # eager, graph bucket 4, compiled
                n = got.shape[0]
                assert F.cosine_similarity(got.float(), ref[:n]).min() > 0.999, tower
