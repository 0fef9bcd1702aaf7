"""FP8 flash attention with an exact FP8 softmax output, in Triton (issue 12).

torch has no FP8 attention kernel: ``FP8Attention``'s default feeds FP8-rounded Q/K/V to a 16-bit
fused SDPA and leaves the softmax output P in 16 bit, and its exact mode
(``exact_softmax=True``) materialises QK^T, softmax and P in explicit 16-bit matmuls. This kernel
runs both attention matmuls on FP8 tensor cores and rounds P to the checkpoint's calibrated FP8
grid, without materialising the (L, S) scores:

* pass 1 over the key blocks: ``s = (q8 @ k8^T) * q_scale * k_scale * sm_scale (+ mask)``,
  accumulated in fp32, keeping each row's running max ``m`` and sum ``l = sum(exp(s - m))``;
* pass 2: the same scores again, ``P = exp(s - m) / l`` -- the exact, normalised softmax, so its
  FP8 rounding ``p8 = e4m3(P * p_qmul)`` lands on the grid ModelOpt calibrated, which a one-pass
  (online-softmax) kernel cannot do: its P is normalised only at the end --, and
  ``acc += p8 @ v8``; out = ``acc * p_scale * v_scale`` in the activation dtype.

The second QK^T costs a third more attention FLOPs (attention is ~4 % of a ViT-L/14's at 257
tokens). The fake-quant reference (``quant.attention.attend``) computes the same function in
16-bit matmuls: the kernel differs from it only by fp32 instead of fp16 intermediates.

Layouts: q8 (B, H, L, D), k8 (B, H, S, D), any strides; vt8 (B, H, D, S) with S contiguous --
V transposed, the operand layout Hopper's FP8 wgmma wants for ``P @ V`` (as Triton's own
fused-attention tutorial does); output (B, L, H, D) contiguous, so merging heads is a view.
``mask``: None or an additive float mask broadcastable to (B, H, L, S) (the text tower's causal
(L, S) mask; a (B, 1, 1, S) key-padding mask), read through zero strides.

Exposed as the custom op ``clipfp8::fp8_flash_attention`` so ``torch.compile`` and CUDA graphs
treat it as one opaque kernel. On CUDA it needs FP8 tensor cores (compute capability >= 8.9) and
Triton; on the CPU it runs only in Triton's interpreter (``TRITON_INTERPRET=1``; numpy, slow: the CPU
tests run it that way).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from typing import Any

import torch

# Imported on first use (``_triton``), not with the FP8 runtime: a one-query `search` process
# never runs the kernel. The kernel's body reads ``tl`` from these module globals when compiled.
triton: Any = None
tl: Any = None
_scores: Any = None  # the jitted ``_block_scores``, set with the kernel (``_kernel``)

log = logging.getLogger(__name__)

#: Head dimensions the kernel takes (a power of two: tl.arange; >= 32: FP8 MMA's K on the GPU).
GPU_HEAD_DIMS = (32, 64, 128, 256)
#: The interpreter has no MMA shape limits; tiny test models have 16-wide heads.
CPU_HEAD_DIMS = (16, *GPU_HEAD_DIMS)
#: Compute capability with FP8 tensor cores (Ada, Hopper).
MIN_CAPABILITY = (8, 9)


def _block_scores(q, k_base, m_base, start, offs_m, offs_d, row_ok, skn, skd, smm, smn, S, qk_scale,
                  HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Base-2 scores of the query tile against keys ``start : start + BLOCK_N``: fp32
    (BLOCK_M, BLOCK_N), -inf past the last key; with the key offsets and their validity."""
    offs_n = start + tl.arange(0, BLOCK_N)
    col_ok = offs_n < S
    k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=col_ok[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if HAS_MASK:
        s += tl.load(m_base + offs_m[:, None] * smm + offs_n[None, :] * smn,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32) * 1.4426950408889634
    return tl.where(col_ok[None, :], s, float("-inf")), offs_n, col_ok


def _fwd_kernel(Q, K, VT, MASK, OUT, QS, KS, VS, PQ, PS,  # noqa: N803 - Triton's naming of pointers
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svd, svn, smb, smh, smm, smn, sob, soh, som, sod,
                H, L, S, sm_scale, BH_BUCKET,
                HAS_MASK: tl.constexpr, ROUND_FIRST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One (BLOCK_M query rows, batch*head) tile; see the module docstring. Scores are kept in
    base 2 (``exp2``), so the scale and the mask carry a factor log2(e)."""
    pid_bh = tl.program_id(0)  # batch * heads on axis 0: CUDA caps axis 1 at 65,535
    pid_m = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    qk_scale = tl.load(QS) * tl.load(KS) * sm_scale * 1.4426950408889634
    p_qmul = tl.load(PQ)
    out_scale = tl.load(PS) * tl.load(VS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None], other=0.0)
    k_base = K + b * skb + h * skh
    m_base = MASK + b * smb + h * smh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, S, BLOCK_N):  # pass 1: row max and sum of exp
        s, offs_n, col_ok = _scores(q, k_base, m_base, start, offs_m, offs_d, row_ok, skn, skd, smm, smn, S,
                                    qk_scale, HAS_MASK, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far: no NaN
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where(l_i > 0, 1.0 / l_i, 0.0)
    v_base = VT + b * svb + h * svh
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, S, BLOCK_N):  # pass 2: exact P, rounded to FP8, times V
        s, offs_n, col_ok = _scores(q, k_base, m_base, start, offs_m, offs_d, row_ok, skn, skd, smm, smn, S,
                                    qk_scale, HAS_MASK, BLOCK_N)
        p = tl.exp2(s - m_fin[:, None]) * inv_l[:, None]
        p = tl.minimum(p * p_qmul, 448.0)  # P >= 0: only the top saturates
        if ROUND_FIRST:
            # Triton's interpreter casts to e4m3 without carrying a round-up into the exponent
            # (1.95 -> 1.0): round to nearest even on the e4m3 grid first (3 mantissa bits,
            # subnormal quantum 2^-9), so its cast is exact. The GPU's cvt.rn rounds correctly.
            quantum = tl.exp2(tl.maximum(tl.floor(tl.log2(tl.maximum(p, 1e-30))), -6.0) - 3.0)
            p = ((p / quantum + 12582912.0) - 12582912.0) * quantum  # 1.5 * 2^23: fp32 rint
        p8 = p.to(tl.float8e4nv)
        vt = tl.load(v_base + offs_d[:, None] * svd + offs_n[None, :] * svn, mask=col_ok[None, :], other=0.0)
        # Added in fp32 per key block: an ``acc`` passed into an FP8 dot stays in Hopper's
        # reduced-precision FP8 accumulator for the whole sum (max_num_imprecise_acc).
        acc += tl.dot(p8, tl.trans(vt))
    out = acc * out_scale
    tl.store(OUT + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None])


@functools.cache
def _triton() -> bool:
    """Import Triton into this module's globals; False when it is not installed (Triton comes
    with torch's CUDA wheels)."""
    global triton, tl
    try:
        import triton as triton_mod
        import triton.language as tl_mod
    except ImportError:
        return False
    triton, tl = triton_mod, tl_mod
    return True


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1`` before Triton was
    imported: the interpreter replaces ``triton.language`` itself, so it cannot be switched on
    later in a process)."""
    return _triton() and bool(triton.knobs.runtime.interpret)


#: GPU tile configurations (BLOCK_M, BLOCK_N, warps, pipeline stages) tried by Triton's
#: autotuner on the first call per (L, S, head dim, mask); configurations that do not fit the
#: GPU's shared memory are skipped by the autotuner. The interpreter uses ``INTERPRETER_BLOCKS``.
GPU_CONFIGS = ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 128, 4, 2),
               (128, 128, 8, 2), (64, 32, 4, 3))
INTERPRETER_BLOCKS = (32, 32)


def _bucket(programs: int) -> int:
    """The power of two at or above ``programs`` (batch * heads): the autotuner's key, so a
    one-query call does not choose the tiles of a 256-image batch (``BH_BUCKET``, unused in
    the kernel's body)."""
    return 1 << max(0, programs - 1).bit_length()


@functools.cache
def _kernel() -> Any:
    """The Triton kernel: autotuned over ``GPU_CONFIGS`` on the GPU (results kept in Triton's
    on-disk cache where this Triton can), plain under the interpreter (``triton.jit`` returns
    the interpreter's version there; the autotuner would time it with CUDA events)."""
    if not _triton():
        raise RuntimeError("the FP8 flash-attention kernel needs Triton, which this torch lacks")
    global _scores
    # The kernel calls ``_scores`` by its global name: the jitted helper must sit there first.
    _scores = triton.jit(_block_scores)
    jitted = triton.jit(_fwd_kernel)
    if interpreting():
        return jitted
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in GPU_CONFIGS]
    keep = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs, key=["L", "S", "HEAD_DIM", "HAS_MASK", "BH_BUCKET"], **keep)(jitted)


def unsupported_reason(device: torch.device, head_dim: int) -> str | None:
    """Why the kernel cannot run attention with heads of ``head_dim`` on ``device``; None when
    it can."""
    if not _triton():
        return "Triton is not installed"
    dims: tuple[int, ...]
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
            return "the GPU has no FP8 tensor cores (compute capability < 8.9)"
        dims = GPU_HEAD_DIMS
    elif device.type == "cpu":
        if not interpreting():
            return "CPU tensors (the kernel runs there only in Triton's interpreter, TRITON_INTERPRET=1)"
        dims = CPU_HEAD_DIMS
    else:
        return f"device {device.type!r}"
    if head_dim not in dims:
        return f"head dimension {head_dim} (the kernel takes {dims})"
    return None


@torch.library.custom_op("clipfp8::fp8_flash_attention", mutates_args=())
def fp8_flash_attention(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, q_scale: torch.Tensor,
                        k_scale: torch.Tensor, v_scale: torch.Tensor, p_qmul: torch.Tensor,
                        p_scale: torch.Tensor, mask: torch.Tensor | None, sm_scale: float,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """softmax(q k^T * sm_scale + mask) v with Q, K, V and P in FP8 (see the module docstring).

    q8 float8_e4m3fn (B, H, L, D); k8 float8_e4m3fn (B, H, S, D); vt8 float8_e4m3fn (B, H, D, S)
    with unit stride along S; ``*_scale`` fp32 () dequantize scales of Q, K, V and P, ``p_qmul``
    fp32 () P's quantize multiplier (``quant.runtime.fp8_linear.fp8_scales``); mask None or an
    additive float mask broadcastable to (B, H, L, S) (e.g. (L, S) causal, (B, 1, 1, S) key
    padding). Returns ``out_dtype`` (B, L, H, D), contiguous. A query row whose keys are all
    masked out gets zeros (a torch softmax gives NaN there).
    """
    return launch(q8, k8, vt8, (q_scale, k_scale, v_scale, p_qmul, p_scale), mask, sm_scale, out_dtype)


def launch(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, scales: tuple[torch.Tensor, ...],
           mask: torch.Tensor | None, sm_scale: float, out_dtype: torch.dtype,
           tiles: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """The kernel launch behind the custom op; arguments as there, ``scales`` = (q_scale,
    k_scale, v_scale, p_qmul, p_scale). ``tiles`` = (BLOCK_M, BLOCK_N, warps, stages) bypasses
    the autotuner (the GPU test runs every ``GPU_CONFIGS`` entry that way)."""
    b, h, n, d = q8.shape
    s = k8.shape[2]
    out = torch.empty((b, n, h, d), dtype=out_dtype, device=q8.device)
    kernel = _kernel()
    interpret = interpreting()
    m = q8  # a placeholder pointer, never read without HAS_MASK
    mstrides: tuple[int, ...] = (0, 0, 0, 0)
    if mask is not None:  # broadcast to (B, H, L, S) as a view: zero strides, no copy
        m = mask.expand(b, h, n, s)
        mstrides = m.stride()
    meta: dict[str, int] = {}
    if interpret:  # fixed tiles; the autotuner would time configurations with CUDA events
        meta = dict(zip(("BLOCK_M", "BLOCK_N"), INTERPRETER_BLOCKS, strict=True))
    elif tiles is not None:
        kernel = getattr(kernel, "fn", kernel)  # the autotuner's jitted function
        meta = dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), tiles, strict=True))

    def grid(cfg: dict[str, Any]) -> tuple[int, int]:
        return (b * h, -(-n // cfg["BLOCK_M"]))

    # Triton launches on the current CUDA device, which need not be the tensors'.
    with torch.cuda.device(q8.device) if q8.is_cuda else contextlib.nullcontext():
        kernel[grid](
            q8, k8, vt8, m, out, *scales,
            *q8.stride(), *k8.stride(), *vt8.stride(), *mstrides,
            out.stride(0), out.stride(2), out.stride(1), out.stride(3),
            h, n, s, sm_scale, _bucket(b * h),
            HAS_MASK=mask is not None, ROUND_FIRST=interpret, HEAD_DIM=d, **meta)
    return out


@fp8_flash_attention.register_fake
def _(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, q_scale: torch.Tensor, k_scale: torch.Tensor,
      v_scale: torch.Tensor, p_qmul: torch.Tensor, p_scale: torch.Tensor, mask: torch.Tensor | None,
      sm_scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    b, h, n, d = q8.shape
    return q8.new_empty((b, n, h, d), dtype=out_dtype)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scales: tuple[torch.Tensor, ...],
                        mask: torch.Tensor | None) -> torch.Tensor:
    """What the kernel computes, in fp32 torch ops (for tests): q, k, v float8 (B, H, L|S, D),
    ``scales`` = (q_scale, k_scale, v_scale, p_qmul, p_scale) -> fp32 (B, L, H, D)."""
    qs, ks, vs, pq, ps = (t.float() for t in scales)
    sc = (q.float() @ k.float().transpose(-2, -1)) * (qs * ks * q.shape[-1] ** -0.5)
    if mask is not None:
        sc = sc + mask.float()
    p8 = (torch.softmax(sc, dim=-1) * pq).clamp(max=448.0).to(torch.float8_e4m3fn)
    return ((p8.float() @ v.float()) * (ps * vs)).transpose(1, 2)


__all__ = ["fp8_flash_attention", "launch", "unsupported_reason", "reference_attention", "GPU_HEAD_DIMS",
           "CPU_HEAD_DIMS", "MIN_CAPABILITY"]
