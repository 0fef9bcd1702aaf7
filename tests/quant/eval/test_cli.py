"""``clipfp8 evaluate`` end to end on a tiny random open_clip model (clipfp8.quant.core.models.tiny_config)."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

import clipfp8.quant.core.models
from clipfp8.quant.core.config import ModelSpec
from clipfp8.quant.eval import cli as eval_cli


@pytest.fixture
def tiny_model(monkeypatch):
    """``load_model`` returns the same tiny random model (seeded) whatever the spec."""
    real = clipfp8.quant.core.models.load_model
    built: list[ModelSpec] = []

    def fake_load_model(spec=None):
        built.append(spec)
        torch.manual_seed(0)
        return real(ModelSpec(name="tiny", config=clipfp8.quant.core.models.tiny_config(embed_dim=16, image_size=32)))

    # quant.checkpoint binds load_model when first imported: first imported under the patch, it
    # would keep the fake after this test (later tests then load every quantized dir as this
    # 16-d model). Import it before patching and patch its binding too: teardown restores both.
    from clipfp8.quant import checkpoint

    monkeypatch.setattr(clipfp8.quant.core.models, "load_model", fake_load_model)
    monkeypatch.setattr(checkpoint, "load_model", fake_load_model)
    return built


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="clipfp8")
    eval_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_evaluate_cli_tiny_model(tmp_path, tiny_model, colour_classes, colour_captions, capsys):
    out = tmp_path / "out"
    rc = run(["evaluate", "--dataset", str(colour_classes), "--dataset", f"{colour_captions}:retrieval",
              "--precision", "fp32", "bf16", "fp32", "--device", "cpu", "--batch-size", "4",
              "--output", str(out), "--no-progress"])
    assert rc == 0 and len(tiny_model) == 3  # one model per encoder
    d = json.loads((out / "results.json").read_text())
    assert d["baseline"] == "fp32" and [e["label"] for e in d["encoders"]] == ["fp32", "bf16", "fp32#2"]
    assert [e["precision"] for e in d["encoders"]] == ["fp32", "bf16", "fp32"]
    colours, captioned = d["datasets"]
    assert (colours["kind"], colours["n_images"], captioned["kind"], captioned["n_texts"]) == \
        ("classification", 10, "retrieval", 9)
    # The same model at the same precision reproduces the baseline exactly ...
    assert colours["metrics"]["fp32#2"] == colours["metrics"]["fp32"]
    assert captioned["agreement"]["fp32#2"]["image_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert captioned["agreement"]["fp32#2"]["t2i_overlap@10"] == 1.0
    # ... while bf16 is close but not bit-identical.
    bf16 = colours["agreement"]["bf16"]
    assert 0.98 < bf16["image_cosine"] < 1.0 and 0.9 < bf16["score_spearman"] <= 1.0
    for r in (colours, captioned):
        for metrics in r["metrics"].values():
            assert all(v is None or 0.0 <= v <= 1.0 for v in metrics.values())
    printed = capsys.readouterr().out
    assert "**colours** (classification, 10 images, 72 texts)" in printed and "Δ bf16" in printed
    assert (out / "results.csv").read_text().startswith("dataset,kind,section,metric,encoder,value")


def test_evaluate_cli_limit_and_templates(tmp_path, tiny_model, colour_classes):
    tmpl = tmp_path / "t.txt"
    tmpl.write_text("a {} square\n")
    out = tmp_path / "o"
    assert run(["evaluate", "--dataset", str(colour_classes), "--precision", "fp32", "--device", "cpu",
                "--limit", "3", "--templates", str(tmpl), "--output", str(out)]) == 0
    d = json.loads((out / "results.json").read_text())
    assert d["datasets"][0]["n_images"] == 3 and d["datasets"][0]["n_texts"] == 4
    assert d["settings"]["templates"] == ["a {} square"]


def test_evaluate_cli_errors_through_clipfp8(tmp_path, tiny_model, colour_classes, capsys):
    from clipfp8.app.cli import EXIT_BAD_INPUT, EXIT_USAGE, main

    assert main(["evaluate", "--dataset", str(tmp_path / "nope"), "--device", "cpu"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "clipfp8 evaluate: error:" in err and str(tmp_path / "nope") in err and not tiny_model
    assert main(["evaluate", "--dataset", str(colour_classes), "--precision", "fp16", "fp8-fake",
                 "--device", "cpu"]) == EXIT_USAGE
    assert "--quantized" in capsys.readouterr().err
    assert main(["evaluate", "--device", "cpu"]) == EXIT_USAGE
    assert "--preset" in capsys.readouterr().err


def _quantized_dir(path, towers: tuple[str, ...]):
    """A tiny model, seeded like ``tiny_model``, FP8-quantized and saved to ``path``."""
    from clipfp8.quant import checkpoint, ptq

    torch.manual_seed(0)
    config = clipfp8.quant.core.models.tiny_config(embed_dim=16, image_size=32)
    loaded = clipfp8.quant.core.models.load_model(ModelSpec(name="tiny", config=config))
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(8, 3, 32, 32, generator=gen), loaded.tokenizer([f"a photo of thing {i}" for i in range(8)]))
             for _ in range(2)]
    qcfg = ptq.QuantConfig(towers=towers)
    ptq.quantize(loaded, calib, qcfg)
    return checkpoint.save_quantized(loaded, path, qcfg)


def test_evaluate_cli_fp8_fake_several_quantized_dirs(tmp_path, tiny_model, colour_captions):
    q_all = _quantized_dir(tmp_path / "q-all", ("image", "text"))
    q_text = _quantized_dir(tmp_path / "q-textonly", ("text",))
    out = tmp_path / "out"
    # The same model as the quantized dirs ("config:tiny"): a mismatch is refused (test below).
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(clipfp8.quant.core.models.tiny_config(embed_dim=16, image_size=32)))
    assert run(["evaluate", "--dataset", str(colour_captions), "--precision", "fp32", "fp8-fake",
                "--model", str(cfg), "--quantized", str(q_all), str(q_text), "--device", "cpu",
                "--output", str(out), "--no-progress"]) == 0
    d = json.loads((out / "results.json").read_text())
    assert [e["label"] for e in d["encoders"]] == ["fp32", "fp8-fake:q-all", "fp8-fake:q-textonly"]
    agree = d["datasets"][0]["agreement"]
    full, text_only = agree["fp8-fake:q-all"], agree["fp8-fake:q-textonly"]
    # FP8 perturbs embeddings a little; quantizing only the text tower leaves images (almost) fp32.
    assert 0.9 < full["image_cosine"] < text_only["image_cosine"]
    assert text_only["image_cosine"] > 0.99999 and full["text_cosine"] < 1.0
    manifest = json.loads((q_all / "manifest.json").read_text())
    assert d["encoders"][1]["checksum"] == manifest["checksum"] and d["encoders"][1]["precision"] == "fp8-fake"


def test_evaluate_refuses_fp8_of_another_model(tmp_path, colour_captions, capsys):
    """FP8 quantized from one model must not be compared with the FP16 of another (the default)."""
    from clipfp8.app.cli import main

    q = _quantized_dir(tmp_path / "q", ("image", "text"))
    rc = main(["evaluate", "--dataset", str(colour_captions), "--precision", "fp8-fake", "--quantized", str(q),
               "--device", "cpu", "--no-progress"])
    assert rc == 3  # bad input: the two models differ
    err = capsys.readouterr().err
    assert "config:tiny" in err and "'default'" in err
