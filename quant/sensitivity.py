"""Which parts of the model suffer most from FP8? Choose exclusions from data.

The model is quantized and calibrated once; then each unit (a transformer block, or a
quantized module outside the blocks such as a text projection) has its quantizers disabled in
turn, and the embeddings of a small eval set are compared with fp32: mean cosine per tower and
image->text recall@1 on the eval pairs. A unit whose high-precision version recovers a lot is
a candidate for ``QuantConfig.exclude``.
"""
from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from clipfp8.quant.core.models import LoadedModel
from clipfp8.quant.core.protocols import as_clip
from clipfp8.quant.ptq import CalibBatch, QuantConfig, quantize

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"^(.*\.(?:resblocks|layer|layers|blocks)\.\d+)(?:\.|$)")


@dataclass
class SensitivityRow:
    """Metrics with ``unit`` left in high precision (``unit == "<all fp8>"``: nothing disabled).

    ``image_cos``/``text_cos``: mean cosine to the fp32 embeddings; ``recall_i2t``: image->text
    recall@1 on the eval pairs; ``delta_*``: change versus all-FP8 (positive = the unit hurts).
    """

    unit: str
    image_cos: float
    text_cos: float
    recall_i2t: float
    delta_image_cos: float = 0.0
    delta_text_cos: float = 0.0
    delta_recall: float = 0.0


@dataclass
class SensitivityReport:
    fp32_recall_i2t: float
    baseline: SensitivityRow
    rows: list[SensitivityRow]

    def to_dict(self) -> dict[str, Any]:
        return {"fp32_recall_i2t": self.fp32_recall_i2t, "baseline": asdict(self.baseline),
                "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        head = f"{'unit kept in high precision':<52} {'img cos':>8} {'txt cos':>8} {'R@1 i2t':>8} {'dR@1':>7}"
        lines = [head, f"{'(fp32 reference)':<52} {1.0:>8.4f} {1.0:>8.4f} {self.fp32_recall_i2t:>8.3f} {'':>7}"]
        for r in [self.baseline, *self.rows]:
            lines.append(f"{r.unit:<52} {r.image_cos:>8.4f} {r.text_cos:>8.4f} {r.recall_i2t:>8.3f} "
                         f"{r.delta_recall:>+7.3f}")
        return "\n".join(lines)


def quant_units(model: nn.Module) -> dict[str, list[Any]]:
    """Unit name -> its enabled TensorQuantizers: transformer blocks, and modules outside them."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    units: dict[str, list[Any]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, TensorQuantizer) and mod.is_enabled:
            owner = name.rpartition(".")[0]
            m = _BLOCK.match(owner)
            units.setdefault(m.group(1) if m else owner, []).append(mod)
    return units


@torch.no_grad()
def _embed(model: nn.Module, batches: list[CalibBatch]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> unit-norm image (N, D) and text (N, D) float32 embeddings of the eval pairs."""
    dev = next(model.parameters()).device
    clip = as_clip(model)
    imgs = torch.cat([clip.encode_image(i.to(dev)).float() for i, _ in batches])
    txts = torch.cat([clip.encode_text(t.to(dev)).float() for _, t in batches])
    return torch.nn.functional.normalize(imgs, dim=-1).cpu(), torch.nn.functional.normalize(txts, dim=-1).cpu()


def recall_i2t(img: torch.Tensor, txt: torch.Tensor, tokens: torch.Tensor) -> float:
    """Image->text recall@1: the nearest text has the same tokens as the image's own caption."""
    best = (img @ txt.T).argmax(dim=1)
    return float((tokens[best] == tokens).all(dim=1).float().mean())


def _row(unit: str, ref: tuple[torch.Tensor, torch.Tensor], emb: tuple[torch.Tensor, torch.Tensor],
         tokens: torch.Tensor) -> SensitivityRow:
    return SensitivityRow(unit, float((ref[0] * emb[0]).sum(-1).mean()), float((ref[1] * emb[1]).sum(-1).mean()),
                          recall_i2t(*emb, tokens))


def sensitivity(loaded: LoadedModel, calib: Iterable[CalibBatch], eval_batches: list[CalibBatch],
                qcfg: QuantConfig | None = None) -> SensitivityReport:
    """Sweep: quantize a copy of ``loaded`` once, then leave one unit at a time in high precision.

    ``eval_batches``: (images float32 (B, 3, H, W), tokens int64 (B, L)) pairs to measure on.
    Rows are sorted by how much recall@1 (then image+text cosine) the unit recovers.
    """
    if not eval_batches:
        raise ValueError("sensitivity: eval_batches is empty")
    tokens = torch.cat([t for _, t in eval_batches])
    ref = _embed(loaded.model.float().eval(), eval_batches)
    work = copy.copy(loaded)
    work.model = copy.deepcopy(loaded.model)
    quantize(work, calib, qcfg or QuantConfig())
    base = _row("<all fp8>", ref, _embed(work.model, eval_batches), tokens)
    rows = []
    for unit, quantizers in quant_units(work.model).items():
        for q in quantizers:
            q.disable()
        r = _row(unit, ref, _embed(work.model, eval_batches), tokens)
        for q in quantizers:
            q.enable()
        r.delta_image_cos, r.delta_text_cos = r.image_cos - base.image_cos, r.text_cos - base.text_cos
        r.delta_recall = r.recall_i2t - base.recall_i2t
        rows.append(r)
        log.debug("sensitivity %s: %s", unit, r)
    rows.sort(key=lambda r: (r.delta_recall, r.delta_image_cos + r.delta_text_cos), reverse=True)
    return SensitivityReport(recall_i2t(*ref, tokens), base, rows)


__all__ = ["sensitivity", "SensitivityReport", "SensitivityRow", "quant_units", "recall_i2t"]
