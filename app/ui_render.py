"""What the UI shows, as plain values: gallery items, Markdown tables, the benchmark chart frame.

Gradio-free except :func:`user_errors`, which turns expected failures into short ``gr.Error``
messages. Gallery items are built only from paths resolved inside the indexed corpus and go
out as decoded thumbnails (`app.thumbs`), never as file paths.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd  # type: ignore[import-untyped]  # no stubs in the lock file

from clipfp8.app.backend import AppContext
from clipfp8.app.benchmark import GroundTruth, describe_truth
from clipfp8.app.latency import LatencyTracker
from clipfp8.app.search import PathOutsideCorpusError, ResultItem, SearchResult, md_code

log = logging.getLogger(__name__)

def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into short gr.Error messages and log (not show) unexpected ones."""
    from clipfp8.indexing.errors import IndexingError
    from clipfp8.quant.core.errors import QuantError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, IndexingError, QuantError, OSError) as e:
            log.info("user-facing error in %s: %s", fn.__name__, e)
            raise gr.Error(short_message(str(e)), print_exception=False) from None
        except Exception:  # noqa: BLE001 - never leak a traceback to the browser
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error("Something went wrong; the details are in the server log.", print_exception=False) from None
    return wrapper


def short_message(msg: str, limit: int = 300) -> str:
    """The first line of ``msg``, at most ``limit`` characters."""
    msg = msg.splitlines()[0] if msg else "invalid input"
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def caption(item: ResultItem) -> str:
    """Gallery caption: rank, score, file name, and (side by side) a short difference marker."""
    text = f"#{item.rank} · {item.score:.3f} · {Path(item.path).name}"
    if item.marker.startswith("only"):
        text += f" · {item.marker}"
    elif item.marker:
        text += " · moved"
    return text


def gallery_items(ctx: AppContext, result: SearchResult, label: str) -> list[tuple[str, str, int]]:
    """(absolute path, caption, hit id) per hit; hits whose path is not inside the corpus are dropped."""
    items = []
    for it in result.results[label].items:
        try:
            path = ctx.index.resolve(it.path)
        except PathOutsideCorpusError:
            log.warning("refusing to serve %r: outside the corpus", it.path)
            continue
        items.append((str(path), caption(it), it.id))
    return items


def latency_markdown(result: SearchResult, tracker: LatencyTracker) -> str:
    rows = ["| precision | text/image encode ms | search ms | total ms | p50 ms | p95 ms | queries |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for label, pr in result.results.items():
        pct, lat = tracker.percentiles(label), pr.latency
        rows.append(f"| {label} | {lat.encode_ms:.1f} | {lat.search_ms:.1f} | {lat.total_ms:.1f} | "
                    f"{pct['p50']:.1f} | {pct['p95']:.1f} | {pct['n']} |")
    if result.overlap is not None:
        a, b = result.precisions()[:2]
        span = f"Top-{result.k}" if result.page == 0 else \
            f"Results {result.first_rank}–{result.first_rank + result.k - 1}"
        rows.append(f"\n**{span} overlap {b} vs {a}: {result.overlap:.0%}**")
    return "\n".join(rows)


def markers_markdown(result: SearchResult) -> str:
    """What differs between the two precisions' lists (side-by-side mode), one line per hit."""
    if result.mode != "side_by_side":
        return ""
    # The second list's markers already say every rank move; from the first list only its exclusives.
    first, *_ = result.precisions()
    lines = [f"- **{label}** #{it.rank} {md_code(Path(it.path).name)}: {it.marker}"
             for label, pr in result.results.items() for it in pr.items
             if it.marker and (label != first or it.marker.startswith("only"))]
    return "**Differences**\n\n" + ("\n".join(lines) if lines else "none: both lists are identical")


def display_path(path: Path, home: Path | None = None) -> str:
    """``path`` with the user's home folder shown as ``~`` (shorter, and a shared screenshot or
    screen does not spell out the account's folder)."""
    home = Path.home() if home is None else home
    try:
        return "~/" + Path(path).relative_to(home).as_posix()
    except ValueError:
        return Path(path).as_posix()


def header_markdown(ctx: AppContext) -> str:
    stats = ctx.stats.get("images", {})
    encs = ", ".join(f"{label} = `{e.name}` ({e.precision}, {e.device})" for label, e in ctx.encoders.items())
    lines = ["## FP8 CLIP image search",
             f"Corpus `{display_path(ctx.corpus_root)}` — {stats.get('ok', '?')} images indexed. Encoders: {encs}."]
    if ctx.device_note:
        lines.append(f"> {ctx.device_note}")
    return "\n\n".join(lines)


def selected_markdown(rel_path: str, size: tuple[int, int], searched: bool) -> str:
    """The caption under the full-size view: file, folder, pixel size, and what the click did."""
    folder = rel_path.rsplit("/", 1)[0] + "/" if "/" in rel_path else "(corpus root)"
    what = "searching by this image" if searched else "shown full size (no search)"
    return (f"{md_code(Path(rel_path).name)} · folder {md_code(folder) if '/' in rel_path else folder} · "
            f"{size[0]}×{size[1]} px · {what}")


def benchmark_markdown(res: dict[str, Any], truth: GroundTruth) -> tuple[str, pd.DataFrame]:
    """(Markdown: where the ground truth came from + the Recall@k table, bar-chart frame)."""
    labels = list(res["recall"])
    head = "| precision | " + " | ".join(f"R@{k}" for k in res["ks"]) + " | mean latency ms |"
    rows = [head, "|---" * (len(res["ks"]) + 2) + "|"]
    for label in labels:
        rows.append(f"| {label} | " + " | ".join(f"{res['recall'][label][k]:.1%}" for k in res["ks"])
                    + f" | {res['latency_ms'][label]:.1f} |")
    if res["delta"]:
        rows.append(f"| Δ {labels[1]} − {labels[0]} | "
                    + " | ".join(f"{res['delta'][k] * 100:+.1f} pt" for k in res["ks"]) + " | |")
    n = res["n_queries"]
    count = f"{n} {'query' if n == 1 else 'queries'} from the {res['kind']}."
    md = f"{describe_truth(truth)}\n\n{count}\n\n" + "\n".join(rows)
    # One bar per (k, precision), in k order: BarPlot stacks bars sharing an x value.
    frame = pd.DataFrame([{"k": f"R@{k} {label}", "precision": label, "recall": res["recall"][label][k]}
                          for k in res["ks"] for label in labels])
    return md, frame
