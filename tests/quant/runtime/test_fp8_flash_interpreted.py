"""The Triton FP8 flash-attention kernel (``quant.runtime.fp8_flash``) run by Triton's interpreter.

The interpreter must be switched on before Triton is first imported (``TRITON_INTERPRET=1``), so
these tests run in a child pytest process that ``test_fp8_flash.py`` starts with that variable;
in an ordinary session they skip. They execute the kernel's own code (every load, dot, mask and
the FP8 cast of P) on CPU tensors; the GPU tests run it compiled.
"""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from clipfp8.quant.runtime import fp8_flash
from clipfp8.quant.runtime.fp8_attention import FP8Attention
from clipfp8.quant.runtime.fp8_encoder import build_fp8_model
from clipfp8.quant.runtime.runtime_audit import cpu_scaled_mm_available, runtime_audit

pytestmark = pytest.mark.skipif(not fp8_flash.interpreting(),
                                reason="runs in a child process with TRITON_INTERPRET=1 (test_fp8_flash.py)")

F8 = torch.float8_e4m3fn


def _qkv(b: int, h: int, n: int, s: int, d: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(b, h, m, d, generator=g) * 40).to(F8) for m in (n, s, s))


def _scales(p_amax: float) -> tuple[torch.Tensor, ...]:
    qmul = torch.tensor(448.0 / p_amax)
    return torch.tensor(0.011), torch.tensor(0.017), torch.tensor(0.023), qmul, 1 / qmul


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sc: tuple[torch.Tensor, ...],
         mask: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    vt = v.transpose(-2, -1).contiguous()
    return fp8_flash.fp8_flash_attention(q, k, vt, sc[0], sc[1], sc[2], sc[3], sc[4], mask,
                                         q.shape[-1] ** -0.5, dtype)


@pytest.mark.parametrize(("n", "s", "d", "causal"), [(37, 37, 16, False), (37, 37, 32, True), (5, 70, 32, False)])
def test_kernel_equals_its_torch_reference(n: int, s: int, d: int, causal: bool) -> None:
    """Ragged blocks (37 = 32 + 5 rows/keys), a causal mask, cross attention with more keys than
    queries: the kernel computes exactly ``reference_attention`` (same FP8 codes of P)."""
    q, k, v = _qkv(2, 3, n, s, d)
    sc = _scales(0.9)
    mask = torch.full((n, s), float("-inf")).triu(1) if causal else None
    got = _run(q, k, v, sc, mask)
    ref = fp8_flash.reference_attention(q, k, v, sc, mask)
    assert got.shape == (2, n, 3, d) and got.is_contiguous()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if causal:  # row 0 sees only key 0: its output is V[0] rounded through P = 1
        expect = ((1.0 * sc[3]).clamp(max=448).to(F8).float() * sc[4] * v[:, :, 0].float() * sc[2])
        torch.testing.assert_close(got[:, 0], expect, rtol=1e-5, atol=1e-5)


def test_masks_of_any_broadcastable_shape() -> None:
    """A (B, 1, 1, S) key-padding mask (each batch row hides its own tail) and a full
    (B, H, L, S) mask are read through their strides: same result as the reference."""
    q, k, v = _qkv(2, 2, 33, 33, 32, seed=3)
    sc = _scales(0.8)
    pad = torch.zeros(2, 1, 1, 33)
    pad[0, ..., 30:] = float("-inf")
    pad[1, ..., 7:] = float("-inf")
    full = torch.randn(2, 2, 33, 33)
    for mask in (pad, full):
        torch.testing.assert_close(_run(q, k, v, sc, mask), fp8_flash.reference_attention(q, k, v, sc, mask),
                                   rtol=1e-5, atol=1e-5)
    # the padded keys carry no weight: changing them changes nothing
    v2 = v.clone()
    v2[1, :, 7:] = (torch.randn(2, 26, 32) * 40).to(F8)
    torch.testing.assert_close(_run(q, k, v2, sc, pad)[1], _run(q, k, v, sc, pad)[1])


def test_p_is_rounded_to_the_calibrated_grid() -> None:
    """The FP8 rounding of P is real: a coarse grid (large amax) moves the output measurably
    away from the unrounded softmax, and the reference with that grid is still matched."""
    q, k, v = _qkv(1, 2, 40, 40, 32, seed=1)
    sc = _scales(400.0)  # P * 448/400: most probabilities fall into e4m3's subnormal range
    got = _run(q, k, v, sc, None)
    unrounded = F.scaled_dot_product_attention(q.float() * sc[0], k.float() * sc[1], v.float() * sc[2])
    assert (got - unrounded.transpose(1, 2)).abs().max() > 1e-2
    torch.testing.assert_close(got, fp8_flash.reference_attention(q, k, v, sc, None), rtol=1e-5, atol=1e-5)


def test_half_output() -> None:
    q, k, v = _qkv(1, 2, 20, 20, 16, seed=2)
    sc = _scales(1.0)
    got = _run(q, k, v, sc, None, torch.float16)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), fp8_flash.reference_attention(q, k, v, sc, None), rtol=2e-3, atol=2e-3)


def _towers(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    images, tokens = batch
    with torch.no_grad():
        return model.encode_image(images).float(), model.encode_text(tokens).float()


@pytest.mark.skipif(not cpu_scaled_mm_available(), reason="this torch has no CPU float8 _scaled_mm")
def test_model_with_the_kernel_matches_the_exact_torch_path_and_passes_the_audit(quantized_tiny) -> None:  # type: ignore[no-untyped-def]
    """A tiny quantized CLIP: every attention module runs the kernel (both towers; the text
    tower with its causal mask), the embeddings match the exact-softmax torch runtime and the
    fake-quant model, and the runtime audit counts each call as FP8 attention."""
    _, result, batch = quantized_tiny
    flash, report = build_fp8_model(copy.deepcopy(result.model), "cpu", dtype=torch.float32, mode="scaled_mm",
                                    attention_kernel="triton")
    exact, _ = build_fp8_model(copy.deepcopy(result.model), "cpu", dtype=torch.float32, mode="scaled_mm",
                               exact_softmax=True)
    modules = [m for m in flash.modules() if isinstance(m, FP8Attention)]
    assert modules and all(m.kernel == "triton" for m in modules)
    assert any("flash-attention kernel (Triton) in 4 of 4" in n for n in report.notes)
    got, ref = _towers(flash, batch), _towers(exact, batch)
    fake = _towers(result.model, batch)
    for g, r, f in zip(got, ref, fake, strict=True):
        assert F.cosine_similarity(g, r).min() > 0.9999
        assert F.cosine_similarity(g, f).min() > 0.999
    audit = runtime_audit(flash, batch, report, result.report)
    assert audit.fallbacks == {} and {c.status for c in audit.attention} == {"fp8-flash"}
    assert len(audit.attention) == len(modules)
    assert all(c.label == "triton:fp8-flash" for c in audit.attention)
    assert "Triton FP8 flash attention" in audit.attention_mode()
    for tower in ("image", "text"):
        _, _, a8, a = audit.tower_counts(tower)
        assert a8 == a == 2


def test_attention_module_takes_2d_and_3d_masks(quantized_tiny) -> None:  # type: ignore[no-untyped-def]
    """A text-tower FP8Attention with the kernel equals the same module on the torch path for a
    causal (L, S) mask and its (1, L, S) form (broadcast over batch and heads)."""
    _, result, _ = quantized_tiny
    model, _ = build_fp8_model(copy.deepcopy(result.model), "cpu", dtype=torch.float32, mode="emulate",
                               attention_kernel="triton")
    att = next(m for n, m in model.named_modules() if isinstance(m, FP8Attention) and not n.startswith("visual"))
    x = torch.randn(2, 16, att.q_proj.out_features, generator=torch.Generator().manual_seed(4))
    causal = torch.full((16, 16), float("-inf")).triu(1)
    for mask in (causal, causal[None]):
        att.kernel = "triton"
        got = att(x, attn_mask=mask)[0]
        att.kernel = "torch"
        ref = att(x, attn_mask=mask)[0]
        assert F.cosine_similarity(got.flatten(1), ref.flatten(1)).min() > 0.9999
    assert not torch.equal(got, att(x)[0])  # the mask mattered
