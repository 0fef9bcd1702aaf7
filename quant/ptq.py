"""FP8 post-training quantization (W8A8 FP8 E4M3, per-tensor, static, ``max`` calibration).

The trap this module exists to avoid: ModelOpt's ``FP8_DEFAULT_CFG`` disables ``*visual*`` and
``*vision_model*``, so on an open_clip CLIP it quantizes only the text tower and the image
embeddings stay bit-identical to fp32. We build our own config from a deep copy of the preset
(never mutating it), drop the vision-tower disables, add the attention quantizers of
``quant.attention`` and our own name-pattern exclusions, then calibrate BOTH towers on
image-text pairs. The audit (``quant.audit``) then proves what actually runs in FP8.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from clipfp8.quant.attention import ATTENTION_QUANTIZERS, convert_attention, register_quant_attention
from clipfp8.quant.audit import AuditReport, audit, quantizer_counts
from clipfp8.quant.core.errors import CalibrationDataError, QuantError
from clipfp8.quant.core.models import LoadedModel
from clipfp8.quant.core.protocols import as_clip
from clipfp8.quant.qconfig import TOWERS, QuantConfig

log = logging.getLogger(__name__)

#: Calibration batch: images float32 (B, 3, H, W) and tokens int64 (B, L).
CalibBatch = tuple[torch.Tensor, torch.Tensor]

#: Rules of the preset that switch whole vision towers off (the trap); we drop them.
_VISION_TOWER_RULES = frozenset({"*visual*", "*vision_model*", "*vision_tower*", "*embed_vision*",
                                 "*multi_modal_projector*"})
#: The ModelOpt version whose config layout (``quant_cfg`` = list of rule dicts) we rely on.
PINNED_MODELOPT = "0.47"


@dataclass
class QuantResult:
    """Outcome of ``quantize``: the model (quantized in place), the audit report and counts."""

    model: nn.Module
    report: AuditReport
    attention_converted: int
    quantizers_enabled: int
    quantizers_total: int
    calib_samples: int
    mtq_config: dict[str, Any] = field(repr=False, default_factory=dict)


def tower_prefixes(model: nn.Module) -> dict[str, list[str]]:
    """Top-level module names of each tower: image = ``visual``; text = every other child
    that holds parameters (``transformer``/``token_embedding``/... for CLIP, ``text`` for
    CustomTextCLIP)."""
    names = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    return {"image": [n for n in names if n == "visual"], "text": [n for n in names if n != "visual"]}


def build_mtq_config(qcfg: QuantConfig, model: nn.Module) -> dict[str, Any]:
    """The ModelOpt config for ``qcfg`` on ``model``: a deep copy of ``FP8_DEFAULT_CFG`` minus its
    vision-tower disables, plus attention quantizers, LayerNorm off, exclusions and towers.

    Rules are applied in order by ModelOpt, later rules win; so enables come before disables.
    """
    import modelopt
    import modelopt.torch.quantization as mtq

    if not modelopt.__version__.startswith(PINNED_MODELOPT):
        log.warning("nvidia-modelopt %s: this config layout was written for %s.x",
                    modelopt.__version__, PINNED_MODELOPT)
    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    rules = cfg.get("quant_cfg")
    if not isinstance(rules, list) or cfg.get("algorithm") != "max":
        raise QuantError(f"unexpected FP8_DEFAULT_CFG layout in nvidia-modelopt {modelopt.__version__} "
                         f"(expected a rule list and algorithm 'max'; pinned to {PINNED_MODELOPT})")
    fp8 = next((copy.deepcopy(r["cfg"]) for r in rules if r.get("quantizer_name") == "*input_quantizer"), None)
    if fp8 is None or tuple(fp8.get("num_bits", ())) != (4, 3) or fp8.get("axis") is not None:
        raise QuantError("FP8_DEFAULT_CFG has no per-tensor E4M3 '*input_quantizer' rule")
    rules = [r for r in rules if r.get("quantizer_name") not in _VISION_TOWER_RULES]
    if qcfg.quantize_attention:
        rules += [{"quantizer_name": f"*{q}", "cfg": copy.deepcopy(fp8)} for q in ATTENTION_QUANTIZERS]
    # ModelOpt quantizes nn.LayerNorm inputs (HF BERT's LayerNorms); that is no GEMM and only
    # costs accuracy, so keep them off.
    rules.append({"quantizer_name": "*", "parent_class": "nn.LayerNorm", "enable": False})
    prefixes = tower_prefixes(model)
    skipped = [p for t in TOWERS if t not in qcfg.towers for p in prefixes[t]]
    for pat in (*qcfg.exclude, *skipped):
        rules.append({"quantizer_name": f"{pat}.*", "enable": False})
    cfg["quant_cfg"] = rules
    return cfg


def _forward_loop(batches: Iterable[CalibBatch], device: torch.device) -> tuple[Any, list[int]]:
    """A ModelOpt forward loop over image-text pairs running BOTH towers; counts samples."""
    seen = [0]

    def loop(model: nn.Module) -> None:
        clip = as_clip(model)
        with torch.no_grad():
            for images, tokens in batches:
                if images.shape[0] != tokens.shape[0]:
                    raise CalibrationDataError(
                        f"calibration batch has {images.shape[0]} images but {tokens.shape[0]} captions")
                clip.encode_image(images.to(device=device, dtype=torch.float32))
                clip.encode_text(tokens.to(device))
                seen[0] += int(images.shape[0])

    return loop, seen


def avoid_modelopt_cuda_jit() -> None:
    """Make ModelOpt fake-quantize FP8 with its eager torch path instead of JIT-building its CUDA
    extension (49 s on the H200 on first use; needs nvcc); the two compute the same rounding."""
    try:
        from modelopt.torch.quantization import extensions
    except ImportError:  # pragma: no cover - modelopt is a dependency
        return
    extensions.get_cuda_ext_fp8.extension = None


def prepare_model(model: nn.Module) -> int:
    """Make ``model`` quantizable: rewrite attention and register our quantized modules."""
    register_quant_attention()
    return convert_attention(model)


def quantize(loaded: LoadedModel, calib: Iterable[CalibBatch], qcfg: QuantConfig | None = None) -> QuantResult:
    """Quantize ``loaded.model`` in place and calibrate it on ``calib``; then audit it.

    ``calib`` yields (images float32 (B, 3, H, W), tokens int64 (B, L)) pairs; the first batch
    is also the audit batch. Raises ``CalibrationDataError`` when ``calib`` is empty and
    ``quant.core.errors.AuditError`` when the audit finds a silent high-precision gap.
    """
    import modelopt.torch.quantization as mtq

    avoid_modelopt_cuda_jit()
    qcfg = qcfg or QuantConfig()
    model = loaded.model.float().eval()
    device = next(model.parameters()).device
    converted = prepare_model(model)
    batches = _FirstKept(calib)
    loop, seen = _forward_loop(batches, device)
    mtq_cfg = build_mtq_config(qcfg, model)
    with quiet_stdout():
        mtq.quantize(model, mtq_cfg, loop)
    if seen[0] == 0 or batches.first is None:
        raise CalibrationDataError("calibration produced no batch: nothing to calibrate on")
    log.info("calibrated on %d image-text pairs", seen[0])
    report = audit(model, batches.first, qcfg)
    enabled, total = quantizer_counts(model)
    return QuantResult(model, report, converted, enabled, total, seen[0], mtq_cfg)


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """ModelOpt prints progress ("Inserted N quantizers") to stdout; route it to the log so
    CLI output stays the report."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        for line in buf.getvalue().splitlines():
            log.debug("modelopt: %s", line)


class _FirstKept:
    """Iterates ``it`` once, keeping its first batch (the audit batch)."""

    def __init__(self, it: Iterable[CalibBatch]) -> None:
        self._it = it
        self.first: CalibBatch | None = None

    def __iter__(self) -> Iterator[CalibBatch]:
        for batch in self._it:
            if self.first is None:
                self.first = (batch[0][:8].clone(), batch[1][:8].clone())
            yield batch


__all__ = ["QuantConfig", "QuantResult", "quantize", "avoid_modelopt_cuda_jit", "build_mtq_config", "prepare_model",
           "tower_prefixes", "quiet_stdout", "CalibBatch", "TOWERS"]
