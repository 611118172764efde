"""Request bodies: a JSON object or a multipart form of images, read and checked against the limits."""
from __future__ import annotations

import asyncio
import json
from concurrent.futures import Executor
from typing import Any

from .api_error import ApiError
from .settings import Limits


async def json_body(request: Any, executor: Executor) -> dict[str, Any]:
    raw = await request.body()
    try:  # a large body is parsed in a thread, off the event loop
        body = json.loads(raw) if len(raw) <= 65_536 else await asyncio.get_running_loop().run_in_executor(
            executor, json.loads, raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON (at byte {getattr(exc, 'pos', '?')})")
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_type", f"the body must be a JSON object, got {type(body).__name__}")
    return body


async def payload(request: Any, limits: Limits, executor: Executor) -> dict[str, Any]:
    """A JSON body, or a multipart form of ``images`` files (and an optional ``model`` field)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return await json_body(request, executor)
    try:  # one file more than allowed, so that too many files is the 413 of items
        form = await request.form(max_files=limits.max_items + 1, max_fields=8)
    except ApiError:
        raise
    except Exception as exc:  # python-multipart's errors: malformed form, too many parts
        if "too many files" in str(getattr(exc, "detail", exc)).lower():
            raise ApiError(413, "too_many_items", f"over {limits.max_items} files; the limit is "
                           f"{limits.max_items} per request (--max-items)") from exc
        raise ApiError(400, "invalid_form", f"the multipart form cannot be read ({type(exc).__name__})")
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
