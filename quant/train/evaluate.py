"""Evaluation of the default model, on ``quant.eval``'s dataset readers and metrics (no copies).

* Reference numbers (``clipfp8 train-eval``): :func:`evaluate_default` runs ``quant.eval``'s
  ``evaluate`` on the three shared sets (CIFAR-10-test, Imagenette-val: zero-shot with CLIP's 18
  CIFAR prompts; Flickr8k-1k: retrieval Recall@K) in fp32 on the CPU -- the same code and metric
  definitions as ``clipfp8 evaluate``.
* Quick check right after training, on the GPU machine: :func:`build_eval_pack` carries subsets of
  the same sets (read with ``quant.eval.datasets``) as JPEG mosaics plus the MiniLM features of
  every prompt and caption; :func:`evaluate_pack` embeds them with the training parts and scores
  them with ``quant.eval.metrics``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipfp8.quant.eval import metrics as M
from clipfp8.quant.eval.data import ClassificationData, ImageRef, RetrievalData
from clipfp8.quant.eval.report import EvalReport
from clipfp8.quant.eval.run import Progress
from clipfp8.quant.eval.templates import DEFAULT_TEMPLATES, fill

log = logging.getLogger(__name__)

#: The shared evaluation sets (under ``../shared/data/eval``) the pack carries, in pack order.
CIFAR, IMAGENETTE, FLICKR = "cifar10-test", "imagenette-val", "flickr8k-1k"


def evaluate_default(eval_root: Path, limit: int | None = None, seed: int = 0, batch_size: int = 64,
                     workers: int = 0, progress: Progress | None = None) -> EvalReport:
    """fp32 CPU metrics of the embedded default model on the shared sets in ``eval_root``
    (``--preset shared`` of ``clipfp8 evaluate``); ``limit``: a seeded subset per set.
    Raises ``DatasetError`` naming a missing or malformed set."""
    from clipfp8.quant.core.config import EncoderSpec
    from clipfp8.quant.core.encoder import create_encoder
    from clipfp8.quant.eval.datasets import DatasetSpec, preset_datasets
    from clipfp8.quant.eval.run import evaluate

    specs = [DatasetSpec.parse(d, limit=limit, seed=seed) for d in preset_datasets("shared", Path(eval_root))]
    encoder = create_encoder(EncoderSpec(precision="fp32", device="cpu", batch_size=batch_size))
    return evaluate([encoder], specs, batch_size=batch_size, labels=["fp32"], progress=progress, workers=workers)


def first_per_class(data: ClassificationData, k: int | None) -> ClassificationData:
    """The first ``k`` images of each class (in the dataset's sorted order); all when ``k`` is None."""
    if k is None:
        return data
    keep = np.sort(np.concatenate([np.flatnonzero(data.labels == c)[:k] for c in range(len(data.classnames))]))
    return ClassificationData(data.name, [data.images[i] for i in keep], [data.ids[i] for i in keep],
                              data.labels[keep], data.classnames)


def first_images(data: RetrievalData, n: int | None) -> RetrievalData:
    """The first ``n`` images (sorted by file name) with all their captions."""
    return RetrievalData(data.name, data.images[:n], data.ids[:n], data.captions[:n])


def _encoded(ref: ImageRef) -> bytes:
    """The encoded image: a file's contents, or the bytes a shard already holds."""
    return ref if isinstance(ref, bytes) else ref.read_bytes()


def _prompts(classnames: list[str]) -> list[str]:
    """Every (class, template) prompt, class-major, as ``quant.eval.run`` embeds them."""
    return [fill(t, c) for c in classnames for t in DEFAULT_TEMPLATES]


def build_eval_pack(eval_root: Path, out_dir: Path, model_cfg: dict[str, Any], size: int, quality: int,
                    n_cifar: int, n_imagenette: int, n_flickr: int, limit: int | None = None,
                    image_format: str = "jpeg", cifar_quality: int | None = None, basis: torch.Tensor | None = None,
                    text_cache: Path | None = None) -> dict[str, Any]:
    """Compact eval copy for the GPU machine: the first ``n_cifar``/10 CIFAR-10-test images of each
    class as 32x32 tiles (JPEG, ``cifar_quality``, default ``quality``), ``n_imagenette``/10
    Imagenette-val images per class and the first ``n_flickr`` Flickr images as ``size`` squares
    (the eval transform's geometry; ``image_format`` at ``quality``), and the MiniLM features of
    every prompt and caption -- as coefficients on the training pack's PCA ``basis`` float
    (384, k) when given (``quant.train.textfeats``), else whole. Subsets: it must fit the 64 MiB
    transfer. ``limit`` (smoke packs) replaces all three counts."""
    from clipfp8.quant.eval.datasets import load_class_folder, load_retrieval_folder
    from clipfp8.quant.train.data import MOSAIC_FORMATS, decode_square, mosaic, save_image, save_npz
    from clipfp8.quant.train.model import TEXT_FEATURE_DIM
    from clipfp8.quant.train.textfeats import caption_features, compress_features

    root = Path(eval_root)
    cifar = first_per_class(load_class_folder(root / CIFAR, CIFAR), n_cifar // 10 if limit is None else limit)
    inet = first_per_class(load_class_folder(root / IMAGENETTE, IMAGENETTE),
                           n_imagenette // 10 if limit is None else limit)
    flickr = first_images(load_retrieval_folder(root / FLICKR, FLICKR), n_flickr if limit is None else limit)
    captions, owner = flickr.flat_captions()
    c32 = np.stack([decode_square(_encoded(f), None) for f in cifar.images])
    s64 = np.stack([decode_square(_encoded(f), size) for f in [*inet.images, *flickr.images]])
    name64 = f"eval64.{MOSAIC_FORMATS[image_format][0]}"
    sizes = {"eval32.jpg": save_image(mosaic(c32, 256), Path(out_dir) / "eval32.jpg", "jpeg", cifar_quality or quality),
             name64: save_image(mosaic(s64, 128), Path(out_dir) / name64, image_format, quality)}
    prompts = _prompts(cifar.classnames) + _prompts(inet.classnames)
    feats = caption_features(prompts + captions, model_cfg, text_cache)
    extra = {} if basis is None else {"text_basis": basis.float().numpy()}
    q, s = compress_features(feats, basis if basis is not None else torch.eye(TEXT_FEATURE_DIM))
    save_npz(Path(out_dir) / "eval.npz", compressed=True, cifar_labels=cifar.labels, imagenette_labels=inet.labels,
             flickr_owner=owner,
             n=np.array([len(cifar.images), len(inet.images), len(flickr.images), len(cifar.classnames),
                         len(inet.classnames), len(DEFAULT_TEMPLATES)]),
             feats=q.numpy(), feat_scale=s.numpy(), **extra)
    return {"n_cifar": len(cifar.images), "n_imagenette": len(inet.images), "n_flickr": len(flickr.images),
            "file_bytes": sizes}


@torch.inference_mode()
def evaluate_pack(parts: Any, pack_dir: Path, to_input: Callable[[torch.Tensor], torch.Tensor],
                  device: str) -> dict[str, dict[str, float]]:
    """``quant.eval.metrics`` of ``TrainableParts`` on the compact eval copy -> {set: metrics + "n"}.

    ``to_input`` maps uint8 (N, 3, S, S) on ``device`` to the normalised float input at the
    model's resolution. The embedding runs on ``device``; the scoring on float32 numpy arrays.
    """
    from PIL import Image

    from clipfp8.quant.train.data import MOSAIC_FORMATS, unmosaic
    from clipfp8.quant.train.model import dequantize_rows_int8
    from clipfp8.quant.train.textfeats import expand_features

    z = np.load(Path(pack_dir) / "eval.npz")
    n_c, n_n, n_f, k_c, k_n, t = (int(v) for v in z["n"])
    q, scale = torch.from_numpy(z["feats"]), torch.from_numpy(z["feat_scale"])
    feats = (expand_features(q, scale, torch.from_numpy(z["text_basis"])) if "text_basis" in z.files
             else dequantize_rows_int8(q, scale)).to(device)
    txt = _unit_rows(parts.encode_text_features(feats))

    def embed(u8: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(u8.transpose(0, 3, 1, 2))).to(device)
        return _unit_rows(torch.cat([parts.encode_image(to_input(c)) for c in x.split(1024)]))

    c32 = unmosaic(np.asarray(Image.open(Path(pack_dir) / "eval32.jpg").convert("RGB")), n_c, 32)
    candidates = [Path(pack_dir) / f"eval64.{ext}" for ext, _ in MOSAIC_FORMATS.values()]
    file64 = next((f for f in candidates if f.is_file()), candidates[0])  # a missing file: open names it
    g64 = np.asarray(Image.open(file64).convert("RGB"))
    i32, i64 = embed(c32), embed(unmosaic(g64, n_n + n_f, g64.shape[1] // 128))
    cifar_cls = M.class_embeddings(txt[:k_c * t], k_c)
    inet_cls = M.class_embeddings(txt[k_c * t:(k_c + k_n) * t], k_n)
    return {CIFAR: {**M.zero_shot_metrics(i32, cifar_cls, z["cifar_labels"]), "n": n_c},
            IMAGENETTE: {**M.zero_shot_metrics(i64[:n_n], inet_cls, z["imagenette_labels"]), "n": n_n},
            FLICKR: {**M.retrieval_metrics(i64[n_n:], txt[(k_c + k_n) * t:], z["flickr_owner"]), "n": n_f}}


def _unit_rows(x: torch.Tensor) -> np.ndarray:
    """float (N, D) on any device -> float32 (N, D) numpy with unit rows."""
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy()


def report_metrics(report: EvalReport | dict[str, Any], label: str | None = None) -> dict[str, dict[str, float]]:
    """{set: metrics} of one encoder (default: the baseline) from an ``EvalReport`` or its JSON
    (``results.json`` of ``clipfp8 train-eval``/``evaluate``) -- the shape ``evaluate_pack`` returns."""
    rep = report if isinstance(report, EvalReport) else EvalReport.from_dict(report)
    label = label or rep.baseline
    return {r.name: dict(r.metrics[label], n=r.n_images) for r in rep.datasets}


__all__ = ["evaluate_default", "build_eval_pack", "evaluate_pack", "first_per_class", "first_images",
           "report_metrics", "CIFAR", "IMAGENETTE", "FLICKR"]
