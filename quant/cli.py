"""``quant`` subcommands, and the model/encoder arguments every package's CLI shares."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipfp8.quant.core.config import PRECISIONS, EncoderSpec, ModelSpec
from clipfp8.quant.core.errors import ModelLoadError


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model/--pretrained/--checkpoint: which CLIP (default: the embedded default model)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="default",
                   help="open_clip model name (e.g. ViT-B-32), or 'default' for the embedded model")
    g.add_argument("--pretrained", default=None, help="open_clip pretrained tag (downloads when online)")
    g.add_argument("--checkpoint", type=Path, default=None,
                   help="local .safetensors checkpoint for --model's architecture")


def model_spec_from_args(args: argparse.Namespace) -> ModelSpec:
    """``--model`` as an open_clip name, ``default``, or a path to a JSON open_clip config
    (``{"embed_dim", "vision_cfg", "text_cfg"}`` or the shipped ``{"model_cfg": {...}}`` layout):
    a model with random weights named after the file stem (tests and smoke runs)."""
    path = Path(args.model)
    if path.suffix != ".json":
        return ModelSpec(name=args.model, pretrained=args.pretrained, checkpoint=args.checkpoint)
    if not path.is_file():
        raise ModelLoadError(f"model config file not found: {path}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"model config {path}: not valid JSON ({e})") from e
    cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else cfg
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"model config {path}: expected a JSON object")
    try:
        return ModelSpec(name=path.stem, config=cfg)
    except ValueError as e:
        raise ModelLoadError(f"model config {path}: {e}") from e


def add_encoder_args(p: argparse.ArgumentParser, precision_default: str = "fp16") -> None:
    add_model_args(p)
    g = p.add_argument_group("encoder")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--quantized", type=Path, default=None,
                   help="directory written by `clipfp8 quantize` (needed for FP8 precisions)")
    g.add_argument("--batch-size", type=int, default=64)


def encoder_spec_from_args(args: argparse.Namespace, precision: str) -> EncoderSpec:
    return EncoderSpec(model=model_spec_from_args(args), precision=precision, device=args.device,
                       quantized=args.quantized if precision.startswith(("fp8", "trt")) else None,
                       batch_size=args.batch_size)


__all__ = ["add_model_args", "model_spec_from_args", "add_encoder_args", "encoder_spec_from_args",
           "PRECISIONS"]
