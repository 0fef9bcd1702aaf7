"""Serving the app: ``launch`` runs a built UI (``app.ui.build_ui``) behind the product's limits,
warm, and stops cleanly on Ctrl-C or SIGTERM."""
from __future__ import annotations

import gc
import signal
import threading
from pathlib import Path
from typing import Any

import gradio as gr

from clipfp8.app.backend import AppContext
from clipfp8.app.ui import CSS
from clipfp8.app.uploads import DEFAULT_LIMITS, TempSpace, UploadBudget, UploadGuard, UploadLimits, ensure_temp_dir


def launch(demo: gr.Blocks, ctx: AppContext, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           open_browser: bool = False, block: bool = True, limits: UploadLimits = DEFAULT_LIMITS) -> Any:
    """Serve ``demo``: no file path is allowed (images go out as decoded pixels), the corpus and
    index folders are explicitly blocked, uploads pass ``app.uploads.UploadGuard``, and only our
    own ``gr.Error`` messages reach the browser (other exceptions show a generic error; details go
    to the log). Blocking: SIGTERM stops the server like Ctrl-C, and the temp folder is removed.
    Before the server listens: one warm-up query per encoder, so it answers its first query warm,
    and (blocking) the start-up heap is frozen out of the garbage collector."""
    from starlette.middleware import Middleware

    if block and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # before the warm-up, which may take a while
    ctx.warm_up()
    _resolve_matplotlib_backend()
    space = TempSpace(ensure_temp_dir(), limits)
    guard = Middleware(UploadGuard, budget=UploadBudget(limits), space=space)
    demo.queue(default_concurrency_limit=4, max_size=256)
    if block:  # this process is the server: nothing else runs in it that could mind
        _freeze_startup_heap()  # before the server listens: a full collection here takes ~0.3 s
    try:
        launched = demo.launch(server_name=host, server_port=port, share=share, inbrowser=open_browser,
                               allowed_paths=[], blocked_paths=[str(ctx.corpus_root), str(Path(ctx.index_dir).resolve())],
                               max_file_size=limits.max_file_bytes, show_error=False,
                               app_kwargs={"middleware": [guard]}, prevent_thread_lock=True, quiet=True,
                               footer_links=["api"], ssr_mode=False, css=CSS)
        if block:
            demo.block_thread()  # what launch() does when it is allowed to block
        return launched
    finally:
        if block:
            space.remove()


def _resolve_matplotlib_backend() -> None:
    """Gradio switches matplotlib to "agg" around every event it runs, and the first switch asks
    matplotlib for its backend, which imports pyplot: 0.12-0.28 s of the first query on the
    2-core CPU (a py-spy profile of `clipfp8 serve`). Asked here, before the server listens."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.get_backend()


def _freeze_startup_heap() -> None:
    """Keep what start-up built (models, modules, the app) out of later garbage collections.
    A server's heap holds millions of such objects, and every full collection walked them all
    again: 0.12-0.31 s pauses on the 2-core CPU, one of which held up the first query's
    thumbnails by ~0.3 s. Objects made while serving are still collected."""
    gc.collect()
    gc.freeze()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")

