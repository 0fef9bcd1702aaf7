"""Render a ``run_bench`` result: JSON (atomic), a PNG plot, and Markdown tables for the docs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipfp8.quant.core.fileio import atomic_path, atomic_write_text


def write_json_atomic(obj: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def plot(result: dict[str, Any], path: Path) -> None:
    """items/s vs batch size per tower (log-log), one line per precision; saved atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "items_per_s" in r]
    towers = sorted({r["tower"] for r in rows})
    fig, axes = plt.subplots(1, max(len(towers), 1), figsize=(6 * max(len(towers), 1), 4.2), squeeze=False)
    for ax, tower in zip(axes[0], towers, strict=False):
        for prec in sorted({r["precision"] for r in rows if r["tower"] == tower}):
            sel = sorted((r["batch"], r["items_per_s"]) for r in rows if r["tower"] == tower and r["precision"] == prec)
            ax.plot([b for b, _ in sel], [v for _, v in sel], marker="o", label=prec)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"{'images' if tower == 'image' else 'texts'} / s")
        ax.set_title(f"{result['meta']['model']} {tower} tower")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['meta']['device']}, torch {result['meta']['torch']}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    """The throughput table, ratios, weights, query/indexing figures and targets as Markdown."""
    lines = ["| tower | precision | batch | items/s | p50 ms | p99 ms | peak GPU MiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    order = ("fp16-eager", "fp16-compiled", "fp16-sdpa", "fp16-autotune", "fp8", "fp8-flash", "fp8-autotune",
             "fp8-exact", "trt")
    for r in sorted(result["rows"], key=lambda r: (r["tower"], order.index(r["precision"]) if r["precision"] in order else 9, r["batch"])):
        if "items_per_s" not in r:
            lines.append(f"| {r['tower']} | {r['precision']} | {r['batch']} | {r.get('error')} | | | |")
            continue
        lines.append(f"| {r['tower']} | {r['precision']} | {r['batch']} | {r['items_per_s']:,.0f} | "
                     f"{r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['peak_mem_bytes'] / 2**20:,.0f} |")
    variants = ("fp8-flash", "fp8-autotune", "fp8-exact")
    lines += ["", "| tower | batch | best FP16 (which) | FP8 items/s | FP8 / best FP16 | "
              + " | ".join(f"{v.upper()} / best FP16" for v in variants) + " |",
              "| --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(variants)]
    for r in result.get("ratios", []):
        cells = [f"{r[k]:.2f}x" if k in r else "" for k in (f"{v}_over_best_fp16" for v in variants)]
        lines.append(f"| {r['tower']} | {r['batch']} | {r['best_fp16_items_per_s']:,.0f} ({r.get('best_fp16', '?')}) | "
                     f"{r['fp8_items_per_s']:,.0f} | {r['fp8_over_best_fp16']:.2f}x | " + " | ".join(cells) + " |")
    wb = result.get("weight_bytes")
    if wb:
        lines += ["", "| weights | FP16 MiB | FP8 MiB | ratio |", "| --- | ---: | ---: | ---: |"]
        for part in ("image", "text", "total"):
            lines.append(f"| {part} | {wb['fp16'][part] / 2**20:,.1f} | {wb['fp8'][part] / 2**20:,.1f} | "
                         f"{wb['fp8'][part] / wb['fp16'][part]:.3f} |")
    targets = result.get("targets", {})
    if targets:
        lines += ["", "| target | reached | goal | met |", "| --- | ---: | ---: | --- |"]
        for k, v in targets.items():
            lines.append(f"| {k} | {v['value']:.3f} | {v['goal']} | {'yes' if v['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


__all__ = ["write_json_atomic", "plot", "markdown"]
