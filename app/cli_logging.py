"""Logging for the console script: quiet by default, everything with ``-v``.

By default the user sees our own INFO lines (``clipfp8: ...``) and real warnings and errors;
third-party loggers speak from WARNING up, and a short list of known, harmless start-up
messages (FAISS's AVX loader probing, ModelOpt's "transformers X is not tested", torch's
"No CUDA runtime is found", the ``torch.jit.script`` deprecation) is dropped. ``-v`` shows
third-party INFO, our DEBUG and every warning; ``-vv`` shows DEBUG from everything.
"""
from __future__ import annotations

import logging
import sys
import warnings

OWN_LOGGER = "clipfp8"

#: (message regex, category) of warnings that every start prints and nobody can act on.
KNOWN_NOISE_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"transformers .* is not tested with current version of modelopt", UserWarning),
    (r"`torch\.jit\.script` is deprecated", FutureWarning),
    (r".*`torch\.jit\.script` is deprecated", DeprecationWarning),
)
#: Loggers whose WARNING lines are start-up noise on machines without CUDA (quiet mode only).
NOISY_LOGGERS: tuple[str, ...] = ("torch.utils.cpp_extension",)


class _TerseFormatter(logging.Formatter):
    """``clipfp8: message`` for our INFO; ``clipfp8: warning: ...`` for our warnings and errors;
    ``warning [library]: ...`` for other libraries' (so a user knows whose message it is)."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            msg += "\n" + self.formatException(record.exc_info)
        own = record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + ".")
        level = record.levelname.lower()
        if own:
            return f"clipfp8: {msg}" if record.levelno < logging.WARNING else f"clipfp8: {level}: {msg}"
        if record.name == "py.warnings":
            return f"{level}: {msg.strip()}"
        return f"{level} [{record.name.split('.')[0]}]: {msg}"


class _NotHandledElsewhere(logging.Filter):
    """Drops records that a library's own handler already printed (huggingface_hub, torch and
    transformers attach one to their root logger and still propagate): one line per message."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None and logger is not logging.root:
            if any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
                return False
            if not logger.propagate:
                return True
            logger = logger.parent
        return True


def configure_logging(verbosity: int = 0) -> logging.Handler:
    """Install the console script's stderr handler (replacing earlier ones) and warning filters;
    ``verbosity`` is the number of ``-v``. Returns the handler (tests inspect it)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_NotHandledElsewhere())
    logging.captureWarnings(False)  # re-install even when an earlier call left it on (tests)
    logging.captureWarnings(True)  # one log line per warning instead of two raw lines
    if verbosity <= 0:
        handler.setFormatter(_TerseFormatter())
        root.setLevel(logging.WARNING)
        logging.getLogger(OWN_LOGGER).setLevel(logging.INFO)
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        for pattern, category in KNOWN_NOISE_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=category)
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
        logging.getLogger(OWN_LOGGER).setLevel(logging.DEBUG)
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
    root.addHandler(handler)
    return handler


__all__ = ["configure_logging", "KNOWN_NOISE_WARNINGS", "NOISY_LOGGERS", "OWN_LOGGER"]
