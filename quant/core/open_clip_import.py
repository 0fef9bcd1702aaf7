"""Import open_clip without transformers when no Hugging Face text tower needs it.

open_clip imports transformers (and, through it, scikit-learn) at import time whenever it is
installed, only to serve models whose text tower is a Hugging Face model. On the search path of
such other models (e.g. ViT-L-14) that import was 1.3-1.7 s of a cold `clipfp8 search` on the
2-core CPU (docs/benchmarks.md). open_clip supports running without transformers: its
``hf_model`` module takes a fallback branch when ``import transformers`` fails. ``import_open_clip``
uses that branch for the first import when the caller needs no HF tower, and binds the
transformers names into ``open_clip.hf_model`` the first time a later caller in the same process
needs them -- its classes look those names up in the module's namespace when they build or run a
model, so that is enough.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

_lock = threading.Lock()


def _transformers_installed() -> bool:
    return "transformers" in sys.modules or importlib.util.find_spec("transformers") is not None


def import_open_clip(hf: bool = True) -> ModuleType:
    """The ``open_clip`` module; ``hf``: the caller builds or tokenizes for a Hugging Face text
    tower, so transformers must be usable through it (else it may be left out of the import)."""
    with _lock:  # one thread at a time may hide transformers from the import system
        oc = sys.modules.get("open_clip")
        if oc is None:
            if hf or "transformers" in sys.modules or not _transformers_installed():
                return importlib.import_module("open_clip")
            sys.modules["transformers"] = None  # type: ignore[assignment]  # makes `import transformers` fail
            try:
                return importlib.import_module("open_clip")
            finally:
                if "transformers" in sys.modules and sys.modules["transformers"] is None:
                    del sys.modules["transformers"]
        if hf:
            _with_transformers()
        return oc


def _with_transformers() -> None:
    """Give ``open_clip.hf_model``, imported without transformers, the transformers names its
    import would have bound. Patched in place rather than reloaded: a reload would make new
    classes, and models built through ``open_clip.model`` (which holds the old ones) could then
    not be pickled by name or checked with ``isinstance``. (CoCa's text generation, which the
    product never runs, keeps its own no-transformers state.)"""
    hf_model = sys.modules.get("open_clip.hf_model")
    if hf_model is None or getattr(hf_model, "transformers", True) is not None or not _transformers_installed():
        return
    log.debug("binding transformers into open_clip.hf_model")
    transformers = importlib.import_module("transformers")
    outputs = importlib.import_module("transformers.modeling_outputs")
    for name in _HF_MODEL_NAMES:
        setattr(hf_model, name, getattr(transformers, name))
    for name in _HF_OUTPUT_NAMES:
        setattr(hf_model, name, getattr(outputs, name))
    hf_model.transformers = transformers  # type: ignore[attr-defined]  # last: marks the module done


#: What ``open_clip.hf_model`` (open_clip 3.3.0, pinned) imports from transformers at the top.
_HF_MODEL_NAMES = ("AutoModel", "AutoTokenizer", "AutoConfig", "PretrainedConfig")
_HF_OUTPUT_NAMES = ("BaseModelOutput", "BaseModelOutputWithPooling", "BaseModelOutputWithPoolingAndCrossAttentions")


def needs_transformers(cfg: dict[str, Any] | None) -> bool:
    """Whether an open_clip model config (None: unknown) has a Hugging Face text tower."""
    if cfg is None:
        return True
    text = cfg.get("text_cfg", {})
    return bool(text.get("hf_model_name") or text.get("hf_tokenizer_name"))


def bundled_config(name: str) -> dict[str, Any] | None:
    """open_clip's bundled config of architecture ``name``, read from its package folder without
    importing open_clip (None when there is no such file: e.g. a config added at run time)."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "model_configs" / f"{name}.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                return None
    return None


def import_open_clip_for(name: str) -> ModuleType:
    """``open_clip``, with transformers only if architecture ``name`` (or an unknown one) needs it."""
    return import_open_clip(hf=needs_transformers(bundled_config(name)))
