"""Glue between the pure ``app.search`` module, the ``indexing`` package and the encoders.

``AppContext`` is everything the UI needs at run time: the open index (adapted to
``app.search.SearchIndex``), the encoders keyed by UI label ("FP16", "FP8"), the corpus' top-level
folders, the captions files the Benchmark tab offers, and a plain-words note about where FP8 runs.
Images reach the browser only as pixels decoded here: a result's full-size view is read through
the index's own path for that hit id (:func:`load_full_image`), an upload through
:func:`decode_upload`, both with bounded size.
"""
from __future__ import annotations

import logging
import os
import posixpath
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipfp8.app.benchmark import GroundTruth, captions_ground_truth, folder_labels, labels_ground_truth, match_captions
from clipfp8.app.search import HitLike, PathOutsideCorpusError, Query, safe_resolve, top_folders
from clipfp8.quant.core.config import EncoderSpec, ModelSpec
from clipfp8.quant.core.encoder import Encoder

log = logging.getLogger(__name__)

#: Test hook: when set to "1", ``serve`` uses ``quant.core.testing.FakeEncoder`` twins instead of models.
FAKE_ENCODER_ENV = "CLIPFP8_TEST_FAKE_ENCODER"
REF_PRECISIONS = ("fp16", "bf16", "fp32")
FP8_PRECISIONS = ("fp8", "trt-fp8", "fp8-fake")
MB = 1 << 20
#: The Benchmark tab's choice for class-folder ground truth (any other choice is a captions file).
FOLDERS_SOURCE = "class folders (one query per folder name)"
CAPTION_SUFFIXES = (".json", ".csv")
MAX_CAPTIONS_BYTES = 20 * MB
#: Full-size view: files up to this size, decoded up to this many pixels, sent at most this wide.
FULL_MAX_BYTES, FULL_MAX_PIXELS, FULL_MAX_SIDE = 64 * MB, 64_000_000, 2048
#: Uploaded query images: decoded up to this many pixels; kept at most this wide as the query.
UPLOAD_MAX_PIXELS, QUERY_MAX_SIDE = 25_000_000, 1024
#: The reference encoder's label when it runs fp32 on the CPU (fp16 is 5-10x slower there).
CPU_BASELINE_LABEL = "FP32 (CPU baseline)"
CPU_BASELINE_NOTE_MD = ("The baseline runs as **FP32 on the CPU**: fp16 matrix products have no fast CPU "
                        "kernels (5-10x slower than fp32), so FP32 stands in for FP16 here.")
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

    def path_of(self, hit_id: int) -> str | None:
        return self.store.id_paths(np.asarray([int(hit_id)], dtype=np.int64)).get(int(hit_id))

    def indexed_paths(self) -> list[str]:
        rows = self.store.db.query("SELECT path_raw FROM images WHERE status='ok' ORDER BY path_raw")
        return [os.fsdecode(bytes(r["path_raw"])) for r in rows]

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


def pick_precisions(indexed: Sequence[str], fp8_capable: bool,
                    prefer: str | None = None) -> tuple[str | None, str | None]:
    """(reference, fp8) precisions to load, among those the index holds and this machine runs;
    ``prefer`` (e.g. fp32 on the CPU) wins as the reference when the index holds it."""
    ref = prefer if prefer in indexed else next((p for p in REF_PRECISIONS if p in indexed), None)
    usable = [p for p in FP8_PRECISIONS if p in indexed and (fp8_capable or p == "fp8-fake")]
    return ref, (usable[0] if usable else None)


def baseline_label(precision: str, device: str) -> str:
    """The UI label of the reference encoder: "FP16", "BF16", "FP32", and on the CPU
    "FP32 (CPU baseline)" (the 16-bit baseline runs as fp32 there)."""
    if precision == "fp32" and not device.startswith("cuda"):
        return CPU_BASELINE_LABEL
    return precision.upper()


def encoders_for_index(stats: dict[str, Any], model: ModelSpec | None, device: str, quantized: Path | None,
                       batch_size: int | None = 64,
                       factory: Callable[[EncoderSpec], Encoder] | None = None,
                       specs: dict[str, dict[str, Any] | None] | None = None,
                       precision: str = "auto") -> dict[str, Encoder]:
    """Build the encoders whose embeddings the index holds: {"FP16" (or the baseline's label):
    ..., "FP8": ...}. ``stats`` is ``IndexStore.stats()``; ``specs`` the specs the index recorded
    per encoder name (``IndexStore.recorded_spec``). ``model``/``quantized``/``batch_size``: the
    user's flags, None = what the index recorded (``indexing.specs``). FP8 is served when the
    index holds FP8 embeddings runnable here and their quantized dir is given or recorded.
    ``precision``: the reference, ``auto`` = fp32 on the CPU / fp16 on CUDA when the index
    holds it, else the index's first baseline."""
    from clipfp8.indexing.specs import SpecOverrides, choose_encoder, spec_for_encoder, warn_cpu_half
    from clipfp8.quant.core.config import baseline_precision

    if factory is None:
        from clipfp8.quant.core.encoder import create_encoder

        factory = create_encoder
    rows = stats.get("encoders", {})
    specs = specs or {}
    indexed = [e["precision"] for e in rows.values()]
    prefer = baseline_precision(device) if precision == "auto" else precision
    ref, fp8 = pick_precisions(indexed, device != "cpu" and cuda_fp8_capable(), prefer=prefer)
    if ref is None:
        raise ValueError(f"the index holds no FP16/BF16/FP32 embeddings (it has {indexed}); "
                         "index the corpus with --precision auto (fp16 on a GPU, fp32 on the CPU)")
    given = SpecOverrides(model=model, quantized=quantized, batch_size=batch_size, device=device)
    hint = model.name if model is not None else None
    name = choose_encoder(rows, ref, device, hint)
    warn_cpu_half(ref, device)
    out = {baseline_label(ref, device): factory(spec_for_encoder(name, rows[name], specs.get(name), given))}
    if fp8 is not None:
        name = choose_encoder(rows, fp8, device, hint)
        if quantized is not None or (specs.get(name) or {}).get("quantized"):
            out["FP8"] = factory(spec_for_encoder(name, rows[name], specs.get(name), given))
        else:
            log.warning("the index holds %s embeddings but records no quantized dir: pass --quantized DIR "
                        "to serve FP8", fp8)
    elif quantized is not None:
        log.warning("--quantized given but the index holds no FP8 embeddings usable here (%s)", indexed)
    return out



def caption_sources(corpus_root: Path, max_depth: int = 2, max_entries: int = 20_000, limit: int = 50) -> list[str]:
    """Captions files the Benchmark tab offers, as corpus-relative POSIX paths.

    ``*.json``/``*.csv`` files at most ``max_depth`` folders deep (the scan stops after
    ``max_entries`` directory entries, so a huge flat corpus costs little), plus
    ``../captions.json`` (or ``.csv``) when the corpus is an ``images`` folder beside its captions
    file (``quant.core.captions.find_captions_file``: the layout of the evaluation sets).
    """
    from clipfp8.quant.core.captions import find_captions_file

    src = find_captions_file(corpus_root)
    found = [f"../{src.path.name}"] if src is not None and src.path.parent != corpus_root else []
    inside: list[str] = []
    queue, seen = deque([(corpus_root, 0)]), 0
    while queue and seen < max_entries and len(inside) < limit:
        folder, depth = queue.popleft()
        try:
            with os.scandir(folder) as entries:  # lazily: a huge folder costs only up to the cap
                for entry in entries:
                    seen += 1
                    if seen > max_entries:
                        break
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir(follow_symlinks=False) and depth < max_depth:
                        queue.append((Path(entry.path), depth + 1))
                    elif entry.name.lower().endswith(CAPTION_SUFFIXES) and entry.is_file(follow_symlinks=False):
                        inside.append(Path(entry.path).relative_to(corpus_root).as_posix())
        except OSError:
            continue
    # captions.json at the root first: it is the conventional file and the default choice.
    inside.sort(key=lambda p: (p.count("/"), not p.startswith("captions."), p))
    return inside[:limit] + found


def _read_captions(path: Path, shown: str) -> dict[str, list[str]]:
    """``{file: [captions]}`` from a JSON/CSV captions file, read leniently by the project's one
    captions reader; errors name ``shown``, not ``path`` (an upload's temp path means nothing)."""
    from clipfp8.quant.core.captions import read_captions
    from clipfp8.quant.core.errors import QuantError

    if path.suffix.lower() not in CAPTION_SUFFIXES:
        raise ValueError(f"captions file {shown} must be a .json or .csv file")
    if path.stat().st_size > MAX_CAPTIONS_BYTES:
        raise ValueError(f"captions file {shown} is larger than {MAX_CAPTIONS_BYTES // MB} MB")
    try:
        caps = read_captions(path, strict=False)
    except QuantError as e:
        raise ValueError(str(e).replace(str(path), shown)) from None
    if not caps:
        raise ValueError(f"captions file {shown} holds no captions")
    return caps


def load_ground_truth(index: Any, source: str | None, sources: Sequence[str] = (),
                      upload: tuple[Path, str] | None = None) -> GroundTruth:
    """The benchmark's ground truth: an uploaded captions file (``(path, original name)``), else
    ``source``: ``FOLDERS_SOURCE`` or a captions file inside the corpus (or one of ``sources``).

    Captions keys are matched to indexed paths with ``app.benchmark.match_captions``. Raises
    ``ValueError`` (or ``PathOutsideCorpusError``) with a user-facing message.
    """
    indexed = index.indexed_paths()
    if upload is not None:
        path, name = upload
        shown = f"`{Path(name).name}` (uploaded)"
        caps, base = _read_captions(Path(path), Path(name).name), ""
    elif source == FOLDERS_SOURCE:
        labels = folder_labels(indexed)
        if len(set(labels.values())) < 2:
            raise ValueError("this corpus has no class folders (images in at least two subfolders); "
                             "pick or upload a captions file instead")
        return labels_ground_truth(labels, "class folders")
    elif source:
        rel = source.strip().replace("\\", "/")
        path = (index.corpus_root.parent / rel[3:]) if rel in sources and rel.startswith("../") \
            else safe_resolve(index.corpus_root, rel)
        if not path.is_file():
            raise ValueError(f"no captions file {rel!r} in the corpus")
        shown = f"`{rel}` " + ("next to the corpus" if rel.startswith("../") else "in the corpus")
        caps, base = _read_captions(path, rel), posixpath.dirname(rel)
    else:
        raise ValueError("pick a ground truth: a captions file, class folders, or upload a captions file")
    matched, unmatched = match_captions(caps, indexed, base)
    if not matched:
        raise ValueError(f"none of the {len(caps)} files named in {shown} is in the index")
    return replace(captions_ground_truth(matched, shown), skipped=unmatched)


def _decode(data: bytes, name: str, max_pixels: int, draft: int) -> Image.Image:
    from clipfp8.indexing.decode import open_image
    from clipfp8.indexing.errors import DecodeError

    try:
        return open_image(data, max_pixels, draft=(draft, draft))
    except DecodeError as e:
        # Our own words: the decoder's details name CLI flags (--max-pixels) that mean nothing here.
        messages = {"empty_file": f"{name} is empty",
                    "not_an_image": f"{name} is not an image this app can read (JPEG, PNG, WebP, GIF, BMP, TIFF …)",
                    "oversized": f"{name} is too large: over {max_pixels:,} pixels",
                    "corrupt": f"{name} is damaged or truncated and cannot be decoded"}
        raise ValueError(messages.get(e.reason, f"{name} cannot be decoded ({e.reason})")) from None


def decode_upload(data: bytes, name: str) -> Image.Image:
    """An uploaded query image -> RGB PIL image at most ``QUERY_MAX_SIDE`` wide. Bounded memory:
    the header is checked against ``UPLOAD_MAX_PIXELS`` before any pixel is decoded."""
    im = _decode(data, f"the upload {Path(name).name!r}", UPLOAD_MAX_PIXELS, QUERY_MAX_SIDE)
    im.thumbnail((QUERY_MAX_SIDE, QUERY_MAX_SIDE))
    return im


def load_full_image(index: Any, hit_id: int) -> tuple[Image.Image, str]:
    """(RGB image at most ``FULL_MAX_SIDE`` wide, corpus-relative path) of indexed image ``hit_id``.

    The path is the index's own for that id, resolved inside the corpus; files over
    ``FULL_MAX_BYTES`` are refused. The caller sends these pixels, never the path.
    """
    from clipfp8.indexing.decode import read_file
    from clipfp8.indexing.errors import DecodeError

    rel = index.path_of(int(hit_id))
    if rel is None:
        raise ValueError("that result is no longer in the index; run the search again")
    path = index.resolve(rel)
    name = Path(rel).name
    try:
        if path.stat().st_size > FULL_MAX_BYTES:
            raise ValueError(f"{name} is larger than {FULL_MAX_BYTES // MB} MB; it is not shown at full size")
        data = read_file(path)
    except (OSError, DecodeError) as e:
        raise ValueError(f"{name} cannot be read any more ({e}); re-index the corpus") from None
    im = _decode(data, name, FULL_MAX_PIXELS, FULL_MAX_SIDE)
    im.thumbnail((FULL_MAX_SIDE, FULL_MAX_SIDE))
    return im, rel


@dataclass
class AppContext:
    """Run-time state shared by every session of the UI.

    ``folders``: the corpus' top-level folders holding indexed images (the folder filter);
    ``sources``: captions files the Benchmark tab offers (``caption_sources``)."""

    index_dir: Path
    encoders: dict[str, Encoder]
    index: Any  # app.search.SearchIndex; StoreIndex when served
    device_note: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    folders: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    @property
    def corpus_root(self) -> Path:
        return self.index.corpus_root

    def refresh(self) -> None:
        """Recompute the folders and the captions files after the index or corpus changed."""
        self.folders = top_folders(self.index.indexed_paths())
        self.sources = caption_sources(self.corpus_root)

    def default_source(self) -> str | None:
        """A captions file when the corpus has one, else class folders when there are two or more."""
        if self.sources:
            return self.sources[0]
        return FOLDERS_SOURCE if len(self.folders) >= 2 else None

    def warm_up(self, query: str = "a photo") -> dict[str, float]:
        """One text query per encoder through the index (k=1), before the app serves: the first
        user's query then does not pay first-call costs (torch's lazy CPU and CUDA set-up, a
        compiled encoder's graphs for a batch of one, the index's first search). Returns the
        seconds each label took."""
        took: dict[str, float] = {}
        for label, encoder in self.encoders.items():
            t0 = time.perf_counter()
            self.index.query(encoder, query, k=1, threshold=None)
            took[label] = round(time.perf_counter() - t0, 3)
        log.info("warm-up query: %s", ", ".join(f"{k} {v:.2f} s" for k, v in took.items()))
        return took

    def reopen(self) -> None:
        """Re-open the index after (re)indexing so searches see the new generation."""
        from clipfp8.indexing import open_index

        store = open_index(self.index_dir)
        # Swap, don't close the old handle: a search in another session may still be using it;
        # it is released when the last reference goes.
        self.index, self.stats = StoreIndex(store), store.stats()
        self.refresh()


def open_context(index_dir: Path, encoders: dict[str, Encoder] | None = None, model: ModelSpec | None = None,
                 device: str = "auto", quantized: Path | None = None, batch_size: int | None = None,
                 precision: str = "auto") -> AppContext:
    """Open ``index_dir`` and build the encoders it needs (or use the given ones): the model,
    quantized dir and batch size the index recorded, unless given (``encoders_for_index``)."""
    from clipfp8.indexing import open_index

    store = open_index(index_dir)
    stats = store.stats()
    if encoders is None:
        specs = {name: store.recorded_spec(name) for name in store.encoder_names()}
        encoders = fake_encoders() if fake_hook_enabled() else encoders_for_index(
            stats, model, EncoderSpec(device=device).resolved_device(), quantized, batch_size,
            specs=specs, precision=precision)
    fp8 = encoders.get("FP8")
    note = CPU_FP8_NOTE if fp8 is not None and fp8.precision == "fp8-fake" and fp8.device == "cpu" else ""
    if CPU_BASELINE_LABEL in encoders:
        note = " ".join(filter(None, [CPU_BASELINE_NOTE_MD, note]))
    ctx = AppContext(Path(index_dir), encoders, StoreIndex(store), note, stats)
    ctx.refresh()
    return ctx
