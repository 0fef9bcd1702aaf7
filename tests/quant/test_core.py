"""Shared core: configs validate themselves, load_model builds every source, Encoder contract."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clipfp8.quant.core.config import EncoderSpec, ModelSpec
from clipfp8.quant.core.encoder import TorchEncoder, create_encoder
from clipfp8.quant.core.errors import ModelLoadError
from clipfp8.quant.core.models import load_model, load_safetensors_into, tiny_config


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model(ModelSpec(name="tiny", config=tiny_config()))


def test_model_spec_validation():
    with pytest.raises(ValueError, match="checkpoint"):
        ModelSpec(checkpoint=Path("x.safetensors"))  # no architecture named
    with pytest.raises(ValueError, match="pretrained"):
        ModelSpec(name="ViT-B-32", pretrained="openai", checkpoint=Path("x.safetensors"))
    with pytest.raises(ValueError, match="vision_cfg"):
        ModelSpec(name="t", config={"embed_dim": 8, "text_cfg": {}})
    assert ModelSpec().is_default
    assert ModelSpec(name="ViT-B-32", pretrained="openai").model_id() == "ViT-B-32/openai"
    spec = ModelSpec(name="t", config=tiny_config())
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_encoder_spec_validation():
    with pytest.raises(ValueError, match="precision"):
        EncoderSpec(precision="int4")
    with pytest.raises(ValueError, match="quantized"):
        EncoderSpec(precision="fp8-fake")
    with pytest.raises(ValueError, match="batch_size"):
        EncoderSpec(batch_size=0)
    with pytest.raises(ValueError, match="device"):
        EncoderSpec(device="tpu")


def test_unknown_model_name_names_it():
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_model(ModelSpec(name="no-such-model", pretrained="x"))


def test_unknown_pretrained_tag_names_it():
    with pytest.raises(ModelLoadError, match="not-a-tag"):
        load_model(ModelSpec(name="ViT-B-32", pretrained="not-a-tag"))


def test_checkpoint_roundtrip_and_errors(tmp_path, tiny, monkeypatch):
    import open_clip

    # A named architecture: register the tiny config under a name, as open_clip's registry does.
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tiny-test", tiny_config())
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    loaded = load_model(ModelSpec(name="tiny-test", checkpoint=path))
    assert loaded.weights_checksum() == tiny.weights_checksum()

    with pytest.raises(ModelLoadError, match="only .safetensors"):
        load_model(ModelSpec(name="tiny-test", checkpoint=tmp_path / "w.pt"))
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(ModelSpec(name="tiny-test", checkpoint=tmp_path / "missing.safetensors"))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="corrupt.safetensors"):
        load_model(ModelSpec(name="tiny-test", checkpoint=corrupt))
    other = load_model(ModelSpec(name="o", config=tiny_config(embed_dim=16)))
    with pytest.raises(ModelLoadError, match="does not match"):
        load_safetensors_into(other.model, path)


def test_torch_encoder_contract(tiny):
    enc = TorchEncoder(tiny.model, tiny.preprocess, tiny.tokenizer, precision="fp32", device="cpu",
                       name="tiny-fp32", model_id="tiny", checksum=tiny.weights_checksum(), dim=32,
                       image_size=tiny.image_size, batch_size=3)
    images = [Image.new("RGB", (40, 50), c) for c in ("red", "green", "blue", "white", "black")]
    x = enc.encode_pil(images)
    t = enc.encode_texts(["a red square", "a dog", "", "x" * 500])
    assert x.shape == (5, 32) and t.shape == (4, 32)
    assert x.dtype == np.float32 and t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    # Batching (batch_size=3 splits 5 images) must not change results.
    single = np.concatenate([enc.encode_pil([im]) for im in images])
    np.testing.assert_allclose(single, x, atol=1e-5)
    assert enc.encode_texts([]).shape == (0, 32)
    with pytest.raises(ValueError, match="N, 3, H, W"):
        enc.encode_images(torch.zeros(2, 32, 32))


def test_fp16_and_bf16_close_to_fp32():
    torch.manual_seed(1)
    spec = ModelSpec(name="tiny", config=tiny_config())
    base = load_model(spec)
    x = torch.rand(4, 3, 32, 32)
    outs = {}
    for prec in ("fp32", "bf16", "fp16"):
        loaded = load_model(spec)
        loaded.model.load_state_dict(base.model.state_dict())
        enc = TorchEncoder(loaded.model, loaded.preprocess, loaded.tokenizer, precision=prec, device="cpu",
                           name=prec, model_id="t", checksum="c", dim=32, image_size=(32, 32))
        outs[prec] = enc.encode_images(x)
    for prec in ("bf16", "fp16"):
        cos = (outs[prec] * outs["fp32"]).sum(1)
        assert cos.min() > 0.98, prec
        assert not np.array_equal(outs[prec], outs["fp32"]), "lower precision must really run"


def test_create_encoder_fp32_from_config():
    enc = create_encoder(EncoderSpec(model=ModelSpec(name="tiny", config=tiny_config()), precision="fp32",
                                     device="cpu"))
    assert enc.precision == "fp32" and enc.dim == 32 and enc.name == "tiny-fp32"
    ident = enc.identity()
    assert ident.model_id == "config:tiny" and len(ident.checksum) == 16


def test_default_model_missing_is_clear(monkeypatch, tmp_path):
    import clipfp8.quant.core.models as qm

    monkeypatch.setattr(qm, "DEFAULT_MODEL_DIR", tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="embedded default model is missing"):
        load_model()
