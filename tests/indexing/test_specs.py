"""Recorded encoder specs: ``index`` stores how each encoder was built, ``search``/``serve``/
``verify --repair`` rebuild it without --model/--quantized, explicit flags must match, and the
precision ``auto`` picks the baseline (fp32 on the CPU)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from clipfp8.indexing.errors import EncoderMismatchError, EncoderSpecError, UnknownEncoderError
from clipfp8.indexing.specs import SpecOverrides, choose_encoder, resolve_precision, spec_for_encoder
from clipfp8.quant.core.config import CPU_BASELINE_NOTE, EncoderSpec, ModelSpec
from tests.fakes import FakeEncoder

ROWS = {"default-fp16": {"precision": "fp16", "model_id": "default"},
        "default-fp32": {"precision": "fp32", "model_id": "default"},
        "default-fp8-fake": {"precision": "fp8-fake", "model_id": "default"}}


def test_auto_picks_the_devices_baseline_then_any_baseline_then_the_first():
    assert choose_encoder(ROWS, "auto", "cpu") == "default-fp32"
    assert choose_encoder(ROWS, "auto", "cuda") == "default-fp16"
    only16 = {k: v for k, v in ROWS.items() if k != "default-fp32"}
    assert choose_encoder(only16, "auto", "cpu") == "default-fp16"
    assert choose_encoder({"default-fp8-fake": ROWS["default-fp8-fake"]}, "auto", "cpu") == "default-fp8-fake"
    assert choose_encoder(ROWS, "fp8-fake", "cpu") == "default-fp8-fake"


def test_choose_encoder_names_the_index_encoders_when_none_or_several_match():
    with pytest.raises(UnknownEncoderError, match="default-fp16"):
        choose_encoder(ROWS, "bf16", "cpu")
    two = {"a-fp16": {"precision": "fp16"}, "b-fp16": {"precision": "fp16"}}
    with pytest.raises(UnknownEncoderError, match="several"):
        choose_encoder(two, "fp16", "cpu")
    assert choose_encoder(two, "fp16", "cpu", model="b") == "b-fp16"
    with pytest.raises(UnknownEncoderError, match="no encoders"):
        choose_encoder({}, "auto", "cpu")


def test_spec_record_round_trip_keeps_an_absolute_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = EncoderSpec(ModelSpec(name="ViT-B-32", checkpoint=Path("w.safetensors")), precision="fp8-fake",
                       quantized=Path("q"), batch_size=8, device="cpu")
    rec = spec.to_record()
    assert rec["model"]["checkpoint"] == str(tmp_path / "w.safetensors") and rec["quantized"] == str(tmp_path / "q")
    back = EncoderSpec.from_record(rec, device="cpu")
    assert (back.precision, back.batch_size, back.quantized) == ("fp8-fake", 8, tmp_path / "q")
    assert back.model.model_id() == spec.model.model_id()
    with pytest.raises(ValueError, match="incomplete"):
        EncoderSpec.from_record({"precision": "fp32"})


def test_spec_for_encoder_uses_the_record_and_checks_given_flags(tmp_path):
    q = tmp_path / "q"
    q.mkdir()
    rec = EncoderSpec(precision="fp8-fake", quantized=q, batch_size=16).to_record()
    spec = spec_for_encoder("default-fp8-fake", ROWS["default-fp8-fake"], rec, SpecOverrides(device="cpu"))
    assert (spec.quantized, spec.batch_size, spec.model.is_default, spec.device) == (q, 16, True, "cpu")
    spec = spec_for_encoder("default-fp8-fake", ROWS["default-fp8-fake"], rec,
                            SpecOverrides(batch_size=4, text_only=True))
    assert spec.batch_size == 4 and spec.text_only
    with pytest.raises(EncoderMismatchError, match="--model"):
        spec_for_encoder("default-fp16", ROWS["default-fp16"], None,
                         SpecOverrides(model=ModelSpec(name="ViT-B-32", pretrained="openai")))
    q.rmdir()
    with pytest.raises(EncoderSpecError, match="--quantized DIR where it is now"):
        spec_for_encoder("default-fp8-fake", ROWS["default-fp8-fake"], rec, SpecOverrides())
    with pytest.raises(EncoderSpecError, match="--quantized DIR"):
        spec_for_encoder("default-fp8-fake", ROWS["default-fp8-fake"], None, SpecOverrides())
    other = {"precision": "fp16", "model_id": "ViT-B-32/openai"}
    with pytest.raises(EncoderSpecError, match="pass --model"):
        spec_for_encoder("ViT-B-32-fp16", other, None, SpecOverrides())


def test_auto_precision_is_fp32_on_the_cpu_and_says_why(caplog):
    with caplog.at_level(logging.INFO, logger="clipfp8.indexing.specs"):
        assert resolve_precision("auto", "cpu") == "fp32"
    assert CPU_BASELINE_NOTE in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clipfp8.indexing.specs"):
        assert resolve_precision("fp16", "cpu") == "fp16"  # explicit fp16 still runs, with a warning
    assert any(r.levelno == logging.WARNING and "slower than fp32" in r.message for r in caplog.records)


def test_the_index_records_each_encoders_spec(corpus, tmp_path):
    from clipfp8.indexing import index_corpus, open_index

    enc, plain = FakeEncoder(), FakeEncoder(precision="fp8-fake", noise=0.05)
    enc.spec = EncoderSpec(precision="fp16", batch_size=8)
    index_corpus(corpus, tmp_path / "idx", [enc, plain], workers=1)
    with open_index(tmp_path / "idx") as store:
        assert store.recorded_spec(enc.name) == enc.spec.to_record()
        assert store.recorded_spec(plain.name) is None  # an encoder not made by create_encoder
    enc.spec = EncoderSpec(precision="fp16", batch_size=32)  # the same encoder, re-run: latest spec wins
    index_corpus(corpus, tmp_path / "idx", [enc, plain], workers=1)
    with open_index(tmp_path / "idx") as store:
        assert store.recorded_spec(enc.name)["batch_size"] == 32
