"""The layering of docs/ARCHITECTURE.md, enforced: no import cycles (function-level imports
included) and every import pointing down the layers, never up. Also: the wheel's package list
matches the folders, so a new subpackage cannot silently miss the wheel."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"quant": "clipfp8.quant", "indexing": "clipfp8.indexing", "app": "clipfp8.app"}

#: Layer of each module prefix, lowest first; the longest matching prefix decides.
LAYERS: dict[str, int] = {
    "clipfp8.quant.core": 0,
    "clipfp8.quant": 1,  # quantization: qconfig, attention, ptq, calib, audit, checkpoint, sensitivity
    "clipfp8.quant.runtime": 2,
    "clipfp8.quant.eval": 2,
    "clipfp8.quant.train": 3,  # trains the default model; evaluates it with quant.eval
    "clipfp8.indexing": 4,
    "clipfp8.app": 5,
}
#: Same-layer packages that must not know each other (runtime and eval are siblings).
SIBLINGS_APART = {("clipfp8.quant.runtime", "clipfp8.quant.eval"), ("clipfp8.quant.eval", "clipfp8.quant.runtime")}


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        for f in (REPO / folder).rglob("*.py"):
            parts = f.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            mods[name.removesuffix(".__init__")] = f
    return mods


def _targets(mods: dict[str, Path], name: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        raw = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = name.split(".")
            parts = parts if mods[name].name == "__init__.py" else parts[:-1]
            parts = parts[: len(parts) - node.level + 1]
            base = ".".join(parts + ([base] if base else []))
        raw = [base] + [f"{base}.{a.name}" for a in node.names]
    out = []
    for target in raw:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        if target and target != name and not name.startswith(target + "."):
            out.append(target)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name].update(_targets(mods, name, node))
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's SCCs of size > 1 (import cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> tuple[int, str]:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix], prefix


def test_strongly_connected_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = strongly_connected(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_imports_only_point_down_the_layers():
    upward = []
    for module, targets in import_graph().items():
        own, own_prefix = layer_of(module)
        for target in targets:
            other, other_prefix = layer_of(target)
            if other > own or (own_prefix, other_prefix) in SIBLINGS_APART:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layering (docs/ARCHITECTURE.md):\n" + "\n".join(sorted(upward))


def test_core_imports_no_heavy_optional_stack_at_module_level():
    """The core must stay importable without modelopt/onnx/gradio (they belong to higher layers)."""
    banned = ("modelopt", "onnx", "gradio", "faiss", "tensorrt")
    found = []
    for module, path in _modules().items():
        if not module.startswith("clipfp8.quant.core"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{module}: {n}" for n in names if n.split(".")[0] in banned]
    assert not found, found


def test_wheel_package_list_matches_the_folders():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = {"clipfp8.data"}
    for folder, package in FOLDERS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO / folder).parts
            on_disk.add(".".join((package, *parts)))
    assert listed == on_disk, f"missing from pyproject: {sorted(on_disk - listed)}; stale: {sorted(listed - on_disk)}"
    for package, folder in cfg["package-dir"].items():
        assert (REPO / folder).is_dir(), f"package-dir {package} -> {folder} does not exist"


@pytest.mark.parametrize("group", ["clipfp8.precisions"])
def test_precision_entry_points_resolve(group):
    """Every registered precision names an importable factory in the layer that owns it."""
    from importlib.metadata import entry_points

    eps = {ep.name: ep for ep in entry_points(group=group)}
    assert {"fp8-fake", "fp8", "trt-fp8"} <= set(eps)
    for ep in eps.values():
        assert callable(ep.load()), ep
