"""Glue between the pure ``app.search`` module, the ``indexing`` package and the encoders.

``AppContext`` is everything the UI needs at run time: the open index (adapted to
``app.search.SearchIndex``), the encoders keyed by UI label ("FP16", "FP8"), the benchmark ground
truth and a plain-words note about where FP8 runs.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from clipfp8.app.search import (GroundTruth, HitLike, PathOutsideCorpusError, Query, captions_ground_truth,
                        labels_ground_truth, safe_resolve)
from clipfp8.quant.core.config import IMAGE_EXTS, EncoderSpec, ModelSpec
from clipfp8.quant.core.encoder import Encoder

log = logging.getLogger(__name__)

#: Test hook: when set to "1", ``serve`` uses ``quant.core.testing.FakeEncoder`` twins instead of models.
FAKE_ENCODER_ENV = "CLIPFP8_TEST_FAKE_ENCODER"
REF_PRECISIONS = ("fp16", "bf16", "fp32")
FP8_PRECISIONS = ("fp8", "trt-fp8", "fp8-fake")
CPU_FP8_NOTE = ("No GPU found: FP8 runs as **simulated quantization on the CPU** (ModelOpt fake-quant) — "
                "an accuracy preview of the FP8 model, with no speed-up.")


class StoreIndex:
    """``app.search.SearchIndex`` over an ``indexing.IndexStore``."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.corpus_root = Path(store.corpus_root).resolve()

    def query(self, encoder: Encoder, query: Query, k: int, threshold: float | None) -> Sequence[HitLike]:
        from clipfp8.indexing.query import search

        return search(self.store, encoder, query, k=k, threshold=threshold)

    def resolve(self, rel_path: str) -> Path:
        """The index's own resolve, then our own check: both must agree it is inside the corpus."""
        from clipfp8.indexing.errors import QueryError

        try:
            self.store.resolve(rel_path)
        except QueryError as e:
            raise PathOutsideCorpusError(str(e)) from e
        return safe_resolve(self.corpus_root, rel_path)


def fake_encoders() -> dict[str, Encoder]:
    """The FakeEncoder twins used when ``CLIPFP8_TEST_FAKE_ENCODER=1`` (tests only)."""
    from clipfp8.quant.core.testing import FakeEncoder

    return {"FP16": FakeEncoder(precision="fp16"), "FP8": FakeEncoder(precision="fp8-fake", noise=0.15)}


def fake_hook_enabled() -> bool:
    return os.environ.get(FAKE_ENCODER_ENV) == "1"


def cuda_fp8_capable() -> bool:
    """True on a CUDA GPU with compute capability >= 8.9 (Ada/Hopper: native FP8 GEMMs)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def pick_precisions(indexed: Sequence[str], fp8_capable: bool) -> tuple[str | None, str | None]:
    """(reference, fp8) precisions to load, among those the index holds and this machine runs."""
    ref = next((p for p in REF_PRECISIONS if p in indexed), None)
    usable = [p for p in FP8_PRECISIONS if p in indexed and (fp8_capable or p == "fp8-fake")]
    return ref, (usable[0] if usable else None)


def encoders_for_index(stats: dict[str, Any], model: ModelSpec, device: str, quantized: Path | None,
                       batch_size: int = 64,
                       factory: Callable[[EncoderSpec], Encoder] | None = None) -> dict[str, Encoder]:
    """Build the encoders whose embeddings the index holds: {"FP16": ..., "FP8": ...} (FP8 only
    when ``quantized`` is given). ``stats`` is ``IndexStore.stats()``."""
    if factory is None:
        from clipfp8.quant.core.encoder import create_encoder as factory  # type: ignore[no-redef]
    indexed = [e["precision"] for e in stats.get("encoders", {}).values()]
    ref, fp8 = pick_precisions(indexed, device != "cpu" and cuda_fp8_capable())
    if ref is None:
        raise ValueError(f"the index holds no FP16/BF16/FP32 embeddings (it has {indexed}); "
                         "index the corpus with --precision fp16")
    out = {"FP16" if ref == "fp16" else ref.upper(): factory(
        EncoderSpec(model=model, precision=ref, device=device, batch_size=batch_size))}  # type: ignore[arg-type]
    if quantized is not None and fp8 is not None:
        out["FP8"] = factory(EncoderSpec(model=model, precision=fp8, device=device,  # type: ignore[arg-type]
                                         quantized=quantized, batch_size=batch_size))
    elif quantized is not None:
        log.warning("--quantized given but the index holds no FP8 embeddings usable here (%s)", indexed)
    return out


def load_ground_truth(corpus_root: Path) -> GroundTruth | None:
    """captions.json ({file: [captions]}) when present, else class folders, else None."""
    cap_file = corpus_root / "captions.json"
    if cap_file.is_file():
        try:
            captions = json.loads(cap_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            log.warning("ignoring unreadable %s: %s", cap_file, e)
        else:
            if isinstance(captions, dict):
                return captions_ground_truth({str(f): [str(c) for c in cs] for f, cs in captions.items()})
    labels = {p.relative_to(corpus_root).as_posix(): p.parent.name
              for p in sorted(corpus_root.rglob("*"))
              if p.suffix.lower() in IMAGE_EXTS and p.parent != corpus_root and p.is_file()}
    return labels_ground_truth(labels) if len(set(labels.values())) >= 2 else None


@dataclass
class AppContext:
    """Run-time state shared by every session of the UI."""

    index_dir: Path
    encoders: dict[str, Encoder]
    index: StoreIndex
    truth: GroundTruth | None = None
    device_note: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def corpus_root(self) -> Path:
        return self.index.corpus_root

    def reopen(self) -> None:
        """Re-open the index after (re)indexing so searches see the new generation."""
        from clipfp8.indexing import open_index

        store = open_index(self.index_dir)
        # Swap, don't close the old handle: a search in another session may still be using it;
        # it is released when the last reference goes.
        self.index, self.stats = StoreIndex(store), store.stats()


def open_context(index_dir: Path, encoders: dict[str, Encoder] | None = None, model: ModelSpec | None = None,
                 device: str = "auto", quantized: Path | None = None, batch_size: int = 64) -> AppContext:
    """Open ``index_dir`` and build the encoders it needs (or use the given ones)."""
    from clipfp8.indexing import open_index

    store = open_index(index_dir)
    stats = store.stats()
    if encoders is None:
        encoders = fake_encoders() if fake_hook_enabled() else encoders_for_index(
            stats, model or ModelSpec(), EncoderSpec(device=device).resolved_device(), quantized, batch_size)
    index = StoreIndex(store)
    fp8 = encoders.get("FP8")
    note = CPU_FP8_NOTE if fp8 is not None and fp8.precision == "fp8-fake" and fp8.device == "cpu" else ""
    return AppContext(Path(index_dir), encoders, index, load_ground_truth(index.corpus_root), note, stats)
