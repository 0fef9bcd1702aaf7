"""Save and load a quantized model without pickle.

A quantized directory holds:

* ``model.safetensors`` -- every parameter and buffer, including each quantizer's ``_amax``;
* ``modelopt_state.json`` -- ``mto.modelopt_state(model)`` (the quantizer placement and
  attributes). It is not plain JSON (tuples such as ``num_bits=(4, 3)``, ``torch.dtype``,
  ``torch.Size``), so those are written as tagged objects (``{"__tuple__": [...]}``,
  ``{"__dtype__": "float32"}``, ``{"__size__": [...]}``) and decoded on load; any other
  non-JSON object makes saving fail instead of being pickled;
* ``model_spec.json`` (``ModelSpec``), ``quant_config.json`` (``QuantConfig``);
* ``manifest.json`` -- format version, library versions and the checksum over weights +
  quant config + amaxes (``load_quantized`` recomputes and checks it);
* ``audit.json`` / ``audit.txt`` when a report is given.

The directory is written to a temporary sibling and swapped into place by
``quant.core.fileio.replace_dir`` (fsynced, old copy deleted only after the rename), so a failed
save leaves nothing half-written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from clipfp8.quant.core.config import EncoderSpec, ModelSpec
from clipfp8.quant.core.encoder import TorchEncoder, torch_encoder_for
from clipfp8.quant.core.errors import ModelLoadError, QuantError
from clipfp8.quant.core.fileio import replace_dir
from clipfp8.quant.core.models import LoadedModel, load_model, load_safetensors_into, state_checksum
from clipfp8.quant.ptq import QuantConfig, prepare_model, quiet_stdout

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS, MO_STATE, SPEC, QCFG, MANIFEST = ("model.safetensors", "modelopt_state.json", "model_spec.json",
                                           "quant_config.json", "manifest.json")


def encode_state(x: Any) -> Any:
    """ModelOpt state -> JSON-safe data (tagged tuples/dtypes/sizes). Raises ``QuantError``
    on any other non-JSON object (never falls back to pickle)."""
    if isinstance(x, dict):
        if not all(isinstance(k, str) for k in x):
            raise QuantError(f"modelopt state has a non-string key in {list(x)[:3]}")
        return {k: encode_state(v) for k, v in x.items()}
    if isinstance(x, torch.Size):
        return {"__size__": list(x)}
    if isinstance(x, tuple):
        return {"__tuple__": [encode_state(v) for v in x]}
    if isinstance(x, list):
        return [encode_state(v) for v in x]
    if isinstance(x, torch.dtype):
        return {"__dtype__": str(x).removeprefix("torch.")}
    if x is None or isinstance(x, (str, bool, int, float)):
        return x
    raise QuantError(f"modelopt state holds a {type(x).__name__} that cannot be stored as JSON: {x!r}")


def decode_state(x: Any) -> Any:
    """Inverse of ``encode_state``."""
    if isinstance(x, dict):
        if set(x) == {"__tuple__"}:
            return tuple(decode_state(v) for v in x["__tuple__"])
        if set(x) == {"__size__"}:
            return torch.Size(x["__size__"])
        if set(x) == {"__dtype__"}:
            dt = getattr(torch, x["__dtype__"], None)
            if not isinstance(dt, torch.dtype):
                raise ValueError(f"unknown dtype {x['__dtype__']!r}")
            return dt
        return {k: decode_state(v) for k, v in x.items()}
    if isinstance(x, list):
        return [decode_state(v) for v in x]
    return x


def quant_checksum(state: dict[str, torch.Tensor], qcfg: QuantConfig) -> str:
    """16 hex chars over weights + amaxes (both in ``state``) and the quant config."""
    h = hashlib.sha256(state_checksum(state).encode())
    h.update(json.dumps(qcfg.to_dict(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared/non-contiguous storage: store independent contiguous copies.
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_quantized(loaded: LoadedModel, out_dir: Path, qcfg: QuantConfig, report: Any = None) -> Path:
    """Write the quantized ``loaded.model`` to ``out_dir`` atomically; returns ``out_dir``.

    An existing ``out_dir`` is replaced only if it is an earlier quantized directory (has
    ``manifest.json``); any other existing path raises ``ValueError`` naming it.
    """
    import modelopt
    import modelopt.torch.opt as mto
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and ((out_dir / MANIFEST).is_file() or not any(out_dir.iterdir()))):
        raise ValueError(f"output {out_dir} exists and is not a quantized-model directory; refusing to overwrite")
    state = _weights(loaded.model)
    mo_state = encode_state(mto.modelopt_state(loaded.model))
    manifest = {"format_version": FORMAT_VERSION, "checksum": quant_checksum(state, qcfg),
                "modelopt_version": modelopt.__version__, "torch_version": torch.__version__,
                "model_id": loaded.spec.model_id(), "embed_dim": loaded.embed_dim}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(state, str(tmp / WEIGHTS))
        (tmp / MO_STATE).write_text(json.dumps(mo_state))
        (tmp / SPEC).write_text(json.dumps(loaded.spec.to_dict(), indent=2))
        (tmp / QCFG).write_text(json.dumps(qcfg.to_dict(), indent=2))
        if report is not None:
            (tmp / "audit.json").write_text(report.to_json())
            (tmp / "audit.txt").write_text(report.table() + "\n")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        replace_dir(tmp, out_dir)  # fsyncs every file first; the old dir goes only after the swap
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved quantized model to %s (checksum %s)", out_dir, manifest["checksum"])
    return out_dir


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ModelLoadError(f"quantized checkpoint is incomplete: {path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise ModelLoadError(f"{path}: not readable JSON ({e})") from e


def read_model_spec(directory: Path) -> ModelSpec:
    """The ``ModelSpec`` a quantized directory was made from (cheap: reads JSON only)."""
    path = Path(directory) / SPEC
    try:
        return ModelSpec.from_dict(_read_json(path))
    except (ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"{path}: invalid model spec: {e}") from e


def check_same_model(directory: Path, expected: ModelSpec) -> None:
    """Refuse a quantized directory made from another model than ``expected``, so an FP8 encoder
    is never silently compared with (or indexed next to) the FP16 encoder of a different model."""
    got = read_model_spec(directory)
    if got.model_id() != expected.model_id():
        raise ModelLoadError(
            f"{Path(directory) / SPEC}: quantized from model {got.model_id()!r}, but the model asked for "
            f"is {expected.model_id()!r}; pass the same --model/--pretrained/--checkpoint as for `quantize`")


def load_quantized(directory: Path) -> tuple[LoadedModel, str]:
    """Rebuild the model saved by ``save_quantized`` -> (LoadedModel with the fake-quantized
    model, checksum over weights + quant config + amaxes). Raises ``ModelLoadError`` naming the
    file that is missing, corrupt or does not match the model/config."""
    import modelopt.torch.opt as mto

    directory = Path(directory)
    if not directory.is_dir():
        raise ModelLoadError(f"quantized checkpoint directory not found: {directory}")
    manifest = _read_json(directory / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{directory / MANIFEST}: unsupported format_version "
                             f"{manifest.get('format_version') if isinstance(manifest, dict) else None!r} "
                             f"(this version reads {FORMAT_VERSION})")
    try:
        spec = ModelSpec.from_dict(_read_json(directory / SPEC))
        qcfg = QuantConfig.from_dict(_read_json(directory / QCFG))
        mo_state = decode_state(_read_json(directory / MO_STATE))
    except (ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"{directory}: invalid model_spec/quant_config/modelopt_state JSON: {e}") from e
    loaded = load_model(spec)
    prepare_model(loaded.model)
    try:
        with quiet_stdout():
            mto.restore_from_modelopt_state(loaded.model, mo_state)
    except Exception as e:  # ModelOpt raises assorted errors on a mismatched state
        raise ModelLoadError(f"{directory / MO_STATE} does not match the model in {directory / SPEC}: {e}") from e
    path = directory / WEIGHTS
    if not path.is_file():
        raise ModelLoadError(f"quantized checkpoint is incomplete: {path} is missing")
    # Every tensor (weights and quantizer amaxes) must match in name and shape.
    load_safetensors_into(loaded.model, path)
    loaded.model.eval()
    checksum = quant_checksum(_weights(loaded.model), qcfg)
    if checksum != manifest.get("checksum"):
        raise ModelLoadError(f"{directory / MANIFEST}: checksum mismatch (stored {manifest.get('checksum')}, "
                             f"computed {checksum}); the weights or quant config were modified")
    return loaded, checksum


def load_quant_config(directory: Path) -> QuantConfig:
    """The ``QuantConfig`` stored in a quantized directory."""
    try:
        return QuantConfig.from_dict(_read_json(Path(directory) / QCFG))
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{Path(directory) / QCFG}: invalid quant config: {e}") from e


def create_fake_quant_encoder(spec: EncoderSpec) -> TorchEncoder:
    """Registered factory of precision ``fp8-fake``: the ModelOpt fake-quantized model saved in
    ``spec.quantized`` (FP8 rounding simulated; CPU or GPU, no speed-up)."""
    if spec.quantized is None:
        raise ModelLoadError("precision 'fp8-fake' needs --quantized (a directory written by `clipfp8 quantize`)")
    check_same_model(spec.quantized, spec.model)
    loaded, checksum = load_quantized(spec.quantized)
    return torch_encoder_for(loaded, spec, checksum)


__all__ = ["create_fake_quant_encoder", "save_quantized", "load_quantized", "load_quant_config", "read_model_spec", "check_same_model", "encode_state", "decode_state",
           "quant_checksum"]
