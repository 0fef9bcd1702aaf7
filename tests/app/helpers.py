"""Shared helpers of the app tests: a tiny colour corpus and an in-memory index."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clipfp8.app.search import safe_resolve
from clipfp8.quant.core.encoder import Encoder

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 30), "blue": (20, 30, 220), "yellow": (240, 230, 20),
           "white": (250, 250, 250), "black": (5, 5, 5)}


@dataclass(frozen=True)
class FakeHit:
    id: int
    path: str
    score: float


def make_corpus(root: Path, per_colour: int = 3, captions: bool = True) -> Path:
    """root/<colour>/<colour>_<i>.png with slightly varied shades (+ captions.json)."""
    caps: dict[str, list[str]] = {}
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_colour):
            shade = tuple(int(np.clip(c + 9 * i - 9, 0, 255)) for c in rgb)
            arr = np.full((20, 20, 3), shade, dtype=np.uint8)
            arr[i * 3:i * 3 + 4, :5] = 128  # a small mark so images of one colour differ
            rel = f"{name}/{name}_{i}.png"
            Image.fromarray(arr).save(root / rel)
            caps[rel] = [f"a {name} square", f"{name} picture number {i}"]
    if captions:
        (root / "captions.json").write_text(json.dumps(caps))
    return root


class MemIndex:
    """An exact in-memory index: embeddings per encoder name, brute-force inner product."""

    def __init__(self, root: Path, encoders: Sequence[Encoder], extra_hits: Sequence[FakeHit] = ()) -> None:
        self.corpus_root = root.resolve()
        self.paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
        self.emb = {}
        for enc in encoders:
            ims = [Image.open(root / p) for p in self.paths]
            self.emb[enc.name] = enc.encode_pil(ims)
        self.extra_hits = list(extra_hits)

    def query(self, encoder: Encoder, query: Any, k: int, threshold: float | None) -> list[FakeHit]:
        q = encoder.encode_texts([query]) if isinstance(query, str) else encoder.encode_pil([query])
        scores = self.emb[encoder.name] @ q[0]
        order = np.argsort(-scores, kind="stable")[:k]
        hits = [FakeHit(int(i), self.paths[i], float(scores[i])) for i in order]
        hits = [h for h in hits if threshold is None or h.score >= threshold]
        return self.extra_hits + hits

    def resolve(self, rel_path: str) -> Path:
        return safe_resolve(self.corpus_root, rel_path)

    def path_of(self, hit_id: int) -> str | None:
        return self.paths[hit_id] if 0 <= hit_id < len(self.paths) else None

    def indexed_paths(self) -> list[str]:
        return list(self.paths)
