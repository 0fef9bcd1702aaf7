"""Attention that ModelOpt can see: explicit Q/K/V Linears and quantizable attention matmuls.

Why this module exists: open_clip's ``ResidualAttentionBlock`` uses ``nn.MultiheadAttention``,
whose packed QKV projection is a raw ``in_proj_weight`` consumed inside
``F.multi_head_attention_forward``. ModelOpt only replaces modules, so neither the Q/K/V
projections nor the two attention matmuls (Q@K^T, P@V) would ever be quantized.

* ``ExplicitAttention`` is a numerically equivalent drop-in for ``nn.MultiheadAttention``
  (same call signature as open_clip uses it) with ``q_proj``/``k_proj``/``v_proj``/``out_proj``
  ``nn.Linear`` children and ``F.scaled_dot_product_attention``.
* ``convert_attention(model)`` swaps every ``nn.MultiheadAttention`` for it.
* ``register_quant_attention()`` registers quantized versions with ModelOpt for
  ``ExplicitAttention`` and for Hugging Face ``BertSelfAttention`` (the default model's MiniLM
  text tower), each with ``q_bmm_quantizer``/``k_bmm_quantizer``/``v_bmm_quantizer`` (inputs of
  the attention matmuls) and ``softmax_quantizer`` (the softmax output P, input of P@V).
"""
from __future__ import annotations

import logging
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import nn

from clipfp8.quant.core.weight_init import skip_weight_init

log = logging.getLogger(__name__)

#: The quantizer names every quantized attention module carries (standard ModelOpt names).
ATTENTION_QUANTIZERS: tuple[str, ...] = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer",
                                         "softmax_quantizer")


@overload
def _additive_mask(mask: torch.Tensor, dtype: torch.dtype, keep_is_true: bool) -> torch.Tensor: ...
@overload
def _additive_mask(mask: None, dtype: torch.dtype, keep_is_true: bool) -> None: ...
@overload
def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype, keep_is_true: bool) -> torch.Tensor | None: ...


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype, keep_is_true: bool) -> torch.Tensor | None:
    """Turn a boolean mask into an additive float mask (0 keep, -inf drop); floats pass through.

    ``keep_is_true``: SDPA/HF convention (True = attend); ``nn.MultiheadAttention`` uses the
    opposite (True = masked out), hence the flag.
    """
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    drop = ~mask if keep_is_true else mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(drop, float("-inf"))


def attend(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           mask: torch.Tensor | None, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q @ k^T * scale + mask) @ v, quantized when ``module`` carries quantizers.

    q: (B, H, L, Dh), k/v: (B, H, S, Dh), mask: additive float broadcastable to (B, H, L, S) or
    None -> (B, H, L, Dh), dtype of q. Without quantizers (or with the softmax quantizer
    disabled) this is one fused ``F.scaled_dot_product_attention``; SDPA fuses the softmax, so
    quantizing P needs the explicit QK^T -> softmax -> quantize(P) -> P@V path.
    """
    qq = getattr(module, "q_bmm_quantizer", None)
    if qq is not None:
        # The other three come with it (register_quant_attention): ModelOpt TensorQuantizers.
        kq, vq, sq = (getattr(module, name) for name in ATTENTION_QUANTIZERS[1:])
        q, k, v = qq(q), kq(k), vq(v)
        if sq.is_enabled:
            scores = torch.matmul(q, k.transpose(-2, -1)) * scale
            if mask is not None:
                scores = scores + mask
            p = sq(torch.softmax(scores.float(), dim=-1).to(q.dtype))
            if dropout_p:
                p = F.dropout(p, dropout_p)
            return torch.matmul(p, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


class ExplicitAttention(nn.Module):
    """``nn.MultiheadAttention`` rewritten with four ``nn.Linear`` and SDPA.

    ``forward(query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None)``
    takes (B, L, E) tensors when ``batch_first`` else (L, B, E), like ``nn.MultiheadAttention``,
    and returns ``(output, None)`` (attention weights are never materialised).
    ``attn_mask``: (L, S) or (B*H, L, S), bool (True = masked out) or additive float.
    """

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first, self.dropout = batch_first, dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> ExplicitAttention:
        """Copy the weights of ``mha`` (packed or separate Q/K/V projections)."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv/add_zero_attn is not supported")
        ref = mha.out_proj.weight
        # Built where the weights live, without random init: every parameter is copied below
        # (on the CPU, random init and a move were half a second of a ViT-L/14 cold start).
        with skip_weight_init(), torch.device(ref.device):
            new = cls(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None, kdim=mha.kdim,
                      vdim=mha.vdim, batch_first=mha.batch_first, dropout=mha.dropout)
        new.to(dtype=ref.dtype)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                ws = mha.in_proj_weight.chunk(3)
            else:
                ws = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            for lin, w in zip((new.q_proj, new.k_proj, new.v_proj), ws, strict=True):
                lin.weight.copy_(w)
            if mha.in_proj_bias is not None:
                for lin, b in zip((new.q_proj, new.k_proj, new.v_proj), mha.in_proj_bias.chunk(3), strict=True):
                    lin.bias.copy_(b)
                new.out_proj.bias.copy_(mha.out_proj.bias)
            new.out_proj.weight.copy_(mha.out_proj.weight)
        new.train(mha.training)
        return new

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, E) -> (B, H, L, Dh)."""
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
              batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Merge MHA-convention masks into one additive mask broadcastable to (B, H, L, S)."""
        mask = _additive_mask(attn_mask, dtype, keep_is_true=False)
        if mask is not None and mask.ndim == 3:  # (B*H, L, S) -> (B, H, L, S)
            mask = mask.view(batch, self.num_heads, *mask.shape[1:])
        if key_padding_mask is not None:
            kpm = _additive_mask(key_padding_mask, dtype, keep_is_true=False)[:, None, None, :]
            mask = kpm if mask is None else mask + kpm
        return mask

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if need_weights:
            raise ValueError("ExplicitAttention never returns attention weights (need_weights=False)")
        if not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        mask = self._mask(attn_mask, key_padding_mask, q.shape[0], q.dtype)
        if is_causal and mask is None:
            n, s = q.shape[2], k.shape[2]
            mask = torch.full((n, s), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        out = attend(self, q, k, v, mask, self.head_dim ** -0.5, self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(q.shape[0], q.shape[2], self.embed_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


def convert_attention(model: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (in place) by ``ExplicitAttention``.

    Returns the number of modules replaced. Hugging Face BERT attention needs no replacement
    (its Q/K/V are ``nn.Linear`` already); ``register_quant_attention`` covers its matmuls.
    """
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.MultiheadAttention)]
    for name, mha in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ExplicitAttention.from_mha(mha))
    if targets:
        log.debug("converted %d nn.MultiheadAttention modules to ExplicitAttention", len(targets))
    return len(targets)


def _bert_self_attention_cls() -> type[nn.Module] | None:
    try:
        from transformers.models.bert.modeling_bert import BertSelfAttention
    except ImportError:  # pragma: no cover - transformers is a dependency of open_clip's HF path
        return None
    return BertSelfAttention


_REGISTERED = False


def register_quant_attention() -> None:
    """Register the quantized attention classes with ModelOpt (idempotent).

    Must run before ``mtq.quantize`` and before ``mto.restore_from_modelopt_state``.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from modelopt.torch.quantization.nn import QuantModule, QuantModuleRegistry, TensorQuantizer

    class _QuantAttentionMixin(QuantModule):
        """Adds the four attention quantizers; ``attend`` calls them (pattern of ModelOpt's
        diffusers ``_QuantAttention``). They start as default quantizers; the quant config
        decides format and enablement."""

        def _setup(self) -> None:
            for qname in ATTENTION_QUANTIZERS:
                setattr(self, qname, TensorQuantizer())

    class QuantExplicitAttention(_QuantAttentionMixin):
        pass  # ExplicitAttention.forward already routes through ``attend``

    class QuantBertSelfAttention(_QuantAttentionMixin):
        def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
            """BERT self-attention (encoder use only, no cache) with quantized matmuls.

            hidden_states: (B, L, E); attention_mask: HF 4-D mask, bool (True = attend) or
            additive float, or None -> ((B, L, E), None)."""
            if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
                raise NotImplementedError("quantized BertSelfAttention does not support a KV cache")
            shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
            q = self.query(hidden_states).view(shape).transpose(1, 2)
            k = self.key(hidden_states).view(shape).transpose(1, 2)
            v = self.value(hidden_states).view(shape).transpose(1, 2)
            mask = _additive_mask(attention_mask, q.dtype, keep_is_true=True)
            p = self.dropout.p if self.training else 0.0
            out = attend(self, q, k, v, mask, self.scaling, p)
            return out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1).contiguous(), None

    QuantModuleRegistry.register({ExplicitAttention: "clipfp8.ExplicitAttention"})(QuantExplicitAttention)
    bert = _bert_self_attention_cls()
    if bert is not None:
        if QuantModuleRegistry.get(bert) is not None:  # e.g. ModelOpt's KV-cache plugin got there first
            QuantModuleRegistry.unregister(bert)
        QuantModuleRegistry.register({bert: "clipfp8.BertSelfAttention"})(QuantBertSelfAttention)
    _REGISTERED = True


def attention_module_types() -> tuple[type[nn.Module], ...]:
    """Classes that compute attention in supported models (quantized or not)."""
    bert = _bert_self_attention_cls()
    return (ExplicitAttention, nn.MultiheadAttention) + ((bert,) if bert is not None else ())


__all__ = ["ExplicitAttention", "convert_attention", "register_quant_attention", "attend",
           "attention_module_types", "ATTENTION_QUANTIZERS"]
