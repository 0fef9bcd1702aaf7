"""``build_engine``: compile an encoder once, warm up every batch bucket the product uses, and
store the compiler's cache as an engine (``quant.runtime.engine`` describes the format).

What "every bucket" means: each size in the CUDA-graph buckets of ``FastTorchEncoder``'s runners
(``fast_fp16.DEFAULT_GRAPH_BUCKETS``), the text query path (batch 1, padded to 2) and the index
batch sizes asked for (``batch_sizes``, default ``spec.batch_size``), on both towers. The graphs
are compiled dynamic in the batch, so these calls mostly hit one compiled graph per tower; the
warm-up makes sure every graph (and every recompilation) a later process would need is recorded.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from clipfp8.quant.core.config import EncoderSpec
from clipfp8.quant.core.encoder import Encoder
from clipfp8.quant.core.errors import EngineError, UnsupportedPrecisionError
from clipfp8.quant.runtime.engine import (
    ENGINE_PRECISIONS,
    CompileCache,
    EngineKey,
    MachineInfo,
    TorchCompileCache,
    engine_root,
    write_engine,
)

log = logging.getLogger(__name__)

#: The caption used to warm up the text tower (any text works: token ids do not change shapes).
WARMUP_TEXT = "a photo of a red car."


def default_factory(precision: str) -> Callable[[EncoderSpec], Encoder]:
    """The product's compiled encoder factory of ``precision``, told not to load an engine."""
    if precision == "fp8":
        from clipfp8.quant.runtime.fp8_encoder import create_fp8_encoder

        return functools.partial(create_fp8_encoder, engine="off")
    if precision in ("fp16", "bf16"):
        from clipfp8.quant.runtime.fast_fp16 import create_fast_fp16_encoder

        return functools.partial(create_fast_fp16_encoder, engine="off")
    raise UnsupportedPrecisionError(f"compiled engines exist for {ENGINE_PRECISIONS}, not {precision!r}")


def warmup_sizes(encoder: Encoder, batch_sizes: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(graph buckets of ``encoder``'s runners, every batch size to run once): the buckets, 1
    (a text query) and ``batch_sizes``."""
    buckets: set[int] = set()
    for runner in (getattr(encoder, "image_runner", None), getattr(encoder, "text_runner", None)):
        buckets |= set(getattr(runner, "buckets", ()))
    return tuple(sorted(buckets)), tuple(sorted(buckets | {1} | {int(b) for b in batch_sizes}))


def warm_up(encoder: Encoder, sizes: Sequence[int]) -> None:
    """Run both towers once at each batch size in ``sizes`` (zero images, a fixed caption), so
    every compile and CUDA-graph capture of those sizes happens now."""
    h, w = encoder.image_size
    for n in sizes:
        encoder.encode_images(torch.zeros(n, 3, h, w))
        encoder.encode_texts([WARMUP_TEXT] * n)
        log.debug("warmed up batch %d", n)


def runtime_state_of(encoder: Encoder, spec: EncoderSpec) -> tuple[dict[str, bytes], torch.nn.Module | None]:
    """fp8: (the converted model as engine files, the model rebuilt from them) -- the files let a
    start with the engine skip ModelOpt (``runtime_state``). Only when the rebuilt model computes
    what ``encoder.model`` computes (eagerly, on a random batch); else (and for fp16/bf16)
    ``({}, None)``."""
    from clipfp8.quant.runtime import runtime_state as rs

    model = getattr(encoder, "model", None)
    if spec.precision != "fp8" or not isinstance(model, torch.nn.Module):
        return {}, None
    plain = rs.plain_model(spec.model)
    exported = rs.export_runtime(model, plain.model, getattr(encoder, "conversion_report", None))
    if exported is None:
        return {}, None
    state, plan = exported
    dtype = getattr(encoder, "dtype", torch.float16)
    rebuilt: Any = rs.rebuild_runtime(plain.model, plan, state, encoder.device, dtype)
    h, w = encoder.image_size
    images = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0)).to(encoder.device, dtype)
    tokens = plain.tokenizer([WARMUP_TEXT, "two dogs on a beach."]).to(encoder.device)
    clip: Any = model  # an open_clip CLIP (nn.Module attributes type as Tensor | Module)
    with torch.inference_mode():
        pairs = [(clip.encode_image(images), rebuilt.encode_image(images)),
                 (clip.encode_text(tokens), rebuilt.encode_text(tokens))]
    for ref, got in pairs:
        if not torch.allclose(ref.float(), got.float(), rtol=0, atol=1e-3 * float(ref.abs().max()) + 1e-6):
            log.warning("FP8 runtime state not stored: the rebuilt model differs from the converted one "
                        "(max |diff| %.3g); starts will load the checkpoint through ModelOpt", (ref - got).abs().max())
            return {}, None
    return rs.encode_plan(state, plan), rebuilt


def build_engine(spec: EncoderSpec, batch_sizes: Sequence[int] | None = None, *, engine_dir: Path | None = None,
                 factory: Callable[[EncoderSpec], Encoder] | None = None, cache: CompileCache | None = None,
                 machine: MachineInfo | None = None) -> Path:
    """Build and store the compiled engine of ``spec`` (precision fp8, fp16 or bf16, on CUDA);
    returns its folder (``engine_root(spec, checksum, engine_dir) / key.folder_name()``).

    ``batch_sizes``: image/text batch sizes the product runs besides the graph buckets (default
    ``(spec.batch_size,)``; the largest becomes the encoder's batch size). ``factory`` (spec ->
    encoder, must compile and not load an engine), ``cache`` and ``machine`` are injectable for
    tests. An existing engine of the same key is replaced atomically. Raises ``EngineError``
    when nothing was compiled, ``UnsupportedPrecisionError`` for another precision or no CUDA.
    """
    if spec.precision not in ENGINE_PRECISIONS:
        raise UnsupportedPrecisionError(f"compiled engines exist for {ENGINE_PRECISIONS}, not {spec.precision!r}")
    sizes = tuple(sorted({int(b) for b in (batch_sizes or (spec.batch_size,))}))
    if sizes[0] < 1:
        raise ValueError(f"build_engine: batch sizes must be >= 1, got {sizes} (--batch-size)")
    machine = machine or MachineInfo.current(spec.resolved_device())
    spec = dataclasses.replace(spec, batch_size=sizes[-1])
    cache = cache or TorchCompileCache()
    start = time.perf_counter()
    with cache.recording():
        encoder = (factory or default_factory(spec.precision))(spec)
        runtime, rebuilt = runtime_state_of(encoder, spec)
        if rebuilt is not None and hasattr(encoder, "with_model"):
            encoder = encoder.with_model(rebuilt)  # compile the very model later starts load
        buckets, run_sizes = warmup_sizes(encoder, sizes)
        warm_up(encoder, run_sizes)
        saved = cache.save()
    seconds = time.perf_counter() - start
    if saved is None:
        raise EngineError(f"building the {spec.precision} engine compiled nothing: is torch.compile disabled "
                          "(e.g. TORCHDYNAMO_DISABLE=1)?")
    data, entries = saved
    ident = encoder.identity()
    key = EngineKey.for_machine(machine, checksum=ident.checksum, model_id=ident.model_id, precision=spec.precision,
                                batch_buckets=buckets, max_batch=sizes[-1],
                                variant=str(getattr(encoder, "engine_variant", "")))
    files = {"compile_cache": data, **runtime}
    folder = write_engine(engine_root(spec, ident.checksum, engine_dir), key, files,
                          build_seconds=seconds, cache_entries=entries)
    log.info("built %s engine %s in %.1f s (%.1f MiB; %s)", spec.precision, folder, seconds, len(data) / 2**20,
             ", ".join(f"{v} {k}" for k, v in sorted(entries.items())))
    return folder


__all__ = ["build_engine", "default_factory", "runtime_state_of", "warm_up", "warmup_sizes", "WARMUP_TEXT"]
