"""The ``embedkit`` command: one thin sub-command per public function.

Commands are grouped by what they work on (``models``: backbones and artifacts; ``features``:
embedding and the feature store; ``heads``: heads, saved models and search). Imports stay
inside the commands so that ``embedkit --help`` never loads torch.
"""
from __future__ import annotations

import argparse
import json
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
    # the commands that take --json: their refusals are JSON too, even when the line does not parse
    parser.json_commands = frozenset(name for name, p in sub.choices.items()  # type: ignore[attr-defined]
                                     if "--json" in p._option_string_actions)
    return parser


def _json_asked(parser: argparse.ArgumentParser, argv: Sequence[str]) -> bool:
    """Whether a command line that could not be parsed asked for ``--json`` (of a command that takes it)."""
    tokens = list(argv)
    tokens = tokens[:tokens.index("--")] if "--" in tokens else tokens
    commands = getattr(parser, "json_commands", frozenset())
    command = next((t for t in tokens if not t.startswith("-")), None)
    return "--json" in tokens and command in commands


def refusal(exc: BaseException, code: int, as_json: bool, usage: str = "") -> int:
    """Say why a command was refused (or stopped) and return its exit status ``code``: the usage line
    (when given) and one ``error:`` line on stderr, and with ``--json`` also, on stdout, one JSON
    object ``{"error": {"type": ..., "message": ..., "exit_code": ...}}`` (plus ``dependents``
    where the error names them), so a program reading stdout never gets plain text instead."""
    message = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else str(exc)
    if as_json:
        body: dict[str, object] = {"type": type(exc).__name__, "message": message, "exit_code": code}
        if isinstance(getattr(exc, "dependents", None), list):
            body["dependents"] = exc.dependents  # type: ignore[attr-defined]
        print(json.dumps({"error": body}, indent=2), flush=True)
    if usage:
        print(usage.rstrip(), file=sys.stderr)
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 usage error or refused input, 2 items failed).

    Refusals print one ``error:`` line on stderr; with ``--json`` they are also a JSON object on
    stdout (:func:`refusal`), with the same exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        return refusal(exc, EXIT_USAGE, _json_asked(parser, argv), exc.usage)
    # Third-party progress bars (transformers' "Loading weights", huggingface_hub downloads) would
    # interleave with embedkit's own; the user can still turn them on by setting the variable.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    as_json = bool(getattr(args, "json", False))
    try:
        code = int(COMMANDS[args.command](args) or 0)
        sys.stdout.flush()  # a closed pipe is found here, not at interpreter exit (a traceback there)
        return code
    except KeyboardInterrupt as exc:  # Ctrl-C: what the command started is stopped (finally blocks ran); no traceback
        return refusal(exc, EXIT_INTERRUPTED, as_json)
    except BrokenPipeError:  # `embedkit ... | head`: the reader left; not an error of ours
        try:  # what is still buffered for the closed pipe goes nowhere, as with Unix tools
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            sys.stdout = open(os.devnull, "w")
        return 0
    except EmbedkitError as exc:
        return refusal(exc, EXIT_USAGE, as_json)
    except OSError as exc:  # a disk that fills or a folder that turns read-only mid-run: one line, no traceback
        return refusal(exc, EXIT_USAGE, as_json)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
