"""Compiled engines for real, on a CUDA GPU with FP8 tensor cores: ``build_engine`` on a tiny
FP8-quantized open_clip model, then FRESH processes (fresh Inductor/Triton caches) that create
the product's encoders with the engine (every compile a cache hit) and without it (the lazy
compile of before), whose embeddings must agree. Drives scripts/engine_check.py, the script the
H200 measurement uses, so both go through the same code."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                       reason="FP8 GEMMs need compute capability >= 8.9"),
]

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "engine_check.py"
PRECISIONS = ("fp8", "fp16")


def _run(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                          capture_output=True, text=True, timeout=1500, cwd=REPO)
    if check:
        assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("engines")
    q = tmp / "q"

    def env(name: str, **extra: str) -> dict[str, str]:  # a fresh compiler cache per process
        return {"XDG_CACHE_HOME": str(tmp / "xdg"), "TORCHINDUCTOR_CACHE_DIR": str(tmp / f"inductor-{name}"),
                "TRITON_CACHE_DIR": str(tmp / f"triton-{name}"), "CLIPFP8_ENGINE": "auto", **extra}

    common = ["--quantized", str(q), "--precision", *PRECISIONS, "--batch-size", "8"]
    _run(["quantize", "--model", "tiny", "--out", str(q)], env("quantize"))
    _run(["build", *common, "--json", str(tmp / "build.json")], env("build"))
    _run(["probe", *common, "--json", str(tmp / "cold.json"), "--npz", str(tmp / "cold.npz")],
         env("cold", CLIPFP8_ENGINE="off"))
    _run(["probe", *common, "--json", str(tmp / "warm.json"), "--npz", str(tmp / "warm.npz")], env("warm"))
    out = {name: json.loads((tmp / f"{name}.json").read_text()) for name in ("build", "cold", "warm")}
    return {"tmp": tmp, "q": q, "env": env, "common": common, **out}


def test_engines_are_stored_where_the_runtime_looks(runs):
    major, minor = torch.cuda.get_device_capability()
    fp8 = Path(runs["build"]["fp8"]["folder"])
    assert fp8.parent == runs["q"] / "engines" and fp8.name.startswith(f"fp8-sm{major}{minor}-torch")
    fp16 = Path(runs["build"]["fp16"]["folder"])
    assert fp16.parent.parent == runs["tmp"] / "xdg" / "clipfp8" / "engines"
    for p in PRECISIONS:
        manifest = json.loads((Path(runs["build"][p]["folder"]) / "engine.json").read_text())
        assert manifest["key"]["gpu_name"] == torch.cuda.get_device_name()
        assert manifest["key"]["max_batch"] == 8 and runs["build"][p]["bytes"] > 0


def test_fresh_process_with_an_engine_compiles_only_cache_hits(runs):
    for p in PRECISIONS:
        cold, warm = runs["cold"][p], runs["warm"][p]
        assert cold["encoder"] == warm["encoder"] == "FastTorchEncoder"
        assert cold["cache"]["aot_miss"] + cold["cache"]["fxgraph_miss"] >= 2, cold  # really compiled
        assert warm["cache"]["aot_miss"] == 0 and warm["cache"]["fxgraph_miss"] == 0, warm
        assert warm["cache"]["aot_hit"] + warm["cache"]["fxgraph_hit"] >= 2, warm  # both towers
        print(f"{p}: start to results {cold['start_to_results_s']:.1f} s lazily, {warm['start_to_results_s']:.1f} s "
              f"with the engine")


def test_fp8_start_with_an_engine_needs_no_modelopt(runs):
    """The engine carries the converted FP8 model (runtime_state), so ModelOpt is not imported."""
    files = json.loads((Path(runs["build"]["fp8"]["folder"]) / "engine.json").read_text())["files"]
    assert {"compile_cache", "fp8_runtime_safetensors", "fp8_runtime_plan_json"} <= set(files)
    assert runs["cold"]["fp8"]["modelopt_imported"] and not runs["warm"]["fp8"]["modelopt_imported"]


def test_engine_outputs_equal_the_lazily_compiled_encoder(runs):
    cold, warm = np.load(runs["tmp"] / "cold.npz"), np.load(runs["tmp"] / "warm.npz")
    assert sorted(cold.files) == sorted(warm.files) and len(cold.files) == 3 * len(PRECISIONS)
    for name in cold.files:
        # Same graphs; only Triton's autotuning may pick other launch configs (summation order).
        np.testing.assert_allclose(warm[name], cold[name], atol=3e-3, err_msg=name)
        assert float((warm[name] * cold[name]).sum(-1).min()) >= 0.9999, name


def test_engine_of_another_gpu_is_refused_with_the_rebuild_command(runs):
    q2 = runs["tmp"] / "q-other-gpu"
    shutil.copytree(runs["q"], q2)
    (manifest_path,) = (q2 / "engines").glob("fp8-*/engine.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["key"]["gpu_name"] = "Some Other GPU"
    manifest_path.write_text(json.dumps(manifest))
    proc = _run(["probe", "--quantized", str(q2), "--precision", "fp8", "--batch-size", "8"],
                runs["env"]("refused"), check=False)
    assert proc.returncode != 0
    assert "EngineMismatchError" in proc.stderr and "gpu_name" in proc.stderr
    assert f"clipfp8 build-engine --quantized {q2} --precision fp8" in proc.stderr
