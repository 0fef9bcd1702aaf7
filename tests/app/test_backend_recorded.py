"""``serve`` builds the encoders an index recorded (model, quantized dir, batch size) without
flags, labels the CPU's fp32 reference "FP32 (CPU baseline)", and says why."""
from __future__ import annotations

from pathlib import Path

import pytest

from clipfp8.app import backend
from clipfp8.indexing.errors import EncoderMismatchError
from clipfp8.quant.core.config import EncoderSpec, ModelSpec
from tests.fakes import FakeEncoder

STATS = {"encoders": {"default-fp16": {"precision": "fp16", "model_id": "default"},
                      "default-fp32": {"precision": "fp32", "model_id": "default"},
                      "default-fp8-fake": {"precision": "fp8-fake", "model_id": "default"}}}


def _factory(made: list[EncoderSpec]):
    def factory(spec: EncoderSpec) -> FakeEncoder:
        made.append(spec)
        return FakeEncoder(precision=spec.precision)
    return factory


def test_serve_uses_the_recorded_quantized_dir_and_the_cpu_baseline(tmp_path: Path):
    q = tmp_path / "q"
    q.mkdir()
    specs = {"default-fp8-fake": EncoderSpec(precision="fp8-fake", quantized=q, batch_size=16).to_record()}
    made: list[EncoderSpec] = []
    encs = backend.encoders_for_index(STATS, None, "cpu", None, None, factory=_factory(made), specs=specs)
    assert list(encs) == [backend.CPU_BASELINE_LABEL, "FP8"] == ["FP32 (CPU baseline)", "FP8"]
    assert [(s.precision, s.quantized, s.batch_size) for s in made] == [("fp32", None, 64), ("fp8-fake", q, 16)]
    made.clear()  # an explicit reference precision and batch size win
    encs = backend.encoders_for_index(STATS, None, "cpu", None, 8, factory=_factory(made), specs=specs,
                                      precision="fp16")
    assert list(encs) == ["FP16", "FP8"] and [s.batch_size for s in made] == [8, 8]


def test_serve_without_a_recorded_or_given_quantized_dir_serves_the_baseline_only():
    made: list[EncoderSpec] = []
    encs = backend.encoders_for_index(STATS, None, "cpu", None, None, factory=_factory(made), specs={})
    assert list(encs) == [backend.CPU_BASELINE_LABEL]


def test_serve_refuses_a_model_other_than_the_indexs():
    with pytest.raises(EncoderMismatchError, match="--model"):
        backend.encoders_for_index(STATS, ModelSpec(name="ViT-B-32", pretrained="openai"), "cpu", None,
                                   factory=_factory([]))


def test_open_context_notes_the_cpu_baseline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from clipfp8.indexing import index_corpus
    from tests.app.helpers import make_corpus

    corpus = make_corpus(tmp_path / "c", per_colour=1)
    ref, fp8 = FakeEncoder(precision="fp32"), FakeEncoder(precision="fp8-fake", noise=0.1)
    index_corpus(corpus, tmp_path / "idx", [ref, fp8], workers=1)
    ctx = backend.open_context(tmp_path / "idx", encoders={backend.CPU_BASELINE_LABEL: ref, "FP8": fp8})
    assert ctx.device_note.startswith(backend.CPU_BASELINE_NOTE_MD) and backend.CPU_FP8_NOTE in ctx.device_note
