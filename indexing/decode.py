"""Stage 2, decode: read, hash, decode and preprocess image files in parallel worker threads.

Each file is read once; its bytes are hashed (sha256, the content identity used for change and
move detection) and decoded from memory. Worker threads suffice: Pillow's decoders and torch's
transforms release the GIL for the heavy parts, and encoders need not be picklable.

A GPU JPEG decoder could slot in later as another ``Decoder`` (``__call__(DecodeTask) ->
Decoded``) handing back device tensors; the pipeline only depends on that protocol.
"""
from __future__ import annotations

import errno
import hashlib
import io
import logging
import threading
import time
import warnings
from collections import deque
from itertools import islice
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from clipfp8.indexing.errors import DecodeError
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
_WARN_LOCK = threading.Lock()


@dataclass(frozen=True)
class DecodeTask:
    """One file to process. Decoding is skipped when its hash is in ``skip_hashes`` (a move or
    an unchanged file: only the hash is needed)."""

    entry: FileEntry
    path: Path
    skip_hashes: frozenset[str] = frozenset()


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


class Decoder(Protocol):
    def __call__(self, task: DecodeTask) -> Decoded: ...


def read_file(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except PermissionError as e:
        raise DecodeError("permission_denied", str(e)) from e
    except OSError as e:
        reason = "symlink_loop" if e.errno == errno.ELOOP else "unreadable"
        raise DecodeError(reason, str(e)) from e


def open_image(data: bytes, max_pixels: int, draft: tuple[int, int] | None = None) -> Image.Image:
    """Bytes -> an RGB PIL image: first frame, EXIF orientation applied, alpha flattened on white.

    ``draft`` (JPEG only): decode at the smallest DCT scale (1/2, 1/4, 1/8) whose size is still
    at least ``draft`` -- much faster for large photos, slightly different pixels. The image's
    ``info["source_size"]`` is always the full, oriented (width, height).
    Raises ``DecodeError`` with reason ``empty_file``, ``not_an_image``, ``oversized`` or
    ``corrupt``.
    """
    if not data:
        raise DecodeError("empty_file")
    try:
        # Pillow warns between MAX_IMAGE_PIXELS and twice that; our own limit below decides.
        # catch_warnings mutates global state, hence the lock (Image.open only parses headers).
        with _WARN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        w, h = im.size
        if w * h > max_pixels:
            raise DecodeError("oversized", f"{w}x{h} > {max_pixels} pixels")
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
        im = ImageOps.exif_transpose(im)
    except Exception as e:  # malformed EXIF must not lose an otherwise good image
        log.debug("ignoring bad EXIF: %s", e)
    rgb = to_rgb(im)
    rgb.info["source_size"] = (h, w) if im.size != before else (w, h)  # rotated by 90 degrees
    return rgb


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
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if im.mode == "F":
            top = max(float(arr.max(initial=0)), 1e-12)
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


class ImageDecoder:
    """The CPU ``Decoder``: read + sha256 + Pillow decode + each encoder's ``preprocess``."""

    def __init__(self, preprocess: dict[str, Preprocess], max_pixels: int,
                 draft: tuple[int, int] | None = None) -> None:
        self.preprocess, self.max_pixels, self.draft = preprocess, max_pixels, draft

    def __call__(self, task: DecodeTask) -> Decoded:
        t0 = time.perf_counter()
        out = Decoded(task.entry)
        mark = [t0]

        def lap(part: str) -> None:
            now = time.perf_counter()
            out.parts[part] = now - mark[0]
            mark[0] = now

        try:
            data = read_file(task.path)
            lap("read")
            out.sha256 = hashlib.sha256(data).hexdigest()
            lap("hash")
            if out.sha256 not in task.skip_hashes:
                im = open_image(data, self.max_pixels, self.draft)
                out.width, out.height = im.info["source_size"]
                lap("decode")
                out.tensors = {name: fn(im) for name, fn in self.preprocess.items()}
                lap("preprocess")
        except DecodeError as e:
            out.error = str(e)
        except Exception as e:  # one broken file must never stop the run
            log.warning("unexpected error decoding %s: %r", task.path, e)
            out.error = f"decode_failed: {type(e).__name__}: {e}"
        out.seconds = time.perf_counter() - t0
        return out


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


__all__ = ["DecodeTask", "Decoded", "Decoder", "ImageDecoder", "open_image", "to_rgb",
           "imap_bounded", "read_file", "error_reason"]
