"""Test-only crash points (documented in docs/indexing.md, inert unless the env var is set).

``CLIPFP8_TEST_PAUSE_AT="NAME:N"`` makes the N-th (1-based) arrival at checkpoint ``NAME``
create the file named by ``CLIPFP8_TEST_PAUSE_FILE`` and then sleep, so a test can SIGKILL the
process at exactly that moment. Checkpoints: ``commit:faiss_written`` (new FAISS files durable,
database not yet committed), ``commit:db_committed`` (committed, old files not yet deleted),
``pipeline:batch_embedded`` (a batch embedded, not yet committed).
``CLIPFP8_TEST_THROTTLE=SECONDS`` sleeps that long at every checkpoint, so a test can kill a
slowed-down run at an arbitrary moment.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

_counts: Counter[str] = Counter()


def checkpoint(name: str) -> None:
    throttle = os.environ.get("CLIPFP8_TEST_THROTTLE")
    if throttle:
        time.sleep(float(throttle))
    spec = os.environ.get("CLIPFP8_TEST_PAUSE_AT")
    if not spec:
        return
    _counts[name] += 1
    want, _, nth = spec.rpartition(":")
    if want == name and _counts[name] == int(nth):
        Path(os.environ["CLIPFP8_TEST_PAUSE_FILE"]).write_text(str(os.getpid()))
        while True:  # wait for the test's SIGKILL
            time.sleep(0.05)
