"""Evaluation: CLIP_benchmark-style zero-shot classification and retrieval metrics, FP8 vs FP16.

``evaluate(encoders, datasets, batch_size)`` embeds each dataset once per encoder and returns an
``EvalReport`` (metrics per encoder, deltas and agreement vs the first encoder).
"""
from clipfp8.quant.eval.datasets import ClassificationData, DatasetSpec, RetrievalData, load_dataset
from clipfp8.quant.eval.report import DatasetResult, EvalReport
from clipfp8.quant.eval.run import evaluate
from clipfp8.quant.eval.templates import CIFAR10_TEMPLATES, DEFAULT_TEMPLATES, load_templates

__all__ = ["evaluate", "EvalReport", "DatasetResult", "DatasetSpec", "ClassificationData", "RetrievalData",
           "load_dataset", "load_templates", "CIFAR10_TEMPLATES", "DEFAULT_TEMPLATES"]
