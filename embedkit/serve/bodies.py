"""Request bodies: a JSON object or a multipart form of images, read and checked against the limits."""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from concurrent.futures import Executor
from typing import Any

from starlette.requests import ClientDisconnect

from ..inputs.items import ItemError
from .api_error import ApiError
from .settings import Limits

# A JSON string (escapes included): removed before counting the values outside strings.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
SPARE_VALUES = 256  # values a body may hold beyond its items: keys, options, nesting
_WHITESPACE = str.maketrans("", "", " \t\n\r\f\v")  # ASCII whitespace: removed from base64 text


def count_values(raw: bytes) -> int:
    """An upper bound on the JSON values in ``raw`` outside strings (commas + containers + 1):
    what parsing it will build, in one C-speed pass."""
    bare = _STRING.sub(b"", raw) if b'"' in raw else raw
    return bare.count(b",") + bare.count(b"[") + bare.count(b"{") + 1


def parse_json(raw: bytes, limits: Limits) -> Any:
    """``raw`` parsed, or a typed error; refused *before* parsing when it holds more values than a
    request of ``max_items`` items needs: ``{},`` parses to ~25x its size in Python objects, so a
    body's parsed size is bounded by its value count, not only by its bytes."""
    most = limits.max_items + SPARE_VALUES
    if raw.count(b",") + raw.count(b"[") + raw.count(b"{") >= most and count_values(raw) > most:
        raise ApiError(413, "too_many_values", f"the body holds over {most} JSON values; a request may hold "
                       f"{limits.max_items} items (--max-items) and a few options")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, "invalid_json", "the body is not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, an integer of over 4,300 digits
        where = f"at byte {exc.pos}" if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        if "digits" in str(exc):
            where = "a number has too many digits"
        raise ApiError(400, "invalid_json", f"the body is not valid JSON ({where})") from None


async def json_body(request: Any, executor: Executor, limits: Limits) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) <= 65_536:
        body = parse_json(raw, limits)
    else:  # a large body is parsed in a thread, off the event loop
        body = await asyncio.get_running_loop().run_in_executor(executor, parse_json, raw, limits)
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_type", f"the body must be a JSON object, got {type(body).__name__}")
    return body


async def payload(request: Any, limits: Limits, executor: Executor) -> dict[str, Any]:
    """A JSON body, or a multipart form of ``images`` files (and an optional ``model`` field)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return await json_body(request, executor, limits)
    raw = await request.body()  # kept: the form below is parsed from it
    if not closed_form(raw, request.headers.get("content-type", "")):
        raise ApiError(400, "invalid_form", "the multipart form is unfinished: its closing boundary "
                       "('--BOUNDARY--') is missing")
    try:  # one file more than allowed, so that too many files is the 413 of items
        form = await request.form(max_files=limits.max_items + 1, max_fields=8)
    except (ApiError, ClientDisconnect):
        raise
    except Exception as exc:  # python-multipart's errors: malformed form, too many parts
        if "too many files" in str(getattr(exc, "detail", exc)).lower():
            raise ApiError(413, "too_many_items", f"over {limits.max_items} files; the limit is "
                           f"{limits.max_items} per request (--max-items)") from exc
        raise ApiError(400, "invalid_form", f"the multipart form cannot be read ({type(exc).__name__})")
    others = sorted({k for k in form.keys() if k not in ("images", "model")})
    if others:
        raise ApiError(422, "invalid_form", f"a multipart form carries 'images' files and a 'model' field only "
                       f"({len(others)} other field name(s) sent); send texts as JSON")
    files = form.getlist("images")
    if any(isinstance(f, str) for f in files):
        raise ApiError(422, "invalid_type", "multipart 'images' fields must be file uploads")
    return {"model": form.get("model"), "images": [await f.read() for f in files], "_binary": True}


def items(body: dict[str, Any], key: str, limits: Limits) -> list[Any]:
    """``body[key]``: a non-empty list of at most ``max_items`` items."""
    found = body[key]
    if not isinstance(found, list):
        raise ApiError(422, "invalid_type", f"{key} must be a list, got {type(found).__name__}")
    if not found:
        raise ApiError(422, "empty_input", f"{key} is empty; send at least one item")
    if len(found) > limits.max_items:
        raise ApiError(413, "too_many_items", f"{len(found)} items; the limit is {limits.max_items} "
                       "per request (--max-items)")
    return found


def check_chars(texts: list[Any], key: str, limits: Limits) -> None:
    """Refuse the request when one text is over ``max_chars`` characters."""
    for i, text in enumerate(texts):
        if isinstance(text, str) and len(text) > limits.max_chars:
            raise ApiError(413, "text_too_long", f"{key}[{i}] has {len(text)} characters; the limit is "
                           f"{limits.max_chars} (--max-chars)")


def check_queue(rows: int, max_queue: int, unit: str = "items") -> None:
    """413 when one request needs more queue places than the queue has (``--max-queue``): a 429 would
    invite a retry that can never succeed. ``unit``: ``items``, or ``windows`` under ``--long chunk``
    (each window of a long text is a queued item): ``too_many_items`` / ``too_many_windows``."""
    if rows > max_queue:
        raise ApiError(413, f"too_many_{unit}", f"this request needs {rows} {unit} in the batching queue, which "
                       f"holds {max_queue} (--max-queue) at most: it can never be queued; send fewer or shorter "
                       "texts per request" + (" (a long text is one item per window)" if unit == "windows" else ""))


def closed_form(raw: bytes, content_type: str) -> bool:
    """Whether the multipart body ``raw`` ends its parts with the closing delimiter ``--BOUNDARY--``
    (RFC 2046; an epilogue may follow). A body cut short parses to fewer parts, or none, without an
    error from the parser: it is a malformed form, not an empty request."""
    found = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    if found is None:
        return True  # the parser's own error (400 invalid_form) names it
    close = b"--" + found.group(1).strip().encode("latin-1") + b"--"
    return raw.startswith(close) or b"\n" + close in raw


def image_bytes(index: int, payload: Any) -> tuple[bytes | None, ItemError | None]:
    """The bytes of an ``images`` item: bytes as sent (multipart), or a base64 string (JSON), or a
    ``data:[<media type>];base64,`` URL (RFC 2397: the scheme and ``;base64`` in any case). ASCII
    whitespace inside base64 is ignored (``base64`` prints a line break every 76 characters); any
    other character outside the base64 alphabet, or wrong padding, is ``invalid_base64``."""
    if isinstance(payload, bytes):
        return payload, None
    if not isinstance(payload, str):
        return None, ItemError(index, "invalid_base64", "decode", f"expected a base64 string, got {type(payload).__name__}")
    text = payload.strip(" \t\n\r\f\v")
    if text[:5].lower() == "data:":
        head, comma, text = text.partition(",")
        if not comma or not head.rstrip().lower().endswith(";base64"):
            return None, ItemError(index, "invalid_base64", "decode", "a data: URL must be ';base64,' data")
    try:
        return base64.b64decode(text.translate(_WHITESPACE), validate=True), None
    except (binascii.Error, ValueError):
        return None, ItemError(index, "invalid_base64", "decode", "not valid base64")


def refuse_predict_dimensions(body: dict[str, Any]) -> None:
    """``/predict`` runs a saved model's head on the vectors it was trained on: ``dimensions`` is a 422
    (``unsupported_dimensions``, as on ``/embed``), never silently ignored."""
    if "dimensions" in body:
        raise ApiError(422, "unsupported_dimensions", "/predict takes no 'dimensions': a served model's head "
                       "is given the vectors it was trained on; ask /v1/embeddings for 'dimensions' of texts")
