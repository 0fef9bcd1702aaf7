"""The CLI over the real default model: ``index`` records how it built each encoder, and
``search``/``verify --repair`` reuse that without --model/--quantized; a cold ``search`` imports
only what its path needs (no modelopt/onnx/gradio/matplotlib; for a text query on the default
model, no open_clip/transformers either, and for an image query no transformers; for an
open_clip model, open_clip without transformers, timm or torch._dynamo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipfp8.app.cli import EXIT_BAD_INPUT, main
from clipfp8.indexing.store import open_index
from tests.indexing.conftest import make_corpus
from tests.indexing.test_verify_export import _damage

#: Never on the search path (they cost seconds to import and nothing there uses them).
HEAVY = ("modelopt", "onnx", "gradio", "matplotlib")

SEARCH_THEN_LIST_MODULES = """
import json, sys
from clipfp8.app.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "modules": sorted(m for m in %r if m in sys.modules)}))
"""


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A 6-image corpus indexed with the default model at `--precision auto` (fp32 on the CPU)."""
    tmp = tmp_path_factory.mktemp("recorded")
    corpus, idx, summary = tmp / "corpus", tmp / "idx", tmp / "summary.json"
    make_corpus(corpus, 6)
    assert main(["index", str(corpus), "--index-dir", str(idx), "--device", "cpu", "--no-progress",
                 "--batch-size", "4", "--workers", "1", "--summary-json", str(summary)]) == 0
    return corpus, idx, json.loads(summary.read_text())


def test_index_auto_is_fp32_on_the_cpu_and_records_its_spec(indexed):
    _, idx, summary = indexed
    assert summary["indexed"] == 6 and summary["decoder"] == "cpu" and summary["images_per_second"] > 0
    with open_index(idx) as store:
        assert store.encoder_names() == ["default-fp32"]
        rec = store.recorded_spec("default-fp32")
    assert rec == {"model": {"name": "default", "pretrained": None, "checkpoint": None, "config": None},
                   "precision": "fp32", "quantized": None, "batch_size": 4}


def test_search_needs_no_model_flags_and_refuses_another_model(indexed, capsys):
    corpus, idx, _ = indexed
    image = sorted(corpus.rglob("*.png"))[3]
    assert main(["search", "--index-dir", str(idx), "--image", str(image), "-k", "1", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.split("\t")[1].strip() == str(image.relative_to(corpus))  # finds itself
    assert main(["search", "--index-dir", str(idx), "--text", "a photo", "-k", "2", "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    rc = main(["search", "--index-dir", str(idx), "--text", "a photo", "--model", "ViT-B-32", "--random-init"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and "--model" in err and "'default'" in err


def test_verify_repair_re_embeds_with_the_recorded_encoder(indexed, capsys):
    _, idx, _ = indexed
    _damage(idx, "default-fp32", remove=[2])
    assert main(["verify", "--index-dir", str(idx), "--repair", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "index consistent" in out and "re-embedded 1 image(s)" in out


def _search_modules(args: list[str], watch: tuple[str, ...], fake: bool = False) -> dict:
    env = dict(os.environ, CLIPFP8_TEST_FAKE_ENCODER="1" if fake else "0")
    out = subprocess.run([sys.executable, "-c", SEARCH_THEN_LIST_MODULES % (watch,), *args], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cold_search_imports_only_its_path(indexed, tmp_path):
    from clipfp8.indexing import index_corpus
    from tests.indexing.conftest import encoders

    corpus, idx, _ = indexed
    got = _search_modules(["search", "--index-dir", str(idx), "--text", "a photo", "--device", "cpu"],
                          HEAVY + ("open_clip", "transformers", "torchvision"))
    assert got == {"rc": 0, "modules": []}
    image = str(sorted(corpus.rglob("*.png"))[0])  # an image query builds only the image tower
    got = _search_modules(["search", "--index-dir", str(idx), "--image", image, "--device", "cpu"],
                          HEAVY + ("transformers", "timm", "torch._dynamo"))
    assert got == {"rc": 0, "modules": []}
    index_corpus(corpus, tmp_path / "fake", encoders(), workers=1)  # the FakeEncoder test hook
    got = _search_modules(["search", "--index-dir", str(tmp_path / "fake"), "--precision", "fake", "--text", "red"],
                          HEAVY, fake=True)
    assert got == {"rc": 0, "modules": []}


def test_cold_open_clip_search_leaves_out_what_its_model_does_not_use(tmp_path):
    from clipfp8.indexing import index_corpus
    from clipfp8.quant.core.config import EncoderSpec, ModelSpec
    from clipfp8.quant.core.encoder import create_encoder
    from clipfp8.quant.core.models import tiny_config

    corpus, idx = tmp_path / "corpus", tmp_path / "idx"
    make_corpus(corpus, 3)
    torch.manual_seed(0)  # a config model has random weights: the search process draws the same
    encoder = create_encoder(EncoderSpec(model=ModelSpec(config=tiny_config()), precision="fp32", device="cpu"))
    index_corpus(corpus, idx, [encoder], workers=1)
    seeded = ("import torch; torch.manual_seed(0)\n" + SEARCH_THEN_LIST_MODULES +
              "from clipfp8.quant.core.deferred_import import is_deferred\n"
              "print(json.dumps([is_deferred('torchvision.ops'), is_deferred('torchvision.models')]))\n")
    watch = HEAVY + ("open_clip", "transformers", "timm", "torch._dynamo", "torchvision.models")
    out = subprocess.run([sys.executable, "-c", seeded % (watch,), "search", "--index-dir", str(idx), "--text",
                          "a photo", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    # torchvision.models is there only as the deferred module, its __init__ not run (no _dynamo).
    assert json.loads(lines[-2]) == {"rc": 0, "modules": ["open_clip", "torchvision.models"]}
    assert json.loads(lines[-1]) == [True, True]  # ops and models: __init__ still pending
    assert len(lines) == 5  # the three images, then the module list and the deferred states
