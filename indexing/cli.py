"""``clipfp8 index|search|verify|stats|export``: thin wrappers over the ``indexing`` functions.

Test hook: with ``CLIPFP8_TEST_FAKE_ENCODER=1`` in the environment, ``--precision`` also accepts
``fake`` and ``fake-fp8`` (``quant.core.testing.FakeEncoder``), so subprocess tests need no model.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from clipfp8.quant.cli import add_encoder_args, encoder_spec_from_args
from clipfp8.quant.core.config import PRECISIONS

log = logging.getLogger(__name__)

FAKE_ENV = "CLIPFP8_TEST_FAKE_ENCODER"
FAKE_PRECISIONS = ("fake", "fake-fp8")


def _precisions() -> tuple[str, ...]:
    return PRECISIONS + (FAKE_PRECISIONS if os.environ.get(FAKE_ENV) == "1" else ())


def make_encoder(args: argparse.Namespace, precision: str) -> Any:
    """The encoder for ``precision`` from the shared model/encoder arguments."""
    if precision in FAKE_PRECISIONS and os.environ.get(FAKE_ENV) == "1":
        from clipfp8.quant.core.testing import FakeEncoder  # test hook only, see the module docstring

        return FakeEncoder() if precision == "fake" else FakeEncoder(precision="fp8-fake", noise=0.05)
    from clipfp8.quant.core.encoder import create_encoder

    return create_encoder(encoder_spec_from_args(args, precision))


def cmd_index(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from clipfp8.indexing.config import DEFAULT_EXTENSIONS, IndexConfig
    from clipfp8.indexing.pipeline import index_corpus
    from clipfp8.indexing.scan import check_corpus

    check_corpus(args.corpus)  # fail before loading any model
    cfg = IndexConfig(batch_size=args.batch_size, workers=args.workers, factory=args.factory,
                      commit_every=args.commit_every, max_pixels=args.max_pixels,
                      extensions=tuple(args.extensions or DEFAULT_EXTENSIONS),
                      jpeg_draft=args.jpeg_draft)
    encoders = [make_encoder(args, p) for p in args.precision]
    bar = tqdm(unit="img", desc="indexing", disable=args.no_progress, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        summary = index_corpus(args.corpus, args.index_dir, encoders, config=cfg, progress=progress)
    finally:
        bar.close()
    print(summary.format())
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from clipfp8.indexing.query import search
    from clipfp8.indexing.store import open_index

    with open_index(args.index_dir) as store:
        encoder = make_encoder(args, args.precision)
        query: Any = args.text if args.text is not None else Path(args.image)
        hits = search(store, encoder, query, k=args.k, threshold=args.threshold, rerank=args.rerank)
        for h in hits:
            print(f"{h.score:.4f}\t{h.path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from clipfp8.indexing.consistency import verify

    encoders = [make_encoder(args, p) for p in args.precision] if args.repair else []
    report = verify(args.index_dir, repair=args.repair, encoders=encoders)
    print(report.format())
    return 0 if report.ok else 1


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


def _index_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index-dir", type=Path, required=True, help="index directory")


def register(sub: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``clipfp8`` parser."""
    p = sub.add_parser("index", help="index a folder of images (incremental, resumable)")
    p.add_argument("corpus", type=Path, help="folder of images (searched recursively)")
    _index_dir(p)
    p.add_argument("--precision", nargs="+", default=["fp16"], choices=_precisions(),
                   help="one or more encoder precisions, embedded in one pass")
    p.add_argument("--workers", type=int, default=4, help="decode threads")
    p.add_argument("--factory", default="Flat", help="FAISS factory string, e.g. Flat, IVF1024,Flat, HNSW32")
    p.add_argument("--commit-every", type=int, default=1024, help="files between commit points")
    p.add_argument("--max-pixels", type=int, default=64_000_000, help="larger images are skipped")
    p.add_argument("--extensions", nargs="+", default=None, help="file suffixes to index")
    p.add_argument("--jpeg-draft", action="store_true",
                   help="decode large JPEGs at reduced scale (faster; pixels differ slightly)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_encoder_args(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="search an index by text or image")
    _index_dir(p)
    p.add_argument("--precision", default="fp16", choices=_precisions())
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="text query")
    q.add_argument("--image", type=Path, help="image file query")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--threshold", type=float, default=None, help="minimum score (cosine)")
    p.add_argument("--rerank", action="store_true", help="exact re-ranking for IVF/HNSW indexes")
    add_encoder_args(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("verify", help="check index <-> database consistency")
    _index_dir(p)
    p.add_argument("--repair", action="store_true", help="fix it, re-embedding missing vectors")
    p.add_argument("--precision", nargs="+", default=[], choices=_precisions(),
                   help="encoders to re-embed with when repairing")
    add_encoder_args(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("stats", help="print index statistics as JSON")
    _index_dir(p)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("export", help="export embeddings + metadata to Parquet")
    _index_dir(p)
    p.add_argument("--precision", required=True, help="which encoder's embeddings")
    p.add_argument("--model", default=None, help="model name, when several encoders share the precision")
    p.add_argument("--output", type=Path, required=True, help="FILE.parquet")
    p.set_defaults(func=cmd_export)
