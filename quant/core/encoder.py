"""The one ``Encoder`` interface every precision implements, and its factory.

Downstream code (``indexing``, ``app``, evaluation) only ever sees ``Encoder``: it hands over
preprocessed image batches or strings and gets back L2-normalised float32 numpy arrays.
"""
from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from clipfp8.quant.core.config import EncoderSpec, ModelSpec
from clipfp8.quant.core.errors import UnsupportedPrecisionError

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class EncoderIdentity:
    """What produced a set of embeddings; the indexer stores it and refuses mismatches.

    ``checksum`` covers the weights and (for FP8) the quantization config and scales.
    """

    name: str
    precision: str
    model_id: str
    checksum: str
    dim: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "precision": self.precision, "model_id": self.model_id,
                "checksum": self.checksum, "dim": self.dim}


class Encoder(abc.ABC):
    """Encodes images and texts into one L2-normalised embedding space.

    Attributes: ``name`` (str, unique per precision/model, e.g. ``"default-fp16"``),
    ``precision`` (one of ``quant.core.config.PRECISIONS``), ``dim`` (embedding size D),
    ``device`` (torch device string), ``image_size`` ((H, W) expected by ``preprocess``).
    """

    name: str
    precision: str
    dim: int
    device: str
    image_size: tuple[int, int]

    @abc.abstractmethod
    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        """images: float32 tensor (N, 3, H, W) from ``preprocess`` -> float32 array (N, D), rows unit-norm."""

    @abc.abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """N strings -> float32 array (N, D), rows unit-norm."""

    @abc.abstractmethod
    def preprocess(self, image: Any) -> torch.Tensor:
        """A PIL image (RGB) -> float32 tensor (3, H, W), the model's own transform."""

    @abc.abstractmethod
    def identity(self) -> EncoderIdentity:
        """Identity recorded next to embeddings this encoder produced."""

    def encode_pil(self, images: Sequence[Any]) -> np.ndarray:
        """Convenience: N PIL images -> float32 array (N, D)."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_images(torch.stack([self.preprocess(im.convert("RGB")) for im in images]))


def _normalize(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x.cpu().numpy().astype(np.float32, copy=False)


class TorchEncoder(Encoder):
    """A PyTorch CLIP model run eagerly at one storage/compute dtype.

    Serves ``fp32``/``fp16``/``bf16`` (weights cast to that dtype) and ``fp8-fake`` (a ModelOpt
    fake-quantized model: FP8 rounding simulated in fp32 on the CPU or fp16 on CUDA; no speed-up).
    """

    def __init__(self, model: nn.Module, preprocess: Callable[[Any], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor], *, precision: str, device: str,
                 name: str, model_id: str, checksum: str, dim: int, image_size: tuple[int, int],
                 batch_size: int = 64) -> None:
        if precision == "fp8-fake":
            dtype = torch.float16 if device.startswith("cuda") else torch.float32
        elif precision in _DTYPES:
            dtype = _DTYPES[precision]
        else:
            raise UnsupportedPrecisionError(f"TorchEncoder cannot run precision {precision!r}")
        self.model = model.to(device=device, dtype=dtype).eval()
        self._preprocess, self._tokenizer = preprocess, tokenizer
        self.dtype = dtype
        self.precision, self.device, self.name, self.dim = precision, device, name, dim
        self.image_size, self.batch_size = image_size, batch_size
        self._identity = EncoderIdentity(name, precision, model_id, checksum, dim)

    def preprocess(self, image: Any) -> torch.Tensor:
        return self._preprocess(image)

    def identity(self) -> EncoderIdentity:
        return self._identity

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode_images expects (N, 3, H, W), got {tuple(images.shape)}")
        out = [self.model.encode_image(chunk.to(self.device, self.dtype, non_blocking=True))
               for chunk in images.split(self.batch_size)]
        return _normalize(torch.cat(out)) if out else np.zeros((0, self.dim), np.float32)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self._tokenizer(texts[i:i + self.batch_size]).to(self.device)
            out.append(self.model.encode_text(tokens))
        return _normalize(torch.cat(out))


def create_encoder(spec: EncoderSpec) -> Encoder:
    """The one factory for encoders: model + precision + device -> ``Encoder``.

    * ``fp32``/``fp16``/``bf16``: ``load_model(spec.model)`` run by ``TorchEncoder``.
    * ``fp8-fake``: the ModelOpt-quantized model saved in ``spec.quantized`` (fake quant).
    * ``fp8``: real FP8 GEMMs (``torch._scaled_mm``) on a CUDA GPU with compute capability >= 8.9.
    * ``trt-fp8``: a TensorRT engine built from the exported ONNX (needs the ``trt`` extra).
    """
    from clipfp8.quant.core.models import load_model

    device = spec.resolved_device()
    if spec.quantized is not None and spec.precision not in _DTYPES:
        from clipfp8.quant.checkpoint import check_same_model

        check_same_model(spec.quantized, spec.model)
    if spec.precision in _DTYPES:
        loaded = load_model(spec.model)
        checksum = loaded.weights_checksum()
    elif spec.precision == "fp8-fake":
        from clipfp8.quant.checkpoint import load_quantized

        loaded, checksum = load_quantized(spec.quantized)
    elif spec.precision == "fp8":
        from clipfp8.quant.runtime.fp8_encoder import create_fp8_encoder

        return create_fp8_encoder(spec)
    else:  # trt-fp8
        from clipfp8.quant.runtime.trt import create_trt_encoder

        return create_trt_encoder(spec)
    model_name = loaded.spec.name if loaded.spec else spec.model.name
    return TorchEncoder(loaded.model, loaded.preprocess, loaded.tokenizer, precision=spec.precision,
                        device=device, name=f"{model_name}-{spec.precision}",
                        model_id=loaded.spec.model_id(), checksum=checksum, dim=loaded.embed_dim,
                        image_size=loaded.image_size, batch_size=spec.batch_size)


__all__ = ["Encoder", "EncoderIdentity", "TorchEncoder", "create_encoder", "ModelSpec", "EncoderSpec"]
