"""``clipfp8 bench``: a thin wrapper over ``app.bench.run_bench`` (the benchmark of the shipped
paths). It lives in the app layer because it runs everything: quantize, index, search, serve."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def bench(out: Path = Path("artifacts/bench.json"), cpu_smoke: bool = False, markdown_out: Path | None = None,
          **fields: Any) -> int:
    """Run ``clipfp8 bench`` with ``BenchConfig`` ``fields``; write the JSON to ``out`` after
    every step (and the Markdown table to ``markdown_out``), print the table. ``cpu_smoke``: the
    tiny CPU configuration (``BenchConfig.cpu_smoke``), ``fields`` overriding it."""
    from clipfp8.app.bench import BenchConfig, run_bench
    from clipfp8.app.bench_report import markdown
    from clipfp8.quant.core.fileio import atomic_write_text

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = BenchConfig.cpu_smoke(**fields) if cpu_smoke else BenchConfig(**fields)

    def save(result: dict[str, Any]) -> None:
        atomic_write_text(out, json.dumps(result, indent=1, default=str))

    outdir = str(out.parent.resolve())  # recorded as $OUT: committed results name no machine path
    result = run_bench(cfg, command="clipfp8 bench " + " ".join(sys.argv[2:]), progress=lambda s: print(s, flush=True),
                       save=save, subs={outdir: "$OUT"})
    table = markdown(result)
    if markdown_out is not None:
        atomic_write_text(markdown_out, table)
    print(table)
    print(f"wrote {out}")
    return 0


def _size(text: str) -> tuple[int, int]:
    from clipfp8.app.bench_corpus import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cmd(args: argparse.Namespace) -> int:
    fields = {k: getattr(args, k) for k in ("work_dir", "model", "pretrained", "checkpoint", "device", "corpus",
                                            "batch_size", "workers", "calib_samples", "search_rows", "cold_runs",
                                            "min_time_s", "jpeg_count", "jpeg_size", "precisions")
              if getattr(args, k) is not None}
    if "precisions" in fields:
        fields["precisions"] = tuple(fields["precisions"])
    return bench(out=args.out, cpu_smoke=args.cpu_smoke, markdown_out=args.markdown, serve=not args.no_serve,
                 engines=not args.no_engines, keep=args.keep, **fields)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the ``clipfp8`` parser."""
    p = sub.add_parser("bench", help="speed of the shipped paths: index end to end vs encoder-only, cold and warm "
                                     "search, serve (JSON + Markdown table with the issue's targets)")
    p.add_argument("--out", type=Path, default=Path("artifacts/bench.json"), help="the JSON written after every step")
    p.add_argument("--markdown", type=Path, default=None, metavar="FILE.md", help="also write the table here")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny sizes on the CPU (12 JPEGs of 96x72, 300 search rows): checks the code paths only")
    p.add_argument("--model", default=None,
                   help="'default' (the embedded model), or an open_clip architecture: random weights in a seeded "
                        "checkpoint unless --pretrained/--checkpoint")
    p.add_argument("--pretrained", default=None, metavar="TAG")
    p.add_argument("--checkpoint", type=Path, default=None, metavar="FILE.safetensors")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--precisions", nargs="+", default=None,
                   help="index precisions (default: fp16 fp8 on CUDA, fp32 on the CPU)")
    p.add_argument("--jpeg-count", type=int, default=None, help="generated JPEGs (default 32768)")
    p.add_argument("--jpeg-size", type=_size, default=None, metavar="WxH", help="generated JPEG size (default 500x375)")
    p.add_argument("--corpus", type=Path, default=None, help="index this folder instead of generated JPEGs")
    p.add_argument("--batch-size", type=int, default=None, help="index batch (default 256 on CUDA, 64 on the CPU)")
    p.add_argument("--workers", type=int, default=None, help="index decode threads (default min(16, CPUs))")
    p.add_argument("--calib-samples", type=int, default=None, help="FP8 calibration pairs (default 256)")
    p.add_argument("--search-rows", type=int, default=None, help="synthetic vectors searched (default 1,000,000)")
    p.add_argument("--cold-runs", type=int, default=None, help="cold `clipfp8 search` processes (default 3)")
    p.add_argument("--min-time-s", type=float, default=None, help="timed seconds per warm measurement (default 1)")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the corpus, models and indexes here")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    p.add_argument("--no-serve", action="store_true", help="skip the `serve` measurement")
    p.add_argument("--no-engines", action="store_true", help="do not run `clipfp8 build-engine` first")
    p.set_defaults(func=_cmd)


__all__ = ["bench", "register"]
