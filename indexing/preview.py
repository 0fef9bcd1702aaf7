"""``clipfp8 search --preview``: see the hits, not just their paths.

A contact sheet (one PNG: a thumbnail per hit with its rank, score and file name) is built with
Pillow; terminals that display images get it inline -- kitty's graphics protocol (kitty,
WezTerm, Ghostty) or iTerm2's inline images (iTerm2, WezTerm) -- detected from ``TERM``,
``TERM_PROGRAM`` and friends. Elsewhere (and inside tmux/screen, which swallow the escape
sequences) it is written to a file whose path is printed.
"""
from __future__ import annotations

import base64
import io
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

from PIL import Image, ImageDraw, ImageFont, ImageOps

log = logging.getLogger(__name__)

#: Default contact-sheet file when the terminal cannot show images and no path was given.
DEFAULT_PREVIEW_NAME = "clipfp8-preview.png"
KITTY_CHUNK = 4096  # the kitty protocol's maximum payload per escape sequence
BACKGROUND, CAPTION, MISSING = (250, 250, 250), (20, 20, 20), (200, 200, 200)


@dataclass(frozen=True)
class PreviewItem:
    """One hit to draw: the image file, its 1-based rank, its score and the name shown."""

    path: Path
    rank: int
    score: float
    name: str


@dataclass(frozen=True)
class SheetLayout:
    """Tile geometry in pixels: ``tile`` x ``tile`` thumbnails, ``caption`` px of text under each,
    ``pad`` around them, ``columns`` per row."""

    tile: int = 160
    caption: int = 30
    pad: int = 8
    columns: int = 5

    def __post_init__(self) -> None:
        if self.tile < 16 or self.columns < 1 or self.pad < 0 or self.caption < 0:
            raise ValueError(f"SheetLayout: need tile >= 16, columns >= 1, pad/caption >= 0, got {self}")

    def size(self, n: int) -> tuple[int, int]:
        """(width, height) of a sheet of ``n`` >= 1 tiles."""
        cols = min(n, self.columns)
        rows = -(-n // self.columns)
        return cols * (self.tile + self.pad) + self.pad, rows * (self.tile + self.caption + self.pad) + self.pad

    def box(self, i: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of tile ``i``'s thumbnail area (0-based, row-major)."""
        row, col = divmod(i, self.columns)
        left = self.pad + col * (self.tile + self.pad)
        top = self.pad + row * (self.tile + self.caption + self.pad)
        return left, top, left + self.tile, top + self.tile


def _thumbnail(path: Path, side: int) -> Image.Image | None:
    try:
        with Image.open(path) as src:
            src.seek(0)
            src.draft("RGB", (side, side))  # JPEG: decode at reduced scale, much faster
            thumb = ImageOps.exif_transpose(src).convert("RGB")
            thumb.thumbnail((side, side))
            return thumb
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        log.warning("preview: cannot read %s (%s)", path, e)
        return None


Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def _fit(text: str, draw: ImageDraw.ImageDraw, font: Font, width: int, keep_end: bool = False) -> str:
    """``text`` shortened with "..." to ``width`` pixels; ``keep_end`` keeps its tail (file names)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("..." + text if keep_end else text + "...", font=font) > width:
        text = text[1:] if keep_end else text[:-1]
    return "..." + text if keep_end else text + "..."


def contact_sheet(items: Sequence[PreviewItem], layout: SheetLayout | None = None) -> Image.Image:
    """An RGB image of ``items`` in rank order: thumbnail (aspect kept, centred in its tile; a
    grey tile for a file that cannot be read) above ``#rank score`` and the file name."""
    if not items:
        raise ValueError("contact_sheet: no hits to draw")
    lay = layout or SheetLayout()
    sheet = Image.new("RGB", lay.size(len(items)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, item in enumerate(items):
        left, top, right, bottom = lay.box(i)
        thumb = _thumbnail(item.path, lay.tile)
        if thumb is None:
            draw.rectangle((left, top, right - 1, bottom - 1), fill=MISSING)
        else:
            sheet.paste(thumb, (left + (lay.tile - thumb.width) // 2, top + (lay.tile - thumb.height) // 2))
        if lay.caption:
            draw.text((left, bottom + 2), _fit(f"#{item.rank}  {item.score:.4f}", draw, font, lay.tile),
                      fill=CAPTION, font=font)
            draw.text((left, bottom + 2 + lay.caption // 2), _fit(item.name, draw, font, lay.tile, keep_end=True),
                      fill=CAPTION, font=font)
    return sheet


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def terminal_protocol(env: Mapping[str, str] | None = None) -> str | None:
    """``"kitty"``, ``"iterm2"`` or None (no inline images) for the terminal described by ``env``
    (default ``os.environ``). Inside tmux/screen: None (they do not pass the sequences on)."""
    env = os.environ if env is None else env
    term, program = env.get("TERM", ""), env.get("TERM_PROGRAM", "")
    if env.get("TMUX") or term.startswith(("screen", "tmux")):
        return None
    if term == "xterm-kitty" or env.get("KITTY_WINDOW_ID") or program in ("ghostty", "WezTerm"):
        return "kitty"
    if program == "iTerm.app" or env.get("LC_TERMINAL") == "iTerm2":
        return "iterm2"
    return None


def kitty_escape(png: bytes) -> str:
    """kitty graphics protocol: transmit-and-display a PNG (``a=T,f=100``), base64 in chunks of
    at most 4096 bytes, ``m=1`` on every chunk but the last."""
    data = base64.standard_b64encode(png).decode("ascii")
    chunks = [data[i:i + KITTY_CHUNK] for i in range(0, len(data), KITTY_CHUNK)] or [""]
    out = []
    for i, chunk in enumerate(chunks):
        more = 1 if i < len(chunks) - 1 else 0
        keys = f"a=T,f=100,m={more}" if i == 0 else f"m={more}"
        out.append(f"\x1b_G{keys};{chunk}\x1b\\")
    return "".join(out)


def iterm2_escape(png: bytes, name: str = DEFAULT_PREVIEW_NAME) -> str:
    """iTerm2 inline image (OSC 1337 ``File=``), displayed at its own size."""
    b64name = base64.standard_b64encode(name.encode()).decode("ascii")
    data = base64.standard_b64encode(png).decode("ascii")
    return f"\x1b]1337;File=name={b64name};size={len(png)};inline=1;preserveAspectRatio=1:{data}\x07"


def inline_escape(png: bytes, protocol: str) -> str:
    if protocol == "kitty":
        return kitty_escape(png)
    if protocol == "iterm2":
        return iterm2_escape(png)
    raise ValueError(f"unknown terminal image protocol {protocol!r}")


def default_preview_path() -> Path:
    """Where the sheet goes when neither a path nor an image-capable terminal is given."""
    return Path(tempfile.gettempdir()) / DEFAULT_PREVIEW_NAME


class HitLike(Protocol):
    """What a preview needs of a search hit (``indexing.query.Hit``)."""

    @property
    def path(self) -> str: ...

    @property
    def score(self) -> float: ...


def preview_items(hits: Sequence[HitLike], resolve: Callable[[str], Path]) -> list[PreviewItem]:
    """``PreviewItem`` of search hits in rank order; ``resolve`` maps a hit's corpus-relative
    path to its file (``IndexStore.resolve``)."""
    return [PreviewItem(resolve(h.path), rank, h.score, h.path) for rank, h in enumerate(hits, 1)]


def show_preview(items: Sequence[PreviewItem], target: Path | None, stream: TextIO | None = None,
                 env: Mapping[str, str] | None = None, layout: SheetLayout | None = None) -> Path | None:
    """Draw ``items`` as a contact sheet. With no ``target`` and a ``stream`` that is a terminal
    able to show images (``terminal_protocol``), write it there inline and return None; else
    write the PNG to ``target`` (default ``default_preview_path()``) and return that path."""
    from clipfp8.quant.core.fileio import atomic_write_bytes

    png = png_bytes(contact_sheet(items, layout))
    protocol = terminal_protocol(env) if target is None and stream is not None and stream.isatty() else None
    if protocol is not None and stream is not None:
        stream.write(inline_escape(png, protocol) + "\n")
        stream.flush()
        return None
    path = Path(target) if target is not None else default_preview_path()
    atomic_write_bytes(path, png)
    return path


__all__ = ["PreviewItem", "SheetLayout", "contact_sheet", "png_bytes", "terminal_protocol", "kitty_escape",
           "iterm2_escape", "inline_escape", "default_preview_path", "preview_items", "show_preview",
           "DEFAULT_PREVIEW_NAME"]
