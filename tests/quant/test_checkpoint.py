"""Save -> load gives identical embeddings; bad directories raise ModelLoadError naming the file;
saving is atomic and never pickles."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clipfp8.quant.checkpoint import decode_state, encode_state, load_quantized, save_quantized
from clipfp8.quant.core.errors import ModelLoadError, QuantError
from clipfp8.quant.ptq import QuantConfig
from tests.quant.conftest import sample_batch


@pytest.fixture(scope="module")
def saved(quantized_tiny, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    loaded, result, _ = quantized_tiny
    return save_quantized(loaded, tmp_path_factory.mktemp("q") / "tiny-fp8", QuantConfig(), result.report)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_save_load_identical_embeddings(quantized_tiny, saved) -> None:  # type: ignore[no-untyped-def]
    loaded, _, _ = quantized_tiny
    images, tokens = sample_batch(loaded, 6, seed=3)
    loaded2, checksum = load_quantized(saved)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(images), loaded2.model.encode_image(images))
        assert torch.equal(loaded.model.encode_text(tokens), loaded2.model.encode_text(tokens))
    manifest = json.loads((saved / "manifest.json").read_text())
    assert checksum == manifest["checksum"] and len(checksum) == 16
    assert load_quantized(saved)[1] == checksum  # deterministic
    assert {"model.safetensors", "modelopt_state.json", "model_spec.json", "quant_config.json",
            "audit.json", "audit.txt"} <= {p.name for p in saved.iterdir()}
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_create_encoder_fp8_fake(quantized_tiny, saved) -> None:  # type: ignore[no-untyped-def]
    from clipfp8.quant.core.config import EncoderSpec
    from clipfp8.quant.core.encoder import create_encoder

    loaded, _, _ = quantized_tiny
    with pytest.raises(ModelLoadError, match="quantized from model 'config:tiny'"):
        create_encoder(EncoderSpec(precision="fp8-fake", quantized=saved, device="cpu"))  # default model
    enc = create_encoder(EncoderSpec(model=loaded.spec, precision="fp8-fake", quantized=saved, device="cpu"))
    _, checksum = load_quantized(saved)
    assert enc.identity().checksum == checksum and enc.precision == "fp8-fake"
    images, _ = sample_batch(loaded, 4, seed=4)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(loaded.model.encode_image(images), dim=-1).numpy()
    np.testing.assert_allclose(enc.encode_images(images), ref, atol=1e-6)


def test_state_codec_roundtrip_and_refuses_objects() -> None:
    state = {"a": (4, 3), "b": [torch.float16, torch.Size([2, 3])], "c": {"d": None, "e": 1.5}}
    enc = encode_state(state)
    assert decode_state(json.loads(json.dumps(enc))) == state
    with pytest.raises(QuantError, match="cannot be stored as JSON"):
        encode_state({"x": object()})


def test_changed_quant_config_is_detected(saved, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = _copy(saved, tmp_path / "q")
    (d / "quant_config.json").write_text(json.dumps(QuantConfig(exclude=()).to_dict()))
    with pytest.raises(ModelLoadError, match="manifest.json: checksum mismatch"):
        load_quantized(d)


def test_mismatched_model_config_names_file(saved, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = _copy(saved, tmp_path / "q")
    spec = json.loads((d / "model_spec.json").read_text())
    spec["config"]["vision_cfg"]["width"] = 32
    spec["config"]["vision_cfg"]["head_width"] = 16
    (d / "model_spec.json").write_text(json.dumps(spec))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors|modelopt_state\.json"):
        load_quantized(d)


@pytest.mark.parametrize("victim,match", [("model.safetensors", "model.safetensors"),
                                          ("modelopt_state.json", "modelopt_state.json"),
                                          ("manifest.json", "manifest.json")])
def test_corrupt_or_missing_files(saved, tmp_path, victim: str, match: str) -> None:  # type: ignore[no-untyped-def]
    d = _copy(saved, tmp_path / "corrupt")
    (d / victim).write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError, match=match):
        load_quantized(d)
    (d / victim).unlink()
    with pytest.raises(ModelLoadError, match=match):
        load_quantized(d)


def test_missing_directory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelLoadError, match="not found"):
        load_quantized(tmp_path / "nope")


def test_save_is_atomic(quantized_tiny, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import safetensors.torch

    loaded, _, _ = quantized_tiny
    other = tmp_path / "not-ours"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        save_quantized(loaded, other, QuantConfig())
    assert [p.name for p in other.iterdir()] == ["keep.txt"]

    def boom(*a, **k):  # type: ignore[no-untyped-def]
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(loaded, tmp_path / "out", QuantConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-ours"]
