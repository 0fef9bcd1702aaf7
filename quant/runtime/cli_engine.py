"""``clipfp8 build-engine``: a thin wrapper over ``quant.runtime.engine_build.build_engine``, and
the ``quantize`` hook that builds the fp8 and fp16 engines right after quantizing on a CUDA GPU.

    clipfp8 build-engine --quantized Q --precision fp8 [fp16] [--batch-size N] [--engine-dir DIR]

fp8 engines go to ``Q/engines/``; fp16/bf16 engines to ``~/.cache/clipfp8/engines/<model
checksum>/`` (where ``create_encoder`` looks for them), or ``--engine-dir`` (then set
``CLIPFP8_ENGINE_DIR`` to the same folder when running).
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from clipfp8.quant.core.config import DEFAULT_MODEL_NAME, EncoderSpec, ModelSpec, as_precision
from clipfp8.quant.core.errors import EngineError, QuantError

log = logging.getLogger(__name__)


def build_engines(precision: Sequence[str] = ("fp8",), quantized: Path | None = None, model: ModelSpec | None = None,
                  device: str = "cuda", batch_size: int = 64, engine_dir: Path | None = None) -> list[Path]:
    """One compiled engine per precision in ``precision``; returns their folders.

    ``model``: the model (default: the one ``quantized`` was made from, else the embedded
    model). fp8 needs ``quantized``. ``batch_size``: the index batch size warmed up besides
    the CUDA-graph buckets and the text query path.
    """
    from clipfp8.quant.runtime.engine_build import build_engine

    if model is None:
        if quantized is not None:
            from clipfp8.quant.checkpoint import read_model_spec

            model = read_model_spec(quantized)
        else:
            model = ModelSpec()
    folders = []
    for p in precision:
        if p == "fp8" and quantized is None:
            raise ValueError("--precision fp8 needs --quantized DIR (a directory written by `clipfp8 quantize`)")
        spec = EncoderSpec(model=model, precision=as_precision(p), device=device,
                           quantized=quantized if p.startswith("fp8") else None, batch_size=batch_size)
        folders.append(build_engine(spec, (batch_size,), engine_dir=engine_dir))
    return folders


def _model_from_args(args: argparse.Namespace) -> ModelSpec | None:
    """``--model`` etc., or None (= the ``--quantized`` model) when they were left at defaults."""
    from clipfp8.quant.cli import model_spec_from_args

    untouched = (args.model == DEFAULT_MODEL_NAME and args.pretrained is None and args.checkpoint is None
                 and not getattr(args, "random_init", False))
    return None if untouched and args.quantized is not None else model_spec_from_args(args)


def cmd_build_engine(args: argparse.Namespace) -> int:
    """Build the engines and print one line per engine: precision, folder, size, build time."""
    from clipfp8.quant.runtime.engine import EngineManifest

    folders = build_engines(precision=args.precision, quantized=args.quantized, model=_model_from_args(args),
                            device=args.device, batch_size=args.batch_size, engine_dir=args.engine_dir)
    for folder in folders:
        m = EngineManifest.read(folder)
        size = sum(int(f["bytes"]) for f in m.files.values())
        print(f"{m.key.precision}: {folder} ({size / 2**20:.1f} MiB, built in {m.build_seconds:.0f} s; "
              f"GPU {m.key.gpu_name}, torch {m.key.torch_version})")
    return 0


#: Engines ``quantize`` builds on an FP8-capable GPU: the FP8 encoder and the FP16 one it is
#: compared with (``index``/``serve``/``evaluate`` run both side by side).
QUANTIZE_ENGINES = ("fp8", "fp16")


def build_after_quantize(args: argparse.Namespace, device: str) -> None:
    """``quantize`` hook: on a CUDA GPU with FP8 tensor cores, build the ``QUANTIZE_ENGINES`` of
    ``args.output`` (unless ``--no-engine``). A failure raises ``EngineError`` saying the
    checkpoint is saved and how to retry."""
    if getattr(args, "no_engine", False) or not device.startswith("cuda"):
        return
    import torch

    from clipfp8.quant.runtime.fp8_encoder import MIN_CAPABILITY

    cap = torch.cuda.get_device_capability(torch.device(device))
    if tuple(cap) < MIN_CAPABILITY:
        print(f"no FP8 engine built: compute capability {cap[0]}.{cap[1]} has no FP8 tensor cores (needs 8.9+)")
        return
    try:
        folders = build_engines(QUANTIZE_ENGINES, quantized=args.output, device=device)
    except (QuantError, RuntimeError) as e:
        raise EngineError(f"saved {args.output}, but building its compiled engines failed ({e}); retry with "
                          f"`clipfp8 build-engine --quantized {args.output} --precision {' '.join(QUANTIZE_ENGINES)}`"
                          ", or quantize with --no-engine") from e
    for precision, folder in zip(QUANTIZE_ENGINES, folders, strict=True):
        print(f"compiled {precision} engine: {folder}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``build-engine`` to the ``clipfp8`` parser and hook FP8 engine builds into ``quantize``."""
    from clipfp8.quant.cli import add_model_args, device_arg, positive_int
    from clipfp8.quant.cli_quantize import POST_QUANTIZE_HOOKS

    if build_after_quantize not in POST_QUANTIZE_HOOKS:
        POST_QUANTIZE_HOOKS.append(build_after_quantize)
    p = sub.add_parser("build-engine", help="compile the fp8 (and fp16/bf16) encoder once and store it, so "
                                            "later starts skip compiling")
    p.add_argument("--quantized", type=Path, default=None, metavar="DIR",
                   help="directory written by `clipfp8 quantize` (needed for fp8; its model is the default model)")
    p.add_argument("--precision", nargs="+", default=["fp8"], choices=["fp8", "fp16", "bf16"])
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="index batch size to warm up (as `index --batch-size`), besides batches 1-32")
    p.add_argument("--engine-dir", type=Path, default=None, metavar="DIR",
                   help="store engines here instead (run with CLIPFP8_ENGINE_DIR=DIR to use them)")
    p.add_argument("--device", default="cuda", type=device_arg, help="cuda or cuda:N")
    add_model_args(p)
    p.set_defaults(func=cmd_build_engine)


__all__ = ["build_engines", "cmd_build_engine", "build_after_quantize", "register"]
