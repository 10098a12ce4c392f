"""Compound operations for the common agent lifecycle (reference §4.9, §14): begin, done, whoami, sitrep.

``begin`` registers and starts a session in one transaction: a conflicting file claim refuses both, so no
half-begun agent is left behind. ``done`` ends the session with a handoff note and unregisters the agent.
"""

from __future__ import annotations

from typing import Any

from portdaddy.core import validate as v
from portdaddy.core.agents import REGISTER_PARAMS, WORKTREE, Agents, new_agent_id, returning, salvage_hint
from portdaddy.core.clock import now_ms
from portdaddy.core.ops import Ctx, Op, Param
from portdaddy.core.repository import repository_of
from portdaddy.core.sessions import (
    END_STATUSES,
    FILES,
    FORCE,
    MAX_NOTE_CHARS,
    MAX_PURPOSE_CHARS,
    RUNS,
    Sessions,
    file_conflict,
    target_session,
)
from portdaddy.errors import NotFound

DEFAULT_SITREP_MS = 30 * 60_000


def begin_op(ctx: Ctx, *, purpose, agentId, files, force, metadata, identity, type, pid, capabilities, status,
             worktree, name, maxLocks, maxServices) -> dict[str, Any]:  # fmt: skip
    agents: Agents = ctx.app.agents
    sessions: Sessions = ctx.app.sessions
    agent_id = agentId or ctx.agent_id or new_agent_id()
    # The agent's own earlier sessions are no conflict: stillActive below names them and what they claim.
    conflicts = sessions.conflicts(files, repository=repository_of(worktree), agent=agent_id)
    if conflicts and not force:
        raise file_conflict(conflicts)
    back = returning(agents, agent_id)
    with ctx.app.store.write():
        agent, _ = agents.register(agent_id, identity=identity, purpose=purpose, type=type, pid=pid or ctx.pid,
                                   capabilities=capabilities, status=status, worktree=worktree, name=name,
                                   max_locks=maxLocks, max_services=maxServices)  # fmt: skip
        started = sessions.start(purpose, agent_id=agent_id, files=files, force=force, worktree=worktree,
                                 metadata=metadata)  # fmt: skip
    dead = [e for e in agents.salvage_entries(project=agent.project) if e["id"] != agent_id] if agent.project else []
    # An agent that begins again without `pd done` keeps its earlier sessions and their claims: say so.
    earlier = [{"sessionId": s["id"], "purpose": s["purpose"], "files": sessions.claimed_paths([s["id"]])}
               for s in sessions.list(status="active", agent=agent_id, worktree=None, project=None, limit=100)
               if s["id"] != started["id"]]  # fmt: skip
    return {"success": True, "agentId": agent_id, "sessionId": started["id"], "identity": agent.identity,
            "purpose": purpose, "agentRegistered": True, "sessionStarted": True, "fileClaims": files,
            "fileConflicts": conflicts, "startedAt": started["createdAt"], "stillActive": earlier,
            "salvageHint": salvage_hint(len(dead), agent.project) if dead else None,
            "deathNotice": agents.death_notice(agent_id) if back else None}  # fmt: skip


def done_op(ctx: Ctx, *, agentId, sessionId, note, status, worktree) -> dict[str, Any]:
    sessions: Sessions = ctx.app.sessions
    agent_id = agentId or ctx.agent_id
    try:
        sid = target_session(ctx, sessionId, agent_id, worktree)
    except NotFound:
        # The session was already ended (pd session end): the agent still leaves, as done promises.
        if sessionId or not (agent_id and ctx.app.agents.get(agent_id)):
            raise
        sid = None
    session = sessions.session(sid) if sid else None
    if session and session["agentId"] and not (agent_id or sessionId):
        # Found by worktree alone (a second pd done, whose first forgot the agent): never end someone else's.
        raise NotFound("NO_ACTIVE_SESSION", f"no session of yours in {worktree}: its active session {sid} is agent "
                       f"{session['agentId']}'s; to end it, pd done --agent {session['agentId']}")  # fmt: skip
    agent_id = agent_id or (session and session["agentId"])
    # Its agent was declared dead meanwhile, which ended it abandoned; the handoff note still belongs there.
    already_ended = bool(session and session["status"] == "abandoned")
    ended: dict[str, Any] = {"status": session and session["status"], "releasedFiles": []}
    with ctx.app.store.write():
        if already_ended and note:
            sessions.add_note(sid, note, "handoff", agent_id)
        elif session and not already_ended:
            ended = sessions.end(sid, note=note, status=status, agent_id=agent_id)
        unregistered = ctx.app.agents.unregister(agent_id) if agent_id else False
        if agent_id:
            ctx.app.agents.settle_own_work(agent_id, finished=status == "completed")
    return {"success": True, "agentId": agent_id, "sessionId": sid, "sessionStatus": ended["status"],
            "alreadyEnded": already_ended, "agentUnregistered": unregistered,
            "notesCount": sessions.session(sid)["noteCount"] if sid else 0, "finalNote": bool(note and sid),
            "releasedFiles": ended["releasedFiles"]}  # fmt: skip


def whoami_op(ctx: Ctx, *, agentId, sessionId, worktree) -> dict[str, Any]:
    sessions: Sessions = ctx.app.sessions
    agent_id = agentId or ctx.agent_id
    try:
        sid = target_session(ctx, sessionId, agent_id, worktree)
        s = sessions.session(sid)
    except NotFound:
        return {"success": True, "active": False, "agentId": agent_id,
                "hint": "No active session. Use pd begin to start."}  # fmt: skip
    agent = ctx.app.agents.get(s["agentId"]) if s["agentId"] else None
    now = now_ms()
    return {"success": True, "active": s["status"] == "active", "agentId": s["agentId"], "sessionId": sid,
            "purpose": s["purpose"], "status": s["status"], "identity": agent.identity if agent else None,
            "liveness": agent.liveness if agent else None, "files": sessions.claimed_paths([sid]),
            "noteCount": s["noteCount"], "startedAt": s["createdAt"], "duration": now - s["createdAt"]}  # fmt: skip


def sitrep_op(ctx: Ctx, *, since, project, runs, limit) -> dict[str, Any]:
    """What happened lately: notes, sessions started or ended, dead agents awaiting salvage, claims, activity. A
    fleet agent's runs ended in the window are one session line and its newest run's notes (unless ``runs``)."""
    sessions: Sessions = ctx.app.sessions
    now = now_ms()
    start = now - DEFAULT_SITREP_MS if since is None else since
    window = now - start
    notes = sessions.notes(project=project, since=start, limit=limit, fold_runs=not runs)
    recent = sessions.list(status=None, agent=None, worktree=None, project=project, limit=limit, since=start,
                           fold_runs=not runs)  # fmt: skip
    dead = ctx.app.agents.salvage_entries(project=project, limit=None)
    claims = sessions.held()  # every repository's: a sitrep is of the whole machine
    activity = ctx.app.activity.entries(limit=limit, since=start)
    # What happened in the window, not what fits in the lists (they stop at ``limit``).
    counts = {"events": sum(ctx.app.activity.summary(start).values()),
              "notes": sessions.count_notes(project=project, since=start, fold_runs=not runs),
              "activeSessions": sessions.count_active(project), "deadAgents": len(dead),
              "filesClaimed": len(claims)}  # fmt: skip
    dead = dead[:limit]
    minutes = max(1, window // 60_000)
    window_name = "Since the beginning" if start == 0 else f"Last {minutes}m"  # --since 0
    # The original's wording, kept on the wire; pd prints its own from counts.
    summary = (f"{window_name}: {counts['events']} events, {counts['notes']} notes, {counts['activeSessions']} "
               f"active sessions, {counts['deadAgents']} dead agents awaiting salvage, {counts['filesClaimed']} "
               "files claimed")  # fmt: skip
    return {"success": True, "summary": summary, "counts": counts, "since_ms": start, "since_minutes": minutes,
            "notes": notes, "sessions": recent, "salvage_queue": dead, "claims": claims,
            "activity": activity}  # fmt: skip


_AGENT = Param("agentId", v.AGENT_ID)
_SESSION = Param("sessionId", v.name("session id", 100), aliases=("session",))

OPS = (
    Op(
        "agent.begin",
        begin_op,
        (
            Param("purpose", v.text(MAX_PURPOSE_CHARS), required=True),
            _AGENT,
            FILES,
            FORCE,
            *(p for p in REGISTER_PARAMS if p.name != "purpose"),
        ),  # a session's purpose, required
        summary="register an agent and start its session in one step (a file conflict refuses both)",
    ),
    Op(
        "agent.done",
        done_op,
        (
            _AGENT,
            _SESSION,
            Param("note", v.text(MAX_NOTE_CHARS, lines=True)),
            Param("status", v.one_of(*END_STATUSES), default="completed"),
            WORKTREE,
        ),
        summary="end the caller's session with a handoff note and unregister the agent",
    ),
    Op(
        "agent.whoami",
        whoami_op,
        (_AGENT, _SESSION, WORKTREE),
        summary="the caller's agent, session, claimed files, note count and duration",
    ),
    Op(
        "journal.sitrep",
        sitrep_op,
        (
            Param("since", v.time_or_ago),
            Param("project", v.name("project", 64)),
            RUNS,
            Param("limit", v.integer(1, 100), default=20),
        ),
        summary="catch me up: recent notes, sessions, dead agents awaiting salvage, claims and activity (a fleet "
        "agent's ended runs are one session and its newest run's notes unless runs)",
    ),
)
