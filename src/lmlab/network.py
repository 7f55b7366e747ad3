"""Whether a server can be reached now: asked once, quickly, before something would wait on it for long."""
from __future__ import annotations

import socket
import urllib.parse


def unreachable_reason(url: str, timeout: float = 3.0) -> str | None:
    """Why `url`'s host cannot be reached on its port now (no connection within `timeout` s); None if it can."""
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as exc:
        return f"cannot connect to {parsed.hostname}: {exc}"
    return None
