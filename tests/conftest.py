"""Test-wide settings: GPU tests skip without CUDA; shared data location."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# CLIPFP8_SHARED_DATA points elsewhere, e.g. at a subset carried to a lent GPU machine.
SHARED_DATA = Path(os.environ.get("CLIPFP8_SHARED_DATA") or REPO / ".." / "shared" / "data").resolve()

# Keep the 2-core CI machine responsive: tests are small, thread oversubscription only hurts.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# The project's cache (remembered weight digests, engines; quant.core.fileio.cache_root) in a
# folder of this run, never the user's: a digest remembered by an earlier run (or another
# checkout) would otherwise stand in for one a test means to compute.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="clipfp8-tests-cache-")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data or $CLIPFP8_SHARED_DATA (real eval/train images); skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real images are not shipped with the project)")
    return SHARED_DATA
