"""``quant`` subcommands, and the model/encoder arguments every package's CLI shares."""
from __future__ import annotations

import argparse
from pathlib import Path

from quant.config import PRECISIONS, EncoderSpec, ModelSpec


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model/--pretrained/--checkpoint: which CLIP (default: the embedded default model)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="default",
                   help="open_clip model name (e.g. ViT-B-32), or 'default' for the embedded model")
    g.add_argument("--pretrained", default=None, help="open_clip pretrained tag (downloads when online)")
    g.add_argument("--checkpoint", type=Path, default=None,
                   help="local .safetensors checkpoint for --model's architecture")


def model_spec_from_args(args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(name=args.model, pretrained=args.pretrained, checkpoint=args.checkpoint)


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


def register(sub: argparse._SubParsersAction) -> None:
    from quant import cli_quantize
    from quant.eval import cli as eval_cli
    from quant.runtime import cli as runtime_cli
    from quant.train import cli as train_cli

    for module in (cli_quantize, eval_cli, runtime_cli, train_cli):
        module.register(sub)


__all__ = ["add_model_args", "model_spec_from_args", "add_encoder_args", "encoder_spec_from_args",
           "register", "PRECISIONS"]
