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
    Route("POST", "/harbors", "harbor.create"),
    Route("GET", "/harbors", "harbor.list"),
    Route("GET", "/harbors/agent/<agentId>", "harbor.list"),
    Route("GET", "/harbors/<name>", "harbor.get"),
    Route("DELETE", "/harbors/<name>", "harbor.destroy"),
    Route("POST", "/harbors/<name>/enter", "harbor.enter"),
    Route("POST", "/harbors/<name>/leave", "harbor.leave"),
    Route("GET", "/harbors/<name>/members", "harbor.members"),
    Route("POST", "/tuples", "tuple.out"),
    Route("GET", "/tuples", "tuple.rd"),
    Route("DELETE", "/tuples", "tuple.in"),
    Route("GET", "/tuples/poll", "tuple.poll"),
    Route("GET", "/tuples/scan", "tuple.scan"),
    Route("GET", "/tuples/count", "tuple.count"),
    Route("POST", "/pheromone/spray", "pheromone.spray"),
    Route("GET", "/pheromone", "pheromone.list"),
    Route("GET", "/pheromone/files", "pheromone.files"),
    Route("GET", "/pheromone/<table>/<id>", "pheromone.sniff"),
    Route("GET", "/arbiter/status", "arbiter.status"),
    Route("GET", "/arbiter/violations", "arbiter.violations"),
    Route("POST", "/arbiter/test-invariant/<name>", "arbiter.test"),
    Route("GET", "/fleet", "fleet.status"),
    Route("POST", "/fleet/start", "fleet.up"),
    Route("POST", "/fleet/stop", "fleet.down"),
    Route("POST", "/fleet/agent/run", "fleet.run"),
    Route("POST", "/fleet/agent/reset", "fleet.reset"),
    Route("GET", "/fleet/runs", "fleet.runs"),
    Route("GET", "/fleet/logs", "fleet.logs"),
    Route("POST", "/spawn", "spawn.start"),
    Route("GET", "/spawn", "spawn.list"),
    Route("DELETE", "/spawn/<id>", "spawn.kill"),
    Route("GET", "/spawn/<id>/logs", "spawn.logs"),
    Route("GET", "/spawn/<id>/wait", "spawn.wait"),
]

# (method, path, view) for routes whose reply is a stream; the view receives (core_app, request, **path).
STREAMS: list[tuple[str, str, Callable[..., Awaitable[Any]]]] = []
