"""Agents: registration, heartbeats, liveness by heartbeat age, the reaper, death and the salvage queue.

Liveness is decided by how long an agent has been silent, never by its PID: ``active`` → ``stale`` past the
stale threshold of its status → ``dead`` past the dead threshold (reference §10.3; ``PORT_DADDY_STALE_AFTER`` /
``PORT_DADDY_DEAD_AFTER`` override every status). The reaper sleeps until the next agent's deadline, not on a
tick. After the daemon starts, and after the host slept (the wall clock ran ahead of the monotonic one), no
agent is judged for a grace period: their silence was ours.

Death (``declare_dead``, also the fleet's entry point) abandons the agent's active sessions (claims and notes
kept), records a salvage entry and tells the lock manager and harbors through the ``agent.dead`` event, all in
one transaction. A dead agent stays listed until its salvage entry is claimed or dismissed (the original
deleted agents before its salvage check could see them, reference §10.4), or until the entry expires: an
entry is kept ``salvage_keep_ms`` (a month) after it last changed, and the reaper wakes for that too. A fleet
agent's runs are agents of their own: the death of one supersedes the pending entries of its earlier runs, and
a success settles them (``settle_fixed``), so a fleet agent that keeps failing is one entry, not one a run.

Agents live in memory (heartbeats are a hot path) and are written through to the store; a fire-and-forget
heartbeat is flushed within a second.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from portdaddy.core import validate as v
from portdaddy.core.clock import now_ms
from portdaddy.core.identity import glob_segment
from portdaddy.core.identity import matches as identity_matches
from portdaddy.core.ops import Ctx, Op, Param
from portdaddy.core.writebehind import WriteBehind
from portdaddy.errors import Conflict, NotFound, PDError, StoreError, bad_input
from portdaddy.text import plural, quoted

log = logging.getLogger("portdaddy.agents")

# Dead thresholds by declared status (reference §10.3); stale is 60% of dead.
DEAD_AFTER_MS = {"starting": 900_000, "ready": 1_200_000, "busy": 1_800_000, "draining": 300_000}
STALE_FRACTION = 0.6
STATUSES = tuple(DEAD_AFTER_MS)
GRACE_MS = 60_000
# What a registered agent may hold at once unless it registered other limits (the original's defaults).
DEFAULT_MAX_LOCKS = 20
DEFAULT_MAX_SERVICES = 50
# The wall clock moving this much further than the monotonic clock between two wake-ups means the host slept.
SLEEP_JUMP_MS = 10_000
# superseded: a later run of the same fleet agent died too, and its entry stands for this one (spec/fleet.md).
SALVAGE_STATES = ("pending", "claimed", "completed", "dismissed", "superseded")
SETTLED = ("completed", "dismissed", "superseded")
_ENTRY_COLUMNS = ("agent_id, identity, purpose, session_ids, last_heartbeat, detected_at, reason, status, claimed_by, "
                  "claimed_at, completed_by, completed_at, failures, failing_since")  # fmt: skip


@dataclass(slots=True)
class Agent:
    id: str
    name: str | None
    type: str
    pid: int | None
    identity: str | None
    purpose: str | None
    status: str
    liveness: str
    capabilities: list[str] | None
    worktree: str | None
    metadata: dict[str, Any] | None
    registered_at: int
    last_heartbeat: int
    dead_at: int | None = None
    max_locks: int | None = None  # None: DEFAULT_MAX_LOCKS
    max_services: int | None = None  # None: DEFAULT_MAX_SERVICES

    @property
    def project(self) -> str | None:
        return self.identity.split(":", 1)[0] if self.identity else None

    def to_wire(self, now: int, stale_ms: int, dead_ms: int) -> dict[str, Any]:
        segments = [*(self.identity or "").split(":"), None, None, None]
        silence = now - self.last_heartbeat
        return {
            "id": self.id, "name": self.name or self.id, "type": self.type, "pid": self.pid,
            "identity": self.identity, "identityProject": segments[0] or None, "identityStack": segments[1],
            "identityContext": segments[2], "purpose": self.purpose, "status": self.status,
            "liveness": self.liveness, "isActive": self.liveness == "active", "capabilities": self.capabilities,
            "worktreeId": self.worktree, "metadata": self.metadata, "registeredAt": self.registered_at,
            "lastHeartbeat": self.last_heartbeat, "timeSinceHeartbeat": silence, "deadAt": self.dead_at,
            "maxLocks": self.max_locks or DEFAULT_MAX_LOCKS, "maxServices": self.max_services or DEFAULT_MAX_SERVICES,
            "healthAssessment": {"liveness": "alive" if self.liveness == "active" else self.liveness,
                                 "staleAfterMs": stale_ms, "deadAfterMs": dead_ms,
                                 "graceRemaining": max(0, dead_ms - silence)},
        }  # fmt: skip


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class Agents:
    name = "agents"

    def __init__(self, app: Any) -> None:
        self.app = app
        self.store = app.store
        self._agents: dict[str, Agent] = {}
        for row in self.store.all(
            "SELECT id, name, type, pid, identity, purpose, status, liveness, capabilities, worktree, metadata, "
            "registered_at, last_heartbeat, dead_at, max_locks, max_services FROM agents"
        ):
            a = Agent(*row)
            a.capabilities, a.metadata = _loads(row[8]), _loads(row[10])
            self._agents[a.id] = a
        self.grace_ms = min(GRACE_MS, *(self.thresholds(s)[0] for s in STATUSES))
        self._grace_until = now_ms() + self.grace_ms
        self._changed = trio.Event()
        self._beats: WriteBehind[str] = WriteBehind(self.store, self._write_heartbeats)
        self.heartbeats = 0

    def stats(self) -> dict[str, Any]:
        counts = {"active": 0, "stale": 0, "dead": 0}
        for a in self._agents.values():
            counts[a.liveness] += 1
        # The earlier failed runs pending fleet entries stand for besides their own (pd status says so).
        repeats = self.store.scalar("SELECT total(failures - 1) FROM salvage WHERE status='pending'")
        return {"agents": len(self._agents), "agentsActive": counts["active"], "agentsStale": counts["stale"],
                "agentsDead": counts["dead"], "agentHeartbeats": self.heartbeats,
                "salvageRepeats": int(repeats)}  # fmt: skip

    def thresholds(self, status: str) -> tuple[int, int]:
        """(stale, dead) silence in ms for an agent of ``status``."""
        s = self.app.settings
        dead = s.dead_after_ms or DEAD_AFTER_MS.get(status, DEAD_AFTER_MS["ready"])
        stale = s.stale_after_ms or round(dead * STALE_FRACTION)
        return min(stale, dead), dead

    def get(self, agent_id: str) -> Agent | None:
        return self._agents.get(agent_id)

    def check_quota(self, agent_id: str | None, what: str, held: Callable[[], int]) -> None:
        """Refuse a live registered agent one more of ``what`` ("locks" or "services") past its limit; ``held()``
        counts what it has, and is called only for such an agent (other owners are not limited, as in the
        original)."""
        agent = self._agents.get(agent_id) if agent_id else None
        if agent is None or agent.liveness == "dead":
            return
        own, default = (
            (agent.max_locks, DEFAULT_MAX_LOCKS) if what == "locks" else (agent.max_services, DEFAULT_MAX_SERVICES)
        )
        limit = own or default
        count = held()
        if count >= limit:
            raise PDError("RESOURCE_LIMIT", f"agent {agent_id} has {count} {what}, its limit; release one, or raise "
                          f"it with: pd agent register --agent {agent_id} --max-{what} N",
                          current=count, max=limit)  # fmt: skip

    def wire(self, agent: Agent, now: int | None = None) -> dict[str, Any]:
        wire = agent.to_wire(now or now_ms(), *self.thresholds(agent.status))
        if agent.liveness == "dead":
            row = self.store.one("SELECT status, failures FROM salvage WHERE agent_id=?", (agent.id,))
            wire["salvageStatus"], wire["salvageFailures"] = row or (None, None)
        return wire

    def list(self, *, identity: str | None = None, active_only: bool = False,
             purpose: str | None = None) -> list[Agent]:  # fmt: skip
        found = []
        for a in self._agents.values():
            if active_only and a.liveness != "active":
                continue
            if identity and not (a.identity and identity_matches(identity, a.identity)):
                continue
            if purpose and purpose.lower() not in (a.purpose or "").lower():
                continue
            found.append(a)
        return sorted(found, key=lambda a: -a.last_heartbeat)

    # -- registration and heartbeats -----------------------------------------------------------------------

    def register(self, agent_id: str, *, identity: str | None = None, purpose: str | None = None,
                 type: str | None = None, pid: int | None = None, capabilities: list[str] | None = None,
                 status: str | None = None, worktree: str | None = None, name: str | None = None,
                 metadata: dict[str, Any] | None = None, max_locks: int | None = None,
                 max_services: int | None = None) -> tuple[Agent, bool]:  # fmt: skip
        """Create or refresh an agent (a dead one comes back to life and takes its work back). (agent, new)."""
        now = now_ms()
        old = self._agents.get(agent_id)

        def keep(given: Any, attr: str, default: Any = None) -> Any:
            return given if given is not None else getattr(old, attr) if old else default

        agent = Agent(agent_id, keep(name, "name"), keep(type, "type", "cli"), keep(pid, "pid"),
                      keep(identity, "identity"), keep(purpose, "purpose"), status or "ready", "active",
                      keep(capabilities, "capabilities"), keep(worktree, "worktree"), keep(metadata, "metadata"),
                      keep(None, "registered_at", now), now, None, keep(max_locks, "max_locks"),
                      keep(max_services, "max_services"))  # fmt: skip
        with self.store.write() as db:
            db.execute(
                "INSERT OR REPLACE INTO agents (id, name, type, pid, identity, purpose, status, liveness, "
                "capabilities, worktree, metadata, registered_at, last_heartbeat, dead_at, max_locks, max_services) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,NULL,?,?)",
                (agent.id, agent.name, agent.type, agent.pid, agent.identity, agent.purpose, agent.status,
                 agent.liveness, v.optional_json(agent.capabilities), agent.worktree, v.optional_json(agent.metadata),
                 agent.registered_at, agent.last_heartbeat, agent.max_locks, agent.max_services),
            )  # fmt: skip
        self._agents[agent_id] = agent
        self.store.on_rollback(partial(self._put_back, agent_id, old))  # a part of `pd begin` that was refused
        self._changed.set()
        if old is None or old.liveness == "dead":
            self._take_back(agent_id)
        self.app.bus.emit("agent.register", agentId=agent_id, identity=agent.identity, purpose=agent.purpose,
                          type=agent.type, pid=agent.pid, capabilities=agent.capabilities)  # fmt: skip
        if old is None:
            self.app.publish("agents", {"type": "registered", "agentId": agent_id, "identity": agent.identity,
                                        "purpose": agent.purpose}, sender="daemon")  # fmt: skip
        return agent, old is None

    def heartbeat(self, agent_id: str, *, pid: int | None = None, durable: bool = True) -> Agent | None:
        """Record a sign of life; None if the agent is unknown. ``durable=False`` defers the write (≤ 1 s)."""
        agent = self._agents.get(agent_id)
        if agent is None:
            return None
        before = (agent.last_heartbeat, agent.pid, agent.liveness, agent.dead_at)
        agent.last_heartbeat = now_ms()
        if pid is not None:
            agent.pid = pid
        was_dead = agent.liveness == "dead"
        if agent.liveness != "active":
            agent.liveness, agent.dead_at = "active", None  # back from silence: judged afresh from now
            durable = True
        self._beats.mark(agent_id)
        if durable:
            try:
                self.flush()
            except StoreError:  # not stored, so it did not happen: the agent stays as it was
                agent.last_heartbeat, agent.pid, agent.liveness, agent.dead_at = before
                raise
        self.heartbeats += 1
        if was_dead:
            self._take_back(agent_id)
        return agent

    def _write_heartbeats(self, db: Any, agent_ids: Iterable[str]) -> None:
        agents = [a for a in map(self._agents.get, agent_ids) if a is not None]  # unregistered meanwhile: skip
        db.executemany("UPDATE agents SET last_heartbeat=?, pid=?, liveness=?, dead_at=? WHERE id=?",
                       [(a.last_heartbeat, a.pid, a.liveness, a.dead_at, a.id) for a in agents])  # fmt: skip

    def flush(self) -> None:
        """Write pending heartbeats now."""
        self._beats.flush()

    def unregister(self, agent_id: str) -> bool:
        """Remove an agent that leaves on purpose: its active sessions end ``abandoned`` and give their files back."""
        agent = self._agents.get(agent_id)
        if agent is None:
            return False
        with self.store.write() as db:
            ended = self.app.sessions.end_for_agent(agent_id)
            db.execute("DELETE FROM agents WHERE id=?", (agent_id,))
        del self._agents[agent_id]
        self.store.on_rollback(partial(self._put_back, agent_id, agent))  # a part of `pd done` that was refused
        self.app.sessions.announce_ended(ended, agent_id, "abandoned")
        self.app.bus.emit("agent.unregister", agentId=agent_id)
        self.app.publish("agents", {"type": "unregistered", "agentId": agent_id}, sender="daemon")
        return True

    def _put_back(self, agent_id: str, agent: Agent | None) -> None:
        """Memory as it was before a change whose write was refused."""
        if agent is None:
            self._agents.pop(agent_id, None)
        else:
            self._agents[agent_id] = agent

    # -- death and salvage ---------------------------------------------------------------------------------

    def _take_back(self, agent_id: str) -> None:
        """A dead agent that speaks again takes its own work back: its pending salvage entry becomes claimed by
        itself, so the queue stops offering another agent the work of one that is doing it (an entry someone
        else claimed stays theirs; ``death_notice`` tells the agent)."""
        with self.store.write() as db:
            db.execute("UPDATE salvage SET status='claimed', claimed_by=?1, claimed_at=?2, changed_at=?2 "
                       "WHERE agent_id=?1 AND status='pending'", (agent_id, now_ms()))  # fmt: skip
            taken = db.changes() > 0
        if taken:
            self.app.bus.emit("salvage.claim", salvageId=agent_id, agentId=agent_id, by=agent_id)
            self.app.publish("resurrection", {"type": "revived", "agentId": agent_id}, sender="daemon")
            self.app.publish("agents", {"type": "revived", "agentId": agent_id}, sender="daemon")

    def settle_own_work(self, agent_id: str, *, finished: bool) -> None:
        """An agent that is done settles the salvage entry of its own death, if the work is still its own:
        completed when it finished, back to the queue (for others) when it gave up."""
        row = self.store.one("SELECT status, claimed_by FROM salvage WHERE agent_id=?", (agent_id,))
        if row is None or not (row[0] == "pending" or row == ("claimed", agent_id)):
            return
        if finished:
            self.salvage_move(agent_id, "complete", agent_id)
        elif row[0] == "claimed":
            self.salvage_move(agent_id, "abandon", agent_id)

    def death_notice(self, agent_id: str) -> str | None:
        """What an agent coming back after it was declared dead must know: what it lost and whose its work is
        now. None if it never died."""
        row = self.store.one("SELECT detected_at, reason, status, claimed_by, completed_by, session_ids FROM salvage "
                             "WHERE agent_id=?", (agent_id,))  # fmt: skip
        if row is None:
            return None
        detected, reason, status, claimed_by, completed_by, session_ids = row
        sessions = ", ".join(json.loads(session_ids)) or "none"
        ago = (now_ms() - detected) // 1000
        notice = (f"agent {agent_id} was declared dead {f'{ago}s' if ago < 120 else f'{ago // 60}m'} ago ({reason}): "
                  f"its locks were released and its sessions ({sessions}) abandoned")  # fmt: skip
        if status == "claimed" and claimed_by == agent_id:
            return (f"{notice}; the work is its own again: carry on in a new session, and run "
                    f"pd salvage complete {agent_id} when it is finished")  # fmt: skip
        if status == "dismissed":
            return f"{notice}; its salvage entry was dismissed (pd salvage --all)"
        by = completed_by if status == "completed" else claimed_by
        return f"{notice}; {by} took its work over ({status}, see pd salvage --all): do not redo it"

    def declare_dead(self, agent_id: str, reason: str, *, supersedes: Iterable[str] = ()) -> bool:
        """Declare an agent dead: the reaper's path, and the fleet's when a run crashes. False if not alive.

        ``supersedes``: the fleet's earlier runs of the same agent; their pending entries are settled by this one,
        which stands for their failures as well as its own."""
        agent = self._agents.get(agent_id)
        if agent is None or agent.liveness == "dead":
            return False
        now = now_ms()
        with self.store.write() as db:
            abandoned = self.app.sessions.abandon_by_agent(agent_id)
            purpose = self.app.sessions.latest_purpose(agent_id) or agent.purpose
            db.execute("UPDATE agents SET liveness='dead', dead_at=?, last_heartbeat=? WHERE id=?",
                       (now, agent.last_heartbeat, agent_id))  # fmt: skip
            superseded, earlier, since = self._settle(supersedes, "superseded", agent_id, now)
            db.execute(
                "INSERT INTO salvage (agent_id, identity, purpose, session_ids, last_heartbeat, detected_at, reason, "
                "status, changed_at, failures, failing_since) VALUES (?1,?2,?3,?4,?5,?6,?7,'pending',?6,?8,?9) "
                "ON CONFLICT(agent_id) DO UPDATE SET "
                "identity=excluded.identity, purpose=excluded.purpose, session_ids=excluded.session_ids, "
                "last_heartbeat=excluded.last_heartbeat, "
                "detected_at=excluded.detected_at, reason=excluded.reason, status='pending', claimed_by=NULL, "
                "claimed_at=NULL, completed_by=NULL, completed_at=NULL, changed_at=excluded.changed_at, "
                "failures=excluded.failures, failing_since=excluded.failing_since",
                (agent_id, agent.identity, purpose, json.dumps(abandoned or self.app.sessions.session_ids_of(agent_id)),
                 agent.last_heartbeat, now, reason, 1 + earlier, min(since, now)),
            )  # fmt: skip
        agent.liveness, agent.dead_at = "dead", now
        log.info("agent %s is dead: %s", agent_id, reason)
        self.app.sessions.announce_ended(abandoned, agent_id, "abandoned")
        self.app.bus.emit("agent.dead", agentId=agent_id, identity=agent.identity, lastHeartbeat=agent.last_heartbeat,
                          sessionIds=abandoned, reason=reason)  # fmt: skip
        self._announce_settled(superseded, "superseded", agent_id)
        self.app.bus.emit("salvage.create", salvageId=agent_id, agentId=agent_id, by="daemon")
        message = {"type": "dead", "agentId": agent_id, "identity": agent.identity, "purpose": purpose,
                   "zombiedSessions": abandoned, "reason": reason, "failures": 1 + earlier}  # fmt: skip
        self.app.publish("resurrection", message, sender="daemon")
        self.app.publish("agents", message, sender="daemon")
        return True

    def settle_fixed(self, agent_ids: Iterable[str], by: str) -> list[str]:
        """A fleet run ``by`` succeeded: the pending entries of its agent's earlier runs (``agent_ids``) are
        settled, ``completed`` by it (the agent does its job again). The entries settled."""
        with self.store.write():
            settled, _, _ = self._settle(agent_ids, "completed", by, now_ms())
        self._announce_settled(settled, "completed", by)
        return settled

    def _settle(self, agent_ids: Iterable[str], status: str, by: str, now: int) -> tuple[list[str], int, float]:
        """Settle the *pending* entries among ``agent_ids`` (inside a write; claimed ones are someone's work and
        stay as they are) as ``status`` by ``by``; their dead agents leave the registry. (The entries settled, the
        failures they stood for, the earliest of those failures or inf.)"""
        ids = json.dumps([a for a in agent_ids if a != by])
        rows = self.store.all("SELECT agent_id, failures, coalesce(failing_since, detected_at) FROM salvage WHERE "
                              "status='pending' AND agent_id IN (SELECT value FROM json_each(?))", (ids,))  # fmt: skip
        if not rows:
            return [], 0, math.inf
        settled = [a for a, _, _ in rows]
        self.store.execute("UPDATE salvage SET status=?1, completed_by=?2, completed_at=?3, changed_at=?3 WHERE "
                           "agent_id IN (SELECT value FROM json_each(?4))",
                           (status, by, now, json.dumps(settled)))  # fmt: skip
        for agent_id in settled:
            self._forget_dead(agent_id)
        return settled, sum(f for _, f, _ in rows), min(t for _, _, t in rows)

    def _announce_settled(self, settled: list[str], status: str, by: str) -> None:
        if settled:
            self.app.bus.emit("salvage.supersede", agentId=by, by=by, status=status, agentIds=settled)

    def _mark_stale(self, agent: Agent) -> None:
        with self.store.write() as db:
            db.execute("UPDATE agents SET liveness='stale' WHERE id=?", (agent.id,))
        agent.liveness = "stale"
        self.app.bus.emit("agent.stale", agentId=agent.id, identity=agent.identity, lastHeartbeat=agent.last_heartbeat)
        self.app.publish("resurrection", {"type": "stale", "agentId": agent.id, "identity": agent.identity,
                                          "lastHeartbeat": agent.last_heartbeat}, sender="daemon")  # fmt: skip

    def salvage_entries(self, *, project: str | None = None, stack: str | None = None,
                        statuses: tuple[str, ...] = ("pending",),
                        limit: int | None = 50) -> list[dict[str, Any]]:  # fmt: skip
        """Salvage entries, newest first (``limit`` None: all of them)."""
        marks = ",".join("?" * len(statuses))
        rows = self.store.all(f"SELECT {_ENTRY_COLUMNS} FROM salvage WHERE status IN ({marks}) "
                              "ORDER BY detected_at DESC", statuses)  # fmt: skip
        entries = []
        for row in rows:
            entry = self._entry(row)
            if project and not _segment_glob(project, entry["identityProject"]):
                continue
            if stack and not _segment_glob(stack, entry["identityStack"]):
                continue
            entries.append(entry)
            if limit is not None and len(entries) >= limit:
                break
        return entries

    def salvage_entry(self, agent_id: str) -> dict[str, Any]:
        row = self.store.one(f"SELECT {_ENTRY_COLUMNS} FROM salvage WHERE agent_id=?", (agent_id,))
        if row is None:
            raise NotFound("NOT_FOUND", f"agent {agent_id} is not in the salvage queue; see pd salvage")
        return self._entry(row)

    def _entry(self, row: tuple[Any, ...]) -> dict[str, Any]:
        (agent_id, identity, purpose, session_ids, last_hb, detected, reason, status, cby, cat, dby, dat, failures,
         since) = row  # fmt: skip
        sessions = json.loads(session_ids)
        segments = [*(identity or "").split(":"), None, None, None]
        return {
            "id": agent_id, "agentId": agent_id, "name": agent_id, "identity": identity,
            "identityProject": segments[0] or None, "identityStack": segments[1], "identityContext": segments[2],
            "purpose": purpose, "sessionId": sessions[-1] if sessions else None, "sessionIds": sessions,
            "lastHeartbeat": last_hb, "staleSince": detected, "detectedAt": detected, "reason": reason,
            "status": status, "claimedBy": cby, "claimedAt": cat, "completedBy": dby, "completedAt": dat,
            "failures": failures, "failingSince": since if since is not None else detected,
            "files": self.app.sessions.claimed_paths(sessions),
            "notes": self.app.sessions.note_texts(sessions, limit=3),
        }  # fmt: skip

    def salvage_move(self, agent_id: str, action: str, by: str | None) -> dict[str, Any]:
        """claim | complete | abandon | dismiss an entry; returns it as it now is."""
        entry = self.salvage_entry(agent_id)
        allowed = {"claim": ("pending",), "complete": ("pending", "claimed"), "abandon": ("claimed",),
                   "dismiss": ("pending", "claimed")}[action]  # fmt: skip
        if entry["status"] == "superseded":
            raise Conflict("CONFLICT", f"salvage entry {agent_id} was superseded by {entry['completedBy']}, a later "
                           "failed run of the same fleet agent, whose entry stands for it; see pd salvage")  # fmt: skip
        if entry["status"] not in allowed:
            raise Conflict("CONFLICT", f"salvage entry {agent_id} is {entry['status']}, not {' or '.join(allowed)}; "
                           "see pd salvage --all")  # fmt: skip
        now = now_ms()
        with self.store.write() as db:
            if action == "claim":
                db.execute("UPDATE salvage SET status='claimed', claimed_by=?, claimed_at=? WHERE agent_id=?",
                           (by, now, agent_id))  # fmt: skip
            elif action == "complete":
                db.execute("UPDATE salvage SET status='completed', completed_by=?, completed_at=?, "
                           "claimed_by=coalesce(claimed_by, ?), claimed_at=coalesce(claimed_at, ?) WHERE agent_id=?",
                           (by, now, by, now, agent_id))  # fmt: skip
            elif action == "abandon":
                db.execute("UPDATE salvage SET status='pending', claimed_by=NULL, claimed_at=NULL WHERE agent_id=?",
                           (agent_id,))  # fmt: skip
            else:
                db.execute("UPDATE salvage SET status='dismissed', completed_at=? WHERE agent_id=?", (now, agent_id))
            db.execute("UPDATE salvage SET changed_at=? WHERE agent_id=?", (now, agent_id))  # its window starts again
            if action in ("claim", "complete", "dismiss"):
                self._forget_dead(agent_id)
        self.app.bus.emit(f"salvage.{action}", salvageId=agent_id, agentId=agent_id, by=by)
        if action in ("claim", "complete"):
            event = {"claim": "claimed", "complete": "resurrected"}[action]
            self.app.publish("resurrection", {"type": event, "agentId": agent_id, "by": by}, sender="daemon")
            if action == "complete":
                self.app.publish("agents", {"type": event, "agentId": agent_id, "by": by}, sender="daemon")
        return self.salvage_entry(agent_id)

    def unclaim(self, agent_id: str, by: str, claimed_at: int) -> None:
        """Give back a claim whose reply never reached its caller: nobody knows they took the work over, which
        would stay claimed, and undone, until its entry expires. Only if that claim still stands."""
        entry = self.salvage_entry(agent_id)
        if (entry["status"], entry["claimedBy"], entry["claimedAt"]) == ("claimed", by, claimed_at):
            self.salvage_move(agent_id, "abandon", by)

    def _forget_dead(self, agent_id: str) -> None:
        """A dead agent leaves the registry once someone has taken over (or dismissed) its work."""
        agent = self._agents.get(agent_id)
        if agent is not None and agent.liveness == "dead":
            self.store.execute("DELETE FROM agents WHERE id=?", (agent_id,))
            self.store.after_commit(partial(self._agents.pop, agent_id, None))

    def expire_salvage(self, now: int) -> None:
        """Drop the salvage entries unchanged for ``salvage_keep_ms``, and forget the dead agents they were for:
        nobody took the work over in that time. Their sessions and notes stay in the journal."""
        cutoff = now - self.app.settings.salvage_keep_ms
        expired = [a for (a,) in self.store.all("SELECT agent_id FROM salvage WHERE changed_at <= ?", (cutoff,))]
        if not expired:
            return
        forgotten = [a for a in expired if (agent := self._agents.get(a)) is not None and agent.liveness == "dead"]
        with self.store.write() as db:
            db.execute("DELETE FROM salvage WHERE changed_at <= ?", (cutoff,))
            db.executemany("DELETE FROM agents WHERE id=?", [(a,) for a in forgotten])
        for agent_id in forgotten:
            del self._agents[agent_id]
        log.info("%d salvage entries expired; %d dead agents left the registry", len(expired), len(forgotten))
        self.app.bus.emit("salvage.expire", agentIds=expired, forgotten=forgotten)

    def holding_work(self, agent_ids: list[str]) -> set[str]:
        """Which of ``agent_ids`` the journal still holds work of: registered (alive, or dead with its work not yet
        taken over), or with a salvage entry someone may still take over or is doing (pending, claimed)."""
        rows = self.store.all("SELECT agent_id FROM salvage WHERE status IN ('pending', 'claimed') AND agent_id IN "
                              "(SELECT value FROM json_each(?))", (json.dumps(agent_ids),))  # fmt: skip
        return {a for a in agent_ids if a in self._agents} | {a for (a,) in rows}

    def forget_settled(self, agent_ids: list[str]) -> None:
        """Drop the settled salvage entries (completed, dismissed, superseded) of agents forgotten with their work
        (inside a write): their sessions are going, so the entries would point at nothing."""
        self.store.execute("DELETE FROM salvage WHERE status IN (SELECT value FROM json_each(?)) "
                           "AND agent_id IN (SELECT value FROM json_each(?))",
                           (json.dumps(SETTLED), json.dumps(agent_ids)))  # fmt: skip

    def _next_expiry(self) -> float:
        """Wall-clock ms when the oldest salvage entry expires (inf if none)."""
        oldest = self.store.scalar("SELECT min(changed_at) FROM salvage")
        return math.inf if oldest is None else oldest + self.app.settings.salvage_keep_ms

    # -- the reaper ----------------------------------------------------------------------------------------

    def _next_deadline(self) -> float:
        """Wall-clock ms of the next liveness change (inf if none)."""
        soonest = math.inf
        for a in self._agents.values():
            if a.liveness == "dead":
                continue
            stale, dead = self.thresholds(a.status)
            soonest = min(soonest, a.last_heartbeat + (stale if a.liveness == "active" else dead))
        return max(soonest, self._grace_until)

    def reap(self, now: int) -> None:
        if now < self._grace_until:
            return
        self.flush()
        for a in list(self._agents.values()):
            if a.liveness == "dead":
                continue
            stale, dead = self.thresholds(a.status)
            silence = now - a.last_heartbeat
            if silence >= dead:
                self.declare_dead(a.id, f"no heartbeat for {silence // 1000}s")
            elif silence >= stale and a.liveness == "active":
                self._mark_stale(a)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self._beats.run)
            task_status.started()
            wall, mono = now_ms(), trio.current_time()
            while True:
                wait_s = (min(self._next_deadline(), self._next_expiry()) - now_ms()) / 1000
                with trio.move_on_after(max(wait_s, 0)):
                    await self._changed.wait()
                self._changed = trio.Event()
                now, mono_now = now_ms(), trio.current_time()
                if (now - wall) - (mono_now - mono) * 1000 > SLEEP_JUMP_MS:
                    log.info("the host slept; no agent is judged for %ds", self.grace_ms // 1000)
                    self._grace_until = now + self.grace_ms
                wall, mono = now, mono_now
                # Refused by the store: judged again a second later (background() waits that long).
                if await self.store.background(partial(self.expire_salvage, now)):
                    await self.store.background(partial(self.reap, now))


def _segment_glob(pattern: str, value: str | None) -> bool:
    return value is not None and glob_segment(pattern, value)


def new_agent_id() -> str:
    return f"agent-{secrets.token_hex(4)}"


# -- operations ----------------------------------------------------------------------------------------------

_CAPABILITY = v.name("capability", 100, wildcard=True)


def caller(ctx: Ctx, agent_id: str | None, *, what: str = "agentId") -> str:
    agent = agent_id or ctx.agent_id
    if not agent:
        raise bad_input(f"{what} is required; pass --agent, set PORT_DADDY_AGENT, or run pd begin first")
    return agent


def salvage_hint(dead: int, project: str) -> str:
    """What an agent joining ``project`` hears of its ``dead`` agents awaiting salvage (the original's wording,
    with the count's noun in the right number)."""
    return f"{plural(dead, 'dead agent')} in {project}:*. Run: pd salvage --project {project}"


def returning(agents: Agents, agent_id: str) -> bool:
    """Whether a sign of life from ``agent_id`` may be its first since it was declared dead (it is dead, or was
    forgotten once its work was taken over): then its reply carries ``death_notice``."""
    agent = agents.get(agent_id)
    return agent is None or agent.liveness == "dead"


def _register_reply(ctx: Ctx, agent: Agent, new: bool, back: bool) -> dict[str, Any]:
    agents: Agents = ctx.app.agents
    reply = {"success": True, "agentId": agent.id, "registered": new,
             "message": "agent registered" if new else "agent updated", "agent": agents.wire(agent),
             "deadAgentsInProject": 0, "salvageHint": None,
             "deathNotice": agents.death_notice(agent.id) if back else None}  # fmt: skip
    if agent.project:
        dead = [e for e in agents.salvage_entries(project=agent.project) if e["id"] != agent.id]
        if dead:
            reply["deadAgentsInProject"] = len(dead)
            reply["salvageHint"] = salvage_hint(len(dead), agent.project)
    return reply


def register_op(ctx: Ctx, *, agentId, identity, purpose, type, pid, capabilities, status, worktree, name,
                metadata, maxLocks, maxServices) -> dict[str, Any]:  # fmt: skip
    agent_id = caller(ctx, agentId)
    back = returning(ctx.app.agents, agent_id)
    agent, new = ctx.app.agents.register(
        agent_id, identity=identity, purpose=purpose, type=type, pid=pid or ctx.pid,
        capabilities=capabilities, status=status, worktree=worktree, name=name, metadata=metadata,
        max_locks=maxLocks, max_services=maxServices,
    )  # fmt: skip
    return _register_reply(ctx, agent, new, back)


def heartbeat_op(ctx: Ctx, *, agentId, pid) -> dict[str, Any]:
    """An unknown agent is registered by its heartbeat, as the original does (spec/journal.md)."""
    agents: Agents = ctx.app.agents
    agent_id = caller(ctx, agentId)
    back = returning(agents, agent_id)
    agent = agents.heartbeat(agent_id, pid=pid, durable=ctx.acknowledged)
    if agent is None:
        agent, new = agents.register(agent_id, pid=pid or ctx.pid)
        return _register_reply(ctx, agent, new, back)
    if not ctx.acknowledged:
        return None  # fire-and-forget: nobody reads a reply
    return {"success": True, "agentId": agent_id, "lastHeartbeat": agent.last_heartbeat,
            "message": "heartbeat recorded", "health": {"liveness": "alive"},
            "deathNotice": agents.death_notice(agent_id) if back else None}  # fmt: skip


def unregister_op(ctx: Ctx, *, agentId) -> dict[str, Any]:
    agent_id = caller(ctx, agentId)
    done = ctx.app.agents.unregister(agent_id)
    return {"success": True, "unregistered": done, "agentId": agent_id,
            "message": "agent unregistered" if done else f"agent {agent_id} was not registered"}  # fmt: skip


def list_op(ctx: Ctx, *, active, identity, purpose) -> dict[str, Any]:
    agents: Agents = ctx.app.agents
    now = now_ms()
    found = [agents.wire(a, now) for a in agents.list(identity=identity, active_only=active, purpose=purpose)]
    return {"success": True, "agents": found, "count": len(found)}


def get_op(ctx: Ctx, *, id) -> dict[str, Any]:
    agents: Agents = ctx.app.agents
    agent = agents.get(id)
    if agent is None:
        raise NotFound("AGENT_NOT_FOUND", f"agent {id} is not registered; see pd agents")
    return {"success": True, "agent": agents.wire(agent)}


def salvage_list_op(ctx: Ctx, *, project, stack, limit, all) -> dict[str, Any]:
    statuses = SALVAGE_STATES if all else ("pending",)
    entries = ctx.app.agents.salvage_entries(project=project, stack=stack, statuses=statuses, limit=limit)
    return {"success": True, "agents": entries, "count": len(entries), "filtered": bool(project or stack)}


# The moves of a salvage entry: each is one op taking the same arguments.
SALVAGE_MOVES = {
    "claim": "take over a dead agent's work: returns its sessions, purpose, notes and files; records lineage",
    "complete": "mark salvaged work finished",
    "abandon": "give a claimed salvage entry back to the queue",
    "dismiss": "drop a salvage entry without taking the work over",
}


def _salvage_op(action: str) -> Any:
    def op(ctx: Ctx, *, id, newAgentId) -> dict[str, Any]:
        agents: Agents = ctx.app.agents
        by = newAgentId or ctx.agent_id
        if action in ("claim", "complete") and not by:
            who = "who takes the work over" if action == "claim" else "who finished the work"
            raise bad_input(f"{who}? name the agent (pd salvage {action} --agent ID, or pd begin first; "
                            "newAgentId over HTTP)")  # fmt: skip
        entry = agents.salvage_move(id, action, by)
        reply: dict[str, Any] = {"success": True, "agent": entry}
        if action == "claim":
            reply["context"] = ctx.app.sessions.salvage_context(entry["sessionIds"], entry["purpose"])
        return reply

    op.__name__ = f"salvage_{action}_op"
    return op


def _unclaim_undelivered(ctx: Ctx, result: dict[str, Any]) -> None:
    entry = result["agent"]
    ctx.app.agents.unclaim(entry["id"], entry["claimedBy"], entry["claimedAt"])


def _status(name: str, value: Any) -> str:
    return v.one_of(*STATUSES)(name, value)


_AGENT = Param("agentId", v.AGENT_ID, aliases=("id",))
# Ops that name *another* agent read ``id`` first: a bound IPC client adds its own ``agentId`` to every request.
_OTHER = Param("id", v.AGENT_ID, required=True, aliases=("agentId",))
_PATH_TEXT = v.text(4096)


def _worktree(name: str, value: Any) -> str:
    """An absolute path: a relative one would be read against the daemon's own directory, which means nothing
    to a client elsewhere (spec/journal.md, "Sessions")."""
    path = _PATH_TEXT(name, value)
    if not path.startswith("/"):
        raise bad_input(f"{name} {quoted(path)} is a relative path, which the daemon cannot place; send "
                        "the worktree's absolute path, e.g. /home/me/project (pd and the SDK resolve it)")  # fmt: skip
    return path


# The caller's worktree root: scopes its current session and its claims' repository (core/repository.py).
WORKTREE = Param("worktree", _worktree, aliases=("worktreeId",))

REGISTER_PARAMS = (
    Param("identity", v.identity),
    Param("purpose", v.text(500)),
    Param("type", v.name("agent type", 32), aliases=("agentType",)),
    Param("pid", v.pid),
    Param("capabilities", v.str_list(_CAPABILITY), aliases=("caps",)),
    Param("status", _status),
    WORKTREE,
    Param("name", v.text(100)),
    Param("metadata", v.json_object(16_000)),
    Param("maxLocks", v.integer(1, 100_000)),
    Param("maxServices", v.integer(1, 100_000)),
)

OPS = (
    Op(
        "agent.register",
        register_op,
        (_AGENT, *REGISTER_PARAMS),
        summary="register or refresh an agent (agentId, identity, purpose, type, pid, capabilities, status, "
        "maxLocks, maxServices)",
    ),
    Op(
        "agent.heartbeat",
        heartbeat_op,
        (_AGENT, Param("pid", v.pid)),
        fire_and_forget=True,
        summary="record a sign of life (fire-and-forget allowed); an unknown agent is registered",
    ),
    Op(
        "agent.unregister",
        unregister_op,
        (_AGENT,),
        summary="remove an agent; its active sessions end abandoned and release their files",
    ),
    Op(
        "agent.list",
        list_op,
        (
            Param("active", v.boolean, default=False),
            Param("identity", v.identity_pattern),
            Param("purpose", v.text(200)),
        ),
        summary="agents with liveness (active / stale / dead), most recent heartbeat first",
    ),
    Op("agent.get", get_op, (_OTHER,), summary="one agent with its liveness and thresholds"),
    Op(
        "salvage.list",
        salvage_list_op,
        (
            Param("project", v.name("project", 64, wildcard=True)),
            Param("stack", v.name("stack", 64, wildcard=True)),
            Param("limit", v.integer(1, 500), default=50),
            Param("all", v.boolean, default=False),
        ),
        summary="dead agents' work awaiting salvage (all=true: every entry), with purpose, files and last notes",
    ),
    *(
        Op(
            f"salvage.{action}",
            _salvage_op(action),
            (_OTHER, Param("newAgentId", v.AGENT_ID)),
            summary=summary,
            undo=_unclaim_undelivered if action == "claim" else None,
        )
        for action, summary in SALVAGE_MOVES.items()
    ),
)
