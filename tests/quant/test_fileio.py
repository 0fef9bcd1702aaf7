"""quant.core.fileio: atomic file writes, the fsynced directory swap, portable recorded paths."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from clipfp8.quant.core import fileio
from clipfp8.quant.core.fileio import atomic_path, atomic_write_bytes, atomic_write_text, portable_path, replace_dir


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _make(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    atomic_write_text(target, "old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def full(fd: int, data: memoryview) -> None:
        os.write(fd, data[:1])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "_write_all", full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_write_from_joins_the_pieces_and_a_failing_producer_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    fileio.atomic_write_from(target, lambda write: [write(p) for p in (b"ab", memoryview(b"cd"), bytearray(b"e"))])
    assert target.read_bytes() == b"abcde"

    def broken(write) -> None:  # type: ignore[no-untyped-def]
        write(b"half")
        raise RuntimeError("the producer failed")

    with pytest.raises(RuntimeError, match="producer"):
        fileio.atomic_write_from(target, broken)
    assert target.read_bytes() == b"abcde" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_path_keeps_the_suffix_and_renames_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".plot.png.tmp-")
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # not visible before the block ends
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_replace_dir_into_a_new_target(tmp_path: Path) -> None:
    new = _make(tmp_path / ".stage", {"a.txt": b"A", "sub/b.txt": b"B"})
    replace_dir(new, tmp_path / "out")
    assert _tree(tmp_path / "out") == {"a.txt": b"A", "sub/b.txt": b"B"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_replace_dir_swaps_fsynced_content_and_deletes_the_old_dir_after_the_rename(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = _make(tmp_path / "out", {"old.txt": b"old"})
    new = _make(tmp_path / ".stage", {"a.txt": b"A", "sub/b.txt": b"B"})
    synced: list[str] = []
    real_fsync_file, real_rmtree = fileio.fsync_file, fileio.shutil.rmtree
    monkeypatch.setattr(fileio, "fsync_file", lambda p: (synced.append(Path(p).name), real_fsync_file(p)))
    seen_at_delete: list[dict[str, bytes]] = []

    def rmtree(path, *a, **k):
        seen_at_delete.append(_tree(target))  # what readers of target see while the old dir goes
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(fileio.shutil, "rmtree", rmtree)
    replace_dir(new, target)
    assert sorted(synced) == ["a.txt", "b.txt"]
    assert seen_at_delete == [{"a.txt": b"A", "sub/b.txt": b"B"}]
    assert _tree(target) == {"a.txt": b"A", "sub/b.txt": b"B"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # neither the stage nor the old dir is left


def test_replace_dir_failure_in_the_middle_keeps_the_old_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = _make(tmp_path / "out", {"old.txt": b"old"})
    new = _make(tmp_path / ".stage", {"a.txt": b"A"})
    real_rename = Path.rename
    calls: list[tuple[str, str]] = []

    def rename(self: Path, dest):
        calls.append((self.name, Path(dest).name))
        if self == new:  # the old dir is already moved aside when this fails
            raise OSError(errno.EIO, "simulated I/O error")
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        replace_dir(new, target)
    assert calls[0][0] == "out" and calls[0][1].startswith(".out.old-")  # it did get past the first rename
    assert _tree(target) == {"old.txt": b"old"}
    assert _tree(new) == {"a.txt": b"A"}  # the caller decides what to do with the stage
    assert sorted(p.name for p in tmp_path.iterdir()) == [".stage", "out"]


def test_replace_dir_refuses_files_and_strangers(tmp_path: Path) -> None:
    new = _make(tmp_path / ".stage", {"a.txt": b"A"})
    (tmp_path / "file").write_bytes(b"not a dir")
    with pytest.raises(NotADirectoryError, match="file"):
        replace_dir(new, tmp_path / "file")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ValueError, match="same folder"):
        replace_dir(new, tmp_path / "elsewhere" / "out")
    assert (tmp_path / "file").read_bytes() == b"not a dir" and _tree(new) == {"a.txt": b"A"}


def test_portable_path(tmp_path: Path) -> None:
    repo = tmp_path / "main"
    repo.mkdir()
    assert portable_path(repo / "docs" / "x.json", repo) == "docs/x.json"
    assert portable_path(tmp_path / "shared" / "data" / "eval", repo) == "../shared/data/eval"
    assert portable_path("data/samples", repo) == "data/samples"
    assert portable_path("/srv/photos", repo) == "/srv/photos"  # the user's own data, kept as given
    assert portable_path(tmp_path / "x", Path("/top")) == str(tmp_path / "x")  # never "../" up to the root
