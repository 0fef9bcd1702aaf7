"""The demo pipeline's steps with a tiny model and injected FakeEncoders; the bundled samples."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from clipfp8.app import demo as D
from clipfp8.app.backend import fake_encoders
from clipfp8.quant.core.config import ModelSpec
from clipfp8.quant.core.models import load_model, tiny_config
from tests.app.helpers import make_corpus

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"


def test_bundled_samples_are_small_captioned_jpegs_with_a_licence():
    caps = json.loads((SAMPLES / "captions.json").read_text())
    files = sorted(p.relative_to(SAMPLES).as_posix() for p in SAMPLES.rglob("*.jpg"))
    assert sorted(caps) == files and 150 <= len(files) <= 260
    assert all(len(v) == 1 and v[0].strip() for v in caps.values())
    assert len({f.split("/")[0] for f in files}) >= 10  # spread over categories
    assert sum(p.stat().st_size for p in SAMPLES.rglob("*")) < 3 * 2**20
    assert "public domain" in (SAMPLES / "LICENSE.md").read_text().lower()
    with Image.open(SAMPLES / files[0]) as im:
        assert im.format == "JPEG" and max(im.size) <= 128


def test_bundled_samples_hold_no_picture_twice():
    import hashlib

    by_hash: dict[str, list[str]] = {}
    for p in sorted(SAMPLES.rglob("*.jpg")):
        by_hash.setdefault(hashlib.sha256(p.read_bytes()).hexdigest(), []).append(p.relative_to(SAMPLES).as_posix())
    assert [v for v in by_hash.values() if len(v) > 1] == []


def test_the_search_placeholder_names_captions_of_the_bundled_samples():
    from clipfp8.app.search import placeholder_text

    caps = [c for cs in json.loads((SAMPLES / "captions.json").read_text()).values() for c in cs]
    text = placeholder_text(caps, [])
    words = text.removeprefix("e.g. ").split(" — ")[0].replace(" or ", ", ").split(", ")
    assert len(words) == 3 and all(w in caps for w in words), text


def test_clean_title_drops_numbers_and_short_names():
    from clipfp8.app.samples import clean_title

    assert clean_title("home13") == "home"
    assert clean_title("sun02") is None  # 3 letters: too little to be a caption
    assert clean_title("Glace_italienne-jean") == "glace italienne jean"
    assert clean_title("12 34") is None


def test_demo_config_validates(tmp_path):
    with pytest.raises(NotADirectoryError):
        D.DemoConfig(work_dir=tmp_path, corpus=tmp_path / "missing")
    with pytest.raises(ValueError, match="calib_samples"):
        D.DemoConfig(work_dir=tmp_path, corpus=tmp_path, calib_samples=0)
    cfg = D.DemoConfig(work_dir=tmp_path / "w", corpus=tmp_path)
    assert cfg.quantized_dir.parent == cfg.index_dir.parent == tmp_path / "w"


def test_calib_batches_pair_images_with_their_captions(tmp_path):
    corpus = make_corpus(tmp_path / "c", per_colour=2)
    loaded = load_model(ModelSpec(name="tiny", config=tiny_config()))
    pairs = D.calib_pairs(corpus, 5)
    assert len(pairs) == 5 and len({p.parent.name for p, _ in pairs}) >= 3  # spread, not one folder
    caps = json.loads((corpus / "captions.json").read_text())
    assert all(c == caps[p.relative_to(corpus).as_posix()][0] for p, c in pairs)
    batches = D.calib_batches(loaded, corpus, 5, batch_size=2)
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0][0].shape[1:] == (3, *loaded.image_size) and batches[0][1].shape[0] == 2


def test_quantize_step_is_cached_by_weights_checksum(tmp_path, monkeypatch):
    corpus = make_corpus(tmp_path / "c", per_colour=1)
    cfg = D.DemoConfig(work_dir=tmp_path / "w", corpus=corpus, model=ModelSpec(name="tiny", config=tiny_config()),
                       calib_samples=6, batch_size=3, device="cpu")
    import torch

    torch.manual_seed(0)  # the tiny config model has random weights: fix them so the checksum repeats
    out = D.quantize_step(cfg)
    assert out == cfg.quantized_dir and (out / D.STAMP_FILE).is_file()
    import clipfp8.quant.ptq
    def boom(*a, **k):
        raise AssertionError("re-quantized although the cache matches")

    monkeypatch.setattr(clipfp8.quant.ptq, "quantize", boom)
    torch.manual_seed(0)
    assert D.quantize_step(cfg) == out
    assert not list(cfg.work_dir.glob(".quantized-*"))  # no temp dir left behind
    encs = D.demo_encoders(cfg, out)
    assert {k: e.precision for k, e in encs.items()} == {"FP32 (CPU baseline)": "fp32", "FP8": "fp8-fake"}
    emb = encs["FP8"].encode_texts(["a red square", "a cat"])
    assert emb.shape == (2, encs["FP8"].dim) and abs(float((emb ** 2).sum(1).mean()) - 1.0) < 1e-3


def test_prepare_demo_indexes_the_corpus_with_injected_encoders(tmp_path):
    from clipfp8.indexing import open_index

    corpus = make_corpus(tmp_path / "c", per_colour=2)
    cfg = D.DemoConfig(work_dir=tmp_path / "w", corpus=corpus)
    encs = fake_encoders()
    seen = []
    index_dir, got = D.prepare_demo(cfg, encoders=encs, progress=lambda d, t: seen.append((d, t)))
    assert got is encs and index_dir == cfg.index_dir
    with open_index(index_dir) as store:
        stats = store.stats()
        assert stats["images"]["ok"] == 12
        assert sorted(store.encoder_names()) == sorted(e.name for e in encs.values())
    assert seen and seen[-1][0] == seen[-1][1]
    # a second run is incremental: nothing new to embed
    calls = encs["FP16"].calls["images"]
    D.prepare_demo(cfg, encoders=encs)
    assert encs["FP16"].calls["images"] == calls


def test_demo_pipeline_with_a_tiny_real_model(tmp_path):
    """quantize -> FP32 (the CPU baseline) + FP8-fake encoders -> index -> app search, all with a tiny
    open_clip model."""
    import torch

    import clipfp8.app.search as S
    from clipfp8.app.backend import CPU_BASELINE_LABEL, CPU_BASELINE_NOTE_MD, CPU_FP8_NOTE, open_context

    corpus = make_corpus(tmp_path / "c", per_colour=2)
    cfg = D.DemoConfig(work_dir=tmp_path / "w", corpus=corpus, model=ModelSpec(name="tiny", config=tiny_config()),
                       calib_samples=8, batch_size=4, device="cpu")
    torch.manual_seed(0)
    quantized = D.quantize_step(cfg)
    torch.manual_seed(0)  # same random base weights for the FP16 twin as the quantized model had
    encoders = D.demo_encoders(cfg, quantized)
    index_dir, _ = D.prepare_demo(cfg, encoders=encoders)
    ctx = open_context(index_dir, encoders=encoders)
    assert list(encoders) == [CPU_BASELINE_LABEL, "FP8"]  # on the CPU the 16-bit baseline runs as fp32
    assert ctx.device_note == f"{CPU_BASELINE_NOTE_MD} {CPU_FP8_NOTE}"
    target = "blue/blue_1.png"
    with Image.open(corpus / target) as im:
        res = S.search(im.convert("RGB"), ctx.encoders, ctx.index, k=3, mode="side_by_side")
    for label in (CPU_BASELINE_LABEL, "FP8"):
        top = res.results[label].items[0]
        assert top.path == target and top.score > 0.99  # an indexed image finds itself
    q16 = encoders[CPU_BASELINE_LABEL].encode_texts(["a blue square"])
    q8 = encoders["FP8"].encode_texts(["a blue square"])
    assert not torch.allclose(torch.from_numpy(q16), torch.from_numpy(q8))  # FP8 rounding is really applied
