"""Indexing throughput on the CPU, per stage, for the embedded default model.

    python benchmarks/bench_indexing_cpu.py --limit 200

Indexes the first ``--limit`` images of ``../shared/data/eval/flickr8k-1k/images`` (through a
temporary folder of symlinks, nothing is copied) into a temporary index and prints images/s for
each stage: scan, decode (read + hash + Pillow + preprocess; per worker thread and overall),
embed (per encoder), store (commits), end to end; then the text-search rate. Falls back to a
tiny random-weight config, with a warning, when the default model is not trained yet.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "eval" / "flickr8k-1k" / "images"


def make_encoder(precision: str, batch_size: int):  # type: ignore[no-untyped-def]
    from clipfp8.quant.core.config import EncoderSpec, ModelSpec
    from clipfp8.quant.core.encoder import create_encoder
    from clipfp8.quant.core.errors import QuantError
    from clipfp8.quant.core.models import tiny_config

    try:
        return create_encoder(EncoderSpec(precision=precision, device="cpu", batch_size=batch_size)), "default"
    except QuantError as e:
        print(f"WARNING: default model unavailable ({e}); using a tiny random config instead -- "
              "embed figures are NOT representative")
        spec = EncoderSpec(model=ModelSpec(name="tiny", config=tiny_config(image_size=224)),
                           precision=precision, device="cpu", batch_size=batch_size)
        return create_encoder(spec), "tiny"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--precision", default="fp32", help="CPU precisions: fp32 or bf16")
    p.add_argument("--queries", type=int, default=50)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.images.is_dir():
        print(f"no images at {args.images}; nothing to benchmark")
        return 1
    import torch

    from clipfp8.indexing.config import IndexConfig
    from clipfp8.indexing.pipeline import index_corpus
    from clipfp8.indexing.query import search
    from clipfp8.indexing.store import open_index

    encoder, which = make_encoder(args.precision, args.batch_size)
    files = sorted(args.images.iterdir())[: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        for f in files:
            os.symlink(f.resolve(), corpus / f.name)
        cfg = IndexConfig(batch_size=args.batch_size, workers=args.workers)
        s = index_corpus(corpus, Path(tmp) / "idx", [encoder], config=cfg)
        n = s.indexed
        print(f"model={which} precision={args.precision} images={n} batch={args.batch_size} "
              f"workers={args.workers} torch_threads={torch.get_num_threads()}")
        st = s.stage_seconds
        rows = [("scan", st.get("scan", 0)),
                *[(f"  {part} (per worker thread)", st.get(f"decode:{part}", 0))
                  for part in ("read", "hash", "decode", "preprocess")],
                ("decode total (per worker thread)", st.get("decode", 0)),
                ("decode total (workers in parallel)", st.get("decode", 0) / args.workers),
                ("embedder waiting for decode", st.get("decode_wait", 0)),
                (f"embed {encoder.name}", st.get(f"embed:{encoder.name}", 0)),
                ("store (commits)", st.get("store", 0)), ("end to end", s.total_seconds)]
        for name, sec in rows:
            print(f"  {name:<40} {n / sec if sec else float('inf'):10.1f} images/s  ({sec:.2f}s)")
        with open_index(Path(tmp) / "idx") as store:
            t0 = time.perf_counter()
            for i in range(args.queries):
                search(store, encoder, f"a dog playing number {i}", k=10)
            dt = time.perf_counter() - t0
        print(f"  {'text search (encode + top-10)':<40} {args.queries / dt:10.1f} queries/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
