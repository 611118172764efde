"""The HTTP service: ``embedkit serve`` (FastAPI + uvicorn; routes thin, batching in :mod:`embedkit.serve.batching`).

Routes: ``POST /v1/embeddings`` (OpenAI-compatible; ``dimensions`` and int8 / uint8 / binary
``encoding_format``, see :mod:`embedkit.serve.openai_api`), ``POST /embed`` (texts or images,
per-item errors as :func:`embedkit.embed`; always the backbone's float32 vectors of all its
dimensions: a body asking it for ``dimensions``, ``encoding_format`` or ``precision`` is refused
with 422, never answered with floats it did not ask for), ``POST /predict`` (saved models),
``GET /v1/models``, ``/health``, ``/ready``, ``/metrics`` (Prometheus text).

Every error body is OpenAI's shape ``{"error": {"message", "type", "code"}}``; messages name
positions, types and limits, never the content that was sent. Models come from the command
line only: no request names a file or a model path. The request logic lives in
:mod:`embedkit.serve.service`; this module holds the app, its middleware and the routes. It imports
FastAPI (the ``serve`` extra), so ``import embedkit`` never imports it.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from contextlib import asynccontextmanager
from typing import Any, Callable
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from . import openai_api
from .api_error import ApiError, error_body
from .inflight import InFlight
from .retry import Holds
from .service import Service
from .settings import Limits, Settings

logger = logging.getLogger(__name__)

__all__ = ["ApiError", "Limits", "Settings", "create_app"]

ROUTES = ("/v1/embeddings", "/embed", "/predict", "/v1/models", "/health", "/ready", "/metrics")
OPEN_ROUTES = ("/health",)
BODY_ROUTES = ("/v1/embeddings", "/embed", "/predict")
FORM_ROUTES = ("/embed", "/predict")  # also take a multipart form of images
JSON = "application/json"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ANY_ADDRESS = ("0.0.0.0", "::", "")


def _host_name(value: str) -> str:
    """The host of a ``Host`` header or a URL's netloc, lower case, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0].rstrip(".") if value.count(":") == 1 else value.rstrip(".")


class Budget:
    """The body bytes of the requests in flight, bounded (``--max-inflight-bytes``).

    ``Retry-After`` is measured, not guessed: a request gives back all its bytes when it is
    answered, so :meth:`retry_after` is the time until enough whole requests in flight finish, from
    the measured durations of answered requests of their size (kept for the server's life, not a
    window that forgets them while a long burst runs) and each holder's age; a holder that has run
    longer than measured (or before any was measured) is expected to need as long again as it has
    run. In seconds, an integer, at least 1 (the rule: :mod:`embedkit.serve.retry`).
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.holds = Holds()
        # (token, bytes) of each take: a request's give() is matched to its take by size (a chunked
        # body takes as it arrives: its pieces are given back together, newest first).
        self._taken: list[tuple[int, int]] = []

    def take(self, size: int) -> bool:
        if self.used and self.used + size > self.limit:
            return False
        self.used += size
        if size > 0:
            self._taken.append((self.holds.start(size), size))
        return True

    def give(self, size: int) -> None:
        self.used -= size
        if size <= 0 or not self._taken:
            return
        exact = next((k for k, (_, n) in enumerate(self._taken) if n == size), None)
        if exact is not None:
            self.holds.finish(self._taken.pop(exact)[0])
        else:
            total, pieces = size, []
            while size > 0 and self._taken:  # the pieces of a chunked body: one request, from its first
                token, n = self._taken.pop()
                size -= n
                pieces.append(token)
            for token in pieces[:-1]:
                self.holds.drop(token)
            self.holds.finish(pieces[-1], size=total)
        if self.used == 0 and self._taken:  # nothing in flight: a mismatched piece is stale, forgotten
            self.holds.live.clear()
            self._taken.clear()

    def retry_after(self, size: int) -> int:
        """Seconds (integer, >= 1) until the requests in flight will have given back enough bytes for
        ``size`` more to fit."""
        return self.holds.retry_after(self.used + size - self.limit)


async def _send_error(send: Callable, error: ApiError) -> None:
    body = json.dumps(error_body(error)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: metrics of every request, the API key, and the body size limit.

    The key is checked before the body is read; the size limit is enforced on the declared
    ``Content-Length`` and again on the bytes as they stream in, so no body over the limit is
    ever parsed (413).
    """

    def __init__(self, app: Any, service: Service):
        self.app = app
        self.service = service
        settings = service.settings
        bound = _host_name(settings.host)
        self.hosts = {*LOOPBACK, *(() if bound in ANY_ADDRESS else (bound,)),
                      *(_host_name(h) for h in settings.allowed_hosts)}
        self.origins = {o.strip().rstrip("/").lower() for o in settings.allowed_origins}
        self.budget = Budget(service.limits.max_inflight_bytes)
        self.inflight = InFlight()  # answered 503 shutting_down at the drain deadline

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        status = {"code": 500}
        started = False

        async def sending(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                status["code"] = message["status"]
            await send(message)

        metrics = self.service.metrics
        clock = metrics.timer()
        try:
            error = self._refuse(scope, path)
            if error is not None:
                await _send_error(sending, error)
                return
            limit = self.service.limits.max_body_bytes
            seen = 0
            declared = _declared(scope)
            held = declared or 0  # bytes of the in-flight budget this request holds
            if held and not self.budget.take(held):
                await _send_error(sending, self._busy(held))
                return

            async def receiving() -> dict:
                nonlocal seen, held
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:  # the route's body read fails: the app answers 413
                        raise self._too_large()
                    if seen > held:  # a chunked body: held as it arrives
                        if not self.budget.take(seen - held):
                            raise self._busy(seen - held)
                        held = seen
                return message

            try:
                await self.inflight.run(lambda out: self.app(scope, receiving, out), sending)
            except ApiError as error:  # raised outside the app's handlers
                if not started:
                    await _send_error(sending, error)
            finally:
                self.budget.give(held)
        finally:
            metrics.request(route, status["code"], clock)

    def _busy(self, size: int) -> ApiError:
        retry = self.budget.retry_after(size)
        return ApiError(429, "server_busy", f"the requests in flight hold {self.budget.used} body bytes; the "
                        f"limit is {self.budget.limit} (--max-inflight-bytes); retry after {retry} s",
                        headers={"Retry-After": str(retry)})

    def _too_large(self) -> ApiError:
        limit = self.service.limits.max_body_bytes
        return ApiError(413, "body_too_large", f"the request body is over {limit} bytes (--max-body-bytes)")

    def _refuse(self, scope: dict, path: str) -> ApiError | None:
        headers = dict(scope.get("headers") or [])
        key = self.service.settings.api_key
        if path not in OPEN_ROUTES:
            error = self._cross_origin(headers, bool(key))
            if error is not None:
                return error
        if key and path not in OPEN_ROUTES:
            given = headers.get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            # Digests first: equal lengths, so the comparison time says nothing about the key's length.
            if not hmac.compare_digest(hashlib.sha256(token.strip()).digest(), hashlib.sha256(key.encode()).digest()):
                return ApiError(401, "invalid_api_key", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                type="authentication_error", headers={"WWW-Authenticate": "Bearer"})
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return ApiError(400, "bad_content_length", "the Content-Length header is not a number")
            if size > self.service.limits.max_body_bytes:
                return self._too_large()
        if path in BODY_ROUTES and scope.get("method") == "POST":
            media = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
            if media != JSON.encode() and not (path in FORM_ROUTES and media == b"multipart/form-data"):
                takes = "application/json" + (" or multipart/form-data" if path in FORM_ROUTES else "")
                return ApiError(415, "unsupported_media_type", f"Content-Type must be {takes}")
        return None

    def _cross_origin(self, headers: dict[bytes, bytes], keyed: bool) -> ApiError | None:
        """DNS rebinding and cross-site requests: without a key, the ``Host`` must be a loopback name,
        the bound address or an ``--allowed-host``; a browser's ``Origin`` must be on such a host or
        an ``--allowed-origin`` (with a key too: no page of another origin drives the service)."""
        if "*" not in self.hosts and not keyed:
            host = _host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.hosts:
                return ApiError(421, "host_not_allowed", "the Host header names no address this server answers "
                                "for; add it with --allowed-host (a guard against DNS rebinding)")
        origin = headers.get(b"origin")
        if origin is not None and "*" not in self.origins:
            text = origin.decode("latin-1").strip().rstrip("/").lower()
            try:
                name = urlsplit(text).hostname or ""
            except ValueError:
                name = ""
            if text not in self.origins and not (name and name in self.hosts):
                return ApiError(403, "origin_not_allowed", "requests from a web page of another origin are "
                                "refused; allow its origin with --allowed-origin", type="permission_error")
        return None


def _declared(scope: dict) -> int | None:
    for name, value in scope.get("headers") or []:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def refuse_compact(body: dict[str, Any]) -> None:
    """``/embed`` answers float32 vectors of all D dimensions only: a request for compact ones is a 422."""
    if "dimensions" in body:
        images = f"; {openai_api.IMAGE_COMPACT}" if "images" in body else ""
        raise ApiError(422, "unsupported_dimensions", "/embed returns every dimension as float32; ask "
                       f"/v1/embeddings for 'dimensions' of texts{images}")
    for key in ("encoding_format", "precision"):
        if key in body:
            raise ApiError(422, "invalid_encoding_format", f"/embed returns float32 vectors and takes no '{key}'; "
                           "ask /v1/embeddings for encoding_format int8 | uint8 | binary | base64")


def create_app(settings: Settings, on_fatal: Callable[[], None] | None = None) -> Any:
    """The ASGI app serving ``settings`` (models load in a thread at startup; ``/ready`` says when).

    ``on_fatal`` is called when a model cannot be loaded (the CLI stops the server, exit code 1).
    """
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: Any):
        service.start(on_fatal)
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, service.close)

    app = FastAPI(title="embedkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def error_response(error: ApiError) -> JSONResponse:
        return JSONResponse(error_body(error), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        # The path is not echoed: it is input too.
        return error_response(ApiError(exc.status_code, code, f"{code.replace('_', ' ')}; routes: {', '.join(ROUTES)}"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(ApiError(422, "invalid_request", "the request does not match the schema"))

    @app.exception_handler(ClientDisconnect)
    async def disconnected(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # Nobody reads this answer; it names the outcome in the metrics (499, not 500).
        return error_response(ApiError(499, "client_closed_request", "the client closed the connection"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        return error_response(ApiError(500, "internal_error", "internal server error (see the server log)",
                                       type="server_error"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict:
        service.require_ready()
        return {"status": "ready", "models": service.names()}

    @app.get("/v1/models")
    async def models() -> dict:
        service.require_ready()  # not an empty list while loading: 503 not_ready, as /ready
        return {"object": "list", "data": service.describe()}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = service.metrics.render(service)
        return Response(body, media_type=content_type)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        body = await service.json_body(request)
        return Response(await service.openai_embeddings(body, request), media_type=JSON)

    @app.post("/embed")
    async def embed(request: Request) -> Response:
        body = await service.payload(request)
        refuse_compact(body)
        return Response(await service.embed(body, request), media_type=JSON)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        return Response(await service.predict(await service.payload(request), request), media_type=JSON)

    return Guard(app, service)
