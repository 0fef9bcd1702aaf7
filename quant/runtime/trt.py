"""TensorRT 10 path (the ``trt`` extra): ONNX with FP8 Q/DQ -> strongly typed engine -> ``Encoder``.

Written against the TensorRT 10 Python API (``trt.Builder``, ``NetworkDefinitionCreationFlag.
STRONGLY_TYPED``, optimization profiles, timing cache, ``execute_async_v3``). TensorRT cannot be
installed in the development workplace, so this module is import-guarded and untested there:
every entry point raises ``UnsupportedPrecisionError`` naming the missing package.

Strongly typed networks take their precisions from the ONNX graph (fp16 tensors, FP8 Q/DQ), so no
FP16/FP8 builder flags are set: TensorRT fuses DQ -> MatMul into FP8 GEMMs and, where the head
size allows, the Q/DQ'd attention pattern into its FP8 MHA kernel.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipfp8.quant.core.config import EncoderSpec
from clipfp8.quant.core.errors import UnsupportedPrecisionError
from clipfp8.quant.core.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

ENGINE_DIR = "trt"


def require_tensorrt() -> Any:
    """The ``tensorrt`` module (>= 10), or ``UnsupportedPrecisionError`` saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise UnsupportedPrecisionError(
            "precision 'trt-fp8' needs TensorRT >= 10.8 (pip install 'clip-fp8[trt]' on a machine with "
            "an NVIDIA driver); tensorrt is not installed") from e
    if int(trt.__version__.split(".")[0]) < 10:
        raise UnsupportedPrecisionError(f"precision 'trt-fp8' needs TensorRT >= 10, found {trt.__version__}")
    return trt


@dataclass(frozen=True)
class EngineConfig:
    """Dynamic-batch optimization profile and builder limits."""

    min_batch: int = 1
    opt_batch: int = 64
    max_batch: int = 1024
    workspace_gib: int = 8
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"EngineConfig: need 1 <= min_batch <= opt_batch <= max_batch, got "
                             f"{self.min_batch}, {self.opt_batch}, {self.max_batch}")
        if self.workspace_gib < 1:
            raise ValueError(f"EngineConfig.workspace_gib must be >= 1, got {self.workspace_gib}")


def _write_atomic(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def build_engine(onnx_path: Path, engine_path: Path, cfg: EngineConfig = EngineConfig()) -> Path:
    """Parse ``onnx_path`` into a strongly typed network and serialise the engine to ``engine_path``."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UnsupportedPrecisionError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_gib << 30)
    cache_path = cfg.timing_cache
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        rest = tuple(inp.shape)[1:]
        profile.set_shape(inp.name, (cfg.min_batch, *rest), (cfg.opt_batch, *rest), (cfg.max_batch, *rest))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UnsupportedPrecisionError(f"TensorRT failed to build an engine from {onnx_path} (see its log)")
    _write_atomic(bytes(serialized), Path(engine_path))
    if cache_path is not None:
        _write_atomic(bytes(config.get_timing_cache().serialize()), cache_path)
    return Path(engine_path)


class TrtRunner:
    """Run a one-input/one-output engine on torch CUDA tensors: (B, ...) -> (B, D)."""

    _DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32, "INT64": torch.int64,
               "BF16": torch.bfloat16}

    def __init__(self, engine_path: Path, device: str = "cuda") -> None:
        trt = require_tensorrt()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise UnsupportedPrecisionError(f"TensorRT could not load the engine {engine_path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = [self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names]
        self.input_name = names[is_input.index(True)]
        self.output_name = names[is_input.index(False)]
        self.input_dtype = self._DTYPES[self.engine.get_tensor_dtype(self.input_name).name]
        self.output_dtype = self._DTYPES[self.engine.get_tensor_dtype(self.output_name).name]
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        self.device = device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self._run(chunk) for chunk in x.split(self.max_batch)]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.input_dtype).contiguous()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype,
                          device=x.device)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(x.device).cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return out


def engine_paths(quantized: Path, tower: str) -> tuple[Path, Path]:
    """(ONNX, engine) paths for ``tower`` under ``quantized/trt``; the engine name carries the GPU
    and TensorRT version, since engines do not move between them."""
    trt = require_tensorrt()
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    base = Path(quantized) / ENGINE_DIR
    return base / f"{tower}.onnx", base / f"{tower}.{gpu}.trt{trt.__version__}.engine"


def create_trt_encoder(spec: EncoderSpec, cfg: EngineConfig = EngineConfig()) -> Any:
    """``Encoder`` backed by TensorRT engines for both towers (exported and built on first use)."""
    require_tensorrt()
    from clipfp8.quant.runtime.fp8_encoder import check_fp8_device

    device = spec.resolved_device()
    check_fp8_device(device)
    from clipfp8.quant.checkpoint import check_same_model, load_quantized
    from clipfp8.quant.runtime.export_onnx import export_towers
    from clipfp8.quant.runtime.fast_fp16 import FastTorchEncoder

    if spec.quantized is None:
        raise UnsupportedPrecisionError(
            "precision 'trt-fp8' needs --quantized (a directory written by `clipfp8 quantize`)")
    check_same_model(spec.quantized, spec.model)
    loaded, checksum = load_quantized(spec.quantized)
    paths = {t: engine_paths(spec.quantized, t) for t in ("image", "text")}
    if not all(onnx.is_file() for onnx, _ in paths.values()):
        export_towers(loaded, Path(spec.quantized) / ENGINE_DIR)
    timing = Path(spec.quantized) / ENGINE_DIR / "timing.cache"
    runners = {}
    for tower, (onnx_path, engine) in paths.items():
        if not engine.is_file():
            log.info("building TensorRT engine %s", engine)
            build_engine(onnx_path, engine, EngineConfig(cfg.min_batch, cfg.opt_batch, cfg.max_batch,
                                                         cfg.workspace_gib, timing))
        runners[tower] = TrtRunner(engine, device)
    return FastTorchEncoder(torch.nn.Identity(), loaded.preprocess, loaded.tokenizer, precision="trt-fp8",
                            device=device, name=f"{loaded.spec.name}-trt-fp8", model_id=loaded.spec.model_id(),
                            checksum=checksum, dim=loaded.embed_dim, image_size=loaded.image_size,
                            batch_size=spec.batch_size, compile=False, runners=(runners["image"], runners["text"]))


__all__ = ["require_tensorrt", "EngineConfig", "build_engine", "TrtRunner", "create_trt_encoder", "engine_paths"]
