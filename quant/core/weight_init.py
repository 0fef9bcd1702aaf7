"""``skip_weight_init``: build modules without drawing random initial weights, for models whose
every parameter is then loaded (a checkpoint) or copied (a module rewrite)."""
from __future__ import annotations

import contextlib
import importlib
import sys
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
from torch import nn

#: ``torch.nn.init`` functions that ``skip_weight_init`` turns into no-ops.
INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                  "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                  "sparse_")
#: The real functions, taken once, so that any exit restores them (not what an overlapping entry saw).
_ORIGINALS = {n: getattr(nn.init, n) for n in INIT_FUNCTIONS if hasattr(nn.init, n)}
_LOCK = threading.Lock()
_users = 0
_patched: list[tuple[ModuleType, str]] = []


def _no_init(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


def _patch() -> None:
    # A library that copies the init functions when one of its modules is first imported would
    # keep the no-ops for good if that import happened inside: transformers builds its table of
    # torch init functions in ``transformers.initialization``, imported lazily by its models.
    if "transformers" in sys.modules:
        with contextlib.suppress(ImportError):
            importlib.import_module("transformers.initialization")
    # Modules that bound the functions by name (``nn.MultiheadAttention``'s module does
    # ``from torch.nn.init import xavier_uniform_``) are patched too: patching ``nn.init`` alone
    # left every attention block's in-projection drawing random numbers.
    _patched[:] = [(nn.init, n) for n in _ORIGINALS] + [
        (mod, n) for name, mod in list(sys.modules.items())
        if mod is not None and name.startswith("torch.nn") and mod is not nn.init
        for n, f in _ORIGINALS.items() if getattr(mod, n, None) is f]
    for mod, n in _patched:
        setattr(mod, n, _no_init)


def _restore() -> None:
    for mod, n in _patched:
        setattr(mod, n, _ORIGINALS[n])
    _patched.clear()


@contextlib.contextmanager
def skip_weight_init(enabled: bool = True) -> Iterator[None]:
    """Build modules without drawing random initial weights (``torch.nn.init`` becomes a no-op;
    parameters keep whatever memory they were allocated with). Only for models whose every
    parameter is then loaded from a checkpoint or copied: random init of ViT-L/14 costs seconds
    of a cold start (4.8 s of 6 s to build it on a 2-core CPU). Buffers computed by constructors
    (attention masks, position tables) are unaffected. Nested and overlapping uses (threads) are
    counted: init comes back when the last one exits; meanwhile it is off process-wide."""
    global _users
    if not enabled:
        yield
        return
    with _LOCK:
        if _users == 0:
            _patch()
        _users += 1
    try:
        yield
    finally:
        with _LOCK:
            _users -= 1
            if _users == 0:
                _restore()


__all__ = ["skip_weight_init", "INIT_FUNCTIONS"]
