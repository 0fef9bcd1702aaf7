"""``clipfp8 evaluate``: a thin wrapper over ``quant.eval.evaluate``.

    clipfp8 evaluate --preset shared --precision fp16 fp8-fake --quantized q/ --limit 500 --output eval/
    clipfp8 evaluate --dataset my_photos:classification --dataset flickr/:retrieval --precision fp32 bf16

Encoders: every non-FP8 precision once, and every FP8 precision once per ``--quantized`` dir
(so several quantized checkpoints, e.g. with different exclusions, compare in one run). The
first encoder is the baseline the deltas are taken against.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from clipfp8.quant.core.config import PRECISIONS
from clipfp8.quant.core.errors import DatasetError
from clipfp8.quant.eval.datasets import PRESETS, SHARED_EVAL_DIR, preset_datasets

log = logging.getLogger(__name__)

_FP8 = ("fp8-fake", "fp8", "trt-fp8")


def build_encoders(args: argparse.Namespace) -> tuple[list[Any], list[str]]:
    """Encoders and their column labels from ``--precision``/``--quantized`` and the model args."""
    from clipfp8.quant.cli import encoder_spec_from_args
    from clipfp8.quant.core.encoder import create_encoder
    from clipfp8.quant.eval.run import make_unique

    quantized: list[Path] = list(args.quantized or [])
    precisions = args.precision or (["fp16", "fp8-fake"] if quantized else ["fp16"])
    if any(p in _FP8 for p in precisions) and not quantized:
        raise ValueError("--precision: FP8 precisions need --quantized DIR (written by `clipfp8 quantize`)")
    encoders, labels = [], []
    for precision in precisions:
        dirs: list[Path | None] = list(quantized) if precision in _FP8 else [None]
        for qdir in dirs:
            ns = copy.copy(args)
            ns.quantized = qdir  # encoder_spec_from_args takes one dir
            encoders.append(create_encoder(encoder_spec_from_args(ns, precision)))
            labels.append(precision if qdir is None or len(quantized) == 1 else f"{precision}:{qdir.name}")
    return encoders, make_unique(labels)  # e.g. two dirs with the same base name


def _tqdm_progress(iterable: Iterable[Any], desc: str = "", total: int | None = None) -> Iterable[Any]:
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def evaluate_command(args: argparse.Namespace) -> int:
    """Build encoders and datasets from ``args``, run ``evaluate``, print the table, write files."""
    from clipfp8.quant.eval.datasets import DatasetSpec
    from clipfp8.quant.eval.run import evaluate
    from clipfp8.quant.eval.templates import load_templates

    dataset_args = list(args.dataset or [])
    if args.preset:
        dataset_args += preset_datasets(args.preset)
    if not dataset_args:
        raise ValueError("give at least one --dataset PATH[:kind] or --preset shared")
    datasets = [DatasetSpec.parse(d, limit=args.limit, seed=args.seed) for d in dataset_args]
    for spec in datasets:  # fail on a typo before loading any model
        if not spec.path.exists():
            raise DatasetError(f"--dataset: {spec.path} does not exist")
    templates = load_templates(args.templates) if args.templates else None
    encoders, labels = build_encoders(args)
    report = evaluate(encoders, datasets, batch_size=args.batch_size, templates=templates, labels=labels,
                      progress=None if args.no_progress else _tqdm_progress, workers=args.workers)
    print(report.format_table())
    if args.output:
        json_path, csv_path = report.write(args.output)
        print(f"wrote {json_path} and {csv_path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``evaluate`` to the ``clipfp8`` parser."""
    from clipfp8.quant.cli import add_model_args

    p = sub.add_parser("evaluate", help="zero-shot and retrieval metrics, FP8 vs FP16 side by side",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", action="append", metavar="PATH[:kind]",
                   help="a dataset folder or .tar/.tar.gz shard(s); kind = classification, retrieval "
                        "or auto (default). Repeat for several datasets")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help=f"add a set of datasets: 'shared' = {', '.join(n for n, _ in PRESETS['shared'])} "
                        f"under {SHARED_EVAL_DIR}")
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=None,
                   help="precisions to compare, baseline first (default: fp16, plus fp8-fake with --quantized)")
    p.add_argument("--limit", type=int, default=None, help="evaluate a seeded random subset of N images per dataset")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    p.add_argument("--templates", type=Path, default=None,
                   help="zero-shot prompt templates: .json list or a text file, one per line, with {} "
                        "for the class name (default: CLIP's 18 CIFAR-10 templates)")
    p.add_argument("--output", type=Path, default=None, help="folder for results.json and results.csv")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_args(p)
    g = p.add_argument_group("encoder")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--quantized", type=Path, nargs="+", default=None,
                   help="one or more directories written by `clipfp8 quantize` (each FP8 precision runs on each)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image-decoding threads (0 = decode in the main thread)")
    p.set_defaults(func=evaluate_command)
