"""A Linear layer that really stores its weight in FP8 and runs FP8 GEMMs.

Scales follow ModelOpt's per-tensor FP8 (E4M3) fake quantization exactly:
``scale = amax / 448``, ``q = cast_e4m3(clamp(x / scale, -448, 448))``, ``x_hat = q * scale``.
Hence an ``FP8Linear`` computes ``x_hat @ w_hat.T + b``, the same function as ModelOpt's
fake-quant ``QuantLinear``, up to the accumulation order and output rounding of the GEMM.

Two execution paths:

* ``"scaled_mm"`` (CUDA, sm_89+): ``torch._scaled_mm(x_fp8, w_fp8.t(), scale_a, scale_b, bias)``.
  ``w_fp8`` is kept (out, in) row-major, so ``w_fp8.t()`` is the column-major second operand
  cuBLASLt wants; ``in`` and ``out`` must be multiples of 16.
* ``"emulate"``: dequantize both operands and run an ordinary matmul in the activation dtype
  (fp32 on the CPU). Used by CPU tests and, on the GPU, for shapes ``_scaled_mm`` rejects.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
#: cuBLASLt's FP8 GEMM needs K and N to be multiples of 16.
SCALED_MM_ALIGN = 16


def fp8_scales(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantize multiplier ``448 / amax``, dequantize scale ``1 / that``), fp32 shape (),
    computed exactly as ModelOpt's ``_fp8_eager`` does so the rounding matches bit for bit.

    A (near-)zero amax is replaced by 1 (ModelOpt's guard), so nothing divides by zero.
    """
    amax = amax.detach().float().reshape(-1)
    if amax.numel() != 1:
        raise ValueError(f"fp8_scale expects a per-tensor amax (1 element), got shape {tuple(amax.shape)}")
    amax = amax[0]
    safe = torch.where(amax <= 1.0 / (1 << 24), torch.ones_like(amax), amax)
    qmul = (FP8_MAX / safe).to(torch.float32)
    return qmul, (1 / qmul).to(torch.float32)


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The per-tensor dequantize scale (fp32, shape ()) for ``amax``: about ``amax / 448``."""
    return fp8_scales(amax)[1]


def quantize_fp8(x: torch.Tensor, qmul: torch.Tensor) -> torch.Tensor:
    """x (any float dtype) -> float8_e4m3fn tensor of the same shape, ``x * qmul`` saturated.

    Written as one multiply, clamp and cast so torch.compile fuses it into the producer's kernel.
    """
    return (x.float() * qmul).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def shape_supports_scaled_mm(in_features: int, out_features: int) -> bool:
    return in_features % SCALED_MM_ALIGN == 0 and out_features % SCALED_MM_ALIGN == 0


class FP8Linear(nn.Module):
    """``y = dq(q(x)) @ dq(W).T + b`` with W stored as float8_e4m3fn (out, in).

    Buffers: ``weight`` float8_e4m3fn (out, in); ``weight_scale`` and ``input_scale`` fp32 ();
    ``bias`` (out,) in the activation dtype or None. Input (..., in) -> output (..., out), the
    dtype of the input (fp16 on CUDA, fp32 in emulation).
    """

    # Buffers (register_buffer), declared so their type is known.
    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_qmul: torch.Tensor
    input_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, input_qmul: torch.Tensor,
                 bias: torch.Tensor | None, *, mode: str = "emulate", fast_accum: bool = True) -> None:
        super().__init__()
        if weight_fp8.dtype != FP8_DTYPE or weight_fp8.ndim != 2:
            raise ValueError("FP8Linear needs a 2-D float8_e4m3fn weight, "
                             f"got {weight_fp8.dtype} {tuple(weight_fp8.shape)}")
        if mode not in ("scaled_mm", "emulate"):
            raise ValueError(f"FP8Linear mode must be 'scaled_mm' or 'emulate', got {mode!r}")
        self.out_features, self.in_features = (int(s) for s in weight_fp8.shape)
        if mode == "scaled_mm" and not shape_supports_scaled_mm(self.in_features, self.out_features):
            raise ValueError(f"FP8Linear({self.in_features}->{self.out_features}): _scaled_mm needs multiples of 16")
        self.register_buffer("weight", weight_fp8.contiguous())
        self.register_buffer("weight_scale", weight_scale.detach().float().reshape(()).clone())
        self.register_buffer("input_qmul", input_qmul.detach().float().reshape(()).clone())
        self.register_buffer("input_scale", (1 / self.input_qmul).to(torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.mode, self.fast_accum = mode, fast_accum
        # open_clip's get_cast_dtype() reads this name before ``weight.dtype`` (its int8 hook):
        # the dtype activations run in, kept current by ``convert.cast_for_runtime``.
        self.int8_original_dtype = bias.dtype if bias is not None else torch.float32

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_amax: torch.Tensor, input_amax: torch.Tensor,
                    *, mode: str = "emulate", fast_accum: bool = True) -> FP8Linear:
        """Quantize ``linear.weight`` with the calibrated per-tensor amax values."""
        w_qmul, w_scale = fp8_scales(weight_amax)
        w_fp8 = quantize_fp8(linear.weight.detach(), w_qmul)
        return cls(w_fp8, w_scale, fp8_scales(input_amax)[0], linear.bias, mode=mode, fast_accum=fast_accum)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, mode={self.mode}, bias={self.bias is not None}"

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) weight as ``dtype``: ``w_fp8 * weight_scale``."""
        return (self.weight.to(torch.float32) * self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        x_fp8 = quantize_fp8(x2, self.input_qmul)
        if self.mode == "scaled_mm":
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale,
                                 bias=bias, out_dtype=x.dtype, use_fast_accum=self.fast_accum)
        else:
            # Dequantize to the activation dtype: bit-exact FP8 values, ordinary matmul.
            x_hat = (x_fp8.to(torch.float32) * self.input_scale).to(x.dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = F.linear(x_hat, self.dequantized_weight(x.dtype), bias)
        return y.reshape(*lead, self.out_features)


class FP8Embedding(nn.Module):
    """An embedding table stored as float8_e4m3fn (V, D) with one fp32 scale; rows are
    dequantized after the gather: int64 (...) -> (..., D) in ``int8_original_dtype``."""

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", weight_fp8.contiguous())
        self.register_buffer("weight_scale", weight_scale.detach().float().reshape(()).clone())
        self.int8_original_dtype = dtype

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, weight_amax: torch.Tensor) -> FP8Embedding:
        qmul, scale = fp8_scales(weight_amax)
        return cls(quantize_fp8(emb.weight.detach(), qmul), scale, emb.weight.dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # Gather on the uint8 view: indexing kernels for float8 are not available everywhere.
        rows = self.weight.view(torch.uint8)[idx].view(FP8_DTYPE)
        return (rows.to(torch.float32) * self.weight_scale).to(self.int8_original_dtype)


class FakeQuantFP8(nn.Module):
    """Quantize-dequantize with a static per-tensor scale (used on attention Q/K/V): (...) -> (...).

    ``is_enabled`` mirrors ModelOpt's TensorQuantizer, so it can stand in for one inside
    attention code that checks it (``quant.attention.attend``)."""

    is_enabled = True
    qmul_scale: torch.Tensor
    scale: torch.Tensor

    def __init__(self, amax: torch.Tensor) -> None:
        super().__init__()
        qmul, scale = fp8_scales(amax)
        self.register_buffer("qmul_scale", qmul)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (quantize_fp8(x, self.qmul_scale).to(torch.float32) * self.scale).to(x.dtype)


class DisabledQuantizer(nn.Identity):
    """Stand-in for a disabled ModelOpt TensorQuantizer: identity, ``is_enabled`` False."""

    is_enabled = False


__all__ = ["FP8Linear", "FP8Embedding", "FakeQuantFP8", "DisabledQuantizer", "fp8_scale", "fp8_scales",
           "quantize_fp8", "shape_supports_scaled_mm", "FP8_MAX", "FP8_DTYPE"]
