"""Application-level benchmarks: a text query (+ exact search over a large matrix) and
end-to-end indexing throughput from JPEG files, decoded and resized on the GPU."""
from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from clipfp8.quant.runtime.bench_timing import time_calls

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _random_db(rows: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(rows, dim) random unit vectors, built in chunks to bound the fp32 temporary."""
    db = torch.empty(rows, dim, device=device, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(0)
    for i in range(0, rows, 262144):
        chunk = torch.randn(min(262144, rows - i), dim, device=device, generator=g)
        db[i:i + chunk.shape[0]] = F.normalize(chunk, dim=-1).to(dtype)
    return db


def _query_graph(runner: Any, tokens: torch.Tensor, db: torch.Tensor, k: int) -> Callable[[], Any]:
    """One CUDA graph: text tower (batch padded to 2) -> normalise -> db @ q -> top-k."""
    fn = runner._call_fn if runner.compiled else runner._eager
    static = tokens.repeat(2, 1) if tokens.shape[0] == 1 else tokens.clone()

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        q = F.normalize(fn(static)[:1].to(db.dtype), dim=-1)
        return torch.topk((db @ q.t()).squeeze(1), k)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def bench_query(models: dict[str, Any], runners: dict, cfg: Any, progress: Callable[[str], None]) -> dict[str, Any]:
    """Batch-1 text query latency per precision, exact search alone, and both in one CUDA graph."""
    from clipfp8.quant.runtime.bench import tower_inputs

    device, out = models["device"], {}
    dim = int(models["fp16"].text_projection.shape[-1]) if getattr(models["fp16"], "text_projection", None) is not None else 768
    rows = cfg.search_rows if not cfg.cpu_smoke else 10_000
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    db = _random_db(rows, dim, device, dtype)
    tokens = tower_inputs(models["fp16"], "text", 1, device, models["dtype"])
    q = F.normalize(torch.randn(1, dim, device=device), dim=-1).to(dtype)
    with torch.inference_mode():
        t = time_calls(lambda: torch.topk((db @ q.t()).squeeze(1), 10), device, min_iters=50, max_iters=500, min_time_s=0.3)
        out["search_only_p50_ms"] = t.p50_ms
        for prec in ("fp16-compiled", "fp8"):
            runner = runners.get(("text", prec))
            if runner is None:
                continue
            t = time_calls(lambda: runner(tokens), device, min_iters=50, max_iters=500, min_time_s=0.3)
            out[f"{prec.split('-')[0]}_text_query_p50_ms"] = t.p50_ms
            out[f"{prec.split('-')[0]}_text_query_p99_ms"] = t.p99_ms
            if device.type == "cuda":
                replay = _query_graph(runner, tokens, db, 10)
                t = time_calls(replay, device, min_iters=50, max_iters=500, min_time_s=0.3)
                out[f"{prec.split('-')[0]}_query_search_graph_p50_ms"] = t.p50_ms
                out[f"{prec.split('-')[0]}_query_search_graph_p99_ms"] = t.p99_ms
    out.update({"db_rows": rows, "dim": dim, "k": 10})
    progress(f"query: {out}")
    return out


def _write_jpegs(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` random-content JPEGs (smooth colour fields + noise, so they compress like photos)."""
    from PIL import Image

    def one(i: int) -> Path:
        rng = np.random.default_rng(i)
        h = size + int(rng.integers(-16, 17))
        base = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
        im = Image.fromarray(base).resize((size, h), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.int16) + rng.integers(-12, 13, (h, size, 3))
        p = folder / f"img_{i:06d}.jpg"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(p, quality=90)
        return p

    with ThreadPoolExecutor(16) as ex:
        return list(ex.map(one, range(count)))


def _gpu_preprocess(decoded: list[torch.Tensor], size: int, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (3, h, w) images of any size -> normalised (B, 3, size, size) ``dtype`` on their device."""
    mean = torch.tensor(CLIP_MEAN, device=decoded[0].device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=decoded[0].device).view(1, 3, 1, 1)
    out = [F.interpolate(d[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
           for d in decoded]
    return ((torch.cat(out) / 255.0 - mean) / std).to(dtype)


def _decode(paths: list[Path], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import decode_jpeg, read_file

    datas = [read_file(str(p)) for p in paths]
    if device.type == "cuda":
        return decode_jpeg(datas, device=device)
    return [decode_jpeg(d) for d in datas]


def _index_pipeline(paths: list[Path], runner: Any, device: torch.device, batch: int, size: int,
                    dtype: torch.dtype, workers: int) -> tuple[int, float]:
    """Decode+preprocess batches on ``workers`` threads (own CUDA streams), encode on the main
    stream; returns (images embedded, seconds)."""
    batches = [paths[i:i + batch] for i in range(0, len(paths), batch)]
    q: queue.Queue = queue.Queue(maxsize=workers + 1)

    def work(idx: list[int]) -> None:
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        for i in idx:
            try:
                with torch.cuda.stream(stream) if stream is not None else _null():
                    x = _gpu_preprocess(_decode(batches[i], device), size, dtype)
                    ev = torch.cuda.Event() if stream is not None else None
                    if ev is not None:
                        ev.record(stream)
            except Exception as e:  # hand the failure to the consumer instead of hanging it
                q.put((e, None))
                return
            q.put((x, ev))

    threads = [threading.Thread(target=work, args=(list(range(w, len(batches), workers)),), daemon=True)
               for w in range(workers)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    done, outs = 0, []
    for _ in batches:
        x, ev = q.get()
        if isinstance(x, Exception):
            raise RuntimeError(f"JPEG decode worker failed: {x}") from x
        if ev is not None:
            torch.cuda.current_stream().wait_event(ev)
        outs.append(runner(x).to("cpu", non_blocking=True))
        done += int(x.shape[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return done, time.perf_counter() - t0


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def bench_indexing(models: dict[str, Any], runners: dict, cfg: Any, progress: Callable[[str], None]) -> dict[str, Any]:
    """JPEG files -> GPU decode -> GPU resize/normalise -> FP8 image tower, vs encoder alone."""
    from clipfp8.quant.runtime.bench import measure, tower_inputs

    runner = runners.get(("image", "fp8"))
    if runner is None:
        return {"skipped": "no fp8 image runner"}
    device, dtype = models["device"], models["dtype"]
    count = cfg.jpeg_count if not cfg.cpu_smoke else 16
    batch = cfg.index_batch if not cfg.cpu_smoke else 8
    size = models["fp16"].visual.image_size
    size = size if isinstance(size, int) else size[0]
    out: dict[str, Any] = {"images": count, "batch": batch, "jpeg_px": cfg.jpeg_size}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = _write_jpegs(Path(tmp), count, cfg.jpeg_size if not cfg.cpu_smoke else 48)
        out["jpeg_write_s"] = time.perf_counter() - t0
        with torch.inference_mode():
            _index_pipeline(paths[:batch * 2], runner, device, batch, size, dtype, 2)  # warm-up
            for workers in ((2, 4) if not cfg.cpu_smoke else (1,)):
                n, secs = _index_pipeline(paths, runner, device, batch, size, dtype, workers)
                out[f"end_to_end_img_per_s_workers{workers}"] = n / secs
            t1 = time.perf_counter()
            decoded = 0
            for i in range(0, count, batch):
                decoded += len(_gpu_preprocess(_decode(paths[i:i + batch], device), size, dtype))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out["decode_preprocess_only_img_per_s"] = decoded / (time.perf_counter() - t1)
            x = tower_inputs(models["fp16"], "image", batch, device, dtype)
            out["encoder_only_img_per_s"] = measure(runner, x, device, cfg)["items_per_s"]
    best = max(v for k, v in out.items() if k.startswith("end_to_end"))
    out["end_to_end_img_per_s"] = best
    out["fraction_of_encoder_only"] = best / out["encoder_only_img_per_s"]
    progress(f"indexing: {out}")
    return out


__all__ = ["bench_query", "bench_indexing"]
