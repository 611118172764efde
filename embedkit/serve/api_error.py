"""The service's typed HTTP error, :class:`ApiError`, and its OpenAI-shaped JSON body."""
from __future__ import annotations

from typing import Any

TYPES = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error",
         499: "client_closed_request", 500: "server_error", 503: "service_unavailable"}


class ApiError(Exception):
    """An HTTP error with OpenAI's body ``{"error": {"message", "type", "code", "param"}}`` (``param``:
    the request field at fault, where one is)."""

    def __init__(self, status: int, code: str, message: str, type: str | None = None,
                 headers: dict[str, str] | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.type = type or TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}


def error_body(error: ApiError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.type, "code": error.code, "param": error.param}}
