"""Items and their failures: the per-item record every modality and reader shares.

A bad item costs that item, never its batch: readers and preprocessors raise (or hand over as a
payload) an :class:`ItemFailure`, and every encoder turns it into that item's :class:`ItemError`
record (index, code, stage, message), so ``ok + failed == total`` always holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_TEXT_BYTES = 1 << 20  # readers clip longer lines (counted as truncated)


@dataclass(frozen=True)
class ItemError:
    """Why one input item produced no embedding."""

    index: int
    code: str
    stage: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "code": self.code, "stage": self.stage, "message": self.message}


class ItemFailure(Exception):
    """One item cannot be embedded; becomes an :class:`ItemError` record.

    Readers also hand an instance over as the payload of a row they could not read (a JSONL
    line that is not JSON, a FIFO in a file list): every encoder records it as that item's error.
    """

    def __init__(self, code: str, stage: str, message: str):
        super().__init__(message)
        self.code, self.stage, self.message = code, stage, message

    def record(self, index: int) -> ItemError:
        return ItemError(index, self.code, self.stage, self.message)


class Clipped(bytes):
    """The first bytes (at most ``MAX_TEXT_BYTES``, cut at a UTF-8 boundary) of a longer line."""
