"""Build the bundled sample corpus ``data/samples`` from the Open Clip Art training shards.

Open Clip Art drawings are public domain (Debian package ``openclipart-png``), the only shared
images the project may ship. The selection is deterministic (hash-ordered, spread evenly over a
fixed list of categories) so re-running the builder reproduces the same corpus byte for byte.

Run once by a maintainer: ``python -m clipfp8.app.samples ../shared/data/train/openclipart data/samples``.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from clipfp8.quant.core.fileio import atomic_write_text

log = logging.getLogger(__name__)

#: Top-level openclipart categories with recognisable, varied subjects (no icons, flags, stars).
CATEGORIES: tuple[str, ...] = (
    "animals", "food", "transportation", "plants", "buildings", "tools", "office", "people",
    "geography", "education", "electronics", "recreation", "science",
)
LICENSE_TEXT = """# Licence of the bundled sample images

The drawings in this folder come from the Open Clip Art Library, as packaged by Debian
(`openclipart-png`, version 1:0.18+dfsg-19). Open Clip Art Library artwork is dedicated to the
**public domain**; no rights are reserved. They were flattened onto white, resized (longest side
128 px) and re-encoded as JPEG (quality 85) by `python -m clipfp8.app.samples`.

`captions.json` maps each file (relative to this folder) to a one-element list holding the
drawing's title, derived from its original file name.
"""


@dataclass(frozen=True)
class SampleConfig:
    """How many drawings to pick and how to encode them."""

    per_category: int = 16
    longest_side: int = 128
    jpeg_quality: int = 85
    seed: str = "clipfp8-samples-v1"

    def __post_init__(self) -> None:
        if self.per_category < 1:
            raise ValueError(f"SampleConfig.per_category must be >= 1, got {self.per_category}")
        if not 16 <= self.longest_side <= 1024:
            raise ValueError(f"SampleConfig.longest_side must be in [16, 1024], got {self.longest_side}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"SampleConfig.jpeg_quality must be in [1, 95], got {self.jpeg_quality}")


def clean_title(title: str) -> str | None:
    """A caption from an openclipart title, or None when it is only a name/number/too short."""
    text = re.sub(r"[_\-]+", " ", title)
    text = re.sub(r"\d+", " ", text)
    text = re.sub(r"\s+", " ", text).strip().lower()
    letters = sum(ch.isalpha() for ch in text)
    return text if letters >= 4 else None


def _candidates(shard_dir: Path) -> dict[str, list[tuple[str, str, bytes]]]:
    """category -> [(hash key, caption, jpeg bytes)] over every shard in ``shard_dir``."""
    out: dict[str, list[tuple[str, str, bytes]]] = {c: [] for c in CATEGORIES}
    shards = sorted(shard_dir.glob("*.tar.gz"))
    if not shards:
        raise FileNotFoundError(f"no *.tar.gz shards in {shard_dir}")
    for shard in shards:
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, m in members.items():
                if not name.endswith(".json"):
                    continue
                meta_file = tar.extractfile(m)
                if meta_file is None:  # a directory or link member named *.json
                    continue
                meta = json.load(meta_file)
                cat, caption = meta["categories"][0], clean_title(meta.get("title", ""))
                jpg = members.get(name[:-5] + ".jpg")
                jpg_file = tar.extractfile(jpg) if jpg is not None else None
                if cat in out and caption and jpg_file is not None:
                    out[cat].append((meta["file"], caption, jpg_file.read()))
    return out


def _encode(data: bytes, cfg: SampleConfig) -> bytes:
    with Image.open(io.BytesIO(data)) as src:
        im = src.convert("RGB")
        im.thumbnail((cfg.longest_side, cfg.longest_side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=cfg.jpeg_quality, optimize=True)
        return buf.getvalue()


def build_samples(shard_dir: Path, out_dir: Path, cfg: SampleConfig = SampleConfig()) -> dict[str, list[str]]:
    """Write ``out_dir/<category>/<name>.jpg``, ``captions.json`` and ``LICENSE.md``.

    Returns the captions mapping ``{relative file: [caption]}``. Duplicate captions are skipped so
    every picked drawing is a distinct subject.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    captions: dict[str, list[str]] = {}
    for cat, items in _candidates(Path(shard_dir)).items():
        items.sort(key=lambda it: hashlib.sha256((cfg.seed + it[0]).encode()).hexdigest())
        seen: set[str] = set()
        for _key, caption, data in items:
            if len(seen) >= cfg.per_category or caption in seen:
                continue
            seen.add(caption)
            rel = f"{cat}/{re.sub(r'[^a-z0-9]+', '_', caption).strip('_')}.jpg"
            (out_dir / cat).mkdir(exist_ok=True)
            (out_dir / rel).write_bytes(_encode(data, cfg))
            captions[rel] = [caption]
    atomic_write_text(out_dir / "captions.json", json.dumps(captions, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out_dir / "LICENSE.md", LICENSE_TEXT)
    return captions


if __name__ == "__main__":  # pragma: no cover - maintainer tool
    caps = build_samples(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"wrote {len(caps)} images to {sys.argv[2]}")
