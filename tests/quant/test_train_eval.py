"""quant.train's evaluation runs on quant.eval: the carried eval pack is read with quant.eval's
dataset readers and scored with quant.eval.metrics; ``clipfp8 train-eval`` is quant.eval's evaluate."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipfp8.quant.eval.templates import DEFAULT_TEMPLATES, fill
from clipfp8.quant.train.evaluate import build_eval_pack, evaluate_pack, report_metrics
from clipfp8.quant.train.model import default_model_cfg, text_features
from clipfp8.quant.train.ship import _eval_rows

TINY_VISION = {"image_size": 64, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32, "mlp_ratio": 2.0}
#: Every image is one solid colour, unique per class (classification) or per image (retrieval).
CIFAR = {"cat": (200, 40, 40), "truck": (40, 40, 200)}
IMAGENETTE = {"n01": ("tench", (40, 200, 40)), "n02": ("church", (220, 220, 40))}
FLICKR = {"a.jpg": ("a dog runs across a green field", (200, 40, 200)),
          "b.jpg": ("two children build a sandcastle on the beach", (40, 200, 200)),
          "c.jpg": ("a man rides a bicycle down a city street", (128, 128, 128))}


def _jpeg(path: Path, colour: tuple[int, int, int], size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG", quality=95)


def make_eval_root(root: Path, per_class: int = 3) -> Path:
    """The layout of ../shared/data/eval, tiny: class folders (+ classes.json) and images/ + captions."""
    for name, colour in CIFAR.items():
        for i in range(per_class):
            _jpeg(root / "cifar10-test" / name / f"{i:04d}.jpg", colour, (32, 32))
    for wnid, (_, colour) in IMAGENETTE.items():
        for i in range(per_class):
            _jpeg(root / "imagenette-val" / wnid / f"{i:04d}.jpg", colour, (90, 70))
    (root / "imagenette-val" / "classes.json").write_text(json.dumps({k: v[0] for k, v in IMAGENETTE.items()}))
    for name, (_, colour) in FLICKR.items():
        _jpeg(root / "flickr8k-1k" / "images" / name, colour, (96, 80))
    (root / "flickr8k-1k" / "captions.json").write_text(json.dumps({k: [v[0]] for k, v in FLICKR.items()}))
    return root


class ColourOracle:
    """Stands in for ``TrainableParts``: texts keep their MiniLM features; an image's embedding is the
    MiniLM feature of the text its colour stands for. A pack whose labels, caption owners or feature
    slices were misaligned would therefore not score perfectly."""

    def __init__(self, table: list[tuple[tuple[int, int, int], torch.Tensor]]) -> None:
        self.table = table
        self.colours = torch.tensor([c for c, _ in table], dtype=torch.float32)
        self.targets = torch.stack([t for _, t in table])

    def encode_text_features(self, feats: torch.Tensor) -> torch.Tensor:
        return feats

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[-1]
        centre = x[:, :, s // 4:-s // 4, s // 4:-s // 4].float().mean(dim=(2, 3))  # (N, 3) mean colour
        return self.targets[torch.cdist(centre, self.colours).argmin(1)]


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, ColourOracle]:
    tmp = tmp_path_factory.mktemp("train_eval")
    root = make_eval_root(tmp / "eval")
    model_cfg = default_model_cfg(TINY_VISION, embed_dim=32)
    out = tmp / "pack"
    out.mkdir()
    summary = build_eval_pack(root, out, model_cfg, size=64, quality=95, n_cifar=20, n_imagenette=20, n_flickr=2)
    classes = [(CIFAR[c], [fill(t, c) for t in DEFAULT_TEMPLATES]) for c in CIFAR]
    classes += [(colour, [fill(t, name) for t in DEFAULT_TEMPLATES]) for name, colour in IMAGENETTE.values()]
    table = [(colour, text_features(prompts, model_cfg).mean(0)) for colour, prompts in classes]
    table += [(colour, text_features([caption], model_cfg)[0]) for caption, colour in FLICKR.values()]
    return out, summary, ColourOracle(table)


def test_eval_pack_takes_the_first_images_per_class_and_the_first_flickr_images(packed) -> None:
    out, summary, _ = packed
    assert {k: summary[k] for k in ("n_cifar", "n_imagenette", "n_flickr")} == \
        {"n_cifar": 4, "n_imagenette": 4, "n_flickr": 2}  # 20 // 10 = 2 of the 3 per class; 2 of 3 Flickr
    with np.load(out / "eval.npz") as z:
        assert z["cifar_labels"].tolist() == [0, 0, 1, 1] and z["imagenette_labels"].tolist() == [0, 0, 1, 1]
        assert z["flickr_owner"].tolist() == [0, 1]
        # prompts of 2 + 2 classes x 18 templates, then the 2 captions
        assert z["feats"].shape == ((2 + 2) * len(DEFAULT_TEMPLATES) + 2, 384)


def test_evaluate_pack_scores_with_quant_eval_metrics(packed) -> None:
    out, _, oracle = packed
    res = evaluate_pack(oracle, out, lambda u8: u8, "cpu")
    assert set(res) == {"cifar10-test", "imagenette-val", "flickr8k-1k"}
    for name in ("cifar10-test", "imagenette-val"):
        assert res[name]["acc1"] == 1.0 and res[name]["mean_per_class_recall"] == 1.0 and res[name]["n"] == 4
    assert res["flickr8k-1k"]["image_retrieval_recall@1"] == 1.0
    assert res["flickr8k-1k"]["text_retrieval_recall@1"] == 1.0 and res["flickr8k-1k"]["n"] == 2
    assert _eval_rows(res) == ("100.0%", "100.0%", "100.0%", "100.0%")
    # an oracle with the two CIFAR classes swapped must score 0: the labels really are checked
    table = oracle.table
    swapped = ColourOracle([(table[0][0], table[1][1]), (table[1][0], table[0][1]), *table[2:]])
    assert evaluate_pack(swapped, out, lambda u8: u8, "cpu")["cifar10-test"]["acc1"] == 0.0


def test_train_eval_is_quant_eval_on_the_shared_sets(tmp_path: Path) -> None:
    from clipfp8.app.cli import main

    root = make_eval_root(tmp_path / "eval", per_class=2)
    assert main(["train-eval", "--eval-root", str(root), "--limit", "3", "--output", str(tmp_path / "out")]) == 0
    d = json.loads((tmp_path / "out" / "results.json").read_text())
    assert d["baseline"] == "fp32" and [e["precision"] for e in d["encoders"]] == ["fp32"]
    assert {r["name"]: (r["kind"], r["n_images"]) for r in d["datasets"]} == {
        "flickr8k-1k": ("retrieval", 3), "imagenette-val": ("classification", 3), "cifar10-test": ("classification", 3)}
    metrics = report_metrics(d)
    assert metrics["cifar10-test"]["n"] == 3 and "acc1" in metrics["cifar10-test"]
    assert "image_retrieval_recall@5" in metrics["flickr8k-1k"]
    rows = _eval_rows(d)  # the model card reads results.json directly
    assert rows[0] == f"{100 * metrics['cifar10-test']['acc1']:.1f}%" and all(r.endswith("%") for r in rows)


def test_eval_pack_carries_pca_coefficients_and_webp_tiles(packed, tmp_path: Path) -> None:
    """With the training pack's PCA basis the eval copy stores coefficients (and the basis); a
    basis spanning every prompt and caption drops nothing, so the oracle still scores perfectly."""
    from clipfp8.quant.train.textfeats import fit_text_basis

    _, _, oracle = packed
    root = make_eval_root(tmp_path / "eval")
    model_cfg = default_model_cfg(TINY_VISION, embed_dim=32)
    texts = [fill(t, c) for c in CIFAR for t in DEFAULT_TEMPLATES]
    texts += [fill(t, name) for name, _ in IMAGENETTE.values() for t in DEFAULT_TEMPLATES]
    texts += [caption for caption, _ in FLICKR.values()]
    basis = fit_text_basis(text_features(texts, model_cfg), len(texts))
    out = tmp_path / "pack"
    out.mkdir()
    summary = build_eval_pack(root, out, model_cfg, size=64, quality=90, n_cifar=20, n_imagenette=20, n_flickr=2,
                              image_format="webp", cifar_quality=95, basis=basis)
    assert sorted(summary["file_bytes"]) == ["eval32.jpg", "eval64.webp"] and not (out / "eval64.jpg").exists()
    with np.load(out / "eval.npz") as z:
        assert z["feats"].shape == ((2 + 2) * len(DEFAULT_TEMPLATES) + 2, len(texts))
        np.testing.assert_allclose(z["text_basis"], basis.numpy())
    res = evaluate_pack(oracle, out, lambda u8: u8, "cpu")
    assert res["cifar10-test"]["acc1"] == res["imagenette-val"]["acc1"] == 1.0
    assert res["flickr8k-1k"]["image_retrieval_recall@1"] == res["flickr8k-1k"]["text_retrieval_recall@1"] == 1.0
