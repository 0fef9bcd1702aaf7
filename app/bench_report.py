"""``clipfp8 bench``'s arithmetic and report: ratios from the run's own measurements, the issue's
targets (met / missed), and the Markdown table. Pure functions over the result dict."""
from __future__ import annotations

from typing import Any

#: Issue 10's targets. GPU: H200, ViT-L-14, 32,768 JPEGs of 500x375, 1M search rows. CPU: 2
#: cores, the default model. (key, goal, higher is better, what it measures).
GPU_TARGETS: tuple[tuple[str, float, bool, str], ...] = (
    ("fp8_index_img_per_s", 2800.0, True, "FP8 `index` end to end, img/s"),
    ("fp8_index_over_encoder_only", 0.85, True, "FP8 end to end / FP8 encoder-only"),
    ("fp16_index_over_encoder_only", 0.85, True, "FP16 end to end / FP16 encoder-only"),
    ("fp8_index_over_fp16_index", 1.3, True, "FP8 end to end / FP16 end to end"),
    ("cold_search_fp16_s", 5.0, False, "cold `clipfp8 search` process (fp16), s"),
    ("cold_search_fp8_s", 5.0, False, "cold `clipfp8 search` process (fp8), s"),
    ("search_fp8_p50_ms", 2.0, False, "warm text query + search (fp8), p50 ms"),
    ("search_fp16_p50_ms", 2.0, False, "warm text query + search (fp16), p50 ms"),
    ("serve_ready_s", 20.0, False, "`serve` ready, s"),
    ("serve_first_query_ms", 50.0, False, "`serve` first query (answer + its thumbnails), ms"),
)
CPU_TARGETS: tuple[tuple[str, float, bool, str], ...] = (
    ("cold_search_fp32_s", 4.0, False, "cold `clipfp8 search` process (fp32), s"),
    ("fp32_index_img_per_s", 40.0, True, "`index` in the CPU baseline (fp32), img/s"),
)


def _get(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def derived(result: dict[str, Any]) -> dict[str, float]:
    """Every figure the targets and the table read, computed from the result's own measurements:
    per precision P ``P_index_img_per_s``, ``P_index_over_encoder_only``, ``cold_search_P_s``
    (min over runs), ``search_P_p50_ms``; ``fp8_index_over_fp16_index``; ``serve_*``."""
    out: dict[str, float] = {}
    for p, ix in (result.get("index") or {}).items():
        rate = _get(ix, "img_per_s")
        if rate:
            out[f"{p}_index_img_per_s"] = rate
            enc = _get(result, "encoder_only", p, "items_per_s")
            if enc:
                out[f"{p}_index_over_encoder_only"] = rate / enc
    if out.get("fp16_index_img_per_s") and out.get("fp8_index_img_per_s"):
        out["fp8_index_over_fp16_index"] = out["fp8_index_img_per_s"] / out["fp16_index_img_per_s"]
    for p, cold in (result.get("cold_search") or {}).items():
        if _get(cold, "min_s") is not None:
            out[f"cold_search_{p}_s"] = cold["min_s"]
    for p, s in (result.get("search") or {}).items():
        if _get(s, "p50_ms") is not None:
            out[f"search_{p}_p50_ms"] = s["p50_ms"]
    for key in ("ready_s", "first_query_ms"):
        if _get(result, "serve", key) is not None:
            out[f"serve_{key}"] = result["serve"][key]
    return out


def evaluate_targets(result: dict[str, Any], gpu: bool) -> dict[str, dict[str, Any]]:
    """Each target of this machine kind that the run measured: value, goal, met. Targets not
    measured are absent (never claimed)."""
    values = derived(result)
    out = {}
    for key, goal, higher, what in GPU_TARGETS if gpu else CPU_TARGETS:
        if key in values:
            v = values[key]
            out[key] = {"value": v, "goal": goal, "met": v >= goal if higher else v <= goal, "what": what}
    return out


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def markdown(result: dict[str, Any]) -> str:
    """Per precision: end to end, encoder-only and their ratio, decode path, cold and warm search;
    then the query figures and the targets."""
    meta, corpus = result.get("meta", {}), result.get("corpus") or {}
    what = (f"{corpus.get('count')} JPEGs {corpus.get('width')}x{corpus.get('height')}" if corpus.get("width")
            else f"{corpus.get('count')} files of {corpus.get('folder', '?')}")
    lines = [f"`{meta.get('command', 'clipfp8 bench')}` — {meta.get('date_utc', '')}, {meta.get('device', '')}, "
             f"model {meta.get('model', '')}, {what}", "",
             "| precision | index img/s (end to end) | encoder-only img/s | ratio | decode | warm-up s "
             "| process wall s | cold search s (min) | warm search p50 ms |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    d = derived(result)
    for p, ix in (result.get("index") or {}).items():
        lines.append(f"| {p} | {_fmt(ix.get('img_per_s'))} | {_fmt(_get(result, 'encoder_only', p, 'items_per_s'))} | "
                     f"{_fmt(d.get(f'{p}_index_over_encoder_only'), 3)} | {ix.get('decoder', ix.get('error', ''))} | "
                     f"{_fmt(ix.get('warmup_s'), 2)} | {_fmt(ix.get('process_wall_s'))} | {_fmt(d.get(f'cold_search_{p}_s'), 2)} | "
                     f"{_fmt(d.get(f'search_{p}_p50_ms'), 3)} |")
    if "fp8_index_over_fp16_index" in d:
        lines += ["", f"FP8 / FP16 end to end: {d['fp8_index_over_fp16_index']:.3f}x"]
    app = result.get("app_search") or {}
    if app:
        lines += ["", "| app search (`app.search.search`) | p50 ms | p99 ms |", "| --- | ---: | ---: |"]
        lines += [f"| {k} | {_fmt(v.get('p50_ms'), 3)} | {_fmt(v.get('p99_ms'), 3)} |" for k, v in app.items()
                  if isinstance(v, dict) and "p50_ms" in v]
    serve = result.get("serve") or {}
    if serve:
        lines += ["", "serve: " + ", ".join(f"{k} {v}" for k, v in serve.items() if k not in ("command", "tail"))]
    targets = result.get("targets") or {}
    if targets:
        scope = "issue conditions" if result.get("issue_conditions") else "NOT the issue's conditions (smaller run)"
        lines += ["", f"| target ({scope}) | reached | goal | met |", "| --- | ---: | ---: | --- |"]
        lines += [f"| {v['what']} | {_fmt(v['value'], 3)} | {v['goal']:g} | {'yes' if v['met'] else 'NO'} |"
                  for v in targets.values()]
    return "\n".join(lines) + "\n"


__all__ = ["derived", "evaluate_targets", "markdown", "GPU_TARGETS", "CPU_TARGETS"]
