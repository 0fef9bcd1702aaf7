"""Upload limits and temp-file hygiene for the app, without Gradio.

Gradio stores every upload (and every image it sends to the browser) under ``GRADIO_TEMP_DIR``
and caps only the size of each *file*. This module adds what it lacks:

* :func:`ensure_temp_dir` gives the process its own folder there (removed at exit, and folders
  left by dead processes are removed at start), so nothing outlives the server;
* :class:`UploadBudget` caps one request's total size, each client's uploads per time window,
  and the whole temp folder (:class:`TempSpace`), answering a short message for every refusal;
* :class:`UploadGuard`, an ASGI middleware, applies it before Gradio reads a byte, and caps the
  body of every other POST (event payloads are small JSON);
* :meth:`TempSpace.consume` reads an uploaded file once and deletes it.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MB = 1 << 20
TEMP_PREFIX = "clipfp8-gradio-"
#: POST routes that carry multipart uploads (Gradio's file upload and screen-recording routes).
UPLOAD_ROUTES = ("/upload", "/process_recording")
#: A refused request's body is read and dropped up to this size before the answer (see UploadGuard).
DRAIN_LIMIT = 128 * MB

Clock = Callable[[], float]


@dataclass(frozen=True)
class UploadLimits:
    """Every bound on uploads; sizes in bytes, times in seconds."""

    max_file_bytes: int = 10 * MB           # one file (Gradio's ``max_file_size``)
    max_request_bytes: int = 10 * MB + 64 * 1024  # one request, all its files plus multipart framing
    max_uploads_per_window: int = 20        # per client address
    max_bytes_per_window: int = 60 * MB     # per client address
    window_s: float = 60.0
    temp_budget_bytes: int = 256 * MB       # the whole temp folder: uploads + images sent to browsers
    max_age_s: float = 900.0                # older temp files are deleted
    max_body_bytes: int = 1 * MB            # any other POST (event payloads)

    def __post_init__(self) -> None:
        sizes = (self.max_file_bytes, self.max_request_bytes, self.max_bytes_per_window, self.temp_budget_bytes,
                 self.max_body_bytes)
        if min(sizes) < 1 or self.max_uploads_per_window < 1:
            raise ValueError(f"UploadLimits: sizes and counts must be >= 1, got {self}")
        if self.window_s <= 0 or self.max_age_s <= 0:
            raise ValueError(f"UploadLimits: window_s and max_age_s must be > 0, got {self.window_s}, {self.max_age_s}")
        if self.max_request_bytes < self.max_file_bytes:
            raise ValueError("UploadLimits: max_request_bytes must be >= max_file_bytes")


DEFAULT_LIMITS = UploadLimits()


@dataclass(frozen=True)
class Refusal:
    """An HTTP status and the one-line message the browser shows."""

    status: int
    message: str


def _mb(n: float) -> str:
    return f"{n / MB:.0f} MB" if n >= MB else f"{n / 1024:.0f} KB"


class TempSpace:
    """The process's temp folder: its size, sweeping of old files, and one-shot upload reads."""

    def __init__(self, root: Path, limits: UploadLimits = DEFAULT_LIMITS, clock: Clock = time.time) -> None:
        self.root, self.limits, self.clock = Path(root), limits, clock
        self._usage: tuple[float, int] | None = None
        self._last_sweep = 0.0
        self._lock = threading.Lock()

    def usage(self, max_stale_s: float = 1.0) -> int:
        """Bytes of the files under the root (re-measured at most every ``max_stale_s``)."""
        now = self.clock()
        if self._usage is None or now - self._usage[0] > max_stale_s:
            total = 0
            for dirpath, _, files in os.walk(self.root):
                for f in files:
                    try:
                        total += os.lstat(os.path.join(dirpath, f)).st_size
                    except OSError:
                        pass
            self._usage = (now, total)
        return self._usage[1]

    def reserve(self, nbytes: int) -> None:
        """Count an admitted upload in the cached usage until the next measurement."""
        if self._usage is not None:
            self._usage = (self._usage[0], self._usage[1] + nbytes)

    def sweep(self, max_age_s: float | None = None) -> int:
        """Delete files older than ``max_age_s`` (default ``limits.max_age_s``) and empty folders
        under the root; returns the bytes freed."""
        age = self.limits.max_age_s if max_age_s is None else max_age_s
        cutoff, freed = self.clock() - age, 0
        with self._lock:
            for dirpath, _dirs, files in os.walk(self.root, topdown=False):
                for f in files:
                    p = os.path.join(dirpath, f)
                    try:
                        st = os.lstat(p)
                        if st.st_mtime <= cutoff:
                            os.remove(p)
                            freed += st.st_size
                    except OSError:
                        pass
                if dirpath != str(self.root):
                    try:
                        os.rmdir(dirpath)  # only succeeds when empty
                    except OSError:
                        pass
            self._usage, self._last_sweep = None, self.clock()
        if freed:
            log.info("deleted %s of old temp files under %s", _mb(freed), self.root)
        return freed

    def maybe_sweep(self, every_s: float = 30.0) -> None:
        if self.clock() - self._last_sweep >= every_s:
            self.sweep()

    def consume(self, path: str | Path) -> bytes:
        """The bytes of an uploaded file, which is then deleted (with its folder, when empty).

        Refuses a path outside the root (``ValueError``): only Gradio's own uploads are read."""
        p = Path(path).resolve()
        if not p.is_relative_to(self.root.resolve()) or not p.is_file():
            raise ValueError("the upload is gone; upload the file again")
        try:
            if p.stat().st_size > self.limits.max_file_bytes:
                raise ValueError(f"the upload is larger than {_mb(self.limits.max_file_bytes)}")
            return p.read_bytes()
        finally:
            self.discard(p)

    def discard(self, path: str | Path) -> None:
        """Delete one file under the root, and its parent folder if that is now empty."""
        p = Path(path)
        if not p.resolve().is_relative_to(self.root.resolve()):
            return
        p.unlink(missing_ok=True)
        if p.parent.resolve() != self.root.resolve():
            try:
                p.parent.rmdir()
            except OSError:
                pass
        self._usage = None

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class UploadBudget:
    """Decides whether one upload request may proceed. Thread-safe; ``clock`` is injectable."""

    def __init__(self, limits: UploadLimits = DEFAULT_LIMITS, clock: Clock = time.monotonic) -> None:
        self.limits, self.clock = limits, clock
        self._recent: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def admit(self, client: str, nbytes: int | None, temp_used: int) -> Refusal | None:
        """None when the upload may go ahead (and it is then counted), else why not."""
        lim = self.limits
        if nbytes is None:
            return Refusal(411, "Upload refused: the request does not say its size (Content-Length).")
        if nbytes > lim.max_request_bytes:
            return Refusal(413, f"Upload refused: {_mb(nbytes)} in one upload; the limit is "
                                f"{_mb(lim.max_file_bytes)} per upload, all files together.")
        if temp_used + nbytes > lim.temp_budget_bytes:
            return Refusal(507, "Upload refused: the server's upload space is full; try again in a few minutes.")
        now = self.clock()
        with self._lock:
            recent = self._recent.setdefault(client, deque())
            while recent and recent[0][0] <= now - lim.window_s:
                recent.popleft()
            if len(recent) >= lim.max_uploads_per_window:
                return Refusal(429, f"Upload refused: already {len(recent)} upload(s) in the last "
                                    f"{lim.window_s:.0f} s; wait a minute and try again.")
            if sum(n for _, n in recent) + nbytes > lim.max_bytes_per_window:
                return Refusal(429, f"Upload refused: more than {_mb(lim.max_bytes_per_window)} uploaded in the "
                                    f"last {lim.window_s:.0f} s; wait a minute and try again.")
            recent.append((now, nbytes))
            if len(self._recent) > 1000:  # forget idle clients
                self._recent = {c: d for c, d in self._recent.items() if d and d[-1][0] > now - lim.window_s}
        return None


Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class UploadGuard:
    """ASGI middleware: uploads pass :class:`UploadBudget` first; any other POST body is capped."""

    def __init__(self, app: Any, budget: UploadBudget, space: TempSpace) -> None:
        self.app, self.budget, self.space = app, budget, space

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        raw_len = headers.get(b"content-length")
        length = int(raw_len) if raw_len and raw_len.isdigit() else None
        if scope.get("path", "").rstrip("/").endswith(UPLOAD_ROUTES):
            self.space.maybe_sweep()
            used = self.space.usage()
            if length is not None and used + length > self.budget.limits.temp_budget_bytes:
                self.space.sweep(max_age_s=60.0)  # make room from anything idle for a minute
                used = self.space.usage(max_stale_s=0.0)
            client = (scope.get("client") or ("?", 0))[0]
            refusal = self.budget.admit(client, length, used)
            if refusal is None and length is not None:
                self.space.reserve(length)
            cap = self.budget.limits.max_request_bytes
        else:
            cap = self.budget.limits.max_body_bytes
            refusal = (Refusal(413, f"Request refused: its body is over {_mb(cap)}.")
                       if length is not None and length > cap else None)
        if refusal is not None:
            log.info("refused %s from %s: %s", scope.get("path"), scope.get("client"), refusal.message)
            # Read (and drop) what the client is still sending, within bounds: answering while it
            # writes makes most clients see a connection reset instead of the message.
            await _drain(receive, DRAIN_LIMIT)
            await _plain(send, refusal)
            return
        await self.app(scope, _capped(receive, cap), send)


def _capped(receive: Receive, cap: int) -> Receive:
    """A ``receive`` that reports a disconnect once the body exceeds ``cap`` (chunked bodies)."""
    seen = 0

    async def wrapped() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > cap:
                return {"type": "http.disconnect"}
        return message
    return wrapped


async def _drain(receive: Receive, limit: int) -> None:
    """Consume a request body without keeping it, up to ``limit`` bytes."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body"):
            return


async def _plain(send: Send, refusal: Refusal) -> None:
    body = refusal.message.encode()
    await send({"type": "http.response.start", "status": refusal.status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


_TEMP: Path | None = None


def ensure_temp_dir(base: Path | None = None) -> Path:
    """This process's own folder for Gradio's files, created once and set as ``GRADIO_TEMP_DIR``.

    Created under ``base`` (default: the parent ``GRADIO_TEMP_DIR`` or the system temp folder);
    removed at interpreter exit. Folders of this kind left by processes that no longer run (a
    killed server) are removed first. Must run before any Gradio component is created.
    """
    global _TEMP
    if _TEMP is None:
        inherited = os.environ.get("GRADIO_TEMP_DIR")
        if base is None and inherited:
            # A child of a process that already set its own folder: share the parent's base.
            base = Path(inherited).parent if Path(inherited).name.startswith(TEMP_PREFIX) else Path(inherited)
        base = Path(base or tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        remove_stale_dirs(base)
        _TEMP = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=base))
        os.environ["GRADIO_TEMP_DIR"] = str(_TEMP)
        atexit.register(shutil.rmtree, _TEMP, True)
    _TEMP.mkdir(parents=True, exist_ok=True)
    return _TEMP


def remove_stale_dirs(base: Path) -> list[Path]:
    """Remove ``TEMP_PREFIX<pid>-*`` folders under ``base`` whose process is gone; returns them."""
    removed = []
    for d in base.glob(f"{TEMP_PREFIX}*"):
        pid = d.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if d.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
