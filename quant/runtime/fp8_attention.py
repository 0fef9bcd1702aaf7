"""Attention for the FP8 runtime.

The quantized model's attention blocks are ``ExplicitAttention`` modules (``quant.attention``):
q_proj/k_proj/v_proj/out_proj Linears + ``F.scaled_dot_product_attention``, with optional
ModelOpt quantizers ``q_bmm_quantizer``/``k_bmm_quantizer``/``v_bmm_quantizer``/``softmax_quantizer``.
``FP8Attention`` runs the four projections as FP8 GEMMs and applies the calibrated Q/K/V FP8
rounding (fused by torch.compile into the projection epilogue copies), then a 16-bit fused
SDPA (flash / memory-efficient): torch has no FP8 SDPA kernel, and attention is ~4 % of the
FLOPs of a ViT-L/14 at 257 tokens, so a 16-bit softmax costs little. The softmax FP8 rounding
cannot be applied inside a fused kernel; ``exact_softmax=True`` runs the explicit
QK^T -> softmax -> FP8 round -> PV path instead (bit-faithful to fake quant, slower).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from clipfp8.quant.runtime.fp8_linear import FakeQuantFP8

log = logging.getLogger(__name__)

#: FP8 rounding modules of Q, K and V (``nn.Identity`` where one is not quantized).
QKVQuant = tuple[nn.Module, nn.Module, nn.Module]


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
    """

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
        q = _split_heads(self.q_quant(self.q_proj(query)), self.num_heads)
        k = _split_heads(self.k_quant(self.k_proj(key)), self.num_heads)
        v = _split_heads(self.v_quant(self.v_proj(value)), self.num_heads)
        mask = _float_mask(attn_mask, q.dtype)
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


__all__ = ["FP8Attention", "ensure_explicit_attention", "qkv_quantizers"]
