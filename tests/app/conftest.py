"""Fixtures shared by the pure-core app tests: a small generated corpus, FakeEncoder twins
(FP8 noisy) and an in-memory index over them."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.app.helpers import MemIndex, make_corpus
from tests.fakes import FakeEncoder


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    return make_corpus(tmp_path / "corpus")


@pytest.fixture()
def encoders() -> dict[str, FakeEncoder]:
    return {"FP16": FakeEncoder(precision="fp16"), "FP8": FakeEncoder(precision="fp8-fake", noise=1.0)}


@pytest.fixture()
def index(corpus: Path, encoders: dict[str, FakeEncoder]) -> MemIndex:
    return MemIndex(corpus, list(encoders.values()))
