"""TensorRT path: a clear error without tensorrt; engine tests only where tensorrt exists."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from clipfp8.quant.core.errors import UnsupportedPrecisionError


def test_missing_tensorrt_is_a_clear_error(monkeypatch):
    from clipfp8.quant.runtime import trt

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(UnsupportedPrecisionError, match=r"TensorRT >= 10.*not installed"):
        trt.require_tensorrt()
    with pytest.raises(UnsupportedPrecisionError, match="tensorrt is not installed"):
        trt.build_engine(Path("x.onnx"), Path("x.engine"))


def test_engine_config_validates():
    from clipfp8.quant.runtime.trt import EngineConfig

    with pytest.raises(ValueError, match="min_batch"):
        EngineConfig(min_batch=8, opt_batch=4)


def test_bench_rejects_trt_without_tensorrt(monkeypatch, tmp_path):
    from clipfp8.quant.runtime.cli import bench_towers

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(UnsupportedPrecisionError):
        bench_towers(precisions="fp16-eager,trt", cpu_smoke=True, out=tmp_path / "b.json")


@pytest.mark.gpu
def test_engine_builds_and_matches_fake_quant(tiny_fake_quant, tmp_path):
    pytest.importorskip("tensorrt", reason="tensorrt not installed (the 'trt' extra)")
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import copy

    from clipfp8.quant.runtime.export_onnx import export_tower
    from clipfp8.quant.runtime.trt import EngineConfig, TrtRunner, build_engine
    from tests.quant.runtime.conftest import tiny_inputs

    export_tower(copy.deepcopy(tiny_fake_quant), "image", tmp_path / "image.onnx")
    build_engine(tmp_path / "image.onnx", tmp_path / "image.engine", EngineConfig(opt_batch=8, max_batch=16))
    imgs, _ = tiny_inputs(6, seed=4)
    got = TrtRunner(tmp_path / "image.engine")(imgs.cuda().half()).float().cpu()
    with torch.no_grad():
        ref = tiny_fake_quant.encode_image(imgs)
    assert F.cosine_similarity(got, ref).min() >= 0.99
