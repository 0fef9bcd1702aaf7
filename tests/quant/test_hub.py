"""``--pretrained`` offline: cached weights load without the network, missing ones fail at once
with the cache folder and ``--checkpoint`` named (no minute of hub retries)."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

from clipfp8.quant.core import hub
from clipfp8.quant.core.errors import ModelLoadError

MODEL, TAG, REPO_ID = "ViT-B-32", "laion2b_s34b_b79k", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face hub cache (huggingface_hub reads the folder at call time)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def _cache_file(cache: Path, repo_id: str, filename: str) -> Path:
    """Lay out one cached file the way huggingface_hub does (refs/main -> snapshots/<rev>/)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    path = repo / "snapshots" / "0123abcd" / filename
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    return path


def test_source_of_a_hub_tag_prefers_the_safetensors_twin(hf_cache: Path) -> None:
    src = hub.pretrained_source(MODEL, TAG)
    assert src is not None and src.repo_id == REPO_ID and src.host == "huggingface.co"
    assert src.filenames == ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    assert src.cache_dir == hf_cache / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert hub.pretrained_source(MODEL, "no-such-tag") is None


def test_cached_file_finds_either_name(hf_cache: Path) -> None:
    src = hub.pretrained_source(MODEL, TAG)
    assert src is not None and hub.cached_file(src) is None
    path = _cache_file(hf_cache, REPO_ID, "open_clip_pytorch_model.bin")
    assert hub.cached_file(src) == path


def test_cached_weights_load_in_offline_mode(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    _cache_file(hf_cache, REPO_ID, "open_clip_model.safetensors")
    monkeypatch.setattr(hub, "reachable", lambda host, **kw: pytest.fail("probed the network"))
    before = constants.HF_HUB_OFFLINE
    with hub.pretrained_context(MODEL, TAG):
        assert constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE == before


def test_missing_weights_offline_fail_at_once_naming_cache_and_checkpoint(hf_cache: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from clipfp8.quant.core.config import ModelSpec
    from clipfp8.quant.core.models import load_model

    monkeypatch.setattr(hub, "reachable", lambda host, **kw: False)
    with pytest.raises(ModelLoadError) as e:
        load_model(ModelSpec(name=MODEL, pretrained=TAG))
    msg = str(e.value)
    assert f"--pretrained {TAG}" in msg and str(hf_cache / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K") in msg
    assert f"--model {MODEL} --checkpoint FILE.safetensors" in msg


def test_online_and_uncached_leaves_the_download_to_open_clip(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(hub, "reachable", lambda host, **kw: True)
    with hub.pretrained_context(MODEL, TAG):
        assert constants.HF_HUB_OFFLINE is False


def test_reachable_probes_tcp_and_trusts_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        assert hub.reachable("127.0.0.1", port, timeout=2.0)
    finally:
        server.close()
    assert not hub.reachable("127.0.0.1", port, timeout=2.0)  # closed: refused
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert hub.reachable("127.0.0.1", port, timeout=2.0)
