"""``clipfp8 bench``: the speed of the shipped paths, end to end, beside the encoder alone.

One run (``run_bench``), every step through the product's own code, each saved to the JSON as it
finishes (a run cut short keeps its figures):

1. corpus: ``--jpeg-count`` photo-like JPEGs of ``--jpeg-size`` (``app.bench_corpus``), or
   ``--corpus DIR``; model: ``default``, an open_clip name with ``--pretrained``/``--checkpoint``,
   or a seeded random-weight checkpoint written here (every process then loads the same model);
2. FP8: ``clipfp8 quantize`` (the product's PTQ config) on the corpus; on CUDA ``clipfp8
   build-engine`` stores the compiled engines before anything is timed;
3. ``clipfp8 index`` per precision, each in a fresh process: its ``--summary-json`` gives the
   ``index_corpus`` end-to-end rate (scan to last commit, so model loading is not in it; the first
   batch's compile is) and the decode path that ran; the process wall time is recorded too;
4. in this process: encoder-only throughput of each precision at the index batch size
   (``quant.runtime.bench.encoder_throughput``), for the end-to-end / encoder-only ratio;
5. cold ``clipfp8 search`` processes over those indexes (no model flags: the recorded specs);
6. warm text query + search over ``--search-rows`` synthetic vectors through
   ``indexing.query.search`` and through the app's ``app.search.search``;
7. ``clipfp8 serve``: seconds until the page answers, then its first query as the page sends it.

Precisions: fp16 and fp8 on CUDA, fp32 (the CPU baseline) on the CPU, unless ``--precisions``.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from clipfp8.app.bench_report import derived, evaluate_targets
from clipfp8.quant.core.config import PRECISIONS, EncoderSpec, ModelSpec, as_precision, resolve_device

log = logging.getLogger(__name__)

FP8_PRECISIONS = ("fp8", "fp8-fake", "trt-fp8")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchConfig:
    """What ``clipfp8 bench`` runs (each field is the flag of the same name). ``work_dir``:
    where the corpus, checkpoint, quantized dir and indexes go (default: a temp folder, removed
    unless ``keep``). ``precisions``: empty = fp16 + fp8 on CUDA, fp32 on the CPU.
    ``batch_size``: None = 256 on CUDA, 64 on the CPU; ``workers`` (decode threads): None =
    min(16, CPUs)."""

    work_dir: Path | None = None
    model: str = "default"
    pretrained: str | None = None
    checkpoint: Path | None = None
    device: str = "auto"
    precisions: tuple[str, ...] = ()
    jpeg_count: int = 32_768
    jpeg_size: tuple[int, int] = (500, 375)
    corpus: Path | None = None
    batch_size: int | None = None
    workers: int | None = None
    calib_samples: int = 256
    search_rows: int = 1_000_000
    cold_runs: int = 3
    serve: bool = True
    engines: bool = True
    min_time_s: float = 1.0
    keep: bool = False

    def __post_init__(self) -> None:
        for p in self.precisions:
            if p not in PRECISIONS:
                raise ValueError(f"BenchConfig.precisions: unknown precision {p!r} (known: {PRECISIONS})")
        for name in ("jpeg_count", "calib_samples", "search_rows", "cold_runs"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_size", "workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"BenchConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.corpus is not None and not Path(self.corpus).is_dir():
            raise NotADirectoryError(f"--corpus {self.corpus} is not a directory")
        if self.min_time_s <= 0:
            raise ValueError(f"BenchConfig.min_time_s must be > 0, got {self.min_time_s}")

    @classmethod
    def cpu_smoke(cls, **overrides: Any) -> BenchConfig:
        """Tiny sizes on the CPU: checks every step's code path in a few tens of seconds (its
        figures mean nothing)."""
        small = dict(device="cpu", jpeg_count=12, jpeg_size=(96, 72), calib_samples=8, search_rows=300,
                     cold_runs=1, batch_size=8, workers=2, min_time_s=0.05)
        return cls(**{**small, **overrides})

    def resolved(self) -> BenchConfig:
        """``device`` resolved; ``precisions``/``batch_size``/``workers`` defaults filled in."""
        device = resolve_device(self.device)
        cuda = device.startswith("cuda")
        return replace(self, device=device, precisions=self.precisions or (("fp16", "fp8") if cuda else ("fp32",)),
                       batch_size=self.batch_size or (256 if cuda else 64),
                       workers=self.workers or min(16, os.cpu_count() or 1))

    def model_spec(self) -> ModelSpec:
        return ModelSpec(name=self.model, pretrained=self.pretrained, checkpoint=self.checkpoint)


def machine(device: str) -> dict[str, Any]:
    """Device name, CPU model and count, software versions."""
    import torch

    cpu = platform.processor() or ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {"device": gpu or f"CPU: {cpu}", "cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}  # a shared machine's other work


def issue_conditions(cfg: BenchConfig) -> bool:
    """Whether the run has the sizes the issue's targets are stated for."""
    if cfg.device.startswith("cuda"):
        return (cfg.model == "ViT-L-14" and cfg.corpus is None and cfg.jpeg_count >= 32_768
                and cfg.jpeg_size == (500, 375) and cfg.search_rows >= 1_000_000)
    return cfg.model == "default" and (cfg.corpus is not None or cfg.jpeg_count >= 1000)


class _Run:
    """One benchmark run: the steps of the module docstring, sharing the work folder."""

    def __init__(self, cfg: BenchConfig, work: Path, result: dict[str, Any], progress: Progress,
                 save: Callable[[dict[str, Any]], None]) -> None:
        self.cfg, self.work, self.result, self.progress, self.save = cfg, work, result, progress, save
        self.corpus = Path(cfg.corpus) if cfg.corpus else work / "corpus"
        self.model_args: list[str] = []
        self.quantized: Path | None = None
        self.t0 = time.perf_counter()

    def step(self, key: str, fn: Callable[[], Any]) -> Any:
        """Run one step, store its outcome under ``key`` (an error as ``{"error": ...}``), save."""
        self.progress(f"[{time.perf_counter() - self.t0:7.1f}s] {key} ...")
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - one failed step must not lose the others' figures
            log.debug("bench step %s failed", key, exc_info=True)
            value = {"error": f"{type(e).__name__}: {e}"[:800]}
        self.result[key] = value
        self.save(self.result)
        return value

    def encoder_args(self, precision: str) -> list[str]:
        extra = ["--quantized", str(self.quantized)] if precision in FP8_PRECISIONS and self.quantized else []
        return [*self.model_args, *extra, "--device", self.cfg.device]

    def index_dir(self, precision: str) -> Path:
        return self.work / f"index-{precision}"

    # ----- the steps ----------------------------------------------------------------------
    def make_corpus(self) -> dict[str, Any]:
        from clipfp8.app.bench_corpus import write_jpegs

        if self.cfg.corpus is not None:
            files = [p for p in self.corpus.rglob("*") if p.is_file()]
            return {"folder": str(self.corpus), "count": len(files), "width": None, "height": None,
                    "mean_kib": round(sum(p.stat().st_size for p in files) / max(len(files), 1) / 1024, 1)}
        return write_jpegs(self.corpus, self.cfg.jpeg_count, self.cfg.jpeg_size).to_dict()

    def make_model(self) -> dict[str, Any]:
        from clipfp8.app.bench_corpus import random_checkpoint

        cfg = self.cfg
        if cfg.model == "default":
            return {"model": "default"}
        if cfg.pretrained:
            self.model_args = ["--model", cfg.model, "--pretrained", cfg.pretrained]
            return {"model": cfg.model, "pretrained": cfg.pretrained}
        t0 = time.perf_counter()
        ckpt = cfg.checkpoint or random_checkpoint(cfg.model, self.work / f"{cfg.model}-random.safetensors")
        self.cfg = replace(cfg, checkpoint=Path(ckpt))
        self.model_args = ["--model", cfg.model, "--checkpoint", str(ckpt)]
        return {"model": cfg.model, "checkpoint": str(ckpt), "random_weights": cfg.checkpoint is None,
                "seconds": round(time.perf_counter() - t0, 2)}

    def quantize(self) -> dict[str, Any]:
        from clipfp8.app.bench_search import cli_command, run_process

        q = self.work / "quantized"
        n = self.cfg.calib_samples
        args = ["quantize", "--calib", str(self.corpus), "--num-samples", str(n), "--calib-batch-size",
                str(min(n, 64)), "--output", str(q), *self.model_args, "--device", self.cfg.device]
        out = run_process(cli_command(*args), timeout=1800, log_file=self.work / "quantize.log")
        out["command"] = "clipfp8 " + " ".join(args)
        if out["rc"] == 0:
            self.quantized = q
        return out

    def build_engines(self) -> dict[str, Any]:
        """fp16 engine (the fp8 one is built by ``quantize`` on CUDA); the fp8 one again only if
        quantize skipped it. A no-op hook where the engine module is absent."""
        import importlib.util

        from clipfp8.app.bench_search import cli_command, run_process

        if importlib.util.find_spec("clipfp8.quant.runtime.engine_build") is None:
            return {"skipped": "no compiled-engine support (quant.runtime.engine_build) in this build"}
        out: dict[str, Any] = {}
        for p in (p for p in self.cfg.precisions if p in ("fp16", "bf16")):
            args = ["build-engine", "--precision", p, "--batch-size", str(self.cfg.batch_size), *self.model_args,
                    "--device", self.cfg.device]
            out[p] = dict(run_process(cli_command(*args), timeout=1800), command="clipfp8 " + " ".join(args))
        return out

    def index(self, precision: str) -> dict[str, Any]:
        import json

        from clipfp8.app.bench_search import cli_command, run_process

        summary = self.work / f"summary-{precision}.json"
        args = ["index", str(self.corpus), "--index-dir", str(self.index_dir(precision)), "--precision", precision,
                "--batch-size", str(self.cfg.batch_size), "--workers", str(self.cfg.workers), "--no-progress",
                "--summary-json", str(summary), *self.encoder_args(precision)]
        run = run_process(cli_command(*args), timeout=3600, log_file=self.work / f"index-{precision}.log")
        out: dict[str, Any] = {"command": "clipfp8 " + " ".join(args), "process_wall_s": run["wall_s"], "rc": run["rc"]}
        if run["rc"] != 0 or not summary.is_file():
            return {**out, "error": run["tail"]}
        s = json.loads(summary.read_text())
        # seconds: the indexing pass; warmup_s: the encoders' first-call cost before it (a start
        # cost, as loading the model is: both are in process_wall_s).
        return {**out, "indexed": s["indexed"], "seconds": round(s["total_seconds"], 3),
                "warmup_s": round(s.get("warmup_seconds", 0.0), 3),
                "img_per_s": s["indexed"] / s["total_seconds"] if s["total_seconds"] else 0.0,
                "decoder": s.get("decoder", "?"), "skipped": s.get("skipped", {}),
                "stage_seconds": {k: round(v, 3) for k, v in s.get("stage_seconds", {}).items()},
                "process_img_per_s": s["indexed"] / run["wall_s"]}

    def cold_search(self) -> dict[str, Any]:
        from clipfp8.app.bench_search import QUERY, cold_cli

        return {p: cold_cli(["search", "--index-dir", str(self.index_dir(p)), "--text", QUERY, "-k", "10",
                             "--device", self.cfg.device, "--timings"], self.cfg.cold_runs)
                for p in self.cfg.precisions if (self.index_dir(p) / "metadata.sqlite").is_file()}

    def serve(self) -> dict[str, Any]:
        import importlib.util

        from clipfp8.app.backend import baseline_label
        from clipfp8.app.bench_search import time_serve

        if importlib.util.find_spec("gradio") is None:
            return {"skipped": "gradio is not installed here"}
        base = next((p for p in self.cfg.precisions if p not in FP8_PRECISIONS), None)
        if base is None or not (self.index_dir(base) / "metadata.sqlite").is_file():
            return {"skipped": "no baseline index to serve"}
        return time_serve(self.index_dir(base), baseline_label(base, self.cfg.device), ["--device", self.cfg.device])

    def encoder_only(self) -> dict[str, Any]:
        """In this process: each precision's shipped encoder (``create_encoder``) alone at the
        index batch size, and its batch-1 text query. Returns the encoders that loaded."""
        from clipfp8.quant.core.encoder import create_encoder
        from clipfp8.quant.runtime.bench import encoder_throughput, text_query_latency

        encoders, only = {}, self.result.setdefault("encoder_only", {})
        batch = self.cfg.batch_size or 64
        for p in self.cfg.precisions:
            if p in FP8_PRECISIONS and self.quantized is None:
                continue
            self.progress(f"[{time.perf_counter() - self.t0:7.1f}s] encoder-only {p} ...")
            spec = EncoderSpec(model=self.cfg.model_spec(), precision=as_precision(p), device=self.cfg.device,
                               quantized=self.quantized if p in FP8_PRECISIONS else None, batch_size=batch)
            try:
                t0 = time.perf_counter()
                enc = create_encoder(spec)
                loaded_s = time.perf_counter() - t0
                only[p] = encoder_throughput(enc, batch, self.cfg.min_time_s)
                only[p].update(load_s=round(loaded_s, 2),
                               text_query=text_query_latency(enc, min_time_s=self.cfg.min_time_s / 2))
                encoders[p] = enc
            except Exception as e:  # noqa: BLE001 - recorded; the other precisions go on
                log.debug("encoder-only %s failed", p, exc_info=True)
                only[p] = {"error": f"{type(e).__name__}: {e}"[:800]}
            self.save(self.result)
        return encoders

    def warm_search(self, encoders: dict[str, Any]) -> None:
        """Warm text query + search over synthetic vectors: ``indexing.query.search`` and the
        app's ``app.search.search``."""
        from clipfp8.app.backend import baseline_label
        from clipfp8.app.bench_search import synthetic_store, time_app_search, time_search

        if not encoders:
            return
        store = self.work / "synthetic-index"
        self.step("synthetic_store", lambda: {"rows": self.cfg.search_rows, "seconds": _seconds(
            lambda: synthetic_store(store, list(encoders.values()), self.cfg.search_rows))})
        self.step("search", lambda: {p: time_search(store, e, self.cfg.min_time_s) for p, e in encoders.items()})
        labels = {("FP8" if p in FP8_PRECISIONS else baseline_label(p, self.cfg.device)): e
                  for p, e in encoders.items()}
        self.step("app_search", lambda: time_app_search(store, labels, self.cfg.min_time_s))


def _seconds(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return round(time.perf_counter() - t0, 2)


def _steps(run: _Run, cfg: BenchConfig, save: Callable[[dict[str, Any]], None]) -> None:
    """The steps of the module docstring, in order; a failed model setup stops the run (every
    later step needs the model)."""
    result, gpu = run.result, cfg.device.startswith("cuda")
    run.step("corpus", run.make_corpus)
    if "error" in run.step("model_setup", run.make_model):
        return
    if any(p in FP8_PRECISIONS for p in cfg.precisions):
        run.step("quantize", run.quantize)
    if gpu and cfg.engines:
        run.step("engines", run.build_engines)
    result["index"] = {}
    for p in cfg.precisions:
        result["index"][p] = run.index(p)
        run.progress(f"[{time.perf_counter() - run.t0:7.1f}s] index {p}: "
                     f"{result['index'][p].get('img_per_s', result['index'][p].get('error'))}")
        save(result)
    encoders = run.encoder_only()  # right after the index runs: the ratios need both
    run.step("cold_search", run.cold_search)
    run.warm_search(encoders)
    if cfg.serve:
        run.step("serve", run.serve)


def portable(obj: Any, subs: dict[str, str]) -> Any:
    """``obj`` with every string's occurrences of the ``subs`` keys (absolute folders) replaced by
    their values (``$WORK``, ``$OUT``), so a committed result names no machine's paths."""
    if isinstance(obj, dict):
        return {k: portable(v, subs) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v, subs) for v in obj]
    if isinstance(obj, str):
        for old, new in subs.items():
            obj = obj.replace(old, new)
    return obj


def run_bench(cfg: BenchConfig, command: str = "clipfp8 bench", progress: Progress = log.info,
              save: Callable[[dict[str, Any]], None] | None = None,
              subs: dict[str, str] | None = None) -> dict[str, Any]:
    """Run every step for ``cfg`` and return the JSON-able result (``save`` gets the partial
    result after each step). Ratios and targets are computed from the result's own figures
    (``app.bench_report``). Recorded strings name the work folder ``$WORK`` (and the ``subs``
    keys by their values)."""
    cfg = cfg.resolved()
    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="clipfp8-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    subs = {str(work.resolve()): "$WORK", **({} if work.is_absolute() else {str(work): "$WORK"}), **(subs or {}),
            str(Path.home()) + os.sep: "~" + os.sep}  # last: the engine cache under the home folder
    user_save = save or (lambda r: None)

    def _save(r: dict[str, Any]) -> None:
        user_save(portable(r, subs))

    gpu = cfg.device.startswith("cuda")
    result: dict[str, Any] = {
        "meta": {"command": command, "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                 "model": cfg.model, **machine(cfg.device),
                 "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}},
        "issue_conditions": issue_conditions(cfg)}
    run = _Run(cfg, work, result, progress, _save)
    try:
        _steps(run, cfg, _save)
    finally:
        result["ratios"] = {k: v for k, v in derived(result).items() if "_over_" in k}
        result["targets"] = evaluate_targets(result, gpu)
        result["meta"]["wall_s"] = round(time.perf_counter() - run.t0, 1)
        result["meta"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
        _save(result)
        if not cfg.keep and cfg.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return portable(result, subs)


__all__ = ["BenchConfig", "run_bench", "issue_conditions", "machine", "portable"]
