"""The converted FP8 model of an engine, stored without pickle, so that a start with a built
engine needs neither ModelOpt nor the fake-quant checkpoint load (``load_quantized`` ->
``restore_from_modelopt_state`` -> ``convert_to_fp8``).

Two files in the engine folder (written by ``engine.write_engine``, sha256 in its manifest):

* ``fp8_runtime_safetensors``: the converted model's state dict (float8_e4m3fn weights, fp32
  scales, 16-bit rest);
* ``fp8_runtime_plan_json``: ``{"format": 1, "modules": [{"path", "kind", ...}], "report": ...}``:
  which modules of the plain model (``load_model`` + ``convert_attention``) the conversion
  replaced and by what, parents before children; ``report`` is ``ConversionReport.to_dict()``.

``export_runtime`` returns None for a model holding a module it cannot rebuild (e.g. a ModelOpt
class, as the embedded default model's quantized BERT attention); ``runtime_files`` also checks
that the rebuilt model computes exactly what the converted one does before anything is stored.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipfp8.quant.core.config import ModelSpec
from clipfp8.quant.core.models import LoadedModel, has_image_tower
from clipfp8.quant.runtime.convert import ConversionReport, cast_for_runtime
from clipfp8.quant.runtime.fp8_attention import KERNELS, FP8Attention, warn_flash_experimental
from clipfp8.quant.runtime.fp8_linear import DisabledQuantizer, FakeQuantFP8, FP8Embedding, FP8Linear
from clipfp8.quant.runtime.runtime_trace import tower_of

log = logging.getLogger(__name__)

PLAN_FORMAT = 1
STATE_FILE, PLAN_FILE = "fp8_runtime_safetensors", "fp8_runtime_plan_json"
_WRAPPABLE = (nn.LayerNorm, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def plain_model(model: ModelSpec, text_only_checksum: str | None = None) -> LoadedModel:
    """``load_model`` + ``convert_attention``: the model ``convert_to_fp8`` started from, minus
    ModelOpt's wrappers (fp32, CPU). ``text_only_checksum``: the FP8 model's digest, to load it without
    its image tower (``models.without_image_tower`` after the whole load, so the module tree is the
    converted one's; identified by that digest, nothing hashed)."""
    from clipfp8.quant.attention import convert_attention
    from clipfp8.quant.core.models import load_model, without_image_tower

    loaded = load_model(model)
    if text_only_checksum:
        loaded = without_image_tower(loaded, checksum=text_only_checksum)
    convert_attention(loaded.model)
    return loaded


def text_tower_only(plan: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``plan`` and ``state`` without the image tower's modules and tensors (``tower_of``), for a
    model loaded ``text_only`` (its ``visual`` is a stand-in without parameters)."""
    kept = {**plan, "modules": [e for e in plan["modules"] if tower_of(e["path"]) != "image"]}
    return kept, {k: v for k, v in state.items() if tower_of(k) != "image"}


def _describe(module: nn.Module, parent: dict[str, Any] | None) -> dict[str, Any] | None:
    """How to rebuild ``module`` (kind + constructor arguments), None when it cannot be."""
    if isinstance(module, FP8Linear):
        return {"kind": "fp8_linear", "mode": module.mode, "fast_accum": bool(module.fast_accum)}
    if isinstance(module, FP8Embedding):
        return {"kind": "fp8_embedding"}
    if isinstance(module, FP8Attention):
        return {"kind": "fp8_attention", "heads": int(module.num_heads), "exact_softmax": bool(module.exact_softmax),
                "kernel": module.kernel}
    if isinstance(module, FakeQuantFP8):
        return {"kind": "fake_quant"}
    if isinstance(module, DisabledQuantizer):
        return {"kind": "disabled_quantizer"}
    if type(module) is nn.Identity:
        return {"kind": "identity"}
    if type(module) is nn.Linear:
        return {"kind": "linear", "in": module.in_features, "out": module.out_features, "bias": module.bias is not None}
    if type(module) is nn.Sequential and len(module) == 2 and isinstance(module[0], FakeQuantFP8):
        return {"kind": "sequential"}
    if parent is not None and parent["kind"] == "sequential" and isinstance(module, _WRAPPABLE):
        return {"kind": "wrapped"}  # the plain model's own module, put inside the Sequential
    return None


def export_runtime(model: nn.Module, plain: nn.Module,
                   report: ConversionReport | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(state dict on the CPU, plan) of the converted ``model`` relative to ``plain`` (see the
    module docstring); None when a module cannot be rebuilt (the reason is logged)."""
    plain_modules = dict(plain.named_modules())
    entries: dict[str, dict[str, Any]] = {}
    for path, module in model.named_modules():
        if not path:
            continue
        base = plain_modules.get(path)
        parent = entries.get(path.rpartition(".")[0])
        if base is not None and type(base) is type(module) and parent is None:
            continue
        entry = _describe(module, parent)
        if entry is None:
            log.info("FP8 runtime state not stored: %s (%s.%s) cannot be rebuilt without ModelOpt", path,
                     type(module).__module__, type(module).__name__)
            return None
        entries[path] = {"path": path, **entry}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    plan = {"format": PLAN_FORMAT, "modules": list(entries.values()),
            "report": report.to_dict() if report is not None else None}
    return state, plan


def _construct(entry: dict[str, Any], current: nn.Module | None, state: dict[str, torch.Tensor]) -> nn.Module | None:
    kind, p = entry["kind"], entry["path"]
    if kind == "fp8_linear":
        return FP8Linear(state[f"{p}.weight"], state[f"{p}.weight_scale"], state[f"{p}.input_qmul"],
                         state.get(f"{p}.bias"), mode=entry["mode"], fast_accum=entry["fast_accum"])
    if kind == "fp8_embedding":
        return FP8Embedding(state[f"{p}.weight"], state[f"{p}.weight_scale"], torch.float16)
    if kind == "fp8_attention":
        if current is None or not all(hasattr(current, a) for a in ("q_proj", "k_proj", "v_proj", "out_proj")):
            raise KeyError(f"{p}: the plain model has no attention with q/k/v/out projections there")
        softmax = FakeQuantFP8(torch.ones(1)) if entry["exact_softmax"] else None
        q, k, v, o = (current.get_submodule(a) for a in ("q_proj", "k_proj", "v_proj", "out_proj"))
        att = FP8Attention(entry["heads"], q, k, v, o, softmax_quant=softmax, exact_softmax=entry["exact_softmax"])
        # The engine was built on this GPU kind (its key), so the kernel it used runs here too.
        att.kernel = entry.get("kernel", "torch")
        if att.kernel not in KERNELS:
            raise KeyError(f"{p}: unknown attention kernel {att.kernel!r}")
        return att
    if kind == "fake_quant":
        return FakeQuantFP8(torch.ones(1))  # scales come with the state dict
    if kind == "disabled_quantizer":
        return DisabledQuantizer()
    if kind == "identity":
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(entry["in"], entry["out"], bias=entry["bias"])
    if kind == "sequential":
        if not isinstance(current, _WRAPPABLE):
            raise KeyError(f"{p}: expected a LayerNorm or Conv in the plain model, found {type(current).__name__}")
        return nn.Sequential(FakeQuantFP8(torch.ones(1)), current)
    if kind == "wrapped":
        return None
    raise KeyError(f"{p}: unknown module kind {kind!r}")


def rebuild_runtime(plain: nn.Module, plan: dict[str, Any], state: dict[str, torch.Tensor],
                    device: str | torch.device, dtype: torch.dtype = torch.float16) -> nn.Module:
    """Apply ``plan`` to ``plain`` (in place), load ``state`` (every key must match) and move it to
    ``device``/``dtype`` as ``build_fp8_model`` does. Raises ``KeyError``/``RuntimeError``/
    ``ValueError`` when the plan or state does not fit ``plain``."""
    if plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"FP8 runtime plan format {plan.get('format')!r}, this version reads {PLAN_FORMAT}")
    for entry in sorted(plan["modules"], key=lambda e: e["path"].count(".")):  # parents first
        parent_path, _, name = entry["path"].rpartition(".")
        parent = plain.get_submodule(parent_path) if parent_path else plain
        new = _construct(entry, getattr(parent, name, None), state)
        if new is not None:
            setattr(parent, name, new)
    plain.load_state_dict(state, strict=True)
    if torch.device(device).type == "cuda" and any(e.get("kernel") == "triton" for e in plan["modules"]):
        warn_flash_experimental()
    return cast_for_runtime(plain, device, dtype).eval()


def report_from_plan(plan: dict[str, Any]) -> ConversionReport:
    d = plan.get("report") or {}
    return ConversionReport(fp8=list(d.get("fp8", [])), emulated=[tuple(e) for e in d.get("emulated", [])],
                            high_precision=list(d.get("high_precision", [])),
                            attention=list(d.get("attention", [])), notes=list(d.get("notes", [])))


def encode_plan(state: dict[str, torch.Tensor], plan: dict[str, Any]) -> dict[str, bytes]:
    """The two engine files (name -> bytes) for ``write_engine``."""
    from safetensors.torch import save

    return {STATE_FILE: save(state), PLAN_FILE: json.dumps(plan, indent=1).encode("utf-8")}


def decode_plan(files: dict[str, bytes]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of ``encode_plan``; ``ValueError`` on unreadable content."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(files[STATE_FILE]), _plan(files[PLAN_FILE])
    except SafetensorError as e:
        raise ValueError(f"unreadable FP8 runtime state ({type(e).__name__}: {e})") from e


def _plan(data: bytes) -> dict[str, Any]:
    try:
        plan = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable FP8 runtime state ({type(e).__name__}: {e})") from e
    if not isinstance(plan, dict):
        raise ValueError(f"unreadable FP8 runtime state (the plan is a {type(plan).__name__}, not an object)")
    return plan


def map_state(path: Path, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path`` whose names ``keep`` accepts (all without
    it), memory-mapped (copy on write: writing to them never reaches the file): only what the
    caller then uses is read from disk (a text query's text tower: about a third of ViT-L/14's
    FP8 state). ``ValueError`` on content that is not safetensors; ``OSError`` when the file
    cannot be opened."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)}
    except SafetensorError as e:
        raise ValueError(f"unreadable FP8 runtime state ({type(e).__name__}: {e})") from e


def _not_image(key: str) -> bool:
    return tower_of(key) != "image"


def load_from_engine(spec: Any, folder: Path, rebuild: str, device: str,
                     dtype: torch.dtype = torch.float16) -> tuple[LoadedModel, nn.Module, ConversionReport] | None:
    """The FP8 runtime model stored in engine ``folder`` -> (the plain ``LoadedModel`` for
    preprocess/tokenizer, the runtime model on ``device``, its conversion report); None when the
    engine holds no runtime state. Raises ``EngineError`` naming the folder and ``rebuild``.

    The state file is verified (size, sha256: hashed once per file identity, ``engine``'s
    ``verified_engine_file``) and memory-mapped, so a text-only load reads neither the image
    tower's FP8 weights nor, after its first start, the whole file for its hash (a cold
    ``search`` on ViT-L/14 read and hashed 464 MB for a 160 MB text tower)."""
    from clipfp8.quant.core.errors import EngineError
    from clipfp8.quant.runtime.engine import EngineManifest, read_engine_file, verified_engine_file

    manifest = EngineManifest.read(folder, rebuild)
    if STATE_FILE not in manifest.files or PLAN_FILE not in manifest.files:
        return None
    plan_bytes = read_engine_file(folder, manifest, PLAN_FILE, rebuild)
    state_path = verified_engine_file(folder, manifest, STATE_FILE, rebuild)
    # A text query needs only the text tower: the image tower's FP8 modules are neither built nor
    # moved to the device.
    text_only = bool(getattr(spec, "text_only", False))
    loaded = plain_model(spec.model, text_only_checksum=manifest.key.checksum if text_only else None)
    image = has_image_tower(loaded.model)
    try:
        state = map_state(state_path, keep=None if image else _not_image)
    except OSError as e:  # e.g. replaced by a concurrent rebuild since it was verified
        raise EngineError(f"engine file {state_path} is unreadable ({e}); rebuild it with `{rebuild}`") from e
    except ValueError as e:
        raise EngineError(f"engine file {state_path}: {e}; rebuild it with `{rebuild}`") from e
    if torch.device(device).type != "cuda":  # the model would keep reading the mapped file
        state = {k: v.clone() for k, v in state.items()}
    try:
        plan = _plan(plan_bytes)
        if not image:
            plan, state = text_tower_only(plan, state)
        model = rebuild_runtime(loaded.model, plan, state, device, dtype)
    except (KeyError, RuntimeError, ValueError) as e:
        raise EngineError(f"engine {folder}: its FP8 runtime state does not fit {spec.model.model_id()} "
                          f"({type(e).__name__}: {e}); rebuild it with `{rebuild}`") from e
    del state  # on CUDA the model holds copies now: nothing reads the mapped file any more
    # Checked again once read: a file changed in place since its first check gets a new identity,
    # so it is read and hashed again here and refused unless it still matches the manifest.
    verified_engine_file(folder, manifest, STATE_FILE, rebuild)
    loaded.model = model
    log.info("FP8 runtime model loaded from engine %s (ModelOpt not needed)", folder)
    return loaded, model, report_from_plan(plan)


__all__ = ["load_from_engine", "plain_model", "text_tower_only", "map_state", "export_runtime", "rebuild_runtime", "report_from_plan",
           "encode_plan", "decode_plan", "STATE_FILE", "PLAN_FILE"]
