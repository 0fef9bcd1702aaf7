"""Smoke-run the evaluation without a trained model: a tiny RANDOM open_clip model
(``quant.core.models.tiny_config``) at fp32 (baseline), bf16 and fp8-fake on ``--preset shared``.

    python -m clipfp8.quant.eval.tiny_demo --limit 1000 --output eval-tiny/

fp8-fake comes from ``quant.ptq.quantize`` calibrated on 128 samples of the Imagenette training
shards; it is left out (with a log message) when the quantization package is unavailable. The
numbers only show that the pipeline runs and how far FP8 moves a model's rankings; a random
model's accuracies are at chance level.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from clipfp8.quant.core.config import ModelSpec
from clipfp8.quant.core.encoder import TorchEncoder
from clipfp8.quant.core.models import LoadedModel, load_model, tiny_config
from clipfp8.quant.core.shards import iter_samples
from clipfp8.quant.eval.cli import SHARED_EVAL_DIR, preset_datasets
from clipfp8.quant.eval.datasets import DatasetSpec, open_image
from clipfp8.quant.eval.run import evaluate

log = logging.getLogger(__name__)
CALIB_SHARDS = SHARED_EVAL_DIR.parent / "train" / "imagenette-train"


def _encoder(loaded: LoadedModel, precision: str, model: Any = None) -> TorchEncoder:
    return TorchEncoder(copy.deepcopy(model or loaded.model), loaded.preprocess, loaded.tokenizer,
                        precision=precision, device="cpu", name=f"tiny-{precision}",
                        model_id=loaded.spec.model_id(), checksum=loaded.weights_checksum(),
                        dim=loaded.embed_dim, image_size=loaded.image_size)


def _calibration(loaded: LoadedModel, n: int = 128, batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shard = sorted(CALIB_SHARDS.glob("*.tar.gz"))[0]
    images: list[torch.Tensor] = []
    texts: list[str] = []
    for key, parts in iter_samples(shard):
        if len(images) == n:
            break
        images.append(loaded.preprocess(open_image(parts["jpg"], f"{shard}:{key}")))
        texts.append(parts["txt"].decode("utf-8"))
    return [(torch.stack(images[i:i + batch]), loaded.tokenizer(texts[i:i + batch])) for i in range(0, n, batch)]


def tiny_encoders(seed: int = 0) -> tuple[list[TorchEncoder], list[str]]:
    """fp32, bf16 and (when quantization works here) fp8-fake encoders of one tiny random model."""
    torch.manual_seed(seed)
    loaded = load_model(ModelSpec(name="tiny", config=tiny_config()))
    encoders, labels = [_encoder(loaded, "fp32"), _encoder(loaded, "bf16")], ["fp32", "bf16"]
    try:
        from clipfp8.quant.ptq import QuantConfig, quantize

        qloaded = copy.deepcopy(loaded)
        result = quantize(qloaded, _calibration(loaded), QuantConfig())
        encoders.append(_encoder(qloaded, "fp8-fake", result.model))
        labels.append("fp8-fake")
    except (ImportError, IndexError, OSError, RuntimeError) as e:  # FP8 optional in this demo
        log.warning("fp8-fake left out: %s: %s", type(e).__name__, e)
    return encoders, labels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clipfp8.quant.eval.tiny_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    encoders, labels = tiny_encoders()
    specs = [DatasetSpec.parse(s, limit=args.limit) for s in preset_datasets("shared")]
    t0 = time.perf_counter()
    report = evaluate(encoders, specs, batch_size=64, labels=labels, workers=min(4, os.cpu_count() or 1))
    print(report.format_table())
    print(f"evaluate: {time.perf_counter() - t0:.1f} s wall")
    if args.output:
        print("wrote", *report.write(args.output))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
