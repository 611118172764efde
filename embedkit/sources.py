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

Unreadable rows carry an :class:`~embedkit.text.ItemFailure` as payload; the encoders turn it
into that item's error record. File names that are not valid UTF-8 stay usable (Python's
``surrogateescape``, as ``os.listdir`` returns them); locators written to stores and outputs show
their bad bytes as ``\\xNN`` (:func:`display`).
"""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import UnsupportedInputError
from .files import bounded_lines, content_id, display, open_regular, read_regular  # noqa: F401 (re-exported)
from .text import ItemFailure

MAX_RECORD_CHARS = 64 << 20  # a CSV/TSV line or JSONL record longer than this is refused, unread
MAX_HASH_BYTES = 8 << 30  # larger files get a locator id (they fail as too_large when decoded)


@dataclass
class ImageFolder:
    """Files under a folder, recursively, with labels from their class subfolders.

    ``root/ants/1.jpg`` gets the label ``ants``; files directly in ``root`` get ``""``.
    Every entry is listed except folders and hidden ones (``.DS_Store``, ``.git``): a file that
    is not a supported image (or not a regular file) becomes an error record when embedded,
    never a silent drop.
    """

    root: Path
    paths: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    def __len__(self) -> int:
        return len(self.paths)


def image_folder(root: str | os.PathLike[str]) -> ImageFolder:
    """List an image folder in a stable (sorted) order; see :class:`ImageFolder`."""
    base = Path(root)
    if not base.is_dir():
        raise UnsupportedInputError(f"{base} is not a folder")
    found = ImageFolder(base)
    for path in walk_files(base):
        found.paths.append(path)
        found.labels.append(folder_label(base, path))
    return found


def folder_label(root: Path, path: str) -> str:
    """The class of a file in an image folder: its first subfolder under ``root`` (``""`` at the top)."""
    parts = Path(path).relative_to(root).parts
    return parts[0] if len(parts) > 1 else ""


def file_list(path: str | os.PathLike[str]) -> list[str]:
    """Paths from a text file, one per line (every line, see the module); relative to the list's folder."""
    return [item.payload if isinstance(item.payload, str) else "" for item in iter_items(path, "image")]


def read_texts(path: Path, column: str, strict: bool = True) -> list[Any]:
    """The payloads of :func:`iter_items` for a text file or table column, one per row.

    ``.txt`` lines come as bytes (decoded by the text policy). With ``strict`` (labels, ids) an
    unreadable row raises :class:`UnsupportedInputError`; without, it stays an
    :class:`~embedkit.text.ItemFailure` payload.
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


# -- streaming items for extraction -----------------------------------------------------------
GLOB_CHARS = "*?["
TABLES = (".csv", ".tsv", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Item:
    """One input: its id (user column or content hash), payload, and where it came from.

    ``source`` is a locator (a path, or ``file.csv:row 12``), never the content.
    """

    id: str
    payload: Any
    source: str


def fingerprint(payload: Any, modality: str) -> str | None:
    """The content hash of a payload: a text's UTF-8 bytes (``str`` or ``bytes``), an image file's
    bytes (see :func:`_file_id`), raw bytes as given; ``None`` when there is no content to hash
    (an unreadable row, an in-memory image: see :func:`image_id`). Item ids and the fingerprints
    the feature store keeps beside user ids both come from here."""
    if modality == "image" and isinstance(payload, str):
        return _file_id(payload)
    if isinstance(payload, str):
        return content_id(payload.encode("utf-8", "surrogatepass"))
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return content_id(bytes(payload))
    return None


def _text_id(payload: Any, where: str) -> str:
    # no content: the item fails when encoded, identified by its locator
    return fingerprint(payload, "text") or "src-" + content_id(where.encode("utf-8", "surrogateescape"))


def image_id(image: Any, where: str) -> str:
    """The id of an in-memory image: a hash of everything that defines it, not its raw bytes alone.

    PIL: mode, size, palette (mode and colours), transparency, EXIF orientation and pixels.
    numpy: dtype, shape and elements. Bytes: the bytes (as a file's id). Anything else fails
    later, by its locator.
    """
    from PIL import Image

    h = hashlib.sha256()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return content_id(bytes(image))
    if isinstance(image, Image.Image):
        try:
            palette = image.palette
            meta = {
                "kind": "PIL", "mode": image.mode, "size": list(image.size),
                "palette_mode": palette.mode if palette is not None else None,
                "transparency": repr(image.info.get("transparency")),
                "orientation": image.getexif().get(0x0112),
            }
            h.update(json.dumps(meta, sort_keys=True).encode())
            if palette is not None:
                h.update(bytes(image.getpalette(palette.mode) or []))
            h.update(image.tobytes())
        except Exception:  # a broken lazy image: it fails when decoded, by its locator
            return "src-" + content_id(where.encode())
        return h.hexdigest()[:32]
    import numpy as np

    if isinstance(image, np.ndarray):
        h.update(json.dumps({"kind": "ndarray", "dtype": image.dtype.str, "shape": list(image.shape)}).encode())
        if image.dtype.hasobject:
            return "src-" + content_id(where.encode())
        h.update(np.ascontiguousarray(image).tobytes())
        return h.hexdigest()[:32]
    return "src-" + content_id(where.encode())


def _file_id(path: str) -> str:
    """A hash of a regular file's bytes; a locator id for what cannot be hashed (it fails when decoded)."""
    located = "src-" + content_id(os.fsencode(path))
    try:
        f, info = open_regular(path)
    except ItemFailure:
        return located
    h = hashlib.sha256()
    with f:
        if info.st_size > MAX_HASH_BYTES:
            return located
        try:
            while block := f.read(1 << 20):
                h.update(block)
        except OSError:
            return located
    return h.hexdigest()[:32]


def walk_files(root: Path) -> Iterator[str]:
    """Non-hidden entries under ``root`` that are not folders, recursively, sorted, lazily per folder.

    FIFOs, devices and dangling symlinks are listed too: reading them gives an error record
    (``not_a_file`` / ``not_found``), never a silent drop and never a hang.
    """
    for directory, subdirs, files in os.walk(root, followlinks=False):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield os.path.join(directory, name)


def _rows(path: Path, column: str | None, id_column: str | None) -> Iterator[tuple[int, Any, Any]]:
    """``(row or line number, value, id value)`` from a table, streamed, one per row (see the module).

    A JSONL line that is not a JSON object gives an :class:`ItemFailure` value.
    """
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        if csv.field_size_limit() < MAX_RECORD_CHARS:  # the default, 131,072 characters, aborts on long texts
            csv.field_size_limit(MAX_RECORD_CHARS)
        dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {"strict": True}
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.DictReader(_limited(f, path), **dialect)
            try:
                _check_columns(path, reader.fieldnames or [], column, id_column)
                width = len(reader.fieldnames or [])
                for n, row in enumerate(reader, start=1):
                    cells = width + len(row.get(None) or []) - sum(v is None for k, v in row.items() if k is not None)
                    if cells != width:  # an unquoted separator in a cell, or a cut row: no cell is guessed
                        yield n, ItemFailure("invalid_row", "read", f"row {n} has {cells} cells, the header "
                                             f"{width}{' (quote cells that hold the separator)' if cells > width else ''}"), None
                        continue
                    yield n, row[column] if column else None, row[id_column] if id_column else None
            except csv.Error as exc:
                why = (f"a cell over {MAX_RECORD_CHARS} characters" if "field limit" in str(exc) else
                       f"{exc} (a quote that opens a cell must close it, and a closing quote must end the cell)")
                raise UnsupportedInputError(
                    f"{display(path.name)} is not valid CSV in the row starting at line {reader.line_num + 1}: {why}; "
                    "no row was guessed") from exc
    elif suffix == ".jsonl":
        with open(path, "rb") as f:
            n = 0
            while raw := f.readline(MAX_RECORD_CHARS + 1):
                n += 1
                if len(raw) > MAX_RECORD_CHARS and not raw.endswith(b"\n"):
                    while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                        pass  # skipped unread: bounded memory
                    yield n, ItemFailure("too_large", "read", f"line {n} is over {MAX_RECORD_CHARS} bytes"), None
                    continue
                line = raw.decode("utf-8", "surrogateescape")
                if n == 1:
                    line = line.removeprefix("\ufeff")
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as exc:
                    why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                    yield n, ItemFailure("invalid_json", "read", f"line {n} is not JSON: {why}"), None
                    continue
                if not isinstance(record, dict):
                    yield n, ItemFailure("invalid_json", "read", f"line {n} is a JSON {type(record).__name__}, "
                                         "not an object"), None
                    continue
                yield n, record.get(column), record.get(id_column) if id_column else None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        with open(path, "rb") as handle:  # a file object: pyarrow cannot name non-UTF-8 paths
            parquet = pq.ParquetFile(handle)
            _check_columns(path, parquet.schema_arrow.names, column, id_column)
            columns = [column or parquet.schema_arrow.names[0]] + ([id_column] if id_column else [])
            n = 0
            for batch in parquet.iter_batches(batch_size=4096, columns=columns):
                values = batch.column(0).to_pylist()
                keys = batch.column(1).to_pylist() if id_column else [None] * len(values)
                for value, key in zip(values, keys):
                    n += 1
                    yield n, value, key
    else:
        raise UnsupportedInputError(f"unsupported table {display(path.name)}: use {', '.join(TABLES)}")


def _limited(f: Any, path: Path) -> Iterator[str]:
    """The lines of a text file, refusing (before reading it whole) one over ``MAX_RECORD_CHARS``."""
    n = 0
    while line := f.readline(MAX_RECORD_CHARS + 1):
        n += 1
        if len(line) > MAX_RECORD_CHARS:
            raise UnsupportedInputError(
                f"{display(path.name)} line {n} is over {MAX_RECORD_CHARS} characters; split it, or use a .txt "
                "(one text per line, read in bounded memory)")
        yield line


def _check_columns(path: Path, names: Sequence[str], column: str, id_column: str | None) -> None:
    for wanted in (column, id_column):
        if wanted and wanted not in names:
            raise UnsupportedInputError(
                f"{display(path.name)} has no column {wanted!r}; columns: {', '.join(names)} "
                "(use --column / --id-column)")


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
        for n, payload in enumerate(source):
            where = f"item {n}"
            if modality == "image" and isinstance(payload, (str, os.PathLike)):
                yield _file_item(os.fspath(payload), None)
            elif modality == "image":
                yield Item(image_id(payload, where), payload, where)
            else:
                yield Item(_text_id(payload, where), payload, where)
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
                    yield _file_item(line.decode("utf-8", "surrogateescape"), path.parent)
                else:
                    yield Item(line_id, line, where)
        return
    for n, value, key in _rows(path, column, id_column):
        where = f"{name}:row {n}"  # JSONL: n is the line number (blank lines hold no row but keep numbering)
        if modality == "image" and isinstance(value, str):
            item = _file_item(value, path.parent)
        else:
            item = Item(_text_id(value, where), value, where)
        if id_column and not isinstance(value, ItemFailure):
            item = replace(item, id=display(str(key)) if key not in (None, "") else "src-" + content_id(where.encode()))
        yield item


def _file_item(name: str, folder: Path | None) -> Item:
    """An image file named in a list or a table; relative names are taken from that file's folder."""
    if not name:
        return Item("src-" + content_id(b"empty path"), ItemFailure(
            "not_found", "read", "empty path (a blank line or cell)"), "")
    file = name if folder is None or os.path.isabs(name) else os.path.join(folder, name)
    return Item(_file_id(file), file, display(file))


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
            return sum(1 for _ in _rows(path, None, None))
        except UnsupportedInputError:
            return None
    return None
