"""A text-only load of an open_clip checkpoint (what a `search --text` process builds): the same
text embeddings and checksum as the whole model, no image tower weights, images refused."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clipfp8.quant.core.config import EncoderSpec, ModelSpec
from clipfp8.quant.core.encoder import create_encoder
from clipfp8.quant.core.errors import ModelLoadError
from clipfp8.quant.core.models import LoadedModel, load_model, tiny_config

TEXTS = ["a red car", "two dogs on a beach", "a bowl of soup"]


@pytest.fixture
def checkpoint(tmp_path: Path, tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> ModelSpec:
    import open_clip

    # A named architecture: register the tiny config under a name, as open_clip's registry does.
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tiny-test", tiny_config())
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    return ModelSpec(name="tiny-test", checkpoint=path)


def test_text_only_checkpoint_load_equals_the_whole_model(checkpoint: ModelSpec) -> None:
    whole = load_model(checkpoint)
    text = load_model(checkpoint, text_only=True)
    assert text.weights_checksum() == whole.weights_checksum()
    assert not [k for k in text.model.state_dict() if k.startswith("visual.")]
    assert any(k.startswith("visual.") for k in whole.model.state_dict())
    assert (text.image_size, text.embed_dim) == (whole.image_size, whole.embed_dim)
    with torch.no_grad():
        a = whole.model.encode_text(whole.tokenizer(TEXTS))
        b = text.model.encode_text(text.tokenizer(TEXTS))
    assert torch.equal(a, b)
    with pytest.raises(ModelLoadError, match="text-only"):
        text.model.encode_image(torch.zeros(1, 3, *text.image_size))
    with pytest.raises(ModelLoadError, match="text-only"):
        text.preprocess(Image.new("RGB", (40, 30)))


def test_text_only_encoder_has_the_whole_encoders_identity(checkpoint: ModelSpec) -> None:
    whole = create_encoder(EncoderSpec(model=checkpoint, precision="fp32", device="cpu"))
    text = create_encoder(EncoderSpec(model=checkpoint, precision="fp32", device="cpu", text_only=True))
    assert text.identity() == whole.identity()
    assert (text.encode_texts(TEXTS) == whole.encode_texts(TEXTS)).all()
