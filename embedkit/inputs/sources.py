"""Inputs -> items: image folders, file lists, tables and iterables, streamed with ids.

One reader (:func:`iter_items`) serves ``embed``, ``extract``, ``tune``/``quantize --data`` and
the label joins, and yields exactly one item per input row, in input order:

==========================  =====================================================================
source                      how it is read
==========================  =====================================================================
``.txt`` (texts)            one text per line (``\\n`` or ``\\r\\n``), as bytes decoded by the text
                            policy; a blank line is an (empty) text; a line over
                            ``MAX_TEXT_BYTES`` is clipped while read (counted as truncated,
                            its id still hashes the whole line)
``.txt`` (image list)       one path per line, relative to the list's folder; every line is
                            an item: no comments (``#2.jpg`` is a file name), a blank line is
                            a ``not_found`` record, so output row i is always line i
``.csv``                    RFC 4180 (quoted cells may hold commas, quotes, newlines); UTF-8
                            with or without a byte-order mark; cells up to ``MAX_RECORD_CHARS``
                            (64 Mi) characters. Broken quoting (a quote that never closes,
                            text after a closing quote) or a longer line is a typed
                            :class:`UnsupportedInputError` naming the line: rows are never
                            guessed
``.tsv``                    IANA text/tab-separated-values: one row per line, fields split at
                            tabs, **no quote processing** (a text starting with ``"`` is
                            that text, and never swallows the next rows); UTF-8, BOM allowed
``.jsonl``                  one JSON object per line, BOM allowed; a line that is not JSON is
                            that item's ``invalid_json`` record (row kept), one over 64 MiB a
                            ``too_large`` record (skipped unread); blank lines hold no record
                            and are skipped (locators keep the file's line numbers)
``.parquet``                the column, row by row
folder / glob (images)      every non-hidden entry that is not a folder, sorted; a FIFO,
                            device or symlink to one is listed and becomes ``not_a_file``
==========================  =====================================================================

Unreadable rows carry an :class:`~embedkit.inputs.text.ItemFailure` as payload; the encoders turn it
into that item's error record. File names that are not valid UTF-8 stay usable (Python's
``surrogateescape``, as ``os.listdir`` returns them); locators written to stores and outputs show
their bad bytes as ``\\xNN`` (:func:`display`). Tables are read by :mod:`embedkit.inputs.tables`,
folders listed by :mod:`embedkit.inputs.folders`, ids made by :mod:`embedkit.inputs.fingerprints`.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from ..errors import UnsupportedInputError
from .files import bounded_lines, content_id, display
from .fingerprints import file_id, image_id, text_id
from .folders import walk_files
from .image import refuse_single_image
from .items import ItemFailure
from .tables import TABLES, table_rows

GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Item:
    """One input: its id (user column or content hash), payload, and where it came from.

    ``source`` is a locator (a path, or ``file.csv:row 12``), never the content.
    """

    id: str
    payload: Any
    source: str


def file_list(path: str | os.PathLike[str]) -> list[str]:
    """Paths from a text file, one per line (every line, see the module); relative to the list's folder."""
    return [item.payload if isinstance(item.payload, str) else "" for item in iter_items(path, "image")]


def read_texts(path: Path, column: str, strict: bool = True) -> list[Any]:
    """The payloads of :func:`iter_items` for a text file or table column, one per row.

    ``.txt`` lines come as bytes (decoded by the text policy). With ``strict`` (labels, ids) an
    unreadable row raises :class:`UnsupportedInputError`; without, it stays an
    :class:`~embedkit.inputs.text.ItemFailure` payload.
    """
    suffix = Path(path).suffix.lower()
    if suffix != ".txt" and suffix not in TABLES:
        raise UnsupportedInputError(f"unsupported input {Path(path).name}: use .txt, .csv, .tsv, .jsonl or .parquet")
    values = []
    for item in iter_items(path, "text", column):
        if strict and isinstance(item.payload, ItemFailure):
            raise UnsupportedInputError(f"{item.source}: {item.payload.message}")
        values.append(item.payload)
    return values


def iter_items(
    source: Any, modality: str, column: str | None = None, id_column: str | None = None,
) -> Iterator[Item]:
    """Stream the items of a source with bounded memory, one per input row (see the module).

    Sources: a folder (images, recursive), a glob pattern, a ``.txt`` file (texts, or image
    paths for image backbones), a CSV/TSV/JSONL/Parquet ``column`` (default ``text`` or
    ``path``; relative paths are taken from the table's folder), or any Python iterable.
    Ids come from ``id_column`` when given, else from a hash of the content (for images, of
    the file's bytes; for in-memory images, see :func:`image_id`), so the same content is
    computed once wherever it appears. ``Item.source`` is always valid UTF-8 (:func:`display`).

    Raises:
        UnsupportedInputError: the source is not a file, folder or glob; an unsupported
            suffix; a missing column; a CSV that breaks the format.
    """
    column = column or ("path" if modality == "image" else "text")
    if not isinstance(source, (str, os.PathLike)):
        if modality == "image":
            refuse_single_image(source, "a source of images")
        for n, payload in enumerate(source):
            where = f"item {n}"
            if modality == "image" and isinstance(payload, (str, os.PathLike)):
                yield _file_item(os.fspath(payload), None)
            elif modality == "image":
                yield Item(image_id(payload, where), payload, where)
            else:
                yield Item(text_id(payload, where), payload, where)
        return
    text = os.fspath(source)
    path = Path(text)
    if modality == "image" and (path.is_dir() or any(c in text for c in GLOB_CHARS) and not path.exists()):
        if path.is_dir():
            files: Iterator[str] = walk_files(path)
        else:
            files = (f for f in sorted(glob.glob(text, recursive=True)) if not os.path.isdir(f))
        for file in files:
            yield _file_item(file, None)
        return
    if not path.is_file():
        raise UnsupportedInputError(f"{display(text)} is not a file, folder or glob pattern")
    suffix = path.suffix.lower()
    name = display(path.name)
    if suffix == ".txt":
        with open(path, "rb") as f:
            for n, (line, line_id) in enumerate(bounded_lines(f), start=1):
                where = f"{name}:line {n}"
                if modality == "image":
                    yield _file_item(line.decode("utf-8", "surrogateescape"), path.parent,
                                     os.fsencode(os.path.realpath(path)) + f":line {n}".encode(), where)
                else:
                    yield Item(line_id, line, where)
        return
    # ids derived from a row's place name the file by its full path: two data.csv files in
    # different folders are different sources (the displayed locator keeps the short name)
    home = os.fsencode(os.path.realpath(path))
    for n, value, key in table_rows(path, column, id_column):
        where = f"{name}:row {n}"  # JSONL: n is the line number (blank lines hold no row but keep numbering)
        place = home + f":row {n}".encode()
        if modality == "image" and isinstance(value, str):
            item = _file_item(value, path.parent, place, where)
        else:
            item = Item(text_id(value, place.decode("utf-8", "surrogateescape")), value, where)
        if id_column and not isinstance(value, ItemFailure):
            item = replace(item, id=display(str(key)) if key not in (None, "") else "src-" + content_id(place))
        yield item


def _file_item(name: str, folder: Path | None, place: bytes = b"", where: str = "") -> Item:
    """An image file named in a list or a table; relative names are taken from that file's folder.

    ``place`` (the list's full path and line or row) names an empty entry, so that blank cells
    of different rows or files are different items."""
    if not name:
        return Item("src-" + content_id(b"empty path\0" + place), ItemFailure(
            "not_found", "read", "empty path (a blank line or cell)"), where)
    file = name if folder is None or os.path.isabs(name) else os.path.join(folder, name)
    return Item(file_id(file), file, display(file))


def count_items(source: Any, modality: str) -> int | None:
    """The number of items :func:`iter_items` will yield (rows, not lines), for progress bars.

    None when unknown (a generator). Tables other than Parquet are parsed once for this.
    """
    if not isinstance(source, (str, os.PathLike)):
        return len(source) if hasattr(source, "__len__") else None
    path = Path(source)
    if path.is_dir():
        return sum(1 for _ in walk_files(path))
    if not path.is_file():
        if any(c in str(source) for c in GLOB_CHARS):
            return sum(1 for f in glob.glob(str(source), recursive=True) if not os.path.isdir(f))
        return None
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        with open(path, "rb") as f:  # a file object: pyarrow cannot name non-UTF-8 paths
            return pq.ParquetFile(f).metadata.num_rows
    if suffix == ".txt":
        lines, last = 0, b"\n"
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                lines += block.count(b"\n")
                last = block[-1:]
        return lines + (last != b"\n")
    if suffix in (".csv", ".tsv", ".jsonl"):
        try:
            return sum(1 for _ in table_rows(path, None, None))
        except UnsupportedInputError:
            return None
    return None
