"""The one ``Encoder`` interface every precision implements, and its factory.

Downstream code (``indexing``, ``app``, evaluation) only ever sees ``Encoder``: it hands over
preprocessed image batches or strings and gets back L2-normalised float32 numpy arrays.
"""
from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from clipfp8.quant.core.config import PRECISIONS, EncoderSpec, ModelSpec
from clipfp8.quant.core.errors import UnsupportedPrecisionError
from clipfp8.quant.core.protocols import as_clip
from clipfp8.quant.core.text_padding import cut_trailing_padding, trailing_pad_id

if TYPE_CHECKING:  # models imports open_clip lazily; only the type is needed here
    from clipfp8.quant.core.models import LoadedModel

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
    #: The spec ``create_encoder`` built this encoder from (recorded by the indexer, so that a
    #: later ``search``/``serve`` rebuilds the same encoder); None for encoders made otherwise.
    spec: EncoderSpec | None = None

    @abc.abstractmethod
    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        """images: float32 tensor (N, 3, H, W) from ``preprocess`` -> float32 array (N, D), rows unit-norm."""

    def encode_images_async(self, images: torch.Tensor) -> Callable[[], np.ndarray]:
        """Start ``encode_images(images)`` and return a function that waits for its result,
        float32 (N, D). An encoder on a GPU returns before the device is done, so that the
        caller can prepare the next batch meanwhile (``indexing.pipeline``); this default
        encodes at once. Results must be fetched in the order the calls were made."""
        out = self.encode_images(images)
        return lambda: out

    def warm_up_images(self, batch_size: int) -> bool:
        """Make the first ``encode_images`` of ``batch_size`` images run as fast as later ones
        (a compiled encoder compiles, or loads its engine's kernels, on its first call: seconds
        for a large model). Returns whether there was anything to warm up; this default has
        nothing (an eager encoder is as fast on its first call)."""
        return False

    @abc.abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """N strings -> float32 array (N, D), rows unit-norm."""

    @abc.abstractmethod
    def preprocess(self, image: Any) -> torch.Tensor:
        """A PIL image (RGB) -> float32 tensor (3, H, W), the model's own transform."""

    @property
    def preprocess_transform(self) -> Any:
        """The transform object ``preprocess`` applies (open_clip's torchvision ``Compose``), for
        callers that re-implement it elsewhere (``indexing.gpu_decode``: on the GPU); None
        when there is none to inspect. Encoders keeping it in ``_preprocess`` expose it."""
        return getattr(self, "_preprocess", None)

    @abc.abstractmethod
    def identity(self) -> EncoderIdentity:
        """Identity recorded next to embeddings this encoder produced."""

    def encode_pil(self, images: Sequence[Any]) -> np.ndarray:
        """Convenience: N PIL images -> float32 array (N, D)."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_images(torch.stack([self.preprocess(im.convert("RGB")) for im in images]))


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, D) embeddings of any float dtype -> float32 (N, D) unit rows, on x's device."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def normalize_to_numpy(x: torch.Tensor) -> np.ndarray:
    """``unit_rows(x)`` as a float32 (N, D) host array."""
    return unit_rows(x).cpu().numpy().astype(np.float32, copy=False)


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
        self._pad_id = trailing_pad_id(self.model)  # None: every token column is fed

    def preprocess(self, image: Any) -> torch.Tensor:
        return self._preprocess(image)

    def identity(self) -> EncoderIdentity:
        return self._identity

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode_images expects (N, 3, H, W), got {tuple(images.shape)}")
        clip = as_clip(self.model)
        out = [clip.encode_image(chunk.to(self.device, self.dtype, non_blocking=True))
               for chunk in images.split(self.batch_size)]
        return normalize_to_numpy(torch.cat(out)) if out else np.zeros((0, self.dim), np.float32)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        clip = as_clip(self.model)
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = cut_trailing_padding(self._tokenizer(texts[i:i + self.batch_size]), self._pad_id)
            out.append(clip.encode_text(tokens.to(self.device)))
        return normalize_to_numpy(torch.cat(out))


#: A precision's factory: the spec (``spec.precision`` is that precision) -> a ready ``Encoder``.
EncoderFactory = Callable[[EncoderSpec], Encoder]

#: Entry-point group through which higher layers register the precisions they implement
#: (pyproject.toml: fp8-fake in ``quant.checkpoint``; fp16, bf16, fp8 and trt-fp8 in
#: ``quant.runtime``), so the core never imports them; a precision's module is imported only when
#: it is first asked for. Lookup order: ``register_precision`` > entry point > the core's
#: built-in eager ``TorchEncoder`` (fp32/fp16/bf16), so the runtime's compiled fp16/bf16
#: encoders replace the core's wherever the package is installed.
ENTRY_POINT_GROUP = "clipfp8.precisions"

_REGISTRY: dict[str, EncoderFactory] = {}
_BUILTIN: dict[str, EncoderFactory] = {}


def register_precision(precision: str, factory: EncoderFactory) -> None:
    """Register (or replace) the factory that builds encoders of ``precision``.

    ``precision`` must be one of ``quant.core.config.PRECISIONS``; a plug-in that adds a new one
    also adds it there first. Raises ``ValueError`` for an unknown name.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"register_precision: unknown precision {precision!r}; known: {PRECISIONS}")
    _REGISTRY[precision] = factory


def _load_entry_point(precision: str) -> EncoderFactory | None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == precision:
            factory = ep.load()
            _REGISTRY.setdefault(precision, factory)
            return _REGISTRY[precision]
    return None


def encoder_factory(precision: str) -> EncoderFactory:
    """The registered factory for ``precision``; raises ``UnsupportedPrecisionError`` when none is
    registered (e.g. the package is not installed, so its entry points are missing)."""
    factory = _REGISTRY.get(precision) or _load_entry_point(precision) or _BUILTIN.get(precision)
    if factory is None:
        raise UnsupportedPrecisionError(
            f"no encoder is registered for precision {precision!r} (entry point group "
            f"{ENTRY_POINT_GROUP!r}); install clip-fp8 with pip so its entry points exist")
    return factory


def create_encoder(spec: EncoderSpec) -> Encoder:
    """The one factory for encoders: model + precision + device -> ``Encoder``.

    * ``fp32``: ``load_model(spec.model)`` run eagerly by ``TorchEncoder`` (core).
    * ``fp16``/``bf16``: the runtime's entry point -- on CUDA torch.compile + CUDA graphs (its
      compile served by a stored engine, ``clipfp8 build-engine``); on the CPU the core's eager
      ``TorchEncoder``, which also serves them when no entry point is installed.
    * ``fp8-fake``: the ModelOpt-quantized model saved in ``spec.quantized`` (fake quant).
    * ``fp8``: real FP8 GEMMs (``torch._scaled_mm``) on a CUDA GPU with compute capability >= 8.9.
    * ``trt-fp8``: a TensorRT engine built from the exported ONNX (needs the ``trt`` extra).
    Each precision comes from the registry (``register_precision``). The encoder remembers
    ``spec`` (``Encoder.spec``), which the indexer records next to its embeddings.
    """
    encoder = encoder_factory(spec.precision)(spec)
    encoder.spec = spec
    return encoder


def create_torch_encoder(spec: EncoderSpec) -> TorchEncoder:
    """``fp32``/``fp16``/``bf16``: the model's weights cast to that dtype, run eagerly."""
    from clipfp8.quant.core.models import load_model

    if spec.text_only:
        loaded = load_model(spec.model, text_only=True)
    elif spec.image_only:
        loaded = load_model(spec.model, image_only=True)
    else:
        loaded = load_model(spec.model)
    return torch_encoder_for(loaded, spec, loaded.weights_checksum())


def torch_encoder_for(loaded: LoadedModel, spec: EncoderSpec, checksum: str) -> TorchEncoder:
    """A ``TorchEncoder`` for an already loaded (possibly fake-quantized) model."""
    model_name = loaded.spec.name if loaded.spec else spec.model.name
    return TorchEncoder(loaded.model, loaded.preprocess, loaded.tokenizer, precision=spec.precision,
                        device=spec.resolved_device(), name=f"{model_name}-{spec.precision}",
                        model_id=loaded.spec.model_id(), checksum=checksum, dim=loaded.embed_dim,
                        image_size=loaded.image_size, batch_size=spec.batch_size)


for _precision in _DTYPES:
    _BUILTIN[_precision] = create_torch_encoder  # below any registered or entry-point factory


__all__ = ["Encoder", "EncoderIdentity", "TorchEncoder", "create_encoder", "register_precision",
           "encoder_factory", "create_torch_encoder", "torch_encoder_for", "EncoderFactory", "ModelSpec",
           "EncoderSpec", "ENTRY_POINT_GROUP"]
