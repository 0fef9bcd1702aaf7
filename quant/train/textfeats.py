"""Caption features for training: the frozen MiniLM tower's pooled feature of every caption.

The text transformer is frozen, so its 384-d mean-pooled feature (before ``text.proj``) is computed
once per distinct caption on the CPU (``model.text_features``), optionally cached across pack
builds, and carried to the GPU. To fit the transfer the features are carried as coefficients on a
PCA basis of the training captions (``fit_text_basis``, uncentred: the basis spans the features
themselves), row-quantised to int8. Training sees ``basis @ coefficients``; the trained projection
``W`` is then replaced by ``W @ basis @ basis.T`` (``model.project_text_weights``), so the shipped
model computes exactly the trained function of the carried coefficients on any caption.
"""
from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipfp8.quant.core.fileio import atomic_write_bytes
from clipfp8.quant.train.model import TEXT_FEATURE_DIM, dequantize_rows_int8, quantize_rows_int8, text_features

log = logging.getLogger(__name__)


def _read_cache(path: Path, context_length: int) -> dict[str, np.ndarray]:
    """{caption: float32 (384,)} from a cache file; empty when absent, unreadable or built for
    another context length (a cache is only a time saver)."""
    try:
        with np.load(path) as z:
            if int(z["context_length"]) != context_length:
                return {}
            texts = bytes(z["text"]).decode("utf-8").split("\n")
            feats = z["feats"]
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
        log.warning("%s: text-feature cache not used (%s)", path, e)
        return {}
    if len(texts) != len(feats):
        return {}
    return dict(zip(texts, feats, strict=True))


def _write_cache(path: Path, known: dict[str, np.ndarray], context_length: int) -> None:
    texts = [t for t in known if "\n" not in t]
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, context_length=np.array(context_length),
             text=np.frombuffer("\n".join(texts).encode("utf-8"), np.uint8),
             feats=np.stack([known[t] for t in texts]).astype(np.float32) if texts
             else np.zeros((0, TEXT_FEATURE_DIM), np.float32))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def caption_features(captions: Sequence[str], model_cfg: dict[str, Any], cache: Path | None = None,
                     progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """float32 (C, 384): the MiniLM pooled feature of every caption (``model.text_features``).

    With ``cache`` (an ``.npz`` file, created when absent), captions computed by an earlier build
    are reused and the new ones added: the features depend only on the caption, the bundled
    MiniLM weights and the context length."""
    ctx = int(model_cfg["text_cfg"]["context_length"])
    known = _read_cache(Path(cache), ctx) if cache is not None and Path(cache).is_file() else {}
    missing = [c for c in dict.fromkeys(captions) if c not in known]
    log.info("caption features: %d cached, %d to compute", len(captions) - len(missing), len(missing))
    if missing:
        new = text_features(missing, model_cfg, progress=progress).numpy()
        known.update(zip(missing, new, strict=True))
        if cache is not None:
            _write_cache(Path(cache), known, ctx)
    if not captions:
        return torch.zeros(0, TEXT_FEATURE_DIM)
    return torch.from_numpy(np.stack([known[c] for c in captions]).astype(np.float32))


def fit_text_basis(feats: torch.Tensor, dims: int) -> torch.Tensor:
    """Orthonormal float32 (384, dims): the top ``dims`` right singular vectors of the (uncentred)
    feature matrix float (C, 384), i.e. the subspace that keeps the most feature energy. ``dims``
    >= 384 gives a full orthonormal basis (nothing dropped)."""
    f = feats.double()
    dims = min(dims, f.shape[1])
    evals, evecs = torch.linalg.eigh(f.T @ f)  # ascending
    basis = evecs[:, torch.argsort(evals, descending=True)[:dims]]
    # a deterministic sign per vector (eigh's is arbitrary): its largest entry positive
    sign = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    return (basis * sign).float().contiguous()


def compress_features(feats: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float (C, 384) features -> (int8 (C, k) coefficients on ``basis`` (384, k), float32 (C,) row scales)."""
    return quantize_rows_int8(feats.float() @ basis.float())


def expand_features(q: torch.Tensor, scale: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Inverse of ``compress_features`` up to the dropped components: float32 (C, 384) =
    dequantised coefficients (C, k) @ ``basis.T``."""
    return dequantize_rows_int8(q, scale) @ basis.float().T


def energy_kept(feats: torch.Tensor, basis: torch.Tensor) -> float:
    """Fraction of the features' squared norm inside span(``basis``) (1.0 = nothing dropped)."""
    f = feats.double()
    return float(((f @ basis.double()) ** 2).sum() / (f ** 2).sum().clamp_min(1e-30))


__all__ = ["caption_features", "fit_text_basis", "compress_features", "expand_features", "energy_kept"]
