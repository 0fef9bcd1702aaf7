"""Evaluation: CLIP_benchmark-style zero-shot classification and retrieval metrics, FP8 vs FP16.

``evaluate(encoders, datasets, batch_size)`` embeds each dataset once per encoder and returns an
``EvalReport`` (metrics per encoder, deltas and agreement vs the first encoder).
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {
    "ClassificationData": "clipfp8.quant.eval.datasets", "DatasetSpec": "clipfp8.quant.eval.datasets",
    "RetrievalData": "clipfp8.quant.eval.datasets", "load_dataset": "clipfp8.quant.eval.datasets",
    "DatasetResult": "clipfp8.quant.eval.report", "EvalReport": "clipfp8.quant.eval.report",
    "evaluate": "clipfp8.quant.eval.run",
    "CIFAR10_TEMPLATES": "clipfp8.quant.eval.templates", "DEFAULT_TEMPLATES": "clipfp8.quant.eval.templates",
    "load_templates": "clipfp8.quant.eval.templates",
}


def __getattr__(name: str) -> Any:
    # Lazy, so `import clipfp8.quant.eval.cli` (done to build the `clipfp8` parser for every
    # command, `search` included) does not import torch, numpy and the dataset readers.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clipfp8.quant.eval' has no attribute {name!r}")


__all__ = ["evaluate", "EvalReport", "DatasetResult", "DatasetSpec", "ClassificationData", "RetrievalData",
           "load_dataset", "load_templates", "CIFAR10_TEMPLATES", "DEFAULT_TEMPLATES"]
