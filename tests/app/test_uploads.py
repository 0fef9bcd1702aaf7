"""Upload limits, the temp-folder budget and cleanup (clipfp8.app.uploads), without a browser."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import clipfp8.app.uploads as U

MB = U.MB


class _Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_one_request_is_capped_for_all_its_files_together():
    budget = U.UploadBudget(U.UploadLimits())
    refusal = budget.admit("1.2.3.4", 5 * 9 * MB, temp_used=0)  # five 9 MB files, each under the 10 MB cap
    assert refusal.status == 413 and refusal.message == (
        "Upload refused: 45 MB in one upload; the limit is 10 MB per upload, all files together.")
    assert budget.admit("1.2.3.4", 9 * MB, temp_used=0) is None
    assert budget.admit("1.2.3.4", None, temp_used=0).status == 411


def test_uploads_per_client_and_window_are_limited():
    clock = _Clock()
    budget = U.UploadBudget(U.UploadLimits(max_uploads_per_window=3, max_bytes_per_window=5 * MB, window_s=60), clock)
    assert [budget.admit("a", MB, 0) for _ in range(3)] == [None] * 3
    refusal = budget.admit("a", MB, 0)
    assert refusal.status == 429 and "already 3 upload(s) in the last 60 s" in refusal.message
    assert budget.admit("b", MB, 0) is None  # another client has its own allowance
    clock.t += 61
    assert budget.admit("a", 4 * MB, 0) is None  # the window moved on
    refusal = budget.admit("a", 2 * MB, 0)
    assert refusal.status == 429 and "more than 5 MB uploaded in the last 60 s" in refusal.message


def test_the_temp_folder_budget_refuses_uploads_when_full():
    budget = U.UploadBudget(U.UploadLimits(temp_budget_bytes=100 * MB))
    refusal = budget.admit("a", 2 * MB, temp_used=99 * MB)
    assert refusal.status == 507 and "upload space is full" in refusal.message
    assert budget.admit("a", 2 * MB, temp_used=90 * MB) is None


@pytest.mark.parametrize("kwargs", [{"max_file_bytes": 0}, {"window_s": 0}, {"max_request_bytes": 1}])
def test_limits_validate(kwargs):
    with pytest.raises(ValueError, match="UploadLimits"):
        U.UploadLimits(**kwargs)


def _file(path: Path, size: int, age_s: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def test_sweep_deletes_old_files_and_empty_folders_only(tmp_path):
    space = U.TempSpace(tmp_path, U.UploadLimits(max_age_s=600))
    old = _file(tmp_path / "abc" / "old.png", 1000, age_s=700)
    fresh = _file(tmp_path / "def" / "fresh.webp", 500)
    assert space.usage() == 1500
    assert space.sweep() == 1000
    assert not old.exists() and not old.parent.exists() and fresh.exists()
    assert space.usage() == 500
    assert space.sweep(max_age_s=0) == 500 and not any(tmp_path.iterdir())


def test_consume_reads_an_upload_once_and_deletes_it(tmp_path):
    space = U.TempSpace(tmp_path / "root", U.UploadLimits(max_file_bytes=2000, max_request_bytes=4000))
    up = _file(tmp_path / "root" / "0f1e" / "cat.png", 100)
    assert space.consume(up) == b"x" * 100
    assert not up.exists() and not up.parent.exists()
    with pytest.raises(ValueError, match="upload is gone"):
        space.consume(up)
    big = _file(tmp_path / "root" / "aa" / "big.png", 3000)
    with pytest.raises(ValueError, match="larger than"):
        space.consume(big)
    assert not big.exists()  # refused uploads are deleted too
    outside = _file(tmp_path / "secret.png", 10)
    with pytest.raises(ValueError):
        space.consume(outside)
    space.discard(outside)
    assert outside.exists()  # never touches files outside its folder


def test_temp_dir_is_per_process_and_stale_ones_are_removed(tmp_path, monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{U.TEMP_PREFIX}{int(dead.stdout)}-old"
    live = tmp_path / f"{U.TEMP_PREFIX}{os.getpid()}-other"
    for d in (stale, live):
        _file(d / "x" / "upload.png", 10)
    monkeypatch.setattr(U, "_TEMP", None)
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    got = U.ensure_temp_dir(tmp_path)
    assert got.parent == tmp_path and got.name.startswith(f"{U.TEMP_PREFIX}{os.getpid()}-")
    assert os.environ["GRADIO_TEMP_DIR"] == str(got)
    assert not stale.exists() and live.exists()  # a running process keeps its folder
    assert U.ensure_temp_dir() == got  # once per process


def _run(app, path: str, length: int | None, body: bytes = b"", chunks: int = 1):
    """Send one POST through ``app``; -> (status, body, what the inner app received)."""
    headers = [(b"content-type", b"multipart/form-data; boundary=x")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers, "client": ("10.0.0.1", 5)}
    parts = [body[i::chunks] for i in range(chunks)] or [b""]
    inbox = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    sent: list[dict] = []

    async def receive():
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


class _Inner:
    """A stand-in for Gradio's app: reads the whole body, answers 200 with what it got."""

    def __init__(self) -> None:
        self.calls, self.got = 0, []

    async def __call__(self, scope, receive, send):
        self.calls += 1
        seen = []
        while True:
            message = await receive()
            seen.append(message["type"])
            if message["type"] == "http.disconnect" or not message.get("more_body"):
                break
        self.got.append(seen)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def test_guard_refuses_before_gradio_reads_a_byte(tmp_path):
    inner = _Inner()
    limits = U.UploadLimits(max_uploads_per_window=2)
    guard = U.UploadGuard(inner, U.UploadBudget(limits), U.TempSpace(tmp_path, limits))
    status, body = _run(guard, "/gradio_api/upload", 45 * MB)
    assert (status, inner.calls) == (413, 0) and body.startswith(b"Upload refused: 45 MB in one upload")
    assert _run(guard, "/gradio_api/upload", 100)[0] == 200
    assert _run(guard, "/gradio_api/process_recording", 100)[0] == 200  # the other upload route counts too
    status, body = _run(guard, "/gradio_api/upload", 100)
    assert status == 429 and b"wait a minute" in body and inner.calls == 2
    status, body = _run(guard, "/gradio_api/queue/join", 2 * MB)
    assert status == 413 and body == b"Request refused: its body is over 1 MB."


def test_guard_cuts_off_a_body_without_length_past_the_cap(tmp_path):
    inner = _Inner()
    limits = U.UploadLimits(max_body_bytes=1000)
    guard = U.UploadGuard(inner, U.UploadBudget(limits), U.TempSpace(tmp_path, limits))
    assert _run(guard, "/gradio_api/queue/join", None, b"y" * 3000, chunks=3)[0] == 200
    assert inner.got[-1] == ["http.request", "http.disconnect"]  # the second chunk crossed the cap
    assert _run(guard, "/gradio_api/upload", None)[0] == 411


def test_guard_sweeps_old_files_to_make_room(tmp_path):
    limits = U.UploadLimits(temp_budget_bytes=3 * MB)
    space = U.TempSpace(tmp_path, limits)
    old = _file(tmp_path / "a" / "old.webp", 2 * MB, age_s=120)
    guard = U.UploadGuard(_Inner(), U.UploadBudget(limits), space)
    assert _run(guard, "/gradio_api/upload", 2 * MB)[0] == 200 and not old.exists()
    _file(tmp_path / "b" / "new.webp", 2 * MB)
    status, body = _run(guard, "/gradio_api/upload", 2 * MB)
    assert status == 507 and b"upload space is full" in body
