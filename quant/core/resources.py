"""Files shipped inside the package (``clipfp8.data``): the embedded default model and the sample
corpus. Found through ``importlib.resources``, so they work the same from an editable checkout and
from an installed wheel."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from clipfp8.quant.core.errors import ModelLoadError

DATA_PACKAGE = "clipfp8.data"


def data_dir() -> Path:
    """The on-disk folder of ``clipfp8.data`` (wheels install unzipped, so it is a real folder)."""
    root = resources.files(DATA_PACKAGE)
    path = Path(str(root))
    if not path.is_dir():  # e.g. a zipimport install: the model files need a real folder
        raise ModelLoadError(f"package data {DATA_PACKAGE} is not a folder on disk ({root}); "
                             "install clip-fp8 unzipped (pip does)")
    return path


def default_model_dir() -> Path:
    """``clipfp8.data/default_model``: ``open_clip_config.json``, ``model.safetensors``, card."""
    return data_dir() / "default_model"


def samples_dir() -> Path:
    """``clipfp8.data/samples``: the bundled public-domain sample corpus (class folders)."""
    return data_dir() / "samples"


__all__ = ["data_dir", "default_model_dir", "samples_dir", "DATA_PACKAGE"]
