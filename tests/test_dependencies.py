"""pyproject.toml's floors, requirements/ci.lock and the installed environment agree
(docs/dependencies.md): every runtime dependency has a floor or a pin, the lock satisfies every
requirement, and what is installed is what the lock says."""
from __future__ import annotations

import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirements(extra: str | None = None) -> list[Requirement]:
    raw = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return [Requirement(r) for r in raw]


def lock() -> dict[str, Version]:
    out = {}
    for line in (REPO / "requirements" / "ci.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, ver = line.partition("==")
            assert ver, f"requirements/ci.lock: not an exact pin: {line!r}"
            out[canonicalize_name(name)] = Version(ver.split("+")[0])
    return out


@pytest.mark.parametrize("req", requirements() + requirements("dev"), ids=str)
def test_every_dependency_has_a_floor_or_pin(req):
    ops = {s.operator for s in req.specifier}
    assert ops & {">=", "=="}, f"{req}: give a tested floor (>=) or a pin (==)"


@pytest.mark.parametrize("req", requirements() + requirements("dev"), ids=str)
def test_the_lock_satisfies_every_requirement(req):
    locked = lock().get(canonicalize_name(req.name))
    assert locked is not None, f"{req.name} is missing from requirements/ci.lock (run scripts/lock.sh)"
    assert req.specifier.contains(locked, prereleases=True), f"lock has {req.name}=={locked}, outside {req}"


def test_floors_are_no_higher_than_what_ci_tests():
    """A floor above the tested version would claim an untested combination the other way round."""
    locked = lock()
    for req in requirements():
        for spec in req.specifier:
            if spec.operator == ">=":
                assert Version(spec.version) <= locked[canonicalize_name(req.name)], req


def test_installed_environment_matches_the_lock():
    mismatched = []
    for name, want in lock().items():
        try:
            have = Version(version(name).split("+")[0])
        except PackageNotFoundError:
            mismatched.append(f"{name}: not installed (lock {want})")
            continue
        if have != want:
            mismatched.append(f"{name}: installed {have}, lock {want}")
    assert not mismatched, "run scripts/setup.sh (or scripts/lock.sh after an upgrade):\n" + "\n".join(mismatched)
