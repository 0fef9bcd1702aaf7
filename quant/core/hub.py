"""Where open_clip's pretrained weights come from, whether they are cached, and whether the hub
can be reached -- so that ``--pretrained`` fails in a second when offline instead of retrying
for a minute, and loads a cached copy without touching the network.

open_clip downloads a tag's weights from the Hugging Face hub (``hf_hub``: ``org/repo/[file]``,
preferring a ``.safetensors`` twin of a ``.bin``/``.pth`` file) when ``huggingface_hub`` is
installed, else from a plain URL into ``~/.cache/clip`` (``open_clip.pretrained``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from clipfp8.quant.core.errors import ModelLoadError

log = logging.getLogger(__name__)

#: Seconds to wait for a TCP connection to the download host before calling it unreachable.
PROBE_TIMEOUT_S = 2.0
#: Where open_clip puts plain-URL downloads (``download_pretrained_from_url``'s default).
URL_CACHE_DIR = Path("~/.cache/clip").expanduser()
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@dataclass(frozen=True)
class PretrainedSource:
    """One open_clip pretrained tag's download: a hub repo and candidate file names (preferred
    first), or a URL. ``cache_dir`` is the folder a cached copy lives in."""

    model: str
    tag: str
    repo_id: str | None
    filenames: tuple[str, ...]
    url: str | None
    cache_dir: Path

    @property
    def host(self) -> str:
        if self.repo_id is not None:
            from huggingface_hub import constants

            return urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        return urlparse(self.url or "").hostname or ""


def _hf_filenames(filename: str) -> tuple[str, ...]:
    """open_clip tries a ``.safetensors`` twin first (``pretrained._get_safe_alternatives``)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    filename = filename or HF_WEIGHTS_NAME
    if filename == HF_WEIGHTS_NAME:
        return (HF_SAFE_WEIGHTS_NAME, filename)
    if filename.endswith((".bin", ".pth")):
        return (filename[:-4] + ".safetensors", filename)
    return (filename,)


def pretrained_source(model: str, tag: str) -> PretrainedSource | None:
    """Where open_clip would fetch ``model``/``tag`` from; None for an unknown tag or a local file."""
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(model, tag)
    if not cfg or cfg.get("file"):
        return None
    hub = cfg.get("hf_hub", "")
    if hub and _has_hf_hub():
        from huggingface_hub import constants

        repo_id, filename = os.path.split(hub)
        folder = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
        return PretrainedSource(model, tag, repo_id, _hf_filenames(filename), None, folder)
    url = cfg.get("url", "")
    if not url:
        return None
    return PretrainedSource(model, tag, None, (os.path.basename(urlparse(url).path),), url, URL_CACHE_DIR)


def _has_hf_hub() -> bool:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    return True


def cached_file(source: PretrainedSource) -> Path | None:
    """The cached weights file of ``source``, or None when it was never downloaded (no network)."""
    if source.repo_id is None:
        path = source.cache_dir / source.filenames[0]
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    for name in source.filenames:
        hit = try_to_load_from_cache(source.repo_id, name)
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit)
    return None


def reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds. Behind a proxy
    (``HTTPS_PROXY``/``ALL_PROXY``) a direct probe says nothing, so it answers True."""
    if not host or any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError as e:  # DNS failure, refused, timed out
        log.debug("cannot reach %s:%d: %s", host, port, e)
        return False


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub's offline mode for the duration (``HF_HUB_OFFLINE=1``, read once at import,
    so the module constant is switched): cached files load without a request or a retry."""
    if not _has_hf_hub():
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def pretrained_context(model: str, tag: str | None) -> contextlib.AbstractContextManager[None]:
    """The context to call open_clip's loader in for ``model``/``tag``: offline when the weights
    are cached (no request, no retry); as is when they are not but the host answers. Raises
    ``ModelLoadError`` at once, naming the cache folder and ``--checkpoint``, when they are not
    cached and the host cannot be reached (huggingface_hub would retry for about a minute)."""
    source = pretrained_source(model, tag) if tag else None
    if source is None:
        return contextlib.nullcontext()
    cached = cached_file(source)
    if cached is not None:
        log.debug("%s/%s: using the cached %s", model, tag, cached)
        return hub_offline()
    if not reachable(source.host):
        raise ModelLoadError(
            f"--pretrained {tag}: the weights of {model} are not in the local cache ({source.cache_dir}) "
            f"and {source.host} cannot be reached (offline?). Download them once with network access, "
            f"or load local weights with --model {model} --checkpoint FILE.safetensors"
        )
    return contextlib.nullcontext()


__all__ = ["PretrainedSource", "pretrained_source", "cached_file", "reachable", "hub_offline",
           "pretrained_context", "PROBE_TIMEOUT_S", "URL_CACHE_DIR"]
