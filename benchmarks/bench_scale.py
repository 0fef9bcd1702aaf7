"""Scale benchmark of the ``--factory auto`` index (not a test): synthetic 768-d unit vectors.

    nice -n 10 .venv/bin/python benchmarks/bench_scale.py --sizes 1000000 10000000 \\
        --out docs/bench_scale_cpu.json

For each size: the plan ``indexing.faiss_factory.plan_index`` picks for the budget, build time
(train on a sample + add in batches, the shipped ``train_index``/``adding`` code), bytes per
vector in RAM (the serialised index, = what it occupies once loaded; and the measured RSS growth
of loading it) and on disk (index + the float16 exact copy ``exact_store.write_sorted`` writes),
recall@10 against exact search, and single-query p50 latency on the CPU with and without exact
re-ranking of ``RERANK_FACTOR * k`` candidates, for several ``nprobe``.

Data: uniform random 768-d vectors have no neighbourhood structure (all pairwise cosines ~0 +-
0.04: the "nearest" neighbour is barely nearer than any other), which no real embedding set looks
like. CLIP embeddings are clustered, anisotropic and of low intrinsic dimension, so the vectors
here are a mixture: a shared mean direction (anisotropy), one of ``--centres`` random centres
(lognormal popularity), a ``--rank``-dimensional Gaussian inside that centre's own random subspace,
and a small isotropic noise; then normalised. Chunks are generated from ``(seed, chunk)`` so the
corpus is never held in RAM and can be regenerated. Exact neighbours: a chunked brute force over
the same chunks in float32. Queries: fresh draws from the same distribution.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clipfp8.indexing import faiss_factory as ff
from clipfp8.indexing.exact_store import ExactVectors, paths, write_sorted
from clipfp8.indexing.query import RERANK_FACTOR
from clipfp8.quant.core.fileio import atomic_write_text, portable_path

K = 10
REPO = Path(__file__).resolve().parents[1]


class ClusteredUnitVectors:
    """Seeded synthetic embeddings: ``chunk(i)`` is float32 (chunk_size, dim), unit rows.

    x = anisotropy * mean + centre_k + G z_g + B_k z_k + noise, normalised, where centre_k (one of
    ``centres``, lognormal popularity) is a child of one of ``supers`` super-centres (concepts
    sharing a theme: sibling centres have cosine ~0.5), G is a rank-``shared_rank`` basis shared by
    every cluster (attributes such as colour or style vary across concepts), B_k a rank-``rank``
    basis of centre k's own, z ~ N(0, I) scaled so each part has norm ``spread``, and the noise is
    isotropic with norm ``noise``. Locally ~``shared_rank + rank`` intrinsic dimensions.
    """

    def __init__(self, dim: int = 768, centres: int = 4096, rank: int = 8, shared_rank: int = 24, supers: int = 64,
                 spread: float = 0.45, noise: float = 0.25, anisotropy: float = 1.0, chunk_size: int = 100_000,
                 seed: int = 0) -> None:
        rng = np.random.default_rng([seed, 0])
        self.dim, self.rank, self.shared_rank, self.chunk_size, self.seed = dim, rank, shared_rank, chunk_size, seed
        self.spread, self.noise, self.anisotropy = spread, noise, anisotropy
        self.mean = _unit(rng.standard_normal(dim).astype(np.float32))
        parents = _unit(rng.standard_normal((supers, dim)).astype(np.float32))
        own = _unit(rng.standard_normal((centres, dim)).astype(np.float32))
        self.centres = _unit(parents[np.arange(centres) % supers] + own)
        # rows ~ N(0, I/dim): nearly orthonormal, so z @ basis has the norm of z.
        self.shared = (rng.standard_normal((shared_rank, dim)) / math.sqrt(dim)).astype(np.float32)
        self.bases = (rng.standard_normal((centres, rank, dim)) / math.sqrt(dim)).astype(np.float32)
        w = rng.lognormal(0.0, 1.0, centres)
        self.popularity = w / w.sum()

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        lab = rng.choice(len(self.centres), size=n, p=self.popularity)
        z = rng.standard_normal((n, self.rank), dtype=np.float32) * (self.spread / math.sqrt(self.rank))
        zg = rng.standard_normal((n, self.shared_rank), dtype=np.float32) * (self.spread / math.sqrt(self.shared_rank))
        x = rng.standard_normal((n, self.dim), dtype=np.float32) * (self.noise / math.sqrt(self.dim))
        x += self.anisotropy * self.mean + self.centres[lab] + zg @ self.shared
        order = np.argsort(lab, kind="stable")
        cuts = np.flatnonzero(np.diff(lab[order])) + 1
        for rows in np.split(order, cuts):  # each centre's own subspace
            x[rows] += z[rows] @ self.bases[lab[rows[0]]]
        return _unit(x)

    def chunk(self, i: int) -> np.ndarray:
        return self._draw(np.random.default_rng([self.seed, 1, i]), self.chunk_size)

    def queries(self, n: int) -> np.ndarray:
        return self._draw(np.random.default_rng([self.seed, 2]), n)

    def rows(self, n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids int64, vectors float32) for rows 0..n-1, one chunk at a time."""
        for i in range(math.ceil(n / self.chunk_size)):
            start = i * self.chunk_size
            x = self.chunk(i)[: n - start]
            yield np.arange(start, start + len(x), dtype=np.int64), x


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


class TopK:
    """Running exact top-k (inner product) of ``queries`` over streamed chunks."""

    def __init__(self, queries: np.ndarray, k: int = K) -> None:
        self.q, self.k = queries, k
        self.scores = np.full((len(queries), k), -np.inf, np.float32)
        self.ids = np.full((len(queries), k), -1, np.int64)

    def update(self, ids: np.ndarray, x: np.ndarray) -> None:
        s = np.concatenate([self.scores, self.q @ x.T], axis=1)
        cand = np.concatenate([self.ids, np.broadcast_to(ids, (len(self.q), len(ids)))], axis=1)
        top = np.argpartition(-s, self.k, axis=1)[:, : self.k]
        self.scores, self.ids = np.take_along_axis(s, top, 1), np.take_along_axis(cand, top, 1)


def build(data: ClusteredUnitVectors, n: int, plan: ff.IndexPlan, prefix: Path, truth: TopK) -> dict[str, Any]:
    """Train, add in batches, write the exact copy, while the brute force follows the same chunks."""
    t0 = time.perf_counter()
    sample = np.concatenate([x for _, x in _take(data.rows(n), plan.train_size)])[: plan.train_size]
    t_gen = time.perf_counter() - t0
    index = ff.new_index(plan)
    t0 = time.perf_counter()
    if plan.kind == "ivf":
        ff.train_index(index, plan, sample)
    else:
        index = faiss.IndexIDMap2(index)
    t_train = time.perf_counter() - t0
    del sample
    timing = {"add": 0.0, "exact": 0.0, "generate": t_gen}

    def stream() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for ids, x in _timed_iter(data.rows(n), timing, "generate"):
            t = time.perf_counter()
            with ff.adding(index):
                index.add_with_ids(x, ids)
            timing["add"] += time.perf_counter() - t
            t = time.perf_counter()
            truth.update(ids, x)
            timing["exact"] += time.perf_counter() - t
            yield ids, x
            print(f"  added {ids[-1] + 1:,} / {n:,}  ({timing['add']:.0f}s adding)", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    write_sorted(prefix, data.dim, n, stream())
    t_total = time.perf_counter() - t0
    t_write = t_total - timing["add"] - timing["exact"] - (timing["generate"] - t_gen)
    faiss.write_index(index, str(prefix) + ".faiss")
    return {"index": index, "train_s": t_train, "add_s": timing["add"], "build_s": t_train + timing["add"],
            "exact_copy_write_s": t_write, "brute_force_s": timing["exact"], "generate_s": timing["generate"]}


def _take(it: Iterator[tuple[np.ndarray, np.ndarray]], n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    got = 0
    for ids, x in it:
        yield ids, x
        got += len(ids)
        if got >= n:
            return


def _timed_iter(it: Iterator[Any], timing: dict[str, float], key: str) -> Iterator[Any]:
    while True:
        t = time.perf_counter()
        item = next(it, None)
        timing[key] += time.perf_counter() - t
        if item is None:
            return
        yield item


def measure_queries(index: faiss.Index, exact: ExactVectors, queries: np.ndarray, truth: np.ndarray,
                    nprobe: int, ef: int) -> dict[str, Any]:
    """Recall@10 and single-query latency: plain, re-ranked from ``K * factor`` candidates (what
    ``search`` does), and from half as many. Each is timed on a second pass over the queries (the
    first pass, also reported, is the first read of those exact rows)."""
    if faiss.try_extract_index_ivf(index) is not None:
        ff.set_search_params(index, nprobe, ef)
    factor = ff.rerank_factor(index) if faiss.try_extract_index_ivf(index) is not None else RERANK_FACTOR
    out: dict[str, Any] = {"nprobe": nprobe, "ef_search": ef, "rerank_candidates": K * factor}
    for key, fetch in (("plain", K), ("rerank", K * factor), ("rerank_half_candidates", K * factor // 2)):
        rerank = fetch > K
        lat, found = [], []
        for pass_ in range(2):
            times = []
            for q in queries:
                t = time.perf_counter()
                _, ids = index.search(q[None], fetch)
                ids = ids[0][ids[0] >= 0]
                if rerank:
                    ids = ids[np.argsort(-(exact.lookup(ids) @ q), kind="stable")]
                times.append(time.perf_counter() - t)
                if pass_ == 1:
                    found.append(ids[:K])
            lat.append(times)
        recall = float(np.mean([len(set(f.tolist()) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]))
        out[key] = {"recall_at_10": round(recall, 4), "p50_ms": round(1e3 * float(np.median(lat[1])), 3),
                    "p90_ms": round(1e3 * float(np.percentile(lat[1], 90)), 3),
                    "first_pass_p50_ms": round(1e3 * float(np.median(lat[0])), 3)}
    return out


def run_size(data: ClusteredUnitVectors, n: int, budget: ff.IndexBudget, workdir: Path, nq: int,
             sweep: list[int]) -> dict[str, Any]:
    plan = ff.plan_index(n, data.dim, budget)
    print(f"{n:,} vectors: {plan.factory}, nprobe {plan.nprobe}, train on {plan.train_size:,}", file=sys.stderr, flush=True)
    prefix = workdir / f"n{n}"
    queries = data.queries(nq)
    truth = TopK(queries)
    kept = Path(str(prefix) + ".build.npz")
    if kept.is_file():  # --keep left a built index: measure the queries again (e.g. on a quieter machine)
        with np.load(kept) as z:
            truth.ids, truth.scores = z["ids"], z["scores"]
            built = json.loads(str(z["built"]))
        built["queries_remeasured"] = True  # build figures from the run of built["built_on"]
    else:
        built = build(data, n, plan, prefix, truth)
        built["built_on"] = date.today().isoformat()
        index = built.pop("index")
        built["serialized"] = ff.index_bytes(index)
        ivf = faiss.try_extract_index_ivf(index)
        built["code"] = int(ivf.code_size) if ivf is not None else 4 * data.dim  # bytes per vector in the lists
        del index
        np.savez(kept, ids=truth.ids, scores=truth.scores, built=json.dumps(built))
    serial, code = built.pop("serialized"), built.pop("code")
    rss0 = _rss()
    index = faiss.read_index(str(prefix) + ".faiss")
    rss_load = _rss() - rss0
    exact = ExactVectors.open(prefix, data.dim)
    disk = {"index": os.path.getsize(str(prefix) + ".faiss"), "exact_copy": sum(p.stat().st_size for p in paths(prefix))}
    rows = [measure_queries(index, exact, queries, truth.ids, p, max(2 * p, ff.ADD_EF_SEARCH) if plan.hnsw else 0)
            for p in sorted({*sweep, plan.nprobe}) if plan.kind == "flat" or p <= plan.nlist]
    default = next(r for r in rows if plan.kind == "flat" or r["nprobe"] == plan.nprobe)
    top = np.sort(truth.scores, axis=1)[:, ::-1]
    return {
        "n_vectors": n, "plan": {k: v for k, v in plan.__dict__.items()},
        "seconds": {k: round(v, 1) if isinstance(v, float) else v for k, v in built.items()},
        "ram_bytes_per_vector": {"serialized_index": round(serial / n, 2), "codes": code,
                                 "ids": ff.ID_BYTES, "rss_growth_on_load": round(rss_load / n, 2)},
        "disk_bytes_per_vector": {"index": round(disk["index"] / n, 2), "exact_copy_fp16": round(disk["exact_copy"] / n, 2),
                                  "total": round((disk["index"] + disk["exact_copy"]) / n, 2)},
        "default": default, "sweep": rows,
        "data": {"query_top1_cosine_mean": round(float(top[:, 0].mean()), 4),
                 "query_top10_cosine_mean": round(float(top[:, K - 1].mean()), 4),
                 "random_pair_cosine_mean": round(float((queries[: nq // 2] * queries[nq // 2: 2 * (nq // 2)]).sum(1).mean()), 4)},
        "gpu": "not measured, no faiss-gpu",
    }


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem / 2**20, 1), "faiss": faiss.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "faiss_threads": faiss.omp_get_max_threads(),
            "gpu": "none (faiss-cpu)"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--budget", default="100", help="--index-budget: bytes per vector, or a total with K/M/G/T")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--centres", type=int, default=4096)
    p.add_argument("--rank", type=int, default=8, help="dimensions of each centre's own subspace")
    p.add_argument("--shared-rank", type=int, default=24, help="dimensions shared by every centre")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("build/bench_scale"), help="index + exact copy (deleted after each size)")
    p.add_argument("--keep", action="store_true",
                   help="keep the files in --workdir; a later run of the same size then only measures the queries")
    p.add_argument("--out", type=Path, default=None, help="JSON results (e.g. docs/bench_scale_cpu.json)")
    p.add_argument("--append", action="store_true", help="add to the results already in --out (same data settings)")
    args = p.parse_args(argv)
    data = ClusteredUnitVectors(args.dim, args.centres, args.rank, args.shared_rank, seed=args.seed)
    budget = ff.parse_budget(args.budget)
    args.workdir.mkdir(parents=True, exist_ok=True)
    command = "nice -n 10 .venv/bin/python benchmarks/bench_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report: dict[str, Any] = {
        "command": command, "date": date.today().isoformat(), "machine": machine(),
        "data": {"dim": args.dim, "centres": args.centres, "rank": args.rank, "shared_rank": args.shared_rank,
                 "supers": 64, "spread": data.spread, "noise": data.noise,
                 "anisotropy": data.anisotropy, "seed": args.seed, "queries": args.queries},
        "budget": ff.auto_factory(budget), "results": []}
    if args.append and args.out is not None and args.out.is_file():
        old = json.loads(args.out.read_text())
        if old["data"] != report["data"] or old["budget"] != report["budget"]:
            p.error(f"--append: {args.out} was measured with other data or budget settings")
        report["results"] = old["results"]
        report["command"] = [*(old["command"] if isinstance(old["command"], list) else [old["command"]]), command]
    for n in args.sizes:
        t0 = time.perf_counter()
        res = run_size(data, n, budget, args.workdir, args.queries, args.nprobe)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        res["command"], res["date"] = command, date.today().isoformat()
        res["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]  # the machine is shared: context for the timings
        report["results"].append(res)
        d = res["default"]
        print(f"{n:>11,}  {res['plan']['factory']:<28} build {res['seconds']['build_s']:7.1f}s  "
              f"RAM {res['ram_bytes_per_vector']['serialized_index']:6.1f} B/vec  disk {res['disk_bytes_per_vector']['total']:7.1f} B/vec  "
              f"recall@10 {d['plain']['recall_at_10']:.3f} ({d['plain']['p50_ms']:.2f} ms) / rerank {d['rerank']['recall_at_10']:.3f} "
              f"({d['rerank']['p50_ms']:.2f} ms)  nprobe {d['nprobe']}", flush=True)
        if not args.keep:
            for f in (*paths(args.workdir / f"n{n}"), args.workdir / f"n{n}.faiss", args.workdir / f"n{n}.build.npz"):
                f.unlink(missing_ok=True)
        if args.out is not None:
            atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    if args.out is not None:
        print(f"wrote {portable_path(args.out, REPO)}")
    if not args.keep and not any(args.workdir.iterdir()):
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
