"""clipfp8.quant: load open_clip CLIP models, quantize them to FP8 with NVIDIA ModelOpt, audit,
evaluate, export and run them. Owns the ``Encoder`` interface every precision implements
(``clipfp8.quant.core``).

The names below are resolved lazily, so importing a light submodule (``quant.core.errors`` on
every CLI start) does not pay for torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EncoderSpec": "clipfp8.quant.core.config", "ModelSpec": "clipfp8.quant.core.config",
    "PRECISIONS": "clipfp8.quant.core.config",
    "Encoder": "clipfp8.quant.core.encoder", "EncoderIdentity": "clipfp8.quant.core.encoder",
    "TorchEncoder": "clipfp8.quant.core.encoder", "create_encoder": "clipfp8.quant.core.encoder",
    "LoadedModel": "clipfp8.quant.core.models", "load_model": "clipfp8.quant.core.models",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clipfp8.quant' has no attribute {name!r}")


__all__ = list(_EXPORTS)
