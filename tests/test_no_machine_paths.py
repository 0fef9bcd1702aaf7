"""Committed files name no path of the machine they were made on.

Rule: in every tracked (or new, not ignored) text file, no absolute path into a machine's work
area, the superuser's home or a user's home (``/work``, ``/root``, ``/home/NAME`` followed by a
slash). JSON files -- recorded results and configs -- also name no ``/tmp`` path. ``/tmp`` stays
allowed in code, scripts and prose, where it is a scratch folder of whoever runs the command
(e.g. the verbatim device command in the model card). Paths point into the repository, or to
``../shared`` beside it (``quant.core.fileio.portable_path`` writes them so).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Built from pieces so this file does not match itself.
_ROOTS = "|".join(("wo" + "rk", "ro" + "ot", "ho" + "me/[A-Za-z0-9_.-]+"))
EVERYWHERE = re.compile(rf"(?<![\w.~$-])/(?:{_ROOTS})/")
IN_JSON = re.compile(r"(?<![\w.~$-])/" + "tm" + "p/")
MAX_BYTES = 2 * 2**20  # larger files are data (weights, images), not text anyone writes by hand


def repo_files() -> list[Path]:
    """Tracked files plus new files git does not ignore (so a new file is checked before commit)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout ({e})")
    return [REPO / p for p in sorted(set(out.decode("utf-8", "surrogateescape").split("\0"))) if p]


def text_of(path: Path) -> str | None:
    """The file's text, or None for binary, huge, unreadable or vanished files."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def machine_paths(name: str, text: str) -> list[str]:
    """``name:line: text`` of every line naming a forbidden absolute path."""
    patterns = [EVERYWHERE] + ([IN_JSON] if name.endswith(".json") else [])
    return [f"{name}:{i}: {line.strip()[:160]}" for i, line in enumerate(text.splitlines(), 1)
            if any(p.search(line) for p in patterns)]


def test_the_rule_catches_what_it_should_and_nothing_else() -> None:
    bad = ["/" + "work/shared/data/eval", "/" + "root/out", "/" + "home/alice/photos", '"/' + 'work/x"']
    assert all(machine_paths("a.md", line) for line in bad)
    assert machine_paths("r.json", '"path": "/' + 'tmp/eval"') and not machine_paths("a.md", "--out /" + "tmp/x")
    fine = ["../shared/data/eval/flickr8k-1k", "data/samples", "~/.cache/clipfp8", "$HOME/work/x",
            "src/work/x", "Path.home() / 'x'", "/" + "homework/", "/usr/bin/chromium"]
    assert not any(machine_paths("f.json", line) for line in fine)
    assert machine_paths("d/f.json", "a\nb /" + "root/x\n") == ["d/f.json:2: b /" + "root/x"]


def test_no_committed_file_names_a_machine_path() -> None:
    found: list[str] = []
    for path in repo_files():
        text = text_of(path)
        if text is not None:
            found += machine_paths(path.relative_to(REPO).as_posix(), text)
    assert not found, "absolute machine paths (use paths relative to the repository or ../shared):\n" + \
        "\n".join(found)
