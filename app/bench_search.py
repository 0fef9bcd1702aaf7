"""The query side of ``clipfp8 bench``, each through the shipped code:

* ``synthetic_store``: an index directory holding ``rows`` random unit vectors per encoder,
  written with the indexer's own store (``indexing.store``: rows, bookkeeping, FAISS files, one
  commit), so ``indexing.query.search`` runs on it exactly as on a real index;
* ``time_search`` / ``time_app_search``: warm p50/p99 of a text query + search through
  ``indexing.query.search`` and through the app's pure ``app.search.search``;
* ``cold_cli``: wall time of fresh ``clipfp8 ...`` processes (``search``);
* ``time_serve``: ``clipfp8 serve`` until its page answers, then its first query, sent as its
  web page sends it (``page_client``).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipfp8.quant.core.encoder import Encoder

QUERY = "a photo of a dog running on the beach"
#: Rows per chunk when filling the synthetic index (bounds the fp32 temporary).
CHUNK = 262_144


def cli_command(*args: str) -> list[str]:
    """A fresh ``clipfp8 ARGS`` process, on this interpreter (what the console script runs)."""
    return [sys.executable, "-m", "clipfp8.app.cli", *args]


def synthetic_store(index_dir: Path, encoders: Sequence[Encoder], rows: int, seed: int = 0) -> Path:
    """Write an index of ``rows`` images (paths only; no files) with a random unit vector per
    image for every encoder, under each encoder's identity; returns ``index_dir``."""
    from clipfp8.indexing.store import open_for_write
    from clipfp8.indexing.vectors import VectorIndex

    root = Path(index_dir).parent / f"{Path(index_dir).name}-corpus"
    root.mkdir(parents=True, exist_ok=True)
    ids = np.arange(1, rows + 1, dtype=np.int64)
    with open_for_write(index_dir, root.resolve()) as store:
        vecs: dict[str, VectorIndex] = {}
        for n, enc in enumerate(encoders):
            store.register_encoder(enc.identity(), "Flat")
            vec, rng = VectorIndex.new(enc.dim, "Flat"), np.random.default_rng(seed + n)
            for start in range(0, rows, CHUNK):
                x = rng.standard_normal((min(CHUNK, rows - start), enc.dim), dtype=np.float32)
                vec.add(ids[start:start + len(x)], x / np.linalg.norm(x, axis=1, keepdims=True))
            vecs[enc.name] = vec
        enc_ids = {name: store.encoder_row(name)["id"] for name in vecs}

        def apply(db: Any) -> set[str]:
            db.conn.executemany(
                "INSERT INTO images (id, path, path_raw, size, mtime_ns, sha256, width, height, status) "
                "VALUES (?, ?, ?, 0, 0, ?, 500, 375, 'ok')",
                ((int(i), f"s/{i:07d}.jpg", f"s/{i:07d}.jpg".encode(), f"{i:064x}") for i in ids))
            for enc_id in enc_ids.values():
                db.conn.executemany("INSERT INTO embeddings (image_id, encoder_id) VALUES (?, ?)",
                                    ((int(i), enc_id) for i in ids))
            return set(vecs)

        store.commit(vecs, apply)
    return Path(index_dir)


def _percentiles(latencies_ms: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(latencies_ms, 50)), "p99_ms": float(np.percentile(latencies_ms, 99)),
            "iters": len(latencies_ms)}


def _timed(fn: Any, min_time_s: float, warmup: int = 3, min_iters: int = 20, max_iters: int = 5000) -> dict[str, float]:
    """Call ``fn`` ``warmup`` times, then until ``min_time_s`` passed (``min_iters``..``max_iters``
    calls); each call timed with perf_counter (the calls return host data: already synchronised)."""
    for _ in range(warmup):
        fn()
    lat: list[float] = []
    end = time.perf_counter() + min_time_s
    while len(lat) < max_iters and (len(lat) < min_iters or time.perf_counter() < end):
        t = time.perf_counter()
        fn()
        lat.append((time.perf_counter() - t) * 1e3)
    return _percentiles(lat)


def time_search(index_dir: Path, encoder: Encoder, min_time_s: float, k: int = 10) -> dict[str, Any]:
    """Warm text query + top-``k`` search through ``indexing.query.search``."""
    from clipfp8.indexing.query import search
    from clipfp8.indexing.store import open_index

    with open_index(index_dir) as store:
        hits = search(store, encoder, QUERY, k=k)
        out = _timed(lambda: search(store, encoder, QUERY, k=k), min_time_s)
        out["rows"] = store.vectors(encoder.name).ntotal
    out["hits"] = len(hits)
    return out


def time_app_search(index_dir: Path, encoders: dict[str, Encoder], min_time_s: float, k: int = 10) -> dict[str, Any]:
    """Warm latency of the app's ``app.search.search`` (what the page's search button runs):
    single mode per label, and side by side when there are two."""
    from clipfp8.app.backend import StoreIndex
    from clipfp8.app.search import search
    from clipfp8.indexing.store import open_index

    out: dict[str, Any] = {}
    with open_index(index_dir) as store:
        index = StoreIndex(store)
        for label in encoders:
            out[label] = _timed(lambda label=label: search(QUERY, encoders, index, k=k, mode="single",
                                                           precision=label), min_time_s)
        if len(encoders) >= 2:
            out["side_by_side"] = _timed(lambda: search(QUERY, encoders, index, k=k, mode="side_by_side"), min_time_s)
    return out


def _text(data: str | bytes | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def run_process(cmd: list[str], timeout: float, env: dict[str, str] | None = None,
                log_file: Path | None = None) -> dict[str, Any]:
    """Run ``cmd`` to completion: wall seconds, exit code, the output's last lines."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = -1, f"timed out after {timeout:.0f} s\n{_text(e.stdout)}{_text(e.stderr)}"
    wall = time.perf_counter() - t0
    if log_file is not None:
        log_file.write_text(text)
    return {"wall_s": round(wall, 3), "rc": rc, "tail": text.strip().splitlines()[-8:]}


def stage_timings(lines: list[str]) -> dict[str, float] | None:
    """The ``timings: name 1.234 s, ...`` line that ``clipfp8 search --timings`` prints, as a
    dict (stage -> seconds); None when the output has none."""
    line = next((x for x in reversed(lines) if x.startswith("timings: ")), None)
    if line is None:
        return None
    out = {}
    for part in line.removeprefix("timings: ").split(", "):
        name, value, _unit = part.rsplit(" ", 2)
        out[name] = float(value)
    return out


def cold_cli(args: list[str], runs: int, timeout: float = 300.0) -> dict[str, Any]:
    """``runs`` fresh ``clipfp8 ARGS`` processes one after another: each wall time, min, median,
    and each run's stage seconds when the command printed them (``search --timings``)."""
    results = [run_process(cli_command(*args), timeout) for _ in range(runs)]
    walls = [r["wall_s"] for r in results if r["rc"] == 0]
    out: dict[str, Any] = {"command": "clipfp8 " + " ".join(args), "walls_s": [r["wall_s"] for r in results],
                           "rc": [r["rc"] for r in results]}
    stages = [stage_timings(r["tail"]) for r in results]
    if any(stages):
        out["stages_s"] = stages
    if walls:
        out.update(min_s=min(walls), median_s=float(np.median(walls)))
    if any(r["rc"] != 0 for r in results):
        out["error"] = next(r["tail"] for r in results if r["rc"] != 0)
    return out


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> float | None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter()
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    return None


def time_serve(index_dir: Path, label: str, extra: Sequence[str] = (), timeout: float = 180.0) -> dict[str, Any]:
    """Start ``clipfp8 serve`` on a free loopback port: seconds until its page answers, then two
    queries (``search``, single mode on ``label``) as its web page makes them
    (``page_client.BrowserSession``: the queue protocol, no polling): the answer
    (``*_answer_ms``), then the gallery's thumbnails fetched over the same keep-alive connections
    (``*_query_ms``: answer + thumbnails; the target is judged on this one)."""
    try:
        import httpx

        from clipfp8.app.page_client import BrowserSession, gallery_urls
    except ImportError:
        return {"skipped": "httpx (installed with gradio) is not installed"}
    port = _free_port()
    cmd = cli_command("serve", "--index-dir", str(index_dir), "--host", "127.0.0.1", "--port", str(port), *extra)
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    out: dict[str, Any] = {"command": "clipfp8 " + " ".join(cmd[3:]), "client": "browser protocol (sse_v3)"}
    try:
        base = f"http://127.0.0.1:{port}/"
        ready = _wait_http(base, proc, timeout)
        if ready is None:
            out["error"] = f"not ready within {timeout:.0f} s (exit code {proc.poll()})"
            return out
        out["ready_s"] = round(ready - t0, 3)
        with httpx.Client(timeout=30) as http:
            page = BrowserSession(http, base)
            gallery = page.output_types("search").index("gallery")
            for which, query in (("first", QUERY), ("second", QUERY + " at dusk")):
                t1 = time.perf_counter()
                answer = page.call("search", [query, 10, 0.0, label, "Single", None])
                t2 = time.perf_counter()
                urls = gallery_urls(answer[gallery])
                for url in urls:
                    http.get(url).raise_for_status()
                t3 = time.perf_counter()
                out[f"{which}_answer_ms"] = round((t2 - t1) * 1e3, 1)
                out[f"{which}_query_ms"] = round((t3 - t1) * 1e3, 1)
                out[f"{which}_images"] = len(urls)
    except Exception as e:  # noqa: BLE001 - the rest of the benchmark must go on; the error is recorded
        out["error"] = f"{type(e).__name__}: {e}"[:400]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            text, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            text, _ = proc.communicate()
        if "error" in out:
            out["tail"] = (text or "").strip().splitlines()[-8:]
    return out


__all__ = ["synthetic_store", "time_search", "time_app_search", "cold_cli", "run_process", "time_serve",
           "cli_command", "QUERY"]
