"""``clipfp8 demo``: quantize the embedded default model, index the bundled samples, serve.

Each step is a function so tests can run it with a tiny model or injected encoders:
:func:`quantize_step` (cached under the work dir, keyed by the weights checksum),
:func:`demo_encoders`, :func:`index_step` and :func:`prepare_demo` which chains them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from clipfp8.quant.core.config import EncoderSpec, ModelSpec, as_precision
from clipfp8.quant.core.encoder import Encoder
from clipfp8.quant.core.resources import samples_dir

log = logging.getLogger(__name__)

SAMPLES_DIR = samples_dir()
DEFAULT_WORK_DIR = Path.home() / ".cache" / "clipfp8" / "demo"
STAMP_FILE = "demo_source.json"


@dataclass(frozen=True)
class DemoConfig:
    """Where the demo works and what it runs. ``calib_samples`` image-caption pairs calibrate FP8.
    ``precision``: the reference beside FP8; ``auto`` = fp16 on CUDA, fp32 on the CPU (where
    fp16 matrix products are 5-10x slower)."""

    work_dir: Path = DEFAULT_WORK_DIR
    corpus: Path = SAMPLES_DIR
    model: ModelSpec = field(default_factory=ModelSpec)
    device: str = "auto"
    calib_samples: int = 128
    batch_size: int = 32
    precision: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "work_dir", Path(self.work_dir).expanduser())
        object.__setattr__(self, "corpus", Path(self.corpus))
        if self.calib_samples < 1:
            raise ValueError(f"DemoConfig.calib_samples must be >= 1, got {self.calib_samples}")
        if self.batch_size < 1:
            raise ValueError(f"DemoConfig.batch_size must be >= 1, got {self.batch_size}")
        if not self.corpus.is_dir():
            raise NotADirectoryError(f"demo corpus {self.corpus} is not a directory")
        if self.precision not in ("auto", "fp16", "bf16", "fp32"):
            raise ValueError(f"DemoConfig.precision must be auto, fp16, bf16 or fp32, got {self.precision!r}")

    @property
    def quantized_dir(self) -> Path:
        return self.work_dir / "quantized"

    @property
    def index_dir(self) -> Path:
        """``work_dir/index`` for the bundled samples; one folder per other corpus (an index
        belongs to one corpus folder)."""
        if self.corpus.resolve() == Path(SAMPLES_DIR).resolve():
            return self.work_dir / "index"
        return self.work_dir / f"index-{hashlib.sha256(os.fsencode(self.corpus.resolve())).hexdigest()[:12]}"


def calib_pairs(corpus: Path, n: int) -> list[tuple[Path, str]]:
    """Up to n (image, first caption) pairs from the corpus' captions file (read leniently by
    ``quant.core.captions``), else (image, folder name) pairs; sorted."""
    from clipfp8.quant.core.captions import captions_for_folder

    caps = captions_for_folder(corpus, strict=False)
    if caps:
        pairs = [(corpus / f, cs[0]) for f, cs in sorted(caps.items()) if (corpus / f).is_file()]
    else:
        pairs = [(p, p.parent.name.replace("_", " ")) for p in sorted(corpus.rglob("*.jpg"))]
    if not pairs:
        raise FileNotFoundError(f"no calibration images with captions in {corpus}")
    step = max(1, len(pairs) // n)  # spread over categories rather than taking the first folder
    return pairs[::step][:n]


def calib_batches(loaded: Any, corpus: Path, n: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images float32 (B, 3, H, W), tokens int64 (B, L)) batches for ``quant.ptq.quantize``."""
    pairs = calib_pairs(corpus, n)
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        images = []
        for path, _ in chunk:
            with Image.open(path) as im:
                images.append(loaded.preprocess(im.convert("RGB")))
        out.append((torch.stack(images), loaded.tokenizer([c for _, c in chunk])))
    return out


def _stamp(loaded: Any, cfg: DemoConfig) -> dict[str, Any]:
    return {"model_id": loaded.spec.model_id(), "weights": loaded.weights_checksum(),
            "calib_samples": cfg.calib_samples, "corpus": str(cfg.corpus.resolve())}


def quantize_step(cfg: DemoConfig) -> Path:
    """Quantize ``cfg.model`` to FP8 on the corpus and save it to ``cfg.quantized_dir``.

    Cached: a stamp records the weights checksum and calibration settings; a matching stamp
    skips the work. The directory is written to a temp sibling and renamed into place.
    """
    from clipfp8.quant.checkpoint import save_quantized
    from clipfp8.quant.core.fileio import replace_dir
    from clipfp8.quant.core.models import load_model
    from clipfp8.quant.ptq import QuantConfig, quantize

    loaded = load_model(cfg.model)
    stamp = _stamp(loaded, cfg)
    stamp_file = cfg.quantized_dir / STAMP_FILE
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        log.info("using the cached FP8 model in %s", cfg.quantized_dir)
        return cfg.quantized_dir
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    qcfg = QuantConfig()
    log.info("quantizing %s to FP8 on %d samples from %s", stamp["model_id"], cfg.calib_samples, cfg.corpus)
    quantize(loaded, calib_batches(loaded, cfg.corpus, cfg.calib_samples, cfg.batch_size), qcfg)
    tmp = Path(tempfile.mkdtemp(prefix=".quantized-", dir=cfg.work_dir))
    try:
        save_quantized(loaded, tmp, qcfg)
        (tmp / STAMP_FILE).write_text(json.dumps(stamp, indent=1))
        replace_dir(tmp, cfg.quantized_dir)  # fsyncs tmp; the old model is deleted only after the swap
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cfg.quantized_dir


def demo_encoders(cfg: DemoConfig, quantized: Path,
                  factory: Callable[[EncoderSpec], Encoder] | None = None) -> dict[str, Encoder]:
    """{baseline label: the reference encoder ("FP16" on CUDA, "FP32 (CPU baseline)" on the CPU),
    "FP8": fp8 (capable GPU) or fp8-fake (CPU) encoder}."""
    from clipfp8.app.backend import baseline_label, cuda_fp8_capable
    from clipfp8.indexing.specs import resolve_precision
    from clipfp8.quant.core.encoder import create_encoder

    make = factory or create_encoder
    device = EncoderSpec(device=cfg.device).resolved_device()
    fp8 = "fp8" if device != "cpu" and cuda_fp8_capable() else "fp8-fake"
    ref = resolve_precision(cfg.precision, device)
    return {baseline_label(ref, device): make(EncoderSpec(model=cfg.model, precision=as_precision(ref),
                                                          device=device, batch_size=cfg.batch_size)),
            "FP8": make(EncoderSpec(model=cfg.model, precision=as_precision(fp8), device=device,
                                    quantized=quantized, batch_size=cfg.batch_size))}


def index_step(cfg: DemoConfig, encoders: dict[str, Encoder],
               progress: Callable[[int, int], None] | None = None) -> Path:
    """Index (incrementally) ``cfg.corpus`` into ``cfg.index_dir`` with every encoder."""
    from clipfp8.indexing import index_corpus

    summary = index_corpus(cfg.corpus, cfg.index_dir, list(encoders.values()),
                           batch_size=cfg.batch_size, workers=2, progress=progress)
    log.info("demo index: %d indexed, %d unchanged, %d skipped", summary.indexed, summary.unchanged,
             sum(summary.skipped.values()))
    return cfg.index_dir


def prepare_demo(cfg: DemoConfig, encoders: dict[str, Encoder] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> tuple[Path, dict[str, Encoder]]:
    """Steps (a) and (b): quantize (unless ``encoders`` are injected) and index. -> (index dir, encoders)."""
    if encoders is None:
        encoders = demo_encoders(cfg, quantize_step(cfg))
    return index_step(cfg, encoders, progress), encoders
