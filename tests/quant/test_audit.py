"""The coverage audit: full coverage is reported as such, and the known traps fail loudly."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from clipfp8.quant.audit import audit, runtime_ops, static_audit
from clipfp8.quant.core.errors import AuditError
from clipfp8.quant.ptq import QuantConfig, build_mtq_config, prepare_model, quantize
from tests.quant.conftest import sample_batch, tiny_loaded


def test_full_coverage_report(quantized_tiny) -> None:  # type: ignore[no-untyped-def]
    loaded, result, batch = quantized_tiny
    report = audit(loaded.model, batch)
    not_fp8 = [o for o in report.ops if not o.fp8]
    # The only high-precision GEMMs are the named exclusions: the patch embedding conv and the
    # two raw-parameter output projections.
    assert sorted((o.module, o.status) for o in not_fp8) == [("", "projection"), ("visual", "projection"),
                                                              ("visual.conv1", "excluded")]
    assert report.attention_covered
    assert "visual.conv1 (patch embedding, excluded by config)" in report.excluded
    assert report.summary().startswith(f"{len(report.ops) - 3} of {len(report.ops)} GEMM-like ops in FP8; "
                                       "attention covered: yes; excluded: visual.conv1 (patch embedding")
    # both towers and the attention matmuls (QK^T, PV) actually executed in FP8
    assert {o.tower for o in report.ops if o.fp8} == {"image", "text"}
    assert sum(o.fp8 and o.attention and o.op in ("bmm", "matmul") for o in report.ops) == 4 * 2
    data = json.loads(report.to_json())
    assert data["fp8_ops"] == report.n_fp8 and data["attention_covered"] is True
    assert any(q["name"] == "softmax_quantizer" and q["mode"] == "static" and q["amax"] > 0
               for q in data["quantizers"])
    assert result.report.summary() == report.summary()
    assert "visual.transformer.resblocks.0.attn" in report.table()


def test_fp8_default_cfg_trap_is_caught() -> None:
    """The preset alone leaves the whole image tower (and MHA's Q/K/V) in high precision."""
    import modelopt.torch.quantization as mtq

    loaded = tiny_loaded()
    batch = sample_batch(loaded, 8)
    with torch.no_grad():
        before = loaded.model.encode_image(batch[0])
    mtq.quantize(loaded.model, copy.deepcopy(mtq.FP8_DEFAULT_CFG),
                 lambda m: (m.encode_image(batch[0]), m.encode_text(batch[1])))
    with torch.no_grad():
        assert torch.equal(before, loaded.model.encode_image(batch[0]))  # the trap: bit-identical
    with pytest.raises(AuditError, match="image tower runs no GEMM in FP8"):
        audit(loaded.model, batch)


def test_unconverted_multihead_attention_is_caught() -> None:
    """Our config on a model whose nn.MultiheadAttention was not rewritten: the Linears are
    FP8 but the packed QKV projection and attention matmuls are not -> attention gap."""
    import modelopt.torch.quantization as mtq

    loaded = tiny_loaded()
    batch = sample_batch(loaded, 8)
    mtq.quantize(loaded.model, build_mtq_config(QuantConfig(), loaded.model),
                 lambda m: (m.encode_image(batch[0]), m.encode_text(batch[1])))
    with pytest.raises(AuditError, match="attention path is not") as err:
        audit(loaded.model, batch)
    assert ".attn" in str(err.value)


def test_a_single_disabled_linear_is_a_gap() -> None:
    """Storage tagging is per op: one Linear left unquantized is reported by name."""
    loaded = tiny_loaded()
    batch = sample_batch(loaded, 8)
    quantize(loaded, [batch], QuantConfig())
    loaded.model.transformer.resblocks[1].mlp.c_fc.input_quantizer.disable()
    with pytest.raises(AuditError, match=r"transformer\.resblocks\.1\.mlp\.c_fc"):
        audit(loaded.model, batch)


def test_uncalibrated_quantizer_is_caught() -> None:
    loaded = tiny_loaded()
    batch = sample_batch(loaded, 8)
    quantize(loaded, [batch], QuantConfig())
    loaded.model.visual.transformer.resblocks[0].attn.softmax_quantizer.amax = torch.tensor(float("nan"))
    with pytest.raises(AuditError, match="not calibrated"):
        static_audit(loaded.model)


def test_runtime_ops_sees_plain_model_in_high_precision() -> None:
    """Without quantization nothing is tagged: every GEMM-like op is recorded as not FP8."""
    loaded = tiny_loaded()
    prepare_model(loaded.model)
    ops = runtime_ops(loaded.model, sample_batch(loaded, 4))
    assert ops and not any(fp8 for _, _, fp8 in ops)
    names = {op for op, _, _ in ops}
    assert {"convolution", "addmm"} <= names
    assert any("scaled_dot_product" in n for n in names)  # unquantized attention stays fused SDPA


def test_non_fp8_quantizer_is_not_counted_as_fp8() -> None:
    """A quantizer switched to INT8 still quantizes, but not to FP8: reported as a gap."""
    loaded = tiny_loaded()
    batch = sample_batch(loaded, 8)
    quantize(loaded, [batch], QuantConfig())
    loaded.model.visual.transformer.resblocks[1].mlp.c_proj.weight_quantizer.num_bits = 8
    with pytest.raises(AuditError, match=r"visual\.transformer\.resblocks\.1\.mlp\.c_proj:addmm"):
        audit(loaded.model, batch)


def test_extra_high_precision_matmul_beside_the_projection_is_a_gap(quantized_tiny) -> None:  # type: ignore[no-untyped-def]
    """The raw-parameter output projection is excused once per tower forward, not any matmul in
    that module's body: a second one is a silent high-precision GEMM and must fail the audit."""
    loaded, _, batch = quantized_tiny
    model = copy.deepcopy(loaded.model)
    original = model.visual.forward

    def forward_with_extra_matmul(x):  # type: ignore[no-untyped-def]
        out = original(x)
        return out @ torch.eye(out.shape[-1], dtype=out.dtype)

    model.visual.forward = forward_with_extra_matmul
    with pytest.raises(AuditError, match="visual"):
        audit(model, batch)
