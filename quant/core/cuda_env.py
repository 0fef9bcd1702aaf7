"""CUDA settings a process must make before CUDA initialises in it.

``CUDA_DEVICE_MAX_CONNECTIONS`` is the number of hardware work queues CUDA maps a process's
streams onto (CUDA's default: 8). Streams beyond that share queues, and work on a shared queue
runs in submission order across those streams. nvJPEG's hardware decoder drives a dozen internal
streams, so with 8 queues some of them share one with the encoder's stream, and the decode waits
behind every encoder kernel queued before it, whatever the streams' priorities. Measured on the
H200 (2026-12-04, probe: 256 JPEGs of 500x375 decoded by ``torchvision.io.decode_jpeg`` beside a
running ViT-L-sized encode, batch 256): 390 ms a decode beside fp16 and 250 ms beside fp8 with 8
queues (1.9 s when three encode batches were queued), 18 and 13 ms with 32, 11 ms alone.
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

CONNECTIONS_ENV = "CUDA_DEVICE_MAX_CONNECTIONS"
#: What CUDA uses when the variable is unset.
CUDA_DEFAULT_CONNECTIONS = 8
#: CUDA's maximum: every stream the indexer, nvJPEG and the encoders use gets its own queue.
WANTED_CONNECTIONS = 32
#: Fewer than this and the device decode is likely to queue behind the encoder.
ENOUGH_CONNECTIONS = 16


def cuda_initialized() -> bool:
    """Whether CUDA is initialised in this process (without importing torch for the answer)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except AttributeError:  # a partially imported torch
        return False


def device_queues(environ: MutableMapping[str, str] | None = None) -> int:
    """The ``CUDA_DEVICE_MAX_CONNECTIONS`` a process starting CUDA now would get (8 when unset or
    not a positive integer, as CUDA reads it; values above 32 are clamped by CUDA to 32)."""
    env = os.environ if environ is None else environ
    raw = env.get(CONNECTIONS_ENV, "").strip()
    try:
        value = int(raw)
    except ValueError:
        return CUDA_DEFAULT_CONNECTIONS
    return min(value, WANTED_CONNECTIONS) if value > 0 else CUDA_DEFAULT_CONNECTIONS


def widen_device_queues(environ: MutableMapping[str, str] | None = None) -> bool:
    """Ask CUDA for one hardware queue per stream (``CUDA_DEVICE_MAX_CONNECTIONS=32``) unless
    the variable is set already (a user's choice is kept). Call it before CUDA initialises: the
    ``clipfp8`` CLI does at start, Ray's indexing actors before they build an encoder. Returns
    whether this process will run with at least ``ENOUGH_CONNECTIONS`` queues."""
    env = os.environ if environ is None else environ
    if CONNECTIONS_ENV not in env:
        if environ is None and cuda_initialized():
            log.debug("CUDA is initialised already: %s left unset", CONNECTIONS_ENV)
            return False
        env[CONNECTIONS_ENV] = str(WANTED_CONNECTIONS)
    return device_queues(env) >= ENOUGH_CONNECTIONS


def queue_warning(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Why a device decode beside an encoder will be slow in this process, or None."""
    n = device_queues(environ)
    if n >= ENOUGH_CONNECTIONS:
        return None
    return (f"{CONNECTIONS_ENV}={n}: nvJPEG's streams share CUDA's hardware queues with the encoder's "
            f"and each decode waits behind the queued encode batches; start the process with "
            f"{CONNECTIONS_ENV}={WANTED_CONNECTIONS} (the clipfp8 CLI sets it unless it is set)")


__all__ = ["CONNECTIONS_ENV", "CUDA_DEFAULT_CONNECTIONS", "WANTED_CONNECTIONS", "ENOUGH_CONNECTIONS",
           "cuda_initialized", "device_queues", "widen_device_queues", "queue_warning"]
