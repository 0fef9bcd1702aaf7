"""``python -m clipfp8.quant.train SUBCOMMAND ...``: the training subcommands without the ``clipfp8``
console script (the GPU machine runs the source tree uninstalled)."""
from __future__ import annotations

import argparse
import logging
import sys

from clipfp8.quant.train import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipfp8.quant.train")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.register(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
