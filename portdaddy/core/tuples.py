"""The Linda tuple space: ``out`` writes, ``rd`` reads, ``in`` takes (exactly one caller gets each tuple, ever).

Every live tuple is held in memory per harbor (``None`` = the global space) in id order and written through to
the store: an ``out`` commits before its reply, an ``in`` deletes in the transaction that decides the winner.
Operations run on the trio thread without awaiting between deciding and committing, so two takers can never
both win.

Blocking (``wait``) is true Linda blocking, not polling: a caller with no match parks its task in a per-harbor
FIFO queue of waiters. An ``out`` offers the new tuple to that queue in arrival order: every matching reader
gets a copy, and the first matching taker takes it (it is deleted in the same transaction as it was written).
A cancelled waiter (timeout, disconnect) is removed by its abort function, synchronously, so a tuple is never
handed to a task that is no longer waiting.

Ids are handed out from memory, ID_BLOCK at a time reserved in ``sqlite_sequence`` (as message ids are), so an
``out`` writes its row's page and not the sequence's too. After a restart ids resume above the reservation: a
gap, never an id seen twice.
"""

from __future__ import annotations

import heapq
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Any

import trio
from outcome import Value

from portdaddy.core import tuplematch
from portdaddy.core import validate as v
from portdaddy.core.clock import now_ms
from portdaddy.core.ops import Ctx, Later, Op, Param
from portdaddy.core.store import autoincrement_ids
from portdaddy.errors import PDError, StoreError, bad_input

log = logging.getLogger("portdaddy.tuples")

Harbor = str | None
Matcher = Callable[[list[Any]], bool]
ID_BLOCK = 1024  # tuple ids reserved per durable write of sqlite_sequence
COMPACT_SLACK = 64  # stale expiry entries tolerated beyond twice the live tuples


@dataclass(slots=True)
class Tuple:
    id: int
    harbor: Harbor
    fields: list[Any]
    written_by: str | None
    created_at: int
    expires_at: int | None

    def live(self, now: int) -> bool:
        return self.expires_at is None or self.expires_at > now

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "harbor": self.harbor, "fields": self.fields, "writtenBy": self.written_by,
                "createdAt": self.created_at, "expiresAt": self.expires_at}  # fmt: skip

    @classmethod
    def from_wire(cls, w: dict[str, Any]) -> Tuple:
        return cls(w["id"], w["harbor"], w["fields"], w["writtenBy"], w["createdAt"], w["expiresAt"])


@dataclass(eq=False, slots=True)
class _Waiter:
    matches: Matcher
    take: bool
    task: trio.lowlevel.Task


class TupleSpace:
    name = "tuples"

    def __init__(self, app: Any) -> None:
        self.app = app
        self.store = app.store
        self._spaces: dict[Harbor, dict[int, Tuple]] = {}
        # The same tuples by harbor and first field, when that is a string (a tag: "job", "review"): a pattern
        # with a literal first string looks only at those, not at every tuple of the harbor.
        self._by_head: dict[tuple[Harbor, str], dict[int, Tuple]] = {}
        self._waiters: dict[Harbor, dict[_Waiter, None]] = {}  # an ordered set: FIFO with O(1) removal
        self._deadlines: list[tuple[int, int, Harbor]] = []
        self._deadline_changed = trio.Event()
        self._live = 0  # tuples indexed (the bound for _deadlines)
        self.taken = 0
        self._ids = autoincrement_ids(self.store, "tuples", ID_BLOCK)
        now = now_ms()
        with self.store.write() as db:
            db.execute("DELETE FROM tuples WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))
        for tid, harbor, fields, by, created, expires in self.store.all(
            "SELECT id, harbor, fields, written_by, created_at, expires_at FROM tuples ORDER BY id"
        ):
            self._index(Tuple(tid, harbor, json.loads(fields), by, created, expires))

    def stats(self) -> dict[str, Any]:
        return {"tuples": sum(len(s) for s in self._spaces.values()),
                "tupleWaiters": sum(len(w) for w in self._waiters.values())}  # fmt: skip

    def _index(self, t: Tuple) -> None:
        self._spaces.setdefault(t.harbor, {})[t.id] = t
        self._live += 1
        if t.fields[0].__class__ is str:
            self._by_head.setdefault((t.harbor, t.fields[0]), {})[t.id] = t
        if t.expires_at is not None:
            deadlines = self._deadlines
            if len(deadlines) > 2 * self._live + COMPACT_SLACK:
                # A tuple taken before its TTL leaves its entry until that deadline: a work queue of 1 h
                # tuples would keep every take of the last hour. Rebuild the heap from the live tuples.
                deadlines[:] = [(u.expires_at, u.id, u.harbor) for space in self._spaces.values()
                                for u in space.values() if u.expires_at is not None]  # fmt: skip
                heapq.heapify(deadlines)
            else:
                heapq.heappush(deadlines, (t.expires_at, t.id, t.harbor))
            if deadlines[0][1] == t.id:
                self._deadline_changed.set()

    def _unindex(self, t: Tuple) -> None:
        space = self._spaces.get(t.harbor)
        if space is not None and space.pop(t.id, None) is not None:
            self._live -= 1
            if not space:
                del self._spaces[t.harbor]
        if t.fields[0].__class__ is str:
            key = (t.harbor, t.fields[0])
            same = self._by_head.get(key)
            if same is not None:
                same.pop(t.id, None)
                if not same:
                    del self._by_head[key]

    def _matching(self, pattern: list[Any] | None, harbor: Harbor, *, newest_first: bool,
                  after: int = 0) -> Iterator[Tuple]:  # fmt: skip
        """Live matches of ``pattern`` (None: every tuple) in id order, lazily: a take of the oldest job stops at
        the first match instead of matching every tuple in the space (a queue of 5,000 made each take+out cost
        2.7 ms). A literal first string looks only at the tuples that start with it."""
        if pattern is None:
            space, matches = self._spaces.get(harbor), _any
        else:
            head = tuplematch.literal_head(pattern)
            space = self._spaces.get(harbor) if head is None else self._by_head.get((harbor, head))
            matches = tuplematch.compile_pattern(pattern)
        if not space:
            return iter(())
        now = now_ms()
        tuples = reversed(space.values()) if newest_first else space.values()
        return (t for t in tuples if t.id > after and t.live(now) and matches(t.fields))

    # -- out -----------------------------------------------------------------------------------------------

    def out(self, fields: list[Any], *, harbor: Harbor = None, ttl_ms: int | None = None,
            written_by: str | None = None) -> Tuple:  # fmt: skip
        now = now_ms()
        t = Tuple(0, harbor, fields, written_by, now, now + ttl_ms if ttl_ms else None)
        self._put(t)
        self.app.bus.emit("tuple.out", harbor=harbor, tupleId=t.id, agentId=written_by)
        return t

    def _put(self, t: Tuple) -> None:
        """Store ``t`` (a new one gets its id) and offer it to the harbor's waiters in FIFO order. Its harbor is
        created on first use, with the tuple or not at all."""
        readers, taker = self._claimants(t)
        if not t.id:  # a tuple given back keeps its id
            t.id = self._ids.take()  # never handed out twice, even if this write fails: a gap is harmless
        with self.store.write() as db:
            if t.harbor is not None:
                self.app.harbors.ensure(t.harbor)
            db.execute(
                "INSERT INTO tuples (id, harbor, fields, written_by, created_at, expires_at) VALUES (?,?,?,?,?,?)",
                (t.id, t.harbor, v.compact_json(t.fields), t.written_by, t.created_at, t.expires_at),
            )
            self._ids.cover(db)
            if taker is not None:
                db.execute("DELETE FROM tuples WHERE id=?", (t.id,))
        queue = self._waiters.get(t.harbor, {})
        for waiter in (*readers, *((taker,) if taker else ())):
            del queue[waiter]
            trio.lowlevel.reschedule(waiter.task, Value(t))
        if not queue:
            self._waiters.pop(t.harbor, None)
        if taker is None:
            self._index(t)
        else:
            self.taken += 1

    def _claimants(self, t: Tuple) -> tuple[list[_Waiter], _Waiter | None]:
        """Every matching reader (the tuple was in the space, if only for an instant) and the first taker."""
        readers: list[_Waiter] = []
        taker = None
        for waiter in self._waiters.get(t.harbor, ()):
            if waiter.matches(t.fields):
                if not waiter.take:
                    readers.append(waiter)
                elif taker is None:
                    taker = waiter
        return readers, taker

    # -- rd / in -------------------------------------------------------------------------------------------

    def rd(self, pattern: list[Any], *, harbor: Harbor = None, limit: int = 100) -> list[Tuple]:
        """Matching tuples, newest first, left in the space."""
        return list(islice(self._matching(pattern, harbor, newest_first=True), limit))

    def take(self, pattern: list[Any], *, harbor: Harbor = None, limit: int = 1,
             agent_id: str | None = None) -> list[Tuple]:  # fmt: skip
        """Remove and return up to ``limit`` matching tuples, oldest first (a work queue hands out in order)."""
        found = list(islice(self._matching(pattern, harbor, newest_first=False), limit))
        self._delete(found)
        for t in found:
            self.app.bus.emit("tuple.in", harbor=harbor, tupleId=t.id, agentId=agent_id)
        return found

    def _delete(self, tuples: list[Tuple]) -> None:
        if not tuples:
            return
        with self.store.write() as db:
            db.executemany("DELETE FROM tuples WHERE id=?", [(t.id,) for t in tuples])
        for t in tuples:
            self._unindex(t)
        self.taken += len(tuples)

    async def wait(self, pattern: list[Any], *, harbor: Harbor = None, take: bool,
                   timeout_s: float | None = None) -> Tuple:  # fmt: skip
        """Block until a tuple matching ``pattern`` is written (call only after a non-blocking miss)."""
        waiter = _Waiter(tuplematch.compile_pattern(pattern), take, trio.lowlevel.current_task())
        queue = self._waiters.setdefault(harbor, {})
        queue[waiter] = None

        def abort(_: Any) -> trio.lowlevel.Abort:
            queue.pop(waiter, None)
            if not queue and self._waiters.get(harbor) is queue:
                del self._waiters[harbor]
            return trio.lowlevel.Abort.SUCCEEDED

        with trio.move_on_after(timeout_s if timeout_s is not None else float("inf")) as scope:
            return await trio.lowlevel.wait_task_rescheduled(abort)
        assert scope.cancelled_caught
        raise PDError("TIMEOUT", f"no tuple matched within {timeout_s:g}s; wait longer with --timeout, or see what "
                      "there is with pd tuple scan", timedOut=True)  # fmt: skip

    def give_back(self, t: Tuple) -> None:
        """Return a taken tuple nobody received (its reply never reached the taker) to the space, with its id, as
        if it had never left: the first matching waiter takes it, or it stays."""
        try:
            self._put(t)
        except StoreError as e:
            log.error("the tuple %s of harbor %s (id %d), taken by a caller that left before the reply, could not be "
                      "written back, and is lost: %s", v.compact_json(t.fields)[:500], t.harbor, t.id, e)  # fmt: skip
            return
        self.taken -= 1

    def poll(self, pattern: list[Any], *, harbor: Harbor = None, after: int = 0, limit: int = 1) -> list[Tuple]:
        """Matching tuples written after id ``after``, oldest first: a reader's cursor over new work."""
        return list(islice(self._matching(pattern, harbor, newest_first=False, after=after), limit))

    # -- scan / count --------------------------------------------------------------------------------------

    def scan(self, *, harbor: Harbor = None, limit: int = 200, query: str | None = None) -> list[Tuple]:
        found = self._matching(None, harbor, newest_first=True)
        if query:
            q = query.lower()
            found = (t for t in found if q in json.dumps([t.fields, t.written_by]).lower())
        return list(islice(found, limit))

    def count(self, pattern: list[Any] | None = None, *, harbor: Harbor = None) -> int:
        return sum(1 for _ in self._matching(pattern, harbor, newest_first=False))

    # -- expiry --------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Delete tuples at their deadline (the next one, not on a tick)."""
        task_status.started()
        while True:
            wait_s = (self._deadlines[0][0] - now_ms()) / 1000 if self._deadlines else float("inf")
            with trio.move_on_after(max(wait_s, 0)):
                await self._deadline_changed.wait()
            self._deadline_changed = trio.Event()
            now = now_ms()
            due = []
            while self._deadlines and self._deadlines[0][0] <= now:
                _, tid, harbor = heapq.heappop(self._deadlines)
                t = self._spaces.get(harbor, {}).get(tid)
                if t is not None:
                    due.append(t)
            if due and not await self.store.background(partial(self._expire, due)):
                for t in due:  # refused: they stay, due again at once
                    heapq.heappush(self._deadlines, (now, t.id, t.harbor))

    def _expire(self, due: list[Tuple]) -> None:
        with self.store.write() as db:
            db.executemany("DELETE FROM tuples WHERE id=?", [(t.id,) for t in due])
        for t in due:
            self._unindex(t)


def _any(fields: list[Any]) -> bool:
    return True


# -- operations ----------------------------------------------------------------------------------------------


def _json_list(check: Callable[[Any], list[Any]], what: str) -> v.Check:
    """A JSON array given as a list or as its JSON text (query strings, the CLI); ``check`` bounds its size."""

    def parse(name: str, value: Any) -> list[Any]:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise bad_input(f"{name} must be a JSON array like {what}, got {value[:60]!r}") from None
            except RecursionError:  # the decoder recurses per level: a few KB of '[' are enough
                raise bad_input(f"{name} nests deeper than {tuplematch.MAX_DEPTH} levels; flatten it") from None
        return check(value)

    return parse


_FIELDS = _json_list(tuplematch.validate_tuple, '["task", "build-auth", "pending"]')
_PATTERN = _json_list(tuplematch.validate_pattern, '["task", "*", ">0.7", "myapp:*"]')
_HARBOR = Param("harbor", v.name("harbor name", 120))
_WAIT = Param("wait", v.boolean, default=False)
_TIMEOUT = Param("timeout", v.duration(max_ms=24 * 3600 * 1000))


def _out(ctx: Ctx, *, fields, harbor, ttl, writtenBy) -> dict[str, Any]:
    t = ctx.app.tuples.out(fields, harbor=harbor, ttl_ms=ttl, written_by=writtenBy or ctx.agent_id)
    return {"success": True, "id": t.id, "tuple": t.to_wire()}


def _rd(ctx: Ctx, *, pattern, harbor, limit, wait, timeout) -> dict[str, Any] | Later:
    space: TupleSpace = ctx.app.tuples
    found = space.rd(pattern, harbor=harbor, limit=limit)
    if not found and wait:

        async def wait_for_one() -> dict[str, Any]:
            # As a waiting take: a match written since the miss above is read now, not waited for.
            written = space.rd(pattern, harbor=harbor, limit=limit)
            if written:
                return _rd_reply(written)
            return _rd_reply([await space.wait(pattern, harbor=harbor, take=False, timeout_s=_seconds(timeout))])

        return Later(wait_for_one)
    return _rd_reply(found)


def _rd_reply(found: list[Tuple]) -> dict[str, Any]:
    return {"success": True, "tuples": [t.to_wire() for t in found], "count": len(found)}


def _in(ctx: Ctx, *, pattern, harbor, limit, wait, timeout) -> dict[str, Any] | Later:
    space: TupleSpace = ctx.app.tuples
    taken = space.take(pattern, harbor=harbor, limit=limit, agent_id=ctx.agent_id)
    if not taken and wait:

        async def wait_to_take() -> dict[str, Any]:
            # Started in a task of its own, after requests of other connections that may have written a match
            # (and found no taker waiting): take it now, or wait for a tuple that may never come again.
            if ctx.conn is not None and ctx.conn.closed:
                raise PDError("CANCELLED", "the connection closed before a tuple was taken")
            taken = space.take(pattern, harbor=harbor, limit=limit, agent_id=ctx.agent_id)
            if taken:
                return _in_reply(taken)
            t = await space.wait(pattern, harbor=harbor, take=True, timeout_s=_seconds(timeout))
            ctx.app.bus.emit("tuple.in", harbor=harbor, tupleId=t.id, agentId=ctx.agent_id)
            return _in_reply([t])

        return Later(wait_to_take)
    return _in_reply(taken)


def _in_reply(taken: list[Tuple]) -> dict[str, Any]:
    wire = [t.to_wire() for t in taken]
    return {"success": True, "taken": wire, "count": len(wire), "tuple": wire[0] if wire else None}


def _give_back_taken(ctx: Ctx, result: dict[str, Any]) -> None:
    """A take whose reply never reached its caller (it hung up first, its connection failed): what it took goes
    back, or a tuple its writer was told was written would be gone with nobody having it."""
    for wire in result["taken"]:
        ctx.app.tuples.give_back(Tuple.from_wire(wire))


def _poll(ctx: Ctx, *, pattern, harbor, after, limit) -> dict[str, Any]:
    found = [t.to_wire() for t in ctx.app.tuples.poll(pattern, harbor=harbor, after=after, limit=limit)]
    last_id = found[-1]["id"] if found else after
    return {"success": True, "tuple": found[0] if found else None, "tuples": found, "lastId": last_id}


def _scan(ctx: Ctx, *, harbor, limit, query) -> dict[str, Any]:
    found = [t.to_wire() for t in ctx.app.tuples.scan(harbor=harbor, limit=limit, query=query)]
    return {"success": True, "tuples": found, "count": len(found)}


def _count(ctx: Ctx, *, pattern, harbor) -> dict[str, Any]:
    return {"success": True, "count": ctx.app.tuples.count(pattern, harbor=harbor)}


def _seconds(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000


OPS = (
    Op(
        "tuple.out",
        _out,
        (
            Param("fields", _FIELDS, required=True, aliases=("tuple",)),
            _HARBOR,
            Param("ttl", v.lifetime(), aliases=("ttlMs",)),
            Param("writtenBy", v.name("agent id"), aliases=("as",)),
        ),
        summary="write a tuple (a JSON array) to a harbor's space or the global one, with an optional TTL",
    ),
    Op(
        "tuple.rd",
        _rd,
        (
            Param("pattern", _PATTERN, default=["*"]),
            _HARBOR,
            Param("limit", v.integer(1, 1000), default=100),
            _WAIT,
            _TIMEOUT,
        ),
        summary="read tuples matching a pattern, newest first; wait=true blocks until one is written",
    ),
    Op(
        "tuple.in",
        _in,
        (
            Param("pattern", _PATTERN, required=True),
            _HARBOR,
            Param("limit", v.integer(1, 1000), default=1),
            _WAIT,
            _TIMEOUT,
        ),
        summary="take (read and remove) matching tuples, oldest first; exactly one caller gets each tuple",
        undo=_give_back_taken,
    ),
    Op(
        "tuple.poll",
        _poll,
        (
            Param("pattern", _PATTERN, default=["*"]),
            _HARBOR,
            Param("after", v.integer(0), default=0),
            Param("limit", v.integer(1, 1000), default=1),
        ),
        summary="matching tuples written after id `after`, oldest first, and the cursor (`lastId`) to poll from next",
    ),
    Op(
        "tuple.scan",
        _scan,
        (_HARBOR, Param("limit", v.integer(1, 500), default=200), Param("query", v.text(200))),
        summary="every live tuple of a space, newest first (query: case-insensitive substring)",
    ),
    Op(
        "tuple.count",
        _count,
        (Param("pattern", _PATTERN), _HARBOR),
        summary="how many live tuples of a space match a pattern (all when omitted)",
    ),
)
