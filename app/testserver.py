"""Start ``clipfp8 serve`` in a subprocess on a free loopback port (tests and the load test).

Used with the ``CLIPFP8_TEST_FAKE_ENCODER=1`` hook by default, so no model is needed.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from clipfp8.app.backend import FAKE_ENCODER_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent


class ServerStartError(RuntimeError):
    """The serve subprocess exited or did not answer in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"serve exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise ServerStartError(f"serve did not answer at {url} within {timeout:.0f} s")


@contextlib.contextmanager
def serve_subprocess(index_dir: Path, fake: bool = True, extra_args: Sequence[str] = (), cwd: Path | None = None,
                     log_file: Path | None = None, timeout: float = 120.0,
                     env_overrides: Mapping[str, str] | None = None) -> Iterator[str]:
    """Yield the base URL of a running ``serve``; the process is terminated (SIGTERM) on exit.
    ``env_overrides``: extra environment variables, e.g. ``GRADIO_TEMP_DIR`` to choose where the
    server's temp folder is created."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               GRADIO_ANALYTICS_ENABLED="False", **(env_overrides or {}))
    if fake:
        env[FAKE_ENCODER_ENV] = "1"
    cmd = [sys.executable, "-m", "clipfp8.app.cli", "serve", "--index-dir", str(index_dir), "--host", "127.0.0.1",
           "--port", str(port), *extra_args]
    out = open(log_file, "wb") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, cwd=cwd or REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/", proc, timeout)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if not isinstance(out, int):  # a log file we opened (DEVNULL is an int)
            out.close()
