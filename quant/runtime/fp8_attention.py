"""Attention for the FP8 runtime.

The quantized model's attention blocks are ``ExplicitAttention`` modules (``quant.attention``):
q_proj/k_proj/v_proj/out_proj Linears + ``F.scaled_dot_product_attention``, with optional
ModelOpt quantizers ``q_bmm_quantizer``/``k_bmm_quantizer``/``v_bmm_quantizer``/``softmax_quantizer``.
``FP8Attention`` runs the four projections as FP8 GEMMs and applies the calibrated Q/K/V FP8
rounding (fused by torch.compile into the projection epilogue copies), then a 16-bit fused
SDPA (flash / memory-efficient): torch has no FP8 SDPA kernel, and attention is ~4 % of the
FLOPs of a ViT-L/14 at 257 tokens, so a 16-bit softmax costs little. The softmax FP8 rounding
cannot be applied inside a fused kernel; ``exact_softmax=True`` runs the explicit
QK^T -> softmax -> FP8 round -> PV path instead (bit-faithful to fake quant, slower), or, with
``kernel="triton"`` (``use_flash_kernel``), the Triton kernel of ``fp8_flash``: Q, K, V and the
exactly normalised P in FP8, both matmuls on FP8 tensor cores, no (L, S) score matrix in memory.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from clipfp8.quant.runtime import fp8_flash
from clipfp8.quant.runtime.fp8_linear import FakeQuantFP8, quantize_fp8

log = logging.getLogger(__name__)

#: FP8 rounding modules of Q, K and V (``nn.Identity`` where one is not quantized).
QKVQuant = tuple[nn.Module, nn.Module, nn.Module]
#: ``FP8Attention.kernel``: torch ops (fused SDPA, or explicit matmuls when exact), or the
#: Triton FP8 flash-attention kernel (exact softmax rounding; see ``use_flash_kernel``).
KERNELS = ("torch", "triton")


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, E) -> (B, heads, L, E / heads)."""
    b, n, e = x.shape
    return x.view(b, n, heads, e // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, L, heads * d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _float_mask(attn_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:  # True = masked out, nn.MultiheadAttention's convention
        return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(attn_mask, float("-inf"))
    return attn_mask.to(dtype)


def ensure_explicit_attention(model: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` by ``quant.attention.ExplicitAttention`` (the
    quantization package's converter). Returns the number replaced."""
    from clipfp8.quant.attention import convert_attention

    return int(convert_attention(model))


def _enabled_amax(module: nn.Module, attr: str) -> torch.Tensor | None:
    """The calibrated amax of quantizer ``attr`` when it exists and is enabled, else None."""
    q = getattr(module, attr, None)
    if q is None or not getattr(q, "is_enabled", False):
        return None
    amax = getattr(q, "amax", None)
    return None if amax is None else amax.detach()


class FP8Attention(nn.Module):
    """Attention with FP8 projections (any ``nn.Module`` mapping (..., E) -> (..., E)).

    forward(query (B, L, E), key, value, need_weights=False, attn_mask=None) -> ((B, L, E), None).
    ``kernel`` ("torch" or "triton", see ``KERNELS``) is set by ``use_flash_kernel`` once the
    module is on its device: "triton" needs FP8 Q/K/V and softmax rounding modules.
    """

    kernel: str = "torch"

    def __init__(self, num_heads: int, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module,
                 out_proj: nn.Module, qkv_quant: QKVQuant | None = None,
                 softmax_quant: nn.Module | None = None, exact_softmax: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = q_proj, k_proj, v_proj, out_proj
        ident = (nn.Identity(), nn.Identity(), nn.Identity())
        self.q_quant, self.k_quant, self.v_quant = qkv_quant or ident
        self.softmax_quant = softmax_quant if exact_softmax else None
        self.exact_softmax = exact_softmax and softmax_quant is not None

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None,
                **_: object) -> tuple[torch.Tensor, None]:
        key = query if key is None else key
        value = key if value is None else value
        qp, kp, vp = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        mask = _float_mask(attn_mask, qp.dtype)
        if self.kernel == "triton":
            return self.out_proj(self._flash(qp, kp, vp, mask)), None
        q = _split_heads(self.q_quant(qp), self.num_heads)
        k = _split_heads(self.k_quant(kp), self.num_heads)
        v = _split_heads(self.v_quant(vp), self.num_heads)
        sq = self.softmax_quant  # set exactly when exact_softmax is
        if self.exact_softmax and sq is not None:
            # Same op order as quant.attention.attend (the fake-quant reference).
            scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            if mask is not None:
                scores = scores + mask
            p = sq(torch.softmax(scores.float(), dim=-1).to(q.dtype))
            out = torch.matmul(p, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(_merge_heads(out)), None

    def _flash(self, qp: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Projections (B, L|S, E) -> attention output (B, L, E) through the FP8 kernel. The
        float8 casts use the calibrated multipliers, so the codes are those the fake-quant
        rounding produces (torch.compile fuses each into its projection's epilogue copy)."""
        rounders = _flash_rounders(self)
        if rounders is None:  # guarded by use_flash_kernel; a module edited since then
            raise ValueError("FP8Attention kernel 'triton' needs FakeQuantFP8 Q/K/V and softmax rounding")
        rq, rk, rv, rp = rounders
        q8 = _split_heads(quantize_fp8(qp, rq.qmul_scale), self.num_heads)
        k8 = _split_heads(quantize_fp8(kp, rk.qmul_scale), self.num_heads)
        vt8 = _split_heads(quantize_fp8(vp, rv.qmul_scale), self.num_heads).transpose(-2, -1).contiguous()
        if mask is not None and mask.ndim == 3:
            if mask.shape[0] == q8.shape[0] * self.num_heads:  # nn.MultiheadAttention's (B * heads, L, S)
                mask = mask.view(q8.shape[0], self.num_heads, *mask.shape[1:])
            else:  # (1, L, S): broadcast over batch and heads, as the torch path does
                mask = mask.unsqueeze(1)
        out = fp8_flash.fp8_flash_attention(q8, k8, vt8, rq.scale, rk.scale, rv.scale, rp.qmul_scale, rp.scale,
                                            mask, float(q8.shape[-1]) ** -0.5, qp.dtype)
        b, n = out.shape[:2]
        return out.view(b, n, -1)  # (B, L, H, D) contiguous: merging heads is a view


def _flash_rounders(m: FP8Attention) -> tuple[FakeQuantFP8, FakeQuantFP8, FakeQuantFP8, FakeQuantFP8] | None:
    """(Q, K, V, P) FP8 rounding modules of ``m`` when all four are calibrated, else None."""
    parts = (m.q_quant, m.k_quant, m.v_quant, m.softmax_quant)
    if not all(isinstance(p, FakeQuantFP8) for p in parts):
        return None
    return parts  # type: ignore[return-value]  # narrowed by the isinstance check above


def warn_flash_experimental() -> None:
    """Logged wherever a model's attention runs the Triton kernel on CUDA (switched here, or
    rebuilt from a stored engine that names it)."""
    log.warning("the Triton FP8 flash-attention kernel is experimental: on the H200 (2026-12-05) its output "
                "was farther from its reference than the FP8 rounding of P alone accounts for "
                "(docs/runtime.md); use the torch path (the default) for results you keep")


def use_flash_kernel(model: nn.Module, device: torch.device | str) -> tuple[list[str], list[str]]:
    """Switch every ``FP8Attention`` of ``model`` (already on ``device``) that can take it to the
    Triton FP8 flash-attention kernel. Returns (module names switched, "name: why not" notes).

    A module keeps the torch path when it lacks FP8 Q/K/V or softmax rounding (a checkpoint
    without them, or ``exact_softmax=False``), or when the kernel cannot run its head dimension
    on ``device`` (``fp8_flash.unsupported_reason``). Masks of any broadcastable shape go to the
    kernel.
    """
    dev = torch.device(device)
    used: list[str] = []
    notes: list[str] = []
    for name, m in model.named_modules():
        if not isinstance(m, FP8Attention):
            continue
        head_dim = _head_dim(m)
        why = ("no calibrated FP8 rounding of Q, K, V and P" if _flash_rounders(m) is None
               else fp8_flash.unsupported_reason(dev, head_dim))
        if why is None:
            m.kernel = "triton"
            used.append(name)
        else:
            m.kernel = "torch"
            notes.append(f"{name}: {why}")
    if notes:
        log.info("FP8 flash attention: %d module(s) keep the torch path, e.g. %s", len(notes), notes[0])
    if used and dev.type == "cuda":
        warn_flash_experimental()
    return used, notes


def _head_dim(m: FP8Attention) -> int:
    out = getattr(m.q_proj, "out_features", None)
    if not isinstance(out, int) or out % m.num_heads:
        return 0
    return out // m.num_heads


def qkv_quantizers(module: nn.Module) -> tuple[QKVQuant | None, nn.Module | None, list[str]]:
    """FP8 Q/K/V and softmax rounding modules from a quantized ExplicitAttention's bmm quantizers.

    Returns ((q, k, v) or None when none is enabled, softmax or None, notes on what is skipped).
    """
    notes: list[str] = []
    amaxes = [_enabled_amax(module, f"{n}_bmm_quantizer") for n in ("q", "k", "v")]
    qkv: QKVQuant | None = None
    if any(a is not None for a in amaxes):
        q, k, v = (nn.Identity() if a is None else FakeQuantFP8(a) for a in amaxes)
        qkv = (q, k, v)
    sm_amax = _enabled_amax(module, "softmax_quantizer")
    softmax = None
    if sm_amax is not None:
        softmax = FakeQuantFP8(sm_amax)
        notes.append("softmax FP8 rounding applied only with exact_softmax=True (fused SDPA keeps P in 16 bit)")
    return qkv, softmax, notes


__all__ = ["FP8Attention", "ensure_explicit_attention", "qkv_quantizers", "use_flash_kernel", "warn_flash_experimental",
           "KERNELS"]
