"""``clipfp8 bench-towers`` (and ``clipfp8 export-onnx``, ``build-engine``): thin wrappers over
``quant.runtime``. ``clipfp8 bench``, the benchmark of the shipped paths, sits in the app layer
(``app.bench``)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def bench_towers(model: str = "ViT-L-14", towers: str = "image,text",
                 precisions: str = "fp16-eager,fp16-compiled,fp16-sdpa,fp8,fp8-exact",
                 batch_sizes: str = "1,8,32,64,128,256,512,1024", out: Path = Path("artifacts/bench_towers.json"),
                 plot: Path | None = None, cpu_smoke: bool = False, min_time_s: float = 0.6) -> int:
    """Run the encoder-only tower benchmark and write JSON (+ PNG plot); prints the Markdown table."""
    from clipfp8.quant.runtime.bench import BenchConfig, run_bench
    from clipfp8.quant.runtime.bench_report import markdown, write_json_atomic
    from clipfp8.quant.runtime.bench_report import plot as plot_png

    try:
        sizes = tuple(int(b) for b in batch_sizes.split(","))
    except ValueError as e:
        raise ValueError(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}") from e
    precs = tuple(p for p in precisions.split(",") if p)
    if "trt" in precs:
        from clipfp8.quant.runtime.trt import require_tensorrt

        require_tensorrt()
    cfg = BenchConfig(model=model, towers=tuple(towers.split(",")), precisions=precs, batch_sizes=sizes,
                      cpu_smoke=cpu_smoke, min_time_s=min_time_s)
    result = run_bench(cfg, command="clipfp8 bench-towers " + " ".join(sys.argv[2:]), progress=print)
    write_json_atomic(result, out)
    if plot is not None:
        plot_png(result, plot)
    print(markdown(result))
    return 0


def export_onnx(quantized: Path, out_dir: Path, towers: str = "image,text", opset: int = 19) -> int:
    """Export each tower of a quantized checkpoint to ONNX with FP8 Q/DQ (+ preprocess JSON)."""
    from clipfp8.quant.checkpoint import load_quantized
    from clipfp8.quant.runtime.export_onnx import export_towers

    loaded, _ = load_quantized(quantized)
    for path in export_towers(loaded, out_dir, towers=tuple(towers.split(",")), opset=opset):
        print(path)
    return 0


def _bench_cmd(args: argparse.Namespace) -> int:
    return bench_towers(model=args.model, towers=args.towers, precisions=args.precisions,
                        batch_sizes=args.batch_sizes, out=args.out, plot=args.plot, cpu_smoke=args.cpu_smoke,
                        min_time_s=args.min_time_s)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench-towers``, ``export-onnx`` and ``build-engine`` to the ``clipfp8`` parser."""
    p = sub.add_parser("bench-towers", help="encoder-only speed of both towers, FP16 vs real FP8, on one GPU "
                                            "(random weights; `clipfp8 bench` measures the shipped paths)")
    p.add_argument("--model", default="ViT-L-14", help="open_clip architecture (random weights)")
    p.add_argument("--towers", default="image,text")
    p.add_argument("--precisions", default="fp16-eager,fp16-compiled,fp16-sdpa,fp8,fp8-exact",
                   help="comma list; opt-in: fp16-autotune and fp8-autotune (torch.compile max-autotune, minutes "
                        "of compile each), trt (needs tensorrt), fp8-flash (the experimental Triton FP8 "
                        "attention kernel, which failed its H200 accuracy tests)")
    p.add_argument("--batch-sizes", default="1,8,32,64,128,256,512,1024")
    p.add_argument("--out", type=Path, default=Path("artifacts/bench_towers.json"))
    p.add_argument("--plot", type=Path, default=None, help="PNG plot path")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: checks the code paths only")
    p.add_argument("--min-time-s", type=float, default=0.6, help="timed seconds per measurement")
    p.set_defaults(func=_bench_cmd)
    e = sub.add_parser("export-onnx", help="export a quantized checkpoint's towers to ONNX with FP8 Q/DQ")
    e.add_argument("--quantized", type=Path, required=True, help="directory written by `clipfp8 quantize`")
    e.add_argument("--out-dir", type=Path, required=True)
    e.add_argument("--towers", default="image,text")
    e.add_argument("--opset", type=int, default=19)
    e.set_defaults(func=lambda a: export_onnx(a.quantized, a.out_dir, a.towers, a.opset))
    from clipfp8.quant.runtime import cli_audit, cli_engine  # build-engine, engine build after quantize

    cli_engine.register(sub)
    cli_audit.register()  # `clipfp8 audit --runtime`
