"""``clipfp8 bench`` (the benchmark of the shipped paths): its inputs, its arithmetic and report,
and a CPU smoke run whose JSON must hold every step and ratios computed from its own figures."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from clipfp8.app.bench import BenchConfig
from clipfp8.app.bench_corpus import parse_size, write_jpegs
from clipfp8.app.bench_report import CPU_TARGETS, GPU_TARGETS, derived, evaluate_targets, markdown


def test_generated_jpegs_are_distinct_photo_sized_files(tmp_path: Path):
    made = write_jpegs(tmp_path / "c", 6, (500, 375), workers=1)
    files = sorted((tmp_path / "c").rglob("*.jpg"))
    assert len(files) == made.count == 6
    assert len({hashlib.sha256(f.read_bytes()).hexdigest() for f in files}) == 6
    with Image.open(files[0]) as im:
        assert im.size == (500, 375) and im.format == "JPEG"
    assert 50 * 1024 < made.mean_bytes < 110 * 1024  # compresses like a photo (~75 KB), not like noise


def test_sizes_and_config_are_validated():
    assert parse_size("500x375") == (500, 375)
    for bad in ("500", "axb", "8x8"):
        with pytest.raises(ValueError, match="--jpeg-size"):
            parse_size(bad)
    with pytest.raises(ValueError, match="precisions"):
        BenchConfig(precisions=("fp12",))
    with pytest.raises(ValueError, match="jpeg_count"):
        BenchConfig(jpeg_count=0)
    cfg = BenchConfig(device="cpu").resolved()
    assert (cfg.precisions, cfg.batch_size) == (("fp32",), 64)  # the CPU baseline


def _result() -> dict:
    return {"index": {"fp16": {"img_per_s": 2000.0, "decoder": "gpu:cuda"}, "fp8": {"img_per_s": 2900.0}},
            "encoder_only": {"fp16": {"items_per_s": 2500.0}, "fp8": {"items_per_s": 3600.0}},
            "cold_search": {"fp16": {"min_s": 4.0}, "fp8": {"rc": [1], "error": ["boom"]}},
            "search": {"fp8": {"p50_ms": 2.5}}, "serve": {"ready_s": 12.0}}


def test_ratios_and_targets_come_from_the_results_own_figures():
    r = _result()
    d = derived(r)
    assert d["fp8_index_over_encoder_only"] == pytest.approx(2900 / 3600)
    assert d["fp16_index_over_encoder_only"] == pytest.approx(2000 / 2500)
    assert d["fp8_index_over_fp16_index"] == pytest.approx(2900 / 2000)
    t = evaluate_targets(r, gpu=True)
    assert t["fp8_index_img_per_s"]["met"] and not t["fp8_index_over_encoder_only"]["met"]  # 0.806 < 0.85
    assert t["fp8_index_over_fp16_index"]["met"] and t["cold_search_fp16_s"]["met"]
    assert not t["search_fp8_p50_ms"]["met"] and t["serve_ready_s"]["met"]
    # not measured (or failed) -> not claimed
    assert {"cold_search_fp8_s", "serve_first_query_ms", "search_fp16_p50_ms"}.isdisjoint(t)
    assert set(t) <= {k for k, *_ in GPU_TARGETS}
    table = markdown(dict(r, targets=t))
    assert "| fp8 | 2,900.0 | 3,600.0 | 0.806 |" in table and "| NO |" in table


@pytest.mark.slow
def test_cpu_smoke_run_writes_every_step(tmp_path: Path, capsys):
    from clipfp8.app.cli_bench import bench

    out = tmp_path / "bench.json"
    assert bench(out=out, cpu_smoke=True, serve=False, work_dir=tmp_path / "w", markdown_out=tmp_path / "b.md") == 0
    r = json.loads(out.read_text())
    assert r["issue_conditions"] is False and r["meta"]["config"]["precisions"] == ["fp32"]
    assert r["corpus"]["count"] == 12 and len(list((tmp_path / "w" / "corpus").rglob("*.jpg"))) == 12
    ix = r["index"]["fp32"]
    assert ix["rc"] == 0 and ix["indexed"] == 12 and ix["decoder"] == "cpu"
    assert ix["img_per_s"] == pytest.approx(12 / ix["seconds"], rel=1e-2) and ix["process_wall_s"] > ix["seconds"]
    assert r["cold_search"]["fp32"]["rc"] == [0] and r["cold_search"]["fp32"]["min_s"] > 0
    (stages,) = r["cold_search"]["fp32"]["stages_s"]  # `search --timings`, one run
    assert {"open index", "encoder", "query", "total"} <= set(stages) and stages["encoder"] > 0
    assert stages["total"] <= r["cold_search"]["fp32"]["walls_s"][0] + 0.05
    enc = r["encoder_only"]["fp32"]
    assert enc["batch"] == 8 and enc["items_per_s"] > 0 and enc["text_query"]["p50_ms"] > 0
    assert r["search"]["fp32"]["rows"] == 300 and r["search"]["fp32"]["hits"] == 10
    assert r["app_search"]["FP32 (CPU baseline)"]["p50_ms"] > 0
    assert r["ratios"]["fp32_index_over_encoder_only"] == pytest.approx(ix["img_per_s"] / enc["items_per_s"])
    assert set(r["targets"]) == {k for k, *_ in CPU_TARGETS}
    assert r["targets"]["fp32_index_img_per_s"]["value"] == ix["img_per_s"]
    assert "| fp32 |" in (tmp_path / "b.md").read_text() and "serve" not in r


def test_stage_timings_parses_the_search_timings_line() -> None:
    from clipfp8.app.bench_search import stage_timings

    lines = ["0.3000\ta.jpg", "timings: startup 1.300 s, open index 0.302 s, encoder 0.145 s, total 1.747 s"]
    assert stage_timings(lines) == {"startup": 1.3, "open index": 0.302, "encoder": 0.145, "total": 1.747}
    assert stage_timings(["0.3000\ta.jpg"]) is None
