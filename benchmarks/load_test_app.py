"""Load test of the Gradio app through ``gradio_client``, loopback only and bounded.

Starts ``clipfp8 serve`` on a free 127.0.0.1 port, then C concurrent clients each send Q text
queries to the ``/search`` endpoint (alternating FP16/FP8 and single/side-by-side; result images are
not downloaded unless ``--download-files``, as a browser would cache them). Prints the
number of errors (should be 0), p50/p99 client-side latency and throughput.

By default it indexes the bundled sample corpus (data/samples) with the FakeEncoder twins of the
serve test hook (no model needed); ``--index-dir DIR --real`` load-tests an existing index with
the real encoders (add ``--quantized DIR`` for FP8).

    python benchmarks/load_test_app.py --clients 20 --queries 50
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from clipfp8.app.testserver import serve_subprocess  # noqa: E402

QUERIES = ["a red car", "cat", "house", "apple", "a person", "bicycle", "guitar", "tree", "a map", "telephone"]


def build_fake_index(corpus: Path, index_dir: Path) -> None:
    from clipfp8.app.backend import fake_encoders
    from clipfp8.indexing import index_corpus

    index_corpus(corpus, index_dir, list(fake_encoders().values()), workers=2)


def client_loop(url: str, n: int, seed: int, lat: list[float], errors: list[str], lock: threading.Lock,
                download: bool = False) -> None:
    from gradio_client import Client

    try:
        client = Client(url, verbose=False, download_files=download)
    except Exception as e:  # noqa: BLE001 - counted, reported
        with lock:
            errors.extend([f"connect: {e}"] * n)
        return
    for i in range(n):
        q = QUERIES[(seed + i) % len(QUERIES)]
        precision = "FP16" if i % 2 == 0 else "FP8"
        mode = "Side by side" if i % 3 == 0 else "Single"
        t0 = time.perf_counter()
        try:
            out = client.predict(q, 10, 0.0, precision, mode, api_name="/search")
            if not out or not out[0]:
                raise RuntimeError("empty gallery")
        except Exception as e:  # noqa: BLE001 - counted, reported
            with lock:
                errors.append(f"{type(e).__name__}: {str(e)[:120]}")
            continue
        with lock:
            lat.append((time.perf_counter() - t0) * 1e3)


def run(url: str, clients: int, queries: int, download: bool = False) -> dict:
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    threads = [threading.Thread(target=client_loop, args=(url, queries, c, lat, errors, lock, download))
               for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    arr = np.asarray(lat) if lat else np.asarray([np.nan])
    return {"clients": clients, "queries_per_client": queries, "download_files": download, "ok": len(lat),
            "errors": len(errors),
            "error_examples": sorted(set(errors))[:5], "p50_ms": float(np.percentile(arr, 50)),
            "p99_ms": float(np.percentile(arr, 99)), "max_ms": float(np.max(arr)), "wall_s": wall,
            "queries_per_s": len(lat) / wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--queries", type=int, default=50, help="queries per client")
    p.add_argument("--corpus", type=Path, default=REPO / "data" / "samples")
    p.add_argument("--index-dir", type=Path, default=None, help="existing index (default: build one with fakes)")
    p.add_argument("--real", action="store_true", help="use real encoders (needs --index-dir)")
    p.add_argument("--quantized", type=Path, default=None)
    p.add_argument("--download-files", action="store_true",
                   help="clients also fetch every result image (default: server latency only)")
    args = p.parse_args()
    if not (1 <= args.clients <= 64 and 1 <= args.queries <= 500):
        p.error("bounded load: --clients in [1, 64], --queries in [1, 500]")
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = args.index_dir
        if index_dir is None:
            if args.real:
                p.error("--real needs --index-dir")
            index_dir = Path(tmp) / "index"
            build_fake_index(args.corpus, index_dir)
        extra = ["--quantized", str(args.quantized)] if args.quantized else []
        with serve_subprocess(index_dir, fake=not args.real, extra_args=extra, log_file=Path(tmp) / "serve.log") as url:
            res = run(url, args.clients, args.queries, args.download_files)
    print(json.dumps(res, indent=1))
    print(f"{res['clients']} clients x {res['queries_per_client']} queries: errors={res['errors']} "
          f"p50={res['p50_ms']:.1f} ms p99={res['p99_ms']:.1f} ms throughput={res['queries_per_s']:.1f} q/s")
    return 0 if res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
