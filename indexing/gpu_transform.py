"""open_clip's eval preprocessing, re-done in torch on decoded uint8 tensors (any device).

``transform_spec(compose)`` recognises the torchvision ``Compose`` that
``open_clip.image_transform(..., is_train=False)`` builds -- Resize (shortest side, or both sides)
or ResizeKeepRatio, CenterCrop, RGB conversion, ToTensor, Normalize -- and returns its parameters;
anything else gives None (the caller keeps the Pillow path). ``preprocess_images`` applies them
to a batch of images the way torchvision does on a PIL image: the same output size arithmetic,
antialiased bicubic/bilinear resampling (torch's ``antialias=True`` kernels are Pillow's), the
result rounded to uint8 levels like Pillow's, the same crop offsets and zero padding, then
``/255``, ``-mean``, ``/std`` in float32.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

_INTERPOLATIONS = {"bicubic", "bilinear"}


@dataclass(frozen=True)
class TransformSpec:
    """Parameters of a recognised eval transform.

    ``resize``: ``"shortest"`` (torchvision ``Resize(int)``: the shorter side becomes
    ``resize_size[0]``, the longer is truncated, capped by ``max_size``), ``"keep_ratio"``
    (open_clip ``ResizeKeepRatio``: both sides divided by the smaller ratio to ``resize_size``
    (h, w), rounded) or ``"exact"`` (``Resize((h, w))``). ``crop``: CenterCrop (h, w) or None.
    """

    resize: str
    resize_size: tuple[int, ...]
    crop: tuple[int, int] | None
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_size: int | None = None

    @property
    def out_size(self) -> tuple[int, int]:
        """(H, W) of every preprocessed image."""
        if self.crop is not None:
            return self.crop
        return int(self.resize_size[0]), int(self.resize_size[1])

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) the resize step gives an image of ``height`` x ``width``."""
        if self.resize == "exact":
            return int(self.resize_size[0]), int(self.resize_size[1])
        if self.resize == "keep_ratio":  # ResizeKeepRatio.get_params with longest=0, no jitter
            ratio = min(height / self.resize_size[0], width / self.resize_size[1])
            return round(height / ratio), round(width / ratio)
        # torchvision.transforms.functional._compute_resized_output_size, one size given
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize_size[0], int(self.resize_size[0] * long / short)
        if self.max_size is not None and new_long > self.max_size:
            new_short, new_long = int(self.max_size * new_short / new_long), self.max_size
        return (new_long, new_short) if width <= height else (new_short, new_long)


def _pair(size: Any) -> tuple[int, int] | None:
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) in (1, 2) and all(isinstance(s, int) for s in size):
        return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])
    return None


def _interpolation(mode: Any) -> str | None:
    name = str(getattr(mode, "value", mode)).lower()
    return name if name in _INTERPOLATIONS else None


def _resize_step(t: Any) -> tuple[str, tuple[int, ...], int | None, str] | None:
    """(kind, size, max_size, interpolation) of a resize transform, None if not one we know."""
    from torchvision import transforms as T

    if type(t).__name__ == "ResizeKeepRatio" and type(t).__module__.startswith("open_clip"):
        size, interp = _pair(getattr(t, "size", None)), _interpolation(getattr(t, "interpolation", None))
        jitter = float(getattr(t, "random_scale_prob", 1.0)) or float(getattr(t, "random_aspect_prob", 1.0))
        if size is None or interp is None or float(getattr(t, "longest", 1.0)) != 0.0 or jitter:
            return None
        return "keep_ratio", size, None, interp
    if type(t) is T.Resize:
        interp = _interpolation(t.interpolation)
        if interp is None:
            return None
        if isinstance(t.size, int) or (isinstance(t.size, (list, tuple)) and len(t.size) == 1):
            s = t.size if isinstance(t.size, int) else t.size[0]
            return "shortest", (int(s),), t.max_size, interp
        size = _pair(t.size)
        return ("exact", size, None, interp) if size is not None else None
    return None


def _is_rgb_step(t: Any) -> bool:
    """open_clip's no-op-on-RGB conversions (``MaybeConvertMode('RGB')``, ``_convert_to_rgb``)."""
    if type(t).__name__ == "MaybeConvertMode" and type(t).__module__.startswith("open_clip"):
        return getattr(t, "mode", None) == "RGB"
    return getattr(t, "__name__", None) == "_convert_to_rgb"


def transform_spec(transform: Any) -> TransformSpec | None:
    """The parameters of an open_clip eval ``Compose``, or None when it has another shape."""
    try:
        from torchvision import transforms as T
    except ImportError:
        return None
    steps = list(getattr(transform, "transforms", None) or []) if isinstance(transform, T.Compose) else []
    if len(steps) < 3:
        return None
    resize = _resize_step(steps[0])
    if resize is None:
        return None
    kind, size, max_size, interp = resize
    rest, crop = steps[1:], None
    if rest and type(rest[0]) is T.CenterCrop:
        crop = _pair(rest[0].size)
        rest = rest[1:]
    if crop is None and kind != "exact":  # the output size would vary with the input
        return None
    while rest and _is_rgb_step(rest[0]):
        rest = rest[1:]
    if len(rest) != 2 or not isinstance(rest[0], T.ToTensor) or type(rest[1]) is not T.Normalize:
        return None
    mean, std = tuple(float(m) for m in rest[1].mean), tuple(float(s) for s in rest[1].std)
    if len(mean) != 3 or len(std) != 3:
        return None
    return TransformSpec(kind, size, crop, interp, (mean[0], mean[1], mean[2]), (std[0], std[1], std[2]), max_size)


def _center_crop(x: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """torchvision's CenterCrop on (N, 3, h, w): zero padding when smaller, round() offsets."""
    ch, cw = crop
    h, w = x.shape[-2:]
    if ch > h or cw > w:
        pad_w, pad_h = max(cw - w, 0), max(ch - h, 0)
        x = F.pad(x, [pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2], value=0.0)
        h, w = x.shape[-2:]
        if (h, w) == (ch, cw):
            return x
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return x[..., top:top + ch, left:left + cw]


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Pillow's resampling of float32 (N, 3, h, w) uint8 levels to ``size``: a horizontal pass,
    then a vertical one, each rounded and clipped to uint8 levels as Pillow stores them (one
    2-D pass differs by up to ~12 levels at edges; this by at most 2, ~0.001 on average).
    torch's ``antialias=True`` kernels are Pillow's (support scaled on downsampling, a=-0.5)."""
    for step in ((int(x.shape[-2]), size[1]), size):  # an unchanged side is skipped, as Pillow does
        if step != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=step, mode=mode, antialias=True, align_corners=False)
            x = x.clamp_(0.0, 255.0).round_()
    return x


def _filter_weights(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Pillow's resampling filters (float64): bicubic with a = -0.5, or bilinear (triangle)."""
    x = x.abs()
    if mode == "bilinear":
        return (1.0 - x).clamp_(min=0.0)
    a = -0.5
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


@functools.lru_cache(maxsize=64)
def _aa_weights(n_in: int, n_out: int, mode: str, start: int, count: int, device: torch.device) -> torch.Tensor:
    """Rows ``start:start + count`` of the (n_out, n_in) matrix of Pillow's antialiased resampling
    from ``n_in`` to ``n_out`` samples, float32 on ``device``: the weights torch's
    ``antialias=True`` kernels compute per output sample (support scaled by the downscale factor,
    normalised per row), so that ``x @ W.T`` resamples the last axis of ``x``."""
    scale = n_in / n_out
    support = (2.0 if mode == "bicubic" else 1.0) * max(scale, 1.0)
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (torch.arange(start, start + count, dtype=torch.float64) + 0.5)
    lo = (center - support + 0.5).floor().clamp_(min=0)
    hi = (center + support + 0.5).floor().clamp_(max=n_in)
    pos = lo[:, None] + torch.arange(int(2 * support) + 3, dtype=torch.float64)[None, :]
    w = _filter_weights((pos - center[:, None] + 0.5) * inv, mode) * (pos < hi[:, None])
    total = w.sum(1, keepdim=True)
    w = w / total.where(total != 0, torch.ones(1, dtype=torch.float64))
    out = torch.zeros((count, n_in + pos.shape[1]), dtype=torch.float64)
    out.scatter_add_(1, pos.long(), w)
    # A blocking copy (once per size): the matrix is cached and later read on other streams, so
    # it must be complete before anyone uses it. It waits only for the current stream, which
    # is the preprocessing stream in the indexer, not the encoder's.
    return out[:, :n_in].float().to(device)


def _resize_crop_matmul(x: torch.Tensor, size: tuple[int, int], crop: tuple[int, int], mode: str) -> torch.Tensor:
    """``_center_crop(_resize(x.float(), size, mode), crop)`` for uint8 (n, 3, h, w) whose resized
    ``size`` covers ``crop``, as two matrix products that compute only the kept pixels (one GEMM
    per pass instead of torch's antialiased kernels: 2.6 ms a pass for 256 images of 500x375 on
    the H200, docs/benchmarks.md). Sums run in another order than torch's kernels, so a pixel
    whose exact value is a rounding tie may land one level apart (~0.02 % of them downscaled,
    under 1 % upscaled)."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    (rh, rw), (ch, cw) = size, crop
    top, left = int(round((rh - ch) / 2.0)), int(round((rw - cw) / 2.0))
    y = x.float()
    if rw != w:
        y = torch.matmul(y, _used(_aa_weights(w, rw, mode, left, cw, y.device)).t()).clamp_(0.0, 255.0).round_()
    else:
        y = y[..., left:left + cw]
    if rh != h:
        y = torch.matmul(_used(_aa_weights(h, rh, mode, top, ch, y.device)), y).clamp_(0.0, 255.0).round_()
    else:
        y = y[..., top:top + ch, :]
    return y


def _used(weights: torch.Tensor) -> torch.Tensor:
    """A cached CUDA matrix read on the current stream: the allocator must not reuse its memory
    before that stream is done with it, should the cache drop it meanwhile."""
    if weights.is_cuda:
        weights.record_stream(torch.cuda.current_stream(weights.device))
    return weights


#: Same-size images at least this many use the matrix products on CUDA (their weights are built
#: once per size; a lone image keeps torch's kernel).
MATMUL_MIN_IMAGES = 8


#: Images of one size stacked: (indices into the batch, uint8 (n, 3, h, w) on the device).
SizeGroup = tuple[list[int], torch.Tensor]


def stack_by_size(images: Sequence[torch.Tensor]) -> list[SizeGroup]:
    """uint8 (3, h_i, w_i) images on one device -> one uint8 (n, 3, h, w) stack per distinct
    size, with the images' indices. The indexer runs this on its decode thread, so that the
    thread issuing the encoders' work gets a few tensors per batch instead of one per file."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        if im.ndim != 3 or im.shape[0] != 3 or im.dtype != torch.uint8:
            raise ValueError(f"stack_by_size: image {i} is {im.dtype} {tuple(im.shape)}, expected uint8 (3, h, w)")
        groups[(int(im.shape[1]), int(im.shape[2]))].append(i)
    return [(idx, torch.stack([images[i] for i in idx])) for idx in groups.values()]


def preprocess_groups(groups: Sequence[SizeGroup], count: int, spec: TransformSpec,
                      pixel_budget: int = 64_000_000, matmul: bool | None = None) -> torch.Tensor:
    """``stack_by_size``'s groups (covering indices 0..count-1) -> float32 (count, 3, H, W) on
    their device, where (H, W) = ``spec.out_size``; at most ``pixel_budget`` source pixels are
    resized per call (bounds the float32 working memory). ``matmul``: resize groups of
    ``MATMUL_MIN_IMAGES`` or more by matrix products (``_resize_crop_matmul``); None: on CUDA."""
    if not groups or count <= 0:
        raise ValueError("preprocess_groups: no images")
    device = groups[0][1].device
    use_matmul = device.type == "cuda" if matmul is None else matmul
    out = torch.empty((count, 3, *spec.out_size), dtype=torch.float32, device=device)
    for idx, stacked in groups:
        h, w = int(stacked.shape[2]), int(stacked.shape[3])
        size = spec.resized_size(h, w)
        crop = spec.crop or size
        per = max(1, pixel_budget // max(h * w, 1))
        fits = size[0] >= crop[0] and size[1] >= crop[1]  # else the crop pads: torch's path
        for start in range(0, len(idx), per):
            chunk = idx[start:start + per]
            if use_matmul and fits and len(chunk) >= MATMUL_MIN_IMAGES:
                x = _resize_crop_matmul(stacked[start:start + per], size, crop, spec.interpolation)
            else:
                x = _resize(stacked[start:start + per].float(), size, spec.interpolation)
                if spec.crop is not None:
                    x = _center_crop(x, spec.crop)
            if chunk[-1] - chunk[0] == len(chunk) - 1:  # the common case: one copy, not N launches
                out[chunk[0]:chunk[-1] + 1].copy_(x)
            else:
                for i, row in zip(chunk, x, strict=True):  # row copies: no index tensor to upload
                    out[i].copy_(row)
    mean, std = _mean_std(spec, device)
    return out.div_(255.0).sub_(mean).div_(std)


def preprocess_images(images: Sequence[torch.Tensor], spec: TransformSpec,
                      pixel_budget: int = 64_000_000) -> torch.Tensor:
    """uint8 (3, h_i, w_i) images on one device -> float32 (N, 3, H, W) on that device, where
    (H, W) = ``spec.out_size`` (``stack_by_size`` then ``preprocess_groups``)."""
    if not images:
        raise ValueError("preprocess_images: no images")
    return preprocess_groups(stack_by_size(images), len(images), spec, pixel_budget)


@functools.lru_cache(maxsize=32)
def _mean_std(spec: TransformSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``spec``'s mean and std as float32 (1, 3, 1, 1) on ``device``, made once: building them
    per batch copies from pageable host memory, which makes the host wait until the stream has
    run everything queued before (on a GPU busy encoding, nearly a whole batch)."""
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std


__all__ = ["TransformSpec", "SizeGroup", "transform_spec", "stack_by_size", "preprocess_groups", "preprocess_images"]
