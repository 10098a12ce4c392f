"""Pheromone trails: numeric 0-1 marks on entities that fade with time, and the file heat map.

A mark is ``(harbor, table, entity id, key) -> (strength, sprayed at)``; its value at a read is
``decay.decayed`` of the time since the spray, so nothing decays in the background and a restart changes
nothing. Values under ``decay.FLOOR`` vanish: dropped at the read that finds them, or by a sweep every half-life
(so marks nobody reads do not pile up). Time is read through ``self.clock`` (wall seconds advanced by trio's
clock), so tests drive decay with trio's MockClock.

Spray is the hot path: over IPC it may be fire-and-forget; memory changes at once and the store is written in
batches at most a second later (``core.writebehind``). A spray someone waits for (a request) is committed
before its reply.

The file heat map is built from ``file.claim`` / ``file.release`` / ``session.end`` events, kept in our own
``pheromone_claims`` table.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import trio

from portdaddy.core import decay
from portdaddy.core import validate as v
from portdaddy.core.events import Event
from portdaddy.core.ops import Ctx, Op, Param
from portdaddy.core.writebehind import WriteBehind
from portdaddy.errors import StoreError

CLAIM_HISTORY_MS = 7 * 24 * 3600 * 1000
# File heat (ref §17.2): each claim adds 0.3 x e^(-age / 30 min); an active claim adds 0.3 more; capped at 1.
HEAT_PER_CLAIM = 0.3
HEAT_TAU_MS = 30 * 60 * 1000
TABLES = ("services", "projects", "sessions", "agents", "locks", "files", "harbors")

Entity = tuple[str, str, str]  # (harbor, table, entity id); harbor '' is the global space


def trio_wall_clock() -> Callable[[], float]:
    """Wall-clock seconds that advance with ``trio.current_time()`` (so a MockClock moves them)."""
    wall0, trio0 = time.time(), trio.current_time()
    return lambda: wall0 + (trio.current_time() - trio0)


def half_life_from_env() -> float:
    raw = os.environ.get("PORT_DADDY_PHEROMONE_HALF_LIFE")
    if not raw:
        return decay.DEFAULT_HALF_LIFE_S
    ms = v.duration()("PORT_DADDY_PHEROMONE_HALF_LIFE", raw)
    if ms <= 0:
        raise ValueError("PORT_DADDY_PHEROMONE_HALF_LIFE must be positive")
    return ms / 1000


class Pheromones:
    name = "pheromones"

    def __init__(self, app: Any, *, clock: Callable[[], float] | None = None,
                 half_life_s: float | None = None) -> None:  # fmt: skip
        self.app = app
        self.store = app.store
        self.clock = clock or trio_wall_clock()
        self.half_life_s = half_life_s or half_life_from_env()
        self._marks: dict[Entity, dict[str, tuple[float, int]]] = {}
        self._dirty: WriteBehind[tuple[Entity, str]] = WriteBehind(self.store, self._write_marks, what="sprays")
        self.sprays = 0
        for harbor, table, eid, key, strength, at in self.store.all(
            "SELECT harbor, tbl, entity_id, key, strength, sprayed_at FROM pheromones"
        ):
            self._marks.setdefault((harbor, table, eid), {})[key] = (strength, at)
        with self.store.write() as db:
            db.execute("DELETE FROM pheromone_claims WHERE released_at < ?", (self._now_ms() - CLAIM_HISTORY_MS,))

    def stats(self) -> dict[str, Any]:
        return {"pheromones": sum(len(m) for m in self._marks.values()), "pheromoneSprays": self.sprays}

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- marks ---------------------------------------------------------------------------------------------

    def spray(self, table: str, eid: str, key: str, strength: float, *, harbor: str = "",
              durable: bool = True) -> None:  # fmt: skip
        """Set ``key`` on an entity to ``strength`` (a fresh spray replaces the faded value)."""
        entity = (harbor, table, eid)
        if not durable and not self._dirty.admits((entity, key)):
            return  # the store refuses writes and holds too many waiting: dropped, as nobody was promised it
        marks = self._marks.setdefault(entity, {})
        before = marks.get(key)
        marks[key] = (strength, self._now_ms())
        self._dirty.mark((entity, key))
        if durable:
            try:
                self.flush()
            except StoreError:  # not stored, so it did not happen: the mark stays as it was
                if before is not None:
                    marks[key] = before
                elif len(marks) == 1:
                    del self._marks[entity]
                else:
                    del marks[key]
                raise
        self.sprays += 1
        self.app.bus.emit("pheromone.spray", table=table, id=eid, key=key, strength=strength)

    def sniff(self, table: str, eid: str, *, harbor: str = "") -> dict[str, float]:
        """The entity's current values (decayed; vanished ones dropped)."""
        entity = (harbor, table, eid)
        marks = self._marks.get(entity)
        if not marks:
            return {}
        now = self._now_ms()
        values = {}
        for key, (strength, at) in list(marks.items()):
            value = decay.decayed(strength, max(0, now - at) / 1000, self.half_life_s)
            if value < decay.FLOOR:
                del marks[key]
                self._dirty.mark((entity, key))
            else:
                values[key] = round(value, 3)
        if not marks:
            del self._marks[entity]
        return values

    def evaporate(self) -> None:
        """Drop every mark that has faded below the floor, read or not."""
        for harbor, table, eid in list(self._marks):
            self.sniff(table, eid, harbor=harbor)

    def all(self, *, table: str | None = None, harbor: str | None = None) -> list[dict[str, Any]]:
        out = []
        for entity in list(self._marks):
            h, t, eid = entity
            if (table is not None and t != table) or (harbor is not None and h != harbor):
                continue
            values = self.sniff(t, eid, harbor=h)
            if values:
                out.append({"table": t, "id": eid, "harbor": h or None, "pheromones": values})
        return out

    def flush(self) -> None:
        """Write every changed mark now."""
        self._dirty.flush()

    def _write_marks(self, db: Any, dirty: Iterable[tuple[Entity, str]]) -> None:
        """Write changed marks; a vanished mark is deleted."""
        upserts, deletes = [], []
        for entity, key in dirty:
            mark = self._marks.get(entity, {}).get(key)
            if mark is None:
                deletes.append((*entity, key))
            else:
                upserts.append((*entity, key, *mark))
        if deletes:
            db.executemany("DELETE FROM pheromones WHERE harbor=? AND tbl=? AND entity_id=? AND key=?", deletes)
        if upserts:
            db.executemany(
                "INSERT INTO pheromones (harbor, tbl, entity_id, key, strength, sprayed_at) VALUES (?,?,?,?,?,?)"
                " ON CONFLICT(harbor, tbl, entity_id, key) DO UPDATE SET strength=excluded.strength,"
                " sprayed_at=excluded.sprayed_at",
                upserts,
            )

    # -- file heat -----------------------------------------------------------------------------------------

    def record_claim(self, session_id: str, agent_id: str | None, paths: list[str], conflicted: bool) -> None:
        now = self._now_ms()
        held = {
            p
            for (p,) in self.store.all(
                "SELECT path FROM pheromone_claims WHERE session_id=? AND released_at IS NULL", (session_id,)
            )
        }
        rows = [(session_id, agent_id, p, now, int(conflicted)) for p in dict.fromkeys(paths) if p not in held]
        if rows:
            with self.store.write() as db:
                db.executemany("INSERT INTO pheromone_claims (session_id, agent_id, path, claimed_at, conflicted)"
                               " VALUES (?,?,?,?,?)", rows)  # fmt: skip

    def record_release(self, session_id: str, paths: list[str] | None) -> None:
        now = self._now_ms()
        with self.store.write() as db:
            if paths:
                db.executemany(
                    "UPDATE pheromone_claims SET released_at=? WHERE session_id=? AND path=? AND released_at IS NULL",
                    [(now, session_id, p) for p in paths],
                )
            else:
                db.execute("UPDATE pheromone_claims SET released_at=? WHERE session_id=? AND released_at IS NULL",
                           (now, session_id))  # fmt: skip

    def file_heat(self, prefix: str = "", depth: int = 5, limit: int = 50) -> dict[str, Any]:
        now = self._now_ms()
        rows = self.store.all(
            "SELECT path, session_id, agent_id, claimed_at, released_at, conflicted FROM pheromone_claims "
            "WHERE substr(path, 1, ?) = ? ORDER BY claimed_at DESC",
            (len(prefix), prefix),
        )
        files: dict[str, dict[str, Any]] = {}
        for path, session, agent, claimed, released, conflicted in rows:
            f = files.setdefault(
                path,
                {
                    "path": path,
                    "heat": 0.0,
                    "activeClaims": 0,
                    "totalClaims": 0,
                    "lastActivity": 0,
                    "agents": [],
                    "sessions": set(),
                    "flagged": False,
                },
            )
            f["totalClaims"] += 1
            f["lastActivity"] = max(f["lastActivity"], released or claimed, claimed)
            f["heat"] = min(1.0, f["heat"] + HEAT_PER_CLAIM * math.exp(-max(0, now - claimed) / HEAT_TAU_MS))
            if released is None:
                f["heat"] = min(1.0, f["heat"] + HEAT_PER_CLAIM)
                f["activeClaims"] += 1
                f["sessions"].add(session)
                f["flagged"] |= bool(conflicted)
                if agent and agent not in f["agents"]:
                    f["agents"].append(agent)
        dirs: dict[str, dict[str, Any]] = {}
        for f in files.values():
            f["conflict"] = len(f.pop("sessions")) > 1 or (f.pop("flagged") and f["activeClaims"] > 0)
            f["heat"] = round(f["heat"], 3)
            parts = f["path"].strip("/").split("/")[:-1]
            for n in range(1, min(len(parts), depth) + 1):
                d = dirs.setdefault("/".join(parts[:n]), {"path": "/".join(parts[:n]), "heat": 0.0, "fileCount": 0,
                                                          "conflictCount": 0})  # fmt: skip
                d["heat"] = max(d["heat"], f["heat"])
                d["fileCount"] += 1
                d["conflictCount"] += int(f["conflict"])
        top_files = sorted(files.values(), key=lambda f: (-f["heat"], f["path"]))[:limit]
        top_dirs = sorted(dirs.values(), key=lambda d: (-d["heat"], d["path"]))[:20]
        return {
            "success": True, "files": top_files, "directories": top_dirs,
            "summary": {
                "totalFiles": len(files), "activeConflicts": sum(f["conflict"] for f in files.values()),
                "hottestFile": top_files[0]["path"] if top_files else None,
                "hottestDir": top_dirs[0]["path"] if top_dirs else None,
            },
        }  # fmt: skip

    # -- background ----------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Claims are recorded inline (observe), before the claim or release is answered: from a task woken
        # later, a SIGKILL in between left the heat map without the claim, or counting a released one forever.
        with self.app.bus.observe(self._claims, "file.claim", "file.release", "session.end"):
            async with trio.open_nursery() as nursery:
                await nursery.start(self._dirty.run)
                nursery.start_soon(self._evaporation)
                task_status.started()

    async def _evaporation(self) -> None:
        # A mark nobody reads would otherwise stay in memory and in the store for good (a spray per edited file
        # adds one per path), counted in the daemon's status though it reads as nothing.
        while True:
            await trio.sleep(self.half_life_s)
            self.evaporate()

    def _claims(self, ev: Event) -> None:
        session = ev.data.get("sessionId")
        if not isinstance(session, str):
            return
        paths = [p for p in ev.data.get("paths") or () if isinstance(p, str)]
        if ev.kind == "file.claim":
            self.record_claim(session, ev.data.get("agentId"), paths, bool(ev.data.get("conflicts")))
        elif ev.kind == "file.release":
            self.record_release(session, paths or None)
        else:
            self.record_release(session, None)


# -- operations ----------------------------------------------------------------------------------------------


_unit_interval = v.number(0, 1)


def _strength(name: str, value: Any) -> float:
    return decay.validate_strength(_unit_interval(name, value))


def _spray(ctx: Ctx, *, table: str, id: str, key: str, strength: float, harbor: str | None) -> dict[str, Any] | None:
    pheromones = ctx.app.pheromones
    pheromones.spray(table, id, key, strength, harbor=harbor or "", durable=ctx.acknowledged)
    if not ctx.acknowledged:
        return None  # fire-and-forget: nobody reads the reply, so skip computing it
    values = pheromones.sniff(table, id, harbor=harbor or "")
    return {"success": True, "table": table, "id": id, "key": key, "strength": strength, "pheromones": values}


def _sniff(ctx: Ctx, *, table: str, id: str, harbor: str | None) -> dict[str, Any]:
    return {"success": True, "table": table, "id": id,
            "pheromones": ctx.app.pheromones.sniff(table, id, harbor=harbor or "")}  # fmt: skip


def _list(ctx: Ctx, *, table: str | None, harbor: str | None) -> dict[str, Any]:
    found = ctx.app.pheromones.all(table=table, harbor=harbor)
    return {"success": True, "count": len(found), "pheromones": found}


def _files(ctx: Ctx, *, path: str, depth: int, limit: int) -> dict[str, Any]:
    return ctx.app.pheromones.file_heat(path, depth, limit)


_TABLE = Param("table", v.one_of(*TABLES), required=True)
_ID = Param("id", v.text(500), required=True)
_HARBOR = Param("harbor", v.name("harbor name", 120))
OPS = (
    Op(
        "pheromone.spray",
        _spray,
        (
            _TABLE,
            _ID,
            Param("key", v.name("pheromone key"), required=True),
            Param("strength", _strength, required=True),
            _HARBOR,
        ),
        fire_and_forget=True,
        summary="set a 0-1 signal on an entity (fire-and-forget allowed; it decays when read)",
    ),
    Op("pheromone.sniff", _sniff, (_TABLE, _ID, _HARBOR), summary="an entity's signals with decay applied"),
    Op(
        "pheromone.list",
        _list,
        (Param("table", v.one_of(*TABLES)), _HARBOR),
        summary="every entity with a signal above the floor",
    ),
    Op(
        "pheromone.files",
        _files,
        (
            Param("path", v.text(4096, allow_empty=True), default=""),
            Param("depth", v.integer(1, 50), default=5),
            Param("limit", v.integer(1, 500), default=50),
        ),
        summary="file heat map from claim history and active claims, with conflicts",
    ),
)
