"""``defer_package``: a subpackage whose ``__init__`` runs on the first lookup of a name it lacks,
on a package written to a temporary folder (its ``__init__`` counts its runs in a log file)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from clipfp8.quant.core.deferred_import import DeferredPackage, defer_package, is_deferred


@pytest.fixture()
def pkg(tmp_path: Path) -> Iterator[str]:
    """A fresh top-level package ``name`` with subpackage ``heavy`` (``__init__`` appends a line to
    ``runs.log``, sleeps a little so threads overlap, imports its submodule ``light`` and defines
    ``VALUE``); removed from ``sys.modules`` and ``sys.path`` afterwards."""
    name = f"defer_{uuid.uuid4().hex[:8]}"
    heavy = tmp_path / name / "heavy"
    heavy.mkdir(parents=True)
    (tmp_path / name / "__init__.py").write_text("")
    log = (tmp_path / "runs.log").as_posix()
    (heavy / "__init__.py").write_text(
        f"import time\nopen({log!r}, 'a').write('run\\n')\ntime.sleep(0.2)\n"
        "from .light import LIGHT\nVALUE = LIGHT + 1\n__all__ = ['VALUE']\n")
    (heavy / "light.py").write_text("LIGHT = 41\n")
    sys.path.insert(0, str(tmp_path))
    try:
        yield name
    finally:
        sys.path.remove(str(tmp_path))
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]


def _runs(pkg: str) -> int:
    log = Path(sys.modules[pkg].__file__ or "").parent.parent / "runs.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_init_runs_on_first_missing_name_only(pkg: str) -> None:
    assert defer_package(f"{pkg}.heavy")
    top = importlib.import_module(pkg)
    light = importlib.import_module(f"{pkg}.heavy.light")  # a submodule imports without the package's __init__
    assert light.LIGHT == 41 and _runs(pkg) == 0 and is_deferred(f"{pkg}.heavy")
    heavy = sys.modules[f"{pkg}.heavy"]
    assert isinstance(heavy, DeferredPackage)
    assert heavy.VALUE == 42 and _runs(pkg) == 1 and not is_deferred(f"{pkg}.heavy")
    assert heavy.light is light  # the same submodule, not a second copy
    ns: dict[str, object] = {}
    exec(f"from {pkg}.heavy import *", ns)  # __all__ after the run
    assert ns["VALUE"] == 42 and _runs(pkg) == 1
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        heavy.missing  # noqa: B018  # a name the package does not define stays an AttributeError
    assert _runs(pkg) == 1 and top is sys.modules[pkg]


def test_from_import_runs_it_and_threads_wait_for_one_run(pkg: str) -> None:
    assert defer_package(f"{pkg}.heavy")
    importlib.import_module(pkg)
    heavy = sys.modules[f"{pkg}.heavy"]
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(heavy.VALUE)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ns: dict[str, object] = {}
    exec(f"from {pkg}.heavy import VALUE", ns)
    assert got == [42] * 4 and ns["VALUE"] == 42 and _runs(pkg) == 1


@pytest.mark.parametrize("error", ["ImportError('broken heavy')", "AttributeError('broken heavy')"])
def test_a_failing_init_raises_its_error_each_time(pkg: str, error: str) -> None:
    heavy_init = Path(importlib.util.find_spec(pkg).submodule_search_locations[0]) / "heavy" / "__init__.py"  # type: ignore[union-attr]
    heavy_init.write_text(f"PARTIAL = 1\nraise {error}\n")
    assert defer_package(f"{pkg}.heavy")
    importlib.import_module(pkg)
    heavy = sys.modules[f"{pkg}.heavy"]
    for _ in range(2):
        # An AttributeError inside would read as a missing name (and hasattr would hide it).
        with pytest.raises(ImportError, match="broken heavy"):
            hasattr(heavy, "VALUE")
        assert "PARTIAL" not in heavy.__dict__  # put back as it was, as a failed import leaves nothing
    assert is_deferred(f"{pkg}.heavy")


def test_dir_lists_the_names_of_the_run_init(pkg: str) -> None:
    assert defer_package(f"{pkg}.heavy")
    importlib.import_module(pkg)
    assert "VALUE" in dir(sys.modules[f"{pkg}.heavy"]) and _runs(pkg) == 1


def test_refuses_what_it_cannot_defer(pkg: str) -> None:
    assert not defer_package("toplevel")  # no parent
    assert not defer_package(f"{pkg}.nothing_here")
    assert not defer_package("no_such_parent_pkg.child")
    importlib.import_module(pkg)
    assert not defer_package(f"{pkg}.heavy")  # the parent is imported: its __init__ would not see it
    assert f"{pkg}.heavy" not in sys.modules
