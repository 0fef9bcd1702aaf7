"""CPU tests of the FP8 ONNX export (standard QuantizeLinear/DequantizeLinear, opset 19)."""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from clipfp8.quant.runtime.export_onnx import export_tower, export_towers  # noqa: E402
from tests.quant.runtime.conftest import tiny_inputs  # noqa: E402

FLOAT8E4M3FN = 17
#: Raw-parameter output projections (x @ visual.proj / text_projection): ModelOpt cannot see them.
PROJECTIONS = {"image": "/visual/MatMul", "text": "/MatMul"}


@pytest.fixture(scope="module")
def exported(tiny_fake_quant, tmp_path_factory):
    out = {}
    for tower in ("image", "text"):
        for dtype in (torch.float16, torch.float32):
            path = tmp_path_factory.mktemp("onnx") / f"{tower}_{str(dtype)[6:]}.onnx"
            rep = export_tower(copy.deepcopy(tiny_fake_quant), tower, path, dtype=dtype)
            out[(tower, dtype)] = (path, rep)
    return out


@pytest.mark.parametrize("tower", ["image", "text"])
def test_qdq_around_every_linear_and_attention_matmul(exported, tower):
    path, rep = exported[(tower, torch.float16)]
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    ops = [n.op_type for n in model.graph.node]
    assert not any(n.domain == "trt" for n in model.graph.node)  # no TRT custom ops left
    # 2 layers x (6 Linears x (input + weight) + Q, K, V + softmax output) = 32 DequantizeLinear
    assert ops.count("DequantizeLinear") == 32  # the product config keeps the token embedding 16-bit
    assert rep.uncovered == ((PROJECTIONS[tower], "MatMul"),)
    assert rep.covered == 2 * (6 + 2)  # 6 Linears and QK^T, PV per layer
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            assert {a.name: a.i for a in n.attribute}.get("saturate") == 1


def test_weights_are_stored_as_fp8_initializers(exported):
    path, rep = exported[("image", torch.float16)]
    model = onnx.load(str(path))
    fp8 = [i for i in model.graph.initializer if i.data_type == FLOAT8E4M3FN and len(i.dims) == 2]
    assert len(fp8) == 2 * 6
    # fp16 export: the non-quantized parameters (LayerNorm, conv1, proj) are fp16
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert rep.q == 32 - 12  # weight QuantizeLinear folded away


@pytest.mark.parametrize("tower", ["image", "text"])
def test_onnxruntime_matches_fake_quant(exported, tiny_fake_quant, tower):
    import onnxruntime as ort
    path, _ = exported[(tower, torch.float32)]
    opts = ort.SessionOptions()
    # ORT 1.32's graph optimizer (level BASIC and up) rewrites FP8 DQ -> Transpose -> MatMul
    # (the K^T input of Q @ K^T) wrongly: outputs change by ~10 %. Unoptimised ORT is exact.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    imgs, toks = tiny_inputs(5, seed=11)  # batch 5 != export batch 2: the batch axis is dynamic
    x = imgs if tower == "image" else toks
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = (tiny_fake_quant.encode_image(x) if tower == "image" else tiny_fake_quant.encode_text(x)).numpy()
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert got.shape == ref.shape and cos.min() >= 0.9999


def test_opset_below_19_is_rejected(tiny_fake_quant, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_tower(tiny_fake_quant, "image", tmp_path / "x.onnx", opset=17)


def test_export_towers_writes_preprocess_config(tiny_loaded, tiny_fake_quant, tmp_path):
    loaded = copy.copy(tiny_loaded)
    loaded.model = copy.deepcopy(tiny_fake_quant)
    paths = export_towers(loaded, tmp_path, towers=("image",))
    assert [p.name for p in paths] == ["image.onnx", "preprocess.json"]
    cfg = json.loads((tmp_path / "preprocess.json").read_text())
    assert cfg["image_size"] == [32, 32] and len(cfg["mean"]) == 3 and cfg["context_length"] == 16
    assert cfg["embed_dim"] == 32
