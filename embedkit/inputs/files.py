"""Reading files safely: regular files only, bounded reads, bounded lines, printable names.

Every reader of user-named files goes through here, so a FIFO, ``/dev/zero`` or a 7 GB line is
refused or bounded in one place (see :mod:`embedkit.inputs.sources` and :mod:`embedkit.inputs.image`).
"""
from __future__ import annotations

import hashlib
import os
import stat
from typing import Any, Iterator

from .items import MAX_TEXT_BYTES, Clipped, ItemFailure


def content_id(data: bytes) -> str:
    """The default item id: the first 32 hex digits (128 bits) of the content's sha256."""
    return hashlib.sha256(data).hexdigest()[:32]


def display(text: str) -> str:
    """``text`` as valid UTF-8: undecodable bytes of a file name (surrogates) shown as ``\\xNN``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def open_regular(path: str | os.PathLike[str]) -> tuple[Any, os.stat_result]:
    """Open a regular file for reading; anything else is an :class:`ItemFailure`, before any read.

    ``O_NONBLOCK`` keeps a FIFO from blocking the open; ``fstat`` of the open file (symlinks
    followed) decides, so ``/dev/zero`` and FIFOs are refused without reading a byte.
    """
    name = f"file {display(os.path.basename(os.fspath(path)))!r}"
    if not os.fspath(path):
        raise ItemFailure("not_found", "read", "empty path (a blank line or cell?)")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ItemFailure("not_found", "read", f"{name}: no such file") from None
    except OSError as exc:
        raise ItemFailure("unreadable", "read", f"{name}: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ItemFailure("not_a_file", "read", f"{name} is a {_kind(info.st_mode)}, not a regular file")
    return os.fdopen(fd, "rb"), info


def read_regular(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, else an :class:`ItemFailure`.

    Codes: ``not_found``, ``not_a_file`` (FIFO, device, socket, folder), ``too_large``,
    ``unreadable`` (permissions...). Never reads more than ``limit + 1`` bytes.
    """
    f, info = open_regular(path)
    with f:
        name = f"file {display(os.path.basename(os.fspath(path)))!r}"
        if info.st_size > limit:
            raise ItemFailure("too_large", "read", f"{name} has {info.st_size} bytes, over the limit of {limit}")
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise ItemFailure("unreadable", "read", f"{name}: {exc.strerror}") from None
    if len(data) > limit:
        raise ItemFailure("too_large", "read", f"{name} grew past the limit of {limit} bytes while read")
    return data


def bounded_lines(f: Any) -> Iterator[tuple[bytes, str]]:
    """``(line without its terminator, id)`` from a binary file, reading at most ``MAX_TEXT_BYTES`` per line.

    A longer line comes back as :class:`Clipped` (cut at a UTF-8 boundary); the rest is read in
    1 MiB pieces only to hash it, so its id is the hash of the whole line, as for any other line.
    """
    while line := f.readline(MAX_TEXT_BYTES + 1):
        if len(line) <= MAX_TEXT_BYTES or line.endswith(b"\n"):
            line = line[:-1] if line.endswith(b"\n") else line
            line = line[:-1] if line.endswith(b"\r") else line
            yield line, content_id(line)
            continue
        h = hashlib.sha256()
        head = utf8_prefix(line[:MAX_TEXT_BYTES])
        carry = line
        while True:
            rest = f.readline(1 << 20)
            if not rest or rest.endswith(b"\n"):
                last = carry + rest
                last = last[:-1] if last.endswith(b"\n") else last
                h.update(last[:-1] if last.endswith(b"\r") else last)
                break
            h.update(carry)
            carry = rest
        yield Clipped(head), h.hexdigest()[:32]


def utf8_prefix(data: bytes) -> bytes:
    """``data`` without an incomplete UTF-8 sequence at its end."""
    end = len(data)
    lead = end - 1
    while lead >= 0 and end - lead <= 4 and data[lead] & 0xC0 == 0x80:
        lead -= 1
    if lead < 0 or data[lead] < 0xC0:
        return data
    need = 2 if data[lead] < 0xE0 else 3 if data[lead] < 0xF0 else 4
    return data if lead + need <= end else data[:lead]
