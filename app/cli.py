"""The one console script, ``clipfp8``. Each package contributes thin subcommands that call
Python functions with the same parameter names; this module only assembles them and turns
library exceptions into a one-line error and a non-zero exit code."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

ERROR_EXIT = 2


def build_parser() -> argparse.ArgumentParser:
    from clipfp8.app import cli_app
    from clipfp8.indexing import cli as indexing_cli
    from clipfp8.quant import cli_quantize
    from clipfp8.quant.eval import cli as eval_cli
    from clipfp8.quant.runtime import cli as runtime_cli
    from clipfp8.quant.train import cli as train_cli

    parser = argparse.ArgumentParser(prog="clipfp8", description="FP8 CLIP image search")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (cli_quantize, eval_cli, runtime_cli, train_cli, indexing_cli, cli_app):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from clipfp8.indexing.errors import IndexingError
    from clipfp8.quant.core.errors import QuantError

    try:
        rc = args.func(args)
    except (QuantError, IndexingError, ValueError, OSError) as e:
        # OSError: permissions, missing files, a port in use, a full disk -- its message names
        # the file or address; a traceback would add nothing for the user (-v logs it).
        logging.getLogger("clipfp8").debug("command failed", exc_info=True)
        print(f"clipfp8 {args.command}: error: {e}", file=sys.stderr)
        return ERROR_EXIT
    except KeyboardInterrupt:
        print(f"clipfp8 {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
