"""Shared fixtures: small generated corpora and the deterministic fake encoders."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fakes import FakeEncoder

REPO = Path(__file__).resolve().parents[2]


def write_image(path: Path, seed: int, size: tuple[int, int] = (24, 20), fmt: str | None = None) -> Path:
    """A distinct random RGB image (seeded), so every file embeds differently."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path, format=fmt)
    return path


def make_corpus(root: Path, n: int, start_seed: int = 0) -> list[Path]:
    """``n`` PNG files spread over two sub-folders."""
    return [write_image(root / f"d{i % 2}" / f"img{i:03d}.png", start_seed + i) for i in range(n)]


def encoders() -> list[FakeEncoder]:
    """Two encoders indexed in one pass, like fp16 + fp8."""
    return [FakeEncoder(), FakeEncoder(precision="fp8-fake", noise=0.05)]


def index_state(index_dir: Path) -> dict:
    """Everything a clean run determines: rows (id, path, hash, status) and per encoder the
    sorted FAISS ids and their vectors."""
    from clipfp8.indexing.store import open_index

    with open_index(index_dir) as store:
        rows = sorted((r["id"], bytes(r["path_raw"]), r["sha256"], r["status"], r["error"])
                      for r in store.db.query("SELECT * FROM images"))
        out: dict = {"rows": rows}
        for name in store.encoder_names():
            vec = store.vectors(name)
            ids = vec.ids()
            order = np.argsort(ids)
            vectors = vec.reconstruct(ids[order]).round(5).tolist()
            out[name] = (ids[order].tolist(), vectors)
        return out


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    make_corpus(root, 10)
    return root


@pytest.fixture(autouse=True)
def _single_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


__all__ = ["REPO", "write_image", "make_corpus", "encoders", "index_state", "os"]
