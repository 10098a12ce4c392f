"""HTTP routes → operations, with the original's paths (reference §4).

A route only says where an operation's arguments come from (path, query, JSON body); validation and logic
live in the operation. Streaming routes (SSE) that cannot be a single reply register a view of their own in
``STREAMS``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # quart syntax: /services/<id>
    op: str
    # Fields added to the arguments regardless of the request (e.g. a route that fixes a flag).
    fixed: tuple[tuple[str, Any], ...] = ()


ROUTES: list[Route] = [
    Route("GET", "/health", "daemon.health"),
    Route("GET", "/version", "daemon.version"),
    Route("GET", "/status", "daemon.status"),
    Route("POST", "/claim", "port.claim"),
    Route("DELETE", "/release", "port.release"),
    Route("GET", "/services", "port.find"),
    Route("GET", "/services/<id>", "port.get"),
    Route("PUT", "/services/<id>/endpoints/<env>", "port.endpoint"),
]

# (method, path, view) for routes whose reply is a stream; the view receives (core_app, request, **path).
STREAMS: list[tuple[str, str, Callable[..., Awaitable[Any]]]] = []
