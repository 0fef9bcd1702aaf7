"""An image-only load of the default model (what a `search --image` process builds): the same
image embeddings and checksum as the whole model, no text tower, texts refused, no transformers."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from clipfp8.quant.core.config import EncoderSpec
from clipfp8.quant.core.errors import ModelLoadError
from clipfp8.quant.core.models import load_model


def test_image_only_default_load_equals_the_whole_model() -> None:
    whole = load_model()
    img = load_model(image_only=True)
    assert img.weights_checksum() == whole.weights_checksum()
    assert not [k for k in img.model.state_dict() if k.startswith("text.")]
    assert (img.image_size, img.embed_dim) == (whole.image_size, whole.embed_dim)
    pics = [Image.new("RGB", (90, 60), (200, 30, 30)), Image.linear_gradient("L").convert("RGB")]
    with torch.no_grad():
        a = whole.model.encode_image(torch.stack([whole.preprocess(p) for p in pics]))
        b = img.model.encode_image(torch.stack([img.preprocess(p) for p in pics]))
    assert torch.equal(a, b)
    with pytest.raises(ModelLoadError, match="image-only"):
        img.tokenizer(["a dog"])
    with pytest.raises(ModelLoadError, match="image-only"):
        img.model.encode_text(torch.zeros(1, 8, dtype=torch.long))


def test_text_only_and_image_only_exclude_each_other() -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        EncoderSpec(text_only=True, image_only=True)
    with pytest.raises(ValueError, match="exclude each other"):
        load_model(text_only=True, image_only=True)


def test_an_image_only_load_imports_no_transformers() -> None:
    code = ("import json, sys; from clipfp8.quant.core.models import load_model\n"
            "load_model(image_only=True)\n"
            "print(json.dumps(sorted(m for m in ('transformers', 'timm', 'torch._dynamo') if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
