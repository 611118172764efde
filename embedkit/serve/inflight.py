"""The requests in flight, so that the drain deadline answers every one of them the same way.

At the deadline (``--drain-seconds`` after SIGTERM, or at once on a second Ctrl-C),
:meth:`Service.abort <embedkit.serve.service.Service.abort>` fails the requests whose items are
queued; a request still reading its body, parsing, tokenising or decoding images is not queued
yet, and uvicorn's graceful timeout would cancel it with a plain-text 500. :meth:`InFlight.abort`
answers every request that has not started its response with the typed 503 ``shutting_down``
(what it would send later is dropped) and cancels its work; a request whose response has started
is left to finish within uvicorn's flush time. Requests that arrive after the deadline get the
same 503 at once.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable

from .api_error import ApiError, error_body

logger = logging.getLogger(__name__)

Send = Callable[[dict], Awaitable[None]]

SHUTTING_DOWN = ApiError(503, "shutting_down", "the server is shutting down: the drain deadline "
                         "(--drain-seconds) passed before this request finished")


class _Request:
    def __init__(self, send: Send):
        self.send_out = send
        self.started = False  # the app started its response
        self.cut = False  # answered 503 at the deadline: what the app sends later is dropped
        self.answered = False

    async def send(self, message: dict) -> None:
        if self.cut:
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self.send_out(message)

    async def answer(self) -> None:
        if self.answered:
            return
        self.answered = True
        body = json.dumps(error_body(SHUTTING_DOWN)).encode()
        await self.send_out({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await self.send_out({"type": "http.response.body", "body": body, "more_body": False})


class InFlight:
    """The requests being answered now (by their asyncio task)."""

    def __init__(self) -> None:
        self._requests: dict[asyncio.Task, _Request] = {}
        self.closed = False

    async def run(self, call: Callable[[Send], Awaitable[None]], send: Send) -> None:
        """``await call(send')``, where ``send'`` drops what the app sends once :meth:`abort` answered."""
        request = _Request(send)
        if self.closed:
            await request.answer()
            return
        task: Any = asyncio.current_task()
        self._requests[task] = request
        try:
            await call(request.send)
        except asyncio.CancelledError:
            if not request.cut:
                raise
            task.uncancel()  # our own cancellation: the request is answered below
        finally:
            self._requests.pop(task, None)
        if request.cut:
            await request.answer()

    def abort(self) -> None:
        """The deadline: every request that has not started its response is answered 503
        ``shutting_down`` (by its own task, which is cancelled for it); later ones too, at once."""
        self.closed = True
        cut = 0
        for task, request in list(self._requests.items()):
            if not request.started and not request.cut:
                request.cut = True
                task.cancel()
                cut += 1
        if cut:
            logger.warning("drain deadline: %d request(s) not yet answered get 503 shutting_down", cut)
