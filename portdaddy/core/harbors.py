"""Harbors: named namespaces (``myapp:fleet``) that tuples, pheromones and fleet agents are scoped to.

A harbor is created on first use (an ``enter``, a tuple ``out`` with ``--harbor``) or explicitly with its
declared ``capabilities``; members declare their own capabilities when they enter. Capabilities are
declarations, not permissions: the arbiter (core/arbiter.py) reports an agent that acts outside them.
Harbors and members are held in memory and written through to the store before each reply.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from portdaddy.core import validate as v
from portdaddy.core.clock import now_ms
from portdaddy.core.events import Event
from portdaddy.core.ops import Ctx, Op, Param
from portdaddy.errors import NotFound, bad_input


@dataclass(slots=True)
class Member:
    agent_id: str
    identity: str | None
    capabilities: list[str]
    joined_at: int

    def to_wire(self) -> dict[str, Any]:
        return {"agentId": self.agent_id, "identity": self.identity, "capabilities": list(self.capabilities),
                "joinedAt": self.joined_at}  # fmt: skip


@dataclass(slots=True)
class Harbor:
    name: str
    capabilities: list[str]
    channels: list[str]
    agent_patterns: list[str]
    created_at: int
    expires_at: int | None
    metadata: dict[str, Any] | None
    members: dict[str, Member] = field(default_factory=dict)

    def expired(self, now: int) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name, "capabilities": list(self.capabilities), "channels": list(self.channels),
            "agentPatterns": list(self.agent_patterns), "members": [m.to_wire() for m in self.members.values()],
            "memberCount": len(self.members), "createdAt": self.created_at, "expiresAt": self.expires_at,
            "metadata": self.metadata,
        }  # fmt: skip


class Harbors:
    name = "harbors"

    def __init__(self, app: Any) -> None:
        self.app = app
        self.store = app.store
        self._harbors: dict[str, Harbor] = {}
        rows = self.store.all(
            "SELECT name, capabilities, channels, agent_patterns, created_at, expires_at, metadata FROM harbors"
        )
        for name, caps, channels, patterns, created, expires, meta in rows:
            self._harbors[name] = Harbor(name, json.loads(caps), json.loads(channels), json.loads(patterns),
                                         created, expires, json.loads(meta) if meta else None)  # fmt: skip
        for harbor, agent, identity, caps, joined in self.store.all(
            "SELECT harbor_name, agent_id, identity, capabilities, joined_at FROM harbor_members"
        ):
            if harbor in self._harbors:
                self._harbors[harbor].members[agent] = Member(agent, identity, json.loads(caps), joined)

    def stats(self) -> dict[str, Any]:
        return {"harbors": len(self._harbors)}

    # -- queries -------------------------------------------------------------------------------------------

    def get(self, name: str) -> Harbor:
        harbor = self._harbors.get(name)
        if harbor is None or harbor.expired(now_ms()):
            raise NotFound("NOT_FOUND", f"no harbor {name!r}; create it with: pd harbor create {name}")
        return harbor

    def find(self, pattern: str = "*", limit: int = 50) -> list[Harbor]:
        self._purge_expired()
        found = [h for name, h in sorted(self._harbors.items()) if fnmatch.fnmatchcase(name, pattern)]
        return found[:limit]

    def of_agent(self, agent_id: str) -> list[Harbor]:
        now = now_ms()
        return [h for h in self._harbors.values() if agent_id in h.members and not h.expired(now)]

    # -- changes -------------------------------------------------------------------------------------------

    def ensure(
        self,
        name: str,
        *,
        capabilities: list[str] | None = None,
        channels: list[str] | None = None,
        agent_patterns: list[str] | None = None,
        expires_ms: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> tuple[Harbor, bool]:
        """The harbor called ``name``, created if missing (an existing one is kept as it is). Inside a write (a tuple
        put or an agent entering it), it is made with that write, and not at all if that is refused."""
        now = now_ms()
        harbor = self._harbors.get(name)
        if harbor is not None and not harbor.expired(now):
            return harbor, False
        if harbor is not None:
            self._delete([harbor])
        harbor = Harbor(name, capabilities or [], channels or [], agent_patterns or [], now,
                        now + expires_ms if expires_ms else None, metadata)  # fmt: skip
        with self.store.write() as db:
            db.execute(
                "INSERT INTO harbors (name, capabilities, channels, agent_patterns, created_at, expires_at, metadata)"
                " VALUES (?,?,?,?,?,?,?)",
                (name, v.optional_json(harbor.capabilities), v.optional_json(harbor.channels),
                 v.optional_json(harbor.agent_patterns), now, harbor.expires_at, v.optional_json(metadata)),
            )  # fmt: skip
        self.store.after_commit(partial(self._harbors.__setitem__, name, harbor))
        return harbor, True

    def enter(self, name: str, agent_id: str, *, identity: str | None = None,
              capabilities: list[str] | None = None) -> Harbor:  # fmt: skip
        now = now_ms()
        caps = capabilities or []
        with self.store.write() as db:
            harbor, _ = self.ensure(name)
            db.execute(
                "INSERT INTO harbor_members (harbor_name, agent_id, identity, capabilities, joined_at) "
                "VALUES (?,?,?,?,?) ON CONFLICT(harbor_name, agent_id) DO UPDATE SET "
                "identity=excluded.identity, capabilities=excluded.capabilities",
                (name, agent_id, identity, v.optional_json(caps), now),
            )
        old = harbor.members.get(agent_id)
        harbor.members[agent_id] = Member(agent_id, identity, caps, old.joined_at if old else now)
        self.app.bus.emit("harbor.enter", harbor=name, agentId=agent_id, capabilities=caps,
                          harborCapabilities=list(harbor.capabilities))  # fmt: skip
        return harbor

    def leave(self, name: str, agent_id: str) -> None:
        harbor = self.get(name)
        if agent_id not in harbor.members:
            raise NotFound("NOT_FOUND", f"agent {agent_id!r} is not a member of harbor {name!r}")
        with self.store.write() as db:
            db.execute("DELETE FROM harbor_members WHERE harbor_name=? AND agent_id=?", (name, agent_id))
        del harbor.members[agent_id]
        self.app.bus.emit("harbor.leave", harbor=name, agentId=agent_id)

    def destroy(self, name: str) -> None:
        self._delete([self.get(name)])

    def _delete(self, harbors: list[Harbor]) -> None:
        with self.store.write() as db:
            db.executemany("DELETE FROM harbors WHERE name=?", [(h.name,) for h in harbors])
            for h in harbors:
                self.store.after_commit(partial(self._harbors.pop, h.name, None))

    def _purge_expired(self) -> None:
        now = now_ms()
        gone = [h for h in self._harbors.values() if h.expired(now)]
        if gone:
            self._delete(gone)

    # -- background ----------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """A dead or unregistered agent leaves every harbor (ref §15): inline (observe), so that it has left before
        `agent.unregister` is answered; a task woken later could lose that to a SIGKILL."""
        with self.app.bus.observe(self._agent_gone, "agent.dead", "agent.unregister"):
            task_status.started()
            await trio.sleep_forever()

    def _agent_gone(self, event: Event) -> None:
        agent_id = event.data.get("agentId")
        for harbor in self.of_agent(agent_id) if isinstance(agent_id, str) else ():
            self.leave(harbor.name, agent_id)


# -- operations ----------------------------------------------------------------------------------------------

_harbor_name = v.name("harbor name", 120)
_capability = v.name("capability", 100, wildcard=True)
_CAPS = Param("capabilities", v.str_list(_capability), aliases=("cap", "caps"))


def _agent(ctx: Ctx, agent_id: str | None) -> str:
    agent = agent_id or ctx.agent_id
    if not agent:
        raise bad_input("agentId is required; pass --agent, set PORT_DADDY_AGENT, or run pd begin first")
    return agent


def _create(ctx: Ctx, *, name: str, capabilities, channels, agentPatterns, expiresIn, metadata) -> dict[str, Any]:
    harbor, created = ctx.app.harbors.ensure(name, capabilities=capabilities, channels=channels,
                                             agent_patterns=agentPatterns, expires_ms=expiresIn,
                                             metadata=metadata)  # fmt: skip
    return {"success": True, "created": created, "harbor": harbor.to_wire()}


def _list(ctx: Ctx, *, pattern: str, limit: int, agentId: str | None) -> dict[str, Any]:
    harbors = ctx.app.harbors.of_agent(agentId) if agentId else ctx.app.harbors.find(pattern, limit)
    wire = [h.to_wire() for h in harbors]
    return {"success": True, "harbors": wire, "count": len(wire)}


def _get(ctx: Ctx, *, name: str) -> dict[str, Any]:
    return {"success": True, "harbor": ctx.app.harbors.get(name).to_wire()}


def _destroy(ctx: Ctx, *, name: str) -> dict[str, Any]:
    ctx.app.harbors.destroy(name)
    return {"success": True, "message": f"destroyed harbor {name}"}


def _enter(ctx: Ctx, *, name: str, agentId: str | None, identity: str | None, capabilities) -> dict[str, Any]:
    agent = _agent(ctx, agentId)
    return {"success": True, "harbor": ctx.app.harbors.enter(name, agent, identity=identity,
                                                             capabilities=capabilities).to_wire()}  # fmt: skip


def _leave(ctx: Ctx, *, name: str, agentId: str | None) -> dict[str, Any]:
    agent = _agent(ctx, agentId)
    ctx.app.harbors.leave(name, agent)
    return {"success": True, "message": f"{agent} left harbor {name}"}


def _members(ctx: Ctx, *, name: str) -> dict[str, Any]:
    members = [m.to_wire() for m in ctx.app.harbors.get(name).members.values()]
    return {"success": True, "members": members, "count": len(members)}


def _pattern(field_name: str, value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 120 or "\x00" in value:
        raise bad_input(f"{field_name} must be a name or a '*' glob of at most 120 characters")
    return value


_NAME = Param("name", _harbor_name, required=True, aliases=("harbor",))
_AGENT = Param("agentId", v.name("agent id"), aliases=("agent",))
OPS = (
    Op(
        "harbor.create",
        _create,
        (
            _NAME,
            _CAPS,
            Param("channels", v.str_list(v.name("channel", 200, wildcard=True))),
            Param("agentPatterns", v.str_list(v.text(200))),
            Param("expiresIn", v.lifetime(), aliases=("expires",)),
            Param("metadata", v.json_object(10_000)),
        ),
        summary="create a harbor with declared capabilities (an existing one is returned unchanged)",
    ),
    Op(
        "harbor.list",
        _list,
        (Param("pattern", _pattern, default="*"), Param("limit", v.integer(1, 200), default=50), _AGENT),
        summary="harbors whose name matches a glob, or those an agent is in",
    ),
    Op("harbor.get", _get, (_NAME,), summary="one harbor with its members"),
    Op("harbor.destroy", _destroy, (_NAME,), summary="delete a harbor and its memberships"),
    Op(
        "harbor.enter",
        _enter,
        (_NAME, _AGENT, Param("identity", v.text(200)), _CAPS),
        summary="join a harbor (created on first use) declaring this member's capabilities",
    ),
    Op("harbor.leave", _leave, (_NAME, _AGENT), summary="leave a harbor"),
    Op("harbor.members", _members, (_NAME,), summary="a harbor's members and their capabilities"),
)

# Capability matching is shared with the arbiter: ``db:*`` covers ``db:write``; ``*`` covers everything.


def covers(capabilities: list[str], wanted: str) -> bool:
    return any(fnmatch.fnmatchcase(wanted, cap) for cap in capabilities)
