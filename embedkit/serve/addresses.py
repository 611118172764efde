"""The forms ``embedkit serve`` takes for a port, an ``--allowed-host`` and an ``--allowed-origin``.

A value that could never match a request (``*.example.com``: no wildcards but ``*`` alone; a URL
given as a host; a host given as an origin, without its scheme; an empty string) is refused at
start-up rather than silently matching nothing. Each check returns the value as the guard compares
it, or raises ValueError saying the expected form.
"""
from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

HOST_FORM = "a host name or address (embed.internal, 10.0.0.7, ::1 or [::1]), optionally with :PORT, or '*' for any"
ORIGIN_FORM = "an origin scheme://host[:port] (https://app.example.org, http://localhost:3000), or '*' for any"
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?", re.IGNORECASE)
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*", re.IGNORECASE)


def check_port(value: str) -> int:
    """A TCP port, 0..65535 (0: any free port)."""
    try:
        port = int(value)
    except ValueError:
        raise ValueError(f"expected a TCP port 0..65535, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"expected a TCP port 0..65535 (0: any free port), got {port}")
    return port


def _is_host(name: str) -> bool:
    if len(name) <= 253 and _NAME.fullmatch(name):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def check_allowed_host(value: str) -> str:
    """An ``--allowed-host``: ``*``, a host name, an IPv4 / IPv6 address (bare or bracketed), with an
    optional ``:PORT`` (the guard compares the name only)."""
    text = value.strip()
    if text == "*":
        return text
    name, port = text, ""
    if text.startswith("["):
        name, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            name = ""
        port = rest[1:]
        ok = "]" in text and ":" in name and _is_host(name)
    elif text.count(":") == 1:
        name, port = text.split(":")
        ok = _is_host(name)
    else:
        ok = bool(text) and _is_host(text)
    if not ok or (port and not (port.isdigit() and int(port) <= 65535)) or (text.endswith(":")):
        raise ValueError(f"expected {HOST_FORM}, got {value!r}")
    return text


def check_allowed_origin(value: str) -> str:
    """An ``--allowed-origin``: ``*`` or ``scheme://host[:port]`` as a browser sends it (no path,
    no user name, no wildcard); returned lower case, without a trailing slash."""
    text = value.strip().rstrip("/").lower()
    if text == "*":
        return text
    try:
        parts = urlsplit(text)
        port = parts.port
        host = parts.hostname or ""
    except ValueError:
        parts, port, host = None, None, ""
    if (parts is None or not _SCHEME.fullmatch(parts.scheme or "") or not text.startswith(f"{parts.scheme}://")
            or not host or not _is_host(host) or "@" in parts.netloc or parts.path or parts.query
            or parts.fragment or (port is None and parts.netloc.endswith(":"))):
        raise ValueError(f"expected {ORIGIN_FORM}, got {value!r}")
    return text
