"""A checkpoint's weight digest is computed once per file and remembered, and never used for
tensors that changed after loading or for a file that changed on disk."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipfp8.quant.core import checksum_cache, models
from clipfp8.quant.core.config import ModelSpec
from clipfp8.quant.core.models import build_from_config, load_model, state_checksum, tiny_config


@pytest.fixture()
def checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_open_clip_cfg", lambda name: tiny_config())  # a tiny "ViT-L-14"
    torch.manual_seed(0)
    model = build_from_config(tiny_config())
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def load(path: Path) -> models.LoadedModel:
    return load_model(ModelSpec(name="ViT-L-14", checkpoint=path))


def forbid_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(state: dict) -> str:
        raise AssertionError("hashed again")
    monkeypatch.setattr(models, "state_checksum", fail)


def test_digest_is_remembered_per_file(checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load(checkpoint)
    digest = first.weights_checksum()
    assert digest == state_checksum(first.model.state_dict())
    assert checksum_cache.cache_file().is_file()
    second = load(checkpoint)
    forbid_hashing(monkeypatch)
    assert second.weights_checksum() == digest  # from the cache: no hashing


def test_changed_tensors_are_hashed_again(checkpoint: Path) -> None:
    loaded = load(checkpoint)
    digest = loaded.weights_checksum()
    with torch.no_grad():
        next(loaded.model.parameters()).add_(1.0)  # in place: same storage, new version
    changed = loaded.weights_checksum()
    assert changed != digest and changed == state_checksum(loaded.model.state_dict())
    loaded.model.to(torch.float64)  # new storage
    assert loaded.weights_checksum() == state_checksum(loaded.model.state_dict())
    assert load(checkpoint).weights_checksum() == digest  # the file's entry is untouched


def test_a_rewritten_file_is_hashed_again(checkpoint: Path) -> None:
    digest = load(checkpoint).weights_checksum()
    torch.manual_seed(1)
    other = build_from_config(tiny_config())
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(checkpoint))
    again = load(checkpoint)
    assert again.weights_checksum() == state_checksum(other.state_dict()) != digest


def test_an_unreadable_cache_is_ignored(checkpoint: Path) -> None:
    checksum_cache.cache_file().parent.mkdir(parents=True)
    checksum_cache.cache_file().write_text("{not json")
    loaded = load(checkpoint)
    assert loaded.weights_checksum() == state_checksum(loaded.model.state_dict())
    assert checksum_cache.lookup(loaded.source.key) == loaded.weights_checksum()  # rewritten


def test_a_file_overwritten_in_place_after_loading_is_hashed_again(checkpoint: Path) -> None:
    """Weights loaded by assignment may map the file: overwritten in place (``cp`` over it), the
    live tensors change without a new storage or version, so the file's identity is checked too."""
    loaded = load(checkpoint)
    digest = loaded.weights_checksum()
    torch.manual_seed(2)
    other = build_from_config(tiny_config())
    tmp = checkpoint.with_suffix(".new")
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp))
    with open(checkpoint, "r+b") as f:  # in place: same inode, new content and mtime
        f.write(tmp.read_bytes())
        f.truncate()
    now = loaded.weights_checksum()
    assert now == state_checksum(loaded.model.state_dict())
    assert checksum_cache.lookup(loaded.source.key) == digest  # the old entry is not overwritten
