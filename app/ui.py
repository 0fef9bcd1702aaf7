"""The Gradio Blocks UI: a thin layer over ``app.search``, ``app.benchmark`` and ``app.backend``.

Every handler converts errors into a short ``gr.Error`` message (no stack traces reach the
browser). Images go out as pixels decoded here (thumbnails, the full-size view, the query image),
never as paths. Uploads arrive as files (``type="filepath"``) that this code decodes itself with
bounded memory and deletes at once; ``app.uploads`` caps them per request, per client and window,
and in total, and removes the process's temp folder at shutdown.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from clipfp8.app.backend import (
    FOLDERS_SOURCE,
    QUERY_MAX_SIDE,
    AppContext,
    decode_upload,
    load_full_image,
    load_ground_truth,
)
from clipfp8.app.benchmark import GroundTruth, benchmark, describe_truth
from clipfp8.app.latency import LatencyTracker, latency_chart
from clipfp8.app.search import ALL_FOLDERS, QuerySpec, banner_text, md_code, normalize_folder, placeholder_text, search
from clipfp8.app.thumbs import ThumbnailCache
from clipfp8.app.ui_render import (
    benchmark_markdown,
    gallery_items,
    header_markdown,
    latency_markdown,
    markers_markdown,
    selected_markdown,
    user_errors,
)
from clipfp8.app.uploads import DEFAULT_LIMITS, TempSpace, UploadLimits, ensure_temp_dir

log = logging.getLogger(__name__)

MAX_K = 50
SIDE_COLUMNS = 5  # side by side: 10 results in two rows of five per precision
BENCH_KS = (1, 5, 10)
CLICK_SEARCH, CLICK_SHOW = "Search by it", "Only show it"
SINGLE, SIDE = "Single", "Side by side"
STATE_TTL = 3600  # seconds a session's query image and uploaded ground truth are kept
#: Result galleries grow with their rows instead of scrolling inside a box of 55 % of the window
#: (Gradio's default, which hid results 9 and 10); thumbnails are 96 px high with their caption
#: below, not over them, wrapped (long file names too) instead of cut.
CSS = """
.results .grid-wrap { min-height: 0 !important; max-height: none !important; }
.results .grid-container { grid-auto-rows: auto !important; grid-template-rows: none !important; }
.results .gallery-item { height: auto !important; }
.results .thumbnail-item { aspect-ratio: auto !important; height: auto !important; display: flex !important;
  flex-direction: column; }
.results .thumbnail-lg > img { height: 96px !important; flex: none; }
.results .caption-label { position: static !important; max-width: 100% !important; white-space: normal !important;
  overflow-wrap: anywhere; overflow: visible !important; text-overflow: clip !important; border: none !important;
  border-top: 1px solid var(--border-color-primary) !important; border-radius: 0 !important; line-height: 1.2;
  font-size: 11px; opacity: 1 !important; }
#banner p { margin: 0; }
"""


def build_ui(ctx: AppContext, allow_reindex: bool = False, limits: UploadLimits = DEFAULT_LIMITS) -> gr.Blocks:
    """The whole app; ``ctx`` is shared by every session, queries and latencies are per session.

    ``allow_reindex``: show the "Run incremental indexing" button. Off by default: a hidden
    Gradio endpoint is still callable over HTTP by anyone who can reach the server."""
    space = TempSpace(ensure_temp_dir(), limits)  # before any component: they read GRADIO_TEMP_DIR
    with gr.Blocks(title="FP8 CLIP image search", delete_cache=(60, int(limits.max_age_s))) as demo:
        header = gr.Markdown(header_markdown(ctx), elem_id="header")
        with gr.Tabs():
            with gr.Tab("Search", id="search"):
                tab = SearchTab(ctx, space)
            with gr.Tab("Benchmark", id="benchmark"):
                _benchmark_tab(ctx, space)
            with gr.Tab("Index", id="index"):
                _index_tab(ctx, header, tab.folder, allow_reindex)
    return demo


class SearchTab:
    """The Search tab's components and handlers. Per-session values live in ``gr.State``: the
    latency tracker, the current query (``QuerySpec``), the page, the hit ids shown per gallery."""

    def __init__(self, ctx: AppContext, space: TempSpace) -> None:
        self.ctx, self.space, self.labels = ctx, space, list(ctx.encoders)
        self.thumbs = ThumbnailCache()  # shared by every session, as the index is
        captions = [c for c, _ in (_default_truth(ctx).pairs if ctx.sources else [])]
        self.tracker = gr.State(_new_tracker)  # a callable: one fresh tracker per session
        self.spec = gr.State(None, time_to_live=STATE_TTL)
        self.page, self.shown, self.sel_folder = gr.State(0), gr.State([[], []]), gr.State("")
        self.pending = gr.State(False)  # a clicked result's search, run in a second step
        self.folder_shown = gr.State(None)  # the folder filter of the results on screen
        with gr.Row(equal_height=False):
            with gr.Column(scale=4):
                with gr.Row():
                    self.query = gr.Textbox(label="Text query", placeholder=placeholder_text(captions, ctx.folders),
                                            scale=4, max_lines=1, elem_id="query")
                    self.folder = gr.Dropdown([ALL_FOLDERS] + ctx.folders, value=ALL_FOLDERS, allow_custom_value=True,
                                              label="Folder (pick, or type a path prefix)", scale=2, elem_id="folder")
                    with gr.Column(scale=1, min_width=170):
                        self.go = gr.Button("Search", variant="primary", elem_id="search-btn")
                        self.upload = gr.UploadButton("Upload image…", file_types=["image"], type="filepath",
                                                      elem_id="image-upload")
                with gr.Row():
                    self.k = gr.Slider(1, MAX_K, value=10, step=1, label="k (results per page)")
                    self.threshold = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Min score (0 = off)")
                    self.precision = gr.Radio(self.labels, value=self.labels[0], label="Precision", elem_id="precision")
                    self.mode = gr.Radio([SINGLE, SIDE], value=SINGLE, label="Mode", elem_id="mode",
                                         interactive=len(self.labels) >= 2)
                    self.click = gr.Radio([CLICK_SEARCH, CLICK_SHOW], value=CLICK_SEARCH, label="Clicking a result",
                                          elem_id="click-action")
            with gr.Column(scale=1, min_width=240):
                self.full = gr.Image(label="Query image / selected result, full size", interactive=False, height=150,
                                     buttons=["fullscreen", "download"], elem_id="fullsize")
                self.info = gr.Markdown(elem_id="selected-info")
                self.show_folder = gr.Button("Only this folder", size="sm", visible=False, elem_id="show-folder")
        with gr.Row(equal_height=True):
            self.banner = gr.Markdown("Type a query, or upload a picture.", elem_id="banner")
            self.prev = gr.Button("◀ Previous", size="sm", interactive=False, scale=0, elem_id="page-prev")
            self.next = gr.Button("Next ▶", size="sm", interactive=False, scale=0, elem_id="page-next")
        with gr.Row():
            # JPEG: Gradio encodes each thumbnail it is handed; WebP (its default) took ~4 ms a
            # 256 px thumbnail on the 2-core CPU, JPEG 0.2 ms, for files a quarter larger.
            kw: dict[str, Any] = dict(allow_preview=False, height="auto", object_fit="contain",
                                      elem_classes=["results"], format="jpeg")
            self.gal_a = gr.Gallery(label=f"{self.labels[0]} results", columns=10, elem_id="gallery-a", **kw)
            self.gal_b = gr.Gallery(label="second precision", columns=SIDE_COLUMNS, visible=False,
                                    elem_id="gallery-b", **kw)
        self.latency = gr.Markdown(elem_id="latency")
        self.plot = gr.HTML(latency_chart(LatencyTracker(), self.labels), elem_id="latency-plot")
        self._wire()

    def outputs(self) -> list[Any]:
        return [self.gal_a, self.gal_b, self.latency, self.plot, self.tracker, self.shown, self.spec, self.page,
                self.banner, self.prev, self.next, self.query, self.full, self.info, self.show_folder,
                self.sel_folder, self.folder, self.pending, self.folder_shown]

    def _wire(self) -> None:
        controls: list[Any] = [self.k, self.threshold, self.precision, self.mode, self.folder]
        outs = self.outputs()
        on_search = user_errors(self.on_search)
        # always_last: a query typed while another runs is answered after it, not dropped.
        self.go.click(on_search, [self.tracker, self.query, self.spec] + controls, outs, api_name="search",
                      trigger_mode="always_last")
        self.query.submit(on_search, [self.tracker, self.query, self.spec] + controls, outs,
                          api_visibility="private", trigger_mode="always_last")
        self.upload.upload(user_errors(self.on_upload), [self.tracker, self.upload] + controls, outs,
                           api_name="search_image")
        for step, button in ((-1, self.prev), (1, self.next)):
            button.click(user_errors(self._pager(step)), [self.tracker, self.spec, self.page] + controls, outs,
                         api_visibility="private")
        # change, not input: a picked option reports "input" twice, a typed prefix on blur only.
        self.folder.change(user_errors(self.on_folder), [self.tracker, self.spec, self.folder_shown] + controls,
                           outs, api_visibility="private")
        # Sets the dropdown only; its change event runs the search.
        self.show_folder.click(lambda folder: gr.Dropdown(value=folder), [self.sel_folder], [self.folder],
                               api_visibility="private")
        for which, gal in enumerate((self.gal_a, self.gal_b)):
            # Two steps: the first shows the full-size view and empties the galleries (which clears
            # their selection: a refill keeps the selected position highlighted on another image),
            # the second runs the search by the clicked image.
            gal.select(user_errors(self._select_handler(which)), [self.tracker, self.shown, self.click], outs,
                       api_visibility="private").then(
                user_errors(self.on_pending), [self.tracker, self.spec, self.pending] + controls, outs,
                api_visibility="private")

    def render(self, tracker: LatencyTracker, spec: QuerySpec | None, page: int, k: float, threshold: float,
               precision: str, mode: str, folder: str | None) -> dict[Any, Any]:
        """Run page ``page`` of ``spec`` and return every output it changes."""
        if spec is None:
            raise ValueError("no query yet: type some words or upload a picture")
        side = mode == SIDE
        result = search(spec.query(), self.ctx.encoders, self.ctx.index, k=int(k), threshold=threshold or None,
                        mode="side_by_side" if side else "single", precision=precision, folder=folder, page=page)
        tracker.record(result)
        labels = result.precisions()
        shown = [self.thumbs.get(gallery_items(self.ctx, result, label)) for label in labels]
        columns = SIDE_COLUMNS if side else max(1, min(int(k), 10))
        # selected_index=None: no thumbnail stays selected on results it no longer belongs to.
        gal_a = gr.Gallery(value=shown[0][0], label=f"{labels[0]} results", columns=columns, selected_index=None)
        gal_b = (gr.Gallery(value=shown[1][0], label=f"{labels[1]} results", columns=columns, visible=True,
                            selected_index=None) if side else gr.Gallery(value=[], visible=False))
        return {self.gal_a: gal_a, self.gal_b: gal_b, self.tracker: tracker, self.spec: spec, self.page: page,
                self.latency: latency_markdown(result, tracker) + "\n\n" + markers_markdown(result),
                self.plot: latency_chart(tracker, self.labels),
                self.shown: [ids for _, ids in shown] + [[]] * (2 - len(shown)),
                self.banner: banner_text(spec, result), self.folder_shown: result.folder,
                self.prev: gr.Button(interactive=page > 0),
                self.next: gr.Button(interactive=result.has_more), self.query: spec.label}

    def on_search(self, tracker: LatencyTracker, text: str, spec: QuerySpec | None, *controls: Any) -> dict[Any, Any]:
        return self.render(tracker, QuerySpec.from_text_box(text, spec), 0, *controls)

    def on_upload(self, tracker: LatencyTracker, path: str | None, *controls: Any) -> dict[Any, Any]:
        """An uploaded picture: read once and deleted, decoded here (bounded), then searched."""
        if not path:
            raise ValueError("no file arrived; upload the picture again")
        name = Path(path).name
        image = decode_upload(self.space.consume(path), name)
        out = self.render(tracker, QuerySpec(image=image, name=name), 0, *controls)
        out.update({self.full: image, self.show_folder: gr.Button(visible=False),
                    self.info: f"{md_code(name)} (uploaded) · {image.width}×{image.height} px"})
        return out

    def _pager(self, step: int) -> Callable[..., dict[Any, Any]]:
        def on_page(tracker: LatencyTracker, spec: QuerySpec | None, page: int, *controls: Any) -> dict[Any, Any]:
            return self.render(tracker, spec, max(0, int(page) + step), *controls)
        return on_page

    def on_folder(self, tracker: LatencyTracker, spec: QuerySpec | None, shown_folder: str | None,
                  *controls: Any) -> dict[Any, Any]:
        """A new folder choice re-runs the current query from its first page (a choice equal to the
        shown results' folder does nothing)."""
        if spec is None or normalize_folder(controls[-1]) == shown_folder:
            return {self.folder_shown: shown_folder}  # nothing to do (an empty dict would be one value)
        return self.render(tracker, spec, 0, *controls)

    def _select_handler(self, which: int) -> Callable[..., dict[Any, Any]]:
        """A select listener with an explicit signature (Gradio injects ``evt`` by its type hint)."""
        def on_select(tracker: LatencyTracker, shown: list[list[int]], click: str,
                      evt: gr.SelectData) -> dict[Any, Any]:
            return self.select(which, shown, click, evt.index)
        return on_select

    def select(self, which: int, shown: list[list[int]], click: str, index: Any) -> dict[Any, Any]:
        """A clicked result: its full-size view, read through the index by hit id (never a path
        from the browser), and, unless the user chose "Only show it", a pending search by it."""
        ids = shown[which] if which < len(shown) else []
        if not isinstance(index, int) or not 0 <= index < len(ids):
            raise ValueError("that result is no longer available; run the search again")
        image, rel = load_full_image(self.ctx.index, ids[index])
        searched = click != CLICK_SHOW
        folder = rel.rsplit("/", 1)[0] if "/" in rel else ""
        size = image.info.get("source_size", image.size)
        out = {self.full: image, self.info: selected_markdown(rel, size, searched), self.sel_folder: folder,
               self.show_folder: gr.Button(value=f"Only folder {folder}/", visible=bool(folder)),
               self.pending: searched}
        if searched:
            query = image.copy()
            query.thumbnail((QUERY_MAX_SIDE, QUERY_MAX_SIDE))
            out |= {self.spec: QuerySpec(image=query, name=Path(rel).name), self.query: f"image: {Path(rel).name}",
                    self.gal_a: gr.Gallery(value=None), self.gal_b: gr.Gallery(value=None)}
        return out

    def on_pending(self, tracker: LatencyTracker, spec: QuerySpec | None, pending: bool,
                   *controls: Any) -> dict[Any, Any]:
        """The second step of a click: the search by the clicked image, if one is pending."""
        if not pending:
            return {self.pending: False}  # never an empty dict: Gradio would take it for one output value
        return self.render(tracker, spec, 0, *controls) | {self.pending: False}


def _new_tracker() -> LatencyTracker:
    # A function, not the class: gr.State would treat a dataclass type as a value.
    return LatencyTracker()


def _default_truth(ctx: AppContext) -> GroundTruth:
    try:
        return load_ground_truth(ctx.index, ctx.default_source(), ctx.sources)
    except ValueError:
        return GroundTruth("captions", [])


def describe_source(ctx: AppContext, source: str | None) -> str:
    """What the Benchmark tab will use, or why it cannot (shown under the choice, not as an error)."""
    try:
        return describe_truth(load_ground_truth(ctx.index, source, ctx.sources))
    except ValueError as e:
        return f"⚠ {e}"


def run_benchmark(ctx: AppContext, source: str | None, uploaded: GroundTruth | None, max_queries: float,
                  progress: Callable[..., Any]) -> tuple[str, Any]:
    """Recall@k of every precision on the chosen ground truth, reporting progress every ~1 %."""
    truth = uploaded if uploaded is not None else load_ground_truth(ctx.index, source, ctx.sources)
    progress(0.0, desc="benchmark")

    def report(done: int, total: int) -> None:
        if done == total or done % max(1, total // 100) == 0:
            progress((done, total), desc="benchmark", unit="queries")

    res = benchmark(ctx.index, ctx.encoders, truth, ks=BENCH_KS, max_queries=int(max_queries or 0) or None,
                    progress=report)
    return benchmark_markdown(res, truth)


def read_uploaded_truth(ctx: AppContext, space: TempSpace, path: str | None) -> tuple[str, GroundTruth]:
    """An uploaded captions file: parsed, matched to the index, deleted. -> (description, truth)."""
    if not path:
        raise ValueError("no file arrived; upload the captions file again")
    name = Path(path).name
    try:
        truth = load_ground_truth(ctx.index, None, upload=(Path(path), name))
    finally:
        space.discard(path)
    return describe_truth(truth), truth


def _benchmark_tab(ctx: AppContext, space: TempSpace) -> None:
    gr.Markdown("Runs captions (or class-folder names) as text queries through every precision and reports "
                "Recall@1/5/10 and the FP8 − baseline delta (FP16; FP32 on the CPU). Pick the ground truth: "
                "a captions file in the corpus "
                "(`{file: [captions]}` JSON or `image,caption` CSV; pick it or type its path), class folders, "
                "or upload a captions file.")
    choices = ctx.sources + ([FOLDERS_SOURCE] if len(ctx.folders) >= 2 else [])
    default = ctx.default_source()
    uploaded = gr.State(None, time_to_live=STATE_TTL)
    with gr.Row(equal_height=True):
        source = gr.Dropdown(choices, value=default, allow_custom_value=True, scale=3, elem_id="bench-source",
                             label="Ground truth (captions file inside the corpus, or class folders)")
        upload = gr.UploadButton("…or upload a captions file", file_types=[".json", ".csv"], type="filepath",
                                 scale=1, elem_id="bench-upload")
        max_q = gr.Number(value=0, precision=0, label="Max queries (0 = all)", scale=1)
    info = gr.Markdown(describe_source(ctx, default) if default else "⚠ pick or upload a captions file",
                       elem_id="bench-source-info")
    bench_go = gr.Button("Run benchmark", variant="primary", elem_id="bench-btn")
    bench_md = gr.Markdown(elem_id="bench-result")
    order = [f"R@{k} {label}" for k in BENCH_KS for label in ctx.encoders]
    bench_plot = gr.BarPlot(x="k", y="recall", color="precision", title="Recall@k", y_lim=[0, 1], height=250,
                            sort=order, x_title="")
    source.change(lambda s: (describe_source(ctx, s), None), [source], [info, uploaded], api_visibility="private")
    upload.upload(user_errors(lambda p: read_uploaded_truth(ctx, space, p)), [upload], [info, uploaded],
                  api_visibility="private")
    bench_go.click(user_errors(lambda s, u, mq, progress=gr.Progress(): run_benchmark(  # noqa: B008
        ctx, s, u, mq, progress)), [source, uploaded, max_q], [bench_md, bench_plot], api_name="benchmark",
        concurrency_limit=1)


def _index_tab(ctx: AppContext, header: gr.Markdown, folder: gr.Dropdown, allow_reindex: bool) -> None:
    stats = gr.JSON(value=ctx.stats, label="Index statistics")
    if not allow_reindex:
        # No event handler at all: nothing to call over HTTP.
        gr.Markdown("Re-indexing from the page is off. Run `clipfp8 index` (incremental), or start "
                    "`clipfp8 serve --allow-reindex` on a machine only you can reach.", elem_id="reindex-off")
        return
    reindex_go = gr.Button("Run incremental indexing", elem_id="reindex-btn")
    reindex_md = gr.Markdown(elem_id="reindex-result")
    # Hidden from the API docs, but callable by anyone who reaches the server: opt-in only.
    reindex_go.click(user_errors(lambda progress=gr.Progress(): _reindex(ctx, progress)), None,  # noqa: B008
                     [reindex_md, stats, header, folder], api_visibility="private", concurrency_limit=1)


def _reindex(ctx: AppContext, progress: Callable[..., Any]) -> tuple[str, dict[str, Any], str, Any]:
    from clipfp8.indexing import index_corpus

    progress(0.0, desc="scanning")

    def cb(done: int, total: int) -> None:
        progress((done, max(total, 1)), desc="embedding", unit="images")

    s = index_corpus(ctx.corpus_root, ctx.index_dir, list(ctx.encoders.values()), progress=cb)
    ctx.reopen()
    skipped = ", ".join(f"{r}: {n}" for r, n in s.skipped.items()) or "none"
    md = (f"Indexed {s.indexed}, unchanged {s.unchanged}, moved {s.moved}, removed {s.removed}; "
          f"skipped: {skipped}; {s.total_seconds:.1f} s.")
    return md, ctx.stats, header_markdown(ctx), gr.Dropdown(choices=[ALL_FOLDERS] + ctx.folders)
