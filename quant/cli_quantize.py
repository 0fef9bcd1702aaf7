"""``clipfp8 quantize``, ``clipfp8 audit`` and ``clipfp8 sensitivity``: thin wrappers over
``quant.ptq.quantize``, ``quant.audit.audit`` and ``quant.sensitivity.sensitivity``.

``--model`` also accepts a path to a JSON open_clip config (``{"embed_dim", "vision_cfg",
"text_cfg"}`` or the shipped ``{"model_cfg": {...}}`` layout): a model with random weights,
named after the file stem (used for tests and smoke runs).
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipfp8.quant.cli import add_model_args, model_spec_from_args
from clipfp8.quant.core.config import ModelSpec
from clipfp8.quant.core.fileio import atomic_write_text

if TYPE_CHECKING:  # torch is imported where used: building the `clipfp8` parser must stay cheap
    import torch

log = logging.getLogger(__name__)

#: Called as ``hook(args, device)`` after ``quantize`` saved ``args.output``. Higher layers
#: register here (``quant.runtime.cli_engine`` builds the compiled engines on CUDA), so this
#: layer never imports them.
POST_QUANTIZE_HOOKS: list[Callable[[argparse.Namespace, str], None]] = []

#: ``clipfp8 audit --runtime``: ``quant.runtime.cli_audit`` registers here (this layer never
#: imports the runtime). Called as ``hook(args)`` before anything is loaded -- it raises
#: ``AuditError`` when the FP8 runtime cannot be audited here -- and returns
#: ``run(loaded, fake_quant_report, batch)``, which converts ``loaded.model`` in place, prints the
#: runtime audit, raises ``AuditError`` on a fallback and returns the report as a JSON dict.
RUNTIME_AUDIT_HOOKS: list[Callable[[argparse.Namespace], Callable[[Any, Any, Any], dict[str, Any]]]] = []

#: Prompts for the audit batch when no calibration folder is given.
AUDIT_PROMPTS = ["a photo of a cat.", "a photo of a dog.", "a red car on a street.", "a bowl of fruit."]


def model_spec(args: argparse.Namespace) -> ModelSpec:
    """``--model`` as an open_clip name, ``default``, or a path to a JSON config file."""
    return model_spec_from_args(args)


def _device(device: str) -> str:
    from clipfp8.quant.core.config import resolve_device

    return resolve_device(device)


def write_text_atomic(path: Path, text: str) -> None:
    """``--json`` output: atomic, creating the parent folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _progress(it: Iterable[Any], total: int, desc: str) -> Iterable[Any]:
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="batch")


def _exclude(patterns: list[str] | None) -> tuple[str, ...] | None:
    if patterns is None:
        return None
    return () if patterns == ["none"] else tuple(patterns)


def _calib_set(args: argparse.Namespace, loaded: Any, device: str) -> Any:
    from clipfp8.quant.calib import CalibConfig, CalibrationSet

    cfg = CalibConfig(args.calib, args.captions, args.num_samples, args.calib_batch_size, args.seed)
    return CalibrationSet(cfg, loaded.preprocess, loaded.tokenizer, device)


def _qcfg(exclude: list[str] | None) -> Any:
    from clipfp8.quant.ptq import QuantConfig

    ex = _exclude(exclude)
    return QuantConfig() if ex is None else QuantConfig(exclude=ex)


def cmd_quantize(args: argparse.Namespace) -> int:
    """Load, calibrate (progress bar), quantize, audit and save; print the audit table."""
    from clipfp8.quant.checkpoint import save_quantized
    from clipfp8.quant.core.models import load_model
    from clipfp8.quant.ptq import quantize

    qcfg = _qcfg(args.exclude)
    device = _device(args.device)
    loaded = load_model(model_spec(args))
    calib = _calib_set(args, loaded, device)
    loaded.model.to(device)
    result = quantize(loaded, _progress(calib, len(calib), "calibrating"), qcfg)
    if calib.skipped:
        print(f"skipped {len(calib.skipped)} undecodable files (see log)")
    loaded.model.cpu()
    save_quantized(loaded, args.output, qcfg, result.report)
    print(result.report.table())
    print(f"quantizers enabled: {result.quantizers_enabled} of {result.quantizers_total}; attention modules "
          f"converted: {result.attention_converted}; calibrated on {result.calib_samples} image-text pairs")
    print(f"saved to {args.output}")
    for hook in POST_QUANTIZE_HOOKS:
        hook(args, device)
    return 0


def _audit_batch(args: argparse.Namespace, loaded: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if args.calib is not None:
        from clipfp8.quant.calib import CalibConfig, CalibrationSet

        images, tokens = next(iter(CalibrationSet(CalibConfig(args.calib, num_samples=8, batch_size=8),
                                                  loaded.preprocess, loaded.tokenizer)))
        return images, tokens
    import torch

    gen = torch.Generator().manual_seed(0)
    h, w = loaded.image_size
    return torch.randn(len(AUDIT_PROMPTS), 3, h, w, generator=gen), loaded.tokenizer(AUDIT_PROMPTS)


def cmd_audit(args: argparse.Namespace) -> int:
    """Audit a quantized directory (with ``--runtime`` also the real FP8 runtime built from it);
    fails (via AuditError) on a silent high-precision gap."""
    from clipfp8.quant.audit import audit
    from clipfp8.quant.checkpoint import load_quant_config, load_quantized
    from clipfp8.quant.cli import CLIUsageError

    runtime = getattr(args, "runtime", False)
    kernel = getattr(args, "attention_kernel", "torch")
    if not runtime and (getattr(args, "emulate", False) or getattr(args, "exact_softmax", False) or kernel != "torch"):
        raise CLIUsageError("--emulate, --exact-softmax and --attention-kernel only apply with --runtime")
    if runtime and not RUNTIME_AUDIT_HOOKS:
        raise CLIUsageError("--runtime: the FP8 runtime (clipfp8.quant.runtime) registered no runtime audit")
    run_runtime = RUNTIME_AUDIT_HOOKS[-1](args) if runtime else None  # fails fast without an FP8 GPU
    loaded, checksum = load_quantized(args.quantized)
    qcfg = load_quant_config(args.quantized)
    loaded.model.to(_device(args.device or ("auto" if runtime else "cpu")))
    batch = _audit_batch(args, loaded)
    report = audit(loaded.model, batch, qcfg)
    print(report.table())
    print(f"checksum: {checksum}")
    data = report.to_dict()
    if run_runtime is not None:
        data["runtime"] = run_runtime(loaded, report, batch)
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(data, indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    """Per-block sensitivity sweep on the calibration pairs; prints a table, optional JSON."""
    from clipfp8.quant.core.models import load_model
    from clipfp8.quant.sensitivity import sensitivity

    device = _device(args.device)
    loaded = load_model(model_spec(args))
    calib = _calib_set(args, loaded, device)
    loaded.model.to(device)
    eval_batches, n = [], 0
    for images, tokens in calib:
        eval_batches.append((images, tokens))
        n += images.shape[0]
        if n >= args.eval_samples:
            break
    report = sensitivity(loaded, _progress(calib, len(calib), "calibrating"), eval_batches, _qcfg(args.exclude))
    print(report.table())
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(report.to_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0


def _add_calib_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--calib", type=Path, required=required,
                   help="folder of calibration images, or of webdataset shards (.tar/.tar.gz at any depth; "
                        "captions from each sample's .json/.txt)")
    p.add_argument("--captions", type=Path, default=None,
                   help="captions file: JSON {file: [captions]} or CSV image,caption (default: prompts from names)")
    p.add_argument("--num-samples", type=int, default=None, help="calibration pairs (default 8192 GPU / 256 CPU)")
    p.add_argument("--calib-batch-size", type=int, default=None, help="default 512 GPU / 32 CPU")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--exclude", nargs="+", default=None, metavar="PATTERN",
                   help="module-name patterns (fnmatch) kept in high precision; replaces the default "
                        "'visual.conv1'; 'none' quantizes everything")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``quantize``, ``audit`` and ``sensitivity`` to the ``clipfp8`` parser."""
    p = sub.add_parser("quantize", help="FP8 post-training quantization (ModelOpt) of both towers")
    _add_calib_args(p)
    p.add_argument("--output", type=Path, required=True, help="output directory (written atomically)")
    add_model_args(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (calibration device)")
    p.add_argument("--no-engine", action="store_true",
                   help="on CUDA, skip building the compiled fp8/fp16 engines (`clipfp8 build-engine` does it later)")
    p.set_defaults(func=cmd_quantize)

    a = sub.add_parser("audit", help="coverage audit of a quantized model: which GEMMs really run in FP8")
    a.add_argument("--quantized", type=Path, required=True, help="directory written by `clipfp8 quantize`")
    a.add_argument("--calib", type=Path, default=None, help="image folder for the audit batch (default: random)")
    a.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    a.add_argument("--device", default=None,
                   help="auto, cpu, cuda or cuda:N (default: cpu; with --runtime: cuda when available)")
    a.add_argument("--runtime", action="store_true",
                   help="also build the real FP8 runtime from --quantized and audit what it executes, side by side "
                        "with the fake-quant audit (needs a CUDA GPU of compute capability >= 8.9 unless --emulate)")
    a.add_argument("--emulate", action="store_true",
                   help="with --runtime, on a machine without an FP8 GPU: trace the runtime on the CPU instead")
    a.add_argument("--exact-softmax", action="store_true",
                   help="with --runtime: audit the exact-softmax runtime (P rounded to FP8) instead of the fused "
                        "16-bit softmax that precision fp8 runs")
    a.add_argument("--attention-kernel", choices=("torch", "triton"), default="torch",
                   help="with --runtime: 'triton' audits the runtime whose attention runs the Triton FP8 "
                        "flash-attention kernel (Q, K, V and P in FP8; with --emulate it needs TRITON_INTERPRET=1)")
    a.set_defaults(func=cmd_audit)

    s = sub.add_parser("sensitivity", help="per-block FP8 sensitivity sweep to choose exclusions")
    _add_calib_args(s)
    s.add_argument("--eval-samples", type=int, default=64, help="eval pairs taken from the calibration set")
    s.add_argument("--json", type=Path, default=None, help="also write the sweep as JSON")
    add_model_args(s)
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    s.set_defaults(func=cmd_sensitivity)


__all__ = ["register", "cmd_quantize", "cmd_audit", "cmd_sensitivity", "model_spec", "write_text_atomic"]
