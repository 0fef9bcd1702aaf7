"""Static types for the open_clip models this project runs.

open_clip's ``CLIP`` and ``CustomTextCLIP`` are ``nn.Module``s; a type checker sees any attribute
it does not know on an ``nn.Module`` through ``Module.__getattr__``, typed ``Tensor | Module``, so
``model.encode_image(x)`` reads as calling a tensor. ``ClipModel`` names the part of the open_clip
interface we call; ``as_clip`` is the one place a module becomes one, and it checks that it is.
"""
from __future__ import annotations

from typing import Protocol, cast

import torch
from torch import nn

from clipfp8.quant.core.errors import ModelLoadError


class ClipModel(Protocol):
    """What this project calls on an open_clip CLIP model (or our training model).

    ``encode_image``: float (N, 3, H, W) preprocessed pixels -> float (N, D) embeddings;
    ``encode_text``: int64 (N, context_length) tokens -> float (N, D) embeddings. Both are
    L2-normalised only when ``normalize`` is true. ``visual`` is the image tower.
    """

    visual: nn.Module

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor: ...

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor: ...


def as_clip(model: nn.Module) -> ClipModel:
    """``model`` typed as a ``ClipModel``; raises ``ModelLoadError`` naming its class when it lacks
    ``encode_image``, ``encode_text`` or ``visual``."""
    for name in ("encode_image", "encode_text"):
        if not callable(getattr(model, name, None)):
            raise ModelLoadError(f"{type(model).__name__} is not a CLIP model: it has no {name}()")
    if not isinstance(getattr(model, "visual", None), nn.Module):
        raise ModelLoadError(f"{type(model).__name__} is not a CLIP model: it has no image tower `visual`")
    return cast(ClipModel, model)


def tower_image_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) the image tower of a CLIP ``model`` takes; open_clip stores an int or a pair.

    Raises ``ModelLoadError`` naming the model's class when the tower records no image size.
    """
    size = getattr(as_clip(model).visual, "image_size", None)
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise ModelLoadError(f"{type(model).__name__}: the image tower has no image_size (got {size!r})")


__all__ = ["ClipModel", "as_clip", "tower_image_size"]
