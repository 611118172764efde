"""Per-connection limits on what a client makes the server hold: header bytes and unsent responses.

:class:`BoundedProtocol` extends :class:`~embedkit.serve.server.TimedProtocol` (uvicorn's httptools
protocol with read time limits) with the two limits httptools and uvicorn lack:

* **header bytes** (``--max-header-bytes``): the request line and headers of one request may take
  at most ``max_header_bytes`` bytes. httptools accumulates a header of any size before its
  callback (h11's ``max_incomplete_event_size`` is what uvicorn's other protocol has), so the bytes
  are counted as they are fed to the parser, and the parser is never fed more than the limit while
  it is still reading headers: past it the answer is a JSON 431 ``headers_too_large`` and the
  connection is closed, before the API key or the Host is looked at. (Within a pipelined batch of
  requests, a request's headers may use one read chunk more before they are counted.)
* **send time** (``--send-timeout``): a client that does not read its response leaves it in the
  server's write buffer for ever (a keep-alive close waits for the buffer to drain). While bytes
  wait to be sent, a client that takes none of them for ``send_timeout`` s has its connection
  aborted and the buffer freed: nginx's ``send_timeout`` (a limit between two successive writes,
  not on a whole response, so a slow reader that makes progress is served).
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

from .api_error import ApiError, error_body
from .server import TimedProtocol

_TOO_LARGE = json.dumps(error_body(ApiError(
    431, "headers_too_large", "the request line and headers are over the server's limit (--max-header-bytes)"))).encode()
_431 = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TOO_LARGE), _TOO_LARGE))


class BoundedProtocol(TimedProtocol):
    """uvicorn's httptools protocol with read time limits, a header size limit and a send timeout
    (class attributes set per server by :func:`bounded_protocol`)."""

    max_header_bytes: int = 65536
    send_timeout: float = 60.0
    _header_bytes = 0
    _reading_headers = True
    _send_timer: asyncio.TimerHandle | None = None
    _unsent = 0

    # -- header bytes ----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        while data and self._reading_headers:
            room = self.max_header_bytes - self._header_bytes
            if room <= 0:
                self._refuse_headers()
                return
            part, data = data[:room], data[room:]
            self._header_bytes += len(part)
            super().data_received(part)  # may end the headers (on_headers_complete)
            if self.parser is None or self.transport.is_closing():
                return
        if data:
            super().data_received(data)

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_headers, self._header_bytes = True, 0

    def _refuse_headers(self) -> None:
        self._disarm()
        if self.cycle is None or self.cycle.response_complete:  # not inside another response
            self.transport.write(_431)
        self.transport.close()
        self._arm_send()  # the 431 is small; a client that reads nothing is aborted all the same

    # -- send time ---------------------------------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        self._arm_send()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._disarm_send()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.get_write_buffer_size():  # left for the client to take: it has send_timeout s
            self._arm_send()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_send()
        super().connection_lost(exc)

    def _arm_send(self) -> None:
        if self._send_timer is None:
            self._unsent = self.transport.get_write_buffer_size()
            self._send_timer = self.loop.call_later(self.send_timeout, self._send_expired)

    def _disarm_send(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_expired(self) -> None:
        self._send_timer = None
        unsent = self.transport.get_write_buffer_size()
        if not unsent:
            return
        if unsent < self._unsent:  # the client took some: another send_timeout s for the rest
            self._arm_send()
            return
        self.transport.abort()  # close() would wait for the buffer to drain: for ever


def bounded_protocol(header_timeout: float, body_timeout: float, max_header_bytes: int,
                     send_timeout: float) -> type[BoundedProtocol]:
    attrs: dict[str, Any] = {"header_timeout": header_timeout, "body_timeout": body_timeout,
                             "max_header_bytes": max_header_bytes, "send_timeout": send_timeout}
    return type("BoundedProtocol", (BoundedProtocol,), attrs)
