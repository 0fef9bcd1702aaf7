"""``clipfp8 serve`` and ``clipfp8 demo``: thin wrappers over ``app.backend``/``app.demo``/``app.ui``.

Test hook: with ``CLIPFP8_TEST_FAKE_ENCODER=1`` in the environment, ``serve`` uses the
``quant.core.testing.FakeEncoder`` twins of ``app.backend.fake_encoders`` instead of loading models
(the end-to-end browser test and the load test build their index with the same twins).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Callable

from clipfp8.quant.cli import add_encoder_args, model_spec_from_args
from clipfp8.quant.core.config import ModelSpec

log = logging.getLogger(__name__)


def serve(index_dir: Path, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          model: ModelSpec | None = None, device: str = "auto", quantized: Path | None = None,
          batch_size: int = 64, open_browser: bool = False, allow_reindex: bool = False) -> int:
    """Open ``index_dir``, build the encoders it was indexed with and serve the app (blocks).

    FP8 is served only when ``quantized`` (a ``clipfp8 quantize`` directory) is given;
    ``allow_reindex`` adds the page's incremental-indexing button (off by default).
    """
    from clipfp8.app.backend import open_context
    from clipfp8.app.ui import build_ui, launch

    if not Path(index_dir).is_dir():
        raise NotADirectoryError(f"--index-dir {index_dir} is not a directory")
    ctx = open_context(Path(index_dir), model=model, device=device, quantized=quantized, batch_size=batch_size)
    log.info("serving %s on http://%s:%d (share=%s)", ctx.corpus_root, host, port, share)
    launch(build_ui(ctx, allow_reindex=allow_reindex), ctx, host=host, port=port, share=share, open_browser=open_browser)
    return 0


def demo(work_dir: Path, port: int = 7860, no_browser: bool = False, host: str = "127.0.0.1",
         device: str = "auto") -> int:
    """Quantize the default model on the bundled samples, index them in FP16 and FP8, serve."""
    from clipfp8.app.backend import open_context
    from clipfp8.app.demo import DemoConfig, prepare_demo
    from clipfp8.app.ui import build_ui, launch

    cfg = DemoConfig(work_dir=work_dir, device=device)
    index_dir, encoders = prepare_demo(cfg, progress=_tqdm_progress())
    ctx = open_context(index_dir, encoders=encoders)
    # The demo is a local, loopback-only session over the bundled samples: re-indexing is on.
    launch(build_ui(ctx, allow_reindex=True), ctx, host=host, port=port, share=False, open_browser=not no_browser)
    return 0


def _tqdm_progress() -> Callable[[int, int], None]:
    """A progress callback drawing a tqdm bar, created on the first call (after quantization)."""
    from tqdm import tqdm

    bar: list[Any] = []

    def cb(done: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(desc="indexing samples", unit="img", total=total))
        bar[0].total = total
        bar[0].n = done
        bar[0].refresh()
    return cb


def _serve_cmd(args: argparse.Namespace) -> int:
    return serve(args.index_dir, host=args.host, port=args.port, share=args.share, model=model_spec_from_args(args),
                 device=args.device, quantized=args.quantized, batch_size=args.batch_size,
                 allow_reindex=args.allow_reindex)


def _demo_cmd(args: argparse.Namespace) -> int:
    return demo(args.work_dir, port=args.port, no_browser=args.no_browser, host=args.host, device=args.device)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``demo`` to the ``clipfp8`` parser."""
    p = sub.add_parser("serve", help="serve the image-search app over an index")
    p.add_argument("--index-dir", type=Path, required=True, help="index directory written by `clipfp8 index`")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    p.add_argument("--allow-reindex", action="store_true",
                   help="add the page's 'Run incremental indexing' button (off: callable by anyone reaching the server)")
    add_encoder_args(p)
    p.set_defaults(func=_serve_cmd)

    d = sub.add_parser("demo", help="quantize the default model, index the bundled samples and serve")
    d.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "clipfp8" / "demo",
                   help="where the FP8 model and the index are cached")
    d.add_argument("--port", type=int, default=7860)
    d.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    d.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    d.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    d.set_defaults(func=_demo_cmd)
