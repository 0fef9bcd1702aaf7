"""Encoder-only speed: the tower table of ``clipfp8 bench-towers``, and the encoder-only figures
``clipfp8 bench`` (``app.bench``, the shipped-path benchmark) sets beside its end-to-end ones.

* ``run_bench``: FP16 eager / FP16 compiled / real FP8 (/ TensorRT) per tower and batch size on
  one GPU, one process. Random weights (speed does not depend on them), FP8 from the product's
  own PTQ (``quant.ptq.quantize``: the config ``clipfp8 quantize`` uses, audited) calibrated on
  random inputs. Items/s, latency p50/p99 (CUDA events), peak GPU memory; weight bytes per tower;
  FP8 vs best-FP16 ratios; FP8 vs fake-quant and fp16 cosines.
* ``encoder_throughput`` / ``text_query_latency``: a shipped ``Encoder`` (``create_encoder``)
  timed alone, at the batch size the index runs.
"""
from __future__ import annotations

import copy
import datetime as dt
import logging
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipfp8.quant.core.encoder import Encoder
from clipfp8.quant.core.protocols import as_clip, tower_image_size
from clipfp8.quant.runtime.bench_timing import time_calls
from clipfp8.quant.runtime.convert import weight_bytes
from clipfp8.quant.runtime.fast_fp16 import BatchRunner, configure_compile_cache

log = logging.getLogger(__name__)

#: fp8: FP8 GEMMs + FP8 Q/K/V, fused 16-bit SDPA (skips the softmax-output rounding);
#: fp8-exact: also rounds P to FP8 (explicit attention) -- bit-faithful to the fake-quant model;
#: fp8-flash: the same function through the Triton FP8 flash-attention kernel (``fp8_flash``).
#: FP16 baselines (issue 12: the ratio's denominator is the best of them): fp16-eager (open_clip's
#: nn.MultiheadAttention, its eager fast path), fp16-compiled (that model compiled), fp16-sdpa
#: (attention rewritten to F.scaled_dot_product_attention, compiled: the product's ``fp16``
#: encoder), and, opt-in because each compiles for minutes, fp16-autotune / fp8-autotune (the
#: sdpa / fp8 models compiled with ``max-autotune-no-cudagraphs``: Inductor tries its Triton
#: GEMM templates, which can fuse epilogues, against cuBLAS per shape).
PRECISIONS = ("fp16-eager", "fp16-compiled", "fp16-sdpa", "fp8", "fp8-exact")
#: Named explicitly only. fp8-flash: its kernel failed its accuracy check on the H200
#: (2026-12-05, docs/runtime.md), so its speed is no figure of the product's.
OPT_IN_PRECISIONS = ("fp16-autotune", "fp8-autotune", "trt", "fp8-flash")
AUTOTUNE_MODE = "max-autotune-no-cudagraphs"
TOWERS = ("image", "text")
#: The tower targets of issue 12 (H200, ViT-L/14, FP8 over the best FP16 at batch 256; weights of
#: issue 6); the end-to-end ones live in ``app.bench``.
TARGETS = {"image_ratio_b256": 1.65, "text_ratio_b256": 1.6, "weight_ratio": 0.55}


@dataclass
class BenchConfig:
    """What to measure. ``cpu_smoke``: tiny model on the CPU, emulated FP8, no compile -- checks the
    code paths only (its figures mean nothing)."""

    model: str = "ViT-L-14"
    towers: tuple[str, ...] = TOWERS
    precisions: tuple[str, ...] = PRECISIONS
    batch_sizes: tuple[int, ...] = (1, 8, 32, 64, 128, 256, 512, 1024)
    exact_batch_sizes: tuple[int, ...] = (1, 256)
    device: str = "cuda"
    min_time_s: float = 0.6
    calib_batch: int = 16
    cpu_smoke: bool = False
    seed: int = 0
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for t in self.towers:
            if t not in TOWERS:
                raise ValueError(f"BenchConfig.towers: unknown tower {t!r} (known: {TOWERS})")
        for p in self.precisions:
            if p not in PRECISIONS + OPT_IN_PRECISIONS:
                raise ValueError(f"BenchConfig.precisions: unknown precision {p!r}")
        if not self.batch_sizes or min(self.batch_sizes) < 1 or max(self.batch_sizes) > 4096:
            raise ValueError(f"BenchConfig.batch_sizes must lie in 1..4096, got {self.batch_sizes}")
        if self.cpu_smoke:
            self.device = "cpu"


def _model_config(cfg: BenchConfig) -> dict[str, Any]:
    if cfg.cpu_smoke:
        from clipfp8.quant.core.models import tiny_config

        return tiny_config()
    import open_clip

    mc = open_clip.get_model_config(cfg.model)
    if mc is None:
        raise ValueError(f"BenchConfig.model: unknown open_clip architecture {cfg.model!r}")
    return mc


def tower_inputs(model: nn.Module, tower: str, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Random input for one tower: images (B, 3, H, W) ``dtype`` or tokens int64 (B, ctx)."""
    g = torch.Generator(device="cpu").manual_seed(batch)
    if tower == "image":
        h, w = tower_image_size(model)
        return torch.randn(batch, 3, h, w, generator=g).to(device, dtype)
    ctx = int(getattr(model, "context_length", 77))
    vocab = int(getattr(model, "vocab_size", 49408))
    return torch.randint(1, vocab, (batch, ctx), generator=g).to(device)


def build_models(cfg: BenchConfig) -> dict[str, Any]:
    """fp16 reference, fake-quant (``quant.ptq.quantize``, the product's config) and real-FP8 models
    of ``cfg.model`` on ``cfg.device``."""
    from clipfp8.quant.core.config import ModelSpec
    from clipfp8.quant.core.models import load_model
    from clipfp8.quant.ptq import QuantConfig, quantize
    from clipfp8.quant.runtime.fp8_encoder import build_fp8_model

    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    dtype = torch.float32 if cfg.cpu_smoke else torch.float16
    loaded = load_model(ModelSpec(name=cfg.model, config=_model_config(cfg)))
    base = copy.deepcopy(loaded.model).eval().to(device=device, dtype=dtype)
    loaded.model.to(device)
    images = tower_inputs(loaded.model, "image", cfg.calib_batch, device, torch.float32)
    tokens = tower_inputs(loaded.model, "text", cfg.calib_batch, device, torch.float32)
    fake = quantize(loaded, [(images, tokens)], QuantConfig()).model.eval()  # in place, audited
    mode = "emulate" if cfg.cpu_smoke else "scaled_mm"
    fake = fake.to(dtype=dtype)
    fp8, report = build_fp8_model(copy.deepcopy(fake), device, dtype=dtype, mode=mode, exact_softmax=False)
    models = {"fp16": base, "fake": fake, "fp8": fp8, "report": report, "dtype": dtype, "device": device}
    if {"fp16-sdpa", "fp16-autotune"} & set(cfg.precisions):
        from clipfp8.quant.runtime.fp8_attention import ensure_explicit_attention

        sdpa = copy.deepcopy(base)
        ensure_explicit_attention(sdpa)  # as create_fast_fp16_encoder(attention="sdpa") does
        models["fp16-sdpa"] = sdpa
    if "fp8-exact" in cfg.precisions:
        models["fp8-exact"] = build_fp8_model(copy.deepcopy(fake), device, dtype=dtype, mode=mode,
                                              exact_softmax=True)[0]
    if "fp8-flash" in cfg.precisions:
        models["fp8-flash"], flash_report = build_fp8_model(copy.deepcopy(fake), device, dtype=dtype, mode=mode,
                                                            attention_kernel="triton")
        # Which modules run the kernel (on a CPU smoke run: none, and why).
        models["flash_notes"] = [n.strip() for n in flash_report.notes if "flash" in n or "attention path" in n]
    return models


def tower_fn(model: nn.Module, tower: str) -> Callable[[torch.Tensor], torch.Tensor]:
    clip = as_clip(model)
    return clip.encode_image if tower == "image" else clip.encode_text


Runner = Callable[[torch.Tensor], torch.Tensor]


def make_runners(models: dict[str, Any], cfg: BenchConfig) -> dict[tuple[str, str], Runner]:
    compile_ok = not cfg.cpu_smoke
    runners: dict[tuple[str, str], Runner] = {}
    for tower in cfg.towers:
        for prec in cfg.precisions:
            if prec == "trt":
                runners[(tower, prec)] = _trt_runner(models["fake"], tower, cfg)
                continue
            model = models[_model_key(prec)]
            compiled = prec != "fp16-eager" and compile_ok
            buckets = () if prec == "fp16-eager" or cfg.cpu_smoke else (2, 4, 8, 16, 32)
            mode = AUTOTUNE_MODE if prec.endswith("-autotune") else None
            runners[(tower, prec)] = BatchRunner(tower_fn(model, tower), compile=compiled, graph_buckets=buckets,
                                                 compile_mode=mode)
    return runners


def _model_key(precision: str) -> str:
    """The model of ``build_models`` a precision runs (the autotuned ones reuse their base)."""
    return {"fp16-eager": "fp16", "fp16-compiled": "fp16", "fp16-autotune": "fp16-sdpa",
            "fp8-autotune": "fp8"}.get(precision, precision)


def _trt_runner(fake: nn.Module, tower: str, cfg: BenchConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """ONNX export of the fake-quant tower + strongly typed TensorRT engine (``trt`` extra)."""
    import tempfile

    from clipfp8.quant.runtime.export_onnx import export_tower
    from clipfp8.quant.runtime.trt import EngineConfig, TrtRunner, build_engine

    tmp = Path(tempfile.mkdtemp(prefix="clipfp8_trt_"))
    export_tower(copy.deepcopy(fake).cpu().float(), tower, tmp / f"{tower}.onnx")
    engine = build_engine(tmp / f"{tower}.onnx", tmp / f"{tower}.engine",
                          EngineConfig(opt_batch=256, max_batch=max(cfg.batch_sizes)))
    return TrtRunner(engine, cfg.device)


def numerics(models: dict[str, Any], cfg: BenchConfig, runners: dict) -> dict[str, float]:
    """Cosines over 64 random inputs per tower: FP8 vs fake quant (min and mean), FP8 vs fp16 (min)."""
    out: dict[str, float] = {}
    with torch.inference_mode():
        for tower in cfg.towers:
            x = tower_inputs(models["fp16"], tower, 64, models["device"], models["dtype"])
            ref16 = tower_fn(models["fp16"], tower)(x).float()
            fake = tower_fn(models["fake"], tower)(x).float()
            out[f"{tower}_fake_vs_fp16_min_cos"] = float(F.cosine_similarity(fake, ref16).min())
            for prec in ("fp8", "fp8-exact", "fp8-flash"):
                if prec not in models:
                    continue
                # the compiled fp8/fp8-flash runners (check the compiled paths too); fp8-exact eagerly
                run = runners.get((tower, prec)) if prec != "fp8-exact" else None
                run = run or tower_fn(models[prec], tower)
                got = run(x).float()
                vs_fake = F.cosine_similarity(got, fake)
                out[f"{tower}_{prec}_vs_fake_min_cos"] = float(vs_fake.min())
                out[f"{tower}_{prec}_vs_fake_mean_cos"] = float(vs_fake.mean())  # issue 12: >= 0.999
                out[f"{tower}_{prec}_vs_fp16_min_cos"] = float(F.cosine_similarity(got, ref16).min())
    return out


def measure(runner: BatchRunner, x: torch.Tensor, device: torch.device, cfg: BenchConfig) -> dict[str, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        t = time_calls(lambda: runner(x), device, min_time_s=cfg.min_time_s)
    n = int(x.shape[0])
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    mean_ms = sum(t.latencies_ms) / t.iters
    return {"items_per_s": n / (mean_ms / 1e3), "p50_ms": t.p50_ms, "p99_ms": t.p99_ms,
            "iters": t.iters, "peak_mem_bytes": int(peak)}


def tower_weight_bytes(models: dict[str, Any]) -> dict[str, dict[str, int]]:
    out = {}
    for key in ("fp16", "fp8"):
        m = models[key]
        img = weight_bytes(m.visual)
        out[key] = {"image": img, "text": weight_bytes(m) - img, "total": weight_bytes(m)}
    return out


def run_table(models: dict[str, Any], runners: dict, cfg: BenchConfig, progress: Callable[[str], None],
              precisions: tuple[str, ...], rows: list[dict], after: Callable[[], None] = lambda: None) -> list[dict]:
    """Measure every (tower, precision, batch) of ``precisions``, appending to ``rows``; ``after``
    runs after each (tower, precision) (the caller saves the partial result there)."""
    for tower in cfg.towers:
        for prec in precisions:
            if (tower, prec) not in runners:
                continue
            for b in (cfg.exact_batch_sizes if prec == "fp8-exact" else cfg.batch_sizes):
                x = tower_inputs(models["fp16"], tower, b, models["device"], models["dtype"])
                r: dict[str, Any]
                try:
                    r = dict(measure(runners[(tower, prec)], x, models["device"], cfg))
                except torch.cuda.OutOfMemoryError as e:  # a huge batch must not sink the run
                    r = {"error": f"OOM: {str(e)[:120]}"}
                    torch.cuda.empty_cache()
                rows.append({"tower": tower, "precision": prec, "batch": b, **r})
                shown = (f"{r['items_per_s']:10.1f} items/s p50 {r['p50_ms']:.3f} ms" if "items_per_s" in r
                         else r["error"])
                progress(f"{tower:5s} {prec:14s} b={b:5d} {shown}")
            after()
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Per (tower, batch): FP8 items/s over the best FP16 items/s of that run (whichever of the
    fp16-* baselines was fastest, named in ``best_fp16``)."""
    out = []
    keys = sorted({(r["tower"], r["batch"]) for r in rows})
    for tower, b in keys:
        sel = {r["precision"]: r.get("items_per_s") for r in rows if r["tower"] == tower and r["batch"] == b}
        fp16 = {p: v for p, v in sel.items() if p.startswith("fp16") and v}
        if fp16 and sel.get("fp8"):
            best_name = max(fp16, key=lambda p: fp16[p])
            best16 = fp16[best_name]
            extra = {f"{p}_over_best_fp16": sel[p] / best16 for p in ("fp8-exact", "fp8-flash", "fp8-autotune", "trt")
                     if sel.get(p)}
            out.append({"tower": tower, "batch": b, "best_fp16": best_name, "best_fp16_items_per_s": best16,
                        "fp8_items_per_s": sel["fp8"], "fp8_over_best_fp16": sel["fp8"] / best16, **extra})
    return out


def meta(cfg: BenchConfig, command: str) -> dict[str, Any]:
    dev = torch.device(cfg.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    return {"command": command, "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "device": name, "model": cfg.model,
            "config": {k: v for k, v in asdict(cfg).items() if k != "notes"}}


def run_bench(cfg: BenchConfig, command: str = "", progress: Callable[[str], None] = log.info,
              save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the tower table ``cfg`` asks for; returns the JSON-able result. ``save`` is called with
    the partial result after each stage (so a run cut short still leaves its figures behind).
    Order: main table, then the slower fp8-exact rows."""
    save = save or (lambda r: None)
    if not cfg.cpu_smoke:
        configure_compile_cache()
        if not torch.cuda.is_available():
            raise ValueError("bench-towers needs a CUDA GPU (or --cpu-smoke)")
    result: dict[str, Any] = {"meta": meta(cfg, command)}
    models = build_models(cfg)
    result["conversion"] = models["report"].to_dict()
    progress(f"converted: {models['report'].summary()}")
    if "flash_notes" in models:
        result["fp8_flash"] = models["flash_notes"]
        progress(f"fp8-flash: {'; '.join(models['flash_notes'][:2])}")
    result["weight_bytes"] = tower_weight_bytes(models)
    runners = make_runners(models, cfg)
    result["numerics"] = numerics(models, cfg, runners)
    progress(f"numerics: {result['numerics']}")
    rows: list[dict] = []
    result["rows"] = rows

    def stage() -> None:
        result["ratios"] = ratios(rows)
        result["targets"] = evaluate_targets(result)
        save(result)

    stage()
    run_table(models, runners, cfg, progress, tuple(p for p in cfg.precisions if p != "fp8-exact"), rows, stage)
    if "fp8-exact" in cfg.precisions:
        run_table(models, runners, cfg, progress, ("fp8-exact",), rows, stage)
    stage()
    return result


def evaluate_targets(result: dict[str, Any]) -> dict[str, Any]:
    """Each issue-6 tower target: the value reached, the goal, and whether it was met."""
    out: dict[str, Any] = {}

    def put(key: str, value: float | None, goal: float, higher_better: bool) -> None:
        if value is not None:
            out[key] = {"value": value, "goal": goal, "met": value >= goal if higher_better else value <= goal}

    for tower in ("image", "text"):
        r = next((r for r in result.get("ratios", []) if r["tower"] == tower and r["batch"] == 256), None)
        put(f"{tower}_ratio_b256", r and r["fp8_over_best_fp16"], TARGETS[f"{tower}_ratio_b256"], True)
        put(f"{tower}_fp8_flash_ratio_b256", r and r.get("fp8-flash_over_best_fp16"), TARGETS[f"{tower}_ratio_b256"],
            True)
    wb = result.get("weight_bytes", {})
    if wb:
        for part in ("image", "text", "total"):
            put(f"weight_ratio_{part}", wb["fp8"][part] / wb["fp16"][part], TARGETS["weight_ratio"], False)
    return out


def encoder_throughput(encoder: Encoder, batch: int, min_time_s: float = 1.0, seed: int = 0) -> dict[str, float]:
    """``encoder.encode_images`` alone on a random (batch, 3, H, W) float32 batch already on the
    encoder's device (what the index's embed stage calls, minus decoding and storing): items/s
    (batch / mean latency), p50/p99 ms, iterations."""
    device = torch.device(encoder.device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *encoder.image_size, generator=g).to(device)
    with torch.inference_mode():
        t = time_calls(lambda: encoder.encode_images(x), device, min_time_s=min_time_s)
    mean_ms = sum(t.latencies_ms) / t.iters
    return {"batch": batch, "items_per_s": batch / (mean_ms / 1e3), "p50_ms": t.p50_ms, "p99_ms": t.p99_ms,
            "iters": t.iters}


def text_query_latency(encoder: Encoder, text: str = "a photo of a dog", min_time_s: float = 0.5) -> dict[str, float]:
    """One ``encode_texts([text])`` (tokenise, forward, normalise, back to the host): p50/p99 ms."""
    t = time_calls(lambda: encoder.encode_texts([text]), torch.device("cpu"), min_iters=20, max_iters=2000,
                   min_time_s=min_time_s)
    return {"p50_ms": t.p50_ms, "p99_ms": t.p99_ms, "iters": t.iters}


__all__ = ["BenchConfig", "run_bench", "ratios", "evaluate_targets", "TARGETS", "PRECISIONS", "encoder_throughput",
           "text_query_latency"]
