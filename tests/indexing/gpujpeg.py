"""Generators of JPEG files for the GPU data path tests (photo-like content, awkward headers)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from clipfp8.indexing.decode import DecodeTask
from clipfp8.indexing.scan import FileEntry

#: (size, save options, grey) of generated photos: odd sizes, up- and down-scaling, aspect
#: ratios either way, progressive, 4:4:4 and 4:2:0 chroma, greyscale.
VARIANTS: list[tuple[tuple[int, int], dict, bool]] = [
    ((64, 48), {}, False), ((300, 200), {}, False), ((37, 91), {}, False),
    ((640, 480), {"progressive": True}, False), ((500, 125), {}, False), ((50, 50), {"subsampling": 0}, False),
    ((63, 64), {}, False), ((200, 300), {"quality": 60}, False), ((120, 90), {}, True),
    ((33, 20), {}, False), ((257, 255), {"progressive": True, "subsampling": 0}, False), ((96, 128), {}, True),
]


def photo_bytes(size: tuple[int, int], seed: int, grey: bool = False, **save: object) -> bytes:
    """A smooth random picture plus noise (JPEG-like content), saved as JPEG."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    arr = np.asarray(base, dtype=np.int16) + rng.integers(-20, 21, (size[1], size[0], 3))
    im = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    (im.convert("L") if grey else im).save(buf, "JPEG", quality=int(save.pop("quality", 90)), **save)
    return buf.getvalue()


def write_photos(folder: Path, count: int, start: int = 0) -> list[Path]:
    """``count`` JPEGs cycling through ``VARIANTS``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + count):
        size, opts, grey = VARIANTS[i % len(VARIANTS)]
        p = folder / f"photo{i:03d}.jpg"
        p.write_bytes(photo_bytes(size, i, grey, **dict(opts)))
        out.append(p)
    return out


def exif_block(orientation: int, big_endian: bool) -> bytes:
    """An APP1 EXIF payload whose IFD0 holds one SHORT Orientation tag."""
    order = "big" if big_endian else "little"
    entry = ((0x0112).to_bytes(2, order) + (3).to_bytes(2, order) + (1).to_bytes(4, order)
             + orientation.to_bytes(2, order) + b"\x00\x00")
    head = (b"MM\x00\x2a" if big_endian else b"II\x2a\x00") + (8).to_bytes(4, order)
    return b"Exif\x00\x00" + head + (1).to_bytes(2, order) + entry + b"\x00" * 4


def with_save(size: tuple[int, int], **save: object) -> bytes:
    """A small photo saved with extra Pillow JPEG options (``exif=``, ``xmp=``...)."""
    im = Image.open(io.BytesIO(photo_bytes(size, 7)))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def bogus_huffman(data: bytes) -> bytes:
    """A JPEG whose first Huffman table is invalid but whose header still parses."""
    b = bytearray(data)
    dht = data.index(b"\xff\xc4")
    b[dht + 5:dht + 21] = b"\xff" * 16
    return bytes(b)


def tasks(paths: list[Path], root: Path) -> list[DecodeTask]:
    return [DecodeTask(FileEntry(os.fsencode(p.relative_to(root)), p.stat().st_size, 0), p) for p in paths]
