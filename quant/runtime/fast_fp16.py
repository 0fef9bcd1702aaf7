"""Fast GPU execution shared by the FP16 baseline and the FP8 runtime.

* ``BatchRunner``: one ``torch.compile`` per tower with a dynamic batch dimension (one compile
  serves every batch size), plus CUDA graphs captured per small-batch bucket (launch overhead
  dominates there). Batches of 1 are padded to 2 because dynamo specialises size-1 dims, which
  would cost a second full compile.
* ``FastTorchEncoder``: the ``Encoder`` over two runners (image and text towers).
* ``configure_compile_cache()``: Inductor's on-disk caches, so later processes skip compiling.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from clipfp8.quant.core.encoder import Encoder, EncoderIdentity, normalize_to_numpy, unit_rows
from clipfp8.quant.runtime.compile_cache import configure_compile_cache  # re-exported (bench uses it here)

log = logging.getLogger(__name__)

DEFAULT_GRAPH_BUCKETS: tuple[int, ...] = (2, 4, 8, 16, 32)
_Tower = Callable[[torch.Tensor], torch.Tensor]


class BatchRunner:
    """Run ``fn`` (tensor (B, ...) -> tensor (B, ...)) fast on CUDA.

    ``compile``: wrap ``fn`` in ``torch.compile`` (batch dim dynamic; ``compile_mode``: its
    ``mode``, e.g. ``"max-autotune-no-cudagraphs"`` -- this class captures its own graphs).
    ``graph_buckets``: batch sizes for which a CUDA graph is captured on first use; a batch
    n <= max bucket is padded to the next bucket and replayed. Outputs are fresh tensors.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], *, compile: bool = True,
                 graph_buckets: Sequence[int] = DEFAULT_GRAPH_BUCKETS, min_batch: int = 2,
                 compile_mode: str | None = None) -> None:
        self._eager = fn
        self._fn = torch.compile(fn, mode=compile_mode) if compile else fn
        self.compiled = compile
        self.buckets = tuple(sorted(graph_buckets))
        self.min_batch = min_batch if compile else 1
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        # The type of the public torch.cuda.graph_pool_handle()'s result; torch names it privately.
        self._pool: torch.cuda._POOL_HANDLE | None = None

    def _call_fn(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            if not x.is_inference():
                # Padded and graph-captured inputs are inference tensors; one that is not has
                # another dispatch-key set, and Dynamo would recompile the whole tower for it.
                x = x.clone()
            torch._dynamo.mark_dynamic(x, 0)
        return self._fn(x)

    def _pad(self, x: torch.Tensor, size: int) -> torch.Tensor:
        if x.shape[0] >= size:
            return x
        pad = x[-1:].expand(size - x.shape[0], *x.shape[1:])
        return torch.cat([x, pad])

    def _capture(self, x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_in = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: compile/autotune and cuBLAS workspaces outside the graph
                self._call_fn(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the indexer's decode threads (and a Ray actor's second batch) keep using
        # the GPU on their own streams while a small batch's graph is captured here; the default
        # ("global") would fail the capture on their allocations.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            static_out = self._call_fn(static_in)
        return graph, static_in, static_out

    def warmup(self, example: torch.Tensor, sizes: Sequence[int]) -> None:
        """Compile and capture ahead of time for the given batch sizes (example: one item batch)."""
        for n in sizes:
            self(example[:1].expand(n, *example.shape[1:]).contiguous())

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = int(x.shape[0])
        size = max(n, self.min_batch)
        bucket = next((b for b in self.buckets if b >= size), None) if x.is_cuda else None
        if bucket is None:
            return self._call_fn(self._pad(x, size))[:n]
        key = (bucket, tuple(x.shape[1:]), x.dtype, x.device)
        if key not in self._graphs:
            self._graphs[key] = self._capture(self._pad(x, bucket))
        graph, static_in, static_out = self._graphs[key]
        static_in[:n].copy_(x)
        graph.replay()
        return static_out[:n].clone()


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"encode_images expects (N, 3, H, W), got {tuple(images.shape)}")


class FastTorchEncoder(Encoder):
    """An ``Encoder`` over a CUDA model run through two ``BatchRunner`` (image, text), or over
    the two given ``runners`` (callables (B, ...) -> (B, D), e.g. TensorRT engines).

    ``model`` must already sit on ``device`` in ``dtype`` (fp16). encode_images: float32
    (N, 3, H, W) -> float32 (N, D) unit rows; encode_texts: N strings -> float32 (N, D).
    """

    def __init__(self, model: nn.Module, preprocess: Callable[[Any], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor], *, precision: str, device: str,
                 name: str, model_id: str, checksum: str, dim: int, image_size: tuple[int, int],
                 batch_size: int = 64, dtype: torch.dtype = torch.float16, compile: bool = True,
                 runners: tuple[Callable[[torch.Tensor], torch.Tensor],
                                Callable[[torch.Tensor], torch.Tensor]] | None = None,
                 engine_variant: str = "") -> None:
        self.model, self.dtype = model.eval(), dtype
        #: How the model was built (e.g. "attention=sdpa"); recorded in a compiled engine's key.
        self.engine_variant = engine_variant
        self._preprocess, self._tokenizer = preprocess, tokenizer
        self.precision, self.device, self.name, self.dim = precision, device, name, dim
        self.image_size, self.batch_size = image_size, batch_size
        self._identity = EncoderIdentity(name, precision, model_id, checksum, dim)
        if runners is not None:  # e.g. TensorRT engines
            self.image_runner, self.text_runner = runners
            return
        if compile:
            configure_compile_cache()
        # nn.Module.__getattr__ types every attribute as Tensor | Module; on an open_clip CLIP
        # these are its methods, (B, ...) tensor -> (B, D) tensor.
        self.image_runner = BatchRunner(cast(_Tower, model.encode_image), compile=compile)
        self.text_runner = BatchRunner(cast(_Tower, model.encode_text), compile=compile)

    def preprocess(self, image: Any) -> torch.Tensor:
        return self._preprocess(image)

    def identity(self) -> EncoderIdentity:
        return self._identity

    def with_model(self, model: nn.Module) -> FastTorchEncoder:
        """A copy running ``model`` (same identity, preprocessing, batch size, dtype and compile
        setting) through fresh runners -- e.g. the FP8 model rebuilt from an engine's files."""
        new = copy.copy(self)
        clip: Any = model.eval()  # an open_clip CLIP (typed nn.Module: attributes are Tensor | Module)
        new.model = clip
        compiled = bool(getattr(self.image_runner, "compiled", False))
        new.image_runner = BatchRunner(clip.encode_image, compile=compiled)
        new.text_runner = BatchRunner(clip.encode_text, compile=compiled)
        return new

    def _image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """float32 (N, 3, H, W) -> (N, D) in the model's dtype, on the device (N >= 1)."""
        _check_images(images)
        return torch.cat([self.image_runner(chunk.to(self.device, self.dtype, non_blocking=True))
                          for chunk in images.split(self.batch_size)])

    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        _check_images(images)
        if images.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        return normalize_to_numpy(self._image_embeddings(images))

    def encode_images_async(self, images: torch.Tensor) -> Callable[[], np.ndarray]:
        """As ``encode_images``, but on CUDA returns once the work is queued: the normalised
        rows are copied into pinned host memory behind an event, and the returned function
        waits for that event only (the host can decode the next batch meanwhile)."""
        if not str(self.device).startswith("cuda") or images.shape[0] == 0:
            return super().encode_images_async(images)
        with torch.inference_mode():
            out = unit_rows(self._image_embeddings(images))
            host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(out, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(torch.device(self.device)))

        def result() -> np.ndarray:
            done.synchronize()  # releases the GIL while the device finishes
            return host.numpy()

        return result

    def warm_up_images(self, batch_size: int) -> bool:
        """Run the image tower once on a zero batch of ``min(batch_size, self.batch_size)``
        (the size ``encode_images`` splits into), so its compile -- a cache hit with an engine,
        still seconds of Dynamo tracing and kernel loading -- happens before the first real
        batch. Only on CUDA with a compiled tower (else returns False)."""
        if not str(self.device).startswith("cuda") or not getattr(self.image_runner, "compiled", False):
            return False
        n = max(1, min(batch_size, self.batch_size))
        zeros = torch.zeros((n, 3, *self.image_size), dtype=torch.float32, device=self.device)
        self.encode_images_async(zeros)()
        return True

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = [self.text_runner(self._tokenizer(texts[i:i + self.batch_size]).to(self.device))
               for i in range(0, len(texts), self.batch_size)]
        return normalize_to_numpy(torch.cat(out))


_HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
#: ``attention`` of ``create_fast_fp16_encoder``: "sdpa" rewrites nn.MultiheadAttention into
#: explicit projections + F.scaled_dot_product_attention before compiling (issue 12: compiled
#: nn.MultiheadAttention was slower than its eager fast path); "mha" compiles the model as is.
ATTENTION_MODES = ("sdpa", "mha")


def create_fast_fp16_encoder(spec: Any, *, attention: str = "sdpa", engine: str | None = None,
                             engine_dir: Path | None = None, cache: Any = None) -> FastTorchEncoder:
    """The best FP16 (or BF16, after ``spec.precision``) encoder for ``spec`` (an ``EncoderSpec``)
    on CUDA: torch.compile + CUDA graphs, its compile served by a stored engine when one matches
    (``quant.runtime.engine``; ``engine``: policy, default ``$CLIPFP8_ENGINE``; ``eager`` skips
    compiling). Embeddings carry the same identity as the eager ``TorchEncoder``'s."""
    from clipfp8.quant.core.errors import UnsupportedPrecisionError
    from clipfp8.quant.core.models import load_model
    from clipfp8.quant.runtime.engine import engine_policy, prepare_engine

    device = spec.resolved_device()
    if not device.startswith("cuda"):
        raise UnsupportedPrecisionError("the compiled FP16 encoder needs a CUDA device (use precision fp32 on the CPU)")
    if spec.precision not in _HALF_DTYPES:
        raise UnsupportedPrecisionError(f"create_fast_fp16_encoder serves fp16 and bf16, got {spec.precision!r}")
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    policy = engine_policy(engine)
    loaded = load_model(spec.model)
    checksum = loaded.weights_checksum()  # before the attention rewrite: same identity as eager
    if attention == "sdpa":
        from clipfp8.quant.runtime.fp8_attention import ensure_explicit_attention

        ensure_explicit_attention(loaded.model)
    variant = f"attention={attention}"
    compiled = policy != "eager"
    if compiled:
        prepare_engine(spec, checksum=checksum, model_id=loaded.spec.model_id(), variant=variant, engine=policy,
                       engine_dir=engine_dir, cache=cache)
    dtype = _HALF_DTYPES[spec.precision]
    model = loaded.model.to(device=device, dtype=dtype)
    return FastTorchEncoder(model, loaded.preprocess, loaded.tokenizer, precision=spec.precision, device=device,
                            name=f"{loaded.spec.name}-{spec.precision}", model_id=loaded.spec.model_id(),
                            checksum=checksum, dim=loaded.embed_dim, image_size=loaded.image_size,
                            batch_size=spec.batch_size, dtype=dtype, compile=compiled, engine_variant=variant)


def create_half_encoder(spec: Any) -> Encoder:
    """Registered factory of precisions ``fp16`` and ``bf16`` (entry points, preferred over the
    core's eager registration): the compiled encoder on CUDA, the core's eager ``TorchEncoder``
    on the CPU, without Triton, with ``CLIPFP8_ENGINE=eager``, or for a text-only caller (a
    `search` process encodes one query: compiling would cost seconds, eager costs ms)."""
    from clipfp8.quant.core.encoder import create_torch_encoder
    from clipfp8.quant.runtime.engine import engine_policy

    if not spec.resolved_device().startswith("cuda") or engine_policy() == "eager" or spec.text_only:
        return create_torch_encoder(spec)
    if not _has_triton():
        log.info("torch.compile needs Triton, which this torch lacks: %s runs eagerly", spec.precision)
        return create_torch_encoder(spec)
    return create_fast_fp16_encoder(spec)


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # pragma: no cover - private helper of torch, present since 2.1
        return False
    return bool(has_triton())


__all__ = ["BatchRunner", "FastTorchEncoder", "configure_compile_cache", "create_fast_fp16_encoder",
           "create_half_encoder", "ATTENTION_MODES",
           "DEFAULT_GRAPH_BUCKETS"]
