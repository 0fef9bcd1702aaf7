"""Reading image files for the indexer, without torch: bounded, hashed as read, and the header
check of the GPU path -- importable by reader processes cheaply (``GpuDecoder``'s
``read_processes``: a process pool that takes the readers' work off the issuing process's GIL).

``read_and_hash``: a file's bytes and sha256, at most ``max_bytes`` (special files refused from
``stat``, a lying size cannot blow up). ``read_for_device``: that plus the JPEG header check
(``jpeg_header.gpu_refusal``) for one file, as a picklable ``ReadResult``; ``read_many`` the same
for a list (one process-pool task).
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from clipfp8.indexing.config import DEFAULT_MAX_FILE_BYTES
from clipfp8.indexing.errors import DecodeError
from clipfp8.indexing.jpeg_header import gpu_refusal
from clipfp8.indexing.scan import special_file_kind

_CHUNK = 8 << 20  # read (and hash) size; one chunk holds any ordinary photo, so no join copy


def _os_error(e: OSError) -> DecodeError:
    if isinstance(e, PermissionError):
        return DecodeError("permission_denied", str(e))
    return DecodeError("symlink_loop" if e.errno == errno.ELOOP else "unreadable", str(e))


def _too_large(size: int, max_bytes: int, what: str = "") -> DecodeError:
    return DecodeError("file_too_large", f"{what}{size:,} bytes > the limit of {max_bytes:,} "
                                         "(--max-file-bytes)")


def check_file(path: Path, max_bytes: int) -> os.stat_result:
    """``stat`` (symlinks followed) without opening: raises ``DecodeError`` ``not_regular_file``
    for FIFOs, devices and sockets (opening a FIFO blocks), ``file_too_large`` above
    ``max_bytes``, or the reason of the ``OSError``."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise _os_error(e) from e
    if not stat.S_ISREG(st.st_mode):
        raise DecodeError("not_regular_file", special_file_kind(st.st_mode))
    if st.st_size > max_bytes:
        raise _too_large(st.st_size, max_bytes)
    return st


def _open_nonblocking(path: str, flags: int) -> int:
    # Should the file be swapped for a FIFO after check_file, opening must not block either.
    return os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))


def read_and_hash(path: Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> tuple[bytes, str]:
    """The file's bytes and their sha256 hex digest, read in chunks hashed as they arrive.
    Never reads more than ``max_bytes + 1`` bytes, whatever size ``stat`` reported. Raises
    ``DecodeError`` (``not_regular_file``, ``file_too_large``, ``permission_denied``,
    ``symlink_loop``, ``unreadable``)."""
    st = check_file(path, max_bytes)
    digest = hashlib.sha256()
    chunks: list[bytes] = []
    total = 0
    try:
        with open(path, "rb", buffering=0, opener=_open_nonblocking) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise DecodeError("not_regular_file", "replaced while being read")
            # First read sized by stat (one allocation, no copy for an honest size), then
            # chunks until EOF or the cap.
            want = min(st.st_size, max_bytes) + 1
            while True:
                chunk = f.read(want)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise _too_large(total, max_bytes, "read more than stat reported: at least ")
                digest.update(chunk)
                chunks.append(chunk)
                want = min(_CHUNK, max_bytes + 1 - total)
    except OSError as e:
        raise _os_error(e) from e
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return data, digest.hexdigest()


@dataclass(frozen=True)
class ReadJob:
    """One file for ``read_for_device``: its path and the limits of its ``ImageDecoder``;
    ``skip_hashes``: content already embedded (its bytes are then not kept)."""

    path: str
    skip_hashes: frozenset[str]
    max_file_bytes: int
    max_pixels: int
    max_aspect: float


@dataclass
class ReadResult:
    """What ``read_for_device`` found. ``data``: the JPEG bytes for the device, None when the
    content is skipped (``sha256`` in ``skip_hashes``), refused, or unreadable; ``height`` x
    ``width`` from its header; ``refusal``: why the device must not decode it (the CPU path
    takes it: e.g. ``cmyk``, ``oversized``, ``bad_header``); ``error``: why the file could not
    be read (the row's error, as ``str(DecodeError)``); ``unexpected``: the error was not a
    ``DecodeError`` (worth a warning); ``read_s``, ``header_s``: seconds of the steps that
    completed (None: did not); ``seconds``: the whole call."""

    sha256: str | None = None
    data: bytes | None = None
    height: int = 0
    width: int = 0
    refusal: str | None = None
    error: str | None = None
    unexpected: bool = False
    read_s: float | None = None
    header_s: float | None = None
    seconds: float = 0.0


def read_for_device(job: ReadJob) -> ReadResult:
    """Read + hash + header check of one file for the GPU path; never raises for a bad file."""
    res = ReadResult()
    t0 = time.perf_counter()
    try:
        data, res.sha256 = read_and_hash(Path(job.path), job.max_file_bytes)
        t1 = time.perf_counter()
        res.read_s = t1 - t0
        if res.sha256 not in job.skip_hashes:
            reason, head = gpu_refusal(data, job.max_pixels, job.max_aspect)
            res.header_s = time.perf_counter() - t1
            if reason is not None or head is None:
                res.refusal = reason or "bad_header"
            else:
                res.data, res.height, res.width = data, head.height, head.width
    except DecodeError as e:
        res.error = str(e)
    except Exception as e:  # one broken file must never stop the run
        res.error, res.unexpected = f"decode_failed: {type(e).__name__}: {e}", True
    res.seconds = time.perf_counter() - t0
    return res


def read_many(jobs: list[ReadJob]) -> list[ReadResult]:
    """``read_for_device`` of each job, in order (one task of a reader process)."""
    return [read_for_device(job) for job in jobs]


__all__ = ["ReadJob", "ReadResult", "check_file", "read_and_hash", "read_for_device", "read_many"]
