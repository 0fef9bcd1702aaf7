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


# ----- hostile files: each would cost unbounded memory, disk reads or a blocked open -----------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def thin_strip(path: Path, width: int, height: int) -> Path:
    """A valid RGB PNG of width x height (e.g. 1 x 300000): few pixels, extreme aspect ratio.
    Resizing its short side to a model's input size builds a huge intermediate."""
    Image.new("RGB", (width, height), (200, 60, 20)).save(path)
    return path


def zlib_bomb_png(path: Path, width: int, height: int) -> Path:
    """A real, valid greyscale PNG of width x height black pixels, compressed about 1000:1 and
    written row by row (never held in memory): it decodes to ``width * height`` bytes."""
    comp = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
        pending = bytearray()
        for _ in range(height):
            pending += comp.compress(row)
            if len(pending) > 1 << 20:
                f.write(_png_chunk(b"IDAT", bytes(pending)))
                pending.clear()
        pending += comp.flush()
        f.write(_png_chunk(b"IDAT", bytes(pending)) + _png_chunk(b"IEND", b""))
    return path


def sparse_file(path: Path, size: int) -> Path:
    """A file claiming ``size`` bytes (zeros) that takes no disk space (truncate)."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def fifo(path: Path) -> Path:
    """A named pipe: opening it for reading blocks until a writer appears."""
    os.mkfifo(path)
    return path


def hostile_corpus(root: Path, strip: int = 300_000, sparse_bytes: int = 3 << 30) -> dict[str, str]:
    """Thin strips both ways, a sparse multi-GB .jpg, a real decompression bomb, a FIFO and a
    symlink to a device, in ``root``. Returns name -> expected skip reason ("" = indexed)."""
    root.mkdir(parents=True, exist_ok=True)
    thin_strip(root / "strip_tall.png", 1, strip)
    thin_strip(root / "strip_wide.png", strip, 1)
    sparse_file(root / "sparse.jpg", sparse_bytes)
    zlib_bomb_png(root / "bomb.png", 20_000, 20_000)
    fifo(root / "pipe.png")
    os.symlink("/dev/zero", root / "device.jpg")
    return {"strip_tall.png": "", "strip_wide.png": "", "sparse.jpg": "file_too_large",
            "bomb.png": "oversized", "pipe.png": "not_regular_file", "device.jpg": "not_regular_file"}
