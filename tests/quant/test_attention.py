"""ExplicitAttention is numerically nn.MultiheadAttention; the quantized attention paths are
exact when their quantizers are off; convert_attention rewrites whole open_clip models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipfp8.quant.attention import ExplicitAttention, attend, convert_attention, register_quant_attention
from tests.quant.conftest import sample_batch, tiny_loaded

TOL = 1e-5


def _mha(batch_first: bool, kdim: int | None = None, seed: int = 0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    with torch.no_grad():  # non-zero biases so a bias mix-up would show
        if m.in_proj_bias is not None:
            m.in_proj_bias.normal_()
        m.out_proj.bias.normal_()
    return m


def _causal(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu(1)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "causal_float", "causal_bool", "per_head_3d"])
def test_explicit_attention_matches_mha(batch_first: bool, mask_kind: str) -> None:
    mha = _mha(batch_first)
    exp = ExplicitAttention.from_mha(mha).eval()
    b, n = 3, 7
    x = torch.randn(b, n, 32) if batch_first else torch.randn(n, b, 32)
    mask = {"none": None, "causal_float": _causal(n), "causal_bool": _causal(n).isinf(),
            "per_head_3d": torch.randn(b * 4, n, n)}[mask_kind]
    with torch.no_grad():
        ref = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        out, weights = exp(x, x, x, need_weights=False, attn_mask=mask)
    assert weights is None
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < TOL


def test_explicit_attention_cross_attention_and_padding_mask() -> None:
    """kdim/vdim != embed_dim (separate projection weights) plus a key padding mask."""
    mha = _mha(True, kdim=16)
    exp = ExplicitAttention.from_mha(mha).eval()
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 9, 16)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 6:] = True
    with torch.no_grad():
        ref = mha(q, kv, kv, key_padding_mask=pad, need_weights=False)[0]
        out = exp(q, kv, kv, key_padding_mask=pad)[0]
    assert (out - ref).abs().max().item() < TOL


@pytest.mark.parametrize("hf_text", [False, True])
def test_convert_attention_keeps_embeddings(hf_text: bool) -> None:
    loaded = tiny_loaded(hf_text=hf_text)
    images, tokens = sample_batch(loaded, 4)
    with torch.no_grad():
        ref_i, ref_t = loaded.model.encode_image(images), loaded.model.encode_text(tokens)
    n = convert_attention(loaded.model)
    assert n == (2 if hf_text else 4)  # the BERT text tower has no nn.MultiheadAttention
    assert not any(isinstance(m, nn.MultiheadAttention) for m in loaded.model.modules())
    with torch.no_grad():
        out_i, out_t = loaded.model.encode_image(images), loaded.model.encode_text(tokens)
    assert (out_i - ref_i).abs().max().item() < TOL
    assert (out_t - ref_t).abs().max().item() < TOL


class _Identity:
    is_enabled = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_explicit_softmax_path_equals_sdpa() -> None:
    """With the softmax quantizer on, attention is computed as QK^T -> softmax -> P@V; with
    identity quantizers that must equal the fused SDPA result (mask included)."""
    mod = nn.Module()
    for name in ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer"):
        object.__setattr__(mod, name, _Identity())
    q, k, v = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    mask = _causal(6)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = attend(mod, q, k, v, mask, 8 ** -0.5)
    assert (out - ref).abs().max().item() < TOL


def test_quantized_bert_attention_exact_when_quantizers_off() -> None:
    """The quantized BertSelfAttention forward (own mask handling, padded captions) equals HF's
    SDPA attention when every quantizer is disabled."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import TensorQuantizer

    loaded = tiny_loaded(hf_text=True)
    tokens = loaded.tokenizer(["a cat", "a much longer caption about a dog in a park"])
    with torch.no_grad():
        ref = loaded.model.encode_text(tokens)
    register_quant_attention()
    mtq.quantize(loaded.model, {"quant_cfg": [{"quantizer_name": "*", "enable": False}], "algorithm": "max"},
                 lambda m: m.encode_text(tokens))
    attn = loaded.model.text.transformer.encoder.layer[0].attention.self
    assert isinstance(attn.softmax_quantizer, TensorQuantizer)
    with torch.no_grad():
        out = loaded.model.encode_text(tokens)
    assert (out - ref).abs().max().item() < TOL
