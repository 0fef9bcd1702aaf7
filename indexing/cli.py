"""``clipfp8 index|search|verify|stats|errors|export``: thin wrappers over the ``indexing`` functions.

Test hook: with ``CLIPFP8_TEST_FAKE_ENCODER=1`` in the environment, ``--precision`` also accepts
``fake`` and ``fake-fp8`` (``quant.core.testing.FakeEncoder``), so subprocess tests need no model.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from clipfp8.indexing.config import DECODE_MODES, DEFAULT_MAX_ASPECT, DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS, ENGINES, IndexConfig
from clipfp8.quant.cli import CLIUsageError, add_encoder_args, encoder_spec_from_args, non_negative_int, positive_int
from clipfp8.quant.core.config import AUTO_PRECISION, PRECISIONS

log = logging.getLogger(__name__)

FAKE_ENV = "CLIPFP8_TEST_FAKE_ENCODER"
FAKE_PRECISIONS = ("fake", "fake-fp8")
#: ``search --preview`` without a file: inline in kitty/iTerm2-capable terminals, else a temp PNG.
PREVIEW_AUTO = "auto"


def _precisions() -> tuple[str, ...]:
    return (AUTO_PRECISION, *PRECISIONS) + (FAKE_PRECISIONS if os.environ.get(FAKE_ENV) == "1" else ())


def _fake_encoder(precision: str) -> Any:
    from clipfp8.quant.core.testing import FakeEncoder  # test hook only, see the module docstring

    return FakeEncoder() if precision == "fake" else FakeEncoder(precision="fp8-fake", noise=0.05)


def make_encoder(args: argparse.Namespace, precision: str) -> Any:
    """A new encoder for ``precision`` (``auto``: fp16 on CUDA, fp32 on the CPU) from the shared
    model/encoder arguments (``index``)."""
    if precision in FAKE_PRECISIONS and os.environ.get(FAKE_ENV) == "1":
        return _fake_encoder(precision)
    from clipfp8.indexing.specs import resolve_precision
    from clipfp8.quant.core.encoder import create_encoder

    return create_encoder(encoder_spec_from_args(args, resolve_precision(precision, args.device)))


def ray_encoder_spec(args: argparse.Namespace, precision: str) -> Any:
    """``index --engine ray``: the spec each actor builds the encoder of ``precision`` from (no
    model loads here); ``auto`` (precision and device) follows the cluster: fp16 on CUDA when it
    has GPUs, else fp32. Called once connected to the cluster."""
    if precision in FAKE_PRECISIONS and os.environ.get(FAKE_ENV) == "1":
        return _fake_encoder(precision)  # a picklable test encoder: it travels as itself
    from clipfp8.indexing.ray_engine import cluster_device
    from clipfp8.indexing.specs import resolve_precision

    device = cluster_device() if args.device == "auto" else args.device
    return encoder_spec_from_args(args, resolve_precision(precision, device))


def index_encoder(store: Any, args: argparse.Namespace, precision: str, text_only: bool = False,
                  image_only: bool = False) -> Any:
    """The index's encoder for ``--precision`` (``auto``: its baseline), rebuilt from the spec the
    index recorded; --model/--pretrained/--checkpoint/--quantized/--batch-size, when given, win
    (the model must be the index's). ``text_only`` / ``image_only``: only texts / images will be
    encoded (faster start)."""
    if precision in FAKE_PRECISIONS and os.environ.get(FAKE_ENV) == "1":
        return _fake_encoder(precision)
    from clipfp8.indexing.specs import SpecOverrides, choose_encoder, spec_for_encoder, warn_cpu_half
    from clipfp8.quant.cli import model_given, model_spec_from_args
    from clipfp8.quant.core.encoder import create_encoder

    rows = {n: store.encoder_row(n) for n in store.encoder_names()}
    name = choose_encoder(rows, precision, args.device, args.model)
    if rows[name]["model_id"] == "fake" and os.environ.get(FAKE_ENV) == "1":  # built by the test hook
        return _fake_encoder("fake-fp8" if rows[name]["precision"] == "fp8-fake" else "fake")
    given = SpecOverrides(model=model_spec_from_args(args) if model_given(args) else None,
                          quantized=args.quantized, batch_size=args.batch_size, device=args.device,
                          text_only=text_only, image_only=image_only)
    spec = spec_for_encoder(name, rows[name], store.recorded_spec(name), given)
    warn_cpu_half(spec.precision, spec.device)
    return create_encoder(spec)


def cmd_index(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from clipfp8.indexing.config import DEFAULT_EXTENSIONS
    from clipfp8.indexing.pipeline import index_corpus
    from clipfp8.indexing.report import format_bad_files
    from clipfp8.indexing.scan import check_corpus

    check_corpus(args.corpus)  # fail before loading any model
    if args.engine == "ray" and args.watch:
        raise CLIUsageError("--watch runs the local engine; leave out --engine ray")
    if args.ray_address is not None and args.engine != "ray":
        raise CLIUsageError("--ray-address needs --engine ray")
    cfg = IndexConfig(batch_size=args.batch_size, workers=args.workers, factory=index_factory(args.factory, args.index_budget),
                      commit_every=args.commit_every, commit_interval_s=args.commit_interval,
                      max_pixels=args.max_pixels,
                      max_file_bytes=args.max_file_bytes, max_aspect=args.max_aspect,
                      extensions=tuple(args.extensions or DEFAULT_EXTENSIONS),
                      jpeg_draft=args.jpeg_draft, rehash=args.rehash, decode=args.decode,
                      encode_ahead=args.encode_ahead, read_processes=args.read_processes)

    def encoders() -> list[Any]:  # called once the index is locked: a second writer fails fast
        make = ray_encoder_spec if args.engine == "ray" else make_encoder
        return [make(args, p) for p in args.precision]

    bar = tqdm(unit="img", desc="indexing", disable=args.no_progress, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    if args.watch:
        return _watch(args, cfg, encoders, progress, bar)
    try:
        summary = index_corpus(args.corpus, args.index_dir, encoders, config=cfg, progress=progress,
                               engine=args.engine, ray_address=args.ray_address)
    finally:
        bar.close()
    print(summary.format())
    if args.summary_json is not None:
        from clipfp8.quant.core.fileio import atomic_write_text

        atomic_write_text(args.summary_json, json.dumps(summary.to_dict(), indent=1))
    tail = format_bad_files(summary.errors, summary.bad_files, args.index_dir, args.show_errors)
    if tail:
        print(tail)
    return 0


def index_factory(factory: str, index_budget: str | None) -> str:
    """``--factory`` with ``--index-budget`` folded in (``auto:<budget>``, the string recorded in
    the index); a budget with another factory is a usage error, a bad budget an ``IndexConfigError``."""
    from clipfp8.indexing.faiss_factory import auto_factory, is_auto, parse_budget

    if index_budget is None:
        return factory
    if not is_auto(factory):
        raise CLIUsageError(f"--index-budget applies to --factory auto, not --factory {factory}")
    return auto_factory(parse_budget(index_budget))


def _watch(args: argparse.Namespace, cfg: Any, encoders: Any, progress: Any, bar: Any) -> int:
    """``index --watch``: the first pass with the progress bar and full summary, then one line
    per pass; Ctrl+C stops (an interrupted pass resumes on the next run)."""
    from clipfp8.indexing.watch import WatchConfig, watch_corpus

    passes: list[int] = []

    def first_pass_progress(done: int, total: int) -> None:
        if not passes:
            progress(done, total)

    def on_pass(summary: Any, paths: list[str]) -> None:
        if not passes:
            bar.close()
            print(summary.format())
            print(f"watching {args.corpus} (Ctrl+C to stop)", flush=True)
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {len(paths)} change(s): {summary.format().splitlines()[0]}",
                  flush=True)
        passes.append(1)

    wcfg = WatchConfig(debounce_ms=args.debounce_ms, quiet_ms=min(250, args.debounce_ms))
    try:
        watch_corpus(args.corpus, args.index_dir, encoders, config=cfg, watch=wcfg, on_pass=on_pass,
                     progress=first_pass_progress)
    except KeyboardInterrupt:
        print("stopped watching", file=sys.stderr)
    finally:
        bar.close()
    return 0


def process_seconds() -> float | None:
    """Seconds since this process started (Linux: /proc/self/stat and /proc/uptime), else None."""
    try:
        with open("/proc/self/stat", "rb") as f:  # bytes: the process name may be any bytes
            start_ticks = int(f.read().rsplit(b")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class StageTimer:
    """Wall seconds per named stage of one command, for ``--timings``: ``mark(name)`` closes the
    stage that ran since the previous mark; ``line()`` formats them, with the process's start-up
    (interpreter, imports and argument parsing before the command) first where it is known."""

    def __init__(self) -> None:
        self.startup = process_seconds()
        self.t0 = self.last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = now - self.last
        self.last = now

    def line(self) -> str:
        parts = ([("startup", self.startup)] if self.startup is not None else []) + list(self.stages.items())
        total = (self.startup or 0.0) + (self.last - self.t0)
        return "timings: " + ", ".join(f"{k} {v:.3f} s" for k, v in [*parts, ("total", total)])


def cmd_search(args: argparse.Namespace) -> int:
    """Text: ``score<TAB>path`` per hit (paths escaped to one line; a third column
    ``outside-corpus`` marks a symlink whose target is outside the corpus). ``--json``: one JSON
    object per hit (rank, id, score, exact path, outside_corpus). ``--timings``: one line on
    stderr with the seconds of each stage (start-up, open index, encoder, query, output)."""
    timer = StageTimer()
    from clipfp8.indexing.query import outside_corpus, search
    from clipfp8.indexing.report import display_path
    from clipfp8.indexing.store import open_index

    with open_index(args.index_dir) as store:
        timer.mark("open index")
        encoder = index_encoder(store, args, args.precision, text_only=args.text is not None,
                                image_only=args.image is not None)
        timer.mark("encoder")
        query: Any = args.text if args.text is not None else Path(args.image)
        hits = search(store, encoder, query, k=args.k, threshold=args.threshold, rerank=args.rerank)
        timer.mark("query")
        for rank, h in enumerate(hits, 1):
            outside = outside_corpus(store, h.path)
            if args.json:
                print(json.dumps({"rank": rank, "id": h.id, "score": round(h.score, 6), "path": h.path,
                                  "outside_corpus": outside}))
            else:
                print(f"{h.score:.4f}\t{display_path(h.path)}" + ("\toutside-corpus" if outside else ""))
        if args.preview is not None and hits:
            from clipfp8.indexing.preview import preview_items, show_preview

            target = None if args.preview == PREVIEW_AUTO else Path(args.preview)
            written = show_preview(preview_items(hits, store.resolve), target, stream=sys.stdout)
            if written is not None:
                print(f"preview: {written}", file=sys.stderr)
        timer.mark("output")
    if args.timings:
        print(timer.line(), file=sys.stderr)
    return 0


def cmd_errors(args: argparse.Namespace) -> int:
    """``path<TAB>reason<TAB>size<TAB>detail`` per bad file (escaped), or JSON lines."""
    from clipfp8.indexing.report import list_errors

    bad = list_errors(args.index_dir, reason=args.reason or (), limit=args.limit)
    for b in bad:
        print(json.dumps(b.to_dict()) if args.json else b.format())
    print(f"{len(bad)} bad file(s)" + (f" (--limit {args.limit})" if args.limit == len(bad) else ""),
          file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from clipfp8.indexing.consistency import verify

    encoders = _repair_encoders(args) if args.repair else []
    report = verify(args.index_dir, repair=args.repair, encoders=encoders)
    print(report.format())
    return 0 if report.ok else 1


def _repair_encoders(args: argparse.Namespace) -> list[Any]:
    """``verify --repair``'s encoders: those of ``--precision``, else every encoder whose spec the
    index recorded (rebuilt from it), so missing vectors are re-embedded without model flags."""
    from clipfp8.indexing.store import open_index

    with open_index(args.index_dir) as store:
        if args.precision:
            return [index_encoder(store, args, p) for p in args.precision]
        recorded = [n for n in store.encoder_names() if store.recorded_spec(n) is not None]
        return [index_encoder(store, args, store.encoder_row(n)["precision"]) for n in recorded]


def cmd_stats(args: argparse.Namespace) -> int:
    from clipfp8.indexing.store import open_index

    with open_index(args.index_dir) as store:
        print(json.dumps(store.stats(), indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from clipfp8.indexing.export import export_parquet
    from clipfp8.indexing.store import open_index

    with open_index(args.index_dir) as store:
        name = stored_encoder_name(store.stats()["encoders"], args.precision, args.model)
        n = export_parquet(store, name, args.output)
    print(f"wrote {n} rows of {name} to {args.output}")
    return 0


def stored_encoder_name(encoders: dict[str, dict[str, Any]], precision: str, model: str | None) -> str:
    """The index's encoder with ``precision`` (and, when several, whose name starts with ``model``)."""
    from clipfp8.indexing.errors import UnknownEncoderError

    names = [n for n, e in encoders.items() if e["precision"] == precision or n.endswith(f"-{precision}")]
    if len(names) > 1 and model:
        names = [n for n in names if n.startswith(f"{model}-")]
    if len(names) != 1:
        raise UnknownEncoderError(f"--precision {precision}: the index has encoders {list(encoders)}; "
                                  f"{'none' if not names else 'several'} match")
    return names[0]


def byte_size(text: str) -> int:
    """``--max-file-bytes`` values: a byte count, or with a K/M/G/T suffix (powers of 1024;
    "256M", "1GiB")."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 268435456, 256M, 1G)")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


def _index_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index-dir", type=Path, required=True, help="index directory")


def register(sub: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``clipfp8`` parser."""
    p = sub.add_parser("index", help="index a folder of images (incremental, resumable)")
    p.add_argument("corpus", type=Path, help="folder of images (searched recursively)")
    _index_dir(p)
    p.add_argument("--precision", nargs="+", default=[AUTO_PRECISION], choices=_precisions(),
                   help="one or more encoder precisions, embedded in one pass; auto = the 16-bit "
                        "baseline: fp16 on CUDA, fp32 on the CPU (fp16 is 5-10x slower there)")
    p.add_argument("--summary-json", type=Path, default=None, metavar="FILE",
                   help="also write the run's summary (counts, stage seconds, decode path) as JSON")
    p.add_argument("--workers", type=int, default=4,
                   help="decode threads (on the GPU path: file-reading threads, at most 4)")
    p.add_argument("--factory", default="auto",
                   help="auto (default): exact Flat below 100k vectors, then an IVF-PQ index sized by --index-budget "
                        "with its exact vectors on disk for re-ranking; or a FAISS factory string, e.g. Flat, "
                        "IVF1024,Flat, HNSW32")
    p.add_argument("--index-budget", default=None, metavar="BYTES",
                   help="with --factory auto: RAM for the index, bytes per vector (default 100) or a total "
                        "with a K/M/G/T suffix (e.g. 8G); more bytes, better codes (PQ, then SQ8)")
    p.add_argument("--commit-every", type=int, default=1024, help="files between commit points")
    p.add_argument("--commit-interval", type=float, default=10.0, metavar="SECONDS",
                   help="and at least this long between commit points (each rewrites the FAISS files; "
                        "a crash loses at most about this much work; default 10)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="larger images are skipped as oversized, from their header (exact limit)")
    p.add_argument("--max-file-bytes", type=byte_size, default=DEFAULT_MAX_FILE_BYTES,
                   help="larger files are skipped as file_too_large without being read (256M; K/M/G suffixes)")
    p.add_argument("--max-aspect", type=float, default=DEFAULT_MAX_ASPECT,
                   help="images longer than this many times their short side are centre-cropped "
                        f"to it before resizing (bounds memory; default {DEFAULT_MAX_ASPECT:g})")
    p.add_argument("--rehash", action="store_true",
                   help="re-hash files whose size and mtime are unchanged, and retry bad files")
    p.add_argument("--show-errors", type=int, default=20, metavar="N",
                   help="bad files of this run listed after the summary (all: `clipfp8 errors`)")
    p.add_argument("--extensions", nargs="+", default=None, help="file suffixes to index")
    p.add_argument("--jpeg-draft", action="store_true",
                   help="decode large JPEGs at reduced scale (faster; pixels differ slightly)")
    p.add_argument("--decode", choices=DECODE_MODES, default="auto",
                   help="JPEG decoding: auto = batched nvJPEG + preprocessing on the GPU when every "
                        "encoder runs on CUDA, else Pillow on CPU threads; cpu; gpu (force)")
    p.add_argument("--encode-ahead", type=positive_int, default=IndexConfig.encode_ahead, metavar="N",
                   help="batches left queued on a GPU encoder while the next is prepared (default 2: "
                        "the GPU stays busy through a commit or a slow read; 1 holds less GPU memory)")
    p.add_argument("--read-processes", type=non_negative_int, default=0, metavar="N",
                   help="GPU path: read and check the files in N processes instead of threads of this one "
                        "(0, the default: threads); frees the GIL for the thread that feeds the GPU")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: decode and embed in this process; ray: in a Ray actor pool (one actor per "
                        "GPU), while this process scans, plans and commits (pip install 'clip-fp8[ray]')")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --engine ray: the cluster to join (host:port printed by `ray start --head`); "
                        "default: RAY_ADDRESS, a cluster started on this machine, else a new local one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--watch", action="store_true",
                   help="after indexing, keep watching the corpus and re-index new, changed, moved and "
                        "deleted files (Ctrl+C to stop)")
    p.add_argument("--debounce-ms", type=positive_int, default=1000, metavar="MS",
                   help="with --watch: longest wait while changes keep coming before a pass starts")
    add_encoder_args(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="search an index by text or image")
    _index_dir(p)
    p.add_argument("--precision", default=AUTO_PRECISION, choices=_precisions(),
                   help="which of the index's encoders (auto: its baseline, fp32 preferred on the CPU, "
                        "fp16 on CUDA); the model and quantized dir come from the index")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="text query")
    q.add_argument("--image", type=Path, help="image file query")
    p.add_argument("-k", type=int, default=10, help="number of results")
    p.add_argument("--threshold", type=float, default=None, help="minimum score (cosine)")
    p.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=None,
                   help="re-score 10 x k candidates exactly from the stored vectors (IVF/HNSW indexes); default: "
                        "on for --factory auto indexes past 100k vectors, off otherwise")
    p.add_argument("--json", action="store_true", help="one JSON object per hit (exact paths)")
    p.add_argument("--timings", action="store_true",
                   help="print the seconds of each stage (start-up, open index, encoder, query, output) to stderr")
    p.add_argument("--preview", nargs="?", const=PREVIEW_AUTO, default=None, metavar="FILE.png",
                   help="also show the hits as a contact sheet: inline in kitty/iTerm2/WezTerm, else "
                        "written to FILE.png (default: a temp file, path printed)")
    add_encoder_args(p, from_index=True)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("verify", help="check index <-> database consistency")
    _index_dir(p)
    p.add_argument("--repair", action="store_true", help="fix it, re-embedding missing vectors")
    p.add_argument("--precision", nargs="+", default=[], choices=_precisions(),
                   help="encoders to re-embed with when repairing (default: every encoder whose spec "
                        "the index recorded)")
    add_encoder_args(p, from_index=True)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("stats", help="print index statistics as JSON")
    _index_dir(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("errors", help="list the bad files of an index: path, reason, size, detail")
    _index_dir(p)
    p.add_argument("--reason", nargs="+", default=None, help="only these reasons (e.g. oversized)")
    p.add_argument("--limit", type=int, default=None, help="at most this many")
    p.add_argument("--json", action="store_true", help="one JSON object per file (exact paths)")
    p.set_defaults(func=cmd_errors)

    p = sub.add_parser("export", help="export embeddings + metadata to Parquet")
    _index_dir(p)
    p.add_argument("--precision", required=True, help="which encoder's embeddings")
    p.add_argument("--model", default=None, help="model name, when several encoders share the precision")
    p.add_argument("--output", type=Path, required=True, help="FILE.parquet")
    p.set_defaults(func=cmd_export)
