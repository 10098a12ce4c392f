"""HTTP routes → operations, with the original's paths (reference §4).

A route only says where an operation's arguments come from (path, query, JSON body); validation and logic
live in the operation. Streaming routes (SSE) that cannot be a single reply register a view of their own in
``STREAMS``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from portdaddy.http.sse import subscribe_view


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
    Route("POST", "/agents", "agent.register"),
    Route("GET", "/agents", "agent.list"),
    Route("GET", "/agents/<agentId>", "agent.get"),
    Route("DELETE", "/agents/<agentId>", "agent.unregister"),
    Route("POST", "/agents/<agentId>/heartbeat", "agent.heartbeat"),
    Route("GET", "/salvage", "salvage.list", fixed=(("all", True),)),
    Route("GET", "/salvage/pending", "salvage.list"),
    Route("POST", "/salvage/claim/<agentId>", "salvage.claim"),
    Route("POST", "/salvage/complete/<agentId>", "salvage.complete"),
    Route("POST", "/salvage/abandon/<agentId>", "salvage.abandon"),
    Route("DELETE", "/salvage/<agentId>", "salvage.dismiss"),
    Route("POST", "/sessions", "session.start"),
    Route("GET", "/sessions", "session.list"),
    Route("GET", "/sessions/<id>", "session.get"),
    Route("PUT", "/sessions/<id>", "session.end"),
    Route("POST", "/sessions/<id>/notes", "note.add"),
    Route("GET", "/sessions/<id>/notes", "note.list"),
    Route("POST", "/sessions/<id>/files", "file.claim"),
    Route("DELETE", "/sessions/<id>/files", "file.release"),
    Route("POST", "/notes", "note.add"),
    Route("GET", "/notes", "note.list"),
    Route("GET", "/notes/verify", "note.verify"),
    Route("GET", "/files", "file.list"),
    Route("GET", "/files/who-owns", "file.owners"),
    Route("POST", "/files/check", "file.check"),
    Route("POST", "/sugar/begin", "agent.begin"),
    Route("POST", "/sugar/done", "agent.done"),
    Route("GET", "/sugar/whoami", "agent.whoami"),
    Route("GET", "/sitrep", "journal.sitrep"),
    Route("GET", "/activity", "activity.list"),
    Route("GET", "/activity/summary", "activity.summary"),
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
    Route("POST", "/locks/<name>", "lock.acquire"),
    Route("DELETE", "/locks/<name>", "lock.release"),
    Route("PUT", "/locks/<name>", "lock.extend"),
    Route("GET", "/locks/<name>", "lock.get"),
    Route("GET", "/locks", "lock.list"),
    Route("POST", "/msg/<channel>", "msg.publish"),
    Route("GET", "/msg/<channel>", "msg.history"),
    Route("DELETE", "/msg/<channel>", "msg.clear"),
    Route("GET", "/msg/<channel>/poll", "msg.poll"),
    Route("GET", "/msg", "msg.channels"),
    Route("GET", "/channels", "msg.channels"),
    Route("POST", "/agents/<agentId>/inbox", "inbox.send"),
    Route("GET", "/agents/<agentId>/inbox", "inbox.list"),
    Route("GET", "/agents/<agentId>/inbox/stats", "inbox.stats"),
    Route("PUT", "/agents/<agentId>/inbox/<int:messageId>/read", "inbox.read"),
    Route("PUT", "/agents/<agentId>/inbox/read-all", "inbox.read"),
    Route("DELETE", "/agents/<agentId>/inbox", "inbox.clear"),
    Route("POST", "/webhooks", "webhook.register"),
    Route("GET", "/webhooks", "webhook.list"),
    Route("GET", "/webhooks/events", "webhook.events"),
    Route("GET", "/webhooks/<id>", "webhook.get"),
    Route("PUT", "/webhooks/<id>", "webhook.update"),
    Route("DELETE", "/webhooks/<id>", "webhook.delete"),
    Route("POST", "/webhooks/<id>/test", "webhook.test"),
    Route("GET", "/webhooks/<id>/deliveries", "webhook.deliveries"),
    Route("GET", "/fleet", "fleet.status"),
    Route("POST", "/fleet/start", "fleet.up"),
    Route("POST", "/fleet/stop", "fleet.down"),
    Route("POST", "/fleet/agent/run", "fleet.run"),
    Route("POST", "/fleet/agent/reset", "fleet.reset"),
    Route("GET", "/fleet/runs", "fleet.runs"),
    Route("GET", "/fleet/runs/<runId>", "fleet.show"),
    Route("GET", "/fleet/logs", "fleet.logs"),
    Route("POST", "/spawn", "spawn.start"),
    Route("GET", "/spawn", "spawn.list"),
    Route("DELETE", "/spawn/<id>", "spawn.kill"),
    Route("GET", "/spawn/<id>/logs", "spawn.logs"),
    Route("GET", "/spawn/<id>/wait", "spawn.wait"),
]

# (method, path, view) for routes whose reply is a stream; the view receives (core_app, request, **path).
STREAMS: list[tuple[str, str, Callable[..., Awaitable[Any]]]] = [
    ("GET", "/msg/<channel>/subscribe", subscribe_view),
]
