"""The ``embedkit`` command: one thin sub-command per public function.

Commands are grouped by what they work on (``models``: backbones and artifacts; ``features``:
embedding and the feature store; ``heads``: heads, saved models and search). Imports stay
inside the commands so that ``embedkit --help`` never loads torch.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from ..errors import EmbedkitError  # light: no heavy imports behind it
from . import features, heads, models, serve
from .common import EXIT_FAILED_ITEMS, OUTPUT_SUFFIXES

__all__ = ["COMMANDS", "EXIT_FAILED_ITEMS", "OUTPUT_SUFFIXES", "build_parser", "main"]

GROUPS = (models, features, heads, serve)
COMMANDS = {name: fn for group in GROUPS for name, fn in group.COMMANDS.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedkit", description="Frozen backbones -> ONNX -> fast embeddings.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(COMMANDS[args.command](args) or 0)
    except EmbedkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
