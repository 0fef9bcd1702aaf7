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

timm is left out the same way (open_clip's ``timm_model`` falls back when ``import timm`` fails;
timm imports ``torch._dynamo`` and torchvision's models) unless the model has a timm image tower,
and torchvision's ``models`` and ``ops`` subpackages, which no open_clip CLIP uses at import, run
their ``__init__`` on first use (``deferred_import``). Together: 1.8 s -> 0.3 s for the first
import of open_clip on the 2-core CPU (docs/benchmarks.md).
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

from clipfp8.quant.core.deferred_import import defer_package, import_without

log = logging.getLogger(__name__)

_lock = threading.Lock()


def _installed(name: str) -> bool:
    return sys.modules.get(name) is not None or importlib.util.find_spec(name) is not None


#: torchvision subpackages whose ``__init__`` runs on first use (see the module docstring).
DEFERRED_TORCHVISION = ("torchvision.models", "torchvision.ops")


def import_open_clip(hf: bool = True, timm: bool = True) -> ModuleType:
    """The ``open_clip`` module; ``hf``: the caller builds or tokenizes for a Hugging Face text
    tower, so transformers must be usable through it; ``timm``: the same for a timm image tower.
    What is not needed may be left out of the first import, and is bound in when a later caller
    needs it."""
    with _lock:  # one thread at a time may hide packages from the import system
        oc = sys.modules.get("open_clip")
        if oc is None:
            hidden = [pkg for pkg, needed in (("transformers", hf), ("timm", timm))
                      if not needed and pkg not in sys.modules and _installed(pkg)]
            if "timm" in hidden and hf and "transformers" not in sys.modules and _installed("transformers"):
                # transformers, imported now, would remember timm as missing (a cached check).
                hidden.remove("timm")
            for name in DEFERRED_TORCHVISION:
                defer_package(name)
            return import_without("open_clip", hidden)
        for package, needed in (("transformers", hf), ("timm", timm)):
            if needed:
                _bind(package)
        return oc


def _bind(package: str) -> None:
    """Give the open_clip module that was imported without ``package`` the names its import
    would have bound. Patched in place rather than reloaded: a reload would make new classes,
    and models built through ``open_clip.model`` (which holds the old ones) could then not be
    pickled by name or checked with ``isinstance``. (CoCa's text generation, which the product
    never runs, keeps its own no-transformers state.)"""
    target, names = _BINDINGS[package]
    module = sys.modules.get(target)
    if module is None or getattr(module, package, True) is not None or not _installed(package):
        return
    log.debug("binding %s into %s", package, target)
    for name, (source, attr) in names.items():
        setattr(module, name, getattr(importlib.import_module(source), attr))
    setattr(module, package, importlib.import_module(package))  # last: marks the module done


def _names(source: str, *names: str) -> dict[str, tuple[str, str]]:
    return {n: (source, n) for n in names}


#: package -> (the open_clip module that imports it at the top, {name bound there: (module, name)})
#: as open_clip 3.3.0 (pinned) imports them.
_BINDINGS: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "transformers": ("open_clip.hf_model", {
        **_names("transformers", "AutoModel", "AutoTokenizer", "AutoConfig", "PretrainedConfig"),
        **_names("transformers.modeling_outputs", "BaseModelOutput", "BaseModelOutputWithPooling",
                 "BaseModelOutputWithPoolingAndCrossAttentions")}),
    "timm": ("open_clip.timm_model", {
        **_names("timm.layers", "RotAttentionPool2d", "Mlp", "to_2tuple"),
        "AbsAttentionPool2d": ("timm.layers", "AttentionPool2d")}),
}


def needs_transformers(cfg: dict[str, Any] | None) -> bool:
    """Whether an open_clip model config (None: unknown) has a Hugging Face text tower."""
    if cfg is None:
        return True
    text = cfg.get("text_cfg", {})
    return bool(text.get("hf_model_name") or text.get("hf_tokenizer_name"))


def needs_timm(cfg: dict[str, Any] | None) -> bool:
    """Whether an open_clip model config (None: unknown) has a timm image tower."""
    if cfg is None:
        return True
    return bool(cfg.get("vision_cfg", {}).get("timm_model_name"))


def import_open_clip_for_config(cfg: dict[str, Any] | None) -> ModuleType:
    """``open_clip``, with transformers and timm only where config ``cfg`` (None: unknown) needs them."""
    return import_open_clip(hf=needs_transformers(cfg), timm=needs_timm(cfg))


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
    """``open_clip``, with transformers and timm only if architecture ``name`` (or an unknown one)
    needs them."""
    return import_open_clip_for_config(bundled_config(name))
