"""Builders for tiny synthetic evaluation datasets (solid-colour images) in ``tmp_path``."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
           "yellow": (255, 255, 0), "white": (255, 255, 255), "black": (0, 0, 0)}


def png_bytes(colour: str, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), COLOURS[colour]).save(buf, format="PNG")
    return buf.getvalue()


def make_class_folder(root: Path, per_class: dict[str, int], classes_json: dict | None = None) -> Path:
    """root/<folder>/<i>.png solid images of the folder's colour (folder = colour name or key)."""
    root.mkdir(parents=True, exist_ok=True)
    for folder, n in per_class.items():
        (root / folder).mkdir()
        colour = folder if folder in COLOURS else (classes_json or {}).get(folder, "black")
        colour = colour if colour in COLOURS else "black"
        for i in range(n):
            (root / folder / f"{i:03d}.png").write_bytes(png_bytes(colour))
    if classes_json is not None:
        (root / "classes.json").write_text(json.dumps(classes_json))
    return root


def make_retrieval_folder(root: Path, captions: dict[str, list[str]], fmt: str = "json",
                          images_subdir: bool = True) -> Path:
    """Images named ``<colour>_<i>.png`` (colour = prefix) + captions.json / captions.csv."""
    image_dir = root / "images" if images_subdir else root
    image_dir.mkdir(parents=True, exist_ok=True)
    for name in captions:
        (image_dir / name).write_bytes(png_bytes(name.split("_")[0]))
    if fmt == "json":
        (root / "captions.json").write_text(json.dumps(captions))
    else:
        lines = ["image,caption"] + [f'{k},"{c}"' for k, caps in captions.items() for c in caps]
        (root / "captions.csv").write_text("\n".join(lines) + "\n")
    return root


def make_shard(path: Path, samples: list[dict[str, bytes | str | dict]]) -> Path:
    """A (gzipped if .gz/.tgz) tar with members ``<__key__>.<ext>`` for each sample dict."""
    mode = "w:gz" if path.name.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as tar:
        for s in samples:
            for ext, value in s.items():
                if ext == "__key__":
                    continue
                data = (json.dumps(value).encode() if isinstance(value, dict)
                        else value.encode() if isinstance(value, str) else value)
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def colour_classes(tmp_path: Path) -> Path:
    return make_class_folder(tmp_path / "colours", {"red": 3, "green": 2, "blue": 4, "yellow": 1})


@pytest.fixture
def colour_captions(tmp_path: Path) -> Path:
    caps = {"red_0.png": ["a red square", "something red"], "green_0.png": ["a green square"],
            "blue_0.png": ["blue", "a blue thing", "the colour blue"], "yellow_0.png": ["yellow"],
            "white_0.png": ["a white tile", "white"]}
    return make_retrieval_folder(tmp_path / "captioned", caps)
