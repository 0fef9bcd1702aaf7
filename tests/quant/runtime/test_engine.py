"""Compiled engines (``quant.runtime.engine``) on the CPU: the key/manifest logic, the layout and
its atomic writes, the refusals, and a build -> load round trip through a fake compiler cache
(``CompileCache`` is injectable; the real torch round trip is in test_engine_gpu.py)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from clipfp8.quant.core.config import EncoderSpec, ModelSpec
from clipfp8.quant.core.errors import EngineError, EngineMismatchError
from clipfp8.quant.runtime import engine as eng
from clipfp8.quant.runtime.engine import EngineKey, EngineManifest, MachineInfo
from clipfp8.quant.runtime.engine_build import build_engine

H200 = MachineInfo("NVIDIA H200", (9, 0), "2.11.0+cu130", "3.6.0")
REBUILD = "clipfp8 build-engine --quantized Q --precision fp8"


def _key(**changes: object) -> EngineKey:
    base = EngineKey.for_machine(H200, checksum="abc123", model_id="ViT-L-14", precision="fp8",
                                 batch_buckets=(2, 4, 8, 16, 32), max_batch=64, variant="softmax=fused")
    return dataclasses.replace(base, **changes)


def _fp8_spec(tmp_path: Path, **kw: object) -> EncoderSpec:
    return EncoderSpec(model=ModelSpec(name="tiny", config=_tiny_cfg()), precision="fp8", device="cpu",
                       quantized=tmp_path / "q", **kw)  # type: ignore[arg-type]


def _tiny_cfg() -> dict:
    from clipfp8.quant.core.models import tiny_config

    return tiny_config()


# --- key and manifest -------------------------------------------------------------------------

def test_key_folder_name_and_json_round_trip():
    key = _key()
    assert key.folder_name() == "fp8-sm90-torch2.11.0-cu130"
    assert EngineKey.from_dict(json.loads(json.dumps(key.to_dict()))) == key
    assert key.mismatches(_key(batch_buckets=(2,), max_batch=256)) == []  # batch sizes are not refused


@pytest.mark.parametrize("change", [{"precision": "int4"}, {"checksum": ""}, {"compute_capability": (9,)},
                                    {"max_batch": 0}, {"batch_buckets": (0, 2)}])
def test_key_validates_itself(change):
    with pytest.raises(ValueError, match="EngineKey"):
        _key(**change)


@pytest.mark.parametrize("field,value", [("gpu_name", "NVIDIA L40S"), ("checksum", "fff000"),
                                         ("triton_version", "3.5.0"), ("model_id", "ViT-B-32"),
                                         ("variant", "softmax=exact")])
def test_engine_in_this_folder_that_differs_is_refused_naming_the_field(tmp_path, field, value):
    eng.write_engine(tmp_path, _key(), {"compile_cache": b"graphs"})
    here = _key(**{field: value})
    with pytest.raises(EngineMismatchError, match=field) as e:
        eng.find_engine(tmp_path, here, REBUILD)
    assert REBUILD in str(e.value) and repr(value) in str(e.value)


@pytest.mark.parametrize("field,value", [("compute_capability", (8, 9)), ("torch_version", "2.12.0+cu130")])
def test_engine_only_for_another_arch_or_torch_is_refused(tmp_path, field, value):
    eng.write_engine(tmp_path, _key(), {"compile_cache": b"graphs"})
    with pytest.raises(EngineMismatchError, match=field) as e:
        eng.find_engine(tmp_path, _key(**{field: value}), REBUILD)
    assert REBUILD in str(e.value)


def test_matching_engine_is_found_and_other_precisions_are_ignored(tmp_path):
    folder = eng.write_engine(tmp_path, _key(), {"compile_cache": b"graphs"}, build_seconds=12.5,
                              cache_entries={"inductor": 2})
    eng.write_engine(tmp_path, _key(precision="fp16", torch_version="2.12.0"), {"compile_cache": b"x"})
    manifest = eng.find_engine(tmp_path, _key(), REBUILD)
    assert manifest is not None and manifest.key == _key() and manifest.cache_entries == {"inductor": 2}
    assert eng.read_engine_file(folder, manifest, "compile_cache", REBUILD) == b"graphs"
    assert eng.find_engine(tmp_path / "nothing-here", _key(), REBUILD) is None


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format_version": 99}),
                                     json.dumps({"format_version": 1, "key": {}, "files": {}})])
def test_corrupt_manifest_is_a_clear_error(tmp_path, content):
    folder = eng.write_engine(tmp_path, _key(), {"compile_cache": b"graphs"})
    (folder / eng.MANIFEST).write_text(content)
    with pytest.raises(EngineError, match="engine.json") as e:
        eng.find_engine(tmp_path, _key(), REBUILD)
    assert REBUILD in str(e.value) and str(folder) in str(e.value)


@pytest.mark.parametrize("read", [eng.read_engine_file, eng.verified_engine_file], ids=["read", "verified"])
def test_corrupt_or_missing_artifact_is_a_clear_error(tmp_path, monkeypatch, read):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = eng.write_engine(tmp_path, _key(), {"compile_cache": b"graphs"})
    manifest = EngineManifest.read(folder)
    artifact = folder / manifest.files["compile_cache"]["file"]
    for content in (b"grapHs", b"more graphs"):  # same size, other bytes; another size
        artifact.write_bytes(content)
        with pytest.raises(EngineError, match="corrupt") as e:
            read(folder, manifest, "compile_cache", REBUILD)
        assert str(artifact) in str(e.value) and REBUILD in str(e.value)
    artifact.unlink()
    with pytest.raises(EngineError, match="unreadable"):
        read(folder, manifest, "compile_cache", REBUILD)


def test_a_verified_engine_file_is_not_hashed_again_until_it_changes(tmp_path, monkeypatch):
    """The sha256 of a stored file is checked once per file identity (path, size, mtime, ctime,
    inode); ``verified_engine_file`` then does not read the file at all (the FP8 state is
    memory-mapped by its caller), and a file changed since is checked again and refused."""
    import os

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = eng.write_engine(tmp_path / "e", _key(), {"compile_cache": b"graphs", "fp8_runtime_safetensors": b"state"})
    manifest = EngineManifest.read(folder)
    hashed: list[bytes] = []
    real = eng._sha256
    monkeypatch.setattr(eng, "_sha256", lambda data: hashed.append(data) or real(data))
    for _ in range(2):
        assert eng.read_engine_file(folder, manifest, "compile_cache", REBUILD) == b"graphs"
    assert hashed == [b"graphs"]
    path = eng.verified_engine_file(folder, manifest, "fp8_runtime_safetensors", REBUILD)
    assert path.read_bytes() == b"state" and hashed == [b"graphs", b"state"]
    with monkeypatch.context() as m:  # verified before: neither read nor hashed
        m.setattr(eng, "read_engine_file", lambda *a: pytest.fail("read a verified file again"))
        assert eng.verified_engine_file(folder, manifest, "fp8_runtime_safetensors", REBUILD) == path
    st = path.stat()
    path.write_bytes(b"stAte")  # changed in place, same size, a later mtime
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(EngineError, match="corrupt") as e:
        eng.verified_engine_file(folder, manifest, "fp8_runtime_safetensors", REBUILD)
    assert str(path) in str(e.value) and REBUILD in str(e.value)


def test_manifest_entry_without_a_valid_sha256_is_refused(tmp_path, monkeypatch):
    """A manifest entry whose sha256 is missing or malformed verifies nothing: refused, naming
    the rebuild command (a cache lookup that finds nothing must not match a missing digest)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = eng.write_engine(tmp_path / "e", _key(), {"compile_cache": b"graphs"})
    manifest = EngineManifest.read(folder)
    for bad in (None, "abc", 123):
        entry = dict(manifest.files["compile_cache"])
        if bad is None:
            del entry["sha256"]
        else:
            entry["sha256"] = bad
        broken = dataclasses.replace(manifest, files={"compile_cache": entry})
        for read in (eng.read_engine_file, eng.verified_engine_file):
            with pytest.raises(EngineError, match="no valid size and sha256") as e:
                read(folder, broken, "compile_cache", REBUILD)
            assert REBUILD in str(e.value)


def test_rewrite_is_atomic_and_removes_the_old_artifact(tmp_path, monkeypatch):
    folder = eng.write_engine(tmp_path, _key(), {"compile_cache": b"old graphs"})

    def disk_full(path: Path, text: str) -> None:
        raise OSError(28, "No space left on device", str(path))

    with monkeypatch.context() as m:
        m.setattr(eng, "atomic_write_text", disk_full)
        with pytest.raises(OSError):
            eng.write_engine(tmp_path, _key(), {"compile_cache": b"new graphs"})
    manifest = EngineManifest.read(folder)  # the old engine is intact and still verifies
    assert eng.read_engine_file(folder, manifest, "compile_cache", REBUILD) == b"old graphs"
    eng.write_engine(tmp_path, _key(), {"compile_cache": b"new graphs"})
    manifest = EngineManifest.read(folder)
    assert eng.read_engine_file(folder, manifest, "compile_cache", REBUILD) == b"new graphs"
    assert sorted(p.name for p in folder.iterdir()) == sorted([eng.MANIFEST, manifest.files["compile_cache"]["file"]])


# --- where engines live, policies, messages ---------------------------------------------------

def test_engine_root_order(tmp_path, monkeypatch):
    monkeypatch.delenv(eng.ENGINE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    fp8 = _fp8_spec(tmp_path)
    fp16 = EncoderSpec(model=ModelSpec(name="tiny", config=_tiny_cfg()), precision="fp16", device="cpu")
    assert eng.engine_root(fp8, "abc") == tmp_path / "q" / "engines"
    assert eng.engine_root(fp16, "abc") == tmp_path / "xdg" / "clipfp8" / "engines" / "abc"
    monkeypatch.setenv(eng.ENGINE_DIR_ENV, str(tmp_path / "env"))
    assert eng.engine_root(fp8, "abc") == eng.engine_root(fp16, "abc") == tmp_path / "env"
    assert eng.engine_root(fp8, "abc", engine_dir=tmp_path / "arg") == tmp_path / "arg"


def test_rebuild_command_names_the_flags(tmp_path):
    want = f"clipfp8 build-engine --quantized {tmp_path / 'q'} --precision fp8"
    assert eng.rebuild_command(_fp8_spec(tmp_path)) == want
    spec = EncoderSpec(model=ModelSpec(name="ViT-L-14"), precision="fp16", batch_size=256)
    assert eng.rebuild_command(spec) == ("clipfp8 build-engine --model ViT-L-14 --random-init --precision fp16 "
                                         "--batch-size 256")


def test_policy_from_env(monkeypatch):
    monkeypatch.delenv(eng.ENGINE_ENV, raising=False)
    assert eng.engine_policy() == "auto"
    monkeypatch.setenv(eng.ENGINE_ENV, "off")
    assert eng.engine_policy() == "off" and eng.engine_policy("eager") == "eager"
    monkeypatch.setenv(eng.ENGINE_ENV, "sometimes")
    with pytest.raises(ValueError, match=eng.ENGINE_ENV):
        eng.engine_policy()


def test_policy_off_reads_nothing_and_no_engine_logs_how_to_build(tmp_path, caplog):
    spec = _fp8_spec(tmp_path)
    root = eng.engine_root(spec, "abc123")
    folder = eng.write_engine(root, _key(), {"compile_cache": b"graphs"})
    (folder / eng.MANIFEST).write_text("{broken")
    cache = FakeCompileCache()
    assert not eng.load_engine(spec, _key(), policy="off", cache=cache).loaded and not cache.installed
    (folder / eng.MANIFEST).unlink()
    with caplog.at_level(logging.INFO, logger="clipfp8.quant.runtime.engine"):
        status = eng.load_engine(spec, _key(), policy="auto", cache=cache)
    assert not status.loaded and "clipfp8 build-engine --quantized" in caplog.text


# --- build -> load round trip with a fake compiler --------------------------------------------

class FakeCompileCache:
    """Records one artifact per 'compiled' graph key, on hits and misses alike (as torch does)."""

    def __init__(self) -> None:
        self.recorded: dict[str, str] = {}
        self.installed: dict[str, str] = {}
        self.hits = self.misses = 0

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        self.recorded = {}
        yield

    def compile(self, key: str) -> None:
        if key in self.installed:
            self.hits += 1
        else:
            self.misses += 1
        self.recorded[key] = f"kernels for {key}"

    def save(self) -> tuple[bytes, dict[str, int]] | None:
        return (json.dumps(self.recorded).encode(), {"inductor": len(self.recorded)}) if self.recorded else None

    def load(self, data: bytes) -> dict[str, int]:
        self.installed.update(json.loads(data))
        return {"inductor": len(self.installed)}


class FakeCompiledRunner:
    """Stands in for ``BatchRunner``: 'compiles' once per batch size it meets, then runs eagerly."""

    def __init__(self, fn, tower: str, cache: FakeCompileCache, buckets: tuple[int, ...] = (2, 4)) -> None:
        self.fn, self.tower, self.cache, self.buckets = fn, tower, cache, buckets
        self.seen: set[int] = set()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = max(int(x.shape[0]), 2)
        size = next((b for b in self.buckets if b >= n), n)
        if size not in self.seen:
            self.seen.add(size)
            self.cache.compile(f"{self.tower}:{size}")
        with torch.inference_mode():
            return self.fn(x)


def fake_factory(tiny_loaded, cache: FakeCompileCache):
    from clipfp8.quant.runtime.fast_fp16 import FastTorchEncoder

    def factory(spec: EncoderSpec) -> FastTorchEncoder:
        m = tiny_loaded.model
        runners = (FakeCompiledRunner(m.encode_image, "image", cache), FakeCompiledRunner(m.encode_text, "text", cache))
        return FastTorchEncoder(m, tiny_loaded.preprocess, tiny_loaded.tokenizer, precision=spec.precision,
                                device="cpu", name="tiny-fp8", model_id="config:tiny", checksum="c0ffee", dim=32,
                                image_size=(32, 32), batch_size=spec.batch_size, dtype=torch.float32,
                                runners=runners, engine_variant="softmax=fused")
    return factory


def test_build_then_load_makes_every_warmed_up_compile_a_hit(tmp_path, tiny_loaded):
    spec = _fp8_spec(tmp_path, batch_size=4)
    build_cache = FakeCompileCache()
    folder = build_engine(spec, [8], factory=fake_factory(tiny_loaded, build_cache), cache=build_cache, machine=H200)
    assert folder == tmp_path / "q" / "engines" / "fp8-sm90-torch2.11.0-cu130"
    manifest = EngineManifest.read(folder)
    assert manifest.key.checksum == "c0ffee" and manifest.key.model_id == "config:tiny"
    assert manifest.key.batch_buckets == (2, 4) and manifest.key.max_batch == 8
    assert manifest.key.variant == "softmax=fused" and manifest.cache_entries == {"inductor": 6}
    # image/text at the buckets, the query batch 1 (-> 2) and the index batch 8
    assert set(build_cache.recorded) == {f"{t}:{n}" for t in ("image", "text") for n in (2, 4, 8)}

    # A "fresh process": a new cache; the encoder's key is built the way the factories build it.
    run_cache = FakeCompileCache()
    status = eng.prepare_engine(spec, checksum="c0ffee", model_id="config:tiny", variant="softmax=fused",
                                engine="auto", cache=run_cache, machine=H200)
    assert status.loaded and status.folder == folder and run_cache.installed == build_cache.recorded
    enc = fake_factory(tiny_loaded, run_cache)(spec)
    enc.encode_texts(["a red car"])
    enc.encode_images(torch.zeros(8, 3, 32, 32))
    assert run_cache.misses == 0 and run_cache.hits == 2

    with pytest.raises(EngineMismatchError, match="checksum"):  # a re-quantized checkpoint
        eng.prepare_engine(spec, checksum="beef", model_id="config:tiny", variant="softmax=fused",
                           engine="auto", cache=FakeCompileCache(), machine=H200)


def test_build_that_compiles_nothing_is_an_error(tmp_path, tiny_loaded):
    class NothingCompiled(FakeCompileCache):
        def save(self) -> None:
            return None

    cache = NothingCompiled()
    with pytest.raises(EngineError, match="compiled nothing"):
        build_engine(_fp8_spec(tmp_path), factory=fake_factory(tiny_loaded, cache), cache=cache, machine=H200)
    assert not (tmp_path / "q" / "engines").exists()


def test_build_engine_refuses_other_precisions(tmp_path):
    from clipfp8.quant.core.errors import UnsupportedPrecisionError

    spec = EncoderSpec(model=ModelSpec(name="tiny", config=_tiny_cfg()), precision="fp8-fake", device="cpu",
                       quantized=tmp_path)
    with pytest.raises(UnsupportedPrecisionError, match="fp8-fake"):
        build_engine(spec, machine=H200)


# --- the precision registry: the runtime's fp16/bf16 entry points beat the core's eager ones ----

def _fake_entry_points(monkeypatch, mapping: dict[str, str]) -> None:
    import importlib.metadata as md

    from clipfp8.quant.core import encoder as core

    eps = [md.EntryPoint(name, target, core.ENTRY_POINT_GROUP) for name, target in mapping.items()]
    monkeypatch.setattr(md, "entry_points", lambda group=None: [e for e in eps if e.group == group])
    monkeypatch.setattr(core, "_REGISTRY", {})


def test_entry_point_beats_builtin_and_explicit_registration_beats_both(monkeypatch):
    from clipfp8.quant.core import encoder as core
    from clipfp8.quant.runtime.fast_fp16 import create_half_encoder

    _fake_entry_points(monkeypatch, {})
    assert core.encoder_factory("fp16") is core.create_torch_encoder  # nothing installed: the core's
    _fake_entry_points(monkeypatch, {"fp16": "clipfp8.quant.runtime.fast_fp16:create_half_encoder"})
    assert core.encoder_factory("fp16") is create_half_encoder
    assert core.encoder_factory("fp32") is core.create_torch_encoder
    mine = lambda spec: None  # noqa: E731
    core.register_precision("fp16", mine)
    assert core.encoder_factory("fp16") is mine


def test_pyproject_registers_the_runtime_fp16_and_bf16():
    import tomllib

    root = Path(__file__).resolve().parents[3]
    eps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["entry-points"]["clipfp8.precisions"]
    assert eps["fp16"] == eps["bf16"] == "clipfp8.quant.runtime.fast_fp16:create_half_encoder"


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cpu_half_precision_is_still_the_eager_encoder(monkeypatch, precision):
    from clipfp8.quant.core.encoder import TorchEncoder, create_encoder

    _fake_entry_points(monkeypatch, {precision: "clipfp8.quant.runtime.fast_fp16:create_half_encoder"})
    enc = create_encoder(EncoderSpec(model=ModelSpec(name="tiny", config=_tiny_cfg()), precision=precision,
                                     device="cpu"))
    assert isinstance(enc, TorchEncoder) and enc.precision == precision
    assert enc.encode_texts(["a red car"]).shape == (1, 32)


# --- CLI: build-engine and the quantize hook ----------------------------------------------------

def test_build_engine_cli_needs_quantized_for_fp8(capsys):
    from clipfp8.app.cli import main

    assert main(["build-engine", "--precision", "fp8"]) != 0
    err = capsys.readouterr().err
    assert "build-engine" in err and "--quantized" in err


def test_quantize_hook_is_registered_once_and_builds_only_on_an_fp8_gpu(monkeypatch, tmp_path):
    import argparse

    from clipfp8.app.cli import build_parser
    from clipfp8.quant.cli_quantize import POST_QUANTIZE_HOOKS
    from clipfp8.quant.runtime import cli_engine

    build_parser(), build_parser()
    assert POST_QUANTIZE_HOOKS.count(cli_engine.build_after_quantize) == 1
    calls: list[dict] = []
    def fake_build(precision: tuple[str, ...], **kw: object) -> list[Path]:
        calls.append({"precision": precision, **kw})
        return [tmp_path] * len(precision)

    monkeypatch.setattr(cli_engine, "build_engines", fake_build)
    args = argparse.Namespace(output=tmp_path / "q", no_engine=False)
    cli_engine.build_after_quantize(args, "cpu")
    cli_engine.build_after_quantize(argparse.Namespace(output=tmp_path / "q", no_engine=True), "cuda")
    assert calls == []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    cli_engine.build_after_quantize(args, "cuda")  # an A100: no FP8 tensor cores
    assert calls == []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cli_engine.build_after_quantize(args, "cuda")
    assert calls == [{"precision": ("fp8", "fp16"), "quantized": tmp_path / "q", "device": "cuda"}]

    def broken(*a, **kw):
        raise RuntimeError("triton exploded")

    monkeypatch.setattr(cli_engine, "build_engines", broken)
    with pytest.raises(EngineError, match="saved .*--no-engine"):
        cli_engine.build_after_quantize(args, "cuda")
