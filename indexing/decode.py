"""Stage 2, decode: read, hash, decode and preprocess image files in parallel worker threads.

Each file is read once, in chunks that are hashed as they arrive (sha256, the content identity
used for change and move detection), and decoded from memory. Worker threads suffice: Pillow's
decoders and torch's transforms release the GIL for the heavy parts, and encoders need not be
picklable.

Hostile files cost bounded memory: special files (FIFOs, devices, sockets) are refused from
``stat`` without being opened; a file larger than ``max_file_bytes`` is refused from its size and
never more than ``max_file_bytes + 1`` bytes are read (a lying size cannot blow up); decoding is
refused above ``max_pixels`` from the header; and an extreme aspect ratio is centre-cropped to
``max_aspect`` before any resize (a 1 x 100000 strip resized to a 224-pixel short side would
otherwise build a 224 x 22,400,000 intermediate).

A GPU JPEG decoder could slot in later as another ``Decoder`` (``__call__(DecodeTask) ->
Decoded``) handing back device tensors; the pipeline only depends on that protocol.
"""
from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from clipfp8.indexing.config import DEFAULT_MAX_ASPECT, DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS
from clipfp8.indexing.errors import DecodeError
from clipfp8.indexing.fileread import check_file, read_and_hash
from clipfp8.indexing.scan import FileEntry

log = logging.getLogger(__name__)

for _plugin in ("pillow_heif", "pillow_avif"):  # optional HEIC/AVIF openers
    try:
        _mod = __import__(_plugin)
        if hasattr(_mod, "register_heif_opener"):
            _mod.register_heif_opener()
    except ImportError:
        pass

Preprocess = Callable[[Image.Image], torch.Tensor]


# ----- the pixel limit, per call -------------------------------------------------------------
# Pillow checks every image size it opens (and some frame/tile sizes while loading) against the
# process-wide ``Image.MAX_IMAGE_PIXELS``, refusing above twice that (178,956,970 pixels by
# default), so ``--max-pixels`` could not be raised past it, and changing the global would
# loosen the guard for everything else in the process (e.g. the app's uploads). Instead Pillow's
# check is wrapped: inside ``pixel_limit(n)`` the calling thread's limit is exactly ``n``
# (refused above it, no warnings), everywhere else Pillow's own check runs unchanged.
_LIMIT = threading.local()
_pillow_bomb_check = getattr(Image._decompression_bomb_check, "__wrapped__",
                             Image._decompression_bomb_check)


def _bomb_check(size: tuple[int, int]) -> None:
    limit = getattr(_LIMIT, "max_pixels", None)
    if limit is None:
        _pillow_bomb_check(size)
    elif size[0] * size[1] > limit:
        raise Image.DecompressionBombError(_oversized(size[0], size[1], limit))


_bomb_check.__wrapped__ = _pillow_bomb_check  # type: ignore[attr-defined]  # functools' convention, read by inspect.unwrap
Image._decompression_bomb_check = _bomb_check  # PIL.Image and its plugins look it up at call time


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Within this block (this thread only), Pillow refuses images above ``max_pixels`` pixels
    and no others: neither its default limit nor its warnings apply."""
    old = getattr(_LIMIT, "max_pixels", None)
    _LIMIT.max_pixels = max_pixels
    try:
        yield
    finally:
        _LIMIT.max_pixels = old


def _oversized(w: int, h: int, limit: int) -> str:
    return f"{w}x{h} = {w * h:,} pixels > the limit of {limit:,} (--max-pixels)"


@dataclass(frozen=True)
class DecodeTask:
    """One file to process. Decoding is skipped when its hash is in ``skip_hashes`` (a move or
    an unchanged file: only the hash is needed). ``needs``: the encoder names the file will be
    embedded with (None: all); a decoder that also embeds (``ray_engine``) runs only those."""

    entry: FileEntry
    path: Path
    skip_hashes: frozenset[str] = frozenset()
    needs: frozenset[str] | None = None


@dataclass
class Decoded:
    """A worker's answer: ``tensors`` maps encoder name -> float32 (3, H, W), or ``error`` is set.
    ``seconds``: the worker's total time; ``parts``: seconds per sub-step (read, hash, decode,
    preprocess) for the per-stage report."""

    entry: FileEntry
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    #: Device work still owed for this file (a deferring ``GpuDecoder.imap``): call it before
    #: reading ``tensors``; it decodes the file's whole batch once, and may set ``error``
    #: instead (a file the device and then Pillow refused). None when nothing is owed.
    pending: Callable[[], None] | None = None


def settle(decoded: Iterable[Decoded]) -> None:
    """Run the device work still owed for ``decoded`` (each batch once; see ``Decoded.pending``)."""
    for d in decoded:
        if d.pending is not None:
            d.pending()


class Decoder(Protocol):
    def __call__(self, task: DecodeTask) -> Decoded: ...


# ----- reading: clipfp8.indexing.fileread (no torch there: reader processes import it) -----


def read_file(path: Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The bytes of ``path`` (at most ``max_bytes``); see ``read_and_hash``."""
    return read_and_hash(path, max_bytes)[0]


# ----- decoding --------------------------------------------------------------------------------
def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               draft: tuple[int, int] | None = None) -> Image.Image:
    """Bytes -> an RGB PIL image: first frame, EXIF orientation applied, alpha flattened on white.

    ``max_pixels`` is the limit, exactly: larger images are refused from their header, before
    any pixel is decoded, and Pillow's own default limit does not apply.
    ``draft`` (JPEG only): decode at the smallest DCT scale (1/2, 1/4, 1/8) whose size is still
    at least ``draft`` -- much faster for large photos, slightly different pixels. The image's
    ``info["source_size"]`` is always the full, oriented (width, height).
    Raises ``DecodeError`` with reason ``empty_file``, ``not_an_image``, ``oversized`` or
    ``corrupt``.
    """
    if not data:
        raise DecodeError("empty_file")
    try:
        with pixel_limit(max_pixels):
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise DecodeError("oversized", _oversized(w, h, max_pixels))
            if getattr(im, "is_animated", False):
                im.seek(0)
            if draft is not None and im.format == "JPEG":
                im.draft("RGB", draft)
            im.load()
    except Image.DecompressionBombError as e:
        raise DecodeError("oversized", str(e)) from e
    except UnidentifiedImageError as e:
        raise DecodeError("not_an_image", "not a recognised image format") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError("corrupt", str(e)) from e
    before = im.size
    try:
        ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of every unrotated image
    except Exception as e:  # malformed EXIF must not lose an otherwise good image
        log.debug("ignoring bad EXIF: %s", e)
    rgb = to_rgb(im)
    rgb.info["source_size"] = (h, w) if im.size != before else (w, h)  # rotated by 90 degrees
    return rgb


def limit_aspect(im: Image.Image, max_aspect: float = DEFAULT_MAX_ASPECT) -> Image.Image:
    """``im`` centre-cropped along its long side to at most ``max_aspect`` times its short side
    (``im`` itself when already within). A model's Resize + CenterCrop sees only the central
    square, so the crop changes nothing it would see, while bounding the resized intermediate
    to (short side)^2 x ``max_aspect`` pixels."""
    w, h = im.size
    short, long_side = min(w, h), max(w, h)
    keep = max(1, int(short * max_aspect))
    if long_side <= keep:
        return im
    off = (long_side - keep) // 2
    box = (off, 0, off + keep, h) if w > h else (0, off, w, off + keep)
    out = im.crop(box)
    out.info.update(im.info)
    return out


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB. Transparency is composited onto white; 16-bit and float
    greyscale are rescaled to 8 bits (not clipped); CMYK/YCbCr/LAB/1/L use Pillow's converters."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im).astype(np.float32)  # 4 bytes a pixel: exact for 16-bit values
        top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if im.mode == "F":
            top = max(float(arr.max(initial=0)), 1e-12)
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


class ByteBudget:
    """Bounds the file bytes held by all decode workers together: ``hold(n)`` waits until
    ``n`` more fit under ``limit``, except that a lone holder may always proceed (one file larger
    than the budget still decodes, just not alongside others). Without it, N workers could each
    hold a ``max_file_bytes`` file at once."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


class ImageDecoder:
    """The CPU ``Decoder``: capped read + sha256 + Pillow decode + aspect crop + each encoder's
    ``preprocess``. Working memory per image: at most ``max_file_bytes`` of file (all workers
    together: ``ByteBudget(max_file_bytes)``), ``max_pixels`` decoded pixels, and a resize
    intermediate bounded by ``max_aspect``."""

    def __init__(self, preprocess: dict[str, Preprocess], max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft: tuple[int, int] | None = None, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                 max_aspect: float = DEFAULT_MAX_ASPECT) -> None:
        self.preprocess, self.max_pixels, self.draft = preprocess, max_pixels, draft
        self.max_file_bytes, self.max_aspect = max_file_bytes, max_aspect
        self.budget = ByteBudget(max_file_bytes)

    def __call__(self, task: DecodeTask) -> Decoded:
        t0 = time.perf_counter()
        out = Decoded(task.entry)
        try:
            size = check_file(task.path, self.max_file_bytes).st_size
            with self.budget.hold(size):
                self._decode(task, out)
        except DecodeError as e:
            out.error = str(e)
        except Exception as e:  # one broken file must never stop the run
            log.warning("unexpected error decoding %s: %r", task.path, e)
            out.error = f"decode_failed: {type(e).__name__}: {e}"
        out.seconds = time.perf_counter() - t0
        return out

    def _decode(self, task: DecodeTask, out: Decoded) -> None:
        mark = [time.perf_counter()]

        def lap(part: str) -> None:
            now = time.perf_counter()
            out.parts[part] = now - mark[0]
            mark[0] = now

        data, out.sha256 = read_and_hash(task.path, self.max_file_bytes)
        lap("read")
        if out.sha256 in task.skip_hashes:
            return
        im = open_image(data, self.max_pixels, self.draft)
        del data  # the file's bytes are not needed once decoded
        out.width, out.height = im.info["source_size"]
        im = limit_aspect(im, self.max_aspect)
        lap("decode")
        out.tensors = {name: fn(im) for name, fn in self.preprocess.items()}
        lap("preprocess")


T = TypeVar("T")
R = TypeVar("R")


def imap_bounded(fn: Callable[[T], R], items: Iterable[T], workers: int, lookahead: int) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, in order, with at most ``lookahead`` results
    in flight (bounded memory however long ``items`` is)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    it = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as ex:
        pending: deque = deque(ex.submit(fn, x) for x in islice(it, max(lookahead, 1)))
        try:
            while pending:
                result = pending.popleft().result()
                for x in it:
                    pending.append(ex.submit(fn, x))
                    break
                yield result
        finally:
            for fut in pending:
                fut.cancel()


def error_reason(error: str) -> str:
    """The short tag of an error string (``"corrupt: ..."`` -> ``"corrupt"``)."""
    return error.split(":", 1)[0]


__all__ = ["DecodeTask", "Decoded", "Decoder", "ImageDecoder", "ByteBudget", "open_image", "to_rgb",
           "limit_aspect", "pixel_limit", "imap_bounded", "settle", "read_file", "read_and_hash", "check_file",
           "error_reason", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_FILE_BYTES", "DEFAULT_MAX_ASPECT"]
