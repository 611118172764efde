"""Output targets: what a command may write, checked before any work starts.

Every writer (``embed --out``, ``extract --out``, ``index --out``, ``train-head --out``,
``report --out``, :func:`embedkit.save`, :func:`embedkit.save_index`, :func:`embedkit.extract`,
:func:`embedkit.train_head`) calls :func:`check_output` first. It refuses, with a typed error
(exit 1 on the command line):

- a target whose folder does not exist, or is a file (:class:`OutputFolderMissingError`, naming the
  file in the way: ``--out afile/x`` where ``afile`` is a file says so);
- a target that is one of the inputs, holds one, or lies inside one (:class:`OutputIsInputError`);
- a target that exists and is not an earlier embedkit output of the same kind
  (:class:`OutputExistsError`), so embedkit never replaces what it did not write.

embedkit recognises its own outputs by what it writes into them: a marker file with a ``kind``
field (``model.json``, ``index.json``, ``report.json`` of a train-head run,
``learning_curve.json`` of a report), the ``embedkit.digest`` schema metadata of an embeddings
Parquet file, the file identity (device, inode, size, mtime) of an embeddings ``.npy`` recorded
in the user's journal of written files (``<model store>/outputs/``: a ``.npy`` header has no room
for metadata, and a run with no failures writes no ``.errors.jsonl`` beside it), the ``namespace.json``
files of a feature store. An earlier output that holds files embedkit did not write is refused
too: replacing it would delete them. An empty folder holds nothing to lose and may be used.
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any, Iterable

from ..errors import OutputError, OutputExistsError, OutputFolderMissingError, OutputIsInputError
from .atomic import debris_of, write_atomic
from .home import default_root

# kind -> the marker file embedkit writes into a folder output of that kind
MARKERS = {"model": "model.json", "index": "index.json", "train-head": "report.json", "report": "learning_curve.json",
           "checkpoints": "checkpoint.json", "finetune": "finetune.json"}
KINDS = ("embeddings", "feature-store", *MARKERS)
# files a folder output holds besides its marker (model and index folders list theirs in the marker)
_FIXED = {"train-head": {"confusion.png", "model"}, "report": {"learning_curve.csv", "learning_curve.png"},
          "checkpoints": {"last.safetensors", "best.safetensors", "metrics.json", "checkpoint.lock"},
          "finetune": {"model", "checkpoints", "metrics.json", "failures.jsonl", "finetune.lock"}}
_LOCKS = {"finetune.lock", "checkpoint.lock"}  # writer locks (embedkit.fs.locks.owned) of the fine-tune folders
NAMES = {"embeddings": "embeddings file", "feature-store": "feature store", "model": "saved model",
         "index": "search index", "train-head": "train-head output folder", "report": "report folder",
         "checkpoints": "checkpoint folder", "finetune": "finetune output folder"}


def stamp(kind: str) -> dict[str, Any]:
    """The ``kind`` field a writer puts into its marker file."""
    return {"kind": kind}


def _journal(path: Path) -> Path:
    import hashlib

    key = hashlib.sha256(os.fsencode(os.path.abspath(path))).hexdigest()[:32]
    return default_root() / "outputs" / f"{key}.json"


def _identity(path: Path) -> list[int]:
    info = os.stat(path)
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns]


def remember(tmp: Path, final: Path) -> None:
    """Record that the file ``tmp``, about to be renamed to ``final``, is embedkit's own output.

    A rename keeps device, inode, size and mtime, so the record made before the rename matches
    the file after it; the last few identities are kept, so a crash before the rename leaves the
    earlier output recognised too. A journal that cannot be written only means the file will not
    be replaced without being moved away first (logged, never raised).
    """

    journal = _journal(final)
    try:
        old = (_json(journal) or {}).get("identities", [])
        entry = {"path": os.path.abspath(final), "identities": [*old[-3:], _identity(tmp)]}
        journal.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(journal, json.dumps(entry).encode())
    except OSError as exc:
        import logging

        logging.getLogger(__name__).warning("could not record %s as embedkit's output (%s)", final, exc)


def _remembered(path: Path) -> bool:
    entry = _json(_journal(path)) or {}
    try:
        return entry.get("path") == os.path.abspath(path) and _identity(path) in entry.get("identities", [])
    except OSError:
        return False


def errors_path(out: Path) -> Path:
    """The per-item error records written beside an ``embed`` output."""
    return out.with_name(out.name + ".errors.jsonl")


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def foreign_entries(path: Path, kind: str) -> list[str] | None:
    """The entries of folder ``path`` that an earlier output of ``kind`` would not hold, or
    None when ``path`` is not such an output at all (no marker of that kind)."""
    entries = sorted(p.name for p in path.iterdir())
    if set(entries) <= _LOCKS:  # empty, or a run that stopped right after taking its writer lock
        return []
    if kind == "feature-store":
        if not any(path.glob("*/*/namespace.json")):
            return None
        return []  # extract only adds namespaces; it never removes what else a store folder holds
    marker = MARKERS[kind]
    meta = _json(path / marker) if marker in entries else None
    if meta is None:
        if kind == "report" and set(entries) <= _FIXED["report"]:  # written before report had a marker
            return []
        return None
    legacy = {  # outputs written before markers had a kind field ("kind" then named an index's type)
        "model": {"format", "backbone", "head"} <= meta.keys() and "kind" not in meta,
        "index": {"format", "files", "metric"} <= meta.keys() and meta.get("kind") in (None, "flat", "hnsw", "ivfpq"),
        "train-head": {"head", "accuracy", "macro_f1"} <= meta.keys() and "kind" not in meta,
        "report": False, "checkpoints": False, "finetune": False,
    }[kind]
    if meta.get("kind") != kind and not legacy:
        return None
    if kind == "model":
        allowed = set((meta.get("head") or {}).get("files") or {})
    elif kind == "index":
        allowed = set(meta.get("files") or {})
    else:
        allowed = set(_FIXED[kind])  # a copy: "|=" below must not grow the table
    allowed |= {marker}
    foreign = [e for e in entries if e not in allowed and all(debris_of(e, a) is None for a in allowed)]
    for sub, sub_kind in (("model", "model"), ("checkpoints", "checkpoints")):
        if kind in ("train-head", "finetune") and sub in entries and sub in _FIXED[kind]:
            # the folder inside is replaced with it: files of yours in it count too
            inner_path = path / sub
            inner = foreign_entries(inner_path, sub_kind) if inner_path.is_dir() and not inner_path.is_symlink() else None
            foreign += [sub] if inner is None else [f"{sub}/{e}" for e in inner]
    return foreign


def _embeddings_file(path: Path) -> bool:
    """Whether ``path`` is an ``embed`` output (checked by content, never by name alone)."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            with open(path, "rb") as f:  # a file object: pyarrow cannot name non-UTF-8 paths
                metadata = pq.read_schema(f).metadata or {}
        except Exception:  # not a Parquet file at all
            return False
        return b"embedkit.digest" in metadata
    if path.suffix == ".npy":
        if not (_remembered(path) or (errors_path(path).is_file() and _errors_file(errors_path(path)))):
            return False
        try:
            import numpy as np

            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return False
        return array.ndim == 2 and array.dtype in (np.float32, np.int8, np.uint8)  # float32 or compact rows
    return False


def _errors_file(path: Path) -> bool:
    """Whether ``path`` holds embed's error records (JSON lines with index and code) or nothing."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if not isinstance(record, dict) or "index" not in record or "code" not in record:
                    return False
    except (OSError, ValueError):
        return False
    return True


def is_output(path: str | os.PathLike[str], kind: str) -> bool:
    """Whether ``path`` is an earlier embedkit output of ``kind`` that may be replaced (or added to)."""
    path = Path(path)
    if kind == "embeddings":
        return path.is_file() and not path.is_symlink() and _embeddings_file(path)
    if not path.is_dir() or (path.is_symlink() and kind != "feature-store"):
        return False
    return foreign_entries(path, kind) == []


def _input_root(value: Any) -> Path | None:
    """The path an input occupies: a file or folder, or the folder a glob pattern searches."""
    if not isinstance(value, (str, os.PathLike)):
        return None  # an in-memory iterable
    text = os.fspath(value)
    if glob.has_magic(text):
        head = text[:min(text.index(c) for c in "*?[" if c in text)]
        text = head if head.endswith(os.sep) or head.endswith("/") else os.path.dirname(head)
        text = text or "."
    return Path(text)


def _relation(out: Path, inp: Path) -> str | None:
    o, i = out.resolve(), inp.resolve()
    if o == i or (out.exists() and inp.exists() and os.path.samefile(out, inp)):
        return "is"
    if i in o.parents:
        return "lies inside"
    if o in i.parents:
        return "holds"
    return None


def check_output(target: str | os.PathLike[str], kind: str, inputs: Iterable[Any] = ()) -> Path:
    """Refuse ``target`` as an output of ``kind`` before any work (see the module docstring).

    Args:
        target: the file or folder the command will write.
        kind: one of :data:`KINDS`.
        inputs: the paths the command reads (files, folders, glob patterns; anything else is
            ignored, e.g. an in-memory iterable).

    Returns:
        ``target`` as a :class:`~pathlib.Path`.

    Raises:
        OutputFolderMissingError: the folder that should hold ``target`` does not exist, or a
            file is where it (or a folder above it) should be.
        OutputIsInputError: ``target`` is an input, holds one, or lies inside one.
        OutputExistsError: ``target`` exists and is not an earlier output of ``kind``, or
            holds files embedkit did not write.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    out = Path(target)
    what = NAMES[kind]
    parent = out.absolute().parent
    if not parent.is_dir():
        check_folders_above(out, kind)
        raise OutputFolderMissingError(f"cannot write the {what} {out}: its folder {parent} does not exist (create it first)")
    if kind != "feature-store" and not os.access(parent, os.W_OK | os.X_OK):  # a store checks its own writes
        raise OutputError(f"cannot write the {what} {out}: its folder {parent} is not writable "
                          "(read-only file system or no permission)")
    for value in inputs:
        inp = _input_root(value)
        if inp is None:
            continue
        relation = _relation(out, inp)
        if relation:
            raise OutputIsInputError(f"the {what} {out} {relation} the input {inp}: writing it would destroy or "
                                     "change what it reads; choose another output path")
    if kind == "embeddings" and os.path.lexists(errors_path(out)) and not (
            errors_path(out).is_file() and not errors_path(out).is_symlink() and _errors_file(errors_path(out))):
        # embed replaces or removes its records beside the output: never a file it did not write
        raise OutputExistsError(f"{errors_path(out)} exists and is not embedkit's error records; "
                                "move it or choose another output path")
    if not os.path.lexists(out):
        return out
    if out.is_symlink() and kind != "feature-store":  # a store is added to, never replaced: its link may stay
        raise OutputExistsError(f"{out} is a symbolic link; embedkit replaces only outputs it wrote: choose another path")
    if kind == "embeddings":
        if not _embeddings_file(out):
            raise OutputExistsError(f"{out} exists and is not an embeddings file written by `embedkit embed`; "
                                    "embedkit never overwrites other files: choose another output path")
        return out
    if not out.is_dir():
        raise OutputExistsError(f"{out} exists and is a file, not a {what}; choose another output path")
    foreign = foreign_entries(out, kind)
    if foreign is None:
        raise OutputExistsError(f"{out} exists and is not a {what} written by embedkit (no {MARKERS.get(kind, 'namespace.json')} "
                                f"of kind {kind!r}); embedkit never replaces folders it did not write: choose another path "
                                "or an empty or new folder")
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputExistsError(f"{out} is an earlier {what} but also holds files embedkit did not write ({shown}); "
                                "replacing it would delete them: move them or choose another path")
    return out


def in_the_way(target: str | os.PathLike[str]) -> Path | None:
    """The nearest existing path among the folders that should hold ``target`` (its parent, and
    the folders above that), when it is not a folder (a file, a link to one, a broken link): what
    stands where a folder should be. None when that nearest path is a folder."""
    out = Path(target)
    given, absolute = list(out.parents), list(out.absolute().parents)  # as typed, and absolute (one per level)
    for k, folder in enumerate(absolute):
        if os.path.lexists(folder):
            if folder.is_dir():
                return None
            return given[k] if k < len(given) and str(given[k]) != "." else folder
    return None


def check_folders_above(target: str | os.PathLike[str], kind: str) -> None:
    """Refuse ``target`` when a file stands where its folder (or a folder above it) should be, naming
    that file (checked before folders are made for it, and by :func:`check_output`).

    Raises:
        OutputFolderMissingError: e.g. ``afile/x`` where ``afile`` is a file.
    """
    blocker = in_the_way(target)
    if blocker is not None:
        thing = "a file, not a folder" if blocker.is_file() else \
            "a broken symbolic link, not a folder" if not blocker.exists() else "not a folder"
        raise OutputFolderMissingError(f"cannot write the {NAMES[kind]} {target}: {blocker} is {thing}; "
                                       "choose another path")


def replaceable(kind: str) -> Any:
    """A predicate for :func:`embedkit.fs.atomic.publish`: may this existing path be replaced?"""
    return lambda path: is_output(path, kind)
