"""``quant`` subcommands, and the model/encoder arguments every package's CLI shares.

The ``*_from_args`` helpers validate flag combinations here, in the CLI layer, and raise
``CLIUsageError`` naming the flags (``--quantized``, ``--random-init``), so a user never reads
a dataclass field name.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from clipfp8.quant.core.config import DEFAULT_MODEL_NAME, PRECISIONS, EncoderSpec, ModelSpec, Precision
from clipfp8.quant.core.errors import ModelLoadError

#: Precisions that run a ``clipfp8 quantize`` checkpoint.
FP8_PRECISIONS = ("fp8-fake", "fp8", "trt-fp8")

# "%(default).0s" tells the help formatter that the text already names the default (prints nothing).
MODEL_HELP = (
    "which CLIP: 'default' (the embedded model, works offline; the default); an open_clip architecture "
    "(e.g. ViT-B-32; `clipfp8 models` lists them) with --pretrained TAG, --checkpoint FILE or "
    "--random-init; or a JSON open_clip config file ({\"embed_dim\", \"vision_cfg\", \"text_cfg\"} or "
    "{\"model_cfg\": {...}}), built with random weights (tests, smoke runs)%(default).0s"
)


class CLIUsageError(ValueError):
    """A flag combination the command cannot run with; the message names the flags. The console
    script reports it like an argparse usage error (exit code 2)."""


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``, else a message that says so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


#: argparse ``type``s: an integer >= 1, an integer >= 0.
positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def device_arg(text: str) -> str:
    """argparse ``type``: auto, cpu, cuda or cuda:N."""
    ok = text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit())
    if not ok:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def add_model_args(p: argparse.ArgumentParser, from_index: bool = False) -> None:
    """--model/--pretrained/--checkpoint/--random-init: which CLIP (default: the embedded model;
    with ``from_index``, the model the index recorded: ``--model`` defaults to None)."""
    g = p.add_argument_group("model")
    if from_index:
        g.add_argument("--model", default=None, metavar="NAME|CONFIG.json",
                       help="as for `clipfp8 index` (default: the model the index recorded)")
    else:
        g.add_argument("--model", default=DEFAULT_MODEL_NAME, metavar="NAME|CONFIG.json", help=MODEL_HELP)
    g.add_argument("--pretrained", default=None, metavar="TAG",
                   help="open_clip pretrained tag of --model (`clipfp8 models NAME` lists them); downloads "
                        "once, then loads from the Hugging Face cache offline")
    g.add_argument("--checkpoint", type=Path, default=None, metavar="FILE.safetensors",
                   help="local weights for --model's architecture (no pickle)")
    g.add_argument("--random-init", action="store_true",
                   help="allow random weights for an open_clip --model (tests, benchmarks; useless for search)")


def _json_model_spec(path: Path) -> ModelSpec:
    if not path.is_file():
        raise ModelLoadError(f"--model: model config file not found: {path}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"--model: model config {path}: not valid JSON ({e})") from e
    cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else cfg
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"--model: model config {path}: expected a JSON object")
    try:
        return ModelSpec(name=path.stem, config=cfg)
    except ValueError as e:
        raise ModelLoadError(f"--model: model config {path}: {e}") from e


def _check_open_clip_name(name: str) -> None:
    """``ModelLoadError`` (with close matches) when ``name`` is no open_clip architecture."""
    import difflib

    from clipfp8.quant.core.open_clip_import import import_open_clip

    open_clip = import_open_clip(hf=False, timm=False)  # a config lookup; a model built later imports what it needs
    if open_clip.get_model_config(name) is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(f"--model {name}: not an open_clip architecture{hint} (`clipfp8 models` lists them)")


def model_spec_from_args(args: argparse.Namespace) -> ModelSpec:
    """``--model`` as an open_clip name, ``default``, or a path to a JSON open_clip config
    (``{"embed_dim", "vision_cfg", "text_cfg"}`` or the shipped ``{"model_cfg": {...}}`` layout):
    a model with random weights named after the file stem (tests and smoke runs).

    Raises ``CLIUsageError`` for contradictory flags, and for an open_clip name without
    ``--pretrained``/``--checkpoint``/``--random-init`` (random weights are never silent)."""
    name, pretrained, checkpoint = args.model or DEFAULT_MODEL_NAME, args.pretrained, args.checkpoint
    random_init = bool(getattr(args, "random_init", False))
    if pretrained is not None and checkpoint is not None:
        raise CLIUsageError("give either --pretrained TAG or --checkpoint FILE, not both")
    if Path(name).suffix == ".json":
        if pretrained is not None or checkpoint is not None:
            raise CLIUsageError(f"--model {name} is a JSON config (random weights): --pretrained and "
                                "--checkpoint need an open_clip architecture name")
        return _json_model_spec(Path(name))
    if name == DEFAULT_MODEL_NAME:
        if pretrained is not None or checkpoint is not None or random_init:
            raise CLIUsageError("--pretrained, --checkpoint and --random-init need --model NAME (an open_clip "
                                "architecture, e.g. ViT-B-32; `clipfp8 models` lists them)")
        return ModelSpec()
    _check_open_clip_name(name)
    if pretrained is None and checkpoint is None and not random_init:
        raise CLIUsageError(f"--model {name} needs its weights: --pretrained TAG (`clipfp8 models {name}` "
                            f"lists the tags), --checkpoint FILE.safetensors, or --random-init for random weights")
    if random_init and (pretrained is not None or checkpoint is not None):
        raise CLIUsageError("--random-init contradicts --pretrained/--checkpoint")
    return ModelSpec(name=name, pretrained=pretrained, checkpoint=checkpoint)


def add_encoder_args(p: argparse.ArgumentParser, precision_default: str = "fp16", from_index: bool = False) -> None:
    """The model args plus --device/--quantized/--batch-size. ``from_index``: a command over an
    existing index (search, serve, verify): --model, --quantized and --batch-size default to
    what the index recorded (``indexing.specs``)."""
    add_model_args(p, from_index=from_index)
    g = p.add_argument_group("encoder")
    g.add_argument("--device", default="auto", type=device_arg, help="auto (CUDA when available), cpu, cuda or cuda:N")
    g.add_argument("--quantized", type=Path, default=None, metavar="DIR",
                   help="directory written by `clipfp8 quantize` (needed for the FP8 precisions"
                        + ("; default: the one the index recorded)" if from_index else ")"))
    g.add_argument("--batch-size", type=positive_int, default=None if from_index else 64,
                   help="images per model call" + (" (default: the index's)" if from_index else ""))


def model_given(args: argparse.Namespace) -> bool:
    """True when any of --model/--pretrained/--checkpoint/--random-init was given (for commands
    whose --model defaults to None: the model an index recorded)."""
    return (args.model is not None or args.pretrained is not None or args.checkpoint is not None
            or bool(getattr(args, "random_init", False)))


def encoder_spec_from_args(args: argparse.Namespace, precision: str) -> EncoderSpec:
    """The ``EncoderSpec`` of ``precision``; ``CLIUsageError`` when an FP8 one lacks --quantized."""
    if precision in FP8_PRECISIONS and args.quantized is None:
        raise CLIUsageError(f"--precision {precision} needs --quantized DIR (a directory written by "
                            "`clipfp8 quantize`)")
    return EncoderSpec(model=model_spec_from_args(args), precision=cast(Precision, precision), device=args.device,
                       quantized=args.quantized if precision in FP8_PRECISIONS else None,
                       batch_size=args.batch_size or 64)


def cmd_models(args: argparse.Namespace) -> int:
    """Print open_clip's architectures and pretrained tags (``quant.catalog``)."""
    from clipfp8.quant.catalog import format_table, list_architectures

    archs = list_architectures(args.filter, params=not args.no_params)
    if args.json:
        print(json.dumps([a.to_dict() for a in archs], indent=2))
    elif not archs:
        print(f"no open_clip architecture or pretrained tag contains {args.filter!r}")
    else:
        print(format_table(archs))
        print("* = weights in the local cache (work offline); use: --model NAME --pretrained TAG")
    return 0


class _MaintainerCommands:
    """Marks the subcommands a package registers through it as maintainer tools in ``--help``."""

    def __init__(self, sub: argparse._SubParsersAction) -> None:
        self._sub = sub

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs["help"] = f"(maintainers) {kwargs.get('help', '')}".rstrip()
        return self._sub.add_parser(name, **kwargs)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``models`` to the ``clipfp8`` parser (the quantize/evaluate/runtime commands are
    assembled by ``app.cli``, the top layer, so this shared-arguments module imports none of them)."""
    p = sub.add_parser("models", help="list open_clip architectures and pretrained tags (no download)")
    p.add_argument("filter", nargs="?", default=None,
                   help="show only architectures (or tags) whose name contains this, case-insensitive")
    p.add_argument("--no-params", action="store_true",
                   help="skip the parameter counts (the first full listing builds each architecture shape-only)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)


def maintainer_commands(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """A view of ``sub`` whose commands' help starts with ``(maintainers)`` (for ``train-*``)."""
    return _MaintainerCommands(sub)  # type: ignore[return-value]  # a duck-typed view: argparse has no public protocol for it


__all__ = ["add_model_args", "model_spec_from_args", "add_encoder_args", "encoder_spec_from_args", "model_given",
           "register", "maintainer_commands", "CLIUsageError", "positive_int", "non_negative_int", "device_arg",
           "FP8_PRECISIONS", "PRECISIONS", "cmd_models"]
