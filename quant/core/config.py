"""Configs as data: what model to load and how to run it.

Every dataclass validates itself in ``__post_init__`` and raises ``ValueError`` naming the
offending field, so a bad CLI argument fails before any work starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

Precision = Literal["fp32", "fp16", "bf16", "fp8-fake", "fp8", "trt-fp8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "fp8-fake", "fp8", "trt-fp8")


def as_precision(value: str) -> Precision:
    """``value`` as a ``Precision`` (e.g. a CLI string); ``ValueError`` naming it otherwise."""
    if value not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {value!r}")
    return cast(Precision, value)  # checked against PRECISIONS just above

DEFAULT_MODEL_NAME = "default"

#: Image file suffixes read from calibration, evaluation and benchmark folders (lower case).
IMAGE_EXTS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class ModelSpec:
    """Where a CLIP model comes from. Exactly one source is used, in this order:

    * ``config``: an open_clip model config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``)
      built with random weights -- used by tests (tiny models).
    * ``checkpoint``: a local ``.safetensors`` file; ``name`` then names the open_clip
      architecture (e.g. ``"ViT-B-32"``) whose config the weights must match.
    * ``name`` + ``pretrained``: an open_clip model name and pretrained tag (downloads).
    * ``name == "default"`` (the default): the embedded model shipped under ``data/``.
    """

    name: str = DEFAULT_MODEL_NAME
    pretrained: str | None = None
    checkpoint: Path | None = None
    config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", Path(self.checkpoint))
            if self.pretrained is not None:
                raise ValueError("ModelSpec: give either 'checkpoint' or 'pretrained', not both")
            if self.name == DEFAULT_MODEL_NAME and self.config is None:
                raise ValueError(
                    "ModelSpec: 'checkpoint' needs 'name' (the open_clip architecture, e.g. ViT-B-32)"
                )
        if self.config is not None:
            for key in ("embed_dim", "vision_cfg", "text_cfg"):
                if key not in self.config:
                    raise ValueError(f"ModelSpec.config is missing the key {key!r}")
        if not self.name:
            raise ValueError("ModelSpec.name must not be empty")

    @property
    def is_default(self) -> bool:
        return self.config is None and self.checkpoint is None and self.name == DEFAULT_MODEL_NAME

    def model_id(self) -> str:
        """A short human-readable identity, recorded by the indexer next to each index."""
        if self.config is not None:
            return f"config:{self.name}"
        if self.checkpoint is not None:
            return f"{self.name}@{self.checkpoint.name}"
        if self.pretrained:
            return f"{self.name}/{self.pretrained}"
        return self.name

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["checkpoint"] = str(self.checkpoint) if self.checkpoint else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(
            name=d.get("name", DEFAULT_MODEL_NAME),
            pretrained=d.get("pretrained"),
            checkpoint=Path(d["checkpoint"]) if d.get("checkpoint") else None,
            config=d.get("config"),
        )


@dataclass(frozen=True)
class EncoderSpec:
    """How to run a model: which precision, on which device, from which quantized checkpoint.

    ``quantized`` is the directory written by ``quant.ptq.save_quantized`` (needed for every
    FP8 precision). ``device`` is ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; ``"auto"`` picks CUDA
    when available. ``text_only``: the caller will only encode texts (a text query), so a
    precision that can skip the image tower does (the default model's eager precisions load
    neither open_clip nor transformers then; ``quant.core.minilm``); others load the full model.
    ``image_only``: likewise for images (an image query): the default model's eager precisions
    build only its image tower, without transformers (``quant.core.image_only``).
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    precision: Precision = "fp32"
    device: str = "auto"
    quantized: Path | None = None
    batch_size: int = 64
    text_only: bool = False
    image_only: bool = False

    def __post_init__(self) -> None:
        if self.text_only and self.image_only:
            raise ValueError("EncoderSpec: text_only and image_only exclude each other")
        if self.precision not in PRECISIONS:
            raise ValueError(f"EncoderSpec.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.batch_size < 1:
            raise ValueError(f"EncoderSpec.batch_size must be >= 1, got {self.batch_size}")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"EncoderSpec.device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.quantized is not None:
            object.__setattr__(self, "quantized", Path(self.quantized))
        if self.precision in ("fp8-fake", "fp8", "trt-fp8") and self.quantized is None:
            raise ValueError(
                f"EncoderSpec: precision {self.precision!r} needs 'quantized' (a directory written by "
                "`clipfp8 quantize`)"
            )

    def resolved_device(self) -> str:
        return resolve_device(self.device)

    def to_record(self) -> dict[str, Any]:
        """What an index records about the encoder that embedded it (``EncoderSpec.from_record``
        rebuilds it): the model (a checkpoint as an absolute path), precision, the quantized
        directory as an absolute path, batch size. Not the device: the index may be searched on
        another machine."""
        model = self.model.to_dict()
        if self.model.checkpoint is not None:
            model["checkpoint"] = str(self.model.checkpoint.expanduser().resolve())
        return {"model": model, "precision": self.precision, "batch_size": self.batch_size,
                "quantized": str(self.quantized.expanduser().resolve()) if self.quantized else None}

    @classmethod
    def from_record(cls, record: dict[str, Any], device: str = "auto") -> EncoderSpec:
        """The spec of ``to_record``'s dict, on ``device``; ``ValueError`` naming the bad field."""
        try:
            return cls(model=ModelSpec.from_dict(record["model"]), precision=record["precision"],
                       device=device, quantized=record.get("quantized"),
                       batch_size=int(record.get("batch_size") or 64))
        except (KeyError, TypeError) as e:
            raise ValueError(f"EncoderSpec record is incomplete or malformed ({e!r}): {record}") from e


#: ``--precision auto``: the 16-bit baseline, which runs as fp16 on CUDA and as fp32 on the CPU.
AUTO_PRECISION = "auto"
#: Why the CPU baseline is fp32 (logged, and shown in the app).
CPU_BASELINE_NOTE = ("on the CPU the 16-bit baseline runs as fp32: fp16 matrix products have no fast CPU "
                     "kernels (5-10x slower than fp32 there)")


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when torch sees a CUDA GPU, else ``"cpu"``; others unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def baseline_precision(device: str) -> str:
    """The 16-bit baseline precision on ``device`` (``auto`` resolved): fp16 on CUDA, fp32 on the CPU."""
    return "fp16" if resolve_device(device).startswith("cuda") else "fp32"
