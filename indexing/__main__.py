"""``python -m clipfp8.indexing CMD ...``: the indexing subcommands alone (no app import), with the same
error handling as ``clipfp8``. Used by the kill-and-resume tests."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from clipfp8.indexing import cli
from clipfp8.indexing.errors import IndexingError
from clipfp8.quant.core.cuda_env import widen_device_queues
from clipfp8.quant.core.errors import QuantError


def main(argv: Sequence[str] | None = None) -> int:
    widen_device_queues()  # before CUDA starts, as ``clipfp8`` does (quant/core/cuda_env.py)
    parser = argparse.ArgumentParser(prog="python -m clipfp8.indexing")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.register(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (IndexingError, QuantError, ValueError, OSError) as e:
        print(f"clipfp8 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
