"""The image half of the embedded default model, for an image query.

A cold ``clipfp8 search --image`` on a default-model index built the whole model, whose Hugging
Face text tower imports transformers and, through its BERT, ``torch._dynamo``: the encoder stage
took 2.3-2.4 s of a 3.9-4.1 s process on the 2-core CPU. An image query runs only the image
tower, so ``load_image_only`` builds open_clip's vision tower alone (open_clip imported without
transformers or timm) with the shipped ``visual.*`` weights, and identifies it by the whole
model's checksum, as the text-only load does (``quant.core.minilm``).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipfp8.quant.core.errors import ModelLoadError
from clipfp8.quant.core.minilm import bert_state, full_default_state
from clipfp8.quant.core.missing_tower import MissingTower
from clipfp8.quant.core.open_clip_import import import_open_clip, needs_timm
from clipfp8.quant.core.protocols import tower_image_size
from clipfp8.quant.core.weight_init import skip_weight_init

VISUAL_PREFIX = "visual."


class ImageOnlyCLIP(nn.Module):
    """The image half of a CLIP model: ``encode_image`` as open_clip's (float (N, 3, H, W) ->
    (N, embed_dim)); ``encode_text`` raises ``ModelLoadError``."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.text = MissingTower("this encoder was loaded image-only (for an image query); load the full model "
                                 "to embed texts")

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.text(text)


def tower_transform(open_clip: Any, model: nn.Module) -> tuple[Callable[[Any], torch.Tensor], tuple[int, int]]:
    """(the open_clip eval transform of ``model``'s image tower: PIL image -> float32 (3, H, W),
    its (H, W)), from the tower's ``preprocess_cfg`` (open_clip's defaults when it has none)."""
    from open_clip.transform import PreprocessCfg

    pp = PreprocessCfg(**getattr(model.visual, "preprocess_cfg", {}))
    size = tower_image_size(model)
    return open_clip.image_transform(size, is_train=False, mean=pp.mean, std=pp.std, interpolation=pp.interpolation,
                                     resize_mode=pp.resize_mode), size


def load_image_only(model_cfg: dict[str, Any], clip_state: dict[str, torch.Tensor], minilm_folder: Path
                    ) -> tuple[ImageOnlyCLIP, Callable[[Any], torch.Tensor], tuple[int, int],
                               Callable[[], dict[str, torch.Tensor]]]:
    """-> (the image-only model in eval mode, fp32 on the CPU; its preprocess; its image size;
    a function giving the FULL model's state dict, for its checksum when it is not remembered:
    only then is the wheel's BERT read). ``clip_state`` is the shipped ``model.safetensors``."""
    open_clip = import_open_clip(hf=False, timm=needs_timm(model_cfg))
    from open_clip.model import _build_vision_tower

    with skip_weight_init():  # every weight is loaded below (strictly)
        visual = _build_vision_tower(int(model_cfg["embed_dim"]), model_cfg["vision_cfg"],
                                     quick_gelu=bool(model_cfg.get("quick_gelu", False)))
    own = {k[len(VISUAL_PREFIX):]: v.float() for k, v in clip_state.items() if k.startswith(VISUAL_PREFIX)}
    expected = visual.state_dict()
    if set(own) != set(expected) or any(tuple(own[k].shape) != tuple(expected[k].shape) for k in own):
        diff = sorted(set(own) ^ set(expected))[:3]
        raise ModelLoadError(f"the default model's image weights do not match its config (e.g. {diff})")
    visual.load_state_dict(own)
    model = ImageOnlyCLIP(visual).eval()
    preprocess, size = tower_transform(open_clip, model)
    return model, preprocess, size, lambda: full_default_state(clip_state, bert_state(minilm_folder))


__all__ = ["ImageOnlyCLIP", "load_image_only", "tower_transform"]
