"""The stand-in for a tower that a partial load (text-only or image-only) did not build.

A text query needs only the text tower and an image query only the image tower, so the cold
``search`` paths build one (``models.without_image_tower``, ``minilm.load_text_only``,
``image_only.load_image_only``). The other attribute stays, so code that walks the model or
reads the tower's preprocessing settings still finds it, but running it raises.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clipfp8.quant.core.errors import ModelLoadError


class MissingTower(nn.Module):
    """A tower left out of a partial load: it keeps ``attrs`` (e.g. ``image_size``,
    ``preprocess_cfg``, which preprocessing is derived from) and raises ``ModelLoadError`` with
    ``message`` when called. It has no parameters."""

    def __init__(self, message: str, **attrs: Any) -> None:
        super().__init__()
        self.message = message
        for name, value in attrs.items():
            setattr(self, name, value)

    def forward(self, *_: Any, **__: Any) -> torch.Tensor:
        raise ModelLoadError(self.message)


def is_missing(tower: nn.Module | None) -> bool:
    """``tower`` is a partial load's stand-in (``MissingTower``)."""
    return isinstance(tower, MissingTower)


__all__ = ["MissingTower", "is_missing"]
