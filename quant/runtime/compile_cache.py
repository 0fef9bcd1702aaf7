"""The compiler-cache calls behind compiled engines (``quant.runtime.engine``).

* ``configure_compile_cache()``: Inductor's on-disk caches in a persistent folder, so later
  processes skip compiling what this machine already compiled.
* ``CompileCache``: the interface an engine needs (record one build's artifacts, save them,
  load them); ``TorchCompileCache`` implements it with ``torch.compiler.save_cache_artifacts`` /
  ``load_cache_artifacts`` (torch >= 2.7, "mega-cache"); tests inject a fake.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from clipfp8.quant.core.fileio import cache_root


def configure_compile_cache(cache_dir: Path | None = None) -> Path:
    """Point Inductor's FX-graph/autotune caches at a persistent folder (env wins if set):
    ``$TORCHINDUCTOR_CACHE_DIR``, else ``cache_dir``, else ``~/.cache/clipfp8/inductor``."""
    default = cache_root() / "inductor"
    path = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir or default)))
    path.mkdir(parents=True, exist_ok=True)
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    return path


class CompileCache(Protocol):
    """The compiler-cache calls an engine needs (``TorchCompileCache``; tests inject a fake)."""

    def recording(self) -> contextlib.AbstractContextManager[None]:
        """Context in which compiles are recorded for one engine (and nothing compiled before)."""

    def save(self) -> tuple[bytes, dict[str, int]] | None:
        """Artifacts recorded so far -> (bytes, entries per cache kind), or None if none."""

    def load(self, data: bytes) -> dict[str, int]:
        """Install ``data`` into the compiler's caches -> entries per cache kind."""


class TorchCompileCache:
    """``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts`` (torch >= 2.7) over
    the persistent Inductor cache folder of ``configure_compile_cache``."""

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        import torch
        from torch.compiler._cache import CacheArtifactManager

        configure_compile_cache()
        # A fresh Dynamo state compiles the same graphs as a fresh process will (no
        # recompilation or automatic-dynamic history from encoders built earlier here).
        torch._dynamo.reset()
        fresh = getattr(CacheArtifactManager, "with_fresh_cache", None)  # private; torch >= 2.8
        with fresh() if fresh is not None else contextlib.nullcontext():
            yield

    def save(self) -> tuple[bytes, dict[str, int]] | None:
        import torch

        result = torch.compiler.save_cache_artifacts()
        if result is None:
            return None
        data, info = result
        return bytes(data), {kind: len(keys) for kind, keys in info.artifacts.items()}

    def load(self, data: bytes) -> dict[str, int]:
        import torch

        configure_compile_cache()
        info = torch.compiler.load_cache_artifacts(data)
        return {} if info is None else {kind: len(keys) for kind, keys in info.artifacts.items()}


__all__ = ["configure_compile_cache", "CompileCache", "TorchCompileCache"]
