"""Sessions, immutable sealed notes and advisory file claims.

A session is an agent's declared unit of work ("Building payment API") in a worktree. It is scoped by the
caller (DESIGN §3): the client sends its agent id and worktree root, and a note without a session id goes to
that caller's latest active session, never to someone else's.

Notes are append-only (the table refuses UPDATE, and DELETE while their session exists) and never deleted but
with their whole session, when the fleet forgets an old run (``forget_ended``); each carries the hash of the
previous note of its session (core/notechain.py) and its body is sealed under the session's key
(core/sealing.py). File claims are paths or globs (core/globs.py); a claim that overlaps one held by another
agent's *active* session is refused unless forced, and a forced one is recorded with the conflict; the agent's
own other sessions' claims are no conflict (``ownClaims``). Claims of abandoned sessions (their agent died) are
kept for salvage but block nobody (the original's permanent 409s, §27 #6).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from typing import Any

from portdaddy.core import globs
from portdaddy.core import validate as v
from portdaddy.core.agents import WORKTREE
from portdaddy.core.clock import now_ms
from portdaddy.core.conflicts import conflict_line
from portdaddy.core.notechain import GENESIS, Link, link_hash, verify
from portdaddy.core.ops import Ctx, Op, Param
from portdaddy.core.repository import repository_of
from portdaddy.core.sealing import Sealer, load_or_create_master_key
from portdaddy.errors import Conflict, NotFound, PDError, bad_input

MAX_NOTE_CHARS = 16_000
MAX_NOTES_PER_SESSION = 10_000
MAX_PURPOSE_CHARS = 500
MAXFILES = 200
NOTE_TYPE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
END_STATUSES = ("completed", "abandoned")

_SESSION_COLUMNS = ("id, purpose, status, agent_id, worktree, identity_project, created_at, updated_at, completed_at, "
                    "metadata, note_count")  # fmt: skip
# A listing is read in three parts, each from its own index in recency order and cut at the limit, so that it costs
# what its limit asks for, not what the table holds: active sessions (fleet runs' too), other ended sessions, and
# fleet agents' ended runs. The views fold the last into one entry per fleet agent (same project directory and
# name), since a cron agent ends a run's session every minute (spec/journal.md, "Fleet runs in the views"). A run's
# session is known by ``fleet_agent``, which only the fleet writes (migration 020); a pd spawn run has none.
_ACTIVE = "status = 'active'"
_ENDED = "fleet_agent IS NULL AND status <> 'active'"
_ENDED_RUNS = "fleet_agent IS NOT NULL AND status <> 'active'"
_NEWEST_FIRST = "ORDER BY updated_at DESC, rowid DESC"
# Whether session ``s`` is one of a fleet agent's ended runs but its newest: what the folded views leave out.
_EARLIER_RUN = ("(s.fleet_agent IS NOT NULL AND s.status <> 'active' AND s.rowid <> (SELECT r.rowid FROM sessions r "
                "WHERE r.worktree IS s.worktree AND r.fleet_agent = s.fleet_agent AND r.status <> 'active' "
                "ORDER BY r.updated_at DESC, r.rowid DESC LIMIT 1))")  # fmt: skip


def _newest(where: str) -> str:
    """The sessions matching ``where``, newest first, cut at the listing's limit."""
    return (f"SELECT {_SESSION_COLUMNS}, rowid AS rid, NULL AS run_of, NULL AS runs, NULL AS ok, NULL AS first "
            f"FROM sessions WHERE {where} {_NEWEST_FIRST} LIMIT :limit")  # fmt: skip


def _folded(where: str) -> str:
    """Of the ended runs matching ``where``, each fleet agent's newest, with how many there are, how they ended and
    when the first began (counted in the index sessions_runs)."""
    return (f"SELECT {_SESSION_COLUMNS}, s.rowid AS rid, g.agent AS run_of, g.runs, g.ok, g.first FROM "
            "(SELECT worktree AS tree, fleet_agent AS agent, count(*) AS runs, total(status = 'completed') AS ok, "
            f"min(created_at) AS first FROM sessions WHERE {where} GROUP BY worktree, fleet_agent) g "
            f"JOIN sessions s ON s.rowid = (SELECT rowid FROM sessions WHERE {where} AND worktree IS g.tree "
            f"AND fleet_agent = g.agent {_NEWEST_FIRST} LIMIT 1) "
            "ORDER BY s.updated_at DESC, s.rowid DESC LIMIT :limit")  # fmt: skip


# Held claims, of the repository given as the one parameter (and those whose repository is unknown); None: all.
_HELD = ("SELECT c.path, c.session_id, c.claimed_at, s.purpose, s.agent_id, c.forced FROM file_claims c "
         "JOIN sessions s ON s.id = c.session_id WHERE c.released_at IS NULL AND s.status = 'active' "
         "AND (?1 IS NULL OR s.repository IS NULL OR s.repository = ?1)")  # fmt: skip


def _session_wire(row: tuple[Any, ...]) -> dict[str, Any]:
    sid, purpose, status, agent, worktree, project, created, updated, completed, metadata, notes = row
    return {"id": sid, "sessionId": sid, "purpose": purpose, "status": status, "agentId": agent,
            "worktreeId": worktree, "identityProject": project, "createdAt": created, "updatedAt": updated,
            "completedAt": completed, "metadata": None if metadata is None else json.loads(metadata),
            "noteCount": notes}  # fmt: skip


def _claim_wire(row: tuple[Any, ...]) -> dict[str, Any]:
    path, session, claimed_at, purpose, agent, forced = row
    return {"filePath": path, "sessionId": session, "purpose": purpose, "agentId": agent, "claimedAt": claimed_at,
            "forced": bool(forced), "startLine": None, "endLine": None, "symbol": None}  # fmt: skip


def file_conflict(conflicts: list[dict[str, Any]]) -> Conflict:
    more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
    return Conflict("FILE_CONFLICT", f"{conflict_line(conflicts[0])}{more}; use --force to claim anyway",
                    conflicts=conflicts, hint="Use force=true to claim files anyway")  # fmt: skip


def _note_filter(*, session_id: str | None = None, agent: str | None = None, project: str | None = None,
                 type: str | None = None, since: int | None = None) -> tuple[list[str], list[Any]]:  # fmt: skip
    """The WHERE clauses (notes ``n`` joined to their sessions ``s``) and arguments of the filters given."""
    where, args = ["1"], []
    for clause, value in (
        ("n.session_id = ?", session_id),
        ("coalesce(n.agent_id, s.agent_id) = ?", agent),
        ("s.identity_project = ?", project),
        ("n.type = ?", type),
        ("n.created_at >= ?", since),
    ):
        if value is not None:
            where.append(clause)
            args.append(value)
    return where, args


def new_session_id() -> str:
    """A new session's id (the fleet also sizes a run's environment with one before its session exists)."""
    return f"session-{uuid.uuid4().hex[:12]}"


class Sessions:
    name = "sessions"

    def __init__(self, app: Any) -> None:
        self.app = app
        self.store = app.store
        self.sealer = Sealer(load_or_create_master_key(app.settings.master_key))

    def stats(self) -> dict[str, Any]:
        notes = self.store.scalar("SELECT coalesce(max(id), 0) FROM notes")
        return {"sessionsActive": self.count_active(), "notes": notes}

    def count_active(self, project: str | None = None) -> int:
        return self.store.scalar("SELECT count(*) FROM sessions WHERE status='active' AND (?1 IS NULL OR "
                                 "identity_project=?1)", (project,))  # fmt: skip

    # -- sessions ------------------------------------------------------------------------------------------

    def session(self, session_id: str) -> dict[str, Any]:
        row = self.store.one(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id=?", (session_id,))
        if row is None:
            raise NotFound("SESSION_NOT_FOUND", f"session {session_id} does not exist; see pd session list --all")
        return _session_wire(row)

    def _active(self, session_id: str) -> dict[str, Any]:
        s = self.session(session_id)
        if s["status"] != "active":
            raise Conflict("CONFLICT", f"session {session_id} is {s['status']}; start a new one with pd session start")
        return s

    def start(self, purpose: str, *, agent_id: str | None, files: list[str], force: bool, worktree: str | None,
              metadata: dict[str, Any] | None, fleet_agent: str | None = None) -> dict[str, Any]:  # fmt: skip
        """``fleet_agent``: the session is a run of this fleet agent (the fleet's own calls only, ``Ctx``)."""
        repository = repository_of(worktree)
        conflicts, own = self.overlapping(files, repository=repository, agent=agent_id)
        if conflicts and not force:
            raise file_conflict(conflicts)
        now = now_ms()
        sid = new_session_id()
        agent = self.app.agents.get(agent_id) if agent_id else None
        with self.store.write() as db:
            db.execute(
                "INSERT INTO sessions (id, purpose, status, agent_id, worktree, repository, identity_project, "
                "created_at, updated_at, metadata, wrapped_key, head_hash, fleet_agent) "
                "VALUES (?,?,'active',?,?,?,?,?,?,?,?,?,?)",
                (sid, purpose, agent_id, worktree, repository, agent.project if agent else None, now, now,
                 None if metadata is None else json.dumps(metadata), self.sealer.new_session_key(sid), GENESIS,
                 fleet_agent),
            )  # fmt: skip
            self._insert_claims(sid, files, bool(conflicts), now)
        self.app.bus.emit("session.start", sessionId=sid, agentId=agent_id, purpose=purpose, files=files,
                          metadata=metadata)  # fmt: skip
        if files:
            self.app.bus.emit("file.claim", sessionId=sid, agentId=agent_id, paths=files, conflicts=conflicts,
                              forced=bool(conflicts))  # fmt: skip
        return {**self.session(sid), "files": files, "conflicts": conflicts, "ownClaims": own}

    def end(self, session_id: str, *, note: str | None, status: str, agent_id: str | None) -> dict[str, Any]:
        s = self._active(session_id)
        with self.store.write() as db:
            if note:
                added = self.add_note(session_id, note, "handoff", agent_id or s["agentId"])
            released = self._release(db, session_id, None)
            now = now_ms()
            db.execute("UPDATE sessions SET status=?, updated_at=?, completed_at=? WHERE id=?",
                       (status, now, now, session_id))  # fmt: skip
        self.announce_ended([session_id], s["agentId"], status)
        return {"success": True, "id": session_id, "sessionId": session_id, "status": status,
                "releasedFiles": released, "noteId": added["noteId"] if note else None}  # fmt: skip

    def _ids(self, agent_id: str) -> list[str]:
        rows = self.store.all("SELECT id FROM sessions WHERE agent_id=? AND status='active' ORDER BY created_at",
                              (agent_id,))  # fmt: skip
        return [r[0] for r in rows]

    def abandon_by_agent(self, agent_id: str) -> list[str]:
        """Set a dead agent's active sessions ``abandoned``, keeping claims and notes (call inside a write)."""
        ids = self._ids(agent_id)
        now = now_ms()
        self.store.executemany("UPDATE sessions SET status='abandoned', updated_at=?, completed_at=? WHERE id=?",
                               [(now, now, sid) for sid in ids])  # fmt: skip
        return ids

    def end_for_agent(self, agent_id: str) -> list[str]:
        """An agent leaving on purpose: its active sessions end ``abandoned`` and release their files."""
        ids = self.abandon_by_agent(agent_id)
        for sid in ids:
            self._release(self.store.db, sid, None)
        return ids

    def announce_ended(self, session_ids: list[str], agent_id: str | None, status: str) -> None:
        for sid in session_ids:
            self.app.bus.emit("session.end", sessionId=sid, agentId=agent_id, status=status)

    def list(self, *, status: str | None, agent: str | None, worktree: str | None, project: str | None,
             limit: int, since: int | None = None, fold_runs: bool = False) -> list[dict[str, Any]]:  # fmt: skip
        """Sessions, most recently updated first (``since``: those active or updated since). ``fold_runs``: each
        fleet agent's ended runs are one entry, the newest's session, with ``fleetRuns`` counting them."""
        args = {"status": status, "agent": agent, "worktree": worktree, "project": project, "since": since,
                "limit": limit}  # fmt: skip
        named = {"agent_id = :agent": agent, "worktree = :worktree": worktree, "identity_project = :project": project}
        match = [clause for clause, value in named.items() if value is not None]
        window = [] if since is None else ["updated_at >= :since"]  # an active session is listed whatever its age
        chosen = [] if status is None else ["status = :status"]
        parts = []
        if status in (None, "active"):
            parts.append(_newest(" AND ".join([_ACTIVE, *match])))
        if status != "active":
            parts.append(_newest(" AND ".join([_ENDED, *match, *chosen, *window])))
            # "+status" (no index for that term): a status alone would lead the planner to sessions_status, every
            # ended session of the table, instead of sessions_runs.
            runs = " AND ".join([_ENDED_RUNS, *match, *(f"+{c}" for c in chosen), *window])
            parts.append(_folded(runs) if fold_runs else _newest(runs))
        rows = self.store.all(" UNION ALL ".join(f"SELECT * FROM ({part})" for part in parts)
                              + " ORDER BY updated_at DESC, rid DESC LIMIT :limit", args)  # fmt: skip
        sessions = []
        for *row, _rid, run_of, runs, ok, first in rows:
            s = _session_wire(row)
            s["files"] = self.claimed_paths([s["id"]])
            s["fleetRuns"] = None if run_of is None else {
                "agent": run_of, "projectDir": s["worktreeId"], "count": runs, "completed": int(ok),
                "abandoned": runs - int(ok), "firstAt": first}  # fmt: skip
            sessions.append(s)
        return sessions

    def current(self, *, agent_id: str | None, worktree: str | None) -> str:
        """The caller's latest active session: by agent (and worktree when known), else by worktree alone."""
        if not agent_id and not worktree:
            raise NotFound("NO_ACTIVE_SESSION", "which session? pass --session, or --agent, or run pd session start")
        row = self.store.one(
            "SELECT id FROM sessions WHERE status='active' AND (?1 IS NULL OR agent_id=?1) "
            "AND (?2 IS NULL OR worktree=?2) ORDER BY updated_at DESC, rowid DESC LIMIT 1",
            (agent_id, worktree),
        )  # fmt: skip
        if row is None:
            who = (f" for agent {agent_id}" if agent_id else "") + (f" in {worktree}" if worktree else "")
            raise NotFound("NO_ACTIVE_SESSION", f"no active session{who}; start one with pd session start or pd begin")
        return row[0]

    def latest_purpose(self, agent_id: str) -> str | None:
        return self.store.scalar("SELECT purpose FROM sessions WHERE agent_id=? ORDER BY updated_at DESC, rowid DESC "
                                 "LIMIT 1", (agent_id,))  # fmt: skip

    def session_ids_of(self, agent_id: str) -> list[str]:
        """The agent's most recent session (for a salvage entry when none was active)."""
        row = self.store.one("SELECT id FROM sessions WHERE agent_id=? ORDER BY updated_at DESC, rowid DESC LIMIT 1",
                             (agent_id,))  # fmt: skip
        return [row[0]] if row else []

    # -- notes ---------------------------------------------------------------------------------------------

    def add_note(self, session_id: str, content: str, type: str, agent_id: str | None) -> dict[str, Any]:
        row = self.store.one("SELECT wrapped_key, note_count, head_hash, agent_id, purpose FROM sessions WHERE id=?",
                             (session_id,))  # fmt: skip
        if row is None:
            raise NotFound("SESSION_NOT_FOUND", f"session {session_id} does not exist; see pd session list --all")
        wrapped, count, prev, owner, purpose = row
        if count >= MAX_NOTES_PER_SESSION:
            raise PDError("RESOURCE_LIMIT", f"session {session_id} has {count} notes, the limit; start a new session")
        agent_id = agent_id or owner
        seq, now = count + 1, now_ms()
        body = self.sealer.seal(session_id, wrapped, content)
        digest = link_hash(session_id, seq, agent_id, type, now, body, prev)
        with self.store.write() as db:
            db.execute("INSERT INTO notes (session_id, seq, agent_id, type, created_at, body, prev_hash, hash) "
                       "VALUES (?,?,?,?,?,?,?,?)",
                       (session_id, seq, agent_id, type, now, body, prev, digest))  # fmt: skip
            note_id = db.last_insert_rowid()
            db.execute("UPDATE sessions SET note_count=?, head_hash=?, updated_at=? WHERE id=?",
                       (seq, digest, now, session_id))  # fmt: skip
        self.app.bus.emit("note.add", sessionId=session_id, agentId=agent_id, noteId=note_id, seq=seq, type=type,
                          hash=digest, prevHash=prev)  # fmt: skip
        return {"success": True, "noteId": note_id, "sessionId": session_id, "purpose": purpose, "seq": seq,
                "hash": digest, "createdAt": now}  # fmt: skip

    def notes(self, *, session_id: str | None = None, session_ids: list[str] | None = None, agent: str | None = None,
              project: str | None = None, type: str | None = None, since: int | None = None, limit: int = 50,
              oldest_first: bool = False, fold_runs: bool = False) -> list[dict[str, Any]]:  # fmt: skip
        """Notes, newest first. ``fold_runs``: not those of a fleet agent's earlier ended runs, only its newest's
        (``earlier_run_notes`` counts what that leaves out)."""
        where, args = _note_filter(session_id=session_id, agent=agent, project=project, type=type, since=since)
        if session_ids is not None:
            where.append(f"n.session_id IN ({','.join('?' * len(session_ids))})")
            args.extend(session_ids)
        if fold_runs:
            where.append(f"NOT {_EARLIER_RUN}")
        rows = self.store.all(
            "SELECT n.id, n.session_id, n.seq, n.agent_id, n.type, n.created_at, n.body, n.hash, n.prev_hash, "
            f"s.wrapped_key, s.purpose FROM notes n JOIN sessions s ON s.id = n.session_id WHERE {' AND '.join(where)} "
            "ORDER BY n.id DESC LIMIT ?", (*args, limit),
        )  # fmt: skip
        notes = []
        for nid, sid, seq, agent_id, ntype, created, body, digest, prev, wrapped, purpose in rows:
            text = self.sealer.open(sid, wrapped, body)
            notes.append({"id": nid, "noteId": nid, "sessionId": sid, "seq": seq, "agentId": agent_id, "type": ntype,
                          "content": text, "unreadable": text is None, "createdAt": created, "hash": digest,
                          "prevHash": prev, "sessionPurpose": purpose})  # fmt: skip
        return notes[::-1] if oldest_first else notes

    def count_notes(self, *, fold_runs: bool = False, **filters: Any) -> int:
        """How many notes ``notes(fold_runs=fold_runs, **filters)`` would list without a limit."""
        where, args = _note_filter(**filters)
        count = self.store.scalar(f"SELECT count(*) FROM notes n JOIN sessions s ON s.id = n.session_id WHERE "
                                  f"{' AND '.join(where)}", args)  # fmt: skip
        return count - self.earlier_run_notes(**filters) if fold_runs else count

    def earlier_run_notes(self, **filters: Any) -> int:
        """How many notes ``notes(fold_runs=True, **filters)`` leaves out: those of fleet agents' earlier runs (read
        from the ended runs, a hundred a fleet agent kept, to their notes; from the notes of the window, if smaller)."""
        where, args = _note_filter(**filters)
        return self.store.scalar(f"SELECT count(*) FROM notes n JOIN sessions s ON s.id = n.session_id WHERE "
                                 f"{_EARLIER_RUN} AND {' AND '.join(where)}", args)  # fmt: skip

    def verify(self, session_id: str | None = None) -> dict[str, Any]:
        heads = self.store.all("SELECT id, note_count, head_hash FROM sessions WHERE ?1 IS NULL OR id=?1 "
                               "ORDER BY rowid", (session_id,))  # fmt: skip
        if session_id and not heads:
            self.session(session_id)  # raises SESSION_NOT_FOUND
        problems, notes = [], 0
        for sid, count, head in heads:
            links = [Link(*r) for r in self.store.all(
                "SELECT seq, agent_id, type, created_at, body, prev_hash, hash FROM notes WHERE session_id=? "
                "ORDER BY seq", (sid,))]  # fmt: skip
            notes += len(links)
            problems += [{"sessionId": sid, "problem": p} for p in verify(sid, links, count, head)]
        return {"success": True, "valid": not problems, "sessions": len(heads), "notes": notes, "problems": problems}

    def note_texts(self, session_ids: list[str], *, limit: int) -> list[str]:
        if not session_ids:
            return []
        return [n["content"] or "" for n in self.notes(session_ids=session_ids, limit=limit, oldest_first=True)]

    def salvage_context(self, session_ids: list[str], purpose: str | None) -> dict[str, Any]:
        notes = self.notes(session_ids=session_ids, limit=500, oldest_first=True) if session_ids else []
        return {"sessionId": session_ids[-1] if session_ids else None, "sessionIds": session_ids, "purpose": purpose,
                "notes": notes, "files": self.claimed_paths(session_ids)}  # fmt: skip

    # -- file claims ---------------------------------------------------------------------------------------

    def overlapping(self, paths: Iterable[str], *, repository: str | None = None, agent: str | None = None,
                    exclude: Iterable[str] = ()) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # fmt: skip
        """Claims of other active sessions that overlap any of ``paths`` (one entry per pair), in ``repository``
        (None: in any), as (conflicts, own): the claims of ``agent``'s own sessions are not conflicts, since a
        conflict is there to warn other agents (spec/journal.md, "File claims")."""
        paths = list(paths)
        if not paths:
            return [], []
        skip = set(exclude)
        held = [r for r in self.store.all(_HELD, (repository,)) if r[1] not in skip]
        conflicts: list[dict[str, Any]] = []
        own: list[dict[str, Any]] = []
        for path in paths:
            for row in held:
                if globs.overlaps(path, row[0]):
                    claim = {**_claim_wire(row), "filePath": path, "claimedPath": row[0],
                             "example": globs.witness(path, row[0])}  # fmt: skip
                    (own if agent is not None and claim["agentId"] == agent else conflicts).append(claim)
        return conflicts, own

    def conflicts(self, paths: Iterable[str], *, repository: str | None = None, agent: str | None = None,
                  exclude: Iterable[str] = ()) -> list[dict[str, Any]]:  # fmt: skip
        """The conflicts of ``overlapping``: other agents' claims."""
        return self.overlapping(paths, repository=repository, agent=agent, exclude=exclude)[0]

    def _insert_claims(self, session_id: str, paths: list[str], forced: bool, now: int) -> list[str]:
        held = {r[0] for r in self.store.all("SELECT path FROM file_claims WHERE session_id=? AND released_at IS NULL",
                                             (session_id,))}  # fmt: skip
        new = [p for p in paths if p not in held]
        self.store.executemany("INSERT INTO file_claims (session_id, path, claimed_at, forced) VALUES (?,?,?,?)",
                               [(session_id, p, now, int(forced)) for p in new])  # fmt: skip
        return new

    def claim(self, session_id: str, paths: list[str], *, force: bool) -> dict[str, Any]:
        s = self._active(session_id)
        repository = self.store.scalar("SELECT repository FROM sessions WHERE id=?", (session_id,))
        conflicts, own = self.overlapping(paths, repository=repository, agent=s["agentId"], exclude=[session_id])
        if conflicts and not force:
            raise file_conflict(conflicts)
        now = now_ms()
        with self.store.write() as db:
            self._insert_claims(session_id, paths, bool(conflicts), now)
            db.execute("UPDATE sessions SET updated_at=? WHERE id=?", (now, session_id))
        self.app.bus.emit("file.claim", sessionId=session_id, agentId=s["agentId"], paths=paths, conflicts=conflicts,
                          forced=bool(conflicts))  # fmt: skip
        return {"success": True, "sessionId": session_id, "claimed": paths, "conflicts": conflicts, "ownClaims": own}

    def _release(self, db: Any, session_id: str, paths: list[str] | None) -> list[str]:
        held = [r[0] for r in db.execute("SELECT path FROM file_claims WHERE session_id=? AND released_at IS NULL",
                                         (session_id,))]  # fmt: skip
        gone = held if paths is None else [p for p in held if p in set(paths)]
        db.executemany("UPDATE file_claims SET released_at=? WHERE session_id=? AND path=? AND released_at IS NULL",
                       [(now_ms(), session_id, p) for p in gone])  # fmt: skip
        return gone

    def release(self, session_id: str, paths: list[str] | None) -> dict[str, Any]:
        s = self.session(session_id)
        with self.store.write() as db:
            released = self._release(db, session_id, paths)
        if released:
            self.app.bus.emit("file.release", sessionId=session_id, agentId=s["agentId"], paths=released)
        return {"success": True, "sessionId": session_id, "released": released}

    def claimed_paths(self, session_ids: list[str]) -> list[str]:
        if not session_ids:
            return []
        marks = ",".join("?" * len(session_ids))
        rows = self.store.all(f"SELECT DISTINCT path FROM file_claims WHERE session_id IN ({marks}) AND released_at "
                              "IS NULL ORDER BY id", session_ids)  # fmt: skip
        return [r[0] for r in rows]

    def forget_ended(self, agent_ids: list[str]) -> int:
        """Delete the ended sessions of ``agent_ids`` whole, with their notes and file claims (inside a write): the
        fleet forgetting runs it no longer keeps. An active session stays. Returns how many went."""
        gone = self.store.all("SELECT id FROM sessions WHERE status<>'active' AND agent_id IN "
                              "(SELECT value FROM json_each(?))", (json.dumps(agent_ids),))  # fmt: skip
        if not gone:
            return 0
        ids = json.dumps([sid for (sid,) in gone])
        # The session goes first (its notes may be deleted only then, see migration 018), so the notes' and claims'
        # references to it are checked at the commit, when they are gone too.
        self.store.execute("PRAGMA defer_foreign_keys = ON")
        for table, column in (("sessions", "id"), ("notes", "session_id"), ("file_claims", "session_id")):
            self.store.execute(f"DELETE FROM {table} WHERE {column} IN (SELECT value FROM json_each(?))", (ids,))
        return len(gone)

    def held(self, *, repository: str | None = None, path: str | None = None,
             agent: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
        claims = [_claim_wire(r) for r in self.store.all(_HELD + " ORDER BY c.id", (repository,))]
        if path is not None:
            claims = [c for c in claims if globs.overlaps(path, c["filePath"])]
        if agent is not None:
            claims = [c for c in claims if c["agentId"] == agent]
        return claims


# -- operations ----------------------------------------------------------------------------------------------


def _claim_path(name: str, value: Any) -> str:
    return globs.normalize_claim_path(value)


def _note_type(name: str, value: Any) -> str:
    if not isinstance(value, str) or not NOTE_TYPE.match(value.strip().lower()):
        raise bad_input(f"{name} must be a short lowercase word like note, commit, progress, decision, blocker, "
                        f"handoff; got {str(value)[:40]!r}")  # fmt: skip
    return value.strip().lower()


def _paths(name: str, value: Any) -> list[str]:
    return list(dict.fromkeys(v.str_list(_claim_path, MAXFILES)(name, value)))


_SESSION = Param("sessionId", v.name("session id", 100), aliases=("id", "session"))
FILES = Param("files", _paths, default=[], aliases=("paths",))
FORCE = Param("force", v.boolean, default=False)
_PURPOSE = Param("purpose", v.text(MAX_PURPOSE_CHARS), required=True)
_CONTENT = Param("content", v.text(MAX_NOTE_CHARS, lines=True), required=True, aliases=("note", "text"))
_LIMIT = Param("limit", v.integer(1, 1000), default=50)
# Every fleet run on its own: the views fold a fleet agent's ended runs into its newest (spec/journal.md).
RUNS = Param("runs", v.boolean, default=False)


def target_session(ctx: Ctx, session_id: str | None, agent_id: str | None, worktree: str | None) -> str:
    """The session named, else the caller's active one (by agent, else worktree); NO_ACTIVE_SESSION if none."""
    return session_id or ctx.app.sessions.current(agent_id=agent_id or ctx.agent_id, worktree=worktree)


def _alive(ctx: Ctx, agent_id: str | None) -> None:
    """A journal write by a registered agent is a sign of life, like a heartbeat."""
    if agent_id:
        ctx.app.agents.heartbeat(agent_id, durable=False)


def start_op(ctx: Ctx, *, purpose, agentId, files, force, worktree, metadata) -> dict[str, Any]:
    result = ctx.app.sessions.start(purpose, agent_id=agentId or ctx.agent_id, files=files, force=force,
                                    worktree=worktree, metadata=metadata, fleet_agent=ctx.fleet_agent)  # fmt: skip
    _alive(ctx, result["agentId"])
    return {"success": True, **result}


def end_op(ctx: Ctx, *, sessionId, note, status, agentId, worktree) -> dict[str, Any]:
    sid = target_session(ctx, sessionId, agentId, worktree)
    return ctx.app.sessions.end(sid, note=note, status=status, agent_id=agentId or ctx.agent_id)


def get_op(ctx: Ctx, *, sessionId, agentId, worktree) -> dict[str, Any]:
    sessions: Sessions = ctx.app.sessions
    sessionId = target_session(ctx, sessionId, agentId, worktree)
    s = sessions.session(sessionId)
    files = [{"sessionId": sessionId, "filePath": p, "claimedAt": c, "releasedAt": r, "forced": bool(f)}
             for p, c, r, f in sessions.store.all("SELECT path, claimed_at, released_at, forced FROM file_claims "
                                                  "WHERE session_id=? ORDER BY id", (sessionId,))]  # fmt: skip
    notes = sessions.notes(session_id=sessionId, limit=1000, oldest_first=True)
    return {"success": True, "session": s, "notes": notes, "files": files}


def list_op(ctx: Ctx, *, status, agent, worktree, project, all, runs, limit) -> dict[str, Any]:
    found = ctx.app.sessions.list(status=None if all else (status or "active"), agent=agent, worktree=worktree,
                                  project=project, limit=limit, fold_runs=not runs)  # fmt: skip
    return {"success": True, "sessions": found, "count": len(found)}


def note_add_op(ctx: Ctx, *, sessionId, content, type, agentId, worktree) -> dict[str, Any]:
    agent = agentId or ctx.agent_id
    sid = target_session(ctx, sessionId, agent, worktree)
    _alive(ctx, agent)
    return ctx.app.sessions.add_note(sid, content, type, agent)


def note_list_op(ctx: Ctx, *, sessionId, agent, project, type, since, runs, limit) -> dict[str, Any]:
    sessions: Sessions = ctx.app.sessions
    if sessionId is not None:
        sessions.session(sessionId)  # a mistyped id is SESSION_NOT_FOUND, not a session without notes
    filters = {"session_id": sessionId, "agent": agent, "project": project, "type": type, "since": since}
    fold = not runs and sessionId is None and agent is None  # one session or agent asked for: all of its notes
    found = sessions.notes(**filters, limit=limit, fold_runs=fold)
    return {"success": True, "notes": found, "count": len(found),
            "earlierRunNotes": sessions.earlier_run_notes(**filters) if fold else 0}  # fmt: skip


def verify_op(ctx: Ctx, *, sessionId) -> dict[str, Any]:
    return ctx.app.sessions.verify(sessionId)


def claim_op(ctx: Ctx, *, sessionId, files, force, agentId, worktree) -> dict[str, Any]:
    if not files:
        raise bad_input("files is empty; name the paths or globs to claim, e.g. src/api/*")
    _alive(ctx, agentId or ctx.agent_id)
    return ctx.app.sessions.claim(target_session(ctx, sessionId, agentId, worktree), files, force=force)


def release_op(ctx: Ctx, *, sessionId, files, agentId, worktree) -> dict[str, Any]:
    return ctx.app.sessions.release(target_session(ctx, sessionId, agentId, worktree), files or None)


def files_op(ctx: Ctx, *, path, agent, worktree) -> dict[str, Any]:
    claims = ctx.app.sessions.held(repository=repository_of(worktree), path=path, agent=agent)
    return {"success": True, "claims": claims, "count": len(claims)}


def who_owns_op(ctx: Ctx, *, path, worktree) -> dict[str, Any]:
    owners = ctx.app.sessions.held(repository=repository_of(worktree), path=path)
    return {"success": True, "filePath": path, "owners": owners, "claimed": bool(owners)}


def check_op(ctx: Ctx, *, files, sessionId, agentId, worktree) -> dict[str, Any]:
    """Which of ``files`` other active sessions claim (the caller's own sessions are not "other")."""
    conflicts = ctx.app.sessions.conflicts(files, repository=repository_of(worktree), agent=agentId or ctx.agent_id,
                                           exclude=[sessionId] if sessionId else [])  # fmt: skip
    return {"success": True, "conflicts": conflicts, "count": len(conflicts), "checked": len(files)}


OPS = (
    Op(
        "session.start",
        start_op,
        (_PURPOSE, Param("agentId", v.AGENT_ID), FILES, FORCE, WORKTREE, Param("metadata", v.json_object(16_000))),
        summary="start a session with optional file claims (another agent's overlapping claim is refused unless force)",
    ),
    Op(
        "session.end",
        end_op,
        (
            _SESSION,
            Param("note", v.text(MAX_NOTE_CHARS, lines=True)),
            Param("status", v.one_of(*END_STATUSES), default="completed"),
            Param("agentId", v.AGENT_ID),
            WORKTREE,
        ),
        summary="end a session (completed or abandoned) with an optional handoff note; releases its files",
    ),
    Op(
        "session.get",
        get_op,
        (_SESSION, Param("agentId", v.AGENT_ID), WORKTREE),
        summary="one session with its notes (oldest first) and file claims (default: the caller's current one)",
    ),
    Op(
        "session.list",
        list_op,
        (
            Param("status", v.one_of("active", *END_STATUSES)),
            Param("agent", v.AGENT_ID),
            WORKTREE,
            Param("project", v.name("project", 64)),
            Param("all", v.boolean, default=False),
            RUNS,
            _LIMIT,
        ),
        summary="sessions, most recently updated first (active only unless status or all; a fleet agent's ended "
        "runs are one entry unless runs)",
    ),
    Op(
        "note.add",
        note_add_op,
        (_SESSION, _CONTENT, Param("type", _note_type, default="note"), Param("agentId", v.AGENT_ID), WORKTREE),
        summary="append a note to a session (default: the caller's current one); sealed at rest, hash-chained",
    ),
    Op(
        "note.list",
        note_list_op,
        (
            Param("sessionId", v.name("session id", 100), aliases=("id", "session")),
            Param("agent", v.AGENT_ID),
            Param("project", v.name("project", 64)),
            Param("type", _note_type),
            Param("since", v.time_or_ago),
            RUNS,
            _LIMIT,
        ),
        summary="notes across sessions and agents, newest first (since: a duration ago like 30m, or epoch ms; "
        "of a fleet agent's ended runs only the newest's unless runs, a session or an agent is named)",
    ),
    Op(
        "note.verify",
        verify_op,
        (Param("sessionId", v.name("session id", 100), aliases=("id", "session")),),
        summary="check the hash chain of one session's notes, or of every session",
    ),
    Op(
        "file.claim",
        claim_op,
        (_SESSION, FILES, FORCE, Param("agentId", v.AGENT_ID), WORKTREE),
        summary="claim paths or globs for a session (another agent's overlapping claim is refused unless force)",
    ),
    Op(
        "file.release",
        release_op,
        (_SESSION, FILES, Param("agentId", v.AGENT_ID), WORKTREE),
        summary="release some (or all) of a session's claims",
    ),
    Op(
        "file.list",
        files_op,
        (Param("path", _claim_path), Param("agent", v.AGENT_ID), WORKTREE),
        summary="claims held by active sessions (path: only those overlapping it; worktree: only its repository's)",
    ),
    Op(
        "file.owners",
        who_owns_op,
        (Param("path", _claim_path, required=True), WORKTREE),
        summary="which active sessions claim a path (glob overlap) in the worktree's repository",
    ),
    Op(
        "file.check",
        check_op,
        (FILES, _SESSION, Param("agentId", v.AGENT_ID), WORKTREE),
        summary="which of these paths other active sessions of the worktree's repository claim (the git guard's)",
    ),
)
