"""uvicorn, configured for callers that may be hostile: connection time limits, a drain deadline.

uvicorn closes a keep-alive connection idle for ``timeout_keep_alive`` s and answers 503 beyond
``limit_concurrency`` open connections, but it has no limit on the time a client may take to send
its request: a connection that never sends, or sends its headers a line at a time, or half a body,
is held for ever. :class:`TimedProtocol` (uvicorn's httptools protocol) adds the two limits that
nginx (``client_header_timeout``, ``client_body_timeout``) and TEI's axum server have:

* the request line and headers must arrive within ``header_timeout`` s of the connection opening
  or of the request's first byte;
* the body must arrive within ``body_timeout`` s of the headers.

Past either, the connection is closed (a route reading the body sees a disconnect: 499).

Beyond ``limit_concurrency`` (``--max-connections`` + 1: that many may be open) uvicorn answers its
own plain-text 503; here that answer is the service's JSON error instead (503 ``too_many_connections``, ``Retry-After: 1``,
``Connection: close``), so a client parses every refusal the same way.

:class:`Server` starts the drain deadline on SIGTERM / SIGINT (:meth:`Service.begin_drain`) and
says which port it bound (``--port 0``).
"""
from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, Callable

import uvicorn
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .api_error import ApiError, error_body

# How long after the drain deadline uvicorn waits for the 503s to be written before it cancels.
FLUSH_SECONDS = 2.0
# How long the banner waits, once bound, for the models to load or fail (a bad name fails in ~1 s):
# a start that fails that early prints no address; a later failure says "not serving".
BANNER_WAIT = 3.0


class TimedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body read time limits (class attributes set
    per server by :func:`timed_protocol`)."""

    header_timeout: float = 10.0
    body_timeout: float = 60.0
    _timer: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self.header_timeout)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(self.body_timeout)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # uvicorn picks its plain-text 503 app past limit_concurrency (both for a new request and
        # a pipelined one, which both start here): answer the service's JSON error instead
        super()._start_asgi_task(cycle, too_many_connections if app is service_unavailable else app)


_BUSY = json.dumps(error_body(ApiError(
    503, "too_many_connections", "the server holds its maximum of open connections (--max-connections); "
    "retry shortly"))).encode()


async def too_many_connections(scope: Any, receive: Any, send: Any) -> None:
    """The JSON 503 answered past ``limit_concurrency`` (an ASGI app; the connection is closed)."""
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(_BUSY)).encode()),
        (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": _BUSY, "more_body": False})


def timed_protocol(header_timeout: float, body_timeout: float) -> type[TimedProtocol]:
    return type("TimedProtocol", (TimedProtocol,), {"header_timeout": header_timeout, "body_timeout": body_timeout})


class Server(uvicorn.Server):
    """uvicorn's server that starts ``on_drain()`` on the first SIGTERM / SIGINT (``on_force()`` on a
    second SIGINT, when uvicorn stops waiting) and prints the address it bound (the real port when
    asked for port 0) once it is bound, unless the models already failed to load."""

    def __init__(self, config: uvicorn.Config, on_drain: Callable[[], None], banner: str = "embedkit serve",
                 on_force: Callable[[], None] | None = None, failed: Callable[[], bool] = lambda: False,
                 settled: Callable[[], bool] = lambda: True):
        super().__init__(config)
        self.on_drain = on_drain
        self.on_force = on_force  # a second Ctrl-C: the drain deadline at once
        self.failed = failed  # the models cannot be loaded: no banner, the process is about to exit 1
        self.settled = settled  # the models are loaded or failed
        self.banner = banner
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        # The banner waits for the models in a task of its own: startup returns at once, so a
        # SIGTERM in those seconds meets the main loop and its drain (uvicorn skips shutdown when
        # should_exit is set before startup returns).
        self._announcing = asyncio.ensure_future(self._announce())

    async def _announce(self) -> None:
        assert self._loop is not None
        until = self._loop.time() + BANNER_WAIT
        while not self.settled() and not self.should_exit and self._loop.time() < until:
            await asyncio.sleep(0.05)
        if self.failed():
            return
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                print(f"{self.banner}: http://{shown}:{port} (SIGTERM or Ctrl-C drains and stops)",
                      file=sys.stderr, flush=True)

    async def shutdown(self, sockets: Any = None) -> None:
        await super().shutdown(sockets)
        if self.force_exit:  # uvicorn skips the app's shutdown then: stop its workers all the same
            await self.lifespan.shutdown()

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        if self._loop is None:
            return
        if not self._draining:
            self._draining = True
            self._loop.call_soon_threadsafe(self.on_drain)
        elif self.force_exit and self.on_force is not None:  # uvicorn stops waiting: answer what is in flight now
            self._loop.call_soon_threadsafe(self.on_force)
