"""The shipped default model (data/default_model) and the training helpers that produced it."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from clipfp8.quant.core.config import EncoderSpec
from clipfp8.quant.core.models import DEFAULT_MODEL_DIR, load_model
from clipfp8.quant.train.data import CaptionTable, mosaic, unmosaic
from clipfp8.quant.train.evaluate import first_per_class
from clipfp8.quant.train.model import dequantize_rows_int8, quantize_rows_int8
from clipfp8.quant.train.ship import sha256_file
from clipfp8.quant.train.train import augment, multi_positive_loss

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data is absent")


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(0)
    return load_model()


def test_model_card_sha256_matches_shipped_file() -> None:
    card = (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text()
    m = re.search(r"sha256\b.*?\b([0-9a-f]{64})\b", card, re.S)
    assert m, "MODEL_CARD.md names no sha256"
    assert sha256_file(DEFAULT_MODEL_DIR / "model.safetensors") == m.group(1)


def test_load_model_gives_unit_norm_embeddings_of_config_dim(loaded) -> None:
    cfg = json.loads((DEFAULT_MODEL_DIR / "open_clip_config.json").read_text())["model_cfg"]
    dim, size = cfg["embed_dim"], cfg["vision_cfg"]["image_size"]
    assert loaded.embed_dim == dim and loaded.image_size == (size, size)
    with torch.inference_mode():
        img = loaded.model.encode_image(torch.randn(3, 3, size, size), normalize=True)
        txt = loaded.model.encode_text(loaded.tokenizer(["a dog", "a photo of a red car."]), normalize=True)
    assert img.shape == (3, dim) and txt.shape == (2, dim)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-4)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-4)
    assert not torch.allclose(txt[0], txt[1], atol=1e-3)  # a frozen-but-real text tower separates texts


def test_create_encoder_default_spec_works_on_cpu() -> None:
    from PIL import Image

    from clipfp8.quant.core.encoder import create_encoder

    enc = create_encoder(EncoderSpec())  # the documented zero-argument path (CPU here)
    e = enc.encode_pil([Image.new("RGB", (90, 70), (200, 30, 30))])
    t = enc.encode_texts(["a red square"])
    assert e.shape == (1, enc.dim) and t.shape == (1, enc.dim)
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-4)


@needs_shared
def test_zero_shot_cifar10_subset_beats_chance_by_far() -> None:
    """200 CIFAR-10-test images (the first 20 of each class by name), scored by quant.eval: a
    random model sits near 10%."""
    from clipfp8.quant.core.encoder import create_encoder
    from clipfp8.quant.eval.datasets import load_class_folder
    from clipfp8.quant.eval.run import evaluate

    data = first_per_class(load_class_folder(SHARED / "eval" / "cifar10-test", "cifar10-test"), 20)
    assert len(data.images) == 200
    report = evaluate([create_encoder(EncoderSpec(precision="fp32", device="cpu"))], [data], batch_size=100)
    acc = report.result("cifar10-test").metrics[report.baseline]["acc1"]
    assert acc > 0.5, f"zero-shot top-1 {acc:.3f} on 200 CIFAR-10 images"


def test_multi_positive_loss_rewards_matching_groups_and_handles_duplicates() -> None:
    g = torch.tensor([0, 0, 1, 2])
    emb = torch.nn.functional.normalize(torch.eye(4)[[0, 0, 1, 2]] + 0.0, dim=-1)
    scale = torch.tensor(np.log(20.0))
    aligned = multi_positive_loss(emb, emb, g, scale)
    shuffled = multi_positive_loss(emb, emb[[2, 3, 0, 1]], g, scale)
    assert aligned < shuffled
    # two images of one group with identical captions: the soft target splits evenly, so the
    # aligned loss is log(2)/2-ish per duplicate row, not a penalty for the "other" positive
    assert aligned < 0.5


def test_caption_table_dedupes_groups_and_captions() -> None:
    t = CaptionTable()
    a = t.add("class:dog", ["a dog", "a photo of a dog."])
    assert t.add("class:dog", ["ignored"]) == a
    b = t.add("class:cat", ["a cat", "a dog"])  # a caption shared across groups is stored once
    assert a != b and len(t.captions) == 3
    offsets, ids = t.csr()
    assert offsets.tolist() == [0, 2, 4] and ids.tolist() == [0, 1, 2, 0]


def test_mosaic_round_trip_and_int8_features() -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    assert np.array_equal(unmosaic(mosaic(imgs, 3), 7, 8), imgs)
    x = torch.randn(5, 384)
    q, s = quantize_rows_int8(x)
    assert (dequantize_rows_int8(q, s) - x).abs().max() <= s.max() / 2 + 1e-6


def test_augment_shapes_and_flip_only_identity() -> None:
    gen = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    out = augment(u8, 64, (1.0, 1.0), 0.0, gen, ratio=(1.0, 1.0))
    assert out.shape == (4, 3, 64, 64) and torch.isfinite(out).all()
    out2 = augment(u8, 64, (1.0, 1.0), 0.0, torch.Generator().manual_seed(1), ratio=(1.0, 1.0))
    # full-area crops differ only by the flip: each sample equals the other or its mirror
    for a, b in zip(out, out2, strict=False):
        assert torch.allclose(a, b, atol=1e-3) or torch.allclose(a, b.flip(-1), atol=1e-3)

