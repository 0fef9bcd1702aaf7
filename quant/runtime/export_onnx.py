"""ONNX export of each CLIP tower with FP8 Q/DQ, for TensorRT (``quant.runtime.trt``).

How: ``torch.onnx.export`` (TorchScript exporter, ``dynamo=False``: ModelOpt's quantizers export
through their ``autograd.Function.symbolic``) of the ModelOpt fake-quant model. ModelOpt emits
its TensorRT custom ops ``trt::TRT_FP8QuantizeLinear`` / ``trt::TRT_FP8DequantizeLinear``
(``modelopt/torch/quantization/export_onnx.py: export_fp8``). ``to_standard_qdq`` then rewrites
them -- as ModelOpt's ``FP8QuantExporter.post_process`` does, without its onnx-graphsurgeon
dependency -- into standard ONNX ``QuantizeLinear``/``DequantizeLinear`` (opset >= 19) with a
``float8e4m3fn`` zero point and ``saturate=1``. ``fold_weight_quantization`` stores each weight
as an FP8 initializer feeding its DequantizeLinear (ModelOpt's ``compress_weights``), so the
file holds FP8 weights and TensorRT sees the DQ -> MatMul pattern it fuses into FP8 GEMMs.

Attention: ``quant.attention``'s quantized attention exports Q/DQ on Q, K, V (inputs of
Q @ K^T and of P @ V) and on the softmax output P, i.e. the explicit-matmul FP8 MHA pattern
TensorRT fuses when the head size is a multiple of 16.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clipfp8.quant.core.fileio import atomic_path, atomic_write_text
from clipfp8.quant.core.protocols import as_clip, tower_image_size

log = logging.getLogger(__name__)

MIN_OPSET = 19
TRT_Q, TRT_DQ = "TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"


class _Tower(nn.Module):
    """One tower as a module: images float (B, 3, H, W) or tokens int64 (B, L) -> (B, D)."""

    def __init__(self, model: nn.Module, tower: str) -> None:
        super().__init__()
        if tower not in ("image", "text"):
            raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")
        as_clip(model)  # fail here, not inside the exporter
        self.model, self.tower = model, tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clip = as_clip(self.model)
        return clip.encode_image(x) if self.tower == "image" else clip.encode_text(x)


@dataclass(frozen=True)
class ExportReport:
    """Where every MatMul/Gemm/Conv input comes from: ``covered`` ops have a DequantizeLinear
    on both inputs, ``uncovered`` lists (node name, op) of the others."""

    q: int
    dq: int
    covered: int
    uncovered: tuple[tuple[str, str], ...]


def example_input(model: nn.Module, tower: str, batch: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if tower == "image":
        h, w = tower_image_size(model)
        return torch.randn(batch, 3, h, w, dtype=dtype)
    ctx = int(getattr(model, "context_length", 77))
    return torch.randint(1, int(getattr(model, "vocab_size", 49408)), (batch, ctx))


def _fp8_zero_point(name: str) -> Any:
    from onnx import TensorProto, helper

    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, [1], [0.0])


def to_standard_qdq(model: Any) -> Any:
    """Rewrite ModelOpt's ``trt::TRT_FP8*`` nodes into ONNX QuantizeLinear/DequantizeLinear (in place)."""
    from onnx import TensorProto

    for node in model.graph.node:
        if node.op_type == TRT_Q:
            node.op_type, node.domain = "QuantizeLinear", ""
            if len(node.input) == 2:
                zp = f"{node.name or node.output[0]}_zero_point"
                model.graph.initializer.append(_fp8_zero_point(zp))
                node.input.append(zp)
            node.attribute.extend([_attr_int("saturate", 1)])
        elif node.op_type == TRT_DQ:
            node.op_type, node.domain = "DequantizeLinear", ""
    # Value infos recorded by the exporter typed Q outputs as uint8; they are float8 now.
    q_outputs = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    for vi in model.graph.value_info:
        if vi.name in q_outputs:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT8E4M3FN
    opsets = [o for o in model.opset_import if o.domain != "trt"]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    return model


def _attr_int(name: str, value: int) -> Any:
    from onnx import helper

    return helper.make_attribute(name, value)


def fold_weight_quantization(model: Any) -> int:
    """Replace ``QuantizeLinear(W_initializer)`` by an FP8 initializer (in place); returns the count."""
    import ml_dtypes
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    folded, drop = 0, []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits or node.input[1] not in consts:
            continue
        w = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        scale = float(numpy_helper.to_array(consts[node.input[1]].attribute[0].t).astype(np.float32))
        q = np.clip(w / scale, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn)
        t = numpy_helper.from_array(q.view(np.uint8), node.output[0])
        t.data_type = 17  # TensorProto.FLOAT8E4M3FN: same bytes, float8 element type
        model.graph.initializer.append(t)
        drop.append(node)
        folded += 1
    for node in drop:
        model.graph.node.remove(node)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return folded


#: Ops that only move or uniformly scale values: a DQ seen through them still feeds the MatMul
#: (TensorRT folds them; e.g. K's transpose, the sqrt(1/sqrt(d)) scaling, Linear's W^T).
_PASS_THROUGH = ("Transpose", "Reshape", "Identity", "Mul", "Cast", "Squeeze", "Unsqueeze")


def _from_dq(name: str, producers: dict[str, Any], depth: int = 0) -> bool:
    node = producers.get(name)
    if node is None or depth > 6:
        return False
    if node.op_type == "DequantizeLinear":
        return True
    return node.op_type in _PASS_THROUGH and _from_dq(node.input[0], producers, depth + 1)


def qdq_report(model: Any) -> ExportReport:
    """Check that both inputs of every MatMul/Gemm come from DequantizeLinear (through
    layout/scalar ops only); the others are listed in ``uncovered``."""
    producers = {o: n for n in model.graph.node for o in n.output}
    covered, uncovered = 0, []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        if all(_from_dq(i, producers) for i in n.input[:2]):
            covered += 1
        else:
            uncovered.append((n.name, n.op_type))
    ops = [n.op_type for n in model.graph.node]
    return ExportReport(ops.count("QuantizeLinear"), ops.count("DequantizeLinear"), covered, tuple(uncovered))


def export_tower(model: nn.Module, tower: str, path: Path, *, opset: int = MIN_OPSET,
                 dtype: torch.dtype = torch.float16, fold_weights: bool = True) -> ExportReport:
    """Export one tower of a ModelOpt fake-quant CLIP to ``path`` (atomically).

    Input ``images`` (B, 3, H, W) ``dtype`` or ``tokens`` int64 (B, L); output ``embeddings``
    (B, D) ``dtype``; batch dimension dynamic. Weights are exported in ``dtype`` (fp16 default)
    and, with ``fold_weights``, stored as FP8. Raises ``ValueError`` for opset < 19.
    """
    import onnx

    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} for FP8 QuantizeLinear, got {opset}")
    from clipfp8.quant.ptq import avoid_modelopt_cuda_jit

    avoid_modelopt_cuda_jit()
    wrapped = _Tower(model, tower).eval().to(dtype=dtype)
    x = example_input(model, tower, dtype=dtype)
    name = "images" if tower == "image" else "tokens"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # fsynced and renamed over ``path`` only when all went well
        with torch.no_grad():
            torch.onnx.export(wrapped, (x,), str(tmp), opset_version=opset, dynamo=False, input_names=[name],
                              output_names=["embeddings"],
                              dynamic_axes={name: {0: "batch"}, "embeddings": {0: "batch"}})
        proto = to_standard_qdq(onnx.load(str(tmp)))
        if fold_weights:
            log.info("%s tower: %d weights stored as FP8", tower, fold_weight_quantization(proto))
        onnx.save(proto, str(tmp))
    return qdq_report(proto)


def preprocess_config(loaded: Any) -> dict[str, Any]:
    """What a non-PyTorch runtime needs to feed the towers (saved as ``preprocess.json``)."""
    pp = dict(getattr(loaded.model.visual, "preprocess_cfg", {}) or {})
    tok = loaded.tokenizer
    return {"image_size": list(loaded.image_size), "mean": list(pp.get("mean", (0.48145466, 0.4578275, 0.40821073))),
            "std": list(pp.get("std", (0.26862954, 0.26130258, 0.27577711))),
            "interpolation": pp.get("interpolation", "bicubic"), "resize_mode": pp.get("resize_mode", "shortest"),
            "context_length": int(getattr(tok, "context_length", 77)), "tokenizer": type(tok).__name__,
            "embed_dim": int(loaded.embed_dim), "model_id": loaded.spec.model_id(),
            "inputs": {"image": "images float (B,3,H,W)", "text": "tokens int64 (B,context_length)"},
            "output": "embeddings (B, embed_dim), not normalised"}


def export_towers(loaded: Any, out_dir: Path, towers: Sequence[str] = ("image", "text"), opset: int = MIN_OPSET,
                  dtype: torch.dtype = torch.float16) -> list[Path]:
    """``image.onnx``/``text.onnx`` + ``preprocess.json`` in ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    paths = []
    for tower in towers:
        path = out_dir / f"{tower}.onnx"
        rep = export_tower(loaded.model, tower, path, opset=opset, dtype=dtype)
        log.info("%s: %d Q, %d DQ, %d/%d MatMuls on DQ inputs", path, rep.q, rep.dq, rep.covered,
                 rep.covered + len(rep.uncovered))
        paths.append(path)
    cfg_path = out_dir / "preprocess.json"
    atomic_write_text(cfg_path, json.dumps(preprocess_config(loaded), indent=1))
    return paths + [cfg_path]


__all__ = ["export_tower", "export_towers", "to_standard_qdq", "fold_weight_quantization", "qdq_report",
           "preprocess_config", "ExportReport", "example_input", "MIN_OPSET"]
