"""Generators of awkward image files for the bad-file tests (each returns the file's path)."""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_with_dims(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (a decompression bomb) with a tiny body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
                     chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


def jpeg_bytes(size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def cmyk_jpeg(path: Path) -> Path:
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(path, "JPEG", quality=95)  # pure red
    return path


def png16(path: Path) -> Path:
    arr = np.full((20, 30), 65535, dtype=np.uint16)
    arr[:, :15] = 32896  # 128.5 * 256: mid grey
    Image.fromarray(arr).save(path)  # uint16 -> mode I;16
    return path


def palette_transparent(path: Path) -> Path:
    im = Image.new("P", (30, 20), 1)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black (transparent), 1 blue
    im.paste(0, (0, 0, 15, 20))
    im.save(path, transparency=0)
    return path


def animated_gif(path: Path) -> Path:
    frames = [Image.new("RGB", (30, 20), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return path


def exif_rotated(path: Path) -> Path:
    """A 40x20 JPEG whose EXIF orientation (6) says 'rotate 90 degrees': decoded it is 20x40."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (0, 200, 0)).save(path, "JPEG", exif=exif)
    return path


def la_grey(path: Path) -> Path:
    Image.new("LA", (16, 16), (0, 0)).save(path)  # fully transparent -> white
    return path


def non_utf8_name(folder: Path) -> Path:
    raw = os.path.join(os.fsencode(str(folder)), b"caf\xe9-\xff.png")
    buf = io.BytesIO()
    Image.new("RGB", (10, 10), (255, 255, 0)).save(buf, "PNG")
    with open(raw, "wb") as f:
        f.write(buf.getvalue())
    return Path(os.fsdecode(raw))
