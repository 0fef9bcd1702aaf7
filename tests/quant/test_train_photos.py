"""Training on captioned photos: the loss with photo groups, caption drawing, per-source batch
shares, the PCA-carried caption features, chunked mosaics and the training CLI's new flags."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipfp8.quant.train import textfeats
from clipfp8.quant.train.data import TrainDataError, load_mosaics, save_mosaics
from clipfp8.quant.train.model import TrainableParts, default_model_cfg, project_text_weights
from clipfp8.quant.train.textfeats import compress_features, expand_features, fit_text_basis
from clipfp8.quant.train.train import GpuBatcher, TrainConfig, multi_positive_loss, padded_captions

TINY_VISION = {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16, "mlp_ratio": 2.0}


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_loss_with_distinct_photo_groups_is_the_plain_clip_loss() -> None:
    img, txt, scale = _unit(6, 8, 0), _unit(6, 8, 1), torch.tensor(2.0)
    logits = scale.exp() * img @ txt.T
    target = torch.arange(6)
    clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(multi_positive_loss(img, txt, torch.tensor([10, 11, 12, 13, 14, 15]), scale), clip)


def test_only_the_same_photo_is_a_positive() -> None:
    """Samples 0 and 1 are two different photos, samples 2 and 3 one photo drawn twice (two of its
    captions): photo 0's and photo 1's targets stay on their own caption; 2 and 3 share theirs."""
    img, txt, scale = _unit(4, 8, 2), _unit(4, 8, 3), torch.tensor(1.0)
    groups = torch.tensor([7, 8, 9, 9])
    logits = scale.exp() * img @ txt.T
    pos = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, .5, .5], [0, 0, .5, .5]])
    expected = (-(pos * logits.log_softmax(1)).sum(1).mean() - (pos * logits.log_softmax(0)).sum(0).mean()) / 2
    torch.testing.assert_close(multi_positive_loss(img, txt, groups, scale), expected)
    merged = multi_positive_loss(img, txt, torch.tensor([7, 7, 9, 9]), scale)  # photos 0 and 1 as one group
    assert not torch.isclose(merged, expected)


def test_padded_captions_keeps_each_groups_own_ids() -> None:
    offsets, ids = np.array([0, 5, 6, 9]), np.array([10, 11, 12, 13, 14, 20, 30, 31, 32])
    pad, n = padded_captions(offsets, ids)
    assert n.tolist() == [5, 1, 3]
    assert pad[0].tolist() == [10, 11, 12, 13, 14] and set(pad[1].tolist()) == {20} and pad[2, :3].tolist() == [30, 31, 32]
    with pytest.raises(ValueError, match="group 1 of the pack owns no caption"):
        padded_captions(np.array([0, 2, 2]), np.array([1, 2]))


def _fake_pack(n_photo: int = 6) -> tuple[dict, torch.Tensor]:
    """A pack in memory: 4 CIFAR images of one class group (3 captions), ``n_photo`` Flickr photos
    (5 captions each) and 2 webcaps photos (1 caption each); feature row i = one-hot(i)."""
    sources = ["cifar10-train", "flickr8k-train", "webcaps"]
    counts = [3] + [5] * n_photo + [1, 1]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    c = int(offsets[-1])
    pack = {"img32": np.zeros((4, 3, 32, 32), np.uint8), "group32": np.zeros(4, np.int32),
            "source32": np.zeros(4, np.int8),
            "img64": np.zeros((n_photo + 2, 3, 32, 32), np.uint8),
            "group64": np.arange(1, n_photo + 3, dtype=np.int32),
            "source64": np.array([1] * n_photo + [2, 2], np.int8),
            "cap_offsets": offsets, "cap_ids": np.arange(c, dtype=np.int32), "meta": {"sources": sources}}
    return pack, torch.eye(c)


def test_batcher_draws_each_photos_captions_uniformly_and_only_its_own() -> None:
    pack, feats = _fake_pack()
    cfg = TrainConfig(device="cpu", batch_size=40, source_weights={"cifar10-train": 0.5, "flickr8k-train": 0.25,
                                                                   "webcaps": 0.25})
    batcher = GpuBatcher(pack, feats, cfg, 32)
    assert batcher.counts == [20, 10, 10]
    offsets = pack["cap_offsets"]
    drawn: dict[int, list[int]] = {}
    for _ in range(150):
        x, f, g = batcher.next()
        assert x.shape == (40, 3, 32, 32) and torch.isfinite(x).all()
        for group, cap in zip(g.tolist(), f.argmax(1).tolist(), strict=True):
            assert offsets[group] <= cap < offsets[group + 1]  # a caption of its own group
            drawn.setdefault(group, []).append(cap - int(offsets[group]))
    for group in range(1, 7):  # every Flickr photo: all five captions, none much rarer than 1/5
        counts = np.bincount(drawn[group], minlength=5)
        assert counts.min() >= 0.5 * counts.mean(), (group, counts)
    assert set(drawn) == set(range(9))


def test_source_weights_name_sources_and_a_missing_source_is_ignored() -> None:
    pack, feats = _fake_pack()
    cfg = TrainConfig(device="cpu", batch_size=10, source_weights={"flickr8k-train": 1.0, "imagen": 3.0})
    assert GpuBatcher(pack, feats, cfg, 32).counts == [10]  # only the Flickr pool: imagen is not in the pack
    with pytest.raises(ValueError, match="no sample of a source with a positive weight"):
        GpuBatcher(pack, feats, TrainConfig(device="cpu", source_weights={"imagen": 1.0}), 32)
    with pytest.raises(ValueError, match="unknown sources"):
        TrainConfig(source_weights={"flickr30k": 1.0})
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig(vision={"depth": 3})
    cfg = TrainConfig(vision={"layers": 3})
    base = default_model_cfg()
    assert cfg.model_cfg(base)["vision_cfg"]["layers"] == 3 and base["vision_cfg"]["layers"] != 3
    assert TrainConfig().model_cfg(base) == base


def test_pca_features_and_projected_weights_give_the_trained_function() -> None:
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(200, 12, generator=gen) @ torch.randn(12, 384, generator=gen)  # rank 12
    basis = fit_text_basis(feats, 16)
    torch.testing.assert_close(basis.T @ basis, torch.eye(16), atol=1e-5, rtol=0)
    assert textfeats.energy_kept(feats, basis) > 0.9999
    q, scale = compress_features(feats, basis)
    assert q.shape == (200, 16) and q.dtype == torch.int8
    approx = expand_features(q, scale, basis)
    assert F.cosine_similarity(approx, feats).min() > 0.999
    parts = TrainableParts(default_model_cfg(TINY_VISION, embed_dim=8))
    trained = parts.text.proj.weight.detach().clone()
    project_text_weights(parts, basis)
    with torch.no_grad():
        # a feature inside the span maps exactly as in training; any feature maps as its projection did
        torch.testing.assert_close(parts.encode_text_features(approx), approx @ trained.T, atol=1e-4, rtol=1e-4)
        other = torch.randn(5, 384, generator=gen)
        torch.testing.assert_close(parts.encode_text_features(other), (other @ basis @ basis.T) @ trained.T,
                                   atol=1e-4, rtol=1e-4)
        assert not torch.allclose(other @ trained.T, parts.encode_text_features(other), atol=1e-3)


def test_caption_feature_cache_computes_each_caption_once(tmp_path: Path, monkeypatch) -> None:
    calls: list[list[str]] = []

    def fake(captions, model_cfg, batch_size=256, progress=None):  # noqa: ANN001 - the stand-in's signature
        calls.append(list(captions))
        return torch.stack([torch.full((384,), float(len(c))) for c in captions])

    monkeypatch.setattr(textfeats, "text_features", fake)
    cache, cfg = tmp_path / "cache.npz", default_model_cfg()
    first = textfeats.caption_features(["a dog", "a red kite ."], cfg, cache)
    again = textfeats.caption_features(["a red kite .", "two children", "a dog"], cfg, cache)
    assert calls == [["a dog", "a red kite ."], ["two children"]]
    torch.testing.assert_close(again[[2, 0]], first)
    assert again[1, 0] == len("two children")
    other_ctx = dict(cfg, text_cfg=dict(cfg["text_cfg"], context_length=16))  # another tokenizer length
    textfeats.caption_features(["a dog"], other_ctx, cache)
    assert calls[-1] == ["a dog"]


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_mosaics_split_at_the_formats_side_limit_and_read_back_in_order(tmp_path: Path, fmt: str) -> None:
    colours = np.random.default_rng(0).integers(0, 256, (11, 3))
    tiles = np.broadcast_to(colours[:, None, None, :], (11, 16, 16, 3)).astype(np.uint8)
    written = save_mosaics(tiles, tmp_path, "img", fmt, 95, max_side=48)  # 3x3 tiles a file
    ext = "webp" if fmt == "webp" else "jpg"
    assert list(written) == [f"img-0.{ext}", f"img-1.{ext}"] and all(b > 0 for b in written.values())
    back = load_mosaics([tmp_path / n for n in written], 11, 16)
    assert back.shape == (11, 16, 16, 3)
    centre = back[:, 4:12, 4:12].reshape(11, -1, 3).mean(1)
    assert np.abs(centre - colours).max() < 8  # every tile where it was, in order
    with pytest.raises(TrainDataError, match="fewer than the 20 16x16 tiles"):
        load_mosaics([tmp_path / n for n in written], 20, 16)


def test_train_cli_parses_source_weights_and_vision_overrides() -> None:
    from clipfp8.quant.train import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--source-weights", "webcaps=0.3", "flickr8k-train=0.2",
                              "--vision", "layers=10", "mlp_ratio=3.5", "--no-bf16"])
    assert dict(args.source_weights) == {"webcaps": 0.3, "flickr8k-train": 0.2}
    assert dict(args.vision) == {"layers": 10, "mlp_ratio": 3.5} and args.no_bf16
    for bad in (["--source-weights", "flickr30k=1"], ["--vision", "layers=ten"], ["--vision", "depth=2"]):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["train", *bad])
        assert exc.value.code == 2
