"""Pieces every command group shares: the parser class, value checks, exit codes, output suffixes, the
``--models`` option.

Usage errors (a bad value, a missing argument, a path that does not exist) exit 1 with one
``error:`` line, as every other refused input; exit 2 is reserved for "some items failed".
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

from ..errors import EmbedkitError, UsageError
from ..fs.atomic import current
from ..fs.outputs import in_the_way

EXIT_USAGE = 1
EXIT_FAILED_ITEMS = 2
EXIT_INCOMPLETE = 3  # extract --engine ray: planned items neither stored nor failed (workers lost); rerun
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)
OUTPUT_SUFFIXES = (".npy", ".parquet")
GLOB_CHARS = "*?["


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`UsageError` instead of exiting 2.

    Sub-parsers made with ``add_subparsers`` inherit the class, so every subcommand shares it;
    :func:`embedkit.cli.main` prints the usage line and ``error: ...`` and returns 1.
    """

    intermixed = False  # set on a sub-parser whose options may come between its positionals
    _intermixing = False

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}", usage=self.format_usage())

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        """With ``intermixed``, options may sit anywhere among the positionals, as users type:
        ``predict MODEL --proba "text"`` (plain argparse reads MODEL and an empty list of inputs
        at once, then refuses "text" as unrecognized)."""
        if self.intermixed and not self._intermixing:
            self._intermixing = True
            try:
                return self.parse_known_intermixed_args(args, namespace)
            finally:
                self._intermixing = False
        return super().parse_known_args(args, namespace)


def _number(kind: Callable[[str], Any], test: Callable[[Any], bool], wanted: str) -> Callable[[str], Any]:
    def check(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if value != value or not test(value):  # NaN never passes
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text}")
        return value

    check.__name__ = wanted  # argparse names the type in some messages
    return check


positive_int = _number(int, lambda v: v >= 1, "a positive integer (>= 1)")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")
non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
fraction = _number(float, lambda v: 0 < v < 1, "a fraction between 0 and 1 (exclusive)")


def folds(text: str) -> int:
    """``--cv``: 0 (off) or a number of folds >= 2."""
    value = _number(int, lambda v: v == 0 or v >= 2, "0 (no cross-validation) or a number of folds >= 2")(text)
    return int(value)


def existing_path(text: str) -> str:
    """A file or folder that exists."""
    if not os.path.exists(text):
        where = "" if os.path.isabs(text) else f" (relative paths are taken from {os.getcwd()})"
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder{where}")
    return text


def existing_file(text: str) -> str:
    """A file that exists."""
    if not os.path.isfile(existing_path(text)):
        raise argparse.ArgumentTypeError(f"{text} is a folder; a file is expected")
    return text


def existing_dir(text: str) -> str:
    """A folder that exists."""
    if not os.path.isdir(existing_path(text)):
        raise argparse.ArgumentTypeError(f"{text} is a file; a folder is expected")
    return text


def published_dir(marker: str) -> Callable[[str], str]:
    """A folder published whole (a saved model or index, holding ``marker``), or one whose
    replacement was interrupted between its two renames: the earlier version is put back first
    (:func:`embedkit.fs.atomic.current`), as ``load`` and ``search`` do, so the recovery the
    library promises is reachable from the command line too."""
    def check(text: str) -> str:
        if not os.path.exists(text) and text.strip():
            found = current(Path(text), marker)
            if found != Path(text) and os.path.isdir(found):  # a read-only folder: read where it lies
                return str(found)
        return existing_dir(text)

    return check


def existing_or_glob(text: str) -> str:
    """A file, a folder, or a glob pattern (checked for matches by the reader)."""
    if any(c in text for c in GLOB_CHARS) and not os.path.exists(text):
        return text
    return existing_path(text)


def labels_source(text: str) -> str:
    """``--labels``: ``folder`` or a table that exists."""
    return text if text == "folder" else existing_file(text)


def input_or_stdin(text: str) -> str:
    """``-`` (standard input) or a file that exists."""
    return text if text == "-" else existing_file(text)


MODEL_STORE_HELP = (
    "model store folder (default: $EMBEDKIT_HOME, else the user cache folder; "
    "`embedkit backbones` prints where it is); --store is the older spelling"
)


def model_store(text: str) -> str:
    """``--models DIR``: a folder, or a path where one can be made (a file in the way is named)."""
    blocker = Path(text) if os.path.lexists(text) and not os.path.isdir(text) else in_the_way(text)
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"{text}: {blocker} is a file, not a folder; give a model store folder")
    return text


def store_arg(p: argparse.ArgumentParser) -> None:
    """``--models DIR`` (alias ``--store``): the model store, stored in ``args.store``."""
    p.add_argument("--models", "--store", dest="store", metavar="DIR", type=model_store, help=MODEL_STORE_HELP)


def backbone_arg(p: argparse.ArgumentParser) -> None:
    """``--backbone`` of commands that read a feature store: default the store's only namespace."""
    p.add_argument("--backbone", default=None,
                   help="backbone name or digest prefix of the features to use (default: the store's only "
                   "backbone; when it holds several, the error lists them)")


def long_args(p: argparse.ArgumentParser, what: str = "use") -> None:
    """``--long``, ``--chunk-overlap``, ``--max-chunks`` of commands that read a feature store: which
    namespace, by how its texts were embedded (``extract --long chunk`` makes a namespace of its own)."""
    p.add_argument("--long", choices=["truncate", "chunk"], default=None,
                   help=f"{what} the namespace of long texts truncated (default) or chunked and pooled "
                   "(made by extract --long chunk); new texts are embedded the same way")
    p.add_argument("--chunk-overlap", type=non_negative_int, metavar="N",
                   help="with --long chunk: the namespace chunked with this overlap (when the store holds several)")
    p.add_argument("--max-chunks", type=positive_int, metavar="N",
                   help="with --long chunk: the namespace chunked with at most N windows (when the store holds several)")


def chunk_rows_arg(p: argparse.ArgumentParser, what: str) -> None:
    """``--chunk-rows`` of ``index`` and ``search``: the per-chunk rows of chunked texts, not their pooled vectors."""
    p.add_argument("--chunk-rows", action="store_true", default=None,
                   help=f"with --long chunk: {what} the per-chunk rows (made by extract --long chunk --chunk-rows), "
                   "one per window, so each match names its item, chunk and passage")


def variant_args(args: argparse.Namespace) -> dict[str, Any]:
    """The namespace a command asked for (``precision``, ``dimensions``, ``long``, ``chunk_overlap``,
    ``max_chunks``, ``chunk_rows``: whichever the command has), as :meth:`FeatureStore.find` takes it.

    Raises:
        UsageError: ``--chunk-overlap`` / ``--max-chunks`` / ``--chunk-rows`` without ``--long chunk``.
    """
    out: dict[str, Any] = {k: getattr(args, k) for k in ("precision", "dimensions") if getattr(args, k, None) is not None}
    long = getattr(args, "long", None) or "truncate"
    narrowed = [f"--{k.replace('_', '-')}" for k in ("chunk_overlap", "max_chunks") if getattr(args, k, None) is not None]
    if narrowed and long != "chunk":
        raise UsageError(f"{' and '.join(narrowed)} choose among chunked namespaces: add --long chunk")
    out["long"] = long
    if getattr(args, "chunk_rows", None):
        if long != "chunk":
            raise UsageError("--chunk-rows reads the per-chunk rows of chunked texts: add --long chunk")
        out["chunk_rows"] = True
    out.update({k: getattr(args, k) for k in ("chunk_overlap", "max_chunks") if getattr(args, k, None) is not None})
    return out


def namespace_of(features: str | Path, backbone: str | None, **variant: Any) -> Any:
    """The feature-store namespace a command works on: of ``backbone`` when given, else of the store's
    only backbone with vectors made as ``variant`` asks (precision, dimensions, long-text policy;
    default: plain float32 vectors of truncated texts).

    Raises:
        StoreError: no such namespace (the message lists what the store holds and the flags that ask
            for it), several backbones and no ``backbone``, or several namespaces that answer (the
            message says what tells them apart).
    """
    from ..heads.namespaces import find

    return find(features, backbone, style="cli", **variant)


@contextlib.contextmanager
def flag_errors(rewrite: Callable[[str], str]) -> Iterator[None]:
    """Re-raise a library error with ``rewrite(message)``: each command group names, in the user's
    flags, the Python parameters the library's messages name. Only a plain message is rewritten
    (not one an exception class formats itself from other arguments)."""
    try:
        yield
    except EmbedkitError as exc:
        message = str(exc)
        if exc.args == (message,):
            exc.args = (rewrite(message),)
        raise


@contextlib.contextmanager
def progress_bar(what: str, total: int | None, unit: str, enabled: bool = True) -> Iterator[Any]:
    """A tqdm bar on stderr (stdout may carry JSON); ``bar.update_to(done, total)`` is the library's
    ``progress`` callback."""
    from tqdm import tqdm

    # mininterval=0: these bars have few, slow steps; each one is drawn
    with tqdm(total=total, desc=what, unit=unit, file=sys.stderr, disable=not enabled, mininterval=0) as bar:
        def update_to(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        bar.update_to = update_to
        yield bar


# Lines Ray itself writes on the driver's stdout / stderr that say nothing about the run's outcome:
# its token-authentication banner, the C++ core worker's note on actor constructor arguments, the
# raylet's retry notices and "a worker died" paragraphs (embedkit reconciles what a dead worker
# was doing from its commit records and reports the result), and the logging of Ray's own threads.
RAY_NOISE = (
    "Token authentication is enabled for this Ray cluster",
    "has constructor arguments in the object store and max_restarts",
    "retries remaining, so the task will be retried",
    "A worker died or was killed while executing a task",
    "SIGTERM handler is not set because current thread is not the main thread",
    "(Ray deduplicates logs by default",
)
RAY_WORKER_DIED = "A worker died or was killed while executing a task"


@contextlib.contextmanager
def ray_output_filtered(enabled: bool = True) -> Iterator[dict[str, Any]]:
    """Keep Ray's own start-up and worker-died lines off the terminal while a Ray run goes on.

    File descriptors 1 and 2 (where Ray's C++ core, the raylet's error feed and the Ray processes
    started meanwhile write) go through a pipe; lines holding one of :data:`RAY_NOISE` are
    dropped (``counts["died"]`` is the number of "a worker died" notices), the rest reach stderr.
    ``terminal`` writes to stderr directly (for a progress bar, whose lines end in ``\r``).
    ``enabled=False`` (``-v``) leaves everything as it is.
    """
    counts = {"died": 0, "dropped": 0}
    if not enabled:
        yield {"counts": counts, "terminal": sys.stderr}
        return
    import threading

    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 1)
    os.dup2(write, 2)
    os.close(write)

    def pump() -> None:
        with os.fdopen(read, "rb") as lines:
            for line in lines:
                text = line.decode("utf-8", "replace")
                if any(noise in text for noise in RAY_NOISE):
                    counts["dropped"] += 1
                    counts["died"] += RAY_WORKER_DIED in text
                    continue
                with contextlib.suppress(OSError):
                    os.write(saved_err, line)

    thread = threading.Thread(target=pump, name="embedkit-ray-output", daemon=True)
    thread.start()
    terminal = os.fdopen(os.dup(saved_err), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                         errors="replace")
    try:
        yield {"counts": counts, "terminal": terminal}
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)  # the pipe closes once the Ray processes that inherited it are gone
        os.close(saved_out)
        thread.join(timeout=2)
        terminal.close()
