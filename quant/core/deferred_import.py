"""Packages whose ``__init__`` runs on first use instead of at import; an import with some
optional packages hidden (``import_without``).

torchvision's package ``__init__`` imports ``torchvision.models`` and ``torchvision.ops``, and
``ops.roi_align`` imports ``torch._dynamo``: 1.0-1.1 s of a cold ``clipfp8 search`` on the 2-core
CPU, for two subpackages no CLIP path uses (open_clip needs only ``torchvision.transforms`` and
the one class ``torchvision.ops.misc.FrozenBatchNorm2d``). ``defer_package`` registers such a
subpackage as a module whose own ``__init__`` has not run yet: its submodules import normally
(``import torchvision.ops.misc`` runs ``misc.py`` only), and the first attribute that is not
there yet (``torchvision.ops.nms``, ``from torchvision.ops import nms``) runs the real
``__init__`` into the same module object, then answers as a normal import would have, and so
does ``dir()``. What changes is when the ``__init__`` runs: until then, code that imports one of
the package's submodules directly sees only what that submodule sets up (e.g.
``torchvision.models._api.list_models()`` lists the models whose modules were imported).

Like the standard library's ``importlib.util.LazyLoader``, the deferred ``__init__`` runs under
a lock of its own, which Python's import-deadlock detection does not see: a thread that imports a
submodule whose top level looks up a not-yet-defined name of the package, while another thread
runs the package's ``__init__`` (which imports that same submodule), would wait forever. The
product defers only torchvision's ``models`` and ``ops``, whose ``__init__`` runs on the first
lookup of one of their names.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)


class DeferredPackage(ModuleType):
    """A package module whose ``__init__.py`` runs on the first lookup of a name it lacks.

    Module attribute lookups check the module's dict first, so this costs nothing once a name is
    there; ``__getattr__`` only sees names that are missing. While the ``__init__`` runs, lookups
    from the thread running it see the partial module (as during any package's import), and other
    threads wait for it to finish.
    """

    def __init__(self, name: str, spec: importlib.machinery.ModuleSpec) -> None:
        super().__init__(name)
        self.__dict__["_deferred_lock"] = threading.RLock()
        self.__dict__["_deferred_state"] = "pending"  # pending -> running -> done
        self.__spec__ = spec
        self.__file__ = spec.origin
        self.__path__ = list(spec.submodule_search_locations or [])
        self.__package__ = name
        self.__loader__ = spec.loader

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_deferred_"):
            raise AttributeError(attr)
        self._ensure_init()
        try:
            return self.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}") from None

    def __dir__(self) -> list[str]:
        self._ensure_init()
        return sorted(self.__dict__)

    def _ensure_init(self) -> None:
        with self._deferred_lock:
            if self._deferred_state == "pending":
                self._run_init()

    def _run_init(self) -> None:
        """Run the package's ``__init__`` into this module (the caller holds the lock). On failure
        the module is put back as it was, and the error is raised as an ``ImportError`` (an
        ``AttributeError`` escaping ``__getattr__`` would read as a missing name, and
        ``hasattr`` would hide it)."""
        before = dict(self.__dict__)
        self.__dict__["_deferred_state"] = "running"
        log.debug("running the deferred __init__ of %s", self.__name__)
        try:
            self.__spec__.loader.exec_module(self)  # type: ignore[union-attr]
        except BaseException as e:
            self.__dict__.clear()
            self.__dict__.update(before)  # pending again: the next lookup raises the real error again
            if isinstance(e, Exception) and not isinstance(e, ImportError):
                raise ImportError(f"the deferred __init__ of {self.__name__} failed: {type(e).__name__}: {e}",
                                  name=self.__name__) from e
            raise
        self.__dict__["_deferred_state"] = "done"


def defer_package(name: str) -> bool:
    """Register subpackage ``name`` (e.g. ``"torchvision.ops"``) so that its ``__init__`` runs on
    first use. Does nothing and returns False when it is imported already, when its parent is
    (the parent's ``__init__`` would not see the module), or when it is no plain package on disk
    (found by path, without importing the parent)."""
    parent, _, child = name.rpartition(".")
    if not parent or name in sys.modules or parent in sys.modules:
        return False
    try:
        parent_spec = importlib.util.find_spec(parent)  # a top-level name: imports nothing
    except (ImportError, ValueError):
        return False
    for folder in (parent_spec.submodule_search_locations or []) if parent_spec is not None else []:
        init = Path(folder) / child / "__init__.py"
        if init.is_file():
            spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
            if spec is None or spec.loader is None:
                return False
            sys.modules[name] = DeferredPackage(name, spec)
            return True
    return False


def import_without(module: str, hidden: Iterable[str]) -> ModuleType:
    """Import ``module`` with the packages ``hidden`` made unimportable for that one import
    (``sys.modules[name] = None``: ``import name`` raises ``ImportError``), for libraries that
    import optional packages they fall back without (open_clip: transformers, timm;
    sqlite-utils: pandas). Each hidden package stays importable afterwards. The caller makes
    sure nothing else imports meanwhile, and hides only packages not imported yet."""
    names = [n for n in hidden if n not in sys.modules]
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        return importlib.import_module(module)
    finally:
        for name in names:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def is_deferred(name: str) -> bool:
    """Whether ``name`` is a deferred package whose ``__init__`` has not run yet."""
    mod = sys.modules.get(name)
    return isinstance(mod, DeferredPackage) and mod.__dict__["_deferred_state"] == "pending"


__all__ = ["DeferredPackage", "defer_package", "is_deferred", "import_without"]
