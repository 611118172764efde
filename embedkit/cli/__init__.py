"""The ``embedkit`` command: one thin sub-command per public function.

Commands are grouped by what they work on (``models``: backbones and artifacts; ``features``:
embedding and the feature store; ``heads``: heads, saved models and search). Imports stay
inside the commands so that ``embedkit --help`` never loads torch.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from ..errors import EmbedkitError, UsageError  # light: no heavy imports behind it
from . import features, finetune, heads, models, search, serve
from .common import EXIT_FAILED_ITEMS, EXIT_INTERRUPTED, EXIT_USAGE, OUTPUT_SUFFIXES, Parser

__all__ = ["COMMANDS", "EXIT_FAILED_ITEMS", "EXIT_USAGE", "OUTPUT_SUFFIXES", "build_parser", "main"]

GROUPS = (models, features, heads, finetune, search, serve)
COMMANDS = {name: fn for group in GROUPS for name, fn in group.COMMANDS.items()}


def build_parser() -> argparse.ArgumentParser:
    from ..models.store import describe_root

    parser = Parser(
        prog="embedkit", description="Frozen backbones -> ONNX -> fast embeddings.",
        # Raw: a long store path must print whole (copyable), not wrapped at its hyphens.
        epilog=f"model store: {describe_root()}\n(--models DIR on a command uses another)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 usage error or refused input, 2 items failed)."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(exc.usage.rstrip(), file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # Third-party progress bars (transformers' "Loading weights", huggingface_hub downloads) would
    # interleave with embedkit's own; the user can still turn them on by setting the variable.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(COMMANDS[args.command](args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: what the command started is stopped (finally blocks ran); no traceback
        print("error: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `embedkit ... | head`: the reader left; not an error of ours
        sys.stdout = open(os.devnull, "w")
        return 0
    except EmbedkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a disk that fills or a folder that turns read-only mid-run: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
