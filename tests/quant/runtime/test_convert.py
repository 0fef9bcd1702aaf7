"""CPU tests of the FP8 conversion core (emulated GEMMs) against ModelOpt fake quantization."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipfp8.quant.runtime.convert import cast_for_runtime, convert_to_fp8, weight_bytes
from clipfp8.quant.runtime.fp8_attention import FP8Attention
from clipfp8.quant.runtime.fp8_linear import FP8Embedding, FP8Linear, fp8_scale, fp8_scales, quantize_fp8
from tests.quant.runtime.conftest import tiny_inputs


def _converted(fake: nn.Module, **kw) -> tuple[nn.Module, object]:
    model = copy.deepcopy(fake)
    report = convert_to_fp8(model, mode="emulate", **kw)
    return model.eval(), report


@pytest.mark.parametrize("exact_softmax", [True, False])
def test_emulated_fp8_model_matches_fake_quant(tiny_fake_quant, exact_softmax):
    model, _ = _converted(tiny_fake_quant, exact_softmax=exact_softmax)
    imgs, toks = tiny_inputs(16, seed=7)
    with torch.no_grad():
        pairs = [(tiny_fake_quant.encode_image(imgs), model.encode_image(imgs)),
                 (tiny_fake_quant.encode_text(toks), model.encode_text(toks))]
    for ref, got in pairs:
        cos = F.cosine_similarity(ref, got)
        # Without the exact path the fused SDPA skips the softmax FP8 rounding: close, not equal.
        assert cos.min() >= (0.999 if exact_softmax else 0.98)
        if exact_softmax:  # same rounding everywhere: equal up to fp32 summation order (which
            # can flip a rare FP8 rounding decision, hence a norm bound rather than allclose)
            assert ((ref - got).norm() / ref.norm()).item() < 2e-3


def test_weights_are_float8_and_about_half_of_fp16(tiny_loaded, tiny_fake_quant):
    model, report = _converted(tiny_fake_quant)
    linears = [m for m in model.modules() if isinstance(m, FP8Linear)]
    n_linear = sum(1 for m in tiny_loaded.model.modules() if isinstance(m, nn.Linear))
    n_mha = sum(1 for m in tiny_loaded.model.modules() if isinstance(m, nn.MultiheadAttention))
    # every Linear (MHA out_proj included) plus the 3 Q/K/V projections each MHA turned into
    assert len(linears) == n_linear + 3 * n_mha
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    fp8_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    fp16_bytes = sum(m.weight.numel() * 2 for m in linears)
    assert fp8_bytes / fp16_bytes == pytest.approx(0.5)
    # Run as the runtime does (16-bit activations): the FP8 GEMM weights save about half their
    # fp16 bytes; the token embedding stays 16-bit (the product config, like ModelOpt's
    # FP8_DEFAULT_CFG, leaves nn.Embedding unquantized).
    fp16_model = copy.deepcopy(tiny_loaded.model).half()
    runtime = cast_for_runtime(copy.deepcopy(model), "cpu", torch.float16)
    saved = weight_bytes(fp16_model) - weight_bytes(runtime)
    assert saved >= 0.45 * fp16_bytes - 4096  # - the fp32 scales
    assert len(report.attention) == n_mha
    assert all(isinstance(dict(model.named_modules())[n], FP8Attention) for n in report.attention)


def test_weight_quantization_is_bit_exact_with_modelopt(tiny_fake_quant):
    src = tiny_fake_quant.visual.transformer.resblocks[0].mlp.c_fc
    model, _ = _converted(tiny_fake_quant)
    dst = model.visual.transformer.resblocks[0].mlp.c_fc
    with torch.no_grad():
        expected = src.weight_quantizer(src.weight)  # ModelOpt's own fake-quantized weight
    assert torch.equal(dst.dequantized_weight(torch.float32), expected)
    assert dst.input_scale.item() == pytest.approx(src.input_quantizer.amax.item() / 448.0)


def test_excluded_conv1_stays_high_precision(tiny_fake_quant):
    model, report = _converted(tiny_fake_quant)
    assert type(model.visual.conv1) is nn.Conv2d
    assert "visual.conv1" in report.high_precision
    assert torch.equal(model.visual.conv1.weight, tiny_fake_quant.visual.conv1.weight)


def test_embedding_is_stored_fp8_when_quantized(tiny_loaded, tiny_fake_quant):
    from tests.quant.runtime.conftest import fake_quantize

    assert not isinstance(_converted(tiny_fake_quant)[0].token_embedding, FP8Embedding)  # product config
    fp8 = {"num_bits": (4, 3), "axis": None}
    fake = fake_quantize(tiny_loaded.model, [tiny_inputs(8, seed=1)],
                         extra_rules=[{"quantizer_name": "*token_embedding.weight_quantizer", "cfg": fp8}])
    model, _ = _converted(fake)
    emb = model.token_embedding
    assert isinstance(emb, FP8Embedding) and emb.weight.dtype == torch.float8_e4m3fn
    idx = torch.tensor([[1, 5, 49407]])
    with torch.no_grad():
        ref = fake.token_embedding(idx)
    assert torch.equal(emb(idx), ref)


def _quantized_mlp(out_features: int, calibrate: bool = True) -> nn.Module:
    import modelopt.torch.quantization as mtq

    from clipfp8.quant.ptq import QuantConfig, avoid_modelopt_cuda_jit, build_mtq_config

    avoid_modelopt_cuda_jit()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, out_features))
    loop = (lambda m: m(torch.randn(16, 32))) if calibrate else None
    return mtq.quantize(net, build_mtq_config(QuantConfig(exclude=()), net), loop)


def test_odd_shapes_fall_back_to_emulation_and_are_reported():
    net = _quantized_mlp(out_features=20)
    conv = copy.deepcopy(net)
    report = convert_to_fp8(conv, mode="scaled_mm")
    assert conv[0].mode == "scaled_mm" and report.fp8 == ["0"]
    assert conv[2].mode == "emulate"
    assert [name for name, _ in report.emulated] == ["2"] and "16" in report.emulated[0][1]
    x = torch.randn(4, 32)
    with torch.no_grad():  # the emulated layer runs anywhere; compare it alone
        h = net[1](net[0](x))
        assert F.cosine_similarity(conv[2](h), net[2](h)).min() >= 0.999


def test_uncalibrated_quantizer_is_an_error_naming_the_module():
    net = _quantized_mlp(out_features=16, calibrate=False)
    with pytest.raises(ValueError, match=r"^0: FP8 runtime needs calibrated"):
        convert_to_fp8(net, mode="emulate")


def test_unknown_mode_rejected(tiny_fake_quant):
    with pytest.raises(ValueError, match="mode"):
        convert_to_fp8(copy.deepcopy(tiny_fake_quant), mode="int4")


def test_cast_for_runtime_keeps_fp8_weights_and_fp32_scales(tiny_fake_quant):
    model, _ = _converted(tiny_fake_quant)
    cast_for_runtime(model, "cpu", torch.float16)
    lin = model.visual.transformer.resblocks[0].mlp.c_fc
    assert lin.weight.dtype == torch.float8_e4m3fn
    assert lin.input_scale.dtype == lin.weight_scale.dtype == lin.input_qmul.dtype == torch.float32
    assert lin.bias.dtype == torch.float16 and lin.int8_original_dtype == torch.float16
    assert model.visual.conv1.weight.dtype == torch.float16
    # open_clip picks the text cast dtype from this attribute; fp8 would break the embedding add
    assert model.transformer.get_cast_dtype() == torch.float16


def test_quantize_fp8_saturates_instead_of_nan():
    qmul, scale = fp8_scales(torch.tensor(1.0))
    q = quantize_fp8(torch.tensor([1e6, -1e6, 0.5]), qmul)
    assert q.dtype == torch.float8_e4m3fn
    back = q.float() * scale
    assert torch.isfinite(back).all() and back[0].item() == pytest.approx(1.0) and back[1].item() == pytest.approx(-1.0)


def test_zero_amax_does_not_divide_by_zero():
    assert fp8_scale(torch.tensor(0.0)).item() == pytest.approx(1 / 448)
    with pytest.raises(ValueError, match="per-tensor"):
        fp8_scale(torch.ones(4))


def test_quant_checkpoint_converts_to_matching_fp8_model(tmp_path, tiny_loaded):
    """The quantization package's real pipeline (ptq -> save -> load) feeds the converter."""
    from clipfp8.quant import checkpoint as ckpt
    from clipfp8.quant import ptq

    loaded = copy.deepcopy(tiny_loaded)
    ptq.quantize(loaded, [tiny_inputs(8, seed=s) for s in (1, 2)], ptq.QuantConfig())
    ckpt.save_quantized(loaded, tmp_path / "q", ptq.QuantConfig())
    fake, _ = ckpt.load_quantized(tmp_path / "q")
    model, report = _converted(fake.model)
    assert report.attention and "visual.conv1" in report.high_precision
    imgs, toks = tiny_inputs(8, seed=3)
    with torch.no_grad():
        assert F.cosine_similarity(fake.model.encode_image(imgs), model.encode_image(imgs)).min() >= 0.999
        assert F.cosine_similarity(fake.model.encode_text(toks), model.encode_text(toks)).min() >= 0.999


def test_fp8_encoder_refuses_cpu():
    from clipfp8.quant.core.config import EncoderSpec
    from clipfp8.quant.core.errors import UnsupportedPrecisionError
    from clipfp8.quant.runtime.fp8_encoder import create_fp8_encoder

    spec = EncoderSpec(precision="fp8", device="cpu", quantized=Path("/nonexistent/q"))
    with pytest.raises(UnsupportedPrecisionError, match="CUDA"):
        create_fp8_encoder(spec)


def test_hf_text_tower_converts_without_modelopt_leftovers():
    """The default model's MiniLM text tower (HF BertSelfAttention, quantized by quant.attention)."""
    from clipfp8.quant import ptq
    from clipfp8.quant.core.config import ModelSpec
    from clipfp8.quant.core.models import load_model, tiny_config

    torch.manual_seed(0)
    loaded = load_model(ModelSpec(name="tiny-hf", config=tiny_config(hf_text=True)))
    toks = loaded.tokenizer(["a photo of a cat", "a red car on a street", "two dogs", "a blue house"])
    ptq.quantize(loaded, [(torch.randn(4, 3, 32, 32), toks)], ptq.QuantConfig())
    model, report = _converted(loaded.model)
    leftovers = [n for n, m in model.named_modules() if type(m).__name__ in ("TensorQuantizer", "QuantLinear", "QuantLayerNorm")]
    assert leftovers == []
    assert sum(isinstance(m, FP8Linear) for m in model.text.modules()) == 6 * 6 + 1  # 6 per layer + proj
    with torch.no_grad():
        assert F.cosine_similarity(loaded.model.encode_text(toks), model.encode_text(toks)).min() >= 0.999
