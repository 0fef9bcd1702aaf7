"""FP8 PTQ on both towers: every Linear and every attention quantizer enabled and calibrated,
conv1 excluded, embeddings close to fp32 but not identical; config validation and exclusions."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from clipfp8.quant.attention import ATTENTION_QUANTIZERS, ExplicitAttention
from clipfp8.quant.ptq import QuantConfig, build_mtq_config, quantize
from tests.quant.conftest import sample_batch, tiny_loaded


def _calibrated(q) -> bool:  # type: ignore[no-untyped-def]
    amax = getattr(q, "_amax", None)
    return q.is_enabled and amax is not None and math.isfinite(float(amax)) and float(amax) > 0


def _check_all_quantized(model: nn.Module, attention_types: tuple[type, ...]) -> tuple[int, int]:
    """Asserts every Linear (input+weight) and attention module (4 quantizers) is enabled and
    calibrated in FP8 E4M3; returns (#linears, #attention modules) per tower checked."""
    n_lin, n_attn = 0, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            n_lin += 1
            for q in (mod.input_quantizer, mod.weight_quantizer):
                assert _calibrated(q), f"{name} not quantized"
                assert tuple(q.num_bits) == (4, 3) and q.axis is None
        if isinstance(mod, attention_types):
            n_attn += 1
            for qn in ATTENTION_QUANTIZERS:
                assert _calibrated(getattr(mod, qn)), f"{name}.{qn} not quantized"
    return n_lin, n_attn


def test_quantconfig_validates() -> None:
    assert QuantConfig().exclude == ("visual.conv1",)
    with pytest.raises(ValueError, match="format"):
        QuantConfig(format="int8")
    with pytest.raises(ValueError, match="towers"):
        QuantConfig(towers=("audio",))
    with pytest.raises(ValueError, match="towers"):
        QuantConfig(towers=())
    with pytest.raises(ValueError, match="exclude"):
        QuantConfig(exclude=("",))
    q = QuantConfig(exclude=["a.*"], towers=["text"])
    assert QuantConfig.from_dict(q.to_dict()) == q


def test_build_config_does_not_mutate_preset_and_drops_vision_disables(tiny) -> None:  # type: ignore[no-untyped-def]
    import modelopt.torch.quantization as mtq

    before = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    cfg = build_mtq_config(QuantConfig(), tiny.model)
    assert mtq.FP8_DEFAULT_CFG == before
    names = [r.get("quantizer_name") for r in cfg["quant_cfg"]]
    assert "*visual*" not in names and "*vision_model*" not in names
    assert {f"*{q}" for q in ATTENTION_QUANTIZERS} <= set(names)
    assert "visual.conv1.*" in names


def test_quantize_covers_both_towers(quantized_tiny) -> None:  # type: ignore[no-untyped-def]
    loaded, result, _ = quantized_tiny
    model = loaded.model
    n_lin, n_attn = _check_all_quantized(model, (ExplicitAttention,))
    assert n_attn == 4 and n_lin == 4 * 4 + 4 * 2  # 4 blocks: q/k/v/out + c_fc/c_proj
    assert any(n.startswith("visual.") for n, m in model.named_modules() if isinstance(m, ExplicitAttention))
    conv = model.visual.conv1
    assert not conv.input_quantizer.is_enabled and not conv.weight_quantizer.is_enabled
    assert result.attention_converted == 4 and result.calib_samples == 16
    assert 0 < result.quantizers_enabled < result.quantizers_total


def test_fp8_embeddings_close_but_different(quantized_tiny) -> None:  # type: ignore[no-untyped-def]
    loaded, _, _ = quantized_tiny
    ref = tiny_loaded()  # same seed -> same fp32 weights
    images, tokens = sample_batch(ref, 8, seed=1)
    with torch.no_grad():
        pairs = [(ref.model.encode_image(images), loaded.model.encode_image(images)),
                 (ref.model.encode_text(tokens), loaded.model.encode_text(tokens))]
    for fp32, fp8 in pairs:  # image tower AND text tower
        cos = torch.nn.functional.cosine_similarity(fp32, fp8, dim=-1)
        # Random-weight tiny towers: mean cosine ~0.995-0.9998; single captions dip to ~0.986.
        assert cos.mean().item() > 0.99 and cos.min().item() > 0.98
        assert not torch.equal(fp32, fp8)


def test_hf_text_tower_bert_attention_quantized() -> None:
    from transformers.models.bert.modeling_bert import BertSelfAttention

    loaded = tiny_loaded(hf_text=True)
    result = quantize(loaded, [sample_batch(loaded, 8)], QuantConfig())
    _, n_attn = _check_all_quantized(loaded.model, (ExplicitAttention, BertSelfAttention))
    assert n_attn == 2 + 6  # 2 ViT blocks + 6 MiniLM layers
    report = result.report
    assert report.attention_covered
    bert_ops = [o for o in report.ops if ".attention.self" in o.module and o.module.endswith("self")]
    assert len(bert_ops) == 6 * 2 and all(o.fp8 for o in bert_ops)  # QK^T and PV per layer


def test_exclusion_patterns_and_towers(tiny) -> None:  # type: ignore[no-untyped-def]
    qcfg = QuantConfig(exclude=("visual.conv1", "visual.transformer.resblocks.0*"))
    result = quantize(tiny, [sample_batch(tiny, 8)], qcfg)
    blk0 = tiny.model.visual.transformer.resblocks[0]
    assert not any(q.is_enabled for n, q in blk0.named_modules() if n.endswith("quantizer"))
    assert tiny.model.visual.transformer.resblocks[1].mlp.c_fc.input_quantizer.is_enabled
    assert any("resblocks.0" in e for e in result.report.excluded)


def test_text_tower_only(tiny) -> None:  # type: ignore[no-untyped-def]
    result = quantize(tiny, [sample_batch(tiny, 8)], QuantConfig(towers=("text",)))
    vis = [q for n, q in tiny.model.visual.named_modules() if n.endswith("quantizer")]
    assert vis and not any(q.is_enabled for q in vis)
    assert tiny.model.transformer.resblocks[0].mlp.c_fc.input_quantizer.is_enabled
    assert {o.status for o in result.report.ops if o.tower == "image"} == {"excluded", "tower-off", "projection"}
    assert "image tower (not quantized, by config)" in result.report.excluded


def test_attention_quantization_off_is_reported_not_hidden(tiny) -> None:  # type: ignore[no-untyped-def]
    result = quantize(tiny, [sample_batch(tiny, 8)], QuantConfig(quantize_attention=False))
    report = result.report
    assert not report.attention_covered and "attention covered: no" in report.summary()
    assert "attention matmuls (quantize_attention=False)" in report.excluded
    attn = tiny.model.visual.transformer.resblocks[0].attn
    assert not attn.softmax_quantizer.is_enabled and attn.q_proj.input_quantizer.is_enabled


def test_empty_calibration_raises(tiny) -> None:  # type: ignore[no-untyped-def]
    from clipfp8.quant.core.errors import CalibrationDataError

    with pytest.raises(CalibrationDataError):
        quantize(tiny, [], QuantConfig())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantize_and_audit_on_cuda() -> None:
    """Calibration on the GPU (ModelOpt's CUDA fake-quant kernels); the fp16 model audits clean."""
    from clipfp8.quant.audit import audit

    ref, loaded = tiny_loaded(), tiny_loaded()
    batch = sample_batch(loaded, 16)
    loaded.model.cuda()
    result = quantize(loaded, [batch], QuantConfig())
    assert result.report.attention_covered
    report = audit(loaded.model.half(), batch)
    assert report.n_fp8 == len(report.ops) - 3
    images, _ = sample_batch(ref, 8, seed=1)
    with torch.no_grad():
        fp8 = loaded.model.encode_image(images.cuda().half()).float().cpu()
        cos = torch.nn.functional.cosine_similarity(ref.model.encode_image(images), fp8, dim=-1)
    assert cos.mean().item() > 0.99
