"""``clipfp8 serve`` and ``clipfp8 demo``: thin wrappers over ``app.backend``/``app.demo``/``app.ui``.

Test hook: with ``CLIPFP8_TEST_FAKE_ENCODER=1`` in the environment, ``serve`` uses the
``quant.core.testing.FakeEncoder`` twins of ``app.backend.fake_encoders`` instead of loading models
(the end-to-end browser test and the load test build their index with the same twins).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipfp8.quant.cli import add_encoder_args, device_arg, model_given, model_spec_from_args
from clipfp8.quant.core.config import ModelSpec

log = logging.getLogger(__name__)


def serve(index_dir: Path, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          model: ModelSpec | None = None, device: str = "auto", quantized: Path | None = None,
          batch_size: int | None = None, open_browser: bool = False, allow_reindex: bool = False,
          precision: str = "auto") -> int:
    """Open ``index_dir``, build the encoders it was indexed with and serve the app (blocks).

    ``model``, ``quantized`` and ``batch_size`` default (None) to what the index recorded; FP8 is
    served when the index holds FP8 embeddings and their quantized dir is recorded or given.
    ``precision``: the reference encoder (auto: fp32 on the CPU, fp16 on CUDA, if indexed).
    ``allow_reindex`` adds the page's incremental-indexing button (off by default).
    """
    from clipfp8.app.backend import open_context
    from clipfp8.app.serving import launch
    from clipfp8.app.ui import build_ui

    if not Path(index_dir).is_dir():
        raise NotADirectoryError(f"--index-dir {index_dir} is not a directory")
    ctx = open_context(Path(index_dir), model=model, device=device, quantized=quantized, batch_size=batch_size,
                       precision=precision)
    ui = build_ui(ctx, allow_reindex=allow_reindex)
    with UrlAnnouncer(ui, f"serving {ctx.corpus_root}", port):
        launch(ui, ctx, host=host, port=port, share=share, open_browser=open_browser)
    return 0


def demo(work_dir: Path, port: int = 7860, no_browser: bool = False, host: str = "127.0.0.1",
         device: str = "auto", precision: str = "auto", corpus: Path | None = None) -> int:
    """Quantize the default model on the bundled samples (or ``corpus``), index them in FP16 and
    FP8, serve."""
    from clipfp8.app.backend import open_context
    from clipfp8.app.demo import DemoConfig, prepare_demo
    from clipfp8.app.serving import launch
    from clipfp8.app.ui import build_ui

    cfg = DemoConfig(work_dir=work_dir, device=device, precision=precision)
    if corpus is not None:
        cfg = dataclasses.replace(cfg, corpus=corpus)  # validated again (a folder?)
    index_dir, encoders = prepare_demo(cfg, progress=_tqdm_progress())
    ctx = open_context(index_dir, encoders=encoders)
    # The demo is a local, loopback-only session over the bundled samples: re-indexing is on.
    ui = build_ui(ctx, allow_reindex=True)
    with UrlAnnouncer(ui, "demo", port):
        launch(ui, ctx, host=host, port=port, share=False, open_browser=not no_browser)
    return 0


class UrlAnnouncer:
    """Prints ``clipfp8: <what> on <URL> (Ctrl+C to stop)`` once Gradio has bound its port
    (Gradio runs ``quiet``, and its URL is known only then), from a watcher thread while
    ``launch`` blocks; on exit, prints it if the thread had not yet, then ``clipfp8: stopped``.
    A port already in use becomes an error naming ``--port``."""

    def __init__(self, ui: Any, what: str, port: int, poll_s: float = 0.05) -> None:
        self.ui, self.what, self.port, self.poll_s = ui, what, port, poll_s
        self._stop, self._lock, self.printed = threading.Event(), threading.Lock(), False
        self._thread = threading.Thread(target=self._watch, name="clipfp8-announce", daemon=True)

    def _announce(self) -> None:
        url = getattr(self.ui, "local_url", None)
        with self._lock:
            if url and not self.printed:
                print(f"clipfp8: {self.what} on {url} (Ctrl+C to stop)", flush=True)
                self.printed = True

    def _watch(self) -> None:
        while not self.printed and not self._stop.wait(self.poll_s):
            self._announce()

    def __enter__(self) -> UrlAnnouncer:
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._announce()  # a launch that returned at once (tests, prevent_thread_lock)
        if self.printed and exc_type is None:
            print("clipfp8: stopped", file=sys.stderr, flush=True)
        if isinstance(exc, OSError) and "Cannot find empty port" in str(exc):
            # Gradio's message names its own parameters (server_port, GRADIO_SERVER_PORT).
            raise OSError(f"--port {self.port} is in use (another server?); choose another with --port") from exc


def _tqdm_progress(file: Any = None) -> Callable[[int, int], None]:
    """A progress callback drawing a tqdm bar (on ``file``, default stderr), created on the first
    call (after quantization). ``update`` keeps tqdm's redraw interval: forcing a redraw per
    file wrote one line per image into a log that is not a terminal."""
    from tqdm import tqdm

    bar: list[Any] = []

    def cb(done: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(desc="indexing", unit="img", total=total, file=file))
        bar[0].total = total
        bar[0].update(done - bar[0].n)
        if done >= total:  # closed here, showing the end (the last update may fall inside the
            bar.pop().close()  # redraw interval): a bar left open is drawn again whenever it is collected
    return cb


def _serve_cmd(args: argparse.Namespace) -> int:
    model = model_spec_from_args(args) if model_given(args) else None  # None: the index's model
    return serve(args.index_dir, host=args.host, port=args.port, share=args.share, model=model,
                 device=args.device, quantized=args.quantized, batch_size=args.batch_size,
                 allow_reindex=args.allow_reindex, precision=args.precision)


def _demo_cmd(args: argparse.Namespace) -> int:
    return demo(args.work_dir, port=args.port, no_browser=args.no_browser, host=args.host, device=args.device,
                precision=args.precision, corpus=args.corpus)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``demo`` to the ``clipfp8`` parser."""
    p = sub.add_parser("serve", help="serve the image-search app over an index")
    p.add_argument("--index-dir", type=Path, required=True, help="index directory written by `clipfp8 index`")
    p.add_argument("--host", default="127.0.0.1", help="bind address; the default serves this machine only")
    p.add_argument("--port", type=int, default=7860, help="TCP port of the app")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    p.add_argument("--allow-reindex", action="store_true",
                   help="add the page's 'Run incremental indexing' button "
                        "(off: callable by anyone reaching the server)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
                   help="the reference encoder served beside FP8 (auto: fp32 on the CPU, where fp16 is 5-10x "
                        "slower, fp16 on CUDA; whichever the index holds)")
    add_encoder_args(p, from_index=True)
    p.set_defaults(func=_serve_cmd)

    d = sub.add_parser("demo", help="quantize the default model, index the bundled samples and serve")
    d.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "clipfp8" / "demo",
                   help="where the FP8 model and the index are cached")
    d.add_argument("--port", type=int, default=7860, help="TCP port of the app")
    d.add_argument("--host", default="127.0.0.1", help="bind address; the default serves this machine only")
    d.add_argument("--device", default="auto", type=device_arg, help="auto (CUDA when available), cpu, cuda or cuda:N")
    d.add_argument("--precision", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
                   help="the reference beside FP8 (auto: fp16 on CUDA, fp32 on the CPU, where fp16 is 5-10x slower)")
    d.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    d.add_argument("--corpus", type=Path, default=None,
                   help="a folder of your own images instead of the bundled samples (its captions file, if any, "
                        "feeds the FP8 calibration; else folder names do)")
    d.set_defaults(func=_demo_cmd)
