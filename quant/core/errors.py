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


class CaptionsError(DatasetError, CalibrationDataError):
    """A captions file (evaluation, calibration or the app's ground truth) is missing or malformed;
    the message names the file and, where it can, the line. It is both a ``DatasetError`` and a
    ``CalibrationDataError``, so each reader of ``quant.core.captions`` catches its own kind."""


class EngineError(QuantError):
    """A stored compiled engine (``quant.runtime.engine``) is unreadable or could not be built;
    the message names the file and how to rebuild it."""


class EngineMismatchError(EngineError):
    """A stored compiled engine was built for another GPU, torch/triton version or checkpoint;
    the message names each field that differs and the ``clipfp8 build-engine`` command that
    rebuilds it."""
