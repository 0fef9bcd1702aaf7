"""A JPEG header reader for the GPU data path: which files nvJPEG may decode, read from the bytes
alone (markers up to the first scan), before any pixel is decoded.

``gpu_refusal(data, max_pixels)`` answers None for a plain 8-bit baseline/progressive JPEG with
one or three YCbCr/grey components, no EXIF/XMP rotation, a complete stream (ends with EOI) and
at most ``max_pixels`` pixels; otherwise a short reason, and the file goes to the CPU path
(Pillow), which then applies its own rules (``oversized``, ``corrupt``, CMYK conversion, EXIF
orientation...). Refusing too much only costs speed; accepting too much could change results,
so anything unusual is refused.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

# Start-of-frame markers (all coding processes) and the ones nvJPEG decodes: baseline, extended
# sequential and progressive, Huffman-coded. Lossless, hierarchical and arithmetic go to Pillow.
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_GPU_SOF = frozenset({0xC0, 0xC1, 0xC2})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RSTn: markers without a length
_XMP_ID = b"http://ns.adobe.com/xap/1.0/\x00"
# Pillow's own pattern (Image.getexif): XMP orientation counts when EXIF has none.
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')
_ROTATING = frozenset(range(2, 9))  # EXIF orientations Pillow's exif_transpose acts on
_ORIENTATION_TAG = 0x0112
# Real headers have a few dozen segments; a hostile one could hold millions (or megabytes of
# fill bytes) to make this walk slow: past this many steps the file goes to Pillow untouched.
_MAX_STEPS = 2048


@dataclass(frozen=True)
class JpegHeader:
    """What the markers before the first scan say. ``orientation``: the EXIF/XMP orientation
    Pillow would apply (1 when absent), None when it cannot be told for sure.
    ``adobe_transform``: the APP14 "Adobe" colour transform byte, None without that segment."""

    width: int
    height: int
    components: int
    precision: int
    sof: int
    component_ids: tuple[int, ...]
    orientation: int | None
    adobe_transform: int | None
    multi_picture: bool


def parse_jpeg_header(data: bytes) -> JpegHeader | None:
    """Walk the JPEG markers up to SOS; None when ``data`` is not a JPEG or its header is
    malformed (the CPU path then reports what is wrong with it)."""
    if data[:2] != b"\xff\xd8":
        return None
    view, n, i, steps = memoryview(data), len(data), 2, 0
    frame: tuple[int, int, int, int, int, tuple[int, ...]] | None = None
    exif: list[bytes] = []
    xmp: bytes | None = None
    adobe: int | None = None
    mpf = False
    while i + 4 <= n:
        steps += 1
        if data[i] != 0xFF or steps > _MAX_STEPS:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        length = int.from_bytes(view[i + 2:i + 4], "big")
        if marker in (0xD8, 0xD9) or length < 2 or i + 2 + length > n:
            return None
        seg = view[i + 4:i + 2 + length]
        if marker == 0xDA:  # start of scan: the header is over
            break
        if marker in _SOF:
            if frame is not None or len(seg) < 6:
                return None
            comps = seg[5]
            if len(seg) < 6 + 3 * comps:
                return None
            ids = tuple(seg[6 + 3 * k] for k in range(comps))
            frame = (marker, seg[0], int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big"), comps, ids)
        elif marker == 0xE1 and seg[:6] == b"Exif\x00\x00":
            exif.append(bytes(seg[6:]))
        elif marker == 0xE1 and seg[:len(_XMP_ID)] == _XMP_ID:
            xmp = bytes(seg[len(_XMP_ID):])  # Pillow keeps the last one
        elif marker == 0xEE and seg[:5] == b"Adobe" and len(seg) >= 12:
            adobe = seg[11]
        elif marker == 0xE2 and seg[:4] == b"MPF\x00":
            mpf = True
        i += 2 + length
    else:
        return None  # no scan at all
    if frame is None:
        return None
    sof, precision, height, width, comps, ids = frame
    return JpegHeader(width, height, comps, precision, sof, ids, _orientation(exif, xmp), adobe, mpf)


def _orientation(exif: list[bytes], xmp: bytes | None) -> int | None:
    """The orientation Pillow's ``exif_transpose`` reads: EXIF IFD0 tag 0x0112, else XMP."""
    if len(exif) > 1:  # Pillow concatenates several EXIF segments: too odd to predict
        return None
    if exif:
        value = _exif_orientation(exif[0])
        if value != 1:
            return value  # a rotation, or None (unreadable)
        if _has_orientation_tag(exif[0]):
            return 1
    if xmp is not None:
        m = _XMP_ORIENTATION.search(xmp)
        if m is not None:
            return int(m[2])
    return 1


def _ifd0(tiff: bytes) -> tuple[Literal["little", "big"], int, int] | None:
    """(byte order, offset of IFD0's first entry, entry count) of a TIFF/EXIF block."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    order: Literal["little", "big"] = "little" if tiff[:2] == b"II" else "big"
    if int.from_bytes(tiff[2:4], order) != 42:
        return None
    off = int.from_bytes(tiff[4:8], order)
    if off < 8 or off + 2 > len(tiff):
        return None
    count = int.from_bytes(tiff[off:off + 2], order)
    if off + 2 + 12 * count > len(tiff):
        return None
    return order, off + 2, count


def _exif_orientation(tiff: bytes) -> int | None:
    """IFD0's orientation: its value (SHORT), 1 when absent, None when unreadable."""
    ifd = _ifd0(tiff)
    if ifd is None:
        return None
    order, start, count = ifd
    for k in range(count):
        e = start + 12 * k
        if int.from_bytes(tiff[e:e + 2], order) != _ORIENTATION_TAG:
            continue
        if int.from_bytes(tiff[e + 2:e + 4], order) != 3 or int.from_bytes(tiff[e + 4:e + 8], order) != 1:
            return None  # not one SHORT: leave the interpretation to Pillow
        return int.from_bytes(tiff[e + 8:e + 10], order)
    return 1


def _has_orientation_tag(tiff: bytes) -> bool:
    ifd = _ifd0(tiff)
    if ifd is None:
        return False
    order, start, count = ifd
    return any(int.from_bytes(tiff[start + 12 * k:start + 12 * k + 2], order) == _ORIENTATION_TAG
               for k in range(count))


def _ends_with_eoi(data: bytes) -> bool:
    """True when the stream ends with the EOI marker (trailing zero padding allowed): a file cut
    short must reach Pillow, which reports it as ``corrupt``, not nvJPEG, which may not."""
    end = len(data)
    while end > 0 and data[end - 1] == 0 and len(data) - end < 4096:
        end -= 1
    return data[end - 2:end] == b"\xff\xd9"


def gpu_refusal(data: bytes, max_pixels: int,
                max_aspect: float | None = None) -> tuple[str | None, JpegHeader | None]:
    """(None, header) when nvJPEG may decode ``data`` into exactly what Pillow would give;
    otherwise (reason, header or None). ``max_pixels``: the bomb guard, checked here on the
    header so an oversized image is never decoded on the GPU. ``max_aspect``: images the CPU
    path would centre-crop first (``decode.limit_aspect``) are refused too."""
    head = parse_jpeg_header(data)
    if head is None:
        return ("not_jpeg" if data[:2] != b"\xff\xd8" else "bad_header"), None
    if head.width < 1 or head.height < 1:
        return "bad_header", head
    if head.width * head.height > max_pixels:
        return "oversized", head
    short, long_side = sorted((head.width, head.height))
    if max_aspect is not None and long_side > max(1, int(short * max_aspect)):
        return "aspect", head
    if head.sof not in _GPU_SOF or head.precision != 8:
        return "coding", head
    if head.components not in (1, 3) or head.component_ids == (82, 71, 66) or (
            head.components == 3 and head.adobe_transform == 0):
        return "colour", head  # CMYK/YCCK or RGB-coded: Pillow's conversions decide
    if head.orientation is None or head.orientation in _ROTATING:
        return "orientation", head
    if head.multi_picture:
        return "multi_picture", head
    if not _ends_with_eoi(data):
        return "no_eoi", head
    return None, head


__all__ = ["JpegHeader", "parse_jpeg_header", "gpu_refusal"]
