"""The FP8 runtime model stored in an engine (``quant.runtime.runtime_state``), on the CPU with
emulated FP8 GEMMs: rebuilt from the plain model + plan + safetensors state, it computes exactly
what the converted model computes, and what it cannot rebuild it refuses to store."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from clipfp8.quant.core.config import EncoderSpec, ModelSpec
from clipfp8.quant.core.errors import EngineError
from clipfp8.quant.core.models import tiny_config
from clipfp8.quant.runtime import runtime_state as rs
from clipfp8.quant.runtime.engine import EngineKey, write_engine
from clipfp8.quant.runtime.fp8_encoder import build_fp8_model
from clipfp8.quant.runtime.fp8_linear import FP8Linear
from tests.quant.runtime.conftest import tiny_inputs

TINY = ModelSpec(name="tiny", config=tiny_config())


def _converted(fake: nn.Module, exact_softmax: bool) -> tuple[nn.Module, object]:
    return build_fp8_model(copy.deepcopy(fake), "cpu", dtype=torch.float32, mode="emulate",
                           exact_softmax=exact_softmax)


def _outputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    imgs, toks = tiny_inputs(6, seed=3)
    with torch.inference_mode():
        return model.encode_image(imgs), model.encode_text(toks)


@pytest.mark.parametrize("exact_softmax", [False, True])
def test_rebuilt_model_equals_the_converted_one(tiny_fake_quant, exact_softmax):
    model, report = _converted(tiny_fake_quant, exact_softmax)
    exported = rs.export_runtime(model, rs.plain_model(TINY).model, report)
    assert exported is not None
    files = rs.encode_plan(*exported)  # through the stored bytes: safetensors keeps float8
    state, plan = rs.decode_plan(files)
    assert any(t.dtype == torch.float8_e4m3fn for t in state.values())
    kinds = {e["kind"] for e in plan["modules"]}
    assert {"fp8_linear", "fp8_attention", "fake_quant"} <= kinds
    rebuilt = rs.rebuild_runtime(rs.plain_model(TINY).model, plan, state, "cpu", torch.float32)
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in model.modules()]
    for ref, got in zip(_outputs(model), _outputs(rebuilt), strict=True):
        assert torch.equal(ref, got)
    assert rs.report_from_plan(plan).to_dict() == report.to_dict()


def test_a_module_it_cannot_rebuild_is_not_exported(tiny_fake_quant):
    class Foreign(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    model, report = _converted(tiny_fake_quant, False)
    model.visual.ln_post = Foreign()
    assert rs.export_runtime(model, rs.plain_model(TINY).model, report) is None


def test_plan_that_does_not_fit_the_model_is_refused(tiny_fake_quant):
    model, report = _converted(tiny_fake_quant, False)
    state, plan = rs.export_runtime(model, rs.plain_model(TINY).model, report)
    with pytest.raises((KeyError, RuntimeError)):
        rs.rebuild_runtime(rs.plain_model(TINY).model, plan, {k: v for k, v in state.items() if "visual" not in k},
                           "cpu", torch.float32)
    with pytest.raises(ValueError, match="format"):
        rs.rebuild_runtime(rs.plain_model(TINY).model, {**plan, "format": 99}, state, "cpu")


def test_load_from_engine_and_corrupt_plan(tmp_path, tiny_fake_quant):
    model, report = _converted(tiny_fake_quant, False)
    files = rs.encode_plan(*rs.export_runtime(model, rs.plain_model(TINY).model, report))
    key = EngineKey("c0ffee", TINY.model_id(), "fp8", "NVIDIA H200", (9, 0), "2.11.0", "3.6.0")
    spec = EncoderSpec(model=TINY, precision="fp8", device="cpu", quantized=tmp_path / "q")
    bare = write_engine(tmp_path / "a", key, {"compile_cache": b"x"})
    assert rs.load_from_engine(spec, bare, "REBUILD", "cpu", torch.float32) is None  # no runtime state
    folder = write_engine(tmp_path / "b", key, {"compile_cache": b"x", **files})
    loaded, rebuilt, got_report = rs.load_from_engine(spec, folder, "REBUILD", "cpu", torch.float32)
    assert loaded.model is rebuilt and got_report.summary() == report.summary()
    assert any(isinstance(m, FP8Linear) for m in rebuilt.modules())
    assert torch.equal(_outputs(model)[0], _outputs(rebuilt)[0])
    bad = dict(files, **{rs.PLAN_FILE: b'{"format": 1, "modules": [{"path": "visual.nope", "kind": "warp"}]}'})
    folder = write_engine(tmp_path / "c", key, {"compile_cache": b"x", **bad})
    with pytest.raises(EngineError, match="REBUILD"):
        rs.load_from_engine(spec, folder, "REBUILD", "cpu", torch.float32)


def test_state_file_changed_or_gone_while_loading_is_refused(tmp_path, tiny_fake_quant, monkeypatch):
    """The state file is memory-mapped after its check: changed in place while the model is
    rebuilt from it, the load is refused once everything is read (the file is checked again);
    gone before it is mapped, the error names the file as unreadable."""
    import os

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model, report = _converted(tiny_fake_quant, False)
    files = rs.encode_plan(*rs.export_runtime(model, rs.plain_model(TINY).model, report))
    key = EngineKey("c0ffee", TINY.model_id(), "fp8", "NVIDIA H200", (9, 0), "2.11.0", "3.6.0")
    spec = EncoderSpec(model=TINY, precision="fp8", device="cpu", quantized=tmp_path / "q")
    folder = write_engine(tmp_path / "e", key, {"compile_cache": b"x", **files})
    assert rs.load_from_engine(spec, folder, "REBUILD", "cpu", torch.float32) is not None  # verified, remembered
    state_file = next(folder.glob("fp8_runtime-*.safetensors"))
    real = rs.rebuild_runtime

    def rewrite_meanwhile(*a, **k):  # type: ignore[no-untyped-def]
        out = real(*a, **k)
        st = state_file.stat()
        data = bytearray(state_file.read_bytes())
        data[-1] ^= 0xFF  # same size, other bytes, a later mtime
        state_file.write_bytes(bytes(data))
        os.utime(state_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        return out

    monkeypatch.setattr(rs, "rebuild_runtime", rewrite_meanwhile)
    with pytest.raises(EngineError, match="corrupt") as e:
        rs.load_from_engine(spec, folder, "REBUILD", "cpu", torch.float32)
    assert str(state_file) in str(e.value) and "REBUILD" in str(e.value)
    monkeypatch.setattr(rs, "rebuild_runtime", real)
    folder = write_engine(tmp_path / "f", key, {"compile_cache": b"x", **files})

    def gone(path, keep=None):  # type: ignore[no-untyped-def]
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(rs, "map_state", gone)
    with pytest.raises(EngineError, match="unreadable") as e:
        rs.load_from_engine(spec, folder, "REBUILD", "cpu", torch.float32)
    assert "fp8_runtime-" in str(e.value) and "REBUILD" in str(e.value)


def test_rebuild_covers_wrapped_conv_plain_projections_and_identities(tiny_loaded):
    """conv1 quantized (-> FakeQuant + Conv2d), attention out_proj and Q rounding excluded (->
    a plain Linear and an Identity inside FP8Attention)."""
    from clipfp8.quant.ptq import QuantConfig
    from tests.quant.runtime.conftest import fake_quantize

    fake = fake_quantize(tiny_loaded.model, [tiny_inputs(8, seed=s) for s in (1, 2)], QuantConfig(exclude=()),
                         disabled=("*attn.out_proj*", "*q_bmm_quantizer*"))
    model, report = _converted(fake, True)
    state, plan = rs.export_runtime(model, rs.plain_model(TINY).model, report)
    kinds = {e["kind"] for e in plan["modules"]}
    assert {"sequential", "wrapped", "linear", "identity"} <= kinds, kinds
    rebuilt = rs.rebuild_runtime(rs.plain_model(TINY).model, plan, state, "cpu", torch.float32)
    for ref, got in zip(_outputs(model), _outputs(rebuilt), strict=True):
        assert torch.equal(ref, got)


def _quantized_tiny(tmp_path, tiny_loaded, with_engine: bool):  # type: ignore[no-untyped-def]
    """A quantized tiny checkpoint in tmp_path/q (with an engine holding its runtime state when
    ``with_engine``): (loaded spec, the converted reference model, its report, stored checksum)."""
    from clipfp8.quant import checkpoint, ptq
    from clipfp8.quant.runtime import fp8_encoder
    from tests.quant.runtime.test_engine import H200

    loaded = copy.deepcopy(tiny_loaded)
    ptq.quantize(loaded, [tiny_inputs(8, seed=s) for s in (1, 2)], ptq.QuantConfig())
    checkpoint.save_quantized(loaded, tmp_path / "q", ptq.QuantConfig())
    ref, report = build_fp8_model(checkpoint.load_quantized(tmp_path / "q")[0].model, "cpu", mode="emulate",
                                  exact_softmax=False)
    stored = fp8_encoder.stored_checksum(tmp_path / "q")
    if with_engine:
        files = rs.encode_plan(*rs.export_runtime(ref, rs.plain_model(loaded.spec).model, report))
        key = EngineKey.for_machine(H200, checksum=stored, model_id=loaded.spec.model_id(), precision="fp8",
                                    max_batch=64, variant="softmax=fused")
        write_engine(tmp_path / "q" / "engines", key, {"compile_cache": b'{"image:2": "k"}', **files})
    return loaded.spec, ref, report, stored


def _fake_fp8_machine(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from clipfp8.quant.runtime import engine as eng
    from clipfp8.quant.runtime import fp8_encoder
    from tests.quant.runtime.test_engine import H200

    monkeypatch.setattr(fp8_encoder, "check_fp8_device", torch.device)
    monkeypatch.setattr(eng.MachineInfo, "current", classmethod(lambda cls, device="cuda": H200))


def test_fp8_encoder_with_an_engine_skips_the_modelopt_load(tmp_path, tiny_loaded, monkeypatch):
    """create_fp8_encoder on a checkpoint whose engine carries the runtime state: the model comes
    from the engine (load_quantized is never called), with the checkpoint's identity. CUDA and
    the GPU are faked; the model is converted with emulated GEMMs and never compiled here."""
    from clipfp8.quant import checkpoint
    from clipfp8.quant.runtime import fp8_encoder
    from tests.quant.runtime.test_engine import FakeCompileCache

    model_spec, ref, report, stored = _quantized_tiny(tmp_path, tiny_loaded, with_engine=True)
    _fake_fp8_machine(monkeypatch)
    monkeypatch.setattr(checkpoint, "load_quantized", lambda *a: pytest.fail("took the ModelOpt path"))
    cache = FakeCompileCache()
    spec = EncoderSpec(model=model_spec, precision="fp8", device="cpu", quantized=tmp_path / "q")
    enc = fp8_encoder.create_fp8_encoder(spec, engine="auto", cache=cache)
    assert cache.installed == {"image:2": "k"} and enc.identity().checksum == stored
    assert enc.conversion_report.summary() == report.summary()  # type: ignore[attr-defined]
    imgs, toks = tiny_inputs(4, seed=5)
    with torch.inference_mode():  # both fp16 on the CPU, same modules: bit-identical
        assert torch.equal(ref.encode_image(imgs.half()), enc.model.encode_image(imgs.half()))
        assert torch.equal(ref.encode_text(toks), enc.model.encode_text(toks))


@pytest.mark.parametrize("with_engine", [True, False], ids=["engine", "checkpoint"])
def test_text_only_fp8_encoder_builds_no_image_tower(tmp_path, tiny_loaded, monkeypatch, with_engine):
    """A text-only FP8 encoder (one `search` query), from the engine's runtime state or from the
    quantized checkpoint: the image tower is a parameter-free stand-in (none of its FP8 modules
    built or moved to the device), the text embeddings are the full runtime's, bit for bit, and
    the identity is the checkpoint's."""
    from clipfp8.quant.core.errors import ModelLoadError
    from clipfp8.quant.runtime import fp8_encoder
    from tests.quant.runtime.test_engine import FakeCompileCache

    model_spec, _, _, stored = _quantized_tiny(tmp_path, tiny_loaded, with_engine=with_engine)
    _fake_fp8_machine(monkeypatch)
    spec = EncoderSpec(model=model_spec, precision="fp8", device="cpu", quantized=tmp_path / "q")
    # Built as a serving process builds it (from the engine when there is one; never compiled here).
    full = fp8_encoder.create_fp8_encoder(spec, engine="auto", cache=FakeCompileCache())
    if with_engine:  # identified by the engine's digest: the plain model is never hashed
        from clipfp8.quant.core.models import LoadedModel

        monkeypatch.setattr(LoadedModel, "weights_checksum", lambda self: pytest.fail("hashed the model"))
    mapped: list[str] = []
    real_map = rs.map_state

    def spy(path, keep=None):  # type: ignore[no-untyped-def]
        state = real_map(path, keep)
        mapped.extend(state)
        return state

    monkeypatch.setattr(rs, "map_state", spy)
    enc = fp8_encoder.create_fp8_encoder(dataclasses.replace(spec, text_only=True), engine="auto")
    assert enc.identity() == full.identity() and enc.identity().checksum == stored
    if with_engine:  # the engine's state file is mapped and only the text tower's tensors taken
        assert mapped and not [k for k in mapped if k.startswith("visual.")]
    assert [n for n, m in full.model.named_modules() if isinstance(m, FP8Linear) and n.startswith("visual")]
    assert not list(enc.model.visual.parameters()) and not list(enc.model.visual.buffers())
    assert not [n for n, m in enc.model.named_modules() if isinstance(m, FP8Linear) and n.startswith("visual")]
    _, toks = tiny_inputs(4, seed=5)
    with torch.inference_mode():
        assert torch.equal(full.model.encode_text(toks), enc.model.encode_text(toks))
    with pytest.raises(ModelLoadError, match="text-only"):
        enc.model.visual(torch.zeros(1, 3, 32, 32))


def test_text_tower_only_drops_the_image_tower_from_plan_and_state(tiny_fake_quant):
    model, report = _converted(tiny_fake_quant, False)
    state, plan = rs.export_runtime(model, rs.plain_model(TINY).model, report)
    kept_plan, kept_state = rs.text_tower_only(plan, state)
    assert kept_state and all(not k.startswith("visual") for k in kept_state)
    assert len(kept_state) < len(state) and all(k in state for k in kept_state)
    assert all(not e["path"].startswith("visual") for e in kept_plan["modules"])
    assert any(e["path"].startswith("visual") for e in plan["modules"])  # the input is left as it was
    rebuilt = rs.rebuild_runtime(rs.plain_model(TINY, text_only_checksum="c0ffee").model, kept_plan, kept_state, "cpu",
                                 torch.float32)
    with torch.inference_mode():
        toks = tiny_inputs(3, seed=6)[1]
        assert torch.equal(rebuilt.encode_text(toks), model.encode_text(toks))


def test_build_stores_the_runtime_state_and_compiles_the_rebuilt_model(tiny_fake_quant):
    """engine_build.runtime_state_of: files + the rebuilt model, which FastTorchEncoder.with_model
    then runs (build_engine compiles that model, the one later starts load)."""
    from clipfp8.quant.runtime.engine_build import runtime_state_of
    from clipfp8.quant.runtime.fast_fp16 import FastTorchEncoder

    plain = rs.plain_model(TINY)
    model, report = _converted(tiny_fake_quant, False)
    enc = FastTorchEncoder(model, plain.preprocess, plain.tokenizer, precision="fp8", device="cpu", name="tiny-fp8",
                           model_id=TINY.model_id(), checksum="c0ffee", dim=32, image_size=(32, 32),
                           dtype=torch.float32, compile=False)
    enc.conversion_report = report  # type: ignore[attr-defined]
    spec = EncoderSpec(model=TINY, precision="fp8", device="cpu", quantized="q")  # type: ignore[arg-type]
    files, rebuilt = runtime_state_of(enc, spec)
    assert set(files) == {rs.STATE_FILE, rs.PLAN_FILE} and rebuilt is not None and rebuilt is not model
    swapped = enc.with_model(rebuilt)
    assert swapped.model is rebuilt and enc.model is model and swapped.identity() == enc.identity()
    imgs, _ = tiny_inputs(5, seed=4)
    assert (swapped.encode_images(imgs) == enc.encode_images(imgs)).all()
    assert (swapped.encode_texts(["a red car"]) == enc.encode_texts(["a red car"])).all()
    assert runtime_state_of(enc, EncoderSpec(model=TINY, precision="fp16", device="cpu")) == ({}, None)
