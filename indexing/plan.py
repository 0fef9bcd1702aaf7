"""Incremental planning: compare a corpus scan with the database and decide what to do.

* same path, same size and mtime          -> unchanged (embedded only for encoders that lack it)
* same path, size or mtime differ         -> re-hashed; same hash: metadata update, else re-embed
* new path whose hash equals a vanished row -> a move (the row keeps its id and vectors)
* new path otherwise                      -> embed
* vanished rows not claimed by a move     -> removed, in the run's final commit (moves are only
  known once every new file was hashed)
* a bad file (error row), size and mtime the same -> kept as is, unless its reason is in
  ``retry`` (a limit it failed was raised since) or ``rehash`` is set
* with ``rehash``, an unchanged complete file is re-hashed too: an edit that restored the size and
  mtime is caught by its hash
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from clipfp8.indexing.scan import FileEntry, ScanResult


@dataclass
class Task:
    """A file to read. ``row`` is its current database row (None when new); ``needs`` the
    encoder names to embed it with when its content is (re-)embedded."""

    entry: FileEntry
    row: dict[str, Any] | None
    needs: set[str]
    skip_hashes: frozenset[str] = frozenset()


@dataclass
class Plan:
    tasks: list[Task] = field(default_factory=list)
    unchanged: int = 0
    vanished: dict[str, dict[str, Any]] = field(default_factory=dict)  # sha256 -> row (move sources)
    vanished_other: list[dict[str, Any]] = field(default_factory=list)  # error rows, incomplete rows
    scan_errors: list[tuple[bytes, str, dict[str, Any] | None]] = field(default_factory=list)


#: Reasons a file is refused by a limit, and the ``IndexConfig`` field of that limit.
LIMIT_REASONS: dict[str, str] = {"oversized": "max_pixels", "file_too_large": "max_file_bytes"}


def raised_limits(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> frozenset[str]:
    """The reasons whose limit is higher now than in the last run (``recorded``; a limit never
    recorded counts as raised): files refused for them deserve another try."""
    return frozenset(reason for reason, key in LIMIT_REASONS.items()
                     if key in current and current[key] > recorded.get(key, 0))


def _reason(row: dict[str, Any]) -> str:
    return (row["error"] or "").split(":", 1)[0]


def make_plan(scan: ScanResult, rows: dict[bytes, dict[str, Any]], embedded: dict[str, set[int]],
              rehash: bool = False, retry: frozenset[str] = frozenset()) -> Plan:
    """``rows``: path_raw -> image row; ``embedded``: encoder name -> ids having its vector.
    ``rehash``: re-hash unchanged files and retry every bad one; ``retry``: error reasons whose
    unchanged files are tried again."""
    plan = Plan()
    all_names = set(embedded)
    seen: set[bytes] = set()
    for f in scan.files:
        seen.add(f.rel)
        row = rows.get(f.rel)
        if row is None:
            plan.tasks.append(Task(f, None, set(all_names)))
            continue
        missing = {n for n, ids in embedded.items() if row["id"] not in ids}
        if row["size"] == f.size and row["mtime_ns"] == f.mtime_ns:
            if row["status"] == "error":
                if rehash or _reason(row) in retry:
                    plan.tasks.append(Task(f, row, set(all_names)))
                else:
                    plan.unchanged += 1
            elif missing:  # when re-hashing, a changed hash means every encoder's vector is stale
                plan.tasks.append(Task(f, row, set(all_names) if rehash else missing))
            elif rehash and row["sha256"]:  # the hash decides, as for a touched file
                plan.tasks.append(Task(f, row, set(all_names), frozenset([row["sha256"]])))
            else:
                plan.unchanged += 1
        else:  # maybe changed: the hash decides; an unchanged hash needs no decode
            same = frozenset([row["sha256"]]) if row["status"] == "ok" and not missing and row["sha256"] else frozenset()
            plan.tasks.append(Task(f, row, set(all_names), same))
    for rel, reason in scan.errors:
        seen.add(rel)
        row = rows.get(rel)
        if row is None or row["status"] != "error" or row["error"] != reason:
            plan.scan_errors.append((rel, reason, row))
        else:
            plan.unchanged += 1
    # A folder we cannot read is not a folder that is gone: keep what is stored under it (an
    # unreadable mount point must not empty the index).
    hidden = tuple(rel for rel, reason in scan.errors if reason.startswith("unreadable_dir"))
    for rel, row in rows.items():
        if rel in seen:
            continue
        if any(d == b"" or rel.startswith(d + b"/") for d in hidden):
            plan.unchanged += 1
            continue
        complete = all(row["id"] in ids for ids in embedded.values())
        if row["status"] == "ok" and complete and row["sha256"] and row["sha256"] not in plan.vanished:
            plan.vanished[row["sha256"]] = row
        else:
            plan.vanished_other.append(row)
    moves = frozenset(plan.vanished)
    for t in plan.tasks:
        if t.row is None:
            t.skip_hashes = moves
    return plan
