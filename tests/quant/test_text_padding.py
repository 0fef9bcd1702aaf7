"""Trailing all-pad token columns are cut only for text towers that mask padding, and cutting
them leaves the embeddings unchanged (fp32 and FP8 fake quant)."""
from __future__ import annotations

import pytest
import torch

from clipfp8.quant.core.config import EncoderSpec, ModelSpec
from clipfp8.quant.core.encoder import TorchEncoder, create_encoder, torch_encoder_for
from clipfp8.quant.core.models import load_model, tiny_config
from clipfp8.quant.core.text_padding import cut_trailing_padding, trailing_pad_id

TEXTS = ["a photo of a dog running on the beach with a red ball", "two", "a bowl of soup"]


def test_cut_keeps_every_column_any_row_uses() -> None:
    t = torch.tensor([[5, 6, 0, 0, 0], [5, 0, 0, 7, 0]])
    assert cut_trailing_padding(t, 0).tolist() == [[5, 6, 0, 0], [5, 0, 0, 7]]  # inner pads stay
    assert cut_trailing_padding(t, None) is t
    assert cut_trailing_padding(torch.zeros(2, 4, dtype=torch.long), 0).shape == (2, 1)


def _fed_lengths(model: torch.nn.Module) -> list[int]:
    seen: list[int] = []
    model.text.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    return seen


@pytest.mark.parametrize("text_only", [False, True])  # HFTextEncoder; the default model's MiniLMText
def test_default_model_texts_are_cut_and_embed_the_same(text_only: bool) -> None:
    loaded = load_model(text_only=text_only)
    assert trailing_pad_id(loaded.model) == 0
    enc = torch_encoder_for(loaded, EncoderSpec(precision="fp32", device="cpu"), loaded.weights_checksum())
    seen = _fed_lengths(enc.model)
    got = enc.encode_texts(TEXTS)
    full = loaded.tokenizer(TEXTS)
    assert seen == [int((full != 0).sum(1).max())] and seen[0] < full.shape[1]
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(enc.model.encode_text(full), dim=-1).numpy()
    assert abs(got - ref).max() < 1e-5


def test_fp8_fake_quant_hf_text_is_unchanged_by_the_cut() -> None:
    pytest.importorskip("modelopt")
    from clipfp8.quant.ptq import QuantConfig, quantize
    from tests.quant.conftest import sample_batch, tiny_loaded

    loaded = tiny_loaded(hf_text=True)  # a tiny MiniLM-shaped HF text tower
    quantize(loaded, [sample_batch(loaded, 16)], QuantConfig())  # FP8 fake quant in place
    enc = TorchEncoder(loaded.model, loaded.preprocess, loaded.tokenizer, precision="fp8-fake", device="cpu",
                       name="tiny-fp8-fake", model_id="tiny", checksum="x", dim=loaded.embed_dim,
                       image_size=loaded.image_size)
    assert enc._pad_id == 0
    seen = _fed_lengths(enc.model)
    got = enc.encode_texts(TEXTS)
    full = loaded.tokenizer(TEXTS)
    assert seen[0] < full.shape[1]
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(enc.model.encode_text(full), dim=-1).numpy()
    assert abs(got - ref).max() < 1e-5


def test_open_clip_text_transformer_is_never_cut() -> None:
    torch.manual_seed(0)
    enc = create_encoder(EncoderSpec(model=ModelSpec(config=tiny_config()), precision="fp32", device="cpu"))
    assert trailing_pad_id(enc.model) is None  # CLIP adds a fixed-length positional embedding
    assert enc.encode_texts(TEXTS).shape == (3, 32)
