"""``clipfp8 train-prep | train | train-ship | train-eval``: thin wrappers over ``quant.train``.

    clipfp8 train-prep --out-dir .carry/pack --text-cache .carry/text-cache.npz   # shards -> pack (CPU, ~20 min)
    clipfp8 train --pack-dir .carry/pack --out-dir run/      # GPU training (see docs/training.md)
    clipfp8 train --pack-dir .carry/smoke --out-dir smoke-run/ --smoke   # a few CPU steps
    clipfp8 train-ship --run-dir run/                        # -> data/default_model/
    clipfp8 train-eval --output eval/                        # fp32 CPU metrics of the shipped model
"""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def prep(args: argparse.Namespace) -> int:
    from clipfp8.quant.train.prep import PrepConfig, build_pack

    cfg = PrepConfig(data_root=args.data_root, out_dir=args.out_dir, size=args.size,
                     jpeg_quality=args.jpeg_quality, image_format=args.image_format, quality=args.quality,
                     text_dims=args.text_dims, text_cache=args.text_cache, max_per_source=args.max_per_source,
                     with_eval=not args.no_eval, sources=tuple(args.sources))
    summary = build_pack(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "model_cfg"}, indent=2))
    return 0


def _pair(convert: Callable[[str], Any], keys: tuple[str, ...]) -> Callable[[str], tuple[str, Any]]:
    """argparse type for ``KEY=VALUE`` items, KEY one of ``keys`` (a bad item is a usage error that
    names the flag and the item)."""
    def parse(text: str) -> tuple[str, Any]:
        key, sep, value = text.partition("=")
        if key not in keys:
            raise argparse.ArgumentTypeError(f"unknown key in {text!r}; expected one of {', '.join(keys)}")
        try:
            if not sep:
                raise ValueError
            return key, convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {key}=NUMBER, got {text!r}") from None
    return parse


def _vision_value(value: str) -> int | float:
    return float(value) if "." in value else int(value)


def train(args: argparse.Namespace) -> int:
    from clipfp8.quant.train.train import TrainConfig
    from clipfp8.quant.train.train import train as run

    weights = dict(TrainConfig().source_weights, **dict(args.source_weights or []))
    kw = dict(pack_dir=args.pack_dir, out_dir=args.out_dir, device=args.device, seed=args.seed,
              batch_size=args.batch_size, lr=args.lr, time_budget_s=args.time_budget_s,
              max_steps=args.max_steps, warmup_steps=args.warmup_steps, compile=not args.no_compile,
              bf16=not args.no_bf16,
              source_weights=weights, vision=dict(args.vision) if args.vision else None)
    if args.smoke:  # a few tiny CPU steps through exactly the same code path
        kw.update(device="cpu", batch_size=min(args.batch_size, 48), max_steps=6, compile=False)
        kw.update(probe_steps=3, warmup_steps=2, log_every=2)
    summary = run(TrainConfig(**kw), progress=lambda row: log.info("train %s", row))
    print(json.dumps({k: summary[k] for k in ("timing", "final_loss", "eval_gpu_pack", "device")}, indent=2))
    return 0


def ship(args: argparse.Namespace) -> int:
    from clipfp8.quant.train.ship import ship_run

    print(json.dumps(ship_run(args.run_dir, args.dest), indent=2))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from clipfp8.quant.train.evaluate import evaluate_default

    report = evaluate_default(args.eval_root, limit=args.limit, seed=args.seed, batch_size=args.batch_size,
                              workers=args.workers)
    print(report.format_table())
    if args.output:
        json_path, csv_path = report.write(args.output)
        print(f"wrote {json_path} and {csv_path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``clipfp8`` parser."""
    from clipfp8.quant.train.data import MOSAIC_FORMATS, SOURCES
    from clipfp8.quant.train.prep import PrepConfig
    from clipfp8.quant.train.train import VISION_KEYS, TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train-prep", help="build the compact training pack from the shards")
    p.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    p.add_argument("--out-dir", type=Path, default=Path(".carry/pack"))
    dp = PrepConfig()
    p.add_argument("--size", type=int, default=dp.size, help="tile side of every source but CIFAR (px)")
    p.add_argument("--jpeg-quality", type=int, default=dp.jpeg_quality, help="CIFAR-10's 32x32 JPEG mosaic")
    p.add_argument("--image-format", choices=sorted(MOSAIC_FORMATS), default=dp.image_format,
                   help="format of the --size mosaics")
    p.add_argument("--quality", type=int, default=dp.quality, help="quality of the --size mosaics")
    p.add_argument("--text-dims", type=int, default=dp.text_dims,
                   help="PCA coefficients carried per caption feature (384 = all)")
    p.add_argument("--text-cache", type=Path, default=None,
                   help=".npz of caption features reused across builds (created if absent)")
    p.add_argument("--sources", nargs="+", choices=SOURCES, default=list(dp.sources))
    p.add_argument("--max-per-source", type=int, default=None, help="keep only N samples per source (smoke)")
    p.add_argument("--no-eval", action="store_true", help="skip the compact eval copy")
    p.set_defaults(func=prep)
    p = sub.add_parser("train", help="train the default model from a pack (GPU)")
    p.add_argument("--pack-dir", type=Path, default=d.pack_dir)
    p.add_argument("--out-dir", type=Path, default=d.out_dir)
    p.add_argument("--device", default=d.device)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--time-budget-s", type=float, default=d.time_budget_s)
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-bf16", action="store_true", help="fp32 instead of bf16 autocast")
    p.add_argument("--source-weights", nargs="+", type=_pair(float, SOURCES), metavar="SOURCE=W",
                   help=f"batch shares, updating the defaults {d.source_weights}")
    p.add_argument("--vision", nargs="+", type=_pair(_vision_value, VISION_KEYS), metavar="KEY=VALUE",
                   help=f"override the pack's image tower ({', '.join(VISION_KEYS)}), e.g. layers=10")
    p.add_argument("--smoke", action="store_true", help="6 tiny steps on the CPU")
    p.set_defaults(func=train)
    p = sub.add_parser("train-ship", help="install a training run as data/default_model")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--dest", type=Path, default=None)
    p.set_defaults(func=ship)
    p = sub.add_parser("train-eval", help="fp32 zero-shot/retrieval metrics of the shipped model "
                                          "(clipfp8 evaluate --preset shared --precision fp32 on the CPU)")
    p.add_argument("--eval-root", type=Path, default=Path("../shared/data/eval"))
    p.add_argument("--limit", type=int, default=None, help="evaluate a seeded random subset of N images per set")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="image-decoding threads (0 = the main thread)")
    p.add_argument("--output", type=Path, default=None, help="folder for results.json and results.csv")
    p.set_defaults(func=evaluate)
