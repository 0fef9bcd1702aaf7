"""The Gradio Blocks UI: a thin layer over ``app.search`` and ``app.backend.AppContext``.

Every handler converts errors into a short ``gr.Error`` message (no stack traces reach the
browser); gallery items are built only from paths resolved inside the indexed corpus.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd
from PIL import Image

from clipfp8.app.backend import AppContext
from clipfp8.app.search import LatencyTracker, PathOutsideCorpusError, SearchResult, benchmark, search

log = logging.getLogger(__name__)

MAX_UPLOAD = "10mb"
GALLERY_COLUMNS = 4
BENCH_KS = (1, 5, 10)


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
            raise gr.Error(_short(str(e)), print_exception=False) from None
        except Exception:  # noqa: BLE001 - never leak a traceback to the browser
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error("Something went wrong; the details are in the server log.", print_exception=False) from None
    return wrapper


def _short(msg: str, limit: int = 300) -> str:
    msg = msg.splitlines()[0] if msg else "invalid input"
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def gallery_items(ctx: AppContext, result: SearchResult, label: str) -> list[tuple[str, str]]:
    """(absolute path, caption) per hit; hits whose path is not inside the corpus are dropped."""
    items = []
    for it in result.results[label].items:
        try:
            path = ctx.index.resolve(it.path)
        except PathOutsideCorpusError:
            log.warning("refusing to serve %r: outside the corpus", it.path)
            continue
        caption = f"#{it.rank} · {it.score:.3f} · {Path(it.path).name}"
        items.append((str(path), caption + (f" · {it.marker}" if it.marker else "")))
    return items


def thumbnails(items: list[tuple[str, str]], size: int = 256) -> list[tuple[Image.Image, str]]:
    """Decoded thumbnails for the gallery. The app hands Gradio pixels, never file paths, so
    Gradio needs no allowed path at all: nothing under the corpus folder (captions, databases,
    HTML/SVG files) can be fetched through its file route."""
    out = []
    for path, caption in items:
        try:
            with Image.open(path) as im:
                im.draft("RGB", (size, size))  # JPEG: decode at reduced scale, cheaper
                thumb = im.convert("RGB")
                thumb.thumbnail((size, size))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            log.warning("cannot show %s: %s", path, e)
            continue
        out.append((thumb, caption))
    return out


def latency_markdown(result: SearchResult, tracker: LatencyTracker) -> str:
    rows = ["| precision | text/image encode ms | search ms | total ms | p50 ms | p95 ms | queries |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for label, pr in result.results.items():
        pct, lat = tracker.percentiles(label), pr.latency
        rows.append(f"| {label} | {lat.encode_ms:.1f} | {lat.search_ms:.1f} | {lat.total_ms:.1f} | "
                    f"{pct['p50']:.1f} | {pct['p95']:.1f} | {pct['n']} |")
    if result.overlap is not None:
        a, b = result.precisions()[:2]
        rows.append(f"\n**Top-{result.k} overlap {b} vs {a}: {result.overlap:.0%}**")
    shown = sum(len(pr.items) for pr in result.results.values())
    if shown == 0:
        rows.append("\nNo result above the score threshold.")
    return "\n".join(rows)


def markers_markdown(result: SearchResult) -> str:
    """What differs between the two precisions' lists (side-by-side mode), one line per hit."""
    if result.mode != "side_by_side":
        return ""
    # The second list's markers already say every rank move; from the first list only its exclusives.
    first, *_ = result.precisions()
    lines = [f"- **{label}** #{it.rank} `{Path(it.path).name}`: {it.marker}"
             for label, pr in result.results.items() for it in pr.items
             if it.marker and (label != first or it.marker.startswith("only"))]
    return "**Differences**\n\n" + ("\n".join(lines) if lines else "none: both lists are identical")


def _plot_frame(tracker: LatencyTracker) -> pd.DataFrame:
    return pd.DataFrame(list(tracker.running_rows()), columns=["query", "series", "ms"])


def header_markdown(ctx: AppContext) -> str:
    stats = ctx.stats.get("images", {})
    encs = ", ".join(f"{label} = `{e.name}` ({e.precision}, {e.device})" for label, e in ctx.encoders.items())
    lines = ["# FP8 CLIP image search",
             f"Corpus `{ctx.corpus_root}` — {stats.get('ok', '?')} images indexed. "
             f"Encoders: {encs}."]
    if ctx.device_note:
        lines.append(f"> {ctx.device_note}")
    return "\n\n".join(lines)


def run_search(ctx: AppContext, tracker: LatencyTracker, query: Any, k: float, threshold: float,
               precision: str, mode: str) -> tuple[Any, ...]:
    """Search and render: (gallery A, gallery B, latency markdown, plot frame, tracker, paths)."""
    side = mode == "Side by side"
    result = search(query, ctx.encoders, ctx.index, k=int(k), threshold=threshold or None,
                    mode="side_by_side" if side else "single", precision=precision)
    tracker.record(result)
    labels = result.precisions()
    items = [gallery_items(ctx, result, label) for label in labels]
    gal_a = gr.Gallery(value=thumbnails(items[0]), label=f"{labels[0]} results")
    gal_b = (gr.Gallery(value=thumbnails(items[1]), label=f"{labels[1]} results", visible=True) if side
             else gr.Gallery(value=[], visible=False))
    paths = [[p for p, _ in its] for its in items] + ([[]] if not side else [])
    return (gal_a, gal_b, latency_markdown(result, tracker) + "\n\n" + markers_markdown(result),
            _plot_frame(tracker), tracker, paths)


def _benchmark_outputs(ctx: AppContext, max_queries: float) -> tuple[str, pd.DataFrame]:
    if ctx.truth is None:
        raise ValueError("this corpus has neither captions.json nor class folders to benchmark with")
    res = benchmark(ctx.index, ctx.encoders, ctx.truth, ks=BENCH_KS, max_queries=int(max_queries) or None)
    labels = list(res["recall"])
    head = "| precision | " + " | ".join(f"R@{k}" for k in res["ks"]) + " | mean latency ms |"
    rows = [head, "|---" * (len(res["ks"]) + 2) + "|"]
    for label in labels:
        rows.append(f"| {label} | " + " | ".join(f"{res['recall'][label][k]:.1%}" for k in res["ks"])
                    + f" | {res['latency_ms'][label]:.1f} |")
    if res["delta"]:
        rows.append(f"| Δ {labels[1]} − {labels[0]} | "
                    + " | ".join(f"{res['delta'][k] * 100:+.1f} pt" for k in res["ks"]) + " | |")
    md = (f"{res['n_queries']} queries from the corpus's {res['kind']}.\n\n" + "\n".join(rows))
    # One bar per (k, precision), in k order: BarPlot stacks bars sharing an x value.
    frame = pd.DataFrame([{"k": f"R@{k} {label}", "precision": label, "recall": res["recall"][label][k]}
                          for k in res["ks"] for label in labels])
    return md, frame


def _reindex(ctx: AppContext, progress: gr.Progress) -> tuple[str, dict[str, Any], str]:
    from clipfp8.indexing import index_corpus

    progress(0.0, desc="scanning")

    def cb(done: int, total: int) -> None:
        progress((done, max(total, 1)), desc="embedding", unit="images")

    s = index_corpus(ctx.corpus_root, ctx.index_dir, list(ctx.encoders.values()), progress=cb)
    ctx.reopen()
    skipped = ", ".join(f"{r}: {n}" for r, n in s.skipped.items()) or "none"
    md = (f"Indexed {s.indexed}, unchanged {s.unchanged}, moved {s.moved}, removed {s.removed}; "
          f"skipped: {skipped}; {s.total_seconds:.1f} s.")
    return md, ctx.stats, header_markdown(ctx)


def build_ui(ctx: AppContext, allow_reindex: bool = False) -> gr.Blocks:
    """The whole app; ``ctx`` is shared by every session, the latency series is per session.

    ``allow_reindex``: show the "Run incremental indexing" button. Off by default: a hidden
    Gradio endpoint is still callable over HTTP by anyone who can reach the server."""
    with gr.Blocks(title="FP8 CLIP image search") as demo:
        header = gr.Markdown(header_markdown(ctx), elem_id="header")
        with gr.Tabs():
            with gr.Tab("Search", id="search"):
                _search_tab(ctx)
            with gr.Tab("Benchmark", id="benchmark"):
                _benchmark_tab(ctx)
            with gr.Tab("Index", id="index"):
                _index_tab(ctx, header, allow_reindex)
    return demo


def _search_tab(ctx: AppContext) -> None:
    labels = list(ctx.encoders)
    tracker = gr.State(_new_tracker)  # a callable: one fresh tracker per session
    paths = gr.State([[], []])
    with gr.Row():
        query = gr.Textbox(label="Text query", placeholder="e.g. a red car", scale=4, elem_id="query")
        go = gr.Button("Search", variant="primary", scale=1, elem_id="search-btn")
    with gr.Row():
        k = gr.Slider(1, 50, value=10, step=1, label="k (results)")
        threshold = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Min score (0 = off)")
        precision = gr.Radio(labels, value=labels[0], label="Precision", elem_id="precision")
        mode = gr.Radio(["Single", "Side by side"], value="Single", label="Mode", elem_id="mode",
                        interactive=len(labels) >= 2)
    with gr.Row():
        image = gr.Image(type="pil", label="Image query (upload, or click a result)", height=200,
                         sources=["upload"], elem_id="image-query")
        image_go = gr.Button("Search by image", elem_id="image-search-btn")
    with gr.Row():
        gal_a = gr.Gallery(label=f"{labels[0]} results", columns=GALLERY_COLUMNS, elem_id="gallery-a")
        gal_b = gr.Gallery(label="second precision", columns=GALLERY_COLUMNS, visible=False, elem_id="gallery-b")
    latency = gr.Markdown(elem_id="latency")
    plot = _latency_plot(labels)

    outs = [gal_a, gal_b, latency, plot, tracker, paths]
    controls = [k, threshold, precision, mode]
    search_fn = user_errors(lambda tr, q, kk, th, p, m: run_search(ctx, tr, q, kk, th, p, m))
    # always_last: a query typed while another runs is answered after it, not dropped.
    go.click(search_fn, [tracker, query] + controls, outs, api_name="search", trigger_mode="always_last")
    query.submit(search_fn, [tracker, query] + controls, outs, api_visibility="private", trigger_mode="always_last")
    image_go.click(search_fn, [tracker, image] + controls, outs, api_name="search_image", trigger_mode="always_last")
    for which, gal in enumerate((gal_a, gal_b)):
        gal.select(user_errors(_select_handler(ctx, which)), [tracker, paths] + controls, [image] + outs,
                   api_visibility="private")


def _latency_plot(labels: list[str]) -> gr.LinePlot:
    palette = ["#1f77b4", "#aec7e8", "#d62728", "#ff9896", "#2ca02c", "#98df8a"]
    series = [f"{label} {stat}" for label in labels for stat in ("p50", "p95")]
    # The plot fixes its colour domain at first render, so start with every series present.
    seed = pd.DataFrame([{"query": 0, "series": name, "ms": 0.0} for name in series])
    return gr.LinePlot(seed, x="query", y="ms", color="series",
                       title="Rolling p50/p95 total latency, last 50 queries (ms)",
                       color_map=dict(zip(series, palette)), height=250, elem_id="latency-plot")


def _benchmark_tab(ctx: AppContext) -> None:
    gr.Markdown("Runs the corpus's captions (or class-folder names) as queries through every "
                "precision and reports Recall@1/5/10 and the FP8 − FP16 delta.")
    max_q = gr.Number(value=0, precision=0, label="Max queries (0 = all)")
    bench_go = gr.Button("Run benchmark", elem_id="bench-btn")
    bench_md = gr.Markdown(elem_id="bench-result")
    order = [f"R@{k} {label}" for k in BENCH_KS for label in ctx.encoders]
    bench_plot = gr.BarPlot(x="k", y="recall", color="precision", title="Recall@k", y_lim=[0, 1], height=250,
                            sort=order, x_title="")
    bench_go.click(user_errors(lambda mq: _benchmark_outputs(ctx, mq)), [max_q], [bench_md, bench_plot],
                   api_name="benchmark", concurrency_limit=1)


def _index_tab(ctx: AppContext, header: gr.Markdown, allow_reindex: bool) -> None:
    stats = gr.JSON(value=ctx.stats, label="Index statistics")
    if not allow_reindex:
        # No event handler at all: nothing to call over HTTP.
        gr.Markdown("Re-indexing from the page is off. Run `clipfp8 index` (incremental), or start "
                    "`clipfp8 serve --allow-reindex` on a machine only you can reach.", elem_id="reindex-off")
        return
    reindex_go = gr.Button("Run incremental indexing", elem_id="reindex-btn")
    reindex_md = gr.Markdown(elem_id="reindex-result")
    # Hidden from the API docs, but callable by anyone who reaches the server: opt-in only.
    reindex_go.click(user_errors(lambda progress=gr.Progress(): _reindex(ctx, progress)), None,
                     [reindex_md, stats, header], api_visibility="private", concurrency_limit=1)


def _new_tracker() -> LatencyTracker:
    return LatencyTracker()


def _select_handler(ctx: AppContext, which: int) -> Callable[..., tuple[Any, ...]]:
    """A select listener with an explicit signature (Gradio injects ``evt`` by its type hint)."""
    def on_select(tracker: LatencyTracker, paths: list[list[str]], k: float, threshold: float, precision: str,
                  mode: str, evt: gr.SelectData) -> tuple[Any, ...]:
        return _select(ctx, which, tracker, paths, k, threshold, precision, mode, evt)
    return on_select


def _select(ctx: AppContext, which: int, tracker: LatencyTracker, paths: list[list[str]], k: float,
            threshold: float, precision: str, mode: str, evt: gr.SelectData) -> tuple[Any, ...]:
    """Clicking a result searches by that image; the path comes from our own resolved list only."""
    shown = paths[which] if which < len(paths) else []
    if not isinstance(evt.index, int) or not 0 <= evt.index < len(shown):
        raise ValueError("that result is no longer available; run the search again")
    path = Path(shown[evt.index])
    if not path.resolve().is_relative_to(ctx.corpus_root):
        raise PathOutsideCorpusError("refused: the selected file is outside the corpus")
    with Image.open(path) as im:
        query = im.convert("RGB")
    return (query,) + run_search(ctx, tracker, query, k, threshold, precision, mode)


def launch(demo: gr.Blocks, ctx: AppContext, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           open_browser: bool = False, block: bool = True) -> Any:
    """Serve ``demo``: no file path is allowed (results go out as thumbnails), the corpus and index
    folders are explicitly blocked, uploads are capped at 10 MB, and only our own ``gr.Error``
    messages reach the browser (other exceptions show a generic error; details go to the log)."""
    demo.queue(default_concurrency_limit=4, max_size=256)
    return demo.launch(server_name=host, server_port=port, share=share, inbrowser=open_browser,
                       allowed_paths=[], blocked_paths=[str(ctx.corpus_root), str(Path(ctx.index_dir).resolve())],
                       max_file_size=MAX_UPLOAD, show_error=False,
                       prevent_thread_lock=not block, quiet=True, footer_links=["api"], ssr_mode=False)
