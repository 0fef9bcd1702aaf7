"""Gallery thumbnails: decoded on a thread pool, kept in a bounded cache shared by every session.

A served query's own search takes ~33 ms on the 2-core CPU (`clipfp8 bench`, ``app_search``),
but decoding its ten result thumbnails took ~35 ms more and Gradio's WebP encoding of them
another ~40 ms (a profile of `clipfp8 serve`). The same files come back often: the next page
shares none, but a refined query, the other precision side by side, or another user's query
shares most. Decoded thumbnails are therefore cached, keyed by the file's path, size, mtime and
inode (a changed file is decoded again), and new ones are decoded in parallel: Pillow releases
the GIL while it decodes and resizes.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from PIL import Image

log = logging.getLogger(__name__)

#: Longest side of a gallery thumbnail, in pixels.
THUMB_SIZE = 256
#: Decoded thumbnails kept (Pillow holds RGB in 4 bytes a pixel: at most 256 KiB each).
DEFAULT_CACHE_BYTES = 96 << 20


class _Key(NamedTuple):
    path: str
    size: int
    mtime_ns: int
    nbytes: int
    inode: int


class ThumbnailCache:
    """Decoded thumbnails by file, least recently used dropped first past ``max_bytes``.

    ``get(items)`` takes ``(absolute path, caption, hit id)`` triples (``ui_render.gallery_items``)
    and returns ``([(thumbnail, caption)], [hit id])`` in the same order, leaving out files that
    cannot be decoded (logged). Each thumbnail handed out is a copy: Gradio encodes images by
    setting attributes on them, and sessions encode at the same time. Thread-safe.
    """

    def __init__(self, size: int = THUMB_SIZE, max_bytes: int = DEFAULT_CACHE_BYTES, workers: int | None = None) -> None:
        if size < 1 or max_bytes < 0:
            raise ValueError(f"ThumbnailCache: size must be >= 1 and max_bytes >= 0, got {size}, {max_bytes}")
        self.size, self.max_bytes = size, max_bytes
        self._items: OrderedDict[_Key, Image.Image] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1),
                                        thread_name_prefix="thumbnails")
        self.hits = self.misses = 0

    def get(self, items: list[tuple[str, str, int]]) -> tuple[list[tuple[Image.Image, str]], list[int]]:
        """(absolute path, caption, hit id) triples -> ([(RGB thumbnail, caption)], [hit id]), in
        order, files that cannot be read or decoded left out of both; misses decoded in parallel."""
        keys = [self._key(path) for path, _, _ in items]
        with self._lock:
            found = {k: self._touch(k) for k in keys if k is not None and k in self._items}
        todo = list(dict.fromkeys(k for k in keys if k is not None and k not in found))  # once each
        decoded = list(self._pool.map(self._decode, todo)) if len(todo) > 1 else [self._decode(k) for k in todo]
        with self._lock:
            self.hits += sum(1 for k in keys if k in found)
            self.misses += len(todo)
            for k, img in zip(todo, decoded, strict=True):
                if img is not None:
                    self._store(k, img)
        found.update((k, img) for k, img in zip(todo, decoded, strict=True) if img is not None)
        out, ids = [], []
        for key, (_, text, hit_id) in zip(keys, items, strict=True):
            img = found.get(key) if key is not None else None
            if img is not None:
                out.append((img.copy(), text))
                ids.append(hit_id)
        return out, ids

    def __len__(self) -> int:
        return len(self._items)

    def _key(self, path: str) -> _Key | None:
        try:
            st = os.stat(path)
        except OSError as e:
            log.warning("cannot show %s: %s", path, e)
            return None
        return _Key(path, self.size, st.st_mtime_ns, st.st_size, st.st_ino)

    def _decode(self, key: _Key) -> Image.Image | None:
        try:
            with Image.open(key.path) as im:
                im.draft("RGB", (key.size, key.size))  # JPEG: decode at reduced scale, cheaper
                thumb = im.convert("RGB")
                thumb.thumbnail((key.size, key.size))
                return thumb
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            log.warning("cannot show %s: %s", key.path, e)
            return None

    def _touch(self, key: _Key) -> Image.Image:
        self._items.move_to_end(key)
        return self._items[key]

    def _store(self, key: _Key, img: Image.Image) -> None:
        if key in self._items:
            return
        cost = _bytes(img)
        if cost > self.max_bytes:
            return
        self._items[key] = img
        self._bytes += cost
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= _bytes(old)


def _bytes(img: Image.Image) -> int:
    """Memory a decoded thumbnail holds: Pillow stores RGB as 4 bytes a pixel."""
    return img.width * img.height * 4


__all__ = ["ThumbnailCache", "THUMB_SIZE", "DEFAULT_CACHE_BYTES"]
