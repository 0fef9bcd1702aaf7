"""The one console script, ``clipfp8``. Each package contributes thin subcommands that call
Python functions with the same parameter names; this module only assembles them, sets up quiet
logging, and turns library exceptions into a one-line error naming CLI flags and a distinct
exit code (the table below, also in the README)."""
from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

#: The command did what was asked.
EXIT_OK = 0
#: The command ran and found a problem it reports (``verify``: index and database disagree);
#: also Python's code for an unexpected error, which prints a traceback.
EXIT_CHECK_FAILED = 1
#: Usage error: unknown or missing flags, a bad flag value, contradictory flags (argparse's 2).
EXIT_USAGE = 2
#: Bad input: a file, folder, index, model name/tag, checkpoint or config the command was
#: pointed at is missing, unreadable or invalid.
EXIT_BAD_INPUT = 3
#: The FP8 coverage audit failed: a tower or the attention path silently stayed high precision.
EXIT_AUDIT_FAILED = 4
#: Any other library error: disk full, index locked or corrupt, device unsupported, port in use.
EXIT_ERROR = 5
#: A one-shot command's output could not be written out at exit (a full disk): Python's own code.
EXIT_UNFLUSHED = 120
#: Interrupted (Ctrl+C) before it finished. serve, demo and index --watch stop with 0.
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = f"""\
exit codes: {EXIT_OK} ok, {EXIT_CHECK_FAILED} check failed (verify), {EXIT_USAGE} usage error, \
{EXIT_BAD_INPUT} bad input, {EXIT_AUDIT_FAILED} FP8 audit failed, {EXIT_ERROR} other error, \
{EXIT_UNFLUSHED} output not written, {EXIT_INTERRUPTED} interrupted"""

EPILOG = f"""\
Start with `clipfp8 demo`; `clipfp8 COMMAND --help` describes a command. --model takes 'default'
(the embedded model), an open_clip name with --pretrained TAG (see `clipfp8 models`) or
--checkpoint FILE.safetensors, or a JSON open_clip config. The train-* commands (listed last)
are maintainer tools that rebuild the embedded default model. -v shows all library logs.

{EXIT_CODES_HELP}"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's default shown, also for options
    without help text (but not None/False/empty defaults, which say nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default in (None, False, argparse.SUPPRESS) or default == []:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
            text = f"{text} (default: {shown})".strip()
        return text


class Parser(argparse.ArgumentParser):
    """Every (sub)command parser: the same help formatter everywhere."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)


def _show_defaults(p: argparse.ArgumentParser) -> None:
    """argparse prints nothing for an option without help text, not even its default: give
    those a help text that is just their default."""
    for action in p._actions:
        meaningful = action.default not in (None, False, argparse.SUPPRESS) and action.default != []
        if action.help is None and meaningful and action.option_strings:
            action.help = "(default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from clipfp8.app import cli_app, cli_bench
    from clipfp8.indexing import cli as indexing_cli
    from clipfp8.quant import cli as quant_cli
    from clipfp8.quant import cli_quantize
    from clipfp8.quant.eval import cli as eval_cli
    from clipfp8.quant.runtime import cli as runtime_cli
    from clipfp8.quant.train import cli as train_cli

    parser = Parser(prog="clipfp8", epilog=EPILOG,
                    description="FP8 CLIP image search: quantize a CLIP to FP8, index image folders, search them, "
                                "serve the side-by-side app.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="show library logs (-vv: debug logs of everything)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands",
                                parser_class=Parser)
    for module in (cli_quantize, eval_cli, runtime_cli, quant_cli):
        module.register(sub)
    indexing_cli.register(sub)
    cli_app.register(sub)
    cli_bench.register(sub)  # the shipped-path benchmark: runs every layer, so it sits in the app
    train_cli.register(quant_cli.maintainer_commands(sub))  # train-*: last in the listing
    for p in sub.choices.values():
        p.set_defaults(command_parser=p)  # errors print the command's own usage and flags
        _show_defaults(p)
        try:  # also accepted after the command: `clipfp8 search ... -v`
            p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                           help="show library logs (-vv: debug logs of everything)")
        except argparse.ArgumentError:  # the command has its own -v
            pass
    return parser


def exit_code_for(exc: BaseException) -> int:
    """The exit code of an exception that ended a command (see the EXIT_* constants)."""
    from clipfp8.indexing.errors import IndexCorruptError, IndexingError, IndexLockedError, StorageError
    from clipfp8.quant.cli import CLIUsageError
    from clipfp8.quant.core.errors import AuditError, QuantError, UnsupportedPrecisionError

    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, AuditError):
        return EXIT_AUDIT_FAILED
    if isinstance(exc, (IndexLockedError, StorageError, IndexCorruptError, UnsupportedPrecisionError)):
        return EXIT_ERROR
    if isinstance(exc, (CLIUsageError, ValueError)):
        return EXIT_USAGE  # configs validate flag values in __post_init__ (ValueError)
    if isinstance(exc, (QuantError, IndexingError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                        PermissionError, FileExistsError)):
        return EXIT_BAD_INPUT
    return EXIT_ERROR


#: Config fields whose flag is not simply ``--field-name``.
FLAG_ALIASES = {("CalibConfig", "batch_size"): "--calib-batch-size", ("EncoderSpec", "quantized"): "--quantized"}
_FIELD = re.compile(r"\b([A-Z]\w*(?:Spec|Config))\.(\w+)")
_PREFIX = re.compile(r"^([A-Z]\w*(?:Spec|Config)): ")
_QUOTED = re.compile(r"'([a-z_]+)'")


def flag_message(message: str, parser: argparse.ArgumentParser | None) -> str:
    """A config's ValueError message with its field names replaced by the command's flags
    (``IndexConfig.max_pixels`` -> ``--max-pixels``; ``EncoderSpec: ... 'quantized'`` ->
    ``... --quantized``); fields without a flag stay as they are."""
    flags = set(parser._option_string_actions) if parser is not None else set()

    def flag(cls: str, name: str) -> str | None:
        f = FLAG_ALIASES.get((cls, name), "--" + name.replace("_", "-"))
        return f if f in flags else None

    out = _FIELD.sub(lambda m: flag(m[1], m[2]) or m[0], message)
    prefix = _PREFIX.match(out)
    if prefix:
        cls = prefix[1]
        out = _QUOTED.sub(lambda m: flag(cls, m[1]) or m[0], out[prefix.end():])
    return out


def _report(exc: BaseException, command: str, sub_parser: argparse.ArgumentParser | None) -> int:
    from clipfp8.quant.cli import CLIUsageError

    code = exit_code_for(exc)
    logging.getLogger("clipfp8").debug("command failed", exc_info=True)
    if isinstance(exc, KeyboardInterrupt):
        print(f"\nclipfp8 {command}: interrupted", file=sys.stderr)
        return code
    message = flag_message(str(exc), sub_parser) if isinstance(exc, ValueError) else str(exc)
    if isinstance(exc, CLIUsageError) and sub_parser is not None:
        sub_parser.print_usage(sys.stderr)
    print(f"clipfp8 {command}: error: {message}", file=sys.stderr)
    return code


#: Commands that load a model, answer and exit: Python's cyclic garbage collector stays off for
#: them. Importing torch and open_clip and building a model make hundreds of thousands of
#: objects, and every full collection walks all of them again: with it off a cold `clipfp8
#: search` on a ViT-L-14 index took about 0.5 s less of ~5.5 s on the 2-core CPU (docs/benchmarks.md).
#: Memory is still freed by reference counting; other commands get the collector back once parsed.
ONE_SHOT_COMMANDS = frozenset({"search"})


#: The command the last ``main`` call ran (``console_main`` reads it).
_last_command: str | None = None


def console_main(argv: Sequence[str] | None = None) -> int:
    """The ``clipfp8`` console script: ``main``, then, after a one-shot command, the process ends
    at once (``os._exit``, output flushed) instead of tearing the interpreter down: freeing the
    model, torch's and open_clip's modules object by object took 0.93 s of a 2.77 s cold
    `clipfp8 search` on the 2-core CPU (docs/benchmarks.md). Nothing is left to do then: the
    index is closed and every file written, and the OS reclaims memory and the GPU context."""
    rc = main(argv)
    if _last_command in ONE_SHOT_COMMANDS and _fast_exit_allowed():
        for stream in (sys.stdout, sys.stderr):
            if stream is None:  # started with the descriptor closed (`1>&-`)
                continue
            try:
                stream.flush()
            except BrokenPipeError:  # a reader that went away (`| head`): as usual, not an error
                pass
            except (OSError, ValueError):  # output lost (a full disk...): fail as Python's shutdown does
                rc = rc or EXIT_UNFLUSHED
        logging.shutdown()
        os._exit(rc)
    return rc


#: ``CLIPFP8_FAST_EXIT=0`` keeps the normal interpreter shutdown after one-shot commands.
FAST_EXIT_ENV = "CLIPFP8_FAST_EXIT"


def _fast_exit_allowed() -> bool:
    """Not when the user turned it off, nor under a profiler, tracer or coverage run: they write
    their results at exit (atexit), which ``os._exit`` skips."""
    if os.environ.get(FAST_EXIT_ENV, "1") == "0":
        return False
    return sys.getprofile() is None and sys.gettrace() is None and "coverage" not in sys.modules


def main(argv: Sequence[str] | None = None) -> int:
    collecting = gc.isenabled()
    gc.disable()  # through the imports of parsing (build_parser imports torch)
    try:
        return _main(argv, collecting)
    finally:
        if collecting:
            gc.enable()


def _main(argv: Sequence[str] | None, collecting: bool) -> int:
    from clipfp8.quant.core.cuda_env import widen_device_queues

    # Before anything starts CUDA: one hardware queue per stream, so nvJPEG's decodes do not
    # queue behind the encoder's kernels (quant/core/cuda_env.py has the measurement).
    widen_device_queues()
    parser = build_parser()
    args = parser.parse_args(argv)
    global _last_command
    _last_command = args.command
    if collecting and args.command not in ONE_SHOT_COMMANDS:
        gc.enable()
    from clipfp8.app.cli_logging import configure_logging

    configure_logging(args.verbose)
    sub_parser = getattr(args, "command_parser", None)
    from clipfp8.indexing.errors import IndexingError
    from clipfp8.quant.cli import CLIUsageError
    from clipfp8.quant.core.errors import QuantError

    try:
        rc = args.func(args)
    except (QuantError, IndexingError, CLIUsageError, ValueError, OSError, KeyboardInterrupt) as e:
        # OSError: permissions, missing files, a port in use, a full disk -- its message names
        # the file or address; a traceback would add nothing for the user (-v logs it).
        return _report(e, args.command, sub_parser)
    return int(rc or 0)


__all__ = ["main", "console_main", "build_parser", "exit_code_for", "flag_message", "EXIT_OK", "EXIT_CHECK_FAILED",
           "EXIT_UNFLUSHED",
           "EXIT_USAGE", "EXIT_BAD_INPUT", "EXIT_AUDIT_FAILED", "EXIT_ERROR", "EXIT_INTERRUPTED"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(console_main())
