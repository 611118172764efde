"""Inputs -> items: image folders, file lists, tables and iterables, streamed with ids."""
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


@dataclass
class ImageFolder:
    """Files under a folder, recursively, with labels from their class subfolders.

    ``root/ants/1.jpg`` gets the label ``ants``; files directly in ``root`` get ``""``.
    Every regular file is listed except hidden ones (``.DS_Store``, ``.git``): a file that is
    not a supported image becomes an error record when embedded, never a silent drop.
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
    for directory, subdirs, files in os.walk(base, followlinks=False):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(directory) / name
            if not path.is_file():
                continue
            relative = path.relative_to(base)
            found.paths.append(str(path))
            found.labels.append(relative.parts[0] if len(relative.parts) > 1 else "")
    return found


def file_list(path: str | os.PathLike[str]) -> list[str]:
    """Paths from a text file, one per line; relative paths are taken from the list's folder."""
    listing = Path(path)
    items = []
    for line in listing.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            items.append(str(listing.parent / line) if not os.path.isabs(line) else line)
    return items


def read_texts(path: Path, column: str) -> list[Any]:
    """Items from a file; undecodable bytes stay per-item errors instead of failing the file."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = path.read_bytes().split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        return [line[:-1] if line.endswith(b"\r") else line for line in lines]
    if suffix not in TABLES:
        raise UnsupportedInputError(f"unsupported input {path.name}: use .txt, .csv, .tsv, .jsonl or .parquet")
    return [value for _, value, _ in _rows(path, column, None, strict=True)]


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


def content_id(data: bytes) -> str:
    """The default item id: the first 32 hex digits (128 bits) of the content's sha256."""
    return hashlib.sha256(data).hexdigest()[:32]


def _text_id(payload: Any, where: str) -> str:
    if isinstance(payload, str):
        return content_id(payload.encode("utf-8", "surrogatepass"))
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return content_id(bytes(payload))
    return "src-" + content_id(where.encode())  # no content to hash: the item fails by its locator


def _file_id(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    except OSError:
        return "src-" + content_id(path.encode())  # missing / unreadable: fails when decoded
    return h.hexdigest()[:32]


def walk_files(root: Path) -> Iterator[str]:
    """Regular non-hidden files under ``root``, recursively, in sorted order, lazily per folder."""
    for directory, subdirs, files in os.walk(root, followlinks=False):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(directory, name)
            if not name.startswith(".") and os.path.isfile(path):
                yield path


def _rows(path: Path, column: str, id_column: str | None, strict: bool = False) -> Iterator[tuple[int, Any, Any]]:
    """``(row number, value, id value)`` from a table, streamed.

    A JSONL line that is not JSON is that item's failure (value None), or with ``strict`` an
    :class:`UnsupportedInputError` naming the line.
    """
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            _check_columns(path, reader.fieldnames or [], column, id_column)
            for n, row in enumerate(reader, start=1):
                yield n, row[column], row[id_column] if id_column else None
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    if strict:
                        raise UnsupportedInputError(f"{path.name} line {n} is not JSON: {exc.msg}") from exc
                    record = None  # a bad line is that item's failure, not the file's
                if not isinstance(record, dict):
                    yield n, None, None
                    continue
                yield n, record.get(column), record.get(id_column) if id_column else None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        _check_columns(path, parquet.schema_arrow.names, column, id_column)
        columns = [column] + ([id_column] if id_column else [])
        n = 0
        for batch in parquet.iter_batches(batch_size=4096, columns=columns):
            values = batch.column(0).to_pylist()
            keys = batch.column(1).to_pylist() if id_column else [None] * len(values)
            for value, key in zip(values, keys):
                n += 1
                yield n, value, key
    else:
        raise UnsupportedInputError(f"unsupported table {path.name}: use {', '.join(TABLES)}")


def _check_columns(path: Path, names: Sequence[str], column: str, id_column: str | None) -> None:
    for wanted in (column, id_column):
        if wanted and wanted not in names:
            raise UnsupportedInputError(
                f"{path.name} has no column {wanted!r}; columns: {', '.join(names)} (use --column / --id-column)")


def iter_items(
    source: Any, modality: str, column: str | None = None, id_column: str | None = None,
) -> Iterator[Item]:
    """Stream the items of a source with bounded memory.

    Sources: a folder (images, recursive), a glob pattern, a ``.txt`` file (texts, or image
    paths for image backbones), a CSV/TSV/JSONL/Parquet ``column`` (default ``text`` or
    ``path``; relative paths are taken from the table's folder), or any Python iterable.
    Ids come from ``id_column`` when given, else from a hash of the content (for images, of
    the file's bytes), so the same content is computed once wherever it appears.
    """
    column = column or ("path" if modality == "image" else "text")
    if not isinstance(source, (str, os.PathLike)):
        for n, payload in enumerate(source):
            where = f"item {n}"
            if modality == "image" and isinstance(payload, (str, os.PathLike)):
                yield Item(_file_id(str(payload)), str(payload), str(payload))
            elif modality == "image" and not isinstance(payload, (bytes, bytearray, memoryview)):
                data = payload.tobytes() if hasattr(payload, "tobytes") else None
                yield Item(content_id(data) if data is not None else "src-" + content_id(where.encode()), payload, where)
            else:
                yield Item(_text_id(payload, where), payload, where)
        return
    text = str(source)
    path = Path(text)
    if modality == "image" and (path.is_dir() or any(c in text for c in GLOB_CHARS) and not path.exists()):
        files = walk_files(path) if path.is_dir() else iter(sorted(glob.glob(text, recursive=True)))
        for file in files:
            yield Item(_file_id(file), file, file)
        return
    if not path.is_file():
        raise UnsupportedInputError(f"{path} is not a file, folder or glob pattern")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        with open(path, "rb") as f:
            for n, line in enumerate(f, start=1):
                line = line.rstrip(b"\n").rstrip(b"\r")
                where = f"{path.name}:line {n}"
                if modality == "image":
                    name = line.decode("utf-8", "surrogateescape").strip()
                    if name and not name.startswith("#"):
                        yield _file_item(name, path.parent)
                else:
                    yield Item(_text_id(line, where), line, where)
        return
    for n, value, key in _rows(path, column, id_column):
        where = f"{path.name}:row {n}"
        if modality == "image" and isinstance(value, str) and value:
            item = _file_item(value, path.parent)
        else:
            item = Item(_text_id(value, where), value, where)
        if id_column:
            item = replace(item, id=str(key) if key not in (None, "") else "src-" + content_id(where.encode()))
        yield item


def _file_item(name: str, folder: Path) -> Item:
    """An image file named in a list or a table; relative names are taken from that file's folder."""
    file = name if os.path.isabs(name) else str(folder / name)
    return Item(_file_id(file), file, file)


def count_items(source: Any, modality: str) -> int | None:
    """A cheap count for progress bars (None when unknown, e.g. for a generator)."""
    if not isinstance(source, (str, os.PathLike)):
        return len(source) if hasattr(source, "__len__") else None
    path = Path(source)
    if path.is_dir():
        return sum(1 for _ in walk_files(path))
    if not path.is_file():
        return len(glob.glob(str(source), recursive=True)) if any(c in str(source) for c in GLOB_CHARS) else None
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if suffix in (".txt", ".csv", ".tsv", ".jsonl"):
        with open(path, "rb") as f:
            lines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
        return max(0, lines - (1 if suffix in (".csv", ".tsv") else 0))
    return None
