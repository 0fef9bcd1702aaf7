"""Which of an index's encoders to run, and how: its recorded ``EncoderSpec``, or the user's flags.

``index`` records each encoder's ``EncoderSpec.to_record()`` (model, precision, quantized dir,
batch size; ``IndexStore.recorded_spec``), so ``search``, ``serve`` and ``verify --repair``
rebuild the same encoder without the user repeating --model/--checkpoint/--quantized. Flags the
user does give still win, but the model must be the one the index was built with (its
``model_id``); a different quantized directory is checked later by the identity checksum.

Pure functions over the index's encoder rows (``IndexStore.stats()["encoders"]``) and recorded
specs, so the CLI and the app share them and tests need no model.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipfp8.indexing.errors import EncoderMismatchError, EncoderSpecError, UnknownEncoderError
from clipfp8.quant.core.config import (
    AUTO_PRECISION,
    CPU_BASELINE_NOTE,
    DEFAULT_MODEL_NAME,
    EncoderSpec,
    ModelSpec,
    as_precision,
    baseline_precision,
    resolve_device,
)

log = logging.getLogger(__name__)

#: Baseline (non-FP8) precisions, in the order ``auto`` falls back through them.
BASELINE_PRECISIONS = ("fp16", "bf16", "fp32")
FP8_PRECISIONS = ("fp8-fake", "fp8", "trt-fp8")


@dataclass(frozen=True)
class SpecOverrides:
    """What the user gave explicitly; None means "not given: use what the index recorded".

    ``model``: from --model/--pretrained/--checkpoint/--random-init. ``text_only``: only texts
    will be encoded (a text query), see ``EncoderSpec.text_only``; ``image_only`` likewise.
    """

    model: ModelSpec | None = None
    quantized: Path | None = None
    batch_size: int | None = None
    device: str = "auto"
    text_only: bool = False
    image_only: bool = False


def choose_encoder(encoders: Mapping[str, Mapping[str, Any]], precision: str, device: str = "auto",
                   model: str | None = None) -> str:
    """The name of the index's encoder to run for ``--precision``.

    ``encoders``: name -> row with ``precision`` (``IndexStore.stats()["encoders"]``).
    ``auto``: the baseline the index holds, preferring this device's (fp16 on CUDA, fp32 on the
    CPU), else the index's first encoder. Another precision: the encoder of that precision;
    when several models share it, the one whose name starts with ``model``. Raises
    ``UnknownEncoderError`` naming the encoders the index has.
    """
    names = list(encoders)
    if not names:
        raise UnknownEncoderError("the index has no encoders yet; run `clipfp8 index` first")
    if precision == AUTO_PRECISION:
        prefer = baseline_precision(device)
        for p in (prefer, *(b for b in BASELINE_PRECISIONS if b != prefer)):
            found = [n for n in names if encoders[n].get("precision") == p]
            if found:
                return _one(found, model, p, names)
        return names[0]
    found = [n for n in names if encoders[n].get("precision") == precision or n.endswith(f"-{precision}")]
    return _one(found, model, precision, names)


def _one(found: list[str], model: str | None, precision: str, names: list[str]) -> str:
    if len(found) > 1 and model:
        found = [n for n in found if n.startswith(f"{model}-")]
    if len(found) != 1:
        raise UnknownEncoderError(f"--precision {precision}: the index has encoders {names}; "
                                  f"{'none' if not found else 'several'} match"
                                  + (" (pick one with --model)" if len(found) > 1 else ""))
    return found[0]


def spec_for_encoder(name: str, row: Mapping[str, Any], recorded: Mapping[str, Any] | None,
                     given: SpecOverrides) -> EncoderSpec:
    """The ``EncoderSpec`` that rebuilds index encoder ``name`` (``row``: its encoder row, with
    ``precision`` and ``model_id``; ``recorded``: its recorded spec or None).

    Raises ``EncoderMismatchError`` when the given model is not the index's, and
    ``EncoderSpecError`` when something needed is neither recorded nor given."""
    precision = str(row["precision"])
    model = _model(name, row, recorded, given)
    quantized = None
    if precision in FP8_PRECISIONS:
        quantized = _quantized(name, recorded, given)
    batch = given.batch_size or int((recorded or {}).get("batch_size") or 64)
    return EncoderSpec(model=model, precision=as_precision(precision), device=given.device,
                       quantized=quantized, batch_size=batch, text_only=given.text_only,
                       image_only=given.image_only)


def _model(name: str, row: Mapping[str, Any], recorded: Mapping[str, Any] | None, given: SpecOverrides) -> ModelSpec:
    stored_id = str(row.get("model_id", ""))
    if given.model is not None:
        if stored_id and given.model.model_id() != stored_id:
            raise EncoderMismatchError(
                f"--model: the index's encoder {name!r} was built with model {stored_id!r}, not "
                f"{given.model.model_id()!r}; leave out --model/--pretrained/--checkpoint to use the "
                "model the index recorded")
        return given.model
    if recorded is not None:
        try:
            return ModelSpec.from_dict(dict(recorded["model"]))
        except (KeyError, TypeError, ValueError) as e:
            raise EncoderSpecError(f"the recorded model of encoder {name!r} is invalid ({e}); pass "
                                   "--model/--pretrained/--checkpoint") from e
    if stored_id in ("", DEFAULT_MODEL_NAME):
        return ModelSpec()
    raise EncoderSpecError(f"the index does not record how encoder {name!r} was built (model "
                           f"{stored_id!r}; indexed by an older clip-fp8): pass --model (and "
                           "--pretrained/--checkpoint) as for `clipfp8 index`")


def _quantized(name: str, recorded: Mapping[str, Any] | None, given: SpecOverrides) -> Path:
    if given.quantized is not None:
        return given.quantized
    stored = (recorded or {}).get("quantized")
    if not stored:
        raise EncoderSpecError(f"encoder {name!r} runs a quantized checkpoint the index does not record: "
                               "pass --quantized DIR (the directory written by `clipfp8 quantize`)")
    path = Path(stored)
    if not path.is_dir():
        raise EncoderSpecError(f"encoder {name!r} was indexed with the quantized checkpoint {path}, which is "
                               "gone: pass --quantized DIR where it is now")
    return path


def resolve_precision(precision: str, device: str) -> str:
    """``--precision`` for building a new encoder: ``auto`` -> the baseline of ``device`` (fp16 on
    CUDA, fp32 on the CPU, logged with the reason); an explicit fp16/bf16 on the CPU warns."""
    dev = resolve_device(device)
    if precision == AUTO_PRECISION:
        chosen = baseline_precision(dev)
        if chosen == "fp32":
            log.info("--precision auto: fp32 (%s)", CPU_BASELINE_NOTE)
        return chosen
    warn_cpu_half(precision, dev)
    return precision


def warn_cpu_half(precision: str, device: str) -> None:
    """Warn when a 16-bit precision is about to run on the CPU."""
    if precision in ("fp16", "bf16") and not resolve_device(device).startswith("cuda"):
        log.warning("%s on the CPU runs 5-10x slower than fp32 (no fast 16-bit CPU matmuls); "
                    "use --precision fp32 or auto on the CPU", precision)


__all__ = ["SpecOverrides", "choose_encoder", "spec_for_encoder", "resolve_precision", "warn_cpu_half",
           "BASELINE_PRECISIONS", "FP8_PRECISIONS"]
