"""CUDA_DEVICE_MAX_CONNECTIONS: the CLI asks for one hardware queue per stream before CUDA starts,
keeps a user's value, and the device decoder explains what a low value costs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clipfp8.quant.core import cuda_env
from clipfp8.quant.core.cuda_env import (
    CONNECTIONS_ENV,
    CUDA_DEFAULT_CONNECTIONS,
    WANTED_CONNECTIONS,
    device_queues,
    queue_warning,
    widen_device_queues,
)


@pytest.mark.parametrize(("raw", "expected"), [
    (None, CUDA_DEFAULT_CONNECTIONS), ("", CUDA_DEFAULT_CONNECTIONS), ("abc", CUDA_DEFAULT_CONNECTIONS),
    ("0", CUDA_DEFAULT_CONNECTIONS), ("-3", CUDA_DEFAULT_CONNECTIONS), ("1", 1), (" 16 ", 16), ("32", 32),
    ("64", WANTED_CONNECTIONS),
])
def test_device_queues_reads_the_variable_as_cuda_does(raw: str | None, expected: int) -> None:
    env = {} if raw is None else {CONNECTIONS_ENV: raw}
    assert device_queues(env) == expected


def test_widen_sets_32_when_unset() -> None:
    env: dict[str, str] = {}
    assert widen_device_queues(env) is True
    assert env == {CONNECTIONS_ENV: str(WANTED_CONNECTIONS)}
    assert queue_warning(env) is None


def test_widen_keeps_the_users_value_and_warns_about_a_low_one() -> None:
    env = {CONNECTIONS_ENV: "1"}  # e.g. Megatron-style strict ordering, chosen on purpose
    assert widen_device_queues(env) is False
    assert env[CONNECTIONS_ENV] == "1"
    msg = queue_warning(env)
    assert msg is not None and f"{CONNECTIONS_ENV}=1" in msg and f"{CONNECTIONS_ENV}=32" in msg


def test_widen_leaves_the_process_alone_once_cuda_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONNECTIONS_ENV, raising=False)
    monkeypatch.setattr(cuda_env, "cuda_initialized", lambda: True)
    assert widen_device_queues() is False  # too late: CUDA read the variable already
    assert CONNECTIONS_ENV not in os.environ
    assert queue_warning() is not None


def test_cli_sets_the_variable_before_any_command_runs() -> None:
    code = ("import os, sys\n"
            "from clipfp8.app import cli\n"
            f"cli.build_parser = lambda: (_ for _ in ()).throw(SystemExit(os.environ.get({CONNECTIONS_ENV!r}, 'unset')))\n"
            "cli.main(['models'])\n")
    env = {k: v for k, v in os.environ.items() if k != CONNECTIONS_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stderr.strip().splitlines()[-1] == str(WANTED_CONNECTIONS)
    env[CONNECTIONS_ENV] = "4"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stderr.strip().splitlines()[-1] == "4"
