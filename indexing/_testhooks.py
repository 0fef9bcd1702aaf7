"""Test-only crash points (documented in docs/indexing.md, inert unless the env var is set).

``CLIPFP8_TEST_PAUSE_AT="NAME:N"`` makes the N-th (1-based) arrival at checkpoint ``NAME``
create the file named by ``CLIPFP8_TEST_PAUSE_FILE`` and then sleep, so a test can SIGKILL the
process at exactly that moment. Checkpoints: ``commit:faiss_written`` (new FAISS files durable,
database not yet committed), ``commit:db_committed`` (committed, old files not yet deleted),
``pipeline:batch_embedded`` (a batch embedded, not yet committed), ``ray:batch_embedded`` (a Ray
actor embedded a batch, not yet handed back).
``CLIPFP8_TEST_EXIT_AT="NAME:N"`` with ``CLIPFP8_TEST_EXIT_MARKER=FILE``: the N-th arrival at
``NAME`` ends the process at once (``os._exit``) unless FILE exists, which it creates first, so
the restarted process (a Ray actor) gets past it: a worker that dies once, mid-run.
``CLIPFP8_TEST_THROTTLE=SECONDS`` sleeps that long at every checkpoint, so a test can kill a
slowed-down run at an arbitrary moment.
The Ray engine hands the driver's ``CLIPFP8_TEST_*`` variables to its actors (``forwarded_env``).
"""
from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

_counts: Counter[str] = Counter()
_lock = threading.Lock()  # a Ray actor reaches its checkpoints from two threads
PREFIX = "CLIPFP8_TEST_"
#: The exit status of a process ended by ``CLIPFP8_TEST_EXIT_AT``.
EXIT_STATUS = 70


def _reached(spec: str, name: str, count: int) -> bool:
    want, _, nth = spec.rpartition(":")
    return want == name and count == int(nth)


def checkpoint(name: str) -> None:
    throttle = os.environ.get("CLIPFP8_TEST_THROTTLE")
    if throttle:
        time.sleep(float(throttle))
    pause, crash = os.environ.get("CLIPFP8_TEST_PAUSE_AT"), os.environ.get("CLIPFP8_TEST_EXIT_AT")
    if not (pause or crash):
        return
    with _lock:
        _counts[name] += 1
        count = _counts[name]
    if pause and _reached(pause, name, count):
        Path(os.environ["CLIPFP8_TEST_PAUSE_FILE"]).write_text(str(os.getpid()))
        while True:  # wait for the test's SIGKILL
            time.sleep(0.05)
    if crash and _reached(crash, name, count):
        marker = Path(os.environ["CLIPFP8_TEST_EXIT_MARKER"])
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(EXIT_STATUS)  # no cleanup, no exception: as if the process was killed


def forwarded_env() -> dict[str, str]:
    """This process's ``CLIPFP8_TEST_*`` variables (empty outside tests)."""
    return {k: v for k, v in os.environ.items() if k.startswith(PREFIX)}
