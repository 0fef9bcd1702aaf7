"""Compiled encoders built once and reused ("engines"), as a TensorRT plan file is.

``torch.compile`` of a ViT-L/14 tower costs about a minute in every new process. An engine is
the compiler's own cache -- ``torch.compiler.save_cache_artifacts()`` ("mega-cache": Inductor FX
graphs with their Triton kernels, AOTAutograd entries, autotuning results, dynamic-shape
profiles) -- captured while ``build_engine`` warms up every batch bucket the product uses, and
stored with a manifest. A later process loads it (``torch.compiler.load_cache_artifacts``) before
its first compile, so that compile is a cache hit (Dynamo tracing only). Chosen over AOTInductor
packages, whose ``aoti_load_package`` segfaulted in a fresh process on the H200 (issue 10).

Layout (``EngineKey.folder_name``)::

    <root>/<precision>-sm<MAJ><MIN>-torch<version>/
        engine.json                  manifest: EngineKey, files with sha256 and size, build time
        compile_cache-<sha12>.bin    the compiler's cache artifacts
        fp8_runtime-<sha12>.safetensors, fp8_runtime_plan-<sha12>.json
                                     fp8 only: the converted model, so a start with the engine
                                     needs no ModelOpt (``runtime_state``; absent for models it
                                     cannot rebuild, e.g. the default model's BERT text tower)

``root`` (``engine_root``): ``engine_dir`` if given, else ``$CLIPFP8_ENGINE_DIR``, else
``<quantized>/engines`` for fp8, else ``~/.cache/clipfp8/engines/<model checksum>`` (fp16/bf16).
``$CLIPFP8_ENGINE``: ``auto`` (default: use a matching engine, refuse a mismatching one, compile
lazily without one), ``off`` (never read engines; compile lazily), ``eager`` (no compile at all).

Trust: an engine holds compiled code that torch runs (as a TensorRT plan does); use your own.
The compiler calls go through ``CompileCache`` so CPU tests can inject a fake.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from clipfp8.quant.core import checksum_cache
from clipfp8.quant.core.config import EncoderSpec
from clipfp8.quant.core.errors import EngineError, EngineMismatchError, UnsupportedPrecisionError
from clipfp8.quant.core.fileio import atomic_write_bytes, atomic_write_text, cache_root
from clipfp8.quant.runtime.compile_cache import CompileCache, TorchCompileCache, configure_compile_cache

log = logging.getLogger(__name__)

ENGINE_FORMAT_VERSION = 1
MANIFEST = "engine.json"
ENGINES_SUBDIR = "engines"
ENGINE_ENV = "CLIPFP8_ENGINE"
ENGINE_DIR_ENV = "CLIPFP8_ENGINE_DIR"
POLICIES = ("auto", "off", "eager")
#: Precisions served by a compiled ``FastTorchEncoder`` (trt-fp8 has its own TensorRT plans).
ENGINE_PRECISIONS = ("fp16", "bf16", "fp8")
#: Fields that must equal this machine's and checkpoint's for a stored engine to be used. The
#: batch buckets are not among them: the graph is compiled dynamic in the batch, so an engine
#: warmed up at batch 64 still serves batch 128 (CUDA graphs are captured in each process).
MATCH_FIELDS = ("checksum", "model_id", "precision", "variant", "gpu_name", "compute_capability",
                "torch_version", "triton_version")


def engine_policy(policy: str | None = None) -> str:
    """``policy`` or ``$CLIPFP8_ENGINE`` (default ``auto``); raises ``ValueError`` naming it."""
    value = policy or os.environ.get(ENGINE_ENV, "") or "auto"
    if value not in POLICIES:
        raise ValueError(f"{ENGINE_ENV}={value!r}: expected one of {POLICIES}")
    return value


@dataclass(frozen=True)
class MachineInfo:
    """What a compiled engine depends on besides the checkpoint."""

    gpu_name: str
    compute_capability: tuple[int, int]
    torch_version: str
    triton_version: str

    @classmethod
    def current(cls, device: str = "cuda") -> MachineInfo:
        """This process's GPU and compiler versions; ``UnsupportedPrecisionError`` without CUDA."""
        import torch

        if not device.startswith("cuda") or not torch.cuda.is_available():
            raise UnsupportedPrecisionError(f"compiled engines need a CUDA GPU (device {device!r})")
        dev = torch.device(device)
        try:
            triton_version = metadata.version("triton")
        except metadata.PackageNotFoundError:
            triton_version = "none"
        cap = torch.cuda.get_device_capability(dev)
        return cls(torch.cuda.get_device_name(dev), (int(cap[0]), int(cap[1])), str(torch.__version__),
                   triton_version)


@dataclass(frozen=True)
class EngineKey:
    """What an engine was built from and for. ``checksum``: the quantized checkpoint's (fp8) or
    the model weights' (fp16/bf16) checksum, as in ``EncoderIdentity``. ``batch_buckets``: the
    CUDA-graph buckets warmed up; ``max_batch``: the largest batch warmed up. ``variant``: how
    the encoder was built (e.g. ``attention=sdpa``)."""

    checksum: str
    model_id: str
    precision: str
    gpu_name: str
    compute_capability: tuple[int, int]
    torch_version: str
    triton_version: str
    batch_buckets: tuple[int, ...] = ()
    max_batch: int = 1
    variant: str = ""

    def __post_init__(self) -> None:
        if self.precision not in ENGINE_PRECISIONS:
            raise ValueError(f"EngineKey.precision must be one of {ENGINE_PRECISIONS}, got {self.precision!r}")
        for name in ("checksum", "model_id", "gpu_name", "torch_version"):
            if not getattr(self, name):
                raise ValueError(f"EngineKey.{name} must not be empty")
        cap = tuple(int(c) for c in self.compute_capability)
        if len(cap) != 2:
            raise ValueError(f"EngineKey.compute_capability must be (major, minor), got {self.compute_capability!r}")
        object.__setattr__(self, "compute_capability", cap)
        buckets = tuple(sorted({int(b) for b in self.batch_buckets}))
        if any(b < 1 for b in buckets) or int(self.max_batch) < 1:
            raise ValueError(f"EngineKey: batch sizes must be >= 1 (buckets {self.batch_buckets}, "
                             f"max {self.max_batch})")
        object.__setattr__(self, "batch_buckets", buckets)
        object.__setattr__(self, "max_batch", int(self.max_batch))

    @classmethod
    def for_machine(cls, machine: MachineInfo, **fields: Any) -> EngineKey:
        """The key of an engine for ``machine``; ``fields``: the checkpoint-side fields."""
        return cls(gpu_name=machine.gpu_name, compute_capability=machine.compute_capability,
                   torch_version=machine.torch_version, triton_version=machine.triton_version, **fields)

    def folder_name(self) -> str:
        """``<precision>-sm<MAJ><MIN>-torch<version>`` (characters outside [A-Za-z0-9._-] -> '-')."""
        major, minor = self.compute_capability
        version = re.sub(r"[^A-Za-z0-9._-]", "-", self.torch_version)
        return f"{self.precision}-sm{major}{minor}-torch{version}"

    def mismatches(self, here: EngineKey) -> list[str]:
        """``MATCH_FIELDS`` that differ, as ``"field: stored X, here Y"`` (empty: usable)."""
        return [f"{name}: engine {getattr(self, name)!r}, here {getattr(here, name)!r}"
                for name in MATCH_FIELDS if getattr(self, name) != getattr(here, name)]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compute_capability"], d["batch_buckets"] = list(self.compute_capability), list(self.batch_buckets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EngineKey:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class EngineManifest:
    """``engine.json``: the key, and per stored file (``compile_cache``, ...) its name, sha256
    and size in bytes, so a truncated or swapped file is caught before torch reads it."""

    key: EngineKey
    files: dict[str, dict[str, Any]]
    created_utc: str = ""
    build_seconds: float = 0.0
    cache_entries: dict[str, int] = field(default_factory=dict)
    format_version: int = ENGINE_FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps({"format_version": self.format_version, "key": self.key.to_dict(), "files": self.files,
                           "created_utc": self.created_utc, "build_seconds": self.build_seconds,
                           "cache_entries": self.cache_entries}, indent=2)

    @classmethod
    def read(cls, folder: Path, rebuild: str = "") -> EngineManifest:
        """Parse ``folder/engine.json``; ``EngineError`` naming the file (and ``rebuild``) if it
        is missing, not JSON, of another format version, or lacks a field."""
        path = Path(folder) / MANIFEST
        hint = f"; rebuild it with `{rebuild}`" if rebuild else ""
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EngineError(f"engine manifest {path} is unreadable ({e}){hint}") from e
        if not isinstance(d, dict) or d.get("format_version") != ENGINE_FORMAT_VERSION:
            got = d.get("format_version") if isinstance(d, dict) else None
            raise EngineError(f"engine manifest {path}: format_version {got!r}, this version reads "
                              f"{ENGINE_FORMAT_VERSION}{hint}")
        try:
            files = {str(k): dict(v) for k, v in d["files"].items()}
            return cls(EngineKey.from_dict(d["key"]), files, str(d.get("created_utc", "")),
                       float(d.get("build_seconds", 0.0)), dict(d.get("cache_entries", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise EngineError(f"engine manifest {path} is malformed ({type(e).__name__}: {e}){hint}") from e


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/clipfp8/engines`` (``~/.cache/clipfp8/engines``)."""
    return cache_root() / ENGINES_SUBDIR


def engine_root(spec: EncoderSpec, checksum: str, engine_dir: Path | None = None) -> Path:
    """Folder holding ``spec``'s engines (see the module docstring for the order)."""
    if engine_dir is not None:
        return Path(engine_dir)
    if os.environ.get(ENGINE_DIR_ENV):
        return Path(os.environ[ENGINE_DIR_ENV])
    if spec.precision.startswith("fp8") and spec.quantized is not None:
        return Path(spec.quantized) / ENGINES_SUBDIR
    return default_cache_root() / checksum


def rebuild_command(spec: EncoderSpec, engine_dir: Path | None = None) -> str:
    """The ``clipfp8 build-engine`` command line that builds ``spec``'s engine."""
    parts = ["clipfp8 build-engine"]
    if spec.quantized is not None:
        parts += ["--quantized", str(spec.quantized)]
    else:
        m = spec.model
        parts += ["--model", f"{m.name}.json" if m.config is not None else m.name]
        parts += ["--pretrained", m.pretrained] if m.pretrained else []
        parts += ["--checkpoint", str(m.checkpoint)] if m.checkpoint is not None else []
        random_init = m.config is None and not m.pretrained and m.checkpoint is None and not m.is_default
        parts += ["--random-init"] if random_init else []
    parts += ["--precision", spec.precision]
    parts += ["--batch-size", str(spec.batch_size)] if spec.batch_size != 64 else []
    parts += ["--engine-dir", str(engine_dir)] if engine_dir is not None else []
    return " ".join(parts)


def find_engine(root: Path, key: EngineKey, rebuild: str) -> EngineManifest | None:
    """The manifest of ``key``'s engine under ``root``, or None when ``root`` holds no engine of
    ``key.precision``. Raises ``EngineMismatchError`` when the engine in ``key``'s folder -- or,
    without one, every other engine of that precision there -- differs in a ``MATCH_FIELDS``
    field (names each field and ``rebuild``); ``EngineError`` for an unreadable manifest."""
    root = Path(root)
    folder = root / key.folder_name()
    if (folder / MANIFEST).is_file():
        manifest = EngineManifest.read(folder, rebuild)
        diffs = manifest.key.mismatches(key)
        if diffs:
            raise EngineMismatchError(f"engine {folder} does not match: {'; '.join(diffs)}. Rebuild it with "
                                      f"`{rebuild}` (or set {ENGINE_ENV}=off to compile without engines)")
        return manifest
    others = sorted(p for p in root.glob(f"{key.precision}-sm*") if (p / MANIFEST).is_file()) if root.is_dir() else []
    if not others:
        return None
    stored = EngineManifest.read(others[0], rebuild).key
    raise EngineMismatchError(
        f"no engine under {root} fits this machine ({key.gpu_name}, sm {key.compute_capability[0]}."
        f"{key.compute_capability[1]}, torch {key.torch_version}); {others[0].name} differs in "
        f"{'; '.join(stored.mismatches(key))}. Build one for this machine with `{rebuild}` "
        f"(or set {ENGINE_ENV}=off to compile without engines)")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: Prefix of this module's entries in ``checksum_cache``: an engine file's sha256, verified once
#: per file identity (path, size, mtime, ctime, inode); checkpoints' weight digests share the file.
_VERIFIED = "engine-file-sha256:"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class _Stored:
    """A stored file as its manifest entry describes it, and its identity key (taken before any
    read of it, so a digest remembered under the key describes what was read after)."""

    path: Path
    size: int
    sha256: str
    key: str


def _unreadable(path: Path, e: OSError, rebuild: str) -> EngineError:
    return EngineError(f"engine file {path} is unreadable ({e}); rebuild it with `{rebuild}`")


def _stored(folder: Path, manifest: EngineManifest, name: str, rebuild: str) -> _Stored:
    entry = manifest.files.get(name)
    if entry is None:
        raise EngineError(f"engine {folder}: {MANIFEST} lists no {name!r} file; rebuild it with `{rebuild}`")
    path = Path(folder) / str(entry.get("file", ""))
    size, digest = entry.get("bytes"), entry.get("sha256")
    if not isinstance(size, int) or not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise EngineError(f"engine {folder}: {MANIFEST} gives no valid size and sha256 for {path.name}; "
                          f"rebuild it with `{rebuild}`")
    try:
        key = _VERIFIED + checksum_cache.file_key(path)
    except OSError as e:
        raise _unreadable(path, e, rebuild) from e
    return _Stored(path, size, digest, key)


def _read_checked(f: _Stored, rebuild: str) -> bytes:
    """The bytes of ``f.path``, checked against the manifest's size and sha256; the sha256 is
    skipped for a file verified before under the same identity, and remembered after."""
    try:
        data = f.path.read_bytes()
    except OSError as e:
        raise _unreadable(f.path, e, rebuild) from e
    if len(data) != f.size:
        raise EngineError(f"engine file {f.path} is corrupt (size differs from {MANIFEST}); rebuild it with `{rebuild}`")
    if checksum_cache.lookup(f.key) == f.sha256:
        return data
    if _sha256(data) != f.sha256:
        raise EngineError(f"engine file {f.path} is corrupt (sha256 differs from {MANIFEST}); rebuild it with `{rebuild}`")
    checksum_cache.remember(f.key, f.sha256)
    return data


def read_engine_file(folder: Path, manifest: EngineManifest, name: str, rebuild: str) -> bytes:
    """The bytes of stored file ``name`` (e.g. ``compile_cache``), checked against its size and
    sha256 (hashed once per file identity: ``_read_checked``); ``EngineError`` naming the file
    and ``rebuild`` otherwise."""
    return _read_checked(_stored(folder, manifest, name, rebuild), rebuild)


def verified_engine_file(folder: Path, manifest: EngineManifest, name: str, rebuild: str) -> Path:
    """The path of stored file ``name`` once it is known to match its size and sha256, for a
    caller that memory-maps it and reads only part of it (a text query reads the text tower's
    tensors of the FP8 runtime state, not the image tower's). A file verified before under the
    same identity (path, size, mtime, ctime, inode: ``checksum_cache``; the size is part of it,
    so a remembered digest also vouches for the size) is not read here at all; the first use
    reads and hashes it whole. Such a caller checks again once it has read what it needs (the
    file may have been changed in place meanwhile). ``EngineError`` naming the file and
    ``rebuild``."""
    f = _stored(folder, manifest, name, rebuild)
    if checksum_cache.lookup(f.key) != f.sha256:
        _read_checked(f, rebuild)
    return f.path


def write_engine(root: Path, key: EngineKey, files: dict[str, bytes], *, build_seconds: float = 0.0,
                 cache_entries: dict[str, int] | None = None) -> Path:
    """Store ``files`` (name -> bytes; ``compile_cache`` at least; a name ending ``_json`` or
    ``_safetensors`` gets that file suffix) and the manifest in
    ``root/key.folder_name()``; returns that folder. Each file is written atomically under a
    content-addressed name, then the manifest (the commit point), then files it no longer
    names are removed: a reader sees the old engine or the new one, never a mix."""
    folder = Path(root) / key.folder_name()
    folder.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict[str, Any]] = {}
    for name, data in files.items():
        digest = _sha256(data)
        stem, _, ext = name.rpartition("_")
        stem, suffix = (stem, f".{ext}") if ext in ("safetensors", "json") else (name, ".bin")
        filename = f"{stem}-{digest[:12]}{suffix}"
        atomic_write_bytes(folder / filename, data)
        entries[name] = {"file": filename, "sha256": digest, "bytes": len(data)}
    manifest = EngineManifest(key, entries, dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                              round(float(build_seconds), 3), dict(cache_entries or {}))
    atomic_write_text(folder / MANIFEST, manifest.to_json())
    keep = {e["file"] for e in entries.values()} | {MANIFEST}
    for stale in folder.iterdir():
        if stale.is_file() and stale.name not in keep and not stale.name.startswith("."):
            stale.unlink(missing_ok=True)
    return folder


@dataclass(frozen=True)
class EngineStatus:
    """What ``load_engine`` did: ``folder`` of the engine used (None: none found / policy off),
    ``cache_entries`` installed per cache kind, and ``rebuild`` (the build command)."""

    folder: Path | None
    cache_entries: dict[str, int]
    rebuild: str

    @property
    def loaded(self) -> bool:
        return self.folder is not None


def load_engine(spec: EncoderSpec, key: EngineKey, *, engine_dir: Path | None = None,
                policy: str | None = None, cache: CompileCache | None = None,
                load_cache: bool = True) -> EngineStatus:
    """Install ``spec``'s stored engine into the compiler caches -- call it before the encoder's
    first compile. Policy ``off``/``eager``: does nothing. No engine: logs that
    ``clipfp8 build-engine`` would make the next start fast. ``load_cache=False``: only find
    and check the engine (an eager caller wants its converted model, not its compiled code).
    Raises ``EngineMismatchError`` / ``EngineError`` (see ``find_engine``, ``read_engine_file``)."""
    rebuild = rebuild_command(spec, engine_dir)
    if engine_policy(policy) != "auto":
        return EngineStatus(None, {}, rebuild)
    root = engine_root(spec, key.checksum, engine_dir)
    manifest = find_engine(root, key, rebuild)
    if manifest is None:
        log.info("no compiled engine for %s %s in %s: compiling on first use (about a minute for a large "
                 "model); `%s` stores one so later starts skip that", spec.precision, key.model_id, root, rebuild)
        return EngineStatus(None, {}, rebuild)
    folder = root / key.folder_name()
    if not load_cache:
        return EngineStatus(folder, {}, rebuild)
    data = read_engine_file(folder, manifest, "compile_cache", rebuild)
    if key.max_batch > manifest.key.max_batch:
        log.info("engine %s was warmed up to batch %d, this encoder runs batch %d: the compiled graph is "
                 "dynamic in the batch, so it still applies", folder, manifest.key.max_batch, key.max_batch)
    try:
        entries = (cache or TorchCompileCache()).load(data)
    except Exception as e:  # torch raises assorted errors on foreign artifact bytes
        raise EngineError(f"engine {folder}: the compiler could not load its cache ({type(e).__name__}: {e}); "
                          f"rebuild it with `{rebuild}`") from e
    log.info("loaded compiled engine %s (%s)", folder, ", ".join(f"{v} {k}" for k, v in sorted(entries.items())))
    return EngineStatus(folder, entries, rebuild)


def prepare_engine(spec: EncoderSpec, *, checksum: str, model_id: str, variant: str = "",
                   engine: str | None = None, engine_dir: Path | None = None, cache: CompileCache | None = None,
                   machine: MachineInfo | None = None, load_cache: bool = True) -> EngineStatus:
    """``load_engine`` for an encoder of ``spec`` about to be compiled (what the factories call):
    builds this machine's ``EngineKey`` from the checkpoint-side fields. ``engine``: the policy
    (default ``$CLIPFP8_ENGINE``)."""
    policy = engine_policy(engine)
    if policy != "auto":
        return EngineStatus(None, {}, rebuild_command(spec, engine_dir))
    machine = machine or MachineInfo.current(spec.resolved_device())
    key = EngineKey.for_machine(machine, checksum=checksum, model_id=model_id, precision=spec.precision,
                                max_batch=spec.batch_size, variant=variant)
    return load_engine(spec, key, engine_dir=engine_dir, policy=policy, cache=cache, load_cache=load_cache)


__all__ = ["prepare_engine", "configure_compile_cache", "EngineKey", "EngineManifest", "EngineStatus",
           "MachineInfo", "CompileCache", "TorchCompileCache",
           "load_engine", "find_engine", "write_engine", "read_engine_file", "verified_engine_file", "engine_root", "engine_policy",
           "rebuild_command", "default_cache_root", "ENGINE_PRECISIONS", "MATCH_FIELDS", "MANIFEST",
           "ENGINE_ENV", "ENGINE_DIR_ENV", "POLICIES"]
