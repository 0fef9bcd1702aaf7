"""Exceptions raised by the ``quant`` package.

Library code raises these (never ``sys.exit``/``print``); the CLI turns them into a
one-line message and a non-zero exit code.
"""
from __future__ import annotations


class QuantError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelLoadError(QuantError):
    """A model could not be built or its weights could not be loaded (names the spec or file)."""


class CalibrationDataError(QuantError):
    """The calibration folder is missing, empty, or holds no decodable image."""


class AuditError(QuantError):
    """The coverage audit found a tower or the attention path silently left in high precision."""


class UnsupportedPrecisionError(QuantError):
    """The requested precision cannot run on this device (e.g. real FP8 without an sm_89+ GPU)."""


class DatasetError(QuantError):
    """An evaluation dataset folder, captions file or shard is missing or malformed."""
