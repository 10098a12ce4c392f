"""The arbiter: an observer of every event, checking six invariants (spec/invariants.md).

It only observes: it never refuses an operation. A broken invariant becomes a stored violation (rule,
severity, agent, details) and an ``arbiter.violation`` event. In strict mode (``PORT_DADDY_ARBITER_STRICT=1``)
a critical violation is also escalated to the salvage path ("man overboard"): the event says so and a message
goes to the ``resurrection`` channel, where salvage and humans listen.

What the arbiter knows about agents, notes and locks it learns from the stream since it started (it keeps no
tables of its own besides violations), so after a restart each rule starts from what it sees next. That memory
follows what is live: an agent's entry goes when it leaves the registry (unregistered, or dead and its salvage
entry settled or expired), a session's chain when the session ends (and the least recently used beyond
MAX_CHAINS), a lock's holder at its release.

Violations are history, kept as the activity log is: 7 days and the newest MAX_ROWS (a stale agent leaves a
warning each, so they add up with throughput); pruned at start and every PRUNE_EVERY recorded. The counts in
the status are of what is kept.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import trio

from portdaddy.core import validate as v
from portdaddy.core.clock import now_ms
from portdaddy.core.events import Event
from portdaddy.core.harbors import covers
from portdaddy.core.ops import Ctx, Op, Param
from portdaddy.procfs import stat_fields

log = logging.getLogger("portdaddy.arbiter")

CRITICAL, VIOLATION, WARNING = "critical", "violation", "warning"
ESCROW_KEYS = ("escrow", "escrowUsd", "bondUsd")
DEFAULT_SALVAGE_WINDOW_S = 5.0
# Note chains remembered at most. Sessions that end drop theirs; this bounds the rest: notes added to a session
# after it ended (nothing forbids it) and sessions nobody ends. Forgetting one costs only its baseline.
MAX_CHAINS = 4096
RETENTION_MS = 7 * 86_400_000  # violations kept, as the activity log's rows
MAX_ROWS = 10_000
PRUNE_EVERY = 500  # violations recorded between two prunes


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    category: str
    severity: str
    description: str


RULES = {r.name: r for r in (
    Rule("PID_SQUATTING", "identity", CRITICAL,
         "a port claimed for an agent by a live process outside the agent's registered process tree"),
    Rule("CAP_ESCALATION", "capability", CRITICAL,
         "an agent takes a lock or declares harbor capabilities its registration (or the harbor) does not cover"),
    Rule("NOTE_MONOTONICITY", "session", CRITICAL,
         "each session's notes form a chain: seq = previous + 1 and prevHash = the previous note's hash"),
    Rule("ESCROW_POSITIVE", "economics", VIOLATION,
         "escrow / escrowUsd / bondUsd declared in a session's metadata stays a number > 0"),
    Rule("LOCK_OWNER_VALID", "coordination", VIOLATION,
         "only the owner releases a lock unless forced, and a lock never has two holders"),
    Rule("HEARTBEAT_FRESHNESS", "liveness", WARNING,
         "stale agents are flagged; a dead agent gets a salvage entry within the salvage window"),
)}  # fmt: skip


@dataclass(slots=True)
class _Agent:
    pid: int | None
    capabilities: list[str] | None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def descends_from(pid: int, ancestor: int) -> bool | None:
    """Whether ``pid`` is ``ancestor`` or below it in the process tree; None when it cannot be told."""
    for _ in range(128):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        try:
            pid = int(stat_fields(pid)[1])
        except (OSError, ValueError, IndexError):
            return None
    return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _caps(value: Any) -> list[str] | None:
    """Declared capabilities; None (or an empty list) means the agent declared none and is unconstrained."""
    if isinstance(value, list) and value and all(isinstance(c, str) for c in value):
        return value
    return None


class Arbiter:
    name = "arbiter"

    def __init__(self, app: Any, *, strict: bool | None = None, salvage_window_s: float | None = None) -> None:
        self.app = app
        self.store = app.store
        self.strict = strict if strict is not None else os.environ.get("PORT_DADDY_ARBITER_STRICT", "") in ("1", "true")
        window = os.environ.get("PORT_DADDY_ARBITER_SALVAGE_WINDOW")
        self.salvage_window_s = salvage_window_s or (float(window) if window else DEFAULT_SALVAGE_WINDOW_S)
        self.started_at = now_ms()
        self.checked = dict.fromkeys(RULES, 0)
        self.recorded = 0  # since start, for pruning every PRUNE_EVERY
        self._prune()  # and count what is kept: found, serious
        self.forced_releases = 0
        self.events_seen = 0
        self._agents: dict[str, _Agent] = {}
        self._chains: dict[str, tuple[int, Any]] = {}  # session id -> (seq, hash) of its last note; LRU order
        self._holders: dict[str, str] = {}
        self._awaiting_salvage: dict[str, float] = {}  # agent id -> trio deadline
        self._deadline = trio.CancelScope()  # run() sleeps in it until the first salvage deadline

    def stats(self) -> dict[str, Any]:
        return {"arbiterViolations": sum(self.found.values()), "arbiterSerious": self.serious}

    # -- the loop ------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Checks run inline at emit (bus.observe): a task woken per event cost every lock grant and claim a
        # scheduler pass. This task only wakes for salvage deadlines.
        with self.app.bus.observe(self.check):
            task_status.started()
            while True:
                with trio.CancelScope() as self._deadline:
                    self._deadline.deadline = min(self._awaiting_salvage.values(), default=math.inf)
                    await trio.sleep_forever()
                await self.store.background(self._check_salvage_deadlines)  # refused: still due, tried again

    def check(self, ev: Event) -> None:
        if ev.kind.startswith("arbiter."):
            return
        self.events_seen += 1
        handler = _HANDLERS.get(ev.kind)
        if handler is not None:
            handler(self, ev.data)
        metadata = ev.data.get("metadata")
        if isinstance(metadata, dict) and any(k in metadata for k in ESCROW_KEYS):
            self._escrow(ev.data, metadata)

    # -- rules ---------------------------------------------------------------------------------------------

    def _register(self, d: dict[str, Any]) -> None:
        agent = d.get("agentId")
        if isinstance(agent, str):
            self._agents[agent] = _Agent(_int(d.get("pid")), _caps(d.get("capabilities")))

    def _forget(self, d: dict[str, Any]) -> None:
        self._agents.pop(d.get("agentId"), None)
        self._awaiting_salvage.pop(d.get("agentId"), None)

    def _salvage_settled(self, d: dict[str, Any]) -> None:
        """A dead agent leaves the registry when its work is claimed, completed or dismissed, with no
        ``agent.unregister``: its entry here went with it, else one was kept for every agent that ever died."""
        agent = d.get("agentId")
        if agent in self._agents and self.app.agents.get(agent) is None:
            del self._agents[agent]

    def _salvage_superseded(self, d: dict[str, Any]) -> None:
        """A fleet run's death or success settled its agent's earlier entries (``agentIds``): those dead agents left."""
        for agent in d.get("agentIds") or ():
            self._salvage_settled({"agentId": agent})

    def _salvage_expired(self, d: dict[str, Any]) -> None:
        """Dead agents whose salvage entry expired left the registry (``forgotten``)."""
        for agent in d.get("forgotten") or ():
            self._agents.pop(agent, None)

    def _session_end(self, d: dict[str, Any]) -> None:
        self._chains.pop(d.get("sessionId"), None)

    def _service_claim(self, d: dict[str, Any]) -> None:
        agent_id, pid = d.get("agentId"), _int(d.get("pid"))
        agent = self._agents.get(agent_id)
        if agent is None or agent.pid is None or pid is None:
            return
        self.checked["PID_SQUATTING"] += 1
        # The agent's own process, or a child of it (a `pd claim` run from its shell), may claim for it. A dead
        # registered process (an agent registered by a short-lived `pd begin`) leaves nothing to squat on.
        if pid == agent.pid or not pid_alive(agent.pid) or descends_from(pid, agent.pid) is not False:
            return
        self.violation("PID_SQUATTING", agent_id, f"port {d.get('port')} ({d.get('serviceId')}) claimed for "
                       f"{agent_id} by pid {pid}, outside its registered pid {agent.pid}",
                       serviceId=d.get("serviceId"), port=d.get("port"), pid=pid, registeredPid=agent.pid)  # fmt: skip

    def _lock_acquire(self, d: dict[str, Any]) -> None:
        name, owner = d.get("name"), d.get("owner")
        if not isinstance(name, str):
            return
        agent = self._agents.get(owner)
        if agent is not None and agent.capabilities is not None:
            self.checked["CAP_ESCALATION"] += 1
            if not covers(agent.capabilities, name):
                self.violation("CAP_ESCALATION", owner, f"{owner} took lock {name!r} outside its capabilities "
                               f"{agent.capabilities}", lock=name, capabilities=agent.capabilities)  # fmt: skip
        self.checked["LOCK_OWNER_VALID"] += 1
        holder = self._holders.get(name)
        if holder is not None and holder != owner:
            self.violation("LOCK_OWNER_VALID", owner, f"lock {name!r} granted to {owner} while {holder} still "
                           "holds it (no release between)", severity=CRITICAL, lock=name, holder=holder)  # fmt: skip
        self._holders[name] = owner

    def _lock_release(self, d: dict[str, Any]) -> None:
        name = d.get("name")
        owner = d.get("owner") or self._holders.get(name)
        self._holders.pop(name, None)
        by = d.get("by")
        if d.get("reason", "release") != "release" or by is None or owner is None:
            return  # expiry, owner death and disconnects are the daemon's own releases
        self.checked["LOCK_OWNER_VALID"] += 1
        if d.get("forced"):
            self.forced_releases += 1
        elif by != owner:
            self.violation("LOCK_OWNER_VALID", by, f"{by} released lock {name!r} owned by {owner} without force",
                           lock=name, owner=owner)  # fmt: skip

    def _harbor_enter(self, d: dict[str, Any]) -> None:
        agent_id, harbor = d.get("agentId"), d.get("harbor")
        wanted = [c for c in d.get("capabilities") or () if isinstance(c, str)]
        agent = self._agents.get(agent_id)
        limits = [("its registration", agent.capabilities if agent else None),
                  (f"harbor {harbor}", _caps(d.get("harborCapabilities")))]  # fmt: skip
        for source, allowed in limits:
            if allowed is None:
                continue
            self.checked["CAP_ESCALATION"] += 1
            beyond = [c for c in wanted if not covers(allowed, c)]
            if beyond:
                self.violation("CAP_ESCALATION", agent_id, f"{agent_id} entered harbor {harbor} declaring {beyond}, "
                               f"beyond {source} ({allowed})", harbor=harbor, capabilities=beyond)  # fmt: skip

    def _note(self, d: dict[str, Any]) -> None:
        session, seq, digest = d.get("sessionId"), _int(d.get("seq")), d.get("hash")
        if not isinstance(session, str) or seq is None:
            return
        self.checked["NOTE_MONOTONICITY"] += 1
        previous = self._chains.pop(session, None)
        self._chains[session] = (seq, digest)  # re-inserted: the most recently used is last
        if len(self._chains) > MAX_CHAINS:
            del self._chains[next(iter(self._chains))]
        if previous is None:
            return  # the first note seen for a session (since start) is the baseline
        last_seq, last_hash = previous
        problems = []
        if seq != last_seq + 1:
            problems.append(f"seq {seq} after {last_seq}")
        if d.get("prevHash") != last_hash:
            problems.append("prevHash does not match the previous note's hash")
        if problems:
            self.violation("NOTE_MONOTONICITY", d.get("agentId"), f"session {session}: {'; '.join(problems)}",
                           sessionId=session, seq=seq, previousSeq=last_seq)  # fmt: skip

    def _escrow(self, d: dict[str, Any], metadata: dict[str, Any]) -> None:
        self.checked["ESCROW_POSITIVE"] += 1
        bad = {k: metadata[k] for k in ESCROW_KEYS if k in metadata
               and not (isinstance(metadata[k], int | float) and not isinstance(metadata[k], bool)
                        and math.isfinite(metadata[k]) and metadata[k] > 0)}  # fmt: skip
        if bad:
            self.violation("ESCROW_POSITIVE", d.get("agentId"), f"session {d.get('sessionId')} declares {bad}; "
                           "escrow must stay > 0", sessionId=d.get("sessionId"), values=bad)  # fmt: skip

    def _stale(self, d: dict[str, Any]) -> None:
        self.checked["HEARTBEAT_FRESHNESS"] += 1
        last = d.get("lastHeartbeat")
        silent = f"silent for {max(0, now_ms() - last) // 1000}s" if isinstance(last, int) else "never heard from"
        self.violation("HEARTBEAT_FRESHNESS", d.get("agentId"), f"agent {d.get('agentId')} is stale ({silent})",
                       lastHeartbeat=last)  # fmt: skip

    def _dead(self, d: dict[str, Any]) -> None:
        agent = d.get("agentId")
        if isinstance(agent, str):
            self.checked["HEARTBEAT_FRESHNESS"] += 1
            deadline = self._awaiting_salvage[agent] = trio.current_time() + self.salvage_window_s
            self._deadline.deadline = min(self._deadline.deadline, deadline)

    def _salvaged(self, d: dict[str, Any]) -> None:
        self._awaiting_salvage.pop(d.get("agentId"), None)

    def _check_salvage_deadlines(self) -> None:
        now = trio.current_time()
        for agent, deadline in list(self._awaiting_salvage.items()):
            if deadline <= now:
                self.violation("HEARTBEAT_FRESHNESS", agent, f"agent {agent} died and no salvage entry was made "
                               f"within {self.salvage_window_s:g}s", severity=CRITICAL)  # fmt: skip
                del self._awaiting_salvage[agent]

    # -- recording -----------------------------------------------------------------------------------------

    def violation(self, rule: str, agent_id: Any, details: str, *, severity: str | None = None,
                  **facts: Any) -> dict[str, Any]:  # fmt: skip
        severity = severity or RULES[rule].severity
        agent_id = agent_id if isinstance(agent_id, str) else None
        at = now_ms()
        body = json.dumps({"message": details, **facts}, separators=(",", ":"), default=str)
        with self.store.write() as db:
            db.execute("INSERT INTO arbiter_violations (at, rule, severity, agent_id, details) VALUES (?,?,?,?,?)",
                       (at, rule, severity, agent_id, body))  # fmt: skip
            vid = db.last_insert_rowid()
        self.found[rule] += 1
        self.serious += severity != WARNING
        self.recorded += 1
        if self.recorded % PRUNE_EVERY == 0:
            self._prune()
        overboard = self.strict and severity == CRITICAL and not facts.get("synthetic")
        self.app.bus.emit("arbiter.violation", rule=rule, severity=severity, agentId=agent_id, details=details,
                          violationId=vid, manOverboard=overboard)  # fmt: skip
        if overboard:
            self.app.publish("resurrection", {"type": "man_overboard", "rule": rule, "agentId": agent_id,
                                              "details": details, "violationId": vid}, sender="arbiter")  # fmt: skip
        log.warning("arbiter: %s (%s) %s", rule, severity, details)
        return {"id": vid, "timestamp": at, "rule": rule, "severity": severity, "agentId": agent_id,
                "details": json.loads(body)}  # fmt: skip

    def _prune(self) -> None:
        """Drop violations older than RETENTION_MS and beyond the newest MAX_ROWS; count what is left."""
        with self.store.write() as db:
            db.execute("DELETE FROM arbiter_violations WHERE at < ?", (now_ms() - RETENTION_MS,))
            db.execute("DELETE FROM arbiter_violations WHERE id <= (SELECT id FROM arbiter_violations ORDER BY id DESC "
                       "LIMIT 1 OFFSET ?)", (MAX_ROWS,))  # fmt: skip
        self.found = dict.fromkeys(RULES, 0)
        for rule, n in self.store.all("SELECT rule, count(*) FROM arbiter_violations GROUP BY rule"):
            if rule in self.found:
                self.found[rule] = n
        # Beyond warnings (a stale agent is one): what `pd status` calls for a look at.
        self.serious = self.store.scalar("SELECT count(*) FROM arbiter_violations WHERE severity != ?", (WARNING,))

    def violations(self, *, since: int | None = None, rule: str | None = None, limit: int = 50,
                   offset: int = 0) -> tuple[list[dict[str, Any]], int]:  # fmt: skip
        where = "WHERE at >= ? AND (? IS NULL OR rule = ?)"
        args = (since or 0, rule, rule)
        total = self.store.scalar(f"SELECT count(*) FROM arbiter_violations {where}", args)
        rows = self.store.all(
            f"SELECT id, at, rule, severity, agent_id, details FROM arbiter_violations {where} "
            "ORDER BY id DESC LIMIT ? OFFSET ?", (*args, limit, offset),
        )  # fmt: skip
        return [{"id": i, "timestamp": at, "rule": r, "severity": s, "agentId": a, "details": json.loads(d)}
                for i, at, r, s, a, d in rows], total  # fmt: skip

    def status(self) -> dict[str, Any]:
        return {
            "success": True, "active": True, "strictMode": self.strict,
            "mode": "strict_enforcement" if self.strict else "observe_only",
            "criticalAction": "man_overboard" if self.strict else "log_only",
            "rulesCount": len(RULES), "rules": list(RULES),
            "ruleDetails": [{"name": r.name, "description": r.description, "category": r.category,
                             "defaultSeverity": r.severity, "coverage": self.checked[r.name],
                             "violations": self.found[r.name]} for r in RULES.values()],
            "violationsCount": sum(self.found.values()), "eventsSeen": self.events_seen,
            "forcedReleases": self.forced_releases, "awaitingSalvage": sorted(self._awaiting_salvage),
            "tracking": {"agents": len(self._agents), "noteChains": len(self._chains),
                         "lockHolders": len(self._holders)},
            "salvageWindowS": self.salvage_window_s, "startedAt": self.started_at,
            "uptimeMs": now_ms() - self.started_at,
        }  # fmt: skip


_HANDLERS = {
    "agent.register": Arbiter._register,
    "agent.unregister": Arbiter._forget,
    "service.claim": Arbiter._service_claim,
    "lock.acquire": Arbiter._lock_acquire,
    "lock.release": Arbiter._lock_release,
    "harbor.enter": Arbiter._harbor_enter,
    "note.add": Arbiter._note,
    "agent.stale": Arbiter._stale,
    "agent.dead": Arbiter._dead,
    "salvage.create": Arbiter._salvaged,
    "salvage.claim": Arbiter._salvage_settled,
    "salvage.complete": Arbiter._salvage_settled,
    "salvage.dismiss": Arbiter._salvage_settled,
    "salvage.supersede": Arbiter._salvage_superseded,
    "salvage.expire": Arbiter._salvage_expired,
    "session.end": Arbiter._session_end,
}


# -- operations ----------------------------------------------------------------------------------------------


def _status(ctx: Ctx) -> dict[str, Any]:
    return ctx.app.arbiter.status()


def _violations(ctx: Ctx, *, since: int | None, rule: str | None, limit: int, offset: int) -> dict[str, Any]:
    found, total = ctx.app.arbiter.violations(since=since, rule=rule, limit=limit, offset=offset)
    return {"success": True, "violations": found, "count": len(found), "total": total}


def _test(ctx: Ctx, *, name: str) -> dict[str, Any]:
    found = ctx.app.arbiter.violation(name, ctx.agent_id, f"synthetic {name} violation (arbiter test)", synthetic=True)
    return {"success": True, "violation": found}


OPS = (
    Op("arbiter.status", _status, summary="the invariants checked, events checked per rule, counts and mode"),
    Op(
        "arbiter.violations",
        _violations,
        (
            Param("since", v.time_or_ago),
            Param("rule", v.one_of(*RULES)),
            Param("limit", v.integer(1, 1000), default=50),
            Param("offset", v.integer(0, None), default=0),
        ),
        summary="recorded violations, newest first (since: epoch ms or a duration ago like 1h)",
    ),
    Op(
        "arbiter.test",
        _test,
        (Param("name", v.one_of(*RULES), required=True, aliases=("rule",)),),
        summary="record a synthetic violation of a rule (never man overboard) to check alerts and webhooks",
    ),
)
