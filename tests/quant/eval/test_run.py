"""``evaluate`` end to end with purpose-built fake encoders whose answers are known."""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clipfp8.quant.core.encoder import Encoder, EncoderIdentity
from clipfp8.quant.eval import DatasetSpec, EvalReport, evaluate, load_dataset
from tests.quant.eval.conftest import COLOURS

ORDER = list(COLOURS)  # red, green, blue, yellow, white, black


class OneHotColourEncoder(Encoder):
    """Images embed as the one-hot of their (nearest) colour, texts as the one-hot of the first
    colour word they contain: a perfect encoder. ``perm`` maps image colours to wrong slots."""

    def __init__(self, name: str = "onehot", perm: Sequence[int] | None = None) -> None:
        self.name, self.precision, self.device, self.dim = name, "fp32", "cpu", len(ORDER)
        self.image_size = (4, 4)
        self.perm = list(perm) if perm is not None else list(range(len(ORDER)))
        self.calls = {"images": 0, "texts": 0}

    def preprocess(self, image: Any) -> torch.Tensor:
        arr = np.asarray(image.convert("RGB").resize(self.image_size), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def identity(self) -> EncoderIdentity:
        return EncoderIdentity(self.name, self.precision, "fake", "0", self.dim)

    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        self.calls["images"] += len(images)
        rgb = images.mean(dim=(2, 3)).numpy()
        table = np.array([COLOURS[c] for c in ORDER], np.float32) / 255.0
        nearest = np.argmin(((rgb[:, None, :] - table[None]) ** 2).sum(-1), axis=1)
        return np.eye(self.dim, dtype=np.float32)[[self.perm[i] for i in nearest]]

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.calls["texts"] += len(texts)
        out = np.full((len(texts), self.dim), 1 / math.sqrt(self.dim), np.float32)
        for i, t in enumerate(texts):
            hits = [j for j, c in enumerate(ORDER) if c in t]
            if hits:
                out[i] = np.eye(self.dim, dtype=np.float32)[hits[0]]
        return out


SHUFFLE = [1, 2, 0, 4, 5, 3]  # a derangement: every colour lands on another


def test_perfect_and_shuffled_encoders_on_classification(colour_classes):
    good, bad = OneHotColourEncoder("good"), OneHotColourEncoder("bad", perm=SHUFFLE)
    report = evaluate([good, bad], [DatasetSpec(colour_classes)], batch_size=3)
    r = report.result("colours")
    assert r.kind == "classification" and r.n_images == 10 and r.n_texts == 4 * 18
    assert r.metrics["good"]["acc1"] == 1.0 and r.metrics["good"]["mean_per_class_recall"] == 1.0
    assert r.metrics["bad"]["acc1"] == 0.0 and report.delta("colours", "acc1", "bad") == -1.0
    assert math.isnan(r.metrics["good"]["acc5"])  # 4 classes < 5, as in CLIP_benchmark
    assert r.agreement["bad"]["top1_agreement"] == 0.0
    assert r.agreement["bad"]["image_cosine"] == 0.0 and r.agreement["bad"]["text_cosine"] == pytest.approx(1.0)
    # every image embedded exactly once per encoder, and every prompt once
    assert good.calls == bad.calls == {"images": 10, "texts": 72}


def test_perfect_encoder_on_retrieval_with_several_captions(colour_captions):
    good = OneHotColourEncoder("good")
    report = evaluate([good, OneHotColourEncoder("good")], [DatasetSpec(colour_captions)], batch_size=2)
    r = report.result("captioned")
    assert r.kind == "retrieval" and r.n_texts == 9 and report.labels == ["good", "good#2"]
    assert set(r.metrics["good"].values()) == {1.0}
    assert r.metrics["good"] == r.metrics["good#2"]
    agree = r.agreement["good#2"]
    assert agree["image_cosine"] == pytest.approx(1.0) and agree["t2i_overlap@10"] == 1.0
    assert agree["score_spearman"] == pytest.approx(1.0)


def test_shuffled_retrieval_matches_hand_count(colour_captions):
    # Images map to slots SHUFFLE[colour]; captions keep their colour. Ties rank by image index
    # (blue, green, red, white, yellow). Caption colour c finds the image whose slot is c first.
    bad = OneHotColourEncoder("bad", perm=SHUFFLE)
    r = evaluate([bad], [DatasetSpec(colour_captions)]).result("captioned")
    assert r.metrics["bad"]["image_retrieval_recall@1"] == 0.0
    assert r.metrics["bad"]["image_retrieval_recall@5"] == 1.0  # 5 images: everything is in the top 5


def test_report_json_csv_roundtrip(tmp_path, colour_classes, colour_captions):
    report = evaluate([OneHotColourEncoder("a"), OneHotColourEncoder("b", perm=SHUFFLE)],
                      [DatasetSpec(colour_classes), DatasetSpec(colour_captions)])
    json_path, csv_path = report.write(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.csv", "results.json"]
    d = json.loads(json_path.read_text())
    assert d["baseline"] == "a" and [x["label"] for x in d["encoders"]] == ["a", "b"]
    assert d["datasets"][0]["metrics"]["a"]["acc5"] is None  # NaN written as null
    back = EvalReport.from_dict(d)
    assert back.result("captioned").metrics == report.result("captioned").metrics
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert len(rows) == len(report.rows())
    row = next(x for x in rows if x["dataset"] == "colours" and x["metric"] == "acc1" and x["encoder"] == "b")
    assert float(row["value"]) == 0.0 and float(row["delta_vs_baseline"]) == -1.0
    table = report.format_table()
    assert "| acc1 | 100.00 | 0.00 | -100.00 |" in table and "Δ b" in table


def test_loaded_data_custom_templates_and_limit(colour_classes):
    enc = OneHotColourEncoder()
    data = load_dataset(DatasetSpec(colour_classes, limit=4, seed=0))
    report = evaluate([enc], [data], templates=["{} things", "the colour {c}"])
    assert report.result("colours").n_images == 4 and report.result("colours").n_texts == 8
    assert enc.calls == {"images": 4, "texts": 8}
    assert report.settings["templates"] == ["{} things", "the colour {c}"]


def test_argument_errors(colour_classes):
    with pytest.raises(ValueError, match="at least one encoder"):
        evaluate([], [DatasetSpec(colour_classes)])
    with pytest.raises(ValueError, match="unique"):
        evaluate([OneHotColourEncoder(), OneHotColourEncoder()], [DatasetSpec(colour_classes)], labels=["x", "x"])

    class Broken(OneHotColourEncoder):
        def encode_images(self, images: torch.Tensor) -> np.ndarray:
            return np.zeros((1, self.dim), np.float32)

    with pytest.raises(ValueError, match="broken.*encode_images"):
        evaluate([Broken("broken")], [DatasetSpec(colour_classes)], batch_size=4)


SHARED = Path(__file__).resolve().parents[3].joinpath("..", "shared", "data", "eval")


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data/eval is absent")
def test_shared_datasets_load_as_documented():
    from clipfp8.quant.eval.cli import preset_datasets

    specs = [DatasetSpec.parse(s, limit=5) for s in preset_datasets("shared", SHARED)]
    flickr, imagenette, cifar = (load_dataset(s) for s in specs)
    assert flickr.kind == "retrieval" and len(flickr.images) == 5 and all(len(c) >= 1 for c in flickr.captions)
    assert imagenette.kind == "classification" and "tench" in imagenette.classnames
    assert len(imagenette.classnames) == 10
    assert sorted(cifar.classnames) == cifar.classnames and "airplane" in cifar.classnames


@pytest.mark.parametrize("workers", [0, 2])
def test_threaded_decoding_gives_the_same_report_and_names_bad_images(tmp_path, colour_classes, workers):
    base = evaluate([OneHotColourEncoder("a")], [DatasetSpec(colour_classes)], batch_size=3)
    again = evaluate([OneHotColourEncoder("a")], [DatasetSpec(colour_classes)], batch_size=3, workers=workers)
    assert again.result("colours").metrics["a"]["acc1"] == 1.0  # images still match their labels' order
    assert again.result("colours").metrics["a"] == pytest.approx(base.result("colours").metrics["a"], nan_ok=True)
    (colour_classes / "red" / "001.png").write_bytes(b"truncated")
    from clipfp8.quant.core.errors import DatasetError

    with pytest.raises(DatasetError, match=r"red/001\.png"):
        evaluate([OneHotColourEncoder()], [DatasetSpec(colour_classes)], batch_size=2, workers=workers)
