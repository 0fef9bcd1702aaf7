"""`clipfp8 quantize|audit|sensitivity` end to end on a tiny config, in process, plus bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipfp8.app.cli import EXIT_AUDIT_FAILED, EXIT_BAD_INPUT, main
from clipfp8.quant.core.models import tiny_config
from tests.quant.conftest import make_images


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("cli")
    (d / "tiny.json").write_text(json.dumps(tiny_config()))
    make_images(d / "calib", {"cat": 5, "dog": 5, "car": 2})
    return d


@pytest.fixture(scope="module")
def quantized_dir(workdir: Path) -> Path:
    out = workdir / "out"
    rc = main(["quantize", "--calib", str(workdir / "calib"), "--output", str(out), "--model",
               str(workdir / "tiny.json"), "--device", "cpu", "--num-samples", "10", "--calib-batch-size", "4"])
    assert rc == 0
    return out


def test_quantize_end_to_end(quantized_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert (quantized_dir / "manifest.json").is_file()
    report = json.loads((quantized_dir / "audit.json").read_text())
    assert report["attention_covered"] and report["gemm_ops"] - report["fp8_ops"] == 3
    spec = json.loads((quantized_dir / "model_spec.json").read_text())
    assert spec["name"] == "tiny" and spec["config"]["vision_cfg"]["width"] == 64


def test_quantize_prints_table(workdir: Path, quantized_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rc = main(["quantize", "--calib", str(workdir / "calib"), "--output", str(workdir / "out2"), "--model",
               str(workdir / "tiny.json"), "--device", "cpu", "--num-samples", "4", "--exclude", "none"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "GEMM-like ops in FP8; attention covered: yes" in out
    assert "visual.conv1" in out and "calibrated on 4 image-text pairs" in out
    # --exclude none: the patch embedding conv is quantized too, and runs in FP8
    assert json.loads((workdir / "out2" / "quant_config.json").read_text())["exclude"] == []
    audit = json.loads((workdir / "out2" / "audit.json").read_text())
    default = json.loads((quantized_dir / "audit.json").read_text())  # conv1 excluded there
    assert audit["gemm_ops"] - audit["fp8_ops"] == 2  # only the two raw-parameter output projections
    assert default["fp8_ops"] == audit["fp8_ops"] - 1


def test_audit_cli(quantized_dir: Path, workdir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    js = workdir / "audit.json"
    rc = main(["audit", "--quantized", str(quantized_dir), "--calib", str(workdir / "calib"), "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0 and "attention covered: yes" in out
    data = json.loads(js.read_text())
    assert data["fp8_ops"] == data["gemm_ops"] - 3 and "visual.conv1 (patch embedding" in data["summary"]


def test_sensitivity_cli(workdir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    js = workdir / "sens.json"
    rc = main(["sensitivity", "--calib", str(workdir / "calib"), "--model", str(workdir / "tiny.json"),
               "--device", "cpu", "--num-samples", "8", "--eval-samples", "8", "--json", str(js)])
    assert rc == 0
    data = json.loads(js.read_text())
    units = {r["unit"] for r in data["rows"]}
    assert {"visual.transformer.resblocks.0", "transformer.resblocks.1"} <= units
    assert all(0.9 < r["image_cos"] <= 1.0001 for r in data["rows"])
    assert "unit kept in high precision" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["unknown_model", "missing_calib", "empty_calib", "undecodable", "bad_json_model"])
def test_quantize_bad_input(workdir: Path, tmp_path: Path, capsys, case: str) -> None:  # type: ignore[no-untyped-def]
    calib, model = workdir / "calib", str(workdir / "tiny.json")
    if case == "unknown_model":
        model, expect = "No-Such-Model-42", "No-Such-Model-42"
    elif case == "missing_calib":
        calib, expect = tmp_path / "nowhere", "nowhere"
    elif case == "empty_calib":
        calib, expect = tmp_path / "empty", "empty"
        calib.mkdir()
    elif case == "undecodable":
        calib, expect = tmp_path / "junk", "junk"
        calib.mkdir()
        (calib / "a.jpg").write_bytes(b"not an image")
    else:
        (tmp_path / "m.json").write_text("{")
        model, expect = str(tmp_path / "m.json"), "m.json"
    out = tmp_path / "out"
    rc = main(["quantize", "--calib", str(calib), "--output", str(out), "--model", model, "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT
    assert "clipfp8 quantize: error:" in err and expect in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_audit_bad_input(quantized_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["audit", "--quantized", str(tmp_path / "missing")]) == EXIT_BAD_INPUT
    assert "missing" in capsys.readouterr().err
    import shutil

    bad = tmp_path / "corrupt"
    shutil.copytree(quantized_dir, bad)
    (bad / "model.safetensors").write_bytes(b"junk")
    assert main(["audit", "--quantized", str(bad)]) == EXIT_BAD_INPUT
    assert "model.safetensors" in capsys.readouterr().err
    spec = json.loads((quantized_dir / "model_spec.json").read_text())
    spec["config"]["text_cfg"]["width"] = 32
    shutil.copytree(quantized_dir, tmp_path / "mismatch")
    (tmp_path / "mismatch" / "model_spec.json").write_text(json.dumps(spec))
    assert main(["audit", "--quantized", str(tmp_path / "mismatch")]) == EXIT_BAD_INPUT
    assert "does not match" in capsys.readouterr().err


def test_audit_cli_fails_on_fp8_default_cfg_trap(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A checkpoint quantized with the bare preset (image tower silently fp32) fails the audit."""
    import copy

    import modelopt.torch.quantization as mtq

    from clipfp8.quant.checkpoint import save_quantized
    from clipfp8.quant.ptq import QuantConfig, prepare_model
    from tests.quant.conftest import sample_batch, tiny_loaded

    loaded = tiny_loaded()
    prepare_model(loaded.model)
    images, tokens = sample_batch(loaded, 8)
    mtq.quantize(loaded.model, copy.deepcopy(mtq.FP8_DEFAULT_CFG),
                 lambda m: (m.encode_image(images), m.encode_text(tokens)))
    save_quantized(loaded, tmp_path / "trap", QuantConfig())
    rc = main(["audit", "--quantized", str(tmp_path / "trap")])
    err = capsys.readouterr().err
    assert rc == EXIT_AUDIT_FAILED and "image tower runs no GEMM in FP8" in err
